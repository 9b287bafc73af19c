"""Shared assembly helpers for ekko's dialects.

Most ekko ops print as `op %a, %b {attrs} : type(%a), type(%b)`: the result
types follow from the operand types, so they are never written. One
hand-written parser for that form is several times faster than xDSL's
declarative formats, which matters for the 10k-op modules models produce.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from xdsl.dialects.builtin import (
    BFloat16Type,
    DenseArrayBase,
    DictionaryAttr,
    Float16Type,
    Float32Type,
    FloatAttr,
    IntegerType,
    Signedness,
    StringAttr,
    UnitAttr,
    f64,
    i32,
)
from xdsl.ir import Attribute, Data, SSAValue
from xdsl.irdl import BaseAttr, IRDLOperation, irdl_attr_definition, opt_prop_def, prop_def
from xdsl.irdl.constraints import VerificationContext
from xdsl.parser import AttrParser, Parser
from xdsl.printer import Printer
from xdsl.utils.exceptions import VerifyException

from . import catalog

# the builtin type of each float element format (catalog.FORMATS)
FLOAT_DTYPES = {"f32": Float32Type(), "f16": Float16Type(), "bf16": BFloat16Type()}
i8 = IntegerType(8)


@irdl_attr_definition
class LayoutAttr(Data[str]):
    """A serving layout: a name of `catalog.LAYOUTS`, written `#emb.layout<int8>`
    (inside `!emb.table` and `!sync.packet` the bare name, `10x4xint8`).

    An enum attribute over a registry, not a closed StrEnum: the names are the
    registry's at the time of the check, so a layout a user registers is one
    every op and type accepts. Built (in Python or by the parser) only for a
    registered name; `entry` is its catalog entry."""

    name = "emb.layout"

    def __init__(self, layout: str) -> None:
        super().__init__(layout)

    @property
    def entry(self) -> catalog.Layout:
        return catalog.LAYOUTS[self.data]

    def verify(self) -> None:
        if (why := catalog.LAYOUTS.problem(self.data)) is not None:
            raise VerifyException(why)

    @classmethod
    def parse_parameter(cls, parser: AttrParser) -> str:
        with parser.in_angle_brackets():
            return cls.parse_name(parser)

    def print_parameter(self, printer: Printer) -> None:
        printer.print_string(f"<{self.data}>")

    @classmethod
    def parse_name(cls, parser: AttrParser) -> str:
        """A bare layout name (`int8`); an unknown one is an error where it is written."""
        pos = parser.pos
        name = parser.parse_optional_identifier()
        if name is None:
            parser.raise_error(f"expected a layout name ({', '.join(catalog.LAYOUTS)})", pos)
        if (why := catalog.LAYOUTS.problem(name)) is not None:
            parser.raise_error(why, pos, parser.pos)
        return name

    @classmethod
    def parse_bare(cls, parser: AttrParser) -> LayoutAttr:
        return cls(cls.parse_name(parser))


def layout_setting(flat: dict[str, Attribute], name: str) -> LayoutAttr | None:
    """The layout attribute `name` of an op's flat settings, if it is one."""
    attr = flat.get(name)
    return attr if isinstance(attr, LayoutAttr) else None


def storage_type(layout: str) -> Attribute:
    """The element type of a buffer of `layout` rows: its float, or i8 bytes."""
    entry = catalog.layout(layout)
    return i8 if entry.quantized else FLOAT_DTYPES[entry.storage.name]


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


def settings(op: IRDLOperation) -> dict[str, Attribute]:
    """`op`'s settings as one flat dict, the way its custom form writes them."""
    if isinstance(op, SettingsOp):
        return op.flat()
    return op.attributes


def get_float(op: IRDLOperation, name: str, default: float | None = None) -> float | None:
    """A float hyper-parameter of `op`, or `default` when it is absent."""
    attr = settings(op).get(name)
    if attr is None:
        return default
    if not isinstance(attr, FloatAttr):
        raise VerifyException(f"'{op.name}' {name} must be a number, got {attr}")
    return float(attr.value.data)


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
        return cls.from_flat(list(operands), types, attributes)

    @classmethod
    def from_flat(cls, operands: Sequence[SSAValue], result_types: Sequence[Attribute],
                  flat: dict[str, Attribute], regions: Sequence = ()):
        """The op from its settings written flat (see SettingsOp)."""
        return cls.create(operands=list(operands), result_types=list(result_types),
                          attributes=flat, regions=list(regions))

    def flat(self) -> dict[str, Attribute]:
        return self.attributes

    def print(self, printer: Printer) -> None:
        if self.operands:
            printer.print_string(" ")
            printer.print_list(self.operands, printer.print_operand)
        printer.print_op_attributes(self.flat())
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
        return cls.from_flat(operands, result_types, attributes)


def flag(flat: dict[str, Attribute], name: str, operands: Sequence[str]) -> bool:
    """Whether the unit flag `name` (which says `operands` are present) is set."""
    attr = flat.get(name)
    if attr is not None and not isinstance(attr, UnitAttr):
        raise VerifyException(f"'{name}' is a unit flag that says the {' and '.join(operands)} "
                              f"operand is present, got {attr}")
    return attr is not None


SEGMENTS = ("operandSegmentSizes", "resultSegmentSizes")
_KINDS = {FloatAttr: "a float", StringAttr: "a string", UnitAttr: "a unit flag",
          DictionaryAttr: "a dictionary", LayoutAttr: "a layout, #emb.layout<NAME>"}


@dataclass(frozen=True)
class Setting(BaseAttr):
    """A property constraint whose error names the setting (IRDL's own does not)."""

    what: str = ""

    def verify(self, attr: Attribute, constraint_context: VerificationContext) -> None:
        if not isinstance(attr, self.attr):
            kind = _KINDS.get(self.attr, f"an {self.attr.__name__}")  # type: ignore[arg-type]
            raise VerifyException(f"'{self.what}' must be {kind}, got {attr}")


def setting(kind: type[Attribute], name: str, required: bool = False):
    """A declared property `name` holding a `kind` attribute."""
    constraint = Setting(kind, name)
    return prop_def(constraint) if required else opt_prop_def(constraint)


class SettingsOp(InferredResultsOp):
    """An op whose settings are declared properties and whose optional
    operands are declared (`opt_operand_def`, operand segment sizes).

    Its custom form (and its Python builders) write the settings as one flat
    dict, as MLIR writes inherent attributes in `attr-dict`: the
    hyper-parameters of its optimizer inline, and unit flags (`FLAGS`) that
    say which optional operands are present. `from_flat` stores them as
    properties: the optimizer's hyper-parameters in the `hyper` dictionary
    when the op declares one, the operand and result segment sizes from
    `roles`. `flat` is the inverse; verifiers and passes read it, so one
    description of the roles serves the parser, the builders and the checks.
    Names the op does not declare stay discardable attributes, and the
    verifier names them.
    """

    FLAGS: ClassVar[dict[str, tuple[str, ...]]] = {}  # flag -> the operand defs it makes present
    ORDER: ClassVar[tuple[str, ...]] = ()  # settings after the hyper-parameters, in print order

    @classmethod
    def roles(cls, flat: dict[str, Attribute]) -> list[str]:
        """The role of each operand, in order, for these settings."""
        raise NotImplementedError

    @classmethod
    def result_roles(cls, flat: dict[str, Attribute]) -> list[str]:
        return []

    @classmethod
    def _segments(cls, defs: Sequence[str], roles: list[str], rest: str) -> DenseArrayBase:
        sizes = [sum(1 for r in roles if (r if r in defs else rest) == d) for d in defs]
        return DenseArrayBase.from_list(i32, sizes)

    @classmethod
    def segment_sizes(cls, flat: dict[str, Attribute]) -> dict[str, DenseArrayBase]:
        """operandSegmentSizes (and resultSegmentSizes) for these settings;
        roles that name no def belong to the variadic `state` group."""
        op_def = cls.get_irdl_definition()
        sizes = {SEGMENTS[0]: cls._segments([n for n, _ in op_def.operands], cls.roles(flat),
                                            "state")}
        if SEGMENTS[1] in op_def.properties:
            sizes[SEGMENTS[1]] = cls._segments([n for n, _ in op_def.results],
                                               ["new_" + r for r in cls.result_roles(flat)],
                                               "new_state")
        return sizes

    @classmethod
    def hyper_names(cls, flat: dict[str, Attribute]) -> set[str]:
        """Names kept in the `hyper` dictionary property: float settings the
        op does not declare (its optimizer's hyper-parameters; a name the
        optimizer does not take is kept too, and the verifier names it)."""
        declared = cls.get_irdl_definition().properties
        if "hyper" not in declared:
            return set()
        return {n for n, a in flat.items() if isinstance(a, FloatAttr) and n not in declared}

    @classmethod
    def from_flat(cls, operands, result_types, flat, regions=()):
        declared = cls.get_irdl_definition().properties
        inside = cls.hyper_names(flat)
        props: dict[str, Attribute] = {}
        hyper: dict[str, Attribute] = {}
        attrs: dict[str, Attribute] = {}
        for name, attr in flat.items():
            if name in cls.FLAGS and isinstance(attr, UnitAttr):
                continue  # said by the segment sizes
            if name in inside:
                hyper[name] = attr
            elif name in declared and name not in SEGMENTS:
                props[name] = attr
            else:
                attrs[name] = attr
        if "hyper" in declared:  # printed right after the optimizer it belongs to
            head = {k: props.pop(k) for k in ("optimizer",) if k in props}
            props = {**head, "hyper": DictionaryAttr(hyper), **props}
        if SEGMENTS[0] in declared:
            props.update(cls.segment_sizes(flat))
        return cls.create(operands=list(operands), result_types=list(result_types),
                          properties=props, attributes=attrs, regions=list(regions))

    def flat(self) -> dict[str, Attribute]:
        props = self.properties
        out: dict[str, Attribute] = {}
        if "optimizer" in props:
            out["optimizer"] = props["optimizer"]
        hyper = props.get("hyper")
        if isinstance(hyper, DictionaryAttr):
            out.update(hyper.data)
        for name, attr in props.items():
            if name not in out and name not in SEGMENTS and name != "hyper" \
                    and name not in self.ORDER:
                out[name] = attr
        present = self._present()
        for name in self.ORDER:
            if name in self.FLAGS:
                if self.FLAGS[name][0] in present:
                    out[name] = UnitAttr()
            elif name in props:
                out[name] = props[name]
        out.update(self.attributes)
        return out

    def _present(self) -> set[str]:
        """The operand defs this op has operands for, by its segment sizes."""
        sizes = self.properties.get(SEGMENTS[0])
        if not isinstance(sizes, DenseArrayBase):
            return set()
        names = [n for n, _ in self.get_irdl_definition().operands]
        return {n for n, k in zip(names, sizes.iter_values()) if k}


def verify_inferred(op: InferredResultsOp) -> None:
    """The results are the types the op's operands and settings imply."""
    types = op.infer_result_types([o.type for o in op.operands], op.flat())
    if [r.type for r in op.results] != list(types):
        expected = ", ".join(str(t) for t in types)
        raise VerifyException(f"'{op.name}' result types must be [{expected}]")
