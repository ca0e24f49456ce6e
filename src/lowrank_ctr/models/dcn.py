"""Deep & Cross Network (Wang et al. 2017): rank-1 cross layers in parallel with a DNN."""

from __future__ import annotations

from typing import Sequence

import torch

from lowrank_ctr.data.schema import Schema
from lowrank_ctr.models.base import CTRModel
from lowrank_ctr.models.layers import CrossNetwork, OutputLinear
from lowrank_ctr.models.registry import register_model


@register_model("dcn")
class DCN(CTRModel):
    """``mlp: []`` drops the DNN branch (cross network only)."""

    def __init__(self, schema: Schema, embedding_dim: int = 16, cross_layers: int = 3,
                 mlp: Sequence[int] = (400, 400, 400), dropout: float = 0.0, batch_norm: bool = False,
                 activation: str = "relu", numeric: str = "embed") -> None:
        super().__init__()
        self.embedding = self._embedding(schema, embedding_dim, numeric)
        in_dim = self.embedding.flat_dim
        self.cross = CrossNetwork(in_dim, self._int("cross_layers", cross_layers))
        hidden = self._sizes("mlp", mlp)
        self.mlp = self._mlp(in_dim, hidden, activation, batch_norm, dropout, out_dim=None) if hidden else None
        self.head = OutputLinear(in_dim + (self.mlp.out_dim if self.mlp is not None else 0), 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x0 = self.embedding.flatten(*self.embedding(batch))
        parts = [self.cross(x0)] + ([self.mlp(x0)] if self.mlp is not None else [])
        return self.head(torch.cat(parts, dim=1)).squeeze(-1)
