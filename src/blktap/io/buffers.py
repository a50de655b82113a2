"""Reusable, page-aligned data buffers.

Request payloads land in and leave from these: anonymous mmaps are page aligned (usable
with O_DIRECT) and zero-filled by the kernel, and a freed buffer goes back to a free list
of its size class (powers of two from 4 KiB), so the data path allocates nothing once
warm.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field

MIN_CLASS = 4096


@dataclass(eq=False)
class Buffer:
    """One buffer: ``view`` is exactly the size asked for, ``mem`` the mapping behind it."""

    mem: mmap.mmap
    view: memoryview
    size_class: int
    pooled: bool = field(default=True)


def _size_class(size: int) -> int:
    return max(MIN_CLASS, 1 << (max(size, 1) - 1).bit_length())


class BufferPool:
    """Free lists of mmapped buffers per size class, keeping at most ``keep_bytes`` idle."""

    def __init__(self, keep_bytes: int = 256 << 20) -> None:
        self.keep_bytes = keep_bytes
        self._free: dict[int, list[mmap.mmap]] = {}
        self._idle = 0
        self.allocated = 0  # mappings made so far (for tests and stats)

    def get(self, size: int) -> Buffer:
        cls = _size_class(size)
        free = self._free.get(cls)
        if free:
            mem = free.pop()
            self._idle -= cls
        else:
            mem = mmap.mmap(-1, cls)
            self.allocated += 1
        return Buffer(mem, memoryview(mem)[:size], cls)

    def put(self, buf: Buffer) -> None:
        if not buf.pooled:
            return
        buf.pooled = False  # a second put of the same buffer is a no-op
        if self._idle + buf.size_class > self.keep_bytes:
            return  # dropped: the mapping goes when its last view does
        self._free.setdefault(buf.size_class, []).append(buf.mem)
        self._idle += buf.size_class
