"""`.ekko` model files: generated models and mutations of the ones in the repo.

A case runs ekko-opt on the file with the standard pipeline in the worker:
a model the language accepts must compile to kernels, and one it rejects
must be rejected with `file:line:col: error:` (never later, by a verifier,
with no position in the model). Generated models give tables and features
names that clash in the IR unless it tells them apart: a feature named as
its table, or as another's function (`serve_t0`, `update_t0`).
"""

from __future__ import annotations

import contextlib
import io
import random
import re
import tempfile
import traceback
from functools import lru_cache
from pathlib import Path

from ekko.compiler.registry import pipeline_spec
from ekko.dialects import catalog

from . import REPO
from .mutate import mutate

PIPELINE = pipeline_spec("standard")
OPTIMIZERS = ["sgd", "adagrad", "rowwise_adagrad", "adam"]
HYPER = {"sgd": ["lr"], "adagrad": ["lr", "eps", "lr_decay"], "rowwise_adagrad": ["lr", "eps"],
         "adam": ["lr", "beta1", "beta2", "eps"]}
LAYOUTS = list(catalog.LAYOUTS)
VOCABULARY = ["model", "table", "feature", "defaults", "dense", "rows", "dim", "dtype",
              "optimizer", "serving", "clip", "weight_decay", "stochastic_rounding", "pooling",
              "bottom", "top", "interaction", "->", ";", "{", "}", "(", ")", ",", "=", "sum",
              "mean", "none", "max", "dot", "cat", "max_norm", "clip_value", "lr", "eps",
              "beta1", "beta2", "lr_decay", "momentum", *OPTIMIZERS, *LAYOUTS, "int2", "f64",
              "t0", "t1", "f0", "unknown", "0", "-1", "1e400", "16385", "// c", "# c"]


def _value(rng: random.Random, good: float) -> str:
    """Mostly a sane value, sometimes an edge: zero, negative, huge, tiny."""
    if rng.random() < 0.85:
        return repr(good)
    return rng.choice(["0", "-1", "1e400", "1e-320", "1e308", "0.0", "1", "2"])


def random_model(rng: random.Random) -> str:
    """A model in the language, valid most of the time."""
    lines = [f"model m{rng.randrange(100)} {{"]
    if rng.random() < 0.3:
        dim, serving = rng.choice([4, 8, 16]), rng.choice(LAYOUTS)
        lines.append(f"  defaults {{ dim {dim}; serving {serving}; }}")
    tables = []
    for k in range(rng.randrange(1, 4)):
        # or a name like another's function in the IR (`@update_t0`, `@serve_f1`)
        name = rng.choice([f"t{k}", f"t{k}", f"t{k}", f"serve_f{k}",
                           f"update_{tables[-1]}" if tables else f"t{k}"])
        tables.append(name)
        settings = [f"rows {rng.choice([1, 2, 10, 1000])};",
                    f"dim {rng.choice([1, 2, 3, 8, 16, 33])};"]
        dtype = rng.choice(["f32", "f32", "f16", "bf16"])
        if dtype != "f32" or rng.random() < 0.2:
            settings.append(f"dtype {dtype};")
        opt = rng.choice(OPTIMIZERS)
        names = rng.sample(HYPER[opt], rng.randrange(len(HYPER[opt]) + 1))
        goods = {"lr": 0.05, "eps": 1e-8, "lr_decay": 0.01, "beta1": 0.9, "beta2": 0.99}
        hyper = ", ".join(f"{n}={_value(rng, goods[n])}" for n in names)
        settings.append(f"optimizer {opt}({hyper});" if hyper or rng.random() < 0.5
                        else f"optimizer {opt};")
        if rng.random() < 0.6:
            settings.append(f"serving {rng.choice(LAYOUTS)};")
        if rng.random() < 0.3:
            clips = rng.sample(["max_norm", "clip_value"], rng.randrange(1, 3))
            settings.append("clip " + ", ".join(f"{c}={_value(rng, 1.0)}" for c in clips) + ";")
        if rng.random() < 0.3:
            settings.append(f"weight_decay {_value(rng, 1e-4)};")
        if dtype != "f32" and rng.random() < 0.3:
            settings.append("stochastic_rounding;")
        rng.shuffle(settings)
        lines.append(f"  table {name} {{ {' '.join(settings)} }}")
    for k, table in enumerate(tables):
        pooling = rng.choice(["", " pooling sum", " pooling mean", " pooling none"])
        # a feature may share its table's name, or look like a function of the IR
        name = rng.choice([f"f{k}", f"f{k}", table, f"serve_{table}", f"update_{table}"])
        lines.append(f"  feature {name} -> {table}{pooling};")
    if rng.random() < 0.3:
        lines.append("  dense { bottom 13 -> 64 -> 16; top 64 -> 1; interaction dot; }")
    lines.append("}")
    return "\n".join(lines) + "\n"


@lru_cache(maxsize=1)
def corpus() -> tuple[str, ...]:
    """The repo's models: examples and the lit inputs, without their RUN/CHECK lines."""
    texts = []
    for path in sorted([*REPO.glob("examples/*.ekko"), *REPO.glob("tests/filecheck/**/*.ekko")]):
        text = "\n".join(line for line in path.read_text().split("\n")
                         if not re.match(r"\s*//\s*(RUN|CHECK)", line))
        texts.append(text)
    return tuple(texts)


def generate(rng: random.Random) -> dict:
    roll = rng.random()
    if roll < 0.25:
        text = random_model(rng)
    else:
        base = random_model(rng) if roll < 0.6 or not corpus() else rng.choice(corpus())
        gentle = rng.random() < 0.4
        text = mutate(base, rng, VOCABULARY, rounds=1 if gentle else 3, gentle=gentle)
    args = ["-p", PIPELINE] if rng.random() < 0.8 else []
    return {"target": "model", "text": text, "args": args}


def run(case: dict) -> dict:
    """ekko-opt on the model, in this process (the worker)."""
    return run_tool_in_process(case, ".ekko")


def run_tool_in_process(case: dict, suffix: str) -> dict:
    """ekko_opt.main on the case's text, judged; shared with the IR target."""
    from ekko.compiler.tools.ekko_opt import main

    from .oracle import judge_tool

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"input{suffix}"
        if "data_hex" in case:
            path.write_bytes(bytes.fromhex(case["data_hex"]))
        else:
            path.write_text(case["text"], encoding="utf-8", errors="surrogatepass")
        rc, out, err = _main(main, [str(path), *case["args"]])
        text = None if "data_hex" in case or "// -----" in case.get("text", "") else case["text"]
        result = judge_tool(rc, out, err, str(path), text)
        if result["kind"] == "ok" and rc == 0 and suffix == ".ekko":
            result = _check_accepted_model(case["text"])
        if result["kind"] == "ok" and rc == 0 and case.get("roundtrip"):
            result = _round_trip(main, out, case["args"], Path(tmp))
        return result


def _round_trip(main, out: str, args: list[str], tmp: Path) -> dict:
    """Printed IR parses back, and printing is stable from the second print on
    (xDSL moves a module's `attributes {sym_name}` into properties once)."""
    texts = [out]
    for k in range(2):
        again = tmp / f"again{k}.mlir"
        again.write_text(texts[-1])
        rc, printed, err = _main(main, [str(again), *args])
        if rc != 0:
            return {"kind": "roundtrip", "detail": f"printed IR does not parse back\n{err[-1500:]}"}
        texts.append(printed)
    if texts[1] != texts[2]:
        return {"kind": "roundtrip", "detail": "printing parsed IR is not stable\n"
                + texts[1][:700] + "\n---\n" + texts[2][:700]}
    return {"kind": "ok"}


def _check_accepted_model(text: str) -> dict:
    """A model the language accepted keeps every documented limit."""
    import math

    from ekko.compiler.frontend import parse_model

    max_rows, max_dim = _limits()
    model = parse_model(text)
    for t in model.tables:
        rule = t.update
        numbers = [v for _, v in rule.optimizer.hyper] + [rule.weight_decay] + \
            [v for v in (rule.max_norm, rule.clip_value) if v is not None]
        finite = all(map(math.isfinite, numbers))
        problems = [] if finite else [f"{t.name}: a non-finite number"]
        problems += [f"{t.name}: {what} {v} beyond {lim}" for what, v, lim in
                     (("rows", t.rows, max_rows), ("dim", t.dim, max_dim)) if v > lim]
        if problems:
            return {"kind": "accepted", "detail": "accepted a model: " + "; ".join(problems)}
    return {"kind": "ok"}


def _limits() -> tuple[int, int]:
    """dialects/limits.py's rows and dim limits (its values where it does not exist yet)."""
    try:
        from ekko.dialects import limits
    except ImportError:
        return 1 << 40, 1 << 14
    return limits.MAX_ROWS, limits.MAX_DIM


def _main(main, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except BaseException:  # escaping main is exactly what the oracle flags
            return 99, out.getvalue(), "Traceback (escaped main)\n" + traceback.format_exc()
    return rc, out.getvalue(), err.getvalue()
