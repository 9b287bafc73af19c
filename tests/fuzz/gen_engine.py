"""The update engine driven from several threads at once, with bad input and bad packets.

A case is an engine set-up (replicas, scheduler policy, packet size, wire
encoding, a budget, automatic checks) and a list of operations per thread:
`step` (good deltas, harmful ones that trigger a rollback, deltas whose sums
overflow, and bad input: ids out of range or not integers, 2**64-1, ragged
lists, wrong dims, float64 or NaN gradients, torch bf16 and sparse tensors,
an unknown table), `flush`, `lookup` (good and out-of-range ids), `check`,
`rollback` (a check whose score hook says no), and `merge` into a replica of
a packet packed from the primary earlier (stale, must be harmless), garbled
(a flipped byte, a cut) or mutated with its CRC recomputed so that only the
semantic checks can catch it (a version past the newest issued or negative,
an id outside the table, a non-finite value or scale, an unknown table, a
wrong width, header fields that disagree with the body).

Half the cases first run a previous engine on the same compiled model and
leave it running: the case's engine takes the tables over and numbers on
from their versions (as a notebook cell run again does), and the previous
one must refuse further steps.

A third of the cases place the replicas in regions (engine/regions.py: relay
or star, compressed or not, a WAN budget or none) and add `cut` and `heal`
of a region to the operations (the primary's region must be refused); every
region is healed before the final flush, so anti-entropy must have repaired
whatever the cuts lost while the other threads stepped, merged and checked.

The oracle (in the worker): every call returns or raises `ekko.EkkoError`;
every bad input and every damaged packet is refused; and after the threads
end and a final `flush`, every replica is byte-identical to the primary
(serving rows and versions), or `flush` raised / `check()` failed: a
difference is never silent.
"""

from __future__ import annotations

import random
import threading
import traceback
import zlib
from typing import Any

MODEL = """
model fuzz {
  defaults { dim 8; dtype f32; optimizer rowwise_adagrad(lr=0.05, eps=1e-8); }
  table a { rows 97; serving f32; }
  table b { rows 64; dim 7; serving f16; optimizer sgd(lr=0.1); }
  table c { rows 50; serving bf16; optimizer adagrad(lr=0.1); }
  table d { rows 120; dim 16; serving int8; }
  table e { rows 40; dim 5; serving int4; optimizer adam(lr=0.01); }
  table g { rows 30; dim 4; dtype f16; optimizer sgd(lr=0.1); }
  feature fa -> a pooling sum;
  feature fd -> d pooling mean;
  feature fe -> e pooling sum;
}
"""
TABLES = {"a": (97, 8), "b": (64, 7), "c": (50, 8), "d": (120, 16), "e": (40, 5), "g": (30, 4)}
FEATURES = {"fa": "a", "fd": "d", "fe": "e"}
BAD_STEPS = ["id_out", "id_negative", "float_ids", "uint64_max", "ragged", "wrong_dim",
             "f64_grads", "nan_grads", "unknown_table", "torch_bf16", "torch_sparse",
             "gathered_out", "gathered_nan_scale", "gathered_short"]
GOOD_STEPS = ["plain", "plain", "plain", "empty", "duplicates", "torch_grad", "harmful",
              "overflow", "gathered", "gathered"]
MUTATIONS = ["version_ahead", "version_negative", "id_out", "nonfinite", "unknown_table",
             "wrong_width", "header_n", "header_width", "header_dtype", "header_name_len",
             "header_format", "header_flags", "flip", "cut"]
TIMEOUT_S = 30.0  # the final flush


# ----------------------------------------------------------------- generating


def _op(rng: random.Random, regions: dict | None) -> dict:
    kinds, weights = ["step", "flush", "lookup", "check", "rollback", "merge"], [10, 2, 3, 2, 1, 4]
    if regions:
        kinds, weights = kinds + ["cut", "heal"], weights + [2, 2]
    kind = rng.choices(kinds, weights)[0]
    op: dict[str, Any] = {"op": kind, "seed": rng.randrange(1 << 30),
                          "table": rng.choice(sorted(TABLES))}
    if kind == "step":
        op["how"] = rng.choice(BAD_STEPS) if rng.random() < 0.3 else rng.choice(GOOD_STEPS)
        op["n"] = rng.choice([1, 3, 16, 64])
    elif kind == "lookup":
        op["feature"] = rng.choice(sorted(FEATURES))
        op["bad"] = rng.random() < 0.3
    elif kind == "merge":
        op["how"] = "stale" if rng.random() < 0.3 else rng.choice(MUTATIONS)
        op["n"] = rng.choice([1, 4, 20])
    elif kind in ("cut", "heal"):
        op["region"] = rng.choice(sorted(regions or {}))
    return op


REGIONS = [{"eu": 1, "us": 2}, {"eu": 2, "us": 1, "ap": 1}]


def generate(rng: random.Random) -> dict:
    regions = rng.choice(REGIONS) if rng.random() < 1 / 3 else None
    return {
        "target": "engine",
        "replicas": rng.choice([1, 2, 2, 3]),
        "regions": regions,
        "topology": rng.choice(["relay", "star"]),
        "compress": rng.random() < 0.5,
        "wan_bandwidth": rng.choice([None, 5e6]),
        "policy": rng.choice(["priority", "priority", "fifo", "periodic", "full"]),
        "bandwidth": rng.choice([None, None, 2e6]),
        "max_packet_rows": rng.choice([1 << 16, 7]),
        "wire": rng.random() < 0.3,
        "check_every": rng.choice([0, 0, 5]),
        "previous": rng.choice([0, 0, 12, 48]),  # steps of an earlier engine on the model
        "threads": [[_op(rng, regions) for _ in range(rng.randint(4, 16))]
                    for _ in range(rng.choice([1, 2, 3]))],
    }


# ----------------------------------------------------------------- running

_path: list[Any] = []


def _model():
    """A fresh compiled model of MODEL (its tables start from the same seed every time)."""
    import tempfile
    from pathlib import Path

    import ekko

    if not _path:
        _path.append(Path(tempfile.mkdtemp(prefix="ekko-fuzz-engine-")) / "fuzz.ekko")
        _path[0].write_text(MODEL)
    return ekko.compile_model(_path[0])


def _previous(model, steps: int):
    """An engine that stepped the model's tables and is still running (not closed)."""
    import numpy as np

    import ekko

    old = ekko.Engine(model, replicas=1).start()
    rng = np.random.default_rng(steps)
    for k in range(steps):
        name = sorted(TABLES)[k % len(TABLES)]
        rows, dim = TABLES[name]
        old.step(name, rng.integers(0, rows, 16), rng.standard_normal((16, dim)).astype(np.float32))
    old.flush()
    return old


def run(case: dict) -> dict:
    """Run the case's threads against one engine and judge (in the worker)."""
    import numpy as np

    import ekko
    from ekko.engine import HealthConfig, SchedulerConfig

    verdict = {"ok": True}
    health = HealthConfig(outlier_factor=100.0, warmup=3, check_every=case["check_every"],
                          score=lambda replica: verdict["ok"])
    scheduler = SchedulerConfig(policy=case["policy"], bandwidth=case["bandwidth"],
                                interval_s=0.01, max_packet_rows=case["max_packet_rows"],
                                wire=case["wire"])
    failures: list[str] = []
    model = _model()
    old = _previous(model, case["previous"]) if case["previous"] else None
    place = {"replicas": case["replicas"]}
    if case.get("regions"):
        place = {"regions": case["regions"], "primary_region": "eu", "wan_latency_ms": 2,
                 "wan_bandwidth": case["wan_bandwidth"], "topology": case["topology"],
                 "compress": case["compress"]}
    with ekko.Engine(model, scheduler=scheduler, health=health, **place) as engine:
        if old is not None:
            try:
                old.step("a", [1], np.ones((1, 8), np.float32))
                return {"kind": "accepted", "detail": "the engine a newer one took over stepped"}
            except ekko.EkkoError:
                pass
        threads = [threading.Thread(target=_thread, args=(engine, ops, verdict, failures))
                   for ops in case["threads"]]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if failures:
            kind, detail = failures[0].split(":", 1)
            return {"kind": kind, "detail": detail.strip()}
        verdict["ok"] = True
        for region in case.get("regions") or {}:
            if region != "eu":
                engine.heal(region)  # what the cuts lost must come back by anti-entropy
        return _final(engine)


def _thread(engine, ops: list[dict], verdict: dict, failures: list[str]) -> None:
    import ekko

    for op in ops:
        try:
            must_reject = _OPS[op["op"]](engine, op, verdict)
        except ekko.EkkoError:
            continue
        except Exception:  # noqa: BLE001 - judged
            failures.append(f"exception: {op}\n{traceback.format_exc()[-1500:]}")
            return
        if must_reject:
            failures.append(f"accepted: {op['op']} {op.get('how', '')}: {must_reject}")
            return


def _final(engine) -> dict:
    """After the threads: a final flush; then equal replicas, or a loud flush or check."""
    import ekko

    try:
        engine.flush(TIMEOUT_S)
        flushed = ""
    except ekko.EkkoError as e:
        flushed = str(e)
    differ = _differences(engine)
    if not differ:
        if flushed:
            return {"kind": "flush-raised", "detail": f"replicas equal the primary, yet: {flushed}"}
        return {"kind": "ok"}
    if flushed or not engine.check():
        return {"kind": "ok"}  # loud: the caller cannot miss it
    return {"kind": "silent-divergence",
            "detail": f"flush returned and check() passed while {'; '.join(differ)}"}


def _differences(engine) -> list[str]:
    from ekko.engine.replica import same_rows

    out = []
    for r in engine.replicas:
        for name in engine.primary.tables:
            rows = (~same_rows(r.serving(name), engine.primary.serving(name))  # bytes: NaN too
                    | (r.versions(name) != engine.primary.versions(name)))
            if rows.any():
                out.append(f"replica {r.index} table {name}: {int(rows.sum())} rows differ "
                           f"(ids {rows.nonzero()[0][:5].tolist()})")
    return out


# ----------------------------------------------------------------- operations


def _step(engine, op: dict, verdict: dict) -> str:
    """A delta through Engine.step; returns why it must be refused ("" when it may pass)."""
    import numpy as np

    rng = np.random.default_rng(op["seed"])
    rows, dim = TABLES[op["table"]]
    n, how = op["n"], op["how"]
    ids: Any = rng.integers(0, rows, n)
    grads: Any = (rng.standard_normal((n, dim)) * 0.1).astype(np.float32)
    table = op["table"]
    if how == "empty":
        ids, grads = [], np.zeros((0, dim), np.float32)
    elif how == "duplicates":
        ids[:] = ids[0]
    elif how == "harmful":
        grads[0] *= 1e6
    elif how == "overflow":  # finite gradients whose sum on one id passes f32's range
        ids[:] = ids[0]
        grads[:] = 3e38
    elif how in ("torch_grad", "torch_bf16", "torch_sparse"):
        try:
            import torch
        except ImportError:
            return ""
        g = torch.from_numpy(grads)
        if how == "torch_grad":
            grads = g.requires_grad_(True)
        elif how == "torch_bf16":
            grads = g.to(torch.bfloat16)
        else:
            grads = g.to_sparse()
    elif how == "id_out":
        ids[-1] = rows + int(rng.integers(0, 1 << 40))
    elif how == "id_negative":
        ids[-1] = -1 - int(rng.integers(0, 1 << 40))
    elif how == "float_ids":
        ids = ids.astype(np.float64) + 0.5
    elif how == "uint64_max":
        ids = ids.astype(np.uint64)
        ids[-1] = np.uint64(2**64 - 1)
    elif how == "ragged":
        ids = [[1], [1, 2]]
    elif how == "wrong_dim":
        grads = np.zeros((n, dim + 1), np.float32)
    elif how == "f64_grads":
        grads = grads.astype(np.float64)
    elif how == "nan_grads":
        grads[-1, -1] = np.nan
    elif how == "unknown_table":
        table = "nope"
    elif how.startswith("gathered"):  # a pooled gradient: a few rows, each id names one
        from ekko.engine import Gathered

        sources = max(1, n // 4)
        index = rng.integers(0, sources, n)
        scale = rng.uniform(-2, 2, n).astype(np.float32) if rng.random() < 0.5 else None
        if how == "gathered_out" and n:
            index[-1] = sources
        elif how == "gathered_nan_scale" and n:
            scale = np.ones(n, np.float32)
            scale[-1] = np.nan
        elif how == "gathered_short":
            index = index[:-1] if n else np.zeros(1, np.int64)
        grads = Gathered(grads[:sources].copy(), index, scale)
    engine.step(table, ids, grads)
    return how if how in BAD_STEPS else ""


def _flush(engine, op: dict, verdict: dict) -> str:
    engine.flush(TIMEOUT_S)
    return ""


def _lookup(engine, op: dict, verdict: dict) -> str:
    import numpy as np

    rng = np.random.default_rng(op["seed"])
    rows, _ = TABLES[FEATURES[op["feature"]]]
    ids = rng.integers(0, rows, 6)
    if op["bad"]:
        ids[2] = rows
    engine.lookup(op["feature"], ids, np.array([0, 3], np.int64))
    return "an id outside the table" if op["bad"] else ""


def _check(engine, op: dict, verdict: dict) -> str:
    engine.check()
    return ""


def _rollback(engine, op: dict, verdict: dict) -> str:
    verdict["ok"] = False
    try:
        engine.check()
    finally:
        verdict["ok"] = True
    return ""


def _merge(engine, op: dict, verdict: dict) -> str:
    """A packet from the primary, as packed now, damaged per op["how"], into a replica."""
    import numpy as np

    rng = np.random.default_rng(op["seed"])
    table = op["table"]
    rows, _ = TABLES[table]
    ids = np.unique(rng.integers(0, rows, op["n"]))
    packet = engine.primary.pack(table, ids)
    replica = engine.replicas[int(rng.integers(0, len(engine.replicas)))]
    how = op["how"]
    if how == "stale":
        replica.merge(packet.to_bytes() if rng.random() < 0.5 else packet)
        return ""
    replica.merge(_damage(packet, how, rng, engine.primary.issued(table)))
    return f"a packet with {how}"


def _damage(packet, how: str, rng, issued: int) -> bytes:
    """The packet's bytes, damaged; every way but flip and cut recomputes the CRC."""
    import numpy as np

    from ekko.engine.packet import Packet

    k = int(rng.integers(0, len(packet)))
    ids, versions, rows = packet.ids.copy(), packet.versions.copy(), packet.rows.copy()
    table = packet.table
    if how == "version_ahead":
        versions[k] = issued + 10**9  # far past what any thread can issue meanwhile
    elif how == "version_negative":
        versions[k] = -1 - int(rng.integers(0, 1 << 40))
    elif how == "id_out":
        ids[k] = TABLES[table][0] + int(rng.integers(0, 1 << 40))
    elif how == "nonfinite":
        _poison(rows, k, table)
    elif how == "unknown_table":
        table = "t_" + table
    elif how == "wrong_width":
        rows = np.concatenate([rows, rows[:, :1]], axis=1)
    data = bytearray(Packet(table, ids, rows, versions, newest=packet.newest).to_bytes())
    if how == "flip":
        at = int(rng.integers(0, len(data)))
        data[at] ^= int(rng.integers(1, 256))
        return bytes(data)
    if how == "cut":
        return bytes(data[:int(rng.integers(0, len(data)))])
    header = {"header_n": (12, 8), "header_width": (20, 4), "header_dtype": (6, 1),
              "header_name_len": (8, 2), "header_format": (4, 2), "header_flags": (7, 1)}
    if how in header:
        at, size = header[how]
        value = int.from_bytes(data[at:at + size], "little")
        value = (value + int(rng.integers(1, 4))) % (1 << (8 * size))
        data[at:at + size] = value.to_bytes(size, "little")
    body = bytes(data[:-4])
    return body + zlib.crc32(body).to_bytes(4, "little")


def _poison(rows, k: int, table: str) -> None:
    """A non-finite value in row k: an element of a float row, the scale of a quantized one."""
    import numpy as np

    _, dim = TABLES[table]
    if rows.dtype == np.float32:
        rows[k, 0] = np.nan
    elif rows.dtype == np.float16:
        rows[k, 0] = np.inf
    elif rows.dtype == np.uint16:  # bf16 bits
        rows[k, 0] = 0x7F80
    elif table == "d":  # int8: dim codes, then f32 scale
        rows[k, dim:dim + 4] = np.frombuffer(np.float32(np.inf).tobytes(), np.uint8)
    else:  # int4: ceil(dim / 2) bytes of codes, then f16 scale
        at = (dim + 1) // 2
        rows[k, at:at + 2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)


def _cut(engine, op: dict, verdict: dict) -> str:
    engine.cut(op["region"])
    return "a cut of the primary's region" if op["region"] == "eu" else ""


def _heal(engine, op: dict, verdict: dict) -> str:
    engine.heal(op["region"])
    return ""


_OPS = {"step": _step, "flush": _flush, "lookup": _lookup, "check": _check,
        "rollback": _rollback, "merge": _merge, "cut": _cut, "heal": _heal}
