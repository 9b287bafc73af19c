"""Calling native kernels: ctypes prototypes derived from the ABI, per-table runtime.

`bind` turns an `abi.Signature` and a compiled module into a callable whose
arguments are checked by name and count against the declaration, so a
kernel can never be called with arguments in the wrong positions.

`TableRuntime` is what belongs to one table rather than to a compiled
kernel: the lock that serializes its updates (whichever kernel object issues
them) and the scratch buffers its updates reuse. Tables are identified by
the address of their first byte; two kernels for the same spec updating the
same table from two threads take the same lock.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..compiler.backend import abi
from .jit import JitModule

_CTYPES = {"i64": ctypes.c_int64, "f64": ctypes.c_double, "void": None}


def prototype(sig: abi.Signature) -> type:
    """The ctypes function type of a signature (pointers as raw addresses)."""
    args = [ctypes.c_void_p if a.pointer else _CTYPES[a.type] for a in sig.args]
    return ctypes.CFUNCTYPE(_CTYPES[sig.ret], *args)


class Native:
    """One exported function of a compiled module, called by argument name."""

    def __init__(self, module: JitModule, sig: abi.Signature):
        self.sig = sig
        self.module = module  # keeps the code alive
        self.fn = prototype(sig)(module.address(sig.symbol))
        self.names = sig.names()

    def __call__(self, **kwargs: Any) -> Any:
        if kwargs.keys() != set(self.names):
            missing = set(self.names) - kwargs.keys()
            extra = kwargs.keys() - set(self.names)
            raise TypeError(f"{self.sig.symbol}: missing {sorted(missing)}, unexpected {sorted(extra)}")
        return self.fn(*(kwargs[n] for n in self.names))

    def positional(self) -> Callable:
        """The raw ctypes function, for hot paths that build arguments in order."""
        return self.fn


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def executor() -> ThreadPoolExecutor:
    """The one thread pool that runs kernel partitions (ctypes releases the GIL)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2),
                                       thread_name_prefix="ekko-kernel")
        return _pool


def run_partitions(fn: Callable[[int], Any], parts: int) -> list[Any]:
    """fn(p) for every partition; partition 0 on the calling thread."""
    if parts == 1:
        return [fn(0)]
    futures = [executor().submit(fn, p) for p in range(1, parts)]
    first = fn(0)
    return [first] + [f.result() for f in futures]


class TableRuntime:
    """A table's lock and its scratch buffers, keyed by the kernel layout they fit."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.scratch: dict[Any, Any] = {}


_tables: OrderedDict[int, TableRuntime] = OrderedDict()
_tables_lock = threading.Lock()
MAX_SCRATCH = 64  # tables whose scratch is kept; older ones give theirs back


def table_runtime(address: int) -> TableRuntime:
    """The runtime of the table whose data starts at `address`.

    Runtimes (a lock each) are never dropped, so a table has one lock for
    the life of the process; only the scratch of tables not updated for a
    while is freed, under that table's lock.
    """
    with _tables_lock:
        rt = _tables.get(address)
        if rt is None:
            rt = _tables[address] = TableRuntime()
        _tables.move_to_end(address)
        if len(_tables) <= MAX_SCRATCH:
            return rt
        holders = [r for r in _tables.values() if r.scratch]
        for old in holders[:max(0, len(holders) - MAX_SCRATCH)]:
            if old is not rt and old.lock.acquire(blocking=False):
                old.scratch.clear()
                old.lock.release()
        return rt
