"""Kernel-level descriptions handed to the backends.

A spec is the Python view of one kernel-level op (`kern.update`,
`kern.bag`): everything a backend needs to emit a loop nest, and nothing it
has to rediscover from the IR. Specs are frozen and hashable so they can key
caches; `key()` is the stable text form used for the on-disk cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam")
TABLE_DTYPES = ("f32", "f16", "bf16")
SERVING_LAYOUTS = ("f32", "f16", "bf16", "int8", "int4")
INDEX_DTYPES = ("i32", "i64")
POOLING_MODES = ("sum", "mean", "none")


def serving_row_bytes(layout: str, dim: int) -> int:
    """Bytes of one serving row, FBGEMM's fused row-wise layouts for int8/int4.

    int8: dim uint8 codes then f32 scale and f32 bias (8 bytes).
    int4: ceil(dim/2) bytes, two codes per byte (low nibble first), then f16
    scale and f16 bias (4 bytes).
    """
    if layout == "f32":
        return 4 * dim
    if layout in ("f16", "bf16"):
        return 2 * dim
    if layout == "int8":
        return dim + 8
    if layout == "int4":
        return (dim + 1) // 2 + 4
    raise ValueError(f"unknown serving layout {layout!r}")


@dataclass(frozen=True)
class UpdateSpec:
    """One fused sparse update: dedup, clip, decay, optimizer, round, refresh, stamp.

    Semantics, per unique id after duplicates are summed (when `dedup`):
      g = sum of the delta rows of that id               (f32)
      clip_value: g = clamp(g, -clip_value, clip_value)
      max_norm:   g *= max_norm / ||g||  when ||g|| > max_norm
      weight_decay: g += weight_decay * w
      sgd:             w -= lr * g
      adagrad:         clr = lr / (1 + (step - 1) * lr_decay); s += g*g;
                       w -= clr * g / (sqrt(s) + eps)        (torch.optim.Adagrad)
      rowwise_adagrad: m += mean(g*g); w -= lr * g / (sqrt(m) + eps)   (FBGEMM)
      adam:            m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g;
                       w -= lr * sqrt(1-b2^step)/(1-b1^step) * m / (sqrt(v) + eps)
                       (torch.optim.SparseAdam)
      w is computed in f32 and stored as table_dtype (nearest-even, or
      stochastic rounding when `stochastic_rounding`);
      serving row (if any) is re-made from the stored w; versions[id] = version.
    Hyper-parameters are compile-time constants; `step`, `version` and the
    rounding `seed` are run-time arguments.
    """

    optimizer: str
    dim: int
    table_dtype: str = "f32"
    index_dtype: str = "i64"
    serving: str | None = None
    versions: bool = False
    dedup: bool = True
    lr: float = 0.01
    eps: float = 1e-10
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    lr_decay: float = 0.0
    max_norm: float | None = None
    clip_value: float | None = None
    stochastic_rounding: bool = False
    # schedule, chosen by upd-schedule
    sort: bool = True
    partitions: int = 1
    tile: int = 16

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}")
        if self.table_dtype not in TABLE_DTYPES:
            raise ValueError(f"unknown table dtype {self.table_dtype!r}")
        if self.index_dtype not in INDEX_DTYPES:
            raise ValueError(f"unknown index dtype {self.index_dtype!r}")
        if self.serving is not None and self.serving not in SERVING_LAYOUTS:
            raise ValueError(f"unknown serving layout {self.serving!r}")
        if self.dim < 1:
            raise ValueError("dim must be positive")

    @property
    def state_shapes(self) -> tuple[str, ...]:
        """Names of the optimizer state buffers, in calling order."""
        return {
            "sgd": (),
            "adagrad": ("sum",),
            "rowwise_adagrad": ("momentum",),
            "adam": ("exp_avg", "exp_avg_sq"),
        }[self.optimizer]

    def key(self) -> str:
        return "update:" + ",".join(f"{k}={v}" for k, v in sorted(asdict(self).items()))


@dataclass(frozen=True)
class BagSpec:
    """One pooled serving lookup: out[b] = pool(w[ids[offsets[b]:offsets[b+1]]]).

    `layout` is the table's storage (f32/f16/bf16/int8/int4, the int layouts as
    in `serving_row_bytes`); output is f32. mode "none" is a plain row lookup
    (one output row per id, offsets unused). `weighted` multiplies each row by
    its per-sample weight before pooling; as in torch.nn.functional.embedding_bag
    it is allowed with mode "sum" only. An empty bag gives a zero row.
    """

    dim: int
    layout: str = "f32"
    index_dtype: str = "i64"
    mode: str = "sum"
    weighted: bool = False
    partitions: int = 1

    def __post_init__(self) -> None:
        if self.layout not in SERVING_LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}")
        if self.index_dtype not in INDEX_DTYPES:
            raise ValueError(f"unknown index dtype {self.index_dtype!r}")
        if self.mode not in POOLING_MODES:
            raise ValueError(f"unknown pooling mode {self.mode!r}")
        if self.dim < 1:
            raise ValueError("dim must be positive")
        if self.weighted and self.mode != "sum":
            raise ValueError("per-sample weights need mode 'sum'")

    def key(self) -> str:
        return "bag:" + ",".join(f"{k}={v}" for k, v in sorted(asdict(self).items()))


@dataclass(frozen=True)
class SyncSpec:
    """Replica sync between a serving copy (rows x row bytes, `layout`) and a packet.

    Pack: rows_out[i] = serving[ids[i]], versions_out[i] = versions[ids[i]].
    Merge: for each packet row i (ids, rows, versions), every id validated
    first (id in [0, rows), 1 <= version <= newest, the row finite, int8/int4
    scale and bias included) and nothing written if one fails; then row
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
        if self.layout not in SERVING_LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}")
        if self.index_dtype not in INDEX_DTYPES:
            raise ValueError(f"unknown index dtype {self.index_dtype!r}")
        if self.dim < 1:
            raise ValueError("dim must be positive")

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
