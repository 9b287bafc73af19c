"""The one catalog of optimizers, serving layouts and pooling modes.

Every other layer reads these facts from here: the dialects' verifiers, the
frontends, the specs, the runtime's argument checks, `ekko run`'s reference
check and the backends. An optimizer is its state, its hyper-parameters
(defaults and ranges) and its per-row math, written once as a Python
function that `rowmath` traces into IR; no backend has optimizer code.

Math functions take `(g, w, *state, step=..., dim=..., **hyper)` and return
`(new_w, *new_state)`: g is the row's (deduplicated, clipped, decayed)
gradient, w the current weights as f32, the state in declaration order.
"""

from __future__ import annotations

import inspect
import keyword
import linecache
import math as _math
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import ClassVar, Protocol, TypeVar

from xdsl.dialects.builtin import f32, f64
from xdsl.ir import Block, Region, SSAValue
from xdsl.utils.exceptions import VerifyException

from . import rowmath
from . import rowmath as rm
from .mathregion import RowSumOp, YieldOp, check_rowwise_outputs

# -- serving layouts --------------------------------------------------------
#
# A layout is a name, a codec and whether it can hold a master table. The
# codec says everything else: the row's bytes, the arrays' dtypes, and how
# the backends encode and decode a row. Emitters branch on `codec.kind`
# (and the codec's parameters), never on a layout's name, so a layout made
# of an existing codec is one entry here.


@dataclass(frozen=True)
class Format:
    """A float element format as stored in memory."""

    name: str  # f32, f16, bf16
    nbytes: int
    exponent: int  # the exponent field's mask: all ones is inf or NaN
    np_dtype: str  # the numpy dtype of an array of it (bf16: its bits)
    torch_dtypes: tuple[str, ...]  # torch dtypes accepted for it (the first is made)
    triton: str  # the Triton pointer type of an array of it


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("f32", 4, 0x7F800000, "float32", ("float32",), "*fp32"),
    Format("f16", 2, 0x7C00, "float16", ("float16",), "*fp16"),
    Format("bf16", 2, 0x7F80, "uint16", ("bfloat16", "int16", "uint16"), "*i16"),
)}
# quantized rows are bytes
BYTES = Format("u8", 1, 0, "uint8", ("uint8",), "*u8")


@dataclass(frozen=True)
class Minifloat:
    """An 8-bit float code format without infinities (OCP FP8 E4M3, 'fn')."""

    name: str
    exp_bits: int
    man_bits: int
    torch_dtype: str

    @property
    def bias(self) -> int:
        return (1 << (self.exp_bits - 1)) - 1

    @property
    def max(self) -> float:
        """The largest finite value: all-ones exponent, mantissa all ones but the NaN code."""
        top = (1 << self.exp_bits) - 1 - self.bias
        return (2.0 - 2.0 ** (1 - self.man_bits)) * 2.0 ** top

    @property
    def nan(self) -> int:
        """The code of NaN (sign bit clear): every bit of exponent and mantissa set."""
        return (1 << (self.exp_bits + self.man_bits)) - 1


MINIFLOATS = {m.name: m for m in (Minifloat("e4m3", 4, 3, "float8_e4m3fn"),)}


@dataclass(frozen=True)
class Elementwise:
    """Each element one float of `fmt`, rounded to nearest-even."""

    fmt: str
    kind: ClassVar[str] = "float"

    def code_bytes(self, dim: int) -> int:
        return FORMATS[self.fmt].nbytes * dim

    @property
    def tail(self) -> tuple[str, ...]:
        return ()


@dataclass(frozen=True)
class RowAffine:
    """Row-wise affine codes (FBGEMM's fused rows): `bits`-bit unsigned codes,
    8 // bits a byte, low bits first (a last partial byte padded with 0), then
    the scale and the bias in `param` format. x ~= code * scale + bias.

    bias = min(row) and scale = (max - bias) / (2**bits - 1), stored in `param`.
    `inverse`: codes as FBGEMM's 8-bit rows, rint((x - min) * (2**bits - 1) /
    (max - min + 1e-8)) from the unrounded range; else as its 4-bit rows,
    rint((x - bias) / scale) from the stored bias and scale (scale 0 counts as 1)."""

    bits: int
    param: str
    inverse: bool
    kind: ClassVar[str] = "affine"

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    @property
    def per_byte(self) -> int:
        return 8 // self.bits

    def code_bytes(self, dim: int) -> int:
        return -(-dim // self.per_byte)

    @property
    def tail(self) -> tuple[str, ...]:
        return ("scale", "bias")


@dataclass(frozen=True)
class RowScaled:
    """Row-wise scaled float codes: one `code` minifloat per element, then a
    `param` scale = max|row| / the code's max (an all-zero row: scale 0, codes
    0). code = x / scale rounded to nearest-even, saturated to the code's max;
    x ~= code * scale."""

    code: str
    param: str = "f32"
    kind: ClassVar[str] = "scaled"

    @property
    def minifloat(self) -> Minifloat:
        return MINIFLOATS[self.code]

    def code_bytes(self, dim: int) -> int:
        return dim

    @property
    def tail(self) -> tuple[str, ...]:
        return ("scale",)


Codec = Elementwise | RowAffine | RowScaled


@dataclass(frozen=True)
class Layout:
    """How one row of a table is stored: a name for a codec."""

    name: str
    codec: Codec
    master: bool = False  # can hold an optimizer's master table
    doc: str = ""

    @property
    def quantized(self) -> bool:
        """Rows are bytes (codes and parameters), not one float per element."""
        return self.codec.kind != "float"

    @property
    def storage(self) -> Format:
        """The element format of the array holding the rows."""
        return BYTES if self.quantized else FORMATS[self.codec.fmt]  # type: ignore[union-attr]

    @property
    def dtypes(self) -> tuple[str, ...]:
        """numpy and torch dtype names an array of these rows may have."""
        s = self.storage
        return tuple(dict.fromkeys((s.np_dtype, *s.torch_dtypes)))

    def params_at(self, dim: int) -> int:
        """Byte offset of the row's parameters (scale, then bias) after its codes."""
        return self.codec.code_bytes(dim)

    def row_bytes(self, dim: int) -> int:
        tail = self.codec.tail
        param = FORMATS[self.codec.param].nbytes if tail else 0  # type: ignore[union-attr]
        return self.codec.code_bytes(dim) + len(tail) * param

    def width(self, dim: int) -> int:
        """Elements per row of the array holding it (bytes for quantized rows)."""
        return self.row_bytes(dim) // self.storage.nbytes


class _Named(Protocol):
    name: str


_Entry = TypeVar("_Entry", bound=_Named)


class Registry(Mapping[str, _Entry]):
    """Entries by name (serving layouts, optimizers): read-only as a mapping;
    `register` adds one after `_problem` has no objection, and `scoped()`
    undoes every registration made inside it (what tests and short-lived user
    definitions use instead of editing the table). Readers look names up at
    the time of use, so an entry registered here reaches every part of ekko."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def __getitem__(self, name: str) -> _Entry:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def _problem(self, entry: _Entry, replace: bool) -> str | None:
        """Why `entry` may not be registered, or None."""
        if entry.name in self._entries and not replace:
            return f"the name {entry.name!r} is taken"
        return None

    def register(self, entry: _Entry, replace: bool = False) -> _Entry:
        """Add `entry`; a name taken needs `replace`."""
        if (why := self._problem(entry, replace)) is not None:
            raise ValueError(why)
        self._entries[entry.name] = entry
        return entry

    @contextmanager
    def scoped(self, *entries: _Entry) -> Iterator[Registry]:
        """Register `entries`; they, and whatever is registered inside the `with`
        block, are gone after it (errors included)."""
        saved = dict(self._entries)
        try:
            for entry in entries:
                self.register(entry)
            yield self
        finally:
            self._entries = saved


class Layouts(Registry[Layout]):
    """The registry of serving layouts, by name."""

    def _problem(self, entry: Layout, replace: bool) -> str | None:
        if not entry.name.isidentifier():
            return f"layout name {entry.name!r} is not an identifier"
        return super()._problem(entry, replace)

    def names(self) -> tuple[str, ...]:
        return tuple(self)

    def problem(self, name: object) -> str | None:
        """Why `name` is not a layout registered now, or None: the one message of
        the IR's layout attribute and the runtime's checks."""
        if isinstance(name, str) and name in self._entries:
            return None
        return f"unknown layout {name!r}; expected one of {', '.join(self)}"

    def masters(self) -> tuple[str, ...]:
        return tuple(n for n, entry in self.items() if entry.master)


LAYOUTS = Layouts()
for _layout in (
    Layout("f32", Elementwise("f32"), True, "float32"),
    Layout("f16", Elementwise("f16"), True, "IEEE half, nearest-even"),
    Layout("bf16", Elementwise("bf16"), True, "bfloat16 bits, nearest-even"),
    Layout("int8", RowAffine(8, "f32", inverse=True), doc="FBGEMM's fused 8-bit rows: "
           "dim codes, f32 scale, f32 bias"),
    Layout("int4", RowAffine(4, "f16", inverse=False), doc="FBGEMM's fused 4-bit rows: "
           "two codes a byte (low nibble first), f16 scale, f16 bias"),
    Layout("fp8", RowScaled("e4m3"), doc="OCP E4M3 codes (torch.float8_e4m3fn) of x / scale, "
           "f32 scale = max|row| / 448"),
):
    LAYOUTS.register(_layout)
INDEX_DTYPES = ("i32", "i64")
POOLING_MODES = ("sum", "mean", "none")
# how a deduplicated update walks its rows (upd-schedule's `order`): "input", the
# delta's order, a repeated id's rows summed in a scratch row and applied at its
# last; "bucket", grouped by unique id, range of rows by range; "id", grouped and
# sorted by id
APPLY_ORDERS = ("input", "bucket", "id")


def pooling_problem(mode: str, weighted: bool) -> str | None:
    """Why a lookup cannot pool this way, or None. Per-sample weights scale the
    rows of a sum (torch's embedding_bag allows them with mode sum only)."""
    if weighted and mode != "sum":
        return f'per-sample weights need mode "sum", got mode "{mode}"'
    return None


def layout(name: str) -> Layout:
    if (why := LAYOUTS.problem(name)) is not None:
        raise ValueError(why)
    return LAYOUTS[name]


def row_bytes(name: str, dim: int) -> int:
    return layout(name).row_bytes(dim)


# -- hyper-parameters -------------------------------------------------------


@dataclass(frozen=True)
class Hyper:
    """A hyper-parameter: its default and the interval it must lie in."""

    name: str
    default: float
    low: float = 0.0
    high: float = _math.inf
    low_open: bool = False  # (low, ...] rather than [low, ...]
    high_open: bool = False

    def problem(self, value: object) -> str | None:
        """Why `value` is not acceptable, or None."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            shown = repr(value) if isinstance(value, str) else str(value)
            return f"{self.name} must be a number, got {shown}"
        v = float(value)
        if not _math.isfinite(v):
            return f"{self.name} must be finite, got {v}"
        lo_ok = v > self.low if self.low_open else v >= self.low
        hi_ok = v < self.high if self.high_open else v <= self.high
        if not (lo_ok and hi_ok):
            return f"{self.name} must be {self.describe()}, got {v}"
        return None

    def describe(self) -> str:
        if self.low == 0.0 and self.high == _math.inf:
            return "positive" if self.low_open else "zero or positive"
        return f"in {self.interval()}"

    def interval(self) -> str:
        return (("(" if self.low_open else "[") + f"{self.low:g}, {self.high:g}"
                + (")" if self.high_open else "]"))


def _lr(default: float = 0.01) -> Hyper:
    return Hyper("lr", default, 0.0, low_open=True)


def _eps(default: float) -> Hyper:
    return Hyper("eps", default, 0.0, low_open=True)


def _beta(name: str, default: float) -> Hyper:
    return Hyper(name, default, 0.0, 1.0, high_open=True)


# gradient transforms ahead of every optimizer: absent when None / 0
CLIP_VALUE = Hyper("clip_value", 0.0, 0.0, low_open=True)
MAX_NORM = Hyper("max_norm", 0.0, 0.0, low_open=True)
WEIGHT_DECAY = Hyper("weight_decay", 0.0)
GRAD_HYPER = {h.name: h for h in (CLIP_VALUE, MAX_NORM, WEIGHT_DECAY)}


# -- optimizers -------------------------------------------------------------


@dataclass(frozen=True)
class State:
    """One optimizer state array: (rows,) when rowwise, else (rows, dim), f32."""

    name: str
    rowwise: bool = False


@dataclass(frozen=True)
class Optimizer:
    name: str
    math: Callable = field(compare=False)
    states: tuple[State, ...] = ()
    hyper: tuple[Hyper, ...] = (_lr(),)
    uses_step: bool = False  # the math reads `step` (bias correction, lr decay)
    linear: bool = False  # new_w = w - lr * g: duplicates may be applied one by one
    idle_at_zero: bool = False  # a zero gradient on zero state leaves w as it is
    doc: str = ""  # what the step does, one line
    source: str = ""  # where its definition comes from (a paper, torch.optim's class)

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.states)

    @property
    def hyper_names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.hyper)

    def defaults(self) -> dict[str, float]:
        return {h.name: h.default for h in self.hyper}

    def hyper_problem(self, name: str) -> str | None:
        """Why `name` is not one of this optimizer's hyper-parameters, or None: the
        one message of the language, `update_kernel` and the catalog."""
        if name in self.hyper_names:
            return None
        return (f"optimizer {self.name} has no hyper-parameter '{name}' "
                f"(it takes {', '.join(self.hyper_names)})")

    def resolve(self, given: dict[str, float]) -> dict[str, float]:
        """Every hyper-parameter's value: `given` over the defaults, checked."""
        for name in sorted(given):
            if (why := self.hyper_problem(name)) is not None:
                raise ValueError(why)
        out = self.defaults()
        out.update(given)
        for h in self.hyper:
            if (why := h.problem(out[h.name])) is not None:
                raise ValueError(f"{self.name}: {why}")
        return {k: float(v) for k, v in out.items()}

    def state_shape(self, state: str, rows: int, dim: int) -> tuple[int, ...]:
        s = next(s for s in self.states if s.name == state)
        return (rows,) if s.rowwise else (rows, dim)


def _sgd(g, w, *, lr, **_):
    return w - lr * g


def _adagrad(g, w, s, *, lr, eps, lr_decay, step, **_):
    clr = lr / (1.0 + (step - 1.0) * lr_decay)
    s = s + g * g
    return w - clr * g / (rm.sqrt(s) + eps), s


def _rowwise_adagrad(g, w, m, *, lr, eps, dim, **_):
    m = m + rm.row_mean(g * g, dim)
    return w - lr / (rm.sqrt(m) + eps) * g, m


def _adam(g, w, m, v, *, lr, beta1, beta2, eps, step, **_):
    alpha = lr * rm.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * (g * g)
    return w - alpha * m / (rm.sqrt(v) + eps), m, v


def _rmsprop(g, w, v, *, lr, alpha, eps, **_):
    v = alpha * v + (1.0 - alpha) * (g * g)
    return w - lr * g / (rm.sqrt(v) + eps), v


def _ftrl(g, w, z, n, *, lr, l1, l2, beta, **_):
    n_new = n + g * g
    sigma = (rm.sqrt(n_new) - rm.sqrt(n)) / lr
    z = z + g - sigma * w
    shrunk = -(z - rm.sign(z) * l1) / ((beta + rm.sqrt(n_new)) / lr + l2)
    return rm.where(abs(z) <= l1, 0.0, shrunk), z, n_new


def _lion(g, w, m, *, lr, beta1, beta2, decoupled_decay, **_):
    c = beta1 * m + (1.0 - beta1) * g
    return w - lr * (rm.sign(c) + decoupled_decay * w), beta2 * m + (1.0 - beta2) * g


class Optimizers(Registry[Optimizer]):
    """The optimizers the catalog knows, by name; a built-in's name never goes."""

    def _problem(self, opt: Optimizer, replace: bool) -> str | None:
        return _name_problem(opt.name, replace) or _names_problem(opt)


OPTIMIZERS = Optimizers()


# the math's own arguments: no state or hyper-parameter may take their names
MATH_ARGS = ("g", "w", "step", "dim")


def register(opt: Optimizer, replace: bool = False) -> Optimizer:
    """Add an optimizer to the catalog (see Registry.register)."""
    return OPTIMIZERS.register(opt, replace)


def _name_problem(name: object, replace: bool) -> str | None:
    """Why an optimizer cannot be called `name`, or None."""
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        return f"an optimizer's name must be a Python identifier, got {name!r}"
    if name in OPTIMIZERS and (not replace or name in BUILTIN):
        return f"{name!r} is already defined" + (
            " (a built-in optimizer)" if name in BUILTIN else "; replace=True redefines it")
    return None


def _names_problem(opt: Optimizer) -> str | None:
    """Why the state and hyper-parameter names of `opt` do not work, or None: each is
    a Python identifier, none is taken twice, none is one of the math's own arguments
    (g, w, step, dim) or a gradient setting (clip_value, max_norm, weight_decay)."""
    seen: dict[str, str] = {}
    for kind, name in [*(("state", s.name) for s in opt.states),
                       *(("hyper-parameter", h.name) for h in opt.hyper)]:
        if not isinstance(name, str) or not name.isidentifier():
            return f"{kind} name {name!r} is not a Python identifier"
        if keyword.iskeyword(name):
            return f"{kind} name {name!r} is a Python keyword"
        if name in MATH_ARGS:
            return f"{kind} name {name!r} is taken: the math's arguments are {', '.join(MATH_ARGS)}"
        if name in GRAD_HYPER:
            return f"{kind} name {name!r} is taken by the gradient setting of that name"
        if name in seen:
            return (f"{kind} name {name!r} is used twice" if seen[name] == kind else
                    f"{kind} name {name!r} is also the name of a {seen[name]}")
        seen[name] = kind
    return None


for _opt in (
    Optimizer("sgd", _sgd, linear=True, idle_at_zero=True,
              doc="w -= lr * g"),
    Optimizer("adagrad", _adagrad, (State("sum"),),
              (_lr(), _eps(1e-10), Hyper("lr_decay", 0.0)), uses_step=True, idle_at_zero=True,
              doc="s += g*g; w -= lr / (1 + (step-1)*lr_decay) * g / (sqrt(s) + eps)",
              source="torch.optim.Adagrad"),
    Optimizer("rowwise_adagrad", _rowwise_adagrad, (State("momentum", rowwise=True),),
              (_lr(), _eps(1e-8)), idle_at_zero=True,
              doc="m += mean(g*g); w -= lr * g / (sqrt(m) + eps)", source="FBGEMM"),
    Optimizer("adam", _adam, (State("exp_avg"), State("exp_avg_sq")),
              (_lr(), _beta("beta1", 0.9), _beta("beta2", 0.999), _eps(1e-8)), uses_step=True,
              idle_at_zero=True,
              doc="m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g; "
                  "w -= lr * sqrt(1-b2^step) / (1-b1^step) * m / (sqrt(v) + eps)",
              source="torch.optim.SparseAdam: bias-corrected moments of the touched rows"),
    Optimizer("rmsprop", _rmsprop, (State("square_avg"),),
              (_lr(), Hyper("alpha", 0.99, 0.0, 1.0), _eps(1e-8)), idle_at_zero=True,
              doc="v = alpha*v + (1-alpha)*g*g; w -= lr * g / (sqrt(v) + eps)",
              source="torch.optim.RMSprop"),
    Optimizer("ftrl", _ftrl, (State("z"), State("n")),
              (_lr(), Hyper("l1", 0.0), Hyper("l2", 0.0), Hyper("beta", 1.0)),
              doc="n2 = n + g*g; z += g - (sqrt(n2) - sqrt(n)) / lr * w; n = n2; "
                  "w = 0 if abs(z) <= l1 else -(z - sign(z)*l1) / ((beta + sqrt(n)) / lr + l2)",
              source="FTRL-Proximal, McMahan et al. 2013"),
    Optimizer("lion", _lion, (State("exp_avg"),),
              (_lr(), _beta("beta1", 0.9), _beta("beta2", 0.99), Hyper("decoupled_decay", 0.0)),
              doc="c = b1*m + (1-b1)*g; w -= lr * (sign(c) + decoupled_decay*w); "
                  "m = b2*m + (1-b2)*g",
              source="Chen et al. 2023"),
):
    register(_opt)
BUILTIN = frozenset(OPTIMIZERS)


def define(name: str | None = None, *, state: tuple[str, ...] | list[str] = (),
           rowwise_state: tuple[str, ...] | list[str] = (),
           hyper: dict[str, float | tuple[float, float, float]] | None = None,
           doc: str = "", replace: bool = False) -> Callable[[Callable], Optimizer]:
    """A decorator that adds a user-defined optimizer to the catalog.

    The decorated function takes the row's gradient `g` and weights `w`
    (after clipping and weight decay), then its state in the order `state`
    + `rowwise_state` lists them, and keyword hyper-parameters; it may also
    take `step` (counts from 1) and `dim`. It returns the new weights and
    the new state, in the same order, written with numpy-like operators and
    the functions of `ekko.rowmath` (sqrt, exp, log, where, sign, maximum,
    minimum, clip, row_sum, row_mean). ekko traces it into IR and compiles it
    fused like the built-ins, for every backend. `hyper` maps each name to
    its default, or to (default, low, high) for a checked range (default
    range: finite and non-negative; `lr` must be positive).
    """
    def wrap(fn: Callable) -> Optimizer:
        label = name or getattr(fn, "__name__", "?")

        def refuse(reason: str, tb: TracebackType | None = None) -> DefinitionError:
            return definition_error(fn, label, reason, tb)

        if not inspect.isfunction(fn):
            raise refuse(f"@ekko.optimizer decorates a function (def), got {type(fn).__name__}")
        if name is None and fn.__name__ == "<lambda>":
            raise refuse('a lambda has no name: give it one, ekko.optimizer("name")(lambda ...)')
        if (why := _name_problem(label, replace)) is not None:
            raise refuse(why)
        try:
            opt = Optimizer(label, _math_of(fn), _states(state, rowwise_state), _hypers(hyper),
                            uses_step=_takes(fn, "step"), doc=doc or (fn.__doc__ or "").strip())
        except ValueError as e:
            raise refuse(str(e)) from None
        if (why := _names_problem(opt) or _keywords_problem(fn, opt)) is not None:
            raise refuse(why)
        if (why := _trace_problem(opt)) is not None:
            raise refuse(*why) from None
        return register(opt, replace=replace)

    return wrap


class DefinitionError(ValueError):
    """A mistake in an optimizer made with `define`, in one line that names it and
    the user's source line; nothing was added to the catalog."""


def definition_error(fn: object, name: str, reason: str,
                     tb: TracebackType | None = None) -> DefinitionError:
    """`file:line: optimizer NAME: reason (in `source line`)`. The line is the last
    one of `fn`'s file that the traceback `tb` passed (the statement that failed
    while tracing), else where `fn` is defined (its decorator)."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return DefinitionError(f"optimizer {name}: {reason}")
    path, line = code.co_filename, code.co_firstlineno
    for frame, lineno in traceback.walk_tb(tb):
        if frame.f_code.co_filename == path:
            line = lineno
    source = linecache.getline(path, line).strip()
    return DefinitionError(f"{path}:{line}: optimizer {name}: {reason}"
                           + (f" (in `{source}`)" if source else ""))


def _math_of(fn: Callable) -> Callable:
    """`fn` as the catalog calls math: it gets only the keywords it names (all of
    them if it takes **kwargs)."""
    params = inspect.signature(fn).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())

    def math(*args, **kwargs):
        return fn(*args, **{k: v for k, v in kwargs.items() if takes_all or k in params})

    return math


def _takes(fn: Callable, keyword_name: str) -> bool:
    params = inspect.signature(fn).parameters.values()
    return any(p.name == keyword_name or p.kind is p.VAR_KEYWORD for p in params)


def _states(state: object, rowwise_state: object) -> tuple[State, ...]:
    """The state arrays, per-element ones first (ValueError for a bare string)."""
    for what, names in (("state", state), ("rowwise_state", rowwise_state)):
        if isinstance(names, str) or not isinstance(names, (tuple, list)):
            raise ValueError(f"{what} must be a tuple of names, got {names!r}")
    return (tuple(State(n) for n in state)  # type: ignore[union-attr]
            + tuple(State(n, True) for n in rowwise_state))  # type: ignore[union-attr]


def _hypers(hyper: object) -> tuple[Hyper, ...]:
    """`hyper={name: default or (default, low, high)}` as checked Hypers (`lr` first,
    0.01 and positive unless given); ValueError names the bad one."""
    if hyper is not None and not isinstance(hyper, dict):
        raise ValueError(f"hyper must be a dict of name -> default, got {hyper!r}")
    out = []
    for key, spec in {"lr": 0.01, **(hyper or {})}.items():
        numbers = spec if isinstance(spec, tuple) else (spec,)
        if len(numbers) not in (1, 3) or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) for v in numbers):
            raise ValueError(f"hyper-parameter {key!r} takes a number or (default, low, high), "
                             f"got {spec!r}")
        if len(numbers) == 3:
            default, low, high = (float(v) for v in numbers)
            if not low <= high:
                raise ValueError(f"hyper-parameter {key!r}: low {low:g} is above high {high:g}")
            h = Hyper(key, default, low, high)
        else:
            value = float(numbers[0])
            h = _lr(value) if key == "lr" else Hyper(key, value)
        if (why := h.problem(h.default)) is not None:
            raise ValueError(f"default {why}")
        out.append(h)
    return tuple(out)


def _keywords_problem(fn: Callable, opt: Optimizer) -> str | None:
    """A keyword `fn` needs that the catalog never passes, or None."""
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.KEYWORD_ONLY and p.default is p.empty \
                and p.name not in (*opt.hyper_names, "step", "dim"):
            return (f"the function takes '{p.name}', which is none of its hyper-parameters "
                    f"({', '.join(opt.hyper_names)}), step or dim: add it to hyper=")
    return None


def _trace_problem(opt: Optimizer) -> tuple[str, TracebackType | None] | None:
    """Trace a new optimizer once, so that a mistake in it is reported where it is
    defined: (why, the traceback through the user's code) or None."""
    try:
        math_region(opt, {}, 4)
    except RecursionError as e:
        return ("it calls itself without end (the math is traced once, into "
                "straight-line code)", e.__traceback__)
    except Exception as e:  # noqa: BLE001 - the user's code: any error is theirs to see
        lines = [line for line in str(e).strip().splitlines() if line.strip()] or [""]
        text = lines[-1].strip().removeprefix(f"optimizer {opt.name}").lstrip(": ")
        ours = isinstance(e, (TypeError, ValueError)) or \
            type(e).__name__ in ("VerifyException", "DiagnosticException")  # xDSL's, no import
        if not ours or not text:
            text = f"{type(e).__name__}: {text}" if text else type(e).__name__
        return text, e.__traceback__
    return None


def optimizer(name: str) -> Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def grad_transform(g, w, *, clip_value=None, max_norm=None, weight_decay=None):
    """Clip by value, then by the row's L2 norm, then add weight decay (as torch).

    Each transform is applied when its value is given (None: absent)."""
    if clip_value is not None:
        g = rm.clip(g, -clip_value, clip_value)
    if max_norm is not None:
        norm = rm.sqrt(rm.row_sum(g * g))
        g = g * rm.where(norm > max_norm, max_norm / norm, 1.0)
    if weight_decay is not None:
        g = g + weight_decay * w
    return g


# -- the math as IR ----------------------------------------------------------


def grad_hyper_present(settings: Mapping[str, object]) -> tuple[str, ...]:
    """The gradient transforms an update applies, in the order it applies them."""
    return tuple(n for n in GRAD_HYPER if n in settings)


def math_args(opt: Optimizer, settings: Mapping[str, object]) -> list[str]:
    """Names of the math region's arguments: g, w, *state, step, *hyper, and the
    gradient transforms `settings` (an op's flat settings) name."""
    return ["g", "w", *opt.state_names, "step", *opt.hyper_names, *grad_hyper_present(settings)]


def math_region(opt: Optimizer, settings: Mapping[str, object], dim: int) -> Region:
    """Trace `opt`'s math (after the gradient transforms `settings` name) into the
    region of `kern.update`: element values (g, w, per-element state) f32,
    the step and hyper-parameters f64 (see `ekko.dialects.kern`)."""
    names = math_args(opt, settings)
    nelem = 2 + len(opt.states)
    block = Block(arg_types=[f32] * nelem + [f64] * (len(names) - nelem))
    for arg, name in zip(block.args, names):
        arg.name_hint = name
    args = dict(zip(names, block.args))
    t = rowmath.Tracer(block, RowSumOp)
    w = t.wrap(args["w"])
    present = grad_hyper_present(settings)
    g = grad_transform(t.wrap(args["g"]), w, **{n: t.wrap(args[n]) for n in present})
    hyper: dict[str, SSAValue | int] = {h: args[h] for h in opt.hyper_names}
    hyper["step"] = args["step"]
    hyper["dim"] = dim
    states = [args[s] for s in opt.state_names]
    outs = rowmath.trace(lambda *a, **k: opt.math(g, *a[1:], **k), t,
                         [args["g"], args["w"], *states], hyper)
    if len(outs) != 1 + len(opt.states):
        raise VerifyException(f"optimizer {opt.name} must return the new weights and "
                              f"{len(opt.states)} state value(s), got {len(outs)} values")
    block.add_op(YieldOp(*outs))
    check_rowwise(block, opt)
    return Region(block)


def check_rowwise(block: Block, opt: Optimizer) -> None:
    """`opt`'s rowwise states get one value per row in `block` (VerifyException)."""
    elementwise = {"g", "w", *(s.name for s in opt.states if not s.rowwise)}
    check_rowwise_outputs(block, elementwise, math_args(opt, {}),
                          [(s.name, s.rowwise) for s in opt.states], f"optimizer {opt.name}")


# -- the tables of the docs -------------------------------------------------


def _markdown(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *("| " + " | ".join(cells) + " |" for cells in rows)])


def _builtins() -> list[Optimizer]:
    return [o for name, o in OPTIMIZERS.items() if name in BUILTIN]


def _semantics(opt: Optimizer) -> str:
    return f"`{opt.doc}`" + (f" ({opt.source})" if opt.source else "")


def optimizer_table() -> str:
    """docs/language.md's table of the built-in optimizers (a test keeps the two equal)."""
    def states(opt: Optimizer) -> str:
        return ", ".join(f"`{s.name}` ({'1 value' if s.rowwise else '`dim` values'})"
                         for s in opt.states) or "none"

    return _markdown(
        ("optimizer", "hyper-parameters (default)", "state per row",
         "per unique id, after duplicates are summed into `g`"),
        [(f"`{o.name}`", ", ".join(f"`{h.name}` ({h.default:g})" for h in o.hyper),
          states(o), _semantics(o)) for o in _builtins()])


def state_table() -> str:
    """README's table of the state arrays each built-in optimizer's kernel takes."""
    def shapes(opt: Optimizer) -> str:
        each = ["(rows,)" if s.rowwise else "(rows, dim)" for s in opt.states]
        if not each:
            return "none"
        shape = each[0] if len(each) == 1 else f"({', '.join(each)})"
        return f"`{shape}` " + ", ".join(s.name for s in opt.states)

    return _markdown(("optimizer", "state", "semantics"),
                     [(f"`{o.name}`", shapes(o), _semantics(o))
                      for o in _builtins()])


def layout_table() -> str:
    """The serving layouts as the catalog defines them (README prints it)."""
    return _markdown(("layout", "master table", "bytes per row (dim 64)"),
                     [(f"`{l.name}`", "yes" if l.master else "no (serving only)",
                       str(l.row_bytes(64))) for l in LAYOUTS.values()])


__all__ = ["Layout", "LAYOUTS", "Hyper", "State", "Optimizer", "OPTIMIZERS", "Registry", "register",
           "define",
           "optimizer", "layout", "row_bytes", "grad_transform", "POOLING_MODES", "math_args",
           "math_region", "optimizer_table", "state_table", "layout_table"]
