"""A member of a rate group: the valve's side of the group's socket.

It holds the credit the group granted, says what it waits for (:meth:`want`), and hands
back what it did not use when it closes. If the group's daemon is not there (not started
yet, restarted), it connects again every :data:`RECONNECT` seconds and the requests held
by the valve keep waiting, for :data:`GRACE` seconds: past that, the valve lets them
pass on its own limits alone (the group cannot be enforced without its daemon, and a
disk must not hang, nor its close, because a daemon is gone), until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time

from blktap.rated.proto import GRANT, REPORT

log = logging.getLogger("blktap.valve")

RECONNECT = 2.0  # seconds, as the reference's valve
GRACE = 10.0  # seconds without the daemon before its members stop waiting for it


class GroupMember:
    def __init__(self, path: str, name: str = "") -> None:
        self.path = path
        self.name = name or path
        self.credit = 0  # bytes granted and not spent
        self.need = 0  # what was last reported (or is to be)
        self.granted = 0  # in all, for stats
        self.changed = asyncio.Event()  # set on every grant (and on connect)
        self.connected = False
        self._sock: socket.socket | None = None
        self._sent_need = -1
        self._task: asyncio.Task | None = None
        self._sender: asyncio.Task | None = None
        self._warned = False
        self._down_since: float | None = None  # when it lost (or never had) the daemon

    def down_for(self) -> float:
        """Seconds without the daemon (0 while connected)."""
        if self.connected or self._down_since is None:
            return 0.0
        return time.monotonic() - self._down_since

    @property
    def started(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        self._down_since = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._run())

    # ------------------------------------------------------------------ credit
    def spend(self, n: int) -> None:
        self.credit -= n

    def want(self, need: int) -> None:
        """Wait for ``need`` bytes more than the credit held (a level)."""
        self.need = max(0, need)
        self._report()

    def _report(self, done: int = 0) -> None:
        if not self.connected or (self.need == self._sent_need and not done):
            return
        if self._sender is not None and not self._sender.done():
            return  # the sender sends the latest level when it is done
        self._sender = asyncio.get_running_loop().create_task(self._send(done))

    async def _send(self, done: int) -> None:
        loop = asyncio.get_running_loop()
        while self.connected and self._sock is not None and (
                self.need != self._sent_need or done):
            need = self.need
            try:
                await loop.sock_sendall(self._sock, REPORT.pack(need, done))
            except OSError:
                self._drop()
                return
            self._sent_need, done = need, 0

    # ------------------------------------------------------------------ connection
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, self.path)
            except OSError as exc:
                sock.close()
                if not self._warned:
                    log.warning("%s: rate group %s not reachable (%s); held requests "
                                "wait, retrying every %.0f s", self.name, self.path,
                                exc.strerror, RECONNECT)
                    self._warned = True
                await asyncio.sleep(RECONNECT)
                continue
            if self._warned:
                log.warning("%s: rate group %s reached", self.name, self.path)
                self._warned = False
            self._sock, self.connected, self._sent_need = sock, True, -1
            self._down_since = None
            self._report()
            self.changed.set()
            buf = bytearray()
            try:
                while True:
                    data = await loop.sock_recv(sock, 4096)
                    if not data:
                        break
                    buf += data
                    while len(buf) >= GRANT.size:
                        (credit,) = GRANT.unpack_from(buf)
                        del buf[: GRANT.size]
                        self.credit += credit
                        self.granted += credit
                        # The daemon lowered our need by the grant: the next level
                        # we want is news to it, even if it equals the last we sent.
                        self._sent_need = -1
                        self.changed.set()
            except OSError as exc:
                log.warning("%s: rate group %s: %s", self.name, self.path, exc)
            self._drop()
            await asyncio.sleep(RECONNECT)

    def _drop(self) -> None:
        if self.connected:
            self._down_since = time.monotonic()
        self.connected = False
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def close(self) -> None:
        """Hand the unused credit back and leave the group."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sender is not None:
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await self._sender
        sock = self._sock
        if sock is not None and self.connected:
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(
                    sock, REPORT.pack(0, max(0, self.credit))), 1.0)
            self.credit = 0
        self._drop()
