import os
import subprocess
import sys

import pytest

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                                reason="glibc's allocator")

# Allocates and frees a 64 MB tensor twenty times, then prints the page faults the last nine took. The first few
# may grow the heap: a small allocation can be carved from a freed block, leaving it too short for the next.
FAULTS = """
import resource, sys, torch
from translator.memory import hold_freed_memory
held = hold_freed_memory() if sys.argv[1] == "hold" else None
for _ in range(11):
    torch.ones(16 << 20).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(9):
    torch.ones(16 << 20).sum()
print(held, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str, **env) -> tuple[str, int]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True,
                         env=environment).stdout.split()
    return out[0], int(out[1])


@glibc_only
def test_held_memory_serves_large_tensors_without_fresh_pages():
    held, with_hold = faults("hold")
    _, by_default = faults("default")
    assert held == "True"
    block = (64 << 20) // os.sysconf("SC_PAGE_SIZE")  # pages
    assert by_default > 0.9 * 9 * block  # glibc maps each of the nine blocks afresh: every page faults once
    assert with_hold <= block  # once the heap has grown to fit, freed blocks are reused


@glibc_only
def test_the_users_own_malloc_settings_win():
    held, with_hold = faults("hold", MALLOC_MMAP_THRESHOLD_="131072")
    assert held == "False"
    assert with_hold > 0.9 * 9 * (64 << 20) // os.sysconf("SC_PAGE_SIZE")
