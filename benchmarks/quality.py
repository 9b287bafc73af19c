"""What freshness buys, measured: prediction quality of replicas kept fresh seven ways.

    python benchmarks/quality.py [--quick] [--seconds S] [--warmup S] [--seed N]
                                 [--budget-fractions 0.25,0.05] [--harm-seeds 10]

One seeded click stream (workloads/clicks.py: new items arriving all the
time, user and item propensities drifting, popularity shifting; its
generative model is documented there), one online-trained DLRM-style model:
the tables of examples/clicks.ekko trained through ekko
(`ekko.torch.EmbeddingBags`, Adagrad in backward) and the dense MLP
(workloads/clicks_model.py) in torch with Adam. ONE Engine carries one
replica per way of keeping it fresh, so every way sees exactly the same
stream and the same trainer:

  priority      ekko's scheduler (no budget: every commit at once)
  fifo          every update in arrival order
  periodic 1 s  the rows touched in the last 1 s / 10 s / 60 s (Monolith-style),
  ... 10 s, 60 s  and the dense snapshot, every period
  full 600 s    a full copy of every table every 10 min (a checkpoint pipeline)
  frozen        the model as it stood at the end of the warm-up, never updated
  trainer       the trainer's own predictions (the ceiling)

Prequential evaluation, batch by batch (`--batch-s` stream seconds of
events): every replica and the trainer predict the batch, then the trainer
trains on it (the tables commit in backward), publishes the dense module
(`engine.publish_dense()`), and the stream clock advances by the batch's
stream seconds. Metrics count only events after the warm-up.

Time is compressed. The stream is replayed as fast as the trainer and the
predictions go (the measured compression, stream seconds per wall second, is
reported; about 5-10x on a 2-core machine). The periodic, full and frozen
links and every bandwidth budget follow a ManualClock that the loop advances
by the batch's stream seconds, so their periods and budgets are in stream
seconds. The priority and fifo links have no clock to wait for: they deliver
in real time, within milliseconds of the commit, which is within the same
batch at this compression. Each replica's freshness is measured in stream
seconds: before each batch, the age of the newest trained batch the replica
holds whole (every table's watermark and the dense version), 0 for the
trainer. The periodic and full links' first push lands at the end of the
warm-up (their clocks start at the phase that puts it there); the frozen
link's clock stops there.

Then the same run under a bandwidth budget, for priority and fifo only:
each budget is the dense snapshots' bytes per stream second plus a fraction
(`--budget-fractions`) of the row bytes per stream second that the unlimited
priority link moved, the same for both policies.

Then harm (the quality health checks, `HealthConfig(quality=...)`): short runs
of an Engine with 2 priority replicas; every batch is predicted, observed
with its true labels (`engine.observe`: the probe) and trained on, and
`engine.check()` runs every 0.5 stream s after the warm-up. Injected on seed
0: training labels flipped for 3 s, the dense output layer scaled x4 and
published, the category table's gradients x300 for 2 s (under the per-commit
norm check's 1000x). Reported: detection time, rollbacks, when replica 0's
log-loss over 2 stream s came back within 1% of the clean run's trainer
(same seed and events, no harm) for good, and false rollbacks over
`--harm-seeds` clean seeded runs. On a rollback the trainer clears its torch
optimizer's state (the engine restores rows, optimizer rows and the dense
weights, not the trainer's Adam moments).

Prints the tables; writes benchmarks/results/quality.md and quality.png
(quality against freshness, and log-loss gap over stream time). `--quick`
runs a small stream briefly and writes nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ekko  # noqa: E402
from ekko.engine import HealthConfig, SchedulerConfig  # noqa: E402
from ekko.engine.quality import QualityConfig, auc, calibration, logloss  # noqa: E402
from ekko.engine.scheduler import ManualClock  # noqa: E402
from ekko.workloads.clicks import ClickBatch, ClickStream, ClickStreamConfig  # noqa: E402
from ekko.workloads.clicks_model import ClicksDense  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from results_io import add_out, load_note, write_results  # noqa: E402
MODEL = ROOT / "examples" / "clicks.ekko"
TRAINER = "trainer"
TIMELINE_S = 30.0  # the log-loss-over-time plot's window


@dataclass(frozen=True)
class RunConfig:
    """One benchmark run: the stream, its length, the batch and the trainer."""

    seconds: float = 1800.0  # stream seconds in all, warm-up included
    warmup_s: float = 300.0  # stream seconds excluded from the metrics
    batch_s: float = 0.25  # stream seconds of events per batch
    stream: ClickStreamConfig = field(default_factory=ClickStreamConfig)
    dense_lr: float = 1e-3
    seed: int = 0  # the stream's and the dense module's

    @property
    def batch_events(self) -> int:
        return max(1, round(self.batch_s * self.stream.events_per_s))

    @property
    def batches(self) -> int:
        return math.ceil(self.seconds / self.batch_s)


@dataclass(frozen=True)
class Way:
    """One way of keeping a replica fresh: a scheduler policy, its period and budget."""

    name: str
    policy: str = "priority"
    interval_s: float | None = None  # periodic / full: the period in stream seconds
    bandwidth: float | None = None  # bytes per stream second
    frozen: bool = False  # one push at the end of the warm-up, then never again

    def scheduler(self, clock: ManualClock, config: RunConfig) -> SchedulerConfig:
        """The link's config. The clock moves in steps of a batch, so a budget's bucket
        holds a batch's worth of bytes (a shallower one would cap what a step can send)."""
        interval = config.warmup_s if self.frozen else (self.interval_s or 1.0)
        return SchedulerConfig(policy=self.policy, interval_s=interval, bandwidth=self.bandwidth,
                               burst_s=max(config.batch_s, 0.05), clock=clock)


WAYS = (Way("priority"), Way("fifo", "fifo"),
        Way("periodic 1 s", "periodic", 1.0), Way("periodic 10 s", "periodic", 10.0),
        Way("periodic 60 s", "periodic", 60.0), Way("full 600 s", "full", 600.0),
        Way("frozen", "periodic", frozen=True))


@dataclass
class Outcome:
    """What one predictor (a replica or the trainer) did over the measured events."""

    name: str
    way: Way | None
    p: list[np.ndarray] = field(default_factory=list)  # per batch, after the warm-up
    ages: list[float] = field(default_factory=list)  # stream s, per batch after the warm-up
    row_bytes: int = 0  # after the warm-up
    dense_bytes: int = 0

    def metrics(self, y: np.ndarray) -> dict[str, float]:
        p = np.concatenate(self.p).astype(np.float64)
        return {"logloss": logloss(p, y), "auc": auc(p, y), "calibration": calibration(p, y),
                "age_s": float(np.mean(self.ages)) if self.ages else 0.0}


@dataclass
class Run:
    """A run's outcomes (the trainer's first), labels, timings and the clocks' story."""

    config: RunConfig
    outcomes: list[Outcome]
    y: np.ndarray
    truth: np.ndarray  # the stream's true click probabilities (the Bayes-optimal prediction)
    t: np.ndarray  # each measured batch's end, stream s
    wall_s: float

    @property
    def measured_s(self) -> float:
        return self.config.seconds - self.config.warmup_s

    @property
    def compression(self) -> float:
        return self.config.seconds / self.wall_s


class Trainer:
    """The online trainer: tables through ekko, the dense MLP through a torch optimizer."""

    def __init__(self, engine: ekko.Engine, dense: ClicksDense, lr: float):
        self.engine, self.dense = engine, dense
        self.emb = ekko.torch.EmbeddingBags(engine)
        self.opt = torch.optim.Adam(dense.parameters(), lr=lr)

    def predict(self, batch: ClickBatch) -> np.ndarray:
        """Click probabilities from the trainer's own rows and weights (no commit)."""
        with torch.no_grad():
            return _probability(self.dense(self.emb(batch.sparse()), torch.from_numpy(batch.x)))

    def train(self, batch: ClickBatch, y: np.ndarray | None = None,
              grad_scale: dict[str, float] | None = None) -> None:
        """One step on `batch` (on labels `y` if given; each feature in `grad_scale` has
        its pooled gradient, so its table's update, multiplied: the harm section's)."""
        pooled = self.emb(batch.sparse())
        for feature, k in (grad_scale or {}).items():
            pooled[feature].register_hook(lambda g, k=k: g * k)
        logits = self.dense(pooled, torch.from_numpy(batch.x))
        labels = torch.from_numpy(batch.y if y is None else y)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        self.opt.zero_grad()
        loss.backward()  # the tables' updates commit here, as engine steps
        self.opt.step()
        self.engine.publish_dense()


class Clocks:
    """One ManualClock per replica, advanced by stream seconds. A periodic or full clock
    starts at the phase that puts its first push at the warm-up's end; the frozen one
    stops there."""

    def __init__(self, ways: list[Way], config: RunConfig):
        self.ways, self.config, self.warmup_s = ways, config, config.warmup_s
        self.clocks = [ManualClock() for _ in ways]
        self.t = 0.0

    def configs(self) -> list[SchedulerConfig]:
        return [w.scheduler(c, self.config) for w, c in zip(self.ways, self.clocks)]

    def set_phase(self) -> None:
        """Call once the links exist (their first tick is one period after their start)."""
        for way, clock in zip(self.ways, self.clocks):
            if way.interval_s is not None and not way.frozen:
                clock.advance((-self.warmup_s) % way.interval_s)

    def advance(self, dt: float) -> None:
        self.t += dt
        for way, clock in zip(self.ways, self.clocks):
            if not (way.frozen and self.t > self.warmup_s + 1e-9):
                clock.advance(dt)


class Ages:
    """How old, in stream seconds, the newest trained batch is that each replica holds whole."""

    def __init__(self, engine: ekko.Engine):
        self.engine = engine
        self.tables = list(engine.tables)
        self.need: list[np.ndarray] = []  # per trained batch: each table's version, dense's
        self.ends: list[float] = []  # stream s at each trained batch's end
        self.whole = [0] * len(engine.replicas)  # per replica: batches held whole (monotone)

    def trained(self, t_end: float) -> None:
        issued = self.engine.issued[0]
        self.need.append(np.array([issued.get(n, 0) for n in self.tables]
                                  + [self.engine.dense_version]))
        self.ends.append(t_end)

    def age(self, replica: int, now: float) -> float:
        r = self.engine.replicas[replica]
        marks = r.watermarks()
        held = np.array([marks[n] for n in self.tables] + [r.dense.version])
        k = self.whole[replica]
        while k < len(self.need) and (self.need[k] <= held).all():
            k += 1
        self.whole[replica] = k
        return now - (self.ends[k - 1] if k else 0.0)


def _probability(logits: torch.Tensor) -> np.ndarray:
    return torch.sigmoid(logits).numpy().astype(np.float32)


def _byte_counts(engine: ekko.Engine) -> list[tuple[int, int]]:
    """(row bytes, dense bytes) each replica has received so far."""
    return [(r["bytes_moved"], r["dense"]["bytes"]) for r in engine.stats()["replicas"]]


def run(config: RunConfig, ways: list[Way], progress: bool = False) -> Run:
    """The prequential loop over one stream, one trainer and one replica per way."""
    torch.manual_seed(config.seed)
    stream = ClickStream(replace(config.stream, seed=config.seed))
    dense = ClicksDense(dense=config.stream.dense)
    clocks = Clocks(ways, config)
    model = ekko.compile_model(MODEL)
    outcomes = [Outcome(TRAINER, None)] + [Outcome(w.name, w) for w in ways]
    ys, truth, ends = [], [], []
    start = time.perf_counter()
    with ekko.Engine(model, replicas=len(ways), dense=dense,
                     scheduler=clocks.configs()) as engine:
        clocks.set_phase()
        trainer, ages = Trainer(engine, dense, config.dense_lr), Ages(engine)
        base = None
        for k in range(config.batches):
            batch = stream.next_batch(config.batch_events)
            measured = clocks.t >= config.warmup_s - 1e-9
            if measured and base is None:
                base = _byte_counts(engine)
            if measured:
                _predict_all(engine, trainer, ages, outcomes, batch, clocks.t)
                ys.append(batch.y)
                truth.append(batch.p)
                ends.append(clocks.t + config.batch_s)
            trainer.train(batch)
            clocks.advance(config.batch_s)
            ages.trained(clocks.t)
            if progress and (k + 1) % max(1, config.batches // 20) == 0:
                print(f"  {clocks.t:.0f} / {config.seconds:.0f} stream s, "
                      f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        wall = time.perf_counter() - start
        for o, now, before in zip(outcomes[1:], _byte_counts(engine), base or []):
            o.row_bytes, o.dense_bytes = now[0] - before[0], now[1] - before[1]
    return Run(config, outcomes, np.concatenate(ys), np.concatenate(truth), np.asarray(ends),
               wall)


def _predict_all(engine: ekko.Engine, trainer: Trainer, ages: Ages, outcomes: list[Outcome],
                 batch: ClickBatch, now: float) -> None:
    """Every predictor's click probabilities for `batch`, before anyone trains on it."""
    sparse, x = batch.sparse(), torch.from_numpy(batch.x)
    outcomes[0].p.append(trainer.predict(batch))
    outcomes[0].ages.append(0.0)
    for i, o in enumerate(outcomes[1:]):
        o.ages.append(ages.age(i, now))
        o.p.append(_probability(engine.replicas[i].predict(sparse, x)))


# -- budgets -----------------------------------------------------------------------------------
def budgeted_ways(unlimited: Run, fractions: list[float]) -> list[Way]:
    """priority and fifo under each budget: the dense bytes/s plus a fraction of the row
    bytes/s the unlimited priority link moved (the same budget for both)."""
    ref = next(o for o in unlimited.outcomes if o.name == "priority")
    rows, dense = ref.row_bytes / unlimited.measured_s, ref.dense_bytes / unlimited.measured_s
    return [Way(f"{policy} @ {f:.0%} rows", policy, bandwidth=dense + f * rows)
            for f in fractions for policy in ("priority", "fifo")]


# -- harm: the quality health checks ------------------------------------------------------------
@dataclass(frozen=True)
class Harm:
    """One injected harm, from stream second `at_s` for `seconds`.

    poison:  the training labels flipped (observe() still gets the true ones)
    dense:   the trainer's dense module corrupted once (the output layer scaled by
             `factor`: predictions wrong but finite) and published
    blow-up: `table`'s gradients multiplied by `factor` (small enough to pass the
             per-commit norm check)
    """

    kind: str  # "none", "poison", "dense" or "blow-up"
    at_s: float = 0.0
    seconds: float = 0.0
    factor: float = 1.0
    feature: str = "category"  # blow-up: the feature whose table's gradients blow up

    def active(self, t: float) -> bool:
        return self.kind != "none" and self.at_s <= t < self.at_s + self.seconds

    def labels(self, batch: ClickBatch, t: float) -> np.ndarray:
        return 1.0 - batch.y if self.kind == "poison" and self.active(t) else batch.y

    def grad_scale(self, t: float) -> dict[str, float]:
        return {self.feature: self.factor} if self.kind == "blow-up" and self.active(t) else {}

    def corrupt(self, trainer: Trainer, t: float, dt: float) -> None:
        if self.kind == "dense" and self.at_s <= t < self.at_s + dt:
            with torch.no_grad():
                for p in trainer.dense.mlp[-1].parameters():
                    p.mul_(self.factor)
            trainer.engine.publish_dense()


@dataclass(frozen=True)
class HarmConfig:
    """The harm section: short runs of 2 priority replicas with the quality checks on."""

    run: RunConfig = field(default_factory=lambda: RunConfig(seconds=200.0, warmup_s=120.0))
    check_every_s: float = 0.5  # stream s between Engine.check() calls (from the warm-up on)
    # the defaults (a 10% allowed rise of normalized entropy let a poisoned burst creep
    # into the healthy mark: back within 1% after 30 s, not 8 s; the default is 4% now)
    quality: QualityConfig = field(default_factory=QualityConfig)
    mark_lag: int = 2  # HealthConfig.mark_lag: a rollback goes back this many passing checks
    harm_at_s: float = 150.0
    poison_s: float = 3.0
    dense_factor: float = 4.0
    blowup_s: float = 2.0
    blowup_factor: float = 300.0
    window_s: float = 2.0  # the rolling window "back within 1% of the trainer" is judged on
    clean_seeds: int = 10

    def harms(self) -> list[Harm]:
        return [Harm("poison", self.harm_at_s, self.poison_s),
                Harm("dense", self.harm_at_s, self.run.batch_s, self.dense_factor),
                Harm("blow-up", self.harm_at_s, self.blowup_s, self.blowup_factor)]


@dataclass
class Trace:
    """A harm run: per batch, its end (stream s) and replica 0's summed log-loss, and the
    rollbacks (stream s of the check, table, reason)."""

    harm: Harm
    seed: int
    ends: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)  # replica 0, summed over the batch
    trainer_loss: list[float] = field(default_factory=list)
    events: list[int] = field(default_factory=list)
    rollbacks: list[tuple[float, str, str]] = field(default_factory=list)
    checks: int = 0


def run_harm(config: HarmConfig, harm: Harm, seed: int) -> Trace:
    """The prequential loop with the quality checks on and `harm` injected."""
    rc = replace(config.run, seed=seed)
    torch.manual_seed(seed)
    stream = ClickStream(replace(rc.stream, seed=seed))
    dense = ClicksDense(dense=rc.stream.dense)
    health = HealthConfig(quality=config.quality, mark_lag=config.mark_lag)
    trace, t = Trace(harm, seed), 0.0
    every = max(1, round(config.check_every_s / rc.batch_s))
    with ekko.Engine(ekko.compile_model(MODEL), replicas=2, dense=dense,
                     health=health) as engine:
        trainer = Trainer(engine, dense, rc.dense_lr)
        for k in range(rc.batches):
            batch = stream.next_batch(rc.batch_events)
            sparse, x = batch.sparse(), torch.from_numpy(batch.x)
            if t >= rc.warmup_s - 1e-9:
                trace.ends.append(t + rc.batch_s)
                trace.events.append(len(batch))
                trace.loss.append(float(_losses(_probability(
                    engine.replicas[0].predict(sparse, x)), batch.y).sum()))
                trace.trainer_loss.append(float(_losses(trainer.predict(batch), batch.y).sum()))
            engine.observe(sparse, x, batch.y)
            harm.corrupt(trainer, t, rc.batch_s)
            trainer.train(batch, harm.labels(batch, t), harm.grad_scale(t))
            t += rc.batch_s
            if t >= rc.warmup_s - 1e-9 and (k + 1) % every == 0:
                before = len(engine.rollbacks)
                if not engine.check():  # rolled back: the trainer drops its optimizer's
                    trainer.opt.state.clear()  # moments, which hold the harm's gradients
                trace.checks += 1
                trace.rollbacks += [(t, r.table, r.reason) for r in engine.rollbacks[before:]]
    return trace


@dataclass
class HarmReport:
    """What the checks did about one harm, against the clean run of the same seed."""

    harm: Harm
    detected_s: float | None  # stream s from the harm's start to the first rollback
    rollbacks: int  # checks that rolled back (all tables and the dense module at once)
    recovered_s: float | None  # from the harm's start until back within 1% of the clean trainer
    worst_gap: float  # % over a window, replica 0 against the clean trainer
    reasons: list[str]


def report_harm(config: HarmConfig, harmed: Trace, clean: Trace) -> HarmReport:
    """Detection, rollbacks, and when replica 0's windowed log-loss came back within 1% of
    the clean run's trainer (the same seed and events, no harm) and stayed there."""
    h = harmed.harm
    times = sorted({at for at, _, _ in harmed.rollbacks})
    detected = next((at - h.at_s for at in times if at >= h.at_s), None)
    gap = _window_gap(harmed.loss, clean.trainer_loss, harmed.events,
                      round(config.window_s / config.run.batch_s))
    ends = np.asarray(harmed.ends)
    after = ends >= h.at_s
    bad = np.flatnonzero(after & (gap > 1.0))
    recovered = None
    if len(bad) and bad[-1] + 1 < len(ends):
        recovered = float(ends[bad[-1] + 1] - h.at_s)
    elif not len(bad):
        recovered = 0.0
    reasons = list(dict.fromkeys(reason for _, _, reason in harmed.rollbacks))
    return HarmReport(h, detected, len(times), recovered, float(gap[after].max()), reasons)


def _cause(reason: str) -> str:
    """Which check a rollback's reason names."""
    for key, name in (("normalized entropy", "log-loss"), ("AUC", "AUC"), ("PSI", "shift")):
        if key in reason:
            return name
    return reason[:60]


def _window_gap(loss: list[float], ref: list[float], events: list[int], n: int) -> np.ndarray:
    """Per batch: the log-loss gap (%) over the last n batches, `loss` against `ref`."""
    kernel = np.ones(max(1, n))
    a = np.convolve(loss, kernel)[:len(loss)]
    b = np.convolve(ref, kernel)[:len(ref)]
    return (a / b - 1) * 100


def harm_section(config: HarmConfig) -> str:
    """Run the clean seeds and the harms (on the first seed's stream); the report text."""
    clean = [run_harm(config, Harm("none"), seed) for seed in range(config.clean_seeds)]
    reports = [report_harm(config, run_harm(config, h, 0), clean[0]) for h in config.harms()]
    return format_harm(config, clean, reports)


def format_harm(config: HarmConfig, clean: list[Trace], reports: list[HarmReport]) -> str:
    q, rc = config.quality, config.run
    lines = [f"Engine with 2 priority replicas and `HealthConfig(quality=QualityConfig("
             f"logloss_rise={q.logloss_rise}, auc_drop={q.auc_drop}, max_shift={q.max_shift}, "
             f"min_events={q.min_events}, probe_events={q.probe_events}), "
             f"mark_lag={config.mark_lag})`; every batch is "
             f"predicted by replica 0, observed with its true labels, then trained on; "
             f"`check()` every {config.check_every_s} stream s from the warm-up's end "
             f"({rc.warmup_s:.0f} s) to {rc.seconds:.0f} s. Harm at {config.harm_at_s:.0f} "
             f"stream s on seed 0. Recovered: replica 0's log-loss over the last "
             f"{config.window_s:.0f} stream s is within 1% of the clean run's trainer (same "
             "seed, same events, no harm) from then on.\n",
             "| harm | detected after (stream s) | rollbacks | back within 1% after (stream s) "
             "| worst gap | why it rolled back |", "|---|---|---|---|---|---|"]
    names = {"poison": f"labels flipped for {config.poison_s:.0f} s",
             "dense": f"dense output layer x{config.dense_factor:g}, published",
             "blow-up": f"category table gradients x{config.blowup_factor:g} for "
                        f"{config.blowup_s:g} s"}
    for r in reports:
        det = "not detected" if r.detected_s is None else f"{r.detected_s:.2f}"
        rec = "not within the run" if r.recovered_s is None else f"{r.recovered_s:.2f}"
        why = ", ".join(sorted({_cause(x) for x in r.reasons})) or "-"
        lines.append(f"| {names[r.harm.kind]} | {det} | {r.rollbacks} | {rec} | "
                     f"{r.worst_gap:+.1f}% | {why} |")
    false = [len({at for at, _, _ in c.rollbacks}) for c in clean]
    lines.append(f"\nClean runs (seeds 0-{len(clean) - 1}, {clean[0].checks} checks each): "
                 f"{sum(false)} false rollbacks" + (f" (per seed: {false})" if sum(false) else "")
                 + ".\n")
    return "\n".join(lines) + "\n"


# -- reporting ---------------------------------------------------------------------------------
def rows_of(r: Run) -> list[dict]:
    """Per predictor: its metrics, the gap to the trainer's log-loss and bytes per stream s."""
    out = []
    ceiling = r.outcomes[0].metrics(r.y)["logloss"]
    for o in r.outcomes:
        m = o.metrics(r.y)
        m.update(name=o.name, gap=(m["logloss"] / ceiling - 1) * 100,
                 kb_s=(o.row_bytes + o.dense_bytes) / r.measured_s / 1e3,
                 row_kb_s=o.row_bytes / r.measured_s / 1e3,
                 bandwidth=None if o.way is None else o.way.bandwidth)
        out.append(m)
    return out


def format_table(r: Run) -> str:
    head = ("| replica kept fresh by | log-loss | gap to trainer | AUC | calibration | "
            "mean age (stream s) | KB / stream s (rows + dense) | budget KB / stream s |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for m in rows_of(r):
        budget = "-" if m["bandwidth"] is None else f"{m['bandwidth'] / 1e3:.1f}"
        kb = "-" if m["name"] == TRAINER else f"{m['kb_s']:.1f} ({m['row_kb_s']:.1f} rows)"
        lines.append(f"| {m['name']} | {m['logloss']:.4f} | {m['gap']:+.2f}% | {m['auc']:.4f} | "
                     f"{m['calibration']:.3f} | {m['age_s']:.2f} | {kb} | {budget} |")
    best = logloss(r.truth, r.y)
    lines.append(f"| (the stream's true probabilities) | {best:.4f} | | {auc(r.truth, r.y):.4f} "
                 f"| {calibration(r.truth, r.y):.3f} | | | |")
    return "\n".join(lines) + "\n"


def describe(r: Run) -> str:
    c = r.config
    return (f"{c.seconds:.0f} stream s ({c.warmup_s:.0f} s warm-up excluded; "
            f"{len(r.y):,} events measured), {c.stream.events_per_s:.0f} events per stream s "
            f"in batches of {c.batch_events} ({c.batch_s} s), seed {c.seed}; "
            f"{r.wall_s:.0f} s wall: compression {r.compression:.1f}x "
            f"(stream s per wall s).")


def budget_verdict(r: Run) -> str:
    """Per budget: does priority keep more quality per byte than fifo?"""
    ms = {m["name"]: m for m in rows_of(r)}
    out = []
    for name in [m for m in ms if m.startswith("priority @")]:
        p, f = ms[name], ms[name.replace("priority", "fifo")]
        better = "better" if p["logloss"] < f["logloss"] else "NOT better"
        out.append(f"- budget {p['bandwidth'] / 1e3:.1f} KB / stream s ({name[11:]}): "
                   f"priority {p['gap']:+.2f}% vs fifo {f['gap']:+.2f}% log-loss gap to the "
                   f"trainer, at {p['kb_s']:.1f} vs {f['kb_s']:.1f} KB / stream s: priority is "
                   f"{better} (mean age {p['age_s']:.1f} vs {f['age_s']:.1f} stream s)")
    return "\n".join(out) + "\n"


def plot(main_run: Run, budget_run: Run | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for r, marker in ((main_run, "o"), (budget_run, "s")):
        if r is None:
            continue
        for m in rows_of(r)[1:]:
            ax.scatter(max(m["age_s"], 1e-2), max(m["gap"], 1e-3), marker=marker)
            ax.annotate(m["name"], (max(m["age_s"], 1e-2), max(m["gap"], 1e-3)), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("mean age of the replica's model (stream s; 0 drawn at 0.01)")
    ax.set_ylabel("log-loss gap to the trainer (%)")
    ax.set_title("quality against freshness (o unlimited, s budget)")
    t, edges = timeline(main_run)
    for o, gaps in zip(main_run.outcomes[1:], t):
        bx.plot(edges, gaps, label=o.name)
    bx.set_xlabel("stream s")
    bx.set_ylabel(f"log-loss gap to the trainer, {TIMELINE_S:.0f} s windows (%)")
    bx.legend(fontsize=7)
    bx.set_yscale("symlog", linthresh=0.1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timeline(r: Run) -> tuple[list[np.ndarray], np.ndarray]:
    """Each replica's log-loss gap to the trainer (%) in TIMELINE_S windows of stream time."""
    sizes = [len(p) for p in r.outcomes[0].p]
    t = np.repeat(r.t, sizes)
    window = np.floor((t - t[0]) / TIMELINE_S).astype(int)
    loss = [_losses(np.concatenate(o.p), r.y) for o in r.outcomes]
    n = np.bincount(window)
    keep = n > 0
    ceiling = np.bincount(window, loss[0])[keep] / n[keep]
    edges = (t[0] + (np.arange(len(n)) + 0.5) * TIMELINE_S)[keep]
    return [(np.bincount(window, ll)[keep] / n[keep] / ceiling - 1) * 100 for ll in loss[1:]], edges


def _losses(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


# -- main ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small stream briefly; writes nothing")
    p.add_argument("--seconds", type=float, default=None, help="stream s (1800; 40 quick)")
    p.add_argument("--warmup", type=float, default=None, help="stream s (300; 20 quick)")
    p.add_argument("--batch-s", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-fractions", default="0.25,0.05",
                   help="of the unlimited priority link's row bytes per stream s")
    p.add_argument("--harm-seeds", type=int, default=None,
                   help="clean seeded runs of the harm section (10; 1 quick; 0 skips it)")
    add_out(p)
    return p.parse_args(argv)


def config_of(args: argparse.Namespace) -> RunConfig:
    if args.quick:
        stream = ClickStreamConfig(users=2_000, items_initial=300, item_capacity=60_000,
                                   events_per_s=400.0)
        return RunConfig(seconds=args.seconds or 40.0, warmup_s=args.warmup or 20.0,
                         batch_s=args.batch_s, stream=stream, seed=args.seed)
    return RunConfig(seconds=args.seconds or 1800.0, warmup_s=args.warmup or 300.0,
                     batch_s=args.batch_s, seed=args.seed)


def harm_config_of(args: argparse.Namespace, run_config: RunConfig) -> HarmConfig:
    seeds = args.harm_seeds if args.harm_seeds is not None else (1 if args.quick else 10)
    if args.quick:
        rc = replace(run_config, seconds=36.0, warmup_s=20.0)
        return HarmConfig(run=rc, harm_at_s=26.0, clean_seeds=seeds)
    return HarmConfig(clean_seeds=seeds)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = config_of(args)
    load = os.getloadavg()[0]
    unlimited = run(config, list(WAYS), progress=not args.quick)
    fractions = [float(f) for f in args.budget_fractions.split(",") if f]
    budgeted = run(config, budgeted_ways(unlimited, fractions),
                   progress=not args.quick) if fractions else None
    text = ("## What freshness buys: prequential quality of replicas kept fresh seven ways\n\n"
            "One seeded click stream, one online trainer (tables through ekko.torch, dense MLP "
            "with Adam), one Engine with a replica per way; each batch is predicted by every "
            "replica and the trainer, then trained on. Periods and budgets are in stream "
            "seconds (a ManualClock); priority and fifo deliver in real time (see the module "
            "docstring of benchmarks/quality.py). Mean age: how old the newest trained batch "
            "the replica held whole was, before each batch.\n\n"
            + describe(unlimited) + "\n\n" + format_table(unlimited))
    if budgeted is not None:
        text += ("\n### Under a bandwidth budget\n\nEach budget: the dense snapshots' bytes "
                 "per stream s plus a fraction of the row bytes per stream s the unlimited "
                 "priority link moved; the same for priority and fifo.\n\n"
                 + describe(budgeted) + "\n\n" + format_table(budgeted) + "\n"
                 + budget_verdict(budgeted))
    harm = harm_config_of(args, config)
    if harm.clean_seeds:
        text += ("\n### Harm: the quality health checks\n\n" + harm_section(harm))
    text += f"\n{load_note(load)} torch {torch.__version__}.\n"
    print(text)
    write_results(args, "quality", text, lambda path: plot(unlimited, budgeted, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
