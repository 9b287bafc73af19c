"""Fused sparse-update kernels on the LLVM target: the calling convention around the native code.

`update_kernel(...)` (ekko.kernels.build) builds the update chain a user asks
for as IR, runs the standard pipeline and loads the resulting spec; on the
LLVM target the returned `UpdateKernel` applies one delta in place:

    k(table, ids, grads, state=..., serving=..., versions=..., step=1, version=None, seed=0,
      seq=None)

Arrays are numpy arrays or torch CPU tensors, never copied. Every argument is
checked before anything is written, and the native first phase validates
ids and gradients before the second phase touches a table: a rejected delta
leaves table, state, serving copy and versions exactly as they were. So does
one whose new values would not be finite: the second phase journals each
row's old bytes before it writes it and checks what it stored; a value that
is inf or NaN (in the table's dtype, a state, or the serving row) makes
every partition put its rows back, and the call raises
NonFiniteOutputError naming the row and the buffer.

Layouts: table (rows, dim) float32 / float16 / bf16 (torch.bfloat16, or uint16
bit patterns in numpy); state: the optimizer's state arrays from the catalog
in its order ((rows,) f32 when rowwise, else (rows, dim) f32; one array is
passed alone, several as a tuple); serving as in ekko.kernels.quant
(int8/int4 uint8 (rows, row bytes)); versions (rows,) int64, stamped with
`version` (default: `step`); seq (rows,) uint32 sequence words: each row is
written between an odd and the next even value (see ekko.kernels.lookup).

Updates of one table are serialized whichever kernel object issues them:
the lock and the scratch buffers belong to the table (`native.TableRuntime`).
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from ..compiler.backend import abi
from ..compiler.backend.llvm_update import (BUCKET_IDS, RECENT_SLOTS, emit_update,
                                            journal_entry_bytes)
from ..dialects.limits import MAX_DIM
from ..compiler.backend.spec import UpdateSpec
from .arrays import ArrayArg, check_disjoint, check_gather_index
from .calls import buffer_name, call_scalars, update_args
from .errors import NonFiniteOutputError, UpdateError
from .jit import JitModule, compile_ir
from .native import PackedEntry, table_runtime

class _NativeArrays:
    """numpy arrays and CPU tensors, as the native update reaches them (`calls.Arrays`)."""

    error = UpdateError

    @staticmethod
    def arg(name: str, x: Any, writable: bool = False) -> ArrayArg:
        return ArrayArg(name, x, UpdateError, writable)

    @staticmethod
    def disjoint(written: list[ArrayArg], read: list[ArrayArg]) -> None:
        check_disjoint(written, read, UpdateError)


NATIVE_ARRAYS = _NativeArrays()


class _Scratch:
    """Per-partition buffers reused across calls (fresh pages cost ~1 us each).

    The hash table holds one bucket of ids at a time (see the dedup in
    llvm_update), so it starts small, stays in cache, and is doubled only
    when the kernel reports a bucket too large for it (ids crowded into one
    range of rows). Scratch belongs to a table (see `native.TableRuntime`),
    not to a kernel.
    """

    def __init__(self) -> None:
        self.n = -1
        self.htab = np.empty(0, np.int64)  # (id, unique index) pairs; id -1: empty
        self.cap = 0
        self.count = np.zeros(2, np.int64)  # unique ids; streamed, then owned positions
        self.err = np.zeros(1, np.int64)
        self.starts = np.empty(abi.UPDATE_BUCKETS + 1, np.int64)
        self.summed = np.empty(2 * MAX_DIM, np.float32)  # a summed row and a scaled one
        self.journal = np.empty(0, np.uint8)  # the old bytes of each row the apply writes
        self.journal_ptr = 0  # its first 64-byte aligned address
        self.out = np.zeros(3, np.int64)  # apply: rows written, a bad row's id, its buffer
        self.recent: np.ndarray | None = None  # raw-delta applies: rows journaled lately
        self.acc = np.empty(0, np.float32)  # streamed: a scratch row per repeated id
        self.generation = 0

    def ensure(self, n: int) -> None:
        if n > self.n:
            n = max(n, 1024)
            self.uids = np.empty(n, np.int64)
            self.slots = np.empty(n, np.int64)
            self.srcs = np.empty(n, np.int64)  # where each unique id's rows end in occ
            self.occ = np.empty(n, np.int64)  # delta rows grouped by unique id
            self.sort = [np.empty(n, np.int64) for _ in range(4)]  # order + radix scratch
            self.n = n
        if self.cap == 0:
            self.resize(4 * BUCKET_IDS)

    def resize(self, cap: int) -> None:
        self.htab = np.full(2 * cap, -1, np.int64)
        self.cap = cap

    def next_generation(self) -> int:
        """The tag of this call's pairs in `recent` (a fresh table when the tags wrap)."""
        if self.recent is None or self.generation == 0xFFFFFFFF:
            self.recent = np.full(2 * RECENT_SLOTS, -1, np.int64)
            self.generation = 0
        self.generation += 1
        return self.generation

    def ensure_acc(self, rows: int, dim: int) -> None:
        """Scratch rows for the repeated ids of a streamed apply (pages are touched
        only as rows are taken)."""
        if rows * dim > self.acc.size:
            self.acc = np.empty(max(rows, 1024) * dim, np.float32)

    def ensure_journal(self, entries: int, width: int) -> None:
        """Room for `entries` rows of `width` bytes, 64-byte aligned (the kernel
        streams whole lines into it; pages are touched only as used)."""
        if entries * width + 64 > self.journal.nbytes:
            self.journal = np.empty(max(entries, 1024) * width + 64, np.uint8)
            self.journal_ptr = (self.journal.ctypes.data + 63) // 64 * 64


class UpdateKernel:
    """A compiled fused update for one UpdateSpec (see the module docstring)."""

    gathers = True  # reads a gathered delta in place (grad_index=, grad_scale=)

    def __init__(self, spec: UpdateSpec):
        self.spec = spec
        self.module: JitModule = compile_ir(emit_update(spec))
        self._dedup = PackedEntry(self.module, abi.update_dedup(spec.index_dtype))
        self._apply = PackedEntry(self.module, abi.update_apply(
            len(spec.states), spec.index_dtype, spec.unique_ids))
        self._undo = PackedEntry(self.module, abi.update_undo(len(spec.states)))
        self.journal_width = journal_entry_bytes(spec)
        self.parts = max(1, spec.partitions)

    def __repr__(self) -> str:
        return f"UpdateKernel({self.spec})"

    # -- the call -------------------------------------------------------
    def scratch_of(self, table) -> list[_Scratch]:
        """The scratch buffers this kernel's updates of `table` reuse."""
        rt = table_runtime(ArrayArg("table", table, UpdateError).ptr)
        return rt.scratch.get(("update", self.parts), [])

    def __call__(self, table, ids, grads, state=None, serving=None, versions=None,
                 step: int = 1, version: int | None = None, seed: int = 0, seq=None,
                 grad_index=None, grad_scale=None) -> None:
        """Apply one delta in place; `seq` (uint32 per row) makes each row's
        write visible all at once to lookups that read with the same words.

        A gathered delta (`grad_index`, int64 per id): id p's gradient row is
        grads[grad_index[p]], times grad_scale[p] (f32) when given; grads then
        holds any number of rows (a pooled output's gradient: one per bag)."""
        a = update_args(self.spec, NATIVE_ARRAYS, table, ids, grads, state, serving, versions,
                        seq, grad_index, grad_scale)
        step, version, seed = call_scalars(step, version, seed)
        if a.n == 0:
            return
        gather = None
        if a.grad_index is not None:
            index = a.grad_index.obj  # refused before anything is written
            check_gather_index("grad_index", index if isinstance(index, np.ndarray)
                               else index.numpy(), a.grads.shape[0], "grads", UpdateError)
            gather = (a.grad_index, a.grad_scale)
        rt = table_runtime(a.table.ptr)
        with rt.lock:
            scratch = rt.scratch.get(("update", self.parts))
            if scratch is None:
                scratch = rt.scratch[("update", self.parts)] = [_Scratch() for _ in range(self.parts)]
            self._run(scratch, a.rows, a.n, a.table, a.ids, a.grads, a.states, a.serving,
                      a.versions, a.seq, step, version, seed, gather)

    def _run(self, scratch, rows, n, t, i, g, states, srv, ver, sq, step, version, seed,
             gather=None) -> None:
        parts = self.parts
        gidx, gscale = gather if gather is not None else (None, None)
        delta = dict(grads=g.ptr, gidx=gidx.ptr if gidx is not None else None,
                     gscale=gscale.ptr if gscale is not None else None)
        for sc in scratch:
            sc.ensure(n)

        def dedup_args(p: int) -> dict:
            sc = scratch[p]
            order, key_a, key_b, order_b = (a.ctypes.data for a in sc.sort)
            return dict(part=p, nparts=parts, ids=i.ptr, n=n, rows=rows, grads=g.ptr,
                        htab=sc.htab.ctypes.data, cap=sc.cap, uids=sc.uids.ctypes.data,
                        occ=sc.occ.ctypes.data, slots=sc.slots.ctypes.data,
                        count_out=sc.count.ctypes.data, err_pos=sc.err.ctypes.data,
                        order=order, key_a=key_a, key_b=key_b, order_b=order_b,
                        srcs=sc.srcs.ctypes.data, starts=sc.starts.ctypes.data)

        codes = self._dedup([dedup_args(p) for p in range(parts)])
        for p, code in enumerate(codes):
            while code == abi.Status.TABLE_FULL:  # rare: far more unique ids than last time
                scratch[p].resize(2 * scratch[p].cap)
                code = codes[p] = self._dedup([dedup_args(p)])[0]
        if any(codes):
            raise first_bad_input(i, g, n, self.spec.dim, rows, gather)
        buffers = dict(table=t.ptr, serving=srv.ptr if srv else None,
                       versions=ver.ptr if ver else None, seq=sq.ptr if sq else None,
                       **{f"state{k}": a.ptr for k, a in enumerate(states)})
        common = dict(buffers, nparts=parts, step=step, version=version, seed=seed)

        def apply_args(p: int) -> dict:
            sc = scratch[p]
            entries = int(sc.count[0]) if self.spec.dedup else n
            sc.ensure_journal(entries, self.journal_width)
            out = sc.out.ctypes.data
            journal = dict(journal=sc.journal_ptr, done=out, err_pos=out + 8,
                           err_buf=out + 16)
            if self.spec.streamed:  # the owned positions in input order, by their codes
                owned = int(sc.count[1])
                # a row per repeated id: each has 2+ positions, and is a unique id
                sc.ensure_acc(min(entries, owned - entries), self.spec.dim)
                return dict(common, **journal, **delta, part=p, ids=i.ptr, count=owned,
                            order=sc.sort[0].ctypes.data, occ=sc.occ.ctypes.data, srcs=None,
                            places=sc.sort[3].ctypes.data, summed=sc.summed.ctypes.data,
                            recent=None, generation=0, acc=sc.acc.ctypes.data)
            if self.spec.dedup:
                return dict(common, **journal, **delta, part=p, ids=sc.uids.ctypes.data,
                            count=int(sc.count[0]),
                            order=sc.sort[0].ctypes.data, occ=sc.occ.ctypes.data,
                            srcs=sc.srcs.ctypes.data, places=None,
                            summed=sc.summed.ctypes.data, recent=None, generation=0, acc=None)
            generation = sc.next_generation()
            return dict(common, **journal, **delta, part=p, ids=i.ptr, count=n, order=None,
                        occ=None, srcs=None, places=None, summed=sc.summed.ctypes.data,
                        recent=sc.recent.ctypes.data, generation=generation, acc=None)

        codes = self._apply([apply_args(p) for p in range(parts)])
        if any(codes):
            self._undo([dict(buffers, journal=sc.journal_ptr, count=int(sc.out[0]))
                        for sc in scratch])
            if abi.Status.NON_FINITE in codes:
                raise first_bad_input(i, g, n, self.spec.dim, rows, gather)
            self._raise_non_finite(scratch, codes)

    def _raise_non_finite(self, scratch, codes: list[int]) -> None:
        """Every partition's rows are back; report the smallest id a partition stopped at."""
        failed = [(int(sc.out[1]), int(sc.out[2])) for sc, code in zip(scratch, codes)
                  if code == abi.Status.NON_FINITE_OUTPUT]
        if not failed:
            raise UpdateError(f"update kernel failed with status {max(codes)}")
        row, buffer = min(failed)
        raise NonFiniteOutputError(row, buffer_name(self.spec, buffer))


def _host(arg: ArrayArg, ctype, count: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctype * count).from_address(arg.ptr))


def first_bad_input(ids: ArrayArg, grads: ArrayArg, n: int, dim: int, rows: int,
                    gather: tuple[ArrayArg, ArrayArg | None] | None = None) -> UpdateError:
    """The error for the earliest position whose id is out of range or whose delta row
    holds NaN or Inf. The kernels only say that one exists (each checks what it reads
    anyway, so valid deltas pay no pass of their own); finding the first is numpy's job
    (a gathered delta's rows are made here, on this path only)."""
    idv = _host(ids, ctypes.c_int32 if ids.dtype == "int32" else ctypes.c_int64, n)
    if gather is None:
        g = _host(grads, ctypes.c_float, n * dim).reshape(n, dim)
    else:
        sources = grads.shape[0]
        g = _host(grads, ctypes.c_float, sources * dim).reshape(sources, dim)
        g = g[_host(gather[0], ctypes.c_int64, n)]
        if gather[1] is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                g = g * _host(gather[1], ctypes.c_float, n)[:, None]
    bad_id = (idv < 0) | (idv >= rows)
    bad = bad_id | ~np.isfinite(g).all(axis=1)
    pos = int(np.argmax(bad))
    if not bad[pos]:
        return UpdateError("update kernel reported a bad input that is not there")
    if bad_id[pos]:
        return UpdateError(f"id {int(idv[pos])} at position {pos} is out of range [0, {rows})")
    return UpdateError(f"non-finite gradient (NaN or Inf) in delta row {pos}")
