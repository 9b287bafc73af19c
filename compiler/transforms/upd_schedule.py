"""upd-schedule: how a fused update walks its rows.

Splits the rows into `partitions` disjoint sets that threads apply
independently (ids are assigned by a hash, so no two partitions share a row:
no atomics, no races), picks the tile the embedding-dim loops are blocked by,
and the `order` a deduplicated update walks its rows in
(`catalog.APPLY_ORDERS`): "input", the delta's own order, a repeated id's
rows summed in a scratch row and applied at its last; "bucket", grouped by
unique id one range of rows at a time; "id", grouped and radix-sorted by id.
Bags get the partition count.

Measured on the 2-core development machine (1M ids, rowwise Adagrad, one
thread; docs/backends.md has the figures): "input" is the fastest on skewed
and on uniform ids, because the gradient rows, the largest stream, are read
forward and not gathered; sorting cost more than the locality it bought. A
tile narrower than the dim split the vector loops (16 of 64: ~2x slower), so
the tile is the whole row up to 512 values. On the LLVM target the launch
settings hold `prefetch`, how many positions ahead the walk asks for a row:
measured on this host by `ekko tune` when it was run (compiler/backend/tuning),
else a rule of the row's size.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import IntegerAttr, ModuleOp, StringAttr, i64
from xdsl.ir import Attribute, Operation
from xdsl.passes import ModulePass
from xdsl.pattern_rewriter import (
    GreedyRewritePatternApplier,
    PatternRewriter,
    PatternRewriteWalker,
    RewritePattern,
    op_type_rewrite_pattern,
)

from ...dialects import catalog, emb, upd
from ..backend.targets import TARGETS, target
from ...dialects.limits import MAX_DIM, MAX_PARTITIONS, MAX_PREFETCH

MAX_TILE = 512  # f32 values: a 2 KiB block of the row stays in L1 across the loops


def choose_tile(dim: int) -> int:
    """The whole row, or blocks of MAX_TILE values for very wide rows."""
    return dim if dim <= MAX_TILE else MAX_TILE // 2


def default_partitions() -> int:
    return max(1, min(os.cpu_count() or 1, 64))


@dataclass
class ScheduleApply(RewritePattern):
    """Sets an upd.apply's schedule properties (a no-op once they are set)."""

    partitions: int
    order: str
    tile: int  # 0: chosen from the dim
    launch: Callable[[int], dict[str, int]]  # the target's launch settings for a dim
    prefetch: int = 0  # 0: the target's choice

    @op_type_rewrite_pattern
    def match_and_rewrite(self, op: upd.ApplyOp, rewriter: PatternRewriter) -> None:
        table = op.table.type
        assert isinstance(table, emb.TableType)
        dim = table.dim.data
        want: dict[str, Attribute | None] = {
            "partitions": IntegerAttr(self.partitions, i64),
            "tile": IntegerAttr(min(self.tile or choose_tile(dim), dim), i64),
            # how the dedup walks its rows: an update without dedup has one way
            "order": StringAttr(self.order) if op.dedup is not None else None,
        }
        launch = self.launch(dim)
        if self.prefetch:
            launch["prefetch"] = self.prefetch
        want |= {name: IntegerAttr(value, i64) for name, value in launch.items()}
        _set_properties(op, want, rewriter)


@dataclass
class PartitionLookups(RewritePattern):
    """Gives emb.bag and emb.lookup the partition count (their `partitions` property)."""

    partitions: int

    def match_and_rewrite(self, op: Operation, rewriter: PatternRewriter) -> None:
        if isinstance(op, (emb.BagOp, emb.LookupOp)):
            _set_properties(op, {"partitions": IntegerAttr(self.partitions, i64)}, rewriter)


def _set_properties(op: Operation, want: dict[str, Attribute | None],
                    rewriter: PatternRewriter) -> None:
    """Set (or, for None, drop) properties of `op`, telling the rewriter only when
    something changed, so the walk reaches a fixed point."""
    changed = {k: v for k, v in want.items() if op.properties.get(k) != v}
    if not changed:
        return
    for name, value in changed.items():
        if value is None:
            del op.properties[name]
        else:
            op.properties[name] = value
    rewriter.notify_op_modified(op)


@dataclass(frozen=True)
class UpdSchedulePass(ModulePass):
    name = "upd-schedule"

    partitions: int = 0  # 0: one per CPU core
    order: str = "input"  # one of catalog.APPLY_ORDERS
    tile: int = 0  # 0: chosen from the dim
    prefetch: int = 0  # CPU targets; 0: measured on this host (`ekko tune`), else from the dim
    target: str = "llvm"  # a name in TARGETS: also its launch settings (Triton: block_rows, num_warps)

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be {' or '.join(TARGETS)}, got {self.target!r}")
        if self.order not in catalog.APPLY_ORDERS:
            raise ValueError(f"upd-schedule: order must be {' or '.join(catalog.APPLY_ORDERS)}, "
                             f"got {self.order!r}")
        for option, value, most in (("partitions", self.partitions, MAX_PARTITIONS),
                                    ("tile", self.tile, MAX_DIM),
                                    ("prefetch", self.prefetch, MAX_PREFETCH)):
            if not 0 <= value <= most:
                raise ValueError(f"upd-schedule: {option} must be 0 (chosen) to {most}, "
                                 f"got {value}")
        if self.prefetch and "prefetch" not in target(self.target).launch(1):
            raise ValueError(f"upd-schedule: prefetch is a CPU setting; target {self.target} "
                             "has none")

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        parts = self.partitions or default_partitions()
        PatternRewriteWalker(GreedyRewritePatternApplier([
            ScheduleApply(parts, self.order, self.tile, target(self.target).launch,
                          self.prefetch),
            PartitionLookups(parts),
        ], dce_enabled=False), apply_recursively=False).rewrite_module(op)  # schedules only: erases nothing
