"""Dataset schema: the one description of a prepared dataset that models are built from.

A schema is saved as ``schema.json`` beside the encoded shards, so a trained model can be rebuilt from the
prepared data alone (and a checkpoint can be checked against the data it is asked to run on).

Id conventions for categorical and multi-hot fields (per field, local ids):
    0 = padding (only appears in multi-hot lists; never a real value)
    1 = out-of-vocabulary (unseen value, or seen fewer than ``min_count`` times in train)
    2.. = known values, most frequent first

Batches produced by the data modules are dicts of tensors::

    {"cat":    int64   (B, n_categorical),
     "num":    float32 (B, n_numeric),
     "multi":  int64   (B, n_multihot, max_len)  (padded with 0),
     "label":  float32 (B,),
     "row_id": int64   (B,)}

Every key is always present (zero-width tensors when a dataset has no field of that kind), so a model
never branches on the dataset kind.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

PAD_ID = 0
OOV_ID = 1
FIRST_VALUE_ID = 2

FieldKind = Literal["categorical", "numeric", "multihot"]
FIELD_KINDS: tuple[str, ...] = ("categorical", "numeric", "multihot")
SCHEMA_FILE = "schema.json"


@dataclass(frozen=True)
class FieldSpec:
    """One input field. ``vocab_size`` counts every id including padding and OOV."""

    name: str
    kind: FieldKind
    vocab_size: int = 0
    max_len: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FIELD_KINDS:
            raise ValueError(f"field {self.name!r}: kind {self.kind!r} is not one of {FIELD_KINDS}")
        if self.kind != "numeric" and self.vocab_size < FIRST_VALUE_ID:
            raise ValueError(
                f"field {self.name!r}: vocab_size {self.vocab_size} must be >= {FIRST_VALUE_ID} "
                "(padding and OOV ids are always reserved)"
            )
        if self.kind == "multihot" and self.max_len < 1:
            raise ValueError(f"multi-hot field {self.name!r} needs max_len >= 1")


@dataclass
class Schema:
    """Fields of a prepared dataset, in the column order used by batches."""

    name: str
    fields: list[FieldSpec]
    label: str = "label"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.fields = [f if isinstance(f, FieldSpec) else FieldSpec(**f) for f in self.fields]
        names = [f.name for f in self.fields]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"schema {self.name!r}: duplicate field names {dupes}")
        if not self.fields:
            raise ValueError(f"schema {self.name!r} has no fields: list at least one categorical or numeric column")

    # Field groups in batch order -------------------------------------------------------------
    def of_kind(self, kind: FieldKind) -> list[FieldSpec]:
        return [f for f in self.fields if f.kind == kind]

    @property
    def categorical(self) -> list[FieldSpec]:
        return self.of_kind("categorical")

    @property
    def numeric(self) -> list[FieldSpec]:
        return self.of_kind("numeric")

    @property
    def multihot(self) -> list[FieldSpec]:
        return self.of_kind("multihot")

    @property
    def multihot_max_len(self) -> int:
        """Width of the padded ``multi`` batch tensor (1 when there is no multi-hot field)."""
        return max((f.max_len for f in self.multihot), default=1)

    @property
    def sparse_vocab_sizes(self) -> list[int]:
        """Vocabulary sizes of all id-valued fields: categorical first, then multi-hot (embedding order)."""
        return [f.vocab_size for f in self.categorical] + [f.vocab_size for f in self.multihot]

    @property
    def num_fields(self) -> int:
        return len(self.fields)

    # Persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"name": self.name, "label": self.label, "fields": [asdict(f) for f in self.fields], "extra": self.extra}

    @classmethod
    def from_dict(cls, d: dict) -> "Schema":
        return cls(name=d["name"], fields=[FieldSpec(**f) for f in d["fields"]], label=d.get("label", "label"),
                   extra=d.get("extra", {}))

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / SCHEMA_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Schema":
        path = Path(path)
        if path.is_dir():
            path = path / SCHEMA_FILE
        if not path.exists():
            raise FileNotFoundError(
                f"no dataset schema at {path}: prepare the dataset first (lowrank-ctr-prepare data=NAME)"
            )
        return cls.from_dict(json.loads(path.read_text()))

    def signature(self) -> dict:
        """What a trained model depends on: field names, kinds and sizes (used to refuse a mismatched checkpoint)."""
        return {"fields": [[f.name, f.kind, f.vocab_size, f.max_len] for f in self.fields]}
