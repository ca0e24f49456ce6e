"""Experiments: a tiny method x rank multirun, its report, W&B offline runs, experiment configs."""

import csv
import json
from pathlib import Path

import pytest

from helpers import TINY, compose_cfg, read_results, run_cli


def test_tiny_sweep_and_report_numbers_match_the_runs(tmp_path):
    sweep = tmp_path / "sweep"
    r = run_cli(["lowrank-ctr-train", "-m", *TINY, "model.mlp=[16,16]", "bench=false", "compression=svd,afm",
                 "compression.embedding_rank=2,3", "compression.mlp_rank=4",
                 "compression.target_ratio=null", "compression.targets=[embedding,mlp]", "compression.calibration_batches=2",
                 f"paths.data_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"])
    assert r.returncode == 0, r.stderr[-3000:]
    runs = [read_results(p.parent) for p in sorted(sweep.glob("*/results.json"))]
    assert len(runs) == 4 and {x["compress/method"] for x in runs} == {"svd", "afm"}
    rep = run_cli(["lowrank-ctr-report", str(sweep), "--out", str(tmp_path / "rep")])
    assert rep.returncode == 0, rep.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "rep" / "results.csv")))
    assert len(rows) == 4
    by_dir = {Path(row["run_dir"]).name: row for row in rows}
    for p in sorted(sweep.glob("*/results.json")):
        res, row = json.loads(p.read_text()), by_dir[p.parent.name]
        assert float(row["auc"]) == pytest.approx(res["test/auc"], abs=1e-9)
        assert float(row["ratio"]) == pytest.approx(res["compress/ratio"], rel=1e-9)
        assert float(row["delta_auc"]) == pytest.approx(res["test/auc"] - res["base/test/auc"], abs=1e-9)
    assert (tmp_path / "rep" / "report.html").exists()


def test_wandb_offline_run_holds_the_summary(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    r = run_cli(["lowrank-ctr-train", *TINY, "model.mlp=[16,16]", "bench=false", "logger=wandb",
                 f"paths.data_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"],
                env={"WANDB_MODE": "", "HOME": str(tmp_path)})  # no key, no login: must go offline by itself
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # wandb-core keeps an offline run's records (config, history, summary) in its .wandb log until `wandb sync`
    log = next(runs[0].glob("*.wandb")).read_bytes()
    res = read_results(tmp_path / "run")
    assert b"test/auc" in log and repr(res["test/auc"]).encode() in log
    assert b"train/samples_per_s" in log
    assert b"train-runs" in log  # the W&B group of a single run (a multirun gets its sweep directory's name)


@pytest.mark.parametrize("name", [p.stem for p in sorted((Path(__file__).parents[1] / "conf" / "experiment")
                                                         .glob("*.yaml"))])
def test_experiment_configs_compose_with_paper_settings(name, tmp_path):
    cfg = compose_cfg("train", [f"experiment={name}"], tmp_path, tmp_path)
    data = name.split("_")[0]
    assert cfg.data.format == data and cfg.model.name == name.split("_", 1)[1]
    assert cfg.model.embedding_dim == (16 if data == "criteo" else 50)
    assert cfg.compression.method == "afm" and cfg.compression.exclude == ["mlp.net.0"]
    assert cfg.compression.target_ratio is None and cfg.compression.code_dtype == "float32"  # the paper's fixed ranks


def test_optuna_rank_search_under_a_size_budget(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    base = tmp_path / "base"
    r = run_cli(["lowrank-ctr-train", *TINY, "model.mlp=[32,32]", "bench=false",
                 f"paths.data_dir={tmp_path / 'cache'}", f"hydra.run.dir={base}"])
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = tmp_path / "optuna"
    r = run_cli(["lowrank-ctr-compress", "-m", "hparams_search=optuna_ranks", f"ckpt_path={base}/checkpoints/best.ckpt",
                 "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.n_startup_trials=3", "compression.finetune_epochs=0",
                 "compression.calibration_batches=2", "min_ratio=2", "progress_bar=false", "logger=none",
                 f"hydra.sweep.dir={sweep}"])
    assert r.returncode == 0, r.stderr[-3000:]
    runs = [read_results(p.parent) for p in sweep.glob("*/results.json")]
    assert len(runs) == 3 and all(x["compress/method"] == "afm" for x in runs)
    # range(1, 8) samples ranks above the embedding dim 4 (rank 6 in trial 2 of three seeded random trials,
    # whatever AUCs they reach): that trial fails, scores the worst value, and the search goes on (a NaN would stop
    # Hydra's Optuna sweeper)
    failed = [x for x in runs if x["status"] == "failed"]
    assert failed and all("outside the valid range" in x["error"] for x in failed)
    best = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in best and "compression.embedding_rank" in best
