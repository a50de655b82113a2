"""The transmission phase: requests in, replies out, many in flight, out of order.

The reader parses request headers straight from the receive buffer; what the VBD's side
door cannot serve at once goes to the VBD the callback way (reads and writes of whole
sectors: no task per request, the reply posted from the completion) or in a task of its
own (everything else). Requests parsed in the same turn of the event loop reach the VBD
together, which merges neighbours. Write payloads land in pooled, page-aligned buffers; read
replies go out as one ``sendmsg`` of header and data. Replies are never interleaved
(one send lock).

A connection on a plain socket starts with no task at all (:meth:`Connection.start`):
the channel's readiness callback hands what arrives to the data hook, which serves the
requests it can take, and a DISC or the end of the stream with nothing in flight closes
it there. Only what must wait (room, a payload still to come, a command the hook does not
take, an error to answer) gets it a task, :meth:`Connection.serve`, which goes on from
the receive buffer. A short-lived client (a probe, one block status and DISC, as nbdcopy
and nbdinfo make) so costs no task and no turn of the loop of its own.

Memory: a request is admitted when the connection has room (:data:`MAX_IN_FLIGHT`
requests, :data:`MAX_IN_FLIGHT_BYTES` of payload) and its buffer fits the server-wide
:class:`~blktap.io.buffers.MemoryBudget`; otherwise the reader waits, in line with every
other connection, and stops reading that socket meanwhile. A client that reads none of
its replies for :data:`SEND_STALL_TIMEOUT` while another connection waits for memory is
dropped, so that what it holds goes to those who wait.

A client that is gone (a reply could not be sent, the socket hung up or was reset, or it
broke the protocol) gets nothing more done for it: its reader stops, so the requests it
queued in the socket are never parsed, and its reads are cancelled (the VBD
drops what has not reached the disk yet and lets what has finish, the buffers coming
back once no driver holds them). Writes and other commands are never cancelled: a write
may still land, as it may when a client dies mid-write, and is then answered to nobody.
After end of stream from a client that can still read (a half-close, or DISC) the
requests in flight are finished and answered.

Requests that break the rules get the error the protocol asks for (EINVAL for an unknown
command, flag or a length over the maximum, EPERM for writes to a read-only export,
ENOSPC/EINVAL past the end); only what cannot be answered (bad magic, an absurd write
payload) drops the client, and only that client.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from blktap.errors import BlktapError
from blktap.io.buffers import Buffer, BufferPool, size_class
from blktap.io.polling import PollingSelector
from blktap.tapdisk.driver import SECTOR, InlineTarget
from blktap.tapdisk.vbd import VBD, Request, errno_of
from blktap.transport.nbd import inline
from blktap.transport.nbd import proto as p
from blktap.transport.nbd.handshake import Dropped, Session
from blktap.transport.sockio import Channel, Closed
from blktap.transport.tasks import Untasked, settle, start_owned

log = logging.getLogger("blktap.nbd")

# Requests one connection may have in flight, and payload bytes they may hold.
MAX_IN_FLIGHT = 128
MAX_IN_FLIGHT_BYTES = 128 << 20
# A write payload above this is not read to be refused: the client is dropped.
MAX_DISCARDED_PAYLOAD = 64 << 20
# Block status looks at most this far in one request (the reply may stop sooner).
MAX_STATUS_LENGTH = 1 << 31
MAX_STATUS_EXTENTS = 1 << 16
# Requests one connection's reader handles before it lets other tasks run.
FAIRNESS_BUDGET = 64
# The compiled pass (_pump_inline) is asked only one time in INLINE_RETRY after
# INLINE_MISSES passes in a row that served nothing: a failing pass costs about 2 us of
# Python per request on a disk it never serves (qcow2 over its backing file: 12.2 against
# 10.3 us of CPU per 4 KiB read at QD32).
INLINE_MISSES = 4
INLINE_RETRY = 16
# How often a reader waiting for room looks whether its client hung up (seconds).
HANGUP_CHECK = 0.25
# A client that has read none of its replies for this long, holding memory that others
# wait for, is dropped (seconds).
SEND_STALL_TIMEOUT = 10.0

_ALLOWED_FLAGS = {
    p.CMD_READ: p.CMD_FLAG_FUA | p.CMD_FLAG_DF,
    p.CMD_WRITE: p.CMD_FLAG_FUA,
    p.CMD_FLUSH: p.CMD_FLAG_FUA,
    p.CMD_TRIM: p.CMD_FLAG_FUA,
    p.CMD_CACHE: p.CMD_FLAG_FUA,
    p.CMD_WRITE_ZEROES: p.CMD_FLAG_FUA | p.CMD_FLAG_NO_HOLE | p.CMD_FLAG_FAST_ZERO,
    p.CMD_BLOCK_STATUS: p.CMD_FLAG_FUA | p.CMD_FLAG_REQ_ONE,
}
_WRITES = (p.CMD_WRITE, p.CMD_TRIM, p.CMD_WRITE_ZEROES)
# The commands the data hook may serve without waking the reader (Connection._pump).
_PUMPED = (p.CMD_READ, p.CMD_WRITE, p.CMD_BLOCK_STATUS)
# A read's (length, reads as zeros) runs, when some part of it is a hole (VBD.zero_runs_now).
Holes = list[tuple[int, bool]] | None


_scratch = threading.local()  # the compiled path's reply buffer, one per loop thread


def _scratch_buffer() -> bytearray:
    buf = getattr(_scratch, "buf", None)
    if buf is None:
        buf = _scratch.buf = bytearray(inline.SCRATCH_BYTES)
    return buf


def _run_pass(pump: inline.Pump, vbd: VBD, target: InlineTarget, sock: int, buf: bytearray,
              start: int, end: int, structured: bool, budget: int, status_id: int
              ) -> tuple[int, int, int, int, int, int, int, int, int] | None:
    """The compiled pass at ``target`` (``vbd``'s inline target, asked just before) over
    the requests of buf[start:end], its replies in this thread's scratch (sent on
    ``sock``, unless -1), what it served counted in the VBD's statistics: the pass's
    answer, or None when the target's guard is held elsewhere (nothing done)."""
    guard = target.guard  # keeps clusters from being freed under the pass
    if guard is not None and not guard.acquire(blocking=False):
        return None
    try:
        out = pump(sock, buf, start, end, _scratch_buffer(), target, structured, budget,
                   inline.MAX_LENGTH, status_id)
    finally:
        if guard is not None:
            guard.release()
    _, reads, read_bytes, writes, write_bytes, _, _, _, statuses = out
    if reads or writes:
        vbd.served_inline(reads, read_bytes, writes, write_bytes)
    if statuses:
        vbd.status_served_inline(statuses)
    return out


def serve_at_desk(pump: inline.Pump, vbd: VBD, fd: int, requests: bytearray, end: int,
                  structured: bool, status_id: int) -> tuple[int, bytes | None, bool]:
    """The transmission a server's front desk does itself (``_handshake.Desk.transmit``,
    called in the loop's wait for a client agreed there, with the interpreter lock): the
    compiled pass over its requests (requests[:end]), as :meth:`Connection._pump_inline`
    runs it for a connection with nothing queued. Returns what it consumed, the replies
    the socket did not take (None: all sent; the desk then hands the client over, to
    send them first) and whether the client is gone (a reply failed: the desk closes
    it). Consuming nothing hands the client over with its requests: the Python path
    serves everything else (other commands, a disk paused or behind a filter, errors;
    the pass itself leaves block status where no map tells it, a raw file's)."""
    target = vbd.inline_target()
    if target is None:
        return 0, None, False
    try:
        out = _run_pass(pump, vbd, target, fd, requests, 0, end, structured,
                        FAIRNESS_BUDGET, status_id)
    except Exception:  # (a bug: the Python path serves the client, and tells it again)
        log.exception("the compiled inline path failed at the front desk")
        return 0, None, False
    if out is None:
        return 0, None, False
    start, _, _, _, _, sent, used, error, _ = out
    if error:
        log.debug("a client at the front desk: reply failed: %s", os.strerror(error))
        return start, None, True
    unsent = bytes(memoryview(_scratch_buffer())[sent:used]) if sent < used else None
    return start, unsent, False


class RequestError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code


class Connection:
    """One client in transmission: it knows its channel, its session (the export's VBD)
    and the buffer pool that lends its payloads; nothing of the server above it."""

    def __init__(self, ch: Channel, session: Session, peer: str, *, pool: BufferPool,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.ch = ch
        self.session = session
        self.vbd = session.export.vbd
        self.pool = pool
        self.budget = pool.budget
        self.peer = peer
        self.tasks: set[asyncio.Task] = set()
        self.reads: set[asyncio.Task] = set()  # cancelled if the client goes away
        # Reads started the callback way (cancelled likewise), with their buffers; and
        # how many requests started that way are not answered yet.
        self.started_reads: dict[Request, tuple[Buffer, int]] = {}
        self.callbacks = Untasked(loop)
        # Requests admitted and not yet answered, and the payload bytes they hold.
        self.in_flight = 0
        self.bytes_in_flight = 0
        self.freed = asyncio.Event()
        self.broken = False  # nobody can be answered: the client is gone
        self.reader: asyncio.Task | None = None
        # Served from the readiness callback, no task yet (start); what takes it from
        # there (the owner's callbacks); and whether reading must stop (stop_reading).
        self._fed = False
        self._spawn: Callable[[Coroutine[Any, Any, None]], None] | None = None
        self._ended: Callable[[], None] | None = None
        self._no_reading = False
        self._hangup_check: asyncio.TimerHandle | None = None
        # Cached: asyncio.get_running_loop() costs a getpid() system call per call.
        self.loop = loop
        # The compiled inline path (inline.py), used from the data hook (plain sockets).
        self._inline = None if ch.tls else inline.compiled()
        self._inline_misses = 0  # passes in a row that served nothing (_pump_inline)
        # base:allocation's id when it is the session's only context: the compiled pass
        # answers block status requests then (0: it leaves them to _status_now).
        contexts = session.contexts
        self._status_id = next(iter(contexts)) if list(contexts.values()) == [
            p.META_BASE_ALLOCATION] else 0
        # The compiled pass to a disk that answers later (_pump_async), made at need, and
        # what waits for it to have nothing in flight.
        self._async: Any = None  # _inline.AsyncPass
        self._async_idle: asyncio.Event | None = None
        # The write whose payload the channel receives into the pass's slot now
        # (_receive_in_hook): (slot index, view, handle, flags, offset, length).
        self._payload: tuple[int, memoryview, int, int, int, int] | None = None
        # The selector whose wait serves the connection when the pass is linked to its
        # socket (_link; None: no compiled wait, or the link turned off), and a link
        # attempt asked for at the end of this turn.
        selector = getattr(loop, "_selector", None)  # asyncio.SelectorEventLoop's
        self._waiter: PollingSelector | None = (
            selector if isinstance(selector, PollingSelector) and selector.can_hook
            and not ch.tls and inline.links() else None)
        self._link_soon = False

    # ------------------------------------------------------------------ without a task
    def start(self, spawn: Callable[[Coroutine[Any, Any, None]], None],
              ended: Callable[[], None]) -> None:
        """Serve from the channel's readiness callback (a plain socket), with no task:
        see the module's docstring. At the first thing that must wait, ``spawn`` is given
        :meth:`serve`, for the owner to run as a task it awaits; a connection that ends
        without one calls ``ended()`` instead, once, when the channel is the owner's to
        close."""
        ch = self.ch
        if ch.tls:
            raise ValueError("a connection runs without a task on a plain socket only")
        self._spawn, self._ended = spawn, ended
        self._fed = True
        self.budget.holders.add(self)
        ch.on_data = self._pump
        ch.serve_from_hook(self._stuck)
        # What came with the end of the handshake: no readiness will say so.
        if ch.buffered and not ch.run_hook():
            self._stuck()

    def _stuck(self) -> None:
        """The hook left something (or the stream ended): a DISC with nothing in flight
        ends the connection here; anything else goes to a task."""
        if self._fed and not self._disconnected():
            self._to_task()

    def _idle(self) -> bool:
        """Nothing in flight and nothing waiting to be sent."""
        return (not self.in_flight and not self.tasks and not self.callbacks.count
                and (self._async is None or not self._async.issued)
                and self.ch.clear_to_send())

    def _disconnected(self) -> bool:
        """A DISC at the front of the buffer, with nothing in flight: the connection
        ends here (True)."""
        ch = self.ch
        if ch.end - ch.start < p.REQUEST.size or self.broken:
            return False
        magic, _, cmd, _, _, _ = p.REQUEST.unpack_from(ch.buf, ch.start)
        if magic != p.REQUEST_MAGIC or cmd != p.CMD_DISC or not self._idle():
            return False
        ch.consume(p.REQUEST.size)
        self._end_fed()
        return True

    def _end_fed(self) -> None:
        self._fed = False
        self._unlink(serve=False)
        self.ch.serve_from_hook(None)
        self.ch.on_data = None
        self._unhook()
        self._async = None
        self.budget.holders.discard(self)
        assert self._ended is not None
        self._ended()

    def _to_task(self) -> None:
        """Hand the connection to a task (:meth:`serve`), which goes on from the
        receive buffer."""
        if not self._fed:
            return
        self._fed = False
        self._unlink(serve=False)  # (what it received is the task's to read first)
        self.ch.serve_from_hook(None)
        self.budget.holders.discard(self)  # (serve counts it again)
        assert self._spawn is not None
        self._spawn(self.serve())

    # ------------------------------------------------------------------ reader
    async def serve(self) -> None:
        """Read requests until DISC, end of stream or shutdown; then wait for every
        request in flight."""
        self.reader = self.loop.create_task(self._read_loop())
        if self._no_reading:  # stopped, or the client gone, before the task began
            self.reader.cancel()
        elif not self.ch.tls and self.ch.on_data is None:  # (set already if it began so)
            self.ch.on_data = self._pump
        self.budget.holders.add(self)
        try:
            await self.reader
        except Closed:
            if self.ch.peer_gone():
                self._die()
        except Dropped as exc:
            log.warning("%s: dropping client: %s", self.peer, exc)
            self._die()
        except asyncio.CancelledError:
            if not self.reader.cancelled():
                raise  # we were cancelled ourselves, not just the reader
        finally:
            self._unlink(serve=False)
            self.ch.on_data = None
            self.ch.cancel_direct()
            try:
                await self._async_settled()  # (what failed there joins the tasks)
                self._unhook()
                self._async = None  # its buffers go now (it refers to us: a cycle)
                await settle(self.tasks, self.callbacks)
                # Replies posted by the reader have no task: they leave before the close.
                await self.ch.drain()
            finally:
                self.budget.holders.discard(self)

    def _die(self) -> None:
        """The client cannot be answered any more: stop reading its requests and cancel
        its reads (see the module's docstring)."""
        if self.broken:
            return
        self.broken = True
        self._unlink(serve=False)
        self.ch.on_data = None
        self.ch.cancel_direct()
        if self._fed:  # a task settles what is in flight, reading nothing more
            self._no_reading = True
            self._to_task()
        if self.reader is not None and not self.reader.done():
            self.reader.cancel()
        for task in self.reads:
            task.cancel()
        for req, (buf, length) in list(self.started_reads.items()):
            if self.vbd.cancel(req):  # never reached a driver: no completion will come
                del self.started_reads[req]
                self._release(buf, length)
                self.callbacks.end()

    def stop_reading(self) -> None:
        """Take no more requests (server shutdown); those in flight still complete."""
        self.ch.on_data = None
        self.ch.cancel_direct()  # (a payload still coming: that write was never taken)
        self._no_reading = True
        if self._fed:
            if self._idle():
                self._end_fed()
            else:
                self._to_task()
        if self.reader is not None:
            self.reader.cancel()

    async def _read_loop(self) -> None:
        ch = self.ch
        size = self.vbd.size
        budget = FAIRNESS_BUDGET
        while True:
            await ch.fill(p.REQUEST.size, between_messages=True)
            if self.broken:  # (fill need not wait, so the cancellation may not land)
                raise Closed("the client is gone")
            if self._inline is not None:
                served = self._pump_inline(budget)
                if self.broken:
                    raise Closed("the client is gone")
                if served:
                    budget -= served
                    if budget <= 0:
                        budget = FAIRNESS_BUDGET
                        await asyncio.sleep(0)
                    continue
            magic, flags, cmd, handle, offset, length = ch.unpack(p.REQUEST)
            if magic != p.REQUEST_MAGIC:
                raise Dropped(f"bad request magic {magic:#x}")
            if cmd == p.CMD_DISC:
                return
            error = self._validate(cmd, flags, offset, length, size)
            if cmd == p.CMD_WRITE:
                if error is not None:
                    if length > MAX_DISCARDED_PAYLOAD:
                        raise Dropped(f"write of {length} bytes")
                    await ch.skip(length)
                    await self._reply_error(handle, error[0], error[1])
                    continue
                await self._admit(length)
                if ch.buffered >= length:
                    self._serve_buffered_write(handle, flags, offset, length)
                elif await self._receive_for_pass(handle, flags, offset, length):
                    pass  # received into the compiled pass's slot and issued (or served)
                else:
                    buf = self.pool.get(length)
                    try:
                        await ch.read_into(buf.view)
                    except BaseException:
                        self._release(buf, length)
                        raise
                    self._serve_write(handle, flags, offset, buf, length)
            elif error is not None:
                await self._reply_error(handle, error[0], error[1])
            elif cmd == p.CMD_READ:
                await self._admit(length)
                self._serve_read(handle, flags, offset, length)
            elif cmd == p.CMD_BLOCK_STATUS and self._status_now(handle, flags, offset, length):
                pass  # answered at once; it held no room
            else:
                await self._admit(0)
                self._start(self._other(handle, cmd, flags, offset, length))
                continue
            # Served at once: the loop would never be given back while the client keeps
            # the socket full, so let the others run now and then.
            budget -= 1
            if not budget:
                budget = FAIRNESS_BUDGET
                await asyncio.sleep(0)

    def _validate(self, cmd: int, flags: int, offset: int, length: int,
                  size: int) -> tuple[int, str] | None:
        allowed = _ALLOWED_FLAGS.get(cmd)
        if allowed is None:
            return p.NBD_EINVAL, f"unknown command {cmd}"
        if cmd == p.CMD_READ and not self.session.structured:
            allowed &= ~p.CMD_FLAG_DF
        if flags & ~allowed:
            return p.NBD_EINVAL, f"flags {flags:#x} not valid for {p.CMD_NAMES[cmd]}"
        if cmd in _WRITES and self.vbd.read_only:
            return p.NBD_EPERM, "the export is read-only"
        if cmd == p.CMD_FLUSH:
            if offset or length:
                return p.NBD_EINVAL, "flush takes no offset or length"
            return None
        if offset + length > size:
            code = p.NBD_ENOSPC if cmd in (p.CMD_WRITE, p.CMD_WRITE_ZEROES) else p.NBD_EINVAL
            return code, f"{length} bytes at {offset} run past the end ({size} bytes)"
        if length > p.MAX_BLOCK and cmd in (p.CMD_READ, p.CMD_WRITE, p.CMD_CACHE):
            return p.NBD_EINVAL, f"{length} bytes is over the maximum of {p.MAX_BLOCK}"
        if cmd == p.CMD_BLOCK_STATUS and not self.session.contexts:
            return p.NBD_EINVAL, "no metadata context was negotiated"
        return None

    # ------------------------------------------------------------------ served from the hook
    def _pump(self) -> bool:
        """The channel's data hook: runs from the loop's readiness callback while the
        reader waits for a request header, with new bytes in the receive buffer. It takes
        the complete reads and writes that are valid and admissible, serving at once
        what the VBD's side door can do and starting a task for the rest, as the reader
        would, but without waking it: at QD1 that saves the reader's wake-up, a turn of
        the loop per request. Block status requests it takes only when the side doors
        answer them at once. Anything else (another command, an error to answer, a write
        payload not all here, flow control, the fairness budget) wakes the reader, which
        takes it from there (False)."""
        budget = FAIRNESS_BUDGET
        if self._inline is not None:
            budget -= self._pump_inline(budget)
            if self.broken:
                return False  # the reader finds it so and stops
            if self.ch.end - self.ch.start < p.REQUEST.size:
                return True  # all served (or a partial header): wait for more
        with self.vbd.batch:  # what this pass queues goes to the driver at its end
            return self._pump_requests(budget)

    def _pump_requests(self, budget: int) -> bool:
        ch = self.ch
        req = p.REQUEST
        buf_bytes = ch.buf
        size = self.vbd.size
        # After each request the compiled pass left to this one, the pass is tried again
        # on those behind it (a burst mixing what it serves and what it leaves), as the
        # reader does.
        retry = self._inline is not None
        tried = True  # (_pump has just run it)
        while budget > 0:
            if retry and not tried and ch.end - ch.start >= req.size:
                tried = True
                served = self._pump_inline(budget)
                if self.broken:
                    return False
                if served:
                    budget -= served
                    continue
            budget -= 1
            tried = False
            if ch.end - ch.start < req.size:
                return True  # a partial header (or nothing): wait for more
            magic, flags, cmd, handle, offset, length = req.unpack_from(buf_bytes, ch.start)
            payload = 0 if cmd == p.CMD_BLOCK_STATUS else length
            charge = self._charge(payload)
            if (magic != p.REQUEST_MAGIC or cmd not in _PUMPED or self.broken
                    or not self._can_admit(payload)
                    or not self.budget.fits(charge)
                    or self._validate(cmd, flags, offset, length, size) is not None):
                return False
            if cmd == p.CMD_BLOCK_STATUS:
                if not self._status_now(handle, flags, offset, length):
                    return False  # the reader starts a task for it
                ch.consume(req.size)
            elif cmd == p.CMD_WRITE:
                if ch.end - ch.start < req.size + length:
                    # The rest straight into the pass's slot, else into a buffer by the
                    # reader.
                    return self._receive_in_hook(handle, flags, offset, length, charge)
                ch.consume(req.size)
                self.budget.take(charge)
                self._take(length)
                self._serve_buffered_write(handle, flags, offset, length)
            else:
                ch.consume(req.size)
                self.budget.take(charge)
                self._take(length)
                self._serve_read(handle, flags, offset, length)
        return ch.end - ch.start < req.size

    def _pump_inline(self, budget: int) -> int:
        """The compiled pass over the requests at the front of the receive buffer (up to
        ``budget`` of them), when the disk has an inline target now: it serves those the
        disk can serve at once, as :meth:`_serve_read`/:meth:`_serve_buffered_write`
        would through the VBD's side door, and sends their replies itself when nothing
        is queued before them; how many it served. They hold no room in flight: each is
        done and answered before it returns, but for replies that wait in the queue (the
        socket full, or replies queued already, which they join rather than pass)."""
        ch = self.ch
        if ch.end - ch.start < p.REQUEST.size or self.broken:
            return 0
        # Only a read, a write or a block status (of base:allocation alone) at the front
        # is for the pass (a DISC, say, is not); the type is the big-endian u16 at byte 6.
        cmd = ch.buf[ch.start + 7]
        if ch.buf[ch.start + 6] or (cmd > p.CMD_WRITE and not (
                cmd == p.CMD_BLOCK_STATUS and self._status_id)):
            return 0
        # A disk whose requests the pass keeps leaving to the Python path (a chain's
        # parents are remote, a qcow2 over its backing file) is asked less often: after
        # INLINE_MISSES passes in a row served none, one in INLINE_RETRY.
        misses = self._inline_misses
        if misses >= INLINE_MISSES:
            self._inline_misses = misses + 1
            if misses % INLINE_RETRY:
                return 0
        target = self.vbd.inline_target()
        if cmd == p.CMD_BLOCK_STATUS and (target is None or (
                target.bat is None and target.l1 is None)):
            # A file at its own offsets (raw, a fixed VHD): its holes are the file
            # system's to tell (the driver's status_now), not a map's; a disk that
            # answers later (the async pass takes reads and writes only). Not a miss.
            return 0
        if target is None:  # perhaps a disk that answers later
            served = 0 if ch.closed else self._pump_async(budget)
            if served:
                self._inline_misses = 0
            elif misses < INLINE_MISSES:
                self._inline_misses = misses + 1
            return served
        if ch.closed:
            return 0
        # Past the queue only when it is empty (messages must not interleave); else the
        # replies stay in the scratch and join the queue, sent with it this turn, if the
        # socket takes sends and a scratch's worth of replies may be held (flow control:
        # a client that reads no replies is stopped by the Python path's admission).
        if ch.clear_to_send():
            sock = ch.fd
        elif (ch.stalled or not self._can_admit(inline.SCRATCH_BYTES)
              or not self.budget.fits(self._charge(inline.SCRATCH_BYTES))):
            return 0
        else:
            sock = -1
        assert self._inline is not None
        try:
            out = _run_pass(self._inline, self.vbd, target, sock, ch.buf, ch.start, ch.end,
                            self.session.structured, budget, self._status_id)
        except Exception:  # a target it cannot take (a bug): it raised before serving any
            log.exception("%s: the compiled inline path failed; serving without it",
                          self.peer)
            self._inline = None
            return 0
        if out is None:  # (the guard is held elsewhere)
            return 0
        start, reads, _, writes, _, sent, used, error, statuses = out
        ch.consume(start - ch.start)
        served = reads + writes + statuses
        if served:
            self._inline_misses = 0
        elif misses < INLINE_MISSES:
            self._inline_misses = misses + 1
        if error:
            log.debug("%s: reply failed: %s", self.peer, os.strerror(error))
            self._die()
        elif sent < used:  # queued: held and charged as a buffer of its size would be
            left = used - sent
            self.budget.take(self._charge(left))
            self._take(left)
            ch.post([bytes(memoryview(_scratch_buffer())[sent:used])], self._posted,
                    (None, left))
        return served

    def _pump_async(self, budget: int) -> int:
        """The compiled pass to a disk that answers later (VBD.inline_async: an ``rbd``
        disk): it issues the plain reads and writes at the front of the receive buffer
        (up to ``budget``) while it has room for them; how many it issued. Each is
        answered from :meth:`_async_done` when the disk is done with it."""
        ch = self.ch
        target = self.vbd.inline_async(inline.reap_async)
        if target is None:
            return 0
        apass = self._async
        if apass is None:
            apass = self._async = inline.async_pass(self._async_done)
            if apass is None:
                return 0
        start, reads, writes = apass.submit(ch.buf, ch.start, ch.end, target,
                                            self.session.structured, budget,
                                            inline.MAX_LENGTH)
        ch.consume(start - ch.start)
        issued = reads + writes
        self.vbd.issued_inline(issued)
        if issued:
            self._want_link()
        return issued

    def _async_done(self) -> None:
        """Requests issued by :meth:`_pump_async` are done: their replies go to the
        socket now when nothing is queued before them, else join the queue; those that
        failed there are served again by the Python path (which retries them through the
        VBD and answers what they end with)."""
        apass = self._async
        if apass is None:  # (the connection has ended meanwhile)
            return
        if apass.handed_back:  # the link met what it leaves to the Python path
            self._unlink()
        elif apass.linked:  # its answers sent by the link: their counts, for the VBD
            self.sync_inline()
        if apass.pending:
            self._flush_async(apass)
        if not apass.issued and self._async_idle is not None:
            self._async_idle.set()
        self._want_link()

    def _flush_async(self, apass: Any) -> None:
        ch = self.ch
        sock = ch.fd if not self.broken and ch.clear_to_send() else -1
        reads, read_bytes, writes, write_bytes, rest, error, failed, read_times, \
            write_times = apass.flush(sock)
        self.vbd.finished_inline(reads, read_bytes, writes, write_bytes,
                                 len(failed) if failed else 0, read_times, write_times)
        if error:
            log.debug("%s: reply failed: %s", self.peer, os.strerror(error))
            self._die()
        elif rest is not None and not self.broken:
            left = len(rest)
            self.budget.take(self._charge(left))
            self._take(left)
            ch.post([rest], self._posted, (None, left))
        if failed and not self.broken:
            for handle, cmd, flags, offset, length, payload, code in failed:
                log.debug("%s: %s of %d bytes at %d failed in the compiled pass (%s): "
                          "served again", self.peer, p.CMD_NAMES[cmd], length, offset,
                          os.strerror(code))
                self.budget.take(self._charge(length))
                self._take(length)
                if cmd == p.CMD_READ:
                    self._serve_read(handle, flags, offset, length)
                else:
                    buf = self.pool.get(length)
                    buf.view[:] = payload
                    self._write_later(handle, flags, offset, buf, length)

    # ------------------------------------------------------------------ the link
    def _want_link(self) -> None:
        """Link the pass at the end of this turn (:meth:`_link`) if it may be then."""
        if (self._waiter is not None and not self._link_soon
                and self._async is not None and not self._async.linked
                and not self.broken):
            self._link_soon = True
            self.loop.call_soon(self._link)

    def _link(self) -> None:
        """Serve the connection in the selector's wait (the pass linked to the socket:
        _inline_link.h) while it has nothing else under way: no task, no request of the
        Python path in flight, nothing received and not taken, nothing queued to send,
        no reader busy (none, or one waiting for the next request), and the disk taking
        requests at the pass's target. Its plain reads and writes then cost no turn of
        the loop; anything else hands it back (:meth:`_async_done`)."""
        self._link_soon = False
        apass, ch, waiter = self._async, self.ch, self._waiter
        if (apass is None or waiter is None or self.broken
                or not (self._fed or ch.reader_parked)
                or apass.linked or apass.handed_back or self.in_flight or self.tasks
                or self.callbacks.count or self._payload is not None
                or not ch.lendable()):
            return
        target = self.vbd.inline_async(inline.reap_async)
        if target is None:
            return
        if not waiter.has_hook(apass):
            waiter.add_hook(apass)
        ch.lend(lambda: self._unlink(serve=False))
        apass.link(ch.fd, waiter.epoll_fd, target, self.session.structured,
                   inline.MAX_LENGTH)
        self.vbd.add_inline_link(self)

    def _unlink(self, *, serve: bool = True) -> None:
        """Take the connection back from the wait (the link handed it back, or the disk
        pauses or closes, or the connection ends): what the link received and did not
        take is read first and the replies the socket did not take are sent first, the
        VBD is told what the link did, and (``serve``) what was received is served."""
        apass = self._async
        if apass is None or not (apass.linked or apass.handed_back):
            return
        received, unsent, error, reason = apass.unlink()
        if reason == inline.BACK_STREAM:  # (the channel's own receive meets its end)
            self._waiter = None
        self.vbd.remove_inline_link(self)
        self.sync_inline()
        ch = self.ch
        ch.reclaim(received)
        if error:
            log.debug("%s: reply failed: %s", self.peer, os.strerror(error))
            self._die()
            return
        if unsent is not None and not self.broken:
            left = len(unsent)
            self.budget.take(self._charge(left))
            self._take(left)
            ch.post([unsent], self._posted, (None, left))
        if serve:
            ch.serve_buffered()

    def sync_inline(self) -> None:
        """(VBD.InlineLink) Tell the VBD what the link issued and answered."""
        apass = self._async
        if apass is None:
            return
        issued, reads, read_bytes, writes, write_bytes, read_times, write_times = \
            apass.counts()
        if issued:
            self.vbd.issued_inline(issued)
        if reads or writes:
            self.vbd.finished_inline(reads, read_bytes, writes, write_bytes, 0, read_times,
                                     write_times)

    def release_inline(self) -> None:
        """(VBD.InlineLink) The disk pauses or closes: the connection is the Python
        path's again."""
        self._unlink()

    def _unhook(self) -> None:
        apass = self._async
        selector = getattr(self.loop, "_selector", None)
        if apass is not None and isinstance(selector, PollingSelector):
            selector.remove_hook(apass)

    def _slot_for_payload(self, flags: int, offset: int,
                          length: int) -> tuple[int, memoryview] | None:
        """A slot of the compiled pass to a disk that answers later, for a write whose
        payload is still to come, to receive it into: (index, view), or None where the
        pass does not take it (no pass yet, a flag, too large, not whole sectors, the
        disk not taking them now, no slot or room free)."""
        apass = self._async
        if (apass is None or flags or length > inline.MAX_LENGTH or (offset | length) % SECTOR
                or self.vbd.inline_async(inline.reap_async) is None):
            return None
        return apass.reserve(length)

    def _unreserve(self, index: int, view: memoryview, length: int) -> None:
        """The payload did not all come (the client gone, the connection dropped): the
        slot and the write's room go back."""
        view.release()
        self._async.unreserve(index)
        self._release(None, length)

    def _issue_received(self, index: int, view: memoryview, handle: int, flags: int,
                        offset: int, length: int) -> None:
        """An admitted write's payload is all in the pass's slot ``index``: issued from
        there (no buffer of the pool, no task, no copy), as :meth:`_pump_async` issues
        the writes it finds whole; else (the disk paused meanwhile, librbd refusing it)
        copied out for the Python path, which holds and retries it."""
        apass = self._async
        issued = False
        try:
            # (Asked again: the disk may have been paused while the payload came.)
            target = self.vbd.inline_async(inline.reap_async)
            if target is not None:
                issued = apass.issue_write(index, handle, offset, target)
            if issued:
                self.vbd.issued_inline(1)
                self._release(None, length)  # (admitted by the reader: the pass holds it)
                return
            buf = self.pool.get(length)
            buf.view[:] = view
        finally:
            view.release()
            if not issued:
                apass.unreserve(index)
        self._serve_write(handle, flags, offset, buf, length)

    async def _receive_for_pass(self, handle: int, flags: int, offset: int,
                                length: int) -> bool:
        """The reader's admitted write whose payload is still to come, to a disk that
        answers later: received straight into a slot of the compiled pass and issued
        from there. False (nothing received) where the pass does not take it: the
        caller receives it as usual."""
        reserved = self._slot_for_payload(flags, offset, length)
        if reserved is None:
            return False
        index, view = reserved
        try:
            await self.ch.read_into(view)
        except BaseException:
            self._unreserve(index, view, length)
            raise
        self._issue_received(index, view, handle, flags, offset, length)
        return True

    def _receive_in_hook(self, handle: int, flags: int, offset: int, length: int,
                         charge: int) -> bool:
        """The data hook's write (valid, admissible) whose payload is not all here, to
        a disk that answers later: the request and what came of its payload are taken,
        and the rest is received straight into the pass's slot by the channel's
        readiness callback (:meth:`Channel.receive_direct`), with no reader woken, then
        issued from there (:meth:`_payload_received`). False (nothing taken) where the
        pass does not take it: the reader receives it."""
        reserved = self._slot_for_payload(flags, offset, length)
        if reserved is None:
            return False
        index, view = reserved
        ch = self.ch
        ch.consume(p.REQUEST.size)
        self.budget.take(charge)
        self._take(length)
        have = ch.end - ch.start
        view[:have] = ch.view[ch.start : ch.end]
        ch.consume(have)
        self._payload = (index, view, handle, flags, offset, length)
        ch.receive_direct(view[have:], self._payload_received)
        return True

    def _payload_received(self, exc: BaseException | None) -> None:
        """The rest of :meth:`_receive_in_hook`'s payload is in its slot (from the
        readiness callback), or will not come (``exc``)."""
        assert self._payload is not None
        index, view, handle, flags, offset, length = self._payload
        self._payload = None
        if exc is not None:
            self._unreserve(index, view, length)
            return
        try:
            self._issue_received(index, view, handle, flags, offset, length)
        except Exception:  # a bug: this client is lost, not the loop's callback
            log.exception("%s: issuing a write received in the data hook failed", self.peer)
            self._die()

    async def _async_settled(self) -> None:
        """Wait until the disk is done with every request :meth:`_pump_async` issued."""
        while self._async is not None and self._async.issued:
            self._async_idle = asyncio.Event()
            await self._async_idle.wait()

    # ------------------------------------------------------------------ reads and writes
    def _serve_read(self, handle: int, flags: int, offset: int, length: int) -> None:
        """An admitted read: served at once if the VBD's side door can, else by a task."""
        if self.broken:
            self._release(None, length)
            return
        holes = None
        if length and self.session.structured:
            holes = self.vbd.zero_runs_now(offset, length)
            if holes is not None:
                if len(holes) == 1:  # zeros from end to end: one hole chunk, no read
                    self._post([p.CHUNK_OFFSET_HOLE.pack(
                        p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                        p.REPLY_TYPE_OFFSET_HOLE, handle, 12, offset, length)], None, length)
                    return
                if flags & p.CMD_FLAG_DF:  # one content chunk: zeros and data as data
                    holes = None
        buf = self.pool.get(length)
        if length and self.vbd.read_now(offset, buf.view):
            self._post(self._data_reply(handle, offset, buf, holes), buf, length)
        else:
            self._start_read(handle, flags, offset, buf, length, holes)

    def _serve_buffered_write(self, handle: int, flags: int, offset: int,
                              length: int) -> None:
        """An admitted write whose payload is all in the receive buffer: written from
        there when the side door takes it (no buffer of its own, no copy), else copied
        into one for the driver."""
        ch = self.ch
        payload = ch.view[ch.start : ch.start + length]
        if self.vbd.write_now(offset, payload, fua=bool(flags & p.CMD_FLAG_FUA)):
            ch.consume(length)
            self._post(self._ok_reply(handle), None, length)
            return
        buf = self.pool.get(length)
        buf.view[:] = payload
        ch.consume(length)
        self._write_later(handle, flags, offset, buf, length)

    def _serve_write(self, handle: int, flags: int, offset: int, buf: Buffer,
                     length: int) -> None:
        """An admitted write whose payload is in ``buf``: likewise."""
        if self.vbd.write_now(offset, buf.view, fua=bool(flags & p.CMD_FLAG_FUA)):
            self._written(handle, buf, length)
            return
        self._write_later(handle, flags, offset, buf, length)

    def _write_later(self, handle: int, flags: int, offset: int, buf: Buffer,
                     length: int) -> None:
        """A write the side door refused: to the VBD the callback way if it is of whole
        sectors, else by a task."""
        if length and not (offset | length) % SECTOR:
            try:
                self.vbd.start_write(offset, [buf.view], length,
                                     lambda error: self._write_done(handle, buf, length, error),
                                     fua=bool(flags & p.CMD_FLAG_FUA))
            except BlktapError:
                pass  # the task's way answers it
            else:
                self.callbacks.begin()
                return
        self._start(self._write(handle, flags, offset, buf, length))

    def _write_done(self, handle: int, buf: Buffer, length: int,
                    error: BaseException | None) -> None:
        try:
            if error is None:
                self._written(handle, buf, length)
            else:
                self._start(self._failed(handle, p.CMD_WRITE, error, buf, length))
        finally:
            self.callbacks.end()

    def _written(self, handle: int, buf: Buffer, length: int) -> None:
        """The payload is in the file: its buffer goes back now, its place in flight
        when the reply is with the kernel."""
        self.pool.put(buf)
        self._post(self._ok_reply(handle), None, length)

    # ------------------------------------------------------------------ flow control
    @staticmethod
    def _charge(length: int) -> int:
        """What a request of ``length`` payload bytes costs the memory budget: its
        buffer (commands without a payload hold none)."""
        return size_class(length) if length else 0

    def _can_admit(self, length: int) -> bool:
        """Room on this connection (the budget is asked separately)."""
        return self.in_flight < MAX_IN_FLIGHT and (
            not self.bytes_in_flight or self.bytes_in_flight + length <= MAX_IN_FLIGHT_BYTES)

    def _take(self, length: int) -> None:
        """Count a request in (its charge to the budget is the caller's)."""
        self.in_flight += 1
        self.bytes_in_flight += length

    async def _admit(self, length: int) -> None:
        """Wait for room for one more request holding ``length`` payload bytes: on this
        connection, then in the server-wide budget (in line with the other
        connections). The socket is not read meanwhile: the client waits."""
        charge = self._charge(length)
        if self._can_admit(length) and self.budget.fits(charge):
            self.budget.take(charge)
            self._take(length)
            return
        # While it waits, nothing else would notice a client that hung up (its requests
        # still fill the socket): look now and then, and stop reading for the dead.
        self._hangup_check = self.loop.call_later(HANGUP_CHECK, self._check_hangup)
        try:
            while not self._can_admit(length):
                self.freed.clear()
                await self.freed.wait()
            await self.budget.acquire(charge)
        finally:
            self._hangup_check.cancel()
        if self.ch.peer_gone():  # hung up while it waited: the room goes to the others
            self.budget.release(charge)
            self._die()
            raise Closed("the client is gone")
        self._take(length)

    def _check_hangup(self) -> None:
        """Now and then while this reader waits for room: is its client gone, and does
        a client that stopped reading its replies hold the memory it waits for?"""
        if self.ch.peer_gone():
            self._die()
            return
        if self.budget.waiting:
            now = self.loop.time()
            for other in list(self.budget.holders):
                if other is self or not isinstance(other, Connection):
                    continue
                since = other.ch.stalled_since
                if (other.bytes_in_flight
                        and since is not None and now - since >= SEND_STALL_TIMEOUT):
                    other.evict(now - since)
        self._hangup_check = self.loop.call_later(HANGUP_CHECK, self._check_hangup)

    def evict(self, stalled: float) -> None:
        """Drop a client that reads no replies while others wait for the memory they
        hold: its posted replies fail and give their buffers back."""
        if self.ch.closed:
            return
        log.warning("%s: no reply read for %.0f s while others wait for memory; dropping",
                    self.peer, stalled)
        self._die()
        self.ch.close()

    def _release(self, buf: Buffer | None, length: int) -> None:
        if buf is not None:
            self.pool.put(buf)
        self.in_flight -= 1
        self.bytes_in_flight -= length
        if length:
            self.budget.release(size_class(length))
        self.freed.set()

    def _start(self, coro: Coroutine[Any, Any, None]) -> None:
        # Nothing cancels these: writes and other commands run to the end.
        start_owned(self.loop, self.tasks, coro)

    def _start_read(self, handle: int, flags: int, offset: int, buf: Buffer,
                    length: int, holes: Holes = None) -> None:
        """A read the side door could not serve: the callback way if it is of whole
        sectors, else a task, cancelled if the client goes away (cancelled before its
        first step, its coroutine never runs: the buffer is released here then)."""
        if length and not (offset | length) % SECTOR:
            try:
                req = self.vbd.start_read(
                    offset, [buf.view], length,
                    lambda error: self._read_done(req, handle, offset, buf, length, holes,
                                                  error))
            except BlktapError:
                pass  # the task's way answers it
            else:
                self.started_reads[req] = (buf, length)
                self.callbacks.begin()
                return
        started: list[bool] = []
        task = self.loop.create_task(self._read(handle, flags, offset, buf, length, started,
                                                holes))
        self.tasks.add(task)
        self.reads.add(task)

        def done(task: asyncio.Task) -> None:
            self.tasks.discard(task)
            self.reads.discard(task)
            if not started:
                self._release(buf, length)
        task.add_done_callback(done)

    def _read_done(self, req: Request, handle: int, offset: int, buf: Buffer, length: int,
                   holes: Holes, error: BaseException | None) -> None:
        self.started_reads.pop(req, None)
        try:
            if error is None:
                self._post(self._data_reply(handle, offset, buf, holes), buf, length)
            elif isinstance(error, asyncio.CancelledError):  # the client is gone
                self._release(buf, length)
            else:
                self._start(self._failed(handle, p.CMD_READ, error, buf, length))
        finally:
            self.callbacks.end()

    async def _failed(self, handle: int, cmd: int, error: BaseException, buf: Buffer,
                      length: int) -> None:
        """Answer a request started the callback way that failed."""
        try:
            await self._fail(handle, cmd, error)
        finally:
            self._release(buf, length)

    # ------------------------------------------------------------------ replies
    async def _send(self, bufs: list) -> None:
        if self.broken:
            return
        try:
            await self.ch.send(bufs)
        except Closed:
            self._die()

    def _ok_reply(self, handle: int) -> list:
        return [p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, handle)]

    def _data_reply(self, handle: int, offset: int, buf: Buffer, holes: Holes = None
                    ) -> list:
        """The successful reply to a read (of at least one byte) of ``buf``; with
        ``holes`` (VBD.zero_runs_now: (length, reads as zeros) runs), a chunk per run,
        the zero runs as hole chunks whose bytes are not sent."""
        if not self.session.structured:
            return [p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, handle), buf.view]
        if holes is None:
            return [p.CHUNK_OFFSET_DATA.pack(p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                                             p.REPLY_TYPE_OFFSET_DATA, handle,
                                             len(buf.view) + 8, offset), buf.view]
        out: list = []
        pos = 0
        last = len(holes) - 1
        for i, (n, zero) in enumerate(holes):
            done = p.REPLY_FLAG_DONE if i == last else 0
            if zero:
                out.append(p.CHUNK_OFFSET_HOLE.pack(p.STRUCTURED_REPLY_MAGIC, done,
                                                    p.REPLY_TYPE_OFFSET_HOLE, handle, 12,
                                                    offset + pos, n))
            else:
                out.append(p.CHUNK_OFFSET_DATA.pack(p.STRUCTURED_REPLY_MAGIC, done,
                                                    p.REPLY_TYPE_OFFSET_DATA, handle, n + 8,
                                                    offset + pos))
                out.append(buf.view[pos : pos + n])
            pos += n
        return out

    def _post(self, bufs: list, buf: Buffer | None, length: int) -> None:
        """Queue the reply of a request served at once; its buffer and its place in
        flight are released when the reply is with the kernel."""
        if self.broken:
            self._release(buf, length)
            return
        if self.ch.tls:  # TLS sends go buffer by buffer through the send lock, awaited
            self._start(self._send_posted(bufs, buf, length))
            return
        # The last request in flight, and no other request waiting in the receive buffer:
        # nothing to batch its reply with, so it leaves now rather than at the end of the
        # turn (the data hook still sends its batch once). With a request buffered the
        # reader goes on to it in this turn, and the replies leave together.
        self.ch.post(bufs, self._posted, (buf, length),
                     now=self.in_flight <= 1 and self.ch.buffered < p.REQUEST.size)

    async def _send_posted(self, bufs: list, buf: Buffer | None, length: int) -> None:
        try:
            await self._send(bufs)
        finally:
            self._release(buf, length)

    def _posted(self, exc: BaseException | None, held: tuple[Buffer | None, int]) -> None:
        if exc is not None:
            self._die()
        self._release(*held)

    async def _reply_ok(self, handle: int) -> None:
        await self._send(self._ok_reply(handle))

    async def _reply_error(self, handle: int, code: int, message: str) -> None:
        if self.session.structured:
            msg = message.encode()[:4096]
            payload = p.ERROR_PAYLOAD.pack(code, len(msg)) + msg
            await self._send([p.CHUNK.pack(p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                                           p.REPLY_TYPE_ERROR, handle, len(payload)),
                              payload])
        else:
            await self._send([p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, code, handle)])

    async def _fail(self, handle: int, cmd: int, exc: BaseException) -> None:
        code = errno_of(exc)
        if not isinstance(exc, (OSError, BlktapError, RequestError)):
            log.error("%s: %s failed: %r", self.peer, p.CMD_NAMES.get(cmd, cmd), exc)
        await self._reply_error(handle, p.nbd_error(code), str(exc))

    # ------------------------------------------------------------------ commands
    async def _read(self, handle: int, flags: int, offset: int, buf: Buffer,
                    length: int, started: list[bool], holes: Holes = None) -> None:
        """A read the side door could not serve. The reply is posted, not awaited: the
        buffer and the request's place in flight go back when it is with the kernel,
        and the task ends a turn of the loop sooner."""
        started.append(True)
        try:
            await self.vbd.read(offset, buf.view)
        except Exception as exc:
            try:
                await self._fail(handle, p.CMD_READ, exc)
            finally:
                self._release(buf, length)
            return
        except BaseException:
            self._release(buf, length)
            raise
        if length or not self.session.structured:
            self._post(self._data_reply(handle, offset, buf, holes), buf, length)
        else:
            self._post([p.CHUNK.pack(p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                                     p.REPLY_TYPE_NONE, handle, 0)], buf, length)

    async def _write(self, handle: int, flags: int, offset: int, buf: Buffer,
                     length: int) -> None:
        try:
            await self.vbd.write(offset, buf.view, fua=bool(flags & p.CMD_FLAG_FUA))
        except Exception as exc:
            try:
                await self._fail(handle, p.CMD_WRITE, exc)
            finally:
                self._release(buf, length)
            return
        except BaseException:
            self._release(buf, length)
            raise
        self._written(handle, buf, length)

    async def _other(self, handle: int, cmd: int, flags: int, offset: int,
                     length: int) -> None:
        vbd = self.vbd
        fua = bool(flags & p.CMD_FLAG_FUA)
        try:
            if cmd == p.CMD_FLUSH:
                await vbd.flush()
            elif cmd == p.CMD_TRIM:
                await vbd.discard(offset, length, fua=fua)
            elif cmd == p.CMD_WRITE_ZEROES:
                await vbd.write_zeroes(offset, length,
                                       may_trim=not flags & p.CMD_FLAG_NO_HOLE,
                                       fast=bool(flags & p.CMD_FLAG_FAST_ZERO), fua=fua)
            elif cmd == p.CMD_CACHE:
                await vbd.cache(offset, length)
            elif cmd == p.CMD_BLOCK_STATUS:
                await self._block_status(handle, flags, offset, length)
                return
            await self._reply_ok(handle)
        except Exception as exc:
            await self._fail(handle, cmd, exc)
        finally:
            self._release(None, 0)

    async def _block_status(self, handle: int, flags: int, offset: int, length: int) -> None:
        if not length:
            raise RequestError(p.NBD_EINVAL, "block status of 0 bytes")
        length = min(length, MAX_STATUS_LENGTH)
        # Every context's answer first: an error fails the request before any chunk.
        answers = []
        for ctx_id, ctx in self.session.contexts.items():
            if ctx == p.META_BASE_ALLOCATION:
                extents = await self.vbd.block_status(offset, length)
            else:
                extents = await self.vbd.dirty_status(ctx[len(p.META_DIRTY_BITMAP):],
                                                      offset, length)
            answers.append((ctx_id, extents))
        await self._send(self._status_reply(handle, flags, answers))

    def _status_now(self, handle: int, flags: int, offset: int, length: int) -> bool:
        """Answer a valid block status request at once if the VBD's side doors can tell
        every negotiated context without waiting (cached metadata, the bitmap in memory);
        False leaves it to a task (:meth:`_block_status`), which also answers what is
        wrong with it. Served here, it holds no room in flight and no buffer."""
        if not length or self.broken or not self._can_admit(0):
            return False
        length = min(length, MAX_STATUS_LENGTH)
        answers = []
        base_id = None
        for ctx_id, ctx in self.session.contexts.items():
            if ctx == p.META_BASE_ALLOCATION:
                base_id = ctx_id
                continue
            extents = self.vbd.dirty_status_now(ctx[len(p.META_DIRTY_BITMAP):], offset,
                                                length)
            if not extents:
                return False
            answers.append((ctx_id, extents))
        # Asked last: once it answers, the VBD counts a request served (the chunks may
        # come in any order).
        if base_id is not None:
            extents = self.vbd.block_status_now(offset, length)
            if not extents:
                return False
            answers.append((base_id, extents))
        self._take(0)
        self._post(self._status_reply(handle, flags, answers), None, 0)
        return True

    @staticmethod
    def _status_reply(handle: int, flags: int, answers: list[tuple[int, list]]) -> list:
        """The chunks of a block status reply: one per context, the last flagged done."""
        out: list = []
        last = len(answers) - 1
        for i, (ctx_id, extents) in enumerate(answers):
            extents = extents[:1] if flags & p.CMD_FLAG_REQ_ONE else \
                extents[:MAX_STATUS_EXTENTS]
            payload = struct.pack(f">I{2 * len(extents)}I", ctx_id,
                                  *(v for ext in extents for v in ext))
            out.append(p.CHUNK.pack(p.STRUCTURED_REPLY_MAGIC,
                                    p.REPLY_FLAG_DONE if i == last else 0,
                                    p.REPLY_TYPE_BLOCK_STATUS, handle, len(payload)))
            out.append(payload)
        return out
