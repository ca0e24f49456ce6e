"""CompressionCallback: compress a trained model inside the fine-tuning run's Lightning lifecycle.

Attach it to the Trainer that fine-tunes. In ``setup("fit")`` (every DDP rank, before optimizers exist) it runs
the calibration batches from the train loader (statistics are summed over ranks), replaces the targeted modules
and records the compression spec on the LightningModule so every checkpoint rebuilds the compressed structure.
In ``on_fit_start`` (model on its device) it evaluates the compressed model on the test and validation splits
before any fine-tuning, and keeps those weights: when fine-tuning does not improve the validation AUC, the runner
restores them (model selection on validation, never on test). The fine-tuning itself is the fit the callback is attached to; the runner tests afterwards.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Callable, Mapping, Sequence

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn

from lowrank_ctr.compression import compress
from lowrank_ctr.compression.api import CompressionReport

log = logging.getLogger(__name__)


def _rank_arg(value: Any) -> Any:
    """int rank, float ratio in (0, 1], or None (from YAML, 2 and 2.0 mean a rank of 2)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer() and value > 1:
        return int(value)
    return value


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, device: torch.device | str = "cpu") -> dict[str, float]:
    """Test AUC and logloss of a model over a loader (synchronised across DDP ranks by torchmetrics)."""
    auc = torchmetrics.classification.BinaryAUROC().to(device)
    loss = torchmetrics.MeanMetric().to(device)
    was_training = model.training
    model.eval()
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        logits = model(batch)
        auc.update(torch.sigmoid(logits), batch["label"].long())
        loss.update(nn.functional.binary_cross_entropy_with_logits(logits, batch["label"], reduction="none"))
    model.train(was_training)
    return {"auc": float(auc.compute()), "logloss": float(loss.compute())}


class CompressionCallback(pl.Callback):
    """Calibrate, compress and evaluate before fine-tuning; ``report`` / ``before`` / ``seconds`` hold the results."""

    def __init__(self, method: str, targets: Sequence[str] | None = None, embedding_rank: Any = None,
                 mlp_rank: Any = None, other_rank: Any = None, energy: float | None = None,
                 target_ratio: float | None = None, include: Sequence[str] = (), exclude: Sequence[str] = (),
                 calibration_batches: int = 32, evaluate_before_finetune: bool = True, fold: bool = False) -> None:
        super().__init__()
        if int(calibration_batches) < 1:
            raise ValueError(f"compression.calibration_batches must be >= 1, got {calibration_batches}")
        self.kwargs = dict(method=method, targets=list(targets) if targets is not None else None,
                           embedding_rank=_rank_arg(embedding_rank), mlp_rank=_rank_arg(mlp_rank),
                           other_rank=_rank_arg(other_rank), energy=energy, target_ratio=target_ratio,
                           include=list(include or ()), exclude=list(exclude or ()), fold=bool(fold))
        self.calibration_batches = int(calibration_batches)
        self.evaluate_before_finetune = evaluate_before_finetune
        self.report: CompressionReport | None = None
        self.before: dict[str, float] | None = None
        self.before_val: dict[str, float] | None = None
        self.pre_finetune_state: dict[str, torch.Tensor] | None = None
        self.seconds = 0.0
        self.restored: dict[str, Any] | None = None  # results of a compression done before a resume
        self.on_compressed: Callable[["CompressionCallback"], None] | None = None  # after evaluation, once

    def record(self) -> dict[str, Any]:
        """What a resumed run needs to skip calibration (the weights themselves are ``pre_finetune_state``)."""
        return {"results": self.results(), "spec": self.spec, "before": self.before, "before_val": self.before_val}

    def restore(self, record: Mapping[str, Any], pre_finetune_state: dict[str, torch.Tensor]) -> None:
        """Take the compression of an earlier, interrupted run: ``apply`` and ``evaluate`` then do nothing."""
        self.restored = dict(record["results"])
        self.before, self.before_val = record["before"], record["before_val"]
        self.pre_finetune_state = pre_finetune_state

    @property
    def spec(self) -> dict[str, Any] | None:
        return self.report.spec if self.report is not None else None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "CompressionCallback":
        keys = ("method", "targets", "embedding_rank", "mlp_rank", "other_rank", "energy", "target_ratio",
                "include", "exclude", "calibration_batches", "fold")
        return cls(**{k: cfg[k] for k in keys if k in cfg})

    # The work --------------------------------------------------------------------------------------------
    def apply(self, pl_module: pl.LightningModule, datamodule: Any, device: torch.device | None = None) -> None:
        """Calibrate on training batches and compress ``pl_module.model`` in place (once)."""
        if self.report is not None or self.restored is not None:
            return
        t0 = time.perf_counter()
        if device is not None:
            pl_module.to(device)
        dev = next(pl_module.parameters()).device
        batches = ({k: v.to(dev) for k, v in b.items()}
                   for b in itertools.islice(iter(datamodule.train_dataloader()), self.calibration_batches))
        self.report = compress(pl_module.model, calibration_batches=batches, **self.kwargs)
        pl_module.set_compression_spec(self.report.spec)
        self.seconds = time.perf_counter() - t0
        log.info("%s", self.report.summary())

    def evaluate(self, pl_module: pl.LightningModule, datamodule: Any) -> dict[str, float]:
        """Test metrics before fine-tuning; also keeps the weights and val AUC as the fine-tune's fallback."""
        self.before = evaluate(pl_module.model, datamodule.test_dataloader(), pl_module.device)
        self.before_val = evaluate(pl_module.model, datamodule.val_dataloader(), pl_module.device)
        self.pre_finetune_state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        log.info("compressed, before fine-tuning: test/auc=%.5f test/logloss=%.5f", self.before["auc"],
                 self.before["logloss"])
        return self.before

    # Lightning hooks -------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.apply(pl_module, trainer.datamodule, trainer.strategy.root_device)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.evaluate_before_finetune and self.before is None:
            self.evaluate(pl_module, trainer.datamodule)
            if self.on_compressed is not None:
                self.on_compressed(self)
        for lg in trainer.loggers:
            lg.log_metrics({"compress/ratio": self.results()["compress/ratio"],
                            "compress/test/auc_before_finetune": self.before["auc"] if self.before else float("nan")},
                           step=trainer.global_step)

    # Results ---------------------------------------------------------------------------------------------
    def results(self) -> dict[str, Any]:
        """The flat ``compress/...`` keys of results.json."""
        if self.restored is not None:
            return dict(self.restored)
        r = self.report
        if r is None:
            return {}
        out: dict[str, Any] = {
            "compress/method": r.method,
            "compress/targets": r.policy["targets"],
            "compress/ratio": r.ratio,
            "compress/params": r.compressed["total"]["params"],
            "compress/bytes": r.compressed["total"]["bytes"],
            "compress/seconds": self.seconds,
            "compress/calibration_batches": r.calibration_batches,
            "compress/ranks": {l["name"]: l.get("field_ranks") or l.get("rank") for l in r.layers},
            "compress/layers": r.layers,
            "compress/policy": r.policy,
        }
        for group, ratio in r.group_ratios.items():
            if group != "total":
                out[f"compress/ratio/{group}"] = ratio
        if self.before_val is not None:
            out["compress/val/auc_before_finetune"] = self.before_val["auc"]
        if self.before is not None:
            out["compress/test/auc_before_finetune"] = self.before["auc"]
            out["compress/test/logloss_before_finetune"] = self.before["logloss"]
        return out
