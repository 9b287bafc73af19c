"""Build a kernel for a target: `update_kernel` and `bag_kernel`, ekko's kernel API.

Each asks the compiler for the spec (through the IR pipeline, scheduled for
the target), then the target's runtime (`backends.backend`) to load it.
`optimizer` and `optimizers` are the catalog as update_kernel sees it.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from ..compiler.backend.spec import BagSpec
from ..compiler.frontend.model import UpdateRule
from ..compiler.pipeline import UpdateRequest, bag_spec, update_spec
from ..dialects import catalog
from ..dialects.limits import MAX_DIM, limit_error
from .backends import BagRuntime, UpdateRuntime, backend
from .errors import LookupError, OptimizerError, UpdateError


def update_kernel(optimizer: str | catalog.Optimizer | UpdateRule, dim: int,
                  table_dtype: str = "f32", index_dtype: str = "i64", serving: str | None = None, *,
                  stochastic_rounding: bool = False, threads: int | None = None,
                  deterministic: bool = False, betas: tuple[float, float] | None = None,
                  weight_decay: float = 0.0, max_norm: float | None = None,
                  clip_value: float | None = None, target: str = "llvm",
                  **hyper: float) -> UpdateRuntime:
    """Compile a fused sparse update through the IR pipeline (the call: ekko.kernels.update).

    `optimizer` is a catalog name (`ekko.optimizers()`) or an optimizer made
    with `@ekko.optimizer`; its hyper-parameters are keywords (`lr`, `eps`,
    ...; `betas` sets Adam's beta1 and beta2 as torch does), defaults from
    the catalog. With `stochastic_rounding`, `weight_decay`, `max_norm` and
    `clip_value` they make one `UpdateRule`, the object a model's table holds
    (`optimizer` may be such a rule, e.g. `model.table("t").update`, instead of
    the keywords). `threads` is the number of partitions (default: one per
    core); `deterministic` sums duplicate ids of an SGD delta too, fixing the
    float summation order. `target="triton"` compiles for the GPU instead
    (torch tensors on a CUDA device; see ekko.kernels.triton_runtime).
    """
    t, runtime = backend(target, UpdateError)
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
        raise UpdateError(f"dim must be an integer, got {dim!r}")
    if (why := limit_error("dim", int(dim), MAX_DIM)) is not None:
        raise UpdateError(f"cannot build this update: {why} (MAX_DIM, dialects/limits.py)")
    dim = int(dim)
    if betas is not None:
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise UpdateError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        name = getattr(optimizer, "name", optimizer)
        entry = catalog.OPTIMIZERS.get(name) if isinstance(name, str) else None
        if entry is not None and (why := entry.hyper_problem("beta1")) is not None:
            raise UpdateError(f"cannot build this update: betas sets beta1 and beta2: {why}")
        hyper["beta1"], hyper["beta2"] = betas
    try:
        if isinstance(optimizer, UpdateRule):
            given = {k for k, v in (("stochastic_rounding", stochastic_rounding),
                                    ("weight_decay", weight_decay), ("max_norm", max_norm),
                                    ("clip_value", clip_value)) if v} | set(hyper)
            if given:
                raise ValueError(f"an UpdateRule holds every setting; {sorted(given)[0]} "
                                 "cannot be given beside it")
            rule = optimizer
        else:
            rule = _rule(optimizer, hyper, stochastic_rounding=stochastic_rounding,
                         weight_decay=weight_decay, max_norm=max_norm, clip_value=clip_value)
        req = UpdateRequest(rule, dim, table_dtype, index_dtype, serving,
                            deterministic=deterministic)
        spec = update_spec(req, partitions=threads or 0, target=t.name)
    except (KeyError, ValueError, TypeError) as e:
        raise UpdateError(f"cannot build this update: {e}") from None
    except Exception as e:  # xDSL's verifier: the request itself is wrong
        if type(e).__name__ in ("VerifyException", "DiagnosticException"):
            raise UpdateError(f"cannot build this update: {e}") from None
        raise
    return runtime.update(t.schedule(spec))


def _rule(optimizer: str | catalog.Optimizer, hyper: dict[str, float],
          **settings: object) -> UpdateRule:
    """update_kernel's keywords as the rule. A hyper-parameter the optimizer does
    not have is refused, as the language refuses it (`None` stands for not given)."""
    name = optimizer.name if isinstance(optimizer, catalog.Optimizer) else optimizer
    hyper = {k: v for k, v in hyper.items() if v is not None}
    return UpdateRule.make(name, **hyper, **settings)


@functools.wraps(catalog.define)
def optimizer(name: str | None = None, **options: Any) -> Callable[[Callable], catalog.Optimizer]:
    """@ekko.optimizer(...): `catalog.define`, with each mistake in the definition one
    OptimizerError that names the optimizer and the line of the user's source."""
    define = catalog.define(name, **options)
    own = ("hyper", *catalog.MATH_ARGS, *catalog.GRAD_HYPER)  # the catalog says why for these
    taken = [k for k in inspect.signature(update_kernel).parameters if k not in own]

    def checked(fn: Callable) -> catalog.Optimizer:
        label = name or getattr(fn, "__name__", "?")
        hyper = options.get("hyper")
        for key in hyper if isinstance(hyper, dict) else ():
            if key in taken:  # update_kernel(..., key=v) would bind its own parameter
                raise OptimizerError(str(catalog.definition_error(
                    fn, label, f"hyper-parameter name {key!r} is taken: update_kernel has a "
                    f"parameter of that name")))
        try:
            return define(fn)
        except catalog.DefinitionError as e:
            raise OptimizerError(str(e)) from None

    return checked


def optimizers() -> dict[str, str]:
    """Every optimizer update_kernel knows, with what it computes."""
    return {name: opt.doc for name, opt in catalog.OPTIMIZERS.items()}


_kernels: dict[tuple[str, BagSpec], BagRuntime] = {}  # one loaded lookup per spec
_kernels_lock = threading.Lock()


def bag_kernel(dim: int, layout: str = "f32", index_dtype: str = "i64", mode: str = "sum",
               weighted: bool = False, threads: int | None = None,
               target: str = "llvm") -> BagRuntime:
    """A (cached) compiled lookup; the spec comes from the compiler pipeline.

    `target` names the backend (`backends.RUNTIMES`): "triton" compiles for
    the GPU (ekko.kernels.triton_runtime)."""
    t, runtime = backend(target, LookupError)
    try:
        BagSpec(dim, layout, index_dtype, mode, weighted)  # reject bad requests before building IR
        spec = bag_spec(dim, layout, index_dtype, mode, weighted, partitions=threads or 0)
    except Exception as exc:  # ValueError from BagSpec, VerifyException from the IR
        raise LookupError(f"cannot build a lookup kernel: {exc}") from exc
    spec = t.schedule(spec)
    with _kernels_lock:
        kernel = _kernels.get((t.name, spec))
        if kernel is None:
            kernel = _kernels[(t.name, spec)] = runtime.bag(spec)
        return kernel
