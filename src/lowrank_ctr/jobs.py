"""How one Hydra job runs: user errors as one line, failed sweep jobs recorded, finished sweep jobs skipped.

In a multirun, a job that fails writes ``results.json`` with ``status: failed`` and the error, and the sweep goes
on with the next job; re-running the same sweep into the same ``hydra.sweep.dir`` skips every job whose
``results.json`` is complete for the same config (``config_hash``), so a crashed sweep continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import traceback
from pathlib import Path
from typing import Any, Callable

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lowrank_ctr.config import user_errors

log = logging.getLogger(__name__)
RESULTS_FILE = "results.json"
_VOLATILE = ("run_dir", "progress_bar", "resume")


def config_hash(cfg: DictConfig, ignore: tuple[str, ...] = ()) -> str:
    """Hash of the resolved job config (without settings that do not change results, nor ``ignore``)."""
    d = OmegaConf.to_container(cfg, resolve=True)
    for key in _VOLATILE + tuple(ignore):
        d.pop(key, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_results(run_dir: Path, results: dict[str, Any]) -> Path:
    """Atomic write: a results.json that exists is complete."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (RESULTS_FILE + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=float))
    tmp.replace(run_dir / RESULTS_FILE)
    return run_dir / RESULTS_FILE


def _multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def run_job(cfg: DictConfig, fn: Callable[[DictConfig], dict[str, Any]], run_dir: Path) -> dict[str, Any] | None:
    key = config_hash(cfg)
    if not _multirun():
        with user_errors():
            return fn(cfg)
    done = run_dir / RESULTS_FILE
    if cfg.get("skip_completed", True) and done.exists():
        try:
            previous = json.loads(done.read_text())
        except json.JSONDecodeError:
            previous = {}
        if previous.get("status") == "ok" and previous.get("config_hash") == key:
            log.info("skipping %s: results.json is complete for this config", run_dir)
            return previous
    try:
        return fn(cfg)
    except Exception as exc:  # noqa: BLE001 - a sweep must survive one bad job
        log.error("job failed: %s", exc)
        write_results(run_dir, {
            "status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
            "data": OmegaConf.select(cfg, "data.name"), "model": OmegaConf.select(cfg, "model.name"),
            "seed": cfg.get("seed"), "compress/method": OmegaConf.select(cfg, "compression.method"),
            "config_hash": key, "config": OmegaConf.to_container(cfg, resolve=False)})
        return None


def objective(cfg: DictConfig, results: dict[str, Any] | None) -> float | None:
    """What a job returns to a sweeper: ``optimized_metric``, -1 when the model misses ``min_ratio``, NaN if failed."""
    metric = cfg.get("optimized_metric")
    if not metric:
        return None
    if results is None or results.get(metric) is None:
        return float("nan")
    min_ratio = cfg.get("min_ratio")
    if min_ratio and float(results.get("compress/ratio", 1.0)) < float(min_ratio):
        return -1.0
    return float(results[metric])
