"""Python arguments to `ekko.update_kernel` / `ekko.bag_kernel` and their kernels,
to a compiled model's `update` / `lookup`, and `@ekko.optimizer` definitions.

A kernel case starts from a valid call (arrays built from a seed) and applies
up to two mutations: wrong dtype, shape, byte order or strides, aliased
buffers, read-only arrays, torch tensors that require grad or are sparse,
out-of-range or uint64 ids, Python lists as ids, NaN or inf gradients, huge
values, a table near its dtype's max, odd scalars, bad kernel options and
hyper-parameters the optimizer does not have. A model case calls a small
compiled model (a table and a feature share a name) with wrong names and odd
ids; a definition case defines an optimizer with one mistake (or none) from a
file. One case in five comes from `gen_finite`: a user optimizer with random
math, or a replica merge of int8 rows that may decode to inf. The oracle:

* nothing but `ekko.EkkoError` escapes;
* on `EkkoError` every buffer is byte-identical to before, and a
  NonFiniteOutputError names the row and the buffer;
* an input a mutation makes invalid is rejected (`must_reject`);
* an accepted update leaves every buffer it writes finite (issue #17), so a
  finite but huge gradient leaves a float table finite, as torch.optim does;
* a wrong name is refused naming the valid ones; a mistake in a definition is
  one line naming the optimizer and the line of the mistake, and the catalog
  stays as it was; a definition without one compiles and runs.
"""

from __future__ import annotations

import random
import traceback
from pathlib import Path
from typing import Any

from ekko.dialects import catalog

from . import gen_finite

STATES = {"sgd": 0, "adagrad": 1, "rowwise_adagrad": 1, "adam": 2}
LAYOUTS = list(catalog.LAYOUTS)
TABLE_NP = {"f32": "float32", "f16": "float16", "bf16": "uint16"}
NEAR_MAX = {"float32": 3.4e38, "float16": 65000.0, "uint16": 3.38e38}  # bf16 travels as uint16
ODD_DTYPES = ["float64", "float16", "float32", "int32", "int64", "uint8", "int8", "bool",
              "complex64", "uint16"]


def _array(dtype: str, shape: list[int], fill: str, seed: int, **extra: Any) -> dict:
    return {"kind": "array", "dtype": dtype, "shape": shape, "fill": fill, "seed": seed, **extra}


def _serving_spec(layout: str, rows: int, dim: int, seed: int) -> dict:
    return _array("", [rows, dim], "serving", seed, layout=layout)


# ----------------------------------------------------------------- valid calls


def _update_case(rng: random.Random) -> dict:
    opt = rng.choice(sorted(STATES))
    dim, rows, n = rng.choice([1, 3, 8, 16]), rng.choice([1, 5, 64]), rng.choice([0, 1, 7, 50])
    if rng.random() < 0.03:  # the largest dim allowed: no row may live on the stack
        dim, rows, n = 16384, 3, 5
    dtype = rng.choice(["f32", "f32", "f16", "bf16"])
    index = rng.choice(["i64", "i32"])
    serving = rng.choice([None, None, *LAYOUTS])
    seed = rng.randrange(1 << 30)
    make = {"optimizer": opt, "dim": dim, "table_dtype": dtype, "index_dtype": index,
            "serving": serving, "hyper": {"lr": 0.05}}
    if opt == "adam" and rng.random() < 0.5:
        make["hyper"]["betas"] = [0.9, 0.99]
    for key, value in (("max_norm", 1.0), ("clip_value", 0.5), ("weight_decay", 1e-4)):
        if rng.random() < 0.2:
            make["hyper"][key] = value
    state_shape = [rows] if opt == "rowwise_adagrad" else [rows, dim]
    states = [_array("float32", state_shape, "zeros", seed + 3 + k) for k in range(STATES[opt])]
    args = {
        "table": _array(TABLE_NP[dtype], [rows, dim], "normal", seed),
        "ids": _array("int64" if index == "i64" else "int32", [n], "ids", seed + 1, high=rows),
        "grads": _array("float32", [n, dim], "normal", seed + 2),
        "state": None if not states else states[0] if len(states) == 1 else {"kind": "tuple",
                                                                               "items": states},
        "serving": _serving_spec(serving, rows, dim, seed + 5) if serving else None,
        "versions": _array("int64", [rows], "zeros", seed + 6) if rng.random() < 0.5 else None,
        "step": {"kind": "value", "value": rng.choice([1, 2, 100])},
    }
    case = {"target": "api", "kernel": "update", "make": make, "args": args, "rows": rows,
            "dim": dim, "n": n, "must_reject": []}
    if rng.random() < 0.3:  # a gathered delta: n ids naming B source rows (each one used)
        sources = min(rng.choice([1, 3, 10]), max(n, 1))
        args["grads"] = _array("float32", [sources, dim], "normal", seed + 2)
        args["grad_index"] = _array("int64", [n], "cycle", seed + 7, high=sources)
        if rng.random() < 0.6:
            args["grad_scale"] = _array("float32", [n], "normal", seed + 8)
        case["sources"] = sources
    return case


def _bag_case(rng: random.Random) -> dict:
    layout = rng.choice(LAYOUTS)
    dim, rows, n = rng.choice([1, 3, 8, 16]), rng.choice([1, 5, 64]), rng.choice([0, 1, 7, 50])
    index = rng.choice(["i64", "i32"])
    mode = rng.choice(["sum", "mean"])
    weighted = mode == "sum" and rng.random() < 0.3
    seed = rng.randrange(1 << 30)
    idx = "int64" if index == "i64" else "int32"
    nbags = rng.choice([1, 2, 5]) if n else rng.choice([0, 1])
    args = {
        "table": _serving_spec(layout, rows, dim, seed),
        "ids": _array(idx, [n], "ids", seed + 1, high=rows),
        "offsets": _array(idx, [nbags], "offsets", seed + 2, high=n),
        "per_sample_weights": _array("float32", [n], "normal", seed + 3) if weighted else None,
    }
    make = {"dim": dim, "layout": layout, "index_dtype": index, "mode": mode, "weighted": weighted}
    return {"target": "api", "kernel": "bag", "make": make, "args": args, "rows": rows,
            "dim": dim, "n": n, "must_reject": []}


# ------------------------------------------------------------------- mutations


def _arrays(case: dict) -> list[str]:
    return [k for k, v in case["args"].items() if isinstance(v, dict) and v["kind"] == "array"]


def _is_array(case: dict, name: str) -> bool:
    spec = case["args"].get(name)
    return isinstance(spec, dict) and spec["kind"] == "array"


def _reject(case: dict, why: str) -> None:
    case["must_reject"].append(why)


def m_dtype(rng, case):
    name = rng.choice(_arrays(case))
    spec = case["args"][name]
    if spec["fill"] == "serving":
        return
    new = rng.choice([d for d in ODD_DTYPES if d != spec["dtype"]])
    spec["dtype"] = new
    _reject(case, f"{name} dtype {new}")


def m_shape(rng, case):
    name = rng.choice(_arrays(case))
    spec = case["args"][name]
    if spec["fill"] == "serving":
        spec["shape"] = [spec["shape"][0] + rng.choice([-1, 1]), spec["shape"][1]]
        _unstride_if_contiguous(case, name, spec)
        if case["kernel"] == "update":  # the serving copy must have the table's rows
            _reject(case, f"{name} rows")
        return
    shape = list(spec["shape"])
    if rng.random() < 0.3:
        shape = shape + [1] if len(shape) < 3 else shape[:1]
    else:
        axis = rng.randrange(len(shape))
        shape[axis] = max(0, shape[axis] + rng.choice([-1, 1, 2]))
    if shape == spec["shape"]:
        return
    spec["shape"] = shape
    _unstride_if_contiguous(case, name, spec)
    others = any(case["args"].get(k) for k in ("state", "versions", "serving"))
    if name == "table" and case["kernel"] == "update" and len(shape) == 2 \
            and shape[1] == case["dim"] and not others:
        return  # more or fewer rows of a lone table is a valid call (ids may then be out of range)
    if name in ("offsets", "ids") and case["kernel"] == "bag" and len(shape) == 1:
        return  # another number of bags or ids: still a valid call (or an EkkoError)
    if name == "grads" and "sources" in case and len(shape) == 2 and shape[1] == case["dim"] \
            and (shape[0] >= case["sources"] or case["n"] == 0):
        return  # more source rows than the index names (or no ids): a valid gathered call
    _reject(case, f"{name} shape {shape}")


def _unstride_if_contiguous(case: dict, name: str, spec: dict) -> None:
    """A strided array whose new shape makes its view C-contiguous after all (numpy
    ignores the step of an axis of one row, or of none) is a valid argument: drop
    m_strides's expectation."""
    import numpy as np

    how = spec.get("strides")
    if not how:
        return
    shape = list(spec["shape"])
    if how == "step2" and shape:
        shape[0] *= 2  # as _make_array allocates it
    if _layout(np.zeros(shape, np.uint8), {"strides": how}).flags.c_contiguous:
        del spec["strides"]
        case["must_reject"].remove(f"{name} not C-contiguous ({how})")


def m_byteorder(rng, case):
    name = rng.choice(_arrays(case))
    spec = case["args"][name]
    layout = spec.get("layout")
    if spec["dtype"] in ("uint8", "int8", "bool") or 0 in spec["shape"] \
            or (layout is not None and catalog.layout(layout).quantized):
        return  # one-byte values (or none) read the same in either byte order
    spec["byteswap"] = True
    _reject(case, f"{name} non-native byte order")


def m_strides(rng, case):
    name = rng.choice(_arrays(case))
    spec = case["args"][name]
    how, shape = rng.choice(["step2", "reverse", "fortran"]), spec["shape"]
    if how == "fortran" and not (len(shape) == 2 and min(shape) > 1):
        return
    if how != "fortran" and not (shape and shape[0] > 1):
        return
    spec["strides"] = how
    _reject(case, f"{name} not C-contiguous ({how})")


def m_alias(rng, case):
    written = [k for k in ("table", "state", "serving", "versions") if case["args"].get(k)
               and case["args"][k]["kind"] != "alias"]  # aliases are built last: no chains
    if case["kernel"] != "update" or not written:
        return
    a = rng.choice(written)
    others = [k for k in _arrays(case) + (["state"] if isinstance(case["args"].get("state"), dict)
                                          and case["args"]["state"]["kind"] == "tuple" else [])
              if k != a]
    if isinstance(case["args"].get("state"), dict) and case["args"]["state"]["kind"] == "tuple" \
            and rng.random() < 0.5:
        items = case["args"]["state"]["items"]
        items[1] = {"kind": "alias", "of": "state.0"}
        _reject(case, "the two states are one array")
        return
    if not others:
        return
    b = rng.choice(others)
    if b == "state" or case["args"][b]["kind"] != "array" or 0 in case["args"][b]["shape"]:
        return  # an empty array shares no byte with anything
    case["args"][b] = {"kind": "alias", "of": a, "shape": case["args"][b]["shape"],
                       "dtype": case["args"][b]["dtype"]}
    _reject(case, f"{b} aliases {a}")


def m_bad_ids(rng, case):
    if case["n"] == 0 or not _is_array(case, "ids"):
        return
    bad = rng.choice([case["rows"], -1, 2**31 - 1, -2**31, 2**63 - 1, -2**63])
    if case["args"]["ids"]["dtype"] == "int32" and not -2**31 <= bad < 2**31:
        bad = 2**31 - 1
    case["args"]["ids"].setdefault("poke", []).append([rng.randrange(case["n"]), bad])
    _reject(case, f"id {bad} out of range")


def m_nonfinite(rng, case):
    name = "grads" if case["kernel"] == "update" else "table"
    spec = case["args"][name]
    if case["n"] == 0 or not _is_array(case, name) or spec["fill"] == "serving":
        return
    rows = case.get("sources", case["n"])  # a gathered delta's index names every source row
    spec.setdefault("poke", []).append([rng.randrange(rows * case["dim"]),
                                        rng.choice(["nan", "inf", "-inf"])])
    _reject(case, f"non-finite {name}")


def m_bad_gather(rng, case):
    """A gathered delta's index naming no source row."""
    if "sources" not in case or case["n"] == 0 or not _is_array(case, "grad_index"):
        return
    bad = rng.choice([case["sources"], -1, 2**63 - 1, -2**63])
    case["args"]["grad_index"].setdefault("poke", []).append([rng.randrange(case["n"]), bad])
    _reject(case, f"grad_index {bad} out of range")


def m_huge(rng, case):
    if case["kernel"] != "update" or case["n"] == 0 or not _is_array(case, "grads"):
        return
    value = rng.choice([1e19, 3e38, -1e20, 1e30])
    pokes = case["args"]["grads"].setdefault("poke", [])
    pokes[:0] = [[k, value] for k in range(min(case["dim"], 4))]  # a later NaN poke still wins


def m_near_max(rng, case):
    """A table near its dtype's max: an update may push a row (or its serving copy) past it."""
    if case["kernel"] != "update" or not _is_array(case, "table"):
        return
    if case["args"]["table"]["dtype"] in NEAR_MAX:
        case["args"]["table"]["near_max"] = True


def m_readonly(rng, case):
    if case["kernel"] != "update" or not _is_array(case, "table"):
        return
    case["args"]["table"]["readonly"] = True
    _reject(case, "read-only table")


def m_torch(rng, case):
    for name in _arrays(case):
        case["args"][name]["torch"] = True
    if case["kernel"] == "update" and rng.random() < 0.5 and _is_array(case, "table") \
            and case["args"]["table"]["dtype"] == "float32":
        case["args"]["table"]["requires_grad"] = True
        _reject(case, "table requires grad")


def m_not_an_array(rng, case):
    name = rng.choice([k for k in ("table", "ids", "grads", "offsets") if k in case["args"]])
    what = rng.choice(["list", "none", "str", "int", "dict"])
    case["args"][name] = {"kind": "object", "what": what}
    if name == "offsets" and case["args"][name]["what"] == "none":
        return  # no offsets: one id per bag, documented
    _reject(case, f"{name} is not an array")


def m_scalar(rng, case):
    if case["kernel"] != "update":
        return
    key = rng.choice(["step", "version", "seed"])
    value = rng.choice([0, -1, 2**63, 2**64, 2**70, 1.5, "nan", True, "1", None, -2**63 - 1])
    case["args"][key] = {"kind": "value", "value": value}
    integer = isinstance(value, int) and not isinstance(value, bool)
    bad = {"step": not (integer and 1 <= value < 2**63),
           "version": value is not None and not (integer and -2**63 <= value < 2**63),
           "seed": not integer}[key]
    if bad:
        _reject(case, f"{key}={value!r}")


# sound values of some optimizer's hyper-parameters (or of none's: momentum): refused
# exactly when the case's optimizer does not have them
SOUND_ELSEWHERE = [["betas", [0.9, 0.99]], ["eps", 1e-3], ["lr_decay", 0.1], ["alpha", 0.9],
                   ["l1", 0.1], ["momentum", 0.9]]


def _takes(optimizer: str, key: str) -> bool:
    from ekko.dialects import catalog

    return catalog.optimizer(optimizer).hyper_problem("beta1" if key == "betas" else key) is None


def m_make(rng, case):
    make = case["make"]
    if case["kernel"] == "update":
        key, value = rng.choice([
            ("dim", 0), ("dim", -1), ("dim", 2**63), ("dim", 16385), ("dim", "8"), ("dim", 8.5),
            ("optimizer", "lamb"), ("serving", "int2"), ("table_dtype", "f64"),
            ("index_dtype", "i16"), ("lr", "nan"), ("lr", "inf"), ("lr", -1.0), ("lr", 0.0),
            ("lr", "x"), ("eps", 0.0), ("eps", -1e-8), ("max_norm", 0.0), ("max_norm", "nan"),
            ("clip_value", -1.0), ("weight_decay", "nan"), ("weight_decay", -1.0),
            ("betas", [1.0, 0.999]), ("betas", [0.9, 1.0]), ("betas", [0.9]), ("lr_decay", -1.0),
            ("lr_decay", "nan"), *map(tuple, SOUND_ELSEWHERE)])
        if [key, value] in SOUND_ELSEWHERE and _takes(make["optimizer"], key):
            return  # a sound value of a hyper-parameter this optimizer has: a valid call
    else:
        key, value = rng.choice([("dim", 0), ("dim", -3), ("dim", 16385), ("layout", "int2"),
                                 ("mode", "max"), ("index_dtype", "u64"), ("weighted", True)])
        if key == "weighted" and make["mode"] == "sum":
            return
    if key in make:
        make[key] = value
    else:
        make["hyper"][key] = value
    _reject(case, f"make {key}={value!r}")


def m_sparse(rng, case):
    """A sparse torch tensor (COO, or CSR for a matrix) has no dense buffer."""
    name = rng.choice(_arrays(case))
    spec = case["args"][name]
    spec["sparse"] = rng.choice(["coo", "csr"]) if len(spec["shape"]) == 2 else "coo"
    _reject(case, f"{name} is a sparse tensor")


def m_odd_ids(rng, case):
    """uint64 ids (2**64 - 1 among them), or ids as a Python list, empty or not."""
    if not _is_array(case, "ids"):
        return
    how = rng.choice(["uint64", "uint64", "list", "empty_list"])
    if how == "uint64":
        spec = case["args"]["ids"]
        spec["dtype"] = "uint64"
        if case["n"]:
            spec.setdefault("poke", []).append([rng.randrange(case["n"]), 2**64 - 1])
        _reject(case, "uint64 ids")
    else:
        case["args"]["ids"] = {"kind": "object", "what": how}
        _reject(case, f"ids as a {how}")


MUTATIONS = [m_dtype, m_shape, m_byteorder, m_strides, m_alias, m_bad_ids, m_nonfinite, m_huge,
             m_near_max, m_readonly, m_torch, m_not_an_array, m_scalar, m_make, m_sparse,
             m_odd_ids, m_bad_gather]


def generate(rng: random.Random) -> dict:
    roll = rng.random()
    if roll < 0.2:  # outputs that may overflow (gen_finite)
        return gen_finite.generate_user(rng) if roll < 0.14 else gen_finite.generate_merge(rng)
    if roll < 0.28:
        return _model_api_case(rng)
    if roll < 0.36:
        return _definition_case(rng)
    case = _update_case(rng) if roll < 0.8 else _bag_case(rng)
    for _ in range(rng.choice([0, 1, 1, 1, 2])):
        rng.choice(MUTATIONS)(rng, case)
    return case


# ------------------------------------------------------------------- running


def run(case: dict) -> dict:
    """Build the arguments, call the API, judge (in the worker)."""
    if case["kernel"] in ("user", "merge"):
        return (gen_finite.run_user if case["kernel"] == "user" else gen_finite.run_merge)(case)
    if case["kernel"] == "model":
        return _run_model_api(case)
    if case["kernel"] == "define":
        return _run_definition(case)
    import numpy as np

    import ekko

    built: dict[str, Any] = {}
    bases: list[np.ndarray] = []
    try:
        plain = {k: v for k, v in case["args"].items() if not _is_alias(v)}
        args = {k: _build(v, case, built, bases) for k, v in plain.items()}
        args.update({k: _build(v, case, built, bases) for k, v in case["args"].items()
                     if _is_alias(v)})
    except Exception:
        return {"kind": "harness-error", "detail": traceback.format_exc()[-1500:]}
    make = case["make"]
    try:
        if case["kernel"] == "update":
            hyper = {k: _value(v) for k, v in make["hyper"].items()}
            kernel = ekko.update_kernel(make["optimizer"], make["dim"], make["table_dtype"],
                                        make["index_dtype"], make["serving"], **hyper)
        else:
            kernel = ekko.bag_kernel(make["dim"], make["layout"], make["index_dtype"],
                                     make["mode"], make["weighted"])
    except ekko.EkkoError:
        return {"kind": "ok"}
    except Exception:
        return {"kind": "exception",
                "detail": "making the kernel: " + traceback.format_exc()[-1500:]}
    before = [b.tobytes() for b in bases]
    try:
        if case["kernel"] == "update":
            kernel(args["table"], args["ids"], args["grads"], state=args["state"],
                   serving=args["serving"], versions=args["versions"],
                   **{k: args[k] for k in ("step", "version", "seed", "grad_index", "grad_scale")
                      if k in args})
        else:
            kernel(args["table"], args["ids"], args["offsets"],
                   per_sample_weights=args["per_sample_weights"])
    except ekko.EkkoError as e:
        changed = [k for k, (b, old) in enumerate(zip(bases, before)) if b.tobytes() != old]
        if changed:
            return {"kind": "half-applied",
                    "detail": f"EkkoError ({e}) but buffers {changed} changed"}
        if isinstance(e, ekko.NonFiniteOutputError) and f"{e.buffer} of row {e.row}" not in str(e):
            return {"kind": "unnamed", "detail": str(e)}
        return {"kind": "ok"}
    except Exception:
        return {"kind": "exception", "detail": traceback.format_exc()[-1500:]}
    if case["must_reject"]:
        return {"kind": "accepted", "detail": "accepted: " + "; ".join(case["must_reject"])}
    if case["kernel"] == "update" and not _written_finite(case, built):
        return {"kind": "non-finite", "detail": "an accepted update committed inf or NaN"}
    return {"kind": "ok"}


def _written_finite(case: dict, built: dict) -> bool:
    """Every buffer an accepted update wrote holds finite values (issue #17):
    the table (bf16 as bits), the state, the serving copy decoded."""
    import numpy as np

    from ekko.kernels.quant import bf16_bits_to_f32, dequantize_rows

    make = case["make"]
    values = []
    for name, x in built.items():
        if not name.startswith(("table", "state", "serving")):
            continue
        x = np.asarray(x)
        if name == "serving" and catalog.layout(make["serving"]).quantized:
            with np.errstate(all="ignore"):
                x = dequantize_rows(x, make["serving"], make["dim"])
        elif x.dtype == np.uint16:  # bf16 bits
            x = bf16_bits_to_f32(x)
        values.append(x)
    return all(np.isfinite(v.astype(np.float64)).all() for v in values)


def _is_alias(spec: Any) -> bool:
    return isinstance(spec, dict) and spec["kind"] == "alias"


def _value(v: Any) -> Any:
    """JSON stand-ins: "nan"/"inf" strings are floats; lists stay lists (betas)."""
    if v in ("nan", "inf", "-inf"):
        return float(v)
    if isinstance(v, list):
        return tuple(_value(x) for x in v)
    return v


def _build(spec: Any, case: dict, built: dict, bases: list) -> Any:
    import numpy as np

    if spec is None:
        return None
    kind = spec["kind"]
    if kind == "value":
        return _value(spec["value"])
    if kind == "object":
        return {"list": [0, 1], "empty_list": [], "none": None, "str": "ids", "int": 3,
                "dict": {}}[spec["what"]]
    if kind == "tuple":
        items = []
        for k, item in enumerate(spec["items"]):
            items.append(_build(item, case, built, bases))
            built[f"state.{k}"] = items[-1]
        built["state"] = items[0]
        return tuple(items)
    if kind == "alias":
        target = built[spec["of"]]
        if "shape" in spec and hasattr(target, "reshape"):
            flat = target.reshape(-1)
            size = int(np.prod(spec["shape"]))
            want = np.dtype(spec["dtype"]) if spec["dtype"] else target.dtype
            if flat.size >= size and target.dtype == want:
                return flat[:size].reshape(spec["shape"])
        return target
    arr = _layout(_make_array(spec, case), spec)
    root = arr
    while isinstance(root.base, np.ndarray):
        root = root.base
    bases.append(root)  # the whole allocation: a write anywhere in it is seen
    built[name_of(spec, case)] = arr
    if spec.get("sparse"):
        return _to_sparse(arr, spec["sparse"])
    return _to_torch(arr, spec) if spec.get("torch") and not _numpy_only(spec) else arr


def _to_sparse(arr, how: str):
    """A sparse torch copy of `arr` (torch's beta warning about CSR silenced)."""
    import warnings

    import numpy as np
    import torch

    try:
        dense = torch.from_numpy(np.ascontiguousarray(arr, arr.dtype.newbyteorder("=")))
    except (TypeError, ValueError):  # a dtype torch lacks: any sparse tensor will do
        dense = torch.zeros(arr.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            return dense.to_sparse_csr() if how == "csr" and dense.dim() == 2 else dense.to_sparse()
        except (NotImplementedError, RuntimeError):  # no sparse kernels for uint16 and such
            return torch.zeros(arr.shape).to_sparse()


def _make_array(spec: dict, case: dict):
    import numpy as np

    from ekko.kernels.quant import f32_to_bf16_bits, quantize_rows

    rng = np.random.default_rng(spec["seed"])
    shape = [max(0, s) for s in spec["shape"]]
    steps = 2 if spec.get("strides") == "step2" else 1
    alloc = [shape[0] * steps, *shape[1:]] if shape else shape
    fill = spec["fill"]
    if fill == "serving":
        values = rng.standard_normal((alloc[0], case["dim"])).astype(np.float32)
        arr = quantize_rows(values, spec["layout"]) if spec["layout"] != "f32" else values
        if spec["shape"][0] != case["rows"] and spec["shape"][0] >= 0:
            arr = np.resize(arr, (spec["shape"][0] * steps, *arr.shape[1:]))
        return np.ascontiguousarray(arr)
    dtype = np.dtype(spec["dtype"])
    if fill == "ids":
        arr = rng.integers(0, max(1, spec["high"]), size=alloc).astype(dtype)
    elif fill == "cycle":  # 0, 1, ..., high-1, 0, 1, ...: every value below high named
        arr = (np.arange(int(np.prod(alloc))) % max(1, spec["high"])).reshape(alloc).astype(dtype)
    elif fill == "offsets":
        arr = np.sort(rng.integers(0, spec["high"] + 1, size=alloc)).astype(dtype)
        if arr.size:
            arr.reshape(-1)[0] = 0
    elif fill == "zeros":
        arr = np.zeros(alloc, dtype)
    elif spec.get("near_max") and fill == "normal" and spec["dtype"] in NEAR_MAX:
        top = NEAR_MAX[spec["dtype"]]
        values = np.clip(rng.standard_normal(alloc) * top, -top, top).astype(np.float32)
        arr = f32_to_bf16_bits(values) if dtype == np.uint16 else values.astype(dtype)
    elif dtype.kind in "iub":
        arr = rng.integers(0, 3, size=alloc).astype(dtype)
    else:
        arr = rng.standard_normal(alloc).astype(dtype)
    for index, value in spec.get("poke", []):
        if arr.size:
            flat = arr.reshape(-1)
            flat[index % flat.size] = _poke_value(value, dtype)
    return arr


def _poke_value(value: Any, dtype) -> Any:
    """`value` as an element of `dtype` (another mutation may have changed the dtype)."""
    import numpy as np

    if dtype.kind in "fc":
        return _value(value)
    if dtype.kind == "b":
        return bool(value)
    if isinstance(value, str):
        return 0
    info = np.iinfo(dtype)
    return int(value) if info.min <= int(value) <= info.max else 0


def name_of(spec: dict, case: dict) -> str:
    """The argument name `spec` is bound to in the case (aliases refer to it)."""
    return next((k for k, v in case["args"].items() if v is spec), "")


def _layout(arr, spec: dict):
    import numpy as np

    how = spec.get("strides")
    if how == "step2":
        arr = arr[::2]
    elif how == "reverse":
        arr = arr[::-1]
    elif how == "fortran":
        arr = np.asfortranarray(arr)
    if spec.get("byteswap"):  # same values, same memory, the other byte order
        arr = arr.byteswap(inplace=True).view(arr.dtype.newbyteorder())
    if spec.get("readonly"):
        arr.flags.writeable = False
    return arr


def _numpy_only(spec: dict) -> bool:
    """Layouts a torch tensor cannot carry (torch ignores numpy's read-only flag)."""
    return bool(spec.get("readonly") or spec.get("byteswap") or spec.get("strides") == "reverse")


def _to_torch(arr, spec: dict):
    import torch

    try:
        tensor = torch.from_numpy(arr)
    except (TypeError, ValueError):
        return arr  # a layout torch cannot view (reversed, swapped): stays numpy
    if spec.get("requires_grad") and tensor.is_floating_point():
        tensor.requires_grad_(True)
    return tensor


# ------------------------------------------------- a compiled model's update / lookup

MODEL = """model shared {
  table user { rows 20; dim 4; serving int8; }
  feature user -> user;
  table items { rows 30; dim 3; optimizer sgd(lr=0.5); }
  feature item -> items pooling POOLING;
}
"""
TABLES = {"user": 4, "items": 3}  # name -> dim
FEATURES = {"user": "user", "item": "items"}  # name -> table
ID_KINDS = ["array", "array", "list", "empty_list", "uint64_max", "list_uint64_max",
            "list_float", "list_huge", "int32_array"]


def _model_api_case(rng: random.Random) -> dict:
    call = rng.choice(["update", "lookup"])
    own = list(TABLES) if call == "update" else list(FEATURES)
    other = list(FEATURES) if call == "update" else list(TABLES)
    name = rng.choice(own + own + [n for n in other if n not in own] + ["nope", 3])
    return {"target": "api", "kernel": "model", "call": call, "name": name,
            "pooling": rng.choice(["sum", "mean", "none"]), "ids": rng.choice(ID_KINDS),
            "n": rng.choice([1, 3]), "seed": rng.randrange(1 << 30)}


def _model_ids(kind: str, n: int, rows: int, rng):
    """The ids of a model case, and why they must be refused (None: they are fine)."""
    import numpy as np

    valid = rng.integers(0, rows, n)
    return {
        "array": (valid.astype(np.int64), None),
        "list": ([int(v) for v in valid], None),
        "empty_list": ([], None),
        "int32_array": (valid.astype(np.int32), "int32 ids to an int64 kernel"),
        "uint64_max": (np.array([*valid[1:], 2**64 - 1], np.uint64), "uint64 ids"),
        "list_uint64_max": ([*map(int, valid[1:]), 2**64 - 1], "an id beyond int64"),
        "list_float": ([*map(int, valid[1:]), 1.0], "a float id"),
        "list_huge": ([2**70, *map(int, valid[1:])], "an id beyond int64"),
    }[kind]


_models: dict[str, Any] = {}


def _run_model_api(case: dict) -> dict:
    import numpy as np

    import ekko

    text = MODEL.replace("POOLING", case["pooling"])
    try:
        if text not in _models:
            _models[text] = ekko.compile_model(ekko.parse_model(text))
        m = _models[text].materialize(seed=case["seed"] % 1000)
    except Exception:
        return {"kind": "exception", "detail": "compiling: " + traceback.format_exc()[-1500:]}
    rng = np.random.default_rng(case["seed"])
    name, call = case["name"], case["call"]
    own = TABLES if call == "update" else FEATURES
    rows = 20 if name == "user" else 30
    ids, bad_ids = _model_ids(case["ids"], case["n"], rows, rng)
    wrong_name = name not in own
    arrays = [a for buf in m.tables.values() for a in (buf.master, buf.serving, buf.versions,
                                                         *(buf.state if isinstance(buf.state, tuple)
                                                           else [buf.state]))
              if a is not None]
    before = [a.tobytes() for a in arrays]
    try:
        if call == "update":
            dim = TABLES.get(name, 4) if isinstance(name, str) else 4
            m.update(name, ids, rng.standard_normal((len(ids), dim)).astype(np.float32))
        elif FEATURES.get(name) is not None and case["pooling"] != "none":
            m.lookup(name, ids, [0, len(ids)] if rng.random() < 0.5 else np.array([0, len(ids)]))
        else:
            m.lookup(name, ids)
    except ekko.EkkoError as e:
        if any(a.tobytes() != b for a, b in zip(arrays, before)):
            return {"kind": "half-applied", "detail": f"EkkoError ({e}) but a buffer changed"}
        valid = "(tables: " if call == "update" else "(features: "
        if wrong_name and "that is a" not in str(e) and valid not in str(e):
            return {"kind": "unnamed", "detail": f"a wrong name not answered with the valid ones: {e}"}
        return {"kind": "ok"}
    except Exception:
        return {"kind": "exception", "detail": traceback.format_exc()[-1500:]}
    if wrong_name or bad_ids:
        return {"kind": "accepted", "detail": f"accepted: name {name!r}, {bad_ids or 'ids'}"}
    return {"kind": "ok"}


# ------------------------------------------------- @ekko.optimizer definitions

DEFECTS = [None, None, "lambda", "recursion", "branch", "bad_state", "string_default",
           "duplicate_state", "unknown_keyword", "wrong_return", "name_error", "taken_name",
           "bad_name", "hyper_taken", "bare_string_state"]
BAD_STATES = [("not ok",), ("lambda",), ("g",), ("w",), ("step",), ("lr",), ("1x",)]


def _definition_case(rng: random.Random) -> dict:
    return {"target": "api", "kernel": "define", "defect": rng.choice(DEFECTS),
            "states": rng.choice([0, 1, 2]), "rowwise": rng.random() < 0.3,
            "seed": rng.randrange(1 << 30), "bad_state": list(rng.choice(BAD_STATES))}


def definition_source(case: dict) -> tuple[str, str, int | None]:
    """(file text, the optimizer's name as messages call it, the line a mistake must be
    reported on; None: there is none) for a definition case. The file:

        1 import ekko / 2 from ekko import rowmath as rm / 3
        4 def opt_fn(g, w, <state>, *, lr, beta):
        5     <first statement>
        6     <return>
        7
        8 opt = ekko.optimizer(...)(opt_fn)
    """
    defect, n = case["defect"], case["states"]
    name = f"fz_{case['seed']}"
    states = [f"s{k}" for k in range(n)]
    params = "".join(f", {s}" for s in states)
    kind = "rowwise_state" if case["rowwise"] else "state"
    options: dict[str, Any] = {kind: tuple(states), "hyper": {"beta": 0.5}}
    new_state = "rm.row_sum(g * g)" if case["rowwise"] else "g * g"  # rowwise: one per row
    first = "g = g * beta"
    ret = "return (w - lr * g, " + "".join(f"{s} + {new_state}, " for s in states) + ")"
    keywords = ", lr, beta"
    line: int | None = 4  # where the function is defined: mistakes in what it declares
    if defect == "recursion":
        first, line = f"return opt_fn(g, w{params}, lr=lr, beta=beta)", 5
    elif defect == "branch":
        first, line = "g = g if g > 0 else -g", 5
    elif defect == "name_error":
        first, line = "g = g * undefined_name", 5
    elif defect == "wrong_return":
        ret = ret[:-1] + "w)"
    elif defect == "unknown_keyword":
        keywords += ", zeta"
    elif defect == "bad_state":
        options[kind] = tuple(case["bad_state"]) + tuple(states[1:])
    elif defect == "duplicate_state" and n:
        options[kind] = (states[0],) * n
        if n == 1:
            options["rowwise_state" if kind == "state" else "state"] = (states[0],)
    elif defect == "bare_string_state":
        options[kind] = "buf"
    elif defect == "string_default":
        options["hyper"] = {"beta": "0.5"}
    elif defect == "hyper_taken":
        options["hyper"] = {"beta": 0.5, "threads": 1.0}
    elif defect in ("taken_name", "bad_name"):
        name = "sgd" if defect == "taken_name" else "two words"
    elif defect != "lambda":
        line = None
    opts = ", ".join(f"{k}={v!r}" for k, v in options.items())
    register = f"opt = ekko.optimizer({name!r}, {opts})(opt_fn)"
    if defect == "lambda":
        register, name, line = f"opt = ekko.optimizer({opts})(lambda g, w, *, lr: w - lr * g)", \
            "<lambda>", 8
    lines = ["import ekko", "from ekko import rowmath as rm", "",
             f"def opt_fn(g, w{params}, *{keywords}):", f"    {first}", f"    {ret}", "",
             register, ""]
    return "\n".join(lines), name, line


def _run_definition(case: dict) -> dict:
    """Define the optimizer from a file; a valid one is compiled and run once, and
    taken out of the catalog again either way."""
    import runpy
    import tempfile

    import ekko
    from ekko.dialects import catalog

    text, name, line = definition_source(case)
    before = dict(catalog.OPTIMIZERS)
    with catalog.OPTIMIZERS.scoped():  # what the definition adds is gone afterwards
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/definition.py"
            Path(path).write_text(text)
            try:
                runpy.run_path(path)
            except ekko.EkkoError as e:
                return _judge_refusal(str(e), f"{path}:{line}: optimizer {name}: ", line,
                                      catalog.OPTIMIZERS == before, text)
            except BaseException:
                return {"kind": "exception", "detail": traceback.format_exc()[-1500:] + "\n" + text}
        if line is not None:
            return {"kind": "accepted", "detail": f"accepted a definition with {case['defect']}"
                                                  f"\n{text}"}
        return _run_user_optimizer(name, case)


def _judge_refusal(message: str, want: str, line: int | None, catalog_kept: bool,
                   text: str) -> dict:
    if not catalog_kept:
        return {"kind": "half-applied", "detail": f"refused ({message}) but the catalog changed"}
    if line is None:
        return {"kind": "refused", "detail": f"a valid definition refused: {message}\n{text}"}
    if "\n" in message or not message.startswith(want):
        return {"kind": "unlocated", "detail": f"expected {want!r}...: {message}\n{text}"}
    return {"kind": "ok"}


def _run_user_optimizer(name: str, case: dict) -> dict:
    import numpy as np

    import ekko

    try:
        k = ekko.update_kernel(name, 4)
        table = np.ones((5, 4), np.float32)
        shape = (5,) if case["rowwise"] else (5, 4)
        state = [np.zeros(shape, np.float32) for _ in range(case["states"])]
        k(table, np.array([1, 3, 1]), np.ones((3, 4), np.float32),
          state=None if not state else state[0] if len(state) == 1 else tuple(state))
    except Exception:
        return {"kind": "exception", "detail": traceback.format_exc()[-1500:]}
    return {"kind": "ok"}
