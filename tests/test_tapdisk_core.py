"""tapdisk core: the I/O engine, the drivers (aio, vhd, ram) and the VBD (merging, retry,
timeout, watchdog, counters, unaligned requests), driven in-process."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import random
from pathlib import Path

import pytest

from blktap.errors import BlktapError
from blktap.image import Chain
from blktap.image.vhd import check as vhd_check
from blktap.image.vhd.create import create as create_vhd
from blktap.image.vhd.create import snapshot as snapshot_vhd
from blktap.io import BufferPool, ThreadEngine
from blktap.io.iov import advance, slice_iov, total, zero_fill
from blktap.tapdisk.driver import (
    STATE_DATA,
    STATE_HOLE,
    STATE_ZERO,
    Caps,
    Driver,
    merge_extents,
)
from blktap.tapdisk.drivers import open_stack, parse
from blktap.tapdisk.vbd import VBD
from conftest import with_engine

MiB = 1 << 20


run = with_engine  # a body run with a 4-thread ThreadEngine on a fresh loop


async def open_vbd(engine: ThreadEngine, spec: str, **kw: object) -> VBD:
    writable = not kw.pop("read_only", False)
    driver = await engine.call(open_stack, engine, spec, writable=writable)
    return VBD(driver, read_only=not writable, **kw)  # type: ignore[arg-type]


def check_ok(path: Path) -> bool:
    return vhd_check.check(str(path)).errno == 0


def view(data: bytes) -> memoryview:
    return memoryview(bytearray(data))


# ------------------------------------------------------------------------- engine
def test_engine_reads_past_eof_as_zeros_and_writes_whole(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1000)

    async def body(engine: ThreadEngine) -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            a, b = view(bytes(600)), view(bytes(600))
            await engine.preadv(fd, [a, b], 0)
            assert bytes(a) == b"x" * 600
            assert bytes(b) == b"x" * 400 + bytes(200)
            await engine.pwritev(fd, [view(b"ab"), view(b"cd")], 998, dsync=True)
            await engine.fsync(fd)
            assert await engine.call(os.pread, fd, 4, 998) == b"abcd"
            with pytest.raises(OSError) as exc:
                await engine.call(os.pread, -1, 1, 0)
            assert exc.value.errno == errno.EBADF
        finally:
            os.close(fd)
    run(body)


def test_engine_many_concurrent_operations(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(1 << 20))
    data = path.read_bytes()

    async def body(engine: ThreadEngine) -> None:
        fd = os.open(path, os.O_RDONLY)
        bufs = [view(bytes(4096)) for _ in range(256)]
        await asyncio.gather(*(engine.preadv(fd, [b], i * 4096) for i, b in enumerate(bufs)))
        os.close(fd)
        assert b"".join(bytes(b) for b in bufs) == data
    run(body)


def test_iov_helpers() -> None:
    iov = [view(b"abc"), view(b"defg"), view(b"h")]
    assert total(iov) == 8
    assert [bytes(v) for v in slice_iov(iov, 2, 4)] == [b"c", b"def"]
    assert [bytes(v) for v in advance(iov, 5)] == [b"fg", b"h"]
    zero_fill(slice_iov(iov, 1, 6))
    assert b"".join(bytes(v) for v in iov) == b"a" + bytes(6) + b"h"
    with pytest.raises(ValueError):
        slice_iov(iov, 4, 10)


def test_buffer_pool_reuses_aligned_buffers() -> None:
    pool = BufferPool(keep_bytes=64 << 10)
    a = pool.get(5000)
    assert len(a.view) == 5000 and a.size_class == 8192
    import ctypes
    assert ctypes.addressof(ctypes.c_char.from_buffer(a.view)) % 4096 == 0
    pool.put(a)
    pool.put(a)  # a second put is harmless
    b = pool.get(8000)
    assert b.mem is a.mem and pool.allocated == 1
    big = pool.get(1 << 20)
    pool.put(big)  # over the idle budget: dropped, not kept
    assert pool.get(1 << 20).mem is not big.mem


# ------------------------------------------------------------------------- drivers
def test_parse_specs(tmp_path: Path) -> None:
    raw = tmp_path / "d.img"
    raw.write_bytes(bytes(4096))
    create_vhd(str(tmp_path / "d.vhd"), 4 * MiB)
    assert parse(f"aio:{raw}") == ("aio", str(raw))
    assert parse(str(raw)) == ("aio", str(raw))
    assert parse(str(tmp_path / "d.vhd")) == ("vhd", str(tmp_path / "d.vhd"))
    with pytest.raises(BlktapError) as exc:
        parse("vmdk:/x")
    assert exc.value.errno == errno.ENOSYS
    with pytest.raises(BlktapError) as exc:
        parse("bogus:/x")
    assert exc.value.errno == errno.ENOENT
    with pytest.raises(BlktapError) as exc:
        parse(str(tmp_path / "missing"))
    assert exc.value.errno == errno.ENOENT


@pytest.mark.parametrize("kind", ["aio", "ram", "vhd"])
def test_driver_roundtrip_and_zeroes(tmp_path: Path, kind: str) -> None:
    size = 8 * MiB
    path = tmp_path / ("d.vhd" if kind == "vhd" else "d.img")
    if kind == "vhd":
        create_vhd(str(path), size)
    else:
        path.write_bytes(bytes(size))
    rng = random.Random(7)
    shadow = bytearray(size)

    async def body(engine: ThreadEngine) -> None:
        vbd = await open_vbd(engine, f"{kind}:{path}")
        assert vbd.size == size and vbd.caps & Caps.WRITE
        writes = []
        for _ in range(40):
            off = rng.randrange(0, size - 70000)
            n = rng.randrange(1, 70000)
            data = rng.randbytes(n)
            shadow[off : off + n] = data
            writes.append((off, data))
        for off, data in writes:  # one by one: overlapping writes must land in order
            await vbd.write(off, view(data))
        await vbd.write_zeroes(MiB, 3 * MiB + 17)
        shadow[MiB : 4 * MiB + 17] = bytes(3 * MiB + 17)
        await vbd.write_zeroes(5 * MiB, 4096, may_trim=False)
        shadow[5 * MiB : 5 * MiB + 4096] = bytes(4096)
        await vbd.flush()
        out = view(bytes(size))
        await vbd.read(0, out)
        assert bytes(out) == bytes(shadow)
        await vbd.close()
    run(body)
    if kind == "vhd":
        assert check_ok(path)
        with Chain.open(str(path)) as chain:
            assert chain.read(0, size // 512) == shadow
    else:
        assert path.read_bytes() == bytes(shadow)


def test_vhd_concurrent_writes_allocate_safely(tmp_path: Path) -> None:
    """Many writes in flight at once, to allocated and unallocated blocks alike."""
    path = tmp_path / "d.vhd"
    size = 32 * MiB
    create_vhd(str(path), size)
    rng = random.Random(3)
    chunks = [(i * 64 * 1024, rng.randbytes(64 * 1024)) for i in range(size // (64 * 1024))]
    rng.shuffle(chunks)

    async def body(engine: ThreadEngine) -> None:
        vbd = await open_vbd(engine, f"vhd:{path}")
        await asyncio.gather(*(vbd.write(off, view(data)) for off, data in chunks))
        await asyncio.gather(*(vbd.write(off, view(data)) for off, data in chunks[:50]))
        await vbd.close()
    run(body)
    assert check_ok(path)
    expect = bytearray(size)
    for off, data in chunks:
        expect[off : off + len(data)] = data
    with Chain.open(str(path)) as chain:
        assert chain.read(0, size // 512) == expect


@pytest.mark.parametrize("layout", ["dynamic", "differencing"])
def test_vhd_writes_data_split_mid_sector(tmp_path: Path, layout: str) -> None:
    """A guest may split a request's data at any byte (virtio asks only the total to be
    whole sectors): allocating writes whose buffers end mid-sector land intact."""
    path = tmp_path / "d.vhd"
    create_vhd(str(path), 8 * MiB)
    if layout == "differencing":
        child = tmp_path / "child.vhd"
        snapshot_vhd(str(child), str(path))
        path = child
    rng = random.Random(9)
    data = rng.randbytes(6 * 512)
    cuts = [0, 100, 612, 1024, 1500, 3072, 3073, 6 * 512]  # ends at odd bytes, and whole
    iov = [view(data[a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]

    async def body(engine: ThreadEngine) -> None:
        vbd = await open_vbd(engine, f"vhd:{path}")
        await vbd.writev(2 * MiB - 1024, iov, len(data))  # across two unallocated blocks
        await vbd.close()
    run(body)
    assert check_ok(path)
    with Chain.open(f"vhd:{path}") as chain:
        assert chain.pread(2 * MiB - 1024, len(data)) == data


def test_vhd_chain_forwarding_and_block_status(tmp_path: Path) -> None:
    base, leaf = tmp_path / "base.vhd", tmp_path / "leaf.vhd"
    create_vhd(str(base), 8 * MiB)
    with Chain.open(str(base), writable=True) as chain:
        chain.pwrite(0, b"B" * (2 * MiB))
    snapshot_vhd(str(leaf), str(base))

    async def body(engine: ThreadEngine) -> None:
        vbd = await open_vbd(engine, f"vhd:{leaf}")
        assert [d.name for d in vbd.driver.chain()] == ["vhd", "vhd"]
        await vbd.write(4096, view(b"L" * 512))
        out = view(bytes(8192))
        await vbd.read(0, out)
        assert bytes(out) == b"B" * 4096 + b"L" * 512 + b"B" * 3584
        status = await vbd.block_status(0, 8 * MiB)
        assert status == [(2 * MiB, STATE_DATA), (6 * MiB, STATE_HOLE | STATE_ZERO)]
        # Zeroing a range the leaf does not hold but the parent does must write zeros.
        await vbd.write_zeroes(MiB, 4096)
        await vbd.read(MiB - 512, out)
        assert bytes(out[:512]) == b"B" * 512 and bytes(out[512:4608]) == bytes(4096)
        # FAST_ZERO over a part only the parent holds cannot be fast: refused, unchanged.
        with pytest.raises(BlktapError) as exc:
            await vbd.write_zeroes(1536 * 1024, 4096, fast=True)
        assert exc.value.errno == errno.EOPNOTSUPP
        await vbd.read(1536 * 1024, out)
        assert bytes(out[:4096]) == b"B" * 4096
        # ... but over what reads as zeros already it is fast and free.
        await vbd.write_zeroes(4 * MiB, MiB, fast=True)
        await vbd.close()
    run(body)
    assert check_ok(leaf) and check_ok(base)


def test_vhd_raw_parent_and_discard(tmp_path: Path) -> None:
    raw = tmp_path / "parent.img"
    raw.write_bytes(b"R" * (4 * MiB))
    leaf = tmp_path / "leaf.vhd"
    snapshot_vhd(str(leaf), str(raw), raw_parent=True)

    async def body(engine: ThreadEngine) -> None:
        vbd = await open_vbd(engine, f"vhd:{leaf}")
        assert [d.name for d in vbd.driver.chain()] == ["vhd", "aio"]
        await vbd.write(0, view(b"W" * 8192))
        await vbd.discard(0, 4096)  # punched: reads as zeros (TRIM leaves it undefined)
        out = view(bytes(16384))
        await vbd.read(0, out)
        assert bytes(out[4096:8192]) == b"W" * 4096 and bytes(out[8192:]) == b"R" * 8192
        assert bytes(out[:4096]) in (bytes(4096), b"W" * 4096)
        await vbd.close()
    run(body)
    assert check_ok(leaf)


def test_read_only_vbd_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    path.write_bytes(b"x" * 4096)

    async def body(engine: ThreadEngine) -> None:
        vbd = await open_vbd(engine, f"aio:{path}", read_only=True)
        assert not vbd.caps & Caps.WRITE
        for op in (vbd.write(0, view(b"y")), vbd.write_zeroes(0, 512), vbd.discard(0, 512)):
            with pytest.raises(BlktapError) as exc:
                await op
            assert exc.value.errno == errno.EPERM
        with pytest.raises(BlktapError) as exc:
            await vbd.read(4000, view(bytes(200)))
        assert exc.value.errno == errno.EINVAL
        await vbd.close()
    run(body)
    assert path.read_bytes() == b"x" * 4096


def test_unaligned_reads_and_writes(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    path.write_bytes(bytes(1000))  # not a whole number of sectors
    shadow = bytearray(1000)

    async def body(engine: ThreadEngine) -> None:
        vbd = await open_vbd(engine, f"aio:{path}")
        edits = [(1, b"abc"), (510, b"XYZW"), (995, b"12345"), (0, b"!"), (300, b"q" * 400)]
        await asyncio.gather(*(vbd.write(o, view(d)) for o, d in edits[:3]))
        for o, d in edits[3:]:
            await vbd.write(o, view(d))
        for o, d in edits:
            shadow[o : o + len(d)] = d
        out = view(bytes(7))
        await vbd.read(993, out)
        assert bytes(out) == bytes(shadow[993:])
        with pytest.raises(BlktapError):
            await vbd.write(998, view(b"toolong"))
        await vbd.close()
    run(body)
    assert path.read_bytes() == bytes(shadow)  # never grown past its size


# ------------------------------------------------------------------------- VBD machinery
class Flaky(Driver):
    """A real driver over a byte array that fails its first operations with ``code``."""

    name = "flaky"

    def __init__(self, engine: ThreadEngine, failures: int, code: int) -> None:
        super().__init__(engine, 1 * MiB, writable=True)
        self.data = bytearray(self.size)
        self.failures = failures
        self.code = code
        self.calls: list[tuple[str, int, int]] = []
        self.caps = Caps.WRITE | Caps.FLUSH
        self.hang = asyncio.Event()
        self.hang.set()

    def _maybe_fail(self) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError(self.code, os.strerror(self.code))

    async def read(self, offset: int, iov) -> None:  # noqa: ANN001
        await self.hang.wait()
        self.calls.append(("read", offset, total(iov)))
        self._maybe_fail()
        pos = offset
        for v in iov:
            v[:] = self.data[pos : pos + len(v)]
            pos += len(v)

    async def write(self, offset: int, iov, *, fua: bool = False) -> None:  # noqa: ANN001
        self.calls.append(("write", offset, total(iov)))
        self._maybe_fail()
        pos = offset
        for v in iov:
            self.data[pos : pos + len(v)] = v
            pos += len(v)


def test_adjacent_requests_are_merged() -> None:
    async def body(engine: ThreadEngine) -> None:
        drv = Flaky(engine, 0, 0)
        vbd = VBD(drv)
        await asyncio.gather(*(vbd.write(i * 4096, view(bytes([i]) * 4096))
                               for i in range(8)))
        assert drv.calls == [("write", 0, 8 * 4096)]
        assert vbd.stats.merged == 7 and vbd.stats.write_reqs == 8
        assert vbd.stats.write_sectors == 64
        drv.calls.clear()
        # Not adjacent, a different operation, or one in between: not merged (requests
        # are merged in arrival order, never reordered around a write).
        outs = [view(bytes(512)) for _ in range(3)]
        await asyncio.gather(vbd.read(0, outs[0]), vbd.read(8192, outs[1]),
                             vbd.write(512, view(b"z" * 512)), vbd.read(8704, outs[2]))
        assert sorted(drv.calls) == [("read", 0, 512), ("read", 8192, 512),
                                     ("read", 8704, 512), ("write", 512, 512)]
        assert bytes(outs[2]) == bytes([2]) * 512
        await vbd.close()
    run(body)


def test_transient_errors_are_retried_then_succeed() -> None:
    async def body(engine: ThreadEngine) -> None:
        drv = Flaky(engine, 2, errno.EAGAIN)
        vbd = VBD(drv, retry_interval=0.01)
        await vbd.write(0, view(b"a" * 512))
        assert drv.data[:512] == b"a" * 512
        assert vbd.stats.retries == 2 and vbd.stats.write_errors == 0
        await vbd.close()
    run(body)


def test_retried_attempts_count_in_hits_and_fail_as_in_c() -> None:
    """The C tapdisk counts every completion: an attempt that failed and was retried is
    in the layer's ``hits`` and ``fail`` as well as the one that succeeded."""
    async def body(engine: ThreadEngine) -> dict:
        drv = Flaky(engine, 2, errno.EAGAIN)
        drv.path = "flaky"
        vbd = VBD(drv, retry_interval=0.01)
        await vbd.read(0, view(bytes(1024)))
        stats = vbd.stats_dict()
        await vbd.close()
        return stats
    stats = run(body)
    assert stats["secs"] == [2, 0]
    [img] = stats["images"]
    assert img["hits"] == [6, 0] and img["fail"] == [4, 0]


def test_transient_errors_fail_after_the_timeout() -> None:
    async def body(engine: ThreadEngine) -> None:
        drv = Flaky(engine, 10**6, errno.EBUSY)
        vbd = VBD(drv, retry_interval=0.01, timeout=0.1)
        with pytest.raises(OSError) as exc:
            await vbd.write(0, view(b"a" * 512))
        assert exc.value.errno == errno.EBUSY
        assert vbd.stats.retries >= 3 and vbd.stats.timeouts == 1
        assert vbd.stats.write_errors == 1
        await vbd.close()
    run(body)


def test_other_errors_fail_at_once() -> None:
    async def body(engine: ThreadEngine) -> None:
        drv = Flaky(engine, 1, errno.EIO)
        vbd = VBD(drv, retry_interval=0.01)
        with pytest.raises(OSError) as exc:
            await vbd.read(0, view(bytes(512)))
        assert exc.value.errno == errno.EIO and vbd.stats.retries == 0
        assert vbd.stats.read_errors == 1
        await vbd.close()
    run(body)


def test_watchdog_reports_a_stall(caplog: pytest.LogCaptureFixture) -> None:
    async def body(engine: ThreadEngine) -> None:
        drv = Flaky(engine, 0, 0)
        drv.hang.clear()
        vbd = VBD(drv, watchdog=0.05)
        with caplog.at_level(logging.WARNING, logger="blktap.tapdisk"):
            task = asyncio.ensure_future(vbd.read(0, view(bytes(512))))
            for _ in range(200):
                await asyncio.sleep(0.01)
                if vbd.stats.watchdog_stalls:
                    break
            assert vbd.stats.in_flight == 1 and vbd.stats_dict()["reqs_outstanding"] == 1
            drv.hang.set()
            await task
        assert vbd.stats.watchdog_stalls == 1
        assert any("watchdog" in r.message for r in caplog.records)
        await vbd.close()
    run(body)


def test_watchdog_does_not_count_the_time_a_pause_held_a_request() -> None:
    """A request made long before it reaches the driver (held by a pause) starts the
    watchdog's clock at the resume, not when it was made."""
    async def body(engine: ThreadEngine) -> None:
        drv = Flaky(engine, 0, 0)
        drv.hang.clear()
        vbd = VBD(drv, watchdog=1.0)
        await vbd.pause()
        told: list[BaseException | None] = []
        req = vbd.start_read(0, [view(bytes(512))], 512, told.append)
        req.start -= 100.0  # made 100 s ago, as far as the watchdog can tell
        await vbd.resume(drv)
        await asyncio.sleep(0.6)  # the watchdog looks every 0.25 s
        assert vbd.stats.in_flight == 1 and vbd.stats.watchdog_stalls == 0
        drv.hang.set()
        for _ in range(100):
            if told:
                break
            await asyncio.sleep(0.01)
        assert told == [None]
        await vbd.close()
    run(body)


def test_close_waits_for_requests_in_flight(tmp_path: Path) -> None:
    path = tmp_path / "d.vhd"
    create_vhd(str(path), 16 * MiB)
    data = os.urandom(MiB)

    async def body(engine: ThreadEngine) -> None:
        vbd = await open_vbd(engine, f"vhd:{path}")
        writes = [asyncio.ensure_future(vbd.write(i * MiB, view(data))) for i in range(16)]
        await asyncio.sleep(0)
        await vbd.close()
        assert all(w.done() for w in writes)
        with pytest.raises(BlktapError) as exc:
            await vbd.read(0, view(bytes(512)))
        assert exc.value.errno == errno.ESHUTDOWN
    run(body)
    assert check_ok(path)
    with Chain.open(str(path)) as chain:
        assert hashlib.sha256(chain.read(0, 16 * MiB // 512)).digest() == \
            hashlib.sha256(data * 16).digest()


def test_reads_that_cannot_block_stay_on_the_loop(tmp_path: Path) -> None:
    """tmpfs (memory) and page-cache hits (RWF_NOWAIT) are read inline; the rest, and the
    end of a file, still come out right."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    shm = Path("/dev/shm") / f"blktap-test-{os.getpid()}"
    shm.write_bytes(b"m" * 10000)
    disk = tmp_path / "f"
    disk.write_bytes(b"d" * 10000)

    async def body(engine: ThreadEngine) -> None:
        for path, byte in ((shm, b"m"), (disk, b"d")):
            fd = os.open(path, os.O_RDONLY)
            try:
                before = engine.inline_reads
                out = view(bytes(8192))
                await engine.preadv(fd, [out], 4096)  # runs past the end: zeros after
                assert bytes(out) == byte * 5904 + bytes(2288)
                if path == shm:
                    assert engine.inline_reads == before + 1
            finally:
                engine.forget(fd)
                os.close(fd)
    try:
        run(body)
    finally:
        shm.unlink()


def test_aio_on_tmpfs_reads_inline_without_o_direct() -> None:
    """tmpfs accepts O_DIRECT (Linux 6.6 and later) but bypasses nothing with it: the aio
    driver keeps to the buffered descriptor there, so its reads stay on the loop thread."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    shm = Path("/dev/shm") / f"blktap-test-direct-{os.getpid()}"
    shm.write_bytes(b"t" * MiB)
    pool = BufferPool()

    async def body(engine: ThreadEngine) -> None:
        drv = await engine.call(open_stack, engine, f"aio:{shm}", writable=False)
        try:
            assert drv.describe()["direct"] is False
            buf = pool.get(65536)  # page aligned: would have gone the direct way
            before = engine.inline_reads
            await drv.read(4096, [buf.view])
            assert bytes(buf.view) == b"t" * 65536
            assert engine.inline_reads == before + 1
        finally:
            await drv.close()
    try:
        run(body)
    finally:
        shm.unlink()


def test_aio_uses_o_direct_for_aligned_buffers(tmp_path: Path) -> None:
    path = tmp_path / "d.img"
    path.write_bytes(bytes(MiB))
    pool = BufferPool()

    async def body(engine: ThreadEngine) -> None:
        drv = await engine.call(open_stack, engine, f"aio:{path}", writable=True)
        if drv.dfd is None:
            pytest.skip("this file system refuses O_DIRECT")
        buf = pool.get(65536)
        buf.view[:] = b"D" * 65536
        assert drv._fd_for(4096, [buf.view]) == drv.dfd
        assert drv._fd_for(100, [buf.view]) == drv.fd  # unaligned offset: buffered
        assert drv._fd_for(0, [view(b"x" * 512)]) in (drv.fd, drv.dfd)
        await drv.write(4096, [buf.view], fua=True)
        out = pool.get(65536)
        await drv.read(4096, [out.view])
        assert bytes(out.view) == b"D" * 65536
        assert drv.describe()["direct"] is True
        await drv.close()
    run(body)
    assert path.read_bytes()[4096 : 4096 + 65536] == b"D" * 65536

    async def opt_out(engine: ThreadEngine) -> None:
        drv = await engine.call(open_stack, engine, f"aio:{path}", writable=False,
                                direct=False)
        assert drv.dfd is None  # type: ignore[attr-defined]
        await drv.close()
    run(opt_out)


def test_stats_follow_the_reference_shape(tmp_path: Path) -> None:
    base, leaf = tmp_path / "base.vhd", tmp_path / "leaf.vhd"
    create_vhd(str(base), 4 * MiB)
    snapshot_vhd(str(leaf), str(base))

    async def body(engine: ThreadEngine) -> dict:
        vbd = await open_vbd(engine, f"vhd:{leaf}")
        await vbd.write(0, view(b"w" * 4096))
        await vbd.read(0, view(bytes(8192)))  # 8 sectors from the leaf, 8 from the base
        stats = vbd.stats_dict()
        await vbd.close()
        return stats
    stats = run(body)
    assert list(stats)[:8] == ["name", "secs", "images", "FIXME_enospc_redirect_count",
                               "nbd_mirror_failed", "reqs_outstanding", "read_caching",
                               "counters"]
    assert stats["secs"] == [16, 8]
    leaf_img, base_img = stats["images"]
    # Each layer counts what it served itself, as the C tapdisk (not what passed it).
    assert leaf_img["name"] == str(leaf) and leaf_img["hits"] == [8, 8]
    assert base_img["hits"] == [8, 0] and base_img["fail"] == [0, 0]
    assert leaf_img["driver"] == {"type": 4, "name": "vhd", "status": None}
    assert stats["counters"]["write_reqs"] == 1 and stats["reqs_outstanding"] == 0


def test_aio_status_has_the_c_drivers_shape(tmp_path: Path) -> None:
    """The C aio driver's stats status is ``{"reqs": {"max": N, "pending": N}}``; ours
    too (max: what the engine runs at once), with our ``direct`` beside it."""
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(MiB))

    async def body(engine: ThreadEngine) -> tuple[dict, dict, dict]:
        vbd = await open_vbd(engine, f"aio:{path}")
        await vbd.write(0, view(b"w" * 4096))
        await vbd.read(4096, view(bytes(8192)))
        stats = vbd.stats_dict()
        # Hold the engine's reads: the ones handed to it are pending until released.
        release, entered = asyncio.Event(), []
        real = engine.preadv

        async def held(fd: int, iov: object, offset: int) -> None:
            entered.append(offset)
            await release.wait()
            await real(fd, iov, offset)  # type: ignore[arg-type]

        engine.preadv = held  # type: ignore[method-assign]
        tasks = [asyncio.ensure_future(vbd.read(i * 65536 + 1, view(bytes(100))))
                 for i in range(3)]
        while len(entered) < 3:
            await asyncio.sleep(0.001)
        during = vbd.stats_dict()
        release.set()
        await asyncio.gather(*tasks)
        engine.preadv = real  # type: ignore[method-assign]
        after = vbd.stats_dict()
        await vbd.close()
        return stats, during, after
    stats, during, after = run(body)
    [img] = stats["images"]
    status = img["driver"]["status"]
    assert list(img["driver"])[:3] == ["type", "name", "status"]
    assert img["driver"]["type"] == 0 and img["driver"]["name"] == "aio"
    assert list(status) == ["reqs"] and list(status["reqs"]) == ["max", "pending"]
    assert status["reqs"]["max"] >= 1 and status["reqs"]["pending"] == 0
    assert during["images"][0]["driver"]["status"]["reqs"]["pending"] == 3
    assert after["images"][0]["driver"]["status"]["reqs"]["pending"] == 0
    assert img["hits"] == [16, 8]


def test_reads_skip_empty_layers_of_a_deep_chain(tmp_path: Path) -> None:
    """A read the upper layers hold nothing of goes to the first layer that holds some
    (a BAT lookup per empty layer): content as the library reads it, every layer's hit
    counter moved as if the request had passed through it; a layer that holds part of
    the range stops the skip; a parent smaller than its child reads as zeros past its
    end."""
    size = 8 * MiB
    layers = [tmp_path / "l0.vhd"]
    create_vhd(str(layers[0]), size)
    rng = random.Random(7)
    base_data = bytes(rng.getrandbits(8) for _ in range(256 * 1024))
    with Chain.open(f"vhd:{layers[0]}", writable=True) as c:
        c.pwrite(1 * MiB, base_data)
    for i in range(1, 31):
        layers.append(tmp_path / f"l{i}.vhd")
        snapshot_vhd(str(layers[i]), str(layers[i - 1]), skip_empty=False)
    mid = 15  # a middle layer holds 4 KiB inside the base's range
    with Chain.open(f"vhd:{layers[mid]}", writable=True) as c:
        c.pwrite(1 * MiB + 65536, b"M" * 4096)
    leaf = layers[-1]

    from blktap.tapdisk.drivers.vhd import VhdDriver
    looked_up: list[str] = []
    real_runs = VhdDriver._runs

    async def counting_runs(self: VhdDriver, sector: int, count: int) -> list:
        looked_up.append(self.path)
        return await real_runs(self, sector, count)

    async def body(engine: ThreadEngine) -> dict:
        vbd = await open_vbd(engine, f"vhd:{leaf}", read_only=True)
        got = view(bytes(65536))
        VhdDriver._runs = counting_runs  # type: ignore[method-assign]
        try:
            await vbd.read(1 * MiB, got)  # held by the base only
        finally:
            VhdDriver._runs = real_runs  # type: ignore[method-assign]
        assert bytes(got) == base_data[:65536]
        # Only the layers with the range's block allocated look at their bitmaps (the
        # middle one holds 4 KiB of the same 2 MiB block); the 29 others are skipped.
        assert looked_up == [str(layers[mid]), str(layers[0])]
        got = view(bytes(8192))
        await vbd.read(1 * MiB + 65536, got)  # the middle layer holds the first half
        assert bytes(got) == b"M" * 4096 + base_data[65536 + 4096 : 65536 + 8192]
        got = view(b"x" * 4096)
        await vbd.read(6 * MiB, got)  # nobody holds it: zeros
        assert bytes(got) == bytes(4096)
        stats = vbd.stats_dict()
        await vbd.close()
        return stats
    stats = run(body)
    with Chain.open(f"vhd:{leaf}") as c:
        assert c.pread(1 * MiB, 65536) == base_data[:65536]
    hits = [img["hits"][0] for img in stats["images"]]  # leaf first
    assert len(hits) == 31
    # 128 + 16 + 8 sectors read; as the C tapdisk counts them, each on the layer that
    # served it: the middle layer 8, the base the rest (its data, and the zeros past
    # every layer's data); the empty layers none, skipped or not.
    assert hits == [0] * (30 - mid) + [8] + [0] * (mid - 1) + [128 + 8 + 8], hits
    assert sum(hits) == stats["secs"][0] == 152


def test_status_skips_empty_layers_of_a_deep_chain(tmp_path: Path) -> None:
    """status_now (asked by the NBD server before each read) jumps over the layers that
    hold nothing of the range, as reads do: the same answer as walking every layer, with
    only the layers that may hold some of it asked; a parent smaller than its child still
    ends the data at its end."""
    size = 8 * MiB
    layers = [tmp_path / "l0.vhd"]
    create_vhd(str(layers[0]), size)
    with Chain.open(f"vhd:{layers[0]}", writable=True) as c:
        c.pwrite(1 * MiB, b"b" * (256 * 1024))
    for i in range(1, 31):
        layers.append(tmp_path / f"l{i}.vhd")
        snapshot_vhd(str(layers[i]), str(layers[i - 1]), skip_empty=False)
    mid = 15
    with Chain.open(f"vhd:{layers[mid]}", writable=True) as c:
        c.pwrite(5 * MiB, b"M" * 4096)

    from blktap.tapdisk.drivers.vhd import VhdDriver
    asked: list[str] = []
    real = VhdDriver.status_now

    def counting(self: VhdDriver, offset: int, length: int):  # noqa: ANN202
        asked.append(self.path)
        return real(self, offset, length)

    async def body(engine: ThreadEngine) -> None:
        vbd = await open_vbd(engine, f"vhd:{layers[-1]}", read_only=True)
        leaf = vbd.driver
        assert isinstance(leaf, VhdDriver)
        want = {(1 * MiB, 65536): [(65536, STATE_DATA)],
                (5 * MiB, 8192): [(4096, STATE_DATA), (4096, STATE_HOLE | STATE_ZERO)],
                (6 * MiB, 4096): [(4096, STATE_HOLE | STATE_ZERO)]}
        for off, n in want:  # the bitmaps of the blocks held come into memory
            await vbd.read(off, view(bytes(n)))
        VhdDriver.status_now = counting  # type: ignore[method-assign]
        try:
            for (off, n), extents in want.items():
                asked.clear()
                got = leaf.status_now(off, n)
                assert merge_extents(got) == extents, (off, got)
                # The leaf, then the layer that holds the block (the part it does not
                # hold is asked of its parent, which skips in turn); a block nobody
                # holds is answered by the leaf alone.
                holders = {1 * MiB: [layers[0]], 5 * MiB: [layers[mid], layers[mid - 1]],
                           6 * MiB: []}[off]
                assert asked == [str(layers[-1])] + [str(h) for h in holders], (off, asked)
        finally:
            VhdDriver.status_now = real  # type: ignore[method-assign]
        await vbd.close()
    run(body)


def test_skip_stops_at_a_smaller_parent(tmp_path: Path) -> None:
    """A leaf grown past its parents: what lies past a parent's end reads as zeros even
    when a layer further down would hold data there (the skip must not jump over the
    smaller layer); what the parents hold reads through."""
    from blktap.image.vhd.resize import apply_fast, load_target, plan_fast

    base, mid, leaf = (tmp_path / f"{n}.vhd" for n in ("base", "mid", "leaf"))
    create_vhd(str(base), 4 * MiB)
    with Chain.open(f"vhd:{base}", writable=True) as c:
        c.pwrite(0, b"B" * (4 * MiB))
    snapshot_vhd(str(mid), str(base), skip_empty=False)
    snapshot_vhd(str(leaf), str(mid), skip_empty=False, prealloc_size=8 * MiB)
    apply_fast(plan_fast(load_target(str(leaf)), 8 * MiB))

    async def body(engine: ThreadEngine) -> None:
        vbd = await open_vbd(engine, f"vhd:{leaf}", read_only=True)
        assert vbd.size == 8 * MiB
        for off, want in ((1 * MiB, b"B"), (4 * MiB - 4096, b"B"), (6 * MiB, b"\0")):
            got = view(b"x" * 4096)
            await vbd.read(off, got)
            assert bytes(got) == want * 4096, off
        got = view(b"x" * 8192)
        await vbd.read(4 * MiB - 4096, got)  # straddles the parents' end
        assert bytes(got) == b"B" * 4096 + bytes(4096)
        await vbd.close()
    run(body)


def test_writes_to_memory_are_inline_others_in_workers(tmp_path: Path) -> None:
    """A write to tmpfs is a copy the loop thread makes itself (no hand-off); a write to
    a file on disk goes to a worker. Both land, and a failing inline write (ENOSPC-like
    errors come back the same way) raises from the coroutine."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    shm = Path("/dev/shm") / f"blktap-test-inline-w-{os.getpid()}"
    shm.write_bytes(bytes(MiB))
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(MiB))

    async def body(engine: ThreadEngine) -> None:
        for path, inline in ((shm, True), (disk, False)):
            drv = await engine.call(open_stack, engine, f"aio:{path}", writable=True,
                                    direct=False)
            try:
                before_inline, before_jobs = engine.inline_writes, engine.submitted
                await drv.write(8192, [view(b"w" * 4096)], fua=True)
                assert (engine.inline_writes - before_inline == 1) is inline
                assert (engine.submitted == before_jobs) is inline
            finally:
                await drv.close()
            assert path.read_bytes()[8192 : 8192 + 4096] == b"w" * 4096
        fd = os.open(shm, os.O_RDONLY)
        try:
            with pytest.raises(OSError):
                await engine.pwritev(fd, [view(b"x" * 512)], 0)  # EBADF, raised inline
        finally:
            os.close(fd)
    try:
        run(body)
    finally:
        shm.unlink()


def test_skip_over_several_blocks_stops_where_any_block_is_held(tmp_path: Path) -> None:
    """A read spanning blocks skips only the layers that hold none of them: here the
    middle layer holds data in the second block, so a read across both blocks stops
    there, and the base's data in the first block still reads through it."""
    size = 8 * MiB
    layers = [tmp_path / "l0.vhd"]
    create_vhd(str(layers[0]), size)
    with Chain.open(f"vhd:{layers[0]}", writable=True) as c:
        c.pwrite(0, b"B" * (4 * MiB))
    for i in range(1, 9):
        layers.append(tmp_path / f"l{i}.vhd")
        snapshot_vhd(str(layers[i]), str(layers[i - 1]), skip_empty=False)
    with Chain.open(f"vhd:{layers[4]}", writable=True) as c:
        c.pwrite(2 * MiB + 4096, b"M" * 4096)

    async def body(engine: ThreadEngine) -> None:
        vbd = await open_vbd(engine, f"vhd:{layers[-1]}", read_only=True)
        for _ in range(2):  # the second time from the per-block answers kept
            got = view(b"x" * (2 * MiB + 16384))
            await vbd.read(0, got)  # blocks 0 and 1
            assert bytes(got) == (b"B" * (2 * MiB + 4096) + b"M" * 4096 + b"B" * 8192)
            got = view(b"x" * 8192)
            await vbd.read(2 * MiB - 4096, got)  # across the boundary
            assert bytes(got) == b"B" * 8192
        await vbd.close()
    run(body)
    with Chain.open(f"vhd:{layers[-1]}") as c:
        assert c.pread(2 * MiB, 12288) == b"B" * 4096 + b"M" * 4096 + b"B" * 4096


def test_finished_requests_leave_no_cycle_for_the_garbage_collector(tmp_path: Path) -> None:
    """A request started the callback way, whose done refers back to it (as a transport's
    closure does), and the group it led are freed by their reference counts once
    finished: nothing per request is left for the cyclic collector to find."""
    import gc

    from blktap.tapdisk.vbd import Request

    path = tmp_path / "d.img"
    path.write_bytes(bytes(1 << 20))

    async def body(engine: ThreadEngine) -> None:
        vbd = await open_vbd(engine, f"aio:{path}")
        finished: list[int] = []
        bufs = [memoryview(bytearray(4096)) for _ in range(8)]
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for round_ in range(4):
                for i, buf in enumerate(bufs):
                    start = vbd.start_write if round_ % 2 else vbd.start_read
                    # the done refers to the request it is the done of, as a
                    # transport's closure does (NBD's _start_read)
                    holder: list[Request] = []
                    holder.append(start(i * 4096, [buf], 4096,
                                        lambda error, holder=holder: finished.append(1)))
                while len(finished) < 8 * (round_ + 1):
                    await asyncio.sleep(0.001)
            gc.collect()
            left = [o for o in gc.garbage if isinstance(o, Request)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert left == []
        await vbd.close()
    run(body)
