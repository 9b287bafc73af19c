"""`api` cases whose outputs may overflow: user optimizers with random math, and
row-wise quantized packets (int8, int4, fp8) whose finite scale and bias decode to inf.

* `user` cases define an optimizer with `@ekko.optimizer` from a random
  expression tree (division, sqrt, `**`, log, exp, abs, min/max, where,
  row_mean; constants up to 1e39, which is inf as f32) and apply one valid
  delta (finite, possibly huge gradients; a table possibly near its dtype's
  max; state possibly negative) on the LLVM target or, now and then, the
  Triton one (in its interpreter).
* `merge` cases merge a packet of rows of a quantized layout with random scale
  and bias magnitudes into a replica.

The oracle (issue #17): either the call succeeds and every buffer is finite
(the table in its dtype, the state, the serving copy decoded), or it raises
one `ekko.EkkoError` that names the row and the buffer (an update: the
`NonFiniteOutputError`; a merge: the packet row) and every buffer is
byte-identical to before. No other error is acceptable: the calls are valid.
"""

from __future__ import annotations

import random
import traceback
from typing import Any

LEAVES = ("g", "w", "s")
CONSTS = (0.0, 1.0, -1.0, 0.5, 2.0, 3.0, 1e-3, 88.0, 1e30, 1e39, -1e39)
UNARY = ("neg", "abs", "sqrt", "log", "exp")
BINARY = ("add", "sub", "mul", "div", "pow", "max", "min")
SCALE = {"f32": [1.0, 1.0, 1e30, 3e38], "f16": [1.0, 1.0, 6e4], "bf16": [1.0, 1.0, 3e38]}
MAX = {"f32": 3.4e38, "f16": 65000.0, "bf16": 3.38e38}


def _expr(rng: random.Random, depth: int) -> list:
    """A random expression tree over g, w, s; every op has a traced operand."""
    if depth == 0 or rng.random() < 0.25:
        return ["var", rng.choice(LEAVES)] if rng.random() < 0.7 else \
            ["const", rng.choice(CONSTS)]
    kind = rng.random()
    if kind < 0.3:
        node = [rng.choice(UNARY), _expr(rng, depth - 1)]
    elif kind < 0.9:
        node = [rng.choice(BINARY), _expr(rng, depth - 1), _expr(rng, depth - 1)]
    else:  # where(a < b, x, y)
        node = ["where", *(_expr(rng, depth - 1) for _ in range(4))]
    operands = node[1:3] if node[0] == "where" else node[1:]
    if not any(_has_var(t) for t in operands):  # plain Python floats would not be traced
        operands[0][:] = ["var", rng.choice(LEAVES)]
    return node


def _traced(rng: random.Random, depth: int) -> list:
    """An expression with a variable in it (row_mean of a plain number is no row math)."""
    tree = _expr(rng, depth)
    return tree if _has_var(tree) else ["var", rng.choice(LEAVES)]


def _has_var(tree: list) -> bool:
    return tree[0] == "var" or any(isinstance(t, list) and _has_var(t) for t in tree[1:])


def generate_user(rng: random.Random) -> dict:
    dim, rows, n = rng.choice([1, 3, 8, 17]), rng.choice([1, 5, 33]), rng.choice([0, 1, 7, 40])
    dtype = rng.choice(["f32", "f32", "f16", "bf16"])
    make = {"w": _traced(rng, 3), "s": _traced(rng, 3),
            "r": _traced(rng, 2) if rng.random() < 0.3 else None,
            "dim": dim, "table_dtype": dtype, "lr": rng.choice([0.01, 1.0]),
            "serving": rng.choice([None, None, *_layouts()]),
            "target": "triton" if rng.random() < 0.15 else "llvm"}
    data = {"seed": rng.randrange(1 << 30), "rows": rows, "n": n,
            "table_scale": rng.choice(SCALE[dtype]),
            "grad_scale": rng.choice([1.0, 1.0, 1e19, 3e38]), "state_low": rng.choice([0.0, -1.0])}
    return {"target": "api", "kernel": "user", "make": make, "data": data}


def _layouts(quantized: bool = False) -> list[str]:
    """The catalog's layouts (the quantized ones), in registry order."""
    from ekko.dialects import catalog

    return [n for n, e in catalog.LAYOUTS.items() if e.quantized or not quantized]


def generate_merge(rng: random.Random) -> dict:
    layout = rng.choice(_layouts(quantized=True))
    dim, rows, n = rng.choice([1, 3, 8, 33]), rng.choice([1, 9, 64]), rng.choice([1, 5, 40])
    big = rng.random() < 0.3  # enough ids for partitions: sorted ones merge in ranges
    if big:
        rows, n = rng.choice([7, 300, 5000]), rng.randrange(4096, 6500)
    return {"target": "api", "kernel": "merge",
            "make": {"dim": dim, "layout": layout, "seq": rng.random() < 0.5,
                     "threads": rng.choice([2, 3]) if big else None},
            "data": {"seed": rng.randrange(1 << 30), "rows": rows, "n": n,
                     "sorted": big and rng.random() < 0.7,
                     "exponents": rng.sample([0, 20, 30, 36, 37, 38], 3)}}


def _newest_wins(replica, versions, ids, packet, pversions) -> None:
    """The merge's rule, row by row in packet order: a newer version, or an equal one
    with larger bytes, replaces the replica's row."""
    for i, r in enumerate(ids):
        v, cur = int(pversions[i]), int(versions[r])
        if v > cur or (v == cur and packet[i].tobytes() > replica[r].tobytes()):
            replica[r], versions[r] = packet[i], v


# ------------------------------------------------------------------- running


def _build(tree: list, env: dict, rm: Any) -> Any:
    op = tree[0]
    if op == "var":
        return env[tree[1]]
    if op == "const":
        return float(tree[1])
    x = [_build(t, env, rm) for t in tree[1:]]
    if op in UNARY:
        return {"neg": lambda a: -a, "abs": abs, "sqrt": rm.sqrt, "log": rm.log,
                "exp": rm.exp}[op](x[0])
    if op == "where":
        return rm.where(x[0] < x[1], x[2], x[3])
    return {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
            "div": lambda a, b: a / b, "pow": lambda a, b: a ** b, "max": rm.maximum,
            "min": rm.minimum}[op](*x)


def _define(make: dict) -> str:
    """Register the case's optimizer (one name, replaced each case)."""
    import ekko

    rm = ekko.rowmath

    def math(g, w, s, *rest, lr, dim):
        env = {"g": g, "w": w, "s": s}
        new = [w - lr * _build(make["w"], env, rm), _build(make["s"], env, rm)]
        if rest:  # a rowwise state: one value per row
            new.append(rest[0] * 0.5 + rm.row_mean(_build(make["r"], env, rm), dim))
        return tuple(new)

    rowwise = ("r",) if make["r"] is not None else ()
    ekko.optimizer("fuzz_user", state=("s",), rowwise_state=rowwise, replace=True)(math)
    return "fuzz_user"


def _arrays(case: dict):
    import numpy as np

    from ekko.dialects import catalog
    from ekko.kernels.quant import f32_to_bf16_bits

    make, d = case["make"], case["data"]
    rng = np.random.default_rng(d["seed"])
    rows, dim, n = d["rows"], make["dim"], d["n"]
    with np.errstate(all="ignore"):
        w = rng.standard_normal((rows, dim)) * d["table_scale"]
        top = MAX[make["table_dtype"]]  # near the dtype's max, never past it
        w = np.clip(w, -top, top).astype(np.float32)
        table = {"f32": w, "f16": w.astype(np.float16),
                 "bf16": f32_to_bf16_bits(w)}[make["table_dtype"]]
    serving = None
    if make["serving"] is not None:  # zero rows: finite in every layout
        layout = catalog.layout(make["serving"])
        serving = np.zeros((rows, layout.width(dim)), layout.storage.np_dtype)
    ids = rng.integers(0, rows, n)
    if n >= 2:
        ids[0], ids[-1] = 0, rows - 1
    with np.errstate(over="ignore"):  # a 3e38 scale: past f32 now and then, then zero
        grads = (rng.standard_normal((n, dim)) * d["grad_scale"]).astype(np.float32)
    grads = np.where(np.isfinite(grads), grads, 0).astype(np.float32)
    state = [rng.uniform(d["state_low"], 1.0, (rows, dim)).astype(np.float32)]
    if make["r"] is not None:
        state.append(rng.uniform(d["state_low"], 1.0, rows).astype(np.float32))
    return table, ids, grads, state, serving, np.zeros(rows, np.int64)


def _finite(buffers: list, case: dict) -> bool:
    import numpy as np

    from ekko.kernels.quant import bf16_bits_to_f32, dequantize_rows

    make = case["make"]
    table, *rest, serving, _ = buffers
    values = [bf16_bits_to_f32(table) if make["table_dtype"] == "bf16" else table, *rest]
    if serving is not None:
        with np.errstate(all="ignore"):
            values.append(dequantize_rows(serving, make["serving"], make["dim"]))
    return all(np.isfinite(np.asarray(v, np.float64)).all() for v in values)


def run_user(case: dict) -> dict:
    import numpy as np

    import ekko

    make = case["make"]
    try:
        name = _define(make)
        kernel = ekko.update_kernel(name, make["dim"], make["table_dtype"],
                                    serving=make["serving"], lr=make["lr"],
                                    target=make["target"])
    except ekko.EkkoError:
        return {"kind": "ok"}
    except Exception:
        return {"kind": "exception", "detail": "defining: " + traceback.format_exc()[-1500:]}
    table, ids, grads, state, serving, versions = _arrays(case)
    buffers = [table, *state, serving, versions]
    args = buffers
    if make["target"] == "triton":
        import torch

        args = [None if b is None else torch.from_numpy(b) for b in buffers]
        ids, grads = torch.from_numpy(ids), torch.from_numpy(grads)
    before = [b.tobytes() for b in buffers if b is not None]
    t, *st, srv, ver = args
    try:
        kernel(t, ids, grads, state=tuple(st) if len(st) > 1 else st[0], serving=srv,
               versions=ver, step=1)
    except ekko.NonFiniteOutputError as e:
        after = [b.tobytes() for b in buffers if b is not None]
        names = {"table", "state 's'", "state 'r'", "serving copy"}
        if after != before:
            return {"kind": "half-applied", "detail": f"{e} but buffers changed"}
        if e.buffer not in names or e.row not in set(np.asarray(ids).tolist()) \
                or f"{e.buffer} of row {e.row}" not in str(e):
            return {"kind": "unnamed", "detail": f"{e} (row {e.row}, buffer {e.buffer!r})"}
        return {"kind": "ok"}
    except ekko.EkkoError as e:
        return {"kind": "rejected", "detail": f"a valid call was refused: {e}"}
    except Exception:
        return {"kind": "exception", "detail": traceback.format_exc()[-1500:]}
    if not _finite(buffers, case):
        return {"kind": "non-finite", "detail": "the update committed inf or NaN"}
    return {"kind": "ok"}


def run_merge(case: dict) -> dict:
    import numpy as np

    import ekko
    from ekko.dialects import catalog
    from ekko.kernels.quant import dequantize_rows, quantize_rows
    from ekko.kernels.sync import merge_kernel

    make, d = case["make"], case["data"]
    dim, layout, rows, n = make["dim"], make["layout"], d["rows"], d["n"]
    rng = np.random.default_rng(d["seed"])
    replica = quantize_rows(rng.standard_normal((rows, dim)).astype(np.float32), layout)
    versions = np.zeros(rows, np.int64)
    seq = np.zeros(rows, np.uint32) if make["seq"] else None
    packet = quantize_rows(rng.standard_normal((n, dim)).astype(np.float32), layout)
    entry = catalog.layout(layout)
    scale = rng.uniform(0, 1, n) * 10.0 ** rng.choice(d["exponents"], n)
    bias = rng.uniform(-1, 1, n) * 10.0 ** rng.choice(d["exponents"], n)
    params = np.stack([scale, bias][:len(entry.codec.tail)], 1)
    with np.errstate(all="ignore"):  # past f16's range: inf, which must be refused too
        stored = quantize_rows(params.astype(np.float32), entry.codec.param)  # its format
        packet[:, entry.params_at(dim):] = stored.view(np.uint8)
    ids = rng.integers(0, rows, n)
    if d.get("sorted"):
        ids.sort()
    ids[0], ids[-1] = 0, rows - 1
    pversions = rng.integers(1, 3, n).astype(np.int64)
    want_rows, want_versions = replica.copy(), versions.copy()
    _newest_wins(want_rows, want_versions, ids, packet, pversions)
    before = [a.tobytes() for a in (replica, versions) + ((seq,) if seq is not None else ())]
    try:
        merge_kernel(dim, layout, seq=make["seq"], threads=make.get("threads"))(
            replica, versions, ids, packet, pversions, newest=2, seq=seq)
    except ekko.EkkoError as e:
        after = [a.tobytes() for a in (replica, versions) + ((seq,) if seq is not None else ())]
        if after != before:
            return {"kind": "half-applied", "detail": f"{e} but the replica changed"}
        if "packet row" not in str(e):
            return {"kind": "unnamed", "detail": str(e)}
        return {"kind": "ok"}
    except Exception:
        return {"kind": "exception", "detail": traceback.format_exc()[-1500:]}
    with np.errstate(all="ignore"):
        if not np.isfinite(dequantize_rows(replica, layout, dim)).all():
            return {"kind": "non-finite", "detail": "a merged row decodes to inf or NaN"}
    if replica.tobytes() != want_rows.tobytes() or not np.array_equal(versions, want_versions):
        return {"kind": "wrong", "detail": "the merged replica is not newest-version-wins"}
    return {"kind": "ok"}
