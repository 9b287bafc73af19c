"""Errors in a model description, pointing at the source."""

from __future__ import annotations


class ModelError(ValueError):
    """A mistake in a model: `file:line:col: error: message`, the line, a caret."""


WIDTH = 120  # a longer source line is shown as a window around the column


def excerpt(source: str, col: int, width: int = WIDTH) -> str:
    """`source` and a caret under 1-based `col`; a line longer than `width`
    (a 5,000-digit number, a minified file) is cut to a window around it."""
    col = max(col, 1)
    if len(source) <= width:
        return f"{source}\n{' ' * (col - 1)}^"
    start = min(max(0, col - 1 - width // 2), len(source) - width)
    head = "..." if start > 0 else ""
    tail = "..." if start + width < len(source) else ""
    return f"{head}{source[start:start + width]}{tail}\n{' ' * (len(head) + col - 1 - start)}^"


def located(filename: str, text: str, line: int, col: int, message: str) -> ModelError:
    """A ModelError at 1-based (line, col) of `text`, with the line and a caret."""
    lines = text.split("\n")  # lark counts lines by \n only: not \f, \v or \x1c
    source = lines[line - 1].rstrip("\r") if 0 < line <= len(lines) else ""
    return ModelError(f"{filename}:{line}:{col}: error: {message}\n{excerpt(source, col)}")
