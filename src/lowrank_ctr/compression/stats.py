"""Streaming calibration statistics of layer OUTPUTS (what AFM needs): count, sum y, sum y y^T in float64.

Collected by forward hooks while the caller's calibration batches run through the model, so any model works
without knowing about compression. For a ``FieldEmbedding`` the statistics are per field over the looked-up
vectors: frequent ids weigh more, naturally, and for (B, F, L) multi-hot ids the padding positions
(``PAD_ID``) are ignored. Under torch.distributed, ``all_reduce()`` sums the statistics of all ranks.

With ``gradients=True`` (the loss-aware budget) the same pass also runs backward through the calibration loss and
accumulates the second moment of the per-sample loss gradient at each output, F = E[g g^T] (the empirical Fisher,
a Gauss-Newton proxy of the loss Hessian there): dropping an output component u with variance lam then costs about
0.5 * lam * u^T F u in loss (``component_loss``), a unit in which layers of any kind compare.
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
        self.grad_count = torch.zeros(self.groups, **kw)
        self.grad_sq = torch.zeros(self.groups, self.dim, self.dim, **kw)

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

    @torch.no_grad()
    def update_gradients(self, g: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """g: (N, groups, dim) per-sample loss gradients at the output; mask as in ``update``."""
        if self.grad_sq.device != g.device:
            self.grad_count, self.grad_sq = self.grad_count.to(g.device), self.grad_sq.to(g.device)
        g = g.detach().to(torch.float64)
        if mask is not None:
            m = mask.to(torch.float64)
            self.grad_count += m.sum(0)
            g = g * m.unsqueeze(-1)
        else:
            self.grad_count += g.shape[0]
        self.grad_sq += torch.einsum("ngi,ngj->gij", g, g)

    def all_reduce(self) -> "OutputStats":
        """Sum over torch.distributed ranks (no-op when not initialised)."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            for t in (self.count, self.sum, self.sumsq, self.grad_count, self.grad_sq):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return self

    @property
    def has_gradients(self) -> bool:
        return bool((self.grad_count > 0).all())

    def fisher(self) -> torch.Tensor:
        """F = E[g g^T] per group (groups, dim, dim), float64 on CPU."""
        if not self.has_gradients:
            raise ValueError("no gradient statistics: collect them with gradients=True (allocator=loss)")
        return (self.grad_sq / self.grad_count.view(-1, 1, 1)).cpu()

    def component_loss(self) -> torch.Tensor:
        """Estimated loss increase of dropping each eigen-component, 0.5 * lam_j * u_j^T F u_j: (groups, dim),
        in the order of ``spectrum()`` (eigenvalues descending)."""
        evals, evecs = self.spectrum()
        weight = torch.einsum("gik,gij,gjk->gk", evecs, self.fisher(), evecs)  # u_k^T F u_k per component k
        return 0.5 * evals * weight.clamp_min(0.0)

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
        return {"count": self.count.cpu(), "sum": self.sum.cpu(), "sumsq": self.sumsq.cpu(),
                "grad_count": self.grad_count.cpu(), "grad_sq": self.grad_sq.cpu()}

    @classmethod
    def from_moments(cls, mean: torch.Tensor, covariance: torch.Tensor, count: float) -> "OutputStats":
        """Statistics of one group with the given mean (dim,) and covariance (dim, dim) over ``count`` vectors (e.g.
        the outputs W x + b of a Linear, derived from the moments of its inputs)."""
        s = cls(mean.shape[0], 1)
        mean, covariance = mean.to(torch.float64).cpu(), covariance.to(torch.float64).cpu()
        s.count[0] = count
        s.sum[0] = mean * count
        s.sumsq[0] = (covariance + torch.outer(mean, mean)) * count
        return s


def _as_groups(module: nn.Module, ids: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A layer's output (or its gradient) as (N, groups, dim) vectors plus the mask of the ones that count."""
    if isinstance(module, FieldEmbedding):
        nf, d = t.shape[1], t.shape[-1]
        # (B, F, [L,] d) -> (N, F, d) with the field axis kept
        mask = (ids != PAD_ID).movedim(1, -1).reshape(-1, nf) if ids.dim() > 2 else None
        return t.movedim(1, -2).reshape(-1, nf, d), mask
    return t.reshape(-1, 1, t.shape[-1]), None


def _hook_for(module: nn.Module, stats: OutputStats, gradients: bool = False) -> Callable:
    def hook(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        y, mask = _as_groups(mod, inputs[0], output)
        stats.update(y, mask)
        if not gradients:
            return None
        # Parameters are frozen during the pass: the first hooked output is a leaf without history, made to need a
        # gradient here; later ones need it through their inputs. Not detached, so gradients reach every layer.
        if not output.requires_grad:
            output.requires_grad_(True)
        batch = output.shape[0]
        # d(mean loss)/dy = g_i / B for sample i: scale back to per-sample gradients
        output.register_hook(lambda g: stats.update_gradients(*_as_groups(mod, inputs[0], g * batch)))
        return None
    return hook


def new_stats(module: nn.Module) -> OutputStats:
    if isinstance(module, FieldEmbedding):
        return OutputStats(module.dim, module.num_fields)
    if isinstance(module, nn.Linear):
        return OutputStats(module.out_features, 1)
    raise TypeError(f"no output statistics for {type(module).__name__}; expected FieldEmbedding or nn.Linear")


def default_forward(model: nn.Module, batch: Any) -> Any:
    return model(batch)


def calibration_loss(logits: torch.Tensor, batch: Any) -> torch.Tensor:
    """Mean BCE of logits against the batch's labels (what the loss-aware statistics differentiate)."""
    return nn.functional.binary_cross_entropy_with_logits(logits.float(), batch["label"].float())


def collect_output_stats(model: nn.Module, modules: Mapping[str, nn.Module], batches: Iterable[Any],
                         forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                         max_batches: int | None = None, gradients: bool = False
                         ) -> tuple[dict[str, OutputStats], int]:
    """Run calibration batches once (eval mode) with hooks on all ``modules`` at the same time.

    Returns (name -> OutputStats, number of batches run). Statistics are all-reduced under torch.distributed.
    These statistics come from the ORIGINAL model (one-shot calibration, as in the paper); sequential calibration
    (calibrate.py) re-measures each layer after its upstream is compressed. ``gradients``: also backward through
    ``calibration_loss`` to accumulate the per-output Fisher (parameters are frozen meanwhile, so no parameter
    gradient is computed or left behind).
    """
    forward_fn = forward_fn or default_forward
    stats = {name: new_stats(m) for name, m in modules.items()}
    handles = [m.register_forward_hook(_hook_for(m, stats[name], gradients)) for name, m in modules.items()]
    was_training = model.training
    frozen = [p for p in model.parameters() if p.requires_grad] if gradients else []
    for p in frozen:
        p.requires_grad_(False)
    model.eval()
    n = 0
    try:
        for batch in batches:
            if max_batches is not None and n >= max_batches:
                break
            if gradients:
                with torch.enable_grad():
                    logits = forward_fn(model, batch)
                    if logits.requires_grad:
                        calibration_loss(logits, batch).backward()
            else:
                with torch.no_grad():
                    forward_fn(model, batch)
            n += 1
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    if n == 0:
        raise ValueError("calibration_batches is empty: AFM needs at least one batch of (training) data")
    for name, s in stats.items():
        s.all_reduce()
        if bool((s.count <= 0).all()):
            raise ValueError(f"layer {name!r} was never called during calibration: exclude it "
                             f"(exclude=[{name!r}]) or check forward_fn")
    return stats, n
