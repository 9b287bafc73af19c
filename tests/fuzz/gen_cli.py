"""Command lines for `ekko-opt`, `ekko run` and `ekko compile`.

A case is an argv with `{tmp}` standing for a fresh directory holding a
small module, a tiny model, a model with no tables, one with a 5,000-digit
row count, one whose table and feature share a name and a `.py` factory that
returns no model; a stored case may also
name the exit code it must end with (`expect_exit`). The real command runs under a timeout. Oracle: it ends by
itself with exit 0 or 1 (or 2: `ekko run`'s failed reference check), says
"error" when it fails, and prints no traceback; an unknown `-t` target is
exit 1, never argparse's usage and exit 2.
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
from pathlib import Path

from .gen_model import PIPELINE
from .oracle import run_tool

TIMEOUT_S = 120.0
FILES = {
    "input.mlir": (
        "func.func @a(%t: !emb.table<10x4xf32>, %ids: tensor<?xi64>, %rows: tensor<?x4xf32>)"
        " -> !emb.table<10x4xf32> {\n"
        "  %d = upd.delta %ids, %rows : tensor<?xi64>, tensor<?x4xf32>\n"
        "  %t2 = upd.sgd %t, %d {lr = 1.000000e-01 : f64} : !emb.table<10x4xf32>, "
        "!upd.delta<4xf32, i64>\n"
        "  func.return %t2 : !emb.table<10x4xf32>\n}\n"),
    "model.ekko": "model tiny {\n  table t { rows 100; dim 8; serving int8; }\n"
                  "  feature f -> t;\n}\n",
    "empty.ekko": "model nothing { }\n",
    "bad.py": "def build():\n    return 42\n",
    "big.ekko": "model big { table t { rows " + "9" * 5000 + "; dim 4; } feature f -> t; }\n",
    "shared.ekko": "model shared {\n  table user { rows 50; dim 4; serving int8; }\n"
                   "  feature user -> user;\n}\n",  # a table and a feature of one name
}
OPT_FLAGS: list[tuple[str, list[str]]] = [
    ("-p", [PIPELINE, "no-such-pass", "upd-schedule{partitions=-1}", "upd-schedule{tile=0}",
            "upd-schedule{prefetch=999}", "upd-schedule{prefetch=4 target=triton}",
            "upd-schedule{partitions=99999999999999999999}", "", ",", "upd-dedup{", "}"]),
    ("-t", ["llvm", "mlir", "triton", "nonsense", "", "LLVM", "llvm{x=1}", "mlir{", "bogus",
            "x86-asm", "riscv-asm", "wat", "mps"]),
    ("-f", ["mlir", "ekko", "bogus"]),
    ("-o", ["{tmp}/out.mlir", "{tmp}", "{tmp}/missing/out.mlir", "{tmp}/model.ekko/out"]),
    ("--split-input-file", []), ("--verify-diagnostics", []), ("--print-op-generic", []),
    ("--allow-unregistered-dialect", []), ("--no-implicit-module", []),
    ("--parsing-diagnostics", []), ("--print-between-passes", []), ("--time-passes", []),
    ("--list-passes", []), ("--version", []), ("--print-debuginfo", []),
]
UNKNOWN_TARGETS = ("nonsense", "", "LLVM", "llvm{x=1}", "mlir{", "bogus")  # each: exit 1
OPT_INPUTS = ["{tmp}/input.mlir", "{tmp}/model.ekko", "{tmp}/empty.ekko", "{tmp}/missing.mlir",
              "{tmp}", "{tmp}/bad.py", "{tmp}/shared.ekko"]
RUN_VALUES: dict[str, list[str]] = {
    "--scale": ["inf", "nan", "-1", "0", "1e-12", "1e300", "x", "1e6"],
    "--steps": ["-1", "0", "1", "99999999999999999999999", "x"],
    "--batch": ["0", "-5", "1", "1099511627776", "1.5"],
    "--seed": ["-1", "99999999999999999999999", "x"],
    "--partitions": ["-1", "0", "1000", "1099511627776"],
    "--optimizer": ["adam(lr=-1)", "lamb", "sgd(lr=nan)", "sgd(", "sgd(lr=1e400)",
                    "adam(beta1=1)", "rowwise_adagrad(eps=0)", "", "sgd(lr=0.1)"],
    "--serving": ["int2", "", "int4"],
    "--pooling": ["0", "-1", "1e9", "nan"],
    "--zipf": ["-1", "nan", "inf", "0"],
    "--replicas": ["-1", "0", "1099511627776"],
    "--bandwidth": ["0", "-1", "nan"],
}
TUNE_VALUES: dict[str, list[str]] = {  # always with --dry-run: nothing is recorded
    "--dims": ["0", "8,8", "x", "", "16385", "8,", "4", "99999999999999999999999"],
    "--candidates": ["0", "257", "2,2", "1", "-3"],
    "--threads": ["-1", "0", "1", "5000"],
    "--rounds": ["0", "1", "1001"],
    "--table-mib": ["0", "-1", "1", "1048577"],
}
MODELS = ["{tmp}/model.ekko", "{tmp}/empty.ekko", "{tmp}/big.ekko", "{tmp}/bad.py:build", "{tmp}/missing.ekko",
          "{tmp}", "{tmp}/model.ekko:build", "{tmp}/input.mlir", "{tmp}/shared.ekko"]


def generate(rng: random.Random) -> dict:
    tool = rng.choice(["ekko-opt", "ekko-opt", "run", "compile", "tune"])
    if tool == "tune":
        argv = ["ekko", "tune", "--dry-run", "--dims", "8", "--table-mib", "1", "--rounds", "1"]
        for flag in rng.sample(sorted(TUNE_VALUES), rng.randrange(0, 3)):
            argv += [flag, rng.choice(TUNE_VALUES[flag])]
        return {"target": "cli", "argv": argv}
    if tool == "ekko-opt":
        argv = ["ekko-opt"]
        if rng.random() < 0.9:
            argv.append(rng.choice(OPT_INPUTS))
        for flag, values in rng.sample(OPT_FLAGS, rng.randrange(1, 4)):
            argv += [flag, rng.choice(values)] if values else [flag]
        case = {"target": "cli", "argv": argv}
        if "-t" in argv and argv[argv.index("-t") + 1] in UNKNOWN_TARGETS \
                and "--version" not in argv:
            case["expect_exit"] = 1  # whatever else is wrong: -t's mistake is exit 1 too
        return case
    model = "{tmp}/model.ekko" if rng.random() < 0.6 else rng.choice(MODELS)
    argv = ["ekko", tool, model, "-q", "--scale", "1"]
    if tool == "run":
        argv += ["--steps", "2", "--batch", "64"]
    else:
        argv += ["-o", rng.choice(["{tmp}/out", "{tmp}/model.ekko", "{tmp}/model.ekko/sub",
                                   "{tmp}/out"])]
    for flag in rng.sample(sorted(RUN_VALUES), rng.randrange(0, 3)):
        if tool == "compile" and flag not in ("--scale", "--partitions", "--optimizer",
                                              "--serving"):
            continue
        argv += [flag, rng.choice(RUN_VALUES[flag])]
    return {"target": "cli", "argv": argv}


def run(case: dict) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="ekko-fuzz-"))
    try:
        for name, text in FILES.items():
            (tmp / name).write_text(text)
        argv = [a.replace("{tmp}", str(tmp)) for a in case["argv"]]
        exe = shutil.which(argv[0]) or str(Path(sys.executable).with_name(argv[0]))
        rc, out, err = run_tool([exe, *argv[1:]], TIMEOUT_S, cwd=tmp)
        result = judge_cli(rc, out, err, reference_check=argv[:2] == ["ekko", "run"])
        if result["kind"] == "ok" and "expect_exit" in case and rc != case["expect_exit"]:
            result = {"kind": "exit-code", "detail": f"exit {rc}, expected {case['expect_exit']}"
                                                     f"\n{err[-1500:]}"}
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def judge_cli(rc: int, out: str, err: str, reference_check: bool = False) -> dict:
    """Exit 0 or 1 (2 only for a run whose reference check failed), with a message."""
    if err.startswith("TIMEOUT"):
        return {"kind": "hang", "detail": err[-1500:]}
    if "Traceback" in err or "Traceback" in out:
        return {"kind": "traceback", "detail": err[-1500:]}
    if rc < 0:
        return {"kind": "crash", "detail": f"killed by signal {-rc}\n{err[-1500:]}"}
    if rc not in ((0, 1, 2) if reference_check else (0, 1)):
        return {"kind": "exit-code", "detail": f"exit {rc}\n{err[-1500:]}"}
    if "internal error" in err:
        return {"kind": "internal-error", "detail": err[-1500:]}
    if rc != 0 and "error" not in err.lower() and "usage" not in err.lower():
        return {"kind": "silent-failure", "detail": f"exit {rc} without a message\n{err[-500:]}"}
    return {"kind": "ok"}
