"""Criteo Kaggle display-advertising TSV: label, I1..I13 (integer counts, may be empty), C1..C26 (hex, may be empty)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow as pa

from lowrank_ctr.data.errors import check_input_file
from lowrank_ctr.data.formats import register
from lowrank_ctr.data.formats.base import Config, DatasetFormat
from lowrank_ctr.data.readers import BadRows, LabelRule, RawColumns, header_names, read_delimited

CRITEO_NUMERIC = [f"I{i}" for i in range(1, 14)]
CRITEO_CATEGORICAL = [f"C{i}" for i in range(1, 27)]
ZERO_ONE = LabelRule(("1",), ("0",), fix="fix the label (this format's labels are 0 or 1)")


def read_criteo_like(path: str | Path, bad_rows: BadRows, raw: RawColumns, block_size: int,
                     label_optional: bool) -> Iterator[pa.Table]:
    """A headerless TSV of label, numerics, categoricals. ``label_optional``: a file whose first line has one column
    fewer is read as unlabeled (Kaggle's test.txt)."""
    features = raw.numeric + raw.categorical
    labeled = not (label_optional and len(header_names(check_input_file(path, "data file"), "\t")) == len(features))
    return read_delimited(path, delimiter="\t", columns=(["label"] if labeled else []) + features,
                          label_col="label" if labeled else None, raw=raw, bad_rows=bad_rows, labels=ZERO_ONE,
                          block_size=block_size)


@register
class Criteo(DatasetFormat):
    name = "criteo"
    description = "Criteo Kaggle TSV (label, I1..I13, C1..C26, no header)"

    def raw_columns(self, cfg: Config) -> RawColumns:
        return RawColumns(categorical=list(CRITEO_CATEGORICAL), numeric=list(CRITEO_NUMERIC))

    def read(self, cfg: Config, path: str | Path, bad_rows: BadRows, *, label_optional: bool = False
             ) -> Iterator[pa.Table]:
        return read_criteo_like(path, bad_rows, self.raw_columns(cfg), int(cfg.get("block_size", 16 << 20)),
                                label_optional)

    def example(self, directory: Path) -> dict:
        rows = []
        for i in range(40):
            nums = ["" if (i + j) % 7 == 0 else str((i * (j + 3)) % 50 - 1) for j in range(13)]
            cats = ["" if (i + j) % 11 == 0 else f"{(i * 31 + j * 17) % 5:08x}" for j in range(26)]
            rows.append("\t".join(["1" if i % 3 == 0 else "0", *nums, *cats]))
        path = directory / "criteo.txt"
        path.write_text("\n".join(rows) + "\n")
        return {"name": "criteo_example", "format": self.name, "train_path": str(path), "min_count": 1,
                "numeric_mode": "bucketize", "split": [1.0, 0.0, 0.0], "out_dir": str(directory / "prepared")}
