"""The IR's Python API: build, verify, print, re-parse, run passes, read specs.

Also checks that the lit suite keeps its promise: every verifier and parser
error of the dialects has an `invalid.mlir` case, and each case really
produces its own message.
"""

from __future__ import annotations

import ast
import io
import re
from pathlib import Path

import pytest
from xdsl.dialects import func
from xdsl.dialects.builtin import (
    DYNAMIC_INDEX,
    IntegerAttr,
    IntegerType,
    ModuleOp,
    StringAttr,
    TensorType,
    f32,
)
from xdsl.ir import Block, Region
from xdsl.parser import Parser
from xdsl.printer import Printer
from xdsl.utils.exceptions import VerifyException

from ekko.compiler.backend.spec import BagSpec, UpdateSpec
from ekko.compiler.backend.targets import kernel_specs
from ekko.compiler.registry import make_context
from ekko.compiler.tools.ekko_opt import main as ekko_opt
from ekko.compiler.transforms.lower_to_kernel import LowerToKernelPass, LoweringError
from ekko.compiler.transforms.upd_dedup import UpdDedupPass
from ekko.compiler.transforms.upd_fuse import UpdFusePass
from ekko.compiler.transforms.upd_schedule import UpdSchedulePass
from ekko.dialects import catalog, emb, kern, upd
from ekko.dialects.common import LayoutAttr, float_attr

REPO = Path(__file__).resolve().parents[1]
FILECHECK = Path(__file__).parent / "filecheck"
i32, i64 = IntegerType(32), IntegerType(64)


def printed(op, generic: bool = False) -> str:
    out = io.StringIO()
    Printer(stream=out, print_generic_format=generic).print_op(op)
    return out.getvalue()


def reparse(text: str) -> ModuleOp:
    module = Parser(make_context(), text).parse_module()
    module.verify()
    return module


# --------------------------------------------------------------------- types


@pytest.mark.parametrize("layout", list(catalog.LAYOUTS))
def test_table_type_every_layout(layout: str) -> None:
    t = emb.TableType(1000, 64, layout)
    t.verify()
    assert str(t) == f"!emb.table<1000x64x{layout}>"
    assert t.quantized == (layout not in catalog.LAYOUTS.masters())  # serving-only: row-wise codes


def test_types_with_dynamic_rows_print_a_question_mark() -> None:
    assert str(emb.TableType(DYNAMIC_INDEX, 8, "int4")) == "!emb.table<?x8xint4>"
    assert str(emb.StateType(DYNAMIC_INDEX, 1)) == "!emb.state<?x1>"
    assert str(emb.VersionsType(DYNAMIC_INDEX)) == "!emb.versions<?>"


def test_delta_type() -> None:
    d = upd.DeltaType(64, "i32")
    assert str(d) == "!upd.delta<64xf32, i32>"
    assert not d.is_unique
    u = d.with_unique()
    assert u.is_unique and str(u) == "!upd.delta<64xf32, i32, unique>"
    assert u.with_unique(False) == d


@pytest.mark.parametrize(
    "make, message",
    [
        # these cannot be written as text: the type parsers reject first
        (lambda: emb.TableType(4, 4, "int2"), "unknown layout 'int2'; expected one of f32,"),
        (lambda: upd.DeltaType(0, "i64"), "!upd.delta needs rows of at least one value"),
        (lambda: upd.DeltaType(4, "i16"), "!upd.delta ids must be i32 or i64"),
        (lambda: emb.TableType(0, 4), "!emb.table needs at least one row"),
        (lambda: emb.TableType(4, 0), "!emb.table needs at least one column"),
        (lambda: emb.StateType(4, 0), "!emb.state needs at least one column"),
        (lambda: emb.VersionsType(0), "!emb.versions needs at least one row"),
    ],
)
def test_type_constructors_verify(make, message: str) -> None:
    with pytest.raises(VerifyException, match=re.escape(message)):
        make()


# ------------------------------------------------------------ building IR


def build_train(index: str = "i64", serving: str = "int8") -> ModuleOp:
    """The chain a user writes: delta, clip, rowwise Adagrad, requantize, stamp."""
    table = emb.TableType(1000, 64, "f32")
    state = emb.StateType(1000, 1)
    serve = emb.TableType(1000, 64, serving)
    versions = emb.VersionsType(1000)
    ids = emb.ids_type(index)
    rows = emb.rows_type(64)
    block = Block(arg_types=[table, state, ids, rows, serve, versions, i64])
    t, m, ids_v, rows_v, q, v, version = block.args
    delta = upd.DeltaOp.build_inferred([ids_v, rows_v])
    clip = upd.ClipOp.build_inferred([delta.results[0]], {"max_norm": float_attr(1.0)})
    opt = upd.RowwiseAdagradOp.build_inferred(
        [t, m, clip.results[0]], {"lr": float_attr(0.01)}
    )
    req = upd.RequantizeOp.build_inferred([opt.results[0], q, delta.results[0]])
    stamp = upd.StampOp.build_inferred([v, delta.results[0], version])
    ret = func.ReturnOp(opt.results[0], opt.results[1], req.results[0], stamp.results[0])
    block.add_ops([delta, clip, opt, req, stamp, ret])
    for arg, name in zip(block.args, ["t", "m", "ids", "rows", "q", "v", "version"]):
        arg.name_hint = name
    f = func.FuncOp(
        "train",
        ([a.type for a in block.args], [table, state, serve, versions]),
        Region(block),
    )
    return ModuleOp([f])


def test_build_inferred_result_types() -> None:
    module = build_train()
    module.verify()
    ops = {op.name: op for op in module.walk()}
    assert ops["upd.delta"].results[0].type == upd.DeltaType(64, "i64")
    assert ops["upd.clip"].results[0].type == upd.DeltaType(64, "i64")
    assert [r.type for r in ops["upd.rowwise_adagrad"].results] == [
        emb.TableType(1000, 64),
        emb.StateType(1000, 1),
    ]
    assert ops["upd.requantize"].results[0].type == emb.TableType(1000, 64, "int8")
    assert ops["upd.stamp"].results[0].type == emb.VersionsType(1000)


def test_build_inferred_rejects_bad_operands() -> None:
    block = Block(arg_types=[emb.TableType(10, 4), upd.DeltaType(8)])
    with pytest.raises(VerifyException, match="delta rows have 8 values but the table's dim is 4"):
        upd.SgdOp.build_inferred(list(block.args), {"lr": float_attr(0.1)})


@pytest.mark.parametrize("generic", [False, True])
def test_print_and_reparse_round_trip(generic: bool) -> None:
    module = build_train()
    text = printed(module, generic)
    again = reparse(text)
    assert printed(again) == printed(module)
    assert "upd.rowwise_adagrad %t, %m, %" in printed(module)


def test_verify_reports_a_bad_attribute() -> None:
    module = build_train()
    clip = next(op for op in module.walk() if isinstance(op, upd.ClipOp))
    clip.max_norm = float_attr(-1.0)
    with pytest.raises(VerifyException, match="'upd.clip' max_norm must be positive, got -1.0"):
        module.verify()


def test_bag_and_lookup_from_python() -> None:
    table = emb.TableType(DYNAMIC_INDEX, 32, "int4")
    block = Block(arg_types=[table, emb.ids_type("i32"), emb.ids_type("i32"), TensorType(f32, [DYNAMIC_INDEX])])
    t, ids, off, w = block.args
    bag = emb.BagOp.build_inferred([t, ids, off, w], {"mode": StringAttr("sum")})
    look = emb.LookupOp.build_inferred([t, ids])
    block.add_ops([bag, look, func.ReturnOp(bag.results[0], look.results[0])])
    out = emb.rows_type(32)
    f = func.FuncOp("serve", ([a.type for a in block.args], [out, out]), Region(block))
    module = ModuleOp([f])
    module.verify()
    assert bag.results[0].type == out and look.results[0].type == out
    assert printed(reparse(printed(module))) == printed(module)
    with pytest.raises(VerifyException, match='per-sample weights need mode "sum"'):
        emb.BagOp.build_inferred([t, ids, off, w], {"mode": StringAttr("mean")})


def test_table_and_feature_ops() -> None:
    module = ModuleOp(
        [
            emb.TableOp("users", emb.TableType(100, 8, "bf16"), {"serving": LayoutAttr("int4")}),
            emb.FeatureOp("user_id", "users", "mean"),
        ]
    )
    module.verify()
    text = printed(module)
    assert "emb.table @users : !emb.table<100x8xbf16> {serving = #emb.layout<int4>}" in text
    assert "emb.feature @user_id reads @users pooling mean" in text
    assert printed(reparse(text)) == text
    with pytest.raises(VerifyException, match="is quantized"):
        emb.TableOp("q", emb.TableType(100, 8, "int8")).verify()


# ------------------------------------------------------------------ passes


def test_passes_from_python_and_kernel_specs() -> None:
    ctx = make_context()
    module = build_train()
    UpdDedupPass().apply(ctx, module)
    module.verify()
    names = [op.name for op in module.walk()]
    assert names.count("upd.dedup") == 1
    clip = next(op for op in module.walk() if isinstance(op, upd.ClipOp))
    assert clip.results[0].type == upd.DeltaType(64, "i64", unique=True)

    UpdFusePass().apply(ctx, module)
    module.verify()
    applies = [op for op in module.walk() if isinstance(op, upd.ApplyOp)]
    assert len(applies) == 1
    assert not any(isinstance(op, (upd.OptimizerOp, upd.ClipOp, upd.DedupOp, upd.StampOp,
                                   upd.RequantizeOp)) for op in module.walk())
    apply = applies[0]
    assert None not in (apply.dedup, apply.serving, apply.versions)
    assert apply.roles(apply.flat()) == ["table", "momentum", "delta", "serving",
                                              "versions", "version"]

    UpdSchedulePass(partitions=3, tile=8, order="id").apply(ctx, module)
    module.verify()
    assert apply.partitions.value.data == 3
    assert apply.tile.value.data == 8
    assert apply.order == StringAttr("id")

    LowerToKernelPass().apply(ctx, module)
    module.verify()
    updates = [op for op in module.walk() if isinstance(op, kern.UpdateOp)]
    assert len(updates) == 1
    f = next(op for op in module.walk() if isinstance(op, func.FuncOp))
    assert f.function_type.outputs.data == ()
    assert [str(a.type) for a in f.body.block.args] == [
        "memref<1000x64xf32>", "memref<1000x1xf32>", "memref<?xi64>", "memref<?x64xf32>",
        "memref<1000x72xi8>", "memref<1000xi64>", "i64",
    ]

    ((name, spec),) = kernel_specs(module)
    assert name == "train"
    assert isinstance(spec, UpdateSpec)
    assert spec.optimizer == "rowwise_adagrad"
    assert spec.dim == 64
    assert spec.table_dtype == "f32"
    assert spec.index_dtype == "i64"
    assert spec.serving == "int8"
    assert spec.versions is True
    assert spec.dedup is True
    assert spec.max_norm == 1.0
    assert spec.clip_value is None
    assert spec.lr == pytest.approx(0.01)
    assert spec.eps == pytest.approx(1e-8)  # FBGEMM's default, filled in by upd-fuse
    assert spec.partitions == 3 and spec.tile == 8 and spec.order == "id" and spec.sort
    assert spec.stochastic_rounding is False


def test_kernel_specs_of_sgd_without_dedup_and_of_bags() -> None:
    text = """
    func.func @sgd(%t: !emb.table<100x16xf16>, %d: !upd.delta<16xf32, i32>, %seed: i64) -> !emb.table<100x16xf16> {
      %t1 = upd.sgd %t, %d {lr = 0.5 : f64} : !emb.table<100x16xf16>, !upd.delta<16xf32, i32>
      %t2 = upd.stochastic_round %t1, %seed : !emb.table<100x16xf16>, i64
      func.return %t2 : !emb.table<100x16xf16>
    }
    func.func @serve(%q: !emb.table<100x16xint4>, %ids: tensor<?xi64>, %off: tensor<?xi64>) -> (tensor<?x16xf32>, tensor<?x16xf32>) {
      %b = emb.bag %q, %ids, %off {mode = "mean"} : !emb.table<100x16xint4>, tensor<?xi64>, tensor<?xi64>
      %r = emb.lookup %q, %ids : !emb.table<100x16xint4>, tensor<?xi64>
      func.return %b, %r : tensor<?x16xf32>, tensor<?x16xf32>
    }
    """
    ctx = make_context()
    module = reparse(text)
    for p in (UpdDedupPass(), UpdFusePass(), UpdSchedulePass(partitions=2), LowerToKernelPass()):
        p.apply(ctx, module)
        module.verify()
    specs = kernel_specs(module)
    assert [name for name, _ in specs] == ["sgd", "serve", "serve"]
    sgd = specs[0][1]
    assert isinstance(sgd, UpdateSpec)
    assert (sgd.optimizer, sgd.dim, sgd.table_dtype, sgd.index_dtype) == ("sgd", 16, "f16", "i32")
    # rounding to f16 after each duplicate is not rounding their sum: dedup even for sgd
    assert sgd.dedup is True and sgd.stochastic_rounding is True
    assert sgd.serving is None and sgd.versions is False and sgd.partitions == 2
    bag, look = specs[1][1], specs[2][1]
    assert bag == BagSpec(dim=16, layout="int4", index_dtype="i64", mode="mean", partitions=2)
    assert look == BagSpec(dim=16, layout="int4", index_dtype="i64", mode="none", partitions=2)


def test_deterministic_dedup_of_sgd_reaches_the_spec() -> None:
    ctx = make_context()
    module = reparse("""
    func.func @sgd(%t: !emb.table<100x16xf32>, %d: !upd.delta<16xf32, i64>) -> !emb.table<100x16xf32> {
      %t1 = upd.sgd %t, %d {lr = 0.5 : f64} : !emb.table<100x16xf32>, !upd.delta<16xf32, i64>
      func.return %t1 : !emb.table<100x16xf32>
    }
    """)
    for p in (UpdDedupPass(deterministic=True), UpdFusePass(), LowerToKernelPass()):
        p.apply(ctx, module)
    ((_, spec),) = kernel_specs(module)
    assert spec.dedup is True and spec.partitions == 1


def test_lower_to_kernel_errors_name_the_op() -> None:
    module = reparse("""
    func.func @f(%t: !emb.table<100x8xf32>, %d: !upd.delta<8xf32, i64>) -> !emb.table<100x8xf32> {
      %t2 = upd.sgd %t, %d {lr = 0.1 : f64} : !emb.table<100x8xf32>, !upd.delta<8xf32, i64>
      func.return %t2 : !emb.table<100x8xf32>
    }
    """)
    with pytest.raises(LoweringError, match="'upd.sgd' is not fused") as info:
        LowerToKernelPass().apply(make_context(), module)
    assert info.value.op is not None and info.value.op.name == "upd.sgd"


# ------------------------------------------- the lit suite's coverage promise


def _invalid_files() -> list[Path]:
    return sorted(FILECHECK.glob("dialects/*/invalid.mlir"))


def _checks(path: Path) -> list[list[str]]:
    chunks = re.split(r"^// -----$", path.read_text(), flags=re.M)
    return [re.findall(r"^// CHECK: (.*)$", c, flags=re.M) for c in chunks]


@pytest.mark.parametrize("path", _invalid_files(), ids=lambda p: p.parent.name)
def test_each_invalid_case_fails_with_its_own_message(path: Path, capsys) -> None:
    """FileCheck matches in order, so a case that stopped failing could hide
    behind a later case's identical message; check chunk by chunk."""
    rc = ekko_opt([str(path), "--split-input-file", "--verify-diagnostics",
                   "--parsing-diagnostics"])
    out = capsys.readouterr().out
    assert rc == 0
    outputs = out.split("// -----\n")
    expected = _checks(path)
    assert len(outputs) == len(expected)
    for i, (got, checks) in enumerate(zip(outputs, expected)):
        assert checks, f"case {i} of {path.name} has no CHECK line"
        assert not got.startswith("builtin.module {"), f"case {i} of {path.name} verified"
        for check in checks:
            assert check in got, f"case {i} of {path.name}: {check!r} not in\n{got}"


def _message_pattern(node: ast.AST) -> str:
    if isinstance(node, ast.Constant):
        return re.escape(node.value)
    if isinstance(node, ast.JoinedStr):
        return "".join(
            re.escape(v.value) if isinstance(v, ast.Constant) else ".*" for v in node.values
        )
    if isinstance(node, ast.BinOp):
        return _message_pattern(node.left) + _message_pattern(node.right)
    return ".*"


# Not reachable from text (the type parsers reject these first): covered by
# test_type_constructors_verify above.
PYTHON_ONLY = {
    "!upd\\.delta\\ needs\\ rows\\ of\\ at\\ least\\ one\\ value",
    "!upd\\.delta\\ ids\\ must\\ be\\ i32\\ or\\ i64",
    # !sync.packet's parameters: its parser rejects them first (test_sync_kernels.py builds them)
    "!sync\\.packet\\ needs\\ rows\\ of\\ at\\ least\\ one\\ value",
    "!sync\\.packet\\ ids\\ must\\ be\\ i32\\ or\\ i64",
    # a Python optimizer function returning the wrong number of values: test_optimizers.py
    "optimizer\\ .*\\ must\\ return\\ the\\ new\\ weights\\ and\\ .*\\ state\\ value\\(s\\),\\ got\\ .*\\ values",
}


def test_every_dialect_error_has_a_lit_case() -> None:
    checks = [c for path in _invalid_files() for chunk in _checks(path) for c in chunk]
    sites = 0
    missing = []
    for py in sorted((REPO / "dialects").glob("*.py")):
        for node in ast.walk(ast.parse(py.read_text())):
            msg = None
            if (
                isinstance(node, ast.Raise)
                and isinstance(node.exc, ast.Call)
                and getattr(node.exc.func, "id", "") == "VerifyException"
            ):
                msg = node.exc.args[0]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "raise_error":
                msg = node.args[0]
            if msg is None:
                continue
            sites += 1
            pattern = _message_pattern(msg)
            if pattern == ".*" or pattern in PYTHON_ONLY:
                continue  # a forwarded message, or one tested from Python
            if not any(re.search(pattern, c) for c in checks):
                missing.append(f"{py.name}:{node.lineno}: {pattern}")
    assert sites > 50
    assert not missing, "errors without an invalid.mlir case:\n" + "\n".join(missing)


# -- xDSL idioms: declared ops, properties, one-way imports ---------------------------


def test_named_optimizer_ops_declare_their_catalog_hyper_parameters() -> None:
    """The named ops are written out; each declares exactly its entry's hyper-parameters."""
    from ekko.dialects import catalog

    for name, op in upd.NAMED_OPTIMIZER_OPS.items():
        declared = set(op.get_irdl_definition().properties) - {"operandSegmentSizes"}
        assert declared == set(catalog.optimizer(name).hyper_names), name
        assert op.name == f"upd.{name}"


def _scheduled_serve() -> tuple:
    module = Parser(make_context(), """
func.func @serve(%q: !emb.table<100x8xint4>, %ids: tensor<?xi32>, %off: tensor<?xi32>) -> tensor<?x8xf32> {
  %r = emb.bag %q, %ids, %off {mode = "sum"} : !emb.table<100x8xint4>, tensor<?xi32>, tensor<?xi32>
  %l = emb.lookup %q, %ids : !emb.table<100x8xint4>, tensor<?xi32>
  func.return %r : tensor<?x8xf32>
}""").parse_module()
    UpdSchedulePass(partitions=3).apply(make_context(), module)
    return module, [op for op in module.walk() if isinstance(op, (emb.BagOp, emb.LookupOp))]


def test_upd_schedule_sets_properties_and_erases_nothing() -> None:
    """partitions is a declared property of emb.bag / emb.lookup (not a discardable
    attribute); the unused lookup stays; a second run changes nothing."""
    module, ops = _scheduled_serve()
    assert len(ops) == 2
    for op in ops:
        assert op.partitions == IntegerAttr(3, 64) and not op.attributes
    before = str(module)
    UpdSchedulePass(partitions=3).apply(make_context(), module)
    module.verify()
    assert str(module) == before


def test_the_dialects_import_each_other_one_way() -> None:
    """No cycle among the dialect modules, lazy imports included (the catalog traced
    optimizers through kern, which imports the catalog)."""
    root = Path(emb.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                deps.update(n.split(".")[0] for n in names)
        graph[path.stem] = {d for d in deps if (root / f"{d}.py").exists()}
    seen: dict[str, int] = {}

    def visit(name: str, trail: tuple[str, ...]) -> None:
        assert seen.get(name) != 1, f"import cycle: {' -> '.join((*trail, name))}"
        if seen.get(name) == 2:
            return
        seen[name] = 1
        for dep in graph[name]:
            visit(dep, (*trail, name))
        seen[name] = 2

    for name in graph:
        visit(name, ())
    assert "kern" not in graph["catalog"] and "catalog" in graph["kern"]
