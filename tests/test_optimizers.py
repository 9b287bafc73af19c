"""Optimizers written once, as math the compiler traces: FTRL-Proximal,
RMSprop and user-defined ones, each against an independent reference."""

from __future__ import annotations

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
