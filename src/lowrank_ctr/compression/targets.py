"""Which modules to compress, found by type and dotted name on ANY model (one mechanism for every model).

Groups:
    embedding  every ``FieldEmbedding`` with dim > 1, and the dim-1 first-order (linear-term) tables for methods
               that compress them (svd / afm: int8 codes or rank 0)
    mlp        every ``nn.Linear`` inside an ``MLP`` (models/layers.py)
    other      every other ``nn.Linear`` (cross networks, attention projections, gates, ...)
``include`` / ``exclude`` are fnmatch globs on dotted module names ("mlp.net.*", "*.attention.*").
Linears owned by ``nn.MultiheadAttention`` are never targets: it reads ``out_proj.weight`` directly instead of
calling the module, so a replacement would be ignored or break it.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Iterable, Sequence

from torch import nn

from lowrank_ctr.models.layers import MLP, FieldEmbedding

GROUPS: tuple[str, ...] = ("embedding", "mlp", "other")


@dataclass
class Target:
    name: str
    group: str
    module: nn.Module


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"model has no module named {name!r}") from None


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (works inside Sequential / ModuleList / ModuleDict too).

    A module registered under several names (shared between branches) is replaced under all of them, so no
    branch keeps the old layer.
    """
    old = get_module(model, name)
    aliases = [n for n, m in model.named_modules(remove_duplicate=False) if m is old and n] or [name]
    for alias in aliases:
        parent_name, _, attr = alias.rpartition(".")
        parent = get_module(model, parent_name) if parent_name else model
        if attr not in parent._modules:
            raise ValueError(f"model has no module named {alias!r}")
        setattr(parent, attr, new)


def module_groups(model: nn.Module) -> dict[str, str]:
    """Dotted name -> group for every embedding / linear module, original or already compressed.

    Compressed modules (classes that declare ``replaces``) are leaves here (their inner ``nn.Linear`` parts belong
    to them), and a compressed linear is "mlp" when it sits inside an ``MLP`` just like the Linear it replaced.
    """
    groups: dict[str, str] = {}
    mlp_prefixes: list[str] = []
    leaf_prefixes: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in leaf_prefixes):
            continue
        if isinstance(m, MLP):
            mlp_prefixes.append(name)
        if isinstance(m, nn.MultiheadAttention):
            leaf_prefixes.append(name)
            continue
        replaces = getattr(type(m), "replaces", None)
        if isinstance(m, FieldEmbedding) or replaces == "embedding":
            groups[name] = "embedding"
            leaf_prefixes.append(name)
        elif isinstance(m, nn.Linear) or replaces == "linear":
            inside_mlp = any(p == "" or name.startswith(p + ".") for p in mlp_prefixes)
            groups[name] = "mlp" if inside_mlp else "other"
            leaf_prefixes.append(name)
    return groups


def find_targets(model: nn.Module, groups: Iterable[str] = ("embedding", "mlp"), include: Sequence[str] = (),
                 exclude: Sequence[str] = (), first_order: bool = False) -> list[Target]:
    """Uncompressed modules of the requested groups, filtered by include / exclude globs, in model order.

    ``first_order``: include the dim-1 (linear-term) tables in the embedding group.
    """
    groups = tuple(groups)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"unknown target group(s) {unknown}; choose from {list(GROUPS)}")
    found: list[Target] = []
    for name, group in module_groups(model).items():
        m = get_module(model, name)
        if group not in groups or not isinstance(m, (FieldEmbedding, nn.Linear)):
            continue  # already compressed, or not asked for
        if isinstance(m, FieldEmbedding) and m.dim <= 1 and not first_order:
            continue  # linear-term table: this method has nothing for it
        found.append(Target(name, group, m))
    for pattern in include:
        if not any(fnmatch(t.name, pattern) for t in found):
            raise ValueError(f"include pattern {pattern!r} matches no target of groups {list(groups)}; "
                             f"candidates: {[t.name for t in found]}")
    if include:
        found = [t for t in found if any(fnmatch(t.name, p) for p in include)]
    found = [t for t in found if not any(fnmatch(t.name, p) for p in exclude)]
    return found
