"""ekko.torch: train a model's embedding tables through an ekko Engine from PyTorch.

`EmbeddingBags(engine)` is a torch.nn.Module over the primary's tables. Its
forward pools the master rows in place with ekko's bag kernels (the engine's
own arrays, never a copy of a table) as each feature declares;
`loss.backward()` commits one `engine.step` per table with each id's
gradient given by reference (the bag's output-gradient row and the id's
weight: `Gathered`), so the table's own fused update kernel reads the bag
rows in place, sums the duplicates, applies its optimizer and the replicas receive the rows
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

from ..engine import Engine, Gathered
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
        with self._lock:  # one backward at a time: its tables' steps are not interleaved
            # one table alone is refused whole by its kernel, which checks before writing
            check = len(per_table) > 1
            deltas = {t: self._delta(t, parts, check) for t, parts in per_table.items()}
            for table, (_, _, finite) in deltas.items():
                if not finite:
                    raise EkkoError(f"non-finite gradient (NaN or Inf) for table {table}: "
                                    "nothing of this backward was committed")
            with self.engine.batched():  # the links wake once, after the last table
                for table, (ids, grads, _) in deltas.items():
                    self.engine.step(table, ids, grads)

    def _delta(self, table: str, parts: list[tuple[Bag, torch.Tensor]], check: bool
               ) -> tuple[np.ndarray, Gathered, bool]:
        """The table's ids and their gradient, gathered (each id names its bag's row of
        the output gradient: the N rows are never written out) and (if `check`)
        whether every row is finite."""
        pieces = [bag_gradient(bag, g) for bag, g in parts]
        grads = pieces[0] if len(pieces) == 1 else _stack(pieces)
        finite = not check or gathered_finite(grads)
        ids = parts[0][0].ids if len(parts) == 1 else np.concatenate([b.ids for b, _ in parts])
        return ids, grads, finite


def _numpy(g: torch.Tensor) -> np.ndarray:
    """An output's gradient as f32 numpy (a view when it already is f32 on the CPU)."""
    return g.detach().to(device="cpu", dtype=torch.float32).numpy()


def bag_gradient(bag: Bag, g: torch.Tensor) -> Gathered:
    """d output / d row for each id occurrence, by reference: the bag's gradient row
    (divided by the bag's length for mean, as torch divides it, in f32), times the id's
    weight when weighted; for pooling none, the output's gradient row itself."""
    gn = np.ascontiguousarray(_numpy(g))  # often a column slice of the dense part's
    if bag.mode == "none":
        return Gathered(gn, np.arange(len(gn), dtype=np.int64))
    lengths = np.diff(bag.offsets)
    if bag.mode == "mean":
        gn = gn / np.maximum(lengths, 1).astype(np.float32)[:, None]
    index = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    scale = None if bag.weights is None else np.ascontiguousarray(bag.weights, np.float32)
    return Gathered(gn, index, scale)


def _stack(pieces: list[Gathered]) -> Gathered:
    """Several features' gradients of one table as one gathered delta, in order."""
    starts = np.cumsum([0] + [len(p.rows) for p in pieces[:-1]])
    rows = np.concatenate([p.rows for p in pieces])
    index = np.concatenate([p.index + s for p, s in zip(pieces, starts)])
    scale = None
    if any(p.scale is not None for p in pieces):
        scale = np.concatenate([p.scale if p.scale is not None
                                else np.ones(len(p.index), np.float32) for p in pieces])
    return Gathered(rows, index, scale)


F32_OVERFLOW = 2.0 ** 128 - 2.0 ** 103  # the least |x| that rounds to inf in f32


def gathered_finite(g: Gathered) -> bool:
    """Whether every row of the delta is finite without writing the rows out: the bag
    rows finite, and no weight non-finite or large enough to overflow a product (f64
    holds each f32 x f32 product exactly, so the bound is exact)."""
    if not np.isfinite(g.rows).all():
        return False
    if g.scale is None:
        return True
    if not np.isfinite(g.scale).all():
        return False
    peak = np.abs(g.rows).max(axis=1, initial=0.0).astype(np.float64)[g.index]
    return bool((peak * np.abs(g.scale.astype(np.float64)) < F32_OVERFLOW).all())


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
