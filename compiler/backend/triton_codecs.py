"""The serving layouts' codecs in Triton source: encode (the update's serving
refresh and its finite check) and decode (the pooled lookups).

Each function branches on the codec's kind (`catalog.Elementwise`,
`RowAffine`, `RowScaled`) and its parameters, never on a layout's name, so
a layout made of an existing codec needs nothing here. Row-wise rows are
bytes: the codes, then the parameters (scale, then bias), read and written
byte by byte because they need not be aligned.
"""

from __future__ import annotations

from ...dialects import catalog
from ...dialects.catalog import Elementwise, Minifloat, RowScaled


def ptr(layout: str) -> str:
    """The Triton pointer type of an array of `layout` rows."""
    return catalog.layout(layout).storage.triton


def constants(layout: str, dim: int) -> list[str]:
    """Module constants the codec's lines use: ROW_BYTES and PARAMS_AT (row-wise)."""
    entry = catalog.layout(layout)
    if not entry.quantized:
        return []
    return [f"ROW_BYTES = tl.constexpr({entry.row_bytes(dim)})",
            f"PARAMS_AT = tl.constexpr({entry.params_at(dim)})  # the scale's byte in a row"]


def helpers(layout: str | None, encoding: bool) -> str:
    """The @triton.jit helpers the codec's encode (or decode) lines call."""
    codec = catalog.layout(layout).codec if layout is not None else None
    if not isinstance(codec, RowScaled):
        return ""
    return (_minifloat_encode if encoding else _minifloat_decode)(codec.minifloat)


def _minifloat_encode(mf: Minifloat) -> str:
    drop = 23 - mf.man_bits
    return f'''
@triton.jit
def _to_{mf.name}(y):
    """f32 -> {mf.name} code bits (uint8): nearest-even, saturated to +-{mf.max:g}.
    Below the smallest normal the codes count subnormal steps; above it the
    mantissa is rounded to {mf.man_bits} bits and the exponent rebased."""
    bits = y.to(tl.uint32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = tl.minimum((bits & 0x7FFFFFFF).to(tl.float32, bitcast=True), {mf.max!r})
    sub = _rint(a * {2.0 ** (mf.bias - 1 + mf.man_bits)!r}).to(tl.uint32)
    ab = a.to(tl.uint32, bitcast=True)
    normal = ((ab + ({(1 << (drop - 1)) - 1} + ((ab >> {drop}) & 1))) >> {drop}) - {(127 - mf.bias) << mf.man_bits}
    return (tl.where(a < {2.0 ** (1 - mf.bias)!r}, sub, normal) | sign).to(tl.uint8)
'''


def _minifloat_decode(mf: Minifloat) -> str:
    return f'''
@triton.jit
def _from_{mf.name}(codes):
    """{mf.name} code bits -> f32 (exponent rebased; subnormals as mantissa * step)."""
    c = codes.to(tl.uint32)
    mag = c & 0x7F
    e = mag >> {mf.man_bits}
    m = mag & {(1 << mf.man_bits) - 1}
    normal = ((e + {127 - mf.bias}) << 23) | (m << {23 - mf.man_bits})
    v = tl.where(e == 0, m.to(tl.float32) * {2.0 ** (1 - mf.bias - mf.man_bits)!r},
                 normal.to(tl.float32, bitcast=True))
    return (v.to(tl.uint32, bitcast=True) | ((c & 0x80) << 24)).to(tl.float32, bitcast=True)
'''


# -- parameters ---------------------------------------------------------------


def _round(name: str, expr: str, fmt: str) -> list[str]:
    """`{name}` (f32, rounded to fmt) and `{name}_bits` (its stored bits, uint32)."""
    if fmt == "f32":
        return [f"{name} = {expr}", f"{name}_bits = {name}.to(tl.uint32, bitcast=True)"]
    if fmt == "f16":
        return [f"{name}_low = ({expr}).to(tl.float16)",
                f"{name} = {name}_low.to(tl.float32)",
                f"{name}_bits = {name}_low.to(tl.uint16, bitcast=True).to(tl.uint32)"]
    return [f"{name}_low = _to_bf16({expr})", f"{name} = _from_bf16({name}_low)",
            f"{name}_bits = {name}_low.to(tl.uint16, bitcast=True).to(tl.uint32)"]


def _nonfinite(name: str, fmt: str) -> str:
    """Per row: the stored parameter `name` is inf or NaN (its exponent bits)."""
    exp = catalog.FORMATS[fmt].exponent
    return f"(({name}_bits & {exp:#x}) == {exp:#x})"


def _store_params(codec, names: list[str]) -> list[str]:
    """Store the rows' parameters (little endian) after their codes."""
    nbytes = catalog.FORMATS[codec.param].nbytes
    width = nbytes * len(names)
    word = f"{names[-1]}_bits[:, None]"
    for k in range(len(names) - 2, -1, -1):
        word = f"tl.where(tp[None, :] < {(k + 1) * nbytes}, {names[k]}_bits[:, None], {word})"
    return [f"tp = tl.arange(0, {width})",
            f"word = {word}",
            f"tail = (word >> ((tp[None, :] % {nbytes}) * 8).to(tl.uint32)) & 0xFF",
            "tl.store(serving + srow + PARAMS_AT + tp[None, :], tail.to(tl.uint8),"
            " mask=rmask[:, None])"]


# -- encode (the update) ----------------------------------------------------------


def encode(layout: str) -> list[str]:
    """Re-make the serving rows from `stored` (f32, [BLOCK_ROWS, BLOCK_DIM])."""
    codec = catalog.layout(layout).codec
    if isinstance(codec, Elementwise):
        value = {"f32": "stored", "f16": "stored.to(tl.float16)",
                 "bf16": "_to_bf16(stored)"}[codec.fmt]
        return [f"tl.store(serving + at, {value}, mask=mask)"]
    lines = ["srow = rid[:, None] * ROW_BYTES", *_params(codec)]
    if isinstance(codec, RowScaled):
        return lines + [
            f"# {layout}: {codec.code} codes of stored / scale, then the scale",
            "q = _to_{}(tl.math.div_rn(stored, tl.zeros([BLOCK_ROWS, BLOCK_DIM], tl.float32)"
            " + safe[:, None]))".format(codec.code),
            "q = tl.where(zero[:, None], 0, q).to(tl.uint8)",
            "tl.store(serving + srow + cols[None, :], q, mask=mask)",
            *_store_params(codec, ["scale"])]
    m = float(codec.max_code)
    if codec.inverse:
        code = "_rint((stored - lo[:, None]) * inv[:, None])"
    else:
        code = ("_rint(tl.math.div_rn(stored - bias[:, None], tl.zeros([BLOCK_ROWS, BLOCK_DIM],"
                " tl.float32) + safe[:, None]))")
    lines += [f"# {layout}: {codec.bits}-bit codes, then {codec.param} scale and bias",
              f"q = {code}",
              f"q = tl.where(mask, tl.minimum(tl.maximum(q, 0.0), {m!r}), 0.0).to(tl.uint8)"]
    per = codec.per_byte
    if per == 1:
        lines.append("tl.store(serving + srow + cols[None, :], q, mask=mask)")
    elif per == 2:  # pairs of columns
        lines += [
            "even, odd = tl.split(tl.reshape(q, (BLOCK_ROWS, BLOCK_DIM // 2, 2)))",
            "c2 = tl.arange(0, BLOCK_DIM // 2)",
            "m2 = rmask[:, None] & (c2 < PARAMS_AT)[None, :]",
            f"tl.store(serving + srow + c2[None, :], even | (odd << {codec.bits}), mask=m2)"]
    else:
        lines += [
            f"parts = tl.reshape(q.to(tl.uint32), (BLOCK_ROWS, BLOCK_DIM // {per}, {per}))",
            f"shift = (tl.arange(0, {per}) * {codec.bits}).to(tl.uint32)",
            "packed = tl.sum(parts << shift[None, None, :], axis=2)  # disjoint bits: a sum is an or",
            f"cb = tl.arange(0, BLOCK_DIM // {per})",
            "mb = rmask[:, None] & (cb < PARAMS_AT)[None, :]",
            "tl.store(serving + srow + cb[None, :], packed.to(tl.uint8), mask=mb)"]
    return lines + _store_params(codec, ["scale", "bias"])


def _params(codec) -> list[str]:
    """The rows' parameters from `stored`: `scale` and `bias` (f32 of the stored
    values), their `_bits`, and what the codes are computed with."""
    if isinstance(codec, RowScaled):
        mf = codec.minifloat
        return ["amax = tl.max(tl.where(mask, tl.abs(stored), 0.0), axis=1)",
                *_round("scale", f"tl.math.div_rn(amax, tl.zeros([BLOCK_ROWS], tl.float32)"
                                 f" + {mf.max!r})", codec.param),
                "zero = scale == 0.0",
                "safe = tl.where(zero, 1.0, scale)"]
    m = float(codec.max_code)
    lines = ["lo = tl.min(tl.where(mask, stored, float('inf')), axis=1)",
             "hi = tl.max(tl.where(mask, stored, float('-inf')), axis=1)"]
    if codec.inverse:  # FBGEMM 8-bit: codes from the unrounded range
        return lines + [
            "rng = hi - lo",
            f"inv = tl.math.div_rn(tl.zeros([BLOCK_ROWS], tl.float32) + {m!r}, rng + 1e-8)",
            *_round("scale", f"tl.math.div_rn(rng, tl.zeros([BLOCK_ROWS], tl.float32) + {m!r})",
                    codec.param),
            *_round("bias", "lo", codec.param)]
    return lines + [  # FBGEMM 4-bit: codes from the stored bias and scale
        *_round("bias", "lo", codec.param),
        *_round("scale", f"tl.math.div_rn(hi - bias, tl.zeros([BLOCK_ROWS], tl.float32)"
                         f" + {m!r})", codec.param),
        "safe = tl.where(scale == 0.0, 1.0, scale)"]


def encode_bad(layout: str, table_dtype: str) -> list[str]:
    """`srv_bad`: per row, the serving row re-made from `stored` would not be
    finite (as the CPU checks it); no lines where it cannot be."""
    codec = catalog.layout(layout).codec
    if isinstance(codec, Elementwise):
        fmt, narrow = codec.fmt, codec.fmt != table_dtype
        if fmt == "f16" and narrow:
            return ["srv_bad = _row_any(_nonfinite16(stored.to(tl.float16), 0x7C00), mask)"]
        if fmt == "bf16" and narrow and table_dtype == "f32":
            return ["srv_bad = _row_any(_nonfinite16(_to_bf16(stored), 0x7F80), mask)"]
        return []
    lines = _params(codec)
    bad = _nonfinite("scale", codec.param)
    if isinstance(codec, RowScaled):  # the largest code decoded
        top = f"scale * {codec.minifloat.max!r}"
        return lines + [f"srv_bad = {bad} | _nonfinite({top})"]
    top = f"scale * {float(codec.max_code)!r}"  # the scale, the bias, and code M decoded
    return lines + [f"srv_bad = {bad} | {_nonfinite('bias', codec.param)}"
                    f" | _nonfinite({top}) | _nonfinite({top} + bias)"]


# -- decode (the lookups) ----------------------------------------------------------


def decode(layout: str) -> list[str]:
    """`x`: the f32 rows of table ids `rid` ([R]) under mask `m` ([R, BLOCK_DIM])."""
    codec = catalog.layout(layout).codec
    if isinstance(codec, Elementwise):
        at = "table + rid[:, None] * DIM + cols[None, :]"
        if codec.fmt == "bf16":
            return [f"bits = tl.load({at}, mask=m, other=0)",
                    "x = (bits.to(tl.uint16, bitcast=True).to(tl.uint32) << 16)"
                    ".to(tl.float32, bitcast=True)"]
        to = "" if codec.fmt == "f32" else ".to(tl.float32)"
        return [f"x = tl.load({at}, mask=m, other=0.0){to}"]
    nbytes = catalog.FORMATS[codec.param].nbytes
    lines = ["base = rid[:, None] * ROW_BYTES", "rm = pm[:, None]",
             f"tp = tl.arange(0, {nbytes * len(codec.tail)})",
             "tail = tl.load(table + base + PARAMS_AT + tp[None, :], mask=rm, other=0)"
             ".to(tl.uint32)",
             f"shifted = tail << ((tp[None, :] % {nbytes}) * 8).to(tl.uint32)"]
    for k, name in enumerate(codec.tail):
        lines.append(f"{name}_bits = tl.sum(tl.where((tp[None, :] >= {k * nbytes}) & "
                     f"(tp[None, :] < {(k + 1) * nbytes}), shifted, 0), axis=1)")
        lines.append(f"{name} = {_from_bits(name + '_bits', codec.param)}")
    if isinstance(codec, RowScaled):
        return lines + [
            "codes = tl.load(table + base + cols[None, :], mask=m, other=0)",
            f"x = _from_{codec.code}(codes) * scale[:, None]"]
    if codec.per_byte == 1:
        codes = "tl.load(table + base + cols[None, :], mask=m, other=0)"
    elif codec.per_byte == 2:  # each byte's two codes, joined back into columns
        lines += ["c2 = tl.arange(0, BLOCK_DIM // 2)",
                  "packed = tl.load(table + base + c2[None, :], mask=rm & (c2 < PARAMS_AT)[None, :],"
                  " other=0)"]
        codes = (f"tl.reshape(tl.join(packed & {codec.max_code}, packed >> {codec.bits}),"
                 " (CHUNK, BLOCK_DIM))")
    else:
        codes = (f"((tl.load(table + base + cols[None, :] // {codec.per_byte}, mask=m, other=0)"
                 f" >> ((cols[None, :] % {codec.per_byte}) * {codec.bits}).to(tl.uint8))"
                 f" & {codec.max_code})")
    return lines + [f"codes = {codes}.to(tl.float32)",
                    "x = codes * scale[:, None] + bias[:, None]"]


def _from_bits(bits: str, fmt: str) -> str:
    """f32 of a parameter's stored bits (uint32)."""
    if fmt == "f32":
        return f"{bits}.to(tl.float32, bitcast=True)"
    if fmt == "f16":
        return f"{bits}.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)"
    return f"({bits} << 16).to(tl.float32, bitcast=True)"
