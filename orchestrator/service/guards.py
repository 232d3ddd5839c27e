"""What stops an unattended run out loud instead of letting it idle or corrupt a checkpoint.

- ``loop.max_rounds_without_pairs`` rounds in a row without a pair (every judge call failing,
  every prompt tied, every pair stale): ``NoPairs``, naming the causes summed over those rounds.
- Before each checkpoint, the free space of the checkpoint folder against the size of the last
  checkpoint (plus ``ROOM_MARGIN``): ``DiskFull`` before a byte is written, naming the folder and
  the bytes needed, so the last good checkpoint stays whole. (Torch's own message on a full disk
  is ``unexpected pos 704 vs 598``.)

Both are ``LoopHalt``: a round redo would not help, so the loop does not retry them; the run
stops with a checkpoint of its last completed round where it can, and ``odpo run`` exits 1.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

ROOM_MARGIN = 1.1
"""A new checkpoint may be this much larger than the last (optimizer state, async samples)."""


class LoopHalt(RuntimeError):
    """The run stops on purpose: retrying the round would not help."""


class NoPairs(LoopHalt):
    pass


class DiskFull(LoopHalt):
    pass


def folder_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, name))
            except OSError:
                pass
    return total


def room_problem(folder: Path, last: Path | None, free: int | None = None) -> str | None:
    """Why a checkpoint cannot be written into ``folder`` (None when there is room, or nothing to
    measure a checkpoint by yet); ``free`` overrides the file system's figure (fault injection)."""
    if last is None:
        return None
    size = folder_bytes(last)
    needed = int(size * ROOM_MARGIN)
    free = shutil.disk_usage(folder).free if free is None else free
    if free >= needed:
        return None
    return (f"checkpoint folder {folder}: {free:,} bytes free, {needed:,} needed (the last checkpoint, "
            f"{last.name}, took {size:,} bytes, plus {ROOM_MARGIN - 1:.0%}); nothing was written and {last.name} "
            "is intact: free space there (or lower loop.keep_checkpoints), then resume")


def check_room(rd, round_: int, free: int | None = None) -> None:
    """Raise ``DiskFull`` when the checkpoint of ``round_`` would not fit (before writing it)."""
    found = rd.checkpoints()
    problem = room_problem(rd.checkpoints_dir, found[-1] if found else None, free)
    if problem:
        raise DiskFull(f"cannot checkpoint round {round_}: {problem}")


def no_pairs_message(lines: list[dict], limit: int) -> str:
    """Why the last rounds made no pair, from their metrics lines."""
    failures, dropped = Counter(), Counter()
    for m in lines:
        failures.update(m.get("judge_failures") or {})
        dropped.update(m.get("pairs_dropped") or {})
    rounds = [m.get("round") for m in lines]
    judge = ", ".join(f"{k} {v}" for k, v in failures.most_common() if v) or "none"
    drops = ", ".join(f"{k} {v}" for k, v in dropped.most_common() if v) or "none"
    return (f"no preference pair in {len(lines)} rounds in a row (rounds {rounds[0]}-{rounds[-1]}; "
            f"loop.max_rounds_without_pairs={limit}): judge failures by kind: {judge}; prompts without "
            f"a pair by reason: {drops}")
