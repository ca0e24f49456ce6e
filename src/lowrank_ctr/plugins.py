"""Registration by file: import every module of a package so each file's ``@register...`` decorator runs.

The model zoo, the compression methods and the dataset formats are registries filled this way: a new entry is one
file dropped into the package, with no list to edit anywhere.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Iterable, Sequence, TypeVar


def import_package_modules(package: str, path: Iterable[str], skip: Sequence[str] = (),
                           first: Sequence[str] = ()) -> list[str]:
    """Import ``first`` (in that order: it fixes registration order, e.g. of reports), then every other module of
    ``package`` (``path`` is its ``__path__``) in name order, except ``skip`` (shared helpers, not entries).
    Returns the module names imported."""
    found = {m.name for m in pkgutil.iter_modules(list(path))}
    missing = [name for name in first if name not in found]
    if missing:
        raise ImportError(f"{package}: modules {missing} listed first are not in the package")
    names = list(first) + sorted(found - set(first) - set(skip))
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names


E = TypeVar("E")


def register_entry(registry: dict[str, E], name: str, entry: E, kind: str) -> E:
    """Put ``entry`` (a class, or an instance of one) in ``registry`` under ``name``. Registering the same class
    again is a no-op (a module imported twice); another class under a taken name is an error naming both."""
    if not name:
        raise TypeError(f"{_origin(entry).__name__}: a {kind} needs a name")
    old = registry.get(name)
    if old is not None and _origin(old) is not _origin(entry):
        raise TypeError(f"{kind} {name!r} is registered twice ({_origin(old).__name__}, {_origin(entry).__name__}): "
                        "rename one")
    if old is None:
        registry[name] = entry
    return registry[name]


def _origin(entry: object) -> type:
    return entry if isinstance(entry, type) else type(entry)
