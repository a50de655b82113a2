"""``valve``: a filter that holds requests to keep a disk within its rate.

    valve:LIMITS:TYPE:PATH      e.g. valve:rate=20M,iops=500:vhd:/srv/leaf.vhd

sits above the driver stack of ``TYPE:PATH`` (the reference's chain file puts
``valve:SOCKET`` above the image the same way). LIMITS (:mod:`blktap.tapdisk.ratelimit`)
is a token bucket of bytes per second, one of requests per second, their burst sizes,
and perhaps a ``blktap rated`` group whose rate this disk shares with others.

- Requests pass in the order they came (one queue, first in first out): a flush waits
  for every request before it, and nothing behind it overtakes it. A request that finds
  the queue empty and the buckets full enough passes at once, in the caller's task.
- Limited requests wait, they never fail; a caller that gives up (cancelled) leaves the
  queue and takes no credit.
- Reads and writes cost their bytes and one request; discard, write-zeroes, block status
  and cache one request; flush nothing (but it keeps its place in the line).
- :meth:`ValveDriver.set_limits` changes the limits live (``tap-ctl valve``).
- In a group, a request also needs credit granted by the group's daemon; closing the
  stack (close, pause) hands the unused credit back to the group.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from blktap.errors import UsageError
from blktap.io.engine import Engine
from blktap.io.iov import total
from blktap.rated import client as group_client
from blktap.rated.client import GroupMember
from blktap.tapdisk.driver import Driver, Extents, Filter, OpenContext, Tally
from blktap.tapdisk.ratelimit import Limits, TokenBucket, group_socket

log = logging.getLogger("blktap.valve")

Sleep = Callable[[float], Awaitable[None]]


def split_spec(path: str) -> tuple[str, str]:
    """``LIMITS:TYPE:PATH`` (what follows ``valve:``) -> (limits text, inner spec)."""
    limits, sep, inner = path.partition(":")
    if not sep or not inner:
        raise UsageError(f"valve:{path}: use valve:LIMITS:TYPE:PATH "
                         "(e.g. valve:rate=20M:vhd:/srv/disk.vhd)")
    return limits, inner


class _Waiter:
    __slots__ = ("nbytes", "nios", "future")

    def __init__(self, nbytes: int, nios: int, future: asyncio.Future) -> None:
        self.nbytes = nbytes
        self.nios = nios
        self.future = future


class ValveDriver(Filter):
    name = "valve"
    type_id = 14

    def __init__(self, engine: Engine, inner: str | Driver, limits: Limits, *,
                 writable: bool | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Sleep = asyncio.sleep) -> None:
        """Over ``inner``: the spec the stack opens below (``open_layer``), or a driver
        already open (``over``, tests)."""
        below = inner if isinstance(inner, Driver) else None
        if writable is None:
            writable = below.writable if below is not None else False
        super().__init__(engine, "" if below is not None else str(inner), writable=writable)
        self.clock = clock
        self.sleep = sleep
        self.limits = Limits()
        self.bytes = TokenBucket(0, 1, clock)
        self.ios = TokenBucket(0, 1, clock)
        self.group: GroupMember | None = None
        self._queue: collections.deque[_Waiter] = collections.deque()
        self._queued_bytes = 0
        self._pump: asyncio.Task | None = None
        self._closed = False
        self._leaving: set[asyncio.Task] = set()  # old groups' connections closing
        # For stats: requests held / passed, bytes passed, seconds spent waiting.
        self.held = [0, 0]  # [waiting now, held in all]
        self.passed = [0, 0]  # [requests, bytes]
        self.set_limits(limits)
        if below is not None:
            self.parent = below
            self.validate_parent(below)

    @classmethod
    def open_layer(cls, ctx: OpenContext, args: str) -> Driver:
        """``valve:LIMITS:INNER``: the stack opens INNER below (a TYPE:ARGS spec)."""
        text, inner = split_spec(args)
        return cls(ctx.engine, inner, Limits.parse(text), writable=ctx.writable)

    @classmethod
    def over(cls, engine: Engine, below: Driver, limits: Limits) -> ValveDriver:
        """A valve over a stack already open (``blktap serve --limit``)."""
        return cls(engine, below, limits)

    # ------------------------------------------------------------------ limits
    @property
    def path(self) -> str:  # type: ignore[override]
        limits = self.__dict__.get("limits")
        return limits.text() if limits is not None else ""


    @path.setter
    def path(self, value: str) -> None:
        pass  # the limits are the name

    def set_limits(self, limits: Limits) -> None:
        """Apply ``limits`` from now on (the held requests are measured against them at
        once). A new group is joined and the old one left (its credit handed back)."""
        if limits.group:
            group_socket(limits.group)  # a bad name fails here, changing nothing
        self.bytes.set(limits.rate, limits.bytes_capacity)
        self.ios.set(limits.iops, limits.iops_capacity)
        old_group = self.limits.group
        self.limits = limits
        if limits.group != old_group:
            self._switch_group(limits.group)
        self._restart_pump()

    def _switch_group(self, group: str | None) -> None:
        """Leave the old group (handing its credit back) and join ``group``: the
        connection is made on the event loop, when a request first needs it (a stack
        is opened in a worker thread)."""
        old, self.group = self.group, None
        if old is not None and old.started:
            task = asyncio.get_running_loop().create_task(old.close())
            self._leaving.add(task)
            task.add_done_callback(self._leaving.discard)
        if group:
            self.group = GroupMember(group_socket(group), name=f"valve {group}")

    def _restart_pump(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            self._pump = None
        if self._queue:
            self._pump = asyncio.get_running_loop().create_task(self._run_pump())

    # ------------------------------------------------------------------ admission
    def _may_pass(self, nbytes: int, nios: int) -> bool:
        if self.bytes.delay(nbytes) or self.ios.delay(nios):
            return False
        group = self.group
        if group is None or nbytes <= 0:
            return True
        if not group.started:
            group.start()
        return group.credit >= nbytes or self._group_gone(group)

    @staticmethod
    def _group_gone(group: GroupMember) -> bool:
        """The group's daemon has been away for longer than the grace: pass on the
        disk's own limits (see rated/client.py)."""
        return not group.connected and group.down_for() >= group_client.GRACE

    def _take(self, nbytes: int, nios: int) -> None:
        self.bytes.take(nbytes)
        self.ios.take(nios)
        group = self.group
        if group is not None and nbytes > 0 and group.credit >= nbytes:
            group.spend(nbytes)  # (else it passes because the daemon is gone)
        self.passed[0] += 1
        self.passed[1] += nbytes

    def _now(self, nbytes: int, nios: int) -> bool:
        """Pass at once (taking the credit) if nobody waits and the credit is there."""
        if self._queue or not self._may_pass(nbytes, nios):
            return False
        self._take(nbytes, nios)
        return True

    async def _admit(self, nbytes: int, nios: int) -> None:
        """Wait for this request's turn and credit."""
        if self._now(nbytes, nios):
            return
        loop = asyncio.get_running_loop()
        waiter = _Waiter(nbytes, nios, loop.create_future())
        self._queue.append(waiter)
        self._queued_bytes += nbytes
        self.held[0] += 1
        self.held[1] += 1
        if self._pump is None or self._pump.done():
            self._pump = loop.create_task(self._run_pump())
        try:
            await waiter.future
        except asyncio.CancelledError:
            if not waiter.future.done() or waiter.future.cancelled():
                # Still in line: it leaves, taking nothing.
                with contextlib.suppress(ValueError):
                    self._queue.remove(waiter)
                    self._queued_bytes -= nbytes
                    self.held[0] -= 1
            raise

    async def _run_pump(self) -> None:
        """Let the queue out in order, as the credit comes."""
        while self._queue:
            head = self._queue[0]
            if head.future.done():  # its caller gave up
                self._queue.popleft()
                continue
            wait = max(self.bytes.delay(head.nbytes), self.ios.delay(head.nios))
            if wait > 0:
                await self.sleep(wait)
                continue
            group = self.group
            if (group is not None and head.nbytes > 0 and group.credit < head.nbytes
                    and not self._group_gone(group)):
                group.changed.clear()
                group.want(self._queued_bytes - group.credit)
                if group.connected:
                    await group.changed.wait()
                else:  # until it connects, or the grace is over
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            group.changed.wait(),
                            max(0.01, group_client.GRACE - group.down_for()))
                continue
            self._queue.popleft()
            self._queued_bytes -= head.nbytes
            self.held[0] -= 1
            self._take(head.nbytes, head.nios)
            head.future.set_result(None)
        if self.group is not None:
            self.group.want(0)

    # ------------------------------------------------------------------ operations
    async def read(self, offset: int, iov: Sequence[memoryview]) -> None:
        n = total(iov)
        await self._admit(n, 1)
        await self._forward(0, n, self.parent.read(offset, iov))  # type: ignore[union-attr]

    async def write(self, offset: int, iov: Sequence[memoryview], *, fua: bool = False) -> None:
        n = total(iov)
        await self._admit(n, 1)
        await self._forward(1, n, self.parent.write(offset, iov, fua=fua))  # type: ignore[union-attr]

    async def _forward(self, rw: int, nbytes: int, op: Awaitable[None]) -> None:
        """Run the parent's operation, counting it in the parent's hits/fail."""
        parent = self.parent
        assert parent is not None
        sectors = -(-nbytes // 512)
        parent.hits[rw] += sectors
        try:
            await op
        except BaseException:
            parent.fail[rw] += sectors
            raise

    def read_now(self, offset: int, iov: Sequence[memoryview], tally: Tally) -> bool:
        parent = self.parent
        assert parent is not None
        n = len(iov[0]) if len(iov) == 1 else total(iov)
        if self._queue or not self._may_pass(n, 1):
            return False
        if not parent.read_now(offset, iov, tally):
            return False
        self._take(n, 1)
        tally.append((parent, n // 512))
        return True

    def write_now(self, offset: int, iov: Sequence[memoryview], *, fua: bool = False) -> bool:
        parent = self.parent
        assert parent is not None
        n = len(iov[0]) if len(iov) == 1 else total(iov)
        if self._queue or not self._may_pass(n, 1):
            return False
        if not parent.write_now(offset, iov, fua=fua):
            return False
        self._take(n, 1)
        parent.hits[1] += n // 512
        return True

    async def flush(self) -> None:
        await self._admit(0, 0)
        await self.parent.flush()  # type: ignore[union-attr]

    async def discard(self, offset: int, length: int) -> None:
        await self._admit(0, 1)
        await self.parent.discard(offset, length)  # type: ignore[union-attr]

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = True,
                           fast: bool = False, fua: bool = False) -> None:
        await self._admit(0, 1)
        await self.parent.write_zeroes(offset, length, may_trim=may_trim,  # type: ignore[union-attr]
                                       fast=fast, fua=fua)

    def status_now(self, offset: int, length: int) -> Extents | None:
        return None  # a read answered from the status would pass the limits untaken

    async def block_status(self, offset: int, length: int) -> Extents:
        await self._admit(0, 1)
        return await self.parent.block_status(offset, length)  # type: ignore[union-attr]

    async def cache(self, offset: int, length: int) -> None:
        await self._admit(0, 1)
        await self.parent.cache(offset, length)  # type: ignore[union-attr]

    async def close(self) -> None:
        """Stop (the stack is closing: nothing is queued after a drain) and hand the
        group's unused credit back."""
        self._closed = True
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None
        for waiter in self._queue:  # only if closed without a drain
            if not waiter.future.done():
                waiter.future.set_exception(
                    OSError(errno.ESHUTDOWN, "the disk is closing"))
        self._queue.clear()
        group, self.group = self.group, None
        if group is not None:
            await group.close()
        for task in list(self._leaving):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task

    def describe(self) -> dict:
        group = self.group
        status = {
            "limits": self.limits.text(),
            "rate": self.limits.rate,
            "iops": self.limits.iops,
            "held": list(self.held),
            "passed": list(self.passed),
            "group": None if group is None else {
                "socket": group.path, "connected": group.connected,
                "credit": group.credit, "need": group.need, "granted": group.granted},
        }
        return {"type": self.type_id, "name": self.name, "status": status}


# ---------------------------------------------------------------------- specs
PREFIX = "valve:"


def spec_limits(spec: str) -> str | None:
    """The limits text of a ``valve:LIMITS:INNER`` spec, None for another spec."""
    if not spec.startswith(PREFIX):
        return None
    return split_spec(spec[len(PREFIX):])[0]


def with_limits(spec: str, limits: Limits) -> str:
    """``spec`` (a valve spec) with its limits replaced."""
    _old, inner = split_spec(spec[len(PREFIX):])
    return f"{PREFIX}{limits.text()}:{inner}"


def keep_valve(old: str, new: str) -> str:
    """The spec to resume on: a new leaf (``unpause -a TYPE:PATH``) keeps the valve
    (and limits) of the old spec, unless the new one names a valve of its own."""
    limits = spec_limits(old)
    if limits is None or new.startswith(PREFIX):
        return new
    return f"{PREFIX}{limits}:{new}"
