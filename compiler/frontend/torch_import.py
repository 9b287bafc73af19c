"""PyTorch models as `Model`s.

Every `nn.EmbeddingBag` (sum, mean) and `nn.Embedding` (pooling none), and
the tables of a TorchRec `EmbeddingBagCollection` when torchrec imports,
become tables. torch.fx tracing finds the call sites: a module called from
two places is one table read by two features. When tracing fails (dynamic
control flow in the dense part), each module is one feature: the dense part
never makes an import fail. Linear layers are kept as metadata.

Names: the module path with the common prefix of all embedding modules
removed and dots as underscores; the table is "t_" + that name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .errors import ModelError
from .model import Dense, Feature, Model, ModelInvalid, Optimizer, Table


def _embedding_kinds():
    import torch.nn as nn

    return nn.EmbeddingBag, nn.Embedding


def _check_supported(path: str, module) -> str:
    """The pooling of a supported embedding module, else a ModelError naming it."""
    bag_cls, emb_cls = _embedding_kinds()
    if getattr(module, "padding_idx", None) is not None:
        raise ModelError(f"{path}: padding_idx is not supported by ekko's update kernels")
    if getattr(module, "max_norm", None) is not None:
        raise ModelError(f"{path}: max_norm renormalization at lookup is not supported")
    if isinstance(module, bag_cls):
        if module.mode not in ("sum", "mean"):
            raise ModelError(f"{path}: EmbeddingBag mode '{module.mode}' is not supported "
                             "(ekko pools with sum or mean)")
        return module.mode
    return "none"


def _embedding_modules(root) -> dict[str, Any]:
    bag_cls, emb_cls = _embedding_kinds()
    return {path: m for path, m in root.named_modules() if isinstance(m, (bag_cls, emb_cls))}


def _call_sites(root, paths: set[str]) -> dict[str, int] | None:
    """How often each embedding module is called in the traced forward, or None."""
    try:
        import torch.fx

        graph = torch.fx.symbolic_trace(root).graph
    except Exception:  # noqa: BLE001 - any tracing failure means: fall back
        return None
    calls: dict[str, int] = {p: 0 for p in paths}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in calls:
            calls[node.target] += 1
    return calls


def _short_names(paths: list[str]) -> dict[str, str]:
    """Module paths without their common prefix, dots as underscores."""
    if not paths:
        return {}
    parts = [p.split(".") for p in paths]
    common = os.path.commonprefix(parts) if len(paths) > 1 else parts[0][:-1]
    names = {}
    for path, split in zip(paths, parts):
        rest = split[len(common):] or split[-1:]
        names[path] = "_".join(rest)
    return names


def _dense(root) -> Dense | None:
    """Linear layer sizes, split into bottom and top MLPs by module path."""
    import torch.nn as nn

    bottom: list[int] = []
    top: list[int] = []
    for path, m in root.named_modules():
        if isinstance(m, nn.Linear):
            target = top if "top" in path else bottom
            if not target:
                target.append(m.in_features)
            target.append(m.out_features)
    if not bottom and not top:
        return None
    interaction = getattr(root, "interaction", "")
    return Dense(tuple(bottom), tuple(top), interaction if isinstance(interaction, str) else "")


def _torchrec_tables(path: str, module) -> list[tuple[str, int, int, str, list[str]]] | None:
    """(name, rows, dim, pooling, features) of a TorchRec EmbeddingBagCollection."""
    try:
        from torchrec.modules.embedding_modules import EmbeddingBagCollection
    except Exception:  # noqa: BLE001 - torchrec is optional
        return None
    if not isinstance(module, EmbeddingBagCollection):
        return None
    out = []
    for cfg in module.embedding_bag_configs():
        pooling = str(getattr(cfg.pooling, "name", cfg.pooling)).lower()
        if pooling not in ("sum", "mean"):
            raise ModelError(f"{path}.{cfg.name}: pooling {pooling} is not supported")
        out.append((cfg.name, cfg.num_embeddings, cfg.embedding_dim, pooling, list(cfg.feature_names)))
    return out


def import_module(
    module,
    *,
    name: str | None = None,
    optimizer: str = "rowwise_adagrad",
    serving: str = "f32",
    dtype: str = "f32",
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    **hyper: float,
) -> Model:
    """Import `module`'s sparse part; optimizer, serving layout and dtype apply to every
    table unless `overrides[table_name]` says otherwise (keys as Table fields, plus
    `optimizer` and `hyper`)."""
    try:
        return _import(module, name or type(module).__name__.lower(), optimizer, serving,
                       dtype, dict(overrides or {}), hyper)
    except ModelInvalid as e:
        raise ModelError(f"{type(module).__name__}: error: {e}") from None


def _import(module, name, optimizer, serving, dtype, overrides, hyper) -> Model:
    tables: list[Table] = []
    features: list[Feature] = []

    def add_table(table_name: str, rows: int, dim: int) -> None:
        opts = dict(overrides.get(table_name, {}))
        opt = Optimizer.make(opts.pop("optimizer", optimizer), **opts.pop("hyper", hyper))
        fields = {"dtype": dtype, "serving": serving, **opts}
        tables.append(Table(table_name, rows, dim, optimizer=opt, **fields))

    for path, m in module.named_modules():
        rec = _torchrec_tables(path, m)
        for tname, rows, dim, pooling, feats in rec or []:
            add_table(f"t_{tname}", rows, dim)
            features.extend(Feature(f, f"t_{tname}", pooling) for f in feats)
    embeddings = _embedding_modules(module)
    poolings = {p: _check_supported(p, m) for p, m in embeddings.items()}
    calls = _call_sites(module, set(embeddings))
    short = _short_names(list(embeddings))
    for path, m in embeddings.items():
        add_table(f"t_{short[path]}", m.num_embeddings, m.embedding_dim)
        count = 1 if calls is None else calls[path]
        for i in range(count):
            fname = short[path] if count == 1 else f"{short[path]}_{i}"
            features.append(Feature(fname, f"t_{short[path]}", poolings[path]))
    model = Model(name, tuple(tables), tuple(features), _dense(module))
    model.validate()
    return model
