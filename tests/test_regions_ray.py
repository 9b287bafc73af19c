"""Regions on Ray: replica actors placed on their region's nodes, relays that are replica
actors, a relay killed with SIGKILL while a trainer steps, cuts healed by anti-entropy
between actors, and one clear error for bad options.

One three-node `ray.cluster_utils.Cluster` (a node per region, each offering its
region's resource) serves the whole file. Every test ends with the replicas compared
with the primary byte for byte (tests/test_engine_ray.py's helpers); WAN figures are
counted rows and bytes. WAN delays are a few ms, to stay quick.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest

import ekko
from ekko.kernels.errors import EkkoError
from tests.cluster_model import MODEL, WAIT
from tests.test_engine_ray import (Stream, assert_replicas_match, start_cluster, streaming,
                                   wait_for)

ray = pytest.importorskip("ray")

REGIONS = {"eu": 1, "us": 2, "ap": 2}  # replicas 0 | 1-2 | 3-4
FAST = {"primary_region": "eu", "wan_bandwidth": 50e6, "wan_latency_ms": 3}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("regions-ray") / "small.ekko"
    path.write_text(MODEL)
    return ekko.compile_model(path)


@pytest.fixture(scope="module")
def regions_cluster():
    """Three nodes, one a region; yields (the cluster, {node id: region})."""
    cluster, ids = start_cluster([{f"ekko_region_{r}": 1} for r in REGIONS])
    try:
        yield cluster, dict(zip(ids, REGIONS))
    finally:
        ray.shutdown()
        cluster.shutdown()


@contextlib.contextmanager
def engine_on(cluster, model, **kw):
    """An engine on the cluster, its actors ended afterwards (the next test's have room)."""
    engine = ekko.Engine(model, regions=kw.pop("regions", REGIONS), cluster=cluster.address,
                         **{**FAST, **kw})
    try:
        with engine:
            yield engine
    finally:
        engine.shutdown()


def wan_rows_into(engine, region: str) -> int:
    return sum(c["rows"] for name, c in engine.stats()["wan"]["links"].items()
               if name.endswith("->" + region))


def changed_rows(steps: list) -> int:
    """Distinct (table, id) pairs the steps changed."""
    return len({(t, int(i)) for t, ids, _ in steps for i in ids})


def all_up(engine) -> bool:
    return not any(r["down"] for r in engine.stats()["regions"].values())


def test_relays_on_ray_keep_every_replica_byte_identical(model, regions_cluster) -> None:
    cluster, nodes = regions_cluster
    stream = Stream(model, seed=1)
    with engine_on(cluster, model, topology="relay") as engine:
        for _ in range(4):
            stream.step(engine)
        engine.flush(WAIT)
        assert_replicas_match(engine)
        assert [r.region for r in engine.replicas] == ["eu", "us", "us", "ap", "ap"]
        assert engine.relays == {"us": 1, "ap": 3}
        s = engine.stats()
        # placement: every replica on its region's node, the primary shard on eu's
        assert [nodes[p["node"]] for p in s["replicas"]] == [r.region for r in engine.replicas]
        assert nodes[s["primaries"][0]["node"]] == "eu"
        assert [p["region"] for p in s["replicas"]] == [r.region for r in engine.replicas]
        # one WAN link per remote region, and the relay forwarded to its peer (not us)
        assert {n for n, c in s["wan"]["links"].items() if c["rows"]} == {"eu->us", "eu->ap"}
        assert s["wan_bytes"] == sum(c["bytes"] for c in s["wan"]["links"].values()) > 0
        assert set(s["freshness_ms_by_region"]) == set(REGIONS)
        for region, f in s["freshness_ms_by_region"].items():
            assert f["count"] > 0 and 0 < f["p50"] <= f["p99"] <= f["max"], region
        assert s["freshness_ms_by_region"]["ap"]["p50"] >= 3.0  # at least the WAN delay
        # bad fault injection: one clear error each, nothing changed
        with pytest.raises(EkkoError, match="unknown region 'mars'"):
            engine.cut("mars")
        with pytest.raises(EkkoError, match="cannot cut 'eu': it is the primary's region"):
            engine.cut("eu")
        with pytest.raises(EkkoError, match="no replica 5"):
            engine.replica_down(5)
        assert not any(r["cut"] for r in engine.stats()["regions"].values())


def test_a_relay_sends_one_wan_copy_per_region_a_star_one_per_replica(model,
                                                                      regions_cluster) -> None:
    cluster, _ = regions_cluster
    figures = {}
    for topology in ("star", "relay"):
        stream = Stream(model, seed=7)
        with engine_on(cluster, model, topology=topology, compress=False) as engine:
            for _ in range(4):  # flushed one by one: each link sends each step's rows once
                stream.step(engine)
                engine.flush(WAIT)
            assert_replicas_match(engine)
            s = engine.stats()
            figures[topology] = (s["wan_bytes"], s["wan"]["rows"],
                                 sum(c["packets"] for c in s["wan"]["links"].values()))
    (star_bytes, star_rows, _), (relay_bytes, relay_rows, relay_packets) = (figures["star"],
                                                                            figures["relay"])
    assert star_rows == 2 * relay_rows > 0  # R = 2 replicas in each remote region
    assert relay_bytes <= star_bytes / 2 + 64 * relay_packets  # headers, name, CRC, frame byte


def test_after_a_cut_heals_actors_repair_only_what_was_missed(model, regions_cluster) -> None:
    cluster, _ = regions_cluster
    stream = Stream(model, seed=11)
    with engine_on(cluster, model) as engine:
        stream.step(engine)
        engine.flush(WAIT)
        engine.cut("ap")
        before = wan_rows_into(engine, "ap")
        first = len(stream.steps)
        for _ in range(3):
            stream.step(engine)
        engine.flush(WAIT)  # does not wait for the cut region
        ap_link = engine.transport.links_of(3)[0]
        wait_for(lambda: ap_link.backlog() == 0)
        s = engine.stats()
        assert s["regions"]["ap"]["held"] == [3, 4] and s["wan"]["dropped_rows"] > 0
        engine.heal("ap")
        engine.flush(WAIT)
        assert_replicas_match(engine)
        during = changed_rows(stream.steps[first:])
        resent = wan_rows_into(engine, "ap") - before
        ae = engine.stats()["anti_entropy"]
        assert 0 < resent <= 1.2 * during, (resent, during)
        assert 0 < ae["rows_pulled_wan"] <= 1.2 * during
        # the first ap replica from the nearest region that is not the primary's, the
        # second from the first (in its region: no second WAN copy)
        (a, src_a), (b, src_b) = ae["sources"][-2:]
        assert engine.replicas[src_a].region == "us" and src_b == a
        assert engine.stats()["regions"]["ap"]["held"] == []


def test_kill_9_of_a_relay_while_a_trainer_steps(model, regions_cluster) -> None:
    """The relay of us is killed with SIGKILL while a trainer thread steps: a new relay is
    named and merges the region's packets within 1 s (measured from the kill to the
    first packet merged through it), the killed one restarts and is repaired, and
    every replica ends byte-identical to the primary."""
    cluster, _ = regions_cluster
    stream = Stream(model, seed=13)
    with engine_on(cluster, model, relay_lag_ms=500) as engine:
        stream.step(engine)
        engine.flush(WAIT)
        old = engine.relays["us"]
        pid = engine.replicas[old].pid
        link = engine.transport.links_of(old)[0]
        with streaming(engine, stream):
            wait_for(lambda: len(stream.steps) > 30, every=0.01)
            os.kill(pid, signal.SIGKILL)
            killed = time.time()
            wait_for(lambda: engine.relays["us"] != old, every=0.002)
            named = time.time() - killed
            merged = wait_for(lambda: next((t for i, t in link.relayed
                                            if i != old and t > killed), None), every=0.002)
            merged -= killed
            wait_for(lambda: len(stream.steps) > 30 + len(stream.tables) * 10, every=0.01)
        print(f"new relay named {named * 1e3:.0f} ms, first merge through it "
              f"{merged * 1e3:.0f} ms after the kill")
        assert engine.relays["us"] == 2 and named <= merged <= 1.0, (named, merged)
        wait_for(lambda: all_up(engine))  # Ray restarted it; it caught up and answers
        assert engine.replicas[old].pid != pid
        engine.flush(WAIT)
        assert_replicas_match(engine)
        s = engine.stats()
        assert s["regions"]["us"]["relay_changes"] >= 1 and s["regions"]["us"]["held"] == []
        assert any(i == old for i, _ in s["anti_entropy"]["sources"])


def test_a_dense_snapshot_a_cut_region_missed_arrives_after_the_heal(regions_cluster) -> None:
    torch = pytest.importorskip("torch")
    from ekko.workloads.clicks_model import ClicksDense

    cluster, _ = regions_cluster
    torch.manual_seed(0)
    dense = ClicksDense()
    model = ekko.compile_model("examples/clicks.ekko")
    with engine_on(cluster, model, regions={"eu": 1, "ap": 2}, dense=dense) as engine:
        engine.flush(WAIT)
        engine.cut("ap")
        with torch.no_grad():
            next(dense.parameters()).add_(0.5)
        version = engine.publish_dense()
        engine.flush(WAIT)  # the cut region is not waited for
        wan = next(link for link in engine.transport.shard_links[0] if link.pipe is not None)
        wait_for(lambda: wan.dense_sent >= version)
        assert [r.held_dense() for r in engine.replicas] == [version, 1, 1]
        engine.heal("ap")
        engine.flush(WAIT)
        assert [r.held_dense() for r in engine.replicas] == [version] * 3


def test_bad_region_options_on_ray_raise_one_clear_error(model, regions_cluster) -> None:
    cluster, _ = regions_cluster
    t0 = time.monotonic()
    with pytest.raises(EkkoError, match=r"no node of the Ray cluster offers region\(s\) mars"):
        ekko.Engine(model, regions={"eu": 1, "mars": 1}, primary_region="eu",
                    cluster=cluster.address)
    assert time.monotonic() - t0 < WAIT  # refused, not waited for (Ray would wait for ever)
    with pytest.raises(EkkoError, match="unknown primary_region 'mars'"):
        ekko.Engine(model, regions=REGIONS, primary_region="mars", cluster=cluster.address)
    with pytest.raises(EkkoError, match="regions= on Ray runs one primary shard"):
        ekko.Engine(model, regions=REGIONS, primary_region="eu", cluster=cluster.address,
                    primary_shards=2)
    with pytest.raises(EkkoError, match="wan_bandwidth must be a"):
        ekko.Engine(model, regions=REGIONS, primary_region="eu", cluster=cluster.address,
                    wan_bandwidth=0)
