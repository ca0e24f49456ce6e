"""Calibration statistics under torch.distributed: 2 gloo processes, each with its own batch, must end with the
statistics of both batches (summed, not averaged, not left per rank), exactly as one process computes them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lowrank_ctr.compression.stats import OutputStats, collect_output_stats

WORLD_SIZE = 2
ROWS = (7, 5)  # different batch sizes per rank: an average would not equal the sum by accident
KEYS = ("count", "sum", "sumsq", "grad_count", "grad_sq")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 1))


def _batch(rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    n = ROWS[rank]
    return {"x": torch.randn(n, 5, generator=g) * (1 + rank), "label": torch.randint(0, 2, (n,), generator=g).float()}


def _forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["x"]).squeeze(-1)


def _stats(batches: list[dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """Calibration of two layers (an inner and the output Linear) with output and gradient statistics."""
    model = _model()
    stats, n = collect_output_stats(model, {"0": model[0], "2": model[2]}, batches, forward_fn=_forward,
                                    gradients=True)
    assert n == len(batches)
    return {name: s.state_dict() for name, s in stats.items()}


def _masked(rank: int) -> dict[str, torch.Tensor]:
    """OutputStats with 2 groups and a mask (the per-field embedding case), reduced directly."""
    g = torch.Generator().manual_seed(200 + rank)
    s = OutputStats(3, groups=2)
    y = torch.randn(ROWS[rank], 2, 3, generator=g)
    mask = (torch.rand(ROWS[rank], 2, generator=g) > 0.3).float()
    s.update(y, mask)
    return s.all_reduce().state_dict()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.save({"calibration": _stats([_batch(rank)]), "masked": _masked(rank)}, Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def reduced(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(tmp / f"{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


def test_all_reduce_sums_the_statistics_of_both_ranks(reduced):
    single = _stats([_batch(0), _batch(1)])  # one process, both batches
    for rank, result in enumerate(reduced):
        for layer, expected in single.items():
            for key in KEYS:
                got = result["calibration"][layer][key]
                assert torch.allclose(got, expected[key], rtol=1e-12, atol=1e-12), (rank, layer, key)
        assert result["calibration"]["0"]["count"].item() == sum(ROWS)  # not 7 or 5 (no-op), not 6 (average)


def test_reduced_statistics_give_the_single_process_spectrum(reduced):
    single = _stats([_batch(0), _batch(1)])["0"]
    for result in reduced:
        s = OutputStats(4)
        for key in KEYS:
            setattr(s, key, result["calibration"]["0"][key])
        ref = OutputStats(4)
        for key in KEYS:
            setattr(ref, key, single[key])
        assert torch.allclose(s.spectrum()[0], ref.spectrum()[0], rtol=1e-10, atol=1e-12)
        assert torch.allclose(s.mean(), ref.mean(), rtol=1e-12, atol=1e-12)


def test_masked_groups_are_summed_per_group(reduced):
    expected = {k: _masked(0)[k] + _masked(1)[k] for k in ("count", "sum", "sumsq")}  # not initialised: no-op
    for result in reduced:
        for key, value in expected.items():
            assert torch.allclose(result["masked"][key], value, rtol=1e-12, atol=1e-12), key
    assert reduced[0]["masked"]["count"].shape == (2,)
