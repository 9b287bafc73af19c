"""Pooled serving lookups (embedding bags) through compiled LLVM kernels.

`bag_kernel(dim, layout, ...)` (ekko.kernels.build) asks the compiler for the
BagSpec (through the IR pipeline, which also chooses the partition count);
on the LLVM target a BagKernel emits it with `compiler.backend.llvm_bag` and
JIT-compiles it. A BagKernel takes
numpy arrays or torch CPU tensors, never copies them (it only checks dtype,
shape and contiguity and passes data pointers), and returns the same kind of
array it was given. Large batches are split into partitions that own
disjoint output rows and run on the one executor (`native.Executor`).

Table storage per layout (`catalog.Layout.storage`, see kernels.quant): f32
float32 (rows, dim); f16 float16 (rows, dim); bf16 uint16 bits or
torch.bfloat16 (rows, dim); quantized rows uint8 (rows, row bytes). Ids are int32 or int64 as the
spec says. Offsets use either convention: B+1 entries (bag b is
ids[off[b]:off[b+1]]) or torch's B entries (the last bag ends at len(ids)).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..compiler.backend import abi
from ..compiler.backend.llvm_bag import ERR_ID, ERR_OFFSETS, emit_bag
from ..compiler.backend.spec import BagSpec
from ..dialects import catalog
from .arrays import ArrayArg, check_disjoint
from .calls import (SEQ_DTYPES, bag_count, bag_offsets_given, bag_table_width,
                    bag_weights_given, index_dtypes)
from .errors import LookupError
from .jit import JitModule, compile_ir
from .native import PackedEntry

PARALLEL_MIN_LOOKUPS = 8192  # below this one core is faster than any hand-off
CHUNKS_PER_THREAD = 4  # dynamically claimed partitions per thread

_INDEX_NP = {"i32": np.dtype(np.int32), "i64": np.dtype(np.int64)}


class BagKernel:
    """A compiled pooled lookup for one BagSpec; call it like F.embedding_bag."""

    def __init__(self, spec: BagSpec):
        self.spec = spec
        self.module: JitModule = compile_ir(emit_bag(spec))
        self._entry = PackedEntry(self.module, abi.bag(False))
        self._guarded = PackedEntry(self.module, abi.bag(True))
        layout = catalog.layout(spec.layout)  # what every call checks against, derived once
        self._table_dtypes = (layout.storage.np_dtype,)
        self._torch_table_dtypes = layout.storage.torch_dtypes
        self._width = layout.width(spec.dim)
        self._ids_dtype = index_dtypes(spec.index_dtype)

    def __repr__(self) -> str:
        return f"BagKernel({self.spec})"

    # -- argument checks -----------------------------------------------------

    def _table(self, table: Any) -> ArrayArg:
        t = ArrayArg("table", table, LookupError)
        t.expect(self._torch_table_dtypes if t.torch else self._table_dtypes, ndim=2)
        if t.shape[1] != self._width:
            bag_table_width(self.spec, t.shape[1])
        return t

    def _ids(self, ids: Any) -> ArrayArg:
        a = ArrayArg("ids", ids, LookupError)
        a.expect(self._ids_dtype, ndim=1)
        return a

    def _offsets(self, offsets: Any, ids: ArrayArg,
                 include_last: bool | None) -> tuple[ArrayArg | None, int, int]:
        """(offsets arg, noffsets, nbags); mode none has no offsets and one bag per id
        (the convention: `calls.bag_count`)."""
        if not bag_offsets_given(self.spec, offsets):
            return None, 0, ids.shape[0]
        o = ArrayArg("offsets", offsets, LookupError)
        o.expect((ids.dtype,), ndim=1)
        n = o.shape[0]
        _, nbags = bag_count(n, lambda: int(offsets[n - 1]), ids.shape[0], include_last)
        return o, n, nbags

    def _weights(self, w: Any, ids: ArrayArg) -> ArrayArg | None:
        if not bag_weights_given(self.spec, w):
            return None
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
                 include_last_offset: bool | None = None, seq: Any = None) -> Any:
        """Pooled rows (nbags, dim) f32; torch in -> torch out, numpy otherwise.

        `seq` (uint32, one per table row) are the sequence words the table's
        writers keep (see ekko.kernels.update): with them no returned row is
        ever part old, part new, whatever updates run beside the lookup.
        """
        t, i = self._table(table), self._ids(ids)
        o, noff, nbags = self._offsets(offsets, i, include_last_offset)
        w = self._weights(per_sample_weights, i)
        result, out_arg = self._out(out, nbags, t.torch or i.torch)
        sq = None
        if seq is not None:
            sq = ArrayArg("seq", seq, LookupError)
            sq.expect(SEQ_DTYPES, (t.shape[0],))
        check_disjoint([out_arg], [x for x in (t, i, o, w, sq) if x is not None], LookupError)
        if nbags == 0:
            return result
        nids = i.shape[0]
        entry = self._guarded if sq is not None else self._entry
        codes, positions = entry.run(
            self._partitions(nids, nbags), table=t.ptr, rows=t.shape[0], ids=i.ptr, nids=nids,
            offsets=o.ptr if o else None, noffsets=noff, nbags=nbags,
            weights=w.ptr if w else None, out=out_arg.ptr, seq=sq.ptr if sq else None)
        if any(codes):
            self._raise_first(codes, positions, t.shape[0], nids)
        return result

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


__all__ = ["BagKernel", "LookupError"]
