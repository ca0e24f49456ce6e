"""Factorization Machine (Rendle 2010): linear term + all pairwise field dot products."""

from __future__ import annotations

import torch

from lowrank_ctr.data.schema import Schema
from lowrank_ctr.models.base import CTRModel
from lowrank_ctr.models.layers import FactorizationMachine, LinearTerm
from lowrank_ctr.models.registry import register_model


@register_model("fm")
class FM(CTRModel):
    def __init__(self, schema: Schema, embedding_dim: int = 16, numeric: str = "embed") -> None:
        super().__init__()
        self.embedding = self._embedding(schema, embedding_dim, numeric)
        self.linear = LinearTerm(schema)
        self.fm = FactorizationMachine()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        emb, _ = self.embedding(batch)
        return self.linear(batch) + self.fm(emb)
