"""The `ekko` command with the update engine: `ekko run MODEL --replicas N`.

`kernels.cli` owns the command line (compile, run on the update kernels
alone); `kernels` must not import the engine, so this module extends that
parser with `--replicas` and `--bandwidth` and runs the engine when they are
given: a primary, N serving replicas, the scheduler and a lookup thread
serving every feature from the replicas while the Zipf update stream runs.
A live progress line, then a report: freshness percentiles, rows/s, lookup
p50/p99, rollbacks, and a byte-for-byte check of every replica against the
primary (exit status 2 if one differs).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Sequence

import numpy as np

from ..kernels import cli as base
from ..kernels.traffic import RunConfig, ZipfIds
from .engine import Engine
from .scheduler import SchedulerConfig


def build_parser() -> argparse.ArgumentParser:
    """kernels.cli's parser, with the engine's flags on `run`."""
    parser = base.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    run = sub.choices["run"]
    run.add_argument("--replicas", type=base.int_flag(1, 64), default=None,
                     help="run the update engine with N serving replicas")
    run.add_argument("--bandwidth", type=base.float_flag(0.0, 1e15, low_open=True), default=None,
                     help="bytes/s per replica link (default: unlimited; needs --replicas)")
    run.add_argument("--cluster", default=None, metavar="ADDRESS",
                     help="run primary and replicas as Ray processes: 'local' starts Ray here, "
                          "'auto' or ray://HOST:PORT joins a cluster (needs --replicas)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else base.EXIT_INPUT
    if args.command != "run" or args.replicas is None:
        for flag in ("bandwidth", "cluster"):
            if getattr(args, flag, None) is not None:
                print(f"ekko: error: --{flag} needs --replicas", file=sys.stderr)
                return base.EXIT_INPUT
        return base.main(argv)
    return _dispatch(args)


def _dispatch(args: argparse.Namespace) -> int:
    """cmd_run_engine with kernels.cli's error rules: one `ekko: error:` line, no traceback."""
    import os

    try:
        return cmd_run_engine(args)
    except KeyboardInterrupt:
        print("ekko: interrupted", file=sys.stderr)
        return 130
    except MemoryError as e:
        print(f"ekko: error: out of memory ({e or 'allocation failed'}); "
              "use a smaller --scale or --batch", file=sys.stderr)
    except OSError as e:
        print(f"ekko: error: {e.strerror or e}" + (f": {e.filename}" if e.filename else ""),
              file=sys.stderr)
    except Exception as e:  # noqa: BLE001
        if _is_input_error(e):
            print(base._input_error(e), file=sys.stderr)
            return base.EXIT_INPUT
        if os.environ.get("EKKO_DEBUG"):
            raise
        print(f"ekko: internal error: {type(e).__name__}: {base._shorten(str(e))} "
              "(a bug in ekko; EKKO_DEBUG=1 shows the traceback)", file=sys.stderr)
        return base.EXIT_INTERNAL
    return base.EXIT_INPUT


def _is_input_error(e: Exception) -> bool:
    from ..compiler.diagnostics import EkkoDiagnostic
    from ..compiler.frontend import ModelError
    from ..kernels.errors import EkkoError

    return isinstance(e, (ModelError, EkkoDiagnostic, EkkoError, base.CliError))


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


def cmd_run_engine(args: argparse.Namespace) -> int:
    progress = base.Progress(args.quiet)
    cfg = RunConfig(steps=args.steps, batch=args.batch, pooling=args.pooling, zipf=args.zipf,
                    seed=args.seed)
    model = base.load(args)
    base.check_memory(model, cfg)
    compiled = base._compile(args, model, progress)
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
    return 0 if report["replicas_match_primary"] else base.EXIT_CHECK


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


if __name__ == "__main__":
    sys.exit(main())
