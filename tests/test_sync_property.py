"""Merge is idempotent and order-independent; a malformed packet changes nothing.

Property tests (hypothesis) over the compiled merge kernel in every serving
layout: the same packets merged in any order, any number of times, give
byte-identical replicas; one bad entry anywhere in a packet raises EkkoError
and leaves the replica byte-identical.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ekko.dialects import catalog
from ekko.kernels.errors import EkkoError
from ekko.kernels.quant import quantize_rows
from ekko.kernels.sync import merge_kernel

LAYOUTS = tuple(catalog.LAYOUTS)
ROWS, DIM, NEWEST = 23, 5, 6


def make_packets(seed: int, layout: str, sizes: list[int]):
    rng = np.random.default_rng(seed)
    packets = []
    for n in sizes:
        ids = rng.integers(0, ROWS, n).astype(np.int64)
        rows = quantize_rows(rng.standard_normal((n, DIM)).astype(np.float32), layout)
        if n and rng.random() < 0.5:  # same id, same version, different bytes: ties
            ids[-1] = ids[0]
        versions = rng.integers(0, NEWEST + 1, n).astype(np.int64)
        packets.append((ids, rows, versions))
    return packets


def fresh_replica(layout: str):
    rng = np.random.default_rng(99)
    serving = quantize_rows(rng.standard_normal((ROWS, DIM)).astype(np.float32), layout)
    return serving, np.zeros(ROWS, np.int64), np.zeros(ROWS, np.uint32)


def merge_all(layout: str, packets, order) -> bytes:
    k = merge_kernel(DIM, layout, seq=True, threads=2)
    serving, versions, seq = fresh_replica(layout)
    for i in order:
        ids, rows, pv = packets[i]
        k(serving, versions, ids, rows, pv, newest=NEWEST, seq=seq)
    return serving.tobytes() + versions.tobytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**32 - 1),
       sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6), data=st.data())
def test_merge_is_order_independent_and_idempotent(layout, seed, sizes, data) -> None:
    packets = make_packets(seed, layout, sizes)
    order = list(range(len(packets)))
    shuffled = data.draw(st.permutations(order))
    repeats = data.draw(st.lists(st.sampled_from(order), max_size=8))
    reference = merge_all(layout, packets, order)
    assert merge_all(layout, packets, shuffled + repeats) == reference
    assert merge_all(layout, packets, list(reversed(order)) * 2) == reference


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**32 - 1),
       n=st.integers(1, 40), fault=st.sampled_from(["id", "negative_id", "version",
                                                     "negative_version", "nan"]),
       data=st.data())
def test_a_malformed_packet_leaves_the_replica_byte_identical(layout, seed, n, fault,
                                                               data) -> None:
    k = merge_kernel(DIM, layout, seq=True, threads=2)
    serving, versions, seq = fresh_replica(layout)
    (good,) = make_packets(seed, layout, [30])
    k(serving, versions, *good, newest=NEWEST, seq=seq)
    before = serving.tobytes() + versions.tobytes() + seq.tobytes()
    ids, rows, pv = (a.copy() for a in make_packets(seed + 1, layout, [n])[0])
    pos = data.draw(st.integers(0, n - 1))
    if fault == "id":
        ids[pos] = ROWS
    elif fault == "negative_id":
        ids[pos] = -1
    elif fault == "version":
        pv[pos] = NEWEST + 1
    elif fault == "negative_version":
        pv[pos] = -1
    elif layout in ("f32", "f16"):
        rows[pos, data.draw(st.integers(0, DIM - 1))] = np.inf
    elif layout == "bf16":
        rows[pos, 0] = 0x7FC0  # NaN bits
    elif layout == "int8":
        rows[pos, DIM + 4:] = np.frombuffer(np.float32(np.nan).tobytes(), np.uint8)
    elif catalog.layout(layout).codec.kind == "scaled":  # a NaN code, or an inf scale
        if data.draw(st.booleans()):
            rows[pos, data.draw(st.integers(0, DIM - 1))] = 0x7F
        else:
            rows[pos, DIM:] = np.frombuffer(np.float32(np.inf).tobytes(), np.uint8)
    else:
        rows[pos, -4:-2] = np.frombuffer(np.float16(np.inf).tobytes(), np.uint8)
    try:
        k(serving, versions, ids, rows, pv, newest=NEWEST, seq=seq)
    except EkkoError:
        pass
    else:
        raise AssertionError(f"a packet with a bad {fault} at {pos} was accepted")
    assert serving.tobytes() + versions.tobytes() + seq.tobytes() == before
