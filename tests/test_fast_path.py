"""The synchronous fast path of the data path (issue 6), with real files and real peers.

- engines: ``try_preadv``/``try_pwritev`` on tmpfs (always), on the page cache (reads with
  RWF_NOWAIT, once cached; writes of whole pages), on O_DIRECT descriptors of a file on
  disk (never);
- drivers: ``read_now``/``write_now`` of aio and vhd (unallocated blocks, chains with empty
  layers skipped, bitmaps cached or not, held and unheld runs, the metadata lock busy,
  encrypted layers), every True checked against the data and every False against the
  files and counters it must not have changed;
- the VBD's side door: its refusals, and statistics equal to those of the slow path;
- the socket channel: the descriptor stays registered between reads, ``post()``;
- NBD end to end: libnbd with many requests in flight, qemu-img compare, a pipelined
  client that vanishes, and a flood beside a QD1 client;
- the NBD data hook (requests served from the readiness callback while the reader waits
  for a header), with raw sockets: requests split at every awkward place, mixed pipelines
  handed between the hook and the reader, bad magic, counters, flow control, a hook that
  raises, TLS (no hook), DISC, and a rejected write's payload that looks like requests.

Everything here runs with the NBD transport's compiled inline path turned off
(``BLKTAP_INLINE=0``): these are the Python path's tests, which stays the reference and
the fallback; tests/test_nbd_inline.py runs the compiled one against the same peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import inspect
import itertools
import json
import logging
import os
import random
import selectors
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from blktap.image import Chain
from blktap.image.crypto import key_hash
from blktap.image.vhd import VhdImage, create, snapshot
from blktap.image.vhd import check as vhd_check
from blktap.image.vhd.keyhash import KeyHash, write_keyhash
from blktap.io import syscalls
from blktap.io.buffers import BufferPool
from blktap.io.polling import polling_loop_factory
from blktap.io.threads import INLINE_MAX, ThreadEngine
from blktap.tapdisk.driver import Caps, Driver
from blktap.tapdisk.drivers import open_stack
from blktap.tapdisk.drivers.aio import AioDriver
from blktap.tapdisk.drivers.vhd import INLINE_CRYPT_SECTORS, VhdDriver
from blktap.tapdisk.vbd import VBD
from blktap.transport.nbd import connection as nbd_connection
from blktap.transport.nbd.connection import FAIRNESS_BUDGET, MAX_IN_FLIGHT, Connection
from blktap.transport.nbd.server import UNIX_SEND_BUFFER, Export, NbdServer, tls_context
from blktap.transport.sockio import (
    FIRST_RECV_BUFFER,
    HOOK_CHUNK,
    RECV_BUFFER,
    Channel,
    Closed,
)
from conftest import ROOT, need, with_engine
from nbd_helpers import REQUEST_MAGIC, SIMPLE, STRUCTURED, Wire
from test_nbd_protocol import make_cert  # a self-signed certificate for localhost

sys.path.insert(0, str(ROOT / "bench"))
from images import drop_cache  # noqa: E402  (bench/run.py's cold start of a disk image)

MiB = 1 << 20
KiB = 1 << 10
SECTOR = 512
BLOCK = 2 * MiB
SYSTEM_PYTHON = "/usr/bin/python3"
KEY = bytes(range(64))  # AES-256-XTS, halves differ
DEADLINE = 60.0  # seconds a condition may take to come true (never a timing assert)


@pytest.fixture(autouse=True)
def python_path_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLKTAP_INLINE", "0")


# ------------------------------------------------------------------------- turns
def count_loop_turns(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A counter (``[n]``) of the main thread's event loop turns (its epoll waits), for
    tests that count them instead of timing anything."""
    turns = [0]
    real = selectors.EpollSelector.select

    def select(self: selectors.EpollSelector, timeout: float | None = None) -> list:
        if threading.current_thread() is threading.main_thread():
            turns[0] += 1
        return real(self, timeout)
    monkeypatch.setattr(selectors.EpollSelector, "select", select)
    return turns


# ------------------------------------------------------------------------- places
def _in_memory(path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return syscalls.in_memory(fd)
    finally:
        os.close(fd)


@pytest.fixture
def shm() -> Iterator[Path]:
    """A private folder on tmpfs."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    folder = Path(tempfile.mkdtemp(prefix="blktap-fast-", dir="/dev/shm"))
    try:
        if not _in_memory(folder):
            pytest.skip("/dev/shm is not tmpfs here")
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A private folder on a file system backed by a device (not tmpfs)."""
    for base in (tmp_path, Path("/var/tmp"), ROOT.parent):
        if base.is_dir() and os.access(base, os.W_OK) and not _in_memory(base):
            folder = Path(tempfile.mkdtemp(prefix="blktap-fast-", dir=base))
            try:
                yield folder
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            return
    pytest.skip("no writable folder on a device-backed file system")


# ------------------------------------------------------------------------- helpers
arun = with_engine  # a body run with a 4-thread ThreadEngine on a fresh loop


def data(seed: int, length: int) -> bytes:
    return random.Random(seed).randbytes(length)


def view(length: int, fill: int = 0xEE) -> memoryview:
    """A buffer holding junk, so that "filled" is proven, not assumed."""
    return memoryview(bytearray([fill]) * length)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def chain_bytes(path: Path, key: bytes | None = None) -> bytes:
    with Chain.open(f"vhd:{path}", key=key) as c:
        return bytes(c.pread(0, c.size))


def check_ok(path: Path) -> bool:
    return vhd_check.check(str(path)).errno == 0


def qemu_compare(uri_or_path: str, raw: Path, fmt: str = "raw") -> None:
    res = subprocess.run([need("qemu-img"), "compare", "-f", fmt, "-F", "raw", uri_or_path,
                          str(raw)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Images are identical" in res.stdout


async def until(cond: Callable[[], bool], what: str) -> None:
    """Let the loop run until ``cond()`` holds (a deadline, not a timing assertion)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.005)


def read_now(drv: Driver, offset: int, iov: list[memoryview]) -> bool:
    """``drv.read_now(offset, iov)``, as the VBD calls it. Should the side door grow a
    list in which the layers below tally what they served (to be counted only once the
    whole read is done), the tally is applied on success as the VBD would, so that the
    counters mean the same under either signature."""
    if len(inspect.signature(drv.read_now).parameters) < 3:
        return drv.read_now(offset, iov)
    tally: list[tuple[Driver, int]] = []
    if not drv.read_now(offset, iov, tally):  # type: ignore[call-arg]
        return False
    for layer, sectors in tally:
        layer.hits[0] += sectors
    return True


def need_libnbd() -> None:
    if not os.path.exists(SYSTEM_PYTHON) or subprocess.run(
            [SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True).returncode:
        pytest.skip("python3-libnbd is not installed")


# ========================================================================= 1. engine
def test_engine_tmpfs_reads_fill_and_zero_fill_past_eof(shm: Path) -> None:
    content = data(1, 10000)
    path = shm / "f"
    path.write_bytes(content)

    async def body(engine: ThreadEngine) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            before = engine.inline_reads
            out = view(4096)
            assert engine.try_preadv(fd, [out], 0)
            assert bytes(out) == content[:4096]
            # Two buffers running past the end of the file: data, then zeros.
            a, b = view(3000), view(5000)
            assert engine.try_preadv(fd, [a, b], 4096)
            assert bytes(a) + bytes(b) == content[4096:] + bytes(8000 - (10000 - 4096))
            past = view(4096)
            assert engine.try_preadv(fd, [past], 20000)  # wholly past the end
            assert bytes(past) == bytes(4096)
            assert engine.inline_reads == before + 3
            # Over the engine's inline limit: the slow path's business.
            assert not engine.try_preadv(fd, [view(INLINE_MAX + 4096)], 0)
            assert engine.inline_reads == before + 3
        finally:
            engine.forget(fd)
            os.close(fd)
    arun(body)


def test_engine_o_direct_on_disk_never_inline(disk: Path) -> None:
    path = disk / "f"
    content = data(2, MiB)
    path.write_bytes(content)
    pool = BufferPool()

    async def body(engine: ThreadEngine) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_DIRECT)
        except OSError:
            pytest.skip("this file system refuses O_DIRECT")
        try:
            path.read_bytes()  # in the page cache: still not for a direct descriptor
            buf = pool.get(65536)
            before = (engine.inline_reads, engine.inline_writes)
            assert not engine.try_preadv(fd, [buf.view], 0)
            buf.view[:] = b"W" * 65536
            assert not engine.try_pwritev(fd, [buf.view], 0)
            assert (engine.inline_reads, engine.inline_writes) == before
            # The slow path does it (in a worker).
            await engine.preadv(fd, [buf.view], 65536)
            assert bytes(buf.view) == content[65536:131072]
        finally:
            engine.forget(fd)
            os.close(fd)
    arun(body)
    assert path.read_bytes() == content  # the refused write wrote nothing


def test_engine_page_cache_reads_inline_once_cached(disk: Path) -> None:
    path = disk / "f"
    content = data(3, 4 * MiB)
    path.write_bytes(content)

    async def body(engine: ThreadEngine) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            # The descriptor's mode is learnt on first use (a one-byte read at 0).
            engine.try_preadv(fd, [view(512)], 0)
            drop_cache(path)
            out = view(65536)
            assert not engine.try_preadv(fd, [out], 2 * MiB), "read a page not in cache"
            os.pread(fd, 65536, 2 * MiB)  # a blocking read brings it in
            before = engine.inline_reads
            out = view(65536)
            assert engine.try_preadv(fd, [out], 2 * MiB)
            assert bytes(out) == content[2 * MiB : 2 * MiB + 65536]
            assert engine.inline_reads == before + 1
            # Cached, but running past the end of the file: left to the slow path,
            # which reads the rest as zeros.
            os.pread(fd, 8192, 4 * MiB - 8192)
            tail = view(16384)
            assert not engine.try_preadv(fd, [tail], 4 * MiB - 8192)
            await engine.preadv(fd, [tail], 4 * MiB - 8192)
            assert bytes(tail) == content[-8192:] + bytes(8192)
        finally:
            engine.forget(fd)
            os.close(fd)
    arun(body)


def test_engine_writes_inline_on_tmpfs_and_whole_pages_of_the_page_cache(
        shm: Path, disk: Path) -> None:
    """tmpfs: any write. A buffered file on disk: whole pages at page offsets, without
    RWF_DSYNC (a copy into the page cache that reads nothing first); part of a page, or
    dsync, goes to a worker. An O_DIRECT descriptor: never."""
    mem, dev = shm / "m", disk / "d"
    mem.write_bytes(bytes(MiB))
    dev.write_bytes(bytes(MiB))

    async def body(engine: ThreadEngine) -> None:
        for path, in_memory in ((mem, True), (dev, False)):
            fd = os.open(path, os.O_RDWR)
            try:
                before = engine.inline_writes
                assert engine.try_pwritev(fd, [view(4096, 0x41), view(4096, 0x42)], 8192)
                assert engine.try_pwritev(fd, [view(512, 0x43)], 0, dsync=True) is in_memory
                assert engine.try_pwritev(fd, [view(4096, 0x44)], 512) is in_memory
                assert engine.try_pwritev(fd, [view(512, 0x45)], 4096) is in_memory
                assert engine.inline_writes == before + (4 if in_memory else 1)
                assert not engine.try_pwritev(fd, [view(INLINE_MAX + 4096)], 0)
            finally:
                engine.forget(fd)
                os.close(fd)
        fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
        try:
            assert not engine.try_pwritev(fd, [view(4096)], 0)  # (refused unread)
        finally:
            engine.forget(fd)
            os.close(fd)
    arun(body)
    want = bytearray(MiB)
    want[8192:16384] = b"A" * 4096 + b"B" * 4096
    assert dev.read_bytes() == want  # the whole pages only
    want[0:512] = b"C" * 512
    want[512:4608] = b"D" * 4096
    want[4096:4608] = b"E" * 512
    assert mem.read_bytes() == want


# ========================================================================= 2. drivers
def test_aio_read_now_write_now(shm: Path, disk: Path) -> None:
    content = data(4, 4 * MiB)
    mem = shm / "raw.img"
    mem.write_bytes(content)
    dev = disk / "raw.img"
    dev.write_bytes(content)
    pool = BufferPool()
    model = bytearray(content)

    async def body(engine: ThreadEngine) -> None:
        drv = await engine.call(open_stack, engine, f"aio:{mem}", writable=True)
        assert isinstance(drv, AioDriver)
        try:
            out = view(65536)
            assert read_now(drv, MiB, [out])
            assert bytes(out) == content[MiB : MiB + 65536]
            a, b = view(512), view(3584)
            assert read_now(drv, 4 * MiB - 4096, [a, b])
            assert bytes(a) + bytes(b) == content[-4096:]
            assert drv.write_now(8192, [memoryview(b"w" * 8192)], fua=True)
            model[8192:16384] = b"w" * 8192
            out = view(16384)
            assert read_now(drv, 4096, [out])
            assert bytes(out) == model[4096 : 4096 + 16384]
        finally:
            await drv.close()
        ro = await engine.call(open_stack, engine, f"aio:{mem}", writable=False)
        try:
            assert not ro.write_now(0, [memoryview(b"x" * 512)])
        finally:
            await ro.close()
        # On disk, with a direct descriptor for aligned buffers: never at once.
        drv = await engine.call(open_stack, engine, f"aio:{dev}", writable=True)
        assert isinstance(drv, AioDriver)
        try:
            if drv.dfd is None:
                pytest.skip("this file system refuses O_DIRECT")
            buf = pool.get(65536)
            assert drv._fd_for(0, [buf.view]) == drv.dfd
            assert not read_now(drv, 0, [buf.view])
            buf.view[:] = b"Z" * 65536
            assert not drv.write_now(0, [buf.view])
            await drv.read(0, [buf.view])
            assert bytes(buf.view) == content[:65536]
            # A buffer off the block boundary: the buffered descriptor, the right bytes.
            odd = memoryview(bytearray(65536 + 1))[1:]
            assert drv._fd_for(0, [odd]) == drv.fd
            await drv.read(0, [odd])
            assert bytes(odd) == content[:65536]
        finally:
            await drv.close()
    arun(body)
    assert mem.read_bytes() == model
    assert dev.read_bytes() == content


# ----------------------------------------------------------------- vhd chains on tmpfs
def make_chain(folder: Path, size: int = 16 * MiB) -> tuple[Path, Path, Path]:
    """base <- mid (empty) <- leaf.

    base: block 0 [0, 64K), block 1 [2M+4K, 2M+8K), block 2 [4M+8K, 4M+24K), block 5
    whole (the batmap says full). leaf: block 0 [32K, 40K), block 3 [6M, 6M+4K)."""
    base, mid, leaf = folder / "base.vhd", folder / "mid.vhd", folder / "leaf.vhd"
    create(str(base), size)
    with Chain.open(f"vhd:{base}", writable=True) as c:
        c.pwrite(0, data(10, 65536))
        c.pwrite(2 * MiB + 4096, data(11, 4096))
        c.pwrite(4 * MiB + 8192, data(12, 16384))
        c.pwrite(10 * MiB, data(13, BLOCK))
    snapshot(str(mid), str(base), skip_empty=False)
    snapshot(str(leaf), str(mid), skip_empty=False)
    with Chain.open(f"vhd:{leaf}", writable=True) as c:
        c.pwrite(32768, data(14, 8192))
        c.pwrite(6 * MiB, data(15, 4096))
    return base, mid, leaf


def hits(drv: Driver) -> list[list[int]]:
    return [list(d.hits) + list(d.fail) for d in drv.chain()]


# Requests the chain serves at once once its bitmaps are cached, and why:
CHAIN_READS = [
    (14 * MiB, 65536),           # nobody holds block 7: zeros, mid and base skipped
    (10 * MiB + 4096, 8192),     # base's full block (batmap): at once even cold
    (4 * MiB, 32768),            # base's partial block 2, held and unheld runs
    (16384, 32768),              # leaf's block 0: unheld, held, unheld -> base
    (6 * MiB, 4096),             # held by the leaf
    (8 * MiB - 4096, 8192),      # across blocks 3 and 4, none held: one forward
]


def test_vhd_read_now_cold_then_cached(shm: Path) -> None:
    """Cold bitmaps answer False (changing no counter); a slow read caches them, then the
    same read is served at once. Unallocated and batmap-full blocks are served cold."""
    _, _, leaf = make_chain(shm)
    model = chain_bytes(leaf)

    async def body(engine: ThreadEngine) -> None:
        top = await engine.call(open_stack, engine, f"vhd:{leaf}", writable=False)
        assert isinstance(top, VhdDriver)
        layers = top.chain()
        base = layers[2]
        assert isinstance(base, VhdDriver)
        try:
            # Cold, but nothing to look up: served at once.
            for off, n in CHAIN_READS[:2]:
                out = view(n)
                assert read_now(top, off, [out]), (off, n)
                assert bytes(out) == model[off : off + n]
            # Cold bitmap in the base (block 2): False, nothing counted, then cached.
            off, n = CHAIN_READS[2]
            before = hits(top)
            assert not base.image.bitmap_cached(2)
            assert not read_now(top, off, [view(n)])
            assert hits(top) == before
            await top.read(off, [view(n)])
            assert base.image.bitmap_cached(2)
            out = view(n)
            assert read_now(top, off, [out])
            assert bytes(out) == model[off : off + n]
            # Cold bitmap in the leaf (block 3).
            off, n = CHAIN_READS[4]
            assert not top.image.bitmap_cached(3)
            assert not read_now(top, off, [view(n)])
            await top.read(off, [view(n)])
            assert top.image.bitmap_cached(3)
            out = view(n)
            assert read_now(top, off, [out])
            assert bytes(out) == model[off : off + n]
            # Held and unheld runs of the leaf's block 0 over the base's block 0.
            off, n = CHAIN_READS[3]
            assert not read_now(top, off, [view(n)])
            await top.read(off, [view(n)])
            assert top.image.bitmap_cached(0) and base.image.bitmap_cached(0)
            out = view(n)
            assert read_now(top, off, [out])
            assert bytes(out) == model[off : off + n]
            # Across two buffers, one sector split between them.
            a, b = view(700), view(n - 700)
            assert read_now(top, off, [a, b])
            assert bytes(a) + bytes(b) == model[off : off + n]
        finally:
            for d in layers:
                await d.close()
    arun(body)


def test_vhd_read_now_counts_like_the_slow_path(shm: Path) -> None:
    """Two stacks over the same chain, warmed the same way: the requests served at once
    by one and by the coroutines of the other leave equal hit counters in every layer
    (the empty middle layer and the base are skipped the same way) and equal VBD stats."""
    _, _, leaf = make_chain(shm)
    model = chain_bytes(leaf)

    async def body(engine: ThreadEngine) -> tuple[list, list, dict, dict]:
        vbds = []
        for _ in range(2):
            drv = await engine.call(open_stack, engine, f"vhd:{leaf}", writable=False)
            vbds.append(VBD(drv, read_only=True))
        fast, slow = vbds
        try:
            for vbd in vbds:  # warm the bitmaps, the same way for both
                for off, n in CHAIN_READS:
                    await vbd.read(off, view(n))
            for off, n in CHAIN_READS * 3:
                out = view(n)
                assert fast.read_now(off, out), (off, n)
                assert bytes(out) == model[off : off + n]
                out = view(n)
                await slow.read(off, out)
                assert bytes(out) == model[off : off + n]
            return (hits(fast.driver), hits(slow.driver), fast.stats.as_dict(),
                    slow.stats.as_dict())
        finally:
            for vbd in vbds:
                await vbd.close()
    fast_hits, slow_hits, fast_stats, slow_stats = arun(body)  # type: ignore[misc]
    assert fast_hits == slow_hits
    assert fast_stats == slow_stats
    # Skipped layers were counted: mid and base saw what the leaf forwarded.
    assert fast_hits[1][0] > 0 and fast_hits[2][0] > 0


def test_vhd_read_now_failing_part_way_changes_no_counter(shm: Path) -> None:
    """A read_now that fails part way (a later run cannot be served at once) leaves
    every layer's counters as they were: the slow read that follows counts them once.
    (Regression: forwarded runs were counted as each succeeded; fixed in ccf3c61.)"""
    _, _, leaf = make_chain(shm)

    async def body(engine: ThreadEngine) -> None:
        top = await engine.call(open_stack, engine, f"vhd:{leaf}", writable=False)
        assert isinstance(top, VhdDriver)
        base = top.chain()[2]
        assert isinstance(base, VhdDriver)
        try:
            await top.read(0, [view(4096)])  # caches the leaf's and base's block 0
            assert not base.image.bitmap_cached(1)
            # Leaf runs: [16K, 32K) -> base block 0 (served), [32K, 40K) held, then
            # [40K, 2M+64K) -> base blocks 0 and 1, whose bitmap is not cached.
            before = hits(top)
            assert not read_now(top, 16384, [view(2 * MiB + 65536 - 16384)])
            assert hits(top) == before, "read_now answered False but moved counters"
        finally:
            for d in top.chain():
                await d.close()
    arun(body)


def make_single(folder: Path, size: int = 8 * MiB) -> tuple[Path, bytearray]:
    """A dynamic VHD without parent: block 0 holds [0, 64K), block 1 is whole."""
    path = folder / "disk.vhd"
    create(str(path), size)
    model = bytearray(size)
    with Chain.open(f"vhd:{path}", writable=True) as c:
        for off, chunk in ((0, data(20, 65536)), (BLOCK, data(21, BLOCK))):
            c.pwrite(off, chunk)
            model[off : off + len(chunk)] = chunk
    return path, model


def test_vhd_write_now(shm: Path) -> None:
    """False (file untouched) for sectors not held, whether the block is allocated or not
    and its bitmap cached or not; True for held sectors (data where the library, our check
    and qemu-img find it); False while another thread holds the metadata lock."""
    path, model = make_single(shm)

    async def body(engine: ThreadEngine) -> None:
        drv = await engine.call(open_stack, engine, f"vhd:{path}", writable=True)
        assert isinstance(drv, VhdDriver)
        try:
            img = drv.image
            bat = bytes(img.bat)

            def untouched() -> None:
                assert bytes(img.bat) == bat
                assert digest(path) == stored

            stored = digest(path)
            # Unallocated block 2: allocating is the slow path's job.
            assert not drv.write_now(2 * BLOCK, [memoryview(b"u" * 4096)])
            untouched()
            # Block 0 allocated, bitmap not cached: not even looked at.
            assert not img.bitmap_cached(0)
            assert not drv.write_now(4096, [memoryview(b"h" * 4096)])
            untouched()
            await drv.read(0, [view(512)])  # caches block 0's bitmap
            assert img.bitmap_cached(0)
            # Allocated block, sectors not held (and a range half held): still False.
            assert not drv.write_now(128 * KiB, [memoryview(b"n" * 4096)])
            assert not drv.write_now(64 * KiB - 4096, [memoryview(b"n" * 8192)])
            untouched()
            # Held sectors: at once, the data only.
            assert drv.write_now(4096, [memoryview(b"h" * 4096)])
            model[4096:8192] = b"h" * 4096
            assert drv.write_now(8192, [memoryview(b"f" * 1000), memoryview(b"g" * 3096)],
                                 fua=True)
            model[8192:12288] = b"f" * 1000 + b"g" * 3096
            # A block the batmap says is full: no bitmap needed.
            assert not img.bitmap_cached(1)
            assert drv.write_now(BLOCK + MiB, [memoryview(b"F" * 65536)])
            model[BLOCK + MiB : BLOCK + MiB + 65536] = b"F" * 65536
            assert bytes(img.bat) == bat

            # The metadata lock busy in another thread: nothing that needs it is done
            # at once; what needs no metadata (a block nobody holds) still is.
            taken, release = threading.Event(), threading.Event()

            def holder() -> None:
                with drv.lock:
                    taken.set()
                    release.wait(DEADLINE)
            t = threading.Thread(target=holder)
            t.start()
            try:
                assert taken.wait(DEADLINE)
                before = digest(path)
                assert not drv.write_now(4096, [memoryview(b"L" * 4096)])
                assert not read_now(drv, 4096, [view(4096)])
                assert digest(path) == before
                out = view(4096)
                assert read_now(drv, 3 * BLOCK, [out])
                assert bytes(out) == bytes(4096)
            finally:
                release.set()
                t.join()
            assert drv.write_now(4096, [memoryview(b"L" * 4096)])
            model[4096:8192] = b"L" * 4096
        finally:
            await drv.close()
        ro = await engine.call(open_stack, engine, f"vhd:{path}", writable=False)
        try:
            await ro.read(0, [view(512)])
            assert not ro.write_now(0, [memoryview(b"r" * 512)])
        finally:
            await ro.close()
    arun(body)
    assert chain_bytes(path) == model
    assert check_ok(path)
    raw = path.with_suffix(".raw")
    raw.write_bytes(model)
    qemu_compare(str(path), raw, fmt="vpc")


def test_vhd_write_now_refusal_across_blocks_writes_nothing(shm: Path) -> None:
    """A write_now spanning blocks that refuses because a later run is over the inline
    limit has written nothing. (Regression: the first runs were written; fixed in
    ccf3c61.)"""
    path = shm / "full.vhd"
    create(str(path), 8 * MiB)
    with Chain.open(f"vhd:{path}", writable=True) as c:
        c.pwrite(0, data(30, 3 * BLOCK))  # blocks 0-2 whole: the batmap says full

    async def body(engine: ThreadEngine) -> bool:
        drv = await engine.call(open_stack, engine, f"vhd:{path}", writable=True)
        try:
            # Runs: 512 KiB of block 0, all 2 MiB of block 1, 512 KiB of block 2.
            return drv.write_now(BLOCK - 512 * KiB, [memoryview(b"X" * 3 * MiB)])
        finally:
            await drv.close()
    before = chain_bytes(path)
    served = arun(body)
    assert served or chain_bytes(path) == before, "answered False but wrote part of it"


def make_encrypted(path: Path, size: int = 8 * MiB) -> None:
    create(str(path), size)
    with VhdImage.open(str(path), writable=True) as img:
        nonce = bytes(32)
        write_keyhash(img, KeyHash(1, nonce, key_hash(KEY, nonce)))


def test_vhd_encrypted_small_at_once_large_not(shm: Path) -> None:
    path = shm / "enc.vhd"
    make_encrypted(path)
    first = data(40, 256 * KiB)
    small = INLINE_CRYPT_SECTORS * SECTOR
    model = bytearray(8 * MiB)

    async def body(engine: ThreadEngine) -> None:
        drv = await engine.call(open_stack, engine, f"vhd:{path}", writable=True, key=KEY)
        assert isinstance(drv, VhdDriver) and drv.cipher is not None
        try:
            await drv.write(0, [memoryview(first)])  # allocates: the slow path
            model[: len(first)] = first
            await drv.read(0, [view(512)])
            # Small held reads: decrypted at once; large ones go to a worker.
            out = view(small)
            assert read_now(drv, 4096, [out])
            assert bytes(out) == first[4096 : 4096 + small]
            assert not read_now(drv, 0, [view(small + SECTOR)])
            # A large range holding few sectors here: the rest is plain zeros.
            out = view(65536)
            assert read_now(drv, 256 * KiB - small, [out])
            assert bytes(out) == first[-small:] + bytes(65536 - small)
            # Small held writes: encrypted at once, the caller's buffer untouched.
            plain = data(41, small)
            buf = memoryview(bytearray(plain))
            assert drv.write_now(8192, [buf])
            assert bytes(buf) == plain
            model[8192 : 8192 + small] = plain
            out = view(small)
            assert read_now(drv, 8192, [out])
            assert bytes(out) == plain
            before = digest(path)
            assert not drv.write_now(0, [memoryview(b"B" * (small + SECTOR))])
            assert digest(path) == before
        finally:
            await drv.close()
    arun(body)
    assert chain_bytes(path, KEY) == model
    with Chain.open(f"vhd:{path}", ciphertext=True) as c:
        assert bytes(c.pread(8192, small)) != model[8192 : 8192 + small]
    assert model[8192 : 8192 + small] not in path.read_bytes()
    assert check_ok(path)


# ========================================================================= 3. VBD
class Exploding(Driver):
    """The side door raises; the coroutines work."""

    name = "exploding"

    def __init__(self, engine: ThreadEngine) -> None:
        super().__init__(engine, MiB, writable=True)
        self.caps = Caps.WRITE | Caps.FLUSH

    def read_now(self, offset: int, iov, *tally) -> bool:  # noqa: ANN001, ANN002
        raise OSError(errno.EIO, "side door broken")

    def write_now(self, offset: int, iov, *, fua: bool = False) -> bool:  # noqa: ANN001
        raise OSError(errno.EIO, "side door broken")

    async def read(self, offset: int, iov) -> None:  # noqa: ANN001
        for v in iov:
            v[:] = b"r" * len(v)

    async def write(self, offset: int, iov, *, fua: bool = False) -> None:  # noqa: ANN001
        return None


def test_vbd_refusals_count_nothing(shm: Path) -> None:
    path = shm / "raw.img"
    content = data(50, 4 * MiB)
    path.write_bytes(content)

    async def body(engine: ThreadEngine) -> None:
        drv = await engine.call(open_stack, engine, f"aio:{path}", writable=True)
        vbd = VBD(drv)
        size = vbd.size
        snapshot_ = (vbd.stats.as_dict(), hits(drv))
        refused = [(100, 4096), (4096, 1000), (4096, 0), (size - 4096, 8192), (size, 512)]
        for off, n in refused:
            assert not vbd.read_now(off, view(n)), (off, n)
            assert not vbd.write_now(off, memoryview(b"x" * n)), (off, n)
        assert (vbd.stats.as_dict(), hits(drv)) == snapshot_
        assert path.read_bytes() == content
        # Served: counted once each.
        out = view(8192)
        assert vbd.read_now(size - 8192, out)
        assert bytes(out) == content[-8192:]
        assert vbd.write_now(0, memoryview(b"w" * 4096))
        st = vbd.stats
        assert (st.submitted, st.read_reqs, st.read_sectors, st.write_reqs,
                st.write_sectors) == (2, 1, 16, 1, 8)
        assert drv.hits == [16, 8]

        # Paused: refused (the stack is closed); resumed on a new stack: served again.
        await vbd.pause()
        assert not vbd.read_now(0, view(4096))
        assert not vbd.write_now(0, memoryview(b"p" * 4096))
        drv2 = await engine.call(open_stack, engine, f"aio:{path}", writable=True)
        await vbd.resume(drv2)
        out = view(4096)
        assert vbd.read_now(0, out)
        assert bytes(out) == b"w" * 4096
        assert vbd.write_now(4096, memoryview(b"q" * 4096))
        # Closed: refused.
        await vbd.close()
        assert not vbd.read_now(0, view(4096))
        assert not vbd.write_now(0, memoryview(b"c" * 4096))

        # Read-only: reads at once, writes never.
        drv3 = await engine.call(open_stack, engine, f"aio:{path}", writable=False)
        ro = VBD(drv3, read_only=True)
        assert ro.read_now(0, view(4096))
        assert not ro.write_now(0, memoryview(b"r" * 4096))
        assert ro.stats.write_reqs == 0 and ro.stats.submitted == 1
        await ro.close()

        # A driver whose side door raises: False, nothing counted; the slow path serves.
        ex = VBD(Exploding(engine))
        assert not ex.read_now(0, view(4096))
        assert not ex.write_now(0, memoryview(b"e" * 4096))
        assert ex.stats.submitted == 0 and ex.driver.hits == [0, 0]
        out = view(4096)
        await ex.read(0, out)
        assert bytes(out) == b"r" * 4096
        assert ex.stats.read_reqs == 1 and ex.stats.read_errors == 0
        await ex.close()
    arun(body)
    want = bytearray(content)
    want[0:8192] = b"w" * 4096 + b"q" * 4096
    assert path.read_bytes() == want


@pytest.mark.parametrize("kind", ["raw", "vhd"])
def test_vbd_stats_equal_to_the_slow_path(shm: Path, kind: str) -> None:
    """The same aligned reads and writes, at once on one copy and through the coroutines
    on another: same content, same VBD statistics, same per-layer counters."""
    copies = []
    for name in ("a", "b"):
        folder = shm / name
        folder.mkdir()
        if kind == "raw":
            p = folder / "raw.img"
            p.write_bytes(data(60, 8 * MiB))
        else:
            p, _ = make_single(folder)
        copies.append(p)
    rng = random.Random(61)
    # Held places only (for vhd: block 0's first 64K and block 1).
    places = [(0, 4096), (8192, 8192), (BLOCK, 65536), (BLOCK + 4096, MiB), (32768, 32768)]
    ops = [(rng.random() < 0.5, *rng.choice(places)) for _ in range(60)]
    spec = "aio" if kind == "raw" else "vhd"

    async def body(engine: ThreadEngine) -> tuple[list, list]:
        results = []
        for i, path in enumerate(copies):
            drv = await engine.call(open_stack, engine, f"{spec}:{path}", writable=True)
            vbd = VBD(drv)
            await vbd.read(0, view(512))  # the same warm-up on both
            reads = []
            for j, (write, off, n) in enumerate(ops):
                if write:
                    payload = memoryview(data(1000 + j, n))
                    if i == 0:
                        assert vbd.write_now(off, payload), (off, n)
                    else:
                        await vbd.write(off, payload)
                else:
                    out = view(n)
                    if i == 0:
                        assert vbd.read_now(off, out), (off, n)
                    else:
                        await vbd.read(off, out)
                    reads.append(hashlib.sha256(out).hexdigest())
            results.append((reads, vbd.stats.as_dict(), hits(drv)))
            await vbd.close()
        return results
    (ra, sa, ha), (rb, sb, hb) = arun(body)  # type: ignore[misc]
    assert ra == rb
    assert sa == sb
    assert ha == hb
    assert sa["read_reqs"] + sa["write_reqs"] == len(ops) + 1  # and the warm-up
    if kind == "raw":
        assert digest(copies[0]) == digest(copies[1])
    else:  # (each copy has its own uuid and timestamps)
        assert chain_bytes(copies[0]) == chain_bytes(copies[1])
        assert all(check_ok(p) for p in copies)


# ========================================================================= 5. channel
class LoopSpy:
    """Counts the loop's add_reader/remove_reader calls for one descriptor."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self.loop, self.fd = loop, fd
        self.add = self.remove = 0
        self._add, self._remove = loop.add_reader, loop.remove_reader

        def add_reader(fd: int, cb: Callable, *args: object) -> None:
            if fd == self.fd:
                self.add += 1
            self._add(fd, cb, *args)

        def remove_reader(fd: int) -> bool:
            if fd == self.fd:
                self.remove += 1
            return self._remove(fd)
        loop.add_reader = add_reader  # type: ignore[method-assign]
        loop.remove_reader = remove_reader  # type: ignore[method-assign]

    def restore(self) -> None:
        self.loop.add_reader = self._add  # type: ignore[method-assign]
        self.loop.remove_reader = self._remove  # type: ignore[method-assign]


U32 = struct.Struct(">I")


def _count_waits(ch: Channel) -> list[int]:
    """[waits, readiness callbacks] of a channel, counted from now on."""
    counts = [0, 0]
    real_wait, real_readable = ch._wait_readable, ch._readable

    async def wait() -> None:
        counts[0] += 1
        await real_wait()

    def readable() -> None:
        counts[1] += 1
        real_readable()
    ch._wait_readable = wait  # type: ignore[method-assign]
    ch._readable = readable  # type: ignore[method-assign]
    return counts


async def _exchange(ch: Channel, peer: socket.socket, n: int) -> None:
    """``n`` messages, each sent only once the reader waits for it."""
    got: list[int] = []

    async def reader() -> None:
        for _ in range(n):
            await ch.fill(U32.size)
            got.append(ch.unpack(U32)[0])
    task = asyncio.get_running_loop().create_task(reader())
    for i in range(n):
        await until(lambda i=i: len(got) == i and bool(ch._read_waiters), "reader waiting")
        peer.send(U32.pack(i))
    await task
    assert got == list(range(n))


def test_channel_stays_registered_between_reads() -> None:
    async def body() -> None:
        a, b = socket.socketpair()
        ch = Channel(a)
        spy = LoopSpy(asyncio.get_running_loop(), ch.fd)
        counts = _count_waits(ch)
        try:
            await _exchange(ch, b, 20)
            assert counts[0] >= 20  # the reader waited for every message
            assert spy.add == 1  # ... registered once for all of them
            # The reader is done: a readiness that finds nobody waiting (the last one
            # still queued, or data arriving now) unregisters the descriptor, once; the
            # loop does not spin on the unread data.
            b.send(U32.pack(99))
            await until(lambda: not ch._watching, "unregistered")
            assert spy.remove == 1
            fired = counts[1]
            for _ in range(50):
                await asyncio.sleep(0)
            assert counts[1] == fired
            # The data waiting is read without registering again; the next wait does.
            await ch.fill(U32.size)
            assert ch.unpack(U32) == (99,)
            assert spy.add == 1
            await _exchange(ch, b, 3)
            assert spy.add == 2
        finally:
            spy.restore()
            ch.close()
            b.close()
    asyncio.run(body())


def test_channel_one_wait_per_message() -> None:
    """One wait per message: a readiness the loop saw before the reader took the data
    does not wake the next waiter for nothing (a task step and a recv() answering
    EAGAIN). (Regression: fixed in cfd850c.)"""
    async def body() -> list[int]:
        a, b = socket.socketpair()
        ch = Channel(a)
        counts = _count_waits(ch)
        try:
            await _exchange(ch, b, 20)
            return counts
        finally:
            ch.close()
            b.close()
    counts = asyncio.run(body())
    assert counts[0] == 20, f"{counts[0]} waits for 20 messages"


@contextlib.contextmanager
def channel_with_peer() -> Iterator[tuple[Channel, socket.socket]]:
    """A Channel on one end of a socket pair, and the other end; both closed after."""
    a, b = socket.socketpair()
    ch = Channel(a)
    try:
        yield ch, b
    finally:
        ch.close()
        b.close()


class CountedReceives:
    """A socket whose recv_into calls are counted (what each got), for a test to see
    which receives the channel made itself."""

    def __init__(self, sock: socket.socket, counts: list[int]) -> None:
        self._sock, self._counts = sock, counts

    def recv_into(self, view: Any, *args: Any) -> int:
        got = self._sock.recv_into(view, *args)
        self._counts.append(got)
        return got

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


# The loops a channel's receives are tested on: asyncio's own; the polling one that
# tapdisk and serve run, whose wait receives a payload into place itself; and that one
# with polling off (the wait still receives, sleeping between chunks).
LOOPS = {
    "asyncio": asyncio.SelectorEventLoop,
    "polling": polling_loop_factory(32),
    "polling-off": polling_loop_factory(0),
}


@pytest.mark.parametrize("loop", list(LOOPS))
def test_channel_receives_a_payload_straight_into_its_place(loop: str) -> None:
    """Channel.receive_direct: the rest of a message goes from the socket straight into
    the view given, received by the readiness callback (no reader, not through the
    receive buffer, which does not grow), however the peer cuts it; done(None) once,
    and the data hook then runs on what follows, in the same readiness. The stream
    ending first, cancel_direct and close each give done(Closed) once; the hook sees
    nothing of the payload. Bytes already buffered refuse it. On a polling loop (what
    tapdisk and serve run) the selector's wait receives every chunk of the payload
    itself: the channel's own recv runs for none of them."""
    async def body() -> None:
        done: list[BaseException | None] = []
        with channel_with_peer() as (ch, b):
            recvs: list[int] = []
            ch.sock = CountedReceives(ch.sock, recvs)  # type: ignore[assignment]
            hooked = bytearray()
            stuck: list[bool] = []

            def hook() -> bool:
                hooked.extend(ch.view[ch.start : ch.end])
                ch.consume(ch.end - ch.start)
                return True
            ch.on_data = hook
            ch.serve_from_hook(lambda: stuck.append(True))
            payload = random.Random(1).randbytes(300_000)
            dest = bytearray(len(payload))
            ch.receive_direct(memoryview(dest), done.append)
            with pytest.raises(RuntimeError):  # one at a time
                ch.receive_direct(memoryview(bytearray(1)), done.append)
            stream = payload + b"what follows"
            for i in range(0, len(stream), 70_001):
                b.sendall(stream[i : i + 70_001])
                await asyncio.sleep(0.002)
            await until(lambda: hooked == b"what follows", "the hook given what follows")
            assert done == [None] and dest == payload and not stuck
            if loop == "asyncio":
                assert sum(recvs) == len(stream)
            else:  # the payload's chunks came in the wait, only what follows here
                assert recvs == [len(b"what follows")]
            assert len(ch.buf) == FIRST_RECV_BUFFER
            # The stream ends mid-payload: Closed, then the usual end of stream.
            dest = bytearray(1000)
            ch.receive_direct(memoryview(dest), done.append)
            b.sendall(b"x" * 500)
            b.close()
            await until(lambda: bool(stuck), "the end of stream seen")
            assert len(done) == 2 and isinstance(done[1], Closed)
            assert dest[:500] == b"x" * 500 and hooked == b"what follows"

        done.clear()
        with channel_with_peer() as (ch, b):
            ch.receive_direct(memoryview(bytearray(10)), done.append)
            ch.cancel_direct()
            ch.cancel_direct()  # (nothing under way: nothing to tell)
            assert len(done) == 1 and isinstance(done[0], Closed)
            ch.receive_direct(memoryview(bytearray(10)), done.append)
            ch.close()
            assert len(done) == 2 and isinstance(done[1], Closed)

        with channel_with_peer() as (ch, b):
            b.sendall(b"12345678")
            await ch.fill(8)
            ch.consume(4)
            with pytest.raises(RuntimeError):  # (those 4 bytes are the message's)
                ch.receive_direct(memoryview(bytearray(10)), done.append)
            assert len(done) == 2
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(body())


@pytest.mark.parametrize("loop", list(LOOPS))
def test_after_a_payload_received_into_place_the_next_comes_in_chunks(loop: str) -> None:
    """After a payload received into its place (the hook had its header), the hook's
    next receives are chunks (HOOK_CHUNK first): of the large messages waiting behind
    it, the hook has no more than a chunk to copy out of the receive buffer before it
    receives the rest into place too (not all the buffer can hold). Every payload
    arrives whole and in order, and so do the small messages behind them, taken whole
    by the hook."""
    async def body() -> None:
        with channel_with_peer() as (ch, b):
            b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            messages: list[bytes] = []
            copied: list[int] = []  # bytes of each payload taken from the buffer

            def hook() -> bool:
                while ch.buffered >= 4:
                    n = int.from_bytes(ch.view[ch.start : ch.start + 4], "big")
                    have = min(n, ch.buffered - 4)
                    dest = bytearray(n)
                    dest[:have] = ch.view[ch.start + 4 : ch.start + 4 + have]
                    ch.consume(4 + have)
                    copied.append(have)
                    if have == n:
                        messages.append(bytes(dest))
                        continue
                    ch.receive_direct(memoryview(dest)[have:],
                                      lambda exc, d=dest: messages.append(bytes(d)))
                    return True
                return True
            stuck: list[bool] = []
            ch.on_data = hook
            ch.serve_from_hook(lambda: stuck.append(True))
            rng = random.Random(7)
            sent = [rng.randbytes(60_000)] + [rng.randbytes(40_000 + i) for i in range(3)]
            sent += [rng.randbytes(100) for _ in range(20)]
            stream = b"".join(len(m).to_bytes(4, "big") + m for m in sent)
            # The first message's start: the hook receives the rest of it into place.
            b.sendall(stream[:1004])
            await until(lambda: copied == [1000], "the first payload begun")
            b.sendall(stream[1004:])  # all the rest waits in the socket at once
            await until(lambda: len(messages) == len(sent), "every message")
            assert messages == sent and not stuck
            assert copied[1:4] == [HOOK_CHUNK - 4] * 3, copied[:4]
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(body())


@pytest.mark.parametrize("loop", list(LOOPS))
def test_a_reset_mid_payload_ends_the_receive_into_place(loop: str) -> None:
    """The peer resets the stream (it closes with bytes of ours unread) while a payload
    is received into its place: what came is there, and done gets Closed saying so,
    whichever receive met the reset (the channel's, or the polling loop's wait, which
    keeps its errno for the channel)."""
    async def body() -> None:
        done: list[BaseException | None] = []
        with channel_with_peer() as (ch, b):
            ch.on_data = lambda: True
            ch.serve_from_hook(lambda: None)
            dest = bytearray(1000)
            ch.receive_direct(memoryview(dest), done.append)
            ch.sock.send(b"never read")
            b.sendall(b"x" * 500)
            await until(lambda: dest[:500] == b"x" * 500, "the first bytes in place")
            b.close()  # (the reset is then met by the next receive on its own)
            await until(lambda: bool(done), "the receive ended")
            assert len(done) == 1 and isinstance(done[0], Closed)
            assert "reset" in str(done[0]).lower(), done[0]
            assert dest[:500] == b"x" * 500 and dest[500:] == bytes(500)
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(body())


def test_channel_post_callbacks() -> None:
    async def body() -> None:
        a, b = socket.socketpair()
        ch = Channel(a)
        calls: list[tuple[object, BaseException | None]] = []

        def done(exc: BaseException | None, arg: object) -> None:
            calls.append((arg, exc))
        try:
            ch.post([b"hello ", memoryview(b"world")], done, 1)
            ch.post([b"!"], done, 2)
            assert calls == []  # queued for the end of the turn
            await asyncio.sleep(0)
            assert calls == [(1, None), (2, None)]
            assert b.recv(100) == b"hello world!"
        finally:
            ch.close()
            b.close()

        # The peer is gone: Closed.
        a, b = socket.socketpair()
        ch = Channel(a)
        calls.clear()
        b.close()
        ch.post([b"nobody"], done, 4)
        await until(lambda: bool(calls), "callback")
        assert calls[0][0] == 4 and isinstance(calls[0][1], Closed)
        # A message stuck behind a full socket, then the peer goes: Closed too.
        a2, b2 = socket.socketpair()
        ch2 = Channel(a2)
        calls.clear()
        ch2.post([bytes(16 * MiB)], done, 5)
        await asyncio.sleep(0)
        assert calls == []
        b2.close()
        await until(lambda: bool(calls), "callback")
        assert calls[0][0] == 5 and isinstance(calls[0][1], Closed)
        # Posting to a closed channel: at once.
        ch.close()
        ch2.close()
        calls.clear()
        ch.post([b"late"], done, 6)
        assert calls[0][0] == 6 and isinstance(calls[0][1], Closed)
    asyncio.run(body())


def test_channel_flushes_posted_replies_before_waiting() -> None:
    """A reader that posts replies and goes back to waiting for requests sends them
    before it waits, not a turn of the loop later."""
    async def body() -> None:
        a, b = socket.socketpair()
        ch = Channel(a)
        seen: list[bool] = []
        try:
            async def reader() -> None:
                ch.post([b"reply"], lambda exc, arg: seen.append(bool(ch._read_waiters)))
                await ch.fill(1)  # nothing there yet: waits
            task = asyncio.get_running_loop().create_task(reader())
            await until(lambda: bool(ch._read_waiters), "reader waiting")
            assert seen == [False]  # sent before the waiter was registered
            assert b.recv(100) == b"reply"
            b.send(b"x")
            await task
        finally:
            ch.close()
            b.close()
    asyncio.run(body())


def test_channel_receive_buffer_starts_small_and_grows_once_filled() -> None:
    """A channel starts with a small receive buffer, which small messages never grow;
    bytes waiting that fill it (a burst, a message longer than it) grow it to its full
    size, the unread bytes moved intact and the rest received in the same readiness;
    a reader's fill() of more than it holds grows it too."""
    async def body() -> None:
        a, b = socket.socketpair()
        ch = Channel(a)
        assert FIRST_RECV_BUFFER < RECV_BUFFER
        seen: list[bytes] = []

        def hook() -> bool:  # takes everything there is, as one piece
            seen.append(bytes(ch.view[ch.start : ch.end]))
            ch.consume(ch.buffered)
            return True
        stuck: list[bool] = []
        ch.on_data = hook
        ch.serve_from_hook(lambda: stuck.append(True))
        try:
            # Small messages, many of them: the first buffer is never full.
            for i in range(50):
                b.sendall(bytes([i]) * 28)
                await until(lambda n=i + 1: len(seen) == n, "hook")
            assert len(ch.buf) == FIRST_RECV_BUFFER and seen[7] == bytes([7]) * 28
            # A burst larger than it, all waiting at once: one readiness, one call of
            # the hook with all of it, in the full buffer from now on.
            burst = data(5, 3 * FIRST_RECV_BUFFER + 100)
            seen.clear()
            b.sendall(burst)
            await until(lambda: sum(map(len, seen)) == len(burst), "hook")
            assert len(seen) == 1 and seen[0] == burst
            assert len(ch.buf) == RECV_BUFFER and not stuck
            ch.serve_from_hook(None)
            ch.on_data = None
        finally:
            ch.close()
            b.close()

        # A reader: bytes left unread when the buffer fills are kept, in order.
        a, b = socket.socketpair()
        ch = Channel(a)
        try:
            b.sendall(b"abcd")
            await ch.fill(2)
            assert ch.unpack(struct.Struct("2s")) == (b"ab",)
            assert len(ch.buf) == FIRST_RECV_BUFFER
            big = data(6, 2 * FIRST_RECV_BUFFER)
            b.sendall(big)
            await ch.fill(2 + len(big))  # more than the first buffer: it grows
            assert len(ch.buf) == RECV_BUFFER
            assert await ch.read_exact(2 + len(big)) == b"cd" + big
            assert ch.buffered == 0
        finally:
            ch.close()
            b.close()
    asyncio.run(body())


# ========================================================================= 4. NBD
CLIENT = r"""
import json, random, sys
import nbd

sock, seed, nops, qd, big_pct, model_in, model_out = sys.argv[1:8]
seed, nops, qd, big_pct = int(seed), int(nops), int(qd), int(big_pct)
model = bytearray(open(model_in, "rb").read())
size = len(model)
REGION, SMALL = 1 << 20, 4096
rng = random.Random(seed)
h = nbd.NBD()
h.connect_uri("nbd+unix:///?socket=" + sock)
assert h.get_size() == size, h.get_size()
busy = [0] * (size // SMALL)  # reads in flight per 4 KiB page, or -1: a write
inflight = {}
count = {"reads": 0, "writes": 0, "read_bytes": 0, "write_bytes": 0}

def mark(off, n, delta):
    for p in range(off // SMALL, (off + n) // SMALL):
        busy[p] += delta

def issue(write, off, n):
    if write:
        payload = rng.randbytes(n)
        buf = nbd.Buffer.from_bytearray(bytearray(payload))
        cookie = h.aio_pwrite(buf, off)
        mark(off, n, -1)
    else:
        payload = None
        buf = nbd.Buffer(n)
        cookie = h.aio_pread(buf, off)
        mark(off, n, 1)
    inflight[cookie] = (write, off, n, buf, payload)

def pick():
    for _ in range(16):
        write = rng.random() < 0.5
        if rng.randrange(100) < big_pct:
            off, n = rng.randrange(size // REGION) * REGION, REGION
        else:
            off, n = rng.randrange(size // SMALL) * SMALL, SMALL
        pages = busy[off // SMALL:(off + n) // SMALL]
        if (any(pages) if write else min(pages) < 0):
            continue
        return write, off, n
    return None

def reap():
    while inflight:
        cookie = h.aio_peek_command_completed()
        if not cookie:
            return
        h.aio_command_completed(cookie)  # raises if the server answered an error
        write, off, n, buf, payload = inflight.pop(cookie)
        if write:
            model[off:off + n] = payload
            mark(off, n, 1)
            count["writes"] += 1
            count["write_bytes"] += n
        else:
            got = buf.to_bytearray()
            if got != model[off:off + n]:
                sys.exit(f"read of {n} at {off}: wrong data")
            mark(off, n, -1)
            count["reads"] += 1
            count["read_bytes"] += n

issued = 0
while issued < nops or inflight:
    while issued < nops and len(inflight) < qd:
        op = pick()
        if op is None:
            break
        issue(*op)
        issued += 1
    reap()
    if inflight:
        h.poll(-1)
        reap()
# Everything once more, 1 MiB at a time, 16 in flight.
for off in range(0, size, REGION):
    while len(inflight) >= 16:
        h.poll(-1)
        reap()
    issue(False, off, REGION)
while inflight:
    h.poll(-1)
    reap()
h.shutdown()
open(model_out, "wb").write(model)
print(json.dumps(count))
"""


def spy_side_door(vbd: VBD) -> dict[str, list[int]]:
    """Count, per kind, requests the side door served at once and declined (a read all
    of zeros, answered from the metadata without a read, and a request the transport's
    compiled inline path served, count as served at once)."""
    counts = {"read": [0, 0], "write": [0, 0]}
    real_read, real_write, real_zeros = vbd.read_now, vbd.write_now, vbd.zero_runs_now

    def zero_runs_now(offset: int, length: int) -> list[tuple[int, bool]] | None:
        runs = real_zeros(offset, length)
        if runs is not None and len(runs) == 1:
            counts["read"][0] += 1
        return runs

    def read_now(offset: int, v: memoryview) -> bool:
        ok = real_read(offset, v)
        counts["read"][0 if ok else 1] += 1
        return ok

    def write_now(offset: int, v: memoryview, *, fua: bool = False) -> bool:
        ok = real_write(offset, v, fua=fua)
        counts["write"][0 if ok else 1] += 1
        return ok
    real_inline = vbd.served_inline

    def served_inline(reads: int, read_bytes: int, writes: int, write_bytes: int) -> None:
        # The transport's compiled inline path serves at once too (its own system calls).
        counts["read"][0] += reads
        counts["write"][0] += writes
        real_inline(reads, read_bytes, writes, write_bytes)
    vbd.read_now = read_now  # type: ignore[method-assign]
    vbd.write_now = write_now  # type: ignore[method-assign]
    vbd.zero_runs_now = zero_runs_now  # type: ignore[method-assign]
    vbd.served_inline = served_inline  # type: ignore[method-assign]
    return counts


async def sub(*argv: str, timeout: float = 120) -> str:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode == 0, f"{argv[:3]}: rc={proc.returncode}\n{err.decode()}"
    return out.decode()


def make_image(folder: Path, kind: str, size: int = 32 * MiB) -> tuple[str, Path, bytes]:
    """(spec, path, content): a raw file of random bytes, or a dynamic VHD whose blocks
    are partly unallocated (0 whole, 1 and 4 in pieces, the rest empty)."""
    if kind == "raw":
        path = folder / "disk.raw"
        content = data(70, size)
        path.write_bytes(content)
        return f"aio:{path}", path, content
    path = folder / "disk.vhd"
    create(str(path), size)
    with Chain.open(f"vhd:{path}", writable=True) as c:
        c.pwrite(0, data(71, BLOCK))
        for i in range(0, BLOCK, 256 * KiB):
            c.pwrite(BLOCK + i, data(72 + i, 8192))
        c.pwrite(4 * BLOCK + 12288, data(73, 65536))
    return f"vhd:{path}", path, chain_bytes(path)


@pytest.mark.interop
@pytest.mark.parametrize("kind", ["raw", "vhd"])
def test_nbd_many_in_flight_through_the_fast_path(shm: Path, kind: str) -> None:
    need_libnbd()
    need("qemu-img")
    spec, path, content = make_image(shm, kind)
    model_in, model_out = shm / "model.in", shm / "model.out"
    model_in.write_bytes(content)
    sock = shm / "s.sock"

    async def body(engine: ThreadEngine) -> tuple[dict, dict, dict[str, list[int]]]:
        drv = await engine.call(open_stack, engine, spec, writable=True)
        vbd = VBD(drv)
        counts = spy_side_door(vbd)
        server = NbdServer(Export("", vbd))
        server.listen_unix(str(sock))
        try:
            out = await sub(SYSTEM_PYTHON, "-c", CLIENT, str(sock), "7", "1500", "64",
                            "8", str(model_in), str(model_out))
            client = json.loads(out)
            stats = vbd.stats.as_dict()
            served = {k: list(v) for k, v in counts.items()}
            await asyncio.to_thread(qemu_compare, f"nbd+unix:///?socket={sock}", model_out)
            return client, stats, served
        finally:
            await server.stop()
            await vbd.close()
    client, stats, counts = arun(body)  # type: ignore[misc]
    assert client["reads"] > 500 and client["writes"] > 400
    assert stats["read_reqs"] == client["reads"]
    assert stats["write_reqs"] == client["writes"]
    assert stats["read_sectors"] == client["read_bytes"] // SECTOR
    assert stats["write_sectors"] == client["write_bytes"] // SECTOR
    assert stats["errors"] == 0 and stats["in_flight"] == 0
    assert counts["read"][0] + counts["read"][1] == client["reads"]
    assert counts["write"][0] + counts["write"][1] == client["writes"]
    if kind == "raw":  # tmpfs, at most 1 MiB: every request served at once
        assert counts["read"][1] == 0 and counts["write"][1] == 0
    else:  # writes that allocate take the slow path; held sectors do not
        assert counts["write"][0] > 0 and counts["write"][1] > 0
        assert counts["read"][0] > 0
    model = model_out.read_bytes()
    if kind == "raw":
        assert path.read_bytes() == model
    else:
        assert chain_bytes(path) == model
        assert check_ok(path)
        qemu_compare(str(path), model_out, fmt="vpc")


QD1 = r"""
import sys
import nbd
sock, model, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
content = open(model, "rb").read()
h = nbd.NBD()
h.connect_uri("nbd+unix:///?socket=" + sock)
for i in range(n):
    off = (i * 7919 % (len(content) // 4096)) * 4096
    if h.pread(4096, off) != content[off:off + 4096]:
        sys.exit(f"wrong data at {off}")
h.shutdown()
print(n)
"""


def outstanding(pool: BufferPool) -> int:
    """Buffers handed out and not given back."""
    return pool.held


def read_requests(count: int, length: int, size: int) -> bytes:
    return b"".join(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 0, i,
                                (i * length) % (size - length + 1) // SECTOR * SECTOR,
                                length) for i in range(count))


def stall_then_vanish(shm: Path, at_stall: Callable[[Connection, VBD, NbdServer, int], None],
                      at_end: Callable[[Connection, VBD, NbdServer], None] | None = None
                      ) -> None:
    """200 pipelined reads of 256 KiB into a read-only server, no reply read: once the
    connection is stalled at its in-flight limit, ``at_stall(conn, vbd, server,
    length)`` checks it; another client is served meanwhile; the first vanishes, every
    slot and buffer comes back (then ``at_end(conn, vbd, server)``), and the server
    still serves."""
    need_libnbd()
    spec, _, content = make_image(shm, "raw")
    model = shm / "model"
    model.write_bytes(content)
    sock = shm / "s.sock"
    length = 256 * KiB

    async def body(engine: ThreadEngine) -> None:
        drv = await engine.call(open_stack, engine, spec, writable=False)
        vbd = VBD(drv, read_only=True)
        server = NbdServer(Export("", vbd))
        server.listen_unix(str(sock))
        w = Wire(sock)
        try:
            await asyncio.to_thread(w.go, "", False)
            await until(lambda: len(server._connections) == 1, "connected")
            conn = next(iter(server._connections))
            # No reply of 256 KiB may leave whole while the client does not read, whatever
            # send buffer the server asks for (since 569f033, 2 MiB: 16 of them would).
            conn.ch.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * KiB)
            w.sock.sendall(read_requests(200, length, len(content)))
            await until(lambda: conn.in_flight == MAX_IN_FLIGHT and conn.ch._writer is not None,
                        "stalled at the in-flight limit")
            at_stall(conn, vbd, server, length)
            # Another client is served meanwhile.
            assert (await sub(SYSTEM_PYTHON, "-c", QD1, str(sock), str(model), "100")
                    ).strip() == "100"
            assert conn in server._connections
            w.close()  # vanishes with its replies posted and requests unread
            await until(lambda: conn not in server._connections, "connection gone")
            assert conn.bytes_in_flight == 0
            assert conn.in_flight == 0
            assert outstanding(server.pool) == 0
            assert vbd.stats.in_flight == 0 and vbd.stats.errors == 0
            if at_end is not None:
                at_end(conn, vbd, server)
            assert (await sub(SYSTEM_PYTHON, "-c", QD1, str(sock), str(model), "20")
                    ).strip() == "20"
        finally:
            w.close()
            await server.stop()
            await vbd.close()
    arun(body)


@pytest.mark.interop
def test_nbd_client_that_never_reads_replies_then_vanishes(shm: Path) -> None:
    """200 pipelined reads, no reply read: the connection stops at its in-flight limit
    with its replies posted; another client is served meanwhile; when the first vanishes,
    every buffer and slot comes back and the server still serves."""
    def at_stall(conn: Connection, vbd: VBD, server: NbdServer, length: int) -> None:
        assert vbd.stats.read_reqs == MAX_IN_FLIGHT
        assert conn.bytes_in_flight == MAX_IN_FLIGHT * length
        assert outstanding(server.pool) == MAX_IN_FLIGHT
    stall_then_vanish(shm, at_stall)


@pytest.mark.parametrize("end", ["disconnect", "server-stop"])
def test_nbd_replies_posted_before_the_end_are_all_sent(shm: Path, end: str) -> None:
    """Replies to requests served at once (posted, with no task behind them) all leave
    before the connection closes on NBD_CMD_DISC or server.stop(), even queued behind a
    full socket. (Regression of 0fcd81c: none arrived; fixed in cfd850c.)"""
    spec, _, content = make_image(shm, "raw")
    sock = shm / "s.sock"
    length = 256 * KiB
    count = 64

    async def body(engine: ThreadEngine) -> int:
        drv = await engine.call(open_stack, engine, spec, writable=False)
        vbd = VBD(drv, read_only=True)
        server = NbdServer(Export("", vbd))
        server.listen_unix(str(sock))
        w = Wire(sock)
        stopping = None
        try:
            await asyncio.to_thread(w.go, "", False)
            await until(lambda: len(server._connections) == 1, "connected")
            conn = next(iter(server._connections))
            reqs = read_requests(count, length, len(content))
            if end == "disconnect":
                reqs += struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 2, 999, 0, 0)
            w.sock.sendall(reqs)
            await until(lambda: vbd.stats.read_reqs == count, "all served")
            if end == "disconnect":
                assert conn.reader is not None
                await until(conn.reader.done, "DISC seen")
            else:
                stopping = asyncio.ensure_future(server.stop())

            def drain() -> int:
                got = 0
                try:
                    while True:
                        handle, error, payload = w.reply(length)
                        assert error == 0 and len(payload) == length
                        got += 1
                except (ConnectionError, OSError):
                    return got
            return await asyncio.to_thread(drain)
        finally:
            w.close()
            if stopping is not None:
                await stopping
            await server.stop()
            await vbd.close()
    assert arun(body) == count


FLOOD = r"""
import os, socket, struct, sys, threading, time
path, stop, started = sys.argv[1:4]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(path)
def recv(n):
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            sys.exit("closed during the handshake")
        out += chunk
    return out
recv(18)
s.sendall(struct.pack(">I", 3))
s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, 6) + struct.pack(">IH", 0, 0))
while True:
    _, _, kind, n = struct.unpack(">QIII", recv(20))
    recv(n)
    if kind == 1:
        break
REPLY = 16 + 4096
batch = b"".join(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, (i % 4096) * 4096, 4096)
                 for i in range(512))
got = [0]
def drain():
    buf = bytearray(1 << 20)
    while True:
        n = s.recv_into(buf)
        if not n:
            return
        got[0] += n
threading.Thread(target=drain, daemon=True).start()
sent = 0
while not os.path.exists(stop):
    s.sendall(batch)
    sent += 512
    if got[0] >= 2000 * REPLY and not os.path.exists(started):
        open(started, "w").close()
end = time.monotonic() + 60
while got[0] < sent * REPLY and time.monotonic() < end:
    time.sleep(0.01)
if got[0] != sent * REPLY:
    sys.exit(f"{got[0]} bytes of replies for {sent} requests")
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0))
print(sent)
"""


@pytest.mark.interop
def test_nbd_flood_does_not_starve_a_qd1_client(shm: Path) -> None:
    """One client keeps the socket full of pipelined reads served at once; a QD1 client
    beside it still completes its requests while the flood goes on."""
    need_libnbd()
    spec, _, content = make_image(shm, "raw")
    model = shm / "model"
    model.write_bytes(content)
    sock, stop, started = shm / "s.sock", shm / "stop", shm / "started"

    async def body(engine: ThreadEngine) -> None:
        drv = await engine.call(open_stack, engine, spec, writable=False)
        vbd = VBD(drv, read_only=True)
        counts = spy_side_door(vbd)
        server = NbdServer(Export("", vbd))
        server.listen_unix(str(sock))
        flood = await asyncio.create_subprocess_exec(
            sys.executable, "-c", FLOOD, str(sock), str(stop), str(started),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            await until(lambda: started.exists() or flood.returncode is not None,
                        "flood started")
            assert flood.returncode is None
            before = vbd.stats.read_reqs
            n = 200
            assert (await sub(SYSTEM_PYTHON, "-c", QD1, str(sock), str(model), str(n))
                    ).strip() == str(n)
            assert flood.returncode is None  # the flood ran all along
            assert vbd.stats.read_reqs - before > n  # ... and was served meanwhile
            stop.touch()
            out, err = await asyncio.wait_for(flood.communicate(), DEADLINE)
            assert flood.returncode == 0, err.decode()
            assert int(out) > 2000
            assert counts["read"][1] == 0  # all of it through the fast path
        finally:
            if flood.returncode is None:
                flood.kill()
                await flood.wait()
            await server.stop()
            await vbd.close()
    arun(body)


# ========================================================================= 6. NBD data hook
# While the reader waits for a request header, the channel's readiness callback receives
# and the connection's _pump serves the complete, valid, admissible reads and writes;
# anything else wakes the reader. The server runs on the test's own loop: blocking client
# calls go to threads, and small sends from the loop thread are used to stop the stream
# exactly where a test wants the hook to find it.
READ, WRITE, DISC, FLUSH, TRIM, CACHE, ZEROES, STATUS = range(8)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16
EINVAL, ENOSPC = 22, 28
REQ = struct.Struct(">IHHQQI")
HOOK_LOG = "blktap.transport"


def req(cmd: int, offset: int = 0, length: int = 0, handle: int = 0, flags: int = 0,
        payload: bytes = b"", magic: int = REQUEST_MAGIC) -> bytes:
    return REQ.pack(magic, flags, cmd, handle, offset, length) + payload


class HookCall(NamedTuple):
    found: int  # bytes buffered when the hook ran (what it had just received included)
    left: int  # ... and when it returned
    answer: bool  # True: the reader was not woken
    full: bool  # the receive buffer was filled to its very end
    in_flight: int  # the connection's requests in flight when it ran


class HookSpy:
    """Watches one connection: every call of its data hook, and which side (the hook or
    the reader) admitted each request."""

    def __init__(self, conn: Connection) -> None:
        ch = conn.ch
        real = ch.on_data
        assert real is not None, "no data hook on a plain connection"
        self.calls: list[HookCall] = []
        self.hook_took = self.reader_took = 0
        self._in_hook = False

        def hook() -> bool:
            found, full, in_flight = ch.end - ch.start, ch.end == len(ch.buf), conn.in_flight
            self._in_hook = True
            try:
                answer = real()
            finally:
                self._in_hook = False
            self.calls.append(HookCall(found, ch.end - ch.start, answer, full, in_flight))
            return answer
        ch.on_data = hook
        take = conn._take

        def counted(length: int) -> None:
            if self._in_hook:
                self.hook_took += 1
            else:
                self.reader_took += 1
            take(length)
        conn._take = counted  # type: ignore[method-assign]


# The raw clients of each server: closed before it stops, which would otherwise wait for
# the replies a client that stopped reading (a failed test) never takes.
CLIENTS: dict[NbdServer, list[Wire]] = {}


def hang_up(w: Wire) -> None:
    """Close, waking a thread blocked receiving on it."""
    with contextlib.suppress(OSError):
        w.sock.shutdown(socket.SHUT_RDWR)
    w.close()


@contextlib.asynccontextmanager
async def nbd_served(engine: ThreadEngine, spec: str | Driver, sock: Path, *,
                     tls: ssl.SSLContext | None = None) -> AsyncIterator[tuple[NbdServer, VBD]]:
    """A server of ``spec`` (a stack to open writable, or one opened already)."""
    drv = spec if isinstance(spec, Driver) else \
        await engine.call(open_stack, engine, spec, writable=True)
    vbd = VBD(drv)
    server = NbdServer(Export("", vbd), tls=tls)
    server.listen_unix(str(sock))
    CLIENTS[server] = []
    try:
        yield server, vbd
    finally:
        for w in CLIENTS.pop(server):
            hang_up(w)
        await server.stop()
        await vbd.close()


def hook_waits(conn: Connection) -> bool:
    """What the client sends next goes to the data hook: the connection has no task yet
    (Connection.start), or its reader waits for a request header."""
    ch = conn.ch
    return conn._fed or bool(ch._read_waiters) and ch._filling


async def attach(server: NbdServer, sock: Path, *, structured: bool = True,
                 go: Callable[[Wire], None] | None = None) -> tuple[Wire, Connection]:
    """A raw client through the handshake; its connection once what is sent next reaches
    the hook: served with no task yet (Connection.start), or its reader waiting for a
    request header."""
    before = set(server._connections)
    w = Wire(sock, timeout=DEADLINE)
    CLIENTS[server].append(w)
    # Room for a few hundred KiB sent at once, so that a send from the loop thread never
    # blocks and the whole of it is in the socket when the server's callback runs.
    w.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MiB)
    await asyncio.to_thread(go or (lambda w: w.go("", structured)), w)
    await until(lambda: len(server._connections - before) == 1, "connected")
    (conn,) = server._connections - before
    ch = conn.ch
    # (A TLS channel has no hook: its reader waits in a plain receive.)
    await until(lambda: hook_waits(conn) or bool(ch._read_waiters) and ch.tls,
                "the hook or the reader waiting for a request")
    return w, conn


def send_now(w: Wire, msg: bytes) -> None:
    """Queue ``msg`` in the socket at once (from the loop thread: the server cannot read
    meanwhile, so all of it is there when its callback runs)."""
    w.sock.setblocking(False)
    try:
        sent = w.sock.send(msg)
    except BlockingIOError:
        sent = 0
    finally:
        w.sock.settimeout(DEADLINE)
    if sent != len(msg):
        pytest.skip(f"the socket took {sent} of {len(msg)} bytes at once here")


def reply_of(w: Wire, reads: dict[int, tuple[int, int]]) -> tuple[int, int, bytes]:
    """One whole reply: (handle, error, data). ``reads`` maps a read's handle to its
    (offset, length): a simple reply's data is that long; a structured read's data chunk
    must sit at the offset asked for."""
    (magic,) = U32.unpack(w.recv(4))
    if magic == SIMPLE:
        error, handle = struct.unpack(">IQ", w.recv(12))
        n = reads.get(handle, (0, 0))[1]
        return handle, error, (w.recv(n) if n and not error else b"")
    assert magic == STRUCTURED, hex(magic)
    out, error = b"", 0
    while True:
        flags, kind, handle, length = struct.unpack(">HHQI", w.recv(16))
        payload = w.recv(length)
        if kind == 1:  # OFFSET_DATA
            (offset,) = struct.unpack_from(">Q", payload)
            assert offset == reads[handle][0] + len(out), (handle, offset)
            out += payload[8:]
        elif kind == 2:  # OFFSET_HOLE: the client fills in the zeros
            offset, size = struct.unpack(">QI", payload)
            assert offset == reads[handle][0] + len(out), (handle, offset)
            out += bytes(size)
        elif kind == 5:  # BLOCK_STATUS
            out += payload
        elif kind & 0x8000:
            error = U32.unpack_from(payload)[0]
        else:
            assert kind == 0, kind  # NONE
        if flags & 1:
            return handle, error, out
        assert U32.unpack(w.recv(4))[0] == STRUCTURED


def collect(w: Wire, count: int, reads: dict[int, tuple[int, int]]) -> dict[int, tuple[int, bytes]]:
    """``count`` replies by handle (in whatever order they come), none twice."""
    got: dict[int, tuple[int, bytes]] = {}
    for _ in range(count):
        handle, error, payload = reply_of(w, reads)
        assert handle not in got, f"two replies for handle {handle}"
        got[handle] = (error, payload)
    return got


async def exchange(w: Wire, stream: bytes | list[bytes], count: int,
                   reads: dict[int, tuple[int, int]], pause: float = 0.0
                   ) -> dict[int, tuple[int, bytes]]:
    """Send ``stream`` (one sendall, or piece by piece with a pause between) from one
    thread while another collects ``count`` replies."""
    def send() -> None:
        if isinstance(stream, bytes):
            w.sock.sendall(stream)
            return
        for piece in stream:
            w.sock.sendall(piece)
            time.sleep(pause)
    got, _ = await asyncio.gather(asyncio.to_thread(collect, w, count, reads),
                                  asyncio.to_thread(send))
    return got


async def settled(conn: Connection, vbd: VBD) -> None:
    """Every request answered and released (a task may release its slot a turn after
    the client got its reply)."""
    await until(lambda: conn.in_flight == 0 and conn.bytes_in_flight == 0
                and vbd.stats.in_flight == 0, "every request released")


def check_reads(got: dict[int, tuple[int, bytes]], reads: dict[int, tuple[int, int]],
                content: bytes) -> None:
    for handle, (off, n) in reads.items():
        error, payload = got[handle]
        assert error == 0, (handle, error)
        assert payload == content[off : off + n], f"read {handle} of {n} at {off}: wrong data"


def count_tasks_given(server: NbdServer) -> list[Connection]:
    """The connections the server has had to give a task (Connection.start's spawn)."""
    given: list[Connection] = []
    real = server._give_task

    def give(conn: Connection, serving: Any) -> None:
        given.append(conn)
        real(conn, serving)
    server._give_task = give  # type: ignore[method-assign]
    return given


def test_a_short_lived_client_never_gets_a_task(shm: Path) -> None:
    """Handshake, a read and a block status served from the hook, then DISC: the
    connection ends in the readiness callback, with no task ever started for it."""
    spec, _, content = make_image(shm, "raw")
    sock = shm / "s.sock"

    async def body(engine: ThreadEngine) -> None:
        async with nbd_served(engine, spec, sock) as (server, vbd):
            given = count_tasks_given(server)
            for round_ in range(3):
                w, conn = await attach(server, sock)
                assert conn._fed and server.connections == 1
                send_now(w, req(READ, round_ * 4096, 4096, handle=1))
                got = await asyncio.to_thread(reply_of, w, {1: (round_ * 4096, 4096)})
                assert got == (1, 0, content[round_ * 4096 : (round_ + 1) * 4096])
                await settled(conn, vbd)
                send_now(w, req(DISC))
                assert await asyncio.to_thread(w.closed_by_server)
                await until(lambda: not server._connections, "the connection ended")
                assert server.connections == 0 and not server._clients
                w.close()
            assert given == []
    arun(body)


def test_disc_behind_a_queued_reply_waits_for_it(shm: Path) -> None:
    """A read whose reply the socket cannot take at once and a DISC in one message: the
    DISC is not taken in the callback (the reply is still queued); a task sends the
    reply whole, then closes."""
    spec, _, content = make_image(shm, "raw")
    sock = shm / "s.sock"
    n = 1 * MiB

    async def body(engine: ThreadEngine) -> None:
        async with nbd_served(engine, spec, sock) as (server, vbd):
            given = count_tasks_given(server)
            w, conn = await attach(server, sock)
            conn.ch.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * KiB)
            send_now(w, req(READ, 0, n, handle=7) + req(DISC))
            await until(lambda: bool(given), "a task for the connection")
            assert await asyncio.to_thread(reply_of, w, {7: (0, n)}) == (7, 0, content[:n])
            assert await asyncio.to_thread(w.closed_by_server)
            await until(lambda: not server._connections, "the connection ended")
            assert given == [conn] and server.connections == 0
            w.close()
    arun(body)


@pytest.mark.parametrize("how", ["end of stream", "server stops"])
def test_a_connection_with_no_task_ends_cleanly(shm: Path, how: str) -> None:
    """A client that hangs up without DISC, or a server that stops, while the connection
    has no task: it ends, and the server counts no client."""
    spec, _, _ = make_image(shm, "raw")
    sock = shm / "s.sock"

    async def body(engine: ThreadEngine) -> None:
        async with nbd_served(engine, spec, sock) as (server, vbd):
            w, conn = await attach(server, sock)
            assert conn._fed
            if how == "end of stream":
                w.sock.shutdown(socket.SHUT_WR)
            else:
                await server.stop()
            assert await asyncio.to_thread(w.closed_by_server)
            await until(lambda: not server._connections and not server._clients,
                        "the connection ended")
            assert server.connections == 0 and conn.ch.closed
            w.close()
    arun(body)


def test_hook_header_split_at_every_byte(shm: Path) -> None:
    """A read header split after 1..27 bytes, the hook seeing the partial header before
    the rest is sent: the hook keeps the partial header without waking the reader, and
    serves the request once complete; likewise a write header. The reader never admits
    a request."""
    spec, path, content = make_image(shm, "raw")
    sock = shm / "s.sock"

    async def body(engine: ThreadEngine) -> None:
        async with nbd_served(engine, spec, sock) as (server, vbd):
            w, conn = await attach(server, sock)
            spy = HookSpy(conn)
            for k in range(1, REQ.size):
                off, n = (k * 7919 % 4096) * 4096, 4096
                msg = req(READ, off, n, handle=k)
                calls = len(spy.calls)
                send_now(w, msg[:k])
                await until(lambda calls=calls: len(spy.calls) > calls, "hook ran")
                assert spy.calls[-1] == HookCall(k, k, True, False, 0), spy.calls[-1]
                assert hook_waits(conn)  # nothing else woke for it
                send_now(w, msg[k:])
                handle, error, got = await asyncio.to_thread(reply_of, w, {k: (off, n)})
                assert (handle, error) == (k, 0)
                assert got == content[off : off + n]
            model = bytearray(content)
            for k in (1, 4, 13, 27):
                off, payload = 20 * MiB + k * 8192, data(100 + k, 8192)
                msg = req(WRITE, off, len(payload), handle=1000 + k, payload=payload)
                calls = len(spy.calls)
                send_now(w, msg[:k])
                await until(lambda calls=calls: len(spy.calls) > calls, "hook ran")
                assert spy.calls[-1].answer and spy.calls[-1].left == k
                send_now(w, msg[k:])
                assert await asyncio.to_thread(reply_of, w, {}) == (1000 + k, 0, b"")
                model[off : off + len(payload)] = payload
            assert spy.reader_took == 0 and spy.hook_took == REQ.size - 1 + 4
            assert all(c.answer for c in spy.calls)
            await settled(conn, vbd)
            w.close()
        assert path.read_bytes() == model
    arun(body)


def test_hook_hands_a_partial_write_to_the_reader(shm: Path) -> None:
    """A write whose payload arrives in several sends: the hook takes nothing and wakes
    the reader, which receives the rest straight into its buffer; writes larger than the
    receive buffer likewise. The data lands where it should."""
    spec, path, content = make_image(shm, "raw")
    sock = shm / "s.sock"
    model = bytearray(content)

    async def body(engine: ThreadEngine) -> None:
        async with nbd_served(engine, spec, sock) as (server, vbd):
            w, conn = await attach(server, sock)
            ch = conn.ch
            spy = HookSpy(conn)
            payload = data(110, 65536)
            off = 12 * MiB
            msg = req(WRITE, off, len(payload), handle=1, payload=payload)
            send_now(w, msg[: REQ.size + 1000])
            await until(lambda: len(spy.calls) == 1, "hook ran")
            found = REQ.size + 1000
            assert spy.calls[0] == HookCall(found, found, False, False, 0)
            await until(lambda: bool(ch._read_waiters) and not ch._filling,
                        "reader waits for the rest of the payload")
            assert spy.reader_took == 1 and conn.in_flight == 1
            for a, b in ((found, 20000), (20000, 20001), (20001, len(msg))):
                send_now(w, msg[a:b])
                await asyncio.sleep(0.005)  # a pause, so that each piece arrives alone
            assert await asyncio.to_thread(reply_of, w, {}) == (1, 0, b"")
            model[off : off + len(payload)] = payload
            assert len(spy.calls) == 1  # the reader received the payload itself
            # Larger than the receive buffer: the hook can never hold it all.
            stream, expect = b"", {}
            for i, n in enumerate((RECV_BUFFER, RECV_BUFFER + 512, 300 * KiB, MiB)):
                off, payload = 2 * MiB + i * 2 * MiB, data(111 + i, n)
                stream += req(WRITE, off, n, handle=10 + i, payload=payload)
                expect[10 + i] = (0, b"")
                model[off : off + n] = payload
            calls = len(spy.calls)
            assert await exchange(w, stream, len(expect), {}) == expect
            assert spy.calls[calls].answer is False  # the first call woke the reader
            assert spy.reader_took == 5 and spy.hook_took == 0
            # And read back, through the hook.
            reads = {20 + i: (12 * MiB + i * 16384, 16384) for i in range(4)}
            reads |= {30 + i: (2 * MiB + i * 2 * MiB, 256 * KiB) for i in range(4)}
            got = await exchange(w, b"".join(req(READ, o, n, handle=h)
                                              for h, (o, n) in reads.items()), 8, reads)
            check_reads(got, reads, bytes(model))
            assert spy.hook_took > 0
            await settled(conn, vbd)
            w.close()
        assert path.read_bytes() == model
    arun(body)


# Where send_first_payload_cut cuts: the first request's header and 1000 bytes of its payload.
PAYLOAD_CUT = REQ.size + 1000


def write_requests(writes: list[tuple[int, int, bytes]]
                   ) -> tuple[bytes, dict[int, tuple[int, bytes]]]:
    """The requests of ``writes`` ((handle, offset, payload) each) as one stream, and the
    replies they expect (by handle)."""
    stream = b"".join(req(WRITE, off, len(pl), handle=h, payload=pl) for h, off, pl in writes)
    return stream, {h: (0, b"") for h, _, _ in writes}


async def send_first_payload_cut(w: Wire, conn: Connection, stream: bytes) -> None:
    """Send ``stream`` up to :data:`PAYLOAD_CUT` (a write's payload cut short) and return
    once the reader waits for the rest of it: what is sent next is all buffered when the
    reader runs, and it serves that itself."""
    send_now(w, stream[:PAYLOAD_CUT])
    await until(lambda: bool(conn.ch._read_waiters) and not conn.ch._filling,
                "reader waits for the rest of the payload")


def test_reader_batches_the_replies_of_requests_it_finds_buffered(
        shm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes the reader serves at once (it woke for a payload that came in pieces, and
    found more requests behind it): their replies leave together when it has taken what
    was buffered, not one send each (at QD32 on tmpfs that was a sendmsg per write)."""
    spec, path, content = make_image(shm, "raw")
    sock = shm / "s.sock"
    model = bytearray(content)
    flushes: list[int] = []
    real = Channel._send_some

    def send_some(self: Channel, rest: list) -> list:
        flushes.append(len(rest))
        return real(self, rest)
    monkeypatch.setattr(Channel, "_send_some", send_some)

    async def body(engine: ThreadEngine) -> None:
        async with nbd_served(engine, spec, sock) as (server, vbd):
            w, conn = await attach(server, sock)
            spy = HookSpy(conn)
            writes = [(i, (3 + 5 * i) * 65536, data(200 + i, 4096)) for i in range(32)]
            stream, expect = write_requests(writes)
            await send_first_payload_cut(w, conn, stream)
            flushes.clear()
            send_now(w, stream[PAYLOAD_CUT:])
            assert await asyncio.to_thread(collect, w, len(writes), {}) == expect
            for _, off, pl in writes:
                model[off : off + len(pl)] = pl
            assert spy.reader_took == len(writes) and spy.hook_took == 0
            # The first reply alone (nothing was buffered behind its payload yet), then the
            # 31 others together; the old rule (send when the last in flight) made it 32.
            assert len(flushes) <= 3, flushes
            await settled(conn, vbd)
            w.close()
        assert path.read_bytes() == model
    arun(body)


@pytest.mark.parametrize("kind", ["raw", "vhd"])
def test_writes_the_side_door_takes_are_written_from_the_receive_buffer(
        shm: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write whose payload is all in the receive buffer (taken by the hook, or by the
    reader behind a payload that came in pieces) goes to the side door from there: no
    buffer of its own, no copy. One the side door refuses (a VHD write that allocates a
    block) is copied into a buffer and served the slow way. All of it lands."""
    spec, path, content = make_image(shm, kind)
    sock = shm / "s.sock"
    model = bytearray(content)
    got_buffers: list[int] = []
    real_get = BufferPool.get

    def get(self: BufferPool, n: int):  # noqa: ANN202
        got_buffers.append(n)
        return real_get(self, n)
    monkeypatch.setattr(BufferPool, "get", get)

    async def body(engine: ThreadEngine) -> None:
        async with nbd_served(engine, spec, sock) as (server, vbd):
            w, conn = await attach(server, sock)
            spy = HookSpy(conn)
            # Overwrites inside data already there (a VHD's block 0): the side door takes
            # every one.
            # All of them in the socket before the server reads (a sendall from a thread
            # may be caught halfway, and a payload cut there goes the reader's way).
            writes = [(i, 2 * i * 65536 + 512, data(300 + i, 4096)) for i in range(16)]
            stream, expect = write_requests(writes)
            send_now(w, stream)
            assert await asyncio.to_thread(collect, w, len(writes), {}) == expect
            assert spy.hook_took > 0
            # Behind a payload that came in pieces: the reader serves the others.
            more = [(16 + i, (2 * i + 1) * 65536, data(400 + i, 4096)) for i in range(16)]
            stream, expect = write_requests(more)
            reader_took = spy.reader_took
            await send_first_payload_cut(w, conn, stream)
            send_now(w, stream[PAYLOAD_CUT:])
            assert await asyncio.to_thread(collect, w, len(more), {}) == expect
            assert spy.reader_took - reader_took == len(more)
            # Only the write whose payload was cut took a buffer.
            assert got_buffers == [4096], got_buffers
            for _, off, pl in writes + more:
                model[off : off + len(pl)] = pl
            if kind == "vhd":
                # Past the data: a block to allocate, which the side door refuses.
                off = len(content) - 2 * MiB
                pl = data(500, 4096)
                assert await exchange(w, req(WRITE, off, 4096, handle=99, payload=pl), 1,
                                      {}) == {99: (0, b"")}
                model[off : off + 4096] = pl
            await settled(conn, vbd)
            w.close()
        written = chain_bytes(path) if kind == "vhd" else path.read_bytes()
        assert written == bytes(model)
    arun(body)


def test_empty_and_fua_writes_from_the_receive_buffer(
        shm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes of no bytes (one at the very end of the disk) and FUA writes, whole in the
    receive buffer, through the hook and through the reader: the empty ones are answered
    without touching the disk, the FUA ones reach the side door as FUA."""
    spec, path, content = make_image(shm, "raw")
    sock = shm / "s.sock"
    model = bytearray(content)
    side_door: list[tuple[int, int, bool]] = []
    real = AioDriver.write_now

    def write_now(self: AioDriver, offset: int, iov: list, *, fua: bool = False) -> bool:
        side_door.append((offset, sum(len(v) for v in iov), fua))
        return real(self, offset, iov, fua=fua)
    monkeypatch.setattr(AioDriver, "write_now", write_now)

    def mixed(first: int, base: int) -> list[bytes]:
        return [req(WRITE, base, 4096, handle=first, payload=data(first, 4096)),
                req(WRITE, base, 0, handle=first + 1, flags=FUA),
                req(WRITE, len(content), 0, handle=first + 2),
                req(WRITE, base + 8192, 4096, handle=first + 3, flags=FUA,
                    payload=data(first + 3, 4096))]

    async def body(engine: ThreadEngine) -> None:
        async with nbd_served(engine, spec, sock) as (server, vbd):
            w, conn = await attach(server, sock)
            spy = HookSpy(conn)
            expect = {h: (0, b"") for h in range(1, 5)}
            assert await exchange(w, b"".join(mixed(1, MiB)), 4, {}) == expect
            assert spy.hook_took == 4
            stream = b"".join(mixed(11, 2 * MiB))
            await send_first_payload_cut(w, conn, stream)
            send_now(w, stream[PAYLOAD_CUT:])
            expect = {h: (0, b"") for h in range(11, 15)}
            assert await asyncio.to_thread(collect, w, 4, {}) == expect
            assert spy.reader_took == 4
            for first, base in ((1, MiB), (11, 2 * MiB)):
                model[base : base + 4096] = data(first, 4096)
                model[base + 8192 : base + 12288] = data(first + 3, 4096)
            # Only the writes with a payload reached the disk, each with its own flag.
            assert [(o, n, f) for o, n, f in side_door if n] == [
                (MiB, 4096, False), (MiB + 8192, 4096, True),
                (2 * MiB, 4096, False), (2 * MiB + 8192, 4096, True)]
            await settled(conn, vbd)
            w.close()
        assert path.read_bytes() == model
    arun(body)


def test_hook_at_the_end_of_the_receive_buffer(shm: Path) -> None:
    """One request of exactly the buffer's size arrives whole: the hook serves it. Then
    writes fill the buffer to its very end with the next header cut there: the hook
    keeps the 8 bytes, moves them to the front on the next readiness and serves the
    request they begin; the reader never admits anything."""
    spec, path, content = make_image(shm, "raw")
    sock = shm / "s.sock"
    model = bytearray(content)

    async def body(engine: ThreadEngine) -> None:
        async with nbd_served(engine, spec, sock) as (server, vbd):
            w, conn = await attach(server, sock)
            spy = HookSpy(conn)
            # Header and payload: exactly RECV_BUFFER bytes (an unaligned write: the
            # hook starts a task for it).
            n = RECV_BUFFER - REQ.size
            payload = data(120, n)
            send_now(w, req(WRITE, MiB + 100, n, handle=1, payload=payload))
            model[MiB + 100 : MiB + 100 + n] = payload
            assert await asyncio.to_thread(reply_of, w, {}) == (1, 0, b"")
            assert spy.calls[0] == HookCall(RECV_BUFFER, 0, True, True, 0)
            # 18 writes (504 header bytes, 511 sectors of payload) leave 8 bytes of room:
            # the 19th header straddles the end of the buffer.
            sizes = [28 * SECTOR] * 17 + [35 * SECTOR]
            stream, off, expect = b"", 8 * MiB, {}
            for i, size in enumerate(sizes):
                payload = data(121 + i, size)
                stream += req(WRITE, off, size, handle=10 + i, payload=payload)
                model[off : off + size] = payload
                expect[10 + i] = (0, b"")
                off += size
            assert len(stream) == RECV_BUFFER - 8
            reads = {100 + i: (off + i * 4096, 4096) for i in range(40)}
            stream += b"".join(req(READ, o, k, handle=h) for h, (o, k) in reads.items())
            calls = len(spy.calls)
            send_now(w, stream)
            got = await asyncio.to_thread(collect, w, len(expect) + len(reads), reads)
            first = spy.calls[calls]
            assert first == HookCall(RECV_BUFFER, 8, True, True, 0), first
            assert spy.calls[calls + 1].found == len(stream) - RECV_BUFFER + 8
            check_reads(got, reads, bytes(model))
            assert {h: got[h] for h in expect} == expect
            assert spy.reader_took == 0
            assert spy.hook_took == 1 + len(sizes) + len(reads)
            await settled(conn, vbd)
            w.close()
        assert path.read_bytes() == model
    arun(body)


def test_hook_ten_thousand_pipelined_reads(shm: Path) -> None:
    """10,000 4 KiB reads sent in one go (280,000 bytes) while the replies are read. The
    first receive fills the buffer to its end, which cuts a header (262,144 = 9,362 x 28
    + 8); the hook serves its budget and wakes the reader, which carries on through the
    cut header and the rest. Each handle is answered once, with its data."""
    spec, _, content = make_image(shm, "raw")
    sock = shm / "s.sock"
    count, n = 10_000, 4096
    rng = random.Random(130)
    reads = {i * 3 + 1: (rng.randrange(len(content) // n) * n, n) for i in range(count)}

    async def body(engine: ThreadEngine) -> None:
        async with nbd_served(engine, spec, sock) as (server, vbd):
            w, conn = await attach(server, sock, structured=False)
            spy = HookSpy(conn)
            stream = b"".join(req(READ, o, k, handle=h) for h, (o, k) in reads.items())
            assert RECV_BUFFER % REQ.size and len(stream) > RECV_BUFFER
            send_now(w, stream)
            got = await asyncio.to_thread(collect, w, count, reads)
            assert set(got) == set(reads)
            check_reads(got, reads, content)
            await settled(conn, vbd)
            left = RECV_BUFFER - FAIRNESS_BUDGET * REQ.size
            assert spy.calls[0] == HookCall(RECV_BUFFER, left, False, True, 0), spy.calls[0]
            assert spy.hook_took + spy.reader_took == count
            assert spy.hook_took >= FAIRNESS_BUDGET and spy.reader_took > 0
            assert vbd.stats.read_reqs == count
            assert outstanding(server.pool) == 0
            w.close()
    arun(body)


def mixed_burst(size: int, seed: int, first: int) -> tuple[list[bytes], dict[int, tuple[int, int]],
                                                 dict[int, int], dict[int, tuple[int, bytes]],
                                                 dict[int, int]]:
    """Requests of every kind, one list item each: reads and writes first, the other
    commands and invalid requests mixed in the middle, then more reads and writes.
    Reads come from [0, 8M), writes go to [16M, 20M) and the big one to 21M (never
    overlapping: the order in which the server runs them does not matter), trim and
    zeroes at 24M and 26M.
    Handles count from ``first``. Returns (requests, reads {handle: (offset, length)},
    errors expected {handle: errno}, writes {handle: (offset, payload)}, block status
    {handle: flags})."""
    rng = random.Random(seed)
    reads: dict[int, tuple[int, int]] = {}
    writes: dict[int, tuple[int, bytes]] = {}
    errors: dict[int, int] = {}
    handle = itertools.count(first)
    slots = iter(range(16 * MiB, 20 * MiB, 128 * KiB))

    def read() -> bytes:
        h, n = next(handle), rng.choice((SECTOR, 4096, 65536, 128 * KiB))
        reads[h] = (rng.randrange(8 * MiB // n) * n, n)
        return req(READ, *reads[h], handle=h, flags=rng.choice((0, 0, FUA, DF)))

    def write(n: int = 0) -> bytes:
        h, off = next(handle), (21 * MiB if n else next(slots))
        payload = data(seed * 1000 + h, n or rng.choice((SECTOR, 4096, 65536)))
        writes[h] = (off, payload)
        return req(WRITE, off, len(payload), handle=h, payload=payload,
                   flags=rng.choice((0, FUA)))

    def bad(cmd: int, offset: int, length: int, code: int, flags: int = 0,
            payload: bytes = b"") -> bytes:
        h = next(handle)
        errors[h] = code
        return req(cmd, offset, length, handle=h, flags=flags, payload=payload)

    def ok(cmd: int, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
        h = next(handle)
        errors[h] = 0
        return req(cmd, offset, length, handle=h, flags=flags)

    middle = [write(300 * KiB), ok(FLUSH), ok(TRIM, 24 * MiB, 65536),
              ok(ZEROES, 26 * MiB, 65536, flags=NO_HOLE), ok(CACHE, 0, 65536),
              ok(STATUS, 0, MiB), ok(STATUS, 4 * MiB, MiB, flags=REQ_ONE),
              ok(READ, 4096, 0),  # nothing to read: the hook starts a task for it
              bad(READ, size - SECTOR, 2 * SECTOR, EINVAL),
              bad(READ, 0, 4096, EINVAL, flags=1 << 9),
              bad(42, 0, 0, EINVAL),
              bad(WRITE, size - SECTOR, 2 * SECTOR, ENOSPC, payload=b"n" * 2 * SECTOR),
              bad(WRITE, 20 * MiB, 4096, EINVAL, flags=FAST_ZERO, payload=b"f" * 4096),
              bad(FLUSH, SECTOR, 0, EINVAL),
              bad(STATUS, 0, 0, EINVAL)]
    rng.shuffle(middle)
    reqs = [read() for _ in range(40)] + [write() for _ in range(8)]
    rng.shuffle(reqs)
    for m in middle:
        reqs.append(m)
        reqs.extend(read() for _ in range(rng.randrange(3)))
    reqs += [read() for _ in range(40)] + [write() for _ in range(4)]
    heads = [REQ.unpack_from(r) for r in reqs]
    status = {h: flags for _, flags, cmd, h, _, _ in heads if cmd == STATUS and not errors[h]}
    return reqs, reads, errors, writes, status


def check_burst(got: dict[int, tuple[int, bytes]], reads: dict[int, tuple[int, int]],
                errors: dict[int, int], writes: dict[int, tuple[int, bytes]],
                status: dict[int, int], content: bytes) -> None:
    assert set(got) == set(reads) | set(errors) | set(writes), "replies lost or invented"
    check_reads(got, reads, content)
    for h in writes:
        assert got[h] == (0, b""), h
    for h, code in errors.items():
        assert got[h][0] == code, (h, got[h][0], code)
    for h, flags in status.items():
        payload = got[h][1]
        ctx, *runs = struct.unpack(f">I{(len(payload) - 4) // 4}I", payload)
        assert ctx == 1 and runs and len(runs) % 2 == 0
        assert 0 < sum(runs[0::2]) <= MiB
        if flags & REQ_ONE:
            assert len(runs) == 2


@pytest.mark.parametrize("delivery", ["one-go", "trickled"])
def test_hook_mixed_pipeline(shm: Path, delivery: str) -> None:
    """Reads, writes (one over the receive buffer), FLUSH, TRIM, WRITE_ZEROES, CACHE,
    BLOCK_STATUS and invalid requests (past the end, bad flags, unknown command, rejected
    writes with their payloads) in one burst, then more reads and writes: sent at once,
    or in random pieces with pauses (so that the stream is handed between the hook and
    the reader many times). Every request gets its own reply, matched by handle: data,
    or the error the protocol asks for; the writes land, the rejected ones do not."""
    spec, path, content = make_image(shm, "raw")
    sock = shm / "s.sock"
    rounds = 3

    async def body(engine: ThreadEngine) -> None:
        async with nbd_served(engine, spec, sock) as (server, vbd):
            w, conn = await attach(server, sock)
            spy = HookSpy(conn)
            model = bytearray(content)
            rng = random.Random(140)
            for r in range(rounds):
                # Each round its own handles, so that a stray reply cannot pass.
                reqs, reads, errors, writes, status = mixed_burst(len(content), 141 + r,
                                                                  (r + 1) << 24)
                stream = b"".join(reqs)
                count = len(reads) + len(errors) + len(writes)
                if delivery == "one-go":
                    got = await exchange(w, stream, count, reads)
                else:
                    # Cuts inside headers, between requests and inside payloads.
                    cuts, pos = set(), 0
                    for x in reqs:
                        if rng.random() < 0.5:
                            cuts.add(pos + rng.randrange(1, REQ.size))
                        elif rng.random() < 0.5:
                            cuts.add(pos)
                        if len(x) > REQ.size and rng.random() < 0.5:
                            cuts.add(pos + rng.randrange(REQ.size, len(x)))
                        pos += len(x)
                    cuts = sorted(cuts - {0})
                    pieces = [stream[a:b] for a, b in
                              zip([0, *cuts], [*cuts, len(stream)], strict=True)]
                    got = await exchange(w, pieces, count, reads, pause=0.0005)
                for off, payload in writes.values():
                    model[off : off + len(payload)] = payload
                model[26 * MiB : 26 * MiB + 65536] = bytes(65536)
                check_burst(got, reads, errors, writes, status, content)
            await settled(conn, vbd)
            assert spy.hook_took > 0 and spy.reader_took > 0
            if delivery == "trickled":  # the hook held partial headers, and handed over
                assert any(c.answer and 0 < c.left < REQ.size for c in spy.calls)
                assert sum(not c.answer for c in spy.calls) > 10
            assert not any(c.answer for c in spy.calls if c.found == c.left and c.found >= 28)
            w.close()
        now = path.read_bytes()
        trimmed = slice(24 * MiB, 24 * MiB + 65536)  # whatever the trim left
        model[trimmed] = now[trimmed]
        assert now == model
    arun(body)


@pytest.mark.parametrize("before", [10, 100])
def test_hook_bad_magic_drops_only_that_client_after_answering(
        shm: Path, before: int, caplog: pytest.LogCaptureFixture) -> None:
    """A bad magic after ``before`` reads and a write (10: the hook finds it; 100: the
    reader does, past the hook's budget), followed by more reads: what the server does
    today is answer every request before the bad magic, correctly, then close; the
    requests after it are not answered. Another client is served before and after."""
    spec, path, content = make_image(shm, "raw")
    sock = shm / "s.sock"
    rng = random.Random(150)
    reads = {h: (rng.randrange(4096) * 4096, 4096) for h in range(1, before + 1)}
    after = {h: (rng.randrange(4096) * 4096, 4096) for h in range(5000, 5010)}
    payload = data(151, 8192)
    burst = (b"".join(req(READ, o, n, handle=h) for h, (o, n) in reads.items())
             + req(WRITE, 20 * MiB, len(payload), handle=999, payload=payload)
             + req(READ, 0, 4096, handle=666, magic=0x12345678)
             + b"".join(req(READ, o, n, handle=h) for h, (o, n) in after.items()))

    async def body(engine: ThreadEngine) -> None:
        async with nbd_served(engine, spec, sock) as (server, vbd):
            other, other_conn = await attach(server, sock)
            w, conn = await attach(server, sock)
            spy = HookSpy(conn)

            async def other_reads(handle: int) -> None:
                want = {handle: (handle * 4096, 4096)}
                got = await exchange(other, req(READ, handle * 4096, 4096, handle=handle),
                                     1, want)
                check_reads(got, want, content)
            await other_reads(1)
            with caplog.at_level(logging.WARNING, logger="blktap.nbd"):
                got = await exchange(w, burst, len(reads) + 1, reads)
                assert await asyncio.to_thread(w.closed_by_server)
                await until(lambda: conn not in server._connections, "dropped")
            check_reads(got, reads, content)
            assert got[999] == (0, b"")
            assert any("bad request magic 0x12345678" in r.getMessage()
                       for r in caplog.records)
            if before < FAIRNESS_BUDGET:
                assert spy.hook_took == before + 1 and spy.reader_took == 0
                assert spy.calls[0].answer is False  # woke the reader for the bad magic
            else:
                assert spy.hook_took == FAIRNESS_BUDGET and spy.reader_took > 0
            assert conn.in_flight == 0 and conn.ch.on_data is None
            assert vbd.stats.read_reqs == before + 1
            await other_reads(2)
            assert other_conn in server._connections
            other.close()
            w.close()
        assert path.read_bytes()[20 * MiB : 20 * MiB + 8192] == payload
    arun(body)


@pytest.mark.parametrize("kind", ["raw", "vhd"])
def test_hook_counters_after_a_long_mixed_run(shm: Path, kind: str) -> None:
    """2,400 requests in bursts of 1 to 200 (reads, writes, flushes, block status,
    requests past the end), some bursts trickled: afterwards the connection holds no
    request and no payload byte, no buffer is out of the pool, and the VBD counted
    exactly the reads and writes sent (requests and sectors), no error."""
    spec, path, content = make_image(shm, kind)
    sock = shm / "s.sock"
    rng = random.Random(160 if kind == "raw" else 161)
    slots = [16 * MiB + i * 16384 for i in range(16 * MiB // 16384)]
    rng.shuffle(slots)
    sent = {"reads": 0, "writes": 0, "read_sectors": 0, "write_sectors": 0, "invalid": 0}
    model = bytearray(content)

    def burst(first: int, n: int) -> tuple[bytes, dict[int, tuple[int, int]], dict[int, int],
                                           dict[int, tuple[int, bytes]]]:
        reads, errors, writes, out = {}, {}, {}, []
        for h in range(first, first + n):
            r = rng.random()
            if r < 0.55 or not slots and r < 0.9:
                size = rng.choice((SECTOR, 4096, 4096, 65536, 256 * KiB, MiB))
                reads[h] = (rng.randrange(16 * MiB // size) * size, size)
                out.append(req(READ, *reads[h], handle=h))
                sent["reads"] += 1
                sent["read_sectors"] += size // SECTOR
            elif r < 0.9:
                size = rng.choice((SECTOR, 4096, 16384))
                writes[h] = (slots.pop(), data(h, size))
                out.append(req(WRITE, writes[h][0], size, handle=h, payload=writes[h][1]))
                sent["writes"] += 1
                sent["write_sectors"] += size // SECTOR
            elif r < 0.95:
                errors[h] = 0
                out.append(req(FLUSH, handle=h) if r < 0.93 else req(STATUS, 0, MiB, handle=h))
            else:
                errors[h] = EINVAL
                sent["invalid"] += 1
                out.append(req(READ, len(content) - 4096, 8192, handle=h))
        return b"".join(out), reads, errors, writes

    async def body(engine: ThreadEngine) -> dict:
        async with nbd_served(engine, spec, sock) as (server, vbd):
            w, conn = await attach(server, sock)
            spy = HookSpy(conn)
            handle, total = 1, 0
            while total < 2400:
                n = rng.randrange(1, 201)
                stream, reads, errors, writes = burst(handle, n)
                handle += n
                total += n
                if rng.random() < 0.3:
                    step = rng.randrange(1, 4000)
                    stream = [stream[i : i + step] for i in range(0, len(stream), step)]
                got = await exchange(w, stream, n, reads, pause=0.0002)
                check_burst(got, reads, errors, writes, {}, bytes(model))
                for off, payload in writes.values():
                    model[off : off + len(payload)] = payload
                if rng.random() < 0.2:
                    await settled(conn, vbd)
            await settled(conn, vbd)
            assert conn.in_flight == 0 and conn.bytes_in_flight == 0
            assert outstanding(server.pool) == 0
            assert spy.hook_took > 0 and spy.reader_took > 0
            assert spy.hook_took + spy.reader_took == total - sent["invalid"]  # admitted
            stats = vbd.stats.as_dict()
            w.close()
            return stats
    stats = arun(body)
    assert stats["read_reqs"] == sent["reads"]
    assert stats["write_reqs"] == sent["writes"]
    assert stats["read_sectors"] == sent["read_sectors"]
    assert stats["write_sectors"] == sent["write_sectors"]
    assert stats["errors"] == 0 and stats["in_flight"] == 0
    if kind == "raw":
        assert path.read_bytes() == model
    else:
        assert chain_bytes(path) == model
        assert check_ok(path)


@pytest.mark.parametrize("limit", ["requests", "bytes"])
def test_hook_respects_flow_control(shm: Path, limit: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that does not read its replies: once the connection is at its limit
    (MAX_IN_FLIGHT requests, or its payload bytes, lowered here to 1 MiB) with the
    reader waiting for the next header, more requests reach the hook, which admits none
    and wakes the reader, which waits for room. Nothing more is admitted until the client
    reads; then everything completes and the connection holds nothing."""
    spec, _, content = make_image(shm, "raw")
    sock = shm / "s.sock"
    n = 256 * KiB  # over the server's send buffer: no reply leaves whole while unread
    if limit == "bytes":
        monkeypatch.setattr(nbd_connection, "MAX_IN_FLIGHT_BYTES", MiB)
        full = MiB // n
    else:
        full = MAX_IN_FLIGHT
    more = 10
    reads = {h: ((h * 7) % 100 * n, n) for h in range(1, full + more + 1)}
    stream = [req(READ, o, k, handle=h) for h, (o, k) in reads.items()]

    async def body(engine: ThreadEngine) -> None:
        async with nbd_served(engine, spec, sock) as (server, vbd):
            w, conn = await attach(server, sock)
            # The server may ask for a send buffer of several MiB: this one (doubled by
            # Linux) holds no reply whole, whatever the server asks for.
            conn.ch.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * KiB)
            spy = HookSpy(conn)
            send_now(w, b"".join(stream[:full]))
            await until(lambda: conn.in_flight == full and hook_waits(conn),
                        "at the limit, the hook waiting for a header")
            calls = len(spy.calls)
            send_now(w, b"".join(stream[full:]))
            await until(lambda: len(spy.calls) > calls, "hook ran")
            refused = spy.calls[calls]
            assert refused == HookCall(more * REQ.size, more * REQ.size, False, False, full)
            await until(lambda: not conn.ch._filling, "reader woken")
            for _ in range(20):  # the loop turns; nothing more is admitted
                await asyncio.sleep(0.005)
                assert conn.in_flight == full
                assert conn.bytes_in_flight == full * n
                assert vbd.stats.read_reqs == full
            assert len(spy.calls) == calls + 1  # the reader, not the hook, waits for room
            got = await asyncio.to_thread(collect, w, len(reads), reads)
            check_reads(got, reads, content)
            await settled(conn, vbd)
            assert vbd.stats.read_reqs == len(reads)
            assert outstanding(server.pool) == 0
            w.close()
    arun(body)


def test_hook_that_raises_leaves_the_reader_to_serve(
        shm: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A data hook that raises (having taken nothing): the failure is logged with its
    traceback and the reader serves every request (split headers, a burst, a split write)
    correctly."""
    spec, path, content = make_image(shm, "raw")
    sock = shm / "s.sock"
    raised = [0]

    def broken(self: Connection) -> bool:
        raised[0] += 1
        raise RuntimeError("hook exploded")
    monkeypatch.setattr(Connection, "_pump", broken)

    async def body(engine: ThreadEngine) -> None:
        async with nbd_served(engine, spec, sock) as (server, vbd):
            with caplog.at_level(logging.ERROR, logger=HOOK_LOG):
                w, conn = await attach(server, sock)
                spy = HookSpy(conn)
                msg = req(READ, 4096, 4096, handle=1)
                send_now(w, msg[:10])
                await until(lambda: raised[0] == 1, "hook ran")
                send_now(w, msg[10:])
                assert await asyncio.to_thread(reply_of, w, {1: (4096, 4096)}) == (
                    1, 0, content[4096:8192])
                reads = {h: (h * 65536, 65536) for h in range(10, 110)}
                payload = data(170, 65536)
                got = await exchange(
                    w, [req(WRITE, 20 * MiB, len(payload), handle=5, payload=payload[:100]),
                        payload[100:],
                        b"".join(req(READ, o, k, handle=h) for h, (o, k) in reads.items())],
                    len(reads) + 1, reads, pause=0.005)
                check_reads(got, reads, content)
                assert got[5] == (0, b"")
                await settled(conn, vbd)
            assert raised[0] >= 2 and not spy.calls  # no call ever returned
            assert spy.hook_took == 0 and spy.reader_took == len(reads) + 2
            failures = [r for r in caplog.records if r.getMessage() == "data hook failed"]
            assert len(failures) == raised[0]
            assert failures[0].levelno == logging.ERROR and failures[0].exc_info
            assert isinstance(failures[0].exc_info[1], RuntimeError)
            w.close()
        assert path.read_bytes()[20 * MiB : 20 * MiB + 65536] == payload
    arun(body)


def tls_go(cert: Path) -> Callable[[Wire], None]:
    """A negotiation through NBD_OPT_STARTTLS, then structured replies and GO."""
    def go(w: Wire) -> None:
        w.greet()
        w.option(5)  # STARTTLS
        assert w.option_reply()[1] == 1
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(str(cert))
        w.sock = ctx.wrap_socket(w.sock, server_hostname="localhost")
        w.option(8)
        assert w.option_reply()[1] == 1
        w.structured = True
        w.option(7, struct.pack(">IH", 0, 0))
        assert w.replies_until_final()[-1][0] == 1
    return go


def test_hook_off_for_tls_and_cleared_when_the_connection_ends(shm: Path) -> None:
    """TLS connections never get the hook (the channel receives through the TLS layer),
    and are served correctly without it (a split header, a burst, by the reader). A plain connection
    has it while it serves and loses it when it ends: on DISC, when the client vanishes,
    and when the server stops."""
    spec, path, content = make_image(shm, "raw")
    sock = shm / "s.sock"
    cert, key = make_cert(shm)

    async def body(engine: ThreadEngine) -> None:
        async with nbd_served(engine, spec, sock, tls=tls_context(str(cert), str(key))
                              ) as (server, vbd):
            # Requests served at once post their replies, which TLS channels cannot send
            # (see test_tls_replies_of_requests_served_at_once_are_sent): the side door
            # declines here, so that this test is about the hook.
            vbd.read_now = lambda offset, view: False  # type: ignore[method-assign]
            vbd.write_now = lambda offset, view, fua=False: False  # type: ignore[method-assign]
            w, conn = await attach(server, sock, go=tls_go(cert))
            assert conn.ch.tls and conn.ch.on_data is None
            msg = req(READ, 8192, 4096, handle=1)
            await asyncio.to_thread(w.sock.sendall, msg[:5])
            await asyncio.sleep(0.01)
            assert conn.ch.on_data is None
            await asyncio.to_thread(w.sock.sendall, msg[5:])
            assert await asyncio.to_thread(reply_of, w, {1: (8192, 4096)}) == (
                1, 0, content[8192:12288])
            reads = {h: (h * 4096, 4096) for h in range(10, 210)}
            payload = data(180, 65536)
            got = await exchange(w, req(WRITE, 20 * MiB, 65536, handle=2, payload=payload)
                                 + b"".join(req(READ, o, n, handle=h)
                                            for h, (o, n) in reads.items()),
                                 len(reads) + 1, reads)
            check_reads(got, reads, content)
            assert got[2] == (0, b"")
            assert conn.ch.on_data is None
            await settled(conn, vbd)
            assert vbd.stats.read_reqs == len(reads) + 1 and vbd.stats.write_reqs == 1
            w.close()
        assert path.read_bytes()[20 * MiB : 20 * MiB + 65536] == payload

        async with nbd_served(engine, spec, sock) as (server, vbd):
            plain = []
            for _ in range(3):
                w, conn = await attach(server, sock)
                assert not conn.ch.tls and conn.ch.on_data == conn._pump
                plain.append((w, conn))
            (w1, c1), (w2, c2), (w3, c3) = plain
            await asyncio.to_thread(w1.sock.sendall, req(DISC))
            await until(lambda: c1 not in server._connections, "ended on DISC")
            assert c1.ch.on_data is None
            w2.close()
            await until(lambda: c2 not in server._connections, "ended on end of stream")
            assert c2.ch.on_data is None
            assert c3.ch.on_data == c3._pump
            await server.stop()
            assert c3.ch.on_data is None and c3.ch.closed
            for w, _ in plain:
                w.close()
    arun(body)


@pytest.mark.parametrize("count", [FAIRNESS_BUDGET - 1, 200])
def test_hook_disc_after_pipelined_reads(shm: Path, count: int) -> None:
    """Reads then NBD_CMD_DISC in one send: the hook serves the reads (all of them, or
    its budget and the reader the rest), the reader takes DISC; every reply arrives, then
    the end of the stream."""
    spec, _, content = make_image(shm, "raw")
    sock = shm / "s.sock"
    reads = {h: (h * 12288 % (16 * MiB), 4096) for h in range(1, count + 1)}

    async def body(engine: ThreadEngine) -> None:
        async with nbd_served(engine, spec, sock) as (server, vbd):
            w, conn = await attach(server, sock, structured=False)
            spy = HookSpy(conn)
            send_now(w, b"".join(req(READ, o, n, handle=h) for h, (o, n) in reads.items())
                     + req(DISC, handle=count + 1))
            got = await asyncio.to_thread(collect, w, count, reads)
            check_reads(got, reads, content)
            assert await asyncio.to_thread(w.closed_by_server)
            await until(lambda: conn not in server._connections, "ended")
            assert spy.hook_took == min(count, FAIRNESS_BUDGET)
            assert spy.reader_took == count - spy.hook_took
            assert spy.calls[0].answer is False  # woke the reader: for DISC, or its budget
            assert conn.in_flight == 0 and vbd.stats.read_reqs == count
            w.close()
    arun(body)


def test_hook_never_parses_the_payload_of_a_rejected_write(shm: Path) -> None:
    """A write rejected for its flags is answered EINVAL and its payload skipped. When
    the payload arrives after the reader began skipping, and happens to hold bytes that
    look like a read request, those bytes are still payload: the next reply is that of
    the request sent after the write, and there is no reply for the look-alike."""
    spec, _, content = make_image(shm, "raw")
    sock = shm / "s.sock"

    async def body(engine: ThreadEngine) -> None:
        async with nbd_served(engine, spec, sock) as (server, vbd):
            w, conn = await attach(server, sock, structured=False)
            payload = req(READ, 0, 4096, handle=0xBAD) + bytes(100)
            spy = HookSpy(conn)
            send_now(w, req(WRITE, 0, len(payload), handle=1, flags=FAST_ZERO))
            ch = conn.ch
            # The hook wakes the reader, which takes the header and waits in skip() for
            # the payload (it answers once the payload is skipped).
            await until(lambda: len(spy.calls) == 1 and not ch.buffered
                        and bool(ch._read_waiters), "reader skipping the payload")
            assert spy.calls[0].answer is False and spy.reader_took == 0
            send_now(w, payload)
            await asyncio.sleep(0.01)
            send_now(w, req(READ, 4096, 4096, handle=2))
            reads = {2: (4096, 4096), 0xBAD: (0, 4096)}
            handle, error, _ = await asyncio.to_thread(reply_of, w, reads)
            assert handle == 1, f"a reply for handle {handle:#x}, sent as write payload"
            assert error == EINVAL
            assert await asyncio.to_thread(reply_of, w, reads) == (2, 0, content[4096:8192])
            assert spy.hook_took + spy.reader_took == 1  # request 2, nothing else
            w.close()
    arun(body)


def test_tls_replies_of_requests_served_at_once_are_sent(shm: Path) -> None:
    """A TLS export on tmpfs, where the side door serves reads and writes at once: their
    replies reach the client."""
    spec, _, content = make_image(shm, "raw")
    sock = shm / "s.sock"
    cert, key = make_cert(shm)

    async def body(engine: ThreadEngine) -> None:
        loop = asyncio.get_running_loop()
        failures: list[dict] = []
        loop.set_exception_handler(lambda loop, context: failures.append(context))
        async with nbd_served(engine, spec, sock, tls=tls_context(str(cert), str(key))
                              ) as (server, vbd):
            w, conn = await attach(server, sock, go=tls_go(cert))
            payload = data(190, 4096)
            reads = {2: (8192, 4096)}
            replies = asyncio.ensure_future(asyncio.to_thread(collect, w, 2, reads))
            await asyncio.to_thread(w.sock.sendall, req(READ, 8192, 4096, handle=2)
                                    + req(WRITE, 0, 4096, handle=3, payload=payload))
            try:
                await until(lambda: replies.done() or bool(failures), "replies or a failure")
                assert not failures, f"{failures[0]['message']}: {failures[0].get('exception')!r}"
                got = await replies
            finally:
                if not replies.done():  # unblock the thread still waiting for replies
                    w.sock.shutdown(socket.SHUT_RDWR)
                    with contextlib.suppress(OSError, ConnectionError):
                        await replies
                w.close()
            check_reads(got, reads, content)
            assert got[3] == (0, b"")
            assert vbd.stats.read_reqs == 1 and vbd.stats.write_reqs == 1
            await settled(conn, vbd)
    arun(body)


def test_unix_connections_ask_for_the_large_send_buffer(shm: Path) -> None:
    """The server side of a UNIX-socket connection asks for UNIX_SEND_BUFFER, which Linux
    caps at net.core.wmem_max and then doubles; nbdinfo still sees the export whole."""
    spec, _, content = make_image(shm, "raw")
    sock = shm / "s.sock"
    cap = int(Path("/proc/sys/net/core/wmem_max").read_text())

    async def body(engine: ThreadEngine) -> None:
        async with nbd_served(engine, spec, sock) as (server, vbd):
            w, conn = await attach(server, sock, structured=False)
            got = conn.ch.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            assert got == 2 * min(UNIX_SEND_BUFFER, cap)
            w.close()
            res = await asyncio.to_thread(
                subprocess.run, [need("nbdinfo"), "--size", f"nbd+unix:///?socket={sock}"],
                capture_output=True, text=True, timeout=30)
            assert res.returncode == 0 and int(res.stdout) == len(content), res.stderr
    arun(body)


def test_a_lone_reply_leaves_without_waiting_a_turn(shm: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """One request at a time on the slow path (writes that allocate qcow2 clusters): its
    reply is sent when the request completes, not left for the end of the loop's turn
    (a turn costs system calls); the data hook still sends its batch once."""
    img = shm / "alloc.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M"], check=True)
    sock = shm / "alloc.sock"
    deferred: list[int] = []
    real = Channel.post

    def post(self: Channel, bufs, done, arg=None, *, now: bool = False) -> None:  # noqa: ANN001
        real(self, bufs, done, arg, **({"now": True} if now else {}))
        if self._flush_pending and not self._hold_flush:
            deferred.append(len(bufs))
    monkeypatch.setattr(Channel, "post", post)

    async def body(engine: ThreadEngine) -> None:
        async with nbd_served(engine, f"qcow2:{img}", sock) as (server, vbd):
            w, conn = await attach(server, sock)

            def client() -> None:
                for i in range(30):  # a new cluster each: allocation, the task's path
                    w.request(1, (i + 1) * 65536, 4096, handle=i, data=bytes([i]) * 4096)
                    handle, error, _ = w.reply()
                    assert (handle, error) == (i, 0)
            await asyncio.to_thread(client)
            await settled(conn, vbd)
            assert vbd.stats.write_reqs == 30
    with_engine(body)
    assert deferred == []


def test_a_request_on_the_slow_path_costs_four_turns_of_the_loop(
        shm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One allocating qcow2 write at a time (the driver has to wait: not the side door)
    goes to the VBD the callback way: the data hook queues and kicks it (turn 1), the
    group's task calls the driver (2), the engine's completion (3), the reply sent from
    the completion (4). No task per request, and no turn waiting for the merge (by the
    coroutines it took five)."""
    img = shm / "turns.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M"], check=True)
    sock = shm / "turns.sock"
    turns = count_loop_turns(monkeypatch)
    n = 60

    async def body(engine: ThreadEngine) -> None:
        async with nbd_served(engine, f"qcow2:{img}", sock) as (server, vbd):
            w, conn = await attach(server, sock)

            def client() -> None:
                for i in range(n):  # a new cluster each
                    w.request(1, (i + 1) * 65536, 4096, handle=i, data=bytes([i]) * 4096)
                    handle, error, _ = w.reply()
                    assert (handle, error) == (i, 0)
            turns[0] = 0
            await asyncio.to_thread(client)
            per_request = turns[0] / n
            await settled(conn, vbd)
            assert vbd.stats.write_reqs == n
            assert per_request <= 4.2, per_request
    with_engine(body)


def direct_raw(folder: Path, content: bytes) -> Path:
    """A raw image of ``content`` in ``folder``, skipping the test unless the file system
    takes O_DIRECT and is not in memory."""
    img = folder / "direct.raw"
    img.write_bytes(content)
    try:
        os.close(os.open(img, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        pytest.skip("no file system with O_DIRECT here")
    if _in_memory(img):
        pytest.skip("no disk file system here")
    return img


def test_the_aio_driver_starts_direct_requests_with_the_addresses_it_checked(
        disk: Path) -> None:
    """The callback way of a raw file with O_DIRECT under the Linux AIO engine: a request
    of several aligned buffers goes to the kernel with the addresses the driver's
    alignment check took (one ctypes look-up per buffer, not one per layer), and the
    kernel fills those buffers; one buffer off the block boundary sends the request to the
    buffered descriptor, which the callback way declines (the caller awaits ``read``)."""
    from blktap.io.linuxaio import LinuxAioEngine

    content = random.Random(6).randbytes(MiB)
    img = direct_raw(disk, content)
    pool = BufferPool()

    async def body(engine: LinuxAioEngine) -> None:
        drv = await engine.call(open_stack, engine, f"aio:{img}", writable=True)
        assert isinstance(drv, AioDriver) and drv.dfd is not None
        try:
            loop = asyncio.get_running_loop()
            parts = [pool.get(4096).view for _ in range(8)]
            told: asyncio.Future = loop.create_future()
            kernel = engine.aio_submitted
            assert drv.start_read(8192, parts, told.set_result)
            assert await told is None
            assert engine.aio_submitted == kernel + 1
            assert b"".join(parts) == content[8192 : 8192 + 32768]
            for i, part in enumerate(parts):
                part[:] = bytes([i + 1]) * 4096
            told = loop.create_future()
            assert drv.start_write(65536, parts, told.set_result)
            assert await told is None
            odd = memoryview(bytearray(4096 + 1))[1:]
            assert not drv.start_read(0, [*parts[:3], odd], told.set_result)
            await drv.read(0, [*parts[:3], odd])
            assert b"".join([*parts[:3], odd]) == content[:16384]
            # A read-only buffer has no address to give the kernel: the buffered
            # descriptor again, through write (the same bytes, so the file is unchanged).
            ro = memoryview(content[:4096])
            assert not drv.start_write(0, [ro], told.set_result)
            await drv.write(0, [ro])
        finally:
            await drv.close()
    with_engine(body, LinuxAioEngine)
    want = bytearray(content)
    want[65536 : 65536 + 32768] = b"".join(bytes([i + 1]) * 4096 for i in range(8))
    assert img.read_bytes() == want


def test_a_direct_read_or_write_costs_two_turns_of_the_loop(
        disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A raw file with O_DIRECT under the Linux AIO engine: the data hook queues and kicks
    the request, the VBD hands it to the driver's callback way at the kick (io_submit at
    once), and the reaping of its completion sends the reply: two turns of the loop per
    request at QD1 (by the coroutines it took five to six)."""
    from blktap.io.linuxaio import LinuxAioEngine

    img = direct_raw(disk, random.Random(5).randbytes(4 * MiB))
    sock = disk / "direct.sock"
    turns = count_loop_turns(monkeypatch)
    n = 200
    expect = bytearray(img.read_bytes())

    async def body(engine: LinuxAioEngine) -> None:
        async with nbd_served(engine, f"aio:{img}", sock) as (server, vbd):
            w, conn = await attach(server, sock)

            def client() -> None:
                for i in range(n):
                    off = (i * 7919 % 1000) * 4096
                    if i % 2:
                        data = bytes([i % 251]) * 4096
                        w.request(1, off, 4096, handle=i, data=data)
                        expect[off : off + 4096] = data
                        assert w.reply()[:2] == (i, 0)
                    else:
                        w.request(0, off, 4096, handle=i)
                        handle, error, got = w.reply(4096)
                        assert (handle, error) == (i, 0)
                        assert got == expect[off : off + 4096]
            turns[0] = 0
            workers, kernel = engine.submitted, engine.aio_submitted
            await asyncio.to_thread(client)
            per_request = turns[0] / n
            await settled(conn, vbd)
            assert engine.aio_submitted - kernel == n  # all of them through the kernel
            assert engine.submitted == workers
            assert per_request <= 2.3, per_request
    with_engine(body, LinuxAioEngine)
    assert img.read_bytes() == expect
