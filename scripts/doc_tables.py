"""Write the tables the docs print from the catalog: `python scripts/doc_tables.py`.

Each generated table follows a marker line `<!-- generated: NAME -->` and
ends at the next blank line; NAME is one of TABLES. `--check` changes
nothing and exits 1 when a file differs from what it would write (the tests
run the same comparison).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

from ekko.dialects import catalog

ROOT = Path(__file__).resolve().parents[1]
TABLES: dict[str, Callable[[], str]] = {
    "optimizer-table": catalog.optimizer_table,
    "optimizer-state-table": catalog.state_table,
    "layout-table": catalog.layout_table,
}
FILES = ("README.md", "docs/language.md")
MARKER = re.compile(r"^<!-- generated: ([\w-]+) -->\n(?:.+\n)*", re.M)


def render(text: str) -> str:
    """`text` with every generated table re-made (KeyError for an unknown NAME)."""
    return MARKER.sub(lambda m: f"<!-- generated: {m[1]} -->\n{TABLES[m[1]]()}\n", text)


def main(argv: list[str]) -> int:
    stale = []
    for name in FILES:
        path = ROOT / name
        text = path.read_text()
        if render(text) != text:
            stale.append(name)
            if "--check" not in argv:
                path.write_text(render(text))
    if stale:
        print(("stale: " if "--check" in argv else "wrote: ") + ", ".join(stale))
    return 1 if stale and "--check" in argv else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
