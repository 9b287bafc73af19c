"""LLVM IR for replica sync (PackSpec, MergeSpec), built with llvmlite.ir.

Signatures and status codes are declared in `abi` (sync_pack, merge_check,
merge_apply, SyncStatus); each function also has its packed entry.

Every pointer is byte-addressed (i8*) except versions (i64*) and sequence
words (i32*), so one signature fits every layout; a row is `spec.row_bytes`
bytes (see spec.serving_row_bytes).

  i64 ekko_pack(part, nparts, serving, versions, seq, rows, ids, n,
                out_rows, out_versions, err_pos)
      Positions [n*part/nparts, n*(part+1)/nparts): checks every id of the
      range first (1: out of range, at *err_pos), then copies row and
      version. With `seq` each row is read under its sequence word: retry
      while it is odd or changed during the copy, so a packet never holds a
      torn row even while a merge writes that replica.

  i64 ekko_merge_check(part, nparts, rows, ids, n, prows, pversions, newest, err_pos)
      Writes nothing. Over the same position range: 1 id out of range,
      2 version outside [0, newest], 3 a non-finite row (every element, or
      the int8/int4 scale and bias), 4 an int8 row whose finite scale and
      bias decode a code to inf (code * scale + bias in f32, as lookups
      compute it; int4's f16 scale and bias cannot: 15 * 65504 + 65504 is
      far from f32's max). Returns the code of the first bad position, with
      the position in *err_pos.

  i64 ekko_merge_apply(part, nparts, serving, versions, seq, ids, n, prows, pversions)
      Applies the packet rows whose id this partition owns (a multiplicative
      hash of the id, so partitions never share a row): a row is taken when
      its version is newer than the replica's, or equal with larger bytes
      (unsigned, lexicographic), which makes the result independent of the
      order rows and packets arrive in. Returns the number of rows written.
      With `seq` each write follows the protocol in docs/engine.md:
      s = seq[r]; seq[r] = s+1; release fence; row and version; release
      fence; seq[r] = s+2. Rows of whole lines are streamed, in fenced
      groups (`_MergeApply`).
"""

from __future__ import annotations

from llvmlite import ir

from ...dialects import catalog
from . import abi, loops, prefetch
from .llvm_abi import declare, emit_packed, partition_owner
from .llvm_bag import minifloat_values
from .spec import MergeSpec, PackSpec, SyncSpec

I1, I8, I16, I32, I64 = (ir.IntType(w) for w in (1, 8, 16, 32, 64))
P8, P32, P64 = I8.as_pointer(), I32.as_pointer(), I64.as_pointer()
PACK_PREFETCH = 16  # ids ahead whose rows pack asks for
MERGE_PREFETCH = 8  # positions ahead whose replica version merge asks for (8-16 measured best)
MERGE_GROUP = 64  # guarded rows a merge streams between one pair of fences (16: 21.4, 64: 19.0 ms)
LINE = 64  # bytes of a cache line
STREAM_CHUNK = 16  # bytes per streaming store of a packet row (and the alignment it needs)
STREAM_UNROLL = 1024  # rows up to this many bytes stream unrolled

ERR_ID = abi.SyncStatus.ID_OUT_OF_RANGE
ERR_VERSION = abi.SyncStatus.BAD_VERSION
ERR_NONFINITE = abi.SyncStatus.NON_FINITE
ERR_DECODE = abi.SyncStatus.DECODES_NON_FINITE
F32 = ir.FloatType()
_INT = {"f32": I32, "f16": I16, "bf16": I16}  # the integer type of each format's bits


def _param(b: ir.IRBuilder, ptr, fmt: str):
    """A row parameter (`fmt`, unaligned at i8* `ptr`) as f32."""
    if fmt == "f32":
        return b.load(b.bitcast(ptr, F32.as_pointer()), align=1)
    bits = b.load(b.bitcast(ptr, I16.as_pointer()), align=1)
    if fmt == "f16":
        return b.fpext(b.bitcast(bits, ir.HalfType()), F32)
    return b.bitcast(b.shl(b.zext(bits, I32), _c(I32, 16)), F32)


def _c(t: ir.Type, v: int) -> ir.Constant:
    return ir.Constant(t, v)


class _SyncEmitter:
    """One function of a sync kernel: the builder plus the spec's row geometry."""

    # 8-byte streaming stores pay in merge (int8 dim 64: 8.6 -> 7.4 ms) and cost in
    # pack (5.7 -> 6.1 ms; dim 128 8.6 -> 10.6 ms), so only merge turns them on.
    scalar_streams = False

    def __init__(self, module: ir.Module, spec: SyncSpec, sig: abi.Signature | None,
                 fn: ir.Function | None = None):
        """For the exported function of `sig`, or for `fn`, an internal helper."""
        self.spec = spec
        self.module = module
        self.sig = sig
        self.width = spec.row_bytes
        self.fn = fn if fn is not None else declare(module, sig)
        self.b = ir.IRBuilder(self.fn.append_basic_block("entry"))

    # -- addressing ---------------------------------------------------------
    def load_id(self, ids, i):
        b = self.b
        if self.spec.index_dtype == "i32":
            return b.sext(b.load(b.gep(b.bitcast(ids, P32), [i], inbounds=True)), I64)
        return b.load(b.gep(b.bitcast(ids, P64), [i], inbounds=True))

    def row(self, base, r):
        return self.b.gep(base, [self.b.mul(r, _c(I64, self.width))], inbounds=True)

    def at(self, ptr, index):
        return self.b.gep(ptr, [index], inbounds=True)

    def part_range(self, part, nparts, n):
        """[n*part/nparts, n*(part+1)/nparts): contiguous positions for this partition."""
        b = self.b
        lo = b.udiv(b.mul(n, part), nparts)
        hi = b.udiv(b.mul(n, b.add(part, _c(I64, 1))), nparts)
        return lo, hi

    def prefetch_ahead(self, serving, versions, seq, ids, i, hi) -> None:
        """Ask for the serving row, version and sequence word of the id PACK_PREFETCH
        positions on (clamped to the partition: past its end it re-asks for i's, without
        a branch). Pack reads rows at random ids; merge asks for versions only
        (`_MergeApply.prefetch_version`)."""
        b = self.b
        r = self.load_id(ids, prefetch.ahead(b, i, PACK_PREFETCH, hi))
        pf = prefetch.intrinsic(self.module)
        prefetch.row(b, pf, self.row(serving, r), self.width, write=0)
        prefetch.row(b, pf, self.at(versions, r), 8, write=0)
        if self.spec.seq:
            prefetch.row(b, pf, self.seq_ptr(seq, r), 4, write=0)

    def stream_chunk(self) -> int:
        """Bytes per streaming store a row of this width can take: 16 (an xmm
        store), or 8 (a scalar one) where `scalar_streams`, as its rows stay
        aligned to it; 0 for none."""
        sizes = (STREAM_CHUNK, 8) if self.scalar_streams else (STREAM_CHUNK,)
        return next((c for c in sizes if self.width % c == 0), 0)

    def stream_row(self, dst, src) -> None:
        """Copy one row to a dst aligned to `stream_chunk()` with streaming
        (non-temporal) stores; rows over STREAM_UNROLL bytes copy in a loop."""
        b = self.b
        nt = self.module.add_metadata([_c(I32, 1)])
        size = self.stream_chunk()
        chunk = ir.VectorType(I32, size // 4) if size == STREAM_CHUNK else I64

        def put(off) -> None:
            value = b.load(b.bitcast(b.gep(src, [off]), chunk.as_pointer()), align=1)
            at = b.bitcast(b.gep(dst, [off]), chunk.as_pointer())
            b.store(value, at, align=size).set_metadata("nontemporal", nt)

        if self.width <= STREAM_UNROLL:
            for off in range(0, self.width, size):
                put(_c(I64, off))
            return
        with loops.counted(b, _c(I64, 0), _c(I64, self.width // size), "stream") as k:
            put(b.mul(k, _c(I64, size)))

    def if_aligned(self, base, body) -> None:
        """body(True) when `base` is aligned for streaming stores (then a seq_cst
        fence, so they are visible before the call returns), else body(False)."""
        b = self.b
        size = self.stream_chunk()
        if not size:
            body(False)
            return
        aligned = b.icmp_unsigned("==", b.and_(b.ptrtoint(base, I64), _c(I64, size - 1)),
                                  _c(I64, 0))
        with b.if_else(aligned) as (streamed, plain):
            with streamed:
                body(True)
            with plain:
                body(False)
        b.fence("seq_cst")

    def copy_row(self, dst, src) -> None:
        """memcpy of one row (a constant size: LLVM inlines it as vector moves)."""
        memcpy = self.module.globals.get("llvm.memcpy.p0.p0.i64") or ir.Function(
            self.module, ir.FunctionType(ir.VoidType(), [P8, P8, I64, I1]),
            "llvm.memcpy.p0.p0.i64")
        self.b.call(memcpy, [dst, src, _c(I64, self.width), _c(I1, 0)])

    def fail(self, cond, code: int, pos, err) -> None:
        """if (cond) { *err = pos; return code; }"""
        b = self.b
        with b.if_then(cond, likely=False):
            b.store(pos, err)
            b.ret(_c(I64, code))
            b.position_at_end(b.append_basic_block("unreachable"))

    # -- row checks -----------------------------------------------------------
    def row_finite(self, row):
        """i1: every value of a packet row is finite (row-wise codecs: the scale
        and bias, and no code is a minifloat's NaN)."""
        entry = catalog.layout(self.spec.layout)
        codec, dim = entry.codec, self.spec.dim
        if isinstance(codec, catalog.Elementwise):
            exp = catalog.FORMATS[codec.fmt].exponent
            return self._all_finite(row, _INT[codec.fmt], dim, 0, exp)
        ok = self._all_finite(row, _INT[codec.param], len(codec.tail), entry.params_at(dim),
                              catalog.FORMATS[codec.param].exponent)
        if isinstance(codec, catalog.RowScaled):
            ok = self.b.and_(ok, self._all_finite(row, I8, dim, 0, codec.minifloat.nan))
        return ok

    def checks_decode(self) -> bool:
        """Finite parameters may still decode a code to inf: f32 (or bf16) ones
        can, f16 ones cannot (M * 65504 + 65504 is far from f32's max)."""
        codec = catalog.layout(self.spec.layout).codec
        return not isinstance(codec, catalog.Elementwise) and codec.param != "f16"

    def decodes_finite(self, row):
        """i1: every code of a row-wise row decodes to a finite value: code * scale,
        then + bias, each rounded to f32 (no fused multiply-add), as the lookup
        kernels and `quant.dequantize_rows` compute a row."""
        b, dim = self.b, self.spec.dim
        entry = catalog.layout(self.spec.layout)
        codec = entry.codec
        at = entry.params_at(dim)
        scale = _param(b, self.at(row, _c(I64, at)), codec.param)
        bias = (_param(b, self.at(row, _c(I64, at + catalog.FORMATS[codec.param].nbytes)),
                       codec.param) if "bias" in codec.tail else None)

        def bad(x):
            bits = b.and_(b.bitcast(x, I32), _c(I32, 0x7F800000))
            return b.zext(b.icmp_unsigned("==", bits, _c(I32, 0x7F800000)), I64)

        def decodes_bad(value):
            scaled = b.fmul(value, scale)
            return bad(scaled) if bias is None else b.or_(bad(scaled), bad(b.fadd(scaled, bias)))

        if isinstance(codec, catalog.RowAffine) and codec.per_byte == 1:
            flags = decodes_bad(b.uitofp(self.largest_code(row, dim), F32))
            return b.icmp_unsigned("==", flags, _c(I64, 0))

        def step(j, accs):
            if isinstance(codec, catalog.RowScaled):
                value = minifloat_values(b, b.load(self.at(row, j)), codec.minifloat)
            else:
                per = codec.per_byte
                byte = b.load(self.at(row, b.udiv(j, _c(I64, per))))
                shift = b.trunc(b.mul(b.urem(j, _c(I64, per)), _c(I64, codec.bits)), I8)
                code = b.and_(b.lshr(byte, shift), _c(I8, codec.max_code))
                value = b.uitofp(code, F32)
            return [b.or_(accs[0], decodes_bad(value))]

        (flags,) = loops.fold(b, _c(I64, 0), _c(I64, dim), "decode", [_c(I64, 0)], step)
        return b.icmp_unsigned("==", flags, _c(I64, 0))

    def largest_code(self, row, count: int):
        """The largest of `count` byte codes at `row`, as i8.

        An affine code (>= 0) decodes to rounded(rounded(code * scale) + bias),
        with scale and bias finite: of all codes the largest takes the value
        furthest from the bias, so when it decodes finite every code does.
        Finding it is vector work; decoding every code cost the int8 merge
        check 7 ns a row on rows in cache (now 4.8).
        """
        b = self.b
        lanes = 64
        vec = ir.VectorType(I8, lanes)

        def chunk(k, accs):
            v = b.load(b.bitcast(self.at(row, b.mul(k, _c(I64, lanes))), vec.as_pointer()), align=1)
            return [b.select(b.icmp_unsigned(">", v, accs[0]), v, accs[0])]

        (most,) = loops.fold(b, _c(I64, 0), _c(I64, count // lanes), "range",
                             [ir.Constant(vec, [0] * lanes)], chunk)
        name = f"llvm.vector.reduce.umax.v{lanes}i8"
        umax = self.module.globals.get(name) or ir.Function(
            self.module, ir.FunctionType(I8, [vec]), name)

        def tail(j, accs):
            c = b.load(self.at(row, j))
            return [b.select(b.icmp_unsigned(">", c, accs[0]), c, accs[0])]

        (top,) = loops.fold(b, _c(I64, count - count % lanes), _c(I64, count), "range.tail",
                            [b.call(umax, [most])], tail)
        return top

    def _all_finite(self, row, t: ir.IntType, count: int, offset: int, exp: int):
        """No element of `count` t-sized floats at row+offset has an all-ones exponent."""
        b = self.b
        base = b.bitcast(self.at(row, _c(I64, offset)), t.as_pointer())

        def step(j, accs):
            bits = b.load(b.gep(base, [j]), align=1)
            bad = b.icmp_unsigned("==", b.and_(bits, _c(t, exp)), _c(t, exp))
            return [b.or_(accs[0], b.zext(bad, I64))]

        (bad,) = loops.fold(b, _c(I64, 0), _c(I64, count), "finite", [_c(I64, 0)], step)
        return b.icmp_unsigned("==", bad, _c(I64, 0))

    def bytes_greater(self, a, c):
        """i1: row `a` is lexicographically larger than row `c` (unsigned bytes)."""
        b = self.b
        fn = self.fn
        pre = b.block
        head = fn.append_basic_block("cmp.head")
        body = fn.append_basic_block("cmp.body")
        step = fn.append_basic_block("cmp.next")
        done = fn.append_basic_block("cmp.done")
        b.branch(head)
        b.position_at_end(head)
        j = b.phi(I64, "j")
        j.add_incoming(_c(I64, 0), pre)
        b.cbranch(b.icmp_signed("<", j, _c(I64, self.width)), body, done)
        b.position_at_end(body)
        x, y = b.load(self.at(a, j)), b.load(self.at(c, j))
        gt = b.icmp_unsigned(">", x, y)
        b.cbranch(b.icmp_unsigned("!=", x, y), done, step)
        b.position_at_end(step)
        j.add_incoming(b.add(j, _c(I64, 1)), step)
        b.branch(head)
        b.position_at_end(done)
        result = b.phi(I1, "greater")
        result.add_incoming(_c(I1, 0), head)
        result.add_incoming(gt, body)
        return result

    # -- sequence words ---------------------------------------------------------
    def seq_ptr(self, seq, r):
        return self.at(seq, r)

    def write_guarded(self, seq, r, write) -> None:
        """The writer side: odd while the row is written, +2 when done (one writer a row)."""
        b = self.b
        if not self.spec.seq:
            write()
            return
        ptr = self.seq_ptr(seq, r)
        s = b.load_atomic(ptr, "monotonic", 4)
        b.store_atomic(b.add(s, _c(I32, 1)), ptr, "monotonic", 4)
        b.fence("release")
        write()
        b.fence("release")
        b.store_atomic(b.add(s, _c(I32, 2)), ptr, "monotonic", 4)

    def read_guarded(self, seq, r, read) -> None:
        """The reader side: retry while the word is odd or changed across the read."""
        b = self.b
        if not self.spec.seq:
            read()
            return
        ptr = self.seq_ptr(seq, r)
        retry = self.fn.append_basic_block("seq.retry")
        copy = self.fn.append_basic_block("seq.copy")
        done = self.fn.append_basic_block("seq.done")
        b.branch(retry)
        b.position_at_end(retry)
        s1 = b.load_atomic(ptr, "acquire", 4)
        odd = b.icmp_unsigned("!=", b.and_(s1, _c(I32, 1)), _c(I32, 0))
        b.cbranch(odd, retry, copy)
        b.position_at_end(copy)
        read()
        b.fence("acquire")
        s2 = b.load_atomic(ptr, "monotonic", 4)
        b.cbranch(b.icmp_unsigned("==", s1, s2), done, retry)
        b.position_at_end(done)


def emit_pack(module: ir.Module, spec: PackSpec) -> None:
    """Check every id of the partition, then copy each row and version into the packet.

    The packet is written once and read later (by a merge, often in another
    process), so when its rows are 16-byte aligned its row copies are
    streaming stores: no line of it is read for ownership first, nor kept in
    the cache (one same-process A/B, dim 128 f32, 500k of 4M rows: 33.3 ->
    19.9 ms; dim 64: 12.6 -> 11.7 ms). Unaligned packets take plain copies.
    """
    e = _SyncEmitter(module, spec, abi.sync_pack())
    part, nparts, serving, versions, seq, rows, ids, n, out_rows, out_versions, err = e.fn.args
    b = e.b
    lo, hi = e.part_range(part, nparts, n)
    with loops.counted(b, lo, hi, "check") as i:
        e.fail(b.icmp_unsigned(">=", e.load_id(ids, i), rows), ERR_ID, i, err)

    def pack(streaming: bool) -> None:
        with loops.counted(b, lo, hi, "pack") as i:
            e.prefetch_ahead(serving, versions, seq, ids, i, hi)
            r = e.load_id(ids, i)

            def read() -> None:
                (e.stream_row if streaming else e.copy_row)(e.row(out_rows, i), e.row(serving, r))
                b.store(b.load(e.at(versions, r)), e.at(out_versions, i))

            e.read_guarded(seq, r, read)

    e.if_aligned(out_rows, pack)
    b.ret(_c(I64, 0))


def emit_merge_check(module: ir.Module, spec: MergeSpec) -> None:
    e = _SyncEmitter(module, spec, abi.merge_check())
    part, nparts, rows, ids, n, prows, pversions, newest, err, descents = e.fn.args
    b = e.b
    lo, hi = e.part_range(part, nparts, n)
    descent = b.alloca(I64, name="descent")
    b.store(_c(I64, 0), descent)
    with loops.counted(b, lo, hi, "check") as i:
        r = e.load_id(ids, i)
        e.fail(b.icmp_unsigned(">=", r, rows), ERR_ID, i, err)
        # position 0 compares with itself: the one id before a range is always there
        before = e.load_id(ids, b.sub(i, b.zext(b.icmp_unsigned(">", i, _c(I64, 0)), I64)))
        down = b.zext(b.icmp_unsigned("<", r, before), I64)
        b.store(b.or_(b.load(descent), down), descent)
        v = b.load(e.at(pversions, i))
        bad_version = b.or_(b.icmp_signed("<", v, _c(I64, 0)), b.icmp_signed(">", v, newest))
        e.fail(bad_version, ERR_VERSION, i, err)
        e.fail(b.not_(e.row_finite(e.row(prows, i))), ERR_NONFINITE, i, err)
        if e.checks_decode():
            e.fail(b.not_(e.decodes_finite(e.row(prows, i))), ERR_DECODE, i, err)
    b.store(b.load(descent), e.at(descents, part))
    b.ret(_c(I64, 0))


class _MergeApply:
    """`ekko_merge_apply`: newest version wins, one partition per owned id.

    Each taken row's bytes are written with streaming stores when the
    serving rows are aligned for them (`stream_chunk`): the replica's row is
    overwritten whole, so reading its lines for ownership first only costs
    bandwidth (same-process A/B, 500k of 4M rows, dim 64: f32 21.8 -> 16.3
    ms, int8 9.0 -> 7.3 ms).

    Streaming stores are not ordered with the sequence words' plain stores,
    so guarded rows of whole lines are written in groups of MERGE_GROUP:
    each row's word goes odd and its version is written when it is taken; a
    full fence; the group's rows streamed; a full fence; every word of the
    group even. A row met again while its group is pending (its word is
    odd: this partition is its only writer) flushes the group first, so
    every decision sees the row as written. Guarded rows of part lines take
    plain copies.
    """

    def __init__(self, module: ir.Module, spec: MergeSpec):
        self.e = e = _SyncEmitter(module, spec, abi.merge_apply())
        e.scalar_streams = True
        (self.part, self.nparts, self.serving, self.versions, self.seq, self.ids, self.n,
         self.prows, self.pversions, ranged) = e.fn.args
        for a in (self.serving, self.prows):
            a.add_attribute("noalias")
        b = e.b
        self.count = b.alloca(I64, name="applied")
        self.take_ptr = b.alloca(I1, name="take")
        b.store(_c(I64, 0), self.count)
        self.ranged = b.icmp_unsigned("!=", ranged, _c(I64, 0))
        self.lo, self.hi = self.positions()
        # rows of whole lines only: a fence writes a half-streamed line out
        # half, and the memory then reads it back (int8 dim 64: 11.0 -> 15.1 ms)
        self.groups = spec.seq and e.width % LINE == 0
        if self.groups:
            group = ir.ArrayType(I64, MERGE_GROUP)
            self.group_rows, self.group_pos = b.alloca(group), b.alloca(group)
            self.pending = b.alloca(I64, name="pending")
            b.store(_c(I64, 0), self.pending)
            self.flush_fn = self.emit_flush(module, spec)

    def build(self) -> None:
        e = self.e
        if not e.spec.seq:
            e.if_aligned(self.serving, lambda streaming: self.loop(streaming, grouped=False))
        elif not self.groups:
            self.loop(False, grouped=False)
        else:
            def loop(streaming: bool) -> None:
                self.loop(streaming, grouped=streaming)
                if streaming:
                    self.flush()

            e.if_aligned(self.serving, loop)
        e.b.ret(e.b.load(self.count))

    def positions(self) -> tuple:
        """[lo, hi): the positions this partition walks. Ranged (the ids never
        decrease), its contiguous share, each end moved past the ids equal to the
        one before it, so every copy of an id falls in one partition; otherwise
        every position, taking the ids the owner hash gives it. A range reads its
        own part of the packet: walking all of it, each partition read every
        line of rows it does not take (int8 rows share lines)."""
        e, b = self.e, self.e.b
        lo, hi = e.part_range(self.part, self.nparts, self.n)
        lo, hi = self.past_equal(lo), self.past_equal(hi)
        return (b.select(self.ranged, lo, _c(I64, 0)), b.select(self.ranged, hi, self.n))

    def past_equal(self, at):
        """The first position >= at whose id differs from the one before it (or n)."""
        e, b = self.e, self.e.b
        entry = b.block
        head = b.append_basic_block("equal.head")
        body = b.append_basic_block("equal.body")
        done = b.append_basic_block("equal.done")
        b.branch(head)
        b.position_at_end(head)
        pos = b.phi(I64)
        pos.add_incoming(at, entry)
        inside = b.and_(b.icmp_unsigned(">", pos, _c(I64, 0)), b.icmp_unsigned("<", pos, self.n))
        b.cbranch(b.and_(self.ranged, inside), body, done)
        b.position_at_end(body)
        same = b.icmp_unsigned("==", e.load_id(self.ids, pos),
                               e.load_id(self.ids, b.sub(pos, _c(I64, 1))))
        pos.add_incoming(b.add(pos, _c(I64, 1)), body)
        b.cbranch(same, head, done)
        b.position_at_end(done)
        out = b.phi(I64)
        out.add_incoming(pos, head)
        out.add_incoming(pos, body)
        return out

    def loop(self, streaming: bool, grouped: bool) -> None:
        """This partition's positions; it takes the rows it owns."""
        e, b = self.e, self.e.b
        with loops.counted(b, self.lo, self.hi, "merge") as i:
            self.prefetch_version(i)
            r = e.load_id(self.ids, i)
            mine = b.icmp_unsigned("==", partition_owner(b, r, self.nparts), self.part)
            with b.if_then(b.or_(self.ranged, mine)):
                if grouped:
                    word = b.load_atomic(e.seq_ptr(self.seq, r), "monotonic", 4)
                    with b.if_then(b.trunc(word, I1), likely=False):  # odd: pending in the group
                        self.flush()
                v = b.load(e.at(self.pversions, i))
                with b.if_then(self.newer(i, r, v)):
                    if grouped:
                        self.take_grouped(i, r, v)
                    else:
                        def write() -> None:
                            src, dst = e.row(self.prows, i), e.row(self.serving, r)
                            (e.stream_row if streaming else e.copy_row)(dst, src)
                            b.store(v, e.at(self.versions, r))

                        e.write_guarded(self.seq, r, write)
                    b.store(b.add(b.load(self.count), _c(I64, 1)), self.count)

    def prefetch_version(self, i) -> None:
        """Ask for the replica's version (and word) MERGE_PREFETCH positions on: the
        walk's one random read (its row is only written). Past the end it re-asks
        for i's, without a branch."""
        e, b = self.e, self.e.b
        r = e.load_id(self.ids, prefetch.ahead(b, i, MERGE_PREFETCH, self.n))
        pf = prefetch.intrinsic(e.module)
        prefetch.row(b, pf, e.at(self.versions, r), 8, write=1)
        if e.spec.seq:
            prefetch.row(b, pf, e.seq_ptr(self.seq, r), 4, write=1)

    def newer(self, i, r, v):
        """i1: packet row i (version v) wins over replica row r: a newer version, or
        the same one with larger bytes."""
        e, b = self.e, self.e.b
        cur = b.load(e.at(self.versions, r))
        b.store(b.icmp_signed(">", v, cur), self.take_ptr)
        with b.if_then(b.icmp_signed("==", v, cur), likely=False):
            b.store(e.bytes_greater(e.row(self.prows, i), e.row(self.serving, r)), self.take_ptr)
        return b.load(self.take_ptr)

    def take_grouped(self, i, r, v) -> None:
        """The row's word odd and its version written now, its bytes at the flush."""
        e, b = self.e, self.e.b
        word = e.seq_ptr(self.seq, r)
        b.store_atomic(b.add(b.load_atomic(word, "monotonic", 4), _c(I32, 1)), word, "monotonic", 4)
        b.fence("release")
        b.store(v, e.at(self.versions, r))
        g = b.load(self.pending)
        b.store(r, b.gep(self.group_rows, [_c(I32, 0), g]))
        b.store(i, b.gep(self.group_pos, [_c(I32, 0), g]))
        g = b.add(g, _c(I64, 1))
        b.store(g, self.pending)
        with b.if_then(b.icmp_unsigned("==", g, _c(I64, MERGE_GROUP)), likely=False):
            self.flush()

    def flush(self) -> None:
        b = self.e.b
        b.call(self.flush_fn, [self.serving, self.seq, self.prows, b.bitcast(self.group_rows, P64),
                               b.bitcast(self.group_pos, P64), b.load(self.pending)])
        b.store(_c(I64, 0), self.pending)

    @staticmethod
    def emit_flush(module: ir.Module, spec: MergeSpec) -> ir.Function:
        """flush(serving, seq, prows, rows, positions, g): the group's rows streamed
        between two full fences, then their words even."""
        fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [P8, P32, P8, P64, P64, I64]),
                         "ekko_merge_flush")
        fn.linkage = "internal"
        serving, seq, prows, rows, positions, g = fn.args
        e = _SyncEmitter(module, spec, None, fn)
        b = e.b
        b.fence("seq_cst")  # the odd words are visible before any streamed byte
        with loops.counted(b, _c(I64, 0), g, "flush") as k:
            r, i = b.load(e.at(rows, k)), b.load(e.at(positions, k))
            e.stream_row(e.row(serving, r), e.row(prows, i))
        b.fence("seq_cst")  # every streamed byte is visible before a word goes even
        with loops.counted(b, _c(I64, 0), g, "even") as k:
            word = e.seq_ptr(seq, b.load(e.at(rows, k)))
            b.store_atomic(b.add(b.load_atomic(word, "monotonic", 4), _c(I32, 1)), word,
                           "monotonic", 4)
        b.ret_void()
        return fn


def emit_merge_apply(module: ir.Module, spec: MergeSpec) -> None:
    _MergeApply(module, spec).build()


def emit_pack_module(spec: PackSpec) -> str:
    """The LLVM IR module (text) of a pack kernel."""
    module = ir.Module(name=f"ekko_pack_{spec.layout}_{spec.dim}")
    module.triple = ""
    emit_pack(module, spec)
    emit_packed(module, module.get_global("ekko_pack"), abi.sync_pack())
    return str(module)


def emit_merge_module(spec: MergeSpec) -> str:
    """The LLVM IR module (text) of a merge kernel: check and apply."""
    module = ir.Module(name=f"ekko_merge_{spec.layout}_{spec.dim}")
    module.triple = ""
    emit_merge_check(module, spec)
    emit_merge_apply(module, spec)
    emit_packed(module, module.get_global("ekko_merge_check"), abi.merge_check())
    emit_packed(module, module.get_global("ekko_merge_apply"), abi.merge_apply())
    return str(module)


def emit_sync(spec: PackSpec | MergeSpec) -> str:
    return emit_pack_module(spec) if isinstance(spec, PackSpec) else emit_merge_module(spec)
