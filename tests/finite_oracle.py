"""Which rows an update must refuse, predicted from the float64 interpreter.

An update is refused when some row's new value would not be finite in the
buffer that holds it: the table (after rounding to its dtype), a state, or
the serving row re-made from the stored table row. `refusals` runs the
kernel's math program (`mathprog.interpret`) on the summed gradients (or,
for an SGD kernel without dedup, on each occurrence in input order) and
returns, for every row that fails, the first buffer that would hold a
non-finite value, named as the kernels name it. Inputs far from the
overflow thresholds give the kernels' answer exactly.
"""

from __future__ import annotations

import numpy as np

from ekko.compiler.backend.mathprog import interpret
from ekko.compiler.backend.spec import UpdateSpec
from ekko.kernels.quant import bf16_bits_to_f32, f32_to_bf16_bits
from ekko.kernels.calls import buffer_name


def as_numpy(x) -> np.ndarray:
    """A numpy view of a numpy array or torch tensor (bf16 tensors as uint16 bits)."""
    if type(x).__module__.startswith("torch"):
        import torch

        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(np.uint16)
        return x.numpy()
    return np.asarray(x)


def table_f32(table, dtype: str) -> np.ndarray:
    t = as_numpy(table)
    return bf16_bits_to_f32(t) if dtype == "bf16" else t.astype(np.float32)


def _stored(w: np.ndarray, dtype: str) -> np.ndarray:
    """New weights (f32) as the table stores them, widened back to f32 (nearest even)."""
    with np.errstate(all="ignore"):
        w = w.astype(np.float32)
        if dtype == "f16":
            return w.astype(np.float16).astype(np.float32)
        if dtype == "bf16":
            return bf16_bits_to_f32(f32_to_bf16_bits(w))
        return w


def _serving_bad(stored: np.ndarray, layout: str | None) -> bool:
    """The serving row re-made from one stored row would hold a non-finite value."""
    with np.errstate(all="ignore"):
        if layout in (None, "f32"):
            return False
        if layout == "f16":
            return not np.isfinite(stored.astype(np.float16)).all()
        if layout == "bf16":
            return not np.isfinite(bf16_bits_to_f32(f32_to_bf16_bits(stored))).all()
        lo, hi = np.float32(stored.min()), np.float32(stored.max())
        if layout == "int8":
            scale = np.float32((hi - lo) / np.float32(255.0))
            top = np.float32(scale * np.float32(255.0))
            return not np.isfinite([scale, lo, top, np.float32(top + lo)]).all()
        if layout == "fp8":  # the scale, and the largest code (448) decoded
            scale = np.float32(np.maximum(-lo, hi) / np.float32(448.0))
            return not np.isfinite([scale, np.float32(scale * np.float32(448.0))]).all()
        if layout != "int4":
            raise ValueError(f"no finite-output rule for layout {layout!r}")
        bias = np.float16(lo)
        scale = np.float16(np.float32(hi - np.float32(bias)) / np.float32(15.0))
        return not (np.isfinite(bias) and np.isfinite(scale))


def _row_fails(spec: UpdateSpec, g: np.ndarray, w: np.ndarray, states: list[np.ndarray],
               step: int) -> tuple[str | None, np.ndarray, list[np.ndarray]]:
    """(first bad buffer or None, stored new row, new state rows) of one row."""
    new_w, new_states = interpret(spec.math, dict(spec.hyper), g[None], w[None],
                                  [s[None] for s in states], step)
    stored = _stored(new_w[0], spec.table_dtype)
    if not np.isfinite(stored).all():
        return buffer_name(spec, 0), stored, []
    for k, s in enumerate(new_states):
        if not np.isfinite(s).all():
            return buffer_name(spec, 1 + k), stored, []
    if _serving_bad(stored, spec.serving):
        return buffer_name(spec, 1 + len(new_states)), stored, []
    return None, stored, [s[0] for s in new_states]


def refusals(spec: UpdateSpec, table, states: list, ids, grads, step: int = 1) -> dict[int, str]:
    """{row: first buffer that would not be finite} over every failing row; {} if none."""
    w = table_f32(table, spec.table_dtype)
    st = [as_numpy(s).astype(np.float64) for s in states]
    ids = as_numpy(ids).astype(np.int64)
    g = as_numpy(grads).astype(np.float32)
    bad: dict[int, str] = {}
    if not spec.dedup:  # each occurrence in input order, as the kernel applies them
        current = {int(r): w[r].astype(np.float64) for r in np.unique(ids)}
        for r, row in zip(ids.tolist(), g):
            if r in bad:
                continue
            buffer, stored, _ = _row_fails(spec, row.astype(np.float64), current[r],
                                           [s[r] for s in st], step)
            if buffer is not None:
                bad[r] = buffer
            current[r] = stored.astype(np.float64)
        return bad
    uniq = np.unique(ids)
    summed = np.zeros((len(uniq), g.shape[1]), np.float32)
    with np.errstate(all="ignore"):
        np.add.at(summed, np.searchsorted(uniq, ids), g)  # f32, in input order
    for r, row in zip(uniq.tolist(), summed):
        buffer, _, _ = _row_fails(spec, row.astype(np.float64), w[r].astype(np.float64),
                                  [s[r] for s in st], step)
        if buffer is not None:
            bad[r] = buffer
    return bad
