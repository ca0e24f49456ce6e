"""``test/calibration``: predicted CTR / observed CTR on the split (1.0 = calibrated; None without positives).

The worked example of README "How to extend: a new result key" (this file + conf/extra_metrics/calibration.yaml).
"""

from __future__ import annotations

import torch
import torchmetrics


class Calibration(torchmetrics.Metric):
    def __init__(self) -> None:
        super().__init__()
        # float64 sums: millions of probabilities add up without losing the ratio's digits
        self.add_state("predicted", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("observed", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.predicted += torch.sigmoid(logits.double()).sum()
        self.observed += labels.double().sum()

    def compute(self) -> float | None:
        return None if float(self.observed) == 0 else float(self.predicted / self.observed)
