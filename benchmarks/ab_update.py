"""Same-run A/B of ekko's fused update: this checkout against another git ref.

Two worker processes, one importing ekko from this checkout and one from
`--base-ref` (exported with `git archive` into a temporary folder), each set
up the workload of benchmarks/update_kernels.py (1M Zipf(1.05) ids into a
4M-row f32 table; `--quick`: 100k into 400k) and its ekko peer. The driver
then asks them for one timed call at a time, alternating which goes first,
so both see the same machine load; it reports each side's median and the
median of the per-round ratios (new / base), the figure a change's cost is
judged by.

    python benchmarks/ab_update.py [--base-ref main] [--quick] [--dims 64,128]
                                   [--cases rowwise_adagrad_int8,sgd] [--rounds 20]
                                   [--size ROWS,IDS]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PACKAGES = ("compiler", "dialects", "kernels", "engine")  # pyproject's package-dir mapping


def export_tree(ref: str, into: Path) -> Path:
    """A folder holding `ekko` as `ref` has it, importable by putting the folder on sys.path."""
    src = into / "src"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    pkg = into / "pkg"
    (pkg / "ekko").mkdir(parents=True)
    for f in (src / "ekko").iterdir():
        (pkg / "ekko" / f.name).symlink_to(f)
    for name in PACKAGES:
        (pkg / "ekko" / name).symlink_to(src / name)
    return pkg


def worker(pkg: str, case: str, dim: int, rows: int, n_ids: int) -> None:
    """Set up one side, then answer each line on stdin with one timed call (seconds)."""
    if pkg != "-":  # ekko from `pkg`, not this checkout's editable install
        sys.meta_path[:] = [f for f in sys.meta_path
                            if "editable" not in type(f).__module__.lower()
                            and "editable" not in getattr(f, "__name__", "").lower()]
        sys.path.insert(0, pkg)
    sys.path.insert(0, str(HERE))
    import update_kernels as bench

    work = bench.make_workload(rows, dim, n_ids)
    bufs = bench.allocate(case, rows, dim)
    peer = bench.ekko_peer(case, work, bufs)
    peer.run(1)  # compile, first touch of scratch
    print("ready", flush=True)
    for version, _ in enumerate(sys.stdin, start=2):
        start = time.perf_counter()
        peer.run(version)
        print(time.perf_counter() - start, flush=True)


def ab(pkg: Path, case: str, dim: int, size: tuple[int, int],
       rounds: int) -> tuple[list[float], list[float]]:
    """(base times, new times) in seconds, one call each per round."""
    argv = [sys.executable, __file__, "--worker"]
    sides = {name: subprocess.Popen([*argv, where, case, str(dim), *map(str, size)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for name, where in (("base", str(pkg)), ("new", "-"))}
    try:
        for p in sides.values():
            if p.stdout.readline().strip() != "ready":
                raise SystemExit(f"a worker failed to start ({case}, dim {dim})")
        times: dict[str, list[float]] = {"base": [], "new": []}
        for r in range(rounds):
            for name in ("base", "new") if r % 2 == 0 else ("new", "base"):
                sides[name].stdin.write("go\n")
                sides[name].stdin.flush()
                times[name].append(float(sides[name].stdout.readline()))
        return times["base"], times["new"]
    finally:
        for p in sides.values():
            p.stdin.close()
            p.wait()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--worker"]:
        worker(args[1], args[2], int(args[3]), int(args[4]), int(args[5]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-ref", default="main", help="the git ref to compare with (default main)")
    p.add_argument("--quick", action="store_true", help="10x smaller workload")
    p.add_argument("--dims", default=None, help="comma-separated (default 64,128; 64 with --quick)")
    p.add_argument("--cases", default="rowwise_adagrad_int8,sgd")
    p.add_argument("--rounds", type=int, default=20, help="timed calls per side (default 20)")
    p.add_argument("--size", default=None, help="ROWS,IDS instead of the benchmark's workload")
    p.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    a = p.parse_args(args)
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    size = (400_000, 100_000) if a.quick else (4_000_000, 1_000_000)
    if a.size is not None:
        try:
            size = tuple(int(x) for x in a.size.split(","))
            if len(size) != 2 or min(size) < 1:
                raise ValueError
        except ValueError:
            p.error(f"--size takes ROWS,IDS (positive integers), got {a.size!r}")
    dims = [int(d) for d in (a.dims or ("64" if a.quick else "64,128")).split(",")]
    lines = [f"{size[1]:,} Zipf(1.05) ids into {size[0]:,} rows, {a.rounds} alternating calls "
             "per side, threads=2.", "",
             f"| case | dim | {a.base_ref} ms | this tree ms | this / {a.base_ref} "
             "(median of per-round ratios) |", "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory(prefix="ekko-ab-") as tmp:
        pkg = export_tree(a.base_ref, Path(tmp))
        for dim in dims:
            for case in a.cases.split(","):
                base, new = ab(pkg, case, dim, size, a.rounds)
                ratio = statistics.median(n / b for n, b in zip(new, base))
                lines.append(f"| {case} | {dim} | {statistics.median(base) * 1e3:.2f} | "
                             f"{statistics.median(new) * 1e3:.2f} | {ratio:.3f} |")
                print(lines[-1], flush=True)
    if a.out is not None:
        a.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
