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


def roofline(labels: list[str], groups: list[str], points: dict[str, list[tuple[float, int]]],
             styles: dict[str, tuple[str, str]], bw: float, target: float, title: str):
    """A roofline-style figure: one row per label, achieved GB/s per peer (a marker each,
    `points[peer]` = (GB/s, row)), the copy bandwidth and the target fraction of it as
    vertical lines, a rule between rows of different `groups`. Log x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.38 * len(labels)))
    for peer, (marker, color) in styles.items():
        if points.get(peer):
            x, y = zip(*points[peer])
            ax.scatter(x, y, marker=marker, color=color, label=peer,
                       s=110 if peer == "ekko" else 45, zorder=3)
    ax.axvline(bw, color="black", lw=1.5, label=f"copy bandwidth ({bw:.1f} GB/s)")
    ax.axvline(target * bw, color="black", ls="--", lw=1, label=f"{target:.0%} of copy (target)")
    for i in range(1, len(labels)):
        if groups[i] != groups[i - 1]:
            ax.axhline(i - 0.5, color="lightgray", lw=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xscale("log")
    # labels at 1, 2, 5 x 10^k only: readable over a narrow range, apart over a wide one
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("achieved bandwidth, GB/s (bytes moved / median time, log scale)")
    ax.set_title(title)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(fig, path: Path) -> None:
    """Write a figure and free it."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_note(start: float) -> str:
    """The load average at a run's start and now: wall times on a shared machine follow it."""
    return (f"Load average {start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
            f"on {os.cpu_count()} CPUs.")
