"""What a primary shard keeps on disk: its snapshot and its durable log of packets.

The log is append-only, one file per shard. Every step is written to it and
fsync'd before the step is applied and acknowledged, so an update that
`Engine.step` returned for survives a `kill -9` of the shard. A record is a
small frame around an ekko packet (`Packet.to_bytes`, CRC-32 included) that
carries the step's delta: the ids as the trainer sent them, the gradient
rows, and the version the step is committed at.

    offset  size  field
    0       4     magic b"EKKL"
    4       4     kind: 0 a step, 1 "mark healthy", 2 a rollback (both from Engine.check)
    8       8     the driver's step sequence number for this table
    16      8     the version the step commits (the rollback's new version; the
                  current version for a healthy mark)
    24      8     length L of the packet that follows
    32      L     the packet (table, ids, gradient rows as f32; empty for kinds 1, 2)

Replay re-runs the fused update kernel on each record in order; the kernels
are deterministic, so the shard comes back byte-identical. A record cut short
by a kill mid-write (its step was never acknowledged) ends the log: it is
cut off and the file truncated there.

The snapshot is every table's arrays (master, optimizer state, serving copy,
versions) and counters in one `.npz`, written to a temporary file, fsync'd
and renamed over the old one, after which the log starts again empty.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .packet import Packet, PacketError

_FRAME = struct.Struct("<4sIqqq")
_MAGIC = b"EKKL"
STEP, HEALTHY, ROLLBACK = 0, 1, 2  # record kinds


@dataclass
class LogRecord:
    """One logged step: the table's step sequence number, its version and its delta."""

    seq: int
    version: int
    packet: Packet
    kind: int = STEP


class PacketLog:
    """The append-only, fsync'd log of one primary shard (see the module docstring).

    Group commit: a sync thread runs `fdatasync` whenever records wait for
    one, and one sync covers every record written before it started. A step
    `write`s its record, applies its update meanwhile, and `wait`s for the
    sync before it is acknowledged; steps on several tables (or shards'
    several callers) share syncs instead of queueing one each.
    """

    def __init__(self, path: Path, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - lives with the shard
        self.records = 0
        self.bytes = self.file.seek(0, os.SEEK_END)
        self.written = self.synced = 0  # bytes ever written / made durable (tickets)
        self.syncs = 0
        self.error: OSError | None = None
        self._syncing = False
        self._running = True
        self._thread: threading.Thread | None = None

    def write(self, seq: int, version: int, packet: Packet, kind: int = STEP) -> int:
        """Write one record (not yet durable); returns the ticket to `wait` for."""
        body, crc = packet.to_buffers()
        length = sum(len(b) for b in body) + 4
        parts = [_FRAME.pack(_MAGIC, kind, seq, version, length), *body, crc]
        with self.cond:
            if self.error is not None:
                raise self.error
            _write_all(self.file, parts)
            size = _FRAME.size + length
            self.bytes += size
            self.written += size
            self.records += 1
            if self.fsync:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._sync_loop, daemon=True,
                                                    name="ekko-log-sync")
                    self._thread.start()
                self.cond.notify_all()
            else:
                self.synced = self.written
            return self.written

    def wait(self, ticket: int) -> None:
        """Return once every record up to `ticket` is durable (raises if a sync failed)."""
        with self.cond:
            while self.synced < ticket:
                if self.error is not None:
                    raise self.error
                self.cond.wait(1.0)

    def append(self, seq: int, version: int, packet: Packet, kind: int = STEP,
               sync: bool = True) -> None:
        """Write one record and make it durable before returning (`sync=False`: call sync())."""
        ticket = self.write(seq, version, packet, kind)
        if sync:
            self.wait(ticket)

    def sync(self) -> None:
        """Make every record written so far durable."""
        with self.cond:
            ticket = self.written
        self.wait(ticket)

    def _sync_loop(self) -> None:
        while True:
            with self.cond:
                while self._running and self.synced >= self.written:
                    self.cond.wait()
                if not self._running:
                    return
                target, fd = self.written, self.file.fileno()
                self._syncing = True
            try:
                _sync(fd)
            except OSError as e:  # the disk failed: nothing after this is acknowledged
                with self.cond:
                    self.error = e
            with self.cond:
                self._syncing = False
                if self.error is None:
                    self.synced = max(self.synced, target)
                    self.syncs += 1
                self.cond.notify_all()

    def size(self) -> int:
        return self.bytes

    def restart(self) -> None:
        """Start an empty log (after a snapshot holds everything logged so far)."""
        with self.cond:
            while self._syncing:  # never close the file under a running sync
                self.cond.wait()
            self.file.close()
            tmp = self.path.with_suffix(".tmp")
            tmp.write_bytes(b"")
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
            self.file = open(self.path, "ab", buffering=0)  # noqa: SIM115
            self.records = self.bytes = 0
            self.synced = self.written  # the snapshot holds them
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self._running = False
            while self._syncing:
                self.cond.wait()
            self.file.close()
            self.cond.notify_all()

    @staticmethod
    def read(path: Path) -> Iterator[LogRecord]:
        """Every whole record in order; a torn or damaged tail is cut off the file."""
        path = Path(path)
        if not path.exists():
            return
        data = path.read_bytes()
        pos = 0
        while pos + _FRAME.size <= len(data):
            magic, kind, seq, version, length = _FRAME.unpack_from(data, pos)
            end = pos + _FRAME.size + length
            if magic != _MAGIC or kind not in (STEP, HEALTHY, ROLLBACK) or length < 0 \
                    or end > len(data):
                break
            try:
                packet = Packet.from_bytes(data[pos + _FRAME.size:end])
            except PacketError:
                break
            yield LogRecord(seq, version, packet, kind)
            pos = end
        if pos != len(data):  # a write cut short by a kill: never acknowledged
            with open(path, "r+b") as f:
                f.truncate(pos)
                f.flush()
                os.fsync(f.fileno())


_sync = getattr(os, "fdatasync", os.fsync)  # the data and its length; not the mtime


def _write_all(f, parts: list) -> None:
    """Write every buffer (an unbuffered file may take less than asked)."""
    for part in parts:
        view = memoryview(part).cast("B")
        while len(view):
            n = f.write(view)
            view = view[n:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_arrays(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write arrays and a JSON header as one .npz, atomically (tmp, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def load_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict] | None:
    """What save_arrays wrote, or None when there is no (readable) snapshot.

    The .npz is uncompressed, so each array lies whole in the file: it is read
    straight into its own (writeable) array, one copy, not through zipfile's
    buffers (a 1 GiB replica snapshot loads several times faster).
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        arrays = _read_stored(path)
        if arrays is None:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        meta = json.loads(bytes(arrays.pop("__meta__")).decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    return arrays, meta


def _read_stored(path: Path) -> dict[str, np.ndarray] | None:
    """Every .npy member of an uncompressed .npz, read in place; None: read it the slow way."""
    out = {}
    with open(path, "rb") as f, zipfile.ZipFile(f) as z:
        for info in z.infolist():
            if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                return None
            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] != b"PK\x03\x04":
                return None
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            f.seek(start)
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return None
            if fortran or dtype.hasobject:
                return None
            count = int(np.prod(shape, dtype=np.int64))
            if f.tell() + count * dtype.itemsize > start + info.file_size:
                raise ValueError(f"{info.filename}: truncated")
            a = np.empty(shape, dtype)
            if f.readinto(memoryview(a.reshape(-1).view(np.uint8))) != a.nbytes:
                raise ValueError(f"{info.filename}: truncated")
            out[info.filename[:-4]] = a
    return out


def read_counter(path: Path) -> int:
    try:
        return int(Path(path).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def bump_counter(path: Path) -> int:
    """Count one more start of an actor (kept on disk, so restarts are visible)."""
    n = read_counter(path) + 1
    Path(path).write_text(str(n))
    return n


__all__ = ["HEALTHY", "ROLLBACK", "STEP", "LogRecord", "PacketLog", "bump_counter", "load_arrays", "read_counter",
           "save_arrays"]
