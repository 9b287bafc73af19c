"""Independent references for the fused sparse update kernels.

Two families, written without looking at the kernel, so a test that compares
against them checks the semantics of `UpdateSpec` and not an implementation:

* torch.optim driven by a sparse gradient (SGD, Adagrad, SparseAdam): the
  optimizers users already trust. Duplicates are summed by coalescing, exactly
  as torch does for embedding gradients.
* numpy for what torch.optim does not have: FBGEMM's rowwise Adagrad, the
  gradient transforms (clip, max-norm, weight decay), the serving layouts
  (f16, bf16, int8/int4 fused row-wise) and the version stamps.

Everything is computed in float32 (float64 where noted) on copies; inputs are
never modified. bf16 values are carried as uint16 bit patterns in numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ekko.compiler.frontend.model import UpdateRule

# --------------------------------------------------------------------------
# dtype helpers


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round f32 to bf16 nearest-even, as bits: the rounding the spec mandates."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    out[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)  # keep NaN a NaN
    return out


def bf16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    """Widen bf16 bits to f32 exactly (bf16 is the top half of an f32)."""
    b = np.ascontiguousarray(b, dtype=np.uint16)
    return (b.astype(np.uint32) << 16).view(np.float32)


def to_f32(table: Any, dtype: str) -> np.ndarray:
    """A table of `dtype` ("f32", "f16", "bf16") as an f32 numpy copy."""
    if isinstance(table, torch.Tensor):
        return table.detach().to(torch.float32).numpy().copy()
    if dtype == "bf16":
        return bf16_bits_to_f32(table)
    return np.asarray(table, dtype=np.float32).copy()


def round_to(w: np.ndarray, dtype: str) -> np.ndarray:
    """Nearest-even f32 -> table dtype, returned widened back to f32."""
    if dtype == "f32":
        return w.astype(np.float32)
    if dtype == "f16":
        return w.astype(np.float16).astype(np.float32)
    return bf16_bits_to_f32(f32_to_bf16_bits(w))


def ulp(x: np.ndarray, dtype: str) -> np.ndarray:
    """Spacing of `dtype` values at |x| (the larger neighbour gap at powers of two)."""
    x = np.abs(np.asarray(x, dtype=np.float32))
    if dtype == "f32":
        return np.spacing(x).astype(np.float32)
    if dtype == "f16":
        h = x.astype(np.float16)
        # spacing at the rounded value, and at the next binade when rounding went up
        return np.maximum(np.spacing(h), np.spacing(np.nextafter(h, np.float16(np.inf)))).astype(np.float32)
    mant_bits = 7  # bf16: 8 exponent bits like f32, 7 stored mantissa bits
    exp = np.floor(np.log2(np.maximum(x * (1 + 2.0**-8), 2.0**-126)))  # binade after rounding up
    return (2.0 ** (exp - mant_bits)).astype(np.float32)


def neighbours(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The representable `dtype` values just below and just above x (f32 in)."""
    r = round_to(x, dtype)
    if dtype == "f16":
        hi_step = np.nextafter(r.astype(np.float16), np.float16(np.inf)).astype(np.float32)
        lo_step = np.nextafter(r.astype(np.float16), np.float16(-np.inf)).astype(np.float32)
    elif dtype == "bf16":
        bits = f32_to_bf16_bits(r).astype(np.int32)
        sign = np.where(r < 0, -1, 1)
        up = bf16_bits_to_f32(np.where(r == 0, 1, bits + sign).astype(np.uint16))
        down = bf16_bits_to_f32(np.where(r == 0, 0x8001, bits - sign).astype(np.uint16))
        hi_step, lo_step = up, down
    else:
        hi_step = np.nextafter(r, np.float32(np.inf))
        lo_step = np.nextafter(r, np.float32(-np.inf))
    lo = np.where(r <= x, r, lo_step)
    hi = np.where(r >= x, r, hi_step)
    return lo.astype(np.float32), hi.astype(np.float32)


# --------------------------------------------------------------------------
# gradient side


@dataclass(frozen=True)
class Hyper:
    """Hyper-parameters for any optimizer, as update_kernel's keywords take them;
    `rule(optimizer)` is the one UpdateRule they make for that optimizer, which
    the references below read."""

    lr: float = 0.01
    eps: float = 1e-10
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    lr_decay: float = 0.0
    max_norm: float | None = None
    clip_value: float | None = None

    def rule(self, optimizer: str) -> UpdateRule:
        """The UpdateRule these values give `optimizer` (its own hyper-parameters only)."""
        values = {"lr": self.lr, "eps": self.eps, "beta1": self.betas[0], "beta2": self.betas[1],
                  "lr_decay": self.lr_decay}
        names = UpdateRule.make(optimizer).optimizer.entry.hyper_names
        return UpdateRule.make(optimizer, **{k: v for k, v in values.items() if k in names},
                               max_norm=self.max_norm, clip_value=self.clip_value,
                               weight_decay=self.weight_decay)

    def kwargs(self, optimizer: str) -> dict[str, Any]:
        """Keyword arguments for `update_kernel(optimizer, ...)`: the optimizer's own
        hyper-parameters (it refuses any other) and the gradient settings."""
        names = UpdateRule.make(optimizer).optimizer.entry.hyper_names
        own = {"lr": self.lr, "eps": self.eps, "lr_decay": self.lr_decay}
        out: dict[str, Any] = {k: v for k, v in own.items() if k in names}
        if "beta1" in names:
            out["betas"] = self.betas
        return dict(out, weight_decay=self.weight_decay, max_norm=self.max_norm,
                    clip_value=self.clip_value)


def dedup(ids: np.ndarray, grads: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique ids and their summed gradient rows (summed in float64)."""
    ids = np.asarray(ids, dtype=np.int64)
    grads = np.asarray(grads, dtype=np.float32)
    grads = grads.reshape(len(ids), grads.shape[-1] if grads.ndim > 1 else -1)
    uniq, inv = np.unique(ids, return_inverse=True)
    acc = np.zeros((len(uniq), grads.shape[1]), dtype=np.float64)
    np.add.at(acc, inv, grads)
    return uniq, acc.astype(np.float32)


def transform_grad(g: np.ndarray, w: np.ndarray, rule: UpdateRule) -> np.ndarray:
    """Clip value, then max-norm, then weight decay: the order of UpdateSpec."""
    g = g.astype(np.float32, copy=True)
    if rule.clip_value is not None:
        g = np.clip(g, -rule.clip_value, rule.clip_value)
    if rule.max_norm is not None:
        norm = np.sqrt((g.astype(np.float64) ** 2).sum(axis=1))
        scale = np.where(norm > rule.max_norm, rule.max_norm / np.maximum(norm, 1e-300), 1.0)
        g = (g * scale[:, None]).astype(np.float32)
    if rule.weight_decay:
        g = (g + np.float32(rule.weight_decay) * w).astype(np.float32)
    return g


# --------------------------------------------------------------------------
# optimizers


@dataclass
class RefState:
    """Reference optimizer state: named f32 arrays, torch.optim's names and shapes."""

    optimizer: str
    buffers: dict[str, np.ndarray] = field(default_factory=dict)


def init_state(optimizer: str, rows: int, dim: int, rng: np.random.Generator | None = None) -> RefState:
    """A fresh reference state; with `rng`, a random non-trivial starting state."""
    def pos(shape: tuple[int, ...]) -> np.ndarray:
        if rng is None:
            return np.zeros(shape, np.float32)
        return rng.uniform(0.01, 1.0, shape).astype(np.float32)

    if optimizer == "sgd":
        return RefState(optimizer)
    if optimizer == "adagrad":
        return RefState(optimizer, {"sum": pos((rows, dim))})
    if optimizer == "rowwise_adagrad":
        return RefState(optimizer, {"momentum": pos((rows,))})
    if optimizer == "adam":
        exp_avg = np.zeros((rows, dim), np.float32) if rng is None else rng.normal(0, 0.1, (rows, dim)).astype(np.float32)
        return RefState(optimizer, {"exp_avg": exp_avg, "exp_avg_sq": pos((rows, dim))})
    raise ValueError(optimizer)


def to_kernel_state(state: RefState) -> Any:
    """Map reference state to the kernel's layout (fresh copies the kernel may update).

    sgd -> None; adagrad -> (rows, dim) sum; rowwise_adagrad -> (rows,) momentum;
    adam -> (exp_avg, exp_avg_sq).
    """
    b = {k: v.copy() for k, v in state.buffers.items()}
    return {
        "sgd": lambda: None,
        "adagrad": lambda: b["sum"],
        "rowwise_adagrad": lambda: b["momentum"],
        "adam": lambda: (b["exp_avg"], b["exp_avg_sq"]),
    }[state.optimizer]()


def from_kernel_state(optimizer: str, kstate: Any) -> dict[str, np.ndarray]:
    """The kernel's state back as named f32 arrays, to compare with a RefState."""
    def arr(x: Any) -> np.ndarray:
        return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

    if optimizer == "sgd":
        return {}
    if optimizer == "adam":
        return {"exp_avg": arr(kstate[0]), "exp_avg_sq": arr(kstate[1])}
    return {("sum" if optimizer == "adagrad" else "momentum"): arr(kstate)}


def _torch_step(optimizer: str, w: np.ndarray, uniq: np.ndarray, g: np.ndarray,
                state: RefState, step: int, rule: UpdateRule) -> np.ndarray:
    """One torch.optim step on a sparse gradient; updates `state` in place, returns new w."""
    h = rule.optimizer.value
    rows, dim = w.shape
    p = torch.nn.Parameter(torch.from_numpy(w.copy()))
    p.grad = torch.sparse_coo_tensor(torch.from_numpy(uniq)[None], torch.from_numpy(g), (rows, dim),
                                     check_invariants=True)
    if optimizer == "sgd":
        opt = torch.optim.SGD([p], lr=h("lr"))
    elif optimizer == "adagrad":
        opt = torch.optim.Adagrad([p], lr=h("lr"), lr_decay=h("lr_decay"), eps=h("eps"))
        opt.state[p]["sum"] = torch.from_numpy(state.buffers["sum"])
        opt.state[p]["step"] = torch.tensor(float(step - 1))
    else:
        opt = torch.optim.SparseAdam([p], lr=h("lr"), betas=(h("beta1"), h("beta2")), eps=h("eps"))
        opt.state[p].update(step=step - 1, exp_avg=torch.from_numpy(state.buffers["exp_avg"]),
                            exp_avg_sq=torch.from_numpy(state.buffers["exp_avg_sq"]))
    with torch.sparse.check_sparse_tensor_invariants(enable=False):
        opt.step()
    return p.detach().numpy().copy()


def _rowwise_adagrad(w: np.ndarray, uniq: np.ndarray, g: np.ndarray, state: RefState,
                     rule: UpdateRule) -> np.ndarray:
    """FBGEMM: m += mean(g*g); w -= lr * g / (sqrt(m) + eps), on touched rows only."""
    m = state.buffers["momentum"]
    m[uniq] = m[uniq] + (g.astype(np.float64) ** 2).mean(axis=1).astype(np.float32)
    out = w.copy()
    denom = np.sqrt(m[uniq]).astype(np.float32) + np.float32(rule.optimizer.value("eps"))
    out[uniq] = w[uniq] - np.float32(rule.optimizer.value("lr")) * g / denom[:, None]
    return out


def reference_step(optimizer: str, w: np.ndarray, ids: np.ndarray, grads: np.ndarray,
                   state: RefState, step: int, hp: Hyper | UpdateRule
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One full update in f32 (before rounding to the table dtype), under the
    rule `hp` gives `optimizer` (or `hp` itself, a rule).

    Returns (new f32 table, sorted touched ids). `state` is updated in place.
    """
    rule = hp if isinstance(hp, UpdateRule) else hp.rule(optimizer)
    uniq, g = dedup(ids, grads)
    if len(uniq) == 0:
        return w.copy(), uniq
    g = transform_grad(g, w[uniq], rule)
    if optimizer == "rowwise_adagrad":
        return _rowwise_adagrad(w, uniq, g, state, rule), uniq
    return _torch_step(optimizer, w, uniq, g, state, step, rule), uniq


# --------------------------------------------------------------------------
# serving copies and versions


def quantize_int8(w: np.ndarray) -> np.ndarray:
    """FBGEMM fused row-wise int8: codes, f32 scale=(max-min)/255, f32 bias=min."""
    w = w.astype(np.float32)
    mn, mx = w.min(axis=1), w.max(axis=1)
    scale = ((mx - mn) / np.float32(255.0)).astype(np.float32)
    inv = np.float32(255.0) / (mx - mn + np.float32(1e-8))
    codes = np.clip(np.rint((w - mn[:, None]) * inv[:, None]), 0, 255).astype(np.uint8)
    return np.concatenate([codes, scale[:, None].view(np.uint8), mn[:, None].view(np.uint8)], axis=1)


def dequantize_int8(buf: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, scale, bias) of int8 serving rows."""
    buf = np.ascontiguousarray(buf, dtype=np.uint8)
    scale = buf[:, dim:dim + 4].copy().view(np.float32)[:, 0]
    bias = buf[:, dim + 4:dim + 8].copy().view(np.float32)[:, 0]
    return buf[:, :dim] * scale[:, None] + bias[:, None], scale, bias


def quantize_int4(w: np.ndarray) -> np.ndarray:
    """FBGEMM fused row-wise int4: two codes a byte (low nibble first), f16 scale and bias."""
    w = w.astype(np.float32)
    dim = w.shape[1]
    bias = w.min(axis=1).astype(np.float16)
    rng = w.max(axis=1) - bias.astype(np.float32)
    scale = (rng / np.float32(15.0)).astype(np.float16)
    s32 = np.where(scale.astype(np.float32) == 0, np.float32(1.0), scale.astype(np.float32))
    codes = np.clip(np.rint((w - bias.astype(np.float32)[:, None]) / s32[:, None]), 0, 15).astype(np.uint8)
    if dim % 2:
        codes = np.concatenate([codes, np.zeros((len(w), 1), np.uint8)], axis=1)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return np.concatenate([packed, scale[:, None].view(np.uint8), bias[:, None].view(np.uint8)], axis=1)


def dequantize_int4(buf: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, scale, bias) of int4 serving rows, scale and bias widened to f32."""
    buf = np.ascontiguousarray(buf, dtype=np.uint8)
    nb = (dim + 1) // 2
    codes = np.empty((len(buf), 2 * nb), np.uint8)
    codes[:, 0::2] = buf[:, :nb] & 0xF
    codes[:, 1::2] = buf[:, :nb] >> 4
    scale = buf[:, nb:nb + 2].copy().view(np.float16)[:, 0].astype(np.float32)
    bias = buf[:, nb + 2:nb + 4].copy().view(np.float16)[:, 0].astype(np.float32)
    return codes[:, :dim] * scale[:, None] + bias[:, None], scale, bias


def quantize_fp8(w: np.ndarray) -> np.ndarray:
    """fp8 rows by torch: float8_e4m3fn codes of row / scale, then the f32 scale
    max|row| / 448 (a row whose scale is 0 gets codes 0)."""
    import torch

    w = np.ascontiguousarray(w, dtype=np.float32)
    scale = (np.abs(w).max(axis=1) / np.float32(448.0)).astype(np.float32)
    safe = np.where(scale == 0, np.float32(1.0), scale)
    codes = torch.from_numpy(w / safe[:, None]).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    codes = np.where(scale[:, None] == 0, np.uint8(0), codes).astype(np.uint8)
    return np.concatenate([codes, scale[:, None].view(np.uint8)], axis=1)


def dequantize_fp8(buf: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, scale) of fp8 rows by torch: codes.view(float8).float() * scale."""
    import torch

    buf = np.ascontiguousarray(buf, dtype=np.uint8)
    scale = buf[:, dim:dim + 4].copy().view(np.float32)[:, 0]
    codes = torch.from_numpy(buf[:, :dim].copy()).view(torch.float8_e4m3fn).float().numpy()
    return (codes * scale[:, None]).astype(np.float32), scale


def serving_rows(w: np.ndarray, layout: str) -> np.ndarray:
    """Reference serving rows made from the stored master rows `w` (f32 values)."""
    if layout == "f32":
        return w.astype(np.float32)
    if layout == "f16":
        return w.astype(np.float16)
    if layout == "bf16":
        return f32_to_bf16_bits(w)
    if layout == "int8":
        return quantize_int8(w)
    if layout == "int4":
        return quantize_int4(w)
    if layout == "fp8":
        return quantize_fp8(w)
    raise ValueError(layout)


def serving_error_bound(w: np.ndarray, layout: str) -> np.ndarray:
    """Allowed |dequantized - master| per row for the quantized layouts.

    Half the ideal step, (max-min)/255 or /15, plus slack: f32 rounding for
    int8; for int4 the f16 rounding of bias (it may sit above min) and of
    scale (15 * rounded scale may miss max), each below 2^-10 of the row's
    magnitude.
    """
    w = w.astype(np.float32)
    rng = (w.max(axis=1) - w.min(axis=1)).astype(np.float64)
    mag = np.abs(w).max(axis=1).astype(np.float64)
    if layout == "int8":
        return rng / 255 / 2 * (1 + 1e-5) + 1e-6 * (1 + mag)
    if layout == "fp8":  # half a step of 3 mantissa bits, or of the subnormal step
        return mag / 16 * (1 + 1e-5) + mag / 448 * 2.0**-10 + 1e-6 * (1 + mag)
    return rng / 15 / 2 * (1 + 2.0**-9) + 2.0**-9 * (1 + mag)


def stamp_versions(versions: np.ndarray, uniq: np.ndarray, version: int) -> np.ndarray:
    """Versions after an update: touched rows get `version`, others keep theirs."""
    out = versions.copy()
    out[uniq] = version
    return out


__all__ = [
    "Hyper", "RefState", "init_state", "to_kernel_state", "from_kernel_state", "dedup",
    "transform_grad", "reference_step", "serving_rows", "quantize_int8", "quantize_int4",
    "quantize_fp8", "dequantize_fp8",
    "dequantize_int8", "dequantize_int4", "serving_error_bound", "stamp_versions",
    "f32_to_bf16_bits", "bf16_bits_to_f32", "to_f32", "round_to", "ulp", "neighbours",
]
