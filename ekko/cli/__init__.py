"""The `ekko` command (`ekko compile`, `ekko run [--replicas N]`): one parser in
`commands`; `run` the kernels-only run, `replicas` the run through the engine.

The CLI sits on top of every layer (engine, kernels, compiler); nothing
below imports it. `ekko-opt` is the compiler's own tool
(`ekko.compiler.tools.ekko_opt`).
"""

from .commands import build_parser, main

__all__ = ["build_parser", "main"]
