"""The math region of a `kern.update`, read into a form every backend walks.

A `MathProgram` is the region's ops in order, each with the kind of value
it makes (see `ekko.dialects.rowmath`): `uniform` (once per call: the step,
hyper-parameters and math on them), `row` (once per row: rowwise state,
`kern.row_sum`) or `elem` (once per element). Backends lower it op by op:
uniform values before any loop, row values between loops over the row,
element values inside them. `stage` counts the reductions a value waits
for, which tells a backend how many passes over the row it needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from xdsl.dialects import arith, math
from xdsl.dialects.builtin import Float64Type, FloatAttr
from xdsl.ir import Block, SSAValue

from ...dialects import catalog, kern, mathregion
from . import semantics

_BINARY = {arith.AddfOp: "add", arith.SubfOp: "sub", arith.MulfOp: "mul", arith.DivfOp: "div",
           arith.MaximumfOp: "max", arith.MinimumfOp: "min", math.PowFOp: "pow"}
_UNARY = {arith.NegfOp: "neg", math.SqrtOp: "sqrt", math.AbsFOp: "abs", math.ExpOp: "exp",
          math.LogOp: "log", arith.TruncFOp: "f32", mathregion.RowSumOp: "row_sum"}
KINDS = ("uniform", "row", "elem")


@dataclass(frozen=True)
class Instr:
    """One value: `op` applied to earlier values `args`.

    op: arg (attr = the argument's name), const (attr = value), add, sub,
    mul, div, max, min, pow, neg, sqrt, abs, exp, log, f32 (f64 -> f32),
    row_sum, cmp (attr = olt/ole/ogt/oge/oeq/one/...), select (cond, a, b).
    """

    op: str
    args: tuple[int, ...]
    attr: str | float
    kind: str
    stage: int
    f64: bool  # an f64 value (only uniform values are)
    boolean: bool = False


@dataclass(frozen=True)
class MathProgram:
    instrs: tuple[Instr, ...]
    outputs: tuple[int, ...]  # the new weights, then the new state, catalog order

    def text(self) -> str:
        """A stable text form (part of a kernel's cache key)."""
        return ";".join(f"{i.op}({','.join(map(str, i.args))}){i.attr!r}:{i.kind}"
                        for i in self.instrs) + f"->{self.outputs}"

    @property
    def stages(self) -> int:
        """Reductions on the longest chain: passes over the row before the last."""
        return max((i.stage for i in self.instrs), default=0)


def program_of(op: kern.UpdateOp) -> MathProgram:
    """Read `op`'s math region (already verified) as a MathProgram."""
    return read_block(op.math_block(), op.entry, catalog.math_args(op.entry, op.flat()))


def trace_program(opt: catalog.Optimizer, attributes: Mapping[str, object],
                  dim: int) -> MathProgram:
    """The catalog's math for `opt` (after the gradient transforms named in
    `attributes`) traced afresh, as lower-to-kernel would write it."""
    names = catalog.math_args(opt, dict(attributes))  # type: ignore[arg-type]
    return read_block(catalog.math_region(opt, dict(attributes), dim).block,  # type: ignore[arg-type]
                      opt, names)


def read_block(block: Block, opt: catalog.Optimizer, names: Sequence[str]) -> MathProgram:
    """A verified math region's block (arguments named `names`, as
    `catalog.math_args` lists them) as a MathProgram for optimizer `opt`."""
    row_states = {s.name for s in opt.states if s.rowwise}
    index: dict[SSAValue, int] = {}
    instrs: list[Instr] = []

    def add(value: SSAValue, instr: Instr) -> None:
        index[value] = len(instrs)
        instrs.append(instr)

    for arg, name in zip(block.args, names):
        kind = "elem" if name in ("g", "w") else "row" if name in row_states else (
            "elem" if name in opt.state_names else "uniform")
        add(arg, Instr("arg", (), name, kind, 0, isinstance(arg.type, Float64Type)))
    outputs: tuple[int, ...] = ()
    for inner in block.ops:
        if isinstance(inner, mathregion.YieldOp):
            outputs = tuple(index[v] for v in inner.operands)
            continue
        args = tuple(index[v] for v in inner.operands)
        deps = [instrs[a] for a in args]
        kind = max((d.kind for d in deps), key=KINDS.index, default="uniform")
        stage = max((d.stage for d in deps), default=0)
        result = inner.results[0]
        f64 = isinstance(result.type, Float64Type)
        if isinstance(inner, arith.ConstantOp):
            value = inner.value
            assert isinstance(value, FloatAttr)
            add(result, Instr("const", (), float(value.value.data), "uniform", 0, f64))
        elif isinstance(inner, mathregion.RowSumOp):
            add(result, Instr("row_sum", args, "", "row", stage + 1, False))
        elif type(inner) in _BINARY:
            add(result, Instr(_BINARY[type(inner)], args, "", kind, stage, f64))
        elif type(inner) in _UNARY:
            add(result, Instr(_UNARY[type(inner)], args, "", kind, stage, f64))
        elif isinstance(inner, arith.CmpfOp):
            pred = arith.CMPF_COMPARISON_OPERATIONS[inner.predicate.value.data]
            add(result, Instr("cmp", args, pred, kind, stage, False, True))
        elif isinstance(inner, arith.SelectOp):
            add(result, Instr("select", args, "", kind, stage, f64))
        else:  # the verifier admits nothing else
            raise ValueError(f"'{inner.name}' cannot be lowered from a math region")
    return MathProgram(tuple(instrs), outputs)


def interpret(program: MathProgram, hyper: Mapping[str, float], g: np.ndarray, w: np.ndarray,
              state: Sequence[np.ndarray] | Mapping[str, np.ndarray] = (), step: int = 1, *,
              exact: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    """Run `program` on whole rows in float64: the reference both backends are held to.

    g and w are (rows, dim) arrays (the summed gradient and the weights as
    f32 values), `state` the optimizer's state in catalog order (or by
    name): (rows, dim) per element, (rows,) per row. `hyper` maps every
    hyper-parameter the program reads to its value (`dict(spec.hyper)`).
    Each op is computed in float64 with `semantics.OPS`; unless `exact`,
    each value the program types f32 is then rounded to f32, so ranges,
    overflow and underflow are the kernel's (a huge constant or an
    overflowing square is inf, as on both targets) and the results differ
    from a backend's only by the rounding freedoms the table names. With
    `exact` every value stays float64 (the real-number math, for error
    bounds). Returns the new weights (rows, dim) and the new state arrays,
    all float64; nothing is stored or rounded to the table's dtype.
    """
    vals = evaluate(program, hyper, g, w, state, step, exact=exact)
    rows, dim = np.shape(g)
    outs = [vals[o] for o in program.outputs]
    new_w = np.broadcast_to(outs[0], (rows, dim)).astype(np.float64)
    new_state = [np.broadcast_to(x, (rows, 1) if i.kind == "row" else (rows, dim)).astype(
        np.float64).reshape((rows,) if i.kind == "row" else (rows, dim))
        for x, i in zip(outs[1:], state_args(program))]
    return new_w, new_state


def state_args(program: MathProgram) -> list[Instr]:
    """The program's state arguments, in catalog order."""
    return [i for i in program.instrs if i.op == "arg" and i.kind != "uniform"
            and i.attr not in ("g", "w")]


def evaluate(program: MathProgram, hyper: Mapping[str, float], g: np.ndarray, w: np.ndarray,
             state: Sequence[np.ndarray] | Mapping[str, np.ndarray] = (), step: int = 1, *,
             exact: bool = False) -> list[np.ndarray]:
    """Every value of `program`, one array per instruction, as `interpret` computes
    them: uniform values are scalars, row values (rows, 1), element values
    (rows, dim) (callers that track more than the value walk these)."""
    g, w = (np.asarray(x, np.float64) for x in (g, w))
    if g.ndim != 2 or g.shape != w.shape:
        raise ValueError(f"g and w must be (rows, dim) arrays of one shape, got {g.shape}, {w.shape}")
    rows, dim = g.shape
    states = state_args(program)
    given = [state[str(i.attr)] for i in states] if isinstance(state, Mapping) else list(state)
    if len(given) != len(states):
        raise ValueError(f"the program reads {len(states)} state arrays, got {len(given)}")
    inputs = {"g": g, "w": w, **{str(i.attr): np.asarray(x, np.float64).reshape(
        (rows, 1) if i.kind == "row" else (rows, dim)) for i, x in zip(states, given)}}

    def typed(x: np.ndarray, ins: Instr) -> np.ndarray:
        return x if exact or ins.f64 or ins.boolean else semantics.OPS["f32"].f64(x)

    vals: list[np.ndarray] = []
    with np.errstate(all="ignore"):
        for ins in program.instrs:
            if ins.op == "arg":
                name = str(ins.attr)
                if name not in inputs and name != "step" and name not in hyper:
                    raise ValueError(f"no value for the hyper-parameter {name!r}")
                x = np.float64(step) if name == "step" else (
                    inputs[name] if name in inputs else np.float64(hyper[name]))
                vals.append(typed(np.asarray(x, np.float64), ins))
            elif ins.op == "const":
                vals.append(typed(np.asarray(float(ins.attr), np.float64), ins))
            elif ins.op == "f32" and exact:
                vals.append(vals[ins.args[0]])
            else:
                args = [vals[a] for a in ins.args]
                if ins.op == "cmp":
                    args = [str(ins.attr), *args]
                vals.append(typed(np.asarray(semantics.OPS[ins.op].f64(*args)), ins))
    return vals
