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


# conftest.py chose the interpreter (no GPU) before triton was first imported
pytest.importorskip("triton")

from ekko.compiler.backend.spec import BagSpec  # noqa: E402
from ekko.compiler.pipeline import UpdateRequest, update_spec  # noqa: E402
from ekko.dialects import catalog  # noqa: E402
from ekko.kernels.triton_runtime import ptx_many, spec_ptx, unit_of  # noqa: E402

UPDATES = [  # (optimizer, table dtype, serving, stochastic rounding, index dtype)
    ("sgd", "f32", None, False, "i64"),
    ("adagrad", "f32", "f32", False, "i32"),
    ("rowwise_adagrad", "f32", "int8", False, "i64"),
    ("adam", "bf16", "int4", True, "i64"),
    ("rmsprop", "f16", "f16", True, "i64"),
    ("ftrl", "f32", "bf16", False, "i64"),
    ("adam", "f16", "int8", False, "i32"),
    ("sgd", "bf16", "fp8", False, "i64"),
]
BAGS = [(layout, mode, mode == "sum" and layout in ("f32", "int8"))
        for layout in catalog.LAYOUTS for mode in ("sum", "mean", "none")]


def _update(optimizer, table, serving, sr, index, dim=24):
    req = UpdateRequest(optimizer, dim, table, index, serving, versions=True,
                        stochastic_rounding=sr,
                        hyper=tuple(catalog.optimizer(optimizer).defaults().items()))
    return update_spec(req, partitions=1)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    """Every case compiled in one go (in a fresh process if the interpreter ran here),
    into a fresh Triton cache, so each really compiles."""
    import os

    saved = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    try:
        specs = {("update", *c): _update(*c) for c in UPDATES}
        specs.update({("bag", *c): BagSpec(13, c[0], "i64", c[1], c[2]) for c in BAGS})
        units = [unit_of(s) for s in specs.values()]
        return dict(zip(specs, ptx_many(units)))
    finally:
        if saved is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = saved


def _check(ptx: dict[str, str]) -> None:
    for name, text in ptx.items():
        assert ".target sm_90" in text, name
        assert f".entry {name}" in text, name


@pytest.mark.parametrize("optimizer,table,serving,sr,index", UPDATES)
def test_update_kernels_compile_for_sm90(compiled, optimizer, table, serving, sr, index) -> None:
    ptx = compiled[("update", optimizer, table, serving, sr, index)]
    assert set(ptx) == {"ekko_update_sum", "ekko_update_check", "ekko_update_apply"}
    _check(ptx)
    if serving is not None and catalog.layout(serving).quantized:
        assert "st.global.b8" in ptx["ekko_update_apply"] or "st.global.u8" in ptx["ekko_update_apply"]


@pytest.mark.parametrize("layout,mode,weighted", BAGS)
def test_bag_kernels_compile_for_sm90(compiled, layout, mode, weighted) -> None:
    _check(compiled[("bag", layout, mode, weighted)])


@pytest.fixture(autouse=True)
def _scoped_catalog():
    """Optimizers a test defines are gone after it: other tests see only theirs."""
    with catalog.OPTIMIZERS.scoped():
        yield


def test_user_defined_optimizer_compiles() -> None:
    import ekko

    rm = ekko.rowmath

    @ekko.optimizer(state=("buf",), hyper={"lr": 0.05}, replace=True)
    def ptx_heavy_ball(g, w, buf, *, lr):  # exp, log and ** go through f64 on the GPU
        buf = 0.9 * buf + rm.exp(-abs(g)) + rm.log(1.0 + g * g) + rm.maximum(g, w) ** 3.0
        return w - lr * buf, buf

    req = UpdateRequest("ptx_heavy_ball", 64, "f32", "i64", None, versions=True,
                        hyper=(("lr", 0.05),))
    _check(spec_ptx(update_spec(req, partitions=1))[1])
