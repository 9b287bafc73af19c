"""The PyTorch importer: nn.Embedding(Bag) modules to a Model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from ekko.compiler.frontend import (  # noqa: E402
    ModelError,
    format_model,
    import_module,
    load_model,
    parse_model,
    parse_model_file,
)
from ekko.compiler.frontend import UpdateRule  # noqa: E402
from ekko.compiler.frontend.torch_import import torchrec_available  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _dlrm():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import dlrm_torch
    finally:
        sys.path.pop(0)
    return dlrm_torch


def test_dlrm_torch_equals_dlrm_ekko() -> None:
    with torch.device("meta"):  # 33.8M x 64 rows: shapes only, no memory
        module = _dlrm().build()
    imported = import_module(module, name="dlrm", serving="int8", lr=0.01, eps=1e-8)
    assert imported == parse_model_file(ROOT / "examples" / "dlrm.ekko")


def test_dlrm_examples_share_one_row_list() -> None:
    rows = [t.rows for t in parse_model_file(ROOT / "examples" / "dlrm.ekko").tables]
    assert rows == _dlrm().CRITEO_KAGGLE_ROWS and max(rows) == 10_131_227


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
    assert m.tables[0].update.optimizer.kind == "adam"
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
    assert user.update.optimizer.kind == "sgd" and dict(user.update.optimizer.hyper) == {"lr": 0.5}
    assert m.table("t_items").update == UpdateRule()  # the defaults, as the language's
    assert user.serving == "f16"


def test_update_keywords_make_one_rule() -> None:
    """The importer's keywords are update_kernel's: hyper-parameters and the
    rule's clipping, decay and rounding, per table through overrides too."""
    m = import_module(Shared(), optimizer="adam", lr=0.001, weight_decay=1e-4,
                      overrides={"t_user": {"max_norm": 2.0, "dtype": "f16",
                                            "stochastic_rounding": True}})
    assert m.table("t_items").update == UpdateRule.make("adam", lr=0.001, weight_decay=1e-4)
    assert m.table("t_user").update == UpdateRule.make(
        "adam", lr=0.001, weight_decay=1e-4, max_norm=2.0, stochastic_rounding=True)
    with pytest.raises(ModelError, match="max_norm must be positive"):
        import_module(Shared(), max_norm=-1.0)


@pytest.mark.parametrize("module,message", [
    (nn.ModuleDict({"a": nn.EmbeddingBag(10, 4, mode="max")}), "a: error: EmbeddingBag mode 'max'"),
    (nn.ModuleDict({"b": nn.Embedding(10, 4, padding_idx=0)}), "b: error: padding_idx"),
    (nn.ModuleDict({"c": nn.Embedding(10, 4, max_norm=1.0)}), "c: error: max_norm"),
])
def test_unsupported_constructs_name_the_module(module, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        import_module(module)


def test_bad_arguments_are_model_errors() -> None:
    with pytest.raises(ModelError, match="unknown optimizer"):
        import_module(Shared(), optimizer="lamb")
    with pytest.raises(ModelError, match="serving layout"):
        import_module(Shared(), serving="int2")


def test_unknown_override_table_is_an_error() -> None:
    with pytest.raises(ModelError, match=r"overrides name unknown tables \['t_usr'\]"):
        import_module(Shared(), overrides={"t_usr": {"serving": "f16"}})


def test_imported_model_round_trips_through_the_language() -> None:
    m = import_module(Shared(), optimizer="adam", serving="int4", lr=0.001)
    assert parse_model(format_model(m)) == m


class DotNoAttribute(nn.Module):
    """No `interaction` attribute: it is read off the traced bmm."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.EmbeddingBag(10, 4)
        self.b = nn.EmbeddingBag(10, 4)

    def forward(self, ia, oa, ib, ob):
        z = torch.stack([self.a(ia, oa), self.b(ib, ob)], dim=1)
        return torch.bmm(z, z.transpose(1, 2)).flatten(1)


def test_interaction_is_read_from_the_graph() -> None:
    m = import_module(DotNoAttribute())
    assert m.dense is not None and m.dense.interaction == "dot"
    assert [t.name for t in m.tables] == ["t_a", "t_b"]


def test_factory_that_needs_real_tensors_still_loads(tmp_path) -> None:
    (tmp_path / "real.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class M(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.bag = nn.EmbeddingBag(7, 4)\n"
        "        self.bias = float(torch.zeros(1).item())\n\n"
        "def make():\n    return M()\n")
    m = load_model(f"{tmp_path / 'real.py'}:make")
    assert [(t.name, t.rows) for t in m.tables] == [("t_bag", 7)]


def test_numeric_module_paths_become_names() -> None:
    m = import_module(nn.Sequential(nn.EmbeddingBag(5, 2), nn.EmbeddingBag(6, 2)))
    assert [f.name for f in m.features] == ["f0", "f1"]
    assert parse_model(format_model(m)) == m


@pytest.mark.skipif(not torchrec_available() and not os.environ.get("EKKO_REQUIRE_TORCHREC"),
                    reason="torchrec does not import here (it is optional: pip install "
                    "--no-deps torchrec beside fbgemm-gpu-cpu, plus its pure-Python deps)")
def test_torchrec_collections() -> None:
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    class Rec(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            meta = torch.device("meta")
            self.ebc = EmbeddingBagCollection(device=meta, tables=[
                EmbeddingBagConfig(name="t_items", num_embeddings=100, embedding_dim=8,
                                   feature_names=["item", "item_history"],
                                   pooling=PoolingType.MEAN),
                EmbeddingBagConfig(name="t_users", num_embeddings=50, embedding_dim=8,
                                   feature_names=["user"]),
            ])
            self.ec = EmbeddingCollection(device=meta, tables=[
                EmbeddingConfig(name="t_seq", num_embeddings=30, embedding_dim=4,
                                feature_names=["seq"]),
            ])
            self.extra = nn.EmbeddingBag(9, 4)  # mode mean: torch's default

    m = import_module(Rec())
    assert [(t.name, t.rows, t.dim) for t in m.tables] == [
        ("t_items", 100, 8), ("t_users", 50, 8), ("t_seq", 30, 4), ("t_extra", 9, 4)]
    assert [(f.name, f.table, f.pooling) for f in m.features] == [
        ("item", "t_items", "mean"), ("item_history", "t_items", "mean"),
        ("user", "t_users", "sum"), ("seq", "t_seq", "none"), ("extra", "t_extra", "mean")]
