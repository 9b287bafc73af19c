"""What crosses a wide-area link: packets compressed when it pays, and an emulated link.

`WanCodec` frames a packet for a WAN link: a one-byte codec, then either
the packet's own wire format (packet.py) or the same fields regrouped so a
real codec (zstandard) finds their redundancy: ids as differences, versions
and commit times as offsets from their smallest, and every multi-byte value
split into byte planes (all first bytes, then all second bytes, ...), rows
included. zstd's frame checksum guards the compressed form; the packet's
CRC guards the raw one. A frame is compressed only when that is smaller.

`WanPipe` is one direction of an inter-region link in process: it delays
what it carries by the link's one-way latency, drops it while either end is
cut, and counts the bytes, rows and packets that crossed (and those lost).
The link's rate is the scheduler's token bucket (charged these frames'
real sizes); transfers outside the scheduler (anti-entropy) are paced here.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..kernels.errors import EkkoError
from .packet import _CODE_OF, _CODES, Packet, PacketError

RAW, ZSTD = 0, 1  # a frame's first byte
_Z_HEADER = struct.Struct("<BBHqIqq")  # dtype code, flags, name length, n, width, version base, time base
_LEVEL = 3  # zstd level: fast enough for a link thread, most of the gain


def _planes(a: np.ndarray) -> bytes:
    """`a` (rows x values, or values) as byte planes: byte k of every value together."""
    a = np.ascontiguousarray(a)
    n = a.shape[0]
    size = a.dtype.itemsize
    return a.view(np.uint8).reshape(n, -1, size).transpose(2, 1, 0).tobytes()


def _unplanes(data: bytes, pos: int, n: int, width: int, dtype: np.dtype) -> tuple[np.ndarray, int]:
    size = dtype.itemsize
    end = pos + n * width * size
    if end > len(data):
        raise PacketError("compressed WAN packet is shorter than its header says")
    planes = np.frombuffer(data, np.uint8, n * width * size, pos).reshape(size, width, n)
    out = np.ascontiguousarray(planes.transpose(2, 1, 0)).view(dtype).reshape(n, width)
    return out, end


class WanCodec:
    """Frames packets for WAN links (see the module docstring); `compress=False` sends
    the raw wire format only."""

    def __init__(self, compress: bool = True):
        self.compress = compress
        if compress:
            try:
                import zstandard  # a dependency of ekko (pyproject)
            except ImportError as e:
                raise EkkoError(f"compressed WAN packets need zstandard: pip install zstandard "
                                f"({e})") from None
            self._zstd = zstandard

    def encode(self, packet: Packet) -> tuple[bytes, int]:
        """(the frame, the packet's raw wire size)."""
        raw = packet.to_bytes()
        if self.compress and len(packet):
            z = self._zstd.ZstdCompressor(level=_LEVEL, write_checksum=True).compress(
                self._regroup(packet))
            if len(z) < len(raw):
                return bytes([ZSTD]) + z, len(raw)
        return bytes([RAW]) + raw, len(raw)

    def decode(self, frame: bytes) -> Packet:
        """The packet a frame carries; damage raises PacketError (an EkkoError)."""
        if not frame:
            raise PacketError("empty WAN frame")
        if frame[0] == RAW:
            return Packet.from_bytes(frame[1:])
        if frame[0] != ZSTD or not self.compress:
            raise PacketError(f"unknown WAN frame codec {frame[0]}")
        try:
            body = self._zstd.ZstdDecompressor().decompress(frame[1:])
        except self._zstd.ZstdError as e:
            raise PacketError(f"compressed WAN packet is damaged ({e})") from None
        return self._restore(body)

    @staticmethod
    def _regroup(p: Packet) -> bytes:
        rows = p.rows
        name = p.table.encode()
        ids, versions = p.ids, p.versions
        vbase = int(versions.min())
        commit = p.commit_ns
        tbase = int(commit.min()) if commit is not None else 0
        head = _Z_HEADER.pack(_CODE_OF[rows.dtype], 1 if commit is not None else 0, len(name),
                              len(p), rows.shape[1], vbase, tbase)
        parts = [head, struct.pack("<q", int(p.newest)), name,
                 _planes(np.diff(ids, prepend=np.int64(0))), _planes(versions - vbase)]
        if commit is not None:
            parts.append(_planes(commit - tbase))
        parts.append(_planes(rows))
        return b"".join(parts)

    @staticmethod
    def _restore(body: bytes) -> Packet:
        if len(body) < _Z_HEADER.size + 8:
            raise PacketError("compressed WAN packet is truncated")
        code, flags, name_len, n, width, vbase, tbase = _Z_HEADER.unpack_from(body)
        (newest,) = struct.unpack_from("<q", body, _Z_HEADER.size)
        if code not in _CODES or flags & ~1 or n < 0:
            raise PacketError(f"compressed WAN packet has dtype code {code}, flags {flags}")
        pos = _Z_HEADER.size + 8
        try:
            table = body[pos:pos + name_len].decode()
        except UnicodeDecodeError:
            raise PacketError("WAN packet table name is not UTF-8") from None
        pos += name_len
        i64 = np.dtype("<i8")
        d_ids, pos = _unplanes(body, pos, n, 1, i64)
        versions, pos = _unplanes(body, pos, n, 1, i64)
        commit = None
        if flags & 1:
            commit, pos = _unplanes(body, pos, n, 1, i64)
            commit = commit.reshape(-1) + tbase
        rows, pos = _unplanes(body, pos, n, width, _CODES[code])
        if pos != len(body):
            raise PacketError("compressed WAN packet is longer than its header says")
        return Packet(table, np.cumsum(d_ids.reshape(-1)), rows, versions.reshape(-1) + vbase,
                      commit, newest)


@dataclass
class PipeCounts:
    """What one direction of a WAN link carried (and lost)."""

    bytes: int = 0
    packets: int = 0
    rows: int = 0
    raw_bytes: int = 0  # the same packets' uncompressed wire size
    dropped_packets: int = 0
    dropped_rows: int = 0
    repair_bytes: int = 0  # anti-entropy: summaries, versions and pulled rows

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class WanPipe:
    """One direction (src -> dst) of an emulated inter-region link (module docstring).

    `is_cut(region)` says whether a region is cut off now; `bandwidth`
    (bytes/s, None: unlimited) paces the transfers that `carry` is asked to pace.
    """

    def __init__(self, src: str, dst: str, latency_s: float, bandwidth: float | None,
                 is_cut: Callable[[str], bool]):
        self.src, self.dst = src, dst
        self.latency_s, self.bandwidth = latency_s, bandwidth
        self._is_cut = is_cut
        self.counts = PipeCounts()
        self._lock = threading.Lock()

    @property
    def cut(self) -> bool:
        return self._is_cut(self.src) or self._is_cut(self.dst)

    def carry(self, nbytes: int, rows: int = 0, raw: int = 0, paced: bool = False,
              repair: bool = False) -> bool:
        """Carry `nbytes` across (returns after the one-way delay); False when the link was
        cut before it arrived (the bytes are lost, and counted as dropped)."""
        if not self.cut:
            wait = self.latency_s
            if paced and self.bandwidth is not None:
                wait += nbytes / self.bandwidth
            time.sleep(wait)
        with self._lock:
            c = self.counts
            if self.cut:
                c.dropped_packets += 1
                c.dropped_rows += rows
                return False
            c.bytes += nbytes
            c.packets += 1
            c.rows += rows
            c.raw_bytes += raw or nbytes
            if repair:
                c.repair_bytes += nbytes
            return True


__all__ = ["PipeCounts", "WanCodec", "WanPipe"]
