"""End to end at scale: prepare, one training epoch, compress, export, predict -- wall time and peak RSS per stage.

    python benchmarks/bench_scale.py [--rows 10000000] [--max-vocab 1000000] [--small-rows 1000000]
        [--fast "trainer.precision=bf16-mixed optimizer=rowwise_adagrad"] [--out benchmarks/results/scale.json]

Every stage is the user's command (``lowrank-ctr-prepare``, ``-train``, ``-compress``, ``-export``, ``-predict``)
in its own process, so each peak RSS is that stage's own. The synthetic generator writes Criteo-shaped rows with
vocabularies up to ``--max-vocab`` per field. Preparation runs at two sizes (``--small-rows`` and ``--rows``, same
vocabulary cap): its peak RSS is bounded by the vocabularies, not by the rows, when the two peaks are close.
The projection to full Criteo (45,840,617 rows) scales each stage's measured rate: preparation, the training epoch
and prediction are linear in rows; compression (a fixed number of calibration batches) and export (the model's
size) do not grow with rows. ``--rows 20000 --small-rows 5000 --max-vocab 500`` checks the script in a minute.
Run it on a quiet machine; the result records the CPU share other processes used.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import speed_common as sc

from lowrank_ctr.pipeline import results as R

CRITEO_ROWS = 45_840_617
BIN = Path(sys.executable).parent
# Runs a command and prints the peak RSS of its process tree's largest member (ru_maxrss of waited children).
MEASURE = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
           "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
           "print(json.dumps({'rc': r.returncode, 'wall_s': time.perf_counter() - t, "
           "'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "
           "'tail': (r.stdout + r.stderr)[-3000:]}))")


def measure(name: str, command: list[str]) -> dict[str, Any]:
    print(f"[bench_scale] {name}: {' '.join(command)}", flush=True)
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(BIN / command[0]), *command[1:]], capture_output=True,
                          text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise SystemExit(f"stage {name} failed (exit {result['rc']}):\n{result['tail']}")
    print(f"[bench_scale] {name}: {result['wall_s']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    return {k: v for k, v in result.items() if k != "tail"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--small-rows", type=int, default=1_000_000, help="second preparation size (peak RSS check)")
    ap.add_argument("--max-vocab", type=int, default=1_000_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--finetune-epochs", type=int, default=0, help="compression fine-tune epochs (0: compress only)")
    ap.add_argument("--fast", default="trainer.precision=bf16-mixed optimizer=rowwise_adagrad",
                    help="training overrides (space separated); '' for the defaults")
    ap.add_argument("--model-overrides", default="", help="e.g. 'model.mlp=[16,16]' for a quick check")
    ap.add_argument("--workdir", default=str(sc.REPO / "data_cache" / "bench_scale"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    load = sc.MachineLoad()
    stages: dict[str, dict[str, Any]] = {}

    def data(rows: int) -> list[str]:
        return ["data=synthetic", f"data.rows={rows}", f"data.max_vocab={args.max_vocab}",
                f"data.batch_size={args.batch_size}", f"data.out_dir={work / f'data-{rows}'}", f"paths.root_dir={work}"]

    quiet = ["progress_bar=false", "logger=none", "bench=false", f"threads={args.threads}"]
    for label, rows in (("prepare_small", args.small_rows), ("prepare", args.rows)):
        stages[label] = measure(label, ["lowrank-ctr-prepare", *data(rows), "progress=false", "force=true",
                                        f"hydra.run.dir={work / 'logs' / label}"])
        stages[label]["rows"] = rows
        stages[label]["rows_per_s"] = rows / stages[label]["wall_s"]

    train_dir = work / "run-train"
    stages["train_epoch"] = measure("train_epoch", [
        "lowrank-ctr-train", *data(args.rows), *quiet, "trainer.max_epochs=1", "trainer.min_epochs=1",
        "compression=none", "early_stopping_patience=null", *args.fast.split(), *args.model_overrides.split(),
        f"hydra.run.dir={train_dir}"])
    trained = json.loads((train_dir / "results.json").read_text())
    stages["train_epoch"].update({k: trained.get(k) for k in (R.KEY_TRAIN_SAMPLES_PER_S, R.KEY_TRAIN_SECONDS,
                                                              R.KEY_TRAIN_ROWS, R.KEY_TRAIN_PRECISION,
                                                              R.KEY_TRAIN_OPTIMIZER, R.KEY_TEST_AUC, R.KEY_PARAMS)})

    compress_dir = work / "run-compress"
    stages["compress"] = measure("compress", [
        "lowrank-ctr-compress", f"ckpt_path={trained[R.KEY_CHECKPOINT]}", "compression=afm",
        f"compression.finetune_epochs={args.finetune_epochs}", *quiet, *args.fast.split(),
        f"paths.root_dir={work}", f"hydra.run.dir={compress_dir}"])
    compressed = json.loads((compress_dir / "results.json").read_text())
    stages["compress"].update({k: compressed.get(k) for k in (R.KEY_RATIO, R.KEY_TEST_AUC, R.KEY_PARAMS,
                                                              R.KEY_COMPRESS_SECONDS)})

    export_dir = work / "export"
    stages["export"] = measure("export", ["lowrank-ctr-export", f"ckpt_path={compressed[R.KEY_CHECKPOINT]}", "format=onnx",
                                          f"out={export_dir}", "overwrite=true", f"paths.root_dir={work}",
                                          f"hydra.run.dir={work / 'logs' / 'export'}"])

    raw = work / "test_rows.tsv"
    stages["raw_rows"] = measure("raw_rows", ["lowrank-ctr-prepare", *data(args.rows), f"raw_out={raw}", "split=test",
                                              "overwrite=true", "progress=false",
                                              f"hydra.run.dir={work / 'logs' / 'raw'}"])
    test_rows = sum(1 for _ in open(raw))
    stages["predict"] = measure("predict", ["lowrank-ctr-predict", f"model={export_dir}", f"input={raw}",
                                            f"output={work / 'predictions.csv'}", "overwrite=true",
                                            f"threads={args.threads}"])
    stages["predict"]["rows"] = test_rows
    stages["predict"]["rows_per_s"] = test_rows / stages["predict"]["wall_s"]

    scale = CRITEO_ROWS / args.rows
    train_rows = trained.get(R.KEY_TRAIN_ROWS) or int(0.8 * args.rows)
    projection = {
        "rows": CRITEO_ROWS,
        "prepare_s": stages["prepare"]["wall_s"] * scale,
        "train_epoch_s": (CRITEO_ROWS * train_rows / args.rows) / trained[R.KEY_TRAIN_SAMPLES_PER_S]
        if trained.get(R.KEY_TRAIN_SAMPLES_PER_S) else None,
        "compress_s": stages["compress"]["wall_s"],
        "export_s": stages["export"]["wall_s"],
        "predict_s_per_million_rows": 1e6 / stages["predict"]["rows_per_s"],
        "note": "prepare, epoch and predict scale with rows (measured rates); compress and export do not. Peak RSS "
                "of preparation grows with the vocabularies kept (real Criteo: ~34M distinct categorical values "
                "before min_count), not with rows -- compare prepare_small and prepare.",
    }
    result = {"workload": {"rows": args.rows, "small_rows": args.small_rows, "max_vocab": args.max_vocab,
                           "threads": args.threads, "fast": args.fast, "model_overrides": args.model_overrides,
                           "finetune_epochs": args.finetune_epochs, "date": time.strftime("%Y-%m-%d")},
              "stages": stages, "prepare_peak_rss_ratio_big_over_small":
                  stages["prepare"]["peak_rss_mb"] / stages["prepare_small"]["peak_rss_mb"],
              "projection_full_criteo": projection, "machine": load.report()}
    sc.write_json(args.out, result)


if __name__ == "__main__":
    main()
