"""One split virtqueue as the device sees it.

    guest ──avail ring──► pop ──► chain walk ──► on_chain(queue, head, descriptors)
                                     (each pass inside ``batch``)
          ◄──used ring─── push ◄── completion (at once, from the request's task, or from
                                   the VBD's callback: ``untasked`` counts those)
          ◄──call eventfd── flush (once per turn of the loop, EVENT_IDX-aware)

States (the vhost-user spec's): STOPPED until SET_VRING_KICK, then started; started
rings are DISABLED or ENABLED (SET_VRING_ENABLE, or ENABLED at once when protocol
features were not negotiated). Only an ENABLED ring is processed. GET_VRING_BASE stops
it: no new requests, those in flight finish into the used ring, and the next avail index
is returned. A ring keeps its addresses and index across a stop, for the restart.

A guest is not trusted: a head index past the table, a chain longer than its table
(which catches loops), an indirect table where none may be, of a bad size or outside
memory, an avail index that jumps by more than the queue size: the queue is marked
broken (:class:`BadRing`) and the device's ``on_broken`` disconnects the front-end.
What is wrong with one request but leaves its status byte reachable (data outside
memory, the wrong direction) is the blk layer's, and fails that request only.

Memory ordering: descriptors and ring entries are written before the index that
publishes them (x86 keeps stores in order, and CPython does them in program order).
The two places where a later load must not pass an earlier store (publish the used index,
then read the driver's used_event/flags; publish avail_event, then read the avail index
again) take a full barrier: an uncontended lock's acquire and release are locked
instructions.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from blktap.errors import BlktapError
from blktap.transport.tasks import Untasked, settle, start_owned
from blktap.transport.vhost_user import virtio as v
from blktap.transport.vhost_user.memory import BadAddress, GuestMemory

log = logging.getLogger("blktap.vhost")

# Requests one kick processes before it lets the other queues and disks run.
BUDGET = 128
# The longest indirect table we follow (QEMU's own limit for its virtqueues).
MAX_INDIRECT = 1024

_DESC_UNPACK = v.DESC.unpack_from
_barrier_lock = threading.Lock()


def full_barrier() -> None:
    _barrier_lock.acquire()
    _barrier_lock.release()


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's vring_need_event: did [old, new) cross the index the other side asked to
    be told about?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class BadRing(BlktapError):
    """The guest broke the ring's rules: the device stops serving this front-end."""

    default_errno = errno.EPROTO


class RingState(enum.Enum):
    STOPPED = "stopped"
    DISABLED = "started, disabled"
    ENABLED = "started, enabled"


# (guest-physical address, length, device-writable) of one buffer of a chain
Descriptor = tuple[int, int, int]
ChainHandler = Callable[["Virtqueue", int, list[Descriptor]], None]


class Virtqueue:
    def __init__(self, index: int, memory: GuestMemory, on_chain: ChainHandler,
                 on_broken: Callable[[BaseException], None], name: str = "", *,
                 batch: AbstractContextManager | None = None) -> None:
        self.index = index
        self.memory = memory
        self.on_chain = on_chain
        # Around each pass over the avail ring (the VBD's batch: what the pass starts
        # goes to the driver at its end).
        self.batch: AbstractContextManager = batch or nullcontext()
        self.on_broken = on_broken
        self.name = name or f"vq{index}"
        self.loop = asyncio.get_running_loop()
        self.state = RingState.STOPPED
        self.enabled = False
        self.broken = False
        # set by the front-end
        self.num = 0
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.addr_set = False
        self.last_avail = 0
        self.kick_fd = -1
        self.call_fd = -1
        self.err_fd = -1
        self.event_idx = False
        self.indirect = False
        # the rings, mapped
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None  # as u16
        self._used16: memoryview | None = None
        self._used32: memoryview | None = None
        self._used_event = 0  # u16 positions
        self._avail_event = 0
        # used ring bookkeeping
        self.used_idx = 0  # next used slot (published up to _published)
        self._published = 0
        self._signal_valid = False
        self._flush_pending = False
        self._processing = False  # in process(): it publishes at the end of its pass
        self._call_failed = False
        self.tasks: set[asyncio.Task] = set()
        # Requests in flight without a task (the VBD's callback way).
        self.untasked = Untasked(self.loop)
        self.inflight: Any = None  # an InflightQueue when the front-end shares one
        self._resubmit: list[int] = []  # heads a previous back-end left in flight
        self.served = 0  # chains taken from the avail ring

    # ------------------------------------------------------------------ setup
    def set_num(self, num: int) -> None:
        if not 0 < num <= v.MAX_QUEUE_SIZE or num & (num - 1):
            raise BadRing(f"{self.name}: queue size {num} is not a power of 2 up to "
                          f"{v.MAX_QUEUE_SIZE}")
        self._require_stopped("SET_VRING_NUM")
        self.num = num

    def set_addr(self, desc: int, avail: int, used: int) -> None:
        self._require_stopped("SET_VRING_ADDR")
        self.desc_addr, self.avail_addr, self.used_addr = desc, avail, used
        self.addr_set = True
        self.map()

    def set_base(self, base: int) -> None:
        self._require_stopped("SET_VRING_BASE")
        self.last_avail = base & 0xFFFF

    def _require_stopped(self, what: str) -> None:
        if self.state is not RingState.STOPPED:
            raise BadRing(f"{self.name}: {what} while the ring runs")

    def map(self) -> None:
        """Translate the ring addresses (front-end user addresses) into views; again
        after every memory table change. A ring that does not translate is the classic
        sign of guest RAM that is not shared (memory-backend-memfd,share=on)."""
        self._desc = self._avail = self._used16 = self._used32 = None
        if not self.addr_set or not self.num:
            return
        num = self.num
        try:
            self._desc = self.memory.uva(self.desc_addr, 16 * num)
            self._avail = self.memory.uva(self.avail_addr, v.avail_bytes(num)).cast("H")
            used = self.memory.uva(self.used_addr, v.used_bytes(num))
        except BadAddress as exc:
            raise BadRing(f"{self.name}: ring addresses desc={self.desc_addr:#x} "
                          f"avail={self.avail_addr:#x} used={self.used_addr:#x} are not in "
                          f"the shared memory ({len(self.memory)} regions): {exc}; is the "
                          "guest RAM shared (-object memory-backend-memfd,share=on)?") \
                from None
        self._used16 = used.cast("H")
        self._used32 = used[: 4 + 8 * num].cast("I")
        self._used_event = 2 + num
        self._avail_event = 2 + 4 * num

    def unmap(self) -> None:
        self._desc = self._avail = self._used16 = self._used32 = None

    def set_kick(self, fd: int) -> None:
        """A new kick eventfd: the ring starts (spec: on the kick; we start at once and
        look at the avail ring, which is the same and survives a lost kick)."""
        self._drop_kick()
        self.kick_fd = fd
        os.set_blocking(fd, False)
        if self.state is RingState.STOPPED:
            self._start()
        else:
            self.loop.add_reader(fd, self._on_kick)
            self.loop.call_soon(self.process)

    def set_call(self, fd: int) -> None:
        if self.call_fd >= 0:
            os.close(self.call_fd)
        if fd >= 0:
            os.set_blocking(fd, False)  # a full pipe must not stop the whole loop
        self.call_fd = fd
        self._signal_valid = False
        self._call_failed = False

    def set_err(self, fd: int) -> None:
        if self.err_fd >= 0:
            os.close(self.err_fd)
        self.err_fd = fd

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled
        if self.state is not RingState.STOPPED:
            self.state = RingState.ENABLED if enabled else RingState.DISABLED
            if enabled:
                self.loop.call_soon(self.process)

    def _start(self) -> None:
        if self._desc is None:
            self.map()
        if self._desc is None:
            raise BadRing(f"{self.name}: kicked before its size and addresses were set")
        assert self._used16 is not None
        self.used_idx = self._published = self._used16[1]
        self._signal_valid = False
        self.state = RingState.ENABLED if self.enabled else RingState.DISABLED
        if self.inflight is not None:
            self._resubmit = self.inflight.attach(self)
        self.loop.add_reader(self.kick_fd, self._on_kick)
        if self.enabled:
            self.loop.call_soon(self.process)

    async def stop(self) -> int:
        """GET_VRING_BASE: stop taking requests, let those in flight complete into the
        used ring, return the next avail index."""
        self._drop_kick()
        self.state = RingState.STOPPED
        await self.drain()
        self.flush()
        return self.last_avail

    def halt(self) -> None:
        """Stop taking requests at once (the session ends); those in flight go on."""
        self._drop_kick()
        self.state = RingState.STOPPED

    def _drop_kick(self) -> None:
        if self.kick_fd >= 0:
            self.loop.remove_reader(self.kick_fd)
            os.close(self.kick_fd)
            self.kick_fd = -1

    async def drain(self) -> None:
        """Wait for every request in flight: tasks, and those without one."""
        await settle(self.tasks, self.untasked)

    def close(self) -> None:
        """Drop every fd and view (the caller drained the tasks first)."""
        self._drop_kick()
        self.state = RingState.STOPPED
        self.inflight = None
        for name in ("call_fd", "err_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        self.unmap()

    # ------------------------------------------------------------------ requests
    def _on_kick(self) -> None:
        try:
            os.eventfd_read(self.kick_fd)
        except BlockingIOError:
            pass
        except OSError as exc:
            log.warning("%s: kick eventfd: %s", self.name, exc)
        self.process()

    def process(self) -> None:
        """Take what the guest made available, up to the budget."""
        if self.state is not RingState.ENABLED or self.broken:
            return
        avail = self._avail
        assert avail is not None and self._used16 is not None
        self._processing = True
        try:
            with self.batch:
                self._take_available(avail)
        finally:
            self._processing = False
        if not self.broken:
            self.flush()

    def _take_available(self, avail: memoryview) -> None:
        num = self.num
        budget = BUDGET
        try:
            if self._resubmit:
                heads, self._resubmit = self._resubmit, []
                for head in heads:
                    self.on_chain(self, head, self.walk(head))
                    if self.broken:
                        return
            while True:
                idx = avail[1]
                last = self.last_avail
                if idx == last:
                    if self.event_idx:
                        # Ask for a kick on the next buffer, then look once more: it may
                        # have come between the read above and this store.
                        self._used16[self._avail_event] = last
                        full_barrier()
                        if avail[1] != last:
                            continue
                    break
                if (idx - last) & 0xFFFF > num:
                    raise BadRing(f"{self.name}: avail index moved from {last} to {idx}, "
                                  f"more than the queue size {num}")
                if not budget:  # the rest after the others had their turn
                    self.loop.call_soon(self.process)
                    break
                head = avail[2 + last % num]
                self.last_avail = (last + 1) & 0xFFFF
                budget -= 1
                chain = self.walk(head)
                if self.inflight is not None:
                    self.inflight.start(head)
                self.served += 1
                self.on_chain(self, head, chain)
                if self.broken:
                    return
        except (BadRing, BadAddress) as exc:
            self.fail(exc)

    def walk(self, head: int) -> list[Descriptor]:
        """The descriptors of the chain at ``head`` (an indirect table followed), checked
        for shape; their addresses are the caller's to translate."""
        table = self._desc
        assert table is not None
        limit = self.num
        if head >= limit:
            raise BadRing(f"{self.name}: head index {head} past the queue size {limit}")
        out: list[Descriptor] = []
        i = head
        indirect = False
        while True:
            addr, length, flags, nxt = _DESC_UNPACK(table, i << 4)
            if flags & v.DESC_F_INDIRECT:
                if not self.indirect:
                    raise BadRing(f"{self.name}: indirect descriptor without INDIRECT_DESC")
                if indirect or out:
                    raise BadRing(f"{self.name}: indirect descriptor inside a chain")
                if flags & v.DESC_F_NEXT:
                    raise BadRing(f"{self.name}: indirect descriptor with NEXT")
                if not length or length & 15 or length >> 4 > MAX_INDIRECT:
                    raise BadRing(f"{self.name}: indirect table of {length} bytes")
                try:
                    table = self.memory.gpa(addr, length)
                except BadAddress as exc:
                    raise BadRing(f"{self.name}: indirect table: {exc}") from None
                limit = length >> 4
                indirect = True
                i = 0
                continue
            out.append((addr, length, flags & v.DESC_F_WRITE))
            if not flags & v.DESC_F_NEXT:
                return out
            if len(out) >= limit:
                raise BadRing(f"{self.name}: chain at {head} is longer than its table "
                              f"({limit}): a loop")
            i = nxt
            if i >= limit:
                raise BadRing(f"{self.name}: next index {i} past the table ({limit})")

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a request's coroutine; the queue owns the task (stop and close wait)."""
        start_owned(self.loop, self.tasks, coro)

    def push(self, head: int, written: int) -> None:
        """Return a chain to the guest (published by the next flush)."""
        used = self._used32
        if used is None:  # the ring is gone (front-end left): nothing to tell
            return
        slot = (self.used_idx % self.num) << 1
        used[slot + 1] = head
        used[slot + 2] = written
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        if self.inflight is not None:
            self.inflight.end(head)
        # Published once per batch: at the end of process()'s pass (the side door's
        # answers), now when no other request is in flight (this one is the last: a turn
        # of the loop saved), else at the next turn with those of this one.
        if self._processing:
            return
        if len(self.tasks) + self.untasked.count <= 1:
            self.flush()
        elif not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Publish the used entries pushed so far and signal the guest if it asked."""
        self._flush_pending = False
        used16 = self._used16
        new, old = self.used_idx, self._published
        if new == old or used16 is None:
            return
        used16[1] = new
        self._published = new
        if self.inflight is not None:
            self.inflight.published(new)
        full_barrier()
        if self.event_idx:
            assert self._avail is not None
            notify = not self._signal_valid or need_event(
                self._avail[self._used_event], new, old)
            self._signal_valid = True
        else:
            assert self._avail is not None
            notify = not self._avail[0] & v.AVAIL_F_NO_INTERRUPT
        if notify and self.call_fd >= 0:
            try:
                os.eventfd_write(self.call_fd, 1)
            except OSError as exc:
                if not self._call_failed:  # once per fd
                    self._call_failed = True
                    log.warning("%s: call eventfd: %s", self.name, exc)

    def fail(self, exc: BaseException) -> None:
        if self.broken:
            return
        self.broken = True
        self._drop_kick()
        log.error("%s: %s; the device needs a reset: disconnecting the front-end",
                  self.name, exc)
        self.on_broken(exc)
