"""Small, careful wrappers around positioned file I/O, shared by the image formats."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress

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
    try:
        data = os.pread(fd, length, offset)
    except OSError as exc:
        raise at_offset(exc, offset) from None
    if len(data) != length:
        raise FormatError(f"short read at offset {offset}: wanted {length}, got {len(data)}",
                          errno.EIO)
    return data


def at_offset(exc: OSError, offset: int) -> OSError:
    """The same system error, its message naming where in the file it happened
    (``No space left on device at offset 1048576``); the caller adds the file's name."""
    text = exc.strerror or os.strerror(exc.errno or errno.EIO)
    if text.endswith(f" at offset {offset}"):
        return exc
    out = OSError(exc.errno, f"{text} at offset {offset}", exc.filename)
    out.__traceback__ = exc.__traceback__
    return out


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset``; a failure names the offset it happened at."""
    view = memoryview(data).cast("B")
    while view:
        try:
            written = os.pwrite(fd, view, offset)
        except OSError as exc:
            raise at_offset(exc, offset) from None
        if written <= 0:
            raise OSError(errno.EIO, f"short write at offset {offset}")
        view = view[written:]
        offset += written


def pwritev_all(fd: int, buffers: list[bytes | bytearray | memoryview], offset: int) -> None:
    """Write several buffers back to back in one system call (finishing a short write
    buffer by buffer), without joining them in Python first."""
    views = [memoryview(b).cast("B") for b in buffers]
    try:
        done = os.pwritev(fd, views, offset)
    except OSError as exc:
        raise at_offset(exc, offset) from None
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
        try:
            got = os.preadv(fd, [view], offset)
        except OSError as exc:
            raise at_offset(exc, offset) from None
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


# ------------------------------------------------------------------------------ staging
# A new file is built where nobody sees it and takes its name only once complete, so that a
# crash never leaves a half-made file under the real name. Where the file system can, it
# is built as an unnamed file (O_TMPFILE) in the target's folder and linked into place at
# the end: a process killed even by SIGKILL leaves nothing, as the kernel frees an unnamed
# file with its last descriptor. Elsewhere it is built in a private folder beside the
# target, ``.blktap-<pid>-<random>``, which its owner holds flock'd for as long as it
# lives; folders left by dead processes are removed by the next staging in that folder.
STAGE_PREFIX = ".blktap-"
NO_TMPFILE_ENV = "BLKTAP_NO_TMPFILE"  # set (to anything but "" or "0"): always a folder
_STALE_RE = re.compile(r"\.blktap-(\d+)-")
# O_TMPFILE is refused with these where the file system (or kernel) lacks it.
_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT)
# Stage paths handed out and not yet published: staging one again builds it in place.
_live_stages: set[str] = set()


def tmpfile_disabled() -> bool:
    return os.environ.get(NO_TMPFILE_ENV, "") not in ("", "0")


@contextmanager
def staged_path(dst: str, *, replace: bool = False) -> Iterator[str]:
    """A path to build a new file at (an empty file, already created); when the block
    succeeds the file takes ``dst``'s name: linked into place (EEXIST if ``dst`` exists),
    or with ``replace`` renamed over it. When it fails, or the process is killed, nothing
    is left under ``dst`` (see above for what may be left aside, and for how long).

    The path may be a ``/proc/self/fd/N`` link to an unnamed file: open it, do not derive
    other names from it. Staging a path this returned builds in place (so a helper that
    stages its own output can write into a caller's stage)."""
    if dst in _live_stages:
        yield dst
        return
    folder = os.path.dirname(os.path.abspath(dst))
    name = os.path.basename(dst)
    if not replace and os.path.lexists(dst):
        raise FormatError(f"{dst}: {os.strerror(errno.EEXIST)}", errno.EEXIST)
    try:
        dirfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise FormatError(f"{dst}: {os.strerror(exc.errno)}", exc.errno) from None
    try:
        remove_stale_stages(dirfd)
        try:
            stage = _TmpfileStage.create(dirfd) if not tmpfile_disabled() else None
            if stage is None:
                stage = _FolderStage.create(folder, name or "image")
        except OSError as exc:
            raise _stage_error(dst, exc) from None
        _live_stages.add(stage.path)
        try:
            yield stage.path
            stage.publish(name, dst, replace)
        finally:
            _live_stages.discard(stage.path)
            stage.discard()
    finally:
        os.close(dirfd)


def _stage_error(dst: str, exc: OSError) -> FormatError:
    code = exc.errno or errno.EIO
    return FormatError(f"{dst}: {os.strerror(code)}", code)


class _TmpfileStage:
    """An unnamed file in the target's folder, reached as /proc/self/fd/N."""

    def __init__(self, dirfd: int, fd: int) -> None:
        self.dirfd = dirfd
        self.fd: int | None = fd
        self.path = f"/proc/self/fd/{fd}"

    @classmethod
    def create(cls, dirfd: int) -> _TmpfileStage | None:
        """None where unnamed files cannot be made, or linked (no /proc)."""
        if not os.path.isdir("/proc/self/fd"):
            return None
        try:
            fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o644, dir_fd=dirfd)
        except OSError as exc:
            if exc.errno in _NO_TMPFILE:
                return None
            raise
        return cls(dirfd, fd)

    def publish(self, name: str, dst: str, replace: bool) -> None:
        assert self.fd is not None
        src = self.path
        if not replace:
            try:
                # linkat(AT_SYMLINK_FOLLOW) through the /proc link names the unnamed file
                # (a dst_dir_fd makes Python call linkat rather than link); it fails if
                # the name exists, so nothing is ever overwritten.
                os.link(src, name, dst_dir_fd=self.dirfd, follow_symlinks=True)
            except OSError as exc:
                raise _stage_error(dst, exc) from None
            return
        # Replacing: name it aside (flock'd, so no sweeper takes it), then rename over.
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        aside = _aside_name()
        try:
            os.link(src, aside, dst_dir_fd=self.dirfd, follow_symlinks=True)
        except OSError as exc:
            raise _stage_error(dst, exc) from None
        try:
            os.replace(aside, name, src_dir_fd=self.dirfd, dst_dir_fd=self.dirfd)
        except OSError as exc:
            with suppress(OSError):
                os.unlink(aside, dir_fd=self.dirfd)
            raise _stage_error(dst, exc) from None

    def discard(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)  # an unnamed file goes with its last descriptor


class _FolderStage:
    """A file in a private folder beside the target, the folder flock'd by its owner."""

    def __init__(self, workdir: str, lock: int, path: str) -> None:
        self.workdir = workdir
        self.lock: int | None = lock
        self.path = path

    @classmethod
    def create(cls, folder: str, name: str) -> _FolderStage:
        workdir = tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-", dir=folder)
        try:
            lock = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
                path = os.path.join(workdir, name)
                os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 0o644))
            except BaseException:
                os.close(lock)
                raise
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return cls(workdir, lock, path)

    def publish(self, name: str, dst: str, replace: bool) -> None:
        if replace:
            os.replace(self.path, dst)
            return
        try:
            os.link(self.path, dst)
            return
        except FileExistsError:
            raise FormatError(f"{dst}: {os.strerror(errno.EEXIST)}", errno.EEXIST) from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP):
                raise _stage_error(dst, exc) from None
        # A file system without hard links: check, then rename (not atomic, but close).
        if os.path.lexists(dst):
            raise FormatError(f"{dst}: {os.strerror(errno.EEXIST)}", errno.EEXIST)
        os.rename(self.path, dst)

    def discard(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self.lock is not None:
            lock, self.lock = self.lock, None
            os.close(lock)


def _aside_name() -> str:
    return f"{STAGE_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_stale_stages(dirfd: int) -> list[str]:
    """Remove what dead stagings left in the folder ``dirfd``: ``.blktap-<pid>-*``
    folders (and files) whose process is gone and whose flock nobody holds (the flock
    makes a reused pid, or a pid of another namespace, safe). Best effort: returns the
    names removed."""
    removed: list[str] = []
    try:
        names = os.listdir(dirfd)
    except OSError:
        return removed
    for entry in names:
        hit = _STALE_RE.match(entry)
        if hit is None or _pid_alive(int(hit[1])):
            continue
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dirfd)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its owner lives (in another pid namespace, say)
            try:
                if stat.S_ISDIR(os.fstat(fd).st_mode):
                    shutil.rmtree(entry, dir_fd=dirfd)
                else:
                    os.unlink(entry, dir_fd=dirfd)
            except OSError:
                continue
            removed.append(entry)
        finally:
            os.close(fd)
    return removed
