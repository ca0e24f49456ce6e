"""Avazu CTR CSV with header: ``id`` (dropped), ``click`` (the label), ``hour`` = YYMMDDHH, 21 categorical fields."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lowrank_ctr.data.errors import check_input_file
from lowrank_ctr.data.formats import register
from lowrank_ctr.data.formats.base import Config, DatasetFormat
from lowrank_ctr.data.formats.criteo import ZERO_ONE
from lowrank_ctr.data.readers import BadRows, RawColumns, header_names, read_delimited

AVAZU_CATEGORICAL = ["C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id", "app_domain",
                     "app_category", "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
                     "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21"]
HOUR_RULE = "column 'hour' must be YYMMDDHH (a real date, hour 00-23)"


def derive_hour(table: pa.Table) -> tuple[pa.Table, np.ndarray, str, list[str]]:
    """``hour`` = YYMMDDHH -> ``hour_of_day`` and ``weekday`` (the raw hour itself never repeats across days).

    The format defines the range: eight digits, a real calendar date, an hour 00-23; anything else is a bad value
    (in preparation and in prediction alike)."""
    hour = pc.utf8_trim_whitespace(table.column("hour").combine_chunks())
    ok = np.asarray(pc.match_substring_regex(hour, r"^\d{6}([01]\d|2[0-3])$").fill_null(False)
                    .to_numpy(zero_copy_only=False))
    safe = pc.if_else(pa.array(ok), hour, pa.scalar("14102100"))
    ts = pc.strptime(pc.binary_join_element_wise(pa.scalar("20"), pc.utf8_slice_codeunits(safe, 0, 6), ""),
                     format="%Y%m%d", unit="s", error_is_null=True)
    # strptime rolls impossible days over (Feb 30 -> Mar 2): a real date prints back as itself
    same = pc.equal(pc.strftime(ts, format="%y%m%d"), pc.utf8_slice_codeunits(safe, 0, 6))
    ok &= np.asarray(same.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
    weekday = pc.cast(pc.day_of_week(ts), pa.string())
    table = table.append_column("hour_of_day", pc.utf8_slice_codeunits(safe, 6, 8))
    table = table.append_column("weekday", weekday)
    return table, ~ok, HOUR_RULE, ["hour_of_day", "weekday"]


@register
class Avazu(DatasetFormat):
    name = "avazu"
    description = "Avazu CTR CSV with header (id, click, hour=YYMMDDHH, C1, banner_pos, site_*, app_*, device_*, ...)"

    def raw_columns(self, cfg: Config) -> RawColumns:
        return RawColumns(categorical=AVAZU_CATEGORICAL + ["hour_of_day", "weekday"])

    def read(self, cfg: Config, path: str | Path, bad_rows: BadRows, *, label_optional: bool = False
             ) -> Iterator[pa.Table]:
        """``label_optional``: a file whose header has no ``click`` column is read as unlabeled (Kaggle's test)."""
        labeled = not label_optional or "click" in header_names(check_input_file(path, "data file"), ",")
        return read_delimited(path, delimiter=",", columns=None, label_col="click" if labeled else None,
                              raw=self.raw_columns(cfg), bad_rows=bad_rows, labels=ZERO_ONE, derive=derive_hour,
                              block_size=int(cfg.get("block_size", 16 << 20)))

    def example(self, directory: Path) -> dict:
        header = ["id", "click", "hour", *AVAZU_CATEGORICAL]
        rows = [",".join(header)]
        for i in range(30):
            hour = f"1410{21 + i % 9:02d}{(i * 5) % 24:02d}"
            cats = ["" if (i + j) % 13 == 0 else f"v{(i * 7 + j) % 4}" for j in range(len(AVAZU_CATEGORICAL))]
            rows.append(",".join([str(10_000 + i), "1" if i % 4 == 0 else "0", hour, *cats]))
        path = directory / "avazu.csv"
        path.write_text("\n".join(rows) + "\n")
        return {"name": "avazu_example", "format": self.name, "train_path": str(path), "min_count": 1,
                "split": [1.0, 0.0, 0.0], "out_dir": str(directory / "prepared")}
