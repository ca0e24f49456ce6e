"""Training and inference speed of the project against a plain PyTorch loop, in ONE run, as ratios.

    python benchmarks/bench_train.py [--rows 200000] [--peers-data DIR] [--repeats 2]
        [--variants 32:adam,bf16-mixed:adam,32:rowwise_adagrad,bf16-mixed:rowwise_adagrad,bf16-mixed:rowwise_adam]
        [--breakdown] [--out benchmarks/results/train.json]
    python benchmarks/bench_train.py --variants 32:adam,32:rowwise_adagrad:optimizer.row_lr_scale=3 --repeats 1

Workload (the peer benchmark's, ../shared/peers-bench): DeepFM, 39 categorical fields (I1..I13 bucketised),
embedding 16, MLP 400x3, batch 4096, 1 epoch, 2 threads, Adam lr 1e-3. Data: the project's synthetic
Criteo-shaped rows (``--rows``, 80/10/10 split), or the harness's own CSVs with ``--peers-data`` (gen_criteo_like.py
output: the issue's 160k/40k rows, 9.93M parameters).

Columns, each in its own process, interleaved ``--repeats`` times (medians reported):
- ``plain``: the peer harness's plain loop -- all rows as in-memory tensors, one permutation per epoch,
  ``nn.Embedding`` DeepFM, dense ``torch.optim.Adam`` (``plain-fused``: ``fused=True``);
- ``project <precision>:<optimizer>``: ``CTRModule`` + ``CTRDataModule`` (streaming parquet, shuffle buffer) +
  the Lightning Trainer from ``conf/trainer`` with ``trainer.precision`` and ``optimizer=`` from ``conf/``;
  inference through the project's loaders under ``lowrank_ctr.precision.inference`` (bf16 when trained in bf16).
Per column: train samples/s (epoch wall time, data loading included), inference samples/s (train + test rows),
test AUC / logloss, peak RSS; ratios against ``plain`` from the same run, and the AUC difference to the project's
float32 + Adam column. ``--breakdown``: where one training step's time goes (data, forward, backward, optimizer,
Lightning's own loop) for the fastest variant and for float32 + Adam.

Never trust figures taken while other jobs run: the result records the CPU share other processes used
(``other_cpu_share``, 0 = quiet).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import speed_common as sc

DEFAULT_VARIANTS = "32:adam,bf16-mixed:adam,32:rowwise_adagrad,bf16-mixed:rowwise_adagrad,bf16-mixed:rowwise_adam"


# Children ---------------------------------------------------------------------------------------------------
def plain_child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    device = torch.device(spec.get("device", "cpu"))
    cfg = sc.compose(spec["overrides"])
    dm = sc.prepared_datamodule(cfg)
    vocab = [f.vocab_size for f in dm.schema.categorical]
    train, test = sc.in_memory(dm, "train"), sc.in_memory(dm, "test")
    # a plain GPU loop holds the whole data set on the device (the fastest a loop can feed itself)
    xtr, ytr, xte, yte = (t.to(device) for t in (train["cat"], train["label"], test["cat"], test["label"]))
    model = sc.PlainDeepFM(vocab, spec["embedding_dim"], spec["mlp"]).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, **({"fused": True} if spec["fused"] else {}))
    lossf = torch.nn.BCEWithLogitsLoss()
    bs, n = spec["batch_size"], len(xtr)
    model.train()
    t0 = time.perf_counter()
    for _ in range(spec["epochs"]):
        perm = torch.randperm(n, device=device)
        xs, ys = xtr[perm], ytr[perm]
        for i in range(0, n, bs):
            loss = lossf(model(xs[i:i + bs]), ys[i:i + bs])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    sc.synchronize(device)
    train_s = time.perf_counter() - t0
    model.eval()

    def infer() -> list:
        logits = []
        with torch.inference_mode():
            for x in (xtr, xte):
                out = []
                for i in range(0, len(x), bs):
                    z = model(x[i:i + bs])
                    torch.sigmoid(z)
                    out.append(z)
                logits.append(torch.cat(out))
        return logits

    infer_s, logits = sc.best_of(spec.get("infer_passes", 1), infer, lambda: sc.synchronize(device))
    auc, logloss = sc.auc_logloss(yte.cpu().numpy(), logits[1].cpu().numpy())
    return {"train_samples_per_s": n * spec["epochs"] / train_s, "infer_samples_per_s": (n + len(xte)) / infer_s,
            "test_auc": auc, "test_logloss": logloss, "peak_rss_mb": sc.peak_rss_mb(),
            "params": sum(p.numel() for p in model.parameters())}


def project_child(spec: dict[str, Any]) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch

    from lowrank_ctr.allocator import configure_malloc

    torch.set_num_threads(spec["threads"])
    cfg = sc.compose(spec["overrides"])
    configure_malloc(cfg.get("malloc"))  # what lowrank-ctr-train does (lowrank_ctr/allocator.py)
    pl.seed_everything(spec["seed"], verbose=False)
    dm = sc.prepared_datamodule(cfg)
    module = sc.make_module(cfg, dm.schema)
    timer = sc.epoch_timer()
    trainer = sc.bench_trainer(cfg, [timer], max_epochs=spec["epochs"], min_epochs=spec["epochs"])
    trainer.fit(module, datamodule=dm)
    train_s = sum(timer.seconds)
    from lowrank_ctr.precision import serving_model

    precision = spec.get("infer_precision") or cfg.trainer.precision
    device = spec.get("device", "cpu")
    module.model.to(device)  # Lightning hands a GPU model back on the CPU after fit
    served = serving_model(module.model, precision)  # int8: a copy with int8 Linears (built before the clock)
    # data.in_memory: score from the splits held on the device too (loaded before the clock starts)
    loaders = {split: sc.held_split(dm, split, spec["batch_size"], device) if cfg.data.get("in_memory") else
               sc.split_loader(dm, split, spec["batch_size"]) for split in ("train", "test")}
    def infer() -> tuple:
        sc.score(served, loaders["train"], precision)
        return sc.score(served, loaders["test"], precision)

    infer_s, (test_logits, test_labels, test_rows) = sc.best_of(spec.get("infer_passes", 1), infer)
    auc, logloss = sc.auc_logloss(test_labels, test_logits)
    rows = dm.datasets["train"].rows
    out = {"train_samples_per_s": timer.rows / train_s, "infer_samples_per_s": (rows + test_rows) / infer_s,
           "test_auc": auc, "test_logloss": logloss, "peak_rss_mb": sc.peak_rss_mb(),
           "params": sum(p.numel() for p in module.model.parameters())}
    if str(precision) != str(cfg.trainer.precision):  # what serving at another precision changes, same weights
        ref_logits, ref_labels, _ = sc.score(module.model, loaders["test"], cfg.trainer.precision)
        out["infer_auc_change"] = auc - sc.auc_logloss(ref_labels, ref_logits)[0]
    return out


def breakdown_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Per-step seconds of data / forward / backward / optimizer (timed by hand over the project's pieces), and
    Lightning's loop over the same number of steps: its excess over the hand loop is the loop's own overhead
    (hooks, per-step logging, progress, callbacks)."""
    import lightning.pytorch as pl
    import torch

    from lowrank_ctr.allocator import configure_malloc
    from lowrank_ctr.data.batch import to_device
    from lowrank_ctr.optim import build_optimizer
    from lowrank_ctr.precision import autocast_dtype

    torch.set_num_threads(spec["threads"])
    cfg = sc.compose(spec["overrides"])
    configure_malloc(cfg.get("malloc"))
    pl.seed_everything(spec["seed"], verbose=False)
    dm = sc.prepared_datamodule(cfg)
    warmup = 3
    batches = len(dm.train_dataloader())
    steps = min(spec["steps"], batches - warmup - 1)  # one epoch's batches at most: a small data set has few
    if steps < 1:
        raise SystemExit(f"--breakdown needs more than {warmup + 1} training batches; this data has {batches}: "
                         "raise --rows or lower --batch-size")
    dtype = autocast_dtype(cfg.trainer.precision)
    device = torch.device(spec.get("device", "cpu"))
    sync = lambda: sc.synchronize(device)  # noqa: E731 -- each part's clock stops when its kernels have run

    def hand_loop() -> dict[str, float]:
        module = sc.make_module(cfg, dm.schema)
        model = module.model.to(device).train()
        opt = build_optimizer(module.optimizer_factory, model)
        parts = dict(data=0.0, forward=0.0, backward=0.0, optimizer=0.0)
        loader = iter(dm.train_dataloader())
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            batch = to_device(next(loader), device)
            sync()
            t1 = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch["label"])
            sync()
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sync()
            t3 = time.perf_counter()
            opt.step()
            sync()
            t4 = time.perf_counter()
            if i >= warmup:
                for k, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    parts[k] += dt / steps
        return parts

    def lightning_loop() -> float:  # batch start to batch start: everything the loop does
        return sc.lightning_step_seconds(cfg, sc.make_module(cfg, dm.schema), dm, warmup, steps, sync)

    def mlp_alone() -> float | None:
        """Median seconds of the model's MLP forward + backward by itself on a random input of the step's shape:
        the share of a step no change outside the MLP can remove (its GEMMs at this machine's speed)."""
        mlp = getattr(sc.make_module(cfg, dm.schema).model, "mlp", None)
        if mlp is None:
            return None
        mlp = mlp.to(device).train()
        x = torch.randn(spec["batch_size"], mlp.net[0].in_features, device=device, requires_grad=True)
        times = []
        for _ in range(warmup + steps):
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                out = mlp(x).float().sum()
            out.backward()
            sync()
            times.append(time.perf_counter() - t0)
            x.grad = None
            mlp.zero_grad(set_to_none=True)
        return statistics.median(times[warmup:])

    hand, lightning_step, mlp_step = [], [], []
    for _ in range(2):  # interleaved, best of two: the least disturbed figure of each
        hand.append(hand_loop())
        lightning_step.append(lightning_loop())
        mlp_step.append(mlp_alone())
    parts = min(hand, key=lambda p: sum(p.values()))
    step = min(lightning_step)
    parts["lightning_loop_overhead"] = max(step - sum(parts.values()), 0.0)
    mlp_s = None if None in mlp_step else min(mlp_step)
    return {"step_s": step, "steps": steps, "parts_s": parts, "shares": {k: v / step for k, v in parts.items()},
            "mlp_alone_s": mlp_s}


CHILDREN = {"plain": plain_child, "project": project_child, "breakdown": breakdown_child}


# Parent -----------------------------------------------------------------------------------------------------
def variant_overrides(variant: str) -> tuple[list[str], str | None]:
    """PRECISION:OPTIMIZER[:OVERRIDE...][:infer=PRECISION] -> (config overrides, inference precision or None)."""
    precision, optimizer, *extra = variant.split(":")  # extra: more overrides, e.g. optimizer.row_lr_scale=3
    return sc.split_infer([f"trainer.precision={precision}", f"optimizer={optimizer}", *extra])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000, help="synthetic rows (80%% train)")
    ap.add_argument("--max-vocab", type=int, default=100_000)
    ap.add_argument("--peers-data", default=None, help="folder with the peer harness's train.csv / test.csv")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: the plain loop holds its data on the GPU; the project trains with trainer=gpu")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--infer-passes", type=int, default=3,
                    help="inference passes over all rows per column, the fastest counts (a 2 s pass is at the mercy "
                         "of a noisy neighbour; every column gets the same number)")
    ap.add_argument("--embedding-dim", type=int, default=16)
    ap.add_argument("--mlp", default="400,400,400")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="comma list of PRECISION:OPTIMIZER[:OVERRIDE...][:infer=PRECISION], e.g. "
                         "32:rowwise_adagrad:optimizer.row_lr_scale=3 or 32:rowwise_adam:infer=int8 (inference "
                         "with int8 Linear layers, lowrank_ctr.int8_inference)")
    ap.add_argument("--no-fused", action="store_true", help="skip the plain loop with fused Adam")
    ap.add_argument("--breakdown", action="store_true", help="also time the parts of one training step")
    ap.add_argument("--breakdown-steps", type=int, default=30,
                    help="timed steps per loop (at most one epoch's batches less 4); 15 left +-9 ms of noise here")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--workdir", default=str(sc.REPO / "data_cache" / "bench"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(CHILDREN[spec["kind"]](spec)))
        return

    workdir = Path(args.workdir).resolve()
    if args.peers_data:
        sc.convert_peers_csv(args.peers_data, workdir)
    mlp = [int(h) for h in args.mlp.split(",")]
    base = [*sc.data_overrides(workdir, args.rows, args.max_vocab, args.batch_size, args.peers_data),
            *sc.model_overrides("deepfm", args.embedding_dim, mlp), "logger=none", "progress_bar=false",
            f"threads={args.threads}", f"seed={args.seed}", "optimizer.lr=0.001",
            *(["trainer=gpu"] if args.device == "cuda" else [])]
    load = sc.MachineLoad()
    t_prep = time.perf_counter()
    sc.prepared_datamodule(sc.compose(base))  # prepare once, outside every timed child
    prep_s = time.perf_counter() - t_prep
    common = dict(threads=args.threads, seed=args.seed, batch_size=args.batch_size, epochs=args.epochs,
                  embedding_dim=args.embedding_dim, mlp=mlp, device=args.device, infer_passes=args.infer_passes)
    specs: list[dict[str, Any]] = [dict(common, kind="plain", name="plain", fused=False, overrides=base)]
    if not args.no_fused:
        specs.append(dict(common, kind="plain", name="plain-fused", fused=True, overrides=base))
    for variant in (v for v in args.variants.split(",") if v):
        overrides, infer = variant_overrides(variant)
        specs.append(dict(common, kind="project", name=f"project {variant}", overrides=[*base, *overrides],
                          infer_precision=infer))
    runs: dict[str, list[dict]] = {s["name"]: [] for s in specs}
    for _, spec in itertools.product(range(args.repeats), specs):
        print(f"[bench_train] {spec['name']}", flush=True)
        runs[spec["name"]].append(sc.run_child(Path(__file__), spec))

    rows = []
    for name, results in runs.items():
        row = {"name": name, "repeats": len(results)}
        for key in ("train_samples_per_s", "infer_samples_per_s", "test_auc", "test_logloss", "peak_rss_mb"):
            row[key] = sc.median(r[key] for r in results)
        if "infer_auc_change" in results[0]:
            row["infer_auc_change"] = sc.median(r["infer_auc_change"] for r in results)
        row["params"] = results[0]["params"]
        rows.append(row)
    plain = rows[0]
    float32 = next((r for r in rows if r["name"] == "project 32:adam"), None)
    for row in rows:
        row["train_over_plain"] = row["train_samples_per_s"] / plain["train_samples_per_s"]
        row["infer_over_plain"] = row["infer_samples_per_s"] / plain["infer_samples_per_s"]
        row["rss_over_plain"] = row["peak_rss_mb"] / plain["peak_rss_mb"]
        if float32 is not None and row["test_auc"] is not None and float32["test_auc"] is not None:
            row["auc_minus_project_float32_adam"] = row["test_auc"] - float32["test_auc"]

    result: dict[str, Any] = {
        "workload": {"model": "deepfm", "embedding_dim": args.embedding_dim, "mlp": mlp, "batch_size": args.batch_size,
                     "threads": args.threads, "epochs": args.epochs, "device": sc.device_name(args.device),
                     "infer_passes": args.infer_passes,
                     "torch": sc.torch.__version__, "commit": sc.git_commit(), "cpu": sc.cpu_info(),
                     "data": args.peers_data or
                     f"synthetic rows={args.rows} max_vocab={args.max_vocab}", "prepare_s": prep_s},
        "rows": rows,
    }
    if args.breakdown:
        fastest = max((r for r in rows if r["name"].startswith("project")), key=lambda r: r["train_samples_per_s"])
        result["breakdown"] = {}
        for name in dict.fromkeys(["project 32:adam", fastest["name"]]):
            spec = dict(common, kind="breakdown", name=name, steps=args.breakdown_steps,
                        overrides=[*base, *variant_overrides(name.split(" ", 1)[1])[0]])
            print(f"[bench_train] breakdown {name}", flush=True)
            result["breakdown"][name] = sc.run_child(Path(__file__), spec)
    result["machine"] = load.report()
    sc.write_json(args.out, result)


if __name__ == "__main__":
    main()
