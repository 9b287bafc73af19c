"""Zipf-distributed ids: the skew of real embedding traffic (a few hot rows, a long tail).

`ekko run`, its engine mode and the freshness benchmarks draw their update
and lookup ids here.
"""

from __future__ import annotations

import numpy as np


class ZipfIds:
    """Zipf(alpha) ids over [0, rows): rank r has weight 1/r^alpha, ranks permuted."""

    def __init__(self, rows: int, alpha: float, rng: np.random.Generator):
        weights = 1.0 / np.arange(1, rows + 1, dtype=np.float64) ** alpha
        self.cdf = np.cumsum(weights / weights.sum())
        self.perm = rng.permutation(rows).astype(np.int64)
        self.rng = rng

    def draw(self, n: int) -> np.ndarray:
        ranks = np.searchsorted(self.cdf, self.rng.random(n), side="right")
        return self.perm[np.minimum(ranks, len(self.perm) - 1)]
