"""`ekko compile`'s object files stand on their own: the manifest names the
symbols they export with C signatures, and a program that knows nothing of
ekko's runtime links them into one library and calls them."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess

import numpy as np
import pytest

import ekko
from ekko.cli import main

C_TYPES = {"int64_t": ctypes.c_int64, "double": ctypes.c_double, "void": None}


def _function(lib: ctypes.CDLL, export: dict):
    """A ctypes function built from the manifest alone (pointers as addresses)."""
    fn = getattr(lib, export["symbol"])
    fn.restype = C_TYPES[export["returns"]]
    fn.argtypes = [ctypes.c_void_p if a["type"].endswith("*") else C_TYPES[a["type"]]
                   for a in export["args"]]
    return fn


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[dict, ctypes.CDLL]:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler to link the objects with")
    out = tmp_path_factory.mktemp("compiled")
    assert main(["compile", "examples/dlrm.ekko", "--scale", "0.001", "-o", str(out), "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    objects = [str(out / f) for k in manifest["kernels"] for f in k["files"] if f.endswith(".o")]
    lib = out / "libdlrm.so"
    subprocess.run(["cc", "-shared", "-o", str(lib), *objects], check=True)
    return manifest, ctypes.CDLL(str(lib))


def _exports(kernel: dict) -> dict[str, dict]:
    return {e["symbol"].split("_", 1)[1]: e for e in kernel["exports"]}


def test_every_listed_symbol_is_exported(compiled) -> None:
    manifest, lib = compiled
    for kernel in manifest["kernels"]:
        assert kernel["exports"], kernel["spec"]
        for export in kernel["exports"]:
            assert hasattr(lib, export["symbol"]), export["symbol"]
            assert export["c"].startswith(export["returns"])


def test_a_bag_kernel_called_through_the_manifest_pools_like_numpy(compiled) -> None:
    manifest, lib = compiled
    kernel = next(k for k in manifest["kernels"]
                  if k["spec"].get("mode") == "sum" and not k["spec"]["weighted"])
    bag = _function(lib, _exports(kernel)["bag_kernel"])
    dim, layout = kernel["spec"]["dim"], kernel["spec"]["layout"]
    rng = np.random.default_rng(0)
    stored = ekko.quantize_rows(rng.standard_normal((50, dim)).astype(np.float32), layout)
    table = ekko.dequantize_rows(stored, layout, dim)  # what the stored rows hold
    ids = np.array([0, 49, 3, 3, 7], np.int64)
    offsets = np.array([0, 2, 5], np.int64)
    out = np.zeros((2, dim), np.float32)
    err = np.zeros(1, np.int64)
    code = bag(stored.ctypes.data, 50, ids.ctypes.data, 5, offsets.ctypes.data, 3, 2, None,
               out.ctypes.data, 0, 1, err.ctypes.data, None)
    assert code == 0
    np.testing.assert_allclose(out[0], table[[0, 49]].sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1], table[[3, 3, 7]].sum(0), rtol=1e-5, atol=1e-5)
    bad = np.array([0, 50], np.int64)
    assert bag(stored.ctypes.data, 50, bad.ctypes.data, 2, offsets.ctypes.data, 2, 1, None,
               out.ctypes.data, 0, 1, err.ctypes.data, None) == 1 and err[0] == 1


def test_an_update_kernel_called_through_the_manifest_updates_like_numpy(compiled) -> None:
    manifest, lib = compiled
    kernel = next(k for k in manifest["kernels"] if k["spec"].get("optimizer") == "rowwise_adagrad"
                  and k["spec"]["dedup"])
    spec, names = kernel["spec"], _exports(kernel)
    dedup, apply = _function(lib, names["ekko_update_dedup"]), _function(lib, names["ekko_update_apply"])
    dim, rows, lr, eps = spec["dim"], 20, spec["hyper"]["lr"], spec["hyper"]["eps"]
    rng = np.random.default_rng(1)
    table = rng.standard_normal((rows, dim)).astype(np.float32)
    before = table.copy()
    momentum = np.zeros(rows, np.float32)
    ids = np.array([3, 19, 3, 0], np.int64)
    grads = rng.standard_normal((4, dim)).astype(np.float32)
    n, cap = len(ids), 1024
    htab = np.full(2 * cap, -1, np.int64)
    uids, occ, slots, srcs, count, err = (np.zeros(n, np.int64) for _ in range(6))
    assert spec["order"] == "input"  # streamed: count[1] gets the owned positions, sort[3]
    # where each one's code is in sort[0]
    sort = [np.zeros(n, np.int64) for _ in range(4)]
    starts = np.zeros(4097, np.int64)  # as the manifest's comment on `starts` says
    one_row = np.zeros(2 * dim, np.float32)  # two rows of scratch
    assert dedup(0, 1, ids.ctypes.data, n, rows, grads.ctypes.data, htab.ctypes.data, cap,
                 uids.ctypes.data, occ.ctypes.data, slots.ctypes.data, count.ctypes.data,
                 err.ctypes.data, *(a.ctypes.data for a in sort), srcs.ctypes.data,
                 starts.ctypes.data) == 0
    serving = np.zeros((rows, spec["dim"] + 8), np.uint8) if spec["serving"] == "int8" else None
    journal = np.zeros(n * 4096 + 64, np.uint8)  # more than a row's entry needs
    aligned = (journal.ctypes.data + 63) // 64 * 64  # the entries take streaming stores
    out = np.zeros(3, np.int64)  # rows written, then a bad row's id and buffer
    acc = np.zeros((int(count[1]) - int(count[0])) * dim, np.float32)  # a row per repeated id
    args = [0, 1, ids.ctypes.data, grads.ctypes.data, int(count[1]), table.ctypes.data,
            momentum.ctypes.data, serving.ctypes.data if serving is not None else None,
            None, None, 1, 1, 0, sort[0].ctypes.data, occ.ctypes.data, None,
            sort[3].ctypes.data, one_row.ctypes.data, aligned, *(out[k:].ctypes.data for k in range(3)), None, 0,
            None, None, acc.ctypes.data]  # not gathered: grads holds the delta's rows
    assert apply(*args) == 0 and out[0] == 3
    summed = {3: grads[0] + grads[2], 19: grads[1], 0: grads[3]}
    for r, g in summed.items():
        m = np.mean(g.astype(np.float64) ** 2)
        np.testing.assert_allclose(momentum[r], m, rtol=1e-5)
        np.testing.assert_allclose(table[r], before[r] - lr * g / (np.sqrt(m) + eps), rtol=1e-5,
                                   atol=1e-6)
    untouched = [r for r in range(rows) if r not in summed]
    np.testing.assert_array_equal(table[untouched], before[untouched])
