"""The `kern` dialect: the kernel level, where buffers are explicit.

Each op is one native kernel over memrefs, updated in place: "for each
unique id of a partition: load the rows it touches, vector math over the
embedding dim, store". The attributes say everything a backend needs to
emit that loop nest (see `ekko.compiler.backend.spec`), so LLVM and Triton
emitters read one op and never rediscover structure.

  kern.update %table, %state..., %ids, %grads [, %serving] [, %versions, %version]
              [, %step] [, %seed] {optimizer = "...", ...}
  kern.bag %table, %ids [, %offsets] [, %weights], %out {mode = "sum", layout = "int8"}
"""

from __future__ import annotations

from xdsl.dialects.builtin import (
    DYNAMIC_INDEX,
    IntegerType,
    MemRefType,
    StringAttr,
    UnitAttr,
)
from xdsl.ir import Attribute, Dialect
from xdsl.irdl import irdl_op_definition, var_operand_def
from xdsl.utils.exceptions import VerifyException

from .common import FLOAT_DTYPES, LAYOUTS, InferredResultsOp, dtype_name, index_name
from .emb import StateType, TableType, VersionsType
from .upd import APPLY_FLAGS, APPLY_FLOATS, APPLY_INTS, APPLY_UNITS, apply_roles

i8 = IntegerType(8)
i64 = IntegerType(64)


def row_bytes(layout: str, dim: int) -> int:
    """Storage bytes per row (int8: codes + f32 scale/bias; int4: nibbles + f16)."""
    return {
        "f32": 4 * dim,
        "f16": 2 * dim,
        "bf16": 2 * dim,
        "int8": dim + 8,
        "int4": (dim + 1) // 2 + 4,
    }[layout]


def table_buffer(t: TableType) -> MemRefType:
    """The memref holding a table: floats as rows x dim, int layouts as bytes."""
    layout = t.layout.data
    if layout in FLOAT_DTYPES:
        return MemRefType(FLOAT_DTYPES[layout], [t.rows.data, t.dim.data])
    return MemRefType(i8, [t.rows.data, row_bytes(layout, t.dim.data)])


def state_buffer(t: StateType) -> MemRefType:
    return MemRefType(FLOAT_DTYPES["f32"], [t.rows.data, t.width.data])


def versions_buffer(t: VersionsType) -> MemRefType:
    return MemRefType(i64, [t.rows.data])


def ids_buffer(index: str) -> MemRefType:
    return MemRefType(IntegerType(int(index[1:])), [DYNAMIC_INDEX])


def rows_buffer(dim: int) -> MemRefType:
    return MemRefType(FLOAT_DTYPES["f32"], [DYNAMIC_INDEX, dim])


def _memref(t: Attribute, rank: int, what: str) -> MemRefType:
    if not isinstance(t, MemRefType) or len(t.get_shape()) != rank:
        raise VerifyException(f"{what} must be a rank-{rank} memref, got {t}")
    return t


class KernelOp(InferredResultsOp):
    """Kernel ops return nothing: they write their buffers in place."""

    args = var_operand_def()  # roles checked by `check`; declared once for every kernel op

    @classmethod
    def infer_result_types(cls, operand_types, attributes):
        cls.check(list(operand_types), attributes)
        return []

    @classmethod
    def check(cls, types: list[Attribute], attributes: dict[str, Attribute]) -> None:
        raise NotImplementedError

    def verify_(self) -> None:
        self.check([o.type for o in self.operands], self.attributes)


@irdl_op_definition
class UpdateOp(KernelOp):
    """A fused sparse update over explicit buffers (see upd.apply for roles)."""

    name = "kern.update"

    @classmethod
    def roles(cls, attributes: dict[str, Attribute]) -> list[str]:
        return apply_roles(attributes, ("ids", "grads"), "'kern.update' needs a known optimizer")

    @classmethod
    def check(cls, types, attributes):
        roles = cls.roles(attributes)
        if len(roles) != len(types):
            raise VerifyException(f"'kern.update' operands must be ({', '.join(roles)})")
        known = {"optimizer", "serving_layout", *APPLY_FLAGS, *APPLY_FLOATS, *APPLY_UNITS, *APPLY_INTS}
        for name in attributes:
            if name not in known:
                raise VerifyException(f"'kern.update' has no attribute '{name}'")
        by = dict(zip(roles, types))
        table = _memref(by["table"], 2, "the table buffer")
        if dtype_name(table.element_type) is None:
            raise VerifyException("the table buffer must hold f32, f16 or bf16")
        rows, dim = table.get_shape()
        ids = _memref(by["ids"], 1, "the ids buffer")
        if index_name(ids.element_type) is None:
            raise VerifyException("the ids buffer must hold i32 or i64")
        grads = _memref(by["grads"], 2, "the grads buffer")
        if grads.get_shape()[1] != dim or dtype_name(grads.element_type) != "f32":
            raise VerifyException(f"the grads buffer must be memref<?x{dim}xf32>")
        if "serving" in by:
            layout = get_string_attr(attributes, "serving_layout")
            if layout not in LAYOUTS:
                raise VerifyException("'kern.update' with a serving copy needs serving_layout")
            serving = _memref(by["serving"], 2, "the serving buffer")
            width = dim if layout in FLOAT_DTYPES else row_bytes(layout, dim)
            if serving.get_shape() != (rows, width):
                raise VerifyException(
                    f"the {layout} serving buffer must be {rows}x{width}, got {serving}"
                )
        for scalar in ("version", "step", "seed"):
            if scalar in by and by[scalar] != i64:
                raise VerifyException(f"'kern.update' {scalar} must be i64")


def get_string_attr(attributes: dict[str, Attribute], name: str) -> str | None:
    attr = attributes.get(name)
    return attr.data if isinstance(attr, StringAttr) else None


@irdl_op_definition
class BagOp(KernelOp):
    """Pooled (or plain, mode "none") lookups written into `out`."""

    name = "kern.bag"

    @classmethod
    def roles(cls, attributes: dict[str, Attribute]) -> list[str]:
        mode = get_string_attr(attributes, "mode")
        if mode not in ("sum", "mean", "none"):
            raise VerifyException("'kern.bag' needs mode = \"sum\", \"mean\" or \"none\"")
        roles = ["table", "ids"]
        if mode != "none":
            roles.append("offsets")
        if "weighted" in attributes:
            roles.append("weights")
        return roles + ["out"]

    @classmethod
    def check(cls, types, attributes):
        roles = cls.roles(attributes)
        if len(roles) != len(types):
            raise VerifyException(f"'kern.bag' operands must be ({', '.join(roles)})")
        layout = get_string_attr(attributes, "layout")
        if layout not in LAYOUTS:
            raise VerifyException("'kern.bag' needs layout = one of " + ", ".join(LAYOUTS))
        if "weighted" in attributes and not isinstance(attributes["weighted"], UnitAttr):
            raise VerifyException("'kern.bag' weighted is a unit flag")
        by = dict(zip(roles, types))
        out = _memref(by["out"], 2, "the output buffer")
        dim = out.get_shape()[1]
        table = _memref(by["table"], 2, "the table buffer")
        width = dim if layout in FLOAT_DTYPES else row_bytes(layout, dim)
        if table.get_shape()[1] != width:
            raise VerifyException(
                f"a {layout} table of dim {dim} must have rows of {width}, got {table}"
            )
        ids = _memref(by["ids"], 1, "the ids buffer")
        if index_name(ids.element_type) is None:
            raise VerifyException("the ids buffer must hold i32 or i64")


class SyncKernelOp(KernelOp):
    """kern.pack / kern.merge: rows copied between a serving copy and a packet.

    Attributes: layout, dim (int4 widths do not determine it), unit `seq`
    (a uint32 sequence word per row guards concurrent readers), partitions.
    """

    DATA: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def roles(cls, attributes: dict[str, Attribute]) -> list[str]:
        return ["serving", "versions", *(["seq"] if "seq" in attributes else []), *cls.DATA]

    @classmethod
    def check(cls, types, attributes):
        from xdsl.dialects.builtin import IntegerAttr

        for name in attributes:
            if name not in ("layout", "dim", "seq", "partitions"):
                raise VerifyException(f"'{cls.name}' has no attribute '{name}'")
        roles = cls.roles(attributes)
        if len(roles) != len(types):
            raise VerifyException(f"'{cls.name}' operands must be ({', '.join(roles)})")
        layout = get_string_attr(attributes, "layout")
        dim = attributes.get("dim")
        if layout not in LAYOUTS or not isinstance(dim, IntegerAttr) or dim.value.data < 1:
            raise VerifyException(f"'{cls.name}' needs layout = one of {', '.join(LAYOUTS)} and dim")
        by = dict(zip(roles, types))
        dim_n = dim.value.data
        width = dim_n if layout in FLOAT_DTYPES else row_bytes(layout, dim_n)
        elem = FLOAT_DTYPES.get(layout, i8)
        serving = _memref(by["serving"], 2, "the serving buffer")
        rows = serving.get_shape()[0]
        if serving.get_shape()[1] != width or serving.element_type != elem:
            raise VerifyException(f"the {layout} serving buffer must be {rows}x{width}x{elem}, got {serving}")
        if _memref(by["versions"], 1, "the versions buffer") != MemRefType(i64, [rows]):
            raise VerifyException(f"the versions buffer must be memref<{rows}xi64>")
        if "seq" in by and by["seq"] != MemRefType(IntegerType(32), [rows]):
            raise VerifyException(f"the seq buffer must be memref<{rows}xi32>")
        if index_name(_memref(by["ids"], 1, "the ids buffer").element_type) is None:
            raise VerifyException("the ids buffer must hold i32 or i64")
        packet_rows = by.get("rows", by.get("rows_out"))
        if packet_rows != MemRefType(elem, [DYNAMIC_INDEX, width]):
            raise VerifyException(f"the packet rows must be memref<?x{width}x{elem}>, got {packet_rows}")
        packet_versions = by.get("packet_versions", by.get("versions_out"))
        if packet_versions != MemRefType(i64, [DYNAMIC_INDEX]):
            raise VerifyException("the packet versions must be memref<?xi64>")
        if "newest" in by and by["newest"] != i64:
            raise VerifyException(f"'{cls.name}' newest must be i64")


@irdl_op_definition
class PackOp(SyncKernelOp):
    """Gathers the serving rows and versions of `ids` into the packet buffers."""

    name = "kern.pack"
    DATA: ClassVar[tuple[str, ...]] = ("ids", "rows_out", "versions_out")


@irdl_op_definition
class MergeOp(SyncKernelOp):
    """Writes each packet row whose version is newer than the replica's (validated first)."""

    name = "kern.merge"
    DATA: ClassVar[tuple[str, ...]] = ("ids", "rows", "packet_versions", "newest")


Kern = Dialect("kern", [UpdateOp, BagOp, PackOp, MergeOp], [])
