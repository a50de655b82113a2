"""System calls the os module lacks: fallocate with modes, and block-device ioctls."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# _IO(0x12, n) numbers from linux/fs.h
BLKSSZGET = 0x1268
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


_fstatfs = _libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.c_char_p]
_fstatfs.restype = ctypes.c_int

# statfs f_type of file systems whose data lives in memory.
TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6


def fs_type(fd: int) -> int:
    """The file system magic of ``fd`` (statfs f_type), 0 if unknown."""
    buf = ctypes.create_string_buffer(256)
    if _fstatfs(fd, buf) != 0:
        return 0
    return struct.unpack_from("l", buf.raw)[0] & 0xFFFFFFFF


def in_memory(fd: int) -> bool:
    """``fd`` is on a file system whose data lives in memory (tmpfs, ramfs): a read is
    a memory copy, and O_DIRECT (which tmpfs accepts since Linux 6.6) bypasses nothing."""
    return fs_type(fd) in (TMPFS_MAGIC, RAMFS_MAGIC)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); raises OSError (EOPNOTSUPP where the file system lacks the mode)."""
    if length <= 0:
        return
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def punch_hole(fd: int, offset: int, length: int) -> None:
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def zero_range(fd: int, offset: int, length: int) -> None:
    fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)


def is_block_device(fd: int) -> bool:
    return stat.S_ISBLK(os.fstat(fd).st_mode)


def blk_discard(fd: int, offset: int, length: int) -> None:
    fcntl.ioctl(fd, BLKDISCARD, struct.pack("QQ", offset, length))


def blk_zeroout(fd: int, offset: int, length: int) -> None:
    fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, length))


def logical_block_size(fd: int) -> int:
    """The alignment O_DIRECT needs: the device's logical sector size (512 for files)."""
    if not is_block_device(fd):
        return 512
    try:
        raw = fcntl.ioctl(fd, BLKSSZGET, struct.pack("i", 0))
    except OSError:
        return 4096
    return struct.unpack("i", raw)[0] or 512


def unsupported(exc: OSError) -> bool:
    """The error says the file or file system cannot do this operation at all."""
    return exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOTTY)
