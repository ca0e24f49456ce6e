"""svd: truncated SVD of the weights, the baseline of the paper's framework.

Linear y = W x + b:  W = U S V^T -> down = S_k V_k^T, up = U_k, up bias = b.
Embedding field i (E_i: V_i x d): E_i = U S V^T -> codes U_k S_k = E_i V_k, projection V_k^T, bias 0
(V_k from the d x d Gram matrix, so a table with millions of rows costs one pass). Spectra: singular values squared.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from lowrank_ctr.compression.methods import register_method
from lowrank_ctr.compression.methods.base import LayerContext, f64
from lowrank_ctr.compression.methods.lowrank import LowRankMethod, linear_full_rank, linear_params
from lowrank_ctr.models.layers import FieldEmbedding


@register_method
class SVD(LowRankMethod):
    name: ClassVar[str] = "svd"
    label: ClassVar[str] = "SVD"
    color: ClassVar[str] = "#1f77b4"

    def field_bases(self, emb: FieldEmbedding, ctx: LayerContext):
        spectra, bases, means = [], [], []
        for i, v in enumerate(emb.vocab_sizes):
            e = f64(emb.field_table(i))
            evals, evecs = torch.linalg.eigh(e.T @ e)
            full = min(v, emb.dim)
            spectra.append(evals.flip(0).clamp_min(0.0)[:full])
            bases.append(evecs.flip(-1)[:, :full])
            means.append(torch.zeros(emb.dim, dtype=torch.float64))
        return spectra, bases, means

    def linear_basis(self, linear: nn.Linear, ctx: LayerContext):
        w, b = linear_params(linear, ctx)
        u, s, _ = torch.linalg.svd(w, full_matrices=False)
        k = linear_full_rank(linear)
        return (s**2)[:k], u[:, :k], b  # mean = b: the bias passes through unchanged
