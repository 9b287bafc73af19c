"""benchmarks/freshness.py --quick runs, prints its table and writes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_freshness_benchmark_quick(tmp_path: Path) -> None:
    results = ROOT / "benchmarks" / "results"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in results.iterdir())
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "freshness.py"), "--quick"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for way in ("| full |", "| periodic |", "| fifo |", "| ekko |"):
        assert way in proc.stdout
    assert "Overload" in proc.stdout and "significant p99" in proc.stdout
    # --quick writes nothing: not in the results folder, not here
    assert sorted((p.name, p.stat().st_mtime_ns) for p in results.iterdir()) == before
    assert list(tmp_path.iterdir()) == []
