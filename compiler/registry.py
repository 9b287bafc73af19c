"""The dialects and passes ekko registers with its tools and contexts."""

from __future__ import annotations

from collections.abc import Callable

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


def make_context() -> Context:
    """A context with the builtin, func, arith and ekko dialects loaded."""
    ctx = Context()
    for d in (builtin.Builtin, func.Func, arith.Arith):
        ctx.load_dialect(d)
    for factory in ekko_dialects().values():
        ctx.load_dialect(factory())
    return ctx
