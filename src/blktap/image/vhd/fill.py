"""Allocating every block of a VHD (``vhd-util fill``).

Filling makes a dynamic or differencing image hold all of its disk itself: every block is
allocated and every bitmap bit set, with the content unchanged (zeros where a dynamic disk
had nothing, the parent's data for a differencing one). It preallocates a thin disk, or
makes a child independent of its parent's data. With ``bitmaps_only`` (``fill -b``) the
data area of the new blocks is not even allocated in the file system (the file stays
sparse), which only makes sense for a dynamic disk.

Speed: new blocks are laid out in batches, each made with a handful of large system calls
(one footer, one ``posix_fallocate`` for all their data, one bitmap write per block, one
BAT write, one batmap write) instead of one allocation per block; a differencing child's
blocks are read through the chain a block at a time and written only where the parent
has data.

Crash safety: the allocation order of :mod:`blktap.image.vhd.image`, per batch instead of
per block. A footer is written past the new blocks first (the file always ends in a valid
footer), then stale bytes are zeroed, then data and bitmaps, then (after an fsync) the BAT
entries, then the batmap. Killed at any point, the image is valid and its content is
unchanged; blocks not yet in the BAT are leaked space that the next writer reuses.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from blktap.errors import OutOfRange, UnsupportedImage, UsageError
from blktap.image.chain import Chain
from blktap.image.fileio import pwrite_all, pwritev_all, write_zeros, zero_fill
from blktap.image.vhd import bitmap as bm
from blktap.image.vhd import structs as s
from blktap.image.vhd.image import VhdImage

# Blocks laid out per batch (8 GiB of 2 MiB blocks): the unit of the crash-safe order.
# Each batch costs two fsyncs, which dominate the time of fill -b.
BATCH_BLOCKS = 4096
# A BAT entry holds the block's first sector in 32 bits, 0xFFFFFFFF meaning "unused":
# no block can start further into the file than this (2 TiB), whatever -B says.
MAX_BLOCK_SECTOR = s.BAT_ENTRY_UNUSED - 1
# Data areas start on this boundary (sectors): 4 KiB, as the rest of blktap lays them out.
ALIGN_SECTORS = 8


@dataclass(frozen=True)
class FillResult:
    allocated: int  # blocks newly allocated
    completed: int  # blocks that were allocated but partly empty, now full


def fill(path: str, *, bitmaps_only: bool = False, first_sector: int | None = None,
         last_sector: int | None = None) -> FillResult:
    """Allocate every block of ``path`` (or those holding sectors ``first_sector`` to
    ``last_sector``, inclusive), keeping the disk's content.

    Refused: a fixed disk (EINVAL), ``bitmaps_only`` on a differencing disk (EINVAL: the
    parent's data would be hidden behind zeros), a range past the end of the disk
    (ERANGE), a layout whose blocks would start past what a BAT entry can hold
    (EOVERFLOW, before anything is written).
    """
    with Chain.open(f"vhd:{path}", writable=True) as chain:
        leaf = chain.leaf
        assert isinstance(leaf, VhdImage)
        if not leaf.footer.is_dynamic or leaf.header is None:
            raise UnsupportedImage(f"{path}: a fixed disk has every block already",
                                   errno.EINVAL)
        if bitmaps_only and leaf.is_differencing:
            raise UsageError(f"{path}: filling a differencing disk's bitmaps without its "
                             f"data would hide the parent's data", errno.EINVAL)
        nblocks = -(-leaf.size // leaf.block_size)
        first = 0 if first_sector is None else first_sector // leaf.spb
        last = nblocks - 1 if last_sector is None else last_sector // leaf.spb
        if first >= nblocks or last >= nblocks:
            raise OutOfRange(f"{path}: sector range ends past the end of the disk "
                             f"({leaf.sectors} sectors)", errno.ERANGE)
        if first > last:
            raise UsageError(f"invalid sector range {first_sector}-{last_sector}",
                             errno.EINVAL)
        return _Filler(chain, leaf, bitmaps_only).run(first, last)


def _aligned(sector: int, bm_secs: int) -> int:
    """The first sector from ``sector`` where a block can start so that its data (after
    the bitmap) lands on a 4 KiB boundary."""
    return sector + (-(sector + bm_secs)) % ALIGN_SECTORS


class _Filler:
    def __init__(self, chain: Chain, leaf: VhdImage, bitmaps_only: bool) -> None:
        assert leaf.header is not None
        self.chain = chain
        self.leaf = leaf
        self.fd = leaf.fd
        self.bitmaps_only = bitmaps_only
        self.spb = leaf.spb
        self.bm_secs = leaf.bitmap_secs
        # Blocks laid out back to back keep the alignment: from one aligned start to the
        # next is the block's size rounded up to the alignment.
        used = self.bm_secs + self.spb
        self.stride = used + (-used) % ALIGN_SECTORS
        self.next_db = leaf.end_of_data() // s.SECTOR_SIZE
        # A block device's size is its capacity (fstat says 0): the space past the data
        # holds whatever the volume held before, zeroed below like a file's stale tail.
        self.file_size = leaf.file_size
        self.footer_end: int | None = None  # where this run last put the end footer
        self.footer = leaf.footer.sealed().pack()
        self.full_bitmap = b"\xff" * leaf.bitmap_bytes
        self.block_bytes = leaf.block_size
        self.zero_block = bytes(self.block_bytes)
        self.buf = bytearray(self.block_bytes)
        self.full_blocks: list[int] = []

    # ------------------------------------------------------------------ plan
    def run(self, first: int, last: int) -> FillResult:
        bat = self.leaf.bat
        todo = [b for b in range(first, last + 1) if bat[b] == s.BAT_ENTRY_UNUSED]
        partial = [b for b in range(first, last + 1)
                   if bat[b] != s.BAT_ENTRY_UNUSED and not self._is_full(b)]
        self._check_limit(todo)
        self._complete(partial)
        for i in range(0, len(todo), BATCH_BLOCKS):
            self._allocate(todo[i : i + BATCH_BLOCKS])
        self._trim()
        os.fsync(self.fd)
        return FillResult(len(todo), len(partial))

    def _is_full(self, blk: int) -> bool:
        return self.leaf.block_full(blk) or bm.all_set(self.leaf.bitmap(blk), self.spb)

    def _check_limit(self, todo: list[int]) -> None:
        if not todo:
            return
        p0 = _aligned(self.next_db, self.bm_secs)
        last = p0 + (len(todo) - 1) * self.stride
        if last > MAX_BLOCK_SECTOR:
            over = max(0, -(-(MAX_BLOCK_SECTOR + 1 - p0) // self.stride))
            raise OutOfRange(f"sector offset for extent {todo[over]} exceeds the 2 TB limit",
                             errno.EOVERFLOW)
        need = (last + self.bm_secs + self.spb) * s.SECTOR_SIZE + s.FOOTER_SIZE
        if self.leaf.on_device and need > self.file_size:
            raise OutOfRange(f"{self.leaf.path}: filling needs {need} bytes, the device "
                             f"holds {self.file_size}", errno.ENOSPC)

    # ------------------------------------------------------------------ blocks
    def _content(self, blk: int) -> memoryview | None:
        """The disk's current content over block ``blk`` in the reusable buffer (zeros
        past the end of the disk), or None when it is all zeros."""
        first = blk * self.spb
        n = min(self.spb, self.leaf.sectors - first)
        if not any(e.depth is not None for e in self.chain.map(first, n)):
            return None
        view = memoryview(self.buf)
        self.chain.readinto(first, view[: n * s.SECTOR_SIZE])
        if n < self.spb:
            zero_fill(view[n * s.SECTOR_SIZE :])
        if self.buf == self.zero_block:
            return None
        return view

    def _complete(self, blocks: list[int]) -> None:
        """Fill in the sectors allocated blocks lack (from the parent, or zeros), then set
        their whole bitmaps: the bitmap write is what makes the new sectors count, so it
        comes after the data is durable, and the batmap after the bitmaps."""
        if not blocks:
            return
        for blk in blocks:
            data_off = (self.leaf.bat[blk] + self.bm_secs) * s.SECTOR_SIZE
            n = min(self.spb, self.leaf.sectors - blk * self.spb)
            bits = bm.bit_string(self.leaf.bitmap(blk), self.spb)
            content = self._content(blk)
            view = content if content is not None else memoryview(self.zero_block)
            for first, count, is_set in bm.runs(bits, 0, n):
                if not is_set:
                    lo, hi = first * s.SECTOR_SIZE, (first + count) * s.SECTOR_SIZE
                    pwrite_all(self.fd, view[lo:hi], data_off + lo)
        os.fsync(self.fd)
        for blk in blocks:
            pwrite_all(self.fd, self.full_bitmap, self.leaf.bat[blk] * s.SECTOR_SIZE)
        os.fsync(self.fd)
        self.full_blocks.extend(blocks)
        self._write_batmap()

    def _allocate(self, blocks: list[int]) -> None:
        start = self.next_db
        p0 = _aligned(start, self.bm_secs)
        positions = [p0 + i * self.stride for i in range(len(blocks))]
        end_sec = positions[-1] + self.bm_secs + self.spb
        new_end = end_sec * s.SECTOR_SIZE
        fd = self.fd
        # 1. A valid footer past the new blocks (a device keeps its own in its last sector).
        if not self.leaf.on_device:
            pwrite_all(fd, self.footer, new_end)
        old_size = self.file_size
        self.file_size = max(old_size, new_end + s.FOOTER_SIZE)
        self.footer_end = new_end
        # 2. Bytes left past the end of the data (the old footer, space a crashed writer
        #    leaked) must not show through the new blocks.
        stale_end = min(old_size, new_end)
        if stale_end > start * s.SECTOR_SIZE:
            write_zeros(fd, start * s.SECTOR_SIZE, stale_end - start * s.SECTOR_SIZE)
        # 3. The data: allocated at once in the file system (zeros), unless -b.
        if not self.bitmaps_only:
            self._reserve(p0 * s.SECTOR_SIZE, new_end, old_size)
        # 4. Bitmaps, with the data where a parent has some.
        differencing = self.leaf.is_differencing
        for blk, pos in zip(blocks, positions, strict=True):
            content = self._content(blk) if differencing else None
            if content is None:
                pwrite_all(fd, self.full_bitmap, pos * s.SECTOR_SIZE)
            else:
                pwritev_all(fd, [self.full_bitmap, content], pos * s.SECTOR_SIZE)
        # 5. The BAT entries, once everything they point at is durable.
        os.fsync(fd)
        for blk, pos in zip(blocks, positions, strict=True):
            self.leaf.bat[blk] = pos
        self.leaf.write_bat(blocks[0], blocks[-1])
        os.fsync(fd)
        # 6. The batmap: these blocks are full now.
        self.full_blocks.extend(blocks)
        self._write_batmap()
        self.next_db = end_sec

    def _reserve(self, start: int, end: int, old_size: int) -> None:
        """Allocate [start, end) in the file system. Inside the old file the bytes were
        just zeroed; past it the file holds a hole, which posix_fallocate turns into
        allocated zeros (or explicit zeros where the file system cannot)."""
        if self.leaf.on_device:
            return
        try:
            os.posix_fallocate(self.fd, start, end - start)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            lo = max(start, old_size)
            if end > lo:
                write_zeros(self.fd, lo, end - lo)

    # ------------------------------------------------------------------ metadata
    def _write_batmap(self) -> None:
        leaf = self.leaf
        if leaf.batmap is None or leaf.batmap_header is None or not self.full_blocks:
            return
        if not leaf.batmap_valid:
            # A batmap that failed its checksum is not trusted: start again from nothing.
            leaf.batmap[:] = bytes(len(leaf.batmap))
        for blk in self.full_blocks:
            bm.set_bit(leaf.batmap, blk)
        self.full_blocks.clear()
        leaf.write_batmap()

    def _trim(self) -> None:
        """Cut space left after the last new block (a crashed writer's leak), once the
        footer this run wrote is the one at the end of the data."""
        end = self.next_db * s.SECTOR_SIZE
        if self.footer_end != end or self.leaf.on_device:
            return
        if os.fstat(self.fd).st_size > end + s.FOOTER_SIZE:
            os.ftruncate(self.fd, end + s.FOOTER_SIZE)
