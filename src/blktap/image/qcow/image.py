"""Reading one qcow (version 1) file.

A :class:`QcowImage` is a read-only layer with the same interface as a qcow2 layer
(:class:`~blktap.image.qcow2.image.Qcow2Image`, which it extends): runs of the disk,
block status, reads with a backing file below, compressed clusters. Only what differs
is here: the header, the L1 table (blktap2's old tapdisk wrote it in host order), L2
tables of ``1 << l2_bits`` entries, and the L2 entries themselves (no flags but
"compressed", no zero clusters).

Every number read from the file is checked before use (:func:`header_problem`); the
file is never written.
"""

from __future__ import annotations

import array
import errno
import os
import sys
from collections.abc import Iterator

from blktap.errors import FormatError, ReadOnlyImage, UnsupportedImage
from blktap.image.fileio import file_size_of, pread_exact
from blktap.image.qcow import structs as v1
from blktap.image.qcow2 import structs as s
from blktap.image.qcow2.image import COMPRESSED, DATA, HOLE, Qcow2Image

SECTOR_SIZE = 512


def header_problem(h: v1.Header, file_size: int) -> str | None:
    """What makes a qcow header unusable, or None."""
    if h.magic != v1.MAGIC:
        return "bad magic"
    if h.version != v1.VERSION:
        return f"version {h.version}, not 1"
    if not v1.MIN_CLUSTER_BITS <= h.cluster_bits <= v1.MAX_CLUSTER_BITS:
        return f"cluster_bits {h.cluster_bits} out of range (9..16)"
    if not v1.MIN_L2_BITS <= h.l2_bits <= v1.MAX_L2_BITS:
        return f"l2_bits {h.l2_bits} out of range (6..16)"
    if h.crypt_method not in (v1.CRYPT_NONE, v1.CRYPT_AES):
        return f"unknown crypt_method {h.crypt_method}"
    if h.size >= 1 << 62:
        return f"virtual size {h.size} out of range"
    l1_bytes = h.l1_entries * 8
    if l1_bytes > v1.MAX_L1_BYTES:
        return f"L1 table of {h.l1_entries} entries is too large"
    if l1_bytes and h.l1_table_offset < v1.HEADER_SIZE:
        return f"L1 table at {h.l1_table_offset} overlaps the header"
    if h.l1_table_offset + l1_bytes > file_size:
        return f"L1 table ({l1_bytes} bytes at {h.l1_table_offset}) lies past the end of " \
               f"the file ({file_size} bytes)"
    if h.backing_file_offset:
        if h.backing_file_size > v1.MAX_BACKING_NAME:
            return f"backing file name of {h.backing_file_size} bytes (at most 1023)"
        if h.backing_file_offset < v1.HEADER_SIZE or \
                h.backing_file_offset + h.backing_file_size > file_size:
            return "backing file name lies outside the file"
    return None


class QcowImage(Qcow2Image):
    """One open qcow (version 1) file, read-only."""

    _plain_entries = False  # its entries go through _cluster_runs below

    format_name = "qcow"

    @classmethod
    def open(cls, path: str, *, writable: bool = False, snapshot: str | None = None,
             for_check: bool = False) -> QcowImage:
        if writable:
            raise ReadOnlyImage(f"{path}: qcow (version 1) images are read-only here; "
                                f"convert it to qcow2 to write", errno.EROFS)
        if snapshot is not None or for_check:
            raise UnsupportedImage(f"{path}: qcow (version 1) has no snapshots and no "
                                   f"check here")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise FormatError(f"{path}: {os.strerror(exc.errno)}", exc.errno) from None
        try:
            return cls._load_v1(path, fd)
        except OSError as exc:
            os.close(fd)
            raise FormatError(f"{path}: {os.strerror(exc.errno or errno.EIO)}",
                              exc.errno or errno.EIO) from None
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _load_v1(cls, path: str, fd: int) -> QcowImage:
        size = file_size_of(fd)
        head = os.pread(fd, v1.HEADER_SIZE + v1.XEN_EXT_SIZE, 0)
        if len(head) < v1.HEADER_SIZE or head[:4] != v1.MAGIC:
            raise FormatError(f"{path}: not a qcow image")
        h = v1.Header.unpack(head)
        problem = header_problem(h, size)
        if problem:
            raise FormatError(f"{path}: invalid qcow header: {problem}")
        if h.crypt_method == v1.CRYPT_AES:
            raise UnsupportedImage(f"{path}: AES-encrypted qcow images are not supported")
        # The qcow2 view of the same numbers, for the code shared with qcow2.
        q = s.Header(version=1, cluster_bits=h.cluster_bits, size=h.size,
                     l1_size=h.l1_entries, l1_table_offset=h.l1_table_offset,
                     backing_file_offset=h.backing_file_offset,
                     backing_file_size=h.backing_file_size, refcount_order=4)
        image = cls(path, fd, False, q, size)
        image.v1_header = h
        image.l2_entries = 1 << h.l2_bits
        image.xen = v1.XenExtension.unpack(head[v1.HEADER_SIZE:])
        if h.backing_file_offset:
            raw = pread_exact(fd, h.backing_file_size, h.backing_file_offset)
            try:
                image.backing_file = raw.decode("utf-8") or None
            except UnicodeDecodeError:
                raise FormatError(f"{path}: backing file name is not UTF-8") from None
        raw_l1 = pread_exact(fd, h.l1_entries * 8, h.l1_table_offset)
        l1 = array.array("Q")
        l1.frombytes(raw_l1)
        if sys.byteorder == "little" and not image.l1_host_order:
            l1.byteswap()
        image.l1 = l1
        image._check_l1(l1, "L1 table")
        return image

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.v1_header: v1.Header | None = None
        self.xen: v1.XenExtension | None = None

    @property
    def l1_host_order(self) -> bool:
        """blktap2's old tapdisk wrote the L1 table in host order (x86: little-endian);
        its own tapdisk knows such an image by the Xen extension without the big-endian
        flag, on an image without a backing file whose L1 table is page aligned."""
        h = self.v1_header
        assert h is not None
        return (self.xen is not None and not self.xen.flags & v1.XEN_L1_BIG_ENDIAN
                and not h.backing_file_offset and h.l1_table_offset % 4096 == 0)

    def _check_l1(self, l1: array.array, what: str) -> None:
        table_bytes = self.l2_entries * 8
        for i, off in enumerate(l1):
            if not off:
                continue
            if off % SECTOR_SIZE or off & ~s.L1_OFFSET_MASK:
                raise FormatError(f"{self.path}: {what} entry {i}: L2 table offset "
                                  f"{off:#x} is not sector aligned")
            if off < v1.HEADER_SIZE or off + table_bytes > self.file_size:
                raise FormatError(f"{self.path}: {what} entry {i}: L2 table at {off:#x} "
                                  f"lies outside the file")

    def _prepare_writes(self, for_check: bool = False) -> None:
        raise ReadOnlyImage(f"{self.path}: qcow (version 1) images are read-only here")

    def l2_table(self, l1_index: int) -> array.array | None:
        if l1_index >= len(self.l1):
            return None
        off = self.l1[l1_index]
        if not off:
            return None
        table = self._l2_cache.get(off)
        if table is None:
            table = array.array("Q")
            table.frombytes(pread_exact(self.fd, self.l2_entries * 8, off))
            if sys.byteorder == "little":
                table.byteswap()
            self._l2_cache[off] = table
            if len(self._l2_cache) > 4096:
                self._l2_cache.popitem(last=False)
        else:
            self._l2_cache.move_to_end(off)
        return table

    def _cluster_runs(self, cluster: int, lo: int, hi: int
                      ) -> Iterator[tuple[int, int, int, int]]:
        entry, _ = self._entry(cluster)
        if entry & v1.OFLAG_COMPRESSED:
            off, length = self.compressed_span(entry)
            if not length or off + length > self.file_size:
                raise FormatError(f"{self.path}: compressed cluster {cluster} ({length} "
                                  f"bytes at {off:#x}) lies outside the file")
            yield lo, hi, COMPRESSED, cluster
        elif not entry:
            yield lo, hi, HOLE, 0
        elif entry % SECTOR_SIZE or entry >= self.file_size or entry < v1.HEADER_SIZE:
            raise FormatError(f"{self.path}: data cluster {cluster} at {entry:#x} is not "
                              f"sector aligned or lies outside the file")
        else:
            yield lo, hi, DATA, entry + lo

    def compressed(self, cluster: int) -> bool:
        return bool(self._entry(cluster)[0] & v1.OFLAG_COMPRESSED)

    def compressed_span(self, entry: int) -> tuple[int, int]:
        return v1.compressed_span(entry, self.cluster_bits)

    def in_place(self, offset: int, length: int) -> int | None:
        return None

    def __repr__(self) -> str:
        return f"<QcowImage {self.path} v1 size={self.size} cluster={self.cluster_size}>"
