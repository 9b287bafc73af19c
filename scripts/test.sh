#!/usr/bin/env bash
# Sets up ekko and runs every test: pytest (which also runs the lit suite).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export EKKO_REQUIRE_TORCHREC="${EKKO_REQUIRE_TORCHREC:-1}"  # setup.sh installs it
export EKKO_CACHE_DIR="${EKKO_CACHE_DIR:-$(mktemp -d)}"
python3 -m pytest -q tests "$@"
