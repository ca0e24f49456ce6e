"""A training run killed part-way resumes from its last checkpoint and ends where an uninterrupted run ends."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import TINY, read_results, run_cli

ARGS = [*TINY, "data.rows=30000", "data.batch_size=128", "trainer.max_epochs=4", "early_stopping_patience=null",
        "model.mlp=[32,32]", "bench=false", "seed=3"]


def train_and_kill(args: list, run: Path, marker: Path, sig: int) -> None:
    """Start lowrank-ctr-train into ``run``, and kill it with ``sig`` shortly after ``marker`` appears."""
    exe = str(Path(sys.executable).parent / "lowrank-ctr-train")
    proc = subprocess.Popen([exe, *args, f"hydra.run.dir={run}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "WANDB_MODE": "offline"})
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # part-way into the next epoch
    proc.send_signal(sig)
    proc.wait(timeout=60)
    if (run / "results.json").exists():
        pytest.skip("the run finished before it could be killed (machine too fast for this timing)")
    assert marker.exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_to_the_same_metrics(tmp_path, sig):
    cache = f"paths.data_dir={tmp_path / 'cache'}"
    full = run_cli(["lowrank-ctr-train", *ARGS, cache, f"hydra.run.dir={tmp_path / 'full'}"])
    assert full.returncode == 0, full.stderr[-3000:]

    run = tmp_path / "killed"
    train_and_kill([*ARGS, cache], run, run / "checkpoints" / "last.ckpt", sig)

    resumed = run_cli(["lowrank-ctr-train", *ARGS, cache, "ckpt_path=last", f"hydra.run.dir={run}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = read_results(tmp_path / "full"), read_results(run)
    assert b["train/epochs"] == a["train/epochs"]
    assert b["test/auc"] == pytest.approx(a["test/auc"], abs=1e-6)
    assert b["test/logloss"] == pytest.approx(a["test/logloss"], abs=1e-6)


def test_resume_without_a_checkpoint_is_one_clear_error(tmp_path):
    r = run_cli(["lowrank-ctr-train", *TINY, "ckpt_path=last", f"hydra.run.dir={tmp_path / 'nothing'}"])
    assert r.returncode == 2 and "ckpt_path=last but" in r.stderr


FT_ARGS = [*TINY, "data.rows=20000", "data.batch_size=128", "trainer.max_epochs=2", "early_stopping_patience=null",
           "model.mlp=[32,32]", "bench=false", "seed=5", "compression=afm", "compression.finetune_epochs=3",
           "compression.calibration_batches=4", "compression.finetune_lr=0.003"]


def _same_outcome(a: dict, b: dict) -> None:
    for key in ("base/test/auc", "compress/test/auc_before_finetune", "compress/val/auc", "test/auc",
                "test/logloss", "compress/ratio"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
    assert b["compress/finetune_kept"] == a["compress/finetune_kept"]
    assert b["compress/ranks"] == a["compress/ranks"]


def test_resume_after_finished_stages_reuses_them(tmp_path):
    """A run whose stages all finished but which died before results.json: nothing is trained or calibrated again."""
    cache = f"paths.data_dir={tmp_path / 'cache'}"
    run = tmp_path / "run"
    full = run_cli(["lowrank-ctr-train", *FT_ARGS, cache, f"hydra.run.dir={run}"])
    assert full.returncode == 0, full.stderr[-3000:]
    a = read_results(run)
    (run / "results.json").unlink()
    best = run / "checkpoints" / "best.ckpt"
    stamp = best.stat().st_mtime_ns
    resumed = run_cli(["lowrank-ctr-train", *FT_ARGS, cache, "ckpt_path=last", f"hydra.run.dir={run}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert "resuming after the finished base stage" in log and "calibration is not repeated" in log
    assert best.stat().st_mtime_ns == stamp  # the base model was not trained again
    _same_outcome(a, read_results(run))
    other = run_cli(["lowrank-ctr-train", *FT_ARGS, cache, "ckpt_path=last", "compression.mlp_rank=2",
                     f"hydra.run.dir={run}"])
    assert other.returncode == 2 and "holds a run of another configuration" in other.stderr


@pytest.mark.slow
def test_run_killed_during_finetune_resumes_to_the_same_metrics(tmp_path):
    cache = f"paths.data_dir={tmp_path / 'cache'}"
    full = run_cli(["lowrank-ctr-train", *FT_ARGS, cache, f"hydra.run.dir={tmp_path / 'full'}"])
    assert full.returncode == 0, full.stderr[-3000:]

    run = tmp_path / "killed"
    # killed once the fine-tune has finished an epoch, part-way into the next
    train_and_kill([*FT_ARGS, cache], run, run / "checkpoints" / "compressed-last.ckpt", signal.SIGKILL)

    resumed = run_cli(["lowrank-ctr-train", *FT_ARGS, cache, "ckpt_path=last", f"hydra.run.dir={run}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "calibration is not repeated" in (run / "train.log").read_text()
    _same_outcome(read_results(tmp_path / "full"), read_results(run))


def test_compress_run_resumes_its_finetune(tmp_path):
    """lowrank-ctr-compress resume=true: an interrupted compression run reuses its calibration and fine-tune."""
    cache = f"paths.data_dir={tmp_path / 'cache'}"
    base = run_cli(["lowrank-ctr-train", *TINY, "model.mlp=[16,16]", "bench=false", cache,
                    f"hydra.run.dir={tmp_path / 'base'}"])
    assert base.returncode == 0, base.stderr[-3000:]
    args = ["lowrank-ctr-compress", f"ckpt_path={tmp_path / 'base' / 'checkpoints' / 'best.ckpt'}", "progress_bar=false",
            "logger=none", "bench=false", "compression.finetune_epochs=2", "compression.calibration_batches=2", cache,
            f"hydra.run.dir={tmp_path / 'c'}"]
    first = run_cli(args)
    assert first.returncode == 0, first.stderr[-3000:]
    a = read_results(tmp_path / "c")
    (tmp_path / "c" / "results.json").unlink()
    again = run_cli([*args, "resume=true"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "calibration is not repeated" in (tmp_path / "c" / "compress.log").read_text()
    b = read_results(tmp_path / "c")
    for key in ("compress/test/auc_before_finetune", "compress/val/auc", "test/auc", "compress/ratio"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
    assert b["config_hash"] == a["config_hash"]  # resume=true does not change what the run is
