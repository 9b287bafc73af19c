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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..kernels.errors import EkkoError
from ..kernels.model import CompiledModel
from ..kernels.sync import SyncError, merge_kernel, pack_kernel, row_width, rows_dtype
from .inputs import as_ids
from .packet import Packet, PacketError
from .stats import ReplicaStats


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
                 snapshot: dict[str, tuple[np.ndarray, np.ndarray]], issued: dict[str, int]):
        self.index = index
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
        try:
            if not isinstance(packet, Packet):
                packet = Packet.from_bytes(packet)
            rt = self.table(packet.table)
            self._check_shape(rt, packet)
            with rt.lock:
                applied = self._merge[rt.name](rt.serving, rt.versions, packet.ids, packet.rows,
                                               packet.versions, rt.issued, seq=rt.seq)
        except EkkoError:
            self.stats.record_reject()
            raise
        visible = time.time_ns()
        commit = packet.commit_ns
        measured = commit[commit > 0] if commit is not None else np.zeros(0, np.int64)
        self.stats.record_merge(rt.name, (visible - measured) / 1e6, len(packet), packet.nbytes,
                                applied)
        return applied

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
               out: Any = None) -> Any:
        """Serve one feature from this replica (pooled bags as f32), while merges go on."""
        table = self._features.get(feature)
        if table is None:
            raise EkkoError(f"no feature {feature!r} (features: {', '.join(self._features)})")
        rt = self.tables[table]
        kernel = self.model.lookup_kernels[feature]
        t0 = time.perf_counter()
        result = kernel(rt.serving, ids, offsets, per_sample_weights=per_sample_weights, out=out,
                        seq=rt.seq)
        self.stats.record_lookup((time.perf_counter() - t0) * 1e3)
        rt.lookups += len(ids)
        return result

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
        return {n: rt.watermark for n, rt in self.tables.items()}

    def traffic(self) -> dict[str, int]:
        """Ids looked up per table so far (the scheduler's traffic share)."""
        return {n: rt.lookups for n, rt in self.tables.items()}


__all__ = ["Replica", "ReplicaTable", "SyncError"]
