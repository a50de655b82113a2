"""Guest memory as the front-end shares it: regions mmap'd from the fds it passes.

Each region is a window of a file (usually QEMU's memfd backing the guest RAM) known by
three addresses: the guest-physical address (what descriptors hold), the front-end's
user address (what SET_VRING_ADDR holds) and the offset in the file. A region is mapped
from offset 0 of its fd for ``mmap_offset + size`` bytes (the offset need not be page
aligned) and used from ``mmap_offset`` on.

Translation returns memoryviews straight into the mapping: the VBD reads and writes guest
buffers without copies. A range that leaves its region, or starts outside every region,
is refused with :class:`BadAddress` (the guest is not trusted); a range crossing from one
region into the next one, contiguous in guest-physical addresses, is split in two views.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
from dataclasses import dataclass

from blktap.errors import BlktapError

log = logging.getLogger("blktap.vhost")

# The most regions we take: QEMU asks GET_MAX_MEM_SLOTS and stays below.
MAX_REGIONS = 32


class BadAddress(BlktapError):
    """A guest address or length that no region covers."""

    default_errno = errno.EFAULT


@dataclass(eq=False)
class Region:
    gpa: int
    size: int
    uva: int
    mmap_offset: int
    mem: mmap.mmap
    view: memoryview  # the region's bytes, [mmap_offset, mmap_offset + size) of the map

    @property
    def gpa_end(self) -> int:
        return self.gpa + self.size

    def release(self) -> None:
        """Unmap, unless a view of it is still alive somewhere (then the mapping goes
        when the last view does: never a dangling pointer)."""
        self.view.release()
        try:
            self.mem.close()
        except BufferError:
            log.debug("guest memory region at %#x still referenced; unmapped later", self.gpa)


class GuestMemory:
    """The front-end's memory table."""

    def __init__(self) -> None:
        self.regions: list[Region] = []
        self._last: Region | None = None  # the region of the last translation

    def __len__(self) -> int:
        return len(self.regions)

    def add(self, fd: int, gpa: int, size: int, uva: int, mmap_offset: int) -> Region:
        """Map ``size`` bytes of ``fd`` from ``mmap_offset`` (the fd stays the caller's
        to close; the mapping does not need it)."""
        if len(self.regions) >= MAX_REGIONS:
            raise BlktapError(f"more than {MAX_REGIONS} memory regions", errno.ENOSPC)
        if size <= 0 or gpa + size > 1 << 64 or uva + size > 1 << 64 or mmap_offset < 0:
            raise BadAddress(f"memory region gpa={gpa:#x} size={size:#x} uva={uva:#x} "
                             f"offset={mmap_offset:#x} is not valid")
        for r in self.regions:
            if gpa < r.gpa_end and r.gpa < gpa + size:
                raise BadAddress(f"memory region at {gpa:#x} overlaps the one at {r.gpa:#x}")
        # A mapping past the end of its file faults (SIGBUS) where it is touched: the
        # whole process would die of a front-end's lie about a region's size.
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise BlktapError(f"guest memory region fd: {exc}", exc.errno) from None
        if stat.S_ISREG(st.st_mode) and st.st_size < mmap_offset + size:
            raise BadAddress(f"memory region at {gpa:#x} ({size:#x} bytes from offset "
                             f"{mmap_offset:#x}) is larger than its file ({st.st_size:#x})")
        try:
            mem = mmap.mmap(fd, mmap_offset + size, flags=mmap.MAP_SHARED,
                            prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as exc:
            code = getattr(exc, "errno", None) or errno.EINVAL
            raise BlktapError(f"cannot map guest memory region at {gpa:#x} "
                              f"({size:#x} bytes from offset {mmap_offset:#x}): {exc}",
                              code) from None
        region = Region(gpa, size, uva, mmap_offset, mem,
                        memoryview(mem)[mmap_offset : mmap_offset + size])
        self.regions.append(region)
        self.regions.sort(key=lambda r: r.gpa)
        return region

    def remove(self, gpa: int, size: int, uva: int) -> bool:
        """Unmap the region with these addresses (mmap offset ignored, as the spec says);
        False if there is none."""
        for r in self.regions:
            if r.gpa == gpa and r.size == size and r.uva == uva:
                self.regions.remove(r)
                if self._last is r:
                    self._last = None
                r.release()
                return True
        return False

    def clear(self) -> None:
        regions, self.regions = self.regions, []
        self._last = None
        for r in regions:
            r.release()

    # ------------------------------------------------------------------ translation
    def gpa(self, addr: int, length: int) -> memoryview:
        """The guest-physical range as one view (a range crossing regions is refused:
        :meth:`gpa_iov` splits those)."""
        r = self._last
        if r is None or not (r.gpa <= addr and addr + length <= r.gpa_end):
            r = self._find_gpa(addr, length)
        start = addr - r.gpa
        return r.view[start : start + length]

    def gpa_iov(self, addr: int, length: int, out: list[memoryview]) -> None:
        """Append views covering the guest-physical range to ``out`` (one per region it
        touches; the regions must be contiguous)."""
        r = self._last
        if r is not None and r.gpa <= addr and addr + length <= r.gpa_end:
            start = addr - r.gpa
            out.append(r.view[start : start + length])
            return
        while length:
            r = self._region_at(addr)
            start = addr - r.gpa
            n = min(length, r.size - start)
            out.append(r.view[start : start + n])
            addr += n
            length -= n

    def uva(self, addr: int, length: int) -> memoryview:
        """A front-end user address range (ring addresses) as a view."""
        for r in self.regions:
            if r.uva <= addr and addr + length <= r.uva + r.size:
                start = addr - r.uva
                return r.view[start : start + length]
        raise BadAddress(f"user address {addr:#x} (+{length:#x}) is in no memory region")

    def _find_gpa(self, addr: int, length: int) -> Region:
        for r in self.regions:
            if r.gpa <= addr and addr + length <= r.gpa_end:
                self._last = r
                return r
        raise BadAddress(f"guest address {addr:#x} (+{length:#x}) is outside guest memory "
                         "or crosses a region's end")

    def _region_at(self, addr: int) -> Region:
        for r in self.regions:
            if r.gpa <= addr < r.gpa_end:
                self._last = r
                return r
        raise BadAddress(f"guest address {addr:#x} is outside guest memory")


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
