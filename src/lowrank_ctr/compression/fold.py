"""Folding a low-rank embedding's projection into the Linear that consumes its flattened output.

Where the reconstructed embeddings (B, F, d) are flattened straight into a Linear (the DNN branch, no
non-linearity in between), x = [.., e_1, .., e_F, ..] with e_i = z_i P_i + b_i, so

    W x = sum_i (W_i P_i^T) z_i + sum_i W_i b_i + (other columns)

and the Linear can read the codes z (B, F * k_max) directly: h x F k_max weights instead of h x F d plus the
F k d projection FLOPs. Valid for single-valued ids (B, F) only: sum-pooled multi-hot fields would need the
bias scaled by the number of ids. The model then feeds ``emb.lookup_codes(ids).flatten(1)`` to the folded layer;
this module does not rewrite a model's forward (models own their wiring).
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_ctr.compression.modules import LowRankFieldEmbedding


@torch.no_grad()
def fold_into_linear(emb: LowRankFieldEmbedding, linear: nn.Linear, start_column: int = 0) -> nn.Linear:
    """A Linear equivalent to ``linear`` whose columns [start, start + F d) read codes instead of embeddings.

    The returned layer takes (.., x[:start], codes (F * k_max), x[start + F d:]) and gives the same output.
    """
    nf, d, k = emb.num_fields, emb.dim, emb.max_rank
    stop = start_column + nf * d
    if start_column < 0 or stop > linear.in_features:
        raise ValueError(f"embedding columns [{start_column}, {stop}) do not fit in Linear(in={linear.in_features})")
    w = linear.weight.detach().to(torch.float64)
    w_emb = w[:, start_column:stop].reshape(w.shape[0], nf, d)  # (h, F, d)
    proj = emb.projection.detach().to(torch.float64)  # (F, k, d)
    folded_w = torch.einsum("hfd,fkd->hfk", w_emb, proj).reshape(w.shape[0], nf * k)
    bias = torch.einsum("hfd,fd->h", w_emb, emb.bias.detach().to(torch.float64))
    if linear.bias is not None:
        bias = bias + linear.bias.detach().to(torch.float64)
    new = nn.Linear(linear.in_features - nf * d + nf * k, linear.out_features)
    new = new.to(device=linear.weight.device, dtype=linear.weight.dtype)
    new.weight.copy_(torch.cat([w[:, :start_column], folded_w, w[:, stop:]], dim=1))
    new.bias.copy_(bias)
    return new
