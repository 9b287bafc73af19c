"""upd-fuse: one `upd.apply` per update chain, so each row is touched once.

For every optimizer step it absorbs, backwards, the delta's dedup, clipping
and weight decay, and forwards the stochastic rounding of its result, the
re-quantization of a serving copy from it and the version stamp of the same
ids. Absorbed ops that lose their last user are erased; ops with other
users stay, since they are pure.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.context import Context
from xdsl.dialects.builtin import ModuleOp, UnitAttr
from xdsl.ir import Attribute, Operation, SSAValue
from xdsl.passes import ModulePass
from xdsl.pattern_rewriter import (
    PatternRewriter,
    PatternRewriteWalker,
    RewritePattern,
    op_type_rewrite_pattern,
)
from xdsl.rewriter import InsertPoint

from ...dialects import upd
from ...dialects.common import float_attr, get_float
from .delta_chains import Chain, chain_of, same_ids


@dataclass
class Fusion:
    """The pieces of one update chain around an optimizer op."""

    optimizer: upd.OptimizerOp
    chain: Chain
    rounding: upd.StochasticRoundOp | None = None
    requantize: upd.RequantizeOp | None = None
    stamp: upd.StampOp | None = None

    @property
    def new_table(self) -> SSAValue:
        return (self.rounding or self.optimizer).results[0]


def _only_user(value: SSAValue, kind: type[Operation]) -> Operation | None:
    users = [use.operation for use in value.uses if isinstance(use.operation, kind)]
    return users[0] if len(users) == 1 else None


def collect(op: upd.OptimizerOp) -> Fusion:
    """Find the ops that fuse with optimizer `op`."""
    fusion = Fusion(op, chain_of(op.delta))
    rounding = _only_user(op.results[0], upd.StochasticRoundOp)
    if isinstance(rounding, upd.StochasticRoundOp):
        fusion.rounding = rounding
    for use in fusion.new_table.uses:
        user = use.operation
        if (
            isinstance(user, upd.RequantizeOp)
            and use.index == 0
            and fusion.requantize is None
            and same_ids(user.operands[2], op.delta)
        ):
            fusion.requantize = user
    for use in fusion.chain.source.uses:
        user = use.operation
        if isinstance(user, upd.StampOp) and fusion.stamp is None and user.parent is op.parent:
            fusion.stamp = user
    if fusion.stamp is None:
        for chain_op in fusion.chain.ops:
            stamp = _only_user(chain_op.results[0], upd.StampOp)
            if isinstance(stamp, upd.StampOp):
                fusion.stamp = stamp
                break
    return fusion


def _attributes(f: Fusion) -> dict[str, Attribute]:
    spec = f.optimizer.spec
    attrs: dict[str, Attribute] = {"optimizer": upd.StringAttr(spec.name)}
    for name, value in spec.defaults().items():  # defaults, then what the op says over them
        if name != "lr":  # the op always names its learning rate
            attrs[name] = float_attr(value)
    for name, attr in f.optimizer.flat().items():
        attrs[name] = attr
    for chain_op in f.chain.ops:
        if isinstance(chain_op, upd.DedupOp):
            attrs["dedup"] = UnitAttr()
        elif isinstance(chain_op, upd.ClipOp):
            for name in ("max_norm", "clip_value"):
                if (value := get_float(chain_op, name)) is not None:
                    attrs[name] = float_attr(value)
        elif isinstance(chain_op, upd.WeightDecayOp):
            attrs["weight_decay"] = float_attr(get_float(chain_op, "decay") or 0.0)
    if f.rounding is not None:
        attrs["stochastic_rounding"] = UnitAttr()
    return attrs


def _operands(f: Fusion, attrs: dict[str, Attribute]) -> list[SSAValue]:
    op = f.optimizer
    states = list(op.operands[1 : 1 + len(op.spec.states)])
    operands = [op.operands[0], *states, f.chain.source]
    if f.requantize is not None:
        attrs["serving"] = UnitAttr()
        operands.append(f.requantize.operands[1])
    if f.stamp is not None:
        attrs["versions"] = UnitAttr()
        operands += [f.stamp.operands[0], f.stamp.operands[2]]
    if op.spec.uses_step:
        attrs["step"] = UnitAttr()
        operands.append(op.operands[-1])
    if f.rounding is not None:
        attrs["seed"] = UnitAttr()
        operands.append(f.rounding.operands[1])
    return operands


def fuse(f: Fusion, rewriter: PatternRewriter) -> upd.ApplyOp:
    """Replace the chain by one upd.apply placed after the last absorbed op."""
    attrs = _attributes(f)
    operands = _operands(f, attrs)
    apply = upd.ApplyOp.build_inferred(operands, attrs)
    anchor = max(
        [f.optimizer, f.rounding, f.requantize, f.stamp],
        key=lambda o: -1 if o is None else _position(o),
    )
    assert anchor is not None
    rewriter.insert(apply, InsertPoint.after(anchor))
    _replace_results(f, apply, rewriter)
    _erase_dead(f, rewriter)
    return apply


def _position(op: Operation) -> int:
    block = op.parent_block()
    assert block is not None
    return block.get_operation_index(op)


def _replace_results(f: Fusion, apply: upd.ApplyOp, rewriter: PatternRewriter) -> None:
    op = f.optimizer
    rewriter.replace_all_uses_with(f.new_table, apply.results[0])
    for i in range(len(op.spec.states)):
        rewriter.replace_all_uses_with(op.results[1 + i], apply.results[1 + i])
    if f.requantize is not None:
        rewriter.replace_all_uses_with(f.requantize.results[0], apply.result_role("serving"))
    if f.stamp is not None:
        rewriter.replace_all_uses_with(f.stamp.results[0], apply.result_role("versions"))


def _erase_dead(f: Fusion, rewriter: PatternRewriter) -> None:
    dead = [f.stamp, f.requantize, f.rounding, f.optimizer, *reversed(f.chain.ops)]
    for op in dead:
        if op is not None and op.parent is not None and all(not r.uses for r in op.results):
            rewriter.erase(op)


class FuseUpdateChain(RewritePattern):
    """An optimizer op and the chain around it become one upd.apply."""

    @op_type_rewrite_pattern
    def match_and_rewrite(self, op: upd.OptimizerOp, rewriter: PatternRewriter) -> None:
        fuse(collect(op), rewriter)


@dataclass(frozen=True)
class UpdFusePass(ModulePass):
    name = "upd-fuse"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        PatternRewriteWalker(FuseUpdateChain(), apply_recursively=False).rewrite_module(op)
