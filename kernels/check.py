"""A numpy reference for `ekko run`'s self-check of the native kernels.

Plain numpy in float64, written from the UpdateSpec semantics and sharing no
code with the LLVM backend, so a wrong kernel cannot agree with it by
construction.

Tolerances follow the numerics of each value, not one relative figure: next
to every reference value the check carries a magnitude, the sum of the
absolute values of the terms that went into it (a first-order running error
bound). The kernel computes in f32, so it may differ from the reference by a
few f32 roundings of that magnitude, plus the rounding of the master's
storage type. A value that sums to nearly zero from large terms (Adam's first
moment, say) gets the tolerance its terms deserve; a NaN anywhere fails.

Each optimizer is one entry of `OPTIMIZERS`: a function from the gradient,
the weights and the state (values and magnitudes) to new ones. What the
update does (optimizer, hyper-parameters, clipping, weight decay) is read as
one `UpdateRule`: the compiled spec's (`update_rule`), or the model's when the
caller passes `rule=` (then the check also covers the compile path).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..compiler.backend.spec import UpdateSpec
from ..compiler.frontend.model import UpdateRule
from ..dialects import catalog
from .quant import dequantize_rows

U32 = 2.0**-24  # unit roundoff of f32
# f32 roundings allowed per unit of magnitude: summing a few hundred duplicate
# rows and a dozen operations per element stay far below it, while a wrong
# hyper-parameter or formula is off by 1e-3 or more of the magnitude.
ROUNDINGS = 256
# rounding of the stored master row (stochastic rounding: up to a whole ulp),
# relative to the value, plus the smallest spacing (f16 subnormals)
STORE_ULP = {"f32": 0.0, "f16": 2.0**-10, "bf16": 2.0**-7}
STORE_FLOOR = {"f32": 0.0, "f16": 2.0**-24, "bf16": 0.0}

Array = np.ndarray


@dataclass
class Snapshot:
    """Copies of the rows a delta will touch, taken before it is applied."""

    ids: np.ndarray
    master: np.ndarray
    state: tuple[np.ndarray, ...]


@dataclass
class Tracked:
    """A float64 reference value and its magnitude: the f32 kernel's value may be off
    by a few roundings of `mag` (0 for exact inputs; each operation adds its
    operands' magnitudes and its own rounding)."""

    value: Array
    mag: Array


def to_f32(rows: np.ndarray, dtype: str, dim: int) -> np.ndarray:
    return rows.astype(np.float32) if dtype == "f32" else dequantize_rows(rows, dtype, dim)


def _states(state: Any) -> tuple[np.ndarray, ...]:
    return state if isinstance(state, tuple) else (() if state is None else (state,))


def hyper(spec: Any, name: str) -> float:
    """A hyper-parameter of a spec: its attribute, else its `hyper` pairs."""
    value = getattr(spec, name, None)
    if value is None:
        pairs = getattr(spec, "hyper", None) or {}
        value = (pairs if isinstance(pairs, Mapping) else dict(pairs))[name]
    return float(value)


def update_rule(spec: Any) -> UpdateRule:
    """The update a spec's kernel applies, as an UpdateRule: its optimizer, the
    value of each of its hyper-parameters, and its clipping and weight decay."""
    names = catalog.optimizer(spec.optimizer).hyper_names
    return UpdateRule.make(
        spec.optimizer, **{name: hyper(spec, name) for name in names},
        max_norm=getattr(spec, "max_norm", None), clip_value=getattr(spec, "clip_value", None),
        weight_decay=getattr(spec, "weight_decay", None) or 0.0,
        stochastic_rounding=bool(getattr(spec, "stochastic_rounding", False)))


def snapshot(spec: UpdateSpec, master: np.ndarray, state, ids: np.ndarray) -> Snapshot:
    uniq = np.unique(ids)
    return Snapshot(uniq, to_f32(master[uniq], spec.table_dtype, spec.dim),
                    tuple(s[uniq].astype(np.float32).copy() for s in _states(state)))


# -- the math, value and magnitude side by side --------------------------------


def _square(g: Tracked) -> Tracked:
    """g*g: its rounding plus twice g's error."""
    return Tracked(g.value**2, g.value**2 + 2 * np.abs(g.value) * g.mag)


def _sqrt(x: Tracked) -> Tracked:
    """sqrt(x): error x.err / (2 sqrt(x)), never more than sqrt(x.err)."""
    root = np.sqrt(np.maximum(x.value, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        spread = np.where(root > 0, x.mag / (2 * root), np.inf)
    capped = np.minimum(spread, np.sqrt(x.mag / (ROUNDINGS * U32)))
    return Tracked(root, root + capped)


def _scaled_step(lr: float, g: Tracked, denom: Tracked) -> Tracked:
    """lr * g / denom: relative errors add."""
    step = lr * g.value / denom.value
    mag = lr * (g.mag / denom.value + np.abs(g.value) * denom.mag / denom.value**2)
    return Tracked(step, np.abs(step) + mag)


def _minus(w: Tracked, step: Tracked) -> Tracked:
    return Tracked(w.value - step.value, np.abs(w.value) + w.mag + step.mag)


def _plus(a: Tracked, b: Tracked) -> Tracked:
    return Tracked(a.value + b.value, np.abs(a.value) + a.mag + np.abs(b.value) + b.mag)


def _plus_eps(x: Tracked, eps: float) -> Tracked:
    return Tracked(x.value + eps, x.mag + eps)


def _mix(a: float, s: Tracked, b: float, x: Tracked) -> Tracked:
    """a*s + b*x, as an exponential moving average."""
    value = a * s.value + b * x.value
    return Tracked(value, a * (np.abs(s.value) + s.mag) + b * (np.abs(x.value) + x.mag))


Hyper = Callable[[str], float]
Stepped = tuple[Tracked, list[Tracked]]  # the new master rows and the new state


def _sgd(g: Tracked, w: Tracked, states: list[Tracked], h: Hyper, step: int) -> Stepped:
    return _minus(w, Tracked(h("lr") * g.value, h("lr") * (np.abs(g.value) + g.mag))), []


def _adagrad(g: Tracked, w: Tracked, states: list[Tracked], h: Hyper, step: int) -> Stepped:
    clr = h("lr") / (1 + (step - 1) * h("lr_decay"))
    gg = _square(g)
    s = _plus(states[0], gg)
    return _minus(w, _scaled_step(clr, g, _plus_eps(_sqrt(s), h("eps")))), [s]


def _rowwise_adagrad(g: Tracked, w: Tracked, states: list[Tracked], h: Hyper, step: int) -> Stepped:
    gg = _square(g)
    m0 = states[0]
    m = _plus(Tracked(m0.value.reshape(-1, 1), m0.mag.reshape(-1, 1)),
              Tracked(gg.value.mean(axis=1, keepdims=True), gg.mag.mean(axis=1, keepdims=True)))
    w_new = _minus(w, _scaled_step(h("lr"), g, _plus_eps(_sqrt(m), h("eps"))))
    return w_new, [Tracked(m.value.reshape(-1), m.mag.reshape(-1))]


def _adam(g: Tracked, w: Tracked, states: list[Tracked], h: Hyper, step: int) -> Stepped:
    b1, b2 = h("beta1"), h("beta2")
    m = _mix(b1, states[0], 1 - b1, g)
    v = _mix(b2, states[1], 1 - b2, _square(g))
    size = h("lr") * np.sqrt(1 - b2**step) / (1 - b1**step)
    return _minus(w, _scaled_step(size, m, _plus_eps(_sqrt(v), h("eps")))), [m, v]


def _rmsprop(g: Tracked, w: Tracked, states: list[Tracked], h: Hyper, step: int) -> Stepped:
    v = _mix(h("alpha"), states[0], 1 - h("alpha"), _square(g))
    return _minus(w, _scaled_step(h("lr"), g, _plus_eps(_sqrt(v), h("eps")))), [v]


def _ftrl(g: Tracked, w: Tracked, states: list[Tracked], h: Hyper, step: int) -> Stepped:
    """FTRL-Proximal per coordinate (McMahan et al. 2013)."""
    lr, l1, l2, beta = h("lr"), h("l1"), h("l2"), h("beta")
    z0, n0 = states
    n = _plus(n0, _square(g))
    root_old, root_new = _sqrt(n0), _sqrt(n)
    sigma = Tracked((root_new.value - root_old.value) / lr, (root_new.mag + root_old.mag) / lr)
    sw = Tracked(sigma.value * w.value, np.abs(sigma.value) * (np.abs(w.value) + w.mag)
                 + sigma.mag * np.abs(w.value))
    z = _minus(_plus(z0, g), sw)
    denom = Tracked((beta + root_new.value) / lr + l2, (beta + root_new.mag) / lr + l2)
    shrunk = Tracked(np.abs(z.value) - l1, np.abs(z.value) + z.mag + l1)
    value = np.where(np.abs(z.value) <= l1, 0.0, -np.sign(z.value) * shrunk.value / denom.value)
    step_mag = (shrunk.mag / denom.value + np.abs(shrunk.value) * denom.mag / denom.value**2
                + np.abs(value))
    # within a rounding of the threshold, either side is right: allow the jump
    near = np.abs(np.abs(z.value) - l1) <= ROUNDINGS * U32 * z.mag
    zeroed = np.abs(z.value) <= l1
    mag = np.where(near, np.maximum(step_mag, np.abs(value) / (ROUNDINGS * U32)),
                   np.where(zeroed, 0.0, step_mag))
    return Tracked(value, mag), [z, n]


# optimizer name -> its reference math; a new optimizer is one entry here
OPTIMIZERS: dict[str, Callable[..., Stepped]] = {
    "sgd": _sgd,
    "adagrad": _adagrad,
    "rowwise_adagrad": _rowwise_adagrad,
    "adam": _adam,
    "rmsprop": _rmsprop,
    "ftrl": _ftrl,
}


def _gradients(rule: UpdateRule, dim: int, snap: Snapshot, ids: np.ndarray, grads: np.ndarray,
               w: Tracked) -> Tracked:
    """Duplicates summed, then clip by value, by norm, and weight decay (as torch)."""
    where = np.searchsorted(snap.ids, ids)
    value = np.zeros((len(snap.ids), dim), np.float64)
    mag = np.zeros_like(value)
    np.add.at(value, where, grads.astype(np.float64))
    np.add.at(mag, where, np.abs(grads.astype(np.float64)))
    if rule.clip_value is not None:
        value = np.clip(value, -rule.clip_value, rule.clip_value)
    if rule.max_norm is not None:
        norm = np.linalg.norm(value, axis=1, keepdims=True)
        factor = np.where(norm > rule.max_norm, rule.max_norm / np.maximum(norm, 1e-300), 1.0)
        spread = np.abs(value) * mag.sum(axis=1, keepdims=True) / np.maximum(norm, 1e-300)
        mag = factor * (mag + np.where(factor < 1, spread, 0.0))
        value = value * factor
    if rule.weight_decay:
        value = value + rule.weight_decay * w.value
        mag = mag + rule.weight_decay * (np.abs(w.value) + w.mag)
    return Tracked(value, mag)


def reference_rows(spec: UpdateSpec, snap: Snapshot, ids: np.ndarray, grads: np.ndarray,
                   step: int, rule: UpdateRule | None = None) -> Stepped:
    """New master rows and state rows of `snap.ids` after one delta, with magnitudes,
    under `rule` (default: the spec's own, `update_rule(spec)`)."""
    kind = rule.optimizer.kind if rule is not None else spec.optimizer
    if kind not in OPTIMIZERS:
        raise KeyError(f"the self-check has no reference for optimizer {kind!r}")
    rule = rule if rule is not None else update_rule(spec)
    w = Tracked(snap.master.astype(np.float64), np.zeros(snap.master.shape))
    states = [Tracked(s.astype(np.float64), np.zeros(s.shape)) for s in snap.state]
    g = _gradients(rule, spec.dim, snap, ids, grads, w)
    return OPTIMIZERS[kind](g, w, states, rule.optimizer.value, step)


def error_ratio(got: np.ndarray, want: Tracked, dtype: str = "f32") -> float:
    """Largest |got - want| over its tolerance; inf when either side is not finite."""
    got = np.asarray(got, np.float64).reshape(want.value.shape)
    if not (np.isfinite(got).all() and np.isfinite(want.value).all()):
        return float("inf")
    tol = (ROUNDINGS * U32 * want.mag + STORE_ULP[dtype] * np.abs(want.value)
           + STORE_FLOOR[dtype] + 1e-30)
    return float(np.max(np.abs(got - want.value) / tol, initial=0.0))


def compare(spec: UpdateSpec, snap: Snapshot, master: np.ndarray, state, ids: np.ndarray,
            grads: np.ndarray, step: int, rule: UpdateRule | None = None) -> float:
    """Largest error of the kernel's result against the reference, relative to tolerance.

    A value above 1 (or inf) means the kernel disagrees with numpy. `rule`:
    the update the model asked for (default: what the spec says it does).
    """
    want_w, want_states = reference_rows(spec, snap, ids, grads, step, rule)
    worst = error_ratio(to_f32(master[snap.ids], spec.table_dtype, spec.dim), want_w,
                        spec.table_dtype)
    for got, want in zip(_states(state), want_states, strict=True):
        worst = max(worst, error_ratio(got[snap.ids], want))
    return worst


def reference_bags(table_f32: np.ndarray, ids: np.ndarray, offsets: np.ndarray | None,
                   mode: str) -> np.ndarray:
    """Pooled bags (B+1 offsets) or rows (mode none) from a dequantized table."""
    if mode == "none":
        return table_f32[ids].astype(np.float64)
    out = np.zeros((len(offsets) - 1, table_f32.shape[1]), np.float64)
    for b in range(len(offsets) - 1):
        rows = table_f32[ids[offsets[b]:offsets[b + 1]]].astype(np.float64)
        if len(rows):
            out[b] = rows.sum(0) if mode == "sum" else rows.mean(0)
    return out


def reference_lookup(rows_f32: np.ndarray, biased: bool, ids: np.ndarray,
                     offsets: np.ndarray | None, mode: str) -> Tracked:
    """Pooled bags with magnitudes: a biased row's value is code*scale + bias,
    so its magnitude counts the bias (the row's minimum) twice over."""
    mag_rows = np.abs(rows_f32.astype(np.float64))
    if biased:
        mag_rows = mag_rows + 2 * np.abs(rows_f32.min(axis=1, keepdims=True))
    return Tracked(reference_bags(rows_f32, ids, offsets, mode),
                   reference_bags(mag_rows, ids, offsets, mode))
