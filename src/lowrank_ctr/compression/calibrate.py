"""Sequential calibration and the least-squares correction (cf. SVD-LLM's sequential update, data-aware SVD).

One-shot calibration (stats.py) measures every layer on the ORIGINAL model, so a layer is compressed for inputs
it will no longer see once its upstream is compressed. Here layers are handled in forward order: for a Linear
(W, b), the calibration batches run through the partly COMPRESSED model (its input x~) and through the ORIGINAL
model (its target output y = W x + b), side by side. From float64 moments of (x~, y):

    correction=lstsq:       W' = C_yx~ (C_x~x~ + lambda I)^-1,  b' = mu_y - W' mu_x~   (centred moments)

so the layer maps what it now receives to what the original produced; then a low-rank target is compressed from
the refit layer: its output statistics are those of W' x~ + b' (mean mu_y, covariance W' C_x~x~ W'^T), and AFM's
top-k eigenvectors U_k give the reduced-rank regression W'_k = U_k U_k^T W' (the best rank-k map from x~ to y).
Without correction (calibration=sequential) the statistics are those of W x~ + b on the compressed upstream.
lambda = ``RIDGE`` x the mean input variance (dead ReLU units make C_x~x~ singular).

Cost: one pass over the calibration batches per Linear, each stopped right after that layer (a forward hook
raises), for the compressed and the original model.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from lowrank_ctr.compression.stats import OutputStats, default_forward

RIDGE = 1e-4


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has run."""


def forward_order(model: nn.Module, names: Iterable[str], batch: Any,
                  forward_fn: Callable[[nn.Module, Any], Any] | None = None) -> list[str]:
    """``names`` in the order their modules are first called in a forward pass (modules never called last)."""
    names = list(names)
    order: list[str] = []
    handles = [model.get_submodule(n).register_forward_hook(
        lambda _m, _i, _o, n=n: order.append(n) if n not in order else None) for n in names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            (forward_fn or default_forward)(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return order + [n for n in names if n not in order]


class LinearMoments:
    """Float64 sums of a Linear's input x (in) and of a target output y (out) over calibration vectors."""

    def __init__(self, in_features: int, out_features: int | None) -> None:
        kw = {"dtype": torch.float64}
        self.n = 0.0
        self.sx = torch.zeros(in_features, **kw)
        self.sxx = torch.zeros(in_features, in_features, **kw)
        self.sy = torch.zeros(out_features, **kw) if out_features else None
        self.syx = torch.zeros(out_features, in_features, **kw) if out_features else None

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float64)
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sxx += x.T @ x
        if y is not None and self.sy is not None:
            y = y.detach().reshape(-1, y.shape[-1]).to("cpu", torch.float64)
            self.sy += y.sum(0)
            self.syx += y.T @ x

    def all_reduce(self) -> "LinearMoments":
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            n = torch.tensor([self.n], dtype=torch.float64)
            for t in [n, self.sx, self.sxx] + ([self.sy, self.syx] if self.sy is not None else []):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
            self.n = float(n[0])
        return self

    def input_mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n <= 0:
            raise ValueError("no calibration vectors reached this layer")
        mu = self.sx / self.n
        cov = self.sxx / self.n - torch.outer(mu, mu)
        return mu, 0.5 * (cov + cov.T)

    def least_squares(self, intercept: bool = True, ridge: float = RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
        """(W', b') minimising the mean squared error of W' x + b' against y (ridge-regularised; centred moments
        with an intercept, raw second moments without one, then b' = 0)."""
        mu_x, cxx = self.input_mean_cov()
        mu_y = self.sy / self.n
        if intercept:
            cyx = self.syx / self.n - torch.outer(mu_y, mu_x)
        else:
            cxx, cyx = self.sxx / self.n, self.syx / self.n
        lam = ridge * max(float(torch.diagonal(cxx).mean()), 1e-12)
        a = cxx + lam * torch.eye(cxx.shape[0], dtype=cxx.dtype)
        w = torch.linalg.solve(a, cyx.T).T  # a is symmetric
        return w, (mu_y - w @ mu_x) if intercept else torch.zeros_like(mu_y)

    def output_stats(self, weight: torch.Tensor, bias: torch.Tensor | None) -> OutputStats:
        """Statistics of W x + b over the accumulated inputs (what AFM needs), exactly, from the input moments."""
        mu_x, cxx = self.input_mean_cov()
        w = weight.detach().to("cpu", torch.float64)
        b = bias.detach().to("cpu", torch.float64) if bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
        return OutputStats.from_moments(w @ mu_x + b, w @ cxx @ w.T, self.n)


def _capture(module: nn.Module, what: str, into: dict) -> Any:
    def hook(_m: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        into[what] = inputs[0] if what == "input" else output
        raise _Stop
    return module.register_forward_hook(hook)


def _run_until(model: nn.Module, module: nn.Module, what: str, batch: Any,
               forward_fn: Callable[[nn.Module, Any], Any]) -> torch.Tensor:
    """The input or output of ``module`` on ``batch`` (the forward pass stops there)."""
    got: dict[str, torch.Tensor] = {}
    handle = _capture(module, what, got)
    try:
        forward_fn(model, batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    if what not in got:
        raise ValueError(f"{type(module).__name__} was not called during calibration")
    return got[what]


@torch.no_grad()
def linear_moments(student: nn.Module, name: str, batches: Sequence[Any], teacher: nn.Module | None = None,
                   forward_fn: Callable[[nn.Module, Any], Any] | None = None) -> LinearMoments:
    """Moments of the input of Linear ``name`` in ``student`` and (with ``teacher``) of the same layer's output in
    ``teacher``, over the same batches (both in eval mode)."""
    forward_fn = forward_fn or default_forward
    layer = student.get_submodule(name)
    target = teacher.get_submodule(name) if teacher is not None else None
    moments = LinearMoments(layer.in_features, layer.out_features if teacher is not None else None)
    modes = (student.training, teacher.training if teacher is not None else False)
    student.eval()
    if teacher is not None:
        teacher.eval()
    try:
        for batch in batches:
            x = _run_until(student, layer, "input", batch, forward_fn)
            y = _run_until(teacher, target, "output", batch, forward_fn) if target is not None else None
            moments.update(x, y)
    finally:
        student.train(modes[0])
        if teacher is not None:
            teacher.train(modes[1])
    return moments.all_reduce()


@torch.no_grad()
def refit_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Write a least-squares refit into a Linear in place (a layer without bias gets none: W' absorbs what it can)."""
    linear.weight.copy_(weight.to(linear.weight))
    if linear.bias is not None:
        linear.bias.copy_(bias.to(linear.bias))
