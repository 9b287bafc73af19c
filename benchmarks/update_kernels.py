"""Fused sparse embedding update: ekko against the ways people do it today.

Each case applies one delta (ids and f32 gradient rows) to an f32 table with
one of three updates:

  rowwise_adagrad_int8: dedup, FBGEMM rowwise Adagrad (momentum per row),
      re-quantize the touched rows into an int8 fused-rowwise serving copy,
      stamp per-row versions.
  rowwise_adagrad: the same optimizer, table and momentum only (the work
      FBGEMM's CPU TBE backward does, so it is compared on equal work).
  sgd: dedup and w -= lr * g, table only.

Cases (`cases()`; `--quick` divides every row and id count by 10):
  main      Zipf(1.05) ids (folded into the table and scattered by a fixed
            permutation, so hot ids are not neighbours), 1M ids into a 4M-row
            table, dims 64 and 128, both rowwise_adagrad_int8 and sgd; every peer.
  uniform   1M uniform ids into 8M x 32 with rowwise_adagrad_int8.
  workload  the issue's two workloads, rowwise_adagrad with no serving copy:
            1M Zipf ids into 4M x 64, and 1M uniform ids into 8M x 32.
  threads   those two workloads again on 1 thread (ekko threads=1, FBGEMM and
            torch through torch.set_num_threads(1)).
  sweep     dims 16, 32, 64, 128, 256 at fixed bytes: a 512 MiB table (rows =
            512 MiB / row bytes, 16x the 32 MiB last-level cache) and 128 MiB
            of gradients (ids = rows / 4), Zipf ids, rowwise_adagrad.
Cases past `main` run torch eager, FBGEMM, the C loop and ekko (numba
prange too on `uniform`); the other peers are rows marked "skipped" so the
default run stays near 10 minutes on 2 cores.

Peers run in the same process on the same data: numpy, torch eager,
torch.compile, numba (serial and prange), FBGEMM's CPU TBE backward (fused
dedup + optimizer; it has no serving copy or versions), the C loop
(benchmarks/c_loop.c, built with the system C compiler: each position
applied alone, in place, with no dedup, journal or finite checks; less work
than an update, so not checked, but a measure of what this machine's memory
gives a simple hand-written loop on the same rows and threads) and ekko.
Each peer first runs once from the pristine state and its sampled rows are
checked against a float64 reference (and against ekko); then it runs `runs`
more times, timed, the table keeps updating (a continuous update stream; the
work per run is the same). Touched rows are restored between peers.
torch eager, FBGEMM, the C loop and ekko, whose times the summary's ratios
are read from, are timed in interleaved rounds, so that a slow or fast
minute of a shared machine falls on all of them alike (each turn: 0.3 s
idle, one untimed run, the timed run); the other peers run their series
one after another.

Every row reports the bytes the peer's update must move (`bytes_moved`), its
GB/s (bytes / median time) and that as a % of the copy bandwidth measured in
the same run (np.copyto, best of the measurements before and after the
cases). One summary line per case states ekko against the issue's targets.

    python benchmarks/update_kernels.py [--quick] [--dims 64,128] [--runs 5]
                                        [--groups main,uniform,...] [--cases sgd,...]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import add_out, roofline, save_figure, write_results  # noqa: E402

LR = 0.01
EPS = 1e-8
KINDS = ("rowwise_adagrad_int8", "rowwise_adagrad", "sgd")
GROUPS = ("main", "uniform", "workload", "threads", "sweep")
SWEEP_DIMS = (16, 32, 64, 128, 256)
SWEEP_TABLE_BYTES = 512 * 2**20  # 16x the 32 MiB last-level cache of the machine measured
SETTLE_S = 0.3  # idle time before each peer's series (see `settle`)
ROUNDS = ("torch eager", "FBGEMM", "C loop", "ekko")  # the summary's peers: timed in turn (`measure_rounds`)
TARGETS = {"fbgemm": 2.5, "fbgemm_less_work": 1.0, "torch": 5.0, "copy": 0.5}  # issue 20


class Unavailable(Exception):
    """A peer that cannot run here (missing package, failed compile): reported, not fatal."""


# --------------------------------------------------------------------------
# workload and buffers


@dataclass
class Workload:
    """One delta and the table shape it applies to."""

    rows: int
    dim: int
    ids: np.ndarray  # int64 (n,)
    grads: np.ndarray  # f32 (n, dim)
    uniq: np.ndarray  # sorted distinct ids

    @property
    def n_ids(self) -> int:
        return len(self.ids)


def make_workload(rows: int, dim: int, n_ids: int, alpha: float = 1.05, seed: int = 0,
                  dist: str = "zipf") -> Workload:
    """Zipf ids folded into [0, rows) and scattered by a fixed permutation, or uniform ids."""
    rng = np.random.default_rng(seed)
    if dist == "uniform":
        ids = rng.integers(0, rows, n_ids, dtype=np.int64)
    else:
        perm = rng.permutation(rows)
        ids = perm[(rng.zipf(alpha, n_ids) - 1) % rows].astype(np.int64)
    grads = rng.standard_normal((n_ids, dim), dtype=np.float32)
    return Workload(rows, dim, ids, grads, np.unique(ids))


def bytes_moved(kind: str, work: Workload) -> int:
    """The bytes an update of `kind` must move, the one rule every column uses.

    The ids (8 B) and gradient rows (4 * dim B) are read once; each distinct
    row of the table (4 * dim B) and of the rowwise state (4 B) is read and
    written once; where the kind has them, each distinct row's serving row
    (dim + 8 B of int8 codes, scale, bias) and version (8 B) are written once.
    Dedup scratch, caches and write-allocate reads are not counted.
    """
    per_row = 2 * 4 * work.dim
    if kind != "sgd":
        per_row += 2 * 4
    if kind == "rowwise_adagrad_int8":
        per_row += (work.dim + 8) + 8
    return work.n_ids * (8 + 4 * work.dim) + len(work.uniq) * per_row


@dataclass(frozen=True)
class Case:
    """One benchmark case: an update kind on a workload shape, at a thread count."""

    group: str
    kind: str
    rows: int
    dim: int
    n_ids: int
    dist: str = "zipf"
    threads: int = 2
    peers: tuple[str, ...] = ()  # empty: every peer

    @property
    def title(self) -> str:
        return (f"{self.kind}, {_count(self.n_ids)} {self.dist} ids into {_count(self.rows)} x "
                f"{self.dim} f32, {self.threads} thread{'s' if self.threads > 1 else ''}")

    @property
    def label(self) -> str:
        """Short form for plot axes."""
        kind = {"rowwise_adagrad_int8": "adagrad+int8", "rowwise_adagrad": "adagrad"}.get(self.kind, self.kind)
        return f"{self.group}: {kind} {self.dist} {_count(self.rows)}x{self.dim} {self.threads}t"

    def runs_peer(self, name: str) -> bool:
        return not self.peers or name in self.peers


def _count(n: int) -> str:
    """1000000 -> '1M', 400000 -> '400k', 5000 -> '5k'."""
    for div, unit in ((1_000_000, "M"), (1000, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def cases(quick: bool = False, dims: tuple[int, ...] | None = None) -> list[Case]:
    """Every case of a run, grouped as in the module docstring; --quick is 10x smaller.

    `dims` are the main cases' (default 64 and 128; 64 alone with --quick).
    """
    s = 10 if quick else 1
    dims = dims or ((64,) if quick else (64, 128))
    lean = ("torch eager", "FBGEMM", "C loop", "ekko")  # the peers, and the C loop's bound
    out = [Case("main", kind, 4_000_000 // s, dim, 1_000_000 // s)
           for dim in dims for kind in ("rowwise_adagrad_int8", "sgd")]
    out.append(Case("uniform", "rowwise_adagrad_int8", 8_000_000 // s, 32, 1_000_000 // s, "uniform",
                    peers=("numba prange",) + lean))
    for threads, group in ((2, "workload"), (1, "threads")):
        out.append(Case(group, "rowwise_adagrad", 4_000_000 // s, 64, 1_000_000 // s, "zipf", threads, lean))
        out.append(Case(group, "rowwise_adagrad", 8_000_000 // s, 32, 1_000_000 // s, "uniform", threads, lean))
    table_bytes = SWEEP_TABLE_BYTES // s // 1024 * 1024  # a whole number of rows at every dim
    for dim in SWEEP_DIMS:
        rows = table_bytes // (4 * dim)
        out.append(Case("sweep", "rowwise_adagrad", rows, dim, rows // 4, peers=lean))
    return out


@dataclass
class Buffers:
    """Everything an update writes: table, state, serving copy, versions."""

    table: np.ndarray
    momentum: np.ndarray | None = None
    serving: np.ndarray | None = None
    versions: np.ndarray | None = None


def allocate(kind: str, rows: int, dim: int, seed: int = 1) -> Buffers:
    """Touched (first-touch paid) buffers for an update kind; the table is random."""
    table = np.random.default_rng(seed).standard_normal((rows, dim), dtype=np.float32)
    if kind == "sgd":
        return Buffers(table)
    if kind == "rowwise_adagrad":
        return Buffers(table, np.zeros(rows, np.float32))
    return Buffers(table, np.zeros(rows, np.float32), np.zeros((rows, dim + 8), np.uint8),
                   np.zeros(rows, np.int64))


@dataclass
class Saved:
    """The touched rows at the start, to restore between peers."""

    uniq: np.ndarray
    table_rows: np.ndarray


def save_rows(bufs: Buffers, work: Workload) -> Saved:
    return Saved(work.uniq, bufs.table[work.uniq].copy())


def restore_rows(bufs: Buffers, saved: Saved) -> None:
    """Put the touched rows back to the start state (momentum 0, serving 0, version 0)."""
    bufs.table[saved.uniq] = saved.table_rows
    for buf in (bufs.momentum, bufs.serving, bufs.versions):
        if buf is not None:
            buf[saved.uniq] = 0


# --------------------------------------------------------------------------
# reference for sampled rows


@dataclass
class Expected:
    """Float64 results for a sample of touched rows."""

    ids: np.ndarray
    table: np.ndarray
    momentum: np.ndarray | None


def sample_ids(work: Workload, n: int = 2000, seed: int = 2) -> np.ndarray:
    """Random distinct touched ids plus the hottest ones (most duplicates), sorted."""
    rng = np.random.default_rng(seed)
    counts = np.bincount(np.searchsorted(work.uniq, work.ids), minlength=len(work.uniq))
    hot = work.uniq[np.argsort(counts)[-20:]]
    pick = rng.choice(work.uniq, min(n, len(work.uniq)), replace=False)
    return np.unique(np.concatenate([pick, hot, work.uniq[[0, -1]]]))


def expected_rows(case: str, work: Workload, saved: Saved, sample: np.ndarray) -> Expected:
    """The update of the sampled rows, from their start values, in float64."""
    mask = np.isin(work.ids, sample)
    slot = np.searchsorted(sample, work.ids[mask])
    g = np.zeros((len(sample), work.dim))
    np.add.at(g, slot, work.grads[mask].astype(np.float64))
    w0 = saved.table_rows[np.searchsorted(saved.uniq, sample)].astype(np.float64)
    if case == "sgd":
        return Expected(sample, w0 - LR * g, None)
    m = (g * g).mean(axis=1)
    return Expected(sample, w0 - LR * g / (np.sqrt(m) + EPS)[:, None], m)


def dequantize_int8(rows: np.ndarray, dim: int) -> np.ndarray:
    """Fused rowwise int8 rows (codes, f32 scale, f32 bias) back to f32."""
    scale = rows[:, dim:dim + 4].copy().view(np.float32)
    bias = rows[:, dim + 4:dim + 8].copy().view(np.float32)
    return rows[:, :dim] * scale + bias


def check_rows(bufs: Buffers, exp: Expected, dim: int) -> float:
    """Max table error on the sample; raises AssertionError on any disagreement."""
    got = bufs.table[exp.ids].astype(np.float64)
    err = np.abs(got - exp.table)
    tol = 2e-4 * (1 + np.abs(exp.table))  # f32 sums of up to ~50k duplicates
    assert (err <= tol).all(), f"table rows differ from the reference by up to {err.max():.3g}"
    if exp.momentum is not None and bufs.momentum is not None:
        m = bufs.momentum[exp.ids]
        assert np.allclose(m, exp.momentum, rtol=2e-4, atol=1e-6), "momentum differs from the reference"
    if bufs.serving is not None:
        deq = dequantize_int8(bufs.serving[exp.ids], dim)
        step = np.ptp(exp.table, axis=1, keepdims=True) / 255
        assert (np.abs(deq - exp.table) <= step * 0.51 + tol).all(), "int8 serving rows are off"
    if bufs.versions is not None:
        assert (bufs.versions[exp.ids] == 1).all(), "versions not stamped"
    return float(err.max())


# --------------------------------------------------------------------------
# peers


@dataclass
class Peer:
    """A way of applying the update; `run(version)` mutates `bufs` in place."""

    name: str
    threads: int
    bufs: Buffers
    run: Callable[[int], None]
    notes: str = ""
    prepare: Callable[[], None] | None = None  # warm-up (compile) before the checked run
    before_each: Callable[[], None] | None = None  # untimed work each run needs first
    kind: str = ""  # the update it does, when less than the case's (FBGEMM: no serving copy)
    checked: bool = True  # False: does less than the update (the C loop); its rows are not compared


def numpy_peer(case: str, work: Workload, bufs: Buffers, threads: int = 1) -> Peer:
    """np.unique + np.add.at + row math (+ numpy int8 requantize)."""
    def run(version: int) -> None:
        uniq, inv = np.unique(work.ids, return_inverse=True)
        g = np.zeros((len(uniq), work.dim), np.float32)
        np.add.at(g, inv, work.grads)
        if case == "sgd":
            bufs.table[uniq] -= np.float32(LR) * g
            return
        m = bufs.momentum[uniq] + (g * g).mean(axis=1)
        bufs.momentum[uniq] = m
        w = bufs.table[uniq] - np.float32(LR) * g / (np.sqrt(m) + np.float32(EPS))[:, None]
        bufs.table[uniq] = w
        if bufs.serving is not None:
            bufs.serving[uniq] = _np_quantize(w)
            bufs.versions[uniq] = version

    return Peer("numpy", 1, bufs, run)


def _np_quantize(w: np.ndarray) -> np.ndarray:
    """int8 fused rowwise rows: scale=(max-min)/255, bias=min."""
    mn, mx = w.min(axis=1, keepdims=True), w.max(axis=1, keepdims=True)
    codes = np.rint((w - mn) * (np.float32(255) / (mx - mn + np.float32(1e-8))))
    scale = ((mx - mn) / np.float32(255)).astype(np.float32)
    return np.concatenate([np.clip(codes, 0, 255).astype(np.uint8), scale.view(np.uint8),
                           mn.astype(np.float32).view(np.uint8)], axis=1)


def _torch_update_fn(case: str) -> Callable:
    """The eager torch update (also what torch.compile compiles)."""
    import torch

    def sgd(table, momentum, serving, versions, ids, grads, version: int) -> None:
        uniq, inv = torch.unique(ids, return_inverse=True)
        g = torch.zeros(uniq.shape[0], grads.shape[1]).index_add_(0, inv, grads)
        table.index_add_(0, uniq, g, alpha=-LR)

    def rowwise(table, momentum, serving, versions, ids, grads, version: int) -> None:
        uniq, inv = torch.unique(ids, return_inverse=True)
        g = torch.zeros(uniq.shape[0], grads.shape[1]).index_add_(0, inv, grads)
        m = momentum[uniq] + (g * g).mean(dim=1)
        momentum[uniq] = m
        w = table[uniq] - LR * g / (m.sqrt() + EPS)[:, None]
        table[uniq] = w
        if serving is None:
            return
        mn, mx = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        codes = ((w - mn) * (255.0 / (mx - mn + 1e-8))).round().clamp(0, 255).to(torch.uint8)
        scale = (mx - mn) / 255.0
        serving[uniq] = torch.cat([codes, scale.view(torch.uint8), mn.contiguous().view(torch.uint8)], dim=1)
        versions[uniq] = version

    return sgd if case == "sgd" else rowwise


def _torch_args(work: Workload, bufs: Buffers) -> tuple:
    """Zero-copy torch views of the shared buffers and the delta."""
    import torch

    def t(a: np.ndarray | None):
        return None if a is None else torch.from_numpy(a)

    return (t(bufs.table), t(bufs.momentum), t(bufs.serving), t(bufs.versions),
            torch.from_numpy(work.ids), torch.from_numpy(work.grads))


def torch_peer(case: str, work: Workload, bufs: Buffers, threads: int = 2) -> Peer:
    """unique(return_inverse) + index_add_ + row math (+ int8 requantize), eager."""
    import torch

    torch.set_num_threads(threads)
    fn, args = _torch_update_fn(case), _torch_args(work, bufs)
    return Peer("torch eager", threads, bufs, lambda v: fn(*args, v))


def torch_compile_peer(case: str, work: Workload, bufs: Buffers, threads: int = 2) -> Peer:
    """The same function through torch.compile (dynamic shapes), warmed up first."""
    import torch
    import torch._dynamo

    torch.set_num_threads(threads)
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    compiled = torch.compile(_torch_update_fn(case), dynamic=True)
    args = _torch_args(work, bufs)
    peer = Peer("torch.compile", threads, bufs, lambda v: compiled(*args, v))
    peer.prepare = lambda: compiled(*args, 1)
    return peer


@functools.lru_cache(maxsize=None)
def _numba_kernels(parallel: bool) -> dict[str, Callable]:
    """Dedup through a dense slot map, then per-row math; compiled once per variant."""
    import numba
    from numba import njit, prange

    rng = prange if parallel else range

    @njit
    def dedup(ids, grads, slot, uniq, acc):
        n = 0
        for i in range(ids.shape[0]):
            r = ids[i]
            s = slot[r]
            if s < 0:
                s = n
                slot[r] = n
                uniq[n] = r
                acc[n, :] = grads[i]
                n += 1
            else:
                for d in range(grads.shape[1]):
                    acc[s, d] += grads[i, d]
        return n

    @njit(parallel=parallel)
    def sgd_rows(table, slot, uniq, acc, n, lr):
        for j in rng(n):
            r = uniq[j]
            for d in range(table.shape[1]):
                table[r, d] -= lr * acc[j, d]
            slot[r] = -1

    @njit(parallel=parallel)
    def rowwise_rows(table, momentum, serve, serving, serving_f32, versions, slot, uniq, acc, n, lr, eps,
                     version):
        dim = table.shape[1]
        for j in rng(n):
            r = uniq[j]
            ss = 0.0
            for d in range(dim):
                ss += acc[j, d] * acc[j, d]
            m = momentum[r] + np.float32(ss / dim)
            momentum[r] = m
            mult = lr / (np.sqrt(m) + eps)
            lo, hi = np.inf, -np.inf
            for d in range(dim):
                w = table[r, d] - mult * acc[j, d]
                table[r, d] = w
                lo = min(lo, w)
                hi = max(hi, w)
            slot[r] = -1
            if not serve:
                continue
            inv = np.float32(255.0) / (hi - lo + np.float32(1e-8))
            for d in range(dim):
                serving[r, d] = np.uint8(min(max(np.rint((table[r, d] - lo) * inv), 0.0), 255.0))
            serving_f32[r, dim // 4] = (hi - lo) / np.float32(255.0)
            serving_f32[r, dim // 4 + 1] = lo
            versions[r] = version

    del numba
    return {"dedup": dedup, "sgd": sgd_rows, "rowwise": rowwise_rows}


def numba_peer(case: str, work: Workload, bufs: Buffers, threads: int = 1, parallel: bool = False) -> Peer:
    """A hand-written numba loop; scratch (slot map, accumulators) allocated and touched up front."""
    try:
        import numba
    except ImportError as e:
        raise Unavailable(f"numba: {e}") from e
    if case == "rowwise_adagrad_int8" and work.dim % 4:
        raise Unavailable("numba peer writes scale/bias as f32 words: needs dim % 4 == 0")
    k = _numba_kernels(parallel)
    slot = np.full(work.rows, -1, np.int32)
    uniq = np.zeros(work.n_ids, np.int64)
    acc = np.zeros((work.n_ids, work.dim), np.float32)
    lr, eps = np.float32(LR), np.float32(EPS)
    if parallel:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    threads = numba.get_num_threads() if parallel else 1
    serve = bufs.serving is not None
    serving = bufs.serving if serve else np.zeros((1, work.dim + 8), np.uint8)  # unused stand-ins
    versions = bufs.versions if serve else np.zeros(1, np.int64)

    def run(version: int) -> None:
        n = k["dedup"](work.ids, work.grads, slot, uniq, acc)
        if case == "sgd":
            k["sgd"](bufs.table, slot, uniq, acc, n, lr)
        else:
            k["rowwise"](bufs.table, bufs.momentum, serve, serving, serving.view(np.float32), versions,
                         slot, uniq, acc, n, lr, eps, version)

    name = "numba prange" if parallel else "numba"
    return Peer(name, threads, bufs, run, "serial dedup, parallel rows" if parallel else "")


def fbgemm_peer(case: str, work: Workload, bufs: Buffers, threads: int = 2) -> Peer:
    """FBGEMM CPU TBE: forward (untimed), then backward with the delta as grad_output.

    The timed backward is FBGEMM's fused CPU backward+optimizer: it sorts and
    dedups the ids and applies the update. It has no serving copy and no
    versions, so on rowwise_adagrad_int8 it does less work than the others
    (its bytes are counted as rowwise_adagrad's). Its threads are torch's.
    """
    import torch

    try:
        from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen)
    except Exception as e:  # noqa: BLE001 - any import failure means "not here"
        raise Unavailable(f"fbgemm_gpu: {e}") from e
    torch.set_num_threads(threads)
    opt = EmbOptimType.EXACT_SGD if case == "sgd" else EmbOptimType.EXACT_ROWWISE_ADAGRAD
    emb = SplitTableBatchedEmbeddingBagsCodegen(
        [(work.rows, work.dim, EmbeddingLocation.HOST, ComputeDevice.CPU)], optimizer=opt,
        learning_rate=LR, eps=EPS, pooling_mode=PoolingMode.SUM, weights_precision=SparseType.FP32)
    table = emb.split_embedding_weights()[0].detach().numpy()
    np.copyto(table, bufs.table)
    momentum = None if case == "sgd" else emb.split_optimizer_states()[0][0].detach().numpy()
    if momentum is not None:
        momentum[:] = 0
    ids, offsets = torch.from_numpy(work.ids), torch.arange(work.n_ids + 1, dtype=torch.int64)
    grad_out = torch.from_numpy(work.grads)
    state: dict[str, torch.Tensor] = {}

    def forward() -> None:
        state["out"] = emb(ids, offsets)

    def run(version: int) -> None:
        state.pop("out").backward(grad_out)

    name = "FBGEMM " + ("EXACT_SGD" if case == "sgd" else "EXACT_ROWWISE_ADAGRAD")
    less = case == "rowwise_adagrad_int8"
    return Peer(name, threads, Buffers(table, momentum), run,
                "backward only (dedup+fused update)" + ("; no serving, no versions" if less else ""),
                before_each=forward, kind="rowwise_adagrad" if less else case)


def ekko_peer(case: str, work: Workload, bufs: Buffers, threads: int = 2) -> Peer:
    """ekko's fused kernel: dedup, optimizer, int8 requantize, version stamp in one pass."""
    try:
        import ekko

        update_kernel = getattr(ekko, "update_kernel", None)
        if update_kernel is None:
            from ekko.kernels.build import update_kernel
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"ekko.update_kernel: {e}") from e
    opt = "sgd" if case == "sgd" else "rowwise_adagrad"
    serving = "int8" if case == "rowwise_adagrad_int8" else None
    hyper = {"lr": LR} if opt == "sgd" else {"lr": LR, "eps": EPS}  # each takes only its own
    k = update_kernel(opt, work.dim, "f32", "i64", serving, threads=threads, **hyper)

    def run(version: int) -> None:
        k(bufs.table, work.ids, work.grads, state=bufs.momentum, serving=bufs.serving,
          versions=bufs.versions, step=1, version=version)

    return Peer("ekko", threads, bufs, run, "fused kernel")


def build_c(source: str, defines: dict[str, object], libs: tuple[str, ...] = ()):
    """benchmarks/<source> built with the system C compiler (-O3 -march=native and
    `-D` each define) and loaded with ctypes; Unavailable where it cannot be."""
    import ctypes
    import shutil
    import subprocess
    import tempfile

    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise Unavailable("no C compiler (cc, gcc or clang) on PATH")
    out = Path(tempfile.mkdtemp(prefix="ekko-c-peer-")) / f"{Path(source).stem}.so"
    src = Path(__file__).resolve().parent / source
    command = [cc, "-O3", "-march=native", *(f"-D{k}={v}" for k, v in defines.items()),
               "-shared", "-fPIC", "-o", str(out), str(src), *libs]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise Unavailable(f"{cc} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        return ctypes.CDLL(str(out))
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Unavailable(f"{cc}: {e}") from None
    finally:
        shutil.rmtree(out.parent)  # loaded (or failed): the file is no longer needed


@functools.lru_cache(maxsize=None)
def _c_loop_library(dim: int):
    """benchmarks/c_loop.c built for rows of `dim` floats."""
    import ctypes

    from ekko.compiler.backend.llvm_abi import OWNER_HASH, OWNER_SHIFT  # ekko's split

    lib = build_c("c_loop.c", {"DIM": dim, "OWNER_HASH": f"{OWNER_HASH:#x}ull",
                               "OWNER_SHIFT": OWNER_SHIFT}, ("-lpthread", "-lm"))
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.c_loop_update.argtypes = [ptr, ptr, ptr, ptr, i64, i64, ctypes.c_int, ctypes.c_float,
                                  ctypes.c_float]
    lib.c_loop_update.restype = ctypes.c_int
    return lib


def c_loop_peer(case: str, work: Workload, bufs: Buffers, threads: int = 2) -> Peer:
    """benchmarks/c_loop.c: each owned position applied alone, in place.

    Not an update (no dedup, journal or checks; a repeated id is updated
    once per position), so its rows are not checked: it shows what the
    memory system gives the simplest hand-written loop on the same rows and
    threads, the reference against which the targets' ratios can be judged.
    """
    lib = _c_loop_library(work.dim)
    state = None if case == "sgd" else bufs.momentum
    kind = "sgd" if case == "sgd" else "rowwise_adagrad"

    def run(version: int) -> None:
        rc = lib.c_loop_update(work.ids.ctypes.data, work.grads.ctypes.data, bufs.table.ctypes.data,
                               None if state is None else state.ctypes.data, work.n_ids, work.dim,
                               threads, LR, EPS)
        if rc != 0:
            raise RuntimeError(f"c_loop_update returned {rc}")

    return Peer("C loop", threads, bufs, run, "each position applied alone: no dedup, journal or "
                "finite checks (less work than an update; not checked)", kind=kind, checked=False)


PEERS: dict[str, Callable[[str, Workload, Buffers, int], Peer]] = {
    "numpy": numpy_peer,
    "torch eager": torch_peer,
    "torch.compile": torch_compile_peer,
    "numba": numba_peer,
    "numba prange": lambda c, w, b, t: numba_peer(c, w, b, t, parallel=True),
    "FBGEMM": fbgemm_peer,
    "C loop": c_loop_peer,
    "ekko": ekko_peer,
}


# --------------------------------------------------------------------------
# measuring


@dataclass
class Result:
    """One peer on one case."""

    case: Case
    peer: str  # the PEERS key, then the peer's own name once it was built
    key: str = ""  # the PEERS key
    threads: int = 0
    times_ms: list[float] = field(default_factory=list)
    error: str = ""  # why it did not run
    check: str = ""  # "ok (max |dw| ...)" or why it disagrees
    notes: str = ""
    kind: str = ""  # the update the peer did (FBGEMM: less than the case's)
    nbytes: int = 0  # bytes_moved of that update
    skipped: bool = False  # not run in this case, by choice (run time)
    sample: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms) if self.times_ms else float("nan")

    @property
    def gbs(self) -> float:
        """Achieved GB/s: bytes moved over the median time."""
        return self.nbytes / self.median_ms / 1e6 if self.times_ms else float("nan")


def settle() -> None:
    """Let the previous peer's thread pool go idle before the next peer is timed.

    torch's OpenMP workers keep spinning for a while after a parallel call
    and take a core from whatever runs next: an int8 merge timed right after
    torch's index_select took 10.9 ms, after 0.3 s idle 7.1 ms (alone 6.9);
    ekko's Zipf 4M x 64 rowwise Adagrad + int8 update right after FBGEMM's
    71.7 ms, after 0.3 s idle 64.3 ms (alone 62.2).
    """
    time.sleep(SETTLE_S)


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _failed(res: Result, e: Exception) -> None:
    """A failing peer is a row in the table, not a crash."""
    if isinstance(e, Unavailable):
        res.error = str(e)
        return
    res.error = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    traceback.print_exc(limit=3, file=sys.stderr)


def prepare(case: Case, name: str, work: Workload, bufs: Buffers, saved: Saved,
            exp: Expected) -> tuple[Result, Peer | None]:
    """Build the peer, run it once from the start state and check its rows; the
    rows are back at the start state after (None: it failed, see the result)."""
    res = Result(case, name, name, kind=case.kind, nbytes=bytes_moved(case.kind, work))
    try:
        peer = PEERS[name](case.kind, work, bufs, case.threads)
        res.threads, res.notes, res.peer = peer.threads, peer.notes, peer.name
        res.kind = peer.kind or case.kind
        res.nbytes = bytes_moved(res.kind, work)
        if peer.prepare is not None:
            peer.prepare()
        restore_rows(peer.bufs, saved)
        settle()
        if peer.before_each is not None:
            peer.before_each()
        peer.run(1)
        if not peer.checked:
            res.check = "not compared (less work than the update)"
        else:
            try:
                res.check = f"ok (max abs dw {check_rows(peer.bufs, exp, work.dim):.1e})"
            except AssertionError as e:
                res.check = f"DISAGREES: {e}"
            res.sample = {"table": peer.bufs.table[exp.ids].copy()}
        restore_rows(peer.bufs, saved)
        return res, peer
    except Exception as e:  # noqa: BLE001
        _failed(res, e)
        return res, None


def time_run(res: Result, peer: Peer, version: int) -> float:
    """One timed run (after the untimed work it needs first), recorded in `res`."""
    if peer.before_each is not None:
        peer.before_each()  # FBGEMM: untimed forward before each timed backward
    res.times_ms.append(_timed(lambda: peer.run(version)))
    return res.times_ms[-1]


def measure(case: Case, name: str, work: Workload, bufs: Buffers, saved: Saved, exp: Expected,
            runs: int) -> Result:
    """Build, check once from the start state, then time `runs` runs in a row (keep updating)."""
    res, peer = prepare(case, name, work, bufs, saved, exp)
    if peer is None:
        return res
    try:
        settle()
        for i in range(runs):
            if time_run(res, peer, i + 2) > 3000 and i == 0 and runs > 2:
                runs = 2  # slow peers: fewer runs keeps the whole benchmark short
    except Exception as e:  # noqa: BLE001
        _failed(res, e)
        res.times_ms.clear()
    restore_rows(peer.bufs, saved)
    return res


def measure_rounds(entries: list[tuple[Result, Peer]], runs: int, saved: Saved) -> None:
    """Time the peers in rounds, so that a slower or faster minute of the machine
    falls on every one of them alike: the ratios the summary reads off are
    between runs seconds apart. A peer's turn is an idle `settle`, one untimed
    run (it wakes its threads and brings its scratch back into the cache, as
    a stream of updates finds them), then the timed run."""
    live = list(entries)
    for i in range(runs):
        for res, peer in list(live):
            settle()
            try:
                if peer.before_each is not None:
                    peer.before_each()
                peer.run(2 * i + 2)
                time_run(res, peer, 2 * i + 3)
            except Exception as e:  # noqa: BLE001
                _failed(res, e)
                res.times_ms.clear()
                live.remove((res, peer))
    for _, peer in entries:
        restore_rows(peer.bufs, saved)


def copy_bandwidth(mb: int = 512, reps: int = 5) -> float:
    """Read+write GB/s of np.copyto on pre-touched buffers (best of reps)."""
    src = np.ones(mb * 2**20 // 8)
    dst = np.zeros_like(src)
    best = min(_timed(lambda: np.copyto(dst, src)) for _ in range(reps))
    return 2 * src.nbytes / (best / 1e3) / 1e9


def run_case(case: Case, work: Workload, runs: int, peers: list[str]) -> list[Result]:
    """The case's peers, sharing one set of buffers (touched rows restored between).

    The peers the summary's ratios come from (ROUNDS) are checked one by one,
    then timed in interleaved rounds; the others are timed one after another.
    """
    bufs = allocate(case.kind, work.rows, work.dim)
    saved = save_rows(bufs, work)
    exp = expected_rows(case.kind, work, saved, sample_ids(work))
    results, rounds = [], []
    for name in peers:
        if not case.runs_peer(name):
            results.append(Result(case, name, name, skipped=True, kind=case.kind,
                                  notes="skipped in this case to keep the run short (see the main cases)"))
            continue
        print(f"  {case.label}: {name} ...", file=sys.stderr, flush=True)
        if name in ROUNDS:
            res, peer = prepare(case, name, work, bufs, saved, exp)
            if peer is not None:
                rounds.append((res, peer))
        else:
            res = measure(case, name, work, bufs, saved, exp, runs)
        results.append(res)
    measure_rounds(rounds, runs, saved)
    _compare_to_ekko(results)
    return results


def _compare_to_ekko(results: list[Result]) -> None:
    """Add each peer's agreement with ekko's sampled rows to its check column."""
    ek = next((r for r in results if r.key == "ekko" and r.sample), None)
    if ek is None:
        return
    for r in results:
        if r is not ek and r.sample:
            d = np.abs(r.sample["table"] - ek.sample["table"]).max()
            r.check += f"; vs ekko {d:.1e}"


# --------------------------------------------------------------------------
# reporting


def _timed_peer(rows: list[Result], key: str) -> Result | None:
    return next((r for r in rows if r.key == key and r.times_ms), None)


def verdict(value: float, target: float, text: str, unit: str = "x") -> str:
    """`text` and whether `value` meets `target` ("met" or "MISS")."""
    return f"{text} (target >= {target:g}{unit}: {'met' if value >= target else 'MISS'})"


def summary_line(case: Case, rows: list[Result], bw: float) -> str:
    """ekko on one case against the issue's targets: x FBGEMM, x torch eager, % of copy bandwidth."""
    ek = _timed_peer(rows, "ekko")
    if ek is None:
        why = next((r.error for r in rows if r.key == "ekko"), "not in --peers")
        return f"{case.label}: ekko did not run ({why})"
    parts = [f"{case.label}: ekko {ek.median_ms:.1f} ms, {ek.gbs:.1f} GB/s"]
    fb = _timed_peer(rows, "FBGEMM")
    if fb is None:
        parts.append("FBGEMM not run")
    else:
        less = fb.kind != case.kind
        target = TARGETS["fbgemm_less_work" if less else "fbgemm"]
        parts.append(verdict(fb.median_ms / ek.median_ms, target,
                              f"{fb.median_ms / ek.median_ms:.2f}x FBGEMM"
                              + (" (which skips the serving copy and versions)" if less else "")))
    c = _timed_peer(rows, "C loop")
    if c is not None:
        ratio = f"{fb.median_ms / c.median_ms:.2f}x FBGEMM, " if fb is not None else ""
        parts.append(f"the C loop (less work) {c.median_ms:.1f} ms: {ratio}"
                     f"ekko {c.median_ms / ek.median_ms:.2f}x its speed")
    te = _timed_peer(rows, "torch eager")
    parts.append("torch eager not run" if te is None else
                 verdict(te.median_ms / ek.median_ms, TARGETS["torch"],
                          f"{te.median_ms / ek.median_ms:.2f}x torch eager"))
    pct = 100 * ek.gbs / bw
    parts.append(verdict(pct, 100 * TARGETS["copy"], f"{pct:.0f}% of copy bandwidth", "%"))
    return "; ".join(parts)


def format_table(results: list[Result], works: dict[Case, Workload], bw: float, bw_mb: int = 512,
                 bw_runs: tuple[float, ...] = ()) -> str:
    """Markdown: the summary lines, then one section per case with every peer's columns."""
    seen = ", ".join(f"{b:.1f}" for b in bw_runs)
    out = [f"Machine copy bandwidth (np.copyto {bw_mb} MiB, read+write): **{bw:.1f} GB/s**"
           + (f" (best of the measurements before and after the cases: {seen} GB/s)" if seen else "") + "\n",
           "### Summary: ekko against the targets of issue 20\n"]
    for case in works:
        out.append(f"- {summary_line(case, [r for r in results if r.case == case], bw)}")
    out.append("")
    for case, work in works.items():
        rows = [r for r in results if r.case == case]
        ek = _timed_peer(rows, "ekko")
        out.append(f"\n### {case.title} ({len(work.uniq):,} distinct), group {case.group}\n")
        out.append(f"Bytes moved (`bytes_moved`): {bytes_moved(case.kind, work) / 1e6:.0f} MB.\n")
        out.append("| peer | threads | median ms | min-max ms | M ids/s | MB moved | GB/s | % of copy bw "
                   "| ekko speedup | check | notes |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            out.append(_row(r, ek, work, bw))
    return "\n".join(out) + "\n"


def _row(r: Result, ek: Result | None, work: Workload, bw: float) -> str:
    if r.skipped:
        return f"| {r.peer} | - | - | - | - | - | - | - | - | - | {r.notes} |"
    if not r.times_ms:
        return f"| {r.peer} | - | - | - | - | - | - | - | - | not run: {r.error} | {r.notes} |"
    speed = "1.00x" if r is ek else (f"{r.median_ms / ek.median_ms:.2f}x" if ek else "-")
    return (f"| {r.peer} | {r.threads} | {r.median_ms:.1f} | {min(r.times_ms):.0f}-{max(r.times_ms):.0f} | "
            f"{work.n_ids / r.median_ms / 1e3:.1f} | {r.nbytes / 1e6:.0f} | {r.gbs:.3g} | "
            f"{pct_text(100 * r.gbs / bw)} | {speed} | {r.check} | {r.notes} (n={len(r.times_ms)}) |")


def pct_text(p: float) -> str:
    """A percentage, two significant digits below 10% (a slow peer is not '0%')."""
    return f"{p:.0f}%" if p >= 10 else f"{p:.2g}%"


STYLE = {"numpy": ("o", "tab:blue"), "torch eager": ("s", "tab:orange"), "torch.compile": ("D", "tab:green"),
         "numba": ("v", "tab:purple"), "numba prange": ("^", "tab:brown"), "FBGEMM": ("P", "tab:gray"),
         "C loop": ("x", "black"), "ekko": ("*", "tab:red")}


def plot(results: list[Result], bw: float, path: Path) -> None:
    """Write `figure` to `path`."""
    save_figure(figure(results, bw), path)


def figure(results: list[Result], bw: float):
    """Roofline-style: achieved GB/s per case (a row each) and peer (a marker), against the copy line."""
    order = list(dict.fromkeys(r.case for r in results))
    points = {key: [(r.gbs, order.index(r.case)) for r in results if r.key == key and r.times_ms]
              for key in STYLE}
    return roofline([c.label for c in order], [c.group for c in order], points, STYLE, bw,
                    TARGETS["copy"],
                    "Sparse update: achieved bandwidth per case and peer against the copy roof")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (a bad one is a usage error naming the flag)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def dim_list(text: str) -> str:
    """An argparse type: comma-separated dims, each 1 to 16,384 (kept as the text)."""
    for part in text.split(","):
        dim = positive_int(part)
        if dim > 1 << 14:
            raise argparse.ArgumentTypeError(f"dim {dim} is over 16384")
    return text


def subset_of(names) -> Callable[[str], str]:
    """An argparse type: a comma-separated subset of `names` (kept as the text)."""
    def check(text: str) -> str:
        unknown = [n for n in text.split(",") if n not in names]
        if unknown or not text:
            raise argparse.ArgumentTypeError(f"unknown {unknown[0] if unknown else '(empty)'!r}; "
                                             f"choose from {', '.join(names)}")
        return text
    return check


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="10x smaller workload (CI smoke run)")
    p.add_argument("--dims", type=dim_list, default=None,
                   help="dims of the main cases (default 64,128; 64 with --quick)")
    p.add_argument("--runs", type=positive_int, default=None,
                   help="timed runs per peer, median reported (default 5; 3 with --quick)")
    p.add_argument("--peers", type=subset_of(PEERS), default=",".join(PEERS),
                   help="comma-separated subset of peers")
    p.add_argument("--cases", type=subset_of(KINDS), default=",".join(KINDS),
                   help="comma-separated subset of update kinds")
    p.add_argument("--groups", type=subset_of(GROUPS), default=",".join(GROUPS),
                   help="comma-separated subset of case groups")
    add_out(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.runs = args.runs or (3 if args.quick else 5)
    dims = tuple(int(d) for d in args.dims.split(",")) if args.dims else None
    peers = [p for p in args.peers.split(",") if p]
    kinds, groups = set(args.cases.split(",")), set(args.groups.split(","))
    todo = [c for c in cases(args.quick, dims) if c.kind in kinds and c.group in groups]
    bw_mb = 64 if args.quick else 512
    bw_runs = [copy_bandwidth(bw_mb)]
    results: list[Result] = []
    shapes: dict[tuple, Workload] = {}
    works: dict[Case, Workload] = {}
    for case in todo:
        shape = (case.rows, case.dim, case.n_ids, case.dist)
        if shape not in shapes:
            shapes[shape] = make_workload(case.rows, case.dim, case.n_ids, dist=case.dist)
        works[case] = shapes[shape]
        results += run_case(case, works[case], args.runs, peers)
    bw_runs.append(copy_bandwidth(bw_mb))
    bw = max(bw_runs)
    text = ("## Sparse update kernels\n\n" + _describe(args) + "\n"
            + format_table(results, works, bw, bw_mb, tuple(bw_runs)))
    print(text)
    write_results(args, "update_kernels", text, lambda path: plot(results, bw, path))
    return 1 if any(r.check.startswith("DISAGREES") for r in results) else 0


def _describe(args: argparse.Namespace) -> str:
    """How the numbers were taken, printed above the tables."""
    return (f"`python benchmarks/update_kernels.py{' --quick' if args.quick else ''}`. "
            "Zipf(1.05) ids folded into the table by a fixed permutation (or uniform ids where the case "
            f"says so), f32 grads N(0,1), lr {LR}, eps {EPS}. "
            f"Median of {args.runs} timed runs per peer after one checked run from the start state; "
            "the table keeps updating across timed runs (same work per run). "
            f"{', '.join(ROUNDS)} take turns, run by run: each turn 0.3 s idle, one untimed run, "
            "then the timed run; the other peers time their runs in a row. "
            "'check' compares ~2000 sampled touched rows (incl. the 20 hottest ids) to a float64 reference "
            "and to ekko. FBGEMM's time is its backward (dedup + fused optimizer) only, with no serving "
            "copy or versions; its forward runs untimed before each backward. "
            "Bytes moved (`bytes_moved`): ids and gradient rows read once; each distinct row of the table and "
            "of the rowwise state read and written once; the serving row and version of each distinct row "
            "written once where the update has them (FBGEMM's rows count its own, smaller, work). "
            "GB/s = bytes / median time; % of copy bw = that over the copy bandwidth below. "
            "The sweep keeps the bytes fixed: a 512 MiB table and 128 MiB of gradients at every dim.\n")


if __name__ == "__main__":
    sys.exit(main())
