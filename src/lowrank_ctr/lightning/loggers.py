"""Logger classes the configs in ``conf/logger/`` instantiate where Lightning's own need a small fix."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger


class WandbLogger(_LightningWandbLogger):
    """Lightning's W&B logger, without the ``anonymous=None`` it always passes to ``wandb.init``.

    wandb (>= 0.19) prints "The anonymous setting has no effect and will be removed" whenever the setting is
    passed at all, so every run warned about a setting nobody set. ``anonymous=True`` is still passed through.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
