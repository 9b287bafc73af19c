"""Walking delta chains: the shared vocabulary of the update passes.

A delta chain runs from a source (an `upd.delta` result or a function
argument) through `upd.dedup`, `upd.clip` and `upd.weight_decay` to the
ops that consume it. Passes ask where a delta came from and what was done
to it on the way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xdsl.ir import Operation, SSAValue

from ...dialects import upd

CHAIN_OPS = (upd.DedupOp, upd.ClipOp, upd.WeightDecayOp)


@dataclass
class Chain:
    """What happened to a delta between its source and a consumer."""

    source: SSAValue
    ops: list[Operation] = field(default_factory=list)  # source -> consumer order

    @property
    def deduplicated(self) -> bool:
        return any(isinstance(op, upd.DedupOp) for op in self.ops)


def chain_of(delta: SSAValue) -> Chain:
    """Walk back from `delta` through chain ops to its source."""
    ops: list[Operation] = []
    value = delta
    while isinstance(value.owner, CHAIN_OPS):
        ops.append(value.owner)
        value = value.owner.operands[0]
    ops.reverse()
    return Chain(value, ops)


def same_ids(a: SSAValue, b: SSAValue) -> bool:
    """True when two deltas carry the same ids (chain ops keep the id set)."""
    return chain_of(a).source is chain_of(b).source
