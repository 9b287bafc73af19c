"""Software prefetch of whole rows, for the CPU kernels that walk rows at random.

A row that need not start on a 64-byte line (an int8 serving row is dim + 8
bytes) can straddle one line more than its size says; asking for its first
byte and every 64 bytes on, plus its last byte, covers every line. Rows
longer than `MAX_BYTES` are asked for up to that many bytes: 512 left half
a dim-256 f32 row unasked (update apply 169 -> 139 ms at 2 KiB).
"""

from __future__ import annotations

from llvmlite import ir

MAX_BYTES = 2048  # per row and stream
I8, I32, I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)


def intrinsic(module: ir.Module) -> ir.Function:
    """llvm.prefetch on an opaque pointer, declared once per module."""
    return module.globals.get("llvm.prefetch.p0") or ir.Function(
        module, ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I32, I32, I32]),
        "llvm.prefetch.p0")


def ahead(b: ir.IRBuilder, i: ir.Value, distance: int, end: ir.Value) -> ir.Value:
    """Position i + distance, or i itself where that is past `end`: a position whose
    entry can be read without a branch (asking again for i's row costs nothing)."""
    later = b.add(i, ir.Constant(I64, distance))
    return b.select(b.icmp_signed("<", later, end), later, i)


def row(b: ir.IRBuilder, pf: ir.Function, ptr: ir.Value, nbytes: int, write: int = 1) -> None:
    """Ask for every line of `nbytes` at `ptr` (into L1: locality 3, data cache).

    The offsets are plain (not inbounds) GEPs: a lookup asks for the row of
    an id it has not validated yet, and a wild address must stay a useless
    prefetch, not a poison value."""
    base = b.bitcast(ptr, I8.as_pointer())
    span = min(nbytes, MAX_BYTES)
    # the row's last byte may sit one line past its first 64-byte steps
    for off in [*range(0, span, 64), *([span - 1] if span % 64 != 1 else [])]:
        addr = b.gep(base, [ir.Constant(I64, off)])
        b.call(pf, [addr, ir.Constant(I32, write), ir.Constant(I32, 3), ir.Constant(I32, 1)])
