"""The `ekko` command: every user mistake is one `ekko: error:` line and exit 1,
limits are checked before anything is allocated, and `ekko run`'s self-check
passes on correct kernels for every optimizer and fails when it should."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ekko.compiler.frontend import load_model
from ekko.compiler.frontend.model import OPTIMIZER_DEFAULTS
from ekko.cli import commands as cli
from ekko.kernels import check
from ekko.cli import main

ROOT = Path(__file__).resolve().parent.parent
SMALL = """
model small {
  table users { rows 1000; dim 16; serving int8; }
  feature user -> users pooling sum;
}
"""
HUGE = "9" * 5000


@pytest.fixture()
def small(tmp_path: Path) -> Path:
    path = tmp_path / "small.ekko"
    path.write_text(SMALL)
    return path


def _fails_cleanly(capsys, argv: list[str], *words: str) -> str:
    """Exit 1 with a single `ekko: error:` line naming `words`, nothing on stdout."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 1, (code, out, err)
    assert err.startswith("ekko: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and not out
    for word in words:
        assert word in err, (word, err)
    return err


@pytest.mark.parametrize("flags,words", [
    (["--scale", "inf"], ["--scale", "1e+12"]),
    (["--scale", "1e30"], ["--scale", "out of range"]),
    (["--scale", "nan"], ["--scale"]),
    (["--scale", "0"], ["--scale"]),
    (["--scale", "-2"], ["--scale"]),
    (["--seed", "-1"], ["--seed", "out of range"]),
    (["--batch", "-1"], ["--batch"]),
    (["--batch", "0"], ["--batch"]),
    (["--steps", "-1"], ["--steps", "1..1000000000"]),
    (["--steps", "0"], ["--steps"]),
    (["--steps", HUGE], ["--steps", "5000-digit"]),
    (["--seed", HUGE], ["--seed", "5000-digit"]),
    (["--scale", HUGE], ["--scale"]),
    (["--partitions", "-3"], ["--partitions"]),
    (["--pooling", "0"], ["--pooling"]),
    (["--zipf", "nan"], ["--zipf"]),
    (["--steps", "1.5"], ["--steps", "integer"]),
    (["--optimizer", "nope"], ["unknown optimizer 'nope'"]),
    (["--optimizer", "adam(beta1=1)"], ["beta1"]),
    (["--optimizer", "adam(lr=0.1, lr=0.2)"], ["--optimizer"]),
    (["--optimizer", "sgd(lr=inf)"], ["--optimizer"]),
    (["--serving", "int3"], ["--serving"]),
    (["--batch", "100000000", "--pooling", "100"], ["--pooling 100", "limit 2,147,483,648"]),
])
def test_bad_flags_are_one_line_errors(capsys, small: Path, flags: list[str],
                                       words: list[str]) -> None:
    err = _fails_cleanly(capsys, ["run", str(small), "-q", *flags], *words)
    assert len(err) < 400  # a 5,000-digit value is not echoed back


def _installed_ekko() -> list[str]:
    """The `ekko` console script's entry point, run with this interpreter."""
    from importlib.metadata import entry_points

    module, _, func = entry_points(group="console_scripts")["ekko"].value.partition(":")
    return [sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())"]


def test_flag_errors_through_the_installed_command(small: Path) -> None:
    """The real process: exit 1, one line on stderr, no traceback."""
    res = subprocess.run([*_installed_ekko(), "run", str(small), "--scale", "inf"],
                         capture_output=True, text=True)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("ekko: error: argument --scale")


def test_version(capsys) -> None:
    import ekko

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"ekko {ekko.__version__}"


def test_absurd_scale_is_refused_before_allocating(capsys, small: Path, monkeypatch) -> None:
    """Rows beyond what memory holds: refused, naming the limit, before compiling."""
    monkeypatch.setattr(cli, "available_memory", lambda: 4 * 2**30)
    monkeypatch.setattr(cli, "compile_model", lambda *a, **k: pytest.fail("compiled"))
    _fails_cleanly(capsys, ["run", str(small), "--scale", "1e7"], "available memory",
                   "4.0 GiB", "--scale")


def test_rows_beyond_int64_are_refused_by_compile(capsys, small: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.ekko"
    big.write_text(SMALL.replace("rows 1000", "rows 100000000000"))
    _fails_cleanly(capsys, ["compile", str(big), "-o", str(tmp_path / "o"), "--scale", "1e12"],
                   "rows must", "--scale 1e+12")
    assert not (tmp_path / "o").exists()


def test_output_onto_or_under_a_file(capsys, small: Path, tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("keep")
    _fails_cleanly(capsys, ["compile", str(small), "-q", "-o", str(target)], "is a file")
    _fails_cleanly(capsys, ["compile", str(small), "-q", "-o", str(target / "sub")],
                   "is under", "a file")
    assert target.read_text() == "keep"


def test_compile_replaces_old_outputs_and_writes_nothing_on_error(
        capsys, small: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "kernels").mkdir(parents=True)
    (out / "kernels" / "stale.o").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    assert main(["compile", str(small), "-q", "-o", str(out)]) == 0
    assert not (out / "kernels" / "stale.o").exists() and (out / "manifest.json").is_file()
    assert (out / "notes.txt").read_text() == "mine"  # only ekko's own outputs are replaced
    assert sorted(p.name for p in out.iterdir()) == ["ir", "kernels", "manifest.json", "notes.txt"]
    bad = tmp_path / "bad.ekko"
    bad.write_text("model m { table t { rows 10; dim 0; } }")
    assert main(["compile", str(bad), "-q", "-o", str(tmp_path / "new")]) == 1
    assert "dim" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_overlong_model_path(capsys) -> None:
    err = _fails_cleanly(capsys, ["run", "a" * 5000 + ".ekko"], "too long")
    assert len(err) < 400


def test_models_without_tables(capsys, tmp_path: Path) -> None:
    empty = tmp_path / "empty.ekko"
    empty.write_text("model m { }")
    _fails_cleanly(capsys, ["run", str(empty)], "no tables")
    _fails_cleanly(capsys, ["compile", str(empty), "-o", str(tmp_path / "o")], "no tables")


def test_python_factory_that_returns_no_model(capsys, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    path = tmp_path / "notmodel.py"
    path.write_text("def build():\n    return 42\n")
    code = main(["run", f"{path}:build", "-q"])
    err = capsys.readouterr().err
    assert code == 1 and "returned int, not a torch.nn.Module" in err and "Traceback" not in err


@pytest.mark.parametrize("source", ["import sys\nsys.exit(0)\n",
                                    "import sys\ndef build():\n    sys.exit(0)\n"])
def test_python_model_that_exits_is_no_success(capsys, tmp_path: Path, source: str) -> None:
    path = tmp_path / "exits.py"
    path.write_text(source)
    _fails_cleanly(capsys, ["run", f"{path}:build", "-q"], "exited", "sys.exit(0)")


def test_internal_errors_are_reported_as_bugs(capsys, small: Path, monkeypatch) -> None:
    monkeypatch.delenv("EKKO_DEBUG", raising=False)
    monkeypatch.setattr(cli, "run_traffic", lambda *a, **k: 1 / 0)
    assert main(["run", str(small), "-q", "--steps", "1"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("ekko: internal error: ZeroDivisionError") and "Traceback" not in err


HOT = """
model hot {{
  table t {{ rows 4; dim 32; optimizer {opt}; serving int8; }}
  table u {{ rows 50; dim 8; dtype f16; optimizer {opt}; serving bf16;
            clip max_norm=0.5; weight_decay 0.01; stochastic_rounding; }}
  table v {{ rows 3000; dim 12; dtype bf16; optimizer {opt}; serving int4; clip clip_value=0.01; }}
  feature f -> t pooling sum;
  feature g -> u pooling mean;
  feature h -> v pooling none;
}}
"""


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZER_DEFAULTS))
def test_run_passes_on_a_hot_table_for_every_optimizer(capsys, tmp_path: Path,
                                                       optimizer: str) -> None:
    """Hundreds of duplicates per row and step: sums that cancel (Adam's first moment)
    must not fail a correct kernel. Every optimizer the language accepts is checked."""
    path = tmp_path / "hot.ekko"
    path.write_text(HOT.format(opt=optimizer))
    code = main(["run", str(path), "-q", "--steps", "20", "--batch", "512", "--pooling", "4"])
    out = capsys.readouterr().out
    assert code == 0 and "reference check  passed" in out, out


def test_run_fails_when_the_reference_is_nan(capsys, small: Path, monkeypatch) -> None:
    """A NaN reference is a failed check (exit 2), never a pass."""
    real = check.reference_rows

    def nan_reference(*args):
        w, states = real(*args)
        return check.Tracked(w.value * np.nan, w.mag), states

    monkeypatch.setattr(check, "reference_rows", nan_reference)
    assert main(["run", str(small), "-q", "--steps", "2", "--batch", "64"]) == 2
    assert "reference check  FAILED" in capsys.readouterr().out


USER_MODEL = """
import torch
import ekko

@ekko.optimizer(state=("buf",), hyper={"lr": 0.05, "momentum": (0.9, 0.0, 1.0)})
def heavy_ball(g, w, buf, *, lr, momentum):
    buf = momentum * buf + g
    return w - lr * buf, buf

class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.users = torch.nn.EmbeddingBag(2000, 16, mode="sum")

    def forward(self, ids, offsets):
        return self.users(ids, offsets)

def build():
    return Model()
"""


def test_run_checks_an_optimizer_the_model_file_defines(tmp_path: Path) -> None:
    """`--optimizer` may name an optimizer `module.py` defines with `@ekko.optimizer`;
    the self-check runs the catalog's math for it (it had no reference: KeyError).
    A fresh process: importing the model file defines the optimizer."""
    pytest.importorskip("torch")
    path = tmp_path / "user_model.py"
    path.write_text(USER_MODEL)
    res = subprocess.run([*_installed_ekko(), "run", f"{path}:build", "--steps", "3", "-q",
                          "--optimizer", "heavy_ball(momentum=0.5)"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "reference check  passed" in res.stdout, res.stdout + res.stderr
    bad = subprocess.run([*_installed_ekko(), "run", f"{path}:build", "-q",
                          "--optimizer", "heavy_ball(momentum=2)"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.startswith("ekko: error: argument --optimizer")
    assert "momentum" in bad.stderr and "Traceback" not in bad.stderr


def test_optimizer_and_serving_flags_apply_to_every_table(small: Path) -> None:
    args = cli.build_parser().parse_args(
        ["run", str(small), "--optimizer", "adam(lr=0.001)", "--serving", "f16"])
    model = cli.load(args)
    assert {(t.update.optimizer.kind, dict(t.update.optimizer.hyper)["lr"], t.serving)
            for t in model.tables} == {("adam", 0.001, "f16")}


def test_torch_dlrm_with_flags_is_the_ekko_dlrm() -> None:
    """What the README runs: the torch example with --serving int8 is examples/dlrm.ekko."""
    pytest.importorskip("torch")
    args = cli.build_parser().parse_args(
        ["run", f"{ROOT / 'examples' / 'dlrm_torch.py'}:build", "--serving", "int8"])
    assert cli.load(args) == load_model(str(ROOT / "examples" / "dlrm.ekko"), scale=0.1)
