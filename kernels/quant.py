"""Serving-row layouts in numpy: the bytes the lookup kernels read.

The update kernels write these same layouts when they refresh a serving copy,
so they are specified here exactly (and checked against tests/reference.py and
FBGEMM's own quantizers):

* f32:  float32 (rows, dim), a copy.
* f16:  float16 (rows, dim), IEEE round-to-nearest-even.
* bf16: uint16 (rows, dim) bit patterns, the top half of the f32 rounded to
  nearest-even (NaN stays NaN). torch.bfloat16 tensors hold the same bits.
* int8: uint8 (rows, dim + 8), FBGEMM's fused row-wise 8-bit layout:
  dim codes, then f32 scale, then f32 bias (little endian, unaligned).
  bias = min(row), scale = (max - min) / 255,
  code = clip(rint((x - bias) * 255 / (max - min + 1e-8)), 0, 255)
  (FBGEMM's inverse scale; a constant row gets scale 0 and codes 0).
  x ~= code * scale + bias.
* int4: uint8 (rows, ceil(dim/2) + 4), FBGEMM's fused row-wise 4-bit layout:
  two codes a byte, element 2k in the low nibble, 2k+1 in the high one (an
  odd dim pads the last high nibble with 0), then f16 scale, then f16 bias.
  bias = f16(min), scale = f16((max - f32(bias)) / 15); codes use the stored
  (f16-rounded) values: code = clip(rint((x - bias) / scale), 0, 15), with
  scale 0 treated as 1 (codes 0). x ~= code * scale + bias.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..compiler.backend.spec import SERVING_LAYOUTS, serving_row_bytes


def _check(x: np.ndarray, layout: str) -> np.ndarray:
    if layout not in SERVING_LAYOUTS:
        raise ValueError(f"unknown serving layout {layout!r}; expected one of {SERVING_LAYOUTS}")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"rows must be 2-D (rows, dim), got shape {x.shape}")
    return np.ascontiguousarray(x)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """bf16 bit patterns of f32 values, round-to-nearest-even, NaN kept quiet."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = (bits[nan] >> 16).astype(np.uint16) | np.uint16(0x40)
    return rounded


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """Exact widening: bf16 is the top 16 bits of an f32."""
    return (np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _quantize_int8(x: np.ndarray) -> np.ndarray:
    """Fused row-wise int8 rows (see the module docstring)."""
    lo, hi = x.min(axis=1), x.max(axis=1)
    scale = ((hi - lo) / np.float32(255.0)).astype(np.float32)
    inv = (np.float32(255.0) / (hi - lo + np.float32(1e-8))).astype(np.float32)
    codes = np.clip(np.rint((x - lo[:, None]) * inv[:, None]), 0, 255).astype(np.uint8)
    out = np.empty((len(x), serving_row_bytes("int8", x.shape[1])), np.uint8)
    dim = x.shape[1]
    out[:, :dim] = codes
    out[:, dim:dim + 4] = scale[:, None].view(np.uint8)
    out[:, dim + 4:] = lo.astype(np.float32)[:, None].view(np.uint8)
    return out


def _quantize_int4(x: np.ndarray) -> np.ndarray:
    """Fused row-wise int4 rows (see the module docstring)."""
    rows, dim = x.shape
    bias = x.min(axis=1).astype(np.float16)
    bias32 = bias.astype(np.float32)
    scale = ((x.max(axis=1) - bias32) / np.float32(15.0)).astype(np.float16)
    s32 = scale.astype(np.float32)
    s32 = np.where(s32 == 0, np.float32(1.0), s32)
    codes = np.clip(np.rint((x - bias32[:, None]) / s32[:, None]), 0, 15).astype(np.uint8)
    half = (dim + 1) // 2
    padded = np.zeros((rows, 2 * half), np.uint8)
    padded[:, :dim] = codes
    out = np.empty((rows, half + 4), np.uint8)
    out[:, :half] = padded[:, 0::2] | (padded[:, 1::2] << 4)
    out[:, half:half + 2] = scale[:, None].view(np.uint8)
    out[:, half + 2:] = bias[:, None].view(np.uint8)
    return out


def quantize_rows(x: np.ndarray, layout: str) -> np.ndarray:
    """f32 rows (rows, dim) in the serving layout `layout` (a new array)."""
    x = _check(x, layout)
    if layout == "f32":
        return x.copy()
    if layout == "f16":
        return x.astype(np.float16)
    if layout == "bf16":
        return f32_to_bf16_bits(x)
    if layout == "int8":
        return _quantize_int8(x)
    return _quantize_int4(x)


def _as_numpy(q: Any) -> np.ndarray:
    """numpy view of q; a torch.bfloat16 tensor becomes its uint16 bits."""
    if type(q).__module__.startswith("torch"):
        import torch

        q = q.detach().cpu()
        if q.dtype == torch.bfloat16:
            q = q.view(torch.int16)
        return q.numpy().view(np.uint16) if q.dtype == torch.int16 else q.numpy()
    return np.asarray(q)


def _int_parts(q: np.ndarray, layout: str, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes uint8 (rows, dim), scale f32 (rows,), bias f32 (rows,)) of int rows."""
    q = np.ascontiguousarray(q, dtype=np.uint8)
    if q.ndim != 2 or q.shape[1] != serving_row_bytes(layout, dim):
        raise ValueError(f"{layout} rows of dim {dim} need shape (rows, "
                         f"{serving_row_bytes(layout, dim)}), got {q.shape}")
    if layout == "int8":
        tail = q[:, dim:].copy()
        return q[:, :dim], tail[:, :4].view(np.float32)[:, 0], tail[:, 4:].view(np.float32)[:, 0]
    half = (dim + 1) // 2
    codes = np.empty((len(q), 2 * half), np.uint8)
    codes[:, 0::2] = q[:, :half] & 0xF
    codes[:, 1::2] = q[:, :half] >> 4
    tail = q[:, half:].copy()
    scale = tail[:, :2].view(np.float16)[:, 0].astype(np.float32)
    bias = tail[:, 2:].view(np.float16)[:, 0].astype(np.float32)
    return codes[:, :dim], scale, bias


def dequantize_rows(q: Any, layout: str, dim: int) -> np.ndarray:
    """Serving rows back to f32 (rows, dim): what the lookup kernels compute per row."""
    if layout not in SERVING_LAYOUTS:
        raise ValueError(f"unknown serving layout {layout!r}")
    q = _as_numpy(q)
    if layout == "f32":
        return np.array(q, dtype=np.float32).reshape(-1, dim)
    if layout == "f16":
        return np.asarray(q, dtype=np.float16).astype(np.float32).reshape(-1, dim)
    if layout == "bf16":
        return bf16_bits_to_f32(q.view(np.uint16) if q.dtype == np.int16 else q).reshape(-1, dim)
    codes, scale, bias = _int_parts(q, layout, dim)
    return (codes * scale[:, None] + bias[:, None]).astype(np.float32)


__all__ = ["quantize_rows", "dequantize_rows", "f32_to_bf16_bits", "bf16_bits_to_f32"]
