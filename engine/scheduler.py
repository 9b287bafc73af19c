"""The scheduler: what goes next on each replica link, under a bandwidth budget.

One `Link` per replica, with its own thread. A commit on the primary is
announced to every link (`enqueue`); a link decides which pending rows go
into the next packets, asks the primary to pack them (current values, so a
newer update of a row always supersedes a pending one: only the newest value
is sent) and hands the packets to its replica. Links exchange only packets
and plain values with the primary and the replica.

Policies (`SchedulerConfig.policy`):

* "priority" (ekko's): each pending row has a priority
      w_new          if the replica never received this row from this link
    + w_significance * min(norm / table's running mean norm, significance_cap)
    + w_traffic      * the table's share of lookups x number of tables
    + seconds pending / age_scale_s (1 s)                (aging: nothing starves)
  where norm is the largest update norm among the row's pending updates
  (the size of its biggest unsent jump; a row updated often with small
  gradients is not significant, only frequent: aging covers it). Rows
  restored by a rollback go first. With no budget every pending row goes at
  once; with one, the highest priorities that fit the bytes available.
* "fifo": arrival order, every update sent as committed (no superseding).
* "periodic": every interval_s, all rows touched since the last push
  (Monolith-style sync).
* "full": every interval_s, a full copy of every table (checkpoint pipelines).

The budget is a token bucket (bytes/s, depth burst_s seconds of it); a
packet costs its encoded size (`Packet.nbytes`). The bucket and the periodic
ticks read `SchedulerConfig.clock` (the system's by default), so a test can
drive them with a clock it advances by hand.

Every packet goes through `Replica.deliver`: rows the replica rejects, or
refuses as not newer while it holds something else, are re-packed from the
primary and settled; what still differs is divergent, and `Engine.flush`
raises instead of reporting the replica fresh.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..kernels.errors import EkkoError
from .packet import ROW_OVERHEAD
from .ports import LinkPrimary, LinkReplica
from .primary import Commit, Primary
from .replica import Replica
from .stats import Histogram

POLICIES = ("priority", "fifo", "periodic", "full")
PACKET_HEADER = 64  # bytes a packet costs besides its rows (header, name, checksum)
# a full copy's commit time for a row with no update pending: the watermark counts it
# delivered already, the copy only repeats it
UNCHANGED = -1


class Clock:
    """The time a link's budget and periodic ticks follow: the system's monotonic clock."""

    def now(self) -> float:
        """Seconds on a monotonic scale."""
        return time.perf_counter()

    def wait(self, cond: threading.Condition, seconds: float | None) -> None:
        """Wait on `cond` (held) until notified, or `seconds` of this clock have passed."""
        cond.wait(seconds)

    def time_ns(self) -> int:
        """Now on the commit times' scale (ns since the epoch): a row's age is measured
        against it. A simulation's clock returns its virtual time here."""
        return time.time_ns()


class ManualClock(Clock):
    """A clock that stands still until `advance` moves it (for tests of timed policies).

    A link waiting on it re-checks every few real milliseconds, so an
    advance is seen at once; nothing happens by the passing of real time.
    """

    def __init__(self, start: float = 0.0):
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds

    def wait(self, cond: threading.Condition, seconds: float | None) -> None:
        cond.wait(0.005)


SYSTEM_CLOCK = Clock()


@dataclass(frozen=True)
class SchedulerConfig:
    """Weights and rules of the scheduler (see the module docstring)."""

    policy: str = "priority"
    bandwidth: float | None = None  # bytes/s per link; None: unlimited
    interval_s: float = 1.0  # periodic and full: the push period
    w_new: float = 4.0
    w_significance: float = 1.0
    w_traffic: float = 1.0
    age_scale_s: float = 1.0
    significance_cap: float = 100.0
    burst_s: float = 0.05
    max_packet_rows: int = 1 << 16
    wire: bool = False  # encode and decode every packet, as between processes
    significant_ratio: float = 10.0  # rows this many times the mean norm count as significant
    clock: Clock = field(default=SYSTEM_CLOCK, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise EkkoError(f"unknown scheduler policy {self.policy!r}; one of {', '.join(POLICIES)}")
        if self.bandwidth is not None and not self.bandwidth > 0:
            raise EkkoError(f"bandwidth must be positive bytes/s, got {self.bandwidth}")
        if not self.interval_s > 0 or not self.age_scale_s > 0:
            raise EkkoError("interval_s and age_scale_s must be positive")
        if not isinstance(self.clock, Clock):
            raise EkkoError(f"clock must be an ekko.engine.scheduler.Clock, got "
                            f"{type(self.clock).__name__}")


class _Pending:
    """Per table: which rows wait for this link, since when, how significant."""

    def __init__(self, rows: int):
        self.flag = np.zeros(rows, bool)
        self.since = np.zeros(rows, np.int64)
        self.first = np.zeros(rows, np.int64)
        self.sig = np.zeros(rows, np.float64)
        self.peak = np.zeros(rows, np.float64)  # the largest single pending update norm
        self.peak_at = np.zeros(rows, np.int64)  # the commit time of that update
        self.seen = np.zeros(rows, bool)
        self.queue: list[np.ndarray] = []
        self.noted = 0

    def add(self, c: Commit, significance: np.ndarray) -> None:
        new = c.ids[~self.flag[c.ids]]
        self.flag[new] = True
        self.since[new] = c.commit_ns
        self.first[new] = c.version
        self.sig[c.ids] += significance
        bigger = significance > self.peak[c.ids]
        self.peak[c.ids[bigger]] = significance[bigger]
        self.peak_at[c.ids[bigger]] = c.commit_ns
        if len(new):
            self.queue.append(new)
        self.noted = max(self.noted, c.version)

    def ids(self) -> np.ndarray:
        if len(self.queue) > 1:
            self.queue = [np.concatenate(self.queue)]
        return self.queue[0] if self.queue else np.zeros(0, np.int64)

    def take(self, ids: np.ndarray, keep: np.ndarray) -> tuple:
        """Remove `ids` from the pending set; returns (since, largest update norm, its commit time)."""
        since, first = self.since[ids].copy(), (self.peak[ids].copy(), self.peak_at[ids].copy())
        self.flag[ids] = False
        self.sig[ids] = 0.0
        self.peak[ids] = 0.0
        self.seen[ids] = True
        self.queue = [keep] if len(keep) else []
        return since, first

    def watermark(self) -> int:
        ids = self.ids()
        return self.noted if not len(ids) else int(self.first[ids].min()) - 1


class Link:
    """One replica's link: pending rows, the policy, the budget and a sender thread.

    It reads its primary through `LinkPrimary` and tells its replica through
    `LinkReplica` (ports.py); `_send` delivers in this process (`Primary.pack`,
    `Replica.deliver`), and a transport that moves packets another way
    overrides it (engine/cluster/links.py).
    """

    def __init__(self, primary: LinkPrimary, replica: LinkReplica, config: SchedulerConfig,
                 on_error: Callable[[Exception], None] | None = None):
        self.primary, self.replica, self.config = primary, replica, config
        rows = primary.table_rows()
        self.pending = {n: _Pending(r) for n, r in rows.items()}
        for name, p in self.pending.items():  # the tables may carry versions already
            p.noted = primary.issued(name)
        self.fifo: dict[str, deque] = {n: deque() for n in rows}
        self.arrivals = 0
        self.row_bytes = {n: primary.row_bytes(n) + ROW_OVERHEAD for n in rows}
        self.cond = threading.Condition()
        self.running = False
        self.clock = config.clock
        self.tokens = 0.0
        self.last_refill = self.clock.now()
        self.next_tick = self.clock.now() + config.interval_s
        self.thread: threading.Thread | None = None
        self.on_error = on_error
        self.busy = False
        self.inflight: dict[str, int] = {}  # table -> oldest version being sent right now
        self.errors: list[str] = []
        self.significant = Histogram()  # freshness of rows over significant_ratio x the mean
        # the dense part (engine/dense.py): the newest snapshot waiting, the newest sent
        self.dense_pending: tuple[int, bytes] | None = None  # (version, encoded snapshot)
        self.dense_last: tuple[int, bytes] | None = None  # the newest one delivered
        self.dense_sent = -1
        self.dense_failed: tuple[int, str] | None = None  # a refused snapshot: (version, why)
        self.dense_bytes = 0
        self.dense_charged = self.rows_charged = 0  # budget bytes each kind has been charged

    # -- from the engine ---------------------------------------------------------
    def enqueue(self, c: Commit, significance: np.ndarray, wake: bool = True) -> None:
        """Note a commit's rows; `wake=False` leaves the link asleep until `wake()`
        (the engine's `batched()`: one wake for several tables' commits)."""
        with self.cond:
            if self.config.policy == "fifo":
                self.arrivals += 1
                self.fifo[c.table].append((self.arrivals, c))
                self.pending[c.table].noted = max(self.pending[c.table].noted, c.version)
            else:
                self.pending[c.table].add(c, significance)
            if wake:
                self.cond.notify_all()

    def wake(self) -> None:
        """Look for work now (commits noted without waking, a lifted hold)."""
        with self.cond:
            self.cond.notify_all()

    def enqueue_dense(self, version: int, blob: bytes) -> None:
        """A dense snapshot to send: it supersedes one still waiting (only the newest goes)."""
        with self.cond:
            if self.dense_pending is None or version > self.dense_pending[0]:
                self.dense_pending = (version, blob)
            self.cond.notify_all()

    def start(self) -> None:
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"ekko-link-{self.replica.index}")
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.running = False
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join()

    def watermark(self, table: str) -> int:
        with self.cond:
            return self._watermark(table)

    def _watermark(self, table: str) -> int:
        if self.config.policy == "fifo":
            q = self.fifo[table]
            w = q[0][1].version - 1 if q else self.pending[table].noted
        else:
            w = self.pending[table].watermark()
        if table in self.inflight:
            w = min(w, self.inflight[table] - 1)
        return w

    def wait_for(self, targets: dict[str, int], timeout: float | None, dense: int = -1) -> bool:
        """Block until every table's watermark reaches its target and the dense snapshot
        `dense` (or a newer one) was delivered; False on timeout, or at once when the
        replica holds divergent rows or refused that snapshot (waiting will not help)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while not (all(self._watermark(t) >= v for t, v in targets.items())
                       and self.dense_sent >= dense):
                if not self.running or self._diverged() or self.dense_refused(dense):
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self.cond.wait(0.05 if left is None else min(left, 0.05))
            return True

    def _diverged(self) -> bool:
        return bool(self.replica.divergence())

    def dense_refused(self, version: int) -> bool:
        """Whether the replica refused dense snapshot `version` or a newer one, and nothing
        newer reached it since."""
        failed = self.dense_failed
        return failed is not None and failed[0] >= version > self.dense_sent

    def backlog(self) -> int:
        """Rows (or, for fifo, updates' rows) waiting on this link."""
        with self.cond:
            if self.config.policy == "fifo":
                return sum(len(c.ids) for q in self.fifo.values() for _, c in q)
            return sum(len(p.ids()) for p in self.pending.values())

    # -- the sender thread -------------------------------------------------------------
    def next_batch(self) -> tuple[tuple[int, bytes] | None, list] | None:
        """What to send now: (the dense snapshot or None, the rows as `_select` returns
        them), taken off the pending sets and charged to the budget; None when the policy
        or the budget says wait. Under the lock. The sender thread sends what it returns;
        benchmarks/geo.py's simulated WAN links call it on a virtual clock."""
        if not self._ready():
            return None
        dense = self._take_dense()
        batch = self._select()
        if not batch and dense is None:  # the budget did not stretch to one row
            return None
        return dense, batch

    def _run(self) -> None:
        while True:
            with self.cond:
                chosen = None
                while self.running and chosen is None:
                    chosen = self.next_batch()
                    if chosen is None:
                        self.clock.wait(self.cond, self._wait_time())
                if not self.running:
                    return
                dense, batch = chosen
                self.busy = True
                self.inflight = {}
                for table, _, _, _, first in batch:
                    self.inflight[table] = min(first, self.inflight.get(table, first))
            try:
                if dense is not None:
                    self._dense(dense)
                self._send(batch)
            except Exception as e:  # noqa: BLE001 - reported, the link keeps going
                self.errors.append(f"{type(e).__name__}: {e}")
                if self.on_error is not None:
                    self.on_error(e)
            finally:
                with self.cond:
                    self.busy = False
                    self.inflight = {}
                    for table in {b[0] for b in batch}:
                        self.replica.set_watermark(table, self._watermark(table))
                    for table, p in self.pending.items():
                        if not p.queue and not self.fifo[table]:
                            self.replica.set_watermark(table, self._watermark(table))
                    self.cond.notify_all()

    def _refill(self) -> float:
        bw = self.config.bandwidth
        if bw is None:
            return float("inf")
        now = self.clock.now()
        self.tokens = min(self._depth(), self.tokens + bw * (now - self.last_refill))
        self.last_refill = now
        return self.tokens

    def _has_work(self) -> bool:
        return self.dense_pending is not None or self.config.policy == "full" \
            or self._rows_waiting()

    def _ready(self) -> bool:
        if not self._has_work():
            return False
        if self.config.policy in ("periodic", "full") and self.clock.now() < self.next_tick:
            return False
        tokens = self._refill()
        if self.config.bandwidth is None:
            return True
        # wait for a packet's worth (half the bucket), not one row: headers cost too
        return tokens >= min(0.5 * self._depth(), self._pending_bytes())

    def _depth(self) -> float:
        bw = self.config.bandwidth or 0.0
        return max(bw * self.config.burst_s, 64.0 * max(self.row_bytes.values()))

    def _pending_bytes(self) -> float:
        dense = [] if self.dense_pending is None else [len(self.dense_pending[1])]
        if self.config.policy == "fifo":
            return min([len(q[0][1].ids) * self.row_bytes[t] + PACKET_HEADER
                        for t, q in self.fifo.items() if q] + dense)
        return sum([len(p.ids()) * self.row_bytes[t] + PACKET_HEADER
                    for t, p in self.pending.items() if p.queue] + dense)

    def _wait_time(self) -> float:
        if self.config.policy in ("periodic", "full"):
            return max(0.0005, self.next_tick - self.clock.now())
        if self.config.bandwidth is not None and self._has_work():
            return max(0.0002, min(self.row_bytes.values()) / self.config.bandwidth)
        return 0.05

    # -- choosing rows --------------------------------------------------------------------
    def _take_dense(self) -> tuple[int, bytes] | None:
        """The waiting dense snapshot, charged to the budget ahead of the rows (it is
        one message, sent whole; the bucket may go into debt for it). Under a budget
        it waits while rows wait and snapshots have been charged more bytes than
        rows: snapshots published faster than the budget refills would otherwise
        take all of it, and no row would ever be sent. Under the lock."""
        dense = self.dense_pending
        if dense is None:
            return None
        if self.config.bandwidth is not None:
            if self.dense_charged > self.rows_charged and self._rows_waiting():
                return None  # the rows had less of the budget: they go first
            self._refill()
            self.tokens -= len(dense[1])
            self.dense_charged += len(dense[1])
        self.dense_pending = None
        return dense

    def _rows_waiting(self) -> bool:
        if self.config.policy == "fifo":
            return any(self.fifo.values())
        return any(p.queue for p in self.pending.values())

    def _select(self) -> list:
        """(table, ids, commit times, summed norms) to send now; called under the lock."""
        budget = self._refill()
        policy = self.config.policy
        if policy == "fifo":
            return self._select_fifo(budget)
        if policy == "full":
            self.next_tick = self.clock.now() + self.config.interval_s
            return self._select_full()
        if policy == "periodic":
            self.next_tick = self.clock.now() + self.config.interval_s
        cands = {t: p.ids() for t, p in self.pending.items() if p.queue}
        if not cands:  # only a dense snapshot was waiting
            return []
        if policy == "priority" and budget != float("inf"):
            cands = self._by_priority(cands, budget - PACKET_HEADER * len(cands))
        elif budget != float("inf"):
            cands = self._fit(cands, budget - PACKET_HEADER * len(cands))
        out = []
        for t, ids in cands.items():
            p = self.pending[t]
            keep = np.setdiff1d(p.ids(), ids, assume_unique=True) if len(ids) < len(p.ids()) \
                else np.zeros(0, np.int64)
            first = int(p.first[ids].min()) if len(ids) else p.noted + 1
            since, sig = p.take(ids, keep)
            out.append((t, ids, since, sig, first))
        self._charge(out)
        return out

    def _charge(self, out: list) -> None:
        if self.config.bandwidth is not None:
            cost = sum(len(b[1]) * self.row_bytes[b[0]] + PACKET_HEADER for b in out)
            self.tokens -= cost
            self.rows_charged += cost

    def _fit(self, cands: dict[str, np.ndarray], budget: float) -> dict[str, np.ndarray]:
        out = {}
        for t, ids in cands.items():
            k = int(budget // self.row_bytes[t])
            if k <= 0:
                break
            out[t] = ids[:k]
            budget -= min(k, len(ids)) * self.row_bytes[t]
        return out

    def _by_priority(self, cands: dict[str, np.ndarray], budget: float) -> dict[str, np.ndarray]:
        """The highest-priority pending rows whose bytes fit the budget."""
        c = self.config
        now = self.clock.time_ns()
        traffic = self.replica.traffic()
        total = sum(traffic.values())
        names, prios, costs, idx = [], [], [], []
        for k, (t, ids) in enumerate(cands.items()):
            p = self.pending[t]
            mean = self.primary.norm_mean(t) or 1.0
            sig = p.peak[ids]
            share = traffic[t] / total * len(traffic) if total else 1.0
            prio = (c.w_new * ~p.seen[ids] + c.w_significance * np.minimum(sig / mean, c.significance_cap)
                    + c.w_traffic * share + (now - p.since[ids]) / 1e9 / c.age_scale_s)
            prio[np.isinf(sig)] = np.inf  # rollback rows first
            names.append(t)
            prios.append(prio)
            costs.append(np.full(len(ids), self.row_bytes[t], np.int64))
            idx.append(np.full(len(ids), k, np.int32))
        prio = np.concatenate(prios)
        cost = np.concatenate(costs)
        which = np.concatenate(idx)
        pos = np.concatenate([np.arange(len(ids)) for ids in cands.values()])
        affordable = int(budget // cost.min())
        if affordable <= 0:
            return {}
        if affordable < len(prio):
            top = np.argpartition(-prio, affordable)[:affordable]
            top = top[np.argsort(-prio[top], kind="stable")]
        else:
            top = np.argsort(-prio, kind="stable")
        top = top[np.cumsum(cost[top]) <= budget]
        out = {}
        for k, t in enumerate(names):
            chosen = pos[top[which[top] == k]]
            if len(chosen):
                out[t] = cands[t][np.sort(chosen)]
        return out

    def _select_fifo(self, budget: float) -> list:
        """Whole updates in arrival order, as many as the budget allows."""
        out = []
        while budget > 0:
            heads = [(q[0][0], t) for t, q in self.fifo.items() if q]
            if not heads:
                break
            _, t = min(heads)
            c = self.fifo[t][0][1]
            cost = len(c.ids) * self.row_bytes[t]
            if cost > budget and out:
                break
            self.fifo[t].popleft()
            budget -= cost
            stamp = np.full(len(c.ids), c.commit_ns, np.int64)
            out.append((t, c.ids, stamp, (c.norms.astype(np.float64), stamp), c.version))
        self._charge(out)
        return out

    def _select_full(self) -> list:
        """Every row of every table; rows with pending updates carry their commit time,
        the others UNCHANGED."""
        out = []
        for t, p in self.pending.items():
            rows = len(p.flag)
            ids = np.arange(rows, dtype=np.int64)
            since = np.where(p.flag, p.since, UNCHANGED)
            sig = (p.peak.copy(), np.where(p.flag, p.peak_at, UNCHANGED))
            pend = p.ids()
            first = int(p.first[pend].min()) if len(pend) else p.noted + 1
            p.take(pend, np.zeros(0, np.int64))
            out.append((t, ids, since, sig, first))
        return out

    # -- sending ---------------------------------------------------------------------------
    def _dense(self, dense: tuple[int, bytes]) -> None:
        """Deliver one dense snapshot; a refusal is recorded (flush then fails), not retried."""
        version, blob = dense
        try:
            self._send_dense(version, blob)
        except Exception as e:
            with self.cond:
                self.dense_failed = (version, f"{type(e).__name__}: {e}")
            raise
        with self.cond:
            self.dense_sent = max(self.dense_sent, version)
            self.dense_last = dense
            self.dense_bytes += len(blob)

    def _send_dense(self, version: int, blob: bytes) -> None:
        """In this process: the replica installs it (a transport sending another way
        overrides this, as it does `_send`)."""
        replica: Replica = self.replica  # type: ignore[assignment]
        replica.install_dense(blob)
    def _send(self, batch: list) -> None:
        step = self.config.max_packet_rows
        for table, ids, since, (sig, sig_at), _ in batch:
            mean = self.primary.norm_mean(table) or 1.0
            for lo in range(0, len(ids), step):
                self._deliver(table, ids[lo:lo + step], since[lo:lo + step])
                visible = time.time_ns()
                at = sig_at[lo:lo + step]
                hot = (sig[lo:lo + step] >= self.config.significant_ratio * mean) & (at > 0)
                if hot.any():  # measured from the significant update's own commit
                    self.significant.add((visible - at[hot]) / 1e6)

    def _deliver(self, table: str, ids: np.ndarray, since: np.ndarray) -> None:
        """Pack `ids` now (newest values) and have the replica merge and verify them
        (in this process: the primary is a `Primary`, the replica a `Replica`)."""
        primary: Primary = self.primary  # type: ignore[assignment]
        replica: Replica = self.replica  # type: ignore[assignment]
        packet = primary.pack(table, ids)
        packet.commit_ns = since
        replica.note_issued(table, packet.newest)
        try:
            replica.deliver(packet.to_bytes() if self.config.wire else packet, primary.pack)
        except EkkoError as e:  # the packet as a whole was refused: settle its rows
            self.errors.append(f"{type(e).__name__}: {e}")
            replica.settle(table, ids, primary.pack, why=str(e))

    def errors_of(self, replica: int) -> list[str]:
        """The errors of sends to replica `replica` (this link's only replica)."""
        return list(self.errors)

    def recoveries_of(self, replica: int) -> int:
        """Catch-ups replica `replica` made after a lost send (none in process)."""
        return 0

    def lag_ms(self) -> float:
        """How long the oldest pending update has waited (0 when nothing waits)."""
        now = self.clock.time_ns()
        with self.cond:
            if self.config.policy == "fifo":
                heads = [q[0][1].commit_ns for q in self.fifo.values() if q]
            else:
                heads = [int(p.since[p.ids()].min()) for p in self.pending.values() if p.queue]
        return (now - min(heads)) / 1e6 if heads else 0.0


__all__ = ["Clock", "Link", "ManualClock", "POLICIES", "SYSTEM_CLOCK", "SchedulerConfig",
           "UNCHANGED"]
