"""Rewriting a VHD's footers (``vhd-util repair``).

A writer killed mid-allocation can leave a file that does not end in a valid footer: the
reference's tapdisk appends blocks over the footer and only writes it back on close, and
a file system may keep a grown file whose tail was never written. Readers then fall back
to the copy at offset 0, but a plain ``check`` fails. Repair takes the footer (the
primary one, falling back to the copy at 0; or with ``use_backup`` the copy at 0 only),
gives it a fresh uuid if it has none, and writes it back at offset 0 and at the end of the
data, cutting anything after it.
"""

from __future__ import annotations

import errno
import os
import uuid as _uuid
from dataclasses import dataclass, replace

from blktap.errors import FormatError
from blktap.image.fileio import is_regular, pwrite_all
from blktap.image.vhd import structs as s
from blktap.image.vhd.image import VhdImage


@dataclass(frozen=True)
class RepairResult:
    footer_source: str  # where the footer was read: "primary", "short" or "backup"
    new_uuid: bool  # the footer had a null uuid and got a fresh one
    end: int  # offset of the footer at the end of the file
    trimmed: int  # bytes cut from the end of the file


def repair(path: str, *, use_backup: bool = False) -> RepairResult:
    """Rewrite both footers of ``path`` from the one that is still good.

    Order: the copy at 0 first (from then on readers and ``check -i`` accept the image),
    then the footer at the end of the data, then the file is cut after it. Every step
    leaves an image at least as readable as before, with the same content. An image
    disabled by an interrupted resize (a ``v_poison`` cookie in either copy) is refused:
    its journal must be reverted first, and a repaired footer would hide that.
    """
    image = VhdImage.open(path, writable=True, footer="backup" if use_backup else "auto",
                          allow_disabled=True, validate_bat=False)
    with image:
        fd = image.fd
        _refuse_disabled(image)
        footer = image.footer
        new_uuid = footer.uuid == b"\0" * 16
        if new_uuid:
            footer = replace(footer, uuid=_uuid.uuid4().bytes)
        raw = footer.sealed().pack()
        if footer.is_dynamic:
            pwrite_all(fd, raw, 0)
        trimmed = 0
        if is_regular(fd):
            end = image.end_of_data()
            pwrite_all(fd, raw, end)
            os.fsync(fd)  # the new end footer is durable before the file is cut to it
            if image.file_size > end + s.FOOTER_SIZE:
                trimmed = image.file_size - end - s.FOOTER_SIZE
                os.ftruncate(fd, end + s.FOOTER_SIZE)
        else:
            # A block device keeps its size: its footer lives in its last sector.
            end = image.file_size - s.FOOTER_SIZE
            pwrite_all(fd, raw, end)
        os.fsync(fd)
        return RepairResult(image.footer_source, new_uuid, end, trimmed)


def _refuse_disabled(image: VhdImage) -> None:
    candidates = [image.file_size - s.FOOTER_SIZE]
    if image.footer.is_dynamic:
        candidates.append(0)
    for offset in candidates:
        if os.pread(image.fd, 8, offset) == s.POISON_COOKIE:
            raise FormatError(f"{image.path} is disabled by an interrupted resize (revert "
                              f"its journal first)", errno.EINVAL)
