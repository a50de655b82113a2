"""The undo journal of a journaled resize (blktap's ``libvhd-journal`` format).

Before a journaled resize changes an image, it records in a separate file every byte range
of the image it is about to overwrite, and makes that record durable. If the resize is
interrupted, :func:`revert` writes the recorded bytes back and cuts the file to its old
length: the image is again exactly what it was. The format is the reference's, byte for
byte, so that a journal left by the C ``vhd-util`` can be reverted by ours and the other
way round; it is described in docs/formats/vhd-journal.md.

A journal file is one 512-byte header, then *entries*: a 32-byte entry header followed by
its payload (a whole number of sectors) and the image offset the payload came from. The
metadata entries come first, in a fixed order (primary footer, then for dynamic disks the
footer copy, dynamic header, parent locators, BAT, batmap header, batmap); the data
entries (any other range) follow.

Durability: the entries are written and synced first, the journal header last (then
synced, with the folder): until the header is there, the file is not a journal. A journal
on a block device (an LVM volume, as XenServer's storage manager uses) is first made
invalid (its header zeroed), then written the same way.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import struct
import uuid as _uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

from blktap.errors import FormatError
from blktap.image.fileio import copy_range, file_size_of, pread_exact, pwrite_all, pwritev_all
from blktap.image.vhd import structs as s
from blktap.image.vhd import validate as v

# --------------------------------------------------------------------------------------
# On-disk structures (declarations only; the logic follows below).

JOURNAL_COOKIE = b"vjournal"
JOURNAL_HEADER_SIZE = 512
ENTRY_COOKIE = 0xAAAA12344321AAAA
ENTRY_HEADER_SIZE = 32

# Entry types, in the order the metadata entries appear.
ENTRY_FOOTER_P = 1  # the footer at the end of the image
ENTRY_FOOTER_C = 2  # the footer copy at offset 0 (dynamic disks)
ENTRY_HEADER = 3  # the dynamic header
ENTRY_LOCATOR = 4  # one per parent locator in use, in header order
ENTRY_BAT = 5  # the whole BAT, padded to a sector
ENTRY_BATMAP_H = 6  # the batmap header sector
ENTRY_BATMAP_M = 7  # the batmap
ENTRY_DATA = 8  # any other range (moved blocks, the bytes under new metadata)

ENTRY_NAMES = {ENTRY_FOOTER_P: "footer", ENTRY_FOOTER_C: "footer copy",
               ENTRY_HEADER: "header", ENTRY_LOCATOR: "parent locator", ENTRY_BAT: "BAT",
               ENTRY_BATMAP_H: "batmap header", ENTRY_BATMAP_M: "batmap",
               ENTRY_DATA: "data"}

# Journal header: cookie, image uuid, where the image's footer was (so its old length),
# data and metadata entry counts, where each kind starts, the journal's length, padding.
# Every field is big-endian except the journal length: the reference never converts it,
# so it is in the byte order of the host that wrote it (little-endian on XenServer).
_JOURNAL_HEADER = struct.Struct(">8s16sQIIQQ")
_JOURNAL_EOF = struct.Struct("<Q")
_JOURNAL_EOF_OFFSET = _JOURNAL_HEADER.size  # 56
assert _JOURNAL_EOF_OFFSET + _JOURNAL_EOF.size + 448 == JOURNAL_HEADER_SIZE

# Entry header: cookie, type, payload size, image offset, checksum, 4 bytes of padding
# (the C struct's alignment; counted in the checksum as stored).
_ENTRY_HEADER = struct.Struct(">QIIQI4s")
assert _ENTRY_HEADER.size == ENTRY_HEADER_SIZE
_ENTRY_CHECKSUM_FIELD = range(24, 28)


@dataclass
class JournalHeader:
    uuid: bytes
    vhd_footer_offset: int
    data_entries: int = 0
    metadata_entries: int = 0
    data_offset: int = 0
    metadata_offset: int = 0
    journal_eof: int = JOURNAL_HEADER_SIZE
    cookie: bytes = JOURNAL_COOKIE

    @classmethod
    def unpack(cls, buf: bytes) -> JournalHeader:
        cookie, uuid, footer_off, data_n, meta_n, data_off, meta_off = \
            _JOURNAL_HEADER.unpack_from(buf)
        (eof,) = _JOURNAL_EOF.unpack_from(buf, _JOURNAL_EOF_OFFSET)
        return cls(uuid, footer_off, data_n, meta_n, data_off, meta_off, eof, cookie)

    def pack(self) -> bytes:
        head = _JOURNAL_HEADER.pack(self.cookie, self.uuid, self.vhd_footer_offset,
                                    self.data_entries, self.metadata_entries,
                                    self.data_offset, self.metadata_offset)
        return (head + _JOURNAL_EOF.pack(self.journal_eof)).ljust(JOURNAL_HEADER_SIZE, b"\0")


@dataclass
class EntryHeader:
    type: int
    size: int
    offset: int
    checksum: int = 0
    cookie: int = ENTRY_COOKIE
    pad: bytes = b"\0" * 4

    @classmethod
    def unpack(cls, buf: bytes) -> EntryHeader:
        cookie, etype, size, offset, csum, pad = _ENTRY_HEADER.unpack_from(buf)
        return cls(etype, size, offset, csum, cookie, pad)

    def pack(self) -> bytes:
        return _ENTRY_HEADER.pack(self.cookie, self.type, self.size, self.offset,
                                  self.checksum, self.pad)


def entry_checksum(entry: EntryHeader, payload_sum: int) -> int:
    """One's complement of the byte sum of the entry header (its checksum counted as
    zero) and of the payload (``payload_sum`` = the payload's byte sum)."""
    raw = entry.pack()
    head = sum(raw) - sum(raw[_ENTRY_CHECKSUM_FIELD.start : _ENTRY_CHECKSUM_FIELD.stop])
    return ~(head + payload_sum) & 0xFFFFFFFF


# --------------------------------------------------------------------------------------
# Writing a journal.

# Data entries are cut into pieces of at most this size (the reference uses one entry per
# 2 MiB block; any size a whole number of sectors is valid).
DATA_ENTRY_MAX = 4 << 20


@dataclass
class Entry:
    """One entry to record: the bytes found at ``offset`` in the image."""

    type: int
    offset: int
    payload: bytes | bytearray | memoryview


def _fsync_dir(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_block(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def _oserror(path: str, exc: OSError) -> FormatError:
    code = exc.errno or errno.EIO
    return FormatError(f"{path}: {os.strerror(code)}", code)


def write_journal(path: str, uuid: bytes, vhd_footer_offset: int, metadata: list[Entry],
                  data: Iterable[Entry]) -> None:
    """Create the journal at ``path`` (which must not exist, unless it is a block device)
    holding ``metadata`` then ``data``, durably. The journal header, which makes the file
    a journal, is written last: a journal whose creation was cut short has a header of
    zeros, which :class:`Journal` reads as "no journal" (see :attr:`Journal.incomplete`)."""
    block = _is_block(path)
    try:
        if block:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise _oserror(path, exc) from None
    try:
        if block:
            # Whatever an earlier journal left on the device must stop being a journal
            # before any new entry lands over it.
            pwrite_all(fd, bytes(JOURNAL_HEADER_SIZE), 0)
            os.fsync(fd)
        header = JournalHeader(uuid, vhd_footer_offset)
        pos = JOURNAL_HEADER_SIZE
        for entry in metadata:
            pos = _write_entry(fd, pos, entry)
        header.metadata_entries = len(metadata)
        header.metadata_offset = JOURNAL_HEADER_SIZE if metadata else 0
        header.data_offset = pos
        for entry in data:
            pos = _write_entry(fd, pos, entry)
            header.data_entries += 1
        header.journal_eof = pos
        if block and pos > file_size_of(fd):
            raise FormatError(f"{path}: journal of {pos} bytes does not fit the device",
                              errno.ENOSPC)
        os.fsync(fd)
        pwrite_all(fd, header.pack(), 0)
        os.fsync(fd)
        if not block:
            _fsync_dir(path)
    except Exception as exc:
        # A real failure (not a crash): leave nothing behind, as the reference does.
        os.close(fd)
        if not block:
            with contextlib.suppress(OSError):
                os.unlink(path)
        if isinstance(exc, OSError):
            raise _oserror(path, exc) from None
        raise
    os.close(fd)


def _write_entry(fd: int, pos: int, entry: Entry) -> int:
    payload = memoryview(entry.payload).cast("B")
    size = len(payload)
    if size == 0 or size % s.SECTOR_SIZE:
        raise FormatError(f"journal entry of {size} bytes is not whole sectors", errno.EINVAL)
    head = EntryHeader(entry.type, size, entry.offset)
    head.checksum = entry_checksum(head, sum(payload))
    pwritev_all(fd, [head.pack(), payload], pos)
    return pos + ENTRY_HEADER_SIZE + size


def data_entries(fd: int, ranges: Iterable[tuple[int, int]]) -> Iterator[Entry]:
    """Data entries holding what the image ``fd`` has now in ``ranges`` (byte offset,
    length; whole sectors), read piece by piece as the journal is written."""
    for offset, length in ranges:
        while length:
            n = min(length, DATA_ENTRY_MAX)
            yield Entry(ENTRY_DATA, offset, pread_exact(fd, n, offset))
            offset += n
            length -= n


def remove_journal(path: str) -> None:
    """Delete a journal (the image no longer needs it). A journal on a block device is
    made invalid instead, as the device stays."""
    try:
        if _is_block(path):
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                pwrite_all(fd, bytes(JOURNAL_HEADER_SIZE), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            return
        os.unlink(path)
        _fsync_dir(path)
    except OSError as exc:
        raise _oserror(path, exc) from None


# --------------------------------------------------------------------------------------
# Reading a journal.

@dataclass
class JournalEntry:
    """An entry found in a journal: its header and where its payload is in the file."""

    header: EntryHeader
    payload_pos: int

    @property
    def type(self) -> int:
        return self.header.type

    @property
    def offset(self) -> int:
        return self.header.offset

    @property
    def size(self) -> int:
        return self.header.size


_CHECK_CHUNK = 4 << 20


class Journal:
    """A journal opened for reading; every entry has been checked (cookie, type, size,
    checksum, the range it restores) before anyone can use it."""

    def __init__(self, path: str, fd: int, header: JournalHeader | None,
                 metadata: list[JournalEntry], data: list[JournalEntry],
                 footer: s.Footer | None) -> None:
        self.path = path
        self.fd = fd
        self.header = header
        self.metadata = metadata
        self.data = data
        self.footer = footer  # the image's footer as it was

    @property
    def incomplete(self) -> bool:
        """The file was never finished as a journal (its header is still zeros: the
        writer stopped before the image was touched), so there is nothing to undo."""
        return self.header is None

    @classmethod
    def open(cls, path: str) -> Journal:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise _oserror(path, exc) from None
        try:
            return cls._load(path, fd)
        except OSError as exc:
            os.close(fd)
            raise _oserror(path, exc) from None
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _load(cls, path: str, fd: int) -> Journal:
        size = file_size_of(fd)
        first = os.pread(fd, JOURNAL_HEADER_SIZE, 0)
        if not any(first):
            return cls(path, fd, None, [], [], None)
        if size < JOURNAL_HEADER_SIZE:
            raise FormatError(f"{path}: not a journal (file of {size} bytes)")
        header = JournalHeader.unpack(first)
        if header.cookie != JOURNAL_COOKIE:
            raise FormatError(f"{path}: not a journal (no 'vjournal' cookie)")
        if header.metadata_entries == 0 and header.data_offset == 0:
            # What the reference leaves between finishing a resize and deleting its
            # journal: nothing is left to undo.
            raise FormatError(f"{path}: journal was committed (the resize finished); "
                              f"it holds nothing to revert")
        if not JOURNAL_HEADER_SIZE <= header.data_offset <= size:
            raise FormatError(f"{path}: data entries offset {header.data_offset} is "
                              f"outside the journal")
        limit = header.vhd_footer_offset + s.FOOTER_SIZE
        metadata: list[JournalEntry] = []
        pos = JOURNAL_HEADER_SIZE
        while pos < header.data_offset:
            entry = cls._entry(path, fd, pos, size, limit)
            if entry.type == ENTRY_DATA:
                raise FormatError(f"{path}: data entry at {pos} among the metadata")
            metadata.append(entry)
            pos = entry.payload_pos + entry.size
        if pos != header.data_offset:
            raise FormatError(f"{path}: metadata entries end at {pos}, not at the data "
                              f"entries ({header.data_offset})")
        data: list[JournalEntry] = []
        for _ in range(header.data_entries):
            entry = cls._entry(path, fd, pos, size, limit)
            if entry.type != ENTRY_DATA:
                raise FormatError(f"{path}: {ENTRY_NAMES.get(entry.type, entry.type)} "
                                  f"entry at {pos} among the data")
            data.append(entry)
            pos = entry.payload_pos + entry.size
        footer = cls._check_metadata(path, fd, header, metadata)
        return cls(path, fd, header, metadata, data, footer)

    @staticmethod
    def _entry(path: str, fd: int, pos: int, size: int, limit: int) -> JournalEntry:
        if pos + ENTRY_HEADER_SIZE > size:
            raise FormatError(f"{path}: journal ends inside the entry at {pos}")
        head = EntryHeader.unpack(pread_exact(fd, ENTRY_HEADER_SIZE, pos))
        where = f"{path}: entry at {pos}"
        if head.cookie != ENTRY_COOKIE:
            raise FormatError(f"{where}: bad cookie")
        if head.type not in ENTRY_NAMES:
            raise FormatError(f"{where}: unknown type {head.type}")
        if head.size == 0 or head.size % s.SECTOR_SIZE:
            raise FormatError(f"{where}: size {head.size} is not whole sectors")
        payload = pos + ENTRY_HEADER_SIZE
        if payload + head.size > size:
            raise FormatError(f"{where}: payload runs past the end of the journal")
        if head.offset % s.SECTOR_SIZE or head.offset + head.size > limit:
            raise FormatError(f"{where}: restores {head.size} bytes at {head.offset}, "
                              f"outside the image's {limit} bytes")
        total = 0
        done = 0
        while done < head.size:
            n = min(_CHECK_CHUNK, head.size - done)
            total += sum(pread_exact(fd, n, payload + done))
            done += n
        if entry_checksum(head, total) != head.checksum:
            raise FormatError(f"{where}: checksum mismatch "
                              f"({ENTRY_NAMES[head.type]} entry is damaged)")
        return JournalEntry(head, payload)

    @staticmethod
    def _check_metadata(path: str, fd: int, header: JournalHeader,
                        metadata: list[JournalEntry]) -> s.Footer:
        """The metadata must be what the reference's reader expects: the primary footer
        first, and for a dynamic disk the copy, header, locators, BAT and batmap."""
        if not metadata or metadata[0].type != ENTRY_FOOTER_P:
            raise FormatError(f"{path}: journal does not start with the image's footer")
        first = metadata[0]
        if first.size != s.FOOTER_SIZE or first.offset != header.vhd_footer_offset:
            raise FormatError(f"{path}: footer entry does not match the journal header")
        raw = pread_exact(fd, s.FOOTER_SIZE, first.payload_pos)
        footer = s.Footer.unpack(raw)
        problem = v.footer_problem(footer, raw, strict=False, allow_poison=True)
        if problem:
            raise FormatError(f"{path}: the recorded footer is invalid: {problem}")
        if footer.uuid != header.uuid:
            raise FormatError(f"{path}: the recorded footer is another image's")
        kinds = [e.type for e in metadata[1:]]
        if not footer.is_dynamic:
            if kinds:
                raise FormatError(f"{path}: metadata entries for a fixed disk")
            return footer
        expected_start = [ENTRY_FOOTER_C, ENTRY_HEADER]
        if kinds[:2] != expected_start:
            raise FormatError(f"{path}: footer copy and header entries missing")
        rest = kinds[2:]
        while rest and rest[0] == ENTRY_LOCATOR:
            rest = rest[1:]
        if rest not in ([ENTRY_BAT], [ENTRY_BAT, ENTRY_BATMAP_H, ENTRY_BATMAP_M]):
            raise FormatError(f"{path}: unexpected metadata entries "
                              f"{[ENTRY_NAMES[k] for k in kinds]}")
        hdr_entry = metadata[2]
        if hdr_entry.size != s.HEADER_SIZE or hdr_entry.offset != footer.data_offset:
            raise FormatError(f"{path}: header entry does not match the footer")
        if metadata[1].size != s.FOOTER_SIZE or metadata[1].offset != 0:
            raise FormatError(f"{path}: footer copy entry is not at offset 0")
        raw_header = pread_exact(fd, s.HEADER_SIZE, hdr_entry.payload_pos)
        vhd_header = s.Header.unpack(raw_header)
        problem = v.header_problem(vhd_header, raw_header, strict=False)
        if problem:
            raise FormatError(f"{path}: the recorded header is invalid: {problem}")
        in_use = sum(1 for loc in vhd_header.loc if loc.code != s.PLAT_CODE_NONE)
        if kinds.count(ENTRY_LOCATOR) != in_use:
            raise FormatError(f"{path}: {kinds.count(ENTRY_LOCATOR)} locator entries for "
                              f"{in_use} locators")
        bat = next(e for e in metadata if e.type == ENTRY_BAT)
        if bat.offset != vhd_header.table_offset or \
                bat.size > vhd_header.bat_bytes:
            raise FormatError(f"{path}: BAT entry does not match the header")
        return footer

    # ------------------------------------------------------------------ use
    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def original_size(self) -> int:
        """The image's length before the journaled operation."""
        assert self.header is not None
        return self.header.vhd_footer_offset + s.FOOTER_SIZE

    def check_image(self, image_path: str) -> None:
        """Refuse an image this journal was not written for: some valid footer of the
        image (poisoned or not, at its end, at offset 0 or where the journal says its
        footer was) must carry the journal's uuid. An incomplete journal goes with any
        image that is not disabled."""
        try:
            fd = os.open(image_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise FormatError(f"{image_path}: {os.strerror(exc.errno)}", exc.errno) from None
        try:
            size = file_size_of(fd)
            recorded = self.header.vhd_footer_offset if self.header else 0
            footers = footers_of(fd, size, recorded)
        finally:
            os.close(fd)
        if self.header is None:
            if any(f.cookie == s.POISON_COOKIE for f in footers):
                raise FormatError(f"{self.path} is an incomplete journal, but {image_path} "
                                  f"is disabled: it cannot be reverted with it")
            return
        if self.header.uuid in {f.uuid for f in footers}:
            return
        mine = str(_uuid.UUID(bytes=self.header.uuid))
        if not footers:
            raise FormatError(f"{image_path}: no valid VHD footer to match journal "
                              f"{self.path} (image {mine}) against")
        raise FormatError(f"{self.path} is the journal of image {mine}, not of "
                          f"{image_path}")

    def revert(self, image_path: str) -> None:
        """Put the image back exactly as it was when the journal was written. Safe to run
        again after being interrupted: it only writes what the journal holds."""
        self.check_image(image_path)
        try:
            fd = os.open(image_path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise FormatError(f"{image_path}: {os.strerror(exc.errno)}", exc.errno) from None
        try:
            self._revert(fd)
        except OSError as exc:
            raise FormatError(f"{image_path}: {os.strerror(exc.errno or errno.EIO)}",
                              exc.errno or errno.EIO) from None
        finally:
            os.close(fd)

    def _revert(self, fd: int) -> None:
        if self.header is None or self.footer is None:
            return  # an incomplete journal: the image was never touched
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        original = self.footer
        primary_raw = self._payload(self.metadata[0])
        poisoned = footer_poisoned(original)
        # 1. Disable the image while it is rewritten: a footer a reader could use (at the
        #    end of the file or at offset 0) becomes a poisoned copy of the original. One
        #    also goes where the original footer belongs, so that a revert cut short finds
        #    the image's identity there until the original is back.
        size = file_size_of(fd)
        if size >= s.FOOTER_SIZE and _valid_footer(pread_exact(fd, s.FOOTER_SIZE,
                                                                size - s.FOOTER_SIZE)):
            pwrite_all(fd, poisoned, size - s.FOOTER_SIZE)
        if original.is_dynamic:
            pwrite_all(fd, poisoned, 0)
        if self.header.vhd_footer_offset != size - s.FOOTER_SIZE:
            pwrite_all(fd, poisoned, self.header.vhd_footer_offset)
        # 2. The recorded ranges, data then metadata (footers last).
        for entry in self.data:
            copy_range(self.fd, entry.payload_pos, fd, entry.offset, entry.size)
        for entry in self.metadata:
            if entry.type not in (ENTRY_FOOTER_P, ENTRY_FOOTER_C):
                copy_range(self.fd, entry.payload_pos, fd, entry.offset, entry.size)
        # 3. The old length, then the footers: the copy at 0, and last the footer at the
        #    end, whose poisoned stand-in kept the image disabled until now.
        if regular:
            os.ftruncate(fd, self.original_size)
        os.fsync(fd)
        if original.is_dynamic:
            copy = next(e for e in self.metadata if e.type == ENTRY_FOOTER_C)
            pwrite_all(fd, self._payload(copy), 0)
            os.fsync(fd)
        pwrite_all(fd, primary_raw, self.header.vhd_footer_offset)
        os.fsync(fd)

    def _payload(self, entry: JournalEntry) -> bytes:
        return pread_exact(self.fd, entry.size, entry.payload_pos)


def _valid_footer(raw: bytes) -> bool:
    footer = s.Footer.unpack(raw)
    return v.footer_problem(footer, raw, strict=False, allow_poison=True) is None


def footers_of(fd: int, size: int, recorded_offset: int) -> list[s.Footer]:
    """The valid footers (poisoned ones too) an image has in the places a journaled
    operation may have left one: its end, ``recorded_offset``, and offset 0 unless a
    fixed disk's footer was found (its first sector is the guest's data)."""
    found: dict[int, s.Footer] = {}
    for off in dict.fromkeys([size - s.FOOTER_SIZE, recorded_offset, 0]):
        if off < 0 or off + s.FOOTER_SIZE > size:
            continue
        if off == 0 and any(f.type == s.DISK_TYPE_FIXED for f in found.values()):
            continue  # a fixed disk's first sector is the guest's data
        raw = pread_exact(fd, s.FOOTER_SIZE, off)
        if _valid_footer(raw):
            found[off] = s.Footer.unpack(raw)
    return list(found.values())


def revert(image_path: str, journal_path: str) -> None:
    """Undo an interrupted journaled operation, then delete its journal."""
    with Journal.open(journal_path) as journal:
        journal.revert(image_path)
    remove_journal(journal_path)


def footer_poisoned(footer: s.Footer) -> bytes:
    """The bytes of ``footer`` disabled (cookie ``v_poison``), as a journaled operation
    leaves it while it runs."""
    return replace(footer, cookie=s.POISON_COOKIE).sealed().pack()


__all__ = ["ENTRY_BAT", "ENTRY_BATMAP_H", "ENTRY_BATMAP_M", "ENTRY_DATA", "ENTRY_FOOTER_C",
           "ENTRY_FOOTER_P", "ENTRY_HEADER", "ENTRY_LOCATOR", "Entry", "Journal",
           "JournalHeader", "data_entries", "footer_poisoned", "footers_of",
           "remove_journal", "revert", "write_journal"]
