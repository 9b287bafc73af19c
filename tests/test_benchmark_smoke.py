"""Smoke test of benchmarks/update_kernels.py on a tiny workload.

Every peer of the benchmark must run and agree with the float64 reference on
sampled rows, so a peer that rots (API change, wrong math) fails here instead
of silently printing a meaningless speedup.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from types import ModuleType

import numpy as np
import pytest

from tests.scripts import ROOT, load_script

BENCH = ROOT / "benchmarks" / "update_kernels.py"


bench = load_script("benchmarks/update_kernels.py")


@pytest.fixture(scope="module")
def work():
    return bench.make_workload(rows=5000, dim=16, n_ids=3000, seed=5)


UPDATES = [p for p in bench.PEERS if p != "C loop"]  # the C loop does less: its own test below


@pytest.mark.parametrize("peer", UPDATES)
@pytest.mark.parametrize("kind", bench.KINDS)
def test_peer_agrees_with_reference(kind: str, peer: str, work) -> None:
    """One checked run and one timed run of each peer; it must match the reference."""
    bufs = bench.allocate(kind, work.rows, work.dim)
    saved = bench.save_rows(bufs, work)
    exp = bench.expected_rows(kind, work, saved, bench.sample_ids(work, n=300))
    case = bench.Case("main", kind, work.rows, work.dim, work.n_ids, threads=1)
    res = bench.measure(case, peer, work, bufs, saved, exp, runs=1)
    if res.error.startswith("fbgemm_gpu:"):
        pytest.skip(res.error)  # optional dependency absent; ekko missing is a failure
    assert not res.error, res.error
    assert res.check.startswith("ok"), res.check
    assert len(res.times_ms) == 1 and res.times_ms[0] > 0
    assert res.nbytes == bench.bytes_moved(res.kind, work) > 0 and res.gbs > 0
    if peer in ("ekko", "FBGEMM", "torch eager", "torch.compile"):
        assert res.threads == 1  # the case's thread count reaches the peer
    # the peer restored the touched rows: the next peer starts from the same state
    np.testing.assert_array_equal(bufs.table[saved.uniq], saved.table_rows)


def _each_position_alone(kind: str, work, table: np.ndarray, state: np.ndarray | None) -> None:
    """What the C loop promises, in float64 numpy: every position applied alone, in input order."""
    for i, row in enumerate(work.ids):
        g = work.grads[i].astype(np.float64)
        m = bench.LR
        if kind != "sgd":
            state[row] += (g * g).sum() / work.dim
            m = bench.LR / (np.sqrt(state[row]) + bench.EPS)
        table[row] -= m * g


needs_cc = pytest.mark.skipif(not any(shutil.which(c) for c in ("cc", "gcc", "clang")),
                              reason="no C compiler: the C loop peer is reported unavailable")


@needs_cc
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dim", [16, 13, 64])
@pytest.mark.parametrize("kind", bench.KINDS)
def test_c_loop_applies_each_position_alone(kind: str, dim: int, threads: int) -> None:
    """The C loop's figures mean something only if it does its stated work: each position
    applied alone to its row, rows split between threads (a race would lose updates)."""
    work = bench.make_workload(rows=3000, dim=dim, n_ids=4000, seed=7)
    bufs = bench.allocate(kind, work.rows, work.dim)
    table, state = bufs.table.astype(np.float64), None
    if bufs.momentum is not None:
        bufs.momentum[:] = np.random.default_rng(3).random(work.rows, dtype=np.float32)
        state = bufs.momentum.astype(np.float64)
    _each_position_alone(kind, work, table, state)
    peer = bench.c_loop_peer(kind, work, bufs, threads)
    assert not peer.checked and peer.threads == threads
    peer.run(1)
    np.testing.assert_allclose(bufs.table, table, rtol=1e-4, atol=1e-5)
    if state is not None:
        np.testing.assert_allclose(bufs.momentum, state, rtol=1e-4)


@needs_cc
def test_c_loop_refuses_a_width_it_was_not_built_for(work) -> None:
    bufs = bench.allocate("sgd", work.rows, work.dim)
    lib = bench._c_loop_library(work.dim + 1)
    before = bufs.table.copy()
    rc = lib.c_loop_update(work.ids.ctypes.data, work.grads.ctypes.data, bufs.table.ctypes.data,
                           None, work.n_ids, work.dim, 1, bench.LR, bench.EPS)
    assert rc == -1
    np.testing.assert_array_equal(bufs.table, before)


def test_c_loop_is_a_row_not_a_crash_without_a_compiler(work, monkeypatch) -> None:
    """No C compiler: the peer is reported unavailable, the run goes on."""
    monkeypatch.setattr("shutil.which", lambda name: None)
    bench._c_loop_library.cache_clear()
    try:
        bufs = bench.allocate("sgd", work.rows, work.dim)
        saved = bench.save_rows(bufs, work)
        exp = bench.expected_rows("sgd", work, saved, bench.sample_ids(work, n=50))
        case = bench.Case("main", "sgd", work.rows, work.dim, work.n_ids, threads=1)
        res = bench.measure(case, "C loop", work, bufs, saved, exp, runs=1)
        assert "no C compiler" in res.error and not res.times_ms
    finally:
        bench._c_loop_library.cache_clear()


def test_ratio_peers_are_timed_in_interleaved_rounds(work, monkeypatch) -> None:
    """FBGEMM, the C loop and ekko take turns run by run, each after an idle settle; the
    other peers time their series in a row; every peer still checks its rows first, and
    one failing in a round leaves the others' times."""
    order: list[str] = []
    real = bench.time_run
    monkeypatch.setattr(bench, "settle", lambda: order.append("settle"))

    def record(res, peer, version):
        order.append(res.key)
        if res.key == "numpy" and version == 3:
            raise RuntimeError("numpy broke")  # a series peer failing midway
        return real(res, peer, version)

    monkeypatch.setattr(bench, "time_run", record)
    peers = ["numpy", *bench.ROUNDS]
    case = bench.Case("main", "sgd", work.rows, work.dim, work.n_ids, threads=1)
    results = {r.key: r for r in bench.run_case(case, work, 3, peers)}
    ran = [p for p in bench.ROUNDS if not results[p].error]
    assert "ekko" in ran
    timed = [k for k in order if k != "settle"]
    assert timed[:2] == ["numpy", "numpy"] and timed[2:] == ran * 3
    rounds = order[order.index(ran[0]) - 1:]
    assert rounds == [x for _ in range(3) for p in ran for x in ("settle", p)]
    for p in ran:
        assert len(results[p].times_ms) == 3 and results[p].check.startswith(("ok", "not compared"))
    assert "numpy broke" in results["numpy"].error


def test_every_peer_has_a_marker_in_the_plot() -> None:
    """A peer without a style would be timed but left out of the roofline plot."""
    assert list(bench.STYLE) == list(bench.PEERS)


def test_bytes_moved_follows_the_stated_rule(work) -> None:
    """ids + grads once; table (and state) rows read and written; serving row and version written."""
    n, u, d = work.n_ids, len(work.uniq), work.dim
    assert bench.bytes_moved("sgd", work) == n * (8 + 4 * d) + u * 8 * d
    assert bench.bytes_moved("rowwise_adagrad", work) == n * (8 + 4 * d) + u * (8 * d + 8)
    assert bench.bytes_moved("rowwise_adagrad_int8", work) == n * (8 + 4 * d) + u * (8 * d + 8 + d + 16)


def test_report_columns_and_summary(work) -> None:
    """Every timed peer gets bytes, GB/s and % of copy; the summary reads off the targets."""
    case = bench.Case("workload", "rowwise_adagrad", work.rows, work.dim, work.n_ids)
    nbytes = bench.bytes_moved(case.kind, work)
    rows = [bench.Result(case, "ekko", "ekko", threads=2, times_ms=[1.0, 2.0, 3.0], check="ok",
                         kind=case.kind, nbytes=nbytes),
            bench.Result(case, "FBGEMM EXACT_ROWWISE_ADAGRAD", "FBGEMM", threads=2, times_ms=[4.0],
                         check="ok", kind=case.kind, nbytes=nbytes),
            bench.Result(case, "torch eager", "torch eager", threads=2, times_ms=[20.0], check="ok",
                         kind=case.kind, nbytes=nbytes),
            bench.Result(case, "numpy", "numpy", skipped=True, notes="skipped in this case")]
    bw = nbytes / 2.0 / 1e6 * 4  # ekko's 2 ms is 25% of this
    text = bench.format_table(rows, {case: work}, bw=bw)
    gbs = nbytes / 2.0 / 1e6
    assert f"| ekko | 2 | 2.0 | 1-3 | {work.n_ids / 2e3:.1f} | {nbytes / 1e6:.0f} | {gbs:.3g} | 25% | 1.00x |" in text
    assert "| numpy | - |" in text and "skipped in this case" in text
    line = bench.summary_line(case, rows, bw)
    assert "2.00x FBGEMM (target >= 2.5x: MISS)" in line, line
    assert "10.00x torch eager (target >= 5x: met)" in line, line
    assert "25% of copy bandwidth (target >= 50%: MISS)" in line, line
    assert line in text


def test_cases_cover_what_the_issue_asks() -> None:
    """Uniform ids, the two no-serving workloads, threads 1 and 2, the dim sweep at fixed bytes."""
    for quick in (False, True):
        cs = bench.cases(quick)
        s = 10 if quick else 1
        assert {c.group for c in cs} == set(bench.GROUPS) and {c.kind for c in cs} == set(bench.KINDS)
        plain = [(c.rows * s, c.dim, c.n_ids * s, c.dist, c.threads) for c in cs if c.kind == "rowwise_adagrad"]
        for threads in (1, 2):
            assert (4_000_000, 64, 1_000_000, "zipf", threads) in plain
            assert (8_000_000, 32, 1_000_000, "uniform", threads) in plain
        sweep = [c for c in cs if c.group == "sweep"]
        assert [c.dim for c in sweep] == list(bench.SWEEP_DIMS)
        assert len({c.rows * c.dim for c in sweep}) == 1  # fixed table bytes
        assert all(c.runs_peer("ekko") and c.runs_peer("FBGEMM") and c.runs_peer("torch eager") for c in cs)


def test_quick_run_reports_every_case(tmp_path, capsys) -> None:
    """--quick covers every case; each timed row has bytes, GB/s and a sane % of copy; plot written."""
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    peers = "torch eager,FBGEMM,ekko"
    assert bench.main(["--quick", "--runs", "1", "--peers", peers, "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert (tmp_path / "update_kernels.md").read_text().strip() == text.strip()
    assert (tmp_path / "update_kernels.png").stat().st_size > 10_000
    sections = text.split("\n### ")[2:]  # after the copy bandwidth and the summary
    assert len(sections) == len(bench.cases(quick=True))
    for case, section in zip(bench.cases(quick=True), sections):
        assert section.startswith(case.title), (case.title, section[:80])
        assert f"- {case.label}: ekko " in text  # its summary line
        rows = [r.split(" | ") for r in section.splitlines() if r.startswith("| ") and "---" not in r][1:]
        timed = [r for r in rows if r[2] != "-"]
        assert {r[0].lstrip("| ").split()[0] for r in timed} >= {"ekko", "torch"}, section
        for r in timed:
            assert int(r[5]) > 0 and float(r[6]) > 0 and 0 < float(r[7].rstrip("%")) < 1000, r


def test_reference_detects_wrong_update(work) -> None:
    """The checker rejects a table that was not updated (guards the guard)."""
    bufs = bench.allocate("sgd", work.rows, work.dim)
    saved = bench.save_rows(bufs, work)
    exp = bench.expected_rows("sgd", work, saved, bench.sample_ids(work, n=100))
    with pytest.raises(AssertionError):
        bench.check_rows(bufs, exp, work.dim)


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH.parent / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["update_kernels", "lookup_kernels", "compile_model", "parse_ir",
                                  "torch_step", "quality", "geo"])
def test_quick_runs_write_nothing(name: str, tmp_path) -> None:
    """--quick is a smoke run: it never overwrites the committed results (every script
    decides through benchmarks/results_io.py)."""
    if name in ("lookup_kernels", "torch_step", "quality"):
        pytest.importorskip("torch")
    mod = _load_script(name)
    folder = _load_script("results_io").output_folder
    results = BENCH.parent / "results"
    assert folder(mod.parse_args(["--quick"])) is None
    assert folder(mod.parse_args([])) == results
    assert folder(mod.parse_args(["--quick", "--out", str(tmp_path)])) == tmp_path


def test_the_ab_script_compares_two_trees(capsys) -> None:
    """benchmarks/ab_update.py on a tiny workload, this tree against its own HEAD."""
    import subprocess

    root = BENCH.parent.parent
    if subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    spec = importlib.util.spec_from_file_location("bench_ab_update", BENCH.parent / "ab_update.py")
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    assert ab.main(["--base-ref", "HEAD", "--size", "5000,3000", "--dims", "16", "--rounds", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| rowwise_adagrad_int8", "| sgd"]
    assert all(float(r.split(" | ")[-1].rstrip(" |")) > 0 for r in rows[1:])
    with pytest.raises(SystemExit):
        ab.main(["--size", "0,5"])


def test_sync_bytes_follow_the_stated_rules() -> None:
    """pack: ids, then row and version read and written; merge: ids, packet, versions r+w, rows written."""
    pytest.importorskip("torch")
    lk = load_script("benchmarks/lookup_kernels.py")
    assert lk.pack_bytes(72, 10) == 10 * (8 + 72 + 8 + 72 + 8)
    assert lk.merge_bytes(72, 10) == 10 * (8 + 72 + 8 + 16 + 72)
    ids = np.array([3, 3, 5, 7])
    assert lk.lookup_bytes(256, ids, bags=2, dim=64) == (4 + 3) * 8 + 3 * 256 + 2 * 64 * 4


def test_pack_and_merge_peers_agree_and_are_timed() -> None:
    """Every pack and merge peer passes its own check on a small serving copy, for f32 and int8."""
    pytest.importorskip("torch")
    lk = load_script("benchmarks/lookup_kernels.py")
    results = lk.bench_sync(16, 5000, 3000, 2, np.random.default_rng(1))
    assert [(r.op, r.layout) for r in results] == [
        (op, layout) for layout in lk.SYNC_LAYOUTS for op in ("pack",) * 3 + ("merge",) * 3]
    for r in results:
        assert r.ms and r.ms > 0 and not r.note, (r.name, r.note)
        assert r.nbytes == (lk.pack_bytes if r.op == "pack" else lk.merge_bytes)(
            16 * 4 if r.layout == "f32" else 16 + 8, 3000)


def test_lookup_quick_run_reports_bandwidth_and_targets(tmp_path, capsys) -> None:
    """--quick: bytes, GB/s and % of copy on every timed row; summary lines for int8, pack, merge."""
    pytest.importorskip("torch")
    lk = load_script("benchmarks/lookup_kernels.py")
    assert lk.main(["--quick", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert (tmp_path / "lookup_kernels.md").read_text().strip() == text.strip()
    assert (tmp_path / "lookup_kernels.png").stat().st_size > 10_000  # the roofline plot
    assert "- dim 64 int8 pooled lookup: ekko " in text and "x F.embedding_bag f32 (target >= 2x: " in text
    assert "FBGEMM IntNBit INT8 TBE (target >= 1x: " in text or "FBGEMM inference TBE did not run here: " in text
    for what in ("hand-written C loop", "the int8 rows' lines alone (the floor)"):
        assert re.search(f"; {re.escape(what)} (\\d+\\.\\d+ ms, \\d+\\.\\d+x torch|: did not run)", text), what
    for op in ("pack", "merge"):
        for layout in lk.SYNC_LAYOUTS:
            assert f"- dim 64 {op} {layout}: ekko " in text and "of copy bandwidth (target >= 50%: " in text
    timed = 0
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if "MB moved" in cells:
            col = {name: cells.index(name) for name in ("median ms", "MB moved", "GB/s", "% of copy bw")}
            col_names = cells
        elif line.startswith("| ") and "---" not in line and cells[col["median ms"]] != "-":
            timed += 1
            pct = float(cells[col["% of copy bw"]].rstrip("%"))
            assert float(cells[col["MB moved"]]) > 0 and float(cells[col["GB/s"]]) > 0 and 0 < pct < 1000, line
            peer = cells[0] if "kernel" in col_names else cells[1]
            assert any(peer.startswith(k) for k in lk.PEER_STYLE), f"{peer} has no marker in the plot"
    assert timed >= 5 + 12  # torch + 4 ekko layouts; 3 peers x pack/merge x 2 layouts
    if shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"):
        assert "| C loop | int8 | " in text and "| floor (C) | int8 | " in text


@needs_cc
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dim", [16, 13, 64])
def test_c_lookup_peers_do_their_stated_work(dim: int, threads: int, monkeypatch) -> None:
    """The C loop pools int8 rows as ekko's lookup does (code * scale + bias per element),
    empty bags and the edge ids included; the floor reads one byte of every line of every
    row it is given (its checksum), on 1-3 threads. A C loop that dropped a thread's bags,
    or a floor that skipped rows, would fail here."""
    torch = pytest.importorskip("torch")
    lk = load_script("benchmarks/lookup_kernels.py")
    rng = np.random.default_rng(dim * 10 + threads)
    rows = 3000
    table = rng.standard_normal((rows, dim), dtype=np.float32)
    ids = rng.integers(0, rows, 997).astype(np.int64)
    ids[:2], ids[-2:] = 0, rows - 1
    offsets = np.unique(np.r_[0, rng.integers(0, len(ids), 40), 5, 5, len(ids)]).astype(np.int64)
    offsets = np.sort(np.r_[offsets, 5])  # bag [5, 5) is empty
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(lk, "BAGS", len(offsets) - 1)
    peers = [lk.run_c_bag(table, ids, offsets), *(lk.run_floor(table, layout, ids) for layout in ("f32", "int8"))]
    assert all(r.call is not None and not r.ms for r in peers), [r.note for r in peers]
    lk.time_in_rounds(peers, runs=1, rounds=2)
    assert all(r.ms and r.ms > 0 and r.call is None for r in peers)
    assert "no id checks" in peers[0].note and all("not a lookup" in r.note for r in peers[1:])
    lib = lk._c_bag_library(dim)
    q = lk.quantize_rows(table, "int8")
    out = np.zeros((len(offsets) - 1, dim), np.float32)
    assert lib.c_bag_int8(q.ctypes.data, ids.ctypes.data, offsets.ctypes.data, len(offsets) - 1,
                          out.ctypes.data, threads) == 0
    deq = lk.dequantize_rows(q, "int8", dim).astype(np.float64)
    want = np.array([deq[ids[a:b]].sum(0) for a, b in zip(offsets[:-1], offsets[1:])])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)
    assert not out[np.flatnonzero(offsets[:-1] == offsets[1:])].any()  # empty bags stay zero
    raw = q.view(np.uint8)
    assert lib.c_touch_lines(raw.ctypes.data, raw.shape[1], ids.ctypes.data, len(ids),
                             threads) == lk.lines_touched(raw, ids)
    assert lk.lines_touched(raw, ids[:1]) == int(raw[0, ::64].sum() + raw[0, -1])


@needs_cc
def test_c_lookup_peers_refuse_what_they_cannot_do() -> None:
    """A thread count out of range, or offsets not starting at 0: -1, nothing written."""
    pytest.importorskip("torch")
    lk = load_script("benchmarks/lookup_kernels.py")
    lib = lk._c_bag_library(8)
    q = np.zeros((4, 16), np.uint8)
    ids = np.array([0, 3], np.int64)
    out = np.full((1, 8), 7.0, np.float32)
    for offsets, threads in ((np.array([0, 2], np.int64), 0), (np.array([0, 2], np.int64), 65),
                             (np.array([1, 2], np.int64), 1)):
        assert lib.c_bag_int8(q.ctypes.data, ids.ctypes.data, offsets.ctypes.data, 1,
                              out.ctypes.data, threads) == -1
    assert (out == 7.0).all()
    assert lib.c_touch_lines(q.ctypes.data, 16, ids.ctypes.data, 2, 0) == -1
    assert lib.c_touch_lines(q.ctypes.data, 0, ids.ctypes.data, 2, 1) == -1


def test_c_lookup_peers_are_rows_not_crashes_without_a_compiler(monkeypatch) -> None:
    """No C compiler: both C rows say unavailable, and the run counts that as no failure."""
    pytest.importorskip("torch")
    lk = load_script("benchmarks/lookup_kernels.py")
    monkeypatch.setattr("shutil.which", lambda name: None)
    lk._c_bag_library.cache_clear()
    table = np.zeros((10, 8), np.float32)
    ids, offsets = np.array([1, 2], np.int64), np.array([0, 2], np.int64)
    for r in (lk.run_c_bag(table, ids, offsets), lk.run_floor(table, "int8", ids)):
        assert r.ms is None and r.note.startswith("unavailable: no C compiler"), r.note
    lk._c_bag_library.cache_clear()


def test_lookup_peers_are_timed_in_turn(monkeypatch) -> None:
    """Rounds: every checked peer once a round, in order; a peer that failed its check is
    never timed; each keeps its median round."""
    pytest.importorskip("torch")
    lk = load_script("benchmarks/lookup_kernels.py")
    calls: list[str] = []
    times = iter([5.0, 1.0, 9.0, 1.0, 7.0, 3.0])
    monkeypatch.setattr(lk, "median_ms", lambda fn, runs: (fn(), next(times))[1])
    results = [lk.Result(n, "f32", None, call=lambda n=n: calls.append(n)) for n in ("a", "b")]
    results.insert(1, lk.Result("bad", "f32", None, "bad: max error 1 > tolerance"))
    lk.time_in_rounds(results, runs=4, rounds=3)
    assert calls == ["a", "b"] * 3
    assert [r.ms for r in results] == [7.0, None, 1.0]


def test_freshness_cluster_plot_fits_its_data() -> None:
    """The x axis spans the samples (with a margin), not the histogram's 1 us to 1000 s."""
    fc = load_script("benchmarks/freshness_cluster.py")
    a, b = fc.Histogram(), fc.Histogram()
    a.add(np.array([0.5, 3.0, 20.0]))
    b.add(np.array([2.0, 80.0]))
    lo, hi = fc.x_limits([a, b, fc.Histogram()])
    assert 0.2 <= lo < 0.5 and 80.0 < hi <= 200.0
    assert fc.x_limits([]) == (1e-3, 1.0)


def test_plot_labels_do_not_overlap() -> None:
    """Every case of a full run gets a row label, and no two axis labels overlap."""
    plt = pytest.importorskip("matplotlib.pyplot")
    rows = []
    for i, case in enumerate(bench.cases()):
        for key in bench.STYLE:
            rows.append(bench.Result(case, key, key, times_ms=[10.0 + i], nbytes=(i + 1) * 10**8))
    fig = bench.figure(rows, bw=40.0)
    fig.canvas.draw()
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [c.label for c in bench.cases()]
    assert "GB/s" in ax.get_xlabel()
    renderer = fig.canvas.get_renderer()
    for labels in (ax.get_yticklabels(), [t for t in ax.get_xticklabels() if t.get_text()]):
        boxes = [t.get_window_extent(renderer) for t in labels]
        assert all(not a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    plt.close(fig)


@pytest.mark.parametrize("script", ["benchmarks/update_kernels.py", "benchmarks/lookup_kernels.py"])
@pytest.mark.parametrize("argv,flag", [
    (["--runs", "0"], "--runs"), (["--runs", "x"], "--runs"), (["--dims", "64,abc"], "--dims"),
    (["--dims", "0"], "--dims"), (["--dims", "99999"], "--dims"),
    (["--groups", "nope"], "--groups"), (["--cases", "sgd,nope"], "--cases"),
    (["--peers", "ekko,nope"], "--peers"),
])
def test_bad_flags_are_usage_errors_naming_the_flag(script: str, argv: list[str], flag: str,
                                                    capsys) -> None:
    """A wrong flag value stops the run before any work, naming the flag (exit 2), instead
    of a traceback or a run that silently measures nothing."""
    module = bench if script.endswith("update_kernels.py") else load_script(script)
    with pytest.raises(SystemExit) as stop:
        module.parse_args(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert f"argument {flag}" in err or f"unrecognized arguments: {flag}" in err
    assert "Traceback" not in err
