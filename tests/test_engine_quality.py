"""Health checks on predictions: a probe of labeled events, judged against the healthy mark.

A check compares each replica's log-loss, AUC and prediction shift on the
probe (Engine.observe) with the last healthy mark; harm rolls the tables
and the dense module back. Each test injects one kind of harm the norm
check cannot see, and a clean run must pass every check.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ekko
from ekko.engine import HealthConfig
from ekko.engine.quality import Probe, QualityConfig
from ekko.kernels.errors import EkkoError
from ekko.workloads.clicks import ClickStream, ClickStreamConfig
from ekko.workloads.clicks_model import ClicksDense

SMALL = ClickStreamConfig(users=400, items_initial=80, item_capacity=1_000, categories=12,
                          seed=5)
QUALITY = QualityConfig(logloss_rise=0.15, auc_drop=0.05, probe_events=1500, min_events=500)


@pytest.fixture(scope="module")
def model():
    return ekko.compile_model("examples/clicks.ekko")


class Loop:
    """The online loop: predict-free training through ekko, true labels observed."""

    def __init__(self, engine, dense, stream):
        self.engine, self.dense, self.stream = engine, dense, stream
        self.emb = ekko.torch.EmbeddingBags(engine)
        self.opt = torch.optim.Adam(dense.parameters(), lr=3e-3)

    def run(self, batches: int, flip: bool = False) -> None:
        for _ in range(batches):
            b = self.stream.next_batch(128)
            sparse, x, y = b.sparse(), torch.from_numpy(b.x), torch.from_numpy(b.y)
            self.engine.observe(sparse, x, y)
            target = 1.0 - y if flip else y
            loss = F.binary_cross_entropy_with_logits(self.dense(self.emb(sparse), x), target)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            self.engine.publish_dense()


def engine_for(model, dense):
    return ekko.Engine(model, replicas=2, dense=dense, health=HealthConfig(quality=QUALITY))


def warm(model, seed: int = 0):
    torch.manual_seed(seed)
    dense = ClicksDense()
    engine = engine_for(model, dense).start()
    loop = Loop(engine, dense, ClickStream(SMALL))
    loop.run(40)
    engine.flush()
    assert engine.check()  # the first healthy mark
    return engine, dense, loop


def test_a_clean_run_passes_every_check(model) -> None:
    engine, _, loop = warm(model)
    try:
        for _ in range(6):
            loop.run(10)
            engine.flush()
            assert engine.check(), engine.stats()["quality"]
        s = engine.stats()
        assert not s["rollbacks"] and s["quality"]["probe_events"] >= QUALITY.min_events
        assert set(s["quality"]["marks"]) == {0, 1}
    finally:
        engine.close()


def test_a_corrupted_dense_snapshot_is_detected_and_the_module_rolled_back(model) -> None:
    engine, dense, loop = warm(model, seed=1)
    try:
        healthy = {k: v.clone() for k, v in dense.state_dict().items()}
        with torch.no_grad():  # finite, but every prediction now says "click"
            dense.mlp[2].bias += 6.0
        engine.publish_dense()
        engine.flush()
        assert not engine.check()
        rolled = engine.stats()["rollbacks"]
        assert [r["table"] for r in rolled if r["table"] == "dense"] == ["dense"]
        assert "log-loss" in rolled[-1]["reason"] or "AUC" in rolled[-1]["reason"] \
            or "shift" in rolled[-1]["reason"]
        for k, v in dense.state_dict().items():  # the trainer's module is the mark's again
            assert torch.equal(v, healthy[k]), k
        engine.flush()
        assert engine.check()  # quality is back
        assert all(r.dense.version == engine.dense_version for r in engine.replicas)
    finally:
        engine.close()


def test_poisoned_training_is_detected_and_rolled_back(model) -> None:
    engine, dense, loop = warm(model, seed=2)
    try:
        loop.run(25, flip=True)  # a burst of flipped labels
        engine.flush()
        assert not engine.check()
        tables = {r["table"] for r in engine.stats()["rollbacks"]}
        assert {"dense", "item", "user"} <= tables
        engine.flush()
        assert engine.check()
    finally:
        engine.close()


def test_a_moderate_gradient_blow_up_passes_the_norm_check_but_not_the_quality_check(
        tmp_path) -> None:
    """With SGD a large gradient moves rows far (Adagrad's first step would normalize it)."""
    text = Path("examples/clicks.ekko").read_text()
    path = tmp_path / "clicks_sgd.ekko"
    path.write_text(text.replace("optimizer adagrad(lr=0.05, eps=1e-10);", "optimizer sgd(lr=0.05);"))
    model = ekko.compile_model(path)
    engine, dense, loop = warm(model, seed=3)
    try:
        rows = model.table("item").rows
        grads = np.random.default_rng(0).standard_normal((rows, 16)).astype(np.float32) * 50
        engine.step("item", np.arange(rows), grads)  # under the 1000x outlier bar
        assert not engine.stats()["rollbacks"]
        engine.flush()
        assert not engine.check()
        assert "item" in {r["table"] for r in engine.stats()["rollbacks"]}
        engine.flush()
        assert engine.check()
    finally:
        engine.close()


def test_quality_needs_its_parts(model) -> None:
    with pytest.raises(EkkoError, match="need a dense module"):
        ekko.Engine(model, health=HealthConfig(quality=QualityConfig()))
    with pytest.raises(EkkoError, match="quality must be a QualityConfig"):
        ekko.Engine(model, dense=ClicksDense(), health=HealthConfig(quality={"a": 1}))
    for kw in (dict(probe_events=10), dict(output="odds"), dict(min_events=1),
               dict(logloss_rise=float("nan"))):
        with pytest.raises(EkkoError):
            QualityConfig(**kw)
    stream = ClickStream(SMALL)
    b = stream.next_batch(8)
    with ekko.Engine(model, replicas=1, dense=ClicksDense()) as engine:
        with pytest.raises(EkkoError, match="observe.. feeds the quality checks"):
            engine.observe(b.sparse(), b.x, b.y)
    with engine_for(model, ClicksDense()) as engine:
        with pytest.raises(EkkoError, match="labels must be 0 or 1"):
            engine.observe(b.sparse(), b.x, b.y + 2)
        with pytest.raises(EkkoError, match="8 labels for 3 rows"):
            engine.observe(b.sparse(), b.x[:3], b.y)
        with pytest.raises(EkkoError, match="feature user: id"):
            engine.observe({**b.sparse(), "user": (b.user + 10**6, np.arange(9))}, b.x, b.y)
        assert engine.probe.events == 0
        assert engine.check()  # too few events to judge: passes


def test_the_probe_keeps_the_newest_events() -> None:
    probe = Probe(100)
    for k in range(10):
        probe.add(k, None, np.zeros(30))
    assert probe.events == 120 and [b[0] for b in probe.batches()] == [6, 7, 8, 9]


def test_checks_racing_the_trainers_observe_train_and_publish(model) -> None:
    """A checker thread calls check() while the trainer observes, trains and publishes:
    the probe, the marks and the dense snapshots are shared. Nothing may raise, and after
    the race the replicas still predict exactly what the trainer does."""
    import threading

    # bars no probe can cross: a rollback writes the trainer's module, which only the
    # trainer's own thread may do (docs/engine.md); this race is about the shared state
    lenient = QualityConfig(logloss_rise=100.0, auc_drop=1.0, max_shift=1e9,
                            probe_events=1500, min_events=500)
    torch.manual_seed(4)
    dense = ClicksDense()
    engine = ekko.Engine(model, replicas=2, dense=dense,
                         health=HealthConfig(quality=lenient, mark_lag=2)).start()
    loop = Loop(engine, dense, ClickStream(SMALL))
    loop.run(10)
    stop, errors, checks = threading.Event(), [], [0]

    def checker() -> None:
        try:
            while not stop.is_set():
                engine.check()
                checks[0] += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    thread = threading.Thread(target=checker)
    thread.start()
    try:
        loop.run(30)
    finally:
        stop.set()
        thread.join()
        engine.flush()
    try:
        assert not errors and checks[0] > 0 and not engine.stats()["rollbacks"]
        b = loop.stream.next_batch(64)
        sparse, x = b.sparse(), torch.from_numpy(b.x)
        with torch.no_grad():
            want = dense(loop.emb(sparse), x)
        assert all(torch.equal(r.predict(sparse, x), want) for r in engine.replicas)
    finally:
        engine.close()
