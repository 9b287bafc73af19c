"""`ekko run`'s numpy reference: it agrees with torch.optim, it accepts the real
kernels and rejects kernels whose hyper-parameters are slightly off."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import ekko
from ekko.dialects import catalog
from ekko.kernels import check
from ekko.kernels.update import UpdateKernel

DIM, ROWS = 8, 20


def _spec(optimizer: str, **hyper: float) -> SimpleNamespace:
    return SimpleNamespace(optimizer=optimizer, dim=DIM, table_dtype="f32", clip_value=None,
                           max_norm=None, weight_decay=0.0, **hyper)


TORCH_CASES = {  # our optimizer: (torch.optim class name, its kwargs, our hyper-parameters)
    "sgd": ("SGD", {"lr": 0.1}, {"lr": 0.1}),
    "adagrad": ("Adagrad", {"lr": 0.1, "lr_decay": 0.05, "eps": 1e-10},
                {"lr": 0.1, "lr_decay": 0.05, "eps": 1e-10}),
    "adam": ("Adam", {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-8},
             {"lr": 0.01, "beta1": 0.8, "beta2": 0.95, "eps": 1e-8}),
    "rmsprop": ("RMSprop", {"lr": 0.01, "alpha": 0.9, "eps": 1e-8},
                {"lr": 0.01, "alpha": 0.9, "eps": 1e-8}),
}


@pytest.mark.parametrize("optimizer", sorted(TORCH_CASES))
def test_reference_matches_torch_optim(optimizer: str) -> None:
    """Three steps with duplicate ids: every touched row as torch.optim moves it."""
    torch = pytest.importorskip("torch")
    cls, kwargs, hyper = TORCH_CASES[optimizer]
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    param = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = getattr(torch.optim, cls)([param], **kwargs)
    spec = _spec(optimizer, **hyper)
    master = w0.copy()
    n_states = {"sgd": 0, "adam": 2}.get(optimizer, 1)
    states = tuple(np.zeros((ROWS, DIM), np.float32) for _ in range(n_states))
    for step in range(1, 4):
        ids = np.concatenate([np.arange(ROWS), rng.integers(0, ROWS, 30)])
        grads = rng.standard_normal((len(ids), DIM)).astype(np.float32)
        dense = np.zeros((ROWS, DIM), np.float32)
        np.add.at(dense, ids, grads)
        param.grad = torch.from_numpy(dense)
        opt.step()
        snap = check.Snapshot(np.arange(ROWS), master, states)
        w, new_states = check.reference_rows(spec, snap, ids, grads, step)
        master = w.value.astype(np.float32)
        states = tuple(s.value.astype(np.float32) for s in new_states)
        assert check.error_ratio(param.detach().numpy(), w) <= 1.0, step


class _Override:
    """A spec with some hyper-parameters changed, as the check reads it."""

    def __init__(self, spec, changes: dict[str, float]):
        self._spec, self._changes = spec, changes

    def __getattr__(self, name: str):
        return self._changes[name] if name in self._changes else getattr(self._spec, name)


def _run_kernel(spec, rng: np.random.Generator):
    """One real update on a small hot table; returns what compare needs."""
    kernel = UpdateKernel(spec)
    table = rng.uniform(-0.05, 0.05, (ROWS, DIM)).astype(np.float32)
    shapes = [spec.entry.state_shape(name, ROWS, DIM) for name in spec.state_shapes]
    state = tuple(np.abs(rng.standard_normal(s)).astype(np.float32) * 0.01 for s in shapes)
    arg = state if len(state) > 1 else (state[0] if state else None)
    ids = rng.integers(0, ROWS, 400)
    grads = (rng.standard_normal((len(ids), DIM)) * 0.01).astype(np.float32)
    snap = check.snapshot(spec, table, arg, ids)
    kernel(table, ids, grads, state=arg, step=3)
    return snap, table, arg, ids, grads


def lion_numpy(w, m, g, lr, beta1, beta2, decay):
    """Lion (Chen et al. 2023; lucidrains' lion-pytorch), written here in float64."""
    c = beta1 * m + (1 - beta1) * g
    return w - lr * (np.sign(c) + decay * w), beta2 * m + (1 - beta2) * g


def test_reference_matches_a_hand_written_lion() -> None:
    """Three steps with duplicate ids (summed first), against Lion's four lines."""
    rng = np.random.default_rng(4)
    lr, beta1, beta2, decay = 0.02, 0.8, 0.95, 0.1
    spec = _spec("lion", lr=lr, beta1=beta1, beta2=beta2, decoupled_decay=decay)
    w = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    m = np.zeros((ROWS, DIM), np.float32)
    for step in range(1, 4):
        ids = np.concatenate([np.arange(ROWS), rng.integers(0, ROWS, 30)])
        grads = rng.standard_normal((len(ids), DIM)).astype(np.float32)
        dense = np.zeros((ROWS, DIM))
        np.add.at(dense, ids, grads.astype(np.float64))
        snap = check.Snapshot(np.arange(ROWS), w, (m,))
        got_w, (got_m,) = check.reference_rows(spec, snap, ids, grads, step)
        want_w, want_m = lion_numpy(w.astype(np.float64), m.astype(np.float64), dense,
                                    lr, beta1, beta2, decay)
        np.testing.assert_allclose(got_w.value, want_w, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got_m.value, want_m, rtol=1e-12, atol=1e-12)
        w, m = want_w.astype(np.float32), want_m.astype(np.float32)


@pytest.mark.parametrize("optimizer", sorted(catalog.BUILTIN))
def test_check_accepts_the_kernel_and_rejects_a_slightly_wrong_one(optimizer: str) -> None:
    hyper = {"l1": 0.001, "l2": 0.01} if optimizer == "ftrl" else {}
    spec = ekko.update_kernel(optimizer, DIM, lr=0.05, **hyper).spec
    snap, table, state, ids, grads = _run_kernel(spec, np.random.default_rng(2))
    assert check.compare(spec, snap, table, state, ids, grads, 3) <= 1.0
    for wrong in [{"lr": 0.05 * 1.001}] + ([{"beta1": 0.9 * 1.001}] if optimizer == "adam" else []):
        bad = _Override(spec, wrong)
        assert check.compare(bad, snap, table, state, ids, grads, 3) > 1.0, wrong
    if optimizer == "adam":  # the step count matters (bias correction)
        assert check.compare(spec, snap, table, state, ids, grads, 4) > 1.0


def test_non_finite_values_never_pass() -> None:
    want = check.Tracked(np.array([1.0, np.nan]), np.ones(2))
    assert check.error_ratio(np.array([1.0, 1.0]), want) == float("inf")
    ok = check.Tracked(np.array([1.0, 2.0]), np.ones(2))
    assert check.error_ratio(np.array([1.0, np.inf]), ok) == float("inf")
    assert check.error_ratio(np.array([1.0, 2.0]), ok) == 0.0


@pytest.fixture()
def momentum_optimizer():
    """A user-defined optimizer with a rowwise state, out of the catalog again afterwards."""
    with catalog.OPTIMIZERS.scoped():
        @ekko.optimizer(state=("buf",), rowwise_state=("peak",), replace=True,
                        hyper={"lr": 0.05, "momentum": (0.9, 0.0, 1.0)})
        def check_test_momentum(g, w, buf, peak, *, lr, momentum, dim):
            buf = momentum * buf + g
            peak = ekko.rowmath.maximum(peak, ekko.rowmath.row_mean(abs(g), dim))
            return w - lr * buf / (1.0 + peak), buf, peak

        yield check_test_momentum.name


def test_check_covers_a_user_defined_optimizer(momentum_optimizer: str) -> None:
    """The self-check runs the catalog's math for any optimizer: the real kernel
    passes, a slightly different momentum fails."""
    spec = ekko.update_kernel(momentum_optimizer, DIM, momentum=0.7).spec
    snap, table, state, ids, grads = _run_kernel(spec, np.random.default_rng(3))
    assert check.compare(spec, snap, table, state, ids, grads, 3) <= 1.0
    assert check.compare(_Override(spec, {"momentum": 0.7 * 1.001}), snap, table, state, ids,
                         grads, 3) > 1.0
