"""What a dataset format declares: the one place the rest of the code asks about a raw format.

A format is a subclass of ``DatasetFormat`` registered by name (``@register``). Preparation, the cache key,
``lowrank-ctr-predict`` and ``lowrank-ctr-prepare raw_out=`` ask it, never an ``if format == ...`` chain:

- ``keys``: the data-config keys it reads, with their types (``validate`` checks them before any work);
- ``raw_columns`` / ``read``: the standard chunks of one raw file (``data/readers.py``), with the label optional for
  serving rows; the value ranges the format defines (labels, Avazu's hour, MovieLens ratings) are checked there, so
  preparation and prediction check them alike;
- ``cannot_predict``: why ``lowrank-ctr-predict`` cannot read its rows (None: it can);
- ``generate`` / ``write_raw``: for formats without raw files (the synthetic generator);
- ``example``: a tiny input of the format, which the contract test over every registered format prepares and
  predicts back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping

import numpy as np
import pyarrow as pa

from lowrank_ctr.data.errors import DataError
from lowrank_ctr.data.readers import BadRows, RawColumns

Config = Mapping[str, Any]


# Keys -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Key:
    """One data-config key: what its value must be (``check`` -> True if fine) and whether it must be set."""

    check: Callable[[Any], bool]
    expect: str  # "an integer >= 1", for messages
    required: bool = False
    help: str = ""  # how to set it, for "is not set" messages


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(minimum: int | None = None, *, optional: bool = False, required: bool = False, help: str = "") -> Key:
    expect = "an integer" + (f" >= {minimum}" if minimum is not None else "") + (" or null" if optional else "")
    return Key(lambda v: (optional and v is None) or (_is_int(v) and (minimum is None or v >= minimum)), expect,
               required, help)


def number(low: float | None = None, high: float | None = None, *, open_low: bool = False, open_high: bool = False,
           required: bool = False) -> Key:
    parts = ([f"{'>' if open_low else '>='} {low}"] if low is not None else []) + \
            ([f"{'<' if open_high else '<='} {high}"] if high is not None else [])

    def ok(v: Any) -> bool:
        if not _is_number(v):
            return False
        if low is not None and (v <= low if open_low else v < low):
            return False
        return high is None or (v < high if open_high else v <= high)

    return Key(ok, "a number" + (" " + " and ".join(parts) if parts else ""), required)


def choice(*options: Any, required: bool = False) -> Key:
    return Key(lambda v: v in options, "one of " + ", ".join(str(o) for o in options), required)


def text(*, optional: bool = False, required: bool = False, help: str = "") -> Key:
    return Key(lambda v: (optional and v is None) or (isinstance(v, str) and v != ""),
               "a non-empty string" + (" or null" if optional else ""), required, help)


def boolean() -> Key:
    return Key(lambda v: isinstance(v, bool), "true or false")


def paths(*, required: bool = False, help: str = "") -> Key:
    """A file path or a list of them (null: none)."""
    return Key(lambda v: v is None or (isinstance(v, str) and v != "")
               or (isinstance(v, (list, tuple)) and all(isinstance(p, str) and p for p in v)),
               "a file path, a list of file paths, or null", required, help)


def names(*, required: bool = False) -> Key:
    return Key(lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) and x for x in v),
               "a list of column names, e.g. [a,b]", required)


def scalars(*, non_empty: bool = False, required: bool = False, help: str = "") -> Key:
    return Key(lambda v: isinstance(v, (list, tuple)) and (len(v) > 0 or not non_empty)
               and all(isinstance(x, (str, int, float, bool)) for x in v),
               "a non-empty list of values, e.g. [1]" if non_empty else "a list of values", required, help)


IN_MEMORY = (False, "host", "device")  # data.in_memory: stream from parquet / whole splits in RAM / on the device

COMMON_KEYS: dict[str, Key] = {
    "name": text(required=True, help="data.name=NAME (names the prepared dataset)"),
    "format": text(required=True),
    "out_dir": text(required=True, help="data.out_dir=DIR (where the prepared dataset goes)"),
    "train_path": paths(help="data.train_path=/path/to/file"),
    "valid_path": paths(),
    "test_path": paths(),
    "split": Key(lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_number(x) and x >= 0 for x in v)
                 and abs(sum(v) - 1.0) <= 1e-6 and v[0] > 0,
                 "three non-negative fractions [train, valid, test] summing to 1 with train > 0"),
    "seed": integer(),
    "min_count": integer(1),
    "on_bad_rows": Key(lambda v: v in ("error", "skip"), "error or skip (missing is for lowrank-ctr-predict only: it "
                       "keeps rows whose label may be unusable)"),
    "numeric_mode": choice("dense", "bucketize"),
    "numeric_transform": choice("log", "none"),
    "multihot_max_len": integer(1, optional=True),
    "shard_rows": integer(1),
    "block_size": integer(1 << 10),
    "reuse_parsed_mb": integer(0),
    "compression": choice("snappy", "zstd", "gzip", "lz4", "brotli", "none"),
    # loader settings (read by the data module, not by preparation)
    "batch_size": integer(1),
    "eval_batch_size": integer(1, optional=True),
    "num_workers": integer(0),
    "shuffle_buffer": integer(0),
    "pin_memory": boolean(),
    "drop_last": boolean(),
    "persistent_workers": boolean(),
    "in_memory": Key(lambda v: v in IN_MEMORY, "false, host or device (where whole splits are held)"),
}


def as_list(value: Any) -> list[str]:
    """A path setting (one path, a list, or nothing) as a list of strings."""
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [str(x) for x in value]
    return [str(value)]


# Formats ----------------------------------------------------------------------------------------------------

class DatasetFormat:
    """A raw dataset format. Subclass, set ``name`` and ``keys``, implement ``raw_columns`` and ``read`` (or
    ``generate`` for a format without raw files), and decorate with ``@register``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    keys: ClassVar[dict[str, Key]] = {}  # the format's own data-config keys (COMMON_KEYS apply to every format)
    reads_files: ClassVar[bool] = True  # False: rows come from ``generate`` (no data.train_path)
    cannot_predict: ClassVar[str | None] = None  # why lowrank-ctr-predict cannot read its rows (None: it can)

    # Config ---------------------------------------------------------------------------------------------------
    def all_keys(self) -> dict[str, Key]:
        return {**COMMON_KEYS, **self.keys}

    def validate(self, cfg: Config) -> list[str]:
        """Every problem of a data config, one line each naming the key; override to add cross-key checks."""
        out = []
        for key, spec in self.all_keys().items():
            value = cfg.get(key)
            if value is None and spec.required:
                out.append(f"data.{key} is not set" + (f": set {spec.help}" if spec.help else ""))
            elif key in cfg and not spec.check(value):  # an explicit null is checked too: null is not 1
                out.append(f"data.{key}={_show(value)} must be {spec.expect}")
        if self.reads_files:
            if not as_list(cfg.get("train_path")):
                out.append(f"no data file given for data={cfg.get('name')}: set data.train_path=/path/to/file")
            if bool(as_list(cfg.get("valid_path"))) != bool(as_list(cfg.get("test_path"))):
                out.append("give both data.valid_path and data.test_path, or neither (then data.split splits the "
                           "train file)")
        return out

    def input_paths(self, cfg: Config) -> list[str]:
        """Every raw file the prepared dataset depends on (their size and mtime are part of the cache key)."""
        return as_list(cfg.get("train_path")) + as_list(cfg.get("valid_path")) + as_list(cfg.get("test_path"))

    # Reading --------------------------------------------------------------------------------------------------
    def raw_columns(self, cfg: Config) -> RawColumns:
        """The raw columns every chunk of this format has (label excluded)."""
        raise NotImplementedError

    def read(self, cfg: Config, path: str | Path, bad_rows: BadRows, *, label_optional: bool = False
             ) -> Iterator[pa.Table]:
        """Standard chunks of one raw file. ``label_optional``: a file without the label column is read as
        unlabeled (``lowrank-ctr-predict``); otherwise the label is required."""
        raise NotImplementedError(f"data.format={self.name} has no raw files to read")

    # Formats without raw files --------------------------------------------------------------------------------
    def generate(self, cfg: Config) -> Iterator[pa.Table]:
        """Standard chunks of the whole dataset, in row order (formats with ``reads_files = False``)."""
        raise NotImplementedError(f"data.format={self.name} reads raw files")

    def write_raw(self, cfg: Config, path: Path, select: Callable[[int], np.ndarray] | None, label: bool) -> int:
        """Write rows as a raw file that ``read`` accepts (for a generated dataset); returns the row count.
        ``select(n)`` gives a keep-mask for the next ``n`` rows (a split), None keeps every row."""
        raise DataError(f"data={cfg.get('name')} (format {self.name}) already has raw files "
                        f"({', '.join(self.input_paths(cfg)) or 'data.train_path'}): raw_out= writes rows only for "
                        "generated datasets (data=synthetic)")

    def summary_extra(self, cfg: Config, rows: dict[str, int]) -> dict[str, Any]:
        """Format-specific entries for summary.json (e.g. the synthetic teacher's AUC)."""
        return {}

    # Contract -------------------------------------------------------------------------------------------------
    def example(self, directory: Path) -> dict[str, Any]:
        """Write a tiny input of this format into ``directory`` and return a data config preparing it (min_count 1,
        every row in train): the contract test prepares it and predicts its rows back."""
        raise NotImplementedError


def _show(v: Any) -> str:
    return "null" if v is None else repr(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)
