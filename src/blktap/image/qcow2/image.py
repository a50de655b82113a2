"""Reading and writing one qcow2 file (versions 2 and 3).

A :class:`Qcow2Image` is one layer: for each part of the virtual disk it says whether it
holds data (and where), reads as zeros, holds a compressed cluster, or passes the read to
its backing file. Resolving the backing chain is :mod:`blktap.image.chain`'s job; a chain
gives each qcow2 layer a reader of what lies below it (``read_below``), which writes need
to fill the rest of a newly allocated cluster (copy-on-write).

Write ordering (docs/formats/qcow2.md): a write into a cluster the image does not own yet
goes, system call by system call,

1. the cluster's data (old contents merged with the new) into a new cluster at the end;
2. the refcount of the new cluster (a new refcount block first when needed);
3. the L2 entry that points at it (a new L2 table is made, counted and linked from the L1
   table before that: an empty table is valid);
4. the refcount of the cluster it replaced, lowered (a shared or compressed one).

A process killed between any two steps leaves an image whose only defect ``qemu-img
check`` can report is a leaked cluster.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import sys
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator

from blktap.errors import (
    ChainError,
    FormatError,
    OutOfRange,
    ReadOnlyImage,
    UnsupportedImage,
)
from blktap.image.fileio import file_size_of, pread_exact, preadv_into, pwrite_all, zero_fill
from blktap.image.qcow2 import structs as s
from blktap.image.qcow2 import validate as v
from blktap.image.qcow2.refcount import Refcounts
from blktap.io.syscalls import punch_hole

SECTOR_SIZE = 512
L2_CACHE_TABLES = 4096

# What a run of the virtual disk is, in this layer.
HOLE = 0  # not here: read the backing file (zeros without one)
ZERO = 1  # reads as zeros
DATA = 2  # stored at a host offset
COMPRESSED = 3  # a compressed cluster (host: the guest cluster index)
# quick_lookup looks at most this many L2 entries (a longer range takes the runs).
QUICK_CLUSTERS = 64
_QUICK_HOLE = (HOLE, 0, False)  # quick_lookup's answers without a host offset
_QUICK_ZERO = (ZERO, 0, False)

ReadBelow = Callable[[int, int, memoryview], None]


def _be_array(raw: bytes) -> array.array:
    arr = array.array("Q")
    arr.frombytes(raw)
    if sys.byteorder == "little":
        arr.byteswap()
    return arr


def _be_bytes(arr: array.array) -> bytes:
    out = array.array("Q", arr)
    if sys.byteorder == "little":
        out.byteswap()
    return out.tobytes()


class Qcow2Image:
    """One open qcow2 file."""

    # Entries are qcow2's (runs may read them inline); the old qcow's layer, whose
    # entries mean other things, walks them through its own _cluster_runs.
    _plain_entries = True

    format_name = "qcow2"

    def __init__(self, path: str, fd: int, writable: bool, header: s.Header,
                 file_size: int) -> None:
        self.path = path
        self.fd = fd
        self.data_fd = fd
        self.writable = writable
        self.header = header
        self.file_size = file_size
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.extended = header.extended_l2
        self.l2_entry_words = 2 if self.extended else 1
        self.l2_entries = self.cluster_size // (8 * self.l2_entry_words)
        self.subcluster_size = self.cluster_size // s.SUBCLUSTERS if self.extended else \
            self.cluster_size
        self.extensions: list[s.Extension] = []
        self.feature_names: dict[tuple[int, int], str] = {}
        self.backing_file: str | None = None
        self.backing_format: str | None = None
        self.data_file: str | None = None
        self.bitmaps: s.BitmapsExtension | None = None
        self.snapshots: list[s.Snapshot] = []
        self.snapshot: s.Snapshot | None = None
        self.l1 = array.array("Q")
        self.refcounts: Refcounts | None = None
        self.read_below: ReadBelow | None = None
        self._l2_cache: OrderedDict[int, array.array] = OrderedDict()
        self.free_guard: threading.Lock | None = None
        self._inflated: tuple[int, bytes] | None = None
        self._dirty = False
        self._cleared_autoclear = False
        self._closed = False

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str, *, writable: bool = False, snapshot: str | None = None,
             for_check: bool = False) -> Qcow2Image:
        """Open and validate a qcow2 image; ``snapshot`` (an id or a name) opens that
        internal snapshot's disk, read-only. ``for_check`` leaves the L1 entries to the
        checker and lets it open a dirty or corrupt image for repair."""
        if snapshot is not None and writable:
            raise UnsupportedImage(f"{path}: internal snapshots are opened read-only")
        try:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as exc:
            raise FormatError(f"{path}: {os.strerror(exc.errno)}", exc.errno) from None
        image = None
        try:
            image = cls._load(path, fd, writable, for_check)
            if snapshot is not None:
                image._select_snapshot(snapshot)
            if writable:
                image._prepare_writes(for_check)
        except OSError as exc:
            if image is not None:
                image._close_data_file()
            os.close(fd)
            raise FormatError(f"{path}: {os.strerror(exc.errno or errno.EIO)}",
                              exc.errno or errno.EIO) from None
        except BaseException:
            if image is not None:
                image._close_data_file()
            os.close(fd)
            raise
        return image

    @classmethod
    def _load(cls, path: str, fd: int, writable: bool, for_check: bool = False
              ) -> Qcow2Image:
        size = file_size_of(fd)
        head = os.pread(fd, 4096, 0)
        if len(head) < s.V2_HEADER_SIZE or head[:4] != s.MAGIC:
            raise FormatError(f"{path}: not a qcow2 image")
        header = s.Header.unpack(head.ljust(s.V3_HEADER_SIZE + 8, b"\0"))
        problem = v.header_problem(header, size)
        if problem:
            raise FormatError(f"{path}: invalid qcow2 header: {problem}")
        cs = header.cluster_size
        first = os.pread(fd, cs, 0).ljust(cs, b"\0")
        header = s.Header.unpack(first)
        image = cls(path, fd, writable, header, size)
        image._load_extensions(first)
        unsupported = v.unsupported_features(header, image.feature_names)
        if unsupported:
            raise UnsupportedImage(f"{path}: {unsupported}")
        if header.backing_file_offset:
            raw = first[header.backing_file_offset :
                        header.backing_file_offset + header.backing_file_size]
            try:
                image.backing_file = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise FormatError(f"{path}: backing file name is not UTF-8") from None
            if not image.backing_file:
                image.backing_file = None
        image.l1 = _be_array(pread_exact(fd, header.l1_size * 8, header.l1_table_offset))
        if not for_check:
            image._check_l1(image.l1, "L1 table")
        image._load_snapshots()
        image._open_data_file()
        return image

    def _load_extensions(self, first: bytes) -> None:
        h = self.header
        start = h.extensions_offset
        end = self.cluster_size
        if h.backing_file_offset and h.backing_file_offset > start:
            end = h.backing_file_offset
        parsed = s.unpack_extensions(first[start:end])
        if isinstance(parsed, str):
            raise FormatError(f"{self.path}: {parsed}")
        self.extensions = parsed[0]
        for ext in self.extensions:
            if ext.type == s.EXT_BACKING_FORMAT:
                self.backing_format = ext.data.decode("utf-8", "replace").rstrip("\0")
            elif ext.type == s.EXT_FEATURE_NAMES:
                self.feature_names = s.unpack_feature_names(ext.data)
            elif ext.type == s.EXT_DATA_FILE:
                self.data_file = ext.data.decode("utf-8", "replace").rstrip("\0")
            elif ext.type == s.EXT_BITMAPS:
                self.bitmaps = s.BitmapsExtension.unpack(ext.data)
                if self.bitmaps is None:
                    raise FormatError(f"{self.path}: bitmaps extension too short")
        if h.incompatible_features & s.INCOMPAT_DATA_FILE and not self.data_file:
            raise FormatError(f"{self.path}: external data file bit set but no file named")

    def _open_data_file(self) -> None:
        if not self.header.incompatible_features & s.INCOMPAT_DATA_FILE:
            return
        assert self.data_file is not None
        if self.writable:
            raise UnsupportedImage(f"{self.path}: writing images with an external data "
                                   f"file is not supported (reading is)")
        path = self.resolve(self.data_file)
        try:
            self.data_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise FormatError(f"{self.path}: external data file {path}: "
                              f"{os.strerror(exc.errno)}", exc.errno) from None

    def _close_data_file(self) -> None:
        if self.data_fd != self.fd:
            os.close(self.data_fd)
            self.data_fd = self.fd

    def _check_l1(self, l1: array.array, what: str) -> None:
        cs = self.cluster_size
        for i, entry in enumerate(l1):
            off = entry & s.L1_OFFSET_MASK
            if not off:
                continue
            if off % cs:
                raise FormatError(f"{self.path}: {what} entry {i}: L2 table offset "
                                  f"{off:#x} is not cluster aligned")
            if off + cs > self.file_size:
                raise FormatError(f"{self.path}: {what} entry {i}: L2 table at {off:#x} "
                                  f"lies past the end of the file")
            h = self.header
            for name, start, length in v.tables(h):
                if start <= off < start + length or off == 0:
                    raise FormatError(f"{self.path}: {what} entry {i}: L2 table at "
                                      f"{off:#x} overlaps the {name}")

    def _load_snapshots(self) -> None:
        h = self.header
        if not h.nb_snapshots:
            return
        raw = os.pread(self.fd, min(self.file_size - h.snapshots_offset,
                                    h.nb_snapshots * 1024 + 65536), h.snapshots_offset)
        pos = 0
        for _ in range(h.nb_snapshots):
            snap = s.unpack_snapshot(raw, pos)
            if isinstance(snap, str):
                raise FormatError(f"{self.path}: {snap}")
            if snap.l1_table_offset % self.cluster_size or \
                    snap.l1_table_offset + snap.l1_size * 8 > self.file_size:
                raise FormatError(f"{self.path}: snapshot {snap.id} has its L1 table "
                                  f"misplaced")
            self.snapshots.append(snap)
            pos += snap.entry_size

    def _select_snapshot(self, which: str) -> None:
        for snap in self.snapshots:
            if which in (snap.id, snap.name):
                l1 = _be_array(pread_exact(self.fd, snap.l1_size * 8, snap.l1_table_offset))
                self._check_l1(l1, f"snapshot {snap.id} L1 table")
                self.l1 = l1
                self.snapshot = snap
                if snap.disk_size is not None:
                    self.header.size = snap.disk_size
                self._l2_cache.clear()
                return
        raise FormatError(f"{self.path}: no snapshot {which!r}", errno.ENOENT)

    def _prepare_writes(self, for_check: bool = False) -> None:
        h = self.header
        if for_check:
            return
        if h.incompatible_features & s.INCOMPAT_CORRUPT:
            raise FormatError(f"{self.path}: marked corrupt: repair it (check -r all) "
                              f"before writing", errno.EROFS)
        if h.incompatible_features & s.INCOMPAT_DIRTY:
            raise FormatError(f"{self.path}: dirty (lazy refcounts were not written "
                              f"back): repair it (check -r all) before writing",
                              errno.EROFS)
        if self.snapshot is not None:
            raise UnsupportedImage(f"{self.path}: snapshots are read-only")
        self.refcounts = self.open_refcounts()

    def open_refcounts(self) -> Refcounts:
        h = self.header
        end = max(self.file_size, h.refcount_table_offset
                  + h.refcount_table_clusters * self.cluster_size)
        return Refcounts(self.fd, self.path, self.cluster_bits, h.refcount_order,
                         h.refcount_table_offset, h.refcount_table_clusters, self.file_size,
                         end, self._table_moved)

    def _table_moved(self, offset: int, clusters: int) -> None:
        os.fsync(self.fd)
        pwrite_all(self.fd, offset.to_bytes(8, "big") + clusters.to_bytes(4, "big"),
                   s.OFF_REFTABLE)
        os.fsync(self.fd)
        self.header.refcount_table_offset = offset
        self.header.refcount_table_clusters = clusters

    def resolve(self, name: str) -> str:
        """A file name from the header, relative to this image's folder."""
        if os.path.isabs(name):
            return name
        return os.path.join(os.path.dirname(os.path.abspath(self.path)), name)

    # ----------------------------------------------------------------- properties
    @property
    def size(self) -> int:
        return self.header.size

    @property
    def sectors(self) -> int:
        return -(-self.size // SECTOR_SIZE)

    @property
    def version(self) -> int:
        return self.header.version

    @property
    def is_differencing(self) -> bool:
        return self.backing_file is not None

    def backing_path(self) -> str | None:
        return self.resolve(self.backing_file) if self.backing_file else None

    @property
    def dirty(self) -> bool:
        return bool(self.header.incompatible_features & s.INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.header.incompatible_features & s.INCOMPAT_CORRUPT)

    # ----------------------------------------------------------------- L2 tables
    def l2_table(self, l1_index: int) -> array.array | None:
        """The L2 table an L1 entry points at (entries as 64-bit words), or None."""
        if l1_index >= len(self.l1):
            return None
        off = self.l1[l1_index] & s.L1_OFFSET_MASK
        if not off:
            return None
        table = self._l2_cache.get(off)
        if table is None:
            table = _be_array(pread_exact(self.fd, self.cluster_size, off))
            self._l2_cache[off] = table
            if len(self._l2_cache) > L2_CACHE_TABLES:
                self._l2_cache.popitem(last=False)
        else:
            self._l2_cache.move_to_end(off)
        return table

    @property
    def plain_entries(self) -> bool:
        """Whether an L2 entry is one 64-bit word of qcow2's (not extended, with a
        subcluster bitmap; not the old qcow's, whose entries mean other things)."""
        return self._plain_entries and not self.extended

    @property
    def l2_cache(self) -> OrderedDict[int, array.array]:
        """The cached L2 tables (native-order words) by their offset in the file: the
        same object while open, its tables changed in place as the image changes (to be
        read, never changed, from outside)."""
        return self._l2_cache

    def quick_lookup(self, offset: int, length: int) -> tuple[int, int, bool] | None:
        """(kind, host offset, owned) of a range that one kind covers whole, when a look at
        memory tells: an L1 entry without a table, or plain entries (not compressed, not
        in subclusters, data clusters aligned) of one L2 table in the cache, all alike. For
        DATA the host offset is the range's, the clusters following each other in the file
        with the same flags, and owned says whether this image owns them (COPIED:
        writable in place); ZERO and HOLE carry (0, False). Else None: the runs tell (and
        say what is wrong with a bad entry). Nothing is read and no runs are built: the
        path of a read, write or status of a running disk, whole for a range inside one
        cluster and for up to :data:`QUICK_CLUSTERS` clusters that a guest or a copy
        wrote in order."""
        cs = self.cluster_size
        cluster, within = divmod(offset, cs)
        if self.extended or not self._plain_entries:
            return None
        more = (within + length - 1) // cs if length > cs - within else 0
        l1i, l2i = divmod(cluster, self.l2_entries)
        if l1i >= len(self.l1) or more >= QUICK_CLUSTERS or l2i + more >= self.l2_entries:
            return None
        l2_off = self.l1[l1i] & s.L1_OFFSET_MASK
        if not l2_off:
            return _QUICK_HOLE
        table = self._l2_cache.get(l2_off)
        if table is None:
            return None
        entry = table[l2i]
        if entry & (s.OFLAG_COMPRESSED | s.L2_STANDARD_RESERVED_MASK):
            return None
        if entry & s.OFLAG_ZERO:
            if self.version < 3:
                return None
            for k in range(l2i + 1, l2i + more + 1):
                e = table[k]
                if not e & s.OFLAG_ZERO or e & (s.OFLAG_COMPRESSED
                                                 | s.L2_STANDARD_RESERVED_MASK):
                    return None
            return _QUICK_ZERO
        host = entry & s.L2_OFFSET_MASK
        if not host:
            for k in range(l2i + 1, l2i + more + 1):
                if table[k] & (s.L2_OFFSET_MASK | s.OFLAG_ZERO | s.OFLAG_COMPRESSED
                               | s.L2_STANDARD_RESERVED_MASK):
                    return None
            return _QUICK_HOLE
        if host % cs:
            return None
        # The next clusters' entries are this one's moved on by a cluster each: the same
        # flags, the next host cluster (no carry into the flags: offsets are < 2^56).
        for k in range(1, more + 1):
            if table[l2i + k] != entry + k * cs:
                return None
        return DATA, host + within, bool(entry & s.OFLAG_COPIED)

    def metadata_cached(self, offset: int, length: int) -> bool:
        """Whether finding the runs of the range reads nothing from the file."""
        span = self.cluster_size * self.l2_entries
        for l1i in range(offset // span, (offset + max(length, 1) - 1) // span + 1):
            if l1i < len(self.l1):
                off = self.l1[l1i] & s.L1_OFFSET_MASK
                if off and off not in self._l2_cache:
                    return False
        return True

    def in_place(self, offset: int, length: int) -> int | None:
        """The host offset where the whole range can be written as it is (clusters this
        image owns, contiguous in the file, no zero flag), or None."""
        cs = self.cluster_size
        pos, end = offset, offset + length
        host_start = None
        while pos < end:
            cluster, within = divmod(pos, cs)
            n = min(cs - within, end - pos)
            entry, bitmap = self._entry(cluster)
            if entry & s.OFLAG_COMPRESSED:
                return None
            off = self._host_of(cluster, entry)
            if not off or not entry & s.OFLAG_COPIED:
                return None
            if self.extended:
                sc = self.subcluster_size
                first, last = within // sc, (within + n - 1) // sc
                mask = ((1 << (last + 1)) - 1) & ~((1 << first) - 1)
                if bitmap & mask != mask:
                    return None
            elif entry & s.OFLAG_ZERO:
                return None
            if host_start is None:
                host_start = off + within
            elif off + within != host_start + (pos - offset):
                return None
            pos += n
        return host_start

    def _entry(self, cluster: int) -> tuple[int, int]:
        l1i, l2i = divmod(cluster, self.l2_entries)
        table = self.l2_table(l1i)
        if table is None:
            return 0, 0
        if self.extended:
            return table[2 * l2i], table[2 * l2i + 1]
        return table[l2i], 0

    def _host_of(self, cluster: int, entry: int) -> int:
        """The host offset of a cluster's L2 entry (not a compressed one), checked as
        every use of it must be before reading or writing there: no reserved bits in a
        standard entry, and cluster aligned (else a write would land across two
        clusters)."""
        if entry & s.L2_STANDARD_RESERVED_MASK and not self.extended:
            raise FormatError(f"{self.path}: L2 entry of cluster {cluster} has reserved "
                              f"bits set ({entry:#x})")
        off = entry & s.L2_OFFSET_MASK
        if off % self.cluster_size:
            raise FormatError(f"{self.path}: data cluster {cluster} at {off:#x} is not "
                              f"cluster aligned")
        return off

    def _cluster_runs(self, cluster: int, lo: int, hi: int
                      ) -> Iterator[tuple[int, int, int, int]]:
        """Runs of bytes [lo, hi) inside one cluster: (in-cluster start, end, kind, host)."""
        entry, bitmap = self._entry(cluster)
        if entry & s.OFLAG_COMPRESSED:
            yield lo, hi, COMPRESSED, cluster
            return
        off = self._host_of(cluster, entry)
        if not self.extended:
            if entry & s.OFLAG_ZERO and self.version >= 3:
                yield lo, hi, ZERO, 0
            elif off:
                yield lo, hi, DATA, off + lo
            else:
                yield lo, hi, HOLE, 0
            return
        alloc, zero = bitmap & s.SUBCLUSTER_ALLOC_MASK, bitmap >> 32
        if alloc & zero:
            raise FormatError(f"{self.path}: cluster {cluster}: subclusters both allocated "
                              f"and zero (bitmap {bitmap:#x})")
        if alloc and not off:
            raise FormatError(f"{self.path}: cluster {cluster}: allocated subclusters "
                              f"without a host cluster")
        sc = self.subcluster_size
        pos = lo
        while pos < hi:
            j = pos // sc
            end = min(hi, (j + 1) * sc)
            if alloc >> j & 1:
                yield pos, end, DATA, off + pos
            elif zero >> j & 1:
                yield pos, end, ZERO, 0
            else:
                yield pos, end, HOLE, 0
            pos = end

    def runs(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """Byte runs (start, length, kind, host) of the virtual disk, merged."""
        cs = self.cluster_size
        pos, end = offset, offset + length
        cur: list[int] | None = None
        span = cs * self.l2_entries
        while pos < end:
            l1i = pos // span
            if l1i >= len(self.l1) or not self.l1[l1i] & s.L1_OFFSET_MASK:
                # No L2 table: the whole range it would map is a hole.
                stop_at = min(end, (l1i + 1) * span)
                if cur is not None and cur[2] == HOLE and cur[0] + cur[1] == pos:
                    cur[1] += stop_at - pos
                else:
                    if cur is not None:
                        yield cur[0], cur[1], cur[2], cur[3]
                    cur = [pos, stop_at - pos, HOLE, 0]
                pos = stop_at
                continue
            if self._plain_entries and not self.extended:
                # One table for the clusters it maps: the entries in a plain loop, with
                # _cluster_runs' verdicts (a lookup and a generator per cluster cost most
                # of a long walk: block status, map, check, convert).
                table = self.l2_table(l1i)
                assert table is not None
                stop_at = min(end, (l1i + 1) * span)
                first = pos // cs
                zero_ok = self.version >= 3
                for cluster in range(first, (stop_at - 1) // cs + 1):
                    entry = table[cluster - l1i * self.l2_entries]
                    base = cluster * cs
                    lo = pos if cluster == first else base
                    hi = min(stop_at, base + cs)
                    if entry & s.OFLAG_COMPRESSED:
                        kind, host = COMPRESSED, cluster
                    else:
                        off = self._host_of(cluster, entry) if entry else 0
                        if entry & s.OFLAG_ZERO and zero_ok:
                            kind, host = ZERO, 0
                        elif off:
                            kind, host = DATA, off + lo - base
                        else:
                            kind, host = HOLE, 0
                    if cur is not None and cur[2] == kind and cur[0] + cur[1] == lo and (
                            (kind == DATA and cur[3] + cur[1] == host)
                            or kind in (HOLE, ZERO)):
                        cur[1] += hi - lo
                        continue
                    if cur is not None:
                        yield cur[0], cur[1], cur[2], cur[3]
                    cur = [lo, hi - lo, kind, host]
                pos = stop_at
                continue
            cluster, within = divmod(pos, cs)
            stop = min(cs, within + end - pos)
            base = cluster * cs
            for lo, hi, kind, host in self._cluster_runs(cluster, within, stop):
                start = base + lo
                if cur is not None and cur[2] == kind and kind in (HOLE, ZERO) \
                        and cur[0] + cur[1] == start:
                    cur[1] += hi - lo
                    continue
                if cur is not None and kind == DATA and cur[2] == DATA \
                        and cur[0] + cur[1] == start and cur[3] + cur[1] == host:
                    cur[1] += hi - lo
                    continue
                if cur is not None:
                    yield cur[0], cur[1], cur[2], cur[3]
                cur = [start, hi - lo, kind, host]
            pos = base + stop
        if cur is not None:
            yield cur[0], cur[1], cur[2], cur[3]

    def extents(self, sector: int, count: int) -> Iterator[tuple[int, int, int | None]]:
        """As VhdImage.extents: (first sector, count, file offset or None). Zero and
        compressed runs have no offset to read: use :meth:`readinto_layer`."""
        for start, n, kind, host in self.runs(sector * SECTOR_SIZE, count * SECTOR_SIZE):
            yield start // SECTOR_SIZE, n // SECTOR_SIZE, host if kind == DATA else None

    def status(self, sector: int, count: int) -> Iterator[tuple[int, int, int]]:
        """(first sector, count, kind) for block status and maps."""
        for start, n, kind, _host in self.runs(sector * SECTOR_SIZE, count * SECTOR_SIZE):
            yield start // SECTOR_SIZE, n // SECTOR_SIZE, DATA if kind == COMPRESSED else kind

    def allocated_bytes(self) -> int:
        """Bytes of the disk this layer answers for (data, compressed or zero)."""
        return sum(n for _start, n, kind, _host in self.runs(0, self.sectors * SECTOR_SIZE)
                   if kind != HOLE)

    # ----------------------------------------------------------------- reading
    def readinto_layer(self, sector: int, count: int, view: memoryview,
                       below: ReadBelow | None = None) -> None:
        """Fill ``view`` (count sectors) with this layer's view of the disk; what it does
        not hold comes from ``below`` (zeros without it)."""
        base = sector * SECTOR_SIZE
        for start, n, kind, host in self.runs(base, count * SECTOR_SIZE):
            sub = view[start - base : start - base + n]
            if kind == DATA:
                preadv_into(self.data_fd, sub, host)
            elif kind == ZERO:
                zero_fill(sub)
            elif kind == HOLE:
                if below is None:
                    zero_fill(sub)
                else:
                    below(start // SECTOR_SIZE, n // SECTOR_SIZE, sub)
            else:
                cluster = host
                data = self.inflate(cluster)
                within = start - cluster * self.cluster_size
                sub[:] = data[within : within + n]

    def read(self, sector: int, count: int) -> bytearray:
        buf = bytearray(count * SECTOR_SIZE)
        self.readinto_layer(sector, count, memoryview(buf), self.read_below)
        return buf

    def compressed_span(self, entry: int) -> tuple[int, int]:
        """(host offset, bytes) of a compressed cluster descriptor."""
        mask, shift = s.compressed_geometry(self.cluster_bits)
        desc = entry & ((1 << 62) - 1)
        coff = desc & mask & ((1 << 56) - 1)
        nsec = desc >> shift
        return coff, (nsec + 1) * SECTOR_SIZE - (coff & (SECTOR_SIZE - 1))

    def compressed(self, cluster: int) -> bool:
        """Whether the cluster is a compressed one now (a write makes it a data cluster)."""
        return bool(self._entry(cluster)[0] & s.OFLAG_COMPRESSED)

    def inflate(self, cluster: int) -> bytes:
        """The contents of a compressed cluster (the last one is kept)."""
        if self._inflated is not None and self._inflated[0] == cluster:
            return self._inflated[1]
        entry, _ = self._entry(cluster)
        coff, clen = self.compressed_span(entry)
        raw = os.pread(self.data_fd, clen, coff)
        cs = self.cluster_size
        problem = None
        data = b""
        if self.header.compression_type == s.COMPRESSION_ZSTD:
            try:
                import zstandard  # noqa: PLC0415
            except ImportError:
                raise UnsupportedImage(f"{self.path}: zstd-compressed clusters need the "
                                       f"'zstandard' Python package") from None
            try:
                dobj = zstandard.ZstdDecompressor().decompressobj()
                data = dobj.decompress(raw)
            except zstandard.ZstdError as exc:
                problem = str(exc)
        else:
            try:
                dobj = zlib.decompressobj(-12)
                data = dobj.decompress(raw, cs)
            except zlib.error as exc:
                problem = str(exc)
        if problem is None and len(data) < cs:
            problem = f"inflates to {len(data)} bytes, not {cs}"
        if problem is not None:
            raise FormatError(f"{self.path}: compressed cluster {cluster} (at {coff:#x}, "
                              f"{clen} bytes) does not inflate: {problem}")
        data = bytes(data[:cs])
        self._inflated = (cluster, data)
        return data

    # ----------------------------------------------------------------- writing
    def _require_writable(self) -> None:
        if not self.writable or self.refcounts is None:
            raise ReadOnlyImage(f"{self.path} is open read-only")

    def _check_range(self, sector: int, nbytes: int) -> None:
        if sector < 0 or sector * SECTOR_SIZE + nbytes > self.sectors * SECTOR_SIZE:
            raise OutOfRange(f"write past the end of {self.path}", errno.ENOSPC)

    def write(self, sector: int, data: bytes | bytearray | memoryview) -> None:
        """Write whole sectors."""
        self._require_writable()
        view = memoryview(data).cast("B")
        self._check_range(sector, len(view))
        cs = self.cluster_size
        pos, end = sector * SECTOR_SIZE, sector * SECTOR_SIZE + len(view)
        self._changing()
        while pos < end:
            cluster, within = divmod(pos, cs)
            done = pos - sector * SECTOR_SIZE
            if within == 0 and end - pos >= 2 * cs:
                k = self._write_new_clusters(cluster, view[done : done + (end - pos) // cs * cs])
                if k:
                    pos += k * cs
                    continue
            n = min(cs - within, end - pos)
            self._write_cluster(cluster, within, view[done : done + n])
            pos += n

    def _write_new_clusters(self, cluster: int, data: memoryview) -> int:
        """Whole clusters from ``cluster`` that hold nothing in this image (unallocated
        or zero without a host cluster), up to the end of their L2 table: written as one
        run of new clusters, with one write each for the data, the refcounts and the L2
        entries (the same order as one by one). Returns how many (0: not two or more)."""
        cs = self.cluster_size
        l1i, l2i = divmod(cluster, self.l2_entries)
        if l1i >= len(self.l1):
            return 0
        w = self.l2_entry_words
        limit = min(len(data) // cs, self.l2_entries - l2i)
        table = self.l2_table(l1i)
        k = 0
        if table is not None:
            while k < limit:
                entry = table[(l2i + k) * w]
                if entry & ~s.OFLAG_ZERO or (w == 2 and table[(l2i + k) * w + 1]
                                             & s.SUBCLUSTER_ALLOC_MASK):
                    break
                k += 1
        else:
            k = limit
        if k < 2:
            return 0
        table, table_off, word = self._l2_for_write(cluster)
        rc = self.refcounts
        assert rc is not None
        new = rc.allocate(k)
        pwrite_all(self.fd, data[: k * cs], new)
        rc.update(new >> self.cluster_bits, k, +1)
        for i in range(k):
            table[word + i * w] = (new + i * cs) | s.OFLAG_COPIED
            if w == 2:
                table[word + i * w + 1] = s.SUBCLUSTER_ALLOC_MASK
        pwrite_all(self.fd, _be_bytes(table[word : word + k * w]), table_off + word * 8)
        return k

    def _changing(self) -> None:
        """Before the first change: clear the autoclear bits of what we do not keep up to
        date (qemu's rule for programs that do not know a feature). Persistent bitmaps
        do not record our writes, so their bit goes: qemu then treats them as
        inconsistent, as after any program without bitmap support, instead of trusting
        bitmaps that missed changes."""
        self._dirty = True
        self.clear_autoclear()

    def clear_autoclear(self) -> None:
        """Clear the autoclear bits of what we do not keep up to date, once (a writer that
        changes data without the library's knowledge, as a driver writing clusters in
        place does, calls this before it writes)."""
        if self._cleared_autoclear:
            return
        self._cleared_autoclear = True
        h = self.header
        if h.version < 3:
            return
        keep = h.autoclear_features & s.AUTOCLEAR_DATA_FILE_RAW
        if keep != h.autoclear_features:
            pwrite_all(self.fd, keep.to_bytes(8, "big"), s.OFF_AUTOCLEAR)
            os.fsync(self.fd)
            h.autoclear_features = keep

    def _l2_for_write(self, cluster: int) -> tuple[array.array, int, int]:
        """The L2 table for ``cluster`` owned by this image alone (made or copied as
        needed): (table, its offset, index of the entry's first word)."""
        rc = self.refcounts
        assert rc is not None
        l1i, l2i = divmod(cluster, self.l2_entries)
        if l1i >= len(self.l1):
            raise OutOfRange(f"cluster {cluster} beyond the L1 table of {self.path}")
        entry = self.l1[l1i]
        off = entry & s.L1_OFFSET_MASK
        if off and entry & s.OFLAG_COPIED:
            table = self.l2_table(l1i)
            assert table is not None
            return table, off, l2i * self.l2_entry_words
        old = self.l2_table(l1i) if off else None
        table = array.array("Q", old) if old is not None else \
            array.array("Q", bytes(self.cluster_size))
        new = rc.allocate(1)
        pwrite_all(self.fd, _be_bytes(table), new)
        rc.update(new >> self.cluster_bits, 1, +1)
        self._set_l1(l1i, new | s.OFLAG_COPIED)
        self._l2_cache[new] = table
        if off:
            self._release(off, 1)
        return table, new, l2i * self.l2_entry_words

    def _set_l1(self, index: int, value: int) -> None:
        self.l1[index] = value
        pwrite_all(self.fd, value.to_bytes(8, "big"), self.header.l1_table_offset + index * 8)

    def _set_l2(self, table: array.array, table_off: int, word: int, entry: int,
                bitmap: int | None = None) -> None:
        table[word] = entry
        raw = entry.to_bytes(8, "big")
        if bitmap is not None:
            table[word + 1] = bitmap
            raw += bitmap.to_bytes(8, "big")
        pwrite_all(self.fd, raw, table_off + word * 8)

    def _release(self, offset: int, clusters: int) -> None:
        """Lower the counts of clusters no longer referenced from here; punch the freed.
        Under :attr:`free_guard` when there is one: whoever reads the L2 entries without
        the library (a compiled inline path) holds it while it uses what they said."""
        rc = self.refcounts
        assert rc is not None
        with self.free_guard if self.free_guard is not None else contextlib.nullcontext():
            freed = rc.update(offset >> self.cluster_bits, clusters, -1)
            for c in freed:
                self._punch(c << self.cluster_bits, self.cluster_size)

    def _punch(self, offset: int, length: int) -> None:
        with contextlib.suppress(OSError):
            punch_hole(self.fd, offset, length)

    def _release_entry(self, entry: int) -> None:
        """Drop this image's reference to the host cluster(s) of an L2 entry."""
        if entry & s.OFLAG_COMPRESSED:
            coff, clen = self.compressed_span(entry)
            first = coff >> self.cluster_bits
            last = (coff + clen - 1) >> self.cluster_bits
            self._release(first << self.cluster_bits, last - first + 1)
            return
        off = entry & s.L2_OFFSET_MASK
        if off:
            self._release(off, 1)

    def _below(self, cluster: int, lo: int, hi: int, buf: memoryview) -> None:
        """Fill buf (bytes [lo, hi) of the cluster) from what lies below this layer."""
        base = cluster * self.cluster_size
        if self.backing_file is None:
            zero_fill(buf)
            return
        if self.read_below is None:
            raise ChainError(f"{self.path}: writing needs its backing file: open it as "
                             f"a chain")
        # The virtual disk may end inside the cluster: what lies past it is zeros.
        limit = max(0, min(hi, self.size - base) - lo)
        limit -= limit % SECTOR_SIZE
        if limit:
            self.read_below((base + lo) // SECTOR_SIZE, limit // SECTOR_SIZE, buf[:limit])
        zero_fill(buf[limit:])

    def _old_contents(self, cluster: int, entry: int, bitmap: int) -> bytearray:
        """What the whole cluster reads as now, through this layer."""
        cs = self.cluster_size
        buf = bytearray(cs)
        view = memoryview(buf)
        for lo, hi, kind, host in self._cluster_runs(cluster, 0, cs):
            sub = view[lo:hi]
            if kind == DATA:
                preadv_into(self.fd, sub, host)
            elif kind == HOLE:
                self._below(cluster, lo, hi, sub)
            elif kind == COMPRESSED:
                sub[:] = self.inflate(cluster)[lo:hi]
        return buf

    def _write_cluster(self, cluster: int, within: int, data: memoryview) -> None:
        table, table_off, word = self._l2_for_write(cluster)
        entry = table[word]
        bitmap = table[word + 1] if self.extended else 0
        cs = self.cluster_size
        compressed = bool(entry & s.OFLAG_COMPRESSED)
        off = 0 if compressed else self._host_of(cluster, entry)
        owned = bool(off) and not compressed and bool(entry & s.OFLAG_COPIED)
        if owned and not self.extended:
            if not entry & s.OFLAG_ZERO:
                pwrite_all(self.fd, data, off + within)
                return
            # A preallocated zero cluster: write it whole, then drop the zero flag.
            buf = bytearray(cs)
            buf[within : within + len(data)] = data
            pwrite_all(self.fd, buf, off)
            self._set_l2(table, table_off, word, entry & ~s.OFLAG_ZERO)
            return
        if owned and self.extended:
            self._write_subclusters(cluster, table, table_off, word, entry, bitmap,
                                    within, data)
            return
        if self.extended and not off and not compressed:
            # A new cluster for subclusters: only those the write touches are filled.
            new = self.refcounts.allocate(1)  # type: ignore[union-attr]
            self._write_subclusters(cluster, table, table_off, word, new | s.OFLAG_COPIED,
                                    bitmap, within, data, fresh=True)
            return
        # Copy on write: a new cluster holding the old contents and the new data.
        if within == 0 and len(data) == cs:
            buf: bytearray | memoryview = data
        else:
            buf = self._old_contents(cluster, entry, bitmap)
            buf[within : within + len(data)] = data
        rc = self.refcounts
        assert rc is not None
        new = rc.allocate(1)
        pwrite_all(self.fd, buf, new)
        rc.update(new >> self.cluster_bits, 1, +1)
        if self.extended:
            self._set_l2(table, table_off, word, new | s.OFLAG_COPIED, s.SUBCLUSTER_ALLOC_MASK)
        else:
            self._set_l2(table, table_off, word, new | s.OFLAG_COPIED)
        if self._inflated is not None and self._inflated[0] == cluster:
            self._inflated = None
        if off or compressed:
            self._release_entry(entry)

    def _write_subclusters(self, cluster: int, table: array.array, table_off: int, word: int,
                           entry: int, bitmap: int, within: int, data: memoryview, *,
                           fresh: bool = False) -> None:
        sc = self.subcluster_size
        off = entry & s.L2_OFFSET_MASK
        first, last = within // sc, (within + len(data) - 1) // sc
        alloc, zero = bitmap & s.SUBCLUSTER_ALLOC_MASK, bitmap >> 32
        lo, hi = first * sc, (last + 1) * sc
        need = any(not alloc >> j & 1 for j in range(first, last + 1))
        if not need:
            pwrite_all(self.fd, data, off + within)
            return
        # Fill the partly written subclusters at both ends from what they read as now.
        buf = bytearray(hi - lo)
        view = memoryview(buf)
        for j in sorted({first, last}):
            if within <= j * sc and within + len(data) >= (j + 1) * sc:
                continue
            sub = view[j * sc - lo : (j + 1) * sc - lo]
            if alloc >> j & 1:
                preadv_into(self.fd, sub, off + j * sc)
            elif not zero >> j & 1:
                self._below(cluster, j * sc, (j + 1) * sc, sub)
        buf[within - lo : within - lo + len(data)] = data
        pwrite_all(self.fd, buf, off + lo)
        mask = ((1 << (last + 1)) - 1) & ~((1 << first) - 1)
        new_bitmap = (alloc | mask) | ((zero & ~mask) << 32)
        if fresh:
            self.refcounts.update(off >> self.cluster_bits, 1, +1)  # type: ignore[union-attr]
        self._set_l2(table, table_off, word, entry, new_bitmap)

    # ----------------------------------------------------------------- discard, zeroes
    def discard(self, sector: int, count: int) -> None:
        """Drop whole clusters (a partial cluster is left as it is): they read as zeros
        afterwards where the format can say so (v3 with a backing file: the zero flag),
        else as unallocated (zeros, or the backing file's data on a v2 image)."""
        self._require_writable()
        self._check_range(sector, count * SECTOR_SIZE)
        zero = self.backing_file is not None
        if self.extended:
            # Extended L2: the whole subclusters of the partial clusters at both ends go
            # too (their bits in the bitmap), the partly covered ones stay.
            for cluster, a, b in self._partial_ends(sector, count):
                sc = self.subcluster_size
                lo, hi = -(-a // sc) * sc, b // sc * sc
                if hi > lo:
                    self._changing()
                    self._drop_subclusters(cluster, lo, hi, zero=zero)
        self._drop_clusters(sector, count, zero=zero)

    def _partial_ends(self, sector: int, count: int) -> list[tuple[int, int, int]]:
        """The partly covered clusters at both ends of a range: (cluster, start, end),
        bytes inside the cluster."""
        cs = self.cluster_size
        pos, end = sector * SECTOR_SIZE, (sector + count) * SECTOR_SIZE
        head = min(end, -(-pos // cs) * cs)
        tail = max(head, end // cs * cs)
        out = []
        for a, b in ((pos, head), (tail, end)):
            if b > a and (a % cs or b - a < cs):
                cluster = a // cs
                out.append((cluster, a - cluster * cs, b - cluster * cs))
        return out

    def _drop_subclusters(self, cluster: int, lo: int, hi: int, *, zero: bool) -> bool:
        """Extended L2: make subclusters [lo, hi) (bytes, subcluster aligned) of one
        cluster read as zeros (``zero``: the zero bits) or as unallocated, in one write
        of the L2 entry; a host cluster left without allocated subclusters is released
        after. False for a compressed cluster (no bitmap to change)."""
        sc = self.subcluster_size
        first, last = lo // sc, hi // sc
        mask = ((1 << last) - 1) & ~((1 << first) - 1)
        entry, bitmap = self._entry(cluster)
        if entry & s.OFLAG_COMPRESSED:
            return False
        alloc, zbits = bitmap & s.SUBCLUSTER_ALLOC_MASK, bitmap >> 32
        new_alloc = alloc & ~mask
        new_zero = (zbits | mask) if zero else (zbits & ~mask)
        if (new_alloc, new_zero) == (alloc, zbits):
            return True
        table, table_off, word = self._l2_for_write(cluster)
        entry = table[word]
        keep = entry if new_alloc else 0
        self._set_l2(table, table_off, word, keep, new_alloc | (new_zero << 32))
        if not new_alloc and entry & s.L2_OFFSET_MASK:
            self._release_entry(entry)
        return True

    def write_zeroes(self, sector: int, count: int) -> None:
        """Make sectors read as zeros: whole clusters by their L2 entry (the zero flag,
        or unallocated where nothing lies below), freeing their data; the rest by
        writing zeros."""
        self._require_writable()
        self._check_range(sector, count * SECTOR_SIZE)
        cs = self.cluster_size
        pos, end = sector * SECTOR_SIZE, (sector + count) * SECTOR_SIZE
        head = min(end, -(-pos // cs) * cs)
        tail = max(head, end // cs * cs)
        if self.backing_file is not None and self.version < 3:
            head = tail = end
        self._changing()
        for a, b in ((pos, head), (tail, end)):
            if a < b and self.extended:
                # Whole subclusters by their zero bits; only the partly covered ones
                # at both ends are written.
                sc = self.subcluster_size
                lo, hi = -(-a // sc) * sc, b // sc * sc
                base = a // cs * cs
                if hi > lo and self._drop_subclusters(a // cs, lo - base, hi - base,
                                                      zero=True):
                    self._write_zeros(a, lo)
                    self._write_zeros(hi, b)
                    continue
            self._write_zeros(a, b)
        if tail > head:
            self._drop_clusters(head // SECTOR_SIZE, (tail - head) // SECTOR_SIZE,
                                zero=True, exact=True)

    def _write_zeros(self, a: int, b: int) -> None:
        while a < b:
            n = min(b - a, 1 << 20)
            self.write(a // SECTOR_SIZE, bytes(n))
            a += n

    def _drop_clusters(self, sector: int, count: int, *, zero: bool,
                       exact: bool = False) -> None:
        cs = self.cluster_size
        start = -(-sector * SECTOR_SIZE // cs)
        stop = min((sector + count) * SECTOR_SIZE, self.size) // cs
        if (sector + count) * SECTOR_SIZE >= self.size:
            stop = -(-self.size // cs)
        use_zero = zero and self.version >= 3
        if zero and not use_zero and not exact:
            return
        self._changing()
        # Without a backing file an unallocated cluster reads as zeros already.
        bare = self.backing_file is None
        span = self.l2_entries
        cluster = start
        while cluster < stop:
            l1i = cluster // span
            if not self.l1[l1i] & s.L1_OFFSET_MASK and (bare or not use_zero):
                cluster = (l1i + 1) * span
                continue
            entry, bitmap = self._entry(cluster)
            cluster += 1
            if bare and not entry and not bitmap & s.SUBCLUSTER_ALLOC_MASK:
                continue
            if self.extended:
                target_bitmap = (s.SUBCLUSTER_ALLOC_MASK << 32) if use_zero else 0
                if entry == 0 and bitmap == target_bitmap:
                    continue
            else:
                target = s.OFLAG_ZERO if use_zero else 0
                if entry == target:
                    continue
            table, table_off, word = self._l2_for_write(cluster - 1)
            entry = table[word]
            if self.extended:
                self._set_l2(table, table_off, word, 0, target_bitmap)
            else:
                self._set_l2(table, table_off, word, target)
            if self._inflated is not None and self._inflated[0] == cluster - 1:
                self._inflated = None
            self._release_entry(entry)

    # ----------------------------------------------------------------- closing
    def flush(self) -> None:
        if self.writable and not self._closed:
            os.fsync(self.fd)
            self._dirty = False

    def close(self) -> None:
        if self._closed:
            return
        try:
            if self.writable and self._dirty:
                os.fsync(self.fd)
        finally:
            self._closed = True
            self._close_data_file()
            os.close(self.fd)

    def __enter__(self) -> Qcow2Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Qcow2Image {self.path} v{self.version} size={self.size} " \
               f"cluster={self.cluster_size}>"
