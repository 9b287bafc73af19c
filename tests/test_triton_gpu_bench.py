"""benchmarks/gpu.py --quick: every peer runs and agrees with ekko's Triton kernels.

On a machine without a GPU it runs under Triton's interpreter on tiny
shapes (torch.compile with its eager backend) and must write nothing, so
the script is known to work before it meets the GPU machine.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.scripts import load_script

if os.environ.get("TRITON_INTERPRET", "") in ("", "0") and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")


def test_quick_runs_every_peer_and_writes_nothing(capsys, monkeypatch, tmp_path) -> None:
    bench = load_script("benchmarks/gpu.py")
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results")
    assert bench.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "copy bandwidth" in out
    for case in ("rowwise_adagrad_int8", "adam", "bag_sum_f32", "bag_sum_int8"):
        lines = [line for line in out.splitlines() if line.startswith(case)]
        assert len(lines) == 3, (case, out)  # ekko, torch eager, torch.compile
        assert all(line.rstrip().endswith("ok") for line in lines), lines
    assert not (tmp_path / "results").exists()


def test_torch_peers_match_ekko_formulas() -> None:
    """The eager peers compute what ekko computes (a wrong peer would flatter ekko)."""
    import ekko
    from ekko.kernels import quant

    bench = load_script("benchmarks/gpu.py")
    rng = torch.Generator().manual_seed(0)
    rows, dim = 50, 12
    ids = torch.randint(0, rows, (80,), generator=rng)
    grads = torch.randn(80, dim, generator=rng)
    w = torch.randn(rows, dim, generator=rng)
    m, q, v = torch.zeros(rows), torch.zeros(rows, dim + 8, dtype=torch.uint8), torch.zeros(rows,
                                                                                            dtype=torch.int64)
    w2, m2, q2, v2 = w.clone().numpy(), m.clone().numpy(), q.clone().numpy(), v.clone().numpy()
    bench.torch_rowwise_int8(w, m, q, v, ids, grads, 3)
    k = ekko.update_kernel("rowwise_adagrad", dim, serving="int8", lr=bench.LR, eps=bench.EPS)
    k(w2, ids.numpy(), grads.numpy(), state=m2, serving=q2, versions=v2, version=3)
    torch.testing.assert_close(w, torch.from_numpy(w2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m, torch.from_numpy(m2), rtol=1e-5, atol=1e-6)
    assert torch.equal(v, torch.from_numpy(v2))
    deq = quant.dequantize_rows(q.numpy(), "int8", dim)
    assert abs(deq - quant.dequantize_rows(q2, "int8", dim)).max() < 1e-2


def test_torch_compile_peers_are_skipped_past_the_budget(monkeypatch) -> None:
    """gpu.sh keeps the whole run in a few minutes: late compiles are reported as skipped."""
    bench = load_script("benchmarks/gpu.py")
    monkeypatch.setattr(bench, "BUDGET", [-1.0])
    with pytest.raises(bench.Unavailable, match="budget"):
        bench._compiled(bench.torch_adam, "cpu")()
