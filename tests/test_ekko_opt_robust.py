"""ekko-opt on garbage, truncated and mutated input: exit 0 or 1, never a traceback.

Most cases call `ekko_opt.main` in-process (a traceback there is an
exception escaping main); a few run the installed `ekko-opt` executable to
check the real process's exit code and stderr.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ekko.compiler.tools.ekko_opt import main as ekko_opt

FILECHECK = Path(__file__).parent / "filecheck"

# A real module touching every dialect: the update chain, serving and kernels.
MODULE = """\
emb.table @users : !emb.table<1000x64xf32> {serving = #emb.layout<int8>}
emb.feature @user_id reads @users pooling sum
func.func @train(%t: !emb.table<1000x64xf32>, %m: !emb.state<1000x1>, %ids: tensor<?xi64>, %rows: tensor<?x64xf32>, %q: !emb.table<1000x64xint8>, %v: !emb.versions<1000>, %ver: i64) -> (!emb.table<1000x64xf32>, !emb.state<1000x1>, !emb.table<1000x64xint8>, !emb.versions<1000>) {
  %d = upd.delta %ids, %rows : tensor<?xi64>, tensor<?x64xf32>
  %u = upd.dedup %d : !upd.delta<64xf32, i64>
  %c = upd.clip %u {max_norm = 1.000000e+00 : f64} : !upd.delta<64xf32, i64, unique>
  %w = upd.weight_decay %c, %t {decay = 1.000000e-04 : f64} : !upd.delta<64xf32, i64, unique>, !emb.table<1000x64xf32>
  %t2, %m2 = upd.rowwise_adagrad %t, %m, %w {lr = 1.000000e-02 : f64} : !emb.table<1000x64xf32>, !emb.state<1000x1>, !upd.delta<64xf32, i64, unique>
  %q2 = upd.requantize %t2, %q, %d : !emb.table<1000x64xf32>, !emb.table<1000x64xint8>, !upd.delta<64xf32, i64>
  %v2 = upd.stamp %v, %d, %ver : !emb.versions<1000>, !upd.delta<64xf32, i64>, i64
  func.return %t2, %m2, %q2, %v2 : !emb.table<1000x64xf32>, !emb.state<1000x1>, !emb.table<1000x64xint8>, !emb.versions<1000>
}
func.func @fused(%t: !emb.table<?x16xbf16>, %s: !emb.state<?x16>, %s2: !emb.state<?x16>, %d: !upd.delta<16xf32, i32>, %step: i64, %seed: i64) -> !emb.table<?x16xbf16> {
  %t2, %a, %b = upd.apply %t, %s, %s2, %d, %step, %seed {optimizer = "adam", lr = 1.000000e-03 : f64, dedup, stochastic_rounding, step, seed} : !emb.table<?x16xbf16>, !emb.state<?x16>, !emb.state<?x16>, !upd.delta<16xf32, i32>, i64, i64
  func.return %t2 : !emb.table<?x16xbf16>
}
func.func @serve(%q: !emb.table<1000x64xint4>, %ids: tensor<?xi32>, %off: tensor<?xi32>, %w: tensor<?xf32>) -> tensor<?x64xf32> {
  %r = emb.bag %q, %ids, %off, %w {mode = "sum"} : !emb.table<1000x64xint4>, tensor<?xi32>, tensor<?xi32>, tensor<?xf32>
  %l = emb.lookup %q, %ids : !emb.table<1000x64xint4>, tensor<?xi32>
  func.return %r : tensor<?x64xf32>
}
func.func @kernel(%t: memref<1000x64xf32>, %ids: memref<?xi64>, %g: memref<?x64xf32>, %q: memref<1000x72xi8>, %out: memref<?x64xf32>) {
  kern.update %t, %ids, %g, %q {optimizer = "sgd", lr = 1.000000e-01 : f64, serving, serving_layout = #emb.layout<int8>} : memref<1000x64xf32>, memref<?xi64>, memref<?x64xf32>, memref<1000x72xi8>
  kern.bag %q, %ids, %out {layout = #emb.layout<int8>, mode = "none"} : memref<1000x72xi8>, memref<?xi64>, memref<?x64xf32>
  func.return
}
"""

PIPELINE = "upd-dedup,upd-fuse,upd-schedule{partitions=2},lower-to-kernel"


def run_in_process(path: Path, capsys, *extra: str) -> tuple[int, str, str]:
    rc = ekko_opt([str(path), *extra])  # an exception escaping here fails the test
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clean(rc: int, out: str, err: str, what: str) -> None:
    assert rc in (0, 1), f"{what}: exit {rc}\n{err}"
    assert "Traceback" not in err and "Traceback" not in out, f"{what}:\n{err}"
    assert "internal error" not in err, f"{what}:\n{err}"
    if rc == 1:
        assert "error" in err, f"{what}: exit 1 without a diagnostic"


def test_a_long_line_is_shown_as_a_window_around_the_error(tmp_path: Path, capsys) -> None:
    """A parse error in a 3,000-character line quotes a window of it, caret on the spot."""
    line = '  %x = "test.op"() {v = ' + "1" * 3000 + ' : i64, w = "abc} : () -> ()'
    path = tmp_path / "long.mlir"
    path.write_text("func.func @f() {\n" + line + "\n  func.return\n}\n")
    rc, out, err = run_in_process(path, capsys)
    assert rc == 1
    head, src, caret = err.strip("\n").split("\n")[:3]
    col = int(head.split(":")[2])
    assert line[col - 1] == '"' and "string literal" in head
    assert len(src) <= 126 and src.startswith("...")
    assert src[caret.index("^")] == '"' and caret.strip() == "^"


def test_the_module_is_valid(tmp_path: Path, capsys) -> None:
    path = tmp_path / "m.mlir"
    path.write_text(MODULE)
    rc, out, err = run_in_process(path, capsys)
    assert rc == 0, err
    rc, out, err = run_in_process(path, capsys, "-p", PIPELINE)
    assert rc == 0, err
    assert out.count("kern.update") == 3 and out.count("kern.bag") == 3


@pytest.mark.parametrize("seed", range(12))
def test_random_bytes(seed: int, tmp_path: Path, capsys) -> None:
    rng = random.Random(seed)
    n = rng.randrange(1, 400)
    if seed % 3 == 0:
        data = bytes(rng.randrange(256) for _ in range(n))  # mostly not UTF-8
    elif seed % 3 == 1:
        alphabet = "%@!^#{}()<>[]:,=?x\"' \n\t.-0123456789abcdefijklmnopqrstuvwxyz_→⊕é\x00"
        data = "".join(rng.choice(alphabet) for _ in range(n)).encode("utf-8")
    else:  # ekko's own vocabulary, shuffled
        words = re.findall(r"\S+", MODULE)
        data = " ".join(rng.choice(words) for _ in range(n // 8 + 1)).encode("utf-8")
    path = tmp_path / "r.mlir"
    path.write_bytes(data)
    assert_clean(*run_in_process(path, capsys), f"seed {seed}: {data[:80]!r}")


def _prefix_lengths() -> list[int]:
    step = max(1, len(MODULE) // 70)
    return list(range(0, len(MODULE), step))


@pytest.mark.parametrize("length", _prefix_lengths())
def test_every_prefix(length: int, tmp_path: Path, capsys) -> None:
    path = tmp_path / "p.mlir"
    path.write_text(MODULE[:length])
    rc, out, err = run_in_process(path, capsys, "-p", PIPELINE)
    assert_clean(rc, out, err, f"prefix of {length} chars")


TOKEN = re.compile(
    r"\s+|->|%[\w.]+|@\w+|!?[\w.]+<[^<>]*>|\"[^\"]*\"|[\w.+-]+|[^\s\w]"
)
NEAR_MISSES = ["0", "-1", "?", "i16", "f64", "xint2", "1e400", "nan", "!emb.table<0x4xf32>",
               "!upd.delta<4xf32, i64>", "tensor<?x?xf32>", "memref<?xi8>", "unique", "{}", "",
               "!emb.table<?x64xint8>", "tensor<?xi32>", "i32", "\"mean\"", "upd.sgd"]


def _tokens() -> list[str]:
    tokens = TOKEN.findall(MODULE)
    assert "".join(tokens) == MODULE
    return tokens


def _mutate(rng: random.Random) -> str:
    """Delete, repeat, swap or replace 1-3 tokens of the module (whitespace kept)."""
    tokens = _tokens()
    words = [i for i, t in enumerate(tokens) if not t.isspace()]
    for _ in range(rng.randrange(1, 4)):
        i = rng.choice(words)
        kind = rng.randrange(5)
        if kind == 0:
            tokens[i] = ""
        elif kind == 1:
            tokens[i] = tokens[i] + " " + tokens[i]
        elif kind == 2:
            j = rng.choice(words)
            tokens[i], tokens[j] = tokens[j], tokens[i]
        elif kind == 3:
            tokens[i] = tokens[rng.choice(words)]
        else:  # a near miss of a number, type or name: the ill-typed cases
            tokens[i] = rng.choice(NEAR_MISSES)
    return "".join(tokens)


@pytest.mark.parametrize("seed", range(100))
def test_token_mutations(seed: int, tmp_path: Path, capsys) -> None:
    text = _mutate(random.Random(1000 + seed))
    path = tmp_path / "t.mlir"
    path.write_text(text)
    rc, out, err = run_in_process(path, capsys, "-p", PIPELINE)
    assert_clean(rc, out, err, f"mutation seed {seed}")


# Mutations of the generic form, which skips the custom parsers, so the
# verifiers alone must catch the invalid ones. Each names the op line it edits,
# the text it replaces, the replacement and what must happen: "ok" (a clean
# round trip that keeps the change) or an error fragment (a located error,
# exit 1). A mutation that leaves the text unchanged fails the test.
GENERIC_MUTATIONS = [
    ('"upd.clip"', "max_norm = 1.000000e+00", "max_norm = -1.000000e+00", "max_norm"),
    ('"upd.weight_decay"', "decay = 1.000000e-04", "decay = -1.000000e-04", "decay"),
    ('"upd.rowwise_adagrad"', "lr = 1.000000e-02", "lr = -1.000000e-02", "lr"),
    ('"upd.rowwise_adagrad"', "!emb.state<1000x1>, !upd", "!emb.state<1000x2>, !upd", "used with type"),
    ('"upd.dedup"', "-> !upd.delta<64xf32, i64, unique>", "-> !upd.delta<64xf32, i64>", "used with type"),
    ('"upd.apply"', '"adam"', '"lamb"', "lamb"),
    ('"emb.bag"', '"sum"', '"max"', "max"),
    ('"emb.lookup"', "-> tensor<?x64xf32>", "-> tensor<?x32xf32>", "emb.lookup"),
    ('"emb.lookup"', "tensor<?xi32>)", "tensor<?xf32>)", "used with type"),
    ('"kern.bag"', "#emb.layout<int8>", "#emb.layout<int9>", "unknown layout 'int9'"),
    ('"kern.bag"', "#emb.layout<int8>", '"int8"', "must be a layout, #emb.layout<NAME>"),
    ('"emb.table"', "#emb.layout<int8>", "#emb.layout<int2>", "unknown layout 'int2'"),
    ('"kern.update"', '"sgd"', '"sgdd"', "sgdd"),
    ('"upd.stamp"', "i64) -> !emb.versions", "i32) -> !emb.versions", "used with type"),
    ('"emb.table"', "1000x64xf32", "1000x0xf32", "error"),
    ('"upd.rowwise_adagrad"', "lr = 1.000000e-02", "lr = 5.000000e-01", "ok"),
    ('"emb.feature"', 'pooling = "sum"', 'pooling = "mean"', "ok"),
    ('"upd.clip"', "max_norm = 1.000000e+00", "max_norm = 2.500000e+00", "ok"),
    ('"upd.apply"', "lr = 1.000000e-03 : f64", "lr = 0x7FF8000000000000 : f64", "lr"),
    ('"upd.apply"', "lr = 1.000000e-03 : f64", 'lr = "fast"', "lr"),
    ('"emb.bag"', '"sum"', '"mean"', "weights"),
    # hyper-parameters out of their range (issue 9, class 5)
    ('"upd.apply"', "lr = 1.000000e-03 : f64", "lr = 1.000000e-03 : f64, beta1 = 1.000000e+00 : f64",
     "beta1"),
    ('"upd.apply"', "lr = 1.000000e-03 : f64", "lr = 1.000000e-03 : f64, eps = -1.000000e+00 : f64",
     "eps"),
    ('"upd.apply"', "lr = 1.000000e-03 : f64",
     "lr = 1.000000e-03 : f64, lr_decay = -1.000000e+00 : f64", "lr_decay"),
]
def _generic_module(tmp_path: Path, capsys) -> str:
    path = tmp_path / "m.mlir"
    path.write_text(MODULE)
    rc, generic, err = run_in_process(path, capsys, "--print-op-generic")
    assert rc == 0, err
    return generic


@pytest.mark.parametrize("op, old, new, expect", [
    pytest.param(*m, id=f"{m[0].strip(chr(34))}:{m[2][-40:]}") for m in GENERIC_MUTATIONS])
def test_token_mutations_generic_form(op: str, old: str, new: str, expect: str,
                                      tmp_path: Path, capsys) -> None:
    """Invalid edits give a located error and exit 1; valid ones round-trip."""
    generic = _generic_module(tmp_path, capsys)
    lines = generic.split("\n")
    i = next(i for i, line in enumerate(lines) if op in line and old in line)
    lines[i] = lines[i].replace(old, new, 1)
    mutated = "\n".join(lines)
    assert mutated != generic, "the mutation must change the input"
    path = tmp_path / "mutated.mlir"
    path.write_text(mutated)
    rc, out, err = run_in_process(path, capsys, "--print-op-generic")
    assert_clean(rc, out, err, f"{op}: {old} -> {new}")
    if expect == "ok":
        assert rc == 0, err
        assert new in out
        again = tmp_path / "again.mlir"
        again.write_text(out)
        rc2, out2, err2 = run_in_process(again, capsys, "--print-op-generic")
        assert rc2 == 0 and out2 == out, err2
    else:
        assert rc == 1, f"{op}: {old} -> {new} was accepted:\n{out}"
        assert re.match(rf"^{re.escape(str(path))}:\d+:\d+: error: ", err), err
        assert expect in err, err


@pytest.mark.parametrize("flags", [[], ["--split-input-file"], ["--print-op-generic"],
                                   ["--verify-diagnostics", "--split-input-file"]])
def test_empty_and_whitespace(flags: list[str], tmp_path: Path, capsys) -> None:
    for text in ["", "\n", "   \n\t", "// only a comment\n", "// -----\n// -----\n"]:
        path = tmp_path / "e.mlir"
        path.write_text(text)
        rc, out, err = run_in_process(path, capsys, *flags)
        assert_clean(rc, out, err, repr(text))


# ------------------------------------------------------- real processes


def _exe() -> str:
    exe = shutil.which("ekko-opt")
    if exe is None:
        pytest.fail("ekko-opt must be on PATH (pip install -e .)")
    return exe


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (FILECHECK / "tools" / "Inputs").glob("*.mlir"))
)
def test_process_exit_code_on_bad_inputs(name: str) -> None:
    path = FILECHECK / "tools" / "Inputs" / name
    result = subprocess.run([_exe(), str(path)], capture_output=True, timeout=60)
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 1, err
    assert "Traceback" not in err
    assert re.match(rf"^{re.escape(str(path))}(:\d+:\d+)?: error: ", err), err


def test_process_random_bytes_on_stdin_free_path(tmp_path: Path) -> None:
    rng = random.Random(7)
    path = tmp_path / "bytes.mlir"
    path.write_bytes(bytes(rng.randrange(256) for _ in range(300)))
    result = subprocess.run([_exe(), str(path)], capture_output=True, timeout=60)
    assert result.returncode == 1
    assert b"Traceback" not in result.stderr


def test_process_truncated_module_with_pipeline(tmp_path: Path) -> None:
    path = tmp_path / "cut.mlir"
    path.write_text(MODULE[: len(MODULE) // 2])
    result = subprocess.run([_exe(), str(path), "-p", PIPELINE], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert re.match(r".*cut\.mlir:\d+:\d+: error: ", result.stderr)


def test_process_valid_module_exits_0(tmp_path: Path) -> None:
    path = tmp_path / "ok.mlir"
    path.write_text(MODULE)
    result = subprocess.run([sys.executable, "-m", "ekko.compiler.tools.ekko_opt", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "upd.rowwise_adagrad" in result.stdout


# ------------------------------------------------- hangs, crashes, locations

GUARDED = {
    # xDSL's string regex backtracks exponentially without a closing quote
    "unterminated string": ('emb.table @t : !emb.table<4x4xf32> {serving = "' + "a" * 40 + "\n",
                            "1:47", "string literal is not closed"),
    "bad escape": ('"test.op"() {s = "' + "b" * 40 + '\\q"} : () -> ()\n', "1:59",
                   "invalid escape"),
    "deep nesting": ("builtin.module {" * 300 + "}" * 300, "1:1040", "nesting deeper than 64"),
    "5,000-digit integer": ("%x = arith.constant " + "9" * 5000 + " : i64\n", "1:21",
                            "5000 digits"),
    "integer out of range": ("%x = arith.constant 300 : i8\n", "1:21", "out of range for type i8"),
    "wide integer type": ("%x = arith.constant 1 : i" + "7" * 4500 + "\n", "1:26", "4500 digits"),
}


@pytest.mark.parametrize("name", sorted(GUARDED))
def test_guarded_inputs_fail_fast_with_a_location(name: str, tmp_path: Path) -> None:
    text, where, fragment = GUARDED[name]
    path = tmp_path / "g.mlir"
    path.write_text(text)
    result = subprocess.run([_exe(), str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(f"{path}:{where}: error: "), result.stderr[:300]
    assert fragment in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("spec, message", [
    ("no-such-pass", "unknown pass 'no-such-pass'"),
    ("upd-fuze", "did you mean 'upd-fuse'?"),
    ("upd-schedule{partitions=", "at column 25"),
    ("upd-dedup,,", "at column 11"),
    ("upd-schedule{partitions=x}", "pass 'upd-schedule'"),
    ("upd-schedule{nope=1}", "pass 'upd-schedule'"),
    ("{", "at column 1"),
    ("upd-schedule{partitions=-5}", "partitions must be 0 (chosen) to 4096, got -5"),
    ("upd-schedule{tile=99999}", "tile must be 0 (chosen) to 16384, got 99999"),
    ("standrd", "did you mean 'standard'?"),
    ("standard{nope=1}", "nope"),
    ("standard{partitions=-1}", "partitions must be 0 (chosen)"),
])
def test_bad_pipelines_are_one_line(spec: str, message: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "m.mlir"
    path.write_text(MODULE)
    rc, out, err = run_in_process(path, capsys, "-p", spec)
    assert rc == 1 and out == ""
    assert err.startswith("ekko-opt: error: -p") and err.count("\n") == 1, err
    assert message in err, err


@pytest.mark.parametrize("flags,words", [
    (["-t", "bogus"], ["-t: unknown target 'bogus' (ekko's: llvm, triton; xDSL's: ", "mlir"]),
    (["-t", "LLVM{x=1}"], ["-t: unknown target 'LLVM'"]),
    (["-t", "llvm{x=1}"], ["-t: target 'llvm' takes no options, got x"]),
    (["-t", "x86-asm"], ["-t x86-asm: xDSL's x86-asm target cannot print this module",
                         "ekko's targets are llvm, triton"]),
    (["-t"], ["argument -t/--target: expected one argument"]),
    (["-f", "bogus"], ["argument -f/--frontend: invalid choice: 'bogus'"]),
    (["--bogus"], ["unrecognized arguments: --bogus"]),
])
def test_flag_mistakes_are_one_line_and_exit_1(flags: list[str], words: list[str],
                                               tmp_path: Path, capsys) -> None:
    """`-t bogus` was argparse's usage and exit 2, `-t x86-asm` on ekko's IR an
    internal error; every flag mistake is now one `ekko-opt: error:` line and exit
    1, like any other mistake."""
    path = tmp_path / "m.mlir"
    path.write_text(MODULE)
    rc, out, err = run_in_process(path, capsys, *flags)
    assert rc == 1 and out == ""
    assert err.startswith("ekko-opt: error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, err


def test_an_unknown_target_exits_1_in_a_real_process(tmp_path: Path) -> None:
    path = tmp_path / "m.mlir"
    path.write_text(MODULE)
    result = subprocess.run([_exe(), str(path), "-t", "bogus"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and "usage:" not in result.stderr, result.stderr
    assert result.stderr.startswith("ekko-opt: error: -t: unknown target 'bogus'")


def test_version_and_help(capsys) -> None:
    from importlib.metadata import version

    assert ekko_opt(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"ekko-opt {version('ekko')} (xDSL ")
    assert ekko_opt(["--help"]) == 0
    help_text = "".join(capsys.readouterr().out.split())  # argparse wraps at hyphens
    assert help_text.startswith("usage:ekko-opt")
    assert "ekko'spasses:upd-dedup,upd-fuse,upd-schedule,lower-to-kernel" in help_text
    assert "convert-arith-to-riscv" not in help_text and "--list-passes" in help_text
    assert ekko_opt(["--list-passes"]) == 0
    listed = capsys.readouterr().out
    assert listed.startswith("ekko:\n  upd-dedup\n") and "convert-arith-to-riscv" in listed


def test_errors_on_ops_the_passes_made_point_at_the_users_op(tmp_path: Path, capsys,
                                                             monkeypatch) -> None:
    """A pass that replaces the user's optimizer op with a broken one: the
    error names the new op and points at the line the user wrote."""
    from dataclasses import dataclass

    from xdsl.dialects.builtin import DictionaryAttr, FloatAttr, f64

    from ekko.dialects.common import settings
    from xdsl.passes import ModulePass

    from ekko.compiler.tools import ekko_opt as tool

    @dataclass(frozen=True)
    class Break(ModulePass):
        name = "test-break"

        def apply(self, ctx, module) -> None:
            for op in list(module.walk()):
                if op.name in ("upd.sgd", "upd.apply") and "lr" in settings(op):
                    new = op.clone()
                    if op.name == "upd.sgd":
                        new.lr = FloatAttr(-1.0, f64)
                    else:
                        new.hyper = DictionaryAttr({**new.hyper.data, "lr": FloatAttr(-1.0, f64)})
                    op.parent_block().insert_op_before(new, op)
                    op.results[0].replace_all_uses_with(new.results[0])
                    op.detach()
                    op.erase()

    ours = tool.ekko_passes
    monkeypatch.setattr(tool, "ekko_passes", lambda: {**ours(), "test-break": lambda: Break})
    path = tmp_path / "sgd.mlir"
    path.write_text(
        "func.func @a(%t: !emb.table<10x4xf32>, %ids: tensor<?xi64>, %rows: tensor<?x4xf32>)"
        " -> !emb.table<10x4xf32> {\n"
        "  %d = upd.delta %ids, %rows : tensor<?xi64>, tensor<?x4xf32>\n"
        "  %t2 = upd.sgd %t, %d {lr = 1.000000e-01 : f64} : !emb.table<10x4xf32>, "
        "!upd.delta<4xf32, i64>\n"
        "  %t3 = upd.sgd %t2, %d {lr = 2.000000e-01 : f64} : !emb.table<10x4xf32>, "
        "!upd.delta<4xf32, i64>\n"
        "  func.return %t3 : !emb.table<10x4xf32>\n}\n")
    for pipeline in ("test-break", "upd-fuse,test-break"):
        rc, out, err = run_in_process(path, capsys, "-p", pipeline)
        assert rc == 1, err
        assert err.startswith(f"{path}:3:3: error: '"), err
        assert "lr must be positive" in err and "upd.sgd" in err and "  %t2 = upd.sgd" in err
