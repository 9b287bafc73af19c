"""What every kernel runtime checks of a call the same way, whatever its target.

The native runtime (`update`, `lookup`) and the Triton runtime
(`triton_runtime`) take the same arguments and refuse the same mistakes with
the same messages: the checks that do not depend on how a runtime reaches
its memory are written once here, below both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..compiler.backend.spec import BagSpec, UpdateSpec
from ..dialects import catalog
from ..dialects.limits import MAX_BATCH
from .arrays import INT64_MAX
from .errors import EkkoError, LookupError, UpdateError


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


class Arg(Protocol):
    """One checked array argument, as a runtime sees it (`arrays.ArrayArg`, or the
    Triton runtime's tensor argument): its name, dtype name and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def expect(self, dtypes: tuple[str, ...], shape: tuple[int, ...] | None = None,
               ndim: int | None = None) -> None: ...


class Arrays(Protocol):
    """How a runtime turns a call's arrays into `Arg`s: what memory it can reach
    (numpy/CPU tensors, or tensors on one device) and which dtypes stand for a
    layout there (the layout registry's dtypes). The checks of what a spec needs are `update_args` and `bag_args`."""

    error: type[EkkoError]

    def arg(self, name: str, x: Any, writable: bool = False) -> Any: ...

    def disjoint(self, written: list[Any], read: list[Any]) -> None: ...


@dataclass
class UpdateArgs:
    """A fused update's arguments, checked: nothing is written before all of this holds."""

    rows: int
    n: int
    table: Any
    ids: Any
    grads: Any
    states: list[Any]
    serving: Any | None
    versions: Any | None
    seq: Any | None
    grad_index: Any | None = None
    grad_scale: Any | None = None


def update_args(spec: UpdateSpec, arrays: Arrays, table: Any, ids: Any, grads: Any,
                state: Any, serving: Any, versions: Any, seq: Any, grad_index: Any = None,
                grad_scale: Any = None) -> UpdateArgs:
    """Every argument of an update call checked against the spec, in one order and with
    one message per mistake for every runtime. With `grad_index` the delta is gathered:
    row p is grads[grad_index[p]] (times grad_scale[p]); the caller checks the index's
    range (it needs the values, which only a host runtime can read)."""
    t = arrays.arg("table", table, writable=True)
    if len(t.shape) != 2 or t.shape[1] != spec.dim:
        raise UpdateError(f"table must have shape (rows, {spec.dim}), got {tuple(t.shape)}")
    rows = t.shape[0]
    t.expect(catalog.layout(spec.table_dtype).dtypes, (rows, spec.dim))
    i = arrays.arg("ids", ids)
    if len(i.shape) != 1:
        raise UpdateError(f"ids must be 1-D, got shape {tuple(i.shape)}")
    i.expect(index_dtypes(spec.index_dtype), (i.shape[0],))
    n = i.shape[0]
    if n > MAX_BATCH:
        raise UpdateError(f"a delta holds at most {MAX_BATCH:,} rows (MAX_BATCH), got {n:,}")
    g = arrays.arg("grads", grads)
    gidx = gscale = None
    if grad_index is None:
        if grad_scale is not None:
            raise UpdateError("grad_scale scales a gathered delta: pass grad_index too")
        g.expect(("float32",), (n, spec.dim))
    else:
        g.expect(("float32",), ndim=2)
        if g.shape[1] != spec.dim:
            raise UpdateError(f"grads must have shape (rows, {spec.dim}), got {tuple(g.shape)}")
        gidx = arrays.arg("grad_index", grad_index)
        gidx.expect(("int64",), (n,))
        if grad_scale is not None:
            gscale = arrays.arg("grad_scale", grad_scale)
            gscale.expect(("float32",), (n,))
    states = []
    for name, label, x in state_arrays(spec, state):
        a = arrays.arg(label, x, writable=True)
        a.expect(("float32",), spec.entry.state_shape(name, rows, spec.dim))
        states.append(a)
    srv = None
    if spec.serving is not None:
        if serving is None:
            raise UpdateError(f"this kernel refreshes a {spec.serving} serving copy: pass serving=")
        srv = arrays.arg("serving", serving, writable=True)
        entry = catalog.layout(spec.serving)
        srv.expect(entry.dtypes, (rows, entry.width(spec.dim)))
    elif serving is not None:
        raise UpdateError("this kernel has no serving copy: compile it with serving=")
    ver = None
    if versions is not None:
        ver = arrays.arg("versions", versions, writable=True)
        ver.expect(("int64",), (rows,))
    sq = None
    if seq is not None:
        sq = arrays.arg("seq", seq, writable=True)
        sq.expect(SEQ_DTYPES, (rows,))
    arrays.disjoint([t, *states, *(x for x in (srv, ver, sq) if x is not None)],
                    [i, g, *(x for x in (gidx, gscale) if x is not None)])
    return UpdateArgs(rows, n, t, i, g, states, srv, ver, sq, gidx, gscale)


SEQ_DTYPES = ("uint32", "int32")  # sequence words: one uint32 a row (int32: the same bits)


def index_dtypes(index_dtype: str) -> tuple[str, ...]:
    """The dtype names of a spec's ids."""
    return ("int32",) if index_dtype == "i32" else ("int64",)


def bag_table_width(spec: BagSpec, columns: int) -> None:
    """A lookup table holds one row of the layout's width (values, or bytes when quantized)."""
    width = catalog.layout(spec.layout).width(spec.dim)
    if columns != width:
        raise LookupError(f"{spec.layout} table of dim {spec.dim} needs {width} columns, "
                          f"got {columns}")


def bag_offsets_given(spec: BagSpec, offsets: Any) -> bool:
    """Whether the call's offsets fit the mode: `none` takes none, the pooled modes need them."""
    if spec.mode == "none":
        if offsets is not None:
            raise LookupError("mode 'none' takes no offsets")
        return False
    if offsets is None:
        raise LookupError(f"mode {spec.mode!r} needs offsets")
    return True


def bag_count(noffsets: int, last: Callable[[], int], nids: int,
              include_last: bool | None) -> tuple[bool, int]:
    """(include_last, number of bags) of `noffsets` offsets over `nids` ids.

    With include_last None the convention is inferred: B+1 entries when
    there are at least two and the last (`last()`, read only then) equals
    len(ids), else torch's B entries. Torch-style offsets whose last bag is
    empty look like B+1 ones: pass include_last_offset=False for those.
    """
    if noffsets == 0:
        return False, 0
    if include_last is None:
        include_last = noffsets >= 2 and last() == nids
    return include_last, noffsets - 1 if include_last else noffsets


def bag_weights_given(spec: BagSpec, weights: Any) -> bool:
    """Whether per-sample weights are given, refusing them where the spec says otherwise."""
    if not spec.weighted:
        if weights is not None:
            raise LookupError("per_sample_weights given to an unweighted kernel")
        return False
    if weights is None:
        raise LookupError("weighted kernel needs per_sample_weights")
    return True
