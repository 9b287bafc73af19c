#!/usr/bin/env bash
# Sets up ekko and runs the main job: the 26-table Criteo DLRM compiled to
# native kernels and run on a synthetic Zipf update stream with lookups.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec ekko run examples/dlrm.ekko "$@"
