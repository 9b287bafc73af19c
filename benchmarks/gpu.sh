#!/usr/bin/env bash
# The Triton target on a GPU machine that has a CUDA torch and triton (3.6 or
# 3.7) but no network: the differential tests on the real GPU, then the
# update and lookup benchmark (benchmarks/gpu.py). A few minutes in all.
#
#   bash benchmarks/gpu.sh --prepare   # here, with network: fill benchmarks/wheels/
#   bash benchmarks/gpu.sh             # there: install from the wheels, test, benchmark
#
# --prepare downloads the pure-Python dependencies (xdsl, lark, pytest and its
# own), llvmlite and numpy for CPython 3.10-3.13 (the LLVM backend is the
# tests' reference), and builds a wheel of this tree. The wheels are not
# committed (.gitignore). On the GPU machine a virtual environment that sees
# the system's torch and triton gets ekko and those wheels, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=benchmarks/wheels
PY=${PYTHON:-python3}

prepare() {
  mkdir -p "$WHEELS"
  rm -f "$WHEELS"/ekko-*.whl
  "$PY" -m pip wheel -q --no-deps -w "$WHEELS" .
  "$PY" -m pip download -q --no-deps -d "$WHEELS" "xdsl>=0.74,<0.75" "lark>=1.1" \
    "immutabledict<4.3.2" ordered-set typing-extensions pytest pluggy iniconfig packaging pygments
  for v in 3.10 3.11 3.12 3.13; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$v" \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux_2_28_x86_64 -d "$WHEELS" "llvmlite>=0.50,<0.51" "numpy>=1.26"
  done
  echo "gpu.sh: wheels in $WHEELS; copy the repository with them to the GPU machine" >&2
}

if [[ "${1:-}" == "--prepare" ]]; then
  prepare
  exit 0
fi

ls "$WHEELS"/ekko-*.whl >/dev/null 2>&1 || {
  echo "gpu.sh: no wheels in $WHEELS: run 'bash benchmarks/gpu.sh --prepare' where there is network" >&2
  exit 1
}
"$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'" || {
  echo "gpu.sh: needs a CUDA torch and triton on this machine" >&2
  exit 1
}
VENV=${VENV:-/tmp/ekko-gpu-venv}
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELS" --force-reinstall \
  --no-deps "$WHEELS"/ekko-*.whl
"$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELS" \
  "xdsl>=0.74,<0.75" "lark>=1.1" "llvmlite>=0.50,<0.51" "numpy>=1.26" pytest
unset TRITON_INTERPRET
export EKKO_CACHE_DIR=${EKKO_CACHE_DIR:-/tmp/ekko-gpu-cache}
"$VENV/bin/python" -c "import torch, triton; print('gpu.sh:', torch.cuda.get_device_name(), \
'torch', torch.__version__, 'triton', triton.__version__)"

# the differential tests in 8 shards: each Triton kernel is JIT-compiled once per shard
SHARDS=8
mapfile -t TESTS < <("$VENV/bin/pytest" -q --collect-only -p no:cacheprovider \
  tests/test_triton_kernels.py | grep '::')
pids=()
for ((s = 0; s < SHARDS; s++)); do
  mine=()
  for ((k = s; k < ${#TESTS[@]}; k += SHARDS)); do mine+=("${TESTS[k]}"); done
  ((${#mine[@]})) || continue
  timeout 150 "$VENV/bin/pytest" -q -p no:cacheprovider "${mine[@]}" \
    >"/tmp/ekko-gpu-shard$s.log" 2>&1 &
  pids+=($!)
done
failed=0
for ((s = 0; s < ${#pids[@]}; s++)); do
  if ! wait "${pids[s]}"; then
    failed=1
    tail -30 "/tmp/ekko-gpu-shard$s.log"
  fi
done
grep -h -E "passed|failed" /tmp/ekko-gpu-shard*.log || true
if ((failed)); then
  echo "gpu.sh: Triton differential tests failed on the GPU (benchmark still runs)" >&2
fi

# the benchmark runs from /tmp: the repository's ekko/ folder must not shadow the install
# torch.compile takes tens of seconds a function: past the budget its peers are skipped
(cd /tmp && "$VENV/bin/python" "$OLDPWD/benchmarks/gpu.py" --runs "${RUNS:-10}" \
  --budget "$((${BUDGET:-270} - SECONDS))")
exit "$failed"
