"""On-disk structures of qcow version 1 (big-endian), and blktap2's extension header.

The header (48 bytes, C layout: two bytes of padding after ``l2_bits``)::

    magic u32 "QFI\\xfb" | version u32 = 1 | backing_file_offset u64 | backing_file_size u32
    | mtime u32 | size u64 | cluster_bits u8 | l2_bits u8 | pad u16 | crypt_method u32
    | l1_table_offset u64

blktap2's tapdisk wrote a 16-byte extension right after it (offset 48): xmagic
"XEN\\xfb", cksum (the first 4 bytes of the MD5 of the big-endian L1 table),
min_cluster_alloc, flags (1: sparse file, 2: the L1 table is big-endian; an image
without bit 2 was written by an old tapdisk in host order, little-endian on x86).

L1 entries are the offsets of L2 tables (0: none); an L2 table holds ``1 << l2_bits``
entries: 0 (not allocated), the offset of a data cluster, or with bit 63 set a compressed
cluster: bits 0..62-cluster_bits the offset, the next cluster_bits bits its length in
bytes (raw deflate, 4 KiB window).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"QFI\xfb"
XEN_MAGIC = b"XEN\xfb"
VERSION = 1
HEADER = struct.Struct(">4sIQIIQBBxxIQ")
HEADER_SIZE = HEADER.size  # 48
XEN_EXT = struct.Struct(">4sIII")
XEN_EXT_SIZE = XEN_EXT.size  # 16

CRYPT_NONE = 0
CRYPT_AES = 1
OFLAG_COMPRESSED = 1 << 63

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 16
MIN_L2_BITS = 6
MAX_L2_BITS = 16
MAX_BACKING_NAME = 1023
MAX_L1_BYTES = 32 << 20

XEN_SPARSE = 0x01
XEN_L1_BIG_ENDIAN = 0x02


@dataclass
class Header:
    magic: bytes
    version: int
    backing_file_offset: int
    backing_file_size: int
    mtime: int
    size: int
    cluster_bits: int
    l2_bits: int
    crypt_method: int
    l1_table_offset: int

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        return cls(*HEADER.unpack_from(raw, 0))

    def pack(self) -> bytes:
        return HEADER.pack(self.magic, self.version, self.backing_file_offset,
                           self.backing_file_size, self.mtime, self.size, self.cluster_bits,
                           self.l2_bits, self.crypt_method, self.l1_table_offset)

    @property
    def l1_entries(self) -> int:
        """Entries needed to map the disk (qemu's count; blktap2 wrote a longer table)."""
        shift = self.cluster_bits + self.l2_bits
        return -(-self.size // (1 << shift))


@dataclass
class XenExtension:
    cksum: int
    min_cluster_alloc: int
    flags: int

    @classmethod
    def unpack(cls, raw: bytes) -> XenExtension | None:
        if len(raw) < XEN_EXT_SIZE:
            return None
        magic, cksum, mca, flags = XEN_EXT.unpack_from(raw, 0)
        if magic != XEN_MAGIC:
            return None
        return cls(cksum, mca, flags)

    def pack(self) -> bytes:
        return XEN_EXT.pack(XEN_MAGIC, self.cksum, self.min_cluster_alloc, self.flags)


def compressed_span(entry: int, cluster_bits: int) -> tuple[int, int]:
    """(host offset, bytes) of a compressed L2 entry."""
    shift = 63 - cluster_bits
    return entry & ((1 << shift) - 1), (entry >> shift) & ((1 << cluster_bits) - 1)
