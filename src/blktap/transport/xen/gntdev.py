"""The grant device (``/dev/xen/gntdev``): map a guest's ring pages, copy its data.

Facts from linux ``include/uapi/xen/gntdev.h`` (``guests-formats-filters.md`` §1d); the
ioctl numbers are ``_IOC(_IOC_NONE, 'G', nr, size)`` with the size of the one-entry
struct, whatever the count actually passed:

- MAP_GRANT_REF ``{u32 count; u32 pad; u64 index (out); {u32 domid; u32 ref}[count]}``,
  then ``mmap(fd, offset=index)`` maps the pages;
- UNMAP_GRANT_REF ``{u64 index; u32 count; u32 pad}`` (after munmap);
- SET_MAX_GRANTS ``{u32 count}`` (a no-op on current kernels; older ones limit each
  descriptor to 128 grants without it);
- GRANT_COPY ``{u32 count; u32 pad; u64 segments}``, each segment 24 bytes: source and
  dest (a user address, or ``{u32 ref; u16 offset; u16 domid}``), ``u16 len``,
  ``u16 flags`` (GNTCOPY_source_gref 1, GNTCOPY_dest_gref 2), ``s16 status`` (out). The
  foreign side of a segment must stay within its page (the ioctl fails with EINVAL
  otherwise); the local side may cross pages (the kernel splits it). A bad grant fails
  only its own segment (``status`` < 0), the ioctl itself succeeds.

The ring logic sees only the small :class:`Grants` interface, so that tests can put a
stand-in in its place (a dict of guest pages) and run without Xen.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import struct
from collections.abc import Sequence
from typing import Protocol

from blktap.transport.xen.structs import PAGE

GNTDEV_PATH = "/dev/xen/gntdev"

IOCTL_GNTDEV_MAP_GRANT_REF = 0x00184700
IOCTL_GNTDEV_UNMAP_GRANT_REF = 0x00104701
IOCTL_GNTDEV_SET_MAX_GRANTS = 0x00044703
IOCTL_GNTDEV_GRANT_COPY = 0x00104708

GNTCOPY_SOURCE_GREF = 1
GNTCOPY_DEST_GREF = 2
GNTST_OKAY = 0

_MAP_HEAD = struct.Struct("=IIQ")
_MAP_REF = struct.Struct("=II")
_UNMAP = struct.Struct("=QII")
_COPY = struct.Struct("=I4xQ")
# source (8), dest (8), len, flags, status, pad
_SEG_LOCAL_TO_GUEST = struct.Struct("=QIHHHHh2x")  # virt | ref offset domid | len flags status
_SEG_GUEST_TO_LOCAL = struct.Struct("=IHHQHHh2x")  # ref offset domid | virt | len flags status
assert _SEG_LOCAL_TO_GUEST.size == _SEG_GUEST_TO_LOCAL.size == 24
_STATUS_OFFSET = 20

# A piece of a guest page: grant reference, offset in its page, length (within the page).
GrantSpan = tuple[int, int, int]


class LocalBuffer(Protocol):
    """Local memory the grants are copied to or from: its bytes and its address."""

    view: memoryview
    address: int


class Mapping(Protocol):
    """Guest pages mapped into our address space (the ring)."""

    view: memoryview

    def close(self) -> None: ...


class PageMapping(Protocol):
    """Guest pages mapped for keeps (persistent grants): one view per page."""

    pages: list[memoryview]

    def close(self) -> None: ...


class Grants(Protocol):
    """What the ring logic needs from the grant device."""

    def map(self, domid: int, grefs: Sequence[int]) -> Mapping:
        """Map ``grefs`` (in order, contiguously), read-write."""

    def map_pages(self, domid: int, grefs: Sequence[int]) -> PageMapping:
        """Map ``grefs`` read-write, a view per page (in the order of ``grefs``)."""

    def copy(self, domid: int, spans: Sequence[GrantSpan], local: LocalBuffer, offset: int,
             to_guest: bool) -> list[int]:
        """Copy between the guest's ``spans`` and ``local`` from ``offset`` on (the spans
        back to back); one grant status per span (0 = done)."""

    def close(self) -> None: ...


class GntMapping:
    """Pages mapped through gntdev: ``view`` over them; close unmaps."""

    def __init__(self, dev: GntDev, index: int, count: int, mem: mmap.mmap) -> None:
        self._dev = dev
        self.index = index
        self.count = count
        self._mem: mmap.mmap | None = mem
        self.view = memoryview(mem)

    def close(self) -> None:
        if self._mem is None:
            return
        self.view.release()
        self._mem.close()
        self._mem = None
        self._dev.unmap(self.index, self.count)


class GntPages:
    """A :class:`GntMapping` seen page by page (``pages``); close releases the pages'
    views, then unmaps."""

    def __init__(self, mapping: GntMapping) -> None:
        self._mapping = mapping
        view = mapping.view
        self.pages = [view[i * PAGE:(i + 1) * PAGE] for i in range(mapping.count)]

    def close(self) -> None:
        for page in self.pages:
            page.release()
        self.pages = []
        self._mapping.close()


class GntDev:
    """One open ``/dev/xen/gntdev``."""

    def __init__(self, path: str = GNTDEV_PATH) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(self.fd, IOCTL_GNTDEV_SET_MAX_GRANTS, struct.pack("=I", 1024))
        except OSError as exc:  # gone from current kernels: there is no limit to raise
            if exc.errno not in (errno.ENOTTY, errno.EINVAL):
                os.close(self.fd)
                raise

    def map(self, domid: int, grefs: Sequence[int]) -> GntMapping:
        count = len(grefs)
        arg = bytearray(_MAP_HEAD.size + count * _MAP_REF.size)
        _MAP_HEAD.pack_into(arg, 0, count, 0, 0)
        for i, ref in enumerate(grefs):
            _MAP_REF.pack_into(arg, _MAP_HEAD.size + i * _MAP_REF.size, domid, ref)
        fcntl.ioctl(self.fd, IOCTL_GNTDEV_MAP_GRANT_REF, arg, True)
        index = _MAP_HEAD.unpack_from(arg)[2]
        try:
            # The grant is only mapped here: a bad reference fails this mmap (EINVAL/EFAULT).
            mem = mmap.mmap(self.fd, count * PAGE, mmap.MAP_SHARED,
                            mmap.PROT_READ | mmap.PROT_WRITE, offset=index)
        except BaseException:
            self.unmap(index, count)
            raise
        return GntMapping(self, index, count, mem)

    def map_pages(self, domid: int, grefs: Sequence[int]) -> GntPages:
        return GntPages(self.map(domid, grefs))

    def unmap(self, index: int, count: int) -> None:
        fcntl.ioctl(self.fd, IOCTL_GNTDEV_UNMAP_GRANT_REF, _UNMAP.pack(index, count, 0))

    def copy(self, domid: int, spans: Sequence[GrantSpan], local: LocalBuffer, offset: int,
             to_guest: bool) -> list[int]:
        n = len(spans)
        if not n:
            return []
        segs = (ctypes.c_char * (n * 24))()
        addr = local.address + offset
        for i, (ref, off, length) in enumerate(spans):
            if to_guest:
                _SEG_LOCAL_TO_GUEST.pack_into(segs, i * 24, addr, ref, off, domid, length,
                                              GNTCOPY_DEST_GREF, 0)
            else:
                _SEG_GUEST_TO_LOCAL.pack_into(segs, i * 24, ref, off, domid, addr, length,
                                              GNTCOPY_SOURCE_GREF, 0)
            addr += length
        fcntl.ioctl(self.fd, IOCTL_GNTDEV_GRANT_COPY, _COPY.pack(n, ctypes.addressof(segs)))
        raw = bytes(segs)
        return [struct.unpack_from("=h", raw, i * 24 + _STATUS_OFFSET)[0] for i in range(n)]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PageBuffers:
    """``count`` local buffers of ``size`` bytes, page aligned, in one anonymous mapping
    reserved at once (the kernel backs pages only once touched): the bounce buffers of
    one ring, one per slot, so that the data path never allocates."""

    def __init__(self, count: int, size: int) -> None:
        self.size = -(-size // PAGE) * PAGE
        self._mem = mmap.mmap(-1, max(1, count) * self.size)
        self._anchor = ctypes.c_char.from_buffer(self._mem)
        self.base = ctypes.addressof(self._anchor)
        whole = memoryview(self._mem)
        self._free = [Slot(whole[i * self.size:(i + 1) * self.size], self.base + i * self.size)
                      for i in range(count)]
        whole.release()

    def get(self) -> Slot:
        return self._free.pop()

    def put(self, slot: Slot) -> None:
        self._free.append(slot)

    @property
    def free(self) -> int:
        return len(self._free)


class Slot:
    """One bounce buffer: ``view`` and its ``address`` (what a grant copy names)."""

    __slots__ = ("address", "view")

    def __init__(self, view: memoryview, address: int) -> None:
        self.view = view
        self.address = address


__all__ = ["GNTDEV_PATH", "GntDev", "GntMapping", "GntPages", "GrantSpan", "Grants",
           "LocalBuffer", "Mapping", "PageBuffers", "PageMapping", "Slot"]
