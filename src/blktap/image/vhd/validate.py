"""Validation rules for VHD metadata, shared by opening (lenient) and checking (strict).

Each function returns the reason a structure is invalid, in the words ``vhd-util check``
prints, or None. The order of the tests is the reference's, so the first reason reported
for a structure with several faults is the same.
"""

from __future__ import annotations

import time

from blktap.image.vhd import structs as s
from blktap.image.vhd.locators import reserved_size

# A timestamp up to this far in the future is tolerated (clock skew between hosts).
FUTURE_SLACK = 1800
KNOWN_PLAT_CODES = frozenset(s.PLAT_CODE_NAMES) - {s.PLAT_CODE_NONE}


def now_vhd() -> int:
    return (int(time.time()) - s.VHD_EPOCH_OFFSET) & 0xFFFFFFFF


def old_tap_hidden_quirk(footer: s.Footer) -> bool:
    """blktap 0.1 and 1.1 set the hidden byte without updating the checksum."""
    return (footer.hidden != 0 and footer.crtr_app[:3] == b"tap"
            and footer.crtr_ver in (0x00000001, 0x00010001))


def footer_checksum_ok(footer: s.Footer, raw: bytes) -> bool:
    if footer.checksum == s.checksum(raw, s.FOOTER_CHECKSUM_FIELD):
        return True
    if old_tap_hidden_quirk(footer):
        unhidden = raw[: s.FOOTER_HIDDEN_OFFSET] + b"\0" + raw[s.FOOTER_HIDDEN_OFFSET + 1 :]
        return footer.checksum == s.checksum(unhidden, s.FOOTER_CHECKSUM_FIELD)
    return False


def footer_problem(footer: s.Footer, raw: bytes, *, strict: bool = True,
                   check_time: bool = True, allow_poison: bool = False) -> str | None:
    """Why a footer is invalid, or None. ``strict`` adds the tests that only ``check``
    applies (reserved fields, geometry, creation time); opening an image uses the lenient
    set, which is what reading it safely needs."""
    cookie_ok = footer.cookie == s.FOOTER_COOKIE or (
        allow_poison and footer.cookie == s.POISON_COOKIE)
    if not cookie_ok:
        return "invalid cookie"
    if not footer_checksum_ok(footer, raw):
        return "invalid checksum"
    if not strict and footer.type not in (s.DISK_TYPE_FIXED, s.DISK_TYPE_DYNAMIC,
                                          s.DISK_TYPE_DIFF):
        return f"invalid type {footer.type}"
    if strict:
        if not footer.features & s.FEATURE_RESERVED:
            return "invalid 'reserved' feature"
        if footer.features & ~(s.FEATURE_TEMPORARY | s.FEATURE_RESERVED):
            return "invalid extra features"
        if footer.ff_version != s.FILE_FORMAT_VERSION:
            return "invalid file format version"
    if (footer.type not in (s.DISK_TYPE_DYNAMIC, s.DISK_TYPE_DIFF)
            and footer.data_offset != s.FIXED_DATA_OFFSET):
        return "invalid data offset"
    if strict:
        if check_time and footer.timestamp > now_vhd() + FUTURE_SLACK:
            return "creation time in future"
        if footer.crtr_app[:3] == b"tap" and footer.crtr_ver > s.CREATOR_VERSION:
            return "unsupported tap creator version"
        if s.pack_geometry(*s.geometry(footer.curr_size)) < footer.geometry:
            return "geometry too large"
    if footer.type not in (s.DISK_TYPE_FIXED, s.DISK_TYPE_DYNAMIC, s.DISK_TYPE_DIFF):
        return "invalid type"
    if strict:
        if footer.saved not in (0, 1):
            return "invalid 'saved' state"
        if footer.hidden not in (0, 1):
            return "invalid 'hidden' state"
        if any(footer.reserved):
            return "invalid 'reserved' bits"
        if footer.uuid == b"\0" * 16:
            return "invalid (NULL) uuid"
    if footer.is_dynamic and footer.data_offset in (s.FIXED_DATA_OFFSET, 0):
        return "invalid data offset"
    if footer.curr_size % s.SECTOR_SIZE:
        return "invalid size"
    if footer.curr_size > s.MAX_VHD_SIZE:
        return "invalid size"
    return None


def header_problem(header: s.Header, raw: bytes, *, file_size: int | None = None,
                   strict: bool = True) -> str | None:
    """Why a dynamic-disk header is invalid, or None."""
    if header.cookie != s.HEADER_COOKIE:
        return "invalid cookie"
    if header.checksum != s.checksum(raw, s.HEADER_CHECKSUM_FIELD):
        return "invalid checksum"
    if header.hdr_ver != s.HEADER_VERSION:
        return "invalid header version"
    if header.data_offset != s.UNUSED_DATA_OFFSET:
        return "invalid data offset"
    if file_size is not None and (
            header.table_offset == 0 or header.table_offset % s.SECTOR_SIZE
            or header.table_offset + 4 * header.max_bat_size > file_size - s.FOOTER_SIZE):
        return "invalid table offset"
    bs = header.block_size
    if bs == 0 or bs & (bs - 1):
        return "invalid block size"
    if bs < s.SECTOR_SIZE or bs > s.DEFAULT_BLOCK_SIZE:
        return "invalid block size"
    if strict and (header.res1 or any(header.res2)):
        return "invalid reserved bits"
    for loc in header.loc:
        if loc.code != s.PLAT_CODE_NONE and loc.code not in KNOWN_PLAT_CODES:
            return "invalid platform code"
    return None


def decode_parent_name(header: s.Header) -> str | None:
    """The header's parent name as ``check`` reads it: UTF-16BE, ASCII only, backslashes
    turned into slashes and a drive letter dropped. None when it does not decode."""
    raw = header.prt_name
    chars = []
    for i in range(0, len(raw), 2):
        code = raw[i] << 8 | raw[i + 1]
        if code == 0:
            break
        if code > 0x7F:
            return None
        chars.append(chr(code))
    name = "".join(chars).replace("\\", "/")
    if len(name) >= 2 and name[0] in "cC" and name[1] == ":":
        name = name[2:]
    return name


def diff_header_problem(footer: s.Footer, header: s.Header, *,
                        check_time: bool = True) -> str | None:
    """The checks on the parent fields: present and sane for a differencing disk, absent
    for a dynamic one."""
    if footer.type == s.DISK_TYPE_DIFF:
        if check_time and header.prt_ts > now_vhd() + FUTURE_SLACK:
            return "parent creation time in future"
        if decode_parent_name(header) is None:
            return "invalid parent name"
        return None
    if footer.type == s.DISK_TYPE_DYNAMIC:
        if any(header.prt_name):
            return "invalid non-null parent name"
        if any(any(loc.pack()) for loc in header.loc):
            return "invalid non-null parent locators"
        if header.prt_uuid != b"\0" * 16:
            return "invalid non-null parent uuid"
        if header.prt_ts != 0:
            return "invalid non-zero parent timestamp"
    return None


def batmap_problem(bhdr: s.BatmapHeader, batmap: bytes, *, curr_size: int,
                   max_bat_size: int, file_size: int) -> str | None:
    if bhdr.cookie != s.BATMAP_COOKIE:
        return "invalid cookie"
    if bhdr.batmap_version > s.BATMAP_VERSION:
        return "unsupported batmap version"
    if s.batmap_checksum(batmap, curr_size, bhdr.batmap_version) != bhdr.checksum:
        return "invalid checksum"
    if bhdr.batmap_size == 0:
        return "invalid size zero"
    if bhdr.batmap_size * 4096 < max_bat_size:
        return "batmap-BAT size mismatch"
    if bhdr.batmap_offset == 0 or bhdr.batmap_offset % s.SECTOR_SIZE:
        return "invalid batmap offset"
    if bhdr.batmap_offset + bhdr.batmap_size * s.SECTOR_SIZE > file_size - s.FOOTER_SIZE:
        return "invalid batmap size"
    return None


def locator_problem(loc: s.ParentLocator, file_size: int) -> str | None:
    if loc.code != s.PLAT_CODE_NONE and loc.code not in KNOWN_PLAT_CODES:
        return "invalid platform code"
    if loc.code == s.PLAT_CODE_NONE:
        if any(loc.pack()):
            return "non-zero locator"
        return None
    if loc.data_offset == 0:
        return "invalid data offset"
    if loc.data_space == 0:
        return "invalid data space"
    if loc.data_len == 0:
        return "invalid data length"
    if loc.data_offset + reserved_size(loc) > file_size - s.FOOTER_SIZE:
        return "invalid size"
    if loc.data_len > reserved_size(loc):
        return "invalid data length"
    if loc.reserved:
        return "invalid reserved bits"
    return None
