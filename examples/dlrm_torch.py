"""DLRM on Criteo Kaggle in PyTorch: the same model as examples/dlrm.ekko.

    ekko run examples/dlrm_torch.py:build --serving int8
    ekko.import_module(build(), name="dlrm", serving="int8", lr=0.01, eps=1e-8)

(An imported model gets rowwise Adagrad with lr 0.01 and eps 1e-8 unless
told otherwise, as dlrm.ekko says; its serving layout is given here.)

`build(scale)` multiplies every table's rows by `scale` (at least 2 rows).
"""

from __future__ import annotations

import torch
from torch import nn

# Criteo Kaggle's 26 categorical features: number of distinct values of each
CRITEO_KAGGLE_ROWS = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]
DIM = 64


def mlp(sizes: list[int], final_sigmoid: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        last = i == len(sizes) - 2
        layers.append(nn.Sigmoid() if last and final_sigmoid else nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    """Bottom MLP over dense features, 26 pooled embeddings, dot interaction, top MLP."""

    interaction = "dot"

    def __init__(self, rows: list[int], dim: int = DIM):
        super().__init__()
        self.emb = nn.ModuleDict(
            {f"cat{i}": nn.EmbeddingBag(n, dim, mode="sum") for i, n in enumerate(rows)}
        )
        n = len(rows) + 1
        self.bottom = mlp([13, 512, 256, dim])
        self.top = mlp([dim + n * (n - 1) // 2, 512, 256, 1], final_sigmoid=True)

    def forward(self, dense: torch.Tensor, ids: list[torch.Tensor],
                offsets: list[torch.Tensor]) -> torch.Tensor:
        x = self.bottom(dense)
        pooled = [bag(ids[i], offsets[i]) for i, bag in enumerate(self.emb.values())]
        z = torch.stack([x, *pooled], dim=1)
        dots = torch.bmm(z, z.transpose(1, 2))
        i, j = torch.triu_indices(z.shape[1], z.shape[1], offset=1)
        return self.top(torch.cat([x, dots[:, i, j]], dim=1))


def build(scale: float = 1.0) -> DLRM:
    return DLRM([max(2, round(n * scale)) for n in CRITEO_KAGGLE_ROWS])
