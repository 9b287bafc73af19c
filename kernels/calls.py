"""What every kernel runtime checks of a call the same way, whatever its target.

The native runtime (`update`, `lookup`) and the Triton runtime
(`triton_runtime`) take the same arguments and refuse the same mistakes with
the same messages: the checks that do not depend on how a runtime reaches
its memory are written once here, below both.
"""

from __future__ import annotations

import numpy as np

from ..compiler.backend.spec import UpdateSpec
from .errors import UpdateError

INT64_MAX = 2**63 - 1


def call_scalars(step: object, version: object, seed: object) -> tuple[int, int, int]:
    """A call's step, version (default: the step) and seed as the kernels take
    them (int64; the seed's 64 bits wrapped into a signed word); every
    runtime checks them here."""
    if isinstance(step, (int, np.integer)) and not isinstance(step, bool) and step < 1:
        raise UpdateError(f"step counts from 1, got {step!r}")
    step = _int64("step", step, low=1)
    version = step if version is None else _int64("version", version)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise UpdateError(f"seed must be an integer, got {seed!r}")
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return step, version, seed - (1 << 64) if seed > INT64_MAX else seed


def _int64(name: str, value: object, low: int = 0) -> int:
    """An integer argument that the kernel receives as int64."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UpdateError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if not low <= v <= INT64_MAX:
        raise UpdateError(f"{name} must be in [{low}, 2**63 - 1], got {v}")
    return v


def buffer_name(spec: UpdateSpec, index: int) -> str:
    """The buffer a kernel's err_buf code names: 0 the table, 1 + k state k, then serving."""
    names = ["table", *(f"state {n!r}" for n in spec.state_shapes), "serving copy"]
    return names[index] if 0 <= index < len(names) else f"buffer {index}"


def state_arrays(spec: UpdateSpec, state) -> list[tuple[str, str, object]]:
    """(state name, argument label, array) of each state array the call passed.

    One state array is passed alone, several as a tuple in catalog order;
    every runtime (CPU or Triton) unpacks `state=` here.
    """
    names = spec.state_shapes
    if not names:
        if state is not None:
            raise UpdateError(f"{spec.optimizer} keeps no state: pass state=None")
        return []
    if state is None:
        raise UpdateError(f"{spec.optimizer} needs its state: pass state=")
    if len(names) == 1:
        return [(names[0], "state", state)]
    if not isinstance(state, (tuple, list)) or len(state) != len(names):
        raise UpdateError(f"{spec.optimizer}'s state is a tuple ({', '.join(names)})")
    return [(name, name, x) for name, x in zip(names, state)]
