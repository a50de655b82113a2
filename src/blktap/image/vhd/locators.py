"""Parent locators: how a differencing VHD names its parent.

blktap writes three locators, MACX, W2KU and W2RU, in that order, each holding the path of
the parent *relative to the child's folder* (e.g. ``./base.vhd``): MACX as a UTF-8
``file://`` URL, W2KU and W2RU as UTF-16LE with backslashes. That W2KU is relative goes
against the specification (which calls it absolute); we follow blktap because its readers
and ours resolve any locator both ways.

A parent on a Ceph cluster (docs/ceph.md) is named by one MACX locator holding the URL
``rbd:POOL/IMAGE@SNAP[:conf=...][:id=...]`` (UTF-8) and no W2KU/W2RU locator: MACX holds
a URL, and readers that know only ``file://`` URLs (the reference, older blktap) find no
parent instead of looking for a file of that name. Where the header keeps the parent's
file name, it keeps the whole spec.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

from blktap.image.vhd import structs as s


def relative_path(child_path: str, parent_path: str) -> str:
    """Path of ``parent_path`` relative to the folder of ``child_path``, starting with
    ``./`` or ``../`` as blktap writes it."""
    child_dir = os.path.dirname(os.path.realpath(child_path))
    parent_real = os.path.realpath(parent_path)
    rel = os.path.relpath(parent_real, child_dir)
    if not rel.startswith("../"):
        rel = "./" + rel
    return rel


def encode(code: int, path: str) -> bytes:
    """The payload of a locator of platform ``code`` naming ``path``."""
    if code == s.PLAT_CODE_MACX:
        return ("file://" + path).encode("utf-8")
    if code in (s.PLAT_CODE_W2KU, s.PLAT_CODE_W2RU):
        # A relative path always gets a ".\" prefix: "./p" becomes ".\p", "../p" ".\..\p".
        if not path.startswith("/"):
            path = "./" + (path[2:] if path.startswith("./") else path)
        return path.replace("/", "\\").encode("utf-16-le")
    raise ValueError(f"cannot encode locator code {code:#x}")


def decode(code: int, payload: bytes) -> str | None:
    """The path a locator payload names, or None if the payload cannot be decoded."""
    try:
        if code == s.PLAT_CODE_MACX:
            text = payload.split(b"\0", 1)[0].decode("utf-8")
            if not text.startswith("file://"):
                return None
            return text[len("file://") :]
        if code in (s.PLAT_CODE_W2KU, s.PLAT_CODE_W2RU):
            if len(payload) % 2:
                return None
            text = payload.decode("utf-16-le")
            text = text.split("\0", 1)[0]
            text = text.replace("\\", "/")
            if len(text) >= 2 and text[1] == ":" and text[0].isalpha():
                text = text[2:]
            return text
    except UnicodeDecodeError:
        return None
    return None


RBD_PREFIX = "rbd:"


def encode_rbd(spec: str) -> bytes:
    """The payload of the MACX locator naming the Ceph parent ``spec``."""
    if not spec.startswith(RBD_PREFIX):
        raise ValueError(f"{spec!r} is no rbd: spec")
    return spec.encode("utf-8")


def reserved_size(loc: s.ParentLocator) -> int:
    """Bytes a locator reserves: sectors when below one sector, bytes when a multiple of
    512 (blktap's writers), nothing otherwise (the reference's reading)."""
    if loc.data_space < s.SECTOR_SIZE:
        return loc.data_space * s.SECTOR_SIZE
    if loc.data_space % s.SECTOR_SIZE == 0:
        return loc.data_space
    return 0


def read_name(fd: int, loc: s.ParentLocator, *,
              pread: Callable[[int, int], bytes] | None = None) -> str | None:
    """The path a locator of an open image names, or None when it cannot be read or
    decoded: only MACX, W2KU and W2RU carry paths, the reserved space must be readable,
    and the name must be ASCII (the reference converts through ASCII). ``pread(length,
    offset)`` reads instead of ``fd`` (the checker reads a file as a plan would leave it)."""
    if loc.code not in (s.PLAT_CODE_MACX, s.PLAT_CODE_W2KU, s.PLAT_CODE_W2RU):
        return None
    data = _payload(fd, loc, pread)
    if data is None:
        return None
    if loc.code != s.PLAT_CODE_MACX and len(data) % 2:
        return None
    name = decode(loc.code, data)
    if name is None or not name.isascii():
        return None
    return name


def _payload(fd: int, loc: s.ParentLocator,
             pread: Callable[[int, int], bytes] | None) -> bytes | None:
    size = reserved_size(loc)
    if size == 0 or loc.data_len > size:
        return None
    try:
        payload = (pread or functools.partial(os.pread, fd))(size, loc.data_offset)
    except OSError:
        return None
    if len(payload) < size:
        return None
    return payload[: loc.data_len]


def read_rbd(fd: int, loc: s.ParentLocator, *,
             pread: Callable[[int, int], bytes] | None = None) -> str | None:
    """The ``rbd:`` spec a MACX locator holds (a parent on Ceph), else None."""
    if loc.code != s.PLAT_CODE_MACX:
        return None
    data = _payload(fd, loc, pread)
    if data is None or not data.startswith(RBD_PREFIX.encode()):
        return None
    try:
        text = data.split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.isascii() and text.isprintable() else None


def resolve(child_path: str, name: str) -> str | None:
    """Find the file a decoded locator name refers to: the name itself if it is absolute
    and exists, else the name taken relative to the child's folder. None if neither
    exists."""
    if os.path.isabs(name) and os.path.exists(name):
        return os.path.realpath(name)
    child_dir = os.path.dirname(os.path.realpath(child_path))
    candidate = os.path.join(child_dir, name)
    if os.path.exists(candidate):
        return os.path.realpath(candidate)
    return None
