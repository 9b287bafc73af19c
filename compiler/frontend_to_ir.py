"""From a model description (either frontend) to the model-level IR.

The module declares each table (`emb.table`, with its optimizer, serving
layout and update options as attributes) and each feature (`emb.feature`),
and holds one function per table that applies a delta (`@update_<table>`)
and one per feature that serves it (`@serve_<feature>`), both in the `upd`
and `emb` dialects. Both frontends end here, so equal models give equal IR.
"""

from __future__ import annotations

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
from ..dialects.common import float_attr
from .frontend.model import Feature, Model, Table
from .pipeline import UpdateRequest, build_update_function


def update_request(table: Table, *, index_dtype: str = "i64") -> UpdateRequest:
    """The table's update: its buffers' shape, with its real row count, and its rule."""
    serving = None if table.serving == table.dtype else table.serving
    return UpdateRequest(table.update, table.dim, table.dtype, index_dtype, serving,
                         rows=table.rows)


def serving_layout(table: Table) -> str:
    """Lookups read the serving copy, or the master when there is none (same layout)."""
    return table.serving


def table_decl(table: Table) -> emb.TableOp:
    """`emb.table`: the table's type, its serving layout and its update rule's settings."""
    attrs: dict[str, Attribute] = {"serving": StringAttr(table.serving)}
    for name, value in table.update.settings().items():
        attrs[name] = (StringAttr(value) if isinstance(value, str) else
                       UnitAttr() if value is True else float_attr(value))
    return emb.TableOp(table.name, emb.TableType(table.rows, table.dim, table.dtype), attrs)


def serve_function(feature: Feature, table: Table, index_dtype: str = "i64") -> func.FuncOp:
    """`@serve_<feature>(serving table, ids[, offsets]) -> rows` for one feature."""
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
        f"serve_{feature.name}", FunctionType.from_lists(arg_types, [result]), Region(block)
    )


def model_to_module(model: Model, *, index_dtype: str = "i64") -> ModuleOp:
    """The model-level IR of `model`."""
    tables = {t.name: t for t in model.tables}
    ops = [table_decl(t) for t in model.tables]
    ops += [emb.FeatureOp(f.name, f.table, f.pooling) for f in model.features]
    ops += [
        build_update_function(update_request(t, index_dtype=index_dtype), f"update_{t.name}")
        for t in model.tables
    ]
    ops += [serve_function(f, tables[f.table], index_dtype) for f in model.features]
    module = ModuleOp(ops)
    module.attributes["sym_name"] = StringAttr(model.name)
    return module
