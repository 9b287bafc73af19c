"""The native partition runner every kernel runs on (see `_RunnerEmitter`).

Its Python side is `ekko.kernels.native.Executor`.
"""

from __future__ import annotations

from llvmlite import ir

i32 = ir.IntType(32)
i64 = ir.IntType(64)


def _const(ty: ir.Type, value: int) -> ir.Constant:
    return ir.Constant(ty, value)


# Mailbox words (i64) shared by the caller and the workers of `bag_runner`.
MB_NEXT, MB_DONE, MB_STOP, MB_NPARTS, MB_FN, MB_CODES, MB_ARGV, MB_NARGS = range(8)
MB_WORDS = 8
CLAIM_BITS = 16  # claim word = seq << 16 | next partition; 0xFFFF closes a job
SPIN_ITERS = 200_000  # ~0.2-0.5 ms of polling after a job before sleeping
NAP_US, NAP_ITERS, SLEEP_US = 50, 4000, 2000  # then 50 us naps for ~0.2 s, then 2 ms sleeps


class _RunnerEmitter:
    """`run_parts`, `ekko_dispatch` and `ekko_worker`: a work-claiming partition runner.

    Why native: waking a Python pool thread costs ~30-80 us on these VMs, as
    much as a whole 40k-lookup batch. Workers that poll a mailbox for a while
    after each job (like OpenMP's spin count) pick a partition up within
    nanoseconds during bursts and sleep when idle.

    A job is a kernel's packed entry (`abi.packed`: one int64 word per
    argument) and an [nparts x nargs] array of argument words: partition p
    runs `fn(argv + p * nargs)` and its status lands in codes[p].

    Protocol: the caller (holding a Python lock) writes the job into the
    mailbox, then `ekko_dispatch(mb, seq)` publishes the claim word
    seq << 16 | 0, runs partitions itself until none is left, waits until
    every claimed one is done and closes the job (index 0xFFFF). Anyone
    claims partition i by compare-and-swap of word -> word + 1 after
    checking i < nparts; a claim can only succeed while the job is open, so
    a late worker never runs a partition with the next job's half-written
    arguments. The caller never waits for a worker to wake up: if none is
    awake it runs every partition itself.
    """

    def __init__(self) -> None:
        self.module = ir.Module(name="ekko_runner")
        self.mb_ty = i64.as_pointer()
        self.kernel_ty = ir.FunctionType(i64, [self.mb_ty])
        self.run_parts = ir.Function(self.module, ir.FunctionType(ir.VoidType(), [self.mb_ty]),
                                     "run_parts")

    @staticmethod
    def word(b: ir.IRBuilder, mb: ir.Value, index: int) -> ir.Value:
        return b.gep(mb, [_const(i64, index)])

    def load(self, b: ir.IRBuilder, mb: ir.Value, index: int) -> ir.Value:
        return b.load_atomic(self.word(b, mb, index), "seq_cst", 8)

    def emit_run_parts(self) -> None:
        """Claim and run partitions of the open job until none is left."""
        fn = self.run_parts
        mb = fn.args[0]
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        loop, claim, run, out = (fn.append_basic_block(n) for n in ("loop", "claim", "run", "out"))
        b.branch(loop)
        b.position_at_end(loop)
        w = self.load(b, mb, MB_NEXT)
        idx = b.and_(w, _const(i64, (1 << CLAIM_BITS) - 1))
        nparts = self.load(b, mb, MB_NPARTS)
        b.cbranch(b.icmp_signed("<", idx, nparts), claim, out)
        b.position_at_end(claim)
        res = b.cmpxchg(self.word(b, mb, MB_NEXT), w, b.add(w, _const(i64, 1)), "seq_cst", "seq_cst")
        b.cbranch(b.extract_value(res, 1), run, loop)
        b.position_at_end(run)
        kernel = b.inttoptr(self.load(b, mb, MB_FN), self.kernel_ty.as_pointer())
        argv = b.inttoptr(b.load(self.word(b, mb, MB_ARGV), align=8), self.mb_ty)
        nargs = b.load(self.word(b, mb, MB_NARGS), align=8)
        codes = b.inttoptr(b.load(self.word(b, mb, MB_CODES), align=8), self.mb_ty)
        code = b.call(kernel, [b.gep(argv, [b.mul(idx, nargs)])])
        b.store(code, b.gep(codes, [idx]), align=8)
        b.atomic_rmw("add", self.word(b, mb, MB_DONE), _const(i64, 1), "seq_cst")
        b.branch(loop)
        b.position_at_end(out)
        b.ret_void()

    def emit_dispatch(self) -> None:
        """ekko_dispatch(mb, seq): publish, help, wait for stragglers, close."""
        fn = ir.Function(self.module, ir.FunctionType(ir.VoidType(), [self.mb_ty, i64]), "ekko_dispatch")
        mb, seq = fn.args
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        b.store_atomic(_const(i64, 0), self.word(b, mb, MB_DONE), "seq_cst", 8)
        b.store_atomic(b.shl(seq, _const(i64, CLAIM_BITS)), self.word(b, mb, MB_NEXT), "seq_cst", 8)
        b.call(self.run_parts, [mb])
        wait, done = fn.append_basic_block("wait"), fn.append_basic_block("done")
        b.branch(wait)
        b.position_at_end(wait)
        finished = b.icmp_signed(">=", self.load(b, mb, MB_DONE), self.load(b, mb, MB_NPARTS))
        b.cbranch(finished, done, wait)
        b.position_at_end(done)
        closed = b.or_(b.shl(seq, _const(i64, CLAIM_BITS)), _const(i64, (1 << CLAIM_BITS) - 1))
        b.store_atomic(closed, self.word(b, mb, MB_NEXT), "seq_cst", 8)
        b.ret_void()

    def emit_worker(self) -> None:
        """ekko_worker(mb, usleep): poll for work; spin, then nap, then sleep; return on stop."""
        sleep_ty = ir.FunctionType(i32, [i32])
        fn = ir.Function(self.module, ir.FunctionType(i64, [self.mb_ty, i64]), "ekko_worker")
        mb, usleep_addr = fn.args
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        usleep = b.inttoptr(usleep_addr, sleep_ty.as_pointer())
        entry = b.block
        loop, check, work, idle, nap, exit_ = (fn.append_basic_block(n) for n in
                                               ("loop", "check", "work", "idle", "nap", "exit"))
        b.branch(loop)
        b.position_at_end(loop)
        polls = b.phi(i64, "polls")
        polls.add_incoming(_const(i64, 0), entry)
        b.cbranch(b.icmp_signed("!=", self.load(b, mb, MB_STOP), _const(i64, 0)), exit_, check)
        b.position_at_end(check)
        idx = b.and_(self.load(b, mb, MB_NEXT), _const(i64, (1 << CLAIM_BITS) - 1))
        b.cbranch(b.icmp_signed("<", idx, self.load(b, mb, MB_NPARTS)), work, idle)
        b.position_at_end(work)
        b.call(self.run_parts, [mb])
        polls.add_incoming(_const(i64, 0), work)
        b.branch(loop)
        b.position_at_end(idle)
        nxt = b.add(polls, _const(i64, 1))
        polls.add_incoming(nxt, idle)
        b.cbranch(b.icmp_signed("<", nxt, _const(i64, SPIN_ITERS)), loop, nap)
        b.position_at_end(nap)
        long_idle = b.icmp_signed(">", nxt, _const(i64, SPIN_ITERS + NAP_ITERS))
        us = b.select(long_idle, _const(i32, SLEEP_US), _const(i32, NAP_US))
        b.call(usleep, [us])
        polls.add_incoming(nxt, nap)
        b.branch(loop)
        b.position_at_end(exit_)
        b.ret(_const(i64, 0))

    def build(self) -> str:
        self.emit_run_parts()
        self.emit_dispatch()
        self.emit_worker()
        return str(self.module)


def emit_runner() -> str:
    """LLVM IR of the partition runner (`ekko_dispatch`, `ekko_worker`), shared by all kernels."""
    return _RunnerEmitter().build()


__all__ = ["emit_runner", "MB_WORDS"]
