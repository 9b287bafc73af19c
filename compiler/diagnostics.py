"""User-facing diagnostics: `file:line:col: error: message`, the line, a caret.

Every error ekko reports about a user's input goes through here so the CLI
tools can print it and exit 1 instead of showing a traceback.
"""

from __future__ import annotations

import re
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


# ------------------------------------------------------- input guards
#
# xDSL's lexer and parser are recursive and regex-based. Three inputs make
# them misbehave: an unterminated string literal (its string regex nests
# quantifiers and backtracks exponentially: ~30 characters run for minutes),
# deep nesting (RecursionError) and integers too long for int() (ValueError
# with no position). A linear scan finds all three first, with a location.

MAX_NESTING = 64  # brackets of any kind; xDSL overflows Python's stack near 130
MAX_NUMBER_DIGITS = 4000  # Python's int() refuses more than 4300 digits

_STRING = re.compile(r'"(?:[^"\\\n\v\f]|\\(?:["nt\\]|[0-9A-Fa-f]{2}))*"')
_SCAN = re.compile(r'//[^\n]*|"|->|[{(\[<]|[})\]>]|[0-9]+')
_OPEN, _CLOSE = "{([<", "})]>"


def scan_ir_text(text: str) -> tuple[int, str] | None:
    """(offset, message) of the first input xDSL would hang or crash on, else None."""
    depth, pos = 0, 0
    while (m := _SCAN.search(text, pos)) is not None:
        token, pos = m.group(0), m.end()
        if token == '"':
            string = _STRING.match(text, m.start())
            if string is None:
                return _bad_string(text, m.start())
            pos = string.end()
        elif token[0] in _OPEN:
            depth += 1
            if depth > MAX_NESTING:
                return m.start(), f"nesting deeper than {MAX_NESTING} levels is not supported"
        elif token[0] in _CLOSE:
            depth = max(0, depth - 1)
        elif token[0].isdigit() and len(token) > MAX_NUMBER_DIGITS:
            return m.start(), (f"a number of {len(token)} digits "
                               f"(at most {MAX_NUMBER_DIGITS} are supported)")
    return None


def _bad_string(text: str, start: int) -> tuple[int, str]:
    """Why the string literal at `start` does not lex: a bad escape or no closing quote."""
    pos = start + 1
    while pos < len(text):
        c = text[pos]
        if c == '"':
            break
        if c in "\n\v\f":
            return start, "string literal is not closed before the end of its line"
        if c == "\\":
            if not re.match(r'["nt\\]|[0-9A-Fa-f]{2}', text[pos + 1:pos + 3]):
                return pos, ("invalid escape in string literal "
                             '(allowed: \\n \\t \\\\ \\" and two hex digits)')
            pos += 3 if text[pos + 1] not in '"nt\\' else 2
            continue
        pos += 1
    return start, "string literal is not closed before the end of the file"
