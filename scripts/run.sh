#!/usr/bin/env bash
# Sets up ekko and runs the main job: the 26-table Criteo DLRM compiled to
# native kernels, a primary and 2 serving replicas kept fresh from a
# synthetic Zipf update stream while they serve lookups.
# Arguments go to `ekko run` (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec ekko run examples/dlrm.ekko --replicas 2 "$@"  # the installed command, first on PATH (env.sh)
