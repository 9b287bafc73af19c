#!/usr/bin/env bash
# The Triton target on a lent GPU machine that has a CUDA torch and triton but no
# network, with ekko's pure-Python dependencies and llvmlite carried as cp312
# wheels in .whl/ (see docs/backends.md, "On a GPU"): the differential tests on
# the real GPU, then benchmarks/gpu.py. Results are copied to $OUT when set.
#
#   bash benchmarks/gpu_lent.sh [SECONDS_FOR_THE_BENCHMARK]   (0: the tests only)
#   bash benchmarks/gpu_lent.sh --python FILE                  (FILE instead)
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-/tmp/ekko-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/ekko-site .whl/*.whl || exit 1
# an importable view of this tree: ekko.<sub> is <sub>/ (pyproject's package-dir)
VIEW=/tmp/ekko-view
rm -rf "$VIEW" && mkdir -p "$VIEW/ekko"
python3 - "$REPO" "$VIEW" <<'PY'
import os, sys, tomllib
repo, view = sys.argv[1:]
dirs = tomllib.load(open(f"{repo}/pyproject.toml", "rb"))["tool"]["setuptools"]["package-dir"]
for f in os.listdir(f"{repo}/ekko"):
    os.symlink(f"{repo}/ekko/{f}", f"{view}/ekko/{f}")
for name, d in dirs.items():
    if name != "ekko":
        os.symlink(f"{repo}/{d}", f"{view}/{name.replace('.', '/')}")
for f in ("tests", "examples", "benchmarks", "pyproject.toml", "docs"):
    os.symlink(f"{repo}/{f}", f"{view}/{f}")
PY
export PYTHONPATH=/tmp/ekko-site:$VIEW EKKO_CACHE_DIR=/tmp/ekko-gpu-cache PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
cd "$VIEW"
python3 -c "import torch, triton, llvmlite, xdsl; print('gpu:', torch.cuda.get_device_name(), \
'torch', torch.__version__, 'triton', triton.__version__, 'llvmlite', llvmlite.__version__)"
if [[ "${1:-}" == --python ]]; then  # a script of one's own, in the same set-up
  python3 "$REPO/$2"
  exit
fi
TESTS=(tests/test_triton_kernels.py tests/test_fp8.py tests/test_layout_registry.py
       tests/test_math_semantics.py tests/test_backend_contract.py tests/test_finite_outputs.py
       tests/test_optimizers.py)
mapfile -t IDS < <(python3 -m pytest -q --collect-only -p no:cacheprovider "${TESTS[@]}" \
  -k "triton or Triton" 2>/dev/null | grep '::')
echo "gpu: ${#IDS[@]} Triton tests"
SHARDS=8
pids=()
for ((s = 0; s < SHARDS; s++)); do
  mine=()
  for ((k = s; k < ${#IDS[@]}; k += SHARDS)); do mine+=("${IDS[k]}"); done
  ((${#mine[@]})) || continue
  timeout 200 python3 -m pytest -q -p no:cacheprovider "${mine[@]}" >"/tmp/ekko-shard$s.log" 2>&1 &
  pids+=($!)
done
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=1; done
cat /tmp/ekko-shard*.log > "$OUT/tests.log"
grep -h -E "^[0-9]+ (passed|failed)|^FAILED|^ERROR|^E  " "$OUT/tests.log" | head -60
[[ "${1:-150}" == 0 ]] && exit "$failed"
python3 benchmarks/gpu.py --runs 10 --budget "${1:-150}" 2>&1 | tee "$OUT/gpu_bench.txt"
cp benchmarks/results/gpu.json benchmarks/results/gpu.png "$OUT/" 2>/dev/null
exit "$failed"
