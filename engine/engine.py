"""ekko.Engine: a primary, its scheduler links, serving replicas and the health checks.

    with ekko.Engine(model, replicas=2, dense=mlp) as engine:
        engine.step("t_cat0", ids, grads)   # returns once committed on the primary
        engine.publish_dense()              # a snapshot of mlp's weights to every replica
        engine.flush()                      # every replica holds every committed update
        engine.replicas[0].lookup("cat0", ids, offsets)
        engine.replicas[0].predict(sparse, x)   # mlp(pooled, x) on the replica's copy
        engine.stats()["freshness_ms"]      # {"p50", "p99", "max", "count"}

This class is the engine's logic, written once: input checks, step -> the
links, dense snapshots -> the links, the health-check cadence, check and
rollback, flush, lookup and prediction routing, and stats. Where the parts run is a transport's (ports.py): in this process
(engine/local.py, the default) or on Ray with `cluster=` (engine/cluster/,
imported only then). The parts talk through packets and plain values only
(see docs/engine.md). `step` is safe from several threads at once (each
table has its own lock).

In process, an engine owns its model's tables: it numbers on from the
versions they carry, and a newer Engine on the same compiled model (a
notebook cell run again) takes them over, after which this one's step,
flush and check raise.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..dialects.limits import MAX_REPLICAS
from ..kernels.errors import EkkoError
from ..kernels.model import CompiledModel, compile_model
from .dense import DenseSnapshot, dense_input, take_snapshot
from .inputs import check_delta
from .ports import Stepped, Transport, Unavailable
from .primary import Commit
from .quality import Probe, Quality
from .regions import Geo, check_geo
from .replica import ReplicaDiverged
from .scheduler import Link, SchedulerConfig
from .sparse import check_bags
from .state import HealthConfig, Rollback, check_health_config
from .stats import Histogram, latency_summary

_CLUSTER_ONLY = {"primary_shards", "directory", "snapshot_s", "max_restarts", "timeout_s",
                 "lookup_timeout_s", "log_limit_bytes", "fsync", "chunk_rows", "actor_options",
                 "on_damage"}
_SUMMED = ("rows_moved", "bytes_moved", "packets", "packets_rejected", "rows_repaired",
           "divergent_rows", "future_packets")  # per-replica counts stats() adds up


class Engine:
    """See the module docstring. Use it as a context manager (or call start/close).

    `cluster="local"`, `"auto"` or a Ray address runs the parts as Ray
    actors; the options in `_CLUSTER_ONLY` go to that transport
    (engine/cluster/transport.py) and are refused without it.
    `regions={name: replicas}` (instead of `replicas=`) places the replicas
    by region behind emulated WAN links (engine/regions.py; on Ray,
    engine/cluster/regions.py).
    """

    def __init__(self, model: CompiledModel | str | Path, replicas: int | None = None, *,
                 scheduler: SchedulerConfig | Sequence[SchedulerConfig] | None = None,
                 health: HealthConfig | None = None, dense: Any = None,
                 dense_every: int | None = None, dense_every_ms: float | None = None,
                 history_rows: int = 1 << 24, seed: int = 0, scale: float = 1.0,
                 cluster: str | None = None, regions: dict[str, int] | None = None,
                 primary_region: str | None = None, wan_bandwidth: Any = None,
                 wan_latency_ms: Any = None, topology: str | None = None,
                 compress: bool | None = None, relay_lag_ms: float | None = None,
                 **cluster_options: Any):
        geo_options = {"primary_region": primary_region, "wan_bandwidth": wan_bandwidth,
                       "wan_latency_ms": wan_latency_ms, "topology": topology,
                       "compress": compress, "relay_lag_ms": relay_lag_ms}
        geo = _check_regions(regions, replicas, cluster, geo_options)
        if geo is not None:
            replicas = sum(geo.regions.values())
        elif replicas is None:
            replicas = 2
        if cluster is None and cluster_options:
            unknown = sorted(set(cluster_options) - _CLUSTER_ONLY)
            if unknown:
                raise TypeError(f"Engine() got an unexpected keyword argument {unknown[0]!r}")
            raise EkkoError(f"{', '.join(sorted(cluster_options))}: only with cluster=")
        if isinstance(model, (str, Path)):
            model = compile_model(model, scale=scale)
        if not isinstance(model, CompiledModel):
            raise EkkoError(f"Engine needs a compiled model or a model path, got {type(model).__name__}")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
            raise EkkoError(f"replicas must be a positive integer, got {replicas!r}")
        if replicas > MAX_REPLICAS:
            raise EkkoError(f"replicas={replicas} is more than ekko takes (MAX_REPLICAS = "
                            f"{MAX_REPLICAS}: each replica holds a serving copy of every table)")
        self.model = model
        self.configs = _scheduler_configs(scheduler, replicas)  # one per replica
        self.dense = _check_dense(dense)
        self.dense_every, self.dense_every_ms = _dense_cadence(dense, dense_every, dense_every_ms)
        self.dense_version = 0  # the newest snapshot published
        self._dense_lock = threading.Lock()
        self._dense_steps = 0  # steps since the last publish
        self._dense_at = time.monotonic()
        # version 1: the module as given, installed in each replica as it is built (so
        # replicas predict from the first moment) and sent on the links like any other
        self.dense_initial = None if self.dense is None else take_snapshot(self.dense, 1)
        self._dense_recent: dict[int, DenseSnapshot] = {}  # the newest few, by version
        self.health = check_health_config(health)
        quality = self.health.quality
        if quality is not None and self.dense is None:
            raise EkkoError("quality checks judge predictions: they need a dense module (dense=)")
        self.probe = None if quality is None else Probe(quality.probe_events)
        self.quality_last: dict[int, dict] = {}  # per replica, what the last check measured
        # the healthy marks of the last mark_lag passing checks, oldest first: a failed
        # check goes back to the oldest (the tables' undo log keeps as many epochs)
        self._marks: deque[_Mark] = deque([_Mark({}, self.dense_initial)],
                                          maxlen=self.health.mark_lag)
        self.tables = {t.name: t for t in model.model.tables}
        # commit and announce happen under one lock per table, so links hear a
        # table's versions in order (a watermark never passes an unannounced one)
        self._announce = {n: threading.RLock() for n in self.tables}
        self.steps = self.rows_committed = self.rejected_steps = 0
        self.checks = self.failed_checks = self._commits = 0
        self.check_skipped: list[int] = []  # replicas a check could not reach
        self.rollbacks: list[Rollback] = []
        self._count_lock = threading.Lock()
        self._hold_lock = threading.Lock()  # orders a batch's release against enqueues
        self._held = 0  # open batched() blocks: commits reach the links unannounced
        self._check_lock = threading.Lock()
        self._next_replica = 0
        self._started = False
        self._stopped: str | None = None  # why step/flush/check refuse (a newer engine, shutdown)
        self._gone: str | None = None  # why everything refuses (the parts are gone)
        self._reopen: str | None = None  # why start refuses (Ray: closed for good)
        self.transport = self._transport(replicas, cluster, history_rows, seed, cluster_options,
                                         geo)
        self.geography = getattr(self.transport, "geography", None)  # with regions=
        self.primary = self.transport.primary
        self.replicas = self.transport.replicas
        self.links = self.transport.links
        self.issued = self.transport.primary_port.issued()  # per shard: announced so far
        if self.dense_initial is not None:
            with self._dense_lock:
                self._send_dense(self.dense_initial)

    def _transport(self, replicas: int, cluster: str | None, history_rows: int, seed: int,
                   options: dict[str, Any], geo: Geo | None) -> Transport:
        if cluster is None:
            from .local import LocalTransport

            return LocalTransport(self, replicas, history_rows, seed, geo)
        try:
            from .cluster import RayTransport  # imports ray: only when a cluster is asked for
        except ImportError as e:
            raise EkkoError(f"cluster={cluster!r} needs Ray: pip install 'ekko[ray]' ({e})") from None
        return RayTransport(self.model, replicas, self.configs, self.health, cluster=cluster,
                            history_rows=history_rows, seed=seed, dense=self.dense,
                            dense_initial=self.dense_initial, geo=geo, **options)

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> Engine:
        self._alive()
        if self._reopen is not None:
            raise EkkoError(self._reopen)
        if not self._started:
            for link in self._all_links():
                link.start()
            if self.geography is not None:
                self.geography.start()
            self._started = True
        return self

    def close(self) -> None:
        """Stop the links. On Ray the processes stay readable (stats, serving) until shutdown()."""
        if self._started:
            for link in self._all_links():
                link.stop()
            self._started = False
        self._reopen = self.transport.stop() or self._reopen

    def shutdown(self) -> None:
        """Close and end the transport's processes and files (on Ray: also when collected)."""
        self.close()
        self._gone = self._stopped = "this engine was shut down (its processes are gone)"
        self.transport.end()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _retire(self, why: str) -> None:
        """Another engine took this one's tables: finish the steps under way, then stop."""
        for lock in self._announce.values():
            lock.acquire()
        self._stopped = why
        for lock in self._announce.values():
            lock.release()
        self.close()

    def _alive(self) -> None:
        if self._stopped is not None:
            raise EkkoError(self._stopped)

    def _all_links(self) -> list[Link]:
        return [link for links in self.transport.shard_links for link in links]

    # -- the stream -----------------------------------------------------------------------
    def step(self, table: str, ids: Any, grads: Any) -> int:
        """Apply a trainer update on the primary; returns its version once committed
        (on Ray: durable on its shards; with several shards, the highest of their versions).

        `grads` is (len(ids), dim) float32, or `ekko.Gathered(rows, index, scale)`:
        id p's row is rows[index[p]] (* scale[p]), read in place by the kernel.
        A harmful update (see HealthConfig) is rolled back at once, and the
        rollback is recorded in stats()["rollbacks"].
        """
        self._alive()
        t = self.tables.get(table)
        try:
            if t is None:
                raise EkkoError(f"no table {table!r} (tables: {', '.join(self.tables)})")
            ids, grads = check_delta(ids, grads, t.rows, t.dim)
            with self._announce[table]:
                self._alive()
                done = self.transport.primary_port.step(table, ids, grads)
                self._publish(done)
        except EkkoError as e:
            if not isinstance(e, Unavailable) and self._stopped is None:
                with self._count_lock:
                    self.rejected_steps += 1
            raise
        with self._count_lock:
            self.steps += 1
            self.rows_committed += done.rows
            self._commits += 1
            due = bool(self.health.check_every) and self._commits % self.health.check_every == 0
        if due and not done.records:
            self.check()
        self._dense_tick()
        return done.version

    # -- the dense part ------------------------------------------------------------------
    def publish_dense(self) -> int:
        """Send a snapshot of the dense module's current weights to every replica; returns
        its version. Each replica swaps it in whole (no prediction mixes two versions);
        a snapshot with a non-finite weight is refused (DenseError) and nothing is sent."""
        if self._gone is not None:
            raise EkkoError(self._gone)
        if self.dense is None:
            raise EkkoError("this engine has no dense module: Engine(..., dense=module)")
        with self._dense_lock:
            snap = take_snapshot(self.dense, self.dense_version + 1)
            self._send_dense(snap)
        return snap.version

    def _send_dense(self, snap: DenseSnapshot) -> None:
        """Hand an encoded snapshot to the links of shard 0 (each replica hears one).
        The caller holds the dense lock."""
        blob = snap.to_bytes()
        self.dense_version = snap.version
        self._dense_recent[snap.version] = snap
        for old in sorted(self._dense_recent)[:-_DENSE_KEPT]:
            del self._dense_recent[old]
        self._dense_steps, self._dense_at = 0, time.monotonic()
        for link in self.transport.shard_links[0]:
            link.enqueue_dense(snap.version, blob)

    def _dense_tick(self) -> None:
        """Publish on the engine's own cadence (dense_every steps, dense_every_ms)."""
        if self.dense is None or (self.dense_every is None and self.dense_every_ms is None):
            return
        with self._dense_lock:
            self._dense_steps += 1
            due = (self.dense_every is not None and self._dense_steps >= self.dense_every) or \
                (self.dense_every_ms is not None
                 and (time.monotonic() - self._dense_at) * 1e3 >= self.dense_every_ms)
        if due:
            self.publish_dense()

    def _publish(self, done: Stepped) -> None:
        """Announce commits to the links of their shard (rollback rows first in line)."""
        for s, commit in done.commits:
            self._send(s, commit)
        self.rollbacks.extend(done.records)

    def _send(self, shard: int, commit: Commit) -> None:
        issued = self.issued[shard]
        issued[commit.table] = max(issued.get(commit.table, 0), commit.version)
        significance = commit.norms.astype(np.float64)
        with self._hold_lock:  # a release either sees this commit or leaves it its wake
            wake = self._held == 0
            for link in self.transport.shard_links[shard]:
                link.replica.note_issued(commit.table, commit.version)
                link.enqueue(commit, significance, wake=wake)

    @contextmanager
    def batched(self) -> Iterator[None]:
        """Steps made inside reach the links together, at the end: one wake of each link
        for several tables' commits (a backward's), instead of one per table whose
        packing then competes with the next table's step for the cores and the GIL.
        Meant for the span of one backward: rows wait for the block to end (so does
        any other thread's, meanwhile); `flush()` inside sends them anyway."""
        with self._hold_lock:
            self._held += 1
        try:
            yield
        finally:
            with self._hold_lock:
                self._held -= 1
                if self._held == 0:
                    for link in self._all_links():
                        link.wake()

    def flush(self, timeout: float | None = None) -> None:
        """Return when every replica holds every update committed before this call.

        Raises ReplicaDiverged (an EkkoError) naming the replica, table and
        rows when a replica holds rows it could not be made equal to the
        primary's (see Replica.settle); `check()` then fails and rolls back.
        """
        self._alive()
        if not self._started:
            raise EkkoError("the engine is not running: use it as a context manager")
        wait = self.transport.wait_s if timeout is None else timeout
        deadline = None if wait is None else time.monotonic() + wait
        targets = [dict(t) for t in self.issued]
        dense = self.dense_version if self.dense is not None else -1
        shards = self.transport.shard_links
        for link in self._all_links():  # commits a batched() block holds go now
            link.wake()
        for s, links in enumerate(shards):
            for link in links:
                while not link.wait_for(targets[s], _left(deadline), dense if s == 0 else -1):
                    rows = link.replica.divergence()
                    if rows:  # (a divergence seen by wait_for may be settled now)
                        raise ReplicaDiverged(link.replica.index, rows)
                    if s == 0 and link.dense_refused(dense):
                        raise EkkoError(f"replica {link.replica.index} refused dense snapshot "
                                        f"{link.dense_failed[0]}: {link.dense_failed[1]}")
                    if _left(deadline) == 0.0 or not link.running:
                        errors = "; ".join(link.errors[-3:])
                        where = f" with primary shard {s}" if len(shards) > 1 else ""
                        raise EkkoError(f"replica {link.replica.index} did not catch up{where}"
                                        + (f" ({errors})" if errors else " in time"))
        for r in self.transport.replica_ports:
            while not r.holds(targets, dense, _left(deadline)):
                if _left(deadline) == 0.0:
                    raise EkkoError(f"replica {r.index} did not catch up in time")
                time.sleep(0.05)

    def check(self) -> bool:
        """Run the replica health checks now; rolls back on failure (see HealthConfig).

        Every replica must hold the primary's values (or an older version
        still on its way), finite, in the rows changed since the last healthy
        mark, and the `score` hook must pass (on Ray each replica process
        checks itself and runs the hook there). With `HealthConfig.quality`,
        each replica's predictions on the probe (`observe`) must not be worse
        than at the last healthy mark (engine/quality.py). A failed check
        rolls every table back, and the dense module to the snapshot of the
        mark; the replicas settle their divergent rows again. A passing one
        marks every table healthy. A replica that does not answer is skipped
        (stats()["check_skipped"]): it catches up when it is back.
        """
        self._alive()
        with self._check_lock:
            self.checks += 1
            reason = self._replica_problem(self.transport.primary_port.changed())
            quality = None
            if reason is None and self.probe is not None:
                reason, quality = self._quality_problem()
            if reason is None:
                self.transport.primary_port.mark_healthy()
                self._mark_dense(quality)
                return True
            self.failed_checks += 1
            for table in self.tables:
                self._rollback(table, reason)
            self._rollback_dense(reason)
            for _ in self._each_replica(lambda r: r.settle_divergent()):
                pass
            oldest = self._marks[0]  # the state everything went back to
            self._marks.clear()
            self._marks.append(oldest)
            if self.probe is not None:
                self._remeasure()
            return False

    @property
    def quality_marks(self) -> dict[int, Quality]:
        """Per replica, its quality at the last passing check: what a check is judged
        against. (Against an older mark, the probes overlap less and their noise alone
        rolled back clean runs: 8 times in 3 seeds at mark_lag=3.)"""
        return self._marks[-1].quality

    # -- quality (engine/quality.py) --------------------------------------------------------
    def observe(self, sparse: Any, x: Any, y: Any) -> None:
        """Labeled serving events (what users did with the predictions) for the quality
        checks' probe: the newest `QualityConfig.probe_events` are kept."""
        if self.probe is None:
            raise EkkoError("observe() feeds the quality checks: Engine(..., "
                            "health=HealthConfig(quality=QualityConfig()))")
        bags = {b.feature: b.as_tuple() for b in check_bags(self.model, sparse)}
        x = dense_input(x)
        labels = np.asarray(y.detach().cpu().numpy() if hasattr(y, "detach") else y,
                            np.float64).reshape(-1)
        if not np.isfinite(labels).all() or ((labels != 0) & (labels != 1)).any():
            raise EkkoError("observe(): labels must be 0 or 1")
        if x is not None and len(x) != len(labels):
            raise EkkoError(f"observe(): {len(labels)} labels for {len(x)} rows of x")
        self.probe.add(bags, x, labels)

    def _remeasure(self) -> None:
        """After a rollback: the mark's quality on today's probe is the new bar (the
        world moved since the mark; judged by the old figure, the restored model would
        fail every check, and each failure would undo the trainer's recovery again).
        Measured once the replicas hold the restored state; if they cannot be waited
        for, the old marks stay."""
        try:
            self.flush(timeout=self.transport.wait_s or _REMEASURE_WAIT_S)
        except EkkoError:
            return
        _, now = self._quality_problem(judge=False)
        self._marks[0].quality.update(now)

    def _quality_problem(self, judge: bool = True) -> tuple[str | None, dict[int, Quality]]:
        """(the first replica whose predictions on the probe are harmed, each replica's
        quality now); a replica that cannot predict (non-finite output) is harmed."""
        config = self.health.quality
        batches = self.probe.batches()
        y = np.concatenate([b[2] for b in batches]) if batches else np.zeros(0)
        if len(y) < config.min_events:
            return None, {}
        now: dict[int, Quality] = {}
        for r in self.transport.replica_ports:
            if not r.available():
                continue
            try:
                out = [np.asarray(r.predict(bags, x), np.float64).reshape(-1)
                       for bags, x, _ in batches]
                q = Quality.of(config.probability(np.concatenate(out)), y)
            except Unavailable:
                r.mark_down()
                continue
            except EkkoError as e:
                return f"replica {r.index}: its predictions failed ({e})", now
            now[r.index] = q
            self.quality_last[r.index] = q.as_dict()
            mark = self.quality_marks.get(r.index)
            why = None if mark is None or not judge else config.harm(mark, q)
            if why is not None:
                return f"replica {r.index}: {why}", now
        return None, now

    def _mark_dense(self, quality: dict[int, Quality] | None) -> None:
        """A passing check is a new mark: its quality, and the oldest dense snapshot a
        replica holds (every replica ran it or a newer one)."""
        latest = self._marks[-1]
        dense = latest.dense
        if self.dense is not None:
            held = [v for v in (r.held_dense() for r in self.transport.replica_ports
                                if r.available()) if v >= 0]
            version = min(held, default=dense.version if dense is not None else 0)
            dense = self._dense_recent.get(version, dense)
        self._marks.append(_Mark({**latest.quality, **(quality or {})}, dense))

    def _rollback_dense(self, reason: str) -> None:
        """Put the trainer's dense module back to the mark's weights and publish them as
        a new version (the torch optimizer's own state is the trainer's to reset)."""
        mark = self._marks[0].dense
        if self.dense is None or mark is None or _same_state(mark, self._dense_recent.get(
                self.dense_version)):
            return  # the replicas are sent the mark's weights already
        import torch

        start = time.perf_counter()
        with self._dense_lock:
            undone = (mark.version + 1, self.dense_version)
            self.dense.load_state_dict({k: torch.from_numpy(np.array(v))
                                        for k, v in mark.state.items()})
            snap = take_snapshot(self.dense, self.dense_version + 1)
            self._send_dense(snap)
        self.rollbacks.append(Rollback("dense", reason, undone, 0, time.perf_counter() - start,
                                       snap.version, time.time()))

    def _replica_problem(self, changed: dict[str, np.ndarray]) -> str | None:
        """The first problem in replica order (every replica was asked at once), or None."""
        answers = self._each_replica(lambda r: r.check(changed))
        return next((a for a in answers if a is not None), None)

    def _each_replica(self, ask: Any) -> Iterator[Any]:
        """Ask every reachable replica at once, then yield their answers in order; one
        that does not answer is marked down and skipped (stats()["check_skipped"])."""
        pending = []
        for r in self.transport.replica_ports:
            if not r.available():
                self.check_skipped.append(r.index)
                continue
            pending.append((r, ask(r)))
        for r, answer in pending:
            try:
                yield answer()
            except Unavailable:
                r.mark_down()
                self.check_skipped.append(r.index)

    def _rollback(self, table: str, reason: str) -> None:
        """Roll `table` back on the primary; the links send the restored rows first."""
        with self._announce[table]:  # restored rows are announced in version order
            self._publish(self.transport.primary_port.rollback(table, reason))

    def checkpoint(self) -> Any:
        """Make the primary's state durable and mark it healthy (on Ray: a snapshot of
        every shard, after which their logs start again empty)."""
        self._alive()
        return self.transport.primary_port.checkpoint()

    def lookup(self, feature: str, ids: Any, offsets: Any = None, **kw: Any) -> Any:
        """Serve from the replicas in turn; a replica that fails is skipped until back."""
        return self._route(lambda r: r.lookup(feature, ids, offsets, **kw))

    def predict(self, sparse: Any, x: Any = None) -> Any:
        """The dense module's output computed on a live replica (replicas in turn)."""
        if self.dense is None:
            raise EkkoError("this engine has no dense module: Engine(..., dense=module)")
        return self._route(lambda r: r.predict(sparse, x))

    def _route(self, ask: Callable[[Any], Any]) -> Any:
        """Ask the replicas in turn until one answers; one that fails is skipped until back."""
        if self._gone is not None:
            raise EkkoError(self._gone)
        wait = self.transport.wait_s
        deadline = None if wait is None else time.monotonic() + wait
        ports = self.transport.replica_ports
        while True:
            for _ in range(len(ports)):
                r = ports[self._next_replica % len(ports)]
                self._next_replica += 1
                if not r.available():
                    r.routed()
                    continue
                try:
                    return ask(r)
                except Unavailable:
                    r.mark_down()
                    r.routed()
            if _left(deadline) == 0.0:
                raise EkkoError(f"no replica answered within {wait:.0f} s")
            time.sleep(0.05)

    # -- regions (engine/regions.py) ----------------------------------------------------------
    def cut(self, region: str) -> None:
        """Cut the WAN links into and out of `region` (fault injection): what is sent across
        meanwhile is lost, flush does not wait for its replicas, and after `heal` they
        repair what they missed from their nearest peer (anti-entropy)."""
        geography = self._geography(region)
        if region == geography.geo.primary:
            raise EkkoError(f"cannot cut {region!r}: it is the primary's region (the primary "
                            "would be cut off from every replica)")
        geography.cut(region)

    def heal(self, region: str) -> None:
        """Restore `region`'s WAN links; its replicas repair what they missed from peers."""
        self._geography(region).heal(region)

    def replica_down(self, index: int) -> None:
        """Mark replica `index` down (fault injection): nothing reaches it, lookups and
        checks go around it, and a relay that is down is replaced."""
        self._geography(None).set_down(self._replica_index(index), True)

    def replica_up(self, index: int) -> None:
        """Replica `index` is back: it repairs what it missed from its nearest peer."""
        self._geography(None).set_down(self._replica_index(index), False)

    @property
    def relays(self) -> dict[str, int]:
        """Per remote region with a relay (topology "relay"), the replica it is now."""
        g = self._geography(None)
        return {n: r.relay for n, r in g.regions.items() if r.relay is not None}

    def _geography(self, region: str | None) -> Any:
        g = self.geography
        if g is None:
            raise EkkoError("this engine has no regions: Engine(model, regions={...}, "
                            "primary_region=...)")
        if region is not None and region not in g.regions:
            raise EkkoError(f"unknown region {region!r} (regions: {', '.join(g.regions)})")
        return g

    def _replica_index(self, index: Any) -> int:
        if not isinstance(index, int) or isinstance(index, bool) \
                or not 0 <= index < len(self.replicas):
            raise EkkoError(f"no replica {index!r} (replicas 0-{len(self.replicas) - 1})")
        return index

    # -- reporting ----------------------------------------------------------------------------
    def stats(self) -> dict:
        """Freshness (ms, p50/p99/max) overall, per replica and table; traffic; rollbacks;
        on Ray also restarts, catch-ups and what the shards replayed."""
        per, fresh, lookups = [], Histogram(), []
        wait = None if self.transport.wait_s is None else min(self.transport.wait_s, 10.0)
        for r in self.transport.replica_ports:
            try:
                summary, hist, samples = r.report(wait)
            except Unavailable:
                summary, hist, samples = {"unavailable": True}, Histogram(), None
            fresh.merge(hist)
            links = self.transport.links_of(r.index)
            summary["backlog_rows"] = sum(link.backlog() for link in links)
            summary["link_errors"] = [e for link in links for e in link.errors_of(r.index)]
            summary["link_recoveries"] = sum(link.recoveries_of(r.index) for link in links)
            per.append(summary)
            lookups.append(samples)
        out = {"freshness_ms": fresh.summary(), "replicas": per, "steps": self.steps,
               "rows_committed": self.rows_committed, "rejected_steps": self.rejected_steps}
        out.update({k: sum(p.get(k, 0) for p in per) for k in _SUMMED})
        out.update({"rollbacks": [r.as_dict() for r in self.rollbacks], "checks": self.checks,
                    "failed_checks": self.failed_checks, "check_skipped": list(self.check_skipped),
                    "lookup_ms": _lookup_summary(per, lookups)})
        if self.dense is not None:
            out["dense"] = self._dense_summary(per)
        if self.probe is not None:
            out["quality"] = {"probe_events": self.probe.events,
                              "replicas": dict(self.quality_last),
                              "marks": {i: q.as_dict() for i, q in self.quality_marks.items()}}
        out.update(self.transport.report(per))
        return out

    def freshness_histogram(self) -> Histogram:
        h = Histogram()
        for r in self.transport.replica_ports:
            try:
                h.merge(r.report(self.transport.wait_s)[1])
            except Unavailable:
                pass
        return h


    def _dense_summary(self, per: list[dict]) -> dict:
        """Dense snapshots beside the rows: published, sent (bytes), per-replica freshness."""
        held = [p["dense"] for p in per if "dense" in p]
        return {"published": self.dense_version,
                "bytes_sent": sum(link.dense_bytes for link in self.transport.shard_links[0]),
                "held": [h["version"] for h in held],
                "freshness_ms": _worst([h["freshness_ms"] for h in held])}


_DENSE_KEPT = 64  # recent snapshots kept: a healthy mark is one of them


@dataclass
class _Mark:
    """What a passing check marked healthy besides the tables: each replica's quality
    and the dense snapshot they all held."""

    quality: dict[int, Quality]
    dense: DenseSnapshot | None
_REMEASURE_WAIT_S = 30.0  # how long a rollback waits for the replicas to re-measure quality


def _same_state(a: DenseSnapshot, b: DenseSnapshot | None) -> bool:
    return b is not None and a.state.keys() == b.state.keys() and all(
        np.array_equal(v, b.state[k]) for k, v in a.state.items())


_GEO_DEFAULTS = {"wan_latency_ms": 50.0, "topology": "relay", "compress": True,
                 "relay_lag_ms": 1000.0}


def _check_regions(regions: Any, replicas: Any, cluster: Any,
                   options: dict[str, Any]) -> Geo | None:
    """The checked region plan (None without regions=); any misuse is one EkkoError,
    raised before anything is built."""
    if regions is None:
        given = sorted(k for k, v in options.items() if v is not None)
        if given:
            raise EkkoError(f"{', '.join(given)}: only with regions=")
        return None
    if replicas is not None:
        raise EkkoError("regions= places the replicas (name -> how many): give regions= or "
                        "replicas=, not both")
    o = {k: _GEO_DEFAULTS.get(k) if v is None else v for k, v in options.items()}
    return check_geo(regions, o["primary_region"], o["wan_bandwidth"], o["wan_latency_ms"],
                     o["topology"], o["compress"], o["relay_lag_ms"])


def _scheduler_configs(scheduler: Any, replicas: int) -> list[SchedulerConfig]:
    """One SchedulerConfig per replica (one given: the same for all)."""
    if scheduler is None:
        return [SchedulerConfig()] * replicas
    if isinstance(scheduler, SchedulerConfig):
        return [scheduler] * replicas
    configs = list(scheduler) if isinstance(scheduler, (list, tuple)) else None
    if configs is None or not all(isinstance(c, SchedulerConfig) for c in configs):
        raise EkkoError("scheduler must be a SchedulerConfig or a list of them (one per "
                        f"replica), got {type(scheduler).__name__}")
    if len(configs) != replicas:
        raise EkkoError(f"scheduler lists {len(configs)} configs for {replicas} replicas")
    return configs


def _check_dense(dense: Any) -> Any:
    """The dense module (a torch.nn.Module called module(pooled, x)), or None."""
    if dense is None:
        return None
    try:
        from torch import nn
    except ImportError as e:
        raise EkkoError(f"dense= needs PyTorch: pip install 'ekko[torch]' ({e})") from None
    if not isinstance(dense, nn.Module):
        raise EkkoError(f"dense must be a torch.nn.Module (called module(pooled, x)), "
                        f"got {type(dense).__name__}")
    return dense


def _dense_cadence(dense: Any, every: Any, every_ms: Any) -> tuple[int | None, float | None]:
    """(steps, ms) between automatic dense publishes; None: only publish_dense()."""
    if dense is None and (every is not None or every_ms is not None):
        raise EkkoError("dense_every and dense_every_ms need a dense module (dense=)")
    if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
        raise EkkoError(f"dense_every must be a positive number of steps, got {every!r}")
    if every_ms is not None and (isinstance(every_ms, bool)
                                 or not isinstance(every_ms, (int, float)) or not every_ms > 0
                                 or every_ms == float("inf")):
        raise EkkoError(f"dense_every_ms must be a positive number of ms, got {every_ms!r}")
    return every, None if every_ms is None else float(every_ms)


def _worst(summaries: list[dict]) -> dict:
    """The worst replica's percentiles (each replica summarized its own)."""
    if not summaries:
        return latency_summary([])
    return {"p50": max(p["p50"] for p in summaries), "p99": max(p["p99"] for p in summaries),
            "max": max(p["max"] for p in summaries), "count": sum(p["count"] for p in summaries)}


def _left(deadline: float | None) -> float | None:
    """Seconds left until `deadline` (None: no limit), never below 0."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _lookup_summary(per: list[dict], samples: list[list[float] | None]) -> dict:
    """Lookup latency across replicas: exact over every sample when they are all here (in
    process), else the worst replica's percentiles (each replica summarized its own)."""
    if all(s is not None for s in samples):
        return latency_summary([ms for s in samples for ms in s])
    return _worst([p["lookup_ms"] for p in per if "lookup_ms" in p])


__all__ = ["Engine"]
