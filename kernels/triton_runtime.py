"""The Triton target's runtime: load the generated source, check arguments, launch.

`TritonUpdateKernel` and `TritonBagKernel` take the same arguments as the
CPU kernels (`ekko.kernels.update`, `ekko.kernels.lookup`) but as torch
tensors on one CUDA device, or on the CPU when TRITON_INTERPRET=1 (Triton's
interpreter runs the kernels there). They are what
`ekko.update_kernel(..., target="triton")` and `ekko.bag_kernel(...,
target="triton")` return.

The generated module is written to the kernel cache folder and imported
from there, because Triton's JIT reads a kernel's source from its file.

Validation is all-or-nothing as on the CPU: ids and gradients (lookups: ids
and offsets) are checked on the device with torch ops, and every row's new
values by the generated check kernel (the apply's math without its stores:
a value that would not be finite refuses the call with
NonFiniteOutputError); the apply is launched only when everything is
valid, so a rejected call leaves every buffer untouched. Duplicate ids are
summed after a stable sort, in input order per chunk and as fixed-shape
trees across a chunk, with no atomics: the same delta gives the same bits
run after run.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from ..compiler.backend import triton_bag, triton_update
from ..compiler.backend.spec import BagSpec, UpdateSpec
from ..compiler.backend.targets import TARGETS
from ..dialects import catalog
from .arrays import ArrayArg, torch_layout_problem
from .calls import (bag_count, bag_offsets_given, bag_table_width, bag_weights_given,
                    buffer_name, call_scalars, index_dtypes, update_args)
from .errors import EkkoError, LookupError, NonFiniteOutputError, UpdateError
from .jit import cache_dir
from .native import table_runtime

_TARGET = TARGETS["triton"]  # the compiler side of this runtime: schedule and emit
_modules: dict[str, ModuleType] = {}
_modules_lock = threading.Lock()


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _require_triton(error: type[EkkoError]) -> None:
    if importlib.util.find_spec("triton") is None:
        raise error("target='triton' needs triton: pip install 'ekko[triton]'")


def load_source(source: str, stem: str, interpret: bool | None = None) -> ModuleType:
    """Import generated Triton source as a module (from a file, as Triton's JIT wants).

    `interpret` (default: TRITON_INTERPRET) says whether its kernels run in
    the interpreter; `triton.jit` decides that when the module executes, so
    compiling PTX under the interpreter loads a second, compiled copy.
    """
    interpret = interpreted() if interpret is None else interpret
    key = hashlib.sha256(f"{source}\0interpret={interpret}".encode()).hexdigest()[:20]
    with _modules_lock:
        module = _modules.get(key)
        if module is not None:
            return module
        root = cache_dir()
        folder = (root / "triton") if root is not None else Path(tempfile.gettempdir()) / "ekko-triton"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{stem}_{key}.py"
        if not path.exists() or path.read_text() != source:
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(source)
            os.replace(tmp, path)
        name = f"ekko_triton_{stem}_{key}"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        saved = os.environ.get("TRITON_INTERPRET")
        if interpret != interpreted():  # only the PTX export under the interpreter flips it
            os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        try:
            spec.loader.exec_module(module)
        finally:
            if saved is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = saved
        _modules[key] = module
        return module


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The interpreter computes masked-off lanes too (0/0, inf*0, the min of a
    NaN row the check kernel is about to refuse): keep numpy quiet."""
    if not interpreted():
        yield
        return
    import warnings

    import numpy as np

    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


# every operation rounds on its own, as on the LLVM target and in the semantics table:
# a contracted a*b+c (one rounding) can overflow where the two roundings do not, and back
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


class _Kernels:
    """A generated module's kernels, launched with their arguments by name.

    The emitter declares each kernel's arguments once (`KernelDecl`: the
    signature it writes the `def` from and `triton.compile` reads); a launch
    lays the named arguments out in that order, as `native.PackedEntry` does
    for the ABI's signatures, so a call can never pass them in the wrong
    positions. A missing or unknown name is a TypeError.
    """

    def __init__(self, module: ModuleType, decls: tuple[triton_update.KernelDecl, ...]):
        self.module = module
        self.order = {d.name: tuple(name for name, _ in d.signature) for d in decls}

    def launch(self, kernel: str, grid: tuple[int, ...], **args: Any) -> None:
        names = self.order[kernel]
        if len(args) != len(names) or not all(n in args for n in names):
            missing = [n for n in names if n not in args]
            unknown = [n for n in args if n not in names]
            raise TypeError(f"{kernel}: missing arguments {missing}, unknown {unknown}")
        getattr(self.module, kernel)[grid](*(args[n] for n in names), **LAUNCH_OPTIONS,
                                           num_warps=self.module.NUM_WARPS)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


class _TensorArg:
    """A checked tensor argument (`calls.Arg`): the tensor and its dtype name and shape."""

    __slots__ = ("name", "obj", "error", "dtype", "shape")
    expect = ArrayArg.expect  # one dtype/shape check and message for every runtime

    def __init__(self, name: str, x: Any, error: type[EkkoError]):
        self.name, self.obj, self.error = name, x, error
        self.dtype = str(x.dtype).removeprefix("torch.")
        self.shape = tuple(x.shape)


class _Checker:
    """torch tensors on one device, as the Triton runtime reaches them (`calls.Arrays`)."""

    def __init__(self, error: type[EkkoError]):
        self.error = error
        self.device: Any = None
        self.seen: list[tuple[_TensorArg, bool]] = []

    table_dtypes: dict[str, tuple[str, ...]]  # set below the dtype maps
    serving_dtypes: dict[str, tuple[str, ...]]

    def arg(self, name: str, x: Any, writable: bool = False) -> _TensorArg:
        """A tensor on this call's device, dense, contiguous, not requiring grad if written."""
        import torch

        err = self.error
        if not isinstance(x, torch.Tensor):
            raise err(f"{name} must be a torch tensor for target='triton', got {type(x).__name__}")
        if (why := torch_layout_problem(name, x)) is not None:
            raise err(why)
        if self.device is None:
            self.device = x.device
            if x.device.type == "cpu" and not interpreted():
                raise err(f"{name} is a CPU tensor: target='triton' runs on CUDA tensors "
                          "(or on CPU tensors with TRITON_INTERPRET=1 set before triton is imported)")
            if x.device.type != "cpu" and interpreted():
                raise err("TRITON_INTERPRET=1 runs Triton kernels on CPU tensors: "
                          f"{name} is on {x.device}")
        elif x.device != self.device:
            raise err(f"{name} is on {x.device}, the other arguments on {self.device}")
        if not x.is_contiguous():
            raise err(f"{name} must be C-contiguous")
        if writable and x.requires_grad:
            raise err(f"{name} requires grad: updating it in place would bypass autograd "
                      "(pass tensor.detach() or create it with requires_grad=False)")
        a = _TensorArg(name, x, err)
        self.seen.append((a, writable))
        return a

    def tensor(self, name: str, x: Any, dtypes: tuple[str, ...],
               shape: tuple[int, ...] | None = None, ndim: int | None = None,
               writable: bool = False) -> Any:
        """`arg` and its dtype and shape checked: the tensor itself."""
        a = self.arg(name, x, writable)
        a.expect(dtypes, None if shape is None else tuple(shape), ndim)
        return x

    def disjoint(self, written: list[_TensorArg] | None = None,
                 read: list[_TensorArg] | None = None) -> None:
        """No tensor written in place shares memory with any other argument (every
        argument this checker saw; `written` and `read` are for `calls.Arrays`)."""
        def span(x: Any) -> tuple[int, int]:
            start = x.data_ptr()
            return start, start + x.numel() * x.element_size()

        for k, (a, writable) in enumerate(self.seen):
            for b, w2 in self.seen[k + 1:]:
                x, y = a.obj, b.obj
                if not (writable or w2) or x.numel() == 0 or y.numel() == 0:
                    continue
                (a0, a1), (b0, b1) = span(x), span(y)
                if a0 < b1 and b0 < a1:
                    first, second = (a.name, b.name) if writable else (b.name, a.name)
                    raise self.error(f"{first} and {second} share memory: each must be its own array")


def _as_kernel_dtype(x: Any, layout: str) -> Any:
    """The tensor as the kernel's pointer type reads it: bf16 as int16 bits,
    quantized rows as uint8 bytes (the Triton type of the layout's storage)."""
    import torch

    want = {"*i16": "int16", "*u8": "uint8"}.get(catalog.layout(layout).storage.triton)
    return x.view(getattr(torch, want)) if want and str(x.dtype) != f"torch.{want}" else x


class TritonUpdateKernel:
    """A fused update on the Triton target (the calling convention of `UpdateKernel`)."""

    gathers = False  # a gathered delta is expanded by the caller (engine/primary.py)

    def __init__(self, spec: UpdateSpec):
        _require_triton(UpdateError)
        self.spec = _TARGET().schedule(spec)
        self.source = triton_update.emit_update(self.spec)
        self.module = load_source(self.source, f"update_{spec.optimizer}_{spec.dim}")
        self.kernels = _Kernels(self.module, triton_update.kernels(self.spec))

    def __repr__(self) -> str:
        return f"TritonUpdateKernel({self.spec})"

    def __call__(self, table, ids, grads, state=None, serving=None, versions=None,
                 step: int = 1, version: int | None = None, seed: int = 0, seq=None) -> None:
        """Apply one delta in place (see `ekko.kernels.update.UpdateKernel`)."""
        c = _Checker(UpdateError)
        a = update_args(self.spec, c, table, ids, grads, state, serving, versions, seq)
        step, version, seed = call_scalars(step, version, seed)
        if a.n == 0:
            return
        srv, ver, sq = (x.obj if x is not None else None for x in (a.serving, a.versions, a.seq))
        with table_runtime(a.table.obj.data_ptr()).lock, _quiet():
            self._run(a.rows, a.n, a.table.obj, a.ids.obj, a.grads.obj,
                      [x.obj for x in a.states], srv, ver, sq, c.device, step, version, seed)

    def _validate(self, ids, grads, rows: int, n: int) -> None:
        """The earliest bad position (an id out of range, a non-finite row); nothing written yet."""
        import torch

        pos = torch.arange(n, device=ids.device)
        bad_id = torch.where((ids < 0) | (ids >= rows), pos, n).min()
        bad_g = torch.where(~torch.isfinite(grads).all(dim=1), pos, n).min()
        first_id, first_g = torch.stack([bad_id, bad_g]).tolist()
        if first_id < n and first_id <= first_g:
            bad = int(ids[first_id])
            raise UpdateError(f"id {bad} at position {first_id} is out of range [0, {rows})")
        if first_g < n:
            raise UpdateError(f"non-finite gradient (NaN or Inf) in delta row {first_g}")

    def _run(self, rows, n, t, i, g, states, srv, ver, sq, device, step, version, seed) -> None:
        import torch

        s, mod = self.spec, self.module
        ids = i.to(torch.int64)
        self._validate(ids, g, rows, n)
        # dedup: a stable sort, then one entry per unique id (ids are in range now)
        sorted_ids, perm = torch.sort(ids, stable=True)
        uids, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
        u = uids.numel()
        starts = torch.cumsum(counts, 0) - counts
        srcs = torch.where(counts == 1, perm[starts], torch.full_like(starts, -1))
        multi = torch.nonzero(counts > 1).flatten()
        acc = g
        if multi.numel():
            acc = torch.empty((u, s.dim), dtype=torch.float32, device=device)
            self.kernels.launch("ekko_update_sum", (multi.numel(),), grads=g, perm=perm,
                                starts=starts, counts=counts, multi=multi, acc=acc)
        table = _as_kernel_dtype(t, s.table_dtype)
        uni = torch.tensor(mod.uniforms(step) or [0.0], dtype=torch.float64, device=device)
        grid = (_cdiv(u, s.block_rows),)
        bad = torch.empty(u, dtype=torch.int32, device=device)
        rows_in = dict(uids=uids, srcs=srcs, acc=acc, grads=g, count=u, table=table, seed=seed,
                       uni=uni, **{f"state{k}": x for k, x in enumerate(states)})
        self.kernels.launch("ekko_update_check", grid, **rows_in, bad=bad)
        self._refuse_non_finite(uids, bad)
        dummy = torch.zeros(1, dtype=torch.int64, device=device)
        serving = _as_kernel_dtype(srv, s.serving) if srv is not None else dummy.view(torch.float32)[:1]
        seq = sq.view(torch.int32) if sq is not None else dummy.view(torch.int32)
        self.kernels.launch("ekko_update_apply", grid, **rows_in, serving=serving,
                            versions=ver if ver is not None else dummy, seq=seq, version=version,
                            HAS_VERSIONS=ver is not None, HAS_SEQ=sq is not None)

    def _refuse_non_finite(self, uids, bad) -> None:
        """The check kernel found a row whose new values would not be finite: name
        the smallest such id and its first bad buffer (nothing was written)."""
        import torch

        u = bad.numel()
        first = int(torch.where(bad >= 0, torch.arange(u, device=bad.device), u).min())
        if first < u:
            raise NonFiniteOutputError(int(uids[first]), buffer_name(self.spec, int(bad[first])))


class TritonBagKernel:
    """A pooled lookup on the Triton target (the calling convention of `BagKernel`)."""

    def __init__(self, spec: BagSpec):
        _require_triton(LookupError)
        self.spec = spec
        self.source = triton_bag.emit_bag(spec)
        self.module = load_source(self.source, f"bag_{spec.mode}_{spec.layout}_{spec.dim}")
        self.kernels = _Kernels(self.module, triton_bag.kernels(spec))

    def __repr__(self) -> str:
        return f"TritonBagKernel({self.spec})"

    def __call__(self, table: Any, ids: Any, offsets: Any = None, per_sample_weights: Any = None,
                 out: Any = None, include_last_offset: bool | None = None, seq: Any = None) -> Any:
        """Pooled rows (nbags, dim) f32 on the tables' device (see `BagKernel`)."""
        import torch

        s = self.spec
        if seq is not None:
            raise LookupError("target='triton' lookups read without sequence words: pass seq=None")
        c = _Checker(LookupError)
        t = c.tensor("table", table, catalog.layout(s.layout).dtypes, ndim=2)
        bag_table_width(s, t.shape[1])
        i = c.tensor("ids", ids, index_dtypes(s.index_dtype), ndim=1)
        n = i.shape[0]
        bounds, nbags = self._bounds(c, offsets, i, include_last_offset)
        w = None
        if bag_weights_given(s, per_sample_weights):
            w = c.tensor("per_sample_weights", per_sample_weights, ("float32",), ndim=1)
            if w.shape[0] != n:
                raise LookupError(f"per_sample_weights has {w.shape[0]} entries for {n} ids")
        if out is None:
            out = torch.empty((nbags, s.dim), dtype=torch.float32, device=c.device)
        c.tensor("out", out, ("float32",), (nbags, s.dim), writable=True)
        c.disjoint()
        if nbags == 0:
            return out
        self._validate(i, bounds, t.shape[0], n)
        args = dict(table=_as_kernel_dtype(t, s.layout), ids=i, out=out, n=n)
        if bounds is not None:
            args["bounds"] = bounds
        if w is not None:
            args["weights"] = w
        grid = (_cdiv(n, triton_bag.chunk(s.dim)),) if s.mode == "none" else (nbags,)
        with _quiet():
            self.kernels.launch("ekko_bag", grid, **args)
        return out

    def _bounds(self, c: _Checker, offsets: Any, ids: Any, include_last: bool | None):
        """(B+1 int64 bounds on the device, number of bags); mode none: (None, len(ids))."""
        import torch

        if not bag_offsets_given(self.spec, offsets):
            return None, ids.shape[0]
        o = c.tensor("offsets", offsets, (str(ids.dtype).removeprefix("torch."),), ndim=1)
        k = o.shape[0]
        if k == 0:
            return None, 0
        o64 = o.to(torch.int64)
        include_last, nbags = bag_count(k, lambda: int(o64[-1]), ids.shape[0], include_last)
        if include_last:
            return o64, nbags
        end = torch.full((1,), ids.shape[0], dtype=torch.int64, device=o.device)
        return torch.cat([o64, end]), nbags

    def _validate(self, ids: Any, bounds: Any, rows: int, n: int) -> None:
        """Offsets within [0, n] and monotone per bag, ids in range: checked before the launch."""
        import torch

        checks = []
        if bounds is not None:
            lo, hi = bounds[:-1], bounds[1:]
            bad = (lo < 0) | (lo > hi) | (hi > n)
            checks.append(torch.where(bad, torch.arange(lo.numel(), device=lo.device),
                                      lo.numel()).min())
        if n:
            pos = torch.arange(n, device=ids.device)
            checks.append(torch.where((ids < 0) | (ids >= rows), pos, n).min())
        found = torch.stack(checks).tolist() if checks else []
        if bounds is not None:
            bag = found.pop(0)
            if bag < bounds.numel() - 1:
                raise LookupError(f"offsets of bag {bag} are not monotone within [0, {n}]")
        if found and found[0] < n:
            raise LookupError(f"ids[{found[0]}] is out of range for a table of {rows} rows")


Unit = tuple[str, str, tuple[triton_update.KernelDecl, ...]]  # (source, stem, kernels)


def unit_of(spec: UpdateSpec | BagSpec) -> Unit:
    """The generated module of a spec, as `ptx_many` takes it."""
    spec = _TARGET().schedule(spec)
    if isinstance(spec, UpdateSpec):
        return (triton_update.emit_update(spec), f"update_{spec.optimizer}_{spec.dim}",
                triton_update.kernels(spec))
    return (triton_bag.emit_bag(spec), f"bag_{spec.mode}_{spec.layout}_{spec.dim}",
            triton_bag.kernels(spec))


def ptx_many(units: list[Unit], arch: int = 90) -> list[dict[str, str]]:
    """{kernel: PTX for sm_`arch`} of each generated module; no GPU needed.

    Triton's interpreter and its compiler do not share a process: once the
    interpreter ran, compiling fails, and after a compile the interpreter
    does. So where kernels are interpreted (TRITON_INTERPRET=1, or the
    interpreter already loaded) the modules are compiled in a fresh Python
    process, one for the whole list.
    """
    if not interpreted() and "triton.runtime.interpreter" not in sys.modules:
        return [_ptx(source, stem, decls, arch) for source, stem, decls in units]
    import pickle
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", __name__, str(arch)], input=pickle.dumps(units),
                          capture_output=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError("PTX compilation failed:\n" + proc.stderr.decode()[-4000:])
    return pickle.loads(proc.stdout)


def _ptx(source: str, stem: str, decls: tuple[triton_update.KernelDecl, ...],
         arch: int) -> dict[str, str]:
    import triton
    from triton.backends.compiler import GPUTarget

    module = load_source(source, stem, interpret=False)
    result = {}
    for decl in decls:
        src = triton.compiler.ASTSource(getattr(module, decl.name), dict(decl.signature),
                                        constexprs=dict(decl.constexprs))
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": getattr(module, "NUM_WARPS", 4),
                                           **LAUNCH_OPTIONS})
        result[decl.name] = compiled.asm["ptx"]
    return result


def spec_ptx(spec: UpdateSpec | BagSpec, arch: int = 90) -> tuple[str, dict[str, str]]:
    """(generated source, {kernel: PTX}) of one spec."""
    unit = unit_of(spec)
    return unit[0], ptx_many([unit], arch)[0]


def export(spec: UpdateSpec | BagSpec) -> dict[str, str]:
    """`ekko compile --target triton`'s files of a kernel: its Triton source and the PTX of
    each of its Triton kernels for sm_90 (suffix -> text; `backends.Runtime.export`)."""
    source, ptx = spec_ptx(spec)
    return {".triton.py": source, **{f".{name}.ptx": text for name, text in ptx.items()}}


if __name__ == "__main__":  # ptx_many's fresh process: units in on stdin, PTX out on stdout
    import pickle

    _units = pickle.loads(sys.stdin.buffer.read())
    sys.stdout.buffer.write(pickle.dumps([_ptx(*u, int(sys.argv[1])) for u in _units]))
