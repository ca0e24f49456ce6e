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
block = int(sys.argv[2]) << 20
if sys.argv[3] == "prepare":  # data preparation's own thresholds, then the steady ones for the mode
    from lowrank_ctr.data.memory import lean_allocators
    with lean_allocators():
        pass
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
MB = 1 << 20
libc.free(libc.malloc(10 * MB))
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(block) for _ in range(8)]
    for b in blocks:
        ctypes.memset(b, 1, block)
    for b in blocks:
        libc.free(b)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults[2:]}))
"""


def _faults(mode: str, block_mb: int = 4, prepare: bool = False) -> dict:
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode, str(block_mb), "prepare" if prepare else "-"],
                         capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")})  # glibc's defaults
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tuned_malloc_stops_page_faults_on_reused_blocks():
    default, tuned = _faults("default"), _faults("tuned")
    pages = 8 * 4 * 1024 * 1024 // 4096
    assert not default["applied"] and tuned["applied"]
    assert min(default["faults"]) > pages // 2, default  # glibc's defaults: the blocks are faulted in every round
    assert max(tuned["faults"]) < pages // 20, tuned  # tuned: the same heap memory is reused


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_data_preparation_leaves_a_tuned_process_tuned():
    """Preparation fixes its own thresholds while it runs; afterwards a tuned process keeps all 96 MB of freed 12 MB
    blocks, an untuned one the 64 MB glibc's rule would keep (so those rounds fault)."""
    tuned, default = _faults("tuned", 12, prepare=True), _faults("default", 12, prepare=True)
    pages = 8 * 12 * 1024 * 1024 // 4096
    assert max(tuned["faults"]) < pages // 20, tuned
    assert min(default["faults"]) > pages // 4, default


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="malloc must be one of tuned, default"):
        configure_malloc("jemalloc")
