"""Across regions at Ekko's scale, simulated: star vs relay vs relay + zstd on WAN budgets.

    python benchmarks/geo.py [--quick] [--seconds S] [--stride M] [--seed N] [--no-quality]
                             [--out DIR]

A discrete-event simulation (a virtual clock and a heapq of events; nothing
sleeps) of one primary and `replicas` serving replicas in each of six
regions, fed over wide-area links with a bandwidth budget per region pair.
What it runs of the engine is the engine's own code; what it simulates is
stated here, every assumption of it.

The engine's code it runs:
* Each WAN link is an `ekko.engine.scheduler.Link` (the priority policy,
  its token bucket, significance against the table's running mean norm,
  superseding of pending rows, aging) on a virtual clock
  (`SchedulerConfig.clock`, `Clock.time_ns`). The simulation calls
  `Link.next_batch()`, the sender thread's own choice, every `poll_s` (5 ms
  of virtual time) and `Link.enqueue(Commit)` for every commit.
* Packet sizes are `Packet.nbytes` of real packets of the table's serving
  layout (examples/dlrm.ekko's `t_cat2`: int8, dim 64); compression is the
  engine's WAN framing (engine/wan.py: fields regrouped, zstandard level 3)
  on rows a real primary packed after training (the ratio and the codec's speed are measured at
  the start of the run, not assumed; the ids in those packets are
  redrawn over the full table's id range, as a large table's would be).
* Merge is newest-version-wins: a region holds, per touched row, how many
  of its updates it has (a packet carries the count the primary had when
  it packed, so a row arriving twice, or late, changes nothing).

The workload:
* `tables` tables of `table_rows` rows each (35e9 x 8 = 2.8e11 rows, 20 TB
  at 72 bytes a row); row popularity is Zipf(`zipf`) over each table. The
  trainer commits every table `commits_per_s` times a second (staggered);
  a commit's rows are the distinct ids of K lookups, with K chosen so that
  all tables together make `updates_per_s` (10M) distinct row updates a
  second. Update norms are lognormal(0, 0.25), and 1% of them (exactly,
  per table) 30x (benchmarks/freshness.py's significant share and scale):
  "the most significant 1%" are those, the top 1% by norm. The tables'
  running mean norm (significance is measured against it) follows the
  expected norm, as a full-scale commit's 12,500 rows would give it, not
  the few rows a sampled commit holds.
* Sampling (honest scaling): only the rows whose popularity rank is
  c + j * `stride` are simulated (one row in `stride`, c drawn per table),
  each with its full-scale update probability (drawn from the power law
  restricted to them, never materialising the rest), so every simulated
  row's update rate and superseding are what they would be at full scale.
  A simulated row update stands for `scale` real ones (the ratio of the
  expected distinct rows per commit, full over sampled; printed). The
  links' token buckets get the WAN budgets divided by `scale`, so each is
  as loaded as at full scale; transfer times and the reported bytes are
  full-scale: a simulated packet stands for one real packet of `scale` x
  its rows (split at the engine's 65536 rows a packet, a header each).
  The bucket keeps the engine's floor of 64 rows' bytes, which at the
  quick mode's sparser sample (1 row in 20,000) is 0.2 s of budget, so
  the quick mode's figures are coarser than the full run's.
* Sparse tables: memory follows the touched rows only (a compact index of
  the rows the trace touches; the links' pending sets and each region's
  versions are arrays over it).

The network:
* WAN: one FIFO pipe per link at its budget (bytes/s per region pair,
  `budget_share` of the uncompressed update rate: updates_per_s x bytes a
  row on the wire, header excluded), then the one-way latency. The slow
  region gets `slow_share` of the budget and `slow_latency_ms`. The cut
  region's link loses every packet from `cut_at_s`; its sender notices
  after `detect_s` and holds its rows (they keep superseding) until
  `heal_at_s`, when anti-entropy runs: the primary ships the (id, version)
  summary of the rows changed since the region's watermark (the
  model-update cache's query, 16 bytes a row, counted as WAN bytes), the
  region keeps the rows it lacks, and they are queued on the link with
  their oldest missing update's version and commit time (a row still
  queued is queued again: the priority policy merges the two, arrival
  order sends it twice). Only the primary sends over the WAN here (no
  region-to-region pulls).
* Topologies: "star (no budget)": every replica its own link from the
  primary, no budget, no pipe limit (what a star needs to move); "star":
  the same under the budget, each of a region's `replicas` links getting
  1/replicas of it; "relay": one link per region into a relay replica;
  "relay + zstd": the same, packets compressed (the link is charged each
  row's measured compressed bytes; compressing and decompressing a packet
  costs its bytes over the codec's measured single-core speed divided by
  `codec_cores`); "relay + zstd, fifo": the same with the scheduler's
  arrival-order policy (every update whole, in commit order) instead of
  ekko's priorities. The `replicas` links of a star region see the same
  commits under the same budget, so one is simulated and its bytes count
  `replicas` times.
* LAN: a relay forwards each packet down a tree of fan-out `fanout` (a
  hop: `lan_hop_ms` plus fan-out x min(packet, 65536 rows) over
  `lan_bytes_per_s`: store and forward of the engine's largest packet,
  pipelined behind it). In the primary's region the primary is the tree's
  root (relay) or sends to each local replica itself (star, its NIC
  serialising `replicas` copies of each commit). The primary's NIC is not
  otherwise limited (generous to the star).

Freshness of an update on a replica: when the replica holds that update
(or a newer one of its row) minus its commit time; per region over every
replica (a tree level's replicas weighted by their number). Updates still
missing at the end (after up to `drain_s` without new commits) are
reported as undelivered, not as freshness.

Then the quality model of benchmarks/quality.py (its functions, imported):
one replica kept by priority and one by fifo under a tight budget, and a
frozen one, on its click stream: log-loss gap to the trainer per byte moved.

Prints the tables; writes benchmarks/results/geo.md and geo.png. `--quick`
simulates a small sample briefly and writes nothing.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))

import ekko  # noqa: E402
from ekko.engine.packet import ROW_OVERHEAD, Packet  # noqa: E402
from ekko.engine.primary import Commit  # noqa: E402
from ekko.engine.scheduler import Clock, Link, SchedulerConfig  # noqa: E402
from ekko.engine.wan import WanCodec  # noqa: E402
from freshness import SIGNIFICANT_SCALE, SIGNIFICANT_SHARE  # noqa: E402
from results_io import add_out, load_note, write_results  # noqa: E402
MODEL = ROOT / "examples" / "dlrm.ekko"
TABLE = "t_cat2"  # the simulated tables have this table's serving layout
PACKET_ROWS = SchedulerConfig().max_packet_rows
EKKO = {"latency_s": 2.4, "wan_cut": 0.92}  # what Ekko (OSDI '22) reports
TARGET_SIG_S, TARGET_ALL_S = 1.0, 2.4
NORM_SIGMA = 0.25  # update norms are lognormal(0, NORM_SIGMA), SIGNIFICANT_SHARE of them scaled


@dataclass(frozen=True)
class Scenario:
    """Everything the simulation assumes (see the module docstring)."""

    regions: tuple[str, ...] = ("eu", "us-east", "us-west", "sa", "ap-south", "ap-east")
    latency_ms: tuple[float, ...] = (0.0, 40.0, 70.0, 95.0, 60.0, 110.0)  # one way from eu
    primary: str = "eu"
    replicas: int = 100  # per region
    tables: int = 8
    table_rows: float = 35e9
    zipf: float = 1.05
    updates_per_s: float = 10e6  # distinct row updates per second, all tables
    commits_per_s: float = 100.0  # per table
    seconds: float = 60.0
    drain_s: float = 30.0
    stride: int = 1000  # one row in `stride` is simulated
    budget_share: float = 0.8  # WAN budget per region pair, of the uncompressed update rate
    slow: str = "sa"
    slow_share: float = 0.6
    slow_latency_ms: float = 150.0
    cut: str = "ap-south"
    cut_at_s: float = 20.0
    heal_at_s: float = 35.0
    detect_s: float = 0.5
    fanout: int = 4
    lan_hop_ms: float = 0.2
    lan_bytes_per_s: float = 12.5e9  # 100 Gb/s
    codec_cores: int = 16
    burst_s: float = 0.05
    poll_s: float = 0.005
    seed: int = 0


# -- the workload: Zipf over a sample of each table's rows -----------------------------------
def _integral(a: float, b: float, s: float) -> float:
    """The integral of x^-s from a to b."""
    return (b ** (1 - s) - a ** (1 - s)) / (1 - s)


def _distinct(k: float, weights: np.ndarray, lo: float, hi: float, s: float, z: float,
              per: float) -> float:
    """Expected distinct rows among k lookups (Poissonised): exact over `weights` (the
    head's r^-s), then the tail x^-s on [lo, hi] integrated, one row every `per` ranks."""
    head = float(np.sum(-np.expm1(-k * weights / z)))
    x = np.geomspace(lo, hi, 4000)
    tail = float(np.trapezoid(-np.expm1(-k * x ** -s / z), x)) / per
    return head + tail


class SampledZipf:
    """Zipf(s) over ranks 1..n, restricted to the ranks offset + j * stride: each sampled
    row keeps its full-scale probability; the other rows are never materialised."""

    HEAD = 4096

    def __init__(self, n: float, s: float, stride: int, offset: int):
        self.n, self.s, self.stride, self.offset = n, s, stride, offset
        self.head = (offset + np.arange(self.HEAD, dtype=np.float64) * stride) ** -s
        self.lo = offset + (self.HEAD - 0.5) * stride
        self.tail = _integral(self.lo, n + 0.5, s) / stride
        r0 = int(min(1_000_000, n))  # exact over the first million ranks
        self.full_head = np.arange(1, r0 + 1, dtype=np.float64) ** -s
        self.r0 = r0
        self.z = float(self.full_head.sum()) + _integral(r0 + 0.5, n + 0.5, s)

    @property
    def mass(self) -> float:
        """The share of all lookups that land on sampled rows."""
        return (float(self.head.sum()) + self.tail) / self.z

    def distinct(self, k: float) -> tuple[float, float]:
        """Expected distinct rows among k lookups: (all rows, sampled rows)."""
        full = _distinct(k, self.full_head, self.r0 + 0.5, self.n + 0.5, self.s, self.z, 1.0)
        sampled = _distinct(k, self.head, self.lo, self.n + 0.5, self.s, self.z, self.stride)
        return full, sampled

    def lookups_for(self, rows: float) -> float:
        """K such that K lookups touch `rows` distinct rows on average (bisection)."""
        lo, hi = rows, rows * 1e4
        for _ in range(60):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if self.distinct(mid)[0] < rows else (lo, mid)
        return math.sqrt(lo * hi)

    def draw(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """`count` sampled rows (j, the index among sampled rows) by their probabilities."""
        head_sum = float(self.head.sum())
        u = rng.random(count) * (head_sum + self.tail)
        out = np.empty(count, np.int64)
        in_head = u < head_sum
        out[in_head] = np.searchsorted(np.cumsum(self.head), u[in_head], side="right")
        v = rng.random(int((~in_head).sum()))
        a, b, e = self.lo ** (1 - self.s), (self.n + 0.5) ** (1 - self.s), 1.0 / (1 - self.s)
        x = (a + v * (b - a)) ** e
        out[~in_head] = self.HEAD + np.floor((x - self.lo) / self.stride).astype(np.int64)
        return out


@dataclass
class Trace:
    """One table's simulated updates in commit order, and the same per row (CSR)."""

    name: str
    commit_t: np.ndarray  # per commit: time (s)
    bounds: np.ndarray  # per commit: its updates are [bounds[i], bounds[i + 1])
    slot: np.ndarray  # per update: the row (compact index over touched rows)
    t: np.ndarray  # per update: commit time
    norm: np.ndarray  # per update: its norm
    version: np.ndarray  # per update: its commit's version (1, 2, ...)
    rows: int  # touched rows
    by_row: np.ndarray = field(init=False)  # update indices grouped by row, in time order
    starts: np.ndarray = field(init=False)  # row r's updates: by_row[starts[r]:starts[r + 1]]

    def __post_init__(self) -> None:
        self.by_row = np.argsort(self.slot, kind="stable")
        self.starts = np.searchsorted(self.slot[self.by_row], np.arange(self.rows + 1))


@dataclass
class Workload:
    traces: list[Trace]
    scale: float  # real row updates per simulated one
    lookups: float  # K, per commit and table
    sampled_share: float  # share of all lookups on simulated rows
    significant_norm: float  # norms at least this are the most significant 1%
    mean_norm: float  # the expected norm: a full-scale commit's mean (12,500 rows)

    @property
    def updates(self) -> int:
        return sum(len(tr.slot) for tr in self.traces)


def make_workload(sc: Scenario) -> Workload:
    rng = np.random.default_rng(sc.seed)
    per_commit = sc.updates_per_s / sc.tables / sc.commits_per_s
    commits = int(round(sc.seconds * sc.commits_per_s))
    traces, full_rows, sampled_rows = [], 0.0, 0.0
    k = None
    for t in range(sc.tables):
        zipf = SampledZipf(sc.table_rows, sc.zipf, sc.stride, int(rng.integers(1, sc.stride + 1)))
        k = zipf.lookups_for(per_commit) if k is None else k
        full, sampled = zipf.distinct(k)
        full_rows, sampled_rows = full_rows + full, sampled_rows + sampled
        counts = rng.poisson(k * zipf.mass, commits)
        which = np.repeat(np.arange(commits, dtype=np.int64), counts)
        keys = np.unique((which << 32) | zipf.draw(int(counts.sum()), rng))
        commit_of, j = keys >> 32, keys & 0xFFFFFFFF
        _, slot = np.unique(j, return_inverse=True)
        commit_t = (np.arange(commits) + t / sc.tables) / sc.commits_per_s
        norm = rng.lognormal(0.0, NORM_SIGMA, len(slot))
        norm[rng.choice(len(slot), round(SIGNIFICANT_SHARE * len(slot)), replace=False)] \
            *= SIGNIFICANT_SCALE  # exactly 1%: the top 1% by norm are these
        traces.append(Trace(f"t{t}", commit_t, np.searchsorted(commit_of, np.arange(commits + 1)),
                            slot.astype(np.int64), commit_t[commit_of], norm, commit_of + 1,
                            int(slot.max()) + 1 if len(slot) else 0))
    norms = np.concatenate([tr.norm for tr in traces])
    mean = math.exp(NORM_SIGMA ** 2 / 2) * (1 + SIGNIFICANT_SHARE * (SIGNIFICANT_SCALE - 1))
    return Workload(traces, full_rows / sampled_rows, float(k), zipf.mass,
                    float(np.quantile(norms, 1 - SIGNIFICANT_SHARE)), mean)


# -- the codec, measured on packets a real primary packed -------------------------------------
@dataclass(frozen=True)
class Codec:
    """Bytes of a real packet of the scenario's layout, raw and zstd-compressed."""

    row_bytes: int  # the serving row
    header: int  # a packet's bytes besides its rows
    raw_row: float  # a row on the wire (id, version, commit time, the row)
    zstd_row: float  # the same, compressed (averaged over the measured packets)
    zstd_serving_row: float  # the serving rows alone, compressed
    compress_mb_s: float  # one core
    decompress_mb_s: float
    packets: int
    rows_per_packet: int

    @property
    def ratio(self) -> float:
        return self.zstd_row / self.raw_row


def measure_codec(sc: Scenario, packets: int, rows: int, steps: int) -> Codec:
    """Train the real table (freshness.py's gradients), pack touched rows, compress them."""
    import zstandard

    rng = np.random.default_rng(sc.seed)
    model = ekko.compile_model(str(MODEL), scale=0.01)
    table = next(t for t in model.model.tables if t.name == TABLE)
    from ekko.workloads.zipf import ZipfIds

    zipf = ZipfIds(table.rows, sc.zipf, rng)
    with ekko.Engine(model, replicas=1) as engine:
        for _ in range(steps):
            ids = zipf.draw(4096)
            grads = (rng.standard_normal((4096, table.dim)) * 0.01).astype(np.float32)
            grads[rng.random(4096) < SIGNIFICANT_SHARE] *= SIGNIFICANT_SCALE
            engine.step(TABLE, ids, grads)
        touched = np.flatnonzero(engine.primary.versions(TABLE) > 0)
        packed = [engine.primary.pack(TABLE, np.sort(rng.choice(touched, min(rows, len(touched)),
                                                                replace=False)))
                  for _ in range(packets)]
        row_bytes = engine.primary.row_bytes(TABLE)
    cctx = zstandard.ZstdCompressor(level=3)
    wan = WanCodec()  # the engine's own WAN framing: fields regrouped, then zstd
    raw = zipped = n = rows_zipped = 0
    c_s = d_s = 0.0
    for p in packed:
        ids = np.sort(rng.choice(int(sc.table_rows), len(p), replace=False))
        now = time.time_ns()
        packet = Packet(TABLE, ids, p.rows, p.versions, newest=p.newest,
                        commit_ns=now - rng.integers(0, 10**9, len(p)))
        t0 = time.perf_counter()
        z, wire = wan.encode(packet)
        t1 = time.perf_counter()
        assert wan.decode(z).to_bytes() == packet.to_bytes()
        c_s, d_s = c_s + t1 - t0, d_s + time.perf_counter() - t1
        raw, zipped, n = raw + wire, zipped + len(z), n + len(p)
        rows_zipped += len(cctx.compress(p.rows.tobytes()))
    one = Packet(TABLE, np.zeros(1, np.int64), packed[0].rows[:1], packed[0].versions[:1],
                 commit_ns=np.zeros(1, np.int64))
    none = Packet(TABLE, np.zeros(0, np.int64), packed[0].rows[:0], packed[0].versions[:0],
                  commit_ns=np.zeros(0, np.int64))
    header = none.nbytes
    raw_row = one.nbytes - header
    return Codec(row_bytes, header, raw_row, (zipped - header * len(packed)) / n,
                 rows_zipped / n, raw / c_s / 1e6, raw / d_s / 1e6, len(packed), n // len(packed))


# -- the simulated engine parts ------------------------------------------------------------------
class VirtualClock(Clock):
    """The simulation's clock: the links' buckets and ages follow it."""

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def time_ns(self) -> int:
        return int(round(self.t * 1e9))

    def wait(self, cond, seconds) -> None:
        raise RuntimeError("a simulated link has no sender thread")


class SimPrimary:
    """What a link reads of the primary (ports.LinkPrimary), over touched rows only; and
    each row's count of committed updates (its version, for newest-version-wins)."""

    def __init__(self, traces: list[Trace], wire_row: float, mean_norm: float):
        self.mean_norm = mean_norm  # a full-scale commit's thousands of norms average to it
        self.rows = {tr.name: tr.rows for tr in traces}
        self.count = {tr.name: np.zeros(tr.rows, np.int64) for tr in traces}
        self.wire_row = wire_row

    def commit(self, c: Commit) -> None:
        """As `Primary.step`: the rows' versions move on."""
        self.count[c.table][c.ids] += 1

    def table_rows(self) -> dict[str, int]:
        return dict(self.rows)

    def norm_mean(self, table: str) -> float:
        """The running mean of commits' mean norms: the expected norm (the sample's few
        rows a commit would make it noisy, and significance with it)."""
        return self.mean_norm

    def row_bytes(self, table: str) -> int:
        return max(1, int(round(self.wire_row)) - ROW_OVERHEAD)  # the link adds it back

    def issued(self, table: str) -> int:
        return 0


class SimReplica:
    """What a link tells its replica (ports.LinkReplica): nothing to tell in a simulation."""

    def __init__(self, index: int, tables: list[str]):
        self.index, self.tables = index, tables

    def traffic(self) -> dict[str, int]:
        return {t: 1 for t in self.tables}  # lookups spread evenly over the tables

    def note_issued(self, table: str, version: int) -> None:
        pass

    def divergence(self) -> dict:
        return {}

    def set_watermark(self, table: str, version: int) -> None:
        pass


@dataclass(frozen=True)
class Topology:
    """How updates cross the WAN: to every replica (star) or to one relay per region."""

    name: str
    relay: bool
    budget: bool = True
    compress: bool = False
    policy: str = "priority"  # the links' scheduler policy


TOPOLOGIES = (Topology("star (no budget)", False, budget=False), Topology("star", False),
              Topology("relay", True), Topology("relay + zstd", True, compress=True),
              Topology("relay + zstd, fifo", True, compress=True, policy="fifo"))


def tree_levels(nodes: int, fanout: int) -> list[int]:
    """How many nodes sit at each depth of a complete `fanout`-ary tree of `nodes`."""
    out, width = [], 1
    while nodes > 0:
        out.append(min(width, nodes))
        nodes -= out[-1]
        width *= fanout
    return out


@dataclass
class Samples:
    """Freshness samples (s) with weights (replicas they stand for)."""

    values: list[np.ndarray] = field(default_factory=list)
    weights: list[np.ndarray] = field(default_factory=list)

    def add(self, dt: np.ndarray, delays: np.ndarray, counts: np.ndarray) -> None:
        if len(dt):
            self.values.append((dt[:, None] + delays[None, :]).ravel().astype(np.float32))
            self.weights.append(np.tile(counts.astype(np.float32), len(dt)))

    def percentiles(self, qs: tuple[float, ...] = (50, 99)) -> list[float]:
        """Weighted percentiles: each sample counts as the replicas it stands for."""
        if not self.values:
            return [float("nan")] * len(qs)
        v, w = np.concatenate(self.values), np.concatenate(self.weights)
        order = np.argsort(v, kind="stable")
        cum = np.cumsum(w[order])
        return [float(v[order][min(len(v) - 1, np.searchsorted(cum, q / 100 * cum[-1]))])
                for q in qs]

    def max(self) -> float:
        return max((float(v.max()) for v in self.values), default=float("nan"))


@dataclass
class Region:
    """One region: what its replicas hold, how fresh, what crossed the WAN into it."""

    name: str
    latency_s: float
    budget: float  # bytes/s, full scale
    held: dict[str, np.ndarray]
    fresh: Samples = field(default_factory=Samples)
    significant: Samples = field(default_factory=Samples)
    wan_bytes: float = 0.0
    packets: int = 0
    lost_packets: int = 0
    undelivered: int = 0
    cut: bool = False
    paused: bool = False
    missing_at_heal: int = 0  # updates committed before the heal it lacked then
    caught_up_s: float | None = None
    resent_rows: int = 0
    changed_in_cut: int = 0
    summary_bytes: float = 0.0


class Simulation:
    """One topology over one workload: the event loop, the links, the regions."""

    def __init__(self, sc: Scenario, wl: Workload, codec: Codec, topo: Topology):
        self.sc, self.wl, self.codec, self.topo = sc, wl, codec, topo
        self.traces = {tr.name: tr for tr in wl.traces}
        self.clock = VirtualClock()
        self.wire_row = codec.zstd_row if topo.compress else codec.raw_row
        self.primary = SimPrimary(wl.traces, self.wire_row, wl.mean_norm)
        budget = sc.budget_share * sc.updates_per_s * codec.raw_row
        self.regions: list[Region] = []
        self.links: dict[str, Link] = {}
        self.pipe_free: dict[str, float] = {}
        self.inflight = 0
        self.copies = 1 if topo.relay else sc.replicas
        for k, (name, lat) in enumerate(zip(sc.regions, sc.latency_ms)):
            slow = name == sc.slow
            region = Region(name, (sc.slow_latency_ms if slow else lat) / 1e3,
                            budget * (sc.slow_share if slow else 1.0),
                            {tr.name: np.zeros(tr.rows, np.int64) for tr in wl.traces})
            self.regions.append(region)
            if name == sc.primary:
                continue
            per_link = region.budget / self.copies
            cfg = SchedulerConfig(policy=topo.policy, burst_s=sc.burst_s, clock=self.clock,
                                  bandwidth=per_link / wl.scale if topo.budget else None)
            self.links[name] = Link(self.primary, SimReplica(k, list(self.traces)), cfg)
            self.pipe_free[name] = 0.0
        self.heap: list = []
        self.seq = itertools.count()

    # -- helpers ------------------------------------------------------------------------------
    def push(self, t: float, kind: str, data: object = None) -> None:
        heapq.heappush(self.heap, (t, next(self.seq), kind, data))

    def packet_bytes(self, rows: int) -> float:
        """Full-scale bytes of a simulated packet of `rows` rows: scale x its rows, split
        into the engine's packets, a header each."""
        real = rows * self.wl.scale
        return math.ceil(real / PACKET_ROWS) * self.codec.header + real * self.wire_row

    def codec_s(self, nbytes: float) -> float:
        if not self.topo.compress:
            return 0.0
        raw = nbytes / self.codec.ratio / 1e6
        return (raw / self.codec.compress_mb_s + raw / self.codec.decompress_mb_s) \
            / self.sc.codec_cores

    def hop_s(self, nbytes: float, copies: int) -> float:
        chunk = min(nbytes, PACKET_ROWS * self.wire_row + self.codec.header)
        return self.sc.lan_hop_ms / 1e3 + copies * chunk / self.sc.lan_bytes_per_s

    def levels(self, nbytes: float, local: bool) -> tuple[np.ndarray, np.ndarray]:
        """(delay after the WAN arrival or the commit, replicas) per tree level."""
        sc = self.sc
        if not self.topo.relay:
            copies = sc.replicas if local else 1
            return np.array([self.hop_s(nbytes, copies) if local else 0.0]), \
                np.array([sc.replicas])
        counts = tree_levels(sc.replicas + 1 if local else sc.replicas, sc.fanout)
        depth = np.arange(len(counts), dtype=np.float64)
        delays, counts = depth * self.hop_s(nbytes, sc.fanout), np.array(counts)
        return (delays[1:], counts[1:]) if local else (delays, counts)

    # -- events -------------------------------------------------------------------------------
    def run(self) -> Simulation:
        sc = self.sc
        for k, tr in enumerate(self.wl.traces):
            if len(tr.commit_t):
                self.push(tr.commit_t[0], "commit", (k, 0))
        self.push(0.0, "poll")
        if sc.cut in self.links:
            self.push(sc.cut_at_s, "cut")
            self.push(sc.cut_at_s + sc.detect_s, "detect")
            self.push(sc.heal_at_s, "heal")
        end = sc.seconds + sc.drain_s
        while self.heap:
            t, _, kind, data = heapq.heappop(self.heap)
            self.clock.t = t
            if kind == "commit":
                self.commit(*data)
            elif kind == "poll":
                for name, link in self.links.items():
                    self.poll(name, link, t)
                if t < sc.seconds or (t < end and self.busy()):
                    self.push(t + sc.poll_s, "poll")
            elif kind == "arrive":
                self.arrive(t, *data)
            else:
                getattr(self, kind)(t)
        for r in self.regions:
            r.undelivered = sum(int((self.primary.count[n] - h).sum()) for n, h in r.held.items())
        return self

    def busy(self) -> bool:
        return self.inflight > 0 or any(link.backlog() for link in self.links.values())

    def commit(self, k: int, i: int) -> None:
        tr = self.wl.traces[k]
        lo, hi = tr.bounds[i], tr.bounds[i + 1]
        if i + 1 < len(tr.commit_t):
            self.push(tr.commit_t[i + 1], "commit", (k, i + 1))
        if hi == lo:
            return
        c = Commit(tr.name, i + 1, tr.slot[lo:hi], tr.norm[lo:hi], self.clock.time_ns())
        self.primary.commit(c)
        for link in self.links.values():
            link.enqueue(c, c.norms)
        local = next(r for r in self.regions if r.name == self.sc.primary)
        local.held[tr.name][c.ids] += 1
        delays, counts = self.levels(self.packet_bytes(hi - lo), local=True)
        zero = np.zeros(hi - lo)
        local.fresh.add(zero, delays, counts)
        local.significant.add(zero[tr.norm[lo:hi] >= self.wl.significant_norm], delays, counts)

    def poll(self, name: str, link: Link, t: float) -> None:
        region = self.region(name)
        if region.paused:
            return
        with link.cond:
            chosen = link.next_batch()
        if chosen is None:
            return
        for table, ids, _, _, _ in chosen[1]:
            counts = self.primary.count[table][ids].copy()
            nbytes = self.packet_bytes(len(ids))
            rate = region.budget / self.copies if self.topo.budget else float("inf")
            start = max(t, self.pipe_free[name])
            self.pipe_free[name] = start + nbytes / rate
            at = self.pipe_free[name] + region.latency_s + self.codec_s(nbytes)
            region.wan_bytes += nbytes * self.copies
            region.packets += 1
            self.inflight += 1
            self.push(at, "arrive", (name, table, ids, counts, nbytes))

    def region(self, name: str) -> Region:
        return next(r for r in self.regions if r.name == name)

    def arrive(self, t: float, name: str, table: str, ids: np.ndarray, counts: np.ndarray,
               nbytes: float) -> None:
        """A packet reaches the region's relay (or a star replica): newest version wins."""
        self.inflight -= 1
        region = self.region(name)
        if region.cut:
            region.lost_packets += 1
            return
        held = region.held[table]
        newer = counts > held[ids]
        ids, have, now = ids[newer], held[ids[newer]], counts[newer]
        held[ids] = now
        tr = self.traces[table]
        lens = now - have
        first = tr.starts[ids] + have
        idx = tr.by_row[np.repeat(first - np.cumsum(lens) + lens, lens)
                        + np.arange(int(lens.sum()))]
        dt = t - tr.t[idx]
        delays, weights = self.levels(nbytes, local=False)
        region.fresh.add(dt, delays, weights)
        region.significant.add(dt[tr.norm[idx] >= self.wl.significant_norm], delays, weights)
        if region.missing_at_heal and region.caught_up_s is None:
            region.missing_at_heal -= int((tr.t[idx] < self.sc.heal_at_s).sum())
            if region.missing_at_heal <= 0:
                region.caught_up_s = t - self.sc.heal_at_s

    def cut(self, t: float) -> None:
        self.region(self.sc.cut).cut = True

    def detect(self, t: float) -> None:
        self.region(self.sc.cut).paused = True

    def heal(self, t: float) -> None:
        """The link is back: anti-entropy over the rows changed since the region's watermark."""
        sc, region, link = self.sc, self.region(self.sc.cut), self.links[self.sc.cut]
        region.cut = region.paused = False
        missing = 0
        for tr in self.wl.traces:
            during = (tr.t >= sc.cut_at_s) & (tr.t < t)
            region.changed_in_cut += len(np.unique(tr.slot[during]))
            missing += self.repair(tr, region, link)
        region.wan_bytes += region.summary_bytes
        region.missing_at_heal = missing

    def repair(self, tr: Trace, region: Region, link: Link) -> int:
        """One table's anti-entropy: the primary's (id, version) summary of the rows changed
        since the region's watermark crosses the WAN; the rows the region lacks are queued
        on the link with their oldest missing update's version, commit time and largest
        missing norm (rows still queued there are queued again: the priority policy merges
        them, arrival order sends them twice). Returns the updates the region lacks."""
        count, held = self.primary.count[tr.name], region.held[tr.name]
        lacking = np.flatnonzero(held < count)
        if not len(lacking):
            return 0
        oldest = tr.by_row[tr.starts[lacking] + held[lacking]]  # each row's first missing
        mark = tr.t[oldest].min()  # the watermark: every update before it is held
        touched = np.flatnonzero(count > 0)
        last = tr.by_row[tr.starts[touched] + count[touched] - 1]
        candidates = int((tr.t[last] >= mark).sum())  # the update cache's changed_since
        region.summary_bytes += candidates * 16 * self.wl.scale * self.copies
        region.resent_rows += len(lacking)
        versions = tr.version[oldest]
        for v in np.unique(versions):
            rows = lacking[versions == v]
            at = tr.t[oldest[versions == v]][0]
            norms = np.array([tr.norm[tr.by_row[tr.starts[r] + held[r]:tr.starts[r] + count[r]]]
                              .max() for r in rows])
            link.enqueue(Commit(tr.name, int(v), rows, norms, int(round(at * 1e9))), norms)
        return int((count - held).sum())


# -- one run -------------------------------------------------------------------------------------
@dataclass
class GeoRun:
    scenario: Scenario
    workload: Workload
    codec: Codec
    sims: list[Simulation]
    wall_s: float
    quality: list[dict] | None = None
    quality_describe: str = ""
    quality_measured_s: float = 0.0


def simulate(sc: Scenario, codec: Codec, topologies=TOPOLOGIES, progress: bool = False) -> GeoRun:
    start = time.perf_counter()
    wl = make_workload(sc)
    sims = []
    for topo in topologies:
        if progress:
            print(f"  {topo.name}: {wl.updates:,} simulated row updates ...", file=sys.stderr,
                  flush=True)
        sims.append(Simulation(sc, wl, codec, topo).run())
    return GeoRun(sc, wl, codec, sims, time.perf_counter() - start)


def run_quality(quick: bool, fractions: list[float]) -> tuple[list[dict], str, float]:
    """benchmarks/quality.py's model: priority vs fifo (and frozen) under tight budgets."""
    import quality

    argv = ["--quick"] if quick else ["--quick", "--seconds", "240", "--warmup", "60"]
    config = quality.config_of(quality.parse_args(argv))
    unlimited = quality.run(config, [quality.Way("priority")])
    frozen = next(w for w in quality.WAYS if w.frozen)
    budgeted = quality.run(config, quality.budgeted_ways(unlimited, fractions) + [frozen])
    return quality.rows_of(budgeted), quality.describe(budgeted), budgeted.measured_s


# -- reporting ------------------------------------------------------------------------------------
def _s(x: float) -> str:
    return "-" if x != x else (f"{x * 1e3:.0f} ms" if x < 1 else f"{x:.2f} s")


def region_rows(sim: Simulation) -> list[dict]:
    """Per region: freshness percentiles (all, top 1%), WAN bytes, undelivered updates."""
    out = []
    for r in sim.regions:
        p50, p99 = r.fresh.percentiles()
        s50, s99 = r.significant.percentiles()
        out.append({"region": r.name, "p50": p50, "p99": p99, "max": r.fresh.max(),
                    "sig_p50": s50, "sig_p99": s99, "wan_bytes": r.wan_bytes,
                    "undelivered": r.undelivered, "budget": r.budget})
    return out


def worst(sim: Simulation, key: str, skip: tuple[str, ...] = ()) -> float:
    """The largest `key` over the regions not in `skip`."""
    vals = [row[key] for row in region_rows(sim) if row["region"] not in skip]
    return max(vals)


def wan_total(sim: Simulation) -> float:
    return sum(r.wan_bytes for r in sim.regions)


def format_regions(run: GeoRun) -> str:
    lines = ["| topology | region | WAN budget | p50 | p99 | max | top 1% p50 | top 1% p99 | "
             "WAN GB | undelivered |", "|---|---|---|---|---|---|---|---|---|---|"]
    for sim in run.sims:
        for row in region_rows(sim):
            note = {run.scenario.slow: " (slow)", run.scenario.cut: " (cut)"}.get(row["region"], "")
            budget = "LAN" if row["region"] == run.scenario.primary else (
                "none" if not sim.topo.budget else f"{row['budget'] / 1e9:.2f} GB/s")
            lines.append(f"| {sim.topo.name} | {row['region']}{note} | {budget} | "
                         f"{_s(row['p50'])} | {_s(row['p99'])} | {_s(row['max'])} | "
                         f"{_s(row['sig_p50'])} | {_s(row['sig_p99'])} | "
                         f"{row['wan_bytes'] / 1e9:,.0f} | {row['undelivered']:,} |")
    return "\n".join(lines) + "\n"


def format_topologies(run: GeoRun) -> str:
    base = wan_total(run.sims[0])
    sc = run.scenario
    lines = ["| topology | WAN GB | vs star (no budget) | WAN bytes / row update | worst p99 | "
             "worst top 1% p99 | worst p99 (not slow, not cut) |", "|---|---|---|---|---|---|---|"]
    real_updates = run.workload.updates * run.workload.scale
    for sim in run.sims:
        total = wan_total(sim)
        lines.append(f"| {sim.topo.name} | {total / 1e9:,.0f} | {total / base - 1:+.1%} | "
                     f"{total / real_updates:.1f} | {_s(worst(sim, 'p99'))} | "
                     f"{_s(worst(sim, 'sig_p99'))} | "
                     f"{_s(worst(sim, 'p99', (sc.slow, sc.cut)))} |")
    lines.append(f"| Ekko (OSDI '22, reported) | | -{EKKO['wan_cut']:.0%} | | "
                 f"{EKKO['latency_s']} s (update latency) | | |")
    return "\n".join(lines) + "\n"


def format_cut(run: GeoRun) -> str:
    out = []
    for sim in run.sims:
        r = sim.region(run.scenario.cut)
        up = "never" if r.caught_up_s is None else f"{r.caught_up_s:.2f} s"
        ratio = r.resent_rows / r.changed_in_cut if r.changed_in_cut else float("nan")
        out.append(f"- {sim.topo.name}: {r.lost_packets} packets lost in the cut; after the "
                   f"heal, {r.resent_rows:,} rows re-sent (simulated) for {r.changed_in_cut:,} "
                   f"rows changed during the cut ({ratio:.2f}x); version summary "
                   f"{r.summary_bytes / 1e6:,.0f} MB; caught up (every update committed "
                   f"before the heal held) {up} after the heal")
    return "\n".join(out) + "\n"


def verdicts(run: GeoRun) -> str:
    """The issue's targets, judged over the regions they can hold in: an update committed
    while its region is cut cannot arrive before the heal, so the cut region is apart."""
    sc, wl, codec = run.scenario, run.workload, run.codec
    star0 = run.sims[0]
    lines = []
    for sim in run.sims[2:]:
        sig = worst(sim, "sig_p99", (sc.cut,))
        calm = worst(sim, "p99", (sc.slow, sc.cut))
        slow, cut = sim.region(sc.slow), sim.region(sc.cut)
        share = wan_total(sim) / wan_total(star0)
        lines.append(
            f"- {sim.topo.name}: top-1% p99 {_s(sig)} in the worst region but the cut one "
            f"(target < {TARGET_SIG_S:.0f} s: {'met' if sig < TARGET_SIG_S else 'MISSED'}); "
            f"all updates p99 {_s(calm)} in the worst region but the slow and the cut one "
            f"(target < {TARGET_ALL_S} s: {'met' if calm < TARGET_ALL_S else 'MISSED'}); the "
            f"slow region {_s(slow.fresh.percentiles()[1])} (top 1% "
            f"{_s(slow.significant.percentiles()[1])}), the cut one "
            f"{_s(cut.fresh.percentiles()[1])} (top 1% {_s(cut.significant.percentiles()[1])}); "
            f"WAN bytes {share:.4f} of star (no budget)'s (target <= 1/{sc.replicas} + headers: "
            f"{'met' if share <= 1.01 / sc.replicas else 'MISSED'})")
    rate = sc.updates_per_s * codec.raw_row
    lines.append(f"- WAN budget per region pair {sc.budget_share * rate / 1e9:.2f} GB/s = "
                 f"{sc.budget_share:.0%} of the uncompressed update rate "
                 f"({rate / 1e9:.2f} GB/s); the slow region {sc.slow_share:.0%} of that")
    lines.append(f"- compression (the engine's WAN framing, engine/wan.py, on {codec.packets} "
                 "real packets of "
                 f"{codec.rows_per_packet:,} rows): {codec.raw_row:.0f} -> {codec.zstd_row:.1f} "
                 f"bytes a row ({codec.ratio:.2f}x; the serving row alone is "
                 f"{codec.row_bytes} bytes: "
                 f"{'fewer' if codec.zstd_row < codec.row_bytes else 'NOT fewer'}; the "
                 f"serving rows alone compress to {codec.zstd_serving_row:.1f}); "
                 f"{codec.compress_mb_s:.0f} / {codec.decompress_mb_s:.0f} MB/s a core")
    lines.append(f"- sampling: 1 row in {sc.stride:,} simulated, {wl.sampled_share:.3%} of the "
                 f"lookups; {wl.updates:,} simulated row updates, each for {wl.scale:,.0f} real "
                 f"ones ({wl.updates * wl.scale / sc.seconds / 1e6:.1f}M real row updates/s); "
                 f"K = {wl.lookups:,.0f} lookups per commit and table")
    return "\n".join(lines) + "\n"


def format_quality(rows: list[dict], measured_s: float) -> str:
    """Per way: its log-loss gap, its bytes, and the log-loss it gained over the frozen
    replica per MB it moved (the quality a WAN byte served)."""
    frozen = next(m for m in rows if m["name"] == "frozen")
    lines = ["| replica kept fresh by | log-loss gap to trainer | KB / stream s | budget "
             "KB / stream s | log-loss below frozen's, per MB moved |", "|---|---|---|---|---|"]
    for m in rows[1:]:
        gained = frozen["logloss"] - m["logloss"]
        mb = m["kb_s"] * measured_s / 1e3
        per_mb = "-" if m["name"] == "frozen" else f"{gained / mb:.2e}"
        budget = "-" if m["bandwidth"] is None else f"{m['bandwidth'] / 1e3:.1f}"
        lines.append(f"| {m['name']} | {m['gap']:+.2f}% | {m['kb_s']:.1f} | {budget} | "
                     f"{per_mb} |")
    return "\n".join(lines) + "\n"


def report(run: GeoRun) -> str:
    sc = run.scenario
    tb = sc.tables * sc.table_rows * run.codec.row_bytes / 1e12
    text = (f"## Across regions at Ekko's scale, simulated\n\n"
            f"{len(sc.regions)} regions x {sc.replicas} replicas, primary in {sc.primary}; "
            f"{sc.tables} tables of {sc.table_rows:.3g} rows ({tb:.0f} TB of "
            f"{run.codec.row_bytes}-byte serving rows); {sc.updates_per_s / 1e6:.0f}M row "
            f"updates/s for {sc.seconds:.0f} s (then up to {sc.drain_s:.0f} s without commits); "
            f"{sc.slow} slow, {sc.cut} cut from {sc.cut_at_s:.0f} s to {sc.heal_at_s:.0f} s. "
            f"Discrete-event simulation driving the engine's scheduler links (see the module "
            f"docstring of benchmarks/geo.py for every assumption); {run.wall_s:.0f} s wall.\n\n"
            + verdicts(run) + "\n### Per region\n\nFreshness over every replica of the "
            "region (commit to visible), all updates and the most significant 1%.\n\n"
            + format_regions(run) + "\n### Topologies\n\n" + format_topologies(run)
            + "\n### The cut\n\n" + format_cut(run))
    if run.quality is not None:
        text += ("\n### Served quality per WAN byte under a tight budget\n\nbenchmarks/"
                 "quality.py's stream and model; each budget is a share of the row bytes the "
                 "unlimited priority link moved plus the dense snapshots' (the same for both "
                 "policies).\n\n" + run.quality_describe + "\n\n"
                 + format_quality(run.quality, run.quality_measured_s))
    return text


def plot(run: GeoRun, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 5))
    names = list(run.scenario.regions)
    width = 0.8 / len(run.sims)
    for k, sim in enumerate(run.sims):
        rows = region_rows(sim)
        x = np.arange(len(names)) + k * width
        ax.bar(x, [max(r["p99"], 1e-3) for r in rows], width, label=f"{sim.topo.name} p99")
        ax.scatter(x, [max(r["sig_p99"], 1e-3) for r in rows], marker="v", color="k", s=12)
    ax.axhline(TARGET_ALL_S, ls="--", c="grey")
    ax.axhline(TARGET_SIG_S, ls=":", c="grey")
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
    ax.set_yscale("log")
    ax.set_ylabel("freshness p99 (s); v: most significant 1%")
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    ax.set_title("per region (targets: 2.4 s all, 1 s top 1%)")
    bx.bar([s.topo.name for s in run.sims], [wan_total(s) / 1e9 for s in run.sims])
    bx.set_yscale("log")
    bx.set_ylabel("WAN GB")
    bx.set_title("WAN bytes by topology")
    bx.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------
def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small sample briefly; writes nothing")
    p.add_argument("--seconds", type=_positive(float), default=None,
                   help="virtual s of commits (60; 12 quick)")
    p.add_argument("--stride", type=_positive(int), default=None,
                   help="one row in M simulated (1000; 20000 quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-quality", action="store_true", help="skip the quality section")
    add_out(p)
    return p.parse_args(argv)


def scenario_of(args: argparse.Namespace) -> Scenario:
    if args.quick:
        seconds = args.seconds or 12.0
        return Scenario(seconds=seconds, drain_s=10.0, stride=args.stride or 20000,
                        cut_at_s=seconds / 3, heal_at_s=seconds / 2, seed=args.seed)
    seconds = args.seconds or 60.0
    return Scenario(seconds=seconds, stride=args.stride or 1000, cut_at_s=seconds / 3,
                    heal_at_s=seconds / 3 + 15.0, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sc = scenario_of(args)
    load = os.getloadavg()[0]
    codec = measure_codec(sc, packets=2 if args.quick else 8, rows=16384,
                          steps=50 if args.quick else 300)
    run = simulate(sc, codec, progress=not args.quick)
    if not args.no_quality:
        budgets = [0.05] if args.quick else [0.05, 0.01]
        run.quality, run.quality_describe, run.quality_measured_s = run_quality(args.quick,
                                                                                budgets)
    text = report(run) + f"\n{load_note(load)}\n"
    print(text)
    write_results(args, "geo", text, lambda path: plot(run, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
