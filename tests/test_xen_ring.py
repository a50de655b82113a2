"""The Xen blkif ring, without Xen.

A stand-in guest (torture/xen_guest.py, shared with the torture harness) lays the shared
ring out in ordinary memory with its OWN struct layouts (blkif.h / ring.h, facts in
guests-formats-filters.md §1e; the project's structs module is not imported), keeps its
data pages in a dict gref -> 4 KiB bytearray and rings a pipe for its event channel. The
grant device and the event channel of the backend are replaced by stand-ins over that
guest (the documented seam: ``XenDevices``, ``Tapdisk(xen=...)``). What passes here is
what a blkfront following the headers would see.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import mmap
import os
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from blktap.io import ThreadEngine
from blktap.io.iov import total
from blktap.tapdisk.driver import Caps, Driver
from blktap.tapdisk.drivers import open_stack
from blktap.tapdisk.vbd import VBD
from blktap.transport.xen import connect
from conftest import with_engine
from xen_guest import (
    EOPNOTSUPP,
    ERROR,
    OKAY,
    OP_BARRIER,
    OP_DISCARD,
    OP_FLUSH,
    OP_READ,
    OP_RESERVED,
    OP_WRITE,
    PAGE,
    PROTO_X86_64,
    SEG,
    X32,
    X64,
    Devices,
    Guest,
    Layout,
)

MiB = 1 << 20


# ---------------------------------------------------------------- a driver to watch
class Recorder(Driver):
    """A disk in memory that records the calls and can hold writes at a gate."""

    name = "recorder"

    def __init__(self, engine: ThreadEngine, size: int = 4 * MiB, *,
                 trim: bool = True) -> None:
        super().__init__(engine, size, writable=True)
        self.data = bytearray(size)
        self.caps = Caps.WRITE | Caps.FLUSH | (Caps.TRIM if trim else Caps(0))
        self.calls: list[tuple[str, int, int]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def read(self, offset: int, iov) -> None:  # noqa: ANN001
        self.calls.append(("read", offset, total(iov)))
        await asyncio.sleep(0)
        pos = offset
        for v in iov:
            v[:] = self.data[pos:pos + len(v)]
            pos += len(v)

    async def write(self, offset: int, iov, *, fua: bool = False) -> None:  # noqa: ANN001
        self.calls.append(("write", offset, total(iov)))
        await self.gate.wait()
        pos = offset
        for v in iov:
            self.data[pos:pos + len(v)] = v
            pos += len(v)
        self.calls.append(("written", offset, total(iov)))

    async def flush(self) -> None:
        self.calls.append(("flush", 0, 0))

    async def discard(self, offset: int, length: int) -> None:
        self.calls.append(("discard", offset, length))
        self.data[offset:offset + length] = bytes(length)


def serve(body, *, layout: Layout = X64, order: int = 0, read_only: bool = False,  # noqa: ANN001
          driver=None, max_indirect: int = 256, persistent: bool = False,  # noqa: ANN001
          max_persistent: int | None = None):
    """Run ``body(guest, ring, vbd, driver)`` with a connected ring."""
    async def main(engine: ThreadEngine):  # noqa: ANN202
        drv = driver(engine) if driver else Recorder(engine)
        vbd = VBD(drv, read_only=read_only)
        guest = Guest(layout, order)
        ring = connect(vbd, Devices(guest), domid=guest.domid, devid=51712,
                       grefs=guest.ring_grefs, order=order, proto=layout.proto, port=9,
                       max_indirect=max_indirect, persistent=persistent)
        if max_persistent is not None:
            ring.max_persistent = max_persistent
        try:
            return await body(guest, ring, vbd, drv)
        finally:
            await ring.stop()
            await vbd.close()
            guest.close()
    return with_engine(main)


def pattern(tag: int, n: int = PAGE) -> bytes:
    return bytes((tag * 7 + i) & 0xFF for i in range(n))


# ---------------------------------------------------------------- tests
def test_ring_sizes_and_layouts() -> None:
    from blktap.transport.xen import structs
    for layout, abi in ((X64, structs.X86_64), (X32, structs.X86_32)):
        assert abi.slot == layout.slot
        for order in range(5):
            assert structs.ring_size(abi, order) == layout.entries(order) == 32 << order


@pytest.mark.parametrize("layout", [X64, X32], ids=["x86_64", "x86_32"])
def test_write_then_read_back(layout: Layout) -> None:
    async def body(guest: Guest, ring, vbd: VBD, drv: Recorder) -> None:
        # Three segments: sectors 2..7 of one page, a whole page, sector 0 of a third:
        # 6 + 8 + 1 = 15 sectors, contiguous on disk from sector 10.
        data = [pattern(1), pattern(2), pattern(3)]
        src = [guest.grant(d) for d in data]
        guest.put_rw(OP_WRITE, 0x1111, 10, [(src[0], 2, 7), (src[1], 0, 7), (src[2], 0, 0)])
        assert guest.push()  # the backend asked for an event (req_event = 1)
        got = await guest.wait(1)
        assert got == {0x1111: (OP_WRITE, OKAY)}
        want = data[0][1024:] + data[1] + data[2][:512]
        assert bytes(drv.data[10 * 512:25 * 512]) == want
        # Read it back into fresh pages, split differently.
        dst = [guest.grant(), guest.grant()]
        guest.put_rw(OP_READ, 0x2222, 10, [(dst[0], 0, 7), (dst[1], 1, 7)])
        guest.push()
        assert await guest.wait(1) == {0x2222: (OP_READ, OKAY)}
        assert bytes(guest.pages[dst[0]]) == want[:PAGE]
        assert bytes(guest.pages[dst[1]][512:]) == want[PAGE:]
        assert guest.pages[dst[1]][:512] == bytes(512)  # sector 0 of it: not asked for
        assert vbd.stats.write_reqs == 1 and vbd.stats.read_reqs == 1
        assert vbd.stats.write_sectors == 15 and vbd.stats.read_sectors == 15
        assert ring.stats.reads == 1 and ring.stats.writes == 1 and ring.stats.segments == 5
        assert guest.notified == 2  # one event per response: the guest re-armed each time
        # Idle: the backend asked for an event on the next request.
        assert struct.unpack_from("<I", guest.ring, 4)[0] == ring.ring.req_cons + 1
    serve(body, layout=layout)


def test_many_requests_on_a_multi_page_ring_and_one_notify_per_batch() -> None:
    async def body(guest: Guest, ring, vbd: VBD, drv: Recorder) -> None:
        assert ring.ring.size == 128 and guest.size == 128
        for rnd in range(3):  # several times round the ring
            pages = {}
            for i in range(100):
                g = guest.grant(pattern(i + rnd))
                pages[i] = g
                guest.put_rw(OP_WRITE, rnd << 16 | i, i * 8, [(g, 0, 7)])
            guest.push()
            before = guest.notified
            got = await guest.wait(100)
            assert all(v == (OP_WRITE, OKAY) for v in got.values())
            # Responses of one turn are published together: far fewer events than 100.
            assert guest.notified - before < 100
            for i in range(100):
                assert bytes(drv.data[i * PAGE:(i + 1) * PAGE]) == pattern(i + rnd)
        assert vbd.stats.merged > 0  # adjacent writes of one turn: merged by the VBD
    serve(body, order=2)


def test_ring_of_order_4_x86_32() -> None:
    async def body(guest: Guest, ring, vbd: VBD, drv: Recorder) -> None:
        assert ring.ring.size == 512
        grefs = [guest.grant(pattern(i)) for i in range(300)]
        for i, g in enumerate(grefs):
            guest.put_rw(OP_WRITE, i, 8 * i, [(g, 0, 7)])
        guest.push()
        got = await guest.wait(300)
        assert set(got) == set(range(300))
        assert bytes(drv.data[299 * PAGE:300 * PAGE]) == pattern(299)
    serve(body, layout=X32, order=4)


def test_barrier_waits_for_earlier_requests_and_holds_later_ones() -> None:
    async def body(guest: Guest, ring, vbd: VBD, drv: Recorder) -> None:
        drv.gate.clear()  # writes hang until released
        a, b, c = guest.grant(b"A" * PAGE), guest.grant(b"B" * PAGE), guest.grant(b"C" * PAGE)
        guest.put_rw(OP_WRITE, 1, 0, [(a, 0, 7)])
        guest.put_rw(OP_BARRIER, 2, 8, [(b, 0, 7)])
        guest.put_rw(OP_WRITE, 3, 16, [(c, 0, 7)])
        guest.push()
        for _ in range(20):
            await asyncio.sleep(0)
        # The first write is at the driver; the barrier waits for it; the third is
        # consumed but not started.
        assert drv.calls == [("write", 0, PAGE)]
        assert ring.ring.req_cons == 3 and guest.responses() == []
        drv.gate.set()
        got = await guest.wait(3)
        assert got == {1: (OP_WRITE, OKAY), 2: (OP_BARRIER, OKAY), 3: (OP_WRITE, OKAY)}
        assert drv.calls == [("write", 0, PAGE), ("written", 0, PAGE),
                             ("write", 8 * 512, PAGE), ("written", 8 * 512, PAGE),
                             ("flush", 0, 0),
                             ("write", 16 * 512, PAGE), ("written", 16 * 512, PAGE)]
        # A barrier without data: drain, then flush.
        drv.calls.clear()
        guest.put_rw(OP_BARRIER, 4, 0, [])
        guest.push()
        assert await guest.wait(1) == {4: (OP_BARRIER, OKAY)}
        assert drv.calls == [("flush", 0, 0)]
        assert ring.stats.barriers == 2
    serve(body)


def test_flush_diskcache() -> None:
    async def body(guest: Guest, ring, vbd: VBD, drv: Recorder) -> None:
        guest.put_rw(OP_FLUSH, 5, 0, [])
        guest.push()
        assert await guest.wait(1) == {5: (OP_FLUSH, OKAY)}
        assert drv.calls == [("flush", 0, 0)]
        drv.calls.clear()
        g = guest.grant(b"F" * PAGE)
        guest.put_rw(OP_FLUSH, 6, 24, [(g, 0, 7)])  # with data: written, then flushed
        guest.push()
        assert await guest.wait(1) == {6: (OP_FLUSH, OKAY)}
        assert drv.calls == [("write", 24 * 512, PAGE), ("written", 24 * 512, PAGE),
                             ("flush", 0, 0)]
        assert bytes(drv.data[24 * 512:32 * 512]) == b"F" * PAGE
        assert ring.stats.flushes == 2
    serve(body)


def test_discard() -> None:
    async def body(guest: Guest, ring, vbd: VBD, drv: Recorder) -> None:
        drv.data[:] = b"\xff" * len(drv.data)
        sectors = len(drv.data) // 512
        guest.put_discard(1, 16, 64)
        guest.put_discard(2, 0, 8, flag=1)  # secure: not something we can promise
        guest.put_discard(3, sectors - 8, 9)  # one past the end
        guest.put_discard(4, 2**63, 2**63)  # overflowing
        guest.push()
        got = await guest.wait(4)
        assert got == {1: (OP_DISCARD, OKAY), 2: (OP_DISCARD, EOPNOTSUPP),
                       3: (OP_DISCARD, ERROR), 4: (OP_DISCARD, ERROR)}
        assert drv.calls == [("discard", 16 * 512, 64 * 512)]
        assert drv.data[16 * 512:80 * 512] == bytes(64 * 512)
        assert drv.data[:16 * 512] == b"\xff" * 16 * 512
    serve(body)


def test_discard_on_a_disk_that_cannot_trim_is_a_successful_hint() -> None:
    async def body(guest: Guest, ring, vbd: VBD, drv: Recorder) -> None:
        guest.put_discard(1, 0, 8)
        guest.push()
        assert await guest.wait(1) == {1: (OP_DISCARD, OKAY)}
        assert drv.calls == []
    serve(body, driver=lambda e: Recorder(e, trim=False))


def test_indirect_requests_of_256_segments() -> None:
    async def body(guest: Guest, ring, vbd: VBD, drv: Recorder) -> None:
        data = [pattern(i) for i in range(256)]
        pages = [guest.grant(d) for d in data]
        table = b"".join(SEG.pack(g, 0, 7) for g in pages)
        ind = guest.grant(table)
        guest.put_indirect(OP_WRITE, 0xAA, 2048, 256, [ind])
        guest.push()
        # Answered as the inner operation (blkfront has no case for INDIRECT).
        assert await guest.wait(1) == {0xAA: (OP_WRITE, OKAY)}
        assert bytes(drv.data[MiB:2 * MiB]) == b"".join(data)
        assert ("write", MiB, MiB) in drv.calls  # one 1 MiB write, not 256
        # Read back half of it through 128 segments of partial pages (sectors 1..6).
        dst = [guest.grant() for _ in range(128)]
        table = b"".join(SEG.pack(g, 1, 6) for g in dst)
        guest.put_indirect(OP_READ, 0xBB, 2048, 128, [guest.grant(table)])
        guest.push()
        assert await guest.wait(1) == {0xBB: (OP_READ, OKAY)}
        flat = b"".join(data)
        for i, g in enumerate(dst):
            assert bytes(guest.pages[g][512:3584]) == flat[i * 3072:(i + 1) * 3072]
        assert ring.stats.indirect == 2 and ring.stats.max_segments == 256
    serve(body)


def test_indirect_segments_spread_over_two_indirect_pages_when_allowed_more() -> None:
    # 600 segments need two indirect pages (512 per page); the ring allows them when
    # told to (we advertise 256; the limit is the ring's parameter).
    async def body(guest: Guest, ring, vbd: VBD, drv: Recorder) -> None:
        pages = [guest.grant(pattern(i, 512)) for i in range(600)]
        table = b"".join(SEG.pack(g, 0, 0) for g in pages)
        ind = [guest.grant(table[:PAGE]), guest.grant(table[PAGE:])]
        guest.put_indirect(OP_WRITE, 1, 0, 600, ind)
        guest.push()
        assert await guest.wait(1) == {1: (OP_WRITE, OKAY)}
        assert bytes(drv.data[:600 * 512]) == b"".join(pattern(i, 512) for i in range(600))
    serve(body, max_indirect=1024)


def test_bad_requests_get_error_responses_and_the_ring_goes_on() -> None:
    async def body(guest: Guest, ring, vbd: VBD, drv: Recorder) -> None:
        sectors = len(drv.data) // 512
        good = guest.grant(b"G" * PAGE)
        table_ok = guest.grant(SEG.pack(good, 0, 7))
        expect = {}

        def put(rid: int, op: int, status: int, *args) -> None:  # noqa: ANN002
            expect[rid] = (op, status)
            getattr(guest, args[0])(*args[1:])

        put(1, OP_READ, ERROR, "put_rw", OP_READ, 1, 0, [])  # no segment
        put(2, OP_WRITE, ERROR, "put_rw", OP_WRITE, 2, 0, [(good, 0, 7)] * 11, 12)  # 12
        put(3, OP_WRITE, ERROR, "put_rw", OP_WRITE, 3, 0, [(good, 0, 7)] * 11, 255)
        put(4, OP_WRITE, ERROR, "put_rw", OP_WRITE, 4, 0, [(good, 5, 4)])  # reversed
        put(5, OP_READ, ERROR, "put_rw", OP_READ, 5, 0, [(good, 0, 8)])  # past the page
        put(6, OP_READ, ERROR, "put_rw", OP_READ, 6, sectors - 7, [(good, 0, 7)])  # end
        put(7, OP_WRITE, ERROR, "put_rw", OP_WRITE, 7, 2**64 - 1, [(good, 0, 0)])
        put(8, OP_RESERVED, EOPNOTSUPP, "put_raw", OP_RESERVED, 8)
        put(9, 99, EOPNOTSUPP, "put_raw", 99, 9)
        put(10, OP_WRITE, ERROR, "put_rw", OP_WRITE, 10, 64, [(good, 0, 7), (424242, 0, 7)])
        put(11, OP_READ, ERROR, "put_rw", OP_READ, 11, 0, [(424242, 0, 7)])
        put(12, OP_BARRIER, ERROR, "put_rw", OP_BARRIER, 12, 0, [(good, 0, 7)] * 11, 12)
        put(13, OP_READ, ERROR, "put_indirect", OP_READ, 13, 0, 257, [table_ok])  # > 256
        put(14, OP_READ, ERROR, "put_indirect", OP_READ, 14, 0, 0, [table_ok])
        put(15, OP_DISCARD, ERROR, "put_indirect", OP_DISCARD, 15, 0, 1, [table_ok])
        put(16, OP_READ, ERROR, "put_indirect", OP_READ, 16, 0, 1, [424242])  # bad table
        bad_table = guest.grant(SEG.pack(good, 3, 1))
        put(17, OP_WRITE, ERROR, "put_indirect", OP_WRITE, 17, 0, 1, [bad_table])
        put(18, OP_READ, OKAY, "put_rw", OP_READ, 18, sectors - 8, [(good, 0, 7)])  # last page
        guest.push()
        got = await guest.wait(len(expect))
        assert got == expect
        assert drv.data[64 * 512:72 * 512] == bytes(PAGE)  # the half-bad write wrote nothing
        assert ring.stats.errors == 15 and ring.stats.unsupported == 2
        assert not ring.dead
        # Still serving.
        g = guest.grant(b"ok" * 2048)
        guest.put_rw(OP_WRITE, 99, 0, [(g, 0, 7)])
        guest.push()
        assert await guest.wait(1) == {99: (OP_WRITE, OKAY)}
    serve(body)


def test_writes_to_a_read_only_disk_fail() -> None:
    async def body(guest: Guest, ring, vbd: VBD, drv: Recorder) -> None:
        g = guest.grant(b"x" * PAGE)
        guest.put_rw(OP_WRITE, 1, 0, [(g, 0, 7)])
        guest.put_rw(OP_BARRIER, 2, 0, [(g, 0, 7)])
        guest.put_discard(3, 0, 8)
        guest.put_rw(OP_READ, 4, 0, [(g, 0, 7)])
        guest.put_rw(OP_FLUSH, 5, 0, [])
        guest.push()
        got = await guest.wait(5)
        assert got == {1: (OP_WRITE, ERROR), 2: (OP_BARRIER, ERROR), 3: (OP_DISCARD, ERROR),
                       4: (OP_READ, OKAY), 5: (OP_FLUSH, OKAY)}
        assert not any(c[0] in ("write", "discard") for c in drv.calls)
    serve(body, read_only=True)


def test_a_corrupt_producer_index_disconnects_that_ring_only(
        caplog: pytest.LogCaptureFixture) -> None:
    async def body(guest: Guest, ring, vbd: VBD, drv: Recorder) -> None:
        g = guest.grant(b"x" * PAGE)
        guest.put_rw(OP_WRITE, 1, 0, [(g, 0, 7)])
        guest.push()
        await guest.wait(1)
        struct.pack_into("<I", guest.ring, 0, ring.ring.req_cons + guest.size + 1)
        os.write(guest.kick_w, b"!")
        for _ in range(50):
            await asyncio.sleep(0.01)
            if ring.stopped:
                break
        assert ring.dead and ring.stopped
        assert guest.mapping is not None and guest.mapping.closed
        assert guest.notifier is not None and guest.notifier.closed
        assert any("disconnecting this ring" in r.getMessage() for r in caplog.records)
        # The VBD is untouched and still serves.
        out = memoryview(bytearray(PAGE))
        await vbd.read(0, out)
        assert bytes(out) == b"x" * PAGE
    with caplog.at_level(logging.INFO, logger="blktap.tapdisk"):
        serve(body)


def test_a_full_ring_is_not_corrupt() -> None:
    async def body(guest: Guest, ring, vbd: VBD, drv: Recorder) -> None:
        drv.gate.clear()
        pages = [guest.grant(pattern(i)) for i in range(32)]
        for i, g in enumerate(pages):
            guest.put_rw(OP_WRITE, i, 8 * i, [(g, 0, 7)])
        guest.push()
        for _ in range(20):
            await asyncio.sleep(0)
        assert ring.ring.outstanding == 32 and not ring.dead
        drv.gate.set()
        assert len(await guest.wait(32)) == 32
    serve(body)


def test_notifications_follow_the_event_indices() -> None:
    async def body(guest: Guest, ring, vbd: VBD, drv: Recorder) -> None:
        g = guest.grant(b"n" * PAGE)
        # The frontend asks for no event until 10 more responses are out.
        struct.pack_into("<I", guest.ring, 12, 10)
        for i in range(3):
            guest.put_rw(OP_READ, i, 0, [(g, 0, 7)])
        guest.push()
        for _ in range(50):
            await asyncio.sleep(0.002)
            if struct.unpack_from("<I", guest.ring, 8)[0] == 3:
                break
        assert struct.unpack_from("<I", guest.ring, 8)[0] == 3
        assert guest.notified == 0
        # The frontend re-arms (rsp_event = rsp_cons + 1): the next response notifies.
        assert len(guest.responses()) == 3
        # The backend went idle asking for an event on request 4 (req_event = 4).
        assert struct.unpack_from("<I", guest.ring, 4)[0] == 4
        guest.put_rw(OP_READ, 9, 0, [(g, 0, 7)])
        assert guest.push()
        assert await guest.wait(1) == {9: (OP_READ, OKAY)}
        assert guest.notified == 1
    serve(body)


def test_frontend_events_are_requested_exactly_when_idle() -> None:
    async def body(guest: Guest, ring, vbd: VBD, drv: Recorder) -> None:
        g = guest.grant(b"e" * PAGE)
        guest.put_rw(OP_READ, 1, 0, [(g, 0, 7)])
        assert guest.push()  # req_event was 1
        await guest.wait(1)
        assert struct.unpack_from("<I", guest.ring, 4)[0] == 2
        # Two requests in one push: one event.
        guest.put_rw(OP_READ, 2, 0, [(g, 0, 7)])
        guest.put_rw(OP_READ, 3, 0, [(g, 0, 7)])
        assert guest.push()
        await guest.wait(2)
        assert guest.kicks == 2 and ring.stats.events == 2
    serve(body)


def test_pause_keeps_the_ring_and_requests_wait() -> None:
    async def body(guest: Guest, ring, vbd: VBD, drv: Recorder) -> None:
        await vbd.pause()
        g = guest.grant(b"p" * PAGE)
        guest.put_rw(OP_WRITE, 1, 0, [(g, 0, 7)])
        guest.push()
        for _ in range(20):
            await asyncio.sleep(0.005)
        assert guest.responses() == [] and ring.ring.req_cons == 1
        await vbd.resume(drv)
        assert await guest.wait(1) == {1: (OP_WRITE, OKAY)}
        assert bytes(drv.data[:PAGE]) == b"p" * PAGE
    serve(body)


def test_disconnect_lets_requests_in_flight_finish() -> None:
    async def body(guest: Guest, ring, vbd: VBD, drv: Recorder) -> None:
        drv.gate.clear()
        g = guest.grant(b"d" * PAGE)
        guest.put_rw(OP_WRITE, 1, 0, [(g, 0, 7)])
        guest.push()
        for _ in range(10):
            await asyncio.sleep(0)
        stop = asyncio.ensure_future(ring.stop())
        await asyncio.sleep(0.02)
        assert not stop.done() and not guest.mapping.closed
        drv.gate.set()
        await stop
        assert bytes(drv.data[:PAGE]) == b"d" * PAGE
        assert [r[:3] for r in guest.responses()] == [(1, OP_WRITE, OKAY)]
        assert guest.mapping.closed and guest.notifier.closed
    serve(body)


def test_disconnect_of_a_paused_disk_drops_the_held_requests() -> None:
    async def body(guest: Guest, ring, vbd: VBD, drv: Recorder) -> None:
        await vbd.pause()
        g = guest.grant(b"h" * PAGE)
        guest.put_rw(OP_WRITE, 1, 0, [(g, 0, 7)])
        guest.push()
        await asyncio.sleep(0.02)
        await asyncio.wait_for(ring.stop(), 5)
        assert guest.mapping.closed and drv.calls == []
        await vbd.resume(drv)
    serve(body)


@contextlib.contextmanager
def image_in_memory(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB raw image on tmpfs (where the side door serves everything), removed after."""
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    path = shm / f"xen-ring-{os.getpid()}.img"
    path.write_bytes(bytes(MiB))
    try:
        yield path
    finally:
        path.unlink()


def test_side_door_serves_a_file_in_memory(tmp_path: Path) -> None:
    with image_in_memory(tmp_path) as path:
        async def body(guest: Guest, ring, vbd: VBD, drv) -> None:  # noqa: ANN001
            g = guest.grant(b"s" * PAGE)
            guest.put_rw(OP_WRITE, 1, 8, [(g, 0, 7)])
            guest.push()
            await guest.wait(1)
            r = guest.grant()
            guest.put_rw(OP_READ, 2, 8, [(r, 0, 7)])
            guest.push()
            await guest.wait(1)
            assert bytes(guest.pages[r]) == b"s" * PAGE
            assert ring.stats.side_door == 2
            assert vbd.stats.read_reqs == 1 and vbd.stats.write_reqs == 1

        serve(body, driver=lambda e: open_stack(e, f"aio:{path}", writable=True))
        assert path.read_bytes()[4096:8192] == b"s" * PAGE


# ---------------------------------------------------------------- persistent grants
@pytest.mark.parametrize("layout", [X64, X32], ids=["x86_64", "x86_32"])
def test_persistent_grants_serve_in_the_guests_own_pages(layout: Layout) -> None:
    """feature-persistent on both ends: each grant is mapped the first time it is seen
    and kept; the data goes between the disk and the guest's pages with no grant copy."""
    async def body(guest: Guest, ring, vbd: VBD, drv: Recorder) -> None:
        data = [pattern(1), pattern(2), pattern(3)]
        src = [guest.grant(d) for d in data]
        guest.put_rw(OP_WRITE, 1, 10, [(src[0], 2, 7), (src[1], 0, 7), (src[2], 0, 0)])
        guest.push()
        assert await guest.wait(1) == {1: (OP_WRITE, OKAY)}
        assert bytes(drv.data[10 * 512:25 * 512]) == data[0][1024:] + data[1] + data[2][:512]
        dst = [guest.grant(), guest.grant()]
        guest.put_rw(OP_READ, 2, 11, [(dst[0], 1, 7), (dst[1], 0, 7)])
        guest.push()
        assert await guest.wait(1) == {2: (OP_READ, OKAY)}
        assert bytes(guest.pages[dst[0]][512:]) == bytes(drv.data[11 * 512:18 * 512])
        assert bytes(guest.pages[dst[1]]) == bytes(drv.data[18 * 512:26 * 512])
        assert guest.map_calls == 2
        # The frontend reuses its pool: the same grants again cost no mapping.
        guest.pages[src[1]][:] = pattern(9)
        guest.put_rw(OP_WRITE, 3, 0, [(src[1], 0, 7), (src[0], 0, 7)])
        guest.put_rw(OP_READ, 4, 0, [(dst[1], 0, 7)])
        guest.push()
        assert await guest.wait(2) == {3: (OP_WRITE, OKAY), 4: (OP_READ, OKAY)}
        assert bytes(drv.data[:PAGE]) == pattern(9)
        assert guest.map_calls == 2 and guest.copies == 0
        st = ring.stats
        assert (st.mapped, st.grants_mapped, st.map_failures) == (4, 5, 0)
        assert ring.stats_dict()["persistent_grants"] is True
        await ring.stop()
        assert guest.page_mappings and all(m.closed for m in guest.page_mappings)
    serve(body, layout=layout, persistent=True)


def test_persistent_grants_for_indirect_requests() -> None:
    """The indirect pages are persistent grants too: mapped, read in place."""
    async def body(guest: Guest, ring, vbd: VBD, drv: Recorder) -> None:
        data = [pattern(i) for i in range(256)]
        pages = [guest.grant(d) for d in data]
        ind = guest.grant(b"".join(SEG.pack(g, 0, 7) for g in pages))
        guest.put_indirect(OP_WRITE, 0xAA, 2048, 256, [ind])
        guest.push()
        assert await guest.wait(1) == {0xAA: (OP_WRITE, OKAY)}
        assert bytes(drv.data[MiB:2 * MiB]) == b"".join(data)
        assert ("write", MiB, MiB) in drv.calls
        for g in pages:
            guest.pages[g][:] = bytes(PAGE)
        guest.put_indirect(OP_READ, 0xBB, 2048, 256, [ind])  # the same pool, read back
        guest.push()
        assert await guest.wait(1) == {0xBB: (OP_READ, OKAY)}
        assert b"".join(bytes(guest.pages[g]) for g in pages) == b"".join(data)
        assert guest.copies == 0 and guest.map_calls == 2  # the table, then its pages
        assert ring.stats.grants_mapped == 257
    serve(body, persistent=True)


def test_persistent_grants_segments_seen_before_are_served_checked_as_the_first_time(
        ) -> None:
    """A segment of a mapped page is checked and cut once, then looked up: the same
    segments again go to the same views, and every request is still checked in full
    (its range, a write to a read-only disk, a new bad segment beside known ones)."""
    async def body(guest: Guest, ring, vbd: VBD, drv: Recorder) -> None:
        a, b = guest.grant(pattern(1)), guest.grant(pattern(2))
        segs = [(a, 0, 7), (b, 2, 5)]
        guest.put_rw(OP_WRITE, 1, 8, segs)
        guest.push()
        assert await guest.wait(1) == {1: (OP_WRITE, OKAY)}
        assert bytes(drv.data[4096:4096 + PAGE + 2048]) == pattern(1) + pattern(2)[1024:3072]
        assert set(ring._segment_views) == set(segs)
        views = dict(ring._segment_views)
        # The same segments, read back elsewhere in the guest's pages' own order
        guest.pages[a][:] = bytes(PAGE)
        guest.pages[b][:] = bytes(PAGE)
        guest.put_rw(OP_READ, 2, 8, segs)
        guest.push()
        assert await guest.wait(1) == {2: (OP_READ, OKAY)}
        assert bytes(guest.pages[a]) == pattern(1)
        assert bytes(guest.pages[b][1024:3072]) == pattern(2)[1024:3072]
        assert all(ring._segment_views[k] is v for k, v in views.items())
        # Known segments still meet every check
        last = vbd.size // 512 - 8
        guest.put_rw(OP_READ, 3, last, segs)  # 12 sectors from 8 before the end
        guest.put_rw(OP_READ, 4, 0, [segs[0], (b, 6, 2)])  # a bad one beside a known one
        guest.put_rw(OP_READ, 5, 0, [segs[0], (b, 0, 8)])  # past its page
        guest.put_rw(OP_WRITE, 6, 0, segs)
        guest.push()
        assert await guest.wait(4) == {3: (OP_READ, ERROR), 4: (OP_READ, ERROR),
                                       5: (OP_READ, ERROR), 6: (OP_WRITE, OKAY)}
        assert (b, 6, 2) not in ring._segment_views and (b, 0, 8) not in ring._segment_views
        assert guest.copies == 0 and ring.stats.errors == 3
        await ring.stop()
        assert not ring._segment_views  # nothing keeps the guest's pages exported
        assert all(m.closed for m in guest.page_mappings)
    serve(body, persistent=True)


def test_persistent_grants_known_segments_cannot_write_a_read_only_disk() -> None:
    async def body(guest: Guest, ring, vbd: VBD, drv: Recorder) -> None:
        g = guest.grant(b"w" * PAGE)
        guest.put_rw(OP_READ, 1, 0, [(g, 0, 7)])
        guest.push()
        assert await guest.wait(1) == {1: (OP_READ, OKAY)}
        assert (g, 0, 7) in ring._segment_views
        guest.put_rw(OP_WRITE, 2, 0, [(g, 0, 7)])
        guest.push()
        assert await guest.wait(1) == {2: (OP_WRITE, ERROR)}
        assert bytes(drv.data[:PAGE]) == bytes(PAGE)
    serve(body, persistent=True, read_only=True)


def test_persistent_grants_a_bad_grant_fails_its_request_only() -> None:
    async def body(guest: Guest, ring, vbd: VBD, drv: Recorder) -> None:
        good = guest.grant(b"g" * PAGE)
        guest.put_rw(OP_WRITE, 1, 0, [(good, 0, 7), (424242, 0, 7)])
        guest.push()
        assert await guest.wait(1) == {1: (OP_WRITE, ERROR)}
        assert ring.stats.map_failures == 2 and not ring.dead
        guest.put_rw(OP_WRITE, 2, 0, [(good, 0, 7)])
        guest.push()
        assert await guest.wait(1) == {2: (OP_WRITE, OKAY)}
        assert bytes(drv.data[:PAGE]) == b"g" * PAGE and ring.stats.mapped == 1
    serve(body, persistent=True)


def test_persistent_grants_past_the_limit_go_by_grant_copy() -> None:
    async def body(guest: Guest, ring, vbd: VBD, drv: Recorder) -> None:
        first = [guest.grant(pattern(i)) for i in range(3)]
        guest.put_rw(OP_WRITE, 1, 0, [(g, 0, 7) for g in first])
        guest.push()
        assert await guest.wait(1) == {1: (OP_WRITE, OKAY)}
        more = [guest.grant(pattern(10 + i)) for i in range(2)]  # 5 > 4: copied
        guest.put_rw(OP_WRITE, 2, 24, [(g, 0, 7) for g in more])
        guest.push()
        assert await guest.wait(1) == {2: (OP_WRITE, OKAY)}
        assert guest.copies == 1 and ring.stats.grants_mapped == 3
        guest.put_rw(OP_READ, 3, 24, [(g, 0, 7) for g in first[:2]])  # mapped already
        guest.push()
        assert await guest.wait(1) == {3: (OP_READ, OKAY)}
        assert guest.copies == 1 and ring.stats.mapped == 2
        assert [bytes(guest.pages[g]) for g in first[:2]] == [pattern(10), pattern(11)]
    serve(body, persistent=True, max_persistent=4)


def test_persistent_grants_through_the_side_door(tmp_path: Path) -> None:
    with image_in_memory(tmp_path) as path:
        async def body(guest: Guest, ring, vbd: VBD, drv) -> None:  # noqa: ANN001
            g = guest.grant(b"p" * PAGE)
            guest.put_rw(OP_WRITE, 1, 8, [(g, 0, 7)])
            r = guest.grant()
            guest.put_rw(OP_READ, 2, 8, [(r, 4, 7)])
            guest.push()
            assert await guest.wait(2) == {1: (OP_WRITE, OKAY), 2: (OP_READ, OKAY)}
            assert bytes(guest.pages[r]) == bytes(2048) + b"p" * 2048
            assert ring.stats.side_door == 2 and ring.stats.mapped == 2
            assert guest.copies == 0

        serve(body, persistent=True,
              driver=lambda e: open_stack(e, f"aio:{path}", writable=True))


# ---------------------------------------------------------------- over the control socket
CTL = struct.Struct("=HH4x")
MSG = 544
BLKIF = struct.Struct("=II8III256sIII")  # 316 bytes
IMAGE = struct.Struct("=QII")
RESP = struct.Struct("=i256s")
T_ERROR, T_ATTACH, T_OPEN, T_OPEN_RSP = 1, 5, 7, 8
T_CONNECT, T_CONNECT_RSP, T_DISCONNECT, T_DISCONNECT_RSP, T_INFO, T_INFO_RSP = range(24, 30)
PARAMS = struct.Struct("=III256sIH256s")


async def ask(path: str, kind: int, minor: int, body: bytes = b"") -> tuple[int, bytes]:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write((CTL.pack(kind, minor) + body).ljust(MSG, b"\0"))
    await writer.drain()
    raw = await reader.readexactly(MSG)
    writer.close()
    return CTL.unpack_from(raw)[0], raw[8:]


def blkif(guest: Guest, *, proto: int | None = None, order: int | None = None,
          devid: int = 51712) -> bytes:
    refs = guest.ring_grefs + [0] * (8 - len(guest.ring_grefs))
    # Order 4 (our extension): refs 8-15 follow the reference's 316-byte payload.
    more = struct.pack("=8I", *refs[8:16]) if len(refs) > 8 else b""
    return BLKIF.pack(guest.domid, devid, *refs[:8], guest.order if order is None else order,
                      guest.L.proto if proto is None else proto, b"pool0", 9, 0, 0) + more


def test_connect_disconnect_and_disk_info_over_the_control_socket(tmp_path: Path) -> None:
    from blktap.daemon.tapdisk import Tapdisk

    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * (2 * MiB))

    async def main() -> None:
        guest = Guest(X64, order=1)
        devices = Devices(guest)
        td = Tapdisk(tmp_path / "run", threads=2, xen=devices)
        ctl = td.start_control()
        try:
            await td.attach(3, hold=False)  # (tap-ctl allocates the minor's marker first)
            kind, body = await ask(ctl, T_INFO, 3)
            assert kind == T_INFO_RSP and IMAGE.unpack_from(body) == (0, 0, 0)  # not open
            # Connecting a minor that is not open.
            kind, body = await ask(ctl, T_CONNECT, 3, blkif(guest))
            assert kind == T_ERROR and RESP.unpack_from(body)[0] == errno.EINVAL
            params = PARAMS.pack(0, 0, 0, f"aio:{img}".encode(), 0, 0, b"")
            assert (await ask(ctl, T_OPEN, 3, params))[0] == T_OPEN_RSP
            kind, body = await ask(ctl, T_INFO, 3)
            assert kind == T_INFO_RSP and IMAGE.unpack_from(body) == (4096, 512, 0)
            # ...and, after the image, our extension: order-4 rings are taken
            assert struct.unpack_from("=4sI", body, IMAGE.size) == (b"BTX1", 4)
            # Bad protocol, unknown minor.
            kind, body = await ask(ctl, T_CONNECT, 3, blkif(guest, proto=9))
            assert kind == T_ERROR and RESP.unpack_from(body)[0] == errno.EINVAL
            kind, body = await ask(ctl, T_CONNECT, 4, blkif(guest))
            assert kind == T_ERROR and RESP.unpack_from(body)[0] == errno.ENODEV
            assert devices.grant_devices == []  # nothing was opened for them
            # Connected.
            kind, body = await ask(ctl, T_CONNECT, 3, blkif(guest))
            assert kind == T_CONNECT_RSP and RESP.unpack_from(body)[0] == 0
            g = guest.grant(b"c" * PAGE)
            guest.put_rw(OP_WRITE, 1, 8, [(g, 0, 7)])
            guest.push()
            assert await guest.wait(1) == {1: (OP_WRITE, OKAY)}
            kind, body = await ask(ctl, T_CONNECT, 3, blkif(guest))
            assert kind == T_ERROR and RESP.unpack_from(body)[0] == errno.EALREADY
            # tap-ctl stats shows the ring.
            stats = td._stats(td.slots[3])["xenblkif"]
            assert stats["ring_pages"] == 2 and stats["writes"] == 1
            # Pause and resume keep the ring.
            await td.pause(3)
            guest.put_rw(OP_READ, 2, 8, [(g, 0, 7)])
            guest.push()
            await asyncio.sleep(0.05)
            assert guest.responses() == []
            await td.resume(3)
            assert await guest.wait(1) == {2: (OP_READ, OKAY)}
            # Disconnect finds the ring by domid/devid (the cookie is not used).
            kind, _ = await ask(ctl, T_DISCONNECT, 0, blkif(guest, devid=1))
            assert kind == T_ERROR
            kind, body = await ask(ctl, T_DISCONNECT, 0, blkif(guest))
            assert kind == T_DISCONNECT_RSP
            assert guest.mapping.closed and guest.notifier.closed
            assert devices.grant_devices[-1].closed
            kind, body = await ask(ctl, T_DISCONNECT, 0, blkif(guest))
            assert kind == T_ERROR and RESP.unpack_from(body)[0] == errno.ENODEV
            # And again, as after a guest reboot, with the largest ring blkfront makes
            # (order 4: 16 grant refs, through our CONNECT extension).
            guest2 = Guest(X32, order=4, domid=8)
            td.xen = Devices(guest2)
            kind, _ = await ask(ctl, T_CONNECT, 3, blkif(guest2))
            assert kind == T_CONNECT_RSP
            r = guest2.grant()
            guest2.put_rw(OP_READ, 5, 8, [(r, 0, 7)])
            guest2.push()
            assert await guest2.wait(1) == {5: (OP_READ, OKAY)}
            assert bytes(guest2.pages[r]) == b"c" * PAGE
            # Closing the minor disconnects its ring first.
            await td.close(3)
            assert guest2.mapping.closed
            guest.close()
            guest2.close()
        finally:
            await td.shutdown()

    asyncio.run(main())
    assert img.read_bytes()[4096:8192] == b"c" * PAGE


@contextlib.asynccontextmanager
async def connected_tapdisk(tmp_path: Path, spec: str) -> AsyncIterator[tuple]:
    """A Tapdisk serving ``spec`` on minor 0 to a stand-in guest's connected ring, as
    tap-ctl open and tapback's XENBLKIF_CONNECT leave it: (guest, tapdisk, control)."""
    from blktap.daemon.tapdisk import Tapdisk

    guest = Guest(X64)
    td = Tapdisk(tmp_path / "run", threads=2, xen=Devices(guest))
    ctl = td.start_control()
    try:
        await td.attach(0, hold=False)
        params = PARAMS.pack(0, 0, 0, spec.encode(), 0, 0, b"")
        assert (await ask(ctl, T_OPEN, 0, params))[0] == T_OPEN_RSP
        assert (await ask(ctl, T_CONNECT, 0, blkif(guest)))[0] == T_CONNECT_RSP
        yield guest, td, ctl
    finally:
        await td.shutdown()
        guest.close()


def test_persistent_grants_over_the_control_socket(tmp_path: Path) -> None:
    """DISK_INFO_RSP says the ring maps grants (our extension's feature word); a CONNECT
    carrying the negotiated feature gets a ring serving from the guest's mapped pages."""
    from blktap.daemon.tapdisk import Tapdisk

    img = tmp_path / "disk.img"
    img.write_bytes(bytes(MiB))

    async def main() -> None:
        guest = Guest(X64)
        td = Tapdisk(tmp_path / "run", threads=2, xen=Devices(guest))
        ctl = td.start_control()
        try:
            await td.attach(0, hold=False)
            params = PARAMS.pack(0, 0, 0, f"aio:{img}".encode(), 0, 0, b"")
            assert (await ask(ctl, T_OPEN, 0, params))[0] == T_OPEN_RSP
            kind, body = await ask(ctl, T_INFO, 0)
            assert kind == T_INFO_RSP
            assert struct.unpack_from("=4sII", body, IMAGE.size) == (b"BTX1", 4, 1)
            ext = bytes(32) + struct.pack("=4sI", b"BTX1", 1)  # past the order-4 refs
            assert (await ask(ctl, T_CONNECT, 0, blkif(guest) + ext))[0] == T_CONNECT_RSP
            assert td.slots[0].blkif is not None and td.slots[0].blkif.persistent
            g = guest.grant(b"c" * PAGE)
            guest.put_rw(OP_WRITE, 1, 0, [(g, 0, 7)])
            guest.push()
            assert await guest.wait(1) == {1: (OP_WRITE, OKAY)}
            assert guest.copies == 0 and guest.map_calls == 1
        finally:
            await td.shutdown()
            guest.close()
        assert img.read_bytes()[:PAGE] == b"c" * PAGE

    asyncio.run(main())


def test_live_snapshot_of_a_connected_vhd_onto_a_new_leaf(tmp_path: Path) -> None:
    """tap-ctl pause, vhd-util snapshot, tap-ctl unpause -a vhd:NEW with a guest's ring
    connected (the Xen testbed's live-snapshot run, without Xen): a write made while
    paused is held, then lands in the new leaf; the old leaf keeps what came before, and
    both layers pass vhd-util check's rules."""
    from blktap.image import Chain
    from blktap.image.vhd import create as vhd_create
    from blktap.image.vhd import snapshot as vhd_snapshot
    from blktap.image.vhd.check import check_image

    base, leaf, snap = (str(tmp_path / f"{n}.vhd") for n in ("base", "leaf", "snap"))
    vhd_create(base, 4 * MiB)
    vhd_snapshot(leaf, base)

    async def main() -> None:
        async with connected_tapdisk(tmp_path, f"vhd:{leaf}") as (guest, td, _ctl):
            before, after = guest.grant(b"1" * PAGE), guest.grant(b"2" * PAGE)
            guest.put_rw(OP_WRITE, 1, 0, [(before, 0, 7)])
            guest.push()
            assert await guest.wait(1) == {1: (OP_WRITE, OKAY)}
            await td.pause(0)
            guest.put_rw(OP_WRITE, 2, 8, [(after, 0, 7)])
            guest.put_rw(OP_FLUSH, 3, 0, [])
            guest.push()
            await asyncio.sleep(0.05)
            assert guest.responses() == []  # held by the pause
            vhd_snapshot(snap, leaf)
            await td.resume(0, f"vhd:{snap}")
            assert await guest.wait(2) == {2: (OP_WRITE, OKAY), 3: (OP_FLUSH, OKAY)}
            r = guest.grant()
            guest.put_rw(OP_READ, 4, 0, [(r, 0, 7)])
            guest.push()
            assert await guest.wait(1) == {4: (OP_READ, OKAY)}
            assert bytes(guest.pages[r]) == b"1" * PAGE  # read through the new leaf

    asyncio.run(main())
    with Chain.open(f"vhd:{leaf}") as old, Chain.open(f"vhd:{snap}") as new:
        assert old.pread(0, 2 * PAGE) == b"1" * PAGE + bytes(PAGE)
        assert new.pread(0, 2 * PAGE) == b"1" * PAGE + b"2" * PAGE
    for path in (base, leaf, snap):
        assert check_image(path).ok, path


def test_connecting_a_served_ring_again_is_answered_not_logged_as_an_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A restarted tapback sends XENBLKIF_CONNECT for the rings it finds Connected; the
    tapdisk still serving them answers EALREADY, which is no fault of the tapdisk's: an
    ERROR line would keep its log file as if something had gone wrong (seen in the Xen
    testbed's tapback-restart run)."""

    img = tmp_path / "disk.img"
    img.write_bytes(bytes(MiB))

    async def main() -> None:
        async with connected_tapdisk(tmp_path, f"aio:{img}") as (guest, _td, ctl):
            kind, body = await ask(ctl, T_CONNECT, 0, blkif(guest))
            assert kind == T_ERROR and RESP.unpack_from(body)[0] == errno.EALREADY

    with caplog.at_level(logging.INFO, logger="blktap.tapdisk"):
        asyncio.run(main())
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_disk_info_of_a_read_only_disk(tmp_path: Path) -> None:
    from blktap.daemon.tapdisk import Tapdisk

    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * MiB)

    async def main() -> None:
        td = Tapdisk(tmp_path / "run", threads=2)
        ctl = td.start_control()
        try:
            await td.attach(1, hold=False)
            params = PARAMS.pack(0x2, 0, 0, f"aio:{img}".encode(), 0, 0, b"")
            assert (await ask(ctl, T_OPEN, 1, params))[0] == T_OPEN_RSP
            kind, body = await ask(ctl, T_INFO, 1)
            assert kind == T_INFO_RSP and IMAGE.unpack_from(body) == (2048, 512, 4)
        finally:
            await td.shutdown()

    asyncio.run(main())


def test_real_tapdisk_disk_info_and_connect_without_xen(tmp_path: Path) -> None:
    """The tapdisk process, driven as tapback drives it: DISK_INFO, then a CONNECT that
    cannot succeed on a host without /dev/xen (an error reply; the process lives on)."""
    from test_tapdisk_daemon import Daemon  # the real process, spawned by tap-ctl's way

    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * (3 * MiB))
    d = Daemon(tmp_path)
    try:
        minor = d.allocate()
        assert d.request(CTL.pack(T_ATTACH, minor).ljust(MSG, b"\0")).kind == T_ATTACH + 1
        params = PARAMS.pack(0, 0, 0, f"aio:{img}".encode(), 0, 0, b"")
        assert d.request((CTL.pack(T_OPEN, minor) + params).ljust(MSG, b"\0")).kind == T_OPEN_RSP
        r = d.request(CTL.pack(T_INFO, minor).ljust(MSG, b"\0"))
        assert r.kind == T_INFO_RSP and IMAGE.unpack_from(r.body) == (6144, 512, 0)
        g = Guest()
        r = d.request((CTL.pack(T_CONNECT, minor) + blkif(g)).ljust(MSG, b"\0"))
        g.close()
        if os.path.exists("/dev/xen/gntdev"):
            pytest.skip("a Xen host: the CONNECT would reach real grants")
        assert r.kind == T_ERROR and r.error == errno.ENOENT
        # Still serving.
        r = d.request(CTL.pack(T_INFO, minor).ljust(MSG, b"\0"))
        assert r.kind == T_INFO_RSP
    finally:
        d.stop()


def test_host_devices_are_absent_here() -> None:
    from blktap.transport.xen import HostDevices
    if os.path.exists("/dev/xen/gntdev"):
        pytest.skip("a Xen host")
    with pytest.raises(FileNotFoundError):
        HostDevices().grants()
    with pytest.raises(FileNotFoundError):
        HostDevices().bind(1, 2)


def test_a_failed_connect_leaves_nothing_behind(tmp_path: Path) -> None:
    """A grant that cannot be mapped, or a channel that cannot be bound: an ERROR reply
    with that errno, and what was opened or mapped for it is released."""
    from blktap.daemon.tapdisk import Tapdisk

    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * MiB)

    async def main() -> None:
        guest = Guest(X64)
        devices = Devices(guest)
        td = Tapdisk(tmp_path / "run", threads=2, xen=devices)
        ctl = td.start_control()
        try:
            await td.attach(2, hold=False)
            params = PARAMS.pack(0, 0, 0, f"aio:{img}".encode(), 0, 0, b"")
            assert (await ask(ctl, T_OPEN, 2, params))[0] == T_OPEN_RSP
            wrong = BLKIF.pack(guest.domid, 51712, 555, *[0] * 7, 0, PROTO_X86_64, b"", 9, 0,
                               0)
            kind, body = await ask(ctl, T_CONNECT, 2, wrong)
            assert kind == T_ERROR and RESP.unpack_from(body)[0] == errno.EINVAL
            assert devices.grant_devices[-1].closed and guest.mapping is None
            other_domain = BLKIF.pack(guest.domid + 1, 51712, *guest.ring_grefs, *[0] * 7, 0,
                                      PROTO_X86_64, b"", 9, 0, 0)
            guest.domid += 1  # the grants map (for this stand-in) but the bind fails
            devices.bind = lambda domid, port: (_ for _ in ()).throw(  # type: ignore
                OSError(errno.ESRCH, "no such port"))
            kind, body = await ask(ctl, T_CONNECT, 2, other_domain)
            assert kind == T_ERROR and RESP.unpack_from(body)[0] == errno.ESRCH
            assert guest.mapping is not None and guest.mapping.closed
            assert devices.grant_devices[-1].closed and td.slots[2].blkif is None
            guest.close()
        finally:
            await td.shutdown()

    asyncio.run(main())


def test_a_producer_index_moved_backwards_is_corrupt_not_four_billion_requests() -> None:
    """req_prod behind req_cons (but within the ring's size of the oldest unanswered
    request) must not read as 2**32 - n requests waiting."""
    from blktap.transport.xen import structs
    from blktap.transport.xen.ring import BackRing, RingCorrupt

    mem = mmap.mmap(-1, PAGE)
    ring = BackRing(memoryview(mem), structs.X86_64, 0)
    struct.pack_into("<I", mem, 0, 10)
    assert len(ring.take()) == 10  # consumed, none answered yet
    struct.pack_into("<I", mem, 0, 5)  # the guest moves its producer back
    with pytest.raises(RingCorrupt):
        ring.unconsumed()
    struct.pack_into("<I", mem, 0, 10 + 23)  # 33 outstanding on a ring of 32
    with pytest.raises(RingCorrupt):
        ring.take()
    struct.pack_into("<I", mem, 0, 10 + 22)  # exactly full: fine
    assert len(ring.take()) == 22


def test_a_grant_copy_ioctl_failing_fails_the_request_not_the_ring() -> None:
    """The ioctl itself failing (ENOMEM, EFAULT...), on a data or an indirect page: an
    error response, and the ring goes on."""
    async def body(guest: Guest, ring, vbd: VBD, drv: Recorder) -> None:
        boom = guest.grant(b"b" * PAGE)
        real = ring.grants.copy

        def copy(domid, spans, local, offset, to_guest):  # noqa: ANN001, ANN202
            if any(ref == boom for ref, _, _ in spans):
                raise OSError(errno.ENOMEM, "no memory")
            return real(domid, spans, local, offset, to_guest)

        ring.grants.copy = copy
        guest.put_rw(OP_WRITE, 1, 0, [(boom, 0, 7)])
        guest.put_rw(OP_READ, 2, 0, [(boom, 0, 7)])
        guest.put_indirect(OP_READ, 3, 0, 1, [boom])
        good = guest.grant(b"g" * PAGE)
        guest.put_rw(OP_WRITE, 4, 0, [(good, 0, 7)])
        guest.push()
        got = await guest.wait(4)
        assert got == {1: (OP_WRITE, ERROR), 2: (OP_READ, ERROR), 3: (OP_READ, ERROR),
                       4: (OP_WRITE, OKAY)}
        assert not ring.dead
    serve(body)


def test_a_guest_sending_bad_grants_does_not_flood_the_log(
        caplog: pytest.LogCaptureFixture) -> None:
    async def body(guest: Guest, ring, vbd: VBD, drv: Recorder) -> None:
        for rnd in range(4):
            for i in range(25):
                guest.put_rw(OP_READ, rnd * 100 + i, 0, [(999999, 0, 7)])
            guest.push()
            await guest.wait(25)
        assert ring.stats.errors == 100
    with caplog.at_level(logging.INFO, logger="blktap.tapdisk"):
        serve(body)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 21  # 20, then one saying the rest are not logged


# Turns of the test's loop from the gate opening to the event (counted, not timed: one
# more before the response was pushed at once).
LONE_RESPONSE_TURNS = 1


def test_a_lone_response_is_pushed_when_its_request_completes() -> None:
    """With nothing else in flight, the response is published (and the frontend told)
    in the turn of the loop that completes the request, not one later: a turn costs
    system calls, which a PV dom0 pays through Xen. Responses of a batch still go
    together (one event for the lot)."""
    async def body(guest: Guest, ring, vbd: VBD, drv: Recorder) -> None:
        g = guest.grant(pattern(1))
        drv.gate.clear()
        guest.put_rw(OP_WRITE, 1, 0, [(g, 0, 7)])
        guest.push()
        for _ in range(100):
            await asyncio.sleep(0)
            if ("write", 0, PAGE) in drv.calls:
                break
        assert ("write", 0, PAGE) in drv.calls and guest.notified == 0
        drv.gate.set()  # the write completes in the turns that follow
        turns = 0
        while not guest.notified:
            await asyncio.sleep(0)
            turns += 1
            assert turns < 100
        assert ("written", 0, PAGE) in drv.calls
        assert turns <= LONE_RESPONSE_TURNS, turns
        assert await guest.wait(1) == {1: (OP_WRITE, OKAY)}
    serve(body)


# Turns of the test's loop from the guest's push to seeing the driver's call, for a
# request the side door cannot serve (counted, not timed): the event's turn, the group
# task's call, the test's look. By a task per request it took one more (the task's first
# step, then the VBD's merge turn).
SLOW_PATH_TURNS = 3


def test_a_request_reaches_the_driver_the_turn_after_its_event() -> None:
    """A write the side door cannot serve goes to the VBD the callback way: queued and
    kicked in the pass that consumes it, its group's task calls the driver in the next
    turn; the response follows its completion."""
    async def body(guest: Guest, ring, vbd: VBD, drv: Recorder) -> None:
        g = guest.grant(pattern(2))
        drv.gate.clear()
        guest.put_rw(OP_WRITE, 1, 8, [(g, 0, 7)])
        guest.push()
        turns = 0
        try:
            while ("write", 8 * 512, PAGE) not in drv.calls:
                await asyncio.sleep(0)
                turns += 1
                assert turns < 100
            assert turns <= SLOW_PATH_TURNS, turns
            assert not ring._tasks  # no task of the ring's own
        finally:
            drv.gate.set()
        assert await guest.wait(1) == {1: (OP_WRITE, OKAY)}
        assert bytes(drv.data[8 * 512 : 8 * 512 + PAGE]) == pattern(2)
    serve(body)
