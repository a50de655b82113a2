"""The old qcow (version 1): images qemu-img writes (plain, compressed, with a backing
file) and images laid out as blktap2's tapdisk wrote them (its Xen extension header,
preallocated extents, and the old host-order L1 table) are read identically by the
library, ``blktap convert`` and the read-only ``qcow:`` tapdisk driver; bad headers are
refused with one clear error."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest

from blktap.errors import FormatError, ReadOnlyImage, UnsupportedImage
from blktap.image.chain import Chain, probe
from blktap.image.qcow import structs as v1
from blktap.image.qcow.image import QcowImage
from blktap.tapdisk.drivers import parse
from blktap.tapdisk.drivers.registry import table
from conftest import run, tool
from nbd_helpers import serve
from qcow2_helpers import MiB, qemu_check, qemu_img, qemu_io

SIZE = 8 * MiB


def blktap(*args: object) -> tuple[int, str, str]:
    proc = run([tool("blktap"), *map(str, args)], text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def qemu_v1(tmp: Path, name: str = "v1.qcow") -> tuple[Path, bytes]:
    img = tmp / name
    qemu_img("create", "-q", "-f", "qcow", img, str(SIZE))
    qemu_io(img, "write -P 0x5a 100k 300k", "write -P 0x33 7M 1M", fmt="qcow")
    expect = bytearray(SIZE)
    expect[100 * 1024 : 400 * 1024] = b"\x5a" * 300 * 1024
    expect[7 * MiB :] = b"\x33" * MiB
    return img, bytes(expect)


def read_all(spec: str) -> bytes:
    with Chain.open(spec) as chain:
        return bytes(chain.read(0, chain.sectors))


def test_reads_what_qemu_writes(tmp_path: Path) -> None:
    img, expect = qemu_v1(tmp_path)
    assert probe(str(img)) == "qcow"
    assert read_all(f"qcow:{img}") == expect
    with QcowImage.open(str(img)) as image:
        assert image.size == SIZE and image.xen is None
        assert image.allocated_bytes() >= 300 * 1024 + MiB
    out = tmp_path / "out.raw"
    code, _, err = blktap("convert", img, out)
    assert code == 0, err
    assert out.read_bytes() == expect
    code, out_text, _ = blktap("info", img)
    assert code == 0 and "qcow v1" in out_text


def test_compressed_clusters_and_convert_to_qcow2(tmp_path: Path) -> None:
    _, expect = qemu_v1(tmp_path)
    raw = tmp_path / "src.raw"
    raw.write_bytes(expect)
    comp = tmp_path / "c.qcow"
    # qemu-img 7.2 exits 1 without a word after a compressed qcow convert (its final
    # empty compressed write); the image it leaves is complete, as compare shows.
    qemu_img("convert", "-c", "-O", "qcow", raw, comp, ok=False)
    qemu_img("compare", "-f", "qcow", "-F", "raw", comp, raw)
    assert comp.stat().st_size < MiB  # compressed indeed
    assert read_all(f"qcow:{comp}") == expect
    # The qcow2 layer's shortcuts read its entries as qcow2's (bit 63 is COPIED there,
    # the compressed flag here): a v1 layer never takes them, whatever the range.
    with QcowImage.open(str(comp)) as image:
        list(image.runs(0, image.size))  # every table in the cache
        for off in range(0, image.size, 16 << 10):
            for n in (512, 4096, 64 << 10, 256 << 10):
                if off + n <= image.size:
                    assert image.quick_lookup(off, n) is None, (off, n)
    # Served (the qcow2 driver's side doors and block status over a v1 layer): what
    # qemu reads over NBD is the source, holes and compressed clusters alike.
    with serve(f"qcow:{comp}", tmp_path, "--read-only") as srv:
        qemu_img("compare", "-f", "raw", "-F", "raw", srv.uri, raw)
    out = tmp_path / "c.qcow2"
    code, _, err = blktap("convert", "-O", "qcow2", f"qcow:{comp}", out)
    assert code == 0, err
    assert qemu_check(out)[0] == 0
    qemu_img("compare", "-f", "qcow2", "-F", "raw", out, raw)


def test_backing_chain(tmp_path: Path) -> None:
    base, expect = qemu_v1(tmp_path)
    top = tmp_path / "top.qcow"
    qemu_img("create", "-q", "-f", "qcow", "-b", base.name, "-F", "qcow", top, str(SIZE))
    qemu_io(top, "write -P 0x77 0 64k", "write -P 0x78 7M 4k", fmt="qcow")
    want = bytearray(expect)
    want[:65536] = b"\x77" * 65536
    want[7 * MiB : 7 * MiB + 4096] = b"\x78" * 4096
    assert read_all(f"qcow:{top}") == want
    # A probed qcow image with a backing file is not followed (docs/security.md).
    code, _, err = blktap("convert", top, tmp_path / "x.raw")
    assert code != 0 and "probed" in err
    out = tmp_path / "flat.raw"
    code, _, err = blktap("convert", f"qcow:{top}", out)
    assert code == 0, err
    assert out.read_bytes() == want
    # A qcow2 leaf over a qcow parent.
    leaf = tmp_path / "leaf.qcow2"
    code, _, err = blktap("snapshot", leaf, f"qcow:{top}")
    assert code == 0, err
    qemu_io(leaf, "write -P 0x79 1M 4k")
    want[MiB : MiB + 4096] = b"\x79" * 4096
    assert read_all(f"qcow2:{leaf}") == want


def blktap2_image(path: Path, *, big_endian: bool, sparse: bool = True) -> bytes:
    """An image laid out as blktap2's tapdisk made one without a backing file: 4 KiB
    clusters, 512-entry L2 tables, the Xen extension after the header, the L1 table at
    4096, and each L2 table followed by its whole preallocated extent. Two extents are
    written; the old tapdisk stored the L1 table in host order (x86: little-endian)."""
    cbits, l2bits = 12, 9
    cs, extent = 1 << cbits, (1 << cbits) << l2bits  # 2 MiB per L2 table
    l1_entries = -(-SIZE // extent)
    l1_off = 4096
    l1 = [0] * l1_entries
    body = bytearray(l1_off + 4096)
    expect = bytearray(SIZE)
    for index, fill in ((0, 0x41), (3, 0x42)):
        l2_off = len(body)
        data_off = l2_off + 4096  # a 512-entry table is one 4 KiB cluster
        l1[index] = l2_off
        l2 = [data_off + i * cs for i in range(1 << l2bits)]
        body += struct.pack(f">{len(l2)}Q", *l2)
        content = bytes([fill]) * extent
        body += content
        expect[index * extent : (index + 1) * extent] = content
    order = ">" if big_endian else "<"
    body[l1_off : l1_off + 8 * l1_entries] = struct.pack(f"{order}{l1_entries}Q", *l1)
    cksum = struct.unpack_from("<I", hashlib.md5(
        struct.pack(f">{l1_entries}Q", *l1)).digest())[0]
    flags = (v1.XEN_SPARSE if sparse else 0) | (v1.XEN_L1_BIG_ENDIAN if big_endian else 0)
    header = v1.Header(v1.MAGIC, 1, 0, 0, 0, SIZE, cbits, l2bits, 0, l1_off)
    body[: v1.HEADER_SIZE] = header.pack()
    body[v1.HEADER_SIZE : v1.HEADER_SIZE + 16] = \
        v1.XenExtension(cksum, 1 << l2bits, flags).pack()
    path.write_bytes(body)
    return bytes(expect)


@pytest.mark.parametrize("big_endian", [True, False], ids=["be-l1", "old-host-order-l1"])
def test_blktap2_layout(tmp_path: Path, big_endian: bool) -> None:
    img = tmp_path / "x.qcow"
    expect = blktap2_image(img, big_endian=big_endian)
    with QcowImage.open(str(img)) as image:
        assert image.xen is not None and image.xen.min_cluster_alloc == 512
        assert image.l1_host_order is (not big_endian)
    assert read_all(f"qcow:{img}") == expect
    out = tmp_path / "x.raw"
    code, _, err = blktap("convert", img, out)
    assert code == 0, err
    assert out.read_bytes() == expect
    if big_endian:  # qemu reads it too (it skips the extension)
        qemu_raw = tmp_path / "q.raw"
        qemu_img("convert", "-f", "qcow", "-O", "raw", img, qemu_raw)
        assert qemu_raw.read_bytes() == expect


def test_tapdisk_driver_serves_read_only(tmp_path: Path) -> None:
    img, expect = qemu_v1(tmp_path)
    assert table()["qcow"].target == "blktap.tapdisk.drivers.qcow:QcowDriver"
    assert parse(str(img)) == ("qcow", str(img))
    before = img.read_bytes()
    # Asked for a writable disk, the driver is refused with a clear error.
    with pytest.raises(RuntimeError, match="read-only"):
        with serve(f"qcow:{img}", tmp_path, name="rw.sock"):
            pass
    with serve(f"qcow:{img}", tmp_path, "--read-only") as srv:
        out = tmp_path / "served.raw"
        qemu_img("convert", "-f", "raw", "-O", "raw", srv.uri, out)
        assert out.read_bytes() == expect
        res = run(["qemu-io", "-f", "raw", "-c", "write 0 4k", srv.uri], text=True)
        assert res.returncode != 0 or "error" in (res.stdout + res.stderr).lower()
        assert srv.stop() == 0
    assert img.read_bytes() == before


def test_bad_headers(tmp_path: Path) -> None:
    img, _ = qemu_v1(tmp_path)
    good = img.read_bytes()
    with pytest.raises(ReadOnlyImage):
        QcowImage.open(str(img), writable=True)
    cases = {
        "cluster_bits": (32, b"\x08", FormatError, "cluster_bits"),
        "l2_bits": (33, b"\x20", FormatError, "l2_bits"),
        "crypt": (36, b"\0\0\0\1", UnsupportedImage, "AES"),
        "crypt-unknown": (36, b"\0\0\0\7", FormatError, "crypt_method"),
        "l1-past-eof": (40, struct.pack(">Q", 1 << 40), FormatError, "L1 table"),
        "backing-long": (8, struct.pack(">QI", 64, 5000), FormatError, "backing file"),
        "size-huge": (24, struct.pack(">Q", 1 << 62), FormatError, "size"),
    }
    for name, (offset, patch, exc, words) in cases.items():
        bad = bytearray(good)
        bad[offset : offset + len(patch)] = patch
        img.write_bytes(bad)
        with pytest.raises(exc, match=words):
            read_all(f"qcow:{img}")
        code, _, err = blktap("convert", f"qcow:{img}", tmp_path / f"{name}.raw")
        assert code != 0 and words in err, name
        assert img.read_bytes() == bad, name
    # An L2 entry pointing past the end of the file.
    bad = bytearray(good)
    l1_off = struct.unpack_from(">Q", bad, 40)[0]
    l2_off = struct.unpack_from(">Q", bad, l1_off)[0]
    bad[l2_off + 8 * 25 : l2_off + 8 * 26] = struct.pack(">Q", 1 << 40)
    img.write_bytes(bad)
    with pytest.raises(FormatError, match="outside the file"):
        read_all(f"qcow:{img}")
