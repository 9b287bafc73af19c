"""The fuzz harness in CI: a short seeded campaign and every stored regression case.

The campaign draws the same cases on every run (fixed seeds). Every failure
fails it, a failure like a stored case too (that case replays as fixed, so
this one is a regression), except one whose signature a stored case marks
`"xfail": "<reason>"`: a known failure, not fixed yet, which makes the test
an explicit xfail naming that reason. `python -m tests.fuzz` writes new
failing cases under tests/fuzz/regressions/.
"""

from __future__ import annotations

import json

import pytest

from tests.fuzz import load_regressions, signature
from tests.fuzz.__main__ import draw
from tests.fuzz.oracle import judge_tool, run_case, shutdown

# cases per target: sized for well under a minute on a loaded 2-core machine
SHORT = {"ir": 120, "model": 120, "api": 50, "cli": 4, "durable": 100, "engine": 30}


@pytest.fixture(scope="module", autouse=True)
def _worker():
    yield
    shutdown()


@pytest.mark.parametrize("target", sorted(SHORT))
def test_short_campaign(target: str) -> None:
    failures, known = [], set()
    for index in range(SHORT[target]):
        _, case = draw(20261128, index, [target])
        result = run_case(case)
        if result["kind"] == "ok":
            continue
        reason = known_failure(signature(case, result))
        if reason is not None:
            known.add(reason)
        else:
            failures.append(f"{result['kind']}: {result.get('detail', '')[-400:]}\n"
                            f"case: {json.dumps(case)[:2000]}")
    assert not failures, f"{len(failures)} failures:\n\n" + "\n\n".join(failures[:5])
    if known:
        pytest.xfail("known failures (stored xfail cases): " + "; ".join(sorted(known)))


def known_failure(sig: str) -> str | None:
    """The xfail reason of the stored case with signature `sig`, or None: a failure
    like a case stored without one is a regression, not something to skip."""
    for _, record in load_regressions():
        if record.get("signature") == sig and "xfail" in record:
            return str(record["xfail"])
    return None


def test_only_an_xfail_case_excuses_a_campaign_failure(tmp_path, monkeypatch) -> None:
    """A stored case that replays as fixed excuses nothing; one marked xfail
    excuses failures with its signature, naming its reason."""
    import tests.fuzz as fuzz

    monkeypatch.setattr(fuzz, "REGRESSIONS", tmp_path)
    case, result = {"target": "cli"}, {"kind": "traceback", "detail": "Boom 1"}
    fuzz.save_regression(case, result)
    assert known_failure(signature(case, result)) is None
    path = next(tmp_path.glob("*.json"))
    record = json.loads(path.read_text())
    path.write_text(json.dumps(dict(record, xfail="issue 99: not fixed yet")))
    assert known_failure(signature(case, {"kind": "traceback", "detail": "Boom 7"})) == \
        "issue 99: not fixed yet"
    assert known_failure(signature(case, {"kind": "crash", "detail": "Boom 7"})) is None


def test_a_stored_case_names_no_path_of_this_machine(tmp_path, monkeypatch) -> None:
    """A regression file goes into the repository: its traceback names files relative to
    the checkout and to site-packages/, not where this machine keeps them."""
    import tests.fuzz as fuzz

    for path, _ in load_regressions():
        assert str(fuzz.CHECKOUT) not in path.read_text(), path.name
    monkeypatch.setattr(fuzz, "REGRESSIONS", tmp_path)
    detail = (f'  File "{fuzz.CHECKOUT}/kernels/update.py", line 3, in run\n'
              '  File "/opt/venv/lib/python3.11/site-packages/triton/jit.py", line 9\n')
    fuzz.save_regression({"target": "api"}, {"kind": "exception", "detail": detail})
    stored = json.loads(next(tmp_path.glob("*.json")).read_text())["found"]["detail"]
    assert stored == ('  File "kernels/update.py", line 3, in run\n'
                      '  File "site-packages/triton/jit.py", line 9\n')


def _regression_params():
    params = []
    for path, record in load_regressions():
        xfail = "xfail" in record
        marks = [pytest.mark.xfail(strict=True, reason=record["xfail"])] if xfail else []
        params.append(pytest.param(record, id=path.stem, marks=marks))
    return params


@pytest.mark.parametrize("record", _regression_params())
def test_regression(record: dict) -> None:
    """Every failure the harness ever found, replayed: now it must behave."""
    result = run_case(record["case"])
    assert result["kind"] == "ok", f"{result['kind']}: {result.get('detail', '')[-1500:]}"


def test_the_oracle_flags_what_it_must(tmp_path) -> None:
    """The judge of tool runs: located errors pass; tracebacks, bare errors, odd exits fail."""
    path = str(tmp_path / "x.mlir")
    assert judge_tool(0, "ok", "", path)["kind"] == "ok"
    assert judge_tool(1, "", f"{path}:3:4: error: bad\n", path)["kind"] == "ok"
    assert judge_tool(1, "", "error: bad\n", path)["kind"] == "unlocated"
    assert judge_tool(1, "", f"{path}:3:4: error:  \n", path)["kind"] == "unlocated"
    assert judge_tool(1, "", "Traceback (most recent call last):\n", path)["kind"] == "traceback"
    assert judge_tool(-11, "", "", path)["kind"] == "exit-code"
    assert judge_tool(1, "", "ekko-opt: internal error: X\n", path)["kind"] == "internal-error"
