"""Allocator settings for preparation: its memory peak was mostly allocator slack, not live data.

Measured on the peer benchmark's 200k Criteo-shaped rows (39 string columns): preparation's live data stays under
~250 MB (pyarrow <= ~120 MB, Python/numpy <= ~100 MB), yet the process's RSS rose by ~380 MB and ~110 MB of it
stayed afterwards, under everything training allocates next. glibc raises its mmap threshold each time a large
block is freed (up to 32 MB), so the later multi-MB buffers of preparation (numpy columns, Python bytes of CSV
blocks) come from the heap and fragment it. A fixed 4 MB threshold while preparing maps such buffers apart and
unmaps them when freed: the peak over the imports fell to ~290 MB at the same speed (5 runs each, median 3.5 s vs
3.4 s). (pyarrow's jemalloc pool with decay 0 lowered it a little more but cost ~35% of the time.)

After the block glibc keeps a fixed 32 MB mmap threshold and a 64 MB trim threshold -- the values its own dynamic
rule reaches, so training's buffers come from the heap as they would after glibc's adjustment -- and the freed
memory is handed back. (Peer column, 3 runs each against the commit before: same training and inference speed,
peak RSS 955-972 -> 864-882 MB.)
"""

from __future__ import annotations

import ctypes
import gc
from contextlib import contextmanager
from typing import Iterator

import pyarrow as pa

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
PREPARE_MMAP_THRESHOLD = 4 << 20
AFTER_MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (glibc only: musl / macOS have neither)
        return libc
    except (OSError, AttributeError):
        return None


@contextmanager
def lean_allocators() -> Iterator[None]:
    """Large buffers mapped apart while the block runs; what it freed is handed back at its end."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, PREPARE_MMAP_THRESHOLD)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, AFTER_MMAP_THRESHOLD)
            # a fixed mmap threshold also freezes the trim threshold at 128 KB: the top of the heap would be handed
            # back after every step and faulted in again (measured: training -10%, inference -22%); glibc's own
            # dynamic rule keeps it at twice the mmap threshold
            libc.mallopt(M_TRIM_THRESHOLD, 2 * AFTER_MMAP_THRESHOLD)
        release_memory()


def release_memory() -> None:
    """Hand the memory freed so far back to the OS: young-generation gc, pyarrow's pool, glibc's malloc_trim.

    Not a full ``gc.collect()``: after torch's and Lightning's imports it walks ~450k objects (0.3 s, a tenth of
    preparing the peer benchmark's 200k rows) and freed nothing measurable there (RSS after preparation 533-546 MB
    with either, 2 runs each)."""
    gc.collect(1)
    pa.default_memory_pool().release_unused()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
