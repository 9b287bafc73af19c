"""The model description both frontends produce.

Plain frozen dataclasses: tables in declaration order, features in order,
optimizer hyper-parameters with their defaults filled in (torch.optim's,
FBGEMM's for rowwise Adagrad), so two frontends describing the same model
produce equal objects and equal IR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ...dialects import catalog
from ...dialects.limits import MAX_DIM, MAX_MLP_WIDTH, MAX_ROWS, limit_error

# Optimizers, layouts and pooling modes come from the one catalog. One lr
# default (0.01) for every optimizer, so a table whose optimizer changes
# keeps its step size; torch's Adam says 1e-3: write it out.
MASTER_DTYPES = catalog.MASTER_DTYPES
SERVING_LAYOUTS = catalog.LAYOUT_NAMES
POOLINGS = catalog.POOLING_MODES
INTERACTIONS = ("dot", "cat")
OPTIMIZER_DEFAULTS = {name: catalog.optimizer(name).defaults() for name in catalog.BUILTIN}


class ModelInvalid(ValueError):
    """A semantic error in a model; `what` names the offending part."""

    def __init__(self, message: str, what: str = ""):
        super().__init__(message)
        self.what = what


@dataclass(frozen=True)
class Optimizer:
    kind: str = "rowwise_adagrad"
    hyper: tuple[tuple[str, float], ...] = ()

    @classmethod
    def make(cls, kind: str, **given: float) -> Optimizer:
        """An optimizer with every hyper-parameter set (the catalog's defaults filled in)."""
        if kind not in catalog.OPTIMIZERS:
            raise ModelInvalid(
                f"unknown optimizer '{kind}' (expected one of {', '.join(catalog.OPTIMIZERS)})",
                kind)
        entry = catalog.optimizer(kind)
        for name, value in given.items():
            if name not in entry.hyper_names:
                raise ModelInvalid(
                    f"optimizer {kind} has no hyper-parameter '{name}' "
                    f"(it takes {', '.join(entry.hyper_names)})", name)
            hyper = next(h for h in entry.hyper if h.name == name)
            if (why := hyper.problem(float(value))) is not None:
                raise ModelInvalid(f"{kind} {why}", name)
        merged = {**entry.defaults(), **{k: float(v) for k, v in given.items()}}
        return cls(kind, tuple(sorted(merged.items())))


@dataclass(frozen=True)
class Table:
    name: str
    rows: int
    dim: int
    dtype: str = "f32"
    optimizer: Optimizer = field(default_factory=lambda: Optimizer.make("rowwise_adagrad"))
    serving: str = "f32"
    max_norm: float | None = None
    clip_value: float | None = None
    weight_decay: float = 0.0
    stochastic_rounding: bool = False

    def validate(self) -> None:
        for what, value, limit in (("rows", self.rows, MAX_ROWS), ("dim", self.dim, MAX_DIM)):
            if (message := limit_error(f"table {self.name}: {what}", value, limit)) is not None:
                raise ModelInvalid(message, what)
        if self.dtype not in MASTER_DTYPES:
            extra = " (int8/int4 are serving layouts: a master table must be f32, f16 or bf16)" \
                if self.dtype in SERVING_LAYOUTS else ""
            raise ModelInvalid(f"table {self.name}: unknown dtype '{self.dtype}'{extra}", "dtype")
        if self.serving not in SERVING_LAYOUTS:
            raise ModelInvalid(
                f"table {self.name}: unknown serving layout '{self.serving}' "
                f"(expected one of {', '.join(SERVING_LAYOUTS)})", "serving")
        if self.stochastic_rounding and self.dtype == "f32":
            raise ModelInvalid(
                f"table {self.name}: stochastic rounding needs an f16 or bf16 dtype",
                "stochastic_rounding")
        for name in ("max_norm", "clip_value"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ModelInvalid(f"table {self.name}: {name} must be positive and finite, "
                                   f"got {value}", name)
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ModelInvalid(f"table {self.name}: weight_decay must be zero or positive "
                               f"and finite, got {self.weight_decay}", "weight_decay")


@dataclass(frozen=True)
class Feature:
    name: str
    table: str
    pooling: str = "sum"


@dataclass(frozen=True)
class Dense:
    """The dense part, kept as metadata: MLP layer sizes and the interaction."""

    bottom_mlp: tuple[int, ...] = ()
    top_mlp: tuple[int, ...] = ()
    interaction: str = ""

    def validate(self) -> None:
        for part, sizes in (("bottom", self.bottom_mlp), ("top", self.top_mlp)):
            for n in sizes:
                if (message := limit_error(f"dense: {part} layer size", n, MAX_MLP_WIDTH)):
                    raise ModelInvalid(message, part)
        if self.interaction and self.interaction not in INTERACTIONS:
            raise ModelInvalid(f"dense: unknown interaction '{self.interaction}' "
                               f"(expected one of {', '.join(INTERACTIONS)})", self.interaction)


@dataclass(frozen=True)
class Model:
    name: str
    tables: tuple[Table, ...]
    features: tuple[Feature, ...]
    dense: Dense | None = None

    def validate(self) -> None:
        """Raise ModelInvalid for names used twice or features of unknown tables."""
        seen: set[str] = set()
        for t in self.tables:
            if t.name in seen:
                raise ModelInvalid(f"table {t.name} is declared twice", t.name)
            seen.add(t.name)
            t.validate()
        names: set[str] = set()
        for f in self.features:
            if f.name in names:
                raise ModelInvalid(f"feature {f.name} is declared twice", f.name)
            names.add(f.name)
            if f.table not in seen:
                raise ModelInvalid(f"feature {f.name} reads unknown table '{f.table}'", f.table)
            if f.pooling not in POOLINGS:
                raise ModelInvalid(
                    f"feature {f.name}: pooling must be one of {', '.join(POOLINGS)}", f.pooling)
        if self.dense is not None:
            self.dense.validate()

    def scaled(self, factor: float) -> Model:
        """The same model with every table's rows multiplied by `factor` (at least 2)."""
        if factor == 1.0:
            return self
        if not factor > 0:
            raise ModelInvalid("the scale factor must be positive")
        tables = tuple(replace(t, rows=max(2, round(t.rows * factor))) for t in self.tables)
        return replace(self, tables=tables)

    def table(self, name: str) -> Table:
        """The table called `name` (KeyError if none)."""
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(f"model {self.name} has no table {name!r}")

    def features_of(self, table: str) -> tuple[Feature, ...]:
        """The features reading `table`, in order (several for a shared table)."""
        return tuple(f for f in self.features if f.table == table)
