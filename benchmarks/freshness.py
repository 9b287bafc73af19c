"""Freshness of serving replicas: four ways to keep them current, one stream.

    python benchmarks/freshness.py [--rate ROWS_PER_S] [--seconds S] [--scale X] [--quick]

The same trainer stream (Zipf(1.05) ids over the DLRM's 26 tables at
`--scale`, 4096-id deltas per table, paced to `--rate` row updates/s) runs
against two replicas in the same process, four ways, one after the other in
one run, each on a fresh engine built from the same compiled model:

  full      a full copy of every table every T s (checkpoint pipelines)
  periodic  the rows touched in the last T s, every T s (Monolith-style sync)
  fifo      every update streamed in arrival order, no priorities
  ekko      ekko's scheduler (priority: freshness, significance, traffic; aging)

For each: delta-to-visible freshness p50/p99/max over every row update and
replica, the bytes the links moved, lookup p99 on the replicas during the
stream against idle, and the achieved update rate. Then overload: each link
gets a fifth of the bytes/s the stream produces; fifo and ekko run again and
the table shows the freshness of the 1% most significant updates (their
gradient is 30x the others') and how far each link is behind at the end.

Prints a table of medians and ratios; writes benchmarks/results/freshness.md
and a freshness CDF per way (freshness.png). `--quick` runs a small model
briefly and writes nothing.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ekko  # noqa: E402
from ekko.engine import SchedulerConfig  # noqa: E402
from ekko.engine.stats import Histogram, latency_summary  # noqa: E402
from ekko.workloads.zipf import ZipfIds  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from results_io import add_out, write_results  # noqa: E402

SIGNIFICANT_SHARE = 0.01  # of delta rows, with a 30x gradient
SIGNIFICANT_SCALE = 30.0


@dataclass
class Result:
    way: str
    rows_per_s: float
    fresh: Histogram
    bytes_moved: int
    lookup_ms: dict
    significant: Histogram = field(default_factory=Histogram)
    lag_ms: float = 0.0
    backlog: int = 0
    seconds: float = 0.0


class Stream:
    """Pre-drawn deltas (ids, grads) per table, reused cyclically: the trainer's cost stays low."""

    def __init__(self, model, batch: int, rounds: int, seed: int):
        rng = np.random.default_rng(seed)
        self.tables = list(model.model.tables)
        self.rounds = []
        for _ in range(rounds):
            deltas = []
            for t in self.tables:
                ids = ZipfIds(t.rows, 1.05, rng).draw(batch) if t.rows > 1 else np.zeros(batch, np.int64)
                grads = (rng.standard_normal((batch, t.dim)) * 0.01).astype(np.float32)
                hot = rng.random(batch) < SIGNIFICANT_SHARE
                grads[hot] *= SIGNIFICANT_SCALE
                deltas.append((t.name, ids, grads))
            self.rounds.append(deltas)
        self.rows_per_round = batch * len(self.tables)


def lookups(engine, stop: threading.Event, bags: int, seed: int) -> None:
    """Serve a few features from both replicas, one batch after another."""
    rng = np.random.default_rng(seed)
    feats = [f for f in engine.model.model.features][:6]
    tables = {t.name: t for t in engine.model.model.tables}
    offsets = np.arange(bags + 1, dtype=np.int64)
    k = 0
    while not stop.is_set():
        f = feats[k % len(feats)]
        ids = rng.integers(0, tables[f.table].rows, bags)
        engine.replicas[k % len(engine.replicas)].lookup(f.name, ids, offsets)
        k += 1
        time.sleep(0.0005)


def run_way(model, stream: Stream, way: str, cfg: SchedulerConfig, rate: float, seconds: float,
            bags: int, flush: bool = True) -> Result:
    for t in model.tables.values():  # every way starts from the same tables
        t.step = 0
    engine = ekko.Engine(model, replicas=2, scheduler=cfg)
    with engine:
        stop = threading.Event()
        th = threading.Thread(target=lookups, args=(engine, stop, bags, 1), daemon=True)
        th.start()
        time.sleep(min(1.0, seconds / 3))  # idle lookups first
        idle = latency_summary([ms for r in engine.replicas for ms in r.stats.lookup_ms])
        for r in engine.replicas:
            r.stats.lookup_ms.clear()
        start = time.perf_counter()
        rows = 0
        k = 0
        while time.perf_counter() - start < seconds:
            for name, ids, grads in stream.rounds[k % len(stream.rounds)]:
                engine.step(name, ids, grads)
            rows += stream.rows_per_round
            k += 1
            ahead = rows / rate - (time.perf_counter() - start)
            if ahead > 0:
                time.sleep(ahead)
        elapsed = time.perf_counter() - start
        lag = max(link.lag_ms() for link in engine.links)
        backlog = sum(link.backlog() for link in engine.links)
        if flush:
            engine.flush(timeout=600)
        stop.set()
        th.join()
        busy = latency_summary([ms for r in engine.replicas for ms in r.stats.lookup_ms])
        stats = engine.stats()
        sig = Histogram()
        for link in engine.links:
            sig.merge(link.significant)
        fresh = engine.freshness_histogram()
    return Result(way, rows / elapsed, fresh, stats["bytes_moved"],
                  {"idle_p99": idle["p99"], "busy_p99": busy["p99"]}, sig, lag, backlog, elapsed)


def rollback_seconds(gib: float, changed: float, tmp: Path) -> tuple[int, int, float]:
    """Roll a table of `gib` GiB (f32 master, dim 64) back after `changed` of its rows changed.

    Returns (rows, rows restored, seconds for the rollback alone).
    """
    from ekko.engine.primary import Primary

    rows = int(gib * 2**30 / (64 * 4))
    path = tmp / "rollback.ekko"
    path.write_text("model rb { defaults { dim 64; optimizer sgd(lr=0.01); serving int8; }\n"
                    f"  table t {{ rows {rows}; }}\n  feature f -> t pooling sum; }}\n")
    primary = Primary(ekko.compile_model(path), undo=True)
    primary.mark_healthy("t")
    rng = np.random.default_rng(3)
    ids = rng.choice(rows, int(rows * changed), replace=False)
    for chunk in np.array_split(ids, max(1, len(ids) // 65536)):
        primary.step("t", chunk, np.full((len(chunk), 64), 0.01, np.float32))
    start = time.perf_counter()
    commit = primary.rollback("t")
    return rows, len(commit.ids), time.perf_counter() - start


def fmt_row(r: Result) -> str:
    f = r.fresh.summary()
    return (f"| {r.way} | {r.rows_per_s / 1e6:.2f} M | {f['p50']:.1f} | {f['p99']:.1f} | "
            f"{f['max']:.1f} | {r.bytes_moved / 2**20:,.0f} MiB | {r.lookup_ms['idle_p99']:.2f} / "
            f"{r.lookup_ms['busy_p99']:.2f} |")


def overload_row(r: Result) -> str:
    s, f = r.significant.summary(), r.fresh.summary()
    return (f"| {r.way} | {s['p50']:.1f} | {s['p99']:.1f} | {s['count']:,} | {f['p99']:.1f} | "
            f"{r.lag_ms:,.0f} | {r.backlog:,} |")


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in results:
        edges, frac = r.fresh.cdf()
        ax.step(edges, frac, where="post", label=r.way)
    ax.set_xscale("log")
    ax.set_xlabel("freshness: commit on the primary -> visible on a replica (ms)")
    ax.set_ylabel("fraction of row updates")
    ax.set_xlim(0.1, 2 * max(r.fresh.max for r in results))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("Replica freshness, same stream, four ways")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=1e6, help="row updates/s (default 1M)")
    p.add_argument("--seconds", type=float, default=6.0, help="stream length per way (default 6)")
    p.add_argument("--scale", type=float, default=0.01, help="DLRM table scale (default 0.01)")
    p.add_argument("--interval", type=float, default=1.0, help="T of full/periodic (default 1 s)")
    p.add_argument("--batch", type=int, default=4096, help="ids per table per step (default 4096)")
    p.add_argument("--rollback-gib", type=float, default=1.0,
                   help="table size of the rollback measurement (default 1 GiB)")
    p.add_argument("--quick", action="store_true", help="small and short; writes nothing")
    add_out(p)
    args = p.parse_args(argv)
    if args.quick:
        args.scale, args.seconds, args.rate, args.batch = 0.001, 0.6, 2e5, 512
        args.interval = 0.25
        args.rollback_gib = 0.01
    model = ekko.compile_model(ROOT / "examples" / "dlrm.ekko", scale=args.scale)
    model.materialize(seed=0)
    initial = {n: (b.master.copy(), b.state.copy() if isinstance(b.state, np.ndarray) else b.state,
                   None if b.serving is None else b.serving.copy(), b.versions.copy())
               for n, b in model.tables.items()}

    def reset() -> None:
        for n, (m, s, q, v) in initial.items():
            b = model.tables[n]
            b.master[...] = m
            if isinstance(s, np.ndarray):
                b.state[...] = s
            if q is not None:
                b.serving[...] = q
            b.versions[...] = v

    stream = Stream(model, args.batch, 8, seed=0)
    bags = 256
    ways = [("full", SchedulerConfig(policy="full", interval_s=args.interval)),
            ("periodic", SchedulerConfig(policy="periodic", interval_s=args.interval)),
            ("fifo", SchedulerConfig(policy="fifo")),
            ("ekko", SchedulerConfig(policy="priority"))]
    results = []
    for name, cfg in ways:
        reset()
        results.append(run_way(model, stream, name, cfg, args.rate, args.seconds, bags))
        print(f"  ran {name}", file=sys.stderr, flush=True)
    fifo = results[2]  # every update sent once, in arrival order: what the stream produces
    budget = fifo.bytes_moved / len(("r0", "r1")) / fifo.seconds / 5
    overload = []
    for name, policy in (("fifo", "fifo"), ("ekko", "priority")):
        reset()
        cfg = SchedulerConfig(policy=policy, bandwidth=budget)
        overload.append(run_way(model, stream, name, cfg, args.rate, args.seconds, bags, flush=False))
        print(f"  ran {name} under overload", file=sys.stderr, flush=True)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        rb_rows, rb_restored, rb_seconds = rollback_seconds(args.rollback_gib, 0.05, Path(tmp))
    rows = sum(t.rows for t in model.model.tables)
    lines = [
        f"DLRM at scale {args.scale:g} ({rows:,} rows, 26 tables, int8 serving), 2 replicas, "
        f"stream target {args.rate / 1e6:g} M row updates/s for {args.seconds:g} s per way, "
        f"T = {args.interval:g} s; one run, same machine.",
        "",
        "| way | achieved | freshness p50 (ms) | p99 (ms) | max (ms) | moved | lookup p99 idle / during (ms) |",
        "|---|---|---|---|---|---|---|",
        *[fmt_row(r) for r in results],
        "",
        f"Overload: each link limited to {budget / 2**20:.2f} MiB/s, a fifth of what fifo moved "
        "per link above; the 1% most significant updates (30x gradient):",
        "",
        "| way | significant p50 (ms) | significant p99 (ms) | significant rows | all p99 (ms) | "
        "behind at end (ms) | backlog (rows) |",
        "|---|---|---|---|---|---|---|",
        *[overload_row(r) for r in overload],
        "",
        f"Rollback: a {args.rollback_gib:g} GiB table ({rb_rows:,} rows x 64 f32, int8 serving), "
        f"5% of its rows changed since the healthy mark: {rb_restored:,} rows restored in "
        f"{rb_seconds * 1e3:.0f} ms (master, state, serving rows; no table copy).",
    ]
    ekko_p99 = results[-1].fresh.percentile(99)
    for r in results[:-1]:
        lines.append("")
        lines.append(f"{r.way} p99 / ekko p99 = {r.fresh.percentile(99) / max(ekko_p99, 1e-9):.1f}x")
    text = "\n".join(lines)
    print(text)
    out = write_results(args, "freshness", "# benchmarks/freshness.py\n\n" + text + "\n",
                        lambda path: plot(results, path))
    if out is not None:
        print(f"wrote {out / 'freshness.md'} and freshness.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
