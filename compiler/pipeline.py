"""The standard pass pipelines and the Python compile API.

Users who do not write IR still go through it: `update_spec` builds the
update chain a user asked for as `upd` ops, runs the standard pipeline and
reads the resulting `kern.update` back as the spec the backend compiles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xdsl.dialects import func
from xdsl.dialects.builtin import DYNAMIC_INDEX, FunctionType, IntegerType, ModuleOp, StringAttr
from xdsl.ir import Attribute, Block, Region, SSAValue
from xdsl.passes import ModulePass, PassPipeline

from ..dialects import catalog, emb, upd
from ..dialects.common import LayoutAttr, float_attr
from .backend.spec import BagSpec, UpdateSpec
from .backend.targets import kernel_specs
from .frontend.model import ModelInvalid, UpdateRule
from .registry import PIPELINES, ekko_passes, make_context, pipeline_spec

# the standard pipeline (compiler/registry.py:PIPELINES) with every pass at its default
UPDATE_PIPELINE = pipeline_spec("standard")
i64 = IntegerType(64)
DYNAMIC = DYNAMIC_INDEX


def parse_pipeline(spec: str, callback: Callable | None = None) -> PassPipeline:
    """An `ekko-opt -p` style pipeline string, or a name from `PIPELINES`
    (`"standard"`), as a PassPipeline."""
    if spec in PIPELINES:
        spec = pipeline_spec(spec)
    return PassPipeline.parse_spec(ekko_passes(), spec, callback)


def run_pipeline(module: ModuleOp, spec: str = UPDATE_PIPELINE,
                 after_each: Callable[[str, ModuleOp], None] | None = None) -> ModuleOp:
    """Run `spec` (pass names, or a named pipeline) over `module` in place,
    verifying after every pass."""
    ctx = make_context()

    def callback(prev: ModulePass | None, mod: ModuleOp, _next: ModulePass | None) -> None:
        mod.verify()
        if prev is not None and after_each is not None:
            after_each(prev.name, mod)

    module.verify()
    parse_pipeline(spec, callback).apply(ctx, module)
    return module


_UNSET: Any = object()  # an UpdateRequest keyword the caller did not give


@dataclass(frozen=True, init=False)
class UpdateRequest:
    """One table's update as the compiler builds it, before any pass ran: the
    buffers' shape (dim, rows, dtypes, serving copy, versions), `deterministic`,
    and the `UpdateRule` (optimizer, hyper-parameters, clipping, weight decay,
    rounding) that the model's Table and `update_kernel` hold too.

    `UpdateRequest(rule, dim, ...)`; as before, `UpdateRequest("adam", dim, ...,
    hyper=..., max_norm=..., ...)` makes the rule from an optimizer name and
    those keywords (checked against the catalog's ranges).
    """

    update: UpdateRule
    dim: int
    table_dtype: str = "f32"
    index_dtype: str = "i64"
    serving: str | None = None
    versions: bool = True
    deterministic: bool = False
    rows: int = DYNAMIC

    def __init__(self, optimizer: UpdateRule | str | catalog.Optimizer | None = None,
                 dim: int | None = None, table_dtype: str = "f32", index_dtype: str = "i64",
                 serving: str | None = None, versions: bool = True,
                 stochastic_rounding: bool = _UNSET, deterministic: bool = False,
                 hyper: tuple[tuple[str, float], ...] | dict[str, float] = _UNSET,
                 max_norm: float | None = _UNSET, clip_value: float | None = _UNSET,
                 weight_decay: float = _UNSET, rows: int = DYNAMIC, *,
                 update: UpdateRule | None = None) -> None:
        given = {k: v for k, v in (("stochastic_rounding", stochastic_rounding),
                                   ("max_norm", max_norm), ("clip_value", clip_value),
                                   ("weight_decay", weight_decay)) if v is not _UNSET}
        if isinstance(optimizer, UpdateRule):
            optimizer, update = None, optimizer
        if update is not None:
            if optimizer is not None or given or hyper is not _UNSET:
                raise TypeError("UpdateRequest takes an UpdateRule, or an optimizer with its "
                                "settings, not both")
        elif optimizer is None:
            raise TypeError("UpdateRequest needs an UpdateRule or an optimizer")
        else:
            update = UpdateRule.make(optimizer, **dict(() if hyper is _UNSET else hyper), **given)
        if not isinstance(update, UpdateRule):
            raise TypeError(f"update must be an UpdateRule, got {type(update).__name__}")
        if dim is None:
            raise TypeError("UpdateRequest needs dim")
        if (why := update.dtype_problem(table_dtype)) is not None:
            raise ModelInvalid(f"{why}, got {table_dtype}", "stochastic_rounding")
        for name, value in (("update", update), ("dim", dim), ("table_dtype", table_dtype),
                            ("index_dtype", index_dtype), ("serving", serving),
                            ("versions", versions), ("deterministic", deterministic),
                            ("rows", rows)):
            object.__setattr__(self, name, value)


class _Builder:
    """Appends ops to one block, naming values the way a person would."""

    def __init__(self, block: Block):
        self.block = block

    def add(self, cls, operands: list[SSAValue], attrs: dict[str, Attribute] | None = None,
            names: tuple[str, ...] = ()):
        op = cls.build_inferred(operands, attrs or {})
        self.block.add_op(op)
        for result, name in zip(op.results, names):
            result.name_hint = name
        return op


def build_update_function(req: UpdateRequest, name: str = "update") -> func.FuncOp:
    """`func @name(table, state..., [serving], versions, ids, rows, step, seed)`:
    delta -> clip -> weight decay -> optimizer -> rounding -> requantize -> stamp,
    as `req.update` asks."""
    rule = req.update
    opt = rule.optimizer.entry
    opt_cls, opt_attrs = upd.optimizer_op(rule.optimizer.kind)
    table_t = emb.TableType(req.rows, req.dim, req.table_dtype)
    arg_types: list[Attribute] = [table_t] + [
        emb.StateType(req.rows, 1 if s.rowwise else req.dim) for s in opt.states]
    names = ["table", *opt.state_names]
    if req.serving is not None:
        arg_types.append(emb.TableType(req.rows, req.dim, req.serving))
        names.append("serving")
    if req.versions:
        arg_types.append(emb.VersionsType(req.rows))
        names.append("versions")
    arg_types += [emb.ids_type(req.index_dtype), emb.rows_type(req.dim), i64, i64, i64]
    names += ["ids", "rows", "step", "version", "seed"]
    block = Block(arg_types=arg_types)
    for arg, hint in zip(block.args, names):
        arg.name_hint = hint
    args = dict(zip(names, block.args))
    b = _Builder(block)
    delta = b.add(upd.DeltaOp, [args["ids"], args["rows"]], names=("delta",)).results[0]
    grad = delta
    if rule.max_norm is not None or rule.clip_value is not None:
        attrs = {k: float_attr(v) for k, v in (("max_norm", rule.max_norm),
                                                ("clip_value", rule.clip_value)) if v is not None}
        grad = b.add(upd.ClipOp, [grad], attrs, ("clipped",)).results[0]
    if rule.weight_decay:
        grad = b.add(upd.WeightDecayOp, [grad, args["table"]],
                     {"decay": float_attr(rule.weight_decay)}, ("decayed",)).results[0]
    operands = [args["table"], *[args[s] for s in opt.state_names], grad]
    if opt.uses_step:
        operands.append(args["step"])
    hyper = opt_attrs | {k: float_attr(v) for k, v in rule.optimizer.hyper}
    step = b.add(opt_cls, operands, hyper, ("new_table", *[f"new_{s}" for s in opt.state_names]))
    results = list(step.results)
    if rule.stochastic_rounding:
        results[0] = b.add(upd.StochasticRoundOp, [results[0], args["seed"]], names=("rounded",)).results[0]
    if req.serving is not None:
        results.append(b.add(upd.RequantizeOp, [results[0], args["serving"], delta],
                             names=("new_serving",)).results[0])
    if req.versions:
        results.append(b.add(upd.StampOp, [args["versions"], delta, args["version"]],
                             names=("new_versions",)).results[0])
    block.add_op(func.ReturnOp(*results))
    ftype = FunctionType.from_lists(arg_types, [r.type for r in results])
    return func.FuncOp(name, ftype, Region(block))


def update_module(req: UpdateRequest) -> ModuleOp:
    return ModuleOp([build_update_function(req)])


def update_spec(req: UpdateRequest, partitions: int = 0, target: str = "llvm") -> UpdateSpec:
    """Compile a request through the standard pipeline to the kernel's spec, scheduled
    for the named target (`targets.TARGETS`)."""
    module = update_module(req)
    run_pipeline(module, pipeline_spec("standard", deterministic=req.deterministic,
                                       partitions=partitions, target=target))
    (_, spec), = kernel_specs(module)
    assert isinstance(spec, UpdateSpec)
    return spec


def bag_module(dim: int, layout: str, index_dtype: str, mode: str, weighted: bool) -> ModuleOp:
    """`func @lookup(table, ids[, offsets][, weights]) -> rows` as emb ops."""
    table_t = emb.TableType(DYNAMIC, dim, layout)
    ids_t = emb.ids_type(index_dtype)
    arg_types: list[Attribute] = [table_t, ids_t]
    if mode != "none":
        arg_types.append(ids_t)
    if weighted:
        from xdsl.dialects.builtin import TensorType, f32

        arg_types.append(TensorType(f32, [DYNAMIC_INDEX]))
    block = Block(arg_types=arg_types)
    b = _Builder(block)
    if mode == "none":
        op = b.add(emb.LookupOp, list(block.args), names=("rows",))
    else:
        op = b.add(emb.BagOp, list(block.args), {"mode": StringAttr(mode)}, ("pooled",))
    block.add_op(func.ReturnOp(op.results[0]))
    ftype = FunctionType.from_lists(arg_types, [op.results[0].type])
    return ModuleOp([func.FuncOp("lookup", ftype, Region(block))])


def bag_spec(dim: int, layout: str = "f32", index_dtype: str = "i64", mode: str = "sum",
             weighted: bool = False, partitions: int = 0) -> BagSpec:
    """Compile a pooled lookup through the pipeline to the kernel's spec."""
    module = bag_module(dim, layout, index_dtype, mode, weighted)
    run_pipeline(module, pipeline_spec("standard", partitions=partitions))
    (_, spec), = kernel_specs(module)
    assert isinstance(spec, BagSpec)
    return spec


def sync_module(kind: str, dim: int, layout: str, index_dtype: str = "i64", seq: bool = False,
                partitions: int = 0) -> ModuleOp:
    """`func @pack(serving, versions, ids) -> packet` or
    `func @merge(serving, versions, ids, rows, versions, newest) -> (serving, versions)`."""
    from ..dialects import sync
    from xdsl.dialects.builtin import IntegerAttr, UnitAttr

    serving_t = emb.TableType(DYNAMIC, dim, layout)
    attrs: dict[str, Attribute] = {"seq": UnitAttr()} if seq else {}
    if partitions:
        attrs["partitions"] = IntegerAttr(partitions, i64)
    if kind == "pack":
        arg_types: list[Attribute] = [serving_t, emb.VersionsType(DYNAMIC), emb.ids_type(index_dtype)]
    else:
        arg_types = [serving_t, emb.VersionsType(DYNAMIC), emb.ids_type(index_dtype),
                     sync.packet_rows_type(layout, dim), emb.ids_type("i64"), i64]
    block = Block(arg_types=arg_types)
    for arg, hint in zip(block.args, ("serving", "versions", "ids", "rows", "packet_versions",
                                      "newest")):
        arg.name_hint = hint
    b = _Builder(block)
    a = list(block.args)
    if kind == "pack":
        results = list(b.add(sync.PackOp, a, attrs, ("packet",)).results)
    else:
        shape = {"layout": LayoutAttr(layout), "dim": IntegerAttr(dim, i64)}
        packet = b.add(sync.PacketOp, a[2:5], shape, ("packet",)).results[0]
        results = list(b.add(sync.MergeOp, [a[0], a[1], packet, a[5]], attrs,
                             ("new_serving", "new_versions")).results)
    block.add_op(func.ReturnOp(*results))
    ftype = FunctionType.from_lists(arg_types, [r.type for r in results])
    return ModuleOp([func.FuncOp(kind, ftype, Region(block))])


def _sync_spec(kind: str, dim: int, layout: str, index_dtype: str, seq: bool, partitions: int):
    """Build the sync function, run the standard pipeline, read the kernel's spec back."""
    from .transforms.upd_schedule import default_partitions

    module = sync_module(kind, dim, layout, index_dtype, seq, partitions or default_partitions())
    run_pipeline(module, UPDATE_PIPELINE)
    (_, spec), = kernel_specs(module)
    return spec


def pack_spec(dim: int, layout: str = "f32", index_dtype: str = "i64", seq: bool = False,
              partitions: int = 0):
    """Compile a replica-sync pack (the rows a step touched -> a packet) to its spec."""
    return _sync_spec("pack", dim, layout, index_dtype, seq, partitions)


def merge_spec(dim: int, layout: str = "f32", index_dtype: str = "i64", seq: bool = False,
               partitions: int = 0):
    """Compile a newest-version-wins merge of a packet into a serving copy to its spec."""
    return _sync_spec("merge", dim, layout, index_dtype, seq, partitions)
