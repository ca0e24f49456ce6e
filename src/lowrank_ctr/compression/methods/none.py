"""none: no compression (the base model only); registered so configs, validation and reports treat it uniformly."""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

from lowrank_ctr.compression.methods import register_method
from lowrank_ctr.compression.methods.base import CompressionMethod


@register_method
class NoCompression(CompressionMethod):
    name: ClassVar[str] = "none"
    label: ClassVar[str] = "base"
    color: ClassVar[str] = "#555555"
    groups: ClassVar[tuple[str, ...]] = ()

    def setting(self, policy: Mapping[str, Any], ranks: str) -> str:
        return ""
