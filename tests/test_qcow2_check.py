"""Our qcow2 check against ``qemu-img check`` on images damaged on purpose: the same
verdict (exit code, counts), and a repair each tool accepts afterwards."""

from __future__ import annotations

import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from blktap.image.qcow2 import structs as s
from blktap.image.qcow2.check import check
from blktap.image.qcow2.image import Qcow2Image
from qcow2_helpers import qemu_check, qemu_img, qemu_io


def patch(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def refblock(img: Path) -> int:
    with Qcow2Image.open(str(img)) as q:
        rt = q.header.refcount_table_offset
    return struct.unpack(">Q", img.read_bytes()[rt : rt + 8])[0]


def first_l2(img: Path) -> tuple[int, int]:
    """(offset of the first L2 table, its first entry)."""
    with Qcow2Image.open(str(img)) as q:
        off = q.l1[0] & s.L1_OFFSET_MASK
    return off, struct.unpack(">Q", img.read_bytes()[off : off + 8])[0]


def leak_data(img: Path) -> None:
    _, entry = first_l2(img)
    cluster = (entry & s.L2_OFFSET_MASK) >> 16
    patch(img, refblock(img) + 2 * cluster, struct.pack(">H", 2))


def drop_data(img: Path) -> None:
    _, entry = first_l2(img)
    cluster = (entry & s.L2_OFFSET_MASK) >> 16
    patch(img, refblock(img) + 2 * cluster, struct.pack(">H", 0))


def clear_copied(img: Path) -> None:
    off, entry = first_l2(img)
    patch(img, off, struct.pack(">Q", entry & ~s.OFLAG_COPIED))


def stray_count(img: Path) -> None:
    size = img.stat().st_size
    with img.open("r+b") as f:
        f.truncate(size + 65536)
    patch(img, refblock(img) + 2 * (size >> 16), struct.pack(">H", 1))


def shared_l2(img: Path) -> None:
    with Qcow2Image.open(str(img)) as q:
        l1 = q.header.l1_table_offset
    first = img.read_bytes()[l1 : l1 + 8]
    patch(img, l1 + 8, first)


CASES: dict[str, tuple[Callable[[Path], None], int]] = {
    # Counted twice, so also a COPIED flag that should not be there: both tools say 2.
    "leaked-data-cluster": (leak_data, 2),
    "data-cluster-uncounted": (drop_data, 2),
    "copied-flag-cleared": (clear_copied, 2),
    "stray-count-past-the-end": (stray_count, 3),
    "l2-table-shared": (shared_l2, 2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_agrees_with_qemu(tmp_path: Path, case: str) -> None:
    damage, expected = CASES[case]
    img = tmp_path / "d.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1G")
    qemu_io(img, "write -P 1 0 256k", "write -P 2 600M 64k")
    damage(img)
    code, info = qemu_check(img)
    ours = check(str(img))
    assert code == ours.exit_code == expected, (info, ours.messages)
    assert ours.leaks == info.get("leaks", 0)
    assert (ours.corruptions > 0) == (info.get("corruptions", 0) > 0)
    for mode in ("leaks", "all"):
        ours_copy, qemu_copy = tmp_path / f"ours-{mode}.qcow2", tmp_path / f"qemu-{mode}.qcow2"
        shutil.copy(img, ours_copy)
        shutil.copy(img, qemu_copy)
        fixed = check(str(ours_copy), repair=mode)
        qemu_img("check", "-r", mode, qemu_copy, ok=False)
        after = qemu_check(ours_copy)[0]
        assert fixed.exit_code == after == qemu_check(qemu_copy)[0], (mode, fixed.messages)
        if mode == "all":
            assert after == 0


STAT_IMAGES: dict[str, tuple[str, list[str], list[str]]] = {
    # name: (size, create options, qemu-io commands)
    "spread-over-many-l2-tables": ("100G", [], [f"write -P 1 {i * 256}M 2M"
                                                for i in range(40)]),
    "out-of-order": ("1G", [], ["write -P 1 64k 64k", "write -P 2 0 64k",
                                "write -P 3 1M 256k", "write -P 4 512k 128k"]),
    "zero-clusters-preallocated": ("64M", [], ["write -P 1 0 1M", "write -z 256k 256k",
                                               "write -P 2 4M 64k"]),
    "small-clusters": ("16M", ["-o", "cluster_size=512"], ["write -P 1 0 64k",
                                                            "write -P 2 1M 4k"]),
}


@pytest.mark.parametrize("name", sorted(STAT_IMAGES) + ["compressed"])
def test_check_statistics_agree_with_qemu(tmp_path: Path, name: str) -> None:
    """The allocation figures (allocated, fragmented, compressed, total clusters, image
    end offset) are qemu-img check's: fragmentation counted within each L2 table, and
    every compressed cluster as fragmented."""
    img = tmp_path / "s.qcow2"
    if name == "compressed":
        raw = tmp_path / "s.raw"
        raw.write_bytes(bytes(range(256)) * 4096 * 4 + bytes(4 << 20))
        qemu_img("convert", "-q", "-c", "-O", "qcow2", raw, img)
        qemu_io(img, "write -P 9 1M 64k")  # one plain cluster among compressed ones
    else:
        size, opts, cmds = STAT_IMAGES[name]
        qemu_img("create", "-q", "-f", "qcow2", *opts, img, size)
        qemu_io(img, *cmds)
    code, info = qemu_check(img)
    assert code == 0, info
    ours = check(str(img))
    assert ours.exit_code == 0, ours.messages
    got = {"allocated-clusters": ours.allocated_clusters,
           "fragmented-clusters": ours.fragmented_clusters,
           "compressed-clusters": ours.compressed_clusters,
           "total-clusters": ours.total_clusters,
           "image-end-offset": ours.image_end_offset}
    want = {k: info.get(k, 0) for k in got}  # qemu leaves out the zero figures
    assert got == want
