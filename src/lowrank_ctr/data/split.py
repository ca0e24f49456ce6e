"""Deterministic train/valid/test split of a row stream by a hash of (seed, global row index): no row order needed,
and the same rows land in the same split wherever the stream is read (preparation, ``raw_out=`` of a generated
dataset)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from lowrank_ctr.data.errors import DataError
from lowrank_ctr.data.synthetic import splitmix64

SPLITS = ("train", "valid", "test")


class RowSplitter:
    """``assign(n)``: the split (0 train, 1 valid, 2 test) of the next ``n`` rows of the stream."""

    def __init__(self, ratios: Sequence[float], seed: int) -> None:
        r = np.asarray(list(ratios), dtype=np.float64)
        if r.shape != (3,) or (r < 0).any() or abs(r.sum() - 1.0) > 1e-6 or r[0] <= 0:
            raise DataError(f"data.split={list(ratios)} must be three non-negative fractions "
                            "[train, valid, test] summing to 1 with train > 0")
        self.edges = np.cumsum(r)[:2]
        self.seed = np.uint64(seed & 0xFFFFFFFF)
        self.next_row = 0

    def assign(self, n: int) -> np.ndarray:
        idx = np.arange(self.next_row, self.next_row + n, dtype=np.uint64)
        self.next_row += n
        u = (splitmix64(idx ^ (self.seed << np.uint64(40))) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
        return np.searchsorted(self.edges, u, side="right").astype(np.int8)
