"""Smoke test of benchmarks/torch_step.py on a tiny workload: both peers run, start
from the same rows and agree after a checked step, and --quick writes nothing."""

from __future__ import annotations

import sys


import pytest

from tests.scripts import load_script

pytest.importorskip("torch")


bench = load_script("benchmarks/torch_step.py")


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
def test_peers_agree_and_are_timed(optimizer: str) -> None:
    work = bench.make_workload(tables=2, rows=3000, batch=64, steps=3, seed=1)
    results = bench.run(work, optimizer, runs=2)
    assert [r.peer for r in results] == ["ekko", "torch"]
    for r in results:
        assert r.check.startswith("ok"), r.check
        assert len(r.times_ms) == len(r.cpu_ms) == 2 and min(r.times_ms) > 0
    ek = results[0]
    assert len(ek.engine_ms) == len(ek.flush_ms) == 2 and 0 < max(ek.engine_ms)
    # each step's own time inside engine.step: positive, and part of that step
    assert all(0 < e <= t for e, t in zip(ek.engine_ms, ek.times_ms))
    text = bench.format_table(results, work)
    assert f"| {optimizer} | EmbeddingBag(sparse=True)" in text


def test_quick_writes_nothing(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys.modules["results_io"], "RESULTS", tmp_path / "results")
    assert bench.main(["--quick", "--rows", "2000", "--batch", "32", "--runs", "1",
                       "--tables", "2", "--optimizers", "sgd"]) == 0
    assert not (tmp_path / "results").exists()
    assert "torch / ekko" in capsys.readouterr().out
    assert bench.main(["--quick", "--rows", "2000", "--batch", "32", "--runs", "1",
                       "--tables", "2", "--optimizers", "sgd", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "torch_step.md").exists() and (tmp_path / "torch_step.png").exists()
