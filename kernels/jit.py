"""LLVM JIT for generated kernels, with a compile cache in memory and on disk.

Kernels are compiled for the host CPU (its name and features) at O3 with
loop and SLP vectorization. The on-disk cache stores the object code MCJIT
produced, keyed by a hash of the LLVM IR text, the CPU and the llvmlite
version, so a second process start links cached code instead of running the
optimizer again.

A cache entry is verified before MCJIT sees it: it starts with a header
holding the key it was built for and a SHA-256 of the object code. A
truncated, corrupted, foreign or misplaced entry (say two files swapped) fails
the check and is rebuilt and rewritten; LLVM never loads bytes that are not
the object it would have built (it aborts the process on a damaged one).
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import llvmlite
import llvmlite.binding as llvm

from ..compiler.backend.tuning import cache_root

_lock = threading.Lock()
_initialized = False
_memory_cache: dict[str, "JitModule"] = {}


# LLVM (llvmlite 0.50's) folds the tail of a short constant-trip-count loop
# by masking, and on AVX-512 the scalarized last lane of a masked bf16
# (trunc nuw i32 -> i16) store is emitted as a 32-bit store: it overwrote the
# first value of the next row (FTRL, bf16, dim 9). Vectorizing such loops with
# a scalar epilogue instead avoids the pattern; the option is part of the
# cache key, so objects built without it are never reused.
LLVM_OPTIONS = ("-vectorizer-min-trip-count=2",)


def _init() -> None:
    """llvmlite 0.50: initialize() raises; the native target is all we need."""
    global _initialized
    if not _initialized:
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        for option in LLVM_OPTIONS:
            llvm.set_option("ekko", option)
        _initialized = True


def host_cpu() -> tuple[str, str]:
    _init()
    return llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()


def cache_dir() -> Path | None:
    """`<cache root>/kernels` (tuning.cache_root: EKKO_CACHE_DIR, else ~/.cache/ekko);
    None when EKKO_CACHE_DIR=off disables it."""
    root = cache_root()
    return None if root is None else root / "kernels"


def _target_machine() -> llvm.TargetMachine:
    """A fresh target machine per engine: MCJIT takes ownership of it."""
    cpu, features = host_cpu()
    target = llvm.Target.from_default_triple()
    return target.create_target_machine(
        cpu=cpu, features=features, opt=3, reloc="default", codemodel="jitdefault"
    )


def optimize(module: llvm.ModuleRef, tm: llvm.TargetMachine) -> None:
    """O3 with loop and SLP vectorization through the new pass builder."""
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pto.loop_vectorization = True
    pto.slp_vectorization = True
    pto.loop_unrolling = True
    pto.loop_interleaving = True
    pb = llvm.create_pass_builder(tm, pto)
    pm = pb.getModulePassManager()
    pm.run(module, pb)


@dataclass
class JitModule:
    """A compiled module; keeps its engine alive as long as addresses are used."""

    engine: llvm.ExecutionEngine
    key: str
    from_disk: bool
    optimized_ir: str | None

    def address(self, name: str) -> int:
        addr = self.engine.get_function_address(name)
        if not addr:
            raise KeyError(f"no function {name!r} in compiled module")
        return addr


def ir_key(llvm_ir: str) -> str:
    cpu, features = host_cpu()
    h = hashlib.sha256()
    for part in (llvm_ir, cpu, features, llvmlite.__version__, "ekko-jit-1", *LLVM_OPTIONS):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def compile_ir(llvm_ir: str, *, keep_ir: bool = False) -> JitModule:
    """Compile LLVM IR text (or reuse a cached build) and return the module."""
    key = ir_key(llvm_ir)
    with _lock:
        cached = _memory_cache.get(key)
        if cached is not None:
            return cached
        module = _build(llvm_ir, key, keep_ir)
        _memory_cache[key] = module
        return module


def _build(llvm_ir: str, key: str, keep_ir: bool) -> JitModule:
    _init()
    directory = cache_dir()
    obj_path = directory / f"{key}.o" if directory else None
    tm = _target_machine()
    mod = llvm.parse_assembly(llvm_ir)
    mod.verify()
    cached_obj = _read_entry(obj_path, key)
    from_disk = cached_obj is not None
    optimized_ir = None
    if not from_disk:
        optimize(mod, tm)
        optimized_ir = str(mod) if keep_ir else None
    engine = llvm.create_mcjit_compiler(mod, tm)

    def notify(_module: llvm.ModuleRef, data: bytes) -> None:
        if obj_path is None:
            return
        try:
            obj_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = obj_path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(_entry(key, data))
            os.replace(tmp, obj_path)
        except OSError:
            pass  # a read-only cache only costs a recompile

    def getbuffer(_module: llvm.ModuleRef) -> bytes | None:
        return cached_obj

    engine.set_object_cache(notify, getbuffer)
    engine.finalize_object()
    return JitModule(engine, key, from_disk, optimized_ir)


# An entry: magic, SHA-256 of the key (32 bytes), SHA-256 of the object (32),
# the object's length, the object.
_MAGIC = b"EKKOJIT1"
_HEADER = struct.Struct("<8s32s32sQ")


def _entry(key: str, obj: bytes) -> bytes:
    """The bytes of a cache entry for object code `obj` built for `key`."""
    return _HEADER.pack(_MAGIC, _key_bytes(key), hashlib.sha256(obj).digest(), len(obj)) + obj


def _key_bytes(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _read_entry(path: Path | None, key: str) -> bytes | None:
    """The object code cached under `path`, or None when absent or not verified
    (the build then compiles from IR and overwrites the entry)."""
    if path is None:
        return None
    try:
        return _verified(path.read_bytes(), key)
    except OSError:
        return None


def _verified(data: bytes, key: str) -> bytes | None:
    """The object in `data` if the header names `key` and the checksum matches."""
    if len(data) < _HEADER.size:
        return None
    magic, built_for, digest, length = _HEADER.unpack_from(data)
    obj = data[_HEADER.size:]
    if magic != _MAGIC or built_for != _key_bytes(key) or length != len(obj):
        return None
    return obj if hashlib.sha256(obj).digest() == digest else None


def clear_memory_cache() -> None:
    """Forget in-process builds (tests use it to exercise the disk cache)."""
    with _lock:
        _memory_cache.clear()


def emit_object(llvm_ir: str, prefix: str = "") -> tuple[bytes, str]:
    """Optimized object code and optimized IR text of a module, for `ekko compile`.

    `prefix` goes before the name of every function the module defines, so
    several kernels' objects link into one library without clashing.
    """
    _init()
    tm = _target_machine()
    mod = llvm.parse_assembly(llvm_ir)
    for fn in mod.functions:
        if prefix and not fn.is_declaration:
            fn.name = prefix + fn.name
    mod.verify()
    optimize(mod, tm)
    return tm.emit_object(mod), str(mod)
