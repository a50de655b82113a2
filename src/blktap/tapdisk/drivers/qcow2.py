"""``qcow2``: one qcow2 layer over the image library.

As for ``vhd``: the library (:class:`~blktap.image.qcow2.image.Qcow2Image`) is synchronous
and not thread-safe, so one lock per image covers what touches metadata (finding runs when
an L2 table must be read, allocation in the library's crash-safe order, discard, zeroing,
flush, close), and data moves outside it: reads of data clusters, and writes to clusters
the image owns already (COPIED, allocated), go straight to the engine.

A write into a cluster the image does not own copies the rest of the cluster up from
below. The layers below are drivers here (a raw parent is an ``aio`` driver), not library
objects, so the parts of the first and last clusters the write does not cover are read
through the driver stack first (asynchronously), and the library's ``read_below`` is
served from that buffer while it allocates.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from blktap.image.fileio import is_regular
from blktap.image.qcow2 import image as q2
from blktap.image.qcow2.image import Qcow2Image
from blktap.io.engine import Engine
from blktap.io.iov import copy_into, slice_iov, total, zero_fill
from blktap.tapdisk.driver import (
    SECTOR,
    STATE_DATA,
    STATE_HOLE,
    STATE_ZERO,
    Caps,
    Driver,
    Extents,
    InlineChain,
    InlineTarget,
    OpenContext,
    Tally,
    inline_file,
    merge_extents,
)
from blktap.tapdisk.drivers.vhd import gather_all

Run = tuple[int, int, int, int]  # start byte, length, kind, host offset
# What a run of each kind reads as; the others (holes) are for the backing file to say.
KIND_STATE = {q2.DATA: STATE_DATA, q2.COMPRESSED: STATE_DATA, q2.ZERO: STATE_HOLE | STATE_ZERO}


class Qcow2Driver(Driver):
    name = "qcow2"
    # Past the reference's table (which ends at 16): qcow2 is not one of its drivers.
    type_id = 17

    @classmethod
    def open_layer(cls, ctx: OpenContext, args: str) -> Driver:
        """The image and its backing chain (the library's chain checks)."""
        from blktap.tapdisk.drivers.images import open_image_chain
        return open_image_chain(ctx, "qcow2", args)

    def __init__(self, engine: Engine, image: Qcow2Image, parent: Driver | None) -> None:
        super().__init__(engine, image.size, writable=image.writable, parent=parent)
        self.image = image
        self.path = image.path
        self.fd = image.fd
        self.data_fd = image.data_fd
        self.lock = threading.Lock()
        self.regular = is_regular(image.fd)
        # Served from a buffer read through the stack, only while the lock is held.
        image.read_below = None
        # Held by a transport's compiled inline path for each pass, and by the library
        # while it frees clusters: a cluster it found in an L2 entry stays this disk's
        # while the pass uses it (inline_target).
        self.free_guard = threading.Lock()
        image.free_guard = self.free_guard
        self._inline: InlineTarget | None = None
        self._inline_chain: InlineChain | None = None  # the layers it reads below
        if image.writable:
            # Writes to owned clusters go around the library (here and inline): the
            # autoclear bits of what they would leave stale (bitmaps) go first, as the
            # format asks of a program opening an image read-write.
            image.clear_autoclear()
        self.caps = Caps.BLOCK_STATUS | Caps.FLUSH
        if image.writable:
            self.caps |= Caps.WRITE | Caps.FUA | Caps.ZERO | Caps.FAST_ZERO | Caps.TRIM

    # ------------------------------------------------------------------ metadata
    def _runs_locked(self, offset: int, length: int) -> list[Run]:
        with self.lock:
            return list(self.image.runs(offset, length))

    def _runs_now(self, offset: int, length: int) -> list[Run] | None:
        if not self.lock.acquire(blocking=False):
            return None
        try:
            if not self.image.metadata_cached(offset, length):
                return None
            return list(self.image.runs(offset, length))
        finally:
            self.lock.release()

    async def _runs(self, offset: int, length: int) -> list[Run]:
        runs = self._runs_now(offset, length)
        if runs is not None:
            return runs
        return await self.engine.call(self._runs_locked, offset, length)

    def _inflate_locked(self, cluster: int) -> bytes | None:
        """The cluster's bytes, or None if it is no longer compressed: a write to another
        part of it made it a data cluster (and released the compressed bytes) since its
        runs were found. The reader then reads that piece again."""
        with self.lock:
            if not self.image.compressed(cluster):
                return None
            return self.image.inflate(cluster)

    # ------------------------------------------------------------------ reads
    async def read(self, offset: int, iov: Sequence[memoryview]) -> None:
        length = total(iov)
        quick = self.image.quick_lookup(offset, length)
        if quick is not None and quick[0] == q2.DATA:
            await self.engine.preadv(self.data_fd, iov, quick[1])
            return
        runs = await self._runs(offset, length)
        if len(runs) == 1 and runs[0][2] == q2.DATA:
            await self.engine.preadv(self.data_fd, iov, runs[0][3])
            return
        ops = []
        cs = self.image.cluster_size
        for start, n, kind, host in runs:
            sub = slice_iov(iov, start - offset, n)
            if kind == q2.DATA:
                ops.append(self.engine.preadv(self.data_fd, sub, host))
            elif kind == q2.ZERO:
                zero_fill(sub)
            elif kind == q2.HOLE:
                ops.append(self.forward_read(start, sub))
            else:
                data = await self.engine.call(self._inflate_locked, host)
                if data is None:  # rewritten meanwhile: what it holds now
                    ops.append(self.read(start, sub))
                    continue
                within = start - host * cs
                copy_into(sub, memoryview(data)[within : within + n])
        if ops:
            await gather_all(ops)

    def read_now(self, offset: int, iov: Sequence[memoryview], tally: Tally) -> bool:
        length = len(iov[0]) if len(iov) == 1 else total(iov)
        quick = self.image.quick_lookup(offset, length)
        if quick is not None:
            kind, host, _owned = quick
            if kind == q2.DATA:
                return self.engine.try_preadv(self.data_fd, iov, host)
            if kind == q2.ZERO:
                zero_fill(iov)
                return True
            return self.forward_read_now(offset, iov, tally)  # HOLE
        runs = self._runs_now(offset, length)
        if runs is None:
            return False
        for start, n, kind, host in runs:
            sub = iov if len(runs) == 1 else slice_iov(iov, start - offset, n)
            if kind == q2.DATA:
                if not self.engine.try_preadv(self.data_fd, sub, host):
                    return False
            elif kind == q2.ZERO:
                zero_fill(sub)
            elif kind == q2.HOLE:
                if not self.forward_read_now(start, sub, tally):
                    return False
            else:
                return False
        return True

    def inline_target(self) -> InlineTarget | None:
        # The image's own data clusters, found through its L1 table and the cached L2
        # tables (the compiled path looks them up as quick_lookup does, without the
        # interpreter lock); its holes are its parents' (the layers below, read-only,
        # each answering for itself: InlineChain), or zeros without one, and so are its
        # zero clusters (version 3). Compressed clusters, tables not in the cache,
        # subclusters and a separate data file are the Python path's. The library
        # stores a new cluster's entry after its data and frees a cluster only after its
        # entry changed, under free_guard (which the transport holds for each pass).
        target = self._inline
        if target is not None and target.l1 is self.image.l1:
            return target
        own = self.inline_layer()  # (learnt again after a resize: a new L1 table)
        if own is None:
            return None
        self._inline, self._inline_chain = InlineChain.over(
            self, own._replace(guard=self.free_guard))
        return self._inline

    def inline_layer(self) -> InlineTarget | None:
        img = self.image
        if not img.plain_entries or img.data_fd != img.fd or not self.regular:
            return None
        return inline_file(self.engine, self.fd, self.size, self.writable, l1=img.l1,
                           l2_tables=img.l2_cache, cluster_bits=img.cluster_bits,
                           l2_entries=img.l2_entries, zero_flag=img.version >= 3)

    def settle_hits(self) -> None:
        if self._inline_chain is not None:
            self._inline_chain.settle()

    # ------------------------------------------------------------------ writes
    def _owned_now(self, offset: int, length: int) -> int | None:
        """Where the range can be written in place, if that is known at once: one lookup
        for a range in one owned cluster, else the library's walk when nothing must be
        read (and the lock is free)."""
        quick = self.image.quick_lookup(offset, length)
        if quick is not None and quick[2]:
            return quick[1]
        return self._in_place_now(offset, length)

    def _in_place_now(self, offset: int, length: int) -> int | None:
        if not self.lock.acquire(blocking=False):
            return None
        try:
            if not self.image.metadata_cached(offset, length):
                return None
            return self.image.in_place(offset, length)
        finally:
            self.lock.release()

    def _in_place_locked(self, offset: int, length: int) -> int | None:
        with self.lock:
            return self.image.in_place(offset, length)

    async def _below_of(self, offset: int, length: int) -> Callable[[int, int, memoryview],
                                                                      None] | None:
        """Read what lies below the partly covered first and last clusters of a range,
        and return a read_below for the library serving from it."""
        img = self.image
        if img.backing_file is None:
            return None
        cs = img.cluster_size
        first = offset // cs * cs
        last = (offset + length - 1) // cs * cs
        end = -(-img.size // SECTOR) * SECTOR
        parts: dict[int, bytearray] = {}
        for start in sorted({first, last}):
            n = min(cs, end - start)
            if offset <= start and start + n <= offset + length:
                continue  # wholly overwritten: nothing below is needed
            buf = bytearray(n)
            await self.forward_read(start, [memoryview(buf)])
            parts[start] = buf

        def read_below(sector: int, count: int, view: memoryview) -> None:
            pos = sector * SECTOR
            base = pos // cs * cs
            buf = parts.get(base)
            if buf is None:  # the library asked for a cluster the write covers wholly
                raise RuntimeError(f"{img.path}: no copy of the clusters below at {pos}")
            view[: count * SECTOR] = memoryview(buf)[pos - base : pos - base + count * SECTOR]

        return read_below

    def _locked(self, below: Callable | None, fn: Callable, *args: object) -> None:
        with self.lock:
            self.image.read_below = below
            try:
                fn(*args)
            finally:
                self.image.read_below = None

    def _write_views(self, offset: int, iov: Sequence[memoryview]) -> None:
        # One buffer for the library: a cluster split between two views would otherwise
        # be copied up from below twice (and the buffer read below covers only the first
        # and last clusters of the whole request). This is the allocating path, where
        # the copy-on-write costs a cluster's copy anyway.
        data = iov[0] if len(iov) == 1 else memoryview(b"".join(iov))
        self.image.write(offset // SECTOR, data)

    async def write(self, offset: int, iov: Sequence[memoryview], *, fua: bool = False) -> None:
        self._require_writable()
        length = total(iov)
        host = self._owned_now(offset, length)
        if host is None and not self.image.metadata_cached(offset, length):
            host = await self.engine.call(self._in_place_locked, offset, length)
        if host is not None:
            await self.engine.pwritev(self.fd, iov, host, dsync=fua)
            return
        below = await self._below_of(offset, length)
        await self.engine.call(self._locked, below, self._write_views, offset, iov)
        if fua:
            await self.flush()

    def write_now(self, offset: int, iov: Sequence[memoryview], *, fua: bool = False) -> bool:
        if not self.writable:
            return False
        host = self._owned_now(offset, len(iov[0]) if len(iov) == 1 else total(iov))
        if host is None:
            return False
        return self.engine.try_pwritev(self.fd, iov, host, dsync=fua)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = True,
                           fast: bool = False, fua: bool = False) -> None:
        self._require_writable()
        cs = self.image.cluster_size
        if fast and (offset % cs or length % cs) and offset + length != self.size:
            raise self._slow_zeroing()
        below = await self._below_of(offset, length)
        await self.engine.call(self._locked, below, self.image.write_zeroes,
                               offset // SECTOR, length // SECTOR)
        if fua:
            await self.flush()

    async def discard(self, offset: int, length: int) -> None:
        self._require_writable()
        await self.engine.call(self._locked, None, self.image.discard, offset // SECTOR,
                               length // SECTOR)

    def _flush_locked(self) -> None:
        with self.lock:
            self.image.flush()

    async def flush(self) -> None:
        if self.writable:
            await self.engine.call(self._flush_locked)

    # ------------------------------------------------------------------ status
    async def block_status(self, offset: int, length: int) -> Extents:
        runs = await self._runs(offset, length)
        out: Extents = []
        for start, n, kind, _host in runs:
            if kind in KIND_STATE:
                out.append((n, KIND_STATE[kind]))
            else:
                below = await self.forward_block_status(start, n)
                out.extend(below)
                if sum(m for m, _ in below) < n:
                    break
        return merge_extents(out)

    def status_now(self, offset: int, length: int) -> Extents | None:
        # The common case first, cheap and without the lock: one cached L2 entry (as
        # vhd reads its BAT: a racing write may be seen or not, as for any read).
        quick = self.image.quick_lookup(offset, length)
        if quick is not None:
            if quick[0] == q2.HOLE:
                return self.forward_status_now(offset, length)
            return [(length, KIND_STATE[quick[0]])]
        runs = self._runs_now(offset, length)
        if runs is None:
            return None
        if len(runs) == 1 and runs[0][2] == q2.DATA:
            return [(length, STATE_DATA)]
        out: Extents = []
        for start, n, kind, _host in runs:
            if kind in KIND_STATE:
                out.append((n, KIND_STATE[kind]))
            else:
                below = self.forward_status_now(start, n)
                if below is None:
                    return None
                out.extend(below)
        return out

    def _close_locked(self) -> None:
        with self.lock:
            self.image.close()

    async def close(self) -> None:
        self.engine.forget(self.fd)
        if self.data_fd != self.fd:
            self.engine.forget(self.data_fd)
        await self.engine.call(self._close_locked)
