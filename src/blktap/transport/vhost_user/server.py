"""The vhost-user-blk listener: one UNIX socket, one front-end at a time.

QEMU connects (``-chardev socket,path=SOCK,reconnect=1``), drives the device through a
:class:`~.device.Session`, and when it goes away (EOF, or we dropped it) the next
connection is accepted. Connections beyond the one being served wait in the backlog.
:meth:`VhostUserServer.stop` closes the listener, ends the session (its requests in
flight finish first) and removes the socket file; the VBD is the caller's to close.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat

from blktap.errors import BlktapError
from blktap.tapdisk.vbd import VBD
from blktap.transport.sockio import close_listener
from blktap.transport.vhost_user.blk import BlkDevice, BlkOptions
from blktap.transport.vhost_user.device import Session

log = logging.getLogger("blktap.vhost")


def bind_unix(path: str) -> socket.socket:
    """A listening UNIX socket at ``path``; a stale socket file (nobody listening) is
    replaced, anything else there is refused."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise BlktapError(f"{path}: exists and is not a socket", errno.EEXIST)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
        else:
            raise BlktapError(f"{path}: another server is listening there", errno.EADDRINUSE)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(8)
    except OSError as exc:
        sock.close()
        raise BlktapError(f"{path}: {os.strerror(exc.errno or errno.EIO)}",
                          exc.errno) from None
    sock.setblocking(False)
    return sock


class VhostUserServer:
    def __init__(self, vbd: VBD, options: BlkOptions | None = None, *,
                 inflight: bool = True) -> None:
        self.vbd = vbd
        self.options = options or BlkOptions()
        self.inflight = inflight
        # One device per socket, across front-end connections: the cache mode the guest
        # chose (SET_CONFIG) survives QEMU reconnecting, which does not send it again.
        self.device = BlkDevice(vbd, self.options)
        self.loop = asyncio.get_running_loop()
        self.path = ""
        self.session: Session | None = None
        self.sessions = 0
        self._sock: socket.socket | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False

    def listen(self, path: str) -> str:
        if self._sock is not None:
            raise BlktapError("this server already listens", errno.EBUSY)
        self._sock = bind_unix(path)
        self.path = path
        self._task = self.loop.create_task(self._serve())
        return path

    async def _serve(self) -> None:
        assert self._sock is not None
        while not self._stopping:
            try:
                conn, _ = await self.loop.sock_accept(self._sock)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("%s: accept: %s; pausing", self.path, exc)
                    await asyncio.sleep(0.1)
                    continue
                raise
            self.sessions += 1
            name = f"{os.path.basename(self.path)}#{self.sessions}"
            session = Session(conn, self.device, name=name, inflight_ok=self.inflight)
            self.session = session
            log.info("%s: front-end connected", name)
            try:
                await session.run()
            except Exception:  # a bug: lose this front-end, keep the listener
                log.exception("%s: session failed", name)
            finally:
                self.session = None
            log.info("%s: front-end gone (%d messages, %d requests%s)", name,
                     session.messages, sum(vq.served for vq in session.queues),
                     f"; {session.problem}" if session.problem else "")

    async def stop(self) -> None:
        """Stop listening, end the session (after its requests in flight), clean up."""
        self._stopping = True
        task = self._task
        if self.session is not None:
            self.session.disconnect()
        elif task is not None:
            task.cancel()
        if task is not None:
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._sock is not None:
            close_listener(self._sock, self.path)
            self._sock = None
