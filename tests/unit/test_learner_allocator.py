"""The learner's host-allocator setting: blocks freed between live ones leave the RSS at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# 32 blocks of 4 MiB, each followed by a small live block (so every big one is a hole once freed,
# as activations and gradients are between weights), after a 30 MiB block was freed (which raises
# glibc's dynamic mmap threshold to 30 MiB, as a training step does). Prints the RSS freed.
SCRIPT = """
import ctypes, os, sys
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
libc.free(libc.malloc(30 << 20))
if sys.argv[1] == "on":
    from actors.learner.allocator import release_freed_blocks
    assert release_freed_blocks()
big, small = [], []
for _ in range(32):
    big.append(libc.malloc(4 << 20)); ctypes.memset(big[-1], 1, 4 << 20)
    small.append(libc.malloc(64 << 10)); ctypes.memset(small[-1], 1, 64 << 10)
before = rss()
for block in big:
    libc.free(block)
print(before - rss())
"""


def _freed(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc setting")
def test_freed_blocks_leave_the_rss_with_the_setting_and_stay_without_it():
    total = 32 * (4 << 20)
    assert _freed("on") >= 0.95 * total
    assert _freed("off") <= 0.1 * total  # glibc's default keeps the holes resident
