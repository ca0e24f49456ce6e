"""Shared pieces of the speed benchmarks (bench_train.py, bench_zoo.py, bench_scale.py, peers_column.py).

Everything here uses the project's public pieces only -- the Hydra configs in conf/, ``CTRDataModule``,
``CTRModule``, ``lowrank_ctr.precision`` and ``lowrank_ctr.metrics`` -- so the benchmarks measure what
``lowrank-ctr-train`` runs (minus checkpointing and validation), not a re-implementation.
Each measured configuration runs in its own child process (``run_child``): peak RSS is then that configuration's
own, and no allocator or thread-pool state leaks from one measurement into the next.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


# Machine state ----------------------------------------------------------------------------------------------
def cpu_busy_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of the whole machine so far (/proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


class MachineLoad:
    """Share of the machine's CPU that OTHER processes used while a measurement ran (0 = quiet)."""

    def __init__(self) -> None:
        self.start_busy, self.start_total = cpu_busy_ticks()
        self.own_start = _own_cpu_s()
        self.load_start = os.getloadavg()[0]

    def report(self) -> dict[str, float]:
        busy, total = cpu_busy_ticks()
        tick = os.sysconf("SC_CLK_TCK")
        ncpu = os.cpu_count() or 1
        own_ticks = (_own_cpu_s() - self.own_start) * tick
        dt = max(total - self.start_total, 1)
        other = max(busy - self.start_busy - own_ticks, 0) / dt
        return {"other_cpu_share": round(other, 3), "loadavg_start": self.load_start,
                "loadavg_end": os.getloadavg()[0], "cpu_count": ncpu}


def _own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# Configs and data -------------------------------------------------------------------------------------------
def compose(overrides: list[str], config_name: str = "train"):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lowrank_ctr.config import CONF_DIR

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides)


def data_overrides(workdir: Path, rows: int, max_vocab: int, batch_size: int, peers_data: str | None = None,
                   seed: int = 2024) -> list[str]:
    """The benchmark's data: the project's synthetic Criteo-shaped rows (all 39 fields categorical, as in the
    peer benchmark: I1..I13 bucketised), or the peer harness's CSVs (``peers_data``) read as Criteo TSV."""
    common = ["data.min_count=1", "data.numeric_mode=bucketize", f"data.batch_size={batch_size}",
              f"data.eval_batch_size={batch_size}", "data.num_workers=0", f"paths.root_dir={workdir}"]
    if peers_data:
        tsv = workdir / "peers_tsv"
        return ["data=criteo", f"data.train_path={tsv / 'train.txt'}", f"data.valid_path={tsv / 'test.txt'}",
                f"data.test_path={tsv / 'test.txt'}", f"data.out_dir={workdir / 'data' / 'peers'}", *common]
    return ["data=synthetic", f"data.rows={rows}", f"data.max_vocab={max_vocab}", f"data.seed={seed}",
            f"data.out_dir={workdir / 'data' / f'synthetic-{rows}-{max_vocab}-{seed}'}", *common]


def convert_peers_csv(peers_data: str, workdir: Path) -> None:
    """label,I1..I13,C1..C26 CSV (gen_criteo_like.py) -> Criteo TSV, once."""
    tsv = workdir / "peers_tsv"
    tsv.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        dst = tsv / f"{split}.txt"
        if dst.exists():
            continue
        with open(Path(peers_data) / f"{split}.csv") as fin, open(dst.with_suffix(".tmp"), "w") as fout:
            fin.readline()
            for line in fin:
                fout.write(line.rstrip("\r\n").replace(",", "\t") + "\n")
        dst.with_suffix(".tmp").replace(dst)


def prepared_datamodule(cfg):
    from lowrank_ctr.data.datamodule import CTRDataModule

    dm = CTRDataModule(cfg.data, seed=int(cfg.seed), progress=False)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def split_loader(dm, split: str, batch_size: int, shuffle: bool = False):
    """The project's streaming loader over one split (parquet row groups -> whole batches)."""
    from torch.utils.data import DataLoader

    from lowrank_ctr.data.datamodule import ShardedBatches

    folder = {"train": "train", "valid": "valid", "test": "test"}[split]
    return DataLoader(ShardedBatches(dm.path / folder, dm.schema, batch_size, shuffle=shuffle), batch_size=None)


def held_split(dm, split: str, batch_size: int, device: str = "cpu"):
    """One split held whole as tensors on ``device`` (what ``data.in_memory`` trains from), in file order."""
    from lowrank_ctr.data.datamodule import InMemoryBatches, ShardedBatches

    return InMemoryBatches(ShardedBatches(dm.path / split, dm.schema, batch_size), device)


def in_memory(dm, split: str) -> dict[str, torch.Tensor]:
    """A whole split as tensors (what a plain loop trains on), read with the project's reader."""
    parts = list(split_loader(dm, split, 65536))
    return {k: torch.cat([p[k] for p in parts]) for k in ("cat", "num", "multi", "label")}


# Models -----------------------------------------------------------------------------------------------------
def model_overrides(name: str, embedding_dim: int, mlp: list[int]) -> list[str]:
    return [f"model={name}", f"model.embedding_dim={embedding_dim}",
            "model.mlp=[" + ",".join(str(h) for h in mlp) + "]"]


def make_module(cfg, schema, **overrides: Any):
    """A CTRModule from a composed config (what lowrank-ctr-train builds)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from lowrank_ctr.lightning.module import CTRModule

    kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    name = kwargs.pop("name")
    return CTRModule(name, kwargs, schema.to_dict(), optimizer=instantiate(cfg.optimizer),
                     embedding_l2=float(cfg.get("embedding_l2") or 0.0), **overrides)


class PlainDeepFM(nn.Module):
    """The peer benchmark's plain-PyTorch DeepFM (bench_plain_torch.py): one offset-indexed table + MLP."""

    def __init__(self, vocab_sizes: list[int], dim: int, hidden: list[int]) -> None:
        super().__init__()
        offsets = np.concatenate([[0], np.cumsum(vocab_sizes)[:-1]])
        self.register_buffer("offsets", torch.as_tensor(offsets, dtype=torch.long))
        total = int(sum(vocab_sizes))
        self.emb = nn.Embedding(total, dim)
        self.lin = nn.Embedding(total, 1)
        self.bias = nn.Parameter(torch.zeros(1))
        nn.init.normal_(self.emb.weight, std=1e-4)
        nn.init.normal_(self.lin.weight, std=1e-4)
        layers, d = [], len(vocab_sizes) * dim
        for h in hidden:
            lin = nn.Linear(d, h)
            nn.init.xavier_normal_(lin.weight)
            nn.init.zeros_(lin.bias)
            layers += [lin, nn.ReLU()]
            d = h
        out = nn.Linear(d, 1)
        nn.init.xavier_normal_(out.weight)
        nn.init.zeros_(out.bias)
        self.mlp = nn.Sequential(*layers, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = x + self.offsets
        e = self.emb(idx)
        first = self.lin(idx).sum(dim=1) + self.bias
        s = e.sum(dim=1)
        second = 0.5 * (s * s - (e * e).sum(dim=1)).sum(dim=1, keepdim=True)
        return (first + second + self.mlp(e.flatten(1))).squeeze(1)


# Timing -----------------------------------------------------------------------------------------------------
def epoch_timer():
    """A Lightning callback timing each training epoch (on_train_epoch_start -> end) and counting its rows."""
    import lightning.pytorch as pl

    class EpochTimer(pl.Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.rows = 0

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.rows += int(batch["label"].shape[0])

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            synchronize(pl_module.device)  # a GPU epoch ends when its queued kernels have run
            self.seconds.append(time.perf_counter() - self.t0)

    return EpochTimer()


def bench_trainer(cfg, callbacks: list, **overrides: Any):
    """``cfg.trainer`` as lowrank-ctr-train builds it, without validation, checkpoints, loggers or progress."""
    from hydra.utils import instantiate

    settings = dict(callbacks=callbacks, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                    enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    settings.update(overrides)
    return instantiate(cfg.trainer, **settings)


def lightning_step_seconds(cfg, module, dm, warmup: int, steps: int, sync=lambda: None) -> float:
    """Seconds from one training batch start to the next in Lightning's loop (``bench_trainer``), averaged over
    ``steps`` steps after ``warmup``: everything the loop does per step. ``sync`` runs before each clock reading
    (a GPU's queue)."""
    import lightning.pytorch as pl

    starts: list[float] = []

    class StepStarts(pl.Callback):
        def on_train_batch_start(self, *_: Any) -> None:
            sync()
            starts.append(time.perf_counter())

    trainer = bench_trainer(cfg, [StepStarts()], max_epochs=1, min_epochs=1, limit_train_batches=warmup + steps + 1)
    trainer.fit(module, datamodule=dm)
    return (starts[-1] - starts[warmup]) / steps


def score(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], precision: Any = "32"
          ) -> tuple[np.ndarray, np.ndarray, int]:
    """(logits, labels, rows) of ``model`` over ``batches`` under lowrank_ctr.precision.inference (probabilities
    are computed too, as a server would, but AUC is taken on float32 logits: no ties from a saturated sigmoid)."""
    from lowrank_ctr.data.batch import to_device
    from lowrank_ctr.precision import inference

    model.eval()
    device = next(model.parameters()).device
    logits, labels = [], []
    with inference(precision, device):
        for batch in batches:
            z = model(to_device(batch, device)).float()
            torch.sigmoid(z)
            logits.append(z)
            labels.append(batch["label"])
    # .cpu() waits for a GPU's kernels; labels held on the device (data.in_memory=device) come back too
    z, y = torch.cat(logits).cpu().numpy(), torch.cat(labels).cpu().numpy()
    return z, y, len(y)


def device_name(device: str) -> str:
    """What ran the benchmark: the GPU's name, or 'cpu'."""
    return torch.cuda.get_device_name(0) if device == "cuda" else "cpu"


def git_commit() -> str | None:
    """The checkout's commit (+ '-dirty' with uncommitted changes): which code a result was measured with.
    ``LOWRANK_CTR_COMMIT`` names it where git cannot tell (a working tree copied to a lent machine)."""
    if os.environ.get("LOWRANK_CTR_COMMIT"):
        return os.environ["LOWRANK_CTR_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None  # not a git checkout (an installed copy, or a machine without git)
    return head + ("-dirty" if dirty else "")


def best_of(passes: int, run: Callable[[], Any], sync: Callable[[], None] = lambda: None) -> tuple[float, Any]:
    """(seconds of the fastest of ``passes`` calls of ``run``, the last call's result): the least disturbed figure."""
    best, result = float("inf"), None
    for _ in range(max(1, int(passes))):
        t0 = time.perf_counter()
        result = run()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, result


def split_infer(tokens: list[str]) -> tuple[list[str], str | None]:
    """Benchmark settings -> (config overrides, inference precision or None): ``infer=PRECISION`` (e.g.
    ``infer=int8``, lowrank_ctr.precision.serving_model) is the benchmarks' own token, not a config key."""
    infer = [t.split("=", 1)[1] for t in tokens if t.startswith("infer=")]
    return [t for t in tokens if not t.startswith("infer=")], (infer[-1] if infer else None)


def cpu_info() -> dict[str, Any]:
    """Which CPU a figure was measured on: its name, torch's vector ISA (AVX2 / AVX512 / ...) and whether oneDNN has
    bfloat16 kernels for it (without them bf16-mixed is several times slower than float32)."""
    from lowrank_ctr.precision import native_bf16

    name = platform.processor() or "unknown"
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"name": name, "capability": torch.backends.cpu.get_cpu_capability(), "bf16_kernels": native_bf16(),
            "cores": os.cpu_count()}


def synchronize(device: torch.device | str) -> None:
    """Wait for a GPU's queued kernels (a no-op on CPU), so that a timer reads the work done."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def auc_logloss(labels: np.ndarray, logits: np.ndarray) -> tuple[float | None, float]:
    """The project's metrics (lowrank_ctr.metrics) on held-out logits."""
    from lowrank_ctr.metrics import binary_metrics

    m = binary_metrics(torch.as_tensor(logits), torch.as_tensor(labels))
    return m["auc"], m["logloss"]


# Children ---------------------------------------------------------------------------------------------------
def run_child(script: Path, spec: dict[str, Any], timeout: int = 3600) -> dict[str, Any]:
    """Run ``script --child SPEC`` in a fresh process; its last stdout line is its JSON result."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(spec.get("threads", 2))}
    proc = subprocess.run([sys.executable, str(script), "--child", json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} child {spec.get('name')} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.median(vals)) if vals else None


def write_json(path: str | Path | None, result: dict[str, Any]) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")


def batches_of(tensors: dict[str, torch.Tensor], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    n = len(tensors["label"])
    for i in range(0, n, batch_size):
        yield {k: v[i:i + batch_size] for k, v in tensors.items()}
