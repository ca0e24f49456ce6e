"""The compress stage (calibrate + replace + evaluate before fine-tuning) and the from-scratch stage (the compressed
structure trained from random initialisation with the base recipe: the TT-Rec protocol).

With ``compression.mlp_method`` and ``from_scratch`` both set, the embedding method's structure is trained from
scratch first, then the compress stage runs ``mlp_method`` on that trained model's Linears (``first``) and the
fine-tune follows, as after any compression."""

from __future__ import annotations

import copy
import logging
import shutil
import time
from dataclasses import replace

import torch
from torch import nn

from lowrank_ctr.compression import compress_from_config, compress_linear_stage
from lowrank_ctr.compression.api import CompressionReport
from lowrank_ctr.compression.spec import apply_spec
from lowrank_ctr.lightning.module import CTRModule
from lowrank_ctr.pipeline.context import RunContext, fit_callbacks, is_global_zero, save_model_checkpoint
from lowrank_ctr.pipeline.results import CompressResult, ScratchResult
from lowrank_ctr.pipeline.stage_cache import StageCache, package_version, shared_settings

log = logging.getLogger(__name__)
STAGE = "compressed"
SCRATCH_STAGE = "scratch"
PRE_FINETUNE_WEIGHTS = "compressed-init.pt"  # compressed weights before fine-tuning (state dict, weights only)
FINAL_CHECKPOINT = "compressed.ckpt"  # the compressed model the run tested, spec included


def _result(report: CompressionReport, seconds: float, **kw) -> CompressResult:
    return CompressResult(method=report.method, targets=list(report.policy["targets"]), ratio=report.ratio,
                          group_ratios=dict(report.group_ratios), params=report.compressed["total"]["params"],
                          bytes=report.compressed["total"]["bytes"], seconds=seconds,
                          calibration_batches=report.calibration_batches, layers=report.layers,
                          policy=report.policy, spec=report.spec, **kw)


def two_stage_from_scratch(comp) -> bool:
    """``method`` trained from scratch, then ``mlp_method`` on the Linears of the trained model."""
    return bool(comp.get("from_scratch")) and str(comp.get("mlp_method") or "none") != "none"


def compress_stage(ctx: RunContext, module: CTRModule, first: CompressionReport | None = None,
                   reference: nn.Module | None = None) -> tuple[nn.Module, CompressResult]:
    """Compress ``module.model`` in place; returns (a frozen copy of the base model, the result).

    The compressed model is tested against the base in one pass (AUC, logloss and ``compress/logit_mse``) and
    validated before any fine-tuning; those weights are saved as the fine-tune's fallback.
    ``first``: the report of a first stage trained from scratch (``two_stage_from_scratch``): only the Linear stage
    runs here. ``reference``: the base model (default: ``module.model`` as it comes in).
    """
    comp = ctx.cfg.compression
    base_model = reference if reference is not None else copy.deepcopy(module.model).eval()
    weights = ctx.run_dir / "checkpoints" / PRE_FINETUNE_WEIGHTS
    done = ctx.records.read(STAGE, CompressResult) if ctx.resuming else None
    if done is not None and weights.exists():
        built = {m["name"] for m in first.spec["modules"]} if first is not None else set()
        apply_spec(module.model, [m for m in done.spec["modules"] if m["name"] not in built])
        module.set_compression_spec(done.spec)
        module.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        log.info("resuming after the finished compression stage: calibration is not repeated")
        return base_model, done
    t0 = time.perf_counter()
    module.model.to(ctx.device)
    batches = ctx.calibration_batches(int(comp.calibration_batches))
    report = (compress_from_config(module.model, comp, batches) if first is None
              else compress_linear_stage(module.model, comp, batches, first))
    module.set_compression_spec(report.spec)
    seconds = time.perf_counter() - t0
    log.info("%s", report.summary())
    before, logit_mse = ctx.evaluate(module.model, "test", reference=base_model)
    before_val, _ = ctx.evaluate(module.model, "val")
    log.info("compressed, before fine-tuning: test/auc=%s test/logloss=%.5f logit MSE vs base=%.3g", before.auc,
             before.logloss, logit_mse)
    result = _result(report, seconds, before_test=before, before_val_auc=before_val.auc, logit_mse=logit_mse,
                     from_scratch=first is not None)
    if is_global_zero():
        weights.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in module.model.state_dict().items()}, weights)
        ctx.records.write(STAGE, result)
    return base_model, result


def scratch_stage(ctx: RunContext) -> tuple[CTRModule, CompressResult, ScratchResult, CompressionReport]:
    """``compression.from_scratch=true``: the compressed structure, randomly initialised, trained like the base
    (same recipe, ``trainer.max_epochs``), then tested. Its checkpoints go to ``scratch/``; the model it tested is
    the run's final one (``checkpoints/compressed.ckpt``) unless a Linear stage follows (``scratch/trained.ckpt``)."""
    comp = ctx.cfg.compression
    module = ctx.module()
    t0 = time.perf_counter()
    module.model.to(ctx.device)
    # A fresh (untrained) model compressed: the compressed structure with a random initialisation (the
    # compression side skips calibration itself when it knows from_scratch).
    report = compress_from_config(module.model, comp, ctx.calibration_batches(int(comp.calibration_batches)))
    module.set_compression_spec(report.spec)
    compressed = _result(report, time.perf_counter() - t0, before_test=None, before_val_auc=None, logit_mse=None,
                         from_scratch=True)
    done = ctx.records.read(SCRATCH_STAGE, ScratchResult) if ctx.resuming else None
    if done is not None:
        from lowrank_ctr.lightning.module import load_checkpoint

        module.load_state_dict(load_checkpoint(done.checkpoint)["state_dict"])
        log.info("resuming after the finished from-scratch stage")
        return module, compressed, done, report
    stage_dir = ctx.run_dir / "scratch"
    final = (stage_dir / "trained.ckpt" if two_stage_from_scratch(comp)
             else ctx.run_dir / "checkpoints" / FINAL_CHECKPOINT)
    cache = scratch_cache(ctx.cfg, report)
    cached = cache.read(ScratchResult) if cache is not None else None
    if cached is not None:
        from lowrank_ctr.lightning.module import load_checkpoint

        log.info("from scratch: reusing %s (the same structure, data, seed and training recipe)", cache.path)
        module.load_state_dict(load_checkpoint(cache.file(".ckpt"))["state_dict"])
        result = replace(cached, checkpoint=str(final), cached=True)
        if is_global_zero():
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(cache.file(".ckpt"), final)  # the run folder stays whole without the cache
            ctx.records.write(SCRATCH_STAGE, result)
        return module, compressed, result, report
    callbacks = fit_callbacks(ctx.cfg, stage_dir)
    last = stage_dir / "last.ckpt"
    trainer, seconds = ctx.fit(module, callbacks, stage_dir, last if ctx.resuming and last.exists() else None,
                               loggers=False)
    ctx.load_best(module, callbacks)
    test, _ = ctx.evaluate(module.model, "test")
    result = ScratchResult(training=ctx.training_stats(trainer, callbacks, seconds), val_auc=callbacks.best_score(),
                           test=test, checkpoint=str(final))
    if is_global_zero():
        save_model_checkpoint(module, final)
        ctx.records.write(SCRATCH_STAGE, result)
        if cache is not None:
            cache.write(result, files={".ckpt": final})
    return module, compressed, result, report


def scratch_cache(cfg, report: CompressionReport) -> StageCache | None:
    """``compression.scratch_cache=DIR``: one from-scratch training per (compressed structure, data, model, seed,
    trainer, optimizer, package version). The structure is the first stage's spec, so a two-stage sweep over
    ``target_ratio`` (whose first stage does not depend on it) trains the TT / QR model once per seed, not once
    per ratio; anything that changes the structure is another entry."""
    folder = cfg.compression.get("scratch_cache")
    if not folder:
        return None
    return StageCache.at(folder, "scratch", {"structure": report.spec, "settings": shared_settings(cfg),
                                             "package": package_version()})
