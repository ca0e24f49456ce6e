"""The LightningModule around any CTR model: BCE loss, optional in-batch embedding L2, AUC / logloss metrics.

The module stores what is needed to rebuild its model without the Hydra config (model name and arguments,
the dataset schema, the data config it was trained on, and a compression spec once compressed) in ``hparams``; ``load_model`` rebuilds a model
from a checkpoint with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import lightning.pytorch as pl
import torch
from torch import nn

from lowrank_ctr.config import UserError
from lowrank_ctr.data.schema import Schema
from lowrank_ctr.metrics import BinaryMetrics
from lowrank_ctr.models import build_model
from lowrank_ctr.optim import build_optimizer

OptimizerFactory = Callable[..., torch.optim.Optimizer]
NONFINITE_CHECK_STEPS = 50  # on a GPU, steps between reads of the non-finite-loss flag (each read waits for the GPU)


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite (issue 11, rule 4: never reported as a number)."""


class CTRModule(pl.LightningModule):
    def __init__(self, model_name: str, model_kwargs: Mapping[str, Any], schema: Mapping[str, Any],
                 optimizer: OptimizerFactory | None = None, scheduler: Callable | None = None,
                 embedding_l2: float = 0.0, compression_spec: Mapping[str, Any] | None = None,
                 data_config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.schema = Schema.from_dict(dict(schema))
        self.model = build_model(model_name, self.schema, **dict(model_kwargs))
        if compression_spec:
            from lowrank_ctr.compression.spec import apply_spec

            apply_spec(self.model, dict(compression_spec))
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.embedding_l2 = float(embedding_l2)
        self._looked_up: list[torch.Tensor] = []
        self._hooks: list = []
        self._loss_sum: torch.Tensor | None = None  # the epoch's sum of loss x rows, on the device
        self._loss_rows = 0
        self._unread_steps = 0  # steps since the running loss was last checked for NaN / inf
        self.nonfinite_read_every: int | None = None  # None: every step on CPU, NONFINITE_CHECK_STEPS on a GPU
        if self.embedding_l2 > 0:
            self._watch_embeddings()
        # the project's one AUC / logloss implementation (AUC None when a split holds one class)
        self.metrics = nn.ModuleDict({split: BinaryMetrics() for split in ("val_", "test_")})

    # Model --------------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch)

    def _watch_embeddings(self) -> None:
        """Keep the rows looked up in this batch, for the in-batch L2 penalty (whole-table L2 is too costly)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for m in self.model.modules():
            if getattr(m, "dim", 0) > 1 and hasattr(m, "vocab_sizes"):
                self._hooks.append(m.register_forward_hook(lambda _m, _i, out: self._looked_up.append(out)))

    def set_compression_spec(self, spec: Mapping[str, Any] | None) -> None:
        """Record the compression applied to ``self.model`` so checkpoints rebuild the compressed structure."""
        self.hparams["compression_spec"] = dict(spec) if spec else None
        if self.embedding_l2 > 0:
            self._watch_embeddings()

    # Steps --------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self._looked_up.clear()
        logits = self.model(batch)
        loss = self.loss(logits, batch)
        self.track_train_loss(loss, len(logits))
        if self.embedding_l2 > 0 and self._looked_up:
            reg = sum(e.pow(2).sum() for e in self._looked_up) / len(logits)
            loss = loss + self.embedding_l2 * reg
            self._looked_up.clear()
        return loss

    def track_train_loss(self, loss: torch.Tensor, rows: int) -> None:
        """Add one batch's loss to the epoch's running sum (on the device: nothing is read back), write it to the
        loggers every ``trainer.log_every_n_steps`` steps as ``train/loss_step``, and check it is finite.

        Lightning's ``self.log`` costs ~0.7 ms of host time per call here (it walks its result objects to move them
        to the loss's device; benchmarks/bench_host_overhead.py), a large share of a GPU step's few milliseconds of
        host work. So the step value goes through ``self.log`` only on the steps Lightning writes to the loggers, and the
        epoch mean (``train/loss_epoch``, the names ``on_step=True, on_epoch=True`` gave before) once per epoch.
        """
        value = loss.detach().float() * rows
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._loss_rows += rows
        self._unread_steps += 1
        trainer = self._trainer
        every = trainer.log_every_n_steps if trainer is not None else 0
        if every and (self.global_step + 1) % every == 0:  # the steps Lightning writes its loggers on
            self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False, batch_size=rows)
        # A diverged loss would train on (and checkpoint, and test) NaN weights: stop with what to change. The running
        # sum is non-finite exactly when one of its losses was (short of overflowing float32). Reading it waits for
        # the device: free on CPU (every step), a stall on a GPU (every NONFINITE_CHECK_STEPS steps, and before
        # every validation so that no checkpoint is taken of NaN weights).
        read_every = self.nonfinite_read_every or (1 if loss.device.type == "cpu" else NONFINITE_CHECK_STEPS)
        if self._unread_steps >= read_every:
            self._check_finite_loss()

    def running_train_loss(self) -> torch.Tensor | None:
        """The mean training loss of the epoch so far (a tensor on the device; None before the first step)."""
        return None if self._loss_sum is None else self._loss_sum / max(self._loss_rows, 1)

    def on_train_epoch_start(self) -> None:
        self._loss_sum, self._loss_rows, self._unread_steps = None, 0, 0

    def _eval_step(self, batch: dict[str, torch.Tensor], prefix: str) -> None:
        logits = self.model(batch)
        self._looked_up.clear()
        self.metrics[prefix + "_"].update(logits, batch["label"])

    def _eval_epoch_end(self, prefix: str) -> None:
        m = self.metrics[prefix + "_"]
        values = m.compute("validation" if prefix == "val" else prefix)  # synchronised across ranks (torchmetrics)
        auc = float("nan") if values["auc"] is None else values["auc"]  # undefined: NaN here, null in results.json
        self.log(f"{prefix}/auc", auc, prog_bar=True, sync_dist=False)
        self.log(f"{prefix}/logloss", values["logloss"], prog_bar=prefix == "val", sync_dist=False)
        m.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def on_validation_start(self) -> None:
        self._check_finite_loss()

    def on_train_epoch_end(self) -> None:
        self._check_finite_loss()
        mean = self.running_train_loss()
        if mean is not None:
            self.log("train/loss_epoch", mean, on_step=False, on_epoch=True, batch_size=self._loss_rows)

    def _check_finite_loss(self) -> None:
        steps, self._unread_steps = self._unread_steps, 0
        if steps == 0 or self._loss_sum is None or bool(torch.isfinite(self._loss_sum)):
            return
        lr = self.trainer.optimizers[0].param_groups[0]["lr"] if self.trainer.optimizers else None
        rate = "" if lr is None else f"; learning rate {lr:g}"
        value = "nan or inf" if steps > 1 else str(float(self._loss_sum))
        when = (f"step {self.global_step}" if steps <= 1 else
                f"one of the {steps} steps up to step {self.global_step} (the loss is read every few steps on a GPU)")
        raise NonFiniteLossError(f"training stopped: train/loss is {value} at epoch {self.current_epoch}, {when} "
                                 f"(the model diverged{rate}): lower optimizer.lr, or check the data")

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training objective (the fine-tune's distillation overrides it)."""
        return nn.functional.binary_cross_entropy_with_logits(logits, batch["label"])

    # Optimisation -------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        factory = self.optimizer_factory or (lambda params: torch.optim.Adam(params, lr=1e-3))
        opt = build_optimizer(factory, self.model)  # row-wise optimizers switch tables to row gradients
        if self.scheduler_factory is None:
            return opt
        sched = self.scheduler_factory(optimizer=opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val/auc", "interval": "epoch"}}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint read safely (weights_only=True): tensors and plain containers only."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist: check ckpt_path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means: not a checkpoint we can trust
        raise ValueError(f"checkpoint {path} cannot be loaded safely (weights_only=True): {exc}. "
                         "It may be corrupted or tampered with; only load checkpoints written by lowrank-ctr") from None


def load_model(path: str | Path, schema: Schema | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the (possibly compressed) model stored in a checkpoint; refuse a checkpoint of another schema."""
    ckpt = load_checkpoint(path)
    hp = ckpt.get("hyper_parameters") or {}
    if "model_name" not in hp or "schema" not in hp:
        raise ValueError(f"checkpoint {path} was not written by lowrank-ctr (no model_name/schema hyperparameters)")
    ckpt_schema = Schema.from_dict(hp["schema"])
    if schema is not None and ckpt_schema.signature() != schema.signature():
        raise ValueError(f"checkpoint {path} was trained on a dataset with a different schema "
                         f"({ckpt_schema.name}: {len(ckpt_schema.fields)} fields) than the one given "
                         f"({schema.name}: {len(schema.fields)} fields); use the same data config it was trained on")
    model = build_model(hp["model_name"], ckpt_schema, **dict(hp.get("model_kwargs") or {}))
    if hp.get("compression_spec"):
        from lowrank_ctr.compression.spec import apply_spec

        apply_spec(model, dict(hp["compression_spec"]))
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    model.eval()
    return model, hp

