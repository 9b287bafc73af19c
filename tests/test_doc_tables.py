"""The optimizer and layout tables of README.md and docs/language.md are the
catalog's, exactly as scripts/doc_tables.py renders them."""

from __future__ import annotations

from pathlib import Path

import pytest

from ekko.dialects import catalog
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
doc_tables = load_script("scripts/doc_tables.py")


@pytest.mark.parametrize("name", doc_tables.FILES)
def test_generated_tables_are_current(name: str) -> None:
    text = (ROOT / name).read_text()
    assert doc_tables.render(text) == text, f"run: python scripts/doc_tables.py ({name})"


def test_every_table_is_printed_somewhere() -> None:
    text = "".join((ROOT / name).read_text() for name in doc_tables.FILES)
    for table in doc_tables.TABLES:
        assert f"<!-- generated: {table} -->\n{doc_tables.TABLES[table]()}\n" in text, table


def test_the_tables_name_every_built_in_and_layout() -> None:
    for name, opt in catalog.OPTIMIZERS.items():
        if name in catalog.BUILTIN:
            assert f"| `{name}` |" in catalog.optimizer_table() and opt.doc in catalog.state_table()
    for name in catalog.LAYOUTS:
        assert f"| `{name}` |" in catalog.layout_table()


def test_a_changed_catalog_makes_the_docs_stale(monkeypatch) -> None:
    """The comparison can fail: a new default shows in the rendering."""
    text = (ROOT / "docs" / "language.md").read_text()
    lion = catalog.OPTIMIZERS["lion"]
    changed = catalog.Optimizer(lion.name, lion.math, lion.states,
                                (catalog.Hyper("lr", 0.5, 0.0, low_open=True), *lion.hyper[1:]),
                                doc=lion.doc, source=lion.source)
    monkeypatch.setattr(catalog.OPTIMIZERS, "_entries", {**catalog.OPTIMIZERS, "lion": changed})
    assert doc_tables.render(text) != text and "`lr` (0.5)" in doc_tables.render(text)
