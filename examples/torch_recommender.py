"""Putting an existing PyTorch recommender on ekko (the guide: docs/torch.md).

    python examples/torch_recommender.py

`Recommender` is what a team has today: nn.EmbeddingBag tables, an MLP
head, trained with torch (sparse gradients, SparseAdam or Adagrad). The
steps below move it onto ekko without changing its math:

1. import its sparse part (`ekko.import_module`: a table per EmbeddingBag,
   a feature per table, the optimizer you name) and compile it;
2. start the tables from the trained weights (`CompiledModel.load_table`);
3. hand the head (the part after pooling) to an Engine as its dense part:
   a module called `head(pooled, x)` with pooled = {feature: (B, dim)};
4. train with `ekko.torch.EmbeddingBags(engine)` in place of the
   EmbeddingBags (their optimizer runs inside backward) and any torch
   optimizer for the head; `publish_dense()` after each step;
5. serve predictions from the replicas (`replica.predict(sparse, x)`).

It checks what it claims: before training the replicas predict what the
torch model predicts; afterwards, what the trainer predicts.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import ekko


class Head(nn.Module):
    """The dense part: pooled user and item rows + context -> click logit."""

    def __init__(self, dim: int = 16, dense: int = 3):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * dim + dense + 1, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, pooled: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        u, i = pooled["user"], pooled["item"]
        return self.mlp(torch.cat([u, i, (u * i).sum(1, keepdim=True), x], 1)).squeeze(1)


class Recommender(nn.Module):
    """A torch recommender as it exists before ekko."""

    def __init__(self, users: int = 5_000, items: int = 20_000, dim: int = 16):
        super().__init__()
        self.user = nn.EmbeddingBag(users, dim, mode="sum", sparse=True)
        self.item = nn.EmbeddingBag(items, dim, mode="mean", sparse=True)
        self.head = Head(dim)

    def forward(self, sparse: dict, x: torch.Tensor) -> torch.Tensor:
        pooled = {name: getattr(self, name)(ids, offsets[:-1]) for name, (ids, offsets)
                  in sparse.items()}  # nn.EmbeddingBag takes B offsets (no last one)
        return self.head(pooled, x)


def batch(rng: np.random.Generator, n: int = 256) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Clicks of a toy world: a user clicks items whose id shares its parity, more often."""
    users = rng.integers(0, 5_000, n)
    history = rng.integers(1, 4, n)  # items per bag: 1-3
    items = rng.integers(0, 20_000, int(history.sum()))
    offsets = np.concatenate([[0], np.cumsum(history)])
    first = items[offsets[:-1]]
    y = (rng.random(n) < np.where(first % 2 == users % 2, 0.3, 0.05)).astype(np.float32)
    sparse = {"user": (torch.from_numpy(users), torch.from_numpy(np.arange(n + 1))),
              "item": (torch.from_numpy(items), torch.from_numpy(offsets))}
    return sparse, torch.from_numpy(rng.standard_normal((n, 3)).astype(np.float32)), torch.from_numpy(y)


def main() -> int:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    trained = Recommender()  # stands for a model trained before: its weights are kept

    # 1-2: the sparse part as an ekko model, starting from the trained rows
    spec = ekko.import_module(trained, name="recommender", optimizer="adagrad", lr=0.05)
    model = ekko.compile_model(spec)
    for table, emb in (("t_user", trained.user), ("t_item", trained.item)):
        model.load_table(table, emb.weight)

    # 3: the head is the engine's dense part
    head = trained.head
    with ekko.Engine(model, replicas=2, dense=head) as engine:
        sparse, x, _ = batch(rng)
        with torch.no_grad():
            before = trained(sparse, x)
        served = engine.replicas[0].predict(sparse, x)
        print(f"before training, replica 0 vs the torch model: max |diff| "
              f"{float((served - before).abs().max()):.2e}")
        assert torch.allclose(served, before, atol=1e-5)

        # 4: train through ekko: EmbeddingBags replaces the nn.EmbeddingBags
        emb = ekko.torch.EmbeddingBags(engine)
        opt = torch.optim.Adam(head.parameters(), lr=1e-3)
        for step in range(200):
            sparse, x, y = batch(rng)
            loss = F.binary_cross_entropy_with_logits(head(emb(sparse), x), y)
            opt.zero_grad()
            loss.backward()  # Adagrad on the touched rows, committed, sent to the replicas
            opt.step()
            engine.publish_dense()
            if step % 50 == 0:
                print(f"step {step:3d}: loss {loss.item():.4f}")

        # 5: serve predictions from the replicas
        engine.flush()
        sparse, x, _ = batch(rng)
        with torch.no_grad():
            want = head(emb(sparse), x)
        for r in engine.replicas:
            assert torch.equal(r.predict(sparse, x), want)
        print("after flush both replicas predict exactly what the trainer does")
        print(f"freshness p99 {engine.stats()['freshness_ms']['p99']:.2f} ms, "
              f"dense snapshots {engine.stats()['dense']['published']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
