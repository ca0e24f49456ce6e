"""Criteo-shaped synthetic data from a hidden low-rank teacher (``data/synthetic.py``): no raw files, generated
deterministically from the data config; ``lowrank-ctr-predict`` reads its rows as Criteo TSV holding the
generator's integer category ids (``lowrank-ctr-prepare data=synthetic raw_out=FILE`` writes them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from lowrank_ctr.data.formats import register
from lowrank_ctr.data.formats.base import Config, DatasetFormat, integer, number
from lowrank_ctr.data.formats.criteo import read_criteo_like
from lowrank_ctr.data.readers import BadRows, RawColumns
from lowrank_ctr.data.synthetic import SyntheticCriteo

TEACHER_AUC_ROWS = 200_000


def generator(cfg: Config) -> SyntheticCriteo:
    """The generator a data config describes (its keys that name generator settings; the rest keep defaults)."""
    fields = SyntheticCriteo.__dataclass_fields__
    return SyntheticCriteo(**{k: cfg[k] for k in fields if k in cfg and cfg[k] is not None})


@register
class Synthetic(DatasetFormat):
    name = "synthetic"
    description = "Criteo-shaped rows generated from a hidden low-rank teacher model (no raw files)"
    reads_files = False
    keys = {
        "rows": integer(1),
        "n_numeric": integer(0),
        "n_categorical": integer(1),
        "min_vocab": integer(2),
        "max_vocab": integer(2),
        "zipf_min": number(0.0, open_low=True),
        "zipf_max": number(0.0, open_low=True),
        "teacher_rank": integer(1),
        "teacher_dim": integer(1),
        "positive_rate": number(0.0, 1.0, open_low=True, open_high=True),
        "first_order_scale": number(0.0),
        "interaction_scale": number(0.0),
        "numeric_scale": number(0.0),
        "noise": number(0.0),
    }

    def validate(self, cfg: Config) -> list[str]:
        out = super().validate(cfg)
        if not out and int(cfg.get("min_vocab", 10)) > int(cfg.get("max_vocab", 1_000_000)):
            out.append(f"data.min_vocab={cfg.get('min_vocab')} is more than data.max_vocab={cfg.get('max_vocab')}")
        return out

    def input_paths(self, cfg: Config) -> list[str]:
        return []

    def raw_columns(self, cfg: Config) -> RawColumns:
        return RawColumns(categorical=[f"C{i}" for i in range(1, int(cfg.get("n_categorical", 26)) + 1)],
                          numeric=[f"I{i}" for i in range(1, int(cfg.get("n_numeric", 13)) + 1)])

    def read(self, cfg: Config, path: str | Path, bad_rows: BadRows, *, label_optional: bool = False
             ) -> Iterator[pa.Table]:
        return read_criteo_like(path, bad_rows, self.raw_columns(cfg), int(cfg.get("block_size", 16 << 20)),
                                label_optional)

    def generate(self, cfg: Config) -> Iterator[pa.Table]:
        return generator(cfg).tables()

    def write_raw(self, cfg: Config, path: Path, select: Callable[[int], np.ndarray] | None, label: bool) -> int:
        rows = 0

        def counted(n: int) -> np.ndarray:
            nonlocal rows
            keep = np.ones(n, dtype=bool) if select is None else select(n)
            rows += int(keep.sum())
            return keep

        generator(cfg).write_criteo_tsv(path, raw_ids=True, label=label, select=counted)
        return rows

    def summary_extra(self, cfg: Config, rows: dict[str, int]) -> dict[str, Any]:
        return {"teacher_auc": generator(cfg).teacher_auc(min(sum(rows.values()), TEACHER_AUC_ROWS))}

    def example(self, directory: Path) -> dict:
        return {"name": "synthetic_example", "format": self.name, "rows": 300, "max_vocab": 40, "seed": 5,
                "min_count": 1, "split": [1.0, 0.0, 0.0], "out_dir": str(directory / "prepared")}
