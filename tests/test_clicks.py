"""The synthetic click stream: seeded, well-formed, and non-stationary the way it says."""

from __future__ import annotations

import numpy as np
import pytest

from ekko.workloads.clicks import ClickStream, ClickStreamConfig


def test_the_same_seed_gives_the_same_stream() -> None:
    a, b = ClickStream(ClickStreamConfig(seed=3)), ClickStream(ClickStreamConfig(seed=3))
    for _ in range(3):
        x, y = a.next_batch(500), b.next_batch(500)
        for f in ("t", "user", "item", "category", "history", "x", "y", "p"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f))
    assert not np.array_equal(ClickStream(ClickStreamConfig(seed=4)).next_batch(500).y,
                              ClickStream(ClickStreamConfig(seed=3)).next_batch(500).y)


def test_batches_are_well_formed() -> None:
    c = ClickStreamConfig(users=500, items_initial=50, item_capacity=400, categories=7)
    s = ClickStream(c)
    last_t = 0.0
    for n in (0, 1, 64, 300):
        b = s.next_batch(n)
        assert len(b) == n and b.x.shape == (n, c.dense) and b.x.dtype == np.float32
        assert set(np.unique(b.y)) <= {0.0, 1.0}
        assert np.all((b.p > 0) & (b.p < 1))
        assert np.all(np.diff(b.t) > 0) and (n == 0 or b.t[0] > last_t)
        last_t = b.t[-1] if n else last_t
        assert b.user.min(initial=0) >= 0 and b.user.max(initial=0) < c.users
        assert b.item.max(initial=0) < s.items <= c.item_capacity
        assert b.category.max(initial=0) < c.categories
        for feature, (ids, offsets) in b.sparse().items():
            assert ids.dtype == np.int64 and offsets.dtype == np.int64, feature
            assert len(offsets) == n + 1 and offsets[0] == 0 and offsets[-1] == len(ids)
            assert np.all(np.diff(offsets) >= 0) and np.all(ids >= 0), feature


def test_clicks_follow_the_true_probability_and_the_target_rate() -> None:
    s = ClickStream(ClickStreamConfig(seed=1))
    b = s.next_batch(20_000)
    assert abs(b.y.mean() - b.p.mean()) < 0.01
    assert 0.05 < b.y.mean() < 0.2  # target_ctr 0.1 at t = 0


def test_new_items_arrive_and_take_the_traffic_while_they_are_hot() -> None:
    c = ClickStreamConfig(seed=2, new_items_per_s=20.0, events_per_s=1_000.0)
    s = ClickStream(c)
    first = s.items
    s.next_batch(10_000)  # 10 stream seconds
    assert s.items - first > 100  # ~200 expected
    b = s.next_batch(5_000)
    newest = b.item >= first
    assert newest.mean() > 0.2  # brand-new items are a large share of the impressions
    # and they are clicked more than the old catalogue while new
    assert b.y[newest].mean() > b.y[b.item < c.items_initial].mean()


def test_history_holds_the_users_clicked_items() -> None:
    s = ClickStream(ClickStreamConfig(seed=5, users=50))
    b1 = s.next_batch(2_000)
    clicked = {(int(u), int(i)) for u, i, y in zip(b1.user, b1.item, b1.y) if y}
    b2 = s.next_batch(500)
    ids, offsets = b2.sparse()["history"]
    for row, u in enumerate(b2.user):
        for i in ids[offsets[row]:offsets[row + 1]]:
            assert (int(u), int(i)) in clicked  # a click of this user's, before this batch
    assert len(ids) > 0
    assert np.all(np.diff(offsets) <= s.config.history)


@pytest.mark.parametrize("bad", [dict(users=0), dict(items_initial=10, item_capacity=5),
                                 dict(events_per_s=0.0), dict(target_ctr=1.0)])
def test_bad_configs_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        ClickStreamConfig(**bad)
