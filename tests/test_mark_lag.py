"""A lagged healthy mark: a failed check goes back `mark_lag` passing checks.

A slow harm (a poisoned burst) can pass a check or two before it shows; with
mark_lag=1 the mark moves into it and a rollback returns to a poisoned
state. The undo log keeps one epoch per mark, so going further back costs
only the rows changed since the oldest mark kept.
"""

from __future__ import annotations

import numpy as np
import pytest

import ekko
from ekko.engine import HealthConfig
from ekko.engine.primary import UndoLog
from ekko.kernels.errors import EkkoError

MODEL = """
model lag {
  defaults { dim 4; dtype f32; optimizer sgd(lr=0.5); }
  table a { rows 50; serving f32; }
  table b { rows 20; serving int8; }
  feature fa -> a pooling sum;
  feature fb -> b pooling sum;
}
"""


@pytest.fixture()
def model(tmp_path):
    path = tmp_path / "lag.ekko"
    path.write_text(MODEL)
    return path


def test_the_undo_log_goes_back_to_its_oldest_epoch() -> None:
    rows = np.arange(10, dtype=np.float32)[:, None].repeat(3, 1)
    log = UndoLog(10, keep=2)
    history = [rows.copy()]
    for k, ids in enumerate(([1, 2], [2, 3], [3, 4, 9])):
        ids = np.array(ids)
        log.save(ids, [rows])
        rows[ids] += 100 * (k + 1)
        log.mark(k + 1)
        history.append(rows.copy())
    # keep=2: the epochs since marks 2 and 3 are kept; the rows go back to mark 2's state
    assert log.starts == [2, 3]
    restored = log.restore([rows])
    assert np.array_equal(rows, history[2]) and sorted(restored.tolist()) == [3, 4, 9]
    assert not log.chunks and log.rows == 0


def _engine(model, lag: int, verdicts: list[bool]):
    def score(replica) -> bool:
        return verdicts.pop(0)
    return ekko.Engine(model, replicas=1, health=HealthConfig(score=score, mark_lag=lag))


@pytest.mark.parametrize("lag", [1, 2, 3])
def test_a_failed_check_goes_back_lag_passing_checks(model, lag) -> None:
    rng = np.random.default_rng(lag)
    verdicts = [True, True, True, False, True]
    with _engine(model, lag, verdicts) as engine:
        states = [engine.primary.serving("a").copy()]
        for _ in range(3):  # three steps, each followed by a passing check (a mark)
            ids = rng.integers(0, 50, 12)
            engine.step("a", ids, rng.standard_normal((12, 4)).astype(np.float32))
            engine.step("b", ids % 20, rng.standard_normal((12, 4)).astype(np.float32))
            assert engine.check()
            states.append(engine.primary.serving("a").copy())
        engine.step("a", np.arange(50), np.ones((50, 4), np.float32))  # the harm
        assert not engine.check()
        # back to the mark `lag` passing checks ago (the state after step 3 - lag + 1)
        assert np.array_equal(engine.primary.serving("a"), states[3 - lag + 1])
        engine.flush()
        assert np.array_equal(engine.replicas[0].serving("a"), states[3 - lag + 1])
        assert engine.check()  # the restored state passes, and marks anew
        rolled = engine.stats()["rollbacks"]
        # b changed before the last mark only: rolled back only when the lag reaches past it
        assert {r["table"] for r in rolled} == ({"a", "b"} if lag > 1 else {"a"})


def test_mark_lag_is_checked(model) -> None:
    for bad in (0, -1, 65, True, 1.5):
        with pytest.raises(EkkoError, match="mark_lag"):
            ekko.Engine(model, health=HealthConfig(mark_lag=bad))


def test_update_norms_of_gradients_near_f32s_limit_stay_finite_and_exact() -> None:
    from ekko.engine.primary import squared_norms

    rng = np.random.default_rng(0)
    grads = rng.standard_normal((300, 7)).astype(np.float32)
    grads[[3, 200]] = 3e38  # finite, but their f32 squares overflow
    got = squared_norms(grads)
    want = (grads.astype(np.float64) ** 2).sum(1)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert squared_norms(np.zeros((0, 4), np.float32)).shape == (0,)


def test_a_table_that_did_not_change_goes_back_to_the_same_check(model) -> None:
    """Marks count checks, not changes: b changes only before the first of two later
    checks; with mark_lag=2 a rollback takes b back to the check two ago, not further."""
    rng = np.random.default_rng(9)
    verdicts = [True, True, True, False]
    with _engine(model, 2, verdicts) as engine:
        engine.step("b", np.arange(20), rng.standard_normal((20, 4)).astype(np.float32))
        assert engine.check()  # mark 1
        engine.step("b", np.arange(20), rng.standard_normal((20, 4)).astype(np.float32))
        assert engine.check()  # mark 2: the one a rollback returns to
        at_mark2 = engine.primary.serving("b").copy()
        engine.step("a", np.arange(5), np.ones((5, 4), np.float32))
        assert engine.check()  # mark 3: b unchanged since mark 2
        engine.step("a", np.arange(5), np.ones((5, 4), np.float32))
        assert not engine.check()
        assert np.array_equal(engine.primary.serving("b"), at_mark2)
