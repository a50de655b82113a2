"""The benchmark's images: fully allocated random data (nbdcopy and fio must not meet
holes), raw on tmpfs and on disk, a VHD with the same data, and VHD chains whose data
sits in the base while the upper layers are empty snapshots."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from servers import Image, ours

MIB = 1 << 20
VHD_BLOCK = 2 * MIB
CHUNK = 8 * MIB
LARGEST_VHD_MB = 2040 * 1024  # vhd-util create refuses more (the reference's limit too)


def _run(argv: list[str]) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {res.stderr.strip() or res.returncode}")
    return res.stdout


def random_raw(path: Path, size: int) -> Image:
    """A raw file of `size` bytes of random data, every block written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, size, CHUNK):
            os.pwrite(fd, os.urandom(min(CHUNK, size - off)), off)
        os.fsync(fd)
    finally:
        os.close(fd)
    return Image(path, "raw")


def copy_file(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def vhd_from_raw(raw: Path, dst: Path) -> Image:
    """A dynamic VHD with the raw file's data: `blktap convert` allocates every block that
    is not all zeros, i.e. all of them for random data."""
    _run([ours("blktap"), "convert", "-O", "vhd", f"aio:{raw}", str(dst)])
    return Image(dst, "vhd")


def drop_cache(path: Path) -> None:
    """Write the file back and drop its pages from the page cache (nothing is dropped on
    tmpfs, whose pages are the file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def allocated_blocks(vhd: Path) -> int:
    return int(_run([ours("vhd-util"), "query", "-n", str(vhd), "-a"]).split()[0])


def chain_depth(vhd: Path) -> int:
    return int(_run([ours("vhd-util"), "query", "-n", str(vhd), "-d"]).split()[-1])


def chain(base: Path, depth: int, prefix: str) -> Image:
    """The leaf of a chain of `depth` VHDs over `base` (depth 1 is the base alone).
    -e links each snapshot to its empty parent (vhd-util otherwise skips empty parents)."""
    parent = base
    for i in range(1, depth):
        child = base.parent / f"{prefix}-{i}.vhd"
        _run([ours("vhd-util"), "snapshot", "-e", "-n", str(child), "-p", str(parent)])
        parent = child
    return Image(parent, "vhd")


def sparse_vhd(path: Path, size_mb: int) -> Image:
    _run([ours("vhd-util"), "create", "-n", str(path), "-s", str(size_mb)])
    return Image(path, "vhd")


def qcow2_from_raw(raw: Path, dst: Path) -> Image:
    """A qcow2 image (64 KiB clusters) with the raw file's data, every cluster allocated
    (random data has no zero cluster)."""
    _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(dst)])
    return Image(dst, "qcow2")


def sparse_qcow2(path: Path, size: int) -> Image:
    _run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)])
    return Image(path, "qcow2")


def qcow2_allocated(path: Path) -> int:
    """Bytes of the disk the image holds (qemu-img map)."""
    import json  # noqa: PLC0415

    rows = json.loads(_run(["qemu-img", "map", "--output=json", str(path)]))
    return sum(r["length"] for r in rows if r.get("data"))
