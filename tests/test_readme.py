"""The README's Python example runs as written (documentation that cannot rot silently)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_python_example_runs(monkeypatch) -> None:
    blocks = readme_python_blocks()
    assert blocks, "the README has no Python example"
    monkeypatch.chdir(ROOT)  # the example names examples/dlrm.ekko relative to the repo
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)  # noqa: S102 - our own README
    # the example's update touched rows 3, 7 and 99_999 and re-quantized them
    touched = scope["serving"][[3, 7, 99_999]]
    assert touched.any(axis=1).all() and not scope["serving"][[0, 4]].any()
    assert list(scope["versions"][[3, 7, 99_999, 0]]) == [1, 1, 1, 0]
    assert scope["pooled"].shape == (2, 64) and np.isfinite(scope["pooled"]).all()
