"""The Ray transport: primary shards and replicas as Ray actors, the links in this process.

`RayTransport` builds the actors (engine/actors.py) and the links
(links.py); `ShardsPort` is the primary shards as one ports.PrimaryPort
(sequence numbers, the split by row range, retries across restarts), and
each `RemoteReplica` (proxies.py) is a replica's ports.ReplicaPort. The
engine's logic is `ekko.Engine`'s (engine/engine.py).
"""

from __future__ import annotations

import tempfile
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
from ..actors import ReplicaConfig, ReplicaServer, ShardConfig, ShardServer, StepResult, shard_bounds
from ..inputs import Gathered
from ..ports import Stepped, Unavailable
from ..primary import Commit
from ..regions import Geo
from ..scheduler import Link, SchedulerConfig
from ..state import HealthConfig, Rollback
from .links import GroupLink, RemoteLink, ShardView, _GroupReplica, _LinkReplica, _Member, _Watermarks
from .plumbing import _end, call, connect
from .proxies import PrimaryShards, RemoteReplica
from .regions import RayGeography, check_placement, placed


def _warn_cut(shard: int, cut: dict | None) -> None:
    """Say what a shard's start cut (on_damage="cut"): acknowledged steps may be gone."""
    if cut is None or cut["torn"]:
        return
    tables = "".join(f", {t} steps {r['seq'][0]}-{r['seq'][1]}" for t, r in cut["tables"].items())
    warnings.warn(f"primary shard {shard} cut damage in {cut['file']} at byte {cut['offset']} "
                  f"({cut['reason']}): dropped {cut['records_dropped']} whole records "
                  f"({cut['acknowledged_dropped']}+ acknowledged{tables}); "
                  f"the cut bytes are in {cut['kept']}", stacklevel=4)


class RayTransport:
    """The engine's parts on Ray (a ports.Transport; see the package docstring)."""

    def __init__(self, model: CompiledModel, replicas: int, configs: list[SchedulerConfig],
                 health: HealthConfig, *, cluster: str = "local", primary_shards: int = 1,
                 history_rows: int = 1 << 24, seed: int = 0,
                 directory: str | Path | None = None, snapshot_s: float = 0.0,
                 max_restarts: int = 100, timeout_s: float = 300.0, lookup_timeout_s: float = 2.0,
                 log_limit_bytes: int = 1 << 30, fsync: bool = True, chunk_rows: int = 1 << 16,
                 actor_options: dict[str, dict] | None = None, on_damage: str = "refuse",
                 dense: Any = None, dense_initial: Any = None, geo: Geo | None = None):
        if not isinstance(primary_shards, int) or isinstance(primary_shards, bool) \
                or primary_shards < 1:
            raise EkkoError(f"primary_shards must be a positive integer, got {primary_shards!r}")
        if geo is not None and primary_shards != 1:
            raise EkkoError(f"regions= on Ray runs one primary shard, got primary_shards="
                            f"{primary_shards}")
        if not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1:
            raise EkkoError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
        if on_damage not in ("refuse", "cut"):
            raise EkkoError(f"on_damage must be 'refuse' or 'cut', got {on_damage!r}")
        _check_picklable("the score hook", health.score)
        _check_picklable("the dense module", dense)
        self.chunk_rows, self.on_damage, self.dense = chunk_rows, on_damage, dense
        self.dense_initial = None if dense_initial is None else dense_initial.to_bytes()
        self.model, self.configs = model, configs
        self.timeout = self.wait_s = float(timeout_s)
        self.address = connect(cluster)
        self.geo, self.geography = geo, None
        if geo is not None:
            check_placement(geo)  # before any actor: one Ray would never place waits for ever
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="ekko-engine-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self._tables = {t.name: t for t in model.model.tables}
        self.bounds = {t.name: shard_bounds(t.rows, primary_shards) for t in model.model.tables}
        self._finalizer = weakref.finalize(self, _end, [], self.directory, self._own_dir)
        self._stopped = False
        self._start_actors(primary_shards, replicas, seed, history_rows, health, snapshot_s,
                           max_restarts, lookup_timeout_s, log_limit_bytes, fsync,
                           actor_options or {})
        self.primary_port = ShardsPort(self)
        self.replica_ports = self.replicas

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
        primary = options.get("primary", {})
        regions = None if self.geo is None else self.geo.region_of()
        if self.geo is not None:  # the shard in the primary's region, each replica in its own
            primary = placed(primary, self.geo.primary)
        self.shards = [shard_cls.options(name=names[s], **base, max_concurrency=8,
                                         **primary).remote(ShardConfig(
            m, s, k, str(self.directory / f"primary-{s}"), seed, history_rows,
            health.outlier_factor, health.warmup, log_limit, fsync, self.on_damage,
            health.mark_lag))
            for s in range(k)]
        row_bytes = [call(s.row_bytes.remote(), self.timeout) for s in self.shards]
        self.issued = [dict.fromkeys(tables_of[s], 0) for s in range(k)]
        replica, replica_cls = options.get("replica", {}), ray.remote(ReplicaServer)
        actors = [replica_cls.options(
            **base, max_concurrency=4 + k,
            **(replica if regions is None else placed(replica, regions[i]))).remote(ReplicaConfig(
            m, i, names, str(self.directory / f"replica-{i}"), snapshot_s, self.timeout,
            tables_of, health.score, health.min_score, self.chunk_rows, self.dense,
            self.dense_initial))
            for i in range(n)]
        self.replicas = [RemoteReplica(i, a, self.timeout, lookup_timeout, self.model)
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
            self.views.append(ShardView(rows, row_bytes[s], self.issued[s]))
        self.marks = _Watermarks(actors)
        config = self.configs[0]
        if self.geo is not None:  # links by region and topology (engine/regions.py)
            self.geography = RayGeography(self.geo, self.views[0], self.replicas, self.shards[0],
                                          self.marks, self.timeout)
            self.shard_links = [self.geography.build_links(self.configs)]
            self.links = [[self.geography.links[i]] for i in range(n)]
        elif config.bandwidth is None and all(c == config for c in self.configs):
            # every replica is sent the same: pack once per shard
            group = [GroupLink(self.views[s], _GroupReplica([_Member(i, a) for i, a in
                                                             enumerate(actors)], s, tables_of[s],
                                                            self.marks),
                               config, self.shards[s], self.timeout,
                               max(2.0, lookup_timeout)) for s in range(k)]
            self.shard_links: list[list[Link]] = [[g] for g in group]
            self.links = [list(group) for _ in actors]
        else:  # a budget or a policy per replica: a link each
            self.links = [[RemoteLink(self.views[s], _LinkReplica(i, a, s, tables_of[s],
                                                                  self.marks),
                                      self.configs[i], self.shards[s], self.timeout)
                           for s in range(k)] for i, a in enumerate(actors)]
            self.shard_links = [[per[s] for per in self.links] for s in range(k)]
        self.primary = PrimaryShards(self)

    # -- life cycle (ports.Transport) -------------------------------------------------------
    def links_of(self, replica: int) -> list[Link]:
        return self.links[replica]

    def stop(self) -> str:
        """The links stopped: stop the watermarks too. The processes stay readable."""
        if not self._stopped:
            if self.geography is not None:
                self.geography.stop()  # anti-entropy sends too
            self.marks.stop()
            self._stopped = True
        return "this engine was closed"

    def end(self) -> None:
        """End the actors and remove the engine's own directory (also when collected)."""
        self._finalizer()

    def report(self, replicas: list[dict]) -> dict:
        """Restarts, catch-ups, what the shards replayed, where the cluster is."""
        shards = []
        for s in self.shards:
            try:
                shards.append(call(s.info.remote(), min(self.timeout, 10.0)))
            except Unavailable:
                shards.append({"unavailable": True})
        return {
            "primaries": shards,
            "step_retries": self.primary_port.step_retries,
            "restarts": {"replicas": [p.get("restarts") for p in replicas],
                         "primaries": [s.get("restarts") for s in shards]},
            "catch_ups": sum(len(p.get("catch_ups") or []) for p in replicas),
            "replayed": [s.get("replayed") for s in shards],
            "cluster": {"address": self.address, "directory": str(self.directory)},
            **({} if self.geography is None else self.geography.report()),
        }


class ShardsPort:
    """The primary shards as one ports.PrimaryPort.

    A step gets a per-table sequence number (the engine holds the table's
    lock), is split by row range and sent to its shards; a shard caught by a
    restart is sent the step again and answers it once.
    """

    def __init__(self, t: RayTransport):
        self.t = t
        self.shards, self.bounds, self.timeout = t.shards, t.bounds, t.timeout
        self.step_retries = 0

    def issued(self) -> list[dict[str, int]]:
        return self.t.issued  # the engine keeps it current as it announces (one record)

    def step(self, table: str, ids: np.ndarray, grads: np.ndarray | Gathered) -> Stepped:
        if isinstance(grads, Gathered):  # the log records rows: shards get them made
            grads = grads.expand()
        self.t._seq[table] += 1
        seq = self.t._seq[table]
        parts = self._split(table, ids, grads)
        refs = {s: self.shards[s].step.remote(table, seq, i, g) for s, i, g in parts}
        results = {s: self._step_result(s, table, seq, i, g, refs[s]) for s, i, g in parts}
        done = Stepped(max(r.version for r in results.values()),
                       sum(len(r.ids) for r in results.values()))
        for s, res in results.items():
            self.t.views[s].note_norm_mean(table, res.norm_mean)
            done.commits.append((s, Commit(table, res.version, res.ids, res.norms, res.commit_ns)))
            if res.rollback is not None:
                done.commits.append((s, res.rollback))
                if res.rollback_record and not res.duplicate:
                    done.records.append(Rollback(**res.rollback_record))
        return done

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
                self.step_retries += 1  # under the table's lock
                time.sleep(0.1)
                ref = self.shards[s].step.remote(table, seq, ids, grads)
        if result.duplicate and not len(result.ids):  # its rows are unknown here: resync
            for r in self.t.replicas:
                r.actor.catch_up.remote(s, "resent step")
        return result

    def rollback(self, table: str, reason: str) -> Stepped:
        """Roll `table` back on each of its shards (logged first, so a restarted shard
        replays it); the engine sends the restored rows first."""
        done = Stepped()
        for s in self.t.shards_of[table]:
            (commit, record), resent = self._on_shard(
                s, lambda sh: sh.rollback.remote(table, reason))
            if resent:  # it may have rolled back before it restarted: resync from it
                for r in self.t.replicas:
                    r.actor.catch_up.remote(s, "resent rollback")
            if commit is not None:
                done.commits.append((s, commit))
                if record:
                    done.records.append(Rollback(**record))
        return done

    def changed(self) -> dict[str, np.ndarray]:
        parts: dict[str, list[np.ndarray]] = {t: [] for t in self.t._tables}
        for s in range(len(self.shards)):
            for table, ids in self._on_shard(s, lambda sh: sh.changed.remote())[0].items():
                parts[table].append(ids)
        return {t: np.concatenate(p) if p else np.zeros(0, np.int64) for t, p in parts.items()}

    def mark_healthy(self) -> None:
        for s in range(len(self.shards)):
            self._on_shard(s, lambda sh: sh.mark_healthy.remote())

    def checkpoint(self) -> list[dict]:
        """Snapshot every primary shard (and mark it healthy); their logs start again empty."""
        return [call(s.snapshot.remote(), self.timeout) for s in self.shards]

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


def _check_picklable(what: str, obj: Any) -> None:
    """The score hook and the dense module go to every replica process: they must pickle."""
    if obj is None:
        return
    try:
        ray.cloudpickle.dumps(obj)
    except Exception as e:  # noqa: BLE001 - whatever pickling raises
        raise EkkoError(f"{what} goes to each replica process, so it must be picklable "
                        f"(cloudpickle: lambdas and closures are, locks, files and sockets are "
                        f"not): {type(e).__name__}: {e}") from None


__all__ = ["RayTransport", "ShardsPort"]
