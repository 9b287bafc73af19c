"""The `ekko` command: compile a model, or compile and run it on synthetic traffic.

  ekko compile MODEL -o DIR   IR after each stage (--emit-ir), native kernels
                              (.ll and .o per distinct kernel) and manifest.json
  ekko run MODEL              build the tables, stream a Zipf update stream
                              through the update kernels while serving
                              lookups, check a sample against numpy, report
  ekko run MODEL --replicas N the same through the update engine: a primary,
                              N serving replicas kept fresh (ekko.cli.replicas)
  ekko tune                   measure this machine's best prefetch distance of
                              the CPU update per dim and keep it, for every
                              kernel compiled here afterwards (ekko.kernels.tune)

MODEL is a `.ekko` file or `path/to/module.py:factory` (a torch model).
--optimizer and --serving set every table's optimizer and serving layout,
for either kind. This module is the one parser and the one place that
turns errors into messages; it sits above the engine, the kernels and the
compiler, and asks each only for what it owns.

Exit status: 0 done; 1 a mistake in the input (flags, model, output folder:
one `ekko: error: ...` or `file:line:col: error: ...` message); 2 `ekko
run`'s reference check failed, or a replica differs from the primary; 3 an
internal error (a bug: please report it; EKKO_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NoReturn

from ..compiler.backend.spec import serving_row_bytes
from ..compiler.backend.targets import TARGETS, target
from ..compiler.diagnostics import EkkoDiagnostic
from ..compiler.frontend import Model, ModelError, Optimizer, Table, load_model
from ..compiler.frontend.model import ModelInvalid
from ..compiler.backend.tuning import store_path, writable_store
from ..dialects.limits import MAX_BATCH, MAX_DIM, MAX_PREFETCH
from ..dialects import catalog
from ..kernels import backends, jit
from ..kernels.errors import EkkoError
from ..kernels.model import STAGES, CompiledModel, compile_model
from .run import RunConfig, run_traffic

EXIT_INPUT, EXIT_CHECK, EXIT_INTERNAL = 1, 2, 3
MAX_PARTITIONS = 1024
MAX_STEPS = 10**9
MAX_SEED = 2**63 - 1
MAX_FLAG_DIGITS = 30  # longer integers are refused before converting them


class CliError(Exception):
    """A mistake in the command line or its files: printed as `ekko: error: ...`."""


class Progress:
    """Timestamped progress lines on stderr (quiet with --quiet)."""

    def __init__(self, quiet: bool = False):
        self.start = time.perf_counter()
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            elapsed = time.perf_counter() - self.start
            print(f"[{elapsed:6.2f}s] {message}", file=sys.stderr, flush=True)


class Parser(argparse.ArgumentParser):
    """argparse, with usage mistakes as one `ekko: error:` line and exit 1."""

    def error(self, message: str) -> NoReturn:
        print(f"ekko: error: {_shorten(message)} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(EXIT_INPUT)


def _shorten(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def int_flag(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high], refusing overlong digits first."""

    def parse(text: str) -> int:
        digits = text.strip().lstrip("+-")
        if not re.fullmatch(r"[+-]?[0-9]+", text.strip()):
            raise argparse.ArgumentTypeError(f"expected an integer, got {_shorten(text, 40)!r}")
        if len(digits) > MAX_FLAG_DIGITS:
            raise argparse.ArgumentTypeError(
                f"a {len(digits)}-digit integer is out of range (limit {low}..{high})")
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range (limit {low}..{high})")
        return value

    return parse


def float_flag(low: float, high: float, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] ((low, high] when low_open)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a number, got {_shorten(text, 40)!r}") from None
        in_range = (value > low if low_open else value >= low) and value <= high
        if not (math.isfinite(value) and in_range):
            bracket = "(" if low_open else "["
            raise argparse.ArgumentTypeError(
                f"{_shorten(text, 40)} is out of range (limit {bracket}{low:g}, {high:g}])")
        return value

    return parse


def int_list_flag(low: int, high: int) -> Callable[[str], tuple[int, ...]]:
    """An argparse type: comma-separated integers, each in [low, high], each once."""
    one = int_flag(low, high)

    def parse(text: str) -> tuple[int, ...]:
        parts = text.split(",")
        if len(parts) > 64:
            raise argparse.ArgumentTypeError(f"at most 64 values, got {len(parts)}")
        values = tuple(one(part) for part in parts)
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"a value is given twice in {_shorten(text, 40)!r}")
        return values

    return parse


@dataclass(frozen=True)
class LaterOptimizer:
    """--optimizer naming no optimizer the catalog holds yet: a model file
    (`module.py:factory`) may define it with `@ekko.optimizer`, so it is
    resolved once the model is loaded."""

    name: str
    hyper: dict[str, float]

    def resolve(self) -> Optimizer:
        try:
            return Optimizer.make(self.name, **self.hyper)
        except ModelInvalid as e:
            raise CliError(f"argument --optimizer: {e}") from None


def optimizer_flag(text: str) -> Optimizer | LaterOptimizer:
    """`name` or `name(k=v, ...)`, as in the model language, checked like it."""
    match = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*(?:\((.*)\))?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"expected NAME or NAME(k=v, ...), got {_shorten(text, 60)!r}")
    hyper: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in (match.group(2) or "").split(","))):
        key, eq, value = part.partition("=")
        number = float_flag(-math.inf, math.inf)
        try:
            if not eq or not key.strip().isidentifier() or key.strip() in hyper:
                raise ValueError
            hyper[key.strip()] = number(value)
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(
                f"expected k=v with a finite number and each k once, got {_shorten(part, 40)!r}"
            ) from None
    if match.group(1) not in catalog.OPTIMIZERS:
        return LaterOptimizer(match.group(1), hyper)
    try:
        return Optimizer.make(match.group(1), **hyper)
    except ModelInvalid as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a .ekko file or path/to/module.py:factory")
    p.add_argument("--scale", type=float_flag(0.0, 1e12, low_open=True), default=None,
                   help="multiply every table's rows by this factor (default: 1 for compile, "
                        "0.1 for run)")
    p.add_argument("--partitions", type=int_flag(0, MAX_PARTITIONS), default=0,
                   help="threads per update and lookup kernel (default 0: one per core)")
    p.add_argument("--optimizer", type=optimizer_flag, default=None, metavar="NAME(k=v,...)",
                   help="every table's optimizer, e.g. 'adam(lr=0.001)' (default: the model's)")
    p.add_argument("--serving", choices=catalog.LAYOUTS.names(), default=None,
                   help="every table's serving layout (default: the model's)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(prog="ekko", description=__doc__.split("\n\n")[0],
                    epilog="exit status: 0 done, 1 bad input, 2 reference check failed, "
                           "3 internal error")
    parser.add_argument("--version", action="version", version=f"ekko {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="compile a model to IR, native kernels and a manifest")
    _add_model_args(c)
    c.add_argument("-o", "--output", required=True, help="output folder")
    c.add_argument("--emit-ir", choices=("none", "model", "kernel", "all"), default="all",
                   help="which IR stages to write (default: all)")
    c.add_argument("--target", choices=list(TARGETS), default="llvm",
                   help="triton: also each kernel's Triton source and its PTX for sm_90")
    r = sub.add_parser("run", help="compile, then stream updates while serving lookups")
    _add_model_args(r)
    r.add_argument("--steps", type=int_flag(1, MAX_STEPS), default=50,
                   help="update steps (default 50)")
    r.add_argument("--batch", type=int_flag(1, MAX_BATCH), default=4096,
                   help="samples per step: ids per table per step, bags per lookup (default 4096)")
    r.add_argument("--pooling", type=int_flag(1, 1_000_000), default=1,
                   help="mean ids per bag (default 1)")
    r.add_argument("--zipf", type=float_flag(0.0, 100.0), default=1.05,
                   help="Zipf exponent of ids, 0 for uniform (default 1.05)")
    r.add_argument("--seed", type=int_flag(0, MAX_SEED), default=0)
    r.add_argument("--json", action="store_true", help="print the report as JSON")
    r.add_argument("--replicas", type=int_flag(1, 64), default=None,
                   help="run the update engine with N serving replicas")
    r.add_argument("--bandwidth", type=float_flag(0.0, 1e15, low_open=True), default=None,
                   help="bytes/s per replica link (default: unlimited; needs --replicas)")
    r.add_argument("--cluster", default=None, metavar="ADDRESS",
                   help="run primary and replicas as Ray processes: 'local' starts Ray here, "
                        "'auto' or ray://HOST:PORT joins a cluster (needs --replicas)")
    t = sub.add_parser("tune", help="measure this machine's best prefetch distance for the CPU "
                                     "update and keep it for every later compile here")
    t.add_argument("--dims", type=int_list_flag(1, MAX_DIM), default=(16, 32, 64, 128, 256),
                   help="comma-separated row sizes to measure (default 16,32,64,128,256)")
    t.add_argument("--candidates", type=int_list_flag(1, MAX_PREFETCH), default=(4, 8, 16, 32),
                   help="prefetch distances to try, in positions (default 4,8,16,32)")
    t.add_argument("--threads", type=int_flag(0, MAX_PARTITIONS), default=0,
                   help="update threads (default 0: one per core)")
    t.add_argument("--rounds", type=int_flag(1, 1000), default=7,
                   help="timed updates per candidate, interleaved (default 7)")
    t.add_argument("--table-mib", type=int_flag(1, 1 << 20), default=512,
                   help="table size per dim, far beyond the last-level cache (default 512)")
    t.add_argument("--dry-run", action="store_true", help="measure and print; record nothing")
    t.add_argument("--json", action="store_true", help="print the measurements as JSON")
    return parser


def default_scale(args: argparse.Namespace) -> float:
    """compile keeps real sizes; run scales to fit a small machine in under a minute."""
    return 1.0 if args.command == "compile" else 0.1


def load(args: argparse.Namespace) -> Model:
    """The model the flags describe: loaded, scaled, --optimizer/--serving applied, checked."""
    scale = args.scale if args.scale is not None else default_scale(args)
    model = load_model(args.model, scale=scale)
    if not model.tables:
        raise CliError(f"{args.model}: the model has no tables: nothing to compile or run")
    if isinstance(args.optimizer, LaterOptimizer):
        args.optimizer = args.optimizer.resolve()
    if args.optimizer is not None or args.serving is not None:
        model = replace(model, tables=tuple(_flagged(t, args) for t in model.tables))
    try:
        model.validate()
    except ModelInvalid as e:
        raise CliError(f"{args.model}: {e}" + (f" (with --scale {scale:g})" if scale != 1 else "")
                       ) from None
    return model


def _flagged(t: Table, args: argparse.Namespace) -> Table:
    """A table with --optimizer (its update's optimizer; clipping, decay and
    rounding stay the model's) and --serving applied."""
    if args.optimizer is not None:
        t = replace(t, update=replace(t.update, optimizer=args.optimizer))
    return t if args.serving is None else replace(t, serving=args.serving)


def _compile(args: argparse.Namespace, model: Model, progress: Progress) -> CompiledModel:
    return compile_model(model, partitions=args.partitions, progress=progress)


def check_output_folder(out: Path) -> None:
    """-o must be a folder or creatable as one: refused before compiling anything."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                what = "is a file" if path == out else f"is under {path}, a file"
                raise CliError(f"-o {out}: {what}, not a folder")
            if not os.access(path, os.W_OK | os.X_OK):
                raise CliError(f"-o {out}: {path} is not writable")
            return


def cmd_compile(args: argparse.Namespace) -> int:
    out = Path(args.output)
    check_output_folder(out)
    progress = Progress(args.quiet)
    compiled = _compile(args, load(args), progress)
    staging = _stage_outputs(compiled, args.emit_ir, out, args.target)
    _publish(staging, out)
    progress(f"wrote {len(compiled.manifest()['kernels'])} kernels and manifest.json to {out}")
    return 0


def _stage_outputs(compiled: CompiledModel, emit_ir: str, out: Path, target: str = "llvm") -> Path:
    """Everything `compile` writes, in a fresh hidden folder inside `out`, moved into
    place by `_publish` only once all of it is written."""
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".ekko-compile-", dir=out))
    try:
        (staging / "kernels").mkdir()
        wanted = {"none": (), "model": ("model",), "kernel": ("lower-to-kernel",), "all": STAGES}
        if wanted[emit_ir]:
            (staging / "ir").mkdir()
        for i, stage in enumerate(STAGES):
            if stage in wanted[emit_ir] and stage in compiled.ir:
                (staging / "ir" / f"{i}-{stage}.mlir").write_text(compiled.ir[stage])
        manifest = compiled.manifest()
        specs = compiled.function_specs()
        for entry in manifest["kernels"]:
            spec = specs[entry["used_by"][0]]
            obj, optimized = jit.emit_object(llvm_ir_of(spec), prefix=f"k{entry['id']}_")
            stem = staging / "kernels" / f"kernel{entry['id']}"
            stem.with_suffix(".ll").write_text(optimized)
            stem.with_suffix(".o").write_bytes(obj)
            entry["files"] = [f"kernels/{stem.name}.ll", f"kernels/{stem.name}.o"]
            entry["files"] += _target_files(target, spec, stem)
        text = json.dumps(manifest, indent=2, default=str) + "\n"
        (staging / "manifest.json").write_text(text)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def _target_files(name: str, spec, stem: Path) -> list[str]:
    """What `--target NAME` writes beside a kernel's native object (Triton: its source and
    the PTX of each of its kernels), as its runtime exports them."""
    _, runtime = backends.backend(name)
    if runtime.export is None:
        return []
    try:
        files = runtime.export(spec)
    except ImportError as e:
        raise CliError(f"--target {name} needs {e.name or 'its runtime'}: "
                       f"pip install 'ekko[{name}]'") from None
    names = []
    for suffix, text in files.items():
        stem.with_name(stem.name + suffix).write_text(text)
        names.append(f"kernels/{stem.name}{suffix}")
    return names


def _publish(staging: Path, out: Path) -> None:
    """Replace ir/, kernels/ and manifest.json of `out` by the staged ones, manifest last."""
    try:
        for name in ("manifest.json", "ir", "kernels"):
            old = out / name
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            elif old.exists() or old.is_symlink():
                old.unlink()
        for name in ("ir", "kernels", "manifest.json"):
            if (staging / name).exists():
                (staging / name).rename(out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def llvm_ir_of(spec) -> str:
    """The native kernel's LLVM IR (every kernel has one, whatever --target adds)."""
    return target("llvm").emit(spec)


def available_memory() -> int | None:
    """Bytes this process may still allocate: MemAvailable, or the cgroup's room if less."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(used))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def state_values_per_row(optimizer: str, dim: int) -> int:
    """f32 optimizer-state values per row, from the catalog (unknown: two per element)."""
    if optimizer not in catalog.OPTIMIZERS:
        return 2 * dim
    return sum(1 if s.rowwise else dim for s in catalog.optimizer(optimizer).states)


def run_bytes(model: Model, cfg: RunConfig) -> int:
    """What `ekko run` allocates: tables, state, serving copies, versions, the Zipf
    samplers (16 bytes a row) and one step's deltas and lookups."""
    total = 0
    for t in model.tables:
        per_row = (serving_row_bytes(t.dtype, t.dim) + 4 * state_values_per_row(
            t.update.optimizer.kind, t.dim) + serving_row_bytes(t.serving, t.dim) + 8 + 16)
        total += t.rows * per_row + cfg.batch * (t.dim * 4 + 16)
    for f in model.features:
        dim = model.table(f.table).dim
        total += cfg.batch * (dim * 4 + 8 + (2 * cfg.pooling + 1) * 8)
    return total


def check_memory(model: Model, cfg: RunConfig) -> None:
    """Refuse, before allocating anything, a run that cannot fit in memory."""
    need, have = run_bytes(model, cfg), available_memory()
    if have is not None and need > have:
        raise CliError(
            f"the run needs {_gib(need)} of memory (tables, state, serving copies, one "
            f"step's traffic) but {_gib(have)} is available (limit: available memory); "
            "use a smaller --scale or --batch")


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n < 2**60 else f"{n / 2**60:,.3g} EiB"


def cmd_run(args: argparse.Namespace) -> int:
    progress = Progress(args.quiet)
    config = RunConfig(steps=args.steps, batch=args.batch, pooling=args.pooling,
                       zipf=args.zipf, seed=args.seed)
    if args.replicas is None:
        for flag in ("bandwidth", "cluster"):
            if getattr(args, flag) is not None:
                raise CliError(f"--{flag} needs --replicas")
        lookup_ids = args.batch * (2 * args.pooling + 1)  # bags hold 0..2*pooling ids
        if lookup_ids > MAX_BATCH:
            raise CliError(f"--batch {args.batch} with --pooling {args.pooling} makes lookups "
                           f"of up to {lookup_ids:,} ids (limit {MAX_BATCH:,} ids a call)")
    model = load(args)
    check_memory(model, config)
    compiled = _compile(args, model, progress)
    if args.replicas is not None:
        from .replicas import run_engine  # loads the engine (and Ray with --cluster) only here

        return 0 if run_engine(args, compiled, config, progress) else EXIT_CHECK
    progress(f"compiled in {compiled.compile_seconds:.2f}s; allocating tables")
    compiled.materialize(seed=args.seed)
    report = run_traffic(compiled, config, progress)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(report.format())
    return 0 if report.check_passed else EXIT_CHECK


def _input_error(e: BaseException) -> str:
    text = str(e).rstrip()
    return text if ": error:" in text.split("\n", 1)[0] else f"ekko: error: {text}"


def cmd_tune(args: argparse.Namespace) -> int:
    """Measure the prefetch distance per dim (ekko.kernels.tune) and record the choices."""
    from ..kernels.tune import tune_prefetch

    record = not args.dry_run
    if record:
        try:
            writable_store()
        except ValueError as e:
            raise CliError(f"{e}; use --dry-run to measure only")
    results = tune_prefetch(args.dims, candidates=args.candidates, threads=args.threads or None,
                            table_bytes=args.table_mib << 20, rounds=args.rounds, record=record)
    if args.json:
        print(json.dumps([{"dim": r.dim, "rows": r.rows, "ids": r.ids, "rule": r.rule,
                           "chosen": r.chosen, "ms": {str(d): round(v, 3) for d, v in r.ms.items()}}
                          for r in results], indent=1))
    else:
        print("| dim | rows | ids | " + " | ".join(f"{d} ahead (ms)" for d in args.candidates)
              + " | rule | chosen |")
        print("|---" * (5 + len(args.candidates)) + "|")
        for r in results:
            cells = " | ".join(f"{r.ms[d]:.2f}" for d in args.candidates)
            print(f"| {r.dim} | {r.rows:,} | {r.ids:,} | {cells} | {r.rule} | {r.chosen} |")
    where = store_path() if record else None
    print(f"recorded in {where}" if where else "not recorded (--dry-run)", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed
        return e.code if isinstance(e.code, int) else EXIT_INPUT
    try:
        return {"compile": cmd_compile, "run": cmd_run, "tune": cmd_tune}[args.command](args)
    except (ModelError, EkkoDiagnostic, EkkoError, CliError) as e:
        print(_input_error(e), file=sys.stderr)
    except OSError as e:
        where = f": {_shorten(str(e.filename))}" if e.filename else ""
        print(f"ekko: error: {e.strerror or e}{where}", file=sys.stderr)
    except MemoryError as e:
        print(f"ekko: error: out of memory ({e or 'allocation failed'}); "
              "use a smaller --scale or --batch", file=sys.stderr)
    except KeyboardInterrupt:
        print("ekko: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # a model's own Python code called sys.exit: never a success
        print(f"ekko: error: {args.model}: the model's Python code exited (sys.exit({e.code!r}))"
              " before ekko finished", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - a bug in ekko: say so, without a traceback
        if os.environ.get("EKKO_DEBUG"):
            raise
        print(f"ekko: internal error: {type(e).__name__}: {_shorten(str(e))} "
              "(a bug in ekko; EKKO_DEBUG=1 shows the traceback)", file=sys.stderr)
        return EXIT_INTERNAL
    return EXIT_INPUT
