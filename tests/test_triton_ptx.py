"""Every kind of generated Triton kernel compiles to PTX for sm_90, with no GPU present.

Triton lowers the source through its own IR to LLVM and PTX (and ptxas to a
cubin) for `GPUTarget("cuda", 90, 32)` without touching a device, so CI
checks that everything the interpreter tests run also builds for the GPU.
The cases cover every optimizer, table dtype, rounding mode, serving
layout, index width, and every lookup layout x mode.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("triton")

from ekko.compiler.backend.spec import BagSpec  # noqa: E402
from ekko.compiler.pipeline import UpdateRequest, update_spec  # noqa: E402
from ekko.dialects import catalog  # noqa: E402
from ekko.kernels.triton_runtime import spec_ptx  # noqa: E402

UPDATES = [  # (optimizer, table dtype, serving, stochastic rounding, index dtype)
    ("sgd", "f32", None, False, "i64"),
    ("adagrad", "f32", "f32", False, "i32"),
    ("rowwise_adagrad", "f32", "int8", False, "i64"),
    ("adam", "bf16", "int4", True, "i64"),
    ("rmsprop", "f16", "f16", True, "i64"),
    ("ftrl", "f32", "bf16", False, "i64"),
    ("adam", "f16", "int8", False, "i32"),
]
BAGS = [(layout, mode, mode == "sum" and layout in ("f32", "int8"))
        for layout in catalog.LAYOUT_NAMES for mode in ("sum", "mean", "none")]


@pytest.fixture(autouse=True)
def _triton_cache(tmp_path, monkeypatch):
    """A fresh Triton cache: each case really compiles."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))


def _check(ptx: dict[str, str]) -> None:
    for name, text in ptx.items():
        assert ".target sm_90" in text, name
        assert f".entry {name}" in text, name


@pytest.mark.parametrize("optimizer,table,serving,sr,index", UPDATES)
def test_update_kernels_compile_for_sm90(optimizer, table, serving, sr, index) -> None:
    req = UpdateRequest(optimizer, 24, table, index, serving, versions=True,
                        stochastic_rounding=sr, hyper=tuple(catalog.optimizer(optimizer)
                                                            .defaults().items()))
    source, ptx = spec_ptx(update_spec(req, partitions=1))
    assert set(ptx) == {"ekko_update_sum", "ekko_update_apply"}
    _check(ptx)
    if serving in ("int8", "int4"):
        assert "st.global.b8" in ptx["ekko_update_apply"] or "st.global.u8" in ptx["ekko_update_apply"]


@pytest.mark.parametrize("layout,mode,weighted", BAGS)
def test_bag_kernels_compile_for_sm90(layout, mode, weighted) -> None:
    _, ptx = spec_ptx(BagSpec(13, layout, "i64", mode, weighted))
    _check(ptx)


def test_user_defined_optimizer_compiles() -> None:
    import ekko

    @ekko.optimizer(state=("buf",), hyper={"lr": 0.05}, replace=True)
    def ptx_heavy_ball(g, w, buf, *, lr):
        buf = 0.9 * buf + ekko.rowmath.exp(-abs(g))
        return w - lr * buf, buf

    req = UpdateRequest("ptx_heavy_ball", 64, "f32", "i64", None, versions=True,
                        hyper=(("lr", 0.05),))
    _check(spec_ptx(update_spec(req, partitions=1))[1])
