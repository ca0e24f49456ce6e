"""Shared layers every CTR model is composed from (plain torch; no Lightning, no compression)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class FieldEmbedding(nn.Module):
    """All id-valued fields in ONE flat table with per-field offsets: one gather per batch.

    ``forward(ids)`` takes ids of shape (B, F) or (B, F, L) (field on dim 1, local ids per field) and returns
    (B, F, dim) or (B, F, L, dim). Compressed replacements (compression/) keep exactly this signature and the
    ``vocab_sizes`` / ``dim`` attributes, so models never know whether they were compressed.
    """

    def __init__(self, vocab_sizes: Sequence[int], dim: int, init_std: float = 0.01) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"embedding dim must be >= 1, got {dim}")
        self.vocab_sizes = [int(v) for v in vocab_sizes]
        self.dim = int(dim)
        offsets = torch.tensor([0] + self.vocab_sizes[:-1], dtype=torch.long).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.weight = nn.Parameter(torch.empty(sum(self.vocab_sizes), self.dim))
        nn.init.normal_(self.weight, std=init_std)

    @property
    def num_fields(self) -> int:
        return len(self.vocab_sizes)

    def flat_ids(self, ids: torch.Tensor) -> torch.Tensor:
        shape = (1, self.num_fields) + (1,) * (ids.dim() - 2)
        return ids + self.offsets.view(shape)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(self.flat_ids(ids), self.weight)

    def field_table(self, i: int) -> torch.Tensor:
        """The rows of field ``i`` (a view into the flat table)."""
        start = int(self.offsets[i])
        return self.weight[start : start + self.vocab_sizes[i]]

    def extra_repr(self) -> str:
        return f"fields={self.num_fields}, rows={sum(self.vocab_sizes)}, dim={self.dim}"


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "prelu": nn.PReLU,
               "leaky_relu": nn.LeakyReLU, "identity": nn.Identity}


def make_activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


class MLP(nn.Module):
    """Linear -> [BatchNorm] -> activation -> [Dropout] blocks, optionally followed by an output Linear.

    The Linear layers are the compression targets of the ``mlp`` group (compression/ finds them as
    ``nn.Linear`` children of an ``MLP``), so they live directly in ``self.net`` with stable names
    ``net.0``, ``net.4``, ... .
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], activation: str = "relu", batch_norm: bool = False,
                 dropout: float = 0.0, out_dim: int | None = None) -> None:
        super().__init__()
        if in_dim < 1 or any(int(h) < 1 for h in hidden) or (out_dim is not None and out_dim < 1):
            raise ValueError(f"MLP sizes must be positive: in_dim={in_dim}, hidden={list(hidden)}, out_dim={out_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers.append(nn.Linear(d, int(h)))
            if batch_norm:
                layers.append(nn.BatchNorm1d(int(h)))
            layers.append(make_activation(activation))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = int(h)
        if out_dim is not None:
            layers.append(nn.Linear(d, out_dim))
            d = out_dim
        self.net = nn.Sequential(*layers)
        self.out_dim = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
