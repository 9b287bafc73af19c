"""The fuzz harness in CI: a short seeded campaign and every stored regression case.

The campaign draws the same cases on every run (fixed seeds). A failure
whose signature matches a stored regression case is that case's to report
(it may be a known, not yet fixed failure marked xfail there); any other
failure fails this test with the case to store: `python -m tests.fuzz`
writes such cases under tests/fuzz/regressions/.
"""

from __future__ import annotations

import json

import pytest

from tests.fuzz import load_regressions, signature
from tests.fuzz.__main__ import draw
from tests.fuzz.oracle import judge_tool, run_case, shutdown

# cases per target: sized for well under a minute on a loaded 2-core machine
SHORT = {"ir": 120, "model": 120, "api": 50, "cli": 4, "engine": 30}


@pytest.fixture(scope="module", autouse=True)
def _worker():
    yield
    shutdown()


@pytest.mark.parametrize("target", sorted(SHORT))
def test_short_campaign(target: str) -> None:
    known = {record.get("signature") for _, record in load_regressions()}
    failures = []
    for index in range(SHORT[target]):
        _, case = draw(20261128, index, [target])
        result = run_case(case)
        if result["kind"] != "ok" and signature(case, result) not in known:
            failures.append(f"{result['kind']}: {result.get('detail', '')[-400:]}\n"
                            f"case: {json.dumps(case)[:2000]}")
    assert not failures, f"{len(failures)} new failures:\n\n" + "\n\n".join(failures[:5])


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
