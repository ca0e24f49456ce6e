"""Serving latency: onnxruntime vs. PyTorch (eager and TorchScript), base vs. compressed, at batch 1 / 256 / 4096.

    python benchmarks/bench_serving.py [--base CKPT --compressed CKPT] [--threads 1] [--out benchmarks/results/serving.json]

Without checkpoints it trains the default job's model (DeepFM on the synthetic default data, one epoch) and
compresses it with the default AFM recipe (5x smaller, int8 codes, loss-aware ranks), no fine-tuning: latency does
not depend on how well the weights are trained, only on the shapes. Every model is exported to ONNX and TorchScript
with ``lowrank-ctr-export``'s code and timed on the same real test rows, one configuration after another in one
process with a fixed thread count: per-call latency p50 / p99 and throughput (rows / mean latency). Ratios in the
table (compressed vs. base, onnxruntime vs. PyTorch) are measured in the same run. Last, the end-to-end figure of
``lowrank-ctr-predict`` (raw Criteo TSV rows read, encoded with the vocabularies, scored by the ONNX model and
written as CSV) in rows/s. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lowrank_ctr.bench import DEFAULT_BATCH_SIZES, make_batches
from lowrank_ctr.compression.size import model_size
from lowrank_ctr.pipeline.results import KEY_BASE_CHECKPOINT, KEY_COMPRESSED_CHECKPOINT
from lowrank_ctr.config import project_root
from lowrank_ctr.export import TensorInputs, export
from lowrank_ctr.lightning.module import load_model

import speed_common as sc


def train_default_pair(work: Path) -> tuple[str, str]:
    """A base and an AFM-compressed checkpoint of the default job (1 epoch, no fine-tune)."""
    from hydra import compose, initialize_config_dir

    from lowrank_ctr.config import CONF_DIR
    from lowrank_ctr.train import run

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["trainer.max_epochs=1", "compression=afm", "compression.finetune_epochs=0",
                                          "bench=false", "logger=none", "progress_bar=false", f"+run_dir={work}"])
    results = run(cfg)
    return results[KEY_BASE_CHECKPOINT], results[KEY_COMPRESSED_CHECKPOINT]


def time_calls(call: Callable[[], object], min_calls: int, min_seconds: float, max_seconds: float) -> np.ndarray:
    """Seconds per call, after warm-up: at least ``min_calls`` and ``min_seconds``, at most ``max_seconds``."""
    for _ in range(5):
        call()
    times = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        if (len(times) >= min_calls and elapsed >= min_seconds) or elapsed >= max_seconds:
            return np.asarray(times)


def backends(ckpt: str, export_dir: Path, threads: int) -> dict[str, Callable[[dict[str, np.ndarray]], object]]:
    """Scorers of a batch of numpy arrays: PyTorch eager, TorchScript, onnxruntime (same weights), and PyTorch /
    onnxruntime with int8 Linear layers (lowrank-ctr-predict precision=int8, lowrank-ctr-export precision=int8)."""
    from lowrank_ctr.precision import serving_model
    from lowrank_ctr.predict import onnx_scorer, torch_scorer

    model, _ = load_model(ckpt)
    export(ckpt, "onnx", export_dir / "onnx")
    export(ckpt, "torchscript", export_dir / "ts")
    export(ckpt, "onnx", export_dir / "onnx_int8", precision="int8")
    return {"pytorch": torch_scorer(TensorInputs(model).eval()),
            "torchscript": torch_scorer(torch.jit.load(str(export_dir / "ts" / "model.pt")).eval()),
            "onnxruntime": onnx_scorer(export_dir / "onnx" / "model.onnx", threads),
            "pytorch-int8": torch_scorer(TensorInputs(serving_model(model, "int8")).eval(), "int8"),
            "onnxruntime-int8": onnx_scorer(export_dir / "onnx_int8" / "model.onnx", threads)}


def predict_throughput(data_config: dict, work: Path, rows: int, threads: int) -> dict[str, dict]:
    """Raw Criteo TSV -> probabilities CSV through ``lowrank-ctr-predict``'s code (read, encode, score, write)."""
    if not rows or data_config.get("format") != "synthetic":
        return {}
    from lowrank_ctr.data.formats.synthetic import generator as synthetic_generator
    from lowrank_ctr.predict import load_served_model, predict_file

    generator = synthetic_generator({**data_config, "rows": rows})
    raw = generator.write_criteo_tsv(work / "raw.tsv", raw_ids=True, label=False)
    out = {}
    for name in ("base", "compressed"):
        summary = predict_file(load_served_model(work / name / "onnx", threads), raw, work / f"{name}.csv")
        out[name] = {"rows": summary["rows"], "seconds": summary["seconds"],
                     "rows_per_second": summary["rows_per_second"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", help="base checkpoint (default: train the default job's model)")
    ap.add_argument("--compressed", help="compressed checkpoint of the same model")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for every backend (default 1)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=list(DEFAULT_BATCH_SIZES))
    ap.add_argument("--min-seconds", type=float, default=1.0, help="least timing per configuration")
    ap.add_argument("--predict-rows", type=int, default=500_000,
                    help="raw rows for the end-to-end lowrank-ctr-predict figure (synthetic-data models; 0: skip)")
    ap.add_argument("--out", default=str(project_root() / "benchmarks" / "results" / "serving.json"))
    args = ap.parse_args()
    if bool(args.base) != bool(args.compressed):
        ap.error("give both --base and --compressed, or neither (then the default job's model is trained)")
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base, compressed = (args.base, args.compressed) if args.base else train_default_pair(work / "run")
        _, hp = load_model(base)
        from lowrank_ctr.data.datamodule import CTRDataModule

        dm = CTRDataModule(hp["data_config"], seed=0, progress=False)
        dm.prepare_data()
        dm.setup("test")
        batches = {s: {k: v.numpy() for k, v in b.items()}
                   for s, b in make_batches(dm.datasets["test"], args.batch_sizes).items()}
        rows = []
        models = {"base": base, "compressed": compressed}
        calls = {name: backends(ckpt, work / name, args.threads) for name, ckpt in models.items()}
        for size in args.batch_sizes:
            for name in models:
                for backend, call in calls[name].items():
                    t = time_calls(lambda: call(batches[size]), min_calls=200, min_seconds=args.min_seconds,
                                   max_seconds=max(args.min_seconds * 4, 4.0))
                    rows.append({"model": name, "backend": backend, "batch": size, "calls": len(t),
                                 "p50_ms": float(np.percentile(t, 50) * 1e3), "p99_ms": float(np.percentile(t, 99) * 1e3),
                                 "rows_per_s": float(size / t.mean())})
                    print(f"{name:<10} {backend:<11} batch {size:>5}: p50 {rows[-1]['p50_ms']:8.3f} ms  "
                          f"p99 {rows[-1]['p99_ms']:8.3f} ms  {rows[-1]['rows_per_s']:>12,.0f} rows/s", flush=True)
        # stored values and bytes as the size accounting counts them (int8 codes are buffers, not parameters)
        sizes = {name: model_size(load_model(ckpt)[0])["total"] for name, ckpt in models.items()}
        params = {name: size["params"] for name, size in sizes.items()}
        end_to_end = predict_throughput(hp["data_config"], work, args.predict_rows, args.threads)

    def p50(model: str, backend: str, size: int) -> float:
        return next(r["p50_ms"] for r in rows if (r["model"], r["backend"], r["batch"]) == (model, backend, size))

    ratios = {f"{size}": {"compressed_speedup_onnxruntime": p50("base", "onnxruntime", size)
                          / p50("compressed", "onnxruntime", size),
                          "compressed_speedup_pytorch": p50("base", "pytorch", size) / p50("compressed", "pytorch", size),
                          "onnxruntime_speedup_base": p50("base", "pytorch", size) / p50("base", "onnxruntime", size),
                          "onnxruntime_speedup_compressed": p50("compressed", "pytorch", size)
                          / p50("compressed", "onnxruntime", size)}
              for size in args.batch_sizes}
    report = {"threads": args.threads, "machine": f"{platform.processor() or platform.machine()}, "
                                                  f"{torch.get_num_threads()} torch threads", "cpu": sc.cpu_info(),
              "torch": torch.__version__, "params": params,
              "bytes": {name: size["bytes"] for name, size in sizes.items()},
              "size_ratio": sizes["base"]["bytes"] / sizes["compressed"]["bytes"],
              "rows": rows, "ratios_p50": ratios, "predict_end_to_end": end_to_end}
    import onnxruntime

    report["onnxruntime"] = onnxruntime.__version__
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\nparams: base {params['base']:,}  compressed {params['compressed']:,}  "
          f"({report['size_ratio']:.2f}x fewer bytes)")
    for size, r in ratios.items():
        print(f"batch {size:>5}: compressed/base speedup p50 onnxruntime {r['compressed_speedup_onnxruntime']:.2f}x "
              f"pytorch {r['compressed_speedup_pytorch']:.2f}x; onnxruntime/pytorch base "
              f"{r['onnxruntime_speedup_base']:.2f}x compressed {r['onnxruntime_speedup_compressed']:.2f}x")
    for name, r in end_to_end.items():
        print(f"lowrank-ctr-predict, {name} ONNX, {r['rows']:,} raw TSV rows -> CSV: {r['rows_per_second']:,.0f} rows/s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
