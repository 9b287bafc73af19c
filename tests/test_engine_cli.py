"""`ekko run MODEL --replicas N`: the engine from the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL = str(ROOT / "examples" / "dlrm.ekko")


def ekko(*args: str) -> subprocess.CompletedProcess:
    """The `ekko` console script's entry point (pyproject: ekko.cli:main)."""
    return subprocess.run([sys.executable, "-m", "ekko.cli", *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)


def test_run_with_replicas_reports_and_checks_every_replica() -> None:
    proc = ekko("run", MODEL, "--replicas", "2", "--scale", "0.001", "--steps", "4",
                "--batch", "256")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for line in ("freshness        commit -> visible: p50", "lookups          ",
                 "rollbacks        0", "replica check    passed"):
        assert line in out
    assert "step 4/4" in proc.stderr  # the live progress line


def test_run_with_replicas_as_json() -> None:
    proc = ekko("run", MODEL, "--replicas", "1", "--scale", "0.001", "--steps", "2",
                "--batch", "128", "--json", "-q", "--bandwidth", "5e6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["replicas"] == 1 and report["replicas_match_primary"] is True
    assert report["update_rows"] == 2 * 26 * 128
    assert report["freshness_ms"]["count"] > 0
    assert report["packets_rejected"] == 0 and report["rollbacks"] == []


@pytest.mark.parametrize("args, message", [
    (["--replicas", "0"], "out of range"),
    (["--replicas", "x"], "--replicas"),
    (["--bandwidth", "1000"], "--bandwidth needs --replicas"),
    (["--replicas", "1", "--bandwidth", "-5"], "--bandwidth"),
])
def test_bad_engine_flags_are_one_line_errors(args: list[str], message: str) -> None:
    proc = ekko("run", MODEL, "--scale", "0.001", *args)
    assert proc.returncode == 1
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_plain_commands_still_work() -> None:
    proc = ekko("run", MODEL, "--scale", "0.001", "--steps", "2", "--batch", "64")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reference check  passed" in proc.stdout
