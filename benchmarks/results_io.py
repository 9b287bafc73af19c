"""Where a benchmark's results go, written once for every script in benchmarks/.

A run prints its tables; without `--quick` (or with `--out DIR`) it also
writes them as `<name>.md` and its plot as `<name>.png` under
benchmarks/results (or DIR). `--quick` alone writes nothing. Scripts import
this module as a sibling (`sys.path` gets this folder first when they are
loaded by tests).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def add_out(parser: argparse.ArgumentParser) -> None:
    """The `--out` option every benchmark takes."""
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default benchmarks/results; --quick writes nothing)")


def output_folder(args: argparse.Namespace) -> Path | None:
    """Where results go: --out, else benchmarks/results; --quick alone writes nothing."""
    out = getattr(args, "out", None)
    return out if out is not None else (None if args.quick else RESULTS)


def write_results(args: argparse.Namespace, name: str, text: str,
                  plot: Callable[[Path], None] | None = None) -> Path | None:
    """Write `<name>.md` (and, with `plot`, `<name>.png`) where `output_folder` says;
    returns the folder (None: nothing written). A missing matplotlib skips the plot."""
    out = output_folder(args)
    if out is None:
        return None
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text)
    if plot is not None:
        try:
            plot(out / f"{name}.png")
        except ImportError as e:
            print(f"no plot: {e} (pip install matplotlib)", file=sys.stderr)
    return out


def load_note(start: float) -> str:
    """The load average at a run's start and now: wall times on a shared machine follow it."""
    return (f"Load average {start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
            f"on {os.cpu_count()} CPUs.")
