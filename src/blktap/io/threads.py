"""The thread-pool engine: worker threads run preadv/pwritev/fsync (which release the
GIL) and hand completions back to the event loop in batches.

Buffered I/O stays here whatever the engine: Linux AIO (``linuxaio.py``, which extends
this class) runs ``io_submit`` synchronously on buffered files. Direct I/O goes to the
kernel's AIO when that engine is in use, since a thread hand-off per request costs a
worker wake-up and a fight for the GIL with the loop (docs/architecture.md, "I/O engine").

Completions are batched: a worker appends its result to a deque and writes the eventfd
only when no wake-up is pending yet, so a burst of completions costs one wake-up.

What cannot block is not handed off at all (up to 1 MiB a request): reads and writes of
files in memory (tmpfs) and reads the page cache holds (RWF_NOWAIT) run on the loop
thread, where the copy costs less than the hand-off (4 KiB random writes on tmpfs over
NBD: 11k IOPS through workers, 28k inline). So do buffered writes of whole pages (offset
and length multiples of 4 KiB, no RWF_DSYNC) to a file whose reads go through the page
cache: they are a copy into it that reads nothing first (Linux has no RWF_NOWAIT for
them on ext4), and wait only when the kernel throttles a writer with too much dirty
data, which it would do to a worker the same. The reference tapdisk does the same on a
file it opens without O_DIRECT (``-D``): libaio's io_submit writes it synchronously.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import fcntl
import functools
import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from blktap.io import syscalls
from blktap.io.engine import Engine, Settled, settled
from blktap.io.iov import IOV_MAX, advance, total, zero_fill

T = TypeVar("T")

DEFAULT_THREADS = 16
# Requests up to this size are first tried on the loop thread without blocking (reads of
# memory or page cache, writes to memory; see below).
INLINE_MAX = 1 << 20
# Buffered writes done inline are of whole pages of the page cache (see the docstring).
PAGE = 4096

# How reads on a descriptor may be tried inline: RWF_NOWAIT (the kernel fails with EAGAIN
# instead of blocking), MEMORY (tmpfs/ramfs: a read is a memory copy and never waits for
# a device), or not at all: THREAD (buffered, not cached), DIRECT (O_DIRECT to a device,
# which an engine with kernel AIO submits there).
NOWAIT, MEMORY, THREAD, DIRECT = 1, 2, 3, 4


def read_full(fd: int, iov: Sequence[memoryview], offset: int) -> None:
    """preadv until ``iov`` is full; past the end of the file, zeros."""
    rest = list(iov)
    while rest:
        got = os.preadv(fd, rest[:IOV_MAX], offset)
        if got <= 0:
            zero_fill(rest)
            return
        offset += got
        rest = advance(rest, got)


def write_full(fd: int, iov: Sequence[memoryview], offset: int, flags: int = 0) -> None:
    """pwritev until every byte of ``iov`` is written."""
    rest = list(iov)
    while rest:
        done = os.pwritev(fd, rest[:IOV_MAX], offset, flags) if flags else \
            os.pwritev(fd, rest[:IOV_MAX], offset)
        if done <= 0:
            raise OSError(5, "short write")
        offset += done
        rest = advance(rest, done)


def sync(fd: int, datasync: bool) -> None:
    if datasync:
        os.fdatasync(fd)
    else:
        os.fsync(fd)


class ThreadEngine(Engine):
    """An engine backed by ``threads`` worker threads, bound to the running loop."""

    name = "threads"

    def __init__(self, threads: int = DEFAULT_THREADS,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done: collections.deque = collections.deque()
        self._signalled = False
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.loop.add_reader(self._efd, self._complete)
        self._threads = [threading.Thread(target=self._worker, name=f"blktap-io-{i}",
                                          daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()
        self._closed = False
        self.submitted = 0
        self.inline_reads = 0
        self.inline_writes = 0
        # Per descriptor; drivers call forget() before closing one.
        self._fd_modes: dict[int, int] = {}

    # ------------------------------------------------------------------ workers
    def _worker(self) -> None:
        get = self._jobs.get
        done = self._done
        while True:
            job = get()
            if job is None:
                return
            fut, fn, args = job
            token = fut.token
            if token is not None:
                try:
                    token.pop()
                except IndexError:
                    continue  # cancelled before it started: never run
            try:
                result = (fn(*args), None)
            except BaseException as exc:  # handed to the waiting coroutine
                result = (None, exc)
            done.append((fut, result))
            if not self._signalled:
                self._signalled = True
                try:
                    os.eventfd_write(self._efd, 1)
                except OSError:  # closed while shutting down
                    return

    def _complete(self) -> None:
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass
        self._signalled = False
        done = self._done
        while done:
            fut, (value, exc) = done.popleft()
            if fut.cancelled():
                continue
            if exc is None:
                fut.set_result(value)
            else:
                fut.set_exception(exc)

    # ------------------------------------------------------------------ interface
    def _submit(self, fn: Callable[..., T], args: tuple) -> Settled:
        if self._closed:
            raise RuntimeError("I/O engine is closed")
        fut = settled(self.loop)
        self._jobs.put((fut, fn, args))
        self.submitted += 1
        return fut

    def _fd_mode(self, fd: int) -> int:
        """How I/O on ``fd`` may be done inline: MEMORY (always), NOWAIT (reads with
        RWF_NOWAIT), THREAD or DIRECT (never); learnt once per descriptor."""
        mode = self._fd_modes.get(fd)
        if mode is None:
            if syscalls.in_memory(fd):  # even through O_DIRECT: no device to wait for
                mode = MEMORY
            elif fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                mode = DIRECT  # direct reads go to the device: never inline
            else:
                try:
                    os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
                    mode = NOWAIT
                except OSError as exc:
                    mode = NOWAIT if exc.errno == errno.EAGAIN else THREAD
            self._fd_modes[fd] = mode
        return mode

    def try_preadv(self, fd: int, iov: Sequence[memoryview], offset: int) -> bool:
        length = len(iov[0]) if len(iov) == 1 else total(iov)
        if length > INLINE_MAX or len(iov) > IOV_MAX:
            return False
        mode = self._fd_modes.get(fd) or self._fd_mode(fd)
        if mode >= THREAD:
            return False
        if mode == MEMORY:
            got = os.preadv(fd, iov, offset)
            if got < length:  # end of file: the rest reads as zeros
                zero_fill(advance(iov, got))
        else:
            try:
                got = os.preadv(fd, iov, offset, os.RWF_NOWAIT)
            except BlockingIOError:
                return False
            if got < length:  # part of it is not cached (or end of file)
                return False
        self.inline_reads += 1
        return True

    def inline_mode(self, fd: int) -> str | None:
        mode = self._fd_modes.get(fd) or self._fd_mode(fd)
        return "memory" if mode == MEMORY else "nowait" if mode == NOWAIT else None

    def count_inline(self, reads: int, writes: int) -> None:
        self.inline_reads += reads
        self.inline_writes += writes

    async def preadv(self, fd: int, iov: Sequence[memoryview], offset: int) -> None:
        """Reads that the kernel can serve without waiting (page cache, tmpfs) are done
        on the loop thread: a thread hand-off costs more than the copy. Anything else
        goes to a worker."""
        if not self.try_preadv(fd, iov, offset):
            await self._submit(read_full, (fd, iov, offset))

    def forget(self, fd: int) -> None:
        """Drop what was learnt about ``fd`` (call before closing it)."""
        self._fd_modes.pop(fd, None)

    def try_pwritev(self, fd: int, iov: Sequence[memoryview], offset: int, *,
                    dsync: bool = False) -> bool:
        length = len(iov[0]) if len(iov) == 1 else total(iov)
        if length > INLINE_MAX or len(iov) > IOV_MAX:
            return False
        mode = self._fd_modes.get(fd) or self._fd_mode(fd)
        # In the page cache: whole pages only, nothing to read first or wait on the device
        if mode != MEMORY and (mode != NOWAIT or dsync or (offset | length) % PAGE):
            return False
        write_full(fd, iov, offset, os.RWF_DSYNC if dsync else 0)
        self.inline_writes += 1
        return True

    async def pwritev(self, fd: int, iov: Sequence[memoryview], offset: int, *,
                      dsync: bool = False) -> None:
        """Writes to memory (tmpfs) are a copy the loop thread does faster than a
        hand-off; anything else goes to a worker."""
        if not self.try_pwritev(fd, iov, offset, dsync=dsync):
            await self._submit(write_full,
                               (fd, iov, offset, os.RWF_DSYNC if dsync else 0))

    async def fsync(self, fd: int, *, datasync: bool = True) -> None:
        await self._submit(sync, (fd, datasync))

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if kwargs:
            fn = functools.partial(fn, **kwargs)
        return await self._submit(fn, args)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()
        self._complete()
        self.loop.remove_reader(self._efd)
        os.close(self._efd)
