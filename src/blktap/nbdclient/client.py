"""The transmission phase, as a client: many requests in flight over one connection, a
reconnect that holds requests instead of failing them, a time limit per request.

- Each request is the coroutine of its caller: it takes a handle, sends its header (and a
  write's buffers, scatter-gather, no copy) and waits for its reply. One reader task per
  connection parses replies and lands read data straight in the caller's buffers.
- Simple and structured replies; a structured read may come in any number of data and
  hole chunks, block status in a ``base:allocation`` chunk. Every reply is checked
  against its request (handle, offsets inside the request, sizes, context id): a reply
  that breaks the protocol fails the requests in flight with EPROTO and drops the
  connection; it is never a hang or an unbounded allocation.
- The connection breaking (end of stream, reset, the server answering ESHUTDOWN) is not an
  error: requests in flight and new ones are held while a task reconnects with backoff
  (:data:`BACKOFF`), then sent again on the new connection. A request still unanswered
  when its time (``timeout``, the VBD's per-request timeout) is up fails with ETIMEDOUT.
  A server that comes back with another size, or read-only under a writer, is refused.
- Acknowledged writes are not replayed: as with any NBD client, a write the server
  acknowledged but had not made durable (no flush) when it died is the server's to lose.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
import time
from collections.abc import Callable, Sequence

from blktap.errors import NbdClientError
from blktap.io.engine import Engine
from blktap.io.iov import slice_iov, zero_fill
from blktap.nbdclient.address import Address
from blktap.nbdclient.handshake import RETRYABLE, Session, negotiate
from blktap.transport.nbd import proto as p
from blktap.transport.sockio import Channel, Closed

log = logging.getLogger("blktap.nbdclient")

DEFAULT_TIMEOUT = 120.0
# Seconds between reconnect attempts: doubling from the first to the last.
BACKOFF = (0.05, 2.0)
# Payloads we read whole into memory (block status, errors); bigger ones break the protocol.
MAX_STATUS_PAYLOAD = 4 + 8 * (1 << 20)
MAX_ERROR_PAYLOAD = 4 + 2 + 4096 + 8
# Wire errors we know (the NBD values are Linux's); anything else is EIO.
_WIRE_ERRNO = {p.NBD_EPERM, p.NBD_EIO, p.NBD_ENOMEM, p.NBD_EINVAL, p.NBD_ENOSPC,
               p.NBD_EOVERFLOW, p.NBD_ENOTSUP, p.NBD_ESHUTDOWN}
_U32 = struct.Struct(">I")  # a reply's magic; a block-status chunk's context id
_OFFSET = struct.Struct(">Q")  # a data chunk's offset
_HOLE = struct.Struct(">QI")  # a hole chunk: offset, length
_EXTENT = struct.Struct(">II")  # a base:allocation extent: length, flags


class _Retry(Exception):
    """The connection carrying a request broke before its reply: send it again."""


class ProtocolError(Exception):
    """The server broke the protocol (the connection is dropped)."""


class Request:
    __slots__ = ("cmd", "flags", "offset", "length", "iov", "fut", "handle", "error",
                 "covered", "extents", "abandoned", "sent")

    def __init__(self, cmd: int, flags: int, offset: int, length: int,
                 iov: Sequence[memoryview] | None) -> None:
        self.cmd = cmd
        self.flags = flags
        self.offset = offset
        self.length = length
        self.iov = iov
        self.fut: asyncio.Future | None = None
        self.handle = 0
        self.error: NbdClientError | None = None
        self.covered = 0  # bytes of a structured read answered
        self.extents: list[tuple[int, int]] = []
        self.abandoned = False  # timed out: a late reply is read and dropped
        self.sent = False  # all of it is with the kernel


class Connection:
    """One negotiated connection and its reader."""

    def __init__(self, client: NbdClient, session: Session) -> None:
        self.client = client
        self.session = session
        self.ch = Channel(session.sock, client.loop)
        self.ch.tls = session.tls
        self.inflight: dict[int, Request] = {}
        self.reader = client.loop.create_task(self._read_replies())
        self.alive = True

    # ------------------------------------------------------------------ replies
    async def _read_replies(self) -> None:
        ch = self.ch
        try:
            while True:
                await ch.fill(4)
                (magic,) = _U32.unpack_from(ch.buf, ch.start)
                if magic == p.SIMPLE_REPLY_MAGIC:
                    await ch.fill(p.SIMPLE_REPLY.size)
                    await self._simple(*ch.unpack(p.SIMPLE_REPLY)[1:])
                elif magic == p.STRUCTURED_REPLY_MAGIC and self.session.structured:
                    await ch.fill(p.CHUNK.size)
                    await self._chunk(*ch.unpack(p.CHUNK)[1:])
                else:
                    raise ProtocolError(f"bad reply magic {magic:#010x}")
        except Closed as exc:
            self.lost(f"connection lost: {exc}")
        except ProtocolError as exc:
            self.broken(str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug here must not hang requests
            log.exception("nbd %s: reply reader failed", self.client.address)
            self.broken(f"{type(exc).__name__}: {exc}")

    def _take(self, handle: int) -> Request:
        """The request a reply is for (it stays in flight, and fails with the others if
        its reply breaks the protocol, until :meth:`_done`)."""
        req = self.inflight.get(handle)
        if req is None:
            raise ProtocolError(f"a reply for handle {handle:#x}, which is not in flight")
        return req

    async def _simple(self, error: int, handle: int) -> None:
        req = self._take(handle)
        if error:
            req.error = self.client.wire_error(req, error, "")
        elif req.cmd == p.CMD_READ:
            if self.session.structured:
                raise ProtocolError("a simple reply with data to a read, after structured "
                                    "replies were agreed")
            await self._receive(req, 0, req.length)
        elif req.cmd == p.CMD_BLOCK_STATUS:
            raise ProtocolError("a simple reply to block status")
        self._done(req)

    async def _receive(self, req: Request, start: int, length: int) -> None:
        """Read ``length`` bytes of payload into the request's buffers at ``start``."""
        if req.abandoned or req.iov is None:
            await self.ch.skip(length)
            return
        for view in slice_iov(req.iov, start, length):
            await self.ch.read_into(view)

    async def _chunk(self, flags: int, kind: int, handle: int, length: int) -> None:
        done = bool(flags & p.REPLY_FLAG_DONE)
        req = self._take(handle)
        ch = self.ch
        if kind == p.REPLY_TYPE_OFFSET_DATA:
            if req.cmd != p.CMD_READ or length < _OFFSET.size:
                raise ProtocolError(f"a data chunk of {length} bytes to a "
                                    f"{p.CMD_NAMES.get(req.cmd, req.cmd)}")
            await ch.fill(_OFFSET.size)
            (offset,) = ch.unpack(_OFFSET)
            n = length - _OFFSET.size
            self._check_range(req, offset, n)
            await self._receive(req, offset - req.offset, n)
            req.covered += n
        elif kind == p.REPLY_TYPE_OFFSET_HOLE:
            if req.cmd != p.CMD_READ or length != _HOLE.size:
                raise ProtocolError(f"a hole chunk of {length} bytes to a "
                                    f"{p.CMD_NAMES.get(req.cmd, req.cmd)}")
            await ch.fill(_HOLE.size)
            offset, n = ch.unpack(_HOLE)
            self._check_range(req, offset, n)
            if not req.abandoned and req.iov is not None:
                zero_fill(slice_iov(req.iov, offset - req.offset, n))
            req.covered += n
        elif kind == p.REPLY_TYPE_BLOCK_STATUS:
            if req.cmd != p.CMD_BLOCK_STATUS or length < 12 or (length - 4) % 8 \
                    or length > MAX_STATUS_PAYLOAD:
                raise ProtocolError(f"a block status chunk of {length} bytes to a "
                                    f"{p.CMD_NAMES.get(req.cmd, req.cmd)}")
            data = await ch.read_exact(length)
            (context,) = _U32.unpack_from(data)
            if context != self.session.meta_id:
                raise ProtocolError(f"block status for context {context}, not asked for")
            if not req.extents:  # one context asked: one chunk; extra ones are ignored
                req.extents = [_EXTENT.unpack_from(data, pos)
                               for pos in range(4, length, _EXTENT.size)]
        elif kind in (p.REPLY_TYPE_ERROR, p.REPLY_TYPE_ERROR_OFFSET):
            if length < p.ERROR_PAYLOAD.size or length > MAX_ERROR_PAYLOAD:
                raise ProtocolError(f"an error chunk of {length} bytes")
            data = await ch.read_exact(length)
            error, mlen = p.ERROR_PAYLOAD.unpack_from(data)
            extra = 8 if kind == p.REPLY_TYPE_ERROR_OFFSET else 0
            if p.ERROR_PAYLOAD.size + mlen + extra != length:
                raise ProtocolError(f"an error chunk of {length} bytes with a message of "
                                    f"{mlen}")
            message = data[p.ERROR_PAYLOAD.size : p.ERROR_PAYLOAD.size + mlen]
            if req.error is None:
                req.error = self.client.wire_error(req, error or p.NBD_EIO,
                                                   message.decode("utf-8", "replace"))
        elif kind == p.REPLY_TYPE_NONE:
            if length or not done:
                raise ProtocolError(f"a NONE chunk of {length} bytes, flags {flags:#x}")
        else:
            raise ProtocolError(f"an unknown reply chunk type {kind} ({length} bytes)")
        if done:
            if req.error is None:
                if req.cmd == p.CMD_READ and req.covered < req.length:
                    raise ProtocolError(f"a read of {req.length} bytes answered with "
                                        f"{req.covered}")
                if req.cmd == p.CMD_BLOCK_STATUS and not req.extents:
                    raise ProtocolError("block status answered without extents")
            self._done(req)

    @staticmethod
    def _check_range(req: Request, offset: int, length: int) -> None:
        if offset < req.offset or offset + length > req.offset + req.length:
            raise ProtocolError(f"a chunk for [{offset}, {offset + length}) in answer to a "
                                f"read of [{req.offset}, {req.offset + req.length})")

    def _done(self, req: Request) -> None:
        self.inflight.pop(req.handle, None)
        fut = req.fut
        if fut is not None and not fut.done():
            if req.error is not None and req.error.errno == errno.ESHUTDOWN:
                fut.set_exception(_Retry())  # the server is going away: ask the next one
                self.client.loop.call_soon(self.lost,  # type: ignore[union-attr]
                                           "the server is shutting down")
            elif req.error is not None:
                fut.set_exception(req.error)
            else:
                fut.set_result(None)

    def on_sent(self, exc: BaseException | None, req: Request) -> None:
        """A queued request left (or the connection broke first)."""
        if exc is None:
            req.sent = True
        else:
            self.lost(f"send failed: {exc}")

    # ------------------------------------------------------------------ the end
    def _finish(self, exc_for: Callable[[], BaseException]) -> None:
        if not self.alive:
            return
        self.alive = False
        self.ch.close()
        inflight, self.inflight = self.inflight, {}
        for req in inflight.values():
            if req.fut is not None and not req.fut.done():
                req.fut.set_exception(exc_for())
        self.client.connection_ended(self)

    def lost(self, why: str) -> None:
        """The connection broke: requests in flight are held for the next one."""
        if self.alive:
            log.warning("nbd %s: %s; %d request(s) held, reconnecting", self.client.address,
                        why, sum(not r.abandoned for r in self.inflight.values()))
        self._finish(_Retry)

    def broken(self, why: str) -> None:
        """The server broke the protocol: requests in flight fail."""
        if self.alive:
            log.error("nbd %s: protocol error: %s", self.client.address, why)
        message = f"nbd {self.client.address}: protocol error: {why}"
        self._finish(lambda: NbdClientError(message, errno.EPROTO))

    async def close(self) -> None:
        self.reader.cancel()
        try:
            await self.reader
        except asyncio.CancelledError:
            pass
        if self.alive:
            try:
                await asyncio.wait_for(self.ch.send([p.REQUEST.pack(
                    p.REQUEST_MAGIC, 0, p.CMD_DISC, 0, 0, 0)]), 1.0)
                await self.ch.drain()
            except (Closed, TimeoutError):
                pass
        self._finish(lambda: NbdClientError("nbd: closed", errno.ESHUTDOWN))


def _forget(fut: asyncio.Future) -> None:
    """A future nobody will await: its exception, if any, is expected."""
    if fut.done() and not fut.cancelled():
        fut.exception()
    elif not fut.done():
        fut.cancel()


def _peer_path(sock: socket.socket) -> str | None:
    if sock.family != socket.AF_UNIX:
        return None
    try:
        name = sock.getpeername()
    except OSError:
        return None
    return name if isinstance(name, str) and name.startswith("/") else None


class NbdClient:
    """An NBD client for one export; opened by :meth:`connect` (blocking), used from the
    event loop."""

    def __init__(self, address: Address, session: Session, engine: Engine, *,
                 timeout: float = DEFAULT_TIMEOUT, writable: bool = True) -> None:
        self.address = address
        self.session = session  # the first one: size and flags stay as they were
        # The path of the UNIX socket the server listens on, as the kernel says (for a
        # passed socket too: what it was connected to); None for TCP or a socketpair.
        self.peer_path = _peer_path(session.sock)
        self.engine = engine
        self.timeout = timeout
        self.writable = writable
        self.loop: asyncio.AbstractEventLoop | None = None
        self.conn: Connection | None = None
        self._up: asyncio.Event | None = None
        self._connector: asyncio.Task | None = None
        self._pending_session: Session | None = session
        self._next_handle = 1
        self.closed = False
        self.reconnects = 0
        self.last_error: str | None = None
        # A reconnect refused for good fails the requests that waited for it; the next
        # request tries again (a new epoch).
        self._fatal: NbdClientError | None = None
        self._epoch = 0

    @classmethod
    def connect(cls, address: Address, engine: Engine, *, writable: bool = True,
                timeout: float = DEFAULT_TIMEOUT) -> NbdClient:
        """Connect and negotiate (blocking: call from a worker thread or before serving)."""
        session = negotiate(address)
        if writable and session.flags & p.FLAG_READ_ONLY:
            session.sock.close()
            raise NbdClientError(f"nbd {address}: the export is read-only; open it "
                                 f"read-only", errno.EROFS)
        return cls(address, session, engine, timeout=timeout, writable=writable)

    @property
    def size(self) -> int:
        return self.session.size

    @property
    def flags(self) -> int:
        return self.session.flags

    @property
    def connected(self) -> bool:
        return self.conn is not None and self.conn.alive

    # ------------------------------------------------------------------ connections
    def _start(self) -> None:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
            self._up = asyncio.Event()
        if self._pending_session is not None:
            session, self._pending_session = self._pending_session, None
            self.conn = Connection(self, session)
            self._up.set()  # type: ignore[union-attr]

    def connection_ended(self, conn: Connection) -> None:
        if self.conn is conn:
            self.conn = None
            assert self._up is not None
            self._reconnect_soon()

    def _reconnect_soon(self) -> int:
        """Start a reconnect unless one runs; the epoch the caller waits for."""
        if self.closed or self._connector is not None:
            return self._epoch
        assert self.loop is not None and self._up is not None
        self._epoch += 1
        self._fatal = None
        self._up.clear()
        self._connector = self.loop.create_task(self._reconnect())
        return self._epoch

    async def _reconnect(self) -> None:
        delay, limit = BACKOFF
        attempts = 0
        try:
            while not self.closed:
                attempts += 1
                try:
                    session = await self.engine.call(negotiate, self.address)
                except NbdClientError as exc:
                    self.last_error = str(exc)
                    if exc.errno not in RETRYABLE:
                        log.error("%s; requests fail until it is fixed", exc)
                        self._fatal = exc
                        assert self._up is not None
                        self._up.set()  # wake the held requests: they fail
                        return
                    if attempts == 1:
                        log.info("%s; trying again", exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, limit)
                    continue
                problem = self._mismatch(session)
                if problem is not None:
                    session.sock.close()
                    self._fatal = NbdClientError(f"nbd {self.address}: {problem}",
                                                 errno.EIO)
                    self.last_error = str(self._fatal)
                    log.error("%s", self._fatal)
                    assert self._up is not None
                    self._up.set()
                    return
                self._fatal = None
                self.reconnects += 1
                self.conn = Connection(self, session)
                log.info("nbd %s: reconnected after %d attempt(s)", self.address, attempts)
                assert self._up is not None
                self._up.set()
                return
        finally:
            self._connector = None

    def _mismatch(self, session: Session) -> str | None:
        if session.size != self.session.size:
            return (f"the export is now {session.size} bytes, was {self.session.size}: "
                    "not the same disk")
        if self.writable and session.flags & p.FLAG_READ_ONLY:
            return "the export is now read-only"
        if session.structured != self.session.structured or \
                (session.meta_id is None) != (self.session.meta_id is None):
            return "the server no longer offers what it did (structured replies, status)"
        return None

    def wire_error(self, req: Request, error: int, message: str) -> NbdClientError:
        code = error if error in _WIRE_ERRNO else errno.EIO
        what = p.CMD_NAMES.get(req.cmd, str(req.cmd))
        text = f"nbd {self.address}: {what} of {req.length} bytes at {req.offset}: " \
               f"{errno.errorcode.get(code, code)}"
        return NbdClientError(f"{text}: {message}" if message else text, code)

    # ------------------------------------------------------------------ requests
    async def request(self, req: Request, bufs: Sequence[memoryview] = ()) -> None:
        """Send ``req`` (with ``bufs``, a write's data) and wait for its reply; held across
        reconnects, ETIMEDOUT once :attr:`timeout` has passed."""
        if self.closed:
            raise NbdClientError(f"nbd {self.address}: closed", errno.ESHUTDOWN)
        self._start()
        loop = self.loop
        assert loop is not None and self._up is not None
        deadline = loop.time() + self.timeout
        started = time.monotonic()
        waited: int | None = None
        held = False  # waiting for a connection (not for a reply)
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    conn = self.conn
                    if conn is None or not conn.alive:
                        if self._fatal is not None and waited == self._epoch:
                            raise self._fatal
                        waited = self._reconnect_soon()
                        held = True
                        await self._up.wait()
                        held = False
                        if self.closed:
                            raise NbdClientError(f"nbd {self.address}: closed",
                                                 errno.ESHUTDOWN)
                        continue
                    try:
                        await self._send(conn, req, bufs)
                        return
                    except _Retry:
                        continue
        except TimeoutError:
            req.abandoned = True
            waited = time.monotonic() - started
            why = f" (held: no connection; {self.last_error or 'reconnecting'})" if held else ""
            raise NbdClientError(
                f"nbd {self.address}: {p.CMD_NAMES.get(req.cmd, req.cmd)} of {req.length} "
                f"bytes at {req.offset} not answered in {waited:.1f} s{why}",
                errno.ETIMEDOUT) from None
        except BaseException:
            req.abandoned = True
            raise

    async def _send(self, conn: Connection, req: Request, bufs: Sequence[memoryview]) -> None:
        handle = self._next_handle
        self._next_handle = (handle + 1) & 0xFFFFFFFFFFFFFFFF or 1
        req.handle = handle
        req.error = None
        req.covered = 0
        req.extents = []
        fut = req.fut = conn.client.loop.create_future()  # type: ignore[union-attr]
        conn.inflight[handle] = req
        header = p.REQUEST.pack(p.REQUEST_MAGIC, req.flags, req.cmd, handle, req.offset,
                                req.length)
        message = [header, *bufs] if bufs else [header]
        if conn.ch.tls:
            req.sent = False
            try:
                await conn.ch.send(message)
            except Closed as exc:
                conn.inflight.pop(handle, None)
                conn.lost(f"send failed: {exc}")
                _forget(fut)
                raise _Retry() from None
            except BaseException:
                self._abandon_unsent(conn, req)
                raise
            req.sent = True
        else:
            # Queued for the end of this turn of the loop (one sendmsg for every request
            # of the turn), not waited for: the caller's buffers stay valid until the
            # reply, which cannot come before the data has left.
            req.sent = False
            conn.ch.post(message, conn.on_sent, req)
        try:
            await fut
        except BaseException:
            if not req.sent:
                self._abandon_unsent(conn, req)
            raise

    @staticmethod
    def _abandon_unsent(conn: Connection, req: Request) -> None:
        """A request cut short (timeout, cancelled) before all of it was with the kernel:
        its buffers go back to the caller, so what is queued must not leave, and the
        stream is no longer in step: start again on a new connection."""
        conn.inflight.pop(req.handle, None)
        conn.lost("a request was abandoned while being sent")
        if req.fut is not None:
            _forget(req.fut)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._up is not None:
            self._up.set()
        connector = self._connector
        if connector is not None:
            connector.cancel()
            try:
                await connector
            except asyncio.CancelledError:
                pass
        if self.conn is not None:
            await self.conn.close()
            self.conn = None
        if self._pending_session is not None:
            self._pending_session.sock.close()
            self._pending_session = None


__all__ = ["DEFAULT_TIMEOUT", "NbdClient", "ProtocolError", "Request"]
