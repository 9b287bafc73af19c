"""A layout is one registry entry: a throwaway layout made of an existing codec with
other parameters, registered for one test, runs the update, the lookups and the
merge on both backends without any other file knowing its name."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ekko.compiler.frontend import ModelError, parse_model
from ekko.dialects import catalog
from ekko.kernels import quant
from ekko.kernels.build import bag_kernel
from ekko.kernels.sync import merge_kernel, pack_kernel
from ekko.kernels.build import update_kernel

# FBGEMM's 4-bit rule on byte codes with f16 parameters, and the 8-bit rule on
# nibbles with bf16 ones: neither is a built-in combination
THROWAWAY = (catalog.Layout("u8half", catalog.RowAffine(8, "f16", inverse=False)),
             catalog.Layout("u4brain", catalog.RowAffine(4, "bf16", inverse=True)))


def affine_bound(w: np.ndarray, codec: catalog.RowAffine) -> np.ndarray:
    """|decoded - master| per row: half a code step, plus the rounding of the
    parameters to their format (relative 2**-8 of the row's magnitude for bf16)."""
    rng = (w.max(axis=1) - w.min(axis=1)).astype(np.float64)
    mag = np.abs(w).max(axis=1).astype(np.float64)
    rel = {"f32": 2.0**-23, "f16": 2.0**-10, "bf16": 2.0**-7}[codec.param]
    return rng / codec.max_code / 2 * (1 + 2 * rel) + 2 * rel * (1 + mag) * codec.max_code / 8


@pytest.mark.parametrize("entry", THROWAWAY, ids=lambda e: e.name)
def test_a_scoped_layout_runs_every_kernel(entry: catalog.Layout) -> None:
    dim, rows = 13, 40
    rng = np.random.default_rng(len(entry.name))
    with catalog.LAYOUTS.scoped(entry):
        name, codec = entry.name, entry.codec
        w = rng.normal(0, 2, (rows, dim)).astype(np.float32)
        w[3] = 0.75  # a constant row
        serving = quant.quantize_rows(w, name)
        assert serving.shape == (rows, entry.row_bytes(dim))
        assert (np.abs(quant.dequantize_rows(serving, name, dim) - w).max(axis=1)
                <= affine_bound(w, codec)).all()
        # the fused update re-makes the touched rows as quantize_rows does
        ids = np.array([0, 3, 9, rows - 1, 9], np.int64)
        grads = rng.normal(0, 1, (len(ids), dim)).astype(np.float32)
        grads[1] = 0.0
        table = w.copy()
        update_kernel("sgd", dim, serving=name, lr=0.1)(table, ids, grads, serving=serving)
        np.testing.assert_array_equal(serving, quant.quantize_rows(table, name))
        # pooled lookups decode as dequantize_rows does
        deq = quant.dequantize_rows(serving, name, dim).astype(np.float64)
        offsets = np.array([0, 2, 5], np.int64)
        got = bag_kernel(dim, name, "i64", "sum")(serving, ids, offsets)
        want = np.stack([deq[ids[0:2]].sum(0), deq[ids[2:5]].sum(0)])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        # pack and merge move the rows byte for byte
        rows_out, _ = pack_kernel(dim, name)(serving, np.ones(rows, np.int64), ids)
        replica = quant.quantize_rows(np.zeros((rows, dim), np.float32), name)
        versions = np.zeros(rows, np.int64)
        merge_kernel(dim, name)(replica, versions, ids, rows_out, np.ones(len(ids), np.int64),
                                newest=1)
        np.testing.assert_array_equal(replica[np.unique(ids)], serving[np.unique(ids)])
        # and the language takes it
        assert parse_model(f"model m {{ table t {{ rows 4; dim 2; serving {name}; }} }}"
                           ).tables[0].serving == name
    with pytest.raises(ModelError, match="unknown serving layout"):
        parse_model(f"model m {{ table t {{ rows 4; dim 2; serving {entry.name}; }} }}")
    assert entry.name not in catalog.LAYOUTS


def test_a_scoped_layout_on_triton() -> None:
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "") in ("", "0") and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    dev = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    dim, rows = 11, 20
    rng = np.random.default_rng(5)
    for entry in THROWAWAY:
        with catalog.LAYOUTS.scoped(entry):
            w = rng.normal(0, 2, (rows, dim)).astype(np.float32)
            table = torch.from_numpy(w.copy()).to(dev)
            serving = torch.from_numpy(quant.quantize_rows(w, entry.name)).to(dev)
            ids = torch.tensor([0, 4, 4, rows - 1])
            grads = torch.from_numpy(rng.normal(0, 1, (4, dim)).astype(np.float32))
            update_kernel("sgd", dim, serving=entry.name, lr=0.1, target="triton")(
                table, ids.to(dev), grads.to(dev), serving=serving)
            table, serving = table.cpu(), serving.cpu()
            touched = np.unique(ids.numpy())
            want = quant.quantize_rows(table.numpy(), entry.name)
            got_deq = quant.dequantize_rows(serving.numpy(), entry.name, dim)[touched]
            want_deq = quant.dequantize_rows(want, entry.name, dim)[touched]
            # f32 division on the device vs numpy may move a code by one step
            step = affine_bound(table.numpy()[touched], entry.codec) * 2 + 1e-6
            assert (np.abs(got_deq - want_deq).max(axis=1) <= step).all()
            offsets = torch.tensor([0, 1, 4])
            cpu = bag_kernel(dim, entry.name, "i64", "sum")(serving, ids, offsets)
            gpu = bag_kernel(dim, entry.name, "i64", "sum", target="triton")(
                serving.to(dev), ids.to(dev), offsets.to(dev))
            torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)
