"""Interoperability with a real peer: qemu-img and qemu-io (qemu's "vpc" driver).

Both ways: qemu reads the images we create and write, and we read (and write) the images
qemu creates and writes. Every comparison is also made against an independent shadow of
the expected bytes, so that two readers agreeing on a wrong answer cannot pass.

What qemu does differently, documented here by assertions:
- ``qemu-img check`` has no vpc support (exit status 63);
- qemu does not follow the parent locator of a differencing VHD: it reads the child alone,
  with zeros where the child holds nothing;
- qemu ignores the sector bitmaps when reading, so an allocated block's unwritten sectors
  must hold zeros in the file (a writer must not leave stale bytes there).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest

import corrupt as C
from blktap.image import Chain, VhdImage
from blktap.image.vhd import create, snapshot
from blktap.image.vhd import structs as s
from conftest import named, need, run

pytestmark = pytest.mark.interop

MiB = 1 << 20
BLOCK = 2 * MiB


@pytest.fixture(scope="module")
def qemu_img() -> str:
    return need("qemu-img")


@pytest.fixture(scope="module")
def qemu_io() -> str:
    return need("qemu-io")


def qemu_raw(qemu_img: str, path: str | Path, tmp_path: Path) -> bytes:
    out = tmp_path / (Path(path).name + ".qemu.raw")
    if out.exists():
        out.unlink()
    res = run([qemu_img, "convert", "-f", "vpc", "-O", "raw", str(path), str(out)])
    assert res.returncode == 0, res.stderr
    data = out.read_bytes()
    out.unlink()
    return data


def qemu_info(qemu_img: str, path: str | Path) -> dict:
    res = run([qemu_img, "info", "-f", "vpc", "--output=json", str(path)], text=True)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def qemu_compare(qemu_img: str, vhd: str | Path, raw: str | Path) -> None:
    res = run([qemu_img, "compare", "-f", "vpc", "-F", "raw", str(vhd), str(raw)], text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Images are identical" in res.stdout


def qemu_write(qemu_io: str, path: str | Path, *commands: str) -> None:
    argv = [qemu_io, "-f", "vpc"]
    for cmd in commands:
        argv += ["-c", cmd]
    res = run(argv + [str(path)], text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "error" not in (res.stdout + res.stderr).lower(), res.stdout + res.stderr


def ours(path: str | Path) -> bytes:
    with Chain.open(named(path)) as chain:
        return chain.pread(0, chain.size)


def random_writes(chain: Chain, shadow: bytearray, seed: int, count: int = 12) -> None:
    """Writes at random places: some unaligned, some crossing blocks, one whole block."""
    rng = random.Random(seed)
    size = len(shadow)
    for i in range(count):
        if i == 0:
            offset, length = BLOCK * rng.randrange(size // BLOCK), BLOCK
        else:
            length = rng.choice([1, 511, 512, 4096, 70000, BLOCK // 2 + 3])
            offset = rng.randrange(0, size - length + 1)
            if i % 3 == 0:
                offset -= offset % 512
                length = max(512, length - length % 512)
                offset = min(offset, size - length)
        data = rng.randbytes(length)
        chain.pwrite(offset, data)
        shadow[offset : offset + length] = data
    # One write straddling a block boundary, and one at the very end of the disk.
    for offset, length in ((BLOCK - 700, 1400), (size - 513, 513)):
        data = rng.randbytes(length)
        chain.pwrite(offset, data)
        shadow[offset : offset + length] = data


# ======================================================================================
# (a) qemu reads what we write


def test_qemu_img_check_has_no_vpc_support(qemu_img: str, tmp_path: Path) -> None:
    """`qemu-img check` cannot check vpc images (so we use `qemu-img compare`)."""
    path = tmp_path / "d.vhd"
    create(str(path), 4 * MiB)
    res = run([qemu_img, "check", "-f", "vpc", str(path)], text=True)
    assert res.returncode == 63
    assert "This image format does not support checks" in res.stderr


@pytest.mark.parametrize("fixed", [False, True], ids=["dynamic", "fixed"])
def test_qemu_reads_our_empty_image(qemu_img: str, tmp_path: Path, fixed: bool) -> None:
    path = tmp_path / "e.vhd"
    create(str(path), 24 * MiB, fixed=fixed)
    info = qemu_info(qemu_img, path)
    assert info["virtual-size"] == 24 * MiB
    assert info["format"] == "vpc"
    assert qemu_raw(qemu_img, path, tmp_path) == bytes(24 * MiB)


@pytest.mark.parametrize("fixed", [False, True], ids=["dynamic", "fixed"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_qemu_reads_our_writes(qemu_img: str, tmp_path: Path, fixed: bool, seed: int) -> None:
    size = 20 * MiB
    path = tmp_path / "w.vhd"
    create(str(path), size, fixed=fixed)
    shadow = bytearray(size)
    with Chain.open(named(path), writable=True) as chain:
        random_writes(chain, shadow, seed)
    assert ours(path) == shadow
    assert qemu_raw(qemu_img, path, tmp_path) == shadow
    assert qemu_info(qemu_img, path)["virtual-size"] == size
    expect = tmp_path / "expect.raw"
    expect.write_bytes(shadow)
    qemu_compare(qemu_img, path, expect)


def test_qemu_reads_prealloc_image(qemu_img: str, tmp_path: Path) -> None:
    """A BAT sized for more than the disk (prealloc) does not confuse qemu."""
    path = tmp_path / "p.vhd"
    create(str(path), 8 * MiB, prealloc_size=256 * MiB)
    shadow = bytearray(8 * MiB)
    with Chain.open(named(path), writable=True) as chain:
        random_writes(chain, shadow, 9, count=5)
    assert qemu_info(qemu_img, path)["virtual-size"] == 8 * MiB
    assert qemu_raw(qemu_img, path, tmp_path) == shadow


def test_qemu_reads_differencing_child_alone(qemu_img: str, tmp_path: Path) -> None:
    """qemu's vpc driver does not follow parent locators: it reads a differencing VHD
    as if its parent were all zeros. What it reads must be exactly the child's own
    sectors, which we compute by reading the child as a one-layer chain."""
    base = tmp_path / "base.vhd"
    create(str(base), 16 * MiB)
    with Chain.open(named(base), writable=True) as chain:
        chain.pwrite(0, random.Random(5).randbytes(16 * MiB))
    child = tmp_path / "child.vhd"
    snapshot(str(child), str(base))
    child_only = bytearray(16 * MiB)
    with Chain.open(named(child), writable=True) as chain:
        for offset, length in ((1000, 3000), (BLOCK * 3, BLOCK), (9 * MiB + 512, 512)):
            data = random.Random(offset).randbytes(length)
            chain.pwrite(offset, data)
            first = offset // 512 * 512
            last = -(-(offset + length) // 512) * 512
            # An unaligned write merges whole sectors from the parent into the child.
            child_only[first:last] = chain.pread(first, last - first)
    with Chain([VhdImage.open(str(child))]) as alone:
        assert alone.pread(0, alone.size) == child_only
    assert qemu_raw(qemu_img, child, tmp_path) == child_only
    assert qemu_info(qemu_img, child)["virtual-size"] == 16 * MiB


def test_qemu_reads_largest_disk(qemu_img: str, qemu_io: str, tmp_path: Path) -> None:
    """2040 GiB, written at both ends: qemu agrees on the size and the data."""
    size = 2040 << 30
    path = tmp_path / "big.vhd"
    create(str(path), size)
    with Chain.open(named(path), writable=True) as chain:
        chain.pwrite(size - 700, b"\x7a" * 700)
        chain.pwrite(0, b"\x79" * 10)
    assert qemu_info(qemu_img, path)["virtual-size"] == size
    res = run([qemu_io, "-f", "vpc", "-r", "-c", f"read -P 0x7a {size - 700} 700",
               "-c", "read -P 0x79 0 10", "-c", f"read -P 0 {size - 4096} 3396",
               "-c", "read -P 0 10 502", str(path)], text=True)
    assert res.returncode == 0 and "Pattern verification failed" not in res.stdout, \
        res.stdout + res.stderr


def test_allocated_blocks_hold_zeros_where_unwritten(qemu_img: str, tmp_path: Path) -> None:
    """A writer that died after writing data past the footer but before the BAT update
    leaves stale bytes where the next block will go. qemu reads unwritten sectors of an
    allocated block straight from the file, so the next allocation must zero them."""
    path = tmp_path / "s.vhd"
    create(str(path), 16 * MiB)
    with Chain.open(named(path), writable=True) as chain:
        chain.pwrite(0, b"a" * 512)
    size = os.path.getsize(path)
    footer = Path(path).read_bytes()[-512:]
    with open(path, "r+b") as f:  # stale data over the footer and beyond, a new footer
        f.seek(size - 512)
        f.write(b"\xee" * (BLOCK + 8192))
        f.write(footer)
    with Chain.open(named(path), writable=True) as chain:
        chain.pwrite(5 * BLOCK + 512 * 7, b"b" * 512)
    shadow = bytearray(16 * MiB)
    shadow[:512] = b"a" * 512
    shadow[5 * BLOCK + 512 * 7 : 5 * BLOCK + 512 * 8] = b"b" * 512
    assert ours(path) == shadow
    assert qemu_raw(qemu_img, path, tmp_path) == shadow


# ======================================================================================
# (b) we read what qemu writes


QEMU_WRITES = (
    ("write -P 0xab 1M 64k", 1 * MiB, 64 * 1024, 0xAB),
    ("write -P 0xcd 4193792 1024", 4193792, 1024, 0xCD),  # across the 4 MiB block border
    ("write -P 0xef 0 512", 0, 512, 0xEF),
    ("write -P 0x11 9M 2M", 9 * MiB, 2 * MiB, 0x11),  # not block aligned, 2 blocks
    ("write -P 0x22 6M 2M", 6 * MiB, 2 * MiB, 0x22),  # exactly one block
)


def qemu_image(qemu_img: str, qemu_io: str, path: Path, subformat: str, size: str,
               force_size: bool) -> bytearray:
    opts = f"subformat={subformat}" + (",force_size=on" if force_size else "")
    res = run([qemu_img, "create", "-f", "vpc", "-o", opts, str(path), size], text=True)
    assert res.returncode == 0, res.stderr
    vsize = qemu_info(qemu_img, path)["virtual-size"]
    shadow = bytearray(vsize)
    cmds = []
    for cmd, offset, length, byte in QEMU_WRITES:
        cmds.append(cmd)
        shadow[offset : offset + length] = bytes([byte]) * length
    cmds.append(f"write -P 0x33 {vsize - 4096} 4096")
    shadow[vsize - 4096 :] = b"\x33" * 4096
    qemu_write(qemu_io, path, *cmds)
    return shadow


QEMU_KINDS = [
    ("dynamic", "30M", False),  # creator "qemu": the size is rounded up to CHS geometry
    ("dynamic", "30M", True),  # creator "qem2": the exact size
    ("dynamic", "16M", True),
    ("fixed", "16M", True),
    ("fixed", "20M", False),
]


@pytest.mark.parametrize(("subformat", "size", "force"), QEMU_KINDS,
                         ids=[f"{a}-{b}-{'force' if c else 'chs'}" for a, b, c in QEMU_KINDS])
def test_we_read_qemu_images(qemu_img: str, qemu_io: str, tmp_path: Path, subformat: str,
                             size: str, force: bool) -> None:
    path = tmp_path / "q.vhd"
    shadow = qemu_image(qemu_img, qemu_io, path, subformat, size, force)
    with VhdImage.open(str(path)) as img:
        assert img.size == len(shadow), "same virtual size as qemu-img info"
        assert img.is_fixed == (subformat == "fixed")
        assert img.footer.crtr_app == (b"qem2" if force else b"qemu")
    assert ours(path) == shadow
    assert qemu_raw(qemu_img, path, tmp_path) == shadow


@pytest.mark.parametrize("force", [False, True], ids=["chs", "force"])
def test_we_write_qemu_dynamic_image(qemu_img: str, qemu_io: str, tmp_path: Path,
                                     force: bool) -> None:
    """We write into a qemu-made dynamic image (no batmap, qemu's own block placement),
    qemu reads our writes, writes more itself, and we read everything back."""
    path = tmp_path / "q.vhd"
    shadow = qemu_image(qemu_img, qemu_io, path, "dynamic", "30M", force)
    before = C.allocated(str(path))
    with Chain.open(named(path), writable=True) as chain:
        random_writes(chain, shadow, 42, count=8)
        chain.pwrite(1 * MiB + 100, b"\x77" * 200)  # into a block qemu allocated
        shadow[1 * MiB + 100 : 1 * MiB + 300] = b"\x77" * 200
    after = dict(C.allocated(str(path)))
    for index, sector in before:
        assert after[index] == sector, "qemu's blocks stay where they were"
    assert ours(path) == shadow
    assert qemu_raw(qemu_img, path, tmp_path) == shadow
    expect = tmp_path / "expect.raw"
    expect.write_bytes(shadow)
    qemu_compare(qemu_img, path, expect)
    # And once more the other way round.
    qemu_write(qemu_io, path, "write -P 0x5a 20M 3M", "write -P 0x5b 777k 1k")
    shadow[20 * MiB : 23 * MiB] = b"\x5a" * (3 * MiB)
    shadow[777 * 1024 : 778 * 1024] = b"\x5b" * 1024
    assert ours(path) == shadow
    foot = C.read_footer(str(path))
    assert foot.checksum == foot.compute_checksum()
    assert foot.cookie == s.FOOTER_COOKIE


def test_we_read_qemu_convert_output(qemu_img: str, tmp_path: Path) -> None:
    """`qemu-img convert -O vpc` from a raw file, both subformats."""
    raw = tmp_path / "src.raw"
    data = bytearray(12 * MiB)
    rng = random.Random(8)
    for _ in range(10):
        off = rng.randrange(0, len(data) - 70000)
        data[off : off + 70000] = rng.randbytes(70000)
    raw.write_bytes(data)
    for subformat in ("dynamic", "fixed"):
        out = tmp_path / f"{subformat}.vhd"
        res = run([qemu_img, "convert", "-f", "raw", "-O", "vpc", "-o",
                   f"subformat={subformat},force_size=on", str(raw), str(out)], text=True)
        assert res.returncode == 0, res.stderr
        assert ours(out) == data


# ======================================================================================
# The reference fixtures, as a third party sees them


REFERENCE_STANDALONE = ["base", "cbase", "data", "empty", "fixed", "flags", "prealloc",
                        "resized"]


@pytest.mark.parametrize("name", REFERENCE_STANDALONE)
def test_qemu_agrees_on_reference_images(qemu_img: str, reference_dir: Path, tmp_path: Path,
                                         name: str) -> None:
    """qemu reads the images the C blktap made exactly as the reference tapdisk did."""
    path = reference_dir / f"{name}.vhd"
    want = (reference_dir / "expect" / f"{name}.sha256").read_text().split()[0]
    assert hashlib.sha256(qemu_raw(qemu_img, path, tmp_path)).hexdigest() == want
    assert hashlib.sha256(ours(path)).hexdigest() == want


def test_we_write_reference_image_qemu_reads(qemu_img: str, reference_dir: Path,
                                             tmp_path: Path) -> None:
    """Writing into a copy of the reference data.vhd (tapdisk's block layout and batmap)."""
    path = tmp_path / "data.vhd"
    shutil.copy(reference_dir / "data.vhd", path)
    shadow = bytearray(ours(path))
    with Chain.open(named(path), writable=True) as chain:
        random_writes(chain, shadow, 77, count=10)
    assert ours(path) == shadow
    assert qemu_raw(qemu_img, path, tmp_path) == shadow
