"""The blkif wire structures: requests, responses, segments, the shared ring's header.

Layouts as ``xen/include/public/io/blkif.h`` and ``ring.h`` define them (facts in
``guests-formats-filters.md`` §1e), for the two x86 ABIs a frontend may speak:

- ``x86_64-abi``: natural alignment. A request is 112 bytes (a u32 of padding puts ``id``
  at 8), a response 16.
- ``x86_32-abi``: ``pack(4)`` (i386 aligns u64 on 4). A request is 108 bytes, a response
  12, and the ring's slots are 108 bytes apart.
- ``native``: the ABI of this host (x86_64 on a 64-bit dom0).

Every structure here is read from a copy of the guest's bytes (the guest may change the
shared page under us; checks and use must see the same values) and every field is
validated by the caller (:mod:`blktap.transport.xen.blkif`) before use.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

PAGE = 4096  # Xen's page: grants, rings and first/last_sect are in these units
SECTOR = 512  # blkif sectors are always 512 bytes
SECTORS_PER_PAGE = PAGE // SECTOR

# Segments carried in a request itself, and per indirect page.
MAX_SEGMENTS = 11
SEGMENT = struct.Struct("=IBB2x")  # gref, first_sect, last_sect (8 bytes in both ABIs)
SEGMENTS_PER_INDIRECT_PAGE = PAGE // SEGMENT.size  # 512
MAX_INDIRECT_PAGES = 8  # indirect_grefs[] in the request
# What we advertise (feature-max-indirect-segments) and accept: 1 MiB requests, as kernel
# blkback. One indirect page holds them all.
MAX_INDIRECT_SEGMENTS = 256

# Ring orders the ring logic accepts (pages = 1 << order). The control message carries at
# most 8 grant references (order 3); the ring itself knows no such limit.
MAX_RING_ORDER = 4

# Shared ring header (ring.h): four RING_IDX (u32), a 4-byte private union, 44 bytes of pad.
REQ_PROD = 0
REQ_EVENT = 4
RSP_PROD = 8
RSP_EVENT = 12
RING_HEADER = 64
INDEX = struct.Struct("=I")


class Op(enum.IntEnum):
    READ = 0
    WRITE = 1
    WRITE_BARRIER = 2
    FLUSH_DISKCACHE = 3
    RESERVED_1 = 4
    DISCARD = 5
    INDIRECT = 6


class Status(enum.IntEnum):
    OKAY = 0
    ERROR = -1
    EOPNOTSUPP = -2


DISCARD_SECURE = 0x1  # discard request flag

# The ``info`` bits of DISK_INFO (and the backend's ``info`` key).
VDISK_CDROM = 0x1
VDISK_REMOVABLE = 0x2
VDISK_READONLY = 0x4


class Protocol(enum.IntEnum):
    """The ``proto`` field of the control message (tapback reads the frontend's
    ``protocol`` key; a missing key means x86_32 on x86)."""

    NATIVE = 1
    X86_32 = 2
    X86_64 = 3


@dataclass(frozen=True)
class Abi:
    """One ABI's layouts. Offsets are from the start of a ring slot."""

    name: str
    slot: int  # distance between ring slots: sizeof(the request/response union)
    id_offset: int  # where every request keeps its id (8, or 4 in x86_32)
    # op, nr_segments, handle, id, sector; the segments follow at seg_offset
    rw: struct.Struct
    seg_offset: int
    # op, flag, id, sector, nr_sectors
    discard: struct.Struct
    # op, indirect_op, nr_segments, id, sector, handle, indirect_grefs[8]
    indirect: struct.Struct
    # id, op, status (written at the slot's start)
    response: struct.Struct


X86_64 = Abi(
    name="x86_64-abi",
    slot=112,
    id_offset=8,
    rw=struct.Struct("=BBH4xQQ"),
    seg_offset=24,
    discard=struct.Struct("=BB2x4xQQQ"),
    indirect=struct.Struct(f"=BBH4xQQH2x{MAX_INDIRECT_PAGES}I4x"),
    response=struct.Struct("=QBxh4x"),
)
X86_32 = Abi(
    name="x86_32-abi",
    slot=108,
    id_offset=4,
    rw=struct.Struct("=BBHQQ"),
    seg_offset=20,
    discard=struct.Struct("=BB2xQQQ"),
    indirect=struct.Struct(f"=BBHQQH2x{MAX_INDIRECT_PAGES}I8x"),
    response=struct.Struct("=QBxh"),
)
# The sizes ring.h and the kernel's blkback give (the asserts keep the tables honest).
assert X86_64.seg_offset + MAX_SEGMENTS * SEGMENT.size == X86_64.slot
assert X86_32.seg_offset + MAX_SEGMENTS * SEGMENT.size == X86_32.slot
assert (X86_64.discard.size, X86_64.indirect.size, X86_64.response.size) == (32, 64, 16)
assert (X86_32.discard.size, X86_32.indirect.size, X86_32.response.size) == (28, 64, 12)

NATIVE = X86_64 if struct.calcsize("P") == 8 else X86_32


def abi_for(proto: int) -> Abi:
    """The layouts for the control message's ``proto``; ValueError if unknown."""
    p = Protocol(proto)
    return NATIVE if p is Protocol.NATIVE else X86_32 if p is Protocol.X86_32 else X86_64


def ring_size(abi: Abi, order: int) -> int:
    """Slots in a ring of ``1 << order`` pages: as many as fit after the header, rounded
    down to a power of two (32, 64, 128, 256, 512 for orders 0-4 in both ABIs)."""
    fit = ((PAGE << order) - RING_HEADER) // abi.slot
    return 1 << (fit.bit_length() - 1)


@dataclass
class Request:
    """One request as read from its slot (a private copy; not validated yet)."""

    op: int
    id: int
    sector: int = 0
    nr_segments: int = 0
    handle: int = 0
    segments: list[tuple[int, int, int]] = field(default_factory=list)  # gref, first, last
    # discard
    flag: int = 0
    nr_sectors: int = 0
    # indirect
    indirect_op: int = 0
    indirect_grefs: tuple[int, ...] = ()

    @property
    def response_op(self) -> int:
        """The ``operation`` of the response: an indirect request is answered as its
        inner operation (blkfront has no case for BLKIF_OP_INDIRECT in its responses)."""
        return self.indirect_op if self.op == Op.INDIRECT else self.op


def parse_request(abi: Abi, slot: bytes) -> Request:
    """Decode one slot's bytes (``abi.slot`` of them, already copied out of the ring).
    Segments are decoded only up to MAX_SEGMENTS; the count is checked by the caller."""
    op = slot[0]
    if op in (Op.READ, Op.WRITE, Op.WRITE_BARRIER, Op.FLUSH_DISKCACHE):
        _, nseg, handle, rid, sector = abi.rw.unpack_from(slot)
        segs = [SEGMENT.unpack_from(slot, abi.seg_offset + i * SEGMENT.size)
                for i in range(min(nseg, MAX_SEGMENTS))]
        return Request(op, rid, sector, nseg, handle, segs)
    if op == Op.DISCARD:
        _, flag, rid, sector, count = abi.discard.unpack_from(slot)
        return Request(op, rid, sector, flag=flag, nr_sectors=count)
    if op == Op.INDIRECT:
        _, inner, nseg, rid, sector, handle, *grefs = abi.indirect.unpack_from(slot)
        return Request(op, rid, sector, nseg, handle, indirect_op=inner,
                       indirect_grefs=tuple(grefs))
    # Unknown: only the id is meaningful (at 8, or 4 in x86_32), to answer it.
    rid = struct.unpack_from("=Q", slot, abi.id_offset)[0]
    return Request(op, rid)


def parse_segments(page: bytes | memoryview, count: int) -> list[tuple[int, int, int]]:
    """The first ``count`` segments of an indirect page (read in place, no copy)."""
    return list(SEGMENT.iter_unpack(memoryview(page)[: count * SEGMENT.size]))


__all__ = [
    "Abi", "DISCARD_SECURE", "INDEX", "MAX_INDIRECT_PAGES", "MAX_INDIRECT_SEGMENTS",
    "MAX_RING_ORDER", "MAX_SEGMENTS", "NATIVE", "Op", "PAGE", "Protocol", "REQ_EVENT",
    "REQ_PROD", "RING_HEADER", "RSP_EVENT", "RSP_PROD", "Request", "SECTOR",
    "SECTORS_PER_PAGE", "SEGMENT", "SEGMENTS_PER_INDIRECT_PAGE", "Status", "VDISK_CDROM",
    "VDISK_READONLY", "VDISK_REMOVABLE", "X86_32", "X86_64", "abi_for", "parse_request",
    "parse_segments", "ring_size",
]
