"""The .ekko model language: parsing, defaults, scaling and located errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from ekko.compiler.frontend import (
    Model,
    ModelError,
    format_model,
    load_model,
    parse_model,
    parse_model_file,
)
from ekko.compiler.frontend.model import OPTIMIZER_DEFAULTS

ROOT = Path(__file__).resolve().parent.parent

FULL = """
# every construct of the language
model shop {
  defaults { optimizer rowwise_adagrad(lr=0.05); serving int8; dim 32; }
  table users { rows 1000; }   // inherits everything
  table items { rows 500; dim 13; dtype bf16; optimizer adam(lr=0.001, beta2=0.99);
                serving f16; clip max_norm=1.0, clip_value=0.5; weight_decay 0.0001;
                stochastic_rounding; }
  feature user -> users pooling mean;
  feature item -> items;
  feature item_history -> items pooling sum;
  dense { bottom 13 -> 64 -> 32; top 64 -> 1; interaction dot; }
}
"""


def test_full_language() -> None:
    m = parse_model(FULL, "shop.ekko")
    users, items = m.tables
    assert (users.rows, users.dim, users.dtype, users.serving) == (1000, 32, "f32", "int8")
    assert dict(users.update.optimizer.hyper) == {"lr": 0.05, "eps": 1e-8}
    assert items.dtype == "bf16" and items.serving == "f16" and items.update.stochastic_rounding
    rule = items.update
    assert dict(rule.optimizer.hyper) == {"lr": 0.001, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8}
    assert (rule.max_norm, rule.clip_value, rule.weight_decay) == (1.0, 0.5, 0.0001)
    assert [(f.name, f.table, f.pooling) for f in m.features] == [
        ("user", "users", "mean"), ("item", "items", "sum"), ("item_history", "items", "sum")]
    assert m.dense is not None and m.dense.bottom_mlp == (13, 64, 32) and m.dense.interaction == "dot"


@pytest.mark.parametrize("kind", sorted(OPTIMIZER_DEFAULTS))
def test_defaults_are_filled_in(kind: str) -> None:
    m = parse_model(f"model m {{ table t {{ rows 4; dim 2; optimizer {kind}; }} }}")
    assert dict(m.tables[0].update.optimizer.hyper) == OPTIMIZER_DEFAULTS[kind]


def test_default_hyper_parameters_are_the_documented_ones() -> None:
    """Pinned literally (not via OPTIMIZER_DEFAULTS): both frontends and the
    kernels' UpdateSpec agree on these, so a change here is a change of meaning."""
    assert OPTIMIZER_DEFAULTS == {
        "sgd": {"lr": 0.01},
        "adagrad": {"lr": 0.01, "eps": 1e-10, "lr_decay": 0.0},
        "rowwise_adagrad": {"lr": 0.01, "eps": 1e-8},
        "adam": {"lr": 0.01, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
        "rmsprop": {"lr": 0.01, "alpha": 0.99, "eps": 1e-8},
        "ftrl": {"lr": 0.01, "l1": 0.0, "l2": 0.0, "beta": 1.0},
        "lion": {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "decoupled_decay": 0.0},
    }


def test_unknown_setting_lists_every_setting() -> None:
    with pytest.raises(ModelError) as info:
        parse_model("model m { table t { rows 1; dim 4; size 3; } }", "m.ekko")
    assert ("m.ekko:1:36: error: expected 'clip', 'dim', 'dtype', 'optimizer', 'rows', "
            "'serving', 'stochastic_rounding', 'weight_decay' or '}', found 'size'") in str(info.value)


def test_dlrm_example() -> None:
    m = parse_model_file(ROOT / "examples" / "dlrm.ekko")
    assert len(m.tables) == len(m.features) == 26
    assert sum(t.rows for t in m.tables) == 33_762_577
    assert {t.serving for t in m.tables} == {"int8"}


def test_scaling_keeps_at_least_two_rows() -> None:
    m = load_model(str(ROOT / "examples" / "dlrm.ekko"), scale=0.001)
    rows = {t.name: t.rows for t in m.tables}
    assert rows["t_cat2"] == 10131 and rows["t_cat8"] == 2 and min(rows.values()) >= 2
    with pytest.raises(ModelError, match="scale factor must be positive"):
        load_model(str(ROOT / "examples" / "dlrm.ekko"), scale=0)


@pytest.mark.parametrize("source,line,col,message", [
    ("model m {\n  table t { rows 10; dim oops; }\n}", 2, 26, "expected an integer, found 'oops'"),
    ("model m { table t { rows 10 dim 4; } }", 1, 29, "expected ';', found 'dim'"),
    ("model m { table t { rows 10; dim 4; }", 1, 37, "found the end of the file"),
    ("model m { table t { rows 10; dim 4; dtype int4; } }", 1, 43, "unknown dtype 'int4'"),
    ("model m { table t { rows 10; dim 4; optimizer lamb; } }", 1, 47, "unknown optimizer 'lamb'"),
    ("model m { table t { rows 10; dim 4; optimizer sgd(lr=1, lr=2); } }", 1, 57, "set twice"),
    ("model m { table t { rows 10; dim 4; } feature f -> u; }", 1, 52, "unknown table 'u'"),
    ("model m { table t { rows 10; dim 4; } feature t -> t; feature t -> t; }", 1, 63,
     "feature t is declared twice"),
    ("model m { defaults { rows 5; } table t { dim 4; } }", 1, 38, "'rows' cannot be a default"),
    ("model m { table t { rows 10; dim 4.5; } }", 1, 34, "expected an integer, found '4.5'"),
    ("model m { @ }", 1, 11, "expected 'defaults', 'dense', 'feature', 'table' or '}', found '@'"),
    ("model m { defaults { dim 4; } defaults { dim 8; } }", 1, 31, "defaults are declared twice"),
    ("model m { table t { rows 1; dim 4; } defaults { dim 8; } }", 1, 38,
     "defaults must come before the first table"),
    ("model m { table t { rows 1; dim 4; clip max_norm=1, max_norm=2; } }", 1, 53,
     "'max_norm' is set twice"),
    ("model m { table t { rows 1; dim 4; optimizer adam(beta1=1); } }", 1, 51,
     "adam beta1 must be in [0, 1), got 1.0"),
    ("model m { table t { rows 1; dim 4; optimizer adagrad(lr_decay=-1); } }", 1, 54,
     "lr_decay must be zero or positive"),
    ("model m { table t { rows 99999999999999999999; dim 4; } }", 1, 26,
     "table t: rows must be at most 1,099,511,627,776, got a number of 20 digits"),
    ("model m { table t { rows 1099511627777; dim 4; } }", 1, 26,
     "table t: rows must be at most 1,099,511,627,776, got 1,099,511,627,777"),
    ("model m { table t { rows 10; dim 16385; } }", 1, 34,
     "table t: dim must be at most 16,384, got 16,385"),
    ("model m { table t { rows 10; dim 99999999999999999999999; } }", 1, 34,
     "dim must be at most 16,384, got a number of 23 digits"),
    ("model m { defaults { dim 0; } }", 1, 26, "defaults: dim must be positive, got 0"),
    ("model m { table t { rows 1; dim 4; weight_decay 1e400; } }", 1, 49,
     "1e400 is too large: numbers must be finite"),
    ("model m { table t { rows 1; dim 4; clip max_norm=1e999; } }", 1, 50, "must be finite"),
    ("model m { table t { rows 1; dim 4; clip max_norm=-1; } }", 1, 41,
     "table t: max_norm must be positive, got -1.0"),
    ("model m { table t { rows 1; dim 4; weight_decay -0.5; } }", 1, 49,
     "table t: weight_decay must be zero or positive, got -0.5"),
    ("model m { table t { rows 1; dim 4; optimizer sgd(lr=-1e999); } }", 1, 53,
     "must be finite"),
    ("model m { table t { rows 1; dim 4; clip max_norm=1; clip max_norm=2; } }", 1, 53,
     "'clip' is set twice (one clip takes both"),
    ("model m { table t { rows 1; dim 4; clip max_norm=1; clip clip_value=2; } }", 1, 53,
     "'clip' is set twice"),
    ("model m {\n  table t { rows 1;\f dim 0; }\n}", 2, 26, "dim must be positive"),
    ("model m {\n\x1c table t { rows 0; dim 4; }\n}", 2, 1, "unexpected character '\\x1c'"),
    ("model m {\n\f\r\n table t { rows 0; dim 4; }\n}", 3, 17, "rows must be positive"),
    ("model m { dense { interaction concat; } }", 1, 31, "unknown interaction 'concat'"),
    ("model m { dense { bottom 13 -> 0; } }", 1, 32, "bottom layer size must be positive"),
    ("model m { dense { top 13 -> 1048577; } }", 1, 29, "must be at most 1,048,576"),
    ("model m { dense { } dense { } }", 1, 21, "the dense part is declared twice"),
    ("", 1, 1, "expected 'model', found the end of the file"),
])
def test_errors_point_at_the_token(source: str, line: int, col: int, message: str) -> None:
    with pytest.raises(ModelError) as info:
        parse_model(source, "m.ekko")
    text = str(info.value)
    head, src, caret = text.split("\n")
    assert head.startswith(f"m.ekko:{line}:{col}: error: ") and message in head
    assert src == source.split("\n")[line - 1]
    assert caret == " " * (col - 1) + "^"


@pytest.mark.parametrize("pad", [0, 40, 3000])
def test_a_long_line_is_shown_as_a_window_around_the_error(pad: int) -> None:
    """A 5,000-digit number is quoted as a window of the line with the caret on it."""
    source = "model m { " + " " * pad + "table t { rows " + "9" * 5000 + "; dim 8; } }"
    with pytest.raises(ModelError) as info:
        parse_model(source, "m.ekko")
    head, src, caret = str(info.value).split("\n")
    col = int(head.split(":")[2])
    assert source[col - 1] == "9" and source[col - 2] == " "
    assert len(src) <= 126 and src.startswith("..." if pad else "model m")
    at = caret.index("^")
    assert caret == " " * at + "^" and src[at] == "9" and src[at - 1] == " "


def test_missing_file_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such model file"):
        load_model(str(tmp_path / "nope.ekko"))
    with pytest.raises(ModelError, match="no such file"):
        load_model(str(tmp_path / "nope.py:build"))


def test_model_is_hashable_and_comparable() -> None:
    a, b = parse_model(FULL), parse_model(FULL)
    assert a == b and hash(a) == hash(b) and isinstance(a, Model)


@pytest.mark.parametrize("source", [FULL, (ROOT / "examples" / "dlrm.ekko").read_text(),
                                    "model empty { }", "model m { table t { rows 2; dim 1; } }"])
def test_format_model_round_trips(source: str) -> None:
    m = parse_model(source)
    text = format_model(m)
    assert parse_model(text) == m and format_model(parse_model(text)) == text


def test_format_model_factors_shared_settings_into_defaults() -> None:
    text = format_model(parse_model_file(ROOT / "examples" / "dlrm.ekko"))
    assert "    serving int8;\n" in text and "table t_cat0 { rows 1460; }" in text


def test_format_model_rejects_names_the_language_cannot_spell() -> None:
    m = parse_model("model m { table t { rows 2; dim 1; } }")
    with pytest.raises(ModelError, match="'my table' cannot be written"):
        format_model(Model("m", (m.tables[0].__class__("my table", 2, 1),), ()))


def test_model_lookups() -> None:
    m = parse_model(FULL)
    assert m.table("items").dim == 13
    assert [f.name for f in m.features_of("items")] == ["item", "item_history"]
    with pytest.raises(KeyError, match="no table 'nope'"):
        m.table("nope")


def test_factory_failures_are_model_errors(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "fails.py").write_text("def build():\n    raise RuntimeError('no weights')\n")
    with pytest.raises(ModelError, match="importing the file failed: RuntimeError: boom"):
        load_model(f"{tmp_path / 'broken.py'}:build")
    with pytest.raises(ModelError, match="the factory failed: RuntimeError: no weights"):
        load_model(str(tmp_path / "fails.py"))
    with pytest.raises(ModelError, match="no factory 'make'"):
        load_model(f"{tmp_path / 'fails.py'}:make")


def test_a_tables_update_is_one_rule() -> None:
    """The language, update_kernel's keywords and UpdateRule.make describe one
    update with one object; defaults come from the catalog, ranges are checked
    when the rule is made."""
    from ekko.compiler.frontend import UpdateRule
    from ekko.compiler.frontend.model import ModelInvalid, Optimizer

    items = parse_model(FULL).table("items")
    assert items.update == UpdateRule.make("adam", lr=0.001, beta2=0.99, max_norm=1.0,
                                           clip_value=0.5, weight_decay=0.0001,
                                           stochastic_rounding=True)
    assert UpdateRule() == UpdateRule.make() == UpdateRule(Optimizer("rowwise_adagrad", {}))
    assert dict(UpdateRule.make("adam").optimizer.hyper) == OPTIMIZER_DEFAULTS["adam"]
    assert UpdateRule.make("adam", weight_decay=0.1).settings() == {
        "optimizer": "adam", **OPTIMIZER_DEFAULTS["adam"], "weight_decay": 0.1}
    for bad, what in [({"lr": -1.0}, "lr"), ({"max_norm": 0.0}, "max_norm"),
                      ({"clip_value": float("inf")}, "clip_value"),
                      ({"weight_decay": float("nan")}, "weight_decay"), ({"gamma": 1.0}, "gamma"),
                      ({"lr": "0.1"}, "lr"), ({"stochastic_rounding": 1}, "stochastic_rounding")]:
        with pytest.raises(ModelInvalid, match=what) as info:
            UpdateRule.make("adam", **bad)
        assert info.value.what == what
    assert UpdateRule.make("sgd", stochastic_rounding=True).dtype_problem("f32")
    assert UpdateRule.make("sgd", stochastic_rounding=True).dtype_problem("bf16") is None
