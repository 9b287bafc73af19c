"""Fused sparse-update kernels: the calling convention around the native code.

`update_kernel(...)` builds the update chain a user asks for as IR, runs the
standard pipeline and compiles the resulting spec; the returned
`UpdateKernel` applies one delta in place:

    k(table, ids, grads, state=..., serving=..., versions=..., step=1, version=None, seed=0)

Arrays are numpy arrays or torch CPU tensors, never copied. Every argument is
checked before anything is written, and the native first phase validates
ids and gradients before the second phase touches a table: a rejected delta
leaves table, state, serving copy and versions exactly as they were.

Layouts: table (rows, dim) float32 / float16 / bf16 (torch.bfloat16, or uint16
bit patterns in numpy); state: sgd none, adagrad (rows, dim) f32,
rowwise_adagrad (rows,) f32, adam a tuple (exp_avg, exp_avg_sq) of (rows, dim)
f32; serving as in ekko.kernels.quant (int8/int4 uint8 (rows, row bytes));
versions (rows,) int64, stamped with `version` (default: `step`).
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..compiler.backend.llvm_update import emit_update
from ..compiler.backend.spec import UpdateSpec, serving_row_bytes
from ..compiler.pipeline import UpdateRequest, update_spec
from .arrays import ArrayArg
from .errors import UpdateError
from .jit import JitModule, compile_ir

_i64, _vp, _f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
_DEDUP = ctypes.CFUNCTYPE(_i64, _i64, _i64, _vp, _i64, _i64, _vp, _vp, _i64, _vp, _vp,
                          _vp, _vp, _vp, _vp, _vp, _vp, _vp, _vp)
_APPLY = ctypes.CFUNCTYPE(None, _i64, _i64, _vp, _vp, _i64, _vp, _vp, _vp, _vp, _vp, _f64,
                          _i64, _i64, _vp, _vp, _vp)

_TABLE_FULL = 3
_TABLE_DTYPES = {"f32": ("float32",), "f16": ("float16",), "bf16": ("bfloat16", "uint16")}
_SERVING_DTYPES = {"f32": ("float32",), "f16": ("float16",), "bf16": ("bfloat16", "uint16"),
                   "int8": ("uint8", "int8"), "int4": ("uint8", "int8")}

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2),
                                       thread_name_prefix="ekko-update")
        return _pool


class _Scratch:
    """Per-partition buffers reused across calls (fresh pages cost ~1 us each).

    The hash table is sized for the unique ids seen last time (a small table
    stays in cache) and doubled when the kernel reports it too full.
    """

    def __init__(self) -> None:
        self.n = -1
        self.htab = np.empty(0, np.int64)  # (id, unique index) pairs; id -1: empty
        self.cap = 0
        self.count = np.zeros(1, np.int64)
        self.err = np.zeros(1, np.int64)

    def ensure(self, n: int, dim: int, expected_unique: int) -> None:
        if n > self.n:
            n = max(n, 1024)
            self.uids = np.empty(n, np.int64)
            self.slots = np.empty(n, np.int64)
            self.srcs = np.empty(n, np.int64)  # delta row of an id seen once, else -1
            self.acc = np.empty(n * dim, np.float32)
            self.sort = [np.empty(n, np.int64) for _ in range(4)]  # order + radix scratch
            self.n = n
        want = 1 << math.ceil(math.log2(max(2 * expected_unique, 1024)))
        if want > self.cap or want * 4 <= self.cap:
            self.resize(want)

    def resize(self, cap: int) -> None:
        self.htab = np.full(2 * cap, -1, np.int64)
        self.cap = cap


class UpdateKernel:
    """A compiled fused update for one UpdateSpec (see the module docstring)."""

    def __init__(self, spec: UpdateSpec):
        self.spec = spec
        self.module: JitModule = compile_ir(emit_update(spec))
        self._dedup = _DEDUP(self.module.address("ekko_update_dedup"))
        self._apply = _APPLY(self.module.address("ekko_update_apply"))
        self._scratch = [_Scratch() for _ in range(max(1, spec.partitions))]
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"UpdateKernel({self.spec})"

    # -- argument checks -----------------------------------------------
    def _check(self, table, ids, grads, state, serving, versions):
        s = self.spec
        t = ArrayArg("table", table, UpdateError, writable=True)
        if len(t.shape) != 2 or t.shape[1] != s.dim:
            raise UpdateError(f"table must have shape (rows, {s.dim}), got {tuple(t.shape)}")
        rows = t.shape[0]
        t.expect(_TABLE_DTYPES[s.table_dtype], (rows, s.dim))
        i = ArrayArg("ids", ids, UpdateError)
        if len(i.shape) != 1:
            raise UpdateError(f"ids must be 1-D, got shape {tuple(i.shape)}")
        i.expect(("int32",) if s.index_dtype == "i32" else ("int64",), (i.shape[0],))
        n = i.shape[0]
        g = ArrayArg("grads", grads, UpdateError)
        g.expect(("float32",), (n, s.dim))
        states = self._check_state(state, rows)
        srv = None
        if s.serving is not None:
            if serving is None:
                raise UpdateError(f"this kernel refreshes a {s.serving} serving copy: pass serving=")
            srv = ArrayArg("serving", serving, UpdateError, writable=True)
            width = s.dim if s.serving in ("f32", "f16", "bf16") else serving_row_bytes(s.serving, s.dim)
            srv.expect(_SERVING_DTYPES[s.serving], (rows, width))
        elif serving is not None:
            raise UpdateError("this kernel has no serving copy: compile it with serving=")
        ver = None
        if versions is not None:
            ver = ArrayArg("versions", versions, UpdateError, writable=True)
            ver.expect(("int64",), (rows,))
        return rows, n, t, i, g, states, srv, ver

    def _check_state(self, state, rows: int) -> list[ArrayArg]:
        s = self.spec
        if s.optimizer == "sgd":
            if state is not None:
                raise UpdateError("sgd keeps no state: pass state=None")
            return []
        if state is None:
            raise UpdateError(f"{s.optimizer} needs its state: pass state=")
        if s.optimizer == "adam":
            if not isinstance(state, (tuple, list)) or len(state) != 2:
                raise UpdateError("adam's state is a tuple (exp_avg, exp_avg_sq)")
            args = [ArrayArg(name, x, UpdateError, writable=True)
                    for name, x in zip(("exp_avg", "exp_avg_sq"), state)]
            for a in args:
                a.expect(("float32",), (rows, s.dim))
            return args
        a = ArrayArg("state", state, UpdateError, writable=True)
        a.expect(("float32",), (rows,) if s.optimizer == "rowwise_adagrad" else (rows, s.dim))
        return [a]

    def _alpha(self, step: int) -> float:
        """The step-dependent learning rate: Adagrad's decay, Adam's bias correction."""
        s = self.spec
        if s.optimizer == "adagrad":
            return s.lr / (1 + (step - 1) * s.lr_decay)
        if s.optimizer == "adam":
            return s.lr * math.sqrt(1 - s.beta2**step) / (1 - s.beta1**step)
        return s.lr

    # -- the call -------------------------------------------------------
    def __call__(self, table, ids, grads, state=None, serving=None, versions=None,
                 step: int = 1, version: int | None = None, seed: int = 0) -> None:
        rows, n, t, i, g, states, srv, ver = self._check(table, ids, grads, state, serving, versions)
        if not isinstance(step, int) or step < 1:
            raise UpdateError(f"step counts from 1, got {step!r}")
        if n == 0:
            return
        version = step if version is None else int(version)
        with self._lock:
            self._run(rows, n, t, i, g, states, srv, ver, step, version, int(seed))

    def _run(self, rows, n, t, i, g, states, srv, ver, step, version, seed) -> None:
        parts = len(self._scratch)
        for sc in self._scratch:
            guess = int(sc.count[0]) if sc.n > 0 else n // parts
            sc.ensure(n, self.spec.dim, min(max(guess, 1), n))

        def dedup(p: int) -> int:
            sc = self._scratch[p]
            return self._dedup(p, parts, i.ptr, n, rows, g.ptr, sc.htab.ctypes.data, sc.cap,
                               sc.uids.ctypes.data,
                               sc.acc.ctypes.data, sc.slots.ctypes.data, sc.count.ctypes.data,
                               sc.err.ctypes.data, *(a.ctypes.data for a in sc.sort),
                               sc.srcs.ctypes.data)

        codes = self._map(dedup, parts)
        for p, code in enumerate(codes):
            while code == _TABLE_FULL:  # rare: far more unique ids than last time
                self._scratch[p].resize(2 * self._scratch[p].cap)
                code = codes[p] = dedup(p)
        self._raise_first(codes, i, rows)
        s0 = states[0].ptr if states else None
        s1 = states[1].ptr if len(states) > 1 else None
        sp = srv.ptr if srv else None
        vp = ver.ptr if ver else None
        alpha = self._alpha(step)

        def apply(p: int) -> int:
            sc = self._scratch[p]
            if self.spec.dedup:
                self._apply(p, parts, sc.uids.ctypes.data, sc.acc.ctypes.data, int(sc.count[0]),
                            t.ptr, s0, s1, sp, vp, alpha, version, seed, sc.sort[0].ctypes.data,
                            g.ptr, sc.srcs.ctypes.data)
            else:
                self._apply(p, parts, i.ptr, g.ptr, n, t.ptr, s0, s1, sp, vp, alpha, version, seed,
                            None, None, None)
            return 0

        self._map(apply, parts)

    @staticmethod
    def _map(fn, parts: int) -> list[int]:
        if parts == 1:
            return [fn(0)]
        futures = [_executor().submit(fn, p) for p in range(1, parts)]
        first = fn(0)
        return [first] + [f.result() for f in futures]

    def _raise_first(self, codes: list[int], ids: ArrayArg, rows: int) -> None:
        """Report the earliest bad position over all partitions; nothing was written."""
        errors = [(int(self._scratch[p].err[0]), code) for p, code in enumerate(codes) if code]
        if not errors:
            return
        pos, code = min(errors)
        if code == 1:
            bad = int(np.asarray(ids_value(ids, pos)))
            raise UpdateError(f"id {bad} at position {pos} is out of range [0, {rows})")
        raise UpdateError(f"non-finite gradient (NaN or Inf) in delta row {pos}")


def ids_value(ids: ArrayArg, pos: int) -> int:
    """Read one id back from its pointer, for the error message."""
    ctype = ctypes.c_int32 if ids.dtype == "int32" else ctypes.c_int64
    return ctype.from_address(ids.ptr + pos * ctypes.sizeof(ctype)).value


def update_kernel(optimizer: str, dim: int, table_dtype: str = "f32", index_dtype: str = "i64",
                  serving: str | None = None, *, stochastic_rounding: bool = False,
                  threads: int | None = None, deterministic: bool = False, lr: float = 0.01,
                  eps: float | None = None, betas: tuple[float, float] = (0.9, 0.999),
                  weight_decay: float = 0.0, lr_decay: float = 0.0,
                  max_norm: float | None = None, clip_value: float | None = None) -> UpdateKernel:
    """Compile a fused sparse update through the IR pipeline (see the module docstring).

    Hyper-parameters as in torch.optim; eps=None takes the optimizer's default
    (Adagrad 1e-10, Adam 1e-8, rowwise Adagrad 1e-8 as FBGEMM). `threads` is
    the number of partitions (default: one per core); `deterministic` sums
    duplicate ids of an SGD delta too, fixing the float summation order.
    """
    hyper = {"lr": lr, "lr_decay": lr_decay, "beta1": betas[0], "beta2": betas[1]}
    if eps is not None:
        hyper["eps"] = eps
    try:
        req = UpdateRequest(optimizer, dim, table_dtype, index_dtype, serving, versions=True,
                            stochastic_rounding=stochastic_rounding, deterministic=deterministic,
                            hyper=tuple(hyper.items()), max_norm=max_norm, clip_value=clip_value,
                            weight_decay=weight_decay)
        spec = update_spec(req, partitions=threads or 0)
    except (KeyError, ValueError) as e:
        raise UpdateError(f"cannot build this update: {e}") from None
    except Exception as e:  # xDSL's verifier: the request itself is wrong
        if type(e).__name__ in ("VerifyException", "DiagnosticException"):
            raise UpdateError(f"cannot build this update: {e}") from None
        raise
    return UpdateKernel(spec)
