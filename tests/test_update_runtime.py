"""The update kernels' runtime: argument checks, nothing half-applied, threads, caches."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import ekko
from ekko.compiler.backend.llvm_update import emit_update
from ekko.compiler.pipeline import UpdateRequest, update_spec
from ekko.kernels import jit
from ekko.kernels.update import UpdateKernel
from ekko.kernels.errors import UpdateError

ROWS, DIM = 50, 8


def buffers(optimizer: str = "adam", serving: str | None = "int8"):
    rng = np.random.default_rng(0)
    table = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    state = {"sgd": None, "adagrad": np.zeros((ROWS, DIM), np.float32),
             "rowwise_adagrad": np.zeros(ROWS, np.float32),
             "adam": (np.zeros((ROWS, DIM), np.float32), np.zeros((ROWS, DIM), np.float32))}[optimizer]
    srv = None if serving is None else ekko.quantize_rows(table, serving)
    return table, state, srv, np.zeros(ROWS, np.int64)


def snapshot(*arrays):
    out = []
    for a in arrays:
        if isinstance(a, tuple):
            out.extend(x.copy() for x in a)
        elif a is not None:
            out.append(a.copy())
    return out


@pytest.mark.parametrize("ids,grads_fix,message", [
    ([1, -1, 3], None, r"id -1 at position 1 is out of range \[0, 50\)"),
    ([1, 2, ROWS], None, r"id 50 at position 2 is out of range"),
    ([0, ROWS - 1, 7], (1, 3, np.nan), "non-finite gradient .* delta row 1"),
    ([0, 4, 7], (2, 0, np.inf), "non-finite gradient .* delta row 2"),
    ([0, 4, 7], (0, 5, -np.inf), "non-finite gradient .* delta row 0"),
])
def test_rejected_delta_changes_nothing(ids, grads_fix, message) -> None:
    k = ekko.update_kernel("adam", DIM, serving="int8", threads=2)
    table, state, srv, versions = buffers()
    before = snapshot(table, state, srv, versions)
    grads = np.ones((len(ids), DIM), np.float32)
    if grads_fix is not None:
        grads[grads_fix[0], grads_fix[1]] = grads_fix[2]
    with pytest.raises(UpdateError, match=message):
        k(table, np.array(ids, np.int64), grads, state=state, serving=srv, versions=versions, step=1)
    for old, new in zip(before, snapshot(table, state, srv, versions)):
        np.testing.assert_array_equal(old, new)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_earliest_error_of_a_long_delta_is_reported(optimizer: str) -> None:
    """Errors past the first 1024-id block, in both partitions: the earliest wins, nothing moves."""
    k = ekko.update_kernel(optimizer, DIM, serving="int8", threads=2)
    table, state, srv, versions = buffers(optimizer)
    before = snapshot(table, state, srv, versions)
    rng = np.random.default_rng(5)
    ids = rng.integers(0, ROWS, 5000)
    grads = rng.standard_normal((5000, DIM)).astype(np.float32)
    ids[4321] = ROWS + 3
    grads[2999, 7] = np.nan
    ids[3500] = -2
    with pytest.raises(UpdateError, match="non-finite gradient .* delta row 2999"):
        k(table, ids, grads, state=state, serving=srv, versions=versions, step=1)
    grads[2999, 7] = 0.0
    with pytest.raises(UpdateError, match=r"id -2 at position 3500 is out of range"):
        k(table, ids, grads, state=state, serving=srv, versions=versions, step=1)
    for old, new in zip(before, snapshot(table, state, srv, versions)):
        np.testing.assert_array_equal(old, new)


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "sgd"])
@pytest.mark.parametrize("where", ["read once", "first of a repeated id", "a repeat"])
def test_a_bad_row_found_while_writing_is_undone(optimizer: str, where: str) -> None:
    """The kernels check a delta row where they read it (a repeated id's rows while
    summing, a row read once just before its table row changes), so a NaN late in a
    big delta is found after thousands of rows were written: every one is put back
    (table, state, serving copy, versions; sequence words end even) and the error
    names the first bad row."""
    rows, dim, n = 300_000, 16, 40_000
    rng = np.random.default_rng(11)
    ids = rng.permutation(rows)[:n].astype(np.int64)  # many buckets, every id once
    hot = int(ids[5])
    bad = {"read once": n - 7, "first of a repeated id": 5, "a repeat": n - 3}[where]
    ids[[n - 3, n - 2]] = hot  # ids[5] comes twice more
    grads = rng.standard_normal((n, dim)).astype(np.float32)
    grads[bad, 3] = np.nan
    grads[n - 1, 0] = np.inf  # a later bad row is not the one reported
    k = ekko.update_kernel(optimizer, dim, serving="int8", threads=2)  # sgd: no dedup
    table = rng.standard_normal((rows, dim)).astype(np.float32)
    state = np.zeros(rows, np.float32) if optimizer == "rowwise_adagrad" else None
    srv = ekko.quantize_rows(table, "int8")
    versions, seq = np.zeros(rows, np.int64), np.zeros(rows, np.uint32)
    before = snapshot(table, state, srv, versions)
    with pytest.raises(UpdateError, match=f"non-finite gradient .* delta row {bad}$"):
        k(table, ids, grads, state=state, serving=srv, versions=versions, step=1, seq=seq)
    for old, new in zip(before, snapshot(table, state, srv, versions)):
        np.testing.assert_array_equal(old, new)
    assert not (seq % 2).any()
    grads[[bad, n - 1]] = 0.0
    k(table, ids, grads, state=state, serving=srv, versions=versions, step=1, seq=seq)
    assert (versions[ids] == 1).all()


def test_argument_errors_are_clear() -> None:
    k = ekko.update_kernel("rowwise_adagrad", DIM, serving="int8")
    table, state, srv, versions = buffers("rowwise_adagrad")
    ids, grads = np.array([1, 2]), np.ones((2, DIM), np.float32)
    cases = [
        (dict(table=table.astype(np.float64)), "table must have dtype float32"),
        (dict(table=table[:, :4].copy()), r"table must have shape \(rows, 8\)"),
        (dict(ids=ids.astype(np.int32)), "ids must have dtype int64"),
        (dict(grads=np.ones((3, DIM), np.float32)), r"grads must have shape \(2, 8\)"),
        (dict(grads=np.ones((DIM, 2), np.float32).T), "grads must be C-contiguous"),
        (dict(state=None), "rowwise_adagrad needs its state"),
        (dict(state=np.zeros((ROWS, DIM), np.float32)), r"state must have shape \(50,\)"),
        (dict(serving=None), "pass serving="),
        (dict(serving=np.zeros((ROWS, DIM), np.uint8)), r"serving must have shape \(50, 16\)"),
        (dict(versions=np.zeros(ROWS, np.int32)), "versions must have dtype int64"),
        (dict(step=0), "step counts from 1"),
        (dict(ids=[1, 2]), "ids must be a numpy array or a torch tensor"),
    ]
    for change, message in cases:
        args = dict(table=table, ids=ids, grads=grads, state=state, serving=srv,
                    versions=versions, step=1) | change
        with pytest.raises(UpdateError, match=message):
            k(**args)


def test_bad_requests_are_update_errors() -> None:
    with pytest.raises(UpdateError, match="cannot build"):
        ekko.update_kernel("lamb", DIM)
    with pytest.raises(UpdateError, match="cannot build"):
        ekko.update_kernel("adam", DIM, lr=-1.0)


def test_one_update_rule_from_keywords_requests_and_models() -> None:
    """update_kernel's keywords, an UpdateRequest's (old and new form) and a
    model table's rule are one UpdateRule and compile one spec."""
    rule = ekko.UpdateRule.make("adam", lr=0.001, beta2=0.99, max_norm=2.0, weight_decay=0.01)
    old = UpdateRequest("adam", DIM, serving="int8", hyper=(("lr", 0.001), ("beta2", 0.99)),
                        max_norm=2.0, weight_decay=0.01)
    assert old == UpdateRequest(rule, DIM, serving="int8") == UpdateRequest(
        update=rule, dim=DIM, serving="int8")
    assert old.update is not rule and old.update == rule
    k = ekko.update_kernel("adam", DIM, serving="int8", lr=0.001, betas=(0.9, 0.99),
                           max_norm=2.0, weight_decay=0.01)
    assert k.spec == ekko.update_kernel(rule, DIM, serving="int8").spec == update_spec(old)
    with pytest.raises(UpdateError, match="optimizer adam has no hyper-parameter 'alpha'"):
        ekko.update_kernel("adam", DIM, lr=0.001, alpha=0.5)  # rmsprop's, as the language says
    table = ekko.parse_model("model m { table t { rows 10; dim 8; serving int8; "
                             "optimizer adam(lr=0.001, beta2=0.99); clip max_norm=2; "
                             "weight_decay 0.01; } }").table("t")
    assert table.update == rule
    with pytest.raises(UpdateError, match="cannot build"):
        ekko.update_kernel(rule, DIM, lr=0.1)
    with pytest.raises(TypeError):
        UpdateRequest(rule, DIM, max_norm=1.0)
    with pytest.raises(UpdateError, match="stochastic rounding needs an f16 or bf16"):
        ekko.update_kernel("sgd", DIM, stochastic_rounding=True)


def test_empty_delta_is_a_no_op() -> None:
    k = ekko.update_kernel("adam", DIM, serving="int8")
    table, state, srv, versions = buffers()
    before = snapshot(table, state, srv, versions)
    k(table, np.zeros(0, np.int64), np.zeros((0, DIM), np.float32), state=state, serving=srv,
      versions=versions, step=1)
    for old, new in zip(before, snapshot(table, state, srv, versions)):
        np.testing.assert_array_equal(old, new)


def test_torch_tensors_are_updated_in_place() -> None:
    torch = pytest.importorskip("torch")
    k = ekko.update_kernel("sgd", DIM, table_dtype="bf16", lr=0.5)
    table = torch.zeros((ROWS, DIM), dtype=torch.bfloat16)
    ptr = table.data_ptr()
    k(table, torch.tensor([3, 3, 9]), torch.ones((3, DIM)), step=1)
    assert table.data_ptr() == ptr
    assert torch.all(table[3] == -1.0) and torch.all(table[9] == -0.5) and torch.all(table[0] == 0)


def test_hash_table_grows_when_a_delta_crowds_one_range_of_rows() -> None:
    """Dedup works a bucket (a range of rows) at a time in a small hash table; 150,000
    distinct ids all in the first 1/32 of the rows make one bucket that outgrows it."""
    rows = 4_000_000
    k = ekko.update_kernel("rowwise_adagrad", 4, threads=2)
    fresh = ekko.update_kernel("rowwise_adagrad", 4, threads=2)
    rng = np.random.default_rng(1)
    table, other = np.zeros((rows, 4), np.float32), np.zeros((rows, 4), np.float32)
    m1, m2 = np.zeros(rows, np.float32), np.zeros(rows, np.float32)
    k(table, np.array([1, 1, 2]), np.ones((3, 4), np.float32), state=m1, step=1)  # small table
    fresh(other, np.array([1, 1, 2]), np.ones((3, 4), np.float32), state=m2, step=1)
    ids = rng.permutation(rows // 32)[:150_000].astype(np.int64)
    grads = rng.standard_normal((len(ids), 4)).astype(np.float32)
    start = max(sc.cap for sc in k.scratch_of(table))
    k(table, ids, grads, state=m1, step=2)
    assert max(sc.cap for sc in k.scratch_of(table)) >= 65536 > start
    np.testing.assert_allclose(m1[ids], m2[ids] + (grads ** 2).mean(1), rtol=1e-6)
    assert np.count_nonzero(table[ids]) == np.count_nonzero(grads)


def test_threads_give_the_same_bits() -> None:
    rng = np.random.default_rng(2)
    ids = rng.integers(0, ROWS, 5000)
    grads = rng.standard_normal((5000, DIM)).astype(np.float32)
    results = []
    for threads in (1, 2, 3):
        k = ekko.update_kernel("adagrad", DIM, serving="int4", threads=threads)
        table, state, srv, versions = buffers("adagrad", "int4")
        k(table, ids, grads, state=state, serving=srv, versions=versions, step=1)
        results.append((table, state, srv))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_inner_loops_are_vectorized(monkeypatch) -> None:
    monkeypatch.setenv("EKKO_CACHE_DIR", "off")  # optimize here, not from the disk cache
    module = jit._build(emit_update(update_spec(UpdateRequest("rowwise_adagrad", 64, serving="int8"))),
                        "test-vectorized", keep_ir=True)
    assert module.optimized_ir is not None
    assert any(f"<{w} x float>" in module.optimized_ir for w in (4, 8, 16))


def test_compile_cache_memory_and_disk(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EKKO_CACHE_DIR", str(tmp_path))
    rule = ekko.UpdateRule.make("adam", max_norm=2.0)
    spec = update_spec(UpdateRequest(rule, 77, serving="int4"))  # no other test uses it
    jit.clear_memory_cache()
    cold = UpdateKernel(spec)
    again = UpdateKernel(spec)
    objects = sorted(tmp_path.rglob("*.o"))
    stamps = [o.stat().st_mtime_ns for o in objects]
    jit.clear_memory_cache()
    disk = UpdateKernel(spec)
    # compiled once, then found in memory, then loaded from disk (nothing rewritten)
    assert not cold.module.from_disk and disk.module.from_disk
    assert again.module is cold.module and disk.module is not cold.module
    assert objects and [o.stat().st_mtime_ns for o in objects] == stamps


def _hold_the_gil(obj, depth: int = 0) -> int:
    """Rebind every ctypes function reachable from `obj` as PYFUNCTYPE, which
    holds the GIL during the call: the same native code, called the other way."""
    found = 0
    for name, value in list(getattr(obj, "__dict__", {}).items()):
        if isinstance(value, ctypes._CFuncPtr) and value._flags_ & ctypes._FUNCFLAG_CDECL:
            held = ctypes.PYFUNCTYPE(value.restype, *value.argtypes)
            setattr(obj, name, held(ctypes.cast(value, ctypes.c_void_p).value))
            found += 1
        elif depth < 2 and hasattr(value, "__dict__") and not isinstance(value, type):
            found += _hold_the_gil(value, depth + 1)
    return found


def _iterations_during(call) -> int:
    """How many loop iterations another Python thread completes while `call` runs."""
    count, stop = [0], threading.Event()

    def spin() -> None:
        while not stop.is_set():
            count[0] += 1

    interval = sys.getswitchinterval()
    # the spinner never forces the GIL away from Python code: only a call
    # that releases it lets the spinner run (and keep it until the interval)
    sys.setswitchinterval(1.0)
    spinner = threading.Thread(target=spin)
    try:
        spinner.start()
        while count[0] == 0:  # the spinner is running before we measure
            time.sleep(0.001)
        before = count[0]
        call()
        during = count[0] - before
    finally:
        stop.set()
        spinner.join()
        sys.setswitchinterval(interval)
    return during


def test_native_calls_release_the_gil() -> None:
    """While a long update runs, another Python thread keeps running.

    Counted, not timed: the iterations a spinning thread completes during the
    call, against the same kernel bound with PYFUNCTYPE (known to hold the
    GIL). With a long switch interval the spinner cannot take the GIL from
    Python code: holding it, the call lets the spinner do nothing; released,
    the spinner runs for the whole call. Load slows the spinner but cannot
    make a held call count, so the comparison holds on a busy machine.
    """
    rows, dim, n = 500_000, 32, 1_000_000
    rng = np.random.default_rng(0)
    table = rng.standard_normal((rows, dim), dtype=np.float32)
    state = np.zeros(rows, np.float32)
    ids, grads = rng.integers(0, rows, n), rng.standard_normal((n, dim), dtype=np.float32)
    k = ekko.update_kernel("rowwise_adagrad", dim, threads=1)

    def counts(runs: int) -> list[int]:
        return [_iterations_during(lambda: k(table, ids, grads, state=state)) for _ in range(runs)]

    free = max(counts(2))
    k = UpdateKernel(k.spec)  # a kernel of its own: rebinding must not touch the cached one
    assert _hold_the_gil(k) > 0, "found no ctypes function to rebind"
    blocked = min(counts(3))
    print(f"iterations during the call: released {free:,}, held {blocked:,}")
    assert free > 10 * max(blocked, 10_000), (free, blocked)


def test_a_second_process_loads_the_kernel_from_disk(tmp_path) -> None:
    """The disk cache is what a restart sees: a fresh interpreter does not recompile."""
    script = ("import ekko; k = ekko.update_kernel('rowwise_adagrad', 24, serving='int8'); "
              "print(k.module.from_disk)")
    env = {**os.environ, "EKKO_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                           check=True).stdout.split() for _ in range(2)]
    assert runs == [["False"], ["True"]]


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adam"])
@pytest.mark.parametrize("n_ids, hot", [(20_000, 0.0), (20_000, 0.6), (150, 0.5), (1, 0.0)])
def test_every_order_gives_the_same_bits(optimizer: str, n_ids: int, hot: float) -> None:
    """upd-schedule's order (input, bucket, id) only changes the walk: every row, state
    and serving row gets the same bits, on 1 to 3 partitions. 20,000 ids into 70,000
    rows map buckets directly; 150 ids take the hash table (one bucket spans every
    row); `hot` of the ids are 0 or rows-1 (one scratch row summing thousands)."""
    from dataclasses import replace

    rng = np.random.default_rng(3)
    rows = 70_000  # more than 2^11: the radix sort needs two passes
    ids = rng.integers(0, rows, n_ids)
    ids[rng.random(n_ids) < hot] = rng.choice([0, rows - 1])
    grads = rng.standard_normal((len(ids), DIM)).astype(np.float32)
    spec = replace(ekko.update_kernel(optimizer, DIM, serving="int8").spec, versions=True)
    outs = []
    for order in ("input", "bucket", "id"):
        for parts in (1, 2, 3):
            k = UpdateKernel(replace(spec, order=order, partitions=parts))
            table = np.ones((rows, DIM), np.float32)
            state = (np.zeros((rows, DIM), np.float32), np.zeros((rows, DIM), np.float32)) \
                if optimizer == "adam" else np.zeros(rows, np.float32)
            srv = np.zeros((rows, DIM + 8), np.uint8)
            versions = np.zeros(rows, np.int64)
            k(table, ids, grads, state=state, serving=srv, versions=versions, step=1, version=7)
            outs.append((order, parts, table, state, srv, versions))
    first = outs[0]
    assert (first[5] == 7).sum() == len(np.unique(ids))
    for out in outs[1:]:
        for a, b in zip(first[2:], out[2:]):
            for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
                assert np.array_equal(x, y), (out[0], out[1])
