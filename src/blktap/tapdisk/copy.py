"""Copy what a disk holds onto another, asking the source's block status so that only
allocated data moves: the background copy of a live storage migration
(docs/migration.md), and ``blktap copy``.

Both ends are driver stacks (``open_stack``: local images, or any driver that speaks to
a remote disk), so the copy reads and writes through the same code tapdisk serves with.
Ranges the source reports as reading zeros (holes, zeroed extents) are skipped, or, with
``zero_holes``, made zero on the destination with write-zeroes (for a destination that
is not known to be empty). Several chunks are in flight at once, each in a buffer of its
own allocated once; the first error stops the copy (the chunks in flight finish first).
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Callable
from dataclasses import dataclass

from blktap.errors import BlktapError
from blktap.io.iov import zeros_iov
from blktap.tapdisk.driver import SECTOR, STATE_ZERO, Caps, Driver

CHUNK = 2 << 20  # bytes per read/write
DEPTH = 4  # chunks in flight
STATUS_SPAN = 1 << 30  # bytes asked about per block-status call


@dataclass
class CopyResult:
    size: int  # bytes of the source
    copied: int = 0  # data bytes read and written
    zeroed: int = 0  # bytes made zero on the destination (zero_holes)
    skipped: int = 0  # bytes not moved (they read as zeros)
    extents: int = 0  # data extents found
    seconds: float = 0.0


async def copy_allocated(src: Driver, dst: Driver, *, zero_holes: bool = False,
                         chunk: int = CHUNK, depth: int = DEPTH,
                         progress: Callable[[int], None] | None = None) -> CopyResult:
    """Copy ``src`` onto ``dst`` (at least as large, writable); flushes ``dst`` at the
    end. ``progress`` is called with the bytes of the source dealt with so far."""
    if dst.size < src.size:
        raise BlktapError(f"{dst.path or dst.name}: {dst.size} bytes, smaller than the "
                          f"source ({src.size} bytes)", errno.EINVAL)
    if not dst.writable:
        raise BlktapError(f"{dst.path or dst.name} is read-only", errno.EROFS)
    if chunk <= 0 or chunk % SECTOR or depth <= 0:
        raise BlktapError(f"bad chunk size {chunk} or depth {depth}", errno.EINVAL)
    result = CopyResult(src.size)
    started = time.monotonic()
    free: asyncio.Queue[memoryview] = asyncio.Queue()
    for _ in range(depth):
        free.put_nowait(memoryview(bytearray(chunk)))
    running: set[asyncio.Task] = set()
    failure: list[BaseException] = []
    done = 0

    def advanced(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done)

    async def move(offset: int, length: int, buf: memoryview) -> None:
        try:
            view = buf[:length]
            await src.read(offset, [view])
            await dst.write(offset, [view])
            result.copied += length
            advanced(length)
        finally:
            free.put_nowait(buf)

    def finished(task: asyncio.Task) -> None:
        running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            failure.append(task.exception())  # type: ignore[arg-type]

    has_status = bool(src.caps & Caps.BLOCK_STATUS)
    try:
        pos = 0
        while pos < src.size and not failure:
            span = min(STATUS_SPAN, src.size - pos)
            extents = await src.block_status(pos, span) if has_status else [(span, 0)]
            if not extents or extents[0][0] <= 0:
                raise BlktapError(f"{src.path or src.name}: block status at {pos} answered "
                                  "nothing", errno.EIO)
            for length, flags in extents:
                length = min(length, src.size - pos)
                if flags & STATE_ZERO:
                    if zero_holes:
                        await _zero(dst, pos, length, chunk)
                        result.zeroed += length
                    else:
                        result.skipped += length
                    advanced(length)
                else:
                    result.extents += 1
                    end = pos + length
                    off = pos
                    while off < end and not failure:
                        n = min(chunk, end - off)
                        buf = await free.get()
                        if failure:
                            free.put_nowait(buf)
                            break
                        task = asyncio.get_running_loop().create_task(move(off, n, buf))
                        running.add(task)
                        task.add_done_callback(finished)
                        off += n
                pos += length
                if pos >= src.size or failure:
                    break
        while running:
            await asyncio.gather(*running, return_exceptions=True)
        if failure:
            raise failure[0]
        await dst.flush()
    finally:
        for task in list(running):
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
    result.seconds = time.monotonic() - started
    return result


async def _zero(dst: Driver, offset: int, length: int, chunk: int) -> None:
    if dst.caps & Caps.ZERO:
        await dst.write_zeroes(offset, length)
        return
    end = offset + length
    while offset < end:
        n = min(chunk, end - offset)
        await dst.write(offset, zeros_iov(n))
        offset += n


__all__ = ["CopyResult", "copy_allocated"]
