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
from xdsl.ir import Block, SSAValue
from xdsl.passes import ModulePass

from ...dialects import emb, upd
from .delta_chains import CHAIN_OPS, chain_of, retype


def _needs_dedup(op, deterministic: bool) -> bool:
    if isinstance(op, upd.SgdOp):
        # rounding to f16/bf16 after each duplicate is not rounding the sum
        table = op.operands[0].type
        low_precision = isinstance(table, emb.TableType) and table.layout.data != "f32"
        return deterministic or low_precision
    return isinstance(op, (upd.OptimizerOp, upd.ClipOp, upd.WeightDecayOp))


def sources_to_dedup(module: ModuleOp, deterministic: bool) -> list[SSAValue]:
    """Non-unique source deltas with a consumer that needs unique ids."""
    found: dict[int, SSAValue] = {}
    for op in module.walk():
        if not _needs_dedup(op, deterministic):
            continue
        delta = op.delta if isinstance(op, upd.OptimizerOp) else op.operands[0]
        chain = chain_of(delta)
        dtype = chain.source.type
        if isinstance(dtype, upd.DeltaType) and not dtype.is_unique and not chain.deduplicated:
            found.setdefault(id(chain.source), chain.source)
    return list(found.values())


def insert_dedup(source: SSAValue) -> None:
    """Route every user of `source` through one new `upd.dedup`."""
    dedup = upd.DedupOp.build_inferred([source])
    owner = source.owner
    if isinstance(owner, Block):
        if owner.first_op is None:
            owner.add_op(dedup)
        else:
            owner.insert_op_before(dedup, owner.first_op)
    else:
        block = owner.parent_block()
        assert block is not None
        block.insert_op_after(dedup, owner)
    source.replace_uses_with_if(dedup.results[0], lambda use: use.operation is not dedup)
    _retype_users(dedup.results[0])


def _retype_users(value: SSAValue) -> None:
    """Chain ops copy their input's delta type: refresh them downstream."""
    for use in list(value.uses):
        user = use.operation
        if isinstance(user, CHAIN_OPS) and use.index == 0:
            new = retype(user)
            _retype_users(new.results[0])


@dataclass(frozen=True)
class UpdDedupPass(ModulePass):
    name = "upd-dedup"

    deterministic: bool = False

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        for source in sources_to_dedup(op, self.deterministic):
            insert_dedup(source)
