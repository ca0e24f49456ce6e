"""FiBiNET (Huang et al. 2019): SENET field re-weighting + bilinear interactions of raw and re-weighted fields."""

from __future__ import annotations

from typing import Sequence

import torch

from lowrank_ctr.data.schema import Schema
from lowrank_ctr.models.base import CTRModel
from lowrank_ctr.models.layers import BILINEAR_TYPES, BilinearInteraction, LinearTerm, SENETLayer
from lowrank_ctr.models.registry import register_model


@register_model("fibinet")
class FiBiNET(CTRModel):
    def __init__(self, schema: Schema, embedding_dim: int = 16, reduction_ratio: float = 3.0,
                 bilinear_type: str = "field_interaction", mlp: Sequence[int] = (400, 400, 400),
                 dropout: float = 0.0, batch_norm: bool = False, activation: str = "relu",
                 numeric: str = "embed") -> None:
        super().__init__()
        self.embedding = self._embedding(schema, embedding_dim, numeric, min_fields=2)
        f, d = self.embedding.num_fields, self.embedding.dim
        ratio = self._float("reduction_ratio", reduction_ratio, 1.0, float("inf"))
        kind = self._choice("bilinear_type", bilinear_type, BILINEAR_TYPES)
        self.linear = LinearTerm(schema)
        self.senet = SENETLayer(f, ratio)
        self.bilinear = BilinearInteraction(f, d, kind)
        self.senet_bilinear = BilinearInteraction(f, d, kind)
        in_dim = 2 * self.bilinear.num_pairs * d + self.embedding.dense_dim
        self.mlp = self._mlp(in_dim, mlp, activation, batch_norm, dropout, out_dim=1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        emb, dense = self.embedding(batch)
        p = self.bilinear(emb).flatten(1)
        q = self.senet_bilinear(self.senet(emb)).flatten(1)
        return self.linear(batch) + self.mlp(torch.cat([p, q, dense], dim=1)).squeeze(-1)
