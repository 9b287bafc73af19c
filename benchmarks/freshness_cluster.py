"""Freshness across processes: the engine on Ray against the in-process engine, one run.

    python benchmarks/freshness_cluster.py [--cluster local] [--replicas 1,2,4]
        [--rate ROWS_PER_S] [--seconds S] [--scale X] [--restart-gib G] [--restart-runs K]
        [--trainers T] [--quick]

The same trainer stream (Zipf(1.05) ids over the DLRM's 26 tables at
`--scale`, 4096-id deltas per table, paced to `--rate` row updates/s, from
`--trainers` threads that each step their share of the tables, as trainer
workers would) runs
against N replicas for each N in `--replicas`, twice: in this process
(`ekko.Engine(model, replicas=N)`) and on Ray (`cluster=...`: one primary
process, N replica processes, packets through Ray's object store). For each:
delta-to-visible freshness p50/p99/max over every row update and replica,
the update rate achieved, and the bytes a replica link moved per row update
and per step.

Then (`--restart-gib`, 0 to skip) one table of that many GiB (f32, dim 64)
on Ray with two replicas, `--restart-runs` times: replica 0 takes a
snapshot, the stream goes on, replica 0 is killed with SIGKILL, and the
table shows how long Ray took to restart it and how long it took from its
start to be back in sync (snapshot loaded, caught up from the model-update
cache), each run against the 5 s target.

Prints a table; writes benchmarks/results/freshness_cluster.md and a
freshness CDF per run (freshness_cluster.png). `--quick` runs a small model
briefly with one replica and writes nothing.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ekko  # noqa: E402
from ekko.engine.stats import Histogram  # noqa: E402
from ekko.workloads.zipf import ZipfIds  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from results_io import write_results  # noqa: E402

BATCH = 4096


@dataclass
class Result:
    way: str
    replicas: int
    rows_per_s: float
    fresh: Histogram
    bytes_per_row: float
    bytes_per_step: float
    seconds: float


def draw(model, batch: int, rounds: int, seed: int) -> list:
    """Pre-drawn deltas, reused cyclically, so the trainer's own cost stays low."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rounds):
        out.append([(t.name, ZipfIds(t.rows, 1.05, rng).draw(batch) if t.rows > 1
                     else np.zeros(batch, np.int64),
                     (rng.standard_normal((batch, t.dim)) * 0.01).astype(np.float32))
                    for t in model.model.tables])
    return out


def stream(engine, rounds: list, rate: float, seconds: float,
           trainers: int = 1) -> tuple[int, int, float]:
    """Paced steps for `seconds` from `trainers` threads (each steps its own share of
    the tables, as trainer workers do); returns (row updates, steps, seconds) up to
    the flush."""
    start = time.perf_counter()
    counts = [[0, 0] for _ in range(trainers)]
    errors: list[BaseException] = []

    def trainer(j: int) -> None:
        k = 0
        try:
            while time.perf_counter() - start < seconds:
                for table, ids, grads in rounds[k % len(rounds)][j::trainers]:
                    engine.step(table, ids, grads)
                    counts[j][0] += len(ids)
                    counts[j][1] += 1
                k += 1
                ahead = counts[j][0] / (rate / trainers) - (time.perf_counter() - start)
                if ahead > 0:
                    time.sleep(ahead)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors.append(e)

    threads = [threading.Thread(target=trainer, args=(j,)) for j in range(trainers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    engine.flush(600)
    return (sum(c[0] for c in counts), sum(c[1] for c in counts),
            time.perf_counter() - start)


def measure(model, way: str, n: int, cluster: str | None, rounds: list, rate: float,
            seconds: float, trainers: int) -> Result:
    with ekko.Engine(model, replicas=n, cluster=cluster) as engine:
        s0 = engine.stats()  # a replica process's first copy of the tables is not the stream's
        rows, steps, took = stream(engine, rounds, rate, seconds, trainers)
        s = engine.stats()
        fresh = engine.freshness_histogram()
    if cluster is not None:
        engine.shutdown()
    moved = max(s["rows_moved"] - s0["rows_moved"], 1)
    nbytes = s["bytes_moved"] - s0["bytes_moved"]
    return Result(way, n, rows / took, fresh, nbytes / moved, nbytes / n / max(steps, 1), took)


def restart(cluster: str, gib: float, rate: float, runs: int = 3) -> dict:
    """Kill a replica of a `gib` GiB table `runs` times; time Ray's restart and its catch-up."""
    rows = max(1024, int(gib * 2**30 / (64 * 4)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.ekko"
        path.write_text("model big {\n  table t { rows %d; dim 64; serving f32; optimizer "
                        "sgd(lr=0.01); }\n  feature f -> t pooling sum;\n}\n" % rows)
        model = ekko.compile_model(path)
        t0 = time.perf_counter()
        with ekko.Engine(model, replicas=2, cluster=cluster) as engine:
            setup = time.perf_counter() - t0
            join = [c for c in engine.replicas[1].info()["catch_ups"] if c["reason"] == "join"]
            copy_rows_per_s = sum(c["rows"] for c in join) / max(sum(c["seconds"] for c in join),
                                                                 1e-9)
            rounds = draw(model, BATCH, 8, seed=3)
            each = []
            for _ in range(runs):
                stream(engine, rounds, rate, 2.0)
                engine.replicas[0].snapshot()
                stream(engine, rounds, rate, 2.0)
                old = engine.replicas[0].pid
                os.kill(old, signal.SIGKILL)
                killed = time.perf_counter()
                while True:  # the replica answers ping only once caught up
                    try:
                        if engine.replicas[0].pid != old:
                            break
                    except ekko.EkkoError:
                        pass
                    time.sleep(0.05)
                back = time.perf_counter() - killed
                info = engine.replicas[0].info()
                engine.flush(600)
                same = all(engine.replicas[0].serving(t).tobytes()
                           == engine.primary.serving(t).tobytes() for t in engine.primary.tables)
                catch = [c for c in info["catch_ups"] if c["reason"] == "restart"]
                each.append({"kill_to_serving_s": back, "start_to_sync_s": info["ready_seconds"],
                             "restore_s": info["restore_seconds"],
                             "catch_up_s": sum(c["seconds"] for c in catch),
                             "caught_up_rows": sum(c["rows"] for c in catch), "identical": same})
        engine.shutdown()
    return {"gib": rows * 64 * 4 / 2**30, "setup_s": setup, "copy_rows_per_s": copy_rows_per_s,
            "runs": each}


def restart_text(rs: dict) -> str:
    lines = [f"replica killed (SIGKILL) {len(rs['runs'])} times, {rs['gib']:.2f} GiB table "
             f"(target: in sync within 5 s of its restart); a joining replica copied the table "
             f"at {rs['copy_rows_per_s'] / 1e6:.2f} M rows/s", "",
             "| run | kill to serving s | start to in sync s | snapshot restore s | "
             "catch-up s | rows caught up | identical | target |",
             "|---|---|---|---|---|---|---|---|"]
    for k, r in enumerate(rs["runs"], 1):
        lines.append(f"| {k} | {r['kill_to_serving_s']:.1f} | {r['start_to_sync_s']:.2f} | "
                     f"{r['restore_s']:.2f} | {r['catch_up_s']:.2f} | {r['caught_up_rows']:,} | "
                     f"{r['identical']} | {'met' if r['start_to_sync_s'] < 5 else 'MISSED'} |")
    return "\n".join(lines)


def table(results: list[Result], rate: float, trainers: int = 1) -> str:
    lines = [f"target rate {rate / 1e3:,.0f}k row updates/s, {BATCH}-id deltas per table, "
             f"{trainers} trainer thread(s)", "",
             "| engine | replicas | rows/s | freshness p50 ms | p99 ms | max ms | "
             "bytes/row | bytes/step per replica |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        f = r.fresh.summary()
        lines.append(f"| {r.way} | {r.replicas} | {r.rows_per_s / 1e3:,.0f}k | {f['p50']:.2f} | "
                     f"{f['p99']:.2f} | {f['max']:.1f} | {r.bytes_per_row:.1f} | "
                     f"{r.bytes_per_step / 1e3:,.1f} kB |")
    return "\n".join(lines)


def x_limits(hists: list[Histogram]) -> tuple[float, float]:
    """The latencies (ms) the CDFs change over, with a margin: the histogram spans 1 us to
    1000 s, so plotting all of it squeezes data below 100 ms into a corner."""
    lo, hi = [], []
    for h in hists:
        if h.total:
            x, y = h.cdf()
            lo.append(float(x[np.argmax(y > 0)]))  # upper edge of the first non-empty bin
            hi.append(h.max)
    if not lo:
        return 1e-3, 1.0
    return min(lo) / 2, max(max(hi), min(lo)) * 2


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        x, y = r.fresh.cdf()
        ax.plot(x, y, label=f"{r.way} x{r.replicas}")
    ax.set_xscale("log")
    ax.set_xlim(*x_limits([r.fresh for r in results]))
    ax.set_xlabel("delta-to-visible (ms, log scale)")
    ax.set_ylabel("fraction of row updates")
    ax.set_title("Freshness: in-process engine vs replicas as Ray processes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cluster", default="local")
    p.add_argument("--replicas", default="1,2,4")
    p.add_argument("--rate", type=float, default=200_000.0)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--scale", type=float, default=0.01)
    p.add_argument("--restart-gib", type=float, default=1.0)
    p.add_argument("--restart-runs", type=int, default=3)
    p.add_argument("--trainers", type=int, default=1,
                   help="trainer threads stepping at once, each its share of the tables")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.trainers < 1:
        p.error(f"--trainers must be at least 1, got {a.trainers}")
    counts = [int(x) for x in a.replicas.split(",")]
    if a.quick:
        counts, a.seconds, a.rate, a.scale, a.restart_gib = [1], 1.0, 50_000.0, 0.001, 0.0
    model = ekko.compile_model(ROOT / "examples" / "dlrm.ekko", scale=a.scale)
    rounds = draw(model, BATCH if not a.quick else 512, 4, seed=1)
    if not a.quick:  # Ray's own start (its daemons, prestarted workers) is not the engine's
        from ekko.engine.cluster import connect

        connect(a.cluster)
        time.sleep(5.0)
    results = []
    for n in counts:
        results.append(measure(model, "in-process", n, None, rounds, a.rate, a.seconds,
                               a.trainers))
        results.append(measure(model, f"ray ({a.cluster})", n, a.cluster, rounds, a.rate,
                               a.seconds, a.trainers))
        for r in results[-2:]:
            f = r.fresh.summary()
            print(f"{r.way:>16} x{n}: {r.rows_per_s / 1e3:,.0f}k rows/s, freshness p50 "
                  f"{f['p50']:.2f} ms p99 {f['p99']:.2f} ms", file=sys.stderr)
    text = table(results, a.rate, a.trainers).replace(f"ray ({a.cluster})", "ray x1" if a.quick else
                                          f"ray ({a.cluster})")
    print(text)
    two = [r for r in results if r.way != "in-process" and r.replicas == 2]
    if two:
        f = two[0].fresh.summary()
        met = two[0].rows_per_s >= 0.97 * a.rate and f["p99"] < 100
        print(f"\ntarget (2 replica processes at {a.rate / 1e3:,.0f}k row updates/s, freshness p99 "
              f"under 100 ms): {'met' if met else 'NOT met'} ({two[0].rows_per_s / 1e3:,.0f}k "
              f"rows/s, p99 {f['p99']:.1f} ms)")
    rs = None
    if a.restart_gib > 0:
        rs = restart(a.cluster, a.restart_gib, a.rate, a.restart_runs)
        print("\n" + restart_text(rs))
    md = "# Freshness across processes (benchmarks/freshness_cluster.py)\n\n" + text + "\n"
    if rs:
        md += "\n" + restart_text(rs) + "\n"
    write_results(a, "freshness_cluster", md, lambda path: plot(results, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
