"""The one AUC / logloss implementation of the project (torchmetrics), used by training, evaluation
(``pipeline/evaluation.py``) and predict.

AUC is undefined when the labels hold a single class; torchmetrics then returns 0 with a warning, which a
results table would show as a (terrible) number. Here an undefined AUC is ``None`` (JSON null) with one warning
naming the split, the same in every command and in the report.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torchmetrics
from torch import nn

log = logging.getLogger(__name__)


class BinaryMetrics(nn.Module):
    """Streaming AUC + logloss over logits: ``update(logits, labels)`` per batch, ``compute()`` at the end.

    A ``nn.Module`` so it moves with its owner to the device and synchronises across DDP ranks (torchmetrics).
    ``compute()`` returns ``{"auc": float | None, "logloss": float}``; AUC is None when one class is missing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.auc = torchmetrics.classification.BinaryAUROC()
        self.logloss = torchmetrics.MeanMetric()
        self.positives = torchmetrics.SumMetric()
        self.count = torchmetrics.SumMetric()

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, labels = logits.detach().float(), labels.detach().float()
        self.auc.update(torch.sigmoid(logits), labels.long())
        self.logloss.update(nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none"))
        self.positives.update(labels.sum())
        self.count.update(torch.tensor(float(labels.numel()), device=labels.device))

    def compute(self, split: str = "") -> dict[str, float | None]:
        n, pos = float(self.count.compute()), float(self.positives.compute())
        if n == 0:
            raise ValueError(f"no rows to evaluate{' in the ' + split + ' split' if split else ''}")
        logloss = float(self.logloss.compute())
        if pos == 0 or pos == n:
            log.warning("AUC of %s is undefined: all %d labels are %d (one class); it is reported as null",
                        split or "these rows", int(n), int(pos > 0))
            return {"auc": None, "logloss": logloss}
        return {"auc": float(self.auc.compute()), "logloss": logloss}

    def reset(self) -> None:
        for m in (self.auc, self.logloss, self.positives, self.count):
            m.reset()


def binary_metrics(logits: torch.Tensor, labels: torch.Tensor, split: str = "") -> dict[str, float | None]:
    """AUC and logloss of one set of logits (``auc`` None when undefined)."""
    m = BinaryMetrics()
    m.update(torch.as_tensor(logits), torch.as_tensor(labels))
    return m.compute(split)


def finite_or_none(value: Any) -> float | None:
    """A metric for results.json: a finite float, or None (JSON null) for NaN / inf / missing."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
