"""Replica-sync kernels (kern.pack / kern.merge) against a numpy reference.

The reference is written from the spec (newest version wins, ties to the
larger row bytes) and shares no code with the LLVM emitter.
"""

from __future__ import annotations

import threading
import zlib

import numpy as np
import pytest

from ekko.dialects import catalog
from ekko.kernels.errors import EkkoError
from ekko.kernels.quant import quantize_rows
from ekko.kernels.sync import SyncError, merge_kernel, pack_kernel, row_width

LAYOUTS = tuple(catalog.LAYOUTS)


def serving_copy(rng, rows: int, dim: int, layout: str) -> np.ndarray:
    return quantize_rows(rng.standard_normal((rows, dim)).astype(np.float32), layout)


def reference_merge(serving, versions, ids, rows, pversions) -> None:
    """Per row the largest (version, row bytes) among the replica's and the packet's wins."""
    for i, r in enumerate(ids):
        v, cur = int(pversions[i]), int(versions[r])
        if v > cur or (v == cur and rows[i].tobytes() > serving[r].tobytes()):
            serving[r] = rows[i]
            versions[r] = v


def merge_as_reference(k, serving, versions, ids, prow, pver, newest: int, seq: bool,
                       note: object = None) -> int:
    """Merge with k and assert the replica (and its words) ends as the reference's."""
    want_s, want_v = serving.copy(), versions.copy()
    reference_merge(want_s, want_v, ids, prow, pver)
    s = np.zeros(len(versions), np.uint32) if seq else None
    applied = k(serving, versions, ids, prow, pver, newest=newest, seq=s)
    assert serving.tobytes() == want_s.tobytes(), note
    assert np.array_equal(versions, want_v), note
    if seq:
        assert np.all(s % 2 == 0) and int(s.sum()) == 2 * applied, note
    return applied


def random_packet(rng, rows: int, dim: int, layout: str, n: int, newest: int,
                  index=np.int64):
    ids = rng.integers(0, rows, n).astype(index)
    if n:
        ids[0], ids[-1] = 0, rows - 1  # the edge ids
    return ids, serving_copy(rng, n, dim, layout), rng.integers(1, newest + 1, n).astype(np.int64)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seq", [False, True])
def test_merge_matches_reference(layout: str, seq: bool) -> None:
    rng = np.random.default_rng(zlib.crc32(f"{layout}/{seq}".encode()))  # not hash(): reproducible
    for rows, dim, n, threads in [(50, 7, 300, 2), (1000, 64, 9000, 2), (3, 1, 40, 1),
                                  (20000, 13, 5000, 2), (10, 5, 0, 2)]:
        k = merge_kernel(dim, layout, seq=seq, threads=threads)
        serving = serving_copy(rng, rows, dim, layout)
        versions = rng.integers(0, 4, rows).astype(np.int64)
        before = versions.copy()
        ids, prow, pver = random_packet(rng, rows, dim, layout, n, 6)
        applied = merge_as_reference(k, serving, versions, ids, prow, pver, 6, seq)
        assert applied >= int((before != versions).sum())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pack_gathers_rows_and_versions(layout: str) -> None:
    rng = np.random.default_rng(7)
    for rows, dim, n in [(100, 7, 50), (5000, 64, 20000), (1, 3, 5), (9, 2, 0)]:
        serving = serving_copy(rng, rows, dim, layout)
        versions = rng.integers(0, 100, rows).astype(np.int64)
        for index in (np.int32, np.int64):
            ids = rng.integers(0, rows, n).astype(index)
            if n:
                ids[0], ids[-1] = 0, rows - 1
            for seq in (False, True):
                k = pack_kernel(dim, layout, "i32" if index == np.int32 else "i64", seq=seq,
                                threads=2)
                s = np.zeros(rows, np.uint32) if seq else None
                got_rows, got_versions = k(serving, versions, ids, seq=s)
                assert got_rows.shape == (n, row_width(layout, dim))
                assert got_rows.tobytes() == serving[ids].tobytes()
                assert np.array_equal(got_versions, versions[ids])


@pytest.mark.parametrize("layout", ["f32", "int8", "f16"])
@pytest.mark.parametrize("dim", [4, 64, 120, 300, 520])
def test_pack_into_aligned_and_unaligned_packets(layout: str, dim: int) -> None:
    """Packet rows that are 16-byte aligned take streaming stores, others plain copies
    (widths 16, 256, 128, 1200, 2080 bytes: unrolled and looped; int8 rows of dim + 8
    bytes aligned only at dims 120 and 520): the same bytes either way, with the
    rows 0 and rows-1, repeats, both partition counts and a sequence word per row."""
    rng = np.random.default_rng(dim)
    rows, n = 3000, 9000  # over PARALLEL_MIN_ROWS: the partitions split the packet
    serving = serving_copy(rng, rows, dim, layout)
    versions = rng.integers(0, 1 << 40, rows).astype(np.int64)
    ids = np.sort(rng.integers(0, rows, n)).astype(np.int64)
    ids[:3], ids[-3:] = 0, rows - 1
    width = serving.shape[1] * serving.itemsize
    for threads in (1, 2):
        k = pack_kernel(dim, layout, seq=True, threads=threads)
        for shift in (0, serving.itemsize, 8):  # bytes past a 64-byte boundary
            raw = np.zeros(n * width + 128, np.uint8)
            start = (-raw.ctypes.data) % 64 + shift
            out = raw[start:start + n * width].view(serving.dtype).reshape(n, -1)
            out_versions = np.zeros(n, np.int64)
            k(serving, versions, ids, seq=np.zeros(rows, np.uint32), out_rows=out,
              out_versions=out_versions)
            assert out.tobytes() == serving[ids].tobytes(), (threads, shift)
            assert np.array_equal(out_versions, versions[ids])
            assert not raw[:start].any() and not raw[start + n * width:].any()  # nothing else


def test_pack_rejects_out_of_range_ids() -> None:
    k = pack_kernel(4, "f32")
    serving, versions = np.zeros((10, 4), np.float32), np.zeros(10, np.int64)
    for bad in (10, -1):
        with pytest.raises(SyncError, match="out of range"):
            k(serving, versions, np.array([0, 9, bad]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bad_packets_leave_the_replica_untouched(layout: str) -> None:
    rng = np.random.default_rng(3)
    rows, dim = 5000, 9
    k = merge_kernel(dim, layout, seq=True, threads=2)
    serving = serving_copy(rng, rows, dim, layout)
    versions = np.ones(rows, np.int64)
    seq = np.zeros(rows, np.uint32)
    before = (serving.tobytes(), versions.tobytes(), seq.tobytes())
    n = 8000  # large enough for both partitions; the bad row sits late in the second
    ids, prow, pver = random_packet(rng, rows, dim, layout, n, 5)

    def rejected(ids_, rows_, vers_, newest=5, match=""):
        with pytest.raises(SyncError, match=match):
            k(serving, versions, ids_, rows_, vers_, newest=newest, seq=seq)
        assert (serving.tobytes(), versions.tobytes(), seq.tobytes()) == before

    bad = ids.copy(); bad[n - 3] = rows
    rejected(bad, prow, pver, match="out of range")
    bad = ids.copy(); bad[6000] = -1
    rejected(bad, prow, pver, match="out of range")
    rejected(ids, prow, pver, newest=4, match="outside")
    zero = pver.copy(); zero[7000] = -1
    rejected(ids, prow, zero, match="outside")
    nan = prow.copy()
    if layout in ("f32", "f16"):
        nan[7500, dim - 1] = np.nan
    elif layout == "bf16":
        nan[7500, 0] = 0x7F80  # +inf
    elif layout == "int8":
        nan[7500, dim:dim + 4] = np.frombuffer(np.float32(np.inf).tobytes(), np.uint8)
    elif catalog.layout(layout).codec.kind == "scaled":
        nan[7500, 4] = 0xFF  # a NaN code (-NaN)
    else:
        nan[7500, -2:] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)  # the bias
    rejected(ids, nan, pver, match="non-finite")
    rejected(ids[:-1], prow, pver, match="rows of shape")
    rejected(ids, prow, pver[:-1], match="versions")
    rejected(ids, np.ascontiguousarray(prow[:, :-1]), pver, match="rows of shape")
    rejected(ids, prow.astype(np.float64) if layout == "f32" else prow.view(np.int8), pver,
             match="dtype")


def test_errors_are_ekko_errors_and_need_seq_when_built_with_it() -> None:
    k = merge_kernel(4, "f32", seq=True)
    serving, versions = np.zeros((10, 4), np.float32), np.zeros(10, np.int64)
    with pytest.raises(EkkoError, match="seq="):
        k(serving, versions, np.array([1]), np.ones((1, 4), np.float32), np.array([1]), newest=1)
    plain = merge_kernel(4, "f32")
    with pytest.raises(EkkoError, match="without sequence words"):
        plain(serving, versions, np.array([1]), np.ones((1, 4), np.float32), np.array([1]),
              newest=1, seq=np.zeros(10, np.uint32))
    with pytest.raises(EkkoError, match="cannot build"):
        merge_kernel(0, "f32")
    with pytest.raises(EkkoError, match="cannot build"):
        pack_kernel(4, "int3")


def test_two_tables_merge_at_the_same_time() -> None:
    """One compiled kernel, two tables of the same shape, two threads: no shared scratch."""
    rng = np.random.default_rng(11)
    k = merge_kernel(32, "int8", seq=True, threads=2)
    tables = []
    for _ in range(2):
        serving = serving_copy(rng, 20000, 32, "int8")
        versions = np.zeros(20000, np.int64)
        packets = [random_packet(rng, 20000, 32, "int8", 6000, 50) for _ in range(20)]
        want_s, want_v = serving.copy(), versions.copy()
        for ids, prow, pver in packets:
            reference_merge(want_s, want_v, ids, prow, pver)
        tables.append((serving, versions, np.zeros(20000, np.uint32), packets, want_s, want_v))

    def run(t) -> None:
        serving, versions, seq, packets = t[:4]
        for ids, prow, pver in packets:
            k(serving, versions, ids, prow, pver, newest=50, seq=seq)

    threads = [threading.Thread(target=run, args=(t,)) for t in tables]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for serving, versions, _, _, want_s, want_v in tables:
        assert serving.tobytes() == want_s.tobytes()
        assert np.array_equal(versions, want_v)


@pytest.mark.parametrize("layout,dim", [("f32", 16), ("f32", 64), ("bf16", 32), ("f16", 96),
                                        ("int8", 56), ("f32", 24)])
@pytest.mark.parametrize("shift", [0, 4, 8, 16])
def test_merge_streams_rows_in_groups_and_repeats(layout: str, dim: int, shift: int) -> None:
    """The streamed merge (serving rows aligned or not, rows of whole lines or of
    part lines, guarded in groups of MERGE_GROUP) against the reference: taken
    counts around the group size, and ids repeated within and across groups with
    equal versions, so a pending row must be flushed before it is decided again."""
    from ekko.compiler.backend.llvm_sync import MERGE_GROUP

    rng = np.random.default_rng(zlib.crc32(f"{layout}/{dim}/{shift}".encode()))
    rows = 3 * MERGE_GROUP
    width = row_width(layout, dim)
    for seq in (False, True):
        k = merge_kernel(dim, layout, seq=seq, threads=2)
        for n in (MERGE_GROUP - 1, MERGE_GROUP, MERGE_GROUP + 1, 5 * MERGE_GROUP + 3):
            whole = serving_copy(rng, rows, dim, layout)
            dtype = whole.dtype
            raw = np.zeros(whole.nbytes + 64 + shift, np.uint8)  # serving rows at a chosen shift
            start = (-raw.ctypes.data) % 64 + shift
            serving = raw[start:start + whole.nbytes].view(dtype).reshape(rows, width)
            serving[:] = whole
            versions = rng.integers(0, 3, rows).astype(np.int64)
            ids = rng.integers(0, rows, n).astype(np.int64)
            ids[: n // 3] = ids[0]  # one row met again and again inside a group
            ids[-1], ids[1] = 0, rows - 1
            prow = serving_copy(rng, n, dim, layout)
            pver = rng.integers(1, 4, n).astype(np.int64)
            merge_as_reference(k, serving, versions, ids, prow, pver, 3, seq, (seq, n))
            assert raw[:start].sum() == 0 and raw[start + whole.nbytes:].sum() == 0


@pytest.mark.parametrize("layout", ["f32", "int8", "f16"])
@pytest.mark.parametrize("threads", [2, 3, 4])
@pytest.mark.parametrize("seq", [False, True])
def test_sorted_packets_merge_in_ranges(layout: str, threads: int, seq: bool) -> None:
    """Sorted ids (the engine's packets) take the ranged merge: each partition its
    own part of the packet, its ends moved past runs of one id. Runs of equal ids
    (equal versions: the byte tie-break decides) straddle every partition boundary,
    and one packet is a single id; the bytes must be the reference's."""
    from ekko.kernels.sync import PARALLEL_MIN_ROWS

    rng = np.random.default_rng(zlib.crc32(f"{layout}/{threads}/{seq}".encode()))
    dim, rows, n = 24, 3000, 3 * PARALLEL_MIN_ROWS
    k = merge_kernel(dim, layout, seq=seq, threads=threads)
    seen = _spy_ranged(k)
    for case in ("runs", "one id", "edges"):
        ids = np.sort(rng.integers(0, rows, n)).astype(np.int64)
        if case == "runs":
            for p in range(1, threads):  # a run of one id across each boundary
                at = n * p // threads
                ids[at - 50:at + 50] = ids[at]
            ids = np.sort(ids)
        elif case == "one id":
            ids[:] = rows // 2
        else:
            ids[:300], ids[-300:] = 0, rows - 1
        serving = serving_copy(rng, rows, dim, layout)
        versions = rng.integers(0, 3, rows).astype(np.int64)
        prow = serving_copy(rng, n, dim, layout)
        pver = rng.integers(1, 3, n).astype(np.int64)
        merge_as_reference(k, serving, versions, ids, prow, pver, 3, seq, case)
        assert seen[-1] == 1, case  # the ranged path ran


def _spy_ranged(k) -> list[int]:
    """Record the `ranged` argument of every apply call of merge kernel k."""
    seen: list[int] = []
    run = k._apply.run

    def spy(parts, **args):
        seen.append(args["ranged"])
        return run(parts, **args)

    k._apply.run = spy
    return seen


@pytest.mark.parametrize("seq", [False, True])
def test_a_range_leaves_a_run_that_starts_before_it_to_the_range_before(seq: bool) -> None:
    """Each partition run alone (no race to hide a wrong split): a run of one id that
    crosses the middle of a sorted packet belongs wholly to the first partition, and
    the second starts after it."""
    from ekko.kernels.sync import PARALLEL_MIN_ROWS

    n, rows, dim = 2 * PARALLEL_MIN_ROWS, 4 * PARALLEL_MIN_ROWS, 16
    k = merge_kernel(dim, "f32", seq=seq, threads=2)
    rng = np.random.default_rng(11)
    ids = np.sort(rng.choice(rows, n, replace=False)).astype(np.int64)
    ids[n // 2 - 40:n // 2 + 40] = ids[n // 2 - 40]  # the run crossing the raw boundary
    serving = serving_copy(rng, rows, dim, "f32")
    versions = np.zeros(rows, np.int64)
    prow, pver = serving_copy(rng, n, dim, "f32"), np.arange(1, n + 1, dtype=np.int64)
    s = np.zeros(rows, np.uint32) if seq else None
    start = n // 2 + 40  # where the second partition's range must begin
    for part, span in ((1, slice(start, n)), (0, slice(0, start))):
        want_s, want_v = serving.copy(), versions.copy()
        reference_merge(want_s, want_v, ids[span], prow[span], pver[span])
        k._apply([dict(part=part, nparts=2, serving=serving.ctypes.data,
                       versions=versions.ctypes.data, seq=None if s is None else s.ctypes.data,
                       ids=ids.ctypes.data, n=n, prows=prow.ctypes.data,
                       pversions=pver.ctypes.data, ranged=1)])
        assert serving.tobytes() == want_s.tobytes(), part
        assert np.array_equal(versions, want_v), part


@pytest.mark.parametrize("where", ["first boundary", "last boundary", "middle", "end"])
def test_one_descent_anywhere_takes_the_owner_hash(where: str) -> None:
    """A single id smaller than the one before it, at a partition's first position
    (checked against the last id of the range before), inside a range, or at the
    end, means the ids are not sorted: the merge must not split by ranges, and
    it still gives the reference's bytes."""
    from ekko.kernels.sync import PARALLEL_MIN_ROWS

    threads, rows, dim = 3, 5000, 16
    n = 3 * PARALLEL_MIN_ROWS
    k = merge_kernel(dim, "f32", threads=threads)
    seen = _spy_ranged(k)
    rng = np.random.default_rng(zlib.crc32(where.encode()))
    ids = np.sort(rng.integers(1, rows, n)).astype(np.int64)
    at = {"first boundary": n // threads, "last boundary": 2 * n // threads, "middle": n // 2 + 7,
          "end": n - 1}[where]
    ids[at] = ids[at - 1] - 1  # one step down
    ids[0] = ids[at]  # the same row in the first range too: a split would race on it
    serving = serving_copy(rng, rows, dim, "f32")
    versions = np.zeros(rows, np.int64)
    prow = serving_copy(rng, n, dim, "f32")
    pver = rng.integers(1, 3, n).astype(np.int64)
    merge_as_reference(k, serving, versions, ids, prow, pver, 3, False)
    assert seen == [0]
    k(serving, versions, np.sort(ids), prow, pver, newest=3)
    assert seen == [0, 1]  # sorted again: ranged


@pytest.mark.parametrize("packets", ["repeats", "sorted runs"])
def test_readers_never_see_a_torn_row_of_a_grouped_merge(packets: str) -> None:
    """Pack readers under sequence words race merges of whole-line f32 rows (the
    streamed, grouped path) whose packets repeat rows within a group; "sorted runs"
    are merged in ranges by two partitions. Every row a merge writes is the constant
    v at version v, so a row mixing two writes, or a version that is not its
    values', shows at once. The work is fixed, not timed."""
    from ekko.compiler.backend.llvm_sync import MERGE_GROUP
    from ekko.kernels.sync import PARALLEL_MIN_ROWS

    rows = 2 * MERGE_GROUP
    if packets == "repeats":
        dim, threads, merges = 1024, 1, 400
        ids = np.concatenate([np.arange(rows), np.arange(0, rows, 3), np.arange(rows)[::-1]])
    else:  # sorted: a run of each id, long enough for two partitions
        dim, threads, merges = 64, 2, 400
        ids = np.repeat(np.arange(rows), -(-PARALLEL_MIN_ROWS // rows))
    merge = merge_kernel(dim, "f32", seq=True, threads=threads)
    seen = _spy_ranged(merge)
    read = pack_kernel(dim, "f32", seq=True, threads=1)
    serving = np.zeros((rows, dim), np.float32)
    versions = np.zeros(rows, np.int64)
    seq = np.zeros(rows, np.uint32)
    everything = np.arange(rows, dtype=np.int64)
    done = threading.Event()
    torn, reads = [0, 0], [0, 0]

    def reader(k: int) -> None:
        while not done.is_set() or reads[k] == 0:
            got, vers = read(serving, versions, everything, seq=seq)
            torn[k] += int(((got != got[:, :1]).any(axis=1) | (got[:, 0] != vers)).sum())
            reads[k] += 1

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(2)]
    for th in threads:
        th.start()
    for v in range(1, merges + 1):
        pver = np.full(len(ids), v, np.int64)
        older = slice(len(ids) // 2, None) if packets == "repeats" else slice(1, None, 2)
        pver[older] = v - 1 if v > 1 else v  # later repeats are older: not taken
        prow = np.repeat(pver.astype(np.float32)[:, None], dim, axis=1)
        merge(serving, versions, ids.astype(np.int64), prow, pver, newest=v, seq=seq)
    done.set()
    for th in threads:
        th.join()
    assert min(reads) > 0 and sum(torn) == 0, (torn, reads)
    assert np.all(serving == merges) and np.all(versions == merges) and np.all(seq % 2 == 0)
    assert set(seen) == {1 if packets == "sorted runs" else 0}
