"""qcow2 reference counts: the two-level table (refcount table -> refcount blocks) of one
image, read on demand, updated in place, grown at the end of the file.

Ordering (crash safety against a killed process): a new refcount block is written, with
its own count, before the table entry that points at it; a new, larger table and its new
blocks are written before the header names them, and the old table is released only
after. Callers raise the count of a cluster before any reference to it reaches the file
and lower it only once the last reference is gone from the file, so an interrupted update
can leak a cluster, never corrupt one.
"""

from __future__ import annotations

import array
import sys
from collections.abc import Callable

from blktap.errors import FormatError
from blktap.image.fileio import pread_exact, pwrite_all
from blktap.image.qcow2 import structs as s


class Refcounts:
    def __init__(self, fd: int, path: str, cluster_bits: int, order: int,
                 table_offset: int, table_clusters: int, file_size: int,
                 end_offset: int, on_table_moved: Callable[[int, int], None]) -> None:
        self.fd = fd
        self.path = path
        self.cluster_bits = cluster_bits
        self.cs = 1 << cluster_bits
        self.order = order
        self.bits = 1 << order
        self.max = (1 << self.bits) - 1
        self.per_block = (self.cs * 8) >> order
        self.table_offset = table_offset
        self.table_clusters = table_clusters
        self.file_size = file_size
        raw = array.array("Q")
        raw.frombytes(pread_exact(fd, table_clusters * self.cs, table_offset))
        if sys.byteorder == "little":
            raw.byteswap()
        self.table = raw
        for i, entry in enumerate(raw):
            if entry & s.REFTABLE_RESERVED_MASK:
                raise FormatError(f"{path}: refcount table entry {i} ({entry:#x}) is not "
                                  f"cluster aligned")
            off = entry & s.REFTABLE_OFFSET_MASK
            if off and (off % self.cs or off + self.cs > file_size or off < self.cs):
                raise FormatError(f"{path}: refcount block {i} at {off:#x} is misplaced "
                                  f"(unaligned, in the header or past the end of the file)")
        self.blocks: dict[int, bytearray] = {}
        # Where new clusters go: the end of the image, cluster aligned.
        self.end = -(-end_offset // self.cs) * self.cs
        self._on_table_moved = on_table_moved

    # ------------------------------------------------------------------ reading
    def block(self, index: int) -> bytearray | None:
        if index >= len(self.table):
            return None
        blk = self.blocks.get(index)
        if blk is None:
            off = self.table[index] & s.REFTABLE_OFFSET_MASK
            if not off:
                return None
            blk = bytearray(pread_exact(self.fd, self.cs, off))
            self.blocks[index] = blk
        return blk

    def _get_in(self, blk: bytearray, i: int) -> int:
        bits = self.bits
        if bits >= 8:
            n = bits >> 3
            return int.from_bytes(blk[i * n : i * n + n], "big")
        pos = i * bits
        return (blk[pos >> 3] >> (pos & 7)) & self.max

    def _set_in(self, blk: bytearray, i: int, value: int) -> tuple[int, int]:
        bits = self.bits
        if bits >= 8:
            n = bits >> 3
            blk[i * n : i * n + n] = value.to_bytes(n, "big")
            return i * n, i * n + n
        pos = i * bits
        byte = pos >> 3
        shift = pos & 7
        blk[byte] = (blk[byte] & ~(self.max << shift) & 0xFF) | (value << shift)
        return byte, byte + 1

    def get(self, cluster: int) -> int:
        blk = self.block(cluster // self.per_block)
        if blk is None:
            return 0
        return self._get_in(blk, cluster % self.per_block)

    # ------------------------------------------------------------------ allocating
    def allocate(self, count: int) -> int:
        """Reserve ``count`` contiguous clusters at the end of the image; their counts are
        raised by the caller (with :meth:`update`) once their contents are written."""
        # A stray count past the end (a leak left by a crash) is stepped over, never
        # raised further: the cluster stays leaked rather than doubly used.
        first = self.end >> self.cluster_bits
        c = first
        while c < first + count:
            if self.get(c):
                first = c = c + 1
                continue
            c += 1
        self.end = (first + count) << self.cluster_bits
        return first << self.cluster_bits

    def update(self, cluster: int, count: int, delta: int) -> list[int]:
        """Add ``delta`` to the counts of ``count`` clusters from ``cluster``; returns the
        clusters whose count fell to zero."""
        freed = []
        dirty: dict[int, list[int]] = {}
        for c in range(cluster, cluster + count):
            bi, i = divmod(c, self.per_block)
            blk = self.block(bi)
            if blk is None:
                if delta < 0:
                    raise FormatError(f"{self.path}: cluster {c} has no refcount to release")
                blk = self._new_block(bi)
            value = self._get_in(blk, i) + delta
            if value < 0:
                raise FormatError(f"{self.path}: refcount of cluster {c} would go below zero")
            if value > self.max:
                raise FormatError(f"{self.path}: refcount of cluster {c} would overflow "
                                  f"({self.bits}-bit refcounts)")
            if value == 0:
                freed.append(c)
            lo, hi = self._set_in(blk, i, value)
            span = dirty.setdefault(bi, [lo, hi])
            span[0], span[1] = min(span[0], lo), max(span[1], hi)
        for bi, (lo, hi) in dirty.items():
            off = self.table[bi] & s.REFTABLE_OFFSET_MASK
            pwrite_all(self.fd, memoryview(self.blocks[bi])[lo:hi], off + lo)
        return freed

    def set(self, cluster: int, value: int) -> None:
        """Set one count (check's repair)."""
        current = self.get(cluster)
        if value != current:
            self.update(cluster, 1, value - current)

    def _new_block(self, index: int) -> bytearray:
        if index >= len(self.table):
            self._grow_table(index + 1)
            existing = self.block(index)
            if existing is not None:
                return existing
        off = self.allocate(1)
        here = off >> self.cluster_bits
        blk = bytearray(self.cs)
        if here // self.per_block == index:
            self._set_in(blk, here % self.per_block, 1)
        pwrite_all(self.fd, blk, off)
        self.blocks[index] = blk
        if here // self.per_block != index:
            self.update(here, 1, +1)
        self.table[index] = off
        pwrite_all(self.fd, off.to_bytes(8, "big"), self.table_offset + index * 8)
        return blk

    def _grow_table(self, need: int) -> None:
        per_cluster = self.cs // 8
        start = self.end >> self.cluster_bits
        old = len(self.table)

        def uncovered(first: int, total: int) -> list[int]:
            ranges = sorted({c // self.per_block for c in range(first, first + total)})
            return [r for r in ranges if r >= old or not self.table[r]]

        n_tab = -(-max(need, old * 2) // per_cluster)
        new_ranges: list[int] = []
        while True:
            total = n_tab + len(new_ranges)
            ranges = uncovered(start, total)
            want = -(-max(need, old * 2, (max(ranges) + 1) if ranges else 0) // per_cluster)
            if ranges == new_ranges and want <= n_tab:
                break
            new_ranges, n_tab = ranges, max(n_tab, want)
        total = n_tab + len(new_ranges)
        table = array.array("Q", self.table)
        table.extend([0] * (n_tab * per_cluster - old))
        new_blocks: dict[int, bytearray] = {}
        for k, r in enumerate(new_ranges):
            table[r] = (start + n_tab + k) << self.cluster_bits
            new_blocks[r] = bytearray(self.cs)
        # Counts of the new clusters: in new blocks where their range has none yet, else
        # in the existing block (written before the header switches tables).
        in_existing = []
        for c in range(start, start + total):
            r, i = divmod(c, self.per_block)
            if r in new_blocks:
                self._set_in(new_blocks[r], i, 1)
            else:
                in_existing.append(c)
        self.end = (start + total) << self.cluster_bits
        for r, blk in new_blocks.items():
            pwrite_all(self.fd, blk, table[r])
        raw = array.array("Q", table)
        if sys.byteorder == "little":
            raw.byteswap()
        new_off = start << self.cluster_bits
        pwrite_all(self.fd, raw.tobytes(), new_off)
        for c in in_existing:
            self.update(c, 1, +1)
        old_off, old_clusters = self.table_offset, self.table_clusters
        self._on_table_moved(new_off, n_tab)
        self.table = table
        self.table_offset, self.table_clusters = new_off, n_tab
        self.blocks.update(new_blocks)
        self.update(old_off >> self.cluster_bits, old_clusters, -1)
