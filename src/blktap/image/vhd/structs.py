"""On-disk structures of the VHD format, as blktap writes them.

Only declarations, packing and unpacking live here; the logic that interprets them is in
:mod:`blktap.image.vhd.image`. Every integer on disk is big-endian. Sizes: footer 512,
dynamic header 1024, parent locator entry 24, batmap header 512.
"""

from __future__ import annotations

import struct
import time
import uuid as _uuid
from dataclasses import dataclass, field, replace

SECTOR_SIZE = 512
SECTOR_SHIFT = 9

FOOTER_SIZE = 512
HEADER_SIZE = 1024
BATMAP_HEADER_SIZE = 512
LOCATOR_COUNT = 8

FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"
BATMAP_COOKIE = b"tdbatmap"
# The journaled resize of the reference disables an image by swapping the footer cookie.
POISON_COOKIE = b"v_poison"

# Footer.features
FEATURE_NONE = 0x0
FEATURE_TEMPORARY = 0x1
FEATURE_RESERVED = 0x2  # must always be set

FILE_FORMAT_VERSION = 0x00010000
HEADER_VERSION = 0x00010000

# Footer.type
DISK_TYPE_NONE = 0
DISK_TYPE_FIXED = 2
DISK_TYPE_DYNAMIC = 3
DISK_TYPE_DIFF = 4

# What blktap writes in the creator fields.
CREATOR_APP = b"tap\0"
CREATOR_VERSION = 0x00010003  # 1.3
CREATOR_OS = 0
# Host OS codes (Footer.crtr_os): "Wi2k" and "Mac ".
CREATOR_OS_WINDOWS = 0x5769326B
CREATOR_OS_MAC = 0x4D616320

DYNAMIC_DATA_OFFSET = 512
FIXED_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF
UNUSED_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF

BAT_ENTRY_UNUSED = 0xFFFFFFFF
DEFAULT_BLOCK_SHIFT = 21
DEFAULT_BLOCK_SIZE = 1 << DEFAULT_BLOCK_SHIFT  # 2 MiB
DEFAULT_TABLE_OFFSET = FOOTER_SIZE + HEADER_SIZE  # 1536

BATMAP_VERSION = 0x00010002  # 1.2: unsigned-byte checksum
BATMAP_VERSION_1_1 = 0x00010001  # 1.1: signed-byte checksum

# VHD timestamps count seconds from 2000-01-01 00:00:00 UTC.
VHD_EPOCH_OFFSET = 946684800

# Parent locator platform codes.
PLAT_CODE_NONE = 0x0
PLAT_CODE_WI2R = 0x57693272  # deprecated
PLAT_CODE_WI2K = 0x5769326B  # deprecated
PLAT_CODE_W2RU = 0x57327275  # Windows relative, UTF-16LE
PLAT_CODE_W2KU = 0x57326B75  # Windows absolute, UTF-16LE
PLAT_CODE_MAC = 0x4D616320  # Mac alias blob
PLAT_CODE_MACX = 0x4D616358  # file:// URL, UTF-8

PLAT_CODE_NAMES = {
    PLAT_CODE_NONE: "PLAT_CODE_NONE",
    PLAT_CODE_WI2R: "PLAT_CODE_WI2R",
    PLAT_CODE_WI2K: "PLAT_CODE_WI2K",
    PLAT_CODE_W2RU: "PLAT_CODE_W2RU",
    PLAT_CODE_W2KU: "PLAT_CODE_W2KU",
    PLAT_CODE_MAC: "PLAT_CODE_MAC",
    PLAT_CODE_MACX: "PLAT_CODE_MACX",
}

# Largest disk XenServer lets you make (2040 GiB); our own hard limit is what a 32-bit BAT
# of 2 MiB blocks can address.
MAX_VHD_SIZE_XENSERVER = 2040 << 30
MAX_VHD_SIZE = (BAT_ENTRY_UNUSED - 1) * DEFAULT_BLOCK_SIZE


def vhd_time(unix_seconds: float | None = None) -> int:
    """Seconds since the VHD epoch, as a 32-bit value."""
    now = time.time() if unix_seconds is None else unix_seconds
    return max(0, int(now) - VHD_EPOCH_OFFSET) & 0xFFFFFFFF


def unix_time(vhd_seconds: int) -> int:
    return vhd_seconds + VHD_EPOCH_OFFSET


def checksum(buf: bytes | bytearray | memoryview, skip: range | None = None) -> int:
    """One's complement of the byte sum, with the bytes in ``skip`` (the stored checksum)
    counted as zero."""
    total = sum(buf)
    if skip is not None:
        total -= sum(buf[skip.start : skip.stop])
    return ~total & 0xFFFFFFFF


def geometry(size_bytes: int) -> tuple[int, int, int]:
    """CHS geometry (cylinders, heads, sectors per track) of the VHD specification."""
    total = size_bytes // SECTOR_SIZE
    if total > 65535 * 16 * 255:
        total = 65535 * 16 * 255
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = (cth + 1023) // 1024
        if heads < 4:
            heads = 4
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


def pack_geometry(cyl: int, heads: int, spt: int) -> int:
    return (cyl & 0xFFFF) << 16 | (heads & 0xFF) << 8 | (spt & 0xFF)


def unpack_geometry(value: int) -> tuple[int, int, int]:
    return value >> 16, (value >> 8) & 0xFF, value & 0xFF


# --------------------------------------------------------------------------------------
# Footer: 512 bytes, at the end of the file and (for dynamic disks) copied at offset 0.

_FOOTER = struct.Struct(">8sIIQI4sIIQQIII16sBB426s")
assert _FOOTER.size == FOOTER_SIZE
FOOTER_CHECKSUM_FIELD = range(64, 68)
# blktap keeps its "hidden" flag in the spec's reserved area, just after "saved state".
FOOTER_HIDDEN_OFFSET = 85


@dataclass
class Footer:
    cookie: bytes = FOOTER_COOKIE
    features: int = FEATURE_RESERVED
    ff_version: int = FILE_FORMAT_VERSION
    data_offset: int = DYNAMIC_DATA_OFFSET
    timestamp: int = 0
    crtr_app: bytes = CREATOR_APP
    crtr_ver: int = CREATOR_VERSION
    crtr_os: int = CREATOR_OS
    orig_size: int = 0
    curr_size: int = 0
    geometry: int = 0
    type: int = DISK_TYPE_DYNAMIC
    checksum: int = 0
    uuid: bytes = b"\0" * 16
    saved: int = 0
    hidden: int = 0
    reserved: bytes = b"\0" * 426

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> Footer:
        return cls(*_FOOTER.unpack_from(buf))

    def pack(self) -> bytes:
        return _FOOTER.pack(
            self.cookie, self.features, self.ff_version, self.data_offset, self.timestamp,
            self.crtr_app, self.crtr_ver, self.crtr_os, self.orig_size, self.curr_size,
            self.geometry, self.type, self.checksum, self.uuid, self.saved, self.hidden,
            self.reserved,
        )

    def compute_checksum(self) -> int:
        return checksum(self.pack(), FOOTER_CHECKSUM_FIELD)

    def sealed(self) -> Footer:
        """A copy whose checksum field is correct."""
        out = replace(self)
        out.checksum = out.compute_checksum()
        return out

    @property
    def uuid_obj(self) -> _uuid.UUID:
        return _uuid.UUID(bytes=self.uuid)

    @property
    def is_dynamic(self) -> bool:
        return self.type in (DISK_TYPE_DYNAMIC, DISK_TYPE_DIFF)


# --------------------------------------------------------------------------------------
# Parent locator entry: 24 bytes, eight of them in the dynamic header.

_LOCATOR = struct.Struct(">IIIIQ")
assert _LOCATOR.size == 24


@dataclass
class ParentLocator:
    code: int = PLAT_CODE_NONE
    data_space: int = 0  # bytes in blktap's images, sectors per the spec: see data_bytes
    data_len: int = 0
    reserved: int = 0
    data_offset: int = 0

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> ParentLocator:
        return cls(*_LOCATOR.unpack_from(buf, offset))

    def pack(self) -> bytes:
        return _LOCATOR.pack(
            self.code, self.data_space, self.data_len, self.reserved, self.data_offset
        )

    @property
    def space_bytes(self) -> int:
        """The reserved space in bytes. blktap stores bytes ("to be compatible with
        Microsoft's tools"), the specification says sectors: a value below one sector can
        only mean sectors."""
        if self.data_space < SECTOR_SIZE:
            return self.data_space * SECTOR_SIZE
        return self.data_space


# --------------------------------------------------------------------------------------
# Dynamic disk header: 1024 bytes at Footer.data_offset.

_HEADER = struct.Struct(">8sQQIIII16sII512s")
HEADER_LOCATORS_OFFSET = 576
assert _HEADER.size == HEADER_LOCATORS_OFFSET
HEADER_CHECKSUM_FIELD = range(36, 40)


@dataclass
class Header:
    cookie: bytes = HEADER_COOKIE
    data_offset: int = UNUSED_DATA_OFFSET
    table_offset: int = DEFAULT_TABLE_OFFSET
    hdr_ver: int = HEADER_VERSION
    max_bat_size: int = 0
    block_size: int = DEFAULT_BLOCK_SIZE
    checksum: int = 0
    prt_uuid: bytes = b"\0" * 16
    prt_ts: int = 0
    res1: int = 0
    prt_name: bytes = b"\0" * 512  # UTF-16BE, blktap stores the parent's basename
    loc: list[ParentLocator] = field(
        default_factory=lambda: [ParentLocator() for _ in range(LOCATOR_COUNT)]
    )
    res2: bytes = b"\0" * 256

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> Header:
        fields = _HEADER.unpack_from(buf)
        locs = [
            ParentLocator.unpack(buf, HEADER_LOCATORS_OFFSET + 24 * i)
            for i in range(LOCATOR_COUNT)
        ]
        res2 = bytes(buf[768:1024])
        return cls(*fields, locs, res2)

    def pack(self) -> bytes:
        head = _HEADER.pack(
            self.cookie, self.data_offset, self.table_offset, self.hdr_ver, self.max_bat_size,
            self.block_size, self.checksum, self.prt_uuid, self.prt_ts, self.res1, self.prt_name,
        )
        return head + b"".join(loc.pack() for loc in self.loc) + self.res2

    def compute_checksum(self) -> int:
        return checksum(self.pack(), HEADER_CHECKSUM_FIELD)

    def sealed(self) -> Header:
        out = replace(self, loc=[replace(loc) for loc in self.loc])
        out.checksum = out.compute_checksum()
        return out

    @property
    def parent_name(self) -> str:
        """The parent name as stored (UTF-16BE, NUL-terminated)."""
        raw = self.prt_name
        end = len(raw)
        for i in range(0, len(raw) - 1, 2):
            if raw[i] == 0 and raw[i + 1] == 0:
                end = i
                break
        return raw[:end].decode("utf-16-be", errors="replace")

    @staticmethod
    def encode_parent_name(name: str) -> bytes:
        data = name.encode("utf-16-be")
        if len(data) > 512:
            raise ValueError("parent name too long for the header")
        return data.ljust(512, b"\0")

    @property
    def bat_bytes(self) -> int:
        """The BAT's size on disk: 4 bytes an entry, padded to a whole sector."""
        return pad_sector(self.max_bat_size * 4)

    @property
    def bat_end(self) -> int:
        """First byte after the BAT: where blktap keeps its batmap header."""
        return self.table_offset + self.bat_bytes

    @property
    def parent_uuid_obj(self) -> _uuid.UUID:
        return _uuid.UUID(bytes=self.prt_uuid)


# --------------------------------------------------------------------------------------
# blktap's batmap header: 512 bytes just after the BAT (a blktap extension).

_BATMAP_HEADER = struct.Struct(">8sQIIIBB32s32s418s")
assert _BATMAP_HEADER.size == BATMAP_HEADER_SIZE


@dataclass
class BatmapHeader:
    cookie: bytes = BATMAP_COOKIE
    batmap_offset: int = 0
    batmap_size: int = 0  # sectors
    batmap_version: int = BATMAP_VERSION
    checksum: int = 0
    marker: int = 0
    keyhash_cookie: int = 0  # 1 when a key hash is stored
    keyhash_nonce: bytes = b"\0" * 32
    keyhash_hash: bytes = b"\0" * 32
    reserved: bytes = b"\0" * 418

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> BatmapHeader:
        return cls(*_BATMAP_HEADER.unpack_from(buf))

    def pack(self) -> bytes:
        return _BATMAP_HEADER.pack(
            self.cookie, self.batmap_offset, self.batmap_size, self.batmap_version,
            self.checksum, self.marker, self.keyhash_cookie, self.keyhash_nonce,
            self.keyhash_hash, self.reserved,
        )


def batmap_checksum(map_bytes: bytes | bytearray | memoryview, curr_size: int,
                    version: int = BATMAP_VERSION) -> int:
    """The batmap checksum rule of blktap.

    The reference sums ``pad512(curr_size >> 24)`` bytes of the map: one bit per 2 MiB block
    rounded to sectors, computed from the *current* size (not the BAT size), which assumes
    2 MiB blocks. Version 1.1 summed the bytes as signed chars.
    """
    # At least one sector, even below 16 MiB (the reference rounds "up, never to zero").
    length = max(1, -(-(curr_size >> 24) // SECTOR_SIZE)) * SECTOR_SIZE
    data = bytes(map_bytes[:length])
    if version == BATMAP_VERSION_1_1:
        total = sum(b - 256 if b >= 128 else b for b in data)
    else:
        total = sum(data)
    return ~total & 0xFFFFFFFF


def sectors_round_up(nbytes: int) -> int:
    return -(-nbytes // SECTOR_SIZE)


def pad_sector(nbytes: int) -> int:
    return sectors_round_up(nbytes) * SECTOR_SIZE
