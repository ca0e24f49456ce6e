#!/usr/bin/env python3
"""The project's column of the peer benchmark (../shared/peers-bench), written against the project's API.

Same command line and JSON keys as the harness's ``bench_lowrank_ctr.py`` (which imported
``lowrank_ctr.train.make_module`` / ``make_trainer``; the pipeline rewrite moved those), run by ``run_all.sh``:

    EXTRA_PEERS="lowrank-ctr=$PWD/.venv/bin/python:$PWD/benchmarks/peers_column.py" \\
      LOWRANK_CTR_BENCH_OVERRIDES="trainer.precision=bf16-mixed optimizer=rowwise_adagrad" \\
      REPEATS=2 bash ../shared/peers-bench/run_all.sh

What it does, as the harness's script did: the harness CSVs -> Criteo TSV (timed apart, ``convert_tsv_s``);
Hydra configs from ``conf/`` (data=criteo with numeric_mode=bucketize, model=deepfm, the harness's SETTINGS,
``LOWRANK_CTR_BENCH_OVERRIDES`` last); ``CTRDataModule.prepare_data`` + ``setup`` (``prep_s``); one training epoch
of ``CTRModule`` in the Lightning Trainer from ``conf/trainer`` without validation or checkpoints
(``train_epoch_s``: on_train_epoch_start -> end); inference over train + test rows through the project's
loaders under ``lowrank_ctr.precision.inference`` -- bf16 autocast when trained with trainer.precision=bf16-mixed,
int8 Linear layers with ``infer=int8`` among the overrides (``lowrank_ctr.precision.serving_model``) (``infer_s``);
test AUC / logloss on those rows; peak memory (the harness's PeakMemory).
"""

import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
# bench_common lives in the harness folder: run_all.sh runs peers from there; else the checkout's sibling shared/
for candidate in (os.environ.get("PEERS_BENCH_DIR"), os.getcwd(), str(HERE.parents[1] / "shared" / "peers-bench")):
    if candidate and (Path(candidate) / "bench_common.py").exists():
        sys.path.insert(0, candidate)
        break
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402

import bench_common as bc  # noqa: E402
import speed_common as sc  # noqa: E402


def project_version() -> str:
    import importlib.metadata
    import subprocess

    version = importlib.metadata.version("lowrank-ctr")
    try:
        commit = subprocess.run(["git", "-C", str(sc.REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(sc.REPO), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return version + (f" (git {commit}{'+dirty' if dirty else ''}, {sc.REPO})" if commit else "")


def main() -> None:
    ap = bc.base_argparser("lowrank-ctr DeepFM benchmark (the project's own column script)")
    args = ap.parse_args()
    torch = bc.setup_torch(args.threads, args.seed)
    mem = bc.PeakMemory().start()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    import lightning.pytorch as pl
    from omegaconf import OmegaConf

    import lowrank_ctr.data.prepare  # noqa: F401  (imported before any timer)
    from lowrank_ctr.allocator import configure_malloc
    from lowrank_ctr.compression.size import model_size
    from lowrank_ctr.pipeline.evaluation import evaluate
    from lowrank_ctr.validate import validate

    S = bc.SETTINGS
    workdir = Path(os.path.abspath(args.workdir or (args.out + ".work")))
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    import resource

    def mark(stage: str) -> None:  # peak RSS so far and RSS now (MB): where the column's peak is reached
        res.setdefault("peak_rss_mb_by_stage", {})[stage] = round(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        status = Path("/proc/self/status")
        if status.exists():
            kb = next((int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmRSS")), 0)
            res.setdefault("rss_mb_by_stage", {})[stage] = round(kb / 1024, 1)

    res = {"peer": "lowrank-ctr", "peer_version": project_version(), "settings": S, "data": args.data,
           "tag": args.tag, "num_workers": "0 (data.num_workers; the loader reads parquet row groups in the main process)"}
    mark("after_imports")

    t0 = time.perf_counter()
    sc.convert_peers_csv(args.data, workdir)
    res["convert_tsv_s"] = time.perf_counter() - t0
    n_tr_csv, n_te_csv = (bc.count_csv_rows(os.path.join(args.data, f"{s}.csv")) for s in ("train", "test"))

    overrides = [
        *sc.data_overrides(workdir, 0, 0, args.batch_size, peers_data=args.data),
        *sc.model_overrides("deepfm", S["embedding_dim"], S["dnn_hidden_units"]),
        f"model.dropout={S['dropout']}", f"model.batch_norm={str(S['batch_norm']).lower()}",
        f"model.activation={S['dnn_activation']}", f"data.min_count={S['min_category_count']}",
        "trainer=cpu", "logger=none", "compression=none", f"optimizer.lr={S['lr']}",
        f"embedding_l2={S['l2_regularization']}", f"trainer.max_epochs={S['epochs']}",
        f"trainer.min_epochs={S['epochs']}", f"seed={args.seed}", f"threads={args.threads}", "progress_bar=false",
    ]
    # infer=int8 in LOWRANK_CTR_BENCH_OVERRIDES: score with int8 Linear layers (lowrank_ctr.int8_inference)
    overrides, infer = sc.split_infer(overrides + os.environ.get("LOWRANK_CTR_BENCH_OVERRIDES", "").split())
    cfg = sc.compose(overrides)
    validate(cfg)
    res["overrides"] = overrides
    res["optimizer"] = OmegaConf.to_container(cfg.optimizer, resolve=True)
    res["precision"] = str(cfg.trainer.precision)
    infer_precision = infer or str(cfg.trainer.precision)
    res["infer_precision"] = infer_precision
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    torch.set_num_threads(int(cfg.threads))
    configure_malloc(cfg.get("malloc"))  # what lowrank-ctr-train does (lowrank_ctr/allocator.py)

    # (1) preparation: raw TSV -> parquet shards
    t_all = time.perf_counter()
    from lowrank_ctr.data.datamodule import CTRDataModule

    dm = CTRDataModule(cfg.data, seed=int(cfg.seed), progress=False)
    dm.prepare_data()
    res["prep_prepare_s"] = time.perf_counter() - t_all
    t0 = time.perf_counter()
    dm.setup("fit")
    res["prep_setup_s"] = time.perf_counter() - t0
    res["prep_s"] = time.perf_counter() - t_all
    mark("after_prepare")
    schema = dm.schema
    res["n_train"], res["n_test"] = int(dm.datasets["train"].rows), int(dm.datasets["test"].rows)
    assert (res["n_train"], res["n_test"]) == (n_tr_csv, n_te_csv), (res["n_train"], res["n_test"], n_tr_csv, n_te_csv)
    res["vocab_total"] = int(sum(schema.sparse_vocab_sizes))
    res["fields"] = len(schema.categorical) + len(schema.multihot) + len(schema.numeric)
    res["parquet_mb"] = round(sum(p.stat().st_size for p in Path(dm.path).rglob("part-*.parquet")) / 2 ** 20, 1)
    t0 = time.perf_counter()
    module = sc.make_module(cfg, schema)
    res["model_build_s"] = time.perf_counter() - t0
    res["n_params"] = sum(p.numel() for p in module.model.parameters())
    total = model_size(module.model)["total"]
    res["project_params"], res["project_bytes"] = total["params"], total["bytes"]

    # (2) one training epoch
    timer = sc.epoch_timer()
    trainer = sc.bench_trainer(cfg, [timer])
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    res["fit_total_s"] = time.perf_counter() - t0
    mark("after_train")
    assert len(timer.seconds) == S["epochs"] and timer.rows == res["n_train"], (timer.seconds, timer.rows)
    res["train_epoch_s"] = timer.seconds[0]
    res["train_samples_per_s"] = res["n_train"] / res["train_epoch_s"]
    res["train_timing"] = ("Lightning callback on_train_epoch_start -> on_train_epoch_end (perf_counter); "
                           "no validation (limit_val_batches=0), no checkpointing")

    # (3) inference over all rows (train + test)
    from lowrank_ctr.precision import serving_model

    model = module.model
    t0 = time.perf_counter()
    served = serving_model(model, infer_precision)  # int8: a copy with int8 Linears; else the model itself
    train_eval = sc.split_loader(dm, "train", args.batch_size)
    test_loader = sc.split_loader(dm, "test", args.batch_size)
    res["infer_setup_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sc.score(served, train_eval, infer_precision)
    test_logits, test_labels, test_rows = sc.score(served, test_loader, infer_precision)
    res["infer_s"] = time.perf_counter() - t0
    mark("after_inference")
    res["infer_rows"] = res["n_train"] + test_rows
    res["infer_samples_per_s"] = res["infer_rows"] / res["infer_s"]
    res["infer_path"] = ("project loaders (ShardedBatches, batch 4096), sigmoid(model(batch)) under "
                         f"lowrank_ctr.precision.inference('{infer_precision}') (serving_model for int8)")

    # (4) held-out AUC
    probs = 1.0 / (1.0 + np.exp(-test_logits.astype(np.float64)))
    res["test_auc"] = bc.roc_auc(test_labels, probs)
    res["test_logloss"] = bc.logloss(test_labels, probs)
    labels_csv = np.loadtxt(os.path.join(args.data, "test.csv"), delimiter=",", skiprows=1, usecols=0, dtype=np.float32)
    res["labels_match_csv_order"] = bool(np.array_equal(test_labels, labels_csv))
    res["project_test_auc"] = evaluate(model, dm.test_dataloader(), "cpu", "test")[0].auc

    mark("end")
    res.update(mem.stop())
    bc.write_result(args.out, res)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
