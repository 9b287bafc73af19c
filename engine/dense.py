"""Dense weights on replicas: versioned snapshots of the trainer's torch module, swapped whole.

A recommender is tables plus a dense part (an MLP over the pooled
embeddings). The tables travel row by row as packets; the dense part is
small and changes everywhere at every step, so it travels whole: the
trainer's `state_dict` at one moment, numbered by a version. A replica keeps
a private copy of the module and replaces it by one reference assignment
when a newer snapshot arrives, so a prediction runs entirely on one version
(never half of one and half of the next) and an older snapshot arriving late
is ignored.

Wire format (`DenseSnapshot.to_bytes`), little-endian:

    offset  size  field
    0       4     magic b"EKKD"
    4       2     format version (1)
    6       2     reserved (0)
    8       8     snapshot version
    16      8     commit time (ns since the epoch)
    24      4     entries n
    then per entry: u16 name length, name (UTF-8), u8 dtype code, u8 ndim,
                    ndim x u64 shape, the elements
    end-4   4     CRC-32 of every byte before it

A snapshot with a non-finite value is refused when taken, naming the entry:
a replica never serves a NaN weight because the trainer diverged.
"""

from __future__ import annotations

import copy
import math
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..kernels.errors import EkkoError
from .packet import checked_body
from .stats import Histogram

MAGIC = b"EKKD"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sHHqqI")
_DTYPES = {1: np.dtype("<f4"), 2: np.dtype("<f8"), 3: np.dtype("<f2"), 4: np.dtype("<i8"),
           5: np.dtype("<i4"), 6: np.dtype("u1"), 7: np.dtype("?")}
_CODE_OF = {d: c for c, d in _DTYPES.items()}
MAX_DIMS = 8


class DenseError(EkkoError, ValueError):
    """A dense snapshot could not be taken, decoded or installed; nothing changed."""


@dataclass(frozen=True)
class DenseSnapshot:
    """The dense module's state at one version (numpy copies, read-only)."""

    version: int
    state: dict[str, np.ndarray]
    commit_ns: int

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.state.values())

    def to_bytes(self) -> bytes:
        parts = [_HEADER.pack(MAGIC, FORMAT_VERSION, 0, self.version, self.commit_ns,
                              len(self.state))]
        for name, a in self.state.items():
            key = name.encode()
            a = a.astype(a.dtype.newbyteorder("<"), order="C", copy=False)  # keeps 0-d
            parts += [struct.pack("<H", len(key)), key,
                      struct.pack(f"<BB{a.ndim}Q", _CODE_OF[a.dtype], a.ndim, *a.shape),
                      a.tobytes()]
        body = b"".join(parts)
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes) -> DenseSnapshot:
        body = checked_body(bytes(data), _HEADER.size, DenseError,
                            "dense snapshot of {} bytes is truncated",
                            "dense snapshot is damaged (CRC mismatch)")
        magic, fmt, _, version, commit_ns, n = _HEADER.unpack_from(body)
        if magic != MAGIC or fmt != FORMAT_VERSION:
            raise DenseError(f"not a dense snapshot (magic {magic!r}, format {fmt})")
        state, pos = {}, _HEADER.size
        try:
            for _ in range(n):
                name, pos = _read_name(body, pos)
                a, pos = _read_array(body, pos)
                state[name] = a
        except (struct.error, ValueError, KeyError) as e:
            raise DenseError(f"dense snapshot entry {len(state)} is malformed ({e})") from None
        if pos != len(body):
            raise DenseError(f"dense snapshot has {len(body) - pos} bytes after its entries")
        return cls(version, state, commit_ns)


def _read_name(body: bytes, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<H", body, pos)
    pos += 2
    return body[pos:pos + length].decode(), pos + length


def _read_array(body: bytes, pos: int) -> tuple[np.ndarray, int]:
    code, ndim = struct.unpack_from("<BB", body, pos)
    if ndim > MAX_DIMS:
        raise ValueError(f"{ndim} dimensions")
    shape = struct.unpack_from(f"<{ndim}Q", body, pos + 2)
    pos += 2 + 8 * ndim
    dtype = _DTYPES[code]
    count = math.prod(shape)  # Python ints: an absurd shape cannot wrap around
    if pos + count * dtype.itemsize > len(body):
        raise ValueError(f"shape {shape} needs more bytes than the snapshot has")
    a = np.frombuffer(body, dtype, count, pos).reshape(shape)
    size = count * dtype.itemsize
    return a, pos + size


def take_snapshot(module: Any, version: int) -> DenseSnapshot:
    """The module's state_dict as numpy copies, or DenseError naming a non-finite entry."""
    state = {}
    for name, t in module.state_dict().items():
        a = t.detach().cpu().numpy().copy()
        if a.dtype not in _CODE_OF:
            raise DenseError(f"dense entry {name!r} has dtype {a.dtype}, which snapshots do "
                             f"not carry (float32/64/16, int64/32, uint8, bool)")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise DenseError(f"dense entry {name!r} holds a non-finite value: the snapshot "
                             f"was not taken (the replicas keep the previous one)")
        a.flags.writeable = False
        state[name] = a
    return DenseSnapshot(version, state, time.time_ns())


class DenseSlot:
    """A replica's dense module: its own copy, replaced whole by each newer snapshot."""

    def __init__(self, template: Any):
        self._template = copy.deepcopy(template).eval()
        self._keys = {k: tuple(v.shape) for k, v in self._template.state_dict().items()}
        self._current: tuple[int, Any] | None = None  # (version, module): swapped in one step
        self._lock = threading.Lock()  # installs, not reads
        self.installed = 0
        self.bytes_in = 0
        self.freshness = Histogram()  # ms from a snapshot's commit to its install here

    @property
    def version(self) -> int:
        current = self._current
        return -1 if current is None else current[0]

    def install(self, snap: DenseSnapshot | bytes) -> bool:
        """Swap in `snap` if newer than the one held; False if older (ignored)."""
        import torch

        raw = len(snap) if isinstance(snap, (bytes, bytearray, memoryview)) else snap.nbytes
        if not isinstance(snap, DenseSnapshot):
            snap = DenseSnapshot.from_bytes(snap)
        shapes = {k: tuple(v.shape) for k, v in snap.state.items()}
        if shapes != self._keys:
            raise DenseError(f"dense snapshot {snap.version} does not fit the module: "
                             f"{_shape_difference(self._keys, shapes)}")
        module = copy.deepcopy(self._template)
        module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in snap.state.items()})
        with self._lock:
            if snap.version <= self.version:
                return False
            self._current = (snap.version, module)
            self.installed += 1
            self.bytes_in += raw
            self.freshness.add(np.array([(time.time_ns() - snap.commit_ns) / 1e6]))
        return True

    def summary(self) -> dict:
        """The held version, snapshots installed, their bytes and freshness (ms)."""
        return {"version": self.version, "snapshots": self.installed, "bytes": self.bytes_in,
                "freshness_ms": self.freshness.summary()}

    def run(self, pooled: dict[str, np.ndarray], x: Any) -> tuple[int, Any]:
        """(version, output) of the held module on the pooled rows and `x`, without grad.

        `pooled` are f32 arrays or tensors (B, dim) or (N, dim); `x` is None or floats (B, n).
        What the module raises on them comes back as a DenseError naming it.
        """
        import torch

        current = self._current
        if current is None:
            raise DenseError("no dense snapshot has reached this replica yet "
                             "(call engine.publish_dense())")
        version, module = current
        tensors = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(v)
                   for k, v in pooled.items()}
        with torch.no_grad():
            try:
                return version, module(tensors, dense_input(x))
            except Exception as e:  # noqa: BLE001 - the user's module: say where it failed
                raise DenseError(f"the dense module (snapshot {version}) failed on this input: "
                                 f"{type(e).__name__}: {e}") from None


def dense_input(x: Any) -> Any:
    """The dense context as an f32 CPU tensor (B, n), or None; DenseError otherwise."""
    import torch

    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu" or x.layout is not torch.strided:
            raise DenseError("x must be a dense CPU tensor")
        t = x.detach()
    else:
        try:
            t = torch.from_numpy(np.ascontiguousarray(x))
        except (TypeError, ValueError, RuntimeError) as e:
            raise DenseError(f"x must be an array of floats ({e})") from None
    if not t.is_floating_point() or t.ndim != 2:
        raise DenseError(f"x must be floats of shape (B, n), got {t.dtype} {tuple(t.shape)}")
    return t.to(torch.float32)


def _shape_difference(want: dict[str, tuple], got: dict[str, tuple]) -> str:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        return f"missing {missing}, unexpected {extra}"
    k = next(k for k in want if want[k] != got[k])
    return f"{k!r} has shape {got[k]}, the module's is {want[k]}"


__all__ = ["DenseError", "DenseSlot", "DenseSnapshot", "dense_input", "take_snapshot"]
