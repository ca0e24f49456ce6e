"""Reader machinery shared by every dataset format: streaming delimited text and parquet as standard chunks.

Every chunk a reader yields has the columns ``label`` (int8, 0/1; of the null type for a file without labels), then
the raw feature columns named in ``RawColumns``: categorical columns as strings (null = missing) or non-null
integers, numeric columns as float64 (null = missing), multi-hot columns as list<string>. Preparation and
``lowrank-ctr-predict`` only see this shape; which columns a format has, how its labels read and which values its
fields may hold are declared by the format (``data/formats/``).

Readers never hold a whole file: delimited text goes through pyarrow's streaming CSV reader in blocks.
Malformed rows (wrong column count, non-numeric value in a numeric column, a label that is neither positive nor
negative, bytes that are not UTF-8 text) either stop with the file and line number, or are skipped and counted
(``on_bad_rows: skip``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from lowrank_ctr.data.errors import BadRowError, DataError, check_input_file

NUMBER_RE = r"^\s*[-+]?((\d+\.?\d*)|(\.\d+))([eE][-+]?\d+)?\s*$|^\s*[-+]?(nan|NaN|NAN|inf|Inf|INF|infinity|Infinity)\s*$"
NOT_TEXT = "holds bytes that are not UTF-8 text"
# (table) -> (table with derived columns, mask of rows with invalid values, why they are invalid, derived columns)
Derive = Callable[[pa.Table], tuple[pa.Table, np.ndarray, str, list[str]]]


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
        self.repaired = 0  # rows whose unparseable values were read as missing (policy "missing")
        self.unknown_labels = 0  # rows whose label was neither positive nor negative (policy "missing")
        self.examples: list[str] = []

    def found(self, path: str | Path, line: int | None, problem: str, count: int = 1) -> None:
        """A row that cannot be used at all (wrong column count, unknown user, not text, ...)."""
        if self.policy != "skip":
            raise BadRowError(path, line, problem, repairable=False)
        self.skipped += count
        self._example(path, line, problem)

    def found_values(self, path: str | Path, line: int, problem: str, fix: str | None = None) -> None:
        """Rows with values that cannot be parsed (``line`` is the first): raise, or leave the count to the caller."""
        if self.policy == "error":
            raise BadRowError(path, line, problem, repairable=True, fix=fix)
        self._example(path, line, problem)

    def _example(self, path: str | Path, line: int | None, problem: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(f"{path}:{line}: {problem}" if line is not None else f"{path}: {problem}")


# Labels ------------------------------------------------------------------------------------------------------

def label_text(value: Any) -> str:
    """A configured label value as the text it is compared with (YAML's 1 and 1.0 both mean the text "1")."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


@dataclass(frozen=True)
class LabelRule:
    """Which raw label values mean a click (1) and which mean none (0); any other value is a bad row.

    ``negative=None`` counts every other non-empty value as no click, which a user asks for explicitly
    (``data.negative_labels=other``); the default is to stop and name the unexpected values.
    """

    positive: tuple[str, ...]
    negative: tuple[str, ...] | None
    fix: str = "fix the label"  # how a user makes an unexpected value acceptable

    @classmethod
    def of(cls, positive: Sequence[Any], negative: Sequence[Any] | str | None, fix: str) -> "LabelRule":
        neg = None if isinstance(negative, str) else tuple(label_text(v) for v in negative or ())
        return cls(tuple(label_text(v) for v in positive), neg, fix)

    def expected(self) -> str:
        neg = "any other value" if self.negative is None else " / ".join(self.negative) or "(none)"
        return f"{' / '.join(self.positive)} (click) or {neg} (no click)"

    def encode(self, col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """Label column -> (int8 0/1 labels, mask of rows whose label is neither positive nor negative)."""
        text = pc.utf8_trim_whitespace(col if pa.types.is_string(col.type) else pc.cast(col, pa.string()))
        pos = _mask(pc.is_in(text, value_set=pa.array(list(self.positive), pa.string())))
        if self.negative is None:
            neg = ~pos & _mask(pc.not_equal(text, ""))
        else:
            neg = _mask(pc.is_in(text, value_set=pa.array(list(self.negative), pa.string())))
        return pos.astype(np.int8), ~(pos | neg)


def _mask(values: pa.Array) -> np.ndarray:
    return np.asarray(values.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)


def _unexpected_labels_message(label_col: str, rule: LabelRule, counts: Counter, exact: bool) -> str:
    shown = ", ".join(f"{'(empty)' if v in ('', None) else repr(v)} ({n:,} row{'s' if n != 1 else ''})"
                      for v, n in counts.most_common(5))
    more = f" and {len(counts) - 5} more values" if len(counts) > 5 else ""
    where = "in the file" if exact else "in the rows read"
    return (f"label column {label_col!r} must be {rule.expected()}; unexpected values {where}: {shown}{more}")


def _label_fix(rule: LabelRule) -> str:
    return (f"{rule.fix}, or set data.on_bad_rows=skip to drop such rows (counted in summary.json), or "
            "on_bad_rows=missing in lowrank-ctr-predict to read such labels as unknown")


# Text that is not UTF-8 ---------------------------------------------------------------------------------------

class Utf8Lines:
    """A file's bytes as the CSV parser reads them, with every line that is not valid UTF-8 made readable.

    pyarrow decodes a rejected row's text for its error callback and fails on invalid UTF-8 without naming the
    file (and no ``on_bad_rows`` can apply after that). Here each such line keeps its columns (invalid bytes become
    U+FFFD) and its physical line number goes to ``non_text_lines``, so the reader reports it as a bad row like
    any other: ``file:line``, skippable.
    """

    def __init__(self, path: Path) -> None:
        self._raw = pa.input_stream(str(path))  # decompresses .gz / .bz2 by extension, as pyarrow's reader does
        self._carry = b""
        self._out = bytearray()
        self._line = 1  # physical line number of the first line in _carry
        self._eof = False
        self.non_text_lines: set[int] = set()
        self.blank_lines: set[int] = set()  # the parser skips empty lines: they are no rows, but they are lines
        self.closed = False

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        while not self._eof and (n < 0 or len(self._out) < n):
            block = self._raw.read(max(n, 1 << 20) if n > 0 else 1 << 24)
            if not block:
                self._eof = True
                data, self._carry = self._carry, b""
            else:
                data = self._carry + block
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    self._carry = data
                    continue
                data, self._carry = data[:cut], data[cut:]
            self._out += self._checked(data)
        take = len(self._out) if n < 0 else min(n, len(self._out))
        out = bytes(self._out[:take])
        del self._out[:take]
        return out

    def _checked(self, data: bytes) -> bytes:
        first = self._line
        self._line += data.count(b"\n")
        if data[:1] in (b"\n", b"\r") or b"\n\n" in data or b"\n\r\n" in data:  # rare: find the blank lines
            body = data.split(b"\n")
            for i, line in enumerate(body[:-1] if data.endswith(b"\n") else body):
                if line in (b"", b"\r"):
                    self.blank_lines.add(first + i)
        if data.isascii():
            return data
        try:
            data.decode("utf-8")
            return data
        except UnicodeDecodeError:
            pass
        lines = data.split(b"\n")
        for i, line in enumerate(lines):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                self.non_text_lines.add(first + i)
                lines[i] = line.decode("utf-8", errors="replace").encode("utf-8")
        return b"\n".join(lines)

    def close(self) -> None:
        self._raw.close()
        self.closed = True


def not_text_problem(path: Path, line: int | None) -> str:
    hint = f" (is {path.name} binary or compressed? give the raw text file)" if line == 1 else ""
    return NOT_TEXT + hint


# Delimited text -----------------------------------------------------------------------------------------------

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


def header_names(path: str | Path, delimiter: str) -> list[str]:
    stream = pa.input_stream(str(path))
    try:
        first = stream.read(1 << 20).split(b"\n", 1)[0]
    finally:
        stream.close()
    return first.decode("utf-8", errors="replace").rstrip("\r").split(delimiter)


def read_delimited(
    path: str | Path,
    *,
    delimiter: str,
    columns: Sequence[str] | None,
    label_col: str | None,
    raw: RawColumns,
    bad_rows: BadRows,
    labels: LabelRule,
    derive: Derive | None = None,
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
    include = list(dict.fromkeys(needed + (raw.multihot or []))) if derive is None else None

    def open_reader(text: Utf8Lines, include_columns: list[str] | None, on_invalid: Callable) -> Any:
        return pacsv.open_csv(
            text,
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=offset, block_size=block_size,
                                           use_threads=False),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=on_invalid, quote_char=False),
            # only an empty field is missing: pyarrow's default null spellings ("NaN", "NULL", "n/a", ...) are
            # legitimate category values
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                 strings_can_be_null=True, null_values=[""],
                                                 include_columns=include_columns))

    def label_census() -> Counter:
        """Unexpected label values of the whole file and their counts (read only when they stop the run)."""
        census_text = Utf8Lines(path)
        counts: Counter = Counter()
        try:
            for batch in open_reader(census_text, [label_col], lambda row: "skip"):
                col = batch.column(0)
                counts.update(pc.utf8_trim_whitespace(col).filter(pa.array(labels.encode(col)[1])).to_pylist())
        finally:
            census_text.close()
        return counts

    invalid: list[int] = []  # physical line numbers of rows the parser rejected, not yet passed
    rejected: list[tuple[int | None, str]] = []  # not yet reported (an exception cannot leave the parser's hook)

    def physical_line(number: int) -> int:
        """The file line of the parser's ``number``-th row: the parser does not count blank lines."""
        line = number + offset
        for blank in sorted(text.blank_lines):
            if blank > line:
                break
            line += 1
        return line

    def on_invalid(row: pacsv.InvalidRow) -> str:
        line = None if row.number is None else physical_line(row.number)
        problem = f"expected {row.expected_columns} columns, got {row.actual_columns}"
        if line is not None and line in text.non_text_lines:
            problem = f"{not_text_problem(path, line)}; {problem}"
        rejected.append((line, problem))
        if line is not None:
            invalid.append(line)
        return "skip"

    def report(rows: list[tuple[int | None, str]]) -> None:
        for line, problem in rows:
            bad_rows.found(path, line, problem)

    text = Utf8Lines(path)  # before the parser starts: it reads (and rejects rows) as soon as it is opened
    next_line = offset + 1  # physical line of the next row the parser accepts, unless rejected
    try:
        for batch in open_reader(text, include, on_invalid):
            if batch.num_rows == 0:
                continue
            # The parser reports rejected rows as it reads ahead, so every rejection before this batch's last row
            # is known here: the batch's rows are the next lines that were not rejected.
            ahead = np.asarray([x for x in invalid if x >= next_line], dtype=np.int64)
            invalid[:] = ahead.tolist()
            blank = np.asarray(sorted(x for x in text.blank_lines if x >= next_line), dtype=np.int64)
            lines = np.arange(next_line, next_line + batch.num_rows + len(ahead) + len(blank), dtype=np.int64)
            lines = lines[~(np.isin(lines, ahead) | np.isin(lines, blank))][: batch.num_rows]
            next_line = int(lines[-1]) + 1
            due = [r for r in rejected if r[0] is None or r[0] <= lines[-1]]
            rejected[:] = [r for r in rejected if not (r[0] is None or r[0] <= lines[-1])]
            not_text = (np.isin(lines, np.fromiter(text.non_text_lines, np.int64)) if text.non_text_lines
                        else None)
            try:
                chunk = standardise(pa.Table.from_batches([batch]), path, lines, label_col, raw, bad_rows, labels,
                                    derive=derive, not_text=not_text, label_census=label_census)
            except BadRowError as exc:  # a rejected row above it is the first bad row
                report([r for r in due if r[0] is not None and exc.line is not None and r[0] < exc.line])
                raise
            report(due)
            yield chunk
        report(rejected)
    finally:
        text.close()


@dataclass
class _Problem:
    rows: np.ndarray  # mask of the chunk's rows that have it
    what: str
    repairable: bool = True  # under "missing", its values can be read as missing (``columns`` nulled)
    columns: list[str] = field(default_factory=list)
    fix: str | None = None
    describe: Callable[[int], str] | None = None  # the message for a row's line, when it depends on more


def standardise(table: pa.Table, path: Path, lines: np.ndarray, label_col: str | None, raw: RawColumns,
                bad_rows: BadRows, labels: LabelRule, *, derive: Derive | None = None,
                not_text: np.ndarray | None = None, label_census: Callable[[], Counter] | None = None) -> pa.Table:
    """Reader columns -> the standard chunk; rows with unusable values raise (at the chunk's first bad line,
    whatever its problem), are dropped and counted, or keep the value as missing (``bad_rows.policy``). ``lines``
    holds each row's line in the file, for messages; ``not_text`` marks rows that were not UTF-8 text (never
    usable)."""
    n = table.num_rows
    problems: list[_Problem] = []
    if not_text is not None:
        problems.append(_Problem(not_text, NOT_TEXT, repairable=False,
                                 describe=lambda line: not_text_problem(path, line)))
    out: dict[str, pa.Array] = {}
    if label_col is None:
        out["label"] = pa.nulls(n)  # of the null type: the file has no labels (not: its labels are unknown)
    else:
        label_col_values = table.column(label_col).combine_chunks()
        values, bad_label = labels.encode(label_col_values)
        if bad_rows.policy == "missing":  # prediction keeps the row; its label is unknown (null)
            out["label"] = pa.array(values, pa.int8(), mask=bad_label)
            if bad_label.any():
                bad_rows.unknown_labels += int(bad_label.sum())
                bad_rows._example(path, int(lines[np.flatnonzero(bad_label)[0]]),
                                  f"label column {label_col!r} must be {labels.expected()}")
        else:
            out["label"] = pa.array(values, pa.int8())

            def label_message(line: int) -> str:  # the values and their counts (whole file when it can be read)
                counts = label_census() if label_census is not None else None
                if counts is None:
                    text = pc.utf8_trim_whitespace(pc.cast(label_col_values, pa.string()))
                    counts = Counter(text.filter(pa.array(bad_label)).to_pylist())
                return _unexpected_labels_message(label_col, labels, counts, exact=label_census is not None)

            problems.append(_Problem(bad_label, f"label column {label_col!r} must be {labels.expected()}",
                                     fix=_label_fix(labels), describe=label_message))
    if derive is not None:
        table, bad_derived, why, derived_cols = derive(table)
        problems.append(_Problem(bad_derived, why, columns=derived_cols))
    for name in raw.numeric:
        out[name], bad_num = _to_float(table.column(name))  # unparseable values are already null here
        if bad_num is not None:
            problems.append(_Problem(bad_num, f"column {name!r} is numeric but holds a non-numeric value"))
    for name in raw.categorical + raw.multihot:
        col = table.column(name)
        out[name] = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    problems = [p for p in problems if p.rows is not None and p.rows.any()]
    if not problems:
        return pa.table(out)
    # the first bad line of the chunk, whatever its problem, is what "error" reports
    first = min(problems, key=lambda p: int(np.flatnonzero(p.rows)[0]))
    stopping = {"error": [first], "missing": [p for p in problems if not p.repairable], "skip": []}[bad_rows.policy]
    for p in stopping:
        line = int(lines[np.flatnonzero(p.rows)[0]])
        what = p.describe(line) if p.describe is not None else p.what
        if p.repairable:
            bad_rows.found_values(path, line, what, p.fix)  # raises (policy "error")
        else:
            bad_rows.found(path, line, what, count=0)  # raises (not "skip")
    bad = np.zeros(n, dtype=bool)
    for p in problems:
        bad_rows._example(path, int(lines[np.flatnonzero(p.rows)[0]]), p.what)
        if bad_rows.policy == "missing":
            for c in p.columns:
                out[c] = pc.if_else(pa.array(p.rows), pa.scalar(None, out[c].type), out[c])
        bad |= p.rows
    if bad_rows.policy == "missing":
        bad_rows.repaired += int(bad.sum())
        return pa.table(out)
    bad_rows.skipped += int(bad.sum())
    keep = pa.array(~bad)
    return pa.table({k: pc.filter(v, keep) for k, v in out.items()})


# Parquet ------------------------------------------------------------------------------------------------------

def parquet_file(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path} is not a readable parquet file ({exc}); convert it or check the path") from None


def _as_text(col: pa.Array) -> tuple[pa.Array, np.ndarray | None]:
    """Any column as strings; binary cells that are not UTF-8 become null and are returned as a mask."""
    try:
        return pc.cast(col, pa.string()), None
    except pa.ArrowInvalid:
        values = col.to_pylist()
        bad = np.zeros(len(values), dtype=bool)
        for i, v in enumerate(values):
            if isinstance(v, bytes):
                try:
                    values[i] = v.decode("utf-8")
                except UnicodeDecodeError:
                    values[i], bad[i] = None, True
        return pa.array(values, pa.string()), bad


def read_parquet(path: Path, label_col: str | None, labels: LabelRule, raw: RawColumns, bad_rows: BadRows,
                 batch_rows: int = 1 << 18) -> Iterator[pa.Table]:
    """Stream a parquet file as standard chunks (rows are numbered from 1 in messages)."""
    pf = parquet_file(path)
    names = pf.schema_arrow.names
    label = [label_col] if label_col else []
    missing = [c for c in label + raw.categorical + raw.numeric if c not in names]
    if missing:
        raise DataError(f"{path}: column(s) {missing} not found; the file has columns {names}. "
                        "Check data.label_col / data.categorical_cols / data.numeric_cols.")
    text_columns = raw.categorical + label

    def label_census() -> Counter:
        counts: Counter = Counter()
        for batch in pf.iter_batches(batch_size=batch_rows, columns=label):
            col = _as_text(batch.column(0))[0]
            counts.update(pc.utf8_trim_whitespace(col).filter(pa.array(labels.encode(col)[1])).to_pylist())
        return counts

    row = 1
    for batch in pf.iter_batches(batch_size=batch_rows, columns=label + raw.categorical + raw.numeric):
        columns, not_text = {}, np.zeros(batch.num_rows, dtype=bool)
        for c in batch.schema.names:
            col = batch.column(c)
            if c in text_columns:
                col, bad = _as_text(col)
                if bad is not None:
                    not_text |= bad
            columns[c] = col
        yield standardise(pa.table(columns), path, np.arange(row, row + batch.num_rows), label_col, raw, bad_rows,
                          labels, not_text=not_text if not_text.any() else None, label_census=label_census)
        row += batch.num_rows
