"""The Triton target against the LLVM backend and independent references.

On a machine without a GPU the kernels run in Triton's interpreter on CPU
tensors (TRITON_INTERPRET=1, set here before triton is imported); with a
CUDA device and TRITON_INTERPRET unset they run on the GPU
(`bash benchmarks/gpu.sh`). Shapes are small and blocks large: each
interpreted program instance costs milliseconds.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "") in ("", "0") and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
pytest.importorskip("triton")

import ekko  # noqa: E402
from ekko.dialects import catalog  # noqa: E402
from ekko.kernels import quant  # noqa: E402
from ekko.kernels.errors import EkkoError  # noqa: E402
from ekko.kernels.build import bag_kernel  # noqa: E402
from ekko.kernels.build import update_kernel  # noqa: E402

try:
    from reference import (Hyper, RefState, bf16_bits_to_f32, reference_step,
                           serving_error_bound, serving_rows)
except ImportError:  # pragma: no cover - run from the repository root
    from tests.reference import (Hyper, RefState, bf16_bits_to_f32,  # type: ignore[no-redef]
                                 reference_step, serving_error_bound, serving_rows)

TORCH = {name: getattr(torch, entry.storage.torch_dtypes[0])
         for name, entry in catalog.LAYOUTS.items()}
OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam", "rmsprop", "ftrl")
SERVING = (None, *catalog.LAYOUTS)
HP = Hyper(lr=0.05, eps=1e-8)
EXTRA = {"rmsprop": {"alpha": 0.9}, "ftrl": {"l1": 0.05, "l2": 0.01}}


@pytest.fixture()
def user_optimizer():
    """A user-defined optimizer that touches most region ops (exp, log, max, where);
    taken out of the catalog again afterwards, so other tests see only theirs."""
    with catalog.OPTIMIZERS.scoped():
        @ekko.optimizer(state=("acc",), rowwise_state=("peak",), hyper={"lr": 0.05}, replace=True)
        def triton_test_opt(g, w, acc, peak, *, lr, dim):
            acc = 0.9 * acc + 0.1 * g * g
            peak = ekko.rowmath.maximum(peak, ekko.rowmath.row_mean(abs(g), dim))
            step = lr * g / (ekko.rowmath.sqrt(acc) + 1e-6) * ekko.rowmath.exp(-peak)
            shrink = ekko.rowmath.log(1.0 + peak)
            return ekko.rowmath.where(w > 0.0, w - step, w - step * shrink), acc, peak

        yield triton_test_opt.name


def kernels(optimizer: str, dim: int, table_dtype: str = "f32", serving: str | None = None,
            **kw):
    """(LLVM kernel, Triton kernel) for the same request."""
    hyper = dict(HP.kwargs(optimizer), **EXTRA.get(optimizer, {}), **kw)
    cpu = update_kernel(optimizer, dim, table_dtype, serving=serving, **hyper)
    gpu = update_kernel(optimizer, dim, table_dtype, serving=serving, target="triton", **hyper)
    return cpu, gpu


def make_buffers(optimizer: str, rows: int, dim: int, table_dtype: str, serving: str | None,
                 rng: np.random.Generator) -> dict:
    """Fresh CPU buffers: table, state (non-trivial), serving copy, versions, seq words."""
    w = rng.normal(0, 1, (rows, dim)).astype(np.float32)
    opt = catalog.optimizer(optimizer)
    state = [torch.from_numpy(rng.uniform(0.01, 1.0, opt.state_shape(s.name, rows, dim))
                              .astype(np.float32)) for s in opt.states]
    srv = None
    if serving is not None:
        q = quant.quantize_rows(w, serving) if catalog.layout(serving).quantized else w
        srv = torch.from_numpy(np.ascontiguousarray(q)).to(TORCH[serving])
    return {"table": torch.from_numpy(w).to(TORCH[table_dtype]), "state": state, "serving": srv,
            "versions": torch.zeros(rows, dtype=torch.int64),
            "seq": torch.zeros(rows, dtype=torch.int32)}


def clone(bufs: dict, device: str = "cpu") -> dict:
    def c(x):
        return None if x is None else x.clone().to(device)

    return {k: ([c(s) for s in v] if k == "state" else c(v)) for k, v in bufs.items()}


def run(kernel, bufs: dict, ids: torch.Tensor, grads: torch.Tensor, device: str = "cpu",
        **kw) -> dict:
    """Apply one delta to copies of `bufs` on `device`; the results back on the CPU."""
    b = clone(bufs, device)
    st = b["state"]
    kernel(b["table"], ids.to(device), grads.to(device),
           state=None if not st else (st[0] if len(st) == 1 else tuple(st)),
           serving=b["serving"], versions=b["versions"], seq=b["seq"], **kw)
    return clone(b)


def delta(rng: np.random.Generator, rows: int, dim: int, n: int, distinct: int | None = None,
          index_dtype: str = "i64") -> tuple[torch.Tensor, torch.Tensor]:
    """n ids (the edge ids 0 and rows-1 among them), optionally from few distinct ids."""
    pool = rng.choice(rows, size=distinct, replace=False) if distinct else np.arange(rows)
    ids = rng.choice(pool, size=n)
    ids[0], ids[-1] = 0, rows - 1
    dt = torch.int32 if index_dtype == "i32" else torch.int64
    return (torch.from_numpy(ids).to(dt),
            torch.from_numpy(rng.normal(0, 1, (n, dim)).astype(np.float32)))


def as_f32(x: torch.Tensor) -> torch.Tensor:
    return x.float()


def assert_same_update(a: dict, b: dict, table_dtype: str, serving: str | None, dim: int) -> None:
    """Two backends' results agree (up to f32 rounding order, one ulp of the table dtype)."""
    tol = {"f32": (2e-5, 2e-6), "f16": (1e-3, 1e-5), "bf16": (8e-3, 1e-5)}[table_dtype]
    torch.testing.assert_close(as_f32(a["table"]), as_f32(b["table"]), rtol=tol[0], atol=tol[1])
    for x, y in zip(a["state"], b["state"]):
        torch.testing.assert_close(x, y, rtol=2e-5, atol=2e-6)
    assert torch.equal(a["versions"], b["versions"])
    # the same rows written, each left even (SGD without dedup writes a row once per occurrence)
    assert torch.equal(a["seq"] > 0, b["seq"] > 0) and (a["seq"] % 2 == 0).all()
    if serving is not None and catalog.layout(serving).quantized:
        da = quant.dequantize_rows(a["serving"].numpy(), serving, dim)
        db = quant.dequantize_rows(b["serving"].numpy(), serving, dim)
        step = np.abs(da - db).max(initial=0.0)
        w = as_f32(a["table"]).numpy()
        bound = serving_error_bound(w, serving).max() * 2 + 1e-6
        assert step <= bound
    elif serving is not None:
        torch.testing.assert_close(as_f32(a["serving"]), as_f32(b["serving"]),
                                   rtol=tol[0] if serving == table_dtype else 8e-3, atol=1e-5)


# -- differential: every optimizer x serving layout -----------------------------------


# every built-in (Lion, added as a catalog entry only, too: its reference is in
# test_optimizers.py), each serving layout, the master dtypes in turn
BUILTINS = [name for name in catalog.OPTIMIZERS if name in catalog.BUILTIN]
CASES = [(opt, srv, ("f32", "f16", "bf16")[k % 3])
         for k, (opt, srv) in enumerate((o, s) for o in BUILTINS for s in SERVING)]


@pytest.mark.parametrize("optimizer,serving,table_dtype", CASES)
def test_optimizer_x_layout_matches_llvm(optimizer: str, serving: str | None,
                                         table_dtype: str) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{optimizer}/{serving}".encode()))
    rows, dim = 40, 13 if serving != "int4" else 9  # odd dims: masked lanes, a lone nibble
    cpu, gpu = kernels(optimizer, dim, table_dtype, serving)
    bufs = make_buffers(optimizer, rows, dim, table_dtype, serving, rng)
    ids, grads = delta(rng, rows, dim, 48)
    want = run(cpu, bufs, ids, grads, step=3, version=7)
    got = run(gpu, bufs, ids, grads, DEVICE, step=3, version=7)
    assert_same_update(got, want, table_dtype, serving, dim)
    touched = torch.unique(ids.long())
    assert (got["versions"][touched] == 7).all() and got["versions"].sum() == 7 * len(touched)
    assert (got["seq"][touched] == 2).all()  # each touched row: one odd, one even


def test_user_defined_optimizer_matches_llvm(user_optimizer: str) -> None:
    rng = np.random.default_rng(5)
    rows, dim = 30, 10
    cpu, gpu = kernels(user_optimizer, dim, "f32", "int8")
    bufs = make_buffers(user_optimizer, rows, dim, "f32", "int8", rng)
    ids, grads = delta(rng, rows, dim, 40)
    assert_same_update(run(gpu, bufs, ids, grads, DEVICE), run(cpu, bufs, ids, grads),
                       "f32", "int8", dim)


# -- against the independent references ------------------------------------------------


def _numpy_ftrl(w, z, n, uniq, g, lr, l1, l2, beta):
    """FTRL-Proximal per coordinate (McMahan et al. 2013, algorithm 1), in float64."""
    w, z, n = (x.astype(np.float64).copy() for x in (w, z, n))
    g = g.astype(np.float64)
    n_new = n[uniq] + g * g
    sigma = (np.sqrt(n_new) - np.sqrt(n[uniq])) / lr
    z[uniq] += g - sigma * w[uniq]
    n[uniq] = n_new
    zz = z[uniq]
    w[uniq] = np.where(np.abs(zz) <= l1, 0.0,
                       -(zz - np.sign(zz) * l1) / ((beta + np.sqrt(n_new)) / lr + l2))
    return w, z, n


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_matches_references(optimizer: str) -> None:
    """torch.optim (SGD, Adagrad, SparseAdam, RMSprop), FBGEMM's rowwise Adagrad, FTRL."""
    rng = np.random.default_rng(11)
    rows, dim = 30, 16
    _, gpu = kernels(optimizer, dim)
    bufs = make_buffers(optimizer, rows, dim, "f32", None, rng)
    ids, grads = delta(rng, rows, dim, 50, distinct=12)
    got = run(gpu, bufs, ids, grads, DEVICE, step=2)
    w0 = bufs["table"].numpy()
    s0 = [s.numpy() for s in bufs["state"]]
    uniq = np.unique(ids.numpy())
    g = np.zeros((len(uniq), dim), np.float64)
    np.add.at(g, np.searchsorted(uniq, ids.numpy()), grads.numpy())
    if optimizer in ("sgd", "adagrad", "rowwise_adagrad", "adam"):
        names = {"adagrad": ["sum"], "rowwise_adagrad": ["momentum"],
                 "adam": ["exp_avg", "exp_avg_sq"]}.get(optimizer, [])
        ref = RefState(optimizer, {n: s.copy() for n, s in zip(names, s0)})
        want, _ = reference_step(optimizer, w0, ids.numpy().astype(np.int64), grads.numpy(),
                                 ref, 2, HP)
        want_state = [ref.buffers[n] for n in names]
    elif optimizer == "rmsprop":
        p = torch.nn.Parameter(torch.from_numpy(w0[uniq].copy()))
        opt = torch.optim.RMSprop([p], lr=HP.lr, alpha=0.9, eps=HP.eps)
        opt.state[p]["square_avg"] = torch.from_numpy(s0[0][uniq].copy())
        opt.state[p]["step"] = torch.tensor(1.0)
        p.grad = torch.from_numpy(g.astype(np.float32))
        opt.step()
        want, sq = w0.copy(), s0[0].copy()
        want[uniq] = p.detach().numpy()
        sq[uniq] = opt.state[p]["square_avg"].numpy()
        want_state = [sq]
    else:
        w, z, n = _numpy_ftrl(w0, s0[0], s0[1], uniq, g, HP.lr, 0.05, 0.01, 1.0)
        want, want_state = w, [z, n]
    np.testing.assert_allclose(got["table"].numpy(), want, rtol=1e-4, atol=1e-5)
    for x, y in zip(got["state"], want_state):
        np.testing.assert_allclose(x.numpy(), y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("serving", [name for name in catalog.LAYOUTS if name != "f32"])
def test_serving_rows_match_the_reference(serving: str) -> None:
    """Serving rows re-made from the stored master rows, as the numpy reference makes them."""
    rng = np.random.default_rng(3)
    rows, dim = 20, 11
    _, gpu = kernels("rowwise_adagrad", dim, "f32", serving)
    bufs = make_buffers("rowwise_adagrad", rows, dim, "f32", serving, rng)
    ids, grads = delta(rng, rows, dim, 30)
    got = run(gpu, bufs, ids, grads, DEVICE)
    stored = got["table"].numpy()
    uniq = np.unique(ids.numpy())
    if serving == "f16":
        assert np.array_equal(got["serving"].numpy()[uniq], serving_rows(stored[uniq], "f16"))
    elif serving == "bf16":
        bits = got["serving"].view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(bits[uniq], serving_rows(stored[uniq], "bf16"))
        assert np.allclose(bf16_bits_to_f32(bits[uniq]), stored[uniq], rtol=8e-3)
    else:
        deq = quant.dequantize_rows(got["serving"].numpy(), serving, dim)[uniq]
        err = np.abs(deq - stored[uniq]).max(axis=1)
        assert (err <= serving_error_bound(stored[uniq], serving)).all()
        if serving == "fp8":  # torch's float8_e4m3fn codes, bit for bit
            assert np.array_equal(got["serving"].numpy()[uniq], serving_rows(stored[uniq], serving))


# -- duplicates, determinism, edges -----------------------------------------------------


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adam", "sgd"])
def test_heavy_duplicates(optimizer: str) -> None:
    """200 ids drawn from 3: the duplicate sum (in chunks) and the optimizer on it."""
    rng = np.random.default_rng(7)
    rows, dim = 50, 24
    cpu, gpu = kernels(optimizer, dim, "f32", "int8")
    bufs = make_buffers(optimizer, rows, dim, "f32", "int8", rng)
    ids, grads = delta(rng, rows, dim, 200, distinct=3)
    assert_same_update(run(gpu, bufs, ids, grads, DEVICE), run(cpu, bufs, ids, grads),
                       "f32", "int8", dim)


def test_deterministic_bits() -> None:
    """The same delta twice gives the same bits (stable sort, fixed-shape sums, no atomics)."""
    rng = np.random.default_rng(8)
    rows, dim = 16, 32
    _, gpu = kernels("adam", dim, "bf16", "int4", stochastic_rounding=True)
    bufs = make_buffers("adam", rows, dim, "bf16", "int4", rng)
    ids, grads = delta(rng, rows, dim, 120, distinct=5)
    a = run(gpu, bufs, ids, grads, DEVICE, seed=3)
    b = run(gpu, bufs, ids, grads, DEVICE, seed=3)
    for k in ("table", "serving", "versions", "seq"):
        assert torch.equal(a[k], b[k])
    assert all(torch.equal(x, y) for x, y in zip(a["state"], b["state"]))


@pytest.mark.parametrize("table_dtype", ["f16", "bf16"])
def test_stochastic_rounding_bits_match_llvm(table_dtype: str) -> None:
    """The counter-based bits of (seed, row, col) are the LLVM backend's: same rounding."""
    rng = np.random.default_rng(9)
    rows, dim = 12, 40
    cpu, gpu = kernels("sgd", dim, table_dtype, stochastic_rounding=True)
    bufs = make_buffers("sgd", rows, dim, table_dtype, None, rng)
    ids = torch.arange(rows, dtype=torch.int64)
    grads = torch.from_numpy(rng.normal(0, 1, (rows, dim)).astype(np.float32))
    seed = -(2**40) + 12345  # negative: the bits of an i64 seed, as the CPU reads them
    got = run(gpu, bufs, ids, grads, DEVICE, seed=seed)["table"]
    want = run(cpu, bufs, ids, grads, seed=seed)["table"]
    other = run(gpu, bufs, ids, grads, DEVICE, seed=seed + 1)["table"]
    same = (got.view(torch.int16) == want.view(torch.int16)).float().mean().item()
    assert same >= 0.99  # an f32 ulp of difference before rounding may flip a rare element
    torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-5)
    assert not torch.equal(got, other)  # the seed matters


@pytest.mark.parametrize("index_dtype", ["i32", "i64"])
def test_index_dtypes_and_edge_ids(index_dtype: str) -> None:
    rng = np.random.default_rng(10)
    rows, dim = 25, 8
    cpu = update_kernel("adagrad", dim, index_dtype=index_dtype, lr=0.05)
    gpu = update_kernel("adagrad", dim, index_dtype=index_dtype, lr=0.05, target="triton")
    bufs = make_buffers("adagrad", rows, dim, "f32", None, rng)
    ids = torch.tensor([0, rows - 1, 0, rows - 1, 3],
                       dtype=torch.int32 if index_dtype == "i32" else torch.int64)
    grads = torch.from_numpy(rng.normal(0, 1, (5, dim)).astype(np.float32))
    assert_same_update(run(gpu, bufs, ids, grads, DEVICE), run(cpu, bufs, ids, grads),
                       "f32", None, dim)


def test_empty_delta_changes_nothing() -> None:
    rng = np.random.default_rng(1)
    _, gpu = kernels("adam", 8, "f32", "int8")
    bufs = make_buffers("adam", 10, 8, "f32", "int8", rng)
    got = run(gpu, bufs, torch.zeros(0, dtype=torch.int64), torch.zeros((0, 8)), DEVICE)
    for k in ("table", "serving", "versions", "seq"):
        assert torch.equal(got[k], bufs[k])


# -- all-or-nothing validation -----------------------------------------------------------


@pytest.mark.parametrize("bad", ["id", "negative", "nan", "inf", "id_before_nan"])
def test_bad_input_leaves_every_buffer_untouched(bad: str) -> None:
    rng = np.random.default_rng(2)
    rows, dim = 20, 8
    _, gpu = kernels("adam", dim, "f32", "int8")
    bufs = make_buffers("adam", rows, dim, "f32", "int8", rng)
    ids, grads = delta(rng, rows, dim, 30)
    if bad in ("id", "id_before_nan"):
        ids[5] = rows
    if bad == "negative":
        ids[5] = -1
    if bad in ("nan", "id_before_nan"):
        grads[7, 3] = float("nan")
    if bad == "inf":
        grads[7, 0] = float("inf")
    b = clone(bufs, DEVICE)
    message = "position 5" if bad in ("id", "negative", "id_before_nan") else "delta row 7"
    with pytest.raises(EkkoError, match=message):
        gpu(b["table"], ids.to(DEVICE), grads.to(DEVICE), state=tuple(b["state"]),
            serving=b["serving"], versions=b["versions"], seq=b["seq"])
    after = clone(b)
    for k in ("table", "serving", "versions", "seq"):
        assert torch.equal(after[k], bufs[k])
    assert all(torch.equal(x, y) for x, y in zip(after["state"], bufs["state"]))


def test_argument_errors() -> None:
    _, gpu = kernels("rowwise_adagrad", 8)
    table = torch.zeros(10, 8, device=DEVICE)
    m = torch.zeros(10, device=DEVICE)
    ids = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    grads = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(EkkoError, match="torch tensor"):
        gpu(table.cpu().numpy(), ids, grads, state=m)
    with pytest.raises(EkkoError, match="float32"):
        gpu(table, ids, grads.double(), state=m)
    with pytest.raises(EkkoError, match="share memory"):
        gpu(table, ids, grads, state=table.view(-1)[:10])
    with pytest.raises(EkkoError, match="needs its state"):
        gpu(table, ids, grads)
    with pytest.raises(EkkoError, match="step counts from 1"):
        gpu(table, ids, grads, state=m, step=0)
    with pytest.raises(EkkoError, match="seed must be an integer"):
        gpu(table, ids, grads, state=m, seed=1.5)
    with pytest.raises(EkkoError, match=r"grads is a torch.sparse_coo tensor: .*to_dense"):
        gpu(table, ids, grads.to_sparse(), state=m)  # no dense buffer: data_ptr raised
    assert torch.equal(table, torch.zeros_like(table))  # nothing ran
    gpu(table, ids, grads + 1, state=m, step=np.int64(2), seed=np.int64(5), version=np.int64(9))
    assert table[0].ne(0).all() and table[1:].eq(0).all()
    with pytest.raises(EkkoError, match="unknown target"):
        update_kernel("sgd", 8, target="cuda")
    with pytest.raises(EkkoError, match="unknown target"):
        bag_kernel(8, target="tpu")


# -- pooled lookups -------------------------------------------------------------------------


BAGS = [(layout, mode, weighted) for layout in catalog.LAYOUTS
        for mode, weighted in (("sum", False), ("sum", True), ("mean", False), ("none", False))]


def _bag_table(layout: str, rows: int, dim: int, rng: np.random.Generator):
    w = rng.normal(0, 1, (rows, dim)).astype(np.float32)
    if catalog.layout(layout).quantized:
        q = quant.quantize_rows(w, layout)
        return torch.from_numpy(q), torch.from_numpy(quant.dequantize_rows(q, layout, dim))
    t = torch.from_numpy(w).to(TORCH[layout])
    return t, t.float()


@pytest.mark.parametrize("layout,mode,weighted", BAGS)
def test_bag_matches_llvm_and_torch(layout: str, mode: str, weighted: bool) -> None:
    rng = np.random.default_rng(len(layout) * 7 + len(mode))
    rows, dim = 30, 13
    index = "i32" if weighted else "i64"
    cpu = bag_kernel(dim, layout, index, mode, weighted)
    gpu = bag_kernel(dim, layout, index, mode, weighted, target="triton")
    table, dense = _bag_table(layout, rows, dim, rng)
    dt = torch.int32 if index == "i32" else torch.int64
    ids = torch.from_numpy(rng.integers(0, rows, 40)).to(dt)
    ids[0], ids[-1] = 0, rows - 1
    offsets = None if mode == "none" else torch.tensor([0, 3, 3, 30, 40], dtype=dt)  # an empty bag
    w = torch.rand(40) if weighted else None
    got = gpu(table.to(DEVICE), ids.to(DEVICE), None if offsets is None else offsets.to(DEVICE),
              None if w is None else w.to(DEVICE)).cpu()
    want = cpu(table, ids, offsets, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if mode == "none":
        ref = dense[ids.long()]
    else:
        ref = torch.nn.functional.embedding_bag(ids.long(), dense, offsets.long(), mode=mode,
                                                per_sample_weights=w, include_last_offset=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_bag_errors_and_empty() -> None:
    gpu = bag_kernel(8, "int8", "i64", "sum", target="triton")
    table = torch.from_numpy(quant.quantize_rows(np.ones((10, 8), np.float32), "int8")).to(DEVICE)
    ids = torch.tensor([0, 9, 10], device=DEVICE)
    with pytest.raises(EkkoError, match=r"ids\[2\] is out of range"):
        gpu(table, ids, torch.tensor([0, 3], device=DEVICE))
    with pytest.raises(EkkoError, match="offsets of bag 1"):
        gpu(table, ids[:2], torch.tensor([0, 2, 1], device=DEVICE), include_last_offset=True)
    out = gpu(table, ids[:0], torch.zeros(0, dtype=torch.int64, device=DEVICE))
    assert out.shape == (0, 8)
    got = gpu(table, ids[:2], torch.tensor([0, 0, 2], device=DEVICE), include_last_offset=True)
    assert torch.equal(got[0].cpu(), torch.zeros(8)) and torch.allclose(got[1].cpu(),
                                                                         torch.full((8,), 2.0))
    with pytest.raises(EkkoError, match="seq"):
        gpu(table, ids[:2], torch.tensor([0], device=DEVICE),
            seq=torch.zeros(10, dtype=torch.int32, device=DEVICE))
