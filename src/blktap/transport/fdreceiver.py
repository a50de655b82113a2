"""Receiving descriptors over a UNIX socket: the protocol of the reference's fd receivers
(``td-fdreceiver``), by which a management tool hands tapdisk a connected socket.

A sender connects to the listening socket and sends ONE message: a payload (a text, NUL
terminated, at most :data:`MAX_PAYLOAD` bytes) with one descriptor in SCM_RIGHTS. The
receiver reads it with one ``recvmsg`` and closes the connection; nothing is answered.
What the payload means is the user's: the NBD server's sockets only log it, the NBD
client's socket names the descriptor with it.

Bad senders are logged and cost nothing else: a message without a descriptor, with
several (the first is kept, the others closed), with one that is not a stream socket
(closed), or a connection that sends nothing within :data:`RECEIVE_TIMEOUT` (closed).
Every connection is read by its own task, so a silent sender delays nobody; at most
:data:`MAX_WAITING` may be waiting at once, the next one evicting the oldest. A
descriptor received is always either handed over or closed.
"""

from __future__ import annotations

import array
import asyncio
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable

from blktap.transport.sockio import close_listener, unix_listener

log = logging.getLogger("blktap.fdreceiver")

MAX_PAYLOAD = 16 << 10  # the reference's message buffer
RECEIVE_TIMEOUT = 10.0  # seconds a sender has, from its connect, to send its message
MAX_WAITING = 32  # connections still to send their message; the next evicts the oldest
# Room for this many descriptors in one message, so that extra ones arrive and are closed
# by us (a message with more loses the rest to the kernel, which closes them).
MAX_FDS = 16
_FD_SIZE = array.array("i").itemsize

# What a receiver's user does with a descriptor: ``(sock, payload)``; it owns ``sock``
# from then on (if it raises, the receiver closes it).
OnSocket = Callable[[socket.socket, bytes], None]


class Refused(Exception):
    """The message is not one to act on (the reason is the message)."""


def payload_text(payload: bytes, limit: int = 200) -> str:
    """The payload as a log line shows it."""
    text = payload.decode("utf-8", "backslashreplace")
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _stream_socket(fd: int) -> socket.socket:
    """The descriptor as a socket, if it is a stream socket; Refused (and closed) if not."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode):
            raise Refused("the descriptor is not a socket")
        sock = socket.socket(fileno=fd)
    except Refused:
        os.close(fd)
        raise
    except OSError as exc:
        os.close(fd)
        raise Refused(f"the descriptor is not a usable socket: {exc}") from None
    if sock.type != socket.SOCK_STREAM:
        sock.close()
        raise Refused(f"the descriptor is a {sock.type.name} socket, not a stream socket")
    return sock


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class FdReceiver:
    """One fd-receiving socket at ``path``; ``on_socket`` gets each socket received."""

    def __init__(self, path: str, on_socket: OnSocket, *,
                 timeout: float = RECEIVE_TIMEOUT, max_waiting: int = MAX_WAITING) -> None:
        self.path = path
        self.on_socket = on_socket
        self.timeout = timeout
        self.max_waiting = max_waiting
        self.name = os.path.basename(path)
        self.received = 0  # descriptors handed over
        self.refused = 0  # messages (or silent connections) that handed nothing over
        self._sock: socket.socket | None = None
        self._accept: asyncio.Task | None = None
        self._waiting: dict[asyncio.Task, None] = {}  # oldest first
        self._loop: asyncio.AbstractEventLoop | None = None

    def listen(self) -> str:
        """Bind and start accepting (from the event loop)."""
        self._loop = asyncio.get_running_loop()
        sock = unix_listener(self.path)
        sock.setblocking(False)
        self._sock = sock
        self._accept = self._loop.create_task(self._accept_loop())
        return self.path

    async def stop(self) -> None:
        """Stop accepting, drop the connections still to send, remove the socket file."""
        tasks = list(self._waiting)
        if self._accept is not None:
            tasks.append(self._accept)
            self._accept = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._waiting.clear()
        if self._sock is not None:
            close_listener(self._sock, self.path)
            self._sock = None

    # ------------------------------------------------------------------ connections
    async def _accept_loop(self) -> None:
        loop = self._loop
        assert loop is not None and self._sock is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("%s: accept: %s", self.name, exc)
                    await asyncio.sleep(0 if self._evict_oldest() else 0.1)
                    continue
                raise
            while len(self._waiting) >= self.max_waiting:
                self._evict_oldest()
            task = loop.create_task(self._serve(conn))
            self._waiting[task] = None
            task.add_done_callback(lambda t: self._waiting.pop(t, None))

    def _evict_oldest(self) -> bool:
        if not self._waiting:
            return False
        task = next(iter(self._waiting))
        del self._waiting[task]
        task.cancel()
        self.refused += 1
        log.warning("%s: more than %d senders waiting; dropping the oldest", self.name,
                    self.max_waiting)
        return True

    async def _serve(self, conn: socket.socket) -> None:
        try:
            conn.setblocking(False)
            try:
                async with asyncio.timeout(self.timeout):
                    payload, fds, truncated = await self._receive(conn)
            except TimeoutError:
                self.refused += 1
                log.warning("%s: a sender sent nothing within %.0f s; closed", self.name,
                            self.timeout)
                return
            except OSError as exc:
                self.refused += 1
                log.warning("%s: receiving: %s", self.name, exc)
                return
            self._take(payload, fds, truncated)
        except Exception:  # a bug: lose this message, keep the receiver
            log.exception("%s: receiving failed", self.name)
        finally:
            conn.close()

    async def _receive(self, conn: socket.socket) -> tuple[bytes, list[int], bool]:
        """One recvmsg (waiting for it from the loop): payload, descriptors, whether the
        kernel had to drop descriptors that did not fit."""
        loop = self._loop
        assert loop is not None
        while True:
            try:
                data, ancdata, flags, _ = conn.recvmsg(
                    MAX_PAYLOAD, socket.CMSG_SPACE(MAX_FDS * _FD_SIZE),
                    socket.MSG_CMSG_CLOEXEC)
                break
            except (BlockingIOError, InterruptedError):
                pass
            fut = loop.create_future()
            loop.add_reader(conn.fileno(), _wake, fut)
            try:
                await fut
            finally:
                loop.remove_reader(conn.fileno())
        fds: list[int] = []
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(cdata[: len(cdata) - len(cdata) % _FD_SIZE])
                fds.extend(got)
        return data, fds, bool(flags & socket.MSG_CTRUNC)

    def _take(self, data: bytes, fds: list[int], truncated: bool) -> None:
        payload = data.split(b"\0", 1)[0]
        if not fds:
            self.refused += 1
            if data:
                log.warning("%s: a message of %d bytes without a descriptor (%s); "
                            "ignored", self.name, len(data), payload_text(payload))
            else:
                log.info("%s: a sender closed without sending", self.name)
            return
        if len(fds) > 1 or truncated:
            log.warning("%s: %s descriptors in one message; the first is kept, the others "
                        "closed", self.name, f"more than {MAX_FDS}" if truncated
                        else len(fds))
            for fd in fds[1:]:
                os.close(fd)
        try:
            sock = _stream_socket(fds[0])
        except Refused as exc:
            self.refused += 1
            log.warning("%s: %s (payload %s); closed", self.name, exc, payload_text(payload))
            return
        log.info("%s: received a descriptor (payload %s)", self.name, payload_text(payload))
        try:
            self.on_socket(sock, payload)
        except Refused as exc:
            self.refused += 1
            sock.close()
            log.warning("%s: %s; closed", self.name, exc)
            return
        except BaseException:
            sock.close()
            raise
        self.received += 1


__all__ = ["MAX_PAYLOAD", "RECEIVE_TIMEOUT", "FdReceiver", "Refused", "payload_text"]
