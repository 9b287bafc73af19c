"""Damaged durable logs and snapshots, and what a primary shard's next start makes of them.

A case writes a real log (`PacketLog`, records of two tables and three
kinds, fsync'd at chosen points), a real snapshot (`save_arrays`), or a
primary shard's directory (`ShardServer` steps, perhaps a snapshot between
them), then damages it: bytes flipped, zeroed, inserted or deleted in a
record's header, packet or checksums, between records or at the tail, or
the file cut short; a snapshot's bytes the same way, or two members'
names or bytes swapped, or one renamed. The oracle (docs/engine.md,
"Damaged logs and snapshots"), from what it wrote and what it changed:

* a torn tail (a record cut short at the end, nothing whole after it) is
  cut, and every record before it replays;
* any other damage is refused with one DamageError naming the file, the
  first damaged record, its offset, the whole records after it and how many
  of those a later record proves acknowledged; no file changes;
* with the opt-in cut the records before the damage replay, the file ends
  there, the report names exactly the whole records dropped, the cut bytes
  are kept and the history id changes;
* a snapshot loads to the very arrays saved or is refused naming the file;
* a shard holds exactly the steps of the snapshot and the replayed records;
* never a traceback.
"""

from __future__ import annotations

import random
import struct
import tempfile
import traceback
import zipfile
from pathlib import Path

import numpy as np

from ekko.engine.durable import (HEADER, MAGIC, DamageError, PacketLog, history, load_arrays,
                                 save_arrays)
from ekko.engine.packet import Packet
from ekko.kernels.errors import EkkoError

# where each part of a record lies, from its first byte (negative: from its end)
PARTS = {"magic": (0, 4), "kind": (4, 8), "seq": (8, 16), "version": (16, 24),
         "length": (24, 32), "fsynced": (32, 40), "header crc": (40, 44),
         "packet header": (44, 76), "name": (76, 77), "ids": (77, 90), "rows": (-20, -4),
         "packet crc": (-4, 0)}
HOWS = ["flip", "flip", "zero", "insert", "delete", "cut"]
MODEL = """model fuzzed {
  defaults { dim 4; dtype f32; optimizer rowwise_adagrad(lr=0.05, eps=1e-8); }
  table a { rows 40; serving f32; }
  table b { rows 24; dim 3; serving int8; optimizer adam(lr=0.01); }
}"""


# ------------------------------------------------------------------ generating


def _damage(rng: random.Random) -> dict:
    how = rng.choice(HOWS)
    where = rng.choice([*PARTS, "between", "between", "tail", "anywhere"])
    return {"how": how, "where": where, "record": rng.randrange(1 << 16), "n": rng.choice(
        [1, 1, 2, 3, 8, 45, 200]), "pick": rng.random(), "byte": rng.randrange(1, 256),
        "prefix": rng.random() < 0.3}


def _snapshot_damage(rng: random.Random) -> dict:
    how = rng.choice(["flip", "flip", "zero", "insert", "delete", "cut", "swap names",
                      "swap bytes", "rename"])
    return {"how": how, "where": rng.choice(["member", "anywhere", "directory", "meta"]),
            "pick": rng.random(), "pick2": rng.random(), "n": rng.choice([1, 1, 2, 8, 64]),
            "byte": rng.randrange(1, 256)}


def generate(rng: random.Random) -> dict:
    kind = rng.choice(["log", "log", "log", "snapshot", "shard"])
    case = {"target": "durable", "kind": kind, "seed": rng.randrange(1 << 30),
            "cut": rng.random() < 0.4}
    if kind == "log":
        n = rng.choice([1, 2, 3, 5, 8])
        case.update(records=n, kinds=[rng.choice([0, 0, 0, 1, 2]) for _ in range(n)],
                    waits=[rng.random() < 0.5 for _ in range(n)], damage=_damage(rng))
    elif kind == "snapshot":
        case.update(members=rng.randrange(1, 5), damage=_snapshot_damage(rng))
    else:
        steps = rng.randrange(1, 7)
        case.update(steps=steps, snapshot_after=rng.choice([None, rng.randrange(steps)]))
        if case["snapshot_after"] is not None and rng.random() < 0.3:
            case.update(damaged="snapshot", damage=_snapshot_damage(rng))
        else:
            case.update(damaged="log", damage=_damage(rng))
    return case


# ------------------------------------------------------------------ damaging bytes


def _region(data: bytes, spans: list[tuple[int, int]], d: dict) -> int:
    """Where `d` damages a log (its first byte)."""
    k = d["record"] % len(spans) if spans else 0
    if d["where"] == "tail" or not spans:
        at = len(data)
    elif d["where"] == "between":
        at = spans[k][0]
    elif d["where"] == "anywhere":
        at = int(d["pick"] * len(data))
    else:
        lo, hi = PARTS[d["where"]]
        s, e = spans[k]
        lo, hi = (s + lo, s + hi) if lo >= 0 else (e + lo, e + hi)
        at = min(e - 1, max(s, lo + int(d["pick"] * max(1, hi - lo))))
    return at


def apply(data: bytes, at: int, d: dict, rng: random.Random) -> tuple[bytes, int]:
    """The damaged bytes, and how far the bytes after the damage moved (+n, -n or 0)."""
    out = bytearray(data)
    at = min(at, len(data))
    n = max(0, min(d["n"], len(data) - at))
    how = d["how"]
    if how == "cut":
        return bytes(out[:at]), 0
    if how == "insert":
        junk = (MAGIC * d["n"])[:d["n"]] if d.get("prefix") else \
            bytes(rng.randrange(256) for _ in range(d["n"]))
        out[at:at] = junk
        return bytes(out), len(junk)
    if how == "delete":
        del out[at:at + n]
        return bytes(out), -n
    for i in range(at, at + n):
        out[i] = 0 if how == "zero" else out[i] ^ d["byte"]
    return bytes(out), 0


# ------------------------------------------------------------------ the log oracle


def _expect(orig: bytes, spans: list[tuple[int, int]], new: bytes, shift: int) -> dict:
    """What reading `new` must give: where whole records stop, whether torn, who follows."""

    def intact_at(i: int, pos: int) -> bool:
        s, e = spans[i]
        return new[pos:pos + e - s] == orig[s:e]

    k = next((i for i, (s, _) in enumerate(spans) if not intact_at(i, s)), len(spans))
    offset = spans[k][0] if k < len(spans) else len(orig)
    if len(new) == offset:  # whole records, then nothing: it reads whole (a known limit)
        return {"clean": True, "k": k}
    # a record after the damage survives where it was, or moved by the insertion or deletion
    # (even one that began before it, when the bytes put in repeat the ones pushed along)
    found = {i: next((c for c in (s + shift, s) if c > offset and intact_at(i, c)), None)
             for i, (s, _) in enumerate(spans) if i >= k}
    follow = [i for i, c in found.items() if c is not None]
    moved = {i: found[i] for i in follow}
    tail = new[offset:]
    if k < len(spans) and len(tail) >= HEADER:
        torn = tail[:HEADER] == orig[offset:offset + HEADER] and len(tail) < spans[k][1] - offset
    else:
        torn = tail[:4] == MAGIC[:len(tail[:4])] and len(tail) < HEADER
    claims = [min(struct.unpack_from("<q", orig, spans[i][0] + 32)[0], moved[i]) for i in follow]
    durable = max(claims, default=0)
    acked = sum(moved[i] + spans[i][1] - spans[i][0] <= durable for i in follow)
    return {"clean": False, "k": k, "offset": offset, "torn": torn and not follow,
            "follow": follow, "acked": acked}


def _records_equal(got: list, want: list) -> str | None:
    if len(got) != len(want):
        return f"{len(got)} records replayed, {len(want)} expected"
    for r, (kind, seq, version, p) in zip(got, want):
        if (r.kind, r.seq, r.version, r.packet.table) != (kind, seq, version, p.table) or \
                r.packet.ids.tobytes() != p.ids.tobytes() or \
                r.packet.rows.tobytes() != p.rows.tobytes():
            return f"record {r.index} replayed other contents than written"
    return None


def _judge_log(path: Path, new: bytes, exp: dict, want: list, cut: bool, outcome) -> str | None:
    """None when the reader did what the spec says, else what it did wrong."""
    k = exp["k"]
    if isinstance(outcome, DamageError):
        e = outcome
        if cut:
            return f"cut=True raised: {e}"
        if exp["clean"] or exp["torn"]:
            return f"refused a {'whole log' if exp['clean'] else 'torn tail'}: {e}"
        if path.read_bytes() != new:
            return "a refused log was changed"
        wanted = (k, exp["offset"], len(exp["follow"]), exp["acked"])
        if (e.record, e.offset, e.follow, e.acknowledged) != wanted:
            return f"refusal names (record, offset, follow, acked) " \
                   f"{(e.record, e.offset, e.follow, e.acknowledged)}, expected {wanted}"
        head = f"{path}: record {k} at byte {exp['offset']} is damaged ("
        if not str(e).startswith(head) or f"{len(exp['follow'])} whole record" not in str(e):
            return f"refusal message: {e}"
        return None
    got, report = outcome
    if exp["clean"]:
        return _records_equal(got, want[:k]) or (None if report is None and path.read_bytes() == new
                                                 else "a whole log was cut")
    if not exp["torn"] and not cut:
        return f"damage at record {k} was accepted: {len(got)} records replayed, report {report}"
    bad = _records_equal(got, want[:k])
    if bad:
        return bad
    if path.read_bytes() != new[:exp["offset"]]:
        return f"the log was not cut at byte {exp['offset']}"
    if report is None or report["torn"] != exp["torn"] or report["offset"] != exp["offset"] \
            or report["record"] != k:
        return f"report {report} for a {'torn tail' if exp['torn'] else 'cut'} at {exp['offset']}"
    if exp["torn"]:
        return None if report["kept"] is None and history(path.parent) == "" else \
            "a torn tail was kept or started a new history"
    dropped = [want[i] for i in exp["follow"]]
    tables: dict[str, dict] = {}
    for _, seq, version, p in dropped:
        t = tables.setdefault(p.table, {"records": 0, "seq": [seq, seq], "version": [version] * 2})
        t["records"] += 1
        t["seq"] = [min(t["seq"][0], seq), max(t["seq"][1], seq)]
        t["version"] = [min(t["version"][0], version), max(t["version"][1], version)]
    if report["records_dropped"] != len(dropped) or report["tables"] != tables or \
            report["acknowledged_dropped"] != exp["acked"]:
        return f"the cut reports {report}, expected {len(dropped)} records {tables}"
    if Path(report["kept"]).read_bytes() != new[exp["offset"]:]:
        return "the kept bytes are not the bytes cut"
    return None if history(path.parent) != "" else "a cut started no new history"


def _write_log(path: Path, case: dict) -> tuple[list, list]:
    """The case's records through a real PacketLog: (their spans, (kind, seq, version, packet))."""
    rng = np.random.default_rng(case["seed"])
    log = PacketLog(path, fsync=True)
    spans, want, start = [], [], 0
    for i, (kind, wait) in enumerate(zip(case["kinds"], case["waits"])):
        n = 0 if kind else int(rng.integers(0, 6))
        p = Packet("ab"[i % 2], rng.integers(0, 40, n), rng.standard_normal((n, 3)).astype(
            np.float32), np.zeros(n, np.int64))
        end = log.write(i + 1, i + 1, p, kind)
        if wait:
            log.wait(end)
        spans.append((start, end))
        want.append((kind, i + 1, i + 1, p))
        start = end
    log.close()
    return spans, want


def _read(path: Path, cut: bool):
    try:
        log = PacketLog.read(path, cut=cut)
        got = list(log)
        return got, log.finish()
    except DamageError as e:
        return e


def run_log(case: dict) -> dict:
    rng = random.Random(case["seed"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "packets.log"
        spans, want = _write_log(path, case)
        orig = path.read_bytes()
        at = _region(orig, spans, case["damage"])
        new, shift = apply(orig, at, case["damage"], rng)
        path.write_bytes(new)
        exp = _expect(orig, spans, new, shift)
        bad = _judge_log(path, new, exp, want, case["cut"], _read(path, case["cut"]))
    return {"kind": "wrong", "detail": bad} if bad else {"kind": "ok"}


# ------------------------------------------------------------------ snapshots


def _snapshot_arrays(seed: int, members: int) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for k in range(members):
        dtype = ["float32", "int64", "uint8", "float16", "uint16"][k % 5]
        shape = (int(rng.integers(0, 6)), int(rng.integers(1, 5)))
        out[f"t{k}/{k % 2}"] = (rng.standard_normal(shape) * 100).astype(dtype)
    return out


def _damage_snapshot(path: Path, d: dict, rng: random.Random) -> None:
    data = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
    pick = infos[int(d["pick"] * len(infos))]
    other = infos[int(d["pick2"] * len(infos))]
    if d["how"] in ("swap names", "rename"):
        a = pick.filename.encode()
        b = other.filename.encode() if d["how"] == "swap names" else a[:-5] + b"X.npy"
        if len(a) == len(b):  # in the local headers and the directory alike
            hold = b"\xa5" * len(a)
            data = data.replace(a, hold).replace(b, a).replace(hold, b)
        path.write_bytes(data)
        return
    if d["how"] == "swap bytes":  # same-length runs of two members' bytes trade places
        i, j = (_data_start(data, m) + int(d["pick2"] * m.file_size) for m in (pick, other))
        n = min(d["n"], len(data) - max(i, j))
        out = bytearray(data)
        out[i:i + n], out[j:j + n] = data[j:j + n], data[i:i + n]
        path.write_bytes(bytes(out))
        return
    directory = min(len(data) - 1, 46 * len(infos) + 98)  # about its size, and the end record
    at = {"member": pick.header_offset + int(d["pick2"] * (pick.file_size + 40)),
          "directory": len(data) - 1 - int(d["pick2"] * directory),
          "meta": infos[-1].header_offset + int(d["pick2"] * (infos[-1].file_size + 40)),
          "anywhere": int(d["pick2"] * len(data))}[d["where"]]
    new, _ = apply(data, min(at, len(data)), d, rng)
    path.write_bytes(new)


def _data_start(data: bytes, info) -> int:
    """Where a zip member's bytes start: after its local header, name and extra field."""
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
    return info.header_offset + 30 + name_len + extra_len


def _judge_snapshot(path: Path, arrays: dict, meta: dict) -> str | None:
    try:
        got = load_arrays(path)
    except DamageError as e:
        if not str(e).startswith(f"{path}: ") or e.path != path:
            return f"the refusal names no file: {e}"
        return None
    if got is None:
        return "a damaged snapshot read as no snapshot"
    loaded, m = got
    if m != meta or set(loaded) != set(arrays) or any(
            loaded[k].dtype != a.dtype or loaded[k].shape != a.shape
            or loaded[k].tobytes() != a.tobytes() for k, a in arrays.items()):
        return "a damaged snapshot loaded other arrays than were saved"
    return None


def run_snapshot(case: dict) -> dict:
    rng = random.Random(case["seed"])
    arrays = _snapshot_arrays(case["seed"], case["members"])
    meta = {"tables": {"t": {"version": 3}}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "snapshot.npz"
        save_arrays(path, arrays, meta)
        _damage_snapshot(path, case["damage"], rng)
        bad = _judge_snapshot(path, arrays, meta)
    return {"kind": "wrong", "detail": bad} if bad else {"kind": "ok"}


# ------------------------------------------------------------------ a primary shard


_MODELS: dict = {}


def _model():
    """The fuzzed model, parsed once per worker."""
    if "m" not in _MODELS:
        import ekko

        _MODELS["m"] = ekko.parse_model(MODEL)
    return _MODELS["m"]


def _state(steps: list) -> dict:
    """Serving rows and versions after `steps` (table, ids, grads) from the initial rows."""
    import ekko
    from ekko.engine.primary import Primary

    p = Primary(ekko.compile_model(_model()), seed=7)
    for table, ids, grads in steps:
        p.step(table, ids, grads)
    return {n: (p.serving(n).tobytes(), p.versions(n).tobytes()) for n in p.tables}


def run_shard(case: dict) -> dict:
    from ekko.engine.actors import ShardConfig, ShardServer
    rng = random.Random(case["seed"])
    nrng = np.random.default_rng(case["seed"])
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ShardConfig(_model(), 0, 1, tmp, seed=7, on_damage="cut" if case["cut"] else "refuse")
        shard, steps, before = ShardServer(cfg), [], 0
        for i in range(case["steps"]):
            for t in _model().tables:
                ids = nrng.integers(0, t.rows, 5)
                grads = (nrng.standard_normal((5, t.dim)) * 0.1).astype(np.float32)
                shard.step(t.name, i + 1, ids, grads)
                steps.append((t.name, ids, grads))
            if case["snapshot_after"] == i:
                shard.snapshot()
                before = len(steps)
        shard.log.close()
        log, snap = Path(tmp) / "packets.log", Path(tmp) / "snapshot.npz"
        exp = None
        if case["damaged"] == "log":
            orig = log.read_bytes()
            starts = [r.offset for r in PacketLog.read(log)]
            spans = list(zip(starts, [*starts[1:], len(orig)]))
            at = _region(orig, spans, case["damage"])
            new, shift = apply(orig, at, case["damage"], rng)
            log.write_bytes(new)
            exp = _expect(orig, spans, new, shift)
        else:
            _damage_snapshot(snap, case["damage"], rng)
        target = log if exp is not None else snap
        files = {p: p.read_bytes() for p in (log, snap) if p.exists()}
        try:
            again = ShardServer(cfg)
        except DamageError as e:
            bad = (f"on_damage='cut' refused: {e}" if case["cut"] else
                   "a refused shard changed its files" if any(
                       p.read_bytes() != b for p, b in files.items()) else
                   f"the refusal names another file: {e}" if not str(e).startswith(f"{target}: ")
                   else f"refused a whole or torn log: {e}" if exp is not None and (
                       exp["clean"] or exp["torn"]) else None)
            return {"kind": "wrong", "detail": bad} if bad else {"kind": "ok"}
        cut = again.replayed["cut"]
        if exp is not None:
            if not exp["clean"] and not exp["torn"] and not case["cut"]:
                return {"kind": "wrong", "detail": f"damage at record {exp['k']} was accepted"}
            kept = before + exp["k"]
        else:  # a damaged snapshot cut starts over; a harmless byte changes nothing
            kept = 0 if cut is not None else len(steps)
        held = {n: tuple(a.tobytes() for a in again.serving(n)) for n in again.primary.tables}
        if held != _state(steps[:kept]):
            return {"kind": "wrong", "detail": f"the shard does not hold exactly its first {kept} "
                                               f"steps of {len(steps)} (cut: {cut})"}
    return {"kind": "ok"}


def run(case: dict) -> dict:
    """Build, damage, read and judge one case (in the worker)."""
    runner = {"log": run_log, "snapshot": run_snapshot, "shard": run_shard}[case["kind"]]
    try:
        return runner(case)
    except EkkoError as e:
        return {"kind": "wrong", "detail": f"an unexpected {type(e).__name__}: {e}"}
    except Exception:  # noqa: BLE001 - the oracle's finding
        return {"kind": "traceback", "detail": traceback.format_exc()[-1500:]}
