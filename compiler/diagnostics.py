"""User-facing diagnostics: `file:line:col: error: message`, the line, a caret.

Every error ekko reports about a user's input goes through here so the CLI
tools can print it and exit 1 instead of showing a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xdsl.ir import Operation


class EkkoDiagnostic(Exception):
    """An error in user input, already formatted for printing."""


def caret_block(text: str, offset: int) -> tuple[int, int, str]:
    """(line, col, "source line\\n   ^") for a character offset into `text`."""
    offset = max(0, min(offset, len(text)))
    line_start = text.rfind("\n", 0, offset) + 1
    line_end = text.find("\n", offset)
    line_end = len(text) if line_end < 0 else line_end
    line = text.count("\n", 0, offset) + 1
    col = offset - line_start + 1
    source = text[line_start:line_end]
    return line, col, f"{source}\n{' ' * (col - 1)}^"


def format_diagnostic(e: EkkoDiagnostic) -> str:
    return str(e).rstrip()


def format_parse_error(e) -> str:
    """xDSL's ParseError as `file:line:col: error: msg`, then the line and carets."""
    span = e.span
    location = str(span.get_location())
    context = span.print_with_context().split("\n", 1)[1].rstrip("\n")
    return f"{location}: error: {e.msg}\n{context}"


@dataclass
class SourceMap:
    """Where each parsed op began, to put verifier errors at a position."""

    filename: str
    text: str
    op_offsets: dict[int, int] = field(default_factory=dict)
    line_offset: int = 0

    def format_at_op(self, op: Operation, message: str) -> str:
        offset = self.op_offsets.get(id(op))
        if offset is None:
            return f"{self.filename}: error: {message}"
        line, col, block = caret_block(self.text, offset)
        return f"{self.filename}:{line + self.line_offset}:{col}: error: {message}\n{block}"
