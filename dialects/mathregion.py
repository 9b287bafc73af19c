"""The ops of a math region: the per-row math of `kern.update`, below the catalog.

A math region is one block of `arith`/`math` ops (MATH_OPS) plus the two
ops here, `kern.row_sum` (an element value summed over the row) and
`kern.yield` (the new weights, then the new state). The catalog traces each
optimizer's math into one (`catalog.math_region`) and the `kern` dialect
holds it; both import this module and it imports neither, so the data
(the catalog) and the dialect that lowers it depend on the IR one way.
"""

from __future__ import annotations

from collections.abc import Sequence

from xdsl.dialects import arith, math
from xdsl.dialects.builtin import Float32Type, f32
from xdsl.ir import Block, SSAValue
from xdsl.irdl import IRDLOperation, irdl_op_definition, operand_def, result_def, traits_def
from xdsl.irdl import var_operand_def
from xdsl.traits import IsTerminator, Pure
from xdsl.utils.exceptions import VerifyException

# ops a math region may hold besides its own two: what every backend lowers
MATH_OPS = (
    arith.ConstantOp, arith.AddfOp, arith.SubfOp, arith.MulfOp, arith.DivfOp, arith.NegfOp,
    arith.MaximumfOp, arith.MinimumfOp, arith.CmpfOp, arith.SelectOp, arith.TruncFOp,
    math.SqrtOp, math.AbsFOp, math.PowFOp, math.ExpOp, math.LogOp,
)


@irdl_op_definition
class RowSumOp(IRDLOperation):
    """The sum of an element value over the row (inside a math region)."""

    name = "kern.row_sum"
    input = operand_def(Float32Type)
    output = result_def(Float32Type)
    traits = traits_def(Pure())
    assembly_format = "$input attr-dict"

    def __init__(self, value: SSAValue):
        super().__init__(operands=[value], result_types=[f32])


@irdl_op_definition
class YieldOp(IRDLOperation):
    """Ends a math region: the new weights, then the new state values."""

    name = "kern.yield"
    values = var_operand_def(Float32Type)
    traits = traits_def(IsTerminator(), Pure())
    assembly_format = "($values^ `:` type($values))? attr-dict"

    def __init__(self, *values: SSAValue):
        super().__init__(operands=[list(values)])


def check_rowwise_outputs(block: Block, elementwise: set[str], arg_names: Sequence[str],
                          outputs: Sequence[tuple[str, bool]], who: str) -> None:
    """A rowwise output must be one value per row: nothing it yields may depend
    on an element argument (`elementwise`, by name) except through kern.row_sum.
    `outputs` names the yielded state values after the weights, with whether
    each is rowwise; `who` starts the error."""
    per_element = {a for a, n in zip(block.args, arg_names) if n in elementwise}
    for op in block.ops:
        if not isinstance(op, RowSumOp) and any(o in per_element for o in op.operands):
            per_element.update(op.results)
    last = block.last_op
    if not isinstance(last, YieldOp):
        return
    for (name, rowwise), value in zip(outputs, list(last.operands)[1:]):
        if rowwise and value in per_element:
            raise VerifyException(f"{who}: rowwise state '{name}' must be one value per row "
                                  "(reduce element values with row_sum)")


__all__ = ["MATH_OPS", "RowSumOp", "YieldOp", "check_rowwise_outputs"]
