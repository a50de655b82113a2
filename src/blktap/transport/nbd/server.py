"""Listeners and connections of the NBD server.

One :class:`NbdServer` serves one :class:`Export` (a VBD under a name) on any number of
UNIX-socket and TCP listeners, and on fd-passing sockets (:meth:`NbdServer.listen_fd_passing`:
another process hands over a connected socket, which gets the fixed newstyle or the
oldstyle handshake). A listener accepts from the loop's readiness callback; a client's
fixed newstyle handshake (with a time limit) runs from its socket's readiness callback
(:class:`~blktap.transport.nbd.handshake.FedNegotiation`), and transmission goes on the
same way (:meth:`Connection.start <blktap.transport.nbd.connection.Connection.start>`)
until something must wait: only then does the client get a task of its own. On a polling
loop with the C extension, a listener's front desk (``_handshake.Desk``) does the accepts
and the usual handshakes in the loop's wait, and hands each client over here
(:meth:`NbdServer._collect`) at GO, or where the Python negotiation must go on. Where TLS
is required, and for the oldstyle handshake, a task does the handshake and transmission.
A client that misbehaves is dropped alone; the others and the listeners carry on.
:meth:`NbdServer.stop` stops accepting, lets every request in flight finish and closes
the connections (the VBD is the caller's to close).

Buffers come from a pool charged to a memory budget; by default the process's own
(:func:`~blktap.io.buffers.default_pool`), so that every server of a tapdisk shares one
budget. When the last connection of a server closes, the pool's idle buffers go back to
the system.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import socket
import ssl
import time
from collections.abc import Coroutine
from typing import Any

from blktap.errors import BlktapError
from blktap.io.buffers import BufferPool, default_pool
from blktap.io.clock import Tick, Ticker
from blktap.io.polling import PollingSelector
from blktap.transport.fdreceiver import FdReceiver, Refused
from blktap.transport.nbd import inline
from blktap.transport.nbd.connection import Connection, serve_at_desk
from blktap.transport.nbd.export import Export
from blktap.transport.nbd.handshake import (
    AGREED,
    ENDED,
    GREETING,
    Dropped,
    FedNegotiation,
    Session,
    agreed,
    compiled_desk,
    compiled_take,
    negotiate,
    oldstyle,
    transmission_flags,
)
from blktap.transport.sockio import Channel, Closed, unix_listener

log = logging.getLogger("blktap.nbd")
# Bytes a UNIX-socket client may have unread before our sendmsg stops short (Linux caps it
# at net.core.wmem_max and doubles it). The default (208 KiB) makes every reply of 256 KiB
# or more take two system calls and a wait for the client; with this, 1 MiB sequential
# reads on tmpfs went from 1.5 to 2.5-2.9 GiB/s and nbdcopy from 1.0-1.15 to 1.7-2.0 GiB/s.
# TCP keeps the kernel's autotuning (setting SO_SNDBUF would turn it off).
UNIX_SEND_BUFFER = 2 << 20

HANDSHAKE_TIMEOUT = 30.0
MAX_CONNECTIONS = 1024
# Connections a listener takes per turn of the loop, and how long it rests when the
# process is out of file descriptors (or memory) to take them with (seconds).
ACCEPTS_PER_TURN = 16
ACCEPT_PAUSE = 0.1


def tls_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """A server context (TLS 1.2 or later); with ``ca``, clients must present a
    certificate it signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
        if ca:
            ctx.load_verify_locations(ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        code = getattr(exc, "errno", None)
        raise BlktapError(f"TLS certificate or key: {exc}",
                          code if isinstance(code, int) and code > 0 else errno.EINVAL) \
            from None
    return ctx


def _log_connected(peer: str, session: Session, *, tls: bool) -> None:
    log.info("%s: connected (%s replies%s)", peer,
             "structured" if session.structured else "simple", ", TLS" if tls else "")


class NbdServer:
    def __init__(self, export: Export, *, tls: ssl.SSLContext | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 max_connections: int = MAX_CONNECTIONS,
                 pool: BufferPool | None = None) -> None:
        self.export = export
        self.tls = tls
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.pool = pool if pool is not None else default_pool()
        self.loop = asyncio.get_running_loop()
        self._listeners: list[tuple[socket.socket, str | None]] = []
        self._paused: dict[int, asyncio.TimerHandle] = {}  # listeners resting (EMFILE)
        self._clients: set[asyncio.Task] = set()
        self._handshakes: set[FedNegotiation] = set()
        self._compiled_take = compiled_take()  # the compiled handshake pass, if built
        # The front desks of the listeners (_handshake.Desk, hooks of the loop's wait),
        # by listening socket: they accept and answer the usual handshakes without the
        # interpreter, and hand each client over to _acceptable.
        self._desks: dict[int, Any] = {}
        # Ends the handshakes past their time limit (a check a period, registered with
        # the first handshake, cancelled by stop).
        self._sweep: Tick | None = None
        self._channels: set[Channel] = set()
        self._connections: set[Connection] = set()
        self._untasked: set[Connection] = set()  # served with no task (Connection.start)
        self._receivers: list[FdReceiver] = []
        self._stopping = False
        self.accepted = 0
        self.passed = 0  # connections handed over on fd-passing sockets

    # ------------------------------------------------------------------ listeners
    def listen_unix(self, path: str) -> str:
        """Listen on a UNIX socket at ``path`` (a stale socket file is replaced, anything
        else there is refused)."""
        sock = unix_listener(path)
        self._add_listener(sock, path)
        return path

    def listen_tcp(self, host: str, port: int) -> tuple[str, int]:
        """Listen on TCP; returns the address bound (port 0 picks a free port)."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise BlktapError(f"{host}: {exc.strerror}", errno.EINVAL) from None
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise BlktapError(f"{host}:{port}: {os.strerror(exc.errno)}", exc.errno) from None
        self._add_listener(sock, None)
        bound = sock.getsockname()
        return bound[0], bound[1]

    def _add_listener(self, sock: socket.socket, path: str | None) -> None:
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._acceptable, sock)
        self._listeners.append((sock, path))
        self._open_desk(sock)

    # ------------------------------------------------------------------ front desks
    def _open_desk(self, lsock: socket.socket) -> None:
        """Give the listener a front desk where the loop's wait can take one (a polling
        selector with the C extension) and the handshake is the plain one (no TLS)."""
        desk_type = compiled_desk()
        selector = getattr(self.loop, "_selector", None)  # asyncio.SelectorEventLoop's
        if (desk_type is None or self.tls is not None or self._compiled_take is None
                or not isinstance(selector, PollingSelector) or not selector.can_hook):
            return
        export = self.export
        desk = desk_type(lsock.fileno(), GREETING, export.name.encode(), export.vbd.size,
                         transmission_flags(export, False), UNIX_SEND_BUFFER, 0)
        pump = inline.compiled()
        if pump is not None:  # (its transmission's usual first requests too)
            desk.transmit = functools.partial(serve_at_desk, pump, export.vbd)
        self._desks[lsock.fileno()] = desk
        self._make_room()
        selector.add_hook(desk)
        if len(self._desks) == 1:
            export.vbd.resumed.append(self._desks_flags)
        self._start_sweep()

    def _close_desks(self) -> None:
        """Stop the desks: the clients they hold are closed."""
        if not self._desks:
            return
        selector = getattr(self.loop, "_selector", None)
        for desk in self._desks.values():
            if isinstance(selector, PollingSelector):
                selector.remove_hook(desk)
            desk.close()
        self._desks.clear()
        if self._desks_flags in self.export.vbd.resumed:
            self.export.vbd.resumed.remove(self._desks_flags)

    def _desks_flags(self) -> None:
        """The disk serves from another driver: what the desks advertise follows."""
        flags = transmission_flags(self.export, False)
        for desk in self._desks.values():
            desk.flags = flags

    def _make_room(self) -> None:
        """Tell each desk how many clients it may hold: those it holds, and what the
        server's limit leaves."""
        free = max(0, self.max_connections - self.connections)
        for desk in self._desks.values():
            desk.room = desk.held + free

    def _collect(self, desk: Any) -> None:
        """Take over the clients the desk handed over: each goes on in Python from where
        the desk's take stopped (transmission, when it agreed on a session)."""
        for fd, family, since, state, outcome, received, unsent, peer in desk.collect():
            if peer is None:
                peer = f"unix#{self.accepted}"
            self.accepted += 1
            if outcome == ENDED:  # (served and ended there: DISC, or gone)
                if log.isEnabledFor(logging.INFO):
                    _log_connected(peer, agreed(Session(self.export), state), tls=False)
                    log.info("%s: closed", peer)
                continue
            # (type and family given: no system calls to find them)
            conn = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK, 0, fd)
            if self._stopping:
                conn.close()
                continue
            ch = Channel(conn, self.loop)
            if received:
                ch.preload(received)
            self._channels.add(ch)
            if outcome == AGREED and unsent is None:  # (the usual way: straight on)
                self._serve(ch, peer, agreed(Session(self.export), state))
            else:
                # (the time limit counts from the accept, not from here)
                self._fed_negotiation(ch, peer).resume(state, outcome, unsent,
                                                       since + self.handshake_timeout)
        self._make_room()

    def _acceptable(self, lsock: socket.socket) -> None:
        """The listener is readable: take the connections waiting (a few per turn, so
        that a flood of them does not starve the clients already served), and those its
        desk handed over."""
        desk = self._desks.get(lsock.fileno())
        if desk is not None:
            wanted = desk.wants_accept
            self._collect(desk)
            if not wanted:  # (the desk accepts; it says when it could not)
                return
        for _ in range(ACCEPTS_PER_TURN):
            try:
                conn, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                fd = lsock.fileno()
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("accept: %s; pausing", exc)
                    self.loop.remove_reader(fd)
                    self._paused[fd] = self.loop.call_later(ACCEPT_PAUSE, self._resume,
                                                            lsock)
                    return
                if exc.errno in (errno.EBADF, errno.EINVAL, errno.ENOTSOCK):
                    log.error("accept: %s; this listener stops", exc)
                    if fd >= 0:
                        self.loop.remove_reader(fd)
                    return
                log.warning("accept: %s", exc)  # (ECONNABORTED and the like: that one only)
                continue
            if self.connections >= self.max_connections or self._stopping:
                conn.close()
                continue
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                peer = f"{addr[0]}:{addr[1]}"
            else:
                peer = f"unix#{self.accepted}"
            self.accepted += 1
            self._start_client(conn, peer)

    def _resume(self, lsock: socket.socket) -> None:
        self._paused.pop(lsock.fileno(), None)
        self.loop.add_reader(lsock.fileno(), self._acceptable, lsock)

    def _start_client(self, conn: socket.socket, peer: str, *, old: bool = False) -> None:
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        elif conn.family == socket.AF_UNIX:
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SEND_BUFFER)
            except OSError:
                pass  # the default then; it works, only slower for large reads
        ch = Channel(conn, self.loop)
        self._channels.add(ch)
        if old or self.tls is not None:
            self._own(self._client(ch, peer, old=old))
            return
        self._fed_negotiation(ch, peer).start()
        if self._desks:
            self._make_room()

    def _fed_negotiation(self, ch: Channel, peer: str) -> FedNegotiation:
        """The client's handshake, from its socket's readiness callback (started or
        resumed by the caller), under the server's time limit."""
        handshake = FedNegotiation(
            ch, self.export, lambda result: self._negotiated(handshake, ch, peer, result),
            timeout=self.handshake_timeout, compiled=self._compiled_take)
        self._handshakes.add(handshake)
        self._start_sweep()
        return handshake

    def _start_sweep(self) -> None:
        if self._sweep is None:
            period = max(0.01, min(1.0, self.handshake_timeout / 4))
            self._sweep = Ticker.of(self.loop).every(period, self._expire_handshakes)

    def _expire_handshakes(self) -> None:
        """End the handshakes past their time limit (each then late by at most the
        sweep's period), the desks' too."""
        now = time.monotonic()
        for handshake in [h for h in self._handshakes if h.deadline <= now]:
            handshake.expire()
        for desk in self._desks.values():
            expired = desk.expire(now - self.handshake_timeout)
            if expired:
                log.info("%d client(s) closed: the handshake took longer than %gs",
                         expired, self.handshake_timeout)
                self._make_room()
            if desk.held:  # (handed over, with the report lost: a listener paused)
                self._collect(desk)

    def _negotiated(self, handshake: FedNegotiation, ch: Channel, peer: str,
                    result: Session | bool | BaseException) -> None:
        self._handshakes.discard(handshake)
        if isinstance(result, Session) and not self._stopping:
            self._serve(ch, peer, result)
            return
        if isinstance(result, Dropped):
            log.warning("%s: dropping client during handshake: %s", peer, result)
        self._closed(ch, peer)

    def _serve(self, ch: Channel, peer: str, session: Session) -> None:
        """Transmission, from the channel's readiness callback until it needs a task."""
        conn = self._connected(ch, peer, session)
        self._untasked.add(conn)
        conn.start(lambda serving: self._give_task(conn, serving), lambda: self._ended(conn))

    def _own(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in a task the server holds until it ends (stop awaits them)."""
        task = self.loop.create_task(coro)
        self._clients.add(task)
        task.add_done_callback(self._clients.discard)

    def _give_task(self, conn: Connection, serving: Coroutine[Any, Any, None]) -> None:
        """A connection served with no task needs one now (Connection.start)."""
        self._untasked.discard(conn)
        self._own(self._served(conn, serving))

    def _connected(self, ch: Channel, peer: str, session: Session) -> Connection:
        conn = Connection(ch, session, peer, pool=self.pool, loop=self.loop)
        _log_connected(peer, session, tls=ch.tls)
        self._connections.add(conn)
        return conn

    async def _served(self, conn: Connection, serving: Coroutine[Any, Any, None]) -> None:
        try:
            await serving
        except Exception:  # a bug: lose this client, keep the server
            log.exception("%s: connection failed", conn.peer)
        finally:
            self._ended(conn)

    def _ended(self, conn: Connection) -> None:
        """A connection is over: its channel closes."""
        self._untasked.discard(conn)
        self._connections.discard(conn)
        if not self._connections:
            self.pool.trim()  # idle: the memory goes back now
        self._closed(conn.ch, conn.peer)

    def _closed(self, ch: Channel, peer: str) -> None:
        self._channels.discard(ch)
        ch.close()
        log.info("%s: closed", peer)
        if self._desks:
            self._make_room()

    # ------------------------------------------------------------------ fd passing
    def listen_fd_passing(self, path: str, *, old: bool = False) -> str:
        """Take connections another process hands over on the fd-passing socket at
        ``path`` (:mod:`blktap.transport.fdreceiver`; the message's text is logged):
        each gets the fixed newstyle handshake, or with ``old`` the oldstyle one (as
        the reference's ``nbdserver-new`` and ``nbdserver`` sockets)."""
        receiver = FdReceiver(path, lambda sock, _payload: self.adopt(sock, old=old))
        receiver.listen()
        self._receivers.append(receiver)
        return path

    def adopt(self, sock: socket.socket, *, old: bool = False) -> None:
        """Serve a connected socket as a client (the server owns it from now on);
        Refused (the socket closed) while stopping or full."""
        if self._stopping or self.connections >= self.max_connections:
            sock.close()
            raise Refused("the server is stopping" if self._stopping else
                          f"the server has {self.max_connections} clients already")
        peer = f"passed#{self.passed}{' (oldstyle)' if old else ''}"
        self.passed += 1
        self._start_client(sock, peer, old=old)

    # ------------------------------------------------------------------ clients
    async def _client(self, ch: Channel, peer: str, *, old: bool = False) -> None:
        """Negotiate in a task (oldstyle, or where TLS is required: STARTTLS upgrades the
        socket halfway), then serve transmission in it."""
        session: Session | None = None
        try:
            # asyncio.timeout, not wait_for, which on 3.11 can lose a cancellation
            async with asyncio.timeout(self.handshake_timeout):
                if old:
                    session = await oldstyle(ch, self.export, self.tls)
                else:
                    session = await negotiate(ch, self.export, self.tls)
        except (TimeoutError, Closed):
            pass
        except Dropped as exc:
            log.warning("%s: dropping client during handshake: %s", peer, exc)
        except Exception:  # a bug: lose this client, keep the server
            log.exception("%s: handshake failed", peer)
        if session is None or self._stopping:
            self._closed(ch, peer)
            return
        conn = self._connected(ch, peer, session)
        await self._served(conn, conn.serve())

    @property
    def connections(self) -> int:
        """Clients connected: negotiating (here, or at a desk) or served."""
        held = 0
        for desk in self._desks.values():
            held += desk.held
        return len(self._clients) + len(self._handshakes) + len(self._untasked) + held

    # ------------------------------------------------------------------ shutdown
    async def stop(self) -> None:
        """Stop accepting, finish what is in flight, close every connection."""
        self._stopping = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for timer in self._paused.values():
            timer.cancel()
        self._paused.clear()
        self._close_desks()
        for sock, path in self._listeners:
            if sock.fileno() >= 0:
                self.loop.remove_reader(sock.fileno())
            sock.close()
            if path:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        self._listeners.clear()
        receivers, self._receivers = self._receivers, []
        for receiver in receivers:
            await receiver.stop()
        # Clients still negotiating are dropped; connected ones stop reading, and the
        # requests they have in flight complete and are answered before they close.
        serving = {conn.ch for conn in self._connections}
        for ch in list(self._channels):
            if ch not in serving:
                ch.close()
        for conn in list(self._connections):
            conn.stop_reading()
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)
