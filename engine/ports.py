"""The ports between the engine's logic and a transport (in process, or Ray).

`ekko.Engine` (engine/engine.py) holds the engine's logic once: input
checks, step -> links, the health-check cadence, check and rollback, flush,
lookup routing, stats. A transport supplies only how calls and bytes move:

* a `PrimaryPort`: apply a checked step (durably, on Ray), roll a table
  back, the rows changed since the healthy mark, mark healthy, checkpoint;
* one `ReplicaPort` per replica: check itself, settle divergent rows, say
  whether it holds a flush's targets, report its stats, serve lookups and
  predictions;
* the scheduler's links (`scheduler.Link` or a subclass sending another
  way), which read their primary through `LinkPrimary` and talk to their
  replica through `LinkReplica`.

A new engine feature is one method on the port(s) that move it and one
method on `Engine` (docs/architecture.md, "The engine core").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from ..kernels.errors import EkkoError

if TYPE_CHECKING:
    from .primary import Commit
    from .scheduler import Link
    from .state import Rollback
    from .stats import Histogram


class Unavailable(EkkoError):
    """A part did not answer (dead, restarting, or too slow): the engine routes around it."""


@dataclass
class Stepped:
    """What a primary answered for a step or a rollback of one table.

    `commits` are (shard, commit) in the order the links must hear them (a
    rollback's restored rows after the step that caused it); `records` are
    the rollbacks it made. `version` is the step's version (the highest
    among its shards); `rows` the distinct rows it committed.
    """

    version: int = 0
    rows: int = 0
    commits: list[tuple[int, Commit]] = field(default_factory=list)
    records: list[Rollback] = field(default_factory=list)


@runtime_checkable
class PrimaryPort(Protocol):
    """The primary (one, or shards) as the engine core drives it."""

    def issued(self) -> list[dict[str, int]]:
        """Per shard, each table's newest version when the engine started; the engine
        keeps this record current as it announces commits (flush waits for it)."""

    def step(self, table: str, ids: np.ndarray, grads: np.ndarray) -> Stepped:
        """Apply checked ids and grads; committed (and durable, where logged) on return.

        The on-commit health check runs where the rows are (state.apply_checked):
        a harmful update comes back with its rollback.
        """

    def rollback(self, table: str, reason: str) -> Stepped:
        """Restore `table`'s rows changed since its healthy mark, stamped as a new version."""

    def changed(self) -> dict[str, np.ndarray]:
        """Per table, the (global) ids changed since its healthy mark."""

    def mark_healthy(self) -> None:
        """Every table's current version is healthy (its undo log is dropped)."""

    def checkpoint(self) -> Any:
        """Make the current state durable (what is written is the transport's)."""


@runtime_checkable
class ReplicaPort(Protocol):
    """One serving replica as the engine core drives it. Calls that cannot reach
    the replica raise `Unavailable`; the core then marks it down and goes on."""

    index: int

    def available(self) -> bool:
        """Whether lookups and checks should go to it now."""

    def mark_down(self) -> None:
        """It failed to answer: route around it until it is back."""

    def routed(self) -> None:
        """A lookup went elsewhere because it was down (counted for stats)."""

    def check(self, changed: dict[str, np.ndarray]) -> Callable[[], str | None]:
        """Start its health check (state.replica_problem); the callable returns the
        reason it failed, or None. Started on every replica before any is awaited."""

    def settle_divergent(self) -> Callable[[], None]:
        """Start settling its divergent rows against the primary (after a rollback)."""

    def holds(self, targets: list[dict[str, int]], dense: int, timeout: float | None) -> bool:
        """Whether it holds every (shard, table) target version and dense snapshot `dense`
        (or a newer one; -1: none needed); raises ReplicaDiverged."""

    def report(self, timeout: float | None) -> tuple[dict, Histogram, list[float] | None]:
        """(stats summary, freshness histogram, raw lookup latencies when they are here)."""

    def lookup(self, feature: str, ids: Any, offsets: Any = None, **kw: Any) -> Any:
        """A pooled lookup served by this replica."""

    def predict(self, sparse: Any, x: Any) -> Any:
        """The dense module's output on this replica's rows (Replica.predict)."""

    def held_dense(self) -> int:
        """The version of the dense snapshot it runs (-1: none, or not known now)."""


@runtime_checkable
class LinkPrimary(Protocol):
    """What a scheduler link reads of its primary (or primary shard)."""

    def table_rows(self) -> dict[str, int]:
        """Each table's rows (on this shard)."""

    def norm_mean(self, table: str) -> float:
        """The table's running mean update norm (significance is measured against it)."""

    def row_bytes(self, table: str) -> int:
        """Bytes of one serving row (what a row costs the link's budget)."""

    def issued(self, table: str) -> int:
        """The newest version the table issued (a link numbers on from it)."""


@runtime_checkable
class LinkReplica(Protocol):
    """What a scheduler link tells its replica (or group of replicas)."""

    index: int | str

    def traffic(self) -> dict[str, int]:
        """Lookups per table (the priority policy's traffic term)."""

    def note_issued(self, table: str, version: int) -> None:
        """The newest version the primary issued (a packet claiming a later one is refused)."""

    def divergence(self) -> dict[str, dict[int, str]]:
        """Rows known here to differ from the primary's, per table (empty when not known here)."""

    def set_watermark(self, table: str, version: int) -> None:
        """Every version up to `version` of `table` was delivered."""


@runtime_checkable
class Transport(Protocol):
    """How an engine's parts are placed and reached: in process (engine/local.py) or on
    Ray (engine/cluster/transport.py). `primary`, `replicas` and `links` are what users
    hold as engine.primary, engine.replicas and engine.links."""

    primary: Any
    replicas: list
    links: list
    primary_port: PrimaryPort
    replica_ports: list[ReplicaPort]
    shard_links: list[list[Link]]  # per primary shard: the links its commits go to;
    # shard 0's links also carry the dense snapshots (every replica hears one of them)
    wait_s: float | None  # how long flush and lookup wait by default (None: no limit)

    def links_of(self, replica: int) -> list[Link]:
        """The links that send to replica `replica`."""

    def stop(self) -> str | None:
        """The links were stopped: stop what else sends (the engine stays readable);
        returns why the engine may not start again, or None when it may."""

    def end(self) -> None:
        """Release the processes and files the transport made (nothing in process)."""

    def report(self, replicas: list[dict]) -> dict:
        """Stats only this transport has (restarts, replays, ...), merged into stats();
        `replicas` are the replicas' summaries (ReplicaPort.report)."""


__all__ = ["LinkPrimary", "LinkReplica", "PrimaryPort", "ReplicaPort", "Stepped", "Transport",
           "Unavailable"]
