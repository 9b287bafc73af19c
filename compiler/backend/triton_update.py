"""Triton source for a fused sparse update (an UpdateSpec).

The generated module (readable Python using `triton.language`) holds:

  uniforms(step)
      The math region's uniform values for one call (the step,
      hyper-parameters and math on them, like Adam's bias correction),
      computed on the host in f64 and truncated to f32 where the program
      says so, exactly as the LLVM backend computes them once per call.

  ekko_update_sum
      One program per unique id that occurs more than once: the sum of its
      gradient rows in `acc`. The runtime sorts the ids stably first
      (`perm`, `starts`, `counts`), so a program reads its rows in input
      order, CHUNK rows a step, and adds each chunk as a fixed-shape tree:
      the same bits run after run (there are no atomics anywhere).

  ekko_update_check
      The apply's loads and math without its stores: per unique id, the
      first buffer whose new value would not be finite, or -1 (`bad`). The
      runtime launches the apply only when every row is -1.

  ekko_update_apply
      One program per BLOCK_ROWS unique ids, over a [BLOCK_ROWS, BLOCK_DIM]
      tile (BLOCK_DIM >= dim: the whole row, so each row is read and written
      once): the summed gradient (in place in the delta for an id seen once,
      else from `acc`), the math region lowered op by op (element values are
      2-D tiles, row values 1-D, `row_sum` a masked `tl.sum` over the row,
      uniform values scalars read from the host's `uni`), the store in the table dtype
      (nearest-even, or stochastic rounding with the LLVM backend's
      counter-based bits of (seed, row, col)), the serving row re-made from
      the stored values, the version stamp, all inside the row's sequence
      word when one is given.

Block sizes and warps come from upd-schedule (`block_rows`, `num_warps`).
Nothing here is specific to an optimizer: the math is the spec's program.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import mathprog, triton_codecs
from .spec import UpdateSpec



@dataclass(frozen=True)
class KernelDecl:
    """One @triton.jit kernel of a generated module: what triton.compile needs."""

    name: str
    signature: tuple[tuple[str, str], ...]  # (argument, Triton type), constexprs as "constexpr"
    constexprs: tuple[tuple[str, object], ...] = ()


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def block_dim(dim: int) -> int:
    """The tile's width: the whole row, a power of two, at least 2 (int4 pairs columns)."""
    return max(2, next_pow2(dim))


GPU_TILE = 2048  # values per Triton program: 16 a thread at 4 warps


def gpu_schedule(dim: int) -> tuple[int, int]:
    """(block_rows, num_warps) of a Triton update over [block_rows, whole row] tiles."""
    width = max(2, 1 << max(0, (dim - 1).bit_length()))
    rows = max(1, min(64, GPU_TILE // width))
    return rows, 4 if rows * width <= 4096 else 8


def gpu_launch(dim: int) -> dict[str, int]:
    """The Triton target's launch settings (`Target.launch`), as upd-schedule writes them."""
    rows, warps = gpu_schedule(dim)
    return {"block_rows": rows, "num_warps": warps}


def schedule(spec: UpdateSpec) -> tuple[int, int]:
    """(block_rows, num_warps): upd-schedule's choice, or its default for the dim."""
    rows, warps = gpu_schedule(spec.dim)
    return spec.block_rows or rows, spec.num_warps or warps


def seg_chunk(dim: int) -> int:
    """Rows of one id the sum kernel adds per step (a [CHUNK, BLOCK_DIM] tile)."""
    return max(1, min(16, 4096 // block_dim(dim)))


# -- helpers shared by the generated modules ---------------------------------

HELPERS = '''
@triton.jit
def _rand_bits(seed, row, col, MASK: tl.constexpr):
    """Counter-based bits of (seed, row, col): the LLVM backend's splitmix64 finalizer."""
    h = (seed.to(tl.uint64) * 0x9E3779B97F4A7C15) ^ (row.to(tl.uint64) * 0xBF58476D1CE4E5B9)
    h = h ^ (col.to(tl.uint64) * 0x94D049BB133111EB)
    h = h ^ (h >> 31)
    h = h * 0xD6E8FEB86659FD93
    h = h ^ (h >> 32)
    return (h & MASK).to(tl.uint32)


@triton.jit
def _from_bf16(bits):
    """bf16 bits (int16) -> f32."""
    return (bits.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _to_bf16(x):
    """f32 -> bf16 bits (int16), nearest-even."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
    # a NaN stays a quiet NaN: the add carries a NaN with a full mantissa (the GPU's
    # 0x7FFFFFFF) into the sign bit, which would make it -0.0
    rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)
    return rounded.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _to_bf16_sr(x, rnd):
    """f32 -> bf16 bits (int16), stochastic: add 16 random bits, truncate."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = tl.where(x != x, (bits >> 16) | 0x40, (bits + rnd) >> 16)  # NaN: as _to_bf16
    return rounded.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _to_f16_sr(x, rnd):
    """f32 -> f16, stochastic: add 13 random bits below f16's mantissa, truncate."""
    bits = (x.to(tl.uint32, bitcast=True) + rnd) & 0xFFFFE000
    return bits.to(tl.float32, bitcast=True).to(tl.float16)


@triton.jit
def _rint(x):
    """Round to nearest even for |x| < 2**22 (quantization codes): the 1.5 * 2**23 trick."""
    return (x + 12582912.0) - 12582912.0
'''


# -- the host side: uniform values ---------------------------------------------

_NP_BINARY = {"add": "{0} + {1}", "sub": "{0} - {1}", "mul": "{0} * {1}", "div": "{0} / {1}",
              "max": "np.maximum({0}, {1})", "min": "np.minimum({0}, {1})",
              "pow": "_c_pow({0}, {1})"}  # numpy's scalar power takes x ** 0.5 as sqrt
_NP_UNARY = {"neg": "-{0}", "sqrt": "np.sqrt({0})", "abs": "np.abs({0})", "exp": "np.exp({0})",
             "log": "np.log({0})", "f32": "np.float32({0})"}
_NP_CMP = {"oeq": "{0} == {1}", "one": "({0} < {1} or {0} > {1})", "ogt": "{0} > {1}",
           "oge": "{0} >= {1}", "olt": "{0} < {1}", "ole": "{0} <= {1}",
           "ueq": "not ({0} < {1} or {0} > {1})", "une": "{0} != {1}",
           "ugt": "not ({0} <= {1})", "uge": "not ({0} < {1})", "ult": "not ({0} >= {1})",
           "ule": "not ({0} > {1})", "ord": "({0} == {0} and {1} == {1})",
           "uno": "({0} != {0} or {1} != {1})", "true": "True", "false": "False"}


def kernel_uniforms(prog: mathprog.MathProgram) -> list[int]:
    """Uniform values the kernel reads: operands of row/element values, and outputs."""
    used = {a for ins in prog.instrs if ins.kind != "uniform" for a in ins.args}
    used |= set(prog.outputs)
    return [i for i in sorted(used) if prog.instrs[i].kind == "uniform"]


def emit_uniforms(spec: UpdateSpec) -> str:
    """`uniforms(step)`: the region's uniform values, op by op, in numpy scalars."""
    prog = spec.math
    hyper = dict(spec.hyper)
    lines = ["def uniforms(step):",
             '    """The math region\'s uniform values for one call, in kernel argument order."""',
             '    with np.errstate(all="ignore"):']
    for i, ins in enumerate(prog.instrs):
        if ins.kind != "uniform":
            continue
        t = "np.float64" if ins.f64 else "np.float32"
        x = [f"v{a}" for a in ins.args]
        if ins.op == "arg":
            value = "step" if ins.attr == "step" else repr(float(hyper[str(ins.attr)]))
            expr = f"np.float64({value})"
            note = f"  # {ins.attr}"
        elif ins.op == "const":
            expr, note = f"{t}({float(ins.attr)!r})", ""
        elif ins.op in _NP_BINARY:
            expr, note = f"{t}({_NP_BINARY[ins.op].format(*x)})", ""
        elif ins.op == "f32":
            expr, note = f"np.float32({x[0]})", ""
        elif ins.op in _NP_UNARY:
            expr, note = f"{t}({_NP_UNARY[ins.op].format(*x)})", ""
        elif ins.op == "cmp":
            expr, note = f"bool({_NP_CMP[str(ins.attr)].format(*x)})", f"  # {ins.attr}"
        elif ins.op == "select":
            expr, note = f"({x[1]} if {x[0]} else {x[2]})", ""
        else:
            raise ValueError(f"'{ins.op}' is not a uniform operation")
        lines.append(f"        v{i} = {expr}{note}")
    outs = [f"float(v{i})" for i in kernel_uniforms(prog)]
    lines.append(f"    return [{', '.join(outs)}]  # the kernel's uni[0], uni[1], ...")
    return "\n".join(lines) + "\n"


def uniform_loads(prog: mathprog.MathProgram) -> list[str]:
    """The kernel reads the uniform values from `uni` (f64: some regions compute in f64)."""
    out = []
    for j, i in enumerate(kernel_uniforms(prog)):
        ins = prog.instrs[i]
        conv = " != 0" if ins.boolean else ("" if ins.f64 else ".to(tl.float32)")
        out.append(f"u{i} = tl.load(uni + {j}){conv}")
    return out


# -- the kernel side: the tile --------------------------------------------------

# the meaning of each op is semantics.OPS's; where Triton's own function differs
# (exp/log approximate on a GPU, ** as exp2(y * log2 x)) the f32 op goes through f64
_TL_BINARY = {"add": "{0} + {1}", "sub": "{0} - {1}", "mul": "{0} * {1}",
              "div": "tl.math.div_rn({0}, {1})",
              "max": "tl.where({0} != {0}, {0}, tl.where({0} > {1}, {0}, {1}))",
              "min": "tl.where({0} != {0}, {0}, tl.where({0} < {1}, {0}, {1}))",
              "pow": "_pow({0}, {1})"}
_TL_UNARY = {"neg": "-{0}", "sqrt": "tl.math.sqrt_rn({0})", "abs": "tl.abs({0})",
             "exp": "tl.exp({0}.to(tl.float64)).to(tl.float32)",
             "log": "tl.log({0}.to(tl.float64)).to(tl.float32)", "f32": "{0}.to(tl.float32)"}
_TL_CMP = {"oeq": "{0} == {1}", "one": "(({0} < {1}) | ({0} > {1}))", "ogt": "{0} > {1}",
           "oge": "{0} >= {1}", "olt": "{0} < {1}", "ole": "{0} <= {1}",
           "ueq": "~(({0} < {1}) | ({0} > {1}))", "une": "{0} != {1}",
           "ugt": "~({0} <= {1})", "uge": "~({0} < {1})", "ult": "~({0} >= {1})",
           "ule": "~({0} > {1})", "ord": "tl.where({0} == {0}, {1} == {1}, False)",
           "uno": "tl.where({0} != {0}, True, {1} != {1})",
           "true": "(({0} == {0}) | ({0} != {0}))", "false": "(({0} != {0}) & ({0} == {0}))"}

POW = '''
@triton.jit
def _pow(x, y):
    """x ** y as C's powf (semantics.OPS["pow"]), for f32 x and y.

    |x| ** y as exp2(y * log2 |x|) in f64 (within an ulp once rounded to
    f32, overflow and subnormals included), then C's special cases: a
    negative base with an integer exponent keeps its sign when the exponent
    is odd, and with a finite non-integer one gives NaN; x ** 0 = 1 and
    1 ** y = 1 (NaN too); (-1) ** +-inf = 1.
    """
    # one shape for the masks below, and f32 (a constant operand can arrive as f64)
    x, y = tl.where(y == y, x, x).to(tl.float32), tl.where(x == x, y, y).to(tl.float32)
    ax = tl.abs(x).to(tl.float64)
    r = tl.exp2(y.to(tl.float64) * tl.log2(ax)).to(tl.float32)
    integral = tl.floor(y) == y
    half = tl.floor(y) * 0.5
    odd = integral & (tl.abs(y) < 16777216.0) & (tl.floor(half) != half)
    negative = (x.to(tl.uint32, bitcast=True) >> 31) == 1  # -0 included, as C's pow
    r = tl.where(negative & odd, -r, r)
    finite = (tl.abs(x) < float("inf")) & (tl.abs(y) < float("inf"))
    r = tl.where((x < 0.0) & finite & ~integral, float("nan"), r)
    one = (y == 0.0) | (x == 1.0) | ((x == -1.0) & (tl.abs(y) == float("inf")))
    return tl.where(one, 1.0, r)
'''


class _Tile:
    """Names of the program's values inside the apply kernel, shaped for their kind."""

    def __init__(self, prog: mathprog.MathProgram):
        self.prog = prog

    def ref(self, i: int, kind: str) -> str:
        """Value i as an operand of a `kind` value: row values broadcast over the row."""
        ins = self.prog.instrs[i]
        if ins.kind == "uniform":
            return f"u{i}"
        if ins.kind == "row" and kind == "elem":
            return f"v{i}[:, None]"
        return f"v{i}"

    def full(self, i: int, kind: str) -> str:
        """Value i broadcast to a whole `kind` value (for stores)."""
        ins = self.prog.instrs[i]
        shape = "[BLOCK_ROWS, BLOCK_DIM]" if kind == "elem" else "[BLOCK_ROWS]"
        if ins.kind == kind:
            return f"v{i}"
        return f"(tl.zeros({shape}, tl.float32) + {self.ref(i, kind)})"


def _lower(prog: mathprog.MathProgram, spec: UpdateSpec, tile: _Tile) -> list[str]:
    """The row and element values of the program, one Triton statement each."""
    names = {i: str(ins.attr) for i, ins in enumerate(prog.instrs) if ins.op == "arg"}
    state_ix = {s.name: k for k, s in enumerate(spec.states)}
    out: list[str] = []
    for i, ins in enumerate(prog.instrs):
        if ins.kind == "uniform":
            continue
        x = [tile.ref(a, ins.kind) for a in ins.args]
        if ins.op == "arg":
            name = names[i]
            if name == "g":
                out.append(f"v{i} = g  # g: the summed gradient")
            elif name == "w":
                out.append(f"v{i} = w  # w: the weights as f32")
            elif ins.kind == "row":
                out.append(f"v{i} = tl.load(state{state_ix[name]} + rid, mask=rmask, other=0.0)"
                           f"  # {name} (rowwise state)")
            else:
                out.append(f"v{i} = tl.load(state{state_ix[name]} + at, mask=mask, other=0.0)"
                           f"  # {name}")
        elif ins.op == "row_sum":
            arg = tile.ref(ins.args[0], "elem")
            out.append(f"v{i} = tl.sum(tl.where(mask, {arg}, 0.0), axis=1)  # row_sum")
        elif ins.op in _TL_BINARY:
            out.append(f"v{i} = {_TL_BINARY[ins.op].format(*x)}  # {ins.op}")
        elif ins.op in _TL_UNARY:
            out.append(f"v{i} = {_TL_UNARY[ins.op].format(*x)}  # {ins.op}")
        elif ins.op == "cmp":
            out.append(f"v{i} = {_TL_CMP[str(ins.attr)].format(*x)}  # cmp {ins.attr}")
        elif ins.op == "select":
            out.append(f"v{i} = tl.where({x[0]}, {x[1]}, {x[2]})  # select")
        else:
            raise ValueError(f"'{ins.op}' cannot be lowered to Triton")
    return out


def _load_w(dtype: str) -> str:
    if dtype == "f32":
        return "w = tl.load(table + at, mask=mask, other=0.0)"
    if dtype == "f16":
        return "w = tl.load(table + at, mask=mask, other=0.0).to(tl.float32)"
    return "w = _from_bf16(tl.load(table + at, mask=mask, other=0))"


def _store_w(spec: UpdateSpec) -> list[str]:
    """Store the new weights in the table dtype; `stored` is what was stored, as f32."""
    d = spec.table_dtype
    if d == "f32":
        return ["tl.store(table + at, w_new, mask=mask)", "stored = w_new"]
    rnd = []
    if spec.stochastic_rounding:
        mask = "0xFFFF" if d == "bf16" else "0x1FFF"
        rnd = [f"rnd = _rand_bits(seed, rid[:, None], cols[None, :], {mask})"]
    if d == "f16":
        conv = "_to_f16_sr(w_new, rnd)" if spec.stochastic_rounding else "w_new.to(tl.float16)"
        return [*rnd, f"w_low = {conv}", "tl.store(table + at, w_low, mask=mask)",
                "stored = w_low.to(tl.float32)"]
    conv = "_to_bf16_sr(w_new, rnd)" if spec.stochastic_rounding else "_to_bf16(w_new)"
    return [*rnd, f"w_low = {conv}", "tl.store(table + at, w_low, mask=mask)",
            "stored = _from_bf16(w_low)"]


def apply_args(spec: UpdateSpec) -> list[tuple[str, str]]:
    """(name, Triton type) of the apply kernel's arguments, in calling order."""
    args = [("uids", "*i64"), ("srcs", "*i64"), ("acc", "*fp32"), ("grads", "*fp32"),
            ("count", "i64"), ("table", triton_codecs.ptr(spec.table_dtype))]
    args += [(f"state{k}", "*fp32") for k in range(len(spec.states))]
    args += [("serving", triton_codecs.ptr(spec.serving) if spec.serving else "*fp32"),
             ("versions", "*i64"), ("seq", "*i32"), ("version", "i64"), ("seed", "i64")]
    args.append(("uni", "*fp64"))
    return args + [("HAS_VERSIONS", "constexpr"), ("HAS_SEQ", "constexpr")]


def check_args(spec: UpdateSpec) -> list[tuple[str, str]]:
    """(name, Triton type) of the check kernel's arguments: the apply's inputs, then `bad`."""
    skip = {"serving", "versions", "seq", "version", "HAS_VERSIONS", "HAS_SEQ"}
    return [a for a in apply_args(spec) if a[0] not in skip] + [("bad", "*i32")]


def _prologue(spec: UpdateSpec, tile: _Tile) -> list[str]:
    """Load a tile of unique rows and run the math region: up to `w_new` (no store)."""
    prog = spec.math
    return [
        "k = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)",
        "rmask = k < count",
        "cols = tl.arange(0, BLOCK_DIM)",
        "mask = rmask[:, None] & (cols < DIM)[None, :]",
        *uniform_loads(prog),
        "rid = tl.load(uids + k, mask=rmask, other=0)",
        "at = rid[:, None] * DIM + cols[None, :]",
        "# the summed gradient: in place in the delta for an id seen once, else from acc",
        "src = tl.load(srcs + k, mask=rmask, other=-1)",
        "once = (src >= 0)[:, None]",
        "g_once = tl.load(grads + src[:, None] * DIM + cols[None, :], mask=mask & once, other=0.0)",
        "g_sum = tl.load(acc + k[:, None] * DIM + cols[None, :], mask=mask & ~once, other=0.0)",
        "g = tl.where(once, g_once, g_sum)",
        _load_w(spec.table_dtype),
        "# the math region, op by op",
        *_lower(prog, spec, tile),
        f"w_new = {tile.full(prog.outputs[0], 'elem')}",
    ]


def _function(name: str, args: list[tuple[str, str]], doc: str, body: list[str]) -> str:
    params = ", ".join(n + (": tl.constexpr" if t == "constexpr" else "") for n, t in args)
    return (f"@triton.jit\ndef {name}({params}):\n    \"\"\"{doc}\"\"\"\n"
            + "".join(f"    {line}\n" for line in body))


def emit_apply(spec: UpdateSpec) -> str:
    prog = spec.math
    tile = _Tile(prog)
    body = [
        *_prologue(spec, tile),
        "# every value first: the stores come last, inside the row's sequence word",
        "if HAS_SEQ:",
        "    tl.atomic_add(seq + rid, 1, mask=rmask, sem='acq_rel')  # odd: being written",
        "    tl.debug_barrier()",
    ]
    for k, (state, out) in enumerate(zip(spec.states, prog.outputs[1:])):
        if state.rowwise:
            body.append(f"tl.store(state{k} + rid, {tile.full(out, 'row')}, mask=rmask)"
                        f"  # {state.name}")
        else:
            body.append(f"tl.store(state{k} + at, {tile.full(out, 'elem')}, mask=mask)"
                        f"  # {state.name}")
    body += _store_w(spec)
    if spec.serving is not None:
        body += triton_codecs.encode(spec.serving)
    if spec.versions:
        body += ["if HAS_VERSIONS:", "    tl.store(versions + rid, version, mask=rmask)"]
    body += ["if HAS_SEQ:", "    tl.debug_barrier()",
             "    tl.atomic_add(seq + rid, 1, mask=rmask, sem='release')  # even: whole again"]
    return _function("ekko_update_apply", apply_args(spec),
                     "Apply the math to BLOCK_ROWS unique ids; store, refresh, stamp.", body)


def _rounded_w(spec: UpdateSpec) -> list[str]:
    """`w_low` (the new weights in the table dtype) and `stored` (it as f32), not stored."""
    return [line for line in _store_w(spec) if not line.startswith("tl.store(")]


def _serving_bad(spec: UpdateSpec) -> list[str]:
    """`srv_bad`: per row, the serving row re-made from `stored` would not be finite."""
    return triton_codecs.encode_bad(spec.serving, spec.table_dtype)


def emit_check(spec: UpdateSpec) -> str:
    """`ekko_update_check`: what the apply would store, checked; it stores only `bad`.

    bad[k] is -1 when every value unique row k would get is finite, else the
    first buffer that would hold inf or NaN (0 the table, 1 + j state j,
    1 + states the serving row), with the meaning of the CPU's checks
    (llvm_update.Commit). The runtime launches the apply only when no row
    is bad, so a refused call writes nothing at all."""
    prog = spec.math
    tile = _Tile(prog)
    checks = []  # (buffer index, per-row i1 expression), in buffer order
    dtype_bits = {"f32": None, "f16": "0x7C00", "bf16": "0x7F80"}[spec.table_dtype]
    body = [*_prologue(spec, tile), *_rounded_w(spec)]
    if dtype_bits is None:
        checks.append((0, "_row_any(_nonfinite(w_new), mask)"))
    else:
        checks.append((0, f"_row_any(_nonfinite16(w_low, {dtype_bits}), mask)"))
    for j, (state, out) in enumerate(zip(spec.states, prog.outputs[1:])):
        if state.rowwise:
            checks.append((1 + j, f"_nonfinite({tile.full(out, 'row')})"))
        else:
            checks.append((1 + j, f"_row_any(_nonfinite({tile.full(out, 'elem')}), mask)"))
    serving = _serving_bad(spec) if spec.serving is not None else []
    if serving:
        body += serving
        checks.append((1 + len(spec.states), "srv_bad"))
    body.append("code = tl.full([BLOCK_ROWS], -1, tl.int32)")
    for index, expr in reversed(checks):  # the first bad buffer wins
        body.append(f"code = tl.where({expr}, {index}, code)")
    body.append("tl.store(bad + k, code, mask=rmask)")
    return _function("ekko_update_check", check_args(spec),
                     "Which buffer of each of BLOCK_ROWS unique ids would not be finite.", body)


CHECK_HELPERS = '''
@triton.jit
def _nonfinite(x):
    """f32 inf or NaN: the exponent bits all ones (bits, not float compares)."""
    return (x.to(tl.uint32, bitcast=True) & 0x7F800000) == 0x7F800000


@triton.jit
def _nonfinite16(x, EXP: tl.constexpr):
    """An f16 (EXP 0x7C00) or bf16-bits (EXP 0x7F80) value is inf or NaN."""
    return (x.to(tl.uint16, bitcast=True) & EXP) == EXP


@triton.jit
def _row_any(flags, mask):
    """Per row: any flag set among the row's valid columns."""
    return tl.max(tl.where(mask, flags, False).to(tl.int32), axis=1) != 0
'''


SUM_ARGS = (("grads", "*fp32"), ("perm", "*i64"), ("starts", "*i64"), ("counts", "*i64"),
            ("multi", "*i64"), ("acc", "*fp32"))

SUM_KERNEL = '''
@triton.jit
def ekko_update_sum(grads, perm, starts, counts, multi, acc):
    """acc[k] = the sum of the gradient rows of unique id k (one that occurs more than once).

    perm lists the delta positions stably sorted by id, so the rows are read
    in input order, CHUNK at a time; each chunk is added as a fixed-shape tree.
    """
    k = tl.load(multi + tl.program_id(0))
    start = tl.load(starts + k)
    n = tl.load(counts + k)
    cols = tl.arange(0, BLOCK_DIM)
    cmask = cols < DIM
    total = tl.zeros([BLOCK_DIM], tl.float32)
    for c in range(0, n, CHUNK):
        pos = c + tl.arange(0, CHUNK)
        pm = pos < n
        src = tl.load(perm + start + pos, mask=pm, other=0)
        rows = tl.load(grads + src[:, None] * DIM + cols[None, :],
                       mask=pm[:, None] & cmask[None, :], other=0.0)
        total += tl.sum(rows, axis=0)
    tl.store(acc + k * DIM + cols, total, mask=cmask)
'''


def kernels(spec: UpdateSpec) -> tuple[KernelDecl, ...]:
    """The kernels of the generated module, with their compile-time arguments."""
    flags = (("HAS_VERSIONS", spec.versions), ("HAS_SEQ", True))
    return (KernelDecl("ekko_update_sum", SUM_ARGS),
            KernelDecl("ekko_update_check", tuple(check_args(spec))),
            KernelDecl("ekko_update_apply", tuple(apply_args(spec)), flags))


def emit_update(spec: UpdateSpec) -> str:
    """The Triton module (Python source) of one fused update."""
    rows, warps = schedule(spec)
    layout = f", serving {spec.serving}" if spec.serving else ""
    header = [
        f'"""ekko fused update: {spec.optimizer}, dim {spec.dim}, {spec.table_dtype} table{layout}.',
        "",
        "Generated by ekko.compiler.backend.triton_update from the kern.update op;",
        'the math below is its region, lowered op by op."""',
        "import numpy as np",
        "import triton",
        "import triton.language as tl",
        "",
        "from ekko.compiler.backend.semantics import c_pow as _c_pow",
        "",
        f"DIM = tl.constexpr({spec.dim})",
        f"BLOCK_DIM = tl.constexpr({block_dim(spec.dim)})  # the whole row",
        f"BLOCK_ROWS = tl.constexpr({rows})  # unique ids per program (upd-schedule)",
        f"NUM_WARPS = {warps}",
        f"CHUNK = tl.constexpr({seg_chunk(spec.dim)})  # rows per step of the duplicate sum",
    ]
    if spec.serving is not None:
        header += triton_codecs.constants(spec.serving, spec.dim)
    pow_used = any(i.op == "pow" and i.kind != "uniform" for i in spec.math.instrs)
    return "\n".join([
        "\n".join(header), "", emit_uniforms(spec), HELPERS, CHECK_HELPERS,
        triton_codecs.helpers(spec.serving, encoding=True),
        POW if pow_used else "", SUM_KERNEL, "", emit_check(spec), "", emit_apply(spec)])
