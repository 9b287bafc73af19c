"""Regions on Ray: `Engine(model, regions={...}, primary_region=..., cluster=...)`.

The region plan, the relay choice, the holding and watermark rules, the
repair loop and the version summaries are engine/regions.py's (`Geography`,
`RegionGroup`, `RegionLink`); this module supplies only how rows move
between actors:

* Placement: a replica of region `r` is placed with the custom resource
  `ekko_region_<r>` (`region_resource`), the primary shard with its
  region's; a region no node of the cluster offers is refused at once
  (Ray would wait for such a node forever).
* A link packs its batch on the shard (`ShardServer.pack_frames`: WAN
  frames for a remote region); the caller reads only the frames' sizes,
  carries them through the region pair's `WanPipe` (delay, cut, bytes,
  the token bucket), and asks the region's relay actor to merge the frames
  and forward the packets to its peers (`ReplicaServer.relay`): frames and
  packets go shard -> relay -> peers through Ray's object store.
* A relay that dies or does not answer within `relay_lag_ms` (a peer: half
  that) is marked down: the batch goes again through the next replica up of the
  region, what the dead one missed holds it, and a watcher brings it back
  once Ray restarted it and it caught up; anti-entropy then repairs it.
* Anti-entropy: digests and rows move actor to actor (`digests`,
  `versions_of`, `frame_newer`, `merge_frame`); the caller reads digests
  and sizes, and carries the bytes through the pipe.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray

from ...kernels.errors import EkkoError
from ..regions import Geo, Geography, Region, RegionGroup, RegionLink
from ..scheduler import SchedulerConfig
from ..stats import Histogram
from ..wan import WanPipe
from .links import ShardView, _note_significant, _packets_of, _Watermarks
from .plumbing import PROBE_S, Helpers, Unavailable, call

SHARE = 0.01  # of a region's resource each actor asks (a node offering 1 hosts 100)


def region_resource(region: str) -> str:
    """The custom resource a node offers to host replicas of `region`."""
    return f"ekko_region_{region}"


def check_placement(geo: Geo) -> None:
    """Every region's resource is offered by a node of the cluster, or one EkkoError (an
    actor asking for a resource no node has is never placed: Ray waits for ever)."""
    have = ray.cluster_resources()
    missing = [r for r in geo.regions if have.get(region_resource(r), 0) <= 0]
    if missing:
        example = ", ".join(f'"{region_resource(r)}": 1' for r in missing)
        raise EkkoError(f"no node of the Ray cluster offers region(s) {', '.join(missing)}: "
                        f"start their nodes with ray start --resources='{{{example}}}' "
                        f"(docs/engine.md, 'On Ray')")


def placed(options: dict, region: str) -> dict:
    """Actor options with the region's resource added to the user's (`actor_options`)."""
    resources = dict(options.get("resources") or {})
    resources[region_resource(region)] = resources.get(region_resource(region), 0) + SHARE
    return {**options, "resources": resources}


class RayGeography(Geography):
    """Geography (engine/regions.py) whose replicas are actors (`RemoteReplica`s)."""

    def __init__(self, geo: Geo, view: ShardView, replicas: list, shard: Any,
                 marks: _Watermarks, timeout: float):
        super().__init__(geo, view, replicas)  # type: ignore[arg-type]
        self.shard, self.marks, self.timeout = shard, marks, timeout
        self.failed: set[int] = set()  # down because they failed (a watcher brings them back)
        self.helpers = Helpers()  # the watchers
        self.tables = list(view.table_rows())
        for r in replicas:
            r.geography = self

    def _link(self, region: Region, members: list, config: SchedulerConfig,
              pipe: WanPipe | None) -> RegionLink:
        return RayRegionLink(self.primary, RayRegionGroup(self, region, members), config, pipe,
                             self, self.shard, self.timeout)

    # -- failures ------------------------------------------------------------------------
    def fail(self, index: int) -> None:
        """Replica `index` died or did not answer: down until it answers again (caught up
        after Ray restarted it), then repaired."""
        with self._lock:
            if index in self.down:
                return
            self.failed.add(index)
        self.set_down(index, True)
        self.helpers.start(self._watch, index, name=f"ekko-watch-{index}")

    def stop(self) -> None:
        """The repair thread, then every watcher (see `Helpers`)."""
        super().stop()
        self.helpers.close()

    def _watch(self, index: int) -> None:
        actor = self.replicas[index].actor
        while self._running:
            with self._lock:
                if index not in self.failed:
                    return  # replica_up came first
            try:
                ready = call(actor.ping.remote(), PROBE_S)[1]
            except Unavailable:
                ready = False
            if ready:
                with self._lock:
                    self.failed.discard(index)
                self.set_down(index, False)
                return
            time.sleep(0.05)

    def set_down(self, index: int, down: bool) -> None:
        if not down:
            with self._lock:
                self.failed.discard(index)
        super().set_down(index, down)

    def _repair_region(self, region: Region) -> None:
        try:
            super()._repair_region(region)
        except Unavailable:  # a peer died meanwhile: try again (the links mark it down)
            with self._lock:
                self._wanted = True
            time.sleep(0.1)

    # -- moving rows and reading replicas, actor to actor ---------------------------------
    def _changed(self, table: str, since: int) -> np.ndarray:
        ids, rows, _, whole = call(self.shard.plan.remote(table, since), self.timeout)
        return np.arange(rows, dtype=np.int64) if whole else ids

    def _digests(self, replica: Any, table: str, ids: np.ndarray) -> np.ndarray:
        return call(replica.actor.digests.remote(table, ids), self.timeout)

    def _transfer(self, member: Any, source: Any, table: str, asked: np.ndarray,
                  commit: np.ndarray, pipe: WanPipe | None) -> int | None:
        compress = self.geo.compress
        theirs = member.actor.versions_of.remote(table, asked)
        frame, meta = source.actor.frame_newer.options(num_returns=2).remote(
            table, asked, theirs, commit, compress)
        nbytes, raw, rows = call(meta, self.timeout)
        if pipe is not None and not pipe.carry(nbytes, rows, raw, paced=True, repair=True):
            return None
        call(member.actor.merge_frame.remote(frame, compress), self.timeout)
        return rows

    def _marks_of(self, replica: Any) -> dict[str, int]:
        try:
            wm = call(replica.actor.watermarks.remote(), PROBE_S)
        except Unavailable:  # restarting: it holds nothing a repair could use
            return dict.fromkeys(self.tables, -1)
        return {t: min(per.values()) for t, per in wm.items()}

    def _set_watermark(self, index: int, table: str, version: int) -> None:
        self.marks.put(index, table, 0, version)

    def _dense_version(self, replica: Any) -> int:
        return replica.held_dense()

    def _install_dense(self, replica: Any, blob: bytes) -> bool:
        try:
            call(replica.actor.install_dense.remote(blob), self.timeout)
            return True
        except Unavailable:
            self.fail(replica.index)
            return False

    def _freshness(self, replica: Any) -> Histogram:
        try:
            return call(replica.actor.stats.remote(), min(self.timeout, 10.0))[1]
        except Unavailable:
            return Histogram()


class RayRegionGroup(RegionGroup):
    """The replica actors one link feeds: what a link reads of them travels with the
    packets or stays in their processes (links._RemoteView)."""

    def traffic(self) -> dict[str, int]:
        return dict.fromkeys(self.geography.tables, 0)

    def note_issued(self, table: str, version: int) -> None:
        pass  # travels with each packet (Packet.newest)

    def divergence(self) -> dict:
        return {}


class RayRegionLink(RegionLink):
    """A RegionLink whose batch is packed on the shard and merged by the relay actor,
    which forwards it to its peers (see the module docstring)."""

    def __init__(self, view: ShardView, group: RayRegionGroup, config: SchedulerConfig,
                 pipe: WanPipe | None, geography: RayGeography, shard: Any, timeout: float):
        super().__init__(view, group, config, pipe, geography)  # type: ignore[arg-type]
        self.shard, self.timeout = shard, timeout
        self.relayed: list[tuple[int, float]] = []  # (relay, time.time()) of recent sends

    def errors_of(self, replica: int) -> list[str]:
        return list(self.errors)

    def recoveries_of(self, replica: int) -> int:
        return 0

    def _carry(self, batch: list) -> None:
        wanted, since, marks = _packets_of(batch, self.config.max_packet_rows)
        if not wanted:
            return
        framed = self.pipe is not None
        payload, meta = self._pack(wanted, framed)
        lost = [(t, ids, m[3], s) for (t, ids), m, s in zip(wanted, meta, since)]
        if framed:
            for (table, _), m in zip(wanted, meta):
                self._refund(table, m[2], m[0])
            if not self.pipe.carry(sum(m[0] for m in meta), sum(m[2] for m in meta),
                                   sum(m[1] for m in meta)):
                self._lose(self.group.members, lost)
                return
        up = self.group.up()
        self._lose([m for m in self.group.members if m not in up], lost)
        if self._relay(payload, since, framed, lost):
            _note_significant(self, marks)

    def _pack(self, wanted: list, framed: bool) -> tuple[Any, list]:
        """(a reference to the packets or frames, their sizes), packed on the shard; a
        shard restarting (it replays its log) is asked again."""
        deadline = time.monotonic() + self.timeout
        while True:
            payload, meta = self.shard.pack_frames.options(num_returns=2).remote(
                wanted, framed, self.geography.geo.compress)
            try:
                return payload, call(meta, self.timeout)
            except Unavailable:
                if not self.running or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _relay(self, payload: Any, since: list, framed: bool, lost: list) -> bool:
        """Have the region's relay merge the batch and forward it; a relay that dies or
        does not answer within relay_lag_ms is marked down and the next one up is asked.
        Returns whether a relay merged it."""
        geo = self.geography
        wait = geo.geo.relay_lag_s
        while True:
            relay = self.group.relay()
            if relay is None:
                return False
            peers = [(m.index, m.actor) for m in self.group.up() if m is not relay]
            try:  # it waits half the time for its peers, so that it answers within `wait`
                seconds, failed = call(relay.actor.relay.remote(
                    payload, since, peers, framed, geo.geo.compress, wait / 2), wait)
            except Unavailable as e:
                self.errors.append(f"relay {relay.index}: {type(e).__name__}: {e}")
                geo.fail(relay.index)
                self._lose([relay], lost)
                continue
            except Exception as e:  # noqa: BLE001 - refused: its region repairs it from peers
                self.errors.append(f"relay {relay.index}: {type(e).__name__}: {e}")
                self._lose([relay] + [geo.replicas[i] for i, _ in peers], lost)
                return False
            self.relayed = (self.relayed + [(relay.index, time.time())])[-64:]
            geo.note_merge(self.group.region, relay.index, seconds)
            for i in failed:
                geo.fail(i)
                self._lose([geo.replicas[i]], lost)
            return True

    def _lose(self, members: list, lost: list) -> None:
        for table, ids, upto, since in lost:
            self._lost(members, table, self._first[table], ids, upto, since)
