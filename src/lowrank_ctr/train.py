"""``lowrank-ctr-train``: prepare data (cached), train, test the best checkpoint, optionally compress + fine-tune,
and write ``results.json`` into the run directory. Thin: the pieces live in data/, models/, lightning/, compression/.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lowrank_ctr import bench, stages
from lowrank_ctr.bench import DEFAULT_BATCH_SIZES
from lowrank_ctr.config import CONF_DIR, UserError
from lowrank_ctr.jobs import config_hash, objective, run_job, write_results
from lowrank_ctr.data.datamodule import CTRDataModule
from lowrank_ctr.lightning.callbacks import TrainThroughput
from lowrank_ctr.lightning.compression_callback import CompressionCallback, evaluate
from lowrank_ctr.lightning.module import CTRModule, load_checkpoint
from lowrank_ctr.data.schema import Schema
from lowrank_ctr.stages import read_stage, write_stage
from lowrank_ctr.validate import validate

log = logging.getLogger(__name__)
FINETUNE_LAST = "compressed-last"  # the fine-tune's last-epoch checkpoint, resumed by ckpt_path=last
PRE_FINETUNE_WEIGHTS = "compressed-init.pt"  # compressed weights before fine-tuning (state dict, weights only)


def run_dir_of(cfg: DictConfig) -> Path:
    """The Hydra job's output directory (one per job in a multirun); ``run_dir`` overrides it."""
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    try:
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return Path(cfg.paths.output_dir) / "runs" / time.strftime("%Y-%m-%d_%H-%M-%S")


def model_kwargs(cfg: DictConfig) -> dict[str, Any]:
    kw = OmegaConf.to_container(cfg.model, resolve=True)
    kw.pop("name", None)
    return kw


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
    for name, lcfg in (cfg.get("logger") or {}).items():
        if lcfg is None or "_target_" not in lcfg:
            continue
        if "WandbLogger" in lcfg._target_:
            offline = wandb_offline(lcfg.get("offline"))
            lcfg = OmegaConf.merge(lcfg, {"offline": offline})
            os.environ.setdefault("WANDB_SILENT", "true")
            logger = instantiate(lcfg, save_dir=str(run_dir))
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # the run's config in W&B
            loggers.append(logger)
        else:
            loggers.append(instantiate(lcfg, save_dir=str(run_dir)))
    return loggers


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        last = run_dir / "checkpoints" / "last.ckpt"
        if not last.exists():
            raise UserError(f"ckpt_path=last but {last} does not exist: pass hydra.run.dir=<the run to resume>")
        return str(last)
    p = Path(ckpt_path)
    if p.is_dir():
        p = p / "checkpoints" / "last.ckpt"
    if not p.exists():
        raise UserError(f"ckpt_path={ckpt_path}: no such checkpoint")
    return str(p)


def check_checkpoint_schema(path: str, schema: Schema, model_name: str) -> None:
    hp = load_checkpoint(path).get("hyper_parameters") or {}
    theirs = hp.get("schema")
    if theirs is None or Schema.from_dict(theirs).signature() != schema.signature():
        raise UserError(f"checkpoint {path} was trained on another dataset schema than data={schema.name}: "
                        "resume with the data config it was trained with")
    if hp.get("model_name") != model_name:
        raise UserError(f"checkpoint {path} holds model {hp.get('model_name')!r}, not model={model_name}")


def model_size_of(model: torch.nn.Module) -> tuple[int, int]:
    from lowrank_ctr.compression.size import model_size

    total = model_size(model)["total"]
    return total["params"], total["bytes"]


def make_trainer(cfg: DictConfig, run_dir: Path, callbacks: list[pl.Callback], loggers: list | bool,
                 **overrides: Any) -> pl.Trainer:
    callbacks = list(callbacks)
    if cfg.progress_bar:
        callbacks.append(pl.callbacks.RichProgressBar(leave=False))
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, default_root_dir=str(run_dir),
                       enable_progress_bar=bool(cfg.progress_bar), **overrides)


def make_datamodule(cfg: DictConfig) -> CTRDataModule:
    dm = CTRDataModule(cfg.data, seed=int(cfg.seed), progress=bool(cfg.progress_bar))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def make_module(cfg: DictConfig, schema: Schema, **overrides: Any) -> CTRModule:
    kwargs = dict(data_config=OmegaConf.to_container(cfg.data, resolve=True),
                  optimizer=instantiate(cfg.optimizer) if cfg.get("optimizer") else None,
                  scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
                  embedding_l2=float(cfg.get("embedding_l2") or 0.0))
    kwargs.update(overrides)
    return CTRModule(cfg.model.name, model_kwargs(cfg), schema.to_dict(), **kwargs)


def train_base(cfg: DictConfig, dm: CTRDataModule, run_dir: Path, loggers: list) -> tuple[CTRModule, dict[str, Any]]:
    """Train the uncompressed model, test its best checkpoint."""
    schema = dm.schema
    module = make_module(cfg, schema)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), run_dir)
    if ckpt_path:
        check_checkpoint_schema(ckpt_path, schema, cfg.model.name)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val/auc",
                                              mode="max", save_top_k=1, save_last=True)
    throughput = TrainThroughput()
    callbacks: list[pl.Callback] = [checkpoint, throughput]
    if cfg.get("early_stopping_patience") is not None:
        callbacks.append(pl.callbacks.EarlyStopping(monitor="val/auc", mode="max",
                                                    patience=int(cfg.early_stopping_patience)))
    trainer = make_trainer(cfg, run_dir, callbacks, loggers)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    train_seconds = time.perf_counter() - t0
    best = checkpoint.best_model_path or None
    test = trainer.test(module, datamodule=dm, ckpt_path=best, verbose=False, weights_only=True)[0]
    params, nbytes = model_size_of(module.model)
    return module, {
        "params": params,
        "bytes": nbytes,
        "test/auc": float(test["test/auc"]),
        "test/logloss": float(test["test/logloss"]),
        "val/auc": float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None,
        "train/samples_per_s": throughput.samples_per_s,
        "train/seconds": train_seconds,
        "train/epochs": int(trainer.current_epoch),
        "train/rows": int(dm.datasets["train"].rows),
        "checkpoint": best,
    }


def restore_base(cfg: DictConfig, dm: CTRDataModule, base: dict[str, Any]) -> CTRModule:
    """The module a finished base stage ended with: its best checkpoint's weights (what it was tested with)."""
    module = make_module(cfg, dm.schema)
    module.load_state_dict(load_checkpoint(base["checkpoint"])["state_dict"])
    log.info("resuming after the finished base stage (best checkpoint %s)", base["checkpoint"])
    return module


def restore_compression(run_dir: Path, cfg: DictConfig, module: CTRModule, callback: CompressionCallback) -> bool:
    """Rebuild the compressed model of an interrupted run's finished compression stage; False if there is none."""
    record = read_stage(run_dir, stages.COMPRESSED, cfg)
    if record is None:
        return False
    from lowrank_ctr.compression.spec import apply_spec

    apply_spec(module.model, record["spec"])
    module.set_compression_spec(record["spec"])
    state = torch.load(run_dir / "checkpoints" / PRE_FINETUNE_WEIGHTS, map_location="cpu", weights_only=True)
    module.model.load_state_dict(state)
    callback.restore(record, state)
    log.info("resuming after the finished compression stage: calibration is not repeated")
    return True


def save_compression_stage(run_dir: Path, cfg: DictConfig, callback: CompressionCallback) -> None:
    """Called once the model is compressed and evaluated, before fine-tuning (rank zero writes)."""
    if rank_zero_only.rank != 0:
        return
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(callback.pre_finetune_state, run_dir / "checkpoints" / PRE_FINETUNE_WEIGHTS)
    write_stage(run_dir, stages.COMPRESSED, cfg, callback.record())


def compress_and_finetune(cfg: DictConfig, dm: CTRDataModule, module: CTRModule, run_dir: Path, loggers: list,
                          base: dict[str, Any], resuming: bool = False) -> dict[str, Any]:
    """Compress the trained ``module`` (CompressionCallback), fine-tune, test; benchmark base vs compressed.

    ``resuming``: an interrupted run's finished compression is reused and its fine-tune continues from
    ``checkpoints/compressed-last.ckpt``.
    """
    comp = cfg.compression
    out: dict[str, Any] = {f"base/{k}": base[k] for k in ("test/auc", "test/logloss", "params", "bytes")}
    base_model = copy.deepcopy(module.model).eval()
    compressed_model = None
    if comp.method != "none":
        epochs = int(comp.get("finetune_epochs", 1))  # >= 0: checked by validate() before any work
        module.optimizer_factory = instantiate(cfg.optimizer, lr=float(comp.finetune_lr))
        callback = CompressionCallback.from_config(comp)
        restored = resuming and restore_compression(run_dir, cfg, module, callback)
        callback.on_compressed = lambda cb: save_compression_stage(run_dir, cfg, cb)
        checkpoint = pl.callbacks.ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="compressed-best",
                                                  monitor="val/auc", mode="max", save_top_k=1, save_last=True)
        checkpoint.CHECKPOINT_NAME_LAST = FINETUNE_LAST
        trainer = make_trainer(cfg, run_dir, [callback, checkpoint], loggers, max_epochs=max(epochs, 1),
                               min_epochs=None)
        t0 = time.perf_counter()
        kept = False
        if epochs > 0:
            last = run_dir / "checkpoints" / f"{FINETUNE_LAST}.ckpt"
            trainer.fit(module, datamodule=dm, ckpt_path=str(last) if restored and last.exists() else None,
                        weights_only=True)
            best = checkpoint.best_model_path or None
            score = checkpoint.best_model_score
            kept = score is not None and float(score) > callback.before_val["auc"]
            out["compress/val/auc"] = float(score) if kept else callback.before_val["auc"]
            if not kept:  # fine-tuning did not help on validation: keep the compressed weights from before it
                module.model.load_state_dict(callback.pre_finetune_state)
                best = None
        else:
            callback.apply(module, dm)
            callback.evaluate(module, dm)
            out["compress/val/auc"] = callback.before_val["auc"]
            best = None
        out["compress/finetune_seconds"] = max(time.perf_counter() - t0 - callback.seconds, 0.0)
        out["compress/finetune_epochs"] = epochs
        out["compress/finetune_kept"] = kept
        test = trainer.test(module, datamodule=dm, ckpt_path=best, verbose=False, weights_only=True)[0]
        out.update(callback.results())
        final = run_dir / "checkpoints" / "compressed.ckpt"  # the model tested above, spec included
        trainer.save_checkpoint(final)
        out["compress/checkpoint"] = str(final)
        out["test/auc"], out["test/logloss"] = float(test["test/auc"]), float(test["test/logloss"])
        out["params"], out["bytes"] = model_size_of(module.model)
        out["compress/test/auc_delta"] = out["test/auc"] - base["test/auc"]
        compressed_model = module.model
        if comp.get("control") and epochs > 0:
            out.update(finetune_control(cfg, dm, base_model, run_dir, epochs, float(comp.finetune_lr)))
            out["control/test/auc_delta"] = out["test/auc"] - out["control/test/auc"]
    if cfg.get("bench", True):
        sizes = [int(s) for s in cfg.get("bench_batch_sizes", DEFAULT_BATCH_SIZES)]
        batches = bench.make_batches(dm.datasets["test"], sizes)
        out.update(bench.compare(base_model, compressed_model, batches, threads=cfg.get("threads")))
    return out


def finetune_control(cfg: DictConfig, dm: CTRDataModule, base_model: torch.nn.Module, run_dir: Path, epochs: int,
                     lr: float) -> dict[str, Any]:
    """The honest comparison: the UNcompressed base fine-tuned for the same extra epochs at the same rate, with the
    same selection rule as the compressed model (fine-tuned weights kept only if validation AUC improves)."""
    control = make_module(cfg, dm.schema, optimizer=instantiate(cfg.optimizer, lr=lr))
    control.model.load_state_dict(base_model.state_dict())
    before_val = evaluate(control.model, dm.val_dataloader())["auc"]
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=run_dir / "control", filename="best", monitor="val/auc",
                                              mode="max", save_top_k=1)
    trainer = make_trainer(cfg, run_dir / "control", [checkpoint], False, max_epochs=epochs, min_epochs=None)
    trainer.fit(control, datamodule=dm)
    kept = checkpoint.best_model_score is not None and float(checkpoint.best_model_score) > before_val
    if not kept:
        control.model.load_state_dict(base_model.state_dict())
    test = trainer.test(control, datamodule=dm, ckpt_path=checkpoint.best_model_path if kept else None,
                        verbose=False, weights_only=True)[0]
    return {"control/test/auc": float(test["test/auc"]), "control/test/logloss": float(test["test/logloss"]),
            "control/finetune_kept": kept}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Everything ``lowrank-ctr-train`` does; returns the results dict (also written to results.json)."""
    validate(cfg)
    run_dir = run_dir_of(cfg)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    dm = make_datamodule(cfg)
    loggers = build_loggers(cfg, run_dir)
    resuming = bool(cfg.get("ckpt_path"))
    base = read_stage(run_dir, stages.BASE, cfg) if resuming else None
    if base is not None:  # killed after base training: do not train or test it again
        resolve_ckpt_path(cfg.get("ckpt_path"), run_dir)  # same checks as a resume of the base stage
        module = restore_base(cfg, dm, base)
    else:
        module, base = train_base(cfg, dm, run_dir, loggers)
        if rank_zero_only.rank == 0:
            write_stage(run_dir, stages.BASE, cfg, base)
    global_zero = rank_zero_only.rank == 0
    results: dict[str, Any] = {"status": "ok", "data": str(cfg.data.name), "model": str(cfg.model.name),
                               "seed": int(cfg.seed), **base}
    results.update(compress_and_finetune(cfg, dm, module, run_dir, loggers, base, resuming))
    results["run_dir"] = str(run_dir)
    results["config_hash"] = config_hash(cfg)
    results["config"] = OmegaConf.to_container(cfg, resolve=True)
    if global_zero:
        write_results(run_dir, results)
        log_summary(loggers, results)
    return results


def log_summary(loggers: list, results: dict[str, Any]) -> None:
    """Final numbers as logger summary metrics (W&B run summary, CSV/TensorBoard last step)."""
    flat = {k: v for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for lg in loggers:
        lg.log_metrics({f"final/{k}": float(v) for k, v in flat.items()})
        if type(lg).__name__ == "WandbLogger":
            lg.experiment.summary.update(flat)
            layers = results.get("compress/layers")
            if layers:
                import wandb

                cols = ["name", "group", "method", "rank", "full_rank", "retained_energy", "params_before",
                        "params_after"]
                lg.experiment.log({"compress/layers": wandb.Table(
                    columns=cols, data=[[str(l.get(c)) for c in cols] for l in layers])})
        lg.finalize("success")
        if type(lg).__name__ == "WandbLogger":
            lg.experiment.finish()  # writes the run summary; the next job of a multirun starts a new run


def print_summary(results: dict[str, Any]) -> None:
    keys = [k for k in results if k != "config" and not isinstance(results[k], (list, dict))]
    width = max(len(k) for k in keys)
    print("\n".join(f"{k:<{width}}  {results[k]:.5g}" if isinstance(results[k], float) else f"{k:<{width}}  {results[k]}"
                    for k in keys))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _main(cfg: DictConfig) -> float | None:
    results = run_job(cfg, run, run_dir_of(cfg))
    if results is not None and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        print_summary(results)
    return objective(cfg, results)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
