#!/usr/bin/env bash
# Installs ekko with its test tools into the Python that scripts/env.sh picks
# (.venv/ in the repository unless a virtual environment is active).
# torch is pinned first: without a GPU it comes from PyTorch's CPU wheel index
# (an unpinned or default-index torch pulls a CUDA build of several GB);
# fbgemm-gpu-cpu (a benchmark peer) and torchrec (the importer's TorchRec
# support is tested against it, with its pure-Python dependencies) go in
# with --no-deps so nothing replaces that torch: torchrec's own requirements
# would pull the CUDA fbgemm-gpu. Optional packages that fail to install are
# reported and their tests are skipped; scripts/test.sh requires what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

TORCH=2.13.0
CPU_INDEX=https://download.pytorch.org/whl/cpu

pip_install() {
  "$PY" -m pip install -q --disable-pip-version-check "$@"
}

has_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

install_torch() {
  if "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH')" 2>/dev/null; then
    return 0
  fi
  if ! has_gpu; then
    # the +cpu build from PyTorch's index (dependencies still from the default one)
    echo "setup: installing torch $TORCH, CPU build (no GPU found)" >&2
    pip_install --retries 1 --timeout 60 --extra-index-url "$CPU_INDEX" "torch==$TORCH+cpu" &&
      return 0
    echo "setup: no torch $TORCH+cpu from PyTorch's CPU index; trying the default index" \
         "(on Linux that is the CUDA build, several GB)" >&2
  else
    echo "setup: installing torch $TORCH (a GPU was found: the default build)" >&2
  fi
  pip_install "torch==$TORCH"
}

# optional WHAT CONSEQUENCE PIP-ARGS...: install a pinned optional package, or say
# clearly what is missing and what that skips.
optional() {
  local what=$1 consequence=$2
  shift 2
  if ! pip_install "$@"; then
    echo "setup: $what not installed: $consequence" >&2
  fi
}

install_torch
pip_install -e '.[dev]'
optional "fbgemm-gpu-cpu" "its benchmark comparisons and tests are skipped" \
  --no-deps fbgemm-gpu-cpu==1.8.0
optional "torchrec" "the TorchRec import test is skipped" \
  --no-deps torchrec==1.8.0 tensordict==0.15.3 pyvers==0.2.3 cloudpickle \
  torchmetrics==1.0.3 lightning-utilities==0.15.3 pyre-extensions==0.0.32 \
  typing-inspect==0.9.0 mypy-extensions tqdm
optional "triton" "the Triton backend's interpreter and PTX tests are skipped" --no-deps triton==3.7.1
optional "ray" "the engine's tests across processes (tests/test_engine_ray.py) are skipped" \
  "ray==2.60.0"
echo "setup: ekko installed for $("$PY" -c 'import sys; print(sys.executable)')" >&2
