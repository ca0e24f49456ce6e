"""The base stage: the uncompressed model, either trained here (``lowrank-ctr-train``) or loaded from a checkpoint
(``lowrank-ctr-compress``). Both return the module holding the base weights and a ``BaseResult``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from omegaconf import DictConfig, open_dict

from lowrank_ctr.config import UserError
from lowrank_ctr.lightning.module import CTRModule, load_checkpoint
from lowrank_ctr.pipeline.context import (RunContext, check_checkpoint_schema, fit_callbacks, is_global_zero)
from lowrank_ctr.pipeline.results import BaseResult

log = logging.getLogger(__name__)
STAGE = "base"


def model_size_of(model) -> tuple[int, int]:
    from lowrank_ctr.compression.size import model_size

    total = model_size(model)["total"]
    return total["params"], total["bytes"]


def check_compression_config(ctx: RunContext, module: CTRModule) -> None:
    """Impossible compression settings fail before hours of base training (issue 11, rule 6)."""
    import lowrank_ctr.compression as compression

    comp = ctx.cfg.get("compression")
    if comp is not None and comp.get("method", "none") != "none" and hasattr(compression, "check_config"):
        batch = next(ctx.calibration_batches(1), None)  # folding is checked on one real batch
        module.model.to(ctx.device)
        compression.check_config(module.model, comp, batch=batch)


class BaseStage(Protocol):
    #: config keys that say how to resume, not what the run is (left out of the run's identity)
    resume_keys: tuple[str, ...]

    def resume_requested(self, cfg: DictConfig) -> bool: ...

    def prepare(self, cfg: DictConfig) -> None:
        """Complete the config before validation (e.g. from the checkpoint a run starts from)."""

    def run(self, ctx: RunContext) -> tuple[CTRModule, BaseResult]: ...


def restore(ctx: RunContext, result: BaseResult) -> CTRModule:
    module = ctx.module()
    module.load_state_dict(load_checkpoint(result.checkpoint)["state_dict"])
    log.info("resuming after the finished base stage (best checkpoint %s)", result.checkpoint)
    return module


class TrainBase:
    """Train with the base recipe (callbacks from config: best point on val/auc, epoch-end state for resume), then
    test the best point. ``ckpt_path``: continue training from a checkpoint (``last``: this run's)."""

    resume_keys = ("ckpt_path",)

    def resume_requested(self, cfg: DictConfig) -> bool:
        return bool(cfg.get("ckpt_path"))

    def prepare(self, cfg: DictConfig) -> None:
        pass

    def resume_checkpoint(self, ctx: RunContext) -> str | None:
        ckpt_path = ctx.cfg.get("ckpt_path")
        last = ctx.run_dir / "checkpoints" / "last.ckpt"
        if not ckpt_path:
            return str(last) if ctx.resuming and last.exists() else None  # a retried sweep job continues
        if ckpt_path == "last":
            if not last.exists():
                raise UserError(f"ckpt_path=last but {last} does not exist: pass hydra.run.dir=<the run to resume>")
            return str(last)
        p = Path(ckpt_path)
        if p.is_dir():
            p = p / "checkpoints" / "last.ckpt"
        if not p.exists():
            raise UserError(f"ckpt_path={ckpt_path}: no such checkpoint")
        return str(p)

    def run(self, ctx: RunContext) -> tuple[CTRModule, BaseResult]:
        done = ctx.records.read(STAGE, BaseResult) if ctx.resuming else None
        if done is not None:  # killed after base training: do not train or test it again
            self.resume_checkpoint(ctx)  # the same checks as a resume of the base stage
            return restore(ctx, done), done
        module = ctx.module()
        check_compression_config(ctx, module)
        resume_from = self.resume_checkpoint(ctx)
        if resume_from:
            check_checkpoint_schema(resume_from, ctx.schema, ctx.cfg.model.name)
        callbacks = fit_callbacks(ctx.cfg, ctx.run_dir / "checkpoints")
        trainer, seconds = ctx.fit(module, callbacks, ctx.run_dir, resume_from)
        best = ctx.load_best(module, callbacks)
        test, _ = ctx.evaluate(module.model, "test")
        params, nbytes = model_size_of(module.model)
        result = BaseResult(test=test, val_auc=callbacks.best_score(), params=params, bytes=nbytes, checkpoint=best,
                            training=ctx.training_stats(trainer, callbacks, seconds))
        if is_global_zero():
            ctx.records.write(STAGE, result)
        return module, result


class LoadBase:
    """The base model of a checkpoint written by ``lowrank-ctr-train`` (``ckpt_path``), tested as it is."""

    resume_keys: tuple[str, ...] = ()

    def resume_requested(self, cfg: DictConfig) -> bool:
        return bool(cfg.get("resume"))

    def prepare(self, cfg: DictConfig) -> None:
        """The checkpoint's model config (and data config, unless ``data=`` is given) complete the run's config."""
        if not cfg.get("ckpt_path"):
            raise UserError("ckpt_path is required: lowrank-ctr-compress ckpt_path=RUN/checkpoints/best.ckpt ...")
        hp = load_checkpoint(cfg.ckpt_path).get("hyper_parameters") or {}
        if "model_name" not in hp or "schema" not in hp:
            raise UserError(f"{cfg.ckpt_path} was not written by lowrank-ctr-train (no model/schema in it)")
        if hp.get("compression_spec"):
            raise UserError(f"{cfg.ckpt_path} is already compressed ({hp['compression_spec'].get('method')}); "
                            "compress the base checkpoint (best.ckpt) instead")
        with open_dict(cfg):
            if cfg.get("data") is None:
                if not hp.get("data_config"):
                    raise UserError("the checkpoint does not record its data config: pass data=NAME explicitly")
                cfg.data = hp["data_config"]
            cfg.model = {"name": hp["model_name"], **dict(hp.get("model_kwargs") or {})}

    def run(self, ctx: RunContext) -> tuple[CTRModule, BaseResult]:
        path = str(ctx.cfg.ckpt_path)
        check_checkpoint_schema(path, ctx.schema, ctx.cfg.model.name)
        module = ctx.module()
        module.load_state_dict(load_checkpoint(path)["state_dict"])
        check_compression_config(ctx, module)
        done = ctx.records.read(STAGE, BaseResult) if ctx.resuming else None
        if done is not None:
            return module, done
        test, _ = ctx.evaluate(module.model, "test")
        val, _ = ctx.evaluate(module.model, "val")
        params, nbytes = model_size_of(module.model)
        result = BaseResult(test=test, val_auc=val.auc, params=params, bytes=nbytes, checkpoint=path)
        if is_global_zero():
            ctx.records.write(STAGE, result)
        return module, result
