"""Size accounting: parameters and bytes of everything a model needs at inference, per group and in total.

Counted: parameters and persistent buffers (what ``state_dict`` saves), each tensor once, at its own dtype's
element size (int8 = 1 byte, fp16 = 2, fp32 = 4). Non-persistent buffers (offsets, index helpers) are derived
from constructor arguments and are not counted. Groups: ``embedding`` (every FieldEmbedding and compressed
replacement, including dim-1 linear-term tables), ``mlp``, ``other`` (other linears) and ``rest`` (everything
else: batch norms, FM / cross weights that are not Linear, output biases, ...).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from lowrank_ctr.compression.targets import module_groups

SIZE_GROUPS: tuple[str, ...] = ("embedding", "mlp", "other", "rest")


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Unique parameters and persistent buffers by dotted name (shared tensors counted once)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in module.state_dict(keep_vars=True).items():
        if not isinstance(t, torch.Tensor):
            continue
        key = id(t)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def module_size(module: nn.Module) -> tuple[int, int]:
    """(number of stored values, bytes) of one module."""
    ts = _tensors(module).values()
    return sum(t.numel() for t in ts), sum(t.numel() * t.element_size() for t in ts)


def model_size(model: nn.Module, groups: Mapping[str, str] | None = None) -> dict[str, dict[str, int]]:
    """{group: {"params": n, "bytes": b}} for SIZE_GROUPS and "total".

    ``groups`` maps module names to groups (default: ``module_groups(model)``); a tensor belongs to the
    longest module name that prefixes it.
    """
    groups = dict(module_groups(model) if groups is None else groups)
    out = {g: {"params": 0, "bytes": 0} for g in SIZE_GROUPS + ("total",)}
    for name, t in _tensors(model).items():
        owner = name
        group = "rest"
        while owner:
            owner = owner.rpartition(".")[0]
            if owner in groups:
                group = groups[owner]
                break
        for g in (group, "total"):
            out[g]["params"] += t.numel()
            out[g]["bytes"] += t.numel() * t.element_size()
    return out


def compression_ratio(base_bytes: int, compressed_bytes: int) -> float:
    return float(base_bytes) / float(compressed_bytes) if compressed_bytes else float("inf")
