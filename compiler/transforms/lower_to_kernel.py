"""lower-to-kernel: from value-semantics updates to in-place kernels on buffers.

Each function over tables becomes a function over memrefs that returns
nothing: a table, state, serving copy or versions argument becomes its
buffer and is updated in place (legal because nothing reads the old value
after the update; the pass checks), a delta argument becomes two buffers
(ids, rows), and each lookup result becomes an extra output buffer argument.
`upd.apply` becomes `kern.update`, `emb.bag` / `emb.lookup` become
`kern.bag`. Unfused update ops are an error: run upd-fuse first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xdsl.context import Context
from xdsl.dialects import func
from xdsl.dialects.builtin import (
    FunctionType,
    IntegerType,
    ModuleOp,
    StringAttr,
    TensorType,
    UnitAttr,
)
from xdsl.ir import Attribute, Block, Operation, Region, SSAValue
from xdsl.passes import ModulePass
from xdsl.utils.exceptions import DiagnosticException

from ...dialects import emb, kern, sync, upd

Buffers = SSAValue | tuple[SSAValue, ...]


class LoweringError(DiagnosticException):
    """An IR shape the kernel level cannot express; names the op."""

    def __init__(self, message: str, op: Operation | None = None):
        super().__init__(message)
        self.op = op  # where ekko-opt points the diagnostic


def buffer_types(t: Attribute) -> list[Attribute]:
    """The kernel-level argument types standing for one value of type `t`."""
    if isinstance(t, emb.TableType):
        return [kern.table_buffer(t)]
    if isinstance(t, emb.StateType):
        return [kern.state_buffer(t)]
    if isinstance(t, emb.VersionsType):
        return [kern.versions_buffer(t)]
    if isinstance(t, upd.DeltaType):
        return [kern.ids_buffer(t.index.data), kern.rows_buffer(t.dim.data)]
    if isinstance(t, sync.PacketType):
        return packet_buffers(t)
    if isinstance(t, TensorType):
        from xdsl.dialects.builtin import MemRefType

        return [MemRefType(t.element_type, t.get_shape())]
    return [t]


@dataclass
class FuncLowering:
    """Rebuilds one function at the kernel level."""

    old: func.FuncOp
    block: Block
    values: dict[SSAValue, Buffers]

    @classmethod
    def start(cls, old: func.FuncOp) -> FuncLowering:
        block = Block()
        values: dict[SSAValue, Buffers] = {}
        for arg in old.body.block.args:
            types = buffer_types(arg.type)
            new = [block.insert_arg(t, len(block.args)) for t in types]
            _name(new, arg.name_hint)
            values[arg] = new[0] if len(new) == 1 else tuple(new)
        return cls(old, block, values)

    def get(self, value: SSAValue) -> SSAValue:
        mapped = self.values[value]
        assert isinstance(mapped, SSAValue)
        return mapped

    def flat(self, value: SSAValue) -> list[SSAValue]:
        mapped = self.values[value]
        return list(mapped) if isinstance(mapped, tuple) else [mapped]

    def lower(self) -> func.FuncOp:
        for op in list(self.old.body.block.ops):
            self.lower_op(op)
        types = [a.type for a in self.block.args]
        new = func.FuncOp(
            self.old.sym_name.data, FunctionType.from_lists(types, []), Region(self.block)
        )
        for name in ("sym_visibility",):
            if (value := self.old.properties.get(name)) is not None:
                new.properties[name] = value
        return new

    def lower_op(self, op: Operation) -> None:
        """The op's lowering from LOWERINGS (by its class); an unfused upd op is
        an error; anything else is cloned onto the buffers."""
        lowering = LOWERINGS.get(type(op))
        if lowering is not None:
            lowering(self, op)
        elif op.dialect_name() == "upd":
            raise LoweringError(
                f"'{op.name}' is not fused: run upd-dedup and upd-fuse before lower-to-kernel",
                op,
            )
        else:
            clone = op.clone(value_mapper={k: v for k, v in self.values.items()
                                           if isinstance(v, SSAValue)})
            self.block.add_op(clone)
            for old, new in zip(op.results, clone.results):
                self.values[old] = new

    def lower_delta(self, op: upd.DeltaOp) -> None:
        """A delta is its two buffers: ids and rows."""
        self.values[op.results[0]] = (self.get(op.ids), self.get(op.rows))

    def lower_return(self, op: func.ReturnOp) -> None:
        self.block.add_op(func.ReturnOp())

    def lower_apply(self, op: upd.ApplyOp) -> None:
        check_in_place(op)
        operands: list[SSAValue] = []
        for value in op.operands:
            operands += self.flat(value)
        attrs = op.flat()
        serving = op.serving
        if serving is not None:
            assert isinstance(serving.type, emb.TableType)
            attrs["serving_layout"] = serving.type.layout
        self.block.add_op(kern.UpdateOp.build_update(operands, attrs))
        for role, result in zip(op.result_roles(op.flat()), op.results):
            self.values[result] = self.values[op.role(role)]

    def lower_bag(self, op: emb.BagOp | emb.LookupOp) -> None:
        table = op.operands[0].type
        assert isinstance(table, emb.TableType)
        result_type = op.results[0].type
        out = self.block.insert_arg(buffer_types(result_type)[0], len(self.block.args))
        _name([out], (op.results[0].name_hint or "out") + "_out")
        attrs: dict[str, Attribute] = {"layout": table.layout}
        if isinstance(op, emb.BagOp):
            assert op.mode is not None
            attrs["mode"] = op.mode
            if op.weights is not None:
                attrs["weighted"] = UnitAttr()
        else:
            attrs["mode"] = StringAttr("none")
        if op.partitions is not None:
            attrs["partitions"] = op.partitions
        operands = [self.get(v) for v in op.operands] + [out]
        self.block.add_op(kern.BagOp.build_inferred(operands, attrs))
        self.values[op.results[0]] = out


def _name(values: list[SSAValue], hint: str | None) -> None:
    """Keep the source's names: a delta %d becomes %d_ids and %d_rows."""
    if hint is None:
        return
    if len(values) == 1:
        values[0].name_hint = hint
    else:
        for value, part in zip(values, ("ids", "rows", "versions")):
            value.name_hint = f"{hint}_{part}"


def check_in_place(op: upd.ApplyOp) -> None:
    """Updating in place is right only if no later op reads the old value."""
    block = op.parent_block()
    assert block is not None
    index = block.get_operation_index(op)
    for role in ("table", "serving", "versions", *op.entry.state_names):
        value = op.role(role)
        if value is None:
            continue
        for use in value.uses:
            user = use.operation
            if user is not op and user.parent_block() is block and block.get_operation_index(user) > index:
                raise LoweringError(
                    f"'upd.apply' updates its {role} in place, but '{user.name}' reads the "
                    "old value afterwards",
                    user,
                )


def packet_buffers(t: sync.PacketType) -> list[Attribute]:
    """A packet is three buffers: ids, rows in the serving layout, versions."""
    from xdsl.dialects.builtin import DYNAMIC_INDEX, MemRefType

    rows = sync.packet_rows_type(t.layout, t.dim.data)
    return [kern.ids_buffer(t.index.data),
            MemRefType(rows.element_type, [DYNAMIC_INDEX, rows.get_shape()[1]]),
            MemRefType(kern.i64, [DYNAMIC_INDEX])]


def lower_sync(low: FuncLowering, op: sync.PacketOp | sync.PackOp | sync.MergeOp) -> None:
    """sync.packet names its three buffers; pack gets output buffers; merge writes in place.

    A `seq` flag adds the serving copy's sequence words as a new argument
    (memref<ROWSxi32>), named after the serving copy.
    """
    from xdsl.dialects.builtin import IntegerAttr, MemRefType

    if isinstance(op, sync.PacketOp):
        low.values[op.results[0]] = tuple(low.get(v) for v in op.operands)
        return
    serving_t = op.operands[0].type
    assert isinstance(serving_t, emb.TableType)
    attrs: dict[str, Attribute] = {"layout": serving_t.layout,
                                   "dim": IntegerAttr(serving_t.dim.data, kern.i64)}
    serving, versions = low.get(op.operands[0]), low.get(op.operands[1])
    operands = [serving, versions]
    if op.seq is not None:
        attrs["seq"] = UnitAttr()
        seq = low.block.insert_arg(MemRefType(IntegerType(32), [serving_t.rows.data]),
                                   len(low.block.args))
        _name([seq], (serving.name_hint or "serving") + "_seq")
        operands.append(seq)
    if op.partitions is not None:
        attrs["partitions"] = op.partitions
    if isinstance(op, sync.PackOp):
        packet_t = op.results[0].type
        assert isinstance(packet_t, sync.PacketType)
        ids = low.get(op.operands[2])
        outs = [low.block.insert_arg(t, len(low.block.args)) for t in packet_buffers(packet_t)[1:]]
        hint = op.results[0].name_hint or "packet"
        outs[0].name_hint, outs[1].name_hint = f"{hint}_rows_out", f"{hint}_versions_out"
        low.block.add_op(kern.PackOp.build_inferred(operands + [ids, *outs], attrs))
        low.values[op.results[0]] = (ids, outs[0], outs[1])
        return
    check_sync_in_place(op)
    operands += [*low.flat(op.operands[2]), low.get(op.operands[3])]
    low.block.add_op(kern.MergeOp.build_inferred(operands, attrs))
    low.values[op.results[0]], low.values[op.results[1]] = serving, versions


def check_sync_in_place(op: sync.MergeOp) -> None:
    """A merge writes the serving copy and versions in place: nothing may read them after."""
    block = op.parent_block()
    assert block is not None
    index = block.get_operation_index(op)
    for value, role in zip(op.operands[:2], ("serving copy", "versions")):
        for use in value.uses:
            user = use.operation
            if user is not op and user.parent_block() is block and block.get_operation_index(user) > index:
                raise LoweringError(
                    f"'sync.merge' updates its {role} in place, but '{user.name}' reads the "
                    "old value afterwards",
                    user,
                )


# op class -> how FuncLowering lowers it (sync.pack and sync.merge share one)
LOWERINGS: dict[type[Operation], Callable[[FuncLowering, Any], None]] = {
    upd.DeltaOp: FuncLowering.lower_delta,
    upd.ApplyOp: FuncLowering.lower_apply,
    emb.BagOp: FuncLowering.lower_bag,
    emb.LookupOp: FuncLowering.lower_bag,
    sync.PacketOp: lower_sync,
    sync.PackOp: lower_sync,
    sync.MergeOp: lower_sync,
    func.ReturnOp: FuncLowering.lower_return,
}


def needs_lowering(f: func.FuncOp) -> bool:
    return any(
        op.dialect_name() == "upd" or isinstance(op, (emb.BagOp, emb.LookupOp))
        for op in f.body.walk()
    ) or any(buffer_types(a.type) != [a.type] for a in f.body.block.args)


@dataclass(frozen=True)
class LowerToKernelPass(ModulePass):
    name = "lower-to-kernel"

    def apply(self, ctx: Context, op: ModuleOp) -> None:
        for f in [o for o in op.body.block.ops if isinstance(o, func.FuncOp)]:
            if f.is_declaration or not needs_lowering(f):
                continue
            new = FuncLowering.start(f).lower()
            op.body.block.insert_op_before(new, f)
            op.body.block.erase_op(f, safe_erase=False)
