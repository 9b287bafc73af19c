"""Schedule choices measured on this machine, kept beside the compiled kernels.

Some of a kernel's best settings are properties of the host, not of the
kernel: how many rows ahead a CPU update should ask for depends on how long
this machine's memory takes to answer a random row (on two hosts of the same
2-core VM type, 16 positions beat 8 by 13-34% on one and lost by 7% on the
other; docs/backends.md). `ekko tune` (ekko.kernels.tune) measures them and
`record` writes them here; upd-schedule reads them through the LLVM target's
launch settings, so every kernel compiled afterwards on this machine uses
them. A choice is kept per host CPU (LLVM's name and features): a cache
folder copied to another kind of machine is not believed.

The store is `<cache root>/tuning.json` (the root is EKKO_CACHE_DIR, else
~/.cache/ekko; the kernels live in `<root>/kernels`). EKKO_TUNING=off, or
EKKO_CACHE_DIR=off, leaves every choice to the built-in rules: the test
suites set it, so their expected IR does not depend on the machine.
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
from pathlib import Path

from ...dialects.limits import MAX_DIM, MAX_PREFETCH

STORE = "tuning.json"
FORMAT = 1  # bumped when the file's meaning changes: an older file is ignored


def cache_root() -> Path | None:
    """EKKO_CACHE_DIR, else ~/.cache/ekko; None when EKKO_CACHE_DIR=off."""
    env = os.environ.get("EKKO_CACHE_DIR")
    if env == "off":
        return None
    return Path(env) if env else Path.home() / ".cache" / "ekko"


def store_path() -> Path | None:
    """Where the tuned choices are read and written; None when tuning is off."""
    root = cache_root()
    if root is None or os.environ.get("EKKO_TUNING") == "off":
        return None
    return root / STORE


@functools.cache
def host_key() -> str:
    """The CPU the choices were measured on (what the kernel cache keys on too)."""
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    return f"{llvm.get_host_cpu_name()};{llvm.get_host_cpu_features().flatten()}"


def _read(path: Path) -> dict:
    """The store's contents for this host, or {} (absent, unreadable, another host's)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("host") != host_key():
        return {}
    return data


def _prefetch_table(data: dict) -> dict[int, int]:
    """The store's valid (dim -> distance) entries; anything else in it is ignored."""
    table = data.get("prefetch")
    out: dict[int, int] = {}
    for key, value in (table.items() if isinstance(table, dict) else ()):
        try:
            d, v = int(key), int(value)
        except (TypeError, ValueError):
            continue
        if 1 <= d <= MAX_DIM and 1 <= v <= MAX_PREFETCH:
            out[d] = v
    return out


def tuned_prefetch(dim: int) -> int | None:
    """The measured prefetch distance for rows of `dim` values, or None.

    A dim that was not measured takes the nearest measured one within a
    factor of two (the distance follows the row's bytes), else None.
    """
    path = store_path()
    if path is None:
        return None
    best: tuple[float, int] | None = None
    for d, v in _prefetch_table(_read(path)).items():
        gap = abs(math.log2(d / dim))
        if gap <= 1 and (best is None or gap < best[0]):
            best = (gap, v)
    return best[1] if best else None


def writable_store() -> Path:
    """The store's path, once its folder is known to take a new file (before a
    tuning run spends minutes measuring); ValueError saying why not."""
    path = store_path()
    if path is None:
        raise ValueError("tuning is off (EKKO_TUNING=off or EKKO_CACHE_DIR=off): nowhere to record")
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"{path.parent} cannot hold {STORE}: it is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tuning-"):
            pass
    except OSError as e:
        raise ValueError(f"{path.parent} cannot hold {STORE}: {e.strerror or e}") from None
    return path


def record_prefetch(chosen: dict[int, int]) -> Path:
    """Add measured distances (dim -> positions) to this host's store; the path written.

    Written to a temporary file and renamed, so a reader never sees half a
    file; another host's store is replaced.
    """
    path = store_path()
    if path is None:
        raise ValueError("tuning is off (EKKO_TUNING=off or EKKO_CACHE_DIR=off): nowhere to record")
    for dim, value in chosen.items():
        if not (1 <= dim <= MAX_DIM and 1 <= value <= MAX_PREFETCH):
            raise ValueError(f"prefetch {value} for dim {dim} is out of range")
    table = _prefetch_table(_read(path)) | {int(d): int(v) for d, v in chosen.items()}
    data = {"format": FORMAT, "host": host_key(),
            "prefetch": {str(d): v for d, v in sorted(table.items())}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".tuning-", delete=False) as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(f.name, path)
    return path
