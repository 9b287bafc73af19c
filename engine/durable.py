"""What a primary shard keeps on disk: its snapshot and its durable log of packets.

The log is append-only, one file per shard. Every step is written to it and
fsync'd before the step is applied and acknowledged, so an update that
`Engine.step` returned for survives a `kill -9` of the shard. A record is a
small checksummed frame around an ekko packet (`Packet.to_bytes`, CRC-32
included) that carries the step's delta: the ids as the trainer sent them,
the gradient rows, and the version the step is committed at.

    offset  size  field
    0       4     magic b"EKL2" (log format 2; format 1, b"EKKL", had no header checksum)
    4       4     kind: 0 a step, 1 "mark healthy", 2 a rollback (both from Engine.check)
    8       8     the driver's step sequence number for this table
    16      8     the version the step commits (the rollback's new version; the
                  current version for a healthy mark)
    24      8     length L of the packet that follows
    32      8     how many bytes of this file were fsync'd when the record was written
    40      4     CRC-32 of bytes 0..40
    44      L     the packet (table, ids, gradient rows as f32; empty for kinds 1, 2)

Replay re-runs the fused update kernel on each record in order; the kernels
are deterministic, so the shard comes back byte-identical.

A kill mid-write leaves a prefix of what was written: the log ends in a
record cut short (too few bytes for a header that starts with the magic, or
a checked header whose packet runs past the end of the file). That record
was never fsync'd, so never acknowledged: it is a torn tail, cut off. Any
other damage (a header or packet whose checksum fails, bytes that start no
record, a damaged record followed by whole ones, even one at the very end)
is no kill's doing and may hold acknowledged steps: reading refuses it with
a `DamageError` naming the file, the record, its offset and how many whole
records follow it, and how many of those a later record's field 32 proves
fsync'd (acknowledged; group commit syncs several records at once, so the
last few may be acknowledged without a later record saying so). With
`cut=True` reading instead cuts the log at the damage, keeps the cut bytes
in `<log>.cut-at-<offset>-<ns>`, starts a new history (below) and reports
what it dropped. A log shortened exactly at a record boundary reads as
whole: no format can tell that from a log that ended there.

The snapshot is every table's arrays (master, optimizer state, serving copy,
versions) and counters in one uncompressed `.npz`, written to a temporary
file, fsync'd and renamed over the old one, after which the log starts again
empty. Its JSON header (`__meta__`) lists every member's CRC-32, so a
member cut short, garbled, renamed or swapped with another is a
`DamageError` naming the file, the member and its offset.

A directory's history id (`history`, absent until the first cut) changes
whenever a cut drops steps that may have been acknowledged: replicas that
hold rows of the old history copy the shard again instead of keeping them.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..kernels.errors import EkkoError
from .packet import Packet, PacketError

_FRAME = struct.Struct("<4sIqqqq")  # magic, kind, seq, version, length, durable bytes
_U32 = struct.Struct("<I")
HEADER = _FRAME.size + _U32.size  # the frame and its CRC-32
MAGIC = b"EKL2"
_FORMAT_1 = b"EKKL"
_MIN_PACKET = 36  # a packet's fixed header and its CRC-32
STEP, HEALTHY, ROLLBACK = 0, 1, 2  # record kinds
HISTORY = "history"


class DamageError(EkkoError):
    """A log or snapshot is damaged in a way no kill leaves: refused, nothing changed.

    `path`, `offset` (bytes into the file), `record` (the log record's index
    from 0) or `member` (the snapshot's array), and for a log `follow` (whole
    records after the damage) and `acknowledged` (how many of those a later
    record proves fsync'd).
    """

    def __init__(self, message: str, path: Path, offset: int, record: int | None = None,
                 member: str | None = None, follow: int = 0, acknowledged: int = 0):
        super().__init__(message)
        self.path, self.offset, self.record, self.member = Path(path), offset, record, member
        self.follow, self.acknowledged = follow, acknowledged

    def __reduce__(self) -> tuple:  # pickled whole (Ray sends a shard's refusal to the driver)
        return type(self), (str(self), self.path, self.offset, self.record, self.member,
                            self.follow, self.acknowledged)

    def add(self, note: str) -> DamageError:
        """The same damage, with `note` appended to the message."""
        return DamageError(f"{self}{note}", self.path, self.offset, record=self.record,
                           member=self.member, follow=self.follow, acknowledged=self.acknowledged)


@dataclass
class LogRecord:
    """One logged step: the table's step sequence number, its version and its delta."""

    seq: int
    version: int
    packet: Packet
    kind: int = STEP
    index: int = -1  # its place in the log file, from 0
    offset: int = -1  # its first byte in the log file


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
        if self.bytes and fsync:  # what a killed process left unsynced: durable before we go on
            _sync(self.file.fileno())
        self.written = self.synced = 0  # bytes ever written / made durable (tickets)
        self.base = -self.bytes  # ticket - base: the offset in the file
        self.syncs = 0
        self.error: OSError | None = None
        self._syncing = False
        self._running = True
        self._thread: threading.Thread | None = None

    def write(self, seq: int, version: int, packet: Packet, kind: int = STEP) -> int:
        """Write one record (not yet durable); returns the ticket to `wait` for."""
        body, crc = packet.to_buffers()
        length = sum(len(b) for b in body) + 4
        with self.cond:
            if self.error is not None:
                raise self.error
            head = _FRAME.pack(MAGIC, kind, seq, version, length, self.synced - self.base)
            _write_all(self.file, [head, _U32.pack(zlib.crc32(head)), *body, crc])
            size = HEADER + length
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
            self.synced = self.base = self.written  # the snapshot holds them
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self._running = False
            while self._syncing:
                self.cond.wait()
            self.file.close()
            self.cond.notify_all()

    @staticmethod
    def read(path: Path, cut: bool = False) -> LogReplay:
        """The log's whole records to replay (iterate), refusing damage unless `cut`.

        Raises DamageError (nothing changed) for damage other than a torn
        tail. The file changes only in `LogReplay.finish`, after replay.
        """
        return LogReplay(Path(path), cut)


@dataclass
class _Span:
    """Where one whole record lies in a log, and its header."""

    offset: int
    end: int
    kind: int
    seq: int
    version: int
    durable: int
    table: str


@dataclass
class _Break:
    """Where a log's run of whole records breaks, and why."""

    offset: int
    index: int
    reason: str
    torn: bool  # a record cut short at the very end: what a kill mid-write leaves


class LogReplay:
    """A log's whole records in order (iterate), and where the file must be cut.

    Built by `PacketLog.read`. Replay may `refuse` a record that cannot
    follow what came before it; `finish` then cuts the file (a torn tail, or
    damage when `cut` was asked for) and reports what it dropped.
    """

    def __init__(self, path: Path, cut: bool):
        self.path, self.cut = path, cut
        self.data = path.read_bytes() if path.exists() else b""
        self.spans, self.broken, after = _scan(self.data)
        self.whole = self.spans + after  # every whole record in the file
        self.stop = len(self.spans)
        if self.broken is not None and not self.broken.torn and not cut:
            raise self._error(self.broken)

    def __iter__(self) -> Iterator[LogRecord]:
        view = memoryview(self.data)
        k = 0
        while k < self.stop:  # `refuse` may lower stop meanwhile
            s = self.spans[k]
            packet = Packet.from_bytes(view[s.offset + HEADER:s.end])
            yield LogRecord(s.seq, s.version, packet, s.kind, k, s.offset)
            k += 1

    def refuse(self, record: LogRecord, reason: str) -> None:
        """`record` cannot follow the state before it: damage there (DamageError unless cut)."""
        brk = _Break(record.offset, record.index, reason, False)
        if not self.cut:
            raise self._error(brk)
        self.broken, self.stop = brk, record.index

    def _after(self, offset: int) -> tuple[list[_Span], int]:
        """(whole records starting at or after `offset`, the file's proven-fsync'd length).

        A record's claim covers only bytes before it (damage may have moved it).
        """
        durable = max((min(s.durable, s.offset) for s in self.whole), default=0)
        return [s for s in self.whole if s.offset >= offset], durable

    def _error(self, b: _Break) -> DamageError:
        follow, durable = self._after(b.offset + 1)
        acked = sum(s.end <= durable for s in follow)
        return DamageError(
            f"{self.path}: record {b.index} at byte {b.offset} is damaged ({b.reason}); "
            f"{len(follow)} whole record{'s' if len(follow) != 1 else ''} follow it, "
            f"at least {acked} of them acknowledged (fsync'd). Refused: no file was changed",
            self.path, b.offset, record=b.index, follow=len(follow), acknowledged=acked)

    def finish(self) -> dict | None:
        """Cut the file where replay ended; what was cut (None: nothing).

        A torn tail is cut as it is. Damage (only with `cut`) first has the
        cut bytes kept beside the log and a new history id written, then the
        file is cut: a crash in between leaves the damage to be cut again.
        """
        b = self.broken
        if b is None:
            return None
        dropped, durable = self._after(b.offset)
        report = {"file": str(self.path), "offset": b.offset, "record": b.index,
                  "reason": b.reason, "torn": b.torn, "bytes": len(self.data) - b.offset,
                  "records_dropped": len(dropped),
                  "acknowledged_dropped": sum(s.end <= durable for s in dropped),
                  "damaged_acknowledged": not b.torn and durable > b.offset,
                  "tables": _by_table(dropped), "kept": None}
        if not b.torn:
            kept = self.path.with_name(f"{self.path.name}.cut-at-{b.offset}-{time.time_ns()}")
            _write_durably(kept, memoryview(self.data)[b.offset:])
            new_history(self.path.parent)
            report["kept"] = str(kept)
        with open(self.path, "r+b") as f:
            f.truncate(b.offset)
            os.fsync(f.fileno())
        self.broken = None
        return report


def _by_table(spans: list[_Span]) -> dict[str, dict]:
    """Per table: how many records, and the ranges of their step numbers and versions."""
    out: dict[str, dict] = {}
    for s in spans:
        t = out.setdefault(s.table, {"records": 0, "seq": [s.seq, s.seq],
                                     "version": [s.version, s.version]})
        t["records"] += 1
        t["seq"] = [min(t["seq"][0], s.seq), max(t["seq"][1], s.seq)]
        t["version"] = [min(t["version"][0], s.version), max(t["version"][1], s.version)]
    return out


def _scan(data: bytes) -> tuple[list[_Span], _Break | None, list[_Span]]:
    """(the whole records from the start, where they break, the whole records after that)."""
    spans, pos = [], 0
    while pos < len(data):
        got = _parse(data, pos)
        if isinstance(got, _Span):
            spans.append(got)
            pos = got.end
            continue
        reason, may_be_torn = got
        after = _whole_after(data, pos + 1)
        return spans, _Break(pos, len(spans), reason, may_be_torn and not after), after
    return spans, None, []


def _parse(data: bytes, pos: int) -> _Span | tuple[str, bool]:
    """The whole record at `pos`, or (what is wrong, whether it may be one cut short at the end)."""
    head = data[pos:pos + HEADER]
    if len(head) < HEADER:
        return (f"{len(head)} bytes, too few for a record header",
                head[:len(MAGIC)] == MAGIC[:len(head)])
    magic, kind, seq, version, length, durable = _FRAME.unpack_from(head)
    if magic == _FORMAT_1:
        return "written by an earlier ekko (log format 1, without header checksums)", False
    if magic != MAGIC:
        return "no record starts here (bad magic)", False
    if zlib.crc32(head[:_FRAME.size]) != _U32.unpack_from(head, _FRAME.size)[0]:
        return "header checksum mismatch", False
    if kind not in (STEP, HEALTHY, ROLLBACK) or length < _MIN_PACKET or durable < 0:
        return f"impossible header (kind {kind}, length {length}, fsync'd {durable})", False
    end = pos + HEADER + length
    if end > len(data):
        return f"its {length}-byte packet runs {end - len(data)} bytes past the end", True
    try:
        packet = Packet.from_bytes(memoryview(data)[pos + HEADER:end])
    except PacketError as e:
        return str(e), False
    return _Span(pos, end, kind, seq, version, durable, packet.table)


def _whole_after(data: bytes, start: int) -> list[_Span]:
    """Every whole record found at or after `start` (each place the magic occurs is tried)."""
    out = []
    pos = data.find(MAGIC, start)
    while pos != -1:
        got = _parse(data, pos)
        if isinstance(got, _Span):
            out.append(got)
            pos = data.find(MAGIC, got.end)
        else:
            pos = data.find(MAGIC, pos + 1)
    return out


def log_summary(path: Path) -> dict:
    """A log's whole records: how many, how many a later record proves fsync'd, per table."""
    if not Path(path).exists():
        return {"records": 0, "acknowledged": 0, "tables": {}}
    log = LogReplay(Path(path), cut=True)  # only read: finish() is never called
    whole, durable = log._after(0)
    return {"records": len(whole), "acknowledged": sum(s.end <= durable for s in whole),
            "tables": _by_table(whole)}


def history(directory: Path) -> str:
    """The directory's history id: "" until a cut first dropped steps there."""
    try:
        return (Path(directory) / HISTORY).read_text().strip()
    except FileNotFoundError:
        return ""


def new_history(directory: Path) -> str:
    """Start a new history in `directory` (durably): replicas of the old one copy again."""
    token = os.urandom(8).hex()
    path = Path(directory) / HISTORY
    tmp = path.with_name(HISTORY + ".tmp")
    _write_durably(tmp, token.encode())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return token


def replace_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all (a temporary file renamed over it). Not
    fsync'd: for copies the engine can send again, it must survive a killed process, not
    a lost machine."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def set_aside(path: Path, suffix: str) -> Path:
    """Rename a damaged file out of the way (kept for inspection); returns its new path."""
    path = Path(path)
    target = path.with_name(path.name + suffix)
    os.replace(path, target)
    _fsync_dir(path.parent)
    return target


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


def _write_durably(path: Path, data: bytes | memoryview) -> None:
    """Write a whole file and fsync it and its directory."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(path.parent)


def save_arrays(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write arrays and a JSON header as one .npz, atomically (tmp, fsync, rename).

    The header lists every member's CRC-32 (`crc32`), so a member renamed or
    swapped with another, whose own CRC still holds, is caught on load.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            crcs = {name: _add_member(z, name, a) for name, a in arrays.items()}
            head = json.dumps({**meta, "crc32": crcs}).encode()
            _add_member(z, "__meta__", np.frombuffer(head, np.uint8))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _add_member(z: zipfile.ZipFile, name: str, a: np.ndarray) -> int:
    """One array as `name.npy` (what np.savez writes); returns its CRC-32."""
    with z.open(f"{name}.npy", "w", force_zip64=True) as m:
        np.lib.format.write_array(m, np.asanyarray(a), allow_pickle=False)
    return z.getinfo(f"{name}.npy").CRC


def load_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict] | None:
    """What save_arrays wrote, checked; None when there is no snapshot.

    Raises DamageError (naming the member and its offset) when a member is
    cut short, garbled, renamed, swapped or missing, and EkkoError when the
    file cannot be read. The .npz is uncompressed, so each array lies whole
    in the file: it is read straight into its own (writeable) array, one
    copy, its CRC-32 computed on the way (a 1 GiB replica snapshot loads
    several times faster than through zipfile's buffers).
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        with open(path, "rb") as f:
            arrays, crcs, offsets = _read_members(path, f)
    except OSError as e:
        raise EkkoError(f"cannot read {path}: {e.strerror or e}") from None
    if "__meta__" not in arrays:
        raise DamageError(f"{path}: has no __meta__ member (not an ekko snapshot, or garbled)",
                          path, 0, member="__meta__")
    meta = _meta(path, arrays.pop("__meta__"), offsets["__meta__"])
    listed = meta.pop("crc32", None)  # absent in snapshots of earlier ekko versions
    for name in sorted(set(listed) | set(arrays)) if listed is not None else []:
        if listed.get(name) != crcs.get(name):
            why = ("is missing" if name not in crcs else "is not listed in __meta__"
                   if name not in listed else "holds another array than __meta__ lists "
                   "(renamed or swapped)")
            at = offsets.get(name, offsets["__meta__"])
            raise DamageError(f"{path}: member {name!r} {why}", path, at, member=name)
    return arrays, meta


_ZIP_ERRORS = (zipfile.BadZipFile, ValueError, struct.error, EOFError, OverflowError,
               IndexError, KeyError, NotImplementedError, TypeError)


def _read_members(path: Path, f) -> tuple[dict[str, np.ndarray], dict[str, int], dict[str, int]]:
    """Every member: (arrays, their CRC-32s, their offsets), each checked against the zip's."""
    size = os.fstat(f.fileno()).st_size
    try:
        infos = zipfile.ZipFile(f).infolist()
    except _ZIP_ERRORS as e:
        raise DamageError(f"{path}: its zip directory (at the end of the file) cannot be read "
                          f"({e}): cut short or garbled", path, size) from None
    arrays, crcs, offsets = {}, {}, {}
    for info in infos:
        name = info.filename.removesuffix(".npy")
        if name in arrays:
            raise DamageError(f"{path}: member {name!r} appears twice in the zip directory",
                              path, info.header_offset, member=name)
        arrays[name], crcs[name], offsets[name] = _read_member(path, f, info, size)
    return arrays, crcs, offsets


def _read_member(path: Path, f, info: zipfile.ZipInfo, size: int) -> tuple[np.ndarray, int, int]:
    """One uncompressed .npy member read in place: (array, CRC-32, offset of its bytes)."""
    name = info.filename.removesuffix(".npy")

    def damaged(why: str, at: int) -> DamageError:
        return DamageError(f"{path}: member {name!r} at byte {at} is damaged ({why})", path, at,
                           member=name)

    at = info.header_offset
    if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
        raise damaged("not an uncompressed .npy member", at)
    if not 0 <= at < size:
        raise damaged("the zip directory points outside the file", at)
    f.seek(at)
    local = f.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise damaged("no zip header where the directory points", at)
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    raw = f.read(name_len).decode("utf-8" if info.flag_bits & 0x800 else "cp437", "replace")
    if raw != info.orig_filename:
        raise damaged(f"its zip header names {raw!r}", at)
    start = at + 30 + name_len + extra_len
    if start + info.file_size > size:
        raise damaged(f"its {info.file_size} bytes run past the end of the file", start)
    f.seek(start)
    try:
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(f)]
        shape, fortran, dtype = read_header(f)
    except Exception as e:  # noqa: BLE001 - numpy's header parser raises what its tokenizer does

        raise damaged(f"no .npy header: {e}", start) from None
    head = f.tell() - start
    nbytes = _prod(shape) * dtype.itemsize
    if fortran or dtype.kind not in "biuf" or dtype.fields is not None or dtype.shape != () \
            or head + nbytes != info.file_size:
        raise damaged(f"its .npy header ({dtype}, shape {shape}) does not fit its "
                      f"{info.file_size} bytes", start)
    f.seek(start)
    crc = zlib.crc32(f.read(head))
    a = np.empty(shape, dtype)
    view = memoryview(a.reshape(-1).view(np.uint8))
    if f.readinto(view) != nbytes:
        raise damaged("cut short", start)
    if zlib.crc32(view, crc) != info.CRC:
        raise damaged("checksum mismatch", start)
    return a, info.CRC, start


def _prod(shape: tuple) -> int:
    n = 1
    for d in shape:
        if not isinstance(d, int) or d < 0:
            raise ValueError(f"bad dimension {d!r}")
        n *= d
    return n


def _meta(path: Path, raw: np.ndarray, at: int) -> dict:
    """The snapshot's JSON header (a dict; `crc32` maps member names to CRC-32s)."""
    try:
        meta = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, ValueError):
        meta = None
    crcs = meta.get("crc32", {}) if isinstance(meta, dict) else None
    if not isinstance(crcs, dict) or not all(isinstance(v, int) for v in crcs.values()):
        raise DamageError(f"{path}: member '__meta__' at byte {at} is not ekko's JSON header",
                          path, at, member="__meta__")
    return meta


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


__all__ = ["HEADER", "HEALTHY", "MAGIC", "ROLLBACK", "STEP", "DamageError", "LogRecord",
           "LogReplay", "PacketLog", "bump_counter", "history", "load_arrays", "log_summary",
           "new_history", "read_counter", "save_arrays", "set_aside"]
