"""malloc=tuned: freed activation-sized blocks are reused by the next step instead of faulted in again."""

import json
import os
import platform
import subprocess
import sys

import pytest

from lowrank_ctr.allocator import configure_malloc

# A step's pattern in glibc's own calls (no Python or torch allocations in between, so the heap's top is ours):
# eight 4 MB blocks (activation-sized) written and freed together, eight times. With glibc's adaptive defaults the
# freed top of the heap exceeds the trim threshold (twice the largest block seen, 10 MB here) and goes back to the
# kernel, so every round writes its pages through page faults again.
ROUNDS = r"""
import ctypes, json, resource, sys
from lowrank_ctr.allocator import configure_malloc
applied = configure_malloc(sys.argv[1])
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
MB = 1 << 20
libc.free(libc.malloc(10 * MB))
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(4 * MB) for _ in range(8)]
    for b in blocks:
        ctypes.memset(b, 1, 4 * MB)
    for b in blocks:
        libc.free(b)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults[2:]}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, "MALLOC_TRIM_THRESHOLD_": "", "MALLOC_MMAP_THRESHOLD_": ""})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tuned_malloc_stops_page_faults_on_reused_blocks():
    default, tuned = _faults("default"), _faults("tuned")
    pages = 8 * 4 * 1024 * 1024 // 4096
    assert not default["applied"] and tuned["applied"]
    assert min(default["faults"]) > pages // 2, default  # glibc's defaults: the blocks are faulted in every round
    assert max(tuned["faults"]) < pages // 20, tuned  # tuned: the same heap memory is reused


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="malloc must be one of tuned, default"):
        configure_malloc("jemalloc")
