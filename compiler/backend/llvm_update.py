"""LLVM IR for a fused sparse update (an UpdateSpec), built with llvmlite.ir.

Two exported functions (signatures in `abi`: `update_dedup`,
`update_apply`), each run once per partition (one per thread):

  ekko_update_dedup
      Validates the ids this partition owns (ids are split by a hash of the
      id, so partitions never share a row; each block of ids is compacted to
      the owned positions first, without branches) and deduplicates them one
      bucket (a range of rows) at a time: a bucket's rows map directly into
      `htab` when they fit its 2 * `cap` words, else through an
      open-addressing hash table of (id, unique index) pairs. `htab` is all
      -1 on entry and left so. Reads no gradient row, writes no table.
      Returns an `abi.Status` (the bad position in *err_pos). What it leaves
      for the apply depends on the spec's `order` (`_Buckets`): each owned
      position's code (input), or each unique id's rows grouped in `occ`
      (bucket; with id, `order` gets the unique indices sorted by id).

  ekko_update_apply
      For each row it applies, inside the row's sequence word when `seq` is
      given: stream the row's old bytes into the `journal`, the math region
      (gradient transforms and the optimizer, lowered from the spec's
      MathProgram), store (nearest-even or stochastic rounding), re-make the
      serving row, stamp the version. A stored value that is not finite puts
      the row back and returns `Status.NON_FINITE_OUTPUT` (see `Commit`).
      Streamed (order input) it walks the owned positions in input order,
      summing a repeated id's rows into a scratch row of `acc`; grouped, the
      partition's unique ids with their rows summed as it goes; without
      dedup (plain SGD), the raw delta's owned ids in input order.

  ekko_update_undo
      Puts back, newest first, the rows one partition's apply journaled:
      the runtime calls it for every partition when any of them refused.

Uniform values of the region (the step, hyper-parameters and math on them,
like Adam's bias correction) are computed once per call in f64; inner loops
run over the embedding dim with reassociating math so LLVM vectorizes them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from llvmlite import ir

from collections.abc import Callable

from ...dialects import catalog
from . import abi, loops, mathprog, prefetch
from .llvm_abi import declare, emit_packed, partition_owner
from .spec import UpdateSpec
from .tuning import tuned_prefetch

I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F32, F64, F16 = ir.FloatType(), ir.DoubleType(), ir.HalfType()
# fast-math without nnan/ninf: an overflowing square must give inf and then
# 0 = g / inf, as torch.optim does, not whatever "no infinities" allows
FAST = ("nsz", "contract", "reassoc")
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

    # min/max of stored weights (the serving re-quantization): finite values,
    # so full fast-math lets LLVM vectorize the reduction
    def fmin(self, a, b):
        return self.b.select(self.b.fcmp_ordered("<", a, b, flags=("fast",)), a, b,
                             flags=("fast",))

    def fmax(self, a, b):
        return self.b.select(self.b.fcmp_ordered(">", a, b, flags=("fast",)), a, b,
                             flags=("fast",))

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
    """Store an f32 value as the table dtype: nearest-even or stochastic rounding.

    Returns an i1 that is true when the stored value is not finite (its
    exponent bits all ones in the stored format: a finite f32 may round to
    inf as f16 or bf16)."""
    b = e.b
    if dtype == "f32":
        b.store(value, ptr)
        return _non_finite(e, b.bitcast(value, I32), "f32")
    bits = b.bitcast(value, I32)
    if dtype == "bf16":
        if sr:
            low = b.trunc(b.lshr(b.add(bits, _random_bits(e, seed, row, col, 0xFFFF)),
                                 _c(I32, 16)), I16)
        else:
            low = _bf16_nearest(e, bits)
        low = _bf16_keep_nan(e, value, bits, low)
        b.store(low, ptr)
        return _non_finite(e, low, "bf16")
    if sr:
        bits = b.add(bits, _random_bits(e, seed, row, col, 0x1FFF))
        value = b.bitcast(b.and_(bits, _c(I32, 0xFFFFE000)), F32)
    half = b.fptrunc(value, F16)
    b.store(half, ptr)
    return _non_finite(e, b.bitcast(half, I16), "f16")


# the exponent field of each float format: all ones means inf or NaN
EXPONENT = {"f32": (I32, 0x7F800000), "f16": (I16, 0x7C00), "bf16": (I16, 0x7F80)}


def _non_finite(e: Emitter, bits, fmt: str):
    """i1: the float with these bits (in `fmt`) is inf or NaN. Integer math,
    which fast-math cannot fold away."""
    t, mask = EXPONENT[fmt]
    return e.b.icmp_unsigned("==", e.b.and_(bits, _c(t, mask)), _c(t, mask))


class Flag:
    """An i32 on the stack that ORs in i1s: a loop's 'anything bad?' (mem2reg
    makes it an OR reduction LLVM vectorizes). Made in the entry block."""

    def __init__(self, e: Emitter):
        self.e = e
        self.slot = e.b.alloca(I32)

    def clear(self) -> None:
        self.e.b.store(_c(I32, 0), self.slot)

    def add(self, bad) -> None:
        b = self.e.b
        b.store(b.or_(b.load(self.slot), b.zext(bad, I32)), self.slot)

    def value(self):
        return self.e.b.icmp_unsigned("!=", self.e.b.load(self.slot), _c(I32, 0))


def _load_id(e: Emitter, ids_t, i):
    v = e.b.load(e.gep(ids_t, i))
    return v if v.type == I64 else e.b.sext(v, I64)


def _index_type(spec: UpdateSpec) -> ir.Type:
    return I32 if spec.index_dtype == "i32" else I64


# ---------------------------------------------------------------------------
# phase 1: validate and deduplicate


DEDUP_BLOCK = 1024  # ids scanned per block; the owned ones are compacted first
BUCKET_IDS = 2048  # owned ids a bucket aims at: its hash table (~64 KiB) stays in L2
MIN_SLOTS = 16
OCC_AHEAD = 8  # rows of a repeated id fetched ahead while they are summed
# STREAM_CODES, what the streamed apply does at an owned position, kept in bucket
# order (`order[j]`; position t's is order[places[t]]): CODE_SINGLE, the id's only
# row (applied from the delta row in place); CODE_FIRST, the first of several (the
# apply takes the next scratch row r and writes taken(r) = -2 - r over the code
# for the later rows); else (j_first << 2) | CODE_LAST or | 0: a later row, added
# to the scratch row of the id's first, and with CODE_LAST the row is then applied.
CODE_SINGLE, CODE_FIRST, CODE_LAST = -1, 1, 2


def emit_dedup(module: ir.Module, spec: UpdateSpec) -> None:
    sig = abi.update_dedup(spec.index_dtype)
    fn = declare(module, sig)
    for a in fn.args:
        if isinstance(a.type, ir.PointerType):
            a.add_attribute("noalias")
    arg = dict(zip(sig.names(), fn.args))  # bound by name: the ABI owns the order
    e = Emitter(module, fn)
    b = e.b
    count_ptr = b.alloca(I64)
    b.store(_c(I64, 0), count_ptr)
    status = b.alloca(I64)
    b.store(_c(I64, 0), status)
    fail = fn.append_basic_block("fail")
    buckets = _Buckets(e, arg, spec.streamed) if spec.dedup else None
    with _each_owned(e, arg["ids"], arg["n"], arg["part"], arg["nparts"]) as (owned, t, cnt):
        i = b.load(e.gep(owned, t))
        idv = _load_id(e, arg["ids"], i)
        # negative ids are huge unsigned
        _fail_if(e, b.icmp_unsigned(">=", idv, arg["rows"]), abi.Status.ID_OUT_OF_RANGE, i,
                 arg["err_pos"], status, fail)
        if buckets is not None:
            buckets.count(idv, i)
    if buckets is not None:
        buckets.scatter()
        buckets.each(lambda idv, mask, first: _insert(
            e, idv, arg["htab"], mask, arg["uids"], arg["slots"], arg["srcs"], count_ptr, first,
            status, fail), count_ptr)
        if spec.streamed:
            b.store(b.load(buckets.owned), e.gep(arg["count_out"], _c(I64, 1)))
    count = b.load(count_ptr)
    if spec.dedup and spec.sort:
        _radix_sort(e, arg["uids"], count, arg["rows"], arg["order"], arg["key_a"],
                    arg["key_b"], arg["order_b"])
    b.store(count, arg["count_out"])
    b.ret(_c(I64, 0))
    b.position_at_end(fail)
    if spec.dedup:  # a full hash table leaves its bucket's slots filled: empty them
        _clear_slots(e, arg["htab"], arg["slots"], b.load(buckets.bucket_first),
                     b.load(count_ptr))
    b.ret(b.load(status))


class _Buckets:
    """Deduplication one cache-sized bucket of ids at a time.

    A partition's ids are counted per bucket while they are validated, then
    scattered (id into key_a, position into key_b, input order kept) so each
    bucket's ids lie together. A bucket is a range of rows (`id >> shift`),
    so the unique ids come out walking the table forward, and its ids are
    deduplicated in a hash table sized to the bucket (the first slots of
    `htab`), which stays in L2: one probe per id into a table as large as
    the delta missed the cache every time and cost half of the update.
    Then a counting sort puts each unique id's delta rows together in `occ`
    (input order kept), so the apply reads every gradient row once.

    Streamed (`order = "input"`), `occ` keeps the owned positions in input
    order and each gets a code instead (`STREAM_CODES`): the apply walks the
    delta forward, so the gradient rows stream in as the hardware prefetcher
    likes, and only the rows of repeated ids pass through scratch rows.
    """

    def __init__(self, e: Emitter, arg: dict, streamed: bool = False):
        self.e, self.arg, self.streamed = e, arg, streamed
        b = e.b
        self.owned = b.alloca(I64, name="owned_ids")
        b.store(_c(I64, 0), self.owned)
        rows, n, nparts = arg["rows"], arg["n"], arg["nparts"]
        self.hist = arg["starts"]
        # as many buckets as BUCKET_IDS owned ids fill, a power of two up to UPDATE_BUCKETS
        most = _c(I64, abi.UPDATE_BUCKETS)
        want = b.udiv(b.udiv(n, nparts), _c(I64, BUCKET_IDS))
        want = b.select(b.icmp_unsigned(">", want, most), most, want)
        lg = b.sub(_c(I64, 63), _ctlz(e, b.or_(want, _c(I64, 1))))  # floor(log2(want)), 0 for 0
        top = b.select(b.icmp_unsigned(">", rows, _c(I64, 0)), b.sub(rows, _c(I64, 1)),
                       _c(I64, 0))
        bits = b.sub(_c(I64, 64), _ctlz(e, top))  # bits of the largest id
        self.shift = b.select(b.icmp_signed(">", bits, lg), b.sub(bits, lg), _c(I64, 0))
        self.nb = b.add(b.lshr(top, self.shift), _c(I64, 1))
        # a bucket's rows fit htab's 2 * cap words: map them directly, no hashing
        self.direct = b.icmp_unsigned("<=", b.shl(_c(I64, 1), self.shift),
                                      b.mul(arg["cap"], _c(I64, 2)))
        self.bucket_first = b.alloca(I64, name="bucket_first")  # for the failure path
        b.store(_c(I64, 0), self.bucket_first)
        with e.loop(_c(I64, 0), b.add(self.nb, _c(I64, 1)), "bucket_zero") as k:
            b.store(_c(I64, 0), e.gep(self.hist, k))

    def _bucket(self, idv):
        return self.e.b.lshr(idv, self.shift)

    def count(self, idv, i) -> None:
        """One more id in its bucket (counted one place up: the prefix sum gives starts);
        its position joins the partition's owned list (in occ until the grouping), so
        the scatter does not scan and hash every id of the delta again."""
        e, b = self.e, self.e.b
        p = e.gep(self.hist, b.add(self._bucket(idv), _c(I64, 1)))
        b.store(b.add(b.load(p), _c(I64, 1)), p)
        k = b.load(self.owned)
        b.store(i, e.gep(self.arg["occ"], k))
        b.store(b.add(k, _c(I64, 1)), self.owned)

    def scatter(self) -> None:
        """Starts from counts, then the owned ids into their buckets (hist[k] ends as
        bucket k's end, which is bucket k+1's start)."""
        e, b, arg = self.e, self.e.b, self.arg
        with e.loop(_c(I64, 1), b.add(self.nb, _c(I64, 1)), "bucket_prefix") as k:
            p = e.gep(self.hist, k)
            b.store(b.add(b.load(p), b.load(e.gep(self.hist, b.sub(k, _c(I64, 1))))), p)
        with e.loop(_c(I64, 0), b.load(self.owned), "scatter") as t:
            i = b.load(e.gep(arg["occ"], t))
            idv = _load_id(e, arg["ids"], i)
            p = e.gep(self.hist, self._bucket(idv))
            at = b.load(p)
            b.store(b.add(at, _c(I64, 1)), p)
            b.store(idv, e.gep(arg["key_a"], at))
            if self.streamed:  # where owned position t's code will be: written in t order
                b.store(at, e.gep(arg["order_b"], t))
            else:
                b.store(i, e.gep(arg["key_b"], at))

    def each(self, insert: Callable, count_ptr) -> None:
        """insert(id, slot mask, the bucket's first unique index) -> unique index, for
        every owned id, bucket by bucket; then the bucket's rows grouped by unique
        index into occ, and its slots emptied."""
        e, b, arg = self.e, self.e.b, self.arg
        with e.loop(_c(I64, 0), self.nb, "buckets") as k:
            start = b.select(b.icmp_unsigned("==", k, _c(I64, 0)), _c(I64, 0),
                             b.load(e.gep(self.hist, b.sub(k, _c(I64, 1)))))
            end = b.load(e.gep(self.hist, k))
            with b.if_then(b.icmp_unsigned("<", start, end)):
                # 2x the bucket's ids, a power of two, within the runtime's table
                need = b.shl(_c(I64, 1), b.sub(_c(I64, 64), _ctlz(e, b.sub(
                    b.mul(b.sub(end, start), _c(I64, 2)), _c(I64, 1)))))
                need = b.select(b.icmp_unsigned("<", need, _c(I64, MIN_SLOTS)),
                                _c(I64, MIN_SLOTS), need)
                slots = b.select(b.icmp_unsigned("<", need, arg["cap"]), need, arg["cap"])
                mask = b.sub(slots, _c(I64, 1))
                first = b.load(count_ptr)
                b.store(first, self.bucket_first)
                base = b.shl(k, self.shift)
                with b.if_else(self.direct) as (direct, hashed):
                    with direct:
                        with e.loop(start, end, "bucket_direct") as j:
                            key = e.gep(arg["key_a"], j)
                            b.store(self._insert_direct(b.load(key), base, count_ptr), key)
                    with hashed:
                        with e.loop(start, end, "bucket_ids") as j:
                            key = e.gep(arg["key_a"], j)
                            b.store(insert(b.load(key), mask, first), key)  # its unique index
                last = b.load(count_ptr)
                if not self.streamed:
                    self._group(start, end, first, last)
                self._clear(first, last, base)
                if self.streamed:
                    self._codes(start, end, first, last)

    def _insert_direct(self, idv, base, count_ptr):
        """The unique index of `idv`, found in or added to `htab` used as a direct
        map of the bucket's rows (word id - base: the index, -1 when unseen).
        No probing and no branch: whether an id is new is a coin flip on skewed
        ids, which a branch predictor loses."""
        e, b, arg = self.e, self.e.b, self.arg
        at = e.gep(arg["htab"], b.sub(idv, base))
        seen = b.load(at)
        new = b.icmp_signed("<", seen, _c(I64, 0))
        fresh = b.load(count_ptr)
        k = b.select(new, fresh, seen)
        b.store(k, at)
        b.store(idv, e.gep(arg["uids"], k))  # the same id again when seen
        rows = e.gep(arg["srcs"], k)
        b.store(b.add(b.select(new, _c(I64, 0), b.load(rows)), _c(I64, 1)), rows)
        b.store(b.add(fresh, b.zext(new, I64)), count_ptr)
        return k

    def _clear(self, first, last, base) -> None:
        """Leave every word of `htab` -1 again: the bucket's direct-map words or
        hash slots."""
        e, b, arg = self.e, self.e.b, self.arg
        with b.if_else(self.direct) as (direct, hashed):
            with direct:
                with e.loop(first, last, "direct_reset") as k:
                    idv = b.load(e.gep(arg["uids"], k))
                    b.store(_c(I64, -1), e.gep(arg["htab"], b.sub(idv, base)))
            with hashed:
                _clear_slots(e, arg["htab"], arg["slots"], first, last)

    def _codes(self, start, end, first, last) -> None:
        """order[j] = the code (`STREAM_CODES`) of the bucket's entry j, walking the
        bucket's entries in order (input order within the bucket, so an id's first
        comes first): sequential writes, no branch. srcs[k] counts k's rows still
        to come (0 for an only row); slots[k] (free once the hash slots are emptied)
        holds the entry of k's first row, -1 before it."""
        e, b, arg = self.e, self.e.b, self.arg
        srcs, slots, codes = arg["srcs"], arg["slots"], arg["order"]
        with e.loop(first, last, "code_reset") as k:
            count = e.gep(srcs, k)
            b.store(_c(I64, -1), e.gep(slots, k))
            rows = b.load(count)
            b.store(b.select(b.icmp_unsigned("==", rows, _c(I64, 1)), _c(I64, 0), rows), count)
        with e.loop(start, end, "codes") as j:
            k = b.load(e.gep(arg["key_a"], j))
            left_p, first_p = e.gep(srcs, k), e.gep(slots, k)
            left, head = b.load(left_p), b.load(first_p)
            only = b.icmp_signed("==", left, _c(I64, 0))
            seen = b.icmp_signed(">=", head, _c(I64, 0))
            last = b.select(b.icmp_unsigned("==", left, _c(I64, 1)), _c(I64, CODE_LAST),
                            _c(I64, 0))
            later = b.or_(b.shl(head, _c(I64, 2)), last)
            code = b.select(only, _c(I64, CODE_SINGLE),
                            b.select(seen, later, _c(I64, CODE_FIRST)))
            b.store(code, e.gep(codes, j))
            b.store(b.select(seen, head, j), first_p)
            b.store(b.select(only, left, b.sub(left, _c(I64, 1))), left_p)

    def _group(self, start, end, first, last) -> None:
        """occ[start:end) = the bucket's delta rows ordered by unique index (input order
        within one); srcs[k] = where k's rows end (k-1's end is where they start)."""
        e, b, arg = self.e, self.e.b, self.arg
        srcs, occ = arg["srcs"], arg["occ"]

        def place(t, accs):  # srcs[k] holds k's count (from insert): make it k's start
            p = e.gep(srcs, b.add(first, t))
            count = b.load(p)
            b.store(accs[0], p)
            return [b.add(accs[0], count)]

        e.fold(b.sub(last, first), "group_starts", [start], place)
        with e.loop(start, end, "group_place") as j:
            p = e.gep(srcs, b.load(e.gep(arg["key_a"], j)))
            at = b.load(p)
            b.store(b.add(at, _c(I64, 1)), p)
            b.store(b.load(e.gep(arg["key_b"], j)), e.gep(occ, at))


def _ctlz(e: Emitter, x):
    """Leading zero bits of an i64 (64 for 0)."""
    return e.b.ctlz(x, ir.Constant(ir.IntType(1), 0))


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
        mine = b.icmp_unsigned("==", partition_owner(b, _load_id(e, ids, i), nparts), part)
        return [b.add(accs[0], b.zext(mine, I64))]

    (cnt,) = e.fold(width, "compact", [_c(I64, 0)], step)
    return cnt


def _clear_slots(e: Emitter, htab, slots, start, stop) -> None:
    """Empty the hash slots of unique indices [start, stop): both words, since a
    direct-mapped bucket reads every word of htab."""
    b = e.b
    with e.loop(start, stop, "reset") as k:
        pair = e.gep(htab, b.shl(b.load(e.gep(slots, k)), _c(I64, 1)))
        b.store(_c(I64, -1), pair)
        b.store(_c(I64, -1), e.gep(pair, _c(I64, 1)))


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


def _insert(e: Emitter, idv, htab, mask, uids, slots, srcs, count_ptr, base_k, status, fail):
    """The unique index of `idv`, found in or added to the bucket's hash table (mask + 1
    slots; the bucket's unique indices start at `base_k`); srcs[k] counts its rows.

    The table holds (id, unique index) pairs side by side, so a probe is one
    cache line, not one per array.
    """
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
    # a new id: take the next unique index
    b.position_at_end(empty)
    k = b.load(count_ptr)
    cap = b.add(mask, _c(I64, 1))
    held = b.add(b.sub(k, base_k), _c(I64, 1))
    full = b.icmp_unsigned(">=", b.mul(held, _c(I64, 4)), b.mul(cap, _c(I64, 3)))
    with b.if_then(full):
        b.store(_c(I64, abi.Status.TABLE_FULL), status)
        b.branch(fail)
        b.position_at_end(b.append_basic_block("unreachable"))
    b.store(idv, key_ptr)
    b.store(k, e.gep(key_ptr, _c(I64, 1)))
    b.store(slot, e.gep(slots, k))
    b.store(idv, e.gep(uids, k))
    b.store(b.add(k, _c(I64, 1)), count_ptr)
    b.store(_c(I64, 0), e.gep(srcs, k))
    new_block = b.block
    b.branch(after)
    b.position_at_end(found)
    old = b.load(e.gep(key_ptr, _c(I64, 1)))
    b.branch(after)
    b.position_at_end(after)
    index = b.phi(I64, "unique")
    index.add_incoming(k, new_block)
    index.add_incoming(old, found)
    p = e.gep(srcs, index)
    b.store(b.add(b.load(p), _c(I64, 1)), p)
    return index


# ---------------------------------------------------------------------------
# phase 2: apply


def emit_apply(module: ir.Module, spec: UpdateSpec) -> None:
    sig = abi.update_apply(len(spec.states), spec.index_dtype, spec.unique_ids)
    fn = declare(module, sig)
    a = dict(zip(sig.names(), fn.args))
    for name in ("ids", "grads", "table", "serving", "versions", "journal", "recent", "acc",
                 *(f"state{i}" for i in range(len(spec.states)))):
        a[name].add_attribute("noalias")
    e = Emitter(module, fn)
    b = e.b
    summed = a["summed"]  # not on the stack: a caller's thread may have 64 KiB of it
    bufs = {"table": a["table"], "serving": a["serving"], "versions": a["versions"],
            "seq": a["seq"], "states": [a[f"state{i}"] for i in range(len(spec.states))],
            "recent": a["recent"]}
    commit = Commit(e, spec, a)
    uni = _uniforms(e, spec, a["step"])
    step = (uni, a["version"], a["seed"])
    ids, count, order = a["ids"], a["count"], a["order"]
    delta = Delta(e, spec, a["grads"], a["gidx"], a["gscale"])
    if spec.streamed:
        _streamed_apply(e, spec, a, delta, commit, bufs, step)
    elif spec.dedup:
        srcs, occ = a["srcs"], a["occ"]

        def entry(pos):
            return b.load(e.gep(order, pos)) if spec.sort else pos

        def rows_of(k):
            """[lo, hi): unique index k's delta rows in occ."""
            lo = b.select(b.icmp_unsigned("==", k, _c(I64, 0)), _c(I64, 0),
                          b.load(e.gep(srcs, b.sub(k, _c(I64, 1)))))
            return lo, b.load(e.gep(srcs, k))

        def grad_row(k):  # the first of k's rows (the one a prefetch asks for)
            return delta.row(b.load(e.gep(occ, rows_of(k)[0])))

        with e.loop(_c(I64, 0), count, "rows") as pos:
            _prefetch(e, spec, ids, entry, grad_row, pos, count, bufs)
            k = entry(pos)
            src = _summed_row(e, spec, commit, delta, occ, *rows_of(k), summed)
            _apply_row(e, spec, _load_id(e, ids, k), src, bufs, step, commit)
    else:  # the raw delta: each partition applies the ids it owns, in input order
        with _each_owned(e, ids, count, a["part"], a["nparts"]) as (owned, t, cnt):
            def entry(pos):
                return b.load(e.gep(owned, pos))

            _prefetch(e, spec, ids, entry, delta.row, t, cnt, bufs)
            k = entry(t)
            src = delta.checked_row(k, commit, summed)
            _apply_row(e, spec, _load_id(e, ids, k), src, bufs, step, commit)
    commit.finish(abi.Status.OK)


def _streamed_apply(e: Emitter, spec: UpdateSpec, a: dict, delta: "Delta", commit: "Commit",
                    bufs: dict, step: tuple) -> None:
    """The owned positions in input order (`occ`, `count` of them), each by its code
    (STREAM_CODES, in `order`): an id's only row is applied straight from the delta;
    a repeated id's rows are added, in input order, into the next scratch row of
    `acc`, and applied from it at its last row. The gradient rows are read walking
    the delta forward; the scratch rows of hot ids stay in cache."""
    b = e.b
    occ, codes, places, acc, dim = a["occ"], a["order"], a["places"], a["acc"], spec.dim
    taken = b.alloca(I64, name="scratch_rows")
    b.store(_c(I64, 0), taken)

    def acc_row(slot):
        return e.gep(acc, b.mul(slot, _c(I64, dim)))

    def first_row(code):  # the scratch row the first of code's id took
        return acc_row(b.sub(_c(I64, -2), b.load(e.gep(codes, b.ashr(code, _c(I64, 2))))))

    with e.loop(_c(I64, 0), a["count"], "stream") as t:
        _prefetch_streamed(e, spec, a, delta, bufs, t)
        i = b.load(e.gep(occ, t))
        place = b.load(e.gep(places, t))
        code = b.load(e.gep(codes, place))
        row = delta.checked_row(i, commit, a["summed"])
        single = b.icmp_signed("==", code, _c(I64, CODE_SINGLE))
        with b.if_else(b.icmp_signed("==", code, _c(I64, CODE_FIRST))) as (first, later):
            with first:  # the next scratch row: its index replaces the code
                slot = b.load(taken)
                b.store(b.add(slot, _c(I64, 1)), taken)
                b.store(b.sub(_c(I64, -2), slot), e.gep(codes, place))  # taken(slot)
                into = acc_row(slot)
                with e.tiled(dim, spec.tile, "open") as j:
                    b.store(b.load(e.gep(row, j)), e.gep(into, j))
            with later:
                with b.if_then(b.not_(single)):
                    into = first_row(code)
                    with e.tiled(dim, spec.tile, "add") as j:
                        p = e.gep(into, j)
                        b.store(b.fadd(b.load(p), b.load(e.gep(row, j))), p)
        applies = b.icmp_unsigned("!=", b.and_(code, _c(I64, CODE_LAST)), _c(I64, 0))
        # the row's apply is emitted twice, once per source: one copy fed by a phi
        # of the two made the IR 22% smaller and the Zipf 4M x 64 rowwise Adagrad +
        # int8 update 12-18% slower (three same-run A/Bs)
        with b.if_then(applies):  # CODE_SINGLE has every bit set
            with b.if_else(single) as (alone, summed):
                with alone:
                    _apply_row(e, spec, _load_id(e, a["ids"], i), row, bufs, step, commit)
                with summed:
                    src = first_row(code)
                    _apply_row(e, spec, _load_id(e, a["ids"], i), src, bufs, step, commit)


def _prefetch_streamed(e: Emitter, spec: UpdateSpec, a: dict, delta: "Delta", bufs: dict,
                       t) -> None:
    """The lines of the position `_distance(spec)` later: its gradient row, its scratch
    row once taken, and, when it is applied there, every row `_prefetch` asks for;
    and the code of the position twice as far (codes sit in bucket order)."""
    b = e.b
    pf = prefetch.intrinsic(e.module)
    codes, places = a["order"], a["places"]
    distance = _distance(spec)
    further = b.add(t, _c(I64, 2 * distance))
    with b.if_then(b.icmp_signed("<", further, a["count"])):
        prefetch.row(b, pf, e.gep(codes, b.load(e.gep(places, further))), 8)
    ahead = b.add(t, _c(I64, distance))
    with b.if_then(b.icmp_signed("<", ahead, a["count"])):
        i = b.load(e.gep(a["occ"], ahead))
        code = b.load(e.gep(codes, b.load(e.gep(places, ahead))))
        prefetch.row(b, pf, delta.row(i), 4 * spec.dim, write=0)
        first = b.ashr(code, _c(I64, 2))
        later = b.and_(b.icmp_signed(">=", code, _c(I64, 0)),
                       b.icmp_unsigned("!=", code, _c(I64, CODE_FIRST)))
        # its first's scratch row once taken (the code there is then -2 - row)
        there = _load_if(e, later, codes, first, _c(I64, CODE_FIRST))
        with b.if_then(b.icmp_signed("<=", there, _c(I64, -2))):
            row = b.sub(_c(I64, -2), there)
            prefetch.row(b, pf, e.gep(a["acc"], b.mul(row, _c(I64, spec.dim))), 4 * spec.dim)
        with b.if_then(b.icmp_unsigned("!=", b.and_(code, _c(I64, CODE_LAST)), _c(I64, 0))):
            _fetch_rows_of(e, spec, _load_id(e, a["ids"], i), bufs, pf)


class Delta:
    """Where delta row p lives: row p of `grads`, or, gathered, row gidx[p] of it
    times gscale[p] when a scale is given.

    A gathered delta is how a pooled feature's gradient looks (every id of a
    bag gets the bag's gradient, times its weight): the caller passes the B
    bag rows and the bag of each id instead of writing N rows of copies, so
    the update reads a few cache-resident rows instead of N x dim floats.
    Whether the delta is gathered or scaled is a run-time branch per row,
    taken the same way for every row of a call.
    """

    def __init__(self, e: Emitter, spec: UpdateSpec, grads, gidx, gscale):
        self.e, self.spec, self.grads, self.gidx, self.gscale = e, spec, grads, gidx, gscale
        b = e.b
        self.gathered = b.icmp_unsigned("!=", b.ptrtoint(gidx, I64), _c(I64, 0))
        self.scaled = b.icmp_unsigned("!=", b.ptrtoint(gscale, I64), _c(I64, 0))

    def row(self, p):
        """The grads row delta row p reads (before its scale)."""
        b = self.e.b
        index = _load_if(self.e, self.gathered, self.gidx, p, p)
        return self.e.gep(self.grads, b.mul(index, _c(I64, self.spec.dim)))

    def scale(self, p):
        return _load_if(self.e, self.scaled, self.gscale, p, _c(F32, 1.0))

    def scaled_into(self, p, out) -> None:
        """out = delta row p (its grads row times its scale)."""
        e, b = self.e, self.e.b
        row, s = self.row(p), self.scale(p)
        with e.tiled(self.spec.dim, self.spec.tile, "scale") as j:
            b.store(b.fmul(b.load(e.gep(row, j)), s), e.gep(out, j))

    def checked_row(self, p, commit: "Commit", scratch):
        """A pointer to delta row p, refused when not finite: the grads row itself,
        or (scaled) its product, written into `scratch`."""
        b = self.e.b
        plain = self.row(p)
        with b.if_then(self.scaled):
            self.scaled_into(p, scratch)
        src = b.select(self.scaled, scratch, plain)
        commit.refuse_non_finite(src)
        return src


def _load_if(e: Emitter, cond, ptr, index, default):
    """ptr[index] when cond, else default (ptr may be null then: the load is skipped)."""
    b = e.b
    before = b.block
    with b.if_then(cond):
        loaded = b.load(e.gep(ptr, index))
        inside = b.block
    value = b.phi(loaded.type)
    value.add_incoming(default, before)
    value.add_incoming(loaded, inside)
    return value


def _summed_row(e: Emitter, spec: UpdateSpec, commit: "Commit", delta: Delta, occ, lo, hi,
                summed):
    """The gradient of one unique id: its only delta row, read in place, or its rows
    added in input order into `summed`. Every row read is checked for NaN and Inf
    (a scaled row after its scale: the product may overflow). `summed` has two rows:
    the second holds a scaled row."""
    b = e.b
    scaled_row = e.gep(summed, _c(I64, spec.dim))
    first = delta.checked_row(b.load(e.gep(occ, lo)), commit, scaled_row)
    repeated = b.icmp_signed(">", b.sub(hi, lo), _c(I64, 1))
    with b.if_then(repeated):
        with e.tiled(spec.dim, spec.tile, "copy") as j:
            b.store(b.load(e.gep(first, j)), e.gep(summed, j))
        with e.loop(b.add(lo, _c(I64, 1)), hi, "sum") as t:
            ahead = b.add(t, _c(I64, OCC_AHEAD))
            with b.if_then(b.icmp_signed("<", ahead, hi)):
                prefetch.row(b, prefetch.intrinsic(e.module), delta.row(b.load(e.gep(occ, ahead))),
                             4 * spec.dim, write=0)
            row = delta.checked_row(b.load(e.gep(occ, t)), commit, scaled_row)
            with e.tiled(spec.dim, spec.tile, "add") as j:
                p = e.gep(summed, j)
                b.store(b.fadd(b.load(p), b.load(e.gep(row, j))), p)
    return b.select(repeated, summed, first)


RECENT_SLOTS = 1 << 15  # per partition: (id, entry) of rows a raw-delta apply journaled lately


class Commit:
    """What makes an apply all-or-nothing: the journal of old rows and the finite checks.

    Before a row changes, its old bytes (table row, state, serving row,
    version) are streamed into the next journal entry. After the row's new
    values are stored, the checks look at what was stored: a value that is
    not finite (in the table's dtype, the state, or the serving row: an
    f16/bf16 copy that overflowed, an int8 row whose scale, bias or
    decoded values are not finite, an int4 row whose f16 scale or bias is
    not) puts the row back from its entry, inside its sequence word, and
    ends the partition with `Status.NON_FINITE_OUTPUT` (*err_pos the id,
    *err_buf the buffer: 0 table, 1 + k state k, 1 + states the serving
    row). *done counts the entries written: the runtime undoes them with
    `ekko_update_undo` when any partition failed, so a refused call leaves
    every buffer as it was (sequence words aside, which only grow), and a
    reader that uses the sequence words never sees a non-finite value.

    Without dedup a row may come again in one call (hot ids of a Zipf
    delta, again and again): `recent`, a direct-mapped table of the
    (id, entry) pairs this call journaled lately, tagged with the call's
    `generation`, skips rows whose old bytes are in the journal already; a
    row that comes back after its pair was overwritten is journaled again,
    which costs bytes, never correctness (the undo runs newest first, so
    the oldest entry of a row is restored last).
    """

    def __init__(self, e: Emitter, spec: UpdateSpec, args: dict):
        self.e, self.spec = e, spec
        self.journal = args["journal"]
        self.done, self.err_pos, self.err_buf = args["done"], args["err_pos"], args["err_buf"]
        self.recent, self.generation = args["recent"], args["generation"]
        self.width = journal_layout(spec).width
        b = e.b
        self.count = b.alloca(I64, name="journaled")
        b.store(_c(I64, 0), self.count)
        self.current = b.alloca(I64, name="entry")  # the entry the current row comes back from
        self.zero = b.alloca(I64, name="zero")
        b.store(_c(I64, 0), self.zero)
        self.flags = [Flag(e) for _ in range(1 + len(spec.states) + 1)]

    def _entry(self, index):
        return self.e.gep(self.journal, self.e.b.mul(index, _c(I64, self.width)))

    def _append(self, idv, bufs: dict):
        """Journal row idv in the next entry; returns the entry's index."""
        b = self.e.b
        index = b.load(self.count)
        save_row(self.e, self.spec, self._entry(index), idv, bufs, self.zero)
        b.store(index, self.current)
        b.store(b.add(index, _c(I64, 1)), self.count)
        return index

    def save(self, idv, bufs: dict) -> None:
        """Make sure the journal holds row idv's old bytes before it changes."""
        if self.spec.dedup:  # every row once
            self._append(idv, bufs)
            return
        e, b = self.e, self.e.b
        pair = e.gep(self.recent, b.shl(_slot_of(e, idv, _c(I64, RECENT_SLOTS - 1)), _c(I64, 1)))
        tag = b.load(e.gep(pair, _c(I64, 1)))
        hit = b.and_(b.icmp_signed("==", b.load(pair), idv),
                     b.icmp_unsigned("==", b.lshr(tag, _c(I64, 32)), self.generation))
        with b.if_else(hit) as (seen, new):
            with seen:
                b.store(b.and_(tag, _c(I64, 0xFFFFFFFF)), self.current)
            with new:
                index = self._append(idv, bufs)
                b.store(idv, pair)
                b.store(b.or_(b.shl(self.generation, _c(I64, 32)), index),
                        e.gep(pair, _c(I64, 1)))

    def check(self, bads: list[tuple[int, object]], idv, bufs: dict, word, has_seq) -> None:
        """If any (buffer, i1) is bad: put the row back, report the first, return."""
        b = self.e.b
        any_bad = bads[0][1]
        for _, bad in bads[1:]:
            any_bad = b.or_(any_bad, bad)
        with b.if_then(any_bad, likely=False):
            code = _c(I64, bads[-1][0])
            for index, bad in reversed(bads[:-1]):
                code = b.select(bad, _c(I64, index), code)
            restore_row(self.e, self.spec, self._entry(b.load(self.current)), idv, bufs)
            with b.if_then(has_seq):
                seq_end(b, word)
            b.store(idv, self.err_pos)
            b.store(code, self.err_buf)
            self.finish(abi.Status.NON_FINITE_OUTPUT)

    def refuse_non_finite(self, src) -> None:
        """A delta row with NaN or Inf ends the partition with `Status.NON_FINITE`
        before its table row is touched (the rows before it are in the journal; the
        runtime undoes them and finds the first such row itself)."""
        b = self.e.b
        bad = b.not_(_row_finite(self.e, src, _c(I64, self.spec.dim)))
        with b.if_then(bad, likely=False):
            self.finish(abi.Status.NON_FINITE)

    def finish(self, status: int) -> None:
        b = self.e.b
        b.store(b.load(self.count), self.done)
        b.ret(_c(I64, status))


@dataclass(frozen=True)
class JournalLayout:
    """Byte offsets of one journal entry: id, version, table row, states, serving row."""

    width: int
    table: int
    states: tuple[int, ...]
    serving: int


def journal_layout(spec: UpdateSpec) -> JournalLayout:
    """Where each old value of a row sits in its journal entry.

    Every part starts 16-byte aligned and entries follow each other with no
    gap, so the apply writes the journal as one stream of whole lines with
    streaming (non-temporal) stores: it is written once and read back only
    to undo, and a store that skips the cache also skips reading the line
    first.
    """
    def align(n: int, to: int = 16) -> int:
        return (n + to - 1) // to * to

    at = 16  # the id, then the version
    table = at
    at = align(at + catalog.row_bytes(spec.table_dtype, spec.dim))
    states = []
    for state in spec.states:
        states.append(at)
        at = align(at + (4 if state.rowwise else 4 * spec.dim))
    serving = at
    if spec.serving is not None:
        at = align(at + catalog.row_bytes(spec.serving, spec.dim))
    return JournalLayout(at, table, tuple(states), serving)


def journal_entry_bytes(spec: UpdateSpec) -> int:
    """The bytes one written row takes in the journal (the runtime sizes it)."""
    return journal_layout(spec).width


def _row_copies(e: Emitter, spec: UpdateSpec, entry, idv, bufs: dict) -> list[tuple]:
    """(journal pointer, buffer pointer, bytes) of every part of row idv."""
    b = e.b
    lay = journal_layout(spec)
    master = catalog.row_bytes(spec.table_dtype, spec.dim)
    parts = [(lay.table, e.row(bufs["table"], I8, idv, master), master)]
    for state, ptr, off in zip(spec.states, bufs["states"], lay.states):
        n = 1 if state.rowwise else spec.dim
        parts.append((off, e.row(b.bitcast(ptr, I8.as_pointer()), F32, idv, n), 4 * n))
    if spec.serving is not None:
        width = catalog.row_bytes(spec.serving, spec.dim)
        parts.append((lay.serving, e.row(bufs["serving"], I8, idv, width), width))
    return [(e.gep(entry, _c(I64, off)), b.bitcast(ptr, I8.as_pointer()), n)
            for off, ptr, n in parts]


def _memcpy(e: Emitter, dst, src, nbytes: int) -> None:
    fn = e.module.globals.get("llvm.memcpy.p0.p0.i64") or ir.Function(
        e.module, ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I8.as_pointer(), I64,
                                                  ir.IntType(1)]), "llvm.memcpy.p0.p0.i64")
    e.b.call(fn, [dst, src, _c(I64, nbytes), _c(ir.IntType(1), 0)])


def _stream_copy(e: Emitter, dst, src, nbytes: int, nt) -> None:
    """Copy nbytes from src (any alignment) to 16-byte aligned dst with streaming
    stores, and fill dst with zeros up to the next 16 bytes: every line of the
    journal is written whole, so the write-combining buffers never flush half
    a line. The last 1 to 3 bytes travel assembled into one 4-byte store."""
    b = e.b

    def put(value, at: int, align: int) -> None:
        d = b.bitcast(e.gep(dst, _c(I64, at)), value.type.as_pointer())
        b.store(value, d, align=align).set_metadata("nontemporal", nt)

    def load(t: ir.Type, at: int):
        return b.load(b.bitcast(e.gep(src, _c(I64, at)), t.as_pointer()), align=1)

    chunk = ir.VectorType(I32, 4)
    with loops.counted(b, _c(I64, 0), _c(I64, nbytes // 16), "journal") as k:  # a loop, not
        off = b.mul(k, _c(I64, 16))  # an unrolled copy: rows go up to MAX_DIM values
        value = b.load(b.bitcast(e.gep(src, off), chunk.as_pointer()), align=1)
        d = b.bitcast(e.gep(dst, off), chunk.as_pointer())
        b.store(value, d, align=16).set_metadata("nontemporal", nt)
    at = nbytes // 16 * 16
    for width, t in ((8, I64), (4, I32)):
        if nbytes - at >= width:
            put(load(t, at), at, width)
            at += width
    if nbytes > at:  # 1 to 3 bytes, little endian into one word
        word = _c(I32, 0)
        for k in range(nbytes - at):
            byte = b.zext(load(I8, at + k), I32)
            word = b.or_(word, b.shl(byte, _c(I32, 8 * k)))
        put(word, at, 4)
        at += 4
    for width, t in ((4, I32), (8, I64)):
        if at % 16 and (16 - at % 16) % (2 * width) == width:
            put(_c(t, 0), at, width)
            at += width


def save_row(e: Emitter, spec: UpdateSpec, entry, idv, bufs: dict, zero) -> None:
    """Stream row idv's old bytes (and its version, 0 without one) into a journal entry."""
    b = e.b
    nt = e.module.add_metadata([_c(I32, 1)])
    words = b.bitcast(entry, I64.as_pointer())
    b.store(idv, words, align=8).set_metadata("nontemporal", nt)
    old = zero  # a stack word holding 0: no branch, no hole in the entry
    if spec.versions:
        versions = bufs["versions"]
        has = b.icmp_unsigned("!=", b.ptrtoint(versions, I64), _c(I64, 0))
        old = b.select(has, e.gep(versions, idv), zero)
    b.store(b.load(old), e.gep(words, _c(I64, 1)), align=8).set_metadata("nontemporal", nt)
    for slot, ptr, n in _row_copies(e, spec, entry, idv, bufs):
        _stream_copy(e, slot, ptr, n, nt)


def restore_row(e: Emitter, spec: UpdateSpec, entry, idv, bufs: dict) -> None:
    """Put row idv's old bytes back from its journal entry."""
    b = e.b
    if spec.versions:
        versions = bufs["versions"]
        words = b.bitcast(entry, I64.as_pointer())
        with b.if_then(b.icmp_unsigned("!=", b.ptrtoint(versions, I64), _c(I64, 0))):
            b.store(b.load(e.gep(words, _c(I64, 1))), e.gep(versions, idv))
    for slot, ptr, n in _row_copies(e, spec, entry, idv, bufs):
        _memcpy(e, ptr, slot, n)


def emit_undo(module: ir.Module, spec: UpdateSpec) -> None:
    """ekko_update_undo: put back the rows a partition's apply wrote, newest first."""
    sig = abi.update_undo(len(spec.states))
    fn = declare(module, sig)
    a = dict(zip(sig.names(), fn.args))
    e = Emitter(module, fn)
    b = e.b
    bufs = {"table": a["table"], "serving": a["serving"], "versions": a["versions"],
            "seq": a["seq"], "states": [a[f"state{i}"] for i in range(len(spec.states))]}
    width = _c(I64, journal_layout(spec).width)
    count = a["count"]
    has_seq = b.icmp_unsigned("!=", b.ptrtoint(a["seq"], I64), _c(I64, 0))
    with e.loop(_c(I64, 0), count, "undo") as k:
        entry = e.gep(a["journal"], b.mul(b.sub(b.sub(count, _c(I64, 1)), k), width))
        idv = b.load(b.bitcast(entry, I64.as_pointer()))
        word = e.gep(a["seq"], idv)
        with b.if_then(has_seq):
            seq_begin(b, word)
        restore_row(e, spec, entry, idv, bufs)
        with b.if_then(has_seq):
            seq_end(b, word)
    b.ret_void()


def prefetch_ahead(dim: int) -> int:
    """How many positions ahead the apply asks for a row's lines, when nothing
    was measured on this host (`ekko tune`): enough rows in flight to cover
    the memory's latency, no more than the core can track. On one thread
    (1M Zipf ids, rowwise Adagrad, input order, host A of docs/backends.md):
    16 ahead against 8 took dims 16/32/64 from 31.7/34.8/33.9 to
    20.9/26.1/29.7 ms; dims 128 and 256 were best at 8 (64.3 vs 71.9, 101.6
    vs 115.2 ms). Host B preferred 8 at dim 64, hence the tuning."""
    return max(8, min(16, 1024 // dim))


def cpu_launch(dim: int) -> dict[str, int]:
    """The LLVM target's launch settings (`Target.launch`), as upd-schedule writes
    them: the prefetch distance measured on this host, else `prefetch_ahead`."""
    return {"prefetch": tuned_prefetch(dim) or prefetch_ahead(dim)}


def _distance(spec: UpdateSpec) -> int:
    """The spec's prefetch distance (a spec made without upd-schedule: the rule)."""
    return spec.prefetch or prefetch_ahead(spec.dim)


def _prefetch(e: Emitter, spec: UpdateSpec, ids, entry, grad_row, pos, count,
              bufs: dict) -> None:
    """Ask for every line the row `_distance(spec)` positions later touches.

    That row's gradient (in the delta, or summed in acc), its table, state
    and serving rows and its version are all scattered cache misses; issuing
    them early overlaps the misses of several rows. Leaving out the gradient
    and the version and the last line of rows that do not start on a line,
    as an earlier version did, doubled the apply phase (25.7 -> 12.0 ms on
    the dim-64 benchmark).
    """
    b = e.b
    ahead = b.add(pos, _c(I64, _distance(spec)))
    with b.if_then(b.icmp_signed("<", ahead, count)):
        k = entry(ahead)
        pf = prefetch.intrinsic(e.module)
        prefetch.row(b, pf, grad_row(k), 4 * spec.dim)
        _fetch_rows_of(e, spec, _load_id(e, ids, k), bufs, pf)


def _fetch_rows_of(e: Emitter, spec: UpdateSpec, nid, bufs: dict, pf) -> None:
    """Prefetch row nid of the table, its states, serving row, version, sequence word
    (and its pair in `recent`, without dedup): what `_apply_row` will touch."""
    b = e.b
    elem = _elem_type(spec.table_dtype)
    row_bytes = catalog.row_bytes(spec.table_dtype, spec.dim)
    targets = [(e.row(bufs["table"], elem, nid, spec.dim), row_bytes)]
    for state, ptr in zip(spec.states, bufs["states"]):
        if state.rowwise:
            targets.append((e.gep(ptr, nid), 4))
        else:
            targets.append((e.gep(ptr, b.mul(nid, _c(I64, spec.dim))), 4 * spec.dim))
    if spec.serving is not None:
        width = catalog.row_bytes(spec.serving, spec.dim)
        targets.append((e.row(bufs["serving"], I8, nid, width), width))
    if spec.versions:
        targets.append((e.gep(bufs["versions"], nid), 8))  # null when not passed: harmless
    if not spec.dedup:  # the row's pair in the journal's table of recent rows
        slot = _slot_of(e, nid, _c(I64, RECENT_SLOTS - 1))
        targets.append((e.gep(bufs["recent"], b.shl(slot, _c(I64, 1))), 16))
    for ptr, nbytes in targets:
        prefetch.row(b, pf, ptr, nbytes)
    # a prefetch of null + id is dropped, but not free (~10% of a plain
    # SGD update, measured): the sequence word only when there is one
    seq = bufs["seq"]
    with b.if_then(b.icmp_unsigned("!=", b.ptrtoint(seq, I64), _c(I64, 0))):
        prefetch.row(b, pf, e.gep(seq, nid), 4)


def _apply_row(e: Emitter, spec: UpdateSpec, idv, src, bufs: dict, step: tuple,
               commit: Commit) -> None:
    """One row, inside its sequence word: journal, math, checks, serving refresh, stamp."""
    b = e.b
    uni, version, seed = step
    seq = bufs["seq"]
    has_seq = b.icmp_unsigned("!=", b.ptrtoint(seq, I64), _c(I64, 0))
    word = e.gep(seq, idv)
    with b.if_then(has_seq):
        seq_begin(b, word)
    commit.save(idv, bufs)
    elem = _elem_type(spec.table_dtype)
    wrow = e.row(bufs["table"], elem, idv, spec.dim)
    bads = _row_math(e, spec, idv, src, wrow, bufs["states"], uni, seed, commit.flags)
    commit.check(list(enumerate(bads)), idv, bufs, word, has_seq)
    if spec.serving is not None:
        bad = _refresh_serving(e, spec, idv, wrow, bufs["serving"], commit.flags[-1])
        if bad is not None:
            commit.check([(len(bads), bad)], idv, bufs, word, has_seq)
    if spec.versions:
        versions = bufs["versions"]
        with b.if_then(b.icmp_unsigned("!=", b.ptrtoint(versions, I64), _c(I64, 0))):
            b.store(version, e.gep(versions, idv))
    with b.if_then(has_seq):
        seq_end(b, word)


def seq_begin(b: ir.IRBuilder, word) -> None:
    """A writer takes a row: its sequence word goes odd before any byte changes."""
    s = b.load_atomic(word, "monotonic", 4)
    b.store_atomic(b.add(s, _c(I32, 1)), word, "monotonic", 4)
    b.fence("release")


def seq_end(b: ir.IRBuilder, word) -> None:
    """The row is whole again: the word goes even, after every byte is stored."""
    b.fence("release")
    s = b.load_atomic(word, "monotonic", 4)
    b.store_atomic(b.add(s, _c(I32, 1)), word, "monotonic", 4)


# -- the math region (a MathProgram), lowered ---------------------------------


def _uniforms(e: Emitter, spec: UpdateSpec, step) -> dict[int, ir.Value]:
    """Every uniform value of the program, computed once before any loop."""
    b = e.b
    vals: dict[int, ir.Value] = {}
    hyper = dict(spec.hyper)
    for i, ins in enumerate(spec.math.instrs):
        if ins.kind != "uniform":
            continue
        if ins.op == "arg":
            vals[i] = (b.sitofp(step, F64) if ins.attr == "step"
                       else _c(F64, hyper[str(ins.attr)]))
        elif ins.op == "const":
            vals[i] = _c(F64 if ins.f64 else F32, float(ins.attr))
        else:
            vals[i] = _math_op(e, ins, [vals[a] for a in ins.args])
    return vals


_CMP = {"oeq": "==", "one": "!=", "ogt": ">", "oge": ">=", "olt": "<", "ole": "<=",
        "ueq": "==", "une": "!=", "ugt": ">", "uge": ">=", "ult": "<", "ule": "<=",
        "ord": "ord", "uno": "uno"}


def _math_op(e: Emitter, ins: mathprog.Instr, xs: list[ir.Value]) -> ir.Value:
    """One arith/math op of the region on scalar LLVM values, with the meaning
    `semantics.OPS` gives it."""
    b = e.b
    t = F64 if ins.f64 else F32
    binary = {"add": b.fadd, "sub": b.fsub, "mul": b.fmul, "div": b.fdiv}
    if ins.op in binary:
        return binary[ins.op](xs[0], xs[1], flags=FAST)
    if ins.op in ("max", "min"):  # NaN when either is NaN
        pick = b.fcmp_ordered(">" if ins.op == "max" else "<", xs[0], xs[1])
        return b.select(b.or_(pick, b.fcmp_unordered("uno", xs[0], xs[0])), xs[0], xs[1])
    if ins.op == "neg":
        return b.fneg(xs[0], flags=FAST)
    if ins.op == "f32":
        return b.fptrunc(xs[0], F32)
    if ins.op == "cmp":
        pred = str(ins.attr)
        if pred in ("true", "false"):
            return _c(ir.IntType(1), int(pred == "true"))
        cmp = b.fcmp_unordered if pred.startswith("u") else b.fcmp_ordered
        return cmp(_CMP[pred], xs[0], xs[1])
    if ins.op == "select":
        return b.select(xs[0], xs[1], xs[2])
    intrinsic = {"sqrt": "llvm.sqrt", "abs": "llvm.fabs", "exp": "llvm.exp", "log": "llvm.log",
                 "pow": "llvm.pow"}[ins.op]  # C's sqrt, fabs, exp, log, pow (f or double)
    return b.call(e.intrinsic(intrinsic, t), xs)


def _row_math(e: Emitter, spec: UpdateSpec, idv, src, wrow, states: list, uni: dict,
              seed, flags: list[Flag]) -> list:
    """Lower the program for one row: a pass over the row per reduction stage,
    then the last pass that computes and stores the new weights and state.

    Element values are recomputed in each pass from the unchanged inputs
    (nothing is stored before the last pass), so no row lives on the stack.
    Returns an i1 per buffer (the table, then each state): whether a value
    stored there is not finite.
    """
    b = e.b
    prog = spec.math
    dim = _c(I64, spec.dim)
    vals = dict(uni)
    names = {i: str(ins.attr) for i, ins in enumerate(prog.instrs) if ins.op == "arg"}
    state_ix = {s.name: k for k, s in enumerate(spec.states)}
    for i, ins in enumerate(prog.instrs):  # rowwise state: one value per row
        if ins.op == "arg" and ins.kind == "row":
            vals[i] = b.load(e.gep(states[state_ix[names[i]]], idv))

    def element(j) -> Callable[[int], ir.Value]:
        memo: dict[int, ir.Value] = {}

        def ev(i: int) -> ir.Value:
            if i in vals:
                return vals[i]
            if i not in memo:
                ins = prog.instrs[i]
                if ins.op == "arg":
                    memo[i] = _load_arg(e, spec, names[i], src, wrow, states, state_ix, idv, j)
                else:
                    memo[i] = _math_op(e, ins, [ev(a) for a in ins.args])
            return memo[i]

        return ev

    for stage in range(prog.stages + 1):
        for i, ins in enumerate(prog.instrs):
            if ins.kind == "row" and ins.stage == stage and ins.op not in ("arg", "row_sum"):
                vals[i] = _math_op(e, ins, [vals[a] for a in ins.args])
        sums = [i for i, ins in enumerate(prog.instrs)
                if ins.op == "row_sum" and ins.stage == stage + 1]
        if sums:
            def step_(j, accs, sums=sums):
                ev = element(j)
                return [e.fadd(acc, ev(prog.instrs[i].args[0])) for acc, i in zip(accs, sums)]

            results = e.fold(dim, f"stage{stage}", [_c(F32, 0.0)] * len(sums), step_)
            vals.update(zip(sums, results))
    w_out, *state_out = prog.outputs
    for flag in flags[:1 + len(states)]:
        flag.clear()
    with e.tiled(spec.dim, spec.row_tile, "opt") as j:
        ev = element(j)
        new = [ev(o) for o in prog.outputs]  # every value first: stores come last
        for state, ptr, value, flag in zip(spec.states, states, new[1:], flags[1:]):
            if not state.rowwise:
                b.store(value, e.gep(ptr, b.add(b.mul(idv, dim), j)))
                flag.add(_non_finite(e, b.bitcast(value, I32), "f32"))
        flags[0].add(_store_elem(e, e.gep(wrow, j), new[0], spec.table_dtype,
                                 spec.stochastic_rounding, seed, idv, j))
    for state, ptr, out, flag in zip(spec.states, states, state_out, flags[1:]):
        if state.rowwise:
            if out not in vals:
                raise ValueError(f"{spec.optimizer}: rowwise state {state.name} must be one "
                                 "value per row, not per element (reduce it with row_sum)")
            b.store(vals[out], e.gep(ptr, idv))
            flag.add(_non_finite(e, b.bitcast(vals[out], I32), "f32"))
    return [flag.value() for flag in flags[:1 + len(states)]]


def _load_arg(e: Emitter, spec: UpdateSpec, name: str, src, wrow, states, state_ix, idv, j):
    """An element argument of the region at element j of the row."""
    b = e.b
    if name == "g":
        return b.load(e.gep(src, j))
    if name == "w":
        return _load_elem(e, e.gep(wrow, j), spec.table_dtype)
    ptr = states[state_ix[name]]
    return b.load(e.gep(ptr, b.add(b.mul(idv, _c(I64, spec.dim)), j)))


def _refresh_serving(e: Emitter, spec: UpdateSpec, idv, wrow, serving, flag: Flag):
    """Re-make the serving row from the stored (finite) master row, as its
    layout's codec says.

    Returns an i1 that is true when the serving row holds a value that is not
    finite, or None where it cannot (a copy into as wide a format)."""
    entry = catalog.layout(spec.serving)
    codec = entry.codec
    if isinstance(codec, catalog.Elementwise):
        fmt = codec.fmt
        narrows = fmt != "f32" and fmt != spec.table_dtype and (fmt, spec.table_dtype) \
            != ("bf16", "f16")
        flag.clear()
        out = e.row(serving, _elem_type(fmt), idv, spec.dim)
        with e.tiled(spec.dim, spec.tile, "copy_serving") as j:
            x = _load_elem(e, e.gep(wrow, j), spec.table_dtype)
            bad = _store_elem(e, e.gep(out, j), x, fmt, False, None, None, None)
            if narrows:
                flag.add(bad)
        return flag.value() if narrows else None

    def elem(j):
        return _load_elem(e, e.gep(wrow, j), spec.table_dtype)

    lo, hi = e.min_max(_c(I64, spec.dim), elem)
    base = e.row(serving, I8, idv, entry.row_bytes(spec.dim))
    params = e.gep(base, _c(I64, entry.params_at(spec.dim)))
    if isinstance(codec, catalog.RowAffine):
        return _affine_row(e, spec, codec, wrow, base, params, lo, hi)
    return _scaled_row(e, spec, codec, wrow, base, params, lo, hi)


def _rounded(e: Emitter, value, fmt: str):
    """(value in `fmt` as its IR type, that value widened back to f32): nearest-even."""
    b = e.b
    if fmt == "f32":
        return value, value
    if fmt == "f16":
        half = b.fptrunc(value, F16)
        return half, b.fpext(half, F32)
    bits = b.bitcast(value, I32)
    low = _bf16_keep_nan(e, value, bits, _bf16_nearest(e, bits))
    return low, b.bitcast(b.shl(b.zext(low, I32), _c(I32, 16)), F32)


def _bf16_nearest(e: Emitter, bits):
    """The bf16 bits of f32 `bits`, round-to-nearest-even."""
    b = e.b
    lsb = b.and_(b.lshr(bits, _c(I32, 16)), _c(I32, 1))
    return b.trunc(b.lshr(b.add(bits, b.add(lsb, _c(I32, 0x7FFF))), _c(I32, 16)), I16)


def _bf16_keep_nan(e: Emitter, value, bits, low):
    """`low`, or a quiet NaN where `value` is NaN: rounding's add carries a NaN with a
    full mantissa (0x7FFFFFFF) into the sign bit, which would make it -0.0."""
    b = e.b
    quiet = b.trunc(b.or_(b.lshr(bits, _c(I32, 16)), _c(I32, 0x40)), I16)
    return b.select(b.fcmp_unordered("uno", value, value), quiet, low)


def _put_param(e: Emitter, params, index: int, stored, fmt: str):
    """Store the row parameter `index` (0 scale, 1 bias), unaligned; returns i1:
    it is not finite."""
    b = e.b
    t = _elem_type(fmt)
    b.store(stored, e.gep(b.bitcast(params, t.as_pointer()), _c(I64, index)), align=1)
    return _non_finite(e, b.bitcast(stored, EXPONENT[fmt][0]), fmt)


def _affine_row(e: Emitter, spec: UpdateSpec, codec: catalog.RowAffine, wrow, base, params,
                lo, hi):
    """A row-wise affine row (FBGEMM's int8 and int4); returns i1: its scale, its
    bias, or its largest decoded value is not finite.

    Codes lie in [0, M] and decode (code * scale + bias, two f32 roundings, as
    the lookups compute it) monotonically, so checking code M and the bias
    covers every value the row can decode to: a range past f32's (hi - lo
    overflowing) gives an inf scale, a scale just under it an inf M * scale
    or M * scale + bias (with f16 parameters those stay finite)."""
    b = e.b
    top_code = e.f(codec.max_code)
    if codec.inverse:  # FBGEMM 8-bit: codes from the unrounded range
        rng = b.fsub(hi, lo)
        inv = b.fdiv(top_code, b.fadd(rng, e.f(1e-8)))
        scale, scale32 = _rounded(e, b.fdiv(rng, top_code), codec.param)
        bias, bias32 = _rounded(e, lo, codec.param)
        at, mul = lo, inv
    else:  # FBGEMM 4-bit: codes from the stored bias and scale
        bias, bias32 = _rounded(e, lo, codec.param)
        scale, scale32 = _rounded(e, b.fdiv(b.fsub(hi, bias32), top_code), codec.param)
        at, mul = bias32, b.select(b.fcmp_ordered("==", scale32, e.f(0.0)), e.f(1.0), scale32)

    def code(j):
        x = _load_elem(e, e.gep(wrow, j), spec.table_dtype)
        shifted = b.fsub(x, at)
        q = e.rint(b.fmul(shifted, mul) if codec.inverse else b.fdiv(shifted, mul))
        return b.fptoui(e.fmin(e.fmax(q, e.f(0.0)), top_code), I8)

    _store_codes(e, spec, codec, base, code)
    bad = b.or_(_put_param(e, params, 0, scale, codec.param),
                _put_param(e, params, 1, bias, codec.param))
    top = b.fmul(scale32, top_code)
    bad = b.or_(bad, _non_finite(e, b.bitcast(top, I32), "f32"))
    return b.or_(bad, _non_finite(e, b.bitcast(b.fadd(top, bias32), I32), "f32"))


def _store_codes(e: Emitter, spec: UpdateSpec, codec: catalog.RowAffine, base, code) -> None:
    """Store code(j) (an i8 below 2**bits) of every element, 8 // bits a byte, low bits first."""
    b = e.b
    per = codec.per_byte
    if per == 1:
        with e.tiled(spec.dim, spec.tile, f"q{codec.bits}") as j:
            b.store(code(j), e.gep(base, j))
        return

    def byte(first, count: int):
        out = code(first)
        for k in range(1, count):
            part = code(b.add(first, _c(I64, k)))
            out = b.or_(out, b.shl(part, _c(I8, k * codec.bits)))
        return out

    full = spec.dim // per
    with e.loop(_c(I64, 0), _c(I64, full), f"q{codec.bits}") as j:
        b.store(byte(b.mul(j, _c(I64, per)), per), e.gep(base, j))
    if spec.dim % per:
        b.store(byte(_c(I64, full * per), spec.dim % per), e.gep(base, _c(I64, full)))


def _scaled_row(e: Emitter, spec: UpdateSpec, codec: catalog.RowScaled, wrow, base, params,
                lo, hi):
    """A row-wise scaled minifloat row (fp8); returns i1: its scale or its largest
    decoded value (max code * scale, as the lookups compute it) is not finite."""
    b = e.b
    mf = codec.minifloat
    amax = e.fmax(b.fsub(e.f(0.0), lo), hi)
    scale, scale32 = _rounded(e, b.fdiv(amax, e.f(mf.max)), codec.param)
    zero = b.fcmp_ordered("==", scale32, e.f(0.0))
    safe = b.select(zero, e.f(1.0), scale32)
    with e.tiled(spec.dim, spec.tile, "fp8") as j:
        x = _load_elem(e, e.gep(wrow, j), spec.table_dtype)
        q = minifloat_code(e, b.fdiv(x, safe), mf)
        b.store(b.select(zero, _c(I8, 0), q), e.gep(base, j))
    bad = _put_param(e, params, 0, scale, codec.param)
    return b.or_(bad, _non_finite(e, b.bitcast(b.fmul(scale32, e.f(mf.max)), I32), "f32"))


def minifloat_code(e: Emitter, y, mf: catalog.Minifloat):
    """The i8 code of f32 `y` (finite): nearest-even, saturated to +-max.

    Integer math on the bits: below the smallest normal the codes are
    multiples of the subnormal step (rint(|y| / step) counts them, and its
    top, the smallest normal, is the first normal code); above it the f32
    mantissa is rounded to man_bits and the exponent rebased."""
    b = e.b
    bits = b.bitcast(y, I32)
    sign = b.trunc(b.and_(b.lshr(bits, _c(I32, 24)), _c(I32, 0x80)), I8)
    a = b.bitcast(b.and_(bits, _c(I32, 0x7FFFFFFF)), F32)
    a = e.fmin(a, e.f(mf.max))
    sub = b.fptoui(e.rint(b.fmul(a, e.f(2.0 ** (mf.bias - 1 + mf.man_bits)))), I32)
    abits = b.bitcast(a, I32)
    drop = 23 - mf.man_bits
    odd = b.and_(b.lshr(abits, _c(I32, drop)), _c(I32, 1))
    rounded = b.lshr(b.add(abits, b.add(odd, _c(I32, (1 << (drop - 1)) - 1))), _c(I32, drop))
    normal = b.sub(rounded, _c(I32, (127 - mf.bias) << mf.man_bits))
    tiny = b.fcmp_ordered("<", a, e.f(2.0 ** (1 - mf.bias)))
    return b.or_(b.trunc(b.select(tiny, sub, normal), I8), sign)


def emit_update(spec: UpdateSpec) -> str:
    """The LLVM IR module (text) of one fused update kernel."""
    module = ir.Module(name=f"ekko_update_{spec.optimizer}_{spec.dim}")
    module.triple = ""
    emit_dedup(module, spec)
    emit_apply(module, spec)
    emit_undo(module, spec)
    for fn_name, sig in (("ekko_update_dedup", abi.update_dedup(spec.index_dtype)),
                         ("ekko_update_apply", abi.update_apply(len(spec.states), spec.index_dtype, spec.unique_ids)),
                         ("ekko_update_undo", abi.update_undo(len(spec.states)))):
        emit_packed(module, module.get_global(fn_name), sig)
    return str(module)
