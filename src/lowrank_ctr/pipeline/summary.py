"""How a run ends (issue 13, item 5): what happened, where the files are, what to run next.

- ``human_summary(results)``: base vs final model (AUC, size in parameters AND bytes, speed-up), files, next commands
  (report, export, ``wandb sync`` for offline W&B runs). Printed by ``lowrank-ctr-train`` / ``-compress``.
- ``MultirunSummary``: a Hydra callback (``hydra.callbacks`` in conf/pipeline/common.yaml) that ends a multirun
  with "N jobs: N ok, N failed, N skipped" and the ``lowrank-ctr-report`` command for its directory.
- ``log_summary``: the final numbers as logger summary metrics (W&B run summary, CSV / TensorBoard last step).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Mapping

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lowrank_ctr.pipeline import results as R
from lowrank_ctr.pipeline.results import (KEY_BASE_TEST_AUC, KEY_CHECKPOINT, KEY_CONTROL_TEST_AUC, KEY_METHOD,
                                          KEY_RATIO, KEY_TEST_AUC, RESULTS_FILE, bench_key)

log = logging.getLogger(__name__)


def _auc(value: Any) -> str:
    return "undefined (one class)" if value is None else f"{value:.4f}"


def _size(params: Any, nbytes: Any) -> str:
    if params is None or nbytes is None:
        return "size unknown"
    return f"{int(params):,} parameters, {_bytes(int(nbytes))}"


def _bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def _signed(value: float | None) -> str:
    return "undefined" if value is None else f"{value:+.4f}"


def _largest_speedup(results: Mapping[str, Any], what: str = "speedup") -> tuple[int, float] | None:
    """(largest batch size, its ``bench/<what>@B``), or None when not measured."""
    sizes = sorted(int(k.rpartition("@")[2]) for k in results if k.startswith(bench_key(what, 0)[:-1]))
    if not sizes or results.get(bench_key(what, sizes[-1])) is None:
        return None
    return sizes[-1], float(results[bench_key(what, sizes[-1])])


def human_summary(results: Mapping[str, Any]) -> str:
    """A few lines a person reads at the end of a run."""
    run_dir = Path(str(results.get(R.KEY_RUN_DIR) or "."))
    lines = []
    method = results.get(KEY_METHOD)
    what = f"{results.get(R.KEY_MODEL)} on {results.get(R.KEY_DATA)} (seed {results.get(R.KEY_SEED)})"
    if method is None:
        lines.append(f"base {what}: test AUC {_auc(results.get(KEY_TEST_AUC))}, "
                     f"{_size(results.get(R.KEY_PARAMS), results.get(R.KEY_BYTES))}")
        speed = None
    else:
        base_auc, auc = results.get(KEY_BASE_TEST_AUC), results.get(KEY_TEST_AUC)
        lines.append(f"base {what}: test AUC {_auc(base_auc)}, "
                     f"{_size(results.get(R.KEY_BASE_PARAMS), results.get(R.KEY_BASE_BYTES))}")
        scratch = results.get(R.KEY_FROM_SCRATCH)
        tuned = None if scratch and R.KEY_FINETUNE_EPOCHS not in results else (
            "fine-tune kept" if results.get(R.KEY_FINETUNE_KEPT) else
            "fine-tune not kept: no validation gain" if results.get(R.KEY_FINETUNE_EPOCHS) else "no fine-tune")
        how = ", ".join(x for x in ("trained from scratch" if scratch else None, tuned) if x)
        lines.append(f"compressed ({method}, {how}): test AUC {_auc(auc)} "
                     f"({_signed(results.get(R.KEY_AUC_DELTA))} vs base"
                     + (f", {_signed(results.get(R.KEY_CONTROL_AUC_DELTA))} vs base + same fine-tune "
                        f"{_auc(results.get(KEY_CONTROL_TEST_AUC))}" if KEY_CONTROL_TEST_AUC in results else "")
                     + f"), {_size(results.get(R.KEY_PARAMS), results.get(R.KEY_BYTES))}: "
                     f"{results.get(KEY_RATIO, float('nan')):.2f}x fewer bytes")
        speed = _largest_speedup(results)
    if speed is not None:
        lines.append(f"inference: {speed[1]:.2f}x faster than the base at batch {speed[0]} "
                     f"(median latency, {results.get(R.KEY_BENCH_THREADS)} threads; a quick in-run measurement)")
    elif results.get(bench_key("base_ms", 4096)) is not None:
        lines.append(f"inference: {results[bench_key('base_ms', 4096)]:.2f} ms per batch of 4096 (median)")
    if R.KEY_INT8_AUC in results:  # bench_int8=true
        if results[R.KEY_INT8_AUC] is None and results.get(R.KEY_INT8_LOGLOSS) is None:
            lines.append("int8 serving: not measured (the model has no Linear layer to run in int8)")
        else:
            fast = _largest_speedup(results, "int8_speedup")
            lines.append(f"int8 serving (CPU): test AUC {_auc(results[R.KEY_INT8_AUC])} "
                         f"({_signed(results.get(R.KEY_INT8_AUC_DELTA))} vs float32)"
                         + (f", {fast[1]:.2f}x the float32 model's speed at batch {fast[0]}" if fast else ""))
    lines.append(f"files: {run_dir / RESULTS_FILE}" + (f", model {results[KEY_CHECKPOINT]}"
                                                         if results.get(KEY_CHECKPOINT) else ""))
    lines.append("next:")
    lines.append(f"  lowrank-ctr-report {run_dir}")
    if results.get(KEY_CHECKPOINT):
        lines.append(f"  lowrank-ctr-export ckpt_path={results[KEY_CHECKPOINT]} format=onnx "
                     f"out=outputs/export/{run_dir.name}")
    for offline in sorted((run_dir / "wandb").glob("offline-run-*")):
        lines.append(f"  wandb sync {offline}")
    return "\n".join(lines)


def log_summary(loggers: list, results: Mapping[str, Any]) -> None:
    """Final numbers as logger summary metrics (W&B run summary, CSV/TensorBoard last step)."""
    flat = {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for lg in loggers:
        lg.log_metrics({f"final/{k}": float(v) for k, v in flat.items()})
        if type(lg).__name__ == "WandbLogger":
            lg.experiment.summary.update(flat)
            layers = results.get(R.KEY_LAYERS)
            if layers:
                import wandb

                cols = ["name", "group", "method", "rank", "full_rank", "retained_energy", "params_before",
                        "params_after", "bytes_before", "bytes_after"]
                lg.experiment.log({R.KEY_LAYERS: wandb.Table(
                    columns=cols, data=[[str(l.get(c)) for c in cols] for l in layers])})
        lg.finalize("success")
        if type(lg).__name__ == "WandbLogger":
            lg.experiment.finish()  # writes the run summary; the next job of a multirun starts a new run


def count_jobs(sweep_dir: Path, started: float) -> dict[str, int]:
    """ok / failed / skipped jobs below a sweep directory (a job dir holds Hydra's ``.hydra/``).

    skipped: complete before this multirun started (results.json older than its start); failed: a failed record,
    or no readable results.json at all (a job that died before writing one).
    """
    counts = {"ok": 0, "failed": 0, "skipped": 0}
    for job in sorted(p.parent for p in Path(sweep_dir).glob("*/.hydra")):
        path = job / RESULTS_FILE
        try:
            status = json.loads(path.read_text()).get("status")
        except (OSError, ValueError):
            status = None
        if status == "ok":
            counts["skipped" if path.stat().st_mtime < started else "ok"] += 1
        else:
            counts["failed"] += 1
    return counts


def multirun_line(counts: Mapping[str, int]) -> str:
    n = sum(counts.values())
    return f"{n} job{'s' if n != 1 else ''}: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped"


class MultirunSummary(Callback):
    """Ends a multirun with its job counts and the report command for its directory."""

    def __init__(self) -> None:
        self.started = time.time()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time() - 1.0  # file times have coarse resolution on some file systems

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        print(f"{multirun_line(count_jobs(sweep_dir, self.started))}\nnext:\n  lowrank-ctr-report {sweep_dir}",
              flush=True)
