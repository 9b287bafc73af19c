"""The `sync` dialect: replica sync, the values a primary sends its replicas.

Serving copies receive values, not gradients: a packet carries ids, their
rows in the serving layout and the version each row was written at. Merging
is newest-version-wins per row (ties broken by the row's bytes), so a late,
repeated or reordered packet can never corrupt a replica.

Types
  !sync.packet<DIMxLAYOUT, INDEX>  ids (INDEX), rows in LAYOUT (a layout of
                                   the catalog, the bare name) and i64 versions
Ops
  sync.packet %ids, %rows, %versions [{layout = #emb.layout<int4>, dim}]
                                   a packet from tensors
  sync.pack %serving, %versions, %ids [{seq}]          the rows of `ids`
  sync.merge %serving, %versions, %packet, %newest [{seq}]
                                   newest wins per row; `newest` is the
                                   newest version the primary issued (a
                                   packet claiming a later one is rejected)
`seq` says readers race with this op: the kernel guards each row with a
sequence word (see docs/engine.md). Tables have value semantics here.
"""

from __future__ import annotations

from collections.abc import Sequence

from xdsl.dialects.builtin import (
    DYNAMIC_INDEX,
    IntAttr,
    IntegerAttr,
    IntegerType,
    StringAttr,
    TensorType,
    UnitAttr,
)
from xdsl.ir import Attribute, Dialect, ParametrizedAttribute, TypeAttribute
from xdsl.irdl import (
    irdl_attr_definition,
    irdl_op_definition,
    operand_def,
    param_def,
    result_def,
    traits_def,
)
from xdsl.parser import AttrParser
from xdsl.printer import Printer
from xdsl.traits import Pure
from xdsl.utils.exceptions import VerifyException

from . import catalog
from .common import (LayoutAttr, SettingsOp, dtype_name, layout_setting, setting,
                     storage_type, verify_inferred)
from .emb import TableType, VersionsType, check_ids, expect_table
from .upd import expect_i64

i8 = IntegerType(8)
i64 = IntegerType(64)


def packet_rows_type(layout: str | LayoutAttr, dim: int) -> TensorType:
    """tensor<?xDIMxT> for float layouts, tensor<?xBYTESxi8> for quantized ones."""
    layout = LayoutAttr.get(layout)
    return TensorType(storage_type(layout.data), [DYNAMIC_INDEX, layout.entry.width(dim)])


@irdl_attr_definition
class PacketType(ParametrizedAttribute, TypeAttribute):
    """A batch of (id, serving row, version) of dynamic size."""

    name = "sync.packet"
    dim: IntAttr = param_def(IntAttr)
    layout: LayoutAttr = param_def(LayoutAttr)
    index: StringAttr = param_def(StringAttr)

    def __init__(self, dim: int, layout: str | LayoutAttr, index: str = "i64"):
        super().__init__(IntAttr(dim), LayoutAttr.get(layout), StringAttr(index))

    def verify(self) -> None:
        if self.dim.data < 1:
            raise VerifyException("!sync.packet needs rows of at least one value")
        if self.index.data not in ("i32", "i64"):
            raise VerifyException("!sync.packet ids must be i32 or i64")

    def print_parameters(self, printer: Printer) -> None:
        printer.print_string(f"<{self.dim.data}x{self.layout.data}, {self.index.data}>")

    @classmethod
    def parse_parameters(cls, parser: AttrParser) -> Sequence[Attribute]:
        with parser.in_angle_brackets():
            pos = parser.pos
            dims = parser.parse_dimension_list()
            if len(dims) != 1 or dims[0] < 1:
                parser.raise_error("expected the packet's row size, e.g. 64xint8", pos, parser.pos)
            parser.parse_shape_delimiter()
            layout = LayoutAttr.parse_bare(parser)
            parser.parse_punctuation(",")
            pos = parser.pos
            index = parser.parse_identifier()
            if index not in ("i32", "i64"):
                parser.raise_error("packet ids must be i32 or i64", pos, parser.pos)
        return (IntAttr(dims[0]), layout, StringAttr(index))


def expect_packet(t: Attribute, what: str) -> PacketType:
    if not isinstance(t, PacketType):
        raise VerifyException(f"{what} must be a !sync.packet, got {t}")
    return t


def _expect_versions(t: Attribute, table: TableType, op: str) -> None:
    if not isinstance(t, VersionsType):
        raise VerifyException(f"'{op}' needs !emb.versions, got {t}")
    if t.rows.data != table.rows.data:
        raise VerifyException(
            f"'{op}' versions must have the serving copy's {table.rows.data} rows, got {t}"
        )


class SyncOp(SettingsOp):
    """A sync op: declared operands and results, settings as properties; the
    result types follow from the operands (`infer_result_types`)."""

    def verify_(self) -> None:
        for name in self.attributes:
            raise VerifyException(f"'{self.name}' has no attribute '{name}'")
        verify_inferred(self)
        parts = self.properties.get("partitions")
        if parts is not None and not (isinstance(parts, IntegerAttr) and parts.value.data >= 1):
            raise VerifyException(f"'{self.name}' partitions must be a positive integer")


def _either(names: list[str]) -> str:
    """'a', 'a or b', 'a, b or c'."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _layout_of_rows(rows: Attribute, attributes: dict[str, Attribute]) -> tuple[str, int]:
    """(layout, dim) of a packet's rows tensor; byte rows need layout (and dim when
    their width does not say it)."""
    if not isinstance(rows, TensorType) or len(rows.get_shape()) != 2 or rows.get_shape()[1] < 1:
        raise VerifyException("a packet's rows must be a 2-d tensor with a static width")
    width = rows.get_shape()[1]
    elem = rows.element_type
    given = layout_setting(attributes, "layout")
    if given is None and "layout" in attributes:
        raise VerifyException(f"'sync.packet' layout must be #emb.layout<NAME>, "
                              f"got {attributes['layout']}")
    fmt = dtype_name(elem)
    if fmt is not None:
        if given is None:  # the layout that stores this float as it is
            return next(n for n, e in catalog.LAYOUTS.items()
                        if not e.quantized and e.storage.name == fmt), width
        if storage_type(given.data) != elem:
            raise VerifyException(f"{elem} rows cannot hold the {given.data} layout")
        return given.data, width
    quantized = [n for n, e in catalog.LAYOUTS.items() if e.quantized]
    if elem != i8 or given is None or not given.entry.quantized:
        raise VerifyException(
            "a packet's rows must be f32, f16 or bf16, or i8 bytes with layout "
            + _either(quantized))
    layout, entry = given.data, given.entry
    dim_attr = attributes.get("dim")
    if isinstance(dim_attr, IntegerAttr):
        dim = dim_attr.value.data
    elif entry.codec.code_bytes(2) == 2:  # a byte a code: the width says the dim
        dim = width - entry.row_bytes(0)
    else:
        raise VerifyException(f"{layout} packet rows need the dim attribute")
    if dim < 1 or entry.width(dim) != width:
        raise VerifyException(f"{layout} rows of {width} bytes do not hold a row of dim {dim}")
    return layout, dim


@irdl_op_definition
class PacketOp(SyncOp):
    """Makes a packet from ids, rows (serving layout) and versions of equal length.

    `layout` names int8/int4 rows (i8 bytes); `dim` the row size of int4 ones."""

    name = "sync.packet"
    ids = operand_def(TensorType)
    rows = operand_def(TensorType)
    versions = operand_def(TensorType)
    packet = result_def(PacketType)
    layout = setting(LayoutAttr, "layout")
    dim = setting(IntegerAttr, "dim")
    traits = traits_def(Pure())

    @classmethod
    def infer_result_types(cls, operand_types, attributes):
        if len(operand_types) != 3:
            raise VerifyException("'sync.packet' takes ids, rows and versions")
        index = check_ids(operand_types[0], "the packet's ids")
        layout, dim = _layout_of_rows(operand_types[1], attributes)
        versions = operand_types[2]
        if not (isinstance(versions, TensorType) and versions.element_type == i64
                and len(versions.get_shape()) == 1):
            raise VerifyException(f"the packet's versions must be tensor<?xi64>, got {versions}")
        return [PacketType(dim, layout, index)]


@irdl_op_definition
class PackOp(SyncOp):
    """The serving rows and versions of `ids` as a packet (the rows a step touched).

    Properties: unit `seq` (readers race: each row is read under its sequence
    word), `partitions` (upd-schedule's thread count)."""

    name = "sync.pack"
    serving = operand_def(TableType)
    versions = operand_def(VersionsType)
    ids = operand_def(TensorType)
    packet = result_def(PacketType)
    seq = setting(UnitAttr, "seq")
    partitions = setting(IntegerAttr, "partitions")
    traits = traits_def(Pure())

    @classmethod
    def infer_result_types(cls, operand_types, attributes):
        if len(operand_types) != 3:
            raise VerifyException("'sync.pack' takes the serving copy, its versions and ids")
        serving = expect_table(operand_types[0], "'sync.pack' serving copy")
        _expect_versions(operand_types[1], serving, cls.name)
        index = check_ids(operand_types[2], "'sync.pack' ids")
        return [PacketType(serving.dim.data, serving.layout, index)]


@irdl_op_definition
class MergeOp(SyncOp):
    """Merges a packet into a serving copy: per row, the newest version wins.

    Operands: serving, versions, packet, newest (i64). Results: serving,
    versions. Equal versions are settled by the larger row bytes, so the
    result never depends on the order packets arrive in.
    """

    name = "sync.merge"
    serving = operand_def(TableType)
    versions = operand_def(VersionsType)
    packet = operand_def(PacketType)
    newest = operand_def(i64)
    new_serving = result_def(TableType)
    new_versions = result_def(VersionsType)
    seq = setting(UnitAttr, "seq")
    partitions = setting(IntegerAttr, "partitions")

    @classmethod
    def infer_result_types(cls, operand_types, attributes):
        if len(operand_types) != 4:
            raise VerifyException(
                "'sync.merge' takes the serving copy, its versions, a packet and the newest version"
            )
        serving = expect_table(operand_types[0], "'sync.merge' serving copy")
        _expect_versions(operand_types[1], serving, cls.name)
        packet = expect_packet(operand_types[2], "'sync.merge' packet")
        if (packet.dim.data, packet.layout.data) != (serving.dim.data, serving.layout.data):
            raise VerifyException(
                f"'sync.merge' packet rows are {packet.dim.data}x{packet.layout.data} but the "
                f"serving copy is {serving.dim.data}x{serving.layout.data}"
            )
        expect_i64(operand_types[3], cls.name, "newest")
        return [operand_types[0], operand_types[1]]


Sync = Dialect("sync", [PacketOp, PackOp, MergeOp], [PacketType])
