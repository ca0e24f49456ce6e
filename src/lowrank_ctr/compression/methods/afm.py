"""afm: Atomic Feature Mimicking (Yu et al., KDD 2024) — PCA of each layer's OUTPUTS on calibration data.

Linear: output statistics mu, C = E[yy^T] - mu mu^T, top-k eigenvectors U_k ->
y_hat = mu + U_k U_k^T (y - mu), as down = U_k^T W and up = U_k with up bias U_k U_k^T b + (I - U_k U_k^T) mu.
(DESIGN.md puts U_k^T b on ``down``; folding it into ``up``'s bias is the same function and keeps one
LowRankLinear layout for svd and afm.)
Embedding field i: per-field statistics of the looked-up vectors (frequency-weighted by the data) ->
codes (E_i - mu_i) U_k, projection U_k^T, bias mu_i.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from lowrank_ctr.compression.methods import register_method
from lowrank_ctr.compression.methods.base import LayerContext
from lowrank_ctr.compression.methods.lowrank import (
    LowRankMethod,
    check_stats,
    embedding_full_ranks,
    linear_full_rank,
)
from lowrank_ctr.models.layers import FieldEmbedding


@register_method
class AFM(LowRankMethod):
    name: ClassVar[str] = "afm"
    label: ClassVar[str] = "AFM"
    color: ClassVar[str] = "#d62728"
    needs_calibration: ClassVar[bool] = True

    def field_bases(self, emb: FieldEmbedding, ctx: LayerContext):
        s = check_stats(ctx.stats, emb.num_fields, emb.dim, "an embedding")
        evals, evecs = s.spectrum()
        mu = s.mean()
        full = embedding_full_ranks(emb)
        return ([evals[i, :f] for i, f in enumerate(full)], [evecs[i, :, :f] for i, f in enumerate(full)],
                list(mu))

    def linear_basis(self, linear: nn.Linear, ctx: LayerContext):
        s = check_stats(ctx.stats, 1, linear.out_features, "a Linear layer")
        evals, evecs = s.spectrum()
        k = linear_full_rank(linear)
        return evals[0, :k], evecs[0, :, :k], s.mean()[0]

    def complete_basis(self, basis: torch.Tensor, spectrum: torch.Tensor, order: torch.Tensor,
                       rows: torch.Tensor) -> torch.Tensor:
        """The chosen eigenvectors; directions the calibration data never excited (eigenvalue ~0, where the
        eigenvectors are arbitrary) are replaced by the dominant directions of ``rows`` (the vectors the layer can
        produce: embedding rows minus mean, or the Linear's weight columns) outside the calibrated span. This
        changes nothing on the calibration data, and makes full rank exact for every row, seen in calibration or
        not."""
        k = order.numel()
        top = float(spectrum.max()) if spectrum.numel() else 0.0
        excited = order[spectrum[order] > 1e-9 * top] if top > 0 else order[:0]
        if excited.numel() == k:
            return basis[:, order]
        q = basis[:, excited]
        resid = rows - (rows @ q) @ q.T
        _, rvecs = torch.linalg.eigh(resid.T @ resid)
        full, _ = torch.linalg.qr(torch.cat([q, rvecs.flip(-1), basis], dim=1))
        return full[:, :k]
