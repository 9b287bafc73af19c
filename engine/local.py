"""The in-process transport: the primary, the replicas and their links in this process.

`LocalTransport` places one `Primary`, `replicas` `Replica`s and a `Link`
each (with its own sender thread) here; `LocalPrimary` and `LocalReplica`
are the ports (ports.py) the engine core drives them through. Calls are
plain method calls; nothing is ever unavailable.

An engine owns its model's tables: a newer engine on the same compiled
model retires the one before it (after its steps under way finished)
before it reads the tables.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from ..kernels.errors import EkkoError
from ..kernels.model import CompiledModel
from .ports import Stepped
from .primary import Primary
from .regions import Geo, Geography
from .replica import Replica, ReplicaDiverged
from .scheduler import Link, SchedulerConfig
from .state import HealthConfig, apply_checked, changed_rows, replica_problem, roll_back
from .stats import Histogram

_owners: dict[int, weakref.ref] = {}  # id(compiled model) -> the engine that owns its tables
_owners_lock = threading.Lock()
RETIRED = ("a newer Engine on the same compiled model took its tables over "
           "(it numbers on from this one's versions): use that one")


def _take_over(model: CompiledModel, engine: Any) -> Any:
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


class LocalPrimary:
    """The in-process `Primary` as a ports.PrimaryPort (one shard: shard 0)."""

    def __init__(self, primary: Primary, health: HealthConfig):
        self.primary, self.health = primary, health

    def issued(self) -> list[dict[str, int]]:
        return [{n: self.primary.issued(n) for n in self.primary.tables}]

    def step(self, table: str, ids: np.ndarray, grads: np.ndarray) -> Stepped:
        commit, rolled = apply_checked(self.primary, self.health, table, ids, grads)
        done = Stepped(commit.version, len(commit.ids), [(0, commit)])
        if rolled is not None:
            done.commits.append((0, rolled[0]))
            done.records.append(rolled[1])
        return done

    def rollback(self, table: str, reason: str) -> Stepped:
        rolled = roll_back(self.primary, table, reason)
        if rolled is None:
            return Stepped()
        return Stepped(rolled[0].version, len(rolled[0].ids), [(0, rolled[0])], [rolled[1]])

    def changed(self) -> dict[str, np.ndarray]:
        return changed_rows(self.primary)

    def mark_healthy(self) -> None:
        for name in self.primary.tables:
            self.primary.mark_healthy(name)

    def checkpoint(self) -> Any:
        raise EkkoError("checkpoint() needs cluster=: the in-process engine keeps no durable "
                        "log or snapshot (its tables are the compiled model's buffers)")


class LocalReplica:
    """An in-process `Replica` as a ports.ReplicaPort (always available)."""

    def __init__(self, replica: Replica, primary: Primary, health: HealthConfig,
                 geography: Geography | None = None):
        self.replica, self.primary, self.health = replica, primary, health
        self.index = replica.index
        self.geography = geography

    def available(self) -> bool:
        """Always, unless the engine has regions and it was marked down (replica_down)."""
        return self.geography is None or self.index not in self.geography.down

    def mark_down(self) -> None:
        pass  # an in-process call always answers

    def routed(self) -> None:
        pass

    def check(self, changed: dict[str, np.ndarray]) -> Callable[[], str | None]:
        return lambda: replica_problem(self.replica, changed, self.health, self.primary.pack)

    def settle_divergent(self) -> Callable[[], None]:
        def settle() -> None:
            self.replica.settle_divergent(self.primary.pack)
        return settle

    def holds(self, targets: list[dict[str, int]], dense: int, timeout: float | None) -> bool:
        """Its link's watermark is its own: once the link caught up, only divergence can fail
        (a replica down, or in a region cut off, is not waited for)."""
        if self.geography is not None and not self.geography.reachable(self.index):
            return True
        rows = self.replica.divergence()
        if rows:
            raise ReplicaDiverged(self.index, rows)
        return self.replica.dense is None or self.replica.dense.version >= dense

    def report(self, timeout: float | None) -> tuple[dict, Histogram, list[float]]:
        r = self.replica
        summary = r.stats.summary()
        summary["watermarks"] = r.watermarks()
        summary["divergent_rows"] = sum(map(len, r.divergence().values()))
        if r.region is not None:
            summary["region"] = r.region
        if r.dense is not None:
            summary["dense"] = r.dense.summary()
        return summary, r.stats.all_freshness(), list(r.stats.lookup_ms)

    def lookup(self, feature: str, ids: Any, offsets: Any = None, **kw: Any) -> Any:
        return self.replica.lookup(feature, ids, offsets, **kw)

    def predict(self, sparse: Any, x: Any) -> Any:
        return self.replica.predict(sparse, x)

    def held_dense(self) -> int:
        return -1 if self.replica.dense is None else self.replica.dense.version


class LocalTransport:
    """Everything in this process (a ports.Transport): see the module docstring."""

    wait_s = None  # flush and lookup wait as long as it takes unless told otherwise

    def __init__(self, engine: Any, replicas: int, history_rows: int, seed: int,
                 geo: Geo | None = None):
        model = engine.model
        previous = _take_over(model, engine)
        if previous is not None:  # before reading the tables: its steps must be over
            previous._retire(RETIRED)
        self.primary = Primary(model, history_rows=history_rows, seed=seed,
                               mark_lag=engine.health.mark_lag)
        snapshot = {n: (pt.buf.lookup_table, pt.buf.versions) for n, pt in self.primary.tables.items()}
        issued = {n: pt.version for n, pt in self.primary.tables.items()}
        self.replicas = [Replica(i, model, snapshot, issued, engine.dense)
                         for i in range(replicas)]
        if engine.dense_initial is not None:
            for r in self.replicas:
                r.install_dense(engine.dense_initial)
        configs: list[SchedulerConfig] = engine.configs
        # with regions: links over emulated WAN pipes, by topology (engine/regions.py)
        self.geography = None if geo is None else Geography(geo, self.primary, self.replicas)
        if self.geography is None:
            self.links = [Link(self.primary, r, c) for r, c in zip(self.replicas, configs)]
        else:
            self.links = self.geography.build_links(configs)
        self.shard_links = [self.links]
        self.primary_port = LocalPrimary(self.primary, engine.health)
        self.replica_ports = [LocalReplica(r, self.primary, engine.health, self.geography)
                              for r in self.replicas]

    def links_of(self, replica: int) -> list[Link]:
        if self.geography is not None:
            return [self.geography.links[replica]]
        return [self.links[replica]]

    def stop(self) -> None:
        if self.geography is not None:
            self.geography.stop()  # anti-entropy sends too
        return None  # the links are all that sends; they may start again

    def end(self) -> None:
        pass  # nothing outside this process

    def report(self, replicas: list[dict]) -> dict:
        return {} if self.geography is None else self.geography.report()


__all__ = ["LocalPrimary", "LocalReplica", "LocalTransport"]
