"""Registration by file: import every module of a package so each file's ``@register...`` decorator runs.

The model zoo, the compression methods and the dataset formats are registries filled this way: a new entry is one
file dropped into the package, with no list to edit anywhere.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Iterable, Sequence


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
