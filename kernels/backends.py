"""Each target's runtime: how the kernels it emits are loaded and called.

A backend is its `compiler.backend.targets.Target` (schedule, emit) plus
one `Runtime` here under the same name: what turns a spec into a callable
kernel. Both runtimes take the same arguments (`UpdateRuntime`,
`BagRuntime`) and check them with the same code (`calls`). Everything that
builds a kernel for a target asks `backend(name)`: `update_kernel`,
`bag_kernel` and `ekko compile --target`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..compiler.backend.spec import BagSpec, UpdateSpec
from ..compiler.backend.targets import TARGETS, Target, target
from .errors import EkkoError


class UpdateRuntime(Protocol):
    """A loaded fused update (see `ekko.kernels.update.UpdateKernel` for the arguments)."""

    spec: UpdateSpec
    gathers: bool  # takes grad_index= / grad_scale= (a gathered delta, read in place)

    def __call__(self, table: Any, ids: Any, grads: Any, state: Any = None, serving: Any = None,
                 versions: Any = None, step: int = 1, version: int | None = None, seed: int = 0,
                 seq: Any = None) -> None: ...


class BagRuntime(Protocol):
    """A loaded pooled lookup (see `ekko.kernels.lookup.BagKernel` for the arguments)."""

    spec: BagSpec

    def __call__(self, table: Any, ids: Any, offsets: Any = None, per_sample_weights: Any = None,
                 out: Any = None, include_last_offset: bool | None = None,
                 seq: Any = None) -> Any: ...


@dataclass(frozen=True)
class Runtime:
    """How one target's kernels are loaded (from the spec its `Target` scheduled)."""

    update: Callable[[UpdateSpec], UpdateRuntime]
    bag: Callable[[BagSpec], BagRuntime]
    # `ekko compile --target NAME`: the files (suffix -> text) written beside each kernel's
    # native object; None where the native objects are all the target has
    export: Callable[[UpdateSpec | BagSpec], dict[str, str]] | None = None


def _native() -> Runtime:
    from .lookup import BagKernel
    from .update import UpdateKernel

    return Runtime(UpdateKernel, BagKernel)


def _triton() -> Runtime:
    from .triton_runtime import TritonBagKernel, TritonUpdateKernel, export

    return Runtime(TritonUpdateKernel, TritonBagKernel, export)


# target name (a key of compiler.backend.targets.TARGETS) -> its runtime, loaded lazily
RUNTIMES: dict[str, Callable[[], Runtime]] = {"llvm": _native, "triton": _triton}


def backend(name: str, error: type[EkkoError] = EkkoError) -> tuple[Target, Runtime]:
    """The target of that name and its runtime; `error` naming the known targets otherwise."""
    try:
        t = target(name)
    except ValueError as e:
        raise error(str(e)) from None
    if t.name not in RUNTIMES:  # a target ekko-opt can print but nothing here can run
        raise error(f"target {t.name!r} has no runtime; runnable: {', '.join(RUNTIMES)}")
    return t, RUNTIMES[t.name]()


__all__ = ["BagRuntime", "RUNTIMES", "Runtime", "TARGETS", "UpdateRuntime", "backend"]
