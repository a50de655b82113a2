"""The CBT log's on-disk layout (cbt-util's ``struct cbt_log_metadata`` and bitmap).

    @0  uuid parent (16 bytes, as stored by libuuid: big-endian, RFC 4122 order)
    @16 uuid child
    @32 int consistent (host order: little-endian on every platform Xen runs on)
    @36 padding (4 bytes, zero)
    @40 u64 size of the disk in bytes
    @48 bitmap: ceil(ceil(size / 64 KiB) / 8) bytes, block N in bit N % 8 (least
        significant first) of byte N / 8

There is no magic number: a file is a log when its header's disk size matches the
bitmap that follows it.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

BLOCK = 64 << 10  # bytes of disk per bit
HEADER = struct.Struct("<16s16si4xQ")
HEADER_SIZE = HEADER.size  # 48
NIL = uuid.UUID(int=0)
# A disk of this many bytes would need a bitmap larger than any disk blktap serves
# (2 EiB); a larger size field means the file is not a log.
MAX_SIZE = 1 << 61


def bitmap_size(size: int) -> int:
    """Bytes of bitmap for a disk of ``size`` bytes (whole bytes of whole blocks)."""
    return -(-blocks(size) // 8)


def blocks(size: int) -> int:
    """64 KiB blocks covering ``size`` bytes."""
    return -(-size // BLOCK)


@dataclass
class LogHeader:
    """The 48-byte header."""

    parent: uuid.UUID = NIL
    child: uuid.UUID = NIL
    consistent: int = 0
    size: int = 0

    def pack(self) -> bytes:
        return HEADER.pack(self.parent.bytes, self.child.bytes, self.consistent, self.size)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> LogHeader:
        parent, child, consistent, size = HEADER.unpack_from(data)
        return cls(uuid.UUID(bytes=bytes(parent)), uuid.UUID(bytes=bytes(child)),
                   consistent, size)

    @property
    def bitmap_size(self) -> int:
        return bitmap_size(self.size)
