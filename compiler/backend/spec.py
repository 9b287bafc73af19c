"""Kernel-level descriptions handed to the backends.

A spec is the Python view of one kernel-level op (`kern.update`,
`kern.bag`): everything a backend needs to emit a loop nest, and nothing it
has to rediscover from the IR. Specs are frozen and hashable so they can key
caches; `key()` is the stable text form used for the on-disk cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ...dialects import catalog
from ...dialects.limits import MAX_DIM, MAX_PREFETCH, limit_error
from .mathprog import MathProgram

INDEX_DTYPES = catalog.INDEX_DTYPES
POOLING_MODES = catalog.POOLING_MODES
ORDERS = catalog.APPLY_ORDERS
serving_row_bytes = catalog.row_bytes


@dataclass(frozen=True)
class UpdateSpec:
    """One fused sparse update: dedup, the math region, round, refresh, stamp.

    Per unique id after duplicates are summed (when `dedup`), the row's
    gradient g and weights w (as f32) and its optimizer state go through
    `math` (the kern.update region: clipping, weight decay and the
    optimizer, as the catalog defines them); the new w is stored as
    table_dtype (nearest-even, or stochastic rounding when
    `stochastic_rounding`); the serving row (if any) is re-made from the
    stored w under its sequence word; versions[id] = version.
    `hyper` holds the values of the region's hyper-parameter arguments; the
    step, the version and the rounding seed are run-time arguments.
    """

    optimizer: str
    dim: int
    math: MathProgram
    hyper: tuple[tuple[str, float], ...] = ()
    table_dtype: str = "f32"
    index_dtype: str = "i64"
    serving: str | None = None
    versions: bool = False
    dedup: bool = True
    stochastic_rounding: bool = False
    # schedule, chosen by upd-schedule (these defaults are its measured-fast ones)
    order: str = "input"  # how a deduplicated update walks its rows: one of ORDERS
    partitions: int = 1
    tile: int = 0  # 0: the whole row
    prefetch: int = 0  # CPU: positions ahead a walk asks for rows; 0: llvm_update.prefetch_ahead
    # GPU schedule (upd-schedule{target=triton}); 0: the Triton backend's default
    block_rows: int = 0
    num_warps: int = 0

    def __post_init__(self) -> None:
        catalog.optimizer(self.optimizer)
        if self.table_dtype not in catalog.LAYOUTS.masters():
            raise ValueError(f"unknown table dtype {self.table_dtype!r}")
        if self.index_dtype not in INDEX_DTYPES:
            raise ValueError(f"unknown index dtype {self.index_dtype!r}")
        if self.serving is not None:
            catalog.layout(self.serving)
        if (why := limit_error("dim", self.dim, MAX_DIM)) is not None:
            raise ValueError(f"{why} (MAX_DIM)")
        if self.order not in ORDERS:
            raise ValueError(f"unknown order {self.order!r}: one of {', '.join(ORDERS)}")
        if not 0 <= self.prefetch <= MAX_PREFETCH:
            raise ValueError(f"prefetch must be 0 (chosen) to {MAX_PREFETCH}, got {self.prefetch}")

    @property
    def streamed(self) -> bool:
        """Deduplicated, and applied in input order (repeated ids summed in scratch rows)."""
        return self.dedup and self.order == "input"

    @property
    def unique_ids(self) -> bool:
        """The apply walks the dedup's unique ids (grouped), not the delta's."""
        return self.dedup and not self.streamed

    @property
    def sort(self) -> bool:
        """Deduplicated, and the unique ids applied sorted by id."""
        return self.dedup and self.order == "id"

    @property
    def entry(self) -> catalog.Optimizer:
        return catalog.optimizer(self.optimizer)

    @property
    def states(self) -> tuple[catalog.State, ...]:
        return self.entry.states

    @property
    def state_shapes(self) -> tuple[str, ...]:
        """Names of the optimizer state buffers, in calling order."""
        return self.entry.state_names

    def value(self, name: str) -> float | None:
        """A hyper-parameter's value (gradient transforms: None when absent)."""
        return dict(self.hyper).get(name)

    def __getattr__(self, name: str) -> float | None:
        # spec.lr, spec.max_norm, ...: this optimizer's hyper-parameters and the
        # gradient settings read like fields (a setting absent: None, weight decay 0)
        optimizer = object.__getattribute__(self, "optimizer")
        if name in catalog.GRAD_HYPER or name in catalog.optimizer(optimizer).hyper_names:
            value = dict(object.__getattribute__(self, "hyper")).get(name)
            return 0.0 if value is None and name == "weight_decay" else value
        raise AttributeError(name)

    @property
    def row_tile(self) -> int:
        return self.tile or self.dim

    def key(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if k != "math"}
        return ("update:" + ",".join(f"{k}={v}" for k, v in sorted(fields.items()))
                + ",math=" + self.math.text())


@dataclass(frozen=True)
class BagSpec:
    """One pooled serving lookup: out[b] = pool(w[ids[offsets[b]:offsets[b+1]]]).

    `layout` is the table's storage (a layout of the catalog); output is f32.
    mode "none" is a plain row lookup (one output row per id, offsets unused).
    `weighted` multiplies each row by its per-sample weight before pooling; as
    in torch.nn.functional.embedding_bag it is allowed with mode "sum" only.
    An empty bag gives a zero row.
    """

    dim: int
    layout: str = "f32"
    index_dtype: str = "i64"
    mode: str = "sum"
    weighted: bool = False
    partitions: int = 1

    def __post_init__(self) -> None:
        catalog.layout(self.layout)
        if self.index_dtype not in INDEX_DTYPES:
            raise ValueError(f"unknown index dtype {self.index_dtype!r}")
        if self.mode not in POOLING_MODES:
            raise ValueError(f"unknown pooling mode {self.mode!r}")
        if (why := limit_error("dim", self.dim, MAX_DIM)) is not None:
            raise ValueError(f"{why} (MAX_DIM)")
        if self.weighted and self.mode != "sum":
            raise ValueError("per-sample weights need mode 'sum'")

    def key(self) -> str:
        return "bag:" + ",".join(f"{k}={v}" for k, v in sorted(asdict(self).items()))


@dataclass(frozen=True)
class SyncSpec:
    """Replica sync between a serving copy (rows x row bytes, `layout`) and a packet.

    Pack: rows_out[i] = serving[ids[i]], versions_out[i] = versions[ids[i]].
    Merge: for each packet row i (ids, rows, versions), every id validated
    first (id in [0, rows), 0 <= version <= newest, the row finite, a quantized
    row's codes' parameters included) and nothing written if one fails; then row
    ids[i] takes the packet row when its version is newer than the replica's,
    or equal with larger bytes (so the result is order-independent).
    `seq`: a uint32 word per row, odd while the row is written (see
    docs/engine.md); pack reads under it, merge writes under it.
    Partitions: merge splits rows by a hash of the id, pack by position.
    """

    dim: int
    layout: str = "f32"
    index_dtype: str = "i64"
    seq: bool = False
    partitions: int = 1

    KIND = "sync"

    def __post_init__(self) -> None:
        catalog.layout(self.layout)
        if self.index_dtype not in INDEX_DTYPES:
            raise ValueError(f"unknown index dtype {self.index_dtype!r}")
        if (why := limit_error("dim", self.dim, MAX_DIM)) is not None:
            raise ValueError(f"{why} (MAX_DIM)")

    @property
    def row_bytes(self) -> int:
        return serving_row_bytes(self.layout, self.dim)

    def key(self) -> str:
        return f"{self.KIND}:" + ",".join(f"{k}={v}" for k, v in sorted(asdict(self).items()))


@dataclass(frozen=True)
class PackSpec(SyncSpec):
    """`kern.pack`: gather the rows a step touched into a packet (see SyncSpec)."""

    KIND = "pack"


@dataclass(frozen=True)
class MergeSpec(SyncSpec):
    """`kern.merge`: newest-version-wins merge of a packet (see SyncSpec)."""

    KIND = "merge"


__all__ = ["UpdateSpec", "BagSpec", "PackSpec", "MergeSpec", "serving_row_bytes"]
