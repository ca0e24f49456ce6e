"""Sweeps on existing engines: Hydra's joblib launcher (parallel jobs on one machine) and submitit (SLURM; its
``submitit_local`` flavour runs the same code path here). Each sweep finishes with one results.json per job, and a
re-run of the same sweep skips the finished jobs."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from helpers import TINY, run_cli
from lowrank_ctr.config import CONF_DIR

pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


@pytest.mark.parametrize("config_name", ["train", "compress"])
def test_launcher_configs_compose(config_name):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        joblib = compose(config_name, overrides=["hydra/launcher=joblib", "hydra.launcher.n_jobs=4"],
                         return_hydra_config=True).hydra.launcher
        slurm = compose(config_name, overrides=[
            "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=1",
            "hydra.launcher.timeout_min=240", "hydra.launcher.array_parallelism=8", "hydra.launcher.cpus_per_task=8",
        ], return_hydra_config=True).hydra.launcher
        local = compose(config_name, overrides=["hydra/launcher=submitit_local"], return_hydra_config=True)
    assert joblib._target_.endswith("JoblibLauncher") and joblib.n_jobs == 4
    assert slurm._target_.endswith("SlurmLauncher")
    assert (slurm.partition, slurm.gpus_per_node, slurm.timeout_min, slurm.array_parallelism) == ("gpu", 1, 240, 8)
    assert local.hydra.launcher._target_.endswith("LocalLauncher")
    # submitit's job files stay inside the sweep directory, not in the checkout
    assert local.hydra.launcher.submitit_folder.startswith(local.hydra.sweep.dir)


def test_ddp_across_nodes_composes():
    """The README's multi-node command: trainer=ddp with devices, num_nodes and bf16 mixed precision."""
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                                          "trainer.precision=bf16-mixed"])
    assert (cfg.trainer.strategy, cfg.trainer.devices, cfg.trainer.num_nodes, cfg.trainer.precision) == (
        "ddp", 4, 2, "bf16-mixed")


def _sweep(launcher: list[str], sweep_dir: Path, cache: Path):
    overrides = [o for o in TINY if not o.startswith("trainer.max_epochs")]
    return run_cli(["lowrank-ctr-train", "-m", *launcher, *overrides, "trainer.max_epochs=1", "model.mlp=[16,16]",
                    "bench=false", "seed=1,2", f"paths.data_dir={cache}", f"hydra.sweep.dir={sweep_dir}"], timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
                                      ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=15"]],
                         ids=["joblib", "submitit_local"])
def test_two_job_sweep_finishes_and_resumes(launcher, tmp_path):
    sweep_dir = tmp_path / "sweep"
    r = _sweep(launcher, sweep_dir, tmp_path / "cache")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    results = sorted(sweep_dir.glob("*/results.json"))
    assert [p.parent.name for p in results] == ["0", "1"], (r.stdout + r.stderr)[-3000:]
    import json

    assert [json.loads(p.read_text())["status"] for p in results] == ["ok", "ok"]
    assert sorted(json.loads(p.read_text())["seed"] for p in results) == [1, 2]
    written = {p: p.stat().st_mtime_ns for p in results}
    # the same sweep again: both jobs are complete for the same config, so neither trains again
    again = _sweep(launcher, sweep_dir, tmp_path / "cache")
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert {p: p.stat().st_mtime_ns for p in results} == written
    report = run_cli(["lowrank-ctr-report", str(sweep_dir)], timeout=120)
    assert report.returncode == 0 and "2 results.json found, 2 used" in report.stdout, report.stderr[-2000:]
