"""What every stage shares: the config, the run directory and its records, the data, loggers, and factories for
modules, trainers (callbacks from ``conf/callbacks/``) and evaluations."""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object, instantiate
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lowrank_ctr.config import UserError
from lowrank_ctr.data.datamodule import CTRDataModule
from lowrank_ctr.data.schema import Schema
from lowrank_ctr.lightning.callbacks import DatasetEpoch, TrainThroughput
from lowrank_ctr.lightning.module import CTRModule, load_checkpoint
from lowrank_ctr.pipeline.evaluation import ExtraMetrics, evaluate
from lowrank_ctr.pipeline.records import StageRecords
from lowrank_ctr.pipeline.results import Metrics, TrainingStats

log = logging.getLogger(__name__)


def run_dir_of(cfg: DictConfig) -> Path:
    """The Hydra job's output directory (one per job in a multirun); ``run_dir`` overrides it."""
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return Path(cfg.paths.output_dir) / "runs" / time.strftime("%Y-%m-%d_%H-%M-%S")


def is_global_zero() -> bool:
    return rank_zero_only.rank == 0


def model_kwargs(cfg: DictConfig) -> dict[str, Any]:
    kw = OmegaConf.to_container(cfg.model, resolve=True)
    kw.pop("name", None)
    return kw


def make_module(cfg: DictConfig, schema: Schema, module_class: type[CTRModule] = CTRModule,
                **overrides: Any) -> CTRModule:
    """The LightningModule of ``cfg.model`` with the base recipe's optimizer / scheduler (``overrides`` win)."""
    kwargs = dict(data_config=OmegaConf.to_container(cfg.data, resolve=True),
                  optimizer=instantiate(cfg.optimizer) if cfg.get("optimizer") else None,
                  scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
                  embedding_l2=float(cfg.get("embedding_l2") or 0.0))
    kwargs.update(overrides)
    return module_class(cfg.model.name, model_kwargs(cfg), schema.to_dict(), **kwargs)


def make_datamodule(cfg: DictConfig) -> CTRDataModule:
    dm = CTRDataModule(cfg.data, seed=int(cfg.seed), progress=bool(cfg.progress_bar))
    dm.device = compute_device(cfg)  # where data.in_memory=device holds the splits, also before any trainer
    dm.prepare_data()
    dm.setup("fit")
    return dm


def wandb_offline(setting: bool | None) -> bool:
    """W&B goes online only with a configured key (env or ``wandb login``); tests and CI never touch the network."""
    if setting is not None:
        return bool(setting)
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path.home() / ".netrc"
    return not (netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"))


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    loggers = []
    for lcfg in (cfg.get("logger") or {}).values():
        if lcfg is None or "_target_" not in lcfg:
            continue
        if "WandbLogger" in lcfg._target_:
            lcfg = OmegaConf.merge(lcfg, {"offline": wandb_offline(lcfg.get("offline"))})
            os.environ.setdefault("WANDB_SILENT", "true")
            logger = instantiate(lcfg, save_dir=str(run_dir))
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # the run's config in W&B
            loggers.append(logger)
        else:
            loggers.append(instantiate(lcfg, save_dir=str(run_dir)))
    return loggers


def compute_device(cfg: DictConfig) -> torch.device:
    """Where the pipeline's own passes (calibration, evaluation) run: the trainer's device of this rank."""
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="cpu"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def optimizer_name(cfg: DictConfig) -> str:
    """The ``optimizer=`` choice (conf/optimizer/NAME.yaml), else the optimizer class name."""
    try:
        choice = HydraConfig.get().runtime.choices.get("optimizer")
        if choice:
            return str(choice)
    except ValueError:  # no Hydra app (a config composed in a test)
        pass
    from lowrank_ctr.optim import optimizer_name as name_of  # adam, rowwise_adagrad, rowwise_adam, else the class

    return name_of(cfg.get("optimizer")) or "adam"


@dataclass
class FitCallbacks:
    """The configured callbacks of one fit, with typed handles on the ones the stages read."""

    all: list[pl.Callback]
    best: pl.callbacks.ModelCheckpoint | None = None
    last: pl.callbacks.ModelCheckpoint | None = None
    throughput: TrainThroughput | None = None

    def best_path(self) -> str | None:
        return (self.best.best_model_path or None) if self.best is not None else None

    def best_score(self) -> float | None:
        if self.best is None or self.best.best_model_score is None:
            return None
        score = float(self.best.best_model_score)
        return score if score == score else None  # NaN: undefined


def fit_callbacks(cfg: DictConfig, dirpath: Path, prefix: str = "") -> FitCallbacks:
    """Instantiate ``cfg.callbacks``; checkpoints go to ``dirpath`` as ``<prefix><filename>.ckpt``."""
    out = FitCallbacks(all=[DatasetEpoch()])  # not optional: without it every epoch would see the same order
    for name, ccfg in (cfg.get("callbacks") or {}).items():
        if ccfg is None or "_target_" not in ccfg:
            continue
        extra: dict[str, Any] = {}
        target = get_object(ccfg._target_)
        if isinstance(target, type) and issubclass(target, pl.callbacks.ModelCheckpoint):
            extra = {"dirpath": str(dirpath), "filename": prefix + str(ccfg.get("filename") or name)}
        cb = instantiate(ccfg, **extra)
        if isinstance(cb, ProgressBar) and not cfg.get("progress_bar"):
            continue  # progress_bar=false: Lightning refuses a progress callback with the bar disabled
        out.all.append(cb)
        if isinstance(cb, pl.callbacks.ModelCheckpoint):
            if cb.monitor is None:
                out.last = out.last or cb
            else:
                out.best = out.best or cb
        elif isinstance(cb, TrainThroughput):
            out.throughput = cb
    return out


@dataclass
class RunContext:
    cfg: DictConfig
    run_dir: Path
    identity: str
    resuming: bool  # continue unfinished stages from their last checkpoints, reuse finished ones
    records: StageRecords
    dm: CTRDataModule
    loggers: list
    device: torch.device
    extras: ExtraMetrics = field(default_factory=dict)

    @property
    def schema(self) -> Schema:
        return self.dm.schema

    def module(self, module_class: type[CTRModule] = CTRModule, **overrides: Any) -> CTRModule:
        return make_module(self.cfg, self.schema, module_class, **overrides)

    def trainer(self, callbacks: FitCallbacks, stage_dir: Path, loggers: list | bool | None = None,
                **overrides: Any) -> pl.Trainer:
        """A Lightning Trainer from ``cfg.trainer`` with the stage's callbacks (``overrides``: the stage's recipe)."""
        loggers = self.loggers if loggers is None else loggers
        return instantiate(self.cfg.trainer, callbacks=callbacks.all, logger=loggers or False,
                           default_root_dir=str(stage_dir), enable_progress_bar=bool(self.cfg.progress_bar),
                           **overrides)

    def fit(self, module: CTRModule, callbacks: FitCallbacks, stage_dir: Path, resume_from: Path | str | None,
            loggers: list | bool | None = None, **overrides: Any) -> tuple[pl.Trainer, float]:
        """Lightning fit of ``module``; continues from ``resume_from`` when given. Returns (trainer, seconds)."""
        trainer = self.trainer(callbacks, stage_dir, loggers, **overrides)
        t0 = time.perf_counter()
        try:
            trainer.fit(module, datamodule=self.dm, ckpt_path=str(resume_from) if resume_from else None,
                        weights_only=True)
        except SIGTERMException:  # Lightning exits with status 0 here, as if the run had finished
            how = "resume=true" if self.cfg.get("pipeline", {}).get("base") == "load" else "ckpt_path=last"
            print(f"error: stopped by SIGTERM at epoch {trainer.current_epoch}; continue with the same overrides "
                  f"and {how} hydra.run.dir={self.run_dir}", file=sys.stderr, flush=True)
            raise SystemExit(143) from None  # 128 + SIGTERM: a terminated run, never a finished one
        return trainer, time.perf_counter() - t0

    def evaluate(self, model: nn.Module, split: str = "test", reference: nn.Module | None = None
                 ) -> tuple[Metrics, float | None]:
        loader = self.dm.test_dataloader() if split == "test" else self.dm.val_dataloader()
        model.to(self.device)
        if reference is not None:
            reference.to(self.device)
        return evaluate(model, loader, self.device, split, reference=reference,
                        extras=self.extras if split == "test" else None)

    def calibration_batches(self, n: int):
        """The first ``n`` training batches, on the compute device (a generator: read lazily)."""
        loader = iter(self.dm.train_dataloader())
        for _ in range(int(n)):
            batch = next(loader, None)
            if batch is None:
                return
            yield {k: v.to(self.device) for k, v in batch.items()}

    def training_stats(self, trainer: pl.Trainer, callbacks: FitCallbacks, seconds: float) -> TrainingStats:
        name = optimizer_name(self.cfg)
        return TrainingStats(samples_per_s=callbacks.throughput.samples_per_s if callbacks.throughput else None,
                             seconds=seconds, epochs=int(trainer.current_epoch),
                             rows=int(self.dm.datasets["train"].rows),
                             precision=str(OmegaConf.select(self.cfg, "trainer.precision", default="32-true")),
                             optimizer=name)

    def load_best(self, module: CTRModule, callbacks: FitCallbacks) -> str | None:
        """Put the best checkpoint's weights into ``module`` (what the stage tests and hands on)."""
        best = callbacks.best_path()
        if best:
            module.load_state_dict(load_checkpoint(best)["state_dict"])
        return best


def check_checkpoint_schema(path: str, schema: Schema, model_name: str) -> None:
    hp = load_checkpoint(path).get("hyper_parameters") or {}
    theirs = hp.get("schema")
    if theirs is None or Schema.from_dict(theirs).signature() != schema.signature():
        raise UserError(f"checkpoint {path} was trained on another dataset schema than data={schema.name}: "
                        "use the data config it was trained with")
    if hp.get("model_name") != model_name:
        raise UserError(f"checkpoint {path} holds model {hp.get('model_name')!r}, not model={model_name}")


def save_model_checkpoint(module: CTRModule, path: Path) -> str:
    """A checkpoint of ``module`` as it is now (weights + what rebuilds it), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": _plain(dict(module.hparams))}, tmp)
    tmp.replace(path)
    return str(path)


def _plain(value: Any) -> Any:
    """Containers as plain dicts / lists (what ``torch.load(weights_only=True)`` reads back)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    return value
