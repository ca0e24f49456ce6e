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


@torch.no_grad()
def fold_model(model: nn.Module, table_name: str = "embedding.table") -> dict:
    """Fold a compressed embedding's projection into the Linear its flattened output feeds, in place.

    The model declares that Linear as ``embedding_sink`` (the dotted name of the only consumer of its flattened
    embeddings, e.g. ``mlp.net.0`` in DNN); models without it cannot be folded. The sink may be an ``nn.Linear``
    or an SVD/AFM ``LowRankLinear`` (then its ``down`` Linear takes the folded weights and ``up`` the bias).
    Field i's columns [i d, (i+1) d) of the sink become ``[W_i P_i^T, 0]`` and the bias gains ``sum_i W_i b_i``;
    the table is replaced by a FoldedCodeEmbedding that returns the zero-padded codes. Same predictions, no
    per-field projection matmul. Returns {name: new module} for the compression spec.
    """
    from lowrank_ctr.compression.modules import FoldedCodeEmbedding, LowRankLinear
    from lowrank_ctr.compression.targets import get_module, set_module

    sink_name = getattr(model, "embedding_sink", None)
    if not sink_name:
        raise ValueError(f"compression.fold=true needs a model whose embeddings feed only its first MLP Linear "
                         f"(e.g. dnn); {type(model).__name__} also uses them elsewhere (FM, cross, attention, ...)")
    table = get_module(model, table_name)
    if not isinstance(table, LowRankFieldEmbedding) or isinstance(table, FoldedCodeEmbedding):
        raise ValueError(f"compression.fold=true folds an SVD/AFM embedding; {table_name!r} is "
                         f"{type(table).__name__} (use compression=afm or svd with 'embedding' in targets)")
    sink = get_module(model, sink_name)
    first = sink.down if isinstance(sink, LowRankLinear) else sink
    if not isinstance(first, nn.Linear):
        raise ValueError(f"compression.fold=true needs {sink_name!r} to be a Linear or LowRankLinear, "
                         f"not {type(sink).__name__}")
    nf, d, k = table.num_fields, table.dim, table.max_rank
    w = first.weight.to(torch.float64)
    w_emb = w[:, : nf * d].reshape(w.shape[0], nf, d)
    folded = torch.einsum("hfd,fkd->hfk", w_emb, table.projection.to(torch.float64))  # (h, F, k)
    shift = torch.einsum("hfd,fd->h", w_emb, table.bias.to(torch.float64))  # constant added to the output
    new_w = w.clone()
    new_w[:, : nf * d] = torch.nn.functional.pad(folded, (0, d - k)).reshape(w.shape[0], nf * d)
    first.weight.copy_(new_w.to(first.weight.dtype))
    if first.bias is not None:
        first.bias.add_(shift.to(first.bias.dtype))
    else:  # LowRankLinear.down has no bias: push the constant through up
        sink.up.bias.add_((sink.up.weight.to(torch.float64) @ shift).to(sink.up.bias.dtype))
    codes = FoldedCodeEmbedding(table.vocab_sizes, d, table.ranks).to(table.codes)
    codes.codes.copy_(table.codes)
    set_module(model, table_name, codes)
    return {table_name: codes}
