"""Locks and scratch belong to a table, not to a compiled kernel.

Two kernel objects updating one table serialize (no lost updates); one
kernel updating two tables does not (each table has its own lock).
"""

from __future__ import annotations

import threading

import numpy as np

import ekko
from ekko.kernels.native import table_runtime

DIM = 16


def test_two_kernels_on_one_table_lose_no_update() -> None:
    # few wide rows, many rounds: the writers keep meeting inside the same row
    rows, dim, rounds = 8, 4096, 400
    a = ekko.update_kernel("sgd", dim, lr=1.0, threads=1)
    b = ekko.update_kernel("sgd", dim, lr=1.0, threads=1)
    assert a is not b
    table = np.zeros((rows, dim), np.float32)
    ids = np.arange(rows, dtype=np.int64)
    grads = -np.ones((rows, dim), np.float32)  # each update adds 1 to every value

    def run(k) -> None:
        for step in range(1, rounds + 1):
            k(table, ids, grads, step=step)

    threads = [threading.Thread(target=run, args=(k,)) for k in (a, b, a)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert np.all(table == 3 * rounds), f"lost updates: min {table.min()}"


def test_a_busy_table_blocks_only_its_own_updates() -> None:
    k = ekko.update_kernel("rowwise_adagrad", DIM)
    t1, t2 = np.zeros((100, DIM), np.float32), np.zeros((100, DIM), np.float32)
    m1, m2 = np.zeros(100, np.float32), np.zeros(100, np.float32)
    ids, grads = np.array([1, 2, 2]), np.ones((3, DIM), np.float32)
    busy = table_runtime(t1.ctypes.data).lock
    with busy:  # as if a long update of t1 were running
        other = threading.Thread(target=k, args=(t2, ids, grads), kwargs={"state": m2})
        other.start()
        other.join(timeout=30)
        assert not other.is_alive(), "an update of another table waited for t1's lock"
        same = threading.Thread(target=k, args=(t1, ids, grads), kwargs={"state": m1})
        same.start()
        same.join(timeout=0.3)
        assert same.is_alive(), "an update of t1 ran while t1 was locked"
        assert not t1.any()
    same.join(timeout=30)
    assert not same.is_alive()
    np.testing.assert_array_equal(t1, t2)
    assert m1[2] > 0 and m2[2] > 0


def test_scratch_belongs_to_the_table() -> None:
    k = ekko.update_kernel("adagrad", DIM, threads=2)
    small, big = np.zeros((10, DIM), np.float32), np.zeros((300_000, DIM), np.float32)
    s_small, s_big = np.zeros_like(small), np.zeros_like(big)
    k(small, np.array([1, 1, 2]), np.ones((3, DIM), np.float32), state=s_small)
    ids = np.random.default_rng(0).permutation(300_000)[:200_000]
    k(big, ids, np.ones((len(ids), DIM), np.float32), state=s_big)
    # the big delta grew the big table's buffers, not the small table's
    assert min(sc.n for sc in k.scratch_of(big)) >= 200_000
    assert max(sc.n for sc in k.scratch_of(small)) <= 1024
