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
  C loop  benchmarks/c_bag.c's int8 bag sum: the simplest fast hand-written
          loop (gcc -O3 -march=native, OpenMP, no id checks), built with the
          system C compiler when there is one
  floor   c_bag.c's c_touch_lines on the f32 and the int8 rows: one byte of
          every line of every looked-up row read, no arithmetic. Not a
          lookup: the time the rows alone take to reach the cores, the
          floor under any kernel on that layout, against which the int8
          target (2x torch f32) can be judged

Each peer's output is checked against F.embedding_bag on that peer's own
dequantized rows before it is timed; a wrong peer is reported, not timed.
The checked lookup peers are then timed in turn, three rounds (--quick:
one) of a median over the runs each (`time_in_rounds`).
Reported: median ms (the median round), lookups/s, the speedup of each ekko
layout over torch f32 and over FBGEMM at the same precision, and the bytes
moved (`lookup_bytes`), GB/s and % of the copy bandwidth measured in the same
run (np.copyto, best of before and after). Every call looks up the same bags,
so after the first the distinct rows sit in the last-level cache: the lookup
GB/s can pass the copy bandwidth.

Replica sync (the engine's pack and merge, `ekko.kernels.sync`): 500,000
sorted distinct uniform ids out of a 4,000,000-row serving copy (f32 and
int8 rows; --quick: 10x fewer), far beyond the cache.
  pack   ekko pack_kernel against numpy np.take and torch index_select (out=),
         gathering the rows and versions of the ids (`pack_bytes`).
  merge  ekko merge_kernel against numpy and torch doing the same checks (ids
         in range, versions <= newest, finite f32 rows or int8 scale/bias),
         then newest-version-wins writes of rows and versions (`merge_bytes`).
         Each timed merge carries a version newer than the last, so every
         run writes every row.
One summary line per dim states int8 lookups against F.embedding_bag f32 and
FBGEMM's INT8 TBE (with the C loop and the int8 floor as torch multiples),
and pack and merge against the copy bandwidth: the targets of issue 20.

    python benchmarks/lookup_kernels.py [--quick] [--dims 64,128] [--runs 30] [--out DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ekko.kernels.build import bag_kernel
from ekko.kernels.quant import dequantize_rows, quantize_rows
from ekko.kernels.sync import merge_kernel, pack_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import add_out, roofline, save_figure, write_results  # noqa: E402
from update_kernels import (TARGETS, Unavailable, build_c, copy_bandwidth,  # noqa: E402
                            dim_list, pct_text, positive_int, settle, verdict)  # written once

ROWS = 1_000_000
BAGS = 2048
POOLING = 20
EKKO_LAYOUTS = ("f32", "f16", "int8", "int4")
FBGEMM_TYPES = {"f32": "FP32", "f16": "FP16", "int8": "INT8", "int4": "INT4"}
SYNC_ROWS, SYNC_IDS = 4_000_000, 500_000
SYNC_LAYOUTS = ("f32", "int8")
WARMUP_S = 0.5
ROUNDS = 3  # lookup peers timed in turn this many times (--quick: 1)
LOOKUP_TARGETS = {"vs_torch_f32": 2.0, "vs_fbgemm": 1.0}  # issue 20: int8 pooled lookups


@dataclass
class Result:
    name: str
    layout: str
    ms: float | None
    note: str = ""
    nbytes: int = 0  # what the call must move (lookup_bytes, pack_bytes, merge_bytes)
    op: str = "lookup"
    call: Callable[[], object] | None = field(default=None, repr=False)  # checked, to be timed

    @property
    def gbs(self) -> float | None:
        return self.nbytes / self.ms / 1e6 if self.ms else None


def lookup_bytes(row_bytes: int, ids: np.ndarray, bags: int, dim: int, index_bytes: int = 8) -> int:
    """ids and offsets read once, each distinct looked-up row read once, the f32 output written once."""
    return (len(ids) + bags + 1) * index_bytes + len(np.unique(ids)) * row_bytes + bags * dim * 4


def pack_bytes(row_bytes: int, n: int) -> int:
    """ids read; each packed row and its version read from the serving copy and written to the packet."""
    return n * (8 + 2 * (row_bytes + 8))


def merge_bytes(row_bytes: int, n: int) -> int:
    """ids, packet rows and versions read; replica versions read and written; serving rows written."""
    return n * (8 + row_bytes + 8 + 2 * 8 + row_bytes)


def zipf_ids(rng: np.random.Generator, n: int, rows: int) -> np.ndarray:
    """Zipf(1.05) ranks folded into [0, rows) and scattered by a fixed permutation."""
    ranks = (rng.zipf(1.05, n) - 1) % rows
    perm = np.random.default_rng(12345).permutation(rows)
    return perm[ranks].astype(np.int64)


def median_ms(fn: Callable[[], object], runs: int) -> float:
    """Median of `runs` timed calls after WARMUP_S of untimed ones: right after a table was
    allocated, a whole series of calls here ran 40x slower (8 ms, not 0.1) for a moment."""
    settled = time.perf_counter() + WARMUP_S
    fn()  # warm caches and lazy state
    while time.perf_counter() < settled:
        fn()
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


def run_torch(table: np.ndarray, ids: np.ndarray, offsets: np.ndarray) -> Result:
    w, i, o = torch.from_numpy(table), torch.from_numpy(ids), torch.from_numpy(offsets)
    call = lambda: F.embedding_bag(i, w, o, mode="sum", include_last_offset=True)  # noqa: E731
    bad = check("torch", call().numpy(), reference(lambda u: table[u], ids, offsets))
    return Result("torch F.embedding_bag", "f32", None, bad,
                  lookup_bytes(4 * table.shape[1], ids, BAGS, table.shape[1]), call=None if bad else call)


def run_ekko(table: np.ndarray, layout: str, ids: np.ndarray, offsets: np.ndarray) -> Result:
    dim = table.shape[1]
    q = quantize_rows(table, layout)
    kernel = bag_kernel(dim, layout, "i64", "sum")
    out = np.empty((BAGS, dim), np.float32)
    call = lambda: kernel(q, ids, offsets, out=out)  # noqa: E731
    want = reference(lambda u: dequantize_rows(q[u], layout, dim), ids, offsets)
    bad = check(f"ekko {layout}", call(), want)
    note = f"{kernel.spec.partitions} threads, {kernel._partitions(len(ids), BAGS)} partitions"
    return Result("ekko bag_kernel", layout, None, bad or note,
                  lookup_bytes(q.shape[1] * q.itemsize, ids, BAGS, dim), call=None if bad else call)


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


def run_fbgemm(table: np.ndarray, layout: str, ids: np.ndarray, offsets: np.ndarray) -> Result:
    name = "FBGEMM IntNBit TBE"
    ty = FBGEMM_TYPES[layout]
    try:
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
    row_bytes = tbe.split_embedding_weights()[0][0].shape[1]  # FBGEMM's own padded row
    return Result(name, layout, None, bad or ty, lookup_bytes(row_bytes, ids, BAGS, dim, index_bytes=4),
                  call=None if bad else call)  # the call keeps tbe (its table) alive until timed


@functools.lru_cache(maxsize=None)
def _c_bag_library(dim: int):
    """benchmarks/c_bag.c built for int8 rows of `dim` codes (OpenMP threads)."""
    lib = build_c("c_bag.c", {"DIM": dim}, ("-fopenmp",))
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.c_bag_int8.argtypes = [ptr, ptr, ptr, i64, ptr, ctypes.c_int]
    lib.c_bag_int8.restype = ctypes.c_int
    lib.c_touch_lines.argtypes = [ptr, i64, ptr, i64, ctypes.c_int]
    lib.c_touch_lines.restype = ctypes.c_int64
    return lib


def run_c_bag(table: np.ndarray, ids: np.ndarray, offsets: np.ndarray) -> Result:
    """c_bag.c's int8 bag sum: hand-written C on the same rows, ids and threads as torch."""
    name, dim = "C loop", table.shape[1]
    try:
        lib = _c_bag_library(dim)
    except Unavailable as e:
        return Result(name, "int8", None, f"unavailable: {e}")
    q = quantize_rows(table, "int8")
    out = np.empty((len(offsets) - 1, dim), np.float32)

    def call() -> np.ndarray:
        if lib.c_bag_int8(q.ctypes.data, ids.ctypes.data, offsets.ctypes.data, len(offsets) - 1,
                          out.ctypes.data, torch.get_num_threads()) != 0:
            raise RuntimeError("c_bag_int8 refused its arguments")
        return out

    bad = check("C loop", call(), reference(lambda u: dequantize_rows(q[u], "int8", dim), ids, offsets))
    return Result(name, "int8", None, bad or "hand-written, gcc -O3 + OpenMP; no id checks",
                  lookup_bytes(q.shape[1], ids, BAGS, dim), call=None if bad else call)


def lines_touched(rows: np.ndarray, ids: np.ndarray) -> int:
    """What c_touch_lines returns: one byte of each 64-byte step of each row, and its last."""
    picked = rows[ids]
    return int(picked[:, ::64].sum(dtype=np.int64) + picked[:, -1].sum(dtype=np.int64))


def run_floor(table: np.ndarray, layout: str, ids: np.ndarray) -> Result:
    """c_touch_lines over the rows in `layout` (f32: torch's, int8: ekko's): the time the
    rows' lines alone take to reach the cores, the floor under any lookup of them."""
    name, dim = "floor (C)", table.shape[1]
    try:
        lib = _c_bag_library(dim)
    except Unavailable as e:
        return Result(name, layout, None, f"unavailable: {e}")
    rows = (table if layout == "f32" else quantize_rows(table, layout)).view(np.uint8)
    call = lambda: lib.c_touch_lines(rows.ctypes.data, rows.shape[1], ids.ctypes.data,  # noqa: E731
                                     len(ids), torch.get_num_threads())
    got, want = call(), lines_touched(rows, ids)
    bad = "" if got == want else f"floor: read {got}, the rows hold {want}"
    return Result(name, layout, None, bad or "each row's lines read, no arithmetic: not a lookup",
                  lookup_bytes(rows.shape[1], ids, BAGS, dim), call=None if bad else call)


def time_in_rounds(results: list[Result], runs: int, rounds: int) -> None:
    """Time every checked peer: `median_ms` over `runs` calls, the peers in turn, `rounds`
    times; a peer's time is its median round. A slow or fast minute of a shared machine
    then falls on every peer alike instead of on whichever ran in it."""
    timed = [r for r in results if r.call is not None]
    per_round: dict[int, list[float]] = {id(r): [] for r in timed}
    for _ in range(rounds):
        for r in timed:
            per_round[id(r)].append(median_ms(r.call, runs))
    for r in timed:
        r.ms, r.call = statistics.median(per_round[id(r)]), None  # the peer's tables can go


def bench_dim(dim: int, runs: int, rng: np.random.Generator, rounds: int = ROUNDS) -> list[Result]:
    table = rng.standard_normal((ROWS, dim), dtype=np.float32)
    ids = zipf_ids(rng, BAGS * POOLING, ROWS)
    offsets = np.arange(0, BAGS * POOLING + 1, POOLING, dtype=np.int64)
    results = [run_torch(table, ids, offsets)]
    results += [run_ekko(table, layout, ids, offsets) for layout in EKKO_LAYOUTS]
    results += [run_fbgemm(table, layout, ids, offsets) for layout in EKKO_LAYOUTS]
    results.append(run_c_bag(table, ids, offsets))
    results += [run_floor(table, layout, ids) for layout in ("f32", "int8")]
    time_in_rounds(results, runs, rounds)
    return results


# --------------------------------------------------------------------------
# replica sync: pack and merge


def _best_ms(calls: list[Callable[[], object]]) -> float:
    """Median ms of the timed calls (each call one run)."""
    times = []
    for call in calls:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _pack_peers(serving: np.ndarray, versions: np.ndarray, ids: np.ndarray, dim: int,
                layout: str) -> dict[str, Callable[[np.ndarray, np.ndarray], object]]:
    """Each peer gathers the rows and versions of `ids` into the given outputs."""
    k = pack_kernel(dim, layout)
    s_t, v_t, i_t = torch.from_numpy(serving), torch.from_numpy(versions), torch.from_numpy(ids)

    def torch_pack(rows: np.ndarray, vers: np.ndarray) -> None:
        torch.index_select(s_t, 0, i_t, out=torch.from_numpy(rows))
        torch.index_select(v_t, 0, i_t, out=torch.from_numpy(vers))

    return {"ekko pack_kernel": lambda rows, vers: k(serving, versions, ids, out_rows=rows, out_versions=vers),
            "numpy np.take": lambda rows, vers: (np.take(serving, ids, axis=0, out=rows),
                                                  np.take(versions, ids, out=vers)),
            "torch index_select": torch_pack}


def run_pack(serving: np.ndarray, versions: np.ndarray, ids: np.ndarray, dim: int, layout: str,
             runs: int) -> list[Result]:
    out = []
    rb = serving.shape[1] * serving.itemsize
    rows, vers = np.empty((len(ids), serving.shape[1]), serving.dtype), np.empty(len(ids), np.int64)
    for name, fn in _pack_peers(serving, versions, ids, dim, layout).items():
        rows.fill(0)
        fn(rows, vers)
        ok = rows.tobytes() == serving[ids].tobytes() and np.array_equal(vers, versions[ids])
        settle()
        ms = _best_ms([lambda: fn(rows, vers)] * runs) if ok else None
        out.append(Result(name, layout, ms, "" if ok else f"{name}: packet differs from serving[ids]",
                          pack_bytes(rb, len(ids)), "pack"))
    return out


def _merge_peers(serving: np.ndarray, versions: np.ndarray, ids: np.ndarray, prow: np.ndarray,
                 pver: np.ndarray, dim: int, layout: str) -> dict[str, Callable[[int], object]]:
    """Each peer merges (ids, prow, pver) into (serving, versions), newest version wins."""
    k = merge_kernel(dim, layout)
    n_rows = len(versions)

    def floats(rows):  # what must be finite: f32 rows, or the int8 rows' scale and bias
        return rows if layout == "f32" else rows[:, dim:dim + 8].view(np.float32)

    def np_merge(newest: int) -> None:
        if ids.min() < 0 or ids.max() >= n_rows or pver.min() < 0 or pver.max() > newest:
            raise ValueError("bad packet")
        if not np.isfinite(floats(prow)).all():
            raise ValueError("non-finite packet row")
        newer = pver > versions[ids]
        sel = ids[newer]
        serving[sel] = prow[newer]
        versions[sel] = pver[newer]

    s_t, v_t, i_t = torch.from_numpy(serving), torch.from_numpy(versions), torch.from_numpy(ids)
    r_t, pv_t, f_t = torch.from_numpy(prow), torch.from_numpy(pver), torch.from_numpy(floats(prow))

    def torch_merge(newest: int) -> None:
        if bool(i_t.min() < 0) or bool(i_t.max() >= n_rows) or bool(pv_t.min() < 0) or bool(pv_t.max() > newest):
            raise ValueError("bad packet")
        if not bool(torch.isfinite(f_t).all()):
            raise ValueError("non-finite packet row")
        newer = pv_t > v_t.index_select(0, i_t)
        sel = i_t[newer]
        s_t.index_copy_(0, sel, r_t[newer])
        v_t.index_copy_(0, sel, pv_t[newer])

    return {"ekko merge_kernel": lambda newest: k(serving, versions, ids, prow, pver, newest=newest),
            "numpy": np_merge, "torch index_copy_": torch_merge}


def run_merge(serving: np.ndarray, ids: np.ndarray, prow: np.ndarray, dim: int, layout: str,
              runs: int) -> list[Result]:
    out = []
    rb = serving.shape[1] * serving.itemsize
    versions, pver = np.zeros(len(serving), np.int64), np.empty(len(ids), np.int64)
    for name, fn in _merge_peers(serving, versions, ids, prow, pver, dim, layout).items():
        versions.fill(0)
        pver.fill(1)
        fn(1)
        ok = serving[ids].tobytes() == prow.tobytes() and bool((versions[ids] == 1).all())

        def run(v: int) -> Callable[[], object]:
            def call():
                fn(v)
            return call

        times = []
        settle()
        for v in range(2, runs + 2) if ok else ():
            pver.fill(v)  # untimed: each merge is newer than the last, so it writes every row
            times.append(_best_ms([run(v)]))
        ms = statistics.median(times) if times else None
        out.append(Result(name, layout, ms, "" if ok else f"{name}: merged rows differ from the packet",
                          merge_bytes(rb, len(ids)), "merge"))
    return out


def bench_sync(dim: int, rows: int, n: int, runs: int, rng: np.random.Generator) -> list[Result]:
    """Pack and merge of `n` sorted distinct ids out of a `rows`-row serving copy, per layout."""
    table = rng.standard_normal((rows, dim), dtype=np.float32)
    ids = np.sort(rng.choice(rows, n, replace=False)).astype(np.int64)
    results = []
    for layout in SYNC_LAYOUTS:
        serving = table if layout == "f32" else quantize_rows(table, layout)
        versions = rng.integers(0, 100, rows).astype(np.int64)
        results += run_pack(serving, versions, ids, dim, layout, runs)
        prow = quantize_rows(rng.standard_normal((n, dim), dtype=np.float32), layout)
        results += run_merge(serving, ids, prow, dim, layout, runs)
        del serving
    return results


# --------------------------------------------------------------------------
# reporting


def _ratio(a: float | None, b: float | None) -> str:
    return f"{b / a:.2f}x" if a and b else "-"


def _bw_cols(r: Result, bw: float) -> str:
    """MB moved | GB/s | % of copy bandwidth."""
    if not r.ms:
        return f"{r.nbytes / 1e6:.2f} | - | -"
    return f"{r.nbytes / 1e6:.2f} | {r.gbs:.3g} | {pct_text(100 * r.gbs / bw)}"


def table_md(dim: int, results: list[Result], bw: float) -> str:
    results = [r for r in results if r.op == "lookup"]
    torch_ms = results[0].ms
    fb = {r.layout: r.ms for r in results if r.name.startswith("FBGEMM")}
    lines = [f"### dim {dim}: {ROWS:,} rows, {BAGS} bags x {POOLING} Zipf(1.05) ids, sum pooling",
             "", "| kernel | layout | median ms | Mlookups/s | MB moved | GB/s | % of copy bw | "
             "speedup vs torch f32 | speedup vs FBGEMM same precision | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        ms = f"{r.ms:.3f}" if r.ms else "-"
        rate = f"{BAGS * POOLING / r.ms / 1e3:.1f}" if r.ms else "-"
        vs_fb = _ratio(r.ms, fb.get(r.layout)) if r.name.startswith("ekko") else "-"
        lines.append(f"| {r.name} | {r.layout} | {ms} | {rate} | {_bw_cols(r, bw)} | "
                     f"{_ratio(r.ms, torch_ms)} | {vs_fb} | {r.note} |")
    return "\n".join(lines) + "\n"


def sync_md(dim: int, rows: int, n: int, results: list[Result], bw: float) -> str:
    lines = [f"### dim {dim}: pack and merge of {n:,} sorted distinct ids out of {rows:,} serving rows",
             "", "| op | peer | layout | median ms | M rows/s | MB moved | GB/s | % of copy bw | "
             "ekko speedup | note |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        if r.op == "lookup":
            continue
        ek = next((e.ms for e in results if e.op == r.op and e.layout == r.layout
                   and e.name.startswith("ekko")), None)
        ms = f"{r.ms:.2f}" if r.ms else "-"
        rate = f"{n / r.ms / 1e3:.1f}" if r.ms else "-"
        lines.append(f"| {r.op} | {r.name} | {r.layout} | {ms} | {rate} | {_bw_cols(r, bw)} | "
                     f"{_ratio(ek, r.ms)} | {r.note} |")
    return "\n".join(lines) + "\n"


def bound_text(r: Result | None, torch_f32: Result | None, what: str) -> str:
    """How a C peer's time compares with torch's: what the int8 target can be judged against."""
    if r is None or not r.ms or torch_f32 is None or not torch_f32.ms:
        return f"{what}: did not run ({r.note if r else 'missing'})"
    return f"{what} {r.ms:.3f} ms, {torch_f32.ms / r.ms:.2f}x torch"


def summary_lines(dim: int, results: list[Result], bw: float) -> list[str]:
    """The issue's targets read off one dim: int8 lookups, pack and merge."""
    def find(op: str, prefix: str, layout: str) -> Result | None:
        return next((r for r in results if r.op == op and r.name.startswith(prefix) and r.layout == layout), None)

    ek, th, fb = find("lookup", "ekko", "int8"), find("lookup", "torch", "f32"), find("lookup", "FBGEMM", "int8")
    if ek is None or not ek.ms:
        out = [f"dim {dim}: ekko int8 lookup did not run ({ek.note if ek else 'missing'})"]
    else:
        parts = [f"dim {dim} int8 pooled lookup: ekko {ek.ms:.3f} ms"]
        parts.append(verdict(th.ms / ek.ms, LOOKUP_TARGETS["vs_torch_f32"], f"{th.ms / ek.ms:.2f}x F.embedding_bag f32")
                     if th and th.ms else "F.embedding_bag did not run")
        parts.append(verdict(fb.ms / ek.ms, LOOKUP_TARGETS["vs_fbgemm"], f"{fb.ms / ek.ms:.2f}x FBGEMM IntNBit INT8 TBE")
                     if fb and fb.ms else f"FBGEMM inference TBE did not run here: {fb.note if fb else 'missing'}")
        parts += [bound_text(find("lookup", prefix, "int8"), th, what)
                  for prefix, what in (("C loop", "hand-written C loop"),
                                       ("floor", "the int8 rows' lines alone (the floor)"))]
        out = ["; ".join(parts)]
    for op in ("pack", "merge"):
        for layout in SYNC_LAYOUTS:
            r = find(op, "ekko", layout)
            if r is None:
                continue
            if not r.ms:
                out.append(f"dim {dim} {op} {layout}: ekko did not run ({r.note})")
                continue
            pct = 100 * r.gbs / bw
            out.append(f"dim {dim} {op} {layout}: ekko {r.ms:.2f} ms, {r.gbs:.1f} GB/s; "
                       + verdict(pct, 100 * TARGETS["copy"], f"{pct:.0f}% of copy bandwidth", "%"))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="dim 64 only, 5 runs, 10x smaller pack/merge; writes nothing unless --out is given")
    parser.add_argument("--dims", type=dim_list, default="64,128")
    parser.add_argument("--runs", type=positive_int, default=30,
                        help="lookup runs (pack and merge: a third)")
    add_out(parser)
    return parser.parse_args(argv)


PEER_STYLE = {"torch": ("s", "tab:orange"), "numpy": ("o", "tab:blue"),
              "FBGEMM": ("P", "tab:gray"), "ekko": ("*", "tab:red"), "C loop": ("x", "black"),
              "floor (C)": ("_", "black")}  # by how the peer's name starts


def figure(by_dim: dict[int, list[Result]], bw: float):
    """Roofline-style, as update_kernels.py draws it: achieved GB/s per (dim, op, layout)
    row and peer (a marker), against the copy line. Lookups repeat their bags, so their
    rows come from the cache and can pass the line; pack and merge cannot."""
    rows = list(dict.fromkeys((dim, r.op, r.layout) for dim, rs in by_dim.items() for r in rs))
    points = {peer: [(r.gbs, rows.index((dim, r.op, r.layout))) for dim, rs in by_dim.items()
                     for r in rs if r.gbs and r.name.startswith(peer)] for peer in PEER_STYLE}
    return roofline([f"dim {d}: {op} {layout}" for d, op, layout in rows],
                    [f"{d} {op}" for d, op, _ in rows], points, PEER_STYLE, bw, TARGETS["copy"],
                    "Pooled lookups, pack and merge: achieved bandwidth against the copy roof")


def plot(by_dim: dict[int, list[Result]], bw: float, path: Path) -> None:
    save_figure(figure(by_dim, bw), path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dims = [64] if args.quick else [int(d) for d in args.dims.split(",")]
    runs = 5 if args.quick else args.runs
    sync_runs = max(3, runs // 3)
    sync_rows, sync_ids = (SYNC_ROWS // 10, SYNC_IDS // 10) if args.quick else (SYNC_ROWS, SYNC_IDS)
    bw_mb = 64 if args.quick else 512
    bw_runs = [copy_bandwidth(bw_mb)]
    rng = np.random.default_rng(0)
    by_dim = {}
    rounds = 1 if args.quick else ROUNDS
    for dim in dims:
        by_dim[dim] = bench_dim(dim, runs, rng, rounds)
        by_dim[dim] += bench_sync(dim, sync_rows, sync_ids, sync_runs, rng)
    bw_runs.append(copy_bandwidth(bw_mb))
    bw = max(bw_runs)
    header = (f"## Pooled lookups and replica sync (ekko vs peers)\n\ntorch {torch.__version__}, "
              f"{torch.get_num_threads()} torch threads, lookups: the median of {rounds} round(s) "
              f"of peers in turn, each a median of {runs} runs (pack and merge: median of "
              f"{sync_runs}), `python benchmarks/lookup_kernels.py{' --quick' if args.quick else ''}`\n\n"
              f"Copy bandwidth (np.copyto {bw_mb} MiB, read+write, best of before and after): "
              f"**{bw:.1f} GB/s** ({', '.join(f'{b:.1f}' for b in bw_runs)}). Bytes moved: lookups "
              "read ids and offsets once, each distinct row once (in the peer's own row layout) and "
              "write the f32 output once; they repeat the same bags, so their rows come from the "
              "cache and their % of copy bandwidth can pass 100%. Pack reads the ids and each row "
              "and version and writes them to the packet; merge reads the ids, packet rows and "
              "versions, reads and writes the replica's versions and writes its rows. FBGEMM's "
              "INT8/INT4 tables hold fill_random_weights() codes (FP32/FP16 load the real table); "
              "every peer is checked against F.embedding_bag on its own dequantized rows first.\n\n")
    summary = ["### Summary: against the targets of issue 20", ""]
    summary += [f"- {line}" for dim in dims for line in summary_lines(dim, by_dim[dim], bw)]
    parts = [header, "\n".join(summary) + "\n"]
    failed = False
    for dim, results in by_dim.items():
        failed |= any(r.ms is None and "unavailable" not in r.note and "failed" not in r.note
                      for r in results)
        parts.append(table_md(dim, results, bw))
        parts.append(sync_md(dim, sync_rows, sync_ids, results, bw))
    text = "\n".join(parts)
    print(text, flush=True)
    write_results(args, "lookup_kernels", text, lambda path: plot(by_dim, bw, path))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
