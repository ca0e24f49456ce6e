"""The run: base -> [compress -> fine-tune | from-scratch] -> [control] -> [bench], each stage typed and recorded.

``lowrank-ctr-train`` and ``lowrank-ctr-compress`` are this one pipeline with another base stage
(``pipeline.base: train | load`` in ``conf/pipeline/``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lowrank_ctr import bench
from lowrank_ctr.allocator import configure_malloc
from lowrank_ctr.config import UserError
from lowrank_ctr.pipeline import rundir
from lowrank_ctr.pipeline.base import BaseStage, LoadBase, TrainBase
from lowrank_ctr.pipeline.compression import compress_stage, scratch_stage, two_stage_from_scratch
from lowrank_ctr.pipeline.context import (RunContext, build_loggers, compute_device, is_global_zero,
                                          make_datamodule, run_dir_of)
from lowrank_ctr.pipeline.finetune import control_stage, finetune_stage
from lowrank_ctr.pipeline.records import StageRecords, run_identity
from lowrank_ctr.pipeline.results import BenchResult, Int8Result, RunResult, write_results
from lowrank_ctr.pipeline.summary import log_summary
from lowrank_ctr.precision import precision_warning
from lowrank_ctr.validate import validate

log = logging.getLogger(__name__)

BASE_STAGES: dict[str, type] = {"train": TrainBase, "load": LoadBase}


def base_stage_of(cfg: DictConfig) -> BaseStage:
    name = str(OmegaConf.select(cfg, "pipeline.base", default="train"))
    if name not in BASE_STAGES:
        raise ValueError(f"pipeline.base={name!r}: choose one of {sorted(BASE_STAGES)}")
    return BASE_STAGES[name]()


def in_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def bench_stage(ctx: RunContext, base_model: torch.nn.Module, final_model: torch.nn.Module | None) -> BenchResult:
    sizes = [int(s) for s in ctx.cfg.bench_batch_sizes]
    batches = bench.make_batches(ctx.dm.datasets["test"], sizes)
    base_ms, compressed_ms, threads = bench.measure(base_model.cpu(), final_model.cpu() if final_model else None,
                                                    batches, threads=ctx.cfg.get("threads"))
    return BenchResult(base_ms=base_ms, compressed_ms=compressed_ms, threads=threads)


def int8_stage(ctx: RunContext, final_model: torch.nn.Module) -> Int8Result:
    """``bench_int8=true``: the final model served with int8 Linear layers on CPU (lowrank_ctr.int8_inference) —
    its test metrics in one pass over the test split, and its latency at ``bench_batch_sizes`` next to the float32
    model's, back to back. A model without a Linear to convert gets null keys and a warning, not a number."""
    from lowrank_ctr.int8_inference import int8_weights, quantize_for_inference
    from lowrank_ctr.pipeline.evaluation import evaluate

    sizes = [int(s) for s in ctx.cfg.bench_batch_sizes]
    model = final_model.cpu()
    if not int8_weights(model):
        log.warning("bench_int8: %s has no Linear layer to run in int8: test/int8/* and bench/int8_* are null",
                    type(model).__name__)
        return Int8Result(test=None, sizes=sizes, float_ms={}, int8_ms={}, threads=torch.get_num_threads())
    served = quantize_for_inference(model)
    test, _ = evaluate(served, ctx.dm.test_dataloader(), "cpu", "test")
    batches = bench.make_batches(ctx.dm.datasets["test"], sizes)
    float_ms, int8_ms, threads = bench.measure(model, served, batches, threads=ctx.cfg.get("threads"))
    return Int8Result(test=test, sizes=sizes, float_ms=float_ms, int8_ms=int8_ms or {}, threads=threads)


def int8_problem(cfg: DictConfig) -> str | None:
    """Why ``bench_int8=true`` cannot run with this torch (no quantized engine), or None: asked before any work."""
    if not cfg.get("bench_int8"):
        return None
    from lowrank_ctr.int8_inference import engine_problem

    problem = engine_problem()
    return f"bench_int8=true: {problem}; or set bench_int8=false" if problem else None


def extra_metrics(cfg: DictConfig) -> dict[str, Any]:
    """``extra_metrics=[name,...]``: factories of the torchmetrics that add ``test/<name>`` keys."""
    return {name: instantiate(mcfg) for name, mcfg in (cfg.get("extra_metrics") or {}).items()
            if mcfg is not None and "_target_" in mcfg}


def run(cfg: DictConfig, identity: str | None = None) -> dict[str, Any]:
    """Everything one job does; returns the results dict (also written to ``RUN/results.json``).

    ``identity``: the run's config hash when the config was completed after it was given (a compression run
    fills in the checkpoint's data and model config).
    """
    identity = identity or run_identity(cfg)  # of the config as given (before the base stage completes it)
    stage = base_stage_of(cfg)
    stage.prepare(cfg)
    validate(cfg)
    problem = int8_problem(cfg)
    if problem:
        raise UserError(problem)
    slow = precision_warning(OmegaConf.select(cfg, "trainer.precision", default="32"),
                             OmegaConf.select(cfg, "trainer.accelerator", default="cpu"))
    if slow:
        log.warning(slow)
    run_dir = run_dir_of(cfg)
    if is_global_zero():
        rundir.acquire(run_dir, identity, command=str(cfg.get("task_name") or "run"))
    try:
        return _run(cfg, stage, run_dir, identity)
    finally:
        if is_global_zero():
            rundir.release(run_dir)


def _run(cfg: DictConfig, stage: BaseStage, run_dir, identity: str) -> dict[str, Any]:
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    configure_malloc(cfg.get("malloc"))
    resuming = stage.resume_requested(cfg) or in_multirun()  # a retried sweep job continues where it stopped
    records = StageRecords(run_dir, identity)
    if not resuming and is_global_zero():
        records.clear()  # the same run started over: its earlier stage records would describe other weights
    ctx = RunContext(cfg=cfg, run_dir=run_dir, identity=identity, resuming=resuming, records=records,
                     dm=make_datamodule(cfg), loggers=build_loggers(cfg, run_dir), device=compute_device(cfg),
                     extras=extra_metrics(cfg))
    module, base = stage.run(ctx)
    result = RunResult(data=str(cfg.data.name), model=str(cfg.model.name), seed=int(cfg.seed), base=base)
    base_model = module.model
    final_model = None
    comp = cfg.get("compression")
    if comp is not None and comp.get("method", "none") != "none":
        if comp.get("from_scratch"):
            final, result.compress, result.scratch, first = scratch_stage(ctx)
            if two_stage_from_scratch(comp):  # the Linears of the trained structure, then the usual fine-tune
                _, result.compress = compress_stage(ctx, final, first=first, reference=base_model)
                final, result.finetune = finetune_stage(ctx, final, base_model, result.compress)
        else:
            base_model, result.compress = compress_stage(ctx, module)
            final, result.finetune = finetune_stage(ctx, module, base_model, result.compress)
        final_model = final.model
        if comp.get("control") and int(comp.get("finetune_epochs", 0)) > 0:
            result.control = control_stage(ctx, base_model, base)
    if cfg.get("bench", True):
        result.bench = bench_stage(ctx, base_model, final_model)
    if cfg.get("bench_int8", False):
        result.int8 = int8_stage(ctx, final_model if final_model is not None else base_model)
    result.run_dir, result.config_hash = str(run_dir), identity
    result.config = OmegaConf.to_container(cfg, resolve=True)
    results = result.to_json()
    if is_global_zero():
        write_results(run_dir, results)
        log_summary(ctx.loggers, results)
    return results


def main_job(cfg: DictConfig) -> float | None:
    """The body of both console scripts: run the job (one line per user error; sweep bookkeeping), print how it
    ended, and return what a Hydra sweeper optimises."""
    import os

    from lowrank_ctr.jobs import objective, run_job
    from lowrank_ctr.pipeline.summary import human_summary

    results = run_job(cfg, run, run_dir_of(cfg))
    if results is not None and int(os.environ.get("LOCAL_RANK", 0)) == 0 and results.get("status") == "ok":
        print(human_summary(results), flush=True)
    return objective(cfg, results)


def entry_point(config_name: str) -> Callable[[], None]:
    """A console script running ``main_job`` on ``conf/<config_name>.yaml`` (its log: ``<config_name>.log``)."""
    import hydra

    from lowrank_ctr.config import CONF_DIR

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
    def _main(cfg: DictConfig) -> float | None:
        return main_job(cfg)

    return _main
