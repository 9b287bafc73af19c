"""Pooled serving lookups (embedding bags) through compiled LLVM kernels.

`bag_kernel(dim, layout, ...)` asks the compiler for the BagSpec (through the
IR pipeline, which also chooses the partition count), emits it with
`compiler.backend.llvm_bag` and JIT-compiles it. The returned BagKernel takes
numpy arrays or torch CPU tensors, never copies them (it only checks dtype,
shape and contiguity and passes data pointers), and returns the same kind of
array it was given. Large batches are split over a shared thread pool: ctypes
releases the GIL and partitions own disjoint output rows.

Table storage per layout (see kernels.quant): f32 float32 (rows, dim); f16
float16 (rows, dim); bf16 uint16 bits or torch.bfloat16 (rows, dim);
int8/int4 uint8 (rows, serving_row_bytes). Ids are int32 or int64 as the
spec says. Offsets use either convention: B+1 entries (bag b is
ids[off[b]:off[b+1]]) or torch's B entries (the last bag ends at len(ids)).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..compiler.backend import llvm_bag
from ..compiler.backend.llvm_bag import ERR_ID, ERR_OFFSETS, FUNCTION_NAME, emit_bag, emit_runner
from ..compiler.backend.spec import BagSpec, serving_row_bytes
from ..compiler.pipeline import bag_spec
from .arrays import ArrayArg
from .errors import EkkoError
from .jit import JitModule, compile_ir

PARALLEL_MIN_LOOKUPS = 8192  # below this one core is faster than any hand-off
CHUNKS_PER_THREAD = 4  # dynamically claimed partitions per thread

_INDEX_NP = {"i32": np.dtype(np.int32), "i64": np.dtype(np.int64)}
_TABLE_NP = {"f32": np.dtype(np.float32), "f16": np.dtype(np.float16),
             "bf16": np.dtype(np.uint16), "int8": np.dtype(np.uint8), "int4": np.dtype(np.uint8)}
_TORCH_TABLE = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "int8": "uint8", "int4": "uint8"}

_CFUNC = ctypes.CFUNCTYPE(
    ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
    ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
    ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64))

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


class LookupError(EkkoError, ValueError):  # noqa: A001 - the module's own error type
    """A lookup was rejected (bad dtype, shape, id or offsets); nothing was read out of bounds."""


def _shared_pool() -> ThreadPoolExecutor:
    """One pool for every kernel: the fallback while another thread holds the native runner."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                       thread_name_prefix="ekko-lookup")
        return _pool


class _Runner:
    """Native worker threads that claim kernel partitions from a mailbox.

    See llvm_bag.emit_runner: a Python pool thread takes ~30-80 us to wake,
    as long as a whole serving batch; these workers poll for ~0.3 ms after
    each job, then nap, so back-to-back batches start in nanoseconds and an
    idle process costs almost nothing. The caller always runs partitions
    itself, so a sleeping or missing worker (e.g. after fork) only costs
    parallelism, never latency beyond one core's time. One job at a time:
    `run` returns None while another Python thread holds the runner.
    """

    def __init__(self, workers: int):
        self.module = compile_ir(emit_runner())
        self.mailbox = np.zeros(llvm_bag.MB_WORDS, np.int64)
        self.mailbox[llvm_bag.MB_NEXT] = (1 << llvm_bag.CLAIM_BITS) - 1  # job 0, closed
        self.codes = np.zeros(1 << 12, np.int64)
        self.errors = np.zeros(1 << 12, np.int64)
        self.mailbox[llvm_bag.MB_CODES] = self.codes.ctypes.data
        self.mailbox[llvm_bag.MB_ERRS] = self.errors.ctypes.data
        self.ptr = self.mailbox.ctypes.data
        self.lock = threading.Lock()
        self.seq = 0
        self._dispatch = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64)(
            self.module.address("bag_dispatch"))
        worker = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64)(
            self.module.address("bag_worker"))
        usleep = ctypes.cast(ctypes.CDLL(None).usleep, ctypes.c_void_p).value
        self.threads = [threading.Thread(target=worker, args=(self.ptr, usleep), daemon=True,
                                         name=f"ekko-bag-worker-{i}") for i in range(workers)]
        for t in self.threads:
            t.start()
        atexit.register(self.stop)

    def run(self, fn_addr: int, args: tuple, parts: int) -> tuple[list[int], list[int]] | None:
        """Run partitions 0..parts-1 of one kernel call; (codes, error positions) or None if busy."""
        if parts > len(self.codes) or not self.lock.acquire(blocking=False):
            return None
        try:
            mb = self.mailbox
            mb[llvm_bag.MB_NPARTS] = parts
            mb[llvm_bag.MB_FN] = fn_addr
            mb[llvm_bag.MB_ARGS:llvm_bag.MB_ARGS + 9] = [a or 0 for a in args]
            self.seq = (self.seq + 1) % (1 << 40)
            self._dispatch(self.ptr, self.seq)
            return self.codes[:parts].tolist(), self.errors[:parts].tolist()
        finally:
            self.lock.release()

    def stop(self) -> None:
        """Let the workers return before the mailbox they poll is freed (interpreter exit)."""
        self.mailbox[llvm_bag.MB_STOP] = 1
        for t in self.threads:
            t.join(timeout=1.0)


_runner: _Runner | None = None


def _shared_runner() -> _Runner:
    global _runner
    with _pool_lock:
        if _runner is None:
            _runner = _Runner(max(1, (os.cpu_count() or 1) - 1))
        return _runner


class BagKernel:
    """A compiled pooled lookup for one BagSpec; call it like F.embedding_bag."""

    def __init__(self, spec: BagSpec):
        self.spec = spec
        self.module: JitModule = compile_ir(emit_bag(spec))
        self._address = self.module.address(FUNCTION_NAME)
        self._fn = _CFUNC(self._address)

    def __repr__(self) -> str:
        return f"BagKernel({self.spec})"

    # -- argument checks -----------------------------------------------------

    def _table(self, table: Any) -> ArrayArg:
        t = ArrayArg("table", table, LookupError)
        layout = self.spec.layout
        allowed = (_TABLE_NP[layout].name,) + ((_TORCH_TABLE[layout],) if t.torch else ())
        if layout == "bf16" and t.torch:
            allowed = ("bfloat16", "int16", "uint16")
        t.expect(allowed, ndim=2)
        width = serving_row_bytes(layout, self.spec.dim) if layout in ("int8", "int4") else self.spec.dim
        if t.shape[1] != width:
            raise LookupError(f"{layout} table of dim {self.spec.dim} needs {width} columns, got {t.shape[1]}")
        return t

    def _ids(self, ids: Any) -> ArrayArg:
        a = ArrayArg("ids", ids, LookupError)
        want = "int32" if self.spec.index_dtype == "i32" else "int64"
        a.expect((want,), ndim=1)
        return a

    def _offsets(self, offsets: Any, ids: ArrayArg,
                 include_last: bool | None) -> tuple[ArrayArg | None, int, int]:
        """(offsets arg, noffsets, nbags); mode none has no offsets and one bag per id.

        With include_last None the convention is inferred: B+1 entries when
        there are at least two and the last equals len(ids), else torch's B
        entries. Torch-style offsets whose last bag is empty look like B+1
        ones: pass include_last_offset=False for those.
        """
        if self.spec.mode == "none":
            if offsets is not None:
                raise LookupError("mode 'none' takes no offsets")
            return None, 0, ids.shape[0]
        if offsets is None:
            raise LookupError(f"mode {self.spec.mode!r} needs offsets")
        o = ArrayArg("offsets", offsets, LookupError)
        o.expect((ids.dtype,), ndim=1)
        n = o.shape[0]
        if n == 0:
            return o, 0, 0
        if include_last is None:
            include_last = n >= 2 and int(offsets[n - 1]) == ids.shape[0]
        return o, n, n - 1 if include_last else n

    def _weights(self, w: Any, ids: ArrayArg) -> ArrayArg | None:
        if not self.spec.weighted:
            if w is not None:
                raise LookupError("per_sample_weights given to an unweighted kernel")
            return None
        if w is None:
            raise LookupError("weighted kernel needs per_sample_weights")
        a = ArrayArg("per_sample_weights", w, LookupError)
        a.expect(("float32",), ndim=1)
        if a.shape[0] != ids.shape[0]:
            raise LookupError(f"per_sample_weights has {a.shape[0]} entries for {ids.shape[0]} ids")
        return a

    def _out(self, out: Any, nbags: int, like_torch: bool) -> tuple[Any, ArrayArg]:
        shape = (nbags, self.spec.dim)
        if out is None:
            if like_torch:
                import torch

                out = torch.empty(shape, dtype=torch.float32)
            else:
                out = np.empty(shape, np.float32)
        o = ArrayArg("out", out, LookupError, writable=True)
        o.expect(("float32",), ndim=2)
        if tuple(o.shape) != shape:
            raise LookupError(f"out must have shape {shape}, got {tuple(o.shape)}")
        return out, o

    # -- call ------------------------------------------------------------------

    def __call__(self, table: Any, ids: Any, offsets: Any = None,
                 per_sample_weights: Any = None, out: Any = None,
                 include_last_offset: bool | None = None) -> Any:
        """Pooled rows (nbags, dim) f32; torch in -> torch out, numpy otherwise."""
        t, i = self._table(table), self._ids(ids)
        o, noff, nbags = self._offsets(offsets, i, include_last_offset)
        w = self._weights(per_sample_weights, i)
        result, out_arg = self._out(out, nbags, t.torch or i.torch)
        if nbags == 0:
            return result
        args = (t.ptr, t.shape[0], i.ptr, i.shape[0], o.ptr if o else None, noff, nbags,
                w.ptr if w else None, out_arg.ptr)
        parts = self._partitions(i.shape[0], nbags)
        if parts == 1:
            err = ctypes.c_int64(0)
            codes, positions = [self._fn(*args, 0, 1, err)], [err.value]
        else:
            codes, positions = self._run_parallel(args, parts)
        self._raise_first(codes, positions, t.shape[0], i.shape[0])
        return result

    def _run_parallel(self, args: tuple, parts: int) -> tuple[list[int], list[int]]:
        """Partitions on the native runner, or on the thread pool while it is busy."""
        done = _shared_runner().run(self._address, args, parts)
        if done is not None:
            return done
        errors = [ctypes.c_int64(0) for _ in range(parts)]
        futures = [_shared_pool().submit(self._fn, *args, p, parts, errors[p]) for p in range(1, parts)]
        codes = [self._fn(*args, 0, parts, errors[0])] + [f.result() for f in futures]
        return codes, [e.value for e in errors]

    def _partitions(self, nids: int, nbags: int) -> int:
        """Kernel partitions for one call: 1 for small batches, else CHUNKS_PER_THREAD per thread.

        Partitions are claimed dynamically, so finer ones balance a core that
        another process delays (measured ~15% faster than one per thread).
        """
        if nids < PARALLEL_MIN_LOOKUPS or self.spec.partitions <= 1:
            return 1
        return max(1, min(self.spec.partitions * CHUNKS_PER_THREAD, nbags))

    @staticmethod
    def _raise_first(codes: list[int], positions: list[int], rows: int, nids: int) -> None:
        """Turn the kernel's error code and position into a LookupError."""
        for code, pos in zip(codes, positions):
            if code == ERR_ID:
                raise LookupError(f"ids[{pos}] is out of range for a table of {rows} rows")
            if code == ERR_OFFSETS:
                raise LookupError(f"offsets of bag {pos} are not monotone within [0, {nids}]")
            if code:
                raise LookupError(f"lookup kernel failed with code {code}")


_kernels: dict[BagSpec, BagKernel] = {}
_kernels_lock = threading.Lock()


def bag_kernel(dim: int, layout: str = "f32", index_dtype: str = "i64", mode: str = "sum",
               weighted: bool = False, threads: int | None = None) -> BagKernel:
    """A (cached) compiled lookup; the spec comes from the compiler pipeline."""
    try:
        BagSpec(dim, layout, index_dtype, mode, weighted)  # reject bad requests before building IR
        spec = bag_spec(dim, layout, index_dtype, mode, weighted, partitions=threads or 0)
    except Exception as exc:  # ValueError from BagSpec, VerifyException from the IR
        raise LookupError(f"cannot build a lookup kernel: {exc}") from exc
    with _kernels_lock:
        kernel = _kernels.get(spec)
        if kernel is None:
            kernel = _kernels[spec] = BagKernel(spec)
        return kernel


__all__ = ["BagKernel", "LookupError", "bag_kernel"]
