"""Replica-sync kernels: pack the rows a step touched, merge a packet into a replica.

`pack_kernel(dim, layout, ...)` and `merge_kernel(...)` ask the compiler for
the spec (sync IR through the standard pipeline), emit it with
`compiler.backend.llvm_sync` and JIT-compile it:

    rows, versions = pack(serving, versions, ids, seq=None)
    applied = merge(serving, versions, ids, rows, packet_versions, newest, seq=None)

Arrays are numpy arrays or torch CPU tensors, never copied. Packet rows are
in the serving layout: float32 / float16 / bf16 (uint16 bits) of (n, dim),
or uint8 (n, row bytes) for int8/int4. `seq` is the serving copy's uint32
sequence words (rows,), required when the kernel was built with seq=True.

A merge checks every argument, then every packet row in native code (ids in
range, 0 <= version <= newest, finite rows including int8/int4 scale and
bias, and int8 rows whose codes all decode to finite values, so a lookup of
a merged row never returns inf), before it writes anything: a rejected packet raises SyncError and
leaves the replica byte-identical. The kernels hold no state between calls,
so two tables (or two replicas) merge at the same time from two threads;
one writer per serving copy at a time is the caller's rule.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from ..compiler.backend import abi
from ..compiler.backend.llvm_sync import (
    ERR_DECODE,
    ERR_ID,
    ERR_NONFINITE,
    ERR_VERSION,
    emit_merge_module,
    emit_pack_module,
)
from ..compiler.backend.spec import MergeSpec, PackSpec
from ..compiler.pipeline import merge_spec, pack_spec
from ..dialects import catalog
from .arrays import ArrayArg
from .errors import EkkoError
from .jit import compile_ir
from .native import PackedEntry

PARALLEL_MIN_ROWS = 4096  # below this one thread is faster than a hand-off



class SyncError(EkkoError, ValueError):
    """A packet (or a pack request) was rejected; no serving copy was modified."""


def row_width(layout: str, dim: int) -> int:
    """Columns of a packet row: dim for float layouts, bytes for quantized ones."""
    return catalog.layout(layout).width(dim)


def rows_dtype(layout: str) -> type:
    """The numpy dtype of packet rows and serving copies in `layout`."""
    return np.dtype(catalog.layout(layout).storage.np_dtype).type


class _SyncKernel:
    """Shared argument checks of the pack and merge kernels."""

    spec: PackSpec | MergeSpec

    def _serving(self, serving: Any, versions: Any, seq: Any, writable: bool):
        s = self.spec
        width = row_width(s.layout, s.dim)
        srv = ArrayArg("serving", serving, SyncError, writable=writable)
        srv.expect(catalog.layout(s.layout).dtypes, ndim=2)
        if srv.shape[1] != width:
            raise SyncError(f"a {s.layout} serving copy of dim {s.dim} has {width} columns, "
                            f"got {srv.shape[1]}")
        rows = srv.shape[0]
        ver = ArrayArg("versions", versions, SyncError, writable=writable)
        ver.expect(("int64",), (rows,))
        sq = None
        if s.seq:
            if seq is None:
                raise SyncError("this kernel guards rows with sequence words: pass seq=")
            sq = ArrayArg("seq", seq, SyncError, writable=True)
            sq.expect(("uint32", "int32"), (rows,))
        elif seq is not None:
            raise SyncError("this kernel was built without sequence words (seq=False)")
        return rows, srv, ver, sq

    def _ids(self, ids: Any) -> ArrayArg:
        i = ArrayArg("ids", ids, SyncError)
        i.expect(("int32",) if self.spec.index_dtype == "i32" else ("int64",), ndim=1)
        return i

    def _parts(self, n: int) -> int:
        return 1 if n < PARALLEL_MIN_ROWS else max(1, self.spec.partitions)


class PackKernel(_SyncKernel):
    """A compiled pack: the serving rows and versions of `ids` (see the module docstring)."""

    def __init__(self, spec: PackSpec):
        self.spec = spec
        self.module = compile_ir(emit_pack_module(spec))
        self._pack = PackedEntry(self.module, abi.sync_pack())

    def __repr__(self) -> str:
        return f"PackKernel({self.spec})"

    def __call__(self, serving: Any, versions: Any, ids: Any, seq: Any = None,
                 out_rows: Any = None, out_versions: Any = None) -> tuple[Any, Any]:
        rows, srv, ver, sq = self._serving(serving, versions, seq, writable=False)
        i = self._ids(ids)
        n = i.shape[0]
        width = row_width(self.spec.layout, self.spec.dim)
        if out_rows is None:
            out_rows = np.empty((n, width), rows_dtype(self.spec.layout))
        if out_versions is None:
            out_versions = np.empty(n, np.int64)
        o = ArrayArg("out_rows", out_rows, SyncError, writable=True)
        o.expect(catalog.layout(self.spec.layout).dtypes, (n, width))
        ov = ArrayArg("out_versions", out_versions, SyncError, writable=True)
        ov.expect(("int64",), (n,))
        if n == 0:
            return out_rows, out_versions
        codes, errs = self._pack.run(
            self._parts(n), serving=srv.ptr, versions=ver.ptr, seq=sq.ptr if sq else None,
            rows=rows, ids=i.ptr, n=n, out_rows=o.ptr, out_versions=ov.ptr)
        bad = [errs[p] for p, code in enumerate(codes) if code]
        if bad:
            pos = min(bad)
            raise SyncError(f"id {int(np.asarray(ids)[pos])} at position {pos} is out of range "
                            f"[0, {rows})")
        return out_rows, out_versions


class MergeKernel(_SyncKernel):
    """A compiled newest-version-wins merge (see the module docstring)."""

    def __init__(self, spec: MergeSpec):
        self.spec = spec
        self.module = compile_ir(emit_merge_module(spec))
        self._check = PackedEntry(self.module, abi.merge_check())
        self._apply = PackedEntry(self.module, abi.merge_apply())

    def __repr__(self) -> str:
        return f"MergeKernel({self.spec})"

    def __call__(self, serving: Any, versions: Any, ids: Any, rows: Any, packet_versions: Any,
                 newest: int, seq: Any = None) -> int:
        """Merge one packet; returns the number of rows written (stale rows are skipped)."""
        nrows, srv, ver, sq = self._serving(serving, versions, seq, writable=True)
        i = self._ids(ids)
        n = i.shape[0]
        r = ArrayArg("rows", rows, SyncError)
        r.expect(catalog.layout(self.spec.layout).dtypes, ndim=2)
        width = row_width(self.spec.layout, self.spec.dim)
        if tuple(r.shape) != (n, width):
            raise SyncError(f"a packet of {n} ids needs {self.spec.layout} rows of shape "
                            f"({n}, {width}), got {tuple(r.shape)}")
        pv = ArrayArg("packet versions", packet_versions, SyncError)
        pv.expect(("int64",), ndim=1)
        if pv.shape[0] != n:
            raise SyncError(f"a packet of {n} ids needs {n} versions, got {pv.shape[0]}")
        if not isinstance(newest, (int, np.integer)) or isinstance(newest, bool):
            raise SyncError(f"newest must be an integer version, got {newest!r}")
        if not -(1 << 63) <= newest < 1 << 63:
            raise SyncError(f"newest must fit in int64, got {newest}")
        if n == 0:
            return 0
        parts = self._parts(n)
        descents = np.zeros(parts, np.int64)
        codes, errs = self._check.run(parts, rows=nrows, ids=i.ptr, n=n, prows=r.ptr,
                                      pversions=pv.ptr, newest=int(newest),
                                      descents=descents.ctypes.data)
        failed = [(errs[p], code) for p, code in enumerate(codes) if code]
        if failed:
            self._raise(min(failed), ids, packet_versions, nrows, int(newest))
        # sorted ids (the engine's packets): each partition merges its own part
        ranged = int(parts > 1 and not descents.any())
        return sum(self._apply.run(parts, serving=srv.ptr, versions=ver.ptr,
                                   seq=sq.ptr if sq else None, ids=i.ptr, n=n, prows=r.ptr,
                                   pversions=pv.ptr, ranged=ranged)[0])

    @staticmethod
    def _raise(failure: tuple[int, int], ids: Any, versions: Any, rows: int, newest: int) -> None:
        pos, code = failure
        if code == ERR_ID:
            raise SyncError(f"packet id {int(np.asarray(ids)[pos])} at position {pos} is out of "
                            f"range [0, {rows})")
        if code == ERR_VERSION:
            raise SyncError(f"packet version {int(np.asarray(versions)[pos])} at position {pos} is "
                            f"outside [0, {newest}] (newer than the primary has issued, or negative)")
        if code == ERR_NONFINITE:
            raise SyncError(f"packet row {pos} holds a non-finite value (NaN or Inf)")
        if code == ERR_DECODE:
            raise SyncError(f"packet row {pos} decodes to a non-finite value: its scale (and "
                            "bias) are finite, but code * scale (+ bias) overflows f32")
        raise SyncError(f"merge kernel failed with code {code}")


_cache: dict[Any, Any] = {}
_cache_lock = threading.Lock()


def _kernel(kind: str, dim: int, layout: str, index_dtype: str, seq: bool, threads: int | None):
    try:
        build = pack_spec if kind == "pack" else merge_spec
        spec = build(dim, layout, index_dtype, seq, partitions=threads or 0)
    except Exception as exc:  # ValueError from the spec, VerifyException from the IR
        raise SyncError(f"cannot build a {kind} kernel: {exc}") from None
    with _cache_lock:
        kernel = _cache.get(spec)
        if kernel is None:
            kernel = _cache[spec] = (PackKernel if kind == "pack" else MergeKernel)(spec)
        return kernel


def pack_kernel(dim: int, layout: str = "f32", index_dtype: str = "i64", seq: bool = False,
                threads: int | None = None) -> PackKernel:
    """A (cached) compiled pack; the spec comes from the compiler pipeline."""
    return _kernel("pack", dim, layout, index_dtype, seq, threads)


def merge_kernel(dim: int, layout: str = "f32", index_dtype: str = "i64", seq: bool = False,
                 threads: int | None = None) -> MergeKernel:
    """A (cached) compiled merge; the spec comes from the compiler pipeline."""
    return _kernel("merge", dim, layout, index_dtype, seq, threads)


__all__ = ["MergeKernel", "PackKernel", "SyncError", "merge_kernel", "pack_kernel", "row_width",
           "rows_dtype"]
