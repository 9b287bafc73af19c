"""A serving replica: serving copies, versions and sequence words, merged while serving.

Each table has its serving copy in the layout the compiler serves (f32,
f16, bf16, int8, int4), its per-row versions, a uint32 sequence word per
row (odd while the merge kernel writes the row), and a lock that admits one
writer at a time. Lookups never take that lock: the kernels keep readers
from seeing a torn row through the sequence words (see docs/engine.md).

A replica is driven by messages only: `merge(packet)`, `note_issued(table,
version)` (the newest version the primary issued, so a packet claiming a
later one is rejected), `set_watermark`, and read requests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..kernels.errors import EkkoError
from ..kernels.model import CompiledModel
from ..kernels.sync import SyncError, merge_kernel, pack_kernel, row_width, rows_dtype
from .dense import DenseSlot, DenseSnapshot
from .inputs import as_ids
from .packet import Packet, PacketError
from .sparse import check_bags
from .stats import ReplicaStats

# (table, sorted distinct ids) -> a packet of the primary's current rows of them, in that order
Fetch = Callable[[str, np.ndarray], Packet]


class ReplicaDiverged(EkkoError):
    """A replica holds rows the engine could not make equal to the primary's.

    `replica` is its index, `rows` maps each table to {id: why}.
    """

    def __init__(self, replica: int | str, rows: dict[str, dict[int, str]]):
        super().__init__(describe(replica, rows))
        self.replica, self.rows = replica, rows


def same_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row, whether two row arrays hold the same bytes (NaN equals itself, -0 is not 0)."""
    if not len(a):
        return np.zeros(0, bool)
    return (a.view(np.uint8).reshape(len(a), -1) == b.view(np.uint8).reshape(len(b), -1)).all(1)


def unequal(mine: tuple[np.ndarray, np.ndarray], primary: Packet, watermark: int) -> np.ndarray:
    """Per row, whether a replica's (rows, versions) hold what they must not.

    A replica may lag (hold an older version than the primary's current
    one) but never hold a version the primary has not reached for that row,
    or other bytes at the primary's version; and rows whose current version
    its watermark covers must be the primary's exactly. Read the watermark
    first, then the replica's rows, then the primary's, so that anything the
    replica holds legitimately is at most the primary's version.
    """
    rows, versions = mine
    same = (versions == primary.versions) & same_rows(rows, primary.rows)
    return ~same & ((versions >= primary.versions) | (primary.versions <= watermark))


def describe(index: int | str, divergence: dict[str, dict[int, str]], limit: int = 5) -> str:
    """One line naming a replica's divergent rows per table, and why (for errors and checks)."""
    parts = []
    for table, rows in sorted(divergence.items()):
        ids = sorted(rows)
        shown = ", ".join(map(str, ids[:limit])) + (f", ... ({len(ids)} rows)" if len(ids) > limit
                                                    else "")
        parts.append(f"table {table!r} rows {shown}: {rows[ids[0]]}")
    return f"replica {index} differs from the primary: " + "; ".join(parts)


@dataclass
class ReplicaTable:
    """One table on a replica."""

    name: str
    layout: str
    dim: int
    serving: np.ndarray
    versions: np.ndarray
    seq: np.ndarray
    lock: threading.Lock = field(default_factory=threading.Lock)
    issued: int = 0
    watermark: int = 0
    lookups: int = 0


class Replica:
    """See the module docstring. `snapshot` maps table -> (serving, versions) to start from."""

    def __init__(self, index: int, model: CompiledModel,
                 snapshot: dict[str, tuple[np.ndarray, np.ndarray]], issued: dict[str, int],
                 dense: Any = None):
        self.index = index
        self.region: str | None = None  # its region, when the engine has regions (regions.py)
        self.dense = None if dense is None else DenseSlot(dense)  # see engine/dense.py
        self.model = model
        self.stats = ReplicaStats()
        self.tables: dict[str, ReplicaTable] = {}
        for t in model.model.tables:
            spec = model.update_specs[t.name]
            serving, versions = snapshot[t.name]
            self.tables[t.name] = ReplicaTable(
                t.name, spec.serving or spec.table_dtype, t.dim, serving.copy(), versions.copy(),
                np.zeros(t.rows, np.uint32), issued=issued.get(t.name, 0))
        self._merge = {n: merge_kernel(rt.dim, rt.layout, seq=True) for n, rt in self.tables.items()}
        self._read = {n: pack_kernel(rt.dim, rt.layout, seq=True) for n, rt in self.tables.items()}
        self._features = {f.name: f.table for f in model.model.features}
        self.healthy = True
        self.divergent: dict[str, dict[int, str]] = {}  # table -> {id: why}, see settle()
        self._held: dict[str, int] = {}  # a divergent table's watermark when it diverged
        self._div_lock = threading.Lock()

    def table(self, name: str) -> ReplicaTable:
        try:
            return self.tables[name]
        except KeyError:
            raise EkkoError(f"replica {self.index} has no table {name!r}") from None

    # -- messages from the engine ----------------------------------------------
    def note_issued(self, table: str, version: int) -> None:
        rt = self.table(table)
        rt.issued = max(rt.issued, int(version))

    def set_watermark(self, table: str, version: int) -> None:
        """Every update of `table` up to `version` is visible here."""
        rt = self.table(table)
        rt.watermark = max(rt.watermark, int(version))

    def merge(self, packet: Packet | bytes) -> int:
        """Merge one packet (newest version wins per row); returns the rows written.

        A malformed packet (unknown table, wrong dim or layout, out-of-range
        id, mismatched lengths, non-finite rows, a version newer than the
        primary issued, damaged bytes) raises EkkoError, is counted, and
        leaves this replica byte-identical.
        """
        packet, rt = self._open(packet)
        try:
            with rt.lock:
                applied = self._merge[rt.name](rt.serving, rt.versions, packet.ids, packet.rows,
                                               packet.versions, rt.issued, seq=rt.seq)
        except EkkoError:
            self.stats.record_reject(len(packet))
            raise
        self._record(rt, packet, applied)
        return applied

    def deliver(self, packet: Packet | bytes, fetch: Fetch) -> int:
        """Merge a packet the engine sent, and make sure each of its rows landed.

        Unlike `merge`, one bad row does not cost the others: the rows the
        merge rejects are found (the packet is split until they are alone)
        and the rest is merged. Rows rejected, and valid rows not applied
        (not newer) while this replica holds something else than the packet,
        are settled against the primary's current rows (`settle`); what
        cannot be made equal is recorded as divergent. `fetch(table, ids)`
        packs the primary's current rows. Returns the rows written; a packet
        that does not decode or fit its table raises EkkoError (counted).
        """
        packet, rt = self._open(packet)
        with rt.lock:
            applied, rejected, reason = self._merge_rows(rt, packet, np.arange(len(packet)))
        if reason:  # refused at least once, even if the rows merged when split
            self.stats.record_reject(int(rejected.sum()))
        kept = np.flatnonzero(~rejected)
        self._record(rt, packet, applied, kept)
        doubt = packet.ids[rejected]
        with self._div_lock:
            divergent = list(self.divergent.get(rt.name) or ())
        # rows not written, or divergent before: the replica must hold exactly the packet's
        if applied < len(kept) or (divergent and np.isin(packet.ids[kept], divergent).any()):
            rows, versions = self._read[rt.name](rt.serving, rt.versions, packet.ids[kept],
                                                 seq=rt.seq)
            same = (versions == packet.versions[kept]) & same_rows(rows, packet.rows[kept])
            self._forget(rt.name, packet.ids[kept][same])
            doubt = np.concatenate([doubt, packet.ids[kept][~same]])
        if len(doubt):
            self.settle(rt.name, doubt, fetch, why=reason)
        return applied

    def settle(self, table: str, ids: np.ndarray, fetch: Fetch, why: str = "") -> np.ndarray:
        """Make rows `ids` equal to the primary's current rows; returns the ids still divergent.

        Under the table's write lock this replica's rows are read, then the
        primary's current ones are fetched (re-packed), so any version the
        replica holds legitimately is at most the primary's. A row behind is
        merged as usual; a row ahead of the primary, or with other bytes at
        the same version, is repaired: its version is forgotten (-1, which
        `rows` may report for an instant) and the primary's row merged in.
        A row the merge still rejects is recorded as divergent, with why.
        """
        rt = self.table(table)
        ids = np.unique(np.asarray(ids, np.int64))
        ids = ids[(ids >= 0) & (ids < len(rt.versions))]  # a garbled id names no row here
        if not len(ids):
            return ids
        with rt.lock:
            mine_rows, mine_versions = self._read[table](rt.serving, rt.versions, ids, seq=rt.seq)
            current = fetch(table, ids)
            rt.issued = max(rt.issued, int(current.newest))
            same = (mine_versions == current.versions) & same_rows(mine_rows, current.rows)
            ahead = unequal((mine_rows, mine_versions), current, -1)
            rt.versions[ids[ahead]] = -1
            todo = np.flatnonzero(~same)
            _, rejected_all, reason = self._merge_rows(rt, current, todo)
            rejected = rejected_all[todo]
            back = todo[rejected & ahead[todo]]
            rt.versions[ids[back]] = mine_versions[back]  # rejected: as it was
        self.stats.record_repair(int((ahead[todo] & ~rejected).sum()))
        bad = ids[todo[rejected]]
        self._forget(table, np.setdiff1d(ids, bad, assume_unique=True))
        if len(bad):
            self._mark(table, bad, "rejected again when re-packed from the primary"
                       + (f": {reason}" if reason else f" ({why})" if why else ""))
        return bad

    def settle_divergent(self, fetch: Fetch) -> dict[str, np.ndarray]:
        """Settle every divergent row again (after a rollback its value may merge)."""
        with self._div_lock:
            todo = {t: np.fromiter(rows, np.int64, len(rows)) for t, rows in self.divergent.items()
                    if rows}
        return {t: self.settle(t, ids, fetch) for t, ids in todo.items()}

    def divergence(self) -> dict[str, dict[int, str]]:
        """Rows this replica could not make equal to the primary's: table -> {id: why}."""
        with self._div_lock:
            return {t: dict(rows) for t, rows in self.divergent.items() if rows}

    def _mark(self, table: str, ids: np.ndarray, why: str) -> None:
        """These rows differ from the primary's: the table's watermark is held where it was."""
        with self._div_lock:
            if table not in self.divergent:
                self._held[table] = self.tables[table].watermark
            self.divergent.setdefault(table, {}).update(dict.fromkeys(ids.tolist(), why))

    def _forget(self, table: str, ids: np.ndarray) -> None:
        """These rows landed: no longer divergent."""
        with self._div_lock:
            rows = self.divergent.get(table)
            if rows:
                for i in ids.tolist():
                    rows.pop(i, None)
                if not rows:
                    del self.divergent[table]
                    del self._held[table]

    def _open(self, packet: Packet | bytes) -> tuple[Packet, ReplicaTable]:
        """Decode a packet and check it fits its table (counted as rejected if not)."""
        try:
            if not isinstance(packet, Packet):
                packet = Packet.from_bytes(packet)
            rt = self.table(packet.table)
            self._check_shape(rt, packet)
        except EkkoError:
            self.stats.record_reject(len(packet) if isinstance(packet, Packet) else 0)
            raise
        return packet, rt

    def _merge_rows(self, rt: ReplicaTable, p: Packet,
                    pos: np.ndarray) -> tuple[int, np.ndarray, str]:
        """Merge rows `pos` of `p` (under rt.lock), splitting around rows the kernel rejects.

        Returns (rows written, a mask over the packet of the rows rejected,
        the first rejection's message: "" when the kernel took every row at once).
        """
        rejected = np.zeros(len(p), bool)
        reasons: list[str] = []

        def merge(part: np.ndarray) -> int:
            try:
                return self._merge[rt.name](rt.serving, rt.versions, p.ids[part], p.rows[part],
                                            p.versions[part], rt.issued, seq=rt.seq)
            except SyncError as e:
                reasons.append(str(e))
                if len(part) == 1:
                    rejected[part] = True
                    return 0
                half = len(part) // 2
                return merge(part[:half]) + merge(part[half:])

        applied = merge(pos) if len(pos) else 0
        return applied, rejected, reasons[0] if reasons else ""

    def _record(self, rt: ReplicaTable, packet: Packet, applied: int,
                kept: np.ndarray | None = None) -> None:
        """Freshness of the rows merged; commit times in the future are counted, not measured."""
        visible = time.time_ns()
        commit = packet.commit_ns
        if commit is None:
            commit = np.zeros(0, np.int64)
        elif kept is not None:
            commit = commit[kept]
        future = commit > visible
        measured = commit[(commit > 0) & ~future]
        self.stats.record_merge(rt.name, (visible - measured) / 1e6, len(packet), packet.nbytes,
                                applied, int(future.sum()))

    @staticmethod
    def _check_shape(rt: ReplicaTable, packet: Packet) -> None:
        rows, width = packet.rows, row_width(rt.layout, rt.dim)
        want = np.dtype(rows_dtype(rt.layout))
        if rows.ndim != 2 or rows.shape[1] != width or rows.dtype != want:
            raise PacketError(
                f"table {rt.name!r} takes {rt.layout} rows of dim {rt.dim} ({want} x {width}), "
                f"got {rows.dtype} {rows.shape}")
        ids = packet.ids
        if ids.ndim != 1 or ids.dtype != np.int64:
            raise PacketError(f"packet ids must be a 1-D int64 array, got {ids.dtype} {ids.shape}")
        if packet.versions.dtype != np.int64 or packet.versions.shape != ids.shape \
                or rows.shape[0] != ids.shape[0]:
            raise PacketError(f"packet of {len(ids)} ids has {rows.shape[0]} rows and "
                              f"{packet.versions.shape[0] if packet.versions.ndim else 0} versions")
        if packet.commit_ns is not None and packet.commit_ns.shape != ids.shape:
            raise PacketError("packet commit times must have one entry per id")

    # -- reads ------------------------------------------------------------------
    def lookup(self, feature: str, ids: Any, offsets: Any = None, per_sample_weights: Any = None,
               out: Any = None, include_last_offset: bool | None = None) -> Any:
        """Serve one feature from this replica (pooled bags as f32), while merges go on."""
        table = self._features.get(feature)
        if table is None:
            raise EkkoError(f"no feature {feature!r} (features: {', '.join(self._features)})")
        rt = self.tables[table]
        kernel = self.model.lookup_kernels[feature]
        t0 = time.perf_counter()
        result = kernel(rt.serving, ids, offsets, per_sample_weights=per_sample_weights, out=out,
                        include_last_offset=include_last_offset, seq=rt.seq)
        self.stats.record_lookup((time.perf_counter() - t0) * 1e3)
        rt.lookups += len(ids)
        return result

    def install_dense(self, snapshot: DenseSnapshot | bytes) -> bool:
        """Swap in a newer dense snapshot (see DenseSlot.install); False if not newer."""
        return self._dense_slot().install(snapshot)

    def predict(self, sparse: Any, x: Any = None) -> Any:
        """What the dense module returns on this replica's pooled rows and `x`, without
        grad: every feature pooled from the serving copy (no torn rows), one snapshot."""
        slot = self._dense_slot()
        bags = check_bags(self.model, sparse)
        pooled = {b.feature: self.lookup(b.feature, b.ids, b.offsets, per_sample_weights=b.weights,
                                         include_last_offset=True if b.offsets is not None
                                         else None)
                  for b in bags}
        return slot.run(pooled, x)[1]

    def _dense_slot(self) -> DenseSlot:
        if self.dense is None:
            raise EkkoError(f"replica {self.index} has no dense module: give the engine one "
                            "(Engine(..., dense=module))")
        return self.dense

    def rows(self, table: str, ids: Any) -> tuple[np.ndarray, np.ndarray]:
        """(serving rows, versions) of `ids`, read under sequence words (never torn)."""
        rt = self.table(table)
        ids = as_ids(ids, len(rt.versions), error=EkkoError)
        return self._read[table](rt.serving, rt.versions, ids, seq=rt.seq)

    def serving(self, table: str) -> np.ndarray:
        """A read-only view of this replica's serving rows."""
        view = self.table(table).serving.view()
        view.flags.writeable = False
        return view

    def versions(self, table: str) -> np.ndarray:
        view = self.table(table).versions.view()
        view.flags.writeable = False
        return view

    def watermarks(self) -> dict[str, int]:
        """Per table, the newest version up to which every update is visible here (held
        back while rows of the table are divergent: those updates are not visible)."""
        with self._div_lock:
            held = dict(self._held)
        return {n: min(rt.watermark, held.get(n, rt.watermark)) for n, rt in self.tables.items()}

    def traffic(self) -> dict[str, int]:
        """Ids looked up per table so far (the scheduler's traffic share)."""
        return {n: rt.lookups for n, rt in self.tables.items()}


__all__ = ["Fetch", "Replica", "ReplicaDiverged", "ReplicaTable", "SyncError", "describe",
           "same_rows", "unequal"]
