"""Growing the virtual size of a VHD: fast, or journaled.

Fast resize changes only the footers (current size and geometry) and, when it depends on
the size, the batmap checksum. It stays within the BAT the image already has, which
``vhd-util create -S`` can preallocate: at most ``max_bat_size`` blocks (``query -S``).

Journaled resize may grow the BAT and batmap past their space. The metadata after the BAT
(batmap, parent locators) shifts, and the first data blocks move to the end of the file to
make room. Every byte range of the old file it overwrites is first recorded in an undo
journal (:mod:`blktap.image.vhd.journal`), made durable, and only then is the image
changed, in this order:

1. both footers are *poisoned* (cookie ``v_poison``): the image is disabled, readers and
   writers refuse it, and it stays so until the end;
2. blocks in the way are copied to the end of the data; the space they leave beyond the
   new metadata is zeroed;
3. the new metadata (header, BAT, batmap, locators) is written in one piece;
4. the file is cut to its new length, a poisoned footer written at its new end, and
   synced;
5. the commit: the footer copy at 0, then the footer at the new end, both valid again,
   then a sync; the journal is deleted last.

Killed anywhere before the last write of step 5, the image is disabled (a reader finds a
poisoned footer wherever it looks, see :meth:`VhdImage.open`) and ``revert`` with the
journal gives back the old image byte for byte; after it, the image is valid at its new
size (a leftover journal would still undo the resize).

Shrinking is refused, as the reference does for dynamic disks (``dynamic shrink not fully
implemented``, ENOSYS): it would discard data.
"""

from __future__ import annotations

import array
import errno
import os
import stat
import sys
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, field, replace

from blktap.errors import BlktapError, FormatError, UnsupportedImage, UsageError
from blktap.image.fileio import (
    copy_range,
    file_size_of,
    pread_exact,
    preadv_into,
    pwrite_all,
    write_zeros,
)
from blktap.image.vhd import journal as jn
from blktap.image.vhd import locators
from blktap.image.vhd import structs as s
from blktap.image.vhd.create import round_size  # sizes are whole 2 MiB blocks, as created
from blktap.image.vhd.image import VhdImage

MB = 1 << 20

Range = tuple[int, int]  # (byte offset, length)


@dataclass
class ResizeTarget:
    """What a resize needs to know of an image, read (and validated) once."""

    path: str
    is_block: bool
    file_size: int
    footer: s.Footer
    header: s.Header | None = None
    bat: list[int] = field(default_factory=list)
    batmap_header: s.BatmapHeader | None = None
    batmap: bytes | None = None
    batmap_valid: bool = False
    spb: int = 0
    bitmap_secs: int = 0

    @property
    def is_dynamic(self) -> bool:
        return self.footer.is_dynamic

    @property
    def creator_is_tap(self) -> bool:
        """Made by blktap (the reference resizes nothing else)."""
        return self.footer.crtr_app[:3] == b"tap"

    @property
    def size(self) -> int:
        return self.footer.curr_size

    @property
    def max_fast_size(self) -> int:
        """The largest size a fast resize can reach (what ``query -S`` reports, in
        bytes)."""
        if self.header is None:
            return self.size
        return self.header.max_bat_size * self.header.block_size

    @property
    def block_bytes(self) -> int:
        """A data block with its bitmap."""
        return (self.bitmap_secs + self.spb) * s.SECTOR_SIZE


def load_target(path: str) -> ResizeTarget:
    """Open and validate ``path`` for a resize. Refuses an image disabled by an
    interrupted journaled operation (revert it first) and one whose primary footer is
    missing (repair it first)."""
    with _reader(path) as fd:
        size = file_size_of(fd)
        # A poisoned footer at the end, or at offset 0 unless the end holds a fixed
        # disk's footer (then offset 0 is the guest's data).
        footers = jn.footers_of(fd, size, size - s.FOOTER_SIZE)
    if any(f.cookie == s.POISON_COOKIE for f in footers):
        raise FormatError(f"{path}: disabled by an interrupted resize (revert it with its "
                          f"journal first)")
    image = VhdImage.open(path, footer="primary", validate_bat=True)
    with image:
        if image.footer_source != "primary":
            raise FormatError(f"{path}: the footer at the end of the file is invalid "
                              f"(repair the image first)")
        st = os.fstat(image.fd)
        target = ResizeTarget(path, stat.S_ISBLK(st.st_mode), image.file_size, image.footer)
        if not image.footer.is_dynamic:
            return target
        target.header = image.header
        target.bat = list(image.bat)
        target.spb = image.spb
        target.bitmap_secs = image.bitmap_secs
        if image.has_batmap_format:
            if image.batmap_header is None or image.batmap is None:
                raise FormatError(f"{path}: batmap header is invalid")
            target.batmap_header = image.batmap_header
            target.batmap = bytes(image.batmap)
            target.batmap_valid = image.batmap_valid
    return target


# --------------------------------------------------------------------------------------
# Plans: everything computed, nothing written yet.

@dataclass
class Move:
    block: int
    src: int  # byte offset of the block (bitmap first) now
    dst: int  # where it goes


@dataclass
class ResizePlan:
    target: ResizeTarget
    new_size: int
    new_footer: s.Footer | None = None
    footer_offset: int = 0  # where the footer at the end goes
    new_length: int = 0  # the file's length afterwards (regular files)
    region_start: int = 0  # the new metadata, from the header to the last locator
    region: bytes = b""
    write_span: Range | None = None  # the part of the region that differs from the file
    moves: list[Move] = field(default_factory=list)
    zero_ranges: list[Range] = field(default_factory=list)
    batmap_update: tuple[int, bytes] | None = None  # (offset, header) for a fast resize
    journal_ranges: list[Range] = field(default_factory=list)

    @property
    def noop(self) -> bool:
        return self.new_size == self.target.size


def _check_grow(target: ResizeTarget, new_size: int) -> None:
    if new_size > s.MAX_VHD_SIZE_XENSERVER:
        raise UsageError(f"{target.path}: {new_size >> 20} MB is larger than the largest "
                         f"VHD ({s.MAX_VHD_SIZE_XENSERVER >> 20} MB)")
    if new_size < target.size:
        kind = "dynamic" if target.is_dynamic else "fixed"
        raise UnsupportedImage(f"{target.path}: {kind} shrink not supported: "
                               f"{new_size >> 20} MB is less than the current "
                               f"{target.size >> 20} MB and would discard data",
                               errno.ENOSYS)


def _resized_footer(footer: s.Footer, new_size: int) -> s.Footer:
    cyl, heads, spt = s.geometry(new_size)
    return replace(footer, cookie=s.FOOTER_COOKIE, curr_size=new_size,
                   geometry=s.pack_geometry(cyl, heads, spt)).sealed()


def plan_fast(target: ResizeTarget, size: int) -> ResizePlan:
    """A fast resize to ``size`` bytes (rounded up to 2 MiB): footers only."""
    new_size = round_size(size)
    if not target.is_dynamic:
        raise UsageError(f"{target.path}: a fixed VHD has no BAT to grow into: resize it "
                         f"with a journal")
    if new_size < target.size:
        raise UsageError(f"{target.path}: size ({new_size}) < curr size ({target.size})")
    _check_grow(target, new_size)
    if new_size > target.max_fast_size:
        raise UsageError(f"{target.path}: {new_size >> 20} MB is past what the BAT "
                         f"covers ({target.max_fast_size >> 20} MB, see query -S): resize "
                         f"with a journal")
    plan = ResizePlan(target, new_size)
    if plan.noop:
        return plan
    plan.new_footer = _resized_footer(target.footer, new_size)
    plan.footer_offset = target.file_size - s.FOOTER_SIZE
    bhdr = target.batmap_header
    if bhdr is not None and target.batmap is not None and target.batmap_valid:
        # The checksum covers a length computed from the current size.
        new_sum = s.batmap_checksum(target.batmap, new_size, bhdr.batmap_version)
        if new_sum != bhdr.checksum:
            assert target.header is not None
            off = target.header.bat_end
            plan.batmap_update = (off, replace(bhdr, checksum=new_sum).pack())
    return plan


def apply_fast(plan: ResizePlan) -> None:
    """Write a fast resize: the batmap header if its checksum changes, the footer at the
    end, then its copy at 0 (the reference's order)."""
    if plan.noop:
        return
    assert plan.new_footer is not None
    with _reader(plan.target.path, writable=True) as fd:
        if plan.batmap_update is not None:
            pwrite_all(fd, plan.batmap_update[1], plan.batmap_update[0])
        raw = plan.new_footer.pack()
        pwrite_all(fd, raw, plan.footer_offset)
        pwrite_all(fd, raw, 0)
        os.fsync(fd)


def plan_journaled(target: ResizeTarget, size: int) -> ResizePlan:
    """A journaled resize to ``size`` bytes (rounded up to 2 MiB)."""
    new_size = round_size(size)
    _check_grow(target, new_size)
    plan = ResizePlan(target, new_size)
    if plan.noop:
        return plan
    plan.new_footer = _resized_footer(target.footer, new_size)
    if target.is_dynamic:
        _plan_dynamic(plan)
    else:
        _plan_fixed(plan)
    plan.journal_ranges = _journal_ranges(plan)
    return plan


def _plan_fixed(plan: ResizePlan) -> None:
    t = plan.target
    if t.is_block:
        raise UnsupportedImage(f"{t.path}: resizing a fixed VHD on a block device is not "
                               f"supported")
    plan.footer_offset = plan.new_size
    plan.new_length = plan.new_size + s.FOOTER_SIZE


@dataclass
class _Layout:
    """Where each piece of dynamic-disk metadata lives (byte offsets)."""

    header: int
    bat: int
    bat_bytes: int
    batmap_header: int | None
    batmap: int | None
    batmap_bytes: int
    locators: list[tuple[int, int]]  # (offset, reserved bytes) per locator in use

    def pieces(self) -> list[Range]:
        out = [(self.header, s.HEADER_SIZE), (self.bat, self.bat_bytes)]
        if self.batmap_header is not None and self.batmap is not None:
            out += [(self.batmap_header, s.BATMAP_HEADER_SIZE),
                    (self.batmap, self.batmap_bytes)]
        return out + list(self.locators)

    def end(self) -> int:
        return max(off + n for off, n in self.pieces())


def _layout(footer: s.Footer, header: s.Header, bhdr: s.BatmapHeader | None) -> _Layout:
    bat_bytes = header.bat_bytes
    locs = [(loc.data_offset, locators.reserved_size(loc)) for loc in header.loc
            if loc.code != s.PLAT_CODE_NONE]
    return _Layout(footer.data_offset, header.table_offset, bat_bytes,
                   header.table_offset + bat_bytes if bhdr is not None else None,
                   bhdr.batmap_offset if bhdr is not None else None,
                   bhdr.batmap_size * s.SECTOR_SIZE if bhdr is not None else 0, locs)


def _plan_dynamic(plan: ResizePlan) -> None:
    t = plan.target
    assert t.header is not None
    header, bhdr = t.header, t.batmap_header
    old = _layout(t.footer, header, bhdr)
    if any(n == 0 for _, n in old.locators):
        raise FormatError(f"{t.path}: a parent locator reserves no space")
    new_blocks = -(-plan.new_size // header.block_size)
    # Only ever grow the BAT: a preallocated one (create -S) already covers the new size.
    # (The reference adds the blocks to max_bat_size instead, overshooting the size.)
    max_bat = max(header.max_bat_size, new_blocks)
    grow_bat = s.pad_sector(max_bat * 4) - old.bat_bytes
    grow_map = 0
    new_bhdr = None
    if bhdr is not None:
        need = max(1, s.sectors_round_up(-(-max_bat // 8)))
        grow_map = max(0, need - bhdr.batmap_size) * s.SECTOR_SIZE
    old_bat_end = old.bat + old.bat_bytes
    # What lies after the BAT moves down by what the BAT and batmap grow (the
    # reference's rule), the batmap by the BAT's growth only.
    new_locs = [(off + grow_bat + grow_map if off >= old_bat_end else off, n)
                for off, n in old.locators]
    new_header = replace(header, max_bat_size=max_bat,
                         loc=[replace(loc) for loc in header.loc])
    shifted = iter(new_locs)
    for loc in new_header.loc:
        if loc.code != s.PLAT_CODE_NONE:
            loc.data_offset = next(shifted)[0]
    new_header = new_header.sealed()
    new_map = b""
    if bhdr is not None:
        assert t.batmap is not None
        old_map = t.batmap if t.batmap_valid else bytes(len(t.batmap))
        new_map = old_map + bytes(grow_map)
        assert old.batmap is not None
        new_bhdr = replace(bhdr,
                           batmap_offset=old.batmap + grow_bat
                           if old.batmap >= old_bat_end else old.batmap,
                           batmap_size=bhdr.batmap_size + grow_map // s.SECTOR_SIZE)
        new_bhdr.checksum = s.batmap_checksum(new_map, plan.new_size, bhdr.batmap_version)
    new = _layout(t.footer, new_header, new_bhdr)
    _check_disjoint(t.path, new.pieces())
    meta_end = new.end()
    plan.region_start = min(off for off, _ in new.pieces())
    if plan.region_start < s.FOOTER_SIZE:
        raise FormatError(f"{t.path}: metadata overlaps the footer copy")

    # Blocks that start before the end of the new metadata move to the end of the data,
    # lowest first, each placed so that its data begins on a 4 KiB boundary.
    bat = list(t.bat) + [s.BAT_ENTRY_UNUSED] * (max_bat - len(t.bat))
    used = sorted((sec, blk) for blk, sec in enumerate(bat) if sec != s.BAT_ENTRY_UNUSED)
    block_secs = t.bitmap_secs + t.spb
    data_end = max([sec + block_secs for sec, _ in used], default=0)
    next_sec = max(data_end, s.sectors_round_up(meta_end))
    for sec, blk in used:
        if sec * s.SECTOR_SIZE >= meta_end:
            break
        while (next_sec + t.bitmap_secs) % 8:
            next_sec += 1
        plan.moves.append(Move(blk, sec * s.SECTOR_SIZE, next_sec * s.SECTOR_SIZE))
        bat[blk] = next_sec
        next_sec += block_secs
    end = max(meta_end, next_sec * s.SECTOR_SIZE if plan.moves else 0,
              data_end * s.SECTOR_SIZE)
    plan.zero_ranges = _merge([(max(m.src, meta_end), m.src + t.block_bytes - max(m.src,
                              meta_end)) for m in plan.moves
                               if m.src + t.block_bytes > meta_end])
    if t.is_block:
        plan.footer_offset = t.file_size - s.FOOTER_SIZE
        if end > plan.footer_offset:
            raise FormatError(f"{t.path}: the device is {t.file_size} bytes; the resized "
                              f"image needs {end + s.FOOTER_SIZE}", errno.ENOSPC)
        plan.new_length = t.file_size
    else:
        plan.footer_offset = end
        plan.new_length = end + s.FOOTER_SIZE

    # The new metadata region, with zeros between the pieces.
    region = bytearray(meta_end - plan.region_start)

    def put(off: int, data: bytes) -> None:
        region[off - plan.region_start : off - plan.region_start + len(data)] = data

    put(new.header, new_header.pack())
    packed = array.array("I", bat)
    if sys.byteorder == "little":
        packed.byteswap()
    raw_bat = packed.tobytes()
    put(new.bat, raw_bat.ljust(new.bat_bytes, b"\0"))
    if new_bhdr is not None and new.batmap_header is not None and new.batmap is not None:
        put(new.batmap_header, new_bhdr.pack())
        put(new.batmap, new_map)
    with _reader(t.path) as fd:
        for (old_off, n), (new_off, _) in zip(old.locators, new_locs, strict=True):
            put(new_off, pread_exact(fd, n, old_off))
        # What the file holds there now; past its end, zeros (as the new file reads).
        current = bytearray(len(region))
        preadv_into(fd, memoryview(current), plan.region_start)
    # The old footer's place is poisoned before the region is written: compare with that.
    footer_at = t.file_size - s.FOOTER_SIZE - plan.region_start
    if 0 <= footer_at < len(current):
        current[footer_at : footer_at + s.FOOTER_SIZE] = \
            jn.footer_poisoned(t.footer)[: len(current) - footer_at]
    plan.region = bytes(region)
    plan.write_span = _diff_span(plan.region, current, plan.region_start)


def _check_disjoint(path: str, pieces: list[Range]) -> None:
    ordered = sorted(pieces)
    for (a, n), (b, _) in zip(ordered, ordered[1:], strict=False):
        if a + n > b:
            raise FormatError(f"{path}: unusual metadata layout (pieces at {a} and {b} "
                              f"would overlap once the BAT grows)")


class _reader:  # noqa: N801 - a tiny context manager around an fd
    def __init__(self, path: str, writable: bool = False) -> None:
        self.path = path
        self.flags = os.O_RDWR if writable else os.O_RDONLY
        self.fd = -1

    def __enter__(self) -> int:
        try:
            self.fd = os.open(self.path, self.flags | os.O_CLOEXEC)
        except OSError as exc:
            raise FormatError(f"{self.path}: {os.strerror(exc.errno)}", exc.errno) from None
        return self.fd

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def _diff_span(new: bytes, old: bytes | bytearray, base: int) -> Range | None:
    """The sector-aligned span of ``new`` that differs from ``old`` (as long), or None."""
    if new == old:
        return None
    n = len(new)
    # Skip equal runs a chunk at a time, then a sector at a time (metadata is small,
    # but a preallocated BAT can be megabytes).
    chunk = 64 << 10
    first = 0
    while first + chunk <= n and new[first : first + chunk] == old[first : first + chunk]:
        first += chunk
    while new[first : first + s.SECTOR_SIZE] == old[first : first + s.SECTOR_SIZE]:
        first += s.SECTOR_SIZE
    last = n
    while last - chunk >= first and new[last - chunk : last] == old[last - chunk : last]:
        last -= chunk
    while new[last - s.SECTOR_SIZE : last] == old[last - s.SECTOR_SIZE : last]:
        last -= s.SECTOR_SIZE
    return base + first, last - first


# --------------------------------------------------------------------------------------
# Ranges of the old file that the resize overwrites, and so must be journaled.

def _merge(ranges: Iterable[Range]) -> list[Range]:
    out: list[list[int]] = []
    for off, n in sorted(r for r in ranges if r[1] > 0):
        if out and off <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], off + n - out[-1][0])
        else:
            out.append([off, n])
    return [(a, b) for a, b in out]


def _subtract(ranges: list[Range], holes: list[Range]) -> list[Range]:
    out = []
    for off, n in ranges:
        pieces = [(off, off + n)]
        for h_off, h_n in holes:
            nxt = []
            for a, b in pieces:
                lo, hi = max(a, h_off), min(b, h_off + h_n)
                if lo >= hi:
                    nxt.append((a, b))
                    continue
                if a < lo:
                    nxt.append((a, lo))
                if hi < b:
                    nxt.append((hi, b))
            pieces = nxt
        out += [(a, b - a) for a, b in pieces]
    return _merge(out)


def _metadata_ranges(t: ResizeTarget) -> list[Range]:
    """What the journal's metadata entries already hold."""
    out = [(t.file_size - s.FOOTER_SIZE, s.FOOTER_SIZE)]
    if t.header is not None:
        out.append((0, s.FOOTER_SIZE))
        out += _layout(t.footer, t.header, t.batmap_header).pieces()
    return out


def _journal_ranges(plan: ResizePlan) -> list[Range]:
    """Every range of the old file the plan writes or cuts off, less the metadata the
    journal records anyway: these become data entries."""
    t = plan.target
    block = t.block_bytes
    touched: list[Range] = [(t.file_size - s.FOOTER_SIZE, s.FOOTER_SIZE),
                            (plan.footer_offset, s.FOOTER_SIZE)]
    if t.is_dynamic:
        touched.append((0, s.FOOTER_SIZE))
    if plan.write_span is not None:
        touched.append(plan.write_span)
    touched += plan.zero_ranges
    touched += [(m.dst, block) for m in plan.moves]
    if not t.is_block:
        # A fixed disk's space past its old data (the old footer with it) is zeroed; a
        # dynamic one is cut to its new length at the end.
        cut = t.size if not t.is_dynamic else plan.new_length
        touched.append((cut, max(0, t.file_size - cut)))
    inside = [(off, min(off + n, t.file_size) - off) for off, n in _merge(touched)
              if off < t.file_size]
    return _subtract(_merge(inside), _merge(_metadata_ranges(t)))


def _journal_metadata(fd: int, t: ResizeTarget) -> list[jn.Entry]:
    """The metadata entries, in the reference's order, holding the bytes as they are."""
    footer_off = t.file_size - s.FOOTER_SIZE
    out = [jn.Entry(jn.ENTRY_FOOTER_P, footer_off, pread_exact(fd, s.FOOTER_SIZE, footer_off))]
    if t.header is None:
        return out
    lay = _layout(t.footer, t.header, t.batmap_header)
    out.append(jn.Entry(jn.ENTRY_FOOTER_C, 0, pread_exact(fd, s.FOOTER_SIZE, 0)))
    out.append(jn.Entry(jn.ENTRY_HEADER, lay.header, pread_exact(fd, s.HEADER_SIZE, lay.header)))
    for off, n in lay.locators:
        out.append(jn.Entry(jn.ENTRY_LOCATOR, off, pread_exact(fd, n, off)))
    out.append(jn.Entry(jn.ENTRY_BAT, lay.bat, pread_exact(fd, lay.bat_bytes, lay.bat)))
    if lay.batmap_header is not None and lay.batmap is not None:
        out.append(jn.Entry(jn.ENTRY_BATMAP_H, lay.batmap_header,
                            pread_exact(fd, s.BATMAP_HEADER_SIZE, lay.batmap_header)))
        out.append(jn.Entry(jn.ENTRY_BATMAP_M, lay.batmap,
                            pread_exact(fd, lay.batmap_bytes, lay.batmap)))
    return out


# --------------------------------------------------------------------------------------
# Doing it.

def write_resize_journal(plan: ResizePlan, journal_path: str) -> None:
    """Record what the plan will overwrite in a new journal, durably."""
    t = plan.target
    # Opened for writing already: an image we may not change gets no journal.
    with _reader(t.path, writable=True) as fd:
        if file_size_of(fd) != t.file_size:
            raise FormatError(f"{t.path}: changed since it was inspected", errno.EAGAIN)
        jn.write_journal(journal_path, t.footer.uuid, t.file_size - s.FOOTER_SIZE,
                         _journal_metadata(fd, t), jn.data_entries(fd, plan.journal_ranges))


def apply_journaled(plan: ResizePlan) -> None:
    """Change the image as planned. Its journal must already be on disk: if this fails
    or is interrupted, :func:`blktap.image.vhd.journal.revert` undoes it."""
    if plan.noop:
        return
    t = plan.target
    assert plan.new_footer is not None
    with _reader(t.path, writable=True) as fd:
        # 1. Disable the image.
        poisoned = jn.footer_poisoned(t.footer)
        pwrite_all(fd, poisoned, t.file_size - s.FOOTER_SIZE)
        if t.is_dynamic:
            pwrite_all(fd, poisoned, 0)
        os.fsync(fd)
        if t.is_dynamic:
            _move_and_rewrite(fd, plan)
        else:
            _extend_fixed(fd, plan)
        os.fsync(fd)
        # 5. Commit: valid footers at the new size, the copy first; the image comes back
        #    to life with the second write, the footer at the end.
        raw = plan.new_footer.pack()
        if t.is_dynamic:
            pwrite_all(fd, raw, 0)
        pwrite_all(fd, raw, plan.footer_offset)
        os.fsync(fd)


def _move_and_rewrite(fd: int, plan: ResizePlan) -> None:
    t = plan.target
    # 2. Blocks in the way go to the end (kernel-side copies), their old place is zeroed
    #    where the new metadata does not cover it.
    for move in plan.moves:
        copy_range(fd, move.src, fd, move.dst, t.block_bytes)
    for off, n in plan.zero_ranges:
        write_zeros(fd, off, n)
    # 3. The new metadata in one write.
    if plan.write_span is not None:
        off, n = plan.write_span
        start = off - plan.region_start
        pwrite_all(fd, memoryview(plan.region)[start : start + n], off)
    # 4. The new length, ending in a poisoned footer: until the commit writes the footer
    #    there, the image stays disabled whichever footer copy a reader looks at.
    if not t.is_block and file_size_of(fd) > plan.new_length:
        os.ftruncate(fd, plan.new_length)
    assert plan.new_footer is not None
    pwrite_all(fd, jn.footer_poisoned(plan.new_footer), plan.footer_offset)


def _extend_fixed(fd: int, plan: ResizePlan) -> None:
    """A fixed disk grows in place. A poisoned footer is always somewhere a revert looks
    for it (the journal's check of the image's identity needs one): at the old end until
    a poisoned copy is at the new end, after which the old one is zeroed, as the new
    space must read as zeros."""
    t = plan.target
    old_size, length = t.size, t.file_size
    assert plan.new_footer is not None
    if plan.new_length > length:
        try:
            os.posix_fallocate(fd, length, plan.new_length - length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(fd, plan.new_length)
    pwrite_all(fd, jn.footer_poisoned(plan.new_footer), plan.footer_offset)
    write_zeros(fd, old_size, min(length, plan.new_size) - old_size)
    if length > plan.new_length:
        os.ftruncate(fd, plan.new_length)


def resize(path: str, size: int, *, journal: str | None = None) -> int:
    """Grow ``path`` to ``size`` bytes (rounded up to 2 MiB); returns the new size.

    Without ``journal`` it is a fast resize (within the preallocated BAT). With one, the
    resize is journaled there; if it fails, the image is reverted and the journal
    deleted, and the error is raised.
    """
    target = load_target(path)
    if not target.creator_is_tap:
        raise UnsupportedImage(f"{path} not created by xen; resize not supported",
                               errno.EINVAL)
    if journal is None:
        plan = plan_fast(target, size)
        apply_fast(plan)
        return plan.new_size
    plan = plan_journaled(target, size)
    if plan.noop:
        return plan.new_size
    write_resize_journal(plan, journal)
    try:
        apply_journaled(plan)
    except (OSError, BlktapError) as exc:
        code = getattr(exc, "errno", None) or errno.EIO
        try:
            jn.revert(path, journal)
        except (OSError, BlktapError) as rexc:
            raise FormatError(f"{path}: resize failed ({exc}) and so did undoing it "
                              f"({rexc}); the journal {journal} is kept", code) from None
        raise FormatError(f"{path}: resize failed, image restored: {exc}", code) from None
    except BaseException:
        # Interrupted (Ctrl-C, or a SIGTERM/SIGHUP the CLI turns into an exception):
        # undo, so that neither a disabled image nor the journal is left behind. If
        # undoing fails too, the journal stays for ``revert``.
        with suppress(OSError, BlktapError):
            jn.revert(path, journal)
        raise
    jn.remove_journal(journal)
    return plan.new_size


__all__ = ["MB", "Move", "ResizePlan", "ResizeTarget", "apply_fast", "apply_journaled",
           "load_target", "plan_fast", "plan_journaled", "resize", "round_size",
           "write_resize_journal"]
