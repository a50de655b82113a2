"""A writer killed at any point leaves a valid image holding every acknowledged write.

A kill -9 stops a process between two system calls; everything written before stays in the
page cache. So "the writer died after its Nth write" is simulated by making the Nth
positioned write system call (pwrite or pwritev) raise, then abandoning the file descriptor
without closing the image.
Every N from the first write to the last is tried, for a workload that allocates blocks in
a dynamic disk and in a differencing child, extends bitmaps and fills blocks (batmap).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest

from blktap.image import Chain, fileio
from blktap.image.vhd import VhdImage, create, snapshot
from blktap.image.vhd import check as vhd_check
from conftest import named, run, tool

MB = 1 << 20
SIZE = 16 * MB


class Killed(Exception):
    pass


def workload(seed: int) -> list[tuple[int, bytes]]:
    rng = random.Random(seed)
    writes = [
        (0, bytes([1]) * 4096),  # allocates block 0
        (3 * MB + 512, bytes([2]) * 1024),  # allocates block 1, unaligned in the block
        (3 * MB + 512, bytes([3]) * 512),  # rewrites inside an allocated block
        (4 * MB, bytes([4]) * (2 * MB)),  # fills block 2 completely: batmap bit
        (2 * MB - 1024, bytes([5]) * 2048),  # straddles blocks 0 and 1
    ]
    for _ in range(4):
        off = rng.randrange(0, SIZE // 512 - 64) * 512
        writes.append((off, bytes([rng.randrange(6, 255)]) * (rng.randrange(1, 64) * 512)))
    return writes


def _intercept(before_write) -> tuple:  # noqa: ANN001
    """Route every positioned write system call (pwrite and pwritev) through
    ``before_write``; returns the originals to restore."""
    real_pwrite, real_pwritev = os.pwrite, os.pwritev

    def pwrite(fd: int, data, offset: int) -> int:  # noqa: ANN001
        before_write()
        return real_pwrite(fd, data, offset)

    def pwritev(fd: int, buffers, offset: int) -> int:  # noqa: ANN001
        before_write()
        return real_pwritev(fd, buffers, offset)

    os.pwrite, os.pwritev = pwrite, pwritev
    return real_pwrite, real_pwritev


def _restore(originals: tuple) -> None:
    os.pwrite, os.pwritev = originals


def count_writes(path: str, writes: list[tuple[int, bytes]]) -> int:
    calls = 0

    def count() -> None:
        nonlocal calls
        calls += 1

    originals = _intercept(count)
    try:
        with Chain.open(named(path), writable=True) as chain:
            for off, data in writes:
                chain.pwrite(off, data)
    finally:
        _restore(originals)
    return calls


def crash_after(path: str, writes: list[tuple[int, bytes]], n: int) -> int:
    """Apply writes until the nth write system call; return how many writes were
    acknowledged."""
    calls = 0

    def die_after_n() -> None:
        nonlocal calls
        calls += 1
        if calls > n:
            raise Killed()

    chain = Chain.open(named(path), writable=True)
    acked = 0
    originals = _intercept(die_after_n)
    try:
        for off, data in writes:
            chain.pwrite(off, data)
            acked += 1
    except Killed:
        pass
    finally:
        _restore(originals)
        for layer in chain.layers:  # the process is gone: no close, no footer rewrite
            os.close(layer.fd)
    return acked


def expected_after(base: bytes, writes: list[tuple[int, bytes]], acked: int) -> bytearray:
    shadow = bytearray(base)
    for off, data in writes[:acked]:
        shadow[off : off + len(data)] = data
    return shadow


def assert_consistent(path: str, base: bytes, writes: list[tuple[int, bytes]],
                      acked: int) -> None:
    # Our checker, with the reference's rules, accepts the image. (Not with -b: data
    # written before its bitmap bit is the safe intermediate state, and -b reports it.)
    result = vhd_check.check(path)
    assert result.errno == 0, (result.results[0].messages, acked)
    # ...and so does the command sm runs.
    proc = run([tool("vhd-util"), "check", "-n", path], text=True)
    assert proc.returncode == 0, proc.stdout
    with Chain.open(named(path)) as chain:
        got = bytes(chain.read(0, chain.sectors))
    want = expected_after(base, writes, acked)
    if acked < len(writes):
        # The interrupted write may have landed in part: each of its sectors holds either
        # the old or the new data.
        off, data = writes[acked]
        old = expected_after(base, writes, acked)
        for i in range(0, len(data), 512):
            sec = got[off + i : off + i + 512]
            assert sec in (bytes(old[off + i : off + i + 512]), data[i : i + 512]), (acked, i)
        want[off : off + len(data)] = got[off : off + len(data)]
    assert got == bytes(want), acked


@pytest.mark.parametrize("layout", ["dynamic", "differencing"])
def test_kill_at_every_write(tmp_path: Path, layout: str) -> None:
    template = str(tmp_path / "template.vhd")
    create(template, SIZE)
    base = bytes(SIZE)
    target = template
    if layout == "differencing":
        with Chain.open(named(template), writable=True) as chain:
            chain.pwrite(MB, os.urandom(3 * MB))
        with Chain.open(named(template)) as chain:
            base = bytes(chain.read(0, chain.sectors))
        target = str(tmp_path / "child.vhd")
        snapshot(target, template)
    writes = workload(len(layout))
    probe = str(tmp_path / "probe.vhd")
    shutil.copy(target, probe)
    if layout == "differencing":
        os.unlink(probe)
        snapshot(probe, template)
    total = count_writes(probe, writes)
    assert total > 20
    pristine = Path(target).read_bytes()
    for n in range(total + 1):
        Path(target).write_bytes(pristine)
        acked = crash_after(target, writes, n)
        assert_consistent(target, base, writes, acked)
    assert acked == len(writes)


def test_reopen_after_crash_reuses_leaked_space(tmp_path: Path) -> None:
    """A crash between the footer and the BAT update leaks space past the data; the next
    writer reuses it without inheriting stale bytes, and close trims the file."""
    path = str(tmp_path / "leak.vhd")
    create(path, SIZE)
    writes = [(0, b"\x11" * 4096)]
    acked = crash_after(path, writes, 3)  # footer, data, bitmap written; BAT not
    assert acked == 0
    leaked = os.path.getsize(path)
    assert leaked > 3584
    with Chain.open(named(path), writable=True) as chain:
        chain.pwrite(MB, b"\x22" * 512)
    assert os.path.getsize(path) < leaked + 512
    result = vhd_check.check(path, vhd_check.CheckOptions(check_bitmaps=True))
    assert result.errno == 0, result.results[0].messages
    with Chain.open(named(path)) as chain:
        assert chain.pread(0, 4096) == bytes(4096)
        assert chain.pread(MB, 512) == b"\x22" * 512
    with VhdImage.open(path) as img:
        assert img.footer_source == "primary"


def test_fileio_write_all_handles_short_writes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(8))
    fd = os.open(path, os.O_RDWR)
    real = os.pwrite
    os.pwrite = lambda f, d, o: real(f, bytes(memoryview(d)[:1]), o)  # one byte at a time
    try:
        fileio.pwrite_all(fd, b"abcdef", 1)
    finally:
        os.pwrite = real
        os.close(fd)
    assert path.read_bytes() == b"\0abcdef\0"


def test_fileio_writev_all_finishes_short_writes(tmp_path: Path) -> None:
    path = tmp_path / "v"
    path.write_bytes(bytes(10))
    fd = os.open(path, os.O_RDWR)
    real = os.pwritev
    os.pwritev = lambda f, bufs, o: real(f, [bytes(bufs[0])[:2]], o)  # stops after 2 bytes
    try:
        fileio.pwritev_all(fd, [b"abc", bytearray(b"de"), memoryview(b"fgh")], 1)
    finally:
        os.pwritev = real
        os.close(fd)
    assert path.read_bytes() == b"\0abcdefgh\0"
