"""upd-dedup: sum duplicate ids before anything that is not linear in them.

A delta's duplicates mean "summed", so applying its rows one by one is right
only for plain SGD on an f32 table. Every other optimizer, norm or value clipping and weight
decay need each id once: this pass inserts one `upd.dedup` right after each
source delta that reaches such an op. With `deterministic=true`, SGD deltas
are deduplicated too, so the float summation order is fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Block, Operation, SSAValue
from xdsl.passes import ModulePass
from xdsl.pattern_rewriter import PatternRewriter, PatternRewriteWalker, RewritePattern
from xdsl.rewriter import InsertPoint

from ...dialects import emb, upd
from .delta_chains import CHAIN_OPS, chain_of


def _needs_dedup(op, deterministic: bool) -> bool:
    if isinstance(op, upd.SgdOp):
        # rounding to f16/bf16 after each duplicate is not rounding the sum
        table = op.operands[0].type
        low_precision = isinstance(table, emb.TableType) and table.layout.data != "f32"
        return deterministic or low_precision
    return isinstance(op, (upd.OptimizerOp, upd.ClipOp, upd.WeightDecayOp))


class InsertDedup(RewritePattern):
    """At an op that needs unique ids, dedup its delta's source once.

    The `upd.dedup` goes right after the source and every user of the source
    reads through it, so all consumers of one delta share the summed rows.
    """

    def __init__(self, deterministic: bool):
        self.deterministic = deterministic

    def match_and_rewrite(self, op: Operation, rewriter: PatternRewriter) -> None:
        if not _needs_dedup(op, self.deterministic):
            return
        delta = op.delta if isinstance(op, upd.OptimizerOp) else op.operands[0]
        chain = chain_of(delta)
        dtype = chain.source.type
        if not isinstance(dtype, upd.DeltaType) or dtype.is_unique or chain.deduplicated:
            return
        source = chain.source
        dedup = upd.DedupOp.build_inferred([source])
        owner = source.owner
        if isinstance(owner, Block):
            rewriter.insert(dedup, InsertPoint.at_start(owner))
        else:
            rewriter.insert(dedup, InsertPoint.after(owner))
        rewriter.replace_uses_with_if(source, dedup.results[0],
                                      lambda use: use.operation is not dedup)
        _retype_users(dedup.results[0], rewriter)


def _retype_users(value: SSAValue, rewriter: PatternRewriter) -> None:
    """Chain ops copy their input's delta type: refresh them downstream."""
    for use in list(value.uses):
        user = use.operation
        if isinstance(user, CHAIN_OPS) and use.index == 0:
            new = type(user).build_inferred(list(user.operands), user.flat())
            rewriter.replace(user, new)
            _retype_users(new.results[0], rewriter)


@dataclass(frozen=True)
class UpdDedupPass(ModulePass):
    name = "upd-dedup"

    deterministic: bool = False

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        PatternRewriteWalker(InsertDedup(self.deterministic), apply_recursively=False
                             ).rewrite_module(op)
