"""Connections to NBD servers handed to this process by name, for ``nbd:NAME``.

A management tool that has connected a socket to an NBD server (one tapdisk cannot reach,
or should not dial itself) passes it to tapdisk's ``nbdclient<pid>`` socket
(:mod:`blktap.transport.fdreceiver`) with the name as the message's text. The ``nbd``
driver opened on ``nbd:NAME`` then takes it (:mod:`blktap.nbdclient.address`): once,
since the socket is the connection itself.

As the reference (its ``N_PASSED_FDS``), a process keeps at most :data:`MAX_PASSED` of
them. A name given again replaces the socket kept under it (the old one is closed); one
more name than that is refused (closed). Names are what ``nbd:NAME`` can say: not
empty, at most :data:`MAX_NAME` bytes of UTF-8, printable, without ``/`` or ``:``
(which would make the path a socket path or ``host:port``).

The registry is per process (:func:`passed_sockets`): the receiver puts on the event
loop, the driver takes from a worker thread, hence the lock.
"""

from __future__ import annotations

import socket
import threading

from blktap.transport.fdreceiver import Refused

MAX_PASSED = 10
MAX_NAME = 255


def check_name(name: str) -> str | None:
    """Why ``name`` cannot name a passed socket, or None if it can."""
    if not name:
        return "an empty name"
    if len(name.encode()) > MAX_NAME:
        return f"a name longer than {MAX_NAME} bytes"
    if "/" in name or ":" in name:
        return f"the name {name!r} has a '/' or ':' (nbd:NAME would not reach it)"
    if not name.isprintable() or any(c.isspace() for c in name):
        return f"the name {name!r} has blanks or control characters"
    return None


class PassedSockets:
    """Sockets by name, each taken at most once."""

    def __init__(self, limit: int = MAX_PASSED) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._by_name: dict[str, socket.socket] = {}

    def put(self, name: str, sock: socket.socket) -> bool:
        """Keep ``sock`` under ``name`` (this owns it from now on, unless Refused is
        raised: the caller closes it then); True if it replaced one (closed)."""
        why = check_name(name)
        if why is not None:
            raise Refused(why)
        with self._lock:
            old = self._by_name.pop(name, None)
            if old is None and len(self._by_name) >= self.limit:
                raise Refused(f"{self.limit} passed sockets are kept already "
                              f"({', '.join(sorted(self._by_name))}); {name!r} refused")
            self._by_name[name] = sock
        if old is not None:
            old.close()
        return old is not None

    def take(self, name: str) -> socket.socket | None:
        """The socket kept under ``name``, now the caller's; None if there is none."""
        with self._lock:
            return self._by_name.pop(name, None)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._by_name)

    def close_all(self) -> None:
        with self._lock:
            socks, self._by_name = list(self._by_name.values()), {}
        for sock in socks:
            sock.close()


_PROCESS = PassedSockets()


def passed_sockets() -> PassedSockets:
    """This process's registry."""
    return _PROCESS


__all__ = ["MAX_NAME", "MAX_PASSED", "PassedSockets", "check_name", "passed_sockets"]
