"""Serving-row layouts in numpy: the bytes the lookup kernels read.

The update kernels write these same layouts when they refresh a serving copy,
so they are specified here exactly, per codec of `catalog.Layout` (and checked
against tests/reference.py, FBGEMM's quantizers and torch's float8):

* Elementwise(fmt): one float per element. f32 a copy; f16 IEEE
  round-to-nearest-even; bf16 uint16 bit patterns, the top half of the f32
  rounded to nearest-even (NaN stays NaN; torch.bfloat16 holds the same bits).
* RowAffine(bits, param, inverse): uint8 (rows, row bytes): the codes, 8 // bits
  a byte, element k * per_byte + j in bits [j * bits, (j + 1) * bits) of byte
  k (an odd tail padded with 0), then the scale and the bias in `param`
  (little endian, unaligned). bias = min(row), scale = (max - bias) / M with
  M = 2**bits - 1, both rounded to `param`.
  inverse (int8, FBGEMM's 8-bit rows): code = clip(rint((x - min) * M /
  (max - min + 1e-8)), 0, M) from the unrounded range (a constant row gets
  scale 0 and codes 0).
  else (int4, FBGEMM's 4-bit rows): code = clip(rint((x - bias) / scale), 0, M)
  from the stored bias and scale, scale 0 counting as 1 (codes 0).
  x ~= code * scale + bias.
* RowScaled(e4m3): uint8 (rows, dim + 4): dim OCP E4M3 codes (torch's
  float8_e4m3fn bits) then an f32 scale = max|row| / 448 (f32 division).
  code = x / scale rounded to nearest-even and saturated to +-448 (NaN is
  never produced for finite input); a row whose scale is 0 gets codes 0.
  x ~= code * scale.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..dialects import catalog
from ..dialects.catalog import Elementwise, Layout, Minifloat, RowAffine, RowScaled


def _entry(layout: str) -> Layout:
    if layout not in catalog.LAYOUTS:
        raise ValueError(f"unknown serving layout {layout!r}; expected one of "
                         f"{tuple(catalog.LAYOUTS)}")
    return catalog.LAYOUTS[layout]


def _check(x: np.ndarray, layout: str) -> tuple[np.ndarray, Layout]:
    entry = _entry(layout)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"rows must be 2-D (rows, dim), got shape {x.shape}")
    return np.ascontiguousarray(x), entry


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


def _to_format(x: np.ndarray, fmt: str) -> np.ndarray:
    """f32 values stored as `fmt` (the array of its storage dtype)."""
    if fmt == "f32":
        return x.astype(np.float32)
    if fmt == "f16":
        return x.astype(np.float16)
    return f32_to_bf16_bits(x)


def _from_format(q: np.ndarray, fmt: str) -> np.ndarray:
    if fmt == "bf16":
        return bf16_bits_to_f32(q.view(np.uint16) if q.dtype == np.int16 else q)
    return np.asarray(q, dtype=catalog.FORMATS[fmt].np_dtype).astype(np.float32)


def _param_bytes(values: np.ndarray, fmt: str) -> np.ndarray:
    """(rows, nbytes) little-endian bytes of per-row parameters in `fmt`."""
    return np.ascontiguousarray(_to_format(values.astype(np.float32), fmt))[:, None].view(np.uint8)


def _param_values(q: np.ndarray, at: int, fmt: str) -> np.ndarray:
    """f32 (rows,) of the `fmt` parameter at byte `at` of each row."""
    n = catalog.FORMATS[fmt].nbytes
    raw = np.ascontiguousarray(q[:, at:at + n]).view(catalog.FORMATS[fmt].np_dtype)[:, 0]
    return _from_format(raw, fmt)


# -- codecs ---------------------------------------------------------------


def _pack_codes(codes: np.ndarray, codec: RowAffine, dim: int) -> np.ndarray:
    per = codec.per_byte
    padded = np.zeros((len(codes), codec.code_bytes(dim) * per), np.uint8)
    padded[:, :dim] = codes
    out = np.zeros((len(codes), codec.code_bytes(dim)), np.uint8)
    for j in range(per):
        out |= padded[:, j::per] << np.uint8(j * codec.bits)
    return out


def _unpack_codes(q: np.ndarray, codec: RowAffine, dim: int) -> np.ndarray:
    per, mask = codec.per_byte, np.uint8(codec.max_code)
    packed = q[:, :codec.code_bytes(dim)]
    codes = np.empty((len(q), packed.shape[1] * per), np.uint8)
    for j in range(per):
        codes[:, j::per] = (packed >> np.uint8(j * codec.bits)) & mask
    return codes[:, :dim]


def _encode_affine(x: np.ndarray, codec: RowAffine) -> np.ndarray:
    lo, hi = x.min(axis=1), x.max(axis=1)
    m = np.float32(codec.max_code)
    if codec.inverse:
        scale = ((hi - lo) / m).astype(np.float32)
        inv = (m / (hi - lo + np.float32(1e-8))).astype(np.float32)
        codes = np.clip(np.rint((x - lo[:, None]) * inv[:, None]), 0, m)
        bias = lo
    else:
        bias = _from_format(_to_format(lo, codec.param), codec.param)
        scale = _from_format(_to_format((hi - bias) / m, codec.param), codec.param)
        safe = np.where(scale == 0, np.float32(1.0), scale)
        codes = np.clip(np.rint((x - bias[:, None]) / safe[:, None]), 0, m)
    return np.concatenate([_pack_codes(codes.astype(np.uint8), codec, x.shape[1]),
                           _param_bytes(scale, codec.param), _param_bytes(bias, codec.param)],
                          axis=1)


def minifloat_encode(x: np.ndarray, mf: Minifloat) -> np.ndarray:
    """uint8 codes of f32 values: nearest-even, saturated to +-max, NaN for NaN."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    sign = ((x.view(np.uint32) >> 31) << 7).astype(np.uint8)
    a = np.minimum(np.abs(x), np.float32(mf.max))
    tiny = np.float32(2.0 ** (1 - mf.bias))  # the smallest normal
    sub = np.rint(a * np.float32(2.0 ** (mf.bias - 1 + mf.man_bits)))  # multiples of the step
    bits = a.view(np.uint32).astype(np.uint64)
    drop = 23 - mf.man_bits
    rounded = (bits + ((1 << (drop - 1)) - 1) + ((bits >> drop) & 1)) >> drop
    normal = rounded - ((127 - mf.bias) << mf.man_bits)
    codes = np.where(a < tiny, sub, normal).astype(np.uint8) | sign
    return np.where(np.isnan(x), np.uint8(mf.nan) | sign, codes).astype(np.uint8)


def minifloat_decode(codes: np.ndarray, mf: Minifloat) -> np.ndarray:
    """f32 values of uint8 codes (the NaN code decodes to NaN, as torch's)."""
    c = np.asarray(codes, dtype=np.uint8).astype(np.uint32)
    mag = c & 0x7F
    e, m = mag >> mf.man_bits, mag & ((1 << mf.man_bits) - 1)
    normal = (((e + 127 - mf.bias) << 23) | (m << (23 - mf.man_bits))).astype(np.uint32)
    value = np.where(e == 0, m.astype(np.float32) * np.float32(2.0 ** (1 - mf.bias - mf.man_bits)),
                     normal.view(np.float32))
    value = np.where(mag == mf.nan, np.float32(np.nan), value).astype(np.float32)
    return np.where(c & 0x80, -value, value).astype(np.float32)


def _encode_scaled(x: np.ndarray, codec: RowScaled) -> np.ndarray:
    mf = codec.minifloat
    scale = (np.abs(x).max(axis=1) / np.float32(mf.max)).astype(np.float32)
    safe = np.where(scale == 0, np.float32(1.0), scale)
    codes = minifloat_encode(x / safe[:, None], mf)
    codes[scale == 0] = 0
    return np.concatenate([codes, _param_bytes(scale, codec.param)], axis=1)


def quantize_rows(x: np.ndarray, layout: str) -> np.ndarray:
    """f32 rows (rows, dim) in the serving layout `layout` (a new array)."""
    x, entry = _check(x, layout)
    codec = entry.codec
    if isinstance(codec, Elementwise):
        return _to_format(x, codec.fmt).copy()
    if isinstance(codec, RowAffine):
        return _encode_affine(x, codec)
    return _encode_scaled(x, codec)


def _as_numpy(q: Any) -> np.ndarray:
    """numpy view of q; a torch.bfloat16 tensor becomes its uint16 bits."""
    if type(q).__module__.startswith("torch"):
        import torch

        q = q.detach().cpu()
        if q.dtype == torch.bfloat16:
            q = q.view(torch.int16)
        return q.numpy().view(np.uint16) if q.dtype == torch.int16 else q.numpy()
    return np.asarray(q)


def dequantize_rows(q: Any, layout: str, dim: int) -> np.ndarray:
    """Serving rows back to f32 (rows, dim): what the lookup kernels compute per row."""
    entry = _entry(layout)
    q, codec = _as_numpy(q), entry.codec
    if isinstance(codec, Elementwise):
        return _from_format(q, codec.fmt).reshape(-1, dim)
    q = np.ascontiguousarray(q).view(np.uint8) if q.dtype == np.int8 else \
        np.ascontiguousarray(q, dtype=np.uint8)
    if q.ndim != 2 or q.shape[1] != entry.row_bytes(dim):
        raise ValueError(f"{layout} rows of dim {dim} need shape (rows, "
                         f"{entry.row_bytes(dim)}), got {q.shape}")
    at = entry.params_at(dim)
    scale = _param_values(q, at, codec.param)
    if isinstance(codec, RowScaled):
        return (minifloat_decode(q[:, :dim], codec.minifloat) * scale[:, None]).astype(np.float32)
    bias = _param_values(q, at + catalog.FORMATS[codec.param].nbytes, codec.param)
    codes = _unpack_codes(q, codec, dim)
    return (codes * scale[:, None] + bias[:, None]).astype(np.float32)


__all__ = ["quantize_rows", "dequantize_rows", "f32_to_bf16_bits", "bf16_bits_to_f32",
           "minifloat_encode", "minifloat_decode"]
