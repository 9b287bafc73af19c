"""The disk cache of compiled kernels survives damage: verified, then rebuilt.

Each case damages the entries one way (truncated, bytes flipped, two entries
swapped, a file that is no object at all, an entry of the old headerless
format), then a fresh process loads the kernels. The process runs in a
subprocess so that an LLVM abort (SIGABRT) or a crash shows as a failed
exit code rather than killing pytest. It must return the right results,
rebuild (not load) the damaged entries, and leave verified entries behind
that a third process loads from disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# Two tiny kernels, f(x) = x * K, so a swapped entry would return the other K.
PROBE = r"""
import ctypes, json, sys
from ekko.kernels import jit

IR = '''define i64 @times(i64 %x) {
  %y = mul i64 %x, {K}
  ret i64 %y
}
'''
out = {}
for k in (3, 5):
    module = jit.compile_ir(IR.replace("{K}", str(k)))
    f = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int64)(module.address("times"))
    out[str(k)] = {"result": f(7), "from_disk": module.from_disk, "key": module.key}
print(json.dumps(out))
"""


def probe(cache: Path) -> dict[str, dict]:
    env = {**os.environ, "EKKO_CACHE_DIR": str(cache)}
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    return json.loads(result.stdout)


def entries(cache: Path, report: dict[str, dict]) -> dict[str, Path]:
    return {k: cache / "kernels" / f"{v['key']}.o" for k, v in report.items()}


def truncate(paths: dict[str, Path]) -> None:
    data = paths["3"].read_bytes()
    paths["3"].write_bytes(data[: len(data) // 2])


def flip_bytes(paths: dict[str, Path]) -> None:
    data = bytearray(paths["3"].read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF
    paths["3"].write_bytes(bytes(data))


def flip_header(paths: dict[str, Path]) -> None:
    data = bytearray(paths["3"].read_bytes())
    data[3] ^= 0x01
    paths["3"].write_bytes(bytes(data))


def swap(paths: dict[str, Path]) -> None:
    a, b = paths["3"].read_bytes(), paths["5"].read_bytes()
    paths["3"].write_bytes(b)
    paths["5"].write_bytes(a)


def not_an_object(paths: dict[str, Path]) -> None:
    paths["3"].write_bytes(b"this is not an object file\n" * 40)


def empty(paths: dict[str, Path]) -> None:
    paths["3"].write_bytes(b"")


def headerless_object(paths: dict[str, Path]) -> None:
    """A bare ELF object (the format before entries had a header): not trusted."""
    data = paths["5"].read_bytes()
    elf = data.index(b"\x7fELF")
    paths["3"].write_bytes(data[elf:])


DAMAGE: dict[str, tuple[Callable[[dict[str, Path]], None], set[str]]] = {
    "truncated": (truncate, {"3"}),
    "flipped bytes": (flip_bytes, {"3"}),
    "flipped header": (flip_header, {"3"}),
    "two entries swapped": (swap, {"3", "5"}),
    "not an object": (not_an_object, {"3"}),
    "empty": (empty, {"3"}),
    "headerless object of another kernel": (headerless_object, {"3"}),
}


@pytest.fixture(scope="module")
def good_cache(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    cache = tmp_path_factory.mktemp("cache")
    first = probe(cache)
    assert {k: v["result"] for k, v in first.items()} == {"3": 21, "5": 35}
    assert not any(v["from_disk"] for v in first.values())
    return cache, first


def test_a_good_entry_loads_from_disk(good_cache) -> None:
    cache, _ = good_cache
    again = probe(cache)
    assert all(v["from_disk"] for v in again.values())
    assert {k: v["result"] for k, v in again.items()} == {"3": 21, "5": 35}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_damaged_entries_are_rebuilt(how: str, good_cache, tmp_path: Path) -> None:
    source, report = good_cache
    cache = tmp_path / "cache"
    (cache / "kernels").mkdir(parents=True)
    for path in entries(source, report).values():
        (cache / "kernels" / path.name).write_bytes(path.read_bytes())
    paths = entries(cache, report)
    damage, damaged = DAMAGE[how]
    before = {k: p.read_bytes() for k, p in paths.items()}
    damage(paths)
    assert any(paths[k].read_bytes() != before[k] for k in damaged)

    after = probe(cache)  # a crash or an LLVM abort fails here
    assert {k: v["result"] for k, v in after.items()} == {"3": 21, "5": 35}
    assert {k for k, v in after.items() if not v["from_disk"]} == damaged
    for k in damaged:  # rewritten as a verified entry
        assert paths[k].read_bytes() == before[k]

    third = probe(cache)
    assert all(v["from_disk"] for v in third.values())
    assert {k: v["result"] for k, v in third.items()} == {"3": 21, "5": 35}


def test_update_kernel_survives_a_damaged_entry(tmp_path: Path) -> None:
    """The real path: an update kernel whose cached object was overwritten."""
    script = r"""
import numpy as np, ekko
k = ekko.update_kernel("sgd", 8, lr=0.5)
table = np.ones((4, 8), np.float32)
k(table, np.array([1, 1, 3]), np.ones((3, 8), np.float32))
print(table[:, 0].tolist())
"""
    env = {**os.environ, "EKKO_CACHE_DIR": str(tmp_path)}

    def run() -> str:
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           env=env, timeout=300)
        assert r.returncode == 0, f"exit {r.returncode}\n{r.stderr[-3000:]}"
        return r.stdout.strip()

    expected = "[1.0, 0.0, 1.0, 0.5]"
    assert run() == expected
    objects = list((tmp_path / "kernels").glob("*.o"))
    assert objects
    for path in objects:
        data = bytearray(path.read_bytes())
        data[len(data) // 2:] = b"\xcc" * (len(data) - len(data) // 2)
        path.write_bytes(bytes(data))
    assert run() == expected
    assert run() == expected
