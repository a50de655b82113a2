"""The Xen blkif transport: a VBD served to a guest's blkfront over a shared ring.

- :mod:`~blktap.transport.xen.structs`: the wire layouts (x86_64, x86_32, native ABIs),
  ring sizes;
- :mod:`~blktap.transport.xen.gntdev`, :mod:`~blktap.transport.xen.evtchn`: the grant and
  event channel devices, behind the small ``Grants`` / ``Notifier`` interfaces;
- :mod:`~blktap.transport.xen.ring`: the back half of the shared ring (indices, events);
- :mod:`~blktap.transport.xen.blkif`: one connected ring serving one VBD.

:func:`connect` is what tapdisk's XENBLKIF_CONNECT does. The devices come from a
:class:`XenDevices` factory: :class:`HostDevices` opens ``/dev/xen/gntdev`` and
``/dev/xen/evtchn``; tests pass their own (guest pages in memory, a pipe for events),
through ``Tapdisk(xen=...)``. See docs/protocols/xen-blkif.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from blktap.tapdisk.vbd import VBD
from blktap.transport.xen.blkif import BlkifRing, BlkifStats
from blktap.transport.xen.evtchn import EventChannel, Notifier
from blktap.transport.xen.gntdev import GntDev, Grants
from blktap.transport.xen.ring import RingCorrupt
from blktap.transport.xen.structs import MAX_INDIRECT_SEGMENTS, MAX_RING_ORDER, abi_for


class XenDevices(Protocol):
    """Where a ring gets its grant device and its event channel."""

    def grants(self) -> Grants: ...

    def bind(self, domid: int, remote_port: int) -> Notifier: ...


class HostDevices:
    """The real devices of a Xen dom0 (or driver domain)."""

    def grants(self) -> Grants:
        return GntDev()

    def bind(self, domid: int, remote_port: int) -> Notifier:
        return EventChannel(domid, remote_port)


def connect(vbd: VBD, devices: XenDevices, *, domid: int, devid: int, grefs: Sequence[int],
            order: int, proto: int, port: int, name: str = "",
            max_indirect: int = MAX_INDIRECT_SEGMENTS, persistent: bool = False) -> BlkifRing:
    """Map the frontend's ring (``1 << order`` of ``grefs``), bind its event channel and
    start serving ``vbd`` on it (``persistent``: both ends said feature-persistent, the
    guest's data pages are mapped once and kept). ValueError for a bad order or protocol;
    OSError from the devices (a bad grant reference fails the mapping)."""
    if not 0 <= order <= MAX_RING_ORDER or len(grefs) < 1 << order:
        raise ValueError(f"ring order {order} with {len(grefs)} grant references")
    abi = abi_for(proto)  # ValueError if unknown
    grants = devices.grants()
    mapping = notifier = None
    try:
        mapping = grants.map(domid, list(grefs[: 1 << order]))
        notifier = devices.bind(domid, port)
        ring = BlkifRing(vbd, grants, notifier, mapping, abi, order, domid=domid,
                         devid=devid, name=name, max_indirect=max_indirect,
                         persistent=persistent)
    except BaseException:
        for thing in (notifier, mapping, grants):
            if thing is not None:
                try:
                    thing.close()
                except OSError:
                    pass
        raise
    ring.start()
    return ring


__all__ = ["BlkifRing", "BlkifStats", "HostDevices", "RingCorrupt", "XenDevices", "connect"]
