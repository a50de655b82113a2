"""Unit tests of the VHD image library: creation layouts, metadata rules, the write path,
chains, and reading the reference fixtures made by the C blktap."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

import corrupt as C
from blktap.errors import (
    ChainError,
    ChainTooDeep,
    FormatError,
    OutOfRange,
    ReadOnlyImage,
    UsageError,
)
from blktap.image import Chain, Extent, RawImage, VhdImage
from blktap.image.vhd import create, snapshot
from blktap.image.vhd import structs as s
from blktap.image.vhd.create import chain_depth
from conftest import named

MiB = 1 << 20
BLOCK = 2 * MiB


def raw_bytes(path: str | Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def whole(path: str | Path) -> bytes:
    return Path(path).read_bytes()


def disk(path: str | Path) -> bytes:
    with Chain.open(named(path)) as chain:
        return chain.pread(0, chain.size)


def pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def new_dynamic(tmp_path: Path, name: str = "d.vhd", size: int = 16 * MiB, **kw) -> str:
    path = str(tmp_path / name)
    create(path, size, **kw)
    return path


# ======================================================================================
# Creation layouts


class TestCreateLayout:
    def test_empty_dynamic_64mb(self, tmp_path: Path) -> None:
        path = new_dynamic(tmp_path, "e.vhd", 64 * MiB)
        data = whole(path)
        assert len(data) == 3584
        foot = s.Footer.unpack(data[-512:])
        assert data[:512] == data[-512:], "backup footer at 0 must equal the footer at EOF"
        assert foot.cookie == b"conectix"
        assert foot.features == 0x2
        assert foot.ff_version == 0x00010000
        assert foot.data_offset == 512
        assert foot.crtr_app == b"tap\0"
        assert foot.crtr_ver == 0x00010003
        assert foot.crtr_os == 0
        assert foot.orig_size == foot.curr_size == 64 * MiB
        assert s.unpack_geometry(foot.geometry) == (963, 8, 17)
        assert foot.type == s.DISK_TYPE_DYNAMIC
        assert foot.hidden == 0 and foot.saved == 0
        # Header at 512, BAT at 1536 (32 entries, padded to a sector, all unused).
        head = s.Header.unpack(data[512:1536])
        assert head.cookie == b"cxsparse"
        assert head.data_offset == 0xFFFFFFFFFFFFFFFF
        assert head.table_offset == 1536
        assert head.hdr_ver == 0x00010000
        assert head.max_bat_size == 32
        assert head.block_size == BLOCK
        assert head.prt_uuid == bytes(16)
        assert all(loc.code == s.PLAT_CODE_NONE for loc in head.loc)
        assert data[1536 : 1536 + 128] == b"\xff" * 128
        # Batmap header at 2048 with its map at 2560 (one sector, empty).
        bh = s.BatmapHeader.unpack(data[2048:2560])
        assert bh.cookie == b"tdbatmap"
        assert data[2048:2056] == b"tdbatmap"
        assert bh.batmap_offset == 2560
        assert bh.batmap_size == 1
        assert bh.batmap_version == 0x00010002
        assert bh.checksum == 0xFFFFFFFF  # ~0: an all-zero map
        assert bh.marker == 0 and bh.keyhash_cookie == 0
        assert data[2560:3072] == bytes(512)

    def test_empty_dynamic_matches_reference(self, tmp_path: Path, reference_dir: Path) -> None:
        """Field by field, our empty 64 MB disk is the reference's `vhd-util create -s 64`
        (apart from uuid, timestamp and the checksums that cover them)."""
        ours = new_dynamic(tmp_path, "e.vhd", 64 * MiB)
        theirs = str(reference_dir / "empty.vhd")
        assert os.path.getsize(ours) == os.path.getsize(theirs)
        fo, ft = C.read_footer(ours), C.read_footer(theirs)
        skip = {"uuid": b"", "timestamp": 0, "checksum": 0}
        assert replace(fo, **skip) == replace(ft, **skip)
        assert replace(C.read_header(ours), checksum=0) == replace(C.read_header(theirs),
                                                                   checksum=0)
        assert raw_bytes(ours, 1536, 32 * 4) == raw_bytes(theirs, 1536, 32 * 4)
        assert raw_bytes(ours, 2048, 1024) == raw_bytes(theirs, 2048, 1024)

    def test_bat_padding_matches_reference(self, tmp_path: Path, reference_dir: Path) -> None:
        ours = new_dynamic(tmp_path, "e.vhd", 64 * MiB)
        assert raw_bytes(reference_dir / "empty.vhd", 1536 + 128, 384) == bytes(384)
        assert raw_bytes(ours, 1536 + 128, 384) == bytes(384)

    def test_fixed(self, tmp_path: Path, reference_dir: Path) -> None:
        path = str(tmp_path / "f.vhd")
        create(path, 4 * MiB, fixed=True)
        assert os.path.getsize(path) == 4 * MiB + 512
        foot = C.read_footer(path)
        assert foot.type == s.DISK_TYPE_FIXED
        assert foot.data_offset == 0xFFFFFFFFFFFFFFFF
        assert foot.checksum == foot.compute_checksum()
        assert raw_bytes(path, 0, 4 * MiB) == bytes(4 * MiB), "a fixed disk has no copy at 0"
        ref = C.read_footer(str(reference_dir / "fixed.vhd"))
        skip = {"uuid": b"", "timestamp": 0, "checksum": 0}
        assert replace(foot, **skip) == replace(ref, **skip)
        with VhdImage.open(path) as img:
            assert img.is_fixed and img.size == 4 * MiB and img.header is None

    def test_prealloc(self, tmp_path: Path, reference_dir: Path) -> None:
        """`create -s 20 -S 200`: the BAT and batmap are sized for 200 MB."""
        path = new_dynamic(tmp_path, "p.vhd", 20 * MiB, prealloc_size=200 * MiB)
        theirs = str(reference_dir / "prealloc.vhd")
        assert os.path.getsize(path) == os.path.getsize(theirs) == 3584
        head = C.read_header(path)
        assert head.max_bat_size == 100
        assert C.read_footer(path).curr_size == 20 * MiB
        assert raw_bytes(path, 1536, 400) == b"\xff" * 400
        off, bh, _ = C.read_batmap(path)
        assert (off, bh.batmap_offset, bh.batmap_size) == (2048, 2560, 1)
        assert replace(head, checksum=0) == replace(C.read_header(theirs), checksum=0)
        _, bht, _ = C.read_batmap(theirs)
        assert bh == bht

    def test_prealloc_bigger_than_one_bat_sector(self, tmp_path: Path) -> None:
        path = new_dynamic(tmp_path, "p.vhd", 4 * MiB, prealloc_size=1024 * MiB)
        head = C.read_header(path)
        assert head.max_bat_size == 512
        off, bh, _ = C.read_batmap(path)
        assert off == 1536 + 2048 and bh.batmap_offset == off + 512
        with Chain.open(named(path), writable=True) as chain:
            chain.pwrite(0, b"x" * 4096)
        assert disk(path)[:4097] == b"x" * 4096 + b"\0"

    def test_snapshot_layout_100mb(self, tmp_path: Path) -> None:
        parent = new_dynamic(tmp_path, "parent.vhd", 100 * MiB)
        child = str(tmp_path / "child.vhd")
        assert snapshot(child, parent) == os.path.realpath(parent)
        data = whole(child)
        assert len(data) == 5120
        assert data[:512] == data[-512:]
        foot = s.Footer.unpack(data[-512:])
        assert foot.type == s.DISK_TYPE_DIFF and foot.curr_size == 100 * MiB
        head = s.Header.unpack(data[512:1536])
        assert head.prt_uuid == C.read_footer(parent).uuid
        assert head.parent_name == "parent.vhd"
        assert head.prt_name[:20] == "parent.vhd".encode("utf-16-be")
        assert head.prt_ts == s.vhd_time(os.stat(parent).st_mtime)
        expect = [
            (s.PLAT_CODE_MACX, 3072, b"file://./parent.vhd"),
            (s.PLAT_CODE_W2KU, 3584, ".\\parent.vhd".encode("utf-16-le")),
            (s.PLAT_CODE_W2RU, 4096, ".\\parent.vhd".encode("utf-16-le")),
        ]
        for loc, (code, offset, payload) in zip(head.loc, expect, strict=False):
            assert loc.code == code
            assert loc.data_offset == offset
            assert loc.data_space == 512, "blktap stores data_space in bytes"
            assert loc.data_len == len(payload)
            assert data[offset : offset + 512] == payload.ljust(512, b"\0")
        assert all(loc.code == s.PLAT_CODE_NONE for loc in head.loc[3:])
        with VhdImage.open(child) as img:
            names = [name for _, _, name in img.parent_locator_names()]
            assert names == ["./parent.vhd"] * 3
            assert img.parent_path() == os.path.realpath(parent)

    def test_snapshot_matches_reference(self, tmp_path: Path, reference_dir: Path) -> None:
        """A snapshot of a 48 MB base.vhd has the reference snap1.vhd's header layout."""
        base = new_dynamic(tmp_path, "base.vhd", 48 * MiB)
        snap = str(tmp_path / "snap1.vhd")
        snapshot(snap, base)
        ours, theirs = C.read_header(snap), C.read_header(str(reference_dir / "snap1.vhd"))
        assert ours.loc == theirs.loc
        assert ours.prt_name == theirs.prt_name
        for loc in ours.loc[:3]:
            assert raw_bytes(snap, loc.data_offset, 512) == raw_bytes(
                reference_dir / "snap1.vhd", loc.data_offset, 512)

    def test_checksums(self, tmp_path: Path) -> None:
        path = new_dynamic(tmp_path)
        raw_foot = raw_bytes(path, os.path.getsize(path) - 512, 512)
        raw_head = raw_bytes(path, 512, 1024)
        # One's complement of the byte sum with the checksum field counted as zero.
        for raw, field in ((raw_foot, 64), (raw_head, 36)):
            stored = int.from_bytes(raw[field : field + 4], "big")
            manual = ~(sum(raw) - sum(raw[field : field + 4])) & 0xFFFFFFFF
            assert stored == manual

    @pytest.mark.parametrize(
        ("size", "chs"),
        [
            (64 * MiB, (963, 8, 17)),
            (48 * MiB, (963, 6, 17)),
            (20 * MiB, (602, 4, 17)),
            (8 * MiB, (240, 4, 17)),
            (4 * MiB, (120, 4, 17)),
            (2040 << 30, (65535, 16, 255)),
            (4 << 40, (65535, 16, 255)),
        ],
    )
    def test_geometry(self, size: int, chs: tuple[int, int, int]) -> None:
        assert s.geometry(size) == chs

    def test_geometry_written(self, tmp_path: Path) -> None:
        path = new_dynamic(tmp_path, "g.vhd", 64 * MiB)
        assert raw_bytes(path, os.path.getsize(path) - 512 + 56, 4) == bytes(
            [963 >> 8, 963 & 0xFF, 8, 17])

    def test_hidden_byte_85(self, tmp_path: Path) -> None:
        path = new_dynamic(tmp_path)
        with VhdImage.open(path, writable=True) as img:
            img.set_hidden(1)
        size = os.path.getsize(path)
        for off in (0, size - 512):
            raw = raw_bytes(path, off, 512)
            assert raw[85] == 1 and raw[84] == 0
            assert s.Footer.unpack(raw).checksum == s.checksum(raw, s.FOOTER_CHECKSUM_FIELD)
        with VhdImage.open(path) as img:
            assert img.hidden == 1

    def test_reference_hidden_byte(self, reference_dir: Path) -> None:
        path = reference_dir / "flags.vhd"
        assert raw_bytes(path, os.path.getsize(path) - 512 + 85, 1) == b"\x01"
        with VhdImage.open(str(path)) as img:
            assert img.hidden == 1 and img.marker == 1

    def test_marker(self, tmp_path: Path) -> None:
        path = new_dynamic(tmp_path)
        with VhdImage.open(path, writable=True) as img:
            img.set_marker(1)
        _, bh, _ = C.read_batmap(path)
        assert bh.marker == 1 and raw_bytes(path, 2048 + 28, 1) == b"\x01"

    def test_size_rounded_to_blocks(self, tmp_path: Path) -> None:
        path = new_dynamic(tmp_path, "r.vhd", 5 * MiB + 1)
        with VhdImage.open(path) as img:
            assert img.size == 6 * MiB

    def test_refuses_existing_file(self, tmp_path: Path) -> None:
        path = new_dynamic(tmp_path)
        before = whole(path)
        with pytest.raises(FormatError, match="exists"):
            create(path, 4 * MiB)
        with pytest.raises(FormatError, match="exists"):
            snapshot(path, new_dynamic(tmp_path, "other.vhd"))
        assert whole(path) == before
        assert sorted(os.listdir(tmp_path)) == ["d.vhd", "other.vhd"], "no temporary left"

    @pytest.mark.parametrize("size", [0, -512, s.MAX_VHD_SIZE + BLOCK])
    def test_bad_sizes(self, tmp_path: Path, size: int) -> None:
        with pytest.raises(UsageError):
            create(str(tmp_path / "x.vhd"), size)
        assert not (tmp_path / "x.vhd").exists()

    def test_prealloc_smaller_than_size(self, tmp_path: Path) -> None:
        with pytest.raises(UsageError):
            create(str(tmp_path / "x.vhd"), 8 * MiB, prealloc_size=4 * MiB)


# ======================================================================================
# The write path


class TestWrites:
    def test_blocks_are_4k_aligned(self, tmp_path: Path) -> None:
        path = new_dynamic(tmp_path, "a.vhd", 32 * MiB)
        order = [5, 0, 15, 7, 1]
        with Chain.open(named(path), writable=True) as chain:
            for blk in order:
                chain.pwrite(blk * BLOCK + 4096, pattern(4096, blk))
        bat = C.read_bat(path)
        used = [bat[b] for b in order]
        assert all(e != s.BAT_ENTRY_UNUSED for e in used)
        for entry in used:
            assert (entry + 1) % 8 == 0, f"data of the block at sector {entry} not 4K aligned"
        assert used == sorted(used), "blocks are appended in the order they are written"
        assert used[0] == 7, "first block right after the metadata (3072 bytes), aligned"
        for a, b in zip(used, used[1:], strict=False):
            assert b - a >= 1 + 4096
        for blk in order:
            data_off = (bat[blk] + 1) * 512
            assert raw_bytes(path, data_off + 4096, 4096) == pattern(4096, blk)
        assert [i for i, e in enumerate(bat) if e != s.BAT_ENTRY_UNUSED] == sorted(order)
        size = os.path.getsize(path)
        assert size == (max(used) + 1 + 4096) * 512 + 512
        assert raw_bytes(path, 0, 512) == raw_bytes(path, size - 512, 512)

    def test_bitmap_msb_first(self, tmp_path: Path) -> None:
        path = new_dynamic(tmp_path)
        with Chain.open(named(path), writable=True) as chain:
            chain.write(0, bytes(8 * 512))  # sectors 0-7
            chain.write(9, b"\1" * 512)  # sector 9
            chain.write(4095, b"\2" * 512)  # the last sector of the block
        entry = C.read_bat(path)[0]
        bitmap = raw_bytes(path, entry * 512, 512)
        assert bitmap[0] == 0xFF
        assert bitmap[1] == 0x40
        assert bitmap[511] == 0x01
        assert bitmap[2:511] == bytes(509)

    def test_bitmap_of_reference(self, reference_dir: Path) -> None:
        """data.vhd: writes at sector 4097 (one sector) and 10 MiB + 7 sectors."""
        with VhdImage.open(str(reference_dir / "data.vhd")) as img:
            assert img.allocated_blocks() == 4
            assert [i for i, e in enumerate(img.bat) if e != s.BAT_ENTRY_UNUSED] == [0, 1, 5, 31]

    def test_batmap_bit_for_full_block(self, tmp_path: Path) -> None:
        path = new_dynamic(tmp_path, "b.vhd", 64 * MiB)
        with Chain.open(named(path), writable=True) as chain:
            chain.pwrite(1 * BLOCK, pattern(BLOCK, 1))  # full, in one write
            chain.pwrite(2 * BLOCK, pattern(BLOCK - 512, 2))  # one sector short
            for i in range(4):  # full, in four writes, out of order
                part = [2, 0, 3, 1][i]
                chain.pwrite(9 * BLOCK + part * (BLOCK // 4), pattern(BLOCK // 4, 10 + part))
            chain.pwrite(31 * BLOCK, pattern(BLOCK, 31))
        _, bh, data = C.read_batmap(path)
        assert data[0] == 0x40, "block 1 set, block 2 (not full) clear, MSB first"
        assert data[1] == 0x40, "block 9"
        assert data[3] == 0x01, "block 31"
        assert data[4:] == bytes(508)
        # Checksum: ~(byte sum) over pad512(curr_size >> 24) bytes of the map.
        length = -(-(64 * MiB >> 24) // 512) * 512
        assert bh.checksum == ~sum(data[:length]) & 0xFFFFFFFF
        assert bh.checksum == s.batmap_checksum(data, 64 * MiB)
        with VhdImage.open(path) as img:
            assert img.batmap_valid
            assert [img.block_full(b) for b in (1, 2, 9, 31)] == [True, False, True, True]
        expect = bytearray(64 * MiB)
        expect[BLOCK : 2 * BLOCK] = pattern(BLOCK, 1)
        expect[2 * BLOCK : 3 * BLOCK - 512] = pattern(BLOCK - 512, 2)
        for part in range(4):
            start = 9 * BLOCK + part * (BLOCK // 4)
            expect[start : start + BLOCK // 4] = pattern(BLOCK // 4, 10 + part)
        expect[31 * BLOCK :] = pattern(BLOCK, 31)
        assert disk(path) == expect

    def test_batmap_v11_checksum_sums_signed_bytes(self, tmp_path: Path) -> None:
        """A version 1.1 batmap sums its bytes as signed chars: a map whose checksum
        follows that rule is valid, one that follows the 1.2 rule is not."""
        path = new_dynamic(tmp_path, size=32 * MiB)
        with Chain.open(named(path), writable=True) as chain:
            chain.write(0, pattern(BLOCK, 1))  # block 0 full: map byte 0x80
        off, bh, data = C.read_batmap(path)
        assert data[0] == 0x80
        for checksum, valid in ((~(-128) & 0xFFFFFFFF, True), (~128 & 0xFFFFFFFF, False)):
            bh.batmap_version = s.BATMAP_VERSION_1_1
            bh.checksum = checksum
            with open(path, "r+b") as f:
                f.seek(off)
                f.write(bh.pack())
            with VhdImage.open(path) as img:
                assert img.batmap_valid == valid
                assert img.block_full(0) == valid
            assert disk(path)[:BLOCK] == pattern(BLOCK, 1)

    def test_batmap_checksum_signed_v11(self) -> None:
        data = bytes([0x80, 0x01]) + bytes(510)
        assert s.batmap_checksum(data, 16 * MiB) == ~0x81 & 0xFFFFFFFF
        assert s.batmap_checksum(data, 16 * MiB, s.BATMAP_VERSION_1_1) == \
            ~(-128 + 1) & 0xFFFFFFFF
        assert s.batmap_checksum(bytes(512), 64 * MiB) == 0xFFFFFFFF

    def test_writes_to_allocated_block_update_bitmap(self, tmp_path: Path) -> None:
        path = new_dynamic(tmp_path)
        with Chain.open(named(path), writable=True) as chain:
            chain.write(100, b"a" * 512)
        size = os.path.getsize(path)
        with Chain.open(named(path), writable=True) as chain:
            chain.write(101, b"b" * 1024)
        assert os.path.getsize(path) == size, "no new block for an allocated one"
        entry = C.read_bat(path)[0]
        bitmap = raw_bytes(path, entry * 512, 512)
        assert bitmap[12] == 0b00001110 and bitmap[13] == 0  # sectors 100-102 (100 = 12*8 + 4)
        got = disk(path)
        assert got[100 * 512 : 103 * 512] == b"a" * 512 + b"b" * 1024
        assert got[: 100 * 512] == bytes(100 * 512)

    def test_write_crossing_blocks(self, tmp_path: Path) -> None:
        path = new_dynamic(tmp_path)
        data = pattern(BLOCK + 3 * 512, 7)
        with Chain.open(named(path), writable=True) as chain:
            chain.pwrite(BLOCK - 1000, data)
        got = disk(path)
        assert got[BLOCK - 1000 : BLOCK - 1000 + len(data)] == data
        assert got[: BLOCK - 1000] == bytes(BLOCK - 1000)
        with VhdImage.open(path) as img:
            assert img.allocated_blocks() == 3

    def test_pwrite_unaligned(self, tmp_path: Path) -> None:
        path = new_dynamic(tmp_path)
        shadow = bytearray(16 * MiB)
        rng = random.Random(3)
        with Chain.open(named(path), writable=True) as chain:
            for offset, length in [(1, 1), (511, 2), (1000, 100), (4095, 4098),
                                   (BLOCK - 3, 7), (16 * MiB - 5, 5), (777, 0)]:
                data = rng.randbytes(length)
                chain.pwrite(offset, data)
                shadow[offset : offset + length] = data
                assert chain.pread(offset, length) == data
            assert chain.pread(0, chain.size) == shadow
            assert chain.pread(3, 1000) == shadow[3:1003]
        assert disk(path) == shadow

    def test_fixed_writes(self, tmp_path: Path) -> None:
        path = str(tmp_path / "f.vhd")
        create(path, 4 * MiB, fixed=True)
        footer = raw_bytes(path, 4 * MiB, 512)
        with Chain.open(named(path), writable=True) as chain:
            chain.pwrite(1000, b"q" * 5000)
            chain.pwrite(4 * MiB - 10, b"e" * 10)
        assert raw_bytes(path, 1000, 5000) == b"q" * 5000
        assert raw_bytes(path, 4 * MiB, 512) == footer
        assert os.path.getsize(path) == 4 * MiB + 512

    def test_read_only_and_range(self, tmp_path: Path) -> None:
        path = new_dynamic(tmp_path, size=4 * MiB)
        before = whole(path)
        with Chain.open(named(path)) as chain:
            with pytest.raises(ReadOnlyImage):
                chain.write(0, bytes(512))
            with pytest.raises(OutOfRange):
                chain.read(chain.sectors - 1, 2)
            with pytest.raises(OutOfRange):
                chain.pread(-1, 10)
        with Chain.open(named(path), writable=True) as chain:
            with pytest.raises(OutOfRange):
                chain.pwrite(4 * MiB - 1, b"xy")
            with pytest.raises(OutOfRange):
                chain.write(0, b"x" * 100)
            with pytest.raises(OutOfRange):
                chain.write(-1, b"x" * 512)
        assert whole(path) == before
        with VhdImage.open(path) as img:
            with pytest.raises(ReadOnlyImage):
                img.set_hidden(1)

    def test_open_close_without_writes_changes_nothing(self, tmp_path: Path) -> None:
        path = new_dynamic(tmp_path)
        with Chain.open(named(path), writable=True) as chain:
            chain.pwrite(0, b"z" * 3000)
        before = whole(path)
        with Chain.open(named(path), writable=True) as chain:
            chain.pread(0, 4096)
            chain.flush()
        assert whole(path) == before

    def test_short_footer(self, tmp_path: Path) -> None:
        """A 511-byte footer (an old Microsoft bug) is read; a writer leaves a full one."""
        path = new_dynamic(tmp_path)
        with Chain.open(named(path), writable=True) as chain:
            chain.pwrite(0, b"a" * 1000)
        os.truncate(path, os.path.getsize(path) - 1)
        with VhdImage.open(path, footer="primary") as img:
            assert img.footer_source == "short"
        assert disk(path)[:1001] == b"a" * 1000 + b"\0"
        with Chain.open(named(path), writable=True) as chain:
            chain.pwrite(5 * MiB, b"b" * 1000)
        assert os.path.getsize(path) % 512 == 0
        with VhdImage.open(path, footer="primary") as img:
            assert img.footer_source == "primary"
        got = disk(path)
        assert got[:1000] == b"a" * 1000 and got[5 * MiB : 5 * MiB + 1000] == b"b" * 1000
        assert got.count(0) == len(got) - 2000

    def test_largest_disk(self, tmp_path: Path) -> None:
        """2040 GiB (the largest XenServer disk): write both ends, map and read them."""
        path = new_dynamic(tmp_path, "big.vhd", 2040 << 30)
        size = 2040 << 30
        with Chain.open(named(path), writable=True) as chain:
            chain.pwrite(size - 700, b"z" * 700)
            chain.pwrite(0, b"y" * 10)
        with Chain.open(named(path)) as chain:
            assert chain.pread(size - 701, 701) == b"\0" + b"z" * 700
            assert chain.pread(0, 11) == b"y" * 10 + b"\0"
            assert chain.map() == [Extent(0, 512, 0), Extent(512, size - 1536, None),
                                   Extent(size - 1024, 1024, 0)]
        with VhdImage.open(path) as img:
            assert img.header.max_bat_size == 1044480
            assert img.allocated_blocks() == 2

    def test_raw_leaf_keeps_its_size(self, tmp_path: Path) -> None:
        """An unaligned write into a raw image of 1000 bytes (not whole sectors) must not
        grow the file to the next sector boundary."""
        raw = tmp_path / "r.img"
        raw.write_bytes(bytes(1000))
        with Chain.open(named(raw), writable=True) as chain:
            assert chain.size == 1000
            chain.pwrite(990, b"x" * 10)
            assert chain.pread(980, 20) == bytes(10) + b"x" * 10
        assert raw.read_bytes() == bytes(990) + b"x" * 10

    def test_crashed_writer_falls_back_to_backup_footer(self, tmp_path: Path) -> None:
        """A file whose primary footer is gone (a writer killed while extending it) opens
        through the backup footer, and its next writer repairs the end of the file."""
        path = new_dynamic(tmp_path)
        with Chain.open(named(path), writable=True) as chain:
            chain.pwrite(0, b"z" * 4096)
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.seek(size - 512)
            f.write(bytes(512))
        with VhdImage.open(path) as img:
            assert img.footer_source == "backup"
        with pytest.raises(FormatError, match="footer"):
            VhdImage.open(path, footer="primary")
        with Chain.open(named(path), writable=True) as chain:
            chain.pwrite(BLOCK, b"y" * 512)
        with VhdImage.open(path, footer="primary") as img:
            assert img.footer_source == "primary"
        got = disk(path)
        assert got[:4096] == b"z" * 4096 and got[BLOCK : BLOCK + 512] == b"y" * 512


# ======================================================================================
# Chains


def written_parent(tmp_path: Path, name: str = "base.vhd",
                   size: int = 16 * MiB) -> tuple[str, bytes]:
    path = new_dynamic(tmp_path, name, size)
    data = pattern(size, sum(name.encode()))
    with Chain.open(named(path), writable=True) as chain:
        chain.pwrite(0, data)
    return path, data


class TestChains:
    def test_child_over_vhd_parent(self, tmp_path: Path) -> None:
        base, base_data = written_parent(tmp_path)
        child = str(tmp_path / "child.vhd")
        snapshot(child, base)
        assert disk(child) == base_data
        expect = bytearray(base_data)
        with Chain.open(named(child), writable=True) as chain:
            assert len(chain) == 2
            chain.pwrite(1000, b"c" * 100)  # unaligned: merges the parent's sector bytes
            expect[1000:1100] = b"c" * 100
            chain.write(BLOCK // 512 + 3, b"d" * 512)
            expect[BLOCK + 1536 : BLOCK + 2048] = b"d" * 512
            assert chain.pread(0, chain.size) == expect
        assert disk(child) == expect
        assert disk(base) == base_data, "the parent is never written"

    def test_map_per_layer(self, tmp_path: Path) -> None:
        base = new_dynamic(tmp_path, "base.vhd", 16 * MiB)
        with Chain.open(named(base), writable=True) as chain:
            chain.pwrite(0, b"p" * (4 * 512))
            chain.pwrite(3 * BLOCK, b"p" * 512)
        mid = str(tmp_path / "mid.vhd")
        snapshot(mid, base)
        with Chain.open(named(mid), writable=True) as chain:
            chain.pwrite(512, b"m" * 512)
        leaf = str(tmp_path / "leaf.vhd")
        snapshot(leaf, mid)
        with Chain.open(named(leaf), writable=True) as chain:
            chain.pwrite(2 * 512, b"l" * 512)
        with Chain.open(named(leaf)) as chain:
            assert len(chain) == 3
            assert chain.map() == [
                Extent(0, 512, 2),
                Extent(512, 512, 1),
                Extent(1024, 512, 0),
                Extent(1536, 512, 2),
                Extent(2048, 3 * BLOCK - 2048, None),
                Extent(3 * BLOCK, 512, 2),
                Extent(3 * BLOCK + 512, 16 * MiB - 3 * BLOCK - 512, None),
            ]
            assert chain.map(1, 2) == [Extent(512, 512, 1), Extent(1024, 512, 0)]
            assert chain.allocated_bytes() == 5 * 512
            assert chain.pread(0, 2048) == b"p" * 512 + b"m" * 512 + b"l" * 512 + b"p" * 512

    def test_child_over_raw_parent(self, tmp_path: Path) -> None:
        raw = tmp_path / "raw.img"
        data = pattern(8 * MiB, 11)
        raw.write_bytes(data)
        child = str(tmp_path / "child.vhd")
        snapshot(child, str(raw), raw_parent=True)
        with VhdImage.open(child) as img:
            assert img.parent_is_raw and img.header.prt_uuid == bytes(16)
        with Chain.open(named(child), writable=True) as chain:
            assert isinstance(chain.layers[1], RawImage)
            assert chain.pread(0, chain.size) == data
            chain.pwrite(5, b"w" * 10)
        expect = bytearray(data)
        expect[5:15] = b"w" * 10
        assert disk(child) == expect
        assert raw.read_bytes() == data

    def test_raw_parent_smaller_than_child(self, tmp_path: Path) -> None:
        """A raw parent of 5 MiB + 1000 bytes, not a whole number of sectors: the child
        covers it, and what lies past the parent's end (including the rest of its last
        sector) reads as zeros."""
        raw = tmp_path / "raw.img"
        data = pattern(5 * MiB + 1000, 12)
        raw.write_bytes(data)
        child = str(tmp_path / "child.vhd")
        snapshot(child, str(raw), raw_parent=True)
        got = disk(child)
        assert len(got) >= len(data) and len(got) % 512 == 0
        assert got == data + bytes(len(got) - len(data))
        with Chain.open(named(child), writable=True) as chain:
            chain.pwrite(len(data) - 10, b"t" * 20)
        expect = bytearray(got)
        expect[len(data) - 10 : len(data) + 10] = b"t" * 20
        assert disk(child) == expect
        assert raw.read_bytes() == data

    def test_vhd_parent_smaller_than_child(self, tmp_path: Path) -> None:
        """A child grown past its parent (a fast resize within a preallocated BAT)."""
        base, base_data = written_parent(tmp_path, "base.vhd", 8 * MiB)
        child = str(tmp_path / "child.vhd")
        snapshot(child, base, prealloc_size=16 * MiB)
        C.set_footer_fields(child, curr_size=16 * MiB)
        assert disk(child) == base_data + bytes(8 * MiB)
        with Chain.open(named(child), writable=True) as chain:
            chain.pwrite(8 * MiB - 100, b"x" * 200)  # across the parent's end
            chain.pwrite(16 * MiB - 512, b"e" * 512)
        expect = bytearray(base_data + bytes(8 * MiB))
        expect[8 * MiB - 100 : 8 * MiB + 100] = b"x" * 200
        expect[-512:] = b"e" * 512
        assert disk(child) == expect
        with Chain.open(named(child)) as chain:
            tail = chain.map(8 * MiB // 512 + 1)
            assert tail[0].depth is None and tail[-1] == Extent(16 * MiB - 512, 512, 0)

    def test_vhd_parent_larger_than_child(self, tmp_path: Path) -> None:
        base, base_data = written_parent(tmp_path, "base.vhd", 16 * MiB)
        child = str(tmp_path / "child.vhd")
        snapshot(child, base)
        C.set_footer_fields(child, curr_size=8 * MiB)
        with Chain.open(named(child)) as chain:
            assert chain.size == 8 * MiB
            assert chain.pread(0, chain.size) == base_data[: 8 * MiB]
            assert chain.map() == [Extent(0, 8 * MiB, 1)]

    def test_snapshot_skips_empty_ancestors(self, tmp_path: Path) -> None:
        base, _ = written_parent(tmp_path)
        empty1 = str(tmp_path / "empty1.vhd")
        empty2 = str(tmp_path / "empty2.vhd")
        assert snapshot(empty1, base) == os.path.realpath(base)
        assert snapshot(empty2, empty1, skip_empty=False) == os.path.realpath(empty1)
        leaf = str(tmp_path / "leaf.vhd")
        assert snapshot(leaf, empty2) == os.path.realpath(base)
        with VhdImage.open(leaf) as img:
            assert img.parent_path() == os.path.realpath(base)
            assert img.header.prt_uuid == C.read_footer(base).uuid
            assert img.header.parent_name == "base.vhd"
        leaf2 = str(tmp_path / "leaf2.vhd")
        assert snapshot(leaf2, empty2, skip_empty=False) == os.path.realpath(empty2)
        with Chain.open(named(leaf2)) as chain:
            assert [os.path.basename(layer.path) for layer in chain.layers] == [
                "leaf2.vhd", "empty2.vhd", "empty1.vhd", "base.vhd"]
        with Chain.open(named(empty2), writable=True) as chain:
            chain.pwrite(0, b"n" * 512)
        leaf3 = str(tmp_path / "leaf3.vhd")
        assert snapshot(leaf3, empty2) == os.path.realpath(empty2), "no longer empty"

    def test_depth_limit(self, tmp_path: Path) -> None:
        base, _ = written_parent(tmp_path)
        s1 = str(tmp_path / "s1.vhd")
        s2 = str(tmp_path / "s2.vhd")
        snapshot(s1, base)
        snapshot(s2, s1, skip_empty=False)
        assert chain_depth(s2) == 3
        with pytest.raises(ChainTooDeep, match="depth"):
            snapshot(str(tmp_path / "s3.vhd"), s2, depth_limit=3, skip_empty=False)
        assert not (tmp_path / "s3.vhd").exists()
        snapshot(str(tmp_path / "s3.vhd"), s2, depth_limit=4, skip_empty=False)
        assert chain_depth(str(tmp_path / "s3.vhd")) == 4
        with pytest.raises(ChainTooDeep):
            Chain.open(named(tmp_path / "s3.vhd"), max_depth=3)
        with Chain.open(named(tmp_path / "s3.vhd"), max_depth=4) as chain:
            assert len(chain) == 4

    def test_parent_in_other_directory(self, tmp_path: Path) -> None:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        base, base_data = written_parent(tmp_path / "a", "base.vhd")
        child = str(tmp_path / "b" / "child.vhd")
        snapshot(child, base)
        head = C.read_header(child)
        payloads = [raw_bytes(child, loc.data_offset, loc.data_len) for loc in head.loc[:3]]
        # MACX holds the relative path; W2KU and W2RU the same with backslashes and the
        # ".\" prefix blktap gives every relative path.
        assert payloads == [b"file://../a/base.vhd"] + [
            ".\\..\\a\\base.vhd".encode("utf-16-le")] * 2
        with VhdImage.open(child) as img:
            assert img.parent_path() == os.path.realpath(base)
        # Moving both folders together keeps the chain working.
        shutil.move(str(tmp_path / "a"), str(tmp_path / "a2"))
        shutil.move(str(tmp_path / "b"), str(tmp_path / "b2"))
        os.symlink("a2", tmp_path / "a")
        assert disk(tmp_path / "b2" / "child.vhd") == base_data

    @pytest.mark.parametrize("keep", [0, 1, 2])
    def test_each_locator_alone_finds_the_parent(self, tmp_path: Path, keep: int) -> None:
        base, base_data = written_parent(tmp_path)
        child = str(tmp_path / "child.vhd")
        snapshot(child, base)
        head = C.read_header(child)
        for i in range(3):
            if i != keep:
                head.loc[i] = s.ParentLocator()
        C.write_header(child, head)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        old = os.getcwd()
        os.chdir(elsewhere)  # relative locators are taken from the child's folder
        try:
            assert disk(child) == base_data
        finally:
            os.chdir(old)

    def test_locator_data_space_in_sectors(self, tmp_path: Path) -> None:
        """The specification counts data_space in sectors (blktap in bytes): both read."""
        base, base_data = written_parent(tmp_path)
        child = str(tmp_path / "child.vhd")
        snapshot(child, base)
        head = C.read_header(child)
        for loc in head.loc[:3]:
            loc.data_space = 1
        C.write_header(child, head)
        assert disk(child) == base_data

    def test_absolute_locator(self, tmp_path: Path) -> None:
        base, base_data = written_parent(tmp_path)
        (tmp_path / "sub").mkdir()
        child = str(tmp_path / "sub" / "child.vhd")
        snapshot(child, base)
        C.set_parent(child, os.path.realpath(base))
        with VhdImage.open(child) as img:
            assert {n for _, _, n in img.parent_locator_names()} == {os.path.realpath(base)}
        assert disk(child) == base_data

    def test_snapshot_over_fixed_parent(self, tmp_path: Path) -> None:
        base = str(tmp_path / "fixed.vhd")
        create(base, 8 * MiB, fixed=True)
        data = pattern(8 * MiB, 4)
        with Chain.open(named(base), writable=True) as chain:
            chain.pwrite(0, data)
        child = str(tmp_path / "child.vhd")
        snapshot(child, base)
        with Chain.open(named(child), writable=True) as chain:
            chain.pwrite(100, b"c" * 100)
        assert disk(child) == data[:100] + b"c" * 100 + data[200:]

    def test_snapshot_of_empty_child_of_raw(self, tmp_path: Path) -> None:
        raw = tmp_path / "raw.img"
        data = pattern(4 * MiB, 21)
        raw.write_bytes(data)
        empty = str(tmp_path / "empty.vhd")
        snapshot(empty, str(raw), raw_parent=True)
        leaf = str(tmp_path / "leaf.vhd")
        used = snapshot(leaf, empty)
        with VhdImage.open(leaf) as img:
            assert img.parent_path() == used
            if used == os.path.realpath(raw):
                assert img.parent_is_raw
        assert disk(leaf) == data

    def test_wrong_parent_uuid(self, tmp_path: Path) -> None:
        base, _ = written_parent(tmp_path)
        child = str(tmp_path / "child.vhd")
        snapshot(child, base)
        os.unlink(base)
        create(base, 16 * MiB)  # same name, another disk
        with pytest.raises(ChainError, match="uuid"):
            Chain.open(named(child))
        with Chain.open(named(child), check_parent_uuid=False) as chain:
            assert len(chain) == 2

    def test_flush_and_reopen(self, tmp_path: Path) -> None:
        path = new_dynamic(tmp_path)
        chain = Chain.open(named(path), writable=True)
        try:
            chain.pwrite(BLOCK, pattern(BLOCK, 5))
            chain.flush()
            with VhdImage.open(path, footer="primary") as img:
                assert img.block_full(1)
            assert disk(path)[BLOCK : 2 * BLOCK] == pattern(BLOCK, 5)
        finally:
            chain.close()


# ======================================================================================
# The reference fixtures


SHA_IMAGES = {
    "base": "base.vhd", "cbase": "cbase.vhd", "cchild": "cchild.vhd", "data": "data.vhd",
    "empty": "empty.vhd", "fixed": "fixed.vhd", "flags": "flags.vhd",
    "prealloc": "prealloc.vhd", "raw-parent": "raw-parent.img", "rawchild": "rawchild.vhd",
    "resized": "resized.vhd", "snap1": "snap1.vhd", "snap2": "snap2.vhd",
}


def chain_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Chain.open(named(path)) as chain:
        step = 8192
        for sector in range(0, chain.sectors, step):
            digest.update(chain.read(sector, min(step, chain.sectors - sector)))
    return digest.hexdigest()


def test_every_reference_hash_is_covered(reference_dir: Path) -> None:
    names = {p.name[: -len(".sha256")] for p in (reference_dir / "expect").glob("*.sha256")}
    assert names == set(SHA_IMAGES)


@pytest.mark.parametrize("name", sorted(SHA_IMAGES))
def test_reference_sha256(reference_dir: Path, name: str) -> None:
    want = (reference_dir / "expect" / f"{name}.sha256").read_text().split()[0]
    assert chain_sha256(reference_dir / SHA_IMAGES[name]) == want


@pytest.mark.parametrize("name", sorted(n for n in SHA_IMAGES if n not in ("fixed",
                                                                            "raw-parent")))
def test_reference_allocation_bitmap(reference_dir: Path, name: str) -> None:
    """`vhd-util read -B` printed which blocks the BAT allocates: one bit per block
    (floor(curr_size / block_size) bits, MSB first, padded to a byte)."""
    want = (reference_dir / "expect" / f"{name}.bitmap").read_text().strip()
    with VhdImage.open(str(reference_dir / SHA_IMAGES[name])) as img:
        nbits = img.size // img.block_size
        bits = bytearray(-(-nbits // 8))
        for blk in range(nbits):
            if img.bat[blk] != s.BAT_ENTRY_UNUSED:
                bits[blk >> 3] |= 0x80 >> (blk & 7)
        assert bits.hex() == want


def test_reference_batmap(reference_dir: Path) -> None:
    """base.vhd's batmap marks its fully written blocks 0, 1 and 10."""
    with VhdImage.open(str(reference_dir / "base.vhd")) as img:
        assert img.batmap_valid
        assert img.batmap[:3].hex() == "c02000"
        assert [b for b in range(24) if img.block_full(b)] == [0, 1, 10]
    with VhdImage.open(str(reference_dir / "data.vhd")) as img:
        assert img.batmap_valid and not any(img.batmap)


def test_reference_big(reference_dir: Path) -> None:
    """The 2040 GiB disk: open it, read its ends, and see the whole disk is one hole."""
    with Chain.open(named(reference_dir / "big.vhd")) as chain:
        assert chain.size == 2040 << 30
        assert chain.read(0, 8) == bytes(4096)
        assert chain.read(chain.sectors - 8, 8) == bytes(4096)
        assert chain.map() == [Extent(0, 2040 << 30, None)]
        assert chain.leaf.header.max_bat_size == 1044480


def test_reference_chains(reference_dir: Path) -> None:
    with Chain.open(named(reference_dir / "snap2.vhd")) as chain:
        assert [os.path.basename(layer.path) for layer in chain.layers] == [
            "snap2.vhd", "snap1.vhd", "base.vhd"]
    with Chain.open(named(reference_dir / "rawchild.vhd")) as chain:
        assert isinstance(chain.layers[1], RawImage)
        assert chain.layers[1].path.endswith("raw-parent.img")


def test_snapshot_of_reference(reference_dir: Path, tmp_path: Path) -> None:
    """We can snapshot a reference image and write over it without changing it."""
    base = tmp_path / "snap2.vhd"
    for name in ("base.vhd", "snap1.vhd", "snap2.vhd"):
        shutil.copy(reference_dir / name, tmp_path / name)
    before = disk(base)
    leaf = str(tmp_path / "leaf.vhd")
    snapshot(leaf, str(base))
    with Chain.open(named(leaf), writable=True) as chain:
        assert len(chain) == 4
        chain.pwrite(12345, b"L" * 7000)
    expect = bytearray(before)
    expect[12345:19345] = b"L" * 7000
    assert disk(leaf) == expect
    assert disk(base) == before
