"""docs/language.md is true: its examples parse and compile, its error examples fail as it says,
and it names every optimizer, dtype, serving layout and pooling the language accepts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ekko.compiler.frontend import ModelError, parse_model
from ekko.compiler.frontend.model import OPTIMIZER_DEFAULTS, POOLINGS
from ekko.dialects import catalog

DOC = Path(__file__).resolve().parents[1] / "docs" / "language.md"
TEXT = DOC.read_text()
EXAMPLES = re.findall(r"```ekko\n(.*?)```", TEXT, re.S)
ERRORS = re.findall(r"```ekko-error\n// error: (.*?)\n(.*?)```", TEXT, re.S)


def test_the_doc_has_examples() -> None:
    assert len(EXAMPLES) >= 5 and len(ERRORS) >= 10


@pytest.mark.parametrize("source", EXAMPLES, ids=lambda s: s.split("{")[0].strip()[:30])
def test_examples_parse(source: str) -> None:
    model = parse_model(source, "docs/language.md")
    assert model.name in source


@pytest.mark.parametrize("source", EXAMPLES, ids=lambda s: s.split("{")[0].strip()[:30])
def test_examples_compile(source: str, tmp_path: Path) -> None:
    """Each example through `ekko compile` (IR, native kernels, manifest), not only
    the parser: `feature user -> user;` (the settings example) made it exit 3."""
    from ekko.cli import main

    path = tmp_path / "example.ekko"
    path.write_text(source)
    assert main(["compile", str(path), "-o", str(tmp_path / "out"), "-q", "--emit-ir", "model"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    model = parse_model(source)
    assert [t["name"] for t in manifest["tables"]] == [t.name for t in model.tables]
    assert [f["name"] for f in manifest["features"]] == [f.name for f in model.features]
    assert all((tmp_path / "out" / f).is_file() for k in manifest["kernels"] for f in k["files"])


@pytest.mark.parametrize("message,source", ERRORS, ids=[m for m, _ in ERRORS])
def test_error_examples_fail_with_their_message(message: str, source: str) -> None:
    with pytest.raises(ModelError) as e:
        parse_model(source, "doc.ekko")
    assert message in str(e.value) and str(e.value).startswith("doc.ekko:")


def test_every_name_the_language_accepts_is_documented() -> None:
    for word in (*OPTIMIZER_DEFAULTS, *catalog.LAYOUTS.masters(), *catalog.LAYOUTS, *POOLINGS):
        assert f"`{word}`" in TEXT, word
    for optimizer, defaults in OPTIMIZER_DEFAULTS.items():
        row = next(line for line in TEXT.splitlines() if line.startswith(f"| `{optimizer}` |"))
        documented = {k: float(v) for k, v in re.findall(r"`(\w+)` \(([-+.\deE]+)\)", row)}
        assert documented == defaults, optimizer


def test_the_documented_defaults_hold() -> None:
    """What a table gets when it says only rows and dim."""
    table = parse_model("model m { table t { rows 10; dim 4; } feature f -> t; }").tables[0]
    rule = table.update
    assert (table.dtype, table.serving, rule.optimizer.kind) == ("f32", "f32", "rowwise_adagrad")
    assert rule.max_norm is None and rule.clip_value is None and rule.weight_decay == 0
    assert not rule.stochastic_rounding
    assert parse_model("model m { table t { rows 10; dim 4; } feature f -> t; }"
                       ).features[0].pooling == "sum"
