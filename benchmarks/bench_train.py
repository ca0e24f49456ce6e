"""Training throughput: the Lightning path vs. a plain PyTorch loop over the same tensors, in the same run.

    python benchmarks/bench_train.py [--batches 40] [--data-rows 1000000] [--out benchmarks/results/train.json]

DeepFM (embedding 16, MLP 400-400-400), batch 4096, 2 threads, Adam. Both loops get the same in-memory batches
(read once from the prepared synthetic default), so the ratio isolates Lightning's overhead; a third figure is the
full Lightning path streaming from parquet through CTRDataModule (what `lowrank-ctr-train` does).
Target: Lightning / plain >= 0.85.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lowrank_ctr.config import project_root
from lowrank_ctr.data.datamodule import CTRDataModule
from lowrank_ctr.lightning.callbacks import TrainThroughput
from lowrank_ctr.lightning.module import CTRModule

MODEL = {"embedding_dim": 16, "mlp": [400, 400, 400]}


def plain_loop(module: CTRModule, batches: list[dict], warmup: int) -> float:
    model = module.model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for i, b in enumerate(itertools.chain(batches[:warmup], batches)):
        if i == warmup:
            t0, n = time.perf_counter(), 0
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(b), b["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            n += len(b["label"])
    return n / (time.perf_counter() - t0)


def lightning_fit(module: CTRModule, loader, limit: int | None = None) -> float:
    throughput = TrainThroughput()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, limit_train_batches=limit, callbacks=[throughput])
    trainer.fit(module, train_dataloaders=loader)
    return throughput.samples_per_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--data-rows", type=int, default=1_000_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = dict(name=f"synthetic-{args.data_rows}-2024", format="synthetic", rows=args.data_rows, seed=2024,
                max_vocab=100_000, min_count=2, batch_size=4096, eval_batch_size=16384,
                out_dir=str(project_root() / "data_cache" / f"synthetic-{args.data_rows}-2024"))
    dm = CTRDataModule(data, seed=0, progress=False)
    dm.prepare_data()
    dm.setup("fit")
    batches = list(itertools.islice(iter(dm.train_dataloader()), args.batches))
    schema = dm.schema.to_dict()

    def fresh() -> CTRModule:
        torch.manual_seed(0)
        return CTRModule("deepfm", MODEL, schema)

    res = {"threads": args.threads, "batch_size": 4096, "batches": len(batches)}
    # Interleave twice to average out drift (thermal, page cache).
    plain, light = [], []
    for _ in range(2):
        plain.append(plain_loop(fresh(), batches, warmup=3))
        light.append(lightning_fit(fresh(), DataLoader(batches[:3] + batches, batch_size=None)))
    res["plain_samples_per_s"] = max(plain)
    res["lightning_samples_per_s"] = max(light)
    res["lightning_over_plain"] = res["lightning_samples_per_s"] / res["plain_samples_per_s"]
    res["lightning_streaming_samples_per_s"] = lightning_fit(fresh(), dm.train_dataloader(), limit=len(batches))
    res["streaming_over_plain"] = res["lightning_streaming_samples_per_s"] / res["plain_samples_per_s"]
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
