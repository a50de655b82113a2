"""Raw images: a plain file or block device, every byte at its own offset."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator

from blktap.errors import FormatError, OutOfRange, ReadOnlyImage
from blktap.image.fileio import file_size_of, pwrite_all

SECTOR_SIZE = 512


class RawImage:
    """A raw disk. Its virtual size is the file size (a trailing partial sector reads as
    part of a sector padded with zeros)."""

    def __init__(self, path: str, fd: int, writable: bool) -> None:
        self.path = path
        self.fd = fd
        self.writable = writable
        self.size = file_size_of(fd)
        self._closed = False

    @classmethod
    def open(cls, path: str, *, writable: bool = False) -> RawImage:
        try:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as exc:
            raise FormatError(f"{path}: {os.strerror(exc.errno)}", exc.errno) from None
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            os.close(fd)
            raise FormatError(f"{path}: {os.strerror(errno.EISDIR)}", errno.EISDIR)
        return cls(path, fd, writable)

    @property
    def sectors(self) -> int:
        return -(-self.size // SECTOR_SIZE)

    def extents(self, sector: int, count: int) -> Iterator[tuple[int, int, int | None]]:
        """Every sector of a raw image is its own: one run at its own offset."""
        yield sector, count, sector * SECTOR_SIZE

    def data_extents(self, sector: int, count: int) -> Iterator[tuple[int, int, bool]]:
        """Runs of (first sector, count, holds data) found with SEEK_DATA/SEEK_HOLE; a
        file system without them reports everything as data."""
        pos, end = sector * SECTOR_SIZE, (sector + count) * SECTOR_SIZE
        limit = min(end, self.size)
        while pos < limit:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole remains
                    data = limit
                else:
                    data = pos
            data = min(max(data, pos), limit)
            if data > pos:
                yield from self._sector_run(pos, data, False)
            if data >= limit:
                pos = data
                break
            try:
                hole = os.lseek(self.fd, data, os.SEEK_HOLE)
            except OSError:
                hole = limit
            hole = min(hole, limit)
            yield from self._sector_run(data, hole, True)
            pos = hole
        if pos < end:
            yield from self._sector_run(-(-pos // SECTOR_SIZE) * SECTOR_SIZE, end, False)

    def allocated_bytes(self) -> int:
        """Bytes the file holds data for (holes excluded where the file system says)."""
        return sum(min((first + n) * SECTOR_SIZE, self.size) - first * SECTOR_SIZE
                   for first, n, data in self.data_extents(0, self.sectors) if data)

    @staticmethod
    def _sector_run(start: int, stop: int, data: bool) -> Iterator[tuple[int, int, bool]]:
        first = start // SECTOR_SIZE
        last = -(-stop // SECTOR_SIZE)
        if last > first:
            yield first, last - first, data

    def write(self, sector: int, data: bytes | bytearray | memoryview) -> None:
        if not self.writable:
            raise ReadOnlyImage(f"{self.path} is open read-only")
        view = memoryview(data).cast("B")
        offset = sector * SECTOR_SIZE
        if sector < 0 or offset + len(view) > self.sectors * SECTOR_SIZE:
            raise OutOfRange(f"write past the end of {self.path}", errno.ENOSPC)
        # The last sector of a file whose size is not a whole number of sectors is partial:
        # never grow the file to fill it.
        pwrite_all(self.fd, view[: max(0, self.size - offset)], offset)

    def flush(self) -> None:
        if self.writable and not self._closed:
            os.fsync(self.fd)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def __enter__(self) -> RawImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RawImage {self.path} size={self.size}>"
