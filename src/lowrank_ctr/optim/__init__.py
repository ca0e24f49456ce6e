"""Optimizers for CTR models (config group ``conf/optimizer/``): dense Adam, or row-wise updates of embedding tables.

``build_optimizer(factory, model)`` is what the LightningModule calls: it switches the model's
:class:`~lowrank_ctr.models.layers.FieldEmbedding` tables to sparse row gradients when the configured optimizer
updates rows (``RowWiseOptimizer``), and back to dense gradients otherwise (a model trained row-wise and then
fine-tuned with Adam gets ordinary gradients again).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from lowrank_ctr.models.layers import FieldEmbedding
from lowrank_ctr.optim.rowwise import ROW_RULES, RowWiseOptimizer

__all__ = ["ROW_RULES", "RowWiseOptimizer", "build_optimizer", "config_problems", "optimizer_name",
           "updates_rows"]


def _target(factory: Callable[..., Any]) -> Any:
    return getattr(factory, "func", factory)  # Hydra's _partial_ gives a functools.partial


def updates_rows(factory: Callable[..., torch.optim.Optimizer]) -> bool:
    """Whether ``factory`` builds an optimizer that wants sparse row gradients from embedding tables."""
    target = _target(factory)
    return isinstance(target, type) and issubclass(target, RowWiseOptimizer)


def build_optimizer(factory: Callable[..., torch.optim.Optimizer], model: nn.Module) -> torch.optim.Optimizer:
    """``factory(params=model.parameters())``, with the tables' gradient kind set to what the optimizer needs."""
    rowwise = updates_rows(factory)
    if rowwise and torch.distributed.is_available() and torch.distributed.is_initialized():
        raise RuntimeError("optimizer=rowwise_* trains on one process (DDP cannot all-reduce the tables' sparse "
                           "gradients): use optimizer=adam with a DDP strategy")
    for module in model.modules():
        if isinstance(module, FieldEmbedding):
            module.row_gradients = rowwise
    return factory(params=model.parameters())


def optimizer_name(optimizer_cfg: Any) -> str | None:
    """The ``train/optimizer`` results value: ``adam``, ``rowwise_adagrad``, ``rowwise_adam``, else the class name."""
    if not optimizer_cfg:
        return None
    target = str(optimizer_cfg.get("_target_", ""))
    short = target.rsplit(".", 1)[-1]
    if short == RowWiseOptimizer.__name__:
        return f"rowwise_{optimizer_cfg.get('rows', 'adagrad')}"
    return short.lower() or None


def config_problems(cfg: Any) -> list[str]:
    """What ``validate`` reports about ``optimizer=...`` before any work: one line each, naming the key."""
    opt = cfg.get("optimizer") if hasattr(cfg, "get") else None
    if not opt or str(opt.get("_target_", "")).rsplit(".", 1)[-1] != RowWiseOptimizer.__name__:
        return []
    out = []
    rows = opt.get("rows", "adagrad")
    if rows not in ROW_RULES:
        out.append(f"optimizer.rows={rows} must be one of {list(ROW_RULES)}")
    scale = opt.get("row_lr_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        out.append(f"optimizer.row_lr_scale={scale} must be a number > 0")
    trainer = cfg.get("trainer") or {}
    if trainer.get("gradient_clip_val"):
        out.append(f"trainer.gradient_clip_val={trainer.get('gradient_clip_val')} clips the norm of all gradients, "
                   "but a row-wise optimizer's table gradients are sparse and torch cannot clip them: set "
                   "trainer.gradient_clip_val=null, or use optimizer=adam")
    strategy = trainer.get("strategy")
    strategy = strategy.get("_target_", "") if hasattr(strategy, "get") else str(strategy or "")
    if "ddp" in strategy.lower():
        out.append("optimizer=rowwise_* trains on one process: DDP all-reduces sparse gradients only for "
                   "nn.Embedding modules, not the project's flat tables; use optimizer=adam with trainer=ddp / ddp_cpu")
    return out
