"""ekko-opt: the mlir-opt of ekko.

An `xDSLOptMain` subclass (not an xdsl universe entry point: registering
both raises AlreadyRegistered). It knows ekko's dialects and passes, reads
`.mlir` and `.ekko` files, prints LLVM IR with `-t llvm`, and turns every user
mistake into `file:line:col: error: ...` with the source line and exit 1.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import IO, NoReturn, TypeVar

from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Operation
from xdsl.parser import Parser
from xdsl.utils.arg_spec import parse_pipeline, parse_spec
from xdsl.utils.exceptions import (
    ArgSpecParseError,
    DiagnosticException,
    ParseError,
    VerifyException,
)
from xdsl.utils.lexer import Input, Span
from xdsl.xdsl_opt_main import xDSLOptMain

from ..frontend.errors import ModelError
from ..diagnostics import (
    EkkoDiagnostic,
    SourceMap,
    format_diagnostic,
    format_parse_error,
    scan_ir_text,
)
from ..registry import PIPELINES, ekko_dialects, ekko_passes, pipeline_spec

T = TypeVar("T")


class LocatingParser(Parser):
    """A parser that remembers where each operation started.

    xDSL's verifier errors carry no source position; with this map ekko-opt
    can point at the op that failed.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.op_offsets: dict[int, int] = {}
        self.parsed_ops: list[Operation] = []

    def parse_operation(self) -> Operation:
        start = self._current_token.span.start
        op = self._located(start, super().parse_operation)
        self.op_offsets[id(op)] = start
        self.parsed_ops.append(op)
        return op

    def parse_optional_type(self):
        return self._located(self._current_token.span.start, super().parse_optional_type)

    def parse_optional_attribute(self):
        return self._located(self._current_token.span.start, super().parse_optional_attribute)

    def _located(self, start: int, parse: Callable[[], T]) -> T:
        """Run `parse`; a verifier or value error while parsing becomes a ParseError at `start`.

        Types and attributes verify as they are built (an i8 holding 300, a
        table type with a bad layout): xDSL raises those without a position.
        """
        try:
            return parse()
        except ParseError:
            raise
        except (VerifyException, DiagnosticException, ValueError, TypeError, OverflowError) as e:
            end = max(start + 1, self._current_token.span.start)
            message = str(e).strip().split("\n")[-1] or type(e).__name__
            raise ParseError(Span(start, end, self.lexer.input), message) from None


class EkkoOptMain(xDSLOptMain):
    """ekko-opt's driver: xdsl-opt with ekko's dialects, passes and frontends."""

    def __init__(self, args: Sequence[str] | None = None):
        self.source_map: SourceMap | None = None
        self.last_module: ModuleOp | None = None
        self.version_format = f"ekko-opt {ekko_version()} (xDSL {{xdsl_version}})"
        super().__init__(description="ekko-opt: ekko's modular optimizer driver "
                         "(xdsl-opt with ekko's dialects, passes and .ekko models)", args=args)

    def register_all_arguments(self, arg_parser: argparse.ArgumentParser) -> None:
        """xdsl-opt's flags, with a -p help that lists ekko's passes, not ~150 of xDSL's."""
        super().register_all_arguments(arg_parser)
        arg_parser.prog = "ekko-opt"
        arg_parser.error = _usage_error  # type: ignore[method-assign]
        for action in arg_parser._actions:
            if action.dest == "passes":
                action.help = (
                    "comma-separated pass pipeline, e.g. upd-dedup,upd-schedule{partitions=2}. "
                    f"ekko's passes: {', '.join(ekko_passes())}. Named pipelines: "
                    + ", ".join(f"{n} ({','.join(p)})" for n, p in PIPELINES.items())
                    + ", options go to the pass that takes them, e.g. "
                    "standard{partitions=2}. xDSL's passes work too: "
                    "--list-passes prints them all")
            if action.dest == "target":
                action.type = self._target
        arg_parser.add_argument("--list-passes", action="store_true",
                                help="print every pass -p accepts (ekko's first) and exit")

    def _target(self, value: str) -> str:
        """-t's value, checked as it is parsed: an unknown target is one line naming
        the targets and exit 1, not argparse's usage and exit 2."""
        from ..backend.targets import TARGETS

        spec = parse_spec(value)
        if spec.name not in self.available_targets:
            xdsl = [t for t in self.available_targets if t not in TARGETS]
            raise EkkoDiagnostic(f"ekko-opt: error: -t: unknown target '{spec.name}' (ekko's: "
                                 f"{', '.join(TARGETS)}; xDSL's: {', '.join(xdsl)})")
        if spec.name in TARGETS and spec.parameters:
            raise EkkoDiagnostic(f"ekko-opt: error: -t: target '{spec.name}' takes no options, "
                                 f"got {', '.join(spec.parameters)}")
        return value

    def output_resulting_program(self, prog: ModuleOp) -> str:
        """The module printed by -t's target. xDSL's targets besides mlir print only
        xDSL's own low-level dialects: one that fails on this module is the user's
        choice of target, said in one line, not an internal error of ekko-opt."""
        from ..backend.targets import TARGETS

        name = parse_spec(self.args.target).name
        if name in TARGETS or name == "mlir":
            return super().output_resulting_program(prog)
        try:
            return super().output_resulting_program(prog)
        except Exception as e:  # noqa: BLE001 - xDSL's target, not ekko's code
            why = (str(e).strip().split("\n")[0] or type(e).__name__)[:160]
            raise EkkoDiagnostic(
                f"ekko-opt: error: -t {name}: xDSL's {name} target cannot print this module "
                f"({type(e).__name__}: {why}); ekko's targets are {', '.join(TARGETS)}") from None

    def setup_pipeline(self) -> None:
        """xDSL's pipeline, with every mistake in -p as one located line."""
        spec = self.args.passes
        try:
            specs = list(parse_pipeline(spec))
        except ArgSpecParseError as e:
            raise EkkoDiagnostic(_pipeline_syntax_error(spec, e)) from None
        if any(p.name in PIPELINES for p in specs):
            self.args.passes = ",".join(_expand(p) for p in specs)
            specs = list(parse_pipeline(self.args.passes))
        for p in specs:
            if p.name not in self.available_passes:
                raise EkkoDiagnostic(_unknown_pass(p.name, self.available_passes))
            try:
                self.available_passes[p.name]().from_pass_spec(p)
            except Exception as e:  # a pass's own option check: any error is the user's value
                raise EkkoDiagnostic(f"ekko-opt: error: -p: pass '{p.name}': {e}") from None
        super().setup_pipeline()

    def register_all_dialects(self) -> None:
        super().register_all_dialects()
        for name, factory in ekko_dialects().items():
            if name not in self.ctx.registered_dialect_names:
                self.ctx.register_dialect(name, factory)

    def register_all_passes(self) -> None:
        super().register_all_passes()
        for name, factory in ekko_passes().items():
            self.register_pass(name, factory)

    def register_all_targets(self) -> None:
        super().register_all_targets()
        from functools import partial

        from ..backend.targets import TARGETS, emit_module

        for name in TARGETS:
            self.available_targets[name] = partial(emit_module, name)

    def register_all_frontends(self) -> None:
        super().register_all_frontends()
        self.available_frontends["mlir"] = self._parse_mlir
        self.available_frontends["ekko"] = self._parse_ekko

    def _parse_mlir(self, io: IO[bytes]) -> ModuleOp:
        text = _decode(io.read(), self.get_input_name())
        problem = scan_ir_text(text)
        if problem is not None:
            offset, message = problem
            end = min(len(text), offset + 1)
            raise ParseError(Span(offset, end, Input(text, self.get_input_name())), message)
        parser = LocatingParser(self.ctx, text, self.get_input_name())
        self.source_map = SourceMap(self.get_input_name(), text, parser.op_offsets,
                                    user_ops=parser.parsed_ops)
        return parser.parse_module(not self.args.no_implicit_module)

    def _parse_ekko(self, io: IO[bytes]) -> ModuleOp:
        from ..frontend import parse_model
        from ..frontend_to_ir import model_to_module

        text = _decode(io.read(), self.get_input_name())
        return model_to_module(parse_model(text, self.get_input_name()))

    def parse_chunk(self, chunk: IO[bytes], file_extension: str, offset: int = 0):
        module = super().parse_chunk(chunk, file_extension, offset)
        if self.source_map is not None and module is not None:
            self.source_map.line_offset = offset
            self.source_map.record(module)
        self.last_module = module
        return module


def _usage_error(message: str) -> NoReturn:
    """A mistake in the flags: one line and exit 1, as every other user mistake
    (argparse would print the whole usage and exit 2)."""
    raise EkkoDiagnostic(f"ekko-opt: error: {message} (ekko-opt --help lists the flags)")


def ekko_version() -> str:
    """The installed ekko's version (the package metadata is the one source)."""
    try:
        return version("ekko")
    except PackageNotFoundError:
        return "unknown"


def _pipeline_syntax_error(spec: str, e: ArgSpecParseError) -> str:
    """xDSL's multi-line pipeline syntax error as one line with the column."""
    lines = str(e).rstrip().split("\n")
    carets = [line for line in lines if line.strip() == "^"]
    where = f" at column {carets[0].index('^') + 1}" if carets else ""
    reason = lines[-1].strip() if len(lines) > 1 else "bad pipeline syntax"
    return f"ekko-opt: error: -p '{spec}'{where}: {reason}"


def _expand(p) -> str:
    """A named pipeline of -p as its passes, each option at the pass that takes it."""
    if p.name not in PIPELINES:
        return str(p)
    options = {}
    for key, values in p.parameters.items():
        if len(values) != 1:
            raise EkkoDiagnostic(f"ekko-opt: error: -p: pipeline '{p.name}': option '{key}' "
                                 "takes one value")
        options[key] = values[0]
    try:
        return pipeline_spec(p.name, **options)
    except ValueError as e:
        raise EkkoDiagnostic(f"ekko-opt: error: -p: {e}") from None


def _unknown_pass(name: str, available: dict[str, object]) -> str:
    close = difflib.get_close_matches(name, [*available, *PIPELINES], n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return (f"ekko-opt: error: -p: unknown pass '{name}'{hint} "
            f"(ekko's passes: {', '.join(ekko_passes())}; --list-passes prints all)")


def _list_passes(driver: EkkoOptMain) -> None:
    ours = list(ekko_passes())
    print("ekko:", *ours, sep="\n  ")
    print("ekko pipelines:", *(f"{n}: {','.join(p)}" for n, p in PIPELINES.items()), sep="\n  ")
    print("xDSL:", *sorted(n for n in driver.available_passes if n not in ours), sep="\n  ")


def driver_arg(argv: Sequence[str] | None, flag: str) -> str:
    """The value given to `flag` on the command line (for messages)."""
    args = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a[len(flag) + 1:]
    return ""


def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EkkoDiagnostic(f"{name}: error: input is not UTF-8 text (byte {e.start})") from None


def _locate_failure(module: ModuleOp, source_map: SourceMap | None) -> str | None:
    """Re-verify op by op to find the first failing op and its position."""
    for op in module.walk():
        try:
            op.verify(verify_nested_ops=False)
        except (VerifyException, DiagnosticException) as e:
            msg = str(e).split("\n")[-1] if "\n" in str(e) else str(e)
            msg = msg.removeprefix("Operation does not verify: ")
            if source_map is None:
                return f"error: '{op.name}': {msg}"
            if not msg.startswith(f"'{op.name}'"):
                msg = f"'{op.name}' {msg}"
            return source_map.format_at_op(_redefinition(op, msg) or op, msg)
    return None


def _redefinition(table: Operation, message: str) -> Operation | None:
    """The second op defining the symbol a symbol table says is defined twice:
    the table itself (the module) has no position of its own to show."""
    found = re.search(r'Redefinition of symbol "(.*)"', message)
    if found is None or not table.regions:
        return None
    defs = [op for op in table.regions[0].ops
            if getattr(op.properties.get("sym_name") or op.attributes.get("sym_name"),
                       "data", None) == found.group(1)]
    return defs[1] if len(defs) > 1 else None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: every user error is a diagnostic and exit 1."""
    driver = None
    try:
        driver = EkkoOptMain(args=argv)
        if driver.args.list_passes:
            _list_passes(driver)
            return 0
        driver.run()
        return 0
    except SystemExit as e:
        return int(e.code or 0)
    except ParseError as e:
        print(format_parse_error(e), file=sys.stderr)
    except (VerifyException, DiagnosticException) as e:
        located = None
        op = getattr(e, "op", None)  # a pass error that names its op
        if op is not None and driver is not None and driver.source_map is not None:
            located = driver.source_map.format_at_op(op, str(e).strip())
        elif driver is not None and driver.last_module is not None:
            located = _locate_failure(driver.last_module, driver.source_map)
        print(located or f"error: {str(e).strip()}", file=sys.stderr)
    except EkkoDiagnostic as e:
        print(format_diagnostic(e), file=sys.stderr)
    except ModelError as e:
        print(str(e), file=sys.stderr)
    except (ValueError, KeyError, OSError) as e:
        print(f"ekko-opt: error: {e}", file=sys.stderr)
    except ArgSpecParseError as e:  # -t's spec (a BaseException in xDSL)
        reason = str(e).rstrip().split("\n")[-1].strip()
        print(f"ekko-opt: error: bad -t target '{driver_arg(argv, '-t')}': {reason}",
              file=sys.stderr)
    except RecursionError:
        print("ekko-opt: error: the input is nested too deeply for ekko-opt", file=sys.stderr)
    except MemoryError:
        print("ekko-opt: error: out of memory", file=sys.stderr)
    except Exception as e:  # a bug in ekko, not the user's: still no traceback, say so
        print(f"ekko-opt: internal error: {type(e).__name__}: {e} "
              "(a bug in ekko-opt; please report it with the input)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
