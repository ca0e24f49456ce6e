"""Folding: a Linear that reads low-rank embeddings reads them through each field's small basis instead.

After svd/afm, field i's vector is e_i = z_i P_i + mu_i (a mean-pooled multi-hot field: a convex combination of
such rows, or 0 for an empty list), so it always lies in the linear span S_i of the rows of P_i and mu_i, of
dimension w_i <= k_i + 1. With Q_i (w_i x d) an orthonormal basis of S_i, e_i = (e_i Q_i^T) Q_i exactly, so a
Linear W x + b whose input starts with the flattened field vectors [e_1 .. e_F | rest] equals

    sum_i (W_i Q_i^T) (e_i Q_i^T) + W_rest rest + b

Its weight shrinks from out x (F d + r) to out x (sum_i w_i + r) — physically, no zero padding — and its FLOPs
by about d / (k + 1); the per-field products e_i Q_i^T cost B F d w, little next to the GEMM. Models are not
changed: the reconstruction is still computed (FM, cross or attention layers may read it too), and only the Linears
that read it are folded. Which Linears those are is found structurally, on a real batch: a Linear (or the ``down``
half of a LowRankLinear) whose input's first F d columns are bit-identical to the field vectors that the
``FeatureEmbedding`` owning the compressed table produced (models/layers.py ``FeatureEmbedding.flatten``). So DNN,
DeepFM, Wide&Deep, DCN and DCNv2 (parallel: its DNN and its first cross layer) fold; a DNN fed by a cross network
(DCNv2 stacked) or by gated / attended fields does not.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from lowrank_ctr.compression.modules import LowRankFieldEmbedding, LowRankLinear


class FieldFoldedLinear(nn.Module):
    """Linear(in -> out) whose columns [0, F d) (F fields of width d) are read through per-field bases.

    ``basis`` (F, w_max, d): field i's orthonormal rows in its first w_i rows (zeros beyond); ``inner`` is the
    shrunk Linear over [codes of all fields (sum w_i) | the other in - F d columns].
    """

    replaces = "linear"

    def __init__(self, in_features: int, out_features: int, num_fields: int, dim: int, widths: Sequence[int],
                 bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.num_fields, self.dim = int(num_fields), int(dim)
        self.widths = [int(w) for w in widths]
        if len(self.widths) != self.num_fields or not all(0 <= w <= self.dim for w in self.widths):
            raise ValueError(f"FieldFoldedLinear: need {self.num_fields} widths in 0..{self.dim}, got {list(widths)}")
        if self.num_fields * self.dim > self.in_features:
            raise ValueError(f"FieldFoldedLinear: {self.num_fields} fields x {self.dim} do not fit in {in_features}")
        self.w_max = max(1, max(self.widths, default=1))
        valid = [i * self.w_max + j for i, w in enumerate(self.widths) for j in range(w)]
        self.register_buffer("valid", torch.tensor(valid, dtype=torch.long), persistent=False)
        self.basis = nn.Parameter(torch.zeros(self.num_fields, self.w_max, self.dim))
        self.rest = self.in_features - self.num_fields * self.dim
        self.inner = nn.Linear(len(valid) + self.rest, self.out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        nf, d = self.num_fields, self.dim
        fields = x[:, : nf * d].reshape(-1, nf, d).transpose(0, 1)  # (F, N, d)
        codes = torch.matmul(fields, self.basis.transpose(1, 2))  # (F, N, w_max): one GEMM per field
        codes = codes.transpose(0, 1).reshape(x.shape[0], nf * self.w_max).index_select(1, self.valid)
        y = self.inner(torch.cat([codes, x[:, nf * d :]], dim=1))
        return y.reshape(tuple(lead) + (self.out_features,))

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The (out, in) weight this layer applies to inputs inside the bases' spans (for tests and analysis)."""
        k = int(self.valid.numel())
        w_codes = self.inner.weight[:, :k]
        expanded = torch.zeros(self.out_features, self.num_fields * self.w_max, dtype=w_codes.dtype,
                               device=w_codes.device)
        expanded[:, self.valid] = w_codes
        w_fields = torch.einsum("ofw,fwd->ofd", expanded.view(self.out_features, self.num_fields, self.w_max),
                                self.basis).reshape(self.out_features, -1)
        return torch.cat([w_fields, self.inner.weight[:, k:]], dim=1)

    def spec_args(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "num_fields": self.num_fields,
                "dim": self.dim, "widths": list(self.widths), "bias": self.inner.bias is not None}

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, folded fields={self.num_fields} widths<={self.w_max}"


@torch.no_grad()
def field_bases(emb: LowRankFieldEmbedding, tol: float = 1e-6) -> list[torch.Tensor]:
    """Per field an orthonormal basis (w_i x d, float64) of span(rows of P_i, mu_i): every vector the field
    can produce, pooled or not, lies in it."""
    out = []
    for i, k in enumerate(emb.ranks):
        rows = torch.cat([emb.projection[i, :k], emb.bias[i : i + 1]]).detach().to("cpu", torch.float64)
        _, s, vh = torch.linalg.svd(rows, full_matrices=False)
        keep = s > tol * max(float(s.max()) if s.numel() else 0.0, 1e-300)
        out.append(vh[keep])
    return out


@torch.no_grad()
def fold_linear(linear: nn.Linear, bases: Sequence[torch.Tensor], dim: int) -> FieldFoldedLinear:
    """The FieldFoldedLinear equal to ``linear`` on inputs whose first F d columns lie in the bases' spans."""
    nf = len(bases)
    widths = [int(b.shape[0]) for b in bases]
    new = FieldFoldedLinear(linear.in_features, linear.out_features, nf, dim, widths, bias=linear.bias is not None)
    new = new.to(device=linear.weight.device, dtype=linear.weight.dtype)
    w = linear.weight.detach().to("cpu", torch.float64)
    w_fields = w[:, : nf * dim].reshape(w.shape[0], nf, dim)
    folded = [w_fields[:, i] @ b.T for i, b in enumerate(bases)]  # (out, w_i) each
    basis = torch.zeros(nf, new.w_max, dim, dtype=torch.float64)
    for i, b in enumerate(bases):
        basis[i, : b.shape[0]] = b
    new.basis.copy_(basis)
    new.inner.weight.copy_(torch.cat(folded + [w[:, nf * dim :]], dim=1))
    if linear.bias is not None:
        new.inner.bias.copy_(linear.bias.detach())
    return new


@torch.no_grad()
def find_field_readers(model: nn.Module, table_name: str, batch: Any, forward_fn: Any = None) -> list[str]:
    """Names of the Linears (or LowRankLinear ``.down`` halves) whose input starts with the field vectors of the
    table ``table_name`` (bit-identical on ``batch``), i.e. the Linears a fold can rewrite."""
    from lowrank_ctr.models.layers import FeatureEmbedding

    table = model.get_submodule(table_name)
    owners = [m for m in model.modules() if isinstance(m, FeatureEmbedding) and m.table is table]
    if not owners:
        return []
    owner = owners[0]
    seen: dict[str, Any] = {}
    candidates = {n: m for n, m in model.named_modules()
                  if isinstance(m, nn.Linear) and not isinstance(m, FieldFoldedLinear)}
    def keep(key: str, value: torch.Tensor) -> None:  # a forward hook must return None (else it replaces the output)
        seen.setdefault(key, value)

    handles = [owner.register_forward_hook(lambda _m, _i, out: keep("emb", out[0]))]
    for n, m in candidates.items():
        handles.append(m.register_forward_hook(lambda _m, inp, _o, n=n: keep(n, inp[0]) if inp[0].dim() == 2 else None))
    was_training = model.training
    model.eval()
    try:
        (forward_fn or (lambda mod, b: mod(b)))(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    emb = seen.get("emb")
    if emb is None:
        return []
    fields = emb[:, : table.num_fields].flatten(1)
    width = fields.shape[1]
    readers = []
    for n in candidates:
        x = seen.get(n)
        if x is not None and x.shape[0] == fields.shape[0] and x.shape[1] >= width and torch.equal(x[:, :width], fields):
            readers.append(n)
    return readers


@torch.no_grad()
def fold_model(model: nn.Module, table_name: str, batch: Any, forward_fn: Any = None) -> dict[str, nn.Module]:
    """Fold every Linear that reads the compressed table ``table_name`` and becomes smaller by it; returns
    {name: new module} for the spec.

    Raises ValueError when the table is not an svd/afm embedding or no Linear reads its field vectors directly.
    """
    from lowrank_ctr.compression.size import module_size
    from lowrank_ctr.compression.targets import get_module, set_module

    table = get_module(model, table_name)
    if not isinstance(table, LowRankFieldEmbedding):
        raise ValueError(f"compression.fold=true folds an SVD/AFM embedding; {table_name!r} is "
                         f"{type(table).__name__} (use compression=afm or svd with 'embedding' in targets)")
    readers = find_field_readers(model, table_name, batch, forward_fn)
    if not readers:
        raise ValueError(f"compression.fold=true: no Linear layer of {type(model).__name__} reads the field vectors "
                         f"of {table_name!r} directly (its DNN reads them through another layer), so there is "
                         "nothing to fold; set compression.fold=false")
    bases = field_bases(table)
    out: dict[str, nn.Module] = {}
    for name in readers:
        old = get_module(model, name)
        new = fold_linear(old, bases, table.dim)
        if module_size(new)[1] < module_size(old)[1]:  # a thin layer (e.g. a low-rank ``down``) may not shrink
            set_module(model, name, new)
            out[name] = new
    return out
