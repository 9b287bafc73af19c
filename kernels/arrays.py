"""Array arguments of the native kernels: numpy arrays or torch CPU tensors, never copied.

Both the update and the lookup kernels reduce each argument to a data
pointer, a shape and a dtype name, and check them before any native code
runs; `ArrayArg` is that one check, raising the caller's own error type.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import EkkoError

# dtype.name costs ~1.4 us a call; a dict lookup on the dtype is ~20x cheaper
_NP_NAMES = {np.dtype(t): np.dtype(t).name for t in
             (np.float32, np.float16, np.uint16, np.int16, np.uint8, np.int8, np.int32, np.int64,
              np.float64)}


def is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


class ArrayArg:
    """One array argument as (pointer, shape, dtype name); `error` is raised on misuse."""

    def __init__(self, name: str, x: Any, error: type[EkkoError], writable: bool = False):
        self.name, self.obj, self.error = name, x, error
        if is_torch(x):
            if x.device.type != "cpu":
                raise error(f"{name} must be a CPU tensor, got device {x.device}")
            if writable and x.requires_grad:
                raise error(f"{name} requires grad: updating it in place would bypass autograd "
                            "(pass tensor.detach() or create it with requires_grad=False)")
            self.torch = True
            self.dtype = str(x.dtype).removeprefix("torch.")
            self.shape = tuple(x.shape)
            contiguous = x.is_contiguous()
            self.ptr = x.data_ptr()
        elif isinstance(x, np.ndarray):
            self.torch = False
            if not x.dtype.isnative:
                raise error(f"{name} has non-native byte order ({x.dtype.str}): "
                            f"pass {name}.astype({name}.dtype.newbyteorder('='))")
            self.dtype = _NP_NAMES.get(x.dtype) or x.dtype.name
            self.shape = x.shape
            contiguous = x.flags.c_contiguous
            self.ptr = x.__array_interface__["data"][0]  # cheaper than x.ctypes.data
            if writable and not x.flags.writeable:
                raise error(f"{name} is read-only: it is written in place")
        else:
            raise error(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
        if not contiguous:
            raise error(f"{name} must be C-contiguous")
        self.nbytes = x.numel() * x.element_size() if self.torch else x.nbytes

    def overlaps(self, other: ArrayArg) -> bool:
        """Whether the two arrays share any byte."""
        if not self.nbytes or not other.nbytes:
            return False
        return self.ptr < other.ptr + other.nbytes and other.ptr < self.ptr + self.nbytes

    def expect(self, dtypes: tuple[str, ...], shape: tuple[int, ...] | None = None,
               ndim: int | None = None) -> None:
        """Check the dtype, then the exact shape or only the number of dimensions."""
        if self.dtype not in dtypes:
            raise self.error(f"{self.name} must have dtype {' or '.join(dtypes)}, got {self.dtype}")
        if shape is not None and tuple(self.shape) != shape:
            raise self.error(f"{self.name} must have shape {shape}, got {tuple(self.shape)}")
        if ndim is not None and len(self.shape) != ndim:
            raise self.error(f"{self.name} must be {ndim}-D, got shape {tuple(self.shape)}")


def check_disjoint(written: list[ArrayArg], read: list[ArrayArg], error: type[EkkoError]) -> None:
    """No array written in place may share memory with any other argument.

    An aliased state (state = table, Adam's two moments the same array) would
    make a kernel read values it has already overwritten.
    """
    for k, a in enumerate(written):
        for b in written[k + 1:] + read:
            if a.overlaps(b):
                raise error(f"{a.name} and {b.name} share memory: each must be its own array")
