"""Creating qcow2 images (as ``qemu-img create -f qcow2`` does, with its options).

The new file is written aside and linked into place (fileio.staged_path), so a crash never
leaves a half-made image under the real name. Layout: the header cluster (header,
extensions, backing file name), the refcount table, the refcount blocks, the L1 table,
then with preallocation the L2 tables and the data clusters.
"""

from __future__ import annotations

import array
import errno
import os
import sys

from blktap.errors import FormatError, UsageError
from blktap.image.fileio import pwrite_all, staged_path, write_zeros
from blktap.image.qcow2 import structs as s

PREALLOCATION = ("off", "metadata", "falloc", "full")
COMPAT = {"0.10": 2, "1.1": 3, "v2": 2, "v3": 3}
DEFAULT_CLUSTER_SIZE = 65536


def _be(values: list[int] | array.array) -> bytes:
    arr = array.array("Q", values)
    if sys.byteorder == "little":
        arr.byteswap()
    return arr.tobytes()


def _set_refcount(block: bytearray, index: int, bits: int, value: int) -> None:
    if bits >= 8:
        n = bits // 8
        block[index * n : index * n + n] = value.to_bytes(n, "big")
    else:
        pos = index * bits
        block[pos // 8] |= value << (pos % 8)


def create(path: str, size: int, *, cluster_size: int = DEFAULT_CLUSTER_SIZE,
           compat: str = "1.1", preallocation: str = "off", lazy_refcounts: bool = False,
           extended_l2: bool = False, backing_file: str | None = None,
           backing_fmt: str | None = None, refcount_bits: int = 16) -> None:
    """Create a qcow2 image of ``size`` bytes (rounded up to whole sectors)."""
    version = COMPAT.get(compat)
    if version is None:
        raise UsageError(f"invalid compat {compat!r} (0.10 or 1.1)")
    if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 2 << 20:
        raise UsageError(f"invalid cluster_size {cluster_size} (a power of two, 512 B to "
                         f"2 MiB)")
    if preallocation not in PREALLOCATION:
        raise UsageError(f"invalid preallocation {preallocation!r} "
                         f"({'|'.join(PREALLOCATION)})")
    if refcount_bits & (refcount_bits - 1) or not 1 <= refcount_bits <= 64:
        raise UsageError(f"invalid refcount_bits {refcount_bits}")
    if version == 2 and refcount_bits != 16:
        raise UsageError("compat=0.10 images have 16-bit refcounts")
    if version == 2 and (lazy_refcounts or extended_l2):
        raise UsageError("lazy_refcounts and extended_l2 need compat=1.1")
    if extended_l2 and cluster_size < 16384:
        raise UsageError("extended_l2 needs clusters of at least 16 KiB")
    if size <= 0:
        raise UsageError(f"invalid size {size}")
    if backing_fmt is not None and backing_file is None:
        raise UsageError("backing_fmt without a backing file")
    if backing_file is not None and preallocation != "off":
        raise UsageError("preallocation is for images without a backing file")
    size = -(-size // 512) * 512
    cluster_bits = cluster_size.bit_length() - 1
    order = refcount_bits.bit_length() - 1

    header = s.Header(version=version, cluster_bits=cluster_bits, size=size,
                      refcount_order=order)
    if version >= 3:
        header.header_length = s.V3_HEADER_SIZE_WITH_COMPRESSION
        if extended_l2:
            header.incompatible_features |= s.INCOMPAT_EXTL2
        if lazy_refcounts:
            header.compatible_features |= s.COMPAT_LAZY_REFCOUNTS
    exts = []
    if backing_fmt:
        exts.append(s.Extension(s.EXT_BACKING_FORMAT, backing_fmt.encode()))
    backing = backing_file.encode() if backing_file else b""
    if len(backing) > s.MAX_BACKING_NAME:
        raise UsageError(f"backing file name of {len(backing)} bytes (at most 1023)")
    head_len = header.header_length if version >= 3 else s.V2_HEADER_SIZE

    def ext_bytes(with_names: bool) -> bytes:
        extra = [s.Extension(s.EXT_FEATURE_NAMES, s.pack_feature_names(
            s.FEATURE_NAME_TABLE))] if with_names and version >= 3 else []
        return b"".join(e.pack() for e in exts + extra) + s.Extension(s.EXT_END, b"").pack()

    ext_raw = ext_bytes(True)
    if head_len + len(ext_raw) + len(backing) > cluster_size:
        ext_raw = ext_bytes(False)
    if head_len + len(ext_raw) + len(backing) > cluster_size:
        raise UsageError("the header, its extensions and the backing file name do not "
                         "fit in one cluster")
    if backing:
        header.backing_file_offset = head_len + len(ext_raw)
        header.backing_file_size = len(backing)

    l2_entries = cluster_size // s.l2_entry_bytes(extended_l2)
    l1_size = -(-size // (cluster_size * l2_entries))
    l1_clusters = max(1, -(-l1_size * 8 // cluster_size))
    prealloc = preallocation != "off"
    n_data = -(-size // cluster_size) if prealloc else 0
    n_l2 = l1_size if prealloc else 0
    per_block = cluster_size * 8 // refcount_bits
    rt_clusters, rb_count = 1, 1
    while True:
        total = 1 + rt_clusters + rb_count + l1_clusters + n_l2 + n_data
        need_rb = -(-total // per_block)
        need_rt = max(1, -(-need_rb * 8 // cluster_size))
        if (need_rb, need_rt) == (rb_count, rt_clusters):
            break
        rb_count, rt_clusters = max(rb_count, need_rb), max(rt_clusters, need_rt)
    if rt_clusters * cluster_size > s.MAX_REFTABLE_BYTES or l1_size * 8 > s.MAX_L1_BYTES:
        raise UsageError(f"size {size} is too large for {cluster_size}-byte clusters")
    rt_off = cluster_size
    rb_off = rt_off + rt_clusters * cluster_size
    l1_off = rb_off + rb_count * cluster_size
    l2_off = l1_off + l1_clusters * cluster_size
    data_off = l2_off + n_l2 * cluster_size
    header.l1_size = l1_size
    header.l1_table_offset = l1_off
    header.refcount_table_offset = rt_off
    header.refcount_table_clusters = rt_clusters

    def write(fd: int) -> None:
        first = bytearray(header.pack() + ext_raw + backing)
        pwrite_all(fd, first, 0)
        table = [rb_off + i * cluster_size for i in range(rb_count)]
        pwrite_all(fd, _be(table), rt_off)
        for b in range(rb_count):
            block = bytearray(cluster_size)
            lo = b * per_block
            for c in range(lo, min(total, lo + per_block)):
                _set_refcount(block, c - lo, refcount_bits, 1)
            pwrite_all(fd, block, rb_off + b * cluster_size)
        if prealloc:
            l1 = [(l2_off + i * cluster_size) | s.OFLAG_COPIED for i in range(l1_size)]
            pwrite_all(fd, _be(l1), l1_off)
            words = l2_entries * (2 if extended_l2 else 1)
            for t in range(n_l2):
                table2 = [0] * words
                for k in range(l2_entries):
                    c = t * l2_entries + k
                    if c >= n_data:
                        break
                    entry = (data_off + c * cluster_size) | s.OFLAG_COPIED
                    if extended_l2:
                        table2[2 * k], table2[2 * k + 1] = entry, s.SUBCLUSTER_ALLOC_MASK
                    else:
                        table2[k] = entry
                pwrite_all(fd, _be(table2), l2_off + t * cluster_size)
        end = data_off + n_data * cluster_size
        os.ftruncate(fd, end)
        if preallocation == "falloc" and n_data:
            try:
                os.posix_fallocate(fd, data_off, n_data * cluster_size)
            except OSError as exc:
                raise FormatError(f"{path}: {os.strerror(exc.errno)}", exc.errno) from None
        elif preallocation == "full" and n_data:
            write_zeros(fd, data_off, n_data * cluster_size)

    with staged_path(path) as tmp:
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise FormatError(f"{path}: {os.strerror(exc.errno)}", exc.errno) from None
        try:
            write(fd)
            os.fsync(fd)
        except OSError as exc:
            raise FormatError(f"{path}: {os.strerror(exc.errno or errno.EIO)}",
                              exc.errno or errno.EIO) from None
        finally:
            os.close(fd)
