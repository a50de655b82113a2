#!/usr/bin/python3
"""Incremental backup through NBD: copy only the blocks a CBT log marks as changed.

    cbt_backup.py NBD_URI BITMAP BACKUP_FILE

NBD_URI is a tapdisk's export (``nbd+unix:///?socket=/run/blktap-control/nbd<pid>.<minor>``)
of a disk opened with ``tap-ctl open -C /path/BITMAP.cbtlog``; BITMAP names its log (the
file name without ``.cbtlog``); BACKUP_FILE is the previous full copy of the disk (created,
sparse, if it does not exist). The changed extents are asked of the server through the
``qemu:dirty-bitmap:BITMAP`` metadata context, and exactly those are read and written into
BACKUP_FILE at the same offsets. Needs libnbd's Python binding (python3-libnbd).

This file is run by the test suite (tests/test_cbt.py); see docs/cbt.md.
"""

import os
import sys

import nbd

CHUNK = 4 << 20  # bytes read per request
STATUS_SPAN = 1 << 30  # bytes asked about per block-status request
DIRTY = 1  # the context's state bit for a changed block


def changed_extents(h: "nbd.NBD", context: str, size: int) -> list[tuple[int, int]]:
    """(offset, length) of each run the server reports as changed."""
    extents: list[tuple[int, int]] = []
    found: list[int] = []  # the entries of the last reply: length, flags, length, ...

    def collect(ctx: str, start: int, entries: list[int], err: int) -> int:
        if ctx == context:
            found.extend(entries)
        return 0

    offset = 0
    while offset < size:
        found.clear()
        h.block_status(min(STATUS_SPAN, size - offset), offset, collect)
        if not found:
            raise SystemExit(f"the server said nothing of {context} at {offset}")
        for length, flags in zip(found[::2], found[1::2], strict=True):
            length = min(length, size - offset)
            if flags & DIRTY:
                if extents and extents[-1][0] + extents[-1][1] == offset:
                    extents[-1] = (extents[-1][0], extents[-1][1] + length)
                else:
                    extents.append((offset, length))
            offset += length
            if offset >= size:
                break
    return extents


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    uri, bitmap, backup = sys.argv[1:]
    context = "qemu:dirty-bitmap:" + bitmap
    h = nbd.NBD()
    h.add_meta_context(context)
    h.connect_uri(uri)
    if not h.can_meta_context(context):
        print(f"the server has no {context} (is the disk opened with -C?)", file=sys.stderr)
        return 1
    size = h.get_size()
    fd = os.open(backup, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        copied = 0
        extents = changed_extents(h, context, size)
        for offset, length in extents:
            end = offset + length
            while offset < end:
                n = min(CHUNK, end - offset)
                data = h.pread(n, offset)
                os.pwrite(fd, data, offset)
                offset += n
                copied += n
        os.fsync(fd)
    finally:
        os.close(fd)
    h.shutdown()
    print(f"copied {copied} bytes in {len(extents)} extents")
    return 0


if __name__ == "__main__":
    sys.exit(main())
