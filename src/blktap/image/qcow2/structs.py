"""On-disk structures of the qcow2 format (docs/interop/qcow2.txt in qemu).

Only declarations, packing and unpacking live here; the logic that interprets them is in
:mod:`blktap.image.qcow2.image`. Every integer on disk is big-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

MAGIC = b"QFI\xfb"

V2_HEADER_SIZE = 72
V3_HEADER_SIZE = 104
# qemu writes the compression type byte and pads the header to 112 bytes.
V3_HEADER_SIZE_WITH_COMPRESSION = 112

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MIN_CLUSTER_BITS_EXTENDED_L2 = 14
MAX_REFCOUNT_ORDER = 6
MAX_BACKING_NAME = 1023
# qemu refuses tables larger than these (bytes): 32 MiB of L1, 8 MiB of refcount table.
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536

CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1

# Incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE
                  | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2)
INCOMPAT_NAMES = {0: "dirty bit", 1: "corrupt bit", 2: "external data file",
                  3: "compression type", 4: "extended L2 entries"}
# Compatible feature bits.
COMPAT_LAZY_REFCOUNTS = 1 << 0
COMPAT_NAMES = {0: "lazy refcounts"}
# Autoclear feature bits.
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_NAMES = {0: "bitmaps", 1: "raw external data"}

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

FEATURE_TYPE_INCOMPAT = 0
FEATURE_TYPE_COMPAT = 1
FEATURE_TYPE_AUTOCLEAR = 2
FEATURE_NAME_ENTRY = 48

# L1 and L2 entries.
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
L1_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1_RESERVED_MASK = 0x7F000000000001FF
# Standard L2 descriptor: bits 1-8 and 56-61 are reserved.
L2_STANDARD_RESERVED_MASK = 0x3F000000000001FE
REFTABLE_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFTABLE_RESERVED_MASK = 0x1FF

SUBCLUSTERS = 32
SUBCLUSTER_ALLOC_MASK = 0xFFFFFFFF
BITMAP_TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00

# Bitmap directory entry flags.
BME_IN_USE = 1 << 0
BME_AUTO = 1 << 1

_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_HEADER_V3_EXTRA = struct.Struct(">QQQII")
_EXT_HEADER = struct.Struct(">II")


@dataclass
class Header:
    """The qcow2 header (v2: the first 72 bytes; v3: header_length bytes)."""

    magic: bytes = MAGIC
    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_SIZE
    compression_type: int = COMPRESSION_ZLIB

    @classmethod
    def unpack(cls, raw: bytes) -> Header:
        """Parse the header from the first bytes of the file (at least 72 of them; a v3
        header needs header_length bytes, which the caller reads once it knows it)."""
        (magic, version, bfo, bfs, cbits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
         nb_snap, snap_off) = _HEADER_V2.unpack_from(raw, 0)
        h = cls(magic, version, bfo, bfs, cbits, size, crypt, l1_size, l1_off, rt_off,
                rt_clusters, nb_snap, snap_off)
        if version >= 3 and len(raw) >= V3_HEADER_SIZE:
            (h.incompatible_features, h.compatible_features, h.autoclear_features,
             h.refcount_order, h.header_length) = _HEADER_V3_EXTRA.unpack_from(raw, 72)
            if h.header_length > V3_HEADER_SIZE and len(raw) > V3_HEADER_SIZE:
                h.compression_type = raw[V3_HEADER_SIZE]
        elif version == 2:
            h.refcount_order = 4
            h.header_length = V2_HEADER_SIZE
        return h

    def pack(self) -> bytes:
        raw = _HEADER_V2.pack(self.magic, self.version, self.backing_file_offset,
                              self.backing_file_size, self.cluster_bits, self.size,
                              self.crypt_method, self.l1_size, self.l1_table_offset,
                              self.refcount_table_offset, self.refcount_table_clusters,
                              self.nb_snapshots, self.snapshots_offset)
        if self.version < 3:
            return raw
        raw += _HEADER_V3_EXTRA.pack(self.incompatible_features, self.compatible_features,
                                     self.autoclear_features, self.refcount_order,
                                     self.header_length)
        if self.header_length > V3_HEADER_SIZE:
            raw += bytes([self.compression_type])
        return raw.ljust(self.header_length, b"\0")

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extensions_offset(self) -> int:
        return V2_HEADER_SIZE if self.version < 3 else self.header_length


# Byte offsets of header fields that are rewritten in place.
OFF_L1_SIZE = 36
OFF_L1_TABLE = 40
OFF_REFTABLE = 48
OFF_SNAPSHOTS = 60
OFF_INCOMPAT = 72
OFF_AUTOCLEAR = 88


@dataclass
class Extension:
    type: int
    data: bytes

    def pack(self) -> bytes:
        pad = -len(self.data) % 8
        return _EXT_HEADER.pack(self.type, len(self.data)) + self.data + b"\0" * pad


def unpack_extensions(raw: bytes) -> tuple[list[Extension], int] | str:
    """Parse header extensions from ``raw`` (the bytes after the header, up to the end of
    the first cluster). Returns (extensions, bytes used up to and with the end marker) or
    the reason they cannot be read."""
    pos, out = 0, []
    while True:
        if pos + 8 > len(raw):
            return "header extensions run past the end of the first cluster"
        etype, length = _EXT_HEADER.unpack_from(raw, pos)
        pos += 8
        if etype == EXT_END:
            return out, pos
        if pos + length > len(raw):
            return f"header extension 0x{etype:08x} ({length} bytes) runs past the " \
                   f"end of the first cluster"
        out.append(Extension(etype, bytes(raw[pos : pos + length])))
        pos += length + (-length % 8)


def pack_feature_names(names: list[tuple[int, int, str]]) -> bytes:
    return b"".join(struct.pack(">BB46s", t, b, n.encode()) for t, b, n in names)


def unpack_feature_names(data: bytes) -> dict[tuple[int, int], str]:
    out = {}
    for pos in range(0, len(data) - FEATURE_NAME_ENTRY + 1, FEATURE_NAME_ENTRY):
        ftype, bit, name = struct.unpack_from(">BB46s", data, pos)
        out[(ftype, bit)] = name.rstrip(b"\0").decode("utf-8", "replace")
    return out


# What blktap names in the feature-name table of the images it creates (as qemu does).
FEATURE_NAME_TABLE = [
    (FEATURE_TYPE_INCOMPAT, 0, "dirty bit"),
    (FEATURE_TYPE_INCOMPAT, 1, "corrupt bit"),
    (FEATURE_TYPE_INCOMPAT, 2, "external data file"),
    (FEATURE_TYPE_INCOMPAT, 3, "compression type"),
    (FEATURE_TYPE_INCOMPAT, 4, "extended L2 entries"),
    (FEATURE_TYPE_COMPAT, 0, "lazy refcounts"),
    (FEATURE_TYPE_AUTOCLEAR, 0, "bitmaps"),
    (FEATURE_TYPE_AUTOCLEAR, 1, "raw external data"),
]


_BITMAPS_EXT = struct.Struct(">IIQQ")


@dataclass
class BitmapsExtension:
    nb_bitmaps: int
    directory_size: int
    directory_offset: int

    @classmethod
    def unpack(cls, data: bytes) -> BitmapsExtension | None:
        if len(data) < _BITMAPS_EXT.size:
            return None
        nb, _reserved, size, off = _BITMAPS_EXT.unpack_from(data, 0)
        return cls(nb, size, off)


_BITMAP_DIR = struct.Struct(">QIIBBHI")


@dataclass
class BitmapEntry:
    table_offset: int
    table_size: int
    flags: int
    type: int
    granularity_bits: int
    name: str
    offset_in_directory: int


def unpack_bitmap_directory(raw: bytes, count: int) -> list[BitmapEntry] | str:
    pos, out = 0, []
    for _ in range(count):
        if pos + _BITMAP_DIR.size > len(raw):
            return "bitmap directory is shorter than its entries"
        toff, tsize, flags, btype, gbits, name_size, extra = _BITMAP_DIR.unpack_from(raw, pos)
        end = pos + _BITMAP_DIR.size + extra + name_size
        if end > len(raw):
            return "bitmap directory entry runs past the directory"
        name = raw[pos + _BITMAP_DIR.size + extra : end].decode("utf-8", "replace")
        out.append(BitmapEntry(toff, tsize, flags, btype, gbits, name, pos))
        pos = end + (-end % 8)
    return out


_SNAPSHOT = struct.Struct(">QIHHIIQII")


@dataclass
class Snapshot:
    """One entry of the internal snapshot table."""

    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    vm_state_size: int = 0
    extra: bytes = b""
    disk_size: int | None = None
    entry_size: int = field(default=0, compare=False)


def unpack_snapshot(raw: bytes, pos: int) -> Snapshot | str:
    """Parse one snapshot table entry at ``pos`` of ``raw``."""
    if pos + _SNAPSHOT.size > len(raw):
        return "snapshot table entry runs past the table"
    (l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vmstate,
     extra_size) = _SNAPSHOT.unpack_from(raw, pos)
    start = pos + _SNAPSHOT.size
    end = start + extra_size + id_len + name_len
    if end > len(raw):
        return "snapshot table entry runs past the table"
    extra = raw[start : start + extra_size]
    disk_size = struct.unpack_from(">Q", extra, 8)[0] if extra_size >= 16 else None
    ident = raw[start + extra_size : start + extra_size + id_len].decode("utf-8", "replace")
    name = raw[start + extra_size + id_len : end].decode("utf-8", "replace")
    end += -end % 8
    return Snapshot(l1_off, l1_size, ident, name, dsec, dnsec, clock, vmstate, bytes(extra),
                    disk_size, end - pos)


def pack_snapshot(snap: Snapshot) -> bytes:
    ident, name = snap.id.encode(), snap.name.encode()
    raw = _SNAPSHOT.pack(snap.l1_table_offset, snap.l1_size, len(ident), len(name),
                         snap.date_sec, snap.date_nsec, snap.vm_clock_nsec,
                         snap.vm_state_size, len(snap.extra)) + snap.extra + ident + name
    return raw + b"\0" * (-len(raw) % 8)


def compressed_geometry(cluster_bits: int) -> tuple[int, int]:
    """(offset mask, shift of the sector count) of a compressed cluster descriptor."""
    x = 62 - (cluster_bits - 8)
    return (1 << x) - 1, x


def l2_entry_bytes(extended: bool) -> int:
    return 16 if extended else 8
