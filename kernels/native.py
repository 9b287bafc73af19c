"""Calling native kernels: the ABI's packed entries, one executor, per-table runtime.

Every kernel exports `<symbol>_packed(i64* args)` (see `abi.packed`):
`PackedEntry` lays out each partition's arguments by name, in the order the
ABI declares them, and the one `Executor` runs the partitions. A kernel can
never be called with arguments in the wrong positions.

`TableRuntime` is what belongs to one table rather than to a compiled
kernel: the lock that serializes its updates (whichever kernel object issues
them) and the scratch buffers its updates reuse. Tables are identified by
the address of their first byte; two kernels for the same spec updating the
same table from two threads take the same lock.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from ..compiler.backend import abi, llvm_runner
from ..compiler.backend.llvm_runner import emit_runner
from .jit import JitModule, compile_ir

class Executor:
    """Runs a kernel's partitions: one executor for every kernel.

    The partitions of one call are claimed by native worker threads (see
    `compiler.backend.llvm_runner`: a Python pool thread takes ~30-80 us to
    wake, as long as a whole serving batch) and by the calling thread, which
    always works too, so a sleeping or missing worker (e.g. after fork) only
    costs parallelism. One job at a time: while another thread holds the
    workers, a call runs its partitions on its own thread. ctypes releases
    the GIL for every native call.
    """

    def __init__(self, workers: int):
        self.module = compile_ir(emit_runner())
        self.mailbox = np.zeros(llvm_runner.MB_WORDS, np.int64)
        self.mailbox[llvm_runner.MB_NEXT] = (1 << llvm_runner.CLAIM_BITS) - 1  # job 0, closed
        self.codes = np.zeros(1 << 12, np.int64)
        self.mailbox[llvm_runner.MB_CODES] = self.codes.ctypes.data
        self.ptr = self.mailbox.ctypes.data
        self.lock = threading.Lock()
        self.seq = 0
        self._dispatch = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64)(
            self.module.address("ekko_dispatch"))
        worker = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64)(
            self.module.address("ekko_worker"))
        usleep = ctypes.cast(ctypes.CDLL(None).usleep, ctypes.c_void_p).value
        self.threads = [threading.Thread(target=worker, args=(self.ptr, usleep), daemon=True,
                                         name=f"ekko-worker-{i}") for i in range(workers)]
        for t in self.threads:
            t.start()
        atexit.register(self.stop)

    def run(self, entry: PackedEntry, argv: np.ndarray) -> list[int]:
        """Status of each partition of one call; argv is [nparts x nargs] int64 words."""
        return self.run_words(entry, argv.ctypes.data, argv.shape[0], argv.shape[1])

    def run_words(self, entry: PackedEntry, base: int, parts: int, stride: int) -> list[int]:
        """Status of each partition; partition p's words start at base + 8 * stride * p."""
        if parts == 1 or parts > len(self.codes) or not self.lock.acquire(blocking=False):
            fn, step = entry.fn, stride * 8
            return [fn(base + p * step) for p in range(parts)]
        try:
            mb = self.mailbox
            mb[llvm_runner.MB_NPARTS] = parts
            mb[llvm_runner.MB_FN] = entry.address
            mb[llvm_runner.MB_ARGV] = base
            mb[llvm_runner.MB_NARGS] = stride
            self.seq = (self.seq + 1) % (1 << 40)
            self._dispatch(self.ptr, self.seq)
            return self.codes[:parts].tolist()
        finally:
            self.lock.release()

    def stop(self) -> None:
        """Let the workers return before the mailbox they poll is freed (interpreter exit)."""
        self.mailbox[llvm_runner.MB_STOP] = 1
        for t in self.threads:
            t.join(timeout=1.0)


_executor: Executor | None = None
_executor_lock = threading.Lock()


def executor() -> Executor:
    global _executor
    if _executor is not None:  # every call after the first: no lock
        return _executor
    with _executor_lock:
        if _executor is None:
            _executor = Executor(max(1, (os.cpu_count() or 1) - 1))
        return _executor


class PackedEntry:
    """A kernel's `<symbol>_packed` entry and how to lay out its argument words.

    `run(nparts, **args)` is the call path: the layout is fixed once per
    entry (a function generated from the signature takes every argument by
    keyword, so a missing or unknown name is a TypeError, and writes its
    words in the ABI's order). Each partition's row has one extra word after
    its arguments; `err_pos`, when the signature has it, points there.
    `__call__(rows)` takes a dict per partition instead, for arguments that
    differ between partitions (the update's scratch buffers).
    """

    def __init__(self, module: JitModule, sig: abi.Signature):
        self.sig = sig
        self.module = module  # keeps the code alive
        self.address = module.address(abi.packed(sig).symbol)
        self.fn = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p)(self.address)
        self.names = sig.names()
        self.keys = frozenset(self.names)
        self.floats = [a.type == "f64" for a in sig.args]
        self.stride = len(self.names) + 1  # the arguments, then the partition's error word
        self._types: dict[int, type] = {}
        self.run = _runner(self)

    def words(self, rows: list[dict[str, Any]]) -> np.ndarray:
        """One row of int64 words per partition, from each partition's arguments by name."""
        for args in rows:
            if args.keys() != self.keys:
                raise TypeError(f"{self.sig.symbol}: arguments {sorted(args)} do not match "
                                f"{list(self.names)}")
        if not any(self.floats):
            return np.array([[args[n] or 0 for n in self.names] for args in rows], np.int64)
        out = np.empty((len(rows), len(self.names)), np.int64)
        for p, args in enumerate(rows):
            out[p] = [_word(args[n], f) for n, f in zip(self.names, self.floats)]
        return out

    def __call__(self, rows: list[dict[str, Any]]) -> list[int]:
        return executor().run(self, self.words(rows))

    def words_type(self, nparts: int) -> type:
        """The ctypes array of `nparts` rows of `stride` words (array types are cached)."""
        t = self._types.get(nparts)
        if t is None:
            t = self._types[nparts] = ctypes.c_int64 * (self.stride * nparts)
        return t


_ENTRY_ARGS = ("part", "nparts", "err_pos")  # what `PackedEntry.run` fills in itself


def _runner(entry: PackedEntry) -> Callable[..., tuple[list[int], list[int]]]:
    """`run(nparts, *, <the other arguments>) -> (statuses, error words)` for one entry; nparts >= 1.

    Generated once per entry from its signature: a partition's row of words
    is one list display in the ABI's order (pointers as addresses, None as
    0, f64 as its bits) copied into a fresh ctypes array, so a call builds no
    dict and no numpy array; one partition runs on the calling thread, more
    on the executor. The generated code's own names start with "_", which no
    argument name may.
    """
    names, stride = entry.names, entry.stride
    if (not all(n.isidentifier() and not n.startswith("_") for n in names)
            or len(set(names)) != len(names)):
        raise ValueError(f"{entry.sig.symbol}: argument names {names} cannot be keywords")
    params = [n for n in names if n not in _ENTRY_ARGS]
    items = [("0" if n in ("part", "err_pos") else "nparts" if n == "nparts"
              else f"_f64({n})" if is_float else f"({n} or 0)")
             for n, is_float in zip(names, entry.floats)]
    err_word = 8 * len(names)  # byte offset of the error word within a row
    one, each = [], []  # per-row fix-ups: partition index and error word address
    if "err_pos" in names:
        one.append(f"_row[{names.index('err_pos')}] = _base + {err_word}")
        each.append(f"_row[{names.index('err_pos')}] = _base + {8 * stride} * _p + {err_word}")
    if "part" in names:
        each.append(f"_row[{names.index('part')}] = _p")
    src = "\n".join([
        f"def run(nparts, *, {', '.join(params)}):",
        "    _buf = _words_type(nparts)()",
        "    _base = _addressof(_buf)",
        f"    _row = [{', '.join(items)}, 0]",
        "    if nparts == 1:",
        *(f"        {line}" for line in one),
        "        _buf[:] = _row",
        "        return [_fn(_base)], [_buf[-1]]",
        "    for _p in range(nparts):",
        *(f"        {line}" for line in each),
        f"        _buf[{stride} * _p:{stride} * (_p + 1)] = _row",
        f"    return (_executor().run_words(_entry, _base, nparts, {stride}),",
        f"            _buf[{stride - 1}::{stride}])",
    ]) + "\n"
    namespace = {"_words_type": entry.words_type, "_addressof": ctypes.addressof,
                 "_fn": entry.fn, "_executor": executor, "_entry": entry, "_f64": _f64}
    exec(compile(src, f"<{entry.sig.symbol}_packed run>", "exec"), namespace)
    run = namespace["run"]
    run.__doc__ = src
    return run


_F64, _F64_BITS = struct.Struct("<d"), struct.Struct("<q")


def _f64(value: Any) -> int:
    """A double's bits as the int64 word the packed entry reads."""
    return _F64_BITS.unpack(_F64.pack(value))[0]


def _word(value: Any, is_float: bool) -> int:
    """An argument as the int64 word the packed entry reads."""
    if is_float:
        return int(np.float64(value).view(np.int64))
    if value is None:
        return 0
    v = int(value)
    return v - (1 << 64) if v >= 1 << 63 else v


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
