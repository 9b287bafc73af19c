"""Whole models: frontends to IR, compile_model, the ekko CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ekko
from ekko.compiler.frontend_to_ir import model_to_module
from ekko.compiler.pipeline import UPDATE_PIPELINE
from ekko.compiler.registry import PIPELINES, pipeline_spec
from ekko.cli import main as ekko_main

ROOT = Path(__file__).resolve().parent.parent
DLRM = ROOT / "examples" / "dlrm.ekko"

SMALL = """
model small {
  defaults { optimizer rowwise_adagrad(lr=0.05, eps=1e-8); serving int8; }
  table users { rows 1000; dim 16; }
  table items { rows 5000; dim 13; optimizer adam(lr=0.01); serving f16; clip max_norm=1.0; }
  table tags  { rows 300; dim 8; optimizer adagrad(lr=0.1); serving f32; weight_decay 0.001; }
  feature user -> users pooling sum;
  feature item -> items pooling mean;
  feature item_hist -> items pooling sum;
  feature tag -> tags pooling none;
}
"""


@pytest.fixture()
def small_model(tmp_path: Path) -> Path:
    path = tmp_path / "small.ekko"
    path.write_text(SMALL)
    return path


def test_frontends_give_the_same_ir() -> None:
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import dlrm_torch
    finally:
        sys.path.pop(0)
    parsed = ekko.load_model(str(DLRM))
    with torch.device("meta"):  # 33.8M rows x 64: shapes only, as the CLI builds it
        module = dlrm_torch.build()
    assert next(module.parameters()).is_meta
    imported = ekko.import_module(module, name=parsed.name,
                                  optimizer="rowwise_adagrad", serving="int8", lr=0.01, eps=1e-8)
    assert str(model_to_module(parsed)) == str(model_to_module(imported))


def test_a_tables_kernel_is_update_kernels_for_its_rule(small_model: Path) -> None:
    """compile_model and update_kernel read one rule and run one named pipeline."""
    compiled = ekko.compile_model(small_model)
    for name in ("items", "tags"):
        t = compiled.table(name)
        serving = None if t.serving == t.dtype else t.serving
        assert compiled.update_specs[name] == ekko.update_kernel(
            t.update, t.dim, t.dtype, serving=serving).spec
    assert compiled.pipeline == pipeline_spec("standard")


def test_named_pipelines_are_one_table(tmp_path: Path) -> None:
    assert pipeline_spec("standard") == ",".join(PIPELINES["standard"]) == UPDATE_PIPELINE
    assert pipeline_spec("standard", partitions=2, deterministic=True) == (
        "upd-dedup{deterministic=true},upd-fuse,upd-schedule{partitions=2},lower-to-kernel")
    assert pipeline_spec("standard", partitions=0, deterministic=False) == UPDATE_PIPELINE
    with pytest.raises(ValueError, match="no option 'nope'"):
        pipeline_spec("standard", nope=1)
    named, spelled = (ekko.run_pipeline(model_to_module(ekko.load_model(str(DLRM))), p)
                      for p in ("standard", UPDATE_PIPELINE))
    assert str(named) == str(spelled)
    from ekko.compiler.tools.ekko_opt import main as ekko_opt

    out = []
    for passes in ("standard{partitions=2}", pipeline_spec("standard", partitions=2)):
        target = tmp_path / f"out{len(out)}.mlir"
        assert ekko_opt([str(ROOT / "examples" / "update.mlir"), "-p", passes,
                         "-o", str(target)]) == 0
        out.append(target.read_text())
    assert out[0] == out[1] and "kern.update" in out[0]


def test_model_ir_declares_every_table_and_feature(small_model: Path) -> None:
    text = str(model_to_module(ekko.load_model(str(small_model))))
    for name in ("users", "items", "tags"):
        assert f"emb.table @{name}" in text and f"func.func @update_{name}" in text
    for name in ("user", "item", "item_hist", "tag"):
        assert f"emb.feature @{name} reads" in text and f"func.func @serve_{name}" in text
    assert "upd.adam" in text and "upd.clip" in text and "upd.weight_decay" in text


def test_compile_model_updates_and_serves(small_model: Path) -> None:
    m = ekko.compile_model(small_model).materialize(seed=1)
    rng = np.random.default_rng(0)
    for t in m.model.tables:
        buf = m.tables[t.name]
        before = buf.master.copy()
        ids = np.concatenate([[0, t.rows - 1, 0], rng.integers(0, t.rows, 200)]).astype(np.int64)
        grads = rng.standard_normal((len(ids), t.dim)).astype(np.float32)
        m.update(t.name, ids, grads, version=7)
        touched = np.unique(ids)
        assert (buf.versions[touched] == 7).all()
        untouched = np.setdiff1d(np.arange(t.rows), touched)
        np.testing.assert_array_equal(buf.master[untouched], before[untouched])
        assert not np.array_equal(buf.master[touched], before[touched])
    pooled = m.lookup("item", np.array([1, 2, 3], np.int64), np.array([0, 2, 3], np.int64))
    assert np.asarray(pooled).shape == (2, 13)
    rows = m.lookup("tag", np.array([0, 299], np.int64))
    assert np.asarray(rows).shape == (2, 8)


def test_tables_with_equal_specs_share_one_kernel() -> None:
    m = ekko.compile_model(DLRM, scale=0.001)
    kernels = {id(k) for k in m.update_kernels.values()}
    assert len(m.update_kernels) == 26 and len(kernels) == 1


def test_run_passes_reference_check(small_model: Path, capsys) -> None:
    code = ekko_main(["run", str(small_model), "--steps", "3", "--batch", "256", "--pooling", "3", "-q"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "reference check  passed" in out
    assert "M rows/s" in out


def test_compile_writes_ir_kernels_and_manifest(small_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert ekko_main(["compile", str(small_model), "-o", str(out), "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tables"]] == ["users", "items", "tags"]
    assert manifest["pipeline"].startswith("upd-dedup,upd-fuse,upd-schedule")
    for kernel in manifest["kernels"]:
        for f in kernel["files"]:
            assert (out / f).stat().st_size > 0
    stages = sorted(p.name for p in (out / "ir").iterdir())
    assert stages[0] == "0-model.mlir" and stages[-1] == "4-lower-to-kernel.mlir"
    assert "kern.update" in (out / "ir" / "4-lower-to-kernel.mlir").read_text()
    # the model-level IR written out is valid input for ekko-opt
    res = subprocess.run([sys.executable, "-m", "ekko.compiler.tools.ekko_opt",
                          str(out / "ir" / "0-model.mlir")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("source,message", [
    ("model m { table t { rows 10; dim 0; } }", "dim"),
    ("model m { table t { rows 10; dim 4; } feature f -> nope pooling sum; }", "nope"),
    ("model m { table t { rows 10 dim 4; } }", "error"),
])
def test_cli_reports_model_errors_without_traceback(tmp_path: Path, source: str, message: str) -> None:
    path = tmp_path / "bad.ekko"
    path.write_text(source)
    res = subprocess.run([sys.executable, "-m", "ekko.cli", "run", str(path)],
                         capture_output=True, text=True)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert message in res.stderr and "bad.ekko" in res.stderr


def test_cli_missing_file(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "ekko.cli", "compile",
                          str(tmp_path / "missing.ekko"), "-o", str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "Traceback" not in res.stderr


# A table and a feature may share a name (docs/language.md), and a name may look
# like another's function (serve_item, update_t): the IR's symbols must still differ.
SHARED = """
model shared {
  table user { rows 50; dim 8; serving int8; }
  feature user -> user;
  table serve_item { rows 40; dim 4; optimizer sgd(lr=0.5); }
  feature item -> serve_item pooling mean;
  table t { rows 30; dim 4; optimizer adam(lr=0.01); }
  feature update_t -> t pooling none;
}
"""


def test_shared_names_get_distinct_symbols_and_keep_their_user_names() -> None:
    from ekko.compiler.frontend_to_ir import model_symbols

    model = ekko.parse_model(SHARED)
    sym = model_symbols(model)
    every = [*sym.tables.values(), *sym.features.values(), *sym.updates.values(),
             *sym.serves.values()]
    assert len(set(every)) == len(every) == 12
    assert sym.tables == {"user": "user", "serve_item": "serve_item", "t": "t"}
    assert sym.features == {"user": "feature.user", "item": "item", "update_t": "update_t"}
    assert sym.updates["t"] == "update.t" and sym.serves["item"] == "serve.item"
    module = model_to_module(model)
    module.verify()  # failed: Redefinition of symbol "user"
    text = str(module)
    assert "emb.feature @feature.user reads @user pooling sum" in text
    assert "func.func @serve.item(" in text and "func.func @update.t(" in text
    assert "emb.feature @update_t reads @t pooling none" in text


def test_a_model_with_shared_names_updates_and_serves_under_the_users_names() -> None:
    m = ekko.compile_model(ekko.parse_model(SHARED)).materialize(seed=3)
    assert set(m.update_specs) == {"user", "serve_item", "t"}
    assert set(m.bag_specs) == {"user", "item", "update_t"}
    rng = np.random.default_rng(4)
    ids = np.array([1, 7, 1, 3])
    for table in ("user", "serve_item", "t"):
        buf = m.tables[table]
        before = buf.master.copy()
        m.update(table, ids, rng.standard_normal((4, buf.table.dim)).astype(np.float32))
        assert not np.array_equal(buf.master[[1, 3, 7]], before[[1, 3, 7]])
        assert np.array_equal(np.delete(buf.master, [1, 3, 7], 0), np.delete(before, [1, 3, 7], 0))
    serving = ekko.dequantize_rows(m.tables["user"].serving, "int8", 8)
    np.testing.assert_allclose(m.lookup("user", ids, np.array([0, 2, 4])),
                               [serving[[1, 7]].sum(0), serving[[1, 3]].sum(0)], rtol=1e-5)
    np.testing.assert_allclose(m.lookup("item", ids, np.array([0, 4])),
                               [m.tables["serve_item"].master[ids].mean(0)], rtol=1e-6)
    assert np.array_equal(m.lookup("update_t", ids), m.tables["t"].master[ids])
    manifest = m.manifest()
    kind = {f: k["spec"].get("optimizer", "bag") for k in manifest["kernels"] for f in k["used_by"]}
    assert {t["name"]: kind[t["update_kernel"]] for t in manifest["tables"]} == {
        "user": "rowwise_adagrad", "serve_item": "sgd", "t": "adam"}
    assert {f["name"]: (f["kernel"], kind[f["kernel"]]) for f in manifest["features"]} == {
        "user": ("serve_user", "bag"), "item": ("serve.item", "bag"),
        "update_t": ("serve_update_t", "bag")}


def test_shared_names_through_ekko_compile_run_and_ekko_opt(tmp_path: Path, capsys) -> None:
    """`feature user -> user;` made `ekko compile`/`run` exit 3 and ekko-opt exit 1."""
    from ekko.compiler.tools.ekko_opt import main as ekko_opt

    path = tmp_path / "shared.ekko"
    path.write_text(SHARED)
    out = tmp_path / "out"
    assert ekko_main(["compile", str(path), "-o", str(out), "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    for kernel in manifest["kernels"]:  # each object file is its own kind of kernel
        bag = all(f.startswith("serve") for f in kernel["used_by"])
        assert any(("bag_kernel" in e["symbol"]) == bag for e in kernel["exports"])
        assert all(f"k{kernel['id']}_" in e["symbol"] for e in kernel["exports"])
    assert ekko_main(["run", str(path), "-q", "--steps", "2", "--batch", "32"]) == 0
    assert "reference check  passed" in capsys.readouterr().out
    assert ekko_opt([str(path), "-p", "standard", "-o", str(tmp_path / "k.mlir")]) == 0
    assert "@feature.user" in (tmp_path / "k.mlir").read_text()


@pytest.mark.parametrize("call,message", [
    (lambda m: m.lookup("users", np.array([1]), np.array([0, 1])),
     "model small has no feature 'users': that is a table; its features are user"),
    (lambda m: m.lookup("items", np.array([1]), np.array([0, 1])),
     "model small has no feature 'items': that is a table; its features are item, item_hist"),
    (lambda m: m.lookup("nope", np.array([1]), np.array([0, 1])),
     "model small has no feature 'nope' (features: user, item, item_hist, tag)"),
    (lambda m: m.update("user", np.array([1]), np.zeros((1, 16), np.float32)),
     "model small has no table 'user': that is a feature; it reads table users"),
    (lambda m: m.update("nope", np.array([1]), np.zeros((1, 16), np.float32)),
     "model small has no table 'nope' (tables: users, items, tags)"),
    (lambda m: m.update(["users"], np.array([1]), np.zeros((1, 16), np.float32)),
     "model small has no table ['users'] (tables: users, items, tags)"),
    (lambda m: m.table("tag"), "model small has no table 'tag': that is a feature"),
    (lambda m: m.feature("tags"), "model small has no feature 'tags': that is a table"),
])
def test_a_wrong_name_is_one_error_naming_the_valid_ones(small_model: Path, call, message) -> None:
    """A table's name where a feature's belongs raised a bare StopIteration, the
    reverse a bare KeyError."""
    m = ekko.compile_model(small_model).materialize()
    with pytest.raises(ekko.EkkoError) as e:
        call(m)
    assert str(e.value).startswith(message)


def test_update_and_lookup_before_materialize_say_so(small_model: Path) -> None:
    m = ekko.compile_model(small_model)
    with pytest.raises(ekko.UpdateError, match=r"call materialize\(\) first"):
        m.update("users", np.array([1]), np.zeros((1, 16), np.float32))
    with pytest.raises(ekko.LookupError, match=r"call materialize\(\) first"):
        m.lookup("user", np.array([1]), np.array([0, 1]))


def test_lists_of_ids_are_a_batch_and_an_empty_one_is_empty(small_model: Path) -> None:
    m = ekko.compile_model(small_model).materialize()
    buf = m.tables["tags"]
    before = buf.master.copy()
    m.update("tags", [], np.zeros((0, 8), np.float32))
    assert np.array_equal(buf.master, before)
    m.update("tags", [2, 2], np.ones((2, 8), np.float32))
    assert not np.array_equal(buf.master[2], before[2])
    assert np.array_equal(m.lookup("tag", [2]), buf.master[[2]])
    with pytest.raises(ekko.UpdateError, match=r"ids\[0\] = 18446744073709551615 is beyond int64"):
        m.update("tags", [2**64 - 1], np.ones((1, 8), np.float32))
