"""From kernel-level ops to backend specs and native code.

`update_spec` / `bag_spec` / `sync_spec` read a kernel op into the spec a
backend consumes; `Target` is what a backend is to every part of ekko, and
`emit_module` is ekko-opt's `-t NAME`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import IO

from xdsl.dialects.builtin import IntAttr, IntegerAttr, MemRefType, ModuleOp

from ...dialects import catalog, kern
from ...dialects.common import dtype_name, index_name, settings
from . import abi
from .mathprog import program_of
from .spec import BagSpec, MergeSpec, PackSpec, UpdateSpec


def _int(op: kern.KernelOp | kern.UpdateOp, name: str, default: int) -> int:
    attr = settings(op).get(name)
    if isinstance(attr, IntegerAttr):
        return int(attr.value.data)
    if isinstance(attr, IntAttr):
        return attr.data
    return default


def update_spec(op: kern.UpdateOp) -> UpdateSpec:
    """The UpdateSpec a `kern.update` op stands for (its region read as a MathProgram)."""
    table = op.table.type
    ids = op.ids.type
    assert isinstance(table, MemRefType) and isinstance(ids, MemRefType)
    opt = op.entry
    names = catalog.math_args(opt, op.flat())
    given = op.hyper_values()
    hyper = tuple((k, given.get(k, opt.defaults().get(k))) for k in names[3 + len(opt.states):])
    serving = op.serving_layout
    return UpdateSpec(
        optimizer=opt.name,
        dim=table.get_shape()[1],
        math=program_of(op),
        hyper=hyper,
        table_dtype=dtype_name(table.element_type) or "f32",
        index_dtype=index_name(ids.element_type) or "i64",
        serving=serving.data if serving is not None and op.serving is not None else None,
        versions=op.versions is not None,
        dedup=op.dedup is not None,
        stochastic_rounding=op.stochastic_rounding is not None,
        order=op.order.data if op.order is not None else "input",
        partitions=_int(op, "partitions", 1),
        tile=_int(op, "tile", 0),
        prefetch=_int(op, "prefetch", 0),
        block_rows=_int(op, "block_rows", 0),
        num_warps=_int(op, "num_warps", 0),
    )


def bag_spec(op: kern.BagOp) -> BagSpec:
    """The BagSpec a `kern.bag` op stands for."""
    out, ids = op.out.type, op.ids.type
    assert isinstance(out, MemRefType) and isinstance(ids, MemRefType)
    assert op.layout is not None and op.mode is not None
    return BagSpec(
        dim=out.get_shape()[1],
        layout=op.layout.data,
        index_dtype=index_name(ids.element_type) or "i64",
        mode=op.mode.data,
        weighted=op.weights is not None,
        partitions=_int(op, "partitions", 1),
    )


def sync_spec(op: kern.PackOp | kern.MergeOp) -> PackSpec | MergeSpec:
    """The PackSpec / MergeSpec a `kern.pack` / `kern.merge` op stands for."""
    ids = op.ids.type
    assert isinstance(ids, MemRefType) and op.layout is not None
    cls = PackSpec if isinstance(op, kern.PackOp) else MergeSpec
    return cls(dim=_int(op, "dim", 1), layout=op.layout.data,
               index_dtype=index_name(ids.element_type) or "i64", seq=op.seq is not None,
               partitions=_int(op, "partitions", 1))


def kernel_specs(module: ModuleOp) -> list[tuple[str, UpdateSpec | BagSpec | PackSpec | MergeSpec]]:
    """(function name, spec) for every kernel op, in module order."""
    from xdsl.dialects.func import FuncOp

    specs: list[tuple[str, UpdateSpec | BagSpec | PackSpec | MergeSpec]] = []
    for op in module.walk():
        if isinstance(op, (kern.UpdateOp, kern.BagOp, kern.PackOp, kern.MergeOp)):
            parent = op.parent_op()
            name = parent.sym_name.data if isinstance(parent, FuncOp) else "kernel"
            if isinstance(op, (kern.PackOp, kern.MergeOp)):
                spec = sync_spec(op)
            else:
                spec = update_spec(op) if isinstance(op, kern.UpdateOp) else bag_spec(op)
            specs.append((name, spec))
    return specs


Spec = UpdateSpec | BagSpec | PackSpec | MergeSpec


def exports(spec: Spec) -> list[abi.Signature]:
    """The functions a kernel's native code exports, as the ABI declares them."""
    if isinstance(spec, UpdateSpec):
        sigs = [abi.update_dedup(spec.index_dtype),
                abi.update_apply(len(spec.states), spec.index_dtype, spec.unique_ids),
                abi.update_undo(len(spec.states))]
    elif isinstance(spec, BagSpec):
        sigs = [abi.bag(False), abi.bag(True)]
    elif isinstance(spec, PackSpec):
        sigs = [abi.sync_pack()]
    else:
        sigs = [abi.merge_check(), abi.merge_apply()]
    return sigs + [abi.packed(s) for s in sigs]


@dataclass(frozen=True)
class Target:
    """A backend, as the compiler knows it: how it schedules and emits a kernel spec.

    This is the one contract every part dispatches through by the target's
    name: upd-schedule writes `launch(dim)` on each update (`ekko-opt -p
    'upd-schedule{target=NAME}'`), `schedule` fills what a spec leaves
    unchosen, `ekko-opt -t NAME` prints `emit` of every kernel op, and the
    runtime registered under the same name in `ekko.kernels.backends` loads
    what `emit` returns and calls it (`update_kernel(..., target=NAME)`,
    `bag_kernel`, `ekko compile --target NAME`). Adding a backend is one
    entry in TARGETS plus one in `ekko.kernels.backends.RUNTIMES`.
    """

    name: str
    emit: Callable[[Spec], str]
    comment: str  # how the target's source writes a line comment
    kinds: tuple[type, ...]  # the spec kinds it compiles; others run on the LLVM target
    # the launch settings upd-schedule writes on an update of a table of this dim
    launch: Callable[[int], dict[str, int]] = lambda dim: {}

    def compiles(self, spec: Spec) -> bool:
        """Whether this target has its own code for the spec's kind of kernel."""
        return isinstance(spec, self.kinds)

    def schedule(self, spec: Spec) -> Spec:
        """The spec with every launch setting it leaves 0 chosen as upd-schedule would."""
        if not isinstance(spec, UpdateSpec):
            return spec
        chosen = {k: v for k, v in self.launch(spec.dim).items() if not getattr(spec, k)}
        return replace(spec, **chosen) if chosen else spec


def _llvm() -> Target:
    from .llvm_bag import emit_bag
    from .llvm_sync import emit_sync
    from .llvm_update import cpu_launch, emit_update

    def emit(spec: Spec) -> str:
        if isinstance(spec, (PackSpec, MergeSpec)):
            return emit_sync(spec)
        return emit_update(spec) if isinstance(spec, UpdateSpec) else emit_bag(spec)

    return Target("llvm", emit, ";", (UpdateSpec, BagSpec, PackSpec, MergeSpec), cpu_launch)


def _triton() -> Target:
    from .triton_bag import emit_bag
    from .triton_update import emit_update, gpu_launch

    def emit(spec: Spec) -> str:
        if isinstance(spec, (PackSpec, MergeSpec)):
            return "# replica sync (pack/merge) runs on the LLVM target\n"
        return emit_update(spec) if isinstance(spec, UpdateSpec) else emit_bag(spec)

    return Target("triton", emit, "#", (UpdateSpec, BagSpec), gpu_launch)


# name -> factory (lazy: a target's imports are paid only when it is used)
TARGETS: dict[str, Callable[[], Target]] = {"llvm": _llvm, "triton": _triton}


def target(name: str) -> Target:
    """The target of that name; ValueError naming the known ones otherwise."""
    if not isinstance(name, str) or name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; expected one of {', '.join(TARGETS)}")
    return TARGETS[name]()


def emit_module(name: str, module: ModuleOp, out: IO[str]) -> None:
    """ekko-opt -t NAME: the target source of every kernel op, one unit each."""
    t = target(name)
    specs = kernel_specs(module)
    if not specs:
        out.write(f"{t.comment} no kernel ops: run lower-to-kernel first\n")
    for fname, spec in specs:
        out.write(f"{t.comment} ekko kernel for @{fname}: {spec.key()}\n")
        out.write(t.emit(spec))
        out.write("\n")
