"""A training step through ekko.torch against torch's nn.EmbeddingBag(sparse=True).

Workload: a small DLRM-like sparse part: `--tables` tables (4) of `--rows`
rows (250,000) and dim 64, one sum-pooled feature each, a batch of
`--batch` bags (4096) of 1-19 ids (10 on average) drawn from Zipf(1.05)
folded into the table. The loss is binary cross-entropy of a fixed linear
read-out of the pooled features (the same dense part for both peers, so the
difference is the embedding step).

A step is forward + loss.backward() + the optimizer:
  torch: nn.EmbeddingBag(mode="sum", sparse=True) per table, then
         torch.optim.SGD / Adagrad / SparseAdam (the sparse-gradient path).
  ekko:  ekko.torch.EmbeddingBags over an Engine with one live replica:
         backward runs each table's fused update kernel (optimizer included,
         the serving copy and versions written, the commit sent to the
         replica's link), so there is no optimizer call.
Both start from the same rows and see the same batches in the same run,
interleaved step by step (the order alternates). The first step of each
is checked: the touched rows of both must agree to float tolerance.

    python benchmarks/torch_step.py [--quick] [--runs 20] [--optimizers sgd,adagrad,adam]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import ekko
from ekko.compiler.frontend import parse_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import add_out, load_note, write_results  # noqa: E402

DIM = 64
HYPER = {"sgd": {"lr": 0.01}, "adagrad": {"lr": 0.01, "eps": 1e-10},
         "adam": {"lr": 0.001, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}}


@dataclass
class Workload:
    tables: int
    rows: int
    batch: int
    batches: list[list[tuple[torch.Tensor, torch.Tensor]]]  # per step, per table: ids, offsets
    labels: list[torch.Tensor]
    readout: torch.Tensor  # (tables * DIM,): the fixed dense part


@dataclass
class Result:
    optimizer: str
    peer: str
    times_ms: list[float] = field(default_factory=list)
    engine_ms: list[float] = field(default_factory=list)  # ekko: of each step, in engine.step
    flush_ms: list[float] = field(default_factory=list)  # ekko: then until the replica has it
    cpu_ms: list[float] = field(default_factory=list)  # CPU time of all threads (ekko: and flush)
    step_cpu_ms: list[float] = field(default_factory=list)  # the same, of the step alone
    check: str = ""

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)


def make_workload(tables: int, rows: int, batch: int, steps: int, seed: int = 0) -> Workload:
    rng = np.random.default_rng(seed)
    perm = [rng.permutation(rows) for _ in range(tables)]
    batches = []
    for _ in range(steps):
        step = []
        for t in range(tables):
            lengths = rng.integers(1, 20, batch)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            ids = perm[t][(rng.zipf(1.05, int(offsets[-1])) - 1) % rows].astype(np.int64)
            step.append((torch.from_numpy(ids), torch.from_numpy(offsets)))
        batches.append(step)
    labels = [torch.from_numpy(rng.integers(0, 2, batch).astype(np.float32)) for _ in range(steps)]
    readout = torch.from_numpy(rng.standard_normal(tables * DIM).astype(np.float32) / 8)
    return Workload(tables, rows, batch, batches, labels, readout)


def source(work: Workload, optimizer: str) -> str:
    hyper = ", ".join(f"{k}={v}" for k, v in HYPER[optimizer].items())
    tables = "\n".join(f"  table t{i} {{ rows {work.rows}; }}\n  feature f{i} -> t{i} pooling sum;"
                       for i in range(work.tables))
    return (f"model bench {{\n  defaults {{ dim {DIM}; optimizer {optimizer}({hyper}); "
            f"serving f32; }}\n{tables}\n}}\n")


def loss_of(pooled: list[torch.Tensor], work: Workload, step: int) -> torch.Tensor:
    logits = torch.cat(pooled, dim=1) @ work.readout
    return F.binary_cross_entropy_with_logits(logits, work.labels[step])


class TorchPeer:
    """nn.EmbeddingBag(sparse=True) per table and the matching sparse optimizer."""

    def __init__(self, work: Workload, optimizer: str, initial: list[np.ndarray]):
        self.work = work
        self.bags = nn.ModuleList(
            nn.EmbeddingBag.from_pretrained(torch.from_numpy(w.copy()), freeze=False, mode="sum",
                                            sparse=True, include_last_offset=True)
            for w in initial)
        h = HYPER[optimizer]
        params = list(self.bags.parameters())
        self.opt = (torch.optim.SGD(params, lr=h["lr"]) if optimizer == "sgd" else
                    torch.optim.Adagrad(params, lr=h["lr"], eps=h["eps"]) if optimizer == "adagrad"
                    else torch.optim.SparseAdam(params, lr=h["lr"], betas=(h["beta1"], h["beta2"]),
                                                eps=h["eps"]))

    def step(self, i: int) -> None:
        pooled = [bag(ids, offsets) for bag, (ids, offsets) in zip(self.bags, self.work.batches[i])]
        self.opt.zero_grad(set_to_none=True)
        loss_of(pooled, self.work, i).backward()
        self.opt.step()

    def rows(self, t: int) -> np.ndarray:
        return self.bags[t].weight.detach().numpy()


class EkkoPeer:
    """ekko.torch.EmbeddingBags over an in-process Engine with one replica."""

    def __init__(self, work: Workload, optimizer: str, replicas: int = 1):
        self.work = work
        model = ekko.compile_model(parse_model(source(work, optimizer)))
        self.engine = ekko.Engine(model, replicas=replicas).start()
        self.emb = ekko.torch.EmbeddingBags(self.engine)
        self.in_engine = 0.0  # seconds inside engine.step, to tell the engine's share
        step = self.engine.step

        def timed(*args):
            start = time.perf_counter()
            try:
                return step(*args)
            finally:
                self.in_engine += time.perf_counter() - start
        self.engine.step = timed  # type: ignore[method-assign]

    def step(self, i: int) -> None:
        pooled = self.emb({f"f{t}": b for t, b in enumerate(self.work.batches[i])})
        loss_of([pooled[f"f{t}"] for t in range(self.work.tables)], self.work, i).backward()

    def rows(self, t: int) -> np.ndarray:
        return self.engine.primary.tables[f"t{t}"].buf.master

    def close(self) -> None:
        self.engine.flush()
        self.engine.close()


def check(ekko_peer: EkkoPeer, torch_peer: TorchPeer, before: list[np.ndarray]) -> str:
    """Both peers' rows after the first step: the touched rows must agree."""
    worst = 0.0
    for t in range(ekko_peer.work.tables):
        a, b = ekko_peer.rows(t), torch_peer.rows(t)
        touched = np.flatnonzero((b != before[t]).any(axis=1) | (a != before[t]).any(axis=1))
        if not len(touched):
            return f"DISAGREES: table t{t} not updated"
        if not np.allclose(a[touched], b[touched], rtol=1e-4, atol=1e-6):
            return f"DISAGREES: table t{t} max abs diff {np.abs(a[touched] - b[touched]).max():.2e}"
        worst = max(worst, float(np.abs(a[touched] - b[touched]).max()))
    return f"ok (max abs diff {worst:.1e})"


def run(work: Workload, optimizer: str, runs: int, replicas: int = 1) -> list[Result]:
    """One checked step of each peer, then `runs` timed steps each, interleaved."""
    ek = EkkoPeer(work, optimizer, replicas)
    try:
        before = [ek.rows(t).copy() for t in range(work.tables)]
        tp = TorchPeer(work, optimizer, before)
        results = {"ekko": Result(optimizer, "ekko"), "torch": Result(optimizer, "torch")}
        peers: dict[str, Callable[[int], None]] = {"ekko": ek.step, "torch": tp.step}
        for name in peers:
            peers[name](0)
        results["ekko"].check = results["torch"].check = check(ek, tp, before)
        for i in range(1, runs + 1):
            order = list(peers) if i % 2 else list(reversed(peers))
            for name in order:
                ek.in_engine = 0.0
                cpu, start = time.process_time(), time.perf_counter()
                peers[name](i)
                results[name].times_ms.append((time.perf_counter() - start) * 1e3)
                results[name].step_cpu_ms.append((time.process_time() - cpu) * 1e3)
                if name == "ekko":  # the replica's merges must not run into torch's step
                    results[name].engine_ms.append(ek.in_engine * 1e3)
                    start = time.perf_counter()
                    ek.engine.flush()
                    results[name].flush_ms.append((time.perf_counter() - start) * 1e3)
                results[name].cpu_ms.append((time.process_time() - cpu) * 1e3)
    finally:
        ek.close()
    return list(results.values())


def format_table(results: list[Result], work: Workload) -> str:
    ids = sum(len(ids) for ids, _ in work.batches[0])
    out = [f"{work.tables} tables of {work.rows:,} x {DIM} f32, batch {work.batch:,} bags, "
           f"{ids:,} ids a step (Zipf 1.05); torch {torch.__version__}, "
           f"{torch.get_num_threads()} threads\n",
           "| optimizer | torch peer | torch median ms | ekko median ms | of which engine.step | "
           "torch / ekko | ekko then flush to the replica ms | step CPU ms torch / ekko | "
           "CPU ms torch / ekko+flush | check |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    names = {"sgd": "SGD", "adagrad": "Adagrad", "adam": "SparseAdam"}
    for opt in dict.fromkeys(r.optimizer for r in results):
        t = next(r for r in results if r.optimizer == opt and r.peer == "torch")
        e = next(r for r in results if r.optimizer == opt and r.peer == "ekko")
        out.append(f"| {opt} | EmbeddingBag(sparse=True) + {names[opt]} | {t.median_ms:.1f} | "
                   f"{e.median_ms:.1f} | {statistics.median(e.engine_ms):.1f} | "
                   f"{t.median_ms / e.median_ms:.2f}x | "
                   f"{statistics.median(s + f for s, f in zip(e.times_ms, e.flush_ms)):.1f} | "
                   f"{statistics.median(t.step_cpu_ms):.0f} / "
                   f"{statistics.median(e.step_cpu_ms):.0f} | "
                   f"{statistics.median(t.cpu_ms):.0f} / {statistics.median(e.cpu_ms):.0f} | "
                   f"{e.check} |")
    return "\n".join(out) + "\n"


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    opts = list(dict.fromkeys(r.optimizer for r in results))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(opts))
    for k, (peer, color) in enumerate((("torch", "tab:gray"), ("ekko", "tab:red"))):
        ms = [next(r.median_ms for r in results if r.optimizer == o and r.peer == peer) for o in opts]
        ax.bar(x + (k - 0.5) * 0.4, ms, 0.4, label=peer, color=color)
    ax.set_xticks(x, opts)
    ax.set_ylabel("median ms per training step")
    ax.set_title("forward + backward + optimizer, same run")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small workload; writes nothing")
    p.add_argument("--tables", type=int, default=4)
    p.add_argument("--rows", type=int, default=None, help="rows per table (250,000; 20,000 quick)")
    p.add_argument("--batch", type=int, default=None, help="bags per step (4096; 256 quick)")
    p.add_argument("--runs", type=int, default=None, help="timed steps per peer (20; 3 quick)")
    p.add_argument("--replicas", type=int, default=1, help="live replicas of the ekko engine")
    p.add_argument("--optimizers", default="sgd,adagrad,adam")
    add_out(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = args.rows or (20_000 if args.quick else 250_000)
    batch = args.batch or (256 if args.quick else 4096)
    runs = args.runs or (3 if args.quick else 20)
    work = make_workload(args.tables, rows, batch, runs + 1)
    results: list[Result] = []
    load = os.getloadavg()[0]
    for opt in [o for o in args.optimizers.split(",") if o]:
        results += run(work, opt, runs, args.replicas)
    text = ("## A training step: ekko.torch vs torch nn.EmbeddingBag(sparse=True)\n\n"
            f"Median of {runs} interleaved steps per peer after one checked step; ekko with "
            f"{args.replicas} live replica(s). 'of which engine.step': ekko's time inside "
            "engine.step (the fused kernels and the engine's bookkeeping). After each ekko "
            "step, untimed in its step, the engine is flushed (the replica merges the rows) "
            "so that work does not run into torch's step; the flush column adds it. CPU ms: "
            "the process's CPU time (all threads) per step ('step': the step alone; then "
            "ekko's with its flush, the replica's merges): on a loaded machine wall times "
            "follow the scheduler's share, CPU time the work. "
            f"{load_note(load)}\n\n" + format_table(results, work))
    print(text)
    write_results(args, "torch_step", text, lambda path: plot(results, path))
    return 1 if any(r.check.startswith("DISAGREES") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
