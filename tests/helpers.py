"""Shared test helpers: compose the Hydra config with tiny settings and run a job in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from lowrank_ctr.config import CONF_DIR

TINY = ["data=synthetic", "data.rows=4000", "data.max_vocab=300", "data.batch_size=256",
        "data.eval_batch_size=1024", "model.embedding_dim=4", "trainer.max_epochs=1", "progress_bar=false",
        "logger=none"]


def tiny_model_overrides(model: str) -> list[str]:
    """Shrink each model's widest layers so a test epoch takes about a second."""
    small = {"mlp": "[16,16]", "cin_layers": "[8,8]", "cross_layers": "1", "mlp1": "[16]", "mlp2": "[16]",
             "fs_hidden": "[16]", "num_heads": "2", "attention_dim": "8", "attention_layers": "1"}
    from lowrank_ctr.models import model_arguments

    args = model_arguments(model)
    return [f"model={model}"] + [f"model.{k}={v}" for k, v in small.items() if k in args]


def compose_cfg(config_name: str, overrides: list[str], run_dir: Path, data_dir: Path) -> DictConfig:
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose(config_name, overrides=[*overrides, f"+run_dir={run_dir}", f"paths.data_dir={data_dir}"])


def run_cli(args: list[str], cwd: Path | None = None, timeout: int = 600, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """Run a console script exactly as a user would."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    exe = Path(sys.executable).parent / args[0]
    return subprocess.run([str(exe), *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env)


def read_results(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())
