"""The one results schema: typed stage results, and the ONE place where they become ``results.json`` keys.

Every stage of the pipeline returns one of the dataclasses below; ``RunResult.to_json`` flattens them into the
documented flat slash keys (README "Training" and "Compression"). The report reads the same names (``KEY_*``
constants), so a key is spelled once. Stage records (``RUN/stages/NAME.json``) hold the same dataclasses
(``to_record`` / ``from_record``), so a resumed run rebuilds exactly what a finished stage returned.

Undefined metrics (an AUC on a split with one class) are ``None`` here and JSON ``null`` in results.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

RESULTS_FILE = "results.json"

# Every key other code reads back (report, predict, sweeps, summaries) is spelled once, here; ``RunResult.to_json``
# writes them (tests/test_pipeline.py::test_results_schema_* check that every one is written and that no
# reader spells a key itself).
KEY_STATUS = "status"
KEY_ERROR = "error"  # failed records only (jobs.py, the report's record of a job without results)
KEY_DATA = "data"
KEY_MODEL = "model"
KEY_SEED = "seed"
KEY_RUN_DIR = "run_dir"
KEY_CONFIG = "config"
KEY_CONFIG_HASH = "config_hash"
KEY_TEST_AUC = "test/auc"
KEY_TEST_LOGLOSS = "test/logloss"
KEY_VAL_AUC = "val/auc"
KEY_PARAMS = "params"
KEY_BYTES = "bytes"
KEY_CHECKPOINT = "checkpoint"
KEY_TRAIN_SECONDS = "train/seconds"
KEY_TRAIN_EPOCHS = "train/epochs"
KEY_TRAIN_SAMPLES_PER_S = "train/samples_per_s"
KEY_TRAIN_ROWS = "train/rows"
KEY_TRAIN_PRECISION = "train/precision"
KEY_TRAIN_OPTIMIZER = "train/optimizer"
KEY_BASE_CHECKPOINT = "base/checkpoint"
KEY_BASE_TEST_AUC = "base/test/auc"
KEY_BASE_TEST_LOGLOSS = "base/test/logloss"
KEY_BASE_PARAMS = "base/params"
KEY_BASE_BYTES = "base/bytes"
KEY_METHOD = "compress/method"
KEY_TARGETS = "compress/targets"
KEY_RATIO = "compress/ratio"
KEY_COMPRESS_PARAMS = "compress/params"
KEY_COMPRESS_BYTES = "compress/bytes"
KEY_COMPRESS_SECONDS = "compress/seconds"
KEY_RANKS = "compress/ranks"
KEY_LAYERS = "compress/layers"
KEY_POLICY = "compress/policy"
KEY_LOGIT_MSE = "compress/logit_mse"
KEY_AUC_BEFORE_FINETUNE = "compress/test/auc_before_finetune"
KEY_LOGLOSS_BEFORE_FINETUNE = "compress/test/logloss_before_finetune"
KEY_COMPRESSED_CHECKPOINT = "compress/checkpoint"
KEY_FROM_SCRATCH = "compress/from_scratch"
KEY_FINETUNE_KEPT = "compress/finetune_kept"
KEY_FINETUNE_EPOCHS = "compress/finetune_epochs"
KEY_AUC_DELTA = "compress/test/auc_delta"
KEY_CONTROL_AUC_DELTA = "control/test/auc_delta"
KEY_BENCH_THREADS = "bench/threads"
KEY_CONTROL_TEST_AUC = "control/test/auc"
KEY_CONTROL_TEST_LOGLOSS = "control/test/logloss"

#: the batch sizes inference latency is measured at by default (``bench_batch_sizes``) and reported at
BENCH_BATCH_SIZES: tuple[int, ...] = (1, 256, 4096)


def group_ratio_key(group: str) -> str:
    """``compress/ratio/embedding``: the size ratio of one layer group (embedding, mlp, other)."""
    return f"{KEY_RATIO}/{group}"


def bench_key(what: str, batch_size: int) -> str:
    """``bench/base_ms@4096``, ``bench/compressed_ms@4096``, ``bench/speedup@4096``, ``bench/int8_ms@4096``,
    ``bench/int8_speedup@4096``."""
    return f"bench/{what}@{int(batch_size)}"


#: ``bench_int8=true``: the final model served with int8 Linear layers (lowrank_ctr.int8_inference), on the test split
INT8_PREFIX = "test/int8/"
KEY_INT8_AUC = INT8_PREFIX + "auc"
KEY_INT8_LOGLOSS = INT8_PREFIX + "logloss"
KEY_INT8_AUC_DELTA = INT8_PREFIX + "auc_delta"  # int8 minus float32, the same weights


@dataclass
class Metrics:
    """AUC (None when undefined: one class) and logloss on one split; extra metrics by name (``metrics=[...]``)."""

    auc: float | None
    logloss: float
    extra: dict[str, float | None] = field(default_factory=dict)


@dataclass
class TrainingStats:
    samples_per_s: float | None
    seconds: float
    epochs: int
    rows: int
    precision: str
    optimizer: str


@dataclass
class BaseResult:
    """The uncompressed model: trained here (``training`` set) or loaded from ``checkpoint``."""

    test: Metrics
    val_auc: float | None
    params: int
    bytes: int
    checkpoint: str | None
    training: TrainingStats | None = None


@dataclass
class CompressResult:
    """Calibration + replacement + the evaluation before any fine-tuning (``before_*``)."""

    method: str
    targets: list[str]
    ratio: float
    group_ratios: dict[str, float]
    params: int
    bytes: int
    seconds: float
    calibration_batches: int
    layers: list[dict[str, Any]]
    policy: dict[str, Any]
    spec: dict[str, Any]
    before_test: Metrics | None
    before_val_auc: float | None
    logit_mse: float | None
    from_scratch: bool = False


@dataclass
class FinetuneResult:
    """The recovery fine-tune (``epochs`` may be 0) and the test of the model it kept."""

    epochs: int
    seconds: float
    kept: bool
    val_auc: float | None
    test: Metrics
    checkpoint: str


@dataclass
class ScratchResult:
    """The compressed structure trained from random initialisation with the base recipe (TT-Rec protocol)."""

    training: TrainingStats
    val_auc: float | None
    test: Metrics
    checkpoint: str
    cached: bool = False  # reused from compression.scratch_cache: training figures are of the run that trained it


@dataclass
class ControlResult:
    """"Base + same fine-tune": the uncompressed base through the identical fine-tune recipe."""

    test: Metrics
    kept: bool


@dataclass
class Int8Result:
    """The final model served with int8 Linear layers (``bench_int8=true``): its test metrics, and its latency next
    to the float32 model's (measured back to back). ``test`` is None, and ``int8_ms`` empty, when the model has no
    Linear layer to convert: the keys are then null, never a number."""

    test: Metrics | None
    sizes: list[int]  # the batch sizes asked for (bench_batch_sizes): each gets its keys, null when not measured
    float_ms: dict[int, float]
    int8_ms: dict[int, float]
    threads: int


@dataclass
class BenchResult:
    """Inference latency (median ms) per batch size, base and compressed measured back to back."""

    base_ms: dict[int, float]
    compressed_ms: dict[int, float] | None
    threads: int


@dataclass
class RunResult:
    """Everything one run produced; ``to_json`` is its results.json."""

    data: str
    model: str
    seed: int
    base: BaseResult
    compress: CompressResult | None = None
    finetune: FinetuneResult | None = None
    scratch: ScratchResult | None = None
    control: ControlResult | None = None
    bench: BenchResult | None = None
    int8: Int8Result | None = None
    run_dir: str = ""
    config_hash: str = ""
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def final_test(self) -> Metrics:
        """The metrics of the model the run ends with (compressed when compressed)."""
        if self.finetune is not None:  # also after a from-scratch stage, when a Linear stage followed it
            return self.finetune.test
        if self.scratch is not None:
            return self.scratch.test
        return self.base.test

    def to_json(self) -> dict[str, Any]:
        """The flat results.json: THE place where typed results become keys."""
        b = self.base
        out: dict[str, Any] = {KEY_STATUS: "ok", KEY_DATA: self.data, KEY_MODEL: self.model, KEY_SEED: self.seed}
        final_checkpoint = b.checkpoint
        out.update({KEY_PARAMS: b.params, KEY_BYTES: b.bytes})
        out.update(_metrics(self.final_test, "test/"))
        out[KEY_VAL_AUC] = b.val_auc
        if b.training is not None:
            out.update(_training(b.training, "train/"))
        c = self.compress
        if c is not None:
            out.update(_metrics(b.test, "base/test/"))
            out.update({KEY_BASE_PARAMS: b.params, KEY_BASE_BYTES: b.bytes, KEY_METHOD: c.method,
                        KEY_TARGETS: c.targets, KEY_RATIO: c.ratio, KEY_COMPRESS_PARAMS: c.params,
                        KEY_COMPRESS_BYTES: c.bytes, KEY_COMPRESS_SECONDS: c.seconds,
                        "compress/calibration_batches": c.calibration_batches,
                        KEY_RANKS: {l["name"]: l.get("field_ranks") or l.get("rank") for l in c.layers},
                        KEY_LAYERS: c.layers, KEY_POLICY: c.policy,
                        KEY_FROM_SCRATCH: c.from_scratch, KEY_PARAMS: c.params, KEY_BYTES: c.bytes})
            for group, ratio in c.group_ratios.items():
                if group != "total":
                    out[group_ratio_key(group)] = ratio
            if c.before_test is not None:
                out[KEY_AUC_BEFORE_FINETUNE] = c.before_test.auc
                out[KEY_LOGLOSS_BEFORE_FINETUNE] = c.before_test.logloss
                out[KEY_LOGIT_MSE] = c.logit_mse
            if c.before_val_auc is not None or not c.from_scratch:
                out["compress/val/auc_before_finetune"] = c.before_val_auc
        s = self.scratch
        if s is not None:
            out.update(_training(s.training, "scratch/train/"))
            out.update({"compress/val/auc": s.val_auc, KEY_COMPRESSED_CHECKPOINT: s.checkpoint,
                        "scratch/cached": s.cached})
            final_checkpoint = s.checkpoint
            if self.finetune is not None:  # a Linear stage followed: the model trained from scratch, before it
                out.update(_metrics(s.test, "scratch/test/"))
        f = self.finetune
        if f is not None:
            out.update({"compress/val/auc": f.val_auc, "compress/finetune_seconds": f.seconds,
                        KEY_FINETUNE_EPOCHS: f.epochs, KEY_FINETUNE_KEPT: f.kept,
                        KEY_COMPRESSED_CHECKPOINT: f.checkpoint})
            final_checkpoint = f.checkpoint
        if c is not None:
            out[KEY_AUC_DELTA] = _delta(self.final_test.auc, b.test.auc)
        if self.control is not None:
            out.update(_metrics(self.control.test, "control/test/"))
            out["control/finetune_kept"] = self.control.kept
            out[KEY_CONTROL_AUC_DELTA] = _delta(self.final_test.auc, self.control.test.auc)
        if self.bench is not None:
            for size, ms in self.bench.base_ms.items():
                out[bench_key("base_ms", size)] = ms
                if self.bench.compressed_ms is not None:
                    fast = self.bench.compressed_ms[size]
                    out[bench_key("compressed_ms", size)] = fast
                    out[bench_key("speedup", size)] = ms / fast if fast > 0 else None
            out[KEY_BENCH_THREADS] = self.bench.threads
        if self.int8 is not None:
            out.update(_int8(self.int8, self.final_test))
        out[KEY_CHECKPOINT] = final_checkpoint
        out[KEY_BASE_CHECKPOINT] = b.checkpoint
        out.update({KEY_RUN_DIR: self.run_dir, KEY_CONFIG_HASH: self.config_hash, KEY_CONFIG: self.config})
        return {k: _finite(v) for k, v in out.items()}


def _metrics(m: Metrics, prefix: str) -> dict[str, Any]:
    out = {prefix + "auc": m.auc, prefix + "logloss": m.logloss}
    out.update({prefix + name: value for name, value in m.extra.items()})
    return out


def _training(t: TrainingStats, prefix: str) -> dict[str, Any]:
    return {prefix + "samples_per_s": t.samples_per_s, prefix + "seconds": t.seconds, prefix + "epochs": t.epochs,
            prefix + "rows": t.rows, prefix + "precision": t.precision, prefix + "optimizer": t.optimizer}


def _int8(r: Int8Result, float32: Metrics) -> dict[str, Any]:
    test = r.test
    out = {KEY_INT8_AUC: test.auc if test else None, KEY_INT8_LOGLOSS: test.logloss if test else None,
           KEY_INT8_AUC_DELTA: _delta(test.auc, float32.auc) if test else None}
    for size in r.sizes:
        slow, fast = r.float_ms.get(size), r.int8_ms.get(size)
        out[bench_key("int8_ms", size)] = fast
        out[bench_key("int8_speedup", size)] = slow / fast if slow and fast else None
    return out


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _finite(value: Any) -> Any:
    """NaN / inf never reach results.json as numbers: they become null (an undefined value)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# Stage records -------------------------------------------------------------------------------------------------

def to_record(result: Any) -> dict[str, Any]:
    return dataclasses.asdict(result)


def from_record(cls: type, data: Mapping[str, Any]) -> Any:
    """Rebuild a (nested) result dataclass from its JSON record (int dict keys restored for the bench)."""
    kwargs = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in data.items():
        if name not in hints:
            continue
        kind = _NESTED.get((cls.__name__, name))
        if kind is not None and value is not None:
            value = from_record(kind, value)
        elif name in ("base_ms", "compressed_ms") and value is not None:
            value = {int(k): v for k, v in value.items()}
        kwargs[name] = value
    return cls(**kwargs)


_NESTED: dict[tuple[str, str], type] = {
    ("BaseResult", "test"): Metrics, ("BaseResult", "training"): TrainingStats,
    ("CompressResult", "before_test"): Metrics, ("FinetuneResult", "test"): Metrics,
    ("ScratchResult", "training"): TrainingStats, ("ScratchResult", "test"): Metrics,
    ("ControlResult", "test"): Metrics,
}


def write_results(run_dir: Path, results: Mapping[str, Any]) -> Path:
    """Atomic write: a results.json that exists is complete."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / (RESULTS_FILE + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=float))
    tmp.replace(run_dir / RESULTS_FILE)
    return run_dir / RESULTS_FILE


def read_results(run_dir: Path) -> dict[str, Any] | None:
    """A run's results.json, or None when there is none or it is unreadable."""
    path = Path(run_dir) / RESULTS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
