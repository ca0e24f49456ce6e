"""Training and inference samples/s of every zoo model, float32 + Adam against the fast settings, in one run.

    python benchmarks/bench_zoo.py [--rows 200000] [--batches 20] [--models deepfm,xdeepfm,...]
        [--fast bf16-mixed:rowwise_adagrad] [--out benchmarks/results/zoo.json] [--merge]

Each model is built from its own ``conf/model/NAME.yaml`` (the sizes a user gets), on the same data as
bench_train.py (synthetic Criteo-shaped rows, 39 categorical fields, batch 4096, 2 threads), in its own process.
Training: ``--batches`` Lightning steps after 3 warm-up steps (data loading included); inference: the test split
through the project's loader under ``lowrank_ctr.precision.inference``. ``--tiny`` shrinks every model (the
tests' sizes) to check the script quickly. The result records the CPU share other processes used. ``--merge``
re-measures only ``--models`` and replaces their rows in an existing ``--out`` (other rows kept; each row keeps
the machine load of the run that measured it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import speed_common as sc

WARMUP = 3


def model_child(spec: dict[str, Any]) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch

    from lowrank_ctr.allocator import configure_malloc

    torch.set_num_threads(spec["threads"])
    out: dict[str, Any] = {}
    for label, precision, optimizer in (("float32_adam", "32", "adam"), ("fast", *spec["fast"].split(":"))):
        cfg = sc.compose([*spec["overrides"], f"trainer.precision={precision}", f"optimizer={optimizer}"])
        configure_malloc(cfg.get("malloc"))  # what lowrank-ctr-train does
        pl.seed_everything(spec["seed"], verbose=False)
        dm = sc.prepared_datamodule(cfg)
        module = sc.make_module(cfg, dm.schema)
        marks: list[tuple[float, int]] = []

        class StepTimer(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                marks.append((time.perf_counter(), 0))

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                marks[-1] = (marks[-1][0], int(batch["label"].shape[0]))
                marks.append((time.perf_counter(), -1))

        trainer = sc.bench_trainer(cfg, [StepTimer()], max_epochs=1, min_epochs=1,
                                   limit_train_batches=WARMUP + spec["batches"])
        trainer.fit(module, datamodule=dm)
        starts = [(t, n) for t, n in marks if n >= 0]
        ends = [t for t, n in marks if n == -1]
        rows = sum(n for _, n in starts[WARMUP:])
        out[f"{label}_train_samples_per_s"] = rows / (ends[-1] - starts[WARMUP][0])
        t0 = time.perf_counter()
        _, _, n = sc.score(module.model, sc.split_loader(dm, "test", spec["batch_size"]), precision)
        out[f"{label}_infer_samples_per_s"] = n / (time.perf_counter() - t0)
        out["params"] = sum(p.numel() for p in module.model.parameters())
    out["train_speedup"] = out["fast_train_samples_per_s"] / out["float32_adam_train_samples_per_s"]
    out["infer_speedup"] = out["fast_infer_samples_per_s"] / out["float32_adam_infer_samples_per_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--max-vocab", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--batches", type=int, default=20, help="timed training steps per model and setting")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default=None, help="comma list (default: every registered model)")
    ap.add_argument("--fast", default="bf16-mixed:rowwise_adagrad", help="PRECISION:OPTIMIZER compared to 32:adam")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny model sizes (checks the script)")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--workdir", default=str(sc.REPO / "data_cache" / "bench"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--merge", action="store_true", help="replace only these models' rows in an existing --out")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.child:
        print(json.dumps(model_child(json.loads(args.child))))
        return

    from lowrank_ctr.models import list_models

    names = args.models.split(",") if args.models else list_models()
    workdir = Path(args.workdir).resolve()
    data = [*sc.data_overrides(workdir, args.rows, args.max_vocab, args.batch_size), "logger=none",
            "progress_bar=false", f"threads={args.threads}", f"seed={args.seed}"]
    load = sc.MachineLoad()
    sc.prepared_datamodule(sc.compose(data))
    rows = []
    for name in names:
        overrides = [f"model={name}", "model.embedding_dim=16"]
        if args.tiny:
            sys.path.insert(0, str(sc.REPO / "tests"))
            from helpers import tiny_model_overrides

            overrides = [*tiny_model_overrides(name), "model.embedding_dim=4"]
        spec = dict(name=name, overrides=[*data, *overrides], threads=args.threads, seed=args.seed,
                    batch_size=args.batch_size, batches=args.batches, fast=args.fast)
        print(f"[bench_zoo] {name}", flush=True)
        rows.append({"model": name, **sc.run_child(Path(__file__), spec)})
    workload = {"data": f"synthetic rows={args.rows} max_vocab={args.max_vocab}", "batch_size": args.batch_size,
                "threads": args.threads, "timed_batches": args.batches, "fast": args.fast,
                "model_sizes": "tiny (tests)" if args.tiny else "conf/model/NAME.yaml, embedding 16"}
    machine = load.report()
    for row in rows:
        row["train_samples_per_s"] = row["fast_train_samples_per_s"]
        row["machine"] = machine
    if args.merge:
        rows = merged_rows(args.out, workload, rows)
    sc.write_json(args.out, {"workload": workload, "rows": rows, "machine": machine})


def merged_rows(out: str | None, workload: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of an earlier run of the same workload with these models' rows replaced (sorted by model)."""
    if not out or not Path(out).is_file():
        raise SystemExit(f"--merge needs an existing --out file to merge into, got {out!r}")
    old = json.loads(Path(out).read_text())
    if old.get("workload") != workload:
        raise SystemExit(f"--merge: {out} was measured on another workload ({old.get('workload')}); "
                         f"re-run every model without --merge")
    fresh = {row["model"]: row for row in rows}
    kept = [{**row, "machine": row.get("machine", old.get("machine"))} for row in old["rows"]
            if row["model"] not in fresh]
    return sorted([*kept, *rows], key=lambda row: row["model"])


if __name__ == "__main__":
    main()
