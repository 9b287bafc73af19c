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

from typing import Any

import numpy as np

from ..kernels.arrays import index_array, is_torch, torch_layout_problem
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


def check_delta(ids: Any, grads: Any, rows: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A step's ids and gradients, checked before anything is written, logged or sent."""
    ids = as_ids(ids, rows)
    g = as_array(grads, "grads")
    if g.shape != (len(ids), dim) or g.dtype != np.float32:
        raise UpdateError(f"grads must be float32 of shape ({len(ids)}, {dim}), "
                          f"got {g.dtype} {g.shape}")
    return ids, np.ascontiguousarray(g)


__all__ = ["as_array", "as_ids", "check_delta"]
