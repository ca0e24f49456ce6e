"""What a compression method is: one class per method, declaring everything the rest of the code asks about it.

A method builds the replacement of one target layer (``embedding`` for a ``FieldEmbedding``, ``linear`` for an
``nn.Linear``) and says which target groups it handles by default, whether rank policies (fixed / ratio / energy /
global budget) apply, whether it needs calibration data, which module classes it produces (so a spec rebuilds
them), which extra config keys it reads, how it is named and coloured in reports, and what its config must satisfy.
``methods/__init__.py`` keeps the registry; adding a method is one file here plus one ``conf/compression/*.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from lowrank_ctr.compression.size import module_size
from lowrank_ctr.compression.stats import OutputStats

Info = dict[str, Any]
#: a check of one method-specific config value: None if fine, else what the value must be
OptionCheck = Callable[[Any], "str | None"]


@dataclass
class LayerContext:
    """What a method gets besides the layer and its rank.

    ``stats``: calibration statistics of the layer's outputs (OutputStats, per field for embeddings) when the
    method needs calibration. ``order``: per field (embeddings) or one entry (linear), the order in which the
    components of the output basis are kept (None: by eigenvalue, descending) — the loss-aware allocator keeps
    the components with the largest estimated loss impact. ``code_dtype``: storage of low-rank embedding codes.
    ``options``: the method's own config keys (``CompressionMethod.options``). ``weight`` / ``bias``: the Linear's
    parameters to compress when they differ from the module's own (a least-squares correction refit them).
    """

    stats: OutputStats | None = None
    order: list[torch.Tensor] | None = None
    code_dtype: str = "float32"
    options: Mapping[str, Any] = field(default_factory=dict)
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


def place(new: nn.Module, like: torch.Tensor) -> nn.Module:
    """Move a replacement to the device of the layer it replaces, keeping non-float storage (int8 codes) as is."""
    new = new.to(device=like.device)
    for p in new.parameters():
        if p.is_floating_point():
            p.data = p.data.to(like.dtype)
    return new


def layer_info(method: str, old: nn.Module, new: nn.Module, rank: Any, full_rank: Any, retained: float | None,
               **extra: Any) -> Info:
    """The report entry of one replaced layer (sizes measured on the modules themselves)."""
    pb, bb = module_size(old)
    pa, ba = module_size(new)
    return {"method": method, "rank": rank, "full_rank": full_rank,
            "retained_energy": None if retained is None else float(retained),
            "params_before": pb, "params_after": pa, "bytes_before": bb, "bytes_after": ba, **extra}


class CompressionMethod:
    """Base class of a compression method; subclasses set the class attributes and override the builders."""

    name: ClassVar[str] = ""
    #: how reports and plots name it, and its colour there (one colour per method, everywhere)
    label: ClassVar[str] = ""
    color: ClassVar[str] = "#7f7f7f"
    #: target groups used when ``compression.targets`` is null, and the groups it can compress at all
    default_targets: ClassVar[tuple[str, ...]] = ()
    groups: ClassVar[tuple[str, ...]] = ("embedding", "mlp", "other")
    #: rank policies (fixed rank, ratio, energy, target_ratio budget) choose its ranks
    low_rank: ClassVar[bool] = False
    #: compresses the dim-1 first-order (linear-term) tables too (low-rank methods: int8 codes or rank 0)
    first_order: ClassVar[bool] = False
    #: needs calibration batches run through the model (output statistics)
    needs_calibration: ClassVar[bool] = False
    #: can build its structure with random initialisation (``compression.from_scratch``: TT-Rec protocol)
    from_scratch: ClassVar[bool] = False
    #: the module classes it produces (by class name in a compression spec)
    module_types: ClassVar[tuple[type[nn.Module], ...]] = ()
    #: its own config keys (conf/compression/<name>.yaml) and how each is checked
    options: ClassVar[dict[str, OptionCheck]] = {}
    #: what ``compression.embedding_rank`` means for it (error messages, README)
    rank_meaning: ClassVar[str] = "the rank"

    def targets_for(self, target_ratio: float | None) -> tuple[str, ...]:
        """The groups compressed when ``compression.targets`` is null: a whole-model size budget spends over every
        group the method can compress (the allocator decides where bytes go); fixed ranks apply to the default
        groups, so a rank per group is all a user sets."""
        return tuple(self.groups) if self.low_rank and target_ratio is not None else tuple(self.default_targets)

    # Builders ------------------------------------------------------------------------------------------------
    def embedding(self, emb: nn.Module, rank: Any, ctx: LayerContext) -> tuple[nn.Module, Info]:
        raise NotImplementedError(f"{self.name} does not compress embeddings")

    def linear(self, linear: nn.Linear, rank: Any, ctx: LayerContext) -> tuple[nn.Module, Info]:
        raise NotImplementedError(f"{self.name} does not compress Linear layers")

    def scratch_embedding(self, emb: nn.Module, rank: Any, ctx: LayerContext) -> nn.Module:
        """The compressed structure with random initialisation (for ``from_scratch``)."""
        raise NotImplementedError(f"{self.name} cannot be trained from scratch")

    def fixed_rank(self, group: str, rank: Any) -> Any:
        """The rank argument of a method without rank policies, from the group's ``<group>_rank`` config value."""
        return None

    # Config ----------------------------------------------------------------------------------------------------
    def problems(self, comp: Mapping[str, Any]) -> list[str]:
        """Method-specific contradictions in a ``compression`` config (one line each, naming the key)."""
        return []

    def setting(self, policy: Mapping[str, Any], ranks: str) -> str:
        """The report's short description of a run's setting (what distinguishes runs of this method)."""
        if policy.get("target_ratio") is not None:
            return f"target_ratio={policy['target_ratio']:g}"
        return ranks

    def __repr__(self) -> str:
        return f"<compression method {self.name}>"
