"""The calling convention of every native kernel, declared once.

Each exported symbol is a `Signature`: its arguments' names, C types and
roles. The LLVM emitters build their function types from it
(`llvm_type`), the runtime derives its ctypes prototypes from it
(`ekko.kernels.native`), and `ekko compile`'s manifest prints it as a C
declaration (`c_decl`), so a position can never disagree between them.

Status codes returned by the kernels are named once here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

# C types the kernels use; pointers are raw addresses on the Python side
C_TYPES = {
    "i64": "int64_t",
    "f64": "double",
    "i8*": "uint8_t *",
    "i32*": "int32_t *",
    "u32*": "uint32_t *",
    "i64*": "int64_t *",
    "f32*": "float *",
    "void": "void",
}


class Status(IntEnum):
    """What a validating kernel phase returns; nothing was written unless OK."""

    OK = 0
    ID_OUT_OF_RANGE = 1  # *err_pos: the first position whose id is outside [0, rows)
    # apply: a delta row holds NaN or Inf (*done rows were written); the runtime undoes
    # them and finds the first such row
    NON_FINITE = 2
    TABLE_FULL = 3  # the dedup hash table passed 3/4 full: retry with a larger one
    # apply: a row's new value (table, state or serving row) would not be finite; *err_pos
    # the id, *err_buf the buffer; the row is back as it was, *done rows were written
    NON_FINITE_OUTPUT = 4


@dataclass(frozen=True)
class Arg:
    name: str
    type: str  # a key of C_TYPES
    doc: str = ""

    @property
    def pointer(self) -> bool:
        return self.type.endswith("*")


@dataclass(frozen=True)
class Signature:
    """One exported native function."""

    symbol: str
    ret: str
    args: tuple[Arg, ...]
    doc: str = ""

    def c_decl(self) -> str:
        params = ", ".join(f"{C_TYPES[a.type]} {a.name}".replace("* ", "*") for a in self.args)
        return f"{C_TYPES[self.ret]} {self.symbol}({params});"

    def as_dict(self) -> dict:
        return {"symbol": self.symbol, "returns": C_TYPES[self.ret], "c": self.c_decl(),
                "args": [{"name": a.name, "type": C_TYPES[a.type], "doc": a.doc}
                         for a in self.args]}

    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.args)


def _a(name: str, type_: str, doc: str = "") -> Arg:
    return Arg(name, type_, doc)


UPDATE_BUCKETS = 4096  # the dedup's most buckets (ranges of rows) a partition sorts ids into

PART = (_a("part", "i64", "this call's partition"), _a("nparts", "i64", "number of partitions"))


def update_dedup(index_dtype: str) -> Signature:
    """Phase 1 of a fused update: validate the ids and deduplicate them, writes no table.

    Reads no gradient row: it groups the delta rows of each unique id (`occ`),
    and the apply reads each row once, summing a repeated id's rows as it goes."""
    return Signature("ekko_update_dedup", "i64", (
        *PART,
        _a("ids", f"{index_dtype}*"), _a("n", "i64", "number of delta rows"),
        _a("rows", "i64", "table rows"), _a("grads", "f32*", "n x dim delta rows"),
        _a("htab", "i64*", "hash table of cap (id, index) pairs, id -1 when empty"),
        _a("cap", "i64"), _a("uids", "i64*", "out: unique ids"),
        _a("occ", "i64*", "out: delta rows grouped by unique id, input order within; "
                          "streamed: the owned positions in input order"),
        _a("slots", "i64*"),
        _a("count_out", "i64*", "out: unique ids; streamed, then the owned positions"),
        _a("err_pos", "i64*"),
        _a("order", "i64*", "out: unique indices sorted by id (order id); streamed: the "
                            "codes in bucket order (see llvm_update.STREAM_CODES)"),
        _a("key_a", "i64*"), _a("key_b", "i64*"),
        _a("order_b", "i64*", "streamed, out: where each owned position's code is in order"),
        _a("srcs", "i64*", "out: where unique index k's rows end in occ (they start "
                           "where k-1's end)"),
        _a("starts", "i64*", f"scratch: {UPDATE_BUCKETS + 1} bucket starts"),
    ), "Returns a Status.")


def update_apply(spec_states: int, index_dtype: str, unique_ids: bool) -> Signature:
    """Phase 2: the per-row math, rounding, serving refresh, versions and seq words.

    `unique_ids`: `ids` are the dedup's unique ids (the grouped orders), not the
    delta's (no dedup, or the streamed order). Returns a Status: OK, NON_FINITE
    or NON_FINITE_OUTPUT (see `Status`)."""
    ids_t = "i64*" if unique_ids else f"{index_dtype}*"
    return Signature("ekko_update_apply", "i64", (
        *PART,
        _a("ids", ids_t, "unique ids (dedup) or the delta's ids"),
        _a("grads", "f32*", "the delta's rows"), _a("count", "i64"),
        _a("table", "i8*", "rows x dim master table"),
        *(_a(f"state{i}", "f32*", "optimizer state, catalog order") for i in range(spec_states)),
        _a("serving", "i8*", "serving copy or null"), _a("versions", "i64*", "or null"),
        _a("seq", "u32*", "serving rows' sequence words or null"),
        _a("step", "i64"), _a("version", "i64"), _a("seed", "i64", "stochastic rounding"),
        _a("order", "i64*"), _a("occ", "i64*", "dedup: delta rows by unique id"),
        _a("srcs", "i64*", "dedup: where each unique id's rows end in occ"),
        _a("places", "i64*", "streamed: owned position t's code is order[places[t]]"),
        _a("summed", "f32*", "scratch: two rows (a repeated id's rows added; a gathered "
                             "row scaled)"),
        _a("journal", "i8*", "out: each written row's old bytes, one entry a row "
                             "(16-byte aligned: streaming stores)"),
        _a("done", "i64*", "out: rows written (journal entries)"),
        _a("err_pos", "i64*", "out: the id whose new value is not finite"),
        _a("err_buf", "i64*", "out: its buffer: 0 table, 1+k state k, 1+states serving"),
        _a("recent", "i64*", "without dedup: (id, generation << 32 | entry) pairs of rows "
                             "journaled lately, RECENT_SLOTS of them"),
        _a("generation", "i64", "this call's tag in `recent`, 1 to 2**32 - 1"),
        _a("gidx", "i64*", "or null: delta row p is grads[gidx[p]] (gathered: grads holds "
                           "fewer rows, e.g. a pooled output's gradient per bag)"),
        _a("gscale", "f32*", "or null: with gidx, delta row p is grads[gidx[p]] * gscale[p]"),
        _a("acc", "f32*", "streamed: scratch rows a repeated id's delta rows are added "
                          "into, one per such id (at most min(unique ids, owned positions - unique ids))"),
    ), "Returns a Status.")


def update_undo(spec_states: int) -> Signature:
    """Put back the `count` rows an apply wrote, from its journal, newest first."""
    return Signature("ekko_update_undo", "void", (
        _a("journal", "i8*"), _a("count", "i64", "journal entries to restore"),
        _a("table", "i8*"),
        *(_a(f"state{i}", "f32*", "optimizer state, catalog order") for i in range(spec_states)),
        _a("serving", "i8*", "serving copy or null"), _a("versions", "i64*", "or null"),
        _a("seq", "u32*", "sequence words or null"),
    ))


def bag(guarded: bool = False) -> Signature:
    """A pooled lookup of the bags [nbags*part/nparts, nbags*(part+1)/nparts).

    Pointers are byte-addressed so one signature fits every layout and index
    width. Returns a Status; *err_pos is the bad id's position or bag.
    `bag_kernel_seq` (guarded) reads rows under `seq`, which must not be
    null; `bag_kernel` ignores it.
    """
    return Signature("bag_kernel_seq" if guarded else "bag_kernel", "i64", (
        _a("table", "i8*"), _a("rows", "i64"), _a("ids", "i8*"), _a("nids", "i64"),
        _a("offsets", "i8*"), _a("noffsets", "i64"), _a("nbags", "i64"),
        _a("weights", "f32*"), _a("out", "f32*"), *PART, _a("err_pos", "i64*"),
        _a("seq", "u32*", "the table's sequence words, or null"),
    ), "Returns a Status.")


class BagStatus(IntEnum):
    """What a lookup kernel returns."""

    OK = 0
    ID_OUT_OF_RANGE = 1  # *err_pos: the position in ids
    BAD_OFFSETS = 2  # *err_pos: the bag


def packed(sig: Signature) -> Signature:
    """The wrapper every kernel exports for the partition runner.

    `<symbol>_packed(i64* args)` reads each argument of `sig` from one
    int64 word of `args` (pointers as addresses, f64 as its bits) and calls
    the kernel; the runner hands partition p the row p of an
    [nparts x len(sig.args)] array, so every kernel runs on one executor.
    """
    return Signature(sig.symbol + "_packed", "i64", (_a("args", "i64*"),),
                     f"Calls {sig.symbol}; returns its status (0 for a void kernel).")


class SyncStatus(IntEnum):
    """What the pack and merge-check phases return; nothing was written unless OK."""

    OK = 0
    ID_OUT_OF_RANGE = 1  # *err_pos: the position of the id
    BAD_VERSION = 2  # *err_pos: a packet version outside [0, newest]
    NON_FINITE = 3  # *err_pos: a packet row holding NaN or Inf (values, scale or bias)
    DECODES_NON_FINITE = 4  # *err_pos: an int8 row whose code * scale + bias is not finite


def sync_pack() -> Signature:
    """Copy the serving rows and versions of `ids` into a packet, under seq words."""
    return Signature("ekko_pack", "i64", (
        *PART, _a("serving", "i8*"), _a("versions", "i64*"),
        _a("seq", "u32*", "sequence words or null"), _a("rows", "i64", "serving rows"),
        _a("ids", "i8*", "i32 or i64 ids"), _a("n", "i64"), _a("out_rows", "i8*"),
        _a("out_versions", "i64*"), _a("err_pos", "i64*"),
    ), "Returns a SyncStatus.")


def merge_check() -> Signature:
    """Validate a packet against a replica; writes nothing but `descents`."""
    return Signature("ekko_merge_check", "i64", (
        *PART, _a("rows", "i64", "serving rows"), _a("ids", "i8*"), _a("n", "i64"),
        _a("prows", "i8*", "packet rows in the serving layout"), _a("pversions", "i64*"),
        _a("newest", "i64", "the newest version the primary issued"), _a("err_pos", "i64*"),
        _a("descents", "i64*", "one word per partition, set to 1 when an id of its range "
                               "is smaller than the one before it"),
    ), "Returns a SyncStatus.")


def merge_apply() -> Signature:
    """Merge the packet rows this partition owns, newest version wins."""
    return Signature("ekko_merge_apply", "i64", (
        *PART, _a("serving", "i8*"), _a("versions", "i64*"), _a("seq", "u32*"),
        _a("ids", "i8*"), _a("n", "i64"), _a("prows", "i8*"), _a("pversions", "i64*"),
        _a("ranged", "i64", "nonzero when the ids never decrease: a partition then owns "
                            "its contiguous range of positions (moved past equal ids) "
                            "instead of the ids the owner hash gives it"),
    ), "Returns the number of rows written.")
