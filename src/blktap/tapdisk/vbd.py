"""A virtual block device: one disk, its driver stack and the life of its requests.

    transport ──► VBD.read/write/... ──► queue ──► merge ──► driver stack
                                           ▲          │
                                           └─ retry ◄─┘ (EAGAIN/EBUSY/EINTR, every
                                                         second, until the timeout)

- Transports call the coroutines below with byte offsets of any alignment; the VBD
  widens what is not sector aligned (reads into a scratch buffer, writes by
  read-modify-write serialised among themselves) so that drivers only see whole sectors.
- Requests submitted in the same turn of the event loop are queued and merged: adjacent
  reads (or writes with the same FUA flag) become one driver call with one iovec, as the
  reference's io-optimize does before io_submit.
- The side door: :meth:`VBD.read_now` / :meth:`VBD.write_now` serve at once, without a
  task or future, what the driver stack can do without waiting (memory, page cache,
  cached metadata); they answer False, changing nothing, for anything else, which then
  takes the queue. Transports try them first.
- A request failing with EAGAIN, EBUSY or EINTR is reissued every ``retry_interval``
  seconds until it is older than ``timeout`` (default 120 s, tapdisk's), then fails.
  Other errors fail at once.
- A caller may cancel its task (a transport whose client went away): a request still
  queued is dropped, one the engine has not started is dropped there, one under way
  finishes first; CancelledError reaches the caller only when no driver holds its
  buffers. Others merged with it still get their I/O. ``stats.cancelled`` counts them.
- The callback way (:meth:`VBD.start_read` / :meth:`VBD.start_write` inside ``with
  vbd.batch:`` around the transport's pass): the request is queued at once, on the loop
  thread, goes to the driver when the batch ends, and ``done(error)`` is called when it
  completes: from the engine's reaping if the driver takes the callback way too
  (:meth:`Driver.start_read`, ``aio`` on a direct descriptor: two turns of the loop per
  request at queue depth 1), else from the task the VBD runs its group in (four). No
  task or future per request, and no turn of the loop waiting for the merge (the
  coroutines take five or six): a transport's reply goes out in the turn the I/O
  completes. :meth:`VBD.cancel` withdraws such a request as cancelling a task does the
  others.
- A watchdog logs when requests are in flight and none completed for ``watchdog``
  seconds (default 10 s), once per stall.
- Counters (:class:`~blktap.tapdisk.stats.VbdStats`) are what ``tap-ctl stats`` reports.
- Pause (``tap-ctl pause``) lets the requests in flight finish, holds new ones (they wait,
  they do not fail) and closes the driver stack, so that offline tools may change the
  files; resume installs a stack opened again (perhaps on a new leaf of the same size)
  and lets the held requests go. :class:`VbdState` holds the reference's state bits.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

from blktap.errors import BlktapError, DriverError, OutOfRange
from blktap.io.buffers import scratch_buffer
from blktap.io.clock import Ticker, turn_clock
from blktap.io.engine import Plug, settled
from blktap.io.polling import watch_busy
from blktap.metrics.latency import OpLatency
from blktap.tapdisk.driver import (
    SECTOR,
    STATE_ZERO,
    AsyncTarget,
    Caps,
    DirtyBitmap,
    Driver,
    Extents,
    InlineTarget,
    Reaper,
    Tally,
    merge_extents,
)
from blktap.tapdisk.stats import VbdStats

log = logging.getLogger("blktap.tapdisk")

RETRYABLE = frozenset({errno.EAGAIN, errno.EBUSY, errno.EINTR})
DEFAULT_TIMEOUT = 120.0
RETRY_INTERVAL = 1.0
WATCHDOG_TIMEOUT = 10.0
# A merged request stays below these (bytes, buffers).
MAX_MERGE_BYTES = 8 << 20
MAX_MERGE_IOVS = 256
# zero_runs_now: zero runs shorter than this inside a read are sent as data, and a read
# that would be answered in more runs than this is answered as data.
HOLE_MIN = 4096
HOLE_MAX_RUNS = 16
# What a read-only disk cannot do, whatever its driver can (an enum.Flag's operators
# cost microseconds each: made once, not per connection that asks).
_READ_ONLY_CAPS = ~(Caps.WRITE | Caps.FUA | Caps.TRIM | Caps.ZERO | Caps.FAST_ZERO)


class InlineLink(Protocol):
    """A transport serving requests at :meth:`VBD.inline_async`'s target in compiled
    code, outside the loop's turns (:meth:`VBD.add_inline_link`)."""

    def sync_inline(self) -> None:
        """Tell :meth:`VBD.issued_inline` and :meth:`VBD.finished_inline` what was issued
        and finished since the last time."""

    def release_inline(self) -> None:
        """Stop issuing: the requests go to the transport's Python path from now on (what
        is in flight is counted, and finishes as the pass's requests do)."""


class VbdState(enum.IntFlag):
    """The reference tapdisk's VBD state bits (``tap-ctl list`` prints them with %#x;
    xapi recognises a paused disk by the literal ``0x2a``)."""

    DEAD = 0x001
    CLOSED = 0x002
    QUIESCE_REQUESTED = 0x004
    QUIESCED = 0x008
    PAUSE_REQUESTED = 0x010
    PAUSED = 0x020
    SHUTDOWN_REQUESTED = 0x040
    LOCKING = 0x080
    LOG_DROPPED = 0x100
    RESUME_FAILED = 0x200


class Op(enum.Enum):
    READ = "read"
    WRITE = "write"
    FLUSH = "flush"
    DISCARD = "discard"
    ZEROES = "write_zeroes"
    STATUS = "block_status"
    CACHE = "cache"


# What a request started the callback way is told when it completes: None, or the error
# (CancelledError when VBD.cancel stopped it).
Done = Callable[[BaseException | None], None]


@dataclass(eq=False)
class Request:
    op: Op
    offset: int
    length: int
    iov: Sequence[memoryview] = ()
    fua: bool = False
    may_trim: bool = True
    fast: bool = False
    # Set when issued: the group this request leads (its task runs it), or the future of
    # a request merged into another's group.
    group: list[Request] | None = None
    future: asyncio.Future | None = None
    # When it was made, by the VBD's turn clock (set by the VBD: _start, _submit).
    start: float = 0.0
    # The callback way (VBD.start_read/start_write): called with None or the error once
    # no driver holds the buffers; the group such a request leads runs in ``task``.
    done: Done | None = None
    task: asyncio.Task | None = None
    running: bool = False  # ``task`` took its first step
    withdrawn: bool = False  # cancelled before that: the task drops it


def _group_iov(group: list[Request]) -> tuple[Sequence[memoryview], int]:
    """The buffers and length of a merged group's one driver call."""
    if len(group) == 1:
        return group[0].iov, group[0].length
    return [v for r in group for v in r.iov], sum(r.length for r in group)


def bound_requests(driver: Driver, timeout: float) -> None:
    """Tell the layers that hold requests themselves (the ``nbd`` driver, while it
    reconnects) how long a request may wait: the VBD's per-request timeout."""
    for layer in driver.chain():
        bound = getattr(layer, "bound_requests", None)
        if bound is not None:
            bound(timeout)


def errno_of(exc: BaseException) -> int:
    code = getattr(exc, "errno", None)
    return code if isinstance(code, int) and code > 0 else errno.EIO


def _checked_extents(d: Driver, extents: object, length: int) -> Extents:
    """A driver's block-status answer, or DriverError (EIO) when it is out of protocol:
    runs of (positive length, int flags) covering at least one byte and at most
    ``length`` (less is fine: the caller asks again)."""
    covered = 0
    if isinstance(extents, list) and extents:
        for run in extents:
            if not (isinstance(run, tuple) and len(run) == 2 and type(run[0]) is int
                    and type(run[1]) is int and run[0] > 0):
                break
            covered += run[0]
        else:
            if covered <= length:
                return extents
    raise DriverError(f"{d.path or d.name}: the {d.name} driver answered block status for "
                      f"{length} bytes with {str(extents)[:80]}", errno.EIO)


def _cut_extents(extents: Extents, start: int, offset: int, length: int) -> Extents:
    """The runs of a block status answer from ``start`` (the widened range) cut back to
    ``[offset, offset + length)``, neighbours of the same flags merged."""
    out: Extents = []
    pos = start
    end = offset + length
    for n, flags in extents:
        lo, hi = max(pos, offset), min(pos + n, end)
        if hi > lo:
            out.append((hi - lo, flags))
        pos += n
        if pos >= end:
            break
    return merge_extents(out)


class VBD:
    """One disk served from a driver stack."""

    def __init__(self, driver: Driver, *, name: str = "", read_only: bool = False,
                 timeout: float = DEFAULT_TIMEOUT, retry_interval: float = RETRY_INTERVAL,
                 watchdog: float = WATCHDOG_TIMEOUT) -> None:
        self.driver = driver
        self.name = name or driver.path
        self.read_only = read_only or not driver.writable
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.watchdog_timeout = watchdog
        self.stats = VbdStats()
        self.latency = OpLatency()  # per-request latency histograms (metrics)
        self.loop = asyncio.get_running_loop()
        # Stamps for requests and progress: the loop's turn time where it keeps one (no
        # clock reading per request: a system call in a PV dom0, see io/clock.py).
        self._clock = turn_clock(self.loop)
        bound_requests(driver, timeout)
        self._queue: list[Request] = []
        # Requests started the callback way while paused; queued again on resume.
        self._held_back: list[Request] = []
        self._kick_handle: asyncio.Handle | None = None
        # ``with vbd.batch:`` around a transport's pass over its requests: what it starts
        # the callback way is queued and goes to the drivers, merged, when the outermost
        # batch ends (kick), in the same turn of the loop.
        self.batch = Plug(self.kick)
        self._group_tasks: set[asyncio.Task] = set()
        self._tasks_for_abandoned: set[asyncio.Task] = set()
        self._inflight: set[Request] = set()
        # Requests a transport's compiled pass issued to the driver (inline_async), not
        # yet finished: drain waits for them too.
        self._async_inflight = 0
        # Transports serving this disk's requests in compiled code between the loop's
        # turns (a connection served in the selector's wait): they tell issued_inline and
        # finished_inline what they did when asked (sync_inline: stats, the watchdog)
        # and give the requests back to their Python path when told (release_inline:
        # pause, close).
        self._links: set[InlineLink] = set()
        self._last_progress = self._clock()
        self._stall_reported = False
        self._rmw_lock = asyncio.Lock()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self.state = VbdState(0)
        # Set while requests may go to the driver; cleared from pause to resume.
        self._running = asyncio.Event()
        self._running.set()
        # Told when resume() serves from another driver, whose capabilities may differ
        # (a transport that keeps what it advertises in compiled code: the NBD desk).
        self.resumed: list[Callable[[], None]] = []
        # Checked from the ticker's thread: a timer armed in the loop for as long as the
        # disk is open would cost clock readings every turn (io/clock.py).
        self._watchdog = Ticker.of(self.loop).every(
            max(0.01, min(1.0, self.watchdog_timeout / 4)), self._check_watchdog)
        # A polling loop keeps one window for waits on this disk's backend (requests in
        # flight) and one for waits on its consumers (io/polling.py).
        self._unwatch = watch_busy(self.loop, self._busy)

    # ------------------------------------------------------------------ facts
    @property
    def size(self) -> int:
        return self.driver.size

    @property
    def caps(self) -> Caps:
        caps = self.driver.caps
        if self.read_only:
            caps &= _READ_ONLY_CAPS
        return caps

    def _busy(self) -> bool:
        return self.stats.in_flight > 0

    # ------------------------------------------------------------------ checks
    def _check(self, offset: int, length: int, code: int) -> None:
        if self._closed:
            raise BlktapError(f"{self.name}: disk is closed", errno.ESHUTDOWN)
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRange(f"{length} bytes at {offset} past the end of the disk "
                             f"({self.size} bytes)", code)

    def _check_write(self, offset: int, length: int) -> None:
        if self.read_only:
            raise BlktapError(f"{self.name} is read-only", errno.EPERM)
        self._check(offset, length, errno.ENOSPC)

    # ------------------------------------------------------------------ queueing
    async def _submit(self, req: Request) -> object:
        """Queue ``req`` and wait for its result.

        The requests submitted during one turn of the loop wait for the next; the first
        of their tasks to run again issues them all, merging neighbours. The task of a
        group's first request runs the group; the others wait for its result. So a
        request costs no task and no turn of the loop beyond its caller's own."""
        req.start = self._clock()
        if not self._running.is_set():
            await self._held()
        self._queue.append(req)
        self.stats.submitted += 1
        try:
            await asyncio.sleep(0)  # the others of this turn queue theirs meanwhile
        except asyncio.CancelledError:
            await self._abandon(req)
            raise
        if self._queue:
            self._kick()
        group = req.group
        if group is None:  # merged into a group another request's task runs
            # Its future refuses cancellation: a cancelled caller wakes once the group's
            # I/O is done with its buffers.
            assert req.future is not None
            return await req.future
        try:
            result, error = await self._execute(group)
        except asyncio.CancelledError:
            # The driver dropped the I/O, or let it finish (engines never stop one under
            # way): the buffers are free. The others of the group still want theirs.
            self._withdraw(group)
            raise
        self._finish(group, result, error)
        if error is not None:
            raise error
        return result

    async def _abandon(self, req: Request) -> None:
        """``req``'s task was cancelled before it issued anything. Dropped if still
        queued or leading a group nobody started; merged into another's group, its
        buffers are in that I/O: wait for it (the caller is cancelled all the same)."""
        group = req.group
        if group is None:
            if req.future is None:  # still queued: it never reaches the driver
                self._queue.remove(req)
                self.stats.cancelled += 1
                return
            try:  # merged: the group's own task runs it (this future cannot be cancelled)
                await req.future
            except BaseException:  # noqa: S110 - the caller is cancelled anyway
                pass
            return
        self._withdraw(group)

    def _withdraw(self, group: list[Request]) -> None:
        """The leader of ``group`` is cancelled and the driver holds none of its buffers:
        count it out and issue the rest of the group without it."""
        self._finish(group[:1], None, None, cancelled=True)
        rest = group[1:]
        if rest:
            self._tasks_for_abandoned.add(task := self.loop.create_task(self._issue(rest)))
            task.add_done_callback(self._tasks_for_abandoned.discard)

    async def _held(self) -> None:
        """Wait out a pause; fail if the disk is closed meanwhile."""
        while not self._running.is_set():
            await self._running.wait()
        if self._closed:
            raise BlktapError(f"{self.name}: disk is closed", errno.ESHUTDOWN)

    def _kick(self) -> None:
        """Issue what was queued during this turn of the loop, merging neighbours: each
        group goes to its first request (``group``), the others get a future."""
        queue, self._queue = self._queue, []
        # What the groups start at the driver's engine goes to the kernel together, at the
        # end of this loop (one io_submit instead of one per group).
        with self.driver.engine.plug():
            self._issue_queue(queue)

    def _issue_queue(self, queue: list[Request]) -> None:
        i = 0
        while i < len(queue):
            req = queue[i]
            group = [req]
            if req.op in (Op.READ, Op.WRITE):
                end, nbytes, nbufs = req.offset + req.length, req.length, len(req.iov)
                j = i + 1
                while j < len(queue):
                    nxt = queue[j]
                    if (nxt.op is not req.op or nxt.offset != end or nxt.fua != req.fua
                            or nbytes + nxt.length > MAX_MERGE_BYTES
                            or nbufs + len(nxt.iov) > MAX_MERGE_IOVS):
                        break
                    group.append(nxt)
                    end += nxt.length
                    nbytes += nxt.length
                    nbufs += len(nxt.iov)
                    j += 1
            i += len(group)
            # In flight from now on (close() waits for it even before its task runs).
            # The watchdog's clock starts when the first of them was made (this turn or
            # the last), or at the last completion or resume if later (a request held by
            # a pause): no clock reading of its own, which a PV dom0 pays as a syscall.
            if not self._inflight and req.start > self._last_progress:
                self._last_progress = req.start
            self._inflight.update(group)
            self._idle.clear()
            self.stats.in_flight += len(group)
            self.stats.merged += len(group) - 1
            req.group = group
            for other in group[1:]:
                if other.done is None:
                    other.future = settled(self.loop, cancellable=False)
            if req.done is not None and not self._start_at_driver(group):
                # No task of its own waits to run it, and the driver cannot take it the
                # callback way: a task of the VBD's.
                task = self.loop.create_task(self._run_group(group))
                req.task = task
                self._group_tasks.add(task)

    def _start_at_driver(self, group: list[Request]) -> bool:
        """Hand a group the callback way to a driver that takes it so (Driver.start_read
        / start_write: one operation the kernel completes), told in the turn the engine
        reaps it: no task, no coroutine to wake. False: the driver cannot."""
        first = group[0]
        if first.op is Op.READ:
            start = self.driver.start_read
        elif first.op is Op.WRITE:
            start = self.driver.start_write
        else:
            return False
        iov, length = _group_iov(group)

        def done(error: BaseException | None) -> None:
            self._driver_done(group, length, error)
        try:
            if first.op is Op.READ:
                started = start(first.offset, iov, done)
            else:
                started = start(first.offset, iov, done, fua=first.fua)
        except Exception:  # the coroutine path does it again and reports what fails
            return False
        if started:
            first.running = True  # (no task: cancel leaves it to the kernel)
        return started

    def _driver_done(self, group: list[Request], length: int,
                     error: BaseException | None) -> None:
        """A group started at the driver the callback way completed: finish it, or retry
        it as the coroutine path would (in a task, after the retry interval)."""
        if error is not None and self._retrying(group[0], length, error):
            task = self.loop.create_task(self._run_group(group, self.retry_interval))
            group[0].task = task
            self._group_tasks.add(task)
            return
        self._finish(group, None, error)

    async def _run_group(self, group: list[Request], delay: float = 0.0) -> None:
        """Run the group a request started the callback way leads (after ``delay``: a
        retry of one started at the driver)."""
        first = group[0]
        try:
            first.running = True
            if first.withdrawn:  # cancelled before this first step
                self._withdraw(group)
                return
            try:
                if delay:
                    await asyncio.sleep(delay)
                result, error = await self._execute(group)
            except asyncio.CancelledError:  # VBD.cancel: the driver let go of the buffers
                self._withdraw(group)
                return
            except Exception as exc:  # a bug of ours: fail the group, not the disk
                log.exception("%s: %s failed", self.name, first.op.value)
                result, error = None, BlktapError(f"{type(exc).__name__}: {exc}", errno.EIO)
            self._finish(group, result, error)
        finally:
            self._group_tasks.discard(first.task)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ the callback way
    def start_read(self, offset: int, iov: Sequence[memoryview], length: int,
                   done: Done) -> Request:
        """Queue a read of ``length`` bytes (whole sectors at a sector-aligned offset,
        into the buffers of ``iov``); ``done`` is called once it completes, never from
        here. Raises at once, queueing nothing, what :meth:`readv` would raise before
        waiting (closed disk, out of range, not whole sectors). Inside ``with
        vbd.batch:`` it goes to the driver when the batch ends, else on the loop's next
        turn."""
        self._check(offset, length, errno.EINVAL)
        if (offset | length) % SECTOR or not length:
            raise BlktapError(f"{length} bytes at {offset}: not whole sectors", errno.EINVAL)
        return self._start(Request(Op.READ, offset, length, iov, done=done))

    def start_write(self, offset: int, iov: Sequence[memoryview], length: int,
                    done: Done, *, fua: bool = False) -> Request:
        """:meth:`start_read` for a write (durable when done is told, with ``fua``)."""
        self._check_write(offset, length)
        if (offset | length) % SECTOR or not length:
            raise BlktapError(f"{length} bytes at {offset}: not whole sectors", errno.EINVAL)
        return self._start(Request(Op.WRITE, offset, length, iov, fua=fua, done=done))

    def _start(self, req: Request) -> Request:
        req.start = self._clock()
        if not self._running.is_set():  # paused: held until resume (or failed by close)
            self._held_back.append(req)
            return req
        self.stats.submitted += 1
        self._queue.append(req)
        # Outside a batch, nobody kicks at the end of the pass: the next turn does. (Not
        # inside one: even cancelled, a scheduled callback costs a turn of the loop.)
        if not self.batch.depth and self._kick_handle is None:
            self._kick_handle = self.loop.call_soon(self._kick_soon)
        return req

    def _kick_soon(self) -> None:
        self._kick_handle = None
        if self._queue:
            self._kick()

    def kick(self) -> None:
        """Issue now what was queued the callback way (merging neighbours), instead of
        on the loop's next turn (the end of a :attr:`batch` does it)."""
        if self._kick_handle is not None:
            self._kick_handle.cancel()
            self._kick_handle = None
        if self._queue:
            self._kick()

    def cancel(self, req: Request) -> bool:
        """Withdraw a request started the callback way. True: it never reached a driver,
        and its ``done`` will not be called. False: ``done`` will be, once no driver
        holds its buffers: with CancelledError if its I/O could be stopped (the group
        is its own), else with the I/O's outcome (others merged with it want theirs)."""
        for pending in (self._queue, self._held_back):
            for i, queued in enumerate(pending):
                if queued is req:
                    del pending[i]
                    self.stats.cancelled += 1
                    return True
        group = req.group
        if group is not None and len(group) == 1 and req.task is not None:
            if not req.running:
                req.withdrawn = True
            elif not req.task.done():
                req.task.cancel()
        return False

    async def _call(self, req: Request, iov: Sequence[memoryview], length: int) -> object:
        d = self.driver
        op = req.op
        if op is Op.READ:
            got = await d.read(req.offset, iov)
            if got is not None and got != length:
                raise DriverError(f"{d.path or d.name}: the {d.name} driver read {got!r} "
                                  f"bytes of {length} at {req.offset}", errno.EIO)
            return None
        if op is Op.WRITE:
            return await d.write(req.offset, iov, fua=req.fua)
        if op is Op.FLUSH:
            return await d.flush()
        if op is Op.DISCARD:
            return await d.discard(req.offset, length)
        if op is Op.ZEROES:
            return await d.write_zeroes(req.offset, length, may_trim=req.may_trim,
                                        fast=req.fast, fua=req.fua)
        if op is Op.STATUS:
            return _checked_extents(d, await d.block_status(req.offset, length), length)
        return await d.cache(req.offset, length)

    async def _issue(self, group: list[Request]) -> None:
        result, error = await self._execute(group)
        self._finish(group, result, error)

    async def _execute(self, group: list[Request]) -> tuple[object, BaseException | None]:
        """Run a (merged) request with retries; (result, error)."""
        first = group[0]
        iov, length = _group_iov(group)
        result: object = None
        error: BaseException | None = None
        while True:
            try:
                result = await self._call(first, iov, length)
                break
            except (OSError, BlktapError) as exc:
                if self._retrying(first, length, exc):
                    await asyncio.sleep(self.retry_interval)
                    continue
                error = exc
                break
            except Exception as exc:  # a bug in a driver: fail the request, not the disk
                log.exception("%s: %s failed", self.name, first.op.value)
                error = BlktapError(f"{type(exc).__name__}: {exc}", errno.EIO)
                break
        return result, error

    def _retrying(self, first: Request, length: int, exc: BaseException) -> bool:
        """Whether a failed attempt at a group (led by ``first``) is to be made again
        after the retry interval (EAGAIN, EBUSY, EINTR within the timeout), counted as
        such; else it fails, counted and, for a driver out of protocol, said."""
        code = errno_of(exc)
        if code in RETRYABLE:
            if time.monotonic() - first.start < self.timeout:
                self.stats.retries += 1
                self._count_failed_attempt(first.op, length)
                log.info("%s: %s of %d bytes at %d failed (%s), retrying", self.name,
                         first.op.value, length, first.offset, exc)
                return True
            self.stats.timeouts += 1
        if isinstance(exc, DriverError):
            log.error("%s: %s failed: %s", self.name, first.op.value, exc)
        return False

    def _count_failed_attempt(self, op: Op, length: int) -> None:
        """A read or write attempt that failed and will be retried counts in the top
        layer's ``hits`` and ``fail`` as the C tapdisk counts every completion (the
        layers below counted the attempt as it passed them)."""
        if op is Op.READ or op is Op.WRITE:
            i = 1 if op is Op.WRITE else 0
            sectors = -(-length // SECTOR)
            self.driver.hits[i] += sectors
            self.driver.fail[i] += sectors

    def _finish(self, group: list[Request], result: object,
                error: BaseException | None, *, cancelled: bool = False) -> None:
        st = self.stats
        self._last_progress = now = self._clock()
        self._stall_reported = False
        top = self.driver
        lat = self.latency
        for req in group:
            self._inflight.discard(req)
            st.in_flight -= 1
            sectors = -(-req.length // SECTOR)
            if not cancelled:
                (lat.read if req.op is Op.READ else lat.write if req.op is Op.WRITE
                 else lat.other).observe(now - req.start)
            if cancelled:
                st.cancelled += 1
            elif req.op is Op.READ:
                top.hits[0] += sectors
                if error is None:
                    st.read_reqs += 1
                    st.read_sectors += sectors
                else:
                    st.read_errors += 1
                    top.fail[0] += sectors
            elif req.op is Op.WRITE:
                top.hits[1] += sectors
                if error is None:
                    st.write_reqs += 1
                    st.write_sectors += sectors
                else:
                    st.write_errors += 1
                    top.fail[1] += sectors
            elif error is None:
                st.other_reqs += 1
            else:
                st.other_errors += 1
            done = req.done
            if done is not None:
                req.done = None  # (it refers to the request: no cycle for the collector)
                try:
                    done(asyncio.CancelledError() if cancelled else error)
                except Exception:  # a transport's bug: the others still hear theirs
                    log.exception("%s: completing a %s failed", self.name, req.op.value)
                continue
            fut = req.future
            if fut is None or fut.done():
                continue
            if error is None:
                fut.set_result(result)
            else:
                fut.set_exception(error)
        # The leader's group holds the leader: unlinked, a finished request is freed by
        # its reference count, not left in a cycle for the garbage collector.
        group[0].group = None
        if not self._inflight and not self._async_inflight:
            self._idle.set()

    def _check_watchdog(self) -> None:
        self.sync_links()
        if not (self._inflight or self._async_inflight) or self._stall_reported:
            return
        stalled = time.monotonic() - self._last_progress
        if stalled >= self.watchdog_timeout:
            self._stall_reported = True
            self.stats.watchdog_stalls += 1
            if not self._inflight:  # only the compiled pass's: no request to show
                log.warning("%s: watchdog: %d requests issued by a transport's compiled "
                            "pass in flight, none completed for %.1f s", self.name,
                            self._async_inflight, stalled)
                return
            oldest = min(self._inflight, key=lambda r: r.start)
            log.warning("%s: watchdog: %d requests in flight, none completed for %.1f s "
                        "(oldest: %s of %d bytes at %d, %.1f s old)", self.name,
                        len(self._inflight), stalled, oldest.op.value, oldest.length,
                        oldest.offset, time.monotonic() - oldest.start)

    # ------------------------------------------------------------------ side door
    def read_now(self, offset: int, view: memoryview) -> bool:
        """Serve a read at once, on the loop thread, if the driver stack can without
        waiting (memory, page cache, cached metadata): True when ``view`` holds the data.
        False leaves it to :meth:`read` (paused disk, unaligned or out-of-range request,
        data that has to be waited for, an error to report with its retries): the
        transport then calls that. A read served here costs no task or future; it counts
        in the statistics as any other."""
        return self.readv_now(offset, [view], len(view))

    def readv_now(self, offset: int, iov: Sequence[memoryview], length: int) -> bool:
        """:meth:`read_now` into several buffers (``length`` bytes in all), for
        transports whose requests arrive scattered (virtio descriptors)."""
        if not self._may_serve_now(offset, length):
            return False
        top = self.driver
        tally: Tally = []
        try:
            if not top.read_now(offset, iov, tally):
                return False
        except Exception:  # read() reports it (and retries what may be retried)
            return False
        for layer, n in tally:
            layer.hits[0] += n
        self._served_now(False, length // SECTOR)
        return True

    def zero_runs_now(self, offset: int, length: int, *, min_hole: int = HOLE_MIN,
                      max_runs: int = HOLE_MAX_RUNS) -> list[tuple[int, bool]] | None:
        """For a read about to be served: the runs of ``[offset, offset + length)`` as
        (length, reads as zeros), from the driver stack's :meth:`Driver.status_now`
        (cached metadata, never waiting), when some part of it reads as zeros; None when
        all of it is data, or the stack cannot tell now (then read as usual).

        Zero runs shorter than ``min_hole`` inside the range count as data, and more than
        ``max_runs`` runs give None: a reply in many small pieces costs more than the
        zeros. A range that reads as zeros from end to end is one run (``[(length,
        True)]``): the caller answers it without reading, and it is counted here as a
        read served."""
        try:
            extents = self.driver.status_now(offset, length)
        except Exception:  # the read reports what is wrong
            return None
        # Data first, and cheaply: it is what most reads are, and read_now checks the
        # rest (a running disk, whole sectors inside it) for them.
        if extents is None or (len(extents) == 1 and not extents[0][1] & STATE_ZERO):
            return None
        if not self._may_serve_now(offset, length):
            return None
        if len(extents) == 1:  # zeros from end to end
            if extents[0][0] != length:
                return None
            self._served_now(False, length // SECTOR)
            return [(length, True)]
        runs: list[tuple[int, bool]] = []
        covered = 0
        for n, flags in extents:
            zero = bool(flags & STATE_ZERO)
            covered += n
            if runs and runs[-1][1] == zero:
                runs[-1] = (runs[-1][0] + n, zero)
            else:
                runs.append((n, zero))
        if covered != length:
            return None
        if len(runs) == 1:
            if not runs[0][1]:
                return None
            self._served_now(False, length // SECTOR)
            return runs
        small = [(n, zero and n >= min_hole) for n, zero in runs]
        runs = []
        for n, zero in small:
            if runs and runs[-1][1] == zero:
                runs[-1] = (runs[-1][0] + n, zero)
            else:
                runs.append((n, zero))
        if len(runs) == 1 or len(runs) > max_runs:
            return None
        return runs

    def write_now(self, offset: int, view: memoryview, *, fua: bool = False) -> bool:
        """:meth:`read_now` for writes: True once the data is written (durable with
        ``fua``), False for :meth:`write` to do it (writes that allocate, to files on
        a device, or anything read_now would refuse)."""
        return self.writev_now(offset, [view], len(view), fua=fua)

    def writev_now(self, offset: int, iov: Sequence[memoryview], length: int, *,
                   fua: bool = False) -> bool:
        """:meth:`write_now` from several buffers (``length`` bytes in all)."""
        if self.read_only or not self._may_serve_now(offset, length):
            return False
        top = self.driver
        try:
            if not top.write_now(offset, iov, fua=fua):
                return False
        except Exception:  # write() does it again and reports what fails
            return False
        self._served_now(True, length // SECTOR)
        return True

    def _may_serve_now(self, offset: int, length: int) -> bool:
        """Running, and a request of whole sectors inside the disk: anything else goes
        the coroutine way, which holds, aligns or refuses it."""
        return (not self._closed and self._running.is_set() and length > 0
                and not (offset | length) % SECTOR and 0 <= offset <= self.driver.size - length)

    def _served_now(self, write: bool, sectors: int) -> None:
        """Count a request the side door served, as _finish counts the others."""
        if write:
            self._count_served(0, 0, 1, sectors)
        else:
            self._count_served(1, sectors, 0, 0)

    def _count_served(self, reads: int, read_sectors: int, writes: int,
                      write_sectors: int) -> None:
        """Count requests served at once (the side door's, the compiled inline path's)."""
        self.stats.submitted += reads + writes
        # A histogram's first bucket, without a clock read (LatencyHistogram.observe_instant)
        lat = self.latency
        lat.read.counts[0] += reads
        lat.write.counts[0] += writes
        self._count_done(reads, read_sectors, writes, write_sectors)
        if self._inflight:  # progress, for the watchdog
            self._last_progress = self._clock()

    def _count_done(self, reads: int, read_sectors: int, writes: int,
                    write_sectors: int) -> None:
        """Count reads and writes done without a Request of their own (served at once,
        or by a transport's compiled pass), in the statistics and the top's hits."""
        st = self.stats
        st.read_reqs += reads
        st.read_sectors += read_sectors
        st.write_reqs += writes
        st.write_sectors += write_sectors
        hits = self.driver.hits
        hits[0] += read_sectors
        hits[1] += write_sectors

    def inline_target(self) -> InlineTarget | None:
        """Where a transport's compiled inline path may serve this disk's reads (and
        writes, if ``writes``) itself, as :meth:`read_now`/:meth:`write_now` would: the
        top driver's :meth:`Driver.inline_target` while the disk runs (None while paused
        or closed, and for any stack with a filter on top). The transport takes only
        whole sectors inside the disk there, and reports them with :meth:`served_inline`.
        Ask again before each pass: the answer changes with the disk's state."""
        if self._closed or not self._running.is_set():
            return None
        target = self.driver.inline_target()
        if target is not None and target.writes and self.read_only:
            return target._replace(writes=False)
        return target

    def inline_async(self, reap: Reaper) -> AsyncTarget | None:
        """Where a transport's compiled pass may issue this disk's reads (and writes, if
        ``writes``) itself, to complete later: the top driver's
        :meth:`Driver.inline_async` while the disk runs (None while paused or closed, and
        for any stack with a filter on top), the driver reaping through ``reap``. The
        transport takes only whole sectors inside the disk there, tells
        :meth:`issued_inline` what it issued and :meth:`finished_inline` what finished,
        and serves again through :meth:`read`/:meth:`write` what failed there (retries
        and errors are the Python path's). Ask again before each pass."""
        if self._closed or not self._running.is_set():
            return None
        target = self.driver.inline_async(reap)
        if target is not None and target.writes and self.read_only:
            return target._replace(writes=False)
        return target

    def issued_inline(self, count: int) -> None:
        """``count`` requests were issued at :meth:`inline_async`'s target: in flight
        (pause and close wait for them) until :meth:`finished_inline` says so."""
        if count:
            if not self._async_inflight and not self._inflight:
                self._last_progress = self._clock()
                self._idle.clear()
            self._async_inflight += count
            st = self.stats
            st.in_flight += count
            st.submitted += count

    def finished_inline(self, reads: int, read_bytes: int, writes: int, write_bytes: int,
                        failed: int = 0, read_times: Sequence[float] | None = None,
                        write_times: Sequence[float] | None = None) -> None:
        """Requests issued at :meth:`inline_async`'s target finished: those served,
        counted as the Python path counts them (with how long each took, in seconds,
        as the transport timed them from its issue), and ``failed`` that the transport
        serves again through :meth:`read`/:meth:`write` (counted there)."""
        count = reads + writes + failed
        if not count:
            return
        lat = self.latency
        if read_times:
            lat.read.observe_all(read_times)
        if write_times:
            lat.write.observe_all(write_times)
        self._async_inflight -= count
        st = self.stats
        st.in_flight -= count
        st.submitted -= failed  # (submitted again by the Python path)
        self._count_done(reads, read_bytes // SECTOR, writes, write_bytes // SECTOR)
        self._last_progress = self._clock()
        self._stall_reported = False
        if not self._inflight and not self._async_inflight:
            self._idle.set()

    def add_inline_link(self, link: InlineLink) -> None:
        """``link`` serves requests at :meth:`inline_async`'s target outside the loop's
        turns from now on, until :meth:`remove_inline_link`."""
        self._links.add(link)

    def remove_inline_link(self, link: InlineLink) -> None:
        self._links.discard(link)

    def sync_links(self) -> None:
        """Have every link tell what it issued and finished so far."""
        for link in list(self._links):
            link.sync_inline()

    def _release_links(self) -> None:
        for link in list(self._links):
            link.release_inline()

    def served_inline(self, reads: int, read_bytes: int, writes: int,
                      write_bytes: int) -> None:
        """Count the requests a transport served at :meth:`inline_target`, as
        :meth:`_served_now` counts the side door's (the engine counts them too, as it
        counts the side door's inline system calls)."""
        self._count_served(reads, read_bytes // SECTOR, writes, write_bytes // SECTOR)
        self.driver.engine.count_inline(reads, writes)

    def status_served_inline(self, count: int) -> None:
        """Count the block status requests a transport answered at :meth:`inline_target`
        (from the maps it describes), as :meth:`block_status_now` counts its own."""
        self._count_statuses(count)

    def _count_statuses(self, count: int) -> None:
        """Block status requests answered at once: no clock read (the first latency
        bucket, as _served_now counts), progress for the watchdog."""
        st = self.stats
        st.submitted += count
        st.other_reqs += count
        self.latency.other.counts[0] += count
        if self._inflight:
            self._last_progress = self._clock()

    # ------------------------------------------------------------------ operations
    async def read(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the disk's bytes at ``offset``."""
        length = len(view)
        self._check(offset, length, errno.EINVAL)
        if not length:
            return
        if offset % SECTOR == 0 and length % SECTOR == 0:
            await self._submit(Request(Op.READ, offset, length, [view]))
            return
        start = offset - offset % SECTOR
        end = -(-(offset + length) // SECTOR) * SECTOR
        with scratch_buffer(end - start) as scratch:
            await self._submit(Request(Op.READ, start, end - start, [scratch]))
            view[:] = scratch[offset - start : offset - start + length]

    async def write(self, offset: int, view: memoryview, *, fua: bool = False) -> None:
        length = len(view)
        self._check_write(offset, length)
        if not length:
            return
        if offset % SECTOR == 0 and length % SECTOR == 0:
            await self._submit(Request(Op.WRITE, offset, length, [view], fua=fua))
            return
        # Read-modify-write of the partial sectors; unaligned writes are serialised so
        # that two of them sharing a sector cannot undo each other.
        async with self._rmw_lock:
            start = offset - offset % SECTOR
            end = -(-(offset + length) // SECTOR) * SECTOR
            with scratch_buffer(end - start) as scratch:
                head = slice(0, SECTOR)
                tail = slice(len(scratch) - SECTOR, len(scratch))
                await self._submit(Request(Op.READ, start, SECTOR, [scratch[head]]))
                if end - start > SECTOR:
                    await self._submit(Request(Op.READ, end - SECTOR, SECTOR,
                                               [scratch[tail]]))
                scratch[offset - start : offset - start + length] = view
                await self._submit(Request(Op.WRITE, start, end - start, [scratch],
                                           fua=fua))

    async def readv(self, offset: int, iov: Sequence[memoryview], length: int) -> None:
        """Fill the buffers of ``iov`` (``length`` bytes in all, whole sectors at a
        sector-aligned offset: EINVAL otherwise) with the disk's bytes at ``offset``."""
        self._check(offset, length, errno.EINVAL)
        if (offset | length) % SECTOR:
            raise BlktapError(f"{length} bytes at {offset}: not whole sectors", errno.EINVAL)
        if length:
            await self._submit(Request(Op.READ, offset, length, iov))

    async def writev(self, offset: int, iov: Sequence[memoryview], length: int, *,
                     fua: bool = False) -> None:
        """Write the buffers of ``iov`` (``length`` bytes, whole sectors) at ``offset``."""
        self._check_write(offset, length)
        if (offset | length) % SECTOR:
            raise BlktapError(f"{length} bytes at {offset}: not whole sectors", errno.EINVAL)
        if length:
            await self._submit(Request(Op.WRITE, offset, length, iov, fua=fua))

    async def flush(self) -> None:
        if self._closed:
            raise BlktapError(f"{self.name}: disk is closed", errno.ESHUTDOWN)
        await self._submit(Request(Op.FLUSH, 0, 0))

    async def discard(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._check_write(offset, length)
        if not self.caps & Caps.TRIM:
            return  # a hint nobody can act on
        # Only whole sectors inside the range are discarded (the protocol allows it).
        start = -(-offset // SECTOR) * SECTOR
        end = (offset + length) // SECTOR * SECTOR
        if end > start:
            await self._submit(Request(Op.DISCARD, start, end - start))
        if fua:
            await self.flush()

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = True,
                           fast: bool = False, fua: bool = False) -> None:
        self._check_write(offset, length)
        if not length:
            return
        start = -(-offset // SECTOR) * SECTOR
        end = (offset + length) // SECTOR * SECTOR
        if start >= end or start != offset or end != offset + length:
            if fast:
                raise BlktapError("unaligned zeroing is not fast", errno.EOPNOTSUPP)
            # The partial sectors at either end go through the write path.
            if start >= end:
                await self.write(offset, memoryview(bytes(length)), fua=fua)
                return
            if offset < start:
                await self.write(offset, memoryview(bytes(start - offset)))
            if end < offset + length:
                await self.write(end, memoryview(bytes(offset + length - end)))
        await self._submit(Request(Op.ZEROES, start, end - start, may_trim=may_trim,
                                   fast=fast, fua=fua))

    async def block_status(self, offset: int, length: int) -> Extents:
        """Runs of (length, flags) from ``offset``, covering at least one byte."""
        self._check(offset, length, errno.EINVAL)
        if not length:
            return []
        start, end = self._status_span(offset, length)
        extents = await self._submit(Request(Op.STATUS, start, end - start))
        assert isinstance(extents, list)
        return _cut_extents(extents, start, offset, length)

    def block_status_now(self, offset: int, length: int) -> Extents | None:
        """:meth:`block_status` at once, on the loop thread, from what the driver stack
        knows without waiting (:meth:`Driver.status_now`); None when it cannot tell now,
        or for anything :meth:`block_status` would hold, refuse or retry (a paused or
        closed disk, a range outside it, a driver's error): the transport then calls
        that. Counted in the statistics as any other request."""
        if (self._closed or not self._running.is_set() or length <= 0 or offset < 0
                or offset + length > self.size):
            return None
        start, end = self._status_span(offset, length)
        try:
            extents = self.driver.status_now(start, end - start)
        except Exception:  # block_status reports it
            return None
        if extents is None or sum(n for n, _ in extents) != end - start:
            return None
        self._count_statuses(1)
        return _cut_extents(extents, start, offset, length)

    def _status_span(self, offset: int, length: int) -> tuple[int, int]:
        """The whole sectors around a block status range (the disk's last one may be
        partial)."""
        start = offset - offset % SECTOR
        end = min(-(-(offset + length) // SECTOR) * SECTOR, -(-self.size // SECTOR) * SECTOR)
        return start, end

    def dirty_bitmaps(self) -> list[str]:
        """Names of the changed-block bitmaps of the driver stack (its CBT log)."""
        return [d.bitmap_name for d in self._bitmap_layers()]

    def _bitmap_layers(self) -> list[DirtyBitmap]:
        # By attribute, not isinstance(d, DirtyBitmap): a runtime-checkable protocol's
        # isinstance costs about 8 us a layer, and every NBD handshake asks.
        return [cast(DirtyBitmap, d) for d in self.driver.chain()
                if isinstance(getattr(d, "bitmap_name", None), str) and hasattr(d, "runs")]

    def dirty_status_now(self, name: str, offset: int, length: int) -> Extents | None:
        """:meth:`dirty_status` at once (the bitmap is in memory), or None where that
        would wait or refuse (a paused disk, a bitmap that is gone)."""
        if (self._closed or not self._running.is_set() or length < 0 or offset < 0
                or offset + length > self.size):
            return None
        bitmap = self._dirty_bitmap(name)
        return None if bitmap is None else bitmap.runs(offset, length)

    def _dirty_bitmap(self, name: str) -> DirtyBitmap | None:
        for d in self._bitmap_layers():
            if d.bitmap_name == name:
                return d
        return None

    async def dirty_status(self, name: str, offset: int, length: int) -> Extents:
        """Runs of (length, 1 changed / 0 unchanged) from ``offset`` in the bitmap
        ``name``; held while paused; EINVAL once the bitmap is gone (unpaused without
        that log)."""
        self._check(offset, length, errno.EINVAL)
        await self._held()
        bitmap = self._dirty_bitmap(name)
        if bitmap is not None:
            return bitmap.runs(offset, length)
        raise BlktapError(f"{self.name}: no dirty bitmap {name!r} (its log was replaced "
                          "or removed)", errno.EINVAL)

    async def cache(self, offset: int, length: int) -> None:
        self._check(offset, length, errno.EINVAL)
        if length:
            start = offset - offset % SECTOR
            await self._submit(Request(Op.CACHE, start, offset + length - start))

    # ------------------------------------------------------------------ lifecycle
    async def drain(self) -> None:
        """Wait until no request is in flight."""
        while self._queue or self._inflight or self._async_inflight:
            await asyncio.sleep(0)
            await self._idle.wait()

    @property
    def paused(self) -> bool:
        return bool(self.state & (VbdState.PAUSED | VbdState.PAUSE_REQUESTED))

    async def _close_stack(self) -> None:
        await self.driver.close_chain()

    async def pause(self) -> None:
        """Hold new requests, let those in flight finish, close the driver stack.

        EBUSY if a pause is already requested or done (the reference's answer), ESHUTDOWN
        once closed. The disk is paused even if closing a driver failed (its error is
        raised): the files are not in use any more either way."""
        if self._closed:
            raise BlktapError(f"{self.name}: disk is closed", errno.ESHUTDOWN)
        if self.paused:
            raise BlktapError(f"{self.name} is already paused", errno.EBUSY)
        self.state |= VbdState.PAUSE_REQUESTED
        self._running.clear()
        self._release_links()  # (what they issued is counted in flight now)
        await self.drain()
        try:
            await self._close_stack()
        finally:
            self.state = VbdState.CLOSED | VbdState.QUIESCED | VbdState.PAUSED

    async def resume(self, driver: Driver, name: str | None = None) -> None:
        """Serve from ``driver`` (the stack opened again, perhaps on a new leaf) and let
        the held requests go. A stack of another size is refused with EMEDIUMTYPE (as the
        reference's resume does) and the disk stays paused; so is a read-only stack for
        a writable disk (EROFS)."""
        if not self.state & VbdState.PAUSED:
            raise BlktapError(f"{self.name} is not paused", errno.EINVAL)
        if driver.size != self.size:
            raise BlktapError(f"{name or driver.path}: {driver.size} bytes, the paused disk "
                              f"has {self.size}", errno.EMEDIUMTYPE)
        if not self.read_only and not driver.writable:
            raise BlktapError(f"{name or driver.path} is read-only", errno.EROFS)
        self.driver = driver
        bound_requests(driver, self.timeout)
        if name:
            self.name = name
        self.state = VbdState(0)
        self._last_progress = self._clock()
        self._running.set()
        held, self._held_back = self._held_back, []
        for req in held:
            self._start(req)
        for told in list(self.resumed):
            told()

    async def close(self) -> None:
        """Let requests in flight finish, then close every driver (the VHD driver writes
        its batmap and footer back and syncs). Requests held by a pause fail with
        ESHUTDOWN."""
        if self._closed:
            return
        self._release_links()
        await self.drain()
        self._closed = True
        # (a link made while the disk drained: given back, it cannot link again now)
        self._release_links()
        await self.drain()
        self._watchdog.cancel()
        self._unwatch()
        was_paused = bool(self.state & VbdState.PAUSED)
        self.state = VbdState.CLOSED
        self._running.set()  # wake the held requests: they fail, the disk is closed
        held, self._held_back = self._held_back, []
        for req in held:
            assert req.done is not None
            try:
                req.done(BlktapError(f"{self.name}: disk is closed", errno.ESHUTDOWN))
            except Exception:
                log.exception("%s: failing a held %s failed", self.name, req.op.value)
        if not was_paused:
            await self._close_stack()

    def stats_dict(self) -> dict:
        """The reference's ``tap-ctl stats`` object, in its field order (leaf first in
        ``images``; sectors), then our own counters.

        A layer's ``hits`` and ``fail`` are the sectors that layer served (or failed)
        itself, as the C tapdisk counts them on the image that completes a request: a
        read the leaf forwards to its parent counts on the parent, not on both. The
        drivers count what each layer was asked for (cheaper on the data path: one add
        per forward); a layer's own reads are what it was asked for less what it passed
        down, since a parent is asked only through its child. Writes are never passed
        down."""
        self.sync_links()
        st = self.stats
        chain = self.driver.chain()
        for d in chain:
            d.settle_hits()
        images = []
        for d, below in zip(chain, [*chain[1:], None], strict=True):
            hits, fail = list(d.hits), list(d.fail)
            if below is not None:
                hits[0] -= below.hits[0]
                fail[0] -= below.fail[0]
            if d.listed_in_stats:  # (a filter without data of its own is not an image)
                images.append({"name": d.path, "hits": hits, "fail": fail,
                               "driver": d.describe()})
        return {
            "name": self.name,
            "secs": [st.read_sectors, st.write_sectors],
            "images": images,
            "FIXME_enospc_redirect_count": 0,
            "nbd_mirror_failed": 0,
            "reqs_outstanding": st.in_flight,
            "read_caching": "false",
            "counters": st.as_dict(),
            "latency": self.latency.as_dict(),
        }
