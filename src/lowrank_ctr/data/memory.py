"""Allocator settings for preparation: its memory peak was mostly allocator slack, not live data.

Measured on the peer benchmark's 200k Criteo-shaped rows (39 string columns): preparation's live data stays under
~250 MB (pyarrow <= ~120 MB, Python/numpy <= ~100 MB), yet the process's RSS rose by ~380 MB and ~110 MB of it
stayed afterwards, under everything training allocates next. glibc raises its mmap threshold each time a large
block is freed (up to 32 MB), so the later multi-MB buffers of preparation (numpy columns, Python bytes of CSV
blocks) come from the heap and fragment it. A fixed 4 MB threshold while preparing maps such buffers apart and
unmaps them when freed: the peak over the imports fell to ~290 MB at the same speed (5 runs each, median 3.5 s vs
3.4 s). (pyarrow's jemalloc pool with decay 0 lowered it a little more but cost ~35% of the time.)

After the block glibc keeps a fixed 32 MB mmap threshold and a 64 MB trim threshold -- the values its own dynamic
rule reaches -- or ``malloc=tuned``'s (``lowrank_ctr/allocator.py``, the one place that calls ``mallopt``), so
training's buffers come from the heap as they would after glibc's adjustment, and the freed memory is handed back.
(Peer column, 3 runs each against the commit before: same training and inference speed, peak RSS 955-972 -> 864-882
MB.)
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator

import pyarrow as pa

from lowrank_ctr.allocator import fixed_thresholds, glibc, steady_thresholds

PREPARE_MMAP_THRESHOLD = 4 << 20


@contextmanager
def lean_allocators() -> Iterator[None]:
    """Large buffers mapped apart while the block runs; what it freed is handed back at its end."""
    fixed_thresholds(PREPARE_MMAP_THRESHOLD, trim_threshold=None)
    try:
        yield
    finally:
        steady_thresholds()
        release_memory()


def release_memory() -> None:
    """Hand the memory freed so far back to the OS: young-generation gc, pyarrow's pool, glibc's malloc_trim.

    Not a full ``gc.collect()``: after torch's and Lightning's imports it walks ~450k objects (0.3 s, a tenth of
    preparing the peer benchmark's 200k rows) and freed nothing measurable there (RSS after preparation 533-546 MB
    with either, 2 runs each)."""
    gc.collect(1)
    pa.default_memory_pool().release_unused()
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)
