"""The fp8 serving layout against torch.float8_e4m3fn, on every path a layout has.

A row is dim OCP E4M3 codes (torch.float8_e4m3fn bits, nearest-even) then one
little-endian f32 scale = max|row| / 448; value = code * scale. The reference
is torch's own conversion: `(row / scale).to(torch.float8_e4m3fn)` must give
ekko's codes bit for bit and `codes.view(float8).float() * scale` its values.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from ekko.dialects import catalog
from ekko.kernels import quant
from ekko.kernels.build import bag_kernel
from ekko.kernels.sync import SyncError, merge_kernel, pack_kernel
from ekko.kernels.build import update_kernel

try:
    from reference import dequantize_fp8, quantize_fp8
except ImportError:  # pragma: no cover - run from the repository root
    from tests.reference import dequantize_fp8, quantize_fp8  # type: ignore[no-redef]

DIMS = (1, 3, 17, 64, 129)
F8_MAX = 448.0


def triton_device() -> str:
    """'cuda' on a GPU with TRITON_INTERPRET unset, else Triton's interpreter on CPU tensors."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "") in ("", "0") and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def rows_of(kind: str, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Rows that reach every corner of E4M3: normals, ties, subnormals, zeros, f32 extremes."""
    n = 24
    if kind == "random":
        return rng.normal(0, 3, (n, dim)).astype(np.float32)
    if kind == "zero":
        return np.zeros((n, dim), np.float32)
    if kind == "huge":  # one huge value beside small ones: the small ones go subnormal or zero
        x = rng.normal(0, 1, (n, dim)).astype(np.float32)
        x[:, 0] = rng.choice([3e38, -3e38, 1e30, 6e4], n).astype(np.float32)
        return x
    if kind == "tiny":  # f32 subnormals and near-subnormal rows: the scale underflows
        x = rng.normal(0, 1, (n, dim)).astype(np.float32) * np.float32(1e-40)
        x[: n // 2] *= np.float32(1e3)
        return x
    if kind == "subnormal":  # values whose codes are E4M3 subnormals, and exact ties
        x = np.zeros((n, dim), np.float32)
        x[:, 0] = F8_MAX  # scale 1: codes are the values themselves
        steps = rng.integers(-16, 17, (n, dim)).astype(np.float32) * np.float32(2.0 ** -10)
        x[:, 1:] = steps[:, 1:]  # multiples of half the subnormal step: ties to even
        return x
    raise ValueError(kind)


KINDS = ("random", "zero", "huge", "tiny", "subnormal")


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("kind", KINDS)
def test_quantize_equals_torch_float8(kind: str, dim: int) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{kind}{dim}".encode()))
    x = rows_of(kind, dim, rng)
    q = quant.quantize_rows(x, "fp8")
    assert q.dtype == np.uint8 and q.shape == (len(x), catalog.row_bytes("fp8", dim)) == (len(x), dim + 4)
    np.testing.assert_array_equal(q, quantize_fp8(x))
    want, scale = dequantize_fp8(q, dim)
    np.testing.assert_array_equal(scale, (np.abs(x).max(axis=1) / np.float32(448)).astype(np.float32))
    got = quant.dequantize_rows(q, "fp8", dim)
    np.testing.assert_array_equal(got, want)
    assert np.isfinite(got).all() and np.isfinite(q[:, dim:].copy().view(np.float32)).all()
    if kind == "zero":
        assert not q.any()


def test_every_code_decodes_as_torch() -> None:
    codes = np.arange(256, dtype=np.uint8)
    mf = catalog.MINIFLOATS["e4m3"]
    want = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(quant.minifloat_decode(codes, mf), want)  # NaN == NaN here
    values = np.concatenate([want[np.isfinite(want)], [500.0, -1e9, 465.0, 463.9]]).astype(np.float32)
    ref = torch.from_numpy(values).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    np.testing.assert_array_equal(quant.minifloat_encode(values, mf), ref)  # saturates to 448


def _update(dim: int, table_dtype: str = "f32", target: str = "llvm", seed: int = 0):
    """One SGD step that re-makes fp8 serving rows: (stored master rows, serving rows, ids)."""
    rng = np.random.default_rng(seed)
    rows = 40
    w = rows_of("random", dim, rng)[:1].repeat(rows, 0) * rng.uniform(0.1, 10, (rows, 1))
    w[5] = 0.0  # an all-zero row stays all zero
    w[6, 0] = 6e4 if table_dtype == "f16" else 2e38  # huge: the others go subnormal or zero
    ids = np.array([0, 3, 5, 6, 7, rows - 1, 3], np.int64)
    grads = rng.normal(0, 1, (len(ids), dim)).astype(np.float32)
    grads[np.isin(ids, [5, 6])] = 0.0
    kernel = update_kernel("sgd", dim, table_dtype, serving="fp8", lr=0.1, target=target)
    if target == "triton":
        dev = triton_device()
        dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[table_dtype]
        table = torch.from_numpy(w).to(dtype).to(dev)
        serving = torch.from_numpy(quant.quantize_rows(w, "fp8")).to(dev)
        kernel(table, torch.from_numpy(ids).to(dev), torch.from_numpy(grads).to(dev),
               serving=serving)
        return table.float().cpu().numpy(), serving.cpu().numpy(), np.unique(ids)
    table = quant.quantize_rows(w, table_dtype)
    serving = quant.quantize_rows(w, "fp8")
    kernel(table, ids, grads, serving=serving)
    return quant.dequantize_rows(table, table_dtype, dim), serving, np.unique(ids)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("table_dtype", ("f32", "f16", "bf16"))
def test_update_refreshes_fp8_rows_bit_for_bit(table_dtype: str, dim: int) -> None:
    stored, serving, touched = _update(dim, table_dtype, seed=dim)
    np.testing.assert_array_equal(serving[touched], quantize_fp8(stored[touched]))
    assert not serving[5].any()


def test_rows_at_f32_max_stay_finite() -> None:
    """max|row| / 448 * 448 never overflows f32, so a finite master row always has a
    finite fp8 row (the update never refuses one); its codes saturate at +-448."""
    top = np.finfo(np.float32).max
    x = np.array([[top, -top, 1.0, 0.0]], np.float32)
    q = quant.quantize_rows(x, "fp8")
    np.testing.assert_array_equal(q, quantize_fp8(x))
    assert q[0, 0] == 0x7E and q[0, 1] == 0xFE  # +-448
    assert np.isfinite(quant.dequantize_rows(q, "fp8", 4)).all()
    table = x.repeat(3, 0)
    serving = np.zeros((3, 8), np.uint8)
    update_kernel("sgd", 4, serving="fp8", lr=1e-30)(table, np.array([0, 2]),
                                                       np.ones((2, 4), np.float32), serving=serving)
    np.testing.assert_array_equal(serving[[0, 2]], quantize_fp8(table[[0, 2]]))


def _pool_want(deq: np.ndarray, ids, offsets, mode: str, weights) -> np.ndarray:
    t = torch.from_numpy(deq.astype(np.float64))
    i = torch.from_numpy(ids.astype(np.int64))
    if mode == "none":
        return torch.nn.functional.embedding(i, t).numpy()
    return torch.nn.functional.embedding_bag(
        i, t, torch.from_numpy(offsets.astype(np.int64)), mode=mode, include_last_offset=True,
        per_sample_weights=None if weights is None else torch.from_numpy(weights.astype(np.float64)),
    ).numpy()


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("mode,weighted", (("sum", False), ("sum", True), ("mean", False),
                                           ("none", False)))
def test_pooled_lookups_equal_torch_on_the_decoded_rows(mode: str, weighted: bool, dim: int) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{mode}{weighted}{dim}".encode()))
    rows = 50
    x = np.concatenate([rows_of("random", dim, rng), rows_of("subnormal", dim, rng),
                        rows_of("zero", dim, rng)[:2]])[:rows]
    q = quantize_fp8(x)
    deq, _ = dequantize_fp8(q, dim)
    ids = rng.integers(0, rows, 60).astype(np.int64)
    offsets = np.array([0, 5, 5, 31, 60], np.int64)
    weights = rng.uniform(-2, 2, len(ids)).astype(np.float32) if weighted else None
    want = _pool_want(deq, ids, offsets, mode, weights)
    got = bag_kernel(dim, "fp8", "i64", mode, weighted)(q, ids, *(() if mode == "none" else
                                                                  (offsets, weights)))
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale * 30)


def _packet(rng: np.random.Generator, n: int, rows: int, dim: int):
    ids = rng.integers(0, rows, n).astype(np.int64)
    return ids, quantize_fp8(rows_of("random", dim, rng)[:1].repeat(n, 0) * 1.5 + 0.25), \
        rng.integers(1, 4, n).astype(np.int64)


@pytest.mark.parametrize("dim", (3, 17))
def test_pack_and_merge_refuse_what_decodes_to_non_finite(dim: int) -> None:
    rng = np.random.default_rng(dim)
    rows = 30
    serving = quantize_fp8(rows_of("random", dim, rng)[:1].repeat(rows, 0))
    versions = np.zeros(rows, np.int64)
    merge = merge_kernel(dim, "fp8")
    ids, prow, pver = _packet(rng, 10, rows, dim)
    before = serving.tobytes()

    def refused(bad_rows: np.ndarray, match: str) -> None:
        with pytest.raises(SyncError, match=match):
            merge(serving, versions, ids, bad_rows, pver, newest=3)
        assert serving.tobytes() == before and not versions.any()

    nan_code = prow.copy()
    nan_code[4, dim - 1] = 0x7F  # E4M3's NaN
    refused(nan_code, "non-finite")
    inf_scale = prow.copy()
    inf_scale[7, dim:] = np.frombuffer(np.float32(np.inf).tobytes(), np.uint8)
    refused(inf_scale, "non-finite")
    huge = prow.copy()  # a finite scale whose largest code (448) decodes past f32's max
    huge[2, dim:] = np.frombuffer(np.float32(1e37).tobytes(), np.uint8)
    huge[2, 0] = 0x7E
    refused(huge, "decodes to a non-finite value")
    want, want_versions = serving.copy(), versions.copy()
    for i, r in enumerate(ids):  # newest wins, ties to the larger bytes
        v = int(pver[i])
        if v > want_versions[r] or (v == want_versions[r] and prow[i].tobytes() > want[r].tobytes()):
            want[r], want_versions[r] = prow[i], v
    assert merge(serving, versions, ids, prow, pver, newest=3) > 0
    assert serving.tobytes() == want.tobytes() and np.array_equal(versions, want_versions)
    got_rows, got_versions = pack_kernel(dim, "fp8")(serving, versions, ids)
    np.testing.assert_array_equal(got_rows, serving[ids])
    np.testing.assert_array_equal(got_versions, versions[ids])


def test_serving_fp8_in_the_language_and_cli(tmp_path: Path) -> None:
    from ekko.compiler.frontend import parse_model
    from ekko.cli import main

    source = ("model m { table t { rows 100; dim 9; serving fp8; optimizer sgd(lr=0.1); }\n"
              "  feature f -> t pooling sum; }\n")
    model = parse_model(source)
    assert model.tables[0].serving == "fp8"
    path = tmp_path / "m.ekko"
    path.write_text(source)
    assert main(["run", str(path), "--steps", "3", "--batch", "64", "-q"]) == 0
    path.write_text(source.replace("serving fp8", "serving int8"))
    assert main(["run", str(path), "--steps", "3", "--batch", "64", "-q", "--serving", "fp8"]) == 0


def test_engine_in_process_keeps_fp8_replicas_equal(tmp_path: Path) -> None:
    import ekko

    path = tmp_path / "m.ekko"
    path.write_text("model m { table t { rows 200; dim 17; serving fp8; "
                    "optimizer rowwise_adagrad(lr=0.05); }\n  feature f -> t pooling mean; }\n")
    m = ekko.compile_model(path)
    rng = np.random.default_rng(4)
    with ekko.Engine(m, replicas=2) as engine:
        for _ in range(10):
            ids = rng.integers(0, 200, 64)
            engine.step("t", ids, rng.normal(0, 0.1, (64, 17)).astype(np.float32))
        engine.flush()
        primary = engine.primary.serving("t")
        for r in engine.replicas:
            assert r.serving("t").tobytes() == primary.tobytes()
        master = engine.primary.table("t").buf.master
        np.testing.assert_array_equal(primary, quantize_fp8(master))


def test_triton_refresh_and_lookups_equal_the_llvm_backend() -> None:
    dev = triton_device()
    for dim in (3, 17):
        stored, serving, touched = _update(dim, "f32", target="triton", seed=dim)
        np.testing.assert_array_equal(serving[touched], quantize_fp8(stored[touched]))
        rng = np.random.default_rng(dim)
        q = quantize_fp8(np.concatenate([rows_of("random", dim, rng), rows_of("subnormal", dim, rng)]))
        ids = torch.from_numpy(rng.integers(0, len(q), 30))
        offsets = torch.tensor([0, 4, 4, 30])
        weights = torch.from_numpy(rng.uniform(-1, 1, 30).astype(np.float32))
        for mode, w in (("sum", weights), ("mean", None), ("none", None)):
            args = (ids,) if mode == "none" else (ids, offsets, w)
            cpu = bag_kernel(dim, "fp8", "i64", mode, w is not None)(torch.from_numpy(q), *args)
            on = [None if a is None else a.to(dev) for a in (torch.from_numpy(q), *args)]
            gpu = bag_kernel(dim, "fp8", "i64", mode, w is not None, target="triton")(*on)
            torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)
