"""`ekko compile MODEL --target triton` writes each kernel's Triton source and PTX."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


# conftest.py chose the interpreter (no GPU) before triton was first imported
pytest.importorskip("triton")

from ekko.cli import main  # noqa: E402

MODEL = """
model small {
  table users { rows 1000; dim 16; serving int8; }
  feature user -> users pooling sum;
}
"""


def test_compile_target_triton_writes_source_and_ptx(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-cache"))
    model = tmp_path / "small.ekko"
    model.write_text(MODEL)
    out = tmp_path / "out"
    assert main(["compile", str(model), "-q", "-o", str(out), "--target", "triton"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    files = [f for entry in manifest["kernels"] for f in entry["files"]]
    sources = [f for f in files if f.endswith(".triton.py")]
    ptx = [f for f in files if f.endswith(".ptx")]
    assert len(sources) == len(manifest["kernels"]) >= 2  # the update and the lookup
    assert any(f.endswith(".ekko_update_apply.ptx") for f in ptx)
    assert any(f.endswith(".ekko_bag.ptx") for f in ptx)
    assert any(f.endswith(".ll") for f in files)  # next to the LLVM ones
    for f in ptx:
        assert ".target sm_90" in (out / f).read_text()
    for f in sources:
        compile((out / f).read_text(), f, "exec")  # valid Python


def test_compile_default_target_writes_no_triton_files(tmp_path: Path) -> None:
    model = tmp_path / "small.ekko"
    model.write_text(MODEL)
    out = tmp_path / "out"
    assert main(["compile", str(model), "-q", "-o", str(out)]) == 0
    assert not list((out / "kernels").glob("*.ptx"))
    assert not list((out / "kernels").glob("*.triton.py"))
