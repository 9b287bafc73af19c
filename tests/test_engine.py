"""The update engine end to end: primary, scheduler, replicas, packets, rollback.

Every test checks replicas against the primary byte for byte, or against a
run the test computes another way, so a lost, stale or torn update fails.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

import ekko
from ekko.engine import HealthConfig, SchedulerConfig
from ekko.engine.primary import UpdateCache
from ekko.engine.replica import ReplicaDiverged
from ekko.engine.scheduler import ManualClock
from ekko.kernels.errors import EkkoError
from ekko.kernels.sync import SyncError

MODEL = """
model small {
  defaults { dim 8; dtype f32; optimizer rowwise_adagrad(lr=0.05, eps=1e-8); }
  table a { rows 300; serving f32; }
  table b { rows 257; dim 7; serving f16; optimizer sgd(lr=0.1); }
  table c { rows 100; serving bf16; optimizer adagrad(lr=0.1); }
  table d { rows 1000; dim 16; serving int8; }
  table e { rows 64; dim 5; serving int4; optimizer adam(lr=0.01); }
  table g { rows 50; dim 4; dtype f16; optimizer sgd(lr=0.1); }
  table h { rows 90; dim 9; serving fp8; optimizer adagrad(lr=0.1); }
  feature fa -> a pooling sum;
  feature fd -> d pooling mean;
  feature fe -> e pooling sum;
  feature fg -> g pooling sum;
  feature fh -> h pooling mean;
}
"""


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("engine") / "small.ekko"
    path.write_text(MODEL)
    return path


def compiled(path: Path):
    return ekko.compile_model(path)


def delta(rng, table, n: int):
    ids = rng.integers(0, table.rows, n)
    if n >= 2:
        ids[0], ids[1] = 0, table.rows - 1  # the edge ids
    return ids, (rng.standard_normal((n, table.dim)) * 0.1).astype(np.float32)


def assert_replicas_match(engine) -> None:
    for r in engine.replicas:
        for name in engine.primary.tables:
            assert r.serving(name).tobytes() == engine.primary.serving(name).tobytes(), name
            assert np.array_equal(r.versions(name), engine.primary.versions(name)), name


def test_engine_api_every_layout(model_path: Path) -> None:
    """step, flush, lookups and serving views, in every layout's serving copies."""
    m = compiled(model_path)
    rng = np.random.default_rng(0)
    with ekko.Engine(m, replicas=2) as engine:
        for step in range(30):
            for t in m.model.tables:
                n = int(rng.integers(0, 300)) if step % 7 else 0  # empty deltas too
                engine.step(t.name, *delta(rng, t, n))
        engine.flush()
        assert_replicas_match(engine)
        stats = engine.stats()
        assert stats["freshness_ms"]["count"] > 0
        assert stats["freshness_ms"]["p50"] <= stats["freshness_ms"]["p99"] <= stats["freshness_ms"]["max"]
        assert stats["packets_rejected"] == 0 and stats["rows_moved"] > 0
        for r in engine.replicas:
            assert all(v == engine.primary.issued(n) for n, v in r.watermarks().items())
        ids = np.array([0, 5, 999, 3], np.int64)
        offsets = np.array([0, 2, 4], np.int64)
        want = m.lookup("fd", ids, offsets)  # the primary's own serving copy
        for r in engine.replicas:
            assert np.array_equal(r.lookup("fd", ids, offsets), want)
        assert engine.lookup("fa", ids[:2] % 300, np.array([0, 2])).shape == (1, 8)
        view = engine.replicas[0].serving("d")
        with pytest.raises(ValueError):
            view[0, 0] = 1
        assert not engine.primary.serving("a").flags.writeable


def test_steps_from_several_threads_match_a_sequential_run(model_path: Path) -> None:
    """Tables are independent: two threads stepping at once give the sequential result."""
    m1, m2 = compiled(model_path), compiled(model_path)
    rng = np.random.default_rng(1)
    tables = [t for t in m1.model.tables if t.name in ("d", "e", "b", "c")]
    work = {t.name: [delta(rng, t, 2000) for _ in range(40)] for t in tables}
    with ekko.Engine(m1, replicas=2) as engine:
        def run(names):
            for i in range(40):
                for n in names:
                    engine.step(n, *work[n][i])

        threads = [threading.Thread(target=run, args=(["d", "b"],)),
                   threading.Thread(target=run, args=(["e", "c"],))]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        engine.flush()
        assert_replicas_match(engine)
        m2.materialize(seed=0)
        for n, deltas in work.items():
            for i, (ids, grads) in enumerate(deltas):
                m2.update(n, ids, grads, version=i + 1)
            assert engine.primary.serving(n).tobytes() == m2.tables[n].lookup_table.tobytes()


def test_packets_round_trip_and_damage_is_rejected() -> None:
    rng = np.random.default_rng(2)
    for rows in (rng.standard_normal((5, 3)).astype(np.float32),
                 rng.integers(0, 255, (4, 12)).astype(np.uint8),
                 np.zeros((0, 7), np.float16)):
        n = len(rows)
        p = ekko.Packet(table="t_x", ids=np.arange(n), rows=rows, versions=np.arange(1, n + 1),
                        commit_ns=np.full(n, 123), newest=9)
        data = p.to_bytes()
        assert len(data) == p.nbytes
        q = ekko.Packet.from_bytes(data)
        assert (q.table, q.newest) == ("t_x", 9)
        assert q.rows.tobytes() == rows.tobytes() and q.rows.dtype == rows.dtype
        assert np.array_equal(q.ids, p.ids) and np.array_equal(q.versions, p.versions)
        assert np.array_equal(q.commit_ns, p.commit_ns)
        for bad in (data[:-1], data[:10], b"", data[:20] + bytes([data[20] ^ 1]) + data[21:],
                    b"XXXX" + data[4:]):
            with pytest.raises(EkkoError):
                ekko.Packet.from_bytes(bad)


def test_malformed_packets_leave_the_replica_untouched(model_path: Path) -> None:
    m = compiled(model_path)
    rng = np.random.default_rng(3)
    with ekko.Engine(m, replicas=2) as engine:
        for _ in range(3):
            engine.step("d", *delta(rng, m.table("d"), 100))
        engine.flush()
        replica = engine.replicas[1]
        before = {n: (replica.serving(n).tobytes(), replica.versions(n).tobytes())
                  for n in engine.primary.tables}
        good = engine.primary.pack("d", np.array([1, 2, 3]))
        issued = engine.primary.issued("d")

        def variant(**kw):
            fields = dict(table="d", ids=good.ids, rows=good.rows, versions=good.versions)
            fields.update(kw)
            return ekko.Packet(**fields)

        bad_packets = [
            variant(rows=np.zeros((3, 25), np.uint8)),              # wrong dim
            variant(rows=np.zeros((3, 16), np.float32)),            # wrong layout
            variant(ids=np.array([1, 2, 1000])),                    # id out of range
            variant(ids=np.array([1, 2, -1])),
            variant(ids=np.array([1, 2])),                          # lengths differ
            variant(versions=np.array([1, issued + 1, 1])),         # newer than issued
            variant(table="nope"),
            good.to_bytes()[:-3],                                   # truncated bytes
        ]
        nan_rows = good.rows.copy()
        nan_rows[1, 16:20] = np.frombuffer(np.float32(np.nan).tobytes(), np.uint8)
        bad_packets.append(variant(rows=nan_rows))                  # NaN scale
        for p in bad_packets:
            with pytest.raises(EkkoError):
                replica.merge(p)
        assert engine.stats()["packets_rejected"] == len(bad_packets)
        after = {n: (replica.serving(n).tobytes(), replica.versions(n).tobytes())
                 for n in engine.primary.tables}
        assert after == before
        # a replayed good packet (as bytes) is accepted and changes nothing: it is not newer
        assert replica.merge(good.to_bytes()) == 0
        assert_replicas_match(engine)


def test_update_cache_answers_what_changed_without_a_scan() -> None:
    cache = UpdateCache(max_rows=10)
    cache.record(1, np.array([1, 2, 3]))
    cache.record(2, np.array([3, 4]))
    cache.record(3, np.array([9]))
    assert cache.changed_since(0).tolist() == [1, 2, 3, 4, 9]
    assert cache.changed_since(1).tolist() == [3, 4, 9]
    assert cache.changed_since(3).tolist() == []
    cache.record(4, np.arange(20, 27))  # 13 rows > 10: the oldest entry (version 1) goes
    assert cache.floor == 1 and cache.changed_since(0) is None
    assert cache.changed_since(1).tolist() == [3, 4, 9, *range(20, 27)]
    assert cache.changed_since(3).tolist() == list(range(20, 27))


def test_primary_changed_since_follows_steps(model_path: Path) -> None:
    m = compiled(model_path)
    with ekko.Engine(m, replicas=1) as engine:
        v1 = engine.step("a", np.array([5, 6]), np.ones((2, 8), np.float32))
        engine.step("a", np.array([6, 7, 7]), np.ones((3, 8), np.float32))
        assert engine.primary.changed_since("a", v1).tolist() == [6, 7]
        assert engine.primary.changed_since("a", 0).tolist() == [5, 6, 7]


def test_a_newer_update_supersedes_a_pending_one(model_path: Path) -> None:
    """While a link is held back, 50 updates of the same rows leave as one value each.

    The periodic link follows a clock the test advances, so the 50 steps fall
    in one period however slowly they run.
    """
    m = compiled(model_path)
    clock = ManualClock()
    cfg = SchedulerConfig(policy="periodic", interval_s=0.3, clock=clock)
    with ekko.Engine(m, replicas=1, scheduler=cfg) as engine:
        for _ in range(50):
            engine.step("d", np.array([1, 2, 3]), np.ones((3, 16), np.float32))
        time.sleep(0.05)  # the link had its chance: it must wait for the period
        assert engine.stats()["rows_moved"] == 0
        clock.advance(0.3)
        engine.flush()
        assert engine.stats()["rows_moved"] == 3  # each row once, at its 50th version
        assert_replicas_match(engine)
        engine.step("d", np.array([2]), np.ones((1, 16), np.float32))
        clock.advance(0.3)
        engine.flush()
        assert engine.stats()["rows_moved"] == 4
        assert_replicas_match(engine)


def test_priority_sends_significant_and_never_seen_rows_first_and_nothing_starves(
        model_path: Path) -> None:
    m = compiled(model_path)
    row = 16 + 8 + 24  # int8 row of dim 16 + id, version, commit time
    cfg = SchedulerConfig(bandwidth=200 * row, burst_s=0.05, w_new=0.0, age_scale_s=0.5)
    rng = np.random.default_rng(4)
    with ekko.Engine(m, replicas=1, scheduler=cfg) as engine:
        warm = np.arange(1000)
        for _ in range(12):  # warm up the running mean; every row seen once
            engine.step("d", warm, (rng.standard_normal((1000, 16)) * 0.01).astype(np.float32))
        engine.flush(timeout=120)
        small = np.arange(0, 900)
        big = np.arange(900, 1000)
        grads = (rng.standard_normal((1000, 16)) * 0.01).astype(np.float32)
        grads[900:] *= 50  # 50x the norm: significant
        replica = engine.replicas[0]
        merged: list[np.ndarray] = []  # ids of each packet, in the order the replica merged them
        plain_deliver = replica.deliver

        def recording_deliver(packet, fetch):
            merged.append(np.asarray(packet.ids).copy())
            return plain_deliver(packet, fetch)

        replica.deliver = recording_deliver
        link = engine.links[0]
        with link.cond:  # enqueue both before the link picks anything
            engine.step("d", np.concatenate([small, big]), grads)
        engine.flush(timeout=120)  # aging: the 900 insignificant rows arrive too
        order = np.concatenate(merged)
        assert len(order) == 1000 and set(order.tolist()) == set(range(1000))
        # the significant rows went first: none in a packet after the first that carries an
        # insignificant one (packet by packet: how many fit one depends on the machine's speed)
        first_small = min(k for k, ids in enumerate(merged) if (ids < 900).any())
        last_big = max(k for k, ids in enumerate(merged) if (ids >= 900).any())
        assert last_big <= first_small
        assert_replicas_match(engine)


def test_bandwidth_budget_is_respected(model_path: Path) -> None:
    m = compiled(model_path)
    budget = 100_000.0  # bytes/s
    cfg = SchedulerConfig(bandwidth=budget, burst_s=0.01)
    rng = np.random.default_rng(5)
    with ekko.Engine(m, replicas=1, scheduler=cfg) as engine:
        t0 = time.perf_counter()
        for _ in range(5):
            engine.step("d", *delta(rng, m.table("d"), 1000))
        engine.flush(timeout=120)
        elapsed = time.perf_counter() - t0
        moved = engine.stats()["bytes_moved"]
        depth = max(budget * 0.01, 64 * 48)
        assert moved <= budget * elapsed + depth + 2000  # packet headers are not budgeted
        assert_replicas_match(engine)


def test_harmful_update_is_caught_and_rolled_back(model_path: Path) -> None:
    m = compiled(model_path)
    rng = np.random.default_rng(6)
    health = HealthConfig(outlier_factor=100.0, warmup=5)
    with ekko.Engine(m, replicas=2, health=health) as engine:
        for _ in range(10):
            engine.step("d", *delta(rng, m.table("d"), 200))
        assert engine.check()  # healthy: the undo log starts here
        engine.flush()
        healthy = {n: engine.primary.serving(n).tobytes() for n in engine.primary.tables}
        ids, grads = delta(rng, m.table("d"), 200)
        grads[7] *= 1e6  # one harmful row
        engine.step("d", ids, grads)
        engine.flush()
        stats = engine.stats()
        assert len(stats["rollbacks"]) == 1
        rb = stats["rollbacks"][0]
        assert rb["table"] == "d" and "norm" in rb["reason"]
        assert rb["undone_versions"] == (11, 11) and rb["rows"] == len(np.unique(ids))
        assert engine.primary.serving("d").tobytes() == healthy["d"]
        assert_replicas_match(engine)
        # the harmful update did not raise the bar: one 100x smaller is caught as well
        # (it once moved the running mean 250-fold, and such an update then passed)
        ids, grads = delta(rng, m.table("d"), 200)
        grads[7] *= 1e4
        engine.step("d", ids, grads)
        assert len(engine.stats()["rollbacks"]) == 2
        engine.flush()
        assert engine.primary.serving("d").tobytes() == healthy["d"]
        assert_replicas_match(engine)


def test_score_hook_failure_rolls_every_table_back(model_path: Path) -> None:
    m = compiled(model_path)
    rng = np.random.default_rng(7)
    verdict = {"ok": True}
    health = HealthConfig(score=lambda replica: verdict["ok"])
    with ekko.Engine(m, replicas=2, health=health) as engine:
        for _ in range(5):
            for t in m.model.tables:
                engine.step(t.name, *delta(rng, t, 50))
        engine.flush()
        assert engine.check()
        healthy = {n: (engine.primary.serving(n).tobytes(), engine.primary.tables[n].buf.master.tobytes())
                   for n in engine.primary.tables}
        changed = 0
        for _ in range(3):
            for t in m.model.tables:
                ids, grads = delta(rng, t, 40)
                engine.step(t.name, ids, grads)
        for pt in engine.primary.tables.values():
            changed += pt.undo.rows
        engine.flush()
        verdict["ok"] = False
        assert not engine.check()
        engine.flush()
        rolled = engine.stats()["rollbacks"]
        assert {r["table"] for r in rolled} == set(engine.primary.tables)
        assert sum(r["rows"] for r in rolled) == changed  # cost: rows changed, not table size
        for n, (serving, master) in healthy.items():
            assert engine.primary.serving(n).tobytes() == serving
            assert engine.primary.tables[n].buf.master.tobytes() == master
        assert_replicas_match(engine)


def test_bad_input_raises_ekko_errors(model_path: Path) -> None:
    m = compiled(model_path)
    with pytest.raises(EkkoError):
        ekko.Engine(m, replicas=0)
    with pytest.raises(EkkoError):
        SchedulerConfig(policy="random")
    with ekko.Engine(m, replicas=1) as engine:
        before = engine.primary.serving("d").tobytes()
        for ids, grads in [(np.array([1000]), np.ones((1, 16), np.float32)),
                           (np.array([1]), np.ones((1, 15), np.float32)),
                           (np.array([1]), np.full((1, 16), np.nan, np.float32)),
                           (np.array([0.5]), np.ones((1, 16), np.float32))]:
            with pytest.raises(EkkoError):
                engine.step("d", ids, grads)
        with pytest.raises(EkkoError):
            engine.step("nope", np.array([1]), np.ones((1, 16), np.float32))
        with pytest.raises(EkkoError):
            engine.replicas[0].lookup("nope", np.array([1]), np.array([0, 1]))
        assert engine.primary.serving("d").tobytes() == before
        assert engine.stats()["rejected_steps"] == 5


def test_a_gathered_step_is_the_step_of_its_rows(model_path: Path) -> None:
    """Engine.step(t, ids, Gathered(rows, index, scale)) commits exactly what the rows
    it stands for commit (every table, layout and optimizer), and the replicas get it."""
    from ekko.engine import Gathered

    m = compiled(model_path)
    rng = np.random.default_rng(4)
    plans = []
    for t in m.model.tables:
        ids = rng.integers(0, t.rows, 400)
        ids[:2] = 0, t.rows - 1
        rows = (rng.standard_normal((37, t.dim)) * 0.1).astype(np.float32)
        index = rng.integers(0, 37, 400)
        scale = rng.uniform(-2, 2, 400).astype(np.float32) if t.rows % 2 else None
        plans.append((t.name, ids, Gathered(rows, index, scale)))
    states = []
    for gathered in (False, True):
        with ekko.Engine(compiled(model_path), replicas=2) as engine:
            for name, ids, g in plans:
                engine.step(name, ids, g if gathered else g.expand())
                engine.step(name, ids[:0], Gathered(g.rows, g.index[:0]))  # an empty batch
            engine.flush()
            assert_replicas_match(engine)
            states.append({n: (pt.buf.master.tobytes(), engine.primary.serving(n).tobytes())
                           for n, pt in engine.primary.tables.items()})
    assert states[0] == states[1]


@pytest.mark.parametrize("grads,why", [
    (lambda G: G(np.ones((3, 16), np.float32), np.array([0, 3])), r"grads.index\[1\] = 3"),
    (lambda G: G(np.ones((3, 16), np.float32), np.array([0])), "a row for each of the 2 ids"),
    (lambda G: G(np.ones((3, 15), np.float32), np.array([0, 1])), r"shape \(B, 16\)"),
    (lambda G: G(np.ones((3, 16)), np.array([0, 1])), "grads.rows must be float32"),
    (lambda G: G(np.ones((3, 16), np.float32), np.array([0.5, 1])), "grads.index must be integers"),
    (lambda G: G(np.ones((3, 16), np.float32), np.array([0, 1]), np.ones(3, np.float32)),
     "grads.scale must be float32 of shape"),
    (lambda G: G(np.ones((3, 16), np.float32), np.array([0, 1]), np.array([1, np.nan], np.float32)),
     "non-finite gradient"),
    (lambda G: G(np.full((3, 16), 1e10, np.float32), np.array([0, 1]),
                 np.array([1, 1e30], np.float32)), "non-finite gradient"),
])
def test_a_bad_gathered_step_is_refused_and_changes_nothing(model_path: Path, grads, why) -> None:
    from ekko.engine import Gathered

    with ekko.Engine(compiled(model_path), replicas=1) as engine:
        before = engine.primary.serving("d").tobytes(), engine.primary.issued("d")
        with pytest.raises(EkkoError, match=why):
            engine.step("d", np.array([1, 2]), grads(Gathered))
        assert (engine.primary.serving("d").tobytes(), engine.primary.issued("d")) == before
        assert engine.stats()["rejected_steps"] == 1


def test_batched_steps_reach_the_replicas_and_a_failing_block_releases(model_path: Path) -> None:
    """batched() only delays the links' wake: after the block the rows arrive without a
    flush (a link sleeps at most its idle poll), flush inside a block delivers, another
    thread's steps during a block are not lost, and an exception still ends the hold."""
    m = compiled(model_path)
    rng = np.random.default_rng(9)
    with ekko.Engine(m, replicas=2) as engine:
        with engine.batched():
            for name in ("a", "b", "d"):
                engine.step(name, *delta(rng, m.table(name), 50))
            engine.flush(30)  # inside the block: the held commits go now
            assert_replicas_match(engine)

        def other() -> None:
            r = np.random.default_rng(10)
            for _ in range(30):
                engine.step("c", *delta(r, m.table("c"), 20))

        thread = threading.Thread(target=other)
        thread.start()
        for _ in range(30):
            with engine.batched():
                engine.step("a", *delta(rng, m.table("a"), 20))
                engine.step("e", *delta(rng, m.table("e"), 20))
        thread.join()
        with pytest.raises(RuntimeError):
            with engine.batched():
                engine.step("d", *delta(rng, m.table("d"), 20))
                raise RuntimeError("the trainer failed mid-backward")
        assert engine._held == 0
        deadline = time.monotonic() + 30  # no flush: the links must have been woken
        while True:
            try:
                assert_replicas_match(engine)
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)


def test_packets_through_bytes_give_the_same_replicas(model_path: Path) -> None:
    """wire=True encodes and decodes every packet, as between processes."""
    m = compiled(model_path)
    rng = np.random.default_rng(8)
    with ekko.Engine(m, replicas=2, scheduler=SchedulerConfig(wire=True)) as engine:
        for _ in range(10):
            for t in m.model.tables:
                engine.step(t.name, *delta(rng, t, 100))
        engine.flush()
        assert_replicas_match(engine)
        assert engine.stats()["packets"] > 0


# -- a replica that differs is never reported fresh ---------------------------------------------
def diff_rows(engine, replica, table: str) -> int:
    """How many rows of `table` the replica holds otherwise than the primary."""
    mine, theirs = replica.serving(table), engine.primary.serving(table)
    return int(((mine != theirs).any(axis=1) | (replica.versions(table) !=
                                                 engine.primary.versions(table))).sum())


EIGHT_HUNDRED = """
model notebook {
  defaults { dim 8; dtype f32; optimizer sgd(lr=0.1); serving f32; }
  table t { rows 800; }
  feature f -> t pooling sum;
}
"""


def test_a_second_engine_on_one_model_numbers_on_and_retires_the_first(tmp_path: Path) -> None:
    """A notebook cell run again: a new Engine on the same compiled model, the first still up.

    The tables carry the first engine's versions; the second numbers on from
    them (before, it started at 1 and its replicas dropped every row it sent
    that was not newer: 35 of 800 rows differed while check() passed).
    """
    path = tmp_path / "nb.ekko"
    path.write_text(EIGHT_HUNDRED)
    m = ekko.compile_model(path)
    rng = np.random.default_rng(11)

    def steps(engine, n: int) -> None:
        for _ in range(n):
            engine.step("t", rng.integers(0, 800, 50), rng.standard_normal((50, 8)).astype(np.float32))

    first = ekko.Engine(m, replicas=2).start()
    steps(first, 20)
    first.flush()
    newest = first.primary.issued("t")
    second = ekko.Engine(m, replicas=2)
    with pytest.raises(EkkoError, match="newer Engine"):
        steps(first, 1)
    with pytest.raises(EkkoError, match="newer Engine"):
        first.flush()
    with second:
        assert second.primary.issued("t") == newest
        steps(second, 3)
        second.flush()
        assert all(diff_rows(second, r, "t") == 0 for r in second.replicas)
        assert second.check() is True
        assert second.stats()["rows_repaired"] == 0  # nothing was refused as older
    with ekko.Engine(m, replicas=1) as third:  # and after a clean close, the same
        steps(third, 3)
        third.flush()
        assert_replicas_match(third)
        assert third.primary.issued("t") == newest + 6


def test_rows_refused_as_older_are_noticed_and_repaired(model_path: Path) -> None:
    """A primary numbering its versions again from 1 (what a second engine did): the replicas
    refuse its rows as not newer; each refusal is seen, and the rows are repaired."""
    m = compiled(model_path)
    rng = np.random.default_rng(12)
    t = m.table("a")
    with ekko.Engine(m, replicas=2) as engine:
        for _ in range(10):
            engine.step("a", *delta(rng, t, 100))
        engine.flush()
        engine.primary.tables["a"].version = 0  # the fault: versions start again
        for _ in range(3):
            engine.step("a", *delta(rng, t, 100))
        engine.flush()
        for r in engine.replicas:
            assert diff_rows(engine, r, "a") == 0, r.index
        assert engine.stats()["rows_repaired"] > 0
        assert engine.check() is True


def _failing_merge(replica, table: str, bad_id: int, times: list[int]):
    """Replace one replica table's merge kernel with one that rejects packets holding
    `bad_id` while times[0] > 0 (each rejection counts one down; -1: forever)."""
    kernel = replica._merge[table]

    def merge(serving, versions, ids, rows, pversions, newest, seq=None):
        if times[0] and bad_id in np.asarray(ids):
            times[0] -= times[0] > 0
            raise SyncError(f"merge fails on purpose for id {bad_id}")
        return kernel(serving, versions, ids, rows, pversions, newest, seq=seq)

    replica._merge[table] = merge


def test_a_rejected_packet_is_sent_again(model_path: Path) -> None:
    """A transient fault: the rows of a rejected packet are re-packed and land."""
    m = compiled(model_path)
    rng = np.random.default_rng(13)
    with ekko.Engine(m, replicas=2) as engine:
        _failing_merge(engine.replicas[1], "d", 999, [1])
        for _ in range(5):
            engine.step("d", *delta(rng, m.table("d"), 200))  # id 999 in each
        engine.flush()
        assert_replicas_match(engine)
        s = engine.stats()
        assert s["replicas"][1]["packets_rejected"] == 1 and s["divergent_rows"] == 0
        assert engine.check() is True


def test_a_replica_that_keeps_rejecting_rows_fails_flush_and_check(model_path: Path) -> None:
    """A permanent fault on one replica: flush raises naming it, the table and the row,
    check() fails and rolls back, and once the fault is gone the replica is equal again."""
    m = compiled(model_path)
    rng = np.random.default_rng(14)
    with ekko.Engine(m, replicas=2) as engine:
        for _ in range(3):
            engine.step("d", *delta(rng, m.table("d"), 200))
        engine.flush()
        assert engine.check() is True
        fault = [-1]
        _failing_merge(engine.replicas[1], "d", 999, fault)
        engine.step("d", *delta(rng, m.table("d"), 200))
        with pytest.raises(ReplicaDiverged, match=r"replica 1 .*table 'd' rows 999: .*on purpose") as e:
            engine.flush()
        assert e.value.replica == 1 and list(e.value.rows) == ["d"]
        assert diff_rows(engine, engine.replicas[1], "d") == 1  # the packet's other rows landed
        assert diff_rows(engine, engine.replicas[0], "d") == 0
        s = engine.stats()
        assert s["divergent_rows"] == 1 and s["replicas"][1]["watermarks"]["d"] < engine.primary.issued("d")
        assert engine.check() is False  # and it rolled back
        assert "replica 1 differs" in engine.stats()["rollbacks"][0]["reason"]
        with pytest.raises(ReplicaDiverged):
            engine.flush()  # the restored row is refused too: still loud
        fault[0] = 0  # the fault is gone: a check settles the row again (whether the
        # rollback's delivery or this check gets there first is a race: the end state is
        # the claim)
        engine.check()
        engine.flush()
        assert_replicas_match(engine)
        assert engine.check() is True


def test_a_primary_row_no_replica_can_merge_fails_flush_until_rolled_back(model_path: Path) -> None:
    """The primary committed a value replicas reject (a kernel writing -inf did this):
    flush raises, check() rolls the row back, and the replicas are equal again."""
    m = compiled(model_path)
    rng = np.random.default_rng(15)
    with ekko.Engine(m, replicas=2) as engine:
        for _ in range(3):
            engine.step("a", *delta(rng, m.table("a"), 100))
        engine.flush()
        assert engine.check() is True
        before = engine.primary.serving("a").copy()
        ids, grads = delta(rng, m.table("a"), 100)
        with engine.links[0].cond, engine.links[1].cond:  # no link packs before the damage
            engine.step("a", ids, grads)
            engine.primary.tables["a"].buf.master[ids[5]] = -np.inf  # serving is the master
        with pytest.raises(ReplicaDiverged, match=rf"table 'a' rows {ids[5]}: .*non-finite"):
            engine.flush()
        for link in engine.links:  # flush raised at the first replica: let the other deliver
            link.wait_for({"a": engine.primary.issued("a")}, 60)
        for r in engine.replicas:
            assert set(r.divergence()) == {"a"} and list(r.divergence()["a"]) == [int(ids[5])]
        assert engine.check() is False
        engine.flush()
        assert_replicas_match(engine)
        assert engine.primary.serving("a").tobytes() == before.tobytes()
        assert engine.check() is True


def test_check_fails_while_a_changed_row_differs_on_a_replica(model_path: Path) -> None:
    """A replica row altered behind the engine's back: check() is True only when equal."""
    m = compiled(model_path)
    rng = np.random.default_rng(16)
    with ekko.Engine(m, replicas=2) as engine:
        engine.step("d", *delta(rng, m.table("d"), 100))
        assert engine.check() is True
        ids, grads = delta(rng, m.table("d"), 100)
        engine.step("d", ids, grads)
        engine.flush()
        row = int(ids[3])
        rt = engine.replicas[0].tables["d"]
        rt.serving[row, 0] ^= 0xFF  # same version, other bytes
        assert engine.check() is False
        assert "replica 0: table d: 1 rows differ" in engine.stats()["rollbacks"][0]["reason"]
        engine.flush()
        assert_replicas_match(engine)
        assert engine.check() is True


# -- odd input at the engine's edges --------------------------------------------------------------
def test_torch_tensors_and_odd_ids_get_one_clear_error(model_path: Path) -> None:
    torch = pytest.importorskip("torch")
    m = compiled(model_path)
    with ekko.Engine(m, replicas=1) as engine:
        grads = torch.ones((2, 8), requires_grad=True)  # a gradient is read, never written
        engine.step("a", torch.tensor([1, 2]), grads)
        for bad, match in ((torch.ones((2, 8), dtype=torch.bfloat16), "bfloat16 tensor.*float()"),
                           (torch.ones((2, 8)).to_sparse(), "sparse_coo tensor: the kernels take dense"),
                           (torch.ones((2, 8), dtype=torch.float64), "float32")):
            with pytest.raises(EkkoError, match=match):
                engine.step("a", [1, 2], bad)
        with pytest.raises(EkkoError, match="sparse"):
            engine.step("a", torch.tensor([1, 2]).to_sparse(), np.ones((2, 8), np.float32))
        with pytest.raises(EkkoError, match="18446744073709551615 is beyond int64"):
            engine.step("a", np.array([2**64 - 1], np.uint64), np.ones((1, 8), np.float32))
        with pytest.raises(EkkoError, match=r"ids\[0\] is \[1\], not an integer id"):
            engine.step("a", [[1], [1, 2]], np.ones((2, 8), np.float32))
        assert engine.step("a", [], np.ones((0, 8), np.float32)) > 0  # an empty batch
        engine.flush()
        r = engine.replicas[0]
        for ids, match in (([1.5], "integer"), ([2**64], "18446744073709551616 is beyond int64"),
                           (np.array([2**63], np.uint64), "9223372036854775808 is beyond int64"),
                           ([300], "id 300 is out of range")):
            with pytest.raises(EkkoError, match=match):
                r.rows("a", ids)
        rows, versions = r.rows("a", torch.tensor([0, 299]))
        assert versions.tolist() == engine.primary.versions("a")[[0, 299]].tolist()
        assert engine.stats()["rejected_steps"] == 6


def test_commit_times_in_the_future_are_counted_not_measured(model_path: Path) -> None:
    m = compiled(model_path)
    with ekko.Engine(m, replicas=1) as engine:
        engine.step("a", [1, 2], np.ones((2, 8), np.float32))
        engine.flush()
        before = engine.stats()
        p = engine.primary.pack("a", np.array([1, 2]))
        p.commit_ns = np.array([time.time_ns() + 10**12, 0])  # 1000 s ahead, and none
        engine.replicas[0].merge(p)
        after = engine.stats()
        assert after["future_packets"] == before["future_packets"] + 1 == 1
        assert after["replicas"][0]["future_rows"] == 1
        assert after["freshness_ms"]["count"] == before["freshness_ms"]["count"]
