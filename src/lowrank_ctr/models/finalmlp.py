"""FinalMLP (Mao et al. 2023): two gated MLP streams fused by a multi-head bilinear aggregation."""

from __future__ import annotations

from typing import Sequence

import torch

from lowrank_ctr.data.schema import Schema
from lowrank_ctr.models.base import CTRModel
from lowrank_ctr.models.layers import FeatureGate, InteractionAggregation
from lowrank_ctr.models.registry import register_model


@register_model("finalmlp")
class FinalMLP(CTRModel):
    """Streams are ``mlp1`` / ``mlp2`` (MLPs); gates ``gate1`` / ``gate2`` hold small gate MLPs.

    ``fs1_context`` / ``fs2_context`` name the fields that condition each stream's gate (empty: learned vector).
    """

    def __init__(self, schema: Schema, embedding_dim: int = 16, mlp1: Sequence[int] = (400, 400, 400),
                 mlp2: Sequence[int] = (800,), use_fs: bool = True, fs_hidden: Sequence[int] = (800,),
                 fs1_context: Sequence[str] = (), fs2_context: Sequence[str] = (), num_heads: int = 10,
                 dropout: float = 0.0, batch_norm: bool = False, activation: str = "relu",
                 numeric: str = "embed") -> None:
        super().__init__()
        self.embedding = self._embedding(schema, embedding_dim, numeric)
        in_dim, d = self.embedding.flat_dim, self.embedding.dim
        self.gate1 = self.gate2 = None
        if self._bool("use_fs", use_fs):
            hidden = self._sizes("fs_hidden", fs_hidden)
            self.gate1 = FeatureGate(in_dim, d, self._fields("fs1_context", fs1_context), hidden, activation)
            self.gate2 = FeatureGate(in_dim, d, self._fields("fs2_context", fs2_context), hidden, activation)
        self.mlp1 = self._mlp(in_dim, mlp1, activation, batch_norm, dropout, out_dim=None, arg="mlp1")
        self.mlp2 = self._mlp(in_dim, mlp2, activation, batch_norm, dropout, out_dim=None, arg="mlp2")
        heads = self._int("num_heads", num_heads)
        if self.mlp1.out_dim % heads or self.mlp2.out_dim % heads:
            self._fail("num_heads", f"must divide both stream widths ({self.mlp1.out_dim}, {self.mlp2.out_dim})",
                       heads)
        self.fusion = InteractionAggregation(self.mlp1.out_dim, self.mlp2.out_dim, heads)

    def _fields(self, arg: str, names: Sequence[str]) -> list[int]:
        known = self.embedding.field_names
        if isinstance(names, str):
            self._fail(arg, "must be a list of field names", names, TypeError)
        missing = [n for n in names if n not in known]
        if missing:
            self._fail(arg, f"names fields {missing} that are not embedded fields {known}", list(names))
        return [known.index(n) for n in names]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        emb, dense = self.embedding(batch)
        x = self.embedding.flatten(emb, dense)
        x1 = self.gate1(x, emb) if self.gate1 is not None else x
        x2 = self.gate2(x, emb) if self.gate2 is not None else x
        return self.fusion(self.mlp1(x1), self.mlp2(x2))
