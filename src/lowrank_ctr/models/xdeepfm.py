"""xDeepFM (Lian et al. 2018): linear + Compressed Interaction Network + DNN."""

from __future__ import annotations

from typing import Sequence

import torch

from lowrank_ctr.data.schema import Schema
from lowrank_ctr.models.base import CTRModel
from lowrank_ctr.models.layers import CIN, LinearTerm, OutputLinear
from lowrank_ctr.models.registry import register_model


@register_model("xdeepfm")
class XDeepFM(CTRModel):
    def __init__(self, schema: Schema, embedding_dim: int = 16, cin_layers: Sequence[int] = (128, 128),
                 split_half: bool = True, cin_activation: str = "identity", mlp: Sequence[int] = (400, 400, 400),
                 dropout: float = 0.0, batch_norm: bool = False, activation: str = "relu",
                 numeric: str = "embed") -> None:
        super().__init__()
        self.embedding = self._embedding(schema, embedding_dim, numeric, min_fields=1)
        self.linear = LinearTerm(schema)
        self.cin = CIN(self.embedding.num_fields, self._sizes("cin_layers", cin_layers, allow_empty=False),
                       split_half=self._bool("split_half", split_half), activation=cin_activation)
        self.cin_head = OutputLinear(self.cin.out_dim, 1)
        self.mlp = self._mlp(self.embedding.flat_dim, mlp, activation, batch_norm, dropout, out_dim=1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        emb, dense = self.embedding(batch)
        deep = self.mlp(self.embedding.flatten(emb, dense)).squeeze(-1)
        return self.linear(batch) + self.cin_head(self.cin(emb)).squeeze(-1) + deep
