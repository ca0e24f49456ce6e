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
    """Policy for malformed rows.

    ``error`` stops at the first one; ``skip`` drops and counts them (preparation); ``missing`` keeps every row
    and treats a value that cannot be parsed as missing (prediction, which owes one output per input row). Rows
    that cannot be split into the right columns are never guessed at: under ``missing`` they stop with an error.
    """

    POLICIES = ("error", "skip", "missing")

    def __init__(self, policy: str = "error") -> None:
        if policy not in self.POLICIES:
            raise DataError(f"on_bad_rows={policy!r} is not valid: use one of {list(self.POLICIES)}")
        self.policy = policy
        self.skipped = 0
        self.repaired = 0
        self.examples: list[str] = []

    def found(self, path: str | Path, line: int | None, problem: str, count: int = 1) -> None:
        """A row that cannot be used at all (wrong column count, unknown user, ...)."""
        if self.policy != "skip":
            raise BadRowError(path, line, problem, repairable=False)
        self.skipped += count
        self._example(path, line, problem)

    def found_values(self, path: str | Path, line: int, problem: str) -> None:
        """Rows with values that cannot be parsed (``line`` is the first): raise, or leave the count to the caller."""
        if self.policy == "error":
            raise BadRowError(path, line, problem, repairable=True)
        self._example(path, line, problem)

    def _example(self, path: str | Path, line: int | None, problem: str) -> None:
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
    label_col: str | None,
    raw: RawColumns,
    bad_rows: BadRows,
    positive_labels: Sequence[str] | None = None,
    derive: Callable[[pa.Table], pa.Table] | None = None,
    block_size: int = 16 << 20,
) -> Iterator[pa.Table]:
    """Stream a delimited text file as standard chunks.

    ``columns`` gives the column names of a headerless file; ``None`` reads them from the header line.
    ``label_col=None`` reads a file without labels (serving rows): the ``label`` column then has the null type.
    ``derive`` turns the raw string table into extra columns (e.g. Avazu's hour -> hour-of-day, weekday).
    """
    path = check_input_file(path, "data file")
    header = columns is None
    names = header_names(path, delimiter) if header else list(columns)
    needed = ([label_col] if label_col else []) + [c for c in raw.categorical + raw.numeric
                                                   if derive is None or c in names]
    missing = [c for c in dict.fromkeys(needed) if c not in names]
    if missing:
        raise DataError(f"{path}: column(s) {missing} not found; the file has columns {names}. "
                        "Check the column names in the data config.")

    offset = 1 if header else 0
    invalid: list[int] = []  # physical line numbers of rows the parser rejected, not yet passed
    rejected: list[tuple[int | None, str]] = []  # not yet reported (an exception cannot leave the parser's hook)

    def on_invalid(row: pacsv.InvalidRow) -> str:
        line = None if row.number is None else row.number + offset
        rejected.append((line, f"expected {row.expected_columns} columns, got {row.actual_columns}"))
        if line is not None:
            invalid.append(line)
        return "skip"

    def report_rejected() -> None:
        for line, problem in rejected:
            bad_rows.found(path, line, problem)
        rejected.clear()

    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=names, skip_rows=offset, block_size=block_size,
                                       use_threads=False),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid, quote_char=False),
        # only an empty field is missing: pyarrow's default null spellings ("NaN", "NULL", "n/a", ...) are
        # legitimate category values
        convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=True,
                                             null_values=[""],
                                             include_columns=list(dict.fromkeys(needed + (raw.multihot or [])))
                                             if derive is None else None),
    )
    next_line = offset + 1  # physical line of the next row the parser accepts, unless rejected
    for batch in reader:
        report_rejected()
        if batch.num_rows == 0:
            continue
        # The parser reports rejected rows as it reads ahead, so every rejection before this batch's last row is
        # known here: the batch's rows are the next lines that were not rejected.
        ahead = np.asarray([x for x in invalid if x >= next_line], dtype=np.int64)
        invalid[:] = ahead.tolist()
        lines = np.arange(next_line, next_line + batch.num_rows + len(ahead), dtype=np.int64)
        lines = lines[~np.isin(lines, ahead)][: batch.num_rows]
        next_line = int(lines[-1]) + 1
        yield _standardise(pa.Table.from_batches([batch]), path, lines, label_col, raw, bad_rows, positive_labels,
                           derive)
    report_rejected()


def header_names(path: str | Path, delimiter: str) -> list[str]:
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        return fh.readline().rstrip("\r\n").split(delimiter)


def _standardise(table: pa.Table, path: Path, lines: np.ndarray, label_col: str | None, raw: RawColumns,
                 bad_rows: BadRows, positive_labels: Sequence[str] | None,
                 derive: Callable[[pa.Table], pa.Table] | None) -> pa.Table:
    """Reader columns -> the standard chunk; rows with unparseable values raise, are dropped, or keep the value as
    missing (``bad_rows.policy``). ``lines`` holds each row's line in the file, for messages."""
    n = table.num_rows
    problems: list[tuple[np.ndarray, str, list[str]]] = []  # (rows, problem, columns to null under "missing")
    if label_col is None:
        labels = pa.nulls(n)  # of the null type: the file has no labels (not: its labels are unknown)
    else:
        values, bad_label = _label(table.column(label_col), positive_labels)
        if bad_rows.policy == "missing":  # prediction keeps the row; its label is unknown (null)
            labels = pa.array(values, pa.int8(), mask=bad_label)
        else:
            labels = pa.array(values, pa.int8())
            problems.append((bad_label, f"label column {label_col!r} must be 0 or 1" if positive_labels is None
                             else f"label column {label_col!r} is empty", []))
    if derive is not None:
        table, bad_derived, why, derived_cols = derive(table)
        problems.append((bad_derived, why, derived_cols))
    out: dict[str, pa.Array] = {"label": labels}
    for name in raw.numeric:
        values, bad_num = _to_float(table.column(name))  # unparseable values are already null here
        out[name] = values
        if bad_num is not None:
            problems.append((bad_num, f"column {name!r} is numeric but holds a non-numeric value", []))
    for name in raw.categorical + raw.multihot:
        col = table.column(name)
        out[name] = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    bad = np.zeros(n, dtype=bool)
    for mask, problem, columns in problems:
        if mask is not None and mask.any():
            bad_rows.found_values(path, int(lines[np.flatnonzero(mask)[0]]), problem)  # raises under "error"
            if bad_rows.policy == "missing":
                for c in columns:
                    out[c] = pc.if_else(pa.array(mask), pa.scalar(None, out[c].type), out[c])
            bad |= mask
    if not bad.any():
        return pa.table(out)
    if bad_rows.policy == "missing":
        bad_rows.repaired += int(bad.sum())
        return pa.table(out)
    bad_rows.skipped += int(bad.sum())
    keep = pa.array(~bad)
    return pa.table({k: pc.filter(v, keep) for k, v in out.items()})


# Formats ---------------------------------------------------------------------------------------------------

CRITEO_NUMERIC = [f"I{i}" for i in range(1, 14)]
CRITEO_CATEGORICAL = [f"C{i}" for i in range(1, 27)]


def criteo_reader(path: str | Path, bad_rows: BadRows, block_size: int = 16 << 20, label_optional: bool = False
                  ) -> tuple[RawColumns, Iterator]:
    """Criteo Kaggle display-advertising TSV: label, I1..I13 (integers, may be empty), C1..C26 (hex, may be empty).

    ``label_optional``: a file whose first line has one column fewer is read as unlabeled (Kaggle's test.txt).
    """
    raw = RawColumns(categorical=list(CRITEO_CATEGORICAL), numeric=list(CRITEO_NUMERIC))
    features = CRITEO_NUMERIC + CRITEO_CATEGORICAL
    labeled = not (label_optional and len(header_names(check_input_file(path, "data file"), "\t")) == len(features))
    return raw, read_delimited(path, delimiter="\t", columns=(["label"] if labeled else []) + features,
                               label_col="label" if labeled else None, raw=raw, bad_rows=bad_rows,
                               block_size=block_size)


AVAZU_CATEGORICAL = ["C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id", "app_domain",
                     "app_category", "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
                     "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21"]


def _avazu_derive(table: pa.Table) -> tuple[pa.Table, np.ndarray, str, list[str]]:
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
    return table, ~ok, "column 'hour' must be YYMMDDHH", ["hour_of_day", "weekday"]


def avazu_reader(path: str | Path, bad_rows: BadRows, block_size: int = 16 << 20, label_optional: bool = False
                 ) -> tuple[RawColumns, Iterator]:
    """Avazu CTR CSV with header: drops ``id``, label ``click``, derives hour-of-day and weekday from ``hour``.

    ``label_optional``: a file whose header has no ``click`` column is read as unlabeled (Kaggle's test file).
    """
    raw = RawColumns(categorical=AVAZU_CATEGORICAL + ["hour_of_day", "weekday"])
    labeled = not label_optional or "click" in header_names(check_input_file(path, "data file"), ",")
    return raw, read_delimited(path, delimiter=",", columns=None, label_col="click" if labeled else None, raw=raw,
                               bad_rows=bad_rows, derive=_avazu_derive, block_size=block_size)


def tabular_reader(path: str | Path, bad_rows: BadRows, *, label_col: str, positive_labels: Sequence,
                   categorical_cols: Sequence[str], numeric_cols: Sequence[str], delimiter: str = ",",
                   block_size: int = 16 << 20, label_optional: bool = False) -> tuple[RawColumns, Iterator]:
    """Any CSV (with header) or parquet file: columns and label meaning come from the data config.

    ``label_optional``: a file without the label column is read as unlabeled (serving rows).
    """
    raw = RawColumns(categorical=list(categorical_cols), numeric=list(numeric_cols))
    if not raw.categorical and not raw.numeric:
        raise DataError("data=tabular needs data.categorical_cols and/or data.numeric_cols (both are empty)")
    positive = [str(p) for p in positive_labels]
    if not positive:
        raise DataError("data.positive_labels is empty: list the label values that count as a click, e.g. [1]")
    path = check_input_file(path, "data file")
    is_parquet = str(path).endswith((".parquet", ".pq"))
    if label_optional:
        names = _parquet_file(path).schema_arrow.names if is_parquet else header_names(path, delimiter)
        label_col = label_col if label_col in names else None
    if is_parquet:
        return raw, _read_parquet(path, label_col, positive, raw, bad_rows)
    return raw, read_delimited(path, delimiter=delimiter, columns=None, label_col=label_col, raw=raw,
                               bad_rows=bad_rows, positive_labels=positive, block_size=block_size)


def _parquet_file(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except pa.ArrowInvalid as exc:
        raise DataError(f"{path} is not a readable parquet file ({exc}); convert it or check the path") from None


def _read_parquet(path: Path, label_col: str | None, positive: list[str], raw: RawColumns, bad_rows: BadRows,
                  batch_rows: int = 1 << 18) -> Iterator[pa.Table]:
    pf = _parquet_file(path)
    names = pf.schema_arrow.names
    label = [label_col] if label_col else []
    missing = [c for c in label + raw.categorical + raw.numeric if c not in names]
    if missing:
        raise DataError(f"{path}: column(s) {missing} not found; the file has columns {names}. "
                        "Check data.label_col / data.categorical_cols / data.numeric_cols.")
    row = 1  # rows of a parquet file are numbered from 1 in messages
    for batch in pf.iter_batches(batch_size=batch_rows, columns=label + raw.categorical + raw.numeric):
        table = pa.Table.from_batches([batch])
        str_table = pa.table({c: pc.cast(table.column(c), pa.string()) if c in raw.categorical + label
                              else table.column(c) for c in table.column_names})
        yield _standardise(str_table, path, np.arange(row, row + batch.num_rows), label_col, raw, bad_rows, positive,
                           None)
        row += batch.num_rows


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

