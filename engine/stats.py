"""Freshness and traffic statistics of the update engine.

Freshness of a row update = the time it became visible to lookups on a
replica (the merge that wrote it returned) minus its commit time on the
primary. A row that is updated again before it was sent keeps the commit
time of its oldest unsent update: the replica has been stale since then.
Samples go into a log-spaced histogram (60 bins a decade, 1 us to 1000 s,
under 2% relative error on a percentile) plus an exact maximum, so a
long run costs constant memory.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np

BINS_PER_DECADE = 60
LO_MS, HI_MS = 1e-3, 1e6
_EDGES = np.logspace(np.log10(LO_MS), np.log10(HI_MS),
                     int(BINS_PER_DECADE * np.log10(HI_MS / LO_MS)) + 1)


class Histogram:
    """Counts of latencies (ms) in log-spaced bins, with an exact max."""

    def __init__(self) -> None:
        self.counts = np.zeros(len(_EDGES) + 1, np.int64)
        self.max = 0.0
        self.total = 0

    def add(self, ms: np.ndarray) -> None:
        ms = np.asarray(ms, np.float64).reshape(-1)
        if not ms.size:
            return
        self.counts += np.bincount(np.searchsorted(_EDGES, ms), minlength=len(self.counts))
        self.max = max(self.max, float(ms.max()))
        self.total += ms.size

    def merge(self, other: Histogram) -> None:
        self.counts += other.counts
        self.max = max(self.max, other.max)
        self.total += other.total

    def percentile(self, q: float) -> float:
        """The upper edge of the bin holding the q-th percentile (capped by the max)."""
        if not self.total:
            return 0.0
        k = int(np.searchsorted(np.cumsum(self.counts), q / 100 * self.total, side="left"))
        edge = _EDGES[min(k, len(_EDGES) - 1)]
        return float(min(edge, self.max))

    def summary(self) -> dict[str, float]:
        return {"p50": self.percentile(50), "p99": self.percentile(99), "max": self.max,
                "count": self.total}

    def cdf(self) -> tuple[np.ndarray, np.ndarray]:
        """(latency ms, fraction of samples at or below it), for plots."""
        frac = np.cumsum(self.counts)[:-1] / max(self.total, 1)
        return _EDGES, frac


@dataclass
class ReplicaStats:
    """What one replica saw: freshness per table, lookups, rejected packets."""

    freshness: dict[str, Histogram] = field(default_factory=dict)
    lookup_ms: deque = field(default_factory=lambda: deque(maxlen=200_000))
    rows_moved: int = 0
    rows_applied: int = 0
    bytes_moved: int = 0
    packets: int = 0
    packets_rejected: int = 0  # packets with at least one row the merge refused
    rows_rejected: int = 0
    rows_repaired: int = 0  # rows ahead of the primary's, or other bytes at its version
    future_packets: int = 0  # packets with commit times after their merge: not measured
    future_rows: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_merge(self, table: str, latency_ms: np.ndarray, rows: int, nbytes: int,
                     applied: int, future: int = 0) -> None:
        """A merge; `future` rows claimed a commit time later than their merge (clock skew
        or a forged packet): their freshness is unknown, so they are counted, not measured."""
        with self.lock:
            self.freshness.setdefault(table, Histogram()).add(latency_ms)
            self.rows_moved += rows
            self.rows_applied += applied
            self.bytes_moved += nbytes
            self.packets += 1
            self.future_packets += future > 0
            self.future_rows += future

    def record_reject(self, rows: int) -> None:
        with self.lock:
            self.packets_rejected += 1
            self.rows_rejected += rows

    def record_repair(self, rows: int) -> None:
        with self.lock:
            self.rows_repaired += rows

    def record_lookup(self, ms: float) -> None:
        self.lookup_ms.append(ms)  # deque.append is atomic

    def all_freshness(self) -> Histogram:
        h = Histogram()
        with self.lock:
            for t in self.freshness.values():
                h.merge(t)
        return h

    def summary(self) -> dict:
        with self.lock:
            tables = {t: h.summary() for t, h in self.freshness.items()}
            out = {"rows_moved": self.rows_moved, "rows_applied": self.rows_applied,
                   "bytes_moved": self.bytes_moved, "packets": self.packets,
                   "packets_rejected": self.packets_rejected, "rows_rejected": self.rows_rejected,
                   "rows_repaired": self.rows_repaired, "future_packets": self.future_packets,
                   "future_rows": self.future_rows}
        out["freshness_ms"] = self.all_freshness().summary()
        out["tables"] = tables
        out["lookup_ms"] = latency_summary(list(self.lookup_ms))
        return out


def latency_summary(ms: list[float]) -> dict[str, float]:
    if not ms:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0, "count": 0}
    a = np.asarray(ms)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)),
            "max": float(a.max()), "count": int(a.size)}


__all__ = ["Histogram", "ReplicaStats", "latency_summary"]
