"""Trainer callbacks. Which ones a run uses is config (``conf/callbacks/``); ``DatasetEpoch`` is always added."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl


class TrainThroughput(pl.Callback):
    """Samples per second of the training loop (data loading + step), validation excluded."""

    def __init__(self) -> None:
        self.samples = 0
        self.seconds = 0.0
        self._start: float | None = None
        self._last: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self._last = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.samples += int(batch["label"].shape[0]) * trainer.world_size
        self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def _close(self) -> None:
        if self._start is not None and self._last is not None:
            self.seconds += self._last - self._start
        self._start = self._last = None

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


class DatasetEpoch(pl.Callback):
    """Tell each training dataset the epoch, for a new shuffle order every epoch.

    Lightning calls ``set_epoch`` on a loader's sampler; our streaming datasets shuffle themselves (an
    IterableDataset has no sampler), so this does the same for any training dataset that has ``set_epoch``.
    It runs before the epoch's iterator is created (loader workers copy the dataset when it is).
    """

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loaders = trainer.train_dataloader
        if isinstance(loaders, dict):
            loaders = list(loaders.values())
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            set_epoch = getattr(getattr(loader, "dataset", None), "set_epoch", None)
            if callable(set_epoch):
                set_epoch(trainer.current_epoch)


class EarlyStopping(pl.callbacks.EarlyStopping):
    """Lightning's early stopping with the patience in EPOCHS without improvement (None: never stops).

    Lightning counts validation checks; with several validations per epoch (``trainer.val_check_interval``)
    the same number would stop after a fraction of an epoch. The patience in checks is derived from the
    number of validations per epoch once the trainer knows it.
    """

    def __init__(self, patience_epochs: float | None, monitor: str = "val/auc", mode: str = "max",
                 **kwargs: Any) -> None:
        super().__init__(monitor=monitor, mode=mode, patience=1, **kwargs)
        self.patience_epochs = patience_epochs

    def _set_patience(self, trainer: pl.Trainer) -> None:
        batches, every = trainer.num_training_batches, trainer.val_check_batch
        checks = batches // every if isinstance(batches, int) and isinstance(every, int) and every > 0 else 1
        self.patience = max(0, math.ceil(float(self.patience_epochs) * max(checks, 1)))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.patience_epochs is None:
            return
        self._set_patience(trainer)
        super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.patience_epochs is None:
            return
        self._set_patience(trainer)
        super().on_train_epoch_end(trainer, pl_module)


class DecayOnPlateau(pl.Callback):
    """At every validation: when ``monitor`` has not improved for ``patience`` validations, go back to the best
    weights so far (the ``best`` ModelCheckpoint's file, optimizer state included) and multiply the learning rate by
    ``factor``; after ``max_decays`` decays, the next plateau stops training.

    Why: CTR models overfit after about one epoch, and the best point is then improved by one more pass at a lower
    rate FROM that point (what a "base + same fine-tune" control does). Decaying only the rate would continue from
    the overfit weights; a fixed schedule (x0.1 after epoch 1) would slow down a model that is still improving.
    This reaches the best validation point in both cases. Its counters are checkpointed (exact resume).
    """

    def __init__(self, monitor: str = "val/auc", mode: str = "max", factor: float = 0.1, patience: int = 1,
                 max_decays: int = 2, min_delta: float = 0.0, restore_best: bool = True) -> None:
        if mode not in ("max", "min") or not 0 < factor < 1 or patience < 1 or max_decays < 0:
            raise ValueError("DecayOnPlateau: mode max|min, 0 < factor < 1, patience >= 1, max_decays >= 0")
        self.monitor, self.mode, self.factor, self.patience = monitor, mode, float(factor), int(patience)
        self.max_decays, self.min_delta, self.restore_best = int(max_decays), float(min_delta), bool(restore_best)
        self.best: float | None = None
        self.wait = 0
        self.decays = 0

    def _improved(self, score: float) -> bool:
        if self.best is None:
            return True
        return score > self.best + self.min_delta if self.mode == "max" else score < self.best - self.min_delta

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        score = float(trainer.callback_metrics[self.monitor])
        if math.isfinite(score) and self._improved(score):
            self.best, self.wait = score, 0
            return
        self.wait += 1
        if self.wait < self.patience:
            return
        self.wait = 0
        if self.decays >= self.max_decays:
            trainer.should_stop = True
            return
        self.decays += 1
        rates = [[group["lr"] for group in opt.param_groups] for opt in trainer.optimizers]
        best = self._best_checkpoint(trainer)
        if self.restore_best and best:
            from lowrank_ctr.lightning.module import load_checkpoint

            ckpt = load_checkpoint(best)
            pl_module.load_state_dict(ckpt["state_dict"])
            for opt, state in zip(trainer.optimizers, ckpt.get("optimizer_states") or []):
                opt.load_state_dict(state)  # moments of the best point (its rate is replaced below)
        for opt, old in zip(trainer.optimizers, rates):
            for group, lr in zip(opt.param_groups, old):
                group["lr"] = lr * self.factor
        for config in trainer.lr_scheduler_configs:  # schedulers that set the rate from base_lrs follow too
            if hasattr(config.scheduler, "base_lrs"):
                config.scheduler.base_lrs = [lr * self.factor for lr in config.scheduler.base_lrs]

    def _best_checkpoint(self, trainer: pl.Trainer) -> str | None:
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "monitor", None) == self.monitor and cb.best_model_path:
                return cb.best_model_path
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "decays": self.decays}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.wait, self.decays = state_dict["best"], state_dict["wait"], state_dict["decays"]
