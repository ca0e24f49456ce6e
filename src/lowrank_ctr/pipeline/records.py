"""What a run IS (its config hash) and what it has DONE (one record per finished stage in ``RUN/stages/``).

A stage is done when its record exists: ``stages/base.json``, ``compressed.json``, ``finetune.json``,
``control.json``, ``scratch.json`` (written atomically, each holding the stage's typed result and the run's
config hash). A resumed run reads them and skips those stages; the weights a record needs live beside it in
``checkpoints/``. A record of another configuration is one clear error, never silently mixed in.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lowrank_ctr.config import UserError
from lowrank_ctr.pipeline.results import from_record, to_record

#: settings that never change what a run computes: they are not part of its identity
VOLATILE_KEYS: tuple[str, ...] = ("run_dir", "progress_bar", "resume", "skip_completed")


def config_hash(cfg: DictConfig | dict, ignore: tuple[str, ...] = ()) -> str:
    """Hash of the resolved job config without volatile settings (and ``ignore``): the run's identity."""
    d = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    d.pop("hydra", None)
    for key in VOLATILE_KEYS + tuple(ignore):
        d.pop(key, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_identity(cfg: DictConfig | dict) -> str:
    """The config hash a run directory, its stage records and its results.json carry.

    How a run is resumed is not what it is: the base stage names its resume-only keys in
    ``pipeline.resume_keys`` (training: ``ckpt_path``, the checkpoint it continues from; a compression run's
    ``ckpt_path`` is the model it compresses, so it is part of the identity there).
    """
    pipeline = (cfg.get("pipeline") if hasattr(cfg, "get") else None) or {}
    return config_hash(cfg, ignore=tuple(pipeline.get("resume_keys") or ()))


class StageRecords:
    """The ``stages/`` folder of one run directory, keyed by the run's identity."""

    def __init__(self, run_dir: Path, identity: str) -> None:
        self.dir = Path(run_dir) / "stages"
        self.identity = identity

    def path(self, stage: str) -> Path:
        return self.dir / f"{stage}.json"

    def write(self, stage: str, result: Any, **extra: Any) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path(stage)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"config_hash": self.identity, "record": to_record(result), **extra}, indent=2,
                                  default=float))
        tmp.replace(path)

    def read_raw(self, stage: str) -> dict[str, Any] | None:
        path = self.path(stage)
        if not path.exists():
            return None
        saved = json.loads(path.read_text())
        if saved.get("config_hash") != self.identity:
            raise UserError(f"{self.dir.parent} holds a run of another configuration (stage record {path}): resume "
                            "with the same overrides the run was started with, or start a new run directory")
        return saved

    def read(self, stage: str, cls: type) -> Any | None:
        """The typed result of a finished stage, or None."""
        saved = self.read_raw(stage)
        return None if saved is None else from_record(cls, saved["record"])

    def clear(self) -> None:
        """Forget every finished stage (a run started over without resuming)."""
        for path in self.dir.glob("*.json") if self.dir.exists() else []:
            path.unlink()

    def finished(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.json")) if self.dir.exists() else []
