"""ekko's fuzz harness: generated and mutated inputs for every way in.

Targets, each a module with `generate(rng) -> case` (a JSON-able dict):

* `ir`    IR text for ekko-opt: mutations of the lit inputs under
          tests/filecheck/ and generated modules, with and without passes.
* `model` `.ekko` files: mutations of the examples and lit inputs, and
          generated models, through ekko-opt and the standard pipeline.
* `api`   `ekko.update_kernel` / `ekko.bag_kernel` and the kernels they
          return, called with wrong dtypes, shapes, byte order, strides,
          aliasing, out-of-range ids, NaN/inf and huge values.
* `cli`   flags for the `ekko` and `ekko-opt` commands.
* `durable` a primary shard's log and snapshots, damaged every way a disk
          or a kill can: a torn tail is cut, other damage refused (or cut
          on request) and named, never a silently older state.
* `engine` `ekko.Engine` operations from several threads at once, with bad
          input and garbled or semantically damaged packets (gen_engine.py).

The oracle (`oracle.py`): never a traceback, crash or hang. ekko-opt's and
the model language's errors carry `file:line:col`; the Python API raises
nothing but `ekko.EkkoError`, and when it does every buffer is
byte-identical to before; inputs that must be rejected are. `ir`, `model`,
`api` and `engine` cases run in a worker process (a crash or hang there is
detected and the worker restarted); `cli` cases run the real commands.

`python -m tests.fuzz --minutes N` runs a campaign and writes each new
failure as a case file under tests/fuzz/regressions/; pytest replays every
one of them and runs a short seeded campaign (tests/test_fuzz.py).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REGRESSIONS = Path(__file__).resolve().parent / "regressions"
CHECKOUT = Path(__file__).resolve().parents[2]
TARGETS = ("ir", "model", "api", "cli", "durable", "engine")


def generator(target: str) -> Callable[[random.Random], dict]:
    """The case generator of `target`."""
    from . import gen_api, gen_cli, gen_durable, gen_engine, gen_ir, gen_model

    return {"ir": gen_ir.generate, "model": gen_model.generate, "api": gen_api.generate,
            "cli": gen_cli.generate, "durable": gen_durable.generate,
            "engine": gen_engine.generate}[target]


def signature(case: dict, result: dict) -> str:
    """What makes two failures the same: target, kind and the message without numbers."""
    lines = [line.strip() for line in result.get("detail", "").split("\n") if line.strip()] or [""]
    # an exception says what it is on its last line; a diagnostic on its first
    line = lines[-1] if result["kind"] in ("traceback", "exception", "harness-error") else lines[0]
    detail = re.sub(r"\d+", "N", line)[:160]
    detail = re.sub(r"(/[\w.+-]+)+", "PATH", detail)
    return f"{case['target']}|{result['kind']}|{detail}"


def case_id(case: dict) -> str:
    blob = json.dumps(case, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def load_regressions() -> list[tuple[Path, dict]]:
    """Every stored regression case, oldest first by name."""
    return [(p, json.loads(p.read_text())) for p in sorted(REGRESSIONS.glob("*.json"))]


def portable(text: str) -> str:
    """A traceback without this machine's paths: files under the checkout relative to it,
    installed packages from site-packages/ on (a stored case says where, not whose)."""
    text = re.sub(r"[^\s\"']*/site-packages/", "site-packages/", text)
    return text.replace(f"{CHECKOUT}/", "")


def save_regression(case: dict, result: dict, note: str = "") -> Path:
    """Store a failing case with what it did, so pytest replays it from now on."""
    REGRESSIONS.mkdir(exist_ok=True)
    path = REGRESSIONS / f"{case['target']}-{case_id(case)}.json"
    record = {"case": case, "found": {"kind": result["kind"],
                                      "detail": portable(result.get("detail", ""))[-2000:]},
              "signature": signature(case, result)}
    if note:
        record["note"] = note
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return path
