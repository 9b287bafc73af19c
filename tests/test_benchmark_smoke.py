"""Smoke test of benchmarks/update_kernels.py on a tiny workload.

Every peer of the benchmark must run and agree with the float64 reference on
sampled rows, so a peer that rots (API change, wrong math) fails here instead
of silently printing a meaningless speedup.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import numpy as np
import pytest

from tests.scripts import ROOT, load_script

BENCH = ROOT / "benchmarks" / "update_kernels.py"


bench = load_script("benchmarks/update_kernels.py")


@pytest.fixture(scope="module")
def work():
    return bench.make_workload(rows=5000, dim=16, n_ids=3000, seed=5)


@pytest.mark.parametrize("peer", list(bench.PEERS))
@pytest.mark.parametrize("case", bench.CASES)
def test_peer_agrees_with_reference(case: str, peer: str, work) -> None:
    """One checked run and one timed run of each peer; it must match the reference."""
    bufs = bench.allocate(case, work.rows, work.dim)
    saved = bench.save_rows(bufs, work)
    exp = bench.expected_rows(case, work, saved, bench.sample_ids(work, n=300))
    res = bench.measure(case, peer, work, bufs, saved, exp, runs=1)
    if res.error.startswith("fbgemm_gpu:"):
        pytest.skip(res.error)  # optional dependency absent; ekko missing is a failure
    assert not res.error, res.error
    assert res.check.startswith("ok"), res.check
    assert len(res.times_ms) == 1 and res.times_ms[0] > 0
    # the peer restored the touched rows: the next peer starts from the same state
    np.testing.assert_array_equal(bufs.table[saved.uniq], saved.table_rows)


def test_report_and_bytes(work) -> None:
    """The table formatter and the byte model work on a synthetic result."""
    r = bench.Result("sgd", work.dim, "ekko", threads=2, times_ms=[1.0, 2.0, 3.0], check="ok")
    text = bench.format_table([r], {work.dim: work}, bw=10.0)
    assert "| ekko | 2 | 2.0 |" in text and "1.00x" in text
    assert bench.ekko_bytes("sgd", work) == work.n_ids * (8 + 64) + len(work.uniq) * 128


def test_reference_detects_wrong_update(work) -> None:
    """The checker rejects a table that was not updated (guards the guard)."""
    bufs = bench.allocate("sgd", work.rows, work.dim)
    saved = bench.save_rows(bufs, work)
    exp = bench.expected_rows("sgd", work, saved, bench.sample_ids(work, n=100))
    with pytest.raises(AssertionError):
        bench.check_rows(bufs, exp, work.dim)


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH.parent / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["update_kernels", "lookup_kernels", "compile_model", "parse_ir"])
def test_quick_runs_write_nothing(name: str, tmp_path) -> None:
    """--quick is a smoke run: it never overwrites the committed results."""
    if name == "lookup_kernels":
        pytest.importorskip("torch")
    mod = _load_script(name)
    results = BENCH.parent / "results"
    assert mod.output_folder(mod.parse_args(["--quick"])) is None
    assert mod.output_folder(mod.parse_args([])) == results
    assert mod.output_folder(mod.parse_args(["--quick", "--out", str(tmp_path)])) == tmp_path


def test_the_ab_script_compares_two_trees(capsys) -> None:
    """benchmarks/ab_update.py on a tiny workload, this tree against its own HEAD."""
    import subprocess

    root = BENCH.parent.parent
    if subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    spec = importlib.util.spec_from_file_location("bench_ab_update", BENCH.parent / "ab_update.py")
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    assert ab.main(["--base-ref", "HEAD", "--size", "5000,3000", "--dims", "16", "--rounds", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| rowwise_adagrad_int8", "| sgd"]
    assert all(float(r.split(" | ")[-1].rstrip(" |")) > 0 for r in rows[1:])
    with pytest.raises(SystemExit):
        ab.main(["--size", "0,5"])
