"""ekko.torch: train a model's embedding tables through an ekko Engine from PyTorch.

`EmbeddingBags(engine)` is a torch.nn.Module over the primary's tables. Its
forward pools the master rows in place with ekko's bag kernels (the engine's
own arrays, never a copy of a table) as each feature declares;
`loss.backward()` computes each id's gradient row and commits one
`engine.step` per table, so the table's own fused update kernel sums the
duplicates, applies its optimizer and the replicas receive the rows
(optimizer in backward, as FBGEMM's TBE: no dense gradient of a table is
ever made). See docs/torch.md.

This module sits above the engine (it takes an `Engine`); nothing below
imports it. Its name is `ekko.torch`, so `import torch` here is the real
torch (absolute imports).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

try:
    import torch
    from torch import nn
except ImportError as e:  # torch is optional for the rest of ekko
    raise ImportError(f"ekko.torch needs PyTorch: pip install 'ekko[torch]' ({e})") from None

from ..engine import Engine
from ..engine.sparse import Bag, check_bag, check_bags
from ..kernels.errors import EkkoError
from ..kernels.build import bag_kernel
from ..kernels.lookup import BagKernel

Sparse = Mapping[str, Any]


class EmbeddingBags(nn.Module):
    """The engine's tables as a torch module: `emb({feature: (ids, offsets[, weights])})`
    returns `{feature: Tensor}`, (B, dim) for pooled features and (N, dim) for
    `pooling none` ones (which also take bare ids). A TorchRec KeyedJaggedTensor
    may stand for the whole dict. Backward steps the engine (see the module doc).
    """

    def __init__(self, engine: Engine):
        super().__init__()
        primary = getattr(engine, "primary", None)
        if not isinstance(engine, Engine) or primary is None:
            raise EkkoError("EmbeddingBags needs an in-process ekko.Engine (it reads the "
                            f"primary's master rows in place), got {type(engine).__name__}")
        self.engine = engine
        self.features = {f.name: f for f in engine.model.model.features}
        # the Function's outputs need an input that requires grad; it never gets one
        self._anchor = torch.empty(0, requires_grad=True)
        self._masters: dict[str, tuple[np.ndarray, torch.Tensor]] = {}
        self._kernels: dict[tuple[str, bool], BagKernel] = {}
        self._scratch: dict[str, np.ndarray] = {}  # per table: gradient rows, reused
        self._lock = threading.Lock()

    def extra_repr(self) -> str:
        return ", ".join(f"{f.name}->{f.table} {f.pooling}" for f in self.features.values())

    def weight(self, table: str) -> torch.Tensor:
        """The primary's master rows of `table` as a tensor sharing their memory (read it,
        do not write it: writes would bypass versions and replicas)."""
        pt = self.engine.primary.tables.get(table)
        if pt is None:
            raise EkkoError(f"no table {table!r} (tables: {', '.join(self.engine.primary.tables)})")
        array = pt.buf.master
        cached = self._masters.get(table)
        if cached is None or cached[0] is not array:  # the engine may swap its arrays
            cached = (array, _as_tensor(array, pt.buf.table.dtype))
            self._masters[table] = cached
        return cached[1]

    def forward(self, sparse: Sparse) -> dict[str, torch.Tensor]:
        bags = check_bags(self.engine.model, sparse)
        if torch.is_grad_enabled():
            outs = _Pool.apply(self._anchor, self, bags)
        else:  # nothing to commit: no graph
            outs = tuple(self.pool(b) for b in bags)
        return {b.feature: out for b, out in zip(bags, outs)}

    # -- forward ----------------------------------------------------------------------------
    def bag(self, feature: str, value: Any) -> Bag:
        """One feature's input checked (EkkoError naming the feature and what is wrong)."""
        return check_bag(self.engine.model, feature, value)

    def pool(self, bag: Bag) -> torch.Tensor:
        """The bag's f32 output, pooled from the master rows by ekko's bag kernel for the
        table's dtype (it reads the rows in place, as torch's embedding_bag would)."""
        pt = self.engine.primary.tables[bag.table]
        key = (bag.feature, bag.weights is not None)
        kernel = self._kernels.get(key)
        if kernel is None:
            t = pt.buf.table
            kernel = self._kernels[key] = bag_kernel(t.dim, t.dtype, "i64", bag.mode,
                                                     weighted=bag.weights is not None)
        out = kernel(pt.buf.master, bag.ids, bag.offsets, per_sample_weights=bag.weights,
                     include_last_offset=True)
        return torch.from_numpy(out)

    # -- backward ---------------------------------------------------------------------------
    def commit(self, bags: Sequence[Bag], grads: Sequence[torch.Tensor | None]) -> None:
        """One engine step per table from the outputs' gradients; a non-finite
        gradient anywhere refuses the whole backward before any table is written."""
        per_table: dict[str, list[tuple[Bag, torch.Tensor]]] = {}
        for bag, g in zip(bags, grads):
            if g is not None:  # an output the loss does not use adds nothing
                per_table.setdefault(bag.table, []).append((bag, g))
        with self._lock:  # the scratch rows are this module's: one backward at a time
            # one table alone is refused whole by its kernel, which checks before writing
            check = len(per_table) > 1
            deltas = {t: self._delta(t, parts, check) for t, parts in per_table.items()}
            for table, (_, _, finite) in deltas.items():
                if not finite:
                    raise EkkoError(f"non-finite gradient (NaN or Inf) for table {table}: "
                                    "nothing of this backward was committed")
            for table, (ids, rows, _) in deltas.items():
                self.engine.step(table, ids, rows)  # returns once committed: rows are free again

    def _delta(self, table: str, parts: list[tuple[Bag, torch.Tensor]], check: bool
               ) -> tuple[np.ndarray, np.ndarray, bool]:
        """The table's ids and gradient rows, written into the table's scratch array,
        and (if `check`) whether they are all finite. Reusing the array matters: a
        fresh N x dim one each backward cost more in page faults than computing the
        rows (5x on the loaded 2-core machine)."""
        n = sum(len(b.ids) for b, _ in parts)
        dim = self.engine.model.table(table).dim
        scratch = self._scratch.get(table)
        if scratch is None or len(scratch) < n:
            scratch = self._scratch[table] = np.empty((n, dim), np.float32)
        rows, at, finite = scratch[:n], 0, True
        for bag, g in parts:
            part = grad_rows(bag, g, rows[at:at + len(bag.ids)])
            at += len(bag.ids)
            # the rows of an unweighted bag are finite iff its output gradient is (10x
            # fewer values to read); a weight's product can overflow: read the rows
            finite = finite and (not check or bool(np.isfinite(
                part if bag.weights is not None else _numpy(g)).all()))
        ids = parts[0][0].ids if len(parts) == 1 else np.concatenate([b.ids for b, _ in parts])
        return ids, rows, finite


def _numpy(g: torch.Tensor) -> np.ndarray:
    """An output's gradient as f32 numpy (a view when it already is f32 on the CPU)."""
    return g.detach().to(device="cpu", dtype=torch.float32).numpy()


def grad_rows(bag: Bag, g: torch.Tensor, out: np.ndarray | None = None) -> np.ndarray:
    """d output / d row for each id occurrence, (N, dim) f32 (into `out` if given): the
    bag's gradient (divided by the bag's length for mean, times the id's weight when
    weighted); for pooling none, the output's gradient itself. In numpy: on a busy
    machine torch's threaded index_select was 30x slower than np.take."""
    gn = _numpy(g)
    if out is None:
        out = np.empty((len(bag.ids), gn.shape[1]), np.float32)
    if bag.mode == "none":
        out[...] = gn
        return out
    lengths = np.diff(bag.offsets)
    if bag.mode == "mean":  # f32 / f32, as torch divides the bag's gradient
        gn = gn / np.maximum(lengths, 1).astype(np.float32)[:, None]
    # a feature's gradient is often a column slice of the dense part's; take reads a
    # contiguous copy of it (B x dim) twice as fast. mode="clip": the bag numbers are in
    # range by construction, and the default mode="raise" with out= computes into a
    # fresh N x dim buffer and copies it (3x the time of the take itself)
    np.take(np.ascontiguousarray(gn), np.repeat(np.arange(len(lengths)), lengths), axis=0,
            out=out, mode="clip")
    if bag.weights is not None:
        out *= bag.weights[:, None]
    return out


class _Pool(torch.autograd.Function):
    """Forward: every feature's pooled output. Backward: the engine steps; no tensor
    gets a gradient (the tables are updated in place by their kernels)."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, emb: EmbeddingBags,
                bags: tuple[Bag, ...]) -> tuple[torch.Tensor, ...]:
        ctx.emb, ctx.bags = emb, bags
        ctx.set_materialize_grads(False)  # an unused output's gradient is None, not zeros
        return tuple(emb.pool(b) for b in bags)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[None, None, None]:
        ctx.emb.commit(ctx.bags, grads)
        return None, None, None


def _as_tensor(array: np.ndarray, dtype: str) -> torch.Tensor:
    """A master array as a tensor over the same memory (bf16 is held as uint16 bits)."""
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if dtype == "bf16" else t
