"""Shared layers every CTR model is composed from (plain torch; no Lightning, no compression)."""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

from lowrank_ctr.data.schema import PAD_ID, Schema


class _SortMemo:
    """The last CPU sort of ``sum_rows``: its ids (and their version) -> (rows, counts, order).

    DeepFM-style models look the same flat ids up in two tables (the embedding and the first-order LinearTerm share
    offsets), and each table's backward sorts them: the second sort (1-2 ms at 160k ids on 2 cores, ~2% of a step) is
    a repeat. One slot, checked by content (``torch.equal``, ~0.05 ms) and by the version counter of the tensor it
    holds, so an in-place change of those ids invalidates it.
    """

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None
        self.version = -1
        self.result: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def get(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        held = self.ids
        if (held is None or held.shape != ids.shape or held.device != ids.device or held.dtype != ids.dtype
                or held._version != self.version or not torch.equal(held, ids)):
            return None
        return self.result

    def put(self, ids: torch.Tensor, result: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        self.ids, self.version, self.result = ids, ids._version, result

    def clear(self) -> None:
        self.ids, self.version, self.result = None, -1, None


_SORT_MEMO = _SortMemo()


def _sorted_rows(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted unique ids, their counts, the permutation sorting ``ids``), reusing the last identical sort."""
    found = _SORT_MEMO.get(ids)
    if found is not None:
        return found
    # int32 keys sort twice as fast as int64 on CPU (radix passes); every table row index fits below 2**31
    low, high = torch.aminmax(ids) if ids.numel() else (None, None)
    keys = ids.int() if low is not None and int(low) >= 0 and int(high) < 2**31 else ids
    sorted_ids, order = torch.sort(keys)
    rows, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    result = (rows.to(ids.dtype), counts, order)
    _SORT_MEMO.put(ids, result)
    return result


def sum_rows(ids: torch.Tensor, grad_rows: torch.Tensor, method: str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted unique ids, the sum of ``grad_rows`` over each id's occurrences).

    ``method``: ``csr`` sorts and multiplies by a 0/1 CSR matrix -- several times cheaper on CPU than
    ``index_add_`` into the unique rows or ``Tensor.coalesce()``; ``index_add`` scatters with atomic adds, what a
    GPU does best. None: ``csr`` on CPU, ``index_add`` elsewhere.
    """
    method = method or ("csr" if ids.device.type == "cpu" else "index_add")
    if method == "index_add":
        rows, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        summed = grad_rows.new_zeros(rows.numel(), grad_rows.shape[1]).index_add_(0, inverse, grad_rows)
        return rows, summed
    if method != "csr":
        raise ValueError(f"sum_rows method must be 'csr' or 'index_add', got {method!r}")
    rows, counts, order = _sorted_rows(ids)
    crow = torch.zeros(rows.numel() + 1, dtype=torch.long, device=ids.device)
    torch.cumsum(counts, 0, out=crow[1:])
    ones = torch.ones(ids.numel(), dtype=grad_rows.dtype, device=ids.device)
    with warnings.catch_warnings():  # torch flags CSR tensors as beta
        warnings.simplefilter("ignore", UserWarning)
        csr = torch.sparse_csr_tensor(crow, order, ones, (rows.numel(), ids.numel()), check_invariants=False)
    return rows, csr @ grad_rows


def lookup(flat_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight[flat_ids]``: F.embedding, or for one-column tables (first-order weights) a gather of scalars, twice
    as fast as gathering 4-byte rows (0.22 vs 0.47 ms for 4096 x 39 ids on 2 cores). No autograd of its own."""
    if weight.shape[1] == 1:
        return weight.view(-1).index_select(0, flat_ids.reshape(-1)).view_as(flat_ids).unsqueeze(-1)
    return nn.functional.embedding(flat_ids, weight)


class _RowGradientLookup(torch.autograd.Function):
    """``weight[flat_ids]`` whose weight gradient is a coalesced sparse tensor over the rows the batch touched.

    Row-wise optimizers (lowrank_ctr.optim) update only those rows. The duplicate ids of a batch are summed here,
    once (:func:`sum_rows`); coalescing later is why torch's ``sparse=True`` gradient + SparseAdam lost to dense Adam.
    """

    @staticmethod
    def forward(ctx, flat_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(flat_ids)
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        return lookup(flat_ids, weight)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[None, torch.Tensor]:
        (flat_ids,) = ctx.saved_tensors
        ids = flat_ids.reshape(-1)
        rows, summed = sum_rows(ids, grad_out.reshape(ids.numel(), -1))
        # Sorted unique rows; the autograd engine may drop the coalesced flag, lowrank_ctr.optim re-checks it cheaply.
        grad = torch.sparse_coo_tensor(rows.unsqueeze(0), summed.to(ctx.weight_dtype), ctx.weight_shape,
                                       is_coalesced=True, check_invariants=False)
        return None, grad


class FieldEmbedding(nn.Module):
    """All id-valued fields in ONE flat table with per-field offsets: one gather per batch.

    ``forward(ids)`` takes ids of shape (B, F) or (B, F, L) (field on dim 1, local ids per field) and returns
    (B, F, dim) or (B, F, L, dim). Compressed replacements (compression/) keep exactly this signature and the
    ``vocab_sizes`` / ``dim`` attributes, so models never know whether they were compressed.
    With ``row_gradients = True`` (set by lowrank_ctr.optim for row-wise optimizers) training produces a sparse
    gradient over the touched rows only; the forward result is identical.
    """

    def __init__(self, vocab_sizes: Sequence[int], dim: int, init_std: float = 0.01) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"embedding dim must be >= 1, got {dim}")
        self.vocab_sizes = [int(v) for v in vocab_sizes]
        self.dim = int(dim)
        self.row_gradients = False
        offsets = torch.tensor([0] + self.vocab_sizes[:-1], dtype=torch.long).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.weight = nn.Parameter(torch.empty(sum(self.vocab_sizes), self.dim))
        nn.init.normal_(self.weight, std=init_std)

    @property
    def num_fields(self) -> int:
        return len(self.vocab_sizes)

    def flat_ids(self, ids: torch.Tensor) -> torch.Tensor:
        shape = (1, self.num_fields) + (1,) * (ids.dim() - 2)
        return ids + self.offsets.view(shape)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = self.flat_ids(ids)
        if self.weight.requires_grad and torch.is_grad_enabled():
            if self.row_gradients:
                return _RowGradientLookup.apply(flat, self.weight)
            return nn.functional.embedding(flat, self.weight)  # its dense backward
        return lookup(flat, self.weight)

    def field_table(self, i: int) -> torch.Tensor:
        """The rows of field ``i`` (a view into the flat table)."""
        start = int(self.offsets[i])
        return self.weight[start : start + self.vocab_sizes[i]]

    def extra_repr(self) -> str:
        return f"fields={self.num_fields}, rows={sum(self.vocab_sizes)}, dim={self.dim}"


class OutputLinear(nn.Linear):
    """A Linear that computes in float32 even under autocast: for the layers that produce logits.

    AUC ranks the logits, and bfloat16 keeps 8 bits of mantissa (steps of 1/64 near a logit of 3): ties and
    rank noise. A head is one tiny GEMM, so float32 costs nothing measurable. Same parameters as ``nn.Linear``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return super().forward(x.float())
        return super().forward(x)


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "prelu": nn.PReLU,
               "leaky_relu": nn.LeakyReLU, "identity": nn.Identity}


def make_activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


class MLP(nn.Module):
    """Linear -> [BatchNorm] -> activation -> [Dropout] blocks, optionally followed by an output Linear.

    The Linear layers are the compression targets of the ``mlp`` group (compression/ finds them as
    ``nn.Linear`` children of an ``MLP``), so they live directly in ``self.net`` with stable names
    ``net.0``, ``net.4``, ... .
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], activation: str = "relu", batch_norm: bool = False,
                 dropout: float = 0.0, out_dim: int | None = None) -> None:
        super().__init__()
        if in_dim < 1 or any(int(h) < 1 for h in hidden) or (out_dim is not None and out_dim < 1):
            raise ValueError(f"MLP sizes must be positive: in_dim={in_dim}, hidden={list(hidden)}, out_dim={out_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers.append(nn.Linear(d, int(h)))
            if batch_norm:
                layers.append(nn.BatchNorm1d(int(h)))
            layers.append(make_activation(activation))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = int(h)
        if out_dim is not None:
            layers.append(OutputLinear(d, out_dim))
            d = out_dim
        self.net = nn.Sequential(*layers)
        self.out_dim = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ------------------------------------------------------------------------------------------------
# Feature embedding: every field of a batch -> (B, F_emb, dim) field vectors + (B, n_dense) dense columns
# ------------------------------------------------------------------------------------------------

NUMERIC_MODES = ("embed", "dense")


def pooled_lookup(table: nn.Module, cat: torch.Tensor, multi: torch.Tensor, n_cat: int | None = None,
                  n_multi: int | None = None) -> torch.Tensor:
    """Look up categorical (B, n_cat) and multi-hot (B, n_multi, L) ids in ONE call of ``table``.

    ``table`` is a :class:`FieldEmbedding` over categorical-then-multi-hot fields, or any drop-in with the same
    call signature (a compressed table). Multi-hot lists are mean-pooled over ids != PAD_ID with an explicit
    mask, never by trusting the PAD row to be zero: a compressed table reconstructs that row as non-zero.
    When both kinds are present, categorical ids are padded to (B, n_cat, L) so that one gather serves all fields
    (a calibration hook on ``table`` should therefore weight looked-up rows by ``ids != PAD_ID``).
    ``n_cat`` / ``n_multi`` (schema-static; default: read from the shapes) keep torch.jit.trace free of
    data-dependent branches. Returns (B, n_cat + n_multi, dim).
    """
    n_cat = cat.shape[1] if n_cat is None else n_cat
    n_multi = multi.shape[1] if n_multi is None else n_multi
    if n_multi == 0:
        return table(cat)
    if n_cat == 0:
        ids = multi
        mask = multi != PAD_ID
    else:
        length = multi.shape[2]
        ids = torch.cat([nn.functional.pad(cat.unsqueeze(-1), (0, length - 1), value=PAD_ID), multi], dim=1)
        # Categorical slots: position 0 always counts (even an out-of-contract id 0), padding never does.
        is_cat_slot = torch.zeros(n_cat + n_multi, length, dtype=torch.bool, device=ids.device)
        is_cat_slot[:n_cat, 0] = True
        is_cat_field = torch.zeros(n_cat + n_multi, 1, dtype=torch.bool, device=ids.device)
        is_cat_field[:n_cat] = True
        # Boolean and/or rather than torch.where: onnxruntime has no CPU kernel for Where on bool tensors.
        mask = (is_cat_field & is_cat_slot) | (~is_cat_field & (ids != PAD_ID))
    vectors = table(ids)  # (B, F, L, dim)
    weights = mask.unsqueeze(-1).to(vectors.dtype)
    return (vectors * weights).sum(2) / weights.sum(2).clamp_min(1.0)


class NumericEmbedding(nn.Module):
    """One learned vector per numeric field, scaled by the field's (already normalised) value."""

    def __init__(self, num_fields: int, dim: int, init_std: float = 0.01) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_fields, dim))
        nn.init.normal_(self.weight, std=init_std)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return values.unsqueeze(-1) * self.weight  # (B, n_num, dim)


class FeatureEmbedding(nn.Module):
    """Turns a batch dict into field vectors for interaction layers plus dense columns for the DNN.

    ``self.table`` (a :class:`FieldEmbedding` over categorical then multi-hot fields, or None when the schema has
    neither) is the compression target: compression/ replaces it in place with a same-signature module.
    ``numeric="embed"`` gives each numeric field a vector (``self.numeric``) so FM/CIN/attention see it as a field;
    ``numeric="dense"`` passes the values through as extra DNN columns instead.
    Field order of ``emb``: categorical, multi-hot, numeric (if embedded) -- see :attr:`field_names`.
    """

    def __init__(self, schema: Schema, dim: int, numeric: str = "embed", init_std: float = 0.01) -> None:
        super().__init__()
        if numeric not in NUMERIC_MODES:
            raise ValueError(f"numeric must be one of {NUMERIC_MODES}, got {numeric!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"embedding_dim must be a positive int, got {dim!r}")
        self.dim = dim
        self.numeric_mode = numeric
        self.n_categorical = len(schema.categorical)
        self.n_multihot = len(schema.multihot)
        self.n_numeric = len(schema.numeric)
        vocab = schema.sparse_vocab_sizes
        self.add_module("table", FieldEmbedding(vocab, dim, init_std) if vocab else None)
        embed_numeric = numeric == "embed" and self.n_numeric > 0
        self.add_module("numeric", NumericEmbedding(self.n_numeric, dim, init_std) if embed_numeric else None)
        self.field_names: list[str] = [f.name for f in schema.categorical] + [f.name for f in schema.multihot]
        if embed_numeric:
            self.field_names += [f.name for f in schema.numeric]

    @property
    def num_fields(self) -> int:
        """F_emb: fields that come out as vectors."""
        return len(self.field_names)

    @property
    def dense_dim(self) -> int:
        return self.n_numeric if self.numeric_mode == "dense" else 0

    @property
    def flat_dim(self) -> int:
        """Width of :meth:`flatten` -- the usual DNN input."""
        return self.num_fields * self.dim + self.dense_dim

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        num = batch["num"]
        parts = []
        if self.table is not None:
            parts.append(pooled_lookup(self.table, batch["cat"], batch["multi"], self.n_categorical, self.n_multihot))
        if self.numeric is not None:
            parts.append(self.numeric(num))
        if not parts:
            emb = num.new_zeros(num.shape[0], 0, self.dim)
        else:
            emb = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        dense = num if self.numeric_mode == "dense" else num[:, :0]
        return emb, dense

    @staticmethod
    def flatten(emb: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """(B, F*dim + n_dense), field-major: the first Linear that eats this sees field i at [i*dim, (i+1)*dim)."""
        if dense.shape[1] == 0:  # no dense columns: a view, not a copy of the whole DNN input
            return emb.flatten(1)
        return torch.cat([emb.flatten(1), dense], dim=1)


class LinearTerm(nn.Module):
    """First-order (wide) term: one scalar per id, one weight per numeric value, one global bias -> (B,)."""

    def __init__(self, schema: Schema) -> None:
        super().__init__()
        vocab = schema.sparse_vocab_sizes
        self.add_module("table", FieldEmbedding(vocab, 1) if vocab else None)
        self.n_categorical, self.n_multihot = len(schema.categorical), len(schema.multihot)
        self.weight = nn.Parameter(torch.zeros(len(schema.numeric)))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.table is None:
            return batch["num"] @ self.weight + self.bias
        pooled = pooled_lookup(self.table, batch["cat"], batch["multi"], self.n_categorical, self.n_multihot)
        out = pooled.sum(dim=(1, 2)) + self.bias
        # without numeric fields (e.g. Criteo bucketized) no empty matmul: two ops fewer a batch
        return out + batch["num"] @ self.weight if self.weight.numel() else out


# ------------------------------------------------------------------------------------------------
# Interaction layers
# ------------------------------------------------------------------------------------------------

def fm_interaction(x: torch.Tensor, reduce_sum: bool = True) -> torch.Tensor:
    """0.5 * ((sum_i v_i)^2 - sum_i v_i^2) over the fields of x (B, F, d): (B, d), or (B,) summed over d."""
    return _fm_from_sum(x, x.sum(dim=1), reduce_sum)


def _fm_from_sum(x: torch.Tensor, s: torch.Tensor, reduce_sum: bool) -> torch.Tensor:
    if not reduce_sum:
        return 0.5 * (s * s - (x * x).sum(dim=1))  # (B, d)
    flat = x.reshape(x.shape[0], -1)
    # the sum of all squares as one squared norm per row: a single read of x and no (B, F*d) temporary (vecdot
    # and x * x write one: 3.3 ms of a 20 ms int8 DeepFM batch at 4096 x 39 x 16 on a 2-core AVX2 CPU, the
    # norm ~0.2 ms); plain ops when exporting (ONNX's ReduceL2 would do, but mul + sum is what every runtime has)
    squares = (flat * flat).sum(dim=-1) if _exporting() else torch.linalg.vector_norm(flat, dim=-1).square()
    return 0.5 * ((s * s).sum(dim=-1) - squares)


def _exporting() -> bool:
    """Tracing for TorchScript or the ONNX export (``lowrank_ctr.export`` traces: ``dynamo=False``): plain ops only,
    the tracing ONNX exporter has no linalg norms. Only the tracing flag (0.2 us): ``torch.onnx.is_in_onnx_export()``
    costs 3 us a call, and a model's forward is host-bound on a GPU at small batches."""
    return torch.jit.is_tracing()


class _FMInteraction(torch.autograd.Function):
    """fm_interaction with its gradient written out: d out / d v_i = g * (s - v_i), s = sum_i v_i.

    Autograd's backward of the expression runs three (B, F, d) multiplies, two of them against the gradient
    broadcast from (B,) through a column-major (B, d) intermediate, a cache-hostile access pattern: 3.6 ms each at
    4096 x 39 x 16 on a 2-core AVX2 machine, ~10% of a DeepFM training step. This is one fused multiply-add.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, reduce_sum: bool) -> torch.Tensor:
        s = x.sum(dim=1)
        ctx.save_for_backward(x, s)
        ctx.reduce_sum = reduce_sum
        return _fm_from_sum(x, s, reduce_sum)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        x, s = ctx.saved_tensors
        scale = grad.view(-1, 1) if ctx.reduce_sum else grad  # (B, 1) or (B, d)
        return torch.addcmul((s * scale).unsqueeze(1), x, scale.unsqueeze(1), value=-1), None  # g*s - g*v_i


class FactorizationMachine(nn.Module):
    """Sum of pairwise dot products in O(F*d): 0.5 * ((sum_i v_i)^2 - sum_i v_i^2)."""

    def __init__(self, reduce_sum: bool = True) -> None:
        super().__init__()
        self.reduce_sum = reduce_sum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled() and not _exporting():
            return _FMInteraction.apply(x, self.reduce_sum)
        return fm_interaction(x, self.reduce_sum)  # inference, tracing and export: plain ops


class CrossNetwork(nn.Module):
    """DCN v1: x_{l+1} = x0 * (x_l . w_l) + b_l + x_l (rank-1 crosses; w_l is a vector, not a Linear)."""

    def __init__(self, in_dim: int, num_layers: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.weight = nn.Parameter(torch.randn(num_layers, in_dim) / in_dim**0.5)
        self.bias = nn.Parameter(torch.zeros(num_layers, in_dim))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for i in range(self.num_layers):
            x = x0 * (x @ self.weight[i]).unsqueeze(-1) + self.bias[i] + x
        return x


class CrossNetworkV2(nn.Module):
    """DCN v2: x_{l+1} = x0 * (W_l x_l + b_l) + x_l; each W_l is an nn.Linear (``layers.{l}``) so it can be compressed."""

    def __init__(self, in_dim: int, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(in_dim, in_dim) for _ in range(num_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in here: autocast's (bf16 / fp16) when it is on, else the tensor's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _OuterProductLinear(torch.autograd.Function):
    """``Linear(outer(x0, h))`` for one CIN layer, rows n = (batch, embedding dim): (N, F0), (N, Hp) -> (N, H).

    Autograd's own backward of ``x0 ⊗ h`` writes two more N x F0 x Hp products and reduces them (memory-bound: more
    time than the layer's GEMMs at CIN's sizes); here both input gradients are batched mat-vec products that read
    the output-side gradient once. Computes in ``dtype`` (autocast's), with float32 parameter gradients.
    """

    @staticmethod
    def forward(ctx, x0: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
        n, f0, hp = x0.shape[0], x0.shape[1], h.shape[1]
        with torch.autocast(x0.device.type, enabled=False):
            x0c, hc, wc = x0.to(dtype).contiguous(), h.to(dtype).contiguous(), weight.to(dtype)
            z = (x0c.unsqueeze(2) * hc.unsqueeze(1)).reshape(n, f0 * hp)  # contiguous inputs: no copy
            out = z @ wc.t()
            if bias is not None:
                out = out + bias.to(dtype)
        ctx.save_for_backward(x0c, hc, wc, z)
        ctx.has_bias, ctx.dtypes = bias is not None, (x0.dtype, h.dtype, weight.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # noqa: ANN205 - autograd's tuple of optional gradients
        x0c, hc, wc, z = ctx.saved_tensors
        n, f0, hp = x0c.shape[0], x0c.shape[1], hc.shape[1]
        x0_dtype, h_dtype, w_dtype = ctx.dtypes
        with torch.autocast(x0c.device.type, enabled=False):
            g = grad_out.to(wc.dtype)
            grad_z = (g @ wc).view(n, f0, hp)
            grad_x0 = torch.bmm(grad_z, hc.unsqueeze(2)).squeeze(2).to(x0_dtype)
            grad_h = torch.bmm(x0c.unsqueeze(1), grad_z).squeeze(1).to(h_dtype)
            grad_w = (g.t() @ z).to(w_dtype)
            grad_b = g.sum(0).to(w_dtype) if ctx.has_bias else None
        return grad_x0, grad_h, grad_w, grad_b, None


class CIN(nn.Module):
    """Compressed Interaction Network (xDeepFM): explicit vector-wise crosses of bounded degree.

    Each layer's 1x1 convolution over the F0*H outer-product maps is an nn.Linear (``layers.{l}``).
    With ``split_half`` every layer but the last sends half of its maps to the output and half to the next layer.
    forward (B, F0, d) -> (B, out_dim) sum-pooled feature maps.

    Cost: layer l multiplies an (B*d, F0*H_{l-1}) matrix by (F0*H_{l-1}, H_l): at 39 fields and [128, 128] that is
    ~14x the FLOPs of DeepFM's 400x3 MLP per row -- why xDeepFM trains about that much slower. The maps are kept
    in (B, d, H) layout so each layer is one contiguous GEMM (no transposed copies), the outer product is formed in
    autocast's dtype, and its backward is two batched mat-vecs (:class:`_OuterProductLinear`).
    """

    def __init__(self, num_fields: int, layer_sizes: Sequence[int], split_half: bool = True,
                 activation: str = "identity") -> None:
        super().__init__()
        if num_fields < 1 or not layer_sizes or any(h < 1 for h in layer_sizes):
            raise ValueError(f"CIN needs num_fields >= 1 and positive layer sizes, got {num_fields}, {list(layer_sizes)}")
        last = len(layer_sizes) - 1
        if split_half and any(h % 2 for h in layer_sizes[:last]):
            raise ValueError(f"cin_layers must be even (except the last) when split_half=True, got {list(layer_sizes)}")
        self.num_fields = num_fields
        self.split_half = split_half
        self.layers = nn.ModuleList()
        self.activation = make_activation(activation)
        prev, out_dim = num_fields, 0
        for i, h in enumerate(layer_sizes):
            self.layers.append(nn.Linear(num_fields * prev, h))
            prev = h // 2 if split_half and i < last else h
            out_dim += prev
        self.out_dim = out_dim

    def _layer(self, layer: nn.Module, x0: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One layer on rows (N, F0) x (N, Hp) -> (N, H); a compressed replacement gets the plain product."""
        if type(layer) is nn.Linear and torch.is_grad_enabled() and not torch.jit.is_tracing():
            return _OuterProductLinear.apply(x0, h, layer.weight, layer.bias, compute_dtype(x0))
        dtype = compute_dtype(x0)
        z = (x0.to(dtype).unsqueeze(2) * h.to(dtype).unsqueeze(1)).flatten(1)  # map index i * Hp + j, as before
        return layer(z)

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        b, f0, d = x0.shape
        rows = x0.transpose(1, 2).reshape(b * d, f0)  # (B*d, F0): one row per (sample, embedding dim)
        h, outs = rows, []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            z = self.activation(self._layer(layer, rows, h))  # (B*d, H_l)
            if self.split_half and i < last:
                h, keep = torch.chunk(z, 2, dim=1)
            else:
                h = keep = z
            outs.append(keep.reshape(b, d, -1).sum(dim=1))  # sum-pool over the embedding dim
        return torch.cat(outs, dim=1)


class InteractingLayer(nn.Module):
    """AutoInt multi-head self-attention over fields with a projected residual, then ReLU.

    Projections ``query``/``key``/``value``/``residual`` are nn.Linear (bias-free) so compression can find them.
    """

    def __init__(self, in_dim: int, attention_dim: int, num_heads: int, residual: bool = True,
                 scale: bool = True) -> None:
        super().__init__()
        if attention_dim % num_heads:
            raise ValueError(f"attention_dim {attention_dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = attention_dim // num_heads
        self.out_dim = attention_dim
        self.scale = self.head_dim**-0.5 if scale else 1.0
        self.query = nn.Linear(in_dim, attention_dim, bias=False)
        self.key = nn.Linear(in_dim, attention_dim, bias=False)
        self.value = nn.Linear(in_dim, attention_dim, bias=False)
        self.residual = nn.Linear(in_dim, attention_dim, bias=False) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, f, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, f, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, F, dh)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        if q.dtype in (torch.float32, torch.float64):
            # torch's fused kernel: 1.5x the explicit matmuls + softmax in float32 training (bench_zoo)...
            out = nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:  # ...but 4x slower than them under bf16 autocast on CPU (its bf16 backward), so not there
            out = torch.softmax((q @ k.transpose(-1, -2)) * self.scale, dim=-1) @ v
        out = out.transpose(1, 2).reshape(b, f, self.out_dim)
        if self.residual is not None:
            out = out + self.residual(x)
        return torch.relu(out)


class SENETLayer(nn.Module):
    """FiBiNET squeeze-excitation: re-weights whole fields by a gate computed from all field summaries."""

    def __init__(self, num_fields: int, reduction_ratio: float = 3.0) -> None:
        super().__init__()
        reduced = max(1, int(num_fields / reduction_ratio))
        self.excitation = nn.Sequential(nn.Linear(num_fields, reduced, bias=False), nn.ReLU(),
                                        nn.Linear(reduced, num_fields, bias=False), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.excitation(x.mean(dim=-1)).unsqueeze(-1)


BILINEAR_TYPES = ("field_all", "field_each", "field_interaction")


class BilinearInteraction(nn.Module):
    """FiBiNET bilinear interaction p_ij = (v_i W) * v_j for i < j -> (B, F(F-1)/2, d), pairs in triu order.

    ``field_all`` shares one W, ``field_each`` has one W per left field, ``field_interaction`` one per pair.
    Computed per left field i (its pairs are contiguous in triu order): one GEMM v_i @ [W_i,i+1 .. W_i,F-1]
    against the slice v_{i+1:}, instead of gathering (B, pairs, d) copies of both sides -- the gathers and their
    scatter backward made this layer 3-5x slower (bench_zoo).
    """

    def __init__(self, num_fields: int, dim: int, bilinear_type: str = "field_interaction") -> None:
        super().__init__()
        if bilinear_type not in BILINEAR_TYPES:
            raise ValueError(f"bilinear_type must be one of {BILINEAR_TYPES}, got {bilinear_type!r}")
        self.bilinear_type = bilinear_type
        self.num_fields, self.dim = num_fields, dim
        n_pairs = num_fields * (num_fields - 1) // 2
        n_w = {"field_all": 1, "field_each": num_fields, "field_interaction": n_pairs}[bilinear_type]
        bound = dim**-0.5
        self.weight = nn.Parameter(torch.empty(n_w, dim, dim).uniform_(-bound, bound))

    @property
    def num_pairs(self) -> int:
        return self.num_fields * (self.num_fields - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, f, d = x.shape
        if self.bilinear_type == "field_interaction":
            pieces, start, xr = [], 0, None
            for i in range(f - 1):
                n = f - 1 - i  # pairs (i, i+1) .. (i, f-1); their weights are rows start..start+n
                w = self.weight[start:start + n].permute(1, 0, 2).reshape(d, n * d)
                left = (x[:, i] @ w).view(b, n, d)
                xr = x.to(left.dtype) if xr is None else xr  # cast once (bf16 under autocast), not per slice
                pieces.append(left * xr[:, i + 1:])
                start += n
            return torch.cat(pieces, dim=1)
        if self.bilinear_type == "field_all":
            proj = x @ self.weight[0]
        else:
            proj = torch.einsum("bfd,fde->bfe", x, self.weight)
        xr = x.to(proj.dtype)  # bf16 under autocast: keeps the (B, pairs, d) product in the GEMM's dtype
        return torch.cat([proj[:, i:i + 1] * xr[:, i + 1:] for i in range(f - 1)], dim=1)


class FeatureGate(nn.Module):
    """FinalMLP feature selection for one stream: x * 2*sigmoid(MLP(context)), context from chosen fields or a
    learned vector (then the gate is a learned per-feature weight, as in the reference implementation)."""

    def __init__(self, input_dim: int, embedding_dim: int, context_fields: Sequence[int], hidden: Sequence[int],
                 activation: str = "relu") -> None:
        super().__init__()
        self.context_fields = [int(i) for i in context_fields]
        ctx_dim = embedding_dim * max(1, len(self.context_fields))
        self.context_bias = nn.Parameter(torch.zeros(1, embedding_dim)) if not self.context_fields else None
        self.mlp = MLP(ctx_dim, hidden, activation=activation, out_dim=input_dim)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.context_bias is not None:
            ctx = self.context_bias.expand(x.shape[0], -1)
        else:
            ctx = emb[:, self.context_fields].flatten(1)
        return x * (2.0 * torch.sigmoid(self.mlp(ctx)))


class InteractionAggregation(nn.Module):
    """FinalMLP two-stream fusion: w_x.x + w_y.y + sum_h x_h^T W_h y_h (multi-head bilinear) -> (B,)."""

    def __init__(self, x_dim: int, y_dim: int, num_heads: int = 1) -> None:
        super().__init__()
        if x_dim % num_heads or y_dim % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide both stream widths ({x_dim}, {y_dim})")
        self.num_heads = num_heads
        self.w_x = nn.Linear(x_dim, 1)
        self.w_y = nn.Linear(y_dim, 1, bias=False)
        hx, hy = x_dim // num_heads, y_dim // num_heads
        self.w_xy = nn.Parameter(torch.empty(num_heads, hx, hy))
        nn.init.xavier_normal_(self.w_xy)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # produces the logits: float32 (see OutputLinear)
            with torch.autocast(x.device.type, enabled=False):
                return self.forward(x.float(), y.float())
        b = x.shape[0]
        xh = x.view(b, self.num_heads, -1)
        yh = y.view(b, self.num_heads, -1)
        xy = torch.einsum("bhi,hij,bhj->b", xh, self.w_xy, yh)
        return self.w_x(x).squeeze(-1) + self.w_y(y).squeeze(-1) + xy
