"""Shared assembly helpers for ekko's dialects.

Most ekko ops print as `op %a, %b {attrs} : type(%a), type(%b)`: the result
types follow from the operand types, so they are never written. One
hand-written parser for that form is several times faster than xDSL's
declarative formats, which matters for the 10k-op modules models produce.
"""

from __future__ import annotations

from collections.abc import Sequence

from xdsl.dialects.builtin import (
    BFloat16Type,
    Float16Type,
    Float32Type,
    FloatAttr,
    IntegerType,
    Signedness,
    StringAttr,
    f64,
)
from xdsl.ir import Attribute, SSAValue
from xdsl.irdl import IRDLOperation
from xdsl.parser import Parser
from xdsl.printer import Printer
from xdsl.utils.exceptions import VerifyException

FLOAT_DTYPES = {"f32": Float32Type(), "f16": Float16Type(), "bf16": BFloat16Type()}
QUANT_LAYOUTS = ("int8", "int4")
LAYOUTS = ("f32", "f16", "bf16", "int8", "int4")


def dtype_name(attr: Attribute) -> str | None:
    """The ekko name of a builtin float type (f32, f16, bf16), else None."""
    for name, t in FLOAT_DTYPES.items():
        if attr == t:
            return name
    return None


def index_name(attr: Attribute) -> str | None:
    """i32 or i64 for an id element type, else None."""
    if (
        isinstance(attr, IntegerType)
        and attr.width.data in (32, 64)
        and attr.signedness.data == Signedness.SIGNLESS
    ):
        return f"i{attr.width.data}"
    return None


def float_attr(value: float) -> FloatAttr:
    return FloatAttr(float(value), f64)


def get_float(op: IRDLOperation, name: str, default: float | None = None) -> float | None:
    """A float hyper-parameter of `op`, or `default` when it is absent."""
    attr = op.attributes.get(name)
    if attr is None:
        return default
    if not isinstance(attr, FloatAttr):
        raise VerifyException(f"'{op.name}' attribute '{name}' must be a float")
    return float(attr.value.data)


def get_string(op: IRDLOperation, name: str, default: str | None = None) -> str | None:
    attr = op.attributes.get(name)
    if attr is None:
        return default
    if not isinstance(attr, StringAttr):
        raise VerifyException(f"'{op.name}' attribute '{name}' must be a string")
    return attr.data


class InferredResultsOp(IRDLOperation):
    """Base for ops printed as `op %a, %b {attrs} : T(a), T(b)`.

    Subclasses implement `infer_result_types`, used both when parsing and by
    Python builders, so the two can never disagree.
    """

    @classmethod
    def infer_result_types(
        cls, operand_types: Sequence[Attribute], attributes: dict[str, Attribute]
    ) -> list[Attribute]:
        raise NotImplementedError

    @classmethod
    def build_inferred(
        cls, operands: Sequence[SSAValue], attributes: dict[str, Attribute] | None = None
    ):
        attributes = dict(attributes or {})
        types = cls.infer_result_types([o.type for o in operands], attributes)
        return cls.create(operands=list(operands), result_types=types, attributes=attributes)

    def print(self, printer: Printer) -> None:
        if self.operands:
            printer.print_string(" ")
            printer.print_list(self.operands, printer.print_operand)
        printer.print_op_attributes(self.attributes)
        if self.operands:
            printer.print_string(" : ")
            printer.print_list([o.type for o in self.operands], printer.print_attribute)

    @classmethod
    def parse(cls, parser: Parser):
        start = parser.pos
        unresolved = []
        first = parser.parse_optional_unresolved_operand()
        if first is not None:
            unresolved.append(first)
            while parser.parse_optional_punctuation(",") is not None:
                unresolved.append(parser.parse_unresolved_operand())
        attributes = parser.parse_optional_attr_dict()
        types: list[Attribute] = []
        if unresolved:
            parser.parse_punctuation(":", " before the operand types")
            types = parser.parse_comma_separated_list(
                parser.Delimiter.NONE, parser.parse_type, " operand types"
            )
        if len(types) != len(unresolved):
            parser.raise_error(
                f"'{cls.name}' has {len(unresolved)} operands but {len(types)} types",
                start,
                start,
            )
        operands = [parser.resolve_operand(u, t) for u, t in zip(unresolved, types)]
        try:
            result_types = cls.infer_result_types(types, attributes)
        except VerifyException as e:
            parser.raise_error(str(e), start, start)
        return cls.create(operands=operands, result_types=result_types, attributes=attributes)
