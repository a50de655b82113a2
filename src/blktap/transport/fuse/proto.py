"""The FUSE kernel protocol's wire structures (``linux/fuse.h``), only those a one-file
file system needs. Requests are read from ``/dev/fuse``: a ``fuse_in_header`` then the
opcode's arguments; replies are written back: a ``fuse_out_header`` then the result."""

from __future__ import annotations

import struct

KERNEL_MAJOR = 7
# What we speak: 7.28 has FUSE_MAX_PAGES and the 64-byte init reply, 7.24 FUSE_LSEEK.
KERNEL_MINOR = 31
ROOT_ID = 1

# Opcodes.
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
ACCESS = 34
INTERRUPT = 36
DESTROY = 38
BATCH_FORGET = 42
FALLOCATE = 43
LSEEK = 46

NO_REPLY = frozenset({FORGET, BATCH_FORGET, INTERRUPT})

# INIT flags (fuse_init_in.flags / fuse_init_out.flags).
ASYNC_READ = 1 << 0
BIG_WRITES = 1 << 5
ASYNC_DIO = 1 << 15
MAX_PAGES = 1 << 22
WANTED_INIT_FLAGS = ASYNC_READ | BIG_WRITES | ASYNC_DIO | MAX_PAGES

# fuse_open_out.open_flags.
FOPEN_DIRECT_IO = 1 << 0

# fuse_setattr_in.valid.
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3

# fallocate(2) modes.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

IN_HEADER = struct.Struct("=IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("=IiQ")  # len error unique
INIT_IN = struct.Struct("=IIII")  # major minor max_readahead flags (more follow on 7.36+)
INIT_OUT = struct.Struct("=IIIIHHIIHHI28x")  # ... max_pages map_alignment flags2 unused[7]
ATTR = struct.Struct("=QQQQQQIIIIIIIIII")  # ino size blocks a/m/ctime a/m/ctimensec
#                                           mode nlink uid gid rdev blksize flags
ATTR_OUT = struct.Struct("=QII")  # attr_valid attr_valid_nsec dummy, then ATTR
SETATTR_IN = struct.Struct("=IIQQQQQQIIIIIIII")  # valid pad fh size lock_owner times...
#                                                  mode unused4 uid gid unused5
OPEN_IN = struct.Struct("=II")  # flags open_flags
OPEN_OUT = struct.Struct("=QII")  # fh open_flags padding
READ_IN = struct.Struct("=QQIIQII")  # fh offset size read_flags lock_owner flags pad
WRITE_IN = struct.Struct("=QQIIQII")  # fh offset size write_flags lock_owner flags pad
WRITE_OUT = struct.Struct("=II")  # size padding
STATFS_OUT = struct.Struct("=QQQQQIIII24x")  # blocks bfree bavail files ffree bsize
#                                              namelen frsize padding spare[6]
FSYNC_IN = struct.Struct("=QII")  # fh fsync_flags padding
FALLOCATE_IN = struct.Struct("=QQQII")  # fh offset length mode padding
LSEEK_IN = struct.Struct("=QQII")  # fh offset whence padding
LSEEK_OUT = struct.Struct("=Q")

# A WRITE request's header and arguments, read apart from its data so that the data
# lands in a page-aligned buffer.
WRITE_HEAD = IN_HEADER.size + WRITE_IN.size
assert IN_HEADER.size == 40 and WRITE_HEAD == 80 and INIT_OUT.size == 64
assert ATTR.size == 88 and STATFS_OUT.size == 80 and SETATTR_IN.size == 88
