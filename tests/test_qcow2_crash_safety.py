"""A qcow2 writer killed at any file-changing system call leaves an image that
``qemu-img check`` finds free of corruption (leaked clusters are allowed, as qemu allows
them), and that holds every operation completed before the kill.

The kill is simulated with tests/faults.py: the first N file-changing calls go through,
the next raises, the descriptors are abandoned. Every N is tried (or a spread of them)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from blktap.image.chain import Chain
from blktap.image.qcow2.check import check
from blktap.image.qcow2.create import create
from faults import count_mutations, crash_after, kill_points
from qcow2_helpers import MiB, qemu_check

SIZE = 2 * MiB

Op = tuple[str, int, int, int]  # (kind, sector, sectors, fill byte)


def operations() -> list[Op]:
    return [
        ("write", 0, 8, 1),  # new L2 table, new data cluster(s)
        ("write", 9, 1, 2),  # partial cluster: copy on write from the backing file
        ("write", 3000, 300, 3),  # many clusters: refcount blocks and table growth
        ("flush", 0, 0, 0),
        ("write", 1, 2, 4),  # in place
        ("zero", 2900, 200, 0),  # zero flags, freed clusters
        ("discard", 3050, 100, 0),
        ("write", 3060, 10, 5),  # over the discarded range
        ("write", 4000, 64, 6),
    ]


def apply(shadow: bytearray, op: Op, below: bytes) -> None:
    kind, sector, n, fill = op
    lo, hi = sector * 512, (sector + n) * 512
    if kind == "write":
        shadow[lo:hi] = bytes([fill]) * (hi - lo)
    elif kind == "zero":
        shadow[lo:hi] = bytes(hi - lo)


def run_ops(path: str, ops: list[Op], done: list[int]) -> Callable[[], None]:
    def body() -> None:
        chain = Chain.open(f"qcow2:{path}", writable=True)
        for op in ops:
            kind, sector, n, fill = op
            if kind == "write":
                chain.write(sector, bytes([fill]) * n * 512)
            elif kind == "zero":
                chain.leaf.write_zeroes(sector, n)
            elif kind == "discard":
                chain.leaf.discard(sector, n)
            else:
                chain.flush()
            done.append(1)
        chain.close()
    return body


LAYOUTS = [
    pytest.param({"cluster_size": 512, "refcount_bits": 64}, id="512-rc64"),
    pytest.param({"cluster_size": 65536, "extended_l2": True}, id="64k-extl2"),
    pytest.param({"cluster_size": 4096, "compat": "0.10"}, id="4k-v2"),
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_killed_writer_leaves_no_corruption(tmp_path: Path, layout: dict) -> None:
    base = tmp_path / "base.raw"
    below = bytes(range(256)) * (SIZE // 256)
    base.write_bytes(below)
    template = tmp_path / "template.qcow2"
    create(str(template), SIZE, backing_file="base.raw", backing_fmt="raw", **layout)
    img = tmp_path / "img.qcow2"
    ops = operations()
    shutil.copy(template, img)
    total = count_mutations(run_ops(str(img), ops, []))
    assert total > 20
    for n in kill_points(total, 120):
        shutil.copy(template, img)
        done: list[int] = []
        finished = crash_after(run_ops(str(img), ops, done), n)
        code, info = qemu_check(img)
        assert code in (0, 3), (n, info)
        assert check(str(img)).exit_code == code, n
        completed = len(done)
        expect = bytearray(below)
        with Chain.open(f"qcow2:{img}") as chain:
            got = chain.read(0, chain.sectors)
        for op in ops[:completed]:
            kind, sector, count, _ = op
            if kind == "discard":
                lo, hi = sector * 512, (sector + count) * 512
                expect[lo:hi] = got[lo:hi]
            apply(expect, op, below)
        if not finished:
            kind, sector, count, _ = ops[completed]
            lo, hi = sector * 512, (sector + count) * 512
            # Whatever the interrupted operation reached reads as old or new: only the
            # bytes it touched may differ.
            expect[lo:hi] = got[lo:hi]
        assert got == expect, n
        if code == 3:
            assert check(str(img), repair="leaks").exit_code == 0
            assert qemu_check(img)[0] == 0
