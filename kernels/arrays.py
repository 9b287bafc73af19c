"""Array arguments of the native kernels: numpy arrays or torch CPU tensors, never copied.

Both the update and the lookup kernels reduce each argument to a data
pointer, a shape and a dtype name, and check them before any native code
runs; `ArrayArg` is that one check, raising the caller's own error type.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any

import numpy as np

from .errors import EkkoError

# dtype.name costs ~1.4 us a call; a dict lookup on the dtype is ~20x cheaper. Every key is
# a native-order dtype, and a dtype equals another only in the same byte order, so a hit
# is also the byte-order check.
_NP_NAMES = {np.dtype(t): np.dtype(t).name for t in
             (np.float32, np.float16, np.uint16, np.int16, np.uint8, np.int8, np.int32, np.int64,
              np.uint32, np.uint64, np.float64, np.bool_)}
_TORCH_NAMES: dict[Any, str] = {}  # torch dtype -> name without "torch.", filled on first use


def _probe_data_offset() -> int | None:
    """Where an ndarray object holds its data pointer, if reading it there is exact.

    numpy's C struct (PyArrayObject_fields, its public ABI) starts with the
    data pointer right after the object header. Reading it costs ~0.2 us,
    `__array_interface__` ~1.4 us (it builds a dict), `.ctypes.data` as much.
    The offset is used only after it gave the right pointer for every probe
    (views at an offset, a transposed view, a read-only array); otherwise, or
    where `id` is not an object's address, every array goes the slow way.
    """
    if sys.implementation.name != "cpython":  # only there is id() the object's address
        return None
    offset = object.__basicsize__
    base = np.arange(24, dtype=np.int64).reshape(4, 6)
    ro = np.zeros(3, np.float32)
    ro.flags.writeable = False
    probes = [base, base[1:], base[2:, 3:], base.T, ro, np.empty(0, np.uint8)]
    for x in probes:
        if (ctypes.c_void_p.from_address(id(x) + offset).value or 0) != x.__array_interface__["data"][0]:
            return None
    return offset


_DATA_OFFSET = _probe_data_offset()
_read_ptr = ctypes.c_void_p.from_address


def data_ptr(x: np.ndarray) -> int:
    """The address of the first element of a numpy array."""
    if not isinstance(x, np.ndarray):  # any other object has something else at that offset
        raise TypeError(f"data_ptr takes a numpy array, got {type(x).__name__}")
    return _data_ptr(x)


def _data_ptr(x: np.ndarray) -> int:
    """data_ptr for a caller that has checked isinstance(x, np.ndarray)."""
    if _DATA_OFFSET is not None:
        return _read_ptr(id(x) + _DATA_OFFSET).value or 0
    return x.__array_interface__["data"][0]


def is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def torch_layout_problem(name: str, x: Any) -> str | None:
    """Why the torch tensor `x` has no plain buffer a kernel can read, or None:
    sparse (COO, CSR, ...) and nested tensors have no dense data pointer."""
    nested = getattr(x, "is_nested", False)
    if x.layout is sys.modules["torch"].strided and not nested:
        return None
    what = "a nested tensor" if nested else f"a {x.layout} tensor"
    return f"{name} is {what}: the kernels take dense tensors (pass {name}.to_dense())"


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def index_array(name: str, x: Any, error: type[EkkoError]) -> np.ndarray:
    """Ids as a caller gives them (an integer numpy array or CPU tensor of any width, a
    list, a tuple, a range) as a 1-D int64 numpy array with the same values, or `error`
    naming the first id that has none: a float, a bool, a number beyond int64
    (uint64's 2**64 - 1 stays that number, never -1). An int64 array comes back
    without a copy; an empty list is an empty batch."""
    if is_torch(x):
        if (why := torch_layout_problem(name, x)) is not None:
            raise error(why)
        if x.device.type != "cpu":
            raise error(f"{name} must be a CPU tensor, got device {x.device}")
        x = x.detach().numpy()
    elif not isinstance(x, np.ndarray):
        x = _python_ids(name, x, error)
    if x.ndim != 1:
        raise error(f"{name} must be 1-D, got shape {x.shape}")
    if x.dtype.kind not in "iu":
        raise error(f"{name} must be integers, got {x.dtype}")
    if x.dtype.kind == "u" and x.dtype.itemsize == 8 and len(x) and int(x.max()) > INT64_MAX:
        pos = int(np.argmax(x > INT64_MAX))
        raise error(_beyond_int64(name, pos, int(x[pos])))
    return np.ascontiguousarray(x, dtype=np.int64)


def check_gather_index(name: str, index: np.ndarray, sources: int, of: str,
                       error: type[EkkoError]) -> None:
    """A gathered delta's index (int64) names rows of its `sources`-row array `of`:
    anything else is `error` naming the first position that does not."""
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= sources):
        pos = int(np.argmax((index < 0) | (index >= sources)))
        raise error(f"{name}[{pos}] = {int(index[pos])} is out of range [0, {sources}) "
                    f"({of} has {sources} rows)")


def _python_ids(name: str, x: Any, error: type[EkkoError]) -> np.ndarray:
    """A Python sequence of ids as an integer array (numpy's own guess would make
    [] float64 and [-1, 2**64 - 1] float64 too, rounding the second)."""
    if isinstance(x, (str, bytes, dict)) or not hasattr(x, "__len__"):
        raise error(f"{name} must be an integer array or a sequence of integers, "
                    f"got {type(x).__name__}")
    items = list(x)
    if not items:
        return np.zeros(0, np.int64)
    try:
        guess = np.asarray(items)
    except (ValueError, TypeError, OverflowError):  # ragged or odd: the loop says why
        guess = None
    if guess is not None and guess.dtype.kind in "iu" and guess.ndim == 1:
        return guess  # integers, each kept exactly (the caller checks uint64's top half)
    for pos, v in enumerate(items):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise error(f"{name}[{pos}] is {v!r}, not an integer id")
        if not INT64_MIN <= int(v) <= INT64_MAX:
            raise error(_beyond_int64(name, pos, int(v)))
    return np.array(items, dtype=np.int64)


def _beyond_int64(name: str, pos: int, value: int) -> str:
    return f"{name}[{pos}] = {value} is beyond int64: no table has such a row"


class ArrayArg:
    """One array argument as (pointer, shape, dtype name); `error` is raised on misuse."""

    __slots__ = ("name", "obj", "error", "torch", "dtype", "shape", "ptr", "nbytes")

    def __init__(self, name: str, x: Any, error: type[EkkoError], writable: bool = False):
        self.name, self.obj, self.error = name, x, error
        if isinstance(x, np.ndarray):  # first: the hot path, and cheaper than is_torch
            self.torch = False
            dt = x.dtype
            dtype = _NP_NAMES.get(dt)
            if dtype is None:
                if not dt.isnative:
                    raise error(f"{name} has non-native byte order ({dt.str}): "
                                f"pass {name}.astype({name}.dtype.newbyteorder('='))")
                dtype = dt.name
            self.dtype = dtype
            self.shape = x.shape
            flags = x.flags
            contiguous = flags.c_contiguous
            self.ptr = _data_ptr(x)
            if writable and not flags.writeable:
                raise error(f"{name} is read-only: it is written in place")
            self.nbytes = x.nbytes
        elif is_torch(x):
            if (why := torch_layout_problem(name, x)) is not None:
                raise error(why)
            if x.device.type != "cpu":
                raise error(f"{name} must be a CPU tensor, got device {x.device}")
            if writable and x.requires_grad:
                raise error(f"{name} requires grad: updating it in place would bypass autograd "
                            "(pass tensor.detach() or create it with requires_grad=False)")
            self.torch = True
            dtype = _TORCH_NAMES.get(x.dtype)
            if dtype is None:
                dtype = _TORCH_NAMES[x.dtype] = str(x.dtype).removeprefix("torch.")
            self.dtype = dtype
            self.shape = tuple(x.shape)
            contiguous = x.is_contiguous()
            self.ptr = x.data_ptr()
            self.nbytes = x.numel() * x.element_size()
        else:
            raise error(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
        if not contiguous:
            raise error(f"{name} must be C-contiguous")

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
        lo, size = a.ptr, a.nbytes
        if not size:
            continue
        hi = lo + size
        for b in (*written[k + 1:], *read):
            if b.nbytes and b.ptr < hi and lo < b.ptr + b.nbytes:
                raise error(f"{a.name} and {b.name} share memory: each must be its own array")
