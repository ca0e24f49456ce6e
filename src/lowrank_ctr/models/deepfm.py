"""DeepFM (Guo et al. 2017): linear + FM + DNN sharing one embedding."""

from __future__ import annotations

from typing import Sequence

import torch

from lowrank_ctr.data.schema import Schema
from lowrank_ctr.models.base import CTRModel
from lowrank_ctr.models.layers import FactorizationMachine, LinearTerm
from lowrank_ctr.models.registry import register_model


@register_model("deepfm")
class DeepFM(CTRModel):
    def __init__(self, schema: Schema, embedding_dim: int = 16, mlp: Sequence[int] = (400, 400, 400),
                 dropout: float = 0.0, batch_norm: bool = False, activation: str = "relu",
                 numeric: str = "embed") -> None:
        super().__init__()
        self.embedding = self._embedding(schema, embedding_dim, numeric)
        self.linear = LinearTerm(schema)
        self.fm = FactorizationMachine()
        self.mlp = self._mlp(self.embedding.flat_dim, mlp, activation, batch_norm, dropout, out_dim=1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        emb, dense = self.embedding(batch)
        deep = self.mlp(self.embedding.flatten(emb, dense)).squeeze(-1)
        return self.linear(batch) + self.fm(emb) + deep
