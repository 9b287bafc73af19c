"""examples/clicks.ekko fits workloads/clicks.py's stream, and its dense part runs on its lookups."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import ekko
from ekko.workloads.clicks import ClickStream, ClickStreamConfig

torch = pytest.importorskip("torch")
from ekko.workloads.clicks_model import FEATURES, ClicksDense  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_the_model_fits_the_stream_and_predicts() -> None:
    cfg = ClickStreamConfig()
    model = ekko.compile_model(ROOT / "examples" / "clicks.ekko")
    rows = {t.name: t.rows for t in model.model.tables}
    assert rows == {"user": cfg.users, "item": cfg.item_capacity, "category": cfg.categories}
    assert sorted(f.name for f in model.model.features) == sorted(FEATURES)
    model.materialize()
    batch = ClickStream(cfg).next_batch(64)
    pooled = {f: torch.from_numpy(model.lookup(f, ids, offsets))
              for f, (ids, offsets) in batch.sparse().items()}
    assert all(p.shape == (64, 16) for p in pooled.values())
    logits = ClicksDense(dense=cfg.dense)(pooled, torch.from_numpy(batch.x))
    assert logits.shape == (64,) and torch.isfinite(logits).all()
    assert np.isin(batch.y, (0.0, 1.0)).all()
