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
emb.table @users : !emb.table<1000x64xf32> {serving = "int8"}
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
  kern.update %t, %ids, %g, %q {optimizer = "sgd", lr = 1.000000e-01 : f64, serving, serving_layout = "int8"} : memref<1000x64xf32>, memref<?xi64>, memref<?x64xf32>, memref<1000x72xi8>
  kern.bag %q, %ids, %out {layout = "int8", mode = "none"} : memref<1000x72xi8>, memref<?xi64>, memref<?x64xf32>
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
    if rc == 1:
        assert "error" in err, f"{what}: exit 1 without a diagnostic"


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


@pytest.mark.parametrize("seed", range(10))
def test_token_mutations_generic_form(seed: int, tmp_path: Path, capsys) -> None:
    """The generic form skips the custom parsers: the verifiers must catch it."""
    path = tmp_path / "m.mlir"
    path.write_text(MODULE)
    rc, generic, err = run_in_process(path, capsys, "--print-op-generic")
    assert rc == 0, err
    rng = random.Random(5000 + seed)
    lines = generic.split("\n")
    i = rng.randrange(1, len(lines) - 2)
    swaps = [("i64", "i32"), ("64x", "32x"), ("f32", "f16"), ("int8", "int4"),
             ("unique", "i64"), ("1000", "999"), ('"sum"', '"max"'), ("lr", "eta")]
    a, b = rng.choice(swaps)
    lines[i] = lines[i].replace(a, b, 1)
    path.write_text("\n".join(lines))
    rc, out, err = run_in_process(path, capsys)
    assert_clean(rc, out, err, f"generic mutation {a}->{b} of line {i}")


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
