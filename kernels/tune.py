"""Measure the host-dependent schedule choices and keep them (`ekko tune`).

The prefetch distance of the CPU update (how many positions ahead a walk
asks for a row's lines) is best where it covers this machine's memory
latency, which no rule of the row size knows. `tune_prefetch` times the
fused update of a synthetic delta at each candidate distance, interleaved
round by round so that every candidate sees the same machine load, and
records the fastest per dim in the tuning store (compiler/backend/tuning),
from which upd-schedule takes it for every kernel compiled afterwards.

The workload is the one the distance matters for: Zipf(1.05) ids scattered
over a table several times the last-level cache, rowwise Adagrad, every
core. A candidate is only kept over the rule's distance when its median is
`MARGIN` faster: on a loaded machine a tie is noise, and the rule stays.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, replace

import numpy as np

from ..compiler.backend.llvm_update import prefetch_ahead
from ..compiler.backend.tuning import record_prefetch
from ..dialects.limits import MAX_DIM, MAX_PREFETCH
from .errors import UpdateError
from .update import UpdateKernel

CANDIDATES = (4, 8, 16, 32)
TABLE_BYTES = 512 << 20  # 16x a 32 MiB last-level cache: rows come from memory
MARGIN = 0.03  # a candidate must beat the rule's distance by 3% to replace it


@dataclass(frozen=True)
class PrefetchResult:
    """One dim's measurement: median ms per candidate distance, and the choice."""

    dim: int
    rows: int
    ids: int
    ms: dict[int, float]
    rule: int  # prefetch_ahead(dim), the distance without tuning
    chosen: int


def _physical_memory() -> int:
    """Bytes of memory this machine has (0 when the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _workload(dim: int, table_bytes: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids, grads, rows): rows of `dim` f32 filling table_bytes, a quarter as many ids."""
    rows = max(1024, table_bytes // (4 * dim))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(rows)
    ids = perm[(rng.zipf(1.05, rows // 4) - 1) % rows].astype(np.int64)
    grads = rng.standard_normal((len(ids), dim), dtype=np.float32)
    return ids, grads, rows


def _measure(dim: int, candidates: tuple[int, ...], threads: int | None, table_bytes: int,
             rounds: int, seed: int) -> PrefetchResult:
    from .build import update_kernel

    ids, grads, rows = _workload(dim, table_bytes, seed)
    base = update_kernel("rowwise_adagrad", dim, threads=threads, lr=1e-3).spec
    kernels = {d: UpdateKernel(replace(base, prefetch=d)) for d in candidates}
    table = np.zeros((rows, dim), np.float32)
    state = np.zeros(rows, np.float32)
    times: dict[int, list[float]] = {d: [] for d in candidates}
    order = list(candidates)
    for r in range(rounds + 1):  # round 0 warms the pages and the code, untimed
        for d in (order if r % 2 else order[::-1]):
            start = time.perf_counter()
            kernels[d](table, ids, grads, state=state)
            if r:
                times[d].append(time.perf_counter() - start)
    ms = {d: 1e3 * statistics.median(t) for d, t in times.items()}
    rule = prefetch_ahead(dim)
    best = min(ms, key=ms.__getitem__)
    chosen = best if rule not in ms or ms[best] < (1 - MARGIN) * ms[rule] else rule
    return PrefetchResult(dim, rows, len(ids), ms, rule, chosen)


def tune_prefetch(dims: tuple[int, ...] = (16, 32, 64, 128, 256), *,
                  candidates: tuple[int, ...] = CANDIDATES, threads: int | None = None,
                  table_bytes: int = TABLE_BYTES, rounds: int = 7, record: bool = True,
                  seed: int = 0) -> list[PrefetchResult]:
    """Time the update at each candidate distance for each dim; record the choices.

    `record=False` only measures. Each dim costs a table of `table_bytes`
    and (rounds + 1) x len(candidates) updates of a quarter as many ids.
    """
    if not dims or not candidates:
        raise UpdateError("tune_prefetch needs at least one dim and one candidate")
    for what, values, most in (("dim", dims, MAX_DIM), ("prefetch candidate", candidates,
                                                          MAX_PREFETCH)):
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= most:
                raise UpdateError(f"{what} must be an integer from 1 to {most}, got {v!r}")
    if not 1 <= rounds <= 1000:
        raise UpdateError(f"rounds must be 1 to 1000, got {rounds}")
    if not 1 << 16 <= table_bytes <= 1 << 40:
        raise UpdateError(f"table_bytes must be 64 KiB to 1 TiB, got {table_bytes}")
    need, have = 3 * table_bytes // 2, _physical_memory()
    if have and need > have // 2:
        raise UpdateError(f"a {table_bytes >> 20} MiB table needs about {need >> 20} MiB "
                          f"(table, state and a delta of a quarter of its rows); this machine "
                          f"has {have >> 20} MiB: use a smaller table")
    results = [_measure(int(d), tuple(dict.fromkeys(int(c) for c in candidates)), threads,
                        table_bytes, rounds, seed) for d in dims]
    if record:
        try:
            record_prefetch({r.dim: r.chosen for r in results})
        except (ValueError, OSError) as e:
            raise UpdateError(f"cannot record the tuned choices: {e}") from None
    return results


__all__ = ["PrefetchResult", "tune_prefetch"]
