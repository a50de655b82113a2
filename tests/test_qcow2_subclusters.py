"""Extended L2 entries: write-zeroes and discard at subcluster granularity. Write-zeroes
must leave the same L2 bitmaps as ``qemu-io write -z`` (qemu-img map agrees, offsets
included); discard drops the whole subclusters of partly covered clusters; both keep
qemu-img check clean, including when killed at every system call."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from blktap.image.chain import Chain
from blktap.image.qcow2.create import create
from faults import count_mutations, crash_after, kill_points
from qcow2_helpers import MiB, qemu_check, qemu_img, qemu_io, qemu_raw

KiB = 1024


def make(tmp: Path, name: str, backing: bool = False) -> Path:
    img = tmp / name
    if backing:
        base = tmp / "base.raw"
        if not base.exists():
            base.write_bytes(b"\x99" * 4 * MiB)
        create(str(img), 4 * MiB, extended_l2=True, backing_file="base.raw",
               backing_fmt="raw")
    else:
        create(str(img), 4 * MiB, extended_l2=True)
    qemu_io(img, "write -P 0x11 0 256k")
    return img


def qmap(path: Path, offsets: bool = True) -> list[tuple]:
    """qemu-img map's rows; without ``offsets``, merged by status alone (whole zeroed
    clusters: we release their host cluster, qemu keeps it)."""
    rows: list[list] = []
    for r in json.loads(qemu_img("map", "--output=json", path)):
        key = (r["present"], r["zero"], r["data"], r.get("offset") if offsets else None)
        if not offsets and rows and rows[-1][2] == key:
            rows[-1][1] += r["length"]
        else:
            rows.append([r["start"], r["length"], key])
    return [tuple(r) for r in rows]


@pytest.mark.parametrize("start,length", [(5 * KiB, 15 * KiB), (6 * KiB, 2 * KiB),
                                          (60 * KiB, 100 * KiB), (512, 1536)])
def test_write_zeroes_matches_qemu(tmp_path: Path, start: int, length: int) -> None:
    ours = make(tmp_path, "ours.qcow2")
    theirs = tmp_path / "theirs.qcow2"
    shutil.copy(ours, theirs)
    with Chain.open(f"qcow2:{ours}", writable=True) as chain:
        chain.leaf.write_zeroes(start // 512, length // 512)
    qemu_io(theirs, f"write -z {start} {length}")
    assert qemu_check(ours)[0] == 0
    qemu_img("compare", ours, theirs)
    # Inside one cluster the bitmaps (and host offsets) are qemu's exactly.
    assert qmap(ours, offsets=length < 64 * KiB) == qmap(theirs, offsets=length < 64 * KiB)


@pytest.mark.parametrize("backing", [False, True], ids=["alone", "over-raw"])
def test_discard_drops_whole_subclusters(tmp_path: Path, backing: bool) -> None:
    img = make(tmp_path, "d.qcow2", backing)
    before = qemu_raw(img, tmp_path)
    # 100 KiB .. 250 KiB: subclusters (2 KiB) of cluster 1 from 100 KiB, cluster 2
    # whole, cluster 3 up to 250 KiB.
    with Chain.open(f"qcow2:{img}", writable=True) as chain:
        chain.leaf.discard(100 * KiB // 512, 150 * KiB // 512)
        chain.leaf.discard(8 * KiB // 512 + 1, 1)  # inside one subcluster: a no-op
    assert qemu_check(img)[0] == 0
    after = qemu_raw(img, tmp_path)
    # Without a backing file the range reads as zeros; over one, the zero bits keep
    # the backing file from showing through.
    assert after[: 100 * KiB] == before[: 100 * KiB]
    assert after[100 * KiB : 250 * KiB] == bytes(150 * KiB)
    assert after[250 * KiB :] == before[250 * KiB :]
    # Nothing stored there any more: the map has a boundary at 100 KiB and 250 KiB and
    # no data between (partial clusters included).
    rows = qmap(img, offsets=False)
    starts = [start for start, _, _ in rows]
    assert 100 * KiB in starts and 250 * KiB in starts
    for start, length, (_, _, data, _) in rows:
        if start < 250 * KiB and start + length > 100 * KiB:
            assert not data, rows


def test_a_host_cluster_left_empty_is_released(tmp_path: Path) -> None:
    img = make(tmp_path, "r.qcow2")
    with Chain.open(f"qcow2:{img}", writable=True) as chain:
        chain.leaf.discard(64 * KiB // 512, 32 * KiB // 512)
        chain.leaf.discard(96 * KiB // 512, 32 * KiB // 512)
        entry, bitmap = chain.leaf._entry(1)
        assert entry == 0 and bitmap == 0
    code, info = qemu_check(img)
    assert code == 0, info
    assert qemu_raw(img, tmp_path)[64 * KiB : 128 * KiB] == bytes(64 * KiB)


def test_killed_subcluster_zeroing_leaves_no_corruption(tmp_path: Path) -> None:
    template = make(tmp_path, "t.qcow2", backing=True)
    img = tmp_path / "img.qcow2"
    shutil.copy(template, img)
    before = qemu_raw(template, tmp_path)

    def op() -> None:
        with Chain.open(f"qcow2:{img}", writable=True) as chain:
            chain.leaf.write_zeroes(5 * KiB // 512, 200 * KiB // 512)
            chain.leaf.discard(300 * KiB // 512, 100 * KiB // 512)

    total = count_mutations(op)
    full = qemu_raw(img, tmp_path)
    for n in kill_points(total, 40):
        shutil.copy(template, img)
        crash_after(op, n)
        code, info = qemu_check(img)
        assert code in (0, 3), (n, info)
        got = qemu_raw(img, tmp_path)
        # Every byte reads as before or as after.
        for lo in range(0, 4 * MiB, 2 * KiB):
            piece = got[lo : lo + 2 * KiB]
            assert piece in (before[lo : lo + 2 * KiB], full[lo : lo + 2 * KiB]), (n, lo)
