"""upd-schedule: how a fused update walks its rows.

Splits the rows into `partitions` disjoint sets that threads apply
independently (ids are assigned by a hash, so no two partitions share a row:
no atomics, no races), picks the tile the embedding-dim loops are blocked by,
and, with `sort=true`, orders each partition's unique ids (a radix sort) so
rows are applied walking the table forward. Bags get the partition count.

Measured on the 2-core development machine (1M Zipf ids into 4M x 64 f32,
rowwise Adagrad + int8): sorting cost more than the locality it bought
(~42 vs ~33 ms: a 3 ms sort, and the summed rows and delta rows are then
read out of order while every row is prefetched anyway), so it is
off by default; a tile narrower than the dim split the vector loops (16 of
64: ~2x slower), so the tile is the whole row up to 512 values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import IntegerAttr, ModuleOp, UnitAttr, i64
from xdsl.passes import ModulePass

from ...dialects import emb, upd
from ..backend.targets import TARGETS, target
from ...dialects.limits import MAX_DIM, MAX_PARTITIONS

MAX_TILE = 512  # f32 values: a 2 KiB block of the row stays in L1 across the loops


def choose_tile(dim: int) -> int:
    """The whole row, or blocks of MAX_TILE values for very wide rows."""
    return dim if dim <= MAX_TILE else MAX_TILE // 2


def default_partitions() -> int:
    return max(1, min(os.cpu_count() or 1, 64))


@dataclass(frozen=True)
class UpdSchedulePass(ModulePass):
    name = "upd-schedule"

    partitions: int = 0  # 0: one per CPU core
    sort: bool = False
    tile: int = 0  # 0: chosen from the dim
    target: str = "llvm"  # a name in TARGETS: also its launch settings (Triton: block_rows, num_warps)

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be {' or '.join(TARGETS)}, got {self.target!r}")
        for option, value, most in (("partitions", self.partitions, MAX_PARTITIONS),
                                    ("tile", self.tile, MAX_DIM)):
            if not 0 <= value <= most:
                raise ValueError(f"upd-schedule: {option} must be 0 (chosen) to {most}, "
                                 f"got {value}")

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        parts = self.partitions or default_partitions()
        launch = target(self.target).launch
        for apply in op.walk():
            if isinstance(apply, upd.ApplyOp):
                table = apply.table.type
                assert isinstance(table, emb.TableType)
                tile = self.tile or choose_tile(table.dim.data)
                apply.partitions = IntegerAttr(parts, i64)
                apply.tile = IntegerAttr(min(tile, table.dim.data), i64)
                for setting, value in launch(table.dim.data).items():
                    setattr(apply, setting, IntegerAttr(value, i64))
                apply.sort = UnitAttr() if self.sort else None
            elif isinstance(apply, (emb.BagOp, emb.LookupOp)):
                apply.attributes["partitions"] = IntegerAttr(parts, i64)
