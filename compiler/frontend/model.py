"""The model description both frontends produce, and the update a table gets.

Plain frozen dataclasses: tables in declaration order, features in order.
A table's update is one `UpdateRule` (optimizer with every hyper-parameter
resolved from the catalog's defaults, clipping, weight decay, rounding),
checked once when it is made: the .ekko parser, the PyTorch importer,
`ekko.update_kernel` and the compile API (`UpdateRequest`) all hold this one
object, so two frontends describing the same model produce equal objects and
equal IR, and `update_kernel("adam", 64)` means what `optimizer adam;` means.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ...dialects import catalog
from ...dialects.limits import MAX_DIM, MAX_MLP_WIDTH, MAX_ROWS, limit_error

# Optimizers, layouts and pooling modes come from the one catalog. One lr
# default (0.01) for every optimizer, so a table whose optimizer changes
# keeps its step size; torch's Adam says 1e-3: write it out.
POOLINGS = catalog.POOLING_MODES
INTERACTIONS = ("dot", "cat")
OPTIMIZER_DEFAULTS = {name: catalog.optimizer(name).defaults() for name in catalog.BUILTIN}
DEFAULT_OPTIMIZER = "rowwise_adagrad"


class ModelInvalid(ValueError):
    """A semantic error in a model; `what` names the offending part."""

    def __init__(self, message: str, what: str = ""):
        super().__init__(message)
        self.what = what


@dataclass(frozen=True)
class Optimizer:
    """A catalog optimizer and the value of every one of its hyper-parameters.

    Made resolved: `Optimizer("adam", {"lr": 1e-3})` fills in the catalog's
    defaults for the others and checks each value against the catalog's range
    (ModelInvalid names the bad one). `hyper` is sorted (name, value) pairs.
    """

    kind: str = DEFAULT_OPTIMIZER
    hyper: tuple[tuple[str, float], ...] | Mapping[str, float] = ()

    def __post_init__(self) -> None:
        kind = self.kind
        if not isinstance(kind, str) or kind not in catalog.OPTIMIZERS:
            raise ModelInvalid(
                f"unknown optimizer '{kind}' (expected one of {', '.join(catalog.OPTIMIZERS)})",
                str(kind))
        entry = catalog.optimizer(kind)
        given = dict(self.hyper.items() if isinstance(self.hyper, Mapping) else self.hyper)
        for name, value in given.items():
            if (why := entry.hyper_problem(name)) is not None:
                raise ModelInvalid(why, name)
            hyper = next(h for h in entry.hyper if h.name == name)
            if (why := hyper.problem(value)) is not None:
                raise ModelInvalid(f"{kind} {why}", name)
        merged = {**entry.defaults(), **{k: float(v) for k, v in given.items()}}
        object.__setattr__(self, "hyper", tuple(sorted(merged.items())))

    @classmethod
    def make(cls, kind: str, **given: float) -> Optimizer:
        """`Optimizer(kind, given)`: every hyper-parameter set, the defaults filled in."""
        return cls(kind, given)

    @property
    def entry(self) -> catalog.Optimizer:
        """The catalog's entry: state, math, which values it reads."""
        return catalog.optimizer(self.kind)

    def value(self, name: str) -> float:
        """One hyper-parameter's value (KeyError for a name it does not take)."""
        return dict(self.hyper)[name]  # type: ignore[arg-type]


# the settings of an UpdateRule besides the optimizer, as the language and
# update_kernel's keywords spell them
RULE_SETTINGS = ("max_norm", "clip_value", "weight_decay", "stochastic_rounding")


@dataclass(frozen=True)
class UpdateRule:
    """What update a table gets, the one description every layer reads.

    The optimizer (hyper-parameters resolved), then the gradient transforms
    ahead of it (clip by value, by the row's L2 norm; `None`: none), weight
    decay (`0`: none) and whether the new weights are rounded stochastically
    into an f16/bf16 table. Values are checked against the catalog's ranges
    when the rule is made (ModelInvalid, `what` = the setting); the table's
    buffers (dim, dtypes, serving copy) are not part of it.
    """

    optimizer: Optimizer = field(default_factory=Optimizer)
    max_norm: float | None = None
    clip_value: float | None = None
    weight_decay: float = 0.0
    stochastic_rounding: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.optimizer, Optimizer):
            raise ModelInvalid(f"an update's optimizer must be an Optimizer, got "
                               f"{type(self.optimizer).__name__}", "optimizer")
        if self.weight_decay is None:
            object.__setattr__(self, "weight_decay", 0.0)
        for name in ("max_norm", "clip_value", "weight_decay"):
            value = getattr(self, name)
            if value is None:
                continue
            if (why := catalog.GRAD_HYPER[name].problem(value)) is not None:
                raise ModelInvalid(why, name)
            object.__setattr__(self, name, float(value))
        if type(self.stochastic_rounding).__module__ == "numpy" and \
                type(self.stochastic_rounding).__name__ in ("bool", "bool_"):  # numpy's
            object.__setattr__(self, "stochastic_rounding", bool(self.stochastic_rounding))
        if not isinstance(self.stochastic_rounding, bool):
            raise ModelInvalid(f"stochastic_rounding must be True or False, got "
                               f"{self.stochastic_rounding!r}", "stochastic_rounding")

    @classmethod
    def make(cls, optimizer: str | Optimizer | catalog.Optimizer = DEFAULT_OPTIMIZER,
             **settings: Any) -> UpdateRule:
        """A rule from flat keywords: the optimizer's hyper-parameters and
        `max_norm`, `clip_value`, `weight_decay`, `stochastic_rounding`."""
        rule = {k: settings.pop(k) for k in RULE_SETTINGS if k in settings}
        if isinstance(optimizer, Optimizer):
            if settings:
                optimizer = Optimizer(optimizer.kind, {**dict(optimizer.hyper), **settings})
        else:
            name = optimizer.name if isinstance(optimizer, catalog.Optimizer) else optimizer
            optimizer = Optimizer(name, settings)  # type: ignore[arg-type]
        return cls(optimizer, **rule)

    def dtype_problem(self, dtype: str) -> str | None:
        """Why this rule cannot update a table stored as `dtype`, or None."""
        if self.stochastic_rounding and dtype == "f32":
            return "stochastic rounding needs an f16 or bf16 dtype"
        return None

    def settings(self) -> dict[str, str | float | bool]:
        """The rule as flat named settings (what `emb.table` carries as attributes):
        the optimizer's name and hyper-parameters, then each transform present."""
        out: dict[str, str | float | bool] = {"optimizer": self.optimizer.kind}
        out.update(self.optimizer.hyper)
        for name in RULE_SETTINGS:
            value = getattr(self, name)
            if value is not None and value is not False and value != 0.0:
                out[name] = value
        return out


@dataclass(frozen=True)
class Table:
    name: str
    rows: int
    dim: int
    dtype: str = "f32"
    serving: str = "f32"
    update: UpdateRule = field(default_factory=UpdateRule)

    def validate(self) -> None:
        for what, value, limit in (("rows", self.rows, MAX_ROWS), ("dim", self.dim, MAX_DIM)):
            if (message := limit_error(f"table {self.name}: {what}", value, limit)) is not None:
                raise ModelInvalid(message, what)
        masters = catalog.LAYOUTS.masters()
        if self.dtype not in masters:
            extra = (f" ({self.dtype} is a serving layout: a master table must be "
                     f"{', '.join(masters[:-1])} or {masters[-1]})"
                     if self.dtype in catalog.LAYOUTS else "")
            raise ModelInvalid(f"table {self.name}: unknown dtype '{self.dtype}'{extra}", "dtype")
        if self.serving not in catalog.LAYOUTS:
            raise ModelInvalid(
                f"table {self.name}: unknown serving layout '{self.serving}' "
                f"(expected one of {', '.join(catalog.LAYOUTS)})", "serving")
        if not isinstance(self.update, UpdateRule):
            raise ModelInvalid(f"table {self.name}: update must be an UpdateRule", "update")
        if (why := self.update.dtype_problem(self.dtype)) is not None:
            raise ModelInvalid(f"table {self.name}: {why}", "stochastic_rounding")


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
