"""Reading and writing one VHD file (fixed, dynamic or differencing).

A :class:`VhdImage` is one layer: it knows which of its sectors it holds and where they are
in the file. Resolving a chain of layers is :mod:`blktap.image.chain`'s job.

Write ordering (see docs/formats/vhd.md for the why). When a write lands in a block that is
not allocated yet, the system calls are issued in this order:

1. a footer at the new end of the file (so the file always ends in a valid footer);
2. the data sectors of the write, into the new block;
3. zeros over the alignment gap (and the old footer), and the block bitmap;
4. the BAT sector that holds the block's entry.

A process killed between any two steps leaves a valid image that does not reference the
half-written block. The batmap only ever gains bits, and is written (header and map in one
system call) on flush and close.
"""

from __future__ import annotations

import array
import bisect
import errno
import os
import sys
import uuid as _uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import replace

from blktap.errors import FormatError, OutOfRange, ParentNotFound, ReadOnlyImage
from blktap.image.fileio import (
    ZEROS,
    copy_range,
    file_size_of,
    is_regular,
    pread_exact,
    pwrite_all,
    pwritev_all,
    write_zeros,
)
from blktap.image.vhd import bitmap as bm
from blktap.image.vhd import locators
from blktap.image.vhd import structs as s
from blktap.image.vhd import validate as v

# Bitmaps cached per image: 8192 blocks of 2 MiB cover 16 GiB of data for 4.5 MiB of memory.
BITMAP_CACHE_BLOCKS = 8192
# A locator payload longer than this is not a path.
MAX_LOCATOR_BYTES = 64 * 1024


class VhdImage:
    """One open VHD file."""

    def __init__(self, path: str, fd: int, writable: bool, file_size: int,
                 footer: s.Footer, footer_source: str) -> None:
        self.path = path
        self.fd = fd
        self.writable = writable
        self.file_size = file_size
        # A block device (a logical volume): its size is fixed, its footer in its last sector.
        self.on_device = not is_regular(fd)
        self.footer = footer
        # Where the footer came from: "primary", "short" (511-byte) or "backup".
        self.footer_source = footer_source
        self.header: s.Header | None = None
        self.bat: array.array = array.array("I")
        self.batmap_header: s.BatmapHeader | None = None
        self.batmap: bytearray | None = None
        self.batmap_valid = False
        self._bitmaps: OrderedDict[int, bytearray] = OrderedDict()
        self._bitstrings: dict[int, str] = {}
        self._next_db = 0  # sector where the next data block may start
        # Indices of allocated blocks, sorted: finds the end of a run of holes in O(log n).
        self._allocated: list[int] = []
        self._dirty_batmap = False
        self._dirty = False
        self._closed = False

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str, *, writable: bool = False, footer: str = "auto",
             allow_disabled: bool = False, validate_bat: bool = True) -> VhdImage:
        """Open and validate a VHD.

        ``footer`` picks the footer copy: "primary" (the end of the file, or the 511-byte
        short footer some old tools wrote), "backup" (the copy at offset 0), or "auto"
        (primary, falling back to the backup: a crashed writer leaves that state).
        """
        flags = os.O_RDWR if writable else os.O_RDONLY
        try:
            fd = os.open(path, flags | os.O_CLOEXEC)
        except OSError as exc:
            raise FormatError(f"{path}: {os.strerror(exc.errno)}", exc.errno) from None
        try:
            image = cls._load(path, fd, writable, footer, allow_disabled, validate_bat)
        except OSError as exc:
            os.close(fd)
            raise FormatError(f"{path}: {os.strerror(exc.errno or errno.EIO)}",
                              exc.errno or errno.EIO) from None
        except BaseException:
            os.close(fd)
            raise
        return image

    @classmethod
    def _load(cls, path: str, fd: int, writable: bool, which: str, allow_disabled: bool,
              validate_bat: bool) -> VhdImage:
        size = file_size_of(fd)
        if size < s.FOOTER_SIZE:
            raise FormatError(f"{path}: file too small to be a VHD ({size} bytes)")
        foot, source = cls._read_footer(path, fd, size, which, allow_disabled)
        image = cls(path, fd, writable, size, foot, source)
        if foot.is_dynamic:
            image._load_dynamic(validate_bat)
        else:
            if foot.curr_size + s.FOOTER_SIZE > size:
                raise FormatError(f"{path}: fixed VHD is shorter than its size "
                                  f"({size} bytes for {foot.curr_size})")
        return image

    @staticmethod
    def _read_footer(path: str, fd: int, size: int, which: str,
                     allow_disabled: bool) -> tuple[s.Footer, str]:
        candidates: list[tuple[str, int, int]] = []
        if which in ("auto", "primary"):
            candidates.append(("primary", size - s.FOOTER_SIZE, s.FOOTER_SIZE))
            candidates.append(("short", size - s.FOOTER_SIZE + 1, s.FOOTER_SIZE - 1))
        if which in ("auto", "backup"):
            candidates.append(("backup", 0, s.FOOTER_SIZE))
        first_problem = None
        for source, offset, length in candidates:
            raw = pread_exact(fd, length, offset).ljust(s.FOOTER_SIZE, b"\0")
            foot = s.Footer.unpack(raw)
            problem = v.footer_problem(foot, raw, strict=False, allow_poison=allow_disabled)
            if problem is None and source == "backup" and not foot.is_dynamic:
                problem = "backup footer of a fixed disk"
            if problem is None:
                return foot, source
            if foot.cookie == s.POISON_COOKIE and not allow_disabled and \
                    v.footer_problem(foot, raw, strict=False, allow_poison=True) is None:
                # A journaled resize disabled the image: no other copy may stand in for
                # this one (the reference reads a poisoned footer and refuses the image).
                raise FormatError(f"{path}: disabled by an interrupted resize (revert it "
                                  f"with its journal first)")
            if first_problem is None:
                first_problem = (source, problem)
        assert first_problem is not None
        src, problem = first_problem
        label = "backup footer" if src == "backup" else "footer"
        raise FormatError(f"{path}: not a valid VHD ({label}: {problem})")

    def _load_dynamic(self, validate_bat: bool) -> None:
        foot = self.footer
        if foot.data_offset + s.HEADER_SIZE > self.file_size:
            raise FormatError(f"{self.path}: header offset {foot.data_offset} past end of file")
        raw = pread_exact(self.fd, s.HEADER_SIZE, foot.data_offset)
        header = s.Header.unpack(raw)
        problem = v.header_problem(header, raw, strict=False)
        if problem:
            raise FormatError(f"{self.path}: header is invalid: {problem}")
        self.header = header
        bs = header.block_size
        if header.max_bat_size * bs < foot.curr_size:
            raise FormatError(f"{self.path}: header is invalid: BAT of {header.max_bat_size} "
                              f"entries cannot map {foot.curr_size} bytes")
        bat_bytes = header.bat_bytes
        if header.table_offset + bat_bytes > self.file_size or header.table_offset < 0:
            raise FormatError(f"{self.path}: BAT ({bat_bytes} bytes at {header.table_offset}) "
                              f"runs past end of file")
        raw_bat = pread_exact(self.fd, header.max_bat_size * 4, header.table_offset)
        bat = array.array("I")
        bat.frombytes(raw_bat)
        if sys.byteorder == "little":
            bat.byteswap()
        self.bat = bat
        self._load_batmap()
        self._check_locators()
        self._allocated = [i for i, e in enumerate(bat) if e != s.BAT_ENTRY_UNUSED]
        if validate_bat:
            self._check_bat()
        last = max((bat[i] for i in self._allocated), default=None)
        self._next_db = self.end_of_metadata() // s.SECTOR_SIZE
        if last is not None:
            self._next_db = max(self._next_db, last + self.bitmap_secs + self.spb)

    @property
    def has_batmap_format(self) -> bool:
        """Whether blktap would keep a batmap in this image (creator 'tap' 1.2 or later)."""
        f = self.footer
        return (f.is_dynamic and f.crtr_app == s.CREATOR_APP
                and f.crtr_ver >= 0x00010002)

    def batmap_header_offset(self) -> int:
        assert self.header is not None
        return self.header.bat_end

    def _load_batmap(self) -> None:
        if not self.has_batmap_format:
            return
        off = self.batmap_header_offset()
        if off + s.BATMAP_HEADER_SIZE > self.file_size:
            raise FormatError(f"{self.path}: batmap header past end of file")
        hdr = s.BatmapHeader.unpack(pread_exact(self.fd, s.BATMAP_HEADER_SIZE, off))
        if hdr.cookie != s.BATMAP_COOKIE:
            # Valid for blktap's own older writers; without a batmap every read uses bitmaps.
            return
        assert self.header is not None
        need = -(-self.header.max_bat_size // 8)
        if hdr.batmap_size * s.SECTOR_SIZE < need or hdr.batmap_size > (1 << 20):
            raise FormatError(f"{self.path}: batmap of {hdr.batmap_size} sectors cannot map "
                              f"{self.header.max_bat_size} blocks")
        if hdr.batmap_offset + hdr.batmap_size * s.SECTOR_SIZE > self.file_size:
            raise FormatError(f"{self.path}: batmap past end of file")
        data = bytearray(pread_exact(self.fd, hdr.batmap_size * s.SECTOR_SIZE,
                                      hdr.batmap_offset))
        self.batmap_header = hdr
        self.batmap = data
        self.batmap_valid = (
            s.batmap_checksum(data, self.footer.curr_size, hdr.batmap_version) == hdr.checksum
        )

    def _check_locators(self) -> None:
        if self.header is None or self.footer.type != s.DISK_TYPE_DIFF:
            return
        for i, loc in enumerate(self.header.loc):
            if loc.code == s.PLAT_CODE_NONE:
                continue
            space = locators.reserved_size(loc)
            if (loc.data_len > MAX_LOCATOR_BYTES or loc.data_len > space
                    or space > MAX_LOCATOR_BYTES
                    or loc.data_offset + space > self.file_size
                    or loc.data_offset < s.FOOTER_SIZE + s.HEADER_SIZE):
                raise FormatError(
                    f"{self.path}: parent locator {i} is invalid (offset {loc.data_offset}, "
                    f"length {loc.data_len}, space {loc.data_space})")

    def _check_bat(self) -> None:
        """Check that every allocated block lies after the metadata, inside the file and
        apart from the others."""
        meta_end = self.end_of_metadata()
        block_bytes = (self.bitmap_secs + self.spb) * s.SECTOR_SIZE
        entries = sorted((self.bat[i], i) for i in self._allocated)
        prev_end = 0
        prev_blk = -1
        for sector, blk in entries:
            start = sector * s.SECTOR_SIZE
            if start < meta_end:
                raise FormatError(f"{self.path}: block {blk} (offset {start:#x}) overlaps "
                                  f"the metadata")
            if start + block_bytes > self.file_size:
                raise FormatError(f"{self.path}: block {blk} (offset {start:#x}) runs past "
                                  f"end of file")
            if start < prev_end:
                raise FormatError(f"{self.path}: blocks {prev_blk} and {blk} overlap")
            prev_end, prev_blk = start + block_bytes, blk

    # ----------------------------------------------------------------- geometry
    @property
    def size(self) -> int:
        """Virtual size in bytes."""
        return self.footer.curr_size

    @property
    def sectors(self) -> int:
        return self.footer.curr_size // s.SECTOR_SIZE

    @property
    def is_fixed(self) -> bool:
        return self.footer.type == s.DISK_TYPE_FIXED

    @property
    def is_differencing(self) -> bool:
        return self.footer.type == s.DISK_TYPE_DIFF

    @property
    def block_size(self) -> int:
        return self.header.block_size if self.header else s.DEFAULT_BLOCK_SIZE

    @property
    def spb(self) -> int:
        """Sectors per block."""
        return self.block_size // s.SECTOR_SIZE

    @property
    def bitmap_bytes(self) -> int:
        return s.pad_sector(-(-self.spb // 8))

    @property
    def bitmap_secs(self) -> int:
        return self.bitmap_bytes // s.SECTOR_SIZE

    @property
    def uuid(self) -> _uuid.UUID:
        return self.footer.uuid_obj

    @property
    def hidden(self) -> int:
        return self.footer.hidden

    @property
    def marker(self) -> int:
        return self.batmap_header.marker if self.batmap_header else 0

    def end_of_metadata(self) -> int:
        """First byte after the header, BAT, batmap and parent locators."""
        if self.header is None:
            return 0
        h = self.header
        end = max(self.footer.data_offset + s.HEADER_SIZE,
                  h.bat_end)
        if self.batmap_header is not None:
            end = max(end, self.batmap_header_offset() + s.BATMAP_HEADER_SIZE,
                      self.batmap_header.batmap_offset
                      + self.batmap_header.batmap_size * s.SECTOR_SIZE)
        for loc in h.loc:
            if loc.code != s.PLAT_CODE_NONE:
                end = max(end, loc.data_offset + locators.reserved_size(loc))
        return end

    def end_of_data(self) -> int:
        """First byte after all metadata and data blocks: where the footer belongs."""
        if self.is_fixed:
            return self.footer.curr_size
        return max(self.end_of_metadata(), self._next_db * s.SECTOR_SIZE)

    def allocated_blocks(self) -> int:
        return len(self._allocated)

    def allocated_block_numbers(self) -> list[int]:
        """Numbers of the blocks this layer holds, ascending (a copy)."""
        return list(self._allocated)

    def allocated_bytes(self) -> int:
        """Bytes of the virtual disk this layer holds itself (not its parents)."""
        if self.is_fixed:
            return self.size
        held = 0
        for blk in self._allocated:
            first = blk * self.spb
            if first >= self.sectors:
                continue
            if self.block_full(blk):
                held += min(self.spb, self.sectors - first)
            else:
                held += self._bitstring(blk).count("1", 0, self.sectors - first)
        return held * s.SECTOR_SIZE

    # ----------------------------------------------------------------- parents
    def parent_locator_names(self) -> list[tuple[int, s.ParentLocator, str | None]]:
        """(index, locator, decoded name or None) for every locator in use."""
        out = []
        if self.header is None:
            return out
        for i, loc in enumerate(self.header.loc):
            if loc.code == s.PLAT_CODE_NONE:
                continue
            out.append((i, loc, locators.read_name(self.fd, loc)))
        return out

    @property
    def parent_rbd(self) -> str | None:
        """The ``rbd:`` spec of a parent on a Ceph cluster (a MACX locator holding it),
        else None; nothing is checked or opened (see ParentPolicy.check_rbd)."""
        if not self.is_differencing or self.header is None:
            return None
        for loc in self.header.loc:
            spec = locators.read_rbd(self.fd, loc) if loc.code != s.PLAT_CODE_NONE else None
            if spec is not None:
                return spec
        return None

    @property
    def parent_is_raw(self) -> bool:
        return self.is_differencing and self.header is not None and \
            self.header.prt_uuid == b"\0" * 16

    def parent_path(self) -> str:
        """The parent's path, found through the locators (absolute, else relative to this
        file's folder). Raises ParentNotFound naming the parent."""
        if not self.is_differencing:
            raise ParentNotFound(f"{self.path} has no parent", errno.EINVAL)
        for _, _, name in self.parent_locator_names():
            if name is None:
                continue
            found = locators.resolve(self.path, name)
            if found is not None:
                return found
        assert self.header is not None
        name = self.header.parent_name
        if self.parent_rbd is not None:
            raise ParentNotFound(f"{self.path}: parent {self.parent_rbd} is on a Ceph "
                                 f"cluster, not a file", errno.EMEDIUMTYPE)
        raise ParentNotFound(f"{self.path}: parent {name!r} not found")

    # ----------------------------------------------------------------- bitmaps
    def bitmap(self, blk: int) -> bytearray:
        """The sector bitmap of an allocated block (cached)."""
        cached = self._bitmaps.get(blk)
        if cached is not None:
            self._bitmaps.move_to_end(blk)
            return cached
        entry = self.bat[blk]
        assert entry != s.BAT_ENTRY_UNUSED
        data = bytearray(pread_exact(self.fd, self.bitmap_bytes, entry * s.SECTOR_SIZE))
        self._bitmaps[blk] = data
        if len(self._bitmaps) > BITMAP_CACHE_BLOCKS:
            old, _ = self._bitmaps.popitem(last=False)
            self._bitstrings.pop(old, None)
        return data

    def _bitstring(self, blk: int) -> str:
        text = self._bitstrings.get(blk)
        if text is None or blk not in self._bitmaps:
            text = bm.bit_string(self.bitmap(blk), self.spb)
            self._bitstrings[blk] = text
        return text

    def bitmap_cached(self, blk: int) -> bool:
        """The block's bitmap is in memory: mapping its sectors reads nothing."""
        return blk in self._bitmaps

    def block_full(self, blk: int) -> bool:
        """The batmap says every sector of the block is allocated."""
        return (self.batmap is not None and self.batmap_valid
                and bm.test_bit(self.batmap, blk))

    # ----------------------------------------------------------------- mapping
    def extents(self, sector: int, count: int) -> Iterator[tuple[int, int, int | None]]:
        """Split [sector, sector+count) into runs held by this layer, as
        (first sector, sector count, byte offset in the file or None when not held here).
        Adjacent runs are merged when their file offsets are contiguous."""
        pending: list = []
        for run in self._raw_extents(sector, count):
            if pending:
                p_sec, p_cnt, p_off = pending
                if p_off is None and run[2] is None:
                    pending = [p_sec, p_cnt + run[1], None]
                    continue
                if (p_off is not None and run[2] is not None
                        and p_off + p_cnt * s.SECTOR_SIZE == run[2]):
                    pending = [p_sec, p_cnt + run[1], p_off]
                    continue
                yield tuple(pending)  # type: ignore[misc]
            pending = list(run)
        if pending:
            yield tuple(pending)  # type: ignore[misc]

    def _raw_extents(self, sector: int, count: int) -> Iterator[tuple[int, int, int | None]]:
        if self.is_fixed:
            yield sector, count, sector * s.SECTOR_SIZE
            return
        spb = self.spb
        end = sector + count
        while sector < end:
            blk, off = divmod(sector, spb)
            n = min(end - sector, spb - off)
            entry = self.bat[blk] if blk < len(self.bat) else s.BAT_ENTRY_UNUSED
            if entry == s.BAT_ENTRY_UNUSED:
                # Skip the whole run of unallocated blocks at once.
                i = bisect.bisect_left(self._allocated, blk)
                next_used = self._allocated[i] if i < len(self._allocated) else None
                stop = end if next_used is None else min(end, next_used * spb)
                yield sector, stop - sector, None
                sector = stop
                continue
            data = (entry + self.bitmap_secs) * s.SECTOR_SIZE
            if self.block_full(blk):
                yield sector, n, data + off * s.SECTOR_SIZE
            else:
                base = sector - off
                for first, length, is_set in bm.runs(self._bitstring(blk), off, n):
                    yield (base + first, length,
                           data + first * s.SECTOR_SIZE if is_set else None)
            sector += n

    # ----------------------------------------------------------------- writing
    def _require_writable(self) -> None:
        if not self.writable:
            raise ReadOnlyImage(f"{self.path} is open read-only")
        if self._closed:
            raise ReadOnlyImage(f"{self.path} is closed", errno.EBADF)

    def write(self, sector: int, data: bytes | bytearray | memoryview) -> None:
        """Write whole sectors at ``sector``; allocates blocks as needed."""
        self._require_writable()
        view = memoryview(data).cast("B")
        if len(view) % s.SECTOR_SIZE:
            raise OutOfRange("write length is not a whole number of sectors", errno.EINVAL)
        count = len(view) // s.SECTOR_SIZE
        if sector < 0 or sector + count > self.sectors:
            raise OutOfRange(f"write of {count} sectors at {sector} past the end of "
                             f"{self.path} ({self.sectors} sectors)", errno.ENOSPC)
        self._dirty = True
        if self.is_fixed:
            pwrite_all(self.fd, view, sector * s.SECTOR_SIZE)
            return
        spb = self.spb
        pos = 0
        while count:
            blk, off = divmod(sector, spb)
            n = min(count, spb - off)
            chunk = view[pos : pos + n * s.SECTOR_SIZE]
            if self.bat[blk] == s.BAT_ENTRY_UNUSED:
                self._allocate_and_write(blk, off, chunk)
            else:
                self._write_allocated(blk, off, chunk)
            sector += n
            count -= n
            pos += n * s.SECTOR_SIZE

    def _write_allocated(self, blk: int, off: int, chunk: memoryview) -> None:
        entry = self.bat[blk]
        n = len(chunk) // s.SECTOR_SIZE
        pwrite_all(self.fd, chunk, (entry + self.bitmap_secs + off) * s.SECTOR_SIZE)
        if self.block_full(blk):
            return
        bitmap = self.bitmap(blk)
        if bm.set_range(bitmap, off, n):
            self._bitstrings.pop(blk, None)
            pwrite_all(self.fd, bitmap, entry * s.SECTOR_SIZE)
            self._note_full(blk, bitmap)

    def _note_full(self, blk: int, bitmap: bytearray) -> None:
        if self.batmap is not None and bm.all_set(bitmap, self.spb):
            if not self.batmap_valid:
                # A batmap that failed its checksum is not trusted: start it again from
                # nothing, so that the one written back holds only bits known to be true.
                self.batmap[:] = bytes(len(self.batmap))
                self.batmap_valid = True
            if not bm.test_bit(self.batmap, blk):
                bm.set_bit(self.batmap, blk)
                self._dirty_batmap = True

    def _allocate_and_write(self, blk: int, off: int, chunk: memoryview) -> None:
        bitmap = bytearray(self.bitmap_bytes)
        bm.set_range(bitmap, off, len(chunk) // s.SECTOR_SIZE)

        def put(data_offset: int) -> None:
            pwrite_all(self.fd, chunk, data_offset + off * s.SECTOR_SIZE)

        self._allocate(blk, bitmap, put)

    def _allocate(self, blk: int, bitmap: bytearray, put_data: Callable[[int], None]) -> None:
        """Allocate block ``blk`` at the end of the data, in the crash-safe order of the
        module docstring: ``put_data(offset of the block's data)`` writes the payload."""
        start = self._next_db
        bm_secs = self.bitmap_secs
        blk_sec = start
        # Place the bitmap so that the data part begins on a 4 KiB boundary.
        while (blk_sec + bm_secs) % 8:
            blk_sec += 1
        data_sec = blk_sec + bm_secs
        new_end = (data_sec + self.spb) * s.SECTOR_SIZE
        old_size = self.file_size
        # 1. A valid footer at the new end of the file.
        if new_end + s.FOOTER_SIZE > old_size:
            pwrite_all(self.fd, self.footer.pack(), new_end)
            self.file_size = new_end + s.FOOTER_SIZE
        # Space past the end of data that a crashed writer left behind may hold stale bytes
        # (even an old footer): the new block must not inherit them.
        stale_end = min(old_size, new_end)
        if stale_end > data_sec * s.SECTOR_SIZE:
            write_zeros(self.fd, data_sec * s.SECTOR_SIZE, stale_end - data_sec * s.SECTOR_SIZE)
        # 2. The data.
        put_data(data_sec * s.SECTOR_SIZE)
        # 3. Zeros over the gap (and the old footer), then the bitmap.
        gap = (blk_sec - start) * s.SECTOR_SIZE
        pwritev_all(self.fd, [ZEROS[:gap], bitmap], start * s.SECTOR_SIZE)
        # 4. The BAT entry.
        self.bat[blk] = blk_sec
        self.write_bat(blk, blk)
        bisect.insort(self._allocated, blk)
        self._next_db = data_sec + self.spb
        self._bitmaps[blk] = bitmap
        self._bitstrings.pop(blk, None)
        self._note_full(blk, bitmap)

    def merge_block(self, blk: int, bitmap: bytes | bytearray | None, src_fd: int,
                    src_data_offset: int) -> int:
        """Copy into block ``blk`` the sectors that ``bitmap`` marks (all of them when it
        is None) from another file holding the same block's data at ``src_data_offset``
        (a child's block, for coalesce). Data moves file to file in the kernel; the bitmap
        is written after the data, once per block. Returns the number of sectors copied."""
        self._require_writable()
        first_sector = blk * self.spb
        if first_sector >= self.sectors:
            raise OutOfRange(f"block {blk} is past the end of {self.path}", errno.EINVAL)
        nsecs = min(self.spb, self.sectors - first_sector)
        if bitmap is None:
            wanted = bytearray(b"\xff" * self.bitmap_bytes)
            spans = [(0, nsecs)]
        else:
            wanted = bytearray(bitmap[: self.bitmap_bytes])
            spans = [(first, n) for first, n, is_set
                     in bm.runs(bm.bit_string(wanted, nsecs), 0, nsecs) if is_set]
        if not spans:
            return 0
        self._dirty = True

        def put(data_offset: int) -> None:
            for first, n in spans:
                copy_range(src_fd, src_data_offset + first * s.SECTOR_SIZE, self.fd,
                           data_offset + first * s.SECTOR_SIZE, n * s.SECTOR_SIZE)

        copied = sum(n for _, n in spans)
        if self.is_fixed:
            put(first_sector * s.SECTOR_SIZE)
            return copied
        entry = self.bat[blk]
        if entry == s.BAT_ENTRY_UNUSED:
            self._allocate(blk, wanted, put)
            return copied
        put((entry + self.bitmap_secs) * s.SECTOR_SIZE)
        if self.block_full(blk):
            return copied
        current = self.bitmap(blk)
        merged = (int.from_bytes(current, "big") | int.from_bytes(wanted, "big")
                  ).to_bytes(len(current), "big")
        if merged != current:
            current[:] = merged
            self._bitstrings.pop(blk, None)
            pwrite_all(self.fd, current, entry * s.SECTOR_SIZE)
            self._note_full(blk, current)
        return copied

    def write_bat(self, first: int, last: int) -> None:
        """Write the BAT sectors holding entries ``first`` to ``last`` in one call (the
        padding after the last entry stays zero)."""
        assert self.header is not None
        per_sector = s.SECTOR_SIZE // 4
        lo = (first // per_sector) * per_sector
        part = array.array("I", self.bat[lo : (last // per_sector + 1) * per_sector])
        if sys.byteorder == "little":
            part.byteswap()
        raw = part.tobytes()
        pwrite_all(self.fd, raw.ljust(s.pad_sector(len(raw)), b"\0"),
                   self.header.table_offset + lo * 4)

    def write_batmap(self) -> None:
        """Write the batmap header and map (one system call when they are adjacent)."""
        if self.batmap is None or self.batmap_header is None:
            return
        hdr = self.batmap_header
        hdr.checksum = s.batmap_checksum(self.batmap, self.footer.curr_size,
                                         hdr.batmap_version)
        hdr_off = self.batmap_header_offset()
        if hdr.batmap_offset == hdr_off + s.BATMAP_HEADER_SIZE:
            pwritev_all(self.fd, [hdr.pack(), self.batmap], hdr_off)
        else:
            pwrite_all(self.fd, self.batmap, hdr.batmap_offset)
            pwrite_all(self.fd, hdr.pack(), hdr_off)
        self.batmap_valid = True
        self._dirty_batmap = False

    def footer_offset(self) -> int:
        """Where the footer belongs: after the data in a file; in the last sector of a
        block device, which keeps its size (as the reference places it)."""
        if self.on_device:
            return self.file_size - s.FOOTER_SIZE
        return self.end_of_data()

    def write_footers(self, footer: s.Footer | None = None) -> None:
        """Write the footer where it belongs (then the backup copy at 0 for dynamic
        disks), and trim any space a crashed writer left after it in a file."""
        self._require_writable()
        self.footer = (footer or self.footer).sealed()
        raw = self.footer.pack()
        end = self.footer_offset()
        pwrite_all(self.fd, raw, end)
        if self.footer.is_dynamic:
            pwrite_all(self.fd, raw, 0)
        if not self.on_device:
            if self.file_size > end + s.FOOTER_SIZE:
                os.ftruncate(self.fd, end + s.FOOTER_SIZE)
            self.file_size = end + s.FOOTER_SIZE

    def set_hidden(self, value: int) -> None:
        self._require_writable()
        self.write_footers(replace(self.footer, hidden=value & 0xFF).sealed())

    def set_marker(self, value: int) -> None:
        self._require_writable()
        if self.batmap_header is None:
            raise FormatError(f"{self.path} has no batmap to hold a marker", errno.EINVAL)
        self.batmap_header.marker = value & 0xFF
        self.write_batmap()

    def flush(self) -> None:
        """Make everything written so far durable."""
        if not self.writable or self._closed:
            return
        if self._dirty_batmap:
            self.write_batmap()
        if self._dirty and self.footer_source != "primary":
            self.write_footers()
            self.footer_source = "primary"
        os.fsync(self.fd)

    def close(self) -> None:
        if self._closed:
            return
        try:
            if self.writable and (self._dirty or self._dirty_batmap):
                if self._dirty_batmap:
                    self.write_batmap()
                if self.file_size != self.footer_offset() + s.FOOTER_SIZE or \
                        self.footer_source != "primary":
                    self.write_footers()
                os.fsync(self.fd)
        finally:
            self._closed = True
            os.close(self.fd)

    def __enter__(self) -> VhdImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<VhdImage {self.path} type={self.footer.type} size={self.size}>"
