"""``lowrank-ctr-compress``: compress a trained checkpoint, fine-tune, test, benchmark -> ``results.json``.

The same pipeline as ``lowrank-ctr-train`` with a base stage that loads ``ckpt_path`` (``conf/compress.yaml``).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lowrank_ctr.config import CONF_DIR
from lowrank_ctr.pipeline.runner import main_job, run  # noqa: F401


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="compress")
def _main(cfg: DictConfig) -> float | None:
    return main_job(cfg)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
