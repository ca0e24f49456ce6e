"""Training progress a person can read everywhere: a compact rich bar on a terminal, short lines elsewhere.

Outside a terminal (a log file, CI, a SLURM job, a Hydra joblib/submitit launcher) a live bar prints nothing useful
for minutes, so :class:`LineProgress` prints one short line every ``every_n_steps`` steps or ``every_s`` seconds::

    epoch 1/2 | step 130/1300 (10%) | 31,336 samples/s | loss 0.5490 | epoch ETA 0:01:48
    epoch 1/2 done in 0:02:01 | val/auc 0.7102 | val/logloss 0.4561

On a terminal :class:`CompactRichProgressBar` is Lightning's rich bar made to fit 80 columns: epochs counted from 1
("Epoch 1/2" in a 2-epoch run), no ``v_num``, only the loss and validation AUC, a fixed-width bar.
:func:`progress_bar` picks one of the two for the current stdout. Both print on global rank zero only.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

def shown_loss(trainer: pl.Trainer) -> float | None:
    """The training loss a bar shows: CTRModule's running mean of the epoch so far (read only when a bar prints:
    reading waits for a GPU), else a logged ``train/loss[_step]`` of another LightningModule."""
    running = getattr(trainer.lightning_module, "running_train_loss", None)
    if callable(running) and (value := running()) is not None:
        return _number(value)
    for key in ("train/loss_step", "train/loss"):
        value = trainer.progress_bar_metrics.get(key, trainer.callback_metrics.get(key))
        if value is not None:
            return _number(value)
    return None


def _clock(seconds: float) -> str:
    """``0:01:48`` (h:mm:ss); ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _batch_rows(batch: Any) -> int:
    """Rows in a batch: the label's length for our batches, else the first tensor's."""
    if isinstance(batch, dict):
        if isinstance(batch.get("label"), torch.Tensor):
            return int(batch["label"].shape[0])
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            if isinstance(item, torch.Tensor) and item.dim() > 0:
                return int(item.shape[0])
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) and batch.dim() > 0 else 0


def _total(batches: Any, dataloader_idx: int) -> float:
    """Batches of one evaluation dataloader (inf when unknown)."""
    try:
        return float(batches[dataloader_idx])
    except (TypeError, IndexError, ValueError):
        return math.inf


def _epochs(trainer: pl.Trainer) -> str:
    """``1/2``: the current epoch counted from 1, out of max_epochs (``1`` alone when training has no limit)."""
    current = trainer.current_epoch + 1
    limit = trainer.max_epochs
    return f"{current}/{limit}" if limit is not None and limit > 0 else f"{current}"


class LineProgress(ProgressBar):
    """One short line of progress every ``every_n_steps`` steps or ``every_s`` seconds, whichever comes first.

    ``every_n_steps=None``: every tenth of an epoch. Validation and test print a line only when they run longer than
    ``every_s`` (large evaluation sets). Written to ``stream`` (stdout) and flushed, so logs show it at once.
    """

    def __init__(self, every_n_steps: int | None = None, every_s: float = 30.0, stream: TextIO | None = None) -> None:
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be >= 1 (or None: every tenth of an epoch)")
        if every_s <= 0:
            raise ValueError(f"every_s={every_s} must be > 0 seconds")
        self.every_n_steps = every_n_steps
        self.every_s = float(every_s)
        self._stream = stream
        self._enabled = True
        self._epoch_start = self._last_print = self._eval_start = 0.0
        self._samples = 0
        self._step, self._total = 0, math.inf  # the last training step seen, of how many
        self._epoch_reported = False

    # -- ProgressBar interface
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args: Any, sep: str = " ", **kwargs: Any) -> None:
        if self._enabled:
            stream = self._stream or sys.stdout
            stream.write(sep.join(map(str, args)) + "\n")
            stream.flush()

    # -- training
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = self._last_print = time.perf_counter()
        self._samples = 0
        self._step, self._total = 0, self.total_train_batches
        self._epoch_reported = False

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._epoch_reported:  # no validation at the end of this epoch said it
            self.print(f"epoch {_epochs(trainer)} done in {_clock(time.perf_counter() - self._epoch_start)}")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._samples += _batch_rows(batch) * trainer.world_size
        step, total = batch_idx + 1, self.total_train_batches
        self._step, self._total = step, total
        now = time.perf_counter()
        every = self.every_n_steps or (max(1, int(total) // 10) if math.isfinite(total) else None)
        due = (every is not None and step % every == 0) or now - self._last_print >= self.every_s
        if due or step == total:
            self._last_print = now
            self.print(self.train_line(trainer, step, total, now - self._epoch_start))

    def train_line(self, trainer: pl.Trainer, step: int, total: float, elapsed: float) -> str:
        parts = [f"epoch {_epochs(trainer)}"]
        if math.isfinite(total) and total > 0:
            parts.append(f"step {step}/{int(total)} ({100 * step / total:.0f}%)")
        else:
            parts.append(f"step {step}")
        if elapsed > 0:
            parts.append(f"{self._samples / elapsed:,.0f} samples/s")
        loss = shown_loss(trainer)
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if math.isfinite(total) and step < total and elapsed > 0:
            parts.append(f"epoch ETA {_clock(elapsed / step * (total - step))}")
        return " | ".join(parts)

    # -- evaluation
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start = self._last_print = time.perf_counter()

    on_test_start = on_validation_start

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_tick("validating", batch_idx, _total(trainer.num_val_batches, dataloader_idx))

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_tick("testing", batch_idx, _total(trainer.num_test_batches, dataloader_idx))

    def _eval_tick(self, what: str, batch_idx: int, total: float) -> None:
        now = time.perf_counter()
        if now - self._last_print >= self.every_s:
            self._last_print = now
            of = f"/{int(total)}" if math.isfinite(total) else ""
            self.print(f"{what}: batch {batch_idx + 1}{of} ({_clock(now - self._eval_start)} so far)")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        elapsed = _clock(time.perf_counter() - self._epoch_start)
        if self._step < self._total:  # validation inside the epoch (trainer.val_check_interval < 1)
            parts = [f"epoch {_epochs(trainer)} step {self._step}/{int(self._total)} validation ({elapsed} in epoch)"]
        else:
            parts = [f"epoch {_epochs(trainer)} done in {elapsed}"]
            self._epoch_reported = True
        for key, value in trainer.callback_metrics.items():
            if key.startswith("val/"):
                v = _number(value)
                parts.append(f"{key} {v:.4f}" if v is not None else f"{key} undefined")
        self.print(" | ".join(parts))


class CompactRichProgressBar(RichProgressBar):
    """Lightning's rich bar, fitted to 80 columns: "Epoch 1/2" counted from 1, no ``v_num``, loss and val/auc only."""

    BAR_WIDTH = 10  # the widest line ("Epoch 10/10", 5-digit steps, both times, loss and val/auc) stays < 80
    # Reading the logged loss turns it into a Python float, which waits for a GPU's queued work: Lightning's bar
    # does it every step; this one at most every METRICS_EVERY_S during training (and always after validation).
    METRICS_EVERY_S = 0.5

    def __init__(self, leave: bool = False, **kwargs: Any) -> None:
        super().__init__(leave=leave, **kwargs)
        self._metrics_read = -math.inf
        self._skip_metrics = False

    def metrics_due(self, now: float) -> bool:
        """Whether a training step at time ``now`` reads the metrics (and if so, restarts the interval)."""
        if now - self._metrics_read < self.METRICS_EVERY_S:
            return False
        self._metrics_read = now
        return True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._skip_metrics = not (self.metrics_due(time.perf_counter()) or batch_idx + 1 == self.total_train_batches)
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._skip_metrics = False

    def _update_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._skip_metrics:
            super()._update_metrics(trainer, pl_module)

    def _get_train_description(self, current_epoch: int) -> str:
        limit = self.trainer.max_epochs
        text = f"Epoch {current_epoch + 1}" + (f"/{limit}" if limit is not None and limit > 0 else "")
        # padded like Lightning's, so the bar does not jump between training and validation
        return f"{text:{len(self.validation_description)}}"

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        loss, auc = shown_loss(trainer), _number(trainer.progress_bar_metrics.get("val/auc"))
        return {name: v for name, v in (("loss", loss), ("val/auc", auc)) if v is not None}

    def configure_columns(self, trainer: pl.Trainer) -> list:
        from lightning.pytorch.callbacks.progress.rich_progress import (BatchesProcessedColumn, CustomBarColumn,
                                                                        CustomTimeColumn)
        from rich.progress import TextColumn

        return [TextColumn("[progress.description]{task.description}"),
                CustomBarColumn(bar_width=self.BAR_WIDTH, complete_style=self.theme.progress_bar,
                                finished_style=self.theme.progress_bar_finished,
                                pulse_style=self.theme.progress_bar_pulse),
                BatchesProcessedColumn(style=self.theme.batch_progress),
                CustomTimeColumn(style=self.theme.time)]


def progress_bar(every_n_steps: int | None = None, every_s: float = 30.0,
                 stream: TextIO | None = None) -> ProgressBar:
    """The progress display for this process: the compact rich bar when stdout is a terminal, else lines."""
    out = stream or sys.stdout
    if hasattr(out, "isatty") and out.isatty():
        return CompactRichProgressBar(leave=False)
    return LineProgress(every_n_steps=every_n_steps, every_s=every_s, stream=stream)
