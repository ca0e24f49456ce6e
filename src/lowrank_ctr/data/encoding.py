"""Raw reader columns -> model ids and numbers: the one encoding shared by preparation and prediction.

Preparation fits the vocabularies and encodes the training data with these functions; ``lowrank-ctr-predict``
encodes raw serving rows with the same functions and the saved vocabularies, so a row gets the same ids and
numbers at serving time as it would have got in training (unseen or rare values -> OOV, missing -> the missing
value's id or numeric 0).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lowrank_ctr.data import readers
from lowrank_ctr.data.errors import DataError
from lowrank_ctr.data.schema import FIRST_VALUE_ID, OOV_ID, Schema

MISSING_INT = np.int64(-(2**62))  # stands for "missing" in integer-valued categorical columns
INTEGER_RE = r"^\s*[-+]?\d{1,18}\s*$"


def categorical_values(col: pa.Array) -> pa.Array:
    """One value type per field: non-null int64 (missing -> MISSING_INT) or string (missing -> "")."""
    if pa.types.is_integer(col.type):
        return pc.fill_null(pc.cast(col, pa.int64()), pa.scalar(MISSING_INT, pa.int64()))
    if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
        col = pc.cast(col, pa.string())
    return pc.fill_null(col, "")


def bucketize(values: pa.Array) -> pa.Array:
    """Kaggle-winner numeric buckets: floor(log(x)^2) for x > 2, else x itself; missing is its own bucket."""
    x = values.to_numpy(zero_copy_only=False)  # float64 with NaN for null
    with np.errstate(invalid="ignore", divide="ignore"):
        b = np.where(x > 2, np.floor(np.log(np.where(x > 2, x, 3.0)) ** 2), np.floor(x))
    b = np.where(np.isnan(x), MISSING_INT, np.clip(b, -(2**61), 2**61)).astype(np.int64)
    return pa.array(b)


def dense(values: pa.Array, transform: str) -> np.ndarray:
    x = values.to_numpy(zero_copy_only=False).astype(np.float64)
    x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    if transform == "log":
        x = np.sign(x) * np.log1p(np.abs(x))
    elif transform != "none":
        raise DataError(f"data.numeric_transform={transform!r} is not valid: use 'log' or 'none'")
    return x.astype(np.float32)


class Layout:
    """Which raw column becomes which schema field, given the numeric mode."""

    def __init__(self, raw: readers.RawColumns, cfg: Mapping[str, Any]) -> None:
        mode = cfg.get("numeric_mode", "dense")
        if mode not in ("dense", "bucketize"):
            raise DataError(f"data.numeric_mode={mode!r} is not valid: use 'dense' or 'bucketize'")
        self.bucketized = list(raw.numeric) if mode == "bucketize" else []
        self.categorical = list(raw.categorical) + self.bucketized
        self.numeric = [] if mode == "bucketize" else list(raw.numeric)
        self.multihot = list(raw.multihot)
        self.transform = cfg.get("numeric_transform", "log")

    def categorical_column(self, table: pa.Table, name: str) -> pa.Array:
        col = table.column(name).combine_chunks()
        return bucketize(col) if name in self.bucketized else categorical_values(col)


def _like_vocabulary(values: pa.Array, vocab: pa.Array) -> pa.Array:
    """Values in the vocabulary's type: text read from a file is matched against integer vocabularies as integers
    (e.g. a model trained on the synthetic generator); text that is not an integer matches nothing (OOV)."""
    if values.type == vocab.type or not pa.types.is_integer(vocab.type):
        return values
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        text = pc.utf8_trim_whitespace(values)
        integers = pc.cast(pc.if_else(pc.match_substring_regex(text, INTEGER_RE), text, pa.scalar(None, text.type)),
                           pa.int64())
        not_integer = pc.if_else(pc.equal(text, ""), pa.scalar(MISSING_INT), pa.scalar(MISSING_INT - 1))
        return pc.coalesce(integers, not_integer)
    return pc.cast(values, vocab.type)


def encode_ids(values: pa.Array, vocab: pa.Array) -> np.ndarray:
    idx = pc.index_in(_like_vocabulary(values, vocab), value_set=vocab)
    return (pc.fill_null(idx, OOV_ID - FIRST_VALUE_ID).to_numpy(zero_copy_only=False).astype(np.int32)
            + FIRST_VALUE_ID)


def encode_multihot(col: pa.Array, vocab: pa.Array, max_len: int) -> pa.Array:
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    col = pc.fill_null(col, pa.scalar([], col.type)) if col.null_count else col
    n = len(col)
    offsets = col.offsets.to_numpy() - col.offsets[0].as_py()
    lengths = np.diff(offsets)
    flat = categorical_values(pc.list_flatten(col))
    ids = encode_ids(flat, vocab) if len(flat) else np.zeros(0, np.int32)
    rows = np.repeat(np.arange(n), lengths)
    pos = np.arange(len(ids)) - np.repeat(offsets[:-1], lengths)
    keep = pos < max_len
    out = np.zeros((n, max_len), dtype=np.int32)  # 0 = padding
    out[rows[keep], pos[keep]] = ids[keep]
    return pa.FixedSizeListArray.from_arrays(pa.array(out.reshape(-1)), max_len)


def encode_table(table: pa.Table, layout: Layout, vocabs: dict[str, pa.Array], max_len: dict[str, int]) -> pa.Table:
    """A reader chunk -> the prepared columns (row_id left null, label, one column per schema field)."""
    cols: dict[str, pa.Array] = {"row_id": pa.nulls(table.num_rows, pa.int64()),
                                 "label": table.column("label").combine_chunks()}
    for name in layout.categorical:
        cols[name] = pa.array(encode_ids(layout.categorical_column(table, name), vocabs[name]))
    for name in layout.multihot:
        cols[name] = encode_multihot(table.column(name), vocabs[name], max_len[name])
    for name in layout.numeric:
        cols[name] = pa.array(dense(table.column(name).combine_chunks(), layout.transform))
    return pa.table(cols)


VOCAB_FINGERPRINT = "vocab_fingerprint"  # schema.extra key: fingerprint of the vocabularies the ids come from


def vocab_fingerprint(vocab_dir: str | Path, names: list[str]) -> str:
    """Hash of the vocabulary files of ``names``: the same ids mean the same values exactly when it matches."""
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(name.encode() + b"\0")
        digest.update(hashlib.sha256((Path(vocab_dir) / f"{name}.parquet").read_bytes()).digest())
    return digest.hexdigest()[:32]


def id_fields(schema: Schema) -> list[str]:
    """Fields whose values are encoded through a vocabulary."""
    return [f.name for f in schema.fields if f.kind != "numeric"]


def check_vocabularies(vocab_dir: str | Path, schema: Schema, fix: str) -> None:
    """The vocabularies in ``vocab_dir`` are the ones the schema's model was trained with, or one clear error.

    A schema written by preparation records the vocabularies' fingerprint; an older one is checked by sizes."""
    vocab_dir = Path(vocab_dir)
    names = id_fields(schema)
    missing = [n for n in names if not (vocab_dir / f"{n}.parquet").is_file()]
    if missing:
        shown = missing if len(missing) <= 5 else missing[:5] + [f"... {len(missing) - 5} more"]
        raise DataError(f"vocabularies {shown} are missing from {vocab_dir}: {fix}")
    expected = schema.extra.get(VOCAB_FINGERPRINT)
    if expected:
        found = vocab_fingerprint(vocab_dir, names)
        if found != expected:
            raise DataError(f"the vocabularies in {vocab_dir} are not the ones the model was trained with "
                            f"(fingerprint {found} != {expected}; the dataset was prepared again or the files were "
                            f"replaced), so raw values would get other ids: {fix}")
        return
    sizes = {f.name: f.vocab_size for f in schema.fields if f.kind != "numeric"}
    wrong = [n for n in names if pq.ParquetFile(vocab_dir / f"{n}.parquet").metadata.num_rows + FIRST_VALUE_ID
             != sizes[n]]
    if wrong:
        raise DataError(f"the vocabularies {wrong[:5]} in {vocab_dir} do not have the sizes the model was trained "
                        f"with (the dataset was prepared again or the files were replaced): {fix}")


def load_vocabularies(vocab_dir: str | Path, names: list[str]) -> dict[str, pa.Array]:
    """The saved vocabularies (``vocab/<field>.parquet``, most frequent first) of the given fields."""
    vocab_dir = Path(vocab_dir)
    missing = [n for n in names if not (vocab_dir / f"{n}.parquet").exists()]
    if missing:
        raise DataError(f"vocabularies {missing} are missing from {vocab_dir}: export the model again with "
                        "lowrank-ctr-export (it copies vocab/ from the prepared dataset), or keep the prepared "
                        "dataset the checkpoint was trained on")
    return {n: pq.read_table(vocab_dir / f"{n}.parquet", columns=["value"]).column("value").combine_chunks()
            for n in names}
