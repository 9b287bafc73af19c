"""Counted loops for the LLVM emitters, built with llvmlite.ir.

Every loop the backends emit has one shape: a head block with an i64
induction phi (plus one phi per carried accumulator), a body, and a done
block. Keeping that shape in one place means LLVM's loop passes see the
same pattern in the update and the bag kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from llvmlite import ir

I64 = ir.IntType(64)
ONE = ir.Constant(I64, 1)


@dataclass
class Loop:
    """An open loop: the builder sits in its body."""

    i: ir.PhiInstr
    accs: list[ir.PhiInstr]
    head: ir.Block
    done: ir.Block


def open_loop(b: ir.IRBuilder, start: ir.Value, stop: ir.Value, name: str,
              inits: Sequence[ir.Value] = ()) -> Loop:
    """Branch into `for (i = start; i < stop; ++i)` carrying `inits`; leave b in the body."""
    fn = b.function
    pre = b.block
    head = fn.append_basic_block(f"{name}.head")
    body = fn.append_basic_block(f"{name}.body")
    done = fn.append_basic_block(f"{name}.done")
    b.branch(head)
    b.position_at_end(head)
    i = b.phi(I64, name)
    i.add_incoming(start, pre)
    accs = []
    for init in inits:
        acc = b.phi(init.type, f"{name}.acc")
        acc.add_incoming(init, pre)
        accs.append(acc)
    b.cbranch(b.icmp_signed("<", i, stop), body, done)
    b.position_at_end(body)
    return Loop(i, accs, head, done)


def close_loop(b: ir.IRBuilder, loop: Loop, new: Sequence[ir.Value] = ()) -> list[ir.PhiInstr]:
    """End the body (accumulators take `new`) and leave b after the loop; returns the results."""
    loop.i.add_incoming(b.add(loop.i, ONE), b.block)
    for acc, value in zip(loop.accs, new, strict=True):
        acc.add_incoming(value, b.block)
    b.branch(loop.head)
    b.position_at_end(loop.done)
    return loop.accs


@contextmanager
def counted(b: ir.IRBuilder, start: ir.Value, stop: ir.Value, name: str) -> Iterator[ir.Value]:
    """with counted(b, start, stop, name) as i: body."""
    loop = open_loop(b, start, stop, name)
    yield loop.i
    close_loop(b, loop)


def fold(b: ir.IRBuilder, start: ir.Value, stop: ir.Value, name: str,
         inits: Sequence[ir.Value], step: Callable[[ir.Value, list], list]) -> list[ir.PhiInstr]:
    """accs = step(i, accs) for i in [start, stop); returns the final accumulators."""
    loop = open_loop(b, start, stop, name, inits)
    return close_loop(b, loop, step(loop.i, loop.accs))
