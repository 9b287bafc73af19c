"""User-facing diagnostics: `file:line:col: error: message`, the line, a caret.

Every error ekko reports about a user's input goes through here so the CLI
tools can print it and exit 1 instead of showing a traceback.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from xdsl.ir import Operation

from ..dialects.common import settings
from .frontend.errors import WIDTH, excerpt


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
    return line, col, excerpt(text[line_start:line_end], col)


def format_diagnostic(e: EkkoDiagnostic) -> str:
    return str(e).rstrip()


def format_parse_error(e) -> str:
    """xDSL's ParseError as `file:line:col: error: msg`, then the line and carets."""
    span = e.span
    location = str(span.get_location())
    context = span.print_with_context().split("\n", 1)[1].rstrip("\n")
    if any(len(line) > WIDTH for line in context.split("\n")):  # one caret, in a window
        context = caret_block(span.input.content, span.start)[2]
    message = e.msg.strip() or "syntax error"
    if message.startswith("in "):  # xDSL's bare " in block definition": say what failed
        message = f"syntax error {message}"
    return f"{location}: error: {message}\n{context}"


@dataclass
class SourceMap:
    """Where each parsed op began, to put verifier and pass errors at a position.

    Passes replace the user's ops with new ones (upd-fuse makes `upd.apply`,
    lower-to-kernel `kern.update`) that have no position. `origin` maps such
    an op back to the user's op it came from: the same op name at the same
    place in the same function (a clone), else the function's optimizer op
    (for an update kernel) or lookup (for a bag), else the nearest enclosing
    op the user wrote.
    """

    filename: str
    text: str
    op_offsets: dict[int, int] = field(default_factory=dict)
    line_offset: int = 0
    user_ops: list[Operation] = field(default_factory=list)  # keeps ids unique
    by_function: dict[str | None, list[Operation]] = field(default_factory=dict)

    def record(self, module: Operation) -> None:
        """Note each user op's function, before passes detach or replace them."""
        self.by_function.clear()
        for op in module.walk():
            if id(op) in self.op_offsets:
                self.by_function.setdefault(_function_name(op), []).append(op)

    def format_at_op(self, op: Operation, message: str) -> str:
        origin = self.origin(op)
        if origin is None:
            return f"{self.filename}: error: {message}"
        if origin is not op:
            message = f"{message} (in what the passes made of this '{origin.name}')"
        line, col, block = caret_block(self.text, self.op_offsets[id(origin)])
        return f"{self.filename}:{line + self.line_offset}:{col}: error: {message}\n{block}"

    def origin(self, op: Operation) -> Operation | None:
        """The user's op that `op` is or came from, if any."""
        if id(op) in self.op_offsets:
            return op
        function = _function_name(op)
        mine = self.by_function.get(function, []) if function else []
        index = _index_among(op, lambda o: o.name == op.name)
        same = [u for u in mine if u.name == op.name]
        if same:
            return same[min(index, len(same) - 1)]
        family = [u for u in mine if _same_role(u, op)]
        if family:
            return family[min(_index_among(op, lambda o: _same_role_names(o.name, op.name)),
                               len(family) - 1)]
        parent = op.parent_op()
        while parent is not None and id(parent) not in self.op_offsets:
            parent = parent.parent_op()
        return parent


def _function_of(op: Operation) -> Operation | None:
    """The nearest op enclosing `op` that has a symbol name (its function)."""
    current = op.parent_op()
    while current is not None:
        if "sym_name" in current.properties or "sym_name" in current.attributes:
            return current
        current = current.parent_op()
    return None


def _function_name(op: Operation) -> str | None:
    function = _function_of(op)
    if function is None:
        return None
    name = function.properties.get("sym_name") or function.attributes.get("sym_name")
    return str(getattr(name, "data", name))


def _index_among(op: Operation, same: Callable[[Operation], bool]) -> int:
    """How many ops before `op` in its function satisfy `same`."""
    function = _function_of(op)
    if function is None:
        return 0
    count = 0
    for other in function.walk():
        if other is op:
            return count
        count += same(other)
    return 0


def _is_update(name: str) -> bool:
    return "update" in name or name == "upd.apply"


def _same_role_names(a: str, b: str) -> bool:
    return (_is_update(a) and _is_update(b)) or (_is_bag(a) and _is_bag(b))


def _is_bag(name: str) -> bool:
    return name.endswith((".bag", ".lookup"))


def _same_role(user: Operation, made: Operation) -> bool:
    """Whether the user's op plays the part the pass-made op plays: optimizer or lookup."""
    if _is_update(made.name):
        return "lr" in settings(user) or "lr" in user.properties
    return _is_bag(made.name) and _is_bag(user.name)


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
