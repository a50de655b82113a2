"""Property tests: random sequences of writes through a Chain match a flat shadow copy.

Each example writes at random offsets and lengths (unaligned ones through
``Chain.pwrite``, sector writes through ``Chain.write``, writes that cross block borders,
whole blocks, runs of zeros, and close/reopen in the middle), then checks the disk against
the shadow, reopens it and checks again, checks the file's metadata invariants, and has
qemu-img read it too.

qemu's vpc driver does not follow parent locators: for a differencing leaf it reads the
child alone (zeros where the child holds nothing), so that is what it is compared with.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blktap.image import Chain, VhdImage
from blktap.image.vhd import bitmap as bm
from blktap.image.vhd import create, snapshot
from blktap.image.vhd import structs as s
from conftest import named

MiB = 1 << 20
BLOCK = 2 * MiB
SIZE = 16 * MiB
SECTORS = SIZE // 512
NBLOCKS = SIZE // BLOCK

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])

seeds = st.integers(0, 2**32 - 1)
ops = st.one_of(
    # Any bytes at any offset (clamped to the disk): mostly unaligned.
    st.tuples(st.just("pwrite"), st.integers(0, SIZE - 1), st.integers(1, BLOCK + 4096), seeds),
    # Whole sectors.
    st.tuples(st.just("sectors"), st.integers(0, SECTORS - 1), st.integers(1, 4200), seeds),
    # Around a block border: so many bytes before it and after it.
    st.tuples(st.just("cross"), st.integers(1, NBLOCKS - 1), st.integers(1, 9000),
              st.integers(1, 9000), seeds),
    # A whole block (fills the bitmap: the batmap bit gets set).
    st.tuples(st.just("block"), st.integers(0, NBLOCKS - 1), seeds),
    st.tuples(st.just("reopen")),
)


def payload(length: int, seed: int) -> bytes:
    if seed % 5 == 0:
        return bytes(length)  # zeros must still hide the parent
    return random.Random(seed).randbytes(length)


def apply(chain: Chain, shadow: bytearray, op: tuple) -> tuple[int, int]:
    """Perform one write on the chain and the shadow; returns the range written."""
    kind = op[0]
    if kind == "pwrite":
        _, offset, length, seed = op
        length = min(length, SIZE - offset)
        data = payload(length, seed)
        chain.pwrite(offset, data)
    elif kind == "sectors":
        _, sector, count, seed = op
        count = min(count, SECTORS - sector)
        offset, length = sector * 512, count * 512
        data = payload(length, seed)
        chain.write(sector, data)
    elif kind == "cross":
        _, border, before, after, seed = op
        offset, length = border * BLOCK - before, before + after
        data = payload(length, seed)
        chain.pwrite(offset, data)
    elif kind == "block":
        _, blk, seed = op
        offset, length = blk * BLOCK, BLOCK
        data = payload(length, seed)
        chain.write(blk * (BLOCK // 512), data)
    else:
        raise AssertionError(op)
    shadow[offset : offset + length] = data
    return offset, length


def run_ops(leaf: str, shadow: bytearray, sequence: list[tuple]) -> None:
    chain = Chain.open(named(leaf), writable=True)
    try:
        for op in sequence:
            if op[0] == "reopen":
                chain.close()
                chain = Chain.open(named(leaf), writable=True)
                continue
            offset, length = apply(chain, shadow, op)
            # The bytes just written, and a margin around them, read back at once.
            lo, hi = max(0, offset - 1024), min(SIZE, offset + length + 1024)
            assert chain.pread(lo, hi - lo) == shadow[lo:hi]
        assert chain.pread(0, SIZE) == shadow
    finally:
        chain.close()


def check_file(path: str) -> None:
    """Metadata invariants of a closed dynamic/differencing VHD we wrote."""
    data = Path(path).read_bytes()
    assert data[:512] == data[-512:], "backup footer equals the primary"
    foot = s.Footer.unpack(data[-512:])
    assert foot.checksum == foot.compute_checksum()
    with VhdImage.open(path, footer="primary") as img:
        assert img.footer_source == "primary"
        assert img.batmap_valid, "the batmap checksum is right after close"
        spb = img.spb
        ends = []
        for blk, entry in enumerate(img.bat):
            if entry == s.BAT_ENTRY_UNUSED:
                assert not bm.test_bit(img.batmap, blk)
                continue
            assert (entry + img.bitmap_secs) % 8 == 0, "data part 4 KiB aligned"
            bitmap = img.bitmap(blk)
            assert bm.test_bit(img.batmap, blk) == bm.all_set(bitmap, spb)
            ends.append((entry + img.bitmap_secs + spb) * 512)
        assert len(data) == max(ends, default=img.end_of_metadata()) + 512


def qemu_convert(src: str, dst: str) -> bytes | None:
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        return None
    subprocess.run([qemu_img, "convert", "-f", "vpc", "-O", "raw", src, dst], check=True,
                   capture_output=True, timeout=120)
    out = Path(dst).read_bytes()
    os.unlink(dst)
    return out


@pytest.fixture(scope="module")
def parent(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes]:
    """A 16 MB dynamic parent with data in most blocks, some holes and some partial
    blocks (shared, never written by the tests)."""
    path = str(tmp_path_factory.mktemp("parent") / "parent.vhd")
    create(path, SIZE)
    shadow = bytearray(SIZE)
    rng = random.Random(1234)
    with Chain.open(named(path), writable=True) as chain:
        for blk in (0, 1, 3, 4, 6):
            chain.write(blk * (BLOCK // 512), rng.randbytes(BLOCK))
            shadow[blk * BLOCK : (blk + 1) * BLOCK] = chain.pread(blk * BLOCK, BLOCK)
        for offset, length in ((5 * BLOCK + 4096, 8192), (7 * BLOCK + 1000, 300000)):
            data = rng.randbytes(length)
            chain.pwrite(offset, data)
            shadow[offset : offset + length] = data
    return path, bytes(shadow)


@SETTINGS
@given(sequence=st.lists(ops, min_size=1, max_size=12))
def test_dynamic_disk_matches_shadow(sequence: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        leaf = os.path.join(tmp, "leaf.vhd")
        create(leaf, SIZE)
        shadow = bytearray(SIZE)
        run_ops(leaf, shadow, sequence)
        with Chain.open(named(leaf)) as chain:
            assert chain.pread(0, SIZE) == shadow
        check_file(leaf)
        converted = qemu_convert(leaf, os.path.join(tmp, "out.raw"))
        if converted is not None:
            assert converted == shadow


@SETTINGS
@given(sequence=st.lists(ops, min_size=1, max_size=12))
def test_differencing_child_matches_shadow(parent: tuple[str, bytes],
                                           sequence: list[tuple]) -> None:
    parent_path, parent_data = parent
    with tempfile.TemporaryDirectory() as tmp:
        leaf = os.path.join(tmp, "leaf.vhd")
        snapshot(leaf, parent_path)
        shadow = bytearray(parent_data)
        run_ops(leaf, shadow, sequence)
        with Chain.open(named(leaf)) as chain:
            assert len(chain) == 2
            assert chain.pread(0, SIZE) == shadow
        check_file(leaf)
        # The child's own sectors: what it holds, zeros elsewhere (qemu's view).
        with Chain([VhdImage.open(leaf)]) as alone:
            child_only = alone.pread(0, SIZE)
            for ext in alone.map():
                if ext.depth == 0:
                    assert child_only[ext.offset : ext.offset + ext.length] == \
                        shadow[ext.offset : ext.offset + ext.length]
                else:
                    assert not any(child_only[ext.offset : ext.offset + ext.length])
        converted = qemu_convert(leaf, os.path.join(tmp, "out.raw"))
        if converted is not None:
            assert converted == child_only
    with Chain.open(named(parent_path)) as chain:
        assert chain.pread(0, SIZE) == parent_data, "the parent is never written"


@SETTINGS
@given(sequence=st.lists(ops.filter(lambda op: op[0] != "block"), min_size=1, max_size=10))
def test_fixed_disk_matches_shadow(sequence: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        leaf = os.path.join(tmp, "leaf.vhd")
        create(leaf, SIZE, fixed=True)
        footer = Path(leaf).read_bytes()[-512:]
        shadow = bytearray(SIZE)
        run_ops(leaf, shadow, sequence)
        data = Path(leaf).read_bytes()
        assert data[:SIZE] == shadow and data[SIZE:] == footer
        converted = qemu_convert(leaf, os.path.join(tmp, "out.raw"))
        if converted is not None:
            assert converted == shadow
