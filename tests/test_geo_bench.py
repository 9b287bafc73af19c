"""benchmarks/geo.py, the simulation across regions: its quick mode's properties, its
sampling's honesty, and the scheduler hooks it drives (Link.next_batch, Clock.time_ns)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from ekko.engine.primary import Commit
from ekko.engine.scheduler import Link, SchedulerConfig
from tests.scripts import load_script

geo = load_script("benchmarks/geo.py")


@pytest.fixture(scope="module")
def quick():
    args = geo.parse_args(["--quick", "--no-quality"])
    sc = geo.scenario_of(args)
    codec = geo.measure_codec(sc, packets=2, rows=16384, steps=50)
    return geo.simulate(sc, codec)


def _sim(run, name: str):
    return next(s for s in run.sims if s.topo.name == name)


def test_relay_moves_one_copy_per_region_and_zstd_fewer(quick):
    star, relay, zstd = (_sim(quick, n) for n in ("star (no budget)", "relay", "relay + zstd"))
    replicas = quick.scenario.replicas
    assert geo.wan_total(relay) <= geo.wan_total(star) / replicas * 1.01
    assert geo.wan_total(zstd) < geo.wan_total(relay)
    assert quick.codec.zstd_row < quick.codec.raw_row  # measured on real packets


def test_every_update_reaches_every_region(quick):
    for name in ("star (no budget)", "relay", "relay + zstd"):
        sim = _sim(quick, name)
        for region in sim.regions:
            assert region.undelivered == 0, (name, region.name)
            for table, held in region.held.items():  # newest version wins: all equal
                assert np.array_equal(held, sim.primary.count[table]), (name, region.name)
    updates = quick.workload.updates
    assert updates > 1000
    assert all(len(np.concatenate(r.fresh.values)) >= updates
               for r in _sim(quick, "relay").regions)


def test_cut_region_catches_up_resending_only_what_changed(quick):
    for name in ("relay", "relay + zstd"):
        cut = _sim(quick, name).region(quick.scenario.cut)
        assert cut.lost_packets > 0  # the cut dropped packets: anti-entropy had work
        assert cut.caught_up_s is not None
        assert 0 < cut.resent_rows <= 1.25 * cut.changed_in_cut
        assert cut.summary_bytes > 0


def test_priority_keeps_the_significant_fresh_where_the_link_is_short(quick):
    sim = _sim(quick, "relay + zstd")
    slow = sim.region(quick.scenario.slow)
    p99 = slow.fresh.percentiles()[1]
    sig99 = slow.significant.percentiles()[1]
    assert sig99 < p99 / 3  # the slow link is behind, its significant rows are not
    fifo = _sim(quick, "relay + zstd, fifo").region(quick.scenario.slow)
    assert fifo.significant.percentiles()[1] > 3 * sig99  # arrival order: they queue too
    star = _sim(quick, "star")  # a star region gets 1/replicas of the budget: far behind
    assert star.region(quick.scenario.slow).undelivered > 0


def test_quick_writes_nothing_and_reports_quality(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys.modules["results_io"], "RESULTS", tmp_path)
    monkeypatch.chdir(tmp_path)
    assert geo.main(["--quick"]) == 0
    assert list(tmp_path.iterdir()) == []
    out = capsys.readouterr().out
    assert "### Served quality per WAN byte" in out and "| star (no budget) |" in out
    gaps = {line.split("|")[1].strip(): float(line.split("|")[2].strip().rstrip("%"))
            for line in out.splitlines() if "@ 5% rows" in line}
    assert gaps["priority @ 5% rows"] < gaps["fifo @ 5% rows"]


def test_sampled_zipf_keeps_full_scale_rates():
    """The expected distinct rows (what the byte scale rests on) match brute force, over
    the whole table and over the sampled rows."""
    n, s, stride = 200_000, 1.05, 10
    zipf = geo.SampledZipf(n, s, stride, offset=3)
    k = 5000.0
    full, sampled = zipf.distinct(k)
    rng = np.random.default_rng(0)
    p = np.arange(1, n + 1, dtype=np.float64) ** -s
    p /= p.sum()
    draws = [len(np.unique(rng.choice(n, rng.poisson(k), p=p))) for _ in range(40)]
    assert abs(np.mean(draws) / full - 1) < 0.03
    on = [len(np.unique(zipf.draw(rng.poisson(k * zipf.mass), rng))) for _ in range(200)]
    ranks = 3 + np.arange(0, n // stride) * stride
    exact = float(np.sum(-np.expm1(-k * p[ranks[ranks <= n] - 1])))
    assert abs(np.mean(on) / exact - 1) < 0.05
    assert abs(sampled / exact - 1) < 0.05


# -- the scheduler hooks the simulation drives ---------------------------------------------------
class _Primary:
    def table_rows(self):
        return {"t": 200}

    def norm_mean(self, table):
        return 1.0

    def row_bytes(self, table):
        return 40

    def issued(self, table):
        return 0


class _Replica:
    index = 0

    def traffic(self):
        return {"t": 1}

    def note_issued(self, table, version):
        pass

    def divergence(self):
        return {}

    def set_watermark(self, table, version):
        pass


def test_link_follows_a_virtual_clock():
    """Link.next_batch is the sender's choice on the clock it is given: the bucket fills
    and rows age on the virtual time only (Clock.time_ns), the significant row first."""
    clock = geo.VirtualClock()
    link = Link(_Primary(), _Replica(), SchedulerConfig(bandwidth=16384, clock=clock))
    ones = np.ones(100)
    link.enqueue(Commit("t", 1, np.arange(100), ones, 0), ones)
    assert link.next_batch() is None  # the bucket starts empty and the clock stands still
    clock.t = 1.0
    norms = np.ones(50)
    norms[20] = 50.0
    link.enqueue(Commit("t", 2, np.arange(100, 150), norms, 10**9), norms)
    assert link.lag_ms() == pytest.approx(1000.0)  # on the clock's time, not the wall's
    with link.cond:
        dense, batch = link.next_batch()
    (table, ids, _, _, first), = batch
    assert dense is None and table == "t" and first == 1
    assert len(ids) == (4096 - 64) // 64  # a bucket (64 rows of 64 bytes) less a header
    assert 120 in ids and set(ids.tolist()) - {120} <= set(range(100))
    assert link.backlog() == 150 - len(ids) and link.next_batch() is None


@pytest.mark.parametrize("argv", [["--stride", "0"], ["--seconds", "-1"], ["--stride", "x"]])
def test_bad_arguments_are_refused_by_name(argv, capsys):
    with pytest.raises(SystemExit) as e:
        geo.parse_args(argv)
    assert e.value.code == 2
    assert argv[0] in capsys.readouterr().err
