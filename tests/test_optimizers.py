"""Optimizers written once, as math the compiler traces: FTRL-Proximal,
RMSprop and user-defined ones, each against an independent reference."""

from __future__ import annotations

import os

from pathlib import Path

import numpy as np
import pytest
import torch

import ekko
from ekko.dialects import catalog

from .reference import dedup as sum_duplicates


def _delta(rng: np.random.Generator, rows: int, dim: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Heavy duplicates and both edge ids."""
    ids = np.concatenate([rng.integers(0, rows, n), [0, rows - 1, 0, rows - 1]]).astype(np.int64)
    grads = rng.standard_normal((len(ids), dim)).astype(np.float32)
    return ids, grads


def ftrl_reference(w, z, n, ids, grads, lr, l1, l2, beta):
    """McMahan et al. 2013, Algorithm 1, per coordinate, in float64."""
    uniq, g = sum_duplicates(ids, grads)
    w, z, n = (a.astype(np.float64) for a in (w, z, n))
    g = g.astype(np.float64)
    for r, gr in zip(uniq, g):
        sigma = (np.sqrt(n[r] + gr * gr) - np.sqrt(n[r])) / lr
        z[r] += gr - sigma * w[r]
        n[r] += gr * gr
        shrink = -(z[r] - np.sign(z[r]) * l1) / ((beta + np.sqrt(n[r])) / lr + l2)
        w[r] = np.where(np.abs(z[r]) <= l1, 0.0, shrink)
    return w, z, n


@pytest.mark.parametrize("dim", [1, 7, 64])
@pytest.mark.parametrize("l1,l2", [(0.0, 0.0), (0.05, 0.1)])
def test_ftrl_matches_the_paper(dim: int, l1: float, l2: float) -> None:
    rng = np.random.default_rng(dim)
    rows, lr, beta = 40, 0.1, 1.0
    k = ekko.update_kernel("ftrl", dim, lr=lr, l1=l1, l2=l2, beta=beta)
    w = np.zeros((rows, dim), np.float32)
    z, n = np.zeros_like(w), np.zeros_like(w)
    rw, rz, rn = w.copy(), z.copy(), n.copy()
    for step in range(1, 6):
        ids, grads = _delta(rng, rows, dim, 60)
        k(w, ids, grads, state=(z, n), step=step)
        rw, rz, rn = ftrl_reference(rw, rz, rn, ids, grads, lr, l1, l2, beta)
    np.testing.assert_allclose(n, rn, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(z, rz, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(w, rw, rtol=2e-4, atol=2e-4)
    if l1:
        assert (w == 0).any(), "an L1 penalty must leave some weights exactly zero"


@pytest.mark.parametrize("dim", [3, 32])
@pytest.mark.parametrize("serving", [None, "int8", "f16"])
def test_rmsprop_matches_torch(dim: int, serving: str | None) -> None:
    rng = np.random.default_rng(5)
    rows = 30
    k = ekko.update_kernel("rmsprop", dim, serving=serving, lr=0.01, alpha=0.9, eps=1e-6)
    table = rng.standard_normal((rows, dim)).astype(np.float32)
    v = np.zeros_like(table)
    srv = ekko.quantize_rows(table, serving) if serving else None
    p = torch.nn.Parameter(torch.from_numpy(table.copy()))
    opt = torch.optim.RMSprop([p], lr=0.01, alpha=0.9, eps=1e-6)
    for step in range(1, 5):
        # every row every step: torch's dense RMSprop decays untouched rows too
        ids = np.concatenate([rng.permutation(rows), rng.integers(0, rows, 20)])
        grads = rng.standard_normal((len(ids), dim)).astype(np.float32)
        k(table, ids, grads, state=v, serving=srv, step=step)
        dense = torch.zeros(rows, dim)
        dense.index_add_(0, torch.from_numpy(ids), torch.from_numpy(grads))
        p.grad = dense
        opt.step()
    np.testing.assert_allclose(table, p.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v, opt.state[p]["square_avg"].numpy(), rtol=1e-5, atol=1e-7)
    if serving:
        np.testing.assert_allclose(ekko.dequantize_rows(srv, serving, dim), table,
                                   atol=np.ptp(table, axis=1).max() / 100 + 1e-2)


def lion_numpy(w, m, g, lr, beta1, beta2, decay):
    """Lion (Chen et al. 2023; lucidrains' lion-pytorch) in float64: torch has none."""
    c = beta1 * m + (1 - beta1) * g
    return w - lr * (np.sign(c) + decay * w), beta2 * m + (1 - beta2) * g, c


def _lion_case(target: str, rows: int, dim: int, seed: int, steps: int = 3) -> None:
    """Lion on `target` against lion_numpy, step by step from the kernel's own state:
    heavy duplicates, ids 0 and rows-1, an empty batch, rows untouched."""
    rng = np.random.default_rng(seed)
    hyper = {"lr": 0.03, "beta1": 0.85, "beta2": 0.97, "decoupled_decay": 0.2}
    k = ekko.update_kernel("lion", dim, target=target, **hyper)
    w = rng.standard_normal((rows, dim)).astype(np.float32)
    m = (rng.standard_normal((rows, dim)) * 0.1).astype(np.float32)
    for step in range(1, steps + 1):
        ids, grads = _delta(rng, rows, dim, 0 if step == 2 else 3 * rows)
        if step == 2:  # an empty batch: nothing moves
            ids, grads = ids[:0], grads[:0]
        w0, m0 = w.copy(), m.copy()
        if target == "triton":  # on the GPU when there is one, else in the interpreter
            device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
            tw, tm = (torch.from_numpy(a).to(device) for a in (w, m))
            k(tw, torch.from_numpy(ids).to(device), torch.from_numpy(grads).to(device),
              state=tm, step=step)
            w, m = tw.cpu().numpy(), tm.cpu().numpy()
        else:
            k(w, ids, grads, state=m, step=step)
        uniq, g = sum_duplicates(ids, grads)
        want_w, want_m = w0.astype(np.float64), m0.astype(np.float64)
        ref_w, ref_m, c = lion_numpy(want_w[uniq], want_m[uniq], g.astype(np.float64),
                                     hyper["lr"], hyper["beta1"], hyper["beta2"],
                                     hyper["decoupled_decay"])
        # where c is within f32 roundings of zero its sign may go either way
        near = np.abs(c) <= 1e-5 * (np.abs(want_m[uniq]) + np.abs(g))
        for s in (-1.0, 0.0, 1.0):
            other = want_w[uniq] - hyper["lr"] * (s + hyper["decoupled_decay"] * want_w[uniq])
            ref_w = np.where(near & np.isclose(w[uniq], other, rtol=1e-5, atol=1e-6), other, ref_w)
        assert near.sum() <= near.size // 100
        want_w[uniq], want_m[uniq] = ref_w, ref_m
        np.testing.assert_allclose(m, want_m, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(w, want_w, rtol=1e-5, atol=1e-6)
        untouched = np.setdiff1d(np.arange(rows), uniq)
        assert np.array_equal(w[untouched], w0[untouched])
        assert np.array_equal(m[untouched], m0[untouched])


@pytest.mark.parametrize("rows,dim,seed", [(2, 1, 0), (37, 7, 1), (64, 33, 2), (300, 128, 3)])
def test_lion_matches_a_hand_written_lion_on_llvm(rows: int, dim: int, seed: int) -> None:
    _lion_case("llvm", rows, dim, seed)


@pytest.mark.parametrize("rows,dim,seed", [(3, 5, 4), (40, 16, 5)])
def test_lion_matches_a_hand_written_lion_on_triton(rows: int, dim: int, seed: int) -> None:
    pytest.importorskip("triton")
    _lion_case("triton", rows, dim, seed, steps=2)


def test_lion_defaults_and_ranges() -> None:
    """lion(lr, beta1=0.9, beta2=0.99, decoupled_decay=0), one state: exp_avg."""
    entry = catalog.optimizer("lion")
    assert entry.defaults() == {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "decoupled_decay": 0.0}
    assert entry.state_names == ("exp_avg",) and not entry.linear
    with pytest.raises(ekko.EkkoError, match="beta1 must be in"):
        ekko.update_kernel("lion", 4, beta1=1.0)


def test_an_empty_delta_changes_nothing() -> None:
    k = ekko.update_kernel("ftrl", 8)
    w, z, n = (np.ones((5, 8), np.float32) for _ in range(3))
    k(w, np.zeros(0, np.int64), np.zeros((0, 8), np.float32), state=(z, n))
    assert (w == 1).all() and (z == 1).all() and (n == 1).all()


# -- user-defined optimizers ---------------------------------------------------


@ekko.optimizer(state=("buf",), hyper={"lr": 0.05, "momentum": (0.9, 0.0, 1.0)})
def heavy_ball(g, w, buf, *, lr, momentum):
    """SGD with momentum: buf = momentum * buf + g; w -= lr * buf."""
    buf = momentum * buf + g
    return w - lr * buf, buf


@ekko.optimizer(rowwise_state=("ms",), hyper={"lr": 0.1, "decay": (0.5, 0.0, 1.0)})
def rowwise_rms(g, w, ms, *, lr, decay, dim):
    ms = decay * ms + (1 - decay) * ekko.rowmath.row_mean(g * g, dim)
    return w - lr * g / ekko.rowmath.sqrt(ms + 1e-6), ms


def test_a_user_optimizer_matches_torch_sgd_with_momentum() -> None:
    rng = np.random.default_rng(9)
    rows, dim = 25, 12
    k = ekko.update_kernel("heavy_ball", dim, lr=0.05, momentum=0.8)
    table = rng.standard_normal((rows, dim)).astype(np.float32)
    buf = np.zeros_like(table)
    p = torch.nn.Parameter(torch.from_numpy(table.copy()))
    opt = torch.optim.SGD([p], lr=0.05, momentum=0.8)
    for step in range(1, 5):
        ids = np.concatenate([rng.permutation(rows), [0, rows - 1]])
        grads = rng.standard_normal((len(ids), dim)).astype(np.float32)
        k(table, ids, grads, state=buf, step=step)
        dense = torch.zeros(rows, dim)
        dense.index_add_(0, torch.from_numpy(ids), torch.from_numpy(grads))
        p.grad = dense
        opt.step()
    np.testing.assert_allclose(table, p.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_a_user_optimizer_with_rowwise_state_matches_numpy() -> None:
    rng = np.random.default_rng(11)
    rows, dim = 20, 9
    k = ekko.update_kernel(rowwise_rms, dim, serving="int4")  # the object works as the name
    table = rng.standard_normal((rows, dim)).astype(np.float32)
    ms = np.zeros(rows, np.float32)
    srv = ekko.quantize_rows(table, "int4")
    ref_w, ref_ms = table.astype(np.float64), ms.astype(np.float64)
    for step in range(1, 4):
        ids, grads = _delta(rng, rows, dim, 30)
        k(table, ids, grads, state=ms, serving=srv, step=step)
        uniq, g = sum_duplicates(ids, grads)
        ref_ms[uniq] = 0.5 * ref_ms[uniq] + 0.5 * (g.astype(np.float64) ** 2).mean(1)
        ref_w[uniq] -= 0.1 * g / np.sqrt(ref_ms[uniq] + 1e-6)[:, None]
    np.testing.assert_allclose(ms, ref_ms, rtol=1e-5)
    np.testing.assert_allclose(table, ref_w, rtol=1e-4, atol=1e-5)


def test_a_user_optimizer_is_fused_ir_like_the_built_ins() -> None:
    from ekko.compiler.pipeline import UpdateRequest, update_module, run_pipeline

    module = update_module(UpdateRequest("heavy_ball", 8, serving="int8"))
    assert 'upd.optimize' in str(module) and 'optimizer = "heavy_ball"' in str(module)
    text = str(run_pipeline(module))
    assert "kern.update" in text and "arith.mulf" in text and "kern.yield" in text


def test_mistakes_in_a_user_optimizer_are_reported_where_it_is_defined() -> None:
    with pytest.raises(ValueError, match="must return the new weights and 1 state"):
        @ekko.optimizer(state=("buf",))
        def forgets_state(g, w, buf, *, lr):
            return w - lr * g

    with pytest.raises(ValueError, match="truth value"):
        @ekko.optimizer()
        def branches(g, w, *, lr):
            return w - lr * g if g > 0 else w

    with pytest.raises(ValueError, match="already defined"):
        @ekko.optimizer(name="adam")
        def takes_a_builtin_name(g, w, *, lr):
            return w - lr * g

    with pytest.raises(ValueError, match="momentum"):
        @ekko.optimizer(hyper={"momentum": -1.0})
        def bad_default(g, w, *, lr, momentum):
            return w - lr * g

    # found by the fuzzer: row_mean of a number was an AttributeError from deep in the tracer
    with pytest.raises(ValueError, match="row_sum and row_mean take a traced value, not float"):
        @ekko.optimizer(rowwise_state=("r",))
        def means_a_number(g, w, r, *, lr, dim):
            return w - lr * g, ekko.rowmath.row_mean(0.0, dim)


def test_user_hyper_parameters_are_range_checked() -> None:
    with pytest.raises(ekko.EkkoError, match="momentum must be in"):
        ekko.update_kernel("heavy_ball", 4, momentum=1.5)


def test_every_catalog_optimizer_compiles_for_every_serving_layout() -> None:
    for name in catalog.OPTIMIZERS:
        for serving in (None, *catalog.LAYOUTS):
            k = ekko.update_kernel(name, 5, serving=serving)
            assert k.spec.optimizer == name


def test_a_rowwise_state_must_be_one_value_per_row() -> None:
    with pytest.raises(ValueError, match="rowwise state 'ms' must be one value per row"):
        @ekko.optimizer(rowwise_state=("ms",))
        def forgets_to_reduce(g, w, ms, *, lr):
            return w - lr * g, ms + g * g


# -- mistakes in a definition: one EkkoError naming the optimizer and the line ----


def _line_of(fn_or_code: str) -> int:
    """The line of this file that holds `fn_or_code` (the statement a message must name)."""
    lines = Path(__file__).read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if fn_or_code in line)


def _refused(define, marker: str, *words: str) -> None:
    """`define()` raises one one-line OptimizerError naming this file's line with
    `marker`, the optimizer, and `words`; the catalog is unchanged."""
    before = dict(catalog.OPTIMIZERS)
    with pytest.raises(ekko.OptimizerError) as e:
        define()
    message = str(e.value)
    assert "\n" not in message and isinstance(e.value, ekko.EkkoError)
    assert message.startswith(f"{__file__}:{_line_of(marker)}: optimizer "), message
    for word in words:
        assert word in message, (word, message)
    assert "xdsl" not in message.lower() and "BlockArgument" not in message
    assert catalog.OPTIMIZERS == before


def test_a_branch_on_a_traced_value_names_the_if() -> None:
    def define():
        @ekko.optimizer()
        def branchy(g, w, *, lr):
            if g > 0:  # marker: branch
                return w - lr * g
            return w
    _refused(define, "# marker: branch", "optimizer branchy:", "rowmath.where", "`if g > 0:")


def _forever(g, w, *, lr):
    return _forever(g, w, lr=lr)  # marker: recursion


def test_recursion_names_the_recursive_call() -> None:
    _refused(lambda: ekko.optimizer("forever")(_forever), "# marker: recursion",
             "optimizer forever:", "calls itself")


def test_a_lambda_without_a_name_is_refused_where_it_is_written() -> None:
    _refused(lambda: ekko.optimizer()(
        lambda g, w, *, lr: w - lr * g),  # marker: lambda
        "# marker: lambda", "optimizer <lambda>:", "a lambda has no name")
    with catalog.OPTIMIZERS.scoped():
        opt = ekko.optimizer("named_lambda", replace=True)(lambda g, w, *, lr: w - lr * g)
        assert opt.name == "named_lambda" and ekko.update_kernel(opt, 4).spec.optimizer == opt.name
    assert "named_lambda" not in catalog.OPTIMIZERS


def test_a_scope_undoes_its_registrations_even_on_error() -> None:
    before = dict(catalog.OPTIMIZERS)
    with pytest.raises(RuntimeError), catalog.OPTIMIZERS.scoped():
        ekko.optimizer("scoped_sgd")(lambda g, w, *, lr: w - lr * g)
        assert "scoped_sgd" in catalog.OPTIMIZERS
        raise RuntimeError("leaves the scope")
    assert dict(catalog.OPTIMIZERS) == before
    with pytest.raises(TypeError):
        catalog.OPTIMIZERS["sgd"] = catalog.OPTIMIZERS["adam"]  # type: ignore[index]


@pytest.mark.parametrize("options,words", [
    ({"state": ("not an id",)}, ["state name 'not an id' is not a Python identifier"]),
    ({"state": ("lambda",)}, ["state name 'lambda' is a Python keyword"]),
    ({"state": ("g",)}, ["state name 'g' is taken", "g, w, step, dim"]),
    ({"state": ("step",)}, ["state name 'step' is taken"]),
    ({"state": ("lr",)}, ["hyper-parameter name 'lr' is also the name of a state"]),
    ({"state": ("m", "m")}, ["state name 'm' is used twice"]),
    ({"state": ("m",), "rowwise_state": ("m",)}, ["state name 'm' is used twice"]),
    ({"state": "buf"}, ["state must be a tuple of names, got 'buf'"]),
    ({"hyper": {"beta": "0.9"}}, ["hyper-parameter 'beta' takes a number", "'0.9'"]),
    ({"hyper": {"beta": (0.9, 0.0)}}, ["hyper-parameter 'beta' takes a number or (default, low, high)"]),
    ({"hyper": {"beta": (0.5, 1.0, 0.0)}}, ["low 1 is above high 0"]),
    ({"hyper": {"beta": float("nan")}}, ["default beta must be finite"]),
    ({"hyper": {"weight_decay": 0.1}}, ["'weight_decay' is taken by the gradient setting"]),
    ({"hyper": {"threads": 2.0}}, ["'threads' is taken: update_kernel has a parameter"]),
    ({"hyper": {"dim": 2.0}}, ["hyper-parameter name 'dim' is taken"]),
    ({"name": "sgd"}, ["'sgd' is already defined (a built-in optimizer)"]),
    ({"name": "two words"}, ["name must be a Python identifier, got 'two words'"]),
])
def test_bad_names_and_defaults_are_refused_at_the_decorator(options, words) -> None:
    def define():
        @ekko.optimizer(**options)  # marker: decorator
        def badly_declared(g, w, *state, lr, **_):
            return (w - lr * g, *state)
    _refused(define, "# marker: decorator", *words)


def test_errors_while_tracing_name_the_statement() -> None:
    def typo():
        @ekko.optimizer()
        def typo(g, w, *, lr):
            return w - lr * gg  # noqa: F821  # marker: typo
    _refused(typo, "# marker: typo", "optimizer typo: NameError: name 'gg' is not defined")

    def numpy_function():
        @ekko.optimizer()
        def with_numpy(g, w, *, lr):
            return w - lr * np.sqrt(g)  # marker: numpy
    _refused(numpy_function, "# marker: numpy", "optimizer with_numpy:", "sqrt")

    def raises():
        @ekko.optimizer()
        def raising(g, w, *, lr):
            raise RuntimeError("boom")  # marker: raise
    _refused(raises, "# marker: raise", "optimizer raising: RuntimeError: boom")

    def counts():
        @ekko.optimizer()  # marker: count
        def counted(g, w, *, lr):
            return w - lr * g, w
    _refused(counts, "# marker: count",
             "optimizer counted: must return the new weights and 0 state value(s), got 2 values")


def test_a_keyword_the_catalog_never_passes_is_named() -> None:
    def define():
        @ekko.optimizer()  # marker: keyword
        def needs_zeta(g, w, *, lr, zeta):
            return w - lr * zeta * g
    _refused(define, "# marker: keyword", "takes 'zeta', which is none of its hyper-parameters",
             "add it to hyper=")


def test_a_non_function_is_refused() -> None:
    with pytest.raises(ekko.OptimizerError, match="decorates a function"):
        ekko.optimizer("not_a_function")(3)


def test_a_spec_reads_only_its_own_hyper_parameters() -> None:
    """spec.NAME is this optimizer's hyper-parameter or a gradient setting; another
    optimizer's name is no attribute (it was None, found by scanning the catalog)."""
    spec = ekko.update_kernel("sgd", 4, lr=0.5).spec
    assert spec.lr == 0.5 and spec.max_norm is None and spec.weight_decay == 0.0
    with pytest.raises(AttributeError):
        spec.eps  # noqa: B018 - adam's, not sgd's
