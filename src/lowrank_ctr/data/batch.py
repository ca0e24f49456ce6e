"""Batch helpers shared by data modules, models' tests and compression calibration."""

from __future__ import annotations

import torch

from lowrank_ctr.data.schema import FIRST_VALUE_ID, PAD_ID, Schema

BATCH_KEYS = ("cat", "num", "multi", "label", "row_id")


def random_batch(schema: Schema, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A batch of random but valid inputs for ``schema`` (ids in range, some multi-hot padding).

    Used to test models and compression without preparing a dataset.
    """
    g = generator or torch.Generator().manual_seed(0)
    cat = torch.stack(
        [torch.randint(1, f.vocab_size, (batch_size,), generator=g) for f in schema.categorical], dim=1
    ) if schema.categorical else torch.zeros(batch_size, 0, dtype=torch.long)
    num = torch.randn(batch_size, len(schema.numeric), generator=g)
    max_len = schema.multihot_max_len
    multi = torch.zeros(batch_size, len(schema.multihot), max_len, dtype=torch.long)
    for j, f in enumerate(schema.multihot):
        ids = torch.randint(FIRST_VALUE_ID, f.vocab_size, (batch_size, f.max_len), generator=g)
        lengths = torch.randint(1, f.max_len + 1, (batch_size, 1), generator=g)
        keep = torch.arange(f.max_len).unsqueeze(0) < lengths
        multi[:, j, : f.max_len] = torch.where(keep, ids, torch.full_like(ids, PAD_ID))
    label = torch.randint(0, 2, (batch_size,), generator=g).float()
    return {"cat": cat, "num": num, "multi": multi, "label": label, "row_id": torch.arange(batch_size)}


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
