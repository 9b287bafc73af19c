#!/usr/bin/env bash
# Installs ekko with its test tools. torch is pinned first: an unpinned torch
# would pull a CUDA build of several GB; fbgemm-gpu-cpu (a benchmark peer)
# goes in with --no-deps so nothing replaces that torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q --disable-pip-version-check torch==2.13.0
$PY -m pip install -q --disable-pip-version-check -e '.[dev]'
$PY -m pip install -q --disable-pip-version-check --no-deps fbgemm-gpu-cpu==1.8.0 \
  || echo "fbgemm-gpu-cpu not installed: its comparisons will be skipped"
