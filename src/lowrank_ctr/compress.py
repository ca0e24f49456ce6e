"""``lowrank-ctr-compress``: compress an existing checkpoint, fine-tune, test, benchmark -> results.json."""

from __future__ import annotations

import logging
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from lowrank_ctr.config import CONF_DIR, UserError
from lowrank_ctr.jobs import config_hash, objective, run_job, write_results
from lowrank_ctr.lightning.module import load_checkpoint
from lowrank_ctr.data.schema import Schema
from lowrank_ctr.train import (build_loggers, compress_and_finetune, log_summary, make_datamodule, make_module,
                               model_size_of, print_summary, run_dir_of)
from lowrank_ctr.validate import validate

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    if not cfg.get("ckpt_path"):
        raise UserError("ckpt_path is required: lowrank-ctr-compress ckpt_path=RUN/checkpoints/best.ckpt ...")
    key = config_hash(cfg)  # of the config as given, before the checkpoint fills in data and model
    ckpt = load_checkpoint(cfg.ckpt_path)
    hp = ckpt.get("hyper_parameters") or {}
    if "model_name" not in hp or "schema" not in hp:
        raise UserError(f"{cfg.ckpt_path} was not written by lowrank-ctr-train (no model/schema in it)")
    if hp.get("compression_spec"):
        raise UserError(f"{cfg.ckpt_path} is already compressed ({hp['compression_spec'].get('method')}); "
                        "compress the base checkpoint (best.ckpt) instead")
    with open_dict(cfg):
        if cfg.get("data") is None:
            if not hp.get("data_config"):
                raise UserError("the checkpoint does not record its data config: pass data=NAME explicitly")
            cfg.data = hp["data_config"]
        cfg.model = {"name": hp["model_name"], **dict(hp.get("model_kwargs") or {})}
    validate(cfg)
    run_dir = run_dir_of(cfg)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    dm = make_datamodule(cfg)
    if Schema.from_dict(hp["schema"]).signature() != dm.schema.signature():
        raise UserError(f"checkpoint {cfg.ckpt_path} was trained on another dataset schema than "
                        f"data={cfg.data.name}: use the data config it was trained with")
    module = make_module(cfg, dm.schema)
    module.load_state_dict(ckpt["state_dict"])
    loggers = build_loggers(cfg, run_dir)
    tester = pl.Trainer(accelerator=cfg.trainer.get("accelerator", "auto"), devices=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False)
    test = tester.test(module, datamodule=dm, verbose=False)[0]
    params, nbytes = model_size_of(module.model)
    base = {"test/auc": float(test["test/auc"]), "test/logloss": float(test["test/logloss"]), "params": params,
            "bytes": nbytes}
    results: dict[str, Any] = {"status": "ok", "data": str(cfg.data.name), "model": hp["model_name"],
                               "seed": int(cfg.seed), "base_checkpoint": str(cfg.ckpt_path), **base}
    results.update(compress_and_finetune(cfg, dm, module, run_dir, loggers, base, resuming=bool(cfg.get("resume"))))
    results["run_dir"] = str(run_dir)
    results["config_hash"] = key
    results["config"] = OmegaConf.to_container(cfg, resolve=True)
    if tester.is_global_zero:
        write_results(run_dir, results)
        log_summary(loggers, results)
    return results


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="compress")
def _main(cfg: DictConfig) -> float | None:
    results = run_job(cfg, run, run_dir_of(cfg))
    if results is not None:
        print_summary(results)
    return objective(cfg, results)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
