"""A Model as `.ekko` text: `parse_model(format_model(m)) == m`.

Why: a model imported from PyTorch can be written out, reviewed and edited as
a `.ekko` file, and tests can round-trip every Model through the language.
Settings most tables share go into a `defaults` block; hyper-parameters equal
to the optimizer's defaults are left out (the parser fills them back in).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

from .errors import ModelError
from .model import (Dense, Feature, Model, ModelInvalid, Optimizer, Table,
                    UpdateRule)

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# table fields a defaults block may carry ('rows' is always a table's own)
DEFAULTABLE = ("dim", "dtype", "optimizer", "serving")


def _name(name: str, what: str) -> str:
    if not NAME.match(name):
        raise ModelError(f"{what} name {name!r} cannot be written in the .ekko language "
                         "(names are letters, digits and '_', not starting with a digit)")
    return name


def _number(value: float) -> str:
    """The shortest text that reads back as the same float."""
    return repr(float(value))


def _optimizer(opt: Optimizer) -> str:
    defaults = opt.entry.defaults()
    given = [f"{k}={_number(v)}" for k, v in opt.hyper if defaults.get(k) != v]
    return opt.kind + (f"({', '.join(given)})" if given else "")


SETTINGS: dict[str, Callable[[Table], str | None]] = {
    "rows": lambda t: f"rows {t.rows};",
    "dim": lambda t: f"dim {t.dim};",
    "dtype": lambda t: f"dtype {t.dtype};",
    "optimizer": lambda t: f"optimizer {_optimizer(t.update.optimizer)};",
    "serving": lambda t: f"serving {t.serving};",
    "clip": lambda t: _clip(t.update),
    "weight_decay": lambda t: (f"weight_decay {_number(t.update.weight_decay)};"
                               if t.update.weight_decay else None),
    "stochastic_rounding": lambda t: ("stochastic_rounding;" if t.update.stochastic_rounding
                                      else None),
}


def _clip(rule: UpdateRule) -> str | None:
    args = [f"{k}={_number(v)}" for k, v in (("max_norm", rule.max_norm),
                                              ("clip_value", rule.clip_value)) if v is not None]
    return f"clip {', '.join(args)};" if args else None


def _shared_defaults(tables: tuple[Table, ...]) -> dict[str, str]:
    """For each defaultable setting, the text most tables share (first seen wins ties)."""
    out: dict[str, str] = {}
    for key in DEFAULTABLE:
        texts = [SETTINGS[key](t) for t in tables]
        text, count = Counter(texts).most_common(1)[0]
        if text is not None and count > 1:
            out[key] = text
    return out


def _table(t: Table, defaults: dict[str, str]) -> str:
    own = []
    for key, render in SETTINGS.items():
        text = render(t)
        if text is not None and defaults.get(key) != text:
            own.append(text)
    return f"  table {_name(t.name, 'table')} {{ {' '.join(own)} }}"


def _feature(f: Feature) -> str:
    return (f"  feature {_name(f.name, 'feature')} -> {_name(f.table, 'table')} "
            f"pooling {f.pooling};")


def _dense(d: Dense) -> list[str]:
    body = []
    if d.bottom_mlp:
        body.append(f"    bottom {' -> '.join(map(str, d.bottom_mlp))};")
    if d.top_mlp:
        body.append(f"    top {' -> '.join(map(str, d.top_mlp))};")
    if d.interaction:
        body.append(f"    interaction {d.interaction};")
    return ["", "  dense {", *body, "  }"]


def format_model(model: Model) -> str:
    """`.ekko` source for `model`, tables and features in their order."""
    try:
        model.validate()
    except ModelInvalid as e:
        raise ModelError(f"{model.name}: error: {e}") from None
    defaults = _shared_defaults(model.tables) if len(model.tables) > 1 else {}
    lines = [f"model {_name(model.name, 'model')} {{"]
    if defaults:
        lines += ["  defaults {", *(f"    {text}" for text in defaults.values()), "  }", ""]
    lines += [_table(t, defaults) for t in model.tables]
    if model.features:
        lines += ["", *(_feature(f) for f in model.features)]
    if model.dense is not None:
        lines += _dense(model.dense)
    return "\n".join(lines + ["}", ""])
