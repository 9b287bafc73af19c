"""The ABI (`abi.Signature`) in LLVM terms: declarations and packed wrappers."""

from __future__ import annotations

from llvmlite import ir

from . import abi

I8, I32, I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
F32, F64 = ir.FloatType(), ir.DoubleType()

LLVM_TYPES: dict[str, ir.Type] = {
    "i64": I64, "f64": F64, "i8*": I8.as_pointer(), "i32*": I32.as_pointer(),
    "u32*": I32.as_pointer(), "i64*": I64.as_pointer(), "f32*": F32.as_pointer(),
    "void": ir.VoidType(),
}


OWNER_HASH = 0x9E3779B97F4A7C15  # 2**64 / golden ratio
OWNER_SHIFT = 40  # the product's high bits pick the partition


def partition_owner(b: ir.IRBuilder, idv: ir.Value, nparts: ir.Value) -> ir.Value:
    """The partition that owns id `idv` (i64): a multiplicative hash, so hot ids
    spread. The one rule every kernel that splits rows by id (the update's
    apply, the merge) uses."""
    product = b.mul(idv, ir.Constant(I64, OWNER_HASH))
    return b.urem(b.lshr(product, ir.Constant(I64, OWNER_SHIFT)), nparts)


def declare(module: ir.Module, sig: abi.Signature) -> ir.Function:
    """The LLVM function for an ABI signature (its argument names kept)."""
    fty = ir.FunctionType(LLVM_TYPES[sig.ret], [LLVM_TYPES[x.type] for x in sig.args])
    fn = ir.Function(module, fty, sig.symbol)
    for arg, decl in zip(fn.args, sig.args):
        arg.name = decl.name
    return fn


def emit_packed(module: ir.Module, fn: ir.Function, sig: abi.Signature) -> ir.Function:
    """`<symbol>_packed(i64* args)`: unpack one int64 word per argument and call `fn`."""
    wrapper = declare(module, abi.packed(sig))
    b = ir.IRBuilder(wrapper.append_basic_block("entry"))
    words = wrapper.args[0]
    args = []
    for k, decl in enumerate(sig.args):
        word = b.load(b.gep(words, [ir.Constant(I64, k)]), align=8)
        ty = LLVM_TYPES[decl.type]
        if isinstance(ty, ir.PointerType):
            args.append(b.inttoptr(word, ty))
        elif ty == F64:
            args.append(b.bitcast(word, F64))
        else:
            args.append(word)
    result = b.call(fn, args)
    b.ret(result if sig.ret != "void" else ir.Constant(I64, 0))
    return wrapper
