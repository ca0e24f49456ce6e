"""int8 inference against float32 on the same weights: test AUC / logloss and inference speed, per checkpoint.

    python benchmarks/bench_int8.py RUN_DIR_OR_CKPT [...] [--threads 2] [--out benchmarks/results/int8.json]

A run directory contributes its base checkpoint and, when it has one, its compressed checkpoint (results.json's
``base/checkpoint`` / ``compress/checkpoint``). For each model: the test split of its prepared dataset scored in
float32 and with its Linear layers as int8 GEMMs (``lowrank_ctr.precision.serving_model(model, "int8")``), both
through the project's evaluation streaming the split (AUC and logloss by the training metrics), the RMS difference
of the logits, and inference samples/s over the split's first ``--time-rows`` rows (read from the parquet shards
once and held, then the models alternated ``--repeats`` times, the fastest pass of each: same process, same rows,
same threads). Run it on a quiet machine; the result records
the CPU share other processes used.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import speed_common as sc
from lowrank_ctr.int8_inference import packing_engine


def checkpoints(sources: list[str]) -> list[tuple[str, str]]:
    """(label, checkpoint path) for each source: a checkpoint file, or a run directory's base and compressed."""
    from lowrank_ctr.pipeline.results import KEY_BASE_CHECKPOINT, KEY_COMPRESSED_CHECKPOINT, KEY_RATIO, RESULTS_FILE

    out = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            results_file = path / RESULTS_FILE
            if not results_file.exists():
                raise SystemExit(f"{path} is a directory without {RESULTS_FILE}: give a run directory or a .ckpt")
            results = json.loads(results_file.read_text())
            for kind, key in (("base", KEY_BASE_CHECKPOINT), ("compressed", KEY_COMPRESSED_CHECKPOINT)):
                if results.get(key):
                    label = f"{results.get('model', '?')} seed {results.get('seed', '?')} {kind}"
                    if kind == "compressed" and results.get(KEY_RATIO):
                        label += f" {results[KEY_RATIO]:.1f}x"
                    out.append((label, results[key]))
        elif path.is_file():
            out.append((path.name, str(path)))
        else:
            raise SystemExit(f"{source} does not exist")
    return out


def measure(label: str, ckpt: str, repeats: int, time_rows: int) -> dict[str, Any]:
    from lowrank_ctr.data.datamodule import CTRDataModule
    from lowrank_ctr.lightning.module import load_model
    from lowrank_ctr.pipeline.evaluation import evaluate
    from lowrank_ctr.precision import inference, serving_model

    model, hp = load_model(ckpt)
    dm = CTRDataModule(hp["data_config"], seed=0, progress=False)
    dm.prepare_data()
    dm.setup("test")
    served = {"32": model, "int8": serving_model(model, "int8")}
    with torch.inference_mode():
        # the float32 model is its own reference: no second pass for a difference that is 0
        metrics = {p: evaluate(m, dm.test_dataloader(), "cpu", "test", reference=None if m is model else model)
                   for p, m in served.items()}
    batches, rows = [], 0  # held for the timing: the models only, not the reader
    for b in dm.test_dataloader():
        batches.append(b)
        rows += len(b["label"])
        if rows >= time_rows:
            break
    best = {p: float("inf") for p in served}
    for _ in range(repeats):
        for precision, m in served.items():
            with inference(precision):
                t0 = time.perf_counter()
                for b in batches:
                    m(b)
                best[precision] = min(best[precision], time.perf_counter() - t0)
    row = {"model": label, "checkpoint": ckpt, "test_rows": int(dm.datasets["test"].rows), "timed_rows": rows}
    for precision, (result, mse) in metrics.items():
        row[precision] = {"auc": result.auc, "logloss": result.logloss, "logit_rms_vs_float32": (mse or 0.0) ** 0.5,
                          "samples_per_s": rows / best[precision]}
    auc32, auc8 = row["32"]["auc"], row["int8"]["auc"]
    row["auc_change"] = None if auc32 is None or auc8 is None else auc8 - auc32
    row["speedup"] = row["int8"]["samples_per_s"] / row["32"]["samples_per_s"]
    print(f"{label}: AUC {auc32:.5f} -> {auc8:.5f} ({row['auc_change']:+.5f}), "
          f"{row['32']['samples_per_s']:,.0f} -> {row['int8']['samples_per_s']:,.0f} samples/s "
          f"({row['speedup']:.2f}x)", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="+", help="run directories (base + compressed checkpoints) or .ckpt files")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--time-rows", type=int, default=200_000, help="test rows held in memory for the timing")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    load = sc.MachineLoad()
    rows = [measure(label, ckpt, args.repeats, args.time_rows) for label, ckpt in checkpoints(args.sources)]
    result = {"workload": {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
                           "commit": sc.git_commit(), "cpu": sc.cpu_info(),
                           "engine": packing_engine()},
              "rows": rows, "machine": load.report()}
    sc.write_json(args.out, result)


if __name__ == "__main__":
    main()
