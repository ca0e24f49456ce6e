"""``lowrank-ctr-prepare``: encode a raw dataset into parquet shards + schema.json + summary.json."""

from __future__ import annotations

import json
import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from lowrank_ctr.config import CONF_DIR, user_errors
from lowrank_ctr.data.prepare import prepare

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="prepare")
def _main(cfg: DictConfig) -> None:
    with user_errors():
        data = OmegaConf.to_container(cfg.data, resolve=True)
        result = prepare(data, force=bool(cfg.get("force", False)), progress=bool(cfg.get("progress", True)))
    s = result.summary
    state = "reused" if result.reused else f"prepared in {s['seconds']:.1f}s"
    print(f"{s['name']}: {state} -> {result.path}")
    print(json.dumps({"rows": s["rows"], "bad_rows_skipped": s["bad_rows_skipped"],
                      "fields": len(result.schema.fields)}, indent=None))


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
