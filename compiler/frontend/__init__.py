"""Model frontends: the `.ekko` language and the PyTorch importer.

Both produce a `Model`; `load_model` picks one from a path. torch is only
imported when a torch model is loaded.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from .errors import ModelError
from .model import Dense, Feature, Model, ModelInvalid, Optimizer, Table
from .parser import parse_model, parse_model_file


def import_module(module, **kwargs) -> Model:
    """A torch nn.Module as a Model (see torch_import.import_module)."""
    from .torch_import import import_module as _import

    return _import(module, **kwargs)


def _load_factory(spec: str):
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
    finally:
        sys.path.pop(0)
    if not hasattr(module, factory):
        raise ModelError(f"{path}: error: no factory '{factory}' in the file")
    return getattr(module, factory)


def load_model(source: str, scale: float = 1.0, **import_args) -> Model:
    """A `.ekko` file, or `path/to/module.py:factory` returning an nn.Module."""
    if source.endswith(".py") or ".py:" in source:
        spec = source if ":" in source.rsplit(".py", 1)[-1] else source + ":build"
        factory = _load_factory(spec)
        model = import_module(factory(), **import_args)
    else:
        if not Path(source).is_file():
            raise ModelError(f"{source}: error: no such model file")
        model = parse_model_file(source)
    try:
        return model.scaled(scale)
    except ModelInvalid as e:
        raise ModelError(f"{source}: error: {e}") from None


__all__ = [
    "Dense", "Feature", "Model", "ModelError", "Optimizer", "Table",
    "import_module", "load_model", "parse_model", "parse_model_file",
]
