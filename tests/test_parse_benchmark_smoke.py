"""Smoke run of benchmarks/parse_ir.py on 500 ops: correctness, not speed."""

from __future__ import annotations

import sys

from tests.scripts import load_script


def test_generated_module_round_trips() -> None:
    bench = load_script("benchmarks/parse_ir.py")
    text, count = bench.generate(500)
    assert count >= 500
    module = bench.parse(text)
    module.verify()
    assert sum(1 for _ in module.walk()) - 1 == count
    printed = bench.render(module)
    assert bench.render(bench.parse(printed)) == printed
    generic = bench.render(module, generic=True)
    assert bench.render(bench.parse(generic)) == printed
    names = {op.name for op in module.walk()}
    assert {"upd.delta", "upd.dedup", "upd.clip", "upd.weight_decay", "upd.sgd", "upd.adagrad",
            "upd.rowwise_adagrad", "upd.adam", "upd.stochastic_round", "upd.requantize",
            "upd.stamp", "emb.bag", "emb.lookup", "emb.table", "emb.feature"} <= names


def test_cli_prints_the_table(capsys) -> None:
    bench = load_script("benchmarks/parse_ir.py")
    folder = sys.modules["results_io"].RESULTS
    results = sorted((p.name, p.read_bytes()) for p in folder.iterdir())
    assert bench.main(["--quick", "--ops", "500", "--check"]) == 0
    assert sorted((p.name, p.read_bytes()) for p in folder.iterdir()) == results
    out = capsys.readouterr().out
    for phase in ("parse", "verify", "print", "total"):
        assert phase in out
    assert "round trip identical: True" in out
