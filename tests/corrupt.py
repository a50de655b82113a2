"""Corrupt-image generators for the bad-input tests.

Every ``damage_*`` / ``make_*`` function takes the path of a *valid* image and damages it in
place in exactly one way. Wherever a checksum covers the field that is changed, the checksum
is recomputed, so that the named problem is the only thing wrong with the file (a reader
that merely checks checksums cannot pass these tests by luck).

The helpers at the top (``read_footer``, ``write_footers``, ``read_header``,
``write_header``, ``read_bat``, ``write_bat_entry``, ``set_parent``) use the struct
classes of :mod:`blktap.image.vhd.structs` and are also handy for building odd-but-valid
images in other tests (a fast-resized child, a shrunken child, ...).

Requirements on the input image are stated in each docstring: "dynamic" means a dynamic or
differencing VHD, "written" means one with allocated blocks.
"""

from __future__ import annotations

import os
from dataclasses import replace

from blktap.image.vhd import locators
from blktap.image.vhd import structs as s

# --------------------------------------------------------------------------------------
# Low-level helpers


def _pread(path: str, length: int, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise ValueError(f"{path}: short read of {length} bytes at {offset}")
    return data


def _pwrite(path: str, data: bytes, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def read_footer(path: str) -> s.Footer:
    """The primary footer (the last 512 bytes)."""
    size = os.path.getsize(path)
    return s.Footer.unpack(_pread(path, s.FOOTER_SIZE, size - s.FOOTER_SIZE))


def read_backup_footer(path: str) -> s.Footer:
    return s.Footer.unpack(_pread(path, s.FOOTER_SIZE, 0))


def write_footers(path: str, footer: s.Footer, *, seal: bool = True,
                  backup: bool | None = None) -> None:
    """Write ``footer`` over the primary footer and (by default, for dynamic disks) over the
    backup copy at offset 0. ``seal`` recomputes the checksum first."""
    if seal:
        footer = footer.sealed()
    raw = footer.pack()
    size = os.path.getsize(path)
    _pwrite(path, raw, size - s.FOOTER_SIZE)
    if backup is None:
        backup = footer.data_offset != s.FIXED_DATA_OFFSET
    if backup:
        _pwrite(path, raw, 0)


def read_header(path: str) -> s.Header:
    foot = read_footer(path)
    return s.Header.unpack(_pread(path, s.HEADER_SIZE, foot.data_offset))


def write_header(path: str, header: s.Header, *, seal: bool = True) -> None:
    if seal:
        header = header.sealed()
    _pwrite(path, header.pack(), read_footer(path).data_offset)


def read_bat(path: str) -> list[int]:
    h = read_header(path)
    raw = _pread(path, h.max_bat_size * 4, h.table_offset)
    return [int.from_bytes(raw[i : i + 4], "big") for i in range(0, len(raw), 4)]


def write_bat_entry(path: str, index: int, value: int) -> None:
    h = read_header(path)
    _pwrite(path, value.to_bytes(4, "big"), h.table_offset + 4 * index)


def allocated(path: str) -> list[tuple[int, int]]:
    """(block index, sector) of every allocated block, in file order."""
    return sorted(((i, e) for i, e in enumerate(read_bat(path)) if e != s.BAT_ENTRY_UNUSED),
                  key=lambda t: t[1])


def read_batmap(path: str) -> tuple[int, s.BatmapHeader, bytes]:
    """(header offset, batmap header, map bytes) of a blktap dynamic VHD."""
    h = read_header(path)
    off = h.table_offset + s.pad_sector(h.max_bat_size * 4)
    bh = s.BatmapHeader.unpack(_pread(path, s.BATMAP_HEADER_SIZE, off))
    if bh.cookie != s.BATMAP_COOKIE:
        raise ValueError(f"{path} has no batmap")
    data = _pread(path, bh.batmap_size * s.SECTOR_SIZE, bh.batmap_offset)
    return off, bh, data


def set_footer_fields(path: str, **fields: object) -> None:
    """Change footer fields (both copies) and fix the checksum."""
    write_footers(path, replace(read_footer(path), **fields))


def set_header_fields(path: str, **fields: object) -> None:
    """Change header fields and fix the checksum."""
    write_header(path, replace(read_header(path), **fields))


def set_parent(child: str, name: str, parent_uuid: bytes | None = None) -> None:
    """Make the differencing VHD ``child`` name ``name`` (a path as a locator holds it,
    e.g. ``./other.vhd``) in every locator it has, and in ``prt_name``; optionally change
    ``prt_uuid``. The new payloads must fit in the space the locators already reserve."""
    h = read_header(child)
    for loc in h.loc:
        if loc.code == s.PLAT_CODE_NONE:
            continue
        payload = locators.encode(loc.code, name)
        space = loc.space_bytes
        if len(payload) > space:
            raise ValueError(f"{name!r} does not fit in a locator of {space} bytes")
        _pwrite(child, payload.ljust(space, b"\0"), loc.data_offset)
        loc.data_len = len(payload)
    h.prt_name = s.Header.encode_parent_name(os.path.basename(name))
    if parent_uuid is not None:
        h.prt_uuid = parent_uuid
    write_header(child, h)


def first_locator_index(path: str) -> int:
    for i, loc in enumerate(read_header(path).loc):
        if loc.code != s.PLAT_CODE_NONE:
            return i
    raise ValueError(f"{path} has no parent locator")


# --------------------------------------------------------------------------------------
# The corruptions


def truncate(path: str, length: int | None = None) -> None:
    """Cut the file short (default: to half its size, rounded down to a sector). This
    removes the primary footer and cuts through the metadata or the data blocks (a dynamic
    disk keeps its backup footer at offset 0, so the reader must notice the BAT or the
    blocks running past the end of the file). Any image."""
    if length is None:
        length = os.path.getsize(path) // 2 // s.SECTOR_SIZE * s.SECTOR_SIZE
    os.truncate(path, length)


def damage_footer_cookie(path: str) -> None:
    """Replace the cookie "conectix" of both footer copies (the copy at 0 only for dynamic
    disks) with "notavhd!"; the checksums are recomputed. Any image."""
    set_footer_fields(path, cookie=b"notavhd!")


def damage_footer_checksum(path: str, *, backup_too: bool = True) -> None:
    """Make the footer checksum wrong (flip bits of the stored value) in the primary footer
    and, unless ``backup_too`` is false, in the backup copy at 0. Any image (the backup
    copy exists only for dynamic disks)."""
    foot = read_footer(path).sealed()
    foot.checksum ^= 0x00FF00FF
    write_footers(path, foot, seal=False, backup=backup_too and foot.is_dynamic)


def damage_header_cookie(path: str) -> None:
    """Replace the dynamic header cookie "cxsparse" with "cxsparsX" (checksum recomputed).
    Dynamic."""
    set_header_fields(path, cookie=b"cxsparsX")


def damage_header_checksum(path: str) -> None:
    """Make the dynamic header checksum wrong. Dynamic."""
    h = read_header(path).sealed()
    h.checksum ^= 0x0F0F0000
    write_header(path, h, seal=False)


def damage_bat_entry_past_eof(path: str) -> None:
    """Point a BAT entry (the first allocated block, else block 0) at a sector well past
    the end of the file. Dynamic."""
    used = allocated(path)
    index = used[0][0] if used else 0
    write_bat_entry(path, index, os.path.getsize(path) // s.SECTOR_SIZE + 10_000)


def damage_bat_entry_into_metadata(path: str) -> None:
    """Point a BAT entry (the first allocated block, else block 0) into the metadata: at
    the BAT itself. Dynamic."""
    used = allocated(path)
    index = used[0][0] if used else 0
    write_bat_entry(path, index, read_header(path).table_offset // s.SECTOR_SIZE)


def damage_bat_overlap(path: str) -> None:
    """Make two allocated blocks overlap: the block furthest into the file is moved to
    start 8 sectors after the block before it (so both still lie inside the file, but they
    share all but 4 KiB). Dynamic, written, with at least two allocated blocks."""
    used = allocated(path)
    if len(used) < 2:
        raise ValueError(f"{path} needs two allocated blocks")
    (_, first_sector), (last_index, _) = used[-2], used[-1]
    write_bat_entry(path, last_index, first_sector + 8)


def make_parent_loop(a: str, b: str) -> None:
    """Make the differencing VHDs ``a`` and ``b`` (in the same folder) name each other as
    parent: locators, ``prt_name`` and ``prt_uuid`` (so the UUID check passes and only the
    loop is wrong). Build them with ``snapshot(a, base)`` then
    ``snapshot(b, a, skip_empty=False)``."""
    uuid_a, uuid_b = read_footer(a).uuid, read_footer(b).uuid
    set_parent(a, "./" + os.path.basename(b), uuid_b)
    set_parent(b, "./" + os.path.basename(a), uuid_a)


def make_self_loop(a: str) -> None:
    """Make the differencing VHD ``a`` name itself as its parent (with its own UUID)."""
    set_parent(a, "./" + os.path.basename(a), read_footer(a).uuid)


def make_missing_parent(path: str) -> None:
    """Make every locator of the differencing VHD name ``./missing-parent.vhd``, which does
    not exist (the caller must not create it)."""
    set_parent(path, "./missing-parent.vhd")


def damage_locator_garbage(path: str) -> None:
    """Fill every locator payload with bytes that decode to no path (invalid UTF-8 after
    ``file://``, an unpaired UTF-16 surrogate). Differencing."""
    h = read_header(path)
    for loc in h.loc:
        if loc.code == s.PLAT_CODE_NONE:
            continue
        if loc.code == s.PLAT_CODE_MACX:
            payload = b"file://\xff\xfe\xc3(\xa0\xa1"
        else:
            payload = b"\x00\xd8\x41\x00" * 2  # a lone high surrogate, then "A"
        _pwrite(path, payload.ljust(loc.space_bytes, b"\0"), loc.data_offset)
        loc.data_len = len(payload)
    write_header(path, h)


def damage_locator_length(path: str) -> None:
    """Give the first parent locator an absurd payload length (0xFFFFFFF0 bytes; header
    checksum fixed). Differencing."""
    h = read_header(path)
    h.loc[first_locator_index(path)].data_len = 0xFFFFFFF0
    write_header(path, h)


def damage_locator_offset(path: str) -> None:
    """Give the first parent locator an absurd data offset (2**64 - 512; header checksum
    fixed). Differencing."""
    h = read_header(path)
    h.loc[first_locator_index(path)].data_offset = (1 << 64) - s.SECTOR_SIZE
    write_header(path, h)


def damage_locator_space(path: str) -> None:
    """Give the first parent locator an absurd reserved space (0xFFFFFE00 bytes, far past
    the end of the file) while its payload stays small and valid (header checksum fixed).
    Differencing."""
    h = read_header(path)
    h.loc[first_locator_index(path)].data_space = 0xFFFFFE00
    write_header(path, h)


def damage_block_size(path: str, block_size: int = 0x180000) -> None:
    """Set a block size that is not a power of two (default 1.5 MiB, which is within the
    accepted range, so only the power-of-two rule is broken); header checksum fixed.
    Dynamic."""
    set_header_fields(path, block_size=block_size)


def damage_curr_size(path: str) -> None:
    """Set the footer's current size to 2**64 - 512 (a multiple of the sector size that
    overflows every offset computation); both footer copies, checksums fixed. Any image."""
    set_footer_fields(path, curr_size=(1 << 64) - s.SECTOR_SIZE)


def damage_curr_size_unaligned(path: str) -> None:
    """Set the footer's current size to a value that is not a whole number of sectors
    (one byte more); checksums fixed. Any image."""
    foot = read_footer(path)
    set_footer_fields(path, curr_size=foot.curr_size + 1)


def damage_fixed_size(path: str) -> None:
    """Make a fixed disk claim twice the size its file holds (checksum fixed). Fixed."""
    foot = read_footer(path)
    set_footer_fields(path, curr_size=foot.curr_size * 2, orig_size=foot.curr_size * 2)


def damage_max_bat_size(path: str) -> None:
    """Set the header's max_bat_size to 0xFFFFFFFF (a 16 GiB BAT in a small file); header
    checksum fixed. Dynamic."""
    set_header_fields(path, max_bat_size=0xFFFFFFFF)


def damage_disk_type(path: str) -> None:
    """Set the footer's disk type to 7 (no such type); both copies, checksums fixed."""
    set_footer_fields(path, type=7)


def damage_header_offset(path: str) -> None:
    """Point the footer's data_offset (where the dynamic header is) far past the end of the
    file (2**63); both copies, checksums fixed. Dynamic."""
    set_footer_fields(path, data_offset=1 << 63)


def damage_table_offset(path: str) -> None:
    """Point the header's table_offset (the BAT) far past the end of the file (2**62);
    header checksum fixed. Dynamic."""
    set_header_fields(path, table_offset=1 << 62)


def damage_batmap_checksum(path: str) -> None:
    """Set the batmap bit of every allocated block (each claims to be fully written)
    without updating the batmap checksum, so the map and its checksum disagree. A reader
    that trusted the map would skip the sector bitmaps and return wrong data for partially
    written blocks; the reader must ignore the batmap instead. Bits of unallocated blocks
    are left clear. Dynamic (blktap, with a batmap), written."""
    off, bh, data = read_batmap(path)
    new = bytearray(data)
    for index, _ in allocated(path):
        new[index >> 3] |= 0x80 >> (index & 7)
    curr = read_footer(path).curr_size
    if s.batmap_checksum(new, curr, bh.batmap_version) == bh.checksum:
        bh.checksum ^= 0x1
    _pwrite(path, bh.pack(), off)
    _pwrite(path, bytes(new), bh.batmap_offset)


def damage_batmap_offset(path: str) -> None:
    """Point the batmap header's batmap_offset far past the end of the file (2**60).
    Dynamic (blktap, with a batmap)."""
    off, bh, _ = read_batmap(path)
    bh.batmap_offset = 1 << 60
    _pwrite(path, bh.pack(), off)
