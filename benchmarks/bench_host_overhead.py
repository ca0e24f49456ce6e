"""Host time per training step that Lightning adds, measured where compute is ~0 (a tiny DeepFM).

    python benchmarks/bench_host_overhead.py [--steps 600] [--repeats 3] [--out benchmarks/results/host_overhead.json]

On a GPU a step's host work runs while the GPU computes the previous one, so every millisecond the loop spends on
the host is a millisecond the GPU may idle. This measures that host work on CPU with a model too small to cost
anything else (embedding 4, MLP 8, batch 64, 1 thread), as the time between consecutive batch starts:
  hand       a hand-written loop over the same data, model and optimizer (forward, BCE, zero_grad, backward, step);
  lightning  the project's CTRModule in a Lightning Trainer (no validation, checkpoints or loggers);
  per-step self.log  the same, with ``train/loss`` logged through ``self.log`` every step (on_step + on_epoch +
             prog_bar), as the module did before the loss was summed on the device.
Medians of interleaved repeats; the first 100 steps of each run are not counted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed_common as sc  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=str(sc.REPO / "data_cache" / "bench_host"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from lowrank_ctr.optim import build_optimizer

    torch.set_num_threads(1)
    batch, skip = 64, 100
    overrides = (sc.data_overrides(Path(args.workdir), (args.steps + 10) * batch * 5 // 4, 1000, batch)
                 + sc.model_overrides("deepfm", 4, [8]) + ["trainer=cpu", "optimizer=adam"])
    cfg = sc.compose(overrides)
    dm = sc.prepared_datamodule(cfg)

    def hand() -> float:
        module = sc.make_module(cfg, dm.schema)
        model = module.model.train()
        opt = build_optimizer(module.optimizer_factory, model)
        loader, starts = iter(dm.train_dataloader()), []
        for _ in range(args.steps):
            starts.append(time.perf_counter())
            b = next(loader)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(b), b["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (starts[-1] - starts[skip]) / (args.steps - 1 - skip)

    def lightning(log_every_step: bool) -> float:
        module = sc.make_module(cfg, dm.schema)
        if log_every_step:
            track = module.track_train_loss

            def tracked(loss: torch.Tensor, rows: int) -> None:
                module.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=rows)
                track(loss, rows)

            module.track_train_loss = tracked
        return sc.lightning_step_seconds(cfg, module, dm, skip, args.steps - 1 - skip)

    load = sc.MachineLoad()
    runs: dict[str, list[float]] = {"hand": [], "lightning": [], "lightning_self_log_every_step": []}
    for _ in range(args.repeats):  # interleaved: a disturbance hits every column alike
        runs["hand"].append(hand())
        runs["lightning"].append(lightning(False))
        runs["lightning_self_log_every_step"].append(lightning(True))
    medians = {k: statistics.median(v) for k, v in runs.items()}
    for k, v in medians.items():
        print(f"{k:<32} {v * 1e3:.3f} ms a step (runs: {', '.join(f'{x * 1e3:.3f}' for x in runs[k])})")
    sc.write_json(args.out, {"workload": {"model": "deepfm", "embedding_dim": 4, "mlp": [8], "batch_size": batch,
                                          "threads": 1, "steps": args.steps, "repeats": args.repeats,
                                          "torch": torch.__version__, "commit": sc.git_commit()},
                             "step_s": runs, "median_step_s": medians, "machine": load.report()})


if __name__ == "__main__":
    main()
