"""Plain DNN over concatenated field embeddings (the implicit-interaction baseline)."""

from __future__ import annotations

from typing import Sequence

import torch

from lowrank_ctr.data.schema import Schema
from lowrank_ctr.models.base import CTRModel
from lowrank_ctr.models.registry import register_model


@register_model("dnn")
class DNN(CTRModel):
    def __init__(self, schema: Schema, embedding_dim: int = 16, mlp: Sequence[int] = (400, 400, 400),
                 dropout: float = 0.0, batch_norm: bool = False, activation: str = "relu",
                 numeric: str = "embed") -> None:
        super().__init__()
        self.embedding = self._embedding(schema, embedding_dim, numeric)
        self.mlp = self._mlp(self.embedding.flat_dim, mlp, activation, batch_norm, dropout, out_dim=1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.mlp(self.embedding.flatten(*self.embedding(batch))).squeeze(-1)
