"""A stand-in Xen guest for the blkif ring, without Xen (shared by the tests and the torture
harness).

The guest lays the shared ring out in ordinary memory (an mmap) with this file's OWN struct
layouts (blkif.h / ring.h, facts in guests-formats-filters.md section 1e; the project's
structs module is not imported), keeps its data pages in a dict gref -> 4 KiB bytearray
and rings a pipe for its event channel. :class:`Devices` replaces the grant device and the
event channel of the backend with stand-ins over that guest (the documented seam:
``XenDevices``, ``Tapdisk(xen=...)``). What a backend shows here is what a blkfront
following the headers would see.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import struct
from collections.abc import Sequence

PAGE = 4096
# ---------------------------------------------------------------- the test's own layouts
OP_READ, OP_WRITE, OP_BARRIER, OP_FLUSH, OP_RESERVED, OP_DISCARD, OP_INDIRECT = range(7)
OKAY, ERROR, EOPNOTSUPP = 0, -1, -2
PROTO_NATIVE, PROTO_X86_32, PROTO_X86_64 = 1, 2, 3
SEG = struct.Struct("<IBB2x")
GNTST_BAD_GNTREF = -4


class Layout:
    def __init__(self, bits: int) -> None:
        if bits == 64:  # natural alignment: id at 8
            self.slot = 112
            self.rw = struct.Struct("<BBH4xQQ")
            self.seg_at = 24
            self.discard = struct.Struct("<BBH4xQQQ")
            self.indirect = struct.Struct("<BBH4xQQH2x8I4x")
            self.rsp = struct.Struct("<QBxh4x")
            self.proto = PROTO_X86_64
        else:  # i386: u64 aligned on 4, id at 4
            self.slot = 108
            self.rw = struct.Struct("<BBHQQ")
            self.seg_at = 20
            self.discard = struct.Struct("<BBHQQQ")
            self.indirect = struct.Struct("<BBHQQH2x8I8x")
            self.rsp = struct.Struct("<QBxh")
            self.proto = PROTO_X86_32

    def entries(self, order: int) -> int:
        n = ((PAGE << order) - 64) // self.slot
        p = 1
        while p * 2 <= n:
            p *= 2
        return p


X64, X32 = Layout(64), Layout(32)


class Mapping:
    def __init__(self, mem: mmap.mmap) -> None:
        self.view = memoryview(mem)
        self.closed = False

    def close(self) -> None:
        self.view.release()
        self.closed = True


class PageMapping:
    """Guest data pages mapped by the backend (persistent grants): while mapped, a page
    is the backend's to read and write."""

    def __init__(self, pages: list[bytearray]) -> None:
        self.pages = [memoryview(page) for page in pages]
        self.closed = False

    def close(self) -> None:
        for page in self.pages:
            page.release()
        self.pages = []
        self.closed = True


class Guest:
    """A frontend: ring pages, data pages, an event channel, and its grant table."""

    def __init__(self, layout: Layout = X64, order: int = 0, domid: int = 7) -> None:
        self.L = layout
        self.order = order
        self.domid = domid
        self.size = layout.entries(order)
        self.ring = mmap.mmap(-1, PAGE << order)
        # SHARED_RING_INIT: indices 0, events 1
        struct.pack_into("<IIII", self.ring, 0, 0, 1, 0, 1)
        self.ring_grefs = list(range(100, 100 + (1 << order)))
        self.pages: dict[int, bytearray] = {}
        self.next_gref = 1000
        self.req_prod_pvt = 0
        self.rsp_cons = 0
        self.kick_r, self.kick_w = os.pipe()
        os.set_blocking(self.kick_r, False)
        self.kicks = 0  # events we sent
        self.notified = 0  # events the backend sent
        self.mapping: Mapping | None = None
        self.notifier: Notifier | None = None
        self.copies = 0
        self.map_calls = 0  # map_pages calls (persistent grants)
        self.page_mappings: list[PageMapping] = []

    # ---- grants
    def grant(self, data: bytes = b"") -> int:
        g = self.next_gref
        self.next_gref += 1
        self.pages[g] = bytearray(data.ljust(PAGE, b"\0"))
        return g

    # ---- ring
    def _get(self, off: int) -> int:
        return struct.unpack_from("<I", self.ring, off)[0]

    def _slot(self, idx: int) -> int:
        return 64 + (idx % self.size) * self.L.slot

    def put_rw(self, op: int, rid: int, sector: int,
               segs: Sequence[tuple[int, int, int]], nseg: int | None = None) -> None:
        off = self._slot(self.req_prod_pvt)
        self.ring[off:off + self.L.slot] = bytes(self.L.slot)
        self.L.rw.pack_into(self.ring, off, op, len(segs) if nseg is None else nseg, 0xCA,
                            rid, sector)
        for i, seg in enumerate(segs[:11]):
            SEG.pack_into(self.ring, off + self.L.seg_at + i * 8, *seg)
        self.req_prod_pvt += 1

    def put_discard(self, rid: int, sector: int, count: int, flag: int = 0) -> None:
        off = self._slot(self.req_prod_pvt)
        self.ring[off:off + self.L.slot] = bytes(self.L.slot)
        self.L.discard.pack_into(self.ring, off, OP_DISCARD, flag, 0, rid, sector, count)
        self.req_prod_pvt += 1

    def put_indirect(self, inner: int, rid: int, sector: int, nseg: int,
                     grefs: Sequence[int]) -> None:
        off = self._slot(self.req_prod_pvt)
        self.ring[off:off + self.L.slot] = bytes(self.L.slot)
        refs = list(grefs) + [0] * (8 - len(grefs))
        self.L.indirect.pack_into(self.ring, off, OP_INDIRECT, inner, nseg, rid, sector, 0xCA,
                                  *refs)
        self.req_prod_pvt += 1

    def put_raw(self, op: int, rid: int) -> None:
        off = self._slot(self.req_prod_pvt)
        self.ring[off:off + self.L.slot] = bytes(self.L.slot)
        self.ring[off] = op
        struct.pack_into("<Q", self.ring, off + (8 if self.L is X64 else 4), rid)
        self.req_prod_pvt += 1

    def push(self) -> bool:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY, then the event if asked for."""
        old = self._get(0)
        new = self.req_prod_pvt & 0xFFFFFFFF
        struct.pack_into("<I", self.ring, 0, new)
        notify = ((new - self._get(4)) & 0xFFFFFFFF) < ((new - old) & 0xFFFFFFFF)
        if notify:
            self.kicks += 1
            os.write(self.kick_w, b"!")
        return notify

    def responses(self) -> list[tuple[int, int, int]]:
        out = []
        prod = self._get(8)
        while self.rsp_cons != prod:
            off = self._slot(self.rsp_cons)
            out.append(self.L.rsp.unpack_from(self.ring, off))
            self.rsp_cons = (self.rsp_cons + 1) & 0xFFFFFFFF
        struct.pack_into("<I", self.ring, 12, self.rsp_cons + 1)  # FINAL_CHECK_FOR_RESPONSES
        return out

    async def wait(self, n: int, limit: float = 10.0) -> dict[int, tuple[int, int]]:
        """Collect ``n`` responses: {id: (op, status)}."""
        got: dict[int, tuple[int, int]] = {}
        loop = asyncio.get_running_loop()
        end = loop.time() + limit
        while len(got) < n:
            for rid, op, status in self.responses():
                assert rid not in got, f"two responses for {rid:#x}"
                got[rid] = (op, status)
            if len(got) >= n:
                break
            assert loop.time() < end, f"{len(got)} of {n} responses: {got}"
            await asyncio.sleep(0.002)
        return got

    def close(self) -> None:
        os.close(self.kick_r)
        os.close(self.kick_w)


class Notifier:
    def __init__(self, guest: Guest, remote_port: int) -> None:
        self.guest = guest
        self.port = remote_port
        self.closed = False
        self.cleared = 0

    def fileno(self) -> int:
        return self.guest.kick_r

    def clear(self) -> None:
        self.cleared += 1
        try:
            os.read(self.guest.kick_r, 4096)
        except BlockingIOError:
            pass

    def notify(self) -> None:
        self.guest.notified += 1

    def doorbell(self) -> tuple[int, int] | None:
        return None  # (a pipe: the ring clears and notifies through us)

    def close(self) -> None:
        self.closed = True


class Grants:
    """gntdev over the guest's pages (per-segment statuses, as GNTTABOP_copy)."""

    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.closed = False

    def map(self, domid: int, grefs: Sequence[int]) -> Mapping:
        g = self.guest
        if domid != g.domid or list(grefs) != g.ring_grefs:
            raise OSError(errno.EINVAL, "not the ring's grants")
        g.mapping = Mapping(g.ring)
        return g.mapping

    def map_pages(self, domid: int, grefs: Sequence[int]) -> PageMapping:
        """Persistent grants: views of the guest's own pages (EINVAL for a grant it did
        not give, as mmap of a bad grant fails on gntdev)."""
        g = self.guest
        g.map_calls += 1
        if domid != g.domid or any(ref not in g.pages for ref in grefs):
            raise OSError(errno.EINVAL, "bad grant reference")
        mapping = PageMapping([g.pages[ref] for ref in grefs])
        g.page_mappings.append(mapping)
        return mapping

    def copy(self, domid: int, spans: Sequence[tuple[int, int, int]], local, offset: int,
             to_guest: bool) -> list[int]:
        g = self.guest
        g.copies += 1
        out = []
        pos = offset
        for ref, off, n in spans:
            assert off + n <= PAGE, "a segment crossing its guest page reached the device"
            page = g.pages.get(ref) if domid == g.domid else None
            if page is None:
                out.append(GNTST_BAD_GNTREF)
            elif to_guest:
                page[off:off + n] = local.view[pos:pos + n]
                out.append(0)
            else:
                local.view[pos:pos + n] = page[off:off + n]
                out.append(0)
            pos += n
        return out

    def close(self) -> None:
        self.closed = True


class Devices:
    """The XenDevices seam, backed by one stand-in guest."""

    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.grant_devices: list[Grants] = []

    def grants(self) -> Grants:
        self.grant_devices.append(Grants(self.guest))
        return self.grant_devices[-1]

    def bind(self, domid: int, remote_port: int) -> Notifier:
        if domid != self.guest.domid:
            raise OSError(errno.EINVAL, "no such domain")
        self.guest.notifier = Notifier(self.guest, remote_port)
        return self.guest.notifier
