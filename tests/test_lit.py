"""Runs the lit + FileCheck suite under pytest, so a lit failure fails the run."""

import shutil
import subprocess
from pathlib import Path

import pytest

FILECHECK = Path(__file__).parent / "filecheck"


def test_lit_suite() -> None:
    lit = shutil.which("lit")
    if lit is None or shutil.which("ekko-opt") is None or shutil.which("filecheck") is None:
        pytest.fail("lit, ekko-opt and filecheck must be on PATH (pip install -e .[dev])")
    result = subprocess.run(
        [lit, "-v", str(FILECHECK)],
        capture_output=True,
        text=True,
    )
    print(result.stdout[-20000:])
    print(result.stderr[-5000:])
    assert result.returncode == 0, "lit suite failed (see output above)"
    assert "Passed" in result.stdout
