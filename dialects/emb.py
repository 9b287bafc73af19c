"""The `emb` dialect: embedding tables, optimizer state and serving lookups.

Types
  !emb.table<ROWSxDIMxLAYOUT>  a table; LAYOUT a layout of the catalog's
                               registry: f32, f16, bf16 (master or serving
                               copies) or int8 / int4 / fp8 (row-wise
                               quantized serving copies)
  !emb.state<ROWSxWIDTH>       f32 optimizer state: WIDTH = the table's dim
                               (Adagrad, Adam moments) or 1 (rowwise Adagrad)
  !emb.versions<ROWS>          per-row i64 version stamps

Attributes
  #emb.layout<NAME>            a serving layout (`LayoutAttr`, in common.py so
                               that kern and sync use it too)

Ops
  emb.table @name : T {serving = #emb.layout<int8>}
                               a table declaration of a model (metadata)
  emb.feature @f reads @t {pooling = "sum"}   a sparse feature reading a table
  emb.lookup %t, %ids          rows of ids, as f32 (dequantized)
  emb.bag %t, %ids, %offsets [, %weights] {mode = "sum"|"mean"}
                               pooled bags over jagged offsets (B+1 entries)
Tables have value semantics at this level.
"""

from __future__ import annotations

from collections.abc import Sequence

from xdsl.dialects.builtin import (
    DYNAMIC_INDEX,
    Float32Type,
    IntAttr,
    IntegerAttr,
    IntegerType,
    StringAttr,
    SymbolRefAttr,
    TensorType,
    f32,
)
from xdsl.ir import Attribute, Dialect, ParametrizedAttribute, TypeAttribute
from xdsl.irdl import (
    IRDLOperation,
    irdl_attr_definition,
    irdl_op_definition,
    operand_def,
    opt_operand_def,
    param_def,
    result_def,
    attr_def,
    opt_attr_def,
    traits_def,
)
from xdsl.parser import AttrParser, Parser
from xdsl.printer import Printer
from xdsl.traits import Pure, SymbolOpInterface
from xdsl.utils.exceptions import VerifyException

from . import catalog
from .limits import MAX_DIM, MAX_ROWS
from .common import LayoutAttr, Setting, SettingsOp, index_name, setting

POOLING = ("sum", "mean", "none")


def _parse_shape(parser: AttrParser, count: int, what: str) -> list[int]:
    pos = parser.pos
    dims = parser.parse_dimension_list()
    if len(dims) != count or any(d < 0 for d in dims[1:]):
        parser.raise_error(
            f"expected {count} dimension(s) in {what} (only the rows may be dynamic: ?)",
            pos,
            parser.pos,
        )
    return dims


def _dim(n: int) -> str:
    return "?" if n == DYNAMIC_INDEX else str(n)


def _check_rows(rows: int, what: str) -> None:
    if rows < 1 and rows != DYNAMIC_INDEX:
        raise VerifyException(f"{what} needs at least one row")
    if rows > MAX_ROWS:
        raise VerifyException(f"{what} has more rows than the limit ({MAX_ROWS:,}, MAX_ROWS)")


def _check_dim(dim: int, what: str) -> None:
    if dim > MAX_DIM:
        raise VerifyException(f"{what} is wider than the limit ({MAX_DIM:,}, MAX_DIM)")


@irdl_attr_definition
class TableType(ParametrizedAttribute, TypeAttribute):
    """An embedding table of rows x dim in one storage layout."""

    name = "emb.table"
    rows: IntAttr = param_def(IntAttr)
    dim: IntAttr = param_def(IntAttr)
    layout: LayoutAttr = param_def(LayoutAttr)

    def __init__(self, rows: int, dim: int, layout: str | LayoutAttr = "f32"):
        super().__init__(IntAttr(rows), IntAttr(dim), LayoutAttr.get(layout))

    @property
    def quantized(self) -> bool:
        return self.layout.entry.quantized

    def verify(self) -> None:
        _check_rows(self.rows.data, "!emb.table")
        if self.dim.data < 1:
            raise VerifyException("!emb.table needs at least one column")
        _check_dim(self.dim.data, "!emb.table")

    def print_parameters(self, printer: Printer) -> None:
        printer.print_string(f"<{_dim(self.rows.data)}x{self.dim.data}x{self.layout.data}>")

    @classmethod
    def parse_parameters(cls, parser: AttrParser) -> Sequence[Attribute]:
        with parser.in_angle_brackets():
            rows, dim = _parse_shape(parser, 2, "!emb.table")
            parser.parse_shape_delimiter()
            layout = LayoutAttr.parse_bare(parser)
        return (IntAttr(rows), IntAttr(dim), layout)


@irdl_attr_definition
class StateType(ParametrizedAttribute, TypeAttribute):
    """f32 optimizer state: `width` values per row (dim, or 1 for rowwise)."""

    name = "emb.state"
    rows: IntAttr = param_def(IntAttr)
    width: IntAttr = param_def(IntAttr)

    def __init__(self, rows: int, width: int):
        super().__init__(IntAttr(rows), IntAttr(width))

    def verify(self) -> None:
        _check_rows(self.rows.data, "!emb.state")
        if self.width.data < 1:
            raise VerifyException("!emb.state needs at least one column")
        _check_dim(self.width.data, "!emb.state")

    def print_parameters(self, printer: Printer) -> None:
        printer.print_string(f"<{_dim(self.rows.data)}x{self.width.data}>")

    @classmethod
    def parse_parameters(cls, parser: AttrParser) -> Sequence[Attribute]:
        with parser.in_angle_brackets():
            rows, width = _parse_shape(parser, 2, "!emb.state")
        return (IntAttr(rows), IntAttr(width))


@irdl_attr_definition
class VersionsType(ParametrizedAttribute, TypeAttribute):
    """One i64 version stamp per table row."""

    name = "emb.versions"
    rows: IntAttr = param_def(IntAttr)

    def __init__(self, rows: int):
        super().__init__(IntAttr(rows))

    def verify(self) -> None:
        _check_rows(self.rows.data, "!emb.versions")

    def print_parameters(self, printer: Printer) -> None:
        printer.print_string(f"<{_dim(self.rows.data)}>")

    @classmethod
    def parse_parameters(cls, parser: AttrParser) -> Sequence[Attribute]:
        with parser.in_angle_brackets():
            pos = parser.pos
            rows = parser.parse_shape_dimension()
            if rows < 1 and rows != DYNAMIC_INDEX:
                parser.raise_error("expected the number of rows or ?", pos, parser.pos)
        return (IntAttr(rows),)


def ids_type(index: str) -> TensorType:
    """A dynamic batch of ids: tensor<?xi32> or tensor<?xi64>."""
    return TensorType(IntegerType(int(index[1:])), [DYNAMIC_INDEX])


def rows_type(dim: int) -> TensorType:
    """A dynamic batch of f32 rows: tensor<?xDIMxf32>."""
    return TensorType(f32, [DYNAMIC_INDEX, dim])


def check_ids(t: Attribute, what: str) -> str:
    """`t` must be tensor<?xi32> or tensor<?xi64>; returns i32 / i64."""
    if isinstance(t, TensorType) and len(t.get_shape()) == 1:
        name = index_name(t.element_type)
        if name is not None:
            return name
    raise VerifyException(f"{what} must be a 1-d tensor of i32 or i64, got {t}")


def check_rows(t: Attribute, dim: int, what: str) -> None:
    """`t` must be a 2-d f32 tensor whose second dimension is `dim`."""
    if not (
        isinstance(t, TensorType)
        and len(t.get_shape()) == 2
        and isinstance(t.element_type, Float32Type)
    ):
        raise VerifyException(f"{what} must be a 2-d tensor of f32, got {t}")
    if t.get_shape()[1] != dim:
        raise VerifyException(
            f"{what} has rows of {t.get_shape()[1]} values but the table's dim is {dim}"
        )


def expect_table(t: Attribute, what: str) -> TableType:
    if not isinstance(t, TableType):
        raise VerifyException(f"{what} must be an !emb.table, got {t}")
    return t


@irdl_op_definition
class TableOp(IRDLOperation):
    """Declares a model table; `serving` names the serving copy's layout."""

    name = "emb.table"
    sym_name = attr_def(StringAttr)
    table_type = attr_def(TableType, attr_name="type")
    serving = opt_attr_def(Setting(LayoutAttr, "serving"))
    traits = traits_def(SymbolOpInterface())

    def __init__(self, name: str, ty: TableType, attributes: dict[str, Attribute] | None = None):
        attrs: dict[str, Attribute] = {"sym_name": StringAttr(name), "type": ty}
        attrs.update(attributes or {})
        super().__init__(attributes=attrs)

    def verify_(self) -> None:
        if self.table_type.quantized:
            raise VerifyException(
                f"table @{self.sym_name.data} is quantized ({self.table_type.layout.data}): "
                "a master table must be f32, f16 or bf16; quantize its serving copy instead"
            )

    def print(self, printer: Printer) -> None:
        printer.print_string(f" @{self.sym_name.data} : ")
        printer.print_attribute(self.table_type)
        printer.print_op_attributes(self.attributes, reserved_attr_names=("sym_name", "type"))

    @classmethod
    def parse(cls, parser: Parser) -> TableOp:
        name = parser.parse_symbol_name().data
        parser.parse_punctuation(":")
        pos = parser.pos
        ty = parser.parse_type()
        if not isinstance(ty, TableType):
            parser.raise_error("expected an !emb.table type", pos, parser.pos)
        return cls(name, ty, parser.parse_optional_attr_dict())


@irdl_op_definition
class FeatureOp(IRDLOperation):
    """A sparse feature: the ids it carries are looked up in `table`."""

    name = "emb.feature"
    sym_name = attr_def(StringAttr)
    table = attr_def(SymbolRefAttr)
    pooling = attr_def(StringAttr)
    traits = traits_def(SymbolOpInterface())

    def __init__(self, name: str, table: str, pooling: str = "sum"):
        super().__init__(
            attributes={
                "sym_name": StringAttr(name),
                "table": SymbolRefAttr(table),
                "pooling": StringAttr(pooling),
            }
        )

    def verify_(self) -> None:
        if self.pooling.data not in POOLING:
            raise VerifyException(
                f"feature @{self.sym_name.data}: pooling must be one of {', '.join(POOLING)}"
            )

    def print(self, printer: Printer) -> None:
        printer.print_string(
            f" @{self.sym_name.data} reads @{self.table.root_reference.data}"
            f" pooling {self.pooling.data}"
        )
        printer.print_op_attributes(
            self.attributes, reserved_attr_names=("sym_name", "table", "pooling")
        )

    @classmethod
    def parse(cls, parser: Parser) -> FeatureOp:
        name = parser.parse_symbol_name().data
        parser.parse_keyword("reads")
        table = parser.parse_symbol_name().data
        parser.parse_keyword("pooling")
        pos = parser.pos
        pooling = parser.parse_identifier()
        if pooling not in POOLING:
            parser.raise_error(f"pooling must be one of {', '.join(POOLING)}", pos, parser.pos)
        op = cls(name, table, pooling)
        op.attributes.update(parser.parse_optional_attr_dict())
        return op


@irdl_op_definition
class LookupOp(SettingsOp):
    """Rows of `ids`, dequantized to f32: one output row per id.

    `partitions` (a property upd-schedule sets) is how many threads share the ids."""

    name = "emb.lookup"
    table = operand_def(TableType)
    ids = operand_def(TensorType)
    result = result_def(TensorType)
    partitions = setting(IntegerAttr, "partitions")
    traits = traits_def(Pure())

    @classmethod
    def infer_result_types(cls, operand_types, attributes):
        if len(operand_types) != 2:
            raise VerifyException("'emb.lookup' takes a table and ids")
        table = expect_table(operand_types[0], "the lookup's first operand")
        check_ids(operand_types[1], "the lookup's ids")
        return [rows_type(table.dim.data)]

    def verify_(self) -> None:
        self.infer_result_types([o.type for o in self.operands], self.flat())
        check_rows(self.result.type, self.table.type.dim.data, "the lookup's result")


@irdl_op_definition
class BagOp(SettingsOp):
    """Pooled bags: out[b] = pool(rows of ids[offsets[b]:offsets[b+1]] [* weights]).

    `mode` (sum or mean) and `partitions` (set by upd-schedule) are properties,
    written in the flat settings."""

    name = "emb.bag"
    table = operand_def(TableType)
    ids = operand_def(TensorType)
    offsets = operand_def(TensorType)
    weights = opt_operand_def(TensorType)
    mode = setting(StringAttr, "mode")  # required; optional so the verifier's error says so
    partitions = setting(IntegerAttr, "partitions")
    result = result_def(TensorType)
    traits = traits_def(Pure())

    @classmethod
    def infer_result_types(cls, operand_types, attributes):
        if len(operand_types) not in (3, 4):
            raise VerifyException("'emb.bag' takes a table, ids, offsets and optional weights")
        table = expect_table(operand_types[0], "the bag's first operand")
        index = check_ids(operand_types[1], "the bag's ids")
        if check_ids(operand_types[2], "the bag's offsets") != index:
            raise VerifyException("the bag's offsets must have the ids' element type")
        mode = attributes.get("mode")
        if not isinstance(mode, StringAttr) or mode.data not in ("sum", "mean"):
            raise VerifyException("'emb.bag' needs mode = \"sum\" or \"mean\"")
        if len(operand_types) == 4:
            w = operand_types[3]
            if not (
                isinstance(w, TensorType)
                and len(w.get_shape()) == 1
                and isinstance(w.element_type, Float32Type)
            ):
                raise VerifyException("the bag's per-sample weights must be tensor<?xf32>")
            if (why := catalog.pooling_problem(mode.data, True)) is not None:
                raise VerifyException(why)
        return [rows_type(table.dim.data)]

    def verify_(self) -> None:
        self.infer_result_types([o.type for o in self.operands], self.flat())
        check_rows(self.result.type, self.table.type.dim.data, "the bag's result")


Emb = Dialect(
    "emb",
    [TableOp, FeatureOp, LookupOp, BagOp],
    [TableType, StateType, VersionsType, LayoutAttr],
)
