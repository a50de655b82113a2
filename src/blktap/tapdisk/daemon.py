"""The tapdisk process: one event loop, one I/O engine, the VBDs it serves.

As the reference tapdisk: it creates its control socket ``<run-dir>/ctl<pid>`` and
prints that path on stdout (``tap-ctl spawn`` parses it), serves each VBD over NBD at
``<run-dir>/nbd<pid>.<minor>``, and exits by itself once its last VBD is closed.
SIGINT/SIGTERM close every VBD consistently and exit.

The control protocol (the reference's 544-byte messages) is the tap-ctl issue's; until
it lands, every control message is answered with an ERROR message carrying EOPNOTSUPP,
and VBDs are opened from the command line (``tapdisk --open TYPE:PATH``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
from dataclasses import dataclass

from blktap.control import message
from blktap.control.message import MESSAGE_SIZE
from blktap.errors import BlktapError
from blktap.io import ThreadEngine
from blktap.tapdisk.drivers import open_stack
from blktap.tapdisk.vbd import DEFAULT_TIMEOUT, VBD
from blktap.transport.nbd.server import Export, NbdServer

log = logging.getLogger("blktap.tapdisk")

DEFAULT_RUN_DIR = "/run/blktap-control"


@dataclass
class Disk:
    minor: int
    vbd: VBD
    nbd: NbdServer
    socket: str


class Tapdisk:
    def __init__(self, run_dir: str = DEFAULT_RUN_DIR, threads: int = 16) -> None:
        self.run_dir = run_dir
        self.pid = os.getpid()
        self.engine = ThreadEngine(threads)
        self.disks: dict[int, Disk] = {}
        self.done = asyncio.Event()
        self._ctl: socket.socket | None = None
        self._ctl_task: asyncio.Task | None = None

    @property
    def control_path(self) -> str:
        return os.path.join(self.run_dir, f"ctl{self.pid}")

    def nbd_path(self, minor: int) -> str:
        return os.path.join(self.run_dir, f"nbd{self.pid}.{minor}")

    # ------------------------------------------------------------------ control socket
    def start_control(self) -> str:
        os.makedirs(self.run_dir, exist_ok=True)
        path = self.control_path
        if os.path.lexists(path):
            os.unlink(path)  # our pid: a leftover of an earlier process with it
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(32)
        sock.setblocking(False)
        self._ctl = sock
        self._ctl_task = asyncio.get_running_loop().create_task(self._control_loop())
        return path

    async def _control_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._ctl is not None
        while True:
            conn, _ = await loop.sock_accept(self._ctl)
            loop.create_task(self._control_client(conn))

    async def _control_client(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            msg = b""
            while len(msg) < MESSAGE_SIZE:
                chunk = await asyncio.wait_for(loop.sock_recv(conn, MESSAGE_SIZE - len(msg)),
                                               10)
                if not chunk:
                    return
                msg += chunk
            _, cookie = message.HEADER.unpack_from(msg)
            reply = message.Message(message.MessageType.ERROR, cookie, message.Response(
                errno.EOPNOTSUPP, "control messages are not implemented yet"))
            await loop.sock_sendall(conn, message.encode(reply))
        except (OSError, TimeoutError):
            pass
        finally:
            conn.close()

    # ------------------------------------------------------------------ VBDs
    async def open_vbd(self, minor: int, spec: str, *, read_only: bool = False,
                       timeout: float = DEFAULT_TIMEOUT, direct: bool = True) -> Disk:
        if minor in self.disks:
            raise BlktapError(f"minor {minor} is already open", errno.EEXIST)
        driver = await self.engine.call(open_stack, self.engine, spec, writable=not read_only,
                                        direct=direct)
        vbd = VBD(driver, name=spec, read_only=read_only, timeout=timeout)
        server = NbdServer(Export("", vbd, description=spec))
        path = self.nbd_path(minor)
        try:
            server.listen_unix(path)
        except BaseException:
            await vbd.close()
            raise
        disk = Disk(minor, vbd, server, path)
        self.disks[minor] = disk
        return disk

    async def close_vbd(self, minor: int) -> None:
        disk = self.disks.pop(minor, None)
        if disk is None:
            raise BlktapError(f"minor {minor} is not open", errno.ENOENT)
        try:
            await disk.nbd.stop()
            await disk.vbd.close()
        finally:
            if not self.disks:
                self.done.set()  # the reference exits once its last VBD is gone

    async def shutdown(self) -> None:
        for minor in list(self.disks):
            try:
                await self.close_vbd(minor)
            except (OSError, BlktapError) as exc:
                log.error("closing minor %d: %s", minor, exc)
        if self._ctl_task is not None:
            self._ctl_task.cancel()
        if self._ctl is not None:
            self._ctl.close()
            try:
                os.unlink(self.control_path)
            except OSError:
                pass
        self.engine.close()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.done.set)
        await self.done.wait()
