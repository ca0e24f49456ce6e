"""Numerical tests of the compression library on small toy models (the model zoo is not imported)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lowrank_ctr.compression import (
    Int8FieldEmbedding,
    Int8Linear,
    LowRankFieldEmbedding,
    LowRankLinear,
    TTEmbedding,
    TTFieldEmbedding,
    apply_spec,
    collect_output_stats,
    compress,
    compress_from_config,
    find_targets,
    model_size,
    module_groups,
)
from lowrank_ctr.compression.methods import LayerContext, get_method
from lowrank_ctr.compression.ranks import linear_break_even
from lowrank_ctr.compression.stats import OutputStats
from lowrank_ctr.data.batch import random_batch
from lowrank_ctr.data.schema import PAD_ID, FieldSpec, Schema
from lowrank_ctr.models.layers import MLP, FieldEmbedding


def svd_linear(lin, rank, stats=None):
    return get_method("svd").linear(lin, rank, LayerContext(stats=stats))


def svd_embedding(emb, rank, stats=None):
    return get_method("svd").embedding(emb, rank, LayerContext(stats=stats))


def afm_linear(lin, rank, stats):
    return get_method("afm").linear(lin, rank, LayerContext(stats=stats))


def afm_embedding(emb, rank, stats, code_dtype="float32"):
    return get_method("afm").embedding(emb, rank, LayerContext(stats=stats, code_dtype=code_dtype))


def tt_embedding(emb, rank, stats=None):
    return get_method("tt").embedding(emb, rank, LayerContext())


def int8_embedding(emb, rank=None, stats=None):
    return get_method("int8").embedding(emb, rank, LayerContext())


def int8_linear(lin, rank=None, stats=None):
    return get_method("int8").linear(lin, rank, LayerContext())


# ----------------------------------------------------------------------------------------------------------------
# Toy models
# ----------------------------------------------------------------------------------------------------------------
def toy_schema(multihot: bool = True, vocab: tuple[int, ...] = (40, 25, 60, 5)) -> Schema:
    fields = [FieldSpec(f"c{i}", "categorical", v) for i, v in enumerate(vocab)]
    fields += [FieldSpec("n0", "numeric"), FieldSpec("n1", "numeric")]
    if multihot:
        fields.append(FieldSpec("m0", "multihot", 30, max_len=4))
    return Schema("toy", fields)


class FeatureEmbedding(nn.Module):
    def __init__(self, vocab_sizes, dim):
        super().__init__()
        self.table = FieldEmbedding(vocab_sizes, dim, init_std=0.5)


class Toy(nn.Module):
    """Embedding (categorical + multi-hot, sum-pooled with a padding mask) -> cross-like Linear -> MLP."""

    def __init__(self, schema: Schema, dim: int = 8, hidden=(32, 16), seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        vocab = schema.sparse_vocab_sizes
        self.multi = bool(schema.multihot)
        self.embedding = FeatureEmbedding(vocab, dim)
        self.linear = FeatureEmbedding(vocab, 1)
        nf = len(vocab)
        self.cross = nn.Linear(nf * dim, nf * dim)
        self.mlp = MLP(nf * dim + len(schema.numeric), hidden, batch_norm=True, out_dim=1)

    def ids(self, batch):
        if not self.multi:
            return batch["cat"]
        cat = batch["cat"].unsqueeze(-1)
        length = batch["multi"].shape[-1]
        cat = torch.cat([cat, torch.zeros(*cat.shape[:2], length - 1, dtype=cat.dtype)], dim=-1)
        return torch.cat([cat, batch["multi"]], dim=1)

    def forward(self, batch):
        ids = self.ids(batch)
        e = self.embedding.table(ids)
        lin = self.linear.table(ids)
        if self.multi:
            mask = (ids != PAD_ID).unsqueeze(-1).to(e.dtype)
            e, lin = (e * mask).sum(2), (lin * mask).sum(2)
        x = e.flatten(1)
        h = x + 0.1 * torch.tanh(self.cross(x))
        return self.mlp(torch.cat([h, batch["num"]], dim=1)).squeeze(-1) + lin.sum((1, 2))


def batches(schema: Schema, n: int = 3, size: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [random_batch(schema, size, g) for _ in range(n)]


def trained_like(model: nn.Module, schema: Schema) -> nn.Module:
    """Run a few batches in train mode so BatchNorm statistics are not the identity."""
    model.train()
    with torch.no_grad():
        for b in batches(schema, 2, 64, seed=7):
            model(b)
    return model.eval()


def predict(model, data):
    model.eval()
    with torch.no_grad():
        return torch.cat([model(b) for b in data])


# ----------------------------------------------------------------------------------------------------------------
# SVD
# ----------------------------------------------------------------------------------------------------------------
def test_svd_linear_full_rank_exact_and_rank_k_frobenius():
    torch.manual_seed(0)
    lin = nn.Linear(12, 9).double()
    x = torch.randn(50, 12, dtype=torch.float64)
    full, info = svd_linear(lin, 9)
    assert isinstance(full, LowRankLinear) and info["retained_energy"] == pytest.approx(1.0)
    torch.testing.assert_close(full(x), lin(x), atol=1e-10, rtol=0)
    low, info = svd_linear(lin, 4)
    s = torch.linalg.svdvals(lin.weight.detach())
    err = ((low.effective_weight() - lin.weight) ** 2).sum().detach()
    assert float(err) == pytest.approx(float((s[4:] ** 2).sum()), rel=1e-8)
    torch.testing.assert_close(low.up.bias, lin.bias)
    assert info["retained_energy"] == pytest.approx(float((s[:4] ** 2).sum() / (s**2).sum()))
    assert info["params_after"] == 4 * (12 + 9) + 9


def test_svd_embedding_full_rank_exact_and_rank_k_error():
    torch.manual_seed(0)
    emb = FieldEmbedding([30, 4, 50], 8, init_std=1.0).double()
    full, _ = svd_embedding(emb, 8)
    assert full.ranks == [8, 4, 8]  # capped at min(V_i, d)
    ids = torch.stack([torch.randint(0, v, (20,)) for v in emb.vocab_sizes], 1)
    torch.testing.assert_close(full(ids), emb(ids), atol=1e-10, rtol=0)
    low, info = svd_embedding(emb, 3)
    for i in range(emb.num_fields):
        e = emb.field_table(i).detach()
        s = torch.linalg.svdvals(e)
        err = ((low.field_table(i) - e) ** 2).sum().detach()
        assert float(err) == pytest.approx(float((s[3:] ** 2).sum()), rel=1e-6, abs=1e-10)
    assert info["field_ranks"] == [3, 3, 3]
    assert torch.count_nonzero(low.bias) == 0


# ----------------------------------------------------------------------------------------------------------------
# AFM
# ----------------------------------------------------------------------------------------------------------------
def _linear_stats(lin: nn.Linear, xs: list[torch.Tensor]) -> OutputStats:
    stats, n = collect_output_stats(lin, {"": lin}, xs)
    assert n == len(xs)
    return stats[""]


def test_afm_linear_full_rank_exact_and_rank_k_mse_equals_discarded_eigenvalues():
    torch.manual_seed(0)
    lin = nn.Linear(10, 6).double()
    # correlated inputs with a non-zero mean, so the output mean matters
    xs = [torch.randn(200, 10, dtype=torch.float64) @ torch.randn(10, 10, dtype=torch.float64) + 2.0
          for _ in range(3)]
    stats = _linear_stats(lin, xs)
    x = torch.cat(xs)
    y = lin(x).detach()
    full, info = afm_linear(lin, 6, stats)
    torch.testing.assert_close(full(x), y, atol=1e-5, rtol=0)
    assert info["retained_energy"] == pytest.approx(1.0)

    k = 2
    low, info = afm_linear(lin, k, stats)
    evals, evecs = stats.spectrum()
    mse = ((low(x) - y) ** 2).sum(1).mean().detach()
    assert float(mse) == pytest.approx(float(evals[0, k:].sum()), rel=1e-4)
    # the exact formula y_hat = mu + U U^T (y - mu)
    mu, u = stats.mean()[0], evecs[0][:, :k]
    torch.testing.assert_close(low(x), mu + (y - mu) @ u @ u.T, atol=1e-8, rtol=0)
    assert info["retained_energy"] == pytest.approx(float(evals[0, :k].sum() / evals[0].sum()))


def test_afm_linear_float32_full_rank():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    xs = [torch.randn(100, 16) for _ in range(2)]
    new, _ = afm_linear(lin, 8, _linear_stats(lin, xs))
    assert new.down.weight.dtype == torch.float32
    torch.testing.assert_close(new(xs[0]), lin(xs[0]), atol=1e-5, rtol=0)


def multihot_ids(vocab, n, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randint(1, v, (n, length), generator=g) for v in vocab], 1)
    lengths = torch.randint(1, length + 1, (n, len(vocab), 1), generator=g)
    return torch.where(torch.arange(length) < lengths, ids, torch.full_like(ids, PAD_ID))


def test_stats_per_field_ignore_padding():
    torch.manual_seed(0)
    emb = FieldEmbedding([12, 7], 4, init_std=1.0).double()
    ids = multihot_ids(emb.vocab_sizes, 30, 5)
    assert (ids == PAD_ID).any()
    stats, _ = collect_output_stats(emb, {"t": emb}, [ids[:10], ids[10:]])
    s = stats["t"]
    out = emb(ids).detach()
    for i in range(2):
        keep = ids[:, i] != PAD_ID
        y = out[:, i][keep]  # (N_i, d)
        assert float(s.count[i]) == keep.sum()
        torch.testing.assert_close(s.mean()[i], y.mean(0))
        torch.testing.assert_close(s.covariance()[i], torch.cov(y.T, correction=0))
    # (B, F) ids: every position counts
    stats, _ = collect_output_stats(emb, {"t": emb}, [ids[:, :, 0]])
    assert stats["t"].count.tolist() == [30.0, 30.0]


def test_afm_embedding_full_rank_exact_and_rank_k_mse_per_field():
    torch.manual_seed(0)
    emb = FieldEmbedding([40, 3, 25], 6, init_std=1.0).double()
    with torch.no_grad():  # low-rank-ish structure plus an offset, like trained tables
        emb.weight.mul_(torch.tensor([3.0, 2.0, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64)).add_(1.0)
    ids = multihot_ids(emb.vocab_sizes, 120, 4, seed=1)
    data = [ids[:60], ids[60:]]
    stats = collect_output_stats(emb, {"t": emb}, data)[0]["t"]
    full, _ = afm_embedding(emb, 6, stats)
    assert isinstance(full, LowRankFieldEmbedding) and full.ranks == [6, 3, 6]
    torch.testing.assert_close(full(ids), emb(ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(full(ids[:, :, 0]), emb(ids[:, :, 0]), atol=1e-5, rtol=0)

    low, info = afm_embedding(emb, [2, 1, 3], stats)
    evals, _ = stats.spectrum()
    err = ((low(ids) - emb(ids)) ** 2).sum(-1).detach()  # (B, F, L)
    for i, k in enumerate([2, 1, 3]):
        keep = ids[:, i] != PAD_ID
        mse = err[:, i][keep].mean()
        assert float(mse) == pytest.approx(float(evals[i, k:].sum()), rel=1e-4)
    kept = sum(float(evals[i, :k].sum()) for i, k in enumerate([2, 1, 3]))
    assert info["retained_energy"] == pytest.approx(kept / float(evals[:, :].sum()))


def test_lowrank_embedding_shapes_and_saving():
    m = LowRankFieldEmbedding([100, 5, 50], 16, [4, 5, 2])
    assert m.num_fields == 3 and m.vocab_sizes == [100, 5, 50] and m.dim == 16
    assert sum(p.numel() for p in m.parameters()) == LowRankFieldEmbedding.num_params([100, 5, 50], 16, [4, 5, 2])
    assert m(torch.zeros(2, 3, dtype=torch.long)).shape == (2, 3, 16)
    assert m(torch.zeros(2, 3, 7, dtype=torch.long)).shape == (2, 3, 7, 16)
    with pytest.raises(ValueError, match="field 1"):
        LowRankFieldEmbedding([100, 5], 16, [4, 6])


# ----------------------------------------------------------------------------------------------------------------
# TT and int8
# ----------------------------------------------------------------------------------------------------------------
def test_tt_full_rank_reproduces_table_and_low_rank_is_smaller():
    torch.manual_seed(0)
    table = torch.randn(500, 16)
    full = TTEmbedding.from_table(table, [10**6, 10**6])
    assert full.vocab_factors[0] * full.vocab_factors[1] * full.vocab_factors[2] >= 500
    torch.testing.assert_close(full.table(), table, atol=1e-4, rtol=0)
    idx = torch.randint(0, 500, (3, 7))
    torch.testing.assert_close(full(idx), table[idx], atol=1e-4, rtol=0)
    odd = TTEmbedding.from_table(table, [10**6, 10**6], vocab_factors=[5, 10, 12], dim_factors=[2, 8, 1])
    torch.testing.assert_close(odd(idx), table[idx], atol=1e-4, rtol=0)
    low = TTEmbedding.from_table(table, [4, 4])
    assert sum(p.numel() for p in low.parameters()) < table.numel() / 4

    emb = FieldEmbedding([500, 6, 300], 16, init_std=1.0)
    new, info = tt_embedding(emb, 4)
    assert isinstance(new, TTFieldEmbedding) and info["tt_fields"] == [True, False, True]  # tiny field stays dense
    assert info["bytes_after"] < info["bytes_before"] / 4
    torch.testing.assert_close(new.field_table(1), emb.field_table(1))
    ids = multihot_ids(emb.vocab_sizes, 5, 3)
    out = new(ids)
    assert out.shape == (5, 3, 3, 16)
    torch.testing.assert_close(out[:, 0], new.field_table(0)[ids[:, 0]])
    exact, info = tt_embedding(emb, 10**6)
    torch.testing.assert_close(exact(ids), emb(ids), atol=1e-4, rtol=0)
    assert info["retained_energy"] == pytest.approx(1.0, abs=1e-6)


def test_int8_embedding_and_linear_close_to_float():
    torch.manual_seed(0)
    emb = FieldEmbedding([200, 30], 16, init_std=0.01)
    new, info = int8_embedding(emb)
    assert isinstance(new, Int8FieldEmbedding) and new.qweight.dtype == torch.int8
    ids = multihot_ids(emb.vocab_sizes, 50, 3)
    ref = emb(ids).detach()
    assert float((new(ids) - ref).norm() / ref.norm()) < 1e-2
    assert info["bytes_after"] == 230 * (16 + 2)  # int8 rows + fp16 scale

    lin = nn.Linear(32, 24)
    q, info = int8_linear(lin)
    assert isinstance(q, Int8Linear)
    x = torch.randn(40, 32)
    ref = lin(x).detach()
    assert float((q(x).detach() - ref).norm() / ref.norm()) < 1e-2
    assert info["bytes_after"] == 32 * 24 + 24 * 2 + 24 * 4


# ----------------------------------------------------------------------------------------------------------------
# Targets and size
# ----------------------------------------------------------------------------------------------------------------
def test_targets_groups_include_exclude():
    model = Toy(toy_schema())
    names = {t.name: t.group for t in find_targets(model, ("embedding", "mlp", "other"))}
    assert names == {"embedding.table": "embedding", "cross": "other", "mlp.net.0": "mlp", "mlp.net.3": "mlp",
                     "mlp.net.6": "mlp"}  # linear.table (dim 1) skipped
    assert [t.name for t in find_targets(model, ("mlp",), include=["mlp.net.[03]"], exclude=["*.3"])] == ["mlp.net.0"]
    with pytest.raises(ValueError, match="nope"):
        find_targets(model, ("mlp",), include=["nope*"])
    with pytest.raises(ValueError, match="unknown target group"):
        find_targets(model, ("mlpp",))


def test_size_accounting_per_group():
    model = Toy(toy_schema())
    size = model_size(model)
    rows = sum(toy_schema().sparse_vocab_sizes)
    assert size["embedding"]["params"] == rows * 8 + rows
    assert size["other"]["params"] == 40 * 40 + 40
    assert size["total"]["params"] == sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if "running" in n or "num_batches" in n)
    assert size["total"]["bytes"] == sum(size[g]["bytes"] for g in ("embedding", "mlp", "other", "rest"))


# ----------------------------------------------------------------------------------------------------------------
# compress(): every method, policies, errors, spec round trip
# ----------------------------------------------------------------------------------------------------------------
METHOD_KW = {
    "svd": dict(embedding_rank=3, mlp_rank=4, other_rank=0.25, targets=("embedding", "mlp", "other")),
    "afm": dict(embedding_rank=3, mlp_rank=4, other_rank=0.25, targets=("embedding", "mlp", "other")),
    "tt": dict(embedding_rank=2),
    "int8": dict(targets=("embedding", "mlp", "other")),
}


@pytest.mark.parametrize("multihot", [True, False])
@pytest.mark.parametrize("method", ["svd", "afm", "tt", "int8"])
def test_every_method_and_spec_round_trip(tmp_path, method, multihot):
    schema = toy_schema(multihot, vocab=(400, 25, 300, 5))
    model = trained_like(Toy(schema), schema)
    data = batches(schema)
    before = predict(model, data)
    report = compress(model, method, data, **METHOD_KW[method])
    after = predict(model, data)
    assert report.ratio > 1.0 and report.compressed["total"]["bytes"] < report.base["total"]["bytes"]
    assert report.compressed["total"]["bytes"] == model_size(model)["total"]["bytes"]
    assert torch.isfinite(after).all()
    if method == "int8":
        assert float((after - before).abs().max()) < 0.05 * float(before.abs().max())
    spec = json.loads(json.dumps(report.spec))  # JSON-serialisable
    assert spec["modules"] and {m["name"] for m in spec["modules"]} == {
        l["name"] for l in report.layers if l["replaced"]}
    json.dumps(report.to_dict())

    path = tmp_path / "compressed.pt"
    torch.save(model.state_dict(), path)
    fresh = Toy(schema, seed=123)
    apply_spec(fresh, spec)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    torch.testing.assert_close(predict(fresh, data), after, atol=0, rtol=0)
    assert module_groups(fresh) == module_groups(model)


def test_output_linear_skipped_and_no_saving_kept_dense():
    schema = toy_schema()
    model = Toy(schema)
    report = compress(model, "svd", embedding_rank=8, mlp_rank=16)
    by_name = {l["name"]: l for l in report.layers}
    assert by_name["mlp.net.6"]["note"].startswith("skipped") and not by_name["mlp.net.6"]["replaced"]
    # embedding at rank = dim saves nothing, Linear(16, 1)... and Linear(32, 16) at rank 16 >= break-even 10
    assert not by_name["embedding.table"]["replaced"] and "kept dense" in by_name["embedding.table"]["note"]
    assert by_name["embedding.table"]["requested_rank"] == 8 and by_name["embedding.table"]["rank"] is None
    assert not by_name["mlp.net.3"]["replaced"] and linear_break_even(32, 16) == 10
    assert by_name["mlp.net.0"]["replaced"]  # Linear(42, 32) at rank 16 < 18
    assert isinstance(model.mlp.net[0], LowRankLinear) and isinstance(model.mlp.net[3], nn.Linear)


def test_rank_policies_ratio_and_energy():
    schema = toy_schema(vocab=(400, 25, 300, 5))
    model = Toy(schema)
    report = compress(model, "svd", mlp_rank=0.5, embedding_rank=0.25, targets=("embedding", "mlp"))
    by_name = {l["name"]: l for l in report.layers}
    assert by_name["mlp.net.0"]["rank"] == 16  # round(0.5 * min(42, 32))
    assert by_name["embedding.table"]["field_ranks"] == [2, 2, 2, 2, 2]

    model = trained_like(Toy(schema), schema)
    data = batches(schema)
    e = 0.9
    report = compress(model, "afm", data, energy=e, targets=("embedding", "mlp", "other"))
    stats_model = trained_like(Toy(schema), schema)
    stats, _ = collect_output_stats(stats_model, {"mlp.net.0": stats_model.mlp.net[0]}, data)
    spec = stats["mlp.net.0"].spectrum()[0][0]
    share = torch.cumsum(spec, 0) / spec.sum()
    replaced = [l for l in report.layers if l["replaced"]]
    assert {l["name"] for l in replaced} == {"embedding.table", "cross", "mlp.net.0", "mlp.net.3"}
    for l in replaced:
        assert l["retained_energy"] >= e - 1e-9, l
        if "field_retained_energy" in l:
            assert all(r >= e - 1e-9 for r in l["field_retained_energy"])
    k = next(l["rank"] for l in report.layers if l["name"] == "mlp.net.0")
    assert float(share[k - 1]) >= e and (k == 1 or float(share[k - 2]) < e)  # minimal


@pytest.mark.parametrize("method", ["svd", "afm"])
def test_budget_hits_target_ratio(method):
    schema = toy_schema(vocab=(400, 150, 300, 5))
    model = trained_like(Toy(schema, hidden=(64, 32)), schema)
    data = batches(schema)
    report = compress(model, method, data, target_ratio=3.0, targets=("embedding", "mlp", "other"))
    assert 3.0 <= report.ratio <= 3.0 * 1.05
    assert report.policy["predicted_bytes"] == report.compressed["total"]["bytes"]
    assert torch.isfinite(predict(model, data)).all()


def test_errors_name_the_layer():
    schema = toy_schema()
    with pytest.raises(ValueError, match=r"mlp\.net\.0.*rank 0.*1\.\.32"):
        compress(Toy(schema), "svd", mlp_rank=0, targets=("mlp",))
    with pytest.raises(ValueError, match=r"'cross'.*other_rank"):
        compress(Toy(schema), "svd", mlp_rank=2, targets=("mlp", "other"))
    with pytest.raises(ValueError, match=r"mlp\.net\.0.*rank 99.*1\.\.32"):
        compress(Toy(schema), "svd", mlp_rank=99, targets=("mlp",))
    with pytest.raises(ValueError, match=r"embedding\.table.*rank 9.*1\.\.8"):
        compress(Toy(schema), "svd", embedding_rank=9, targets=("embedding",))
    with pytest.raises(ValueError, match=r"unreachable.*'cross' \(not compressed\)"):
        compress(Toy(schema), "svd", target_ratio=1000.0, targets=("embedding",))
    with pytest.raises(ValueError, match=r"ratio 1\.5 is outside"):
        compress(Toy(schema), "svd", mlp_rank=1.5, targets=("mlp",))
    with pytest.raises(ValueError, match="known methods.*afm"):
        compress(Toy(schema), "pca")
    with pytest.raises(ValueError, match="calibration_batches"):
        compress(Toy(schema), "afm", [], embedding_rank=2, mlp_rank=2)
    with pytest.raises(ValueError, match=r"tt compresses \['embedding'\] only"):
        compress(Toy(schema), "tt", embedding_rank=2, targets=("embedding", "mlp"))


def test_none_method_reports_sizes():
    model = Toy(toy_schema())
    report = compress(model, "none")
    assert report.ratio == 1.0 and report.spec["modules"] == [] and report.layers == []


def test_afm_linear_full_rank_exact_beyond_calibration_span():
    """Fewer calibration samples than inputs: the uncalibrated directions come from W, so full rank stays exact."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 12).double()
    stats = _linear_stats(lin, [torch.randn(3, 8, dtype=torch.float64)])
    new, _ = afm_linear(lin, 8, stats)
    x = torch.randn(20, 8, dtype=torch.float64)
    torch.testing.assert_close(new(x), lin(x), atol=1e-8, rtol=0)


def test_stats_all_reduce_single_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        s = OutputStats(3, 2)
        s.update(torch.randn(10, 2, 3))
        before = s.state_dict()
        s.all_reduce()
        for k, v in s.state_dict().items():
            torch.testing.assert_close(v, before[k])
    finally:
        dist.destroy_process_group()


def test_fold_linear_reads_field_vectors_through_their_bases():
    """Every vector a low-rank field produces (rows, pooled rows, 0) lies in span(P_i, mu_i): the folded Linear is
    exact on them and physically smaller (no zero padding)."""
    from lowrank_ctr.compression.fold import field_bases, fold_linear

    torch.manual_seed(0)
    emb = FieldEmbedding([50, 4, 30], 6, init_std=1.0).double()
    ids = multihot_ids(emb.vocab_sizes, 64, 3)
    stats = collect_output_stats(emb, {"t": emb}, [ids])[0]["t"]
    low, _ = afm_embedding(emb, [2, 4, 0], stats)
    lin = nn.Linear(3 * 6 + 2, 5).double()
    bases = field_bases(low)
    assert [b.shape[0] for b in bases] == [3, 5, 1]  # k_i + 1 (rank 0: the mean alone)
    fold = fold_linear(lin, bases, 6)
    assert fold.inner.weight.shape == (5, 3 + 5 + 1 + 2)
    mask = (ids != PAD_ID).unsqueeze(-1).double()
    pooled = (low(ids) * mask).sum(2) / mask.sum(2).clamp_min(1.0)  # mean-pooled multi-hot fields
    pooled[0, 1] = 0.0  # an empty list pools to zero
    x = torch.cat([pooled.flatten(1), torch.randn(64, 2, dtype=torch.float64)], 1)
    torch.testing.assert_close(fold(x), lin(x), atol=1e-10, rtol=0)
    torch.testing.assert_close(fold.effective_weight() @ x.T, lin.weight @ x.T, atol=1e-10, rtol=0)
    assert sum(p.numel() for p in fold.parameters()) == 5 * 11 + 5 + 3 * 5 * 6  # inner + bias + bases


#: one setting per registered method (and the variants worth their own check); a new method adds its line here
CONTRACT_SETTINGS = {
    "svd": dict(embedding_rank=3, mlp_rank=4, targets=("embedding", "mlp")),
    "afm": dict(embedding_rank=3, mlp_rank=4, targets=("embedding", "mlp")),
    "afm-int8-fold": dict(method="afm", embedding_rank=3, targets=("embedding",), code_dtype="int8", fold=True),
    "afm-budget-loss-lstsq": dict(method="afm", target_ratio=3.0, allocator="loss", code_dtype="int8",
                                  calibration="sequential", correction="lstsq", targets=("embedding", "mlp", "other")),
    "tt": dict(embedding_rank=2),
    "tt-scratch": dict(method="tt", embedding_rank=2, from_scratch=True),
    "int8": dict(targets=("embedding", "mlp", "other")),
    "qr": dict(options={"collisions": 4}),
    "qr-scratch": dict(method="qr", options={"collisions": 4}, from_scratch=True),
    "tt+afm": dict(method="tt", mlp_method="afm", embedding_rank=2, mlp_rank=4),
}


class BatchInputs(nn.Module):
    """A zoo model with tensor inputs (what torch.onnx.export takes)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, cat, num, multi):
        return self.model({"cat": cat, "num": num, "multi": multi})


def test_embedding_method_then_linear_method_is_the_two_calls_in_sequence():
    """tt + afm: the TT embeddings first, then AFM on the Linears measured on the TT model; a target_ratio is the
    whole model's (the TT bytes fixed) and holds within 2%; the same as the two calls by hand."""
    from lowrank_ctr.models import build_model

    schema = toy_schema(multihot=True, vocab=(400, 150, 300, 5))

    def fresh():
        torch.manual_seed(0)
        return build_model("deepfm", schema, embedding_dim=8, mlp=[256, 256]).eval()

    data = batches(schema, 4)
    model = fresh()
    base_bytes = model_size(model)["total"]["bytes"]
    report = compress(model, "tt", data, embedding_rank=2, mlp_method="afm", mlp_rank=5)
    by_hand = fresh()
    compress(by_hand, "tt", data, embedding_rank=2, targets=["embedding"])
    compress(by_hand, "afm", data, mlp_rank=5, targets=["mlp"])
    torch.testing.assert_close(predict(model, data), predict(by_hand, data), atol=0, rtol=0)
    assert report.method == "tt+afm" and report.base["total"]["bytes"] == base_bytes
    kinds = {l["name"]: l["method"] for l in report.layers}
    assert kinds["embedding.table"] == "tt" and kinds["mlp.net.0"] == "afm"
    assert report.ratio == pytest.approx(base_bytes / model_size(model)["total"]["bytes"])

    for ratio in (3.0, 6.0):
        m = fresh()
        r = compress(m, "tt", data, embedding_rank=2, mlp_method="afm", target_ratio=ratio)
        assert ratio <= r.ratio <= ratio * 1.02, (ratio, r.ratio)
        assert any(l["method"] == "afm" for l in r.layers)  # the budget needed the MLP too
        assert "linear.table" in {l["name"] for l in r.layers}  # the first-order table TT left is the budget's too
    from lowrank_ctr.compression import check_config

    for ratio in (6.0, 200.0):  # checked before any training, on the untrained model: the same verdict
        cfg = {"method": "tt", "embedding_rank": 2, "mlp_method": "afm", "target_ratio": ratio}
        if ratio < 100:
            check_config(fresh(), cfg)
            continue
        with pytest.raises(ValueError, match="target_ratio"):
            check_config(fresh(), cfg)
        with pytest.raises(ValueError, match="target_ratio"):
            compress(fresh(), "tt", data, embedding_rank=2, mlp_method="afm", target_ratio=ratio)
    with pytest.raises(ValueError, match="only embeddings"):
        compress(fresh(), "afm", data, embedding_rank=2, mlp_method="svd", mlp_rank=4)
    with pytest.raises(ValueError, match="fold"):
        compress(fresh(), "tt", data, embedding_rank=2, mlp_method="afm", mlp_rank=4, fold=True)


def test_embedding_method_from_scratch_then_linear_stage_on_the_trained_model():
    """from_scratch + mlp_method: the first call builds only the TT structure (random init, Linears untouched);
    after training, compress_linear_stage runs AFM on that model's Linears, the budget against the ORIGINAL size."""
    from lowrank_ctr.compression import compress_linear_stage
    from lowrank_ctr.models import build_model

    schema = toy_schema(multihot=True, vocab=(400, 150, 300, 5))
    torch.manual_seed(0)
    model = build_model("deepfm", schema, embedding_dim=8, mlp=[256, 256]).eval()
    data = batches(schema, 4)
    original = model_size(model)["total"]["bytes"]
    cfg = {"method": "tt", "embedding_rank": 2, "mlp_method": "afm", "target_ratio": 4.0, "from_scratch": True}
    first = compress_from_config(model, cfg, data)
    assert first.method == "tt" and first.policy["mlp_method"] == "afm"
    assert {l["method"] for l in first.layers if l.get("replaced")} == {"tt"}
    assert isinstance(model.mlp.net[0], torch.nn.Linear)  # the Linear stage waits for the trained structure
    with torch.no_grad():  # "training": the structure's weights move away from their initialisation
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    trained = predict(model, data)
    report = compress_linear_stage(model, cfg, data, first)
    assert report.method == "tt+afm" and report.policy["from_scratch"] is True
    assert report.base["total"]["bytes"] == original
    assert report.ratio == pytest.approx(original / model_size(model)["total"]["bytes"])
    assert 4.0 <= report.ratio <= 4.0 * 1.02, report.ratio
    assert {l["name"] for l in report.layers if l["method"] == "afm"} >= {"mlp.net.0"}
    assert [m["name"] for m in report.spec["modules"]][: len(first.spec["modules"])] == \
        [m["name"] for m in first.spec["modules"]]
    # the Linear stage approximates the TRAINED model (calibrated on it), not the initialisation
    err = (predict(model, data) - trained).pow(2).mean() / trained.var()
    assert err < 0.5, err


def test_every_registered_method_has_a_contract_setting_and_a_config():
    from lowrank_ctr.compression import method_names
    from lowrank_ctr.config import CONF_DIR

    for name in method_names():
        assert name in CONTRACT_SETTINGS or name == "none", f"add a CONTRACT_SETTINGS entry for method {name!r}"
        assert (Path(CONF_DIR) / "compression" / f"{name}.yaml").exists(), f"conf/compression/{name}.yaml missing"


@pytest.mark.parametrize("setting", sorted(CONTRACT_SETTINGS))
def test_method_registry_contract(tmp_path, setting):
    """Every registered method: compresses a model, names itself for reports, its spec rebuilds the compressed
    structure with identical predictions, and the compressed model exports to ONNX with the same outputs."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import io
    import warnings

    from lowrank_ctr.compression import get_method

    kw = dict(CONTRACT_SETTINGS[setting])
    name = kw.pop("method", setting)
    method = get_method(name)
    assert method.label and method.color.startswith("#") and isinstance(method.setting({}, ""), str)
    from lowrank_ctr.models import build_model

    schema = toy_schema(multihot=True, vocab=(400, 150, 300, 5))
    torch.manual_seed(0)
    model = build_model("deepfm", schema, embedding_dim=8, mlp=[32, 32]).eval()
    data = batches(schema, 4)
    report = compress(model, name, data, **kw)
    assert report.ratio > 1.0 and report.method == "+".join([name, *([kw["mlp_method"]] if "mlp_method" in kw else [])])
    assert isinstance(method.setting(report.policy, ""), str)
    after = predict(model, data)
    assert torch.isfinite(after).all()
    spec = json.loads(json.dumps(report.spec))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    fresh = build_model("deepfm", schema, embedding_dim=8, mlp=[32, 32]).eval()
    apply_spec(fresh, spec)
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    torch.testing.assert_close(predict(fresh, data), after, atol=0, rtol=0)

    wrapped = BatchInputs(fresh.eval())
    b = data[0]
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, (b["cat"], b["num"], b["multi"]), f, input_names=["cat", "num", "multi"],
                          output_names=["logit"], dynamo=False, opset_version=17,
                          dynamic_axes={k: {0: "batch"} for k in ("cat", "num", "multi", "logit")})
    other = random_batch(schema, 37, torch.Generator().manual_seed(11))  # other size, other ids
    got = ort.InferenceSession(f.getvalue()).run(None, {k: other[k].numpy() for k in ("cat", "num", "multi")})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), wrapped(other["cat"], other["num"], other["multi"]),
                                   atol=1e-4, rtol=1e-4)


def test_shared_module_replaced_under_every_name():
    schema = toy_schema(multihot=False, vocab=(400, 25, 300, 5))
    model = Toy(schema)
    model.alias = model.embedding.table  # e.g. a second branch holding the same table
    report = compress(model, "svd", embedding_rank=2, targets="embedding")
    assert isinstance(model.alias, LowRankFieldEmbedding) and model.alias is model.embedding.table
    assert report.compressed["embedding"]["bytes"] < report.base["embedding"]["bytes"]


# ----------------------------------------------------------------------------------------------------------------
# int8 codes, rank 0, first-order tables
# ----------------------------------------------------------------------------------------------------------------
def test_int8_codes_within_their_quantisation_bound():
    torch.manual_seed(0)
    emb = FieldEmbedding([300, 40, 7], 8, init_std=1.0).double()
    ids = multihot_ids(emb.vocab_sizes, 200, 3)
    stats = collect_output_stats(emb, {"t": emb}, [ids])[0]["t"]
    ranks = [3, 8, 0]
    flt, _ = afm_embedding(emb, ranks, stats)
    q, info = afm_embedding(emb, ranks, stats, code_dtype="int8")
    assert q.codes.dtype == torch.int8 and not q.codes.requires_grad and info["code_dtype"] == "int8"
    assert q.rank_grouped and flt.rank_grouped  # compression writes the rank-grouped layout
    for i, k in enumerate(ranks):
        exact, approx = flt.field_codes(i), q.field_codes(i)
        scale = exact.abs().amax(0) / 127 if k else torch.zeros(0, dtype=torch.float64)
        assert torch.all((approx - exact).abs() <= scale / 2 + 1e-12)  # round to nearest: half a step at most
        torch.testing.assert_close(q.code_scale[i, :k].double(), scale, rtol=1e-6, atol=0)
    # the lookup uses exactly the dequantised codes
    torch.testing.assert_close(q(ids[:, :, 0])[:, 0], q.field_table(0)[ids[:, 0, 0]])
    # one byte per code, float projection / bias / scales
    assert info["bytes_after"] == LowRankFieldEmbedding.num_bytes(emb.vocab_sizes, 8, ranks, "int8", 8)
    assert info["bytes_after"] == 300 * 3 + 40 * 8 + 3 * 8 * 4 + 3 * 9 * 8 * 8


def _mixed_rank_embedding(code_dtype: str, rank_grouped: bool) -> LowRankFieldEmbedding:
    """Mixed ranks: rank 0 in the middle and as the LAST field, full rank, ranks below the padded width, and two
    fields sharing a rank (one group)."""
    torch.manual_seed(0)
    vocab, ranks = [50, 9, 30, 6, 12, 20], [3, 0, 8, 1, 0, 3]
    emb = LowRankFieldEmbedding(vocab, 8, ranks, code_dtype=code_dtype, rank_grouped=rank_grouped)
    return emb.set_factors([torch.randn(v, k) for v, k in zip(vocab, ranks)], [torch.randn(k, 8) for k in ranks],
                           [torch.randn(8) for _ in vocab])


@pytest.mark.parametrize("rank_grouped", [False, True])
@pytest.mark.parametrize("code_dtype", ["float32", "int8"])
def test_every_lookup_path_returns_the_reconstructed_rows(code_dtype, rank_grouped):
    """The batched small-batch path, the per-field loop and the rank-grouped path return the same rows, and those are
    the reconstructed table rows; forward takes the batched path up to ``batched_lookup_max_rows`` rows."""
    emb = _mixed_rank_embedding(code_dtype, rank_grouped)
    ids = torch.stack([torch.randint(0, v, (40,)) for v in emb.vocab_sizes], 1)
    per_field = emb._forward_per_field(ids)
    for i in range(emb.num_fields):
        torch.testing.assert_close(per_field[:, i], emb.field_table(i)[ids[:, i]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb._forward_batched(ids), per_field, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb(ids[:1]), per_field[:1], rtol=1e-5, atol=1e-5)
    if rank_grouped:
        torch.testing.assert_close(emb._forward_rank_grouped(ids), per_field, rtol=1e-5, atol=1e-5)
    calls = []
    emb._forward_batched = lambda x: calls.append(len(x)) or per_field[: len(x)]  # which path forward takes
    emb(ids[:3])
    most = emb.batched_lookup_max_rows if rank_grouped else emb.batched_lookup_max_rows_field_order
    emb(torch.cat([ids] * (most // len(ids) + 1)))  # more rows: another path
    assert calls == [3]


def test_rank_grouped_layout_orders_segments_by_rank_and_old_specs_keep_field_order():
    """The same factors in both layouts give the same rows from differently ordered flat codes; a spec without
    ``rank_grouped`` (a checkpoint from before the grouped layout) rebuilds the field order it was written in."""
    field, grouped = _mixed_rank_embedding("float32", False), _mixed_rank_embedding("float32", True)
    assert not torch.equal(field.codes, grouped.codes) and torch.equal(field.codes.sort()[0], grouped.codes.sort()[0])
    ranks = grouped.ranks
    stored = sorted((i for i in range(len(ranks)) if ranks[i]), key=lambda i: grouped.code_starts[i])
    assert [ranks[i] for i in stored] == sorted(r for r in ranks if r)  # segments in rank order (rank 0: empty)
    ids = torch.stack([torch.randint(0, v, (700,)) for v in field.vocab_sizes], 1)  # > 512 rows: never batched
    torch.testing.assert_close(grouped(ids), field(ids), rtol=1e-5, atol=1e-5)
    old_spec = {k: v for k, v in field.spec_args().items() if k != "rank_grouped"}
    rebuilt = LowRankFieldEmbedding(**old_spec)
    rebuilt.load_state_dict(field.state_dict())
    torch.testing.assert_close(rebuilt(ids), field(ids))
    assert LowRankFieldEmbedding(**grouped.spec_args()).rank_grouped
    for code_dtype in ("float32", "int8"):  # an old-layout model re-laid out: identical rows
        old = _mixed_rank_embedding(code_dtype, False)
        copy = old.rank_grouped_copy()
        assert copy.rank_grouped and not torch.equal(copy.codes, old.codes)
        torch.testing.assert_close(copy(ids), old(ids))


def test_rank_zero_field_is_its_mean_and_first_order_table_becomes_int8():
    schema = toy_schema(multihot=False, vocab=(400, 25, 300, 5))
    model = trained_like(Toy(schema), schema)
    data = batches(schema, 4)
    report = compress(model, "afm", data, embedding_rank=2, targets=("embedding",), code_dtype="int8")
    lin = next(l for l in report.layers if l["name"] == "linear.table")
    assert lin["replaced"] and lin["field_ranks"] == [1, 1, 1, 1]  # dim 1: the rank only changes storage
    assert lin["bytes_after"] < lin["bytes_before"] / 3  # int8 codes instead of float32 rows
    fresh = Toy(schema)
    stats = collect_output_stats(fresh, {"t": fresh.linear.table}, data)[0]["t"]
    zero, _ = afm_embedding(fresh.linear.table, [0, 0, 0, 0], stats)
    ids = data[0]["cat"]
    torch.testing.assert_close(zero(ids).squeeze(-1), stats.mean().float().T.expand(len(ids), 4))


# ----------------------------------------------------------------------------------------------------------------
# Sequential calibration + least-squares correction; loss-aware budget
# ----------------------------------------------------------------------------------------------------------------
def _logit_mse(model, reference, data):
    return float(((predict(model, data) - predict(reference, data)) ** 2).mean())


def test_sequential_lstsq_lowers_logit_error_against_oneshot():
    import copy

    schema = toy_schema(vocab=(400, 150, 300, 5))
    base = trained_like(Toy(schema, hidden=(64, 32)), schema)
    calib, held_out = batches(schema, 16, 128, seed=3), batches(schema, 4, 128, seed=4)
    kw = dict(embedding_rank=2, mlp_rank=6, other_rank=8, targets=("embedding", "mlp", "other"))
    oneshot, seq = copy.deepcopy(base), copy.deepcopy(base)
    compress(oneshot, "afm", calib, **kw)
    report = compress(seq, "afm", calib, calibration="sequential", correction="lstsq", **kw)
    assert report.spec == compress(copy.deepcopy(base), "afm", calib, **kw).spec  # same structure, other weights
    assert _logit_mse(seq, base, held_out) < 0.9 * _logit_mse(oneshot, base, held_out)
    # the refit layers kept their type: an uncompressed Linear downstream of the embedding was refit in place
    assert isinstance(seq.mlp.net[6], nn.Linear) and not torch.equal(seq.mlp.net[6].weight, base.mlp.net[6].weight)


def test_least_squares_refit_recovers_a_linear_exactly():
    from lowrank_ctr.compression.calibrate import LinearMoments

    torch.manual_seed(0)
    x = torch.randn(500, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64) + 3.0
    w, b = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    m = LinearMoments(6, 4)
    m.update(x[:250], x[:250] @ w.T + b)
    m.update(x[250:], x[250:] @ w.T + b)
    w_fit, b_fit = m.least_squares(ridge=0.0)
    torch.testing.assert_close(w_fit, w, atol=1e-8, rtol=0)
    torch.testing.assert_close(b_fit, b, atol=1e-8, rtol=0)
    out = m.output_stats(w, b)  # statistics of W x + b from input moments alone
    torch.testing.assert_close(out.covariance()[0], torch.cov((x @ w.T + b).T, correction=0), atol=1e-8, rtol=0)


def test_budget_allocator_prefers_the_layer_cheaper_in_loss_per_byte():
    """Two Linears of equal size and equal output variance; only the second one's output matters for the loss.
    The loss allocator spends the budget on the second; the variance allocator cannot tell them apart."""
    from lowrank_ctr.compression.ranks import allocate_budget, linear_budget_layer

    var = torch.linspace(1.0, 0.1, 128)
    layers_loss = [linear_budget_layer("a", var * 1e-6, 256, 128, 4), linear_budget_layer("b", var, 256, 128, 4)]
    dense = sum(l.dense_bytes for l in layers_loss)
    chosen, used = allocate_budget(layers_loss, dense, 3.0, {})
    assert chosen["b"] > chosen["a"] and chosen["a"] == 1
    budget = dense / 3.0
    assert 0.98 * budget <= used <= budget  # spends the budget within 2%
    layers_var = [linear_budget_layer(n, var / var.sum(), 256, 128, 4) for n in "ab"]
    chosen, _ = allocate_budget(layers_var, dense, 3.0, {})
    assert abs(chosen["a"] - chosen["b"]) <= 1


def test_loss_allocator_on_a_model_hits_the_budget_and_reports_loss_weights():
    schema = toy_schema(vocab=(400, 150, 300, 5))
    model = trained_like(Toy(schema, hidden=(64, 32)), schema)
    data = batches(schema, 8, 128)
    report = compress(model, "afm", data, target_ratio=4.0, allocator="loss", code_dtype="int8",
                      targets=("embedding", "mlp", "other"))
    assert 4.0 <= report.ratio <= 4.0 / 0.98
    assert report.policy["predicted_bytes"] == report.compressed["total"]["bytes"]
    assert torch.isfinite(predict(model, data)).all()
    fresh = trained_like(Toy(schema, hidden=(64, 32)), schema)
    stats = collect_output_stats(fresh, {"m": fresh.mlp.net[0]}, data, gradients=True)[0]["m"]
    assert all(p.grad is None and p.requires_grad for p in fresh.parameters())  # no parameter gradient left
    loss = stats.component_loss()
    evals, evecs = stats.spectrum()
    fisher = stats.fisher()[0]
    for k in (0, 5, 63):  # 0.5 * lam_k * u_k^T F u_k, written out
        u = evecs[0, :, k]
        assert float(loss[0, k]) == pytest.approx(0.5 * float(evals[0, k]) * float(u @ fisher @ u), rel=1e-9, abs=1e-15)
    # F is the mean outer product of per-sample loss gradients at the output: check it by autograd, one sample at a time
    b = {k: v[:5] for k, v in data[0].items()}
    grads = []
    for i in range(5):
        one = {k: v[i : i + 1] for k, v in b.items()}
        out = {}
        h = fresh.mlp.net[0].register_forward_hook(lambda _m, _i, o: out.setdefault("y", o.retain_grad() or o))
        nn.functional.binary_cross_entropy_with_logits(fresh(one), one["label"]).backward()
        h.remove()
        grads.append(out["y"].grad[0].double())
    small = collect_output_stats(fresh, {"m": fresh.mlp.net[0]}, [b], gradients=True)[0]["m"]
    g = torch.stack(grads)
    ref = g.T @ g / 5
    torch.testing.assert_close(small.fisher()[0], ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_readme_new_method_example(tmp_path):
    """The README's worked example of a new method, run as written: it registers, compresses a zoo model, is
    rebuilt from its spec and is checked by config validation like a built-in method."""
    import re
    import types

    from lowrank_ctr.compression import METHODS
    from lowrank_ctr.config import CONF_DIR
    from lowrank_ctr.models import build_model
    from lowrank_ctr.validate import problems
    from omegaconf import OmegaConf

    readme = (Path(CONF_DIR).parent / "README.md").read_text()
    section = readme.split("### How to extend: a new compression method", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n# src/lowrank_ctr/compression/methods/fp16.py\n(.*?)```", section, re.S).group(1)
    yaml_text = re.search(r"```yaml\n# conf/compression/fp16.yaml\n(.*?)```", section, re.S).group(1)
    module = types.ModuleType("lowrank_ctr.compression.methods.fp16")
    try:
        exec(compile(code, "README fp16 example", "exec"), module.__dict__)
        assert "fp16" in METHODS
        schema = toy_schema(multihot=True, vocab=(400, 150, 300, 5))
        model = build_model("deepfm", schema, embedding_dim=8, mlp=[32, 32]).eval()
        data = batches(schema, 2)
        before = predict(model, data)
        report = compress(model, "fp16", data)
        table = next(l for l in report.layers if l["name"] == "embedding.table")
        assert table["replaced"] and table["bytes_after"] * 2 == table["bytes_before"]  # float16 rows
        torch.testing.assert_close(predict(model, data), before, atol=1e-3, rtol=1e-3)
        fresh = build_model("deepfm", schema, embedding_dim=8, mlp=[32, 32]).eval()
        apply_spec(fresh, json.loads(json.dumps(report.spec)))
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(predict(fresh, data), predict(model, data), atol=0, rtol=0)
        comp = OmegaConf.merge(OmegaConf.load(Path(CONF_DIR) / "compression" / "none.yaml"),
                               OmegaConf.create(yaml_text.replace("defaults:\n  - none\n  - _self_\n", "")))
        assert problems(OmegaConf.create({"compression": comp})) == []
        comp.targets = ["embedding", "mlp"]
        assert "compression=fp16 compresses ['embedding'] only" in problems(OmegaConf.create({"compression": comp}))[0]
    finally:
        METHODS.pop("fp16", None)
