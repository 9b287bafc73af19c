"""The fuzz worker: reads one JSON case per line, answers one JSON result per line.

Answers go to a private copy of the original stdout; file descriptor 1 is
pointed at stderr, so native code that prints (LLVM) cannot corrupt them.
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def main() -> None:
    # api cases on target="triton" pass CPU tensors: Triton's interpreter runs them
    os.environ.setdefault("TRITON_INTERPRET", "1")
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    from . import gen_api, gen_durable, gen_engine, gen_ir, gen_model

    runners = {"ir": gen_ir.run, "model": gen_model.run, "api": gen_api.run,
               "durable": gen_durable.run, "engine": gen_engine.run}
    for line in sys.stdin:
        case = json.loads(line)
        try:
            result = runners[case["target"]](case)
        except BaseException:  # the harness's own bug: report it, keep serving
            result = {"kind": "harness-error", "detail": traceback.format_exc()[-2000:]}
        answers.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
