"""Model zoo tests: every registered model on several schema shapes, layer math, errors, configs.

Tiny sizes throughout (embedding_dim=4, MLPs [16, 16]) so the file runs in seconds on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lowrank_ctr.data.batch import random_batch
from lowrank_ctr.data.schema import PAD_ID, FieldSpec, Schema
from lowrank_ctr.models import (
    CIN,
    MLP,
    MODELS,
    BilinearInteraction,
    CrossNetwork,
    CrossNetworkV2,
    FactorizationMachine,
    FeatureEmbedding,
    FieldEmbedding,
    LinearTerm,
    build_model,
    list_models,
    model_arguments,
    pooled_lookup,
)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"
DIM = 4
TINY_MLP = {"mlp": [16, 16]}
TINY: dict[str, dict] = {
    "lr": {},
    "fm": {},
    "dnn": TINY_MLP,
    "widedeep": TINY_MLP,
    "deepfm": TINY_MLP,
    "dcn": {**TINY_MLP, "cross_layers": 2},
    "dcnv2": {**TINY_MLP, "cross_layers": 2},
    "xdeepfm": {**TINY_MLP, "cin_layers": [8, 8]},
    "autoint": {**TINY_MLP, "attention_layers": 2, "num_heads": 2, "attention_dim": 8},
    "fibinet": TINY_MLP,
    "finalmlp": {"mlp1": [16, 16], "mlp2": [16], "fs_hidden": [16], "num_heads": 2},
}


def _num(n: int) -> list[FieldSpec]:
    return [FieldSpec(f"I{i}", "numeric") for i in range(n)]


def _cat(sizes: list[int], prefix: str = "C") -> list[FieldSpec]:
    return [FieldSpec(f"{prefix}{i}", "categorical", vocab_size=v) for i, v in enumerate(sizes)]


SCHEMAS = {
    "criteo_like": Schema("criteo_like", _num(3) + _cat([10, 20, 7, 50])),
    "movielens_like": Schema("movielens_like", _cat([30, 40, 4], "U")
                             + [FieldSpec("genres", "multihot", vocab_size=12, max_len=4)]),
    "categorical_only": Schema("categorical_only", _cat([9, 15, 6])),
    "numeric_multihot": Schema("numeric_multihot", _num(2) + [
        FieldSpec("tags", "multihot", vocab_size=20, max_len=5),
        FieldSpec("genres", "multihot", vocab_size=8, max_len=3),
    ]),
}


def tiny_model(name: str, schema: Schema, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, schema, embedding_dim=DIM, **{**TINY[name], **overrides})


def learnable_batch(schema: Schema, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Labels from a simple rule on the first available field, so every model (even LR) can fit them."""
    batch = random_batch(schema, batch_size, torch.Generator().manual_seed(1))
    if batch["cat"].shape[1]:
        label = batch["cat"][:, 0] % 2 == 0
    elif batch["num"].shape[1]:
        label = batch["num"][:, 0] > 0
    else:
        label = batch["multi"][:, 0, 0] % 2 == 0
    batch["label"] = label.float()
    return batch


def test_tiny_settings_cover_registry() -> None:
    assert sorted(TINY) == list_models()


@pytest.mark.parametrize("schema_name", sorted(SCHEMAS))
@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_shape_and_finite(name: str, schema_name: str) -> None:
    schema = SCHEMAS[schema_name]
    model = tiny_model(name, schema)
    assert model.model_name == name
    out = model(random_batch(schema, 32))
    assert out.shape == (32,)
    assert torch.isfinite(out).all()
    assert model(random_batch(schema, 1)).shape == (1,)


@pytest.mark.parametrize("schema_name", ["criteo_like", "movielens_like", "categorical_only"])
@pytest.mark.parametrize("name", sorted(TINY))
def test_loss_decreases(name: str, schema_name: str) -> None:
    schema = SCHEMAS[schema_name]
    model = tiny_model(name, schema)
    batch = learnable_batch(schema)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(30):
        loss = nn.functional.binary_cross_entropy_with_logits(model(batch), batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("name", sorted(TINY))
def test_dense_numeric_mode(name: str) -> None:
    schema = SCHEMAS["criteo_like"]
    model = tiny_model(name, schema, **({} if name == "lr" else {"numeric": "dense"}))
    if name != "lr":
        assert model.embedding.dense_dim == 3 and model.embedding.num_fields == 4
    assert model(random_batch(schema, 8)).shape == (8,)


@pytest.mark.parametrize("name", sorted(TINY))
def test_compression_contract(name: str) -> None:
    """compression/ finds the embedding at ``embedding.table`` and DNN Linears inside MLP modules."""
    model = tiny_model(name, SCHEMAS["criteo_like"])
    if name == "lr":
        assert not hasattr(model, "embedding")
        return
    assert isinstance(model.embedding, FeatureEmbedding)
    assert isinstance(model.embedding.table, FieldEmbedding)
    assert "embedding.table.weight" in dict(model.named_parameters())
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    assert bool(mlps) == (name != "fm")
    for m in mlps:
        assert any(isinstance(c, nn.Linear) for c in m.net)


def test_feature_embedding_shapes() -> None:
    schema = Schema("mixed", _num(2) + _cat([5, 6]) + [FieldSpec("m", "multihot", vocab_size=7, max_len=3)])
    batch = random_batch(schema, 5)
    emb, dense = FeatureEmbedding(schema, DIM)(batch)
    assert emb.shape == (5, 5, DIM) and dense.shape == (5, 0)
    fe = FeatureEmbedding(schema, DIM, numeric="dense")
    emb, dense = fe(batch)
    assert emb.shape == (5, 3, DIM) and torch.equal(dense, batch["num"])
    assert fe.num_fields == 3 and fe.dense_dim == 2 and fe.flat_dim == 3 * DIM + 2
    assert fe.field_names == ["C0", "C1", "m"]
    with pytest.raises(ValueError, match="numeric"):
        FeatureEmbedding(schema, DIM, numeric="bogus")


def test_pooled_lookup_is_masked_mean() -> None:
    schema = SCHEMAS["movielens_like"]
    table = FieldEmbedding(schema.sparse_vocab_sizes, DIM)
    batch = random_batch(schema, 16)
    out = pooled_lookup(table, batch["cat"], batch["multi"])
    assert out.shape == (16, 4, DIM)
    for i in range(3):
        assert torch.equal(out[:, i], table.field_table(i)[batch["cat"][:, i]])
    ids = batch["multi"][:, 0]
    rows = table.field_table(3)[ids]  # (B, L, d)
    mask = (ids != PAD_ID).unsqueeze(-1).float()
    assert torch.allclose(out[:, 3], (rows * mask).sum(1) / mask.sum(1))


@pytest.mark.parametrize("name", ["deepfm", "autoint", "finalmlp", "lr"])
def test_multihot_padding_row_is_ignored(name: str) -> None:
    """A compressed table does not keep the PAD row zero; pooling must not depend on it."""
    schema = SCHEMAS["numeric_multihot"] if name == "lr" else SCHEMAS["movielens_like"]
    model = tiny_model(name, schema).eval()
    batch = random_batch(schema, 16)
    assert (batch["multi"] == PAD_ID).any()
    before = model(batch)
    tables = [m for m in model.modules() if isinstance(m, FieldEmbedding)]
    with torch.no_grad():
        for table in tables:
            for i, v in enumerate(table.vocab_sizes):
                table.field_table(i)[PAD_ID] = torch.randn(table.dim) * 10
    assert torch.allclose(model(batch), before, atol=1e-6)


class _ShiftedTable(nn.Module):
    """Stand-in for a compressed table: same call signature, every row (PAD included) reconstructed non-zero."""

    def __init__(self, table: FieldEmbedding) -> None:
        super().__init__()
        self.inner, self.vocab_sizes, self.dim = table, table.vocab_sizes, table.dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner(ids) + 1.0


@pytest.mark.parametrize("name", ["deepfm", "xdeepfm", "fibinet"])
def test_embedding_table_is_replaceable(name: str) -> None:
    schema = SCHEMAS["movielens_like"]
    model = tiny_model(name, schema).eval()
    batch = random_batch(schema, 8)
    emb_before, _ = model.embedding(batch)
    model.embedding.table = _ShiftedTable(model.embedding.table)
    emb_after, _ = model.embedding(batch)
    assert torch.allclose(emb_after, emb_before + 1.0, atol=1e-6)  # masked mean: padding never leaks in
    assert torch.isfinite(model(batch)).all()


@pytest.mark.parametrize("dim", [1, 3])
@pytest.mark.parametrize("shape", [(5, 4), (5, 4, 2)])
def test_field_embedding_lookup_is_an_embedding_lookup(dim: int, shape: tuple) -> None:
    """Inference lookups (a scalar gather for one-column tables) give F.embedding's rows, for (B, F) and multi-hot
    (B, F, L) ids."""
    from lowrank_ctr.models.layers import FieldEmbedding

    torch.manual_seed(0)
    table = FieldEmbedding([7, 3, 5, 9], dim)
    ids = torch.stack([torch.randint(0, v, shape[:1] + shape[2:]) for v in table.vocab_sizes], dim=1)
    with torch.no_grad():
        out = table(ids)
    assert out.shape == (*shape, dim)
    assert torch.equal(out, torch.nn.functional.embedding(table.flat_ids(ids), table.weight))


def test_fm_matches_pairwise_dot_products() -> None:
    x = torch.randn(6, 5, 3, dtype=torch.float64)
    brute = sum((x[:, i] * x[:, j]).sum(-1) for i in range(5) for j in range(i + 1, 5))
    assert torch.allclose(FactorizationMachine()(x), brute)
    assert torch.allclose(FactorizationMachine(reduce_sum=False)(x).sum(-1), brute)


@pytest.mark.parametrize("reduce_sum", [True, False])
def test_fm_gradient_matches_autograd_of_pairwise_products(reduce_sum: bool) -> None:
    """The FM's written-out backward (training path) against autograd through the brute-force pairwise sum."""
    x = torch.randn(6, 5, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 1 if reduce_sum else 3, dtype=torch.float64).squeeze(-1)
    fm = FactorizationMachine(reduce_sum=reduce_sum)
    (grad,) = torch.autograd.grad((fm(x) * weight).sum(), x)
    pairs = sum(x[:, i] * x[:, j] for i in range(5) for j in range(i + 1, 5))  # (B, d)
    brute = pairs.sum(-1) if reduce_sum else pairs
    (expected,) = torch.autograd.grad((brute * weight).sum(), x)
    assert torch.allclose(grad, expected)
    assert torch.autograd.gradcheck(lambda t: fm(t), (x.detach().requires_grad_(),))


def test_cross_networks_match_formulas() -> None:
    torch.manual_seed(0)
    x0 = torch.randn(4, 6)
    v1 = CrossNetwork(6, 2)
    with torch.no_grad():
        v1.bias.normal_()
    x = x0
    for w, b in zip(v1.weight, v1.bias):
        x = x0 * (x * w).sum(-1, keepdim=True) + b + x
    assert torch.allclose(v1(x0), x, atol=1e-6)
    v2 = CrossNetworkV2(6, 2)
    x = x0
    for lin in v2.layers:
        x = x0 * (x @ lin.weight.T + lin.bias) + x
    assert torch.allclose(v2(x0), x, atol=1e-6)


def test_cin_and_bilinear() -> None:
    x = torch.randn(3, 5, DIM)
    cin = CIN(5, [6, 4], split_half=True)
    assert cin.out_dim == 3 + 4 and cin(x).shape == (3, 7)
    assert CIN(5, [6, 4], split_half=False)(x).shape == (3, 10)
    with pytest.raises(ValueError, match="even"):
        CIN(5, [5, 4])
    # p_ij = (v_i W) * v_j over i < j in triu order; W shared / per left field i / per pair
    pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    for kind in ("field_all", "field_each", "field_interaction"):
        bi = BilinearInteraction(5, DIM, kind)
        ws = {"field_all": lambda: [bi.weight[0]] * len(pairs), "field_each": lambda: [bi.weight[i] for i, _ in pairs],
              "field_interaction": lambda: list(bi.weight)}[kind]()
        expected = torch.stack([(x[:, i] @ w) * x[:, j] for (i, j), w in zip(pairs, ws)], dim=1)
        assert bi.num_pairs == len(pairs)
        assert torch.allclose(bi(x), expected, atol=1e-6), kind
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.allclose(bi(x).float(), expected, atol=0.05, rtol=0.05), kind


def _cin_by_formula(x0: torch.Tensor, cin: CIN) -> torch.Tensor:
    """x^l_h = act(sum_ij W^l_h[i, j] x0_i * x^{l-1}_j + b_h) per embedding dim, sum-pooled; split_half as in the paper."""
    h, outs = x0, []
    for i, layer in enumerate(cin.layers):
        w = layer.weight.view(layer.out_features, x0.shape[1], h.shape[1])
        z = torch.einsum("hij,bid,bjd->bhd", w, x0, h) + layer.bias.view(1, -1, 1)
        z = cin.activation(z)
        if cin.split_half and i < len(cin.layers) - 1:
            h, keep = torch.chunk(z, 2, dim=1)
        else:
            h = keep = z
        outs.append(keep.sum(2))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("split_half", [True, False])
def test_cin_matches_its_formula_in_value_and_gradient(split_half: bool) -> None:
    torch.manual_seed(0)
    cin = CIN(5, [6, 4], split_half=split_half, activation="tanh").double()
    x = torch.randn(3, 5, DIM, dtype=torch.float64, requires_grad=True)
    out = cin(x)  # training path: the custom outer-product backward
    expected = _cin_by_formula(x, cin)
    torch.testing.assert_close(out, expected)
    upstream = torch.randn_like(out)
    got = torch.autograd.grad((out * upstream).sum(), [x, *cin.parameters()])
    want = torch.autograd.grad((expected * upstream).sum(), [x, *cin.parameters()])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    with torch.no_grad():  # inference path (no custom Function), e.g. for export
        torch.testing.assert_close(cin(x), expected)


def test_cin_outer_product_linear_gradcheck() -> None:
    from lowrank_ctr.models.layers import _OuterProductLinear

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda *a: _OuterProductLinear.apply(*a, torch.float64), args)


@pytest.mark.parametrize("name", sorted(TINY))
def test_logits_stay_float32_under_bf16_autocast(name: str) -> None:
    """AUC ranks logits: bf16 would round them to 8 bits of mantissa (ties). Output layers compute in float32."""
    schema = SCHEMAS["criteo_like"]
    model = tiny_model(name, schema).eval()
    batch = random_batch(schema, 32)
    with torch.no_grad():
        full = model(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(batch)
    assert mixed.dtype == torch.float32
    assert torch.allclose(mixed, full, atol=0.05, rtol=0.05)  # same model, bf16 inner layers


def test_linear_term_uses_every_field() -> None:
    schema = Schema("mixed", _num(2) + _cat([5]) + [FieldSpec("m", "multihot", vocab_size=7, max_len=3)])
    lt = LinearTerm(schema)
    with torch.no_grad():
        lt.weight.fill_(1.0)
        lt.bias.fill_(0.5)
        lt.table.weight.zero_()
    batch = random_batch(schema, 4)
    assert torch.allclose(lt(batch), batch["num"].sum(1) + 0.5)


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(ValueError) as err:
        build_model("deepfmm", SCHEMAS["criteo_like"])
    for name in list_models():
        assert name in str(err.value)


@pytest.mark.parametrize(("name", "kwargs", "exc", "match"), [
    ("deepfm", {"embedding_dim": 0}, ValueError, "embedding_dim"),
    ("lr", {"embedding_dim": -1}, ValueError, "embedding_dim"),
    ("dnn", {"mlp": [16, -4]}, ValueError, "mlp"),
    ("dnn", {"mlp": "400"}, TypeError, "mlp"),
    ("dcn", {"cross_layers": 0}, ValueError, "cross_layers"),
    ("dcnv2", {"structure": "diagonal"}, ValueError, "structure"),
    ("xdeepfm", {"cin_layers": [7, 8]}, ValueError, "cin_layers"),
    ("autoint", {"attention_dim": 9, "num_heads": 2}, ValueError, "attention_dim"),
    ("fibinet", {"bilinear_type": "pairwise"}, ValueError, "bilinear_type"),
    ("finalmlp", {"fs1_context": ["nope"]}, ValueError, "fs1_context"),
    ("finalmlp", {"num_heads": 3}, ValueError, "num_heads"),
    ("deepfm", {"dropout": 1.5}, ValueError, "dropout"),
    ("deepfm", {"activation": "swishy"}, ValueError, "activation"),
    ("deepfm", {"numeric": "raw"}, ValueError, "numeric"),
    ("deepfm", {"hidden_units": [8]}, TypeError, "hidden_units"),
])
def test_invalid_arguments_name_model_and_argument(name: str, kwargs: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match) as err:
        build_model(name, SCHEMAS["criteo_like"], **kwargs)
    assert name in str(err.value)


def test_interaction_models_refuse_schemas_without_fields() -> None:
    numeric_only = Schema("numeric_only", _num(3))
    with pytest.raises(ValueError, match="xdeepfm"):
        build_model("xdeepfm", numeric_only, numeric="dense")
    out = build_model("xdeepfm", numeric_only, **TINY["xdeepfm"])(random_batch(numeric_only, 4))
    assert out.shape == (4,)


def test_every_model_has_a_config_that_builds() -> None:
    files = {p.stem: p for p in CONF_DIR.glob("*.yaml")}
    assert sorted(files) == list_models()
    schema = SCHEMAS["criteo_like"]
    for stem, path in files.items():
        cfg = OmegaConf.load(path)
        name = cfg.pop("name")
        assert name == stem and cfg.embedding_dim == 16
        assert set(cfg) <= set(model_arguments(name)), name
        torch.manual_seed(0)
        model = build_model(name, schema, **cfg)  # ListConfig values, exactly as Hydra passes them
        assert isinstance(model, MODELS[name])
        assert model(random_batch(schema, 4)).shape == (4,)


def test_readme_new_model_example() -> None:
    """The README's worked example of a new model, run as written: it registers, its config names exactly its
    arguments, it predicts one logit per row and the default compression recipe compresses it."""
    import re

    import yaml

    from lowrank_ctr.compression import compress
    from lowrank_ctr.config import CONF_DIR
    from lowrank_ctr.models import MODELS, build_model, model_arguments

    readme = (Path(CONF_DIR).parent / "README.md").read_text()
    section = readme.split("### How to extend: a new model", 1)[1].split("\n### ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    conf = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, flags=re.S).group(1))
    try:
        exec(compile(code, "README.md (new model)", "exec"), {"__name__": "readme_nfm"})
        assert MODELS["nfm"].model_name == "nfm"
        assert set(conf) - {"name"} == set(model_arguments("nfm")) and conf["name"] == "nfm"
        schema = SCHEMAS["criteo_like"]
        torch.manual_seed(0)
        model = build_model("nfm", schema, embedding_dim=8, mlp=[16, 16]).eval()
        batches = [random_batch(schema, 64) for _ in range(3)]
        assert model(batches[0]).shape == (64,)
        dense = build_model("nfm", schema, embedding_dim=8, mlp=[16], numeric="dense")
        assert dense(batches[0]).shape == (64,)
        report = compress(model, "afm", calibration_batches=batches, target_ratio=3, allocator="loss",
                          code_dtype="int8")
        assert report.ratio >= 3.0 * 0.98  # within the budget (one component of a tiny model is a large step)
        assert {layer["group"] for layer in report.layers if layer["replaced"]} >= {"embedding", "mlp"}
        assert torch.isfinite(model(batches[1])).all()
    finally:
        MODELS.pop("nfm", None)


@pytest.mark.parametrize("scale", [True, False])
def test_interacting_layer_matches_its_formula_in_value_and_gradient(scale: bool) -> None:
    """AutoInt's attention (torch's fused kernel) equals relu(softmax(Q K^T * s) V + x W_res) per head, written out
    with explicit matmuls, in the output and in every weight's gradient."""
    from lowrank_ctr.models.layers import InteractingLayer

    torch.manual_seed(0)
    layer = InteractingLayer(8, 12, num_heads=3, scale=scale).double()
    x = torch.randn(5, 7, 8, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    b, f, _ = x.shape
    q, k, v = (m(x).view(b, f, 3, 4).transpose(1, 2) for m in (layer.query, layer.key, layer.value))
    s = 4**-0.5 if scale else 1.0
    ref = torch.relu((torch.softmax(q @ k.transpose(-1, -2) * s, -1) @ v).transpose(1, 2).reshape(b, f, 12)
                     + layer.residual(x))
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *layer.parameters()], g)
    want = torch.autograd.grad(ref, [x, *layer.parameters()], g)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the explicit bf16 path: the same formula at bf16 precision
        low = layer.float()(x.detach().float())
    torch.testing.assert_close(low.float(), ref.detach().float(), rtol=0.05, atol=0.05)
