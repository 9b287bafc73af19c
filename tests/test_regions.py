"""Across regions, in process: relays, WAN links (delay, cut, budget, compression),
anti-entropy after a cut or a lost relay, and one clear error for bad options.

Every run ends with the replicas compared with the primary byte for byte; the
WAN figures are counted rows and bytes (never timings), so the tests hold on a
loaded machine. WAN delays are a few ms and budgets generous, to stay quick.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

import ekko
from ekko.engine import ManualClock, SchedulerConfig
from ekko.engine.packet import Packet, PacketError
from ekko.engine.ports import LinkPrimary, LinkReplica, ReplicaPort, Transport
from ekko.engine.regions import BUCKET, digests
from ekko.engine.wan import WanCodec
from ekko.kernels.errors import EkkoError

MODEL = """
model geo {
  defaults { dim 16; dtype f32; optimizer sgd(lr=0.1); }
  table a { rows 3000; serving f32; }
  table b { rows 400; dim 8; serving int8; optimizer rowwise_adagrad(lr=0.05, eps=1e-8); }
  feature fa -> a pooling sum;
  feature fb -> b pooling sum;
}
"""
REGIONS = {"eu": 2, "us": 2, "ap": 2}
FAST = {"primary_region": "eu", "wan_bandwidth": 50e6, "wan_latency_ms": 2}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("regions") / "geo.ekko"
    path.write_text(MODEL)
    return path


@pytest.fixture()
def model(model_path: Path):
    return ekko.compile_model(model_path)


def steps(engine, rng, n: int, rows: int = 150) -> dict[str, set[int]]:
    """n steps on each table; returns the distinct ids each table changed."""
    changed: dict[str, set[int]] = {"a": set(), "b": set()}
    for _ in range(n):
        for table, size, dim in (("a", 3000, 16), ("b", 400, 8)):
            ids = rng.integers(0, size, rows // (1 if table == "a" else 3))
            engine.step(table, ids, (rng.standard_normal((len(ids), dim)) * 0.1)
                        .astype(np.float32))
            changed[table].update(ids.tolist())
    return changed


def differing(engine, replicas=None) -> list[tuple[int, str]]:
    """(replica, table) pairs whose serving rows or versions differ from the primary's."""
    out = []
    for r in engine.replicas if replicas is None else [engine.replicas[i] for i in replicas]:
        for t in engine.primary.tables:
            if r.serving(t).tobytes() != engine.primary.serving(t).tobytes() \
                    or not np.array_equal(r.versions(t), engine.primary.versions(t)):
                out.append((r.index, t))
    return out


def wan_rows_into(engine, region: str) -> int:
    return sum(c["rows"] for name, c in engine.stats()["wan"]["links"].items()
               if name.endswith("->" + region))


def wait_until(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_contract_relay_regions_stay_byte_identical(model) -> None:
    rng = np.random.default_rng(1)
    with ekko.Engine(model, regions=REGIONS, primary_region="eu", wan_bandwidth=20e6,
                     wan_latency_ms=3, topology="relay") as engine:
        steps(engine, rng, 6)
        engine.flush(timeout=60)
        assert [r.region for r in engine.replicas] == ["eu", "eu", "us", "us", "ap", "ap"]
        assert differing(engine) == []
        assert engine.relays == {"us": 2, "ap": 4}
        s = engine.stats()
        assert s["wan_bytes"] > 0 and s["wan_bytes"] == sum(
            c["bytes"] for c in s["wan"]["links"].values())
        assert set(s["freshness_ms_by_region"]) == set(REGIONS)
        for region, f in s["freshness_ms_by_region"].items():
            assert {"p50", "p99", "max"} <= set(f) and f["count"] > 0, region
            assert 0 < f["p50"] <= f["p99"] <= f["max"]
        # a remote replica waits at least the WAN delay; one in the primary's region does not
        assert s["freshness_ms_by_region"]["ap"]["p50"] >= 3.0
        assert [p["region"] for p in s["replicas"]] == [r.region for r in engine.replicas]
        # only links into remote regions cross the WAN: one per remote region
        assert {n for n, c in s["wan"]["links"].items() if c["rows"]} == {"eu->us", "eu->ap"}
        assert engine.lookup("fa", np.array([1, 2]), np.array([0])).shape == (1, 16)
        t = engine.transport  # the region links are scheduler links behind the same ports
        assert isinstance(t, Transport) and all(isinstance(r, ReplicaPort) for r in t.replica_ports)
        assert all(isinstance(link.replica, LinkReplica) and isinstance(link.primary, LinkPrimary)
                   for link in engine.links)
        assert len(engine.links) == 4  # eu's two replicas, one per remote region


def test_a_relay_sends_one_wan_copy_per_region_a_star_one_per_replica(model_path: Path) -> None:
    """Same steps, flushed one by one (each link sends each step's rows once): a star's
    WAN rows are R times the relay's, and its bytes at least R times minus headers."""
    figures = {}
    for topology in ("star", "relay"):
        rng = np.random.default_rng(7)
        with ekko.Engine(ekko.compile_model(model_path), regions={"eu": 1, "us": 3, "ap": 3},
                         topology=topology, compress=False, **FAST) as engine:
            for _ in range(5):
                steps(engine, rng, 1)
                engine.flush(timeout=60)
            assert differing(engine) == []
            s = engine.stats()
            figures[topology] = (s["wan_bytes"], s["wan"]["rows"],
                                 sum(c["packets"] for c in s["wan"]["links"].values()))
    (star_bytes, star_rows, _), (relay_bytes, relay_rows, relay_packets) = (figures["star"],
                                                                            figures["relay"])
    assert star_rows == 3 * relay_rows > 0
    headers = 64 * relay_packets  # a packet's header, table name, CRC and frame byte
    assert relay_bytes <= star_bytes / 3 + headers


def test_compressed_wan_packets_cost_less_than_the_raw_serving_row(model) -> None:
    rng = np.random.default_rng(3)
    with ekko.Engine(model, regions={"eu": 1, "us": 1}, **FAST) as engine:
        for _ in range(4):
            ids = rng.integers(0, 3000, 600)
            engine.step("a", ids, (rng.standard_normal((600, 16)) * 0.1).astype(np.float32))
        engine.flush(timeout=60)
        assert differing(engine) == []
        per_row = engine.stats()["wan"]["bytes_per_row"]
        serving_row = engine.primary.row_bytes("a")  # 64 bytes: 16 f32
        assert per_row["raw"] > serving_row  # the packet format adds id, version, commit time
        assert per_row["sent"] < serving_row, per_row


def test_the_wan_codec_round_trips_and_refuses_damage() -> None:
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(10_000, 500, replace=False))
    rows = (rng.standard_normal((500, 8)) * 0.1).astype(np.float32)
    p = Packet("t", ids, rows, rng.integers(1, 9, 500), np.full(500, 1_700_000_000_000_000_000),
               newest=9)
    codec = WanCodec()
    frame, raw = codec.encode(p)
    assert frame[0] == 1 and len(frame) < raw  # compressed: it paid
    q = codec.decode(frame)
    assert q.table == "t" and q.newest == 9 and q.to_bytes() == p.to_bytes()
    noise = Packet("t", ids[:2], rng.integers(0, 256, (2, 4000), dtype=np.uint8), [1, 2])
    small, _ = codec.encode(noise)
    assert small[0] == 0 and codec.decode(small).to_bytes() == noise.to_bytes()  # raw: it did not
    bad = bytearray(frame)
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(PacketError):
        codec.decode(bytes(bad))
    with pytest.raises(PacketError):
        codec.decode(b"\x07" + frame[1:])


@pytest.mark.parametrize("topology", ["relay", "star"])
def test_after_a_cut_heals_peers_repair_only_what_was_missed(model, topology: str) -> None:
    rng = np.random.default_rng(11)
    with ekko.Engine(model, regions=REGIONS, topology=topology, **FAST) as engine:
        steps(engine, rng, 3)
        engine.flush(timeout=60)
        engine.cut("ap")
        changed = steps(engine, rng, 4)
        engine.flush(timeout=60)  # does not wait for the cut region
        assert differing(engine, [0, 1, 2, 3]) == []
        ap_links = engine.transport.links_of(4) + engine.transport.links_of(5)
        wait_until(lambda: all(link.backlog() == 0 for link in ap_links))
        assert differing(engine, [4, 5]), "the cut lost nothing: this test would prove nothing"
        s = engine.stats()
        assert s["regions"]["ap"]["cut"] and s["regions"]["ap"]["held"] == [4, 5]
        assert s["wan"]["dropped_rows"] > 0
        assert engine.check()  # held back, not wrong: its watermark covers none of it
        before = wan_rows_into(engine, "ap")
        engine.heal("ap")
        engine.flush(timeout=60)
        assert differing(engine) == []
        during = sum(map(len, changed.values()))
        resent = wan_rows_into(engine, "ap") - before
        ae = engine.stats()["anti_entropy"]
        assert 0 < resent <= 1.2 * during, (resent, during)
        assert ae["rows_pulled_wan"] <= 1.2 * during
        ap = engine.stats()["regions"]["ap"]
        assert ap["rows_repaired_wan"] == ae["rows_pulled_wan"] > 0
        assert ae["rows_pulled"] <= 2 * 1.2 * during  # each ap replica, once
        # the first from the nearest region (not the primary's), the second from it
        (first, src1), (second, src2) = ae["sources"][-2:]
        assert engine.replicas[src1].region == "us" and src2 == first
        assert engine.stats()["regions"]["ap"]["held"] == []
        # repaired rows are measured from the commit of the update they missed
        assert engine.stats()["freshness_ms_by_region"]["ap"]["max"] >= \
            engine.stats()["freshness_ms_by_region"]["us"]["p50"]


@pytest.mark.parametrize("seed", [0, 5])
def test_a_heal_right_after_the_cut_sends_no_row_twice(model, seed: int) -> None:
    """The contract's delays; healed while packets were still being lost and others
    waited on the link: rows the link will send itself (pending or on their way) are not
    pulled as well, so the rows crossing into the region after the heal stay within
    1.2x the rows changed during the cut (before the link's rows were excluded, a
    script running this gave 1.29x and 1.27x with seeds 0 and 5; it depends on timing)."""
    rng = np.random.default_rng(seed)
    with ekko.Engine(model, regions=REGIONS, primary_region="eu", wan_bandwidth=20e6,
                     wan_latency_ms=40, topology="relay") as engine:
        steps(engine, rng, 2)
        engine.flush(timeout=60)
        engine.cut("ap")
        before = wan_rows_into(engine, "ap")
        changed = steps(engine, rng, 3)
        engine.heal("ap")
        engine.flush(timeout=60)
        assert differing(engine) == []
        during = sum(map(len, changed.values()))
        assert wan_rows_into(engine, "ap") - before <= 1.2 * during


@pytest.mark.parametrize("topology", ["star", "relay"])
def test_fifo_links_hold_a_cut_region_from_the_oldest_lost_commit(model_path: Path,
                                                                  topology: str) -> None:
    """A fifo link sends several commits of one table per batch. A batch lost in a cut
    must hold its replicas from its oldest commit: held from the newest one, anti-entropy
    compared only the rows changed after it, and rows only the older commits touched
    stayed behind while flush returned (15 of 20 single-threaded runs of this sequence
    before the fix, and the engine fuzzer's silent-divergence cases)."""
    from ekko.engine import SchedulerConfig

    for trial in range(4):
        rng = np.random.default_rng(trial)
        with ekko.Engine(ekko.compile_model(model_path), regions={"eu": 1, "us": 2},
                         primary_region="eu", wan_latency_ms=2, wan_bandwidth=5e6,
                         topology=topology, scheduler=SchedulerConfig(policy="fifo")) as engine:
            steps(engine, rng, 3, rows=30)
            engine.cut("us")
            steps(engine, rng, 3, rows=30)
            engine.heal("us")
            steps(engine, rng, 2, rows=30)
            engine.cut("us")
            steps(engine, rng, 1, rows=30)
            engine.heal("us")
            engine.flush(timeout=60)
            assert differing(engine) == [], (trial, _versions_apart(engine), engine.stats())


def test_every_row_of_a_fifo_batch_counts_as_on_its_way(model_path: Path) -> None:
    """A fifo batch carries several commits of one table: while it is sent, every one of
    their rows is on its way (anti-entropy leaves them to the link), not only the last
    commit's (the per-table map kept the last entry: repairs pulled the others again)."""
    from ekko.engine import SchedulerConfig

    rng = np.random.default_rng(3)
    with ekko.Engine(ekko.compile_model(model_path), regions={"eu": 1, "us": 1},
                     primary_region="eu", wan_latency_ms=2,
                     scheduler=SchedulerConfig(policy="fifo")) as engine:
        link = engine.transport.links_of(1)[0]
        seen: list[tuple[int, bool]] = []
        carry = link._carry

        def watched(batch: list) -> None:
            ids = [b[1] for b in batch if b[0] == "a"]
            if ids:
                seen.append((len(ids), bool(link.waiting("a", np.concatenate(ids)).all())))
            carry(batch)

        link._carry = watched
        for _ in range(20):  # the link's idle poll may split a pair: try again
            with engine.batched():  # both commits reach the link together: one batch
                first = rng.choice(3000, 40, replace=False)
                engine.step("a", first, np.ones((40, 16), np.float32))
                engine.step("a", np.setdiff1d(np.arange(3000), first)[:40],
                            np.ones((40, 16), np.float32))
            engine.flush(timeout=60)
            if any(n == 2 for n, _ in seen):
                break
        assert any(n == 2 for n, _ in seen), seen  # two commits went in one batch
        assert all(ok for _, ok in seen), seen


def _versions_apart(engine) -> dict:
    """Per (replica, table) that differs: some ids and their versions there and on the
    primary (what a failure needs to say)."""
    out = {}
    for index, table in differing(engine):
        have, want = engine.replicas[index].versions(table), engine.primary.versions(table)
        bad = np.flatnonzero(have != want)[:8]
        out[(index, table)] = (bad.tolist(), have[bad].tolist(), want[bad].tolist())
    return out


def test_a_relay_that_is_down_is_replaced_and_repaired_from_its_region(model) -> None:
    rng = np.random.default_rng(5)
    with ekko.Engine(model, regions=REGIONS, **FAST) as engine:
        steps(engine, rng, 2)
        engine.flush(timeout=60)
        assert engine.relays["ap"] == 4
        engine.replica_down(4)
        steps(engine, rng, 3)
        engine.flush(timeout=60)
        assert engine.relays["ap"] == 5
        assert engine.stats()["regions"]["ap"]["relay_changes"] == 1
        assert differing(engine, [0, 1, 2, 3, 5]) == [] and differing(engine, [4])
        for _ in range(4):  # lookups go around the replica that is down
            engine.lookup("fa", np.array([3]), np.array([0]))
        assert engine.replicas[4].stats.lookup_ms.maxlen and not engine.replicas[4].stats.lookup_ms
        wan_before = engine.stats()["anti_entropy"]["rows_pulled_wan"]
        engine.replica_up(4)
        engine.flush(timeout=60)
        assert differing(engine) == []
        ae = engine.stats()["anti_entropy"]
        assert ae["sources"][-1] == (4, 5)  # its region's peer, not across the WAN
        assert ae["rows_pulled_wan"] == wan_before and ae["rows_pulled"] > 0


def test_a_relay_dying_before_it_forwards_leaves_its_peers_to_anti_entropy(model) -> None:
    rng = np.random.default_rng(6)
    with ekko.Engine(model, regions=REGIONS, **FAST) as engine:
        steps(engine, rng, 1)
        engine.flush(timeout=60)
        relay = engine.replicas[2]  # us
        merge = relay.deliver

        def deliver_then_die(packet, fetch):
            out = merge(packet, fetch)
            engine.geography.set_down(2, True)  # dies between its merge and the forward
            return out

        relay.deliver = deliver_then_die
        steps(engine, rng, 2)
        engine.flush(timeout=60)
        assert engine.relays["us"] == 3
        assert differing(engine, [3]) == []  # repaired from across the WAN: its peer died
        ae = engine.stats()["anti_entropy"]
        assert (3, 2) not in ae["sources"] and ae["rows_pulled_wan"] > 0
        relay.deliver = merge
        engine.replica_up(2)
        engine.flush(timeout=60)
        assert differing(engine) == []


def test_a_lagging_relay_is_replaced(model) -> None:
    rng = np.random.default_rng(8)
    with ekko.Engine(model, regions=REGIONS, relay_lag_ms=100, **FAST) as engine:
        relay = engine.replicas[4]
        merge = relay.deliver

        def slow(packet, fetch):
            time.sleep(0.3)
            return merge(packet, fetch)

        relay.deliver = slow
        steps(engine, rng, 1)
        engine.flush(timeout=60)
        steps(engine, rng, 1)
        engine.flush(timeout=60)
        assert engine.relays["ap"] == 5
        relay.deliver = merge
        steps(engine, rng, 1)
        engine.flush(timeout=60)
        assert differing(engine) == []


def test_a_row_arriving_twice_by_two_paths_is_harmless(model) -> None:
    """Newest version wins: an old packet merged again after newer ones, and a row
    delivered by its link and pulled by anti-entropy, leave the replicas identical."""
    rng = np.random.default_rng(9)
    with ekko.Engine(model, regions=REGIONS, **FAST) as engine:
        steps(engine, rng, 1)
        engine.flush(timeout=60)
        ids = np.arange(0, 3000, 7)
        old = engine.primary.pack("a", ids)
        steps(engine, rng, 2)
        engine.flush(timeout=60)
        for r in engine.replicas:
            r.merge(old)  # the old rows again: not newer, not written
            r.merge(engine.primary.pack("a", ids))  # the current ones a second time
        assert differing(engine) == []
        # both paths at once: the cut region's rows are pulled while its link sends more
        engine.cut("us")
        steps(engine, rng, 2)
        engine.heal("us")
        steps(engine, rng, 2)
        engine.flush(timeout=60)
        assert differing(engine) == []


def test_wan_links_follow_the_pair_budget(model_path: Path) -> None:
    """A relay link's bucket is the pair's bandwidth; a star's links into a region share
    it; and the bytes that crossed never exceed the budget (plus one bucket)."""
    with ekko.Engine(ekko.compile_model(model_path), regions={"eu": 1, "us": 2},
                     topology="star", primary_region="eu", wan_bandwidth=1e6,
                     wan_latency_ms=2) as engine:
        assert sorted(link.config.bandwidth or 0 for link in engine.links) == [0, 5e5, 5e5]
    rng = np.random.default_rng(4)
    bw = 200e3
    with ekko.Engine(ekko.compile_model(model_path), regions={"eu": 1, "us": 1},
                     primary_region="eu", wan_bandwidth=bw, wan_latency_ms=2,
                     compress=False) as engine:
        wan = [link for link in engine.links if link.pipe is not None][0]
        assert wan.config.bandwidth == bw
        t0 = time.monotonic()
        steps(engine, rng, 10, rows=600)
        time.sleep(0.3)
        sent = engine.stats()["wan_bytes"]
        elapsed = time.monotonic() - t0
        assert 0 < sent <= bw * elapsed + wan._depth() + 4096
        engine.flush(timeout=60)
        assert differing(engine) == []


def test_version_summaries_differ_only_in_the_buckets_that_differ() -> None:
    ids = np.arange(10 * BUCKET, dtype=np.int64)
    v = np.ones(len(ids), np.int64)
    w = v.copy()
    w[3 * BUCKET + 5] = 2
    assert np.flatnonzero(digests(ids, v) != digests(ids, w)).tolist() == [3]
    swapped = v.copy()
    swapped[[0, 1]] = [2, 0]  # same sum of versions, other rows: still seen
    assert (digests(ids, v) != digests(ids, swapped))[0]


def test_per_pair_budgets_and_delays(model) -> None:
    pairs = {("eu", "us"): 30e6, ("ap", "eu"): 10e6, ("us", "ap"): 5e6}
    with ekko.Engine(model, regions=REGIONS, primary_region="eu", wan_bandwidth=pairs,
                     wan_latency_ms={("eu", "us"): 1, ("eu", "ap"): 3, ("us", "ap"): 2}) as e:
        by_region = {link.group.region.name: link.config.bandwidth for link in e.links
                     if link.pipe is not None}
        assert by_region == {"us": 30e6, "ap": 10e6}
        assert e.transport.geography.pipes[("us", "ap")].latency_s == 0.002
    with pytest.raises(EkkoError, match=r"wan_bandwidth names no value for the pair\(s\)"):
        ekko.Engine(model, regions=REGIONS, primary_region="eu",
                    wan_bandwidth={("eu", "us"): 1e6})


BAD = [
    (dict(regions=REGIONS, primary_region="mars"), "unknown primary_region 'mars'"),
    (dict(regions=REGIONS), "regions= needs primary_region="),
    (dict(regions={"eu": 2, "us": 0}, primary_region="eu"), "region 'us' needs a positive"),
    (dict(regions={"eu": 2, "us": -1}, primary_region="eu"), "region 'us' needs a positive"),
    (dict(regions={}, primary_region="eu"), "regions must be a dict"),
    (dict(regions=REGIONS, primary_region="eu", wan_bandwidth=0), "wan_bandwidth must be a"),
    (dict(regions=REGIONS, primary_region="eu", wan_bandwidth=-5e6), "wan_bandwidth must be a"),
    (dict(regions=REGIONS, primary_region="eu", wan_latency_ms=0), "wan_latency_ms must be a"),
    (dict(regions=REGIONS, primary_region="eu", wan_latency_ms=-1), "wan_latency_ms must be a"),
    (dict(regions=REGIONS, primary_region="eu", wan_latency_ms=float("nan")),
     "wan_latency_ms must be a"),
    (dict(regions=REGIONS, primary_region="eu", topology="mesh"), "unknown topology 'mesh'"),
    (dict(regions=REGIONS, primary_region="eu", replicas=6), "give regions= or replicas="),
    (dict(regions=REGIONS, primary_region="eu", cluster="local", primary_shards=2),
     "regions= on Ray runs one primary shard"),
    (dict(replicas=2, topology="relay"), "topology: only with regions="),
    (dict(regions=[("eu", 2)], primary_region="eu"), "regions must be a dict"),
    (dict(regions={"eu": 2, 3: 1}, primary_region="eu"), "region names must be non-empty"),
    (dict(regions={"eu": 2, "us": 1.5}, primary_region="eu"), "region 'us' needs a positive"),
    (dict(regions=REGIONS, primary_region="eu", compress="yes"), "compress must be True"),
    (dict(regions=REGIONS, primary_region="eu", relay_lag_ms=0), "relay_lag_ms must be a"),
    (dict(regions=REGIONS, primary_region="eu", wan_bandwidth={("eu", "mars"): 1e6}),
     "not a pair of two known regions"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_region_options_raise_one_clear_error_and_start_nothing(model_path: Path, kwargs,
                                                                    message: str) -> None:
    m = ekko.compile_model(model_path)
    with ekko.Engine(m, replicas=1) as first:  # a bad engine must not retire this one
        threads = threading.active_count()
        with pytest.raises(EkkoError, match=message.replace("(", r"\(").replace(")", r"\)")):
            ekko.Engine(m, **kwargs)
        assert threading.active_count() == threads
        first.step("a", [1], np.ones((1, 16), np.float32))
        first.flush(timeout=60)


def test_bad_fault_injection_names_one_clear_error(model) -> None:
    with ekko.Engine(model, regions=REGIONS, **FAST) as engine:
        with pytest.raises(EkkoError, match="unknown region 'mars'"):
            engine.cut("mars")
        with pytest.raises(EkkoError, match="unknown region 'mars'"):
            engine.heal("mars")
        with pytest.raises(EkkoError, match="cannot cut 'eu': it is the primary's region"):
            engine.cut("eu")
        with pytest.raises(EkkoError, match="no replica 6"):
            engine.replica_down(6)
        assert not engine.stats()["regions"]["eu"]["cut"]
    with ekko.Engine(model, replicas=1) as plain:
        with pytest.raises(EkkoError, match="this engine has no regions"):
            plain.cut("ap")


def test_what_crosses_a_tight_wan_budget_first_is_the_schedulers_choice(model) -> None:
    """Under a WAN budget the priority scheduler sends a rare large update across before
    a crowd of small ones committed earlier (the bucket follows a clock moved by hand)."""
    clock = ManualClock()
    rng = np.random.default_rng(12)
    with ekko.Engine(model, regions={"eu": 1, "us": 1}, primary_region="eu",
                     wan_bandwidth=1e5, wan_latency_ms=1, compress=False,
                     scheduler=SchedulerConfig(clock=clock)) as engine:
        small = np.arange(1000, 1600)
        engine.step("a", small, (rng.standard_normal((600, 16)) * 1e-3).astype(np.float32))
        big = engine.step("a", [7], np.full((1, 16), 5.0, np.float32))
        wan = [link for link in engine.links if link.pipe is not None][0]
        clock.advance(0.03)  # a part of the backlog's bytes
        wait_until(lambda: engine.replicas[1].versions("a")[7] == big)
        assert wan.backlog() > 300  # most small rows still wait
        for _ in range(200):
            clock.advance(0.05)
            if wan.backlog() == 0:
                break
            time.sleep(0.01)
        engine.flush(timeout=60)
        assert differing(engine) == []


def test_a_dense_snapshot_a_cut_region_missed_arrives_after_the_heal() -> None:
    torch = pytest.importorskip("torch")
    from ekko.workloads.clicks_model import ClicksDense

    torch.manual_seed(0)
    dense = ClicksDense()
    model = ekko.compile_model("examples/clicks.ekko")
    with ekko.Engine(model, regions={"eu": 1, "ap": 2}, dense=dense, **FAST) as engine:
        engine.flush(timeout=60)
        engine.cut("ap")
        with torch.no_grad():
            next(dense.parameters()).add_(0.5)
        version = engine.publish_dense()
        engine.flush(timeout=60)  # the cut region is not waited for
        wan = [link for link in engine.links if link.pipe is not None][0]
        wait_until(lambda: wan.dense_sent >= version)
        assert [r.dense.version for r in engine.replicas] == [version, 1, 1]
        engine.heal("ap")
        engine.flush(timeout=60)
        assert [r.dense.version for r in engine.replicas] == [version] * 3


@pytest.mark.parametrize("topology", ["relay", "star"])
def test_faults_while_a_trainer_steps_end_byte_identical(model, topology: str) -> None:
    """Cuts, heals, a relay down and up, while a trainer thread steps all along. (Before
    a lost packet's rows stopped counting as on their way, a relay dying mid-forward
    left its peer stale here about one run in ten.)"""
    rng = np.random.default_rng(13)
    stop = threading.Event()
    errors: list[BaseException] = []
    with ekko.Engine(model, regions=REGIONS, topology=topology, **FAST) as engine:
        def train() -> None:
            try:
                while not stop.is_set():
                    steps(engine, rng, 1, rows=60)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        trainer = threading.Thread(target=train)
        trainer.start()
        try:
            for fault, undo in ((lambda: engine.cut("ap"), lambda: engine.heal("ap")),
                                (lambda: engine.replica_down(2), lambda: engine.replica_up(2)),
                                (lambda: engine.cut("us"), lambda: engine.heal("us")),
                                (lambda: engine.replica_down(5), lambda: engine.replica_up(5))):
                fault()
                time.sleep(0.1)
                undo()
                time.sleep(0.05)
        finally:
            stop.set()
            trainer.join()
        assert not errors
        engine.flush(timeout=60)
        assert differing(engine) == []
        assert engine.check()
        s = engine.stats()
        assert s["anti_entropy"]["runs"] >= 3 and all(not r["held"] for r in s["regions"].values())


def test_a_peer_held_back_by_its_group_moves_up_when_the_hold_is_lifted(model) -> None:
    """A send while a reachable member is held gives its whole group the hold's watermark;
    once the hold is lifted the others move up at once, with no send to move them (on Ray
    flush reads the replicas' own watermarks: before, replica 2 stayed behind for good)."""
    rng = np.random.default_rng(14)
    with ekko.Engine(model, regions=REGIONS, **FAST) as engine:
        steps(engine, rng, 1)
        engine.flush(timeout=60)
        engine.geography.stop()  # no anti-entropy: replica 3 stays held while it is up
        engine.replica_down(3)
        steps(engine, rng, 1)
        engine.flush(timeout=60)
        engine.replica_up(3)
        steps(engine, rng, 1)  # sent to 2 while 3 is up and held
        wait_until(lambda: engine.transport.links_of(2)[0].backlog() == 0)
        issued = {t: engine.primary.issued(t) for t in engine.primary.tables}
        assert engine.replicas[2].watermarks() != issued  # held back with 3
        engine.geography.start()
        engine.flush(timeout=60)
        assert differing(engine) == []
        assert engine.replicas[2].watermarks() == issued == engine.replicas[3].watermarks()


class Gate:
    """Holds a region link's batches on their way (as a slow WAN link would) while `open`
    is clear; `entered` is set when a batch reaches it."""

    def __init__(self, link) -> None:
        self.entered, self.open = threading.Event(), threading.Event()
        self.open.set()
        carry = link._carry

        def gated(batch: list) -> None:
            self.entered.set()
            self.open.wait(60)
            carry(batch)

        link._carry = gated

    def close(self) -> None:
        self.entered.clear()
        self.open.clear()


def test_a_full_copy_on_its_way_leaves_anti_entropy_the_rows_a_cut_lost(model) -> None:
    """policy "full" re-sends every row, but its watermark already counts the rows with
    no update pending as delivered. Healed while such a copy was on its way, anti-entropy
    left all its rows to the link and lifted the hold at that watermark: flush returned
    with the rows the cut lost still behind until the copy arrived (the engine fuzzer's
    silent-divergence case engine-22f101cb89e4, 13 of 20 replays, where check() passed
    too: an earlier check had marked those rows healthy while ap lagged). The copy is
    held on its way here, so this failed every time."""
    clock = ManualClock()
    rng = np.random.default_rng(22)
    with ekko.Engine(model, regions={"eu": 1, "ap": 1}, primary_region="eu",
                     wan_latency_ms=2, scheduler=SchedulerConfig(
                         policy="full", interval_s=1.0, clock=clock)) as engine:
        link = engine.transport.links_of(1)[0]
        engine.step("b", rng.integers(0, 400, 50), np.ones((50, 8), np.float32))
        clock.advance(1.0)
        engine.flush(timeout=60)  # a full copy delivered version 1
        engine.cut("ap")
        engine.step("b", rng.integers(0, 400, 50), np.ones((50, 8), np.float32))
        clock.advance(1.0)  # the copy with version 2 is lost: ap is held
        wait_until(lambda: engine.geography.held(1, "b") is not None and not link.busy)
        gate = Gate(link)
        gate.close()
        try:
            clock.advance(1.0)  # the next copy leaves, with nothing pending, and waits
            assert gate.entered.wait(60)
            engine.heal("ap")
            wait_until(lambda: engine.geography.held(1, "b") is None)  # repaired
            engine.flush(timeout=60)
            assert differing(engine) == [], _versions_apart(engine)
            assert engine.stats()["anti_entropy"]["rows_pulled"] > 0  # not by the copy
        finally:
            gate.open.set()


def test_a_peer_repaired_first_serves_the_next_only_what_it_holds(model) -> None:
    """Two held replicas of a star, repaired one after the other: the first left to its
    own link the rows that link had on their way, so it does not hold them until they
    arrive; the second, whose link lost them, must not count the first complete and pull
    from it. (It did: the first was counted complete up to its source's marks, the second
    was released without those rows, and flush returned; a loop of the fifo
    star cut/heal sequence of test_fifo_links_hold_a_cut_region_from_the_oldest_lost_commit
    did so in 8 of 200 trials.) The batches are held on their way here in the order that
    makes the first replica's hold the older, so this failed every time."""
    with ekko.Engine(model, regions={"eu": 1, "us": 2}, primary_region="eu", wan_latency_ms=2,
                     topology="star", scheduler=SchedulerConfig(policy="fifo")) as engine:
        first, second = (engine.transport.links_of(i)[0] for i in (1, 2))
        gates = Gate(first), Gate(second)
        try:
            engine.step("a", np.arange(0, 40), np.ones((40, 16), np.float32))
            engine.flush(timeout=60)
            gates[1].close()  # the second's next batch waits
            engine.cut("us")
            engine.step("a", np.arange(40, 80), np.ones((40, 16), np.float32))
            wait_until(lambda: engine.geography.held(1, "a") is not None and not first.busy)
            gates[0].close()
            engine.step("a", np.arange(80, 120), np.ones((40, 16), np.float32))
            assert gates[0].entered.wait(60)  # on its way to the first, and held there
            gates[1].open.set()  # the second loses both steps: held after the first
            wait_until(lambda: engine.geography.held(2, "a") is not None
                       and second.backlog() == 0 and not second.busy)
            engine.heal("us")
            wait_until(lambda: engine.geography.held(1, "a") is None
                       and engine.geography.held(2, "a") is None)  # both repaired
            gates[0].open.set()  # the first's rows arrive; the second's link sends none
            engine.flush(timeout=60)
            assert differing(engine) == [], _versions_apart(engine)
        finally:
            for gate in gates:
                gate.open.set()
