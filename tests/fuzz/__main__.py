"""`python -m tests.fuzz --minutes N`: a fuzz campaign over every target.

Cases are drawn round-robin (a `cli` case, a real process, one time in ten)
from a seed printed at the start, so a campaign can be repeated. Each
failure whose signature (target, kind, message) no stored case has yet is
written under tests/fuzz/regressions/; pytest replays it from then on. One
like a stored case is a regression (printed, and the exit status is 1)
unless that case is marked xfail.
`--replay` runs the stored cases instead and prints what each does now.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import time

from . import TARGETS, generator, load_regressions, save_regression, signature
from .oracle import run_case, shutdown


def draw(seed: int, index: int, targets: list[str]) -> tuple[str, dict]:
    """The index-th case of a campaign: reproducible from (seed, index) alone."""
    rng = random.Random(f"{seed}:{index}")
    pool = [t for t in targets if t != "cli"] or targets
    target = "cli" if "cli" in targets and (index % 10 == 9 or pool == ["cli"]) else \
        pool[index % len(pool)]
    return target, generator(target)(rng)


def campaign(minutes: float, seed: int, targets: list[str], quiet: bool) -> int:
    records = [record for _, record in load_regressions()]
    known = {record.get("signature") for record in records}
    excused = {record.get("signature") for record in records if "xfail" in record}
    regressed: set[str] = set()  # like a stored case that replays as fixed: not excused
    deadline = time.monotonic() + minutes * 60
    counts: collections.Counter[str] = collections.Counter()
    new = 0
    index = 0
    while time.monotonic() < deadline:
        target, case = draw(seed, index, targets)
        result = run_case(case)
        counts[f"{target}:{result['kind']}"] += 1
        if result["kind"] != "ok":
            sig = signature(case, result)
            if sig not in known:
                known.add(sig)
                new += 1
                path = save_regression(case, result, note=f"campaign seed {seed}, case {index}")
                print(f"NEW {result['kind']} ({target}) -> {path.name}\n"
                      f"    {result.get('detail', '').strip().splitlines()[-1:]}", flush=True)
            elif sig not in excused and sig not in regressed:
                regressed.add(sig)
                print(f"REGRESSED {result['kind']} ({target}), like a stored case: {sig}\n"
                      f"    case: {json.dumps(case)[:500]}", flush=True)
        if not quiet and index % 100 == 99:
            print(f"{index + 1} cases, {new} new failures", flush=True)
        index += 1
    shutdown()
    print(f"seed {seed}: {index} cases, {new} new failures, {len(regressed)} regressions")
    for key, n in sorted(counts.items()):
        print(f"  {key:28s} {n}")
    return 1 if new or regressed else 0


def replay() -> int:
    failing = 0
    for path, record in load_regressions():
        result = run_case(record["case"])
        status = "ok" if result["kind"] == "ok" else result["kind"]
        failing += status != "ok"
        expected = " (expected to fail: " + record["xfail"] + ")" if "xfail" in record else ""
        print(f"{path.name}: {status}{expected}")
    shutdown()
    return 1 if failing else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0, help="how long to run (default 5)")
    p.add_argument("--seed", type=int, default=None, help="campaign seed (default: from the clock)")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help=f"comma-separated subset of {','.join(TARGETS)}")
    p.add_argument("--replay", action="store_true", help="run the stored regression cases")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.replay:
        return replay()
    targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets or not args.minutes > 0:
        p.error(f"--targets takes {','.join(TARGETS)}; --minutes must be positive")
    seed = args.seed if args.seed is not None else int(time.time())
    print(f"fuzzing {','.join(targets)} for {args.minutes:g} min, seed {seed}", flush=True)
    return campaign(args.minutes, seed, targets, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
