"""One VBD served to a Xen guest over a blkif ring.

    frontend ──ring──► BlkifRing ──► VBD (queue, merge, retry, pause, stats) ──► drivers
    (blkfront)  ◄─evtchn─   │ the guest's pages, mapped (persistent grants), or by
                            │ grant copy ▲
                            └─ bounce buffers (one per ring slot, page aligned)

Each request is copied out of the ring, validated, and served through the same VBD as
NBD's: a write copies the guest's segments into the request's own buffer (one
IOCTL_GNTDEV_GRANT_COPY for all of them) and then writes; a read reads into the buffer
and then copies out to the guest's segments. With persistent grants (both ends said
feature-persistent) the guest's pages are mapped the first time a request names them and
kept until disconnect: reads and writes then go straight to them, with no copy and no
buffer (up to MAX_PERSISTENT_GRANTS pages; past that, grant copy). What the VBD's side
door can do at once (data in memory or the page cache) is answered without a task; other
reads and writes go to the VBD the callback way (queued and kicked at the end of the pass
over the ring, answered from their completion: no task per request either); barriers,
flushes and discards get a task. Responses written during one turn of the event loop are published
together, with at most one notification.

Operations: READ, WRITE; WRITE_BARRIER (consumption stops at it; it runs once everything
before it is done, then its data is written and flushed); FLUSH_DISKCACHE (a VBD flush;
with data: write, then flush); DISCARD (a VBD discard, a hint; the secure flag gets
EOPNOTSUPP); INDIRECT (READ or WRITE with up to :data:`MAX_INDIRECT_SEGMENTS` segments
listed in guest pages that are copied in first). Anything a guest gets wrong in a
request is answered BLKIF_RSP_ERROR (or EOPNOTSUPP for an operation we do not know);
a ring whose producer index runs past its size cannot be trusted any more and is
disconnected (that VBD only), with a log line. Nothing a guest writes can stop tapdisk.
"""

from __future__ import annotations

import array
import asyncio
import errno
import logging
import os
from collections import deque
from dataclasses import dataclass, fields

from blktap.errors import BlktapError
from blktap.io.aio_abi import addresses
from blktap.tapdisk.vbd import VBD, VbdState
from blktap.tapdisk.vbd import Request as VbdRequest
from blktap.transport.xen import inline
from blktap.transport.xen.evtchn import Notifier
from blktap.transport.xen.gntdev import (
    Grants,
    GrantSpan,
    Mapping,
    PageBuffers,
    PageMapping,
    Slot,
)
from blktap.transport.xen.ring import BackRing, RingCorrupt
from blktap.transport.xen.structs import (
    DISCARD_SECURE,
    MAX_INDIRECT_PAGES,
    MAX_INDIRECT_SEGMENTS,
    MAX_SEGMENTS,
    PAGE,
    SECTOR,
    SECTORS_PER_PAGE,
    SEGMENTS_PER_INDIRECT_PAGE,
    X86_32,
    Abi,
    Op,
    Request,
    Status,
    parse_segments,
)

log = logging.getLogger("blktap.tapdisk")

# How often a disconnect looks again at a paused VBD whose held requests it must drop.
_STOP_POLL = 0.05
# Guest pages a ring keeps mapped with persistent grants (Linux blkback's default
# max_persistent_grants): 4 MiB of the guest's memory, a 1 MiB request 257 of them. Past
# it, requests naming other grants are served by grant copy.
MAX_PERSISTENT_GRANTS = 1056
# Segment views kept per mapped page (a page is mostly used whole, some split in a few)
SEGMENT_VIEWS_PER_PAGE = 4
# Warnings a ring logs about its requests before it goes quiet (a guest sending bad grants
# at ring speed must not fill the log); the counters go on.
WARNINGS_PER_RING = 20
# Grant references the compiled pass finds pages for (a table of 8 bytes per reference up
# to the highest one mapped): a page mapped under a larger one is served by the Python
# path. Linux blkfront's come from its grant table (32 frames of 512 by default).
MAX_INLINE_GREF = 1 << 20
# Requests one compiled pass serves before the Python path has a turn (one request), so
# that a ring kept full is not served only by the pass.
INLINE_BUDGET = 1024
# _service/_consume: the compiled pass runs before anything is taken from the ring.
PASS_FIRST = -1


class BadRequest(Exception):
    """The guest sent a request we answer with an error status (never raised out)."""

    def __init__(self, why: str, status: int = Status.ERROR) -> None:
        super().__init__(why)
        self.status = status


@dataclass
class BlkifStats:
    """Per-ring counters (what the ring saw; the VBD counts the I/O)."""

    events: int = 0  # notifications from the frontend
    notifies: int = 0  # notifications to the frontend
    reads: int = 0
    writes: int = 0
    barriers: int = 0
    flushes: int = 0
    discards: int = 0
    indirect: int = 0
    segments: int = 0
    max_segments: int = 0  # the largest request seen, in segments
    errors: int = 0  # answered BLKIF_RSP_ERROR
    unsupported: int = 0  # answered BLKIF_RSP_EOPNOTSUPP
    side_door: int = 0  # served at once, without a task
    inline: int = 0  # of those, served by the compiled pass (inline.py)
    mapped: int = 0  # requests served in the guest's own pages (persistent grants)
    grants_mapped: int = 0  # grants kept mapped (persistent grants)
    map_failures: int = 0  # grants that could not be mapped (the request went by copy)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(eq=False)
class Job:
    """A validated request: what to do, where, with which guest pages."""

    req: Request
    op: int  # READ, WRITE, WRITE_BARRIER, FLUSH_DISKCACHE, DISCARD (inner op if indirect)
    offset: int = 0
    length: int = 0
    spans: list[GrantSpan] | None = None
    slot: Slot | None = None
    copied: bool = False  # the guest's data is in the buffer already (writes)
    # The guest's own pages, mapped (persistent grants): the I/O goes straight to them,
    # there is nothing to copy and no buffer.
    iov: list[memoryview] | None = None
    started: VbdRequest | None = None  # the VBD's request, started the callback way


class BlkifRing:
    """One connected ring: consumes its requests, serves them from ``vbd``, answers."""

    def __init__(self, vbd: VBD, grants: Grants, notifier: Notifier, mapping: Mapping,
                 abi: Abi, order: int, *, domid: int, devid: int,
                 max_indirect: int = MAX_INDIRECT_SEGMENTS, name: str = "",
                 persistent: bool = False,
                 max_persistent: int = MAX_PERSISTENT_GRANTS) -> None:
        self.vbd = vbd
        self.grants = grants
        self.notifier = notifier
        self.mapping = mapping
        self.abi = abi
        self.order = order
        self.domid = domid
        self.devid = devid
        self.name = name or f"blkif {domid}/{devid}"
        self.max_indirect = min(max_indirect, MAX_INDIRECT_PAGES * SEGMENTS_PER_INDIRECT_PAGE)
        self.ring = BackRing(mapping.view, abi, order)
        self.stats = BlkifStats()
        self.loop = asyncio.get_running_loop()
        # One bounce buffer per slot: at most ring-size requests are ever unanswered.
        per_request = max(MAX_SEGMENTS, self.max_indirect) * PAGE
        self.buffers = PageBuffers(self.ring.size, per_request)
        # Persistent grants (both ends said feature-persistent): the frontend reuses a
        # pool of granted pages and never revokes one we hold mapped, so a grant mapped
        # once is kept until disconnect, as gref -> its page.
        self.persistent = persistent
        self.max_persistent = max_persistent
        self._pages: dict[int, memoryview] = {}
        # (gref, first, last) -> those sectors of the mapped page, for segments seen and
        # checked before (persistent grants: mapped pages stay until disconnect)
        self._segment_views: dict[tuple[int, int, int], memoryview] = {}
        self._page_maps: list[PageMapping] = []
        # The compiled pass (persistent grants only: it serves in mapped pages) and the
        # address of each mapped page by grant reference (0: none), for it to find them.
        self._pump = inline.compiled() if persistent else None
        self._doorbell = notifier.doorbell()
        self._addresses = array.array("Q")
        self._tasks: set[asyncio.Task] = set()
        self._started: set[Job] = set()  # at the VBD the callback way
        self._inflight = 0
        self._idle = asyncio.Event()  # nothing in flight
        self._idle.set()
        self._one_left = asyncio.Event()  # at most one request in flight (a barrier's wait)
        self._one_left.set()
        self._backlog: deque[Request] = deque()  # consumed, waiting for a barrier to end
        self._barrier = False  # a barrier is pending: consume nothing more
        self._push_scheduled = False
        self._servicing = False  # in _service: responses are pushed at the end of the pass
        self._push_pending = False
        self._reading = False
        self._stopping = False
        self.dead = False  # disconnected by itself (corrupt ring)
        self.stopped = False
        self._stop_task: asyncio.Task | None = None
        self._warnings = 0
        self._since: tuple[os.times_result, float] | None = None

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        # The process's CPU time and the clock at connect, for the disconnect's summary:
        # what serving the ring cost (with anything else the process did meanwhile).
        self._since = (os.times(), self.loop.time())
        self.loop.add_reader(self.notifier.fileno(), self._on_event)
        self._reading = True
        log.info("%s: connected (%s, %d-page ring of %d slots, up to %d segments%s)",
                 self.name, self.abi.name, 1 << self.order, self.ring.size,
                 self.max_indirect, ", persistent grants" if self.persistent else "")
        self._service()  # requests queued before we listened

    async def stop(self) -> None:
        """Disconnect: consume nothing more, let what is in flight finish (requests
        held by a paused VBD are dropped: the guest is going away), publish the last
        responses, unmap the ring and unbind the channel. Idempotent."""
        if self._stop_task is None:
            self._stop_task = self.loop.create_task(self._stop())
        await asyncio.shield(self._stop_task)

    async def _stop(self) -> None:
        self._stopping = True
        self._unlisten()
        while self._inflight:
            if self.vbd.state & VbdState.PAUSED or self.vbd.state & VbdState.CLOSED:
                # Nothing of ours is at a driver: the rest wait for a resume.
                for task in list(self._tasks):
                    task.cancel()
                for job in list(self._started):
                    assert job.started is not None
                    if self.vbd.cancel(job.started):  # held: its done will not come
                        self._started.discard(job)
                        self._release(job)
                        self._ended()
            try:
                async with asyncio.timeout(_STOP_POLL):  # (wait_for can lose a cancel)
                    await self._idle.wait()
            except TimeoutError:
                pass
        if not self.dead:
            try:
                self._push()
            except (OSError, RingCorrupt) as exc:
                log.warning("%s: last responses: %s", self.name, exc)
        self._pump = None  # (its table names pages about to be unmapped)
        self._addresses = array.array("Q")
        self._segment_views.clear()
        self._pages.clear()
        closes = [("guest pages", pages.close) for pages in self._page_maps]
        self._page_maps.clear()
        closes += [("ring", self.mapping.close), ("grant device", self.grants.close),
                   ("event channel", self.notifier.close)]
        for what, close in closes:
            try:
                close()
            except (OSError, BufferError) as exc:
                log.warning("%s: releasing the %s: %s", self.name, what, exc)
        self.stopped = True
        log.info("%s: disconnected (%s)", self.name, self.summary(cpu=True))

    def summary(self, *, cpu: bool = False) -> str:
        """The counters in a line; with ``cpu``, the process's CPU seconds (user, system)
        over the seconds since connect."""
        st = self.stats
        used = ""
        if cpu and self._since is not None:
            (t0, w0), t1 = self._since, os.times()
            used = (f"; process CPU {t1.user - t0.user:.2f} s user, "
                    f"{t1.system - t0.system:.2f} s system in {self.loop.time() - w0:.2f} s")
        return (f"{self.ring.requests} requests: {st.reads} reads, {st.writes} writes, "
                f"{st.flushes} flushes, {st.barriers} barriers, {st.discards} discards, "
                f"{st.indirect} indirect, {st.errors} errors, {st.unsupported} unsupported; "
                f"largest {st.max_segments} segments; {st.events} events in, "
                f"{st.notifies} out"
                + (f"; {st.mapped} served in mapped pages, {st.grants_mapped} grants "
                   f"mapped, {st.inline} requests by the compiled pass"
                   if self.persistent else "") + used)

    def stats_dict(self) -> dict:
        out: dict = {"domid": self.domid, "devid": self.devid, "protocol": self.abi.name,
                     "ring_pages": 1 << self.order, "ring_size": self.ring.size,
                     "requests": self.ring.requests, "responses": self.ring.responses,
                     "in_flight": self._inflight, "persistent_grants": self.persistent}
        out.update(self.stats.as_dict())
        return out

    def _warn(self, text: str, *args: object) -> None:
        self._warnings += 1
        if self._warnings <= WARNINGS_PER_RING:
            log.warning("%s: " + text, self.name, *args)
            if self._warnings == WARNINGS_PER_RING:
                log.warning("%s: further request warnings are not logged", self.name)

    def _unlisten(self) -> None:
        if self._reading:
            self._reading = False
            self.loop.remove_reader(self.notifier.fileno())

    def _fail(self, why: str) -> None:
        """The ring cannot be trusted: disconnect this VBD only."""
        if self.dead or self._stopping:
            return
        self.dead = True
        log.error("%s: %s; disconnecting this ring", self.name, why)
        self._unlisten()
        self._stop_task = self.loop.create_task(self._stop())

    # ------------------------------------------------------------------ consuming
    def _on_event(self) -> None:
        self.stats.events += 1
        # The compiled pass first, alone: when it empties the ring (the common case with
        # persistent grants over a disk in memory or the page cache) nothing else runs,
        # and with the device's doorbell it clears and notifies by itself too.
        fast = (self._pump is not None and not self._backlog and not self._barrier
                and not self._stopping)
        bell = self._doorbell if fast else None
        if bell is None and not self._clear():
            return
        if fast:
            self._servicing = True
            try:
                idle = self._pump_ring(bell)
            except Exception as exc:  # (as _consume: this ring stops, tapdisk goes on)
                log.exception("%s: serving the ring failed", self.name)
                self._fail(f"{type(exc).__name__}: {exc}")
                return
            finally:
                self._servicing = False
            if idle:
                return
            if idle is None and bell is not None and not self._clear():
                return  # (the pass did not run, so did not clear)
            # The Python path from where the pass left off: the request it stopped at, or
            # everything when it could not run (no second pass to find that out again).
            self._service(1 if idle is False else None)
            return
        self._service()

    def _clear(self) -> bool:
        try:
            self.notifier.clear()
        except OSError as exc:
            self._fail(f"event channel: {exc}")
            return False
        return True

    def _service(self, first: int | None = PASS_FIRST) -> None:
        """Consume and start what the ring holds, until it is empty (and the frontend
        asked for an event on the next request) or a barrier stops us. The responses of
        the pass (the side door's, bad requests') are pushed together at its end.
        ``first``: how many requests to take before the compiled pass runs again (None:
        all; PASS_FIRST: none, the pass runs first)."""
        self._servicing = True
        try:
            with self.vbd.batch:  # the pass's reads and writes go to the driver at its end
                self._consume(first)
        finally:
            self._servicing = False
        if self._push_pending:
            self._push_pending = False
            self._push_now()

    def _consume(self, first: int | None = PASS_FIRST) -> None:
        try:
            while not self._stopping and not self._barrier:
                if self._backlog:
                    reqs = list(self._backlog)
                    self._backlog.clear()
                elif self._pump is None:
                    reqs = self.ring.take()
                else:
                    if first == PASS_FIRST:
                        idle = self._pump_ring()
                        if idle:
                            break  # the ring is empty and asked for an event on the next
                        # The request the pass stopped at (or all, when it could not run)
                        first = None if idle is None else 1
                    reqs = self.ring.take(first)
                    first = PASS_FIRST
                for i, req in enumerate(reqs):
                    self._dispatch(req)
                    if self._barrier:
                        self._backlog.extend(reqs[i + 1:])
                        break
                if self._barrier or self._backlog:
                    break
                if not self.ring.final_check():
                    break
        except RingCorrupt as exc:
            self._fail(str(exc))
        except Exception as exc:  # a bug: this ring stops, tapdisk goes on
            log.exception("%s: serving the ring failed", self.name)
            self._fail(f"{type(exc).__name__}: {exc}")

    def _pump_ring(self, doorbell: tuple[int, int] | None = None) -> bool | None:
        """The compiled pass over the requests waiting on the ring, when the disk has an
        inline target now: it serves those it can (as the side door would), and answers
        and publishes them (with the event channel's ``doorbell``, it clears the channel
        first and notifies the frontend itself). True: the ring is empty and asked for
        an event on the next request, or the ring failed (nothing left to do); False: it
        stopped at a request for the Python path (or after its budget); None: it could
        not run."""
        target = self.vbd.inline_target()
        if target is None:
            return None
        guard = target.guard  # keeps clusters from being freed under the pass
        if guard is not None and not guard.acquire(blocking=False):
            return None
        ring = self.ring
        assert self._pump is not None
        try:
            out = self._pump(ring.mem, ring.abi is X86_32, ring.size, ring.req_cons,
                             ring.rsp_prod_pvt, ring.published, self._addresses, target,
                             self.max_indirect, INLINE_BUDGET, doorbell)
        except Exception:  # a target it cannot take (a bug): it raised before serving any
            log.exception("%s: the compiled ring pass failed; serving without it",
                          self.name)
            self._pump = None
            return None
        finally:
            if guard is not None:
                guard.release()
        (req_cons, rsp_prod_pvt, published, notify, status, reads, read_bytes, writes,
         write_bytes, segments, max_segments, indirect, error) = out
        served = ring.advance(req_cons, rsp_prod_pvt, published, bool(notify))
        if served:
            st = self.stats
            st.reads += reads
            st.writes += writes
            st.segments += segments
            st.indirect += indirect
            if max_segments > st.max_segments:
                st.max_segments = max_segments
            st.mapped += served
            st.side_door += served
            st.inline += served
            self.vbd.served_inline(reads, read_bytes, writes, write_bytes)
        if error:  # the event channel, cleared or notified by the pass
            self._fail(f"event channel: {os.strerror(error)}")
            return True
        if notify:
            self.stats.notifies += 1
            if doorbell is None:
                try:
                    self.notifier.notify()
                except OSError as exc:
                    self._fail(f"notify: {exc}")
                    return True
        if status == inline.IDLE:
            return True
        if rsp_prod_pvt != published:
            self._push_pending = True  # published with the Python path's, this pass
        return False

    def _dispatch(self, req: Request) -> None:
        try:
            job = self._prepare(req)
        except BadRequest as bad:
            self._count_failure(bad.status)
            log.debug("%s: request %#x (op %d): %s", self.name, req.id, req.op, bad)
            self._respond(req, bad.status)
            return
        op = job.op
        if op == Op.WRITE_BARRIER:
            self._barrier = True
        elif op in (Op.READ, Op.WRITE) and self._serve_now(job):
            return
        self._begin(job)

    def _begin(self, job: Job) -> None:
        self._inflight += 1
        self._idle.clear()
        if self._inflight > 1:
            self._one_left.clear()
        if job.op in (Op.READ, Op.WRITE) and self._start(job):
            return
        # The task takes itself out of the set when it ends (_run): a done callback would
        # cost a turn of the loop per request. Cancelled only by _stop, which runs after
        # every task created before it has started (the loop runs them in order).
        self._tasks.add(self.loop.create_task(self._run(job)))

    # ------------------------------------------------------------------ validation
    def _prepare(self, req: Request) -> Job:
        op = req.op
        st = self.stats
        if op in (Op.READ, Op.WRITE):
            if not 1 <= req.nr_segments <= MAX_SEGMENTS:
                raise BadRequest(f"{req.nr_segments} segments")
            return self._rw_job(req, op, req.segments)
        if op in (Op.WRITE_BARRIER, Op.FLUSH_DISKCACHE):
            if req.nr_segments > MAX_SEGMENTS:
                raise BadRequest(f"{req.nr_segments} segments")
            if op == Op.WRITE_BARRIER:
                st.barriers += 1
            else:
                st.flushes += 1
            if not req.nr_segments:
                return Job(req, op)
            return self._rw_job(req, op, req.segments)
        if op == Op.DISCARD:
            st.discards += 1
            if req.flag & DISCARD_SECURE:
                raise BadRequest("secure discard", Status.EOPNOTSUPP)
            self._check_range(req.sector, req.nr_sectors)
            self._check_writable()
            return Job(req, op, req.sector * SECTOR, req.nr_sectors * SECTOR)
        if op == Op.INDIRECT:
            st.indirect += 1
            if req.indirect_op not in (Op.READ, Op.WRITE):
                raise BadRequest(f"indirect operation {req.indirect_op}")
            if not 1 <= req.nr_segments <= self.max_indirect:
                raise BadRequest(f"{req.nr_segments} indirect segments (at most "
                                 f"{self.max_indirect})")
            return self._indirect_job(req)
        raise BadRequest(f"operation {op}", Status.EOPNOTSUPP)

    def _check_range(self, sector: int, count: int) -> None:
        size = self.vbd.size
        if sector * SECTOR > size or count * SECTOR > size - sector * SECTOR:
            raise BadRequest(f"{count} sectors at {sector}: past the end ({size // SECTOR})")

    def _check_writable(self) -> None:
        if self.vbd.read_only:
            raise BadRequest("write to a read-only disk")

    def _spans(self, segments: list[tuple[int, int, int]]) -> tuple[list[GrantSpan], int]:
        spans = []
        total = 0
        for gref, first, last in segments:
            if first > last or last >= SECTORS_PER_PAGE:
                raise BadRequest(f"segment of sectors {first}..{last}")
            n = (last - first + 1) * SECTOR
            spans.append((gref, first * SECTOR, n))
            total += n
        return spans, total

    def _rw_job(self, req: Request, op: int, segments: list[tuple[int, int, int]]) -> Job:
        iov = self._known_views(segments) if self.persistent else None
        if iov is None:
            spans, total = self._spans(segments)
        else:
            spans, total = None, sum(map(len, iov))
        self._check_range(req.sector, total // SECTOR)
        if op != Op.READ:
            self._check_writable()
        self._count_rw(op, len(segments))
        if spans is not None and self.persistent:
            iov = self._mapped_views(segments, spans)
        if iov is not None:
            self.stats.mapped += 1
        return Job(req, op, req.sector * SECTOR, total, spans, iov=iov)

    def _known_views(self, segments: list[tuple[int, int, int]]) -> list[memoryview] | None:
        """The views of segments all seen and checked before, else None. The frontend
        reuses its pool of granted pages, so the same segments come back request after
        request: a dict lookup each instead of a parse, a check and a slice (a 1 MiB read
        has 256 segments, and the interpreted loop is most of what such a request costs
        in a PV dom0)."""
        views = self._segment_views
        try:
            return [views[seg] for seg in segments]
        except KeyError:
            return None

    def _mapped_views(self, segments: list[tuple[int, int, int]],
                      spans: list[GrantSpan]) -> list[memoryview] | None:
        """Checked segments (``spans``) as views of the guest's mapped pages, mapping
        those not mapped yet and remembering each view; None: by grant copy instead."""
        pages = self._pages
        try:  # every grant mapped already (the frontend reuses its pool): one pass
            iov = [pages[ref][off:off + n] for ref, off, n in spans]
        except KeyError:
            if not self._map([ref for ref, _, _ in spans]):
                return None
            iov = [pages[ref][off:off + n] for ref, off, n in spans]
        views = self._segment_views
        if len(views) + len(segments) > SEGMENT_VIEWS_PER_PAGE * self.max_persistent:
            views.clear()  # (a frontend that never repeats itself: start again)
        views.update(zip(segments, iov, strict=True))
        return iov

    def _map(self, grefs: list[int]) -> bool:
        """Map those of ``grefs`` not mapped yet (persistent grants); False when they
        cannot all be (more than ``max_persistent`` in all, or a grant the device
        refuses): the request then goes by grant copy, which says which grant is bad."""
        pages = self._pages
        for ref in grefs:
            if ref not in pages:
                break
        else:
            return True
        missing = [ref for ref in dict.fromkeys(grefs) if ref not in pages]
        if len(pages) + len(missing) > self.max_persistent:
            return False
        try:
            mapped = self.grants.map_pages(self.domid, missing)
        except OSError as exc:
            self.stats.map_failures += len(missing)
            self._warn("mapping grants %s: %s; served by grant copy", missing[:4], exc)
            return False
        self._page_maps.append(mapped)
        pages.update(zip(missing, mapped.pages, strict=True))
        if self._pump is not None:
            self._note_addresses(missing, mapped.pages)
        self.stats.grants_mapped += len(missing)
        return True

    def _note_addresses(self, grefs: list[int], pages: list[memoryview]) -> None:
        """Enter newly mapped pages in the compiled pass's table (grant references past
        MAX_INLINE_GREF stay out: their requests go the Python way)."""
        table = self._addresses
        top = max(grefs)
        if top >= len(table) < MAX_INLINE_GREF:  # (doubling: few copies of it)
            size = min(max(top + 1, 2 * len(table)), MAX_INLINE_GREF)
            table.frombytes(bytes(8 * (size - len(table))))
        limit = len(table)
        for ref, addr in zip(grefs, addresses(pages), strict=True):
            if ref < limit:
                table[ref] = addr

    def _count_rw(self, op: int, nseg: int) -> None:
        st = self.stats
        if op == Op.READ:
            st.reads += 1
        elif op == Op.WRITE:
            st.writes += 1
        st.segments += nseg
        if nseg > st.max_segments:
            st.max_segments = nseg

    def _indirect_job(self, req: Request) -> Job:
        """Copy the indirect pages in (into the request's own buffer, which the data
        overwrites later), then treat the segments listed there as a READ/WRITE's."""
        nseg = req.nr_segments
        pages = -(-nseg // SEGMENTS_PER_INDIRECT_PAGE)
        grefs = req.indirect_grefs[:pages]
        if self.persistent and self._map(list(grefs)):
            # The frontend's indirect pages are persistent grants too: parsed from the
            # mapped pages into a list once (the guest may change them afterwards).
            segments = parse_segments(b"".join(self._pages[ref] for ref in grefs), nseg)
            return self._rw_job(req, req.indirect_op, segments)
        slot = self.buffers.get()
        try:
            try:
                status = self.grants.copy(self.domid, [(g, 0, PAGE) for g in grefs],
                                          slot, 0, False)
            except OSError as exc:
                raise BadRequest(f"indirect page: grant copy: {exc}") from None
            if any(status):
                raise BadRequest(f"indirect page: grant copy status {status}")
            segments = parse_segments(slot.view, nseg)  # parsed before the slot holds data
            job = self._rw_job(req, req.indirect_op, segments)
        except BaseException:
            self.buffers.put(slot)
            raise
        job.slot = slot
        return job

    def _count_failure(self, status: int) -> None:
        if status == Status.EOPNOTSUPP:
            self.stats.unsupported += 1
        else:
            self.stats.errors += 1

    # ------------------------------------------------------------------ data
    def _data(self, job: Job) -> list[memoryview]:
        """Where a read or write's data is: the guest's mapped pages, or the request's
        own buffer."""
        if job.iov is not None:
            return job.iov
        if job.slot is None:
            job.slot = self.buffers.get()
        return [job.slot.view[:job.length]]

    def _copy(self, job: Job, to_guest: bool) -> bool:
        """Move a request's data between the guest's segments and its buffer (nothing
        to move when the I/O used the guest's mapped pages)."""
        if job.iov is not None:
            return True
        assert job.slot is not None and job.spans is not None
        try:
            status = self.grants.copy(self.domid, job.spans, job.slot, 0, to_guest)
        except OSError as exc:  # the ioctl itself (ENOMEM, EFAULT): this request fails
            self._warn("request %#x: grant copy: %s", job.req.id, exc)
            return False
        bad = [(i, s) for i, s in enumerate(status) if s]
        if bad:
            self._warn("request %#x: grant copy %s the guest failed (segment, status): %s",
                       job.req.id, "to" if to_guest else "from", bad[:4])
            return False
        return True

    def _serve_now(self, job: Job) -> bool:
        """The side door: a read or write the VBD can do at once, answered at once."""
        iov = self._data(job)
        if job.op == Op.WRITE:
            if not self._copy(job, False):
                self._done(job, Status.ERROR)
                return True
            job.copied = True
            if not self.vbd.writev_now(job.offset, iov, job.length):
                return False
        elif not self.vbd.readv_now(job.offset, iov, job.length):
            return False
        elif not self._copy(job, True):
            self._done(job, Status.ERROR)
            return True
        self.stats.side_door += 1
        self._done(job, Status.OKAY)
        return True

    def _start(self, job: Job) -> bool:
        """A read or write (the side door could not serve it) to the VBD the callback
        way; False leaves it to a task (a VBD that refuses it at once: closed)."""
        iov = self._data(job)
        if job.op == Op.WRITE and not job.copied:
            if not self._copy(job, False):
                self._ended()
                self._done(job, Status.ERROR)
                return True
            job.copied = True
        start = self.vbd.start_read if job.op == Op.READ else self.vbd.start_write
        try:
            job.started = start(job.offset, iov, job.length,
                                lambda error: self._started_done(job, error))
        except BlktapError:
            return False
        self._started.add(job)
        return True

    def _started_done(self, job: Job, error: BaseException | None) -> None:
        self._started.discard(job)
        self._ended()
        if isinstance(error, asyncio.CancelledError):  # the guest is going away
            self._release(job)
            return
        if error is None:
            status = Status.OKAY
            if job.op == Op.READ and not self._copy(job, True):
                status = Status.ERROR
        else:
            status = self._failed(job, error)
        self._done(job, status)

    def _failed(self, job: Job, exc: BaseException) -> int:
        code = getattr(exc, "errno", None)
        self._warn("request %#x (op %d, %d bytes at %d): %s", job.req.id, job.req.op,
                   job.length, job.offset, exc)
        return Status.EOPNOTSUPP if code == errno.EOPNOTSUPP else Status.ERROR

    def _ended(self) -> None:
        """A request is no longer in flight."""
        self._inflight -= 1
        if self._inflight <= 1:
            self._one_left.set()
        if not self._inflight:
            self._idle.set()

    async def _run(self, job: Job) -> None:
        status: int = Status.ERROR
        try:
            status = await self._execute(job)
        except asyncio.CancelledError:
            self._release(job)
            raise
        except (OSError, BlktapError) as exc:
            status = self._failed(job, exc)
        except Exception:  # a bug: this request fails, the ring goes on
            log.exception("%s: request %#x failed", self.name, job.req.id)
        finally:
            self._tasks.discard(asyncio.current_task())  # type: ignore[arg-type]
            self._ended()
        self._done(job, status)
        if job.op == Op.WRITE_BARRIER:
            self._barrier = False
            if not self._stopping:
                self._service()

    async def _execute(self, job: Job) -> int:
        op = job.op
        vbd = self.vbd
        if op == Op.WRITE_BARRIER:
            await self._drain_others()
        if op == Op.DISCARD:
            await vbd.discard(job.offset, job.length)
            return Status.OKAY
        if job.length:
            iov = self._data(job)
            if op == Op.READ:
                await vbd.readv(job.offset, iov, job.length)
                return Status.OKAY if self._copy(job, True) else Status.ERROR
            if not job.copied:
                if not self._copy(job, False):
                    return Status.ERROR
                job.copied = True
            await vbd.writev(job.offset, iov, job.length)
        if op in (Op.WRITE_BARRIER, Op.FLUSH_DISKCACHE):
            await vbd.flush()
        return Status.OKAY

    async def _drain_others(self) -> None:
        """Wait until the barrier is the only request of this ring in flight."""
        while self._inflight > 1:
            self._one_left.clear()
            await self._one_left.wait()

    # ------------------------------------------------------------------ responses
    def _release(self, job: Job) -> None:
        if job.slot is not None:
            self.buffers.put(job.slot)
            job.slot = None

    def _done(self, job: Job, status: int) -> None:
        self._release(job)
        if status == Status.ERROR:
            self.stats.errors += 1
        elif status == Status.EOPNOTSUPP:
            self.stats.unsupported += 1
        self._respond(job.req, status)

    def _respond(self, req: Request, status: int) -> None:
        if self.dead:
            return
        try:
            self.ring.put_response(req.id, req.response_op, status)
        except RingCorrupt as exc:
            self._fail(str(exc))
            return
        # Pushed once per batch: at the end of a pass over the ring, now when nothing else
        # is in flight (no other completion to wait for: a turn of the loop, and in a PV
        # dom0 its system calls, saved), else at the next turn, with those of this one.
        if self._servicing:
            self._push_pending = True
        elif not self._inflight:
            self._push_now()
        elif not self._push_scheduled:
            self._push_scheduled = True
            self.loop.call_soon(self._push_soon)

    def _push_soon(self) -> None:
        self._push_scheduled = False
        self._push_now()

    def _push_now(self) -> None:
        if self.dead or self.stopped:
            return
        try:
            self._push()
        except OSError as exc:
            self._fail(f"notify: {exc}")

    def _push(self) -> None:
        if self.ring.push():
            self.stats.notifies += 1
            self.notifier.notify()


__all__ = ["BlkifRing", "BlkifStats"]
