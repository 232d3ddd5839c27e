"""Numbered files published once each, in order: the inbox's batches and the control requests.

A writer (the driver's HTTP handler, or ``odpo add-prompts`` / ``odpo ctl`` in another process)
writes the whole file under a temporary name, fsyncs it, then hard-links it to the next free
number: the link fails if another writer took that number first, and the writer tries the next.
So numbers have no gaps, a number once visible never changes, and a file is visible only whole;
the directory is fsync'd before the call returns, so what a writer was told is written survives
a crash. A reader walks the numbers from where it stopped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from actors.durable import fsync_dir, fsync_file


def numbered(folder: Path, stem: str, suffix: str, number: int) -> Path:
    return folder / f"{stem}_{number:06d}{suffix}"


def last_number(folder: Path, stem: str, suffix: str) -> int:
    """The highest number published in ``folder`` (0 when none)."""
    pattern = re.compile(rf"{re.escape(stem)}_(\d{{6}}){re.escape(suffix)}")
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    return max((int(m.group(1)) for n in names if (m := pattern.fullmatch(n))), default=0)


def publish(folder: Path, stem: str, suffix: str, write: Callable[[Path], None]) -> tuple[int, Path]:
    """Write a file with ``write(tmp_path)`` and publish it as the next number; returns
    ``(number, path)`` once the file and its name are on disk."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{stem}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        write(tmp)
        fsync_file(tmp)
        number = last_number(folder, stem, suffix) + 1
        while True:
            path = numbered(folder, stem, suffix, number)
            try:
                os.link(tmp, path)
                break
            except FileExistsError:  # another writer published this number first
                number += 1
        fsync_dir(folder)
    finally:
        tmp.unlink(missing_ok=True)
    return number, path
