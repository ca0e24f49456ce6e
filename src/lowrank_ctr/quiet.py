"""Quiet by default: filter the messages of dependencies that a user cannot act on, and nothing else.

Imported (through :mod:`lowrank_ctr.config`) by every entry point before Lightning, torch or W&B are used. Each
filter below matches one message as narrowly as it can and says why it is harmless here; every other warning still
reaches the terminal (e.g. Lightning's "fewer training batches than the logging interval", our own "AUC is
undefined", a real DDP or data warning). ``LOWRANK_CTR_VERBOSE=1`` turns all filters off, to see everything.

Filtered where the message is not a Python warning:
- W&B's "The anonymous setting has no effect": :class:`lowrank_ctr.lightning.loggers.WandbLogger` stops passing the
  setting nobody set (Lightning's logger always passes ``anonymous=None``), so wandb has nothing to warn about.
"""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE_ENV = "LOWRANK_CTR_VERBOSE"

#: (message regex, category, module regex, why it is harmless) for Python warnings
WARNING_FILTERS: list[tuple[str, type[Warning], str, str]] = [
    (r".*isinstance\(treespec, LeafSpec\)", Warning, "",
     "Lightning's own code calls a torch API that torch deprecated; nothing in this project or a user's config "
     "uses it, and Lightning updates the call upstream"),
    (r"Checkpoint directory .* exists and is not empty", UserWarning, "",
     "a run directory is one run's own: its base stage leaves best/last.ckpt there before the compression "
     "fine-tune writes compressed-*.ckpt beside them, and a resumed run reuses it on purpose; results.json "
     "names the exact checkpoint file of every stage"),
    (r"Converting a tensor to a Python (boolean|integer|float|index) might cause the trace to be incorrect", Warning,
     r"lowrank_ctr\.(models|compression)\.",
     "export traces our layers' reads of sizes the schema fixes (number of fields, field offsets of the flat "
     "table, number of dense columns), which are constants of the model, never of the batch; export compares the "
     "traced model with PyTorch on a batch of another size and other ids, so a trace that froze anything that "
     "varies would fail there. Tracer warnings from any other module still show"),
]

#: (logger name, message start, why it is harmless) for log records
LOG_FILTERS: list[tuple[str, str, str]] = [
    *[(name, "💡 Tip:", "an advertisement for a paid Lightning service, printed at every Trainer start")
      for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                   "lightning_utilities.core.rank_zero", "pytorch_lightning.utilities.rank_zero")],
    ("lightning.pytorch.trainer.connectors.checkpoint_connector", "`weights_only` was not set",
     "it is about SAVING: the checkpoint also holds the optimizer and loop state that resume needs (plain tensors "
     "and containers); every load in this project passes torch.load(weights_only=True), so nothing executes code"),
]


class _DropMessages(logging.Filter):
    """Drops the records of one logger whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: list[str]) -> None:
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not str(record.getMessage()).startswith(self.prefixes)
        except Exception:  # noqa: BLE001 - a filter must never break logging
            return True


def install() -> None:
    """Add the filters (again where missing: ``warnings.catch_warnings`` blocks restore the filter list on exit);
    ``LOWRANK_CTR_VERBOSE=1`` keeps everything."""
    if os.environ.get(VERBOSE_ENV):
        return
    present = {f[1].pattern for f in warnings.filters if f[0] == "ignore" and f[1] is not None}
    for message, category, module, _why in WARNING_FILTERS:
        if message not in present:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
    prefixes: dict[str, list[str]] = {}
    for name, start, _why in LOG_FILTERS:
        prefixes.setdefault(name, []).append(start)
    for name, starts in prefixes.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(starts))


install()
