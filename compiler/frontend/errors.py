"""Errors in a model description, pointing at the source."""

from __future__ import annotations


class ModelError(ValueError):
    """A mistake in a model: `file:line:col: error: message`, the line, a caret."""


def located(filename: str, text: str, line: int, col: int, message: str) -> ModelError:
    """A ModelError at 1-based (line, col) of `text`, with the line and a caret."""
    lines = text.split("\n")  # lark counts lines by \n only: not \f, \v or \x1c
    source = lines[line - 1].rstrip("\r") if 0 < line <= len(lines) else ""
    caret = " " * (max(col, 1) - 1) + "^"
    return ModelError(f"{filename}:{line}:{col}: error: {message}\n{source}\n{caret}")
