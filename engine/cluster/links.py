"""The scheduler's links on Ray: the in-process `Link` (policies, budget), sending through Ray.

A shard packs a batch, the replica merges it; the packets travel through
Ray's object store and never pass through the caller's process.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ray

from ...kernels.errors import EkkoError
from ..scheduler import Link, SchedulerConfig
from .plumbing import PROBE_S, Helpers, Unavailable, call

# -- what the links read and tell (ports.LinkPrimary, ports.LinkReplica) ---------------------
class ShardView:
    """A primary shard as its links read it (ports.LinkPrimary): kept here, in the
    caller's process, from what the shard answered (a link never waits on a call)."""

    def __init__(self, rows: dict[str, int], row_bytes: dict[str, int], issued: dict[str, int]):
        self._rows = dict(rows)
        self._row_bytes = row_bytes
        self._issued = dict(issued)  # when the engine started: links number on from here
        self._norm_mean = dict.fromkeys(rows, 0.0)

    def table_rows(self) -> dict[str, int]:
        return dict(self._rows)

    def norm_mean(self, table: str) -> float:
        return self._norm_mean[table]

    def note_norm_mean(self, table: str, mean: float) -> None:
        """The shard's running mean norm of `table`, as its last step answered."""
        self._norm_mean[table] = mean

    def row_bytes(self, table: str) -> int:
        return self._row_bytes[table]

    def issued(self, table: str) -> int:
        return self._issued.get(table, 0)


class _Watermarks:
    """Sends the links' watermarks to the replicas: one message per replica, not one per table.

    A link sets every table's watermark after each send; a Ray call for each
    would cost more than the send itself. They are collected here (newest per
    table and shard) and a sender thread delivers each replica's in one
    `set_watermarks` call, always after the merge they describe returned.
    """

    def __init__(self, actors: list):
        self.actors = actors
        self.cond = threading.Condition()
        self.pending: dict[int, dict[tuple[str, int], int]] = {}
        self.sent: dict[tuple[int, str, int], int] = {}
        self.running = True
        self.helpers = Helpers()  # the sender thread
        self.helpers.start(self._run, name="ekko-watermarks")

    def put(self, replica: int, table: str, shard: int, version: int) -> None:
        with self.cond:
            if self.sent.get((replica, table, shard), -2) >= version:
                return
            self.sent[(replica, table, shard)] = version
            self.pending.setdefault(replica, {})[(table, shard)] = version
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while self.running and not self.pending:
                    self.cond.wait(0.5)
                if not self.running:
                    return
                batch, self.pending = self.pending, {}
            for i, marks in batch.items():
                try:
                    self.actors[i].set_watermarks.remote(
                        [(t, s, v) for (t, s), v in marks.items()])
                except Exception:  # noqa: BLE001 - Ray shutting down; a catch-up sets them again
                    pass

    def stop(self) -> None:
        """Returns once the sender thread has: it must not call Ray after ray.shutdown()."""
        with self.cond:
            self.running = False
            self.cond.notify_all()
        self.helpers.close()


class _RemoteView:
    """What a shard's link sees of replicas in other processes (ports.LinkReplica): the
    newest version travels with each packet, divergence is kept by the replica
    processes (flush asks them: ReplicaServer.status); the watermarks go to them."""

    def __init__(self, shard: int, tables: list[str], marks: _Watermarks):
        self.shard, self.marks = shard, marks
        self._traffic = dict.fromkeys(tables, 0)

    def traffic(self) -> dict[str, int]:
        return self._traffic

    def note_issued(self, table: str, version: int) -> None:
        pass  # travels with each packet (Packet.newest)

    def divergence(self) -> dict:
        return {}


class _LinkReplica(_RemoteView):
    """A replica actor as one shard's link sees it."""

    def __init__(self, index: int, actor: Any, shard: int, tables: list[str],
                 marks: _Watermarks):
        super().__init__(shard, tables, marks)
        self.index, self.actor = index, actor
        self.link: RemoteLink | None = None

    def set_watermark(self, table: str, version: int) -> None:
        if self.link is not None and self.link.poisoned:
            return  # a lost send was not caught up with: claim nothing
        self.marks.put(self.index, table, self.shard, int(version))


def _packets_of(batch: list, step: int) -> tuple[list, list, list]:
    """A link's batch cut into packets of at most `step` rows: what to pack
    (table, ids), the versions each row was sent since, and the freshness marks."""
    wanted, since, marks = [], [], []
    for entry in batch:  # (table, ids, since, (norms, their commit times), ...)
        table, ids, stamps, (sig, sig_at) = entry[:4]
        for lo in range(0, len(ids), step):
            wanted.append((table, ids[lo:lo + step]))
            since.append(stamps[lo:lo + step])
            marks.append((table, sig[lo:lo + step], sig_at[lo:lo + step]))
    return wanted, since, marks


def _note_significant(link: Any, marks: list) -> None:
    """Freshness of the significant rows a link just made visible (its histogram)."""
    visible = time.time_ns()
    for table, sig, at in marks:
        mean = link.primary.norm_mean(table) or 1.0
        hot = (sig >= link.config.significant_ratio * mean) & (at > 0)
        if hot.any():
            link.significant.add((visible - at[hot]) / 1e6)


class RemoteLink(Link):
    """The in-process Link, sending through Ray: pack on the shard, merge on the replica."""

    def __init__(self, view: ShardView, replica: _LinkReplica, config: SchedulerConfig,
                 shard: Any, timeout: float):
        super().__init__(view, replica, config)  # type: ignore[arg-type]
        self.shard, self.timeout = shard, timeout
        self.recoveries = 0
        self.poisoned = False
        replica.link = self

    def _send(self, batch: list) -> None:
        """The whole batch as one pack task on the shard and one merge task on the replica."""
        wanted, since, marks = _packets_of(batch, self.config.max_packet_rows)
        if not wanted:
            return
        packets = self.shard.pack_many.remote(wanted)
        try:
            call(self.replica.actor.merge_many.remote(packets, since), self.timeout)
        except Unavailable as e:
            self._recover(e)
            return
        except Exception as e:  # recorded by Link; the replica catches up first
            self._recover(e)
            raise
        _note_significant(self, marks)

    def _send_dense(self, version: int, blob: bytes) -> None:
        """The replica process installs it; one restarting catches up and is sent it again."""
        while True:
            try:
                call(self.replica.actor.install_dense.remote(blob), self.timeout)
                return
            except Unavailable as e:
                self._recover(e)
                if self.poisoned:
                    raise

    def errors_of(self, replica: int) -> list[str]:
        return list(self.errors)

    def recoveries_of(self, replica: int) -> int:
        return self.recoveries

    def _recover(self, error: Exception) -> None:
        """A send was lost (a replica or shard restarting): the replica catches up instead,
        and is sent the newest dense snapshot again."""
        if isinstance(error, Unavailable):
            self.errors.append(f"{type(error).__name__}: {error}")
        self.recoveries += 1
        while self.running:
            try:
                call(self.replica.actor.catch_up.remote(self.replica.shard, "link"), self.timeout)
                if self.dense_last is not None:
                    call(self.replica.actor.install_dense.remote(self.dense_last[1]), self.timeout)
                return
            except Unavailable:
                time.sleep(0.2)
        self.poisoned = True


class _Member:
    """One replica in a shard's group link: attached (sent to), its watermarks trusted."""

    def __init__(self, index: int, actor: Any):
        self.index, self.actor = index, actor
        self.attached = self.marks_ok = True
        self.generation = 0  # bumped by every failure: a rejoin that saw one starts over
        self.rejoining = False
        self.recoveries = 0
        self.errors: list[str] = []


class _GroupReplica(_RemoteView):
    """Every replica as one shard's group link sees them."""

    index = "all"

    def __init__(self, members: list[_Member], shard: int, tables: list[str],
                 marks: _Watermarks):
        super().__init__(shard, tables, marks)
        self.members = members

    def set_watermark(self, table: str, version: int) -> None:
        for m in self.members:
            if m.attached and m.marks_ok:
                self.marks.put(m.index, table, self.shard, int(version))


class GroupLink(Link):
    """One link per shard for every replica: each batch is packed once, merged by all.

    Used when links have no bandwidth budget (each replica would be sent the
    same rows): the shard packs a batch once, and its one object-store
    reference goes to every replica's merge. A replica whose merge fails or
    lags (its process restarting) is detached at once, so the others keep
    their freshness; a thread waits until it answers again, attaches it,
    has it catch up with the shard (everything it missed), and only then
    lets its watermarks move again.
    """

    def __init__(self, view: ShardView, group: _GroupReplica, config: SchedulerConfig,
                 shard: Any, timeout: float, slow_s: float):
        super().__init__(view, group, config)  # type: ignore[arg-type]
        self.shard, self.timeout, self.slow_s = shard, timeout, slow_s
        self.members = group.members
        self.lock = threading.Lock()
        self.helpers = Helpers()  # the rejoin threads

    def stop(self) -> None:
        """The link's thread, then every rejoin it started (see `Helpers`)."""
        super().stop()
        self.helpers.close()

    def errors_of(self, replica: int) -> list[str]:
        return list(self.members[replica].errors)

    def recoveries_of(self, replica: int) -> int:
        return self.members[replica].recoveries

    def _send(self, batch: list) -> None:
        wanted, since, marks = _packets_of(batch, self.config.max_packet_rows)
        members = [m for m in self.members if m.attached]
        if not wanted or not members:
            return  # a detached replica catches up with the shard when it rejoins
        packets = self.shard.pack_many.remote(wanted)
        refs = {m.actor.merge_many.remote(packets, since): m for m in members}
        deadline = time.monotonic() + self.timeout
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending),
                                     timeout=min(self.slow_s, max(0.0, deadline - time.monotonic())))
            for ref in done:
                try:
                    call(ref, 0)
                except Exception as e:  # noqa: BLE001 - that replica catches up; others go on
                    self._detach(refs[ref], e)
            if not pending:
                break
            packed, _ = ray.wait([packets], timeout=0)
            if packed or time.monotonic() > deadline:  # the shard answered: these replicas lag
                for ref in pending:
                    self._detach(refs[ref], Unavailable(f"no merge within {self.slow_s:g} s"))
                break
        _note_significant(self, marks)

    def _send_dense(self, version: int, blob: bytes) -> None:
        """Every attached replica installs it; one that fails is detached (it is sent the
        newest snapshot again when it rejoins). A refusal by all is the link's error."""
        members = [m for m in self.members if m.attached]
        ref = ray.put(blob)  # one copy in the object store for every replica
        refs = {m.actor.install_dense.remote(ref): m for m in members}
        refused = []
        for r, m in refs.items():
            try:
                call(r, self.timeout)
            except Unavailable as e:
                self._detach(m, e)
            except Exception as e:  # noqa: BLE001 - a refusal: reported below
                refused.append(f"replica {m.index}: {e}")
        if refused:
            raise EkkoError("; ".join(refused))

    def _detach(self, m: _Member, error: Exception) -> None:
        with self.lock:
            m.errors.append(f"{type(error).__name__}: {error}")
            self.errors.append(f"replica {m.index}: {type(error).__name__}: {error}")
            m.generation += 1
            m.attached = m.marks_ok = False
            if m.rejoining:
                return
            m.rejoining = True
        self.helpers.start(self._rejoin, m, name=f"ekko-rejoin-{m.index}")

    def _rejoin(self, m: _Member) -> None:
        """Attach `m` again once it answers; it catches up, then its watermarks move."""
        shard = self.replica.shard
        while self.running:
            with self.lock:
                generation = m.generation
            try:
                _, ready = call(m.actor.ping.remote(), min(self.timeout, PROBE_S))
            except Exception:  # noqa: BLE001 - still restarting
                ready = False
            if not ready:
                time.sleep(0.2)
                continue
            m.attached = True  # sends reach it from now on; the catch-up covers what it missed
            try:
                call(m.actor.catch_up.remote(shard, "link"), self.timeout)
                dense = self.dense_last
                if dense is not None:
                    call(m.actor.install_dense.remote(dense[1]), self.timeout)
            except Exception:  # noqa: BLE001 - failed again: start over
                m.attached = False
                time.sleep(0.2)
                continue
            with self.lock:
                if m.generation != generation:
                    continue  # a send to it failed meanwhile
                m.marks_ok = True
                m.recoveries += 1
                m.rejoining = False
            for table in self.pending:
                self.replica.marks.put(m.index, table, shard, self.watermark(table))
            return
        with self.lock:
            m.rejoining = False

