"""The reference for `ekko run`'s self-check of the native kernels.

The update's math is the catalog's, traced afresh from the update rule (not
taken from the compiled spec) and run by the float64 interpreter
(`mathprog.evaluate`, exact real-number math), so every optimizer in the
catalog is checked, a user's own included. The interpreter shares no code
with the backends' emitters, so a wrong kernel cannot agree with it by
construction.

Tolerances follow the numerics of each value, not one relative figure: next
to every reference value the check carries a magnitude, a first-order running
error bound in units of f32 roundings, propagated op by op with one rule per
op of the semantics table (`magnitudes`); a sum counts the absolute values of
its terms, a comparison that could go either way within the errors lets a
select take either side. The kernel computes in f32, so it may differ from
the reference by a few f32 roundings of that magnitude, plus the rounding of
the master's storage type. A value that sums to nearly zero from large terms
(Adam's first moment, say) gets the tolerance its terms deserve; a NaN
anywhere fails. What the update does (optimizer, hyper-parameters, clipping,
weight decay) is read as one `UpdateRule`: the compiled spec's
(`update_rule`), or the model's when the caller passes `rule=` (then the
check also covers the compile path).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..compiler.backend.mathprog import Instr, MathProgram, evaluate, state_args, trace_program
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

K = ROUNDINGS * U32  # the error allowed per unit of magnitude
RHO64 = 2.0**-53 / U32  # an f64 operation's rounding, in f32 roundings


def _margin(x: Array, mag: Array) -> Array:
    """|x| less its possible error: how far x surely is from zero (<= 0: maybe zero)."""
    return np.abs(x) - K * mag


def _op_magnitude(ins: Instr, v: Array, a: list[Array], m: list[Array]) -> Array:
    """The magnitude of one value from its arguments' values `a` and magnitudes `m`:
    each rule is the first-order error of the op plus its own rounding."""
    rho = RHO64 if ins.f64 else 1.0
    op = ins.op
    if op in ("add", "sub"):
        return m[0] + m[1] + rho * (np.abs(a[0]) + np.abs(a[1]))
    if op == "mul":
        return rho * np.abs(v) + np.abs(a[0]) * m[1] + np.abs(a[1]) * m[0] + K * m[0] * m[1]
    if op == "div":
        d = _margin(a[1], m[1])
        return np.where(d > 0, rho * np.abs(v) + (m[0] + np.abs(v) * m[1]) / np.where(d > 0, d, 1),
                        np.inf)
    if op in ("neg", "abs"):
        return m[0]
    if op in ("max", "min"):
        return np.maximum(m[0], m[1])
    if op == "sqrt":  # error mag / (2 sqrt(x)), never more than sqrt(mag)
        spread = np.where(v > 0, m[0] / (2 * np.where(v > 0, v, 1)), np.inf)
        return rho * v + np.minimum(spread, np.sqrt(m[0] / K))
    if op == "exp":
        return np.abs(v) * (rho + m[0] * np.exp(np.minimum(K * m[0], 700.0)))
    if op == "log":
        d = _margin(a[0], m[0])
        return np.where(d > 0, rho * np.abs(v) + m[0] / np.where(d > 0, d, 1), np.inf)
    if op == "pow":  # d/da = b a**(b-1), d/db = a**b ln a
        base = np.where(m[0] > 0, np.abs(a[1] * v / a[0]) * m[0], 0.0)
        expo = np.where(m[1] > 0, np.abs(v * np.log(np.abs(a[0]))) * m[1], 0.0)
        return rho * np.abs(v) + base + expo
    if op == "f32":
        return m[0] + np.abs(v)
    if op == "row_sum":
        return np.sum(np.abs(a[0]) + m[0], axis=-1, keepdims=True)
    if op == "select":  # near a comparison's threshold either side is right
        chosen = np.where(a[0], m[1], m[2])
        jump = np.maximum(np.maximum(m[1], m[2]), np.abs(a[1] - a[2]) / K)
        return np.where(m[0] > 0, jump, chosen)
    raise ValueError(f"the self-check has no error rule for '{op}'")


def _near(a: list[Array], m: list[Array]) -> Array:
    """Whether a comparison of `a` could go either way within their errors (as 1.0)."""
    return (np.abs(a[0] - a[1]) <= K * (m[0] + m[1])).astype(np.float64)


def magnitudes(program: MathProgram, values: list[Array], g_mag: Array) -> list[Array]:
    """The magnitude of every value of `program` (see the module doc); a comparison's
    "magnitude" is 1 where it could go either way, else 0."""
    mags: list[Array] = []
    with np.errstate(all="ignore"):
        for ins, v in zip(program.instrs, values):
            a = [values[i] for i in ins.args]
            m = [mags[i] for i in ins.args]
            if ins.op == "arg":
                mag = g_mag if ins.attr == "g" else np.zeros(np.shape(v))
            elif ins.op == "const":
                mag = np.zeros(np.shape(v))
            elif ins.op == "cmp":
                mag = _near(a, m)
            elif ins.op == "select" and ins.boolean:
                mag = np.maximum(m[0], np.where(a[0], m[1], m[2]))
            else:
                mag = _op_magnitude(ins, v, a, m)
            mags.append(np.nan_to_num(np.asarray(mag, np.float64), nan=np.inf))
    return mags


Stepped = tuple[Tracked, list[Tracked]]  # the new master rows and the new state


def rule_program(rule: UpdateRule, dim: int) -> tuple[MathProgram, dict[str, float]]:
    """The catalog's math for `rule` traced afresh (not taken from a compiled spec),
    and the values of its hyper-parameter arguments."""
    grad = {name: value for name in catalog.GRAD_HYPER
            if (value := getattr(rule, name)) is not None and (value or name != "weight_decay")}
    opt = rule.optimizer.entry
    program = trace_program(opt, dict.fromkeys(grad, None), dim)
    return program, {**dict(rule.optimizer.hyper), **grad}


def _summed(snap: Snapshot, ids: np.ndarray, grads: np.ndarray, dim: int) -> Tracked:
    """Each id's gradients summed (in any order: the magnitude is the sum of |g|)."""
    where = np.searchsorted(snap.ids, ids)
    value = np.zeros((len(snap.ids), dim), np.float64)
    mag = np.zeros_like(value)
    np.add.at(value, where, grads.astype(np.float64))
    np.add.at(mag, where, np.abs(grads.astype(np.float64)))
    return Tracked(value, mag)


def reference_rows(spec: UpdateSpec, snap: Snapshot, ids: np.ndarray, grads: np.ndarray,
                   step: int, rule: UpdateRule | None = None) -> Stepped:
    """New master rows and state rows of `snap.ids` after one delta, with magnitudes,
    under `rule` (default: the spec's own, `update_rule(spec)`): the catalog's math
    (gradient transforms included) run by the float64 interpreter, for any
    optimizer in the catalog, a user's own included."""
    rule = rule if rule is not None else update_rule(spec)
    program, hyper_values = rule_program(rule, spec.dim)
    g = _summed(snap, ids, grads, spec.dim)
    w = snap.master.astype(np.float64)
    values = evaluate(program, hyper_values, g.value, w, snap.state, step, exact=True)
    mags = magnitudes(program, values, g.mag)
    rows, dim = len(snap.ids), spec.dim

    def tracked(i: int, per_row: bool) -> Tracked:
        full, shape = ((rows, 1), (rows,)) if per_row else ((rows, dim), (rows, dim))
        return Tracked(*(np.broadcast_to(x[i], full).reshape(shape).copy() for x in (values, mags)))

    return tracked(program.outputs[0], False), [
        tracked(i, a.kind == "row") for i, a in zip(program.outputs[1:], state_args(program))]


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
