"""Numeric precision of training and inference: the ``trainer.precision`` values the project supports.

Training: Lightning's mixed precision (``bf16-mixed`` on CPU and GPU, ``16-mixed`` with loss scaling on GPU) runs
matmuls in 16 bits under ``torch.autocast`` while parameters, optimizer state, embedding lookups, losses and
metrics stay float32 (the layers that produce logits compute in float32: models/layers.OutputLinear). Inference:
:func:`inference` is the same autocast under ``torch.inference_mode``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

# trainer.precision -> autocast dtype (None: plain float32)
PRECISIONS: dict[str, torch.dtype | None] = {"32": None, "32-true": None, "bf16-mixed": torch.bfloat16,
                                             "16-mixed": torch.float16}
GPU_ONLY = ("16-mixed",)


def autocast_dtype(precision: Any) -> torch.dtype | None:
    """The autocast dtype of a ``trainer.precision`` value (None: float32); ValueError naming the choices."""
    key = str(precision)
    if key not in PRECISIONS:
        raise ValueError(f"trainer.precision={precision} is not supported: choose one of {list(PRECISIONS)} "
                         "(float32 master weights; bf16-mixed on CPU and GPU, 16-mixed on GPU)")
    return PRECISIONS[key]


def precision_problem(precision: Any, accelerator: Any = "cpu") -> str | None:
    """One line naming what is wrong with ``trainer.precision`` for this accelerator, or None."""
    try:
        autocast_dtype(precision)
    except ValueError as exc:
        return str(exc)
    on_gpu = str(accelerator) in ("gpu", "cuda") or (str(accelerator) == "auto" and torch.cuda.is_available())
    if str(precision) in GPU_ONLY and not on_gpu:
        return (f"trainer.precision={precision} (float16 with loss scaling) runs on GPU only; on CPU use "
                "trainer.precision=bf16-mixed")
    return None


@contextlib.contextmanager
def inference(precision: Any = "32", device: torch.device | str = "cpu") -> Iterator[None]:
    """``torch.inference_mode`` plus the autocast of ``precision`` on ``device`` (what training used)."""
    dtype = autocast_dtype(precision)
    mixed = torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with torch.inference_mode(), mixed:
        yield
