"""Nothing non-finite is committed (issue #17, item 2), on both targets.

A call that would write inf or NaN into a table, an optimizer state or a
serving copy raises NonFiniteOutputError naming the row and the buffer, and
leaves every buffer byte-identical (sequence words stay even). Each case the
issue lists is here; a randomized test covers shapes, odd dims, duplicates,
edge ids and empty deltas, with the float64 interpreter (tests/finite_oracle.py)
saying which calls must be refused. The Triton target runs in its interpreter.
"""

from __future__ import annotations

import os
import threading
import zlib

import numpy as np
import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "") in ("", "0") and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

import ekko  # noqa: E402
from ekko.dialects import catalog  # noqa: E402
from ekko.kernels import quant  # noqa: E402

try:
    from finite_oracle import as_numpy, refusals
except ImportError:  # pragma: no cover - run from the repository root
    from tests.finite_oracle import as_numpy, refusals  # type: ignore[no-redef]

rm = ekko.rowmath
TARGETS = ["llvm", "triton"]
TORCH = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def _target(target: str) -> str:
    if target == "triton":
        pytest.importorskip("triton")
    return target


class Case:
    """One kernel and a set of buffers for it (torch tensors: both targets take them)."""

    def __init__(self, target: str, optimizer: str, dim: int, rows: int, table_dtype="f32",
                 serving=None, table=None, seed=0, seq=True, **hyper):
        self.target = _target(target)
        self.kernel = ekko.update_kernel(optimizer, dim, table_dtype, serving=serving,
                                         target=target, threads=2, **hyper)
        self.spec = self.kernel.spec
        rng = np.random.default_rng(seed)
        w = rng.standard_normal((rows, dim)).astype(np.float32) if table is None else table
        self.device = DEVICE if target == "triton" else "cpu"
        self.table = torch.from_numpy(np.ascontiguousarray(w, np.float32)).to(TORCH[table_dtype])
        entry = catalog.optimizer(self.spec.optimizer)
        self.states = [torch.from_numpy(rng.uniform(0.0, 1.0, entry.state_shape(s, rows, dim))
                                        .astype(np.float32)) for s in entry.state_names]
        self.serving = None
        if serving is not None:
            stored = self.table.float().numpy()
            with np.errstate(all="ignore"):  # tests give rows past the layout's range
                q = quant.quantize_rows(stored, serving)
            self.serving = torch.from_numpy(np.ascontiguousarray(q))
            if serving in ("f16", "bf16"):
                self.serving = torch.from_numpy(stored).to(TORCH[serving])
        self.versions = torch.zeros(rows, dtype=torch.int64)
        self.seq = torch.zeros(rows, dtype=torch.int32) if seq else None
        self._move()

    def _move(self) -> None:
        d = self.device
        self.table = self.table.to(d)
        self.states = [s.to(d) for s in self.states]
        self.serving = None if self.serving is None else self.serving.to(d)
        self.versions = self.versions.to(d)
        self.seq = None if self.seq is None else self.seq.to(d)

    def buffers(self) -> list:
        return [self.table, *self.states, *([self.serving] if self.serving is not None else []),
                self.versions]

    def snapshot(self) -> list[bytes]:
        return [as_numpy(b).tobytes() for b in self.buffers()]

    def __call__(self, ids, grads, step: int = 1) -> None:
        st = self.states
        self.kernel(self.table, torch.as_tensor(ids).to(self.device),
                    torch.as_tensor(grads, dtype=torch.float32).to(self.device),
                    state=None if not st else st[0] if len(st) == 1 else tuple(st),
                    serving=self.serving, versions=self.versions, step=step, seq=self.seq)

    def expect(self, ids, grads, step: int = 1) -> dict[int, str]:
        return refusals(self.spec, self.table, self.states, ids, grads, step)

    def check(self, ids, grads, step: int = 1) -> dict[int, str]:
        """Run the call; refused exactly when the oracle says so, all-or-nothing either way."""
        want = self.expect(ids, grads, step)
        before = self.snapshot()
        if want:
            with pytest.raises(ekko.NonFiniteOutputError) as e:
                self(ids, grads, step)
            assert (e.value.row, e.value.buffer) in want.items(), (str(e.value), want)
            assert f"{e.value.buffer} of row {e.value.row}" in str(e.value)
            assert self.snapshot() == before, f"{e.value} but buffers changed"
        else:
            self(ids, grads, step)
            for b in self.buffers()[:-1]:
                values = as_numpy(b)
                if b is self.serving and catalog.layout(self.spec.serving).quantized:
                    values = quant.dequantize_rows(values, self.spec.serving, self.spec.dim)
                elif b is self.table and self.spec.table_dtype == "bf16":
                    values = quant.bf16_bits_to_f32(values)
                assert np.isfinite(values.astype(np.float64)).all()
        if self.seq is not None:
            assert (as_numpy(self.seq) % 2 == 0).all(), "a sequence word was left odd"
        return want


# -- the cases the issue names ----------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("optimizer,kw", [("sgd", {"deterministic": True}),
                                          ("rowwise_adagrad", {}), ("adam", {})])
def test_three_huge_duplicates_that_sum_past_f32_are_refused(target, optimizer, kw) -> None:
    """Three finite gradients of 3e38 on one id sum to inf: the row would be -inf or NaN."""
    rows, dim = 9, 5
    c = Case(target, optimizer, dim, rows, serving="int8", lr=0.01, **kw)
    ids = np.array([0, 4, 4, rows - 1, 4])
    grads = np.ones((5, dim), np.float32)
    grads[[1, 2, 4]] = 3e38
    assert c.check(ids, grads) == {4: "table"}
    c.check(ids[[0, 3]], grads[[0, 3]])  # the other rows alone go through


def test_plain_sgd_refuses_the_occurrence_that_overflows_and_undoes_the_earlier_ones() -> None:
    """SGD without dedup applies duplicates one by one: the second 3e38 step of a row
    overflows after the first was written; both are undone, with every other row."""
    rows, dim = 40, 7
    c = Case("llvm", "sgd", dim, rows, lr=1.0)
    assert not c.spec.dedup
    ids = np.array([3, 0, 3, rows - 1, 3, 5] * 50)  # many rows written before and after
    grads = np.ones((len(ids), dim), np.float32)
    grads[ids == 3] = 3e38
    assert c.check(ids, grads) == {3: "table"}


def test_plain_sgd_journals_each_row_once_per_call_not_once_ever() -> None:
    """A raw-delta apply skips rows this call journaled already (a table of recent ids,
    tagged per call): the rows of the previous call must not count."""
    rows, dim = 16, 5
    c = Case("llvm", "sgd", dim, rows, lr=1.0, seq=False)
    c.check(np.array([3, 3, 5, 3]), np.ones((4, dim), np.float32))  # accepted: 3 and 5 journaled
    after_first = c.snapshot()
    grads = np.ones((3, dim), np.float32)
    grads[[0, 2]] = -3e38  # 3's second step this call overflows
    assert c.check(np.array([3, 5, 3]), grads) == {3: "table"}
    assert c.snapshot() == after_first
    entries = [int(s.out[0]) for s in c.kernel.scratch_of(c.table)]
    assert sum(entries) == 2  # 3 and 5 once each, though 3 came twice


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype,near", [("f16", 65000.0), ("bf16", 3.38e38)])
def test_sgd_past_the_f16_and_bf16_max_is_refused(target, dtype, near) -> None:
    rows, dim = 6, 3
    table = np.zeros((rows, dim), np.float32)
    table[2] = near
    c = Case(target, "sgd", dim, rows, dtype, table=table, lr=1.0)
    grads = np.full((2, dim), -near / 50, np.float32)  # finite in f32, past the dtype's max
    assert c.check(np.array([0, 2]), grads) == {2: "table"}
    c.check(np.array([0, 2]), -grads)  # away from the max: fine


@pytest.mark.parametrize("target", TARGETS)
def test_ftrl_with_a_huge_gradient_leaves_the_table_finite(target) -> None:
    """docs/fuzzing.md: a huge finite gradient leaves an f32 table finite (FTRL
    turned one 1e20 gradient into NaN)."""
    rows, dim = 12, 9
    c = Case(target, "ftrl", dim, rows, serving="int4", lr=0.05, l1=0.01, l2=0.01)
    grads = np.random.default_rng(1).standard_normal((4, dim)).astype(np.float32)
    grads[2, 3] = 1e20
    ids = np.array([0, 5, 7, rows - 1])
    assert 7 in c.check(ids, grads)
    assert np.isfinite(as_numpy(c.table)).all()
    c.check(ids, np.ones((4, dim), np.float32))


USER = {  # name: (math, the buffer its bad value lands in)
    "div_by_zero": (lambda g, w, s, *, lr: (w - lr * g / (s - s), s), "table"),
    "sqrt_of_negative": (lambda g, w, s, *, lr: (w - lr * g, rm.sqrt(s - 2.0)), "state 's'"),
    "half_power_of_negative": (lambda g, w, s, *, lr: (w - lr * g, (s - 2.0) ** 0.5),
                               "state 's'"),
    "log_of_zero": (lambda g, w, s, *, lr: (w + rm.log(s * 0.0), s), "table"),
    "exp_overflow": (lambda g, w, s, *, lr: (w - lr * rm.exp(g * 100.0 + 10.0), s), "table"),
    "huge_constant": (lambda g, w, s, *, lr: (w - 1e39 * g, s), "table"),  # inf as f32
    "huge_product": (lambda g, w, s, *, lr: (w, s + 3e38 * (g + 10.0)), "state 's'"),
}


@pytest.fixture()
def user_optimizer(request):
    name = f"finite_{request.param}"
    with catalog.OPTIMIZERS.scoped():
        catalog.define(name, state=("s",), replace=True)(USER[request.param][0])
        yield name, USER[request.param][1]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("user_optimizer", sorted(USER), indirect=True)
def test_user_optimizers_that_make_inf_or_nan_are_refused(target, user_optimizer) -> None:
    name, buffer = user_optimizer
    rows, dim = 10, 6
    c = Case(target, name, dim, rows, serving="f16", lr=0.01, seed=3)
    ids = np.array([0, 4, rows - 1, 4])
    want = c.check(ids, np.ones((4, dim), np.float32))
    assert set(want) == {0, 4, rows - 1} and set(want.values()) == {buffer}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("serving,row", [
    ("f16", [1e5, 1.0, -2.0]),  # a finite f32 row past f16's max
    ("bf16", [3.4028e38, 0.0, 1.0]),  # rounds up to bf16's inf
    ("int8", [3e38, -3e38, 0.0]),  # max - min overflows: the scale is inf
    ("int4", [-1e5, 0.0, 1.0]),  # the f16 bias is -inf
])
def test_a_serving_row_that_would_not_be_finite_is_refused(target, serving, row) -> None:
    rows, dim = 5, 3
    table = np.zeros((rows, dim), np.float32)
    table[rows - 1] = row
    c = Case(target, "sgd", dim, rows, serving=serving, table=table, lr=1e-30)
    c.serving.zero_()  # the copy quantized from the table above is not finite itself
    grads = np.ones((2, dim), np.float32)
    assert c.check(np.array([0, rows - 1]), grads) == {rows - 1: "serving copy"}
    assert c.check(np.array([0, 1]), grads) == {}


# -- random deltas: all or nothing, as the interpreter predicts ---------------------------


def _random_delta(rng, rows: int, dim: int, huge: bool) -> tuple[np.ndarray, np.ndarray]:
    n = int(rng.choice([0, 1, 5, 40]))
    ids = rng.integers(0, rows, n)
    if n >= 2:
        ids[0], ids[-1] = 0, rows - 1  # the edge ids
        ids[n // 2:] = rng.choice(ids[: n // 2 + 1], n - n // 2)  # duplicates
    grads = rng.standard_normal((n, dim)).astype(np.float32)
    if huge and n:  # one huge value, or two on one id (their sum overflows)
        value = float(rng.choice([1e20, -1e20, 3e38, -3e38]))
        same = np.flatnonzero(ids == ids[int(rng.integers(n))])
        grads[same[:2], int(rng.integers(dim))] = value
    return ids, grads


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("optimizer", sorted(catalog.BUILTIN))
def test_random_deltas_are_refused_exactly_when_a_value_would_not_be_finite(target,
                                                                             optimizer) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{target}/{optimizer}".encode()))
    refused = accepted = 0
    for trial in range(12):  # six, or more until both outcomes showed (Lion's sign is bounded)
        if trial >= 6 and refused and accepted:
            break
        rows, dim = int(rng.choice([1, 7, 33])), int(rng.choice([1, 3, 8, 17]))
        dtype = str(rng.choice(["f32", "f32", "f16", "bf16"]))
        serving = rng.choice([None, *catalog.LAYOUTS])
        hyper = {"l1": 0.05} if optimizer == "ftrl" else {}
        c = Case(target, optimizer, dim, rows, dtype, serving=serving, seed=trial,
                 lr=1.0 if optimizer == "sgd" else 0.05, **hyper)
        for step in (1, 2):
            ids, grads = _random_delta(rng, rows, dim, huge=bool(rng.random() < 0.6))
            if c.check(ids, grads, step):
                refused += 1
            else:
                accepted += 1
    assert refused and accepted  # both outcomes exercised


# -- the table's name, and readers beside refused calls -----------------------------------


def test_a_compiled_model_names_the_table() -> None:
    model = ekko.compile_model(ekko.parse_model(
        "model m { table emb { rows 20; dim 4; optimizer sgd(lr=1.0); } feature f -> emb; }"))
    model.materialize()
    grads = np.full((3, 4), 3e38, np.float32)
    before = model.tables["emb"].master.copy()
    with pytest.raises(ekko.NonFiniteOutputError, match="of row 7 of table 'emb'") as e:
        model.update("emb", np.array([7, 7, 7]), grads)
    assert e.value.table == "emb" and e.value.row == 7
    assert np.array_equal(model.tables["emb"].master, before)


def test_the_error_survives_pickling() -> None:
    import pickle

    e = pickle.loads(pickle.dumps(ekko.NonFiniteOutputError(3, "state 'n'", "t")))
    assert (e.row, e.buffer, e.table) == (3, "state 'n'", "t") and "table 't'" in str(e)


def test_readers_beside_refused_calls_see_only_whole_finite_rows() -> None:
    """A refused call may write rows before it reaches the bad one, and puts them back,
    each inside its sequence word, before it returns; the bad row itself is put back
    before its word is even again. Lookups that read with the words see whole rows
    (of before, or of the call in progress, as beside any call) and never inf."""
    rows, dim = 64, 256
    k = ekko.update_kernel("sgd", dim, serving="f16", lr=1.0, threads=2)
    table = np.zeros((rows, dim), np.float32)
    serving = table.astype(np.float16)
    seq = np.zeros(rows, np.uint32)
    look = ekko.bag_kernel(dim, "f16", mode="none", threads=1)
    ids = np.arange(rows)
    stop = threading.Event()
    bad: list[int] = []
    reads = [0]

    def read() -> None:
        while not stop.is_set():
            out = look(serving, ids, seq=seq)
            reads[0] += 1
            if not np.isfinite(out).all() or (out != out[:, :1]).any():
                bad.append(reads[0])

    reader = threading.Thread(target=read)
    reader.start()
    overflow = np.full((rows, dim), -1.0, np.float32)
    overflow[rows - 1] = -7e4  # the last row's f16 copy would be inf: refused
    refused = 0
    try:
        for step in range(1, 121):
            if step % 2:
                try:
                    k(table, ids, overflow, serving=serving, seq=seq, step=step)
                except ekko.NonFiniteOutputError:
                    refused += 1
            else:
                k(table, ids[:-1], np.ones((rows - 1, dim), np.float32), serving=serving,
                  seq=seq, step=step)
    finally:
        stop.set()
        reader.join()
    assert refused == 60 and reads[0] > 0
    assert not bad, f"{len(bad)} of {reads[0]} lookups saw a torn or non-finite row"
    assert (seq % 2 == 0).all() and (table[:-1] == -60).all() and not table[-1].any()


# -- replica merges: an int8 row whose finite scale and bias decode to inf ----------------


def _int8_rows(codes: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
    n, dim = codes.shape
    out = np.empty((n, dim + 8), np.uint8)
    out[:, :dim] = codes
    out[:, dim:dim + 4] = scale.astype(np.float32)[:, None].view(np.uint8)
    out[:, dim + 4:] = bias.astype(np.float32)[:, None].view(np.uint8)
    return out


def _decodes_finite(rows: np.ndarray, dim: int) -> np.ndarray:
    """Per packet row: every code * scale + bias finite in f32 (two roundings)."""
    with np.errstate(all="ignore"):
        return np.isfinite(quant.dequantize_rows(rows, "int8", dim)).all(axis=1)


@pytest.mark.parametrize("dim,scale,bias,top", [
    (5, 1e37, 0.0, 255),  # 255 * 1e37 overflows f32
    (8, 1e36, 3.4e38, 10),  # the product is finite, adding the bias is not
    (1, 2e36, -3.4e38, 255),  # (255 * 2e36 = 5.1e38 past the max, a bias cannot bring it back)
])
def test_a_merged_int8_row_that_decodes_to_inf_is_refused(dim, scale, bias, top) -> None:
    from ekko.kernels.sync import SyncError, merge_kernel

    rows = 6
    merge = merge_kernel(dim, "int8", seq=True)
    replica = quant.quantize_rows(np.random.default_rng(0).standard_normal((rows, dim))
                                  .astype(np.float32), "int8")
    versions, seq = np.zeros(rows, np.int64), np.zeros(rows, np.uint32)
    codes = np.zeros((3, dim), np.uint8)
    codes[1, -1] = top
    packet = _int8_rows(codes, np.array([0.5, scale, 0.5]), np.array([0.0, bias, 0.0]))
    assert list(_decodes_finite(packet, dim)) == [True, False, True]
    ids = np.array([0, 3, rows - 1])
    before = [a.tobytes() for a in (replica, versions, seq)]
    with pytest.raises(SyncError, match="packet row 1 decodes to a non-finite value"):
        merge(replica, versions, ids, packet, np.ones(3, np.int64), newest=1, seq=seq)
    assert [a.tobytes() for a in (replica, versions, seq)] == before
    codes[1, -1] = 0  # the same scale and bias with small codes decode fine: merged
    packet = _int8_rows(codes, np.array([0.5, scale, 0.5]), np.array([0.0, bias, 0.0]))
    assert merge(replica, versions, ids, packet, np.ones(3, np.int64), newest=1, seq=seq) == 3
    look = ekko.bag_kernel(dim, "int8", mode="none")
    assert np.isfinite(look(replica, np.arange(rows), seq=seq)).all()


def test_random_int8_packets_merge_exactly_when_every_row_decodes_finite() -> None:
    from ekko.kernels.sync import SyncError, merge_kernel

    rng = np.random.default_rng(11)
    outcomes = set()
    for trial in range(12):
        dim, rows = int(rng.choice([1, 3, 16, 33])), int(rng.choice([2, 50, 9000]))
        n = int(rng.choice([1, 7, 5000]))  # 5000: more than one partition
        merge = merge_kernel(dim, "int8", threads=2)
        replica = quant.quantize_rows(rng.standard_normal((rows, dim)).astype(np.float32), "int8")
        versions = np.zeros(rows, np.int64)
        ids = rng.integers(0, rows, n)
        ids[0], ids[-1] = 0, rows - 1
        codes = rng.integers(0, 256, (n, dim)).astype(np.uint8)
        scale = rng.uniform(0.0, 1.0, n) * 10.0 ** rng.choice([0, 30, 36, 37], n)
        bias = rng.uniform(-1.0, 1.0, n) * 10.0 ** rng.choice([0, 38], n) * 3.0
        packet = _int8_rows(codes, scale, np.clip(bias, -3.4e38, 3.4e38))
        good = _decodes_finite(packet, dim)
        before = replica.tobytes()
        outcomes.add(bool(good.all()))
        if good.all():
            merge(replica, versions, ids, packet, np.ones(n, np.int64), newest=1)
            with np.errstate(all="ignore"):
                assert np.isfinite(quant.dequantize_rows(replica, "int8", dim)).all()
        else:
            first = int(np.flatnonzero(~good)[0])
            with pytest.raises(SyncError, match=f"packet row {first} decodes"):
                merge(replica, versions, ids, packet, np.ones(n, np.int64), newest=1)
            assert replica.tobytes() == before
    assert outcomes == {True, False}


@pytest.mark.parametrize("dim", [1, 63, 64, 65, 128, 200])
def test_the_merge_check_of_int8_codes_is_the_decode_of_every_code(dim: int) -> None:
    """The check decodes only a row's largest code (codes are >= 0 and the decode
    is monotone, so it lands furthest from the bias). Row by row it must refuse
    exactly the rows the oracle decodes to a non-finite value: scales of both
    signs near f32's limit, biases that push past it, the extreme code in the
    64-byte chunks or in the tail. Scanning only the chunks, or keeping the
    smallest code, fails it."""
    from ekko.kernels.sync import SyncError, merge_kernel

    rng = np.random.default_rng(dim)
    n = 300
    codes = rng.integers(0, 256, (n, dim)).astype(np.uint8)
    codes[::3] = rng.integers(100, 120, (len(codes[::3]), dim))  # narrow: the extremes matter
    pick = rng.integers(0, dim, n)
    codes[np.arange(n)[1::3], pick[1::3]] = 255  # one extreme code, anywhere in the row
    codes[np.arange(n)[2::3], pick[2::3]] = 0
    sign = rng.choice([-1.0, 1.0], n)
    scale = sign * rng.uniform(0.5, 1.5, n) * 10.0 ** rng.choice([0, 35, 36, 37], n)
    bias = rng.choice([-1.0, 1.0], n) * rng.uniform(0.0, 3.4, n) * 10.0 ** rng.choice([0, 38], n)
    packet = _int8_rows(codes, scale, bias)
    good = _decodes_finite(packet, dim)
    assert good.any() and not good.all()
    merge = merge_kernel(dim, "int8")
    replica = np.zeros((1, dim + 8), np.uint8)
    for i in range(n):
        versions = np.zeros(1, np.int64)
        call = lambda: merge(replica, versions, np.zeros(1, np.int64), packet[i:i + 1],  # noqa: E731
                             np.ones(1, np.int64), newest=1)
        if good[i]:
            assert call() == 1, i
        else:
            with pytest.raises(SyncError, match="decodes to a non-finite value"):
                call()


def test_the_engine_names_the_table_and_commits_nothing() -> None:
    model = ekko.compile_model(ekko.parse_model(
        "model m { table emb { rows 20; dim 4; optimizer sgd(lr=1.0); } feature f -> emb; }"))
    with ekko.Engine(model, replicas=1) as engine:
        before = engine.primary.tables["emb"].buf.master.copy()
        with pytest.raises(ekko.NonFiniteOutputError, match="of row 7 of table 'emb'"):
            engine.step("emb", np.array([7, 7, 7]), np.full((3, 4), 3e38, np.float32))
        assert np.array_equal(engine.primary.tables["emb"].buf.master, before)
        assert engine.primary.issued("emb") == 0  # no version was spent on it
        engine.step("emb", np.array([7]), np.ones((1, 4), np.float32))
        engine.flush()
        assert engine.check()
