"""Dense snapshots: taken whole, refused when non-finite or damaged, swapped whole on a replica."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ekko.engine.dense import DenseError, DenseSlot, DenseSnapshot, take_snapshot  # noqa: E402


class Dense(torch.nn.Module):
    """A small dense part: `pooled` features concatenated with `x`, an MLP to one logit."""

    def __init__(self, dim: int = 4, n: int = 3):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(2 * dim + n, 8), torch.nn.ReLU(),
                                       torch.nn.Linear(8, 1))
        self.norm = torch.nn.BatchNorm1d(8)  # buffers travel too (running stats, an int64)

    def forward(self, pooled: dict, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([pooled["user"], pooled["item"], x], dim=1)
        return self.mlp(h).squeeze(1)


def inputs(seed: int = 0, batch: int = 5) -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ({"user": torch.randn(batch, 4, generator=g), "item": torch.randn(batch, 4,
                                                                         generator=g)},
            torch.randn(batch, 3, generator=g))


def test_a_snapshot_round_trips_and_predicts_as_the_module() -> None:
    module = Dense()
    snap = take_snapshot(module, 3)
    again = DenseSnapshot.from_bytes(snap.to_bytes())
    assert again.version == 3 and again.commit_ns == snap.commit_ns
    assert list(again.state) == list(module.state_dict())
    for k, v in module.state_dict().items():
        assert np.array_equal(again.state[k], v.numpy()) and again.state[k].dtype == v.numpy().dtype
    slot = DenseSlot(module)
    assert slot.install(snap.to_bytes())
    pooled, x = inputs()
    version, out = slot.run(pooled, x)
    with torch.no_grad():
        assert version == 3 and torch.equal(out, module.eval()(pooled, x))


def test_the_slot_keeps_its_own_copy_and_ignores_older_snapshots() -> None:
    module = Dense()
    slot = DenseSlot(module)
    with pytest.raises(DenseError, match="no dense snapshot"):
        slot.run(*inputs())
    first = take_snapshot(module, 1)
    with torch.no_grad():
        module.mlp[0].weight.add_(1.0)  # the trainer moves on: the replica must not see it
    assert slot.install(first)
    pooled, x = inputs()
    before = slot.run(pooled, x)[1]
    assert slot.install(take_snapshot(module, 2))
    assert not slot.install(first)  # late and older: ignored
    version, after = slot.run(pooled, x)
    assert version == 2 and not torch.equal(before, after)
    assert slot.installed == 2


def test_non_finite_weights_are_never_snapshotted() -> None:
    module = Dense()
    with torch.no_grad():
        module.mlp[2].bias.fill_(float("nan"))
    with pytest.raises(DenseError, match=r"'mlp.2.bias' holds a non-finite value"):
        take_snapshot(module, 1)


def test_a_snapshot_for_another_module_is_refused_whole() -> None:
    slot = DenseSlot(Dense(dim=4))
    slot.install(take_snapshot(Dense(dim=4), 1))
    with pytest.raises(DenseError, match="does not fit the module: 'mlp.0.weight' has shape"):
        slot.install(take_snapshot(Dense(dim=5), 2))
    assert slot.version == 1


def test_damaged_snapshots_are_refused_never_installed() -> None:
    """Every flipped byte, cut and garbled length is a DenseError (the CRC, or with a
    recomputed CRC the structural checks); nothing is installed."""
    rng = random.Random(5)
    module = Dense()
    data = take_snapshot(module, 7).to_bytes()
    import struct
    import zlib

    for trial in range(400):
        b = bytearray(data)
        how = trial % 4
        if how == 0:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif how == 1:
            b = b[:rng.randrange(len(b))]
        else:  # a semantic mutation that passes the checksum
            body = bytearray(data[:-4])
            pos = rng.randrange(16, len(body))
            body[pos:pos + 8] = struct.pack("<Q", rng.choice([0, 1, 2**32, 2**63, 2**64 - 1]))[
                :len(body[pos:pos + 8])]
            b = body + struct.pack("<I", zlib.crc32(body))
        slot = DenseSlot(module)
        try:
            ok = slot.install(bytes(b))
        except DenseError:
            assert slot.version == -1
            continue
        assert ok and slot.version >= 0  # a mutation that kept it valid (e.g. in the weights)
        for k, v in slot._current[1].state_dict().items():
            assert v.shape == module.state_dict()[k].shape


def test_readers_racing_installs_see_one_version_per_prediction() -> None:
    """Snapshot v holds two weight vectors both filled with v: a prediction that read
    one from v and the other from v+1 (a module updated in place while serving)
    would show two different means."""

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.zeros(4096))
            self.b = torch.nn.Parameter(torch.zeros(4096))

        def forward(self, pooled, x):
            first = self.a.mean()
            return torch.stack([first, self.b.mean()])

    module = Two()
    slot = DenseSlot(module)
    slot.install(take_snapshot(module, 0))
    stop = threading.Event()
    seen, bad = [], []

    def reader() -> None:
        while not stop.is_set():
            version, out = slot.run({}, None)
            if not (float(out[0]) == float(out[1]) == version):
                bad.append((version, out.tolist()))
            seen.append(version)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for v in range(1, 60):
        with torch.no_grad():
            module.a.fill_(v)
            module.b.fill_(v)
        slot.install(take_snapshot(module, v))
        # let the readers run on this version (on a loaded machine the writer could
        # otherwise install them all before a reader was scheduled again)
        before, deadline = len(seen), time.monotonic() + 5.0
        while len(seen) < before + 2 and time.monotonic() < deadline:
            time.sleep(0.0005)
    stop.set()
    for t in threads:
        t.join()
    assert not bad and slot.version == 59 and len(set(seen)) > 1
