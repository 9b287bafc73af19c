"""A compiled model: its IR, its native kernels and, on request, its tables.

`compile_model` takes a `.ekko` file, a `module.py:factory` torch model or a
`Model`, lowers the model-level IR through the standard pipeline and builds
one native kernel per distinct kernel spec (26 tables with the same dim and
optimizer share one update kernel). `materialize()` allocates the tables,
their optimizer state, serving copies and versions in memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..compiler.backend.spec import BagSpec, UpdateSpec
from ..compiler.backend.targets import exports, kernel_specs
from ..compiler.frontend import Model, load_model
from ..compiler.frontend.model import Feature, Table
from ..compiler.frontend_to_ir import (model_symbols, model_to_module, serving_layout,
                                       update_request)
from ..compiler.pipeline import run_pipeline
from ..compiler.registry import PIPELINES, pipeline_spec
from ..dialects import catalog
from .arrays import index_array, is_torch
from .errors import EkkoError, NonFiniteOutputError, UpdateError
from .lookup import BagKernel, LookupError
from .quant import quantize_rows
from .update import UpdateKernel

# the model-level IR, then the module after each pass of the standard pipeline
STAGES = ("model", *PIPELINES["standard"])


def model_pipeline(partitions: int = 0) -> str:
    """The standard pipeline (compiler/registry.py:PIPELINES), as update_kernel runs it."""
    return pipeline_spec("standard", partitions=partitions)


@dataclass
class TableBuffers:
    """The live arrays of one table: master, optimizer state, serving copy, versions."""

    table: Table
    master: np.ndarray
    state: Any
    serving: np.ndarray | None
    versions: np.ndarray
    step: int = 0

    @property
    def nbytes(self) -> int:
        arrays = [self.master, self.versions]
        arrays += list(self.state) if isinstance(self.state, tuple) else [self.state]
        if self.serving is not None:
            arrays.append(self.serving)
        return sum(a.nbytes for a in arrays if a is not None)

    @property
    def lookup_table(self) -> np.ndarray:
        """What lookups read: the serving copy, or the master when there is none."""
        return self.serving if self.serving is not None else self.master


@dataclass
class CompiledModel:
    """The result of compile_model; see the module docstring."""

    model: Model
    ir: dict[str, str]
    update_specs: dict[str, UpdateSpec]
    bag_specs: dict[str, BagSpec]
    update_kernels: dict[str, UpdateKernel]
    lookup_kernels: dict[str, BagKernel]
    pipeline: str
    compile_seconds: float
    tables: dict[str, TableBuffers] = field(default_factory=dict)

    def table(self, name: str) -> Table:
        """The table called `name` (EkkoError naming the tables if none is)."""
        for t in self.model.tables:
            if t.name == name:
                return t
        raise EkkoError(self._unknown("table", name))

    def feature(self, name: str) -> Feature:
        """The feature called `name` (EkkoError naming the features if none is)."""
        for f in self.model.features:
            if f.name == name:
                return f
        raise EkkoError(self._unknown("feature", name))

    def _unknown(self, kind: str, name: object) -> str:
        """Why `name` is no table (or feature) of this model, with the valid names; a
        feature's name where a table's belongs (or the reverse) says which it is."""
        m = self.model
        tables, features = [t.name for t in m.tables], [f.name for f in m.features]
        message = f"model {m.name} has no {kind} {name!r}"
        if kind == "feature" and name in tables:
            readers = [f.name for f in m.features_of(str(name))]
            return message + (f": that is a table; its features are {', '.join(readers)}"
                              if readers else ": that is a table, and no feature reads it")
        if kind == "table" and name in features:
            return message + f": that is a feature; it reads table {self.feature(str(name)).table}"
        valid = tables if kind == "table" else features
        return message + f" ({kind}s: {', '.join(valid) or 'none'})"

    def _buffers(self, table: str, error: type[EkkoError]) -> TableBuffers:
        """The live arrays of `table`, or `error` saying why there are none."""
        buf = self.tables.get(table) if isinstance(table, str) else None
        if buf is not None:
            return buf
        if not self.tables:
            raise error(f"model {self.model.name} has no tables in memory yet: call "
                        "materialize() first")
        raise error(self._unknown("table", table))

    def materialize(self, seed: int = 0) -> CompiledModel:
        """Allocate and initialize every table (uniform(-1/sqrt(rows), +), as DLRM)."""
        rng = np.random.default_rng(seed)
        for t in self.model.tables:
            self.tables[t.name] = init_table(t, self.update_specs[t.name], rng,
                                             self.update_kernels.get(t.name))
        return self

    def load_table(self, table: str, weights: Any) -> None:
        """Start `table` from trained weights, (rows, dim) floats (an array or a CPU tensor,
        e.g. an nn.EmbeddingBag's weight): its master rows and serving copy; the optimizer
        state starts empty. Load before an Engine is built on the model (the replicas copy
        the tables when it starts). Bad weights raise EkkoError; nothing is written."""
        if not self.tables:
            self.materialize()
        buf = self._buffers(table, EkkoError)
        t = buf.table
        w = weights.detach().cpu().numpy() if is_torch(weights) else np.asarray(weights)
        if w.dtype.kind != "f" or w.shape != (t.rows, t.dim):
            raise EkkoError(f"table {table}: weights must be floats of shape ({t.rows}, {t.dim}), "
                            f"got {w.dtype} {w.shape}")
        w32 = np.ascontiguousarray(w, np.float32)
        if not np.isfinite(w32).all():
            raise EkkoError(f"table {table}: weights hold a non-finite value")
        buf.master[...] = _as_dtype(w32, t.dtype)
        spec = self.update_specs[table]
        serving = _serving_copy(t, spec, self.update_kernels.get(table), buf.master, w32,
                                buf.state, buf.versions)
        if serving is not None:
            buf.serving[...] = serving

    def update(self, table: str, ids, grads, *, step: int | None = None,
               version: int | None = None, seed: int = 0) -> None:
        """Apply one delta to `table` in place (step counts from 1 per table); `ids`
        may also be a list (see `index_array`). A refused call leaves the step."""
        buf = self._buffers(table, UpdateError)
        ids = _ids("ids", ids, UpdateError)
        step = buf.step + 1 if step is None else step
        try:
            self.update_kernels[table](
                buf.master, ids, grads, state=buf.state, serving=buf.serving,
                versions=buf.versions, step=step, version=version, seed=seed,
            )
        except NonFiniteOutputError as e:
            raise e.in_table(table) from None
        buf.step = step

    def lookup(self, feature: str, ids, offsets=None, per_sample_weights=None, out=None):
        """Serve one feature: pooled bags (or rows for pooling none) as f32; `ids`
        and `offsets` may also be lists (see `index_array`)."""
        f = next((f for f in self.model.features if f.name == feature), None)
        if f is None:
            raise LookupError(self._unknown("feature", feature))
        buf = self._buffers(f.table, LookupError)
        ids = _ids("ids", ids, LookupError)
        offsets = None if offsets is None else _ids("offsets", offsets, LookupError)
        return self.lookup_kernels[feature](
            buf.lookup_table, ids, offsets, per_sample_weights=per_sample_weights, out=out
        )

    def function_specs(self) -> dict[str, UpdateSpec | BagSpec]:
        """The kernel spec behind each IR function (`@update_<table>`, `@serve_<feature>`,
        as `model_symbols` names them), update functions first."""
        symbols = model_symbols(self.model)
        specs: dict[str, UpdateSpec | BagSpec] = {
            symbols.updates[name]: spec for name, spec in self.update_specs.items()}
        specs.update((symbols.serves[name], spec) for name, spec in self.bag_specs.items())
        return specs

    def manifest(self) -> dict[str, Any]:
        """Tables, kernels and their signatures, and the pipeline: for `ekko compile`."""
        kernels: dict[str, Any] = {}
        symbols = model_symbols(self.model)
        for function, spec in self.function_specs().items():
            kernels.setdefault(spec.key(), {"spec": _spec_entry(spec), "exports": _exports(spec),
                                            "used_by": []})
            kernels[spec.key()]["used_by"].append(function)
        return {
            "model": self.model.name,
            "pipeline": self.pipeline,
            "tables": [_table_entry(t, self.update_specs[t.name], symbols.updates[t.name])
                       for t in self.model.tables],
            "features": [
                {"name": f.name, "table": f.table, "pooling": f.pooling,
                 "kernel": symbols.serves[f.name]} for f in self.model.features
            ],
            "kernels": [{"id": i, **v, "exports": [_prefixed(e, f"k{i}_") for e in v["exports"]]}
                        for i, v in enumerate(kernels.values())],
            "compile_seconds": round(self.compile_seconds, 4),
        }


def _ids(name: str, x: Any, error: type[EkkoError]) -> Any:
    """Arrays go to the kernels as they are (never copied, their dtype checked there);
    a list, tuple or range becomes the int64 array of its values."""
    if isinstance(x, np.ndarray) or is_torch(x):
        return x
    return index_array(name, x, error)


def _spec_entry(spec: Any) -> dict[str, Any]:
    """A spec as JSON: its fields, the math program as its text."""
    entry = {k: v for k, v in asdict(spec).items() if k != "math"}
    if isinstance(spec, UpdateSpec):
        entry["hyper"] = dict(spec.hyper)
        entry["math"] = spec.math.text()
    return entry


def _prefixed(export: dict[str, Any], prefix: str) -> dict[str, Any]:
    """An export as `ekko compile` writes it: each kernel's symbols carry its own
    prefix (k<id>_), so the object files of one model link together."""
    name = export["symbol"]
    return {**export, "symbol": prefix + name, "c": export["c"].replace(f" {name}(", f" {prefix}{name}(")}


def _exports(spec: Any) -> list[dict[str, Any]]:
    """The functions the kernel's object code exports, with their C signatures."""
    return [sig.as_dict() for sig in exports(spec)]


def _table_entry(t: Table, spec: UpdateSpec, function: str) -> dict[str, Any]:
    return {
        "name": t.name, "rows": t.rows, "dim": t.dim, "dtype": t.dtype,
        "serving": t.serving, "optimizer": t.update.optimizer.kind,
        "hyper": dict(t.update.optimizer.hyper), "update_kernel": function,
        "state": list(spec.state_shapes),
    }


def init_table(t: Table, spec: UpdateSpec, rng: np.random.Generator,
               kernel: UpdateKernel | None = None) -> TableBuffers:
    """Fill a table; the serving copy is made by the table's own update kernel when it can.

    f32 random numbers are drawn in place (float64 draws cost twice the time),
    and the serving rows come from the compiled kernel run with zero gradients
    (a no-op on master and state that re-makes every serving row natively, in
    parallel), which is several times faster than quantizing in numpy.
    """
    bound = np.float32(1.0 / np.sqrt(t.rows))
    master32 = rng.random((t.rows, t.dim), dtype=np.float32)
    master32 *= 2 * bound
    master32 -= bound
    master = _as_dtype(master32, t.dtype)
    states = [np.zeros(spec.entry.state_shape(name, t.rows, t.dim), np.float32)
              for name in spec.state_shapes]
    state: Any = None if not states else states[0] if len(states) == 1 else tuple(states)
    versions = np.zeros(t.rows, np.int64)
    serving = _serving_copy(t, spec, kernel, master, master32, state, versions)
    return TableBuffers(t, master, state, serving, versions)


def _serving_copy(t: Table, spec: UpdateSpec, kernel: UpdateKernel | None, master: np.ndarray,
                  master32: np.ndarray, state: Any, versions: np.ndarray) -> np.ndarray | None:
    """The serving rows of `master` (None without a serving layout)."""
    if spec.serving is None:
        return None
    rule = t.update
    if kernel is not None and rule.optimizer.entry.idle_at_zero and not rule.weight_decay:
        serving = _serving_by_kernel(kernel, spec, master, state, versions)
    else:  # weight decay would move the master even with zero gradients
        serving = quantize_rows(master32, spec.serving)
    assert serving.shape == (t.rows, catalog.layout(spec.serving).width(t.dim))
    return serving


INIT_CHUNK = 1 << 16  # rows per zero-gradient call


def _serving_by_kernel(kernel: UpdateKernel, spec: UpdateSpec, master: np.ndarray, state: Any,
                       versions: np.ndarray) -> np.ndarray:
    """The serving copy of `master`, re-made by the update kernel with zero gradients."""
    rows = master.shape[0]
    layout = catalog.layout(spec.serving)
    serving = np.empty((rows, layout.width(spec.dim)), layout.storage.np_dtype)
    zeros = np.zeros((min(rows, INIT_CHUNK), spec.dim), np.float32)
    for lo in range(0, rows, INIT_CHUNK):
        ids = np.arange(lo, min(lo + INIT_CHUNK, rows), dtype=np.int64 if spec.index_dtype == "i64" else np.int32)
        kernel(master, ids, zeros[:len(ids)], state=state, serving=serving, versions=versions,
               step=1, version=0)
    return serving


def _as_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "f32":
        return x
    return quantize_rows(x, dtype)


def compile_model(
    source: str | Path | Model,
    *,
    scale: float = 1.0,
    partitions: int = 0,
    keep_ir: bool = True,
    progress: Callable[[str], None] | None = None,
) -> CompiledModel:
    """Compile a model from source to native kernels (see the module docstring)."""
    start = time.perf_counter()
    say = progress or (lambda _msg: None)
    model = source if isinstance(source, Model) else load_model(str(source), scale=scale)
    say(f"parsed {model.name}: {len(model.tables)} tables, {len(model.features)} features")
    module = model_to_module(model)
    ir: dict[str, str] = {"model": str(module)} if keep_ir else {}
    pipeline = model_pipeline(partitions)

    def after(name: str, mod) -> None:
        if keep_ir:
            ir[name] = str(mod)

    run_pipeline(module, pipeline, after)
    say(f"lowered through {pipeline}")
    symbols = model_symbols(model)
    table_of = {sym: name for name, sym in symbols.updates.items()}
    feature_of = {sym: name for name, sym in symbols.serves.items()}
    update_specs: dict[str, UpdateSpec] = {}
    bag_specs: dict[str, BagSpec] = {}
    for fname, spec in kernel_specs(module):
        if isinstance(spec, UpdateSpec):
            update_specs[table_of[fname]] = spec
        else:
            bag_specs[feature_of[fname]] = spec
    built: dict[str, Any] = {}

    def kernel(spec):
        if spec.key() not in built:
            built[spec.key()] = UpdateKernel(spec) if isinstance(spec, UpdateSpec) else BagKernel(spec)
        return built[spec.key()]

    updates = {name: kernel(s) for name, s in update_specs.items()}
    lookups = {name: kernel(s) for name, s in bag_specs.items()}
    say(f"built {len(built)} native kernels")
    return CompiledModel(model, ir, update_specs, bag_specs, updates, lookups, pipeline,
                         time.perf_counter() - start)


__all__ = ["CompiledModel", "TableBuffers", "compile_model", "serving_layout", "update_request"]
