"""The ML loop, end to end: train online through ekko, serve predictions from 2 fresh replicas.

    python examples/online_clicks.py [--seconds S] [--batch N] [--seed K]

A seeded click stream (workloads/clicks.py: new items arriving, tastes and
popularity drifting) feeds a DLRM-style recommender: its tables
(examples/clicks.ekko) train through ekko (`ekko.torch.EmbeddingBags`,
Adagrad fused into backward), its dense MLP (workloads/clicks_model.py) in
torch with Adam. Every batch is first predicted by both replicas and by the
trainer itself (prequential evaluation: each event is judged before it is
learned from), then trained on; the dense weights are published after each
step, the true labels observed for the quality checks, and the replicas
checked every few seconds of stream time. At the end: each replica's
log-loss, AUC and calibration beside the trainer's (the ceiling), row and
dense freshness, the health checks, and a final flush showing the replicas
predict exactly what the trainer does.

The stream runs as fast as the machine trains (stream seconds are the
stream's clock, not the wall's); freshness is measured in real time.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

import ekko
from ekko.engine import HealthConfig
from ekko.engine.quality import Quality, QualityConfig
from ekko.workloads.clicks import ClickStream, ClickStreamConfig
from ekko.workloads.clicks_model import ClicksDense

MODEL = "examples/clicks.ekko"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="stream seconds to run")
    ap.add_argument("--batch", type=int, default=256, help="events per training step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check-every", type=float, default=5.0, help="stream s between checks")
    args = ap.parse_args(argv)
    if not args.seconds > 0 or args.batch < 1 or not args.check_every > 0:
        ap.error("--seconds and --check-every must be positive, --batch at least 1")
    torch.manual_seed(args.seed)
    stream = ClickStream(ClickStreamConfig(seed=args.seed))
    dense = ClicksDense()
    health = HealthConfig(quality=QualityConfig(probe_events=4000), mark_lag=2)
    wall = time.perf_counter()
    with ekko.Engine(MODEL, replicas=2, dense=dense, health=health) as engine:
        predictions = run(engine, dense, stream, args)
        engine.flush()
        report(engine, dense, stream, predictions, time.perf_counter() - wall)
    return 0


def run(engine, dense, stream: ClickStream, args) -> dict[str, list[np.ndarray]]:
    """Predict (replicas, trainer), then train, then publish; returns predictions and labels."""
    emb = ekko.torch.EmbeddingBags(engine)
    opt = torch.optim.Adam(dense.parameters(), lr=2e-3)
    seen = {"replica 0": [], "replica 1": [], "trainer": [], "labels": []}
    next_check = args.check_every
    while stream.t < args.seconds:
        b = stream.next_batch(args.batch)
        sparse, x, y = b.sparse(), torch.from_numpy(b.x), torch.from_numpy(b.y)
        for i, r in enumerate(engine.replicas):
            seen[f"replica {i}"].append(torch.sigmoid(r.predict(sparse, x)).numpy())
        logits = dense(emb(sparse), x)
        seen["trainer"].append(torch.sigmoid(logits.detach()).numpy())
        seen["labels"].append(b.y)
        loss = F.binary_cross_entropy_with_logits(logits, y)
        opt.zero_grad()
        loss.backward()  # the tables' optimizer runs here; the replicas receive the rows
        opt.step()
        engine.publish_dense()
        engine.observe(sparse, x, y)
        if stream.t >= next_check:
            engine.check()
            next_check += args.check_every
    return {k: v for k, v in seen.items()}


def report(engine, dense, stream: ClickStream, seen: dict, wall_s: float) -> None:
    y = np.concatenate(seen["labels"])
    warm = len(y) // 5  # the first fifth is warm-up: every model starts knowing nothing
    print(f"ekko online: {len(y):,} events, {stream.t:.0f} stream s in {wall_s:.0f} s wall, "
          f"metrics after the first {warm:,} (prequential: predicted, then trained on)")
    print(f"{'who':<10} {'log-loss':>9} {'gap':>7} {'AUC':>7} {'calib':>6}")
    ceiling = Quality.of(np.concatenate(seen["trainer"])[warm:], y[warm:])
    for who in ("trainer", "replica 0", "replica 1"):
        q = Quality.of(np.concatenate(seen[who])[warm:], y[warm:])
        gap = (q.logloss / ceiling.logloss - 1) * 100
        print(f"{who:<10} {q.logloss:9.4f} {gap:6.2f}% {q.auc:7.4f} {q.calibration:6.3f}")
    s = engine.stats()
    f, d = s["freshness_ms"], s["dense"]
    print(f"rows: {s['rows_committed']:,} committed, {s['rows_moved']:,} moved "
          f"({s['bytes_moved'] / 1e6:.1f} MB); freshness p50 {f['p50']:.2f} ms, "
          f"p99 {f['p99']:.2f} ms, max {f['max']:.1f} ms")
    print(f"dense: {d['published']} snapshots published ({d['bytes_sent'] / 1e6:.1f} MB sent); "
          f"freshness p50 {d['freshness_ms']['p50']:.2f} ms, p99 {d['freshness_ms']['p99']:.2f} ms")
    print(f"health: {s['checks']} checks, {s['failed_checks']} failed, "
          f"{len(s['rollbacks'])} rollbacks; probe {s['quality']['probe_events']:,} events")
    b = stream.next_batch(512)
    sparse, x = b.sparse(), torch.from_numpy(b.x)
    with torch.no_grad():
        want = dense(ekko.torch.EmbeddingBags(engine)(sparse), x)
    same = all(torch.equal(r.predict(sparse, x), want) for r in engine.replicas)
    print(f"after flush the replicas predict exactly what the trainer does: {same}")
    if not same:
        raise SystemExit("replica predictions differ from the trainer's after flush")


if __name__ == "__main__":
    raise SystemExit(main())
