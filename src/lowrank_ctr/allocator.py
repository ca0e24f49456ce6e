"""glibc malloc settings for training and scoring: keep freed activation memory for reuse.

The one place that changes glibc's allocator (data preparation's lean block, ``data/memory.py``, goes through it).

A training step of DeepFM at batch 4096 allocates and frees tens of (4096, 624) / (4096, 39, 16) float tensors of
~10 MB. glibc's adaptive defaults hand freed blocks back to the kernel often enough (``mmap`` below its adapted
threshold, heap trimming above twice that threshold) that a step takes page faults on the pages it writes again:
821-3,688 minor faults a step measured on a 2-core AVX2 machine (most runs 2,500-3,700), ~4% of the step's time;
120-240 are left with the settings below. ``tuned`` fixes the thresholds from the first step on -- blocks up to 32 MB
(glibc's ceiling) come from the heap, up to 1 GB of freed heap stays mapped -- without a preload of jemalloc /
tcmalloc (what PyTorch CPU performance guides suggest). Peak RSS is unchanged (the same blocks are live at the peak);
memory freed after the peak stays with the process (``malloc_trim`` still hands it back on request).

Config key ``malloc: tuned | default`` (train, compress, predict). Other C libraries (musl, macOS, Windows) keep
their allocator: :func:`configure_malloc` reports that nothing was changed.
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

MODES = ("tuned", "default")
# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: the largest it accepts
TRIM_THRESHOLD = 1024 * 1024 * 1024  # malloc=tuned
ADAPTIVE_TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # what glibc's own rule keeps at that mmap threshold

_applied: str | None = None


def glibc() -> ctypes.CDLL | None:
    """glibc's handle (``mallopt`` / ``malloc_trim``), or None under another C library."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def fixed_thresholds(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int | None = TRIM_THRESHOLD) -> bool:
    """Set glibc's mmap and trim thresholds (this turns its adaptive rule off for good); True when they took.

    A fixed mmap threshold alone also freezes the trim threshold at 128 KB (``trim_threshold=None``: what data
    preparation wants, handing freed memory back at once); in training the top of the heap would then be handed back
    after every step and faulted in again (measured: training -10%, inference -22%).
    """
    libc = glibc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
    return ok and (trim_threshold is None or libc.mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1)


def steady_thresholds() -> bool:
    """After a block that fixed its own thresholds (data preparation): ``tuned``'s values if this process is tuned,
    else what glibc's adaptive rule would have reached (32 MB / 64 MB), as that rule is off for good now."""
    return fixed_thresholds(MMAP_THRESHOLD, TRIM_THRESHOLD if _applied else ADAPTIVE_TRIM_THRESHOLD)


def configure_malloc(mode: str | None = None) -> bool:
    """Apply ``mode`` (the config's ``malloc``; None: ``tuned``) to this process's allocator; True when glibc's
    thresholds were fixed (now or before).

    ``default`` leaves glibc's adaptive rule as it is. Settings cannot be taken back within a process (the rule is
    off once a threshold is set), so ``default`` after ``tuned`` only logs that the process stays tuned.
    """
    global _applied
    mode = MODES[0] if mode is None else str(mode)
    if mode not in MODES:
        raise ValueError(f"malloc must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "default":
        if _applied:
            log.info("malloc=default: this process's allocator was tuned earlier and stays so")
        return bool(_applied)
    if _applied:
        return True
    if glibc() is None:
        log.debug("malloc=tuned: not glibc, allocator left as it is")
        return False
    if fixed_thresholds():
        _applied = mode
        return True
    log.warning("malloc=tuned: glibc refused the settings (mallopt returned 0); allocator left as it is")
    return False
