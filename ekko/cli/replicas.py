"""`ekko run MODEL --replicas N`: the compiled model through the update engine.

A primary, N serving replicas, the scheduler and a lookup thread serving
every feature from the replicas while the Zipf update stream runs. A live
progress line, then a report: freshness percentiles, rows/s, lookup
p50/p99, rollbacks, and a byte-for-byte check of every replica against the
primary (exit status 2 if one differs). `ekko.cli.commands` parses the
command and turns errors into messages.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

from ..engine import Engine, SchedulerConfig
from ..kernels.model import CompiledModel
from ..workloads.zipf import ZipfIds
from .run import RunConfig


SERVING_GAP_S = 0.001  # between two feature lookups of the serving thread


class _Lookups:
    """A thread serving every feature from the replicas in turn while updates stream."""

    def __init__(self, engine: Engine, cfg: RunConfig, sources: dict[str, ZipfIds]):
        self.engine, self.cfg, self.sources = engine, cfg, sources
        self.stop = threading.Event()
        self.batches = 0
        self.thread = threading.Thread(target=self._run, daemon=True, name="ekko-run-lookups")

    def _run(self) -> None:
        features = self.engine.model.model.features
        bags = self.cfg.batch
        offsets = np.arange(bags + 1, dtype=np.int64) * self.cfg.pooling
        while not self.stop.is_set():
            for f in features:
                if self.stop.is_set():
                    break
                ids = self.sources[f.table].draw(bags * self.cfg.pooling)
                self.engine.lookup(f.name, ids, offsets if f.pooling != "none" else None)
                time.sleep(SERVING_GAP_S)  # serving traffic, not a lookup benchmark
            self.batches += 1


def run_engine(args: argparse.Namespace, compiled: CompiledModel, cfg: RunConfig,
               progress: Callable[[str], None]) -> bool:
    """Stream the updates through an engine while serving lookups from its replicas;
    print the report. Whether every replica ended equal to the primary."""
    t0 = time.perf_counter()
    engine = Engine(compiled, replicas=args.replicas, seed=args.seed,
                    scheduler=SchedulerConfig(bandwidth=args.bandwidth), cluster=args.cluster)
    setup = time.perf_counter() - t0
    progress(f"tables, state and {args.replicas} replicas set up in {setup:.2f}s")
    rng = np.random.default_rng(args.seed)
    tables = list(compiled.model.tables)
    sources = {t.name: ZipfIds(t.rows, cfg.zipf, rng) for t in tables}
    lookups = _Lookups(engine, cfg, sources)
    rows = 0
    step_seconds = 0.0  # inside engine.step: committed on the primary, announced to the links
    with engine:
        lookups.thread.start()
        start = last = time.perf_counter()
        for step in range(1, cfg.steps + 1):
            for t in tables:
                ids = sources[t.name].draw(cfg.batch)
                grads = rng.standard_normal((cfg.batch, t.dim), dtype=np.float32) * 0.01
                t1 = time.perf_counter()
                engine.step(t.name, ids, grads)
                step_seconds += time.perf_counter() - t1
                rows += len(ids)
            now = time.perf_counter()
            if not args.quiet and (now - last > 0.5 or step == cfg.steps):
                _progress_line(engine, step, cfg.steps, rows, now - start)
                last = now
        engine.flush()
        stream_seconds = time.perf_counter() - start
        lookups.stop.set()
        lookups.thread.join()
    if not args.quiet:
        print(file=sys.stderr)
    report = _report(engine, compiled.model.name, rows, stream_seconds, setup, lookups.batches)
    report["step_seconds"] = step_seconds
    report["rows_per_s"] = rows / max(step_seconds, 1e-9)
    report["replicas_match_primary"] = _replicas_match(engine)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(_format(report))
    return report["replicas_match_primary"]


def _progress_line(engine: Engine, step: int, steps: int, rows: int, seconds: float) -> None:
    s = engine.stats()
    f = s["freshness_ms"]
    backlog = sum(r["backlog_rows"] for r in s["replicas"])
    print(f"\rstep {step}/{steps}  {rows / max(seconds, 1e-9) / 1e6:6.2f} M rows/s  "
          f"freshness p50 {f['p50']:7.2f} ms  p99 {f['p99']:7.2f} ms  backlog {backlog:,} rows   ",
          end="", file=sys.stderr, flush=True)


def _report(engine: Engine, name: str, rows: int, seconds: float, setup: float,
            batches: int) -> dict:
    s = engine.stats()
    return {
        "model": name, "replicas": len(engine.replicas), "setup_seconds": setup,
        "cluster": getattr(engine.transport, "address", None),
        "update_rows": rows, "stream_seconds": seconds, "rows_per_s": rows / max(seconds, 1e-9),
        "freshness_ms": s["freshness_ms"],
        "per_replica_freshness_ms": [r["freshness_ms"] for r in s["replicas"]],
        "lookup_batches": batches, "lookup_ms": s["lookup_ms"],
        "rows_moved": s["rows_moved"], "bytes_moved": s["bytes_moved"],
        "packets": s["packets"], "packets_rejected": s["packets_rejected"],
        "rollbacks": s["rollbacks"],
    }


def _replicas_match(engine: Engine) -> bool:
    """Every replica's serving rows and versions equal the primary's, byte for byte."""
    for r in engine.replicas:
        for name in engine.primary.tables:
            if r.serving(name).tobytes() != engine.primary.serving(name).tobytes():
                return False
            if not np.array_equal(r.versions(name), engine.primary.versions(name)):
                return False
    return True


def _format(r: dict) -> str:
    f, lk = r["freshness_ms"], r["lookup_ms"]
    per = ", ".join(f"#{i} p99 {x['p99']:.2f} ms" for i, x in enumerate(r["per_replica_freshness_ms"]))
    return "\n".join([
        f"model            {r['model']}: {r['replicas']} replicas"
        + (f" (Ray processes, cluster {r['cluster']})" if r.get("cluster") else "")
        + f", set up in {r['setup_seconds']:.2f} s",
        f"updates          {r['update_rows']:,} delta rows committed at {r['rows_per_s'] / 1e6:.2f} M "
        f"rows/s ({r['step_seconds']:.2f} s in engine.step; {r['stream_seconds']:.2f} s with the "
        "synthetic stream's generation and the final flush)",
        f"freshness        commit -> visible: p50 {f['p50']:.2f} ms, p99 {f['p99']:.2f} ms, "
        f"max {f['max']:.2f} ms over {f['count']:,} row updates ({per})",
        f"moved            {r['rows_moved']:,} rows, {r['bytes_moved'] / 2**20:,.1f} MiB in "
        f"{r['packets']:,} packets ({r['packets_rejected']} rejected)",
        f"lookups          {r['lookup_batches']} batches from the replicas: p50 {lk['p50']:.3f} ms, "
        f"p99 {lk['p99']:.3f} ms",
        f"rollbacks        {len(r['rollbacks'])}",
        "replica check    " + ("passed (every replica equals the primary byte for byte)"
                               if r["replicas_match_primary"] else "FAILED (a replica differs)"),
    ])
