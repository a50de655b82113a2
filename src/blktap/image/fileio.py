"""Small, careful wrappers around positioned file I/O, shared by the image formats."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from blktap.errors import FormatError

# A shared run of zeros to slice from (read-only: never pass it to a read).
ZEROS = memoryview(bytes(1 << 20))


def file_size_of(fd: int) -> int:
    """Size of a regular file, or of a block device."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


def is_regular(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    """Read exactly ``length`` bytes, or fail: metadata must never be read short."""
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise FormatError(f"short read at offset {offset}: wanted {length}, got {len(data)}",
                          errno.EIO)
    return data


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[written:]
        offset += written


def pwritev_all(fd: int, buffers: list[bytes | bytearray | memoryview], offset: int) -> None:
    """Write several buffers back to back in one system call (finishing a short write
    buffer by buffer), without joining them in Python first."""
    views = [memoryview(b).cast("B") for b in buffers]
    done = os.pwritev(fd, views, offset)
    for view in views:
        if done >= len(view):
            done -= len(view)
            offset += len(view)
            continue
        pwrite_all(fd, view[done:], offset + done)
        offset += len(view)
        done = 0


def zero_fill(view: memoryview) -> None:
    """Fill a writable byte view with zeros without allocating."""
    pos, total = 0, len(view)
    while pos < total:
        n = min(total - pos, len(ZEROS))
        view[pos : pos + n] = ZEROS[:n]
        pos += n


def preadv_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from the file at ``offset``; bytes past the end of file read as zeros
    (a raw parent shorter than its child, a file still being extended)."""
    while view:
        got = os.preadv(fd, [view], offset)
        if got <= 0:
            zero_fill(view)
            return
        view = view[got:]
        offset += got


# copy_file_range fails with these when the kernel cannot copy between the two files
# (different file systems on old kernels, some special files): fall back to read+write.
_NO_KERNEL_COPY = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF)
# Bounce buffer size for the fallback path.
_BOUNCE_BYTES = 4 << 20


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int,
               length: int) -> None:
    """Copy ``length`` bytes between two files without moving them through Python when the
    kernel can do it (copy_file_range: in-kernel copy, or reflink/server-side copy where
    the file system offers it). Bytes past the end of the source read as zeros."""
    while length:
        try:
            done = os.copy_file_range(src_fd, dst_fd, length, src_offset, dst_offset)
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
            _bounce_copy(src_fd, src_offset, dst_fd, dst_offset, length)
            return
        if done == 0:  # end of the source: the rest is zeros
            write_zeros(dst_fd, dst_offset, length)
            return
        src_offset += done
        dst_offset += done
        length -= done


def _bounce_copy(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int,
                 length: int) -> None:
    buf = bytearray(min(length, _BOUNCE_BYTES))
    view = memoryview(buf)
    while length:
        n = min(length, len(buf))
        preadv_into(src_fd, view[:n], src_offset)
        pwrite_all(dst_fd, view[:n], dst_offset)
        src_offset += n
        dst_offset += n
        length -= n


def write_zeros(fd: int, offset: int, length: int) -> None:
    while length:
        n = min(length, len(ZEROS))
        pwrite_all(fd, ZEROS[:n], offset)
        offset += n
        length -= n


@contextmanager
def staged_path(dst: str, *, replace: bool = False) -> Iterator[str]:
    """A path to build a new file at, in a private folder beside ``dst``. When the block
    succeeds the file takes ``dst``'s name: linked into place (EEXIST if ``dst`` exists),
    or with ``replace`` renamed over it. When it fails nothing is left behind, so a crash
    never leaves a half-made file under the real name."""
    folder = os.path.dirname(os.path.abspath(dst))
    if not replace and os.path.lexists(dst):
        raise FormatError(f"{dst}: {os.strerror(errno.EEXIST)}", errno.EEXIST)
    try:
        workdir = tempfile.mkdtemp(prefix=".blktap-", dir=folder)
    except OSError as exc:
        raise FormatError(f"{dst}: {os.strerror(exc.errno)}", exc.errno) from None
    try:
        tmp = os.path.join(workdir, os.path.basename(dst) or "image")
        yield tmp
        _publish(tmp, dst, replace)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _publish(tmp: str, dst: str, replace: bool) -> None:
    if replace:
        os.replace(tmp, dst)
        return
    try:
        os.link(tmp, dst)
        return
    except FileExistsError:
        raise FormatError(f"{dst}: {os.strerror(errno.EEXIST)}", errno.EEXIST) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP):
            raise FormatError(f"{dst}: {os.strerror(exc.errno)}", exc.errno) from None
    # A file system without hard links: check, then rename (not atomic, but close).
    if os.path.lexists(dst):
        raise FormatError(f"{dst}: {os.strerror(errno.EEXIST)}", errno.EEXIST)
    os.rename(tmp, dst)
