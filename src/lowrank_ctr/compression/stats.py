"""Streaming calibration statistics of layer OUTPUTS (what AFM needs): count, sum y, sum y y^T in float64.

Collected by forward hooks while the caller's calibration batches run through the model, so any model works
without knowing about compression. For a ``FieldEmbedding`` the statistics are per field over the looked-up
vectors: frequent ids weigh more, naturally, and for (B, F, L) multi-hot ids the padding positions
(``PAD_ID``) are ignored. Under torch.distributed, ``all_reduce()`` sums the statistics of all ranks.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from lowrank_ctr.data.schema import PAD_ID
from lowrank_ctr.models.layers import FieldEmbedding


class OutputStats:
    """Sufficient statistics of ``groups`` independent streams of ``dim``-vectors (float64)."""

    def __init__(self, dim: int, groups: int = 1, device: torch.device | str | None = None) -> None:
        self.dim, self.groups = int(dim), int(groups)
        kw = {"dtype": torch.float64, "device": device}
        self.count = torch.zeros(self.groups, **kw)
        self.sum = torch.zeros(self.groups, self.dim, **kw)
        self.sumsq = torch.zeros(self.groups, self.dim, self.dim, **kw)

    @torch.no_grad()
    def update(self, y: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """y: (N, groups, dim); mask: (N, groups) of 0/1 (which vectors count)."""
        if self.count.device != y.device:
            self.count, self.sum, self.sumsq = (t.to(y.device) for t in (self.count, self.sum, self.sumsq))
        y = y.detach().to(torch.float64)
        if mask is None:
            self.count += y.shape[0]
            ym = y
        else:
            m = mask.to(torch.float64)
            self.count += m.sum(0)
            ym = y * m.unsqueeze(-1)
        self.sum += ym.sum(0)
        self.sumsq += torch.einsum("ngi,ngj->gij", ym, y)

    def all_reduce(self) -> "OutputStats":
        """Sum over torch.distributed ranks (no-op when not initialised)."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            for t in (self.count, self.sum, self.sumsq):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return self

    def _check(self) -> None:
        if bool((self.count <= 0).any()):
            empty = torch.nonzero(self.count <= 0).flatten().tolist()
            raise ValueError(f"no calibration vectors for group(s) {empty}: run more (non-empty) calibration batches")

    def mean(self) -> torch.Tensor:
        self._check()
        return (self.sum / self.count.unsqueeze(-1)).cpu()

    def covariance(self) -> torch.Tensor:
        """C = E[y y^T] - mu mu^T per group (population normalisation, 1/N): (groups, dim, dim)."""
        mu = self.mean()
        second = (self.sumsq / self.count.view(-1, 1, 1)).cpu()
        c = second - mu.unsqueeze(-1) * mu.unsqueeze(-2)
        return 0.5 * (c + c.transpose(-1, -2))

    def spectrum(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues descending (groups, dim) and eigenvectors as columns (groups, dim, dim), float64."""
        evals, evecs = torch.linalg.eigh(self.covariance())
        return evals.flip(-1).clamp_min(0.0), evecs.flip(-1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"count": self.count.cpu(), "sum": self.sum.cpu(), "sumsq": self.sumsq.cpu()}


def _hook_for(module: nn.Module, stats: OutputStats) -> Callable:
    if isinstance(module, FieldEmbedding):
        def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            ids = inputs[0]
            nf, d = output.shape[1], output.shape[-1]
            # (B, F, [L,] d) -> (N, F, d) with the field axis kept
            y = output.movedim(1, -2).reshape(-1, nf, d)
            mask = None
            if ids.dim() > 2:
                mask = (ids != PAD_ID).movedim(1, -1).reshape(-1, nf)
            stats.update(y, mask)
    else:
        def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            stats.update(output.reshape(-1, 1, output.shape[-1]))
    return hook


def new_stats(module: nn.Module) -> OutputStats:
    if isinstance(module, FieldEmbedding):
        return OutputStats(module.dim, module.num_fields)
    if isinstance(module, nn.Linear):
        return OutputStats(module.out_features, 1)
    raise TypeError(f"no output statistics for {type(module).__name__}; expected FieldEmbedding or nn.Linear")


def default_forward(model: nn.Module, batch: Any) -> Any:
    return model(batch)


@torch.no_grad()
def collect_output_stats(model: nn.Module, modules: Mapping[str, nn.Module], batches: Iterable[Any],
                         forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                         max_batches: int | None = None) -> tuple[dict[str, OutputStats], int]:
    """Run calibration batches once (eval mode, no grad) with hooks on all ``modules`` at the same time.

    Returns (name -> OutputStats, number of batches run). Statistics are all-reduced under torch.distributed.
    All statistics come from the ORIGINAL model: compressing layer 1 changes layer 2's inputs, which is
    ignored here (as in the paper); fine-tuning afterwards absorbs it.
    """
    forward_fn = forward_fn or default_forward
    stats = {name: new_stats(m) for name, m in modules.items()}
    handles = [m.register_forward_hook(_hook_for(m, stats[name])) for name, m in modules.items()]
    was_training = model.training
    model.eval()
    n = 0
    try:
        for batch in batches:
            if max_batches is not None and n >= max_batches:
                break
            forward_fn(model, batch)
            n += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n == 0:
        raise ValueError("calibration_batches is empty: AFM needs at least one batch of (training) data")
    for name, s in stats.items():
        s.all_reduce()
        if bool((s.count <= 0).all()):
            raise ValueError(f"layer {name!r} was never called during calibration: exclude it "
                             f"(exclude=[{name!r}]) or check forward_fn")
    return stats, n
