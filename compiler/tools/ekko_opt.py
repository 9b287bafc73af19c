"""ekko-opt: the mlir-opt of ekko.

An `xDSLOptMain` subclass (not an xdsl universe entry point: registering
both raises AlreadyRegistered). It knows ekko's dialects and passes, reads
`.mlir` and `.ekko` files, prints LLVM IR with `-t llvm`, and turns every user
mistake into `file:line:col: error: ...` with the source line and exit 1.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import IO

from xdsl.dialects.builtin import ModuleOp
from xdsl.ir import Operation
from xdsl.parser import Parser
from xdsl.utils.exceptions import DiagnosticException, ParseError, VerifyException
from xdsl.xdsl_opt_main import xDSLOptMain

from ..frontend.errors import ModelError
from ..diagnostics import EkkoDiagnostic, SourceMap, format_diagnostic, format_parse_error
from ..registry import ekko_dialects, ekko_passes


class LocatingParser(Parser):
    """A parser that remembers where each operation started.

    xDSL's verifier errors carry no source position; with this map ekko-opt
    can point at the op that failed.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.op_offsets: dict[int, int] = {}

    def parse_operation(self) -> Operation:
        start = self._current_token.span.start
        op = super().parse_operation()
        self.op_offsets[id(op)] = start
        return op


class EkkoOptMain(xDSLOptMain):
    """ekko-opt's driver: xdsl-opt with ekko's dialects, passes and frontends."""

    def __init__(self, args: Sequence[str] | None = None):
        self.source_map: SourceMap | None = None
        self.last_module: ModuleOp | None = None
        super().__init__(description="ekko modular optimizer driver", args=args)

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
        from ..backend.targets import emit_llvm

        self.available_targets["llvm"] = emit_llvm

    def register_all_frontends(self) -> None:
        super().register_all_frontends()
        self.available_frontends["mlir"] = self._parse_mlir
        self.available_frontends["ekko"] = self._parse_ekko

    def _parse_mlir(self, io: IO[bytes]) -> ModuleOp:
        text = _decode(io.read(), self.get_input_name())
        parser = LocatingParser(self.ctx, text, self.get_input_name())
        self.source_map = SourceMap(self.get_input_name(), text, parser.op_offsets)
        return parser.parse_module(not self.args.no_implicit_module)

    def _parse_ekko(self, io: IO[bytes]) -> ModuleOp:
        from ..frontend import parse_model
        from ..frontend_to_ir import model_to_module

        text = _decode(io.read(), self.get_input_name())
        return model_to_module(parse_model(text, self.get_input_name()))

    def parse_chunk(self, chunk: IO[bytes], file_extension: str, offset: int = 0):
        module = super().parse_chunk(chunk, file_extension, offset)
        if self.source_map is not None:
            self.source_map.line_offset = offset
        self.last_module = module
        return module


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
            return source_map.format_at_op(op, msg)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: every user error is a diagnostic and exit 1."""
    driver = None
    try:
        driver = EkkoOptMain(args=argv)
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
    return 1


if __name__ == "__main__":
    sys.exit(main())
