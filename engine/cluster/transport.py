"""ClusterEngine: builds the primary shards and replicas as Ray actors and drives them."""

from __future__ import annotations

import tempfile
import threading
import time
import uuid
import warnings
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import ray

from ...kernels.errors import EkkoError
from ...kernels.model import CompiledModel
from ...kernels.model import compile_model as _compile
from ..actors import ReplicaConfig, ReplicaServer, ShardConfig, ShardServer, StepResult, shard_bounds
from ..engine import Engine
from ..inputs import check_delta
from ..primary import Commit
from ..replica import ReplicaDiverged
from ..scheduler import Link, SchedulerConfig
from ..state import HealthConfig, Rollback
from ..stats import Histogram, latency_summary
from .links import GroupLink, RemoteLink, _GroupReplica, _LinkReplica, _Member, _ShardView, _Watermarks
from .plumbing import Unavailable, _end, call, connect
from .proxies import PrimaryShards, RemoteReplica


def _warn_cut(shard: int, cut: dict | None) -> None:
    """Say what a shard's start cut (on_damage="cut"): acknowledged steps may be gone."""
    if cut is None or cut["torn"]:
        return
    tables = "".join(f", {t} steps {r['seq'][0]}-{r['seq'][1]}" for t, r in cut["tables"].items())
    warnings.warn(f"primary shard {shard} cut damage in {cut['file']} at byte {cut['offset']} "
                  f"({cut['reason']}): dropped {cut['records_dropped']} whole records "
                  f"({cut['acknowledged_dropped']}+ acknowledged{tables}); "
                  f"the cut bytes are in {cut['kept']}", stacklevel=4)


class ClusterEngine(Engine):
    """ekko.Engine on Ray (see the module docstring)."""

    def __init__(self, model: CompiledModel | str | Path, replicas: int = 2, *,
                 cluster: str = "local", primary_shards: int = 1,
                 scheduler: SchedulerConfig | None = None, health: HealthConfig | None = None,
                 history_rows: int = 1 << 24, seed: int = 0, scale: float = 1.0,
                 directory: str | Path | None = None, snapshot_s: float = 0.0,
                 max_restarts: int = 100, timeout_s: float = 300.0, lookup_timeout_s: float = 2.0,
                 log_limit_bytes: int = 1 << 30, fsync: bool = True, chunk_rows: int = 1 << 16,
                 actor_options: dict[str, dict] | None = None, on_damage: str = "refuse"):
        if isinstance(model, (str, Path)):
            model = _compile(model, scale=scale)
        if not isinstance(model, CompiledModel):
            raise EkkoError(f"Engine needs a compiled model or a model path, got {type(model).__name__}")
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
            raise EkkoError(f"replicas must be a positive integer, got {replicas!r}")
        if not isinstance(primary_shards, int) or isinstance(primary_shards, bool) \
                or primary_shards < 1:
            raise EkkoError(f"primary_shards must be a positive integer, got {primary_shards!r}")
        if not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1:
            raise EkkoError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
        if on_damage not in ("refuse", "cut"):
            raise EkkoError(f"on_damage must be 'refuse' or 'cut', got {on_damage!r}")
        self.chunk_rows, self.on_damage = chunk_rows, on_damage
        health = health or HealthConfig()
        _check_health(health)
        self.model = model
        self.config = scheduler or SchedulerConfig()
        self.timeout = float(timeout_s)
        self.address = connect(cluster)
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="ekko-engine-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.steps = self.rows_committed = self.rejected_steps = 0
        self.step_retries = 0
        self.health = health
        self.checks = self.failed_checks = self._commits = 0
        self.check_skipped: list[int] = []  # replicas a check could not reach
        self._check_lock = threading.Lock()
        self.rollbacks: list[Rollback] = []
        self._count_lock = threading.Lock()
        self._next_replica = 0
        self._started = False
        self._closed = False
        self._tables = {t.name: t for t in model.model.tables}
        self.bounds = {t.name: shard_bounds(t.rows, primary_shards) for t in model.model.tables}
        self._finalizer = weakref.finalize(self, _end, [], self.directory, self._own_dir)
        self._start_actors(primary_shards, replicas, seed, history_rows, health, snapshot_s,
                           max_restarts, lookup_timeout_s, log_limit_bytes, fsync,
                           actor_options or {})

    # -- building -----------------------------------------------------------------------
    def _start_actors(self, k: int, n: int, seed: int, history_rows: int, health: HealthConfig,
                      snapshot_s: float, max_restarts: int, lookup_timeout: float,
                      log_limit: int, fsync: bool, options: dict[str, dict]) -> None:
        m = self.model.model
        self.shards_of = {name: list(range(len(b) - 1)) for name, b in self.bounds.items()}
        tables_of = {s: [n_ for n_, ks in self.shards_of.items() if s in ks] for s in range(k)}
        if any(not ts for ts in tables_of.values()):
            raise EkkoError(f"primary_shards={k} leaves a shard without rows: use at most "
                            f"{max(t.rows for t in m.tables)}")
        base = {"num_cpus": 0, "max_restarts": max_restarts, "max_task_retries": 0}
        shard_cls = ray.remote(ShardServer)
        names = [f"ekko-{uuid.uuid4().hex[:12]}-primary-{s}" for s in range(k)]
        self.shards = [shard_cls.options(name=names[s], **base, max_concurrency=8,
                                         **options.get("primary", {})).remote(ShardConfig(
            m, s, k, str(self.directory / f"primary-{s}"), seed, history_rows,
            health.outlier_factor, health.warmup, log_limit, fsync, self.on_damage))
            for s in range(k)]
        row_bytes = [call(s.row_bytes.remote(), self.timeout) for s in self.shards]
        self.issued = [dict.fromkeys(tables_of[s], 0) for s in range(k)]
        replica_cls = ray.remote(ReplicaServer).options(**base, max_concurrency=4 + k,
                                                        **options.get("replica", {}))
        actors = [replica_cls.remote(ReplicaConfig(
            m, i, names, str(self.directory / f"replica-{i}"), snapshot_s, self.timeout,
            tables_of, health.score, health.min_score, self.chunk_rows)) for i in range(n)]
        rows = {t.name: t.rows for t in m.tables}
        self.replicas = [RemoteReplica(i, a, self.timeout, lookup_timeout, rows)
                         for i, a in enumerate(actors)]
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _end, self.shards + actors, self.directory,
                                           self._own_dir)
        for r in self.replicas:
            call(r.actor.ping.remote(), self.timeout)
        # a directory used before: its shards replayed steps; number on from the last (the
        # links' watermarks start at each shard's newest version, not at 0)
        self._seq = dict.fromkeys(self._tables, 0)
        for s, shard in enumerate(self.shards):
            info = call(shard.info.remote(), self.timeout)
            _warn_cut(s, info["replayed"]["cut"])
            self.issued[s].update(info["issued"])
            for name, seq in info["last_seq"].items():
                self._seq[name] = max(self._seq[name], seq)
        self.views = []
        for s in range(k):
            rows = {name: self.bounds[name][s + 1] - self.bounds[name][s] for name in tables_of[s]}
            self.views.append(_ShardView(rows, row_bytes[s], self.issued[s]))
        self.marks = _Watermarks(actors)
        if self.config.bandwidth is None:  # every replica is sent the same: pack once per shard
            group = [GroupLink(self.views[s], _GroupReplica([_Member(i, a) for i, a in
                                                             enumerate(actors)], s, tables_of[s],
                                                            self.marks),
                               self.config, self.shards[s], self.timeout,
                               max(2.0, lookup_timeout)) for s in range(k)]
            self.shard_links: list[list[Link]] = [[g] for g in group]
            self.links = [list(group) for _ in actors]
        else:  # a budget per replica: a link each
            self.links = [[RemoteLink(self.views[s], _LinkReplica(i, a, s, tables_of[s],
                                                                  self.marks),
                                      self.config, self.shards[s], self.timeout)
                           for s in range(k)] for i, a in enumerate(actors)]
            self.shard_links = [[per[s] for per in self.links] for s in range(k)]
        self.primary = PrimaryShards(self)
        self._announce = {name: threading.Lock() for name in self._tables}

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> ClusterEngine:
        if self._closed:
            raise EkkoError("this engine was closed")
        if not self._started:
            for link in self._all_links():
                link.start()
            self._started = True
        return self

    def close(self) -> None:
        """Stop the links. The processes stay readable (stats, serving) until shutdown()."""
        if self._started:
            for link in self._all_links():
                link.stop()
            self._started = False
        if not self._closed and hasattr(self, "marks"):
            self.marks.stop()
        self._closed = True

    def shutdown(self) -> None:
        """Close, end the actors and remove the engine's own directory (also when collected)."""
        self.close()
        self._shut = True
        self._finalizer()

    def _alive(self) -> None:
        """After shutdown() the processes are gone: say so at once (never wait on them)."""
        if getattr(self, "_shut", False):
            raise EkkoError("this engine was shut down (its Ray processes are gone)")

    def _all_links(self) -> list[RemoteLink]:
        return [link for links in self.shard_links for link in links]

    # -- the stream -----------------------------------------------------------------------------
    def step(self, table: str, ids: Any, grads: Any) -> int:
        """Apply a trainer update on its primary shards; returns once durable and committed.

        With several shards each numbers its own versions: this returns the
        highest version among the shards the update touched.
        """
        self._alive()
        t = self._tables.get(table)
        if t is None:
            raise EkkoError(f"no table {table!r} (tables: {', '.join(self._tables)})")
        try:
            ids, grads = check_delta(ids, grads, t.rows, t.dim)
        except EkkoError:
            with self._count_lock:
                self.rejected_steps += 1
            raise
        with self._announce[table]:
            self._seq[table] += 1
            seq = self._seq[table]
            parts = self._split(table, ids, grads)
            refs = {s: self.shards[s].step.remote(table, seq, i, g) for s, i, g in parts}
            results = {s: self._step_result(s, table, seq, i, g, refs[s]) for s, i, g in parts}
            for s, res in results.items():
                self._announce_commit(s, table, res)
        with self._count_lock:
            self.steps += 1
            self.rows_committed += sum(len(r.ids) for r in results.values())
            self._commits += 1
            due = bool(self.health.check_every) and self._commits % self.health.check_every == 0
        rolled_back = any(r.rollback is not None for r in results.values())
        if due and not rolled_back:
            self.check()
        return max(r.version for r in results.values())

    def _split(self, table: str, ids: np.ndarray, grads: np.ndarray) -> list:
        b = self.bounds[table]
        if len(b) == 2 or not len(ids):
            return [(0, ids, grads)]
        which = np.searchsorted(b, ids, side="right") - 1
        return [(int(s), ids[which == s] - b[s], grads[which == s]) for s in np.unique(which)]

    def _step_result(self, s: int, table: str, seq: int, ids: np.ndarray, grads: np.ndarray,
                     ref: Any) -> StepResult:
        """The shard's answer; a step caught by a restart is sent again (answered once)."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                result = call(ref, max(1.0, deadline - time.monotonic()))
                break
            except Unavailable:
                if time.monotonic() > deadline:
                    raise EkkoError(f"primary shard {s} did not come back within "
                                    f"{self.timeout:.0f} s") from None
                with self._count_lock:
                    self.step_retries += 1
                time.sleep(0.1)
                ref = self.shards[s].step.remote(table, seq, ids, grads)
        if result.duplicate and not len(result.ids):  # its rows are unknown here: resync
            for r in self.replicas:
                r.actor.catch_up.remote(s, "resent step")
        return result

    def _announce_commit(self, s: int, table: str, res: StepResult) -> None:
        self.views[s].tables[table].norm_mean = res.norm_mean
        commits = [Commit(table, res.version, res.ids, res.norms, res.commit_ns)]
        if res.rollback is not None:
            commits.append(res.rollback)
            if res.rollback_record and not res.duplicate:
                self.rollbacks.append(Rollback(**res.rollback_record))
        for c in commits:
            self.issued[s][table] = max(self.issued[s][table], c.version)
            sig = c.norms.astype(np.float64)
            for link in self.shard_links[s]:
                link.enqueue(c, sig)

    def flush(self, timeout: float | None = None) -> None:
        """Return when every replica holds every update committed before this call."""
        if not self._started:
            raise EkkoError("the engine is not running: use it as a context manager")
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        targets = [dict(t) for t in self.issued]
        for s, links in enumerate(self.shard_links):
            for link in links:
                if not link.wait_for(targets[s], max(0.0, deadline - time.monotonic())):
                    raise EkkoError(f"replica {link.replica.index} did not catch up with primary "
                                    f"shard {s} in time"
                                    + (f" ({'; '.join(link.errors[-2:])})" if link.errors else ""))
        for r in self.replicas:
            while not self._holds(r, targets, deadline):
                if time.monotonic() > deadline:
                    raise EkkoError(f"replica {r.index} did not catch up in time")
                time.sleep(0.05)

    def _holds(self, r: RemoteReplica, targets: list[dict[str, int]], deadline: float) -> bool:
        """Whether replica `r` holds every target; raises ReplicaDiverged when it cannot."""
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            wm, divergent = call(r.actor.status.remote(), min(left, self.timeout))
        except Unavailable:
            return False
        if divergent:
            raise ReplicaDiverged(r.index, divergent)
        return all(wm.get(t, {}).get(s, -1) >= v for s, tv in enumerate(targets)
                   for t, v in tv.items())

    def check(self) -> bool:
        """Run the replica health checks now; rolls back on failure (see HealthConfig).

        As in process: every replica must hold finite values in the rows
        changed since the last healthy mark, and the `score` hook must pass.
        Each replica process checks itself and runs the hook on its own
        `Replica` (the hook was pickled into it). A failed check rolls every
        table back on every shard (logged first, so a restarted shard replays
        it) and the replicas follow; a passing one marks every shard healthy.
        A replica that is down is skipped (it catches up from the shards when
        it is back) and counted in stats()["check_skipped"].
        """
        self._alive()
        with self._check_lock:
            self.checks += 1
            changed = self._changed()
            reason = self._replica_problem(changed)
            if reason is None:
                for s in range(len(self.shards)):
                    self._on_shard(s, lambda sh: sh.mark_healthy.remote())
                return True
            self.failed_checks += 1
            for table in self._tables:
                self._rollback(table, reason)
            self._settle_divergent()
            return False

    def _settle_divergent(self) -> None:
        """After a rollback each replica settles its divergent rows again (as in process)."""
        refs = {r.index: r.actor.settle_divergent.remote() for r in self.replicas}
        for i, ref in refs.items():
            try:
                call(ref, self.timeout)
            except Unavailable:
                self.replicas[i].mark_down()  # it settles from the shards when it is back

    def _changed(self) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {t: [] for t in self._tables}
        for s in range(len(self.shards)):
            for table, ids in self._on_shard(s, lambda sh: sh.changed.remote())[0].items():
                parts[table].append(ids)
        return {t: np.concatenate(p) if p else np.zeros(0, np.int64) for t, p in parts.items()}

    def _replica_problem(self, changed: dict[str, np.ndarray]) -> str | None:
        refs = {}
        for r in self.replicas:
            if r.down_since is not None and not r.available():
                self.check_skipped.append(r.index)
                continue
            refs[r.index] = r.actor.check.remote(changed)
        for i, ref in refs.items():  # the first problem in replica order, as in process
            try:
                reason = call(ref, self.timeout)
            except Unavailable:
                self.replicas[i].mark_down()
                self.check_skipped.append(i)
                continue
            if reason is not None:
                return reason
        return None

    def _rollback(self, table: str, reason: str) -> None:
        """Roll `table` back on each of its shards; the links send the restored rows first."""
        with self._announce[table]:
            for s in self.shards_of[table]:
                (commit, record), resent = self._on_shard(
                    s, lambda sh: sh.rollback.remote(table, reason))
                if resent:  # it may have rolled back before it restarted: resync from it
                    for r in self.replicas:
                        r.actor.catch_up.remote(s, "resent rollback")
                if commit is None:
                    continue
                self.issued[s][table] = max(self.issued[s][table], commit.version)
                sig = commit.norms.astype(np.float64)
                for link in self.shard_links[s]:
                    link.enqueue(commit, sig)
                if record:
                    self.rollbacks.append(Rollback(**record))

    def _on_shard(self, s: int, send: Any) -> tuple[Any, bool]:
        """(a call's answer, whether it was sent again): a shard restarting is waited for."""
        deadline = time.monotonic() + self.timeout
        resent = False
        while True:
            try:
                return call(send(self.shards[s]), max(1.0, deadline - time.monotonic())), resent
            except Unavailable:
                if time.monotonic() > deadline:
                    raise EkkoError(f"primary shard {s} did not come back within "
                                    f"{self.timeout:.0f} s") from None
                resent = True
                time.sleep(0.1)

    def checkpoint(self) -> list[dict]:
        """Snapshot every primary shard (and mark it healthy); their logs start again empty."""
        self._alive()
        return [call(s.snapshot.remote(), self.timeout) for s in self.shards]

    def lookup(self, feature: str, ids: Any, offsets: Any = None, **kw: Any) -> Any:
        """Serve from a healthy replica, in turn; a replica that fails is skipped until back."""
        self._alive()
        deadline = time.monotonic() + self.timeout
        n = len(self.replicas)
        while time.monotonic() < deadline:
            for _ in range(n):
                r = self.replicas[self._next_replica % n]
                self._next_replica += 1
                if not r.available():
                    r.routed()
                    continue
                try:
                    return r.lookup(feature, ids, offsets, **kw)
                except Unavailable:
                    r.mark_down()
                    r.routed()
            time.sleep(0.05)
        raise EkkoError(f"no replica answered within {self.timeout:.0f} s")

    # -- reporting ---------------------------------------------------------------------------------
    def stats(self) -> dict:
        """The in-process engine's report, plus restarts, catch-ups and what shards replayed."""
        per, fresh = [], Histogram()
        wait = min(self.timeout, 10.0)  # a restarting process answers once caught up
        for i, r in enumerate(self.replicas):
            try:
                summary, hist = call(r.actor.stats.remote(), wait)
                info = call(r.actor.info.remote(), wait)
            except Unavailable:
                summary, hist, info = {"unavailable": True}, Histogram(), {}
            fresh.merge(hist)
            summary["backlog_rows"] = sum(link.backlog() for link in self.links[i])
            summary["link_errors"] = [e for link in self.links[i] for e in link.errors_of(i)]
            summary["link_recoveries"] = sum(link.recoveries_of(i) for link in self.links[i])
            summary["lookups_routed_around"] = r.routed_around
            summary.update({k: info.get(k) for k in ("pid", "node", "restarts", "catch_ups",
                                                      "restored_from_snapshot", "snapshot_damage",
                                                      "ready_seconds")})
            per.append(summary)
        shards = []
        for s in self.shards:
            try:
                shards.append(call(s.info.remote(), wait))
            except Unavailable:
                shards.append({"unavailable": True})
        return {
            "freshness_ms": fresh.summary(),
            "replicas": per,
            "primaries": shards,
            "steps": self.steps,
            "rows_committed": self.rows_committed,
            "rejected_steps": self.rejected_steps,
            "step_retries": self.step_retries,
            "rows_moved": sum(p.get("rows_moved", 0) for p in per),
            "bytes_moved": sum(p.get("bytes_moved", 0) for p in per),
            "packets": sum(p.get("packets", 0) for p in per),
            "packets_rejected": sum(p.get("packets_rejected", 0) for p in per),
            "rows_repaired": sum(p.get("rows_repaired", 0) for p in per),
            "divergent_rows": sum(p.get("divergent_rows", 0) for p in per),
            "future_packets": sum(p.get("future_packets", 0) for p in per),
            "rollbacks": [r.as_dict() for r in self.rollbacks],
            "checks": self.checks,
            "failed_checks": self.failed_checks,
            "check_skipped": list(self.check_skipped),
            "lookup_ms": latency_summary([]) if not per else _merge_lookup(per),
            "restarts": {"replicas": [p.get("restarts") for p in per],
                         "primaries": [s.get("restarts") for s in shards]},
            "catch_ups": sum(len(p.get("catch_ups") or []) for p in per),
            "replayed": [s.get("replayed") for s in shards],
            "cluster": {"address": self.address, "directory": str(self.directory)},
        }

    def freshness_histogram(self) -> Histogram:
        h = Histogram()
        for r in self.replicas:
            try:
                h.merge(call(r.actor.stats.remote(), self.timeout)[1])
            except Unavailable:
                pass
        return h


def _check_health(health: HealthConfig) -> None:
    """The score hook runs in every replica process: it must be a picklable callable."""
    if not isinstance(health, HealthConfig):
        raise EkkoError(f"health must be a HealthConfig, got {type(health).__name__}")
    if not isinstance(health.check_every, int) or health.check_every < 0:
        raise EkkoError(f"check_every must be a non-negative integer, got {health.check_every!r}")
    if health.score is None:
        return
    if not callable(health.score):
        raise EkkoError(f"the score hook must be callable, got {type(health.score).__name__}")
    try:
        ray.cloudpickle.dumps(health.score)
    except Exception as e:  # noqa: BLE001 - whatever pickling raises
        raise EkkoError("the score hook runs in each replica process, so it must be picklable "
                        f"(cloudpickle: lambdas and closures are, locks, files and sockets are "
                        f"not): {type(e).__name__}: {e}") from None


def _merge_lookup(per: list[dict]) -> dict:
    """Lookup latency across replicas: the worst replica's percentiles (each is summarized)."""
    parts = [p["lookup_ms"] for p in per if "lookup_ms" in p]
    if not parts:
        return latency_summary([])
    return {"p50": max(p["p50"] for p in parts), "p99": max(p["p99"] for p in parts),
            "max": max(p["max"] for p in parts), "count": sum(p["count"] for p in parts)}



__all__ = ["ClusterEngine"]
