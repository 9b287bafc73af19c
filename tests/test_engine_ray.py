"""The engine across processes on Ray: replicas and primary shards killed with SIGKILL.

One local Ray session serves every test of `TestLocal` (starting Ray costs
seconds on the 2-core machine); `test_packets_cross_nodes` then starts Ray's
multi-node test cluster. Every test checks the replicas against the primary
byte for byte, or the primary against an in-process reference that applied
the same steps, so a lost, doubled or stale update fails it. The snapshot
and replay tests of a primary shard need no Ray: they run one in this
process (the log's and snapshots' damage tests: tests/test_durable.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import ekko
from ekko.engine import Gathered, HealthConfig
from ekko.engine.actors import ShardConfig, ShardServer, shard_bounds, shard_model
from ekko.engine.packet import Packet
from ekko.engine.primary import Primary
from ekko.kernels.errors import EkkoError
from tests.cluster_model import MODEL_WITH_FP8 as MODEL, WAIT

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ray") / "small.ekko"
    path.write_text(MODEL)
    return path


@pytest.fixture(scope="module")
def model(model_path):
    return ekko.compile_model(model_path)


class Stream:
    """A seeded trainer stream; remembers every step so a reference can replay it."""

    def __init__(self, model, seed: int = 0):
        self.tables = list(model.model.tables)
        self.rng = np.random.default_rng(seed)
        self.steps: list[tuple[str, np.ndarray, np.ndarray]] = []

    def step(self, engine, n: int = 40) -> None:
        """One step per table; every other table's gradient goes as a `Gathered` delta
        (the transport writes its rows out before logging and splitting by shard)."""
        for k, t in enumerate(self.tables):
            ids = self.rng.integers(0, t.rows, n)
            ids[0] = t.rows - 1
            grads = (self.rng.standard_normal((n, t.dim)) * 0.1).astype(np.float32)
            if (len(self.steps) + k) % 2:
                index = self.rng.integers(0, 5, n)
                engine.step(t.name, ids, Gathered(grads[:5].copy(), index))
                grads = grads[:5][index]
            else:
                engine.step(t.name, ids, grads)
            self.steps.append((t.name, ids, grads))


def assert_replicas_match(engine) -> None:
    for r in engine.replicas:
        for name in engine.primary.tables:
            assert r.serving(name).tobytes() == engine.primary.serving(name).tobytes(), \
                (r.index, name)
            assert np.array_equal(r.versions(name), engine.primary.versions(name)), (r.index, name)


def reference(model, steps, shards: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The serving rows and versions the shards must hold: the same steps, in this process."""
    parts = [Primary(ekko.compile_model(shard_model(model.model, k, shards)), seed=seed + k)
             for k in range(shards)]
    for table, ids, grads in steps:
        b = shard_bounds(model.table(table).rows, shards)
        which = np.searchsorted(b, ids, side="right") - 1
        for k in np.unique(which):
            parts[k].step(table, ids[which == k] - b[k], grads[which == k])
    out = {}
    for t in model.model.tables:
        n = len(shard_bounds(t.rows, shards)) - 1
        out[t.name] = (np.concatenate([parts[k].serving(t.name) for k in range(n)]),
                       np.concatenate([parts[k].versions(t.name) for k in range(n)]))
    return out


def wait_for(what, timeout: float = WAIT, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s")


@contextlib.contextmanager
def streaming(engine, stream: Stream):
    """A trainer thread stepping `stream` while the block runs; its errors fail the test."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            while not stop.is_set():
                stream.step(engine, 20)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    trainer = threading.Thread(target=run)
    trainer.start()
    try:
        yield
    finally:
        stop.set()
        trainer.join(WAIT)
    assert not errors, errors


def new_pid(replica, old: int) -> int:
    def probe():
        try:
            pid = replica.pid
        except EkkoError:
            return None
        return pid if pid != old else None
    return wait_for(probe)


def shard_pid(engine, k: int) -> int | None:
    try:
        return engine.primary.pids[k]
    except EkkoError:
        return None


def test_in_process_engine_never_imports_ray(model_path: Path) -> None:
    import subprocess
    import sys

    code = f"""
import sys, ekko, numpy as np
m = ekko.compile_model({str(model_path)!r})
try:
    ekko.Engine(m, primary_shards=2)
except ekko.EkkoError as e:
    print("rejected:", e)
with ekko.Engine(m, replicas=1) as engine:
    engine.step("a", [1], np.full((1, 8), 0.5, np.float32))
    engine.flush()
print("ray imported:", "ray" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=WAIT)
    assert out.returncode == 0, out.stderr
    assert "rejected: primary_shards: only with cluster=" in out.stdout
    assert "ray imported: False" in out.stdout


# -- primary shards and arguments, without Ray (the log's own tests: tests/test_durable.py) --
@pytest.mark.parametrize("kw, message", [
    ({"chunk_rows": 0}, "chunk_rows must be a positive integer, got 0"),
    ({"chunk_rows": 1.5}, "chunk_rows must be a positive integer, got 1.5"),
    ({"chunk_rows": True}, "chunk_rows must be a positive integer, got True"),
    ({"replicas": -1}, "replicas must be a positive integer, got -1"),
    ({"primary_shards": "2"}, "primary_shards must be a positive integer, got '2'"),
])
def test_bad_cluster_arguments_are_refused_before_ray_starts(model, kw, message) -> None:
    with pytest.raises(EkkoError, match=re.escape(message)):
        ekko.Engine(model, cluster="local", **kw)


def test_a_restarted_shard_replays_its_snapshot_and_log_to_the_same_bytes(model, tmp_path) -> None:
    cfg = ShardConfig(model.model, 0, 1, str(tmp_path / "primary-0"), seed=3)
    shard = ShardServer(cfg)
    rng = np.random.default_rng(2)
    steps = []
    for i in range(12):
        for t in model.model.tables:
            ids = rng.integers(0, t.rows, 30)
            grads = (rng.standard_normal((30, t.dim)) * 0.1).astype(np.float32)
            shard.step(t.name, i + 1, ids, grads)
            steps.append((t.name, ids, grads))
        if i == 5:
            shard.snapshot()
    # no close: the next one starts as after a kill -9
    again = ShardServer(cfg)
    assert again.replayed["records"] == 6 * len(model.model.tables)
    assert again.replayed["snapshot_version"] == {t.name: 6 for t in model.model.tables}
    want = reference(model, steps, 1, seed=3)
    for t in model.model.tables:
        serving, versions = again.serving(t.name)
        assert serving.tobytes() == want[t.name][0].tobytes()
        assert np.array_equal(versions, want[t.name][1])
    # a retried step (same sequence number) is answered, not applied twice
    t = model.model.tables[0]
    before = again.serving(t.name)[0].tobytes()
    res = again.step(t.name, 12, *steps[-len(model.model.tables)][1:])  # its last step
    assert res.duplicate and again.serving(t.name)[0].tobytes() == before
    # history before the snapshot is gone: a replica that far behind copies the shard
    packets, upto, whole = again.since(t.name, 2)
    assert whole and upto == 12 and sum(len(p) for p in packets) == t.rows
    for u in model.model.tables:  # a whole-shard copy slices rows: the same bytes as packing
        want = again.pack(u.name, np.arange(u.rows))
        for lo, hi in ((0, u.rows), (3, 17), (u.rows - 1, u.rows), (5, 5)):
            got = again.pack_range(u.name, lo, hi)
            assert got.ids.tolist() == want.ids[lo:hi].tolist()
            assert got.rows.tobytes() == want.rows[lo:hi].tobytes(), u.name
            assert got.versions.tolist() == want.versions[lo:hi].tolist()
    with pytest.raises(EkkoError, match="outside"):
        again.pack_range(t.name, 0, t.rows + 1)
    packets, upto, whole = again.since(t.name, 10)
    assert not whole and 0 < sum(len(p) for p in packets) < t.rows


def _shard_steps(model, shard, rng):
    """steps(n): n rounds of one 20-id step on every table of `shard`, numbered on."""
    seq = dict.fromkeys([t.name for t in model.model.tables], 0)

    def steps(n: int) -> None:
        for _ in range(n):
            for t in model.model.tables:
                seq[t.name] += 1
                shard.step(t.name, seq[t.name], rng.integers(0, t.rows, 20),
                           (rng.standard_normal((20, t.dim)) * 0.1).astype(np.float32))
    return steps


def test_check_marks_and_rollbacks_are_logged_and_replayed(model, tmp_path) -> None:
    """Engine.check() on Ray marks shards healthy or rolls them back: a replay must too."""
    cfg = ShardConfig(model.model, 0, 1, str(tmp_path / "primary-0"), seed=3)
    shard = ShardServer(cfg)
    rng = np.random.default_rng(4)
    steps = _shard_steps(model, shard, rng)

    steps(3)
    assert all(len(ids) for ids in shard.changed().values())
    healthy = shard.mark_healthy()
    assert not any(len(ids) for ids in shard.changed().values())
    a = model.model.tables[0].name
    marked = shard.serving(a)[0].copy()
    steps(2)
    commit, record = shard.rollback(a, "the score hook said so")
    assert commit is not None and record["undone_versions"] == (healthy[a] + 1, healthy[a] + 2)
    assert shard.serving(a)[0].tobytes() == marked.tobytes()
    assert shard.rollback(a, "again") == (None, None)  # nothing left to undo
    steps(2)
    live = {t.name: shard.serving(t.name) for t in model.model.tables}
    again = ShardServer(cfg)  # as after a kill -9
    for t in model.model.tables:
        got = again.serving(t.name)
        assert got[0].tobytes() == live[t.name][0].tobytes(), t.name
        assert np.array_equal(got[1], live[t.name][1]), t.name
    # the replayed undo logs match too: the same rows would be rolled back
    for name, ids in shard.changed().items():
        assert np.array_equal(np.sort(again.changed()[name]), np.sort(ids)), name


def test_a_lagged_mark_is_replayed_the_same(model, tmp_path) -> None:
    """mark_lag=2 on a shard: two marks, more steps, a kill: the replayed shard goes back
    as far as the live one would (the undo log's epochs are rebuilt from the log)."""
    cfg = ShardConfig(model.model, 0, 1, str(tmp_path / "primary-0"), seed=5, mark_lag=2)
    shard = ShardServer(cfg)
    steps = _shard_steps(model, shard, np.random.default_rng(6))
    a = model.model.tables[0].name

    steps(2)
    shard.mark_healthy()
    first = shard.serving(a)[0].copy()  # the mark a rollback returns to (two marks back)
    steps(2)
    shard.mark_healthy()
    steps(2)
    again = ShardServer(cfg)  # as after a kill -9: the log replays both marks
    for name, ids in shard.changed().items():
        assert np.array_equal(np.sort(again.changed()[name]), np.sort(ids)), name
    for s in (shard, again):
        commit, _ = s.rollback(a, "harm")
        assert commit is not None and s.serving(a)[0].tobytes() == first.tobytes()


def _head():
    """A dense part for the small model; its class is made here, so cloudpickle sends it
    to the replica processes by value (they cannot import this test module)."""
    import torch

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8 + 16 + 9 + 2, 1)

        def forward(self, pooled, x):
            return self.lin(torch.cat([pooled["fa"], pooled["fd"], pooled["fh"], x], 1))

    return Head()


def _batch(rng: np.random.Generator, n: int) -> tuple[dict, object]:
    """n bags of 4 ids per feature of the small model, and dense context x (n, 2)."""
    import torch

    offsets = np.arange(0, 4 * n + 1, 4)
    sparse = {f: (rng.integers(0, rows, 4 * n), offsets)
              for f, rows in (("fa", 300), ("fd", 500), ("fh", 90))}
    return sparse, torch.from_numpy(rng.standard_normal((n, 2)).astype(np.float32))


# -- one local Ray session ------------------------------------------------------------------
@pytest.fixture(scope="class")
def local_ray():
    from ekko.engine.cluster import connect

    if ray.is_initialized():
        ray.shutdown()
    connect("local")
    yield
    ray.shutdown()


@pytest.mark.usefixtures("local_ray")
class TestLocal:
    def test_api_and_a_killed_replica_catches_up_while_the_other_serves(self, model) -> None:
        stream = Stream(model, seed=5)
        # a lookup waits at most 0.5 s, far less than a replica's restart (a process, imports,
        # the model's rebuild): the first lookup sent to the killed replica must fail
        with ekko.Engine(model, replicas=2, cluster="local", chunk_rows=64, lookup_timeout_s=0.5,
                         health=HealthConfig(outlier_factor=100.0, warmup=3)) as engine:
            assert isinstance(engine, ekko.Engine)
            joined = engine.replicas[1].info()["catch_ups"]  # every table copied in chunks
            assert sorted(t for c in joined for t in c["whole_shard"]) == \
                sorted(t.name for t in model.model.tables)
            assert sum(c["rows"] for c in joined) == sum(t.rows for t in model.model.tables)
            pids = [r.pid for r in engine.replicas]
            assert len(set(pids + [os.getpid()])) == 3  # separate processes
            initial = engine.primary.serving("a").tobytes()
            for _ in range(5):
                stream.step(engine)
            engine.flush(WAIT)
            assert_replicas_match(engine)
            # a harmful update is rolled back on its shard, and the replicas follow
            assert engine.primary.serving("a").tobytes() != initial
            grads = (np.random.default_rng(3).standard_normal((200, 8)) * 0.1).astype(np.float32)
            grads[7] *= 1e6  # one harmful row
            engine.step("a", np.arange(200), grads)
            assert [r["table"] for r in engine.stats()["rollbacks"]] == ["a"]
            assert engine.primary.serving("a").tobytes() == initial
            engine.flush(WAIT)
            assert_replicas_match(engine)
            # bad input: an EkkoError, and nothing applied anywhere
            before = engine.primary.versions("a").copy()
            for ids, grads in (([300], np.zeros((1, 8), np.float32)),
                               ([1, 2], np.zeros((1, 8), np.float32)),
                               ([1], np.zeros((1, 8), np.float64))):
                with pytest.raises(EkkoError):
                    engine.step("a", ids, grads)
            with pytest.raises(EkkoError):
                engine.step("nope", [1], np.zeros((1, 8), np.float32))
            with pytest.raises(EkkoError):
                engine.replicas[0].merge(b"EKKP garbage")
            assert np.array_equal(engine.primary.versions("a"), before)
            assert engine.stats()["rejected_steps"] == 4  # "nope" too, as in process
            engine.replicas[0].snapshot()
            for _ in range(3):
                stream.step(engine)

            # kill replica 0 while the stream runs; lookups go to replica 1 meanwhile
            with streaming(engine, stream):
                os.kill(pids[0], signal.SIGKILL)
                offsets = np.array([0, 3, 6], np.int64)
                for _ in range(20):
                    out = engine.lookup("fa", np.array([1, 2, 3, 4, 5, 299]), offsets)
                    assert out.shape == (2, 8) and np.isfinite(out).all()
                new_pid(engine.replicas[0], pids[0])
            engine.flush(WAIT)
            assert_replicas_match(engine)
            s = engine.stats()
            r0 = s["replicas"][0]
            assert s["restarts"]["replicas"] == [1, 0]
            # lookups went to replica 1 while replica 0 was down: counted as it happened, not
            # read from `down_since`, which is cleared again once the replica has caught up
            assert r0["lookups_routed_around"] >= 1
            assert r0["link_recoveries"] >= 1  # detached from its shard's link, then rejoined
            assert r0["restored_from_snapshot"]
            last = [c for c in r0["catch_ups"] if c["reason"] == "restart"][-1]
            assert not last["whole_shard"]  # from the model-update cache, not a copy
            assert 0 < last["rows"] <= sum(t.rows for t in model.model.tables)
            # lookups while nothing moves: every replica answers the primary's rows
            a = engine.primary.serving("a")
            for _ in range(4):
                out = engine.lookup("fa", np.array([7, 8, 299]), np.array([0, 3]))
                np.testing.assert_array_equal(out[0], a[[7, 8, 299]].sum(axis=0, dtype=np.float32))

    def test_a_killed_primary_shard_loses_no_acknowledged_update(self, model, tmp_path) -> None:
        stream = Stream(model, seed=9)
        with ekko.Engine(model, replicas=2, cluster="local", primary_shards=2, seed=4,
                         directory=tmp_path / "engine") as engine:
            for _ in range(4):
                stream.step(engine)
            engine.checkpoint()
            for _ in range(4):
                stream.step(engine)
            victim = engine.primary.pids[0]
            with streaming(engine, stream):
                time.sleep(0.5)
                os.kill(victim, signal.SIGKILL)
                wait_for(lambda: shard_pid(engine, 0) not in (None, victim))
                n = len(stream.steps)
                wait_for(lambda: len(stream.steps) > n + 6)  # the stream goes on after it
            engine.flush(WAIT)
            want = reference(model, stream.steps, 2, seed=4)
            for name, (serving, versions) in want.items():
                assert engine.primary.serving(name).tobytes() == serving.tobytes(), name
                assert np.array_equal(engine.primary.versions(name), versions), name
            assert_replicas_match(engine)
            s = engine.stats()
            assert s["restarts"]["primaries"] == [1, 0]
            replayed = s["replayed"][0]
            assert replayed["snapshot_version"] and replayed["records"] > 0
        engine.shutdown()
        for late in (lambda: engine.step("a", [1], np.zeros((1, 8), np.float32)), engine.check,
                     lambda: engine.lookup("fa", [1])):  # at once, not after timeout_s
            with pytest.raises(EkkoError, match="shut down"):
                late()
        # a new engine on that directory resumes from the shards' snapshots and logs
        with ekko.Engine(model, replicas=1, cluster="local", primary_shards=2, seed=4,
                         directory=tmp_path / "engine") as engine:
            for _ in range(2):
                stream.step(engine)
            engine.flush(WAIT)
            want = reference(model, stream.steps, 2, seed=4)
            for name, (serving, versions) in want.items():
                assert engine.primary.serving(name).tobytes() == serving.tobytes(), name
            assert_replicas_match(engine)
        engine.shutdown()

    @pytest.mark.parametrize("bandwidth", [None, 1e7])  # a group link; a link per replica
    def test_dense_snapshots_reach_replica_processes_and_survive_a_kill(self, model,
                                                                        bandwidth) -> None:
        """Replicas in their own processes predict with the newest snapshot after flush
        (what the module computes on their rows), and a killed one comes back with it."""
        import torch

        torch.manual_seed(4)
        head, stream = _head(), Stream(model, seed=9)
        sparse, x = _batch(np.random.default_rng(2), 3)

        def expected(replica) -> torch.Tensor:
            pooled = {f: torch.tensor(replica.lookup(f, ids, offsets,
                                                         include_last_offset=True))
                      for f, (ids, offsets) in sparse.items()}
            with torch.no_grad():
                return head(pooled, x)

        with ekko.Engine(model, replicas=2, cluster="local", dense=head, lookup_timeout_s=30.0,
                         scheduler=ekko.SchedulerConfig(bandwidth=bandwidth)) as engine:
            assert torch.equal(engine.replicas[1].predict(sparse, x), expected(engine.replicas[1]))
            for k in range(3):
                stream.step(engine)
                with torch.no_grad():
                    head.lin.weight += 0.1 * (k + 1)
                engine.publish_dense()
            engine.flush(WAIT)
            assert_replicas_match(engine)
            for r in engine.replicas:
                assert torch.equal(r.predict(sparse, x), expected(r)), r.index
            s = engine.stats()["dense"]
            assert s["published"] == 4 and s["held"] == [4, 4] and s["bytes_sent"] > 0
            with pytest.raises(EkkoError, match=r"feature fa: id \d+ at position 0 is out of range"):
                engine.predict({**sparse, "fa": (sparse["fa"][0] + 300, sparse["fa"][1])}, x)
            pid = engine.replicas[0].pid
            os.kill(pid, signal.SIGKILL)
            new_pid(engine.replicas[0], pid)
            engine.flush(WAIT)
            assert engine.stats()["dense"]["held"] == [4, 4]  # restored from its own file
            assert torch.equal(engine.replicas[0].predict(sparse, x), expected(engine.replicas[0]))
            with torch.no_grad():
                head.lin.bias += 1.0
            engine.publish_dense()
            engine.flush(WAIT)
            assert all(torch.equal(r.predict(sparse, x), expected(r)) for r in engine.replicas)
        engine.shutdown()

    def test_shutdown_ends_every_thread_that_calls_ray(self, model) -> None:
        """A replica killed under a running stream is detached and a thread waits for it to
        rejoin; shutting the engine down right then ends that thread too, and the
        watermark sender. Ray ends the whole process when any thread calls it after
        ray.shutdown(), which this class's fixture does next (it once killed a test run)."""
        engine_threads = ("ekko-rejoin", "ekko-watch", "ekko-watermarks", "ekko-link",
                          "ekko-anti-entropy")

        def left() -> list[str]:
            return [t.name for t in threading.enumerate() if t.name.startswith(engine_threads)]

        stream = Stream(model, seed=11)
        # not restarted: its rejoin thread keeps asking for it until the engine stops
        engine = ekko.Engine(model, replicas=2, cluster="local", max_restarts=0)
        with engine:
            for _ in range(3):
                stream.step(engine)
            engine.flush(WAIT)
            os.kill(engine.replicas[0].pid, signal.SIGKILL)
            wait_for(lambda: stream.step(engine) or any(n.startswith("ekko-rejoin") for n in left()))
        assert not left(), left()  # close() joined them
        engine.shutdown()
        assert not left(), left()

    def test_quality_checks_judge_replica_processes_and_roll_the_dense_part_back(
            self, model) -> None:
        """observe() keeps the probe here; the replicas predict it in their processes; a
        corrupted snapshot is judged harm and the trainer's module goes back to the mark."""
        import torch

        from ekko.engine.quality import QualityConfig

        torch.manual_seed(5)
        head, rng = _head(), np.random.default_rng(3)
        probe = [_batch(rng, 100) for _ in range(4)]
        health = HealthConfig(quality=QualityConfig(min_events=200, probe_events=400),
                              mark_lag=2)
        with ekko.Engine(model, replicas=2, cluster="local", dense=head, health=health,
                         lookup_timeout_s=30.0) as engine:
            for sparse, x in probe:  # labels the head predicts well: its own choices
                with torch.no_grad():
                    y = (engine.replicas[0].predict(sparse, x) > 0).float()
                engine.observe(sparse, x, y)
            assert engine.check() and engine.check()
            healthy = {k: v.clone() for k, v in head.state_dict().items()}
            with torch.no_grad():
                head.lin.weight.neg_()  # finite, and every prediction now wrong
            engine.publish_dense()
            engine.flush(WAIT)
            assert not engine.check()
            assert "dense" in {r["table"] for r in engine.stats()["rollbacks"]}
            assert all(torch.equal(v, healthy[k]) for k, v in head.state_dict().items())
            engine.flush(WAIT)
            assert engine.check()
            q = engine.stats()["quality"]
            assert set(q["replicas"]) == {0, 1} and q["probe_events"] == 400
        engine.shutdown()

    def test_check_and_the_score_hook_run_in_the_replica_processes(self, model) -> None:
        driver = os.getpid()
        initial = reference(model, [], 1)  # the rows every shard starts from (seed 0)
        first = initial["a"][0][0].copy()

        def score(replica) -> float:  # pickled into each replica process, gets its Replica
            if os.getpid() == driver:
                return -1.0
            return -float(np.abs(replica.serving("a")[0] - first).max())  # row 0 unchanged

        rng = np.random.default_rng(21)

        def steps(low: int) -> None:
            for t in model.model.tables:
                engine.step(t.name, rng.integers(low, t.rows, 30),
                            (rng.standard_normal((30, t.dim)) * 0.1).astype(np.float32))

        with ekko.Engine(model, replicas=2, cluster="local",
                         health=HealthConfig(score=score, min_score=-1e-6)) as engine:
            for _ in range(3):
                steps(1)  # row 0 of "a" untouched
            engine.flush(WAIT)
            assert engine.check() is True
            healthy = {n: engine.primary.serving(n).copy() for n in engine.primary.tables}
            for _ in range(2):
                steps(0)
            engine.step("a", [0], np.full((1, 8), 0.5, np.float32))
            engine.flush(WAIT)
            assert engine.check() is False  # the hook saw row 0 change on a replica
            s = engine.stats()
            assert s["checks"] == 2 and s["failed_checks"] == 1 and not s["check_skipped"]
            assert {r["table"] for r in s["rollbacks"]} == set(engine.primary.tables)
            assert all("score hook returned" in r["reason"] for r in s["rollbacks"])
            for name, rows in healthy.items():  # every table back at the healthy mark
                assert engine.primary.serving(name).tobytes() == rows.tobytes(), name
            engine.flush(WAIT)
            assert_replicas_match(engine)
            assert engine.check() is True
        engine.shutdown()
        # automatic checks every 3 steps, with a hook that always fails
        with ekko.Engine(model, replicas=1, cluster="local",
                         health=HealthConfig(score=lambda r: False, check_every=3)) as engine:
            start = engine.primary.serving("d").tobytes()
            for _ in range(3):
                engine.step("d", [1, 2], np.ones((2, 16), np.float32))
            s = engine.stats()
            assert (s["checks"], s["failed_checks"]) == (1, 1)
            assert engine.primary.serving("d").tobytes() == start
            engine.flush(WAIT)
            assert_replicas_match(engine)
        engine.shutdown()
        # a hook that cannot travel to the replica processes is refused up front
        lock = threading.Lock()
        for bad, why in ((lambda r: lock.locked(), "picklable"), ("loss", "callable")):
            with pytest.raises(EkkoError, match=why):
                ekko.Engine(model, replicas=1, cluster="local", health=HealthConfig(score=bad))

    def test_a_replica_process_that_differs_fails_flush_and_check(self, model, tmp_path) -> None:
        """As in process: a replica process that keeps rejecting a row makes flush raise
        (naming it, the table and the row) and check() fail; a row altered behind the
        engine's back fails check(); once the fault is gone the replica is equal again."""
        from ekko.engine.replica import ReplicaDiverged
        from ekko.kernels.sync import SyncError

        flag = str(tmp_path / "fault")  # while it exists, replica 1 rejects row 7 of table a

        def install_fault(replica) -> bool:  # the score hook runs in each replica process
            if replica.index == 1 and not hasattr(replica, "fault"):
                replica.fault = kernel = replica._merge["a"]

                def merge(serving, versions, ids, rows, pversions, newest, seq=None):
                    if os.path.exists(flag) and 7 in ids:
                        raise SyncError("merge fails on purpose")
                    return kernel(serving, versions, ids, rows, pversions, newest, seq=seq)

                replica._merge["a"] = merge
            return True

        stream = Stream(model, seed=13)
        with ekko.Engine(model, replicas=2, cluster="local",
                         health=HealthConfig(score=install_fault)) as engine:
            for _ in range(2):
                stream.step(engine)
            engine.flush(WAIT)
            assert engine.check() is True  # the fault is in place from here on
            open(flag, "w").close()
            engine.step("a", [7, 8, 9], np.full((3, 8), 0.25, np.float32))
            with pytest.raises(ReplicaDiverged, match=r"replica 1 .*table 'a' rows 7: .*on purpose"):
                engine.flush(WAIT)
            primary = engine.primary.serving("a")
            for r in engine.replicas:  # the packet's other rows landed everywhere
                assert r.rows("a", [8, 9])[0].tobytes() == primary[[8, 9]].tobytes()
            assert engine.stats()["divergent_rows"] == 1
            assert engine.check() is False
            assert "replica 1 differs" in engine.stats()["rollbacks"][0]["reason"]
            os.remove(flag)  # the fault is gone: the rollback's rows (or a later check's
            # settling) make row 7 equal again; when exactly races the rollback's delivery,
            # so the claim is the end state: flush returns and every replica matches
            engine.check()
            engine.flush(WAIT)
            assert_replicas_match(engine)
            assert engine.check() is True
            # a row altered behind the engine's back (a valid packet at a version the primary
            # issued, another row's bytes): check fails
            engine.step("d", [3, 4], np.ones((2, 16), np.float32))
            engine.step("d", [5], np.full((1, 16), 2.0, np.float32))
            engine.flush(WAIT)
            rows, versions = engine.replicas[0].rows("d", [5])
            engine.replicas[0].merge(Packet("d", np.array([3]), rows, versions,
                                            newest=engine.primary.issued("d")))
            assert engine.check() is False
            assert "1 rows differ" in engine.stats()["rollbacks"][-1]["reason"]
            engine.flush(WAIT)
            assert_replicas_match(engine)
            # odd input, refused in this process before anything travels
            torch = pytest.importorskip("torch")
            engine.step("a", torch.tensor([1]), torch.ones((1, 8), requires_grad=True))
            with pytest.raises(EkkoError, match="bfloat16"):
                engine.step("a", [1], torch.ones((1, 8), dtype=torch.bfloat16))
            for ids in ([1.5], [2**64], [300]):
                with pytest.raises(EkkoError):
                    engine.replicas[0].rows("a", ids)
        engine.shutdown()

    def test_the_ray_transport_implements_the_ports(self, model) -> None:
        """The same core drives Ray through the declared ports (engine/ports.py)."""
        from ekko.engine import SchedulerConfig
        from ekko.engine.ports import (LinkPrimary, LinkReplica, PrimaryPort, ReplicaPort,
                                       Transport)

        for bandwidth in (None, 1e9):  # GroupLink, then one RemoteLink per replica and shard
            with ekko.Engine(model, replicas=2, cluster="local", primary_shards=2,
                             scheduler=SchedulerConfig(bandwidth=bandwidth)) as engine:
                assert type(engine) is ekko.Engine
                t = engine.transport
                assert isinstance(t, Transport) and isinstance(t.primary_port, PrimaryPort)
                assert all(isinstance(r, ReplicaPort) for r in t.replica_ports)
                for link in (link for links in t.shard_links for link in links):
                    assert isinstance(link.primary, LinkPrimary)
                    assert isinstance(link.replica, LinkReplica)
                engine.step("a", np.arange(300), np.ones((300, 8), np.float32))
                engine.flush(WAIT)
                assert_replicas_match(engine)
                assert engine.check() is True
                views = [links[0].primary for links in t.shard_links]
                assert [v.table_rows()["a"] for v in views] == [150, 150]
                assert all(v.norm_mean("a") > 0 for v in views)  # what the shards answered
            engine.shutdown()

    def test_cli_runs_the_engine_on_ray(self, model_path, capsys) -> None:
        from ekko.cli import main
        from ekko.engine.cluster import connect

        code = main(["run", str(model_path), "--replicas", "2", "--cluster", "local",
                     "--steps", "4", "--batch", "64", "--quiet"])
        out = capsys.readouterr()
        assert code == 0, out.err
        assert "passed (every replica equals the primary byte for byte)" in out.out
        assert "processes" in out.out
        code = main(["run", str(model_path), "--cluster", "local", "--steps", "1"])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1 and "--cluster needs --replicas" in err
        for bad in ("127.0.0.1:1", "nonsense"):  # one line, quickly, whether or not Ray is up
            ray.shutdown()
            code = main(["run", str(model_path), "--replicas", "1", "--cluster", bad, "--quiet"])
            err = capsys.readouterr().err
            assert code == 1 and "ekko: error:" in err and "Traceback" not in err, err
        connect("local")

    def test_benchmark_quick(self, capsys) -> None:
        import runpy

        root = Path(__file__).resolve().parents[1]
        mod = runpy.run_path(str(root / "benchmarks" / "freshness_cluster.py"))
        with pytest.raises(SystemExit) as bad:
            mod["main"](["--quick", "--trainers", "0"])
        assert bad.value.code == 2 and "--trainers must be at least 1" in capsys.readouterr().err
        assert mod["main"](["--quick", "--trainers", "2"]) == 0  # steps from two threads
        out = capsys.readouterr().out
        assert "in-process" in out and "ray x1" in out and "2 trainer thread(s)" in out


# -- two nodes: packets cross nodes through Ray's object transfer ---------------------------
def start_cluster(resources: list[dict[str, float]]):
    """A `ray.cluster_utils.Cluster` with a one-CPU node per entry of `resources` (its
    custom resources); returns (the cluster, its nodes' ids in that order)."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    for attempt in range(3):  # Ray gives a raylet 30 s to register: a loaded machine may not
        cluster, ids = Cluster(), []
        try:
            for i, res in enumerate(resources):
                node = cluster.add_node(num_cpus=1, resources=res,
                                        **({"include_dashboard": False} if i == 0 else {}))
                ids.append(node.node_id)
            return cluster, ids
        except Exception:  # noqa: BLE001 - try again, from nothing
            cluster.shutdown()
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@pytest.fixture
def two_nodes():
    cluster, _ = start_cluster([{"near": 1}, {"far": 1}])
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_packets_cross_nodes(model, two_nodes) -> None:
    from ekko.engine import SchedulerConfig

    stream = Stream(model, seed=11)
    options = {"primary": {"resources": {"near": 0.01}}, "replica": {"resources": {"far": 0.01}}}
    # with a bandwidth budget every replica has its own link (no budget: one per shard)
    with ekko.Engine(model, replicas=2, cluster=two_nodes.address, actor_options=options,
                     scheduler=SchedulerConfig(bandwidth=20e6)) as engine:
        s = engine.stats()
        primary_node = s["primaries"][0]["node"]
        assert primary_node and all(r["node"] != primary_node for r in s["replicas"])
        for _ in range(6):
            stream.step(engine)
        engine.flush(WAIT)
        assert_replicas_match(engine)
        assert engine.stats()["rows_moved"] > 0
