"""DCN-V2 (Wang et al. 2021): full-matrix cross layers, stacked before or parallel to the DNN."""

from __future__ import annotations

from typing import Sequence

import torch

from lowrank_ctr.data.schema import Schema
from lowrank_ctr.models.base import CTRModel
from lowrank_ctr.models.layers import CrossNetworkV2, OutputLinear
from lowrank_ctr.models.registry import register_model

STRUCTURES = ("parallel", "stacked")


@register_model("dcnv2")
class DCNv2(CTRModel):
    """``mlp: []`` drops the DNN (cross network only); the cross matrices are nn.Linear ``cross.layers.{l}``."""

    def __init__(self, schema: Schema, embedding_dim: int = 16, cross_layers: int = 3,
                 structure: str = "parallel", mlp: Sequence[int] = (400, 400, 400), dropout: float = 0.0,
                 batch_norm: bool = False, activation: str = "relu", numeric: str = "embed") -> None:
        super().__init__()
        self.embedding = self._embedding(schema, embedding_dim, numeric)
        in_dim = self.embedding.flat_dim
        self.structure = self._choice("structure", structure, STRUCTURES)
        self.cross = CrossNetworkV2(in_dim, self._int("cross_layers", cross_layers))
        hidden = self._sizes("mlp", mlp)
        self.mlp = self._mlp(in_dim, hidden, activation, batch_norm, dropout, out_dim=None) if hidden else None
        deep_dim = self.mlp.out_dim if self.mlp is not None else 0
        if self.structure == "stacked":
            head_dim = deep_dim or in_dim
        else:
            head_dim = in_dim + deep_dim
        self.head = OutputLinear(head_dim, 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x0 = self.embedding.flatten(*self.embedding(batch))
        crossed = self.cross(x0)
        if self.mlp is None:
            h = crossed
        elif self.structure == "stacked":
            h = self.mlp(crossed)
        else:
            h = torch.cat([crossed, self.mlp(x0)], dim=1)
        return self.head(h).squeeze(-1)
