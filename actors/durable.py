"""Durable atomic writes: a file is written under a temporary name, fsync'd, renamed into place,
and its directory fsync'd, so after a crash (or a power loss) a reader finds either the old file
or the whole new one, never a half or an empty one.

Used by the run directory (``orchestrator.rundir``) and the learner's checkpoint writer
(``actors.learner.weights.checkpoint``); no Ray or torch import here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def fsync_file(path: str | Path) -> None:
    """Flush a file's data to disk (it may have been written by a library that does not)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder under ``root`` (a folder written by a library, e.g.
    ``save_pretrained``), deepest first, ``root`` last."""
    root = Path(root)
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(Path(dirpath) / name)
        fsync_dir(dirpath)


def temp_name(path: Path) -> Path:
    """The temporary sibling a write to ``path`` goes through (hidden, unique per process)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def replace_durably(tmp: str | Path, final: str | Path) -> None:
    """fsync ``tmp`` (a file or a whole folder), rename it to ``final``, fsync their directory."""
    tmp, final = Path(tmp), Path(final)
    if tmp.is_dir():
        fsync_tree(tmp)
    else:
        fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` to produce the file, then move it durably to ``path``; a failed
    write leaves no temporary file behind."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        write(tmp)
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``path`` holds exactly ``text`` (old content or new, never a mix)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    return write_atomic(path, write)
