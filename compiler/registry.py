"""The dialects, passes and named pipelines ekko registers with its tools and contexts.

`PIPELINES` is the one table of named pass pipelines: ekko-opt (`-p standard`),
the compile API (`update_spec`, `bag_spec`, the sync specs), `compile_model`
and `update_kernel` all run a pipeline from it, through `pipeline_spec`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Any

from xdsl.context import Context
from xdsl.dialects import arith, builtin, func
from xdsl.ir import Dialect
from xdsl.passes import ModulePass


def ekko_dialects() -> dict[str, Callable[[], Dialect]]:
    from ..dialects.emb import Emb
    from ..dialects.kern import Kern
    from ..dialects.sync import Sync
    from ..dialects.upd import Upd

    return {"emb": lambda: Emb, "upd": lambda: Upd, "kern": lambda: Kern, "sync": lambda: Sync}


def ekko_passes() -> dict[str, Callable[[], type[ModulePass]]]:
    def upd_dedup():
        from .transforms.upd_dedup import UpdDedupPass

        return UpdDedupPass

    def upd_fuse():
        from .transforms.upd_fuse import UpdFusePass

        return UpdFusePass

    def upd_schedule():
        from .transforms.upd_schedule import UpdSchedulePass

        return UpdSchedulePass

    def lower_to_kernel():
        from .transforms.lower_to_kernel import LowerToKernelPass

        return LowerToKernelPass

    return {
        "upd-dedup": upd_dedup,
        "upd-fuse": upd_fuse,
        "upd-schedule": upd_schedule,
        "lower-to-kernel": lower_to_kernel,
    }


# name -> its passes, in order. "standard" takes a delta chain (or a lookup, a
# replica sync) to one kernel op: duplicates summed, the chain fused, the
# schedule chosen, kern ops with the optimizer's math region.
PIPELINES: dict[str, tuple[str, ...]] = {
    "standard": ("upd-dedup", "upd-fuse", "upd-schedule", "lower-to-kernel"),
}


def pipeline_spec(name: str = "standard", **options: Any) -> str:
    """The named pipeline as `-p` text, each option given to the pass that
    declares it (`partitions=2` -> `upd-schedule{partitions=2}`); an option at
    its pass's default (0 partitions, deterministic=False, ...) is left out."""
    if name not in PIPELINES:
        raise ValueError(f"unknown pipeline {name!r}; expected one of {', '.join(PIPELINES)}")
    passes = PIPELINES[name]
    given: dict[str, dict[str, Any]] = {p: {} for p in passes}
    if options:
        factories = ekko_passes()
        for key, value in options.items():
            owner = next((p for p in passes for f in fields(factories[p]()) if f.name == key), None)
            if owner is None:
                raise ValueError(f"pipeline {name!r} has no option {key!r}")
            default = next(f.default for f in fields(factories[owner]()) if f.name == key)
            if value is not None and (default is MISSING or value != default):
                given[owner][key] = value
    return ",".join(p + ("{" + " ".join(f"{k}={_option_text(v)}" for k, v in given[p].items())
                         + "}" if given[p] else "") for p in passes)


def _option_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def make_context() -> Context:
    """A context with the builtin, func, arith and ekko dialects loaded."""
    ctx = Context()
    for d in (builtin.Builtin, func.Func, arith.Arith):
        ctx.load_dialect(d)
    for factory in ekko_dialects().values():
        ctx.load_dialect(factory())
    return ctx
