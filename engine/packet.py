"""Update packets: the one message between a primary and its replicas.

A packet carries values, not gradients: ids, their rows in the table's
serving layout, the version each row was written at on the primary, and the
commit time of each row (when the update became durable on the primary), so
a replica can measure freshness. Parts of the engine talk only through
packets and plain values, so they can live in different processes.

Wire format (`to_bytes`), little-endian throughout:

    offset  size  field
    0       4     magic b"EKKP"
    4       2     format version (1)
    6       1     row dtype code (1 f32, 2 f16, 3 bf16 bits as u16, 4 u8)
    7       1     flags (bit 0: commit times present)
    8       2     table name length L (UTF-8 bytes)
    10      2     reserved (0)
    12      8     n, rows in the packet
    20      4     row width (elements per row)
    24      8     newest version the primary had issued when it packed
    32      L     table name
    ...     8n    ids (i64)
    ...     8n    versions (i64)
    ...     8n    commit times (i64 ns since the epoch), when flagged
    ...     n*w*s rows (s = 4, 2, 2 or 1 bytes per element)
    end-4   4     CRC-32 of every byte before it

Anything truncated, garbled or inconsistent raises `EkkoError`.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from ..kernels.errors import EkkoError

MAGIC = b"EKKP"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sHBBHHQIq")
_CODES = {1: np.dtype("<f4"), 2: np.dtype("<f2"), 3: np.dtype("<u2"), 4: np.dtype("u1")}
_CODE_OF = {np.dtype(np.float32): 1, np.dtype(np.float16): 2, np.dtype(np.uint16): 3,
            np.dtype(np.uint8): 4}
ROW_OVERHEAD = 24  # bytes per row besides the row itself: id, version, commit time


class PacketError(EkkoError, ValueError):
    """A packet could not be decoded or does not fit the table it names."""


def checked_body(data: bytes, header_size: int, error: type[EkkoError], truncated: str,
                 damaged: str) -> bytes:
    """The bytes of a message before its trailing CRC-32, once the CRC matches (packets
    and dense snapshots end so); `error` with `truncated` (formatted with the length)
    or `damaged` otherwise."""
    if len(data) < header_size + 4:
        raise error(truncated.format(len(data)))
    body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
    if zlib.crc32(body) != crc:
        raise error(damaged)
    return body


def _as_int64(x) -> np.ndarray:
    """Integer arrays of any width become int64 (what the kernels take); others stay as given."""
    a = np.ascontiguousarray(np.asarray(x))
    return a.astype(np.int64) if a.dtype.kind in "iu" and a.dtype != np.int64 else a


def _le(a: np.ndarray, dtype) -> memoryview:
    """The array's bytes in `dtype` (little-endian), without a copy when it already is."""
    return memoryview(np.ascontiguousarray(a, dtype=dtype).reshape(-1).view(np.uint8))


@dataclass
class Packet:
    """ids, rows (serving layout), versions and commit times of one table's rows."""

    table: str
    ids: np.ndarray
    rows: np.ndarray
    versions: np.ndarray
    commit_ns: np.ndarray | None = None
    newest: int = 0
    # set by the sender, not encoded: which rows a scheduler is waiting for
    meta: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.ids = _as_int64(self.ids)
        self.versions = _as_int64(self.versions)
        self.rows = np.ascontiguousarray(np.asarray(self.rows))
        if self.commit_ns is not None:
            self.commit_ns = np.ascontiguousarray(np.asarray(self.commit_ns, np.int64))

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def nbytes(self) -> int:
        """What this packet costs on a link: its encoded size."""
        return (_HEADER.size + len(self.table.encode()) + 4 + len(self) * 16
                + (len(self) * 8 if self.commit_ns is not None else 0) + self.rows.nbytes)

    def to_bytes(self) -> bytes:
        """The wire format in the module docstring."""
        parts, crc = self.to_buffers()
        return b"".join(parts) + crc

    def to_buffers(self) -> tuple[list, bytes]:
        """to_bytes as (buffers, CRC-32 bytes), without joining them (for writev-style writes)."""
        rows = self.rows
        code = _CODE_OF.get(rows.dtype.newbyteorder("=") if rows.dtype.byteorder == ">" else rows.dtype)
        if code is None or rows.ndim != 2:
            raise PacketError(f"packet rows must be 2-D f32, f16, bf16 (u16) or u8, got "
                              f"{rows.dtype} {rows.shape}")
        n = len(self)
        if rows.shape[0] != n or self.versions.shape != (n,):
            raise PacketError(f"a packet of {n} ids needs {n} rows and versions")
        name = self.table.encode()
        flags = 1 if self.commit_ns is not None else 0
        parts = [_HEADER.pack(MAGIC, FORMAT_VERSION, code, flags, len(name), 0, n, rows.shape[1],
                              int(self.newest)), name,
                 _le(self.ids, "<i8"), _le(self.versions, "<i8")]
        if self.commit_ns is not None:
            parts.append(_le(self.commit_ns, "<i8"))
        parts.append(_le(rows, _CODES[code]))
        crc = 0
        for part in parts:
            crc = zlib.crc32(part, crc)
        return parts, struct.pack("<I", crc)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Packet:
        """Decode `to_bytes`; any damage raises PacketError (an EkkoError)."""
        body = checked_body(bytes(data), _HEADER.size, PacketError,
                            "truncated packet: {} bytes",
                            "packet checksum mismatch (garbled or truncated)")
        magic, version, code, flags, name_len, _, n, width, newest = _HEADER.unpack_from(body)
        if magic != MAGIC:
            raise PacketError("not an ekko packet (bad magic)")
        if version != FORMAT_VERSION:
            raise PacketError(f"unsupported packet format version {version}")
        if code not in _CODES or flags & ~1:
            raise PacketError(f"unknown row dtype code {code} or flags {flags}")
        dtype = _CODES[code]
        per_row = 16 + (8 if flags & 1 else 0) + width * dtype.itemsize
        if len(body) != _HEADER.size + name_len + n * per_row:
            raise PacketError(f"packet length {len(data)} does not match {n} rows of width {width}")
        pos = _HEADER.size
        try:
            table = body[pos:pos + name_len].decode()
        except UnicodeDecodeError:
            raise PacketError("packet table name is not UTF-8") from None
        pos += name_len

        def take(dt: np.dtype, count: int) -> np.ndarray:
            nonlocal pos
            arr = np.frombuffer(body, dt, count, pos).astype(dt.newbyteorder("="))
            pos += count * dt.itemsize
            return arr

        ids = take(np.dtype("<i8"), n)
        versions = take(np.dtype("<i8"), n)
        commit = take(np.dtype("<i8"), n) if flags & 1 else None
        rows = take(dtype, n * width).reshape(n, width)
        return cls(table, ids, rows, versions, commit, newest)


__all__ = ["Packet", "PacketError", "ROW_OVERHEAD"]
