"""Compression through the zoo and the entry points: every model x method, results keys, checkpoints, errors."""

import pytest
import torch

from helpers import TINY, compose_cfg, read_results, run_cli
from lowrank_ctr.compression import compress
from lowrank_ctr.compression.spec import apply_spec
from lowrank_ctr.data.batch import random_batch
from lowrank_ctr.data.schema import FieldSpec, Schema
from lowrank_ctr.lightning.module import load_model
from lowrank_ctr.pipeline.evaluation import evaluate
from lowrank_ctr.pipeline.context import make_datamodule
from lowrank_ctr.models import build_model, list_models
from lowrank_ctr.train import run

SCHEMA = Schema("toy", [FieldSpec(f"c{i}", "categorical", 50 + 10 * i) for i in range(5)]
                + [FieldSpec("tags", "multihot", 30, 3), FieldSpec("n0", "numeric"), FieldSpec("n1", "numeric")])
SMALL = {"mlp": [32, 32], "cin_layers": [8, 8], "cross_layers": 2, "mlp1": [32], "mlp2": [32], "fs_hidden": [16],
         "num_heads": 2, "attention_dim": 8, "attention_layers": 1}
RANKS = {"svd": dict(embedding_rank=2, mlp_rank=4), "afm": dict(embedding_rank=2, mlp_rank=4),
         "tt": dict(embedding_rank=2), "int8": {},
         "tt+afm": dict(embedding_rank=2, mlp_rank=4, other_rank=0.5, mlp_method="afm")}


@pytest.mark.parametrize("method", ["svd", "afm", "tt", "int8", "tt+afm"])
@pytest.mark.parametrize("name", list_models())
def test_every_model_compresses_with_every_method(name, method):
    from lowrank_ctr.models import model_arguments

    torch.manual_seed(0)
    args = model_arguments(name)
    model = build_model(name, SCHEMA, embedding_dim=8, **{k: v for k, v in SMALL.items() if k in args}).eval()
    g = torch.Generator().manual_seed(1)
    batches = [random_batch(SCHEMA, 64, g) for _ in range(4)]
    before = model(batches[0])
    targets = ["embedding"] if name in ("lr", "fm") or method == "tt" else ["embedding", "mlp"]
    if method == "tt+afm":  # TT embeddings, then AFM on every Linear the model has
        targets = ["embedding", "mlp", "other"]
    if name == "lr" or (name == "fm" and method == "tt+afm"):
        pytest.skip(f"{name} has no low-rank embedding or no Linear layer to compress")
    report = compress(model, method.split("+")[0], calibration_batches=batches, targets=targets, **RANKS[method])
    after = model(batches[0])
    assert after.shape == before.shape and torch.isfinite(after).all()
    assert report.ratio > 1.0 and any(l["replaced"] for l in report.layers)
    # the spec rebuilds the compressed structure on a fresh model: identical predictions
    fresh = build_model(name, SCHEMA, embedding_dim=8, **{k: v for k, v in SMALL.items() if k in args}).eval()
    apply_spec(fresh, report.spec)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(batches[1]), model(batches[1]))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


INTERFACE_KEYS = ["base/test/auc", "base/test/logloss", "base/params", "base/bytes", "compress/method",
                  "compress/ratio", "compress/params", "compress/bytes", "compress/test/auc_before_finetune",
                  "compress/seconds", "compress/layers", "compress/logit_mse", "compress/checkpoint",
                  "base/checkpoint", "checkpoint", "test/auc", "test/logloss"] + [
    f"bench/{k}@{b}" for k in ("base_ms", "compressed_ms", "speedup") for b in (1, 256, 4096)]


def test_train_with_afm_writes_every_result_key_and_checkpoint_round_trips(tmp_path, data_dir):
    cfg = compose_cfg("train", TINY + ["model.mlp=[32,32]", "compression=afm",
                                       "compression.calibration_batches=4", "bench_batch_sizes=[1,256,4096]"],
                      tmp_path, data_dir)
    res = run(cfg)
    on_disk = read_results(tmp_path)
    for key in INTERFACE_KEYS:
        assert key in on_disk, key
    assert on_disk["compress/method"] == "afm"
    assert on_disk["compress/ratio"] == pytest.approx(on_disk["base/bytes"] / on_disk["compress/bytes"])
    assert on_disk["bytes"] == on_disk["compress/bytes"] < on_disk["base/bytes"]
    ranks = {l["name"]: l for l in on_disk["compress/layers"]}
    first = ranks["mlp.net.0"]  # the budget's choice depends on the trained weights; it must be a real low rank
    assert first["replaced"] and 1 <= first["rank"] < first["full_rank"]
    assert 0 < ranks["mlp.net.0"]["retained_energy"] <= 1
    # checkpoint = the final (compressed) model: it rebuilds its own structure and IS the model the run tested
    assert res["checkpoint"] == res["compress/checkpoint"] != res["base/checkpoint"]
    model, hp = load_model(res["checkpoint"])
    assert hp["compression_spec"]["method"] == "afm"
    assert type(model.mlp.net[0]).__name__ == "LowRankLinear" and model.mlp.net[0].rank == first["rank"]
    test = list(make_datamodule(cfg).test_dataloader())
    assert evaluate(model, test, "cpu", "test")[0].auc == pytest.approx(res["test/auc"], abs=1e-6)
    # compress/logit_mse: the compressed model before fine-tuning against the base, on the test split
    base, _ = load_model(res["base/checkpoint"])
    before, _ = load_model(res["checkpoint"])
    before.load_state_dict(torch.load(tmp_path / "checkpoints" / "compressed-init.pt", weights_only=True))
    with torch.no_grad():
        diffs = torch.cat([(before(b) - base(b)).pow(2) for b in test])
    assert res["compress/logit_mse"] == pytest.approx(float(diffs.mean()), rel=1e-4)
    assert res["compress/logit_mse"] > 0


def model_schema(hp):
    return Schema.from_dict(hp["schema"])


def test_compress_entry_point_on_a_checkpoint(tmp_path, data_dir):
    base = run(compose_cfg("train", TINY + ["model.mlp=[32,32]", "bench=false"], tmp_path / "base", data_dir))
    r = run_cli(["lowrank-ctr-compress", f"ckpt_path={base['checkpoint']}", "compression=svd",
                 "compression.finetune_epochs=0", "bench=false", "progress_bar=false", "logger=none",
                 f"hydra.run.dir={tmp_path / 'c'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    res = read_results(tmp_path / "c")
    assert res["compress/method"] == "svd" and res["model"] == "deepfm"
    assert res["base/test/auc"] == pytest.approx(base["test/auc"], abs=1e-6)  # same model, same test split
    assert res["compress/ratio"] > 2
    assert res["base/checkpoint"] == base["checkpoint"] and res["checkpoint"] == res["compress/checkpoint"]
    assert "lowrank-ctr-export ckpt_path=" + res["checkpoint"] in r.stdout  # the summary's next command


def test_impossible_rank_is_one_clear_error(tmp_path):
    r = run_cli(["lowrank-ctr-train", *TINY, "model.mlp=[32,32]", "compression=svd", "compression.mlp_rank=500",
                 "compression.target_ratio=null", "compression.targets=[mlp]",
                 f"paths.data_dir={tmp_path / 'c'}", f"hydra.run.dir={tmp_path / 'r'}"])
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "mlp.net.0" in last and "500" in last, last


def test_unknown_compression_method(tmp_path):
    r = run_cli(["lowrank-ctr-train", *TINY, "compression=pca", f"hydra.run.dir={tmp_path}"])
    assert r.returncode != 0 and "compression/pca" in r.stderr and "afm" in r.stderr


FOLDS = {"dnn": ["mlp.net.0"], "deepfm": ["mlp.net.0"], "widedeep": ["mlp.net.0"], "dcn": ["mlp.net.0"],
         "dcnv2": ["cross.layers.0", "mlp.net.0"], "xdeepfm": ["mlp.net.0"], "autoint": ["mlp.net.0"]}


@pytest.mark.parametrize("method,targets", [("afm", ["embedding"]), ("svd", ["embedding", "mlp"]),
                                            ("afm", ["embedding", "mlp"])])
@pytest.mark.parametrize("name", sorted(FOLDS))
def test_folding_changes_no_prediction_and_shrinks_the_linear(name, method, targets):
    """Every model whose DNN (or first cross layer) reads the embeddings through a Linear folds it; FM, cross and
    CIN layers keep reading the reconstruction; predictions do not change; the spec rebuilds the folded model."""
    import copy

    from lowrank_ctr.compression.fold import FieldFoldedLinear
    from lowrank_ctr.models import model_arguments

    torch.manual_seed(0)
    args = {k: v for k, v in SMALL.items() if k in model_arguments(name)}
    base = build_model(name, SCHEMA, embedding_dim=8, **args).eval()
    g = torch.Generator().manual_seed(1)
    batches = [random_batch(SCHEMA, 64, g) for _ in range(4)]
    plain, folded = copy.deepcopy(base), copy.deepcopy(base)
    r_plain = compress(plain, method, calibration_batches=batches, targets=targets, embedding_rank=3, mlp_rank=6)
    r_fold = compress(folded, method, calibration_batches=batches, targets=targets, embedding_rank=3, mlp_rank=6,
                      fold=True)
    test = random_batch(SCHEMA, 128, torch.Generator().manual_seed(2))
    torch.testing.assert_close(folded(test), plain(test), atol=1e-5, rtol=1e-5)
    folded_names = sorted(n for n, m in folded.named_modules() if isinstance(m, FieldFoldedLinear))
    if "mlp" in targets:  # a thin low-rank ``down`` may not shrink by folding: then it stays as it is
        assert {n.removesuffix(".down") for n in folded_names} <= set(FOLDS[name])
    else:
        assert folded_names == FOLDS[name]
    assert r_fold.compressed["total"]["bytes"] <= r_plain.compressed["total"]["bytes"]
    fresh = build_model(name, SCHEMA, embedding_dim=8, **args).eval()
    apply_spec(fresh, r_fold.spec)
    fresh.load_state_dict(folded.state_dict())
    assert torch.equal(fresh(test), folded(test))


def test_stacked_dcnv2_folds_its_first_cross_layer_only():
    model = build_model("dcnv2", SCHEMA, embedding_dim=8, structure="stacked", cross_layers=1, mlp=[32]).eval()
    report = compress(model, "afm", calibration_batches=[random_batch(SCHEMA, 64)], targets=["embedding"],
                      embedding_rank=2, fold=True)
    assert [m["name"] for m in report.spec["modules"]] == ["embedding.table", "cross.layers.0"]  # not its MLP


@pytest.mark.parametrize("name,kwargs", [("fm", {}), ("autoint", {"mlp": []})])
def test_folding_is_refused_where_no_linear_reads_the_embeddings(name, kwargs):
    from lowrank_ctr.compression import check_config

    model = build_model(name, SCHEMA, embedding_dim=8, **kwargs).eval()
    batch = random_batch(SCHEMA, 64)
    cfg = {"method": "afm", "targets": ["embedding"], "embedding_rank": 2, "fold": True}
    with pytest.raises(ValueError, match="nothing to fold"):
        check_config(model, cfg, batch)
    with pytest.raises(ValueError, match="nothing to fold"):
        compress(model, "afm", calibration_batches=[batch], targets=["embedding"], embedding_rank=2, fold=True)


def test_train_dnn_with_folded_afm(tmp_path, data_dir):
    res = run(compose_cfg("train", TINY + ["model=dnn", "model.mlp=[32,32]", "compression=afm", "bench=false",
                                           "compression.fold=true", "compression.calibration_batches=2",
                                           "compression.targets=[embedding]", "compression.target_ratio=null",
                                           "compression.embedding_rank=2"], tmp_path, data_dir))
    assert res["compress/policy"]["fold"] is True and res["compress/policy"]["folded"] == ["mlp.net.0"]
    model, hp = load_model(res["compress/checkpoint"])
    assert type(model.mlp.net[0]).__name__ == "FieldFoldedLinear"
    batch = random_batch(model_schema(hp), 16)
    assert torch.isfinite(model(batch)).all()


def test_fold_when_the_ranks_keep_every_table_dense_is_a_no_op():
    """fold=true with ranks that keep the embedding dense (full rank: the low-rank form is not smaller, as a budget
    may decide for a small table) folds nothing and says so, instead of failing the run."""
    torch.manual_seed(0)
    model = build_model("deepfm", SCHEMA, embedding_dim=8, mlp=[32, 32]).eval()
    batches = [random_batch(SCHEMA, 64) for _ in range(2)]
    report = compress(model, "afm", calibration_batches=batches, targets=["embedding", "mlp"], embedding_rank=8,
                      mlp_rank=4, fold=True)
    assert report.policy["folded"] == []
    assert not any(l["replaced"] for l in report.layers if l["name"] == "embedding.table")
    assert any(l["replaced"] for l in report.layers if l["group"] == "mlp")
