"""The run pipeline: results schema, fine-tune recipe (distillation, warm-up, frozen codes), run directories,
non-finite losses, end-of-run summaries, callbacks from config, the extra-metric extension point."""

import csv
import io
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import TINY, compose_cfg, read_results, run_cli
from lowrank_ctr.lightning.callbacks import DatasetEpoch, EarlyStopping
from lowrank_ctr.lightning.module import NonFiniteLossError, load_model
from lowrank_ctr.pipeline import rundir
from lowrank_ctr.pipeline.finetune import distillation_loss
from lowrank_ctr.pipeline.results import (BaseResult, BenchResult, CompressResult, ControlResult, FinetuneResult,
                                          Int8Result, Metrics, RunResult, TrainingStats, from_record, to_record)
from lowrank_ctr.pipeline.summary import count_jobs, human_summary, multirun_line
from lowrank_ctr.train import run


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


# Distillation ---------------------------------------------------------------------------------------------------

def _bce(p: float, y: float) -> float:
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def _sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


@pytest.mark.parametrize("weight,temperature", [(0.0, 1.0), (0.5, 1.0), (0.3, 2.0), (1.0, 4.0)])
def test_distillation_loss_equals_its_formula_on_a_hand_made_batch(weight, temperature):
    student, teacher, labels = [1.5, -0.5, 0.2], [2.0, 0.5, -1.0], [1.0, 0.0, 1.0]
    by_hand = sum((1 - weight) * _bce(_sigmoid(s), y)
                  + weight * _bce(_sigmoid(s / temperature), _sigmoid(t / temperature)) * temperature ** 2
                  for s, t, y in zip(student, teacher, labels)) / 3
    got = distillation_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(labels), weight, temperature)
    assert float(got) == pytest.approx(by_hand, rel=1e-6)


def test_distillation_pulls_towards_the_teacher():
    student = torch.zeros(4, requires_grad=True)
    teacher = torch.tensor([3.0, 3.0, -3.0, -3.0])
    distillation_loss(student, teacher, torch.zeros(4), weight=1.0, temperature=1.0).backward()
    assert (student.grad[:2] < 0).all() and (student.grad[2:] > 0).all()  # gradient descent moves towards teacher


# Results schema ---------------------------------------------------------------------------------------------------

def _run_result() -> RunResult:
    stats = TrainingStats(samples_per_s=100.0, seconds=2.0, epochs=2, rows=1000, precision="32-true", optimizer="adam")
    base = BaseResult(test=Metrics(0.7, 0.45), val_auc=0.71, params=100, bytes=400, checkpoint="b.ckpt",
                      training=stats)
    comp = CompressResult(method="afm", targets=["embedding"], ratio=4.0, group_ratios={"embedding": 5.0, "total": 4.0},
                          params=25, bytes=100, seconds=0.5, calibration_batches=2,
                          layers=[{"name": "embedding.table", "rank": 2}], policy={}, spec={"modules": []},
                          before_test=Metrics(0.69, 0.46), before_val_auc=0.70, logit_mse=0.01)
    return RunResult(data="d", model="m", seed=1, base=base, compress=comp,
                     finetune=FinetuneResult(epochs=1, seconds=1.0, kept=True, val_auc=0.705,
                                             test=Metrics(None, 0.44), checkpoint="c.ckpt"),
                     control=ControlResult(test=Metrics(0.702, 0.449), kept=False),
                     bench=BenchResult(base_ms={4096: 2.0}, compressed_ms={4096: 1.0}, threads=2),
                     int8=Int8Result(test=Metrics(0.6995, 0.441), sizes=[256, 4096], float_ms={256: 0.3, 4096: 1.0},
                                     int8_ms={256: 0.2, 4096: 0.8}, threads=2))


def test_results_flatten_to_the_documented_keys():
    out = _run_result().to_json()
    assert out["test/auc"] is None and out["test/logloss"] == 0.44  # the final (compressed) model's
    assert out["base/test/auc"] == 0.7 and out["base/params"] == 100 and out["params"] == 25
    assert out["checkpoint"] == "c.ckpt" and out["base/checkpoint"] == "b.ckpt"  # checkpoint = the final model's
    assert out["compress/logit_mse"] == 0.01 and out["compress/ratio/embedding"] == 5.0
    assert "compress/ratio/total" not in out
    assert out["compress/test/auc_delta"] is None  # undefined AUC: no number derived from it
    assert out["bench/speedup@4096"] == 2.0 and out["train/samples_per_s"] == 100.0
    assert out["control/test/auc"] == 0.702 and out["compress/finetune_kept"] is True
    assert out["test/int8/auc"] == 0.6995 and out["test/int8/logloss"] == 0.441
    assert out["test/int8/auc_delta"] is None  # against the final model's undefined float32 AUC
    assert out["bench/int8_ms@256"] == 0.2 and out["bench/int8_speedup@4096"] == pytest.approx(1.25)
    json.dumps(out, allow_nan=False)  # never NaN in results.json


#: modules that read results.json records: every key they read must come from pipeline/results.py
_RESULT_READERS = ("report.py", "plots.py", "predict.py", "jobs.py", "pipeline/summary.py")
_RESULT_KEY = re.compile(r"^(test|val|base|compress|control|bench|train|scratch)/[a-z_/@0-9]+$")


def test_results_schema_every_key_readers_use_is_written():
    """Every KEY_* constant, per-group ratio and bench key the readers use is one that to_json writes (a key read
    but never written would silently read as missing forever)."""
    import lowrank_ctr.pipeline.results as R

    bench = BenchResult(base_ms={b: 2.0 for b in R.BENCH_BATCH_SIZES},
                        compressed_ms={b: 1.0 for b in R.BENCH_BATCH_SIZES}, threads=2)
    r = _run_result()
    r.bench = bench
    r.compress.group_ratios = {"embedding": 5.0, "mlp": 3.0, "total": 4.0}
    out = r.to_json()
    written_by_failures = {R.KEY_ERROR}  # only failed records (jobs.py) carry it
    keys = {name: getattr(R, name) for name in dir(R) if name.startswith("KEY_")}
    missing = {name: key for name, key in keys.items() if key not in out and key not in written_by_failures}
    assert not missing, f"keys defined for readers but never written by RunResult.to_json: {missing}"
    assert {R.group_ratio_key("embedding"), R.group_ratio_key("mlp")} <= set(out)
    for size in R.BENCH_BATCH_SIZES:
        assert {R.bench_key(w, size) for w in ("base_ms", "compressed_ms", "speedup")} <= set(out)


def test_results_schema_readers_spell_no_key_themselves():
    """The report, plots, predict, sweeps and summaries read result keys only through pipeline/results.py: no
    result-key string literal in their code (docstrings aside), and every ``R.KEY_*`` they name exists."""
    import ast

    import lowrank_ctr
    import lowrank_ctr.pipeline.results as R

    root = Path(lowrank_ctr.__file__).parent
    literals, unknown = [], []
    for rel in _RESULT_READERS:
        tree = ast.parse((root / rel).read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if _RESULT_KEY.match(node.value):
                    literals.append(f"{rel}:{node.lineno} {node.value!r}")
            if isinstance(node, ast.Attribute) and node.attr.startswith("KEY_") and not hasattr(R, node.attr):
                unknown.append(f"{rel}:{node.lineno} {node.attr}")
    assert not literals, f"result keys spelled outside pipeline/results.py: {literals}"
    assert not unknown, f"unknown result key constants: {unknown}"


def test_stage_records_round_trip():
    r = _run_result()
    for part in (r.base, r.compress, r.finetune, r.control, r.bench):
        back = from_record(type(part), json.loads(json.dumps(to_record(part))))
        assert back == part


# Fine-tune recipe -------------------------------------------------------------------------------------------------

def test_freeze_codes_keeps_codes_and_trains_the_rest(tmp_path, data_dir):
    res = run(compose_cfg("train", TINY + ["model.mlp=[16,16]", "bench=false", "compression=afm",
                                           "compression.calibration_batches=2", "compression.freeze_codes=true",
                                           "compression.code_dtype=float32",  # int8 codes never train anyway
                                           "compression.finetune_lr=0.01", "compression.val_check_interval=1.0"],
                          tmp_path, data_dir))
    before = torch.load(tmp_path / "checkpoints" / "compressed-init.pt", weights_only=True)
    after = load_checkpoint_state(tmp_path / "checkpoints" / "compressed-last.ckpt")
    assert torch.equal(after["embedding.table.codes"], before["embedding.table.codes"])
    assert not torch.equal(after["embedding.table.projection"], before["embedding.table.projection"])
    assert res["compress/finetune_epochs"] == 1


def test_control_cache_shares_one_control_per_base_and_recipe(tmp_path, data_dir):
    """compression.control_cache: the second compression of one base reuses the first one's control (no fit), a
    changed fine-tune recipe does not."""
    base = run(compose_cfg("train", TINY + ["model.mlp=[16,16]", "bench=false"], tmp_path / "base", data_dir))
    cache = tmp_path / "controls"
    common = [f"ckpt_path={base['checkpoint']}", "bench=false", "progress_bar=false", "logger=none",
              "compression.control=true", f"compression.control_cache={cache}", "compression.calibration_batches=2",
              "compression.val_check_interval=1.0"]

    def compress_run(name, *extra):
        return run(compose_cfg("compress", [*common, *extra], tmp_path / name, data_dir))

    first = compress_run("svd", "compression=svd", "compression.target_ratio=3")
    assert (tmp_path / "svd" / "control").exists() and len(list(cache.glob("control-*.json"))) == 1
    second = compress_run("afm", "compression=afm")
    assert not (tmp_path / "afm" / "control").exists()  # no control fit: the cached one
    assert second["control/test/auc"] == first["control/test/auc"]
    assert second["control/finetune_kept"] == first["control/finetune_kept"]
    assert second["compress/method"] == "afm" and second["compress/ratio"] != first["compress/ratio"]
    compress_run("lr", "compression=afm", "compression.finetune_lr=0.002")  # another recipe: its own control
    assert (tmp_path / "lr" / "control").exists() and len(list(cache.glob("control-*.json"))) == 2


def test_stage_cache_is_a_miss_for_another_key_a_changed_entry_or_a_missing_file(tmp_path):
    from lowrank_ctr.pipeline.stage_cache import StageCache

    key = {"structure": {"rank": 2}, "settings": {"seed": 1}}
    cache = StageCache.at(tmp_path, "scratch", key)
    assert cache.read(ControlResult) is None
    weights = tmp_path / "model.ckpt"
    weights.write_bytes(b"weights")
    result = ControlResult(test=Metrics(0.7, 0.4), kept=True)
    cache.write(result, files={".ckpt": weights})
    assert cache.read(ControlResult) == result and cache.file(".ckpt").read_bytes() == b"weights"
    other = StageCache.at(tmp_path, "scratch", {**key, "settings": {"seed": 2}})
    assert other.path != cache.path and other.read(ControlResult) is None
    saved = json.loads(cache.path.read_text())
    saved["key"]["settings"]["seed"] = 3  # an entry whose key is not the wanted one: a miss, not a wrong result
    cache.path.write_text(json.dumps(saved))
    assert cache.read(ControlResult) is None
    saved["key"]["settings"]["seed"] = 1
    cache.path.write_text(json.dumps(saved))
    assert cache.read(ControlResult) == result
    cache.file(".ckpt").unlink()  # the entry's checkpoint gone: a miss
    assert cache.read(ControlResult) is None


def load_checkpoint_state(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}


def test_warmup_ramps_the_learning_rate(tmp_path, data_dir):
    from lowrank_ctr.pipeline.finetune import FinetuneModule

    cfg = compose_cfg("train", TINY, tmp_path, data_dir)
    from lowrank_ctr.pipeline.context import make_datamodule, make_module

    dm = make_datamodule(cfg)
    module = make_module(cfg, dm.schema, FinetuneModule, warmup=0.5)
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)  # what Lightning knows when it asks
    config = module.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(7):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[:6] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3, 1e-3])  # 5 warm-up steps to lr=1e-3


# Run directories (issue 11, rule 1) -------------------------------------------------------------------------------

def test_a_second_different_run_into_a_run_directory_is_refused(tmp_path, data_dir):
    common = TINY + ["model.mlp=[16]", "bench=false"]
    first = run(compose_cfg("train", common, tmp_path, data_dir))
    results = (tmp_path / "results.json").read_text()
    with pytest.raises(rundir.RunDirTaken, match="another configuration"):
        run(compose_cfg("train", common + ["seed=2"], tmp_path, data_dir))
    assert (tmp_path / "results.json").read_text() == results  # the first run's files are untouched
    again = run(compose_cfg("train", common, tmp_path, data_dir))  # the same run may come back
    assert again["test/auc"] == pytest.approx(first["test/auc"], abs=1e-6)
    assert not (tmp_path / rundir.LOCK_FILE).exists()


def test_a_different_run_is_refused_on_the_command_line(tmp_path):
    args = ["lowrank-ctr-train", *TINY, "model.mlp=[16]", "bench=false", f"paths.data_dir={tmp_path / 'c'}",
            f"hydra.run.dir={tmp_path / 'run'}"]
    assert run_cli(args).returncode == 0
    hydra_config = (tmp_path / "run" / ".hydra" / "config.yaml").read_text()
    r = run_cli([*args, "model.embedding_dim=3"])
    assert r.returncode == 2 and "already holds a run of another configuration" in r.stderr.strip().splitlines()[-1]
    assert (tmp_path / "run" / ".hydra" / "config.yaml").read_text() == hydra_config  # refused before Hydra wrote


def test_a_live_lock_refuses_and_a_stale_lock_is_replaced(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / rundir.LOCK_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": holder.pid}))
        with pytest.raises(rundir.RunDirTaken, match="in use by another run"):
            rundir.acquire(tmp_path, "abc", "train")
    finally:
        holder.kill()
        holder.wait()
    rundir.acquire(tmp_path, "abc", "train")  # the holder is gone: its lock is stale
    assert json.loads((tmp_path / rundir.LOCK_FILE).read_text())["pid"] == os.getpid()
    rundir.release(tmp_path)
    assert not (tmp_path / rundir.LOCK_FILE).exists()


# Non-finite loss (issue 11, rule 4) -------------------------------------------------------------------------------

def test_a_diverging_run_stops_with_a_clear_error(tmp_path, data_dir):
    with pytest.raises(NonFiniteLossError, match="train/loss is (nan|inf).*lower optimizer.lr"):
        run(compose_cfg("train", TINY + ["model.mlp=[16]", "bench=false", "optimizer.lr=1e12"], tmp_path, data_dir))
    assert not (tmp_path / "results.json").exists()


def test_a_gpu_reads_the_loss_flag_every_few_steps_and_before_validation():
    """On a GPU the running loss stays on the device between reads (a read waits for the queue): a NaN loss is still
    caught at the next read or before the next validation, never lost."""
    from lowrank_ctr.data.schema import FieldSpec, Schema
    from lowrank_ctr.lightning.module import CTRModule

    schema = Schema("s", [FieldSpec("a", "categorical", 10)])
    module = CTRModule("lr", {}, schema.to_dict())
    module.trainer = SimpleNamespace(optimizers=[], global_step=7, current_epoch=0, log_every_n_steps=0)
    module.nonfinite_read_every = 3  # what a GPU does with NONFINITE_CHECK_STEPS
    ok, nan = torch.tensor(0.5), torch.tensor(float("nan"))
    module.on_train_epoch_start()
    module.track_train_loss(nan, 4)  # not read yet
    module.track_train_loss(ok, 4)
    with pytest.raises(NonFiniteLossError, match="nan or inf .*one of the 3 steps up to step 7"):
        module.track_train_loss(ok, 4)
    module.on_train_epoch_start()  # a new epoch: a fresh running loss
    module.track_train_loss(torch.tensor(float("inf")), 4)
    with pytest.raises(NonFiniteLossError, match="lower optimizer.lr"):
        module.on_validation_start()  # no checkpoint of NaN weights
    module.on_train_epoch_start()
    for _ in range(6):  # finite losses: read twice, nothing raised, nothing left unread
        module.track_train_loss(ok, 4)
    module.on_validation_start()
    assert float(module.running_train_loss()) == pytest.approx(0.5)
    module.nonfinite_read_every = None  # on CPU: read at every step
    with pytest.raises(NonFiniteLossError, match="train/loss is nan at epoch 0, step 7"):
        module.track_train_loss(nan, 4)


def _tiny_ctr_fit(tmp_path, log_every: int, callbacks: list, steps: int = 12, wrap=None):
    """A CTRModule (DeepFM, SGD: no step counters read back) fitted one epoch on ``steps`` random batches with a CSV
    logger and the line progress; ``wrap``: a context manager around fit."""
    import contextlib
    import functools

    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from lowrank_ctr.data.schema import FieldSpec, Schema
    from lowrank_ctr.lightning.module import CTRModule
    from lowrank_ctr.lightning.progress import LineProgress

    schema = Schema("s", [FieldSpec("a", "categorical", 10), FieldSpec("b", "categorical", 7)])
    g = torch.Generator().manual_seed(0)
    sizes = [16] * (steps - 1) + [5]  # a short last batch, as an epoch's often is
    batches = [{"cat": torch.randint(0, 7, (n, 2), generator=g), "num": torch.zeros(n, 0),
                "multi": torch.zeros(n, 0, dtype=torch.long), "label": torch.randint(0, 2, (n,), generator=g).float()}
               for n in sizes]
    module = CTRModule("deepfm", {"embedding_dim": 4, "mlp": [8]}, schema.to_dict(),
                       optimizer=functools.partial(torch.optim.SGD, lr=0.01))
    module.nonfinite_read_every = 50  # what a GPU does (NONFINITE_CHECK_STEPS)
    out = io.StringIO()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=CSVLogger(tmp_path, name="", version=""),
                         log_every_n_steps=log_every, enable_checkpointing=False, enable_model_summary=False,
                         callbacks=[*callbacks, LineProgress(every_n_steps=1000, every_s=3600, stream=out)])
    with wrap or contextlib.nullcontext():
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert trainer.global_step == steps
    return trainer, out.getvalue()


def test_a_training_step_reads_nothing_back_from_the_device(tmp_path):
    """Reading a value back from the device (``.item()``, ``bool``, ``float``) waits for a GPU's queued work; one such
    read a step serialises host and GPU. Lightning's progress-bar metrics did it after every batch, and so did the
    non-finite check: counted here on CPU as the dispatcher's ``_local_scalar_dense``, over the middle steps of an
    epoch with a CSV logger and the line progress, the non-finite flag read as on a GPU: none."""
    import lightning.pytorch as pl
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        counting, count = False, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Reads.count += self.counting and func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    class Window(pl.Callback):  # steps 3 to 11 of 12: after the first steps' set-up, before the epoch's end
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            Reads.counting = 2 <= batch_idx <= 10

    _tiny_ctr_fit(tmp_path, 50, [Window()], wrap=Reads())
    assert Reads.count == 0, f"{Reads.count} reads back from the device in 9 training steps"


def test_the_training_loss_is_logged_every_n_steps_and_as_the_epoch_mean(tmp_path):
    """train/loss_step on the loggers' steps (log_every_n_steps) equals that step's loss; train/loss_epoch and the
    progress line's loss equal the row-weighted mean of the epoch's losses."""
    import lightning.pytorch as pl

    losses: list[float] = []
    sizes: list[int] = []

    class Losses(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))
            sizes.append(len(batch["label"]))

    _, progress = _tiny_ctr_fit(tmp_path, 5, [Losses()])
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    steps = {int(r["step"]): float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")}
    assert steps == pytest.approx({4: losses[4], 9: losses[9]}, abs=1e-6)
    mean = sum(loss * n for loss, n in zip(losses, sizes)) / sum(sizes)
    assert sizes[-1] < sizes[0] and abs(mean - sum(losses) / len(losses)) > 1e-6  # rows, not batches, weigh
    epoch = [float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")]
    assert epoch == pytest.approx([mean], abs=1e-6)
    assert f"loss {mean:.4f}" in progress.splitlines()[-2]  # the line at the epoch's last step


def test_a_diverging_sweep_job_is_recorded_as_failed(tmp_path):
    sweep = tmp_path / "sweep"
    r = run_cli(["lowrank-ctr-train", "-m", *TINY, "model.mlp=[16]", "bench=false", "optimizer.lr=0.001,1e12",
                 f"paths.data_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_results(sweep / "0")["status"] == "ok"
    failed = read_results(sweep / "1")
    assert failed["status"] == "failed" and "train/loss is" in failed["error"]
    assert "2 jobs: 1 ok, 1 failed, 0 skipped" in r.stdout and f"lowrank-ctr-report {sweep}" in r.stdout
    again = run_cli(["lowrank-ctr-train", "-m", *TINY, "model.mlp=[16]", "bench=false", "optimizer.lr=0.001,1e12",
                     f"paths.data_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"])
    assert "2 jobs: 0 ok, 1 failed, 1 skipped" in again.stdout


# Rule 6: the compression feasibility check runs before base training ----------------------------------------------

def test_compression_check_runs_before_the_base_is_trained(tmp_path, data_dir, monkeypatch):
    import lowrank_ctr.compression as compression

    def refuse(model, comp, batch=None):
        raise ValueError(f"compression.mlp_rank={comp.mlp_rank} is impossible")

    monkeypatch.setattr(compression, "check_config", refuse, raising=False)
    with pytest.raises(ValueError, match="impossible"):
        run(compose_cfg("train", TINY + ["model.mlp=[16]", "compression=afm"], tmp_path, data_dir))
    assert not (tmp_path / "checkpoints").exists()  # nothing was trained


# Summaries (issue 13, item 5) ---------------------------------------------------------------------------------

def test_summary_says_what_happened_with_units_and_next_commands(tmp_path):
    out = _run_result().to_json()
    out["run_dir"] = str(tmp_path)
    (tmp_path / "wandb" / "offline-run-1").mkdir(parents=True)
    text = human_summary(out)
    assert "100 parameters, 400 bytes" in text and "25 parameters, 100 bytes" in text and "4.00x fewer bytes" in text
    assert "test AUC undefined (one class)" in text and "2.00x faster than the base at batch 4096" in text
    assert f"lowrank-ctr-report {tmp_path}" in text and "lowrank-ctr-export ckpt_path=c.ckpt" in text
    assert f"wandb sync {tmp_path / 'wandb' / 'offline-run-1'}" in text


def test_multirun_counts(tmp_path):
    started = time.time()
    for i, status in enumerate(["ok", "ok", "failed", None]):
        job = tmp_path / str(i)
        (job / ".hydra").mkdir(parents=True)
        if status:
            (job / "results.json").write_text(json.dumps({"status": status}))
    old = tmp_path / "0" / "results.json"
    os.utime(old, (started - 100, started - 100))  # finished before this multirun: skipped
    counts = count_jobs(tmp_path, started)
    assert counts == {"ok": 1, "failed": 2, "skipped": 1}
    assert multirun_line(counts) == "4 jobs: 1 ok, 2 failed, 1 skipped"


# Callbacks --------------------------------------------------------------------------------------------------------

def test_dataset_epoch_advances_the_shuffle_of_the_training_data():
    seen = []
    loader = SimpleNamespace(dataset=SimpleNamespace(set_epoch=seen.append))
    for epoch in range(3):
        DatasetEpoch().on_train_epoch_start(SimpleNamespace(train_dataloader=loader, current_epoch=epoch), None)
    assert seen == [0, 1, 2]


def test_early_stopping_patience_is_counted_in_epochs():
    stop = EarlyStopping(patience_epochs=2)
    stop._set_patience(SimpleNamespace(num_training_batches=40, val_check_batch=10))  # 4 validations per epoch
    assert stop.patience == 8
    stop._set_patience(SimpleNamespace(num_training_batches=40, val_check_batch=40))
    assert stop.patience == 2


def test_callbacks_come_from_config(tmp_path, data_dir):
    res = run(compose_cfg("train", TINY + ["model.mlp=[16]", "bench=false", "~callbacks.throughput"], tmp_path,
                          data_dir))
    assert res["train/samples_per_s"] is None  # the throughput callback was removed by config
    assert Path(res["checkpoint"]).name == "best.ckpt" and (tmp_path / "checkpoints" / "last.ckpt").exists()


# bench_int8: the final model served with int8 Linears ------------------------------------------------------------

def _rank_auc(labels, scores) -> float:
    """Mann-Whitney AUC with average ranks for ties (written here, not the project's metric)."""
    import numpy as np

    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_bench_int8_serves_the_final_model_with_int8_linears(tmp_path, data_dir):
    """test/int8/* are the int8-served final model's on the test split (recomputed here from the checkpoint, with an
    AUC written in the test); bench/int8_* its latency; the summary says both."""
    import numpy as np

    from lowrank_ctr.pipeline.context import make_datamodule
    from lowrank_ctr.pipeline.summary import human_summary
    from lowrank_ctr.precision import inference, serving_model

    cfg = compose_cfg("train", TINY + ["model.mlp=[16]", "bench=false", "bench_int8=true",
                                       "bench_batch_sizes=[64,512]"], tmp_path, data_dir)
    res = run(cfg)
    model, _ = load_model(res["checkpoint"])
    served = serving_model(model.eval(), "int8")
    logits, labels = [], []
    with inference("int8"):
        for batch in make_datamodule(cfg).test_dataloader():  # the same batches: activations are quantised per batch
            logits.append(served(batch).double())
            labels.append(batch["label"])
    auc = _rank_auc(torch.cat(labels).numpy(), torch.cat(logits).numpy())
    assert res["test/int8/auc"] == pytest.approx(auc, abs=1e-6)
    assert res["test/int8/auc_delta"] == pytest.approx(res["test/int8/auc"] - res["test/auc"], abs=1e-12)
    assert abs(res["test/int8/auc_delta"]) < 0.01 and np.isfinite(res["test/int8/logloss"])
    for size in (64, 512):
        assert res[f"bench/int8_ms@{size}"] > 0 and res[f"bench/int8_speedup@{size}"] > 0
    assert "bench/int8_ms@4096" not in res and "bench/base_ms@64" not in res  # bench=false: no float32 table
    assert "int8 serving (CPU): test AUC" in human_summary(res)
    assert read_results(tmp_path)["test/int8/auc"] == res["test/int8/auc"]


def test_bench_int8_without_a_linear_layer_is_null_not_a_number(tmp_path, data_dir, caplog):
    from lowrank_ctr.pipeline.summary import human_summary

    with caplog.at_level("WARNING"):
        res = run(compose_cfg("train", TINY + ["model=lr", "bench=false", "bench_int8=true"], tmp_path, data_dir))
    assert res["test/auc"] is not None
    assert res["test/int8/auc"] is None and res["test/int8/auc_delta"] is None and res["bench/int8_ms@4096"] is None
    assert "no Linear layer to run in int8" in caplog.text
    assert "int8 serving: not measured" in human_summary(res)


def test_bench_int8_without_a_quantized_engine_stops_before_training(tmp_path, data_dir, monkeypatch):
    import lowrank_ctr.int8_inference as int8_inference
    from lowrank_ctr.config import UserError

    monkeypatch.setattr(int8_inference, "engine_problem", lambda: "this torch has no quantized engine")
    with pytest.raises(UserError, match="bench_int8=true: this torch has no quantized engine"):
        run(compose_cfg("train", TINY + ["model.mlp=[16]", "bench_int8=true"], tmp_path, data_dir))
    assert not (tmp_path / "checkpoints").exists()  # nothing was trained


# How to extend: a new result key (README worked example) ----------------------------------------------------------

def test_extra_metric_calibration_is_a_result_key(tmp_path, data_dir):
    res = run(compose_cfg("train", TINY + ["model.mlp=[16]", "bench=false", "extra_metrics=[calibration]"], tmp_path,
                          data_dir))
    from lowrank_ctr.pipeline.context import make_datamodule

    model, _ = load_model(res["checkpoint"])
    predicted = observed = 0.0
    dm = make_datamodule(compose_cfg("train", TINY, tmp_path, data_dir))
    with torch.no_grad():
        for batch in dm.test_dataloader():
            predicted += torch.sigmoid(model(batch).double()).sum().item()
            observed += batch["label"].double().sum().item()
    assert res["test/calibration"] == pytest.approx(predicted / observed, rel=1e-9)
    assert read_results(tmp_path)["test/calibration"] == res["test/calibration"]


# From scratch (TT-Rec protocol) -----------------------------------------------------------------------------------

def test_from_scratch_trains_the_compressed_structure_like_the_base(tmp_path, data_dir):
    from lowrank_ctr.pipeline.evaluation import evaluate
    from lowrank_ctr.pipeline.context import make_datamodule

    cfg = compose_cfg("train", TINY + ["model.mlp=[16]", "bench=false", "trainer.max_epochs=2", "compression=tt",
                                       "compression.embedding_rank=2", "compression.from_scratch=true",
                                       "early_stopping_patience=null"], tmp_path, data_dir)
    res = run(cfg)
    assert res["compress/from_scratch"] is True and res["compress/method"] == "tt"
    assert res["scratch/train/epochs"] == res["train/epochs"]  # the same epochs as the base
    assert "compress/test/auc_before_finetune" not in res and "compress/finetune_kept" not in res
    assert res["params"] < res["base/params"] and res["checkpoint"] == res["compress/checkpoint"]
    model, hp = load_model(res["checkpoint"])
    assert hp["compression_spec"]["method"] == "tt"
    assert evaluate(model, make_datamodule(cfg).test_dataloader(), "cpu", "test")[0].auc == pytest.approx(res["test/auc"], abs=1e-6)


def test_from_scratch_then_linear_stage_then_fine_tune_and_the_scratch_cache(tmp_path, data_dir):
    """tt_afm from scratch: TT trained from scratch for the base's epochs, then AFM on the Linears of THAT model at
    the whole-model budget, then the usual fine-tune; the final model reloads and reproduces the final AUC.
    compression.scratch_cache: a second run of the same structure reuses that training (no fit) and compresses
    the same trained weights (the same AUC before its fine-tune)."""
    from lowrank_ctr.pipeline.context import make_datamodule
    from lowrank_ctr.pipeline.evaluation import evaluate

    base = run(compose_cfg("train", TINY + ["model.mlp=[32]", "bench=false", "early_stopping_patience=null"],
                           tmp_path / "base", data_dir))
    cache = tmp_path / "scratch_cache"
    overrides = [f"ckpt_path={base['checkpoint']}", "bench=false", "progress_bar=false", "logger=none",
                 "compression=tt_afm", "compression.embedding_rank=2", "compression.from_scratch=true",
                 "compression.target_ratio=3", "compression.finetune_epochs=1", f"compression.scratch_cache={cache}",
                 "trainer.max_epochs=1"]  # the base's epochs: the scratch stage trains for trainer.max_epochs
    cfg = compose_cfg("compress", overrides, tmp_path / "first", data_dir)
    res = run(cfg)
    assert res["compress/method"] == "tt+afm" and res["compress/from_scratch"] is True
    assert res["scratch/train/epochs"] == base["train/epochs"] and res["scratch/cached"] is False
    assert 3.0 <= res["compress/ratio"] <= 3.06 and res["base/bytes"] / res["bytes"] == pytest.approx(
        res["compress/ratio"])
    layers = {l["name"]: l["method"] for l in res["compress/layers"] if l.get("replaced")}
    assert layers["embedding.table"] == "tt" and "afm" in layers.values()
    assert "scratch/test/auc" in res and "compress/test/auc_before_finetune" in res
    assert "compress/finetune_kept" in res and res["checkpoint"] == res["compress/checkpoint"]
    assert res["checkpoint"].endswith("compressed.ckpt")
    model, hp = load_model(res["checkpoint"])
    assert hp["compression_spec"]["method"] == "tt+afm"
    auc = evaluate(model, make_datamodule(cfg).test_dataloader(), "cpu", "test")[0].auc
    assert auc == pytest.approx(res["test/auc"], abs=1e-6)
    assert len(list(cache.glob("scratch-*.json"))) == 1 and len(list(cache.glob("scratch-*.ckpt"))) == 1

    again = run(compose_cfg("compress", overrides, tmp_path / "again", data_dir))
    assert again["scratch/cached"] is True and not (tmp_path / "again" / "scratch" / "last.ckpt").exists()
    assert (tmp_path / "again" / "scratch" / "trained.ckpt").exists()  # its own copy: the run folder stands alone
    assert again["scratch/test/auc"] == res["scratch/test/auc"]
    assert again["compress/test/auc_before_finetune"] == pytest.approx(res["compress/test/auc_before_finetune"],
                                                                       abs=1e-6)


def test_decay_on_plateau_goes_back_to_the_best_point_with_a_lower_rate(tmp_path):
    from lowrank_ctr.lightning.callbacks import DecayOnPlateau

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    best_weights = {k: torch.full_like(v, 7.0) for k, v in model.state_dict().items()}
    best = tmp_path / "best.ckpt"
    torch.save({"state_dict": best_weights, "optimizer_states": [opt.state_dict()]}, best)
    trainer = SimpleNamespace(sanity_checking=False, callback_metrics={}, optimizers=[opt], lr_scheduler_configs=[],
                              checkpoint_callbacks=[SimpleNamespace(monitor="val/auc", best_model_path=str(best))],
                              should_stop=False)
    cb = DecayOnPlateau(factor=0.1, patience=1, max_decays=2)
    seen = []
    for score in [0.60, 0.70, 0.69, 0.71, 0.70, 0.65]:
        with torch.no_grad():
            model.weight.fill_(0.0)
        trainer.callback_metrics = {"val/auc": torch.tensor(score)}
        cb.on_validation_end(trainer, model)
        seen.append((opt.param_groups[0]["lr"], float(model.weight[0, 0]), trainer.should_stop))
    assert seen[0] == (1.0, 0.0, False) and seen[1] == (1.0, 0.0, False)  # improving: nothing changes
    assert seen[2] == (pytest.approx(0.1), 7.0, False)  # plateau: back to the best weights, rate x0.1
    assert seen[3] == (pytest.approx(0.1), 0.0, False)  # improved again at the lower rate
    assert seen[4] == (pytest.approx(0.01), 7.0, False)  # second decay
    assert seen[5][2] is True  # third plateau after max_decays=2: stop
    assert cb.state_dict() == {"best": pytest.approx(0.71), "wait": 0, "decays": 2}
