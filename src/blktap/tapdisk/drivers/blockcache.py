"""``bc``: a read-only block cache in memory, shared by the disks of one tapdisk that
read the same parent (flag ADD_CACHE, ``tap-ctl open -b``; the reference's block-cache).

Inserted above the leaf's parent: reads that fall through the leaf are served from pages
in memory. The pages belong to a :class:`SharedCache` per parent file (its device, inode,
size and modification time: a parent changed while no disk had it open gets a new cache),
shared by every disk of the process whose chain has that parent, and dropped when the
last of them closes (or pauses). All caches of the process draw on one :class:`Pool`:
bounded memory (least recently used pages go first) and idle eviction (pages nobody read
for :data:`IDLE_SECONDS` are freed by the pool's sweeper task, which runs only while a
cache exists). Two disks missing the same page wait for one read of it.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import Callable, Sequence

from blktap.io.engine import Engine
from blktap.io.iov import total
from blktap.tapdisk.driver import SECTOR, Driver, Extents, Tally

PAGE = 64 << 10  # bytes per page
DEFAULT_LIMIT = 32 << 20  # bytes of pages per process (the reference: 10 MiB)
IDLE_SECONDS = 60.0  # the reference prunes pages idle for 60 s
ENV_LIMIT = "BLKTAP_BLOCK_CACHE_MB"

Key = tuple[int, int]  # (cache id, page number)


class Pool:
    """The pages of every cache in the process: least recently used first."""

    def __init__(self, limit: int = DEFAULT_LIMIT, idle: float = IDLE_SECONDS, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = max(PAGE, limit)
        self.idle = idle
        self.clock = clock
        self.pages: collections.OrderedDict[Key, tuple[bytearray, float]] = \
            collections.OrderedDict()
        self.used = 0
        self.evicted = 0
        self.caches: dict[tuple, SharedCache] = {}
        self._next_id = 0
        self._sweeper: asyncio.Task | None = None

    # ------------------------------------------------------------------ caches
    def cache_for(self, driver: Driver) -> SharedCache:
        """The shared cache of the file below ``driver`` (one more user)."""
        ident = _identity(driver)
        cache = self.caches.get(ident)
        if cache is None:
            cache = SharedCache(self, ident, self._next_id, driver.size)
            self._next_id += 1
            self.caches[ident] = cache
        cache.users += 1
        return cache

    def release(self, cache: SharedCache) -> None:
        cache.users -= 1
        if cache.users > 0:
            return
        self.caches.pop(cache.ident, None)
        for key in [k for k in self.pages if k[0] == cache.id]:
            self._drop(key)
        if not self.caches and self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def _arm(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self.idle / 4))
            self.evict_idle()

    # ------------------------------------------------------------------ pages
    def get(self, key: Key) -> bytearray | None:
        entry = self.pages.get(key)
        if entry is None:
            return None
        self.pages[key] = (entry[0], self.clock())
        self.pages.move_to_end(key)
        return entry[0]

    def put(self, key: Key, page: bytearray) -> None:
        if key in self.pages:
            return
        while self.used + len(page) > self.limit and self.pages:
            self._drop(next(iter(self.pages)))
            self.evicted += 1
        self.pages[key] = (page, self.clock())
        self.used += len(page)
        self._arm()

    def _drop(self, key: Key) -> None:
        page, _ = self.pages.pop(key)
        self.used -= len(page)

    def evict_idle(self) -> int:
        """Free the pages nobody read for ``idle`` seconds (oldest first: stops at the
        first recent one)."""
        limit = self.clock() - self.idle
        n = 0
        while self.pages:
            key, (_page, stamp) = next(iter(self.pages.items()))
            if stamp > limit:
                break
            self._drop(key)
            n += 1
        self.evicted += n
        return n


def _identity(driver: Driver) -> tuple:
    fd = getattr(driver, "fd", None)
    if fd is None:  # the qcow2 driver keeps it in its image
        fd = getattr(getattr(driver, "image", None), "fd", None)
    if isinstance(fd, int) and fd >= 0:
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return ("driver", id(driver))  # nothing to share it by


class SharedCache:
    """The pages of one parent file, shared by the disks that read it."""

    def __init__(self, pool: Pool, ident: tuple, cache_id: int, size: int) -> None:
        self.pool = pool
        self.ident = ident
        self.id = cache_id
        self.size = size
        self.users = 0
        self.hits = 0  # pages, all users
        self.misses = 0
        self.loading: dict[int, asyncio.Future] = {}


_default_pool: Pool | None = None


def default_pool() -> Pool:
    """The process's pool (its size from ``$BLKTAP_BLOCK_CACHE_MB``)."""
    global _default_pool
    if _default_pool is None:
        try:
            limit = int(os.environ.get(ENV_LIMIT, "")) << 20
        except ValueError:
            limit = DEFAULT_LIMIT
        _default_pool = Pool(limit or DEFAULT_LIMIT)
    return _default_pool


class BlockCacheDriver(Driver):
    name = "bc"
    type_id = 7

    def __init__(self, engine: Engine, parent: Driver, pool: Pool | None = None) -> None:
        super().__init__(engine, parent.size, writable=False, parent=parent)
        self.caps = parent.caps
        self.path = parent.path
        self.pool = pool or default_pool()
        self.shared = self.pool.cache_for(parent)
        self.page_hits = 0  # pages, this disk
        self.page_misses = 0
        self._closed = False

    @classmethod
    def insert(cls, engine: Engine, top: Driver, pool: Pool | None = None
               ) -> BlockCacheDriver | None:
        """Put a cache above the leaf's parent in the stack ``top`` (the first layer
        that other disks may share: parents are opened read-only); None when the leaf
        has no parent. Filters above the leaf (valve) are passed over."""
        leaf = top
        while leaf.name in ("valve", "log") and leaf.parent is not None:
            leaf = leaf.parent
        if leaf.parent is None:
            return None
        bc = cls(engine, leaf.parent, pool)
        leaf.parent = bc
        return bc

    # ------------------------------------------------------------------ reads
    def _page_view(self, page_no: int) -> memoryview | None:
        page = self.pool.get((self.shared.id, page_no))
        return None if page is None else memoryview(page)

    async def _load(self, page_no: int) -> memoryview:
        """The page, read from below once however many disks want it at the same time
        (a reader whose leader failed or was cancelled reads it itself)."""
        shared = self.shared
        while (pending := shared.loading.get(page_no)) is not None:
            await asyncio.wait([pending])
            if not pending.cancelled() and pending.exception() is None:
                return pending.result()
            view = self._page_view(page_no)
            if view is not None:
                return view
        fut = asyncio.get_running_loop().create_future()
        shared.loading[page_no] = fut
        try:
            start = page_no * PAGE
            page = bytearray(min(PAGE, self.size - start))
            await self.forward_read(start, [memoryview(page)])
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(exc)
                fut.exception()  # retrieved: nobody logs it as lost
            raise
        finally:
            shared.loading.pop(page_no, None)
        if not self._closed:
            self.pool.put((shared.id, page_no), page)
        fut.set_result(memoryview(page))
        return memoryview(page)

    async def read(self, offset: int, iov: Sequence[memoryview]) -> None:
        length = total(iov)
        end = offset + length
        first, last = offset // PAGE, (end - 1) // PAGE
        pos = offset
        dst = _Cursor(iov)
        for page_no in range(first, last + 1):
            view = self._page_view(page_no)
            if view is None:
                self.page_misses += 1
                self.shared.misses += 1
                view = await self._load(page_no)
            else:
                self.page_hits += 1
                self.shared.hits += 1
            lo = pos - page_no * PAGE
            hi = min(end, (page_no + 1) * PAGE) - page_no * PAGE
            dst.put(view[lo:hi])
            pos += hi - lo

    def read_now(self, offset: int, iov: Sequence[memoryview], tally: Tally) -> bool:
        length = len(iov[0]) if len(iov) == 1 else total(iov)
        end = offset + length
        first, last = offset // PAGE, (end - 1) // PAGE
        views = []
        for page_no in range(first, last + 1):
            view = self._page_view(page_no)
            if view is None:
                return False
            views.append(view)
        dst = _Cursor(iov)
        pos = offset
        for page_no, view in zip(range(first, last + 1), views, strict=True):
            lo = pos - page_no * PAGE
            hi = min(end, (page_no + 1) * PAGE) - page_no * PAGE
            dst.put(view[lo:hi])
            pos += hi - lo
        self.page_hits += len(views)
        self.shared.hits += len(views)
        return True

    async def block_status(self, offset: int, length: int) -> Extents:
        return await self.forward_block_status(offset, length)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.pool.release(self.shared)

    def describe(self) -> dict:
        shared = self.shared
        status = {
            "page_size": PAGE,
            "hits": self.page_hits,  # pages, this disk
            "misses": self.page_misses,
            "shared": {"users": shared.users, "hits": shared.hits, "misses": shared.misses},
            "pool": {"bytes": self.pool.used, "limit": self.pool.limit,
                     "pages": len(self.pool.pages), "evicted": self.pool.evicted},
        }
        return {"type": self.type_id, "name": self.name, "status": status}


class _Cursor:
    """Copies consecutive pieces into an iovec."""

    __slots__ = ("iov", "i", "off")

    def __init__(self, iov: Sequence[memoryview]) -> None:
        self.iov = iov
        self.i = 0
        self.off = 0

    def put(self, src: memoryview) -> None:
        while len(src):
            dst = self.iov[self.i]
            n = min(len(dst) - self.off, len(src))
            dst[self.off : self.off + n] = src[:n]
            src = src[n:]
            self.off += n
            if self.off == len(dst):
                self.i += 1
                self.off = 0


assert PAGE % SECTOR == 0
