"""Stage results shared across the runs of a table: ``compression.control_cache`` (one "base + same fine-tune"
control per base and recipe) and ``compression.scratch_cache`` (one from-scratch training per compressed
structure, data, seed and training recipe, reused by every ``target_ratio`` of a two-stage sweep).

An entry is ``<prefix>-<digest>.json`` holding its full key and the stage's record, plus any files it names
(written first, each atomically, so a present JSON means a complete entry). A read compares the stored key with
the wanted one, so a digest collision or a hand-edited entry is a miss, never a wrong result. Off (null) by
default: a key cannot see code edited in place (the package version is part of it, its source is not).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

#: settings that change nothing in a cached stage's fit: the compression config (each cache puts what matters of
#: it in its key), where and how a run reports, and how it was started
NOT_SHARED_KEYS = ("compression", "paths", "logger", "progress_bar", "bench", "bench_batch_sizes", "bench_int8",
                   "task_name",
                   "ckpt_path", "pipeline", "hparams_search", "optimized_metric", "min_ratio", "resume",
                   "skip_completed", "run_dir")


def shared_settings(cfg: DictConfig) -> dict[str, Any]:
    """The run's settings that decide a training's outcome (data, model, seed, trainer, optimizer, ...)."""
    return {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in NOT_SHARED_KEYS}


def package_version() -> str:
    try:
        return version("lowrank-ctr")
    except PackageNotFoundError:
        return "unknown"


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names and raw bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class StageCache:
    path: Path  # the entry's JSON
    key: dict[str, Any]

    @classmethod
    def at(cls, folder: str | os.PathLike, prefix: str, key: dict[str, Any]) -> "StageCache":
        key = json.loads(json.dumps(key, sort_keys=True, default=str))  # what a read will compare with
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return cls(path=Path(folder) / f"{prefix}-{digest}.json", key=key)

    def file(self, suffix: str) -> Path:
        """A file that belongs to this entry (e.g. ``.ckpt``)."""
        return self.path.with_suffix(suffix)

    def read(self, cls: type) -> Any | None:
        """The cached stage result, or None (no entry, another key, or a file of the entry missing)."""
        from lowrank_ctr.pipeline.results import from_record

        if not self.path.exists():
            return None
        saved = json.loads(self.path.read_text())
        if saved.get("key") != self.key or not all(self.file(s).exists() for s in saved.get("files", [])):
            return None
        return from_record(cls, saved["record"])

    def write(self, result: Any, files: dict[str, Path] | None = None) -> None:
        """Store ``result``; ``files``: suffix -> a file to copy in as ``<entry><suffix>`` (copied before the JSON)."""
        from lowrank_ctr.pipeline.results import to_record

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for suffix, source in (files or {}).items():
            target = self.file(suffix)
            tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")  # concurrent sweep jobs: atomic rename
            shutil.copyfile(source, tmp)
            tmp.replace(target)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": self.key, "record": to_record(result), "files": sorted(files or {})},
                                  indent=1, default=str))
        tmp.replace(self.path)
