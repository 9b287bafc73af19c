"""`ekko run` on the kernels alone: a Zipf update stream and serving lookups, self-checked.

Each step gives every table a delta of `batch` ids (Zipf-distributed over
its rows, hot ids scattered by a fixed permutation, as in real logs) with
random gradient rows, then serves one inference batch: every feature looks
up `batch` bags. The last step of a few sampled tables is checked against
the numpy reference, and a sample of bags against a numpy pooling of the
dequantized serving copy.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from ..dialects import catalog
from ..workloads.zipf import ZipfIds
from ..kernels.check import compare, error_ratio, reference_lookup, snapshot, to_f32
from ..kernels.model import CompiledModel


@dataclass(frozen=True)
class RunConfig:
    steps: int = 20
    batch: int = 4096
    pooling: int = 1
    zipf: float = 1.05
    seed: int = 0
    check_tables: int = 3
    check_bags: int = 64


@dataclass
class RunReport:
    model: str
    tables: int
    table_rows: int
    table_bytes: int
    compile_seconds: float
    steps: int
    update_rows: int
    update_seconds: float
    lookup_batches: int
    lookup_ms: list[float] = field(default_factory=list)
    update_check_error: float = 0.0
    lookup_check_error: float = 0.0
    peak_rss_mb: float = 0.0
    checked_rows: int = 0

    @property
    def check_passed(self) -> bool:
        """Both checks ran on something and stayed within tolerance (NaN fails)."""
        errors = (self.update_check_error, self.lookup_check_error)
        return self.checked_rows > 0 and all(math.isfinite(e) and e <= 1.0 for e in errors)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("lookup_ms")
        d.update(self.summary())
        return d

    def summary(self) -> dict:
        ms = np.array(self.lookup_ms or [0.0])
        return {
            "update_rows_per_s": self.update_rows / max(self.update_seconds, 1e-9),
            "lookup_p50_ms": float(np.percentile(ms, 50)),
            "lookup_p99_ms": float(np.percentile(ms, 99)),
            "check": "passed" if self.check_passed else "FAILED",
        }

    def format(self) -> str:
        s = self.summary()
        lines = [
            f"model            {self.model}: {self.tables} tables, {self.table_rows:,} rows, "
            f"{self.table_bytes / 2**20:,.1f} MiB of tables/state/serving copies",
            f"compile          {self.compile_seconds:.2f} s",
            f"updates          {self.steps} steps, {self.update_rows:,} delta rows in "
            f"{self.update_seconds:.3f} s = {s['update_rows_per_s'] / 1e6:.2f} M rows/s",
            f"lookups          {self.lookup_batches} batches (all features each): "
            f"p50 {s['lookup_p50_ms']:.3f} ms, p99 {s['lookup_p99_ms']:.3f} ms",
            f"memory           peak RSS {self.peak_rss_mb:,.0f} MiB",
            f"reference check  {s['check']} (worst error {max(self.update_check_error, self.lookup_check_error):.3f}"
            " of tolerance; updates vs numpy, lookups vs numpy pooling)",
        ]
        return "\n".join(lines)


def _offsets(rng: np.random.Generator, bags: int, pooling: int) -> np.ndarray:
    if pooling <= 1:
        return np.arange(bags + 1, dtype=np.int64)
    lengths = rng.integers(0, 2 * pooling + 1, size=bags)
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def run_traffic(m: CompiledModel, cfg: RunConfig,
                progress: Callable[[str], None] | None = None) -> RunReport:
    """Stream `cfg.steps` update steps with a lookup batch after each."""
    say = progress or (lambda _msg: None)
    rng = np.random.default_rng(cfg.seed)
    sources = {t.name: ZipfIds(t.rows, cfg.zipf, rng) for t in m.model.tables}
    tables = list(m.model.tables)
    checked = _sampled_tables(tables, cfg.check_tables)
    report = RunReport(m.model.name, len(tables), sum(t.rows for t in tables),
                       sum(b.nbytes for b in m.tables.values()), m.compile_seconds,
                       cfg.steps, 0, 0.0, 0)
    last = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        final = step == cfg.steps
        for t in tables:
            ids = sources[t.name].draw(cfg.batch)
            grads = rng.standard_normal((cfg.batch, t.dim), dtype=np.float32) * 0.01
            buf = m.tables[t.name]
            snap = snapshot(m.update_specs[t.name], buf.master, buf.state, ids) \
                if final and t.name in checked else None
            t0 = time.perf_counter()
            m.update(t.name, ids, grads, version=step)
            report.update_seconds += time.perf_counter() - t0
            report.update_rows += len(ids)
            if snap is not None:
                err = compare(m.update_specs[t.name], snap, buf.master, buf.state, ids, grads,
                              buf.step)
                report.update_check_error = max(report.update_check_error, err)
                report.checked_rows += len(snap.ids)
        report.lookup_ms.append(_serve_batch(m, cfg, rng, sources, report, check=final))
        report.lookup_batches += 1
        if time.perf_counter() - last > 1.0 or final:
            say(f"step {step}/{cfg.steps}: {report.update_rows:,} delta rows applied")
            last = time.perf_counter()
    report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return report


def _sampled_tables(tables, n: int) -> set[str]:
    """The smallest, the largest and a middle table: different code paths by size."""
    by_rows = sorted(tables, key=lambda t: t.rows)
    picks = [by_rows[0], by_rows[-1], by_rows[len(by_rows) // 2]]
    return {t.name for t in picks[:n]}


def _serve_batch(m: CompiledModel, cfg: RunConfig, rng: np.random.Generator,
                 sources: dict, report: RunReport, check: bool) -> float:
    """Look up one inference batch for every feature; returns its wall time in ms."""
    requests = []
    for f in m.model.features:
        offsets = _offsets(rng, cfg.batch, cfg.pooling)
        ids = sources[f.table].draw(int(offsets[-1]))
        requests.append((f, ids, offsets))
    t0 = time.perf_counter()
    outputs = [m.lookup(f.name, ids, offsets if f.pooling != "none" else None)
               for f, ids, offsets in requests]
    elapsed = (time.perf_counter() - t0) * 1e3
    if check:
        for (f, ids, offsets), out in zip(requests[:3], outputs[:3]):
            report.lookup_check_error = max(
                report.lookup_check_error, _check_bags(m, f, ids, offsets, np.asarray(out), cfg)
            )
    return elapsed


def _check_bags(m: CompiledModel, f, ids, offsets, out, cfg: RunConfig) -> float:
    """Error of a sample of bags against numpy pooling of the serving rows they read."""
    buf = m.tables[f.table]
    layout = m.bag_specs[f.name].layout
    n = min(cfg.check_bags, len(offsets) - 1)
    if f.pooling == "none":
        sub_ids, sub_off, got = ids[:n], None, out[:n]
    else:
        sub_off = offsets[: n + 1]
        sub_ids, got = ids[: sub_off[-1]], out[:n]
    used, local = np.unique(sub_ids, return_inverse=True)
    rows = to_f32(buf.lookup_table[used], layout, buf.table.dim)
    biased = "bias" in catalog.layout(layout).codec.tail  # code * scale + bias
    want = reference_lookup(rows, biased, local.reshape(-1), sub_off, f.pooling)
    return error_ratio(got, want)
