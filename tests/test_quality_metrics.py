"""Quality metrics against independent references, and the harm check's verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ekko.engine.quality import Quality, QualityConfig, auc, calibration, logloss, shift
from ekko.kernels.errors import EkkoError


def pairwise_auc(p, y) -> float:
    """The definition: over every (positive, negative) pair, 1 if ranked right, 1/2 if tied."""
    pos, neg = p[y == 1], p[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(6))
def test_auc_is_the_pairwise_definition(seed) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    y = (rng.random(n) < rng.random()).astype(np.int64)
    y[0], y[-1] = 0, 1  # both classes
    p = rng.random(n)
    if seed % 2:  # heavy ties
        p = np.round(p, 1)
    assert auc(p, y) == pytest.approx(pairwise_auc(p, y), abs=1e-12)
    assert math.isnan(auc(p, np.ones(n)))


def test_logloss_is_torchs_binary_cross_entropy() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    p, y = rng.uniform(0.01, 0.99, 500), (rng.random(500) < 0.3).astype(np.float64)
    ref = torch.nn.functional.binary_cross_entropy(torch.tensor(p), torch.tensor(y)).item()
    assert logloss(p, y) == pytest.approx(ref, rel=1e-12)
    assert math.isfinite(logloss(np.array([0.0, 1.0]), np.array([1.0, 0.0])))  # clipped


def test_shift_and_calibration() -> None:
    rng = np.random.default_rng(2)
    ref = rng.random(5000)
    assert shift(ref, rng.random(5000)) < 0.02  # the same distribution
    assert shift(ref, rng.random(5000) ** 3) > 0.25  # pushed towards 0
    # by hand: ten equal bins of the reference; `now` puts half its mass in the first bin
    now = np.r_[np.full(500, 0.05), np.linspace(0.1, 0.999, 500)]
    cur = np.bincount(np.minimum((now * 10).astype(int), 9), minlength=10) / 1000
    want = np.sum((cur - 0.1) * np.log(np.maximum(cur, 1e-4) / 0.1))
    assert shift(np.linspace(0, 1, 100001)[:-1], now) == pytest.approx(want, rel=1e-3)
    assert calibration(np.full(10, 0.2), np.r_[np.ones(1), np.zeros(9)]) == pytest.approx(2.0)


def test_the_harm_check() -> None:
    rng = np.random.default_rng(3)
    y = (rng.random(2000) < 0.3).astype(np.float64)
    good = np.clip(0.3 + 0.4 * (y - 0.3) + rng.normal(0, 0.1, 2000), 0.01, 0.99)
    mark = Quality.of(good, y)
    cfg = QualityConfig()
    same = np.clip(good + rng.normal(0, 0.005, 2000), 0.01, 0.99)
    assert cfg.harm(mark, Quality.of(same, y)) is None
    flipped = Quality.of(1 - good, y)  # poisoned: labels learned backwards
    assert "log-loss" in cfg.harm(mark, flipped)
    few = Quality.of(1 - good[:50], y[:50])
    assert cfg.harm(mark, few) is None  # too few events to judge
    shifted = Quality.of(np.clip(good * 0.5, 0.01, 0.99), y)
    assert cfg.harm(mark, shifted) is not None
    with pytest.raises(EkkoError, match="not finite"):
        Quality.of(np.array([0.5, np.nan]), np.array([0.0, 1.0]))
    with pytest.raises(EkkoError, match="3 predictions for 2 labels"):
        Quality.of(np.ones(3) / 2, np.ones(2))
    for bad in (dict(logloss_rise=-1), dict(auc_drop=float("nan")), dict(min_events=1),
                dict(max_shift="x")):
        with pytest.raises(EkkoError, match="QualityConfig"):
            QualityConfig(**bad)
