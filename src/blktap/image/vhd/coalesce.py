"""Coalesce: merge a differencing VHD into its immediate parent.

Every sector the child holds is copied to the same virtual sector of the parent (a VHD, or
a raw file or device). The child is not changed: afterwards the parent holds the child's
data, and the caller (sm, or ``blktap coalesce``) re-links the child's children onto the
parent and removes the child.

Speed: data moves file to file with ``copy_file_range`` (an in-kernel copy, or a reflink
where the file system can), one call per run of set bitmap bits, so a fully written block
is one call. The child's bitmaps are read once; the parent's bitmap and BAT sector are
written once per block.

Crash safety: the parent is written in :class:`VhdImage`'s order (footer at the new end,
data, bitmap, BAT entry), so a coalesce killed at any point leaves a valid parent that
holds part of the child's data. The leaf's content does not change, since the child still
covers every sector that was copied; running coalesce again finishes the job.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from blktap.errors import ChainError, FormatError, OutOfRange, UnsupportedImage
from blktap.image.fileio import copy_range, file_size_of, preadv_into
from blktap.image.parents import ParentPolicy, default_policy
from blktap.image.vhd import bitmap as bm
from blktap.image.vhd import structs as s
from blktap.image.vhd.image import VhdImage

# progress(blocks visited, blocks in the child's BAT)
Progress = Callable[[int, int], None]


@dataclass
class CoalesceResult:
    child: str
    parent: str
    parent_is_raw: bool
    sectors: int  # sectors merged, counted as the reference counts them
    blocks: int  # child blocks merged
    skipped_zero_sectors: int  # sparse mode: all-zero sectors not allocated in the parent

    @property
    def bytes(self) -> int:
        return self.sectors * s.SECTOR_SIZE


def coalesce(child_path: str, *, sparse: bool = False,
             progress: Progress | None = None,
             parent_policy: ParentPolicy | None = None) -> CoalesceResult:
    """Merge ``child_path`` into its parent.

    ``sparse``: blocks of the child that hold only zeros are not allocated in the parent
    when the parent would read zeros there anyway (a dynamic parent without the block).
    Raises UnsupportedImage for a disk that is not differencing, ParentNotFound,
    ChainError when the parent found is not the child's parent (uuid mismatch), and
    OutOfRange when the child holds data past the end of the parent, ParentNotAllowed
    when ``parent_policy`` (default: the environment's) refuses the parent.
    """
    with VhdImage.open(child_path) as child:
        if not child.is_differencing:
            raise UnsupportedImage(
                f"{child_path}: coalescing of non-differencing disks is not supported",
                errno.EINVAL)
        parent_path = default_policy(parent_policy).check(child_path, child.parent_path())
        if child.parent_is_raw:
            return _onto_raw(child, parent_path, progress)
        with VhdImage.open(parent_path, writable=True) as parent:
            assert child.header is not None
            if parent.footer.uuid != child.header.prt_uuid:
                raise ChainError(
                    f"{parent_path} is not the parent of {child_path} (its uuid "
                    f"{parent.uuid} differs from the child's parent uuid "
                    f"{child.header.parent_uuid_obj})")
            _check_fits(child, parent.sectors, parent_path)
            result = _onto_vhd(child, parent, sparse, progress)
            parent.flush()
            return result


def _check_fits(child: VhdImage, parent_sectors: int, parent_path: str) -> None:
    """Refuse before writing anything if the child holds data the parent cannot store."""
    if child.sectors <= parent_sectors:
        return
    past_end = child.extents(parent_sectors, child.sectors - parent_sectors)
    first = next((first for first, _, where in past_end if where is not None), None)
    if first is not None:
        raise OutOfRange(
            f"{child.path} holds data at sector {first} past the end of its parent "
            f"{parent_path} ({parent_sectors} sectors): resize the parent first",
            errno.ERANGE)


def _child_blocks(child: VhdImage, progress: Progress | None
                  ) -> Iterator[tuple[int, bytearray | None, int]]:
    """Each block the child holds, in block order, as (block, bitmap or None when every
    sector is held, byte offset of the block's data), reporting progress on the way."""
    entries = len(child.bat)
    last_block = -(-child.sectors // child.spb)
    for blk in child.allocated_block_numbers():
        if blk >= last_block:
            break
        if progress:
            progress(blk, entries)
        data_offset = (child.bat[blk] + child.bitmap_secs) * s.SECTOR_SIZE
        bitmap = None if child.block_full(blk) else child.bitmap(blk)
        if bitmap is not None and bm.all_set(bitmap, child.spb):
            bitmap = None
        yield blk, bitmap, data_offset
    if progress:
        progress(entries, entries)


def _held_spans(child: VhdImage, blk: int, bitmap: bytearray | None) -> list[tuple[int, int]]:
    """(first sector in the block, count) of each run the child holds in block ``blk``."""
    nsecs = min(child.spb, child.sectors - blk * child.spb)
    if bitmap is None:
        return [(0, nsecs)]
    return [(first, n) for first, n, is_set in bm.runs(bm.bit_string(bitmap, nsecs), 0, nsecs)
            if is_set]


def _onto_vhd(child: VhdImage, parent: VhdImage, sparse: bool,
              progress: Progress | None) -> CoalesceResult:
    sectors = blocks = skipped = 0
    # Sparse mode may only skip a block where the parent reads zeros without it.
    can_skip = sparse and not parent.is_differencing and not parent.is_fixed
    scratch = bytearray(child.block_size) if can_skip else None
    for blk, bitmap, data_offset in _child_blocks(child, progress):
        if scratch is not None and parent.bat[blk] == s.BAT_ENTRY_UNUSED:
            spans = _held_spans(child, blk, bitmap)
            if _all_zero(child.fd, data_offset, spans, scratch):
                held = sum(n for _, n in spans)
                sectors += held
                skipped += held
                continue
        sectors += parent.merge_block(blk, bitmap, child.fd, data_offset)
        blocks += 1
    return CoalesceResult(child.path, parent.path, False, sectors, blocks, skipped)


def _all_zero(fd: int, data_offset: int, spans: list[tuple[int, int]],
              scratch: bytearray) -> bool:
    """Whether the given runs of sectors of a block are all zero."""
    preadv_into(fd, memoryview(scratch), data_offset)
    for first, n in spans:
        start, end = first * s.SECTOR_SIZE, (first + n) * s.SECTOR_SIZE
        if scratch.count(0, start, end) != end - start:
            return False
    return True


def _onto_raw(child: VhdImage, parent_path: str,
              progress: Progress | None) -> CoalesceResult:
    try:
        fd = os.open(parent_path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise FormatError(f"failed to open parent {parent_path}: {os.strerror(exc.errno)}",
                          exc.errno) from None
    try:
        # A raw parent is as long as its file or device; a child may be up to a sector
        # longer (its size is rounded up to whole sectors). A regular file grows to take
        # a last partial sector, as the reference's plain write() does.
        limit = -(-file_size_of(fd) // s.SECTOR_SIZE)
        _check_fits(child, limit, parent_path)
        sectors = blocks = 0
        for blk, bitmap, data_offset in _child_blocks(child, progress):
            first_sector = blk * child.spb
            for first, n in _held_spans(child, blk, bitmap):
                copy_range(child.fd, data_offset + first * s.SECTOR_SIZE, fd,
                           (first_sector + first) * s.SECTOR_SIZE, n * s.SECTOR_SIZE)
                sectors += n
            blocks += 1
        os.fsync(fd)
        return CoalesceResult(child.path, parent_path, True, sectors, blocks, 0)
    finally:
        os.close(fd)
