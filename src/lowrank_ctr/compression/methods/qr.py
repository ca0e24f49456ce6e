"""qr: quotient-remainder compositional embeddings (Shi et al., KDD 2020), an embedding family practitioners use at
5-20x.

Field i with c_i collisions keeps a quotient table Q_i (ceil(V_i / c_i) x d) and a remainder table R_i (c_i x d);
id v looks up ``Q_i[v // c_i] * R_i[v % c_i]`` (element-wise product: every id still gets a unique vector).
Size ~ (V_i / c_i + c_i) d instead of V_i d. ``compression.collisions`` = c (an int >= 2); fields where it would
not be smaller stay dense (c_i = 1: Q_i is the table itself and R_i one row of ones).

Two initialisations: from the trained table (default) — per field and embedding dimension j, the (V_i/c_i) x c_i
matrix M[q, r] = E_i[q c_i + r, j] is replaced by its best rank-1 approximation sigma u v^T (Q[:, j] = sqrt(sigma) u,
R[:, j] = sqrt(sigma) v; Eckart-Young per dimension) — or random, trained from scratch for the base's epochs
(``compression.from_scratch=true``, the protocol of the paper).
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


class QRFieldEmbedding(nn.Module):
    """FieldEmbedding signature over per-field quotient / remainder tables, each kind in one flat table."""

    replaces = "embedding"

    def __init__(self, vocab_sizes: Sequence[int], dim: int, collisions: Sequence[int]) -> None:
        super().__init__()
        self.vocab_sizes = [int(v) for v in vocab_sizes]
        self.dim = int(dim)
        self.collisions = [int(c) for c in collisions]
        if len(self.collisions) != len(self.vocab_sizes) or min(self.collisions, default=1) < 1:
            raise ValueError(f"QRFieldEmbedding: need one collision count >= 1 per field, got {list(collisions)}")
        self.quotient_rows = [math.ceil(v / c) for v, c in zip(self.vocab_sizes, self.collisions)]
        self.register_buffer("q_offsets", field_offsets(self.quotient_rows), persistent=False)
        self.register_buffer("r_offsets", field_offsets(self.collisions), persistent=False)
        self.register_buffer("c_t", torch.tensor(self.collisions, dtype=torch.long), persistent=False)
        self.quotient = nn.Parameter(torch.zeros(sum(self.quotient_rows), self.dim))
        self.remainder = nn.Parameter(torch.ones(sum(self.collisions), self.dim))

    @property
    def num_fields(self) -> int:
        return len(self.vocab_sizes)

    @staticmethod
    def num_params(vocab_sizes: Sequence[int], dim: int, collisions: Sequence[int]) -> int:
        return sum(math.ceil(v / c) + c for v, c in zip(vocab_sizes, collisions)) * dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        shape = field_shape(ids, self.num_fields)
        c = self.c_t.view(shape)
        q = torch.div(ids, c, rounding_mode="floor") + self.q_offsets.view(shape)
        r = torch.remainder(ids, c) + self.r_offsets.view(shape)
        return F.embedding(q, self.quotient) * F.embedding(r, self.remainder)

    def field_table(self, i: int) -> torch.Tensor:
        ids = torch.arange(self.vocab_sizes[i], device=self.quotient.device)
        c = self.collisions[i]
        q = self.quotient[int(self.q_offsets[i]) + torch.div(ids, c, rounding_mode="floor")]
        return q * self.remainder[int(self.r_offsets[i]) + torch.remainder(ids, c)]

    def spec_args(self) -> dict:
        return {"vocab_sizes": list(self.vocab_sizes), "dim": self.dim, "collisions": list(self.collisions)}

    def extra_repr(self) -> str:
        return f"fields={self.num_fields}, rows={sum(self.vocab_sizes)}, dim={self.dim}, collisions={max(self.collisions)}"


def field_collisions(vocab_sizes: Sequence[int], collisions: int) -> list[int]:
    """c per field: the requested count where the quotient + remainder tables are smaller than the field, else 1."""
    return [collisions if math.ceil(v / collisions) + collisions < v else 1 for v in vocab_sizes]


def rank1_factors(table: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best (Frobenius) factors Q (ceil(V/c) x d), R (c x d) with table[q c + r] ~ Q[q] * R[r], per dimension."""
    v, d = table.shape
    nq = math.ceil(v / c)
    padded = torch.zeros(nq * c, d, dtype=torch.float64)
    padded[:v] = f64(table)
    m = padded.reshape(nq, c, d).permute(2, 0, 1)  # (d, nq, c)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    root = s[:, :1].sqrt()  # (d, 1)
    q, r = (u[:, :, 0] * root).T, (vh[:, 0, :] * root).T  # (nq, d), (c, d)
    sign = torch.where(r.sum(0) < 0, -1.0, 1.0).to(r)  # remainder factors mostly positive (a per-dim sign flip)
    return q * sign, r * sign


@register_method
class QuotientRemainder(CompressionMethod):
    name: ClassVar[str] = "qr"
    label: ClassVar[str] = "QR"
    color: ClassVar[str] = "#9467bd"
    default_targets: ClassVar[tuple[str, ...]] = ("embedding",)
    groups: ClassVar[tuple[str, ...]] = ("embedding",)
    from_scratch: ClassVar[bool] = True
    module_types: ClassVar[tuple[type[nn.Module], ...]] = (QRFieldEmbedding,)
    options: ClassVar[dict] = {
        "collisions": lambda v: None if isinstance(v, int) and not isinstance(v, bool) and v >= 2
        else "an integer >= 2 (ids sharing one quotient row)",
    }
    rank_meaning: ClassVar[str] = "unused (qr reads compression.collisions)"

    def _collisions(self, emb: FieldEmbedding, ctx: LayerContext) -> list[int]:
        c = ctx.options.get("collisions")
        if self.options["collisions"](c) is not None:
            raise ValueError(f"qr needs compression.collisions, an integer >= 2 (got {c!r})")
        return field_collisions(emb.vocab_sizes, int(c))

    def embedding(self, emb: FieldEmbedding, rank: Any, ctx: LayerContext) -> tuple[QRFieldEmbedding, Info]:
        cols = self._collisions(emb, ctx)
        new = place(QRFieldEmbedding(emb.vocab_sizes, emb.dim, cols), emb.weight)
        qs, rs, err, norm = [], [], 0.0, 0.0
        for i, c in enumerate(cols):
            e = emb.field_table(i)
            q, r = rank1_factors(e, c) if c > 1 else (f64(e), torch.ones(1, emb.dim, dtype=torch.float64))
            qs.append(q)
            rs.append(r)
        with torch.no_grad():
            new.quotient.copy_(torch.cat(qs))
            new.remainder.copy_(torch.cat(rs))
            for i in range(emb.num_fields):
                e = f64(emb.field_table(i))
                err += float(((f64(new.field_table(i)) - e) ** 2).sum())
                norm += float((e**2).sum())
        return new, layer_info(self.name, emb, new, None, None, 1.0 - err / max(norm, 1e-300),
                               field_collisions=cols)

    def scratch_embedding(self, emb: FieldEmbedding, rank: Any, ctx: LayerContext) -> QRFieldEmbedding:
        """Quotient rows like the base initialisation (std 0.01), remainder rows around one (std 0.1): at the start
        ids of one quotient row differ by a few percent, and the remainder table learns their differences."""
        new = QRFieldEmbedding(emb.vocab_sizes, emb.dim, self._collisions(emb, ctx))
        with torch.no_grad():
            nn.init.normal_(new.quotient, std=0.01)
            nn.init.normal_(new.remainder, mean=1.0, std=0.1)
        return place(new, emb.weight)

    def setting(self, policy: Mapping[str, Any], ranks: str) -> str:
        s = f"collisions={policy.get('collisions')}"
        return s + (" from scratch" if policy.get("from_scratch") else "")
