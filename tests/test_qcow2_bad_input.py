"""The qcow2 bad-input catalogue: each damaged image is refused with one clear BlktapError
(never a struct.error or IndexError), and the file is left exactly as it was."""

from __future__ import annotations

import errno
import hashlib
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from blktap.errors import (
    BlktapError,
    FormatError,
    ParentLoop,
    ParentNotAllowed,
    ProbedParent,
    UnsupportedImage,
)
from blktap.image.chain import Chain
from blktap.image.parents import ParentPolicy
from blktap.image.qcow2 import structs as s
from blktap.image.qcow2.check import check
from blktap.image.qcow2.create import create
from blktap.image.qcow2.image import Qcow2Image
from conftest import run, tool
from qcow2_helpers import MiB, qemu_check, qemu_img, qemu_io


def run_blktap(*args: object) -> tuple[int, str, str]:
    proc = run([tool("blktap"), *map(str, args)], text=True, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def patch(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def base_image(tmp: Path, **kw: object) -> Path:
    img = tmp / "bad.qcow2"
    create(str(img), 4 * MiB, **kw)  # type: ignore[arg-type]
    with Chain.open(f"qcow2:{img}", writable=True) as chain:
        chain.write(0, b"\x5a" * 65536)
    return img


def header_of(path: Path) -> s.Header:
    return s.Header.unpack(path.read_bytes()[:4096])


def refuse(path: Path, exc: type[BlktapError], words: str, *,
           action: Callable[[], object] | None = None) -> None:
    before = digest(path)
    for writable in (False, True):
        with pytest.raises(exc) as info:
            if action is not None:
                action()
            else:
                with Chain.open(f"qcow2:{path}", writable=writable) as chain:
                    chain.read(0, chain.sectors)
        assert words in str(info.value), str(info.value)
        assert digest(path) == before


def test_l1_table_past_end_of_file(tmp_path: Path) -> None:
    img = base_image(tmp_path)
    patch(img, s.OFF_L1_TABLE, struct.pack(">Q", 1 << 40))
    refuse(img, FormatError, "L1 table")


def test_overlapping_metadata(tmp_path: Path) -> None:
    img = base_image(tmp_path)
    h = header_of(img)
    patch(img, s.OFF_L1_TABLE, struct.pack(">Q", h.refcount_table_offset))
    refuse(img, FormatError, "overlaps")


def test_l1_table_over_the_header(tmp_path: Path) -> None:
    img = base_image(tmp_path)
    patch(img, s.OFF_L1_TABLE, struct.pack(">Q", 0))
    refuse(img, FormatError, "header")


@pytest.mark.parametrize("bits", [8, 22, 63])
def test_cluster_bits_out_of_range(tmp_path: Path, bits: int) -> None:
    img = base_image(tmp_path)
    patch(img, 20, struct.pack(">I", bits))
    refuse(img, FormatError, f"cluster_bits {bits}")


def test_backing_name_too_long(tmp_path: Path) -> None:
    img = tmp_path / "child.qcow2"
    create(str(img), MiB, backing_file="base.raw", backing_fmt="raw")
    (tmp_path / "base.raw").write_bytes(bytes(MiB))
    patch(img, 16, struct.pack(">I", 1024))
    refuse(img, FormatError, "1023")


def test_refcount_order_too_large(tmp_path: Path) -> None:
    img = base_image(tmp_path)
    patch(img, 96, struct.pack(">I", 7))
    refuse(img, FormatError, "refcount_order 7")


def test_backing_chain_loop(tmp_path: Path) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    (tmp_path / "seed.raw").write_bytes(bytes(MiB))
    create(str(a), MiB, backing_file="b.qcow2", backing_fmt="qcow2")
    create(str(b), MiB, backing_file="a.qcow2", backing_fmt="qcow2")
    before = digest(a), digest(b)
    with pytest.raises(ParentLoop):
        Chain.open(f"qcow2:{a}")
    assert (digest(a), digest(b)) == before


def test_backing_chain_self_loop(tmp_path: Path) -> None:
    a = tmp_path / "a.qcow2"
    create(str(a), MiB, backing_file="a.qcow2", backing_fmt="qcow2")
    refuse(a, ParentLoop, "loops")


def test_compressed_cluster_that_does_not_inflate(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(b"compress me " * (MiB // 12) + bytes(MiB % 12))
    img = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", src, img)
    with Qcow2Image.open(str(img)) as q:
        entry, _ = q._entry(0)
        coff, clen = q.compressed_span(entry)
    patch(img, coff, b"\xff" * min(clen, 64))
    refuse(img, FormatError, "does not inflate")


def test_unknown_incompatible_feature_named(tmp_path: Path) -> None:
    img = base_image(tmp_path)
    raw = img.read_bytes()
    table = s.pack_feature_names(s.FEATURE_NAME_TABLE)
    where = raw.index(table)
    patch(img, where, struct.pack(">BB46s", 0, 5, b"frobnicated blocks"))
    h = header_of(img)
    patch(img, s.OFF_INCOMPAT, struct.pack(">Q", h.incompatible_features | 1 << 5 | 1 << 9))
    refuse(img, UnsupportedImage, "bit 5 (frobnicated blocks), bit 9")


def test_l2_table_past_end_of_file(tmp_path: Path) -> None:
    img = base_image(tmp_path)
    h = header_of(img)
    patch(img, h.l1_table_offset, struct.pack(">Q", (1 << 40) | s.OFLAG_COPIED))
    refuse(img, FormatError, "past the end of the file")


def test_refcount_block_past_end_of_file(tmp_path: Path) -> None:
    img = base_image(tmp_path)
    h = header_of(img)
    patch(img, h.refcount_table_offset, struct.pack(">Q", 1 << 40))
    before = digest(img)
    with pytest.raises(FormatError, match="refcount block"):
        Chain.open(f"qcow2:{img}", writable=True)
    assert digest(img) == before


def test_encrypted_refused(tmp_path: Path) -> None:
    img = base_image(tmp_path)
    patch(img, 32, struct.pack(">I", 1))
    refuse(img, UnsupportedImage, "encrypted")


def test_bad_header_length(tmp_path: Path) -> None:
    img = base_image(tmp_path)
    patch(img, 100, struct.pack(">I", 107))
    refuse(img, FormatError, "header_length")


def test_corrupt_bit_refuses_writes_only(tmp_path: Path) -> None:
    img = base_image(tmp_path)
    h = header_of(img)
    patch(img, s.OFF_INCOMPAT, struct.pack(">Q", h.incompatible_features | s.INCOMPAT_CORRUPT))
    before = digest(img)
    with Chain.open(f"qcow2:{img}") as chain:
        assert chain.read(0, 1) == b"\x5a" * 512
    with pytest.raises(FormatError, match="corrupt"):
        Chain.open(f"qcow2:{img}", writable=True)
    assert digest(img) == before


def test_dirty_image_is_repaired_before_writing(tmp_path: Path) -> None:
    img = base_image(tmp_path, lazy_refcounts=True)
    h = header_of(img)
    patch(img, s.OFF_INCOMPAT, struct.pack(">Q", h.incompatible_features | s.INCOMPAT_DIRTY))
    before = digest(img)
    with pytest.raises(FormatError, match="dirty"):
        Chain.open(f"qcow2:{img}", writable=True)
    assert digest(img) == before
    res = check(str(img), repair="all")
    assert res.exit_code == 0
    assert not header_of(img).incompatible_features & s.INCOMPAT_DIRTY
    assert qemu_check(img)[0] == 0
    with Chain.open(f"qcow2:{img}", writable=True) as chain:
        chain.write(100, b"\1" * 512)


def test_refcount_overflow_refused_by_repair(tmp_path: Path) -> None:
    """Two L1 entries share one L2 table in an image with 1-bit refcounts: the references
    (two) cannot be counted, so repair refuses without touching the file."""
    img = tmp_path / "o.qcow2"
    create(str(img), 1 << 30, refcount_bits=1)
    with Chain.open(f"qcow2:{img}", writable=True) as chain:
        chain.write(0, b"\1" * 4096)
    h = header_of(img)
    first = img.read_bytes()[h.l1_table_offset : h.l1_table_offset + 8]
    patch(img, h.l1_table_offset + 8, first)
    res = check(str(img))
    assert res.exit_code == 2
    assert qemu_check(img)[0] == 2
    before = digest(img)
    with pytest.raises(FormatError, match="1-bit refcounts"):
        check(str(img), repair="all")
    assert digest(img) == before


def test_zstd_without_the_package(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(b"zstd data " * (MiB // 10) + bytes(MiB % 10))
    img = tmp_path / "z.qcow2"
    res = qemu_img("convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", src, img,
                   ok=False)
    if not img.exists():
        pytest.skip(f"qemu-img cannot write zstd: {res}")
    try:
        import zstandard  # noqa: F401, PLC0415
    except ImportError:
        refuse(img, UnsupportedImage, "zstandard")
    else:
        with Chain.open(f"qcow2:{img}") as chain:
            assert chain.read(0, chain.sectors) == src.read_bytes()


def test_qemu_snapshot_check_agrees(tmp_path: Path) -> None:
    img = tmp_path / "snap.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "2M")
    qemu_io(img, "write -P 1 0 1M")
    qemu_img("snapshot", "-c", "s1", img)
    assert check(str(img)).exit_code == qemu_check(img)[0] == 0


def test_probed_qcow2_does_not_follow_its_backing_file(tmp_path: Path) -> None:
    """A raw disk whose guest wrote a qcow2 header naming a host file: opened by a plain
    path (probed), the backing file is not opened; naming the format opens it."""
    secret = tmp_path / "host-secret.raw"
    secret.write_bytes(b"secret" * 1000)
    disk = tmp_path / "guest-disk"
    create(str(disk), MiB, backing_file=str(secret), backing_fmt="raw")
    with pytest.raises(ProbedParent, match="qcow2:"):
        Chain.open(str(disk))
    code, out, err = run_blktap("info", disk)
    assert code == errno.EPERM and "backing" in err
    with Chain.open(f"qcow2:{disk}") as chain:
        assert len(chain) == 2


def test_backing_file_of_unnamed_format_names_no_parents(tmp_path: Path) -> None:
    """A backing file whose child names no format is probed, as qemu does, and so is not
    trusted to name parents of its own."""
    (tmp_path / "far.raw").write_bytes(bytes(MiB))
    mid = tmp_path / "mid.qcow2"
    create(str(mid), MiB, backing_file="far.raw", backing_fmt="raw")
    top = tmp_path / "top.qcow2"
    create(str(top), MiB, backing_file="mid.qcow2")
    with pytest.raises(ProbedParent):
        Chain.open(f"qcow2:{top}")
    plain = tmp_path / "plain.qcow2"
    create(str(plain), MiB)
    top2 = tmp_path / "top2.qcow2"
    create(str(top2), MiB, backing_file="plain.qcow2")
    with Chain.open(f"qcow2:{top2}") as chain:
        assert len(chain) == 2


def test_backing_file_outside_the_parent_dirs(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (tmp_path / "outside.raw").write_bytes(bytes(MiB))
    top = allowed / "top.qcow2"
    create(str(top), MiB, backing_file="../outside.raw", backing_fmt="raw")
    with pytest.raises(ParentNotAllowed):
        Chain.open(f"qcow2:{top}", parent_policy=ParentPolicy.confined_to([str(allowed)]))
