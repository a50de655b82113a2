"""qcow2 against qemu, both ways.

What qemu writes (plain, zero and compressed clusters, extended L2, v2 and v3, cluster
sizes 512 B, 64 KiB and 2 MiB, internal snapshots, backing chains of mixed formats) we
read byte for byte as ``qemu-img convert -O raw`` does; what we create and write (random
writes, zeroes, discards) ``qemu-img check`` finds clean and ``qemu-img compare`` finds
equal to a shadow of the expected bytes.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from blktap.image.chain import Chain
from blktap.image.qcow2.check import check
from blktap.image.qcow2.create import create
from blktap.image.qcow2.image import Qcow2Image
from qcow2_helpers import MiB, our_raw, qemu_check, qemu_img, qemu_io, qemu_raw, random_ops

pytestmark = pytest.mark.interop

LAYOUTS = [
    pytest.param({"cluster_size": 512, "compat": "1.1"}, id="512-v3"),
    pytest.param({"cluster_size": 512, "compat": "0.10"}, id="512-v2"),
    pytest.param({"cluster_size": 65536, "compat": "1.1"}, id="64k-v3"),
    pytest.param({"cluster_size": 65536, "compat": "0.10"}, id="64k-v2"),
    pytest.param({"cluster_size": 2 * MiB, "compat": "1.1"}, id="2m-v3"),
    pytest.param({"cluster_size": 65536, "compat": "1.1", "extended_l2": True}, id="64k-extl2"),
    pytest.param({"cluster_size": 2 * MiB, "compat": "1.1", "extended_l2": True},
                 id="2m-extl2"),
]


def _opts(layout: dict) -> str:
    parts = [f"cluster_size={layout['cluster_size']}", f"compat={layout['compat']}"]
    if layout.get("extended_l2"):
        parts.append("extended_l2=on")
    return ",".join(parts)


def _qemu_writes(path: Path) -> None:
    qemu_io(path, "write -P 0xa5 0 96k", "write -P 0x11 1M 7k", "write -z 2M 1M",
            "write -P 0x22 2560k 4k", "write -z 2600k 512", "discard 1M 64k",
            "write -P 0x33 5M 1M", "write -P 0x44 4M 512k", "write -z 4M 256k",
            "write -z -u 4352k 64k")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_we_read_what_qemu_writes(tmp_path: Path, layout: dict) -> None:
    img = tmp_path / "q.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", _opts(layout), img, "8M")
    _qemu_writes(img)
    shadow = bytearray(qemu_raw(img, tmp_path))
    assert our_raw(img) == shadow
    assert check(str(img)).exit_code == 0
    # And we write over what qemu made (zero clusters with and without a host cluster
    # among them): qemu finds the image clean and reads what we expect.
    with Chain.open(f"qcow2:{img}", writable=True) as chain:
        chain.write(4 * MiB // 512 + 8, b"\x66" * 1024)
        shadow[4 * MiB + 4096 : 4 * MiB + 5120] = b"\x66" * 1024
        random_ops(chain, shadow, random.Random(11), 40)
    assert qemu_check(img)[0] == 0
    assert qemu_raw(img, tmp_path) == shadow


@pytest.mark.parametrize("layout", LAYOUTS)
def test_qemu_reads_what_we_write(tmp_path: Path, layout: dict) -> None:
    img = tmp_path / "ours.qcow2"
    size = 6 * MiB
    create(str(img), size, **layout)
    shadow = bytearray(size)
    rng = random.Random(layout["cluster_size"] + len(layout))
    with Chain.open(f"qcow2:{img}", writable=True) as chain:
        random_ops(chain, shadow, rng, 80)
        assert chain.read(0, chain.sectors) == shadow
    code, info = qemu_check(img)
    assert code == 0, info
    assert qemu_raw(img, tmp_path) == shadow
    ref = tmp_path / "shadow.raw"
    ref.write_bytes(shadow)
    qemu_img("compare", "-q", "-f", "qcow2", "-F", "raw", img, ref)
    # qemu writes on top of what we wrote, and we read it back.
    _qemu_writes(img)
    assert our_raw(img) == qemu_raw(img, tmp_path)


@pytest.mark.parametrize("cluster_size", [512, 65536, 2 * MiB])
def test_compressed_clusters(tmp_path: Path, cluster_size: int) -> None:
    src = tmp_path / "src.raw"
    rng = random.Random(cluster_size)
    data = bytearray(4 * MiB)
    for _ in range(40):
        off = rng.randrange(len(data) - 70000)
        data[off : off + 65536] = bytes([rng.randrange(256)]) * 65536
    data[3 * MiB : 3 * MiB + 4096] = os.urandom(4096)
    src.write_bytes(data)
    img = tmp_path / "c.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", "-o", f"cluster_size={cluster_size}", src, img)
    assert our_raw(img) == data
    # Writes into compressed clusters copy them out; qemu agrees afterwards.
    shadow = bytearray(data)
    with Chain.open(f"qcow2:{img}", writable=True) as chain:
        random_ops(chain, shadow, random.Random(7), 40, max_sectors=40)
    assert qemu_check(img)[0] == 0
    assert qemu_raw(img, tmp_path) == shadow


def test_internal_snapshots_listed_and_readable(tmp_path: Path) -> None:
    img = tmp_path / "s.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 1 0 1M")
    qemu_img("snapshot", "-c", "first", img)
    qemu_io(img, "write -P 2 512k 1M")
    qemu_img("snapshot", "-c", "second", img)
    qemu_io(img, "write -z 0 4M")
    with Qcow2Image.open(str(img)) as q:
        assert [x.name for x in q.snapshots] == ["first", "second"]
    expect = bytearray(4 * MiB)
    expect[: MiB] = b"\1" * MiB
    with Qcow2Image.open(str(img), snapshot="first") as q:
        assert q.read(0, q.sectors) == expect
    expect[512 * 1024 : 1536 * 1024] = b"\2" * MiB
    with Qcow2Image.open(str(img), snapshot="second") as q:
        assert q.read(0, q.sectors) == expect
    assert our_raw(img) == bytes(4 * MiB)
    # Writing to an image with snapshots keeps them intact (shared clusters are copied).
    with Chain.open(f"qcow2:{img}", writable=True) as chain:
        chain.write(0, b"\3" * 4096)
    assert qemu_check(img)[0] == 0
    with Qcow2Image.open(str(img), snapshot="second") as q:
        assert q.read(0, q.sectors) == expect
    assert check(str(img)).exit_code == 0


def _make_layer(tmp: Path, i: int, fmt: str, parent: tuple[Path, str] | None,
                size: int) -> Path:
    path = tmp / f"l{i}.{fmt}"
    if fmt == "raw":
        path.write_bytes(bytes([i + 1]) * size)
        return path
    if fmt == "vhd":
        args = ["create", "-q", "-f", "vpc", "-o", "subformat=dynamic", path, str(size)]
        qemu_img(*args)
        qemu_io(path, f"write -P {i + 1} 0 {size}", fmt="vpc")
        return path
    args = ["create", "-q", "-f", "qcow2"]
    if parent is not None:
        args += ["-b", parent[0].name, "-F", "vpc" if parent[1] == "vhd" else parent[1]]
    qemu_img(*args, path, str(size))
    qemu_io(path, f"write -P {i + 1} {(i * 128 + 64) * 1024} 128k",
            f"write -z {(i * 128 + 1024) * 1024} 64k")
    return path


@pytest.mark.parametrize("depth", [1, 2, 5, 10])
def test_backing_chains_mixed_formats(tmp_path: Path, depth: int) -> None:
    size = 4 * MiB
    bases = ["raw", "qcow2", "vhd"]
    layers: list[tuple[Path, str]] = []
    base_fmt = bases[depth % 3]
    layers.append((_make_layer(tmp_path, 0, base_fmt, None, size), base_fmt))
    for i in range(1, depth + 1):
        layers.append((_make_layer(tmp_path, i, "qcow2", layers[-1], size), "qcow2"))
    leaf = layers[-1][0]
    assert our_raw(leaf) == qemu_raw(leaf, tmp_path)
    with Chain.open(f"qcow2:{leaf}") as chain:
        assert len(chain) == depth + 1
    # Writes into the leaf copy up from the chain; qemu reads the same.
    shadow = bytearray(qemu_raw(leaf, tmp_path))
    with Chain.open(f"qcow2:{leaf}", writable=True) as chain:
        random_ops(chain, shadow, random.Random(depth), 50)
    assert qemu_check(leaf)[0] == 0
    assert qemu_raw(leaf, tmp_path) == shadow


def test_our_overlay_on_qemu_base(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", base, "3M")
    qemu_io(base, "write -P 7 0 3M")
    top = tmp_path / "top.qcow2"
    create(str(top), 3 * MiB, backing_file="base.qcow2", backing_fmt="qcow2",
           cluster_size=65536)
    shadow = bytearray(b"\7" * 3 * MiB)
    with Chain.open(f"qcow2:{top}", writable=True) as chain:
        random_ops(chain, shadow, random.Random(3), 60)
    info = qemu_img("info", "--output=json", top)
    assert '"backing-filename-format": "qcow2"' in info
    assert qemu_check(top)[0] == 0
    assert qemu_raw(top, tmp_path) == shadow
    assert qemu_raw(base, tmp_path) == b"\7" * 3 * MiB


@pytest.mark.parametrize("prealloc", ["off", "metadata", "falloc", "full"])
@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_create_options_qemu_accepts(tmp_path: Path, prealloc: str, compat: str) -> None:
    img = tmp_path / "p.qcow2"
    kw: dict = {"preallocation": prealloc, "compat": compat}
    if compat == "1.1":
        kw["lazy_refcounts"] = True
    create(str(img), 5 * MiB + 512, **kw)
    assert qemu_check(img)[0] == 0
    info = qemu_img("info", "--output=json", img)
    assert '"virtual-size": 5243392' in info
    assert ('"lazy-refcounts": true' in info) == (compat == "1.1")
    qemu_io(img, "write -P 9 1M 64k")
    expect = bytearray(5 * MiB + 512)
    expect[MiB : MiB + 65536] = b"\x09" * 65536
    assert our_raw(img) == expect
    with Chain.open(f"qcow2:{img}", writable=True) as chain:
        chain.write(8, b"\5" * 512)
    expect[4096:4608] = b"\5" * 512
    assert qemu_check(img)[0] == 0
    assert qemu_raw(img, tmp_path) == expect


@pytest.mark.parametrize("refcount_bits", [1, 2, 4, 8, 32, 64])
def test_refcount_widths(tmp_path: Path, refcount_bits: int) -> None:
    img = tmp_path / "r.qcow2"
    create(str(img), 4 * MiB, refcount_bits=refcount_bits, cluster_size=512)
    shadow = bytearray(4 * MiB)
    with Chain.open(f"qcow2:{img}", writable=True) as chain:
        random_ops(chain, shadow, random.Random(refcount_bits), 60)
    assert qemu_check(img)[0] == 0
    assert qemu_raw(img, tmp_path) == shadow
    qemu_io(img, "write -P 4 0 100k")
    shadow[: 100 * 1024] = b"\4" * 100 * 1024
    assert our_raw(img) == shadow
    assert check(str(img)).exit_code == 0


def test_refcount_table_grows(tmp_path: Path) -> None:
    """512-byte clusters with 64-bit refcounts: one refcount block covers 64 clusters and
    the one-cluster table 64 blocks; writing 3 MiB needs the table to move twice."""
    img = tmp_path / "g.qcow2"
    create(str(img), 4 * MiB, refcount_bits=64, cluster_size=512)
    data = os.urandom(3 * MiB)
    with Chain.open(f"qcow2:{img}", writable=True) as chain:
        chain.write(0, data)
        chain.write(7000, data[:4096])
    with Qcow2Image.open(str(img)) as q:
        assert q.header.refcount_table_clusters > 1
    assert qemu_check(img)[0] == 0
    expect = bytearray(4 * MiB)
    expect[: 3 * MiB] = data
    expect[7000 * 512 : 7000 * 512 + 4096] = data[:4096]
    assert qemu_raw(img, tmp_path) == expect


def test_bitmaps_counted_then_invalidated_as_qemu_says(tmp_path: Path) -> None:
    """Persistent bitmaps: their clusters are counted (a clean check, as qemu's); our
    first write clears the bitmaps' autoclear bit, as the format asks of a program that
    does not update them, and qemu then calls them inconsistent and their clusters
    leaked, exactly the leaks our check reports."""
    img = tmp_path / "bm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 1 0 1M")
    qemu_img("bitmap", "--add", img, "b0")
    qemu_io(img, "write -P 2 0 64k")
    before = img.read_bytes()
    assert check(str(img)).exit_code == 0
    assert our_raw(img) == qemu_raw(img, tmp_path)
    assert img.read_bytes() == before  # reading keeps everything intact
    with Chain.open(f"qcow2:{img}", writable=True) as chain:
        chain.write(4000, b"x" * 512)
    code, info = qemu_check(img)
    ours = check(str(img))
    assert code == ours.exit_code == 3
    assert info["leaks"] == ours.leaks
    qemu_img("check", "-q", "-r", "leaks", img)
    assert check(str(img)).exit_code == 0
