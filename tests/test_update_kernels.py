"""Differential tests: the fused update kernel against independent references.

Every test runs `ekko.update_kernel` on a table, its optimizer state, a
serving copy and version stamps, then checks each buffer against
tests/reference.py (torch.optim on the equivalent sparse gradient, numpy for
FBGEMM's rowwise Adagrad and the serving layouts). Rows the delta does not
touch must come back bit for bit.

Tolerances: f32 tables and all optimizer state rtol 1e-5; f16/bf16 tables one
ulp of the table dtype around the f32 reference (the reference is re-based on
the kernel's stored table each step so rounding does not compound); f32/f16/
bf16 serving rows exact (nearest-even of the stored row); int8/int4 rows
dequantize within half a quantization step (+ f16 slack) of the stored row.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

try:
    from reference import (
        Hyper, RefState, bf16_bits_to_f32, dequantize_fp8, dequantize_int4, dequantize_int8,
        f32_to_bf16_bits,
        from_kernel_state, init_state, neighbours, reference_step, round_to, serving_error_bound,
        serving_rows, stamp_versions, to_f32, to_kernel_state, ulp,
    )
except ImportError:  # tests/ became a package
    from tests.reference import (  # type: ignore[no-redef]
        Hyper, RefState, bf16_bits_to_f32, dequantize_fp8, dequantize_int4, dequantize_int8,
        f32_to_bf16_bits,
        from_kernel_state, init_state, neighbours, reference_step, round_to, serving_error_bound,
        serving_rows, stamp_versions, to_f32, to_kernel_state, ulp,
    )

from ekko.compiler.backend.spec import serving_row_bytes
from ekko.dialects import catalog

OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam")
TABLE_DTYPES = ("f32", "f16", "bf16")
SERVINGS = (None, *catalog.LAYOUTS)
HP = Hyper(lr=0.05, eps=1e-8, betas=(0.9, 0.99), lr_decay=0.01)


def _update_kernel_factory() -> Any:
    """The public name if the lead re-exported it, else the kernels module."""
    import ekko

    if hasattr(ekko, "update_kernel"):
        return ekko.update_kernel
    from ekko.kernels.build import update_kernel

    return update_kernel


@functools.lru_cache(maxsize=None)
def get_kernel(optimizer: str, dim: int, table_dtype: str, index_dtype: str, serving: str | None,
               hp: Hyper, sr: bool = False, threads: int | None = None,
               deterministic: bool = False) -> Any:
    """Compile once per configuration: tests share kernels across steps and cases."""
    return _update_kernel_factory()(
        optimizer, dim, table_dtype, index_dtype, serving, stochastic_rounding=sr,
        threads=threads, deterministic=deterministic, **hp.kwargs(optimizer))


# --------------------------------------------------------------------------
# buffers in the kernel's calling convention


def make_table(w: np.ndarray, dtype: str, use_torch: bool) -> Any:
    """A table holding the (already representable) f32 values `w`."""
    if dtype == "f32":
        a = w.astype(np.float32)
    elif dtype == "f16":
        a = w.astype(np.float16)
    else:
        a = f32_to_bf16_bits(w)
        if use_torch:
            return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy()) if use_torch else a.copy()


def make_serving(layout: str | None, rows: int, dim: int, use_torch: bool) -> Any:
    """A serving buffer filled with a sentinel, so untouched rows are checkable."""
    if layout is None:
        return None
    if catalog.layout(layout).quantized:
        a = np.full((rows, serving_row_bytes(layout, dim)), 0xA5, np.uint8)
    elif layout == "f32":
        a = np.full((rows, dim), -7.25, np.float32)
    elif layout == "f16":
        a = np.full((rows, dim), -7.25, np.float16)
    else:
        a = np.full((rows, dim), f32_to_bf16_bits(np.float32([-7.25]))[0], np.uint16)
        if use_torch:
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a) if use_torch else a


def as_numpy(x: Any) -> np.ndarray:
    """A numpy copy of a buffer; bf16 tensors come back as uint16 bits."""
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(np.uint16).copy()
        return x.numpy().copy()
    return np.array(x, copy=True)


def wrap_state(kstate: Any, use_torch: bool) -> Any:
    """The kernel-layout state as torch tensors when the case uses torch."""
    if kstate is None or not use_torch:
        return kstate
    if isinstance(kstate, tuple):
        return tuple(torch.from_numpy(s) for s in kstate)
    return torch.from_numpy(kstate)


# --------------------------------------------------------------------------
# one differential case


@dataclass(frozen=True)
class Case:
    """Everything that selects a kernel and shapes its inputs."""

    optimizer: str
    table_dtype: str = "f32"
    serving: str | None = None
    dim: int = 13
    rows: int = 40
    n_ids: int = 300
    index_dtype: str = "i64"
    hp: Hyper = HP
    threads: int | None = None
    deterministic: bool = False
    use_torch: bool = False
    steps: int = 3
    grad_scale: float = 1.0
    version_base: int | None = None  # None: version defaults to step; else version = base + step
    gathered: str | None = None  # "index" / "scaled": the delta passed by grad_index (+ scale)


def make_delta(case: Case, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Ids with duplicates that always hit rows 0 and rows-1, and f32 gradients."""
    n = case.n_ids
    ids = rng.integers(0, case.rows, n)
    if n >= 2:
        ids[rng.choice(n, 2, replace=False)] = [0, case.rows - 1]
    ids = ids.astype(np.int32 if case.index_dtype == "i32" else np.int64)
    scale = rng.uniform(0.05, 2.0, (n, 1)) * case.grad_scale
    grads = (rng.normal(size=(n, case.dim)) * scale).astype(np.float32)
    return ids, grads


def sgd_apply_atol(case: Case, ids: np.ndarray, ref: np.ndarray) -> float:
    """Extra f32 slack when SGD skips dedup (deterministic=False, see update_kernel).

    Each duplicate is then added to the stored row on its own, so rounding at
    the row's ulp accumulates like a random walk over the duplicate count.
    """
    if case.optimizer != "sgd" or case.deterministic or len(ids) == 0:
        return 0.0
    dups = np.bincount(np.asarray(ids, np.int64)).max()
    return float(4 * np.sqrt(dups) * np.spacing(np.float32(np.abs(ref).max())))


def check_table(got: np.ndarray, ref: np.ndarray, prev: np.ndarray, uniq: np.ndarray, dtype: str,
                extra_atol: float = 0.0) -> None:
    """Touched rows match the reference; untouched rows are bit-identical to before."""
    untouched = np.setdiff1d(np.arange(len(got)), uniq)
    np.testing.assert_array_equal(got[untouched].view(np.uint32), prev[untouched].view(np.uint32),
                                  err_msg="untouched table rows changed")
    if dtype == "f32":
        np.testing.assert_allclose(got[uniq], ref[uniq], rtol=1e-5, atol=1e-6 + extra_atol,
                                   err_msg="table rows")
        return
    err = np.abs(got[uniq] - ref[uniq])
    tol = ulp(ref[uniq], dtype) * 1.0001 + 1e-7
    bad = np.argwhere(err > tol)
    assert len(bad) == 0, (
        f"{len(bad)} {dtype} table values off by more than one ulp, e.g. row {uniq[bad[0][0]]}: "
        f"got {got[uniq][tuple(bad[0])]}, reference {ref[uniq][tuple(bad[0])]}")


def check_state(got: dict[str, np.ndarray], ref: RefState, prev: dict[str, np.ndarray], uniq: np.ndarray) -> None:
    """Optimizer state of touched rows matches; of untouched rows is unchanged."""
    untouched = np.setdiff1d(np.arange(len(next(iter(ref.buffers.values()), []))), uniq)
    for name, want in ref.buffers.items():
        np.testing.assert_array_equal(got[name][untouched], prev[name][untouched],
                                      err_msg=f"untouched state {name} changed")
        # f32 sums of many duplicates may round differently from the float64 reference:
        # allow 1e-5 of the buffer's scale on top of rtol
        scale = float(np.abs(want[uniq]).max()) if len(uniq) else 0.0
        np.testing.assert_allclose(got[name][uniq], want[uniq], rtol=1e-5, atol=1e-5 * scale + 1e-7,
                                   err_msg=f"state {name}")


def check_serving(got: np.ndarray, prev: np.ndarray, stored: np.ndarray, uniq: np.ndarray,
                  layout: str, dim: int) -> None:
    """Serving rows are re-made from the stored table rows; other rows untouched."""
    untouched = np.setdiff1d(np.arange(len(got)), uniq)
    np.testing.assert_array_equal(got[untouched], prev[untouched], err_msg="untouched serving rows changed")
    w = stored[uniq]
    if layout in ("f32", "f16", "bf16"):
        np.testing.assert_array_equal(got[uniq], serving_rows(w, layout), err_msg=f"{layout} serving rows")
        return
    if layout == "fp8":  # torch's float8_e4m3fn codes of row / (max|row| / 448), bit for bit
        np.testing.assert_array_equal(got[uniq], serving_rows(w, layout), err_msg="fp8 serving rows")
        err = np.abs(dequantize_fp8(got[uniq], dim)[0] - w).max(axis=1)
        assert (err <= serving_error_bound(w, layout)).all()
        return
    deq, scale, bias = (dequantize_int8 if layout == "int8" else dequantize_int4)(got[uniq], dim)
    mn, mx = w.min(axis=1), w.max(axis=1)
    if layout == "int8":
        np.testing.assert_allclose(bias, mn, rtol=1e-6, atol=1e-30, err_msg="int8 bias (row min)")
        np.testing.assert_allclose(scale, (mx - mn) / 255, rtol=1e-5, atol=1e-30, err_msg="int8 scale")
    else:
        # FBGEMM's int4 rows: bias = f16(min), scale = f16((max - bias) / 15), from the f16
        # bias, so a small range is not compared with (max - min) / 15, which differs by
        # up to half an f16 ulp of the min (hypothesis found one at 0.26%)
        bias16 = mn.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(bias, bias16, err_msg="int4 bias (f16 row min)")
        want = ((mx - bias16) / np.float32(15)).astype(np.float16).astype(np.float32)
        np.testing.assert_allclose(scale, want, rtol=2.0**-10, atol=2.0**-24, err_msg="int4 scale")
    err = np.abs(deq - w).max(axis=1)
    bound = serving_error_bound(w, layout)
    bad = np.flatnonzero(err > bound)
    assert len(bad) == 0, (f"{layout} row {uniq[bad[0]]} dequantizes {err[bad[0]]} away from the master row "
                           f"(bound {bound[bad[0]]})")


def make_gathered(case: Case, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """A gathered delta (a few source rows, each id naming one, scaled or not) and the
    rows it stands for, made in numpy (f32 products, as the kernel multiplies)."""
    ids, _ = make_delta(case, rng)
    sources = max(1, case.n_ids // 7)  # bags of ~7 ids: every source row used many times
    rows = (rng.normal(size=(sources, case.dim)) * case.grad_scale).astype(np.float32)
    index = rng.integers(0, sources, case.n_ids).astype(np.int64)
    scale = rng.uniform(-2.0, 2.0, case.n_ids).astype(np.float32) \
        if case.gathered == "scaled" else None
    grads = rows[index] if scale is None else rows[index] * scale[:, None]
    return ids, grads, dict(grads=rows, grad_index=index, grad_scale=scale)


def run_case(case: Case, seed: int = 0, deltas: list[tuple[np.ndarray, np.ndarray]] | None = None) -> None:
    """Run `case.steps` updates with state carried, checking every buffer after each."""
    rng = np.random.default_rng(seed)
    rows, dim = case.rows, case.dim
    w = round_to(rng.normal(size=(rows, dim)).astype(np.float32), case.table_dtype)
    ref_state = init_state(case.optimizer, rows, dim, rng)
    table = make_table(w, case.table_dtype, case.use_torch)
    kstate = wrap_state(to_kernel_state(ref_state), case.use_torch)
    serving = make_serving(case.serving, rows, dim, case.use_torch)
    versions = np.full(rows, -1, np.int64)
    if case.use_torch:
        versions = torch.from_numpy(versions)
    k = get_kernel(case.optimizer, dim, case.table_dtype, case.index_dtype, case.serving, case.hp,
                   threads=case.threads, deterministic=case.deterministic)
    ref_w = w
    for step in range(1, case.steps + 1):
        gather = None
        if case.gathered:
            ids, grads, gather = make_gathered(case, rng)
        else:
            ids, grads = deltas[step - 1] if deltas else make_delta(case, rng)
        prev_w = to_f32(as_numpy(table) if case.table_dtype == "bf16" else table, case.table_dtype)
        prev_state = {n: a.copy() for n, a in from_kernel_state(case.optimizer, kstate).items()}
        prev_serving = None if serving is None else as_numpy(serving)
        prev_versions = as_numpy(versions)
        if case.table_dtype != "f32":
            ref_w = prev_w  # re-base on the stored table: one rounding per step, not compounded
        ids_in, grads_in = (torch.from_numpy(ids), torch.from_numpy(grads)) if case.use_torch else (ids, grads)
        version = step if case.version_base is None else case.version_base + step
        extra = {} if case.version_base is None else {"version": version}
        if gather is not None:
            ids_in, grads_in = ids, gather.pop("grads")
            extra.update(gather)
        k(table, ids_in, grads_in, state=kstate, serving=serving, versions=versions, step=step, **extra)
        ref_w, uniq = reference_step(case.optimizer, ref_w, ids, grads, ref_state, step, case.hp)
        got_w = to_f32(as_numpy(table) if case.table_dtype == "bf16" else table, case.table_dtype)
        check_table(got_w, ref_w, prev_w, uniq, case.table_dtype, sgd_apply_atol(case, ids, ref_w))
        check_state(from_kernel_state(case.optimizer, kstate), ref_state, prev_state, uniq)
        if serving is not None:
            check_serving(as_numpy(serving), prev_serving, got_w, uniq, case.serving, dim)
        np.testing.assert_array_equal(as_numpy(versions), stamp_versions(prev_versions, uniq, version),
                                      err_msg="version stamps")


# --------------------------------------------------------------------------
# the matrix


@pytest.mark.parametrize("serving", SERVINGS, ids=str)
@pytest.mark.parametrize("table_dtype", TABLE_DTYPES)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_matrix(optimizer: str, table_dtype: str, serving: str | None) -> None:
    """Every optimizer x table dtype x serving layout, 3 steps, dim 13 (odd: vector tail, int4 pad)."""
    run_case(Case(optimizer, table_dtype, serving))


DIM_COMBOS = [("rowwise_adagrad", "f32", "int8"), ("adam", "bf16", "int4"),
              ("adagrad", "f16", "bf16"), ("sgd", "f32", "f16")]


@pytest.mark.parametrize("combo", DIM_COMBOS, ids=lambda c: "-".join(c))
@pytest.mark.parametrize("dim", [1, 3, 64, 128])
def test_dims(dim: int, combo: tuple[str, str, str]) -> None:
    """Row widths around vector widths, including dim 1 (constant quantized rows)."""
    opt, dtype, serving = combo
    run_case(Case(opt, dtype, serving, dim=dim, rows=30, n_ids=120, steps=2))


@pytest.mark.parametrize("combo", DIM_COMBOS[:2], ids=lambda c: "-".join(c))
def test_dim_1000(combo: tuple[str, str, str]) -> None:
    """A wide row: several vector blocks plus a tail."""
    opt, dtype, serving = combo
    run_case(Case(opt, dtype, serving, dim=1000, rows=20, n_ids=60, steps=2))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_heavy_duplicates(optimizer: str) -> None:
    """1000 ids over 7 rows: dedup must sum ~140 rows per id before the optimizer."""
    run_case(Case(optimizer, "f32", "int8", dim=64, rows=7, n_ids=1000, grad_scale=0.2))


@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad"])
def test_hot_rows_two_threads(optimizer: str) -> None:
    """200k ids on 7 rows with 2 threads: no lost updates when partitions share hot rows.

    Gradients are large enough that one lost duplicate (lr * |g| ~ 0.05) dwarfs the
    f32 rounding slack of applying ~28k duplicates one by one.
    """
    run_case(Case(optimizer, "f32", "int8", dim=64, rows=7, n_ids=200_000, threads=2, steps=1))


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adam", "adagrad"])
def test_many_buckets_hot_and_edge_ids(optimizer: str, threads: int) -> None:
    """A delta large enough that each partition's dedup splits it into many buckets
    (ranges of rows), with hot ids repeated thousands of times, ids 0 and rows-1, and a
    run of neighbouring ids that crowds one bucket: every row against the reference."""
    case = Case(optimizer, "f32", "int8", dim=24, rows=100_003, n_ids=60_000, threads=threads,
                steps=2)
    rng = np.random.default_rng(9)

    def delta() -> tuple[np.ndarray, np.ndarray]:
        ids = rng.integers(0, case.rows, case.n_ids)
        hot = rng.random(case.n_ids) < 0.4
        ids[hot] = rng.choice([0, case.rows - 1, 17, 50_000, 99_999], int(hot.sum()))
        ids[:3000] = np.arange(70_000, 73_000)  # one range, each id once
        grads = rng.normal(0, 0.3, (case.n_ids, case.dim)).astype(np.float32)
        return ids.astype(np.int64), grads

    run_case(case, deltas=[delta(), delta()])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adam"])
def test_hashed_buckets_and_a_full_hash_table(optimizer: str, threads: int) -> None:
    """Few ids in a large table: a bucket spans more rows than the scratch table
    holds, so its ids are hashed, not mapped directly. The second delta crowds
    20,000 ids into rows [0, 30,000) of one bucket: the hash table fills, the
    runtime doubles it and reruns. Both against the reference, ids 0 and rows-1."""
    case = Case(optimizer, "f32", "int8", dim=16, rows=1_000_003, n_ids=3000, threads=threads,
                steps=2)
    rng = np.random.default_rng(11)

    def delta(high: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        ids = rng.integers(0, high, n)
        ids[:4] = [0, case.rows - 1, 0, 5]
        return ids.astype(np.int64), rng.normal(0, 0.3, (n, case.dim)).astype(np.float32)

    run_case(case, deltas=[delta(case.rows, 3000), delta(30_000, 20_000)])


@pytest.mark.parametrize("index_dtype", ["i32", "i64"])
@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adam"])
def test_index_dtypes(optimizer: str, index_dtype: str) -> None:
    """i32 and i64 ids, with the first and last row always in the delta; explicit versions."""
    run_case(Case(optimizer, "f32", "int4", dim=16, rows=1000, n_ids=500, index_dtype=index_dtype,
                  version_base=2**40))


@pytest.mark.parametrize("table_dtype", TABLE_DTYPES)
def test_torch_tensors(table_dtype: str) -> None:
    """Torch CPU tensors in place of numpy arrays (bf16 as torch.bfloat16)."""
    serving = {"f32": "int8", "f16": "f16", "bf16": "bf16"}[table_dtype]
    run_case(Case("adam", table_dtype, serving, use_torch=True))
    run_case(Case("rowwise_adagrad", table_dtype, "int4", use_torch=True))


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("dim", [13, 64])
def test_clip_and_weight_decay(optimizer: str, dim: int) -> None:
    """clip_value, then max_norm (some rows above it, some below), then weight decay."""
    hp = replace(HP, clip_value=0.8, max_norm=1.5, weight_decay=0.03)
    run_case(Case(optimizer, "f32", "int8", dim=dim, hp=hp, grad_scale=0.5))


@pytest.mark.parametrize("hp", [replace(HP, max_norm=0.5), replace(HP, clip_value=0.1),
                                replace(HP, weight_decay=0.1)], ids=["max_norm", "clip_value", "weight_decay"])
def test_single_transforms(hp: Hyper) -> None:
    """Each gradient transform alone, on a low-precision table."""
    run_case(Case("adagrad", "bf16", "int4", dim=24, hp=hp))


@pytest.mark.parametrize("gathered", ["index", "scaled"])
@pytest.mark.parametrize("combo", [("f32", None), ("f32", "int8"), ("f16", "f16"), ("bf16", "int4")])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_gathered_deltas(optimizer: str, combo: tuple[str, str | None], gathered: str) -> None:
    """grads[grad_index[p]] (* grad_scale[p]) as delta row p: the same update as the rows
    themselves, against the reference, with heavy duplicates and the edge ids."""
    table_dtype, serving = combo
    run_case(Case(optimizer, table_dtype, serving, dim=13, rows=40, n_ids=300,
                  gathered=gathered))


@pytest.mark.parametrize("threads,deterministic", [(1, False), (2, False), (2, True)])
@pytest.mark.parametrize("dim", [1, 64, 130])
def test_gathered_deltas_threads_and_dims(dim: int, threads: int, deterministic: bool) -> None:
    """The raw SGD path (no dedup) and the dedup path, on one and two partitions."""
    for optimizer in ("sgd", "rowwise_adagrad"):
        run_case(Case(optimizer, dim=dim, rows=3000, n_ids=5000, threads=threads,
                      deterministic=deterministic, gathered="scaled"))


def test_gathered_delta_is_bit_identical_to_its_rows() -> None:
    """Not only within tolerance: the kernel reads the same f32 values either way."""
    rng = np.random.default_rng(5)
    for optimizer in OPTIMIZERS:
        k = get_kernel(optimizer, 24, "f32", "i64", "int8", HP)
        case = Case(optimizer, dim=24, rows=50, n_ids=400, gathered="scaled")
        ids, grads, gather = make_gathered(case, rng)
        w0 = rng.normal(size=(50, 24)).astype(np.float32)
        out = []
        for args in ({"grads": grads}, gather):
            w, st = w0.copy(), to_kernel_state(init_state(optimizer, 50, 24))
            srv, ver = make_serving("int8", 50, 24, False), np.zeros(50, np.int64)
            k(w, ids, state=st, serving=srv, versions=ver, step=1, **args)
            out.append((w, srv, ver))
        for a, b in zip(*out):
            np.testing.assert_array_equal(a, b, err_msg=optimizer)


@pytest.mark.parametrize("bad,why", [
    (dict(grad_index=np.array([0, 3])), r"grad_index\[1\] = 3 is out of range \[0, 3\)"),
    (dict(grad_index=np.array([-1, 0])), r"grad_index\[0\] = -1 is out of range"),
    (dict(grad_index=np.array([0, 1], np.int32)), "grad_index must have dtype int64"),
    (dict(grad_index=np.array([0])), r"grad_index must have shape \(2,\)"),
    (dict(grad_index=np.array([0, 1]), grad_scale=np.ones(3, np.float32)),
     r"grad_scale must have shape \(2,\)"),
    (dict(grad_index=np.array([0, 1]), grad_scale=np.ones(2)), "grad_scale must have dtype float32"),
    (dict(grad_scale=np.ones(2, np.float32)), "grad_scale scales a gathered delta"),
    (dict(grad_index=np.array([0, 1]), grad_scale=np.array([1, np.inf], np.float32)),
     "non-finite gradient .* in delta row 1"),
    (dict(grad_index=np.array([0, 2]), grad_scale=np.array([1, 1e30], np.float32)),
     "non-finite gradient .* in delta row 1"),  # finite row x finite scale = inf
    (dict(grad_index=np.array([1, 1]), grad_scale=np.array([0.5, 2], np.float32), nan=True),
     "non-finite gradient .* in delta row 0"),  # the source row itself holds a NaN
])
def test_bad_gathered_delta_is_refused_untouched(bad: dict, why: str) -> None:
    from ekko.kernels.errors import UpdateError

    bad = dict(bad)
    rows = np.array([[1, 2, 3, 4], [1, 1, 1, 1], [1e10, 1, 1, 1]], np.float32)
    if bad.pop("nan", False):
        rows[1, 0] = np.nan
    for optimizer, deterministic in (("sgd", False), ("sgd", True), ("rowwise_adagrad", False)):
        k = get_kernel(optimizer, 4, "f32", "i64", "int8", HP, deterministic=deterministic)
        w = np.ones((10, 4), np.float32)
        st = to_kernel_state(init_state(optimizer, 10, 4))
        srv, ver = make_serving("int8", 10, 4, False), np.zeros(10, np.int64)
        before = [w.copy(), srv.copy(), ver.copy()]
        with pytest.raises(UpdateError, match=why):
            k(w, np.array([3, 9]), rows, state=st, serving=srv, versions=ver, step=1, **bad)
        for a, b in zip((w, srv, ver), before):
            np.testing.assert_array_equal(a, b)


def test_empty_delta() -> None:
    """No ids: every buffer stays bit for bit (no stamp, no state change)."""
    case = Case("adam", "f16", "int8", dim=13)
    empty = (np.empty(0, np.int64), np.empty((0, 13), np.float32))
    run_case(case, deltas=[empty] * 3)


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("optimizer", ["sgd", "rowwise_adagrad", "adam"])
def test_threads(optimizer: str, deterministic: bool) -> None:
    """threads=2 matches threads=1 (bitwise when deterministic) and the reference."""
    base = Case(optimizer, "f32", "int8", dim=64, rows=500, n_ids=5000, deterministic=deterministic, steps=1)
    outs = []
    for threads in (1, 2):
        case = replace(base, threads=threads)
        run_case(case, seed=7)
        outs.append(_final_table(case, seed=7))
    if deterministic:
        np.testing.assert_array_equal(outs[0].view(np.uint32), outs[1].view(np.uint32))
    else:
        np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)


def _final_table(case: Case, seed: int) -> np.ndarray:
    """The table after one update of `case` (same data as run_case with this seed)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(case.rows, case.dim)).astype(np.float32)
    state = to_kernel_state(init_state(case.optimizer, case.rows, case.dim, rng))
    ids, grads = make_delta(case, rng)
    k = get_kernel(case.optimizer, case.dim, case.table_dtype, case.index_dtype, case.serving, case.hp,
                   threads=case.threads, deterministic=case.deterministic)
    serving = make_serving(case.serving, case.rows, case.dim, False)
    k(w, ids, grads, state=state, serving=serving, versions=np.zeros(case.rows, np.int64), step=1)
    return w


# --------------------------------------------------------------------------
# stochastic rounding


def _sr_setup(dtype: str, rows: int = 32, dim: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """SGD inputs whose exact f32 results fall strictly between two dtype values."""
    rng = np.random.default_rng(3)
    w0 = round_to(rng.uniform(0.5, 2.0, (rows, dim)).astype(np.float32), dtype)
    ids = np.arange(rows, dtype=np.int64)
    grads = rng.normal(size=(rows, dim)).astype(np.float32)
    exact = (w0 - np.float32(HP.lr) * grads).astype(np.float32)
    return w0, ids, grads, exact


def _sr_run(dtype: str, w0: np.ndarray, ids: np.ndarray, grads: np.ndarray, seed: int) -> np.ndarray:
    """One SGD update with stochastic rounding from w0; the stored table as f32."""
    k = get_kernel("sgd", w0.shape[1], dtype, "i64", None, HP, sr=True)
    table = make_table(w0, dtype, False)
    k(table, ids, grads, step=1, seed=seed)
    return to_f32(table, dtype)


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_stochastic_rounding_neighbours(dtype: str) -> None:
    """Each stored value is one of the two representable values around the exact one."""
    w0, ids, grads, exact = _sr_setup(dtype)
    slack = 2 * np.spacing(np.abs(exact))  # the kernel's f32 math may differ by an f32 ulp
    lo_a, hi_a = neighbours(exact - slack, dtype)
    lo_b, hi_b = neighbours(exact + slack, dtype)
    for seed in range(5):
        got = _sr_run(dtype, w0, ids, grads, seed)
        ok = (got == lo_a) | (got == hi_a) | (got == lo_b) | (got == hi_b)
        assert ok.all(), f"seed {seed}: {int((~ok).sum())} values are not a neighbour of the exact result"
    np.testing.assert_array_equal(_sr_run(dtype, w0, ids, grads, 11), _sr_run(dtype, w0, ids, grads, 11),
                                  err_msg="same seed must round the same way")


@pytest.mark.parametrize("dtype", ["bf16", "f16"])
def test_stochastic_rounding_unbiased(dtype: str) -> None:
    """Over many seeds the mean stored value approaches the exact f32 result."""
    w0, ids, grads, exact = _sr_setup(dtype, rows=8, dim=32)
    n = 256
    runs = np.stack([_sr_run(dtype, w0, ids, grads, seed) for seed in range(n)])
    gap = ulp(exact, dtype)
    err = (runs.mean(axis=0) - exact) / gap  # in ulps
    assert (runs.min(axis=0) != runs.max(axis=0)).mean() > 0.5, "seeds barely change the rounding"
    # per value: a Bernoulli mean has std <= 0.5/sqrt(n) ulp; allow 6 sigma
    assert np.abs(err).max() < 6 * 0.5 / np.sqrt(n) + 1e-3, f"biased rounding: worst {np.abs(err).max():.3f} ulp"
    # overall: no systematic drift (truncation would give ~ -0.5 ulp)
    assert abs(err.mean()) < 0.02, f"mean rounding bias {err.mean():.4f} ulp"


# --------------------------------------------------------------------------
# errors


def test_out_of_range_id_rejected_untouched() -> None:
    """A bad id raises UpdateError and leaves table, state, serving and versions as they were."""
    from ekko.kernels.errors import UpdateError

    rows, dim = 10, 8
    k = get_kernel("rowwise_adagrad", dim, "f32", "i64", "int8", HP)
    table = np.ones((rows, dim), np.float32)
    state = np.zeros(rows, np.float32)
    serving = make_serving("int8", rows, dim, False)
    versions = np.zeros(rows, np.int64)
    before = [a.copy() for a in (table, state, serving, versions)]
    for bad in ([1, rows], [-1, 2]):
        ids = np.array(bad, np.int64)
        with pytest.raises(UpdateError):
            k(table, ids, np.ones((2, dim), np.float32), state=state, serving=serving, versions=versions, step=1)
        for got, want in zip((table, state, serving, versions), before):
            np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------
# generated


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    optimizer=st.sampled_from(OPTIMIZERS),
    table_dtype=st.sampled_from(TABLE_DTYPES),
    serving=st.sampled_from(SERVINGS),
    dim=st.sampled_from([1, 2, 5, 8, 17]),
    rows=st.integers(1, 40),
    n_ids=st.integers(0, 150),
    index_dtype=st.sampled_from(["i32", "i64"]),
    clip=st.sampled_from([None, 0.3]),
    max_norm=st.sampled_from([None, 1.0]),
    wd=st.sampled_from([0.0, 0.02]),
    seed=st.integers(0, 2**16),
)
def test_generated(optimizer: str, table_dtype: str, serving: str | None, dim: int, rows: int, n_ids: int,
                   index_dtype: str, clip: float | None, max_norm: float | None, wd: float, seed: int) -> None:
    """Random shapes, deltas and transforms; two steps with state carried."""
    hp = replace(HP, clip_value=clip, max_norm=max_norm, weight_decay=wd)
    run_case(Case(optimizer, table_dtype, serving, dim=dim, rows=rows, n_ids=n_ids,
                  index_dtype=index_dtype, hp=hp, steps=2), seed=seed)


# --------------------------------------------------------------------------
# the reference itself


def test_reference_int_layouts_roundtrip() -> None:
    """The reference quantizers meet their own error bounds (guards the oracle)."""
    w = np.random.default_rng(1).normal(size=(50, 13)).astype(np.float32)
    for layout, deq in (("int8", dequantize_int8), ("int4", dequantize_int4)):
        buf = serving_rows(w, layout)
        assert buf.shape == (50, serving_row_bytes(layout, 13))
        vals = deq(buf, 13)[0]
        assert (np.abs(vals - w).max(axis=1) <= serving_error_bound(w, layout)).all()
    bits = f32_to_bf16_bits(np.float32([1.00390625, 1.01171875]))  # two ties: to even
    np.testing.assert_array_equal(bf16_bits_to_f32(bits), np.float32([1.0, 1.015625]))
