"""Host-measured schedule choices: the prefetch distance from `ekko tune` to the kernel.

The session runs with EKKO_TUNING=off (conftest); these tests turn tuning on
in a temporary cache folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from xdsl.context import Context

import ekko
from ekko.compiler.backend import tuning
from ekko.compiler.backend.llvm_update import prefetch_ahead
from ekko.compiler.backend.spec import UpdateSpec
from ekko.compiler.tools.ekko_opt import main as ekko_opt
from ekko.kernels.errors import UpdateError
from ekko.kernels.update import UpdateKernel

APPLY = """func.func @f(%t: !emb.table<100x{dim}xf32>, %d: !upd.delta<{dim}xf32, i64>) -> !emb.table<100x{dim}xf32> {{
  %t2 = upd.apply %t, %d {{optimizer = "sgd", lr = 1.000000e-01 : f64, dedup}} : !emb.table<100x{dim}xf32>, !upd.delta<{dim}xf32, i64>
  func.return %t2 : !emb.table<100x{dim}xf32>
}}
"""


@pytest.fixture
def tuned(tmp_path, monkeypatch) -> Path:
    """Tuning on, its store in a fresh cache folder (kernels compile there too)."""
    monkeypatch.setenv("EKKO_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("EKKO_TUNING", raising=False)
    return tmp_path / tuning.STORE


def _scheduled(tmp_path: Path, dim: int, capsys, *options: str) -> str:
    src = tmp_path / f"apply{dim}.mlir"
    src.write_text(APPLY.format(dim=dim))
    assert ekko_opt([str(src), "-p", "upd-schedule" + "".join(options)]) == 0
    return capsys.readouterr().out


def test_a_recorded_distance_reaches_the_ir_and_the_kernel(tuned, tmp_path, capsys) -> None:
    """upd-schedule writes the recorded distance (the nearest measured dim within 2x),
    an explicit option wins, and the compiled update carries it."""
    assert tuning.tuned_prefetch(64) is None
    tuning.record_prefetch({64: 4, 256: 32})
    assert [tuning.tuned_prefetch(d) for d in (64, 48, 33, 16, 200, 512, 1024)] == \
        [4, 4, 4, None, 32, 32, None]
    assert "prefetch = 4 : i64" in _scheduled(tmp_path, 64, capsys)
    assert f"prefetch = {prefetch_ahead(16)} : i64" in _scheduled(tmp_path, 16, capsys)
    assert "prefetch = 9 : i64" in _scheduled(tmp_path, 64, capsys, "{prefetch=9}")
    assert ekko.update_kernel("rowwise_adagrad", 64).spec.prefetch == 4
    assert ekko.update_kernel("rowwise_adagrad", 16).spec.prefetch == prefetch_ahead(16)
    os.environ["EKKO_TUNING"] = "off"  # monkeypatch restores it
    assert ekko.update_kernel("rowwise_adagrad", 64).spec.prefetch == prefetch_ahead(64)


def test_a_store_from_another_host_or_damaged_is_not_believed(tuned) -> None:
    tuning.record_prefetch({64: 4})
    data = json.loads(tuned.read_text())
    assert data["host"] == tuning.host_key() and data["prefetch"] == {"64": 4}
    tuned.write_text(json.dumps({**data, "host": "another-cpu"}))
    assert tuning.tuned_prefetch(64) is None
    for junk in ("{", "[]", json.dumps({**data, "format": 0}),
                 json.dumps({**data, "prefetch": {"64": 9999, "x": 3, "32": "a"}})):
        tuned.write_text(junk)
        assert tuning.tuned_prefetch(64) is None, junk
    tuning.record_prefetch({32: 8})  # replaces what it cannot read
    assert json.loads(tuned.read_text())["prefetch"] == {"32": 8}
    with pytest.raises(ValueError, match="out of range"):
        tuning.record_prefetch({64: 0})
    os.environ["EKKO_TUNING"] = "off"
    with pytest.raises(ValueError, match="tuning is off"):
        tuning.record_prefetch({64: 4})


def test_readers_racing_two_recorders_see_a_whole_store(tuned) -> None:
    """Two threads record while a third reads: every read is a choice one of them wrote,
    never half a file (which would read as no choice: the store is there from the
    start), and the store stays whole JSON."""
    import threading

    written = {16: {4, 8}, 64: {16, 32}}
    stop = threading.Event()
    seen, errors = [], []

    def record(k: int) -> None:
        try:
            for i in range(60):
                tuning.record_prefetch({16: (4, 8)[k], 64: (16, 32)[(i + k) % 2]})
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def read() -> None:
        while not stop.is_set():
            seen.append((tuning.tuned_prefetch(16), tuning.tuned_prefetch(64)))

    tuning.record_prefetch({16: 4, 64: 16})
    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=record, args=(k,)) for k in (0, 1)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    reader.join()
    assert not errors
    assert seen and all(a in written[16] and b in written[64] for a, b in seen), \
        sorted(set(seen), key=str)
    data = json.loads(tuned.read_text())
    assert set(data["prefetch"]) == {"16", "64"}
    assert not list(tuned.parent.glob(".tuning-*"))  # no temporary file left behind


@pytest.mark.parametrize("optimizer, order", [("rowwise_adagrad", "input"),
                                              ("rowwise_adagrad", "bucket"), ("sgd", "input")])
@pytest.mark.parametrize("n_ids", [0, 1, 5, 3000])
def test_every_prefetch_distance_gives_the_same_bits(optimizer: str, order: str,
                                                     n_ids: int) -> None:
    """The distance only changes which lines are asked for early: every row, state,
    serving row and version is the same for distances shorter and longer than the
    delta, heavy duplicates and the ids 0 and rows-1 included."""
    rng = np.random.default_rng(n_ids)
    rows, dim = 5000, 24
    ids = rng.integers(0, rows, n_ids)
    ids[rng.random(n_ids) < 0.4] = rng.choice([0, rows - 1])
    grads = rng.standard_normal((n_ids, dim)).astype(np.float32)
    spec = replace(ekko.update_kernel(optimizer, dim, serving="int8").spec, versions=True,
                   order=order, partitions=2)
    outs = []
    for distance in (1, 3, 8, 16, 64, 256):
        k = UpdateKernel(replace(spec, prefetch=distance))
        table = np.ones((rows, dim), np.float32)
        state = np.zeros(rows, np.float32)
        srv = np.zeros((rows, dim + 8), np.uint8)
        versions = np.zeros(rows, np.int64)
        k(table, ids, grads, **({"state": state} if optimizer != "sgd" else {}), serving=srv,
          versions=versions, step=1, version=5)
        outs.append((table, state, srv, versions))
    assert (outs[0][3] == 5).sum() == len(np.unique(ids))
    for out in outs[1:]:
        for a, b in zip(outs[0], out):
            assert np.array_equal(a.view(np.uint8), b.view(np.uint8))


def test_a_spec_refuses_a_distance_out_of_range() -> None:
    spec = ekko.update_kernel("sgd", 8).spec
    for bad in (-1, 257):
        with pytest.raises(ValueError, match="prefetch must be 0"):
            replace(spec, prefetch=bad)
    assert isinstance(replace(spec, prefetch=0), UpdateSpec)


def test_tune_prefetch_measures_every_candidate_and_records_the_choice(tuned) -> None:
    results = ekko.tune_prefetch((8, 24), candidates=(2, 16), table_bytes=1 << 20, rounds=2)
    assert [r.dim for r in results] == [8, 24]
    for r in results:
        assert set(r.ms) == {2, 16} and all(v > 0 for v in r.ms.values())
        assert r.rule == prefetch_ahead(r.dim)
        # the rule's distance is a candidate here, so the choice is one of them
        assert r.chosen in (2, 16) and r.rows * r.dim * 4 <= 1 << 20 and r.ids == r.rows // 4
    assert {d: tuning.tuned_prefetch(d) for d in (8, 24)} == {r.dim: r.chosen for r in results}
    tuned.unlink()
    ekko.tune_prefetch((8,), candidates=(2,), table_bytes=1 << 20, rounds=1, record=False)
    assert not tuned.exists()


@pytest.mark.parametrize("kwargs, match", [
    ({"dims": ()}, "at least one dim"),
    ({"dims": (0,)}, "dim must be an integer from 1"),
    ({"dims": (8,), "candidates": (999,)}, "prefetch candidate must be"),
    ({"dims": (8,), "candidates": (True,)}, "prefetch candidate must be"),
    ({"dims": (8,), "rounds": 0}, "rounds must be"),
    ({"dims": (8,), "table_bytes": 10}, "table_bytes must be"),
    ({"dims": (8,), "table_bytes": 1 << 40}, "this machine has"),
])
def test_tune_prefetch_refuses_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(UpdateError, match=match):
        ekko.tune_prefetch(**kwargs)


def _ekko(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ekko.cli", *args], capture_output=True,
                          text=True, env=env, timeout=600)


def test_the_tune_command_records_and_refuses_bad_flags(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "EKKO_TUNING"}
    env["EKKO_CACHE_DIR"] = str(tmp_path)
    small = ["--dims", "8", "--candidates", "2,8", "--rounds", "1", "--table-mib", "1"]
    run = _ekko("tune", *small, env=env)
    assert run.returncode == 0, run.stderr
    assert "| 8 | 32,768 | 8,192 |" in run.stdout and "recorded in" in run.stderr
    assert json.loads((tmp_path / tuning.STORE).read_text())["prefetch"].keys() == {"8"}
    run = _ekko("tune", *small, "--json", "--dry-run", env={**env, "EKKO_TUNING": "off"})
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)[0]["dim"] == 8 and "not recorded" in run.stderr
    run = _ekko("tune", *small, env={**env, "EKKO_TUNING": "off"})
    assert run.returncode == 1 and "tuning is off" in run.stderr
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    run = _ekko("tune", *small, "--dims", "8,16", env={**env, "EKKO_CACHE_DIR": str(a_file)})
    assert run.returncode == 1 and "cannot hold tuning.json" in run.stderr, run.stderr
    assert run.stdout == ""  # refused before measuring anything
    for bad in (["--dims", "0"], ["--dims", "8,8"], ["--dims", "x"], ["--candidates", "300"],
                ["--rounds", "0"], ["--table-mib", "-1"], ["--threads", "99999"]):
        run = _ekko("tune", *bad, env=env)
        assert run.returncode == 1 and "Traceback" not in run.stderr, (bad, run.stderr)
        assert "error" in run.stderr, bad


@pytest.mark.parametrize("options, message", [
    ("{prefetch=999}", "prefetch must be 0 (chosen) to 256, got 999"),
    ("{prefetch=-1}", "prefetch must be 0 (chosen) to 256, got -1"),
    ("{prefetch=4 target=triton}", "prefetch is a CPU setting; target triton has none"),
])
def test_upd_schedule_refuses_a_bad_prefetch_option(tmp_path, capsys, options: str,
                                                     message: str) -> None:
    src = tmp_path / "apply.mlir"
    src.write_text(APPLY.format(dim=64))
    assert ekko_opt([str(src), "-p", "upd-schedule" + options]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
