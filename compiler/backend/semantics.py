"""What each op of a math region means: the one semantics table.

Every op a `kern.update` region may hold (`mathprog.Instr.op`) has one entry
here: what it computes, what it returns at negative, zero, subnormal, large,
infinite and NaN inputs, and a float64 numpy implementation. The float64
interpreter (`mathprog.interpret`) evaluates programs with these
implementations, the backend tests hold both targets to it
(tests/test_math_semantics.py), and docs/backends.md prints the table
(`markdown()`; a test keeps the two equal). The backends lower each op to
code with this meaning: LLVM through its IEEE instructions and libm
intrinsics, Triton through `triton.language` with the special cases spelled
out where its own functions differ (`**`, which it would compute as
exp2(y * log2 x)).

Values are IEEE f32 (element and row values) or f64 (uniform values), as
the program types them. Two freedoms apply to every op and are not listed
per op: the sign of a zero result (LLVM may ignore it: `nsz`), and the
last bits of a result the backend computes with other rounding (a fused
multiply-add, the order of a row's sum, an exp/log/pow within an ulp or
two). Neither can turn a finite result into a non-finite one, except right
at the overflow threshold.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# the input classes each entry describes, in the docs table's column order
CLASSES = ("negative", "zero", "subnormal", "large", "inf", "nan")


@dataclass(frozen=True)
class OpSemantics:
    """One op: its meaning, its answers per input class, and a float64 implementation."""

    name: str
    arity: int
    meaning: str
    at: dict[str, str]  # input class (CLASSES) -> what the op returns there
    f64: Callable[..., np.ndarray]

    def row(self) -> str:
        """The op's line of the docs table (an empty cell: the plain IEEE result)."""
        cells = [f"`{self.name}`", self.meaning, *(self.at.get(c, "") for c in CLASSES)]
        return "| " + " | ".join(cells) + " |"


def c_pow(x: float, y: float) -> float:
    """C's pow for one pair: Python's math.pow is C's, with errors for what C
    answers with inf (overflow, 0 ** negative) or NaN (a negative base and a
    non-integer exponent)."""
    try:
        return math.pow(x, y)
    except (OverflowError, ValueError):
        odd = math.isfinite(y) and y == math.floor(y) and math.fmod(y, 2.0) != 0.0
        if x == 0.0 or not (x < 0.0 and y != math.floor(y)):
            return math.copysign(math.inf, x if odd else 1.0)
        return math.nan


_pow_each = np.frompyfunc(c_pow, 2, 1)


def _pow(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """C's pow, bit for bit (numpy's own power differs from it in the last bit, and
    its scalar path takes x ** 0.5 as sqrt(x), which makes (-inf) ** 0.5 NaN)."""
    return np.asarray(_pow_each(np.asarray(x, np.float64), np.asarray(y, np.float64)),
                      np.float64)


def _max(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum(a, b)  # NaN if either is NaN


def _min(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.minimum(a, b)


def _f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float64).astype(np.float32).astype(np.float64)


def _row_sum(x: np.ndarray) -> np.ndarray:
    return np.sum(x, axis=-1, keepdims=True)


_IEEE = "IEEE f32/f64, correctly rounded"
OPS: dict[str, OpSemantics] = {op.name: op for op in (
    OpSemantics("add", 2, f"a + b ({_IEEE})",
                {"large": "±inf past the type's max", "inf": "inf + -inf = NaN",
                 "nan": "NaN"}, np.add),
    OpSemantics("sub", 2, f"a - b ({_IEEE})",
                {"large": "±inf past the type's max", "inf": "inf - inf = NaN", "nan": "NaN"},
                np.subtract),
    OpSemantics("mul", 2, f"a * b ({_IEEE})",
                {"zero": "0 * inf = NaN", "subnormal": "kept (no flush to zero)",
                 "large": "±inf past the type's max", "inf": "±inf; 0 * inf = NaN",
                 "nan": "NaN"}, np.multiply),
    OpSemantics("div", 2, f"a / b ({_IEEE})",
                {"zero": "x / 0 = ±inf, 0 / 0 = NaN", "subnormal": "kept",
                 "large": "±inf past the type's max", "inf": "x / inf = 0, inf / inf = NaN",
                 "nan": "NaN"}, np.divide),
    OpSemantics("neg", 1, "-a", {"nan": "NaN"}, np.negative),
    OpSemantics("abs", 1, "absolute value", {"negative": "-a", "inf": "inf", "nan": "NaN"},
                np.abs),
    OpSemantics("sqrt", 1, f"square root ({_IEEE})",
                {"negative": "NaN", "zero": "0", "subnormal": "kept", "inf": "inf",
                 "nan": "NaN"}, np.sqrt),
    OpSemantics("exp", 1, "e ** a (as C's exp/expf)",
                {"negative": "0 below about -104 (f32)", "subnormal": "1",
                 "large": "inf above about 88.72 (f32), 709.78 (f64)", "inf": "exp(-inf) = 0",
                 "nan": "NaN"}, np.exp),
    OpSemantics("log", 1, "natural log (as C's log/logf)",
                {"negative": "NaN", "zero": "-inf", "subnormal": "finite (about -87 to -104)",
                 "inf": "inf", "nan": "NaN"}, np.log),
    OpSemantics("pow", 2, "a ** b as C's pow/powf",
                {"negative": "an integer b keeps the sign ((-2) ** 3 = -8, (-2) ** 2 = 4); "
                             "a finite non-integer b gives NaN",
                 "zero": "a ** 0 = 1 for every a (NaN too); 0 ** b = 0 (b > 0), inf (b < 0)",
                 "subnormal": "kept", "large": "±inf past the type's max",
                 "inf": "a ** inf = inf and a ** -inf = 0 past ±1, the reverse inside; "
                        "(-1) ** ±inf = 1",
                 "nan": "NaN, except 1 ** NaN = 1 and NaN ** 0 = 1"}, _pow),
    OpSemantics("max", 2, "the larger of a and b",
                {"zero": "either zero", "nan": "NaN if either is NaN"}, _max),
    OpSemantics("min", 2, "the smaller of a and b",
                {"zero": "either zero", "nan": "NaN if either is NaN"}, _min),
    OpSemantics("cmp", 2, "a comparison (i1): olt ole ogt oge oeq one ord are false with a NaN "
                          "operand, ult ule ugt uge ueq une uno true; `true`, `false`",
                {"zero": "-0 == +0", "inf": "ordered as the extremes",
                 "nan": "by the predicate's o/u prefix"}, lambda *a: compare(*a)),  # (pred, a, b)
    OpSemantics("select", 3, "b where the i1 a holds, else c", {}, np.where),
    OpSemantics("f32", 1, "f64 -> f32, nearest even",
                {"subnormal": "f32 subnormal, or 0 below about 7e-46",
                 "large": "±inf at or past 3.4028235677973366e38 (a huge constant)",
                 "nan": "NaN"}, _f32),
    OpSemantics("row_sum", 1, "the sum of an element value over the row, in f32",
                {"large": "±inf past the type's max", "inf": "inf + -inf = NaN",
                 "nan": "NaN"}, _row_sum),
)}


def compare(pred: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`cmp` with predicate `pred` (arith.cmpf's names), elementwise."""
    if pred in ("true", "false"):
        return np.full(np.broadcast(a, b).shape, pred == "true")
    unordered = np.isnan(a) | np.isnan(b)
    if pred in ("ord", "uno"):
        return ~unordered if pred == "ord" else unordered
    rel = {"eq": np.equal, "ne": lambda x, y: (x < y) | (x > y), "gt": np.greater,
           "ge": np.greater_equal, "lt": np.less, "le": np.less_equal}[pred[1:]]
    with np.errstate(invalid="ignore"):
        ordered = rel(a, b) & ~unordered
    return ordered | unordered if pred[0] == "u" else ordered


PREDICATES = ("oeq", "ogt", "oge", "olt", "ole", "one", "ord", "ueq", "ugt", "uge", "ult", "ule",
              "une", "uno", "true", "false")


def markdown() -> str:
    """The table as docs/backends.md prints it."""
    head = "| op | meaning | " + " | ".join(CLASSES) + " |"
    rule = "|" + "---|" * (2 + len(CLASSES))
    return "\n".join([head, rule, *(op.row() for op in OPS.values())])


__all__ = ["CLASSES", "OPS", "OpSemantics", "PREDICATES", "c_pow", "compare", "markdown"]
