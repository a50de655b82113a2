"""The ``blktap rated`` server: one group on one UNIX socket.

Each connection is a member. Its reports are read as they come; a distributor task
shares the credit out every :data:`TICK` seconds while anybody waits, and sleeps
otherwise. A member that sends garbage (a short or oversized report) is disconnected;
the others go on. A member that leaves (or is paused: its valve closes) hands back the
credit it did not use, which goes to the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import time
from collections.abc import Callable

from blktap.rated.group import Group
from blktap.rated.proto import GRANT, MAX_VALUE, REPORT

log = logging.getLogger("blktap.rated")

TICK = 0.01  # seconds between distributions while members wait
MAX_MEMBERS = 1024


class RatedServer:
    def __init__(self, rate: int, cap: int, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.group = Group(rate, cap, clock)
        self.path: str | None = None
        self._sock: socket.socket | None = None
        self._accept: asyncio.Task | None = None
        self._distributor: asyncio.Task | None = None
        self._members: dict[int, tuple[asyncio.Task, socket.socket]] = {}
        self._next_key = 0
        self._wake = asyncio.Event()
        self.members_seen = 0

    async def start(self, path: str) -> None:
        """Listen on ``path`` (0600 in a 0700 directory, created if missing)."""
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        if os.path.lexists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # a dead daemon's socket
            else:
                raise OSError(errno.EADDRINUSE, f"{path}: a rate daemon already serves this group")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        sock.listen(64)
        sock.setblocking(False)
        self._sock, self.path = sock, path
        loop = asyncio.get_running_loop()
        self._accept = loop.create_task(self._accept_loop())
        self._distributor = loop.create_task(self._distribute_loop())

    async def stop(self) -> None:
        tasks = [self._accept, self._distributor, *(t for t, _ in self._members.values())]
        for task in tasks:
            if task is not None:
                task.cancel()
        for task in tasks:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            if self.path:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._sock is not None
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            if len(self._members) >= MAX_MEMBERS:
                log.warning("rated: %d members already; refusing another", MAX_MEMBERS)
                conn.close()
                continue
            conn.setblocking(False)
            key = self._next_key
            self._next_key += 1
            self.group.join(key)
            task = loop.create_task(self._member(key, conn))
            self._members[key] = (task, conn)
            task.add_done_callback(lambda _t, k=key: self._members.pop(k, None))

    async def _member(self, key: int, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self.members_seen += 1
        buf = bytearray()
        try:
            while True:
                data = await loop.sock_recv(conn, 4096)
                if not data:
                    return
                buf += data
                while len(buf) >= REPORT.size:
                    need, done = REPORT.unpack_from(buf)
                    del buf[: REPORT.size]
                    if need > MAX_VALUE or done > MAX_VALUE:
                        log.warning("rated: a member sent an impossible report; "
                                    "disconnecting it")
                        return
                    self.group.report(key, need, done)
                    self._wake.set()
        except OSError as exc:
            log.info("rated: member lost: %s", exc)
        finally:
            self.group.leave(key)
            conn.close()

    async def _distribute_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.group.waiting:
                self._wake.clear()
                await self._wake.wait()
            grants = self.group.distribute()
            for key, credit in grants.items():
                member = self._members.get(key)
                if member is None:
                    continue
                task, conn = member
                try:
                    await asyncio.wait_for(loop.sock_sendall(conn, GRANT.pack(credit)), 5)
                except (OSError, TimeoutError):
                    task.cancel()  # it leaves the group and closes its socket
            await asyncio.sleep(TICK)
