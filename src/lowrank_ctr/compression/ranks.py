"""Rank policies: fixed rank, ratio of full rank, energy threshold, and a global size budget.

* fixed ``int`` k: 1 <= k <= full rank (Linear: min(in, out); embedding: dim, capped per field at min(V_i, d)).
* ``float`` in (0, 1]: ratio of the full rank, k = max(1, round(ratio * full)).
* energy e in (0, 1]: the smallest k whose spectrum share (retained energy) is >= e (per field for embeddings).
* budget ``target_ratio`` N: the whole model must become N times smaller in bytes. Every targeted Linear starts at
  rank 1 and every embedding field at rank 0 (its mean); then one more component of some layer or field is bought
  at a time, the one with the largest gain per byte, until no further step fits. Gains come from an allocator:
  ``variance`` — each layer's spectrum normalised to sum 1 (layers of different output scale compare, but a
  low-variance field weighs as much as a dominant one); ``loss`` — the estimated loss increase of dropping the
  component (0.5 x eigenvalue x its Fisher weight u^T F u, F = E[g g^T] of the loss gradient at the layer's output;
  stats.py), one unit for embedding fields, first-order tables, MLP and other layers alike. Bytes follow the
  storage dtypes (int8 codes cost one byte). A Linear whose rank reaches the break-even point
  k >= in*out/(in+out) is kept dense (its last "step" buys the rest of its spectrum for the remaining bytes).

Low rank saves parameters only when k < in*out/(in+out) for a Linear (``linear_break_even``); for an
embedding a field saves V_i (d - k_i) values minus the shared (F, k_max, d) projection and (F, d) bias.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from lowrank_ctr.compression.modules import LowRankLinear

RankArg = int | float | None


def linear_break_even(in_features: int, out_features: int) -> int:
    """Largest rank that still saves parameters (0 when no rank does, e.g. an output Linear(d, 1))."""
    return (in_features * out_features - 1) // (in_features + out_features)


def _energy_rank(spectrum: torch.Tensor, energy: float) -> int:
    total = float(spectrum.sum())
    if total <= 0:
        return 1
    share = torch.cumsum(spectrum.double(), 0) / total
    hits = torch.nonzero(share >= energy - 1e-12).flatten()
    return int(hits[0]) + 1 if hits.numel() else int(spectrum.numel())


def _check_policy(rank: RankArg, energy: float | None, layer: str, group: str = "") -> None:
    if isinstance(rank, bool):
        raise ValueError(f"layer {layer!r}: rank {rank!r} must be an int (fixed rank) or a float ratio in (0, 1]")
    if isinstance(rank, float) and not 0.0 < rank <= 1.0:
        raise ValueError(f"layer {layer!r}: rank ratio {rank} is outside (0, 1]; for a fixed rank pass an int")
    if rank is None and energy is None:
        raise ValueError(f"layer {layer!r}: no rank policy; set {group or '<group>'}_rank, energy or target_ratio")
    if rank is None and energy is not None and not 0.0 < float(energy) <= 1.0:
        raise ValueError(f"energy {energy} is outside (0, 1]: it is the share of output variance to keep")


def resolve_linear_rank(layer: str, rank: RankArg, energy: float | None, full_rank: int,
                        spectrum: torch.Tensor | None = None, group: str = "") -> int:
    _check_policy(rank, energy, layer, group)
    if isinstance(rank, int):
        if not 1 <= rank <= full_rank:
            raise ValueError(f"layer {layer!r}: rank {rank} is outside the valid range 1..{full_rank} "
                             f"(min(in_features, out_features)); choose a rank in that range")
        return rank
    if isinstance(rank, float):
        return max(1, round(rank * full_rank))
    assert spectrum is not None, "energy policy needs the layer's spectrum"
    return min(_energy_rank(spectrum, float(energy)), full_rank)


def resolve_embedding_ranks(layer: str, rank: RankArg, energy: float | None, dim: int, full_ranks: Sequence[int],
                            spectra: Sequence[torch.Tensor] | None = None, group: str = "embedding") -> list[int]:
    _check_policy(rank, energy, layer, group)
    if isinstance(rank, int):
        # A dim-1 first-order table takes the embedding group's rank capped at 1 (it only changes storage).
        if not 1 <= rank <= (dim if dim > 1 else rank):
            raise ValueError(f"layer {layer!r}: rank {rank} is outside the valid range 1..{dim} (the embedding "
                             f"dim); choose a rank in that range")
        return [min(rank, f) for f in full_ranks]
    if isinstance(rank, float):
        return [max(1, min(f, round(rank * dim))) for f in full_ranks]
    assert spectra is not None, "energy policy needs the per-field spectra"
    return [min(_energy_rank(s, float(energy)), f) for s, f in zip(spectra, full_ranks)]


# ---------------------------------------------------------------------------------------------------------------
# Global budget
# ---------------------------------------------------------------------------------------------------------------
ALLOCATORS: tuple[str, ...] = ("variance", "loss")


@dataclass
class BudgetLayer:
    """One targeted layer as the budget allocator sees it.

    ``gains``: per field (embedding) or one entry (Linear), the worth of each further component, descending.
    ``bytes_of(ranks)``: bytes of the replacement at these per-field ranks (a one-element list for a Linear).
    ``dense_bytes``: bytes of the layer as it is; ``break_even``: for a Linear, the largest rank that still saves
    bytes (beyond it the layer stays dense); None for embeddings (every field may go up to its full rank).
    """

    name: str
    gains: list[torch.Tensor]
    bytes_of: Callable[[list[int]], int]
    dense_bytes: int
    min_ranks: list[int]
    break_even: int | None = None

    @property
    def is_linear(self) -> bool:
        return self.break_even is not None


def linear_budget_layer(name: str, gains: torch.Tensor, in_features: int, out_features: int, element_size: int,
                        bias: bool = True) -> BudgetLayer:
    dense = (in_features * out_features + (out_features if bias else 0)) * element_size
    return BudgetLayer(name, [gains], lambda r: LowRankLinear.num_params(in_features, out_features, r[0], True)
                       * element_size, dense, [1], linear_break_even(in_features, out_features))


class _Allocator:
    def __init__(self, layers: Sequence[BudgetLayer]) -> None:
        self.layers = list(layers)
        self.ranks: list[list[int]] = [list(l.min_ranks) for l in self.layers]
        self.units = [(li, fi) for li, l in enumerate(self.layers) for fi in range(len(l.gains))]

    def layer_bytes(self, li: int) -> int:
        l, r = self.layers[li], self.ranks[li]
        if l.is_linear and r[0] > l.break_even:
            return l.dense_bytes
        return min(l.bytes_of(r), l.dense_bytes)  # a replacement that is not smaller is not made

    def total(self) -> int:
        return sum(self.layer_bytes(i) for i in range(len(self.layers)))

    def next_step(self, unit: tuple[int, int]) -> tuple[float, int] | None:
        """(gain, byte cost) of raising this unit's rank by one, or None when it cannot or need not grow."""
        li, fi = unit
        l, r = self.layers[li], self.ranks[li]
        gains, k = l.gains[fi], r[fi]
        if l.is_linear:
            if k > l.break_even:
                return None
            gain = float(gains[k:].sum()) if k == l.break_even else float(gains[k]) if k < gains.numel() else 0.0
        else:
            if k >= gains.numel():
                return None
            gain = float(gains[k])
        if gain <= 0:
            return None  # nothing left to retain
        before = self.layer_bytes(li)
        r[fi] += 1
        cost = self.layer_bytes(li) - before
        r[fi] -= 1
        return gain, cost

    def run(self, budget: int) -> int:
        used = self.total()
        steps = {u: self.next_step(u) for u in self.units}
        while True:
            best, best_score = None, -1.0
            for u, st in steps.items():
                if st is None or st[1] > budget - used:
                    continue
                score = st[0] / max(st[1], 1)
                if score > best_score:
                    best, best_score = u, score
            if best is None:
                return used
            used += steps[best][1]
            li = best[0]
            self.ranks[li][best[1]] += 1
            for u in self.units:
                if u[0] == li:
                    steps[u] = self.next_step(u)


def minimum_bytes(layers: Sequence[BudgetLayer]) -> int:
    """Bytes of the targeted layers at their smallest ranks (what no budget can go below)."""
    return _Allocator(layers).total()


def allocate_budget(layers: Sequence[BudgetLayer], base_bytes: int, target_ratio: float,
                    fixed_parts: Mapping[str, int]) -> tuple[dict[str, int | list[int] | None], int]:
    """Ranks per layer so that the compressed model is <= base_bytes / target_ratio bytes.

    ``fixed_parts``: bytes of everything that is not compressed, by module name (for the error message).
    Returns ({name: rank (Linear; None = keep dense) or per-field ranks (embedding)}, predicted total bytes).
    """
    if not target_ratio or target_ratio <= 1.0:
        raise ValueError(f"target_ratio {target_ratio} must be > 1 (how many times smaller the model should be)")
    if not layers:
        raise ValueError(f"target_ratio {target_ratio}: no layer to compress; add target groups")
    budget = int(base_bytes / target_ratio)
    fixed = sum(fixed_parts.values())
    alloc = _Allocator(layers)
    minimum = fixed + alloc.total()
    if minimum > budget:
        raise ValueError(unreachable_message(target_ratio, base_bytes, budget, minimum,
                                             {f"{l.name!r} at its smallest ranks": alloc.layer_bytes(i)
                                              for i, l in enumerate(alloc.layers)}, fixed_parts))
    used = alloc.run(budget - fixed) + fixed
    out: dict[str, int | list[int] | None] = {}
    for l, r in zip(alloc.layers, alloc.ranks):
        out[l.name] = (None if r[0] > l.break_even else r[0]) if l.is_linear else list(r)
    return out, used


def unreachable_message(target_ratio: float, base_bytes: int, budget: int, minimum: int,
                        targets: Mapping[str, int], fixed_parts: Mapping[str, int]) -> str:
    parts = dict(targets)
    parts.update({f"{n or '<root>'!r} (not compressed)": b for n, b in fixed_parts.items()})
    largest = sorted(parts.items(), key=lambda kv: -kv[1])[:4]
    return (f"target_ratio {target_ratio} is unreachable: {base_bytes} bytes / {target_ratio} = {budget} bytes, but "
            f"at the smallest ranks the model still needs {minimum} bytes (ratio {base_bytes / minimum:.2f}). "
            f"Largest parts: " + ", ".join(f"{n}: {b} B" for n, b in largest)
            + ". Lower target_ratio, add target groups (e.g. 'other'), set compression.code_dtype=int8, or shrink "
              "the uncompressed parts.")
