"""What callers hand the engine: ids and gradients as numpy arrays, or one clear EkkoError.

The engine takes numpy arrays, Python sequences and torch CPU tensors. A
tensor is only read, so one that requires grad is read through `detach()`;
a sparse, GPU or bf16 tensor (numpy has no bf16) is refused by name. Ids
must be integers inside the table: nothing is truncated, wrapped or cast
before the range check, so a float id or 2**64-1 is reported as given.
The in-process primary, the engine on Ray (before anything is logged or
sent) and the replicas' reads all check through here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..kernels.arrays import check_gather_index, index_array, is_torch, torch_layout_problem
from ..kernels.errors import EkkoError, UpdateError


def as_array(x: Any, name: str, error: type[EkkoError] = UpdateError) -> np.ndarray:
    """`x` as a numpy array without copying what need not be copied."""
    if isinstance(x, np.ndarray):
        return x
    if is_torch(x):
        return _from_torch(x, name, error)
    try:
        return np.asarray(x)
    except (ValueError, TypeError, OverflowError) as e:
        raise error(f"{name} must be an array or a sequence of numbers ({e})") from None


def _from_torch(x: Any, name: str, error: type[EkkoError]) -> np.ndarray:
    if (why := torch_layout_problem(name, x)) is not None:
        raise error(why)
    if x.device.type != "cpu":
        raise error(f"{name} must be a CPU tensor, got device {x.device}")
    x = x.detach()  # read only: autograd is not involved
    try:
        return x.numpy()
    except TypeError:
        dtype = str(x.dtype).removeprefix("torch.")
        raise error(f"{name} is a torch {dtype} tensor, which numpy cannot hold: pass "
                    f"{name}.float()" if x.is_floating_point() else
                    f"{name} is a torch {dtype} tensor, which numpy cannot hold") from None


def as_ids(x: Any, rows: int, name: str = "ids",
           error: type[EkkoError] = UpdateError) -> np.ndarray:
    """A contiguous 1-D int64 array of ids in [0, rows); an empty sequence is an empty batch."""
    a = index_array(name, x, error)
    if len(a) and (int(a.min()) < 0 or int(a.max()) >= rows):
        raise error(f"id {int(a[(a < 0) | (a >= rows)][0])} is out of range [0, {rows})")
    return a


@dataclass(frozen=True)
class Gathered:
    """A step's gradients given by reference: id p's row is `rows[index[p]]`, times
    `scale[p]` when a scale is given.

    This is how a pooled feature's gradient looks (each id of a bag gets the
    bag's output gradient, times its per-sample weight), so `ekko.torch` hands
    the B bag rows instead of writing N copies of them, and the update kernel
    reads them in place (`grad_index` / `grad_scale` of the LLVM kernels).
    `Engine.step(table, ids, Gathered(rows, index, scale))` is the same update
    as `Engine.step(table, ids, gathered.expand())`.
    """

    rows: np.ndarray  # (B, dim) float32
    index: np.ndarray  # (N,) int64 in [0, B)
    scale: np.ndarray | None = None  # (N,) float32

    def expand(self) -> np.ndarray:
        """The (N, dim) rows themselves (for a runtime that takes no gathered delta)."""
        out = np.take(self.rows, self.index, axis=0)
        if self.scale is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                out *= self.scale[:, None]  # a NaN or Inf here is refused by the kernel
        return out


def check_delta(ids: Any, grads: Any, rows: int, dim: int
                ) -> tuple[np.ndarray, np.ndarray | Gathered]:
    """A step's ids and gradients, checked before anything is written, logged or sent."""
    ids = as_ids(ids, rows)
    if isinstance(grads, Gathered):
        return ids, _check_gathered(grads, len(ids), dim)
    g = as_array(grads, "grads")
    if g.shape != (len(ids), dim) or g.dtype != np.float32:
        raise UpdateError(f"grads must be float32 of shape ({len(ids)}, {dim}), "
                          f"got {g.dtype} {g.shape}")
    return ids, np.ascontiguousarray(g)


def _check_gathered(g: Gathered, n: int, dim: int) -> Gathered:
    rows = as_array(g.rows, "grads.rows")
    if rows.ndim != 2 or rows.shape[1] != dim or rows.dtype != np.float32:
        raise UpdateError(f"grads.rows must be float32 of shape (B, {dim}), "
                          f"got {rows.dtype} {rows.shape}")
    index = index_array("grads.index", g.index, UpdateError)
    check_gather_index("grads.index", index, len(rows), "grads.rows", UpdateError)
    if len(index) != n:
        raise UpdateError(f"grads.index must name a row for each of the {n} ids, "
                          f"got {len(index)}")
    scale = None
    if g.scale is not None:
        scale = as_array(g.scale, "grads.scale")
        if scale.shape != (n,) or scale.dtype != np.float32:
            raise UpdateError(f"grads.scale must be float32 of shape ({n},), "
                              f"got {scale.dtype} {scale.shape}")
        scale = np.ascontiguousarray(scale)
    return Gathered(np.ascontiguousarray(rows), index, scale)


__all__ = ["Gathered", "as_array", "as_ids", "check_delta"]
