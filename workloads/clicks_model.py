"""The dense part of examples/clicks.ekko: a DLRM-style MLP over the pooled rows.

`ClicksDense()(pooled, x)` takes the pooled embeddings of the four features
(user, item, category, history; (B, dim) each) and the stream's dense
context x (B, n), adds the dot products a factorization machine would (user
with item, user with category, history with item: the interactions the
click model is built from), and returns one logit per event. This is the
`dense` module an Engine carries to its replicas.
"""

from __future__ import annotations

import torch
from torch import nn

FEATURES = ("user", "item", "category", "history")


class ClicksDense(nn.Module):
    """pooled rows + dense context -> click logit."""

    def __init__(self, dim: int = 16, dense: int = 4, hidden: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4 * dim + dense + 3, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, pooled: dict[str, torch.Tensor], x: torch.Tensor | None) -> torch.Tensor:
        u, i, c, h = (pooled[f] for f in FEATURES)
        dots = torch.stack([(u * i).sum(1), (u * c).sum(1), (h * i).sum(1)], 1)
        parts = [u, i, c, h, dots] + ([] if x is None else [x])
        return self.mlp(torch.cat(parts, 1)).squeeze(1)


__all__ = ["ClicksDense", "FEATURES"]
