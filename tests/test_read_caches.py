"""The read caches: the local parent cache (``tap-ctl open -r``, ``lc``) and the shared
block cache (``bc``).

Parent reads are counted by a wrapping driver put between the cache and the parent (the
layer every read that reaches the parents passes through), the data is checked against
the chain's content read before any cache existed, and qemu-img compares the served disk
with it. The full-file-system case uses a small tmpfs mounted by the test.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from blktap.image import Chain
from blktap.image.vhd.create import create, snapshot
from blktap.io import ThreadEngine
from blktap.tapdisk.driver import Driver, Extents
from blktap.tapdisk.drivers import open_stack
from blktap.tapdisk.drivers.blockcache import PAGE, BlockCacheDriver, Pool
from blktap.tapdisk.drivers.lcache import LocalCacheDriver
from blktap.tapdisk.vbd import VBD
from conftest import need, run, tool

KiB, MiB = 1 << 10, 1 << 20
SIZE = 16 * MiB
CHUNK = 256 * KiB


class Counting(Driver):
    """Passes everything to ``inner`` and counts the reads that reach it."""

    name = "counting"

    def __init__(self, inner: Driver) -> None:
        super().__init__(inner.engine, inner.size, writable=False, parent=inner)
        self.caps = inner.caps
        self.path = inner.path
        self.fd = getattr(inner, "fd", -1)
        self.reads = 0
        self.bytes = 0

    async def read(self, offset: int, iov: Sequence[memoryview]) -> None:
        self.reads += 1
        self.bytes += sum(len(v) for v in iov)
        await self.forward_read(offset, iov)

    async def block_status(self, offset: int, length: int) -> Extents:
        return await self.forward_block_status(offset, length)


def make_chain(base: Path, leaf: Path, size: int = SIZE, seed: int = 1) -> bytes:
    """A base with data in most of it (and holes), a leaf owning a few runs of its own;
    returns the chain's content."""
    rnd = __import__("random").Random(seed)
    create(str(base), size)
    with Chain.open(f"vhd:{base}", writable=True) as c:
        for off in range(0, size, MiB):
            if off // MiB % 5 != 3:  # a hole every fifth megabyte
                c.pwrite(off, rnd.randbytes(MiB))
    snapshot(str(leaf), str(base))
    with Chain.open(f"vhd:{leaf}", writable=True) as c:
        c.pwrite(5 * MiB + 4096, b"L" * 64 * KiB)
        c.pwrite(size - 8192, b"E" * 8192)
    with Chain.open(f"vhd:{leaf}") as c:
        return c.pread(0, size)


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, bytes]:
    leaf = tmp_path / "leaf.vhd"
    return leaf, make_chain(tmp_path / "base.vhd", leaf)


async def read_all(vbd: VBD, size: int, chunk: int = CHUNK) -> bytes:
    out = bytearray(size)
    view = memoryview(out)
    await asyncio.gather(*(vbd.read(off, view[off : off + chunk])
                           for off in range(0, size, chunk)))
    return bytes(out)


async def read_in_turn(vbd: VBD, start: int, end: int, chunk: int = CHUNK) -> bytes:
    """One read at a time, so none is merged with another: each miss is ``chunk``."""
    out = bytearray(end - start)
    view = memoryview(out)
    for off in range(0, end - start, chunk):
        await vbd.read(start + off, view[off : off + chunk])
    return bytes(out)


def open_with_lcache(engine: ThreadEngine, leaf: Path, **kw: object
                     ) -> tuple[Driver, Counting, LocalCacheDriver]:
    top = open_stack(engine, f"vhd:{leaf}", writable=True, direct=False)
    counting = Counting(top.parent)  # type: ignore[arg-type]
    top.parent = counting
    lc = LocalCacheDriver.insert(engine, top, **kw)
    assert lc is not None and top.parent is lc and lc.parent is counting
    return top, counting, lc


# ---------------------------------------------------------------------- lc
def test_second_pass_is_served_by_the_leaf(chain: tuple[Path, bytes]) -> None:
    leaf, expected = chain

    async def body() -> None:
        engine = ThreadEngine(4)
        try:
            top, counting, lc = open_with_lcache(engine, leaf)
            vbd = VBD(top, name="t")
            assert await read_all(vbd, SIZE) == expected
            first_reads = counting.reads
            assert first_reads > 0 and lc.misses > 0 and lc.filled == lc.misses
            assert await read_all(vbd, SIZE) == expected
            assert counting.reads == first_reads  # no parent read in the second pass
            status = lc.describe()["status"]
            assert status["enabled"] and status["misses"] == lc.misses
            assert status["hits"] == 2 * SIZE // 512 - lc.misses
            await vbd.close()
        finally:
            engine.close()
    asyncio.run(body())
    with Chain.open(f"vhd:{leaf}") as c:  # the cached leaf still reads as the chain
        assert c.pread(0, SIZE) == expected


def test_a_write_racing_a_fill_is_never_overwritten(chain: tuple[Path, bytes]) -> None:
    """A guest write lands while a read of the same sectors is at the parents: the fill
    that follows leaves the written sectors alone."""
    leaf, expected = chain

    async def body() -> None:
        engine = ThreadEngine(4)
        try:
            top, counting, lc = open_with_lcache(engine, leaf)
            gate = asyncio.Event()
            inner_read = counting.read

            async def slow_read(offset: int, iov: Sequence[memoryview]) -> None:
                await inner_read(offset, iov)
                await gate.wait()  # the parents answered; the fill has not run yet

            counting.read = slow_read  # type: ignore[method-assign]
            vbd = VBD(top, name="t")
            buf = memoryview(bytearray(64 * KiB))
            reading = asyncio.ensure_future(vbd.read(0, buf))
            await asyncio.sleep(0.05)
            await vbd.write(0, memoryview(b"W" * 4096))
            gate.set()
            await reading
            assert bytes(buf) == expected[: 64 * KiB]  # the read saw the parents
            got = memoryview(bytearray(64 * KiB))
            await vbd.read(0, got)
            assert bytes(got[:4096]) == b"W" * 4096  # the write survived the fill
            assert bytes(got[4096:]) == expected[4096 : 64 * KiB]
            await vbd.close()
        finally:
            engine.close()
    asyncio.run(body())


def test_no_cache_for_a_disk_without_parents_and_refusals(tmp_path: Path,
                                                          chain: tuple[Path, bytes]) -> None:
    leaf, _ = chain
    raw = tmp_path / "r.img"
    raw.write_bytes(bytes(MiB))

    async def body() -> None:
        engine = ThreadEngine(2)
        try:
            d = open_stack(engine, f"aio:{raw}", writable=True, direct=False)
            assert LocalCacheDriver.insert(engine, d) is None
            await d.close()
            ro = open_stack(engine, f"vhd:{leaf}", writable=False, direct=False)
            with pytest.raises(Exception) as info:
                LocalCacheDriver.insert(engine, ro)
            assert getattr(info.value, "errno", None) == errno.EROFS
            for x in ro.chain():
                await x.close()
        finally:
            engine.close()
    asyncio.run(body())


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("low_water", [2 * MiB, 0], ids=["runs-low", "enospc"])
def test_full_cache_file_system_keeps_serving(tmp_path: Path, small_tmpfs: Path,
                                              low_water: int) -> None:
    """The leaf lives on a 12 MiB tmpfs over a 32 MiB chain; half way through the first
    pass the file system is filled by another file. The cache turns itself off (free
    space below the low water mark at its next check, or ENOSPC from a fill made before
    that check), every read returns the
    chain's data, and once space is back the cache turns on again. The leaf stays a
    valid VHD whose chain reads as before.

    The passes after the filler read one chunk at a time: reads issued together are
    merged by the VBD as timing allows, and a merged 8 MiB miss with about 8 MiB free
    rightly keeps the cache off (it would leave less than the low water mark), which
    made this test fail about one run in two when the last pass read everything at once."""
    size = 32 * MiB
    leaf = small_tmpfs / "leaf.vhd"
    expected = make_chain(tmp_path / "base.vhd", leaf, size, seed=2)
    clock = Clock()

    async def body() -> None:
        engine = ThreadEngine(4)
        try:
            top, counting, lc = open_with_lcache(engine, leaf, low_water=low_water,
                                                 clock=clock)
            vbd = VBD(top, name="t")
            half = 4 * MiB
            got = await read_all(vbd, half)
            assert got == expected[:half] and lc.enabled and lc.filled > 0
            filler = small_tmpfs / "filler"
            with open(filler, "wb") as f:
                try:
                    while True:
                        f.write(b"\1" * MiB)
                        f.flush()
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
            if low_water:
                clock.now += 2  # the next fill asks for the free space: too little
            # (else the cache still believes in the room it saw: the fill meets ENOSPC)
            assert await read_in_turn(vbd, half, size) == expected[half:]
            assert not lc.enabled and lc.skipped > 0
            if low_water == 0:
                assert lc.errors > 0 and "space" in lc.reason.lower()
            filler.unlink()
            clock.now += 2
            before = lc.filled
            assert await read_in_turn(vbd, 0, size) == expected
            assert lc.filled > before  # room again: it filled again (until full again)
            await vbd.close()
        finally:
            engine.close()
    asyncio.run(body())
    with Chain.open(f"vhd:{leaf}") as c:
        assert c.pread(0, size) == expected
    res = run([tool("vhd-util"), "check", "-n", str(leaf)], text=True)
    assert res.returncode == 0 and "is valid" in res.stdout, res.stdout + res.stderr


# ---------------------------------------------------------------------- bc
def test_block_cache_shared_by_two_disks(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    leaves = [tmp_path / "a.vhd", tmp_path / "b.vhd"]
    expected = make_chain(base, leaves[0])
    snapshot(str(leaves[1]), str(base))
    with Chain.open(f"vhd:{leaves[1]}") as c:
        expected_b = c.pread(0, SIZE)
    clock = Clock()
    pool = Pool(limit=64 * MiB, idle=60, clock=clock)

    async def body() -> None:
        engine = ThreadEngine(4)
        try:
            vbds, counts, caches = [], [], []
            for leaf in leaves:
                top = open_stack(engine, f"vhd:{leaf}", writable=True, direct=False)
                counting = Counting(top.parent)  # type: ignore[arg-type]
                top.parent = counting
                bc = BlockCacheDriver.insert(engine, top, pool)
                assert bc is not None and bc.parent is counting
                vbds.append(VBD(top, name=str(leaf)))
                counts.append(counting)
                caches.append(bc)
            assert caches[0].shared is caches[1].shared  # one cache for the one parent
            assert await read_all(vbds[0], SIZE) == expected
            assert counts[0].reads > 0 and caches[0].page_misses > 0
            assert await read_all(vbds[1], SIZE) == expected_b
            assert counts[1].reads == 0  # every page came from the other disk's reads
            assert caches[1].page_misses == 0 and caches[1].page_hits > 0
            status = caches[1].describe()["status"]
            assert status["shared"]["users"] == 2 and status["pool"]["bytes"] == pool.used
            # Idle pages go.
            clock.now += 61
            assert pool.evict_idle() > 0 and pool.used == 0
            await vbds[0].close()
            assert pool.caches  # still used by the other disk
            await vbds[1].close()
            assert not pool.caches and pool.used == 0
        finally:
            engine.close()
    asyncio.run(body())


def test_block_cache_memory_is_bounded(chain: tuple[Path, bytes]) -> None:
    leaf, expected = chain
    pool = Pool(limit=MiB)

    async def body() -> None:
        engine = ThreadEngine(4)
        try:
            top = open_stack(engine, f"vhd:{leaf}", writable=True, direct=False)
            bc = BlockCacheDriver.insert(engine, top, pool)
            assert bc is not None
            vbd = VBD(top, name="t")
            peak = 0
            out = bytearray(SIZE)
            for off in range(0, SIZE, CHUNK):
                await vbd.read(off, memoryview(out)[off : off + CHUNK])
                peak = max(peak, pool.used)
            assert bytes(out) == expected
            assert peak <= MiB and pool.evicted >= (SIZE - MiB) // PAGE
            await vbd.close()
            assert pool.used == 0
        finally:
            engine.close()
    asyncio.run(body())


def test_block_cache_drops_a_parent_that_changed(tmp_path: Path) -> None:
    """A parent modified while nobody had it open gets a new cache (its identity has
    its size and modification time)."""
    base = tmp_path / "base.vhd"
    leaf = tmp_path / "leaf.vhd"
    make_chain(base, leaf)
    pool = Pool(limit=8 * MiB)

    async def body() -> None:
        engine = ThreadEngine(2)
        try:
            top = open_stack(engine, f"vhd:{leaf}", writable=True, direct=False)
            bc = BlockCacheDriver.insert(engine, top, pool)
            assert bc is not None
            first = bc.shared.ident
            keep = pool.cache_for(top.parent.parent)  # type: ignore[union-attr]
            for d in top.chain():
                await d.close()
            os.utime(base, ns=(1, 1))
            top = open_stack(engine, f"vhd:{leaf}", writable=True, direct=False)
            bc = BlockCacheDriver.insert(engine, top, pool)
            assert bc is not None and bc.shared.ident != first and bc.shared is not keep
            for d in top.chain():
                await d.close()
            pool.release(keep)
            assert not pool.caches
        finally:
            engine.close()
    asyncio.run(body())


# ---------------------------------------------------------------------- tap-ctl
def test_tap_ctl_open_r_and_b(tmp_path: Path, chain: tuple[Path, bytes]) -> None:
    """``tap-ctl create -r -b``: the stats keep the reference's shape (leaf first, with
    the caches as images between the leaf and its parent), the second pass over NBD
    reads nothing from the parent, and the disk compares equal to the chain."""
    from test_tap_ctl_daemon import Host

    qemu_img = need("qemu-img")
    leaf, expected = chain
    raw = tmp_path / "expected.raw"
    raw.write_bytes(expected)
    host = Host(tmp_path)
    pid, minor = host.create(f"vhd:{leaf}", "-r", "-b")
    p, m = str(pid), str(minor)
    try:
        uri = host.nbd(pid, minor)

        def stats() -> dict:
            return json.loads(host.out("stats", "-p", p, "-m", m))

        for _ in range(2):
            res = run([qemu_img, "convert", "-f", "raw", "-O", "raw", uri,
                       str(tmp_path / "copy.raw")], text=True)
            assert res.returncode == 0, res.stderr
            assert (tmp_path / "copy.raw").read_bytes() == expected
            if _ == 0:
                after_first = stats()
        after_second = stats()
        names = [i["driver"]["name"] for i in after_second["images"]]
        assert names == ["vhd", "lc", "bc", "vhd"]
        assert after_second["read_caching"] == "false"
        parent_reads = [s["images"][3]["hits"][0] for s in (after_first, after_second)]
        assert parent_reads[0] > 0 and parent_reads[1] == parent_reads[0]
        lc = after_second["images"][1]["driver"]["status"]
        # The block cache reads whole pages: the parent sees at least the misses.
        assert lc["enabled"] and 0 < lc["misses"] <= parent_reads[0] and lc["hits"] > 0
        bc = after_second["images"][2]["driver"]["status"]
        assert bc["misses"] > 0 and bc["pool"]["bytes"] > 0
        res = run([qemu_img, "compare", "-f", "raw", "-F", "raw", uri, str(raw)], text=True)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        host.out("destroy", "-p", p, "-m", m)
    res = run([tool("vhd-util"), "check", "-n", str(leaf)], text=True)
    assert res.returncode == 0, res.stdout


def test_encrypted_leaf_stores_the_cache_encrypted(tmp_path: Path) -> None:
    """An encrypted chain read through ``lc``: the leaf receives the parents' data
    encrypted with its key (never in clear), and the chain still reads the same."""
    from test_tapdisk_encrypted import KEY64, make_encrypted

    base = make_encrypted(tmp_path / "base.vhd", 4 * MiB)
    data = os.urandom(2 * MiB)
    with Chain.open(f"vhd:{base}", key=KEY64, writable=True) as c:
        c.pwrite(0, data)
    leaf = tmp_path / "leaf.vhd"
    snapshot(str(leaf), str(base))

    async def body() -> None:
        engine = ThreadEngine(2)
        try:
            top = open_stack(engine, f"vhd:{leaf}", writable=True, direct=False, key=KEY64)
            lc = LocalCacheDriver.insert(engine, top)
            assert lc is not None
            vbd = VBD(top, name="t")
            assert (await read_all(vbd, 2 * MiB))[: 2 * MiB] == data
            assert lc.filled == 4096
            await vbd.close()
        finally:
            engine.close()
    asyncio.run(body())
    assert data[:4096] not in leaf.read_bytes()
    with Chain.open(f"vhd:{leaf}", key=KEY64) as c:
        assert c.pread(0, 2 * MiB) == data
    with Chain.open(f"vhd:{base}", key=KEY64) as c:
        assert c.pread(0, 2 * MiB) == data


def test_tap_ctl_block_cache_shared_by_two_minors(tmp_path: Path) -> None:
    """Two disks over one parent in one tapdisk, both opened with ``-b``: the second
    one's reads are served from the pages the first one's brought in."""
    from test_tap_ctl_daemon import ALLOCATE_RE, Host

    qemu_img = need("qemu-img")
    base, a, b = (tmp_path / n for n in ("base.vhd", "a.vhd", "b.vhd"))
    make_chain(base, a)
    snapshot(str(b), str(base))
    with Chain.open(f"vhd:{b}") as c:
        expected_b = c.pread(0, SIZE)
    host = Host(tmp_path)
    pid, first = host.create(f"vhd:{a}", "-b")
    p = str(pid)
    second = ALLOCATE_RE.search(host.out("allocate").strip())[1]  # type: ignore[index]
    try:
        host.out("attach", "-p", p, "-m", second)
        host.out("open", "-p", p, "-m", second, "-a", f"vhd:{b}", "-b")
        for minor in (first, int(second)):
            res = run([qemu_img, "convert", "-f", "raw", "-O", "raw", host.nbd(pid, minor),
                       str(tmp_path / f"{minor}.raw")], text=True)
            assert res.returncode == 0, res.stderr
        assert (tmp_path / f"{second}.raw").read_bytes() == expected_b
        stats = json.loads(host.out("stats", "-p", p, "-m", second))
        assert [i["driver"]["name"] for i in stats["images"]] == ["vhd", "bc", "vhd"]
        bc = stats["images"][1]["driver"]["status"]
        assert bc["shared"]["users"] == 2 and bc["hits"] > 0 and bc["misses"] == 0
        assert stats["images"][2]["hits"][0] == 0  # its parent driver read nothing
    finally:
        host.out("destroy", "-p", p, "-m", second)
        host.out("destroy", "-p", p, "-m", str(first))


class SideDoorParent(Driver):
    """A parent whose reads always succeed on the side door (zeros)."""

    name = "side-door"

    def read_now(self, offset, iov, tally) -> bool:  # type: ignore[override]
        for v in iov:
            v[:] = bytes(len(v))
        return True


def test_a_cache_turned_off_looks_again_before_taking_the_side_door(tmp_path: Path) -> None:
    """While off, reads may take the side door below (nothing to fill); once its second
    is up, the read must go the coroutine way, which looks at the free space again and
    turns the cache back on. (Before: the side door served every read, and a cache off
    stayed off for as long as reads came that way.)"""
    leaf = tmp_path / "leaf.vhd"
    create(str(leaf), MiB)
    clock, room = Clock(), [0]

    async def body() -> None:
        engine = ThreadEngine(1)
        try:
            top = open_stack(engine, f"vhd:{leaf}", writable=True, direct=False)
            lc = LocalCacheDriver(engine, top, SideDoorParent(engine, MiB, writable=False),
                                  clock=clock, free=lambda _path: room[0])
            assert not lc._may_fill(4096) and not lc.enabled  # no room: off
            buf = memoryview(bytearray(4096))
            clock.now = 0.5
            assert lc.read_now(0, [buf], [])  # within the second: the side door serves it
            clock.now, room[0] = 2.0, 64 * MiB
            assert not lc.read_now(0, [buf], [])  # time to look again: the coroutine's way
            assert lc._may_fill(4096) and lc.enabled
            await top.close()
        finally:
            engine.close()
    asyncio.run(body())
