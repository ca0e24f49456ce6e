"""The registry of raw dataset formats: one file per format in this package, registered by name.

``get_format(name)`` is what preparation, the cache key and ``lowrank-ctr-predict`` ask; adding a format is one
file here (a ``DatasetFormat`` subclass decorated with ``@register``) plus one ``conf/data/NAME.yaml``. Every module
of this package is imported on first use, so a new file needs no other edit.
"""

from __future__ import annotations

from typing import Any, Mapping, TypeVar

from lowrank_ctr.data.errors import DataError
from lowrank_ctr.data.formats.base import COMMON_KEYS, DatasetFormat, Key, as_list
from lowrank_ctr.plugins import import_package_modules, register_entry

REGISTRY: dict[str, DatasetFormat] = {}
F = TypeVar("F", bound=type[DatasetFormat])


def register(cls: F) -> F:
    """Class decorator: make a format known under ``cls.name``."""
    clash = sorted(set(cls.keys) & set(COMMON_KEYS))
    if clash:
        raise TypeError(f"{cls.__name__} redefines the common data keys {clash} (formats/base.py COMMON_KEYS)")
    register_entry(REGISTRY, cls.name, cls(), "dataset format")
    return cls


def registered() -> dict[str, DatasetFormat]:
    """Every known format by name."""
    return dict(REGISTRY)


def get_format(name: Any) -> DatasetFormat:
    if name not in REGISTRY:
        raise DataError(f"data.format={name!r} is not known; use one of {sorted(REGISTRY)} (a new format is one file "
                        "in src/lowrank_ctr/data/formats/)")
    return REGISTRY[name]


def check_config(cfg: Mapping[str, Any]) -> DatasetFormat:
    """The format of a data config, after checking every key it reads; all problems in one error."""
    fmt = get_format(cfg.get("format"))
    found = fmt.validate(cfg)
    if len(found) == 1:
        raise DataError(f"data config: {found[0]}")
    if found:
        raise DataError(f"data config has {len(found)} problems: " + "; ".join(found))
    return fmt


import_package_modules(__name__, __path__, skip=("base",))

__all__ = ["REGISTRY", "COMMON_KEYS", "DatasetFormat", "Key", "as_list", "check_config", "get_format", "register",
           "registered"]
