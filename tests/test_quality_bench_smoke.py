"""Smoke test of benchmarks/quality.py on a short seeded stream: every way of keeping a
replica fresh is measured beside the trainer's ceiling, a fresh replica beats a frozen
one, the budgets run, and --quick writes nothing."""

from __future__ import annotations

import sys

import pytest

from tests.scripts import load_script

pytest.importorskip("torch")

bench = load_script("benchmarks/quality.py")


def test_fresh_replicas_track_the_trainer_and_a_frozen_one_falls_behind() -> None:
    config = bench.config_of(bench.parse_args(["--quick", "--seconds", "30", "--warmup", "15"]))
    r = bench.run(config, list(bench.WAYS))
    rows = {m["name"]: m for m in bench.rows_of(r)}
    assert list(rows) == ["trainer"] + [w.name for w in bench.WAYS]
    assert len(r.y) == round(15 / config.batch_s) * config.batch_events
    assert rows["trainer"]["gap"] == 0 and rows["trainer"]["age_s"] == 0
    # the frozen replica got the warm-up's model and nothing after it: its mean age is
    # about half the measured span, and on this drifting stream it predicts worse
    assert rows["frozen"]["age_s"] >= 0.4 * r.measured_s
    assert rows["frozen"]["logloss"] > rows["priority"]["logloss"]
    assert rows["priority"]["gap"] < rows["frozen"]["gap"]
    assert rows["priority"]["row_kb_s"] > rows["periodic 10 s"]["row_kb_s"] > 0
    for m in rows.values():
        assert 0 < m["logloss"] < 1 and 0.5 < m["auc"] <= 1

def test_quick_writes_nothing_and_reports_the_budgets(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys.modules["results_io"], "RESULTS", tmp_path / "results")
    args = ["--quick", "--seconds", "10", "--warmup", "5", "--budget-fractions", "0.25",
            "--harm-seeds", "0"]
    assert bench.main(args) == 0
    assert not (tmp_path / "results").exists()
    out = capsys.readouterr().out
    assert "| trainer | " in out and "| frozen | " in out and "| full 600 s | " in out
    assert "| priority @ 25% rows | " in out and "| fifo @ 25% rows | " in out
    assert "- budget " in out and "compression" in out
    assert bench.main(args + ["--out", str(tmp_path)]) == 0
    assert (tmp_path / "quality.md").exists() and (tmp_path / "quality.png").exists()

def test_harm_a_corrupted_dense_snapshot_is_detected_and_rolled_back() -> None:
    """The harm section on a short seeded run: a clean run rolls nothing back, a dense
    module corrupted (output layer x4) and published is caught by the next check, which
    rolls the tables and the dense module back; the report says so."""
    args = bench.parse_args(["--quick", "--harm-seeds", "1"])
    config = bench.harm_config_of(args, bench.config_of(args))
    clean = bench.run_harm(config, bench.Harm("none"), 0)
    assert clean.checks > 0 and clean.rollbacks == []
    harm = next(h for h in config.harms() if h.kind == "dense")
    harmed = bench.run_harm(config, harm, 0)
    report = bench.report_harm(config, harmed, clean)
    assert report.detected_s is not None and report.detected_s <= config.check_every_s
    assert {table for _, table, _ in harmed.rollbacks} == {"user", "item", "category", "dense"}
    assert report.worst_gap > 1.0  # it did hurt before the rollback
    text = bench.format_harm(config, [clean], [report])
    assert "| dense output layer x4, published | 0.50 | 1 |" in text
    assert "0 false rollbacks" in text
