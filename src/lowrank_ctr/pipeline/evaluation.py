"""Every evaluation of the pipeline: one pass over a split with ``lowrank_ctr.metrics.BinaryMetrics``.

Optionally, in the SAME pass: the mean squared difference of the model's logits from a reference model's
(``compress/logit_mse``: compressed vs base, before fine-tuning), and extra metrics from ``extra_metrics=[...]``
(torchmetrics ``Metric`` objects taking ``update(logits, labels)``; see README "How to extend: a new result key").
All of them synchronise across DDP ranks (torchmetrics), so every rank must call this together.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
import torchmetrics
from torch import nn

from lowrank_ctr.metrics import BinaryMetrics, finite_or_none
from lowrank_ctr.pipeline.results import Metrics

ExtraMetrics = Mapping[str, Callable[[], torchmetrics.Metric]]


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], device: torch.device | str,
             split: str, reference: nn.Module | None = None, extras: ExtraMetrics | None = None
             ) -> tuple[Metrics, float | None]:
    """(metrics of ``model`` on ``batches``, logit MSE against ``reference`` or None). Restores training modes."""
    device = torch.device(device)
    metrics = BinaryMetrics().to(device)
    extra = {name: make().to(device) for name, make in (extras or {}).items()}
    squared = torchmetrics.MeanMetric().to(device)
    models = [m for m in (model, reference) if m is not None]
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        for batch in batches:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            logits = model(batch).float()
            metrics.update(logits, batch["label"])
            for metric in extra.values():
                metric.update(logits, batch["label"])
            if reference is not None:
                squared.update((logits - reference(batch).float()).pow(2))
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    values = metrics.compute(split)
    result = Metrics(auc=values["auc"], logloss=float(values["logloss"]),
                     extra={name: _scalar(metric.compute()) for name, metric in extra.items()})
    return result, (float(squared.compute()) if reference is not None else None)


def _scalar(value: Any) -> float | None:
    if value is None:
        return None
    return finite_or_none(value.item() if isinstance(value, torch.Tensor) else value)
