"""Preparation: raw chunks -> vocabularies -> encoded parquet shards + schema.json + summary.json.

Two streaming passes over the raw data (never the whole file in memory):
  1. fit: count every categorical value of the train split (pyarrow value_counts, merged with group_by), and the
     longest multi-hot list; only the train files are read (valid / test files are not needed to fit);
  2. encode: map values to ids (pyarrow index_in against the vocabulary; unseen or rare -> OOV), transform
     numerics, and write parquet shards per split. The train chunks parsed by pass 1 are reused when they total
     at most ``data.reuse_parsed_mb`` (a small dataset is parsed once); larger data is streamed again.

The output directory is written under a temporary name and renamed when complete, with summary.json (which holds
the config hash) written last: an interrupted preparation never leaves a directory that looks finished, and a
finished one is reused only while the data config and the raw files are unchanged.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lowrank_ctr.data import readers
from lowrank_ctr.data.encoding import VOCAB_FINGERPRINT, Layout, categorical_values, encode_table, vocab_fingerprint
from lowrank_ctr.data.errors import DataError, check_input_file
from lowrank_ctr.data.formats import DatasetFormat, as_list, check_config
from lowrank_ctr.data.memory import lean_allocators
from lowrank_ctr.data.schema import FIRST_VALUE_ID, FieldSpec, Schema
from lowrank_ctr.data.split import SPLITS, RowSplitter

log = logging.getLogger(__name__)

PREPARE_VERSION = 2  # 2: "NaN"/"NULL" are category values, not missing
SUMMARY_FILE = "summary.json"
# Keys of the data config that do not change the prepared files (excluded from the cache hash): loading, and how
# much memory preparation may use.
LOADER_KEYS = {"batch_size", "eval_batch_size", "num_workers", "shuffle_buffer", "pin_memory", "out_dir",
               "drop_last", "persistent_workers", "reuse_parsed_mb", "in_memory"}


@dataclass
class Prepared:
    path: Path
    schema: Schema
    summary: dict
    reused: bool


# Public entry ------------------------------------------------------------------------------------------------

def prepare(cfg: Mapping[str, Any], force: bool = False, progress: bool = True) -> Prepared:
    """Prepare the dataset described by a data config (``conf/data/*.yaml``), or reuse a finished cache."""
    cfg = plain_config(cfg)
    fmt = check_config(cfg)
    out = Path(cfg["out_dir"]).expanduser()
    check_out_dir(out)
    key = prepared_data_hash(cfg)
    if not force and is_finished(out, key):
        summary = json.loads((out / SUMMARY_FILE).read_text())
        log.info("reusing prepared dataset %s (config hash %s)", out, key)
        return Prepared(out, Schema.load(out), summary, reused=True)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        with lean_allocators():  # training in the same process then does not stack on preparation's slack
            summary = _prepare_into(tmp, fmt, cfg, key, progress)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Prepared(out, Schema.load(out), summary, reused=False)


def check_out_dir(out: Path) -> None:
    """A prepared dataset replaces its whole directory: refuse, before any work, one holding anything else."""
    if out.exists() and not out.is_dir():
        raise DataError(f"data.out_dir={out} is a file: give a directory for the prepared dataset")
    if out.is_dir() and any(out.iterdir()) and not ((out / "schema.json").exists() or (out / SUMMARY_FILE).exists()):
        raise DataError(f"data.out_dir={out} holds files that are not a prepared dataset (no schema.json or "
                        f"{SUMMARY_FILE}); preparation replaces its directory, so it leaves this one alone: choose a "
                        "new or empty data.out_dir")


def plain_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A data config as plain Python values (an OmegaConf config is resolved)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)


def is_finished(out: Path, key: str) -> bool:
    summary = out / SUMMARY_FILE
    if not (summary.exists() and (out / "schema.json").exists()):
        return False
    try:
        return json.loads(summary.read_text()).get("config_hash") == key
    except json.JSONDecodeError:
        return False


def prepared_data_hash(cfg: Mapping[str, Any]) -> str:
    """Hash of everything that changes the prepared files: data config, raw files' size and mtime, code version."""
    from lowrank_ctr.data.formats import get_format

    relevant = {k: v for k, v in sorted(cfg.items()) if k not in LOADER_KEYS}
    files = []
    for p in get_format(cfg.get("format")).input_paths(cfg):
        path = Path(p).expanduser()
        st = path.stat() if path.exists() else None
        files.append([str(path.resolve()), st.st_size if st else None, st.st_mtime_ns if st else None])
    blob = json.dumps({"cfg": relevant, "files": files, "version": PREPARE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Sources ------------------------------------------------------------------------------------------------------

StreamFactory = Callable[[readers.BadRows], Iterator[tuple[pa.Table, "np.ndarray | int"]]]


def _streams(fmt: DatasetFormat, cfg: Mapping[str, Any]) -> tuple[StreamFactory, StreamFactory]:
    """(train, held_out): factories of (chunk, split) streams; split is an int (whole chunk) or a per-row array.

    ``train`` yields every chunk the vocabularies are fitted on: the train files (split 0) when valid/test files
    are given, else every row of the train files (or of the generator) with its split drawn per row. ``held_out``
    yields the valid / test files' chunks (nothing when splits are drawn).
    """
    ratios, seed = cfg.get("split", [0.8, 0.1, 0.1]), int(cfg.get("seed", 0))
    if not fmt.reads_files:
        def generated(bad: readers.BadRows) -> Iterator[tuple[pa.Table, np.ndarray]]:
            splitter = RowSplitter(ratios, seed)
            for t in fmt.generate(cfg):
                yield t, splitter.assign(t.num_rows)

        return generated, lambda bad: iter(())

    train, valid, test = as_list(cfg.get("train_path")), as_list(cfg.get("valid_path")), as_list(cfg.get("test_path"))
    for p in train + valid + test:
        check_input_file(p, "data file")

    def train_stream(bad: readers.BadRows) -> Iterator[tuple[pa.Table, np.ndarray | int]]:
        splitter = None if valid else RowSplitter(ratios, seed)
        for p in train:
            for t in fmt.read(cfg, p, bad):
                yield t, 0 if splitter is None else splitter.assign(t.num_rows)

    def held_out(bad: readers.BadRows) -> Iterator[tuple[pa.Table, int]]:
        if valid:
            for split, files in ((1, valid), (2, test)):
                for p in files:
                    for t in fmt.read(cfg, p, bad):
                        yield t, split

    return train_stream, held_out


def _reuse_limit_mb(fmt: DatasetFormat, cfg: Mapping[str, Any]) -> int:
    """``data.reuse_parsed_mb``, or 0 where the raw input is unlikely to fit: generated data, or raw files of more
    than half the limit (parsed Criteo rows take ~1.6x their text). Deciding before reading keeps a dataset just
    above the limit from holding up to the limit in chunks until the running total gives up."""
    limit = int(cfg.get("reuse_parsed_mb", 0) or 0)
    if not fmt.reads_files:
        return 0
    raw = sum(Path(p).expanduser().stat().st_size for p in fmt.input_paths(cfg) if Path(p).expanduser().exists())
    return limit if 2 * raw <= limit << 20 else 0


class _KeptChunks:
    """The fit pass's chunks, kept for the encode pass while they total at most ``limit`` bytes (then dropped:
    the encode pass reads the raw data again). Saves the second parse of data that fits."""

    def __init__(self, limit_mb: int) -> None:
        self.limit = int(limit_mb) << 20
        self.chunks: list[tuple[pa.Table, np.ndarray | int]] | None = [] if self.limit > 0 else None
        self.bytes = 0

    def add(self, table: pa.Table, split: np.ndarray | int) -> None:
        if self.chunks is None:
            return
        self.bytes += table.nbytes
        if self.bytes > self.limit:
            self.chunks = None  # too large to keep: the encode pass streams the raw data again
        else:
            self.chunks.append((table, split))

    def take(self) -> list[tuple[pa.Table, np.ndarray | int]] | None:
        """The kept chunks (handed over once: the encode pass releases each after use), or None."""
        chunks, self.chunks = self.chunks, None
        return chunks


def write_raw_rows(cfg: Mapping[str, Any], path: str | Path, split: str | None = None, label: bool = True,
                   overwrite: bool = False) -> int:
    """Raw rows of a generated dataset (``lowrank-ctr-prepare raw_out=``), e.g. its test split for
    ``lowrank-ctr-predict``: the same rows, split the same way, as preparation reads from the generator.

    Written under a temporary name and renamed when complete; an existing file is kept unless ``overwrite``."""
    cfg = plain_config(cfg)
    fmt = check_config(cfg)
    if split not in (None, "all", *SPLITS):
        raise DataError(f"split={split!r} is not valid: use one of {list(SPLITS)} or all")
    out = Path(path).expanduser()
    if out.is_dir():
        raise DataError(f"raw_out={out} is a directory: give a file path, e.g. raw_out={out / 'rows.tsv'}")
    if out.exists() and not overwrite:
        raise DataError(f"raw_out={out} already exists: choose another file, or overwrite=true to replace it")
    select = None
    if split not in (None, "all"):
        splitter = RowSplitter(cfg.get("split", [0.8, 0.1, 0.1]), int(cfg.get("seed", 0)))
        wanted = SPLITS.index(split)

        def select(n: int) -> np.ndarray:
            return splitter.assign(n) == wanted

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        rows = fmt.write_raw(cfg, tmp, select, label)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return rows


# Pass 1: vocabularies -----------------------------------------------------------------------------------------

class _Counter:
    """Streaming value counts for one field; merges partial counts with a C++ group_by every few chunks."""

    def __init__(self) -> None:
        self.parts: list[pa.Table] = []

    def add(self, values: pa.Array) -> None:
        vc = pc.value_counts(values)
        self.parts.append(pa.table({"value": vc.field("values"), "count": pc.cast(vc.field("counts"), pa.int64())}))
        if len(self.parts) >= 16:
            self.parts = [self._merged()]

    def _merged(self) -> pa.Table:
        t = pa.concat_tables(self.parts)
        return t.group_by("value").aggregate([("count", "sum")]).rename_columns(["value", "count"])

    def vocabulary(self, min_count: int) -> pa.Table:
        if not self.parts:
            return pa.table({"value": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
        t = self._merged()
        t = t.filter(pc.greater_equal(t.column("count"), min_count))
        return t.sort_by([("count", "descending"), ("value", "ascending")])


# Pass 2: encoding ---------------------------------------------------------------------------------------------

class _ShardWriter:
    def __init__(self, directory: Path, shard_rows: int, compression: str) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shard_rows, self.compression = shard_rows, compression
        self.writer: pq.ParquetWriter | None = None
        self.rows_in_shard = 0
        self.shards = 0
        self.rows = 0
        self.positives = 0

    def write(self, table: pa.Table) -> None:
        start = 0
        while start < table.num_rows:
            if self.writer is None or self.rows_in_shard >= self.shard_rows:
                self._roll(table.schema)
            take = min(table.num_rows - start, self.shard_rows - self.rows_in_shard)
            part = table.slice(start, take)
            self.writer.write_table(part)
            self.rows_in_shard += take
            start += take
        self.rows += table.num_rows
        self.positives += int(pc.sum(table.column("label")).as_py() or 0)

    def _roll(self, schema: pa.Schema) -> None:
        if self.writer is not None:
            self.writer.close()
        path = self.dir / f"part-{self.shards:05d}.parquet"
        self.writer = pq.ParquetWriter(path, schema, compression=self.compression)
        self.shards += 1
        self.rows_in_shard = 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _prepare_into(out: Path, fmt: DatasetFormat, cfg: Mapping[str, Any], key: str, progress: bool) -> dict:
    t0 = time.perf_counter()
    min_count = int(cfg.get("min_count", 1))
    train_stream, held_out_stream = _streams(fmt, cfg)
    policy = cfg.get("on_bad_rows", "error")
    train_bad, held_out_bad = readers.BadRows(policy), readers.BadRows(policy)  # each row counted once
    layout = Layout(fmt.raw_columns(cfg), cfg)
    kept = _KeptChunks(_reuse_limit_mb(fmt, cfg))

    # Pass 1 ------------------------------------------------------------------------------------------------
    counters = {name: _Counter() for name in layout.categorical + layout.multihot}
    max_len = {name: 1 for name in layout.multihot}
    with _progress(progress, "fit vocabularies") as bar:
        for table, split in train_stream(train_bad):
            kept.add(table, split)
            if not isinstance(split, int):
                table = table.filter(pa.array(split == 0))
            for name in layout.categorical:
                counters[name].add(layout.categorical_column(table, name))
            for name in layout.multihot:
                col = table.column(name).combine_chunks()
                counters[name].add(categorical_values(pc.list_flatten(col)))
                lengths = pc.list_value_length(col).fill_null(0)
                max_len[name] = max(max_len[name], int(pc.max(lengths).as_py() or 0))
            bar(table.num_rows)
    cap = cfg.get("multihot_max_len")
    if cap:
        max_len = {k: min(v, int(cap)) for k, v in max_len.items()}
    vocabs = {name: c.vocabulary(min_count) for name, c in counters.items()}
    vocab_dir = out / "vocab"
    vocab_dir.mkdir()
    for name, v in vocabs.items():
        pq.write_table(v, vocab_dir / f"{name}.parquet")

    # Pass 2 ------------------------------------------------------------------------------------------------
    train_chunks = kept.take()
    if train_chunks is None:  # read again; its bad rows were counted by the fit pass
        train_chunks = train_stream(readers.BadRows(policy))
    else:
        log.info("encode: reusing the fit pass's %d parsed chunks (%.0f MB <= data.reuse_parsed_mb)",
                 len(train_chunks), kept.bytes / 2**20)
    compression = cfg.get("compression", "snappy")
    writers = [_ShardWriter(out / s, int(cfg.get("shard_rows", 1_000_000)), compression) for s in SPLITS]
    vocab_values = {name: v.column("value").combine_chunks() for name, v in vocabs.items()}
    try:
        with _progress(progress, "encode") as bar:
            for table, split in itertools.chain(_drain(train_chunks), held_out_stream(held_out_bad)):
                encoded = encode_table(table, layout, vocab_values, max_len)
                if isinstance(split, int):
                    parts = [(split, encoded)]
                else:
                    parts = [(s, encoded.filter(pa.array(split == s))) for s in range(3)]
                for s, part in parts:
                    if part.num_rows:
                        w = writers[s]
                        part = part.set_column(0, "row_id", pa.array(np.arange(w.rows, w.rows + part.num_rows)))
                        w.write(part)
                bar(table.num_rows)
    finally:
        for w in writers:
            w.close()

    rows = {s: w.rows for s, w in zip(SPLITS, writers)}
    skipped = train_bad.skipped + held_out_bad.skipped
    if rows["train"] == 0:
        source = ", ".join(as_list(cfg.get("train_path"))) or f"the {fmt.name} generator"
        raise DataError(f"no training rows were read from {source} for data={cfg.get('name')} "
                        f"({skipped} bad rows skipped): the file holds no usable data rows, or data.split "
                        "gives train no share")
    fields = ([FieldSpec(n, "categorical", vocabs[n].num_rows + FIRST_VALUE_ID) for n in layout.categorical]
              + [FieldSpec(n, "multihot", vocabs[n].num_rows + FIRST_VALUE_ID, max_len[n]) for n in layout.multihot]
              + [FieldSpec(n, "numeric") for n in layout.numeric])
    schema = Schema(name=str(cfg.get("name", fmt.name)), fields=fields,
                    extra={"format": fmt.name, "numeric_mode": cfg.get("numeric_mode", "dense"),
                           "numeric_transform": layout.transform, "min_count": min_count,
                           "bucketized": layout.bucketized,
                           VOCAB_FINGERPRINT: vocab_fingerprint(vocab_dir, list(vocabs))})
    schema.save(out)
    summary = {
        "name": schema.name,
        "rows": rows,
        "bad_rows_skipped": skipped,
        "bad_row_examples": (train_bad.examples + held_out_bad.examples)[:5],
        "positive_rate": {s: (w.positives / w.rows if w.rows else None) for s, w in zip(SPLITS, writers)},
        "shards": {s: w.shards for s, w in zip(SPLITS, writers)},
        "vocab_sizes": {f.name: f.vocab_size for f in fields if f.kind != "numeric"},
        "seconds": round(time.perf_counter() - t0, 3),
        "config_hash": key,
        "prepare_version": PREPARE_VERSION,
    }
    summary.update(fmt.summary_extra(cfg, rows))
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))  # written last: marks the cache finished
    return summary


def _drain(chunks: "list | Iterator") -> Iterator:
    """Iterate kept chunks, dropping each from the list once handed out (its memory goes as encoding proceeds)."""
    if not isinstance(chunks, list):
        yield from chunks
        return
    chunks.reverse()
    while chunks:
        yield chunks.pop()


class _progress:
    """A rich progress counter of rows (silent when disabled or not on a terminal)."""

    def __init__(self, enabled: bool, what: str) -> None:
        self.enabled, self.what = enabled, what
        self.rows = 0

    def __enter__(self) -> Callable[[int], None]:
        self._p = None
        if self.enabled:
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._p = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"),
                               TextColumn("{task.completed:,} rows"), TimeElapsedColumn(), transient=True)
            self._p.start()
            self._task = self._p.add_task(self.what, total=None)

        def advance(n: int) -> None:
            self.rows += n
            if self._p is not None:
                self._p.update(self._task, advance=n)

        return advance

    def __exit__(self, *exc: object) -> None:
        if self._p is not None:
            self._p.stop()
        if exc[0] is None:
            log.info("%s: %d rows", self.what, self.rows)
