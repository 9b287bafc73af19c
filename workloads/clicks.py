"""A seeded synthetic click stream in which staleness hurts, as it does in production.

Each event is one impression: a user sees an item (of a category) with a
few dense context features, and clicks or not. The generative model, in
stream seconds (`t`):

* Users: `users` of them, drawn Zipf(`user_zipf`) (a few users are most of
  the traffic). User u has a bias b_u ~ N(0, 0.5^2) and a taste vector
  p_u ~ N(0, I/k) in R^k (k = `latent`). Both drift as Ornstein-Uhlenbeck
  processes with time constant `user_tau_s` (tastes change; the stationary
  spread stays the same), applied exactly for the time since u was last
  seen (cost per event, not per user).
* Items: `items_initial` live at t = 0, then new ones arrive as a Poisson
  process (`new_items_per_s`); item ids are assigned in arrival order,
  so the item table needs `item_capacity` rows (the stream stops creating
  items past it; at t = 0 the arrivals of the last 3 hot_tau_s seconds are
  there already, so the stream starts in its steady state). Item i has a
  category c_i (Zipf over `categories`), a trait vector q_i ~ N(0, I/k) and an intrinsic appeal a_i ~ N(0, 1) that
  drifts (OU, `item_tau_s`). A new item is *hot*: its exposure and its
  appeal carry a burst h_i ~ U(1, 3) that decays as exp(-(t - born_i) /
  `hot_tau_s`): new items are shown a lot and clicked a lot while they are
  new, and a model that has not learned them yet mispredicts exactly the
  impressions that are most frequent.
* Categories: a propensity e_c that drifts (OU, `category_tau_s`): what is
  popular shifts.
* Exposure: the item of an impression is drawn with probability
  proportional to exp(pop_i), pop_i = 0.5 a_i + 1.5 h_i exp(-age/hot_tau)
  (a fixed-size candidate sample: `candidates` live items drawn uniformly,
  then one of them by exposure weight, so the cost per event is constant).
* Dense features x ~ N(0, I) in R^`dense`, with fixed weights w ~ N(0, 0.3^2).
* Click: y ~ Bernoulli(sigmoid(z)), z = base + b_u + a_i + h_i exp(-age /
  hot_tau) + e_c + scale * <p_u, q_i> + <w, x>, with base set so that the
  average click rate is near `target_ctr` at t = 0.
* History: each user's last `history` clicked items (most recent first;
  padded with nothing: a user without clicks has an empty bag).

Time: events arrive at `events_per_s` per stream second; `next_batch(n)`
advances the stream by n / events_per_s seconds. Benchmarks that replay the
stream faster than stream time (a compression factor) say so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClickStreamConfig:
    """The generative model's sizes and rates (see the module docstring)."""

    users: int = 20_000
    items_initial: int = 2_000
    item_capacity: int = 60_000
    categories: int = 64
    latent: int = 8
    dense: int = 4
    history: int = 4
    events_per_s: float = 1_000.0
    new_items_per_s: float = 4.0
    hot_tau_s: float = 60.0
    user_tau_s: float = 900.0
    item_tau_s: float = 600.0
    category_tau_s: float = 300.0
    user_zipf: float = 1.1
    category_zipf: float = 1.2
    candidates: int = 64
    interaction_scale: float = 1.5
    target_ctr: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("users", "items_initial", "item_capacity", "categories", "latent",
                     "candidates"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.items_initial > self.item_capacity:
            raise ValueError("items_initial must not exceed item_capacity")
        for name in ("events_per_s", "hot_tau_s", "user_tau_s", "item_tau_s", "category_tau_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not 0 < self.target_ctr < 1:
            raise ValueError(f"target_ctr must lie in (0, 1), got {self.target_ctr}")


@dataclass
class ClickBatch:
    """n impressions: ids per feature, dense features, labels and their stream times."""

    t: np.ndarray  # (n,) float64 stream seconds
    user: np.ndarray  # (n,) int64
    item: np.ndarray  # (n,) int64
    category: np.ndarray  # (n,) int64
    history: np.ndarray  # (n * history,) int64 ids, -1 where a user has fewer clicks
    x: np.ndarray  # (n, dense) float32
    y: np.ndarray  # (n,) float32 0/1
    p: np.ndarray  # (n,) float64: the true click probability (the Bayes-optimal prediction)

    def __len__(self) -> int:
        return len(self.y)

    def sparse(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{feature: (ids, offsets)} with B+1 offsets, as ekko's lookups take them."""
        n = len(self)
        one = np.arange(n + 1, dtype=np.int64)
        k = self.history.reshape(n, -1) if n else self.history.reshape(0, 0)
        keep = k >= 0
        offsets = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int64)
        return {"user": (self.user, one), "item": (self.item, one),
                "category": (self.category, one), "history": (k[keep].astype(np.int64), offsets)}


def _ou(value: np.ndarray, dt: np.ndarray, tau: float, spread: float,
        rng: np.random.Generator) -> np.ndarray:
    """Advance an Ornstein-Uhlenbeck process (mean 0, stationary sd `spread`) by dt, exactly."""
    decay = np.exp(-dt / tau)
    shape = (-1,) + (1,) * (value.ndim - 1)
    noise = rng.standard_normal(value.shape) * (spread * np.sqrt(1.0 - decay ** 2)).reshape(shape)
    return value * decay.reshape(shape) + noise


def _zipf_weights(n: int, s: float, rng: np.random.Generator) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return rng.permutation(w / w.sum())


class ClickStream:
    """The stream itself: `next_batch(n)` returns the next n impressions (see module doc)."""

    def __init__(self, config: ClickStreamConfig | None = None):
        c = self.config = config or ClickStreamConfig()
        self.rng = np.random.default_rng(c.seed)
        rng, k = self.rng, c.latent
        self.t = 0.0
        self.user_p = _zipf_weights(c.users, c.user_zipf, rng)
        self.user_cdf = np.cumsum(self.user_p)
        self.user_bias = rng.normal(0, 0.5, c.users)
        self.user_taste = rng.normal(0, 1 / np.sqrt(k), (c.users, k))
        self.user_seen = np.zeros(c.users)
        self.cat_cdf = np.cumsum(_zipf_weights(c.categories, c.category_zipf, rng))
        self.cat_pref = rng.normal(0, 0.5, c.categories)
        cap = c.item_capacity
        self.item_cat = np.zeros(cap, np.int64)
        self.item_trait = np.zeros((cap, k))
        self.item_appeal = np.zeros(cap)
        self.item_hot = np.zeros(cap)
        self.item_born = np.zeros(cap)
        self.item_seen = np.zeros(cap)
        self.items = 0
        self._add_items(c.items_initial, born=-10 * c.hot_tau_s)  # the catalogue's old items
        recent = int(c.new_items_per_s * 3 * c.hot_tau_s)  # and the last arrivals: t = 0 is steady
        for born in np.sort(rng.uniform(-3 * c.hot_tau_s, 0, recent)):
            self._add_items(1, born=float(born))
        self.dense_w = rng.normal(0, 0.3, c.dense)
        self.history = np.full((c.users, c.history), -1, np.int64)
        self.base = 0.0
        self.base = self._calibrate()

    # -- the world -----------------------------------------------------------------------
    def _add_items(self, n: int, born: float) -> None:
        c, rng = self.config, self.rng
        n = min(n, c.item_capacity - self.items)
        if n <= 0:
            return
        sl = slice(self.items, self.items + n)
        u = rng.random(n)
        self.item_cat[sl] = np.minimum(np.searchsorted(self.cat_cdf, u), c.categories - 1)
        self.item_trait[sl] = rng.normal(0, 1 / np.sqrt(c.latent), (n, c.latent))
        self.item_appeal[sl] = rng.normal(0, 1, n)
        self.item_hot[sl] = rng.uniform(1, 3, n)
        self.item_born[sl] = born
        self.item_seen[sl] = max(born, 0.0)
        self.items += n

    def _advance(self, dt: float) -> None:
        c = self.config
        self.t += dt
        arrivals = self.rng.poisson(c.new_items_per_s * dt) if c.new_items_per_s > 0 else 0
        self._add_items(int(arrivals), born=self.t)
        self.cat_pref = _ou(self.cat_pref, np.full(c.categories, dt), c.category_tau_s, 0.5,
                            self.rng)

    def _hot(self, items: np.ndarray, t: float | np.ndarray) -> np.ndarray:
        age = np.maximum(0.0, t - self.item_born[items])
        return self.item_hot[items] * np.exp(-age / self.config.hot_tau_s)

    def _pick_items(self, n: int, t: float) -> np.ndarray:
        c, rng = self.config, self.rng
        cand = rng.integers(0, self.items, (n, c.candidates))
        # new items are over-represented among candidates too: half the draws come from the newest
        recent = max(1, min(self.items, int(c.new_items_per_s * c.hot_tau_s * 3)))
        half = rng.random((n, c.candidates)) < 0.5
        cand[half] = self.items - 1 - rng.integers(0, recent, int(half.sum()))
        pop = 0.5 * self.item_appeal[cand] + 1.5 * self._hot(cand, t)
        g = pop + rng.gumbel(size=pop.shape)  # Gumbel-max: one draw per row by exp(pop)
        return cand[np.arange(n), g.argmax(axis=1)]

    def _logit(self, user, item, x, t) -> np.ndarray:
        c = self.config
        inter = np.einsum("ij,ij->i", self.user_taste[user], self.item_trait[item])
        return (self.base + self.user_bias[user] + self.item_appeal[item] + self._hot(item, t)
                + self.cat_pref[self.item_cat[item]] + c.interaction_scale * inter + x @ self.dense_w)

    def _calibrate(self) -> float:
        """The base logit that gives about target_ctr on a sample at t = 0 (draws from a copy)."""
        c = self.config
        rng = np.random.default_rng(c.seed + 1)
        saved, self.rng = self.rng, rng
        try:
            n = 4096
            user = np.minimum(np.searchsorted(self.user_cdf, rng.random(n)), c.users - 1)
            item = self._pick_items(n, 0.0)
            x = rng.standard_normal((n, c.dense))
            z = self._logit(user, item, x, 0.0)
        finally:
            self.rng = saved
        lo, hi = -20.0, 20.0
        for _ in range(60):  # bisection on the mean click rate
            mid = (lo + hi) / 2
            if np.mean(1 / (1 + np.exp(-(z + mid)))) > c.target_ctr:
                hi = mid
            else:
                lo = mid
        return (lo + hi) / 2

    # -- the stream ------------------------------------------------------------------------
    def next_batch(self, n: int) -> ClickBatch:
        """The next n impressions, in stream-time order."""
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        c, rng = self.config, self.rng
        dt = n / c.events_per_s
        self._advance(dt)
        t = self.t - dt + (np.arange(n) + 1) * (dt / max(n, 1))
        user = np.minimum(np.searchsorted(self.user_cdf, rng.random(n)), c.users - 1)
        item = self._pick_items(n, self.t)
        # drift the users and items seen, for the time since they were last seen
        k = 1 / np.sqrt(c.latent)
        for ids, seen, tau, drifting in (
                (user, self.user_seen, c.user_tau_s, ((self.user_bias, 0.5), (self.user_taste, k))),
                (item, self.item_seen, c.item_tau_s, ((self.item_appeal, 1.0),))):
            u = np.unique(ids)
            gap = np.maximum(0.0, self.t - seen[u])
            for a, spread in drifting:
                a[u] = _ou(a[u], gap, tau, spread, rng)
            seen[u] = self.t
        x = rng.standard_normal((n, c.dense)).astype(np.float32)
        p = 1 / (1 + np.exp(-self._logit(user, item, x, t)))
        y = (rng.random(n) < p).astype(np.float32)
        hist = self.history[user].reshape(-1).copy()
        for i in np.flatnonzero(y):  # clicked items enter the user's history, newest first
            h = self.history[user[i]]
            h[1:] = h[:-1]
            h[0] = item[i]
        return ClickBatch(t, user.astype(np.int64), item.astype(np.int64),
                          self.item_cat[item].astype(np.int64), hist, x, y, p)


__all__ = ["ClickBatch", "ClickStream", "ClickStreamConfig"]
