"""Changed-block tracking logs: the reference's file format and what is done with it.

The layout is in :mod:`blktap.image.cbt.structs`: a 48-byte header, then a bitmap with one
bit per 64 KiB block of the disk, the first block in the least significant bit of the
first byte (the reference sets bits through little-endian ``unsigned long`` words, which
lands them there).

Nothing here prints; errors are :class:`~blktap.errors.CbtLogError` with the errno the
reference's ``cbt-util`` exits with (EIO for a short file, EINVAL for a bad request).
"""

from __future__ import annotations

import errno
import os
import stat
import uuid

from blktap.errors import CbtLogError, FormatError
from blktap.image.cbt.structs import HEADER_SIZE, MAX_SIZE, LogHeader, bitmap_size
from blktap.image.fileio import staged_path
from blktap.io.threads import read_full


def read_header_fd(fd: int, path: str) -> LogHeader:
    """The header of an open log (EIO if the file is shorter than a header)."""
    buf = bytearray(HEADER_SIZE)
    got = os.preadv(fd, [buf], 0)
    if got < HEADER_SIZE:
        raise CbtLogError(f"Failed to read CBT metadata from file {path}: "
                          f"{got} bytes, a header has {HEADER_SIZE}", errno.EIO)
    return LogHeader.unpack(buf)


def check_size(header: LogHeader, file_size: int, path: str) -> None:
    """The file holds the whole bitmap its header promises (EIO if short, EINVAL for a
    size field no disk has: a file that is not a log)."""
    if header.size > MAX_SIZE:
        raise CbtLogError(f"{path}: not a CBT log (disk size field {header.size})",
                          errno.EINVAL)
    want = HEADER_SIZE + header.bitmap_size
    if file_size < want:
        raise CbtLogError(f"Failed to read bitmap from file {path}: truncated, or not a "
                          f"CBT log ({file_size} bytes; the log of a {header.size}-byte "
                          f"disk has {want})", errno.EIO)


def read_bitmap_fd(fd: int, header: LogHeader, path: str) -> bytearray:
    """The whole bitmap of an open log whose header was read."""
    check_size(header, os.fstat(fd).st_size, path)
    buf = bytearray(header.bitmap_size)
    if buf:
        read_full(fd, [memoryview(buf)], HEADER_SIZE)
    return buf


def _open(path: str, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except OSError as exc:
        raise CbtLogError(f"Failed to open log file {path}. {os.strerror(exc.errno)}",
                          exc.errno) from None


def read_header(path: str) -> LogHeader:
    fd = _open(path, os.O_RDONLY)
    try:
        return read_header_fd(fd, path)
    finally:
        os.close(fd)


def read_log(path: str) -> tuple[LogHeader, bytearray]:
    """Header and bitmap of the log at ``path``."""
    fd = _open(path, os.O_RDONLY)
    try:
        header = read_header_fd(fd, path)
        return header, read_bitmap_fd(fd, header, path)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def create(path: str, size: int) -> LogHeader:
    """A new log (replacing a file of that name, as the reference's ``w+``): nil uuids,
    not consistent, every block clean. The bitmap's zeros are written, not left as a
    hole, so that marking blocks later never needs space the file system may not have.

    A log that is a file is built aside and renamed into place (keeping the old file's
    permissions): interrupted, or failing, it leaves the old log or none, never a part
    of one. A log that is a block device (a logical volume, as on LVM storage) is
    written in place: it cannot be replaced."""
    if size <= 0 or size > MAX_SIZE:
        raise CbtLogError(f"{path}: disk size {size} out of range", errno.EINVAL)
    header = LogHeader(size=size)
    data = header.pack() + bytes(header.bitmap_size)
    target = os.path.realpath(path)
    try:
        st: os.stat_result | None = os.stat(target)
    except OSError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        _write_new(path, path, data, os.O_RDWR | os.O_TRUNC, None)
        return header
    try:
        with staged_path(target, replace=True) as stage:
            _write_new(path, stage, data, os.O_RDWR,
                       stat.S_IMODE(st.st_mode) if st is not None else None)
    except CbtLogError:
        raise
    except FormatError as exc:  # the folder cannot take a new file
        raise CbtLogError(f"Failed to open log file {path}. {os.strerror(exc.errno)}",
                          exc.errno) from None
    return header


def _write_new(path: str, where: str, data: bytes, flags: int, mode: int | None) -> None:
    try:
        fd = os.open(where, flags | os.O_CLOEXEC)
    except OSError as exc:
        raise CbtLogError(f"Failed to open log file {path}. {os.strerror(exc.errno)}",
                          exc.errno) from None
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        _write_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def grow_fd(fd: int, header: LogHeader, new_size: int, path: str) -> LogHeader:
    """Make an open log cover ``new_size`` bytes: the new blocks are clean. The bitmap's
    new bytes are zeroed and synced before the header names the new size, so a crash
    leaves the old log or the new one. A smaller size is refused (EINVAL)."""
    if new_size < header.size:
        raise CbtLogError(f"Size smaller than current file size ({header.size})",
                          errno.EINVAL)
    if new_size > MAX_SIZE:
        raise CbtLogError(f"{path}: disk size {new_size} out of range", errno.EINVAL)
    old_bm, new_bm = header.bitmap_size, bitmap_size(new_size)
    if new_bm > old_bm:
        _write_all(fd, bytes(new_bm - old_bm), HEADER_SIZE + old_bm)
        os.fdatasync(fd)
    grown = LogHeader(header.parent, header.child, header.consistent, new_size)
    _write_all(fd, grown.pack(), 0)
    os.fdatasync(fd)
    return grown


def update(path: str, *, parent: uuid.UUID | None = None, child: uuid.UUID | None = None,
           consistent: int | None = None, size: int | None = None) -> LogHeader:
    """``cbt-util set``: change header fields; a size only grows (the bitmap with it)."""
    fd = _open(path, os.O_RDWR)
    try:
        header = read_header_fd(fd, path)
        if size:
            check_size(header, os.fstat(fd).st_size, path)
            header = grow_fd(fd, header, size, path)
        if parent is not None:
            header.parent = parent
        if child is not None:
            header.child = child
        if consistent is not None:
            header.consistent = consistent
        _write_all(fd, header.pack(), 0)
        os.fsync(fd)
        return header
    finally:
        os.close(fd)


def coalesce(parent_path: str, child_path: str) -> None:
    """OR the parent log's bitmap into the child's (``cbt-util coalesce``); a parent
    whose bitmap is larger than the child's is refused (EINVAL)."""
    pfd = _open(parent_path, os.O_RDONLY)
    try:
        pheader = read_header_fd(pfd, parent_path)
        cfd = _open(child_path, os.O_RDWR)
        try:
            cheader = read_header_fd(cfd, child_path)
            if pheader.bitmap_size > cheader.bitmap_size:
                raise CbtLogError("Parent bitmap larger than child bitmap,can't coalesce",
                                  errno.EINVAL)
            pbits = read_bitmap_fd(pfd, pheader, parent_path)
            cbits = read_bitmap_fd(cfd, cheader, child_path)
            n = len(pbits)
            if n:
                merged = (int.from_bytes(pbits, "little")
                          | int.from_bytes(cbits[:n], "little")).to_bytes(n, "little")
                _write_all(cfd, merged, HEADER_SIZE)
                os.fsync(cfd)
        finally:
            os.close(cfd)
    finally:
        os.close(pfd)
