#!/usr/bin/env bash
# Sets up ekko and runs every test: pytest (which also runs the lit suite), with
# the Python setup.sh installed into. The TorchRec test is required when
# setup.sh installed torchrec (a broken install fails), skipped when it could not.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
if [ -z "${EKKO_REQUIRE_TORCHREC+set}" ] &&
   "$PY" -c "import importlib.metadata as m; m.version('torchrec')" 2>/dev/null; then
  export EKKO_REQUIRE_TORCHREC=1
fi
if [ -z "${EKKO_CACHE_DIR:-}" ]; then
  # a fresh kernel cache per run, removed however the run ends
  EKKO_CACHE_DIR=$(mktemp -d -t ekko-test-cache.XXXXXX)
  trap 'rm -rf "$EKKO_CACHE_DIR"' EXIT
fi
export EKKO_CACHE_DIR
"$PY" -m pytest -q tests "$@"
