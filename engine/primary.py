"""The primary: the trainer side of the engine.

It owns the f32 master tables, their optimizer state, serving copies and
per-row versions (a `CompiledModel`'s buffers), runs the compiled fused
update kernels, and answers three questions by message:

* `step(table, ids, grads)`: apply a delta; returns a `Commit` (the new
  version, the distinct ids, their update norms, the commit time);
* `pack(table, ids)`: a `Packet` of those rows' current serving values and
  versions (the compiled `kern.pack`);
* `changed_since(table, version)`: the ids changed after `version`, from the
  model-update cache, without scanning the table (None when that history
  was already dropped: the caller then copies the table).

Each table has its own lock and version counter, so two tables update and
pack at the same time. For rollback the primary keeps, per table, the old
values of the rows changed since the last healthy mark (the undo log): a
rollback costs the rows changed since then, never a table copy.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..kernels.errors import EkkoError, NonFiniteOutputError
from ..kernels.model import CompiledModel, TableBuffers
from ..kernels.sync import pack_kernel, row_width
from .inputs import Gathered, check_delta
from .packet import Packet


@dataclass
class Commit:
    """One committed step: what the scheduler and the health checks need."""

    table: str
    version: int
    ids: np.ndarray  # distinct ids, sorted
    norms: np.ndarray  # L2 norm of each id's summed gradient row
    commit_ns: int
    rollback: bool = False
    prior_norm_mean: float = 0.0  # the table's running mean norm before this commit


class UpdateCache:
    """Which rows changed at which version: (version, ids) entries, newest last.

    Bounded by `max_rows` ids in all; the oldest entries are dropped first and
    `floor` remembers the newest version no longer covered.
    """

    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self.entries: deque[tuple[int, np.ndarray]] = deque()
        self.versions: deque[int] = deque()
        self.rows = 0
        self.floor = 0

    def record(self, version: int, ids: np.ndarray) -> None:
        self.entries.append((version, ids))
        self.versions.append(version)
        self.rows += len(ids)
        while self.rows > self.max_rows and len(self.entries) > 1:
            v, old = self.entries.popleft()
            self.versions.popleft()
            self.rows -= len(old)
            self.floor = v

    def changed_since(self, version: int) -> np.ndarray | None:
        """Distinct ids changed by versions > `version`; None if that history is gone."""
        if version < self.floor:
            return None
        start = bisect.bisect_right(self.versions, version)
        parts = [self.entries[i][1] for i in range(start, len(self.entries))]
        if not parts:
            return np.zeros(0, np.int64)
        return np.unique(np.concatenate(parts))


def squared_norms(grads: np.ndarray) -> np.ndarray:
    """Each row's squared L2 norm, f64. Summed in f32 (an f64 einsum of f32 rows casts
    every element: it was 40% of an SGD step); rows whose f32 sum overflowed (finite
    gradients near f32's limit) are summed again in f64, so their norms stay finite."""
    sq = np.einsum("ij,ij->i", grads, grads).astype(np.float64)
    big = ~np.isfinite(sq)
    if big.any():
        sq[big] = np.einsum("ij,ij->i", grads[big], grads[big], dtype=np.float64)
    return sq


def delta_squared_norms(grads: np.ndarray | Gathered) -> np.ndarray:
    """Each delta row's squared L2 norm (f64); a gathered delta's from its few rows."""
    if not isinstance(grads, Gathered):
        return squared_norms(grads)
    sq = squared_norms(grads.rows)[grads.index]
    return sq if grads.scale is None else sq * np.square(grads.scale.astype(np.float64))


class DistinctRows:
    """A step's distinct ids, ascending, and the L2 norm of each one's gradient rows
    together (the update's significance per row).

    A delta that is not tiny against its table is deduplicated by marking rows
    in arrays the table keeps (9 bytes a row, made at its first such step)
    rather than by sorting: np.unique was a quarter of an SGD step's
    bookkeeping, and fresh table-sized arrays cost their page faults every
    step. Both ways sum each row's squares in delta order: the same bits.
    Not thread-safe: the caller holds the table's lock.
    """

    def __init__(self, rows: int):
        self.rows = rows
        self.seen: np.ndarray | None = None
        self.slot: np.ndarray | None = None

    def __call__(self, ids: np.ndarray, sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not len(ids):
            return ids[:0], np.zeros(0)
        if self.rows > 64 * len(ids):
            uniq, inverse = np.unique(ids, return_inverse=True)
        else:
            if self.seen is None:
                self.seen = np.zeros(self.rows, bool)
                self.slot = np.zeros(self.rows, np.int64)
            self.seen[ids] = True
            uniq = np.flatnonzero(self.seen)
            self.seen[uniq] = False
            self.slot[uniq] = np.arange(len(uniq))
            inverse = self.slot[ids]
        return uniq, np.sqrt(np.bincount(inverse, weights=sq, minlength=len(uniq)))


def _delta_args(kernel: Any, grads: np.ndarray | Gathered) -> dict[str, Any]:
    """A delta as the kernel takes it: a gathered one by reference where the kernel
    reads it so (`gathers`: the LLVM kernels), else its rows made here."""
    if not isinstance(grads, Gathered):
        return {"grads": grads}
    if getattr(kernel, "gathers", False):
        return {"grads": grads.rows, "grad_index": grads.index, "grad_scale": grads.scale}
    return {"grads": grads.expand()}


class UndoLog:
    """Old values of the rows changed since each of the last `keep` healthy marks.

    One epoch per mark, each row saved once per epoch (the cost follows the
    rows changed, not the table). A rollback writes the epochs back newest
    first, so the rows end at their values at the oldest mark kept: with
    keep > 1 a rollback goes back past marks that checks passed while a slow
    harm (a poisoned burst) was not yet visible.
    """

    def __init__(self, rows: int, keep: int = 1):
        self.keep = keep
        self.saved = np.zeros(rows, bool)  # saved in the current epoch
        self.epochs: list[list[tuple[np.ndarray, list[np.ndarray]]]] = [[]]
        self.starts: list[int] = [0]  # the version at each epoch's mark
        self.rows = 0

    @property
    def chunks(self) -> list[tuple[np.ndarray, list[np.ndarray]]]:
        """Every saved chunk, oldest epoch first."""
        return [c for e in self.epochs for c in e]

    def save(self, ids: np.ndarray, arrays: list[np.ndarray]) -> np.ndarray:
        """Keep the current values of the ids not saved in this epoch; returns those ids."""
        new = ids[~self.saved[ids]]
        if len(new):
            self.saved[new] = True
            self.epochs[-1].append((new, [np.take(a, new, axis=0) for a in arrays]))  # a copy
            self.rows += len(new)
        return new

    def forget(self, ids: np.ndarray) -> None:
        """Drop the last chunk again (its update was rejected before writing)."""
        current = self.epochs[-1]
        if len(ids) and current and current[-1][0] is ids:
            current.pop()
            self.saved[ids] = False
            self.rows -= len(ids)

    def mark(self, version: int) -> None:
        """A healthy mark at `version`: a new epoch; the oldest beyond `keep` is dropped."""
        for chunk_ids, _ in self.epochs[-1]:
            self.saved[chunk_ids] = False
        self.epochs.append([])
        self.starts.append(version)
        while len(self.epochs) > self.keep:
            self.rows -= sum(len(c[0]) for c in self.epochs.pop(0))
            self.starts.pop(0)

    def restore(self, arrays: list[np.ndarray]) -> np.ndarray:
        """Write every saved value back, newest epoch first; returns the restored ids
        and leaves one empty epoch."""
        ids = [c[0] for c in self.chunks]
        for epoch in reversed(self.epochs):
            for chunk_ids, olds in epoch:
                for a, old in zip(arrays, olds):
                    a[chunk_ids] = old
        self.clear()
        return np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)

    def clear(self, version: int | None = None) -> None:
        """Forget everything: one empty epoch (marked at `version`, if given)."""
        for chunk_ids, _ in self.epochs[-1]:
            self.saved[chunk_ids] = False
        self.epochs = [[]]
        self.starts = [self.starts[-1] if version is None else version]
        self.rows = 0


@dataclass
class PrimaryTable:
    """One table on the primary: buffers, lock, version counter, cache, undo log."""

    name: str
    buf: TableBuffers
    layout: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    version: int = 0
    healthy_version: int = 0
    norm_mean: float = 0.0
    commits: int = 0
    cache: UpdateCache | None = None
    undo: UndoLog | None = None
    distinct: DistinctRows | None = None

    def arrays(self) -> list[np.ndarray]:
        """Every per-row array a step writes, in one list (for snapshots)."""
        return [*self.undo_arrays(), self.buf.versions]

    def undo_arrays(self) -> list[np.ndarray]:
        """What the undo log saves: not the versions, which a rollback stamps anew."""
        b = self.buf
        state = list(b.state) if isinstance(b.state, tuple) else ([] if b.state is None else [b.state])
        serving = [b.serving] if b.serving is not None else []
        return [b.master, *state, *serving]


class Primary:
    """See the module docstring."""

    def __init__(self, model: CompiledModel, history_rows: int = 1 << 24,
                 undo: bool = True, seed: int = 0, mark_lag: int = 1):
        if not model.tables:
            model.materialize(seed=seed)
        self.model = model
        self.tables: dict[str, PrimaryTable] = {}
        for t in model.model.tables:
            spec = model.update_specs[t.name]
            pt = PrimaryTable(t.name, model.tables[t.name], spec.serving or spec.table_dtype)
            pt.cache = UpdateCache(history_rows)
            pt.distinct = DistinctRows(t.rows)
            pt.undo = UndoLog(t.rows, mark_lag) if undo else None
            self._continue_versions(pt)
            if pt.undo is not None:
                pt.undo.clear(pt.version)
            self.tables[t.name] = pt
        self._pack = {name: pack_kernel(pt.buf.table.dim, pt.layout) for name, pt in self.tables.items()}

    @staticmethod
    def _continue_versions(pt: PrimaryTable) -> None:
        """Number on from the newest version the table's rows carry.

        A model an engine already updated carries that engine's versions; a
        new engine on it starting again at 1 would stamp rows older than the
        ones its replicas copied, and newest-version-wins would drop them.
        """
        versions = pt.buf.versions
        pt.version = pt.healthy_version = int(versions.max()) if len(versions) else 0
        pt.cache.floor = pt.version  # what changed before is not known here

    def table(self, name: str) -> PrimaryTable:
        try:
            return self.tables[name]
        except KeyError:
            raise EkkoError(f"no table {name!r} (tables: {', '.join(self.tables)})") from None

    # -- messages -----------------------------------------------------------
    def step(self, table: str, ids: Any, grads: Any) -> Commit:
        """Apply one delta with the table's fused kernel; returns once committed."""
        pt = self.table(table)
        ids, grads = check_delta(ids, grads, pt.buf.table.rows, pt.buf.table.dim)
        sq = delta_squared_norms(grads)
        with pt.lock:
            uniq, norms = pt.distinct(ids, sq)
            saved = pt.undo.save(uniq, pt.undo_arrays()) if pt.undo is not None else uniq[:0]
            version = pt.version + 1
            buf = pt.buf
            try:
                kernel = self.model.update_kernels[table]
                kernel(buf.master, ids, **_delta_args(kernel, grads), state=buf.state,
                       serving=buf.serving, versions=buf.versions, step=buf.step + 1,
                       version=version)
            except EkkoError as e:
                if pt.undo is not None:
                    pt.undo.forget(saved)
                if isinstance(e, NonFiniteOutputError):
                    raise e.in_table(table) from None
                raise
            buf.step += 1
            pt.version = version
            commit_ns = time.time_ns()
            pt.cache.record(version, uniq)
            pt.commits += 1
            prior = pt.norm_mean
            mean = float(norms.mean()) if len(norms) else float("nan")
            if np.isfinite(mean):  # one non-finite update must not blind the outlier check
                pt.norm_mean = mean if pt.commits == 1 else 0.95 * pt.norm_mean + 0.05 * mean
        return Commit(table, version, uniq, norms, commit_ns, prior_norm_mean=prior)

    def pack(self, table: str, ids: np.ndarray) -> Packet:
        """The current serving rows and versions of `ids` (distinct) as a packet."""
        pt = self.table(table)
        with pt.lock:
            serving = pt.buf.lookup_table
            rows, versions = self._pack[table](serving, pt.buf.versions, ids)
            newest = pt.version
        return Packet(table, ids, rows, versions, newest=newest)

    def changed_since(self, table: str, version: int) -> np.ndarray | None:
        pt = self.table(table)
        with pt.lock:
            return pt.cache.changed_since(version)

    def issued(self, table: str) -> int:
        """The newest version this table has issued (replicas reject anything later)."""
        return self.table(table).version

    def serving(self, table: str) -> np.ndarray:
        """A read-only view of the primary's serving copy (the master when there is none)."""
        view = self.table(table).buf.lookup_table.view()
        view.flags.writeable = False
        return view

    def versions(self, table: str) -> np.ndarray:
        view = self.table(table).buf.versions.view()
        view.flags.writeable = False
        return view

    def layout(self, table: str) -> tuple[str, int]:
        pt = self.table(table)
        return pt.layout, pt.buf.table.dim

    def table_rows(self) -> dict[str, int]:
        """Each table's rows (what a scheduler link sizes its pending sets by)."""
        return {n: pt.buf.table.rows for n, pt in self.tables.items()}

    def norm_mean(self, table: str) -> float:
        """The table's running mean update norm (significance is measured against it)."""
        return self.table(table).norm_mean

    def row_bytes(self, table: str) -> int:
        layout, dim = self.layout(table)
        return row_width(layout, dim) * np.dtype(self.serving(table).dtype).itemsize

    # -- health ---------------------------------------------------------------
    def mark_healthy(self, table: str) -> int:
        """The current version is healthy: a rollback goes back no further than the
        `mark_lag`-th most recent mark (old values from before it are forgotten)."""
        pt = self.table(table)
        with pt.lock:
            if pt.undo is not None:  # a mark even if nothing changed: the engine's
                pt.undo.mark(pt.version)  # dense and quality marks count every check too
                pt.healthy_version = pt.undo.starts[0]
            else:
                pt.healthy_version = pt.version
            return pt.version

    def mark_all_healthy(self, table: str) -> int:
        """The current version is healthy and no rollback may go behind it (a snapshot)."""
        pt = self.table(table)
        with pt.lock:
            if pt.undo is not None:
                pt.undo.clear(pt.version)
            pt.healthy_version = pt.version
            return pt.version

    def rollback(self, table: str) -> Commit | None:
        """Restore the rows changed since the last healthy mark; stamp them as a new version.

        Replicas receive the restored values like any update (newest version
        wins), so a rollback never needs an older version to beat a newer one.
        Returns the commit of the restored rows (None: nothing to undo).
        """
        pt = self.table(table)
        with pt.lock:
            if pt.undo is None or not pt.undo.chunks:
                return None
            undone = (pt.healthy_version + 1, pt.version)
            ids = np.sort(pt.undo.restore(pt.undo_arrays()))
            pt.version += 1
            pt.buf.versions[ids] = pt.version
            pt.cache.record(pt.version, ids)
            pt.healthy_version = pt.version
            pt.undo.clear(pt.version)
            commit = Commit(table, pt.version, ids, np.full(len(ids), np.inf, np.float32),
                            time.time_ns(), rollback=True)
            commit.undone = undone  # type: ignore[attr-defined]
            return commit


__all__ = ["Commit", "Primary", "PrimaryTable", "UndoLog", "UpdateCache"]
