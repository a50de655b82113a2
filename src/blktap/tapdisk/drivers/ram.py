"""``ram``: the whole image held in memory, written through to its file.

As the reference's ram driver: the file is loaded at open (up to a size limit), reads
come from memory, writes land in memory and then in the file. Copies of more than
:data:`INLINE_COPY` bytes run in the engine so that the event loop never stalls on a big
memcpy.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
from collections.abc import Sequence

from blktap.errors import FormatError
from blktap.io.engine import Engine
from blktap.io.iov import copy_into, slice_iov, total, zero_fill
from blktap.io.threads import read_full
from blktap.tapdisk.driver import STATE_DATA, Caps, Driver, Extents, OpenContext

DEFAULT_MAX_SIZE = 1 << 30
INLINE_COPY = 256 << 10


def _gather_from(src: memoryview, iov: Sequence[memoryview]) -> None:
    copy_into(iov, src)


def _scatter_to(dst: memoryview, iov: Sequence[memoryview]) -> None:
    pos = 0
    for view in iov:
        dst[pos : pos + len(view)] = view
        pos += len(view)


class RamDriver(Driver):
    name = "ram"
    type_id = 5

    def __init__(self, engine: Engine, path: str, fd: int, size: int, mem: mmap.mmap, *,
                 writable: bool) -> None:
        super().__init__(engine, size, writable=writable)
        self.path = path
        self.fd = fd
        self.mem = mem
        self.view = memoryview(mem)
        self.caps = Caps.FLUSH
        if writable:
            self.caps |= Caps.WRITE | Caps.FUA | Caps.ZERO

    @classmethod
    def open(cls, engine: Engine, path: str, *, writable: bool,
             max_size: int = DEFAULT_MAX_SIZE) -> RamDriver:
        """Open and load (blocking: call from the engine or before serving)."""
        try:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as exc:
            raise FormatError(f"{path}: {os.strerror(exc.errno)}", exc.errno) from None
        try:
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise FormatError(f"{path}: not a regular file or block device", errno.EINVAL)
            size = os.lseek(fd, 0, os.SEEK_END)
            if size > max_size:
                raise FormatError(f"{path}: {size} bytes is more than a ram disk holds "
                                  f"({max_size})", errno.ENOMEM)
            mem = mmap.mmap(-1, max(size + (-size) % 512, mmap.PAGESIZE))
            read_full(fd, [memoryview(mem)[:size]], 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(engine, path, fd, size, mem, writable=writable)

    @classmethod
    def open_layer(cls, ctx: OpenContext, args: str) -> RamDriver:
        return cls.open(ctx.engine, args, writable=ctx.writable)

    async def read(self, offset: int, iov: Sequence[memoryview]) -> None:
        src = self.view[offset : offset + total(iov)]
        if len(src) > INLINE_COPY:
            await self.engine.call(_gather_from, src, iov)
        else:
            copy_into(iov, src)

    async def write(self, offset: int, iov: Sequence[memoryview], *, fua: bool = False) -> None:
        self._require_writable()
        length = total(iov)
        dst = self.view[offset : offset + length]
        if length > INLINE_COPY:
            await self.engine.call(_scatter_to, dst, iov)
        else:
            _scatter_to(dst, iov)
        keep = min(length, self.size - offset)
        if keep > 0:
            await self.engine.pwritev(self.fd, slice_iov(iov, 0, keep), offset, dsync=fua)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = True,
                           fast: bool = False, fua: bool = False) -> None:
        self._require_writable()
        if fast:
            raise self._slow_zeroing()
        length = min(length, self.size - offset)
        zero_fill([self.view[offset : offset + length]])
        await self._zero_file(self.fd, offset, length, punch=may_trim, fast=False)
        if fua:
            await self.flush()

    async def flush(self) -> None:
        if self.writable:
            await self.engine.fsync(self.fd)

    async def block_status(self, offset: int, length: int) -> Extents:
        return [(length, STATE_DATA)]

    async def close(self) -> None:
        self.engine.forget(self.fd)
        os.close(self.fd)
        try:
            self.view.release()
            self.mem.close()
        except BufferError:
            pass  # slices handed out still exist: the mapping goes with the last of them
