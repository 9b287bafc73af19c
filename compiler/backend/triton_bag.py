"""Triton source for pooled serving lookups (a BagSpec).

Modes sum and mean: one program per bag, which walks the bag's ids CHUNK at
a time, gathers and dequantizes a [CHUNK, BLOCK_DIM] tile of rows (times
the per-sample weights when weighted) and adds it to the bag's running sum,
stored once (mean: divided by max(count, 1), so an empty bag is a zero
row). Mode none: one program per BLOCK_ROWS ids, each output row one table
row. The runtime passes offsets as B+1 bounds and has checked every id and
bound before the launch.

Layouts as in `catalog.Layout`: f32, f16, bf16 (as int16 bits), FBGEMM's
int8 rows (codes, f32 scale, f32 bias) and int4 rows (two codes a byte, low
nibble first, f16 scale, f16 bias); the scale and bias are read byte by byte
(they need not be aligned) and assembled, so every row width works.
"""

from __future__ import annotations

from ...dialects import catalog
from .spec import BagSpec
from .triton_update import PTR, KernelDecl, block_dim

GPU_BAG_TILE = 4096  # values per gathered tile


def chunk(dim: int) -> int:
    """Ids one program gathers per step."""
    return max(1, min(64, GPU_BAG_TILE // block_dim(dim)))


def _rows(layout: str) -> list[str]:
    """`x`: the f32 rows of table ids `rid` ([R]) under mask `m` ([R, BLOCK_DIM])."""
    if layout == "f32":
        return ["x = tl.load(table + rid[:, None] * DIM + cols[None, :], mask=m, other=0.0)"]
    if layout == "f16":
        return ["x = tl.load(table + rid[:, None] * DIM + cols[None, :], mask=m, other=0.0)"
                ".to(tl.float32)"]
    if layout == "bf16":
        return ["bits = tl.load(table + rid[:, None] * DIM + cols[None, :], mask=m, other=0)",
                "x = (bits.to(tl.uint16, bitcast=True).to(tl.uint32) << 16)"
                ".to(tl.float32, bitcast=True)"]
    head = ["base = rid[:, None] * ROW_BYTES", "rm = pm[:, None]"]
    if layout == "int8":
        return head + [
            "codes = tl.load(table + base + cols[None, :], mask=m, other=0).to(tl.float32)",
            "t8 = tl.arange(0, 8)",
            "tail = tl.load(table + base + DIM + t8[None, :], mask=rm, other=0).to(tl.uint32)",
            "shifted = tail << ((t8[None, :] % 4) * 8).to(tl.uint32)",
            "scale = tl.sum(tl.where(t8[None, :] < 4, shifted, 0), axis=1)"
            ".to(tl.float32, bitcast=True)",
            "bias = tl.sum(tl.where(t8[None, :] >= 4, shifted, 0), axis=1)"
            ".to(tl.float32, bitcast=True)",
            "x = codes * scale[:, None] + bias[:, None]",
        ]
    return head + [
        "c2 = tl.arange(0, BLOCK_DIM // 2)",
        "packed = tl.load(table + base + c2[None, :], mask=rm & (c2 < CODE_BYTES)[None, :],"
        " other=0)",
        "codes = tl.reshape(tl.join(packed & 15, packed >> 4), (CHUNK, BLOCK_DIM))",
        "t4 = tl.arange(0, 4)",
        "tail = tl.load(table + base + CODE_BYTES + t4[None, :], mask=rm, other=0)"
        ".to(tl.uint32)",
        "word = tl.sum(tail << (t4[None, :] * 8).to(tl.uint32), axis=1)",
        "scale = (word & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)",
        "bias = (word >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)",
        "x = codes.to(tl.float32) * scale[:, None] + bias[:, None]",
    ]


def bag_args(spec: BagSpec) -> list[tuple[str, str]]:
    """(name, Triton type) of the kernel's arguments, in calling order."""
    ids = "*i32" if spec.index_dtype == "i32" else "*i64"
    args = [("table", PTR[spec.layout]), ("ids", ids)]
    if spec.mode != "none":
        args.append(("bounds", "*i64"))
    if spec.weighted:
        args.append(("weights", "*fp32"))
    return args + [("out", "*fp32"), ("n", "i64")]


def kernels(spec: BagSpec) -> tuple[KernelDecl, ...]:
    return (KernelDecl("ekko_bag", tuple(bag_args(spec))),)


def _pooled(spec: BagSpec) -> list[str]:
    body = [
        "b = tl.program_id(0).to(tl.int64)",
        "start = tl.load(bounds + b)",
        "end = tl.load(bounds + b + 1)",
        "cols = tl.arange(0, BLOCK_DIM)",
        "cmask = cols < DIM",
        "total = tl.zeros([BLOCK_DIM], tl.float32)",
        "for c in range(start, end, CHUNK):",
        "    pos = c + tl.arange(0, CHUNK)",
        "    pm = pos < end",
        "    m = pm[:, None] & cmask[None, :]",
        "    rid = tl.load(ids + pos, mask=pm, other=0).to(tl.int64)",
        *(f"    {line}" for line in _rows(spec.layout)),
    ]
    if spec.weighted:
        body.append("    x = x * tl.load(weights + pos, mask=pm, other=0.0)[:, None]")
    body.append("    total += tl.sum(tl.where(m, x, 0.0), axis=0)")
    if spec.mode == "mean":
        body.append("total = tl.math.div_rn(total, tl.zeros([BLOCK_DIM], tl.float32)"
                    " + tl.maximum(end - start, 1).to(tl.float32))")
    body.append("tl.store(out + b * DIM + cols, total, mask=cmask)")
    return body


def _plain() -> list[str]:
    return [
        "pos = tl.program_id(0).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)",
        "pm = pos < n",
        "cols = tl.arange(0, BLOCK_DIM)",
        "m = pm[:, None] & (cols < DIM)[None, :]",
        "rid = tl.load(ids + pos, mask=pm, other=0).to(tl.int64)",
    ]


def emit_bag(spec: BagSpec) -> str:
    """The Triton module (Python source) of one pooled lookup."""
    params = ", ".join(name for name, _ in bag_args(spec))
    if spec.mode == "none":
        body = _plain() + _rows(spec.layout) + [
            "tl.store(out + pos[:, None] * DIM + cols[None, :], x, mask=m)"]
    else:
        body = _pooled(spec)
    weighted = ", weighted" if spec.weighted else ""
    lines = [
        f'"""ekko pooled lookup: mode {spec.mode}{weighted}, dim {spec.dim}, {spec.layout} rows.',
        "",
        'Generated by ekko.compiler.backend.triton_bag from the kern.bag op."""',
        "import triton",
        "import triton.language as tl",
        "",
        f"DIM = tl.constexpr({spec.dim})",
        f"BLOCK_DIM = tl.constexpr({block_dim(spec.dim)})  # the whole row",
        f"CHUNK = tl.constexpr({chunk(spec.dim)})  # ids gathered per step",
        "NUM_WARPS = 4",
    ]
    if spec.layout in ("int8", "int4"):
        lines.append(f"ROW_BYTES = tl.constexpr({catalog.row_bytes(spec.layout, spec.dim)})")
    if spec.layout == "int4":
        lines.append(f"CODE_BYTES = tl.constexpr({(spec.dim + 1) // 2})")
    lines += ["", "", "@triton.jit", f"def ekko_bag({params}):",
              '    """One bag (mode none: CHUNK ids) pooled into its output row."""']
    lines += [f"    {line}" for line in body]
    return "\n".join(lines) + "\n"
