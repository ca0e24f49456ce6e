"""Logistic regression: the first-order floor every interaction model has to beat."""

from __future__ import annotations

import torch

from lowrank_ctr.data.schema import Schema
from lowrank_ctr.models.base import CTRModel
from lowrank_ctr.models.layers import LinearTerm
from lowrank_ctr.models.registry import register_model


@register_model("lr")
class LogisticRegression(CTRModel):
    """``embedding_dim`` is accepted (and ignored) so every model config carries the same keys."""

    def __init__(self, schema: Schema, embedding_dim: int = 16) -> None:
        super().__init__()
        self._int("embedding_dim", embedding_dim)
        self.linear = LinearTerm(schema)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(batch)
