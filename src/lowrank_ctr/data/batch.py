"""Batch helpers shared by data modules, models' tests and compression calibration."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
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


ID_KEYS = ("cat", "multi")  # the id arrays: int64 in batches (what the models' lookups take)


def batch_arrays(schema: Schema, table: pa.Table, id_dtype: type = np.int64) -> dict[str, np.ndarray]:
    """Prepared columns (a row group, or rows encoded for prediction) as the batch arrays, in the batch dtypes.

    ``id_dtype``: of the id arrays (ID_KEYS). Prepared ids are int32; the streaming loader keeps them so while rows
    wait in its shuffle buffer (half the bytes) and widens each batch it cuts.
    An unknown (null) label, or the null-typed label of a file without labels, becomes NaN; a missing or null
    row_id column numbers the rows from 0.
    """
    n = table.num_rows
    cat = np.empty((n, len(schema.categorical)), id_dtype)
    for j, f in enumerate(schema.categorical):
        cat[:, j] = table.column(f.name).to_numpy()
    num = np.empty((n, len(schema.numeric)), np.float32)
    for j, f in enumerate(schema.numeric):
        num[:, j] = table.column(f.name).to_numpy()
    multi = np.zeros((n, len(schema.multihot), schema.multihot_max_len), id_dtype)
    for j, f in enumerate(schema.multihot):
        multi[:, j, : f.max_len] = table.column(f.name).combine_chunks().values.to_numpy().reshape(n, f.max_len)
    label = table.column("label")
    label = (np.full(n, np.nan, np.float32) if label.type == pa.null()
             else label.to_numpy(zero_copy_only=False).astype(np.float32))
    row_id = table.column("row_id") if "row_id" in table.column_names else None
    row_id = (np.arange(n) if row_id is None or row_id.null_count else row_id.to_numpy()).astype(np.int64)
    return {"cat": cat, "num": num, "multi": multi, "label": label, "row_id": row_id}
