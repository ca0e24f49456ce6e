"""Data-layer benchmark: preparation and loading vs. naive pandas baselines, measured in the same run.

    python benchmarks/bench_data.py --rows 2000000 [--out benchmarks/results/data.json]

Steps (each timed in a fresh subprocess so that peak RSS is its own):
  1. write N synthetic Criteo-format rows as raw TSV (not timed: the input),
  2. prepare them with lowrank-ctr's streaming pipeline (Criteo reader, bucketised numerics, min_count=10),
  3. the naive baseline: pandas.read_csv of the whole file, value_counts + dict map per column, to_parquet,
  4. loader: ShardedBatches at batch 4096 with shuffling vs. a map-style Dataset over a pandas frame with per-row
     __getitem__ and the default collate,
  5. what a DeepFM training step consumes (embedding 16, MLP 400-400-400, batch 4096, 2 threads).
Reports rows/s, peak memory, the projection to full Criteo (45M rows) and the ratios the targets are about.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

CRITEO_ROWS = 45_840_617


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(fn, args, queue):  # runs in a fresh process
    import torch

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    extra = fn(*args)
    seconds = time.perf_counter() - t0
    peak_mb = _peak_rss_mb()
    queue.put({"seconds": seconds, "peak_mb": peak_mb, **(extra or {})})


def measure(fn, *args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(fn, args, q))
    p.start()
    out = q.get()
    p.join()
    return out


def write_input(path: str, rows: int) -> None:
    from lowrank_ctr.data.synthetic import SyntheticCriteo

    SyntheticCriteo(rows=rows, seed=0, max_vocab=1_000_000).write_criteo_tsv(path)


def ours(path: str, out: str) -> dict:
    from lowrank_ctr.data.prepare import prepare

    r = prepare(dict(name="bench", format="criteo", train_path=path, min_count=10, numeric_mode="bucketize",
                     out_dir=out), force=True, progress=False)
    return {"rows": sum(r.summary["rows"].values())}


def naive(path: str, out: str) -> dict:
    import numpy as np
    import pandas as pd

    from lowrank_ctr.data.readers import CRITEO_CATEGORICAL, CRITEO_NUMERIC

    df = pd.read_csv(path, sep="\t", header=None, names=["label"] + CRITEO_NUMERIC + CRITEO_CATEGORICAL,
                     dtype={c: str for c in CRITEO_CATEGORICAL})
    for c in CRITEO_NUMERIC:
        x = df[c].to_numpy(dtype=float)
        df[c] = np.where(x > 2, np.floor(np.log(np.where(x > 2, x, 3.0)) ** 2), x)
    for c in CRITEO_CATEGORICAL + CRITEO_NUMERIC:
        vc = df[c].fillna("").astype(str).value_counts()
        mapping = {v: i + 2 for i, v in enumerate(vc[vc >= 10].index)}
        df[c] = df[c].fillna("").astype(str).map(mapping).fillna(1).astype("int32")
    Path(out).mkdir(parents=True, exist_ok=True)
    df.to_parquet(Path(out) / "all.parquet")
    return {"rows": len(df)}


def loader_ours(prepared: str, max_rows: int) -> dict:
    from lowrank_ctr.data.datamodule import ShardedBatches
    from lowrank_ctr.data.schema import Schema

    ds = ShardedBatches(Path(prepared) / "train", Schema.load(prepared), 4096, shuffle=True, seed=0)
    n = 0
    t0 = time.perf_counter()
    for b in ds:
        n += len(b["label"])
        if n >= max_rows:
            break
    return {"rows": n, "loop_seconds": time.perf_counter() - t0}


def loader_naive(prepared: str, max_rows: int) -> dict:
    import pandas as pd
    import torch
    from torch.utils.data import DataLoader, Dataset

    df = pd.read_parquet(Path(prepared) / "train").head(max_rows)
    cat_cols = [c for c in df.columns if c.startswith(("C", "I"))]

    class Rows(Dataset):
        def __len__(self) -> int:
            return len(df)

        def __getitem__(self, i: int) -> dict:
            row = df.iloc[i]
            return {"cat": torch.tensor(row[cat_cols].to_numpy(dtype="int64")),
                    "label": torch.tensor(float(row["label"]))}

    n = 0
    t0 = time.perf_counter()
    for b in DataLoader(Rows(), batch_size=4096, shuffle=True):
        n += len(b["label"])
    return {"rows": n, "loop_seconds": time.perf_counter() - t0}


def train_step_rate(prepared: str) -> dict:
    import torch

    from lowrank_ctr.data.batch import random_batch
    from lowrank_ctr.data.schema import Schema
    from lowrank_ctr.models import build_model

    schema = Schema.load(prepared)
    model = build_model("deepfm", schema, embedding_dim=16, mlp=[400, 400, 400])
    opt = torch.optim.Adam(model.parameters())
    batch = random_batch(schema, 4096)
    steps = 0
    t0 = time.perf_counter()
    for i in range(25):
        if i == 5:
            t0, steps = time.perf_counter(), 0
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    return {"rows": steps * 4096, "loop_seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--loader-naive-rows", type=int, default=100_000)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lrctr-bench-"))
    raw = str(work / "train.txt")
    if not Path(raw).exists():
        print(f"writing {args.rows:,} synthetic Criteo rows to {raw} ...", file=sys.stderr)
        write_input(raw, args.rows)
    size_mb = Path(raw).stat().st_size / 2**20

    res: dict = {"rows": args.rows, "raw_mb": round(size_mb, 1)}
    print("preparing (ours) ...", file=sys.stderr)
    o = measure(ours, raw, str(work / "ours"))
    print("preparing (naive pandas) ...", file=sys.stderr)
    n = measure(naive, raw, str(work / "naive"))
    res["prepare"] = {
        "ours_rows_per_s": o["rows"] / o["seconds"], "ours_peak_mb": o["peak_mb"], "ours_seconds": o["seconds"],
        "naive_rows_per_s": n["rows"] / n["seconds"], "naive_peak_mb": n["peak_mb"], "naive_seconds": n["seconds"],
        "speedup_vs_naive": n["seconds"] / o["seconds"],
        "projected_full_criteo_minutes": CRITEO_ROWS / (o["rows"] / o["seconds"]) / 60,
    }
    print("loading ...", file=sys.stderr)
    lo = measure(loader_ours, str(work / "ours"), 10**9)
    ln = measure(loader_naive, str(work / "ours"), args.loader_naive_rows)
    ts = measure(train_step_rate, str(work / "ours"))
    ours_rate = lo["rows"] / lo["loop_seconds"]
    res["loader"] = {
        "ours_samples_per_s": ours_rate, "naive_samples_per_s": ln["rows"] / ln["loop_seconds"],
        "speedup_vs_naive": ours_rate / (ln["rows"] / ln["loop_seconds"]),
        "deepfm_train_samples_per_s": ts["rows"] / ts["loop_seconds"],
        "loader_over_train_step": ours_rate / (ts["rows"] / ts["loop_seconds"]),
    }
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
