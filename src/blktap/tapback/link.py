"""How tapback reaches the tapdisk that serves a VBD.

The toolstack names the tapdisk in the backend directory: ``physical-device-path`` is the
VBD's NBD socket, ``<rundir>/nbd<pid>.<minor>`` (what XenServer's sm and our hotplug script
write), which gives the control socket ``<rundir>/ctl<pid>`` and the minor. Older writers
name a minor only (``.../tapdisk/tapdisk-<minor>``, ``/dev/xen/blktap-2/tapdev<minor>``, or
``physical-device`` = hex ``major:minor``): the tapdisk holding that minor is then found by
listing the tapdisks, as the reference does.

:class:`ControlLink` speaks the control protocol through :class:`TapCtl` (blocking calls,
run in a thread so that one slow tapdisk does not hold up the other VBDs).
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
from dataclasses import dataclass
from typing import Protocol

from blktap.control import message as m
from blktap.control.client import TapCtl
from blktap.control.rundir import RunDir
from blktap.errors import BlktapError

_NBD_RE = re.compile(r"nbd(\d+)\.(\d+)")
_MINOR_RE = re.compile(r"(?:tapdisk-|tapdev)(\d+)")


@dataclass(frozen=True)
class Target:
    """A tapdisk (its id, in its runtime directory) and the minor that serves the VBD."""

    rundir: str
    tid: int
    minor: int


def parse_target(path: str | None, device: str | None = None,
                 lookup: MinorLookup | None = None) -> Target:
    """The tapdisk behind ``physical-device-path`` (or ``physical-device``). Raises
    BlktapError: ENOENT when neither key is there yet, EINVAL when they name no tapdisk."""
    if path:
        base = os.path.basename(path)
        hit = _NBD_RE.fullmatch(base)
        if hit:
            return Target(os.path.dirname(path) or ".", int(hit.group(1)), int(hit.group(2)))
        hit = _MINOR_RE.fullmatch(base)
        if hit and lookup is not None:
            parent = os.path.dirname(os.path.dirname(path)) if base.startswith("tapdisk-") \
                else None
            return lookup(int(hit.group(1)), parent)
        if not device:
            raise BlktapError(f"physical-device-path {path!r} names no tapdisk "
                              "(expected <dir>/nbd<pid>.<minor>)", errno.EINVAL)
    if device:
        major, sep, minor = device.partition(":")
        try:
            number = int(minor, 16)
            int(major, 16)
        except ValueError:
            raise BlktapError(f"malformed physical-device {device!r}", errno.EINVAL) from None
        if not sep or lookup is None:
            raise BlktapError(f"malformed physical-device {device!r}", errno.EINVAL)
        return lookup(number, None)
    raise BlktapError("no physical-device-path yet", errno.ENOENT)


class MinorLookup(Protocol):
    def __call__(self, minor: int, rundir: str | None) -> Target: ...


def find_minor(minor: int, rundir: str | None) -> Target:
    """The tapdisk that lists ``minor`` (blocking: lists every tapdisk)."""
    ctl = TapCtl(RunDir(rundir))
    for entry in ctl.list_all():
        if entry.minor == minor and entry.pid is not None:
            return Target(ctl.rundir.path, entry.pid, minor)
    raise BlktapError(f"no tapdisk serves minor {minor}", errno.ESRCH)


class TapdiskLink(Protocol):
    """What the state machine needs from a tapdisk."""

    async def locate(self, path: str | None, device: str | None) -> Target: ...

    async def disk_info(self, target: Target) -> m.Image: ...

    async def connect(self, target: Target, blkif: m.Blkif) -> bool:
        """True if the tapdisk connected the ring now, False if it already served it
        (EALREADY: we were restarted). Other failures raise BlktapError."""
        ...

    async def disconnect(self, target: Target, domid: int, devid: int) -> None: ...


class ControlLink:
    """:class:`TapdiskLink` over the tapdisk control sockets."""

    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = timeout

    async def locate(self, path: str | None, device: str | None) -> Target:
        if path and _NBD_RE.fullmatch(os.path.basename(path)):
            return parse_target(path, device)
        return await asyncio.to_thread(parse_target, path, device, find_minor)

    @staticmethod
    def _ctl(target: Target) -> TapCtl:
        return TapCtl(RunDir(target.rundir))

    async def disk_info(self, target: Target) -> m.Image:
        return await asyncio.to_thread(self._ctl(target).disk_info, target.tid, target.minor,
                                       self.timeout)

    async def connect(self, target: Target, blkif: m.Blkif) -> bool:
        try:
            await asyncio.to_thread(self._ctl(target).xen_connect, target.tid, target.minor,
                                    blkif, self.timeout)
        except BlktapError as exc:
            if exc.errno == errno.EALREADY:
                return False
            raise
        return True

    async def disconnect(self, target: Target, domid: int, devid: int) -> None:
        await asyncio.to_thread(self._ctl(target).xen_disconnect, target.tid, domid, devid,
                                target.minor, self.timeout)
