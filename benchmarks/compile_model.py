"""Compile time of a whole model: source to native kernels, cold and cached.

    python benchmarks/compile_model.py [MODEL] [--runs N] [--quick] [--out DIR]

This compares ekko with itself (cold, cached, in-process), not with a peer:
no other tool compiles a `.ekko` model.

"cold" uses an empty kernel cache in a fresh process; "cached" is a fresh
process whose disk cache already holds the kernels (the second start of a
server); "in-process" recompiles in the same process (memory cache). Each
figure is the median of N runs of `ekko.compile_model` timed inside the child
process, so interpreter start-up and imports (xDSL, llvmlite, lark: "import
ekko") are reported separately, as `ekko run`'s compile line leaves them out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from results_io import add_out, write_results  # noqa: E402
CHILD = """
import json, sys, time
t0 = time.perf_counter()
import ekko
import ekko.kernels.model  # `import ekko` is lazy: load the compiler and runtime here,
t1 = time.perf_counter()   # so "compile" is what `ekko run` reports on its compile line
m = ekko.compile_model(sys.argv[1])
t2 = time.perf_counter()
m2 = ekko.compile_model(sys.argv[1])
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "compile": t2 - t1, "again": t3 - t2,
                  "kernels": len({k.spec.key() for k in [*m.update_kernels.values(),
                                                          *m.lookup_kernels.values()]}),
                  "tables": len(m.model.tables)}))
"""


def child(model: str, cache: str) -> dict:
    env = {**os.environ, "EKKO_CACHE_DIR": cache}
    out = subprocess.run([sys.executable, "-c", CHILD, model], capture_output=True, text=True,
                         env=env, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", default=str(ROOT / "examples" / "dlrm.ekko"))
    p.add_argument("--runs", type=int, default=None, help="runs, median reported (default 3; "
                   "1 with --quick)")
    p.add_argument("--quick", action="store_true", help="one run; writes nothing unless --out")
    add_out(p)
    p.add_argument("--check", action="store_true", help="exit 1 unless cold < 5 s and cached < 0.5 s")
    args = p.parse_args(argv)
    args.runs = args.runs or (1 if args.quick else 3)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cold, cached, again, imports = [], [], [], []
    info: dict = {}
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as cache:
            first = child(args.model, cache)
            second = child(args.model, cache)
        cold.append(first["compile"])
        cached.append(second["compile"])
        again.append(first["again"])
        imports.append(first["import"])
        info = first
    rows = [("cold (empty disk cache)", cold), ("cached (new process, disk cache)", cached),
            ("again (same process)", again), ("import ekko (compiler and runtime)", imports)]
    lines = [f"model {Path(args.model).name}: {info['tables']} tables, {info['kernels']} distinct kernels",
             "", "| compile | median s | min s | max s |", "|---|---|---|---|"]
    lines += [f"| {name} | {statistics.median(v):.3f} | {min(v):.3f} | {max(v):.3f} |" for name, v in rows]
    text = "\n".join(lines)
    print(text)
    write_results(args, "compile_model", text + "\n")
    if args.check and (statistics.median(cold) >= 5.0 or statistics.median(cached) >= 0.5):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
