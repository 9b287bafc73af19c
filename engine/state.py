"""Health checks, and rollback to the last healthy version (written once for both engines).

Checks run at two places:

* on what arrives (every commit): an update whose largest row norm exceeds
  `outlier_factor` times the table's running mean norm (after `warmup`
  commits of that table) is harmful; its table is rolled back at once;
* on the replicas (`Engine.check()`, and every `check_every` commits): the
  rows changed since the last healthy mark must hold finite values on every
  replica, and the user's `score` hook (for example a probe batch's loss on
  a replica) must not fail: it returns True/False, or a number compared with
  `min_score`. The hook gets a `Replica`; on Ray (engine/cluster/) it is
  pickled into every replica process and gets that process's `Replica`. A
  failed check rolls every table back; a passing one marks the current
  versions healthy.

The functions here run where the rows are: `apply_checked` and `roll_back`
on the in-process primary and on each primary shard, `replica_problem` on
each replica; the cadence and the decision (`Engine.check`) are the engine
core's (engine/engine.py).

A rollback restores, on the primary, the old values of every row changed
since the table's last healthy mark (the undo log keeps each changed row's
value once: the cost follows the rows changed, not the table size), stamps
them with a new version and sends them to the replicas ahead of everything
else. Each rollback is recorded: table, reason, the versions undone, rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..kernels.errors import EkkoError
from ..kernels.quant import dequantize_rows
from .primary import Commit, Primary
from .quality import QualityConfig
from .replica import Fetch, describe, unequal


@dataclass(frozen=True)
class HealthConfig:
    """Health-check rules (see the module docstring)."""

    outlier_factor: float = 1000.0
    warmup: int = 10
    check_every: int = 0  # commits between automatic replica checks; 0: only Engine.check()
    score: Callable[[Any], bool | float] | None = None
    min_score: float | None = None
    quality: QualityConfig | None = None  # judge replicas' predictions too (engine/quality.py)
    mark_lag: int = 1  # a rollback goes back to the mark this many passing checks ago


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


def on_commit(primary: Primary, config: HealthConfig, c: Commit) -> str | None:
    """Check one arriving update; returns the reason it is harmful, or None.

    A harmful update leaves the running mean as it was before it: one huge
    update must not raise the bar every later one is judged by.
    """
    pt = primary.tables[c.table]
    if len(c.norms) and pt.commits > config.warmup:
        worst = float(c.norms.max())
        mean = pt.norm_mean or 1.0
        if not np.isfinite(worst) or worst > config.outlier_factor * mean:
            pt.norm_mean = c.prior_norm_mean
            return (f"update norm {worst:.3g} is over {config.outlier_factor:g}x the "
                    f"table's running mean {mean:.3g} (version {c.version})")
    return None


def roll_back(primary: Primary, table: str, reason: str) -> tuple[Commit, Rollback] | None:
    """Roll `table` back to its healthy mark; (the restored rows' commit, its record), or
    None when nothing changed since the mark. The caller holds the table's step lock."""
    start = time.perf_counter()
    commit = primary.rollback(table)
    if commit is None:
        return None
    record = Rollback(table, reason, commit.undone, len(commit.ids),  # type: ignore[attr-defined]
                      time.perf_counter() - start, commit.version, time.time())
    return commit, record


def apply_checked(primary: Primary, config: HealthConfig, table: str, ids: np.ndarray,
                  grads: np.ndarray) -> tuple[Commit, tuple[Commit, Rollback] | None]:
    """One step and its on-commit check: (the commit, the rollback it caused or None).

    The same on the in-process primary and on a primary shard (where a
    replay of the log rolls back the same way: it is deterministic).
    """
    commit = primary.step(table, ids, grads)
    reason = on_commit(primary, config, commit)
    return commit, (None if reason is None else roll_back(primary, table, reason))


def changed_rows(primary: Primary) -> dict[str, np.ndarray]:
    """Per table, the rows changed since its last healthy mark (from its undo log)."""
    out = {}
    for name, pt in primary.tables.items():
        with pt.lock:
            chunks = [c[0] for c in pt.undo.chunks] if pt.undo is not None else []
        out[name] = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
    return out


def check_health_config(health: Any) -> HealthConfig:
    """`health` (None: the defaults) checked before anything starts."""
    health = HealthConfig() if health is None else health
    if not isinstance(health, HealthConfig):
        raise EkkoError(f"health must be a HealthConfig, got {type(health).__name__}")
    if not isinstance(health.check_every, int) or health.check_every < 0:
        raise EkkoError(f"check_every must be a non-negative integer, got {health.check_every!r}")
    if health.score is not None and not callable(health.score):
        raise EkkoError(f"the score hook must be callable, got {type(health.score).__name__}")
    if not isinstance(health.mark_lag, int) or isinstance(health.mark_lag, bool) \
            or not 1 <= health.mark_lag <= 64:
        raise EkkoError(f"mark_lag must be an integer from 1 to 64, got {health.mark_lag!r}")
    if health.quality is not None and not isinstance(health.quality, QualityConfig):
        raise EkkoError(f"quality must be a QualityConfig, got {type(health.quality).__name__}")
    return health


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


__all__ = ["HealthConfig", "Rollback", "apply_checked", "changed_rows", "check_health_config",
           "on_commit", "replica_problem", "roll_back"]
