"""AutoInt+ (Song et al. 2019): stacked multi-head self-attention over fields, plus a DNN branch."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from lowrank_ctr.data.schema import Schema
from lowrank_ctr.models.base import CTRModel
from lowrank_ctr.models.layers import InteractingLayer, OutputLinear
from lowrank_ctr.models.registry import register_model


@register_model("autoint")
class AutoInt(CTRModel):
    """``mlp: []`` gives plain AutoInt (attention only). Dense numeric columns join the attention head's input."""

    def __init__(self, schema: Schema, embedding_dim: int = 16, attention_layers: int = 3, num_heads: int = 2,
                 attention_dim: int = 64, residual: bool = True, scale: bool = True,
                 mlp: Sequence[int] = (400, 400, 400), dropout: float = 0.0, batch_norm: bool = False,
                 activation: str = "relu", numeric: str = "embed") -> None:
        super().__init__()
        self.embedding = self._embedding(schema, embedding_dim, numeric, min_fields=1)
        n_layers = self._int("attention_layers", attention_layers)
        heads = self._int("num_heads", num_heads)
        att_dim = self._int("attention_dim", attention_dim)
        if att_dim % heads:
            self._fail("attention_dim", f"must be divisible by num_heads={heads}", att_dim)
        dims = [self.embedding.dim] + [att_dim] * n_layers
        self.attention = nn.Sequential(*(
            InteractingLayer(dims[i], att_dim, heads, residual=self._bool("residual", residual),
                             scale=self._bool("scale", scale))
            for i in range(n_layers)))
        self.attention_head = OutputLinear(self.embedding.num_fields * att_dim + self.embedding.dense_dim, 1)
        hidden = self._sizes("mlp", mlp)
        self.mlp = (self._mlp(self.embedding.flat_dim, hidden, activation, batch_norm, dropout, out_dim=1)
                    if hidden else None)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        emb, dense = self.embedding(batch)
        attended = self.attention(emb).flatten(1)
        logit = self.attention_head(torch.cat([attended, dense], dim=1)).squeeze(-1)
        if self.mlp is not None:
            logit = logit + self.mlp(self.embedding.flatten(emb, dense)).squeeze(-1)
        return logit
