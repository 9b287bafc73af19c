"""LLVM emitter for pooled serving lookups (`kern.bag`, described by a BagSpec).

The kernel is written with explicit LLVM vector types rather than scalar
loops left to the vectorizer: the embedding dim is a compile-time constant,
so a bag's running sum lives in `<C x float>` registers (C <= CHUNK) across
the whole id loop and each output row is stored exactly once. Rows wider than
CHUNK floats are processed chunk by chunk (the id loop re-runs per chunk; the
ids are in cache by then), which keeps the accumulators in registers.

Signature (C ABI, every pointer byte-addressed so one signature fits all
layouts and index widths):

    i64 bag_kernel(i8* table, i64 rows, i8* ids, i64 nids, i8* offsets,
                   i64 noffsets, i64 nbags, float* weights, float* out,
                   i64 part, i64 nparts, i64* err_pos, u32* seq)

(declared once in `abi.bag`; `bag_kernel_packed` is its partition-runner
entry). With `seq` (the table's per-row sequence words, see
`llvm_update.seq_begin`), a bag is pooled between two reads of its rows'
words and pooled again if a row was being written or changed meanwhile, so
no lookup ever returns a row that is part old, part new.

`part`/`nparts` select the bags [nbags*part/nparts, nbags*(part+1)/nparts),
so threads own disjoint output rows. Bag b spans ids[offsets[b]:end) with
end = offsets[b+1] when b+1 < noffsets, else nids (torch's B-entry
convention). mode "none" ignores offsets: nbags == nids, bag i is {ids[i]}.

Returns 0, or an error code with the failing position in *err_pos:
  1 = id out of range [0, rows), position = index into ids;
  2 = bad offsets (start < 0, start > end or end > nids), position = bag.
Every check happens before the read it guards, so bad input never reads out
of bounds; the output rows of a failed call are unspecified.
"""

from __future__ import annotations

from llvmlite import ir

from ...dialects import catalog
from . import abi, loops, prefetch
from .llvm_abi import declare, emit_packed
from .spec import BagSpec

CHUNK = 128  # floats per accumulator chunk: 8 zmm / 16 ymm registers
PREFETCH_DISTANCE = 24  # ids ahead whose rows are prefetched (16-32 measured best)

FMA = ("contract",)  # let mul + add of one lookup fuse into an fma (differs from torch by an ulp)

ERR_ID = abi.BagStatus.ID_OUT_OF_RANGE
ERR_OFFSETS = abi.BagStatus.BAD_OFFSETS

i8 = ir.IntType(8)
i16 = ir.IntType(16)
i32 = ir.IntType(32)
i64 = ir.IntType(64)
f32 = ir.FloatType()
f16 = ir.HalfType()


def _const(ty: ir.Type, value: int | float) -> ir.Constant:
    return ir.Constant(ty, value)


def _splat(b: ir.IRBuilder, value: ir.Value, n: int) -> ir.Value:
    """Broadcast a scalar to `<n x T>`: insertelement + zero-mask shuffle."""
    vty = ir.VectorType(value.type, n)
    one = b.insert_element(ir.Constant(vty, ir.Undefined), value, _const(i32, 0))
    return b.shuffle_vector(one, ir.Constant(vty, ir.Undefined),
                            ir.Constant(ir.VectorType(i32, n), [0] * n))


def _load_at(b: ir.IRBuilder, base: ir.Value, byte_off: ir.Value | int, ty: ir.Type,
             align: int) -> ir.Value:
    """Load a `ty` at base + byte_off (base is i8*), with the alignment the layout guarantees."""
    off = byte_off if isinstance(byte_off, ir.Value) else _const(i64, byte_off)
    ptr = b.bitcast(b.gep(base, [off]), ty.as_pointer())
    return b.load(ptr, align=align)


def _load_floats(b: ir.IRBuilder, row: ir.Value, c0: int, n: int, fmt: str) -> ir.Value:
    """`<n x float>` of elements [c0, c0+n) of a row of `fmt` floats."""
    vf = ir.VectorType(f32, n)
    if fmt == "f32":
        return _load_at(b, row, 4 * c0, vf, 4)
    if fmt == "f16":
        return b.fpext(_load_at(b, row, 2 * c0, ir.VectorType(f16, n), 2), vf)
    bits = b.zext(_load_at(b, row, 2 * c0, ir.VectorType(i16, n), 2), ir.VectorType(i32, n))
    return b.bitcast(b.shl(bits, ir.Constant(ir.VectorType(i32, n), [16] * n)), vf)


def _load_param(b: ir.IRBuilder, row: ir.Value, at: int, fmt: str) -> ir.Value:
    """A row's scale or bias (`fmt`, unaligned at byte `at`) as f32."""
    if fmt == "f32":
        return _load_at(b, row, at, f32, 1)
    if fmt == "f16":
        return b.fpext(_load_at(b, row, at, f16, 1), f32)
    return b.bitcast(b.shl(b.zext(_load_at(b, row, at, i16, 1), i32), _const(i32, 16)), f32)


def minifloat_values(b: ir.IRBuilder, codes: ir.Value, mf: catalog.Minifloat) -> ir.Value:
    """The f32 values of i8 minifloat codes (a scalar or a vector): the exponent
    rebased into an f32's bits, the subnormal codes (exponent 0) as mantissa *
    step. Integer and select math only, so it vectorizes."""
    n = codes.type.count if isinstance(codes.type, ir.VectorType) else 0

    def of(t: ir.Type) -> ir.Type:
        return ir.VectorType(t, n) if n else t

    def const(t: ir.Type, v: int | float) -> ir.Constant:
        return ir.Constant(of(t), [v] * n) if n else ir.Constant(t, v)

    c = b.zext(codes, of(i32))
    mag = b.and_(c, const(i32, 0x7F))
    exp = b.lshr(mag, const(i32, mf.man_bits))
    man = b.and_(mag, const(i32, (1 << mf.man_bits) - 1))
    normal = b.or_(b.shl(b.add(exp, const(i32, 127 - mf.bias)), const(i32, 23)),
                   b.shl(man, const(i32, 23 - mf.man_bits)))
    sub = b.fmul(b.uitofp(man, of(f32)), const(f32, 2.0 ** (1 - mf.bias - mf.man_bits)))
    value = b.select(b.icmp_unsigned("==", exp, const(i32, 0)), sub, b.bitcast(normal, of(f32)))
    sign = b.shl(b.and_(c, const(i32, 0x80)), const(i32, 24))
    return b.bitcast(b.or_(b.bitcast(value, of(i32)), sign), of(f32))


class _BagEmitter:
    """Builds one bag function for a spec; one method per piece of the loop nest.

    `guarded` builds `bag_kernel_seq`, which reads rows under their sequence
    words (its `seq` must not be null); `bag_kernel` ignores `seq`, so the
    plain lookup pays nothing for the guard.
    """

    def __init__(self, spec: BagSpec, module: ir.Module, guarded: bool):
        self.spec = spec
        self.guarded = guarded
        self.layout = catalog.layout(spec.layout)
        self.row_bytes = self.layout.row_bytes(spec.dim)
        # 4-bit codes pool centred (`dequant_centred`): 5-14% faster lookups. 8-bit
        # ones measured 13% faster on rows in cache but 4-7% slower on rows from
        # memory (the benchmark's), so they keep one fma and one add per element.
        codec = self.layout.codec
        self.centred = isinstance(codec, catalog.RowAffine) and codec.per_byte > 1
        self.idx_ty = i32 if spec.index_dtype == "i32" else i64
        self.module = module
        self.sig = abi.bag(guarded)
        self.fn = declare(self.module, self.sig)
        for arg in self.fn.args:
            if isinstance(arg.type, ir.PointerType):
                arg.add_attribute("noalias")
        self.a = dict(zip(self.sig.names(), self.fn.args))
        self.prefetch = prefetch.intrinsic(self.module)
        self.b = ir.IRBuilder(self.fn.append_basic_block("entry"))

    # -- small pieces -------------------------------------------------------

    def load_index(self, base: ir.Value, pos: ir.Value) -> ir.Value:
        """ids/offsets entry `pos`, sign-extended to i64."""
        b = self.b
        ptr = b.gep(b.bitcast(base, self.idx_ty.as_pointer()), [pos])
        v = b.load(ptr, align=self.idx_ty.width // 8)
        return b.sext(v, i64) if self.idx_ty is i32 else v

    def fail(self, code: int, pos: ir.Value) -> ir.Block:
        """A block that reports `code` at `pos` and returns."""
        blk = self.fn.append_basic_block(f"err{code}")
        with self.b.goto_block(blk):
            self.b.store(pos, self.a["err_pos"])
            self.b.ret(_const(i64, code))
        return blk

    def row_ptr(self, idv: ir.Value) -> ir.Value:
        return self.b.gep(self.a["table"], [self.b.mul(idv, _const(i64, self.row_bytes))])

    def emit_prefetch(self, j: ir.Value) -> None:
        """Ask for every line of the row PREFETCH_DISTANCE ids ahead (`prefetch.row`),
        without branches.

        The id read is clamped into ids (past the end it re-reads ids[j]); a
        bad id only makes a useless prefetch, which never faults and has no
        semantic effect in LLVM.
        """
        b = self.b
        ahead = prefetch.ahead(b, j, PREFETCH_DISTANCE, self.a["nids"])
        prefetch.row(b, self.prefetch, self.row_ptr(self.load_index(self.a["ids"], ahead)),
                     self.row_bytes, write=0)

    # -- dequantization of one chunk ----------------------------------------

    def dequant(self, row: ir.Value, c0: int, n: int, weight: ir.Value | None,
                acc: ir.Value) -> ir.Value:
        """acc + elements [c0, c0+n) of a row (times `weight`), each dequantized.

        Row-wise codecs add code * scale + bias per element. Summing the
        biases apart (sum(code*s) + sum(b), one vector add fewer per id) made
        two large sums of opposite sign cancel: 2.4e-4 absolute error on a
        150-row bag of magnitude 38 against 1e-5 for an f32 bag.
        """
        b, codec = self.b, self.layout.codec
        if not isinstance(codec, catalog.Elementwise):
            return self.dequant_rowwise(row, c0, n, weight, acc)
        v = _load_floats(b, row, c0, n, codec.fmt)
        if weight is not None:
            return b.fadd(acc, b.fmul(v, _splat(b, weight, n), flags=FMA), flags=FMA)
        return b.fadd(acc, v)

    def row_params(self, row: ir.Value,
                   weight: ir.Value | None) -> tuple[ir.Value, ir.Value | None]:
        """A row-wise row's scale and bias (None without one) as f32, times `weight`."""
        b, codec = self.b, self.layout.codec
        at = self.layout.params_at(self.spec.dim)
        scale = _load_param(b, row, at, codec.param)
        step = catalog.FORMATS[codec.param].nbytes
        bias = _load_param(b, row, at + step, codec.param) if "bias" in codec.tail else None
        if weight is not None:
            scale = b.fmul(scale, weight)
            bias = b.fmul(bias, weight) if bias is not None else None
        return scale, bias

    def dequant_rowwise(self, row: ir.Value, c0: int, n: int, weight: ir.Value | None,
                        acc: ir.Value) -> ir.Value:
        """acc + (code * scale + bias) * weight for row-wise codecs (weight folded
        into scale and bias)."""
        b, codec = self.b, self.layout.codec
        vf = ir.VectorType(f32, n)
        scale, bias = self.row_params(row, weight)
        if isinstance(codec, catalog.RowAffine):
            x = b.uitofp(self.affine_codes(row, c0, n, codec), vf)
        else:
            x = minifloat_values(b, _load_at(b, row, c0, ir.VectorType(i8, n), 1),
                                 codec.minifloat)
        value = b.fmul(x, _splat(b, scale, n), flags=FMA)
        if bias is not None:
            value = b.fadd(value, _splat(b, bias, n), flags=FMA)
        return b.fadd(acc, value, flags=FMA)

    def dequant_centred(self, row: ir.Value, c0: int, n: int, weight: ir.Value | None,
                        acc: ir.Value, biases: ir.Value) -> list[ir.Value]:
        """[acc + (code - mid) * scale, biases + bias + mid * scale] for row-affine codes
        (mid = half the code range; weight folded into scale and bias).

        One fma per element instead of an fma and an add. Centring keeps both
        sums as small as the rows themselves, where code * scale and the
        biases summed apart are two large sums of opposite sign.
        """
        b, codec = self.b, self.layout.codec
        scale, bias = self.row_params(row, weight)
        mid = (codec.max_code + 1) // 2
        codes = self.affine_codes(row, c0, n, codec)
        x = b.sitofp(b.sub(codes, ir.Constant(codes.type, [mid] * n)), ir.VectorType(f32, n))
        biases = b.fadd(biases, b.fadd(bias, b.fmul(scale, _const(f32, float(mid)), flags=FMA),
                                       flags=FMA))
        return [b.fadd(acc, b.fmul(x, _splat(b, scale, n), flags=FMA), flags=FMA), biases]

    def affine_codes(self, row: ir.Value, c0: int, n: int, codec: catalog.RowAffine) -> ir.Value:
        """`<n x i8>` codes from their packed bytes, low bits first (c0 is a
        multiple of 8 // bits: chunks are)."""
        b, per = self.b, codec.per_byte
        if per == 1:
            return _load_at(b, row, c0, ir.VectorType(i8, n), 1)
        nb = -(-n // per)
        vb = ir.VectorType(i8, nb)
        packed = _load_at(b, row, c0 // per, vb, 1)
        parts = [b.and_(b.lshr(packed, ir.Constant(vb, [k * codec.bits] * nb)),
                        ir.Constant(vb, [codec.max_code] * nb)) for k in range(per)]
        while len(parts) > 1:  # one vector: part k's lanes at [k * nb, (k + 1) * nb)
            width = 2 * parts[0].type.count
            pairs = ir.Constant(ir.VectorType(i32, width), list(range(width)))
            parts = [b.shuffle_vector(x, y, pairs) for x, y in zip(parts[::2], parts[1::2])]
        # element i: part i % per of byte i // per
        mask = [(i % per) * nb + i // per for i in range(n)]
        return b.shuffle_vector(parts[0], parts[0], ir.Constant(ir.VectorType(i32, n), mask))

    # -- loop nest -----------------------------------------------------------

    def bag_bounds(self, bag: ir.Value) -> tuple[ir.Value, ir.Value]:
        """[start, end) of bag `bag`, validated before any id is read."""
        b, a = self.b, self.a
        if self.spec.mode == "none":
            return bag, b.add(bag, _const(i64, 1))
        start = self.load_index(a["offsets"], bag)
        nxt = b.add(bag, _const(i64, 1))
        has_next = b.icmp_signed("<", nxt, a["noffsets"])
        with b.if_else(has_next) as (then, otherwise):
            with then:
                then_blk = b.block
                end_next = self.load_index(a["offsets"], nxt)
                then_end = b.block
            with otherwise:
                else_blk = b.block
        end = b.phi(i64, "end")
        end.add_incoming(end_next, then_end)
        end.add_incoming(a["nids"], else_blk)
        del then_blk
        bad = b.or_(b.or_(b.icmp_signed("<", start, _const(i64, 0)),
                          b.icmp_signed(">", start, end)),
                    b.icmp_signed(">", end, a["nids"]))
        ok = self.fn.append_basic_block("bounds_ok")
        b.cbranch(bad, self.fail(ERR_OFFSETS, bag), ok)
        b.position_at_end(ok)
        return start, end

    def chunk_loop(self, bag: ir.Value, start: ir.Value, end: ir.Value, c0: int,
                   n: int) -> tuple[ir.Value, ir.Value] | None:
        """Pool elements [c0, c0+n) over the bag's ids and store them once.

        Centred codes (`self.centred`: 4-bit rows) carry a second, scalar
        accumulator: the sum of the rows' centred biases (`dequant_centred`),
        added to every element once at the end. Guarded, the first chunk also
        reads each row's sequence word just before the row, and returns their
        sum and OR.
        """
        b, a, spec = self.b, self.a, self.spec
        vf = ir.VectorType(f32, n)
        inits = [ir.Constant(vf, [0.0] * n)]
        centred = self.centred
        if centred:
            inits.append(_const(f32, 0.0))
        track = c0 == 0 and self.guarded
        if track:
            inits += [_const(i64, 0), _const(i32, 0)]

        def step(j: ir.Value, accs: list) -> list:
            idv = self.load_index(a["ids"], j)
            words: list[ir.Value] = []
            if c0 == 0:  # the first chunk validates every id before later chunks reuse them
                ok = self.fn.append_basic_block("id_ok")
                b.cbranch(b.icmp_unsigned("<", idv, a["rows"]), ok, self.fail(ERR_ID, j))
                b.position_at_end(ok)
                self.emit_prefetch(j)
            if track:  # acquire: the row's bytes are read after its word
                word = b.load_atomic(b.gep(a["seq"], [idv]), "acquire", 4)
                words = [b.add(accs[-2], b.zext(word, i64)), b.or_(accs[-1], word)]
            weight = b.load(b.gep(a["weights"], [j]), align=4) if spec.weighted else None
            row = self.row_ptr(idv)
            if centred:
                return self.dequant_centred(row, c0, n, weight, accs[0], accs[1]) + words
            return [self.dequant(row, c0, n, weight, accs[0])] + words

        accs = loops.fold(b, start, end, f"c{c0}", inits, step)
        total = b.fadd(accs[0], _splat(b, accs[1], n)) if centred else accs[0]
        self.store_row(bag, start, end, total, c0, n)
        return (accs[-2], accs[-1]) if track else None

    def store_row(self, bag: ir.Value, start: ir.Value, end: ir.Value, acc: ir.Value,
                  c0: int, n: int) -> None:
        """out[bag, c0:c0+n] = acc (mean: / max(count, 1), so an empty bag stays zero)."""
        b = self.b
        if self.spec.mode == "mean":
            count = b.sub(end, start)
            count = b.select(b.icmp_signed(">", count, _const(i64, 0)), count, _const(i64, 1))
            acc = b.fdiv(acc, _splat(b, b.sitofp(count, f32), n))
        off = b.add(b.mul(bag, _const(i64, self.spec.dim)), _const(i64, c0))
        ptr = b.bitcast(b.gep(self.a["out"], [off]), ir.VectorType(f32, n).as_pointer())
        b.store(acc, ptr, align=4)

    def seq_sum(self, start: ir.Value, end: ir.Value) -> ir.Value:
        """The sum of the bag's rows' sequence words (ids were validated)."""
        b, a = self.b, self.a

        def step(j: ir.Value, accs: list) -> list:
            idv = self.load_index(a["ids"], j)
            word = b.load_atomic(b.gep(a["seq"], [idv]), "monotonic", 4)
            return [b.add(accs[0], b.zext(word, i64))]

        (total,) = loops.fold(b, start, end, "seq", [_const(i64, 0)], step)
        return total

    def build(self) -> None:
        """The bag loop. Guarded, each row's word is read (acquire) right
        before the row, and all of them again after the bag: if one was odd
        (a writer held the row) or the sum changed (words only grow), the
        bag is pooled again, so no row is ever part old, part new."""
        b, a = self.b, self.a
        lo = b.sdiv(b.mul(a["nbags"], a["part"]), a["nparts"])
        hi = b.sdiv(b.mul(a["nbags"], b.add(a["part"], _const(i64, 1))), a["nparts"])
        with loops.counted(b, lo, hi, "bag") as bag:
            start, end = self.bag_bounds(bag)
            read = self.fn.append_basic_block("bag.read")
            b.branch(read)
            b.position_at_end(read)
            seen = None
            for c0 in range(0, self.spec.dim, CHUNK):
                words = self.chunk_loop(bag, start, end, c0, min(CHUNK, self.spec.dim - c0))
                seen = seen or words
            if seen is not None:
                before, bits = seen
                odd = b.trunc(bits, ir.IntType(1))
                b.fence("acquire")
                after = self.seq_sum(start, end)
                stable = b.and_(b.not_(odd), b.icmp_unsigned("==", after, before))
                done = self.fn.append_basic_block("bag.done")
                b.cbranch(stable, done, read)
                b.position_at_end(done)
        b.ret(_const(i64, 0))
        emit_packed(self.module, self.fn, self.sig)


def emit_bag(spec: BagSpec) -> str:
    """LLVM IR text of `bag_kernel` and `bag_kernel_seq` for `spec` (see the module docstring)."""
    module = ir.Module(name=f"ekko_bag_{spec.layout}_{spec.mode}")
    for guarded in (False, True):
        _BagEmitter(spec, module, guarded).build()
    return str(module)


__all__ = ["emit_bag", "ERR_ID", "ERR_OFFSETS"]
