"""Model frontends: the `.ekko` language and the PyTorch importer.

Both produce a `Model`; `load_model` picks one from a path. torch is only
imported when a torch model is loaded.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ModelError
from .model import Dense, Feature, Model, ModelInvalid, Optimizer, Table, UpdateRule


def parse_model(text: str, filename: str = "<input>") -> Model:
    """Parse `.ekko` source into a validated Model (see parser.parse_model)."""
    from .parser import parse_model as _parse  # lark loads on first use

    return _parse(text, filename)


def parse_model_file(path: str | Path) -> Model:
    from .parser import parse_model_file as _parse_file

    return _parse_file(path)


def format_model(model: Model) -> str:
    """`.ekko` source for `model` (see printer.format_model)."""
    from .printer import format_model as _format

    return _format(model)


def import_module(module: Any, **kwargs: Any) -> Model:
    """A torch nn.Module as a Model (see torch_import.import_module)."""
    from .torch_import import import_module as _import

    return _import(module, **kwargs)


def _load_factory(spec: str) -> Callable[..., Any]:
    """The callable named after the last ':' of `path.py:factory`."""
    path_text, _, factory = spec.rpartition(":")
    path = Path(path_text)
    if not path.is_file():
        raise ModelError(f"{path}: error: no such file")
    module_spec = importlib.util.spec_from_file_location(f"ekko_user_{path.stem}", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(path.parent))
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file: report, never a traceback
        raise ModelError(f"{path}: error: importing the file failed: "
                         f"{type(e).__name__}: {e}") from None
    finally:
        sys.path.pop(0)
    if not callable(getattr(module, factory, None)):
        raise ModelError(f"{path}: error: no factory '{factory}' in the file")
    return getattr(module, factory)


def _build_module(factory: Callable[..., Any], spec: str) -> Any:
    """Call the factory on torch's meta device: only shapes are read, so a
    10M-row table costs no memory; factories that need real tensors (a
    checkpoint load, say) are called again on the default device."""
    try:
        import torch
    except ImportError:
        raise ModelError(f"{spec}: error: loading a PyTorch model needs torch") from None
    try:
        with torch.device("meta"):
            return factory()
    except Exception:  # noqa: BLE001 - retry for real below
        pass
    try:
        return factory()
    except Exception as e:  # noqa: BLE001 - the user's factory: report it
        raise ModelError(f"{spec}: error: the factory failed: {type(e).__name__}: {e}") from None


def load_model(source: str, scale: float = 1.0, **import_args: Any) -> Model:
    """A `.ekko` file, or `path/to/module.py[:factory]` (factory defaults to
    `build`) returning an nn.Module; `import_args` go to `import_module`."""
    if source.endswith(".py") or ".py:" in source:
        spec = source if ":" in source.rsplit(".py", 1)[-1] else source + ":build"
        module = _build_module(_load_factory(spec), spec)
        if not isinstance(module, sys.modules["torch"].nn.Module):  # torch: _build_module
            raise ModelError(f"{spec}: error: the factory returned {type(module).__name__}, "
                             "not a torch.nn.Module")
        model = import_module(module, **import_args)
    else:
        if not Path(source).is_file():
            raise ModelError(f"{source}: error: no such model file")
        model = parse_model_file(source)
    try:
        return model.scaled(scale)
    except ModelInvalid as e:
        raise ModelError(f"{source}: error: {e}") from None


__all__ = [
    "Dense", "Feature", "Model", "ModelError", "Optimizer", "Table", "UpdateRule",
    "format_model", "import_module", "load_model", "parse_model", "parse_model_file",
]
