"""Consistency checking of VHD images (what ``vhd-util check`` reports).

The checker never stops at a Python exception: every fault is a :class:`CheckResult` with
the reason in the reference's words and the errno ``vhd-util check`` exits with. The
order of the checks is the reference's, so the first fault reported matches.
"""

from __future__ import annotations

import array
import errno
import os
import stat
from dataclasses import dataclass, field

from blktap.errors import BlktapError
from blktap.image.parents import ParentPolicy
from blktap.image.vhd import bitmap as bm
from blktap.image.vhd import locators
from blktap.image.vhd import structs as s
from blktap.image.vhd import validate as v
from blktap.image.vhd.image import VhdImage


@dataclass
class CheckOptions:
    ignore_footer: bool = False  # -i: a missing primary footer is not fatal
    ignore_parent_uuid: bool = False  # -I
    ignore_timestamps: bool = False  # -t
    check_parents: bool = False  # -p
    check_bitmaps: bool = False  # -b
    stats: bool = False  # -s
    skip_overlap: bool = False  # -B


@dataclass
class ImageStats:
    name: str
    secs_total: int
    secs_allocated: int = 0
    secs_written: int = 0
    written: bytearray = field(default_factory=bytearray)  # one bit per sector, MSB-first


@dataclass
class CheckResult:
    path: str
    errno: int = 0
    # Lines explaining the fault, printed before the metadata dump.
    messages: list[str] = field(default_factory=list)
    # Whether the fault warrants dumping the metadata (faults found after opening it).
    dump: bool = False
    # A fixed disk: valid, and the reference prints nothing for it.
    fixed: bool = False
    stats: ImageStats | None = None

    @property
    def ok(self) -> bool:
        return self.errno == 0


class _Fail(Exception):
    def __init__(self, message: str | None, err: int = errno.EINVAL, dump: bool = True):
        super().__init__(message)
        self.message = message
        self.err = err
        self.dump = dump


@dataclass(frozen=True)
class Planned:
    """A change not made yet, to be checked as if it were: the file cut or grown to
    ``size`` bytes, ``footer`` (packed) written at its end and, for a dynamic disk, at
    offset 0, and ``writes`` ((offset, bytes), e.g. a new batmap) made. ``image`` is the
    image opened on the file, holding what the plan leaves in memory: the footer it
    writes, and its header, BAT and batmap as they will be (the checker takes those from
    ``image``, the rest through the view: ``writes`` must keep to the batmap)."""

    image: VhdImage
    footer: bytes
    size: int
    writes: tuple[tuple[int, bytes], ...] = ()


class _View:
    """The bytes the checker reads: the file itself, or the file as a plan leaves it."""

    def __init__(self, fd: int, plan: Planned | None) -> None:
        self.fd = fd
        self.patches: list[tuple[int, bytes]] = []
        if plan is None:
            self.size = os.lseek(fd, 0, os.SEEK_END)
            return
        self.size = plan.size
        self.patches.extend(plan.writes)
        self.patches.append((plan.size - s.FOOTER_SIZE, plan.footer))
        if s.Footer.unpack(plan.footer).is_dynamic:
            self.patches.append((0, plan.footer))

    def pread(self, length: int, offset: int) -> bytes:
        length = max(0, min(length, self.size - offset))
        data = os.pread(self.fd, length, offset) if length else b""
        if not self.patches:
            return data
        # A grown file reads zeros where nothing was written yet.
        buf = bytearray(data.ljust(length, b"\0"))
        for at, raw in self.patches:
            lo, hi = max(at, offset), min(at + len(raw), offset + length)
            if lo < hi:
                buf[lo - offset : hi - offset] = raw[lo - at : hi - at]
        return bytes(buf)


def _read(view: _View, length: int, offset: int, what: str) -> bytes:
    try:
        data = view.pread(length, offset)
    except OSError as exc:
        raise _Fail(f"error reading {what}: {-exc.errno}") from None
    if len(data) != length:
        raise _Fail(f"error reading {what}: {-errno.EIO}")
    return data


def check_image(path: str, opts: CheckOptions | None = None) -> CheckResult:
    """Check one image (not its parents)."""
    opts = opts or CheckOptions()
    result = CheckResult(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        result.errno = exc.errno
        result.messages.append(f"cannot stat {path}: {exc.errno}")
        return result
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        result.errno = errno.EINVAL
        result.messages.append(f"{path} is not a regular file or block device")
        return result
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        result.errno = exc.errno
        result.messages.append(f"error opening {path}")
        return result
    try:
        _run(_Checker(path, _View(fd, None), opts, result))
    finally:
        os.close(fd)
    return result


def check_planned(plan: Planned, opts: CheckOptions | None = None) -> CheckResult:
    """What :func:`check_image` would report once ``plan`` is carried out, found without
    changing the file: how ``repair`` proves its result valid before writing it."""
    image = plan.image
    result = CheckResult(image.path)
    _run(_Checker(image.path, _View(image.fd, plan), opts or CheckOptions(), result,
                  image=image))
    return result


def _run(checker: _Checker) -> None:
    result = checker.result
    try:
        checker.run()
    except _Fail as fail:
        result.errno = fail.err
        if fail.message:
            result.messages.append(fail.message)
        result.dump = fail.dump


class _Checker:
    def __init__(self, path: str, view: _View, opts: CheckOptions, result: CheckResult,
                 image: VhdImage | None = None) -> None:
        self.path = path
        self.view = view
        self.fd = view.fd
        self.opts = opts
        self.result = result
        self.primary_missing = False
        self.size = view.size
        self.image = image  # already open (a plan's), else opened by run()

    def run(self) -> None:
        footer = self.check_footer()
        if not footer.is_dynamic:
            self.result.fixed = True
            return
        header = self.check_header(footer)
        image = self.image
        if image is None:
            try:
                image = VhdImage.open(self.path, allow_disabled=True, validate_bat=False)
            except BlktapError as exc:
                raise _Fail(None, exc.errno) from None
        try:
            problem = v.diff_header_problem(footer, header,
                                            check_time=not self.opts.ignore_timestamps)
            if problem:
                raise _Fail(f"differencing header is invalid: {problem}")
            self.check_bat(image, footer, header)
            if image.batmap_header is not None:
                self.check_batmap(image, footer, header)
            if footer.type == s.DISK_TYPE_DIFF:
                self.check_locators(footer, header)
        finally:
            if image is not self.image:
                image.close()

    # ------------------------------------------------------------------ footer
    def check_footer(self) -> s.Footer:
        opts = self.opts
        eof = self.size
        length = s.FOOTER_SIZE if eof % s.SECTOR_SIZE == 0 else s.FOOTER_SIZE - 1
        if eof < length:
            raise _Fail(f"error calculating end of file: {-errno.EINVAL}", dump=True)
        raw = _read(self.view, length, eof - length, "primary footer").ljust(s.FOOTER_SIZE, b"\0")
        primary = s.Footer.unpack(raw)
        problem = v.footer_problem(primary, raw, check_time=not opts.ignore_timestamps)
        if problem:
            self.primary_missing = True
            if not opts.ignore_footer:
                raise _Fail(f"primary footer invalid: {problem}")
        elif primary.type == s.DISK_TYPE_FIXED:
            return primary
        braw = _read(self.view, s.FOOTER_SIZE, 0, "backup footer")
        backup = s.Footer.unpack(braw)
        problem = v.footer_problem(backup, braw, check_time=not opts.ignore_timestamps)
        if problem:
            raise _Fail(f"backup footer invalid: {problem}")
        if raw != braw:
            if opts.ignore_footer:
                return backup
            unhidden = braw[: s.FOOTER_HIDDEN_OFFSET] + b"\0" + braw[s.FOOTER_HIDDEN_OFFSET + 1:]
            if not (v.old_tap_hidden_quirk(backup) and unhidden == raw):
                raise _Fail("primary and backup footers do not match")
        return primary

    # ------------------------------------------------------------------ header
    def check_header(self, footer: s.Footer) -> s.Header:
        if footer.data_offset + s.HEADER_SIZE > self.size:
            raise _Fail(f"error reading header: {-errno.EIO}")
        raw = _read(self.view, s.HEADER_SIZE, footer.data_offset, "header")
        header = s.Header.unpack(raw)
        problem = v.header_problem(header, raw, file_size=self.size)
        if problem:
            raise _Fail(f"header is invalid: {problem}")
        return header

    # ------------------------------------------------------------------ BAT
    def check_bat(self, image: VhdImage, footer: s.Footer, header: s.Header) -> None:
        opts = self.opts
        size = self.size
        if size % s.SECTOR_SIZE:
            if size % s.SECTOR_SIZE != s.SECTOR_SIZE - 1:
                raise _Fail(f"invalid file size: 0x{size:x}")
            size += 1
        nblocks = -(-footer.curr_size // s.DEFAULT_BLOCK_SIZE)
        if nblocks > header.max_bat_size:
            raise _Fail(f"error reading bat: {-errno.EINVAL}")
        bat = image.bat
        eoh_s = image.end_of_metadata() // s.SECTOR_SIZE
        eof_s = (size - s.FOOTER_SIZE) // s.SECTOR_SIZE
        spb = header.block_size // s.SECTOR_SIZE
        bm_secs = image.bitmap_secs
        bsz = spb + bm_secs
        n = footer.curr_size // s.DEFAULT_BLOCK_SIZE
        stats = None
        if opts.stats:
            total = spb * header.max_bat_size
            stats = ImageStats(image.path, total, written=bytearray(-(-total // 8)))
            self.result.stats = stats
        used = [(bat[i], i) for i in range(min(n, len(bat))) if bat[i] != s.BAT_ENTRY_UNUSED]
        for off, i in used:
            if off < eoh_s:
                raise _Fail(f"block {i} (offset 0x{off:x}) clobbers headers")
            if off + bsz > eof_s and not (
                    self.primary_missing and opts.ignore_footer and off + bsz == eof_s + 1):
                raise _Fail(f"block {i} (offset 0x{off:x}) clobbers footer")
        if not opts.skip_overlap:
            # Sorted neighbours are enough to find any overlap; report it in the
            # reference's terms (the lower block index first).
            ordered = sorted(used)
            for (a_off, a_i), (b_off, b_i) in zip(ordered, ordered[1:], strict=False):
                if b_off < a_off + bsz:
                    i, off, j, joff = (a_i, a_off, b_i, b_off) if a_i < b_i else \
                        (b_i, b_off, a_i, a_off)
                    raise _Fail(f"block {i} (offset 0x{off:x}) clobbers block {j} "
                                f"(offset 0x{joff:x})")
            if opts.stats or opts.check_bitmaps:
                for off, i in used:
                    self.check_block(i, off, spb, bm_secs, image, stats)

    def check_block(self, blk: int, off: int, spb: int, bm_secs: int, image: VhdImage,
                    stats: ImageStats | None) -> None:
        try:
            bitmap = self.view.pread(image.bitmap_bytes, off * s.SECTOR_SIZE)
        except OSError:
            bitmap = b""
        if len(bitmap) != image.bitmap_bytes:
            raise _Fail(f"error reading bitmap 0x{blk:x}")
        bits = bm.bit_string(bitmap, spb)
        if stats is not None:
            stats.secs_allocated += spb
            stats.secs_written += bits.count("1")
            base = blk * spb
            for first, length, is_set in bm.runs(bits, 0, spb):
                if is_set:
                    bm.set_range(stats.written, base + first, length)
        if self.opts.check_bitmaps:
            start = (off + bm_secs) * s.SECTOR_SIZE
            limit = max(0, min(spb * s.SECTOR_SIZE, self.size - s.FOOTER_SIZE - start))
            try:
                data = self.view.pread(limit, start) if limit else b""
            except OSError:
                raise _Fail(f"error reading data block 0x{blk:x}") from None
            bad = False
            for first, length, is_set in bm.runs(bits, 0, spb):
                if is_set:
                    continue
                chunk = data[first * s.SECTOR_SIZE : (first + length) * s.SECTOR_SIZE]
                if not any(chunk):
                    continue
                for sec in range(length):
                    piece = chunk[sec * s.SECTOR_SIZE : (sec + 1) * s.SECTOR_SIZE]
                    if any(piece):
                        self.result.messages.append(
                            f"sector 0x{first + sec:x} of block 0x{blk:x} has data where "
                            f"bitmap is clear")
                        bad = True
            if bad:
                raise _Fail(None)

    # ------------------------------------------------------------------ batmap
    def check_batmap(self, image: VhdImage, footer: s.Footer, header: s.Header) -> None:
        bhdr = image.batmap_header
        assert bhdr is not None and image.batmap is not None
        problem = v.batmap_problem(bhdr, image.batmap, curr_size=footer.curr_size,
                                   max_bat_size=header.max_bat_size, file_size=self.size)
        if problem == "invalid checksum":
            # The reference fails earlier, while computing the end of the metadata.
            raise _Fail(f"error calculating end of metadata: {-errno.EINVAL}")
        if problem:
            raise _Fail(f"batmap is invalid: {problem}")
        n = min(footer.curr_size // s.DEFAULT_BLOCK_SIZE, bhdr.batmap_size * 4096,
                len(image.bat))
        for i in range(n):
            if bm.test_bit(image.batmap, i) and image.bat[i] == s.BAT_ENTRY_UNUSED:
                raise _Fail(f"batmap shows unallocated block {i} full")

    # ------------------------------------------------------------------ locators
    def check_locators(self, footer: s.Footer, header: s.Header) -> None:
        pname = v.decode_parent_name(header) or ""
        seen_codes: set[int] = set()
        found = 0
        raw_parent = header.prt_uuid == b"\0" * 16
        for i, loc in enumerate(header.loc):
            problem = v.locator_problem(loc, self.size)
            if problem:
                raise _Fail(f"invalid parent locator {i}: {problem}")
            if loc.code == s.PLAT_CODE_NONE:
                continue
            if loc.code in seen_codes:
                raise _Fail(f"duplicate platform code in locator {i}: 0x{loc.code:x}")
            seen_codes.add(loc.code)
            if loc.code not in (s.PLAT_CODE_MACX, s.PLAT_CODE_W2KU, s.PLAT_CODE_W2RU):
                continue
            spec = locators.read_rbd(self.fd, loc, pread=self.view.pread)
            if spec is not None:
                # A snapshot on Ceph (raw): the header names it whole; the cluster is
                # not asked (a check looks at the file).
                if not raw_parent or spec != header.parent_name:
                    raise _Fail(f"parent locator {i} names {spec}, the header "
                                f"{header.parent_name} (parent uuid "
                                f"{'zero' if raw_parent else 'set'})")
                found += 1
                continue
            name = locators.read_name(self.fd, loc, pread=self.view.pread)
            if name is None:
                raise _Fail(f"error reading parent locator {i}: {-errno.EINVAL}")
            base = name.rsplit("/", 1)[-1]
            if base != pname:
                raise _Fail(f"parent locator {i} name ({base}) does not match header name "
                            f"({pname})")
            resolved = locators.resolve(self.path, name)
            if resolved is None or not os.access(resolved, os.R_OK):
                raise _Fail(f"error resolving {name}: {-errno.ENOENT}")
            if not raw_parent and not self.opts.ignore_parent_uuid:
                reason = None
                try:
                    with VhdImage.open(resolved) as parent:
                        if parent.footer.uuid != header.prt_uuid:
                            reason = "invalid parent uuid"
                except BlktapError:
                    reason = "error opening parent"
                if reason:
                    raise _Fail(f"invalid parent {resolved}: {reason}")
            found += 1
        if not found:
            raise _Fail(f"could not find parent {pname}")


@dataclass
class ChainCheck:
    """The outcome of checking an image and, with -p, its ancestors."""

    results: list[CheckResult]
    # Set when walking up the chain failed outside a single-image check.
    walk_messages: list[str] = field(default_factory=list)
    errno: int = 0


def check(path: str, opts: CheckOptions | None = None) -> ChainCheck:
    """Check an image and, when ``opts.check_parents``, every VHD ancestor."""
    opts = opts or CheckOptions()
    first = check_image(path, opts)
    out = ChainCheck([first], errno=first.errno)
    if not first.ok or not opts.check_parents:
        return out
    current = path
    seen = {os.path.realpath(path)}
    # The parents checked must lie inside BLKTAP_PARENT_DIRS when it is set.
    policy = ParentPolicy.from_env()
    while True:
        try:
            with VhdImage.open(current, allow_disabled=True, validate_bat=False) as img:
                if not img.is_differencing or img.parent_is_raw:
                    return out
                try:
                    parent = policy.check(current, img.parent_path())
                except BlktapError as exc:
                    out.walk_messages.append(f"error getting parent: {-exc.errno}")
                    out.walk_messages.append(f"error checking parents: {-exc.errno}")
                    out.errno = exc.errno
                    return out
        except BlktapError:
            return out
        if parent in seen:
            out.walk_messages.append(f"error checking parents: {-errno.ELOOP}")
            out.errno = errno.ELOOP
            return out
        seen.add(parent)
        result = check_image(parent, opts)
        out.results.append(result)
        if not result.ok:
            out.walk_messages.append(f"error checking parents: {-result.errno}")
            out.errno = result.errno
            return out
        current = parent


def _pct(a: int, b: int) -> float:
    """a/b as a percentage, rounded through single precision as the reference does."""
    if b == 0:
        return 0.0
    return _f32(_f32(a) / _f32(b)) * 100.0


def _f32(x: float) -> float:
    return array.array("f", [x])[0]


def stats_lines(chain: ChainCheck) -> list[str]:
    """The lines ``check -s`` prints: the root ancestor first, the leaf last."""
    records = [r.stats for r in reversed(chain.results) if r.stats is not None]
    if not records:
        return []
    head = records[0]
    lines = [f"{_basename(head.name)}: secs allocated: 0x{head.secs_allocated:x} "
             f"secs written: 0x{head.secs_written:x} "
             f"({_pct(head.secs_written, head.secs_allocated):.2f}%)"]
    if len(records) == 1:
        return lines
    total = head.secs_total
    chain_bits = int.from_bytes(head.written, "big")
    nbytes = len(head.written)
    prev = records[0]
    for cur in records[1:]:
        cur_bits = _bits_as_int(cur.written, nbytes)
        prev_bits = _bits_as_int(prev.written, nbytes)
        mask = ((1 << total) - 1) << (nbytes * 8 - total)
        cur_bits &= mask
        up = bin(cur_bits & ~prev_bits & mask).count("1")
        uc = bin(cur_bits & ~chain_bits & mask).count("1")
        chain_bits |= cur_bits
        lines.append(
            f"{_basename(cur.name)}: secs allocated: 0x{cur.secs_allocated:x} "
            f"secs written: 0x{cur.secs_written:x} "
            f"({_pct(cur.secs_written, cur.secs_allocated):.2f}%) "
            f"secs not in parent: 0x{up:x} ({_pct(up, cur.secs_written):.2f}%) "
            f"secs not in ancestors: 0x{uc:x} ({_pct(uc, cur.secs_written):.2f}%)")
        prev = cur
    return lines


def _bits_as_int(buf: bytearray, nbytes: int) -> int:
    data = bytes(buf[:nbytes]).ljust(nbytes, b"\0")
    return int.from_bytes(data, "big")


def _basename(name: str) -> str:
    return name.rsplit("/", 1)[-1]


__all__ = ["CheckOptions", "CheckResult", "ChainCheck", "Planned", "check", "check_image",
           "check_planned", "stats_lines"]
