"""Any CSV (with header) or parquet file: which column is the label, which values are clicks and which are not, and
which columns are categorical or numeric come from the data config."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow as pa

from lowrank_ctr.data.errors import check_input_file
from lowrank_ctr.data.formats import register
from lowrank_ctr.data.formats.base import Config, DatasetFormat, Key, names, scalars, text
from lowrank_ctr.data.readers import (BadRows, LabelRule, RawColumns, header_names, label_text, parquet_file,
                                      read_delimited, read_parquet)

OTHER = "other"  # data.negative_labels=other: every non-empty value that is not positive means no click
PARQUET_SUFFIXES = (".parquet", ".pq")


def label_rule(cfg: Config) -> LabelRule:
    return LabelRule.of(cfg.get("positive_labels") or [], cfg.get("negative_labels"),
                        fix="list such values in data.positive_labels or data.negative_labels, or set "
                            f"data.negative_labels={OTHER} to count every non-positive value as no click")


@register
class Tabular(DatasetFormat):
    name = "tabular"
    description = "any CSV (header) or parquet file; columns and label values from the data config"
    keys = {
        "label_col": text(required=True, help="data.label_col=COLUMN"),
        "positive_labels": scalars(non_empty=True, required=True, help="data.positive_labels=[1] (click values)"),
        "negative_labels": Key(lambda v: v == OTHER or (isinstance(v, (list, tuple)) and len(v) > 0 and
                                                       all(isinstance(x, (str, int, float, bool)) for x in v)),
                               f"a non-empty list of the values that mean no click, e.g. [0], or '{OTHER}' (every "
                               "other non-empty value)", required=True,
                               help=f"data.negative_labels=[0] (no-click values), or data.negative_labels={OTHER}"),
        "categorical_cols": names(),
        "numeric_cols": names(),
        "delimiter": Key(lambda v: isinstance(v, str) and len(v) == 1, "one character, e.g. ',' or '\\t'"),
    }

    def validate(self, cfg: Config) -> list[str]:
        out = super().validate(cfg)
        if out:
            return out
        cats, nums = list(cfg.get("categorical_cols") or []), list(cfg.get("numeric_cols") or [])
        if not cats and not nums:
            out.append("data=tabular needs data.categorical_cols and/or data.numeric_cols (both are empty)")
        both = sorted(set(cats) & set(nums))
        if both:
            out.append(f"column(s) {both} are in both data.categorical_cols and data.numeric_cols: choose one")
        if cfg["label_col"] in cats + nums:
            out.append(f"data.label_col={cfg['label_col']!r} is also a feature column: a model must not read its "
                       "own label")
        negative = cfg["negative_labels"]
        if negative != OTHER:
            overlap = sorted({label_text(v) for v in cfg["positive_labels"]} & {label_text(v) for v in negative})
            if overlap:
                out.append(f"label value(s) {overlap} are in both data.positive_labels and data.negative_labels")
        return out

    def raw_columns(self, cfg: Config) -> RawColumns:
        return RawColumns(categorical=list(cfg.get("categorical_cols") or []),
                          numeric=list(cfg.get("numeric_cols") or []))

    def read(self, cfg: Config, path: str | Path, bad_rows: BadRows, *, label_optional: bool = False
             ) -> Iterator[pa.Table]:
        """``label_optional``: a file without the label column is read as unlabeled (serving rows)."""
        path = check_input_file(path, "data file")
        raw, label_col, delimiter = self.raw_columns(cfg), cfg["label_col"], cfg.get("delimiter", ",")
        is_parquet = str(path).endswith(PARQUET_SUFFIXES)
        if label_optional:
            columns = parquet_file(path).schema_arrow.names if is_parquet else header_names(path, delimiter)
            label_col = label_col if label_col in columns else None
        if is_parquet:
            return read_parquet(path, label_col, label_rule(cfg), raw, bad_rows)
        return read_delimited(path, delimiter=delimiter, columns=None, label_col=label_col, raw=raw,
                              bad_rows=bad_rows, labels=label_rule(cfg),
                              block_size=int(cfg.get("block_size", 16 << 20)))

    def example(self, directory: Path) -> dict:
        rows = ["y,color,size,unused"] + [f"{['yes', 'no', 'no'][i % 3]},{['red', 'blue', ''][i // 2 % 3]},"
                                          f"{'' if i % 5 == 0 else i * 1.5},x" for i in range(30)]
        path = directory / "tabular.csv"
        path.write_text("\n".join(rows) + "\n")
        return {"name": "tabular_example", "format": self.name, "train_path": str(path), "label_col": "y",
                "positive_labels": ["yes"], "negative_labels": ["no"], "categorical_cols": ["color"],
                "numeric_cols": ["size"], "min_count": 1, "split": [1.0, 0.0, 0.0],
                "out_dir": str(directory / "prepared")}
