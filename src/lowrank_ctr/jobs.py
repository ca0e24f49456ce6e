"""How one Hydra job runs: user errors as one line, failed sweep jobs recorded, finished sweep jobs skipped.

In a multirun, a job that fails writes ``results.json`` with ``status: failed`` and the error, and the sweep goes
on with the next job (a diverged loss is such a failure, issue 11 rule 4); re-running the same sweep into the same
``hydra.sweep.dir`` skips every job whose ``results.json`` is complete for the same config (its identity, see
``pipeline.records.run_identity``) and continues unfinished ones from their stage records. A job refused because
its directory belongs to another run writes nothing there.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from lowrank_ctr.config import user_errors
from lowrank_ctr.pipeline.records import run_identity
from lowrank_ctr.pipeline import results as R
from lowrank_ctr.pipeline.results import KEY_CONFIG_HASH, KEY_RATIO, KEY_STATUS, read_results, write_results
from lowrank_ctr.pipeline.rundir import RunDirTaken
from lowrank_ctr.pipeline.runner import in_multirun

log = logging.getLogger(__name__)


def run_job(cfg: DictConfig, fn: Callable[[DictConfig], dict[str, Any]], run_dir: Path) -> dict[str, Any] | None:
    if not in_multirun():
        with user_errors():
            return fn(cfg)
    key = run_identity(cfg)
    previous = read_results(run_dir) or {}
    if cfg.get("skip_completed", True) and previous.get(KEY_STATUS) == "ok" and previous.get(KEY_CONFIG_HASH) == key:
        log.info("skipping %s: results.json is complete for this config", run_dir)
        return previous
    try:
        return fn(cfg)
    except RunDirTaken as exc:  # another run's directory: leave every file of it as it is
        log.error("job refused: %s", exc)
        return None
    except Exception as exc:  # noqa: BLE001 - a sweep must survive one bad job
        log.error("job failed: %s", exc)
        write_results(run_dir, {
            KEY_STATUS: "failed", R.KEY_ERROR: f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
            R.KEY_DATA: OmegaConf.select(cfg, "data.name"), R.KEY_MODEL: OmegaConf.select(cfg, "model.name"),
            R.KEY_SEED: cfg.get("seed"), R.KEY_METHOD: OmegaConf.select(cfg, "compression.method"),
            KEY_CONFIG_HASH: key, R.KEY_CONFIG: OmegaConf.to_container(cfg, resolve=False)})
        return None


def _worst_value() -> float:
    """The worst value for the sweeper's direction: a failed trial (e.g. a sampled rank outside a layer's range) is
    a bad point, not the end of the search (Hydra's Optuna sweeper stops the whole study on NaN)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        direction = str(OmegaConf.select(HydraConfig.get(), "sweeper.direction", default="") or "")
    except ValueError:  # no Hydra context (called from Python)
        direction = ""
    if "max" in direction:
        return float("-inf")
    if "min" in direction:
        return float("inf")
    return float("nan")


def objective(cfg: DictConfig, results: dict[str, Any] | None) -> float | None:
    """What a job returns to a sweeper: ``optimized_metric``, -1 when the model misses ``min_ratio``, the worst
    value for the sweeper's direction (NaN when it has none) when the job failed or the metric is undefined."""
    metric = cfg.get("optimized_metric")
    if not metric:
        return None
    if results is None or results.get(metric) is None:
        return _worst_value()
    min_ratio = cfg.get("min_ratio")
    if min_ratio and float(results.get(KEY_RATIO, 1.0)) < float(min_ratio):
        return -1.0
    return float(results[metric])
