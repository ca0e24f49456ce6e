"""tt: tensor-train embeddings (TT-Rec style), the tensor-decomposition competitor.

A table V x d with V <= v1 v2 v3 (padded vocabulary) and d = d1 d2 d3 becomes three cores; row i = G1[i1] G2[i2]
G3[i3] with i split into digits by div/mod. Two ways to get the cores: TT-SVD of the trained table (default), or
random initialisation trained from scratch for the base's epochs (``compression.from_scratch=true``, the TT-Rec
protocol). ``compression.embedding_rank`` is the TT-rank. Fields where TT would not save space stay dense.
Known traps (checked here): FBTT-Embedding (TT-Rec's own code) is CUDA-only; tensorly-torch's FactorizedEmbedding
indexes with numpy, so tracing freezes indices into the graph. This lookup is plain torch ops and exports to ONNX.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from lowrank_ctr.compression.methods import register_method
from lowrank_ctr.compression.methods.base import CompressionMethod, Info, LayerContext, f64, layer_info, place
from lowrank_ctr.compression.modules import field_offsets, field_shape
from lowrank_ctr.models.layers import FieldEmbedding


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

    replaces = "embedding"

    def __init__(self, vocab_sizes: Sequence[int], dim: int, tt_fields: Sequence[dict | None]) -> None:
        super().__init__()
        self.vocab_sizes = [int(v) for v in vocab_sizes]
        self.dim = int(dim)
        if len(tt_fields) != len(self.vocab_sizes):
            raise ValueError(f"TTFieldEmbedding: {len(tt_fields)} field configs for {len(self.vocab_sizes)} fields")
        self.tt_fields = [dict(c) if c is not None else None for c in tt_fields]
        self.register_buffer("offsets", field_offsets(self.vocab_sizes), persistent=False)
        self.dense_index = [i for i, c in enumerate(self.tt_fields) if c is None]
        self.tt_index = [i for i, c in enumerate(self.tt_fields) if c is not None]
        dense_sizes = [self.vocab_sizes[i] for i in self.dense_index]
        self.register_buffer("dense_fields", torch.tensor(self.dense_index, dtype=torch.long), persistent=False)
        self.register_buffer("dense_offsets", field_offsets(dense_sizes), persistent=False)
        self.dense_weight = nn.Parameter(torch.zeros(sum(dense_sizes), self.dim))
        self.tables = nn.ModuleList(
            TTEmbedding(self.vocab_sizes[i], self.dim, c["ranks"], c["vocab_factors"], c["dim_factors"])
            for i, c in enumerate(self.tt_fields) if c is not None
        )

    @property
    def num_fields(self) -> int:
        return len(self.vocab_sizes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        shape = field_shape(ids, self.num_fields)
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


def _tt_rank_pair(rank: Any) -> list[int]:
    r = [int(rank), int(rank)] if isinstance(rank, int) else [int(x) for x in rank]
    if len(r) != 2 or min(r) < 1:
        raise ValueError(f"tt rank must be an int >= 1 or a pair of them, got {rank!r}")
    return r


def _field_configs(emb: FieldEmbedding, rank: Any) -> list[dict | None]:
    """Per field: TTEmbedding args, or None where TT would not be smaller than the dense rows."""
    r = _tt_rank_pair(rank)
    configs: list[dict | None] = []
    for v in emb.vocab_sizes:
        vf, df = tt_vocab_factors(v), tt_dim_factors(emb.dim)
        cap = TTEmbedding.max_ranks(vf, df)
        rr = [min(r[0], cap[0]), min(r[1], cap[1])]
        small = TTEmbedding.num_params(vf, df, rr) < v * emb.dim
        configs.append({"ranks": rr, "vocab_factors": vf, "dim_factors": df} if small else None)
    return configs


@register_method
class TensorTrain(CompressionMethod):
    name: ClassVar[str] = "tt"
    label: ClassVar[str] = "TT"
    color: ClassVar[str] = "#2ca02c"
    default_targets: ClassVar[tuple[str, ...]] = ("embedding",)
    groups: ClassVar[tuple[str, ...]] = ("embedding",)
    from_scratch: ClassVar[bool] = True
    module_types: ClassVar[tuple[type[nn.Module], ...]] = (TTFieldEmbedding,)
    rank_meaning: ClassVar[str] = "the TT-rank, an integer >= 1"

    def fixed_rank(self, group: str, rank: Any) -> Any:
        if isinstance(rank, float) and rank.is_integer() and rank >= 1:
            rank = int(rank)
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"tt needs embedding_rank = the TT-rank, an int >= 1 (got {rank!r})")
        return rank

    def embedding(self, emb: FieldEmbedding, rank: Any, ctx: LayerContext) -> tuple[TTFieldEmbedding, Info]:
        """Per-field TT-SVD with TT-ranks (r, r) (or the given pair), capped at the exact ranks."""
        configs = _field_configs(emb, rank)
        new = TTFieldEmbedding(emb.vocab_sizes, emb.dim, configs).to(emb.weight.dtype)
        errs, norms = [], []
        with torch.no_grad():
            j = 0
            for i, c in enumerate(configs):
                e = f64(emb.field_table(i))
                if c is None:
                    start = int(new.dense_offsets[new.dense_index.index(i)])
                    new.dense_weight[start : start + e.shape[0]] = e
                    errs.append(0.0)
                else:
                    t = TTEmbedding.from_table(emb.field_table(i), c["ranks"], c["vocab_factors"], c["dim_factors"])
                    new.tables[j].load_state_dict(t.state_dict())
                    j += 1
                    errs.append(float(((f64(t.table()) - e) ** 2).sum()))
                norms.append(float((e**2).sum()))
        new = place(new, emb.weight)
        r = _tt_rank_pair(rank)
        return new, layer_info(self.name, emb, new, r[0] if r[0] == r[1] else r, None,
                               1.0 - sum(errs) / max(sum(norms), 1e-300), tt_fields=[c is not None for c in configs])

    def scratch_embedding(self, emb: FieldEmbedding, rank: Any, ctx: LayerContext) -> TTFieldEmbedding:
        """Random cores whose product has the base initialisation's scale (std 0.01 per entry, as FieldEmbedding):
        an entry of a TT row sums r1*r2 products of three core entries, so each core gets std (0.01^2/(r1 r2))^(1/6)."""
        configs = _field_configs(emb, rank)
        new = TTFieldEmbedding(emb.vocab_sizes, emb.dim, configs)
        with torch.no_grad():
            nn.init.normal_(new.dense_weight, std=0.01)
            for t in new.tables:
                r1, r2 = t.ranks
                std = (0.01**2 / (r1 * r2)) ** (1.0 / 6.0)
                for core in (t.core1, t.core2, t.core3):
                    nn.init.normal_(core, std=std)
        return place(new, emb.weight)

    def problems(self, comp: Mapping[str, Any]) -> list[str]:
        r = comp.get("embedding_rank")
        ok = (isinstance(r, int) and not isinstance(r, bool) and r >= 1) or \
            (isinstance(r, float) and r.is_integer() and r >= 1)
        return [] if ok else [f"compression.embedding_rank={r!r}: compression=tt needs the TT-rank, an integer >= 1"]

    def setting(self, policy: Mapping[str, Any], ranks: str) -> str:
        s = f"embedding={policy.get('embedding_rank')}"
        return s + (" from scratch" if policy.get("from_scratch") else "")
