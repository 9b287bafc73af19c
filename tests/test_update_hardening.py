"""Regression tests for the update runtime's failure classes (crashes, silent
wrong results, accepted nonsense): each failed on the code before its fix."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

import ekko
from ekko.dialects.limits import MAX_DIM

ROWS, DIM = 50, 8


def _snapshot(*arrays) -> list[bytes]:
    return [np.asarray(a).tobytes() for a in arrays]


# -- crashes ------------------------------------------------------------------


def test_wide_rows_with_clipping_on_a_small_stack_do_not_crash() -> None:
    """The update kept a whole row on the stack when clipping or decaying: a
    wide row on a thread with a small stack was a SIGSEGV. Run it in a child
    process, where a crash shows as a signal instead of killing pytest."""
    code = textwrap.dedent(f"""
        import threading, numpy as np, ekko
        dim = {MAX_DIM}
        k = ekko.update_kernel("adagrad", dim, max_norm=1.0, weight_decay=0.01, clip_value=2.0,
                               threads=1)
        table = np.ones((4, dim), np.float32); state = np.zeros((4, dim), np.float32)
        def run():
            k(table, np.array([0, 3, 0]), np.ones((3, dim), np.float32), state=state)
        threading.stack_size(64 * 1024)
        t = threading.Thread(target=run); t.start(); t.join()
        assert np.isfinite(table).all() and (table[1] == 1).all() and (table[0] < 1).all()
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


def test_absurd_dims_are_refused_up_front_naming_the_limit() -> None:
    for dim in (MAX_DIM + 1, 10**30, 0, -4):
        with pytest.raises(ekko.EkkoError, match="dim"):
            ekko.update_kernel("sgd", dim)
        with pytest.raises(ekko.EkkoError, match="dim"):
            ekko.bag_kernel(dim)
    with pytest.raises(ekko.EkkoError, match="MAX_DIM"):
        ekko.update_kernel("sgd", MAX_DIM + 1)


# -- math that overflows is refused, not committed ------------------------------


@pytest.mark.parametrize("optimizer,state", [("adagrad", "sum"), ("adam", "exp_avg_sq"),
                                             ("rmsprop", "square_avg")])
def test_a_gradient_whose_square_overflows_is_refused(optimizer, state) -> None:
    """torch.optim keeps going with an inf state (and w unchanged: g / inf = 0);
    ekko commits nothing non-finite (issue #17): the call names the row and the
    state and leaves every buffer as it was."""
    grads = np.full((2, DIM), 3e20, np.float32)  # finite; its square is inf in f32
    grads[1] = -1e-3
    ids = np.array([4, 9])
    table = np.random.default_rng(0).standard_normal((ROWS, DIM)).astype(np.float32)
    k = ekko.update_kernel(optimizer, DIM, lr=0.1)
    nstate = len(k.spec.state_shapes)
    states = tuple(np.zeros((ROWS, DIM), np.float32) for _ in range(nstate))
    before = _snapshot(table, *states)
    with pytest.raises(ekko.NonFiniteOutputError, match=f"state '{state}' of row 4") as e:
        k(table, ids, grads, state=states if nstate > 1 else states[0], step=1)
    assert (e.value.row, e.value.buffer) == (4, f"state '{state}'")
    assert _snapshot(table, *states) == before
    k(table, ids[1:], grads[1:], state=states if nstate > 1 else states[0], step=1)
    assert np.isfinite(table).all() and not np.array_equal(table[9], np.frombuffer(
        before[0], np.float32).reshape(ROWS, DIM)[9])


# -- silent wrong results --------------------------------------------------------


def test_non_native_byte_order_is_refused() -> None:
    k = ekko.update_kernel("sgd", DIM)
    table = np.zeros((ROWS, DIM), np.float32)
    grads = np.ones((1, DIM), np.dtype(">f4"))
    with pytest.raises(ekko.EkkoError, match="byte order"):
        k(table, np.array([1]), grads)
    with pytest.raises(ekko.EkkoError, match="byte order"):
        k(table, np.array([1], np.dtype(">i8")), np.ones((1, DIM), np.float32))
    assert not table.any()


def test_a_tensor_that_requires_grad_is_not_updated_behind_autograd() -> None:
    k = ekko.update_kernel("sgd", DIM)
    table = torch.zeros(ROWS, DIM, requires_grad=True)
    with pytest.raises(ekko.EkkoError, match="requires grad"):
        k(table, torch.tensor([1]), torch.ones(1, DIM))
    k(table.detach(), torch.tensor([1]), torch.ones(1, DIM))  # the documented way
    assert table[1, 0].item() == pytest.approx(-0.01)


def test_aliased_buffers_are_refused() -> None:
    table = np.zeros((ROWS, DIM), np.float32)
    m = np.zeros((ROWS, DIM), np.float32)
    adam = ekko.update_kernel("adam", DIM)
    ids, grads = np.array([1]), np.ones((1, DIM), np.float32)
    with pytest.raises(ekko.EkkoError, match="share memory"):
        adam(table, ids, grads, state=(m, m), step=1)
    with pytest.raises(ekko.EkkoError, match="share memory"):
        ekko.update_kernel("adagrad", DIM)(table, ids, grads, state=table)
    with pytest.raises(ekko.EkkoError, match="share memory"):
        ekko.update_kernel("sgd", DIM)(table, ids, table[:1])
    view = table.reshape(-1)[: ROWS * DIM].reshape(ROWS, DIM)
    with pytest.raises(ekko.EkkoError, match="share memory"):
        adam(table, ids, grads, state=(view, m), step=1)
    assert not table.any() and not m.any()


@pytest.mark.parametrize("name,value", [("step", 2**63), ("step", 0), ("step", 1.5),
                                        ("version", 2**64), ("version", -1), ("seed", "x")])
def test_step_version_and_seed_must_fit_int64(name, value) -> None:
    k = ekko.update_kernel("adam", DIM)
    table, m, v = (np.zeros((ROWS, DIM), np.float32) for _ in range(3))
    versions = np.zeros(ROWS, np.int64)
    before = _snapshot(table, m, v, versions)
    kwargs = {"step": 1, name: value}
    with pytest.raises(ekko.EkkoError, match=name):
        k(table, np.array([2]), np.ones((1, DIM), np.float32), state=(m, v), versions=versions,
          **kwargs)
    assert _snapshot(table, m, v, versions) == before


@pytest.mark.parametrize("hyper", [{"lr_decay": -0.1}, {"lr_decay": float("nan")},
                                   {"lr": 0.0}, {"lr": float("inf")}, {"eps": -1e-8},
                                   {"lr": "0.1"}])
def test_hyper_parameters_out_of_range_are_refused(hyper) -> None:
    with pytest.raises(ekko.EkkoError, match=next(iter(hyper))):
        ekko.update_kernel("adagrad", DIM, **hyper)


@pytest.mark.parametrize("kwargs", [{"betas": (1.0, 0.999)}, {"betas": (0.9, -0.1)},
                                    {"max_norm": -1.0}, {"clip_value": float("inf")},
                                    {"weight_decay": float("nan")}, {"betas": 0.9}])
def test_adam_and_gradient_transforms_out_of_range_are_refused(kwargs) -> None:
    with pytest.raises(ekko.EkkoError):
        ekko.update_kernel("adam", DIM, **kwargs)


def test_a_hyper_parameter_no_optimizer_has_is_refused() -> None:
    with pytest.raises(ekko.EkkoError, match="dampening_rate"):
        ekko.update_kernel("sgd", DIM, dampening_rate=0.9)


def _other_optimizers_hyper() -> list[tuple[str, str]]:
    from ekko.dialects import catalog

    return [(name, h) for name in sorted(catalog.BUILTIN) for other in sorted(catalog.BUILTIN)
            for h in catalog.optimizer(other).hyper_names
            if h not in catalog.optimizer(name).hyper_names]


@pytest.mark.parametrize("optimizer,hyper", _other_optimizers_hyper())
def test_a_hyper_parameter_of_another_optimizer_is_refused_as_the_language_refuses_it(
        optimizer: str, hyper: str) -> None:
    """update_kernel("sgd", eps=...) used to drop eps silently while `optimizer
    sgd(eps=...)` is an error: both refuse it now, with the same message."""
    from ekko.compiler.frontend import ModelError, parse_model

    with pytest.raises(ModelError) as language:
        parse_model(f"model m {{ table t {{ rows 4; dim 4; optimizer {optimizer}({hyper}=0.5); }} }}")
    with pytest.raises(ekko.EkkoError) as api:
        ekko.update_kernel(optimizer, DIM, **{hyper: 0.5})
    message = f"optimizer {optimizer} has no hyper-parameter '{hyper}'"
    assert message in str(api.value) and message in str(language.value)
    assert str(api.value).split(message)[1] == str(language.value).split(message)[1].split("\n")[0]


def test_betas_are_refused_by_an_optimizer_without_them() -> None:
    with pytest.raises(ekko.EkkoError, match="betas sets beta1 and beta2: optimizer rmsprop has "
                                             "no hyper-parameter 'beta1'"):
        ekko.update_kernel("rmsprop", DIM, betas=(0.9, 0.99))
    assert ekko.update_kernel("adam", DIM, betas=(0.8, 0.9)).spec.hyper[1:3] == (
        ("beta1", 0.8), ("beta2", 0.9))


def _sparse_variants(dense: torch.Tensor) -> list[torch.Tensor]:
    """COO, and CSR for a matrix (torch warns that CSR is in beta: not ours to see)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return [dense.to_sparse(), *([dense.to_sparse_csr()] if dense.dim() == 2 else [])]


@pytest.mark.parametrize("argument", ["table", "ids", "grads", "state", "serving", "versions"])
def test_a_sparse_tensor_is_one_clear_error_and_nothing_is_written(argument: str) -> None:
    """A sparse tensor has no dense buffer: its data_ptr raised a bare RuntimeError
    (COO) and is_contiguous another (CSR)."""
    k = ekko.update_kernel("rowwise_adagrad", DIM, serving="f16")
    dense = {"table": torch.zeros(ROWS, DIM), "ids": torch.tensor([1, 2]),
             "grads": torch.ones(2, DIM), "state": torch.zeros(ROWS),
             "serving": torch.zeros(ROWS, DIM, dtype=torch.float16),
             "versions": torch.zeros(ROWS, dtype=torch.int64)}
    for sparse in _sparse_variants(dense[argument]):
        args = dict(dense, **{argument: sparse})
        before = _snapshot(*(v for k_, v in dense.items() if k_ != argument))
        with pytest.raises(ekko.EkkoError, match=f"{argument} is a {sparse.layout} tensor: .*"
                                                 f"{argument}.to_dense"):
            k(args["table"], args["ids"], args["grads"], state=args["state"],
              serving=args["serving"], versions=args["versions"])
        assert _snapshot(*(v for k_, v in dense.items() if k_ != argument)) == before


@pytest.mark.parametrize("argument", ["table", "ids", "offsets", "per_sample_weights", "out"])
def test_a_sparse_tensor_to_a_bag_kernel_is_one_clear_error(argument: str) -> None:
    bag = ekko.bag_kernel(DIM, weighted=True)
    dense = {"table": torch.ones(ROWS, DIM), "ids": torch.tensor([1, 2, 3]),
             "offsets": torch.tensor([0, 1, 3]), "per_sample_weights": torch.ones(3),
             "out": torch.zeros(2, DIM)}
    for sparse in _sparse_variants(dense[argument]):
        args = dict(dense, **{argument: sparse})
        with pytest.raises(ekko.EkkoError, match=f"{argument} is a {sparse.layout} tensor"):
            bag(args["table"], args["ids"], args["offsets"],
                per_sample_weights=args["per_sample_weights"], out=args["out"])
    assert not dense["out"].any()


@pytest.mark.parametrize("ids,expect", [
    ([], np.zeros(0, np.int64)),
    ((3, 1), np.array([3, 1])),
    (range(2), np.array([0, 1])),
    (np.array([2**63 - 1], np.uint64), np.array([2**63 - 1])),
    (np.array([7], np.int32), np.array([7])),
    (torch.tensor([5]), np.array([5])),
    ([2**64 - 1], "ids[0] = 18446744073709551615 is beyond int64"),
    ([0, -1, 2**64 - 1], "ids[2] = 18446744073709551615 is beyond int64"),
    (np.array([1, 2**64 - 1], np.uint64), "ids[1] = 18446744073709551615 is beyond int64"),
    ([2**70], "ids[0] = 1180591620717411303424 is beyond int64"),
    ([1, 2.0], "ids[1] is 2.0, not an integer id"),
    ([True], "ids[0] is True, not an integer id"),
    (np.array([1.5]), "ids must be integers, got float64"),
    (np.zeros((1, 1), np.int64), "ids must be 1-D"),
    ("12", "ids must be an integer array or a sequence of integers, got str"),
    (torch.tensor([1]).to_sparse(), "ids is a torch.sparse_coo tensor"),
])
def test_ids_from_python_keep_their_values_or_say_which_has_none(ids, expect) -> None:
    """What callers that take any array-like (the engine, CompiledModel with lists)
    turn ids into: numpy's own guess made [] float64 and [-1, 2**64 - 1] float64 too;
    a cast made 2**64 - 1 the id -1."""
    from ekko.kernels.arrays import index_array

    if isinstance(expect, str):
        with pytest.raises(ekko.UpdateError, match=re.escape(expect)):
            index_array("ids", ids, ekko.UpdateError)
        return
    got = index_array("ids", ids, ekko.UpdateError)
    assert got.dtype == np.int64 and got.flags.c_contiguous and (got == expect).all()
    assert got.shape == expect.shape


def test_an_int64_array_of_ids_is_not_copied() -> None:
    from ekko.kernels.arrays import index_array

    ids = np.array([4, 2], np.int64)
    assert index_array("ids", ids, ekko.UpdateError) is ids


# -- writes stay inside the rows an update names --------------------------------

from ekko.dialects import catalog  # noqa: E402


@pytest.mark.parametrize("optimizer", sorted(catalog.BUILTIN))
@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_an_update_writes_only_the_rows_it_names(optimizer: str, dtype: str) -> None:
    """Every byte of every other row (table, state, serving copy, versions)
    is untouched, at the short odd dims where vector loops end in a tail.
    (LLVM once stored a bf16 tail value with a 32-bit store, clobbering the
    next row's first value: FTRL, bf16, dim 9.)"""
    rng = np.random.default_rng(3)
    np_dtype = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}[dtype]
    hyper = {"l1": 0.05, "l2": 0.01} if optimizer == "ftrl" else {}
    for dim in (1, 2, 5, 9, 17):
        k = ekko.update_kernel(optimizer, dim, dtype, serving="int4", lr=0.5, threads=2, **hyper)
        rows = 12
        table = rng.integers(0x3C00, 0x4400, (rows, dim)).astype(np_dtype) if dtype != "f32" \
            else rng.standard_normal((rows, dim)).astype(np.float32)
        states = [rng.random(k.spec.entry.state_shape(n, rows, dim)).astype(np.float32)
                  for n in k.spec.state_shapes]
        state = None if not states else states[0] if len(states) == 1 else tuple(states)
        serving = rng.integers(0, 255, (rows, (dim + 1) // 2 + 4)).astype(np.uint8)
        versions = np.zeros(rows, np.int64)
        ids = np.array([1, 3, 3, 10])
        others = [r for r in range(rows) if r not in (1, 3, 10)]
        before = [a[others].tobytes() for a in (table, *states, serving, versions)]
        k(table, ids, rng.standard_normal((4, dim)).astype(np.float32), state=state,
          serving=serving, versions=versions, step=1)
        after = [a[others].tobytes() for a in (table, *states, serving, versions)]
        assert after == before, f"{optimizer} {dtype} dim {dim} wrote outside its rows"
