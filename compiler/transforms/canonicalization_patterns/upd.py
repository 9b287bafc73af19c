"""Canonicalization patterns of the `upd` dialect."""

from __future__ import annotations

from xdsl.pattern_rewriter import PatternRewriter, RewritePattern, op_type_rewrite_pattern

from ....dialects import upd


class RedundantDedup(RewritePattern):
    """dedup of a delta that is already unique is the delta itself."""

    @op_type_rewrite_pattern
    def match_and_rewrite(self, op: upd.DedupOp, rewriter: PatternRewriter) -> None:
        source = op.operands[0]
        if isinstance(source.type, upd.DeltaType) and source.type.is_unique:
            rewriter.replace(op, [], [source])
