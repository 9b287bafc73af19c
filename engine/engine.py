"""ekko.Engine: a primary, its scheduler links, serving replicas and the state manager.

    with ekko.Engine(model, replicas=2) as engine:
        engine.step("t_cat0", ids, grads)   # returns once committed on the primary
        engine.flush()                      # every replica holds every committed update
        engine.replicas[0].lookup("cat0", ids, offsets)
        engine.stats()["freshness_ms"]      # {"p50", "p99", "max", "count"}

Everything runs in this process; the parts talk through packets and plain
values only (see docs/engine.md), so they can move onto separate processes.
`step` is safe from several threads at once (each table has its own lock).

An engine owns its model's tables: it numbers on from the versions they
carry, and a newer Engine on the same compiled model (a notebook cell run
again) takes them over, after which this one's step, flush and check raise.
"""

from __future__ import annotations

import threading
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from ..kernels.errors import EkkoError
from ..kernels.model import CompiledModel, compile_model
from .primary import Commit, Primary
from .replica import Replica, ReplicaDiverged
from .scheduler import Link, SchedulerConfig
from .state import HealthConfig, StateManager
from .stats import Histogram, latency_summary


_owners: dict[int, weakref.ref] = {}  # id(compiled model) -> the engine that owns its tables
_owners_lock = threading.Lock()


def _take_over(model: CompiledModel, engine: Engine) -> Engine | None:
    """Make `engine` the owner of `model`'s tables; returns the previous owner, if alive."""
    key = id(model)

    def gone(ref: weakref.ref) -> None:
        with _owners_lock:
            if _owners.get(key) is ref:
                del _owners[key]

    with _owners_lock:
        ref = _owners.get(key)
        _owners[key] = weakref.ref(engine, gone)
    old = ref() if ref is not None else None
    return old if old is not None and old.model is model else None


_CLUSTER_ONLY = {"primary_shards", "directory", "snapshot_s", "max_restarts", "timeout_s",
                 "lookup_timeout_s", "log_limit_bytes", "fsync", "chunk_rows", "actor_options",
                 "on_damage"}


class Engine:
    """See the module docstring. Use it as a context manager (or call start/close)."""

    def __new__(cls, *args: Any, cluster: str | None = None, **kw: Any) -> Engine:
        """cluster="local", "auto" or a Ray address: the engine on Ray (engine/cluster.py)."""
        if cluster is None:
            if set(kw) & _CLUSTER_ONLY:
                raise EkkoError(f"{', '.join(sorted(set(kw) & _CLUSTER_ONLY))}: only with cluster=")
            return super().__new__(cls)
        try:
            from .cluster import ClusterEngine  # imports ray: only when a cluster is asked for
        except ImportError as e:
            raise EkkoError(f"cluster={cluster!r} needs Ray: pip install 'ekko[ray]' ({e})") from None
        return super().__new__(ClusterEngine)

    def __init__(self, model: CompiledModel | str | Path, replicas: int = 2, *,
                 scheduler: SchedulerConfig | None = None, health: HealthConfig | None = None,
                 history_rows: int = 1 << 24, seed: int = 0, scale: float = 1.0,
                 cluster: None = None):
        if isinstance(model, (str, Path)):
            model = compile_model(model, scale=scale)
        if not isinstance(model, CompiledModel):
            raise EkkoError(f"Engine needs a compiled model or a model path, got {type(model).__name__}")
        if not isinstance(replicas, int) or replicas < 1:
            raise EkkoError(f"replicas must be a positive integer, got {replicas!r}")
        self.model = model
        self._retired = False
        previous = _take_over(model, self)
        if previous is not None:  # before reading the tables: its steps must be over
            previous._retire()
        self.primary = Primary(model, history_rows=history_rows, seed=seed)
        snapshot = {n: (pt.buf.lookup_table, pt.buf.versions) for n, pt in self.primary.tables.items()}
        issued = {n: pt.version for n, pt in self.primary.tables.items()}
        self.replicas = [Replica(i, model, snapshot, issued) for i in range(replicas)]
        self.config = scheduler or SchedulerConfig()
        self.links = [Link(self.primary, r, self.config) for r in self.replicas]
        # commit and announce happen under one lock per table, so links hear a
        # table's versions in order (a watermark never passes an unannounced one)
        self._announce = {n: threading.RLock() for n in self.primary.tables}
        self.state = StateManager(self.primary, health or HealthConfig(), self._send,
                                  self._announce)
        self.steps = 0
        self.rows_committed = 0
        self.rejected_steps = 0
        self._count_lock = threading.Lock()
        self._next_replica = 0
        self._started = False

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> Engine:
        self._alive()
        if not self._started:
            for link in self.links:
                link.start()
            self._started = True
        return self

    def close(self) -> None:
        if self._started:
            for link in self.links:
                link.stop()
            self._started = False

    def __enter__(self) -> Engine:
        return self.start()

    def _retire(self) -> None:
        """A newer Engine took this model's tables: finish the steps under way, then stop."""
        for lock in self._announce.values():
            lock.acquire()
        self._retired = True
        for lock in self._announce.values():
            lock.release()
        self.close()

    def _alive(self) -> None:
        if self._retired:
            raise EkkoError("a newer Engine on the same compiled model took its tables over "
                            "(it numbers on from this one's versions): use that one")

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the stream -----------------------------------------------------------------------
    def step(self, table: str, ids: Any, grads: Any) -> int:
        """Apply a trainer update on the primary; returns its version once committed.

        A harmful update (see HealthConfig) is rolled back at once, and the
        rollback is recorded in stats()["rollbacks"].
        """
        lock = self._announce.get(table)
        if lock is None:
            with self._count_lock:
                self.rejected_steps += 1
            raise EkkoError(f"no table {table!r} (tables: {', '.join(self.primary.tables)})")
        with lock:
            self._alive()
            try:
                commit = self.primary.step(table, ids, grads)
            except EkkoError:
                with self._count_lock:
                    self.rejected_steps += 1
                raise
            self._send(commit)
            reason = self.state.on_commit(commit)
            if reason is not None:
                self.state.rollback(table, reason)
        with self._count_lock:
            self.steps += 1
            self.rows_committed += len(commit.ids)
        if reason is None and self.state.due():
            self.check()
        return commit.version

    def _send(self, commit: Commit) -> None:
        """Announce a commit to every replica and link (rollback rows first in line)."""
        significance = commit.norms.astype(np.float64)
        for replica, link in zip(self.replicas, self.links):
            replica.note_issued(commit.table, commit.version)
            link.enqueue(commit, significance)

    def flush(self, timeout: float | None = None) -> None:
        """Return when every replica holds every update committed before this call.

        Raises ReplicaDiverged (an EkkoError) naming the replica, table and
        rows when a replica holds rows it could not be made equal to the
        primary's (see Replica.settle); `check()` then fails and rolls back.
        """
        self._alive()
        if not self._started:
            raise EkkoError("the engine is not running: use it as a context manager")
        targets = {n: self.primary.issued(n) for n in self.primary.tables}
        deadline = None if timeout is None else time.monotonic() + timeout
        for link in self.links:
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                caught_up = link.wait_for(targets, left)
                self._raise_divergence()  # (a divergence seen by wait_for may be settled now)
                if caught_up:
                    break
                if left == 0.0 or not link.running:
                    errors = "; ".join(link.errors[-3:])
                    raise EkkoError(f"replica {link.replica.index} did not catch up"
                                    + (f" ({errors})" if errors else " in time"))
        self._raise_divergence()

    def _raise_divergence(self) -> None:
        for r in self.replicas:
            rows = r.divergence()
            if rows:
                raise ReplicaDiverged(r.index, rows)

    def check(self) -> bool:
        """Run the replica health checks now; rolls back on failure (see HealthConfig)."""
        self._alive()
        return self.state.check(self.replicas)

    def lookup(self, feature: str, ids: Any, offsets: Any = None, **kw: Any) -> Any:
        """Serve from the replicas in turn."""
        r = self.replicas[self._next_replica % len(self.replicas)]
        self._next_replica += 1
        return r.lookup(feature, ids, offsets, **kw)

    # -- reporting ----------------------------------------------------------------------------
    def stats(self) -> dict:
        """Freshness (ms, p50/p99/max) overall, per replica and table; traffic; rollbacks."""
        per = [r.stats.summary() for r in self.replicas]
        fresh = Histogram()
        for r in self.replicas:
            fresh.merge(r.stats.all_freshness())
        lookups = [ms for r in self.replicas for ms in list(r.stats.lookup_ms)]
        for i, (summary, link) in enumerate(zip(per, self.links)):
            summary["watermarks"] = self.replicas[i].watermarks()
            summary["backlog_rows"] = link.backlog()
            summary["link_errors"] = list(link.errors)
            summary["divergent_rows"] = sum(map(len, self.replicas[i].divergence().values()))
        return {
            "freshness_ms": fresh.summary(),
            "replicas": per,
            "steps": self.steps,
            "rows_committed": self.rows_committed,
            "rejected_steps": self.rejected_steps,
            "rows_moved": sum(p["rows_moved"] for p in per),
            "bytes_moved": sum(p["bytes_moved"] for p in per),
            "packets": sum(p["packets"] for p in per),
            "packets_rejected": sum(p["packets_rejected"] for p in per),
            "rows_repaired": sum(p["rows_repaired"] for p in per),
            "divergent_rows": sum(p["divergent_rows"] for p in per),
            "future_packets": sum(p["future_packets"] for p in per),
            "rollbacks": [r.as_dict() for r in self.state.rollbacks],
            "checks": self.state.checks,
            "lookup_ms": latency_summary(lookups),
        }

    def freshness_histogram(self) -> Histogram:
        h = Histogram()
        for r in self.replicas:
            h.merge(r.stats.all_freshness())
        return h


__all__ = ["Engine"]
