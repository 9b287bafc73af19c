"""The Triton target on a GPU: fused updates and pooled lookups against torch.

Update workload: a delta of 1M ids drawn from Zipf(1.05) (folded into the
table and scattered by a fixed permutation, so hot ids are not neighbours)
with f32 gradient rows, into a 4M-row f32 table, dims 64 and 128:

  rowwise_adagrad_int8: dedup, FBGEMM's rowwise Adagrad, re-quantize the
      touched rows into an int8 fused-rowwise serving copy, stamp versions.
  adam: dedup and SparseAdam-style moments on the touched rows.

Lookup workload: 65,536 bags of 20 Zipf ids (sum pooling) from the same
tables, f32 and int8 rows.

Peers, on the same device in the same run: ekko (target="triton"), torch
eager (unique + index_add_ + the row math; F.embedding_bag), and
torch.compile of the same functions. Each peer's first call is checked
against ekko's result on sampled touched rows; then `--runs` timed calls
(the tables keep updating, the work per call is the same). Each case is
also given as a share of the device's copy bandwidth measured in this run:
the bytes the case must move (gradients and ids read once, touched rows
read and written, serving rows and versions written) over its time.

    python benchmarks/gpu.py [--quick] [--runs 10] [--budget SECONDS]

--quick runs tiny shapes (on the CPU under TRITON_INTERPRET=1 when there is
no GPU, torch.compile with its eager backend there) and writes nothing;
otherwise the table is also written to benchmarks/results/gpu.json and a
plot to benchmarks/results/gpu.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
START = time.monotonic()
BUDGET = [float("inf")]  # seconds after which torch.compile peers are skipped (--budget)
LR, EPS, BETAS = 0.01, 1e-8, (0.9, 0.999)


@dataclass(frozen=True)
class Shape:
    rows: int
    n_ids: int
    dims: tuple[int, ...]
    bags: int
    pooling: int


FULL = Shape(rows=4_000_000, n_ids=1_000_000, dims=(64, 128), bags=65_536, pooling=20)
QUICK = Shape(rows=3_000, n_ids=600, dims=(16,), bags=40, pooling=5)


def pick_device(quick: bool) -> str:
    """cuda when there is one (and no interpreter); the interpreter on the CPU for --quick."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return "cuda"
    if not quick:
        raise SystemExit("gpu.py: no CUDA device (use --quick for the interpreter on the CPU)")
    os.environ["TRITON_INTERPRET"] = "1"
    return "cpu"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], runs: int, device: str) -> float:
    """Median seconds of `runs` calls."""
    times = []
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Bytes read + written per second by a large device copy (the roofline here)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), 5, device)


def zipf_ids(n: int, rows: int, seed: int, device: str) -> torch.Tensor:
    """n ids from Zipf(1.05) over [0, rows), hot ids scattered by a fixed permutation."""
    rng = np.random.default_rng(seed)
    raw = (rng.zipf(1.05, size=n) - 1) % rows
    perm = np.random.default_rng(1234).permutation(rows)
    return torch.from_numpy(perm[raw].astype(np.int64)).to(device)


# -- update peers written with torch ops ----------------------------------------------


def torch_rowwise_int8(w, m, q, versions, ids, grads, version: int) -> None:
    """Eager rowwise Adagrad + int8 refresh + versions, as a torch user writes it."""
    dim = w.shape[1]
    uniq, inv = torch.unique(ids, return_inverse=True)
    g = torch.zeros(uniq.numel(), dim, device=w.device).index_add_(0, inv, grads)
    mm = m[uniq] + (g * g).mean(dim=1)
    m[uniq] = mm
    new = w[uniq] - LR * g / (mm.sqrt() + EPS)[:, None]
    w[uniq] = new
    lo, hi = new.min(dim=1).values, new.max(dim=1).values
    inv_s = 255.0 / (hi - lo + 1e-8)
    codes = ((new - lo[:, None]) * inv_s[:, None]).round().clamp(0, 255).to(torch.uint8)
    tail = torch.stack([(hi - lo) / 255.0, lo], dim=1).contiguous().view(torch.uint8)
    q[uniq] = torch.cat([codes, tail], dim=1)
    versions[uniq] = version


def torch_adam(w, m, v, ids, grads, step: int) -> None:
    """Eager SparseAdam on the touched rows (bias-corrected moments)."""
    dim = w.shape[1]
    uniq, inv = torch.unique(ids, return_inverse=True)
    g = torch.zeros(uniq.numel(), dim, device=w.device).index_add_(0, inv, grads)
    mu = BETAS[0] * m[uniq] + (1 - BETAS[0]) * g
    nu = BETAS[1] * v[uniq] + (1 - BETAS[1]) * g * g
    m[uniq], v[uniq] = mu, nu
    alpha = LR * (1 - BETAS[1] ** step) ** 0.5 / (1 - BETAS[0] ** step)
    w[uniq] = w[uniq] - alpha * mu / (nu.sqrt() + EPS)


def torch_bag(table, ids, offsets):
    return torch.nn.functional.embedding_bag(ids, table, offsets, mode="sum")


def torch_bag_int8(table, ids, bag_of_id, nbags: int):
    """int8 rows: gather, dequantize, sum per bag (bag_of_id is part of the input)."""
    rows = table[ids]
    dim = table.shape[1] - 8
    tail = rows[:, dim:].contiguous().view(torch.float32)
    vals = rows[:, :dim].float() * tail[:, :1] + tail[:, 1:]
    return torch.zeros(nbags, dim, device=table.device).index_add_(0, bag_of_id, vals)


# -- the cases -------------------------------------------------------------------------


@dataclass
class Row:
    case: str
    dim: int
    peer: str
    seconds: float | None
    bytes_moved: int
    ok: str

    def share(self, bw: float) -> float | None:
        return None if not self.seconds else self.bytes_moved / self.seconds / bw


def _compiled(fn: Callable, device: str) -> Callable:
    """torch.compile of a peer (its eager backend on the CPU); past the budget, a skip."""
    if time.monotonic() - START > BUDGET[0]:
        def skipped(*_a: Any) -> None:
            raise Unavailable("skipped: past --budget (compiling takes minutes)")

        return skipped
    backend = "inductor" if device == "cuda" else "eager"
    return torch.compile(fn, backend=backend, dynamic=False)


class Unavailable(Exception):
    """A peer that does not run in this invocation."""


def update_case(case: str, shape: Shape, dim: int, device: str, runs: int) -> list[Row]:
    """One update case at one dim: every peer, checked, timed."""
    import ekko

    ids = zipf_ids(shape.n_ids, shape.rows, seed=dim, device=device)
    grads = torch.randn(shape.n_ids, dim, device=device)
    u = int(torch.unique(ids).numel())
    torch.manual_seed(0)
    w0 = torch.randn(shape.rows, dim, device=device) * 0.1
    rowwise = case == "rowwise_adagrad_int8"
    row_bytes = (8 + dim * 4 * 2 + (4 * 2 + (dim + 8) + 8 if rowwise else dim * 4 * 4))
    moved = shape.n_ids * (8 + dim * 4) + u * row_bytes
    if rowwise:
        kernel = ekko.update_kernel("rowwise_adagrad", dim, serving="int8", lr=LR, eps=EPS,
                                    target="triton")
    else:
        kernel = ekko.update_kernel("adam", dim, lr=LR, betas=BETAS, eps=EPS, target="triton")

    def buffers() -> dict:
        b = {"w": w0.clone(), "versions": torch.zeros(shape.rows, dtype=torch.int64, device=device)}
        if rowwise:
            b["m"] = torch.zeros(shape.rows, device=device)
            b["q"] = torch.zeros(shape.rows, dim + 8, dtype=torch.uint8, device=device)
        else:
            b["m"] = torch.zeros(shape.rows, dim, device=device)
            b["v"] = torch.zeros(shape.rows, dim, device=device)
        return b

    def ekko_call(b: dict) -> None:
        if rowwise:
            kernel(b["w"], ids, grads, state=b["m"], serving=b["q"], versions=b["versions"],
                   version=1)
        else:
            kernel(b["w"], ids, grads, state=(b["m"], b["v"]), versions=b["versions"], step=1)

    def torch_call(fn: Callable) -> Callable[[dict], None]:
        if rowwise:
            return lambda b: fn(b["w"], b["m"], b["q"], b["versions"], ids, grads, 1)
        return lambda b: fn(b["w"], b["m"], b["v"], ids, grads, 1)

    base = torch_rowwise_int8 if rowwise else torch_adam
    peers = {"ekko triton": ekko_call, "torch eager": torch_call(base),
             "torch.compile": torch_call(_compiled(base, device))}
    sample = torch.unique(ids)[:: max(1, u // 512)]
    want = None
    rows = []
    for name, call in peers.items():
        b = buffers()
        try:
            call(b)
            sync(device)
        except Unavailable as e:
            rows.append(Row(case, dim, name, None, moved, str(e)))
            continue
        except Exception as e:  # a peer that cannot run here is reported, not fatal
            rows.append(Row(case, dim, name, None, moved, f"failed: {type(e).__name__}: {e}"[:80]))
            continue
        got = b["w"][sample].float().cpu()
        if want is None:
            want, ok = got, "ok"
        else:
            ok = "ok" if torch.allclose(got, want, rtol=1e-4, atol=1e-5) else "MISMATCH"
        rows.append(Row(case, dim, name, timed(lambda: call(b), runs, device), moved, ok))
        del b
    return rows


def lookup_case(layout: str, shape: Shape, dim: int, device: str, runs: int) -> list[Row]:
    """Pooled sum lookups: ekko's Triton bag against F.embedding_bag and torch.compile."""
    import ekko
    from ekko.kernels import quant

    nids = shape.bags * shape.pooling
    ids = zipf_ids(nids, shape.rows, seed=7 + dim, device=device)
    offsets = torch.arange(0, nids, shape.pooling, device=device)
    w = torch.randn(shape.rows, dim, device=device)
    if layout == "int8":
        table = torch.from_numpy(quant.quantize_rows(w.cpu().numpy(), "int8")).to(device)
        bag_of_id = torch.arange(nids, device=device) // shape.pooling
        base = torch_bag_int8

        def torch_call(fn):
            return lambda: fn(table, ids, bag_of_id, shape.bags)
    else:
        table = w
        base = torch_bag

        def torch_call(fn):
            return lambda: fn(table, ids, offsets)
    row_bytes = dim + 8 if layout == "int8" else dim * 4
    moved = nids * (8 + row_bytes) + shape.bags * dim * 4
    kernel = ekko.bag_kernel(dim, layout, "i64", "sum", target="triton")
    peers = {"ekko triton": lambda: kernel(table, ids, offsets),
             "torch eager": torch_call(base), "torch.compile": torch_call(_compiled(base, device))}
    rows, want = [], None
    for name, call in peers.items():
        try:
            got = call()
            sync(device)
        except Unavailable as e:
            rows.append(Row(f"bag_sum_{layout}", dim, name, None, moved, str(e)))
            continue
        except Exception as e:
            rows.append(Row(f"bag_sum_{layout}", dim, name, None, moved,
                            f"failed: {type(e).__name__}: {e}"[:80]))
            continue
        if want is None:
            want, ok = got, "ok"
        else:
            ok = "ok" if torch.allclose(got, want, rtol=1e-4, atol=1e-3) else "MISMATCH"
        rows.append(Row(f"bag_sum_{layout}", dim, name, timed(call, runs, device), moved, ok))
    return rows


# -- report ----------------------------------------------------------------------------


def report(rows: list[Row], bw: float) -> str:
    """The table: time, GB/s, share of copy bandwidth, speedup over torch eager."""
    eager = {(r.case, r.dim): r.seconds for r in rows if r.peer == "torch eager"}
    lines = [f"device copy bandwidth: {bw / 1e9:.1f} GB/s (read + write, this run)",
             f"{'case':<22}{'dim':>5}  {'peer':<15}{'ms':>10}{'GB/s':>9}{'of copy':>9}"
             f"{'vs eager':>10}  check"]
    for r in rows:
        if r.seconds is None:
            lines.append(f"{r.case:<22}{r.dim:>5}  {r.peer:<15}{'-':>10}{'-':>9}{'-':>9}{'-':>10}"
                         f"  {r.ok}")
            continue
        base = eager.get((r.case, r.dim))
        speed = f"{base / r.seconds:.2f}x" if base else "-"
        lines.append(f"{r.case:<22}{r.dim:>5}  {r.peer:<15}{r.seconds * 1e3:>10.3f}"
                     f"{r.bytes_moved / r.seconds / 1e9:>9.1f}{r.share(bw):>9.1%}{speed:>10}"
                     f"  {r.ok}")
    return "\n".join(lines)


def plot(rows: list[Row], bw: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r.case, r.dim) for r in rows})
    peers = list(dict.fromkeys(r.peer for r in rows))
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(peers)
    for k, peer in enumerate(peers):
        vals = [next((r.share(bw) or 0.0 for r in rows if (r.case, r.dim) == c and r.peer == peer),
                     0.0) for c in cases]
        ax.bar([i + k * width for i in range(len(cases))], vals, width, label=peer)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))],
                  [f"{c}\ndim {d}" for c, d in cases], fontsize=8)
    ax.set_ylabel("share of copy bandwidth")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, writes nothing")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--budget", type=float, default=float("inf"),
                   help="seconds after which torch.compile peers are skipped")
    args = p.parse_args(argv)
    BUDGET[0] = args.budget
    device = pick_device(args.quick)
    shape = QUICK if args.quick else FULL
    runs = 1 if args.quick else max(1, args.runs)
    bw = copy_bandwidth(device, 1 << 20 if args.quick else 1 << 30)
    rows: list[Row] = []
    for dim in shape.dims:
        for case in ("rowwise_adagrad_int8", "adam"):
            rows += update_case(case, shape, dim, device, runs)
            if device == "cuda":
                torch.cuda.empty_cache()
        for layout in ("f32", "int8"):
            rows += lookup_case(layout, shape, dim, device, runs)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    print(f"{name}, torch {torch.__version__}")
    print(report(rows, bw))
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "gpu.json").write_text(json.dumps(
            {"device": name, "copy_bandwidth": bw, "rows": [r.__dict__ for r in rows]}, indent=2))
        plot(rows, bw, RESULTS / "gpu.png")
        print(f"wrote {RESULTS / 'gpu.json'} and {RESULTS / 'gpu.png'}")
    bad = [r for r in rows if r.ok == "MISMATCH"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
