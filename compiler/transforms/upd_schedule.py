"""upd-schedule: how a fused update walks its rows.

Sorts each partition's unique ids (neighbouring rows share pages and cache
lines), splits the rows into `partitions` disjoint sets that threads apply
independently (disjoint ids: no atomics, no races), and picks the tile of the
embedding dim the inner loop works on: a whole number of vector registers,
or the dim itself when it is narrower. Bags get the partition count too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import IntegerAttr, ModuleOp, UnitAttr, i64
from xdsl.passes import ModulePass

from ...dialects import emb, upd

VECTOR_LANES = 8  # f32 lanes of one AVX2 register; LLVM widens further if it can


def choose_tile(dim: int) -> int:
    """Two vector registers per step, or the dim rounded down to whole lanes."""
    if dim >= 2 * VECTOR_LANES:
        return 2 * VECTOR_LANES
    if dim >= VECTOR_LANES:
        return VECTOR_LANES
    return dim


def default_partitions() -> int:
    return max(1, min(os.cpu_count() or 1, 64))


@dataclass(frozen=True)
class UpdSchedulePass(ModulePass):
    name = "upd-schedule"

    partitions: int = 0  # 0: one per CPU core
    sort: bool = True
    tile: int = 0  # 0: chosen from the dim

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        parts = self.partitions or default_partitions()
        for apply in op.walk():
            if isinstance(apply, upd.ApplyOp):
                table = apply.operands[0].type
                assert isinstance(table, emb.TableType)
                tile = self.tile or choose_tile(table.dim.data)
                apply.attributes["partitions"] = IntegerAttr(parts, i64)
                apply.attributes["tile"] = IntegerAttr(min(tile, table.dim.data), i64)
                if self.sort:
                    apply.attributes["sort"] = UnitAttr()
                else:
                    apply.attributes.pop("sort", None)
            elif isinstance(apply, (emb.BagOp, emb.LookupOp)):
                apply.attributes["partitions"] = IntegerAttr(parts, i64)
