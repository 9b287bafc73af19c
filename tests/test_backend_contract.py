"""Both runtimes behind one contract: the same mistakes refused with the same messages.

The native runtime and the Triton runtime share their argument checks
(`ekko.kernels.calls`); here each mistake is made against both, with torch
CPU tensors (Triton runs in its interpreter without a GPU), and the two
messages must be the very same.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET", "") in ("", "0") and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import ekko  # noqa: E402
from ekko.kernels.errors import EkkoError  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
ROWS, DIM = 16, 8


def _update_call(**change):
    """A valid Adam update with int8 serving copy and versions, one argument changed."""
    def z(*shape, dtype=torch.float32):
        return torch.zeros(shape, dtype=dtype, device=DEVICE)

    table = z(ROWS, DIM)
    args = dict(table=table, ids=torch.tensor([1, 3, 1], device=DEVICE), grads=z(3, DIM),
                state=(z(ROWS, DIM), z(ROWS, DIM)), serving=z(ROWS, DIM + 8, dtype=torch.uint8),
                versions=z(ROWS, dtype=torch.int64), step=1)
    args.update(change)
    return args


def _mistakes():
    t = torch.zeros(ROWS, DIM, device=DEVICE)
    return {
        "table dtype": dict(table=torch.zeros(ROWS, DIM, dtype=torch.float64, device=DEVICE)),
        "1-D table": dict(table=torch.zeros(ROWS * DIM, device=DEVICE)),
        "ids dtype": dict(ids=torch.tensor([1, 3, 1], dtype=torch.int32, device=DEVICE)),
        "2-D ids": dict(ids=torch.zeros(3, 1, dtype=torch.int64, device=DEVICE)),
        "grads shape": dict(grads=torch.zeros(2, DIM, device=DEVICE)),
        "state missing": dict(state=None),
        "state shape": dict(state=(torch.zeros(ROWS, DIM, device=DEVICE),
                                   torch.zeros(ROWS, device=DEVICE))),
        "serving missing": dict(serving=None),
        "serving width": dict(serving=torch.zeros(ROWS, DIM, dtype=torch.uint8, device=DEVICE)),
        "versions dtype": dict(versions=torch.zeros(ROWS, dtype=torch.int32, device=DEVICE)),
        "state aliases table": dict(table=t, state=(t, torch.zeros(ROWS, DIM, device=DEVICE))),
        "step 0": dict(step=0),
        "not a tensor": dict(grads="grads"),
        "transposed": dict(table=torch.zeros(DIM, ROWS, device=DEVICE).T),
        "requires grad": dict(table=torch.zeros(ROWS, DIM, device=DEVICE, requires_grad=True)),
    }


MISTAKES = _mistakes()


def _refusal(kernel, args) -> str:
    with pytest.raises(EkkoError) as info:
        kernel(**args)
    return str(info.value)


@pytest.fixture(scope="module")
def update_kernels():
    return {t: ekko.update_kernel("adam", DIM, serving="int8", threads=1, target=t)
            for t in ("llvm", "triton")}


@pytest.mark.skipif(DEVICE != "cpu", reason="the native runtime takes CPU tensors only")
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_both_runtimes_refuse_an_update_mistake_alike(update_kernels, mistake: str) -> None:
    args = _update_call(**MISTAKES[mistake])
    native = _refusal(update_kernels["llvm"], args)
    triton = _refusal(update_kernels["triton"], args)
    if mistake == "not a tensor":  # what each runtime takes differs, so does the message
        assert "grads must be a" in native and "grads must be a" in triton
    else:
        assert native == triton


BAG_MISTAKES = {
    "table width": dict(table=torch.zeros(ROWS, DIM + 1, device=DEVICE)),
    "ids dtype": dict(ids=torch.tensor([1, 2], dtype=torch.int32, device=DEVICE)),
    "offsets missing": dict(offsets=None),
    "weights missing": dict(per_sample_weights=None),
    "weights count": dict(per_sample_weights=torch.ones(3, device=DEVICE)),
    "out shape": dict(out=torch.zeros(1, DIM, device=DEVICE)),
}


@pytest.mark.skipif(DEVICE != "cpu", reason="the native runtime takes CPU tensors only")
@pytest.mark.parametrize("mistake", list(BAG_MISTAKES))
def test_both_runtimes_refuse_a_lookup_mistake_alike(mistake: str) -> None:
    args = dict(table=torch.zeros(ROWS, DIM, device=DEVICE),
                ids=torch.tensor([1, 2], device=DEVICE),
                offsets=torch.tensor([0, 1, 2], device=DEVICE),
                per_sample_weights=torch.ones(2, device=DEVICE))
    args.update(BAG_MISTAKES[mistake])
    kernels = [ekko.bag_kernel(DIM, weighted=True, target=t) for t in ("llvm", "triton")]
    native, triton = (_refusal(k, args) for k in kernels)
    assert native == triton


# -- the contract: a backend is one Target plus one Runtime, found by name everywhere --------

def test_every_target_has_a_runtime_and_every_runtime_a_target() -> None:
    from ekko.compiler.backend.targets import TARGETS
    from ekko.kernels.backends import RUNTIMES

    assert set(RUNTIMES) == set(TARGETS)


@pytest.fixture()
def echo_backend(monkeypatch):
    """A third backend registered the documented way (one Target, one Runtime): its
    'kernels' record the spec they were loaded with."""
    from ekko.compiler.backend import targets
    from ekko.compiler.backend.spec import BagSpec, UpdateSpec
    from ekko.kernels import backends

    class Loaded:
        def __init__(self, spec):
            self.spec = spec

    def echo_target() -> targets.Target:
        return targets.Target("echo", lambda spec: f"// {spec.key()}\n", "//",
                              (UpdateSpec, BagSpec), lambda dim: {"num_warps": 3})

    monkeypatch.setitem(targets.TARGETS, "echo", echo_target)
    monkeypatch.setitem(backends.RUNTIMES, "echo",
                        lambda: backends.Runtime(Loaded, Loaded, lambda spec: {".echo": "x"}))
    return Loaded


def test_a_new_backend_is_reached_by_name_through_every_entry_point(echo_backend) -> None:
    """update_kernel and bag_kernel dispatch through the registries (no name is
    hard-coded), and the update was scheduled by the target's own launch settings."""
    k = ekko.update_kernel("sgd", 8, target="echo")
    assert isinstance(k, echo_backend) and k.spec.num_warps == 3
    b = ekko.bag_kernel(8, target="echo")
    assert isinstance(b, echo_backend) and b.spec.dim == 8


def test_upd_schedule_writes_the_targets_launch_settings(echo_backend) -> None:
    from ekko.compiler.pipeline import UpdateRequest, update_module, run_pipeline
    from ekko.compiler.registry import pipeline_spec

    module = update_module(UpdateRequest("sgd", 8))
    run_pipeline(module, pipeline_spec("standard", target="echo"))
    assert "num_warps = 3" in str(module)


def test_an_unknown_target_is_refused_naming_the_known_ones() -> None:
    from ekko.compiler.backend.targets import TARGETS

    with pytest.raises(ekko.UpdateError, match="unknown target 'cuda'; expected one of "
                       + ", ".join(TARGETS)):
        ekko.update_kernel("sgd", 8, target="cuda")
    with pytest.raises(ekko.LookupError, match="unknown target 'cuda'"):
        ekko.bag_kernel(8, target="cuda")


def test_native_kernels_bind_the_dedup_phase_by_name(monkeypatch) -> None:
    """The ABI alone fixes argument positions: with update_dedup's arguments declared in
    reverse order, emitter, packed wrapper and runtime still agree (an emitter unpacking
    positions would read the hash table as the ids)."""
    import dataclasses

    import numpy as np

    from ekko.compiler.backend import abi

    declared = abi.update_dedup

    def reversed_dedup(index_dtype: str) -> abi.Signature:
        sig = declared(index_dtype)
        return dataclasses.replace(sig, args=tuple(reversed(sig.args)))

    monkeypatch.setattr(abi, "update_dedup", reversed_dedup)
    k = ekko.update_kernel("sgd", 4, lr=0.5, threads=2, deterministic=True)
    table = np.zeros((10, 4), np.float32)
    ids = np.array([3, 7, 3, 0], np.int64)
    grads = np.arange(16, dtype=np.float32).reshape(4, 4)
    k(table, ids, grads)
    want = np.zeros((10, 4), np.float32)
    np.subtract.at(want, ids, 0.5 * grads)
    np.testing.assert_array_equal(table, want)
    with pytest.raises(ekko.UpdateError, match="id 10 at position 1 is out of range"):
        k(table, np.array([1, 10], np.int64), grads[:2])


def test_triton_launches_bind_arguments_by_name(monkeypatch) -> None:
    """The emitter's declaration alone fixes a Triton kernel's argument order: with the
    apply's (and so the check's) arguments declared in reverse, the runtime's launches
    still pass each tensor to its parameter, and the result equals the native one."""
    from ekko.compiler.backend import triton_update

    declared = triton_update.apply_args
    monkeypatch.setattr(triton_update, "apply_args", lambda spec: declared(spec)[::-1])
    results = []
    for target, device in (("llvm", "cpu"), ("triton", DEVICE)):  # native: CPU memory
        k = ekko.update_kernel("adagrad", DIM, serving="int8", lr=0.1, target=target)
        table = torch.linspace(-1, 1, ROWS * DIM).reshape(ROWS, DIM).to(device)
        state = torch.full((ROWS, DIM), 0.1, device=device)
        serving = torch.zeros(ROWS, DIM + 8, dtype=torch.uint8, device=device)
        versions = torch.zeros(ROWS, dtype=torch.int64, device=device)
        grads = torch.linspace(-2, 2, 3 * DIM).reshape(3, DIM).to(device)
        k(table, torch.tensor([5, 2, 5], device=device), grads, state=state, serving=serving,
          versions=versions, step=1, version=7)
        results.append((table.cpu(), state.cpu(), versions.cpu()))
    (t1, s1, v1), (t2, s2, v2) = results
    torch.testing.assert_close(t2, t1)
    torch.testing.assert_close(s2, s1)
    assert v2.tolist() == v1.tolist() and v2[5] == 7 and v2[2] == 7


def test_ekko_compile_reaches_a_new_backend_by_name(echo_backend, tmp_path) -> None:
    """`--target` offers every registered target, and each kernel gets the files its
    runtime exports beside the native object (listed in the manifest)."""
    import json

    from ekko.cli import main

    model = tmp_path / "small.ekko"
    model.write_text("model small {\n  table users { rows 100; dim 8; }\n"
                     "  feature user -> users pooling sum;\n}\n")
    out = tmp_path / "out"
    assert main(["compile", str(model), "-o", str(out), "--target", "echo", "-q"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["kernels"]:
        echo = [f for f in entry["files"] if f.endswith(".echo")]
        assert echo and (out / echo[0]).read_text() == "x"
