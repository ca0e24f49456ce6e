"""Inference latency of a model at several batch sizes: fixed threads, warm-up, median of repeats.

Used by every compression run (base vs compressed, measured back to back in the same process so the ratio is
fair) and by the benchmark scripts. Never used for assertions in tests.
"""

from __future__ import annotations

import statistics
import time
from typing import Iterable, Mapping

import torch
from torch import nn

from lowrank_ctr.pipeline.results import BENCH_BATCH_SIZES as DEFAULT_BATCH_SIZES  # noqa: F401 (re-exported)


def make_batches(source: Iterable[Mapping[str, torch.Tensor]], sizes: Iterable[int]) -> dict[int, dict]:
    """Slices of real rows at each batch size (rows repeat when the source is smaller than a size)."""
    sizes = list(sizes)
    need = max(sizes)
    parts, have = [], 0
    for b in source:
        parts.append(b)
        have += len(b["label"])
        if have >= need:
            break
    if not parts:
        raise ValueError("no batches to benchmark with: the evaluation split is empty")
    pool = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    reps = -(-need // len(pool["label"]))
    if reps > 1:
        pool = {k: v.repeat((reps,) + (1,) * (v.dim() - 1)) for k, v in pool.items()}
    return {s: {k: v[:s].contiguous() for k, v in pool.items()} for s in sizes}


@torch.inference_mode()
def latency_ms(model: nn.Module, batch: Mapping[str, torch.Tensor], warmup: int = 3, repeats: int = 20,
               min_seconds: float = 0.2) -> float:
    """Median milliseconds per forward pass (repeats until both ``repeats`` and ``min_seconds`` are reached)."""
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batch = {k: v.to(device) for k, v in batch.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        model(batch)
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_seconds and len(times) < 10_000):
        t0 = time.perf_counter()
        model(batch)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


def measure(base: nn.Module, compressed: nn.Module | None, batches: Mapping[int, Mapping[str, torch.Tensor]],
            threads: int | None = None, repeats: int = 20
            ) -> tuple[dict[int, float], dict[int, float] | None, int]:
    """(base ms, compressed ms or None, threads used) per batch size; base and compressed back to back."""
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        base_ms: dict[int, float] = {}
        compressed_ms: dict[int, float] | None = {} if compressed is not None else None
        for size, batch in batches.items():
            base_ms[size] = latency_ms(base, batch, repeats=repeats)
            if compressed is not None:
                compressed_ms[size] = latency_ms(compressed, batch, repeats=repeats)
        return base_ms, compressed_ms, torch.get_num_threads()
    finally:
        torch.set_num_threads(old_threads)
