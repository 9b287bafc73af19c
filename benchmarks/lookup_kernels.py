"""Pooled serving lookups: ekko's compiled bag kernels against the peers.

Workload (what a ranking model's serving tier does per request batch): one
1,000,000-row table (dims 64 and 128), 2048 bags of 20 ids each, ids drawn
from Zipf(1.05) folded into the table and scattered by a fixed permutation
(hot ids are not neighbours), pooled by sum, f32 output.

Peers, same process, same ids:
  torch   F.embedding_bag on the f32 table (torch's CPU kernel, its threads)
  ekko    bag_kernel(layout=f32/f16/int8/int4), default partitions
  fbgemm  IntNBitTableBatchedEmbeddingBagsCodegen, FBGEMM's CPU inference TBE
          (FP32/FP16/INT8/INT4, its own row layout), when fbgemm_gpu imports

Each peer's output is checked against F.embedding_bag on that peer's own
dequantized rows before it is timed; a wrong peer is reported, not timed.
Reported: median ms over the runs, lookups/s, and the speedup of each ekko
layout over torch f32 and over FBGEMM at the same precision.

    python benchmarks/lookup_kernels.py [--quick] [--dims 64,128] [--runs 30] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ekko.kernels.build import bag_kernel
from ekko.kernels.quant import dequantize_rows, quantize_rows

ROWS = 1_000_000
BAGS = 2048
POOLING = 20
RESULTS = Path(__file__).resolve().parent / "results"
EKKO_LAYOUTS = ("f32", "f16", "int8", "int4")
FBGEMM_TYPES = {"f32": "FP32", "f16": "FP16", "int8": "INT8", "int4": "INT4"}


@dataclass
class Result:
    name: str
    layout: str
    ms: float | None
    note: str = ""


def zipf_ids(rng: np.random.Generator, n: int, rows: int) -> np.ndarray:
    """Zipf(1.05) ranks folded into [0, rows) and scattered by a fixed permutation."""
    ranks = (rng.zipf(1.05, n) - 1) % rows
    perm = np.random.default_rng(12345).permutation(rows)
    return perm[ranks].astype(np.int64)


def median_ms(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm caches and lazy state once
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def reference(rows_f32: np.ndarray, ids: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Pooled sums over the touched rows only (remapped), so no full-table dequantization."""
    uniq, inv = np.unique(ids, return_inverse=True)
    w = torch.from_numpy(np.ascontiguousarray(rows_f32(uniq)))
    return F.embedding_bag(torch.from_numpy(inv.astype(np.int64)), w, torch.from_numpy(offsets),
                           mode="sum", include_last_offset=True).numpy()


def check(name: str, got: np.ndarray, want: np.ndarray) -> str:
    """'' when got matches want to f32 summation accuracy, else a reason."""
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    return "" if err <= 1e-5 * scale * POOLING else f"{name}: max error {err:.3g} > tolerance"


def run_torch(table: np.ndarray, ids: np.ndarray, offsets: np.ndarray, runs: int) -> Result:
    w, i, o = torch.from_numpy(table), torch.from_numpy(ids), torch.from_numpy(offsets)
    call = lambda: F.embedding_bag(i, w, o, mode="sum", include_last_offset=True)  # noqa: E731
    bad = check("torch", call().numpy(), reference(lambda u: table[u], ids, offsets))
    return Result("torch F.embedding_bag", "f32", None if bad else median_ms(call, runs), bad)


def run_ekko(table: np.ndarray, layout: str, ids: np.ndarray, offsets: np.ndarray, runs: int) -> Result:
    dim = table.shape[1]
    q = quantize_rows(table, layout)
    kernel = bag_kernel(dim, layout, "i64", "sum")
    out = np.empty((BAGS, dim), np.float32)
    call = lambda: kernel(q, ids, offsets, out=out)  # noqa: E731
    want = reference(lambda u: dequantize_rows(q[u], layout, dim), ids, offsets)
    bad = check(f"ekko {layout}", call(), want)
    note = f"{kernel.spec.partitions} threads, {kernel._partitions(len(ids), BAGS)} partitions"
    return Result("ekko bag_kernel", layout, None if bad else median_ms(call, runs), bad or note)


def _fbgemm_rows(tbe, weight_ty: str, dim: int) -> Callable[[np.ndarray], np.ndarray]:
    """Dequantize FBGEMM TBE rows (scale/bias as fp16 at the start of each row)."""
    weights, scale_shift = tbe.split_embedding_weights()[0]

    def rows(u: np.ndarray) -> np.ndarray:
        w = weights[torch.from_numpy(u)].numpy()
        if weight_ty == "FP32":
            return w[:, :4 * dim].copy().view(np.float32)
        if weight_ty == "FP16":
            return w[:, :2 * dim].copy().view(np.float16).astype(np.float32)
        ss = scale_shift[torch.from_numpy(u)].numpy().copy().view(np.float16).astype(np.float32)
        if weight_ty == "INT8":
            codes = w[:, :dim]
        else:
            codes = np.empty((len(u), 2 * w.shape[1]), np.uint8)
            codes[:, 0::2], codes[:, 1::2] = w & 0xF, w >> 4
            codes = codes[:, :dim]
        return (codes * ss[:, :1] + ss[:, 1:2]).astype(np.float32)

    return rows


def run_fbgemm(table: np.ndarray, layout: str, ids: np.ndarray, offsets: np.ndarray,
               runs: int) -> Result:
    name = "FBGEMM IntNBit TBE"
    ty = FBGEMM_TYPES[layout]
    try:
        import fbgemm_gpu  # noqa: F401
        from fbgemm_gpu.split_embedding_configs import SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
            IntNBitTableBatchedEmbeddingBagsCodegen,
        )
    except Exception as exc:  # optional peer
        return Result(name, layout, None, f"unavailable: {type(exc).__name__}")
    dim = table.shape[1]
    try:
        tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
            [("t", ROWS, dim, getattr(SparseType, ty), EmbeddingLocation.HOST)],
            device="cpu", pooling_mode=PoolingMode.SUM, output_dtype=SparseType.FP32)
        tbe.fill_random_weights()
        if ty in ("FP32", "FP16"):  # random bytes are NaNs as floats: load the real table
            raw = table if ty == "FP32" else table.astype(np.float16)
            weights = tbe.split_embedding_weights()[0][0]
            weights[:, :raw.shape[1] * raw.itemsize].copy_(torch.from_numpy(raw.view(np.uint8)))
    except Exception as exc:
        return Result(name, layout, None, f"{ty} failed: {type(exc).__name__}: {exc}"[:120])
    i, o = torch.from_numpy(ids.astype(np.int32)), torch.from_numpy(offsets.astype(np.int32))
    call = lambda: tbe(i, o)  # noqa: E731
    bad = check(f"fbgemm {ty}", call().float().numpy(), reference(_fbgemm_rows(tbe, ty, dim), ids, offsets))
    result = Result(name, layout, None if bad else median_ms(call, runs), bad or ty)
    del tbe
    return result


def bench_dim(dim: int, runs: int, rng: np.random.Generator) -> list[Result]:
    table = rng.standard_normal((ROWS, dim), dtype=np.float32)
    ids = zipf_ids(rng, BAGS * POOLING, ROWS)
    offsets = np.arange(0, BAGS * POOLING + 1, POOLING, dtype=np.int64)
    results = [run_torch(table, ids, offsets, runs)]
    for layout in EKKO_LAYOUTS:
        results.append(run_ekko(table, layout, ids, offsets, runs))
    for layout in EKKO_LAYOUTS:
        results.append(run_fbgemm(table, layout, ids, offsets, runs))
    return results


def _ratio(a: float | None, b: float | None) -> str:
    return f"{b / a:.2f}x" if a and b else "-"


def table_md(dim: int, results: list[Result]) -> str:
    torch_ms = results[0].ms
    fb = {r.layout: r.ms for r in results if r.name.startswith("FBGEMM")}
    lines = [f"### dim {dim}: {ROWS:,} rows, {BAGS} bags x {POOLING} Zipf(1.05) ids, sum pooling",
             "", "| kernel | layout | median ms | Mlookups/s | speedup vs torch f32 | "
             "speedup vs FBGEMM same precision | note |", "|---|---|---:|---:|---:|---:|---|"]
    for r in results:
        ms = f"{r.ms:.3f}" if r.ms else "-"
        rate = f"{BAGS * POOLING / r.ms / 1e3:.1f}" if r.ms else "-"
        vs_fb = _ratio(r.ms, fb.get(r.layout)) if r.name.startswith("ekko") else "-"
        lines.append(f"| {r.name} | {r.layout} | {ms} | {rate} | {_ratio(r.ms, torch_ms)} | "
                     f"{vs_fb} | {r.note} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="dim 64 only, 5 runs; writes nothing unless --out is given")
    parser.add_argument("--dims", default="64,128")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default benchmarks/results; --quick writes nothing "
                             "unless given)")
    return parser.parse_args(argv)


def output_folder(args: argparse.Namespace) -> Path | None:
    """Where results go: --out, else benchmarks/results; --quick alone writes nothing."""
    return args.out if args.out is not None else (None if args.quick else RESULTS)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dims = [64] if args.quick else [int(d) for d in args.dims.split(",")]
    runs = 5 if args.quick else args.runs
    rng = np.random.default_rng(0)
    header = (f"## Pooled lookups (ekko vs peers)\n\ntorch {torch.__version__}, "
              f"{torch.get_num_threads()} torch threads, median of {runs} runs, "
              f"`python benchmarks/lookup_kernels.py{' --quick' if args.quick else ''}`\n\n")
    parts = [header]
    failed = False
    for dim in dims:
        results = bench_dim(dim, runs, rng)
        failed |= any(r.ms is None and "unavailable" not in r.note and "failed" not in r.note
                      for r in results)
        parts.append(table_md(dim, results))
        print(parts[-1], flush=True)
    out = output_folder(args)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "lookup_kernels.md").write_text("\n".join(parts))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
