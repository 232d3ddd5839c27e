"""A tensor buffer in a reused RAM-backed file (``/dev/shm``): the same-node fast path of weight
sync. The writer copies tensors into the file's pages, readers view them in place.

Each process keeps its maps open: rewriting the same pages next sync costs a memcpy, with no page
faults and no new page tables (a fresh ``ray.put`` pays both). A map whose file was removed is
closed on the next call, so the RAM goes back once every process let go of it.

A streamed publication starts with one int64 mark per tensor (``marks``): the writer sets a
tensor's mark to the publication's token once its bytes are in place (or to minus the token when
it gives up), so a reader can load tensor ``i`` while tensor ``i + 1`` is still being written.
"""

from __future__ import annotations

import mmap
import os

import torch

from actors.weight_sync.layout import ALIGN, TensorSlot, dtype_of

# path -> (inode, size, map) of this process's open maps.
_MAPS: dict[str, tuple[int, int, mmap.mmap]] = {}


def map_buffer(path: str, size: int | None = None) -> mmap.mmap:
    """A shared writable map of ``path`` (resized to ``size`` first when given)."""
    for old in [p for p in _MAPS if p != path and not os.path.exists(p)]:
        _unmap(old)  # its pool removed it: let the RAM go
    fd = os.open(path, os.O_RDWR | (os.O_CREAT if size is not None else 0), 0o600)
    try:
        st = os.fstat(fd)
        if size is not None and st.st_size != size:
            os.ftruncate(fd, size)
            st = os.fstat(fd)
        hit = _MAPS.get(path)
        if hit and hit[:2] == (st.st_ino, st.st_size):
            return hit[2]
        if hit:
            _unmap(path)
        mm = mmap.mmap(fd, st.st_size)
    finally:
        os.close(fd)
    _MAPS[path] = (st.st_ino, st.st_size, mm)
    return mm


def _unmap(path: str) -> None:
    try:
        _MAPS.pop(path)[2].close()
    except BufferError:  # a tensor still views it; the map goes when that tensor does
        pass


def tensor_view(buf, slot: TensorSlot) -> torch.Tensor:
    """``slot`` of ``buf`` as a tensor sharing its memory."""
    if slot.nbytes == 0:
        return torch.empty(slot.shape, dtype=dtype_of(slot.dtype))
    raw = torch.frombuffer(buf, dtype=torch.uint8, count=slot.nbytes, offset=slot.offset)
    return raw.view(dtype_of(slot.dtype)).view(slot.shape)


def marks_bytes(count: int) -> int:
    """Bytes the marks of ``count`` tensors take at the start of a streamed buffer (aligned)."""
    return max(-(-8 * count // ALIGN) * ALIGN, ALIGN)


def marks(buf, count: int) -> torch.Tensor:
    """The ``count`` int64 marks at the start of ``buf``, as a tensor sharing its memory."""
    return torch.frombuffer(buf, dtype=torch.int64, count=count, offset=0)
