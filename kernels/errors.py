"""Exceptions raised by ekko's runtime kernels."""

from __future__ import annotations


class EkkoError(Exception):
    """Base of every error ekko raises on purpose, so callers can catch one type."""


class UpdateError(EkkoError, ValueError):
    """An update was rejected (bad ids, shapes or dtypes); no table was modified."""


class LookupError(EkkoError, ValueError):  # noqa: A001 - ekko's own error type
    """A lookup was rejected (bad dtype, shape, id or offsets); nothing was read out of bounds."""


class NonFiniteOutputError(UpdateError):
    """An update would have written inf or NaN; nothing was written.

    `row` is the table row (its id) and `buffer` what would have held the
    value: "table", "state 'name'" or "serving copy". A kernel knows no
    table names: whoever does (a compiled model, the engine) passes the
    error on with `in_table(name)`.
    """

    def __init__(self, row: int, buffer: str, table: str | None = None):
        self.row, self.buffer, self.table = row, buffer, table
        where = f" of table {table!r}" if table is not None else ""
        super().__init__(f"the update would write a non-finite value (inf or NaN) into the "
                         f"{buffer} of row {row}{where}; nothing was written")

    def in_table(self, table: str) -> NonFiniteOutputError:
        """The same error, naming the table."""
        return NonFiniteOutputError(self.row, self.buffer, table)

    def __reduce__(self):  # crosses processes (Ray) with its fields
        return type(self), (self.row, self.buffer, self.table)


class OptimizerError(EkkoError, ValueError):
    """An `@ekko.optimizer` definition was refused; nothing was added to the catalog."""
