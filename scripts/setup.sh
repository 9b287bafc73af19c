#!/usr/bin/env bash
# Installs ekko with its test tools. torch is pinned first: an unpinned torch
# would pull a CUDA build of several GB; fbgemm-gpu-cpu (a benchmark peer)
# goes in with --no-deps so nothing replaces that torch, and so does torchrec
# (the importer's TorchRec support is tested against it) with its pure-Python
# dependencies: its own requirements would pull the CUDA fbgemm-gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install -q --disable-pip-version-check torch==2.13.0
$PY -m pip install -q --disable-pip-version-check -e '.[dev]'
$PY -m pip install -q --disable-pip-version-check --no-deps fbgemm-gpu-cpu==1.8.0 \
  || echo "fbgemm-gpu-cpu not installed: its comparisons will be skipped"
$PY -m pip install -q --disable-pip-version-check --no-deps torchrec==1.8.0 tensordict==0.15.3 \
  pyvers==0.2.3 cloudpickle torchmetrics==1.0.3 lightning-utilities==0.15.3 \
  pyre-extensions==0.0.32 typing-inspect==0.9.0 mypy-extensions tqdm \
  || echo "torchrec not installed: the TorchRec import test will be skipped"
