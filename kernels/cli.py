"""The `ekko` command: compile a model, or compile and run it on synthetic traffic.

  ekko compile MODEL -o DIR   IR after each stage (--emit-ir), native kernels
                              (.ll and .o per distinct kernel) and manifest.json
  ekko run MODEL              build the tables, stream a Zipf update stream
                              through the update kernels while serving
                              lookups, check a sample against numpy, report

MODEL is a `.ekko` file or `path/to/module.py:factory` (a torch model). The
CLI lives in `kernels` because `run` needs the runtime; it only asks the
compiler for IR and specs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..compiler.backend.spec import UpdateSpec
from ..compiler.diagnostics import EkkoDiagnostic
from ..compiler.frontend import ModelError
from . import jit
from .errors import EkkoError
from .model import STAGES, CompiledModel, compile_model
from .traffic import RunConfig, run_traffic


class Progress:
    """Timestamped progress lines on stderr (quiet with --quiet)."""

    def __init__(self, quiet: bool = False):
        self.start = time.perf_counter()
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.start:6.2f}s] {message}", file=sys.stderr, flush=True)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a .ekko file or path/to/module.py:factory")
    p.add_argument("--scale", type=float, default=None,
                   help="multiply every table's rows by this factor (default: 1 for compile, 0.1 for run)")
    p.add_argument("--partitions", type=int, default=0,
                   help="threads per update and lookup kernel (default: one per core)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ekko", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile a model to IR, native kernels and a manifest")
    _add_model_args(c)
    c.add_argument("-o", "--output", required=True, help="output folder")
    c.add_argument("--emit-ir", choices=("none", "model", "kernel", "all"), default="all",
                   help="which IR stages to write (default: all)")
    r = sub.add_parser("run", help="compile, then stream updates while serving lookups")
    _add_model_args(r)
    r.add_argument("--steps", type=int, default=50, help="update steps (default 50)")
    r.add_argument("--batch", type=int, default=4096,
                   help="samples per step: ids per table per step, bags per lookup (default 4096)")
    r.add_argument("--pooling", type=int, default=1, help="mean ids per bag (default 1)")
    r.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent of ids (default 1.05)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _compile(args: argparse.Namespace, progress: Progress) -> CompiledModel:
    scale = args.scale if args.scale is not None else default_scale(args)
    return compile_model(args.model, scale=scale, partitions=args.partitions, progress=progress)


def default_scale(args: argparse.Namespace) -> float:
    """compile keeps real sizes; run scales to fit a small machine in under a minute."""
    return 1.0 if args.command == "compile" else 0.1


def cmd_compile(args: argparse.Namespace) -> int:
    progress = Progress(args.quiet)
    compiled = _compile(args, progress)
    out = Path(args.output)
    (out / "kernels").mkdir(parents=True, exist_ok=True)
    wanted = {"none": (), "model": ("model",), "kernel": ("lower-to-kernel",), "all": STAGES}
    if wanted[args.emit_ir]:
        (out / "ir").mkdir(exist_ok=True)
    for i, stage in enumerate(STAGES):
        if stage in wanted[args.emit_ir] and stage in compiled.ir:
            (out / "ir" / f"{i}-{stage}.mlir").write_text(compiled.ir[stage])
    manifest = compiled.manifest()
    for entry in manifest["kernels"]:
        spec = compiled_spec(compiled, entry["used_by"][0])
        obj, optimized = jit.emit_object(llvm_ir_of(spec))
        stem = out / "kernels" / f"kernel{entry['id']}"
        stem.with_suffix(".ll").write_text(optimized)
        stem.with_suffix(".o").write_bytes(obj)
        entry["files"] = [f"kernels/{stem.name}.ll", f"kernels/{stem.name}.o"]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    progress(f"wrote {len(manifest['kernels'])} kernels and manifest.json to {out}")
    return 0


def compiled_spec(compiled: CompiledModel, name: str):
    return compiled.update_specs.get(name) or compiled.bag_specs[name]


def llvm_ir_of(spec) -> str:
    from ..compiler.backend.llvm_bag import emit_bag
    from ..compiler.backend.llvm_update import emit_update

    return emit_update(spec) if isinstance(spec, UpdateSpec) else emit_bag(spec)


def cmd_run(args: argparse.Namespace) -> int:
    progress = Progress(args.quiet)
    compiled = _compile(args, progress)
    progress(f"compiled in {compiled.compile_seconds:.2f}s; allocating tables")
    compiled.materialize(seed=args.seed)
    config = RunConfig(steps=args.steps, batch=args.batch, pooling=args.pooling,
                       zipf=args.zipf, seed=args.seed)
    report = run_traffic(compiled, config, progress)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(report.format())
    return 0 if report.check_passed else 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"compile": cmd_compile, "run": cmd_run}[args.command](args)
    except (ModelError, EkkoDiagnostic, EkkoError) as e:
        text = str(e)
        print(text if ": error:" in text else f"ekko: error: {text}", file=sys.stderr)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"ekko: error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

