"""Per-row math as IR: a tracer that writes arith/math ops from Python.

An optimizer's math is an ordinary Python function of the row's values
(`g`, `w`, its state) written with numpy-like operators. Calling it on
`Value`s records each operation as an `arith`/`math` op in a block, which
becomes the region of `kern.update`; backends lower those ops generically.

Three kinds of value, told apart by where they come from, never declared:
  element  one value per element of the row (g, w, per-element state)
  row      one value per row (rowwise state, `row_sum` of an element value)
  uniform  one value per call (hyper-parameters, the step)
Uniform values are f64 (hyper-parameters fold exactly, as in Python);
element and row values are f32. Where a uniform value meets an f32 one it
is truncated to f32 once (`arith.truncf`), as torch's scalar arguments are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from xdsl.dialects import arith, math
from xdsl.dialects.builtin import Float32Type, FloatAttr, IntegerType, f32, f64
from xdsl.ir import Block, Operation, SSAValue

Number = float | int


class Tracer:
    """Appends the ops of one trace to a block; caches constants and casts."""

    def __init__(self, block: Block, row_sum: Callable[[SSAValue], Operation]):
        self.block = block
        self._row_sum = row_sum
        self._consts: dict[float, SSAValue] = {}
        self._narrow: dict[SSAValue, SSAValue] = {}

    def add(self, op: Operation) -> SSAValue:
        self.block.add_op(op)
        return op.results[0]

    def const(self, value: Number) -> SSAValue:
        value = float(value)
        key = value if value == value else float("nan")
        if key not in self._consts:
            self._consts[key] = self.add(arith.ConstantOp(FloatAttr(value, f64)))
        return self._consts[key]

    def f32(self, v: SSAValue) -> SSAValue:
        """v as f32 (uniform f64 values are truncated once and reused)."""
        if isinstance(v.type, Float32Type):
            return v
        if v not in self._narrow:
            self._narrow[v] = self.add(arith.TruncFOp(v, f32))
        return self._narrow[v]

    def unify(self, a: SSAValue, b: SSAValue) -> tuple[SSAValue, SSAValue]:
        if a.type == b.type:
            return a, b
        return self.f32(a), self.f32(b)

    def wrap(self, v: SSAValue) -> Value:
        return Value(self, v)


def _lift(t: Tracer, x: Value | Number) -> SSAValue:
    if isinstance(x, Value):
        return x.ssa
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return t.const(x)
    raise TypeError(f"row math works on numbers and traced values, not {type(x).__name__}")


class Value:
    """A traced value: arithmetic on it records ops instead of computing."""

    __array_priority__ = 1000  # numpy scalars defer to us

    def __init__(self, tracer: Tracer, ssa: SSAValue):
        self.t = tracer
        self.ssa = ssa

    def _bin(self, cls, other, swap: bool = False) -> Value:
        a, b = self.ssa, _lift(self.t, other)
        if swap:
            a, b = b, a
        a, b = self.t.unify(a, b)
        return self.t.wrap(self.t.add(cls(a, b)))

    def __add__(self, o): return self._bin(arith.AddfOp, o)
    def __radd__(self, o): return self._bin(arith.AddfOp, o, True)
    def __sub__(self, o): return self._bin(arith.SubfOp, o)
    def __rsub__(self, o): return self._bin(arith.SubfOp, o, True)
    def __mul__(self, o): return self._bin(arith.MulfOp, o)
    def __rmul__(self, o): return self._bin(arith.MulfOp, o, True)
    def __truediv__(self, o): return self._bin(arith.DivfOp, o)
    def __rtruediv__(self, o): return self._bin(arith.DivfOp, o, True)
    def __pow__(self, o): return self._bin(math.PowFOp, o)
    def __rpow__(self, o): return self._bin(math.PowFOp, o, True)

    def __neg__(self) -> Value:
        return self.t.wrap(self.t.add(arith.NegfOp(self.ssa)))

    def __abs__(self) -> Value:
        return self.t.wrap(self.t.add(math.AbsFOp(self.ssa)))

    def _cmp(self, pred: str, other) -> Value:
        a, b = self.t.unify(self.ssa, _lift(self.t, other))
        return self.t.wrap(self.t.add(arith.CmpfOp(a, b, pred)))

    def __lt__(self, o): return self._cmp("olt", o)
    def __le__(self, o): return self._cmp("ole", o)
    def __gt__(self, o): return self._cmp("ogt", o)
    def __ge__(self, o): return self._cmp("oge", o)

    def __bool__(self) -> bool:
        raise TypeError("a traced row value has no truth value: use ekko.rowmath.where(cond, a, b)")

    __hash__ = object.__hash__


def _unary(cls) -> Callable[[Value], Value]:
    def fn(x: Value | Number) -> Value:
        if not isinstance(x, Value):
            raise TypeError("row math functions take traced values")
        return x.t.wrap(x.t.add(cls(x.ssa)))

    fn.__name__ = cls.name.split(".")[-1]
    return fn


sqrt = _unary(math.SqrtOp)
exp = _unary(math.ExpOp)
log = _unary(math.LogOp)


def _tracer_of(*xs) -> Tracer:
    for x in xs:
        if isinstance(x, Value):
            return x.t
    raise TypeError("at least one operand must be a traced row value")


def maximum(a: Value | Number, b: Value | Number) -> Value:
    t = _tracer_of(a, b)
    x, y = t.unify(_lift(t, a), _lift(t, b))
    return t.wrap(t.add(arith.MaximumfOp(x, y)))


def minimum(a: Value | Number, b: Value | Number) -> Value:
    t = _tracer_of(a, b)
    x, y = t.unify(_lift(t, a), _lift(t, b))
    return t.wrap(t.add(arith.MinimumfOp(x, y)))


def clip(x: Value, lo: Value | Number, hi: Value | Number) -> Value:
    return minimum(maximum(x, lo), hi)


def where(cond: Value, a: Value | Number, b: Value | Number) -> Value:
    """a where cond holds, else b (elementwise for element values)."""
    if not isinstance(cond, Value) or cond.ssa.type != IntegerType(1):
        raise TypeError("where() needs a comparison of traced values as its condition")
    t = cond.t
    x, y = t.unify(_lift(t, a), _lift(t, b))
    return t.wrap(t.add(arith.SelectOp(cond.ssa, x, y)))


def sign(x: Value) -> Value:
    """-1, 0 or 1 (0 for 0 and NaN), as numpy.sign."""
    return where(x > 0.0, 1.0, where(x < 0.0, -1.0, 0.0))


def row_sum(x: Value) -> Value:
    """The sum of an element value over the row: one value per row."""
    if not isinstance(x, Value):
        raise TypeError(f"row_sum and row_mean take a traced value, not {type(x).__name__}")
    t = x.t
    return t.wrap(t.add(t._row_sum(t.f32(x.ssa))))


def row_mean(x: Value, dim: int) -> Value:
    """The mean of an element value over a row of `dim` values."""
    return row_sum(x) / float(dim)


def trace(fn: Callable[..., Sequence[Value] | Value], tracer: Tracer,
          args: Sequence[SSAValue], kwargs: dict[str, SSAValue | int]) -> list[SSAValue]:
    """Call `fn` on traced arguments (plain ints, like `dim`, pass as they are).

    Returns its results as f32 SSA values."""
    out = fn(*(tracer.wrap(a) for a in args),
             **{k: v if isinstance(v, int) else tracer.wrap(v) for k, v in kwargs.items()})
    results = list(out) if isinstance(out, (tuple, list)) else [out]
    return [tracer.f32(_lift(tracer, r)) for r in results]


__all__ = ["Tracer", "Value", "sqrt", "exp", "log", "maximum", "minimum", "clip", "where",
           "sign", "row_sum", "row_mean", "trace"]
