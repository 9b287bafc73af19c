"""A numpy reference for `ekko run`'s self-check of the native kernels.

Plain numpy, written from the UpdateSpec semantics and sharing no code with
the LLVM backend, so a wrong kernel cannot agree with it by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..compiler.backend.spec import UpdateSpec
from .quant import dequantize_rows


@dataclass
class Snapshot:
    """Copies of the rows a delta will touch, taken before it is applied."""

    ids: np.ndarray
    master: np.ndarray
    state: tuple[np.ndarray, ...]


def to_f32(rows: np.ndarray, dtype: str, dim: int) -> np.ndarray:
    return rows.astype(np.float32) if dtype == "f32" else dequantize_rows(rows, dtype, dim)


def snapshot(spec: UpdateSpec, master: np.ndarray, state, ids: np.ndarray) -> Snapshot:
    uniq = np.unique(ids)
    states = state if isinstance(state, tuple) else (() if state is None else (state,))
    return Snapshot(uniq, to_f32(master[uniq], spec.table_dtype, spec.dim),
                    tuple(s[uniq].astype(np.float32).copy() for s in states))


def reference_rows(spec: UpdateSpec, snap: Snapshot, ids: np.ndarray, grads: np.ndarray,
                   step: int) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """New f32 master rows and state rows of `snap.ids` after one delta."""
    g = np.zeros((len(snap.ids), spec.dim), np.float64)
    np.add.at(g, np.searchsorted(snap.ids, ids), grads.astype(np.float64))
    w = snap.master.astype(np.float64)
    if spec.clip_value is not None:
        g = np.clip(g, -spec.clip_value, spec.clip_value)
    if spec.max_norm is not None:
        norm = np.linalg.norm(g, axis=1, keepdims=True)
        g = np.where(norm > spec.max_norm, g * (spec.max_norm / np.maximum(norm, 1e-30)), g)
    if spec.weight_decay:
        g = g + spec.weight_decay * w
    states = [s.astype(np.float64) for s in snap.state]
    if spec.optimizer == "sgd":
        w = w - spec.lr * g
    elif spec.optimizer == "adagrad":
        clr = spec.lr / (1 + (step - 1) * spec.lr_decay)
        states[0] = states[0] + g * g
        w = w - clr * g / (np.sqrt(states[0]) + spec.eps)
    elif spec.optimizer == "rowwise_adagrad":
        states[0] = states[0].reshape(-1) + np.mean(g * g, axis=1)
        w = w - spec.lr * g / (np.sqrt(states[0])[:, None] + spec.eps)
    else:
        b1, b2 = spec.beta1, spec.beta2
        states[0] = b1 * states[0] + (1 - b1) * g
        states[1] = b2 * states[1] + (1 - b2) * g * g
        size = spec.lr * np.sqrt(1 - b2**step) / (1 - b1**step)
        w = w - size * states[0] / (np.sqrt(states[1]) + spec.eps)
    return w.astype(np.float32), tuple(s.astype(np.float32) for s in states)


def tolerance(dtype: str) -> float:
    """Relative tolerance of a master table's storage type."""
    return {"f32": 1e-4, "f16": 2e-3, "bf16": 1.6e-2}[dtype]


def compare(spec: UpdateSpec, snap: Snapshot, master: np.ndarray, state, ids: np.ndarray,
            grads: np.ndarray, step: int) -> float:
    """Largest error of the kernel's result against the reference, relative to tolerance.

    A value above 1 means the kernel disagrees with numpy.
    """
    want_w, want_states = reference_rows(spec, snap, ids, grads, step)
    got_w = to_f32(master[snap.ids], spec.table_dtype, spec.dim)
    tol = tolerance(spec.table_dtype)
    worst = float(np.max(np.abs(got_w - want_w) / (tol * (np.abs(want_w) + 1e-3)), initial=0.0))
    states = state if isinstance(state, tuple) else (() if state is None else (state,))
    for got, want in zip(states, want_states):
        got_rows = got[snap.ids].reshape(want.shape)
        err = np.abs(got_rows - want) / (1e-4 * (np.abs(want) + 1e-6))
        worst = max(worst, float(np.max(err, initial=0.0)))
    return worst


def reference_bags(table_f32: np.ndarray, ids: np.ndarray, offsets: np.ndarray | None,
                   mode: str) -> np.ndarray:
    """Pooled bags (B+1 offsets) or rows (mode none) from a dequantized table."""
    if mode == "none":
        return table_f32[ids]
    out = np.zeros((len(offsets) - 1, table_f32.shape[1]), np.float64)
    for b in range(len(offsets) - 1):
        rows = table_f32[ids[offsets[b]:offsets[b + 1]]].astype(np.float64)
        if len(rows):
            out[b] = rows.sum(0) if mode == "sum" else rows.mean(0)
    return out.astype(np.float32)
