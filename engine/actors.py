"""The engine's parts as Ray actors: primary shards and serving replicas.

These classes are plain Python; `engine/cluster/transport.py` wraps them with
`ray.remote` (restarts, concurrency, placement). Each rebuilds the model in
its own process from the parsed model description (`Model`, a frozen
dataclass: picklable), never from pickled compiled kernels, and then runs the
in-process engine's parts unchanged:

* `ShardServer` holds rows [lo, hi) of every table in a `Primary` (master,
  optimizer state, serving copy, versions, model-update cache, undo log) and
  the on-commit health check (`state.apply_checked`). Every step is in its
  durable log (fsync'd) before it is applied; on start it loads its snapshot
  and replays the log, refusing damage unless told to cut it (`on_damage`).
  Packets it packs carry global row ids.
* `ReplicaServer` holds a full serving copy in a `Replica`. On start it loads
  its last snapshot (or starts empty: a damaged one is set aside) and
  catches up from every shard: what changed after its watermark, from the
  model-update cache, or the whole shard when that history is gone or the
  shard's log was cut since (its history id changed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..compiler.frontend.model import Model
from ..kernels.errors import EkkoError
from ..kernels.model import compile_model
from ..kernels.sync import row_width, rows_dtype
from .dense import DenseError
from .durable import (HEALTHY, ROLLBACK, DamageError, PacketLog, bump_counter, history, load_arrays,
                      log_summary, new_history, replace_file, save_arrays, set_aside)
from .inputs import check_delta
from .packet import Packet
from .primary import Commit, Primary
from .regions import digests, newest_version
from .replica import Replica
from .state import HealthConfig, apply_checked, changed_rows, replica_problem, roll_back
from .wan import WanCodec

CHUNK_ROWS = 1 << 16  # rows per catch-up packet
DENSE_FILE = "dense.ekd"  # a replica's dense snapshot (engine/dense.py's format)
_COUNTERS = {"version", "step", "norm_mean", "commits", "last_seq"}  # a table's in a snapshot
WINDOW = 3  # catch-up chunks a replica has in flight at once


def shard_bounds(rows: int, shards: int) -> list[int]:
    """Row k of a table lives on the shard whose [lo, hi) holds it: contiguous ranges."""
    n = min(shards, rows)
    return [k * rows // n for k in range(n + 1)]


def shard_model(model: Model, shard: int, shards: int) -> Model:
    """The part of `model` that primary shard `shard` holds (its rows of each table)."""
    tables = []
    for t in model.tables:
        b = shard_bounds(t.rows, shards)
        if shard < len(b) - 1:
            tables.append(dataclasses.replace(t, rows=b[shard + 1] - b[shard]))
    if not tables:
        raise EkkoError(f"primary shard {shard} of {shards} would hold no rows: use at most "
                        f"{max(t.rows for t in model.tables)} shards")
    return dataclasses.replace(model, tables=tuple(tables), features=())


@dataclass
class ShardConfig:
    """What a primary shard actor is built from (picklable)."""

    model: Model
    shard: int
    shards: int
    directory: str
    seed: int = 0
    history_rows: int = 1 << 24
    outlier_factor: float = 1000.0
    warmup: int = 10
    log_limit_bytes: int = 1 << 30  # a snapshot (and an empty log) after this much log
    fsync: bool = True
    on_damage: str = "refuse"  # or "cut": see ShardServer._restore
    mark_lag: int = 1  # HealthConfig.mark_lag


@dataclass
class StepResult:
    """What the driver needs from one step on one shard (ids are shard-local)."""

    version: int
    ids: np.ndarray
    norms: np.ndarray
    commit_ns: int
    norm_mean: float
    rollback: Commit | None = None
    rollback_record: dict | None = None
    duplicate: bool = False


class ShardServer:
    """One primary shard (see the module docstring)."""

    def __init__(self, config: ShardConfig):
        self.config = config
        self.dir = Path(config.directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.starts = bump_counter(self.dir / "starts")
        full = {t.name: t.rows for t in config.model.tables}
        model = shard_model(config.model, config.shard, config.shards)
        self.lo = {t.name: shard_bounds(full[t.name], config.shards)[config.shard]
                   for t in model.tables}
        self.primary = Primary(compile_model(model), history_rows=config.history_rows,
                               seed=config.seed + config.shard, mark_lag=config.mark_lag)
        self.health = HealthConfig(config.outlier_factor, config.warmup)
        self.locks = {n: threading.Lock() for n in self.primary.tables}
        self.last_seq = dict.fromkeys(self.primary.tables, 0)
        self.last = {}  # table -> StepResult of its last step (for a retried one)
        self.replayed = {"records": 0, "rows": 0, "snapshot_version": {}, "seconds": 0.0,
                         "skipped": 0, "cut": None}
        t0 = time.perf_counter()
        self._restore()
        self.history_id = history(self.dir)
        self.log = PacketLog(self.dir / "packets.log", fsync=config.fsync)
        self.replayed["seconds"] = time.perf_counter() - t0

    # -- recovery ------------------------------------------------------------------
    def _restore(self) -> None:
        """Load the snapshot, then replay every logged step after it.

        A torn tail is cut (never acknowledged). Other damage raises
        DamageError, unless `on_damage="cut"` and this is the engine's first
        start of the shard: then the log is cut at the damage, or a damaged
        snapshot and the log after it are set aside and the shard starts
        over; `replayed["cut"]` says what was dropped. A shard that Ray
        restarts under a running engine never cuts: its replicas hold rows
        of the steps a cut would drop.
        """
        cut = self.config.on_damage == "cut" and not _restarted_by_ray()
        snap = self._load_snapshot(cut)
        if snap is not None:
            self._apply_snapshot(*snap)
        try:
            log = PacketLog.read(self.dir / "packets.log", cut=cut)
        except DamageError as e:
            raise e.add(_refusal(self.config)) from None
        for rec in log:
            p = rec.packet
            pt = self.primary.tables.get(p.table)
            if pt is not None and rec.version > pt.version + (rec.kind != HEALTHY):
                try:  # the history before it is missing: replaying it builds a state never acked
                    log.refuse(rec, f"it continues table {p.table!r} at version {rec.version}, "
                                    f"but the shard holds version {pt.version}: the snapshot or "
                                    f"records before it are missing")
                except DamageError as e:
                    raise e.add(_refusal(self.config)) from None
                break
            if rec.kind == HEALTHY and pt is not None and rec.version == pt.version:
                self.primary.mark_healthy(p.table)  # Engine.check() passed here
                continue
            if pt is None or rec.kind == HEALTHY or rec.version <= pt.version:
                self.replayed["skipped"] += 1  # already in the snapshot
                continue
            if rec.kind == ROLLBACK:  # Engine.check() failed here
                roll_back(self.primary, p.table, "replayed")
                self.replayed["records"] += 1
                continue
            try:
                self._apply(p.table, rec.seq, p.ids, p.rows)
            except EkkoError:
                self.replayed["skipped"] += 1  # rejected live as well
                continue
            self.replayed["records"] += 1
            self.replayed["rows"] += len(p)
        self.replayed["cut"] = log.finish() or self.replayed["cut"]

    def _load_snapshot(self, cut: bool) -> tuple[dict, dict] | None:
        """The snapshot's arrays and header; a damaged one is refused or (cut) set aside."""
        path, log = self.dir / "snapshot.npz", self.dir / "packets.log"
        try:
            return load_arrays(path)
        except DamageError as e:
            after = log_summary(log)
            if not cut:
                raise e.add(f"; the log after it holds {after['records']} whole records, at "
                            f"least {after['acknowledged']} of them acknowledged. Refused: no "
                            f"file was changed{_refusal(self.config)}") from None
            new_history(self.dir)  # first: a crash before the files move cuts again
            stamp = time.time_ns()
            self.replayed["cut"] = {
                "file": str(path), "offset": e.offset, "member": e.member, "reason": str(e),
                "torn": False, "records_dropped": after["records"],
                "acknowledged_dropped": after["acknowledged"], "tables": after["tables"],
                "kept": str(set_aside(path, f".damaged-{stamp}")),
                "log_kept": str(set_aside(log, f".after-damaged-snapshot-{stamp}"))
                if log.exists() else None}
            return None

    def _apply_snapshot(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Every table's arrays and counters from a (checked) snapshot of this shard."""
        tables = meta.get("tables") if isinstance(meta.get("tables"), dict) else {}
        for name, pt in self.primary.tables.items():
            m, keys = tables.get(name), self._array_keys(name)
            have = [arrays.get(k) for k in keys]
            if not isinstance(m, dict) or not _COUNTERS <= m.keys() or any(
                    a is None or a.shape != b.shape or a.dtype != b.dtype
                    for a, b in zip(have, pt.arrays())):
                raise EkkoError(f"{self.dir / 'snapshot.npz'} holds no table {name!r} of this "
                                f"shard's shape (was it written for another model or another "
                                f"number of primary shards?)")
            for a, b in zip(have, pt.arrays()):
                np.copyto(b, a)
            pt.version = pt.healthy_version = m["version"]
            if pt.undo is not None:
                pt.undo.clear(pt.version)
            pt.buf.step, pt.norm_mean, pt.commits = m["step"], m["norm_mean"], m["commits"]
            pt.cache.floor = m["version"]  # history before the snapshot is gone
            self.last_seq[name] = m["last_seq"]
            self.replayed["snapshot_version"][name] = m["version"]

    def _array_keys(self, name: str) -> list[str]:
        n = len(self.primary.tables[name].arrays())
        return [f"{name}/{i}" for i in range(n)]

    def snapshot(self) -> dict:
        """Mark every table healthy, write the snapshot, start an empty log."""
        for lock in self.locks.values():
            lock.acquire()
        try:
            arrays, meta = {}, {"tables": {}}
            for name, pt in self.primary.tables.items():
                self.primary.mark_all_healthy(name)
                for key, a in zip(self._array_keys(name), pt.arrays()):
                    arrays[key] = a
                meta["tables"][name] = {"version": pt.version, "step": pt.buf.step,
                                        "norm_mean": pt.norm_mean, "commits": pt.commits,
                                        "last_seq": self.last_seq[name]}
            save_arrays(self.dir / "snapshot.npz", arrays, meta)
            self.log.restart()
            return {n: m["version"] for n, m in meta["tables"].items()}
        finally:
            for lock in self.locks.values():
                lock.release()

    # -- messages --------------------------------------------------------------------
    def step(self, table: str, seq: int, ids: np.ndarray, grads: np.ndarray) -> StepResult:
        """Log (fsync), apply and health-check one delta; a retried `seq` is answered again."""
        pt = self.primary.table(table)
        ids, grads = check_delta(ids, grads, pt.buf.table.rows, pt.buf.table.dim)
        with self.locks[table]:
            if seq <= self.last_seq[table]:
                last = self.last.get(table)
                if last is not None and seq == self.last_seq[table]:
                    return dataclasses.replace(last, duplicate=True)
                return StepResult(pt.version, np.zeros(0, np.int64), np.zeros(0, np.float32),
                                  time.time_ns(), pt.norm_mean, duplicate=True)
            ticket = self.log.write(seq, pt.version + 1, Packet(table, ids, grads,
                                                                np.zeros(len(ids), np.int64)))
            try:  # the kernel runs while the log syncs; nobody reads the rows before it has
                result = self._apply(table, seq, ids, grads)
            finally:
                self.log.wait(ticket)
            result.commit_ns = time.time_ns()  # durable now: freshness counts from here
        if self.log.size() > self.config.log_limit_bytes:
            self.snapshot()
        return result

    def _apply(self, table: str, seq: int, ids: np.ndarray, grads: np.ndarray) -> StepResult:
        commit, rolled = apply_checked(self.primary, self.health, table, ids, grads)
        result = StepResult(commit.version, commit.ids, commit.norms, commit.commit_ns,
                            self.primary.tables[table].norm_mean)
        if rolled is not None:  # deterministic: a replay rolls back the same way
            result.rollback, record = rolled
            result.rollback_record = record.as_dict()
        self.last_seq[table] = seq
        self.last[table] = result
        return result

    # -- Engine.check(): what changed since the healthy mark, rollback, marking healthy ----
    def changed(self) -> dict[str, np.ndarray]:
        """Per table, the (global) ids changed since its last healthy mark."""
        return {name: ids + self.lo[name] for name, ids in changed_rows(self.primary).items()}

    def mark_healthy(self) -> dict[str, int]:
        """Every table's current version is healthy (logged, so a replay marks it too)."""
        out, logged = {}, False
        for name, pt in self.primary.tables.items():
            with self.locks[name]:
                if (pt.undo is not None and (pt.undo.chunks or pt.undo.keep > 1)) \
                        or pt.healthy_version != pt.version:  # (with a lag every mark counts)
                    self.log.append(self.last_seq[name], pt.version, self._empty(name), HEALTHY,
                                    sync=False)
                    logged = True
                out[name] = self.primary.mark_healthy(name)
        if logged:
            self.log.sync()
        return out

    def rollback(self, table: str, reason: str) -> tuple[Commit | None, dict | None]:
        """Restore `table`'s rows changed since its healthy mark (logged first).

        Returns the rollback's commit (shard-local ids) and its record, or
        (None, None) when nothing changed since the mark.
        """
        pt = self.primary.table(table)
        with self.locks[table]:
            if pt.undo is None or not pt.undo.chunks:
                return None, None
            self.log.append(self.last_seq[table], pt.version + 1, self._empty(table), ROLLBACK)
            rolled = roll_back(self.primary, table, reason)
        return (None, None) if rolled is None else (rolled[0], rolled[1].as_dict())

    def _empty(self, table: str) -> Packet:
        dim = self.primary.tables[table].buf.table.dim
        return Packet(table, np.zeros(0, np.int64), np.zeros((0, dim), np.float32),
                      np.zeros(0, np.int64))

    def since(self, table: str, version: int) -> tuple[list[Packet], int, bool]:
        """Packets of the rows changed after `version` (all rows when that history is gone).

        Returns (packets with global ids, the version they bring a replica up
        to, whether the whole shard was copied).
        """
        ids, rows, upto, full = self.plan(table, version)
        if full:
            packets = [self.pack_range(table, lo, min(lo + CHUNK_ROWS, rows))
                       for lo in range(0, rows, CHUNK_ROWS)]
        else:
            packets = [self.pack(table, ids[lo:lo + CHUNK_ROWS])
                       for lo in range(0, len(ids), CHUNK_ROWS)]
        return packets, upto, full

    def plan(self, table: str, version: int) -> tuple[np.ndarray | None, int, int, bool]:
        """What a replica at `version` needs: (changed shard-local ids, or None for every
        row; the shard's rows; the version that brings it up to; whether it is every row).

        The replica then fetches it in chunks (`pack`, `pack_range`), a few in
        flight at a time: memory stays bounded and packing overlaps merging.
        """
        pt = self.primary.table(table)
        with self.locks[table], pt.lock:  # a step's rows are read only once it is durable
            ids = pt.cache.changed_since(version) if version >= 0 else None
            upto = pt.version
        return ids, pt.buf.table.rows, upto, ids is None

    def pack_range(self, table: str, lo: int, hi: int) -> Packet:
        """Shard-local rows [lo, hi) as a packet with global ids (a slice copy, no gather)."""
        pt = self.primary.table(table)
        if not 0 <= lo <= hi <= pt.buf.table.rows:
            raise EkkoError(f"rows [{lo}, {hi}) are outside table {table!r} of this shard "
                            f"({pt.buf.table.rows} rows)")
        with self.locks[table], pt.lock:
            rows = pt.buf.lookup_table[lo:hi].copy()
            versions = pt.buf.versions[lo:hi].copy()
            newest = pt.version
        ids = np.arange(lo + self.lo[table], hi + self.lo[table], dtype=np.int64)
        return Packet(table, ids, rows, versions, newest=newest)

    def pack(self, table: str, ids: np.ndarray) -> Packet:
        """The current serving rows of shard-local `ids`, as a packet with global ids.

        Under the table's step lock: a step applies its update while its log
        record syncs, and no row of it leaves the shard before it is durable.
        """
        lock = self.locks.get(table)
        if lock is None:
            self.primary.table(table)  # raises: no such table
        with lock:
            return self._global(self.primary.pack(table, np.asarray(ids, np.int64)))

    def pack_many(self, wanted: list[tuple[str, np.ndarray]]) -> list[Packet]:
        """One packet per (table, shard-local ids): a link's whole batch in one message."""
        return [self.pack(table, ids) for table, ids in wanted]

    def pack_frames(self, wanted: list[tuple[str, np.ndarray]], frame: bool,
                    compress: bool) -> tuple[list, list[tuple[int, int, int, int]]]:
        """A link's batch for a region (engine/cluster/regions.py), called with two
        returns: the packets (WAN frames when `frame`), which go on to the relay
        replica without passing through the caller, and what the caller needs of them:
        per packet (frame bytes, raw bytes, rows, newest version among its rows)."""
        packets = self.pack_many(wanted)
        if not frame:
            return packets, [(0, 0, len(p), newest_version(p)) for p in packets]
        codec = _codec(compress)
        frames = [codec.encode(p) for p in packets]
        return ([f for f, _ in frames],
                [(len(f), raw, len(p), newest_version(p))
                 for (f, raw), p in zip(frames, packets)])

    def _global(self, p: Packet) -> Packet:
        p.ids = p.ids + self.lo[p.table]
        return p

    def serving(self, table: str) -> tuple[np.ndarray, np.ndarray]:
        """Copies of this shard's serving rows and versions of `table`."""
        pt = self.primary.table(table)
        with self.locks[table], pt.lock:
            return pt.buf.lookup_table.copy(), pt.buf.versions.copy()

    def history(self) -> str:
        """This shard's history id: it changes when a cut dropped steps (see durable.py)."""
        return self.history_id

    def info(self) -> dict:
        return {"pid": os.getpid(), "node": _node_id(), "starts": self.starts,
                "restarts": self.starts - 1, "replayed": dict(self.replayed),
                "issued": {n: pt.version for n, pt in self.primary.tables.items()},
                "norm_mean": {n: pt.norm_mean for n, pt in self.primary.tables.items()},
                "log_records": self.log.records, "log_syncs": self.log.syncs,
                "last_seq": dict(self.last_seq)}

    def row_bytes(self) -> dict[str, int]:
        return {n: self.primary.row_bytes(n) for n in self.primary.tables}


@dataclass
class ReplicaConfig:
    """What a replica actor is built from (picklable). `shards` are actor handles."""

    model: Model
    index: int
    shards: list[str]  # the primary shards' actor names (handles are looked up by name)
    directory: str
    snapshot_s: float = 0.0  # seconds between automatic snapshots; 0: only on request
    call_timeout_s: float = 120.0
    tables_of_shard: dict = field(default_factory=dict)  # shard -> its table names
    score: Any = None  # HealthConfig.score: the user's hook, run here by check()
    min_score: float | None = None
    chunk_rows: int = CHUNK_ROWS  # rows per catch-up chunk (WINDOW of them in flight)
    dense: Any = None  # the engine's dense module (a template: snapshots fill its weights)
    dense_initial: bytes | None = None  # its first snapshot, installed as the replica starts


class ReplicaServer:
    """One serving replica (see the module docstring)."""

    def __init__(self, config: ReplicaConfig):
        self.config = config
        self.dir = Path(config.directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.starts = bump_counter(self.dir / "starts")
        self.model = compile_model(config.model)
        self._rows = {t.name: t.rows for t in config.model.tables}
        t0 = time.perf_counter()
        snapshot, self.wm, restored = self._load()
        issued = {n: max(0, max(w.values(), default=0)) for n, w in self.wm.items()}
        # the Replica copies what it is given: give it nothing, then hand it the loaded arrays
        self.replica = Replica(config.index, self.model,
                               {n: (s[:0], v[:0]) for n, (s, v) in snapshot.items()}, issued,
                               config.dense)
        self.dense_damage = self._restore_dense()
        for name, (serving, versions) in snapshot.items():
            rt = self.replica.tables[name]
            rt.serving, rt.versions = serving, versions
        del snapshot
        self.restore_seconds = time.perf_counter() - t0
        self.catch_ups: list[dict] = []
        self.wm_lock = threading.Lock()
        self.restored_from_snapshot = restored
        self.behind = set(range(len(config.shards)))  # shards not caught up with yet
        self.ready_seconds = -1.0
        self._stop = threading.Event()
        self._catch_up_all(time.monotonic() + config.call_timeout_s, t0)
        if self.behind:  # a primary is down too: keep trying, stay unready meanwhile
            threading.Thread(target=self._catch_up_all, args=(float("inf"), t0), daemon=True,
                             name="ekko-catch-up").start()
        if config.snapshot_s > 0:
            threading.Thread(target=self._snapshots, daemon=True, name="ekko-snapshots").start()

    def _load(self) -> tuple[dict, dict, bool]:
        """The last snapshot (serving, versions, watermarks), or an empty copy at -1."""
        wm = {n: dict.fromkeys(ks, -1) for n, ks in self._shards_of_table().items()}
        self.histories = dict.fromkeys(range(len(self.config.shards)), "")
        snap = self._read_snapshot()
        out = {}
        restored = snap is not None
        for t in self.model.model.tables:
            spec = self.model.update_specs[t.name]
            layout = spec.serving or spec.table_dtype
            shape = (t.rows, row_width(layout, t.dim))
            dtype = np.dtype(rows_dtype(layout))
            if restored:
                arrays, marks = snap
                s, v = arrays.get(f"{t.name}/serving"), arrays.get(f"{t.name}/versions")
                if s is not None and s.shape == shape and s.dtype == dtype and v is not None \
                        and v.shape == (t.rows,) and v.dtype == np.int64:
                    out[t.name] = (s, v)
                    for k, w in marks.get(t.name, {}).items():
                        if k in wm[t.name]:
                            wm[t.name][k] = w
                    continue
            out[t.name] = (np.zeros(shape, dtype), np.full(t.rows, -1, np.int64))
            wm[t.name] = dict.fromkeys(wm[t.name], -1)
        return out, wm, restored

    def _read_snapshot(self) -> tuple[dict, dict] | None:
        """(arrays, watermarks) of the snapshot; None without one, or with a damaged one.

        A damaged snapshot is set aside (`snapshot.npz.damaged`) and the
        replica starts empty, copying every shard: unlike a primary's, its
        state is a copy the shards can always give again, so refusing to
        start would turn a recoverable fault into an outage. What was wrong
        is kept in `snapshot_damage` (stats()).
        """
        path = self.dir / "snapshot.npz"
        self.snapshot_damage: str | None = None
        try:
            snap = load_arrays(path)
            if snap is None:
                return None
            arrays, meta = snap
            marks = {t: {int(k): int(w) for k, w in ws.items()}
                     for t, ws in meta["watermarks"].items()}
            histories = {int(k): str(v) for k, v in meta.get("histories", {}).items()}
        except EkkoError as e:
            self.snapshot_damage = str(e)
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            self.snapshot_damage = (f"{path}: not a replica's snapshot header "
                                    f"({type(e).__name__}: {e})")
        else:
            self.histories.update(histories)
            return arrays, marks
        with contextlib.suppress(OSError):
            set_aside(path, ".damaged")
        return None

    def _restore_dense(self) -> str | None:
        """Install the dense snapshot this replica held before a restart, if any; a damaged
        one is set aside (the engine's next publish brings a good one). Returns what was
        wrong, or None."""
        path = self.dir / DENSE_FILE
        if self.replica.dense is None:
            return None
        if self.config.dense_initial is not None:
            self.replica.install_dense(self.config.dense_initial)
        if not path.exists():
            return None
        try:
            self.replica.install_dense(path.read_bytes())
            return None
        except (DenseError, OSError) as e:
            with contextlib.suppress(OSError):
                set_aside(path, ".damaged")
            return f"{path}: {e}"

    def _shards_of_table(self) -> dict[str, list[int]]:
        by_table: dict[str, list[int]] = {t.name: [] for t in self.model.model.tables}
        for k, names in self.config.tables_of_shard.items():
            for n in names:
                by_table[n].append(int(k))
        return by_table

    # -- catch-up ---------------------------------------------------------------------
    def _catch_up_all(self, deadline: float, t0: float) -> None:
        """Catch up with every shard, retrying failed ones until `deadline`."""
        reason = "restart" if self.starts > 1 else "join"
        while self.behind and time.monotonic() < deadline and not self._stop.is_set():
            for k in sorted(self.behind):
                try:
                    self.catch_up(k, reason=reason)
                    self.behind.discard(k)
                except Exception:  # noqa: BLE001 - a shard restarting: try again
                    time.sleep(0.2)
        if not self.behind:
            self.ready_seconds = time.perf_counter() - t0

    def catch_up(self, shard: int, reason: str = "resync") -> dict:
        """Ask shard `shard` what changed after this replica's watermarks, and merge it."""
        import ray

        t0 = time.perf_counter()
        rows, full = 0, []
        handle = ray.get_actor(self.config.shards[shard])
        timeout, chunk = self.config.call_timeout_s, self.config.chunk_rows
        if self._forget_other_history(shard, ray.get(handle.history.remote(), timeout=timeout)):
            reason = "history cut"
        for table in self.config.tables_of_shard.get(shard, []):
            with self.wm_lock:
                since = self.wm[table][shard]
            ids, n, upto, whole = ray.get(handle.plan.remote(table, since), timeout=timeout)
            if whole:  # every row, in slices
                parts = [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
                ask = [handle.pack_range.remote(table, lo, hi) for lo, hi in parts[:WINDOW]]
                full.append(table)
            else:  # the rows the model-update cache names
                parts = [ids[lo:lo + chunk] for lo in range(0, len(ids), chunk)]
                ask = [handle.pack.remote(table, c) for c in parts[:WINDOW]]
            for k in range(len(parts)):  # WINDOW chunks in flight: packing overlaps merging
                p = ray.get(ask[k], timeout=timeout)
                ask[k] = None  # its memory goes once merged
                if k + WINDOW < len(parts):
                    nxt = parts[k + WINDOW]
                    ask.append(handle.pack_range.remote(table, *nxt) if whole
                               else handle.pack.remote(table, nxt))
                self.replica.note_issued(table, p.newest)
                self.replica.deliver(p, self._fetch)
                rows += len(p)
                del p
            self.set_watermark(table, shard, upto)
        record = {"shard": shard, "reason": reason, "rows": rows, "whole_shard": full,
                  "seconds": time.perf_counter() - t0, "at": time.time()}
        self.catch_ups.append(record)
        return record

    def _forget_other_history(self, shard: int, token: str) -> bool:
        """Whether the shard's history changed since this copy (a cut dropped steps there).

        Then its rows here may come from the dropped steps: their versions go
        to -1 and its watermarks too, so the catch-up copies the whole shard
        over them.
        """
        tables = self.config.tables_of_shard.get(shard, [])
        with self.wm_lock:
            if self.histories.get(shard, "") == token:
                return False
            self.histories[shard] = token
            for table in tables:
                self.wm[table][shard] = -1
        for table in tables:
            rt = self.replica.tables[table]
            lo, hi = shard_bounds(len(rt.versions), len(self.config.shards))[shard:shard + 2]
            with rt.lock:
                rt.versions[lo:hi] = -1
                rt.watermark = -1
        return True

    def _fetch(self, table: str, ids: np.ndarray) -> Packet:
        """The shards' current rows of sorted global `ids`, in that order (see Replica.settle)."""
        import ray

        bounds = np.asarray(shard_bounds(self._rows[table], len(self.config.shards)))
        which = np.searchsorted(bounds, ids, side="right") - 1
        refs = [ray.get_actor(self.config.shards[k]).pack.remote(table, ids[which == k] - bounds[k])
                for k in np.unique(which)]
        parts = [ray.get(r, timeout=self.config.call_timeout_s) for r in refs]
        return Packet(table, np.concatenate([p.ids for p in parts]),
                      np.concatenate([p.rows for p in parts]),
                      np.concatenate([p.versions for p in parts]),
                      newest=max(p.newest for p in parts))

    # -- messages from the engine ---------------------------------------------------------
    def merge_from(self, packet: Packet, commit_ns: np.ndarray | None) -> int:
        """Merge a packet a link sent (commit times travel beside it), verifying each row:
        what the merge rejects or refuses is settled against the shards (Replica.deliver)."""
        if commit_ns is not None:
            packet.commit_ns = commit_ns
        self.replica.note_issued(packet.table, packet.newest)
        return self.replica.deliver(packet, self._fetch)

    def merge_many(self, packets: list[Packet], commit_ns: list[np.ndarray]) -> int:
        """Merge a link's batch (one message from the engine, packets from the shard)."""
        return sum(self.merge_from(p, c) for p, c in zip(packets, commit_ns))

    def merge(self, packet: Packet | bytes) -> int:
        return self.replica.merge(packet)

    # -- regions (engine/cluster/regions.py): relaying and anti-entropy, actor to actor ----
    def relay(self, payload: list, commit_ns: list[np.ndarray], peers: list[tuple[int, Any]],
              framed: bool, compress: bool, wait_s: float) -> tuple[float, list[int]]:
        """Merge a link's batch (WAN frames when `framed`), then forward its packets to
        `peers` (index, actor), which merge them from this process's object store, never
        through the engine's. Returns (seconds this merge took, the peers that did not
        merge within `wait_s`)."""
        import ray

        packets = [_codec(compress).decode(f) for f in payload] if framed else payload
        t0 = time.perf_counter()
        self.merge_many(packets, commit_ns)
        seconds = time.perf_counter() - t0
        if not peers:
            return seconds, []
        ref = ray.put(packets)
        refs = {a.merge_many.remote(ref, commit_ns): i for i, a in peers}
        done, late = ray.wait(list(refs), num_returns=len(refs), timeout=wait_s)
        failed = [refs[r] for r in late]
        for r in done:
            try:
                ray.get(r, timeout=0)
            except Exception:  # noqa: BLE001 - that peer died or refused: the engine repairs it
                failed.append(refs[r])
        return seconds, sorted(failed)

    def digests(self, table: str, ids: np.ndarray) -> np.ndarray:
        """The version summary of `ids` (regions.digests): one digest per bucket."""
        return digests(ids, self.replica.versions(table)[ids])

    def versions_of(self, table: str, ids: np.ndarray) -> np.ndarray:
        return self.replica.versions(table)[ids].copy()

    def frame_newer(self, table: str, ids: np.ndarray, theirs: np.ndarray, commit: np.ndarray,
                    compress: bool) -> tuple[bytes, tuple[int, int, int]]:
        """The rows of `ids` this replica holds newer than `theirs` (a peer's versions),
        stamped with their lost updates' commit times, as one WAN frame; called with two
        returns: the frame goes to the peer, (frame bytes, raw bytes, rows) to the caller."""
        rows, versions = self.replica.rows(table, ids)
        newer = versions > theirs
        packet = Packet(table, ids[newer], rows[newer], versions[newer], commit[newer],
                        newest=self.replica.table(table).issued)
        frame, raw = _codec(compress).encode(packet)
        return frame, (len(frame), raw, len(packet))

    def merge_frame(self, frame: bytes, compress: bool) -> int:
        """Merge a WAN frame a peer made (anti-entropy); returns the rows written."""
        packet = _codec(compress).decode(frame)
        self.replica.note_issued(packet.table, packet.newest)
        return self.replica.deliver(packet, self._fetch) if len(packet) else 0

    def install_dense(self, blob: bytes) -> bool:
        """Swap in a dense snapshot (if newer) and keep it for a restart of this process."""
        newer = self.replica.install_dense(blob)
        if newer:
            replace_file(self.dir / DENSE_FILE, blob)
        return newer

    def set_watermark(self, table: str, shard: int, version: int) -> None:
        with self.wm_lock:
            w = self.wm[table]
            w[shard] = max(w[shard], int(version))
            if all(v >= 0 for v in w.values()):
                self.replica.set_watermark(table, min(w.values()))

    def check(self, changed: dict[str, np.ndarray]) -> str | None:
        """Engine.check() on this replica: the changed rows are finite, the score hook passes.

        The hook runs here, in the replica's process, on its `Replica` (what
        the in-process engine passes too); returns the reason it failed, or None.
        """
        health = HealthConfig(score=self.config.score, min_score=self.config.min_score)
        return replica_problem(self.replica, changed, health, self._fetch)

    def settle_divergent(self) -> dict[str, list[int]]:
        """After a rollback: settle every divergent row again; returns those still divergent."""
        return {t: ids.tolist() for t, ids in self.replica.settle_divergent(self._fetch).items()
                if len(ids)}

    def status(self) -> tuple[dict[str, dict[int, int]], dict[str, dict[int, str]], int]:
        """(watermarks per table and shard, divergent rows per table with why, the dense
        snapshot held or -1): for flush."""
        dense = self.replica.dense
        return self.watermarks(), self.replica.divergence(), -1 if dense is None else dense.version

    def set_watermarks(self, marks: list[tuple[str, int, int]]) -> None:
        """Several (table, shard, version) watermarks in one message."""
        for table, shard, version in marks:
            self.set_watermark(table, shard, version)

    def watermarks(self) -> dict[str, dict[int, int]]:
        with self.wm_lock:
            return {n: dict(w) for n, w in self.wm.items()}

    def snapshot(self) -> dict:
        """Write this replica's serving copies and watermarks to disk (atomically)."""
        with self.wm_lock:  # everything up to these watermarks is in the arrays below
            wm = {n: {str(k): v for k, v in w.items()} for n, w in self.wm.items()}
            histories = {str(k): v for k, v in self.histories.items()}
        arrays = {}
        for name, rt in self.replica.tables.items():
            with rt.lock:
                arrays[f"{name}/serving"] = rt.serving.copy()
                arrays[f"{name}/versions"] = rt.versions.copy()
        save_arrays(self.dir / "snapshot.npz", arrays, {"watermarks": wm, "histories": histories})
        return wm

    def _snapshots(self) -> None:
        while not self._stop.wait(self.config.snapshot_s):
            try:
                self.snapshot()
            except OSError:
                pass  # the next one may succeed; catch-up covers the gap either way

    # -- reads -------------------------------------------------------------------------------
    def lookup(self, feature: str, ids: Any, offsets: Any = None,
               per_sample_weights: Any = None, include_last_offset: bool | None = None
               ) -> np.ndarray:
        out = self.replica.lookup(feature, ids, offsets, per_sample_weights=per_sample_weights,
                                  include_last_offset=include_last_offset)
        return np.array(out, copy=True)

    def predict(self, bags: dict[str, tuple], x: Any) -> Any:
        """Replica.predict on bags the engine checked (checked again here: cheap)."""
        return self.replica.predict(bags, x)

    def serving(self, table: str) -> np.ndarray:
        return self.replica.serving(table).copy()

    def versions(self, table: str) -> np.ndarray:
        return self.replica.versions(table).copy()

    def rows(self, table: str, ids: Any) -> tuple[np.ndarray, np.ndarray]:
        return self.replica.rows(table, ids)

    def ping(self) -> tuple[int, bool]:
        """(process id, whether this replica has caught up with every shard)."""
        return os.getpid(), not self.behind

    def info(self) -> dict:
        return {"pid": os.getpid(), "node": _node_id(), "starts": self.starts,
                "restarts": self.starts - 1, "catch_ups": list(self.catch_ups),
                "restored_from_snapshot": self.restored_from_snapshot,
                "snapshot_damage": self.snapshot_damage, "dense_damage": self.dense_damage,
                "restore_seconds": self.restore_seconds, "ready_seconds": self.ready_seconds}

    def stats(self) -> tuple[dict, Any]:
        """(summary, freshness histogram) of this replica since it last started."""
        s = self.replica.stats
        summary = s.summary()
        summary["watermarks"] = self.replica.watermarks()
        summary["divergent_rows"] = sum(map(len, self.replica.divergence().values()))
        if self.replica.dense is not None:
            summary["dense"] = self.replica.dense.summary()
        return summary, s.all_freshness()


_CODECS: dict[bool, WanCodec] = {}


def _codec(compress: bool) -> WanCodec:
    """This process's WAN codec (compressing or not)."""
    codec = _CODECS.get(compress)
    if codec is None:
        codec = _CODECS[compress] = WanCodec(compress)
    return codec


def _restarted_by_ray() -> bool:
    """Whether Ray restarted this actor (rather than an engine starting it)."""
    ray = sys.modules.get("ray")  # outside a Ray worker it need not be imported at all
    if ray is None or not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return False
    return bool(ray.get_runtime_context().was_current_actor_reconstructed)


def _refusal(config: ShardConfig) -> str:
    """What a refused shard's error adds: how to start anyway, or why it may not here."""
    if config.on_damage == "cut":
        return (" (on_damage='cut' applies when an engine starts on this directory, not when "
                "Ray restarts a shard under a running engine, whose replicas hold rows of the "
                "steps a cut would drop: close the engine and start a new one)")
    return (". Engine(..., on_damage='cut') starts anyway, dropping the damaged part and "
            "everything after it (docs/engine.md, 'Damaged logs and snapshots')")


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray
        return ""


__all__ = ["ReplicaConfig", "ReplicaServer", "ShardConfig", "ShardServer", "StepResult",
           "check_delta", "shard_bounds", "shard_model"]
