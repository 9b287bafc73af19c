"""LLVM IR for a fused sparse update (an UpdateSpec), built with llvmlite.ir.

Two exported functions, each run once per partition (one per thread):

  i64 ekko_update_dedup(part, nparts, ids, n, rows, grads, htab, cap, uids,
                        acc, slots, count_out, err_pos, order, key_a, key_b, order_b,
                        srcs)
      Validates the ids this partition owns (ids are split by a hash of the
      id, so partitions never share a row; each block of ids is compacted to
      the owned positions first, without branches) and their gradient rows,
      and sums duplicates in input order into `acc` through an
      open-addressing hash table of `cap` (id, unique index) pairs (`htab`,
      id -1 when empty, left empty again on return). Writes no table.
      Returns 0, 1 (id out of range at *err_pos) or 2 (non-finite gradient in
      delta row *err_pos) or 3 (the hash table passed 3/4 full: the caller
      retries with a larger one; nothing was kept). With `sort`, `order`
      receives the unique indices sorted by id (radix sort; the other three
      arrays are its scratch).

  void ekko_update_apply(part, nparts, ids, grads, count, table, state0,
                         state1, serving, versions, alpha, version, seed, order,
                         raw_grads, srcs)
      For each of `count` (id, gradient row) pairs: clip, decay, optimizer,
      store (nearest-even or stochastic rounding), re-make the serving row,
      stamp the version. With dedup the pairs are the partition's unique ids
      (i64) and summed rows; without (plain SGD) they are the raw delta and
      each partition applies the ids it owns, in input order.

`alpha` is the step's learning rate where it depends on the step (Adagrad's
lr decay, Adam's bias correction), computed by the caller; every other
hyper-parameter is a constant. Inner loops run over the embedding dim with
fast-math reductions so LLVM vectorizes them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from llvmlite import ir

from . import loops
from .spec import UpdateSpec

I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F32, F64, F16 = ir.FloatType(), ir.DoubleType(), ir.HalfType()
FAST = ("fast",)
GOLDEN = 0x9E3779B97F4A7C15


def _c(t: ir.Type, v) -> ir.Constant:
    return ir.Constant(t, v)


class Emitter:
    """An IRBuilder with the loops and conversions the update kernel needs."""

    def __init__(self, module: ir.Module, fn: ir.Function):
        self.module = module
        self.fn = fn
        self.b = ir.IRBuilder(fn.append_basic_block("entry"))

    # -- control flow ---------------------------------------------------
    def loop(self, start, stop, name: str):
        """with e.loop(start, stop, name) as i: for (i = start; i < stop; ++i)."""
        return loops.counted(self.b, start, stop, name)

    @contextmanager
    def tiled(self, dim: int, tile: int, name: str) -> Iterator[ir.Value]:
        """The embedding-dim loop blocked by `tile` (chosen by upd-schedule).

        for (base = 0; base < dim; base += tile)
          for (lane = 0; lane < min(tile, dim - base); ++lane)  body(base + lane)
        Full tiles have a constant trip count, which LLVM turns into whole
        vector operations; only the last tile is partial.
        """
        tile = max(1, min(tile, dim))
        tiles = (dim + tile - 1) // tile
        with self.loop(_c(I64, 0), _c(I64, tiles), f"{name}.tiles") as t:
            base = self.b.mul(t, _c(I64, tile))
            rest = self.b.sub(_c(I64, dim), base)
            width = self.b.select(self.b.icmp_signed("<", rest, _c(I64, tile)), rest,
                                  _c(I64, tile))
            with self.loop(_c(I64, 0), width, f"{name}.lanes") as lane:
                yield self.b.add(base, lane)

    def fold(self, stop, name: str, inits: list[ir.Constant], step) -> list[ir.Value]:
        """Loop j over [0, stop) carrying accumulators: accs = step(j, accs).

        One loop shape for every reduction (sums, min and max together, the
        integer OR of the finite check), so LLVM sees the same pattern.
        """
        return loops.fold(self.b, _c(I64, 0), stop, name, inits, step)

    def reduce(self, stop, name: str, init: float, step, combine) -> ir.Value:
        """Fold `combine(acc, step(j))` over j in [0, stop), in f32."""
        (acc,) = self.fold(stop, name, [_c(F32, init)], lambda j, a: [combine(a[0], step(j))])
        return acc

    def min_max(self, stop, load) -> tuple[ir.Value, ir.Value]:
        """min and max of load(j) over [0, stop) in one pass over the row."""
        def step(j, accs):
            x = load(j)
            return [self.fmin(accs[0], x), self.fmax(accs[1], x)]

        lo, hi = self.fold(stop, "minmax", [_c(F32, float("inf")), _c(F32, float("-inf"))], step)
        return lo, hi

    # -- math -----------------------------------------------------------
    def intrinsic(self, name: str, t: ir.Type = F32) -> ir.Function:
        return self.module.declare_intrinsic(name, [t])

    def fadd(self, a, b):
        return self.b.fadd(a, b, flags=FAST)

    def fsub(self, a, b):
        return self.b.fsub(a, b, flags=FAST)

    def fmul(self, a, b):
        return self.b.fmul(a, b, flags=FAST)

    def fdiv(self, a, b):
        return self.b.fdiv(a, b, flags=FAST)

    def fmin(self, a, b):
        return self.b.select(self.b.fcmp_ordered("<", a, b, flags=FAST), a, b, flags=FAST)

    def fmax(self, a, b):
        return self.b.select(self.b.fcmp_ordered(">", a, b, flags=FAST), a, b, flags=FAST)

    def sqrt(self, x):
        return self.b.call(self.intrinsic("llvm.sqrt"), [x])

    def rint(self, x):
        return self.b.call(self.intrinsic("llvm.rint"), [x])

    def f(self, v: float) -> ir.Constant:
        return _c(F32, float(v))

    # -- memory ---------------------------------------------------------
    def gep(self, ptr, index):
        return self.b.gep(ptr, [index], inbounds=True)

    def row(self, base, elem_t: ir.Type, row, width: int):
        """Pointer to row `row` of a (rows, width) array of elem_t at i8* `base`."""
        typed = self.b.bitcast(base, elem_t.as_pointer())
        return self.gep(typed, self.b.mul(row, _c(I64, width)))


def _load_elem(e: Emitter, ptr, dtype: str):
    """Load one element of a master table as f32."""
    b = e.b
    if dtype == "f32":
        return b.load(ptr)
    if dtype == "f16":
        return b.fpext(b.load(ptr), F32)
    bits = b.shl(b.zext(b.load(ptr), I32), _c(I32, 16))
    return b.bitcast(bits, F32)


def _elem_type(dtype: str) -> ir.Type:
    return {"f32": F32, "f16": F16, "bf16": I16}[dtype]


def _random_bits(e: Emitter, seed, row, col, mask: int):
    """Counter-based random bits of (seed, row, col): a splitmix64 finalizer."""
    b = e.b
    h = b.xor(b.mul(seed, _c(I64, GOLDEN)), b.mul(row, _c(I64, 0xBF58476D1CE4E5B9)))
    h = b.xor(h, b.mul(col, _c(I64, 0x94D049BB133111EB)))
    h = b.xor(h, b.lshr(h, _c(I64, 31)))
    h = b.mul(h, _c(I64, 0xD6E8FEB86659FD93))
    h = b.xor(h, b.lshr(h, _c(I64, 32)))
    return b.and_(b.trunc(h, I32), _c(I32, mask))


def _store_elem(e: Emitter, ptr, value, dtype: str, sr: bool, seed, row, col):
    """Store an f32 value as the table dtype: nearest-even or stochastic rounding."""
    b = e.b
    if dtype == "f32":
        b.store(value, ptr)
        return
    bits = b.bitcast(value, I32)
    if dtype == "bf16":
        if sr:
            bits = b.add(bits, _random_bits(e, seed, row, col, 0xFFFF))
        else:
            lsb = b.and_(b.lshr(bits, _c(I32, 16)), _c(I32, 1))
            bits = b.add(bits, b.add(lsb, _c(I32, 0x7FFF)))
        b.store(b.trunc(b.lshr(bits, _c(I32, 16)), I16), ptr)
        return
    if sr:
        bits = b.add(bits, _random_bits(e, seed, row, col, 0x1FFF))
        value = b.bitcast(b.and_(bits, _c(I32, 0xFFFFE000)), F32)
    b.store(b.fptrunc(value, F16), ptr)


def _owner(e: Emitter, idv, nparts):
    """The partition that owns an id: a multiplicative hash, so hot ids spread."""
    b = e.b
    h = b.mul(idv, _c(I64, GOLDEN))
    return b.urem(b.lshr(h, _c(I64, 40)), nparts)


def _load_id(e: Emitter, ids_t, i):
    v = e.b.load(e.gep(ids_t, i))
    return v if v.type == I64 else e.b.sext(v, I64)


def _index_type(spec: UpdateSpec) -> ir.Type:
    return I32 if spec.index_dtype == "i32" else I64


# ---------------------------------------------------------------------------
# phase 1: validate and deduplicate


DEDUP_BLOCK = 1024  # ids scanned per block; the owned ones are compacted first
SLOT_AHEAD = 16  # owned ids: the hash table is larger than L2, each probe a miss
GRAD_AHEAD = 4  # owned ids: their gradient rows, read by the finite check


def emit_dedup(module: ir.Module, spec: UpdateSpec) -> None:
    idx_t = _index_type(spec)
    p64 = I64.as_pointer()
    args = [I64, I64, idx_t.as_pointer(), I64, I64, F32.as_pointer(), p64, I64, p64,
            F32.as_pointer(), p64, p64, p64, p64, p64, p64, p64, p64]
    fn = ir.Function(module, ir.FunctionType(I64, args), "ekko_update_dedup")
    (part, nparts, ids, n, rows, grads, htab, cap, uids, acc, slots, count_out,
     err, order, key_a, key_b, order_b, srcs) = fn.args
    for a in fn.args[2:]:
        if isinstance(a.type, ir.PointerType):
            a.add_attribute("noalias")
    e = Emitter(module, fn)
    b = e.b
    dim = _c(I64, spec.dim)
    count_ptr = b.alloca(I64)
    b.store(_c(I64, 0), count_ptr)
    status = b.alloca(I64)
    b.store(_c(I64, 0), status)
    mask = b.sub(cap, _c(I64, 1))
    fail = fn.append_basic_block("fail")
    with _each_owned(e, ids, n, part, nparts) as (owned, t, cnt):
        _prefetch_owned(e, spec, ids, grads, owned, t, cnt, htab, mask)
        i = b.load(e.gep(owned, t))
        idv = _load_id(e, ids, i)
        # negative ids are huge unsigned
        _fail_if(e, b.icmp_unsigned(">=", idv, rows), 1, i, err, status, fail)
        finite = _row_finite(e, e.gep(grads, b.mul(i, dim)), dim)
        _fail_if(e, b.not_(finite), 2, i, err, status, fail)
        if spec.dedup:
            _insert(e, spec, idv, i, grads, htab, mask, uids, acc, slots, srcs,
                    count_ptr, status, fail)
    # leave the hash table empty for the next call
    count = b.load(count_ptr)
    if spec.dedup:
        _clear_slots(e, htab, slots, count)
        if spec.sort:
            _radix_sort(e, uids, count, rows, order, key_a, key_b, order_b)
    b.store(count, count_out)
    b.ret(_c(I64, 0))
    b.position_at_end(fail)
    if spec.dedup:  # an error leaves the slots filled so far: empty them before returning
        _clear_slots(e, htab, slots, b.load(count_ptr))
    b.ret(b.load(status))


def _fail_if(e: Emitter, cond, code: int, pos, err, status, fail) -> None:
    """if (cond) { *err = pos; status = code; goto fail; }"""
    b = e.b
    with b.if_then(cond):
        b.store(pos, err)
        b.store(_c(I64, code), status)
        b.branch(fail)
        b.position_at_end(b.append_basic_block("unreachable"))


@contextmanager
def _each_owned(e: Emitter, ids, n, part, nparts) -> Iterator[tuple]:
    """for each position t < cnt of a block's owned ids: yields (owned, t, cnt).

    The ids are walked in blocks of DEDUP_BLOCK; each block is first
    compacted to the positions this partition owns (`owned[0:cnt]`, in input
    order), so the body runs only for those and can look a few ahead.
    """
    b = e.b
    owned = b.gep(b.alloca(ir.ArrayType(I64, DEDUP_BLOCK), name="owned"), [_c(I32, 0), _c(I32, 0)])
    nblocks = b.udiv(b.add(n, _c(I64, DEDUP_BLOCK - 1)), _c(I64, DEDUP_BLOCK))
    with e.loop(_c(I64, 0), nblocks, "blocks") as blk:
        lo = b.mul(blk, _c(I64, DEDUP_BLOCK))
        width = b.sub(_minimum(e, b.add(lo, _c(I64, DEDUP_BLOCK)), n), lo)
        cnt = _compact_owned(e, ids, lo, width, owned, part, nparts)
        with e.loop(_c(I64, 0), cnt, "owned") as t:
            yield owned, t, cnt


def _minimum(e: Emitter, a, b_):
    return e.b.select(e.b.icmp_signed("<", a, b_), a, b_)


def _compact_owned(e: Emitter, ids, lo, width, owned, part, nparts):
    """owned[0:cnt] = the positions in [lo, lo+width) whose id this partition owns.

    Branch-free (store always, advance by the ownership bit): with N
    partitions the ownership test is a coin flip the branch predictor loses.
    """
    b = e.b

    def step(j, accs):
        i = b.add(lo, j)
        b.store(i, e.gep(owned, accs[0]))
        mine = b.icmp_unsigned("==", _owner(e, _load_id(e, ids, i), nparts), part)
        return [b.add(accs[0], b.zext(mine, I64))]

    (cnt,) = e.fold(width, "compact", [_c(I64, 0)], step)
    return cnt


def _clear_slots(e: Emitter, htab, slots, count) -> None:
    b = e.b
    with e.loop(_c(I64, 0), count, "reset") as k:
        b.store(_c(I64, -1), e.gep(htab, b.shl(b.load(e.gep(slots, k)), _c(I64, 1))))


RADIX_BITS = 11


def _radix_sort(e: Emitter, uids, count, rows, order, key_a, key_b, order_b) -> None:
    """order = the unique indices sorted by id: an LSD radix sort, 11 bits a pass.

    Rows applied in id order walk the table forward, which the hardware
    prefetcher and the TLB reward; only as many passes as `rows` has bits.
    """
    b = e.b
    buckets = 1 << RADIX_BITS
    hist = b.alloca(ir.ArrayType(I64, buckets), name="hist")
    hist0 = b.gep(hist, [_c(I32, 0), _c(I32, 0)])
    with e.loop(_c(I64, 0), count, "sort_init") as k:
        b.store(b.load(e.gep(uids, k)), e.gep(key_a, k))
        b.store(k, e.gep(order, k))
    # current (keys, order) and spare buffers swap after every pass
    cur = [b.alloca(p64_t()) for _ in range(4)]
    for slot, ptr in zip(cur, (key_a, order, key_b, order_b)):
        b.store(ptr, slot)
    shift = b.alloca(I64)
    b.store(_c(I64, 0), shift)
    head = e.fn.append_basic_block("pass.head")
    body = e.fn.append_basic_block("pass.body")
    done = e.fn.append_basic_block("pass.done")
    b.branch(head)
    b.position_at_end(head)
    sh = b.load(shift)
    more = b.icmp_unsigned("!=", b.lshr(b.sub(rows, _c(I64, 1)), sh), _c(I64, 0))
    b.cbranch(b.and_(more, b.icmp_unsigned("<", sh, _c(I64, 64))), body, done)
    b.position_at_end(body)
    src_k, src_o, dst_k, dst_o = (b.load(slot) for slot in cur)
    mask = _c(I64, buckets - 1)

    def digit(key):
        return b.and_(b.lshr(key, sh), mask)

    with e.loop(_c(I64, 0), _c(I64, buckets), "hist_zero") as d:
        b.store(_c(I64, 0), e.gep(hist0, d))
    with e.loop(_c(I64, 0), count, "hist") as i:
        p = e.gep(hist0, digit(b.load(e.gep(src_k, i))))
        b.store(b.add(b.load(p), _c(I64, 1)), p)
    total = b.alloca(I64)
    b.store(_c(I64, 0), total)
    with e.loop(_c(I64, 0), _c(I64, buckets), "prefix") as d:
        p = e.gep(hist0, d)
        c = b.load(p)
        t = b.load(total)
        b.store(t, p)
        b.store(b.add(t, c), total)
    with e.loop(_c(I64, 0), count, "scatter") as i:
        key = b.load(e.gep(src_k, i))
        p = e.gep(hist0, digit(key))
        pos = b.load(p)
        b.store(b.add(pos, _c(I64, 1)), p)
        b.store(key, e.gep(dst_k, pos))
        b.store(b.load(e.gep(src_o, i)), e.gep(dst_o, pos))
    for slot, ptr in zip(cur, (dst_k, dst_o, src_k, src_o)):
        b.store(ptr, slot)
    b.store(b.add(sh, _c(I64, RADIX_BITS)), shift)
    b.branch(head)
    b.position_at_end(done)
    # an odd number of passes leaves the result in the spare buffer
    result = b.load(cur[1])
    with b.if_then(b.icmp_unsigned("!=", b.ptrtoint(result, I64), b.ptrtoint(order, I64))):
        with e.loop(_c(I64, 0), count, "sort_copy") as k:
            b.store(b.load(e.gep(result, k)), e.gep(order, k))


def p64_t() -> ir.Type:
    return I64.as_pointer()


def _row_finite(e: Emitter, row, dim):
    """All of a row's values finite: no element has an all-ones exponent.

    An integer OR-reduction (not float math, which fast-math could fold)."""
    b = e.b

    def step(j, accs):
        bits = b.bitcast(b.load(e.gep(row, j)), I32)
        exp = b.and_(bits, _c(I32, 0x7F800000))
        flag = b.zext(b.icmp_unsigned("==", exp, _c(I32, 0x7F800000)), I32)
        return [b.or_(accs[0], flag)]

    (bad,) = e.fold(dim, "finite", [_c(I32, 0)], step)
    return b.icmp_unsigned("==", bad, _c(I32, 0))


def _slot_of(e: Emitter, idv, mask):
    """The first hash-table slot probed for an id (Fibonacci hashing)."""
    b = e.b
    return b.and_(b.lshr(b.mul(idv, _c(I64, GOLDEN)), _c(I64, 17)), mask)


def _prefetch_owned(e: Emitter, spec: UpdateSpec, ids, grads, owned, t, cnt, htab,
                    mask) -> None:
    """Fetch the hash slot and the gradient row of owned ids a few places ahead."""
    b = e.b
    pf = _prefetch_fn(e)

    def fetch(ptr) -> None:
        b.call(pf, [b.bitcast(ptr, I8.as_pointer()), _c(I32, 0), _c(I32, 3), _c(I32, 1)])

    if spec.dedup:
        ahead = b.add(t, _c(I64, SLOT_AHEAD))
        with b.if_then(b.icmp_signed("<", ahead, cnt)):
            nid = _load_id(e, ids, b.load(e.gep(owned, ahead)))
            fetch(e.gep(htab, b.shl(_slot_of(e, nid, mask), _c(I64, 1))))
    ahead = b.add(t, _c(I64, GRAD_AHEAD))
    with b.if_then(b.icmp_signed("<", ahead, cnt)):
        row = e.gep(grads, b.mul(b.load(e.gep(owned, ahead)), _c(I64, spec.dim)))
        _fetch_row(e, row, 4 * spec.dim, pf, write=0)


def _prefetch_fn(e: Emitter) -> ir.Function:
    return e.module.globals.get("llvm.prefetch.p0") or ir.Function(
        e.module, ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I32, I32, I32]),
        "llvm.prefetch.p0")


def _insert(e: Emitter, spec: UpdateSpec, idv, i, grads, htab, mask, uids, acc, slots, srcs,
            count_ptr, status, fail):
    """Find or add `idv` in the hash table.

    The table holds (id, unique index) pairs side by side, so a probe is one
    cache line, not one per array.

    A new id only remembers its delta row (srcs[k] = i): most ids of a Zipf
    delta occur once, and their rows are read in place later. The second
    occurrence copies the first row into acc (srcs[k] = -1) and adds.
    """
    dim = _c(I64, spec.dim)
    grow = e.gep(grads, e.b.mul(i, dim))
    b = e.b
    fn = e.fn
    start = _slot_of(e, idv, mask)
    pre = b.block
    probe = fn.append_basic_block("probe")
    found = fn.append_basic_block("found")
    empty = fn.append_basic_block("empty")
    nextb = fn.append_basic_block("next_slot")
    after = fn.append_basic_block("inserted")
    b.branch(probe)
    b.position_at_end(probe)
    slot = b.phi(I64, "slot")
    slot.add_incoming(start, pre)
    key_ptr = e.gep(htab, b.shl(slot, _c(I64, 1)))
    key = b.load(key_ptr)
    b.cbranch(b.icmp_signed("==", key, idv), found, nextb)
    b.position_at_end(nextb)
    step = fn.append_basic_block("step")
    b.cbranch(b.icmp_signed("==", key, _c(I64, -1)), empty, step)
    b.position_at_end(step)
    slot.add_incoming(b.and_(b.add(slot, _c(I64, 1)), mask), b.block)
    b.branch(probe)
    # a new id: take the next unique index and remember its delta row
    b.position_at_end(empty)
    k = b.load(count_ptr)
    cap = b.add(mask, _c(I64, 1))
    full = b.icmp_unsigned(">=", b.mul(b.add(k, _c(I64, 1)), _c(I64, 4)), b.mul(cap, _c(I64, 3)))
    with b.if_then(full):
        b.store(_c(I64, 3), status)
        b.branch(fail)
        b.position_at_end(b.append_basic_block("unreachable"))
    b.store(idv, key_ptr)
    b.store(k, e.gep(key_ptr, _c(I64, 1)))
    b.store(slot, e.gep(slots, k))
    b.store(idv, e.gep(uids, k))
    b.store(b.add(k, _c(I64, 1)), count_ptr)
    b.store(i, e.gep(srcs, k))
    b.branch(after)
    # a repeated id: add the row, in input order
    b.position_at_end(found)
    kk = b.load(e.gep(key_ptr, _c(I64, 1)))
    dst2 = e.gep(acc, b.mul(kk, dim))
    first = b.load(e.gep(srcs, kk))
    with b.if_then(b.icmp_signed(">=", first, _c(I64, 0))):
        src = e.gep(grads, b.mul(first, dim))
        with e.tiled(spec.dim, spec.tile, "copy") as j:
            b.store(b.load(e.gep(src, j)), e.gep(dst2, j))
        b.store(_c(I64, -1), e.gep(srcs, kk))
    with e.tiled(spec.dim, spec.tile, "add") as j:
        p = e.gep(dst2, j)
        b.store(b.fadd(b.load(p), b.load(e.gep(grow, j))), p)
    b.branch(after)
    b.position_at_end(after)


# ---------------------------------------------------------------------------
# phase 2: apply


def emit_apply(module: ir.Module, spec: UpdateSpec) -> None:
    id_t = I64 if spec.dedup else _index_type(spec)
    p8 = I8.as_pointer()
    args = [I64, I64, id_t.as_pointer(), F32.as_pointer(), I64, p8, F32.as_pointer(),
            F32.as_pointer(), p8, I64.as_pointer(), F64, I64, I64, I64.as_pointer(),
            F32.as_pointer(), I64.as_pointer()]
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), args), "ekko_update_apply")
    (part, nparts, ids, grads, count, table, s0, s1, serving, versions, alpha, version,
     seed, order, raw_grads, srcs) = fn.args
    for a in (ids, grads, table, s0, s1, serving, versions):
        a.add_attribute("noalias")
    e = Emitter(module, fn)
    b = e.b
    bufs = {"table": table, "s0": s0, "s1": s1, "serving": serving, "versions": versions}
    step = (b.fptrunc(alpha, F32), version, seed)
    scratch = b.alloca(F32, spec.dim, name="g")  # the row's gradient, transformed
    dim = _c(I64, spec.dim)
    if spec.dedup:
        def entry(pos):
            return b.load(e.gep(order, pos)) if spec.sort else pos

        def grad_row(k):
            first = b.load(e.gep(srcs, k))  # >= 0: the id occurred once, row still in the delta
            return b.select(b.icmp_signed(">=", first, _c(I64, 0)),
                            e.gep(raw_grads, b.mul(first, dim)), e.gep(grads, b.mul(k, dim)))

        with e.loop(_c(I64, 0), count, "rows") as pos:
            _prefetch(e, spec, ids, entry, grad_row, pos, count, bufs)
            k = entry(pos)
            _apply_row(e, spec, _load_id(e, ids, k), grad_row(k), scratch, bufs, step)
    else:  # the raw delta: each partition applies the ids it owns, in input order
        def grad_row(k):
            return e.gep(grads, b.mul(k, dim))

        with _each_owned(e, ids, count, part, nparts) as (owned, t, cnt):
            def entry(pos):
                return b.load(e.gep(owned, pos))

            _prefetch(e, spec, ids, entry, grad_row, t, cnt, bufs)
            k = entry(t)
            _apply_row(e, spec, _load_id(e, ids, k), grad_row(k), scratch, bufs, step)
    b.ret_void()


PREFETCH_AHEAD = 8  # rows: 4 to 16 measured the same
PREFETCH_BYTES = 512  # per stream: wider rows are left to the hardware prefetcher


def _prefetch(e: Emitter, spec: UpdateSpec, ids, entry, grad_row, pos, count,
              bufs: dict) -> None:
    """Ask for every line the row PREFETCH_AHEAD positions later touches.

    That row's gradient (in the delta, or summed in acc), its table, state
    and serving rows and its version are all scattered cache misses; issuing
    them early overlaps the misses of several rows. Leaving out the gradient
    and the version and the last line of rows that do not start on a line,
    as an earlier version did, doubled the apply phase (25.7 -> 12.0 ms on
    the dim-64 benchmark).
    """
    b = e.b
    ahead = b.add(pos, _c(I64, PREFETCH_AHEAD))
    with b.if_then(b.icmp_signed("<", ahead, count)):
        k = entry(ahead)
        nid = _load_id(e, ids, k)
        elem = _elem_type(spec.table_dtype)
        row_bytes = spec.dim * (4 if spec.table_dtype == "f32" else 2)
        targets = [(grad_row(k), 4 * spec.dim),
                   (e.row(bufs["table"], elem, nid, spec.dim), row_bytes)]
        if spec.optimizer == "rowwise_adagrad":
            targets.append((e.gep(bufs["s0"], nid), 4))
        elif spec.optimizer in ("adagrad", "adam"):
            targets.append((e.gep(bufs["s0"], b.mul(nid, _c(I64, spec.dim))), 4 * spec.dim))
            if spec.optimizer == "adam":
                targets.append((e.gep(bufs["s1"], b.mul(nid, _c(I64, spec.dim))), 4 * spec.dim))
        if spec.serving is not None:
            width = {"f32": 4 * spec.dim, "f16": 2 * spec.dim, "bf16": 2 * spec.dim,
                     "int8": spec.dim + 8, "int4": (spec.dim + 1) // 2 + 4}[spec.serving]
            targets.append((e.row(bufs["serving"], I8, nid, width), width))
        if spec.versions:
            targets.append((e.gep(bufs["versions"], nid), 8))  # null when not passed: harmless
        pf = _prefetch_fn(e)
        for ptr, nbytes in targets:
            _fetch_row(e, ptr, nbytes, pf)


def _fetch_row(e: Emitter, ptr, nbytes: int, pf, write: int = 1) -> None:
    """Prefetch every line of a row that need not start on a line."""
    base = e.b.bitcast(ptr, I8.as_pointer())
    span = min(nbytes, PREFETCH_BYTES)
    # the row's last byte may sit one line past its first 64-byte steps
    for off in [*range(0, span, 64), *([span - 1] if span % 64 != 1 else [])]:
        e.b.call(pf, [e.gep(base, _c(I64, off)), _c(I32, write), _c(I32, 3), _c(I32, 1)])


def _apply_row(e: Emitter, spec: UpdateSpec, idv, src, g, bufs: dict, step: tuple) -> None:
    """One row: gradient transforms, optimizer, serving refresh, version stamp."""
    b = e.b
    alpha, version, seed = step
    elem = _elem_type(spec.table_dtype)
    wrow = e.row(bufs["table"], elem, idv, spec.dim)
    if spec.clip_value is not None or spec.max_norm is not None or spec.weight_decay:
        _transform_grad(e, spec, src, g, wrow)
    else:
        g = src  # nothing to transform: the optimizer reads the summed row directly
    _optimizer(e, spec, idv, g, wrow, bufs["s0"], bufs["s1"], alpha, seed)
    if spec.serving is not None:
        _refresh_serving(e, spec, idv, wrow, bufs["serving"])
    if spec.versions:
        versions = bufs["versions"]
        with b.if_then(b.icmp_unsigned("!=", b.ptrtoint(versions, I64), _c(I64, 0))):
            b.store(version, e.gep(versions, idv))


def _transform_grad(e: Emitter, spec: UpdateSpec, src, g, wrow) -> None:
    """g = clip(src), then max-norm scaling, then + weight_decay * w."""
    b = e.b
    dim = _c(I64, spec.dim)
    with e.tiled(spec.dim, spec.tile, "grad") as j:
        x = b.load(e.gep(src, j))
        if spec.clip_value is not None:
            c = spec.clip_value
            x = e.fmin(e.fmax(x, e.f(-c)), e.f(c))
        b.store(x, e.gep(g, j))
    if spec.max_norm is not None:
        def sq(j):
            x = b.load(e.gep(g, j))
            return e.fmul(x, x)

        norm = e.sqrt(e.reduce(dim, "norm", 0.0, sq, e.fadd))
        scale = b.select(b.fcmp_ordered(">", norm, e.f(spec.max_norm)),
                         e.fdiv(e.f(spec.max_norm), norm), e.f(1.0))
        with e.tiled(spec.dim, spec.tile, "scale") as j:
            p = e.gep(g, j)
            b.store(e.fmul(b.load(p), scale), p)
    if spec.weight_decay:
        with e.tiled(spec.dim, spec.tile, "decay") as j:
            p = e.gep(g, j)
            w = _load_elem(e, e.gep(wrow, j), spec.table_dtype)
            b.store(e.fadd(b.load(p), e.fmul(e.f(spec.weight_decay), w)), p)


def _optimizer(e: Emitter, spec: UpdateSpec, idv, g, wrow, s0, s1, alpha, seed) -> None:
    """The optimizer's row math; stores the new row in the table dtype."""
    b = e.b
    dim = _c(I64, spec.dim)
    opt = spec.optimizer
    if opt == "rowwise_adagrad":
        def sq(j):
            x = b.load(e.gep(g, j))
            return e.fmul(x, x)

        mean = e.fdiv(e.reduce(dim, "gsq", 0.0, sq, e.fadd), e.f(spec.dim))
        mptr = e.gep(s0, idv)
        m = e.fadd(b.load(mptr), mean)
        b.store(m, mptr)
        factor = e.fdiv(e.f(spec.lr), e.fadd(e.sqrt(m), e.f(spec.eps)))
    srow = e.gep(s0, b.mul(idv, dim)) if opt in ("adagrad", "adam") else None
    vrow = e.gep(s1, b.mul(idv, dim)) if opt == "adam" else None
    with e.tiled(spec.dim, spec.tile, "opt") as j:
        x = b.load(e.gep(g, j))
        wp = e.gep(wrow, j)
        w = _load_elem(e, wp, spec.table_dtype)
        if opt == "sgd":
            delta = e.fmul(e.f(spec.lr), x)
        elif opt == "rowwise_adagrad":
            delta = e.fmul(factor, x)
        elif opt == "adagrad":
            sp = e.gep(srow, j)
            s = e.fadd(b.load(sp), e.fmul(x, x))
            b.store(s, sp)
            delta = e.fdiv(e.fmul(alpha, x), e.fadd(e.sqrt(s), e.f(spec.eps)))
        else:
            mp, vp = e.gep(srow, j), e.gep(vrow, j)
            m = e.fadd(e.fmul(e.f(spec.beta1), b.load(mp)), e.fmul(e.f(1 - spec.beta1), x))
            v = e.fadd(e.fmul(e.f(spec.beta2), b.load(vp)),
                       e.fmul(e.f(1 - spec.beta2), e.fmul(x, x)))
            b.store(m, mp)
            b.store(v, vp)
            delta = e.fdiv(e.fmul(alpha, m), e.fadd(e.sqrt(v), e.f(spec.eps)))
        _store_elem(e, wp, e.fsub(w, delta), spec.table_dtype, spec.stochastic_rounding,
                    seed, idv, j)


def _refresh_serving(e: Emitter, spec: UpdateSpec, idv, wrow, serving) -> None:
    """Re-make the serving row from the stored master row."""
    dim = _c(I64, spec.dim)
    layout = spec.serving
    if layout in ("f32", "f16", "bf16"):
        out = e.row(serving, _elem_type(layout), idv, spec.dim)
        with e.tiled(spec.dim, spec.tile, "copy_serving") as j:
            x = _load_elem(e, e.gep(wrow, j), spec.table_dtype)
            _store_elem(e, e.gep(out, j), x, layout, False, None, None, None)
        return

    def elem(j):
        return _load_elem(e, e.gep(wrow, j), spec.table_dtype)

    lo, hi = e.min_max(dim, elem)
    width = spec.dim + 8 if layout == "int8" else (spec.dim + 1) // 2 + 4
    base = e.row(serving, I8, idv, width)
    if layout == "int8":
        _int8_row(e, spec, wrow, base, lo, hi)
    else:
        _int4_row(e, spec, wrow, base, lo, hi)


def _int8_row(e: Emitter, spec: UpdateSpec, wrow, base, lo, hi) -> None:
    b = e.b
    rng = b.fsub(hi, lo)
    inv = b.fdiv(e.f(255.0), b.fadd(rng, e.f(1e-8)))
    with e.tiled(spec.dim, spec.tile, "q8") as j:
        x = _load_elem(e, e.gep(wrow, j), spec.table_dtype)
        q = e.rint(b.fmul(b.fsub(x, lo), inv))
        q = e.fmin(e.fmax(q, e.f(0.0)), e.f(255.0))
        b.store(b.fptoui(q, I8), e.gep(base, j))
    tail = b.bitcast(e.gep(base, _c(I64, spec.dim)), F32.as_pointer())
    b.store(b.fdiv(rng, e.f(255.0)), tail, align=1)
    b.store(lo, e.gep(tail, _c(I64, 1)), align=1)


def _int4_row(e: Emitter, spec: UpdateSpec, wrow, base, lo, hi) -> None:
    b = e.b
    bias16 = b.fptrunc(lo, F16)
    bias = b.fpext(bias16, F32)
    scale16 = b.fptrunc(b.fdiv(b.fsub(hi, bias), e.f(15.0)), F16)
    scale = b.fpext(scale16, F32)
    safe = b.select(b.fcmp_ordered("==", scale, e.f(0.0)), e.f(1.0), scale)

    def code(j):
        x = _load_elem(e, e.gep(wrow, j), spec.table_dtype)
        q = e.rint(b.fdiv(b.fsub(x, bias), safe))
        q = e.fmin(e.fmax(q, e.f(0.0)), e.f(15.0))
        return b.fptoui(q, I8)

    half = spec.dim // 2
    with e.loop(_c(I64, 0), _c(I64, half), "q4") as j:
        j2 = b.mul(j, _c(I64, 2))
        lo_c = code(j2)
        hi_c = code(b.add(j2, _c(I64, 1)))
        b.store(b.or_(lo_c, b.shl(hi_c, _c(I8, 4))), e.gep(base, j))
    if spec.dim % 2:
        b.store(code(_c(I64, spec.dim - 1)), e.gep(base, _c(I64, half)))
    nbytes = (spec.dim + 1) // 2
    tail = b.bitcast(e.gep(base, _c(I64, nbytes)), F16.as_pointer())
    b.store(scale16, tail, align=1)
    b.store(bias16, e.gep(tail, _c(I64, 1)), align=1)


def emit_update(spec: UpdateSpec) -> str:
    """The LLVM IR module (text) of one fused update kernel."""
    module = ir.Module(name=f"ekko_update_{spec.optimizer}_{spec.dim}")
    module.triple = ""
    emit_dedup(module, spec)
    emit_apply(module, spec)
    return str(module)
