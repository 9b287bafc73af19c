"""The PyTorch importer: nn.Embedding(Bag) modules to a Model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from ekko.compiler.frontend import ModelError, import_module, load_model, parse_model_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _dlrm():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import dlrm_torch
    finally:
        sys.path.pop(0)
    return dlrm_torch


def test_dlrm_torch_equals_dlrm_ekko() -> None:
    imported = import_module(_dlrm().build(), name="dlrm", serving="int8", lr=0.01, eps=1e-8)
    assert imported == parse_model_file(ROOT / "examples" / "dlrm.ekko")


def test_load_model_from_factory_spec_scales() -> None:
    m = load_model(f"{ROOT / 'examples' / 'dlrm_torch.py'}:build", scale=0.001,
                   name="dlrm", serving="int8", lr=0.01, eps=1e-8)
    assert m == parse_model_file(ROOT / "examples" / "dlrm.ekko").scaled(0.001)


class Shared(nn.Module):
    """One bag read by two features, a plain Embedding, and a dense part."""

    def __init__(self) -> None:
        super().__init__()
        self.items = nn.EmbeddingBag(100, 8, mode="mean")
        self.user = nn.Embedding(50, 4)
        self.top = nn.Linear(20, 1)

    def forward(self, a, a_off, b, b_off, u):
        x = torch.cat([self.items(a, a_off), self.items(b, b_off), self.user(u)], dim=1)
        return self.top(x)


def test_shared_table_and_plain_embedding() -> None:
    m = import_module(Shared(), optimizer="adam", lr=0.001)
    assert [(t.name, t.rows, t.dim) for t in m.tables] == [("t_items", 100, 8), ("t_user", 50, 4)]
    assert [(f.name, f.table, f.pooling) for f in m.features] == [
        ("items_0", "t_items", "mean"), ("items_1", "t_items", "mean"), ("user", "t_user", "none")]
    assert m.tables[0].optimizer.kind == "adam"
    assert m.dense is not None and m.dense.top_mlp == (20, 1)


class Untraceable(nn.Module):
    """Data-dependent control flow in the dense part defeats torch.fx."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(10, 4)

    def forward(self, ids, offsets):
        y = self.bag(ids, offsets)
        if y.sum() > 0:
            return y * 2
        return y


def test_untraceable_dense_part_still_imports() -> None:
    m = import_module(Untraceable())
    assert [f.name for f in m.features] == ["bag"] and m.tables[0].rows == 10


def test_overrides_per_table() -> None:
    m = import_module(Shared(), overrides={"t_user": {"optimizer": "sgd", "hyper": {"lr": 0.5},
                                                      "serving": "f16"}})
    user = m.table("t_user")
    assert user.optimizer.kind == "sgd" and dict(user.optimizer.hyper) == {"lr": 0.5}
    assert user.serving == "f16"


@pytest.mark.parametrize("module,message", [
    (nn.ModuleDict({"a": nn.EmbeddingBag(10, 4, mode="max")}), "a: EmbeddingBag mode 'max'"),
    (nn.ModuleDict({"b": nn.Embedding(10, 4, padding_idx=0)}), "b: padding_idx"),
    (nn.ModuleDict({"c": nn.Embedding(10, 4, max_norm=1.0)}), "c: max_norm"),
])
def test_unsupported_constructs_name_the_module(module, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        import_module(module)


def test_bad_arguments_are_model_errors() -> None:
    with pytest.raises(ModelError, match="unknown optimizer"):
        import_module(Shared(), optimizer="lion")
    with pytest.raises(ModelError, match="serving layout"):
        import_module(Shared(), serving="int2")
