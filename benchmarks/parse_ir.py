"""Parsing, verifying and printing a large ekko module: custom form vs generic.

Models produce modules of thousands of update chains; ekko-opt and the
compile API parse, verify and print them on every run, so the front door
must stay fast. The module is a realistic mix: one function per table with
a delta, dedup, clip, weight decay, an optimizer (sgd, adagrad, rowwise
Adagrad, adam in turn; each chain's settings are an `UpdateRule`, so the
hyper-parameters are the catalog's), stochastic rounding on f16/bf16 tables, a serving
re-quantization (int8, int4, f16), a version stamp, a pooled bag and a
lookup on the serving copy. Tables vary in dim, layout, id type and dynamic
rows. Goal (the issue): parse + verify + print of 10,000 ops < 5 s.

Each phase is timed `--runs` times (median reported) with
`ekko.compiler.registry.make_context()`; the generic form of the same module
is timed the same way. The printed module is re-parsed and must print
identically (the correctness check the smoke test relies on).

This compares ekko's custom assembly format with xDSL's generic form of the
same module, not with a peer tool.

    python benchmarks/parse_ir.py [--ops 10000] [--runs 3] [--check] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from xdsl.dialects.builtin import ModuleOp
from xdsl.parser import Parser
from xdsl.printer import Printer

from ekko.compiler.frontend.model import UpdateRule
from ekko.compiler.registry import make_context

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import add_out, write_results  # noqa: E402

BUDGET_S = 5.0
OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "adam")
LR = {"sgd": 0.1, "adagrad": 0.01, "rowwise_adagrad": 0.01, "adam": 1e-3}
DIMS = (16, 32, 64, 128)
LAYOUTS = ("f32", "f16", "bf16")
SERVING = ("int8", "int4", "f16")


def _attrs(**values: float) -> str:
    return ", ".join(f"{k} = {v:e} : f64" for k, v in values.items())


def _function(i: int) -> tuple[list[str], int]:
    """One table's update chain and serving lookups; returns (lines, op count)."""
    opt = OPTIMIZERS[i % len(OPTIMIZERS)]
    dim = DIMS[(i // 4) % len(DIMS)]
    layout = LAYOUTS[(i // 3) % len(LAYOUTS)]
    serving = SERVING[(i // 5) % len(SERVING)]
    index = "i32" if i % 7 == 3 else "i64"
    rows = "?" if i % 11 == 5 else str(1000 + 10 * i)

    T = f"!emb.table<{rows}x{dim}x{layout}>"
    Q = f"!emb.table<{rows}x{dim}x{serving}>"
    V = f"!emb.versions<{rows}>"
    D = f"!upd.delta<{dim}xf32, {index}>"
    U = f"!upd.delta<{dim}xf32, {index}, unique>"
    ids = f"tensor<?x{index}>"
    rowt = f"tensor<?x{dim}xf32>"
    out = f"tensor<?x{dim}xf32>"
    rule = UpdateRule.make(opt, lr=LR[opt], max_norm=1.0, clip_value=10.0, weight_decay=1e-4)
    entry = rule.optimizer.entry
    states = [f"!emb.state<{rows}x{1 if s.rowwise else dim}>" for s in entry.states]
    has_step = entry.uses_step
    rounding = layout != "f32"

    args = [f"%t: {T}"] + [f"%s{k}: {s}" for k, s in enumerate(states)]
    args += [f"%ids: {ids}", f"%rows: {rowt}", f"%off: {ids}", f"%q: {Q}", f"%v: {V}",
             "%ver: i64", "%step: i64", "%seed: i64"]
    results = [T, *states, Q, V, out, out]
    lines = [f"  func.func @table_{i}({', '.join(args)}) -> ({', '.join(results)}) {{"]
    body = [
        f"%d = upd.delta %ids, %rows : {ids}, {rowt}",
        f"%u = upd.dedup %d : {D}",
        f"%c = upd.clip %u {{{_attrs(max_norm=rule.max_norm, clip_value=rule.clip_value)}}} : {U}",
        f"%w = upd.weight_decay %c, %t {{{_attrs(decay=rule.weight_decay)}}} : {U}, {T}",
    ]
    hyper = _attrs(**dict(rule.optimizer.hyper))
    state_names = [f"%s{k}" for k in range(len(states))]
    new_states = [f"%n{k}" for k in range(len(states))]
    operands = ["%t", *state_names, "%w"] + (["%step"] if has_step else [])
    types = [T, *states, U] + (["i64"] if has_step else [])
    body.append(
        f"{', '.join(['%t1', *new_states])} = upd.{opt} {', '.join(operands)} {{{hyper}}} : "
        f"{', '.join(types)}"
    )
    table = "%t1"
    if rounding:
        body.append(f"%t2 = upd.stochastic_round %t1, %seed : {T}, i64")
        table = "%t2"
    body += [
        f"%q1 = upd.requantize {table}, %q, %d : {T}, {Q}, {D}",
        f"%v1 = upd.stamp %v, %d, %ver : {V}, {D}, i64",
        f"%b = emb.bag %q1, %ids, %off {{mode = \"{'sum' if i % 2 else 'mean'}\"}} : {Q}, {ids}, {ids}",
        f"%l = emb.lookup %q1, %ids : {Q}, {ids}",
        f"func.return {', '.join([table, *new_states, '%q1', '%v1', '%b', '%l'])} : "
        f"{', '.join(results)}",
    ]
    lines += [f"    {line}" for line in body] + ["  }"]
    return lines, 1 + len(body)  # func.func and its body


def generate(n_ops: int) -> tuple[str, int]:
    """A module of at least `n_ops` operations (builtin.module not counted)."""
    lines = ["builtin.module {"]
    count = 0
    i = 0
    while count < n_ops:
        if i % 50 == 0:  # table and feature declarations, as a model has them
            lines.append(f"  emb.table @master_{i} : !emb.table<1000x64xf32> {{serving = #emb.layout<int8>}}")
            lines.append(f"  emb.feature @feature_{i} reads @master_{i} pooling sum")
            count += 2
        fn, k = _function(i)
        lines += fn
        count += k
        i += 1
    lines.append("}")
    return "\n".join(lines) + "\n", count


def parse(text: str) -> ModuleOp:
    return Parser(make_context(), text).parse_module()


def render(module: ModuleOp, generic: bool = False) -> str:
    out = io.StringIO()
    Printer(stream=out, print_generic_format=generic).print_op(module)
    return out.getvalue()


def _median_ms(fn: Callable[[], object], runs: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), result


def measure(text: str, runs: int, generic: bool) -> tuple[dict[str, float], str]:
    """Median ms of parse, verify and print; and the printed text."""
    parse_ms, module = _median_ms(lambda: parse(text), runs)
    verify_ms, _ = _median_ms(module.verify, runs)
    print_ms, printed = _median_ms(lambda: render(module, generic), runs)
    times = {"parse": parse_ms, "verify": verify_ms, "print": print_ms}
    times["total"] = sum(times.values())
    return times, printed


def run(n_ops: int, runs: int) -> dict:
    text, count = generate(n_ops)
    module = parse(text)
    module.verify()
    actual = sum(1 for _ in module.walk()) - 1
    assert actual == count, (actual, count)
    custom, printed = measure(text, runs, generic=False)
    generic_text = render(module, generic=True)
    generic, generic_printed = measure(generic_text, runs, generic=True)
    # correctness: what we print parses back to the same module
    round_trip = render(parse(printed)) == printed and render(parse(generic_printed)) == printed
    return {
        "ops": actual,
        "custom": custom,
        "generic": generic,
        "custom_bytes": len(printed),
        "generic_bytes": len(generic_printed),
        "round_trip": round_trip,
    }


def table(result: dict) -> str:
    n = result["ops"]
    lines = [
        f"ekko IR: {n} ops, custom form {result['custom_bytes'] / 1e6:.2f} MB, "
        f"generic form {result['generic_bytes'] / 1e6:.2f} MB",
        f"{'phase':<8} {'custom ms':>10} {'us/op':>8} {'generic ms':>11} {'us/op':>8} "
        f"{'generic/custom':>15}",
    ]
    for phase in ("parse", "verify", "print", "total"):
        c, g = result["custom"][phase], result["generic"][phase]
        lines.append(
            f"{phase:<8} {c:>10.1f} {1e3 * c / n:>8.1f} {g:>11.1f} {1e3 * g / n:>8.1f} "
            f"{g / c if c else float('nan'):>14.2f}x"
        )
    lines.append(f"round trip identical: {result['round_trip']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", type=int, default=None,
                   help="operations in the module (default 10,000; 1,000 with --quick)")
    p.add_argument("--runs", type=int, default=None,
                   help="timed runs per phase, median (default 3; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="a small module, one run; writes nothing "
                   "unless --out is given")
    add_out(p)
    p.add_argument("--check", action="store_true",
                   help=f"exit 1 if parse+verify+print of the custom form takes over {BUDGET_S} s "
                   "or the round trip differs")
    p.add_argument("--dump", metavar="FILE", help="also write the generated module here")
    args = p.parse_args(argv)
    args.ops = args.ops or (1_000 if args.quick else 10_000)
    args.runs = args.runs or (1 if args.quick else 3)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dump:
        with open(args.dump, "w") as f:
            f.write(generate(args.ops)[0])
    result = run(args.ops, args.runs)
    text = table(result)
    print(text)
    write_results(args, "parse_ir",
                  f"## Parse, verify and print ({args.ops:,} ops, median of {args.runs} runs)\n\n"
                  f"```\n{text}\n```\n")
    if not result["round_trip"]:
        print("FAIL: the printed module does not re-parse to the same text", file=sys.stderr)
        return 1
    total_s = result["custom"]["total"] / 1e3
    if args.check and total_s > BUDGET_S:
        print(f"FAIL: {total_s:.2f} s > {BUDGET_S} s for {result['ops']} ops", file=sys.stderr)
        return 1
    if args.check:
        print(f"OK: {total_s:.2f} s <= {BUDGET_S} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
