"""Preparation: raw chunks -> vocabularies -> encoded parquet shards + schema.json + summary.json.

Two streaming passes over the raw data (never the whole file in memory):
  1. fit: count every categorical value of the train split (pyarrow value_counts, merged with group_by), and the
     longest multi-hot list;
  2. encode: map values to ids (pyarrow index_in against the vocabulary; unseen or rare -> OOV), transform
     numerics, and write parquet shards per split.

The output directory is written under a temporary name and renamed when complete, with summary.json (which holds
the config hash) written last: an interrupted preparation never leaves a directory that looks finished, and a
finished one is reused only while the data config and the raw files are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lowrank_ctr.data import readers
from lowrank_ctr.data.encoding import Layout, categorical_values, encode_table
from lowrank_ctr.data.errors import DataError, check_input_file
from lowrank_ctr.data.schema import FIRST_VALUE_ID, FieldSpec, Schema
from lowrank_ctr.data.synthetic import SyntheticCriteo, _splitmix64

log = logging.getLogger(__name__)

PREPARE_VERSION = 2  # 2: "NaN"/"NULL" are category values, not missing
SUMMARY_FILE = "summary.json"
SPLITS = ("train", "valid", "test")
# Keys of the data config that only affect loading, not the prepared files (excluded from the cache hash).
LOADER_KEYS = {"batch_size", "eval_batch_size", "num_workers", "shuffle_buffer", "pin_memory", "out_dir",
               "drop_last", "persistent_workers"}
FORMATS = ("criteo", "avazu", "movielens", "tabular", "synthetic")


@dataclass
class Prepared:
    path: Path
    schema: Schema
    summary: dict
    reused: bool


# Public entry ------------------------------------------------------------------------------------------------

def prepare(cfg: Mapping[str, Any], force: bool = False, progress: bool = True) -> Prepared:
    """Prepare the dataset described by a data config (``conf/data/*.yaml``), or reuse a finished cache."""
    cfg = dict(cfg)
    fmt = cfg.get("format")
    if fmt not in FORMATS:
        raise DataError(f"data.format={fmt!r} is not known; use one of {list(FORMATS)}")
    out_dir = cfg.get("out_dir")
    if not out_dir:
        raise DataError("data.out_dir is not set: give the directory for the prepared dataset")
    out = Path(out_dir).expanduser()
    key = config_hash(cfg)
    if not force and is_finished(out, key):
        summary = json.loads((out / SUMMARY_FILE).read_text())
        log.info("reusing prepared dataset %s (config hash %s)", out, key)
        return Prepared(out, Schema.load(out), summary, reused=True)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        summary = _prepare_into(tmp, cfg, key, progress)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Prepared(out, Schema.load(out), summary, reused=False)


def is_finished(out: Path, key: str) -> bool:
    summary = out / SUMMARY_FILE
    if not (summary.exists() and (out / "schema.json").exists()):
        return False
    try:
        return json.loads(summary.read_text()).get("config_hash") == key
    except json.JSONDecodeError:
        return False


def config_hash(cfg: Mapping[str, Any]) -> str:
    """Hash of everything that changes the prepared files: data config, raw files' size and mtime, code version."""
    relevant = {k: v for k, v in sorted(cfg.items()) if k not in LOADER_KEYS}
    files = []
    for p in _all_input_paths(cfg):
        path = Path(p).expanduser()
        st = path.stat() if path.exists() else None
        files.append([str(path.resolve()), st.st_size if st else None, st.st_mtime_ns if st else None])
    blob = json.dumps({"cfg": relevant, "files": files, "version": PREPARE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Sources ------------------------------------------------------------------------------------------------------

def _as_list(p: Any) -> list:
    if p is None or p == "":
        return []
    return [str(x) for x in p] if isinstance(p, (list, tuple)) or type(p).__name__ == "ListConfig" else [str(p)]


def _all_input_paths(cfg: Mapping[str, Any]) -> list[str]:
    paths = _as_list(cfg.get("train_path")) + _as_list(cfg.get("valid_path")) + _as_list(cfg.get("test_path"))
    return paths + _as_list(cfg.get("users_path")) + _as_list(cfg.get("items_path"))


def _open(cfg: Mapping[str, Any], path: str, bad: readers.BadRows) -> tuple[readers.RawColumns, Iterator[pa.Table]]:
    fmt = cfg["format"]
    block = int(cfg.get("block_size", 16 << 20))
    if fmt == "criteo":
        return readers.criteo_reader(path, bad, block_size=block)
    if fmt == "avazu":
        return readers.avazu_reader(path, bad, block_size=block)
    if fmt == "movielens":
        return readers.movielens_reader(path, bad, users_path=cfg.get("users_path"), items_path=cfg.get("items_path"),
                                        positive_rating=int(cfg.get("positive_rating", 4)))
    if fmt == "tabular":
        for key in ("label_col",):
            if not cfg.get(key):
                raise DataError(f"data=tabular needs data.{key}")
        return readers.tabular_reader(path, bad, label_col=cfg["label_col"],
                                      positive_labels=list(cfg.get("positive_labels") or []),
                                      categorical_cols=list(cfg.get("categorical_cols") or []),
                                      numeric_cols=list(cfg.get("numeric_cols") or []),
                                      delimiter=cfg.get("delimiter", ","), block_size=block)
    raise AssertionError(fmt)


def _synthetic(cfg: Mapping[str, Any]) -> SyntheticCriteo:
    keys = {k for k in SyntheticCriteo.__dataclass_fields__}
    return SyntheticCriteo(**{k: cfg[k] for k in keys if k in cfg and cfg[k] is not None})


class _Splitter:
    """Deterministic random split of a stream by a hash of (seed, global row index): no row order needed."""

    def __init__(self, ratios: Sequence[float], seed: int) -> None:
        r = np.asarray(list(ratios), dtype=np.float64)
        if r.shape != (3,) or (r < 0).any() or abs(r.sum() - 1.0) > 1e-6 or r[0] <= 0:
            raise DataError(f"data.split={list(ratios)} must be three non-negative fractions "
                            "[train, valid, test] summing to 1 with train > 0")
        self.edges = np.cumsum(r)[:2]
        self.seed = np.uint64(seed & 0xFFFFFFFF)
        self.next_row = 0

    def assign(self, n: int) -> np.ndarray:
        idx = np.arange(self.next_row, self.next_row + n, dtype=np.uint64)
        self.next_row += n
        u = (_splitmix64(idx ^ (self.seed << np.uint64(40))) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
        return np.searchsorted(self.edges, u, side="right").astype(np.int8)  # 0 train, 1 valid, 2 test


def _split_streams(cfg: Mapping[str, Any], bad: readers.BadRows
                   ) -> tuple[readers.RawColumns, Callable[[], Iterator[tuple[pa.Table, np.ndarray | int]]]]:
    """Raw columns and a factory of (chunk, split) streams; split is an int (whole chunk) or a per-row array."""
    if cfg["format"] == "synthetic":
        gen = _synthetic(cfg)
        splitter_args = (cfg.get("split", [0.8, 0.1, 0.1]), int(cfg.get("seed", 0)))

        def synth() -> Iterator[tuple[pa.Table, np.ndarray]]:
            s = _Splitter(*splitter_args)
            for t in gen.tables():
                yield t, s.assign(t.num_rows)

        return gen.raw_columns, synth

    train = _as_list(cfg.get("train_path"))
    if not train:
        raise DataError(f"no data file given for data={cfg.get('name')}: set data.train_path=/path/to/file")
    valid, test = _as_list(cfg.get("valid_path")), _as_list(cfg.get("test_path"))
    for p in train + valid + test:
        check_input_file(p, "data file")
    if bool(valid) != bool(test):
        raise DataError("give both data.valid_path and data.test_path, or neither (then data.split splits the "
                        "train file)")
    raw, _ = _open(cfg, train[0], bad)

    def stream() -> Iterator[tuple[pa.Table, np.ndarray | int]]:
        if valid:
            for split, paths in enumerate((train, valid, test)):
                for p in paths:
                    for t in _open(cfg, p, bad)[1]:
                        yield t, split
        else:
            s = _Splitter(cfg.get("split", [0.8, 0.1, 0.1]), int(cfg.get("seed", 0)))
            for p in train:
                for t in _open(cfg, p, bad)[1]:
                    yield t, s.assign(t.num_rows)

    return raw, stream


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


def _prepare_into(out: Path, cfg: Mapping[str, Any], key: str, progress: bool) -> dict:
    t0 = time.perf_counter()
    min_count = int(cfg.get("min_count", 1))
    if cfg.get("on_bad_rows", "error") == "missing":
        raise DataError("data.on_bad_rows=missing keeps rows whose label may be unusable, so it is for "
                        "lowrank-ctr-predict only; preparation takes 'error' or 'skip'")
    if min_count < 1:
        raise DataError(f"data.min_count={min_count} must be >= 1")
    raw, fit_stream = _split_streams(cfg, readers.BadRows(cfg.get("on_bad_rows", "error")))
    layout = Layout(raw, cfg)

    # Pass 1 ------------------------------------------------------------------------------------------------
    counters = {name: _Counter() for name in layout.categorical + layout.multihot}
    max_len = {name: 1 for name in layout.multihot}
    with _progress(progress, "fit vocabularies") as bar:
        for table, split in fit_stream():
            if isinstance(split, int):
                if split != 0:
                    continue
            else:
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
    bad = readers.BadRows(cfg.get("on_bad_rows", "error"))
    _, enc_stream = _split_streams(cfg, bad)
    compression = cfg.get("compression", "snappy")
    writers = [_ShardWriter(out / s, int(cfg.get("shard_rows", 1_000_000)), compression) for s in SPLITS]
    vocab_values = {name: v.column("value").combine_chunks() for name, v in vocabs.items()}
    try:
        with _progress(progress, "encode") as bar:
            for table, split in enc_stream():
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
    if rows["train"] == 0:
        source = ", ".join(_as_list(cfg.get("train_path"))) or f"the {cfg['format']} generator"
        raise DataError(f"no training rows were read from {source} for data={cfg.get('name')} "
                        f"({bad.skipped} bad rows skipped): the file holds no usable data rows, or data.split "
                        "gives train no share")
    fields = ([FieldSpec(n, "categorical", vocabs[n].num_rows + FIRST_VALUE_ID) for n in layout.categorical]
              + [FieldSpec(n, "multihot", vocabs[n].num_rows + FIRST_VALUE_ID, max_len[n]) for n in layout.multihot]
              + [FieldSpec(n, "numeric") for n in layout.numeric])
    schema = Schema(name=str(cfg.get("name", cfg["format"])), fields=fields,
                    extra={"format": cfg["format"], "numeric_mode": cfg.get("numeric_mode", "dense"),
                           "numeric_transform": layout.transform, "min_count": min_count,
                           "bucketized": layout.bucketized})
    schema.save(out)
    summary = {
        "name": schema.name,
        "rows": rows,
        "bad_rows_skipped": bad.skipped,
        "bad_row_examples": bad.examples,
        "positive_rate": {s: (w.positives / w.rows if w.rows else None) for s, w in zip(SPLITS, writers)},
        "shards": {s: w.shards for s, w in zip(SPLITS, writers)},
        "vocab_sizes": {f.name: f.vocab_size for f in fields if f.kind != "numeric"},
        "seconds": round(time.perf_counter() - t0, 3),
        "config_hash": key,
        "prepare_version": PREPARE_VERSION,
    }
    if cfg["format"] == "synthetic":
        summary["teacher_auc"] = _synthetic(cfg).teacher_auc(min(rows["test"] + rows["valid"] + rows["train"],
                                                                 200_000))
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))  # written last: marks the cache finished
    return summary


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
