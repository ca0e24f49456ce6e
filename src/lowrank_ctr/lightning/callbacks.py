"""Small training callbacks (the compression callback lives in compression_callback.py)."""

from __future__ import annotations

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
