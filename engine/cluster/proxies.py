"""What users of the engine on Ray hold: engine.replicas[i] and engine.primary (copies)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from ...kernels.errors import EkkoError
from ..dense import dense_input
from ..inputs import as_array, as_ids
from ..packet import Packet
from ..ports import Unavailable
from ..replica import ReplicaDiverged
from ..sparse import check_bags
from ..stats import Histogram
from .plumbing import call

if TYPE_CHECKING:
    from .transport import RayTransport


class RemoteReplica:
    """engine.replicas[i]: one replica process; reads return copies. It is also the
    replica's ports.ReplicaPort: the engine core checks, settles and asks it through here."""

    def __init__(self, index: int, actor: Any, timeout: float, lookup_timeout: float,
                 model: Any):
        self.index, self.actor, self.model = index, actor, model
        rows = {t.name: t.rows for t in model.model.tables}
        self.timeout, self.lookup_timeout = timeout, lookup_timeout
        self._rows = rows
        self._probe: Any = None
        self.down_since: float | None = None
        self.routed_around = 0  # lookups the engine sent elsewhere: this replica was down
        self.region: str | None = None  # with regions= (engine/cluster/regions.py)
        self.geography: Any = None
        self._routed_lock = threading.Lock()

    @property
    def pid(self) -> int:
        """The process id of this replica (a new one after a restart)."""
        return call(self.actor.ping.remote(), self.timeout)[0]

    @property
    def node(self) -> str:
        return call(self.actor.info.remote(), self.timeout)["node"]

    def lookup(self, feature: str, ids: Any, offsets: Any = None, per_sample_weights: Any = None,
               out: Any = None, include_last_offset: bool | None = None) -> np.ndarray:
        ids, offsets, per_sample_weights = (
            None if x is None else as_array(x, name, EkkoError) for x, name in
            ((ids, "ids"), (offsets, "offsets"), (per_sample_weights, "per_sample_weights")))
        result = call(self.actor.lookup.remote(feature, ids, offsets, per_sample_weights,
                                               include_last_offset), self.lookup_timeout)
        if out is not None:
            np.copyto(out, result)
            return out
        return result

    def predict(self, sparse: Any, x: Any = None) -> Any:
        """The dense module's output computed in the replica process (checked here first,
        so bad input fails at once, without a call)."""
        bags = {b.feature: b.as_tuple() for b in check_bags(self.model, sparse)}
        return call(self.actor.predict.remote(bags, dense_input(x)), self.lookup_timeout)

    def held_dense(self) -> int:
        try:
            return call(self.actor.status.remote(), self.timeout)[2]
        except Unavailable:
            return -1

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
        """False while down; a background ping (answered once caught up) brings it back.
        With regions, also while the engine has it down (replica_down, or it failed)."""
        if self.geography is not None and self.index in self.geography.down:
            return False
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

    # -- the engine core's calls (ports.ReplicaPort) -----------------------------------------
    def check(self, changed: dict[str, np.ndarray]) -> Callable[[], str | None]:
        """Start the check in the replica process (the score hook runs there)."""
        ref = self.actor.check.remote(changed)
        return lambda: call(ref, self.timeout)

    def settle_divergent(self) -> Callable[[], None]:
        ref = self.actor.settle_divergent.remote()

        def settled() -> None:
            call(ref, self.timeout)
        return settled

    def holds(self, targets: list[dict[str, int]], dense: int, timeout: float | None) -> bool:
        """Whether it holds every (shard, table) target and dense snapshot `dense`; raises
        ReplicaDiverged when it cannot."""
        if self.geography is not None and not self.geography.reachable(self.index):
            return True  # down, or its region cut: flush does not wait for it
        left = self.timeout if timeout is None else timeout
        if left <= 0:
            return False
        try:
            wm, divergent, held = call(self.actor.status.remote(), min(left, self.timeout))
        except Unavailable:
            return False
        if divergent:
            raise ReplicaDiverged(self.index, divergent)
        return held >= dense and all(wm.get(t, {}).get(s, -1) >= v
                                     for s, tv in enumerate(targets) for t, v in tv.items())

    def report(self, timeout: float | None) -> tuple[dict, Histogram, None]:
        """Its process's stats and facts (pid, restarts, catch-ups); a restarting process
        answers once caught up. Lookup latencies stay there, summarized."""
        wait = self.timeout if timeout is None else timeout
        summary, hist = call(self.actor.stats.remote(), wait)
        info = call(self.actor.info.remote(), wait)
        summary["lookups_routed_around"] = self.routed_around
        if self.region is not None:
            summary["region"] = self.region
        summary.update({k: info.get(k) for k in ("pid", "node", "restarts", "catch_ups",
                                                  "restored_from_snapshot", "snapshot_damage",
                                                  "dense_damage",
                                                  "ready_seconds")})
        return summary, hist, None


class PrimaryShards:
    """engine.primary: the primary shards together (reads assemble copies)."""

    def __init__(self, engine: RayTransport):
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

