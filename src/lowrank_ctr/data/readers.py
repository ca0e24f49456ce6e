"""Raw-format readers: each streams a raw file as pyarrow tables in one standard shape.

Every chunk a reader yields has the columns ``label`` (int8, 0/1), then the raw feature columns named in
``RawColumns``: categorical columns as strings (null = missing) or non-null integers, numeric columns as
float64 (null = missing), multi-hot columns as list<string>. Preparation (prepare.py) only sees this shape,
so adding a format means writing one reader, nothing else.

Readers never hold a whole file: delimited text goes through pyarrow's streaming CSV reader in blocks.
Malformed rows (wrong column count, non-numeric value in a numeric column, bad label) either stop with the
file and line number, or are skipped and counted (``on_bad_rows: skip``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from lowrank_ctr.data.errors import BadRowError, DataError, check_input_file

NUMBER_RE = r"^\s*[-+]?((\d+\.?\d*)|(\.\d+))([eE][-+]?\d+)?\s*$|^\s*[-+]?(nan|NaN|NAN|inf|Inf|INF|infinity|Infinity)\s*$"


@dataclass
class RawColumns:
    """Which raw columns a reader yields, by kind (label excluded)."""

    categorical: list[str] = field(default_factory=list)
    numeric: list[str] = field(default_factory=list)
    multihot: list[str] = field(default_factory=list)


class BadRows:
    """Policy for malformed rows: ``error`` stops at the first one, ``skip`` drops and counts them."""

    def __init__(self, policy: str = "error") -> None:
        if policy not in ("error", "skip"):
            raise DataError(f"data.on_bad_rows={policy!r} is not valid: use 'error' or 'skip'")
        self.policy = policy
        self.skipped = 0
        self.examples: list[str] = []

    def found(self, path: str | Path, line: int | None, problem: str, count: int = 1) -> None:
        if self.policy == "error":
            raise BadRowError(path, line, problem)
        self.skipped += count
        if len(self.examples) < 5:
            self.examples.append(f"{path}:{line}: {problem}" if line is not None else f"{path}: {problem}")


def _to_float(col: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, np.ndarray | None]:
    """Strings -> float64 (non-finite -> null); returns (values, mask of unparseable rows or None)."""
    col = pa.concat_arrays(col.chunks) if isinstance(col, pa.ChunkedArray) else col
    col = pc.utf8_trim_whitespace(col) if pa.types.is_string(col.type) else col
    bad = None
    try:
        values = pc.cast(col, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        ok = pc.or_kleene(pc.is_null(col), pc.match_substring_regex(col, NUMBER_RE))
        ok = pc.or_kleene(ok, pc.equal(col, ""))
        bad = ~np.asarray(ok.fill_null(True).to_numpy(zero_copy_only=False), dtype=bool)
        col = pc.if_else(pa.array(bad), pa.scalar(None, col.type), col)
        col = pc.if_else(pc.equal(col, ""), pa.scalar(None, col.type), col)
        values = pc.cast(col, pa.float64())
    finite = pc.is_finite(values)
    values = pc.if_else(finite, values, pa.scalar(None, pa.float64()))
    return values, bad


def _label(col: pa.Array, positive: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """Label column -> (int8 0/1 labels, mask of rows whose label is invalid)."""
    s = pc.utf8_trim_whitespace(pc.cast(col, pa.string()))
    if positive is not None:
        pos = np.asarray(pc.is_in(s, value_set=pa.array([str(p) for p in positive])).fill_null(False).to_numpy(
            zero_copy_only=False), dtype=bool)
        bad = np.asarray(pc.is_null(s).to_numpy(zero_copy_only=False), dtype=bool)
        return pos.astype(np.int8), bad
    arr = np.asarray(s.fill_null("").to_numpy(zero_copy_only=False))
    is1, is0 = arr == "1", arr == "0"
    return is1.astype(np.int8), ~(is1 | is0)


def read_delimited(
    path: str | Path,
    *,
    delimiter: str,
    columns: Sequence[str] | None,
    label_col: str,
    raw: RawColumns,
    bad_rows: BadRows,
    positive_labels: Sequence[str] | None = None,
    derive: Callable[[pa.Table], pa.Table] | None = None,
    block_size: int = 16 << 20,
) -> Iterator[pa.Table]:
    """Stream a delimited text file as standard chunks.

    ``columns`` gives the column names of a headerless file; ``None`` reads them from the header line.
    ``derive`` turns the raw string table into extra columns (e.g. Avazu's hour -> hour-of-day, weekday).
    """
    path = check_input_file(path, "data file")
    header = columns is None
    if header:
        with open(path, "r", encoding="utf-8", errors="replace") as fh:
            names = fh.readline().rstrip("\r\n").split(delimiter)
    else:
        names = list(columns)
    needed = [label_col] + [c for c in raw.categorical + raw.numeric if derive is None or c in names]
    missing = [c for c in dict.fromkeys(needed) if c not in names]
    if missing:
        raise DataError(f"{path}: column(s) {missing} not found; the file has columns {names}. "
                        "Check the column names in the data config.")

    pending: list[tuple[int | None, str]] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        pending.append((row.number, f"expected {row.expected_columns} columns, got {row.actual_columns}"))
        return "skip"

    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=names, skip_rows=1 if header else 0, block_size=block_size,
                                       use_threads=False),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid, quote_char=False),
        convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=True,
                                             include_columns=list(dict.fromkeys(needed + (raw.multihot or [])))
                                             if derive is None else None),
    )
    lines_done = 1 if header else 0  # lines of the file consumed before the current batch
    for batch in reader:
        for line, problem in pending:
            bad_rows.found(path, line, problem)
        lines_done += len(pending)
        pending.clear()
        if batch.num_rows == 0:
            continue
        table = pa.Table.from_batches([batch])
        first_line = lines_done + 1
        lines_done += batch.num_rows
        yield _standardise(table, path, first_line, label_col, raw, bad_rows, positive_labels, derive)
    for line, problem in pending:
        bad_rows.found(path, line, problem)


def _standardise(table: pa.Table, path: Path, first_line: int, label_col: str, raw: RawColumns, bad_rows: BadRows,
                 positive_labels: Sequence[str] | None, derive: Callable[[pa.Table], pa.Table] | None) -> pa.Table:
    n = table.num_rows
    bad = np.zeros(n, dtype=bool)
    labels, bad_label = _label(table.column(label_col), positive_labels)
    problems = [(bad_label, f"label column {label_col!r} must be 0 or 1" if positive_labels is None
                 else f"label column {label_col!r} is empty")]
    if derive is not None:
        table, bad_derived, why = derive(table)
        problems.append((bad_derived, why))
    out: dict[str, pa.Array] = {"label": pa.array(labels, pa.int8())}
    for name in raw.numeric:
        values, bad_num = _to_float(table.column(name))
        out[name] = values
        if bad_num is not None:
            problems.append((bad_num, f"column {name!r} is numeric but holds a non-numeric value"))
    for name in raw.categorical:
        col = table.column(name)
        out[name] = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    for name in raw.multihot:
        col = table.column(name)
        out[name] = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    for mask, problem in problems:
        if mask is not None and mask.any():
            # error policy raises here; skip policy records an example (the count is added below, once per row)
            bad_rows.found(path, first_line + int(np.flatnonzero(mask)[0]), problem, count=0)
            bad |= mask
    if bad.any():
        bad_rows.skipped += int(bad.sum())
        keep = pa.array(~bad)
        return pa.table({k: pc.filter(v, keep) for k, v in out.items()})
    return pa.table(out)


# Formats ---------------------------------------------------------------------------------------------------

CRITEO_NUMERIC = [f"I{i}" for i in range(1, 14)]
CRITEO_CATEGORICAL = [f"C{i}" for i in range(1, 27)]


def criteo_reader(path: str | Path, bad_rows: BadRows, block_size: int = 16 << 20) -> tuple[RawColumns, Iterator]:
    """Criteo Kaggle display-advertising TSV: label, I1..I13 (integers, may be empty), C1..C26 (hex, may be empty)."""
    raw = RawColumns(categorical=list(CRITEO_CATEGORICAL), numeric=list(CRITEO_NUMERIC))
    return raw, read_delimited(path, delimiter="\t", columns=["label"] + CRITEO_NUMERIC + CRITEO_CATEGORICAL,
                               label_col="label", raw=raw, bad_rows=bad_rows, block_size=block_size)


AVAZU_CATEGORICAL = ["C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id", "app_domain",
                     "app_category", "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
                     "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21"]


def _avazu_derive(table: pa.Table) -> tuple[pa.Table, np.ndarray, str]:
    """``hour`` = YYMMDDHH -> ``hour_of_day`` and ``weekday`` (the raw hour itself never repeats across days)."""
    hour = pc.utf8_trim_whitespace(table.column("hour").combine_chunks())
    ok = np.asarray(pc.match_substring_regex(hour, r"^\d{8}$").fill_null(False).to_numpy(zero_copy_only=False))
    safe = pc.if_else(pa.array(ok), hour, pa.scalar("14102100"))
    ts = pc.strptime(pc.binary_join_element_wise(pa.scalar("20"), pc.utf8_slice_codeunits(safe, 0, 6), ""),
                     format="%Y%m%d", unit="s", error_is_null=True)
    ok &= np.asarray(pc.is_valid(ts).to_numpy(zero_copy_only=False))
    weekday = pc.cast(pc.day_of_week(ts), pa.string())
    table = table.append_column("hour_of_day", pc.utf8_slice_codeunits(safe, 6, 8))
    table = table.append_column("weekday", weekday)
    return table, ~ok, "column 'hour' must be YYMMDDHH"


def avazu_reader(path: str | Path, bad_rows: BadRows, block_size: int = 16 << 20) -> tuple[RawColumns, Iterator]:
    """Avazu CTR CSV with header: drops ``id``, label ``click``, derives hour-of-day and weekday from ``hour``."""
    raw = RawColumns(categorical=AVAZU_CATEGORICAL + ["hour_of_day", "weekday"])
    return raw, read_delimited(path, delimiter=",", columns=None, label_col="click", raw=raw, bad_rows=bad_rows,
                               derive=_avazu_derive, block_size=block_size)


def tabular_reader(path: str | Path, bad_rows: BadRows, *, label_col: str, positive_labels: Sequence,
                   categorical_cols: Sequence[str], numeric_cols: Sequence[str], delimiter: str = ",",
                   block_size: int = 16 << 20) -> tuple[RawColumns, Iterator]:
    """Any CSV (with header) or parquet file: columns and label meaning come from the data config."""
    raw = RawColumns(categorical=list(categorical_cols), numeric=list(numeric_cols))
    if not raw.categorical and not raw.numeric:
        raise DataError("data=tabular needs data.categorical_cols and/or data.numeric_cols (both are empty)")
    positive = [str(p) for p in positive_labels]
    if not positive:
        raise DataError("data.positive_labels is empty: list the label values that count as a click, e.g. [1]")
    if str(path).endswith((".parquet", ".pq")):
        return raw, _read_parquet(check_input_file(path, "data file"), label_col, positive, raw, bad_rows)
    return raw, read_delimited(path, delimiter=delimiter, columns=None, label_col=label_col, raw=raw,
                               bad_rows=bad_rows, positive_labels=positive, block_size=block_size)


def _read_parquet(path: Path, label_col: str, positive: list[str], raw: RawColumns, bad_rows: BadRows,
                  batch_rows: int = 1 << 18) -> Iterator[pa.Table]:
    try:
        pf = pq.ParquetFile(path)
    except pa.ArrowInvalid as exc:
        raise DataError(f"{path} is not a readable parquet file ({exc}); convert it or check the path") from None
    names = pf.schema_arrow.names
    missing = [c for c in [label_col] + raw.categorical + raw.numeric if c not in names]
    if missing:
        raise DataError(f"{path}: column(s) {missing} not found; the file has columns {names}. "
                        "Check data.label_col / data.categorical_cols / data.numeric_cols.")
    line = 1
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[label_col] + raw.categorical + raw.numeric):
        table = pa.Table.from_batches([batch])
        str_table = pa.table({c: pc.cast(table.column(c), pa.string()) if c in raw.categorical + [label_col]
                              else table.column(c) for c in table.column_names})
        yield _standardise(str_table, path, line, label_col, raw, bad_rows, positive, None)
        line += batch.num_rows


MOVIELENS_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                    "War", "Western"]


def movielens_reader(path: str | Path, bad_rows: BadRows, *, users_path: str | Path | None = None,
                     items_path: str | Path | None = None, positive_rating: int = 4,
                     batch_rows: int = 1 << 18) -> tuple[RawColumns, Iterator]:
    """MovieLens ratings joined with users and items; label = rating >= ``positive_rating``.

    Ratings stream in batches; the user and item tables are small and joined per batch.
    """
    ratings = check_input_file(path, "ratings file")
    users = check_input_file(users_path or ratings.with_name("users.parquet"), "users file")
    items = check_input_file(items_path or ratings.with_name("items.parquet"), "items file")
    raw = RawColumns(categorical=["user", "item", "age", "gender", "occupation", "zip_prefix", "hour", "weekday"],
                     multihot=["genres"])

    def chunks() -> Iterator[pa.Table]:
        u = pq.read_table(users).to_pandas().set_index("user_id")
        it = pq.read_table(items).to_pandas().set_index("movie_id")
        genre_cols = [g for g in MOVIELENS_GENRES if g in it.columns]
        flags = it[genre_cols].to_numpy(dtype=bool)
        genre_lists = pd.Series([[g for g, f in zip(genre_cols, row) if f] for row in flags], index=it.index,
                                dtype=object)
        pf = pq.ParquetFile(ratings)
        need = ["user_id", "movie_id", "rating", "timestamp"]
        missing = [c for c in need if c not in pf.schema_arrow.names]
        if missing:
            raise DataError(f"{ratings}: column(s) {missing} not found (has {pf.schema_arrow.names}); "
                            "a MovieLens ratings file needs user_id, movie_id, rating, timestamp")
        line = 1
        for batch in pf.iter_batches(batch_size=batch_rows, columns=need):
            df = batch.to_pandas()
            unknown = ~df["user_id"].isin(u.index) | ~df["movie_id"].isin(it.index) | df["rating"].isna()
            for i in np.flatnonzero(unknown.to_numpy())[:1]:
                bad_rows.found(ratings, line + int(i), "rating refers to a user or item missing from the "
                               "users/items tables (or has no rating)", count=0)
            bad_rows.skipped += int(unknown.sum())
            df = df[~unknown.to_numpy()]
            line += batch.num_rows
            ts = df["timestamp"].astype("int64").to_numpy().astype("datetime64[s]")
            user = u.loc[df["user_id"].to_numpy()]
            yield pa.table({
                "label": pa.array((df["rating"].to_numpy() >= positive_rating).astype(np.int8)),
                "user": pa.array(df["user_id"].astype(str).to_numpy()),
                "item": pa.array(df["movie_id"].astype(str).to_numpy()),
                "age": pa.array(user["age"].astype(str).to_numpy()),
                "gender": pa.array(user["gender"].astype(str).to_numpy()),
                "occupation": pa.array(user["occupation"].astype(str).to_numpy()),
                "zip_prefix": pa.array(user["zip_code"].astype(str).str[:2].to_numpy()),
                "hour": pa.array((ts.astype("datetime64[h]").astype(np.int64) % 24).astype(str)),
                "weekday": pa.array(((ts.astype("datetime64[D]").astype(np.int64) + 3) % 7).astype(str)),
                "genres": pa.array(genre_lists.loc[df["movie_id"].to_numpy()].tolist(), pa.list_(pa.string())),
            })

    return raw, chunks()

