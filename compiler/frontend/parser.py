"""The `.ekko` model language: lark grammar (model.lark) to `Model`.

Errors, syntax or meaning, are ModelErrors at the offending token:
`file:line:col: error: expected an integer`, the source line and a caret.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from ...dialects.limits import MAX_DIM, MAX_MLP_WIDTH, MAX_ROWS, limit_error
from .errors import ModelError, located
from .model import RULE_SETTINGS, Dense, Feature, Model, ModelInvalid, Optimizer, Table, UpdateRule

GRAMMAR = Path(__file__).with_name("model.lark")
_MAX_FLOAT = 1.7976931348623157e308

# The regex terminals, as a person would say them; keywords and punctuation are
# quoted from the grammar itself (see _readable).
READABLE = {
    "INT": "an integer",
    "SIGNED_NUMBER": "a number",
    "NAME": "a name",
    "$END": "the end of the file",
}


@lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(GRAMMAR.read_text(), parser="lalr", propagate_positions=True,
                maybe_placeholders=False)


def _readable(expected: set[str]) -> str:
    """lark's terminal names as plain words: `an integer`, `';'`, `'table'`."""
    names = sorted({_terminal_words(e) for e in expected})
    if len(names) > 10:  # every setting of a table fits; beyond that, say how many more
        names = names[:9] + [f"{len(names) - 9} more"]
    return " or ".join(names) if len(names) <= 2 else ", ".join(names[:-1]) + " or " + names[-1]


def _terminal_words(name: str) -> str:
    if name in READABLE:
        return READABLE[name]
    try:
        pattern = _parser().get_terminal(name).pattern
    except KeyError:
        return name.lower()
    return f"'{pattern.value}'" if pattern.type == "str" else name.lower()


def _word_at(text: str, pos: int) -> str:
    """The offending text: a run of word characters, else the single character."""
    match = re.match(r"[A-Za-z0-9_.+-]+", text[pos:])
    return match.group(0) if match else text[pos:pos + 1]


def _syntax_error(e: UnexpectedInput, text: str, filename: str) -> ModelError:
    if isinstance(e, UnexpectedCharacters):
        found = _word_at(text, e.pos_in_stream)
        if e.allowed and not found[0].isspace():
            message = f"expected {_readable(set(e.allowed))}, found {found!r}"
        else:
            message = f"unexpected character {found!r}"
        return located(filename, text, e.line, e.column, message)
    if isinstance(e, UnexpectedEOF):
        lines = text.rstrip("\n").split("\n")
        return located(filename, text, len(lines), len(lines[-1]) + 1,
                       f"unexpected end of file, expected {_readable(set(e.expected))}")
    assert isinstance(e, UnexpectedToken)
    token = e.token
    found = "the end of the file" if token.type == "$END" else repr(str(token))
    expected = _readable(set(e.accepts or e.expected))
    line = token.line if token.line is not None else 1
    col = token.column if token.column is not None else 1
    return located(filename, text, line, col, f"expected {expected}, found {found}")


class _Builder:
    """Walks the parse tree; keeps the token of every value for error positions."""

    def __init__(self, text: str, filename: str):
        self.text, self.filename = text, filename
        self.defaults: dict[str, object] = {}
        self.tokens: dict[tuple[str, str], Token] = {}
        self.seen: set[str] = set()

    def error(self, token: Token | Tree | None, message: str) -> ModelError:
        line, col = 1, 1
        if isinstance(token, Token):
            line, col = token.line or 1, token.column or 1
        elif isinstance(token, Tree) and token.meta and not token.meta.empty:
            line, col = token.meta.line, token.meta.column
        return located(self.filename, self.text, line, col, message)

    def model(self, tree: Tree) -> Model:
        name_tok, *items = tree.children
        tables: list[Table] = []
        features: list[Feature] = []
        dense: Dense | None = None
        for item in items:
            if item.data == "defaults":
                self.check_defaults_place(item, tables)
                self.defaults = self.settings(item.children, "defaults")
            elif item.data == "table":
                tables.append(self.table(item))
                if any(t.name == tables[-1].name for t in tables[:-1]):
                    raise self.error(item.children[0], f"table {tables[-1].name} is declared twice")
            elif item.data == "feature":
                features.append(self.feature(item))
                self.check_feature(item, features, tables)
            elif item.data == "dense":
                if dense is not None:
                    raise self.error(item, "the dense part is declared twice")
                dense = self.dense(item)
        model = Model(str(name_tok), tuple(tables), tuple(features), dense)
        try:
            model.validate()
        except ModelInvalid as e:
            raise self.error(self.find(e.what, item_trees=items), str(e)) from None
        return model

    def check_defaults_place(self, item: Tree, tables: list[Table]) -> None:
        """One defaults block, before the tables: a default never changes half a model."""
        if "defaults" in self.seen:
            raise self.error(item, "defaults are declared twice")
        if tables:
            raise self.error(item, "defaults must come before the first table")
        self.seen.add("defaults")

    def check_feature(self, item: Tree, features: list[Feature], tables: list[Table]) -> None:
        """Duplicate names and unknown tables, at the feature's own tokens."""
        name_tok, table_tok = item.children[0], item.children[1]
        if any(f.name == features[-1].name for f in features[:-1]):
            raise self.error(name_tok, f"feature {name_tok} is declared twice")
        if not any(t.name == str(table_tok) for t in tables):
            raise self.error(table_tok, f"feature {name_tok} reads unknown table '{table_tok}'"
                             " (tables are declared before the features that read them)")

    def find(self, what: str, item_trees) -> Token | None:
        """The first token spelling `what` (a name or a keyword) in the items."""
        for item in item_trees:
            for tok in item.scan_values(lambda v: isinstance(v, Token)):
                if str(tok) == what:
                    return tok
        return None

    def settings(self, children, owner: str) -> dict[str, object]:
        out: dict[str, object] = {}
        for s in children:
            key = s.data
            if key in out or (key == "clip" and {"max_norm", "clip_value"} & out.keys()):
                extra = " (one clip takes both: clip max_norm=1.0, clip_value=0.5)" \
                    if key == "clip" else ""
                raise self.error(s, f"{owner}: '{key}' is set twice{extra}")
            if key in ("rows", "dim"):
                limit = MAX_ROWS if key == "rows" else MAX_DIM
                who = "defaults" if owner == "defaults" else f"table {owner}"
                out[key] = self.integer(s.children[0], f"{who}: {key}", limit)
            elif key in ("dtype", "serving"):
                out[key] = str(s.children[0])
            elif key == "optimizer":
                out[key] = self.optimizer(s)
            elif key == "clip":
                out.update(self.clip(s))
            elif key == "weight_decay":
                out[key] = self.number(s.children[0])
            elif key == "stochastic_rounding":
                out[key] = True
            self.tokens[(owner, key)] = s.children[0] if s.children else s
        return out

    def number(self, tree: Tree) -> float:
        """A number's value; one that overflows a double (1e400) is an error, not inf."""
        token = tree.children[0]
        value = float(token)
        if not math.isfinite(value):
            raise self.error(token, f"{token} is too large: numbers must be finite "
                             f"(at most {_MAX_FLOAT:.6g})")
        return value

    def integer(self, token: Token, what: str, limit: int) -> int:
        """An integer within 1..limit, checked before int() sees thousands of digits."""
        digits = str(token).lstrip("0") or "0"
        if len(digits) > len(str(limit)):
            raise self.error(token, f"{what} must be at most {limit:,}, "
                             f"got a number of {len(digits):,} digits")
        value = int(digits)
        if (message := limit_error(what, value, limit)) is not None:
            raise self.error(token, message)
        return value

    def optimizer(self, s: Tree) -> Optimizer:
        kind_tok = s.children[0]
        hyper: dict[str, float] = {}
        if len(s.children) > 1:
            for h in s.children[1].children:
                if h is None:
                    continue
                name, value = h.children
                if str(name) in hyper:
                    raise self.error(name, f"hyper-parameter '{name}' is set twice")
                hyper[str(name)] = self.number(value)
        try:
            return Optimizer.make(str(kind_tok), **hyper)
        except ModelInvalid as e:
            bad = next((c for c in s.scan_values(lambda v: isinstance(v, Token))
                        if str(c) == e.what), kind_tok)
            raise self.error(bad, str(e)) from None

    def clip(self, s: Tree) -> dict[str, float]:
        out: dict[str, float] = {}
        for arg in s.children:
            name, value = arg.children
            if str(name) not in ("max_norm", "clip_value"):
                raise self.error(name, f"clip takes max_norm or clip_value, not '{name}'")
            if str(name) in out:
                raise self.error(name, f"clip: '{name}' is set twice")
            out[str(name)] = self.number(value)
        return out

    def table(self, tree: Tree) -> Table:
        name_tok, *settings = tree.children
        own = self.settings(settings, str(name_tok))
        merged = {**self.defaults, **own}
        for required in ("rows", "dim"):
            if required not in merged:
                raise self.error(name_tok, f"table {name_tok} needs '{required}'")
        if "rows" in self.defaults:
            raise self.error(name_tok, "'rows' cannot be a default: every table has its own")
        rule = {k: merged.pop(k) for k in ("optimizer", *RULE_SETTINGS) if k in merged}
        try:
            update = UpdateRule(**rule)  # type: ignore[arg-type]
        except ModelInvalid as e:
            raise self.error(self.token_of(str(name_tok), e.what) or name_tok,
                             f"table {name_tok}: {e}") from None
        try:
            table = Table(name=str(name_tok), update=update, **merged)  # type: ignore[arg-type]
            table.validate()
        except ModelInvalid as e:
            raise self.error(self.token_of(str(name_tok), e.what) or name_tok, str(e)) from None
        return table

    def token_of(self, table: str, what: str) -> Token | None:
        """The token of the table's setting `what` (its own, else the default's)."""
        key = "clip" if what in ("max_norm", "clip_value") else what
        return self.tokens.get((table, key)) or self.tokens.get(("defaults", key))

    def feature(self, tree: Tree) -> Feature:
        name, table, *pooling = tree.children
        return Feature(str(name), str(table), str(pooling[0]) if pooling else "sum")

    def dense(self, tree: Tree) -> Dense:
        parts: dict[str, object] = {}
        for s in tree.children:
            key = "interaction" if s.data == "interaction" else f"{s.data}_mlp"
            if key in parts:
                raise self.error(s, f"dense: '{s.data}' is set twice")
            if s.data == "interaction":
                parts[key] = str(s.children[0])
            else:
                parts[key] = tuple(self.integer(c, f"dense: {s.data} layer size", MAX_MLP_WIDTH)
                                   for c in s.children)
        dense = Dense(**parts)  # type: ignore[arg-type]
        try:
            dense.validate()
        except ModelInvalid as e:
            bad = next((c for c in tree.scan_values(lambda v: isinstance(v, Token))
                        if str(c) == e.what or (str(c).isdigit() and int(c) < 1)), tree)
            raise self.error(bad, str(e)) from None
        return dense


def parse_model(text: str, filename: str = "<input>") -> Model:
    """Parse `.ekko` source into a validated Model."""
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(e, text, filename) from None
    return _Builder(text, filename).model(tree.children[0])


def parse_model_file(path: str | Path) -> Model:
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: error: cannot read the model: {e}") from None
    return parse_model(text, str(path))
