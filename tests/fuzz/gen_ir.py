"""IR text for ekko-opt: mutations of the lit inputs and of generated modules.

Generated modules come from random models through the frontend (model and
kernel level), so they follow the dialects' current syntax. A case runs
ekko-opt in the worker, sometimes with the standard pipeline, `-t llvm`,
the generic printer or `--split-input-file`; a run that succeeds without
passes must print text that parses back to the same text.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

from . import REPO
from .gen_model import PIPELINE, random_model, run_tool_in_process
from .mutate import mutate

VOCABULARY = ["emb.table", "emb.feature", "emb.bag", "emb.lookup", "upd.delta", "upd.dedup",
              "upd.clip", "upd.weight_decay", "upd.sgd", "upd.adagrad", "upd.rowwise_adagrad",
              "upd.adam", "upd.apply", "upd.requantize", "upd.stamp", "kern.update", "kern.bag",
              "func.func", "func.return", "builtin.module", "i1", "i8", "i16", "i32", "i64",
              "i128", "index", "f16", "bf16", "f32", "f64", "?", "x", "unique",
              "!emb.table<0x4xf32>",
              "!emb.table<4x4xint4>", "!emb.state<4x1>", "!emb.versions<4>", "tensor<?x?xf32>",
              "memref<?xi8>", "!upd.delta<4xf32, i64>", "\"sum\"", "\"mean\"", "\"max\"",
              "\"int8\"", "\"int9\"", "#emb.layout<int8>", "#emb.layout<int9>", "\"adam\"",
              "\"lamb\"", "lr", "eps", "beta1", "max_norm",
              "clip_value", "decay", "partitions", "{}", "()", "%0", "%undefined", "@nowhere",
              "0x7FF8000000000000 : f64", "-1.0 : f64", "1e400", "\"str\"", "unit", "dedup",
              "hyper", "operandSegmentSizes", "resultSegmentSizes", "array<i32: 1, 0, 1>",
              "array<i32: -1>", "<{}>", "serving_layout", "weighted", "seq", "order",
              "\"input\"", "\"bucket\"", "\"id\"", "\"sorted\"", "prefetch", "257 : i64"]
ARGS = [[], [], ["--print-op-generic"], ["-p", PIPELINE], ["-p", PIPELINE], ["-p", "upd-dedup"],
        ["-p", "upd-dedup,upd-fuse"], ["-p", PIPELINE, "-t", "llvm"], ["--split-input-file"],
        ["-p", "upd-dedup,upd-fuse,upd-schedule{partitions=3 order=id tile=8}"],
        ["-p", "upd-dedup,upd-fuse,upd-schedule{order=bucket},lower-to-kernel", "-t", "llvm"],
        ["-p", "upd-dedup,upd-fuse,upd-schedule{prefetch=3},lower-to-kernel", "-t", "llvm"]]


@lru_cache(maxsize=1)
def corpus() -> tuple[str, ...]:
    """The lit inputs, split at `// -----`, without comment lines."""
    chunks = []
    for path in sorted(REPO.glob("tests/filecheck/**/*.mlir")):
        for chunk in path.read_bytes().decode("utf-8", "replace").split("// -----"):
            text = "\n".join(line for line in chunk.split("\n") if not re.match(r"\s*//", line))
            if text.strip():
                chunks.append(text.strip() + "\n")
    return tuple(chunks)


@lru_cache(maxsize=1)
def valid_corpus() -> tuple[str, ...]:
    """The lit inputs that parse and verify: mutating these reaches the verifiers."""
    from xdsl.parser import Parser

    from ekko.compiler.diagnostics import scan_ir_text
    from ekko.compiler.registry import make_context

    valid = []
    for text in corpus():
        if scan_ir_text(text) is not None:
            continue  # xDSL's lexer would hang on it: ekko-opt's guard keeps it out
        try:
            Parser(make_context(), text).parse_module().verify()
        except Exception:  # an invalid-IR test input, or one needing other dialects
            continue
        valid.append(text)
    return tuple(valid) or corpus()


def generated_module(rng: random.Random) -> str | None:
    """A random model's IR, at the model level or after the pipeline; None if invalid."""
    from ekko.compiler.frontend import ModelError, parse_model
    from ekko.compiler.frontend_to_ir import model_to_module

    try:
        module = model_to_module(parse_model(random_model(rng)))
        if rng.random() < 0.3:
            from ekko.compiler.pipeline import run_pipeline

            module = run_pipeline(module)
    except (ModelError, ValueError, TypeError):
        return None
    except Exception:  # a failure here is the model target's to report
        return None
    return str(module) + "\n"


def generate(rng: random.Random) -> dict:
    roll = rng.random()
    base = generated_module(rng) if roll < 0.4 else None
    if base is None:
        base = rng.choice(valid_corpus() if roll < 0.7 else corpus())
    args = rng.choice(ARGS)
    if rng.random() < 0.03:
        return {"target": "ir", "data_hex": bytes(rng.randrange(256) for _ in range(
            rng.randrange(1, 300))).hex(), "args": args}
    gentle = rng.random() < 0.5
    text = mutate(base, rng, VOCABULARY, rounds=1 if gentle else 3, gentle=gentle)
    roundtrip = args in ([], ["--print-op-generic"])
    return {"target": "ir", "text": text, "args": args, "roundtrip": roundtrip}


def run(case: dict) -> dict:
    return run_tool_in_process(case, ".mlir")
