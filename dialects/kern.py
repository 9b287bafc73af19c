"""The `kern` dialect: the kernel level, where buffers are explicit.

Each op is one native kernel over memrefs, updated in place: "for each
unique id of a partition: load the rows it touches, vector math over the
embedding dim, store". The attributes say everything a backend needs to
emit that loop nest (see `ekko.compiler.backend.spec`), so LLVM and Triton
emitters read one op and never rediscover structure.

  kern.update %table, %state..., %ids, %grads [, %serving] [, %versions, %version]
              [, %step] [, %seed] {optimizer = "...", ...} : types ({
    ^bb0(%g: f32, %w: f32, %state...: f32, %step: f64, %hyper...: f64):
      ... arith / math ops, kern.row_sum ...
      kern.yield %new_w, %new_state... : f32, ...
  })
  kern.bag %table, %ids [, %offsets] [, %weights], %out {layout = #emb.layout<int8>, mode = "sum"}

The region of `kern.update` is the per-row math: gradient transforms and the
optimizer, traced from the catalog (`ekko.dialects.catalog`) by
`math_region`. It runs "for every element of the row" (SPMD): element values
(g, w, per-element state) are f32, `kern.row_sum` reduces one over the row,
and f64 values (the step, hyper-parameters, math on them) are the same for
the whole call. The hyper-parameters stay properties of the op (its `hyper`
dictionary); the region receives them as arguments, so one region serves
every setting.
"""

from __future__ import annotations

from typing import ClassVar

from xdsl.dialects.builtin import (
    DYNAMIC_INDEX,
    IntegerAttr,
    IntegerType,
    MemRefType,
    StringAttr,
)
from xdsl.dialects.builtin import FloatAttr, f32, f64
from xdsl.ir import Attribute, Block, Dialect, SSAValue
from xdsl.irdl import (
    AttrSizedOperandSegments,
    irdl_op_definition,
    operand_def,
    opt_operand_def,
    opt_region_def,
    var_operand_def,
)
from xdsl.parser import Parser
from xdsl.printer import Printer
from xdsl.utils.exceptions import VerifyException

from . import catalog
from .catalog import math_args, math_region
from .mathregion import MATH_OPS, RowSumOp, YieldOp
from .common import (FLOAT_DTYPES, LayoutAttr, SettingsOp, dtype_name, flag, index_name,
                     layout_setting, setting, storage_type)
from .emb import StateType, TableType, VersionsType
from .limits import MAX_DIM, MAX_PARTITIONS, limit_error
from .upd import APPLY_FLAGS, APPLY_SCHEDULE, APPLY_UNITS, FusedUpdateOp, apply_roles

i64 = IntegerType(64)


def table_buffer(t: TableType) -> MemRefType:
    """The memref holding a table: floats as rows x dim, quantized layouts as bytes."""
    return MemRefType(storage_type(t.layout.data), [t.rows.data, t.layout.entry.width(t.dim.data)])


def state_buffer(t: StateType) -> MemRefType:
    return MemRefType(FLOAT_DTYPES["f32"], [t.rows.data, t.width.data])


def versions_buffer(t: VersionsType) -> MemRefType:
    return MemRefType(i64, [t.rows.data])


def ids_buffer(index: str) -> MemRefType:
    return MemRefType(IntegerType(int(index[1:])), [DYNAMIC_INDEX])


def rows_buffer(dim: int) -> MemRefType:
    return MemRefType(FLOAT_DTYPES["f32"], [DYNAMIC_INDEX, dim])


def check_dim(op: str, dim: int, what: str) -> None:
    """A kernel's row width must be known and within MAX_DIM, as every backend needs."""
    if dim == DYNAMIC_INDEX:
        raise VerifyException(f"{what} must have a static dim")
    if (why := limit_error(f"'{op}' dim", dim, MAX_DIM)) is not None:
        raise VerifyException(f"{why} (MAX_DIM)")


def _memref(t: Attribute, rank: int, what: str) -> MemRefType:
    if not isinstance(t, MemRefType) or len(t.get_shape()) != rank:
        raise VerifyException(f"{what} must be a rank-{rank} memref, got {t}")
    return t


class KernelOp(SettingsOp):
    """Kernel ops return nothing: they write their buffers in place.

    Each declares its operands (optional ones with `opt_operand_def`) and
    settings (properties); `check` reads the flat settings, as SettingsOp
    describes, and says what is wrong in the op's own words.
    """

    @classmethod
    def infer_result_types(cls, operand_types, attributes):
        cls.check(list(operand_types), attributes)
        return []

    @classmethod
    def check(cls, types: list[Attribute], attributes: dict[str, Attribute]) -> None:
        raise NotImplementedError

    def verify_(self) -> None:
        self.check([o.type for o in self.operands], self.flat())


@irdl_op_definition
class UpdateOp(FusedUpdateOp):
    """A fused sparse update over explicit buffers (see upd.apply for roles).

    Its region is the per-row math (see the module doc); `verify_` checks it
    has the arguments the catalog's optimizer needs and only ops in MATH_OPS.
    lower-to-kernel always writes it; an op written without one (by hand)
    stands for the catalog's math, which `math_block` traces on demand.
    """

    name = "kern.update"
    table = operand_def(MemRefType)
    state = var_operand_def(MemRefType)
    ids = operand_def(MemRefType)
    grads = operand_def(MemRefType)
    serving = opt_operand_def(MemRefType)
    versions = opt_operand_def(MemRefType)
    version = opt_operand_def(i64)
    step = opt_operand_def(i64)
    seed = opt_operand_def(i64)
    serving_layout = setting(LayoutAttr, "serving_layout")
    math = opt_region_def("single_block")
    irdl_options = (AttrSizedOperandSegments(as_property=True),)

    @classmethod
    def roles(cls, attributes: dict[str, Attribute]) -> list[str]:
        return apply_roles(attributes, ("ids", "grads"), "'kern.update' needs a known optimizer")

    @classmethod
    def infer_result_types(cls, operand_types, attributes):
        cls.check(list(operand_types), attributes)
        return []

    @classmethod
    def build_update(cls, operands: list[SSAValue], attributes: dict[str, Attribute]) -> UpdateOp:
        """kern.update with its math region traced from the catalog."""
        cls.check([o.type for o in operands], attributes)
        roles = cls.roles(attributes)
        table = operands[roles.index("table")].type
        assert isinstance(table, MemRefType)
        opt = catalog.optimizer(attributes["optimizer"].data)  # type: ignore[union-attr]
        return cls.from_flat(operands, [], attributes,
                             [math_region(opt, attributes, table.get_shape()[1])])

    @classmethod
    def check(cls, types, attributes):
        roles = cls.roles(attributes)
        if len(roles) != len(types):
            raise VerifyException(f"'kern.update' operands must be ({', '.join(roles)})")
        opt = catalog.optimizer(attributes["optimizer"].data)  # type: ignore[union-attr]
        known = {"optimizer", "serving_layout", *APPLY_FLAGS, *APPLY_UNITS, *APPLY_SCHEDULE,
                 *opt.hyper_names, *catalog.GRAD_HYPER}
        for name in attributes:
            if name not in known:
                raise VerifyException(f"'kern.update' has no attribute '{name}'")
        by = dict(zip(roles, types))
        table = _memref(by["table"], 2, "the table buffer")
        if dtype_name(table.element_type) is None:
            raise VerifyException("the table buffer must hold f32, f16 or bf16")
        rows, dim = table.get_shape()
        check_dim(cls.name, dim, f"the table buffer {table}")
        for state in opt.states:
            buf = _memref(by[state.name], 2, f"the {state.name} state buffer")
            width = 1 if state.rowwise else dim
            if buf.get_shape()[1] != width:
                raise VerifyException(f"the {state.name} state buffer must have rows of "
                                      f"{width}, got {buf}")
        ids = _memref(by["ids"], 1, "the ids buffer")
        if index_name(ids.element_type) is None:
            raise VerifyException("the ids buffer must hold i32 or i64")
        grads = _memref(by["grads"], 2, "the grads buffer")
        if grads.get_shape()[1] != dim or dtype_name(grads.element_type) != "f32":
            raise VerifyException(f"the grads buffer must be memref<?x{dim}xf32>")
        if "serving" in by:
            layout = layout_setting(attributes, "serving_layout")
            if layout is None:
                raise VerifyException("'kern.update' with a serving copy needs "
                                      "serving_layout = #emb.layout<NAME>")
            serving = _memref(by["serving"], 2, "the serving buffer")
            width = layout.entry.width(dim)
            if serving.get_shape() != (rows, width):
                raise VerifyException(
                    f"the {layout.data} serving buffer must be {rows}x{width}, got {serving}"
                )
        for scalar in ("version", "step", "seed"):
            if scalar in by and by[scalar] != i64:
                raise VerifyException(f"'kern.update' {scalar} must be i64")

    def math_block(self) -> Block:
        """The math region's block; the catalog's math when the op has none."""
        if self.math is not None:
            return self.math.block
        table = self.table.type
        assert isinstance(table, MemRefType)
        return math_region(self.entry, self.flat(), table.get_shape()[1]).block

    def verify_(self) -> None:
        flat = self.flat()
        self.check([o.type for o in self.operands], flat)
        self.check_schedule()
        opt = self.entry
        for h in [*opt.hyper, *catalog.GRAD_HYPER.values()]:  # absent: the catalog's default
            attr = flat.get(h.name)
            if attr is None:
                continue
            value = attr.value.data if isinstance(attr, FloatAttr) else attr
            if (why := h.problem(value)) is not None:
                raise VerifyException(f"'kern.update' {why}")
        if self.math is None:
            return
        names = math_args(opt, flat)
        block = self.math.block
        nelem = 2 + len(opt.states)
        want = [f32] * nelem + [f64] * (len(names) - nelem)
        if [a.type for a in block.args] != want:
            raise VerifyException(
                f"'kern.update' math region must take ({', '.join(names)}) typed "
                f"({', '.join(str(t) for t in want)})")
        for op in block.ops:
            if not isinstance(op, (*MATH_OPS, RowSumOp, YieldOp)):
                raise VerifyException(f"'{op.name}' is not allowed in a math region")
        last = block.last_op
        if not isinstance(last, YieldOp) or [v.type for v in last.operands] != [f32] * (nelem - 1):
            raise VerifyException(f"'kern.update' math region must yield {nelem - 1} f32 "
                                  "values: the new weights and state")
        catalog.check_rowwise(block, opt)

    def print(self, printer: Printer) -> None:
        super().print(printer)
        if self.math is not None:
            printer.print_string(" ")
            printer.print_region(self.math, print_entry_block_args=True)

    @classmethod
    def parse(cls, parser: Parser):
        op = super().parse(parser)
        region = parser.parse_optional_region()
        operands, flat = list(op.operands), op.flat()
        op.drop_all_references()  # the op without its region is not kept
        return cls.from_flat(operands, [], flat, [region] if region is not None else [])


def get_string_attr(attributes: dict[str, Attribute], name: str) -> str | None:
    attr = attributes.get(name)
    return attr.data if isinstance(attr, StringAttr) else None


@irdl_op_definition
class BagOp(KernelOp):
    """Pooled (or plain, mode "none") lookups written into `out`.

    Operands: table, ids, [offsets] (absent for mode "none"), [weights]
    (the custom form's `weighted` flag), out.
    """

    name = "kern.bag"
    table = operand_def(MemRefType)
    ids = operand_def(MemRefType)
    offsets = opt_operand_def(MemRefType)
    weights = opt_operand_def(MemRefType)
    out = operand_def(MemRefType)
    layout = setting(LayoutAttr, "layout")  # required; optional so `check` names it
    mode = setting(StringAttr, "mode")
    partitions = setting(IntegerAttr, "partitions")
    FLAGS: ClassVar[dict[str, tuple[str, ...]]] = {"weighted": ("weights",)}
    ORDER: ClassVar[tuple[str, ...]] = ("layout", "mode", "weighted", "partitions")
    irdl_options = (AttrSizedOperandSegments(as_property=True),)

    @classmethod
    def roles(cls, attributes: dict[str, Attribute]) -> list[str]:
        mode = get_string_attr(attributes, "mode")
        if mode not in ("sum", "mean", "none"):
            raise VerifyException("'kern.bag' needs mode = \"sum\", \"mean\" or \"none\"")
        roles = ["table", "ids"]
        if mode != "none":
            roles.append("offsets")
        if flag(attributes, "weighted", ("weights",)):
            roles.append("weights")
        return roles + ["out"]

    @classmethod
    def check(cls, types, attributes):
        roles = cls.roles(attributes)
        if len(roles) != len(types):
            raise VerifyException(f"'kern.bag' operands must be ({', '.join(roles)})")
        layout = layout_setting(attributes, "layout")
        if layout is None:
            raise VerifyException("'kern.bag' needs layout = #emb.layout<NAME>")
        parts = attributes.get("partitions")
        if isinstance(parts, IntegerAttr) and not 1 <= parts.value.data <= MAX_PARTITIONS:
            raise VerifyException(
                f"'kern.bag' partitions must be 1 to {MAX_PARTITIONS}, got {parts.value.data}")
        mode = get_string_attr(attributes, "mode")
        if (why := catalog.pooling_problem(str(mode), "weights" in roles)) is not None:
            raise VerifyException(f"'kern.bag' {why}")
        by = dict(zip(roles, types))
        out = _memref(by["out"], 2, "the output buffer")
        dim = out.get_shape()[1]
        if out.element_type != f32:
            raise VerifyException(f"the output buffer must hold f32, got {out}")
        check_dim(cls.name, dim, f"the output buffer {out}")
        table = _memref(by["table"], 2, "the table buffer")
        width = layout.entry.width(dim)
        if table.get_shape()[1] != width:
            raise VerifyException(
                f"a {layout.data} table of dim {dim} must have rows of {width}, got {table}"
            )
        elem = storage_type(layout.data)
        if table.element_type != elem:
            raise VerifyException(f"a {layout.data} table buffer must hold {elem}, got {table}")
        ids = _memref(by["ids"], 1, "the ids buffer")
        if index_name(ids.element_type) is None:
            raise VerifyException("the ids buffer must hold i32 or i64")
        if "offsets" in by and _memref(by["offsets"], 1, "the offsets buffer"
                                       ).element_type != ids.element_type:
            raise VerifyException(f"the offsets buffer must hold the ids' {ids.element_type}, "
                                  f"got {by['offsets']}")
        if "weights" in by and _memref(by["weights"], 1, "the weights buffer"
                                       ).element_type != f32:
            raise VerifyException(f"the weights buffer must hold f32, got {by['weights']}")


class SyncKernelOp(KernelOp):
    """kern.pack / kern.merge: rows copied between a serving copy and a packet.

    Attributes: layout, dim (int4 widths do not determine it), unit `seq`
    (a uint32 sequence word per row guards concurrent readers), partitions.
    """

    DATA: ClassVar[tuple[str, ...]] = ()
    FLAGS: ClassVar[dict[str, tuple[str, ...]]] = {"seq": ("seq",)}
    ORDER: ClassVar[tuple[str, ...]] = ("layout", "dim", "seq", "partitions")

    layout = setting(LayoutAttr, "layout")
    dim = setting(IntegerAttr, "dim")
    partitions = setting(IntegerAttr, "partitions")

    @classmethod
    def roles(cls, attributes: dict[str, Attribute]) -> list[str]:
        return ["serving", "versions", *(["seq"] if flag(attributes, "seq", ("seq",)) else []),
                *cls.DATA]

    @classmethod
    def check(cls, types, attributes):
        from xdsl.dialects.builtin import IntegerAttr

        for name in attributes:
            if name not in ("layout", "dim", "seq", "partitions"):
                raise VerifyException(f"'{cls.name}' has no attribute '{name}'")
        roles = cls.roles(attributes)
        if len(roles) != len(types):
            raise VerifyException(f"'{cls.name}' operands must be ({', '.join(roles)})")
        layout = layout_setting(attributes, "layout")
        dim = attributes.get("dim")
        if layout is None or not isinstance(dim, IntegerAttr) or dim.value.data < 1:
            raise VerifyException(f"'{cls.name}' needs layout = #emb.layout<NAME> and dim")
        by = dict(zip(roles, types))
        dim_n = dim.value.data
        check_dim(cls.name, dim_n, "the rows")
        width = layout.entry.width(dim_n)
        elem = storage_type(layout.data)
        serving = _memref(by["serving"], 2, "the serving buffer")
        rows = serving.get_shape()[0]
        if serving.get_shape()[1] != width or serving.element_type != elem:
            raise VerifyException(f"the {layout.data} serving buffer must be {rows}x{width}x{elem}, got {serving}")
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
    serving = operand_def(MemRefType)  # xDSL orders a subclass's fields before its bases'
    versions = operand_def(MemRefType)
    seq = opt_operand_def(MemRefType)
    DATA: ClassVar[tuple[str, ...]] = ("ids", "rows_out", "versions_out")
    ids = operand_def(MemRefType)
    rows_out = operand_def(MemRefType)
    versions_out = operand_def(MemRefType)
    irdl_options = (AttrSizedOperandSegments(as_property=True),)


@irdl_op_definition
class MergeOp(SyncKernelOp):
    """Writes each packet row whose version is newer than the replica's (validated first)."""

    name = "kern.merge"
    serving = operand_def(MemRefType)  # xDSL orders a subclass's fields before its bases'
    versions = operand_def(MemRefType)
    seq = opt_operand_def(MemRefType)
    DATA: ClassVar[tuple[str, ...]] = ("ids", "rows", "packet_versions", "newest")
    ids = operand_def(MemRefType)
    rows = operand_def(MemRefType)
    packet_versions = operand_def(MemRefType)
    newest = operand_def(i64)
    irdl_options = (AttrSizedOperandSegments(as_property=True),)


Kern = Dialect("kern", [UpdateOp, BagOp, RowSumOp, YieldOp, PackOp, MergeOp], [])
