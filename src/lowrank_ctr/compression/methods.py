"""Compression methods: one function per (method, layer type), each returning (replacement, info dict).

Math (DESIGN.md "The methods"), computed in float64 on CPU and cast back to the layer's dtype / device:

* svd, Linear y = W x + b:  W = U S V^T -> down = S_k V_k^T, up = U_k, up bias = b.
* afm, Linear: output stats mu, C = E[yy^T] - mu mu^T, top-k eigenvectors U_k ->
  y_hat = mu + U_k U_k^T (y - mu), as down = U_k^T W and up = U_k with up bias U_k U_k^T b + (I - U_k U_k^T) mu.
  (DESIGN.md puts U_k^T b on ``down``; folding it into ``up``'s bias is the same function with k fewer values
  and keeps one LowRankLinear layout for svd and afm.)
* svd, embedding field i (E_i: V_i x d): E_i = U S V^T -> codes U_k S_k = E_i V_k, projection V_k^T, bias 0
  (V_k from the d x d Gram matrix, so a table with millions of rows costs one pass).
* afm, embedding field i: per-field stats of looked-up vectors -> codes (E_i - mu_i) U_k, projection U_k^T,
  bias mu_i.
* tt: per-field TT-SVD (modules.TTEmbedding); fields where TT would not save space stay dense.
* int8: row-wise symmetric int8 with fp16 scales (modules.Int8FieldEmbedding / Int8Linear).

Spectra (``*_spectrum``) are what rank policies choose from: singular values squared (svd) or output-covariance
eigenvalues (afm), descending. ``retained_energy`` is the kept share of that spectrum (for tt / int8: one minus
the relative squared reconstruction error of the weights).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from lowrank_ctr.compression.modules import (
    Int8FieldEmbedding,
    Int8Linear,
    LowRankFieldEmbedding,
    LowRankLinear,
    TTEmbedding,
    TTFieldEmbedding,
    tt_dim_factors,
    tt_vocab_factors,
)
from lowrank_ctr.compression.size import module_size
from lowrank_ctr.compression.stats import OutputStats
from lowrank_ctr.models.layers import FieldEmbedding

Info = dict[str, Any]


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


def _place(new: nn.Module, like: torch.Tensor) -> nn.Module:
    return new.to(device=like.device, dtype=like.dtype)


def _info(method: str, old: nn.Module, new: nn.Module, rank: Any, full_rank: Any, retained: float,
          **extra: Any) -> Info:
    pb, bb = module_size(old)
    pa, ba = module_size(new)
    return {"method": method, "rank": rank, "full_rank": full_rank, "retained_energy": float(retained),
            "params_before": pb, "params_after": pa, "bytes_before": bb, "bytes_after": ba, **extra}


def _kept(spectrum: torch.Tensor, k: int) -> float:
    total = float(spectrum.sum())
    return float(spectrum[:k].sum()) / total if total > 0 else 1.0


def _check_stats(stats: OutputStats | None, groups: int, dim: int, what: str) -> OutputStats:
    if stats is None:
        raise ValueError(f"afm needs calibration statistics for {what}")
    if stats.groups != groups or stats.dim != dim:
        raise ValueError(f"statistics of shape ({stats.groups}, {stats.dim}) do not fit {what} ({groups}, {dim})")
    return stats


def _afm_basis(evals: torch.Tensor, evecs: torch.Tensor, k: int, rows: torch.Tensor) -> torch.Tensor:
    """Top-k eigenvectors; directions the calibration data never excited (eigenvalue ~0, where the
    eigenvectors are arbitrary) are replaced by the dominant directions of ``rows`` (the vectors the layer can
    produce: embedding rows minus mean, or the Linear's weight columns) outside the calibrated span. This changes
    nothing on the calibration data, and makes full rank exact for every row, seen in calibration or not."""
    top = float(evals[0]) if evals.numel() else 0.0
    nz = int((evals > 1e-9 * top).sum()) if top > 0 else 0
    if k <= nz:
        return evecs[:, :k]
    q = evecs[:, :nz]
    resid = rows - (rows @ q) @ q.T
    _, rvecs = torch.linalg.eigh(resid.T @ resid)
    basis, _ = torch.linalg.qr(torch.cat([q, rvecs.flip(-1), evecs[:, nz:]], dim=1))
    return basis[:, :k]


# ---------------------------------------------------------------------------------------------------------------
# Spectra
# ---------------------------------------------------------------------------------------------------------------
def linear_full_rank(linear: nn.Linear) -> int:
    return min(linear.in_features, linear.out_features)


def linear_spectrum(method: str, linear: nn.Linear, stats: OutputStats | None = None) -> torch.Tensor:
    """Energies, descending, of length min(in, out): singular values squared (svd) or eigenvalues (afm)."""
    k = linear_full_rank(linear)
    if method == "afm":
        s = _check_stats(stats, 1, linear.out_features, "a Linear layer")
        return s.spectrum()[0][0, :k]
    return torch.linalg.svdvals(_f64(linear.weight))[:k] ** 2


def embedding_full_ranks(emb: FieldEmbedding) -> list[int]:
    return [min(v, emb.dim) for v in emb.vocab_sizes]


def embedding_spectra(method: str, emb: FieldEmbedding, stats: OutputStats | None = None) -> list[torch.Tensor]:
    """Per field: energies, descending, of length min(V_i, d)."""
    full = embedding_full_ranks(emb)
    if method == "afm":
        s = _check_stats(stats, emb.num_fields, emb.dim, "an embedding")
        evals = s.spectrum()[0]
        return [evals[i, : full[i]] for i in range(emb.num_fields)]
    out = []
    for i in range(emb.num_fields):
        e = _f64(emb.field_table(i))
        out.append(torch.linalg.eigvalsh(e.T @ e).flip(0).clamp_min(0.0)[: full[i]])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Linear layers
# ---------------------------------------------------------------------------------------------------------------
def _check_linear_rank(linear: nn.Linear, rank: int) -> int:
    full = linear_full_rank(linear)
    if not 1 <= int(rank) <= full:
        raise ValueError(f"rank {rank} outside 1..{full} for Linear({linear.in_features}, {linear.out_features})")
    return int(rank)


def svd_linear(linear: nn.Linear, rank: int, stats: OutputStats | None = None) -> tuple[LowRankLinear, Info]:
    k = _check_linear_rank(linear, rank)
    u, s, vh = torch.linalg.svd(_f64(linear.weight), full_matrices=False)
    new = LowRankLinear(linear.in_features, linear.out_features, k, bias=linear.bias is not None)
    new = new.to(linear.weight.dtype)
    with torch.no_grad():
        new.down.weight.copy_(s[:k, None] * vh[:k])
        new.up.weight.copy_(u[:, :k])
        if linear.bias is not None:
            new.up.bias.copy_(_f64(linear.bias))
    new = _place(new, linear.weight)
    return new, _info("svd", linear, new, k, linear_full_rank(linear), _kept(s**2, k))


def afm_linear(linear: nn.Linear, rank: int, stats: OutputStats) -> tuple[LowRankLinear, Info]:
    k = _check_linear_rank(linear, rank)
    s = _check_stats(stats, 1, linear.out_features, "a Linear layer")
    evals, evecs = s.spectrum()
    w = _f64(linear.weight)
    mu, u = s.mean()[0], _afm_basis(evals[0], evecs[0], k, w.T)
    b = _f64(linear.bias) if linear.bias is not None else torch.zeros(linear.out_features, dtype=torch.float64)
    new = LowRankLinear(linear.in_features, linear.out_features, k, bias=True).to(linear.weight.dtype)
    with torch.no_grad():
        new.down.weight.copy_(u.T @ w)
        new.up.weight.copy_(u)
        new.up.bias.copy_(mu + u @ (u.T @ (b - mu)))
    new = _place(new, linear.weight)
    return new, _info("afm", linear, new, k, linear_full_rank(linear), _kept(evals[0], k))


def int8_linear(linear: nn.Linear, rank: Any = None, stats: OutputStats | None = None) -> tuple[Int8Linear, Info]:
    new = Int8Linear.from_linear(linear)
    w = _f64(linear.weight)
    err = float(((_f64(new.dequantized_weight()) - w) ** 2).sum() / max(float((w**2).sum()), 1e-300))
    return new, _info("int8", linear, new, None, None, 1.0 - err)


# ---------------------------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------------------------
def _field_ranks(emb: FieldEmbedding, ranks: int | Sequence[int]) -> list[int]:
    """An int applies to every field, capped at the field's full rank min(V_i, d); a list is per field."""
    full = embedding_full_ranks(emb)
    if isinstance(ranks, int):
        if not 1 <= ranks <= emb.dim:
            raise ValueError(f"embedding rank {ranks} outside 1..{emb.dim} (the embedding dim)")
        return [min(ranks, f) for f in full]
    ranks = [int(r) for r in ranks]
    if len(ranks) != emb.num_fields:
        raise ValueError(f"{len(ranks)} ranks given for an embedding with {emb.num_fields} fields")
    for i, (r, f) in enumerate(zip(ranks, full)):
        if not 1 <= r <= f:
            raise ValueError(f"embedding field {i}: rank {r} outside 1..{f} (min(vocab size, dim))")
    return ranks


def _embedding_info(method: str, emb: FieldEmbedding, new: nn.Module, ranks: list[int],
                    spectra: list[torch.Tensor]) -> Info:
    kept = [float(s[:k].sum()) for s, k in zip(spectra, ranks)]
    total = [float(s.sum()) for s in spectra]
    retained = sum(kept) / sum(total) if sum(total) > 0 else 1.0
    return _info(method, emb, new, max(ranks), emb.dim, retained, field_ranks=list(ranks),
                 field_full_ranks=embedding_full_ranks(emb),
                 field_retained_energy=[k / t if t > 0 else 1.0 for k, t in zip(kept, total)])


def svd_embedding(emb: FieldEmbedding, ranks: int | Sequence[int],
                  stats: OutputStats | None = None) -> tuple[LowRankFieldEmbedding, Info]:
    ranks = _field_ranks(emb, ranks)
    codes, projs, spectra = [], [], []
    for i, k in enumerate(ranks):
        e = _f64(emb.field_table(i))
        evals, evecs = torch.linalg.eigh(e.T @ e)
        v = evecs.flip(-1)[:, :k]
        codes.append(e @ v)
        projs.append(v.T)
        spectra.append(evals.flip(0).clamp_min(0.0)[: min(e.shape)])
    new = LowRankFieldEmbedding(emb.vocab_sizes, emb.dim, ranks).to(emb.weight.dtype)
    new.set_factors(codes, projs)
    new = _place(new, emb.weight)
    return new, _embedding_info("svd", emb, new, ranks, spectra)


def afm_embedding(emb: FieldEmbedding, ranks: int | Sequence[int],
                  stats: OutputStats) -> tuple[LowRankFieldEmbedding, Info]:
    ranks = _field_ranks(emb, ranks)
    s = _check_stats(stats, emb.num_fields, emb.dim, "an embedding")
    evals, evecs = s.spectrum()
    mu = s.mean()
    codes, projs = [], []
    for i, k in enumerate(ranks):
        centred = _f64(emb.field_table(i)) - mu[i]
        u = _afm_basis(evals[i], evecs[i], k, centred)
        codes.append(centred @ u)
        projs.append(u.T)
    new = LowRankFieldEmbedding(emb.vocab_sizes, emb.dim, ranks).to(emb.weight.dtype)
    new.set_factors(codes, projs, list(mu))
    new = _place(new, emb.weight)
    spectra = [evals[i, : f] for i, f in enumerate(embedding_full_ranks(emb))]
    return new, _embedding_info("afm", emb, new, ranks, spectra)


def tt_embedding(emb: FieldEmbedding, rank: int | Sequence[int],
                 stats: OutputStats | None = None) -> tuple[TTFieldEmbedding, Info]:
    """Per-field TT with TT-ranks (r, r) (or the given pair), capped at the exact ranks; dense if TT is larger."""
    r = [int(rank), int(rank)] if isinstance(rank, int) else [int(x) for x in rank]
    if len(r) != 2 or min(r) < 1:
        raise ValueError(f"tt rank must be an int >= 1 or a pair of them, got {rank!r}")
    configs: list[dict | None] = []
    tables: list[TTEmbedding | None] = []
    for i, v in enumerate(emb.vocab_sizes):
        vf, df = tt_vocab_factors(v), tt_dim_factors(emb.dim)
        cap = TTEmbedding.max_ranks(vf, df)
        rr = [min(r[0], cap[0]), min(r[1], cap[1])]
        if TTEmbedding.num_params(vf, df, rr) >= v * emb.dim:
            configs.append(None)
            tables.append(None)
            continue
        t = TTEmbedding.from_table(emb.field_table(i), rr, vf, df)
        configs.append(t.spec_args())
        tables.append(t)
    new = TTFieldEmbedding(emb.vocab_sizes, emb.dim,
                           [None if c is None else {k: c[k] for k in ("ranks", "vocab_factors", "dim_factors")}
                            for c in configs]).to(emb.weight.dtype)
    errs, norms = [], []
    with torch.no_grad():
        j = 0
        for i, t in enumerate(tables):
            e = _f64(emb.field_table(i))
            if t is None:
                start = int(new.dense_offsets[new.dense_index.index(i)])
                new.dense_weight[start : start + e.shape[0]] = e
                errs.append(0.0)
            else:
                new.tables[j].load_state_dict(t.state_dict())
                j += 1
                errs.append(float(((_f64(t.table()) - e) ** 2).sum()))
            norms.append(float((e**2).sum()))
    new = _place(new, emb.weight)
    retained = 1.0 - sum(errs) / max(sum(norms), 1e-300)
    return new, _info("tt", emb, new, r[0] if r[0] == r[1] else r, None, retained,
                      tt_fields=[c is not None for c in configs])


def int8_embedding(emb: FieldEmbedding, rank: Any = None,
                   stats: OutputStats | None = None) -> tuple[Int8FieldEmbedding, Info]:
    new = Int8FieldEmbedding.from_embedding(emb)
    w = _f64(emb.weight)
    deq = _f64(new.qweight.float() * new.scale.float())
    err = float(((deq - w) ** 2).sum() / max(float((w**2).sum()), 1e-300))
    return new, _info("int8", emb, new, None, None, 1.0 - err)


#: method -> (function for FieldEmbedding, function for nn.Linear or None when the method has none)
METHODS: dict[str, tuple[Any, Any]] = {
    "svd": (svd_embedding, svd_linear),
    "afm": (afm_embedding, afm_linear),
    "tt": (tt_embedding, None),
    "int8": (int8_embedding, int8_linear),
}
