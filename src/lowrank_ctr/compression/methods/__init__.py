"""The registry of compression methods: ``compression.method=NAME`` looks a method up here.

Each method is one file in this package that defines a ``CompressionMethod`` subclass (and the module classes it
produces) and registers an instance with ``@register_method``; its config is ``conf/compression/NAME.yaml``.
Everything else — validation, target defaults, rank policies, spec rebuilding, report names and colours — asks the
registry, so a new method touches no other file.
"""

from __future__ import annotations

from typing import TypeVar

from torch import nn

from lowrank_ctr.compression.methods.base import CompressionMethod, Info, LayerContext
from lowrank_ctr.plugins import import_package_modules, register_entry

METHODS: dict[str, CompressionMethod] = {}

C = TypeVar("C", bound=type[CompressionMethod])


def register_method(cls: C) -> C:
    """Class decorator: register one instance of a method under its ``name`` (registration order = report order)."""
    register_entry(METHODS, cls.name, cls(), "compression method")
    return cls


def get_method(name: str) -> CompressionMethod:
    if name not in METHODS:
        raise ValueError(f"unknown compression method {name!r}; known methods: {list(METHODS)}")
    return METHODS[name]


def method_parts(name: str) -> list[str]:
    """The methods a run's method name combines: ``"tt+afm"`` (``compression.mlp_method``) -> ["tt", "afm"]."""
    return str(name).split("+")


def method_names() -> list[str]:
    """Registered methods in registration order (the order of reports and plots)."""
    return list(METHODS)


def module_types() -> dict[str, type[nn.Module]]:
    """Every compressed module class any method produces, by class name (what a spec's "class" refers to)."""
    from lowrank_ctr.compression.fold import FieldFoldedLinear
    from lowrank_ctr.compression.modules import MODULE_TYPES

    out = dict(MODULE_TYPES)
    out[FieldFoldedLinear.__name__] = FieldFoldedLinear
    for m in METHODS.values():
        out.update({c.__name__: c for c in m.module_types})
    return out


# the built-in methods first, in the order of reports; then any other file dropped here (all a new method needs)
import_package_modules(__name__, __path__, skip=("base", "lowrank"), first=("none", "svd", "afm", "tt", "int8", "qr"))

__all__ = ["METHODS", "CompressionMethod", "Info", "LayerContext", "get_method", "method_names", "method_parts",
           "module_types", "register_method"]
