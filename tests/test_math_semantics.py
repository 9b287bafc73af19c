"""Every math op means the same on both targets: the semantics table, held by
the float64 interpreter, checked on LLVM and on Triton at negative, zero,
subnormal, large, infinite and NaN inputs.

Each op runs inside a real update kernel: a program that applies it to two
operands and yields finite encodings of the result (the value where finite,
and a class: 0 finite, 1 +inf, -1 -inf, 2 NaN), since a kernel refuses to
store anything non-finite. Element ops read their operands from the table
and a state array (neither is validated, so they may hold inf and NaN);
uniform ops (computed once per call: in f64 by the LLVM code, in numpy on
Triton's host) read them from hyper-parameters. The interpreter
(`mathprog.interpret`) runs the same program; the kernels must match it:
classes exactly, values bit for bit for the IEEE ops and within 2 ulps for
exp, log and pow.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "") in ("", "0") and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

import ekko  # noqa: E402
from ekko.compiler.backend import semantics  # noqa: E402
from ekko.compiler.backend.mathprog import MathProgram, interpret  # noqa: E402
from ekko.dialects import catalog  # noqa: E402
from ekko.kernels.build import update_kernel  # noqa: E402
from ekko.kernels.update import UpdateKernel  # noqa: E402

rm = ekko.rowmath
FMAX = float(np.finfo(np.float32).max)
INF, NAN = float("inf"), float("nan")
# element operands (f32): negative (odd and even integers too), zero, subnormal, ordinary,
# large (past exp's and a square's range), inf, NaN
ELEM = [-2.5, -3.0, -2.0, -1.0, -0.0, 0.0, 1e-40, -1e-40, 0.5, 1.0, 2.0, 3.0, 89.0, 1e30,
        -1e30, 3e38, INF, -INF, NAN]


def _classify(r):
    """(finite value or 0, class) with traced ops only: the outputs a kernel stores."""
    fin = abs(r) <= FMAX
    value = rm.where(fin, r, 0.0)
    klass = rm.where(r > FMAX, 1.0, rm.where(r < -FMAX, -1.0, rm.where(fin, 0.0, 2.0)))
    return value, klass


BINARY = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
          "div": lambda a, b: a / b, "pow": lambda a, b: a ** b, "max": rm.maximum,
          "min": rm.minimum, "cmp": lambda a, b: rm.where(a < b, 1.0, 0.0)}
UNARY = {"neg": lambda a: -a, "abs": abs, "sqrt": rm.sqrt, "exp": rm.exp, "log": rm.log}
INEXACT = {"exp", "log", "pow"}  # libm functions: within 2 ulps, not bit for bit


def test_the_table_covers_every_op_the_backends_lower() -> None:
    from ekko.compiler.backend import mathprog

    lowered = set(mathprog._BINARY.values()) | set(mathprog._UNARY.values()) | {"cmp", "select"}
    assert lowered == set(semantics.OPS)
    assert set(BINARY) | set(UNARY) | {"select", "f32", "row_sum"} == set(semantics.OPS)
    for op in semantics.OPS.values():
        assert op.meaning and set(op.at) <= set(semantics.CLASSES), op.name


def test_docs_print_the_table() -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "backends.md").read_text()
    assert semantics.markdown() in text


# -- the kernels ------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _scoped_catalog():
    """Optimizers a test defines are gone after it: other tests see only theirs."""
    with catalog.OPTIMIZERS.scoped():
        yield


def _define(name: str, fn, hyper: dict | None = None, state=("b",)) -> str:
    catalog.define(name, state=state, hyper=hyper or {}, replace=True)(fn)
    return name


@pytest.fixture(scope="module")
def triton_ok():
    pytest.importorskip("triton")
    return True


def _kernels(name: str, dim: int, math: MathProgram | None = None, triton: bool = True):
    """(LLVM kernel, Triton kernel or None); `math` replaces the traced program."""
    cpu = update_kernel(name, dim, threads=1)
    spec = cpu.spec if math is None else replace(cpu.spec, math=math)
    if math is not None:
        cpu = UpdateKernel(spec)
    gpu = None
    if triton:
        from ekko.kernels.triton_runtime import TritonUpdateKernel

        gpu = TritonUpdateKernel(spec)
    return spec, cpu, gpu


def _run(kernel, w: np.ndarray, states: list[np.ndarray], device: str = "cpu"):
    rows, dim = w.shape
    t = torch.from_numpy(w.copy()).to(device)
    st = [torch.from_numpy(s.copy()).to(device) for s in states]
    kernel(t, torch.arange(rows, device=device), torch.zeros(rows, dim, device=device),
           state=None if not st else st[0] if len(st) == 1 else tuple(st))
    return t.cpu().numpy(), [s.cpu().numpy() for s in st]


def _assert_matches(op: str, got: tuple, want: tuple, where: str) -> None:
    (gv, (gc,)), (wv, (wc,)) = got, want
    bad = gc != wc
    assert not bad.any(), f"{op} ({where}): class {gc[bad][:5]} where the table says " \
                          f"{wc[bad][:5]} (first at {np.argwhere(bad)[0]})"
    if op in INEXACT:
        np.testing.assert_allclose(gv, wv.astype(np.float32), rtol=2.5e-7, atol=0,
                                   err_msg=f"{op} ({where})")
    else:
        assert np.array_equal(gv, wv.astype(np.float32)), f"{op} ({where}): values differ"


def _grid(dim_values: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """w[r, c] = values[r], b[r, c] = values[c]: every ordered pair once."""
    v = np.array(dim_values, np.float32)
    return np.repeat(v[:, None], len(v), 1), np.repeat(v[None, :], len(v), 0)


@pytest.mark.parametrize("op", sorted({*BINARY, *UNARY}))
def test_element_op_matches_the_table_on_both_targets(op: str, triton_ok) -> None:
    fn = BINARY.get(op) or (lambda a, b, f=UNARY[op]: f(a))

    def math(g, w, b, *, lr):
        return _classify(fn(w, b))

    name = _define(f"sem_elem_{op}", math)
    w, b = _grid(ELEM)
    spec, cpu, gpu = _kernels(name, len(ELEM))
    want = interpret(spec.math, dict(spec.hyper), np.zeros_like(w), w, [b])
    _assert_matches(op, _run(cpu, w, [b]), want, "llvm")
    _assert_matches(op, _run(gpu, w, [b], DEVICE), want, "triton")


@pytest.mark.parametrize("pred", semantics.PREDICATES)
def test_every_comparison_predicate_on_both_targets(pred: str, triton_ok) -> None:
    """The tracer writes olt/ole/ogt/oge; IR text may hold any of arith.cmpf's 16."""
    name = _define("sem_cmp", lambda g, w, b, *, lr: _classify(rm.where(w < b, 1.0, 0.0)))
    w, b = _grid(ELEM)
    base, _, _ = _kernels(name, len(ELEM), triton=False)
    first = next(k for k, i in enumerate(base.math.instrs) if i.op == "cmp")  # w < b
    instrs = tuple(replace(i, attr=pred) if k == first else i
                   for k, i in enumerate(base.math.instrs))
    spec, cpu, gpu = _kernels(name, len(ELEM), MathProgram(instrs, base.math.outputs))
    want = interpret(spec.math, dict(spec.hyper), np.zeros_like(w), w, [b])
    expect = semantics.compare(pred, w.astype(np.float64), b.astype(np.float64))
    assert np.array_equal(want[0] == 1.0, expect)  # the interpreter reads the table
    _assert_matches(f"cmp {pred}", _run(cpu, w, [b]), want, "llvm")
    _assert_matches(f"cmp {pred}", _run(gpu, w, [b], DEVICE), want, "triton")


def test_row_sum_overflow_and_nan_on_both_targets(triton_ok) -> None:
    name = _define("sem_row_sum", lambda g, w, b, *, lr: _classify(rm.row_sum(b) + w * 0.0))
    b = np.array([[1.0, 2.0, 3.0, 4.0], [3e38, 3e38, -1.0, 0.0], [-3e38, -3e38, 0.0, 0.0],
                  [INF, -INF, 1.0, 1.0], [1e-40, 1e-40, 0.0, 0.0], [NAN, 1.0, 1.0, 1.0]],
                 np.float32)
    w = np.zeros_like(b)
    spec, cpu, gpu = _kernels(name, 4)
    want = interpret(spec.math, dict(spec.hyper), w, w, [b])
    assert list(want[1][0][:, 0]) == [0, 1, -1, 2, 0, 2]
    _assert_matches("row_sum", _run(cpu, w, [b]), want, "llvm")
    _assert_matches("row_sum", _run(gpu, w, [b], DEVICE), want, "triton")


# uniform operands (f64 hyper-parameters, any finite value; inf and NaN made from them)
UNIFORM = [-2.5, -3.0, -2.0, -0.0, 0.0, 5e-324, 1e-40, 0.5, 2.0, 3.0, 710.0, 1e300, -1e300,
           INF, -INF, NAN]


def _operand(x: float, name: str, hyper: dict):
    """A uniform operand equal to x: a hyper-parameter, or inf/NaN computed from one."""
    hyper[name] = (x if np.isfinite(x) else 1e300, -1e308, 1e308)
    if np.isfinite(x):
        return lambda kw: kw[name]
    if np.isnan(x):
        return lambda kw: kw[name] * 1e300 - kw[name] * 1e300
    return lambda kw: kw[name] * (1e300 if x > 0 else -1e300)


F64MAX = float(np.finfo(np.float64).max)


def _classify64(r):
    """A uniform (f64) result as (a value f32 can hold, class: 3 for finite past f32)."""
    fin = abs(r) <= F64MAX
    narrow = abs(r) <= FMAX
    value = rm.where(fin, rm.where(narrow, r, 1.0), 0.0)
    klass = rm.where(r > F64MAX, 1.0, rm.where(r < -F64MAX, -1.0,
                                                rm.where(fin, rm.where(narrow, 0.0, 3.0), 2.0)))
    return value, klass


@pytest.mark.parametrize("op", sorted({*BINARY, *UNARY, "f32"} - {"cmp"}))
def test_uniform_op_matches_the_table_on_both_targets(op: str, triton_ok) -> None:
    """Op k of the program works on the pair (a_k, b_k); column k of the output holds
    its result, classified in f64 (a result past f32's range shows as class 3). For
    `f32` the result is the value itself, truncated where it meets the row."""
    values = UNIFORM if op not in BINARY else UNIFORM[::2] + [-0.0, INF, NAN]
    pairs = [(a, b) for a in values for b in (values if op in BINARY else [0.0])]
    hyper: dict = {}
    operands = [(_operand(a, f"a{k}", hyper), _operand(b, f"b{k}", hyper))
                for k, (a, b) in enumerate(pairs)]
    fn = BINARY.get(op) or (lambda a, b, f=UNARY.get(op): f(a) if f else a)

    def math(g, w, col, **kw):
        value, klass = w * 0.0, w * 0.0
        for k, (fa, fb) in enumerate(operands):
            r = fn(fa(kw), fb(kw))
            here = rm.where(col > k - 0.5, rm.where(col < k + 0.5, 1.0, 0.0), 0.0) > 0.5
            if op == "f32":
                value = rm.where(here, r, value)  # f64 -> f32 here, as a kernel truncates
                continue
            v, c = _classify64(r)
            value, klass = rm.where(here, v, value), rm.where(here, c, klass)
        return _classify(value) if op == "f32" else (value, klass)

    name = _define(f"sem_uni_{op}", math, hyper, state=("col",))
    cols = np.arange(len(pairs), dtype=np.float32)[None, :]
    w = np.zeros_like(cols)
    spec, cpu, gpu = _kernels(name, len(pairs))
    want = interpret(spec.math, dict(spec.hyper), w, w, [cols])
    _assert_matches(op, _run(cpu, w, [cols]), want, "llvm")
    _assert_matches(op, _run(gpu, w, [cols], DEVICE), want, "triton")


# -- the table's promises, through the interpreter ----------------------------------------


def _eval(op: str, *args: float) -> float:
    f = semantics.OPS[op].f64
    with np.errstate(all="ignore"):
        return float(semantics.OPS["f32"].f64(f(*[np.float64(a) for a in args])))


@pytest.mark.parametrize("a,b,want", [
    (-2.0, 3.0, -8.0), (-2.0, 2.0, 4.0), (-8.0, 1 / 3, NAN), (0.0, 0.0, 1.0), (NAN, 0.0, 1.0),
    (1.0, NAN, 1.0), (0.0, -1.0, INF), (-1.0, INF, 1.0), (2.0, -INF, 0.0), (10.0, 39.0, INF),
    (-INF, 0.5, INF), (-INF, 3.0, -INF)])
def test_pow_is_c_pow(a, b, want) -> None:
    got = _eval("pow", a, b)
    assert got == want or (np.isnan(got) and np.isnan(want))


def test_the_pow_reference_is_the_c_librarys() -> None:
    """At every pair of special and ordinary values, bit for bit (zeros' signs too)."""
    import ctypes
    import ctypes.util

    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.pow.restype, libm.pow.argtypes = ctypes.c_double, [ctypes.c_double] * 2
    vals = [-INF, -3.0, -2.5, -2.0, -1.0, -0.5, -0.0, 0.0, 5e-324, 0.5, 1.0, 2.0, 3.0, 1e300,
            -1e300, INF, NAN]
    a = np.repeat(vals, len(vals))
    b = np.tile(vals, len(vals))
    with np.errstate(all="ignore"):
        got = semantics.OPS["pow"].f64(a, b)
    want = np.array([libm.pow(x, y) for x, y in zip(a, b)])
    assert np.array_equal(got.view(np.int64)[~np.isnan(want)], want.view(np.int64)[~np.isnan(want)])
    assert np.isnan(got[np.isnan(want)]).all()


def test_the_tables_other_promises() -> None:
    assert np.isnan(_eval("sqrt", -1.0)) and _eval("log", 0.0) == -INF
    assert np.isnan(_eval("log", -1.0)) and _eval("exp", 89.0) == INF
    assert np.isnan(_eval("max", NAN, 1.0)) and np.isnan(_eval("min", 1.0, NAN))
    assert _eval("f32", 1e39) == INF and _eval("f32", 1e-46) == 0.0
    assert _eval("div", 1.0, 0.0) == INF and np.isnan(_eval("div", 0.0, 0.0))
    assert _eval("mul", 1e-40, 1.0) == np.float32(1e-40)  # subnormals are kept


def test_interpret_rounds_to_f32_unless_exact() -> None:
    """Rounded, an overflowing square is inf as in a kernel; exact, it is the real number."""
    name = _define("sem_square", lambda g, w, b, *, lr: (w * w * 0.0 + b, w * w))
    spec = update_kernel(name, 1).spec
    w = np.array([[3e20]])
    assert interpret(spec.math, {"lr": 0.01}, w * 0, w, [w])[1][0][0, 0] == INF
    assert interpret(spec.math, {"lr": 0.01}, w * 0, w, [w], exact=True)[1][0][0, 0] == 9e40
    with pytest.raises(ValueError, match="state arrays"):
        interpret(spec.math, {"lr": 0.01}, w, w)
