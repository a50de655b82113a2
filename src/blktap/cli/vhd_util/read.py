"""vhd-util read: dump metadata, translate sectors, print maps and read data."""

from __future__ import annotations

import errno
import os

from blktap.cli.vhd_util import dump
from blktap.cli.vhd_util.common import err_of, open_vhd
from blktap.cli.vhd_util.options import U64, Output, Usage, getopt, strtoull
from blktap.errors import BlktapError
from blktap.image.chain import Chain
from blktap.image.vhd import bitmap as bm
from blktap.image.vhd import structs as s
from blktap.image.vhd.image import VhdImage

USAGE = (
    "options:\n"
    "-h          help\n"
    "-n          name\n"
    "-p          print VHD headers\n"
    "-t sec      translate logical sector to VHD location\n"
    "-b blk      print bat entry\n"
    "-B          print entire bat as a bitmap\n"
    "-m blk      print bitmap\n"
    "-i sec      test bitmap for logical sector\n"
    "-e sec      output extent list of allocated logical sectors\n"
    "-a          print batmap\n"
    "-j blk      test batmap for block\n"
    "-d blk      print data\n"
    "-c num      num units\n"
    "-r sec      read num sectors at sec\n"
    "-R byte     read num bytes at byte\n"
    "-x          print in hex\n"
)
# Reads of virtual data are written out in pieces of this size.
CHUNK = 2 << 20
ORDER = "ptbBmieajdrR"


def run(argv: list[str], out: Output) -> int:
    parsed = getopt("read", argv, "n:pt:b:Bm:i:e:aj:d:c:r:R:xCh", out)
    name = None
    ops: dict[str, int] = {}
    count = 1
    hex_ = False
    for opt, val in parsed.opts:
        if opt == "n":
            name = val
        elif opt in ("p", "B", "a"):
            ops[opt] = 0
        elif opt in "tbmiejdrR":
            num = strtoull(val or "")
            if num != U64:
                ops[opt] = num
            else:
                ops.pop(opt, None)
        elif opt == "c":
            count = strtoull(val or "")
        elif opt == "x":
            hex_ = True
        elif opt == "C":
            pass  # the reference's parent cache: every read here follows the chain anyway
        else:
            raise Usage(22)
    if not name or parsed.args:
        raise Usage(22)
    try:
        image = open_vhd(name)
    except BlktapError as exc:
        out.print(dump.open_failure_text(name, exc.errno))
        return exc.errno
    with image:
        if image.is_fixed:
            out.print(f"Failed to get bat for {name}: {-errno.EINVAL}\n")
            return errno.EINVAL
        reader = _Reader(image, out, count, hex_)
        for op in ORDER:
            if op not in ops:
                continue
            ret = getattr(reader, f"op_{op}" if op.islower() else f"op_big_{op.lower()}")(ops[op])
            if ret and op != "p":
                return ret
    return 0


class _Reader:
    def __init__(self, image: VhdImage, out: Output, count: int, hex_: bool) -> None:
        self.image = image
        self.out = out
        self.count = count
        self.hex = hex_

    def c(self, value: int) -> str:
        return dump.conv(value, self.hex)

    def _bat(self, blk: int) -> int:
        bat = self.image.bat
        return bat[blk] if blk < len(bat) else s.BAT_ENTRY_UNUSED

    def _block_range_ok(self, blk: int) -> bool:
        assert self.image.header is not None
        if blk + self.count > self.image.header.max_bat_size:
            self.out.error(f"block {self.c(blk + self.count)} past end of file\n")
            return False
        return True

    # -p
    def op_p(self, _: int) -> int:
        self.out.print(dump.image_text(self.image, self.hex))
        return 0

    # -t: logical sector -> block, offset, file offset
    def op_t(self, sec: int) -> int:
        img, n = self.image, self.count
        if (sec + n) * s.SECTOR_SIZE > img.size:
            self.out.error(f"sector {self.c(sec + n)} past end of file\n")
            return errno.ERANGE
        spb = img.spb
        for cur in range(sec, sec + n):
            blk, lsec = divmod(cur, spb)
            entry = self._bat(blk)
            where = "not allocated" if entry == s.BAT_ENTRY_UNUSED else \
                self.c((entry + lsec + img.bitmap_secs) * s.SECTOR_SIZE)
            self.out.print(f"logical sector {self.c(cur)}: block number: {self.c(blk)}, "
                           f"sector offset: {self.c(lsec)}, file offset: {where}\n")
        return 0

    # -b: BAT entries
    def op_b(self, blk: int) -> int:
        if not self._block_range_ok(blk):
            return errno.ERANGE
        for cur in range(blk, blk + self.count):
            entry = self._bat(cur)
            where = "not allocated" if entry == s.BAT_ENTRY_UNUSED else \
                self.c(entry * s.SECTOR_SIZE)
            self.out.print(f"block: {self.c(cur)}: offset: {where}\n")
        return 0

    # -B: the BAT as a bitmap of allocated blocks
    def op_big_b(self, _: int) -> int:
        img = self.image
        total = img.size // img.block_size
        out = bytearray(-(-total // 8))
        for i in range(total):
            if self._bat(i) != s.BAT_ENTRY_UNUSED:
                bm.set_bit(out, i)
        self.out.raw(out)
        return 0

    # -m: raw block bitmaps
    def op_m(self, blk: int) -> int:
        if not self._block_range_ok(blk):
            return errno.ERANGE
        for cur in range(blk, blk + self.count):
            if cur >= len(self.image.bat):
                return errno.ERANGE
            if self._bat(cur) == s.BAT_ENTRY_UNUSED:
                self.out.print(f"block {self.c(cur)} not allocated\n")
                continue
            self.out.raw(bytes(self.image.bitmap(cur)))
        return 0

    def _sector_range_ok(self, sec: int) -> bool:
        if (sec + self.count) * s.SECTOR_SIZE > self.image.size:
            self.out.print(f"sector {self.c(sec)} past end of file\n")
            return False
        return True

    def _sector_set(self, cur: int) -> tuple[int, int, int]:
        blk, off = divmod(cur, self.image.spb)
        if self._bat(blk) == s.BAT_ENTRY_UNUSED:
            return blk, off, 0
        return blk, off, int(bm.test_bit(self.image.bitmap(blk), off))

    # -i: one bit per sector
    def op_i(self, sec: int) -> int:
        if not self._sector_range_ok(sec):
            return errno.ERANGE
        for cur in range(sec, sec + self.count):
            blk, off, bit = self._sector_set(cur)
            self.out.print(f"block {self.c(blk)}: sec: {self.c(off)}: {bit}\n")
        return 0

    # -e: extents of allocated sectors
    def op_e(self, sec: int) -> int:
        if not self._sector_range_ok(sec):
            return errno.ERANGE
        start = None
        length = 0
        for first, n, off in self.image.extents(sec, self.count):
            if off is not None:
                if start is None:
                    start, length = first, n
                else:
                    length += n
            elif start is not None:
                self.out.print(f"{self.c(start)} {self.c(length)}\n")
                start = None
        if start is not None:
            self.out.print(f"{self.c(start)} {self.c(length)}\n")
        return 0

    # -a: the raw batmap
    def op_a(self, _: int) -> int:
        img = self.image
        if img.batmap is None or not img.batmap_valid:
            self.out.print(f"failed to read batmap: {-errno.EINVAL}\n")
            return errno.EINVAL
        self.out.raw(bytes(img.batmap))
        return 0

    # -j: batmap bits
    def op_j(self, blk: int) -> int:
        img = self.image
        if not self._block_range_ok(blk):
            return errno.ERANGE
        if img.batmap_header is not None and not img.batmap_valid:
            self.out.error("failed to get batmap\n")
            return errno.EINVAL
        for cur in range(blk, blk + self.count):
            bit = 0
            if img.batmap is not None and img.batmap_header is not None and \
                    cur < img.batmap_header.batmap_size * 4096:
                bit = int(bm.test_bit(img.batmap, cur))
            self.out.error(f"batmap for block {self.c(cur)}: {bit}\n")
        return 0

    # -d: raw block data
    def op_d(self, blk: int) -> int:
        img = self.image
        if not self._block_range_ok(blk):
            return errno.ERANGE
        for cur in range(blk, blk + self.count):
            entry = self._bat(cur)
            if entry == s.BAT_ENTRY_UNUSED:
                self.out.print(f"block {self.c(cur)} not allocated\n")
                continue
            start = (entry + img.bitmap_secs) * s.SECTOR_SIZE
            try:
                data = os.pread(img.fd, img.block_size, start)
            except OSError as exc:
                return exc.errno or errno.EIO
            self.out.raw(data.ljust(img.block_size, b"\0"))
        return 0

    def _read_virtual(self, offset: int, length: int) -> int:
        if offset + length > self.image.size:
            return errno.ERANGE
        try:
            # As the reference: stored bytes, ciphertext for an encrypted VHD.
            chain = Chain.open(f"vhd:{self.image.path}", ciphertext=True)
        except BlktapError as exc:
            return exc.errno
        with chain:
            pos, end = offset, offset + length
            while pos < end:
                n = min(CHUNK, end - pos)
                try:
                    self.out.raw(chain.pread(pos, n))
                except (BlktapError, OSError) as exc:
                    return err_of(exc)
                pos += n
        return 0

    # -r: virtual sectors
    def op_r(self, sec: int) -> int:
        return self._read_virtual(sec * s.SECTOR_SIZE, self.count * s.SECTOR_SIZE)

    # -R: virtual bytes
    def op_big_r(self, byte: int) -> int:
        return self._read_virtual(byte, self.count)
