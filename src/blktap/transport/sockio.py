"""A stream socket driven from the event loop without asyncio's stream copies.

Receives go into one preallocated buffer (``recv_into``), from which small messages are
parsed in place; a large payload is copied out of it only for the part already received
and the rest lands straight in the caller's buffer. Sends are scatter-gather
(``sendmsg`` of headers and data views, no joining), and the messages of one turn of the
event loop leave in one system call. TLS sockets (which have no ``sendmsg``) send buffer
by buffer.

Waiting costs little: the descriptor stays registered with the loop's selector between
reads (registering and unregistering on every wait costs two ``epoll_ctl`` calls and the
selector's bookkeeping, a third of a small request's CPU); since epoll is level-triggered
here, a readiness nobody waits for unregisters it. Replies queued by a reader that is
about to wait for more requests leave before it waits, not a turn of the loop later.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import socket
import ssl
import stat
import struct
from collections.abc import Callable, Sequence
from typing import Any

from blktap.errors import BlktapError
from blktap.io.iov import IOV_MAX, advance
from blktap.io.polling import Direct, PollingSelector

log = logging.getLogger("blktap.transport")

RECV_BUFFER = 256 << 10
# What a channel's receive buffer starts with: it grows to its full size (RECV_BUFFER by
# default) the first time the bytes waiting fill it. Most connections never need more
# (a handshake's options, a reader's 28-byte requests), and a buffer of 256 KiB is a
# quarter of a megabyte of zeroes to write per connection: about 20 us of a short
# libnbd connection's 400 (a metadata query, a block status, a disconnect), and memory
# an idle connection holds for nothing.
FIRST_RECV_BUFFER = 16 << 10
# After a message whose payload went straight into its place (receive_direct) the next
# is likely another such: the data hook's first receive then takes this much, not all
# the buffer holds (Channel._receive_for_hook).
HOOK_CHUNK = 16 << 10
# Queued sends of at least this many bytes leave at once rather than at the end of the
# turn: batching saves system calls on small replies, but would hold big ones back.
FLUSH_BYTES = 256 << 10

_WANT_READ = (BlockingIOError, InterruptedError, ssl.SSLWantReadError)


class Closed(Exception):
    """The peer closed the connection (or it broke) before a message was complete."""


def _settle(exc: BaseException | None, fut: asyncio.Future) -> None:
    if fut.done():  # its sender was cancelled
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


class Channel:
    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop | None = None,
                 recv_buffer: int = RECV_BUFFER) -> None:
        sock.setblocking(False)
        self.sock: socket.socket = sock
        self.loop = loop or asyncio.get_running_loop()
        self.fd = sock.fileno()
        self.buf_limit = recv_buffer  # what the buffer may grow to (_grow)
        self.buf = bytearray(min(recv_buffer, FIRST_RECV_BUFFER))
        self.view = memoryview(self.buf)
        self.start = 0  # unread bytes are buf[start:end]
        self.end = 0
        self.tls = False
        self.closed = False
        self._send_lock = asyncio.Lock()  # TLS sends
        # Plain sends queued for the end of this turn of the loop, and their senders.
        self._out: list = []
        self._out_waiters: list[tuple] = []  # (done, arg) per queued message
        self._out_bytes = 0
        self._flush_pending = False
        self._writer: asyncio.Task | None = None  # finishing a send the socket refused
        # Since when the socket has been full and the peer took nothing (None: it is not).
        self.stalled_since: float | None = None
        self._waiters: set[asyncio.Future] = set()
        # Waiting for readability: the futures, and whether the loop watches the fd.
        self._read_waiters: list[asyncio.Future] = []
        self._watching = False
        self._peek = bytearray(1)
        # Called from the loop's readiness callback, with new bytes in the buffer, while
        # the reader waits in fill(between_messages=True): it may take complete messages
        # from the buffer (consume) and post replies; it answers True if the reader need
        # not wake (what is left is a partial message), False to wake it. Plain sockets
        # only.
        self.on_data: Callable[[], bool] | None = None
        # Called from the readiness callback with no reader waiting (feed()).
        self._feeder: Callable[[BaseException | None], None] | None = None
        # With no reader at all, on_data runs at each readiness, and this is called when
        # it leaves something or the stream ends (serve_from_hook()).
        self._stuck: Callable[[], None] | None = None
        self._filling = False
        self._hold_flush = False  # the hook runs: its replies leave when it returns
        # The rest of a message received straight into its place by the readiness
        # callback (receive_direct): the view, how much of it is filled, and whom to tell.
        self._direct: memoryview | None = None
        self._direct_pos = 0
        # The last message's payload (more than a chunk of it) was received straight
        # into its place: the hook's next receives are chunks.
        self._after_direct = False
        self._direct_done: Callable[[BaseException | None], None] | None = None
        # The loop's selector when its wait can do those receives itself (a polling
        # one, with the C extension), and what it was given for this one.
        selector = getattr(self.loop, "_selector", None)  # asyncio.SelectorEventLoop's
        self._receiver = selector if isinstance(selector, PollingSelector) else None
        self._direct_c: Direct | None = None
        # Lent to a compiled server of the socket (lend): what close() calls first.
        self._lent: Callable[[], None] | None = None

    # ------------------------------------------------------------------ waiting
    async def _wait(self, writable: bool) -> None:
        if self.closed:
            raise Closed("connection closed")
        if not writable:
            await self._wait_readable()
            return
        fut = self.loop.create_future()
        self._waiters.add(fut)

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        self.loop.add_writer(self.fd, ready)
        try:
            await fut
        finally:
            self._waiters.discard(fut)
            if not self.closed:
                self.loop.remove_writer(self.fd)

    async def _wait_readable(self) -> None:
        if self._out_waiters and self._writer is None and not self.tls:
            self._flush()  # what this reader's requests produced leaves before it waits
        fut = self.loop.create_future()
        self._read_waiters.append(fut)
        self._watch()
        await fut

    def _watch(self) -> None:
        if not self._watching:
            self._watching = True
            self.loop.add_reader(self.fd, self._readable)

    def feed(self, feeder: Callable[[BaseException | None], None] | None) -> None:
        """Drive a conversation from the loop's readiness callback, with no reader task
        (a handshake): each readiness receives what the socket holds into the buffer and
        calls ``feeder(None)``, which takes the complete messages (:meth:`consume`) and
        posts its answers, which leave when it returns; end of stream or a broken
        connection is ``feeder(Closed)``, and so is :meth:`close`. None stops feeding
        (the socket stays watched, for the reader that comes next). Plain sockets."""
        self._feeder = feeder
        if feeder is not None:
            self._watch()

    def preload(self, data: bytes) -> None:
        """Put ``data``, received from the socket by somebody else (the NBD server's
        desk), in the buffer as the first unread bytes, before any reading."""
        if self.end != self.start:
            raise RuntimeError("preload() comes before any reading")
        if len(data) > len(self.buf):
            self.buf = bytearray(len(data))
            self.view = memoryview(self.buf)
        self.buf[: len(data)] = data
        self.start, self.end = 0, len(data)

    def lendable(self) -> bool:
        """Whether the socket may be lent (:meth:`lend`) now: a plain socket with nothing
        received and not taken, nothing queued or being sent, no reader or feeder
        waiting and no receive into place under way."""
        return not (self.tls or self.closed or self._lent is not None
                    or self.start != self.end or self._direct is not None
                    or (self._read_waiters and not self.reader_parked)
                    or self._feeder is not None
                    or self._writer is not None or self._out_waiters)

    @property
    def reader_parked(self) -> bool:
        """Whether a reader waits for the next message with the data hook on (fill
        between messages)."""
        return bool(self._read_waiters) and self._filling and self.on_data is not None

    def lend(self, take_back: Callable[[], None]) -> None:
        """Lend the socket to a compiled server of it (an NBD connection served in the
        selector's wait: transport/nbd/_inline_link.h), which receives from it and
        sends on it itself until :meth:`reclaim`. The socket stays registered for
        reading (the wait answers its readiness before the loop sees it); the readiness
        callback does nothing meanwhile. Only while :meth:`lendable`. ``close()`` calls
        ``take_back()`` first, for the borrower to let go."""
        if not self.lendable():
            raise RuntimeError("the channel is in use: it cannot be lent now")
        self._lent = take_back
        self._watch()

    def reclaim(self, received: bytes) -> None:
        """The socket is the channel's again; ``received``, what the borrower received
        from it and did not take, comes first."""
        self._lent = None
        if received:
            self.preload(received)

    @property
    def lent(self) -> bool:
        return self._lent is not None

    def serve_buffered(self) -> None:
        """Serve what the buffer holds (given back by :meth:`reclaim`) as if it had just
        been received: the data hook takes what it can, and the reader is woken (or, with
        no reader, ``stuck()`` called) for what it leaves."""
        if self.start == self.end or self.closed:
            return
        waiters = self._read_waiters
        if not waiters:
            if self._stuck is not None and not self.run_hook():
                self._stuck()
            return
        if self.on_data is not None and self._filling and self.run_hook():
            return
        self._read_waiters = []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def serve_from_hook(self, stuck: Callable[[], None] | None) -> None:
        """Run :attr:`on_data` at each readiness while no reader exists (a connection
        that has no task yet): it takes what it can, and ``stuck()`` is called when it
        answers False (it left something for a reader) or the stream ended or broke,
        for the caller to start one. None stops it (the socket stays watched, for that
        reader). Plain sockets."""
        self._stuck = stuck
        if stuck is not None:
            self._watch()

    def receive_direct(self, view: memoryview,
                       done: Callable[[BaseException | None], None]) -> None:
        """From :attr:`on_data`, which took the start of a message and all the buffer
        held: the next ``len(view)`` bytes of the stream go straight into ``view`` (a
        write's payload into its place), received by the readiness callback itself, with
        no reader woken and no copy. ``done(None)`` when ``view`` is full, from the
        readiness callback, which then goes on as usual with what follows; ``done(Closed)``
        if the stream ends or breaks first, or the channel closes, or
        :meth:`cancel_direct` is called. Plain sockets.

        On a loop whose selector polls (io/polling.py, with its C extension), the
        selector's wait receives the chunks itself, its lock released, and the readiness
        callback runs once the view is full (PollingSelector.receive_into): one turn of
        the loop for the payload, not one per chunk the sender's socket buffer cut."""
        if self._direct is not None or self.start != self.end or self.tls:
            raise RuntimeError("receive_direct: a receive under way, bytes buffered, or TLS")
        self._direct, self._direct_pos, self._direct_done = view, 0, done
        self._after_direct = len(view) > HOOK_CHUNK
        self._watch()
        if self._receiver is not None:
            self._direct_c = self._receiver.receive_into(self.fd, view)

    def cancel_direct(self) -> None:
        """Stop a :meth:`receive_direct` under way (its ``done`` gets Closed)."""
        if self._direct is not None:
            self._end_direct(Closed("the receive was cancelled"))

    def _end_direct(self, exc: BaseException | None) -> None:
        done = self._direct_done
        self._direct = self._direct_done = None
        if self._direct_c is not None:
            self._direct_c = None
            assert self._receiver is not None
            self._receiver.end_receive(self.fd)  # (before done: it releases the view)
        assert done is not None
        done(exc)

    def _receive_direct(self, view: memoryview) -> bool:
        """The readiness callback's receive for :meth:`receive_direct`: True when it is
        over (``view`` full, or the stream ended or broke: the usual receive then sees
        that too), False while more is to come. With the selector receiving (its
        Direct), it starts where that got to, usually the end."""
        direct = self._direct_c
        if direct is None:
            pos = self._direct_pos
        else:
            pos = direct.pos
            if direct.error:  # (a receive of the selector's failed: the socket told it)
                self._end_direct(Closed(os.strerror(direct.error)))
                return True
        if pos < len(view):
            try:
                got = self.sock.recv_into(view[pos:])
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                self._end_direct(Closed(str(exc)))
                return True
            if not got:
                self._end_direct(Closed("end of stream"))
                return True
            pos += got
            if pos < len(view):
                if direct is None:
                    self._direct_pos = pos
                else:
                    direct.pos = pos
                return False
        self._end_direct(None)
        return True

    def _receive_for_feeder(self, feeder: Callable[[BaseException | None], None]) -> None:
        # Room for one message: feeders take every complete one, and messages fed this
        # way (a handshake's) are far smaller than half the full buffer (one longer than
        # the first buffer fills it, and it grows).
        self._compact(len(self.buf) // 2)
        try:
            if not self._recv_available():
                return  # a stale readiness
            exc = None
        except Closed as err:
            exc = err
        self._hold_flush = True
        try:
            feeder(exc)
        finally:
            self._release_held()

    def _recv_available(self, limit: int = 0) -> int:
        """From the readiness callback: receive what the socket holds into the buffer's
        free end (there is room), or at most ``limit`` bytes of it; the bytes received
        (0: nothing was there, a stale readiness). Closed at end of stream or when the
        connection broke."""
        stop = self.end + limit if limit else len(self.buf)
        try:
            got = self.sock.recv_into(self.view[self.end : stop])
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            raise Closed(str(exc)) from None
        if not got:
            raise Closed("end of stream")
        self.end += got
        if not limit and self.end == len(self.buf) and len(self.buf) < self.buf_limit:
            # More than the first buffer holds may be waiting: the full one, and the rest.
            self._grow()
            try:
                more = self.sock.recv_into(self.view[self.end :])
            except (BlockingIOError, InterruptedError):
                return got
            except OSError:
                return got  # (the next receive reports it)
            if more:
                self.end += more
                got += more
        return got

    def _grow(self) -> None:
        """The buffer at its full size (:attr:`buf_limit`), what is unread moved to its
        front. (A new buffer: a slice of the old one that someone still holds stays
        valid, and is no longer the buffer's.)"""
        left = self.end - self.start
        buf = bytearray(self.buf_limit)
        buf[:left] = self.view[self.start : self.end]
        self.buf, self.view = buf, memoryview(buf)
        self.start, self.end = 0, left

    def _release_held(self) -> None:
        """The hook or feeder returned: what it posted leaves now, in one message, not a
        turn of the loop later."""
        self._hold_flush = False
        if self._out_waiters and self._writer is None:
            self._flush()

    def send_posted(self) -> None:
        """From a feeder: what it has posted leaves now, before it returns (an answer
        the peer waits for, ahead of work of ours it need not wait for); what it posts
        after leaves at once too."""
        self._release_held()

    def _readable(self) -> None:
        if self._lent is not None:  # (a readiness seen before the borrower muted it)
            return
        if self._feeder is not None:
            self._receive_for_feeder(self._feeder)
            return
        direct = self._direct
        if direct is not None and (not self._receive_direct(direct) or self.closed):
            return  # more of it to come (or its end closed the channel)
        waiters = self._read_waiters
        if not waiters and self._stuck is not None:
            if not self._receive_for_hook():
                self._stuck()
            return
        if not waiters:
            # Level-triggered: stop watching until somebody waits again.
            self._watching = False
            self.loop.remove_reader(self.fd)
            return
        if self.on_data is not None and self._filling:
            if self._receive_for_hook():
                return
        elif not self.tls:
            # The readiness may be stale: seen by the loop before the reader, woken by an
            # earlier one, took the data. A peek costs less than waking it for nothing.
            try:
                self.sock.recv_into(self._peek, 1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                pass  # the reader's own recv reports it
        self._read_waiters = []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _receive_for_hook(self) -> bool:
        """The reader waits in :meth:`fill`: receive here and let :attr:`on_data` take
        what it can from the buffer. True: nothing for the reader to do (stale readiness,
        or the hook took every complete message); False: wake it.

        After a payload received straight into its place the socket is read in chunks
        instead, the hook run after each: the first of :data:`HOOK_CHUNK` bytes, each
        next one twice the last while the socket fills them. In a stream of large
        writes, each next one's payload is then copied out of this buffer for at most a
        chunk before the hook receives the rest into its place, not for as much as the
        buffer holds (256 KiB: a quarter of a 1 MiB write copied once more). Once the
        hook has taken a chunk's messages whole, with no payload received into place,
        the next readiness receives as usual."""
        chunk = HOOK_CHUNK if self._after_direct else 0
        while True:
            if self.start:  # (the hook took all there was, the usual case: nothing to move)
                self._compact(len(self.buf) // 2)
            if self.end == len(self.buf):
                if len(self.buf) == self.buf_limit:
                    return False
                self._grow()
            room = min(len(self.buf) - self.end, chunk)
            try:
                got = self._recv_available(room)
            except Closed:
                return False  # the reader's own recv sees it too, and reports it
            if not got:
                return True  # a stale readiness, or the last chunk was all there was
            if not chunk:
                return self.run_hook()
            self._after_direct = False  # (receive_direct sets it again)
            if not self.run_hook():
                return False
            if self._direct is not None or self.closed or got < room:
                return True
            chunk = min(2 * chunk, self.buf_limit)

    def run_hook(self) -> bool:
        """Run :attr:`on_data` on what the buffer holds now; its answer (False too when
        it raised: a bug, which the reader takes over from, and is logged). What it
        posts leaves when it returns."""
        hook = self.on_data
        if hook is None:
            return False
        held = self._hold_flush  # (inside a feeder, which flushes when it returns)
        self._hold_flush = True
        try:
            return hook()
        except Exception:  # a bug in the hook: the reader takes over, and says what
            log.exception("data hook failed")
            return False
        finally:
            if not held:
                self._release_held()

    def _compact(self, need: int) -> None:
        """Move what is left unread (a partial message) to the front of the buffer when
        ``need`` bytes from it would not fit where it is (or nothing is left)."""
        if self.start and (self.start == self.end or len(self.buf) - self.start < need):
            left = self.end - self.start
            self.buf[:left] = self.buf[self.start : self.end]
            self.start, self.end = 0, left

    async def _recv_into(self, view: memoryview) -> int:
        """Receive at least one byte into ``view``; Closed on end of stream."""
        while True:
            if self.closed:
                raise Closed("connection closed")
            try:
                n = self.sock.recv_into(view)
            except _WANT_READ:
                await self._wait(False)
                continue
            except ssl.SSLWantWriteError:
                await self._wait(True)
                continue
            except (OSError, ssl.SSLError) as exc:
                raise Closed(str(exc)) from None
            if n == 0:
                raise Closed("end of stream")
            return n

    # ------------------------------------------------------------------ receiving
    @property
    def buffered(self) -> int:
        return self.end - self.start

    async def fill(self, n: int, *, between_messages: bool = False) -> None:
        """Make at least ``n`` bytes (n <= :attr:`buf_limit`) available at ``start``.

        ``between_messages``: the caller waits for the start of a new message (not for
        the rest of one, nor for bytes it will skip), so :attr:`on_data` may take complete
        messages from the buffer meanwhile; the position to receive at is then worked out
        again after every wait."""
        if n > len(self.buf) and len(self.buf) < self.buf_limit:
            self._grow()
        while self.end - self.start < n:
            self._compact(n)
            if self.tls or self.on_data is None or not between_messages:
                self.end += await self._recv_into(self.view[self.end :])
                continue
            if self.closed:
                raise Closed("connection closed")
            try:
                got = self.sock.recv_into(self.view[self.end :])
            except (BlockingIOError, InterruptedError):
                self._filling = True
                try:
                    await self._wait_readable()
                finally:
                    self._filling = False
                continue
            except OSError as exc:
                raise Closed(str(exc)) from None
            if not got:
                raise Closed("end of stream")
            self.end += got

    def consume(self, n: int) -> None:
        self.start += n
        if self.start == self.end:
            self.start = self.end = 0

    async def read_exact(self, n: int) -> bytes:
        """``n`` bytes as a new bytes object (handshake messages; bounded by callers)."""
        if n <= self.buf_limit:
            await self.fill(n)
            data = bytes(self.view[self.start : self.start + n])
            self.consume(n)
            return data
        out = bytearray(n)
        await self.read_into(memoryview(out))
        return bytes(out)

    async def read_into(self, dst: memoryview) -> None:
        """Fill ``dst``: first from what is buffered, then straight from the socket."""
        have = min(self.buffered, len(dst))
        if have:
            dst[:have] = self.view[self.start : self.start + have]
            self.consume(have)
        pos = have
        while pos < len(dst):
            pos += await self._recv_into(dst[pos:])

    async def skip(self, n: int) -> None:
        """Read and drop ``n`` bytes."""
        while n:
            have = min(self.buffered, n)
            if have:
                self.consume(have)
                n -= have
                continue
            await self.fill(min(n, len(self.buf)))

    def unpack(self, fmt: struct.Struct) -> tuple:
        """Parse a message already made available with :meth:`fill`."""
        values = fmt.unpack_from(self.buf, self.start)
        self.consume(fmt.size)
        return values

    # ------------------------------------------------------------------ sending
    async def send(self, bufs: Sequence[bytes | bytearray | memoryview], *,
                   now: bool = False) -> None:
        """Send every buffer (bytes-like, of bytes), in order, as one message (not
        interleaved with another); return once all of it is with the kernel, so that the
        caller may reuse its buffers.

        Messages sent during one turn of the event loop leave together, in one
        ``sendmsg`` at the end of the turn (or as soon as :data:`FLUSH_BYTES` are
        queued): replies that complete together cost one system call (and one wake-up
        of the client), not one each. ``now`` is for a caller that has nothing to batch
        with (a handshake, which then waits for the peer's answer): what is queued
        leaves at once, as :meth:`post` says, and the call returns without a turn of
        the loop when the socket takes all of it."""
        if self.tls:
            async with self._send_lock:
                for b in bufs:
                    if len(b):
                        await self._send_one(memoryview(b).cast("B"))
            return
        waiter = self.loop.create_future()
        self.post(bufs, _settle, waiter, now=now)
        await waiter  # (done already when the flush sent it all: no suspension)

    async def drain(self) -> None:
        """Return once every message queued so far is with the kernel (or the connection
        broke): what was posted must leave before the socket is closed."""
        if self.tls or (not self._out_waiters and self._writer is None):
            return
        try:
            await self.send([])
        except Closed:
            pass

    def clear_to_send(self) -> bool:
        """Whether a message may go straight to the socket, past the queue (the compiled
        inline path sends its replies so): a plain socket with nothing queued or being
        sent, since the bytes of two messages must never interleave. (What is queued is
        not sent here: it leaves in one system call with what joins it this turn.)"""
        return not (self.tls or self.closed or self._writer is not None
                    or self._out_waiters)

    @property
    def stalled(self) -> bool:
        """Whether the socket refused the last send (a writer waits for room)."""
        return self._writer is not None

    def post(self, bufs: Sequence[bytes | bytearray | memoryview],
             done: Callable[[BaseException | None, Any], None], arg: Any = None, *,
             now: bool = False) -> None:
        """Queue a message as :meth:`send` does, without waiting: ``done(None, arg)`` is
        called once every byte is with the kernel (the buffers may be reused then), or
        ``done(Closed, arg)`` if the connection broke first. Not for TLS channels.
        ``now``: the caller has nothing else to send this turn; what is queued leaves at
        once (unless the data hook is running: it sends its batch when it returns)."""
        if self.closed:
            done(Closed("connection closed"), arg)
            return
        for b in bufs:
            if len(b):
                self._out.append(b)
                self._out_bytes += len(b)
        self._out_waiters.append((done, arg))
        if self._writer is None:
            if self._out_bytes >= FLUSH_BYTES or (now and not self._hold_flush):
                self._flush()
            elif not self._flush_pending and not self._hold_flush:
                self._flush_pending = True
                self.loop.call_soon(self._flush)

    def _take_out(self) -> tuple[list, list[tuple]]:
        out, waiters = self._out, self._out_waiters
        self._out, self._out_waiters, self._out_bytes = [], [], 0
        return out, waiters

    def _send_some(self, rest: list) -> list:
        """``sendmsg`` until every byte is sent ([]) or the socket is full (what is left)."""
        while rest:
            if self.closed:
                raise Closed("connection closed")
            try:
                sent = self.sock.sendmsg(rest[:IOV_MAX])
            except InterruptedError:
                continue
            except BlockingIOError:
                break
            except OSError as exc:
                raise Closed(str(exc)) from None
            rest = advance(rest, sent)
        return rest

    @staticmethod
    def _wake(waiters: list[tuple], exc: BaseException | None = None) -> None:
        for done, arg in waiters:
            done(exc, arg)

    def _flush(self) -> None:
        """Send what is queued; a task finishes the job if the socket is full."""
        self._flush_pending = False
        if self._writer is not None or not self._out_waiters:
            return  # the writer takes up what is queued when it is done with its own
        out, waiters = self._take_out()
        try:
            rest = self._send_some(out)
        except Closed as exc:
            self._wake(waiters, exc)
            return
        if rest:
            self.stalled_since = self.loop.time()
            self._writer = self.loop.create_task(self._write_rest(rest, waiters))
        else:
            self._wake(waiters)

    async def _write_rest(self, rest: list, waiters: list[asyncio.Future]) -> None:
        try:
            while True:
                while rest:
                    await self._wait(True)
                    self.stalled_since = self.loop.time()  # the peer took some
                    rest = self._send_some(rest)
                self._wake(waiters)
                if not self._out_waiters:
                    return
                rest, waiters = self._take_out()
                rest = self._send_some(rest)
        except Closed as exc:
            self._wake(waiters, exc)
            self._wake(self._take_out()[1], exc)
        finally:
            self.stalled_since = None
            self._writer = None

    async def _send_one(self, view: memoryview) -> None:
        while view:
            if self.closed:
                raise Closed("connection closed")
            try:
                n = self.sock.send(view)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
                if self.stalled_since is None:
                    self.stalled_since = self.loop.time()
                await self._wait(True)
                continue
            except ssl.SSLWantReadError:
                await self._wait(False)
                continue
            except (OSError, ssl.SSLError) as exc:
                raise Closed(str(exc)) from None
            self.stalled_since = None
            view = view[n:]

    def peer_gone(self) -> bool:
        """Whether the peer can take nothing more: it closed both directions, or the
        connection was reset (a half-close, where it may still read, is not gone)."""
        if self.closed:
            return True
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        try:
            events = poller.poll(0)
        except OSError:
            return True
        return any(ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL)
                   for _, ev in events)

    # ------------------------------------------------------------------ TLS
    async def start_tls(self, context: ssl.SSLContext) -> None:
        """Upgrade to TLS as the server (after NBD_OPT_STARTTLS was acknowledged)."""
        if self.buffered:
            raise Closed("client sent data before the TLS handshake")
        tls = context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
        self.sock = tls
        self.tls = True
        while True:
            try:
                tls.do_handshake()
                return
            except ssl.SSLWantReadError:
                await self._wait(False)
            except ssl.SSLWantWriteError:
                await self._wait(True)
            except (OSError, ssl.SSLError) as exc:
                raise Closed(f"TLS handshake failed: {exc}") from None

    def close(self) -> None:
        """Close the socket; coroutines waiting on it wake up and raise Closed. What was
        posted and not sent yet is sent first if the socket takes it at once (the
        answers to a client's last messages, before it is dropped)."""
        if self.closed:
            return
        take_back, self._lent = self._lent, None
        if take_back is not None:
            take_back()
        if self._out_waiters and self._writer is None and not self.tls:
            out, waiters = self._take_out()
            try:
                rest = self._send_some(out)
            except Closed as exc:
                self._wake(waiters, exc)
            else:  # (what the socket did not take now is not waited for)
                self._wake(waiters, Closed("connection closed") if rest else None)
        self.closed = True
        self.loop.remove_reader(self.fd)
        self.loop.remove_writer(self.fd)
        self._watching = False
        self.cancel_direct()
        feeder, self._feeder = self._feeder, None
        if feeder is not None:
            feeder(Closed("connection closed"))
        stuck, self._stuck = self._stuck, None
        if stuck is not None:
            stuck()
        waiters = [*self._waiters, *self._read_waiters]
        self._read_waiters = []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
        try:
            if self.tls:
                self.sock.setblocking(False)
            self.sock.close()
        except OSError:
            pass


def close_listener(sock: socket.socket, path: str) -> None:
    """Close a listener made by :func:`unix_listener` and remove its socket file."""
    sock.close()
    try:
        os.unlink(path)
    except OSError:
        pass


def unix_listener(path: str, backlog: int = 128) -> socket.socket:
    """A listening UNIX stream socket at ``path``: a stale socket file (nobody listens)
    is replaced; a live one (EADDRINUSE) or anything else there (EEXIST) is refused."""
    if os.path.lexists(path):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise BlktapError(f"{path}: exists and is not a socket", errno.EEXIST)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: a leftover of a killed server
        else:
            raise BlktapError(f"{path}: another server is listening there",
                              errno.EADDRINUSE)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise BlktapError(f"{path}: {os.strerror(exc.errno or errno.EIO)}",
                          exc.errno or errno.EIO) from None
    return sock
