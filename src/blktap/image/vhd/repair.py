"""Rewriting a VHD's footers (``vhd-util repair``).

A writer killed mid-allocation can leave a file that does not end in a valid footer: the
reference's tapdisk appends blocks over the footer and only writes it back on close, and
a file system may keep a grown file whose tail was never written. Readers then fall back
to the copy at offset 0, but a plain ``check`` fails. Repair takes the footer (the
primary one, falling back to the copy at 0; or with ``use_backup`` the copy at 0 only),
gives it a fresh uuid if it has none, and writes it back at offset 0 and at the end of the
data, cutting anything after it.

That is all the reference does, whatever the rest of the image holds, and on a corrupt
image it does harm: a BAT read from the wrong place puts "the end of the data" terabytes
away, BAT entries that clobber each other put it before blocks in use and the file is cut
through them, and a file cut short is padded with zeros that hide the lost blocks. So we
plan first and write only what we can prove:

- the repaired image must pass ``check`` (the checker runs on the file as the plan would
  leave it, :func:`blktap.image.vhd.check.check_planned`, before anything is written);
- the file never grows except for the tail of the last block, when what is missing of it
  holds no data the block claims (its bitmap in the file, no bit set past the end: what a
  writer that appends a block in pieces leaves when killed), plus the footer;
- the file is cut only after the last block in use and the metadata (bytes no BAT entry
  references: what a killed writer leaked);
- a batmap that fails its checksum is replaced by an empty one (it is a hint that blocks
  are full; an empty one is always true), written before the footers.

Anything else is refused, with the reason, before the first write. After writing, the
image is checked again; should that fail (another process changed it meanwhile), the bytes
repair wrote are put back and the failure is reported.
"""

from __future__ import annotations

import errno
import os
import uuid as _uuid
from dataclasses import dataclass, replace

from blktap.errors import FormatError
from blktap.image.fileio import is_regular, pwrite_all
from blktap.image.vhd import bitmap as bm
from blktap.image.vhd import check as vhd_check
from blktap.image.vhd import locators
from blktap.image.vhd import structs as s
from blktap.image.vhd import validate as v
from blktap.image.vhd.image import VhdImage


@dataclass(frozen=True)
class RepairResult:
    footer_source: str  # where the footer was read: "primary", "short" or "backup"
    new_uuid: bool  # the footer had a null uuid and got a fresh one
    end: int  # offset of the footer at the end of the file
    trimmed: int  # bytes cut from the end of the file
    grown: int = 0  # bytes added at the end of the file (a block's missing tail)


@dataclass(frozen=True)
class _Plan:
    footer: s.Footer  # sealed
    end: int  # where the footer at the end goes
    size: int  # the file's size afterwards
    batmap: tuple[tuple[int, bytes], ...] = ()  # a rebuilt batmap: (offset, bytes) writes


def repair(path: str, *, use_backup: bool = False) -> RepairResult:
    """Rewrite both footers of ``path`` from the one that is still good.

    Raises :class:`FormatError` (EINVAL), having written nothing, when the result would
    not pass ``check`` or repairing would lose or invent data. Order of the writes: a
    rebuilt batmap, the copy at 0 (from then on readers and ``check -i`` accept the
    image), then the footer at the end of the data, then the file is cut after it. Every
    step leaves an image at least as readable as before, with the same content. An image
    disabled by an interrupted resize (a ``v_poison`` cookie in either copy) is refused:
    its journal must be reverted first, and a repaired footer would hide that.
    """
    image = VhdImage.open(path, writable=True, footer="backup" if use_backup else "auto",
                          allow_disabled=True, validate_bat=False)
    with image:
        _refuse_disabled(image)
        plan = _plan(image)
        return _carry_out(image, plan)


def _plan(image: VhdImage) -> _Plan:
    footer = image.footer
    if footer.uuid == b"\0" * 16:
        footer = replace(footer, uuid=_uuid.uuid4().bytes)
    footer = footer.sealed()
    if image.on_device:
        # A block device keeps its size: its footer lives in its last sector.
        end = image.file_size - s.FOOTER_SIZE
    else:
        end = image.end_of_data()
    if footer.is_dynamic and footer.data_offset < s.FOOTER_SIZE:
        # The copy at 0 would be written over the header the plan's image was read with.
        raise FormatError(f"{image.path}: cannot repair: the header (footer data offset "
                          f"{footer.data_offset}) overlaps the footer copy at 0; nothing "
                          f"written")
    plan = _Plan(footer, end, end + s.FOOTER_SIZE, _rebuilt_batmap(image, footer))
    verdict = vhd_check.check_planned(
        vhd_check.Planned(image, footer.pack(), plan.size, plan.batmap))
    if not verdict.ok:
        reason = verdict.messages[0] if verdict.messages else os.strerror(verdict.errno)
        raise FormatError(f"{image.path}: cannot repair: check would still fail "
                          f"({reason}); nothing written", verdict.errno or errno.EINVAL)
    if not image.on_device and footer.is_dynamic:
        problem = _growth_problem(image, _data_end(image))
        if problem:
            raise FormatError(f"{image.path}: cannot repair: {problem}; nothing written")
    return plan


def _rebuilt_batmap(image: VhdImage, footer: s.Footer) -> tuple[tuple[int, bytes], ...]:
    """The writes that replace a batmap failing its checksum with an empty one, or ().

    The batmap only says which blocks are full, so that readers may skip their bitmaps;
    an empty one is always true and the disk reads the same (readers ignore a batmap
    whose checksum fails anyway). The reference's ``set -f marker`` leaves such a batmap.
    The header keeps its marker and key hash. ``image`` is updated to what the plan
    leaves, for the planned check (``check`` judges the batmap ``image`` holds)."""
    bhdr = image.batmap_header
    if bhdr is None or image.batmap is None or image.batmap_valid:
        return ()
    if not _batmap_apart(image):
        return ()  # the planned check refuses it: never write a map over other things
    empty = bytearray(len(image.batmap))
    new = replace(bhdr, checksum=s.batmap_checksum(empty, footer.curr_size,
                                                   bhdr.batmap_version))
    image.batmap_header, image.batmap, image.batmap_valid = new, empty, True
    hdr_off = image.batmap_header_offset()
    if bhdr.batmap_offset == hdr_off + s.BATMAP_HEADER_SIZE:
        return ((hdr_off, new.pack() + bytes(empty)),)  # one write: never torn apart
    return ((bhdr.batmap_offset, bytes(empty)), (hdr_off, new.pack()))


def _batmap_apart(image: VhdImage) -> bool:
    """Whether the batmap's map lies after its header and apart from every other
    structure and block (a damaged offset could point it at the BAT or at data)."""
    bhdr, header = image.batmap_header, image.header
    assert bhdr is not None and header is not None
    start = bhdr.batmap_offset
    end = start + bhdr.batmap_size * s.SECTOR_SIZE
    if start < image.batmap_header_offset() + s.BATMAP_HEADER_SIZE:
        return False  # before its header: over the footer copy, the header or the BAT
    taken = [(image.footer.data_offset, image.footer.data_offset + s.HEADER_SIZE)]
    taken += [(loc.data_offset, loc.data_offset + locators.reserved_size(loc))
              for loc in header.loc if loc.code != s.PLAT_CODE_NONE]
    block_bytes = (image.bitmap_secs + image.spb) * s.SECTOR_SIZE
    taken += [(image.bat[blk] * s.SECTOR_SIZE, image.bat[blk] * s.SECTOR_SIZE + block_bytes)
              for blk in image.allocated_block_numbers()]
    return all(hi <= start or lo >= end for lo, hi in taken)


def _data_end(image: VhdImage) -> int:
    """Where the data may end in the file as it is: before its footer when it ends in a
    valid one, else at its very end (a writer appended a block over the footer)."""
    size = image.file_size
    for length in (s.FOOTER_SIZE, s.FOOTER_SIZE - 1):
        if size < length:
            continue
        raw = os.pread(image.fd, length, size - length).ljust(s.FOOTER_SIZE, b"\0")
        if v.footer_problem(s.Footer.unpack(raw), raw, strict=False,
                            allow_poison=True) is None:
            return size - length
    return size


def _growth_problem(image: VhdImage, data_end: int) -> str | None:
    """Why the blocks that lie past ``data_end`` cannot be kept by growing the file, or
    None. Only one block may, the last one, when its bitmap is in the file and claims no
    sector past the end: a writer that appends a block in pieces (the reference's sparse
    mode writes the data, then the bitmap, then the BAT entry, and the footer only on
    close) leaves that when killed, and growing the file loses nothing. A block whose
    bitmap is missing, or whose written sectors are, has lost data: growing the file would
    make those sectors read as zeros (or as the parent's) and ``check`` pass on a disk
    that lost them."""
    if image.end_of_metadata() > data_end:
        return (f"the metadata ends at byte {image.end_of_metadata()}, past the end of the "
                f"data in the file ({data_end}): the file was cut short")
    block_bytes = (image.bitmap_secs + image.spb) * s.SECTOR_SIZE
    past = sorted((image.bat[blk] * s.SECTOR_SIZE, blk)
                  for blk in image.allocated_block_numbers()
                  if image.bat[blk] * s.SECTOR_SIZE + block_bytes > data_end)
    if not past:
        return None
    if len(past) > 1:
        names = ", ".join(str(blk) for _, blk in past[:8])
        more = ", ..." if len(past) > 8 else ""
        return (f"BAT entries of {len(past)} blocks ({names}{more}) point past the end of "
                f"the data in the file ({data_end} bytes): the file was cut short or the "
                f"BAT is corrupt, and their data is lost")
    start, blk = past[0]
    if start + image.bitmap_bytes > data_end:
        return (f"the BAT entry of block {blk} (offset {start:#x}) points past the end of "
                f"the data in the file ({data_end} bytes): the block's bitmap is not "
                f"in the file")
    present = (data_end - start - image.bitmap_bytes) // s.SECTOR_SIZE
    full = (image.batmap is not None and image.batmap_valid
            and bm.test_bit(image.batmap, blk))
    bits = image.bitmap(blk)
    if full or any(bm.test_bit(bits, i) for i in range(present, image.spb)):
        return (f"block {blk} (offset {start:#x}) holds written sectors past the end of "
                f"the file ({data_end} bytes): the file was cut short and they are lost")
    return None


def _carry_out(image: VhdImage, plan: _Plan) -> RepairResult:
    fd = image.fd
    size = image.file_size
    raw = plan.footer.pack()
    saved = _Saved(fd, size, plan.end, plan.batmap)
    trimmed = max(0, size - plan.size) if not image.on_device else 0
    grown = max(0, plan.size - size) if not image.on_device else 0
    try:
        for offset, data in plan.batmap:
            pwrite_all(fd, data, offset)
        if plan.footer.is_dynamic:
            pwrite_all(fd, raw, 0)
        pwrite_all(fd, raw, plan.end)
        if trimmed:
            os.fsync(fd)  # the new end footer is durable before the file is cut to it
            os.ftruncate(fd, plan.size)
        os.fsync(fd)
        after = vhd_check.check_image(image.path)
        if not after.ok:
            reason = after.messages[0] if after.messages else os.strerror(after.errno)
            saved.restore()
            raise FormatError(f"{image.path}: repair undone: check fails on the repaired "
                              f"image ({reason}); was it changed meanwhile?",
                              after.errno or errno.EIO)
    except OSError as exc:
        raise FormatError(f"{image.path}: {os.strerror(exc.errno or errno.EIO)}",
                          exc.errno or errno.EIO) from None
    return RepairResult(image.footer_source, plan.footer.uuid != image.footer.uuid,
                        plan.end, trimmed, grown)


class _Saved:
    """The bytes repair overwrites, to put back if the repaired image fails its check.
    Bytes it cuts are not kept: no metadata and no block in use lies there, so the
    restored image is the same to every reader (the cut range reads zeros)."""

    def __init__(self, fd: int, size: int, end: int,
                 writes: tuple[tuple[int, bytes], ...]) -> None:
        self.fd = fd
        self.writes = [(off, os.pread(fd, len(data), off)) for off, data in writes]
        self.size = size
        self.regular = is_regular(fd)
        self.head = os.pread(fd, s.FOOTER_SIZE, 0)
        self.tail_at = max(0, size - s.FOOTER_SIZE)
        self.tail = os.pread(fd, s.FOOTER_SIZE, self.tail_at)
        self.end = end
        self.at_end = os.pread(fd, s.FOOTER_SIZE, end)

    def restore(self) -> None:
        if self.regular:
            os.ftruncate(self.fd, self.size)
        pwrite_all(self.fd, self.at_end, self.end)
        pwrite_all(self.fd, self.tail, self.tail_at)
        pwrite_all(self.fd, self.head, 0)
        for offset, data in reversed(self.writes):
            pwrite_all(self.fd, data, offset)
        os.fsync(self.fd)


def _refuse_disabled(image: VhdImage) -> None:
    candidates = [image.file_size - s.FOOTER_SIZE]
    if image.footer.is_dynamic:
        candidates.append(0)
    for offset in candidates:
        if os.pread(image.fd, 8, offset) == s.POISON_COOKIE:
            raise FormatError(f"{image.path} is disabled by an interrupted resize (revert "
                              f"its journal first)", errno.EINVAL)
