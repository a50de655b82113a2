"""The event channel device (``/dev/xen/evtchn``): the ring's doorbell.

Facts from linux ``include/uapi/xen/evtchn.h`` (``guests-formats-filters.md`` §1d):
BIND_INTERDOMAIN ``{u32 remote_domain; u32 remote_port}`` returns the local port;
UNBIND and NOTIFY take ``{u32 port}``. A port that fired is masked and queued: ``read()``
yields the pending ports (u32 each), and writing a port back unmasks it. One descriptor
per ring here, so a readable descriptor means "this ring's frontend rang".

:class:`Notifier` is the interface the ring logic uses; tests put a pipe-backed stand-in
in its place.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from typing import Protocol

EVTCHN_PATH = "/dev/xen/evtchn"

IOCTL_EVTCHN_BIND_INTERDOMAIN = 0x00084501
IOCTL_EVTCHN_UNBIND = 0x00044503
IOCTL_EVTCHN_NOTIFY = 0x00044504

_PORT = struct.Struct("=I")


class Notifier(Protocol):
    """One bound event channel."""

    def fileno(self) -> int:
        """Readable when the other end notified."""

    def clear(self) -> None:
        """Consume the pending notifications and re-arm (unmask) the channel."""

    def notify(self) -> None:
        """Notify the other end."""

    def close(self) -> None:
        """Unbind."""

    def doorbell(self) -> tuple[int, int] | None:
        """The device's descriptor and the local port, for a compiled pass to clear and
        notify by itself (as :meth:`clear` and :meth:`notify`); None if only these
        methods can."""


class EventChannel:
    """An interdomain event channel bound through ``/dev/xen/evtchn``."""

    def __init__(self, domid: int, remote_port: int, path: str = EVTCHN_PATH) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            self.port = fcntl.ioctl(self.fd, IOCTL_EVTCHN_BIND_INTERDOMAIN,
                                    bytearray(struct.pack("=II", domid, remote_port)), True)
        except BaseException:
            os.close(self.fd)
            raise
        self.domid = domid
        self.remote_port = remote_port

    def fileno(self) -> int:
        return self.fd

    def clear(self) -> None:
        want = 64 * _PORT.size
        while True:
            try:
                data = os.read(self.fd, want)
            except BlockingIOError:
                return
            if not data:
                return
            # Unmask what fired (only our port can be queued on this descriptor).
            os.write(self.fd, data[: len(data) - len(data) % _PORT.size])
            if len(data) < want:
                # The device gave all it had queued: no read just to hear EAGAIN (in a PV
                # dom0 every system call goes through Xen). An event after this read makes
                # the descriptor readable again, and the loop calls us again.
                return

    def notify(self) -> None:
        fcntl.ioctl(self.fd, IOCTL_EVTCHN_NOTIFY, _PORT.pack(self.port))

    def doorbell(self) -> tuple[int, int] | None:
        return self.fd, self.port

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            fcntl.ioctl(self.fd, IOCTL_EVTCHN_UNBIND, _PORT.pack(self.port))
        except OSError as exc:  # closing the descriptor unbinds anyway
            if exc.errno not in (errno.ENOTCONN, errno.EINVAL):
                raise
        finally:
            os.close(self.fd)
            self.fd = -1


__all__ = ["EVTCHN_PATH", "EventChannel", "Notifier"]
