"""``log``: the changed-block tracking filter (the reference's ``block-log``).

It sits above the leaf (``tap-ctl open -C LOG``, ``unpause -c LOG``) and marks in a CBT log
(:mod:`blktap.image.cbt`) every 64 KiB block a write, a write of zeros or a discard
touches; reads, block status and cache requests pass through.

Durability, better than the reference (which sets bits in a shared mapping and leaves them
to the kernel's writeback): a request that sets a new bit does not reach the disk until
that bit is on stable storage (written and fdatasync'ed), so no acknowledged write, even
one the guest never flushes, is ever missing from the log after a crash. Bits go to the
file in group commits: while one sync runs, the requests that set more bits wait for the
next one, which covers them all. A write to a block already marked costs a look at the
bitmap in memory (O(1) per 64 KiB touched) and no I/O, so it may be served through the
side door (``write_now``). A flush has nothing left to sync for the log.

A log for a smaller disk is grown to the disk's size at open (the new blocks clean), as
``cbt-util set -s`` grows it; a log for a larger disk, a truncated one, or a file that is
not a log is refused with a message (EINVAL / EIO), and the disk is not opened.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Sequence

from blktap.errors import CbtLogError
from blktap.image import cbt
from blktap.io.engine import Engine
from blktap.io.iov import total
from blktap.tapdisk.driver import SECTOR, Driver, Extents, Tally

# qemu's NBD state bit for a dirty block in a qemu:dirty-bitmap: context.
DIRTY = 1


class LogDriver(Driver):
    name = "log"
    type_id = 9

    def __init__(self, engine: Engine, path: str, fd: int, header: cbt.LogHeader,
                 bitmap: bytearray, parent: Driver) -> None:
        super().__init__(engine, parent.size, writable=parent.writable, parent=parent)
        self.path = path
        self.fd = fd
        self.header = header
        self.bitmap = bitmap
        self.view = memoryview(bitmap)
        self.caps = parent.caps
        # Group commit: bits set up to generation ``_set`` are in memory; those up to
        # ``_synced`` are on stable storage; [_lo, _hi) are the bitmap bytes changed since
        # the last sync began; ``_syncing`` is done when the running sync ends.
        self._set = 0
        self._synced = 0
        self._lo = len(bitmap)
        self._hi = 0
        self._syncing: asyncio.Future[None] | None = None
        self.syncs = 0  # bitmap syncs done (stats)

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, engine: Engine, path: str, parent: Driver) -> LogDriver:
        """Open the log at ``path`` above ``parent`` (blocking: call from the engine)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise CbtLogError(f"CBT log {path}: {os.strerror(exc.errno)}",
                              exc.errno) from None
        try:
            header = cbt.read_header_fd(fd, path)
            cbt.check_size(header, os.fstat(fd).st_size, path)
            if header.size > parent.size:
                raise CbtLogError(f"CBT log {path} is for a disk of {header.size} bytes; "
                                  f"this disk has {parent.size}", errno.EINVAL)
            if header.size < parent.size:
                header = cbt.grow_fd(fd, header, parent.size, path)
            bitmap = cbt.read_bitmap_fd(fd, header, path)
        except BaseException:
            os.close(fd)
            raise
        return cls(engine, path, fd, header, bitmap, parent)

    # ------------------------------------------------------------------ the bitmap
    def _masks(self, offset: int, length: int) -> tuple[int, int, int, int]:
        """(first byte, last byte, mask in the first, mask in the last) of the blocks
        ``[offset, offset + length)`` touches; one byte: the two masks are the same."""
        first = offset // cbt.BLOCK
        last = (offset + length - 1) // cbt.BLOCK
        lo, hi = first >> 3, last >> 3
        head = (0xFF << (first & 7)) & 0xFF
        tail = 0xFF >> (7 - (last & 7))
        if lo == hi:
            head = tail = head & tail
        return lo, hi, head, tail

    def is_marked(self, offset: int, length: int) -> bool:
        """Whether every block of the range is marked already."""
        if length <= 0:
            return True
        bm = self.bitmap
        lo, hi, head, tail = self._masks(offset, length)
        if bm[lo] & head != head or bm[hi] & tail != tail:
            return False
        return hi - lo < 2 or bm.count(0xFF, lo + 1, hi) == hi - lo - 1

    def mark(self, offset: int, length: int) -> int:
        """Mark the blocks of the range in memory; the generation to wait for (0 when
        nothing was new)."""
        if self.is_marked(offset, length):
            return 0
        bm = self.bitmap
        lo, hi, head, tail = self._masks(offset, length)
        bm[lo] |= head
        bm[hi] |= tail
        if hi - lo > 1:
            self.view[lo + 1 : hi] = b"\xff" * (hi - lo - 1)
        self._lo = min(self._lo, lo)
        self._hi = max(self._hi, hi + 1)
        self._set += 1
        return self._set

    async def persist(self, generation: int) -> None:
        """Return once the bits of ``generation`` are on stable storage."""
        while self._synced < generation:
            running = self._syncing
            if running is not None:
                await asyncio.wait({running})  # its own failure is its leader's to raise
                continue
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._syncing = done
            target, lo, hi = self._set, self._lo, self._hi
            self._lo, self._hi = len(self.bitmap), 0
            try:
                await self.engine.pwritev(self.fd, [self.view[lo:hi]], cbt.HEADER_SIZE + lo)
                await self.engine.fsync(self.fd, datasync=True)
                self._synced = max(self._synced, target)
                self.syncs += 1
            except BaseException:
                self._lo, self._hi = min(self._lo, lo), max(self._hi, hi)  # again next time
                raise
            finally:
                self._syncing = None
                done.set_result(None)

    async def _log(self, offset: int, length: int) -> None:
        generation = self.mark(offset, length)
        if generation:
            await self.persist(generation)

    def runs(self, offset: int, length: int) -> Extents:
        """(length, DIRTY or 0) runs of the range, cut to it (for NBD's
        qemu:dirty-bitmap: context)."""
        end = min(offset + length, self.size)
        if end <= offset:
            return []
        first, last = offset // cbt.BLOCK, (end - 1) // cbt.BLOCK
        out: Extents = []
        for block, n, dirty in cbt.runs(self.bitmap, first, last - first + 1):
            lo = max(block * cbt.BLOCK, offset)
            hi = min((block + n) * cbt.BLOCK, end)
            out.append((hi - lo, DIRTY if dirty else 0))
        return out

    @property
    def bitmap_name(self) -> str:
        """The name NBD clients ask for: the log's file name without ``.cbtlog``."""
        base = os.path.basename(self.path)
        return base[: -len(".cbtlog")] if base.endswith(".cbtlog") else base

    # ------------------------------------------------------------------ operations
    async def read(self, offset: int, iov: Sequence[memoryview]) -> None:
        await self.forward_read(offset, iov)

    def read_now(self, offset: int, iov: Sequence[memoryview], tally: Tally) -> bool:
        return self.forward_read_now(offset, iov, tally)

    def _count_write(self, length: int) -> None:
        assert self.parent is not None
        self.parent.hits[1] += -(-length // SECTOR)

    def write_now(self, offset: int, iov: Sequence[memoryview], *, fua: bool = False) -> bool:
        assert self.parent is not None
        length = len(iov[0]) if len(iov) == 1 else total(iov)
        if not self.is_marked(offset, length) or not self.parent.write_now(offset, iov,
                                                                          fua=fua):
            return False
        self._count_write(length)
        return True

    async def write(self, offset: int, iov: Sequence[memoryview], *, fua: bool = False) -> None:
        assert self.parent is not None
        self._require_writable()
        length = total(iov)
        await self._log(offset, length)
        self._count_write(length)
        await self.parent.write(offset, iov, fua=fua)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = True,
                           fast: bool = False, fua: bool = False) -> None:
        assert self.parent is not None
        self._require_writable()
        await self._log(offset, length)
        self._count_write(length)
        await self.parent.write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    async def discard(self, offset: int, length: int) -> None:
        assert self.parent is not None
        self._require_writable()
        await self._log(offset, length)
        await self.parent.discard(offset, length)

    async def flush(self) -> None:
        assert self.parent is not None
        # Every bit set is synced before its request goes down: only the disk to flush.
        await self.parent.flush()

    async def block_status(self, offset: int, length: int) -> Extents:
        return await self.forward_block_status(offset, length)

    def status_now(self, offset: int, length: int) -> Extents | None:
        # Reads are the disk's own: what it says of a range is what the log's disk holds.
        return self.forward_status_now(offset, length)

    async def cache(self, offset: int, length: int) -> None:
        assert self.parent is not None
        await self.parent.cache(offset, length)

    async def close(self) -> None:
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        try:
            await self.engine.fsync(fd, datasync=True)
        finally:
            self.engine.forget(fd)
            os.close(fd)

    def describe(self) -> dict:
        return {"type": self.type_id, "name": self.name, "status": None,
                "cbt": {"log": self.path, "blocks": cbt.blocks(self.size),
                        "dirty": int.from_bytes(self.bitmap, "little").bit_count(),
                        "syncs": self.syncs}}


def open_log(engine: Engine, path: str, below: Driver) -> LogDriver:
    """The ``log`` filter over ``below`` (blocking)."""
    return LogDriver.open(engine, path, below)
