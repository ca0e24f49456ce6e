"""A run killed part-way resumes from its stage records and last checkpoints and ends where an uninterrupted run
ends. The kill happens at a training step the test waits for (tests/pausing_run.py), never "shortly after"."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import sample
from helpers import TINY, read_results, run_cli

ARGS = [*TINY, "data.rows=12000", "data.batch_size=128", "trainer.max_epochs=3", "early_stopping_patience=null",
        "model.mlp=[32,32]", "bench=false", "seed=3"]
PAUSER = Path(__file__).with_name("pausing_run.py")
TIMEOUT = 1800  # seconds per command: a loaded 2-core machine runs these several times slower than an idle one


def cli(args: list):
    return run_cli(args, timeout=TIMEOUT)


def run_and_kill(command: str, fit: str, epoch: int, step: int, args: list, run: Path, sig: int) -> None:
    """Start ``lowrank-ctr-<command>`` into ``run``; kill it with ``sig`` once ``fit`` reaches (epoch, step)."""
    ready, stderr = run.parent / f"{run.name}.paused", run.parent / f"{run.name}.stderr"
    with open(stderr, "w") as err:  # a file, not a pipe: a full pipe would block the run before it pauses
        proc = subprocess.Popen([sys.executable, str(PAUSER), command, fit, str(epoch), str(step), str(ready), *args,
                                 f"hydra.run.dir={run}"], stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "WANDB_MODE": "offline"}, cwd=Path(__file__).parent)
        deadline = time.time() + TIMEOUT
        while not ready.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert ready.exists(), f"the run never reached {fit} epoch {epoch} step {step}: {stderr.read_text()[-3000:]}"
        proc.send_signal(sig)
        proc.wait(timeout=120)
    assert not (run / "results.json").exists()  # it really was interrupted
    assert proc.returncode == (143 if sig == signal.SIGTERM else -signal.SIGKILL)  # never "finished" (status 0)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_to_the_same_metrics(tmp_path, sig):
    cache = f"paths.data_dir={tmp_path / 'cache'}"
    full = cli(["lowrank-ctr-train", *ARGS, cache, f"hydra.run.dir={tmp_path / 'full'}"])
    assert full.returncode == 0, full.stderr[-3000:]

    run = tmp_path / "killed"
    run_and_kill("train", "base", 1, 20, [*ARGS, cache], run, sig)  # second epoch, after its first validation
    resumed = cli(["lowrank-ctr-train", *ARGS, cache, "ckpt_path=last", f"hydra.run.dir={run}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = read_results(tmp_path / "full"), read_results(run)
    assert b["train/epochs"] == a["train/epochs"]
    assert b["val/auc"] == pytest.approx(a["val/auc"], abs=1e-6)
    assert b["test/auc"] == pytest.approx(a["test/auc"], abs=1e-6)
    assert b["test/logloss"] == pytest.approx(a["test/logloss"], abs=1e-6)


def test_resume_without_a_checkpoint_is_one_clear_error(tmp_path):
    r = cli(["lowrank-ctr-train", *TINY, "ckpt_path=last", f"hydra.run.dir={tmp_path / 'nothing'}"])
    assert r.returncode == 2 and "ckpt_path=last but" in r.stderr


FT_ARGS = [*TINY, "data.rows=12000", "data.batch_size=128", "trainer.max_epochs=2", "early_stopping_patience=null",
           "model.mlp=[32,32]", "bench=false", "seed=5", "compression=afm", "compression.finetune_epochs=2",
           "compression.calibration_batches=4", "compression.finetune_lr=0.003", "compression.control=true"]


def _same_outcome(a: dict, b: dict) -> None:
    for key in ("base/test/auc", "compress/test/auc_before_finetune", "compress/logit_mse", "compress/val/auc",
                "test/auc", "test/logloss", "compress/ratio", "control/test/auc"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
    assert b["compress/finetune_kept"] == a["compress/finetune_kept"]
    assert b["compress/ranks"] == a["compress/ranks"]


def test_resume_after_finished_stages_reuses_them(tmp_path):
    """A run whose stages all finished but which died before results.json: nothing is trained or calibrated again."""
    cache = f"paths.data_dir={tmp_path / 'cache'}"
    run = tmp_path / "run"
    full = cli(["lowrank-ctr-train", *FT_ARGS, cache, f"hydra.run.dir={run}"])
    assert full.returncode == 0, full.stderr[-3000:]
    a = read_results(run)
    (run / "results.json").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in (run / "checkpoints").glob("*")}
    resumed = cli(["lowrank-ctr-train", *FT_ARGS, cache, "ckpt_path=last", f"hydra.run.dir={run}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert "resuming after the finished base stage" in log and "calibration is not repeated" in log
    assert {p: p.stat().st_mtime_ns for p in (run / "checkpoints").glob("*")} == stamps  # nothing trained again
    _same_outcome(a, read_results(run))
    other = cli(["lowrank-ctr-train", *FT_ARGS, cache, "ckpt_path=last", "compression.mlp_rank=2",
                     f"hydra.run.dir={run}"])
    assert other.returncode == 2 and "another configuration" in other.stderr


def test_experiment_run_resumes_with_ckpt_path_last(tmp_path):
    """experiment=X sets its own task_name; resuming it must not depend on that (no special case on task_name)."""
    sample("criteo_sample", "train.txt")  # the real sample beside the checkout, or a clean skip
    args = ["experiment=criteo_deepfm", "data=criteo_sample", "model.embedding_dim=4", "model.mlp=[16,16]",
            "compression.mlp_rank=4", "compression.exclude=[]", "compression.calibration_batches=2",
            "trainer.max_epochs=1", "progress_bar=false", "logger=none", "bench=false",
            f"paths.data_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"]
    first = cli(["lowrank-ctr-train", *args])
    if first.returncode == 2 and "not present" in first.stderr:
        pytest.skip("the Criteo sample is not beside the checkout")
    assert first.returncode == 0, first.stderr[-3000:]
    a = read_results(tmp_path / "run")
    (tmp_path / "run" / "results.json").unlink()
    again = cli(["lowrank-ctr-train", *args, "ckpt_path=last"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming after the finished base stage" in (tmp_path / "run" / "train.log").read_text()
    assert read_results(tmp_path / "run")["test/auc"] == pytest.approx(a["test/auc"], abs=1e-9)


@pytest.fixture(scope="module")
def uninterrupted_finetune_run(tmp_path_factory) -> tuple[str, dict]:
    """The reference both kill points are compared with (one run, not one per parametrisation): its data cache
    override and its results."""
    root = tmp_path_factory.mktemp("uninterrupted")
    cache = f"paths.data_dir={root / 'cache'}"
    full = cli(["lowrank-ctr-train", *FT_ARGS, cache, f"hydra.run.dir={root / 'full'}"])
    assert full.returncode == 0, full.stderr[-3000:]
    return cache, read_results(root / "full")


@pytest.mark.slow
@pytest.mark.parametrize("fit", ["finetune", "control"])
def test_run_killed_during_finetune_or_control_resumes_to_the_same_metrics(tmp_path, fit,
                                                                           uninterrupted_finetune_run):
    cache, full = uninterrupted_finetune_run
    run = tmp_path / "killed"
    # killed in the second epoch of the fit, after the first epoch's state was saved
    run_and_kill("train", fit, 1, 10, [*FT_ARGS, cache], run, signal.SIGKILL)
    resumed = cli(["lowrank-ctr-train", *FT_ARGS, cache, "ckpt_path=last", f"hydra.run.dir={run}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "calibration is not repeated" in (run / "train.log").read_text()
    assert "stale lock" in (run / "train.log").read_text()  # SIGKILL left the lock of a process that is gone
    _same_outcome(full, read_results(run))


def test_compress_run_resumes_its_finetune(tmp_path):
    """lowrank-ctr-compress resume=true: an interrupted compression run reuses its calibration and fine-tune."""
    cache = f"paths.data_dir={tmp_path / 'cache'}"
    base = cli(["lowrank-ctr-train", *TINY, "model.mlp=[16,16]", "bench=false", cache,
                    f"hydra.run.dir={tmp_path / 'base'}"])
    assert base.returncode == 0, base.stderr[-3000:]
    args = ["lowrank-ctr-compress", f"ckpt_path={tmp_path / 'base' / 'checkpoints' / 'best.ckpt'}", "progress_bar=false",
            "logger=none", "bench=false", "compression.finetune_epochs=2", "compression.calibration_batches=2", cache,
            f"hydra.run.dir={tmp_path / 'c'}"]
    first = run_cli(args)
    assert first.returncode == 0, first.stderr[-3000:]
    a = read_results(tmp_path / "c")
    (tmp_path / "c" / "results.json").unlink()
    again = cli([*args, "resume=true"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "calibration is not repeated" in (tmp_path / "c" / "compress.log").read_text()
    b = read_results(tmp_path / "c")
    for key in ("compress/test/auc_before_finetune", "compress/val/auc", "test/auc", "compress/ratio"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
    assert b["config_hash"] == a["config_hash"]  # resume=true does not change what the run is
