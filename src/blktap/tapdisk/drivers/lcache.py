"""``lc``: the local parent cache (``tap-ctl open -r``, IntelliCache's read caching).

Inserted between the leaf and its parent, as the reference's block-lcache: a read the
leaf does not hold comes here, is read from the parents, and what they returned is then
written into the leaf (:meth:`VhdDriver.fill`: only where the leaf still holds nothing,
so a guest's write that landed meanwhile is never overwritten). The next read of those
sectors is served by the leaf, from the local file, and never reaches the parents.

The write-back completes before the read does (no copy of the data, and once a read is
answered its sectors are in the leaf). It is turned off, and the reads go on from the
parents, when the leaf's file system runs low (less than :data:`LOW_WATER` free, checked
at most once a second) or a fill fails with ENOSPC (or any other error); it is turned on
again when a later check finds room. A read never fails because of the cache.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable, Sequence

from blktap.errors import BlktapError, UnsupportedImage
from blktap.io.engine import Engine
from blktap.io.iov import total
from blktap.tapdisk.driver import SECTOR, Driver, Extents, Tally
from blktap.tapdisk.drivers.vhd import VhdDriver

log = logging.getLogger("blktap.lcache")

LOW_WATER = 2 << 20  # bytes free below which the cache stops filling (the reference's)
CHECK_INTERVAL = 1.0  # seconds between free-space checks


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class LocalCacheDriver(Driver):
    name = "lc"
    type_id = 11

    def __init__(self, engine: Engine, leaf: VhdDriver, parent: Driver, *,
                 low_water: int = LOW_WATER, clock: Callable[[], float] = time.monotonic,
                 free: Callable[[str], int] = free_bytes) -> None:
        super().__init__(engine, parent.size, writable=False, parent=parent)
        self.caps = parent.caps
        self.leaf = leaf
        self.path = leaf.path  # the file it fills
        self.low_water = low_water
        self.clock = clock
        self.free = free
        self.dir = os.path.dirname(os.path.abspath(leaf.path)) or "/"
        self.enabled = True
        self.reason = ""
        self._checked = float("-inf")
        self._room = 0  # free bytes at the last check, less what was filled since
        # Sectors: read from the parents (misses), written into the leaf, not written.
        self.misses = 0
        self.filled = 0
        self.skipped = 0
        self.errors = 0

    @classmethod
    def insert(cls, engine: Engine, top: Driver, **kw: object) -> LocalCacheDriver | None:
        """Put a cache between the leaf of the stack ``top`` (filters above it are
        skipped) and its parent. None when the leaf has no parent (nothing to cache, as
        the reference does for a one-image chain); EOPNOTSUPP when the leaf cannot be
        filled (not a VHD), EROFS when it is read-only."""
        leaf: Driver | None = top
        while leaf is not None and leaf.name in _FILTER_NAMES:
            leaf = leaf.parent
        if leaf is None or leaf.parent is None:
            return None
        if not isinstance(leaf, VhdDriver):
            raise UnsupportedImage(f"{leaf.path}: the local cache (-r) needs a VHD leaf, "
                                   f"not {leaf.name}", errno.EOPNOTSUPP)
        if not leaf.writable:
            raise BlktapError(f"{leaf.path}: the local cache (-r) writes into the leaf; "
                              "it cannot be read-only", errno.EROFS)
        lc = cls(engine, leaf, leaf.parent, **kw)  # type: ignore[arg-type]
        leaf.parent = lc
        return lc

    # ------------------------------------------------------------------ the switch
    def _may_fill(self, nbytes: int) -> bool:
        """Whether to fill ``nbytes`` now: the free space is asked at most once a
        second, and what the fills write in between is taken off the last answer (a
        file system shared with others may still fill up: that is ENOSPC's case)."""
        now = self.clock()
        if now - self._checked < CHECK_INTERVAL:
            if self.enabled and self._room - nbytes < self.low_water:
                self._turn_off(f"{self.dir}: about {self._room} bytes free, "
                               f"less than {self.low_water}")
            self._room -= nbytes
            return self.enabled
        self._checked = now
        try:
            room = self.free(self.dir)
        except OSError as exc:
            room, why = 0, f"statvfs: {exc.strerror}"
        else:
            why = f"{room} bytes free"
        self._room = room - nbytes
        if room - nbytes < self.low_water:
            self._turn_off(f"{self.dir}: {why}, less than {self.low_water}")
        elif not self.enabled:
            self.enabled = True
            self.reason = ""
            log.warning("%s: local cache on again (%d bytes free)", self.leaf.path, room)
        return self.enabled

    def _turn_off(self, why: str) -> None:
        if self.enabled:
            log.warning("%s: local cache off: %s", self.leaf.path, why)
        self.enabled = False
        self.reason = why
        self._checked = self.clock()  # look again in a second

    # ------------------------------------------------------------------ reads
    async def read(self, offset: int, iov: Sequence[memoryview]) -> None:
        await self.forward_read(offset, iov)
        n = total(iov) // SECTOR
        self.misses += n
        if not self._may_fill(n * SECTOR):
            self.skipped += n
            return
        try:
            written = await self.leaf.fill(offset, iov)
        except (OSError, BlktapError) as exc:
            self.errors += 1
            self.skipped += n
            code = getattr(exc, "errno", None)
            self._turn_off(os.strerror(code) if code == errno.ENOSPC else str(exc))
            return
        self.filled += written  # (not "+= await": other reads' fills finish meanwhile)

    def read_now(self, offset: int, iov: Sequence[memoryview], tally: Tally) -> bool:
        """Only while the cache is off, and not when it is time to look at the free space
        again (that look, and a fill once there is room, are the coroutine's): else a
        cache turned off would never turn on again while reads took this way."""
        if self.enabled or self.clock() - self._checked >= CHECK_INTERVAL:
            return False
        if not self.forward_read_now(offset, iov, tally):
            return False
        n = (len(iov[0]) if len(iov) == 1 else total(iov)) // SECTOR
        self.misses += n
        self.skipped += n
        return True

    async def block_status(self, offset: int, length: int) -> Extents:
        return await self.forward_block_status(offset, length)

    def describe(self) -> dict:
        leaf_reads = self.leaf.hits[0]
        status = {
            "enabled": self.enabled,
            "reason": self.reason or None,
            # Sectors the leaf served itself (its own and cached data), and those that
            # fell through to the parents.
            "hits": max(0, leaf_reads - self.misses),
            "misses": self.misses,
            "filled": self.filled,
            "skipped": self.skipped,
            "errors": self.errors,
        }
        return {"type": self.type_id, "name": self.name, "status": status}


_FILTER_NAMES = frozenset({"valve", "log", "lc", "bc"})
