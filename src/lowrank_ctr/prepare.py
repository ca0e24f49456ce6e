"""``lowrank-ctr-prepare``: encode a raw dataset into parquet shards + schema.json + summary.json.

With ``raw_out=FILE`` it writes the rows of a generated dataset (``data=synthetic``) as the raw file
``lowrank-ctr-predict`` reads instead, e.g. the test split a model was evaluated on (``split=test``).
"""

from __future__ import annotations

import json
import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from lowrank_ctr.config import CONF_DIR, user_errors
from lowrank_ctr.data.prepare import prepare, write_raw_rows

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="prepare")
def _main(cfg: DictConfig) -> None:
    raw_out = cfg.get("raw_out")
    where = f"raw_out={raw_out}" if raw_out else f"data.out_dir={OmegaConf.select(cfg, 'data.out_dir')}"
    with user_errors(where=where):
        data = OmegaConf.to_container(cfg.data, resolve=True)
        if raw_out:
            split = cfg.get("split")
            rows = write_raw_rows(data, raw_out, split, label=bool(cfg.get("raw_label", True)),
                                  overwrite=bool(cfg.get("overwrite", False)))
            print(f"{data['name']}: wrote {rows:,} raw rows ({split or 'all'} split) -> {raw_out}")
            return
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
