"""What svd and afm share: per-field low-rank embeddings and two-factor Linears built from an orthonormal basis.

Both methods replace a layer by its projection onto a k-dimensional basis; they differ only in where the basis
comes from (svd: the weights' singular vectors; afm: the eigenvectors of the layer's OUTPUT covariance on
calibration data) and so in their spectra, the energies rank policies choose from. Spectra and the reported
``retained_energy`` are computed in float64 on CPU; replacements are cast back to the layer's dtype and device.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import nn

from lowrank_ctr.compression.methods.base import CompressionMethod, Info, LayerContext, f64, layer_info, place
from lowrank_ctr.compression.modules import LowRankFieldEmbedding, LowRankLinear
from lowrank_ctr.models.layers import FieldEmbedding


def linear_full_rank(linear: nn.Linear) -> int:
    return min(linear.in_features, linear.out_features)


def embedding_full_ranks(emb: FieldEmbedding) -> list[int]:
    return [min(v, emb.dim) for v in emb.vocab_sizes]


def kept_share(spectrum: torch.Tensor, kept: torch.Tensor) -> float:
    """Share of a spectrum's total in the kept components (1.0 for an all-zero spectrum)."""
    total = float(spectrum.sum())
    return float(spectrum[kept].sum()) / total if total > 0 else 1.0


def component_order(spectrum: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """Indices of the components in the order they are kept (default: by energy, descending)."""
    return torch.arange(spectrum.numel()) if order is None else order.to(torch.long)


def field_ranks(emb: FieldEmbedding, ranks: int | Sequence[int]) -> list[int]:
    """An int applies to every field (1..dim, capped at the field's full rank); a list is per field (0..full)."""
    full = embedding_full_ranks(emb)
    if isinstance(ranks, int):
        if not 1 <= ranks <= emb.dim:
            raise ValueError(f"embedding rank {ranks} outside 1..{emb.dim} (the embedding dim)")
        return [min(ranks, f) for f in full]
    ranks = [int(r) for r in ranks]
    if len(ranks) != emb.num_fields:
        raise ValueError(f"{len(ranks)} ranks given for an embedding with {emb.num_fields} fields")
    for i, (r, f) in enumerate(zip(ranks, full)):
        if not 0 <= r <= f:
            raise ValueError(f"embedding field {i}: rank {r} outside 0..{f} (min(vocab size, dim))")
    return ranks


def check_linear_rank(linear: nn.Linear, rank: int) -> int:
    full = linear_full_rank(linear)
    if not 1 <= int(rank) <= full:
        raise ValueError(f"rank {rank} outside 1..{full} for Linear({linear.in_features}, {linear.out_features})")
    return int(rank)


def check_stats(stats: Any, groups: int, dim: int, what: str) -> Any:
    if stats is None:
        raise ValueError(f"afm needs calibration statistics for {what}")
    if stats.groups != groups or stats.dim != dim:
        raise ValueError(f"statistics of shape ({stats.groups}, {stats.dim}) do not fit {what} ({groups}, {dim})")
    return stats


def linear_params(linear: nn.Linear, ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) in float64: the context's corrected weights when given, else the layer's own (b = 0 without bias)."""
    w = f64(ctx.weight if ctx.weight is not None else linear.weight)
    b = ctx.bias if ctx.bias is not None else linear.bias
    return w, (f64(b) if b is not None else torch.zeros(w.shape[0], dtype=torch.float64))


class LowRankMethod(CompressionMethod):
    """svd / afm: rank policies apply; a layer becomes its projection onto a basis of k components."""

    low_rank: ClassVar[bool] = True
    first_order: ClassVar[bool] = True
    default_targets: ClassVar[tuple[str, ...]] = ("embedding", "mlp")
    module_types: ClassVar[tuple[type[nn.Module], ...]] = (LowRankLinear, LowRankFieldEmbedding)
    rank_meaning: ClassVar[str] = "the number of kept components per field (embeddings) or layer (Linear)"

    # What a subclass provides --------------------------------------------------------------------------------
    def field_bases(self, emb: FieldEmbedding, ctx: LayerContext
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Per field: spectrum (descending, length min(V_i, d)), basis (d x min(V_i, d) columns in spectrum
        order), mean (d,) the codes are centred on. Float64."""
        raise NotImplementedError

    def linear_basis(self, linear: nn.Linear, ctx: LayerContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(spectrum of length min(in, out), out x min(in, out) basis, mean output (out,)), float64."""
        raise NotImplementedError

    # Spectra (what rank policies and the budget choose from) ----------------------------------------------
    def embedding_spectra(self, emb: FieldEmbedding, ctx: LayerContext) -> list[torch.Tensor]:
        return self.field_bases(emb, ctx)[0]

    def linear_spectrum(self, linear: nn.Linear, ctx: LayerContext) -> torch.Tensor:
        return self.linear_basis(linear, ctx)[0]

    # Builders ------------------------------------------------------------------------------------------------
    def embedding(self, emb: FieldEmbedding, rank: Any, ctx: LayerContext) -> tuple[LowRankFieldEmbedding, Info]:
        ranks = field_ranks(emb, rank)
        spectra, bases, means = self.field_bases(emb, ctx)
        codes, projs, kept, order_used = [], [], [], []
        for i, k in enumerate(ranks):
            order = component_order(spectra[i], ctx.order[i] if ctx.order is not None else None)[:k]
            u = self.complete_basis(bases[i], spectra[i], order, f64(emb.field_table(i)) - means[i])
            codes.append((f64(emb.field_table(i)) - means[i]) @ u)
            projs.append(u.T)
            kept.append(kept_share(spectra[i], order))
            order_used.append(order)
        new = LowRankFieldEmbedding(emb.vocab_sizes, emb.dim, ranks, code_dtype=ctx.code_dtype, rank_grouped=True)
        new = place(new, emb.weight)
        new.set_factors(codes, projs, means)
        totals = [float(s.sum()) for s in spectra]
        retained = sum(s * t for s, t in zip(kept, totals)) / sum(totals) if sum(totals) > 0 else 1.0
        info = layer_info(self.name, emb, new, max(ranks), emb.dim, retained, field_ranks=list(ranks),
                          field_full_ranks=embedding_full_ranks(emb), field_retained_energy=kept,
                          code_dtype=ctx.code_dtype, field_spectra=[[float(x) for x in s] for s in spectra])
        return new, info

    def linear(self, linear: nn.Linear, rank: Any, ctx: LayerContext) -> tuple[LowRankLinear, Info]:
        k = check_linear_rank(linear, rank)
        spectrum, basis, mean = self.linear_basis(linear, ctx)
        order = component_order(spectrum, ctx.order[0] if ctx.order is not None else None)[:k]
        w, b = linear_params(linear, ctx)
        u = self.complete_basis(basis, spectrum, order, w.T)
        new = place(LowRankLinear(linear.in_features, linear.out_features, k, bias=True), linear.weight)
        with torch.no_grad():
            new.down.weight.copy_(u.T @ w)
            new.up.weight.copy_(u)
            # y_hat = mean + U U^T (W x + b - mean): the part of the output outside the basis is its mean
            new.up.bias.copy_(mean + u @ (u.T @ (b - mean)))
        info = layer_info(self.name, linear, new, k, linear_full_rank(linear), kept_share(spectrum, order),
                          spectrum=[float(x) for x in spectrum])
        return new, info

    def complete_basis(self, basis: torch.Tensor, spectrum: torch.Tensor, order: torch.Tensor,
                       rows: torch.Tensor) -> torch.Tensor:
        """The chosen basis columns; see AFM's override (directions the data never excited)."""
        return basis[:, order]

    # Config ----------------------------------------------------------------------------------------------------
    def setting(self, policy: Mapping[str, Any], ranks: str) -> str:
        base = super().setting(policy, ranks)
        extras = [f"{k}={policy[k]}" for k in ("code_dtype", "calibration", "correction", "allocator")
                  if policy.get(k) not in (None, "float32", "oneshot", "none", "variance")]
        return " ".join([base] + extras)
