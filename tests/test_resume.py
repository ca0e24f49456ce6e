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


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_to_the_same_metrics(tmp_path, sig):
    cache = f"paths.data_dir={tmp_path / 'cache'}"
    full = run_cli(["lowrank-ctr-train", *ARGS, cache, f"hydra.run.dir={tmp_path / 'full'}"])
    assert full.returncode == 0, full.stderr[-3000:]

    run = tmp_path / "killed"
    exe = str(Path(sys.executable).parent / "lowrank-ctr-train")
    proc = subprocess.Popen([exe, *ARGS, cache, f"hydra.run.dir={run}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "WANDB_MODE": "offline"})
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # part-way into the next epoch
    proc.send_signal(sig)
    proc.wait(timeout=60)
    if (run / "results.json").exists():
        pytest.skip("the run finished before it could be killed (machine too fast for this timing)")
    assert last.exists()

    resumed = run_cli(["lowrank-ctr-train", *ARGS, cache, "ckpt_path=last", f"hydra.run.dir={run}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = read_results(tmp_path / "full"), read_results(run)
    assert b["train/epochs"] == a["train/epochs"]
    assert b["test/auc"] == pytest.approx(a["test/auc"], abs=1e-6)
    assert b["test/logloss"] == pytest.approx(a["test/logloss"], abs=1e-6)


def test_resume_without_a_checkpoint_is_one_clear_error(tmp_path):
    r = run_cli(["lowrank-ctr-train", *TINY, "ckpt_path=last", f"hydra.run.dir={tmp_path / 'nothing'}"])
    assert r.returncode == 2 and "ckpt_path=last but" in r.stderr
