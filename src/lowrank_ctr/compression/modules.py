"""Drop-in compressed modules: each keeps the call signature of the layer it replaces.

Every module here can be rebuilt from ``spec_args()`` alone (JSON-serialisable constructor arguments), so a
compressed checkpoint is "spec + state_dict": build the base model, ``apply_spec`` (spec.py), then
``load_state_dict``. Lookups are plain torch ops (gather, mul, matmul, div/mod) so the modules trace and export
to ONNX; nothing indexes with numpy.

Replacements of ``FieldEmbedding`` keep its attributes ``vocab_sizes``, ``dim``, ``num_fields``, ``offsets``
and ``forward(ids)`` with ids (B, F) or (B, F, L) -> (B, F, d) or (B, F, L, d). They have no ``weight``; use
``field_table(i)`` for the (reconstructed) rows of field ``i``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def _field_offsets(vocab_sizes: Sequence[int]) -> torch.Tensor:
    return torch.tensor([0] + list(vocab_sizes)[:-1], dtype=torch.long).cumsum(0)


def _field_shape(ids: torch.Tensor, num_fields: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-field vector against ids of shape (B, F, ...)."""
    if ids.dim() < 2 or ids.shape[1] != num_fields:
        raise ValueError(f"expected ids of shape (B, {num_fields}) or (B, {num_fields}, L), got {tuple(ids.shape)}")
    return (1, num_fields) + (1,) * (ids.dim() - 2)


# ---------------------------------------------------------------------------------------------------------------
# Linear layers
# ---------------------------------------------------------------------------------------------------------------
class LowRankLinear(nn.Module):
    """y = up(down(x)): Linear(in -> k, no bias) then Linear(k -> out, bias). No activation in between.

    Saves parameters only when ``k * (in + out) < in * out``, i.e. ``k < in * out / (in + out)``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"LowRankLinear rank {rank} outside 1..{min(in_features, out_features)}")
        self.in_features, self.out_features, self.rank = int(in_features), int(out_features), int(rank)
        self.down = nn.Linear(self.in_features, self.rank, bias=False)
        self.up = nn.Linear(self.rank, self.out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def effective_weight(self) -> torch.Tensor:
        """The (out, in) weight this layer applies (for analysis and folding)."""
        return self.up.weight @ self.down.weight

    @staticmethod
    def num_params(in_features: int, out_features: int, rank: int, bias: bool = True) -> int:
        return rank * (in_features + out_features) + (out_features if bias else 0)

    def spec_args(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.up.bias is not None}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"


class Int8Linear(nn.Module):
    """Weight-only int8 Linear: int8 weight + fp16 per-output-row scale, dequantised in forward.

    Chosen over ``torch.ao.quantization.quantize_dynamic`` because it runs on any device, its state_dict is
    plain tensors (loads with ``weights_only=True``) and it exports to ONNX. It saves memory, not FLOPs.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.register_buffer("qweight", torch.zeros(self.out_features, self.in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(self.out_features, 1, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        q, s = quantize_rows(linear.weight.detach())
        m.qweight.copy_(q)
        m.scale.copy_(s)
        if linear.bias is not None:
            m.bias.data = linear.bias.detach().clone()
        return m.to(linear.weight.device)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.to(dtype) * self.scale.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def spec_args(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8"


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns (int8 weight, fp16 scale (rows, 1)); weight ~= q * scale."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1, keepdim=True)
    scale = (absmax / 127.0).to(torch.float16)
    # A row of zeros (or one whose scale underflows fp16) gets scale 1: it quantises to zeros either way.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale.float()).clamp_(-127, 127).to(torch.int8)
    return q, scale


# ---------------------------------------------------------------------------------------------------------------
# Low-rank field embedding (SVD and AFM)
# ---------------------------------------------------------------------------------------------------------------
class LowRankFieldEmbedding(nn.Module):
    """Per-field low-rank embedding: row e of field i is ``codes_i[e] @ projection[i, :k_i] + bias[i]``.

    Storage (why this layout): each field keeps its own rank k_i <= min(V_i, d). All fields' codes live in ONE
    flat 1-D parameter (field i occupies V_i * k_i values, row-major), so per-field ranks waste no memory;
    the projection is one (F, k_max, d) tensor whose rows beyond k_i are zero, plus an (F, d) bias.
    A lookup is one gather of k_max values per id (positions beyond k_i are masked to zero, so they also get
    no gradient) and one batched matmul. A field at full rank (k_i = min(V_i, d)) is exact, so small fields need
    no separate dense path: their codes cost at most what their dense rows cost.
    """

    def __init__(self, vocab_sizes: Sequence[int], dim: int, ranks: int | Sequence[int]) -> None:
        super().__init__()
        self.vocab_sizes = [int(v) for v in vocab_sizes]
        self.dim = int(dim)
        nf = len(self.vocab_sizes)
        ranks = [int(ranks)] * nf if isinstance(ranks, int) else [int(r) for r in ranks]
        if len(ranks) != nf:
            raise ValueError(f"LowRankFieldEmbedding: {len(ranks)} ranks for {nf} fields")
        for i, (v, r) in enumerate(zip(self.vocab_sizes, ranks)):
            if not 1 <= r <= min(v, self.dim):
                raise ValueError(f"LowRankFieldEmbedding field {i}: rank {r} outside 1..{min(v, self.dim)}")
        self.ranks = ranks
        self.max_rank = max(ranks)
        self.register_buffer("offsets", _field_offsets(self.vocab_sizes), persistent=False)
        sizes = [v * r for v, r in zip(self.vocab_sizes, ranks)]
        self.register_buffer("code_offsets", _field_offsets(sizes), persistent=False)
        self.register_buffer("rank_t", torch.tensor(ranks, dtype=torch.long), persistent=False)
        cols = torch.arange(self.max_rank)
        self.register_buffer("col", cols, persistent=False)
        self.register_buffer("col_mask", (cols.unsqueeze(0) < self.rank_t.unsqueeze(1)), persistent=False)
        self.codes = nn.Parameter(torch.zeros(sum(sizes)))
        self.projection = nn.Parameter(torch.zeros(nf, self.max_rank, self.dim))
        self.bias = nn.Parameter(torch.zeros(nf, self.dim))

    @property
    def num_fields(self) -> int:
        return len(self.vocab_sizes)

    @staticmethod
    def num_params(vocab_sizes: Sequence[int], dim: int, ranks: Sequence[int]) -> int:
        return sum(v * r for v, r in zip(vocab_sizes, ranks)) + len(vocab_sizes) * (max(ranks) + 1) * dim

    @torch.no_grad()
    def set_factors(self, codes: Sequence[torch.Tensor], projections: Sequence[torch.Tensor],
                    biases: Sequence[torch.Tensor] | None = None) -> "LowRankFieldEmbedding":
        """Fill from per-field codes (V_i, k_i), projections (k_i, d) and biases (d,)."""
        self.codes.copy_(torch.cat([c.reshape(-1) for c in codes]).to(self.codes))
        self.projection.zero_()
        for i, p in enumerate(projections):
            self.projection[i, : p.shape[0]] = p.to(self.projection)
        if biases is not None:
            self.bias.copy_(torch.stack([b.reshape(-1) for b in biases]).to(self.bias))
        return self

    def field_codes(self, i: int) -> torch.Tensor:
        start = int(self.code_offsets[i])
        return self.codes[start : start + self.vocab_sizes[i] * self.ranks[i]].view(self.vocab_sizes[i], self.ranks[i])

    def field_table(self, i: int) -> torch.Tensor:
        """The reconstructed (V_i, d) rows of field ``i``."""
        return self.field_codes(i) @ self.projection[i, : self.ranks[i]] + self.bias[i]

    def lookup_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Low-rank codes (B, F, [L,] k_max), zero beyond each field's rank: one gather."""
        shape = _field_shape(ids, self.num_fields)
        start = self.code_offsets.view(shape) + ids * self.rank_t.view(shape)
        mask = self.col_mask.view(shape + (self.max_rank,))
        idx = (start.unsqueeze(-1) + self.col) * mask  # masked columns read position 0, then get zeroed
        return self.codes.index_select(0, idx.reshape(-1)).view(idx.shape) * mask.to(self.codes.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        nf, k, d = self.num_fields, self.max_rank, self.dim
        z = self.lookup_codes(ids).reshape(ids.shape[0], nf, -1, k)  # (B, F, M, k)
        m = z.shape[2]
        # Field-major: one (B*M, k) @ (k, d) GEMM per field. Broadcasting (B, F, M, k) @ (F, k, d) instead runs
        # B*F tiny products: 4x slower in PyTorch and 2.3x in onnxruntime at batch 4096 (measured, 26 fields).
        out = torch.matmul(z.transpose(0, 1).reshape(nf, -1, k), self.projection)  # (F, B*M, d)
        out = out.reshape(nf, -1, m, d).transpose(0, 1) + self.bias.unsqueeze(1)  # (B, F, M, d)
        return out.reshape(tuple(ids.shape) + (d,))

    def spec_args(self) -> dict:
        return {"vocab_sizes": list(self.vocab_sizes), "dim": self.dim, "ranks": list(self.ranks)}

    def extra_repr(self) -> str:
        return f"fields={self.num_fields}, rows={sum(self.vocab_sizes)}, dim={self.dim}, max_rank={self.max_rank}"


class FoldedCodeEmbedding(LowRankFieldEmbedding):
    """A LowRankFieldEmbedding whose projection and bias were folded into the Linear that consumes its output.

    ``forward`` returns the codes zero-padded to ``dim`` (B, F, [L,] d): the following Linear's weights for field
    i are ``[W_i P_i^T, 0]`` and its bias absorbed ``W_i b_i`` (compression/fold.py), so the per-field projection
    matmul disappears from inference. Only valid where nothing else reads the reconstructed embeddings.
    """

    def __init__(self, vocab_sizes: Sequence[int], dim: int, ranks: int | Sequence[int]) -> None:
        super().__init__(vocab_sizes, dim, ranks)
        del self.projection, self.bias

    def field_table(self, i: int) -> torch.Tensor:  # pragma: no cover - there is no table once folded
        raise RuntimeError("a folded embedding has no reconstructed table; its projection lives in the next Linear")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.pad(self.lookup_codes(ids), (0, self.dim - self.max_rank))


# ---------------------------------------------------------------------------------------------------------------
# Int8 field embedding
# ---------------------------------------------------------------------------------------------------------------
class Int8FieldEmbedding(nn.Module):
    """int8 rows + fp16 per-row scale, dequantised by gather x mul (~3.6x smaller at d=16; exports to ONNX)."""

    def __init__(self, vocab_sizes: Sequence[int], dim: int) -> None:
        super().__init__()
        self.vocab_sizes = [int(v) for v in vocab_sizes]
        self.dim = int(dim)
        n = sum(self.vocab_sizes)
        self.register_buffer("offsets", _field_offsets(self.vocab_sizes), persistent=False)
        self.register_buffer("qweight", torch.zeros(n, self.dim, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(n, 1, dtype=torch.float16))

    @property
    def num_fields(self) -> int:
        return len(self.vocab_sizes)

    @classmethod
    def from_embedding(cls, emb: nn.Module) -> "Int8FieldEmbedding":
        m = cls(emb.vocab_sizes, emb.dim)
        q, s = quantize_rows(emb.weight)
        m.qweight.copy_(q)
        m.scale.copy_(s)
        return m.to(emb.weight.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids + self.offsets.view(_field_shape(ids, self.num_fields))
        return F.embedding(flat, self.qweight).float() * F.embedding(flat, self.scale).float()

    def field_table(self, i: int) -> torch.Tensor:
        start = int(self.offsets[i])
        rows = slice(start, start + self.vocab_sizes[i])
        return self.qweight[rows].float() * self.scale[rows].float()

    def spec_args(self) -> dict:
        return {"vocab_sizes": list(self.vocab_sizes), "dim": self.dim}

    def extra_repr(self) -> str:
        return f"fields={self.num_fields}, rows={sum(self.vocab_sizes)}, dim={self.dim}, int8"


# ---------------------------------------------------------------------------------------------------------------
# Tensor-train embedding (TT-Rec style)
# ---------------------------------------------------------------------------------------------------------------
def tt_dim_factors(d: int) -> list[int]:
    """The most balanced three integers whose product is exactly ``d`` (descending), e.g. 16 -> [4, 2, 2]."""
    best = [d, 1, 1]
    for d1 in range(1, d + 1):
        if d % d1:
            continue
        for d2 in range(1, d // d1 + 1):
            if (d // d1) % d2 == 0:
                cand = sorted([d1, d2, d // d1 // d2], reverse=True)
                if cand[0] - cand[-1] < best[0] - best[-1]:
                    best = cand
    return best


def tt_vocab_factors(v: int) -> list[int]:
    """Three small factors whose product is >= ``v`` (rows beyond ``v`` are padding, never looked up)."""
    base = max(1, math.ceil(v ** (1.0 / 3) - 1e-9))
    return [max(1, math.ceil(v / (base * base))), base, base]


class TTEmbedding(nn.Module):
    """One table V x d as a tensor train of three cores (TT-Rec): row i = G1[i1] G2[i2] G3[i3].

    The row index splits into digits i = (i1 * v2 + i2) * v3 + i3 (div/mod), the dim into d = d1 d2 d3.
    Core layouts are chosen for the lookup: core1 (v1, d1, r1), core2 (v2, r1, d2 * r2), core3 (v3, r2, d3);
    a lookup is three gathers and two batched matmuls, all plain torch ops (ONNX-exportable, unlike
    tensorly-torch's numpy indexing).
    """

    def __init__(self, num_embeddings: int, dim: int, ranks: Sequence[int],
                 vocab_factors: Sequence[int], dim_factors: Sequence[int]) -> None:
        super().__init__()
        v1, v2, v3 = (int(x) for x in vocab_factors)
        d1, d2, d3 = (int(x) for x in dim_factors)
        r1, r2 = (int(x) for x in ranks)
        if v1 * v2 * v3 < num_embeddings or d1 * d2 * d3 != dim or min(r1, r2) < 1:
            raise ValueError(f"TTEmbedding: vocab factors {list(vocab_factors)} must cover {num_embeddings} rows, "
                             f"dim factors {list(dim_factors)} must multiply to {dim}, ranks {list(ranks)} >= 1")
        self.num_embeddings, self.dim = int(num_embeddings), int(dim)
        self.vocab_factors, self.dim_factors, self.ranks = [v1, v2, v3], [d1, d2, d3], [r1, r2]
        self.core1 = nn.Parameter(torch.zeros(v1, d1, r1))
        self.core2 = nn.Parameter(torch.zeros(v2, r1, d2 * r2))
        self.core3 = nn.Parameter(torch.zeros(v3, r2, d3))

    @staticmethod
    def num_params(vocab_factors: Sequence[int], dim_factors: Sequence[int], ranks: Sequence[int]) -> int:
        (v1, v2, v3), (d1, d2, d3), (r1, r2) = vocab_factors, dim_factors, ranks
        return v1 * d1 * r1 + v2 * r1 * d2 * r2 + v3 * r2 * d3

    @staticmethod
    def max_ranks(vocab_factors: Sequence[int], dim_factors: Sequence[int]) -> list[int]:
        """TT-ranks at which TT-SVD is exact."""
        n1, n2, n3 = (v * d for v, d in zip(vocab_factors, dim_factors))
        r1 = min(n1, n2 * n3)
        return [r1, min(r1 * n2, n3)]

    @classmethod
    def from_table(cls, table: torch.Tensor, ranks: Sequence[int], vocab_factors: Sequence[int] | None = None,
                   dim_factors: Sequence[int] | None = None) -> "TTEmbedding":
        """Initialise by TT-SVD of the (padded, reshaped) table; ranks are capped at the exact TT-ranks."""
        v, d = table.shape
        vf = list(vocab_factors) if vocab_factors is not None else tt_vocab_factors(v)
        df = list(dim_factors) if dim_factors is not None else tt_dim_factors(d)
        cap = cls.max_ranks(vf, df)
        r = [max(1, min(int(ranks[0]), cap[0])), max(1, min(int(ranks[1]), cap[1]))]
        (v1, v2, v3), (d1, d2, d3) = vf, df
        t = torch.zeros(v1 * v2 * v3, d, dtype=torch.float64)
        t[:v] = table.detach().to("cpu", torch.float64)
        t = t.reshape(v1, v2, v3, d1, d2, d3).permute(0, 3, 1, 4, 2, 5).reshape(v1 * d1, v2 * d2 * v3 * d3)
        # TT-SVD, two sweeps. Exact when ranks reach max_ranks.
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        r[0] = min(r[0], s.numel())
        g1 = u[:, : r[0]]
        rest = (s[: r[0], None] * vh[: r[0]]).reshape(r[0] * v2 * d2, v3 * d3)
        u, s, vh = torch.linalg.svd(rest, full_matrices=False)
        r[1] = min(r[1], s.numel())
        g2 = u[:, : r[1]]
        g3 = s[: r[1], None] * vh[: r[1]]
        m = cls(v, d, r, vf, df).to(table.dtype)
        with torch.no_grad():
            m.core1.copy_(g1.reshape(v1, d1, r[0]))
            m.core2.copy_(g2.reshape(r[0], v2, d2, r[1]).permute(1, 0, 2, 3).reshape(v2, r[0], d2 * r[1]))
            m.core3.copy_(g3.reshape(r[1], v3, d3).permute(1, 0, 2))
        return m.to(device=table.device, dtype=table.dtype)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        (_, v2, v3), (d1, d2, _), (_, r2) = self.vocab_factors, self.dim_factors, self.ranks
        flat = idx.reshape(-1)
        i3 = torch.remainder(flat, v3)
        rest = torch.div(flat, v3, rounding_mode="floor")
        i2 = torch.remainder(rest, v2)
        i1 = torch.div(rest, v2, rounding_mode="floor")
        a = self.core1.index_select(0, i1)  # (N, d1, r1)
        b = self.core2.index_select(0, i2)  # (N, r1, d2 r2)
        ab = torch.bmm(a, b).reshape(-1, d1 * d2, r2)
        out = torch.bmm(ab, self.core3.index_select(0, i3))  # (N, d1 d2, d3)
        return out.reshape(tuple(idx.shape) + (self.dim,))

    def table(self) -> torch.Tensor:
        return self.forward(torch.arange(self.num_embeddings, device=self.core1.device))

    def spec_args(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "dim": self.dim, "ranks": list(self.ranks),
                "vocab_factors": list(self.vocab_factors), "dim_factors": list(self.dim_factors)}

    def extra_repr(self) -> str:
        return (f"rows={self.num_embeddings}, dim={self.dim}, vocab_factors={self.vocab_factors}, "
                f"dim_factors={self.dim_factors}, ranks={self.ranks}")



class TTFieldEmbedding(nn.Module):
    """FieldEmbedding signature over per-field TT tables; fields where TT would not save space stay dense.

    ``tt_fields[i]`` is None for a dense field, else the ``TTEmbedding`` args of field i (ranks, vocab_factors,
    dim_factors). Dense fields share one flat table with offsets (one gather); each TT field is one TT lookup.
    """

    def __init__(self, vocab_sizes: Sequence[int], dim: int, tt_fields: Sequence[dict | None]) -> None:
        super().__init__()
        self.vocab_sizes = [int(v) for v in vocab_sizes]
        self.dim = int(dim)
        if len(tt_fields) != len(self.vocab_sizes):
            raise ValueError(f"TTFieldEmbedding: {len(tt_fields)} field configs for {len(self.vocab_sizes)} fields")
        self.tt_fields = [dict(c) if c is not None else None for c in tt_fields]
        self.register_buffer("offsets", _field_offsets(self.vocab_sizes), persistent=False)
        self.dense_index = [i for i, c in enumerate(self.tt_fields) if c is None]
        self.tt_index = [i for i, c in enumerate(self.tt_fields) if c is not None]
        dense_sizes = [self.vocab_sizes[i] for i in self.dense_index]
        self.register_buffer("dense_fields", torch.tensor(self.dense_index, dtype=torch.long), persistent=False)
        self.register_buffer("dense_offsets", _field_offsets(dense_sizes), persistent=False)
        self.dense_weight = nn.Parameter(torch.zeros(sum(dense_sizes), self.dim))
        self.tables = nn.ModuleList(
            TTEmbedding(self.vocab_sizes[i], self.dim, c["ranks"], c["vocab_factors"], c["dim_factors"])
            for i, c in enumerate(self.tt_fields) if c is not None
        )

    @property
    def num_fields(self) -> int:
        return len(self.vocab_sizes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        shape = _field_shape(ids, self.num_fields)
        parts: list[torch.Tensor | None] = [None] * self.num_fields
        if self.dense_index:
            dense_ids = ids.index_select(1, self.dense_fields)
            dense_shape = (1, len(self.dense_index)) + shape[2:]
            dense = F.embedding(dense_ids + self.dense_offsets.view(dense_shape), self.dense_weight)
            for j, i in enumerate(self.dense_index):
                parts[i] = dense[:, j]
        for table, i in zip(self.tables, self.tt_index):
            parts[i] = table(ids[:, i])
        return torch.stack(parts, dim=1)  # type: ignore[arg-type]

    def field_table(self, i: int) -> torch.Tensor:
        if self.tt_fields[i] is None:
            j = self.dense_index.index(i)
            start = int(self.dense_offsets[j])
            return self.dense_weight[start : start + self.vocab_sizes[i]]
        return self.tables[self.tt_index.index(i)].table()

    def spec_args(self) -> dict:
        return {"vocab_sizes": list(self.vocab_sizes), "dim": self.dim,
                "tt_fields": [None if c is None else {k: list(v) for k, v in c.items()} for c in self.tt_fields]}

    def extra_repr(self) -> str:
        return f"fields={self.num_fields}, tt_fields={len(self.tt_index)}, dense_fields={len(self.dense_index)}"


#: Compressed module classes by name (what a spec's "class" refers to).
MODULE_TYPES: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (LowRankLinear, Int8Linear, LowRankFieldEmbedding, FoldedCodeEmbedding, Int8FieldEmbedding,
                TTFieldEmbedding)
}
EMBEDDING_TYPES = (LowRankFieldEmbedding, Int8FieldEmbedding, TTFieldEmbedding)  # FoldedCode is a LowRank
LINEAR_TYPES = (LowRankLinear, Int8Linear)
