"""The engine carries the dense part and predicts: Engine(dense=), publish_dense, predict.

The contract of the ML loop: train through ekko.torch and a torch optimizer,
publish the dense weights, flush; then every replica's prediction equals the
trainer's own (f32 serving). Snapshots travel on the links and follow each
replica's policy; a refused or non-finite one never passes for fresh.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ekko
from ekko.engine import SchedulerConfig
from ekko.engine.dense import DenseError
from ekko.engine.scheduler import ManualClock
from ekko.kernels.errors import EkkoError
from ekko.workloads.clicks import ClickStream, ClickStreamConfig
from ekko.workloads.clicks_model import ClicksDense

SMALL = ClickStreamConfig(users=500, items_initial=100, item_capacity=2_000, categories=16,
                          seed=3)


@pytest.fixture(scope="module")
def model():
    return ekko.compile_model("examples/clicks.ekko")


def batch(stream: ClickStream, n: int = 64):
    b = stream.next_batch(n)
    return b.sparse(), torch.from_numpy(b.x), torch.from_numpy(b.y)


def train(engine, dense, stream, steps: int, publish: bool = True) -> None:
    emb = ekko.torch.EmbeddingBags(engine)
    opt = torch.optim.SGD(dense.parameters(), lr=0.05)
    for _ in range(steps):
        sparse, x, y = batch(stream)
        loss = F.binary_cross_entropy_with_logits(dense(emb(sparse), x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if publish:
            engine.publish_dense()


def trainer_prediction(engine, dense, sparse, x) -> torch.Tensor:
    with torch.no_grad():
        return dense(ekko.torch.EmbeddingBags(engine)(sparse), x)


def test_the_contract_replicas_predict_what_the_trainer_does(model) -> None:
    torch.manual_seed(0)
    dense, stream = ClicksDense(), ClickStream(SMALL)
    with ekko.Engine(model, replicas=2, dense=dense) as engine:
        train(engine, dense, stream, 12)
        engine.flush()
        sparse, x, _ = batch(stream, 100)
        want = trainer_prediction(engine, dense, sparse, x)
        for r in engine.replicas:
            got = r.predict(sparse, x)
            assert got.shape == (100,) and torch.equal(got, want), r.index
        assert torch.equal(engine.predict(sparse, x), want)
        s = engine.stats()["dense"]
        assert s["published"] == 13 and s["held"] == [13, 13]  # the initial one + 12
        assert s["bytes_sent"] > 0 and s["freshness_ms"]["count"] >= 2


def test_before_flush_a_replica_runs_one_whole_older_snapshot() -> None:
    """A replica on a periodic link keeps the old snapshot until its tick; the other
    (priority) gets each at once. Per-replica scheduler configs."""
    model = ekko.compile_model("examples/clicks.ekko")
    torch.manual_seed(1)
    dense, stream, clock = ClicksDense(), ClickStream(SMALL), ManualClock()
    configs = [SchedulerConfig(), SchedulerConfig(policy="periodic", interval_s=10.0, clock=clock)]
    with ekko.Engine(model, replicas=2, dense=dense, scheduler=configs) as engine:
        clock.advance(10.0)  # the first tick brings the initial snapshot
        _wait(lambda: engine.replicas[1].dense.version == 1)
        sparse, x, _ = batch(stream, 50)
        before = trainer_prediction(engine, dense, sparse, x)
        train(engine, dense, stream, 3)
        _wait(lambda: engine.replicas[0].dense.version == 4)
        assert engine.replicas[1].dense.version == 1
        # replica 1 serves version 1's weights on its (also old) rows: the old prediction
        assert torch.equal(engine.replicas[1].predict(sparse, x), before)
        clock.advance(10.0)
        engine.flush()
        assert engine.replicas[1].dense.version == 4
        assert torch.equal(engine.replicas[1].predict(sparse, x),
                           trainer_prediction(engine, dense, sparse, x))


def test_dense_every_publishes_on_the_engines_cadence(model) -> None:
    dense, stream = ClicksDense(), ClickStream(SMALL)
    with ekko.Engine(model, replicas=1, dense=dense, dense_every=4) as engine:
        train(engine, dense, stream, 5, publish=False)  # 5 backwards x 3 tables = 15 steps
        assert engine.dense_version == 1 + 15 // 4
        engine.flush()
        assert engine.replicas[0].dense.version == engine.dense_version
    with ekko.Engine(model, replicas=1, dense=dense, dense_every_ms=1e-6) as engine:
        train(engine, dense, stream, 2, publish=False)
        assert engine.dense_version == 1 + 6  # every step is due


def test_a_non_finite_weight_is_never_published(model) -> None:
    dense, stream = ClicksDense(), ClickStream(SMALL)
    with ekko.Engine(model, replicas=2, dense=dense) as engine:
        train(engine, dense, stream, 2)
        engine.flush()
        sparse, x, _ = batch(stream)
        good = engine.replicas[0].predict(sparse, x)
        with torch.no_grad():
            dense.mlp[0].weight[3, 1] = float("nan")
        with pytest.raises(DenseError, match="mlp.0.weight.*non-finite"):
            engine.publish_dense()
        engine.flush()
        assert engine.dense_version == 3 and engine.stats()["dense"]["held"] == [3, 3]
        assert torch.equal(engine.replicas[0].predict(sparse, x), good)


def test_a_refused_snapshot_fails_flush_instead_of_passing_for_fresh(model, monkeypatch) -> None:
    dense = ClicksDense()
    with ekko.Engine(model, replicas=2, dense=dense) as engine:
        engine.flush()
        r1 = engine.replicas[1]

        def refuse(blob):
            raise DenseError("dense snapshot is damaged (CRC mismatch)")
        monkeypatch.setattr(r1, "install_dense", refuse)
        engine.publish_dense()
        with pytest.raises(EkkoError, match="replica 1 refused dense snapshot 2.*CRC"):
            engine.flush(timeout=30)
        monkeypatch.undo()
        engine.publish_dense()  # a newer one that arrives settles it
        engine.flush(timeout=30)
        assert engine.stats()["dense"]["held"] == [3, 3]


def test_predictions_racing_training_and_publishes(model) -> None:
    """Readers predict on both replicas while the trainer trains and publishes: every
    prediction is finite and of the right shape (a torn row or a half-swapped module
    would raise or leave NaN in the output's shape checks)."""
    torch.manual_seed(2)
    dense, stream = ClicksDense(), ClickStream(SMALL)
    sparse, x, _ = batch(ClickStream(SMALL), 40)
    stop, errors, done = threading.Event(), [], [0]
    with ekko.Engine(model, replicas=2, dense=dense) as engine:
        def reader(i: int) -> None:
            try:
                while not stop.is_set():
                    out = engine.replicas[i].predict(sparse, x)
                    assert out.shape == (40,) and torch.isfinite(out).all()
                    done[0] += 1
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=reader, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        try:
            train(engine, dense, stream, 15)
        finally:
            stop.set()
            for t in threads:
                t.join()
        engine.flush()
        assert not errors and done[0] > 0
        want = trainer_prediction(engine, dense, sparse, x)
        assert all(torch.equal(r.predict(sparse, x), want) for r in engine.replicas)


@pytest.mark.parametrize("kw, message", [
    (dict(dense=object()), "dense must be a torch.nn.Module"),
    (dict(dense_every=3), "need a dense module"),
    (dict(dense=torch.nn.Linear(2, 2), dense_every=0), "dense_every must be a positive"),
    (dict(dense=torch.nn.Linear(2, 2), dense_every_ms=float("nan")), "dense_every_ms"),
    (dict(scheduler=[SchedulerConfig()]), "1 configs for 2 replicas"),
    (dict(scheduler=["priority", "fifo"]), "SchedulerConfig or a list"),
])
def test_bad_engine_arguments_are_refused(model, kw, message) -> None:
    with pytest.raises(EkkoError, match=message):
        ekko.Engine(model, replicas=2, **kw)


def test_bad_prediction_input_names_what_is_wrong(model) -> None:
    dense, stream = ClicksDense(), ClickStream(SMALL)
    sparse, x, _ = batch(stream, 8)
    with ekko.Engine(model, replicas=1) as engine:
        with pytest.raises(EkkoError, match="no dense module"):
            engine.predict(sparse, x)
        with pytest.raises(EkkoError, match="no dense module"):
            engine.replicas[0].predict(sparse, x)
        with pytest.raises(EkkoError, match="no dense module"):
            engine.publish_dense()
    with ekko.Engine(model, replicas=1, dense=dense) as engine:
        engine.flush()
        r = engine.replicas[0]
        ids, offsets = sparse["user"]
        cases = [
            ({**sparse, "user": (ids + 10**6, offsets)}, x, "feature user: id .* out of range"),
            ({**sparse, "nope": (ids, offsets)}, x, "nope"),
            ({**sparse, "user": (ids, offsets[:-1])}, x, "feature user: offsets"),
            ([1, 2], x, "sparse input is"),
            (sparse, x[:, :2], "dense module .* failed"),  # the module's own shape error
            (sparse, x.numpy().astype(np.int32), "x must be floats"),
            (sparse, x[0], r"x must be floats of shape \(B, n\)"),
            ({k: v for k, v in sparse.items() if k != "item"}, x, "dense module .* failed"),
        ]
        for bad_sparse, bad_x, message in cases:
            with pytest.raises(EkkoError, match=message):
                r.predict(bad_sparse, bad_x)
        assert torch.isfinite(r.predict(sparse, x)).all()  # still serving


def _wait(cond, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("policy", ["priority", "fifo", "periodic", "full"])
def test_a_budgeted_link_carries_a_snapshot_alone_under_every_policy(model, policy) -> None:
    """A publish with no rows waiting: the link sends the snapshot by itself (a link
    that expected rows in every batch died on this)."""
    clock = ManualClock()
    dense = ClicksDense()
    config = SchedulerConfig(policy=policy, bandwidth=1e7, interval_s=1.0, clock=clock)
    with ekko.Engine(model, replicas=1, dense=dense, scheduler=config) as engine:
        for _ in range(3):
            with torch.no_grad():
                dense.mlp[2].bias += 1.0
            engine.publish_dense()
            clock.advance(1.0)
            engine.flush(timeout=60)
        assert engine.replicas[0].dense.version == 4
        assert engine.links[0].running and not engine.links[0].errors


def test_the_main_jobs_online_loop_runs_and_reports(tmp_path) -> None:
    """scripts/run.sh's job, briefly: it must say the replicas match the trainer (it
    exits non-zero when they do not) and print every report line."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "examples/online_clicks.py", "--seconds", "4",
                          "--check-every", "1"], cwd=root, capture_output=True, text=True,
                         timeout=600, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    for line in ("trainer", "replica 0", "replica 1", "freshness p50", "dense:", "health:"):
        assert line in out, out
    assert "predict exactly what the trainer does: True" in out
    bad = subprocess.run([sys.executable, "examples/online_clicks.py", "--seconds", "-1"],
                         cwd=root, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "must be positive" in bad.stderr and "Traceback" not in bad.stderr


def test_the_guides_example_runs_its_own_checks() -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "examples/torch_recommender.py"], cwd=root,
                         capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "max |diff| 0.00e+00" in res.stdout and "predict exactly" in res.stdout


def test_load_table_starts_from_trained_rows_and_refuses_bad_ones(tmp_path) -> None:
    path = tmp_path / "m.ekko"
    path.write_text("model m { table a { rows 10; dim 4; serving int8; optimizer sgd(lr=0.1); }"
                    " feature fa -> a pooling sum; }")
    model = ekko.compile_model(path)
    w = torch.randn(10, 4)
    model.load_table("a", w)
    buf = model.tables["a"]
    assert np.array_equal(buf.master, w.numpy()) and not buf.versions.any()
    assert np.array_equal(buf.serving, ekko.quantize_rows(w.numpy(), "int8"))
    for bad, message in ((torch.randn(9, 4), "shape"), (np.ones((10, 4), np.int32), "floats"),
                         (np.full((10, 4), np.nan, np.float32), "non-finite")):
        with pytest.raises(EkkoError, match=message):
            model.load_table("a", bad)
    with pytest.raises(EkkoError, match="no table"):
        model.load_table("nope", w)
    assert np.array_equal(buf.master, w.numpy())  # nothing of the refused loads written


@pytest.mark.parametrize("policy", ["priority", "fifo", "periodic"])
def test_snapshots_published_faster_than_the_budget_refills_do_not_starve_the_rows(
        model, policy) -> None:
    """The link's choices, driven by hand (its thread never starts): each stream step
    commits rows and publishes a snapshot larger than a step's refill. A snapshot
    charged ahead of every batch kept the bucket in debt and no row was ever chosen."""
    clock = ManualClock()
    dense, stream = ClicksDense(), ClickStream(SMALL)
    snapshot = len(ekko.engine.dense.take_snapshot(dense, 1).to_bytes())
    config = SchedulerConfig(policy=policy, bandwidth=snapshot, interval_s=0.25, clock=clock)
    engine = ekko.Engine(model, replicas=1, dense=dense, scheduler=config)  # not started
    link = engine.links[0]
    emb = ekko.torch.EmbeddingBags(engine)
    rows = snapshots = 0
    for _ in range(24):
        sparse, x, y = batch(stream, 32)
        F.binary_cross_entropy_with_logits(dense(emb(sparse), x), y).backward()
        engine.publish_dense()
        clock.advance(0.25)  # refills a quarter of a snapshot
        with link.cond:
            if link._ready():
                snapshots += link._take_dense() is not None
                rows += sum(len(b[1]) for b in link._select())
    assert snapshots >= 2 and rows > 0, (snapshots, rows)
    assert link.rows_charged >= link.dense_charged - snapshot


def test_a_replica_process_restores_its_snapshot_file_and_sets_a_damaged_one_aside(
        model, tmp_path) -> None:
    """ReplicaServer._restore_dense as a restarted replica process runs it (no Ray
    needed): the file it kept is installed; a damaged one is set aside, named in the
    answer, and the replica serves the engine's first snapshot meanwhile."""
    from types import SimpleNamespace

    from ekko.engine.actors import DENSE_FILE, ReplicaServer
    from ekko.engine.dense import take_snapshot
    from ekko.engine.replica import Replica

    dense = ClicksDense()
    first = take_snapshot(dense, 1).to_bytes()
    with torch.no_grad():
        dense.mlp[2].bias += 1.0
    kept = take_snapshot(dense, 7).to_bytes()
    snapshot = {t.name: (np.zeros((0, 1), np.float32), np.zeros(0, np.int64))
                for t in model.model.tables}

    def restarted() -> SimpleNamespace:
        server = SimpleNamespace(dir=tmp_path, config=SimpleNamespace(dense_initial=first),
                                 replica=Replica(0, model, snapshot, {}, dense))
        server.damage = ReplicaServer._restore_dense(server)
        return server

    (tmp_path / DENSE_FILE).write_bytes(kept)
    good = restarted()
    assert good.damage is None and good.replica.dense.version == 7
    (tmp_path / DENSE_FILE).write_bytes(kept[:40] + bytes([kept[40] ^ 0xFF]) + kept[41:])
    bad = restarted()
    assert "CRC mismatch" in bad.damage and bad.replica.dense.version == 1
    assert not (tmp_path / DENSE_FILE).exists()
    assert (tmp_path / (DENSE_FILE + ".damaged")).read_bytes()[:40] == kept[:40]


class _Head(torch.nn.Module):
    """A dense part over one pooled feature: enough to train the table through ekko."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 1)

    def forward(self, pooled, x):
        return self.lin(pooled["f"]).squeeze(-1)


# per value: the rounding docs/torch.md states for each quantized serving layout (w the
# master row's values, lo..hi its range)
_ROUNDING = {
    "f16": lambda w, lo, hi: np.abs(w) * 2.0 ** -11,
    "bf16": lambda w, lo, hi: np.abs(w) * 2.0 ** -8,
    # E4M3: 3 mantissa bits; its subnormal step is 2^-9 of the row's scale (amax / 448)
    "fp8": lambda w, lo, hi: (np.abs(w) * 2.0 ** -4
                              + np.maximum(np.abs(lo), np.abs(hi)) / 448 * 2.0 ** -9),
    "int8": lambda w, lo, hi: np.broadcast_to((hi - lo) / 255 / 2, w.shape),
    "int4": lambda w, lo, hi: np.broadcast_to((hi - lo) / 15 / 2, w.shape),
}


@pytest.mark.parametrize("layout", sorted(_ROUNDING))
def test_quantized_serving_stays_within_the_documented_rounding(tmp_path, layout: str) -> None:
    """After flush a replica pools from its quantized copy of the trained rows: each pooled
    value is within the sum, over the bag, of the rounding docs/torch.md states for the
    layout, and the replica's prediction is the head's on those pooled values."""
    path = tmp_path / "q.ekko"
    path.write_text(f"model q {{ table t {{ rows 300; dim 8; serving {layout}; "
                    "optimizer adagrad(lr=0.1); } feature f -> t pooling sum; }")
    model = ekko.compile_model(path)
    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    head = _Head()
    with ekko.Engine(model, replicas=1, dense=head) as engine:
        emb = ekko.torch.EmbeddingBags(engine)
        for _ in range(20):
            ids = rng.integers(0, 300, 64 * 6)
            sparse = {"f": (ids, np.arange(0, len(ids) + 1, 6))}
            y = torch.from_numpy((rng.random(64) < 0.3).astype(np.float32))
            F.binary_cross_entropy_with_logits(head(emb(sparse), None), y).backward()
        engine.publish_dense()
        engine.flush()
        ids = np.concatenate([[0, 299], rng.integers(0, 300, 40 * 25 - 2)])
        offsets = np.arange(0, len(ids) + 1, 25)
        with torch.no_grad():
            exact = emb({"f": (ids, offsets)})["f"].numpy().astype(np.float64)
        replica = engine.replicas[0]
        got = np.asarray(replica.lookup("f", ids, offsets, include_last_offset=True), np.float64)
        w = engine.primary.tables["t"].buf.master.astype(np.float64)
        lo, hi = w.min(1, keepdims=True), w.max(1, keepdims=True)
        per_row = _ROUNDING[layout](w, lo, hi)
        bound = np.add.reduceat(per_row[ids], offsets[:-1], axis=0)
        assert np.abs(got - exact).max() > 0  # the layout does round
        assert (np.abs(got - exact) <= bound + 1e-5 * np.abs(exact) + 1e-6).all()
        prediction = replica.predict({"f": (ids, offsets)}, None)
        with torch.no_grad():
            want = head({"f": torch.from_numpy(got.astype(np.float32))}, None)
        torch.testing.assert_close(prediction, want, rtol=1e-5, atol=1e-6)
