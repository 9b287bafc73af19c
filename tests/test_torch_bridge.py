"""ekko.torch: training through the engine from PyTorch equals torch autograd
followed by the same optimizer, per optimizer; bad input, no_grad and
non-finite gradients commit nothing; TorchRec input works."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import ekko  # noqa: E402
from ekko.compiler.frontend import parse_model  # noqa: E402

from .reference import _rowwise_adagrad, init_state  # noqa: E402
from .test_optimizers import ftrl_reference  # noqa: E402

OPTIMIZERS = {  # every built-in of dialects/catalog.py, with non-default hyper-parameters
    "sgd": "sgd(lr=0.1)",
    "adagrad": "adagrad(lr=0.1, eps=1e-10, lr_decay=0.05)",
    "rowwise_adagrad": "rowwise_adagrad(lr=0.1, eps=1e-8)",
    "adam": "adam(lr=0.05, beta1=0.8, beta2=0.99, eps=1e-8)",
    "rmsprop": "rmsprop(lr=0.01, alpha=0.9, eps=1e-6)",
    "ftrl": "ftrl(lr=0.1, l1=0.001, l2=0.1, beta=1.0)",
}
ROWS = {"t": 40, "u": 25}
DIM = 8


def source(optimizer: str = "sgd(lr=0.1)", serving: str = "") -> str:
    """Two tables; t read by a sum and a mean feature, u by a none and a weighted sum one."""
    return f"""model bridge {{
      defaults {{ dim {DIM}; optimizer {optimizer}; {serving} }}
      table t {{ rows {ROWS['t']}; }}
      table u {{ rows {ROWS['u']}; }}
      feature fs -> t pooling sum;
      feature fm -> t pooling mean;
      feature fn -> u pooling none;
      feature fw -> u pooling sum;
    }}"""


def compiled(optimizer: str = "sgd(lr=0.1)", serving: str = "") -> ekko.CompiledModel:
    return ekko.compile_model(parse_model(source(optimizer, serving)))


def _ids(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """Heavy duplicates: mostly the hot ids 0, rows-1, 1; the rest uniform."""
    hot = np.array([0, rows - 1, 1])
    return np.where(rng.random(n) < 0.7, rng.choice(hot, n), rng.integers(0, rows, n))


def batch(rng: np.random.Generator, bags: int = 7) -> dict:
    """One input of every feature: empty bags included, int64 numpy and tensors mixed."""
    out = {}
    for name, table in (("fs", "t"), ("fm", "t"), ("fw", "u")):
        lengths = rng.integers(0, 6, bags)
        lengths[[1, 4]] = 0
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        ids = _ids(rng, ROWS[table], int(offsets[-1]))
        out[name] = (ids, torch.from_numpy(offsets)) if name == "fm" else (ids, offsets)
    n = out["fw"][0].shape[0]
    out["fw"] += (rng.standard_normal(n).astype(np.float32),)
    out["fn"] = torch.from_numpy(_ids(rng, ROWS["u"], 9))
    return out


def loss_of(pooled: dict, targets: dict):
    """Non-linear in the rows, so each step's gradient depends on the last update."""
    return sum(((o - targets[k]) ** 2).sum() + o.sin().sum() for k, o in sorted(pooled.items()))


def torch_forward(model: ekko.CompiledModel, weights: dict, sparse: dict) -> dict:
    """The reference: torch's own embedding_bag / embedding with sparse gradients."""
    out = {}
    for name, value in sparse.items():
        f = model.feature(name)
        w = weights[f.table]
        if f.pooling == "none":
            out[name] = F.embedding(torch.as_tensor(value), w, sparse=True)
            continue
        ids, offsets = (torch.as_tensor(v) for v in value[:2])
        psw = torch.as_tensor(value[2]) if len(value) == 3 else None
        out[name] = F.embedding_bag(ids, w, offsets, mode=f.pooling, sparse=True,
                                    per_sample_weights=psw, include_last_offset=True)
    return out


class NumpyLazy:
    """References torch.optim lacks, on the touched rows only (as ekko's kernels):
    FBGEMM's rowwise Adagrad, RMSprop without decaying untouched rows, FTRL."""

    def __init__(self, name: str, model: ekko.CompiledModel, table: str):
        self.name, self.rule = name, model.table(table).update
        rows = ROWS[table]
        self.state = init_state(name, rows, DIM) if name == "rowwise_adagrad" else None
        self.v = np.zeros((rows, DIM), np.float32)
        self.z, self.n = np.zeros((rows, DIM)), np.zeros((rows, DIM))

    def step(self, w: np.ndarray, uniq: np.ndarray, g: np.ndarray) -> np.ndarray:
        h = self.rule.optimizer.value
        if self.name == "rowwise_adagrad":
            return _rowwise_adagrad(w, uniq, g, self.state, self.rule)
        if self.name == "rmsprop":
            a = np.float32(h("alpha"))
            self.v[uniq] = a * self.v[uniq] + (1 - a) * g * g
            out = w.copy()
            out[uniq] -= np.float32(h("lr")) * g / (np.sqrt(self.v[uniq]) + np.float32(h("eps")))
            return out
        out, self.z, self.n = ftrl_reference(w, self.z, self.n, uniq, g, h("lr"), h("l1"),
                                             h("l2"), h("beta"))
        return out.astype(np.float32)


def reference_optimizer(name: str, model: ekko.CompiledModel, weights: dict):
    """A step function applying `name` to every weight that has a (sparse) gradient."""
    h = {t: model.table(t).update.optimizer.value for t in weights}
    if name in ("sgd", "adagrad", "adam"):
        opts = {}
        for t, p in weights.items():
            v = h[t]
            opts[t] = (torch.optim.SGD([p], lr=v("lr")) if name == "sgd" else
                       torch.optim.Adagrad([p], lr=v("lr"), eps=v("eps"), lr_decay=v("lr_decay"))
                       if name == "adagrad" else
                       torch.optim.SparseAdam([p], lr=v("lr"), betas=(v("beta1"), v("beta2")),
                                              eps=v("eps")))
        return lambda: [o.step() for t, o in opts.items() if weights[t].grad is not None]
    lazy = {t: NumpyLazy(name, model, t) for t in weights}

    def step():
        for t, p in weights.items():
            if p.grad is None:
                continue
            g = p.grad.coalesce()
            uniq = g.indices()[0].numpy()
            new = lazy[t].step(p.detach().numpy().copy(), uniq, g.values().numpy())
            with torch.no_grad():
                p.copy_(torch.from_numpy(new))
    return step


def masters(engine) -> dict[str, np.ndarray]:
    return {t: pt.buf.master.copy() for t, pt in engine.primary.tables.items()}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_training_equals_torch_autograd_then_the_optimizer(name: str) -> None:
    model = compiled(OPTIMIZERS[name])
    rng = np.random.default_rng(7)
    with ekko.Engine(model, replicas=2) as engine:
        emb = ekko.torch.EmbeddingBags(engine)
        weights = {t: torch.nn.Parameter(torch.from_numpy(m)) for t, m in masters(engine).items()}
        ref_step = reference_optimizer(name, model, weights)
        issued = {t: engine.primary.issued(t) for t in ROWS}
        for _ in range(4):
            sparse = batch(rng)
            pooled = emb(sparse)
            targets = {k: torch.from_numpy(rng.standard_normal(tuple(o.shape)).astype(np.float32))
                       for k, o in sorted(pooled.items())}
            expected = torch_forward(model, weights, sparse)
            for k in sparse:
                torch.testing.assert_close(pooled[k], expected[k], rtol=2e-6, atol=2e-6)
            loss_of(pooled, targets).backward()
            for p in weights.values():
                p.grad = None
            loss_of(expected, targets).backward()
            ref_step()
            now = masters(engine)
            for t, p in weights.items():
                np.testing.assert_allclose(now[t], p.detach().numpy(), rtol=2e-5, atol=2e-6,
                                           err_msg=f"{name}: table {t}")
        # one engine step per table per backward, though two features read each table
        assert {t: engine.primary.issued(t) - issued[t] for t in ROWS} == {"t": 4, "u": 4}
        engine.flush()
        for replica in engine.replicas:
            for t, rows in ROWS.items():
                got, _ = replica.rows(t, np.arange(rows))
                np.testing.assert_array_equal(got, engine.primary.tables[t].buf.master)


@pytest.fixture(scope="module")
def model() -> ekko.CompiledModel:
    return compiled("adagrad(lr=0.1)")


def untouched(engine, before: dict, issued: dict) -> None:
    """Nothing written, no version spent, no step counted."""
    for t, m in masters(engine).items():
        np.testing.assert_array_equal(m, before[t])
    assert {t: engine.primary.issued(t) for t in ROWS} == issued
    assert engine.stats()["steps"] == 0


def snapshot(engine) -> tuple[dict, dict]:
    return masters(engine), {t: engine.primary.issued(t) for t in ROWS}


def test_no_grad_pools_and_commits_nothing(model) -> None:
    with ekko.Engine(model, replicas=1) as engine:
        emb = ekko.torch.EmbeddingBags(engine)
        before, issued = snapshot(engine)
        sparse = batch(np.random.default_rng(1))
        with torch.no_grad():
            pooled = emb(sparse)
        weights = {t: torch.from_numpy(m) for t, m in before.items()}
        for k, expected in torch_forward(model, weights, sparse).items():
            assert not pooled[k].requires_grad
            torch.testing.assert_close(pooled[k], expected)
        assert pooled["fn"].shape == (9, DIM) and pooled["fs"].shape == (7, DIM)
        untouched(engine, before, issued)


def test_forward_reads_the_master_without_a_copy(model) -> None:
    with ekko.Engine(model, replicas=1) as engine:
        emb = ekko.torch.EmbeddingBags(engine)
        master = engine.primary.tables["t"].buf.master
        assert emb.weight("t").data_ptr() == master.ctypes.data
        ids, offsets = np.array([3, 3, 39]), np.array([0, 3])
        pooled = emb({"fs": (ids, offsets)})["fs"]
        pooled.sum().backward()  # sgd-like direction: the step changes rows 3 and 39 in place
        assert emb.weight("t").data_ptr() == master.ctypes.data
        torch.testing.assert_close(emb({"fs": (ids, offsets)})["fs"][0],
                                   torch.from_numpy(2 * master[3] + master[39]))


BAD = [  # (feature, value, what the message names)
    ("nope", (np.array([1]), np.array([0, 1])), "no feature 'nope'"),
    ("t", (np.array([1]), np.array([0, 1])), "that is a table"),
    ("fs", (np.array([1, 40]), np.array([0, 2])), "id 40 at position 1 is out of range [0, 40)"),
    ("fs", (np.array([-1]), np.array([0, 1])), "id -1 at position 0 is out of range"),
    ("fs", (np.array([1.0]), np.array([0, 1])), "ids must be integers"),
    ("fs", (np.array([[1]]), np.array([0, 1])), "ids must be 1-D"),
    ("fs", (np.array([1, 2]), np.array([0, 1])), "end at the number of ids (2)"),
    ("fs", (np.array([1, 2]), np.array([1, 2])), "start at 0"),
    ("fs", (np.array([1, 2]), np.array([0, 2, 1, 2])), "offsets decrease at position 2"),
    ("fs", (np.array([1, 2]), np.array([], np.int64)), "offsets must have B+1 entries"),
    ("fs", np.array([1, 2]), "expected (ids, offsets)"),
    ("fm", (np.array([1]), np.array([0, 1]), np.ones(1, np.float32)),
     'per-sample weights need mode "sum"'),
    ("fw", (np.array([1, 2]), np.array([0, 2]), np.ones(3, np.float32)), "one per id (2)"),
    ("fw", (np.array([1, 2]), np.array([0, 2]), np.array([1.0, np.nan])), "must be finite"),
    ("fw", (np.array([1, 2]), np.array([0, 2]), np.array([1, 2])), "1-D floats"),
    ("fw", (np.array([1, 2]), np.array([0, 2]), torch.ones(2, requires_grad=True)),
     "require grad"),
    ("fn", (np.array([1, 25]), np.array([0, 2])), "id 25 at position 1 is out of range [0, 25)"),
]


@pytest.mark.parametrize("feature,value,why", BAD)
def test_bad_input_is_refused_before_anything_is_written(model, feature, value, why) -> None:
    with ekko.Engine(model, replicas=1) as engine:
        emb = ekko.torch.EmbeddingBags(engine)
        before, issued = snapshot(engine)
        good = {"fs": (np.array([1, 2]), np.array([0, 1, 2]))}
        with pytest.raises(ekko.EkkoError) as e:
            emb({**good, feature: value})
        assert why in str(e.value)
        untouched(engine, before, issued)


def test_a_non_mapping_input_and_a_remote_engine_are_refused(model) -> None:
    with ekko.Engine(model, replicas=1) as engine:
        with pytest.raises(ekko.EkkoError, match="KeyedJaggedTensor, got list"):
            ekko.torch.EmbeddingBags(engine)([1, 2])
    with pytest.raises(ekko.EkkoError, match="in-process ekko.Engine"):
        ekko.torch.EmbeddingBags(model)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("poisoned", ["fm", "fn", "fw"])
def test_a_non_finite_gradient_is_refused_whole(model, bad: float, poisoned: str) -> None:
    """A NaN in one table's gradient refuses every table of the backward: nothing is
    written and no version is spent, also on the table whose gradient was finite.
    fm: table t alone (its kernel refuses); fn, fw: table u, after t's finite fs."""
    with ekko.Engine(model, replicas=1) as engine:
        emb = ekko.torch.EmbeddingBags(engine)
        before, issued = snapshot(engine)
        sparse = batch(np.random.default_rng(2))
        if poisoned == "fm":
            sparse = {k: v for k, v in sparse.items() if k in ("fs", "fm")}
        pooled = emb(sparse)
        loss = sum(o.sum() for k, o in pooled.items() if k != poisoned) \
            + (pooled[poisoned] * bad).sum()
        with pytest.raises(ekko.EkkoError, match="non-finite gradient"):
            loss.backward()
        untouched(engine, before, issued)
        # the module still trains afterwards
        emb(sparse)["fs"].sum().backward()
        assert engine.primary.issued("t") == issued["t"] + 1


def test_finite_gradients_whose_weighted_rows_overflow_are_refused_whole(model) -> None:
    """A finite output gradient times a finite per-sample weight can be inf: the
    weighted rows themselves are checked."""
    with ekko.Engine(model, replicas=1) as engine:
        emb = ekko.torch.EmbeddingBags(engine)
        before, issued = snapshot(engine)
        ids, offsets = np.array([1, 2]), np.array([0, 2])
        pooled = emb({"fs": (ids, offsets), "fw": (ids, offsets, np.full(2, 1e30, np.float32))})
        loss = pooled["fs"].sum() + (pooled["fw"] * 1e30).sum()  # d loss / d fw = 1e30
        with pytest.raises(ekko.EkkoError, match="non-finite gradient"):
            loss.backward()
        untouched(engine, before, issued)


def test_the_finite_check_of_a_gathered_delta_is_exact_at_the_overflow_edge() -> None:
    """gathered_finite never writes the rows out: it must still say what writing them
    out would show, also for products that round to f32's largest value or to inf."""
    from ekko.engine import Gathered
    from ekko.torch import gathered_finite

    big = np.float32(np.finfo(np.float32).max)
    edge = [np.float32(1.0), np.nextafter(np.float32(1.0), np.float32(2)),
            np.nextafter(np.float32(1.0), np.float32(0)), np.float32(1.0000001)]
    rng = np.random.default_rng(0)
    cases = [(big, w) for w in edge] + [(np.float32(2.0 ** 64), np.float32(2.0 ** 64)),
                                        (np.float32(2.0 ** 64), np.float32(2.0 ** 63)),
                                        (np.float32(-3e38), np.float32(-1.2)),
                                        (np.float32(np.inf), np.float32(0.5)),
                                        (np.float32(1.0), np.float32(np.nan))]
    cases += [(np.float32(x), np.float32(w)) for x, w in
              zip(rng.uniform(1e18, 1e20, 200), rng.uniform(1e18, 1e20, 200))]
    for x, w in cases:
        rows = np.array([[1.0, x], [0.5, 0.25]], np.float32)
        g = Gathered(rows, np.array([1, 0, 0]), np.array([3.0, w, 1.0], np.float32))
        with np.errstate(over="ignore", invalid="ignore"):
            truth = bool(np.isfinite(g.expand()).all())
        assert gathered_finite(g) == truth, (x, w)
    assert gathered_finite(Gathered(np.ones((2, 3), np.float32), np.array([0, 1, 1])))
    assert not gathered_finite(Gathered(np.full((2, 3), np.nan, np.float32), np.array([0])))


def test_an_unused_output_adds_nothing(model) -> None:
    """Only tables whose outputs reach the loss are stepped (torch gives the others no grad)."""
    with ekko.Engine(model, replicas=1) as engine:
        emb = ekko.torch.EmbeddingBags(engine)
        before, issued = snapshot(engine)
        pooled = emb(batch(np.random.default_rng(3)))
        pooled["fn"].sum().backward()
        assert engine.primary.issued("t") == issued["t"]
        assert engine.primary.issued("u") == issued["u"] + 1
        np.testing.assert_array_equal(masters(engine)["t"], before["t"])


def test_keyed_jagged_tensor_input_equals_the_dict() -> None:
    torchrec = pytest.importorskip("torchrec")
    kjt_cls = torchrec.sparse.jagged_tensor.KeyedJaggedTensor
    rng = np.random.default_rng(4)
    sparse = batch(rng)
    keys = ["fs", "fw"]
    weighted = {k: sparse[k] for k in keys}
    lengths = torch.cat([torch.as_tensor(np.diff(np.asarray(weighted[k][1]))) for k in keys])
    kjt = kjt_cls.from_lengths_sync(
        keys=keys, values=torch.cat([torch.as_tensor(weighted[k][0]) for k in keys]),
        lengths=lengths,
        weights=torch.cat([torch.ones(len(weighted["fs"][0])), torch.as_tensor(weighted["fw"][2])]))
    results = []
    for value in (kjt, {"fs": (*sparse["fs"], np.ones(len(sparse["fs"][0]), np.float32)),
                        "fw": sparse["fw"]}):
        with ekko.Engine(compiled("adagrad(lr=0.1)"), replicas=1) as engine:
            emb = ekko.torch.EmbeddingBags(engine)
            pooled = emb(value)
            loss_of(pooled, {k: torch.ones_like(o) for k, o in pooled.items()}).backward()
            results.append(({k: o.detach() for k, o in pooled.items()}, masters(engine)))
    (kjt_out, kjt_rows), (dict_out, dict_rows) = results
    assert sorted(kjt_out) == keys
    for k in keys:
        torch.testing.assert_close(kjt_out[k], dict_out[k], rtol=0, atol=0)
    for t in ROWS:
        np.testing.assert_array_equal(kjt_rows[t], dict_rows[t])


@pytest.mark.parametrize("dtype,rtol", [("f16", 2e-3), ("bf16", 1e-2)])
def test_half_precision_masters_pool_in_f32_and_train(dtype: str, rtol: float) -> None:
    """f16 / bf16 masters are pooled by the kernel of their dtype (f32 output) and
    updated as torch would update the widened table, to the dtype's rounding."""
    model = ekko.compile_model(parse_model(
        f"model h {{ defaults {{ dim {DIM}; dtype {dtype}; optimizer sgd(lr=0.5); }} "
        "table t { rows 20; } feature f -> t pooling mean; feature w -> t; "
        "feature n -> t pooling none; }"))
    ids, offsets = np.array([1, 1, 19, 0, 1]), np.array([0, 3, 3, 5])
    sparse = {"f": (ids, offsets), "w": (ids, offsets, np.arange(1, 6, dtype=np.float32)),
              "n": ids}
    with ekko.Engine(model, replicas=1) as engine:
        emb = ekko.torch.EmbeddingBags(engine)
        w = torch.nn.Parameter(emb.weight("t").float().clone())
        pooled = emb(sparse)
        expected = torch_forward(model, {"t": w}, sparse)
        for k in sparse:
            assert pooled[k].dtype == torch.float32
            torch.testing.assert_close(pooled[k], expected[k], rtol=1e-6, atol=1e-6)
        sum((o * o).sum() for o in pooled.values()).backward()
        sum((o * o).sum() for o in expected.values()).backward()
        with torch.no_grad():
            w -= 0.5 * w.grad.to_dense()
        torch.testing.assert_close(emb.weight("t").float(), w.detach(), rtol=rtol, atol=1e-3)
        assert engine.primary.issued("t") == 1


def test_without_torch_the_import_says_what_to_install(monkeypatch) -> None:
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    monkeypatch.delitem(sys.modules, "ekko.torch")
    monkeypatch.delattr(ekko, "torch", raising=False)
    with pytest.raises(ImportError, match=r"ekko.torch needs PyTorch: pip install 'ekko\[torch\]'"):
        importlib.import_module("ekko.torch")
