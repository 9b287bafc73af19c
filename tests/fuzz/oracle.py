"""Running a case and judging the outcome.

`run_case` sends `ir`, `model`, `api` and `engine` cases to a worker process, so that
a crash (SIGSEGV, an LLVM abort) or a hang is seen as such and the
campaign goes on with a fresh worker; `cli` cases run the real commands.
A result is `{"kind": "ok"}` or `{"kind": <failure kind>, "detail": ...}`.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from ekko.compiler.frontend.errors import WIDTH

from . import REPO

TIMEOUT_S = {"ir": 30.0, "model": 30.0, "api": 60.0, "durable": 60.0, "engine": 120.0}


class Worker:
    """One worker process (`python -m tests.fuzz.worker`), restarted after a crash or hang."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr = tempfile.TemporaryFile()

    def _start(self) -> subprocess.Popen:
        self.stderr.seek(0)
        self.stderr.truncate()
        self.lines = queue.Queue()
        proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz.worker"], cwd=REPO,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=self.stderr, text=True, bufsize=1)
        assert proc.stdout is not None
        threading.Thread(target=_pump, args=(proc.stdout, self.lines), daemon=True).start()
        return proc

    def run(self, case: dict, timeout: float) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(case) + "\n")
            self.proc.stdin.flush()
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.close()
            return {"kind": "hang", "detail": f"no answer in {timeout:.0f} s"}
        except (BrokenPipeError, OSError):
            line = None
        if line is None:
            return self._crashed()
        return json.loads(line)

    def _crashed(self) -> dict:
        assert self.proc is not None
        try:  # its stdout closed; a worker that does not exit as well is killed
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.stderr.seek(0)
        tail = self.stderr.read()[-1500:].decode("utf-8", "replace")
        self.proc = None
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        return {"kind": "crash", "detail": f"worker died ({how})\n{tail}"}

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


_worker: Worker | None = None


def run_case(case: dict) -> dict:
    """Run one case of any target and judge it."""
    global _worker
    if case["target"] == "cli":
        from .gen_cli import run

        return run(case)
    if _worker is None:
        _worker = Worker()
    return _worker.run(case, TIMEOUT_S[case["target"]])


def shutdown() -> None:
    global _worker
    if _worker is not None:
        _worker.close()
        _worker = None


atexit.register(shutdown)


# ------------------------------------------------------------ judging tools


def judge_tool(rc: int, out: str, err: str, path: str, text: str | None = None) -> dict:
    """ekko-opt's outcome on an input file: exit 0, or exit 1 with a located error
    that quotes the line it names (when the input `text` is known)."""
    if "Traceback" in err or "Traceback" in out:
        return {"kind": "traceback", "detail": err[-1500:]}
    if "internal error" in err:
        return {"kind": "internal-error", "detail": err[-1500:]}
    if rc not in (0, 1):
        return {"kind": "exit-code", "detail": f"exit {rc}\n{err[-1500:]}"}
    if rc == 1:
        first = err.lstrip("\n").split("\n", 1)[0]
        located = re.match(rf"^{re.escape(path)}:\d+:\d+: error: \S", first)
        not_text = first.startswith(f"{path}: error: input is not UTF-8")
        if not (located or not_text):
            return {"kind": "unlocated", "detail": err[-1500:]}
        if located and text is not None and not _quotes_its_line(err, path, text):
            return {"kind": "wrong-line", "detail": err[-1500:]}
    return {"kind": "ok"}


def _quotes_its_line(err: str, path: str, text: str) -> bool:
    """Whether the line printed under `file:line:col: error:` is that line of the input."""
    lines = err.lstrip("\n").split("\n")
    line = int(re.match(rf"^{re.escape(path)}:(\d+):", lines[0]).group(1))
    source = text.split("\n")
    if len(lines) < 2 or not 0 < line <= len(source) + 1:
        return True  # nothing quoted, or a position past the end (end of file)
    want = source[line - 1].rstrip("\r") if line <= len(source) else ""
    quoted = lines[1].rstrip("\r")
    if quoted == want or quoted.strip() == "":
        return True
    core = quoted.removeprefix("...").removesuffix("...")  # a long line's window
    return len(want) > WIDTH and len(core) == WIDTH and core in want


def run_tool(argv: list[str], timeout: float,
             cwd: str | Path | None = None) -> tuple[int, str, str]:
    """Run a command; (exit code, stdout, stderr), -9 and a note on a timeout."""
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                           env=env, errors="replace")
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode("utf-8", "replace") if isinstance(e.stderr, bytes) else e.stderr
        return -9, "", f"TIMEOUT after {timeout:.0f} s\n{err or ''}"
    return r.returncode, r.stdout, r.stderr
