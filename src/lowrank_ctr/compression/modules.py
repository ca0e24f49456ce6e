"""Drop-in low-rank modules shared by the svd and afm methods; each keeps the call signature of the layer it replaces.

Every module of the compression package (here and in ``methods/``) can be rebuilt from ``spec_args()`` alone
(JSON-serialisable constructor arguments), so a compressed checkpoint is "spec + state_dict": build the base
model, ``apply_spec`` (spec.py), then ``load_state_dict``. Lookups are plain torch ops (gather, mul, matmul) so
the modules trace and export to ONNX; nothing indexes with numpy. A module class declares ``replaces``
("embedding" or "linear"): the kind of base layer whose place it takes, checked when a spec is applied.

Replacements of ``FieldEmbedding`` keep its attributes ``vocab_sizes``, ``dim``, ``num_fields`` and
``forward(ids)`` with ids (B, F) or (B, F, L) -> (B, F, d) or (B, F, L, d). They have no ``weight``; use
``field_table(i)`` for the (reconstructed) rows of field ``i``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

CODE_DTYPES: tuple[str, ...] = ("float32", "int8")


def field_offsets(sizes: Sequence[int]) -> torch.Tensor:
    """Start of each field in a flat table of consecutive fields."""
    return torch.tensor([0] + list(sizes)[:-1], dtype=torch.long).cumsum(0)


def field_shape(ids: torch.Tensor, num_fields: int) -> tuple[int, ...]:
    """Shape that broadcasts a per-field vector against ids of shape (B, F, ...)."""
    return (1, num_fields) + (1,) * (ids.dim() - 2)


def quantize_columns(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per column: (int8 values, float32 scale per column); ``values ~= q * scale``.

    |values - q * scale| <= scale / 2 elementwise (round to nearest), scale = max |column| / 127. An all-zero
    column gets scale 1 (it quantises to zeros either way).
    """
    v = values.detach().to(torch.float64)
    scale = v.abs().amax(dim=0) / 127.0 if v.shape[0] else torch.zeros(v.shape[1], dtype=torch.float64)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(v / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Linear layers
# ---------------------------------------------------------------------------------------------------------------
class LowRankLinear(nn.Module):
    """y = up(down(x)): Linear(in -> k, no bias) then Linear(k -> out, bias). No activation in between.

    Saves parameters only when ``k * (in + out) < in * out``, i.e. ``k < in * out / (in + out)``.
    """

    replaces = "linear"

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


# ---------------------------------------------------------------------------------------------------------------
# Low-rank field embedding (SVD and AFM)
# ---------------------------------------------------------------------------------------------------------------
class LowRankFieldEmbedding(nn.Module):
    """Per-field low-rank embedding: row e of field i is ``codes_i[e] @ projection[i, :k_i] + bias[i]``.

    Storage (why this layout): each field keeps its own rank 0 <= k_i <= min(V_i, d). All fields' codes live in ONE
    flat 1-D tensor (field i occupies V_i * k_i values, row-major), so per-field ranks waste no memory; the
    projection is one (F, w, d) tensor (w = max(1, max k_i); rows beyond k_i are zero and never read) plus an
    (F, d) bias. A field of rank 0 is its mean vector (the bias) for every id. Compression writes the segments in
    rank order (``rank_grouped``), so the fields of one rank share one (rows, k) view of the codes.

    Three lookups, one result: up to ``batched_lookup_max_rows`` rows, one padded gather + one batched GEMM over all
    fields (fewest ops: small batches are dispatch-bound); larger batches and exported graphs, one row gather + one
    batched GEMM per distinct rank (``rank_grouped``); tables in field order (older checkpoints), one row gather +
    one GEMM per field.

    ``code_dtype="int8"``: codes are stored as int8 (a buffer: they do not train) with one float32 scale per
    (field, component), ``code_scale`` (F, w); a looked-up code is ``q * scale``. Symmetric rounding to nearest:
    each code is within scale/2 of the float code it came from. The projection and bias stay float and train.
    """

    replaces = "embedding"

    def __init__(self, vocab_sizes: Sequence[int], dim: int, ranks: int | Sequence[int],
                 code_dtype: str = "float32", rank_grouped: bool = False) -> None:
        super().__init__()
        self.vocab_sizes = [int(v) for v in vocab_sizes]
        self.dim = int(dim)
        nf = len(self.vocab_sizes)
        ranks = [int(ranks)] * nf if isinstance(ranks, int) else [int(r) for r in ranks]
        if len(ranks) != nf:
            raise ValueError(f"LowRankFieldEmbedding: {len(ranks)} ranks for {nf} fields")
        for i, (v, r) in enumerate(zip(self.vocab_sizes, ranks)):
            if not 0 <= r <= min(v, self.dim):
                raise ValueError(f"LowRankFieldEmbedding field {i}: rank {r} outside 0..{min(v, self.dim)}")
        if code_dtype not in CODE_DTYPES:
            raise ValueError(f"code_dtype must be one of {list(CODE_DTYPES)}, got {code_dtype!r}")
        self.ranks = ranks
        self.code_dtype = code_dtype
        self.max_rank = max(ranks)
        self.width = max(1, self.max_rank)
        self.register_buffer("offsets", field_offsets(self.vocab_sizes), persistent=False)
        sizes = [v * r for v, r in zip(self.vocab_sizes, ranks)]
        # rank_grouped: the fields' code segments are ordered by rank, so the fields of one rank k form ONE (rows, k)
        # table and a lookup is one row gather + one batched GEMM per distinct rank (see _forward_rank_grouped);
        # False: field order (checkpoints written before the grouped layout existed). Python ints: static in traces.
        self.rank_grouped = bool(rank_grouped)
        order = sorted(range(nf), key=lambda i: (ranks[i], i)) if self.rank_grouped else list(range(nf))
        self.code_starts = [0] * nf
        position = 0
        for i in order:
            self.code_starts[i] = position
            position += sizes[i]
        self._rank_groups: list[tuple[int, int, int]] = []  # (rank k, segment start, rows) per group, rank order
        group_fields: list[list[int]] = []
        if self.rank_grouped:
            for k in sorted({r for r in ranks if r > 0}):
                fields = [i for i in order if ranks[i] == k]
                self._rank_groups.append((k, self.code_starts[fields[0]], sum(self.vocab_sizes[i] for i in fields)))
                group_fields.append(fields)
        if code_dtype == "int8":
            self.register_buffer("codes", torch.zeros(sum(sizes), dtype=torch.int8))
            self.register_buffer("code_scale", torch.ones(nf, self.width))
        else:
            self.codes = nn.Parameter(torch.zeros(sum(sizes)))
        self.projection = nn.Parameter(torch.zeros(nf, self.width, self.dim))
        self.bias = nn.Parameter(torch.zeros(nf, self.dim))
        # the batched small-batch lookup (see forward): where component j of field i starts in the flat codes, and
        # the component each of the w padded slots reads (slots >= k_i re-read a valid code; their projection row is 0)
        self.register_buffer("_field_start", torch.tensor(self.code_starts, dtype=torch.long), persistent=False)
        self.register_buffer("_field_rank", torch.tensor(ranks, dtype=torch.long), persistent=False)
        slot = torch.arange(self.width).expand(nf, -1)
        self.register_buffer("_slot", torch.minimum(slot, (torch.tensor(ranks) - 1).clamp(min=0)[:, None]).clone(),
                             persistent=False)
        # the rank-grouped lookup: per group its fields and the first row of each field in the group's table; the
        # rank-0 fields (their bias); and the permutation from group order back to field order
        for g, fields in enumerate(group_fields):
            k, start, _ = self._rank_groups[g]
            first_rows = [(self.code_starts[i] - start) // k for i in fields]
            self.register_buffer(f"_group{g}_fields", torch.tensor(fields, dtype=torch.long), persistent=False)
            self.register_buffer(f"_group{g}_first_row", torch.tensor(first_rows, dtype=torch.long)[:, None],
                                 persistent=False)
        zero = [i for i in range(nf) if ranks[i] == 0]
        self.register_buffer("_zero_fields", torch.tensor(zero, dtype=torch.long), persistent=False)
        grouped = [i for fields in group_fields for i in fields] + zero
        self.register_buffer("_field_order", torch.argsort(torch.tensor(grouped, dtype=torch.long)) if grouped
                             else torch.zeros(0, dtype=torch.long), persistent=False)

    @property
    def num_fields(self) -> int:
        return len(self.vocab_sizes)

    @staticmethod
    def num_bytes(vocab_sizes: Sequence[int], dim: int, ranks: Sequence[int], code_dtype: str = "float32",
                  element_size: int = 4) -> int:
        """Bytes of the stored tensors (codes at their dtype; projection, bias and scales at ``element_size``)."""
        width = max(1, max(ranks))
        codes = sum(v * r for v, r in zip(vocab_sizes, ranks))
        nf = len(vocab_sizes)
        if code_dtype == "int8":
            return codes + nf * width * 4 + nf * (width + 1) * dim * element_size
        return (codes + nf * (width + 1) * dim) * element_size

    @staticmethod
    def num_params(vocab_sizes: Sequence[int], dim: int, ranks: Sequence[int]) -> int:
        return sum(v * r for v, r in zip(vocab_sizes, ranks)) + len(vocab_sizes) * (max(1, max(ranks)) + 1) * dim

    @torch.no_grad()
    def set_factors(self, codes: Sequence[torch.Tensor], projections: Sequence[torch.Tensor],
                    biases: Sequence[torch.Tensor] | None = None) -> "LowRankFieldEmbedding":
        """Fill from per-field codes (V_i, k_i), projections (k_i, d) and biases (d,); int8 codes are quantised."""
        if self.code_dtype == "int8":
            self.code_scale.fill_(1.0)
            parts = []
            for i, c in enumerate(codes):
                q, s = quantize_columns(c.reshape(self.vocab_sizes[i], self.ranks[i]))
                parts.append(q.reshape(-1))
                self.code_scale[i, : self.ranks[i]] = s.to(self.code_scale)
        else:
            parts = [c.reshape(-1).to(self.codes) for c in codes]
        for i, part in enumerate(parts):  # each field's segment at its start (field or rank-grouped order)
            self.codes[self.code_starts[i] : self.code_starts[i] + part.numel()] = part
        self.projection.zero_()
        for i, p in enumerate(projections):
            self.projection[i, : p.shape[0]] = p.to(self.projection)
        if biases is not None:
            self.bias.copy_(torch.stack([b.reshape(-1) for b in biases]).to(self.bias))
        return self

    @torch.no_grad()
    def rank_grouped_copy(self) -> "LowRankFieldEmbedding":
        """The same embedding in the rank-grouped layout (e.g. for a model compressed before that layout existed):
        identical stored values, segments reordered by rank."""
        new = LowRankFieldEmbedding(self.vocab_sizes, self.dim, self.ranks, self.code_dtype, rank_grouped=True)
        new = new.to(self.projection.device)
        for i, (v, k) in enumerate(zip(self.vocab_sizes, self.ranks)):
            new.codes[new.code_starts[i] : new.code_starts[i] + v * k] = \
                self.codes[self.code_starts[i] : self.code_starts[i] + v * k]
        new.projection.copy_(self.projection)
        new.bias.copy_(self.bias)
        if self.code_dtype == "int8":
            new.code_scale.copy_(self.code_scale)
        return new.train(self.training)

    def field_codes(self, i: int) -> torch.Tensor:
        """The (V_i, k_i) codes of field ``i`` as float (int8 codes dequantised)."""
        start = self.code_starts[i]
        c = self.codes[start : start + self.vocab_sizes[i] * self.ranks[i]].view(self.vocab_sizes[i], self.ranks[i])
        if self.code_dtype == "int8":
            return c.to(self.projection.dtype) * self.code_scale[i, : self.ranks[i]]
        return c

    def field_table(self, i: int) -> torch.Tensor:
        """The reconstructed (V_i, d) rows of field ``i``."""
        return self.field_codes(i) @ self.projection[i, : self.ranks[i]] + self.bias[i]

    def effective_projection(self) -> torch.Tensor:
        """(F, w, d): what multiplies the stored codes — the projection, with the int8 scales folded into its rows
        (a multiply on this small tensor instead of on every looked-up code)."""
        if self.code_dtype == "int8":
            return self.projection * self.code_scale.unsqueeze(-1).to(self.projection.dtype)
        return self.projection

    #: batches up to this many rows use one padded gather + one batched GEMM over all fields (a handful of ops
    #: whatever the number of fields; its (B, F, w) index arithmetic grows with B); larger ones the rank-grouped
    #: lookup, or for tables in field order the per-field loop. From benchmarks/bench_lookup.py (1 thread, DeepFM on
    #: the synthetic default, benchmarks/results/lookup.json): rank-grouped tables, the batched path is fastest up to
    #: 32 rows and the grouped one from 64; field order, batched beats the loop up to 512 rows.
    batched_lookup_max_rows: int = 32
    batched_lookup_max_rows_field_order: int = 512

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tracing = torch.jit.is_tracing() or torch.jit.is_scripting()
        most = self.batched_lookup_max_rows if self.rank_grouped else self.batched_lookup_max_rows_field_order
        if ids.dim() == 2 and ids.shape[0] <= most and self.codes.numel() > 0 and not tracing:
            return self._forward_batched(ids)
        if self.rank_grouped and ids.dim() == 2:
            return self._forward_rank_grouped(ids)
        return self._forward_per_field(ids)

    def _forward_rank_grouped(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, F) ids -> (B, F, d): per distinct rank k, one row gather of (F_k, B) ids in the group's (rows, k)
        table and one (F_k, B, k) @ (F_k, k, d) GEMM; then the groups back in field order. Row gathers (one index per
        row and field, blocks of k codes) are what onnxruntime's Gather is fast at; the op count grows with the
        number of distinct ranks, not of fields. Exported models (ONNX, TorchScript) use this path."""
        proj = self.effective_projection()
        ids_by_field = ids.t()  # (F, B)
        parts = []
        for g, (k, start, rows) in enumerate(self._rank_groups):
            fields = getattr(self, f"_group{g}_fields")
            table = self.codes[start : start + rows * k].view(rows, k)
            rows_ids = ids_by_field.index_select(0, fields) + getattr(self, f"_group{g}_first_row")  # (F_k, B)
            z = nn.functional.embedding(rows_ids, table).to(proj.dtype)  # (F_k, B, k)
            parts.append(torch.baddbmm(self.bias.index_select(0, fields).unsqueeze(1), z,
                                       proj.index_select(0, fields)[:, :k]))
        if self._zero_fields.numel():
            parts.append(self.bias.index_select(0, self._zero_fields).unsqueeze(1)
                         .expand(-1, ids.shape[0], -1).to(proj.dtype))
        out = torch.cat(parts, 0) if len(parts) > 1 else parts[0]  # (F, B, d), fields in group order
        return out.index_select(0, self._field_order).transpose(0, 1)

    def _forward_batched(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, F) ids -> (B, F, d) in one gather of (B, F, w) codes and one (F, B, w) @ (F, w, d) GEMM. The padded
        slots of a field of rank k_i < w re-read one of its codes and meet a zero projection row; a rank-0 field
        meets an all-zero projection, leaving its bias. Index arithmetic on (B, F, w) is cheap at small B only."""
        proj = self.effective_projection()
        row = self._field_start + ids * self._field_rank  # (B, F): where each looked-up row starts
        index = (row.unsqueeze(-1) + self._slot).clamp_(max=self.codes.numel() - 1)
        z = self.codes[index].to(proj.dtype)  # (B, F, w)
        out = torch.baddbmm(self.bias.unsqueeze(1), z.transpose(0, 1), proj)  # (F, B, d)
        return out.transpose(0, 1)

    def _forward_per_field(self, ids: torch.Tensor) -> torch.Tensor:
        # Per field: one row lookup in the field's (V_i, k_i) view of the flat codes and one (N, k_i) @ (k_i, d)
        # GEMM with the mean added in the same kernel. No index arithmetic on (B, F, w) tensors and no masks: a
        # masked gather over padded widths spent a third of the forward on int64 adds / muls (profiled); the loop
        # unrolls into a static graph for tracing and ONNX.
        proj = self.effective_projection()
        outs = []
        for i in range(self.num_fields):
            field_ids = ids[:, i]
            k = self.ranks[i]
            if k == 0:
                outs.append(self.bias[i].expand(tuple(field_ids.shape) + (self.dim,)))
                continue
            start = self.code_starts[i]
            table = self.codes[start : start + self.vocab_sizes[i] * k].view(self.vocab_sizes[i], k)
            z = nn.functional.embedding(field_ids.reshape(-1), table).to(proj.dtype)
            outs.append(torch.addmm(self.bias[i], z, proj[i, :k]).view(tuple(field_ids.shape) + (self.dim,)))
        return torch.stack(outs, dim=1)

    def spec_args(self) -> dict:
        return {"vocab_sizes": list(self.vocab_sizes), "dim": self.dim, "ranks": list(self.ranks),
                "code_dtype": self.code_dtype, "rank_grouped": self.rank_grouped}

    def extra_repr(self) -> str:
        return (f"fields={self.num_fields}, rows={sum(self.vocab_sizes)}, dim={self.dim}, max_rank={self.max_rank}, "
                f"codes={self.code_dtype}")


#: the modules defined here, by class name (methods register their own; see methods/__init__.py)
MODULE_TYPES: dict[str, type[nn.Module]] = {c.__name__: c for c in (LowRankLinear, LowRankFieldEmbedding)}
