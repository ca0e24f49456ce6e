"""Speed options end to end: mixed precision and row-wise optimizers in real (tiny) runs, their config checks,
and the benchmark scripts at a tiny size (their figures are never asserted)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import TINY, compose_cfg, read_results
from lowrank_ctr.config import UserError
from lowrank_ctr.data.batch import random_batch
from lowrank_ctr.data.schema import FieldSpec, Schema
from lowrank_ctr.models import build_model
from lowrank_ctr.precision import autocast_dtype, inference, precision_problem
from lowrank_ctr.validate import validate

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, overrides: list[str], name: str = "run") -> dict:
    from lowrank_ctr.train import run

    cfg = compose_cfg("train", [*TINY, "bench=false", *overrides], tmp_path / name, tmp_path / "data")
    run(cfg)
    return read_results(tmp_path / name)


def test_bf16_mixed_rowwise_training_gives_finite_metrics_and_records_choices(tmp_path: Path, monkeypatch,
                                                                              caplog) -> None:
    import lowrank_ctr.precision

    monkeypatch.setattr(lowrank_ctr.precision, "native_bf16", lambda: False)  # as on an AVX2-only CPU
    with caplog.at_level("WARNING", logger="lowrank_ctr.pipeline.runner"):
        res = _run(tmp_path, ["trainer.precision=bf16-mixed", "optimizer=rowwise_adagrad"])
    assert any("without bfloat16 kernels" in r.getMessage() for r in caplog.records)  # said once, before work
    assert res["train/precision"] == "bf16-mixed"
    assert res["train/optimizer"] == "rowwise_adagrad"
    for key in ("test/auc", "test/logloss", "val/auc", "train/samples_per_s"):
        assert res[key] is not None and math.isfinite(res[key]), key
    assert res["test/auc"] > 0.55  # it learned (the tiny synthetic data is learnable to ~0.7)


def test_default_run_records_float32_and_rowwise_adam(tmp_path: Path) -> None:
    res = _run(tmp_path, [])
    assert res["train/precision"] in ("32", "32-true")
    assert res["train/optimizer"] == "rowwise_adam"


def test_rowwise_optimizer_serves_the_compression_finetune(tmp_path: Path) -> None:
    """The fine-tune trains compressed modules (dense rule) next to any table left uncompressed (row rule)."""
    res = _run(tmp_path, ["optimizer=rowwise_adam", "compression=afm", "compression.targets=[mlp]",
                          "compression.target_ratio=null", "compression.mlp_rank=4",
                          "compression.finetune_epochs=1", "trainer.precision=bf16-mixed"])
    assert res["train/optimizer"] == "rowwise_adam"
    assert res["compress/finetune_epochs"] == 1
    assert math.isfinite(res["test/auc"]) and math.isfinite(res["compress/val/auc"])


@pytest.mark.parametrize("overrides, message", [
    (["trainer.precision=16-mixed"], "runs on GPU only; on CPU use trainer.precision=bf16-mixed"),
    (["trainer.precision=bf16-true"], "trainer.precision=bf16-true is not supported"),
    (["optimizer=rowwise_adagrad", "trainer.gradient_clip_val=1.0"], "trainer.gradient_clip_val=1.0 clips"),
    (["optimizer=rowwise_adagrad", "optimizer.rows=sgd"], "optimizer.rows=sgd must be one of"),
    (["optimizer=rowwise_adam", "optimizer.row_lr_scale=0"], "optimizer.row_lr_scale=0 must be a number > 0"),
    (["optimizer=rowwise_adagrad", "trainer=ddp_cpu"], "optimizer=rowwise_\\* trains on one process"),
])
def test_speed_settings_are_checked_before_any_work(tmp_path: Path, overrides: list[str], message: str) -> None:
    cfg = compose_cfg("train", [*TINY, *overrides], tmp_path / "run", tmp_path / "data")
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("[", r"\[")):
        validate(cfg)


def test_supported_precisions_pass_validation(tmp_path: Path) -> None:
    for value in ("32", "32-true", "bf16-mixed"):
        validate(compose_cfg("train", [*TINY, f"trainer.precision={value}"], tmp_path / "run", tmp_path / "data"))
    assert precision_problem("16-mixed", "gpu") is None
    assert autocast_dtype("bf16-mixed") is torch.bfloat16 and autocast_dtype(32) is None


def test_bf16_inference_keeps_float32_probabilities_close_to_float32() -> None:
    schema = Schema("s", [FieldSpec(f"n{i}", "numeric") for i in range(3)]
                    + [FieldSpec(f"c{i}", "categorical", vocab_size=40) for i in range(6)])
    torch.manual_seed(0)
    model = build_model("deepfm", schema, embedding_dim=8, mlp=[32, 32]).eval()
    batch = random_batch(schema, 256)
    with inference("32"):
        full = torch.sigmoid(model(batch))
    with inference("bf16-mixed"):
        mixed = torch.sigmoid(model(batch))
        assert torch.is_inference_mode_enabled()
    assert mixed.dtype == torch.float32
    assert (mixed - full).abs().max() < 0.01
    assert not torch.equal(mixed, full)  # bf16 matmuls did run


@pytest.mark.parametrize("script, args", [
    ("bench_train.py", ["--rows", "3000", "--max-vocab", "200", "--batch-size", "256", "--repeats", "1",
                        "--variants", "32:adam,bf16-mixed:rowwise_adagrad,32:adam:infer=int8", "--mlp", "16,16",
                        "--breakdown", "--breakdown-steps", "2", "--no-fused"]),
    ("bench_zoo.py", ["--rows", "3000", "--max-vocab", "200", "--batch-size", "256", "--batches", "2",
                      "--models", "deepfm,xdeepfm", "--tiny"]),
])
def test_benchmark_scripts_run_at_a_tiny_size(tmp_path: Path, script: str, args: list[str]) -> None:
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args, "--workdir", str(tmp_path / "w"),
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["rows"], result
    for row in result["rows"]:
        assert row["train_samples_per_s"] > 0
    if script == "bench_train.py":  # int8 serving of the same weights: its AUC change is measured, and small
        int8 = next(r for r in result["rows"] if r["name"].endswith("infer=int8"))
        assert abs(int8["infer_auc_change"]) < 0.01 and "infer_auc_change" not in result["rows"][2]
        assert result["workload"]["cpu"]["capability"]
        for part in result["breakdown"].values():  # the MLP by itself is a part of the step, not all of it
            assert 0 < part["mlp_alone_s"] < part["step_s"], part


def test_bench_int8_compares_base_and_compressed_of_a_run(tmp_path: Path) -> None:
    _run(tmp_path, ["model.mlp=[16,16]", "compression=afm", "compression.calibration_batches=2"])
    out = tmp_path / "int8.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_int8.py"), str(tmp_path / "run"),
                           "--repeats", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["deepfm seed 42 base", "deepfm seed 42 compressed 5.0x"]
    for r in rows:
        assert r["32"]["logit_rms_vs_float32"] == 0 < r["int8"]["logit_rms_vs_float32"] < 0.05
        assert abs(r["auc_change"]) < 0.02 and r["int8"]["samples_per_s"] > 0


def test_zoo_merge_replaces_only_the_remeasured_rows(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_zoo import merged_rows

    workload = {"data": "synthetic rows=10", "batch_size": 4}
    out = tmp_path / "zoo.json"
    out.write_text(json.dumps({"workload": workload, "machine": {"other_cpu_share": 0.01},
                               "rows": [{"model": "deepfm", "v": 1}, {"model": "fibinet", "v": 1}]}))
    rows = merged_rows(str(out), workload, [{"model": "fibinet", "v": 2, "machine": {"other_cpu_share": 0.02}}])
    assert [(r["model"], r["v"], r["machine"]["other_cpu_share"]) for r in rows] == [
        ("deepfm", 1, 0.01), ("fibinet", 2, 0.02)]
    with pytest.raises(SystemExit, match="another workload"):
        merged_rows(str(out), {**workload, "batch_size": 8}, [])
    with pytest.raises(SystemExit, match="existing --out"):
        merged_rows(str(tmp_path / "missing.json"), workload, [])


def test_collect_peers_takes_medians_and_ratios_to_the_plain_loop(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from collect_peers import collect

    synth = tmp_path / "run1" / "synth"
    synth.mkdir(parents=True)
    figures = {"prep_s": 1.0, "infer_samples_per_s": 100.0, "peak_rss_mb": 800.0, "test_auc": 0.75,
               "test_logloss": 0.5, "torch_threads": 2, "n_train": 8, "n_test": 2}
    for i, (peer, train, share) in enumerate([("plain-pytorch", 10.0, 0.01), ("plain-pytorch", 30.0, 0.0),
                                              ("lowrank-ctr", 40.0, 0.03), ("lowrank-ctr", 44.0, 0.0),
                                              ("lowrank-ctr", 90.0, 0.0)]):
        (synth / f"{i}.json").write_text(json.dumps({**figures, "peer": peer, "train_samples_per_s": train,
                                                     "other_cpu_share": share}))
    cols = {c["peer"]: c for c in collect(tmp_path / "run1")["columns"]}
    assert list(cols) == ["plain-pytorch", "lowrank-ctr"]  # the harness's order, plain first
    assert cols["plain-pytorch"]["train_samples_per_s"] == 20.0 and cols["lowrank-ctr"]["train_samples_per_s"] == 44.0
    assert cols["lowrank-ctr"]["train_samples_per_s_over_plain"] == pytest.approx(2.2)
    assert cols["lowrank-ctr"]["other_cpu_share_max"] == 0.03 and cols["lowrank-ctr"]["repeats"] == 3
    with pytest.raises(SystemExit, match="no run JSON"):
        collect(tmp_path)


def test_collect_runs_keeps_each_setting_s_runs_and_means(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from collect_runs import collect

    for name, auc in (("a1", 0.70), ("a2", 0.72), ("b1", 0.75)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(
            {"seed": 1, "test/auc": auc, "test/logloss": 0.5, "train/seconds": 10.0, "train/epochs": 2,
             "train/samples_per_s": 100.0, "train/optimizer": "adam"}))
    out = collect([f"A={tmp_path}/a*", f"B={tmp_path}/b*"])["settings"]
    assert [s["label"] for s in out] == ["A", "B"] and [len(s["runs"]) for s in out] == [2, 1]
    assert out[0]["mean"]["test/auc"] == pytest.approx(0.71) and out[1]["runs"][0]["optimizer"] == "adam"
    with pytest.raises(SystemExit, match="no results.json"):
        collect([f"C={tmp_path}/c*"])


@pytest.mark.slow
def test_scale_benchmark_runs_every_stage_at_a_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_scale.py"), "--rows", "20000",
                           "--small-rows", "5000", "--max-vocab", "500", "--batch-size", "1024",
                           "--model-overrides", "model.mlp=[16,16] model.embedding_dim=4",
                           "--workdir", str(tmp_path / "w"), "--out", str(out)],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    stages = result["stages"]
    for stage in ("prepare_small", "prepare", "train_epoch", "compress", "export", "predict"):
        assert stages[stage]["wall_s"] > 0 and stages[stage]["peak_rss_mb"] > 0, stage
    assert stages["predict"]["rows"] > 0 and stages["train_epoch"]["train/optimizer"] == "rowwise_adagrad"
    assert result["projection_full_criteo"]["train_epoch_s"] > 0


@pytest.mark.slow
def test_peers_column_writes_the_harness_keys(tmp_path: Path) -> None:
    harness = REPO.parent / "shared" / "peers-bench"
    if not (harness / "bench_common.py").exists():
        pytest.skip(f"peer harness {harness} not beside the checkout")
    data = tmp_path / "data"
    subprocess.run([sys.executable, str(harness / "gen_criteo_like.py"), "--rows", "3000", "--out", str(data)],
                   check=True, capture_output=True, timeout=600)
    out = tmp_path / "col.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "peers_column.py"), "--data", str(data), "--out",
                           str(out), "--batch-size", "512"], capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "LOWRANK_CTR_BENCH_OVERRIDES": "optimizer=rowwise_adagrad"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("prep_s", "train_epoch_s", "train_samples_per_s", "infer_s", "infer_samples_per_s", "test_auc",
                "test_logloss", "peak_rss_mb", "peak_tree_pss_mb", "other_cpu_share", "n_params", "n_train"):
        assert result[key] is not None, key
    assert result["labels_match_csv_order"] and abs(result["test_auc"] - result["project_test_auc"]) < 1e-4
    assert "optimizer=rowwise_adagrad" in result["overrides"]


def _readme_speed():
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_speed", REPO / "benchmarks" / "readme_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_speed_blocks_are_the_rendering_of_the_committed_results() -> None:
    """Every speed figure in the README is regenerated from benchmarks/results/*.json, never typed in: each block
    between its markers equals the rendering of its JSON."""
    rs = _readme_speed()
    readme = (REPO / "README.md").read_text()
    rendered = rs.blocks(REPO / "benchmarks" / "results")
    assert rendered, "no benchmark results to render"
    for name, body in rendered.items():
        marker = f"<!-- speed:{name}:start -->\n"
        assert marker in readme, f"README has no block for {name}"
        current = readme.split(marker, 1)[1].split(f"\n<!-- speed:{name}:end -->", 1)[0]
        assert current == body, f"README block {name} differs from benchmarks/results (run benchmarks/readme_speed.py)"


def test_readme_speed_says_missed_where_a_target_is_missed() -> None:
    rs = _readme_speed()
    row = {"repeats": 1, "train_samples_per_s": 1.0, "infer_samples_per_s": 1.0, "peak_rss_mb": 1.0,
           "test_auc": 0.7, "auc_minus_project_float32_adam": 0.0}
    d = {"workload": {"embedding_dim": 16, "mlp": [8], "batch_size": 4, "threads": 2, "epochs": 1, "data": "x"},
         "rows": [{**row, "name": "plain", "train_over_plain": 1.0, "infer_over_plain": 1.0, "rss_over_plain": 1.0},
                  {**row, "name": "project 32:adam", "train_over_plain": 1.9, "infer_over_plain": 1.6,
                   "rss_over_plain": 1.2},
                  {**row, "name": "project bf16-mixed:adam", "train_over_plain": 2.2, "infer_over_plain": 1.4,
                   "rss_over_plain": 0.9, "auc_minus_project_float32_adam": -0.002}]}
    text = rs.render_train(d)
    assert "train >= 2.0x the plain dense-Adam loop: 2.20x (project bf16-mixed:adam) — met" in text
    assert "within 0.001): -0.0020 — missed" in text
    assert "inference >= 1.5x the plain loop: 1.60x (project 32:adam) — met" in text
    assert "at most 1.20x (project 32:adam) — missed" in text
