"""What a user sees in the terminal: progress outside a TTY, a compact bar on one, no noise they cannot act on."""

from __future__ import annotations

import io
import math
import logging
import re
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from helpers import TINY, run_cli
from lowrank_ctr.lightning.progress import CompactRichProgressBar, LineProgress, progress_bar

#: messages issue 13 lists as noise: none may reach a user's terminal
NOISE = ["Tip:", "litlogger", "LeafSpec", "exists and is not empty", "weights_only", "anonymous", "TracerWarning",
         "DeprecationWarning", "FutureWarning"]
PROGRESS_LINE = re.compile(r"^epoch (\d)/2 \| step (\d+)/(\d+) \((\d+)%\) \| [\d,]+ samples/s \| loss \d\.\d{4}"
                           r"( \| epoch ETA \d:\d\d:\d\d)?$")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, object]:
    """A 2-epoch compressed run with every logger, its stdout a pipe (not a terminal), as in CI or a log file."""
    tmp = tmp_path_factory.mktemp("console")
    run_dir = tmp / "run"
    overrides = [o for o in TINY if not o.startswith(("progress_bar", "logger", "trainer.max_epochs"))]
    r = run_cli(["lowrank-ctr-train", *overrides, "model.mlp=[16,16]", "trainer.max_epochs=2", "logger=many",
                 "compression=afm", "compression.target_ratio=null", "compression.targets=[embedding,mlp]",
                 "compression.embedding_rank=2", "compression.mlp_rank=4", "bench=false",
                 f"paths.data_dir={tmp / 'cache'}", f"hydra.run.dir={run_dir}"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir, r


def test_progress_lines_when_stdout_is_not_a_terminal(tiny_run):
    _, r = tiny_run
    lines = [m for m in map(PROGRESS_LINE.match, r.stdout.splitlines()) if m]
    assert {m.group(1) for m in lines} == {"1", "2"}, r.stdout[-3000:]
    last = lines[-1]
    assert last.group(2) == last.group(3) and last.group(4) == "100" and last.group(5) is None  # no ETA at the end
    assert any(m.group(5) for m in lines)  # an ETA while the epoch runs
    assert re.search(r"^epoch 2/2 done in \d:\d\d:\d\d$", r.stdout, re.M)  # validation is mid-epoch here
    assert re.search(r"^epoch 2/2 step \d+/\d+ validation \(\d:\d\d:\d\d in epoch\) \| val/auc \d\.\d{4} \| "
                     r"val/logloss \d\.\d{4}$", r.stdout, re.M)
    assert "━" not in r.stdout and "v_num" not in r.stdout  # no rich bar frames in a log file


def test_a_run_shows_no_dependency_noise_but_keeps_real_warnings(tiny_run):
    _, r = tiny_run
    for noise in NOISE:
        assert noise not in r.stderr, f"{noise!r} in stderr:\n{r.stderr[-3000:]}"
    # a real warning about the user's own settings still shows (16 batches < log_every_n_steps=20)
    assert "smaller than the logging interval" in r.stderr


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_has_no_tracer_warnings(tiny_run, fmt):
    run_dir, _ = tiny_run
    r = run_cli(["lowrank-ctr-export", f"ckpt_path={run_dir / 'checkpoints' / 'compressed.ckpt'}", f"format={fmt}",
                 f"out={run_dir / 'export' / fmt}"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "max abs diff" in r.stdout
    for noise in NOISE:
        assert noise not in r.stderr, f"{noise!r} in stderr:\n{r.stderr[-3000:]}"


# ----------------------------------------------------------------------------------------------- in-process

class _Toy(pl.LightningModule):
    """The smallest module that logs what CTRModule logs: the loss (read by the bars themselves) and val/auc."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.mse_loss(self.layer(batch["x"]).squeeze(-1), batch["label"])
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(batch["label"]))
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/auc", 0.5 + 0.01 * self.current_epoch, prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader(rows: int = 40, batch: int = 10) -> DataLoader:
    data = [{"x": torch.randn(3), "label": torch.rand(())} for _ in range(rows)]
    return DataLoader(data, batch_size=batch)


def _fit(bar: pl.callbacks.ProgressBar, epochs: int = 2) -> pl.Trainer:
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[bar], logger=False, enable_checkpointing=False,
                         enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0,
                         log_every_n_steps=1)
    trainer.fit(_Toy(), _loader(), _loader(20))
    return trainer


def test_line_progress_every_n_steps():
    out = io.StringIO()
    _fit(LineProgress(every_n_steps=2, every_s=3600, stream=out))
    lines = out.getvalue().splitlines()
    steps = [line.split(" | ")[:2] for line in lines if " | step " in line]
    assert steps == [["epoch 1/2", "step 2/4 (50%)"], ["epoch 1/2", "step 4/4 (100%)"],
                     ["epoch 2/2", "step 2/4 (50%)"], ["epoch 2/2", "step 4/4 (100%)"]]
    assert "epoch ETA" in lines[0] and "loss " in lines[0]
    done = [line for line in lines if " done in " in line]
    assert len(done) == 2 and done[0].startswith("epoch 1/2") and "val/auc 0.5000" in done[0]


def test_line_progress_every_seconds_prints_every_step_when_each_is_slow():
    out = io.StringIO()
    _fit(LineProgress(every_n_steps=1000, every_s=1e-9, stream=out), epochs=1)
    assert sum(" | step " in line for line in out.getvalue().splitlines()) == 4


def test_bad_progress_settings_name_the_setting():
    with pytest.raises(ValueError, match="every_n_steps=0"):
        LineProgress(every_n_steps=0)
    with pytest.raises(ValueError, match="every_s=0"):
        LineProgress(every_s=0)


def test_progress_bar_follows_the_terminal():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(progress_bar(stream=io.StringIO()), LineProgress)
    assert isinstance(progress_bar(stream=Tty()), CompactRichProgressBar)


def test_compact_bar_counts_epochs_from_one_and_drops_v_num():
    bar = CompactRichProgressBar(console_kwargs={"file": io.StringIO(), "width": 80, "force_terminal": True})
    trainer = _fit(bar)
    assert bar._get_train_description(trainer.current_epoch - 1).strip() == "Epoch 2/2"
    metrics = bar.get_metrics(trainer, trainer.lightning_module)
    assert set(metrics) == {"loss", "val/auc"} and metrics["val/auc"] == pytest.approx(0.51)


def test_compact_bar_reads_training_metrics_at_most_every_interval():
    """Reading the loss waits for a GPU: the bar reads it at most every METRICS_EVERY_S during training (and at the
    last step of an epoch), not at every step as Lightning's does; after validation always."""
    reads = {}
    for interval in (0.0, math.inf):
        class Counting(CompactRichProgressBar):
            METRICS_EVERY_S = interval

            def get_metrics(self, trainer, pl_module):
                reads[interval] = reads.get(interval, 0) + 1
                return super().get_metrics(trainer, pl_module)

        _fit(Counting(console_kwargs={"file": io.StringIO(), "width": 80, "force_terminal": True}))
    # 2 epochs of 4 steps: every step read, against only the first step of the run and each epoch's last
    assert reads[0.0] - reads[math.inf] == 2 * 4 - 3, reads


def test_compact_bar_fits_80_columns_at_its_widest():
    """Rendered at 80 columns, a big run's bar (epoch 10/10, 5-digit steps, both times, metrics) is one line."""
    from lightning.pytorch.callbacks.progress.rich_progress import MetricsTextColumn
    from rich.console import Console
    from rich.progress import Progress, TextColumn

    bar = CompactRichProgressBar()
    trainer = pl.Trainer(max_epochs=10, logger=False, enable_checkpointing=False, callbacks=[bar])
    bar._trainer = trainer  # what Lightning's setup() sets
    # the metrics text exactly as Lightning's MetricsTextColumn writes it from our get_metrics()
    column = MetricsTextColumn(trainer, bar.theme.metrics, bar.theme.metrics_text_delimiter, bar.theme.metrics_format)
    column.update({"loss": 0.123456, "val/auc": 0.789012})
    metrics_text = bar.theme.metrics_text_delimiter.join(column._generate_metrics_texts())
    console = Console(width=80, file=io.StringIO(), record=True, force_terminal=True, color_system=None)
    progress = Progress(*bar.configure_columns(trainer), TextColumn(metrics_text), console=console,
                        auto_refresh=False)
    task = progress.add_task(bar._get_train_description(9), total=10986, completed=10985)
    progress.tasks[task].finished_time = None
    console.print(progress.make_tasks_table(progress.tasks))
    lines = [line.rstrip() for line in console.export_text().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("Epoch 10/10") and "10985/10986" in lines[0] and "val/auc: 0.789" in lines[0]
    assert len(lines[0]) <= 80


# ----------------------------------------------------------------------------------------------- filters

def test_quiet_filters_drop_only_the_listed_messages(caplog):
    from lowrank_ctr import quiet


    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        logger.info("💡 Tip: For seamless cloud logging ... litlogger")
        logger.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]

    msg = "Converting a tensor to a Python boolean might cause the trace to be incorrect."
    with warnings.catch_warnings(record=True) as seen:
        quiet.install()  # pytest restores the warning filters of the import around each test
        warnings.warn_explicit(msg, torch.jit.TracerWarning, "modules.py", 29, module="lowrank_ctr.compression.modules")
        warnings.warn_explicit(msg, torch.jit.TracerWarning, "other.py", 3, module="somebody.elses.model")
        warnings.warn_explicit("Checkpoint directory /x/checkpoints exists and is not empty.", UserWarning, "m.py",
                               1, module="lightning.pytorch.callbacks.model_checkpoint")
        warnings.warn_explicit("a real warning", UserWarning, "m.py", 2, module="lightning.pytorch.trainer")
    assert [(str(w.message)[:20], w.filename) for w in seen] == [(msg[:20], "other.py"), ("a real warning", "m.py")]


def test_wandb_logger_does_not_pass_the_setting_wandb_warns_about(tmp_path):
    from lowrank_ctr.lightning.loggers import WandbLogger

    assert "anonymous" not in WandbLogger(save_dir=str(tmp_path), offline=True)._wandb_init
    assert WandbLogger(save_dir=str(tmp_path), offline=True, anonymous=True)._wandb_init["anonymous"] == "allow"
