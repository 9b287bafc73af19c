"""Exceptions raised by ekko's runtime kernels."""


class EkkoError(Exception):
    """Base of every error ekko raises on purpose, so callers can catch one type."""


class UpdateError(EkkoError, ValueError):
    """An update was rejected (bad ids, shapes or dtypes); no table was modified."""


class OptimizerError(EkkoError, ValueError):
    """An `@ekko.optimizer` definition was refused; nothing was added to the catalog."""
