"""``aio``: a raw file or block device, every byte at its own offset.

O_DIRECT is used where the file system allows it and it bypasses a cache (not on tmpfs)
unless the caller opts out (tapdisk's ``-D``): requests whose offset, lengths and buffer
addresses are all aligned to the device's logical block go through the direct
descriptor, others through a buffered one (Linux keeps the two coherent). A FUA write
is one ``pwritev`` with RWF_DSYNC. Holes come from SEEK_DATA/SEEK_HOLE and read as zeros.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence

from blktap.errors import FormatError
from blktap.io import aio_abi, syscalls
from blktap.io.engine import Completion, Engine
from blktap.io.iov import slice_iov, total
from blktap.tapdisk.driver import (
    STATE_DATA,
    STATE_HOLE,
    STATE_ZERO,
    Caps,
    Driver,
    Extents,
    InlineTarget,
    OpenContext,
    Tally,
    inline_file,
)


class AioDriver(Driver):
    name = "aio"
    type_id = 0

    def __init__(self, engine: Engine, path: str, fd: int, dfd: int | None, size: int, *,
                 writable: bool, block_device: bool) -> None:
        super().__init__(engine, size, writable=writable)
        self.path = path
        self.fd = fd
        self.dfd = dfd
        self.block_device = block_device
        self.align = syscalls.logical_block_size(fd)
        # Requests handed to the engine and not completed yet (the C driver's pending
        # count, reported in stats; the side doors complete at once and never wait).
        self.pending = 0
        # status_now: a file with every block allocated has no hole (until this driver
        # punches one: discard, write_zeroes); on tmpfs SEEK_DATA is a lookup in memory
        # and may be asked on the loop thread; elsewhere it may wait (not asked now).
        st = os.fstat(fd)
        self.dense = block_device or st.st_blocks * 512 >= st.st_size
        self.seek_now = not block_device and syscalls.in_memory(fd)
        self.caps = Caps.BLOCK_STATUS | Caps.CACHE | Caps.FLUSH
        self._inline: InlineTarget | None = None  # inline_target, once learnt
        if writable:
            self.caps |= Caps.WRITE | Caps.FUA | Caps.TRIM | Caps.ZERO | Caps.FAST_ZERO

    @classmethod
    def open(cls, engine: Engine, path: str, *, writable: bool,
             direct: bool = True) -> AioDriver:
        """Open (blocking: call from the engine or before serving)."""
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise FormatError(f"{path}: {os.strerror(exc.errno)}", exc.errno) from None
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            os.close(fd)
            code = errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EINVAL
            raise FormatError(f"{path}: not a regular file or block device", code)
        block = stat.S_ISBLK(st.st_mode)
        size = os.lseek(fd, 0, os.SEEK_END) if block else st.st_size
        dfd = None
        # On tmpfs O_DIRECT (accepted since Linux 6.6) bypasses nothing, and a direct
        # descriptor would cost an alignment check per request and keep reads off the
        # loop thread.
        if direct and not syscalls.in_memory(fd):
            try:
                dfd = os.open(path, flags | os.O_DIRECT)
            except OSError:  # tmpfs and some others refuse O_DIRECT: buffered only
                dfd = None
        return cls(engine, path, fd, dfd, size, writable=writable, block_device=block)

    @classmethod
    def open_layer(cls, ctx: OpenContext, args: str) -> AioDriver:
        return cls.open(ctx.engine, args, writable=ctx.writable, direct=ctx.direct)

    # ------------------------------------------------------------------ helpers
    def _direct_shape(self, offset: int, iov: Sequence[memoryview]) -> bool:
        """Whether the offset and every length suit the direct descriptor (the buffers'
        addresses are :meth:`_direct_addresses`'s to check)."""
        if self.dfd is None or offset % self.align:
            return False
        align = self.align
        for view in iov:
            if len(view) % align:
                return False
        return True

    def _direct_addresses(self, offset: int, iov: Sequence[memoryview]) -> list[int] | None:
        """The buffers' addresses when the request may go to the direct descriptor
        (offset, lengths and addresses aligned, every buffer writable), else None."""
        if not self._direct_shape(offset, iov):
            return None
        try:
            addrs = aio_abi.addresses(iov)
        except (TypeError, ValueError):  # read-only or empty: no address to check
            return None
        mask = self.align - 1
        for addr in addrs:
            if addr & mask:
                return None
        return addrs

    def _target(self, offset: int, iov: Sequence[memoryview]
                ) -> tuple[int, list[int] | None]:
        """The descriptor a request goes to, with its buffers' addresses when that is the
        direct one (the engine submits them as they are)."""
        addrs = self._direct_addresses(offset, iov)
        if addrs is None:
            return self.fd, None
        assert self.dfd is not None
        return self.dfd, addrs

    def _fd_for(self, offset: int, iov: Sequence[memoryview]) -> int:
        return self._target(offset, iov)[0]

    # ------------------------------------------------------------------ operations
    async def read(self, offset: int, iov: Sequence[memoryview]) -> None:
        self.pending += 1
        try:
            await self.engine.preadv(self._fd_for(offset, iov), iov, offset)
        finally:
            self.pending -= 1

    def read_now(self, offset: int, iov: Sequence[memoryview], tally: Tally) -> bool:
        # A request the direct descriptor would take always waits for the device; only
        # the buffered one may find the page cache holding it.
        if self._direct_shape(offset, iov):
            return False
        return self.engine.try_preadv(self.fd, iov, offset)

    def inline_target(self) -> InlineTarget | None:
        # Only the buffered descriptor serves inline (what the direct one takes waits for
        # the device), and only a file without holes: a read of a hole is answered as one
        # (VBD.zero_runs_now), which the compiled path does not do.
        if self.dfd is not None or not self.dense:
            return None
        if self._inline is None:
            self._inline = inline_file(self.engine, self.fd, self.size, self.writable)
        return self._inline

    def inline_layer(self) -> InlineTarget | None:
        return self.inline_target()

    def start_read(self, offset: int, iov: Sequence[memoryview], done: Completion) -> bool:
        fd, addrs = self._target(offset, iov)
        if not self.engine.start_preadv(fd, iov, offset, self._counted(done),
                                        addresses=addrs):
            return False
        self.pending += 1
        return True

    def start_write(self, offset: int, iov: Sequence[memoryview], done: Completion, *,
                    fua: bool = False) -> bool:
        if not self.writable or offset + total(iov) > self.size:
            return False  # (the partial last sector: write() trims it)
        fd, addrs = self._target(offset, iov)
        if not self.engine.start_pwritev(fd, iov, offset, self._counted(done), dsync=fua,
                                         addresses=addrs):
            return False
        self.pending += 1
        return True

    def _counted(self, done: Completion) -> Completion:
        def completed(error: BaseException | None) -> None:
            self.pending -= 1
            done(error)
        return completed

    def _inside(self, offset: int, iov: Sequence[memoryview]) -> Sequence[memoryview]:
        """The part of a write's buffers inside the file: the last sector of a file whose
        size is not a whole number of sectors is partial, and the file never grows to
        fill it."""
        if offset + total(iov) > self.size:
            return slice_iov(iov, 0, max(0, self.size - offset))
        return iov

    async def write(self, offset: int, iov: Sequence[memoryview], *, fua: bool = False) -> None:
        self._require_writable()
        iov = self._inside(offset, iov)
        if iov:
            self.pending += 1
            try:
                await self.engine.pwritev(self._fd_for(offset, iov), iov, offset, dsync=fua)
            finally:
                self.pending -= 1

    def write_now(self, offset: int, iov: Sequence[memoryview], *, fua: bool = False) -> bool:
        if not self.writable:
            return False
        iov = self._inside(offset, iov)
        # Only a file in memory is written now, and such a file has no direct descriptor.
        return not iov or (self.dfd is None
                           and self.engine.try_pwritev(self.fd, iov, offset, dsync=fua))

    async def flush(self) -> None:
        if self.writable:
            await self.engine.fsync(self.fd, datasync=not self.block_device)

    async def discard(self, offset: int, length: int) -> None:
        self._require_writable()
        length = min(length, self.size - offset)
        self.dense = self.block_device
        try:
            if self.block_device:
                await self.engine.call(syscalls.blk_discard, self.fd, offset, length)
            else:
                await self.engine.call(syscalls.punch_hole, self.fd, offset, length)
        except OSError as exc:
            if not syscalls.unsupported(exc):
                raise
            # A discard is a hint: a file system that cannot punch keeps the data.

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = True,
                           fast: bool = False, fua: bool = False) -> None:
        self._require_writable()
        length = min(length, self.size - offset)
        if length <= 0:
            return
        if not self.block_device:
            self.dense = False
            await self._zero_file(self.fd, offset, length, punch=may_trim, fast=fast)
        elif fast:
            raise self._slow_zeroing()
        else:
            await self.engine.call(syscalls.blk_zeroout, self.fd, offset, length)
        if fua:
            await self.flush()

    def _extents(self, offset: int, length: int) -> Extents:
        out: Extents = []
        pos, end = offset, min(offset + length, self.size)
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                data = end if exc.errno == errno.ENXIO else pos
            data = min(max(data, pos), end)
            if data > pos:
                out.append((data - pos, STATE_HOLE | STATE_ZERO))
            if data >= end:
                break
            try:
                hole = os.lseek(self.fd, data, os.SEEK_HOLE)
            except OSError:
                hole = end
            hole = min(max(hole, data + 1), end)
            out.append((hole - data, STATE_DATA))
            pos = hole
        if offset + length > end:  # the padding of a last partial sector
            out.append((offset + length - max(end, offset), STATE_HOLE | STATE_ZERO))
        return out

    def status_now(self, offset: int, length: int) -> Extents | None:
        if self.dense:
            return [(length, STATE_DATA)]
        if not self.seek_now:
            return None
        return self._extents(offset, length)

    async def block_status(self, offset: int, length: int) -> Extents:
        if self.block_device:
            return [(length, STATE_DATA)]
        return await self.engine.call(self._extents, offset, length)

    async def cache(self, offset: int, length: int) -> None:
        if not self.block_device:
            await self.engine.call(os.posix_fadvise, self.fd, offset, length,
                                   os.POSIX_FADV_WILLNEED)

    async def close(self) -> None:
        for fd in (self.dfd, self.fd):
            if fd is not None:
                self.engine.forget(fd)
                os.close(fd)
        self.dfd = None

    def max_requests(self) -> int:
        """How many requests the driver's engine runs at once: the linux-aio queue's
        depth, else its worker threads (the C driver reports its fixed pool, 352)."""
        depth = getattr(self.engine, "depth", None)
        if isinstance(depth, int):
            return depth
        threads = getattr(self.engine, "_threads", None)
        return len(threads) if isinstance(threads, list) else 1

    def describe(self) -> dict:
        """As the C driver: ``status`` is ``{"reqs": {"max": N, "pending": N}}`` (what
        sm and xapi may parse); ``direct`` is ours (O_DIRECT in use)."""
        return {"type": self.type_id, "name": self.name,
                "status": {"reqs": {"max": self.max_requests(), "pending": self.pending}},
                "direct": self.dfd is not None}


__all__ = ["AioDriver"]
