"""From a model description (either frontend) to the model-level IR.

The module declares each table (`emb.table`, with its optimizer, serving
layout and update options as attributes) and each feature (`emb.feature`),
and holds one function per table that applies a delta (`@update_<table>`)
and one per feature that serves it (`@serve_<feature>`), both in the `upd`
and `emb` dialects. Both frontends end here, so equal models give equal IR.

A table and a feature may share a name (`feature user -> user;`), but the
symbols of one module must be distinct: `model_symbols` derives them, the
user's names where they are free, else a dotted one no model name can take
(`@feature.user`). Users keep their names; only the IR spells them apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.dialects import func
from xdsl.dialects.builtin import (
    DYNAMIC_INDEX,
    FunctionType,
    ModuleOp,
    StringAttr,
    TensorType,
    UnitAttr,
    f32,
)
from xdsl.ir import Attribute, Block, Region

from ..dialects import emb
from ..dialects.common import LayoutAttr, float_attr
from .frontend.model import Feature, Model, Table
from .pipeline import UpdateRequest, build_update_function


@dataclass(frozen=True)
class Symbols:
    """The IR symbol of each table, feature and function of a model, by user name."""

    tables: dict[str, str]
    features: dict[str, str]
    updates: dict[str, str]  # table name -> its @update function
    serves: dict[str, str]  # feature name -> its @serve function


def model_symbols(model: Model) -> Symbols:
    """Distinct symbols for every declaration and function of `model`.

    Each gets its natural symbol (the table's or feature's name,
    `update_<table>`, `serve_<feature>`) unless an earlier one took it
    (tables first, then features, update and serve functions); then
    `<kind>.<name>`, numbered if even that is taken.
    """
    taken: set[str] = set()

    def claim(natural: str, kind: str, name: str) -> str:
        symbol, n = natural, 1
        while symbol in taken:
            symbol = f"{kind}.{name}" if n == 1 else f"{kind}.{name}.{n}"
            n += 1
        taken.add(symbol)
        return symbol

    tables = {t.name: claim(t.name, "table", t.name) for t in model.tables}
    features = {f.name: claim(f.name, "feature", f.name) for f in model.features}
    updates = {t.name: claim(f"update_{t.name}", "update", t.name) for t in model.tables}
    serves = {f.name: claim(f"serve_{f.name}", "serve", f.name) for f in model.features}
    return Symbols(tables, features, updates, serves)


def update_request(table: Table, *, index_dtype: str = "i64") -> UpdateRequest:
    """The table's update: its buffers' shape, with its real row count, and its rule."""
    serving = None if table.serving == table.dtype else table.serving
    return UpdateRequest(table.update, table.dim, table.dtype, index_dtype, serving,
                         rows=table.rows)


def serving_layout(table: Table) -> str:
    """Lookups read the serving copy, or the master when there is none (same layout)."""
    return table.serving


def table_decl(table: Table, symbol: str | None = None) -> emb.TableOp:
    """`emb.table @symbol` (default: the table's name): the table's type, its serving
    layout and its update rule's settings."""
    attrs: dict[str, Attribute] = {"serving": LayoutAttr(table.serving)}
    for name, value in table.update.settings().items():
        attrs[name] = (StringAttr(value) if isinstance(value, str) else
                       UnitAttr() if value is True else float_attr(value))
    return emb.TableOp(symbol or table.name, emb.TableType(table.rows, table.dim, table.dtype),
                       attrs)


def serve_function(feature: Feature, table: Table, index_dtype: str = "i64",
                   symbol: str | None = None) -> func.FuncOp:
    """`@serve_<feature>(serving table, ids[, offsets]) -> rows` for one feature
    (named `symbol` when given)."""
    table_t = emb.TableType(table.rows, table.dim, serving_layout(table))
    ids_t = emb.ids_type(index_dtype)
    pooled = feature.pooling != "none"
    arg_types: list[Attribute] = [table_t, ids_t] + ([ids_t] if pooled else [])
    block = Block(arg_types=arg_types)
    for arg, hint in zip(block.args, ("table", "ids", "offsets")):
        arg.name_hint = hint
    if pooled:
        op = emb.BagOp.build_inferred(list(block.args), {"mode": StringAttr(feature.pooling)})
    else:
        op = emb.LookupOp.build_inferred(list(block.args))
    op.results[0].name_hint = "pooled" if pooled else "rows"
    block.add_ops([op, func.ReturnOp(op.results[0])])
    result = TensorType(f32, [DYNAMIC_INDEX, table.dim])
    return func.FuncOp(
        symbol or f"serve_{feature.name}", FunctionType.from_lists(arg_types, [result]),
        Region(block))


def model_to_module(model: Model, *, index_dtype: str = "i64") -> ModuleOp:
    """The model-level IR of `model`."""
    tables = {t.name: t for t in model.tables}
    sym = model_symbols(model)
    ops = [table_decl(t, sym.tables[t.name]) for t in model.tables]
    ops += [emb.FeatureOp(sym.features[f.name], sym.tables[f.table], f.pooling)
            for f in model.features]
    ops += [
        build_update_function(update_request(t, index_dtype=index_dtype), sym.updates[t.name])
        for t in model.tables
    ]
    ops += [serve_function(f, tables[f.table], index_dtype, sym.serves[f.name])
            for f in model.features]
    module = ModuleOp(ops)
    module.attributes["sym_name"] = StringAttr(model.name)
    return module
