"""Numeric precision of training and inference: the ``trainer.precision`` values the project supports.

Training: Lightning's mixed precision (``bf16-mixed`` on CPU and GPU, ``16-mixed`` with loss scaling on GPU) runs
matmuls in 16 bits under ``torch.autocast`` while parameters, optimizer state, embedding lookups, losses and
metrics stay float32 (the layers that produce logits compute in float32: models/layers.OutputLinear). Inference:
:func:`inference` is the same autocast under ``torch.inference_mode``; serving may also use ``int8`` (CPU: the
Linear layers as int8 GEMMs, :mod:`lowrank_ctr.int8_inference`), which :func:`serving_model` applies.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

# trainer.precision -> autocast dtype (None: plain float32)
PRECISIONS: dict[str, torch.dtype | None] = {"32": None, "32-true": None, "bf16-mixed": torch.bfloat16,
                                             "16-mixed": torch.float16}
GPU_ONLY = ("16-mixed",)
# serving only (a model transform, not a training precision): lowrank_ctr.int8_inference
INFERENCE_ONLY = ("int8",)


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


def native_bf16() -> bool:
    """Whether oneDNN has bfloat16 kernels for this CPU (AVX-512; native bf16 arithmetic with AVX-512 BF16 / AMX).

    Without them torch falls back to reference bf16 matmuls, measured 6x slower than float32 on an AVX2 CPU
    (AMD EPYC, 2 threads: 18 vs 113 GFLOP/s on a 4096x624 @ 624x400 GEMM)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the probe: assume native rather than warn wrongly
        return True


def precision_warning(precision: Any, accelerator: Any = "cpu") -> str | None:
    """One line when ``precision`` is valid but slow on this machine (bf16 on a CPU without native bf16), or None."""
    on_cpu = str(accelerator) == "cpu" or (str(accelerator) == "auto" and not torch.cuda.is_available())
    if str(precision) == "bf16-mixed" and on_cpu and not native_bf16():
        return ("trainer.precision=bf16-mixed on a CPU without bfloat16 kernels (they need AVX-512, natively "
                f"AVX-512 BF16 / AMX; this one has {torch.backends.cpu.get_cpu_capability()}): its bf16 matmuls are "
                "several times slower than float32 (6x measured on AVX2); use trainer.precision=32 on this machine")
    return None


def inference_precision_problem(precision: Any, device: torch.device | str = "cpu") -> str | None:
    """One line naming what is wrong with an inference ``precision`` on ``device``, or None."""
    if str(precision) in INFERENCE_ONLY:
        from lowrank_ctr.int8_inference import engine_problem

        if torch.device(device).type != "cpu":
            return f"precision={precision} (int8 Linear layers) runs on CPU only; on {device} use 32 or bf16-mixed"
        return engine_problem()
    try:
        autocast_dtype(precision)
    except ValueError:
        return (f"precision={precision} is not supported for inference: choose one of "
                f"{list(PRECISIONS) + list(INFERENCE_ONLY)}")
    return None


def serving_model(model: torch.nn.Module, precision: Any = "32") -> torch.nn.Module:
    """The model to run at inference ``precision``: for ``int8`` a copy whose Linear layers compute in int8
    (sharing every other tensor), otherwise ``model`` itself (autocast does the rest, see :func:`inference`)."""
    if str(precision) in INFERENCE_ONLY:
        from lowrank_ctr.int8_inference import quantize_for_inference

        return quantize_for_inference(model)
    return model


@contextlib.contextmanager
def inference(precision: Any = "32", device: torch.device | str = "cpu") -> Iterator[None]:
    """``torch.inference_mode`` plus the autocast of ``precision`` on ``device`` (what training used). For ``int8``
    no autocast: the model from :func:`serving_model` computes its Linears in int8 and the rest in float32."""
    problem = inference_precision_problem(precision, device)
    if problem:
        raise ValueError(problem)
    dtype = None if str(precision) in INFERENCE_ONLY else autocast_dtype(precision)
    mixed = torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with torch.inference_mode(), mixed:
        yield
