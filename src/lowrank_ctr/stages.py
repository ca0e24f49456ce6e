"""Stage records of a run directory, so a run killed in a later stage resumes without redoing the earlier ones.

``lowrank-ctr-train`` has two long stages (``lowrank-ctr-compress`` the second one only): base training and compression + fine-tuning. Each finished stage leaves
a small JSON record (written atomically, keyed by the run's config hash without ``ckpt_path``), plus the weights it
needs in ``checkpoints/``. A resumed run (``ckpt_path=last``; for ``lowrank-ctr-compress``, ``resume=true``) reads the records: a finished base stage is not
trained again, and a compression whose calibration finished is not recalibrated; its fine-tune continues from
``checkpoints/compressed-last.ckpt``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from lowrank_ctr.config import UserError
from lowrank_ctr.jobs import config_hash

BASE = "base"  # base training + test finished: the base results
COMPRESSED = "compressed"  # calibration + compression + evaluation before fine-tuning finished


def stage_key(cfg: DictConfig) -> str:
    """The config hash a record must match; a training run's ``ckpt_path`` (``last``: how it resumes) is left out,
    a compression run's (the base checkpoint it compresses) is part of it."""
    return config_hash(cfg, ignore=("ckpt_path",) if cfg.get("task_name") == "train" else ())


def _path(run_dir: Path, stage: str) -> Path:
    return run_dir / "stages" / f"{stage}.json"


def write_stage(run_dir: Path, stage: str, cfg: DictConfig, record: dict[str, Any]) -> None:
    path = _path(run_dir, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"config_hash": stage_key(cfg), "record": record}, indent=2, default=float))
    tmp.replace(path)


def read_stage(run_dir: Path, stage: str, cfg: DictConfig) -> dict[str, Any] | None:
    """The record of a finished stage, or None; a record of another config is one clear error."""
    path = _path(run_dir, stage)
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    if saved.get("config_hash") != stage_key(cfg):
        raise UserError(f"{run_dir} holds a run of another configuration (stage record {path}): resume with the "
                        "same overrides the run was started with, or start a new run directory")
    return saved["record"]
