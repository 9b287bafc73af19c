"""The set-up scripts pick one Python the way the README says: $PYTHON, else
the active virtual environment, else the repository's .venv/ (made on first use)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV", "CONDA_PREFIX")}
    env.update(extra)
    return env


def _pick(repo: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, "-c", 'set -euo pipefail; source scripts/env.sh; echo "$PY"; '
                           'echo "${PATH%%:*}"'],
                          cwd=repo, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "env.sh", tmp_path / "scripts" / "env.sh")
    return tmp_path


def test_scripts_are_valid_bash() -> None:
    for script in [*(ROOT / "scripts").glob("*.sh"), ROOT / ".ci" / "run"]:
        res = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
        assert res.returncode == 0, (script, res.stderr)


def test_no_active_environment_uses_the_repository_venv(repo: Path) -> None:
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "python").symlink_to(sys.executable)  # as if made before
    res = _pick(repo, _env())
    assert res.returncode == 0, res.stderr
    py, first_on_path = res.stdout.split()
    assert py == str(repo / ".venv" / "bin" / "python")
    scripts = subprocess.run([py, "-c", "import sysconfig; "
                              "print(sysconfig.get_path('scripts'))"],
                             capture_output=True, text=True).stdout.strip()
    assert first_on_path == scripts  # ekko, ekko-opt, lit, filecheck of that Python


def test_python_and_active_environments_win(repo: Path) -> None:
    assert _pick(repo, _env(PYTHON=sys.executable)).stdout.split()[0] == sys.executable
    active = _pick(repo, _env(VIRTUAL_ENV=str(Path(sys.executable).parent.parent)))
    assert active.stdout.split()[0] == "python3" and not (repo / ".venv").exists()


def test_no_suitable_python_is_a_clear_error(repo: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    res = _pick(repo, _env(PATH=str(empty)))
    assert res.returncode != 0 and "needs Python >= 3.11" in res.stderr
    assert not (repo / ".venv").exists()


def test_test_sh_removes_its_kernel_cache_and_keeps_the_exit_code(repo: Path) -> None:
    """scripts/test.sh makes a fresh kernel cache per run and removes it on exit."""
    shutil.copy(ROOT / "scripts" / "test.sh", repo / "scripts" / "test.sh")
    (repo / "scripts" / "setup.sh").write_text("exit 0\n")  # nothing to install here
    fake = repo / "fake-python"  # stands in for "$PY -m pytest": fills the cache, then fails
    fake.write_text('#!/usr/bin/env bash\n'
                    'if [ "${1:-}" = "-c" ]; then exec python3 "$@"; fi\n'
                    'echo "$EKKO_CACHE_DIR"; touch "$EKKO_CACHE_DIR/kernel.o"; exit 3\n')
    fake.chmod(0o755)
    env = {k: v for k, v in _env(PYTHON=str(fake)).items() if k != "EKKO_CACHE_DIR"}
    res = subprocess.run([BASH, "scripts/test.sh"], cwd=repo, env=env, capture_output=True,
                         text=True, stdin=subprocess.DEVNULL)
    assert res.returncode == 3, res.stderr
    cache = Path(res.stdout.split()[-1])
    assert cache.name.startswith("ekko-test-cache") and not cache.exists()
