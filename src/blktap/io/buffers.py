"""Reusable, page-aligned data buffers, and the memory budget they are charged to.

Request payloads land in and leave from these: anonymous private mmaps are page aligned
(usable with O_DIRECT) and zero-filled by the kernel, and a freed buffer goes back to a
free list of its size class (powers of two from 4 KiB), so the data path allocates
nothing once warm.

Memory goes back to the system, not just to the pool: a buffer the pool does not keep is
emptied at once (``MADV_DONTNEED``: its pages are freed even if a stray reference keeps
the mapping alive until the garbage collector runs), and buffers kept idle are dropped
when nobody asked for one for :data:`IDLE_TRIM_SECONDS` or when the last user leaves.
Large buffers are mmaps of their own, never malloc's, whose heap keeps what it freed.

:class:`MemoryBudget` caps the bytes in use (handed out and not yet given back) across
everything that shares it: by default one per process, so every NBD server of a tapdisk
draws from the same budget. Transports admit a request only when its buffer fits, and
otherwise wait (and stop reading that client) until memory comes back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import mmap
from collections.abc import Iterator
from dataclasses import dataclass, field

MIN_CLASS = 4096
DEFAULT_BUDGET = 256 << 20
# Idle buffers a pool keeps for reuse, and how long it keeps them unused.
DEFAULT_KEEP = 64 << 20
IDLE_TRIM_SECONDS = 2.0


@dataclass(eq=False)
class Buffer:
    """One buffer: ``view`` is exactly the size asked for, ``mem`` the mapping behind it."""

    mem: mmap.mmap
    view: memoryview
    size_class: int
    pooled: bool = field(default=True)


def size_class(size: int) -> int:
    """The bytes a buffer of ``size`` bytes takes (what a budget is charged)."""
    if size <= MIN_CLASS:  # (most requests: one comparison, no calls)
        return MIN_CLASS
    return 1 << (size - 1).bit_length()


def _empty(mem: mmap.mmap) -> None:
    """Give a mapping's pages back to the system now (it reads as zeros afterwards)."""
    try:
        mem.madvise(mmap.MADV_DONTNEED)
    except (OSError, ValueError):
        pass  # closed already, or no madvise: the pages go with the mapping


# Below this a scratch buffer is a bytearray; above, a mapping of its own.
SCRATCH_MMAP = 128 << 10


@contextlib.contextmanager
def scratch_buffer(size: int) -> Iterator[memoryview]:
    """A temporary buffer of ``size`` bytes (zeros) whose memory is given back when the
    block ends, whatever still refers to it: a large bytearray would come from malloc,
    whose heap may keep it, and would live on as long as a traceback holds its frame."""
    if size < SCRATCH_MMAP:
        yield memoryview(bytearray(size))
        return
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        yield memoryview(mem)
    finally:
        _empty(mem)


class MemoryBudget:
    """Bytes in use across the pools and transports that share it, at most ``limit``.

    ``take`` succeeds when the bytes fit, or when nothing at all is in use (a request
    larger than the budget still progresses alone, so nothing deadlocks). Waiters are
    served first come, first served: a small request never overtakes a large one that
    waits, and once memory is short nobody takes it ahead of them."""

    def __init__(self, limit: int = DEFAULT_BUDGET) -> None:
        if limit <= 0:
            raise ValueError("a memory budget must be positive")
        self.limit = limit
        self.used = 0
        self.high_water = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future]] = collections.deque()
        # Who holds memory charged here (transports' connections), for those who wait to
        # find one that holds it for nothing (a client that reads no replies).
        self.holders: set[object] = set()

    def fits(self, n: int) -> bool:
        """Whether ``n`` bytes may be taken now (without overtaking a waiter)."""
        if not n:
            return True
        return not self._waiters and (not self.used or self.used + n <= self.limit)

    def take(self, n: int) -> None:
        """Charge ``n`` bytes (after :meth:`fits`, or unconditionally)."""
        self.used += n
        if self.used > self.high_water:
            self.high_water = self.used

    async def acquire(self, n: int) -> None:
        """Charge ``n`` bytes, waiting in line until they fit."""
        if self.fits(n):
            self.take(n)
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(n)  # granted as we were cancelled: give it back
            else:
                self._drop_waiter(fut)
            raise

    def release(self, n: int) -> None:
        """Give back ``n`` bytes charged before; wake the waiters that fit now."""
        self.used -= n
        self._wake()

    def _drop_waiter(self, fut: asyncio.Future) -> None:
        self._waiters = collections.deque(w for w in self._waiters if w[1] is not fut)
        self._wake()  # the head may have changed

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters:
            n, fut = waiters[0]
            if fut.done():
                waiters.popleft()
                continue
            if self.used and self.used + n > self.limit:
                return
            waiters.popleft()
            self.take(n)
            fut.set_result(None)

    @property
    def waiting(self) -> int:
        return len(self._waiters)


_default_budget: MemoryBudget | None = None


def default_budget() -> MemoryBudget:
    """The process's budget (every NBD server of a tapdisk shares it)."""
    global _default_budget
    if _default_budget is None:
        _default_budget = MemoryBudget()
    return _default_budget


class BufferPool:
    """Free lists of mmapped buffers per size class, keeping at most ``keep_bytes`` idle,
    and none once unused for :data:`IDLE_TRIM_SECONDS` (or when :meth:`trim` is told).

    ``budget`` is what its users charge the buffers they hold to (the pool hands out
    buffers regardless: the transport decides when to wait)."""

    def __init__(self, keep_bytes: int = DEFAULT_KEEP,
                 budget: MemoryBudget | None = None) -> None:
        self.keep_bytes = keep_bytes
        self.budget = budget if budget is not None else MemoryBudget()
        self._free: dict[int, list[mmap.mmap]] = {}
        self._idle = 0
        self.allocated = 0  # mappings made so far (for tests and stats)
        self.in_use = 0  # bytes handed out and not given back
        self.held = 0  # buffers handed out and not given back
        self.high_water = 0
        self._gets = 0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> int:
        return self._idle

    def get(self, size: int) -> Buffer:
        cls = size_class(size)
        free = self._free.get(cls)
        if free:
            mem = free.pop()
            self._idle -= cls
        else:
            mem = mmap.mmap(-1, cls, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self.allocated += 1
        self._gets += 1
        self.in_use += cls
        self.held += 1
        if self.in_use > self.high_water:
            self.high_water = self.in_use
        return Buffer(mem, memoryview(mem)[:size], cls)

    def put(self, buf: Buffer) -> None:
        if not buf.pooled:
            return
        buf.pooled = False  # a second put of the same buffer is a no-op
        self.in_use -= buf.size_class
        self.held -= 1
        if self._idle + buf.size_class > self.keep_bytes:
            _empty(buf.mem)  # dropped: its pages go now, the mapping with its last view
            return
        self._free.setdefault(buf.size_class, []).append(buf.mem)
        self._idle += buf.size_class
        self._arm()

    def trim(self, keep: int = 0) -> int:
        """Drop idle buffers, largest first, until at most ``keep`` bytes stay idle;
        returns the bytes given back."""
        if self._timer is not None:  # (perhaps of a loop that is gone: armed again on use)
            self._timer.cancel()
            self._timer = None
        freed = 0
        for cls in sorted(self._free, reverse=True):
            free = self._free[cls]
            while free and self._idle > keep:
                _empty(free.pop())
                self._idle -= cls
                freed += cls
            if not free:
                del self._free[cls]
        return freed

    def _arm(self) -> None:
        """Check again in a while whether the idle buffers were used meanwhile."""
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous user): trim() is theirs to call
        self._timer = loop.call_later(IDLE_TRIM_SECONDS, self._idle_check, self._gets)

    def _idle_check(self, gets: int) -> None:
        self._timer = None
        if not self._idle:
            return
        if self._gets == gets:  # nobody took a buffer since: give them all back
            self.trim()
        else:
            self._arm()


_default_pool: BufferPool | None = None


def default_pool() -> BufferPool:
    """The process's pool, charged to :func:`default_budget`. Not thread-safe: for the
    one event loop of a server process."""
    global _default_pool
    if _default_pool is None:
        _default_pool = BufferPool(budget=default_budget())
    return _default_pool
