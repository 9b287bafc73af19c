"""The README is true: its Python example runs and does what its comments say,
the flags and files it names exist, and `dir(ekko)` shows the API it uses."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

import ekko
from ekko.cli import build_parser  # the `ekko` command: engine flags included

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_python_example_runs(monkeypatch) -> None:
    blocks = readme_python_blocks()
    assert blocks, "the README has no Python example"
    monkeypatch.chdir(ROOT)  # the example names examples/dlrm.ekko relative to the repo
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)  # noqa: S102 - our own README
    table, serving = scope["table"], scope["serving"]
    # every row serves its own values: the touched ones re-quantized by the update,
    # the others as initialized from the table (not zeros)
    np.testing.assert_array_equal(serving, ekko.quantize_rows(table, "int8"))
    assert serving[[0, 4]].any(axis=1).all()
    assert list(scope["versions"][[3, 7, 99_999, 0]]) == [1, 1, 1, 0]
    assert scope["momentum"][[3, 7, 99_999]].all() and not scope["momentum"][[0, 4]].any()
    assert scope["pooled"].shape == (2, 64) and np.isfinite(scope["pooled"]).all()


def test_every_readme_python_block_runs_as_written(monkeypatch) -> None:
    """Each ```python block runs on its own, in a fresh scope: no names from elsewhere."""
    monkeypatch.chdir(ROOT)
    blocks = readme_python_blocks()
    assert len(blocks) >= 2
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i}", "exec"), {})  # noqa: S102


def test_the_engine_block_does_what_it_says(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    block = next(b for b in readme_python_blocks() if "ekko.Engine(" in b)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102
    assert scope["pooled"].shape == (2, 64) and np.isfinite(scope["pooled"]).all()
    assert scope["fresh"]["count"] >= 3  # three distinct rows reached each replica


def test_only_python_blocks_are_code_a_user_runs_in_python() -> None:
    """Other fences are shell, output, or the GPU example (```py: it needs CUDA)."""
    fences = re.findall(r"^```(\w*)$", README, re.M)
    assert set(fences) <= {"sh", "python", "py", ""}, set(fences)
    assert fences.count("py") <= 1


def test_state_table_names_every_optimizer() -> None:
    from ekko.dialects import catalog

    for name in catalog.BUILTIN:  # user-defined ones (other tests make some) are not listed
        assert f"| `{name}` |" in README, name


def test_flags_the_readme_names_exist() -> None:
    run = build_parser()._subparsers._group_actions[0].choices["run"]  # noqa: SLF001
    known = {s for a in run._actions for s in a.option_strings}  # noqa: SLF001
    named = set(re.findall(r"`(--[a-z-]+)", README.split("## The main job")[1].split("##")[0]))
    assert named and named <= known | {"--help"}, named - known


def test_linked_docs_exist() -> None:
    for link in re.findall(r"\]\(([^)#]+)\)", README):
        if not link.startswith("http"):
            assert (ROOT / link).exists(), link


def test_dir_shows_the_api() -> None:
    """Completion and help(ekko) find the lazily loaded names."""
    names = dir(ekko)
    for name in ("update_kernel", "bag_kernel", "compile_model", "quantize_rows", "EkkoError"):
        assert name in names
