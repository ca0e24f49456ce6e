"""Run ``lowrank-ctr-train`` / ``lowrank-ctr-compress`` with a callback that stops at a chosen training step and
waits there to be killed, so a resume test kills at exactly that step on any machine (never "finished first").

    python pausing_run.py train|compress FIT EPOCH STEP READY_FILE [overrides...]

FIT: base | finetune | control | scratch (which fit pauses). When the step is reached, READY_FILE is written and
the process waits; SIGKILL ends it there, SIGTERM lets Lightning stop it as it would any run.
"""

import sys
import time
from pathlib import Path

import lightning.pytorch as pl

from lowrank_ctr.pipeline import base, compression, context


class PauseAt(pl.Callback):
    def __init__(self, epoch: int, step: int, ready: Path) -> None:
        self.epoch, self.step, self.ready = epoch, step, ready

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.step:
            self.ready.write_text("paused")
            while not trainer.received_sigterm:
                time.sleep(0.05)


def main() -> None:
    command, fit, epoch, step, ready = sys.argv[1:6]
    original = context.fit_callbacks

    def with_pause(cfg, dirpath, prefix=""):
        callbacks = original(cfg, dirpath, prefix)
        which = "finetune" if prefix == "compressed-" else {"checkpoints": "base"}.get(Path(dirpath).name,
                                                                                       Path(dirpath).name)
        if which == fit:
            callbacks.all.append(PauseAt(int(epoch), int(step), Path(ready)))
        return callbacks

    for module in (context, base, compression):
        module.fit_callbacks = with_pause
    sys.argv = [f"lowrank-ctr-{command}", *sys.argv[6:]]
    if command == "train":
        from lowrank_ctr.train import main as entry
    else:
        from lowrank_ctr.compress import main as entry
    entry()


if __name__ == "__main__":
    main()
