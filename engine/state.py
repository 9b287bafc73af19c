"""The state manager: health checks, and rollback to the last healthy version.

Checks run at two places:

* on what arrives (every commit): an update whose largest row norm exceeds
  `outlier_factor` times the table's running mean norm (after `warmup`
  commits of that table) is harmful; its table is rolled back at once;
* on the replicas (`Engine.check()`, and every `check_every` commits): the
  rows changed since the last healthy mark must hold finite values on every
  replica, and the user's `score` hook (for example a probe batch's loss on
  a replica) must not fail: it returns True/False, or a number compared with
  `min_score`. The hook gets a `Replica`; on Ray (engine/cluster.py) it is
  pickled into every replica process and gets that process's `Replica`. A failed check rolls every table back; a passing one marks
  the current versions healthy.

A rollback restores, on the primary, the old values of every row changed
since the table's last healthy mark (the undo log keeps each changed row's
value once: the cost follows the rows changed, not the table size), stamps
them with a new version and sends them to the replicas ahead of everything
else. Each rollback is recorded: table, reason, the versions undone, rows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..kernels.quant import dequantize_rows
from .primary import Commit, Primary
from .replica import Fetch, describe, unequal


@dataclass(frozen=True)
class HealthConfig:
    """Health-check rules (see the module docstring)."""

    outlier_factor: float = 1000.0
    warmup: int = 10
    check_every: int = 0  # commits between automatic replica checks; 0: only Engine.check()
    score: Callable[[Any], bool | float] | None = None
    min_score: float | None = None


@dataclass
class Rollback:
    """What a rollback undid."""

    table: str
    reason: str
    undone_versions: tuple[int, int]
    rows: int
    seconds: float
    new_version: int
    at: float

    def as_dict(self) -> dict:
        return asdict(self)


class StateManager:
    """See the module docstring. `send` hands a rollback's commit to the links."""

    def __init__(self, primary: Primary, config: HealthConfig, send: Callable[[Commit], None],
                 locks: dict[str, Any] | None = None):
        self.primary, self.config, self.send = primary, config, send
        self.locks = locks or {n: threading.RLock() for n in primary.tables}
        self.rollbacks: list[Rollback] = []
        self.checks = 0
        self.failed_checks = 0
        self._commits = 0
        self._lock = threading.Lock()

    def on_commit(self, c: Commit) -> str | None:
        """Check one arriving update; returns the reason it is harmful, or None.

        A harmful update leaves the running mean as it was before it: one huge
        update must not raise the bar every later one is judged by.
        """
        pt = self.primary.tables[c.table]
        if len(c.norms) and pt.commits > self.config.warmup:
            worst = float(c.norms.max())
            mean = pt.norm_mean or 1.0
            if not np.isfinite(worst) or worst > self.config.outlier_factor * mean:
                pt.norm_mean = c.prior_norm_mean
                return (f"update norm {worst:.3g} is over {self.config.outlier_factor:g}x the "
                        f"table's running mean {mean:.3g} (version {c.version})")
        return None

    def due(self) -> bool:
        """Count a commit; True when an automatic replica check is due."""
        with self._lock:
            self._commits += 1
            return bool(self.config.check_every) and self._commits % self.config.check_every == 0

    def rollback(self, table: str, reason: str) -> Rollback | None:
        with self.locks[table]:  # restored rows are announced in version order
            start = time.perf_counter()
            commit = self.primary.rollback(table)
            if commit is None:
                return None
            record = Rollback(table, reason, commit.undone, len(commit.ids),  # type: ignore[attr-defined]
                              time.perf_counter() - start, commit.version, time.time())
            self.rollbacks.append(record)
            self.send(commit)
        return record

    def check(self, replicas: list) -> bool:
        """Check every replica; roll everything back on failure, else mark healthy.

        After a rollback each replica settles its divergent rows again: the
        restored values may merge where the rolled-back ones did not.
        """
        self.checks += 1
        reason = self._replica_problem(replicas)
        if reason is None:
            for name in self.primary.tables:
                self.primary.mark_healthy(name)
            return True
        self.failed_checks += 1
        for name in self.primary.tables:
            self.rollback(name, reason)
        for r in replicas:
            r.settle_divergent(self.primary.pack)
        return False

    def _replica_problem(self, replicas: list) -> str | None:
        changed = {name: _changed(pt) for name, pt in self.primary.tables.items()}
        for r in replicas:
            reason = replica_problem(r, changed, self.config, self.primary.pack)
            if reason is not None:
                return reason
        return None


def replica_problem(r: Any, changed: dict[str, np.ndarray], config: HealthConfig,
                    fetch: Fetch) -> str | None:
    """One replica's check: no divergent rows, the changed rows hold the primary's values
    (or an older version still on its way) and are finite, and the score hook passes.

    `r` is a `Replica` (in this process, or inside a replica process on Ray:
    the hook gets the same class either way); `changed` maps each table to the
    ids changed since its last healthy mark; `fetch` packs the primary's rows.
    """
    divergence = r.divergence()
    if divergence:
        return describe(r.index, divergence)
    for name, ids in changed.items():
        if not len(ids):
            continue
        ids = np.unique(ids)
        rt = r.tables[name]
        watermark = rt.watermark  # first: see unequal()
        rows, versions = r.rows(name, ids)
        bad = ids[unequal((rows, versions), fetch(name, ids), watermark)]
        if len(bad):
            return (f"replica {r.index}: table {name}: {len(bad)} rows differ from the primary "
                    f"(ids {', '.join(map(str, bad[:5].tolist()))}{', ...' if len(bad) > 5 else ''})")
        values = dequantize_rows(rows, rt.layout, rt.dim)
        if not np.isfinite(values).all():
            return f"replica {r.index}: table {name} holds non-finite values"
    if config.score is not None:
        score = config.score(r)
        if score is False or (config.min_score is not None and not isinstance(score, bool)
                              and not float(score) >= config.min_score):
            return f"replica {r.index}: score hook returned {score!r}"
    return None


def _changed(pt) -> np.ndarray:
    """Rows changed since the table's last healthy mark (from its undo log)."""
    if pt.undo is None or not pt.undo.chunks:
        return np.zeros(0, np.int64)
    return np.concatenate([c[0] for c in pt.undo.chunks])


__all__ = ["HealthConfig", "Rollback", "StateManager", "replica_problem"]
