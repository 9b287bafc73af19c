"""No reader ever sees a torn row while a replica merges.

Every row a merger writes is constant-valued, the constant being the row's
version, so a row mixing an old and a new write (or a version that does not
belong to the values) is visible at once. Readers loop over the same hot
rows the merger rewrites. The amount of work is fixed (no timing). The
negative control races `unguarded_reader`, which skips the sequence words,
and must catch torn rows (the race is run again until it does), or the
guarded tests would prove nothing.
"""

from __future__ import annotations

import threading

import numpy as np

import ekko
from ekko.kernels.sync import pack_kernel

MODEL = """
model torn {
  defaults { dim 1024; dtype f32; optimizer sgd(lr=0.1); serving f32; }
  table t { rows 64; }
  feature f -> t pooling sum;
}
"""
ROWS, DIM = 64, 1024
MERGES = 3000
ROUNDS = 30  # races the negative control may run to see a tear


def _merge(replica, v: int) -> None:
    """Every row becomes the constant v at version v."""
    ids = np.arange(ROWS, dtype=np.int64)
    rows = np.full((ROWS, DIM), float(v), np.float32)
    replica.merge(ekko.Packet(table="t", ids=ids, rows=rows, versions=np.full(ROWS, v, np.int64)))


def _merge_loop(replica, stop: threading.Event, base: int) -> None:
    for v in range(base + 2, base + MERGES + 1):
        _merge(replica, v)
    stop.set()


def _race(replica, read, readers: int = 2) -> tuple[int, int]:
    """Run the merger against `readers` threads calling read(ids) -> (rows, versions).

    Versions go on from the replica's newest, so a replica can race again.
    Returns (torn rows seen, reads made).
    """
    base = int(replica.versions("t").max())
    replica.note_issued("t", base + MERGES)
    _merge(replica, base + 1)  # the model's initial rows are random: make every row constant first
    stop = threading.Event()
    reading = threading.Barrier(readers + 1)  # the merger starts once every reader is reading
    torn = [0] * readers
    reads = [0] * readers

    def reader(k: int) -> None:
        ids = np.arange(ROWS, dtype=np.int64)
        while not stop.is_set():
            rows, versions = read(ids)
            bad = (rows != rows[:, :1]).any(axis=1)
            if versions is not None:
                bad |= rows[:, 0] != versions
            torn[k] += int(bad.sum())
            reads[k] += 1
            if reads[k] == 1:
                reading.wait()

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(readers)]
    for th in threads:
        th.start()
    reading.wait()
    _merge_loop(replica, stop, base)
    for th in threads:
        th.join()
    return sum(torn), sum(reads)


def _engine(tmp_path):
    path = tmp_path / "torn.ekko"
    path.write_text(MODEL)
    return ekko.Engine(ekko.compile_model(path), replicas=1)


def test_readers_never_see_a_torn_row(tmp_path) -> None:
    with _engine(tmp_path) as engine:
        replica = engine.replicas[0]
        torn, reads = _race(replica, lambda ids: replica.rows("t", ids))
        assert reads > 0
        assert torn == 0
        assert np.all(replica.serving("t") == MERGES)


def test_lookups_never_see_a_torn_row(tmp_path) -> None:
    """Lookups read under the replica's sequence words (the bag kernel's seq=)."""
    with _engine(tmp_path) as engine:
        replica = engine.replicas[0]
        offsets = np.arange(ROWS + 1, dtype=np.int64)
        torn, reads = _race(replica, lambda ids: (replica.lookup("f", ids, offsets), None))
        assert reads > 0 and torn == 0


def unguarded_reader(replica):
    """A reader that ignores the sequence words: what the test must be able to catch."""
    plain = pack_kernel(DIM, "f32", seq=False)
    rt = replica.tables["t"]
    return lambda ids: plain(rt.serving, rt.versions, ids)


def test_the_race_is_real_without_sequence_words(tmp_path) -> None:
    """The negative control: the same race, read without the protocol, shows torn rows.

    A tear needs a reader inside a row's write, which one round (a few
    tenths of a second) usually gives on two cores; the race is run again,
    up to ROUNDS times, until it shows one.
    """
    with _engine(tmp_path) as engine:
        replica = engine.replicas[0]
        read = unguarded_reader(replica)
        for _ in range(ROUNDS):
            torn, reads = _race(replica, read)
            if torn:
                break
        assert reads > 0 and torn > 0, f"no torn row in {ROUNDS} rounds without sequence words"
