"""``lowrank-ctr-train``: prepare data (cached), train, test the best point, optionally compress + fine-tune, write
``results.json`` and print how the run ended. Config in (``conf/train.yaml``), results out; the work is the
pipeline's (``lowrank_ctr.pipeline``)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from lowrank_ctr.config import CONF_DIR
from lowrank_ctr.pipeline.runner import main_job, run  # noqa: F401  (run: the in-process API tests use)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _main(cfg: DictConfig) -> float | None:
    return main_job(cfg)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
