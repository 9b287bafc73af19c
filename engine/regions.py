"""Regions: replicas grouped by region behind wide-area links.

The plan, relay choice, holds, watermarks, repair loop and version summaries
are written here once; this module moves rows in process, and on Ray
(engine/cluster/regions.py) subclasses replace only the moves (the
`Geography` methods under "what moves rows", `RegionLink._carry`).

`Engine(model, regions={"eu": 2, "us": 2, "ap": 2}, primary_region="eu", ...)`
places the replicas by region (in that order: eu gets replicas 0-1, us 2-3,
...). `check_geo` checks the options once, before anything starts; `Geo` is
the checked plan. What runs (docs/engine.md, "Across regions"):

* Links in the primary's region are as without regions. A link into
  another region sends its packets through a `WanPipe` (wan.py: one-way
  delay, cut, bytes counted), framed by a `WanCodec` (compressed when it
  pays); its token bucket is the pair's bandwidth and is charged each
  frame's real size, so the scheduler's priorities decide what crosses first.
* topology "star": a link per replica (the baseline; the star's links into
  a region share the pair's bandwidth). topology "relay": one link per
  remote region; its packets cross once, to the region's relay replica,
  which forwards them to the others in its region. The relay is chosen by
  the engine and replaced when it is down or lagging (a merge slower than
  `relay_lag_ms`).
* A replica that missed rows (its region was cut: what was sent meanwhile
  is lost; it was down; its relay died before forwarding) is *held*: its
  watermark stays where it was complete. Anti-entropy then repairs it from
  the nearest peer that holds everything it missed (its own region first,
  then the nearest region): both sides summarize the versions of the rows
  changed since the hold (the primary's model-update cache names them, no
  table scan) as one digest per bucket of ids; only buckets that differ
  exchange versions, and only rows the peer holds newer are pulled.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..kernels.errors import EkkoError
from .packet import Packet
from .primary import Primary
from .replica import Replica
from .scheduler import PACKET_HEADER, UNCHANGED, Link, SchedulerConfig
from .stats import Histogram
from .wan import WanCodec, WanPipe

TOPOLOGIES = ("relay", "star")
BUCKET = 64  # ids per digest in a version summary
_SOURCE_WAIT_S = 5.0  # how long a repair waits for a peer to hold what was missed
_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd: spreads ids over the digest's 64 bits


@dataclass(frozen=True)
class Geo:
    """The checked region options (see check_geo)."""

    regions: dict[str, int]  # name -> replicas, in placement order
    primary: str
    bandwidth: dict[frozenset, float | None]  # per pair of regions (bytes/s; None: unlimited)
    latency_s: dict[frozenset, float]  # per pair, one way
    topology: str
    compress: bool
    relay_lag_s: float

    def region_of(self) -> list[str]:
        """Each replica's region, by replica index."""
        return [name for name, n in self.regions.items() for _ in range(n)]

    def distance(self, a: str, b: str) -> float:
        """One-way delay between two regions (0 within one)."""
        return 0.0 if a == b else self.latency_s[frozenset((a, b))]


def check_geo(regions: Any, primary_region: Any, wan_bandwidth: Any, wan_latency_ms: Any,
              topology: Any, compress: Any, relay_lag_ms: Any) -> Geo:
    """The region options as a `Geo`, or one EkkoError naming what is wrong."""
    if not isinstance(regions, Mapping) or not regions:
        raise EkkoError(f"regions must be a dict of region name -> replicas, got {regions!r}")
    for name, n in regions.items():
        if not isinstance(name, str) or not name or "->" in name:
            raise EkkoError(f"region names must be non-empty strings (without '->'), got {name!r}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise EkkoError(f"region {name!r} needs a positive number of replicas, got {n!r}")
    names = list(regions)
    if primary_region is None:
        raise EkkoError(f"regions= needs primary_region= (one of {', '.join(names)})")
    if primary_region not in regions:
        raise EkkoError(f"unknown primary_region {primary_region!r} (regions: {', '.join(names)})")
    if topology not in TOPOLOGIES:
        raise EkkoError(f"unknown topology {topology!r}; one of {', '.join(TOPOLOGIES)}")
    if not isinstance(compress, bool):
        raise EkkoError(f"compress must be True or False, got {compress!r}")
    pairs = [frozenset((a, b)) for i, a in enumerate(names) for b in names[i + 1:]]
    bandwidth = _per_pair("wan_bandwidth", "bytes/s", wan_bandwidth, pairs, names, optional=True)
    latency = _per_pair("wan_latency_ms", "ms", wan_latency_ms, pairs, names, optional=False)
    lag = _positive("relay_lag_ms", relay_lag_ms, "ms")
    return Geo(dict(regions), primary_region, bandwidth, {p: v / 1e3 for p, v in latency.items()},
               topology, compress, lag / 1e3)


def _positive(what: str, value: Any, unit: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or not math.isfinite(value):
        raise EkkoError(f"{what} must be a positive number of {unit}, got {value!r}")
    return float(value)


def _per_pair(what: str, unit: str, value: Any, pairs: list[frozenset], names: list[str],
              optional: bool) -> dict[frozenset, Any]:
    """One value for every pair of regions: one number for all, or a dict keyed by
    (region, region) tuples (either order) naming every pair."""
    if value is None and optional:
        return dict.fromkeys(pairs)
    if not isinstance(value, Mapping):
        v = _positive(what, value, unit)
        return dict.fromkeys(pairs, v)
    out: dict[frozenset, Any] = {}
    for key, v in value.items():
        if not isinstance(key, tuple) or len(key) != 2 or key[0] == key[1] \
                or not all(k in names for k in key):
            raise EkkoError(f"{what}: {key!r} is not a pair of two known regions "
                            f"(regions: {', '.join(names)})")
        out[frozenset(key)] = _positive(f"{what}[{key!r}]", v, unit)
    missing = [tuple(sorted(p)) for p in pairs if p not in out]
    if missing:
        raise EkkoError(f"{what} names no value for the pair(s) {missing}")
    return out


@dataclass
class RepairStats:
    """What anti-entropy did."""

    runs: int = 0  # replicas repaired
    rows_pulled: int = 0  # rows sent to repaired replicas (from any peer)
    rows_pulled_wan: int = 0  # of which across a WAN link
    summary_bytes: int = 0  # digests and versions exchanged
    rows_compared: int = 0  # rows whose versions the summaries covered
    seconds: float = 0.0
    sources: list = field(default_factory=list)  # (replica, peer it pulled from)

    def as_dict(self) -> dict:
        out = dict(self.__dict__)
        out["sources"] = list(self.sources[-32:])
        return out


class Region:
    """One region's replicas, whether it is cut, which are held (missed rows), its relay."""

    def __init__(self, name: str, members: list[Replica], primary: bool):
        self.name, self.members, self.is_primary = name, members, primary
        self.cut = False
        self.relay: int | None = None  # a replica index (topology relay, remote regions)
        self.relay_changes = 0
        self.lagging: set[int] = set()
        # replica -> table -> the version it is complete up to (it missed rows after)
        self.holds: dict[int, dict[str, int]] = {}
        self.lost_upto: dict[int, dict[str, int]] = {}  # the newest version it missed
        self.losses: dict[int, int] = {}  # counts each replica's losses (a repair's guard)
        self.lost_since: dict[str, np.ndarray] = {}  # per table: oldest lost update's commit
        self.lost_dense: tuple[int, bytes] | None = None  # the newest snapshot not delivered
        self.rows_repaired = self.rows_repaired_wan = 0  # rows anti-entropy pulled into it


class Geography:
    """The regions of an in-process engine at run time (see the module docstring)."""

    def __init__(self, geo: Geo, primary: Primary, replicas: list[Replica]):
        self.geo, self.primary = geo, primary
        self.codec = WanCodec(geo.compress)
        names = geo.region_of()
        for r, name in zip(replicas, names):
            r.region = name
        self.replicas = replicas
        self.regions = {n: Region(n, [r for r in replicas if r.region == n], n == geo.primary)
                        for n in geo.regions}
        self.pipes = {(a, b): WanPipe(a, b, geo.distance(a, b), geo.bandwidth[frozenset((a, b))],
                                      self.is_cut)
                      for a in geo.regions for b in geo.regions if a != b}
        self.down: set[int] = set()
        self.links: dict[int, RegionLink] = {}  # replica -> the link that feeds it
        self.repairs = RepairStats()
        self._lock = threading.Lock()
        self._wanted = False
        self._running = True
        self._repairer: threading.Thread | None = None

    # -- building the links --------------------------------------------------------
    def build_links(self, configs: list[SchedulerConfig]) -> list[RegionLink]:
        """The links of the topology: per replica in the primary's region (and in every
        region for a star), one per remote region for relays."""
        out = []
        for region in self.regions.values():
            pipe = None if region.is_primary else self.pipes[(self.geo.primary, region.name)]
            if pipe is None or self.geo.topology == "star":
                share = len(region.members) if pipe is not None else 1
                groups = [[m] for m in region.members]
            else:
                share, groups = 1, [region.members]
                region.relay = region.members[0].index  # until it is down or lags
            for members in groups:
                config = self._wan_config(configs[members[0].index], pipe, share)
                link = self._link(region, members, config, pipe)
                for m in members:
                    self.links[m.index] = link
                out.append(link)
        return out

    def _link(self, region: Region, members: list[Replica], config: SchedulerConfig,
              pipe: WanPipe | None) -> RegionLink:
        """The link that feeds `members` (a transport's own link class overrides this)."""
        return RegionLink(self.primary, RegionGroup(self, region, members), config, pipe, self)

    def _wan_config(self, config: SchedulerConfig, pipe: WanPipe | None,
                    share: int) -> SchedulerConfig:
        """A WAN link's scheduler: the pair's bandwidth (shared by a star's links into the
        region) unless the replica's own config is tighter, and a bucket deep enough to
        keep the link busy across its delay."""
        if pipe is None or pipe.bandwidth is None:
            return config
        bw = pipe.bandwidth / share
        if config.bandwidth is not None:
            bw = min(bw, config.bandwidth)
        return replace(config, bandwidth=bw, burst_s=max(config.burst_s, 2 * pipe.latency_s))

    # -- faults ------------------------------------------------------------------------
    def is_cut(self, name: str) -> bool:
        return self.regions[name].cut

    def cut(self, name: str) -> None:
        self.regions[name].cut = True

    def heal(self, name: str) -> None:
        self.regions[name].cut = False
        self.kick()

    def set_down(self, index: int, down: bool) -> None:
        with self._lock:
            (self.down.add if down else self.down.discard)(index)
        if not down:
            self.kick()

    def lose(self, region: Region, members: list[Replica], table: str, first: int,
             ids: np.ndarray | None, upto: int, since: np.ndarray | None) -> None:
        """`members` missed rows `ids` of `table` from version `first` on, the newest at
        version `upto` (a packet lost on the way, or not forwarded): hold their
        watermarks, remember when the oldest lost update was committed (repaired rows
        are measured from it), and repair them once they can be reached."""
        upto = max(upto, first - 1)
        with self._lock:
            for m in members:
                holds = region.holds.setdefault(m.index, {})
                holds[table] = min(holds.get(table, first - 1), first - 1)
                lost = region.lost_upto.setdefault(m.index, {})
                lost[table] = max(lost.get(table, upto), upto)
                region.losses[m.index] = region.losses.get(m.index, 0) + 1
            if ids is not None and since is not None and len(ids):
                at = region.lost_since.get(table)
                if at is None:
                    at = region.lost_since[table] = np.zeros(self.primary.table_rows()[table],
                                                             np.int64)
                old = at[ids]
                at[ids] = np.where((old == 0) | ((since > 0) & (since < old)), since, old)
        self.kick()

    def note_merge(self, region: Region, index: int, seconds: float) -> None:
        """A merge at `index` took `seconds`: slower than relay_lag_ms, it lags (a relay
        that lags is replaced while a peer does not)."""
        (region.lagging.add if seconds > self.geo.relay_lag_s else region.lagging.discard)(index)

    def held(self, index: int, table: str) -> int | None:
        region = self.regions[self.replicas[index].region]
        with self._lock:
            return region.holds.get(index, {}).get(table)

    def reachable(self, index: int) -> bool:
        """Whether flush and checks wait for this replica (not down, region not cut)."""
        return index not in self.down and not self.regions[self.replicas[index].region].cut

    # -- anti-entropy --------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            self._running = True
        self.kick()

    def stop(self) -> None:
        with self._lock:
            self._running = False
            thread = self._repairer
        if thread is not None:
            thread.join()

    def kick(self) -> None:
        """Repair held replicas that can be reached (in the repair thread)."""
        with self._lock:
            self._wanted = True
            if not self._running or (self._repairer is not None and self._repairer.is_alive()):
                return
            self._repairer = threading.Thread(target=self._repair_loop, daemon=True,
                                              name="ekko-anti-entropy")
            self._repairer.start()

    def _repair_loop(self) -> None:
        while True:
            with self._lock:
                if not self._running or not self._wanted:
                    self._repairer = None if self._repairer is threading.current_thread() \
                        else self._repairer
                    return
                self._wanted = False
            for region in self.regions.values():
                if not region.cut:
                    self._repair_region(region)

    def _repair_region(self, region: Region) -> None:
        """Repair the region's held replicas that are up: each from the nearest peer that
        holds everything it missed (a replica repaired here serves the next one)."""
        with self._lock:
            todo = [(i, dict(h), dict(region.lost_upto.get(i, {})), region.losses.get(i, 0))
                    for i, h in region.holds.items() if i not in self.down]
        complete: dict[int, dict[str, int]] = {}  # repaired here: index -> complete up to
        for index, holds, lost, losses in todo:
            if not self._running or region.cut:
                return
            member = self.replicas[index]
            source = self._source(member, lost, complete)
            if source is None:
                with self._lock:
                    self._wanted = True  # try again (a peer may catch up, a region heal)
                time.sleep(0.05)
                continue
            t0 = time.perf_counter()
            marks = self._marks_of(source)  # before pulling: what the pulled rows cover
            ok = all(self._pull(member, source, table, since, region)
                     for table, since in holds.items())
            if not ok:  # a WAN link on the way was cut: another peer, or after the heal
                with self._lock:
                    self._wanted = True
                continue
            self.repairs.runs += 1
            self.repairs.seconds += time.perf_counter() - t0
            self.repairs.sources.append((index, source.index))
            complete[index] = {t: max(v, marks[t], complete.get(source.index, {}).get(t, v))
                               for t, v in lost.items()}
            self._repair_dense(region, member, source)
            self._release(region, index, losses)

    def _repair_dense(self, region: Region, member: Replica, source: Replica) -> None:
        """Install the newest dense snapshot the region missed, carried from the peer."""
        lost = region.lost_dense
        if lost is None or not -1 < self._dense_version(member) < lost[0]:
            return
        if source.region != member.region:
            self.pipes[(source.region, member.region)].carry(len(lost[1]), paced=True,
                                                             repair=True)
        self._install_dense(member, lost[1])

    def _release(self, region: Region, index: int, losses: int) -> None:
        """The repair covered every loss counted when it began: lift the hold and give
        the replica its link's watermark (read first: a loss after it is a new hold)."""
        link = self.links[index]
        marks = link.delivered()
        with self._lock:
            if region.losses.get(index, 0) != losses:
                self._wanted = True  # lost more meanwhile: the next round repairs that
                return
            region.holds.pop(index, None)
            region.lost_upto.pop(index, None)
            if not region.holds:
                region.lost_since.clear()
                region.lost_dense = None
            for table, mark in marks.items():
                self._set_watermark(index, table, mark)
        link.wake()

    def _watermark(self, peer: Replica, table: str, complete: dict[int, dict[str, int]],
                   member: Replica) -> int:
        """The version up to which `peer` holds every update of `table`, as a repair of
        `member` may count on it. A peer repaired in this round holds what its source
        held except the rows it left to its own link (pending or on their way), until
        they arrive: that claim serves only a member fed by the same link (whose repair
        leaves those rows to the link as well); for another, the peer's watermark says."""
        mark = self._marks_of(peer)[table]
        if self.links[peer.index] is not self.links[member.index]:
            return mark
        return max(mark, complete.get(peer.index, {}).get(table, mark))

    def _source(self, member: Replica, lost: dict[str, int],
                complete: dict[int, dict[str, int]]) -> Replica | None:
        """The nearest peer (its region first; ties: not the primary's region, which
        already carries every WAN copy) that is up, not held, not cut off, and holds
        every version `member` missed (waiting a little for one that is close)."""
        here = member.region
        with self._lock:
            held = set(i for r in self.regions.values() for i in r.holds) - set(complete)
        peers = [p for p in self.replicas if p.index != member.index and p.index not in held
                 and p.index not in self.down and not self.regions[p.region].cut]
        peers.sort(key=lambda p: (self.geo.distance(here, p.region),
                                  p.region == self.geo.primary, p.index))
        deadline = time.monotonic() + _SOURCE_WAIT_S
        while peers and self._running:
            for p in peers:
                if all(self._watermark(p, t, complete, member) >= v for t, v in lost.items()):
                    return p
            if time.monotonic() > deadline:
                return None
            time.sleep(0.005)
        return None

    def _pull(self, member: Replica, source: Replica, table: str, since: int,
              region: Region) -> bool:
        """Compare version summaries of the rows changed after `since` with `source` and
        merge the rows it holds newer; False when the WAN link was cut meanwhile."""
        ids = self._changed(table, since)
        pipe = None if source.region == member.region else self.pipes[(source.region, member.region)]
        differ = np.flatnonzero(self._digests(source, table, ids)
                                != self._digests(member, table, ids))
        in_buckets = np.isin(np.arange(len(ids)) // BUCKET, differ)
        asked = ids[in_buckets]
        # the digests one way, the differing buckets' numbers and versions the other
        summary = 8 * -(-len(ids) // BUCKET) + 4 * len(differ) + 8 * len(asked)
        if pipe is not None and not pipe.carry(summary, paced=True, repair=True):
            return False
        asked = asked[~self.links[member.index].waiting(table, asked)]  # its link sends those
        at = region.lost_since.get(table)
        commit = at[asked] if at is not None else np.zeros(len(asked), np.int64)
        pulled = self._transfer(member, source, table, asked, commit, pipe)
        if pulled is None:
            return False
        region.rows_repaired += pulled
        region.rows_repaired_wan += pulled if pipe is not None else 0
        r = self.repairs
        r.summary_bytes += summary
        r.rows_compared += len(ids)
        r.rows_pulled += pulled
        r.rows_pulled_wan += pulled if pipe is not None else 0
        return True

    # -- what moves rows and reads replicas: in this process (a transport overrides) ----
    def _changed(self, table: str, since: int) -> np.ndarray:
        """The ids changed after version `since` (the model-update cache; every id when
        that history is gone)."""
        ids = self.primary.changed_since(table, since)
        if ids is None:
            ids = np.arange(self.primary.table_rows()[table], dtype=np.int64)
        return ids

    def _digests(self, replica: Replica, table: str, ids: np.ndarray) -> np.ndarray:
        return digests(ids, replica.versions(table)[ids])

    def _transfer(self, member: Replica, source: Replica, table: str, asked: np.ndarray,
                  commit: np.ndarray, pipe: WanPipe | None) -> int | None:
        """Merge into `member` the rows of `asked` that `source` holds newer (framed and
        carried across `pipe`); the rows pulled, or None when the pipe was cut."""
        rows, versions = source.rows(table, asked)
        newer = versions > member.versions(table)[asked]
        packet = Packet(table, asked[newer], rows[newer], versions[newer], commit[newer],
                        newest=source.table(table).issued)
        if pipe is not None:
            frame, raw = self.codec.encode(packet)
            if not pipe.carry(len(frame), len(packet), raw, paced=True, repair=True):
                return None
            packet = self.codec.decode(frame)
        member.note_issued(table, packet.newest)
        if len(packet):
            member.deliver(packet, self.primary.pack)
        return len(packet)

    def _marks_of(self, replica: Replica) -> dict[str, int]:
        """Per table, the version up to which `replica` holds every update."""
        return replica.watermarks()

    def _set_watermark(self, index: int, table: str, version: int) -> None:
        self.replicas[index].set_watermark(table, version)

    def _dense_version(self, replica: Replica) -> int:
        """The dense snapshot `replica` runs (-1: it has no dense part)."""
        return -1 if replica.dense is None else replica.dense.version

    def _install_dense(self, replica: Replica, blob: bytes) -> bool:
        """Install a dense snapshot; False when the replica could not be reached."""
        replica.install_dense(blob)
        return True

    def _freshness(self, replica: Replica) -> Histogram:
        return replica.stats.all_freshness()

    # -- reporting -----------------------------------------------------------------------
    def report(self) -> dict:
        """stats() keys of the regions (docs/engine.md, "Across regions")."""
        pipes = {f"{a}->{b}": p.counts.as_dict() for (a, b), p in self.pipes.items()}
        rows = sum(p["rows"] for p in pipes.values())
        link_bytes = sum(p["bytes"] - p["repair_bytes"] for p in pipes.values())
        raw = sum(p["raw_bytes"] - p["repair_bytes"] for p in pipes.values())
        fresh = {}
        for name, region in self.regions.items():
            h = Histogram()
            for m in region.members:
                h.merge(self._freshness(m))
            s = h.summary()
            fresh[name] = {"p50": s["p50"], "p99": s["p99"], "max": s["max"], "count": s["count"]}
        with self._lock:
            regions = {n: {"replicas": [m.index for m in r.members], "relay": r.relay,
                           "relay_changes": r.relay_changes, "cut": r.cut,
                           "held": sorted(r.holds), "rows_repaired": r.rows_repaired,
                           "rows_repaired_wan": r.rows_repaired_wan,
                           "down": sorted(self.down & {
                               m.index for m in r.members})}
                       for n, r in self.regions.items()}
        return {"wan_bytes": sum(p["bytes"] for p in pipes.values()),
                "freshness_ms_by_region": fresh, "regions": regions,
                "wan": {"links": pipes, "rows": rows,
                        "bytes_per_row": {"raw": raw / rows if rows else 0.0,
                                          "sent": link_bytes / rows if rows else 0.0},
                        "dropped_rows": sum(p["dropped_rows"] for p in pipes.values())},
                "anti_entropy": self.repairs.as_dict()}


def digests(ids: np.ndarray, versions: np.ndarray) -> np.ndarray:
    """One 64-bit digest of (id, version) per bucket of BUCKET consecutive entries."""
    if not len(ids):
        return np.zeros(0, np.uint64)
    with np.errstate(over="ignore"):
        h = (ids.astype(np.uint64) * _MIX) ^ (versions.astype(np.uint64) + np.uint64(1))
        h *= _MIX
        h ^= h >> np.uint64(29)
    starts = np.arange(0, len(ids), BUCKET)
    return np.add.reduceat(h, starts)


class RegionGroup:
    """The replicas one link feeds (a ports.LinkReplica): one, or a region behind its relay."""

    def __init__(self, geography: Geography, region: Region, members: list[Replica]):
        self.geography, self.region, self.members = geography, region, members
        self.index: int | str = members[0].index if len(members) == 1 else region.name

    def traffic(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for m in self.members:
            for t, n in m.traffic().items():
                out[t] = out.get(t, 0) + n
        return out

    def note_issued(self, table: str, version: int) -> None:
        for m in self.members:
            m.note_issued(table, version)

    def divergence(self) -> dict[str, dict[int, str]]:
        out: dict[str, dict[int, str]] = {}
        for m in self.members:
            for t, rows in m.divergence().items():
                out.setdefault(t, {}).update(rows)
        return out

    def set_watermark(self, table: str, version: int) -> None:
        """Every member that missed nothing of `table` holds every version up to `version`."""
        for m in self.members:
            if self.geography.held(m.index, table) is None:
                self.geography._set_watermark(m.index, table, version)

    def up(self) -> list[Replica]:
        down = self.geography.down
        return [m for m in self.members if m.index not in down]

    def relay(self) -> Replica | None:
        """The member that receives the WAN copy: the current relay while it is up and
        not lagging, else the first member up (not lagging, if one is)."""
        region = self.region
        up = self.up()
        if not up:
            return None
        current = next((m for m in up if m.index == region.relay), None)
        if current is None or (current.index in region.lagging
                               and any(m.index not in region.lagging for m in up)):
            fresh = [m for m in up if m.index not in region.lagging] or up
            if region.relay is not None and len(self.members) > 1:
                region.relay_changes += 1
            current = fresh[0]
            if len(self.members) > 1:
                region.relay = current.index
        return current


class RegionLink(Link):
    """A link to a group of replicas in one region, over a WAN pipe or not (see the
    module docstring): it frames, carries, and merges at the relay, which forwards."""

    def __init__(self, primary: Primary, group: RegionGroup, config: SchedulerConfig,
                 pipe: WanPipe | None, geography: Geography):
        super().__init__(primary, group, config)
        self.group, self.pipe, self.geography = group, pipe, geography
        self._first: dict[str, int] = {}
        self._sending: dict[str, np.ndarray] = {}  # the batch on its way (under cond)

    # -- watermarks: a held member's is its hold ----------------------------------------
    def _watermark(self, table: str) -> int:
        w = super()._watermark(table)
        for m in self.group.members:
            if self.geography.reachable(m.index):
                held = self.geography.held(m.index, table)
                if held is not None:
                    w = min(w, held)
        return w

    def delivered(self) -> dict[str, int]:
        """Per table, the version up to which this link delivered (or lost) every update:
        its watermark before holds."""
        with self.cond:
            return {table: Link._watermark(self, table) for table in self.pending}

    def wake(self) -> None:
        """A hold was lifted: the members not held move up to the link's watermark (a
        hold kept it, and so theirs, back; no send may come to move them) and flush's
        waits look again."""
        with self.cond:
            for table in self.pending:
                self.replica.set_watermark(table, self._watermark(table))
            self.cond.notify_all()

    def waiting(self, table: str, ids: np.ndarray) -> np.ndarray:
        """Per id, whether this link has it pending (it will send the newest value itself,
        and its watermark waits for it; rows on their way as updates count too, a full
        copy's others do not; fifo's queue does not, so repairs may pull those)."""
        with self.cond:
            out = np.zeros(len(ids), bool)
            if self.config.policy != "fifo":
                out |= self.pending[table].flag[ids]
            if table in self._sending:
                out |= np.isin(ids, self._sending[table])
            return out

    def wait_for(self, targets: dict[str, int], timeout: float | None, dense: int = -1) -> bool:
        """As Link.wait_for, for the members that can be reached: a cut region and a
        replica marked down are not waited for."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if not any(self.geography.reachable(m.index) for m in self.group.members):
                return True
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            step = 0.05 if left is None else min(0.05, left)
            if super().wait_for(targets, step, dense):
                return True
            if not self.running or self._diverged() or self.dense_refused(dense) or left == 0.0:
                return False

    # -- sending ------------------------------------------------------------------------
    def _select(self) -> list:
        batch = super()._select()
        sending: dict[str, list[np.ndarray]] = {}  # a fifo batch has several entries a table
        for table, ids, since, _, _ in batch:
            # on their way: the rows taken from pending (the watermark waits for them); a
            # full copy's other rows are counted delivered already, so a repair must not
            # leave to the copy the rows a held replica lost (its hold is lifted at the
            # link's watermark while the copy may still be on its way)
            sending.setdefault(table, []).append(ids[since != UNCHANGED])
        self._sending = {t: np.concatenate(parts) for t, parts in sending.items()}
        return batch

    def _send(self, batch: list) -> None:
        # the oldest version each table's packets carry: a fifo batch holds several
        # commits of one table, and a lost packet must hold its replicas before all of them
        self._first = {}
        for b in batch:
            self._first[b[0]] = min(b[4], self._first.get(b[0], b[4]))
        try:
            self._carry(batch)
        finally:
            with self.cond:
                self._sending = {}

    def _carry(self, batch: list) -> None:
        """Send the batch (in this process: packet by packet, `_deliver`)."""
        super()._send(batch)

    def _deliver(self, table: str, ids: np.ndarray, since: np.ndarray) -> None:
        packet = self.primary.pack(table, ids)
        packet.commit_ns = since
        first = self._first[table]
        geo = self.geography
        if self.pipe is not None:
            frame, raw = geo.codec.encode(packet)
            self._refund(table, len(ids), len(frame))
            if not self.pipe.carry(len(frame), len(ids), raw):
                self._lost(self.group.members, table, first, packet.ids,
                           newest_version(packet), since)
                return
            packet = geo.codec.decode(frame)
        elif self.config.wire:
            packet = Packet.from_bytes(packet.to_bytes())
        relay = self.group.relay()
        up = self.group.up()
        down = [m for m in self.group.members if m not in up]
        if down:
            self._lost(down, table, first, packet.ids, newest_version(packet), since)
        if relay is None:
            return
        self._merge(relay, packet)
        peers = [m for m in up if m is not relay]
        if relay.index in geo.down:  # it went down before forwarding: its peers missed it
            self._lost(peers, table, first, packet.ids, newest_version(packet), since)
            return
        for m in peers:
            self._merge(m, packet)

    def _lost(self, members: list[Replica], table: str, first: int, ids: np.ndarray,
              upto: int, since: np.ndarray) -> None:
        """`members` missed this packet: its rows are no longer on their way (a repair
        must pull them), and the members are held until repaired."""
        if not members:
            return
        with self.cond:
            sending = self._sending.get(table)
            if sending is not None:
                self._sending[table] = np.setdiff1d(sending, ids)
        self.geography.lose(self.group.region, members, table, first, ids, upto, since)

    def _merge(self, replica: Replica, packet: Packet) -> None:
        """Merge at one member (its time decides whether a relay lags)."""
        t0 = time.perf_counter()
        replica.note_issued(packet.table, packet.newest)
        try:
            replica.deliver(packet, self.primary.pack)
        except EkkoError as e:  # the packet as a whole was refused: settle its rows
            self.errors.append(f"{type(e).__name__}: {e}")
            replica.settle(packet.table, packet.ids, self.primary.pack, why=str(e))
        self.geography.note_merge(self.group.region, replica.index, time.perf_counter() - t0)

    def _refund(self, table: str, rows: int, sent: int) -> None:
        """The bucket was charged the rows' raw size; a compressed frame costs less."""
        if self.config.bandwidth is None:
            return
        charged = rows * self.row_bytes[table] + PACKET_HEADER
        with self.cond:
            self.tokens = min(self._depth(), self.tokens + charged - sent)

    def _send_dense(self, version: int, blob: bytes) -> None:
        """Carry a dense snapshot across (once per region) and install it on the members
        up; members it did not reach are held and get it when they are repaired."""
        up = self.group.up()
        if self.pipe is not None and not self.pipe.carry(len(blob), 0, len(blob)):
            up = []
        installed = [m for m in up if self.geography._install_dense(m, blob)]
        missed = [m for m in self.group.members if m not in installed]
        if missed:
            self.group.region.lost_dense = (version, blob)
            # held where this link's rows stand: the repair re-checks and installs it
            for table, mark in self.delivered().items():
                self.geography.lose(self.group.region, missed, table, mark + 1, None, mark,
                                    None)


def newest_version(packet: Packet) -> int:
    """The newest version among a packet's rows (-1: none)."""
    return int(packet.versions.max()) if len(packet) else -1


__all__ = ["BUCKET", "Geo", "Geography", "RegionGroup", "RegionLink", "TOPOLOGIES", "check_geo",
           "digests", "newest_version"]
