"""PyTorch models as `Model`s.

Every `nn.EmbeddingBag` (sum, mean) and `nn.Embedding` (pooling none), and
the tables of a TorchRec `EmbeddingBagCollection` / `EmbeddingCollection`
when torchrec imports, become tables. torch.fx tracing finds the call sites:
a module called from two places is one table read by two features. When
tracing fails (data-dependent control flow in the dense part), each module
is one feature: the dense part never makes an import fail. Linear layers and
the interaction are kept as metadata, best-effort.

Names: the module path with the common prefix of all embedding modules
removed and dots as underscores; the table is "t_" + that name. TorchRec
tables keep their configured names and feature names.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ModelError
from .model import (
    DEFAULT_OPTIMIZER,
    INTERACTIONS,
    RULE_SETTINGS,
    Dense,
    Feature,
    Model,
    ModelInvalid,
    Table,
    UpdateRule,
)


@dataclass(frozen=True)
class _Found:
    """One table the importer found, with the features that read it."""

    path: str  # the module it came from: tables keep the modules' order
    table: str
    rows: int
    dim: int
    features: tuple[tuple[str, str], ...]  # (feature name, pooling)


def _error(path: str, message: str) -> ModelError:
    return ModelError(f"{path or '<root>'}: error: {message}")


def _pooling(path: str, module: Any) -> str:
    """The pooling of a supported nn.Embedding(Bag), else a ModelError naming it."""
    import torch.nn as nn

    if getattr(module, "padding_idx", None) is not None:
        raise _error(path, "padding_idx is not supported by ekko's update kernels "
                     "(the padding row would be updated like any other)")
    if getattr(module, "max_norm", None) is not None:
        raise _error(path, "max_norm renormalization at lookup is not supported "
                     "(use a table's clip max_norm for the updates instead)")
    if isinstance(module, nn.EmbeddingBag):
        if module.mode not in ("sum", "mean"):
            raise _error(path, f"EmbeddingBag mode '{module.mode}' is not supported "
                         "(ekko pools with sum or mean)")
        return module.mode
    return "none"


@functools.lru_cache(maxsize=1)
def _torchrec_classes() -> tuple[type, ...]:
    """TorchRec's collection modules, or () when torchrec does not import."""
    try:
        from torchrec.modules.embedding_modules import (
            EmbeddingBagCollection,
            EmbeddingCollection,
        )
    except Exception:  # noqa: BLE001 - torchrec is optional, and may fail to load
        return ()
    return (EmbeddingBagCollection, EmbeddingCollection)


def torchrec_available() -> bool:
    """Whether TorchRec collections can be imported (it is optional)."""
    return bool(_torchrec_classes())


def _torchrec_tables(path: str, module: Any) -> list[_Found]:
    """The tables of a TorchRec collection, from its configs."""
    bag = hasattr(module, "embedding_bag_configs")
    configs = module.embedding_bag_configs() if bag else module.embedding_configs()
    out = []
    for cfg in configs:
        pooling = str(getattr(cfg.pooling, "name", cfg.pooling)).lower() if bag else "none"
        if pooling not in ("sum", "mean", "none"):
            raise _error(f"{path}.{cfg.name}", f"pooling {pooling} is not supported")
        feats = tuple((_identifier(f), pooling) for f in cfg.feature_names)
        out.append(_Found(path, _identifier(cfg.name), cfg.num_embeddings, cfg.embedding_dim, feats))
    return out


def _collections(root: Any) -> dict[str, Any]:
    """TorchRec collection modules by path (their inner bags are theirs, not ours)."""
    classes = _torchrec_classes()
    if not classes:
        return {}
    return {p: m for p, m in root.named_modules() if isinstance(m, classes)}


def _embedding_modules(root: Any, skip: Mapping[str, Any]) -> dict[str, Any]:
    """Plain nn.Embedding(Bag) modules outside the TorchRec collections."""
    import torch.nn as nn

    def inside(path: str) -> bool:
        return any(path == s or path.startswith(s + ".") or s == "" for s in skip)

    return {p: m for p, m in root.named_modules()
            if isinstance(m, (nn.EmbeddingBag, nn.Embedding)) and not inside(p)}


def _trace(root: Any) -> Any | None:
    """The fx graph of `root`'s forward, or None when it cannot be traced."""
    try:
        import torch.fx

        return torch.fx.symbolic_trace(root).graph
    except Exception:  # noqa: BLE001 - any tracing failure means: fall back
        return None


def _call_counts(graph: Any | None, paths: list[str]) -> dict[str, int]:
    """How often each module is called. A module the trace never calls still
    gets one feature: code fx cannot see (a leaf module) may read it."""
    counts = {p: 0 for p in paths}
    if graph is not None:
        for node in graph.nodes:
            if node.op == "call_module" and node.target in counts:
                counts[node.target] += 1
    return {p: max(n, 1) for p, n in counts.items()}


def _identifier(text: str) -> str:
    """`text` as a name of the .ekko language (letters, digits, '_')."""
    name = re.sub(r"\W", "_", text)
    return f"f{name}" if not name or name[0].isdigit() else name


def _short_names(paths: list[str]) -> dict[str, str]:
    """Module paths without their common prefix, dots as underscores."""
    if not paths:
        return {}
    parts = [p.split(".") for p in paths]
    common = os.path.commonprefix(parts) if len(paths) > 1 else parts[0][:-1]
    return {path: _identifier("_".join(split[len(common):] or split[-1:]))
            for path, split in zip(paths, parts)}


def _module_tables(root: Any, graph: Any | None, skip: Mapping[str, Any]) -> list[_Found]:
    embeddings = _embedding_modules(root, skip)
    poolings = {p: _pooling(p, m) for p, m in embeddings.items()}
    counts = _call_counts(graph, list(embeddings))
    short = _short_names(list(embeddings))
    found = []
    for path, m in embeddings.items():
        n = counts[path]
        names = [short[path]] if n == 1 else [f"{short[path]}_{i}" for i in range(n)]
        found.append(_Found(path, f"t_{short[path]}", m.num_embeddings, m.embedding_dim,
                            tuple((f, poolings[path]) for f in names)))
    return found


def _interaction(root: Any, graph: Any | None) -> str:
    """The root's `interaction` attribute, else guessed from the traced ops."""
    given = getattr(root, "interaction", None)
    if isinstance(given, str) and given in INTERACTIONS:
        return given
    if graph is None:
        return ""
    ops = {getattr(n.target, "__name__", str(n.target)) for n in graph.nodes
           if n.op in ("call_function", "call_method")}
    if ops & {"bmm", "matmul"}:
        return "dot"
    return "cat" if "cat" in ops else ""


def _dense(root: Any, graph: Any | None) -> Dense | None:
    """Linear layer sizes, split into bottom and top MLPs by module path."""
    try:
        import torch.nn as nn

        bottom: list[int] = []
        top: list[int] = []
        for path, m in root.named_modules():
            if isinstance(m, nn.Linear) and m.in_features > 0:
                target = top if re.search(r"top|over|head", path) else bottom
                if not target:
                    target.append(m.in_features)
                target.append(m.out_features)
        interaction = _interaction(root, graph)
        if not (bottom or top or interaction):
            return None
        return Dense(tuple(bottom), tuple(top), interaction)
    except Exception:  # noqa: BLE001 - metadata only: never fail the import for it
        return None


def import_module(
    module: Any,
    *,
    name: str | None = None,
    optimizer: str = DEFAULT_OPTIMIZER,
    serving: str = "f32",
    dtype: str = "f32",
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    **hyper: float,
) -> Model:
    """Import `module`'s sparse part. The optimizer with its keywords (its
    hyper-parameters and `max_norm`, `clip_value`, `weight_decay`,
    `stochastic_rounding`: one UpdateRule, as `ekko.update_kernel` takes them),
    serving layout and dtype apply to every table unless
    `overrides[table_name]` says otherwise (keys: `dtype`, `serving`, `update`
    (an UpdateRule), `optimizer`, `hyper`, and the rule's settings)."""
    model_name = _identifier(name or type(module).__name__.lower())
    try:
        graph = _trace(module)
        collections = _collections(module)
        found = [t for p, m in collections.items() for t in _torchrec_tables(p, m)]
        found += _module_tables(module, graph, collections)
        order = {p: i for i, (p, _) in enumerate(module.named_modules())}
        found.sort(key=lambda t: order[t.path])  # stable: a collection's tables stay in order
        tables = _tables(found, optimizer, serving, dtype, dict(overrides or {}), hyper)
        features = tuple(Feature(f, t.table, pooling) for t in found for f, pooling in t.features)
        model = Model(model_name, tables, features, _dense(module, graph))
        model.validate()
    except ModelInvalid as e:
        raise ModelError(f"{type(module).__name__}: error: {e}") from None
    return model


def _tables(found: list[_Found], optimizer: str, serving: str, dtype: str,
            overrides: dict[str, Mapping[str, Any]], hyper: dict[str, float]) -> tuple[Table, ...]:
    unknown = set(overrides) - {t.table for t in found}
    if unknown:
        raise ModelInvalid(f"overrides name unknown tables {sorted(unknown)} "
                           f"(tables: {', '.join(t.table for t in found)})")
    given = {k: v for k, v in hyper.items() if k in RULE_SETTINGS}
    hyper = {k: v for k, v in hyper.items() if k not in RULE_SETTINGS}
    tables = []
    for t in found:
        opts = dict(overrides.get(t.table, {}))
        update = opts.pop("update", None)
        if update is None:
            settings = {**given, **{k: opts.pop(k) for k in RULE_SETTINGS if k in opts}}
            update = UpdateRule.make(opts.pop("optimizer", optimizer),
                                     **opts.pop("hyper", hyper), **settings)
        fields = {"dtype": dtype, "serving": serving, **opts}
        try:
            table = Table(t.table, t.rows, t.dim, update=update, **fields)
        except TypeError as e:
            raise ModelInvalid(f"overrides for {t.table}: {e}") from None
        table.validate()
        tables.append(table)
    return tuple(tables)
