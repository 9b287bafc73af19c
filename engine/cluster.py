"""ekko.Engine across processes and hosts, on Ray: `Engine(model, replicas=N, cluster=...)`.

    with ekko.Engine(model, replicas=2, cluster="local") as engine:   # or "auto", "ray://h:p"
        engine.step("t_cat0", ids, grads)     # durable on its primary shard when it returns
        engine.flush()                        # every replica holds every committed update
        engine.replicas[0].lookup("cat0", ids, offsets)     # a copy, from that process
        engine.replicas[0].pid                # the replica's process id

The same API and semantics as the in-process engine. Primary shards
(`primary_shards=K`, tables split by contiguous row ranges) and replicas
(a full serving copy each) are Ray actors built in `engine/actors.py`; the
scheduler's links stay in this process (one per replica and shard, the
in-process `Link` with its policies and budget), and packets go from a
shard to a replica through Ray's object store without passing through here.

Faults: Ray restarts a killed actor (`max_restarts`). A replica restores
its snapshot and catches up from the shards' model-update caches before it
serves again; lookups go to the other replicas meanwhile. A primary shard
reloads its snapshot and replays its durable log; a step caught by the
restart is resent with the same sequence number and answered once. A link
whose send failed asks its replica to catch up with that shard before it
moves its watermark. See docs/engine.md, "Across processes and hosts".
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
import warnings
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import ray
from ray import exceptions as rex

from ..kernels.errors import EkkoError
from ..kernels.model import CompiledModel
from ..kernels.model import compile_model as _compile
from .actors import (ReplicaConfig, ReplicaServer, ShardConfig, ShardServer, StepResult,
                     shard_bounds)
from .engine import Engine
from .inputs import as_array, as_ids, check_delta
from .packet import Packet
from .replica import ReplicaDiverged
from .primary import Commit
from .scheduler import Link, SchedulerConfig
from .state import HealthConfig, Rollback
from .stats import Histogram, latency_summary

_DOWN = (rex.RayActorError, rex.ActorUnavailableError, rex.GetTimeoutError,
         rex.ObjectLostError, rex.OwnerDiedError, rex.WorkerCrashedError)


class Unavailable(EkkoError):
    """An actor did not answer (dead, restarting, or too slow)."""


def connect(cluster: str, attempts: int = 3) -> str:
    """Start Ray here quietly ("local") or join a running cluster; returns its address.

    Ray gives its raylet 30 s to register; on a loaded machine that can run
    out, so starting (or joining) is tried `attempts` times.
    """
    if not isinstance(cluster, str) or not cluster:
        raise EkkoError(f"cluster must be 'local', 'auto' or a Ray address, got {cluster!r}")
    if cluster not in ("local", "auto") and not ray.is_initialized():
        _reachable(cluster)
        attempts = 1  # a cluster someone else runs: once, and fail plainly
    for attempt in range(attempts):
        if ray.is_initialized():
            break
        try:
            _init(cluster)
        except Exception as e:  # noqa: BLE001 - Ray raises plain Exception on a slow start
            ray.shutdown()
            if attempt == attempts - 1:
                raise EkkoError(f"cannot start or join Ray ({cluster!r}): {e}") from None
    return ray.get_runtime_context().gcs_address


def _reachable(address: str, timeout: float = 5.0) -> None:
    """Ray waits minutes on an address nobody answers at: look first, briefly."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise EkkoError(f"cluster must be 'local', 'auto', HOST:PORT or ray://HOST:PORT, "
                        f"got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise EkkoError(f"no Ray cluster answers at {address!r} "
                        f"({getattr(e, 'strerror', None) or e})") from None


def _init(cluster: str) -> None:
    quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
    if cluster == "local":
        # "local": a new instance, never one another process left on this machine
        ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                 configure_logging=True, **quiet)
    else:
        ray.init(address=cluster, **quiet)


def call(ref: Any, timeout: float) -> Any:
    """ray.get with the engine's error rules: EkkoError stays EkkoError, a dead actor is Unavailable.

    An actor whose constructor raised EkkoError (a shard refusing a damaged
    log) is dead for good: that error is raised, not Unavailable.
    """
    try:
        return ray.get(ref, timeout=timeout)
    except rex.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, EkkoError):
            raise type(cause)(str(cause)) from None
        if isinstance(cause, _DOWN):
            raise Unavailable(f"{type(cause).__name__}: {cause}") from None
        raise
    except _DOWN as e:
        refused = _refused(e)
        if refused is not None:
            raise EkkoError(refused) from None
        raise Unavailable(f"{type(e).__name__}") from None


def _refused(e: Exception) -> str | None:
    """The message of the EkkoError an actor's constructor raised, if that is why it died.

    Ray passes it on only as text: the last line of a traceback, the
    exception's class path and message.
    """
    if not getattr(e, "actor_init_failed", False):
        return None
    last = (getattr(e, "error_msg", "") or "").rstrip().rsplit("\n", 1)[-1]
    path, sep, message = last.partition(": ")
    module, _, name = path.rpartition(".")
    cls = getattr(sys.modules.get(module), name, None)
    if sep and isinstance(cls, type) and issubclass(cls, EkkoError):
        return message
    return None


def _warn_cut(shard: int, cut: dict | None) -> None:
    """Say what a shard's start cut (on_damage="cut"): acknowledged steps may be gone."""
    if cut is None or cut["torn"]:
        return
    tables = "".join(f", {t} steps {r['seq'][0]}-{r['seq'][1]}" for t, r in cut["tables"].items())
    warnings.warn(f"primary shard {shard} cut damage in {cut['file']} at byte {cut['offset']} "
                  f"({cut['reason']}): dropped {cut['records_dropped']} whole records "
                  f"({cut['acknowledged_dropped']}+ acknowledged{tables}); "
                  f"the cut bytes are in {cut['kept']}", stacklevel=4)


# -- what the in-process Link talks to, standing in for the remote parts ---------------------
class _ShardView:
    """A primary shard as a link sees it: its tables' row counts, norm means, row bytes."""

    def __init__(self, rows: dict[str, int], row_bytes: dict[str, int], issued: dict[str, int]):
        self.tables = {n: SimpleNamespace(buf=SimpleNamespace(table=SimpleNamespace(rows=r)),
                                          norm_mean=0.0) for n, r in rows.items()}
        self._row_bytes = row_bytes
        self._issued = dict(issued)  # when the engine started: links number on from here

    def row_bytes(self, table: str) -> int:
        return self._row_bytes[table]

    def issued(self, table: str) -> int:
        return self._issued.get(table, 0)


class _Watermarks:
    """Sends the links' watermarks to the replicas: one message per replica, not one per table.

    A link sets every table's watermark after each send; a Ray call for each
    would cost more than the send itself. They are collected here (newest per
    table and shard) and a sender thread delivers each replica's in one
    `set_watermarks` call, always after the merge they describe returned.
    """

    def __init__(self, actors: list):
        self.actors = actors
        self.cond = threading.Condition()
        self.pending: dict[int, dict[tuple[str, int], int]] = {}
        self.sent: dict[tuple[int, str, int], int] = {}
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True, name="ekko-watermarks")
        self.thread.start()

    def put(self, replica: int, table: str, shard: int, version: int) -> None:
        with self.cond:
            if self.sent.get((replica, table, shard), -2) >= version:
                return
            self.sent[(replica, table, shard)] = version
            self.pending.setdefault(replica, {})[(table, shard)] = version
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while self.running and not self.pending:
                    self.cond.wait(0.5)
                if not self.running:
                    return
                batch, self.pending = self.pending, {}
            for i, marks in batch.items():
                try:
                    self.actors[i].set_watermarks.remote(
                        [(t, s, v) for (t, s), v in marks.items()])
                except Exception:  # noqa: BLE001 - Ray shutting down; a catch-up sets them again
                    pass

    def stop(self) -> None:
        with self.cond:
            self.running = False
            self.cond.notify_all()


class _LinkReplica:
    """A replica actor as one shard's link sees it."""

    def __init__(self, index: int, actor: Any, shard: int, tables: list[str],
                 marks: _Watermarks):
        self.index, self.actor, self.shard = index, actor, shard
        self._traffic = dict.fromkeys(tables, 0)
        self.link: RemoteLink | None = None
        self.marks = marks

    def traffic(self) -> dict[str, int]:
        return self._traffic

    def note_issued(self, table: str, version: int) -> None:
        pass  # travels with each packet (Packet.newest)

    def divergence(self) -> dict:
        return {}  # kept by the replica process: flush asks it (ReplicaServer.status)

    def set_watermark(self, table: str, version: int) -> None:
        if self.link is not None and self.link.poisoned:
            return  # a lost send was not caught up with: claim nothing
        self.marks.put(self.index, table, self.shard, int(version))


def _packets_of(batch: list, step: int) -> tuple[list, list, list]:
    """A link's batch cut into packets of at most `step` rows: what to pack
    (table, ids), the versions each row was sent since, and the freshness marks."""
    wanted, since, marks = [], [], []
    for entry in batch:  # (table, ids, since, (norms, their commit times), ...)
        table, ids, stamps, (sig, sig_at) = entry[:4]
        for lo in range(0, len(ids), step):
            wanted.append((table, ids[lo:lo + step]))
            since.append(stamps[lo:lo + step])
            marks.append((table, sig[lo:lo + step], sig_at[lo:lo + step]))
    return wanted, since, marks


def _note_significant(link: Any, marks: list) -> None:
    """Freshness of the significant rows a link just made visible (its histogram)."""
    visible = time.time_ns()
    for table, sig, at in marks:
        mean = link.primary.tables[table].norm_mean or 1.0
        hot = (sig >= link.config.significant_ratio * mean) & (at > 0)
        if hot.any():
            link.significant.add((visible - at[hot]) / 1e6)


class RemoteLink(Link):
    """The in-process Link, sending through Ray: pack on the shard, merge on the replica."""

    def __init__(self, view: _ShardView, replica: _LinkReplica, config: SchedulerConfig,
                 shard: Any, timeout: float):
        super().__init__(view, replica, config)  # type: ignore[arg-type]
        self.shard, self.timeout = shard, timeout
        self.recoveries = 0
        self.poisoned = False
        replica.link = self

    def _send(self, batch: list) -> None:
        """The whole batch as one pack task on the shard and one merge task on the replica."""
        wanted, since, marks = _packets_of(batch, self.config.max_packet_rows)
        if not wanted:
            return
        packets = self.shard.pack_many.remote(wanted)
        try:
            call(self.replica.actor.merge_many.remote(packets, since), self.timeout)
        except Unavailable as e:
            self._recover(e)
            return
        except Exception as e:  # recorded by Link; the replica catches up first
            self._recover(e)
            raise
        _note_significant(self, marks)

    def errors_of(self, replica: int) -> list[str]:
        return list(self.errors)

    def recoveries_of(self, replica: int) -> int:
        return self.recoveries

    def _recover(self, error: Exception) -> None:
        """A send was lost (a replica or shard restarting): the replica catches up instead."""
        if isinstance(error, Unavailable):
            self.errors.append(f"{type(error).__name__}: {error}")
        self.recoveries += 1
        while self.running:
            try:
                call(self.replica.actor.catch_up.remote(self.replica.shard, "link"), self.timeout)
                return
            except Unavailable:
                time.sleep(0.2)
        self.poisoned = True


class _Member:
    """One replica in a shard's group link: attached (sent to), its watermarks trusted."""

    def __init__(self, index: int, actor: Any):
        self.index, self.actor = index, actor
        self.attached = self.marks_ok = True
        self.generation = 0  # bumped by every failure: a rejoin that saw one starts over
        self.rejoining = False
        self.recoveries = 0
        self.errors: list[str] = []


class _GroupReplica:
    """Every replica as one shard's group link sees them."""

    index = "all"

    def __init__(self, members: list[_Member], shard: int, tables: list[str],
                 marks: _Watermarks):
        self.members, self.shard, self.marks = members, shard, marks
        self._traffic = dict.fromkeys(tables, 0)

    def traffic(self) -> dict[str, int]:
        return self._traffic

    def note_issued(self, table: str, version: int) -> None:
        pass  # travels with each packet (Packet.newest)

    def divergence(self) -> dict:
        return {}  # kept by the replica processes: flush asks them (ReplicaServer.status)

    def set_watermark(self, table: str, version: int) -> None:
        for m in self.members:
            if m.attached and m.marks_ok:
                self.marks.put(m.index, table, self.shard, int(version))


class GroupLink(Link):
    """One link per shard for every replica: each batch is packed once, merged by all.

    Used when links have no bandwidth budget (each replica would be sent the
    same rows): the shard packs a batch once, and its one object-store
    reference goes to every replica's merge. A replica whose merge fails or
    lags (its process restarting) is detached at once, so the others keep
    their freshness; a thread waits until it answers again, attaches it,
    has it catch up with the shard (everything it missed), and only then
    lets its watermarks move again.
    """

    def __init__(self, view: _ShardView, group: _GroupReplica, config: SchedulerConfig,
                 shard: Any, timeout: float, slow_s: float):
        super().__init__(view, group, config)  # type: ignore[arg-type]
        self.shard, self.timeout, self.slow_s = shard, timeout, slow_s
        self.members = group.members
        self.lock = threading.Lock()

    def errors_of(self, replica: int) -> list[str]:
        return list(self.members[replica].errors)

    def recoveries_of(self, replica: int) -> int:
        return self.members[replica].recoveries

    def _send(self, batch: list) -> None:
        wanted, since, marks = _packets_of(batch, self.config.max_packet_rows)
        members = [m for m in self.members if m.attached]
        if not wanted or not members:
            return  # a detached replica catches up with the shard when it rejoins
        packets = self.shard.pack_many.remote(wanted)
        refs = {m.actor.merge_many.remote(packets, since): m for m in members}
        deadline = time.monotonic() + self.timeout
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending),
                                     timeout=min(self.slow_s, max(0.0, deadline - time.monotonic())))
            for ref in done:
                try:
                    call(ref, 0)
                except Exception as e:  # noqa: BLE001 - that replica catches up; others go on
                    self._detach(refs[ref], e)
            if not pending:
                break
            packed, _ = ray.wait([packets], timeout=0)
            if packed or time.monotonic() > deadline:  # the shard answered: these replicas lag
                for ref in pending:
                    self._detach(refs[ref], Unavailable(f"no merge within {self.slow_s:g} s"))
                break
        _note_significant(self, marks)

    def _detach(self, m: _Member, error: Exception) -> None:
        with self.lock:
            m.errors.append(f"{type(error).__name__}: {error}")
            self.errors.append(f"replica {m.index}: {type(error).__name__}: {error}")
            m.generation += 1
            m.attached = m.marks_ok = False
            if m.rejoining:
                return
            m.rejoining = True
        threading.Thread(target=self._rejoin, args=(m,), daemon=True,
                         name=f"ekko-rejoin-{m.index}").start()

    def _rejoin(self, m: _Member) -> None:
        """Attach `m` again once it answers; it catches up, then its watermarks move."""
        shard = self.replica.shard
        while self.running:
            with self.lock:
                generation = m.generation
            try:
                _, ready = call(m.actor.ping.remote(), self.timeout)
            except Exception:  # noqa: BLE001 - still restarting
                ready = False
            if not ready:
                time.sleep(0.2)
                continue
            m.attached = True  # sends reach it from now on; the catch-up covers what it missed
            try:
                call(m.actor.catch_up.remote(shard, "link"), self.timeout)
            except Exception:  # noqa: BLE001 - failed again: start over
                m.attached = False
                time.sleep(0.2)
                continue
            with self.lock:
                if m.generation != generation:
                    continue  # a send to it failed meanwhile
                m.marks_ok = True
                m.recoveries += 1
                m.rejoining = False
            for table in self.pending:
                self.replica.marks.put(m.index, table, shard, self.watermark(table))
            return
        with self.lock:
            m.rejoining = False


# -- what users hold -------------------------------------------------------------------------
class RemoteReplica:
    """engine.replicas[i]: one replica process; reads return copies."""

    def __init__(self, index: int, actor: Any, timeout: float, lookup_timeout: float,
                 rows: dict[str, int]):
        self.index, self.actor = index, actor
        self.timeout, self.lookup_timeout = timeout, lookup_timeout
        self._rows = rows
        self._probe: Any = None
        self.down_since: float | None = None
        self.routed_around = 0  # lookups the engine sent elsewhere: this replica was down
        self._routed_lock = threading.Lock()

    @property
    def pid(self) -> int:
        """The process id of this replica (a new one after a restart)."""
        return call(self.actor.ping.remote(), self.timeout)[0]

    @property
    def node(self) -> str:
        return call(self.actor.info.remote(), self.timeout)["node"]

    def lookup(self, feature: str, ids: Any, offsets: Any = None, per_sample_weights: Any = None,
               out: Any = None) -> np.ndarray:
        ids, offsets, per_sample_weights = (
            None if x is None else as_array(x, name, EkkoError) for x, name in
            ((ids, "ids"), (offsets, "offsets"), (per_sample_weights, "per_sample_weights")))
        result = call(self.actor.lookup.remote(feature, ids, offsets, per_sample_weights),
                      self.lookup_timeout)
        if out is not None:
            np.copyto(out, result)
            return out
        return result

    def serving(self, table: str) -> np.ndarray:
        return call(self.actor.serving.remote(table), self.timeout)

    def versions(self, table: str) -> np.ndarray:
        return call(self.actor.versions.remote(table), self.timeout)

    def rows(self, table: str, ids: Any) -> tuple[np.ndarray, np.ndarray]:
        if table not in self._rows:
            raise EkkoError(f"replica {self.index} has no table {table!r}")
        ids = as_ids(ids, self._rows[table], error=EkkoError)
        return call(self.actor.rows.remote(table, ids), self.timeout)

    def merge(self, packet: Packet | bytes) -> int:
        return call(self.actor.merge.remote(packet), self.timeout)

    def watermarks(self) -> dict[str, dict[int, int]]:
        return call(self.actor.watermarks.remote(), self.timeout)

    def snapshot(self) -> dict:
        """Write this replica's snapshot now (it restores it when it restarts)."""
        return call(self.actor.snapshot.remote(), self.timeout)

    def info(self) -> dict:
        return call(self.actor.info.remote(), self.timeout)

    # -- health, as the engine's lookups see it --------------------------------------------
    def available(self) -> bool:
        """False while down; a background ping (answered once caught up) brings it back."""
        if self.down_since is None:
            return True
        if self._probe is None:
            self._probe = self.actor.ping.remote()
        ready, _ = ray.wait([self._probe], timeout=0)
        if not ready:
            return False
        try:
            _, caught_up = ray.get(self._probe, timeout=0)
        except Exception:  # noqa: BLE001 - still down: ping again next time
            caught_up = False
        self._probe = None
        if caught_up:
            self.down_since = None
        return caught_up

    def mark_down(self) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
        self._probe = None

    def routed(self) -> None:
        """A lookup went to another replica because this one was down or failed."""
        with self._routed_lock:
            self.routed_around += 1


class PrimaryShards:
    """engine.primary: the primary shards together (reads assemble copies)."""

    def __init__(self, engine: ClusterEngine):
        self._engine = engine
        self.tables = {t.name: t for t in engine.model.model.tables}

    def _parts(self, table: str) -> list[tuple[np.ndarray, np.ndarray]]:
        e = self._engine
        if table not in self.tables:
            raise EkkoError(f"no table {table!r} (tables: {', '.join(self.tables)})")
        refs = [e.shards[k].serving.remote(table) for k in e.shards_of[table]]
        return [call(r, e.timeout) for r in refs]

    def serving(self, table: str) -> np.ndarray:
        """A copy of the primary's serving rows of `table` (from every shard)."""
        return np.concatenate([p[0] for p in self._parts(table)])

    def versions(self, table: str) -> np.ndarray:
        """Versions are per shard: each shard numbers its own commits."""
        return np.concatenate([p[1] for p in self._parts(table)])

    def issued(self, table: str) -> int:
        return max(self._engine.issued[k][table] for k in self._engine.shards_of[table])

    @property
    def pids(self) -> list[int]:
        e = self._engine
        return [call(s.info.remote(), e.timeout)["pid"] for s in e.shards]


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


def _end(actors: list, directory: Path, owned: bool) -> None:
    """End an engine's actors and remove the directory it made."""
    for a in actors if ray.is_initialized() else []:
        try:
            ray.kill(a, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone, or Ray already shut down
            pass
    if owned:
        shutil.rmtree(directory, ignore_errors=True)


def _merge_lookup(per: list[dict]) -> dict:
    """Lookup latency across replicas: the worst replica's percentiles (each is summarized)."""
    parts = [p["lookup_ms"] for p in per if "lookup_ms" in p]
    if not parts:
        return latency_summary([])
    return {"p50": max(p["p50"] for p in parts), "p99": max(p["p99"] for p in parts),
            "max": max(p["max"] for p in parts), "count": sum(p["count"] for p in parts)}


__all__ = ["ClusterEngine", "PrimaryShards", "RemoteReplica", "Unavailable", "call", "connect"]
