"""No lookup returns a torn row (part old, part new) while updates run beside it.

A writer thread updates a few wide rows over and over with random
gradients, so every version of a row has a different shape (int8 rows are
invariant under affine changes: a constant or ramp-shaped row would hide a
tear). After each update it snapshots the rows' serving bytes. Readers look
the same rows up concurrently; afterwards every row they saw must be exactly
the lookup of one snapshot. Without sequence words the same race must show
tears (the negative control asserts it); with them, none may appear.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import ekko

DIM = 1024  # wide rows take long to write: a window a reader can fall into
ROWS = 8
UPDATES = 150
ROUNDS = 30  # races the negative control may run to see a tear


def _race(layout: str, use_seq: bool) -> tuple[int, int]:
    """(rows checked, torn rows seen) of one writer racing two readers."""
    rng = np.random.default_rng(7)
    serving_layout = None if layout == "master" else layout
    k = ekko.update_kernel("sgd", DIM, serving=serving_layout, lr=0.5, threads=1)
    table = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    versions = np.zeros(ROWS, np.int64)
    seq = np.zeros(ROWS, np.uint32) if use_seq else None
    lookup_layout = "f32" if layout == "master" else layout
    serving = None if layout == "master" else ekko.quantize_rows(table, layout)
    served = table if layout == "master" else serving
    look = ekko.bag_kernel(DIM, lookup_layout, mode="none", threads=1)
    ids = np.arange(ROWS, dtype=np.int64)
    snapshots = [served.copy()]
    stop = threading.Event()
    reading = threading.Barrier(3)  # the writer starts once both readers are reading
    seen: list[np.ndarray] = []

    def write() -> None:
        reading.wait()
        for step in range(1, UPDATES + 1):
            grads = rng.standard_normal((ROWS, DIM)).astype(np.float32)
            k(table, ids, grads, serving=serving, versions=versions, step=step, seq=seq)
            snapshots.append(served.copy())
        stop.set()

    def read() -> None:
        seen.append(look(served, ids, seq=seq))
        reading.wait()
        while not stop.is_set():
            seen.append(look(served, ids, seq=seq))

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    valid = [{look(snap, ids)[r].tobytes() for snap in snapshots} for r in range(ROWS)]
    torn = sum(out[r].tobytes() not in valid[r] for out in seen for r in range(ROWS))
    return len(seen) * ROWS, torn


@pytest.mark.parametrize("layout", ["master", "f16", "bf16", "int8", "int4"])
def test_lookups_never_see_a_torn_row(layout: str) -> None:
    checked, torn = _race(layout, use_seq=True)
    assert checked > 0
    assert torn == 0, f"{torn} of {checked} rows read were part old, part new"


@pytest.mark.parametrize("layout", ["master", "int8"])
def test_the_race_is_real_without_sequence_words(layout: str) -> None:
    """The same race without seq words must show tears, or the test above proves nothing.

    A tear needs a reader inside a row's write; one race (a few tenths of a
    second) usually shows several on two cores, so it is run again, up to
    ROUNDS times, until one shows up.
    """
    for _ in range(ROUNDS):
        checked, torn = _race(layout, use_seq=False)
        if torn:
            break
    assert torn > 0, f"no torn row in {ROUNDS} races without sequence words ({layout})"


def test_seq_must_fit_the_table() -> None:
    k = ekko.update_kernel("sgd", 4)
    table = np.zeros((10, 4), np.float32)
    with pytest.raises(ekko.EkkoError, match="seq"):
        k(table, np.array([1]), np.ones((1, 4), np.float32), seq=np.zeros(9, np.uint32))
    look = ekko.bag_kernel(4, "f32", mode="none")
    with pytest.raises(ekko.EkkoError, match="seq"):
        look(table, np.array([1]), seq=np.zeros(10, np.float32))
