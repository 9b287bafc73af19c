"""A batch's sparse input, checked once for training (ekko.torch) and for predictions.

A batch is `{feature: (ids, offsets)}` (or `(ids, offsets, weights)`;
bare ids for `pooling none` features), or a TorchRec KeyedJaggedTensor.
Ids and offsets are integer arrays, lists or CPU tensors; offsets have B+1
entries (torch's include_last_offset), start at 0, end at the number of ids
and never decrease; per-sample weights are finite floats, one per id, for
sum pooling only. `check_bags` turns a batch into `Bag`s (int64 numpy ids in
range, f32 weights) or raises EkkoError naming the feature and what is
wrong, before anything reads a table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..dialects.catalog import pooling_problem
from ..kernels.arrays import index_array, is_torch
from ..kernels.errors import EkkoError
from ..kernels.model import CompiledModel


@dataclass(frozen=True)
class Bag:
    """One feature's checked input: int64 ids in range, offsets with B+1 entries
    (None for pooling none), f32 per-sample weights or None."""

    feature: str
    table: str
    mode: str
    ids: np.ndarray
    offsets: np.ndarray | None
    weights: np.ndarray | None

    @property
    def batch(self) -> int:
        """Bags in this feature (ids, for pooling none)."""
        return len(self.ids) if self.offsets is None else len(self.offsets) - 1

    def as_tuple(self) -> tuple:
        """(ids, offsets, weights): the plain value another process checks again."""
        return self.ids, self.offsets, self.weights


def check_bags(model: CompiledModel, sparse: Any) -> tuple[Bag, ...]:
    """Every feature of a batch, checked (see the module docstring)."""
    return tuple(check_bag(model, name, value) for name, value in items(sparse))


def check_bag(model: CompiledModel, feature: Any, value: Any) -> Bag:
    """One feature's input checked (EkkoError naming the feature and what is wrong)."""
    if not isinstance(feature, str):
        raise EkkoError(f"feature names are strings, got {type(feature).__name__}")
    f = model.feature(feature)  # raises, naming the model's features
    rows = model.table(f.table).rows
    ids, offsets, weights = _parts(feature, f.pooling, value)
    where = f"feature {feature}"
    ids_np = index_array(f"{where}: ids", ids, EkkoError)
    if len(ids_np) and (int(ids_np.min()) < 0 or int(ids_np.max()) >= rows):
        pos = int(np.argmax((ids_np < 0) | (ids_np >= rows)))
        raise EkkoError(f"{where}: id {int(ids_np[pos])} at position {pos} is out of range "
                        f"[0, {rows}) of table {f.table}")
    offsets_np = None
    if offsets is not None:
        offsets_np = index_array(f"{where}: offsets", offsets, EkkoError)
        _check_offsets(where, offsets_np, len(ids_np))
    elif f.pooling != "none":
        raise EkkoError(f"{where}: pooling {f.pooling} needs offsets (B+1 entries)")
    weights_np = None if weights is None else _weights(where, f.pooling, weights, len(ids_np))
    return Bag(feature, f.table, f.pooling, ids_np,
               offsets_np if f.pooling != "none" else None, weights_np)


def items(sparse: Any) -> list[tuple[str, Any]]:
    """(feature, value) pairs of a dict, or of a TorchRec KeyedJaggedTensor."""
    if _is_torchrec(sparse, "KeyedJaggedTensor"):
        return list(sparse.to_dict().items())
    if not isinstance(sparse, Mapping):
        raise EkkoError("sparse input is {feature: (ids, offsets[, weights])} or a TorchRec "
                        f"KeyedJaggedTensor, got {type(sparse).__name__}")
    return list(sparse.items())


def _is_torchrec(x: Any, name: str) -> bool:
    return type(x).__name__ == name and type(x).__module__.startswith("torchrec")


def _parts(feature: str, mode: str, value: Any) -> tuple[Any, Any, Any]:
    """(ids, offsets or None, weights or None) of one feature's value."""
    if _is_torchrec(value, "JaggedTensor"):
        return value.values(), value.offsets(), value.weights_or_none()
    if isinstance(value, (tuple, list)) and len(value) in (2, 3) and not _is_number(value[0]):
        return value[0], value[1], value[2] if len(value) == 3 else None
    if mode == "none" and (isinstance(value, (np.ndarray, tuple, list, range)) or is_torch(value)):
        return value, None, None  # bare ids
    raise EkkoError(f"feature {feature}: expected (ids, offsets) or (ids, offsets, weights)"
                    + (" or bare ids" if mode == "none" else "") + f", got {type(value).__name__}")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating))


def _check_offsets(where: str, offsets: np.ndarray, n: int) -> None:
    """B+1 offsets from 0 to n, never decreasing (torch's include_last_offset)."""
    if len(offsets) == 0:
        raise EkkoError(f"{where}: offsets must have B+1 entries (at least 1), got none")
    if offsets[0] != 0 or offsets[-1] != n:
        raise EkkoError(f"{where}: offsets must start at 0 and end at the number of ids ({n}), "
                        f"got {int(offsets[0])} ... {int(offsets[-1])}")
    steps = np.diff(offsets)
    if len(steps) and int(steps.min()) < 0:
        pos = int(np.argmax(steps < 0))
        raise EkkoError(f"{where}: offsets decrease at position {pos + 1} "
                        f"({int(offsets[pos])} then {int(offsets[pos + 1])})")


def _weights(where: str, mode: str, weights: Any, n: int) -> np.ndarray:
    """Per-sample weights as finite f32 numpy, n entries (sum pooling only)."""
    if (why := pooling_problem(mode, True)) is not None:
        raise EkkoError(f"{where}: {why}")
    if is_torch(weights):
        if weights.requires_grad:
            raise EkkoError(f"{where}: per-sample weights that require grad are not supported "
                            "(their gradient is not computed): pass weights.detach()")
        if weights.device.type != "cpu" or weights.layout is not _strided(weights):
            raise EkkoError(f"{where}: per-sample weights must be a dense CPU tensor")
        if not weights.is_floating_point():
            raise EkkoError(f"{where}: per-sample weights must be floats, got {weights.dtype}")
        weights = weights.detach().float().numpy()
    try:
        w = np.asarray(weights)
    except (TypeError, ValueError) as e:
        raise EkkoError(f"{where}: per-sample weights must be an array of floats ({e})") from None
    if w.dtype.kind != "f" or w.ndim != 1 or len(w) != n:
        raise EkkoError(f"{where}: per-sample weights must be 1-D floats, one per id ({n}), "
                        f"got {w.dtype} {w.shape}")
    w = np.ascontiguousarray(w, np.float32)
    if not np.isfinite(w).all():
        raise EkkoError(f"{where}: per-sample weights must be finite")
    return w


def _strided(t: Any) -> Any:
    """torch.strided, read off the tensor's own module (torch is not imported here)."""
    import sys

    return sys.modules["torch"].strided


__all__ = ["Bag", "check_bag", "check_bags", "items"]
