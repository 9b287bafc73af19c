"""Prediction quality: the metrics online learning is judged by, and a check against a mark.

Freshness is for quality, so the state manager judges replicas by their
predictions too, not only by update norms: on a probe of recent labeled
events, each replica's log-loss, AUC and the shift of its prediction
distribution are compared with what they were at the last healthy mark.

* log-loss: mean binary cross-entropy, probabilities clipped to [1e-7, 1-1e-7]
  (one confident mistake must not make it infinite).
* AUC: the probability that a random positive scores above a random negative,
  ties counting one half (the Mann-Whitney statistic, from average ranks).
* calibration: mean prediction over mean label (1 is calibrated).
* normalized entropy: log-loss over the entropy of the probe's own click
  rate (what always predicting that rate would score). Probes of different
  moments differ in click rate, and log-loss follows it; this ratio does not,
  so the check compares it, not raw log-loss, with the mark's.
* shift: the population stability index of the predictions against the mark's,
  on ten bins cut at the mark's deciles (0.1 moderate, 0.25 large, by the
  usual reading). A model that learns online moves its predictions a lot
  (PSI over 2 between checks early on) while improving, so a shift counts
  as harm only when the normalized entropy did not improve with it.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..kernels.errors import EkkoError

EPS = 1e-7


def logloss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    y = np.asarray(y, np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p))) if len(p) else math.nan


def auc(p: np.ndarray, y: np.ndarray) -> float:
    """NaN when only one class is present (no pair to rank)."""
    p, y = np.asarray(p, np.float64), np.asarray(y) > 0.5
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return math.nan
    order = np.argsort(p, kind="mergesort")
    sorted_p = p[order]
    ranks = np.empty(len(p), np.float64)
    # average ranks of ties: each run of equal scores shares the mean of its positions
    starts = np.flatnonzero(np.r_[True, sorted_p[1:] != sorted_p[:-1]])
    ends = np.r_[starts[1:], len(p)]
    mean_rank = (starts + ends + 1) / 2.0  # 1-based
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def calibration(p: np.ndarray, y: np.ndarray) -> float:
    mean_y = float(np.mean(y)) if len(y) else math.nan
    return float(np.mean(p)) / mean_y if mean_y else math.nan


def shift(reference: np.ndarray, now: np.ndarray, bins: int = 10) -> float:
    """Population stability index of `now` against `reference`."""
    reference, now = np.asarray(reference, np.float64), np.asarray(now, np.float64)
    if not len(reference) or not len(now):
        return math.nan
    cuts = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    ref = np.bincount(np.searchsorted(cuts, reference, side="right"), minlength=len(cuts) + 1)
    cur = np.bincount(np.searchsorted(cuts, now, side="right"), minlength=len(cuts) + 1)
    ref = np.maximum(ref / len(reference), 1e-4)
    cur = np.maximum(cur / len(now), 1e-4)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


@dataclass(frozen=True)
class Quality:
    """One replica's quality on one probe."""

    events: int
    logloss: float
    auc: float
    calibration: float
    predictions: np.ndarray  # kept for the shift against a later probe
    base: float = math.nan  # the log-loss of predicting the probe's click rate

    @property
    def normalized_entropy(self) -> float:
        return self.logloss / self.base if self.base > 0 else math.nan

    @classmethod
    def of(cls, p: np.ndarray, y: np.ndarray) -> Quality:
        p = np.asarray(p, np.float64).reshape(-1)
        y = np.asarray(y, np.float64).reshape(-1)
        if p.shape != y.shape:
            raise EkkoError(f"{len(p)} predictions for {len(y)} labels")
        if not np.isfinite(p).all():
            raise EkkoError("a prediction is not finite")
        rate = np.full(len(y), y.mean() if len(y) else math.nan)
        return cls(len(p), logloss(p, y), auc(p, y), calibration(p, y), p, logloss(rate, y))

    def as_dict(self) -> dict[str, float]:
        return {"events": self.events, "logloss": self.logloss, "auc": self.auc,
                "calibration": self.calibration, "normalized_entropy": self.normalized_entropy}


@dataclass(frozen=True)
class QualityConfig:
    """When a replica's quality counts as harmed, relative to the last healthy mark.

    `logloss_rise`: allowed relative rise of the normalized entropy (log-loss
    over the probe's base rate entropy; 0.05 = 5%);
    `auc_drop`: allowed absolute drop of AUC; `max_shift`: allowed population
    stability index of the predictions. A probe of fewer than `min_events`
    events judges nothing. The probe is the last `probe_events` labeled
    events given to `Engine.observe`; `output` says what the dense module
    returns: "logit" (passed through a sigmoid) or "probability".
    """

    logloss_rise: float = 0.04  # 0 false rollbacks in 1,610 clean checks (benchmarks/quality.py)
    auc_drop: float = 0.02
    max_shift: float = 0.5  # PSI, counted when log-loss did not improve with it
    min_events: int = 200
    probe_events: int = 4000
    output: str = "logit"

    def __post_init__(self) -> None:
        for name in ("logloss_rise", "auc_drop", "max_shift"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise EkkoError(f"QualityConfig.{name} must be a finite number >= 0, got {v!r}")
        if not isinstance(self.min_events, int) or self.min_events < 2:
            raise EkkoError(f"QualityConfig.min_events must be an int >= 2, "
                            f"got {self.min_events!r}")
        if not isinstance(self.probe_events, int) or self.probe_events < self.min_events:
            raise EkkoError(f"QualityConfig.probe_events must be an int >= min_events, "
                            f"got {self.probe_events!r}")
        if self.output not in ("logit", "probability"):
            raise EkkoError(f"QualityConfig.output must be 'logit' or 'probability', "
                            f"got {self.output!r}")

    def probability(self, out: np.ndarray) -> np.ndarray:
        """The dense module's output as click probabilities."""
        out = np.asarray(out, np.float64).reshape(-1)
        return 1.0 / (1.0 + np.exp(-out)) if self.output == "logit" else out

    def harm(self, mark: Quality, now: Quality) -> str | None:
        """Why `now` is worse than `mark` beyond the allowance, or None."""
        if now.events < self.min_events or mark.events < self.min_events:
            return None
        ne, mark_ne = now.normalized_entropy, mark.normalized_entropy
        if math.isfinite(ne) and math.isfinite(mark_ne) and ne > mark_ne * (1 + self.logloss_rise):
            return (f"log-loss {now.logloss:.4f} (normalized entropy {ne:.4f}) vs "
                    f"{mark.logloss:.4f} ({mark_ne:.4f}) at the healthy mark "
                    f"(allowed +{self.logloss_rise:.0%})")
        if math.isfinite(mark.auc) and math.isfinite(now.auc) and \
                now.auc < mark.auc - self.auc_drop:
            return f"AUC {now.auc:.4f} vs {mark.auc:.4f} at the healthy mark"
        psi = shift(mark.predictions, now.predictions)
        better = math.isfinite(ne) and math.isfinite(mark_ne) and ne < mark_ne
        if psi > self.max_shift and not better:  # a model that learns moves, and improves
            return (f"prediction shift (PSI) {psi:.3f} against the healthy mark, with no "
                    f"gain in normalized entropy ({ne:.4f} vs {mark_ne:.4f})")
        return None


class Probe:
    """The newest labeled events (whole batches, the oldest dropped first) on which the
    replicas' predictions are judged; thread-safe."""

    def __init__(self, size: int):
        self.size = size
        self._batches: deque[tuple[Any, Any, np.ndarray]] = deque()
        self._events = 0
        self._lock = threading.Lock()

    def add(self, bags: Any, x: Any, y: np.ndarray) -> None:
        with self._lock:
            self._batches.append((bags, x, y))
            self._events += len(y)
            while self._events - len(self._batches[0][2]) >= self.size:
                self._events -= len(self._batches.popleft()[2])

    @property
    def events(self) -> int:
        return self._events

    def batches(self) -> list[tuple[Any, Any, np.ndarray]]:
        with self._lock:
            return list(self._batches)


__all__ = ["Probe", "Quality", "QualityConfig", "auc", "calibration", "logloss", "shift"]
