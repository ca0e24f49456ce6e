"""Config validation: wrong types, impossible values and contradictions stop before any work, naming the key."""

import pytest

from helpers import TINY, compose_cfg, run_cli
from lowrank_ctr.config import UserError
from lowrank_ctr.validate import problems, validate


def cfg_with(tmp_path, *overrides):
    return compose_cfg("train", [*TINY, *overrides], tmp_path / "run", tmp_path / "cache")


def test_shipped_configs_are_valid(tmp_path):
    for extra in ([], ["compression=afm"], ["compression=svd", "compression.target_ratio=3"],
                  ["compression=tt", "compression.embedding_rank=4"], ["compression=int8"], ["compression=qr"],
                  ["compression=tt", "compression.from_scratch=true"],
                  ["compression=afm", "compression.target_ratio=5", "compression.allocator=loss",
                   "compression.code_dtype=int8", "compression.calibration=sequential", "compression.correction=lstsq",
                   "compression.embedding_rank=null", "compression.mlp_rank=null"],
                  ["model=dnn", "compression=afm", "compression.fold=true"],
                  ["compression=svd", "compression.energy=0.9", "compression.target_ratio=null"],
                  ["compression=afm", "compression.target_ratio=null", "compression.targets=[embedding,mlp]",
                   "compression.embedding_rank=2", "compression.mlp_rank=0.16"],
                  ["experiment=criteo_dcnv2"], ["experiment=criteo_dcnv2", "compression=tt"],
                  ["compression=tt", "compression.mlp_method=afm", "compression.target_ratio=5"],
                  ["compression=qr", "compression.mlp_method=svd", "compression.mlp_rank=8"],
                  ["compression=tt_afm"], ["compression=qr_afm", "compression.target_ratio=10"],
                  ["compression=tt_afm", "compression.from_scratch=true"],
                  ["compression=qr_afm", "compression.from_scratch=true", "compression.target_ratio=3"]):
        assert problems(cfg_with(tmp_path, *extra)) == [], extra


@pytest.mark.parametrize("overrides, key, need", [
    (["trainer.max_epochs=abc"], "trainer.max_epochs='abc'", "an integer >= -1"),
    (["data.batch_size=0"], "data.batch_size=0", "an integer >= 1"),
    (["seed=1.5"], "seed=1.5", "an integer"),
    (["optimizer.lr=-0.1"], "optimizer.lr=-0.1", "a number > 0.0"),
    (["compression=afm", "compression.target_ratio=null", "compression.targets=[embedding]",
      "compression.embedding_rank=abc"], "compression.embedding_rank='abc'", "integer rank >= 1"),
    (["compression=afm", "compression.target_ratio=null", "compression.targets=[mlp]", "compression.mlp_rank=1.5"],
     "compression.mlp_rank=1.5", "a float in (0, 1]"),
    (["compression=afm", "compression.target_ratio=null", "compression.energy=1.5"], "compression.energy=1.5",
     "<= 1.0"),
    (["compression=afm", "compression.target_ratio=0.5"], "compression.target_ratio=0.5", "> 1.0"),
    (["compression=afm", "compression.finetune_epochs=-1"], "compression.finetune_epochs=-1", ">= 0"),
    (["compression=afm", "compression.fold=maybe"], "compression.fold='maybe'", "true or false"),
    (["compression=afm", "compression.code_dtype=int4"], "compression.code_dtype='int4'", "one of float32, int8"),
    (["compression=afm", "compression.correction=yes"], "compression.correction='yes'", "one of none, lstsq"),
    (["early_stopping_patience=-1"], "early_stopping_patience=-1", "or null"),
    (["data.in_memory=gpu"], "data.in_memory='gpu'", "false, host or device"),
    (["malloc=jemalloc"], "malloc='jemalloc'", "one of tuned, default"),
    (["bench_int8=maybe"], "bench_int8='maybe'", "true or false"),
])
def test_wrong_types_and_ranges_name_the_key(tmp_path, overrides, key, need):
    found = problems(cfg_with(tmp_path, *overrides))
    assert len(found) == 1 and found[0].startswith(key) and need in found[0], found


@pytest.mark.parametrize("overrides, expected", [
    (["compression=svd", "compression.energy=0.9", "compression.target_ratio=3"], "set one to null"),
    (["compression=afm", "compression.energy=0.9"], "set one to null"),
    (["data.in_memory=host", "data.num_workers=2"], "set data.num_workers=0"),
    (["compression=afm", "compression.target_ratio=null", "compression.targets=[embedding,mlp]",
      "compression.embedding_rank=2", "compression.mlp_rank=4", "compression.energy=0.9"],
     "has no effect: every target group has a fixed rank"),
    (["compression=afm", "compression.embedding_rank=2"], "for fixed ranks set compression.target_ratio=null"),
    (["compression=svd", "compression.target_ratio=null", "compression.targets=[embedding,mlp]",
      "compression.embedding_rank=2"], "no rank policy for target group(s) ['mlp']"),
    (["compression=int8", "compression.energy=0.9"], "compression=int8 does not have"),
    (["compression=tt", "compression.embedding_rank=0.5"], "needs the TT-rank"),
    (["compression=tt", "compression.targets=[embedding,mlp]"], "compression=tt compresses ['embedding'] only"),
    (["compression=afm", "compression.targets=[attention]"], "unknown group(s) ['attention']"),
    (["compression=afm", "compression.fold=true", "compression.targets=[mlp]"], "add 'embedding'"),
    (["compression=int8", "compression.code_dtype=int8"], "compression=int8 does not have"),
    (["compression=tt", "compression.allocator=loss"], "compression=tt has none"),
    (["compression=svd", "compression.allocator=loss"], "use compression.allocator=variance"),
    (["compression=afm", "compression.from_scratch=true"], "methods that can: ['tt', 'qr']"),
    (["compression=qr", "compression.collisions=1"], "compression.collisions=1 must be an integer >= 2"),
    (["model=dnn", "compression=int8", "compression.fold=true"], "compression=int8 has none"),
    (["compression=afm", "compression.control=true", "compression.finetune_epochs=0"], "finetune_epochs >= 1"),
    (["compression=afm", "compression.control_cache=/tmp/c"], "set compression.control=true or control_cache=null"),
    (["compression=tt_afm", "compression.scratch_cache=/tmp/s"], "set compression.from_scratch=true or scratch_cache"),
    (["trainer.max_epochs=1", "trainer.min_epochs=3"], "more than trainer.max_epochs=1"),
    (["compression=afm", "compression.mlp_method=svd"], "compresses only embeddings"),
    (["compression=tt", "compression.mlp_method=int8"], "must be a low-rank method"),
    (["compression=tt", "compression.mlp_method=afm", "compression.target_ratio=5", "compression.fold=true"],
     "cannot be combined with compression.fold=true"),
    (["compression=tt", "compression.mlp_method=afm"], "no rank policy for target group(s) ['mlp']"),
    (["compression=tt", "compression.mlp_method=afm", "compression.targets=[mlp]"], "must name 'embedding'"),
    (["compression=tt", "compression.mlp_method=afm", "compression.mlp_rank=4", "compression.embedding_rank=0.5"],
     "needs the TT-rank"),
])
def test_contradictions_are_one_clear_message(tmp_path, overrides, expected):
    found = problems(cfg_with(tmp_path, *overrides))
    assert len(found) == 1 and expected in found[0], found


def test_several_problems_reported_together(tmp_path):
    with pytest.raises(UserError, match=r"config has 2 problems:\n  seed='x'.*\n  data.batch_size=-3"):
        validate(cfg_with(tmp_path, "seed=x", "data.batch_size=-3"))


def test_gpu_trainer_without_gpu(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    found = problems(cfg_with(tmp_path, "trainer=gpu"))
    assert found and "sees no CUDA GPU" in found[0] and "trainer=cpu" in found[0]


def test_cli_stops_before_training(tmp_path):
    """A bad fine-tune setting used to surface only after base training; now nothing runs."""
    run = tmp_path / "run"
    r = run_cli(["lowrank-ctr-train", *TINY, "compression=afm", "compression.finetune_lr=0", f"hydra.run.dir={run}",
                 f"paths.data_dir={tmp_path / 'cache'}"])
    assert r.returncode == 2 and "error: config: compression.finetune_lr=0 must be a number > 0.0" in r.stderr
    assert not (run / "checkpoints").exists() and not (tmp_path / "cache").exists()
    r = run_cli(["lowrank-ctr-train", *TINY, "model.mlp=abc", f"hydra.run.dir={run}",
                 f"paths.data_dir={tmp_path / 'cache'}"])
    assert r.returncode == 2 and "error: model 'deepfm': mlp must be a list of positive ints" in r.stderr


def test_data_format_problems_are_reported_before_any_work(tmp_path):
    """The data format's own key checks run in validate() (not only when preparation starts)."""
    found = problems(compose_cfg("train", ["data=tabular"], tmp_path / "run", tmp_path / "cache"))
    assert any("data.train_path" in p or "no data file given" in p for p in found), found
