"""Host memory of a learner rank: large freed blocks go back to the operating system at once.

glibc's ``malloc`` serves a block below its mmap threshold from a heap arena, and that threshold
grows (up to 32 MiB) each time a larger mapped block is freed. Memory freed inside a heap stays
resident until a later block fits the hole. A training step allocates and frees many blocks of
1–32 MiB (activations and their recomputation, per-layer gradients, gathered FSDP layers, chunks
of logits) between long-lived ones (weights, optimizer moments), so on CPU the holes add up to
gigabytes of resident memory that hold nothing. ``release_freed_blocks`` fixes the threshold
(``mallopt(M_MMAP_THRESHOLD)``, which also stops it from growing): every block from 1 MiB up is
its own mapping, returned to the system when freed, so a rank's resident memory follows what its
tensors hold. The cost is a page fault per new page of such blocks, small next to the matrix
products that fill them. The heap's free top is trimmed from the same size on.

Process-wide and idempotent; ``Learner`` calls it when it is built (in the ``LearnerWorker``
actor's process, or whichever process builds the learner). Nothing happens off glibc (musl,
macOS), where ``mallopt`` is missing.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 1 << 20
"""Bytes from which a block is mapped on its own (and unmapped when freed)."""


def release_freed_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """Set glibc's mmap and trim thresholds to ``threshold``; whether it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, threshold) == 1 and mallopt(_M_TRIM_THRESHOLD, threshold) == 1
    if not ok:
        log.warning("mallopt(%d) failed: freed host memory may stay resident", threshold)
    return ok
