"""The durable log and snapshots never drop an acknowledged update (issue #17, item 1).

A kill mid-write leaves a torn tail: it is cut and every record before it
replays. Any other damage (in a record's header, packet or checksums,
between records, in a snapshot's members) is refused with one DamageError
naming the file, the record or member, its offset and the acknowledged
records after it, and no file changes; `cut=True` (Engine(...,
on_damage="cut")) cuts there and reports exactly what it dropped. Most
tests run a primary shard in this process; the last class runs engines on
Ray, where replicas holding rows of the dropped steps must copy the shard.
"""

from __future__ import annotations

import os
import re
import signal
import struct
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

import ekko
from ekko.engine.actors import ReplicaConfig, ReplicaServer, ShardConfig, ShardServer, shard_model
from ekko.engine.durable import (HEADER, DamageError, PacketLog, history, load_arrays,
                                 save_arrays)
from ekko.engine.packet import Packet
from ekko.engine.primary import Primary
from ekko.kernels.errors import EkkoError
from tests.cluster_model import MODEL, WAIT


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("durable") / "small.ekko"
    path.write_text(MODEL)
    return ekko.compile_model(path)


# -- a log of known records ---------------------------------------------------------------
def packet(k: int) -> Packet:
    rng = np.random.default_rng(k)
    n = 3 + k % 4
    rows = rng.standard_normal((n, 3)).astype(np.float32)
    return Packet("ab"[k % 2], rng.integers(0, 50, n), rows, np.zeros(n, np.int64))


def write_log(path: Path, n: int, fsync: bool = False) -> list[tuple[int, int]]:
    """n records (each fsync'd before the next is written); their (start, end) in the file."""
    log = PacketLog(path, fsync=fsync)
    spans, start = [], 0
    for k in range(n):
        end = log.write(k + 1, k + 1, packet(k))
        log.wait(end)
        spans.append((start, end))
        start = end
    log.close()
    return spans


def records(path: Path, cut: bool = False) -> tuple[list, dict | None]:
    log = PacketLog.read(path, cut=cut)
    got = list(log)
    return got, log.finish()


def damage(path: Path, at: int, how: str, n: int = 1) -> bytes:
    """Flip, zero, insert or delete n bytes at `at`; returns the file's new bytes."""
    data = bytearray(path.read_bytes())
    if how == "flip":
        for i in range(at, at + n):
            data[i] ^= 0x5A
    elif how == "zero":
        data[at:at + n] = bytes(n)
    elif how == "insert":
        data[at:at] = b"\x13" * n
    elif how == "delete":
        del data[at:at + n]
    path.write_bytes(bytes(data))
    return bytes(data)


# Where each part of a record lies, from its first byte (see engine/durable.py and packet.py).
PARTS = {"magic": 1, "kind": 4, "seq": 8, "version": 16, "length": 24, "fsync'd bytes": 33,
         "header checksum": 41, "packet header": HEADER + 6, "table name": HEADER + 32,
         "ids": HEADER + 34, "rows": -10, "packet checksum": -2}


# -- torn tails -------------------------------------------------------------------------------
def test_a_torn_tail_is_cut_at_every_length_and_everything_before_it_replays(tmp_path) -> None:
    """A kill can stop the last write after any byte: each such tail is torn, never damage."""
    path = tmp_path / "p.log"
    spans = write_log(path, 4)
    whole = path.read_bytes()
    start, end = spans[-1]
    for cut in range(start + 1, end):
        path.write_bytes(whole[:cut])
        got, report = records(path)
        assert [r.version for r in got] == [1, 2, 3], cut
        assert report["torn"] and report["offset"] == start and report["record"] == 3, cut
        assert report["records_dropped"] == 0 and report["kept"] is None
        assert path.read_bytes() == whole[:start], cut
    path.write_bytes(whole)
    got, report = records(path)
    assert report is None and [r.version for r in got] == [1, 2, 3, 4]
    for r, k in zip(got, range(4)):
        assert r.packet.ids.tolist() == packet(k).ids.tolist()
        assert r.packet.rows.tobytes() == packet(k).rows.tobytes()
        assert (r.index, r.offset) == (k, spans[k][0])


def test_log_keeps_whole_records_and_cuts_a_torn_tail(tmp_path: Path) -> None:
    log = PacketLog(tmp_path / "p.log")
    rng = np.random.default_rng(1)
    sent = []
    for v in range(1, 4):
        p = Packet("a", rng.integers(0, 9, 5), rng.standard_normal((5, 3)).astype(np.float32),
                   np.zeros(5, np.int64))
        log.append(v, v, p)
        sent.append(p)
    log.close()
    whole = (tmp_path / "p.log").stat().st_size
    with open(tmp_path / "p.log", "ab") as f:  # a record cut short by a kill mid-write
        f.write(open(tmp_path / "p.log", "rb").read()[:50])
    got, report = records(tmp_path / "p.log")
    assert [r.version for r in got] == [1, 2, 3]
    for r, p in zip(got, sent):
        assert r.packet.ids.tolist() == p.ids.tolist()
        assert r.packet.rows.tobytes() == p.rows.tobytes()
    assert report["torn"] and report["bytes"] == 50
    assert (tmp_path / "p.log").stat().st_size == whole


def test_log_group_commit_from_several_threads(tmp_path: Path) -> None:
    """Concurrent appends share syncs; each returns durable; every record reads back whole."""
    log = PacketLog(tmp_path / "p.log")

    def writer(k: int) -> None:
        for i in range(10):
            ids = np.full(3, k, np.int64)
            ticket = log.write(i, k * 100 + i, Packet("a", ids, np.full((3, 2), i, np.float32),
                                                      ids))
            log.wait(ticket)
            assert log.synced >= ticket

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert log.records == 60 and 0 < log.syncs <= 60 and log.synced == log.written
    log.close()
    got, report = records(tmp_path / "p.log")
    assert report is None
    assert sorted(r.version for r in got) == sorted(k * 100 + i for k in range(6)
                                                    for i in range(10))
    for r in got:  # each thread's records in its own order, rows intact
        assert r.packet.rows.tolist() == [[r.version % 100] * 2] * 3
        assert r.packet.ids.tolist() == [r.version // 100] * 3
    # each thread waited for its record's sync before writing its next, so the last record
    # written proves fsync'd every record but the six threads' last ones (some of those too)
    data = damage(tmp_path / "p.log", 20, "flip")
    with pytest.raises(DamageError, match="59 whole records follow it") as e:
        records(tmp_path / "p.log")
    assert 60 - 6 - 1 <= e.value.acknowledged <= 58
    assert (tmp_path / "p.log").read_bytes() == data


@pytest.mark.parametrize("tail", [b"E", b"EKL", b"EKL2\x00\x00"])
def test_a_header_cut_short_is_torn(tmp_path, tail) -> None:
    path = tmp_path / "p.log"
    write_log(path, 2)
    whole = path.read_bytes()
    path.write_bytes(whole + tail)
    got, report = records(path)
    assert len(got) == 2 and report["torn"] and path.read_bytes() == whole


# -- damage anywhere else is refused -------------------------------------------------------------
@pytest.mark.parametrize("part", sorted(PARTS))
@pytest.mark.parametrize("how", ["flip", "zero"])
def test_damage_in_any_part_of_a_middle_record_is_refused(tmp_path, part, how) -> None:
    path = tmp_path / "p.log"
    spans = write_log(path, 5)
    start, end = spans[2]
    at = start + PARTS[part] if PARTS[part] >= 0 else end + PARTS[part]
    before = path.read_bytes()
    data = damage(path, at, how, 2)
    if data == before:  # zeros over zeros (a step's kind is 0): no damage at all
        assert len(list(PacketLog.read(path))) == 5
        return
    with pytest.raises(DamageError) as e:
        PacketLog.read(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: record 2 at byte {start} is damaged (")
    assert "2 whole records follow it, at least 1 of them acknowledged" in msg
    err = e.value
    assert (err.record, err.offset, err.follow, err.acknowledged) == (2, start, 2, 1)
    assert path.read_bytes() == data  # nothing cut, nothing replayed


@pytest.mark.parametrize("part", sorted(PARTS))
def test_damage_in_the_last_record_is_refused_not_taken_for_a_torn_tail(tmp_path, part) -> None:
    """A kill leaves a prefix of what it wrote: a whole-length record failing a check is damage."""
    path = tmp_path / "p.log"
    spans = write_log(path, 3)
    start, end = spans[-1]
    at = start + PARTS[part] if PARTS[part] >= 0 else end + PARTS[part]
    data = damage(path, at, "flip")
    with pytest.raises(DamageError, match=rf"record 2 at byte {start} is damaged .*0 whole "
                                          r"records follow it"):
        PacketLog.read(path)
    assert path.read_bytes() == data


def test_a_length_past_the_end_is_torn_only_when_nothing_follows_and_its_header_checks(tmp_path):
    path = tmp_path / "p.log"
    spans = write_log(path, 4)
    whole = path.read_bytes()
    # (1) the last record's length field damaged to run past the end: its header checksum fails
    data = bytearray(whole)
    struct.pack_into("<q", data, spans[-1][0] + 24, 1 << 20)
    path.write_bytes(bytes(data))
    with pytest.raises(DamageError, match=r"record 3 .*\(header checksum mismatch\)"):
        PacketLog.read(path)
    # (2) the same length written whole by the writer (a record cut short): torn
    path.write_bytes(whole[:spans[-1][0] + HEADER + 5])
    got, report = records(path)
    assert len(got) == 3 and report["torn"]
    # (3) bytes gone from the middle: record 1's packet now runs past the end, yet whole records
    # still follow it, so it is no torn tail
    cut = whole[:spans[1][0] + HEADER + 5] + whole[spans[2][0]:]
    path.write_bytes(cut)
    with pytest.raises(DamageError, match=rf"record 1 at byte {spans[1][0]} is damaged "
                                          r"\(packet .*\); 2 whole records follow it"):
        PacketLog.read(path)
    assert path.read_bytes() == cut
    # (4) a valid header whose packet runs past the end, followed by whole records: damage
    head = whole[spans[1][0]:spans[1][0] + HEADER]
    path.write_bytes(whole[:spans[1][1]] + head + whole[spans[2][0]:])
    with pytest.raises(DamageError, match=r"record 2 .* 2 whole records follow it"):
        PacketLog.read(path)


@pytest.mark.parametrize("how, n, shift, record, follow", [
    ("insert", 1, 0, 3, 2),  # stray bytes where record 3 should start; 3 and 4 follow whole
    ("insert", 60, 0, 3, 2),
    ("delete", 3, -3, 2, 2),  # record 2's last bytes gone: its packet takes record 3's first
    ("zero", 8, -4, 2, 1),  # across the boundary: record 2's checksum, record 3's magic
    ("flip", 3, -1, 2, 1),
])
def test_damage_between_records_is_refused(tmp_path, how, n, shift, record, follow) -> None:
    path = tmp_path / "p.log"
    spans = write_log(path, 5)
    data = damage(path, spans[3][0] + shift, how, n)
    with pytest.raises(DamageError) as e:
        PacketLog.read(path)
    assert (e.value.record, e.value.offset, e.value.follow) == (record, spans[record][0], follow)
    assert path.read_bytes() == data


@pytest.mark.parametrize("tail", [b"\x00" * 8, b"\x00" * 200, b"garbage!", b"XKL2"])
def test_bytes_after_the_last_record_that_start_no_record_are_refused(tmp_path, tail) -> None:
    path = tmp_path / "p.log"
    spans = write_log(path, 2)
    path.write_bytes(path.read_bytes() + tail)
    with pytest.raises(DamageError, match=rf"record 2 at byte {spans[-1][1]} is damaged"):
        PacketLog.read(path)


def test_a_log_of_the_earlier_format_is_refused_plainly(tmp_path) -> None:
    path = tmp_path / "p.log"
    old = struct.pack("<4sIqqq", b"EKKL", 0, 1, 1, 40) + packet(0).to_bytes()
    path.write_bytes(old)
    with pytest.raises(DamageError, match="record 0 at byte 0 is damaged .*log format 1"):
        PacketLog.read(path)


def test_acknowledged_counts_only_what_a_later_record_proves_fsyncd(tmp_path) -> None:
    """Group commit: records written but not yet synced when the shard died are not acknowledged."""
    path = tmp_path / "p.log"
    log = PacketLog(path, fsync=True)
    ends = []
    for k in range(6):  # 0, 1 synced; 2..5 written together, then synced by one fdatasync
        ends.append(log.write(k + 1, k + 1, packet(k)))
        if k < 2:
            log.wait(ends[-1])
    log.sync()
    ends.append(log.write(7, 7, packet(6)))  # says 0..5 were fsync'd; itself unproven
    log.close()
    damage(path, ends[0] + 50, "flip")  # inside record 1
    with pytest.raises(DamageError, match="5 whole records follow it, at least 4 of them"):
        PacketLog.read(path)


# -- the opt-in cut -------------------------------------------------------------------------
def test_the_opt_in_cut_drops_exactly_the_damaged_record_and_what_follows(tmp_path) -> None:
    path = tmp_path / "p.log"
    spans = write_log(path, 6)
    whole = path.read_bytes()
    damage(path, spans[2][0] + 60, "flip")
    assert history(tmp_path) == ""
    got, report = records(path, cut=True)
    assert [r.version for r in got] == [1, 2]
    assert path.read_bytes() == whole[:spans[2][0]]
    kept = Path(report["kept"])
    assert kept.parent == tmp_path and kept.read_bytes()[:4] == whole[spans[2][0]:spans[2][0] + 4]
    assert len(kept.read_bytes()) == len(whole) - spans[2][0] == report["bytes"]
    assert report["offset"] == spans[2][0] and report["record"] == 2 and not report["torn"]
    assert "packet checksum mismatch" in report["reason"]
    # records 3, 4, 5 were whole: tables a (seq 4, 6) and b (seq 5); 4 and 5 proven fsync'd
    assert report["records_dropped"] == 3 and report["acknowledged_dropped"] == 2
    assert report["damaged_acknowledged"]
    assert report["tables"] == {"b": {"records": 2, "seq": [4, 6], "version": [4, 6]},
                                "a": {"records": 1, "seq": [5, 5], "version": [5, 5]}}
    assert history(tmp_path) != ""  # replicas of the old history must copy the shard again
    got, report = records(path)  # what is left reads clean
    assert [r.version for r in got] == [1, 2] and report is None


# -- snapshots ------------------------------------------------------------------------------
def arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {"a/0": rng.standard_normal((7, 3)).astype(np.float32),
            "a/1": rng.standard_normal((7, 3)).astype(np.float32),
            "a/2": np.arange(7, dtype=np.int64), "b/0": rng.integers(0, 255, (4, 9), np.uint8)}


def test_a_snapshot_loads_back_with_its_checksums(tmp_path) -> None:
    path = tmp_path / "s.npz"
    save_arrays(path, arrays(), {"tables": {"a": 3}})
    got, meta = load_arrays(path)
    assert meta == {"tables": {"a": 3}}
    for k, a in arrays().items():
        assert got[k].dtype == a.dtype and got[k].tobytes() == a.tobytes()
        assert got[k].flags.writeable
    assert load_arrays(tmp_path / "none.npz") is None
    # one written by an earlier ekko (np.savez, no checksum list) still loads
    np.savez(path, __meta__=np.frombuffer(b'{"x": 1}', np.uint8), **arrays())
    got, meta = load_arrays(path)
    assert meta == {"x": 1} and got["a/1"].tobytes() == arrays()["a/1"].tobytes()


def test_every_byte_of_a_snapshot_flipped_is_refused_or_harmless(tmp_path) -> None:
    """A flip anywhere: a DamageError naming the file, or the very same arrays (zip fields
    nobody reads, such as timestamps). Never other arrays."""
    path = tmp_path / "s.npz"
    save_arrays(path, arrays(), {"v": 1})
    whole = path.read_bytes()
    refused = 0
    for i in range(len(whole)):
        data = bytearray(whole)
        data[i] ^= 0xFF
        path.write_bytes(bytes(data))
        try:
            got, meta = load_arrays(path)
        except DamageError as e:
            assert str(e).startswith(f"{path}: ") and e.path == path
            refused += 1
            continue
        assert meta == {"v": 1}, i
        assert {k: a.tobytes() for k, a in got.items()} == \
            {k: a.tobytes() for k, a in arrays().items()}, i
    assert refused > len(whole) // 2  # most bytes are checked (79% of them when written)
    for n in range(len(whole)):  # cut short anywhere
        path.write_bytes(whole[:n])
        with pytest.raises(DamageError):
            load_arrays(path)


def members(path: Path) -> dict[str, zipfile.ZipInfo]:
    with zipfile.ZipFile(path) as z:
        return {i.filename: i for i in z.infolist()}


def test_a_garbled_member_is_named_with_its_offset(tmp_path) -> None:
    path = tmp_path / "s.npz"
    save_arrays(path, arrays(), {})
    info = members(path)["a/1.npy"]
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len
    data[start + 200] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(DamageError, match=rf"member 'a/1' at byte {start} is damaged \(checksum"):
        load_arrays(path)


def test_swapped_or_renamed_members_are_refused(tmp_path) -> None:
    """a/0 and a/1 have the same size: swapping their names keeps every zip checksum valid."""
    path = tmp_path / "s.npz"
    save_arrays(path, arrays(), {})
    data = path.read_bytes()
    swapped = data.replace(b"a/0.npy", b"a/X.npy").replace(b"a/1.npy", b"a/0.npy") \
        .replace(b"a/X.npy", b"a/1.npy")
    path.write_bytes(swapped)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # zip's own checks pass
    with pytest.raises(DamageError, match="member 'a/0' holds another array than __meta__ "
                                          "lists .renamed or swapped."):
        load_arrays(path)
    path.write_bytes(data.replace(b"b/0.npy", b"b/7.npy"))
    with pytest.raises(DamageError, match="member 'b/0' is missing"):
        load_arrays(path)


# -- a primary shard ------------------------------------------------------------------------------
def run_steps(shard: ShardServer, model, n: int, seed: int = 2, start: int = 0) -> list:
    rng = np.random.default_rng(seed)
    steps = []
    for i in range(start, start + n):
        for t in model.model.tables:
            ids = rng.integers(0, t.rows, 30)
            grads = (rng.standard_normal((30, t.dim)) * 0.1).astype(np.float32)
            shard.step(t.name, i + 1, ids, grads)
            steps.append((t.name, ids, grads))
    return steps


def assert_holds(shard: ShardServer, model, steps: list, seed: int = 3) -> None:
    """The shard's serving rows and versions are those of exactly `steps`, applied in order."""
    ref = Primary(ekko.compile_model(shard_model(model.model, 0, 1)), seed=seed)
    for table, ids, grads in steps:
        ref.step(table, ids, grads)
    for t in model.model.tables:
        serving, versions = shard.serving(t.name)
        assert serving.tobytes() == ref.serving(t.name).tobytes(), t.name
        assert np.array_equal(versions, ref.versions(t.name)), t.name


def log_spans(path: Path) -> list[int]:
    return [r.offset for r in PacketLog.read(path)]


def test_a_flipped_byte_in_a_shards_log_refuses_to_start(model, tmp_path) -> None:
    """Issue #17's report: the next start replayed up to the damage, silently dropped the rest."""
    cfg = ShardConfig(model.model, 0, 1, str(tmp_path / "primary-0"), seed=3)
    steps = run_steps(ShardServer(cfg), model, 4)  # no close: as after a kill -9
    log = tmp_path / "primary-0" / "packets.log"
    offsets = log_spans(log)
    data = damage(log, offsets[5] + 100, "flip")
    with pytest.raises(DamageError) as e:
        ShardServer(cfg)
    msg = str(e.value)
    assert msg.startswith(f"{log}: record 5 at byte {offsets[5]} is damaged (packet checksum "
                          "mismatch")
    assert "6 whole records follow it, at least 5 of them acknowledged" in msg
    assert "on_damage='cut'" in msg
    assert log.read_bytes() == data
    # the opt-in: the steps before the damage, a report, the cut bytes kept, a new history
    shard = ShardServer(ShardConfig(model.model, 0, 1, str(tmp_path / "primary-0"), seed=3,
                                    on_damage="cut"))
    assert_holds(shard, model, steps[:5])
    cut = shard.replayed["cut"]
    assert (cut["record"], cut["offset"], cut["records_dropped"]) == (5, offsets[5], 6)
    assert cut["tables"] == {"a": {"records": 2, "seq": [3, 4], "version": [3, 4]},
                             "d": {"records": 2, "seq": [3, 4], "version": [3, 4]},
                             "e": {"records": 2, "seq": [3, 4], "version": [3, 4]}}
    assert Path(cut["kept"]).read_bytes() == data[offsets[5]:]
    assert shard.history() == history(tmp_path / "primary-0") != ""
    assert shard.last_seq == {"a": 2, "d": 2, "e": 1}  # records: a1 d1 e1 a2 d2 |e2
    # it goes on from there, and a later start replays the log it writes
    more = run_steps(shard, model, 2, seed=9, start=2)
    again = ShardServer(cfg)
    assert_holds(again, model, steps[:5] + more)
    assert again.replayed["cut"] is None


def test_a_torn_tail_on_a_shard_loses_no_acknowledged_step(model, tmp_path) -> None:
    cfg = ShardConfig(model.model, 0, 1, str(tmp_path / "primary-0"), seed=3)
    steps = run_steps(ShardServer(cfg), model, 3)
    log = tmp_path / "primary-0" / "packets.log"
    with open(log, "ab") as f:  # a kill in the middle of writing the next step's record
        f.write(log.read_bytes()[:70])
    again = ShardServer(cfg)
    assert_holds(again, model, steps)
    assert again.replayed["cut"]["torn"]
    assert history(tmp_path / "primary-0") == ""


def test_a_damaged_snapshot_refuses_to_start_or_with_the_opt_in_starts_over(model, tmp_path):
    d = tmp_path / "primary-0"
    cfg = ShardConfig(model.model, 0, 1, str(d), seed=3)
    shard = ShardServer(cfg)
    run_steps(shard, model, 2)
    shard.snapshot()
    run_steps(shard, model, 2, start=2)
    info = members(d / "snapshot.npz")["d/1.npy"]
    data = bytearray((d / "snapshot.npz").read_bytes())
    data[info.header_offset + 300] ^= 4
    (d / "snapshot.npz").write_bytes(bytes(data))
    log = (d / "packets.log").read_bytes()
    with pytest.raises(DamageError, match=r"snapshot.npz: member 'd/1' at byte \d+ is damaged "
                                          r"\(checksum mismatch\); the log after it holds 6 "
                                          r"whole records, at least 5 of them acknowledged"):
        ShardServer(cfg)
    assert (d / "snapshot.npz").read_bytes() == bytes(data)
    assert (d / "packets.log").read_bytes() == log
    shard = ShardServer(ShardConfig(model.model, 0, 1, str(d), seed=3, on_damage="cut"))
    assert_holds(shard, model, [])  # from the start: the log continued the lost snapshot
    cut = shard.replayed["cut"]
    assert cut["member"] == "d/1" and cut["records_dropped"] == 6
    assert Path(cut["kept"]).read_bytes() == bytes(data)
    assert Path(cut["log_kept"]).read_bytes() == log
    assert not (d / "snapshot.npz").exists() and shard.history() != ""


def test_a_log_without_the_snapshot_it_continues_is_refused(model, tmp_path) -> None:
    """A lost snapshot must not let the log replay onto the initial rows: a state never acked."""
    d = tmp_path / "primary-0"
    cfg = ShardConfig(model.model, 0, 1, str(d), seed=3)
    shard = ShardServer(cfg)
    run_steps(shard, model, 2)
    shard.snapshot()
    run_steps(shard, model, 2, start=2)
    (d / "snapshot.npz").unlink()
    with pytest.raises(DamageError, match=r"record 0 at byte 0 is damaged \(it continues table "
                                          r"'a' at version 3, but the shard holds version 0"):
        ShardServer(cfg)
    shard = ShardServer(ShardConfig(model.model, 0, 1, str(d), seed=3, on_damage="cut"))
    assert_holds(shard, model, [])
    assert shard.replayed["cut"]["records_dropped"] == 6


def test_a_snapshot_of_another_model_is_refused_even_with_the_opt_in(model, tmp_path) -> None:
    d = tmp_path / "primary-0"
    ShardServer(ShardConfig(model.model, 0, 1, str(d), seed=3)).snapshot()
    other = ekko.compile_model(ekko.parse_model(MODEL.replace("rows 300", "rows 301")))
    for how in ("refuse", "cut"):
        with pytest.raises(EkkoError, match="holds no table 'a' of this shard's shape"):
            ShardServer(ShardConfig(other.model, 0, 1, str(d), seed=3, on_damage=how))
    assert (d / "snapshot.npz").exists()


def test_a_shard_ray_restarts_never_cuts(model, tmp_path, monkeypatch) -> None:
    """Under a running engine the replicas hold rows of the steps a cut would drop."""
    import ekko.engine.actors as actors

    cfg = ShardConfig(model.model, 0, 1, str(tmp_path / "primary-0"), seed=3, on_damage="cut")
    run_steps(ShardServer(cfg), model, 2)
    log = tmp_path / "primary-0" / "packets.log"
    data = damage(log, 60, "flip")
    monkeypatch.setattr(actors, "_restarted_by_ray", lambda: True)
    with pytest.raises(DamageError, match="applies when an engine starts on this directory"):
        ShardServer(cfg)
    assert log.read_bytes() == data


def test_a_replica_with_a_damaged_snapshot_starts_empty_and_says_why(model, tmp_path) -> None:
    """A replica is a copy the shards can always give again: it must not refuse to start."""
    d = tmp_path / "replica-0"
    cfg = ReplicaConfig(model.model, 0, [], str(d))
    r = ReplicaServer(cfg)
    r.merge_from(Packet("a", [3], np.full((1, 8), 2.0, np.float32), [1], newest=1), None)
    r.snapshot()
    assert ReplicaServer(cfg).serving("a")[3].tolist() == [2.0] * 8
    data = bytearray((d / "snapshot.npz").read_bytes())
    data[len(data) // 3] ^= 1
    (d / "snapshot.npz").write_bytes(bytes(data))
    again = ReplicaServer(cfg)
    assert not again.restored_from_snapshot
    assert again.snapshot_damage.startswith(f"{d / 'snapshot.npz'}: ")
    assert again.versions("a").tolist() == [-1] * 300
    assert (d / "snapshot.npz.damaged").read_bytes() == bytes(data)
    assert not (d / "snapshot.npz").exists()


def test_the_engine_option_is_checked_before_ray_starts(model) -> None:
    with pytest.raises(EkkoError, match="on_damage must be 'refuse' or 'cut', got 'drop'"):
        ekko.Engine(model, cluster="local", on_damage="drop")
    with pytest.raises(EkkoError, match="on_damage: only with cluster="):
        ekko.Engine(model, on_damage="cut")


# -- engines on Ray: a new engine on a damaged directory ----------------------------------------
@pytest.fixture(scope="class")
def local_ray():
    ray = pytest.importorskip("ray")
    from ekko.engine.cluster import connect

    if ray.is_initialized():
        ray.shutdown()
    connect("local")
    yield
    ray.shutdown()


def assert_replicas_match(engine) -> None:
    for r in engine.replicas:
        for name in engine.primary.tables:
            assert r.serving(name).tobytes() == engine.primary.serving(name).tobytes(), \
                (r.index, name)
            assert np.array_equal(r.versions(name), engine.primary.versions(name)), (r.index, name)


@pytest.mark.usefixtures("local_ray")
class TestOnRay:
    def test_a_new_engine_refuses_a_damaged_log_or_cuts_it_and_its_replicas_follow(
            self, model, tmp_path) -> None:
        d = tmp_path / "engine"
        rng = np.random.default_rng(8)
        steps = []

        def step(engine) -> None:
            for t in model.model.tables:
                ids = rng.integers(0, t.rows, 40)
                grads = (rng.standard_normal((40, t.dim)) * 0.1).astype(np.float32)
                engine.step(t.name, ids, grads)
                steps.append((t.name, ids, grads))

        with ekko.Engine(model, replicas=2, cluster="local", directory=d, seed=3) as engine:
            for _ in range(4):
                step(engine)
            engine.flush(WAIT)
            for r in engine.replicas:  # their snapshots hold every step, the dropped ones too
                r.snapshot()
        engine.shutdown()
        log = d / "primary-0" / "packets.log"
        offsets = log_spans(log)
        data = damage(log, offsets[7] + 5, "flip")  # record 7's kind: its header checksum fails
        with pytest.raises(EkkoError, match=re.escape(f"{log}: record 7 at byte {offsets[7]} is "
                                                      "damaged (header checksum mismatch); 4 "
                                                      "whole records follow it")):
            ekko.Engine(model, replicas=1, cluster="local", directory=d, seed=3)
        assert log.read_bytes() == data
        with pytest.warns(UserWarning, match="dropped 4 whole records"):
            engine = ekko.Engine(model, replicas=2, cluster="local", directory=d, seed=3,
                                 on_damage="cut")
        with engine:
            ref = Primary(ekko.compile_model(shard_model(model.model, 0, 1)), seed=3)
            for table, ids, grads in steps[:7]:  # the reference: the steps before the damage
                ref.step(table, ids, grads)
            for t in model.model.tables:
                assert engine.primary.serving(t.name).tobytes() == ref.serving(t.name).tobytes()
            assert_replicas_match(engine)  # they copied the shard over the dropped steps' rows
            s = engine.stats()
            assert s["replayed"][0]["cut"]["records_dropped"] == 4
            assert all(any(c["reason"] == "history cut" for c in r["catch_ups"])
                       for r in s["replicas"])
            step(engine)
            engine.flush(WAIT)
            assert_replicas_match(engine)
        engine.shutdown()

    def test_a_damaged_replica_snapshot_is_rebuilt_from_the_shards(self, model, tmp_path) -> None:
        d = tmp_path / "engine"
        rng = np.random.default_rng(4)
        with ekko.Engine(model, replicas=2, cluster="local", directory=d) as engine:
            engine.step("a", rng.integers(0, 300, 50),
                        (rng.standard_normal((50, 8)) * 0.1).astype(np.float32))
            engine.flush(WAIT)
            engine.replicas[1].snapshot()
        engine.shutdown()
        snap = d / "replica-1" / "snapshot.npz"
        data = bytearray(snap.read_bytes())
        data[100] ^= 1
        snap.write_bytes(bytes(data))
        with ekko.Engine(model, replicas=2, cluster="local", directory=d) as engine:
            assert_replicas_match(engine)  # caught up before the engine returned
            r1 = engine.stats()["replicas"][1]
            assert r1["snapshot_damage"].startswith(f"{snap}: ")
            assert not r1["restored_from_snapshot"]
        engine.shutdown()
        assert (d / "replica-1" / "snapshot.npz.damaged").exists()

    def test_a_shard_killed_under_a_running_engine_never_cuts(self, model, tmp_path) -> None:
        """on_damage="cut" is for a new engine: a restart under this one refuses, and says why."""
        log = tmp_path / "engine" / "primary-0" / "packets.log"
        with ekko.Engine(model, replicas=1, cluster="local", directory=tmp_path / "engine",
                         on_damage="cut") as engine:
            for k in range(3):
                engine.step("a", [k], np.full((1, 8), 0.1, np.float32))
            data = damage(log, 60, "flip")
            os.kill(engine.primary.pids[0], signal.SIGKILL)
            with pytest.raises(EkkoError, match=re.escape(f"{log}: record 0 at byte 0 is damaged")
                               + ".*applies when an engine starts on this directory"):
                engine.step("a", [1], np.zeros((1, 8), np.float32))
        engine.shutdown()
        assert log.read_bytes() == data
