"""The text of ``vhd-util read -p``: footer, header, parent locators and batmap summaries,
laid out byte for byte as the reference prints them (storage managers parse it)."""

from __future__ import annotations

import os
import time
import uuid as _uuid

from blktap.cli.vhd_util.common import signed_byte
from blktap.image.fileio import file_size_of
from blktap.image.vhd import locators
from blktap.image.vhd import structs as s
from blktap.image.vhd import validate as v
from blktap.image.vhd.image import VhdImage

DISK_TYPES = {
    0: "None",
    1: "Reserved (deprecated)",
    2: "Fixed hard disk",
    3: "Dynamic hard disk",
    4: "Differencing hard disk",
    5: "Reserved (deprecated)",
    6: "Reserved (deprecated)",
}


def conv(value: int, hex_: bool) -> str:
    """A number as read prints it: decimal, or with -x C's %#llx (0 stays "0")."""
    if hex_ and value:
        return f"{value:#x}"
    return str(value)


def time_string(vhd_seconds: int) -> str:
    """ctime(3) of a VHD timestamp, without the newline, in local time."""
    return time.strftime("%a %b %e %H:%M:%S %Y", time.localtime(s.unix_time(vhd_seconds)))


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("latin-1")


def _line(label: str, value: str) -> str:
    return f"{label:<20}: {value}\n"


def footer_text(footer: s.Footer, hex_: bool = False) -> str:
    c = lambda n: conv(n, hex_)  # noqa: E731
    features = f"(0x{footer.features:08x}) "
    if footer.features & s.FEATURE_TEMPORARY:
        features += "<TEMP>"
    if footer.features & s.FEATURE_RESERVED:
        features += "<RESV>"
    if footer.crtr_os == s.CREATOR_OS_WINDOWS:
        os_name = "Windows"
    elif footer.crtr_os == s.CREATOR_OS_MAC:
        os_name = "Macintosh"
    else:
        os_name = "Unknown!"
    cyl, heads, spt = s.unpack_geometry(footer.geometry)
    chs = cyl * heads * spt
    recomputed = footer.compute_checksum()
    out = [
        "VHD Footer Summary:\n-------------------\n",
        _line("Cookie", _cstr(footer.cookie)),
        _line("Features", features),
        _line("File format version",
              f"Major: {footer.ff_version >> 16}, Minor: {footer.ff_version & 0xFFFF}"),
        _line("Data offset", c(footer.data_offset)),
        _line("Timestamp", time_string(footer.timestamp)),
        _line("Creator Application", f"'{_cstr(footer.crtr_app)}'"),
        _line("Creator version",
              f"Major: {footer.crtr_ver >> 16}, Minor: {footer.crtr_ver & 0xFFFF}"),
        _line("Creator OS", os_name),
        _line("Original disk size",
              f"{c(footer.orig_size >> 20)} MB ({c(footer.orig_size)} Bytes)"),
        _line("Current disk size",
              f"{c(footer.curr_size >> 20)} MB ({c(footer.curr_size)} Bytes)"),
        _line("Geometry", f"Cyl: {c(cyl)}, Hds: {c(heads)}, Sctrs: {c(spt)}"),
        _line("", f"= {c(chs >> 11)} MB ({c(chs << 9)} Bytes)"),
        _line("Disk type", DISK_TYPES.get(footer.type, "Unknown type!\n")),
        _line("Checksum", f"0x{footer.checksum:x}|0x{recomputed:x} "
              f"({'Good!' if footer.checksum == recomputed else 'Bad!'})"),
        _line("UUID", str(_uuid.UUID(bytes=footer.uuid))),
        _line("Saved state", "Yes" if footer.saved else "No"),
        _line("Hidden", str(signed_byte(footer.hidden))),
        "\n",
    ]
    return "".join(out)


def _parent_name_for_dump(header: s.Header) -> str:
    """read -p decodes all 512 bytes: any non-ASCII unit anywhere fails the whole name."""
    raw = header.prt_name
    for i in range(0, len(raw), 2):
        if (raw[i] << 8 | raw[i + 1]) > 0x7F:
            return "failed to read name"
    name = v.decode_parent_name(header)
    return "failed to read name" if name is None else name


def header_text(header: s.Header, hex_: bool = False) -> str:
    c = lambda n: conv(n, hex_)  # noqa: E731
    recomputed = header.compute_checksum()
    out = [
        "VHD Header Summary:\n-------------------\n",
        _line("Cookie", _cstr(header.cookie)),
        _line("Data offset (unusd)", c(header.data_offset)),
        _line("Table offset", c(header.table_offset)),
        _line("Header version", f"0x{header.hdr_ver:08x}"),
        _line("Max BAT size", c(header.max_bat_size)),
        _line("Block size", f"{c(header.block_size)} ({c(header.block_size >> 20)} MB)"),
        _line("Parent name", _parent_name_for_dump(header)),
        _line("Parent UUID", str(_uuid.UUID(bytes=header.prt_uuid))),
        _line("Parent timestamp", time_string(header.prt_ts)),
        _line("Checksum", f"0x{header.checksum:x}|0x{recomputed:x} "
              f"({'Good!' if header.checksum == recomputed else 'Bad!'})"),
        "\n",
    ]
    return "".join(out)


def locators_text(image: VhdImage, hex_: bool = False) -> str:
    c = lambda n: conv(n, hex_)  # noqa: E731
    assert image.header is not None
    out = ["VHD Parent Locators:\n--------------------\n"]
    for i, loc in enumerate(image.header.loc):
        if loc.code == s.PLAT_CODE_NONE:
            continue
        name = locators.read_name(image.fd, loc)
        out.append(
            f"locator:            : {i}\n"
            f"       code         : {s.PLAT_CODE_NAMES.get(loc.code, 'UNKOWN')}\n"
            f"       data_space   : {c(loc.data_space)}\n"
            f"       data_length  : {c(loc.data_len)}\n"
            f"       data_offset  : {c(loc.data_offset)}\n")
        if name is None:
            out.append("failed to read parent name\n")
        else:
            out.append(f"       decoded name : {name}\n")
        out.append("\n")
    return "".join(out)


def batmap_text(image: VhdImage, hex_: bool = False) -> str:
    c = lambda n: conv(n, hex_)  # noqa: E731
    hdr = image.batmap_header
    if hdr is None or not image.batmap_valid:
        return "failed to get batmap header\n"
    recomputed = s.batmap_checksum(image.batmap or b"", image.footer.curr_size,
                                   hdr.batmap_version)
    out = [
        "VHD Batmap Summary:\n-------------------\n",
        _line("Batmap offset", c(hdr.batmap_offset)),
        _line("Batmap size (secs)", c(hdr.batmap_size)),
        _line("Batmap version", f"0x{hdr.batmap_version:08x}"),
    ]
    if hdr.keyhash_cookie == 1:
        out.append(f"Batmap keyhash nonce: {hdr.keyhash_nonce.hex()}\n")
        out.append(f"Batmap keyhash hash : {hdr.keyhash_hash.hex()}\n")
    out.append(_line("Checksum", f"0x{hdr.checksum:x}|0x{recomputed:x} "
                     f"({'Good!' if hdr.checksum == recomputed else 'Bad!'})"))
    out.append("\n")
    return "".join(out)


def image_text(image: VhdImage, hex_: bool = False) -> str:
    """The whole ``read -p`` dump of an open image."""
    parts = [footer_text(image.footer, hex_)]
    if image.footer.is_dynamic and image.header is not None:
        parts.append(header_text(image.header, hex_))
        if image.is_differencing:
            parts.append(locators_text(image, hex_))
        if image.has_batmap_format or image.batmap_header is not None:
            parts.append(batmap_text(image, hex_))
    return "".join(parts)


def open_failure_text(path: str, err: int) -> str:
    """What ``read`` prints for a file that does not open as a VHD (errno ``err``)."""
    return (f"Failed to open {path}: {-err}\n"
            f"\n{path} appears invalid; dumping headers\n\n" + (raw_headers_text(path) or ""))


def raw_headers_text(path: str) -> str | None:
    """Best-effort footer and header summaries of a file that does not open as a VHD (what
    read prints after "appears invalid; dumping headers"). None if the file is unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            size = file_size_of(fd)
        except OSError:
            size = 0
        footer_raw = bytes(s.FOOTER_SIZE)
        candidates = [(size - s.FOOTER_SIZE, s.FOOTER_SIZE)]
        if (size - 511) >= 0 and (size - 511) % 512 == 0:
            candidates.append((size - 511, 511))
        candidates.append((0, s.FOOTER_SIZE))
        for offset, length in candidates:
            if offset < 0:
                continue
            try:
                got = os.pread(fd, length, offset)
            except OSError:
                continue
            if len(got) == length:
                footer_raw = got.ljust(s.FOOTER_SIZE, b"\0")
                if v.footer_problem(s.Footer.unpack(footer_raw), footer_raw, strict=False,
                                    allow_poison=True) is None:
                    break
        footer = s.Footer.unpack(footer_raw)
        header_raw = bytes(s.HEADER_SIZE)
        if footer.type in (s.DISK_TYPE_DYNAMIC, s.DISK_TYPE_DIFF):
            try:
                got = os.pread(fd, s.HEADER_SIZE, footer.data_offset)
                if len(got) == s.HEADER_SIZE:
                    header_raw = got
            except (OSError, OverflowError):
                pass
        return footer_text(footer) + header_text(s.Header.unpack(header_raw))
    finally:
        os.close(fd)
