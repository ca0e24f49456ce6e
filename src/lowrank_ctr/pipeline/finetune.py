"""The recovery fine-tune (issue 10, item 3) and its honest control, with ONE recipe for both.

Recipe (``compression.*``): the loss mixes the labels with distillation from the frozen base model's logits,

    L = (1 - a) * BCE(z_s, y) + a * BCE(sigmoid(z_s / T), sigmoid(z_t / T)) * T^2      (a = distill, T = temperature)

a low learning rate (``finetune_lr``) reached by a linear warm-up over the first ``warmup`` share of the
fine-tune's steps, optionally frozen low-rank codes (``freeze_codes``: parameters named ``*.codes``; int8 codes
are buffers and never train), and validation ``1 / val_check_interval`` times per epoch keeping the best point —
or the weights from before the fine-tune when no point beats them on validation (``finetune_kept``).

The control ("base + same fine-tune") runs the identical recipe on the uncompressed base, distilling from a frozen
copy of itself: a pull towards its own starting point (after the first step the student has moved, so the term
is not zero), the same regulariser the compressed model gets.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Mapping

import torch
from omegaconf import DictConfig
from torch import nn

from lowrank_ctr.lightning.module import CTRModule
from lowrank_ctr.pipeline.stage_cache import StageCache, package_version, shared_settings, weights_digest

if TYPE_CHECKING:
    from lowrank_ctr.pipeline.context import RunContext
    from lowrank_ctr.pipeline.results import BaseResult, CompressResult, ControlResult, FinetuneResult

log = logging.getLogger(__name__)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      weight: float, temperature: float) -> torch.Tensor:
    """(1 - a) BCE(z_s, y) + a BCE(sigmoid(z_s/T), sigmoid(z_t/T)) T^2 (the soft term in its stable logit form)."""
    hard = nn.functional.binary_cross_entropy_with_logits(student_logits, labels)
    if weight == 0:
        return hard
    t = float(temperature)
    soft = nn.functional.binary_cross_entropy_with_logits(student_logits / t, torch.sigmoid(teacher_logits / t))
    return (1.0 - weight) * hard + weight * soft * t * t


#: the ``compression.*`` key of each FinetuneRecipe field (a run with another value of any of them is another
#: experiment: the report names them in a run's setting)
RECIPE_KEYS: dict[str, str] = {"epochs": "finetune_epochs", "lr": "finetune_lr", "distill": "distill",
                               "temperature": "temperature", "warmup": "warmup", "freeze_codes": "freeze_codes",
                               "val_check_interval": "val_check_interval"}


@dataclass(frozen=True)
class FinetuneRecipe:
    epochs: int
    lr: float
    distill: float
    temperature: float
    warmup: float
    freeze_codes: bool
    val_check_interval: float | int

    @classmethod
    def from_config(cls, comp: Mapping[str, Any]) -> "FinetuneRecipe":
        key = RECIPE_KEYS
        return cls(epochs=int(comp.get(key["epochs"], 1)), lr=float(comp.get(key["lr"], 5e-4)),
                   distill=float(comp.get(key["distill"], 0.0) or 0.0),
                   temperature=float(comp.get(key["temperature"], 1.0)),
                   warmup=float(comp.get(key["warmup"], 0.0) or 0.0),
                   freeze_codes=bool(comp.get(key["freeze_codes"], False)),
                   val_check_interval=comp.get(key["val_check_interval"], 1.0))


class FinetuneModule(CTRModule):
    """A CTRModule whose loss distills from a frozen teacher and whose learning rate warms up linearly.

    The teacher is held outside the module's state (checkpoints stay the student's only) and is moved to the
    student's device when the fit starts.
    """

    def __init__(self, *args: Any, distill: float = 0.0, temperature: float = 1.0, warmup: float = 0.0,
                 freeze_codes: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.distill, self.temperature, self.warmup = float(distill), float(temperature), float(warmup)
        self.freeze_codes = bool(freeze_codes)
        self._teacher: tuple[nn.Module, ...] = ()

    def set_teacher(self, teacher: nn.Module) -> None:
        teacher = copy.deepcopy(teacher).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self._teacher = (teacher,)

    def on_fit_start(self) -> None:
        if self._teacher:
            self._teacher[0].to(self.device)

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.distill == 0 or not self._teacher:
            return super().loss(logits, batch)
        with torch.no_grad():
            teacher_logits = self._teacher[0](batch)
        self._looked_up.clear()  # the teacher's lookups are not the student's (embedding L2)
        return distillation_loss(logits, teacher_logits, batch["label"], self.distill, self.temperature)

    def configure_optimizers(self) -> Any:
        if self.freeze_codes:
            frozen = [n for n, p in self.model.named_parameters() if n == "codes" or n.endswith(".codes")]
            for name, p in self.model.named_parameters():
                if name in frozen:
                    p.requires_grad_(False)
            log.info("fine-tune: %d code tensor(s) frozen (%s)", len(frozen), ", ".join(frozen) or "none found")
        config = super().configure_optimizers()
        if self.warmup <= 0:
            return config
        optimizer = config["optimizer"] if isinstance(config, dict) else config
        steps = max(1, int(self.warmup * self.trainer.estimated_stepping_batches))
        ramp = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": ramp, "interval": "step"}}


def finetune_module(cfg: DictConfig, make: Any, recipe: FinetuneRecipe, start: CTRModule, teacher: nn.Module
                    ) -> FinetuneModule:
    """A FinetuneModule with ``start``'s structure and weights, the recipe's optimizer and ``teacher``."""
    from hydra.utils import instantiate

    module = make(FinetuneModule, optimizer=instantiate(cfg.optimizer, lr=recipe.lr), scheduler=None,
                  compression_spec=start.hparams.get("compression_spec"), distill=recipe.distill,
                  temperature=recipe.temperature, warmup=recipe.warmup, freeze_codes=recipe.freeze_codes)
    module.model.load_state_dict(start.model.state_dict())
    module.set_teacher(teacher)
    return module


# Stages --------------------------------------------------------------------------------------------------------

FINETUNE_STAGE = "finetune"
CONTROL_STAGE = "control"


def _better(score: float | None, than: float | None) -> bool:
    return score is not None and (than is None or score > than)


def finetune_stage(ctx: "RunContext", compressed_module: CTRModule, teacher: nn.Module,
                   compressed: "CompressResult") -> tuple[CTRModule, "FinetuneResult"]:
    """Fine-tune the compressed model with the recipe; keep the best validation point, or the weights from before
    the fine-tune when no point beats them. Writes ``checkpoints/compressed.ckpt`` (the model then tested)."""
    from lowrank_ctr.lightning.module import load_checkpoint
    from lowrank_ctr.pipeline.compression import FINAL_CHECKPOINT
    from lowrank_ctr.pipeline.context import fit_callbacks, is_global_zero, save_model_checkpoint
    from lowrank_ctr.pipeline.results import FinetuneResult

    recipe = FinetuneRecipe.from_config(ctx.cfg.compression)
    final = ctx.run_dir / "checkpoints" / FINAL_CHECKPOINT
    done = ctx.records.read(FINETUNE_STAGE, FinetuneResult) if ctx.resuming else None
    if done is not None:
        compressed_module.load_state_dict(load_checkpoint(done.checkpoint)["state_dict"])
        return compressed_module, done
    if recipe.epochs == 0:
        result = FinetuneResult(epochs=0, seconds=0.0, kept=False, val_auc=compressed.before_val_auc,
                                test=compressed.before_test, checkpoint=str(final))
        module = compressed_module
    else:
        module = finetune_module(ctx.cfg, ctx.module, recipe, compressed_module, teacher)
        before = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
        callbacks = fit_callbacks(ctx.cfg, ctx.run_dir / "checkpoints", prefix="compressed-")
        last = ctx.run_dir / "checkpoints" / "compressed-last.ckpt"
        _, seconds = ctx.fit(module, callbacks, ctx.run_dir, last if ctx.resuming and last.exists() else None,
                             max_epochs=recipe.epochs, min_epochs=None, val_check_interval=recipe.val_check_interval)
        score = callbacks.best_score()
        kept = _better(score, compressed.before_val_auc)
        if kept:
            ctx.load_best(module, callbacks)
        else:  # fine-tuning did not help on validation: keep the compressed weights from before it
            module.model.load_state_dict(before)
        test, _ = ctx.evaluate(module.model, "test")
        result = FinetuneResult(epochs=recipe.epochs, seconds=seconds, kept=kept,
                                val_auc=score if kept else compressed.before_val_auc, test=test, checkpoint=str(final))
    if is_global_zero():
        save_model_checkpoint(module, final)
        ctx.records.write(FINETUNE_STAGE, result)
    return module, result


def control_stage(ctx: "RunContext", base_model: nn.Module, base: "BaseResult") -> "ControlResult":
    """"Base + same fine-tune": the uncompressed base through the identical recipe (checkpoints in ``control/``)."""
    from lowrank_ctr.pipeline.context import fit_callbacks, is_global_zero
    from lowrank_ctr.pipeline.results import ControlResult

    done = ctx.records.read(CONTROL_STAGE, ControlResult) if ctx.resuming else None
    if done is not None:
        return done
    recipe = FinetuneRecipe.from_config(ctx.cfg.compression)
    cache = control_cache(ctx.cfg, base_model, recipe)
    cached = cache.read(ControlResult) if cache is not None else None
    if cached is not None:
        log.info("control: reusing %s (the same base weights, data, seed and fine-tune recipe)", cache.path)
        if is_global_zero():
            ctx.records.write(CONTROL_STAGE, cached)
        return cached
    start = ctx.module()
    start.model.load_state_dict(base_model.state_dict())
    module = finetune_module(ctx.cfg, ctx.module, recipe, start, teacher=base_model)
    stage_dir = ctx.run_dir / "control"
    callbacks = fit_callbacks(ctx.cfg, stage_dir)
    last = stage_dir / "last.ckpt"
    ctx.fit(module, callbacks, stage_dir, last if ctx.resuming and last.exists() else None, loggers=False,
            max_epochs=recipe.epochs, min_epochs=None, val_check_interval=recipe.val_check_interval)
    kept = _better(callbacks.best_score(), base.val_auc)
    if kept:
        ctx.load_best(module, callbacks)
    else:
        module.model.load_state_dict(base_model.state_dict())
    test, _ = ctx.evaluate(module.model, "test")
    result = ControlResult(test=test, kept=kept)
    if is_global_zero():
        ctx.records.write(CONTROL_STAGE, result)
        if cache is not None:
            cache.write(result)
    return result


def control_cache(cfg: DictConfig, base_model: nn.Module, recipe: FinetuneRecipe) -> StageCache | None:
    """``compression.control_cache=DIR``: one control per (base weights, data, seed, trainer, optimizer, fine-tune
    recipe, package version), shared by every compression run of that base — a table of 20 methods and ratios
    fine-tunes its base once, not 20 times."""
    folder = cfg.compression.get("control_cache")
    if not folder:
        return None
    return StageCache.at(folder, "control", {"base_weights": weights_digest(base_model), "recipe": asdict(recipe),
                                             "settings": shared_settings(cfg), "package": package_version()})
