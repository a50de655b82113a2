"""The blkif ring's compiled pass (transport/xen/_ring.c), without Xen.

The stand-in guest of test_xen_ring.py (its own struct layouts, its pages in memory)
drives rings over disks the pass can serve (a raw file in memory, a VHD chain, qemu-made
qcow2 overlays), with the pass on and off (``BLKTAP_INLINE=0``): the guest must see the
same answers and the same bytes either way, the disk must end the same, and the pass
must have served what it claims. Requests it must leave to the Python path (bad
segments, ranges, operations, grants not mapped yet, a read-only disk, a corrupt ring)
get the Python path's answers when they come between requests it serves.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from blktap.image import Chain
from blktap.image.vhd import check as vhd_check
from blktap.image.vhd import create, snapshot
from blktap.tapdisk.drivers import open_stack
from blktap.tapdisk.vbd import VBD
from blktap.transport.xen import connect, inline
from blktap.transport.xen.blkif import MAX_INLINE_GREF
from conftest import with_engine
from test_fast_path import data, disk, need, qemu_compare, shm, until  # noqa: F401
from test_xen_ring import pattern, serve
from xen_guest import (
    EOPNOTSUPP,
    ERROR,
    OKAY,
    OP_BARRIER,
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
SECTOR = 512


def need_pass() -> None:
    if not inline.available():
        pytest.skip("the compiled ring pass is not built here (no C compiler)")
    if inline.compiled() is None:
        pytest.skip("BLKTAP_INLINE=0 in the environment")


def qemu_img(*args: str) -> str:
    return subprocess.run([need("qemu-img"), *args], check=True, capture_output=True,
                          text=True).stdout


def serve_file(body, spec: str, *, writable: bool = True, direct: bool = True,  # noqa: ANN001
               **options):  # noqa: ANN003, ANN201
    """test_xen_ring's ``serve`` with persistent grants, over the disk ``spec`` opened
    as tapdisk would."""
    return serve(body, persistent=True, **options,
                 driver=lambda e: open_stack(e, spec, writable=writable, direct=direct))


# ------------------------------------------------------------------ a guest's workload
class Workload:
    """Batches of random reads and writes (direct of 1 to 11 segments, indirect of up to
    256), each request in its own part of the disk and its own pages of a pool the guest
    reuses (as blkfront does with persistent grants), checked against a model of the
    disk."""

    def __init__(self, guest: Guest, model: bytearray, seed: int, pool: int = 600) -> None:
        self.guest = guest
        self.model = model
        self.rng = random.Random(seed)
        self.pool = [guest.grant(pattern(i)) for i in range(pool)]
        self.indirect_pages = [guest.grant() for _ in range(16)]

    async def batch(self, n: int) -> None:
        g, rng, model = self.guest, self.rng, self.model
        size = len(model)
        part = size // n
        pages = iter(rng.sample(self.pool, len(self.pool)))
        ind = iter(self.indirect_pages)
        reads: dict[int, tuple[list[tuple[int, int, int]], int]] = {}
        for rid in range(n):
            indirect = rng.random() < 0.3
            nseg = rng.randint(1, 128 if indirect else 11)
            segs = []
            for _ in range(nseg):
                first = rng.randrange(8)
                last = rng.randrange(first, 8) if rng.random() < 0.3 else 7
                segs.append((next(pages), first, last))
            sectors = sum(last - first + 1 for _, first, last in segs)
            room = part // SECTOR - sectors
            if room < 0:  # (the part is smaller than the request: fewer segments)
                segs, sectors = segs[:1], segs[0][2] - segs[0][1] + 1
                room = part // SECTOR - sectors
            sector = rid * part // SECTOR + rng.randrange(room + 1)
            op = OP_WRITE if rng.random() < 0.5 else OP_READ
            if op == OP_WRITE:
                pos = sector * SECTOR
                for gref, first, last in segs:
                    data = rng.randbytes((last - first + 1) * SECTOR)
                    g.pages[gref][first * SECTOR:(last + 1) * SECTOR] = data
                    model[pos:pos + len(data)] = data
                    pos += len(data)
            else:
                reads[rid] = (segs, sector)
            if indirect:
                table = next(ind)
                g.pages[table][:] = bytes(PAGE)
                for i, seg in enumerate(segs):
                    SEG.pack_into(g.pages[table], i * SEG.size, *seg)
                g.put_indirect(op, rid, sector, len(segs), [table])
            else:
                g.put_rw(op, rid, sector, segs)
        g.push()
        got = await g.wait(n)
        assert all(status == OKAY for _, status in got.values()), got
        for rid, (segs, sector) in reads.items():
            pos = sector * SECTOR
            for gref, first, last in segs:
                n_bytes = (last - first + 1) * SECTOR
                assert bytes(g.pages[gref][first * SECTOR:(last + 1) * SECTOR]) == \
                    bytes(model[pos:pos + n_bytes]), f"read {rid} at sector {sector}"
                pos += n_bytes


def run_workload(monkeypatch: pytest.MonkeyPatch, on: bool, spec: str, model: bytes, *,
                 layout: Layout = X64, order: int = 2, seed: int = 1, batches: int = 12,
                 per_batch: int = 12) -> tuple[bytearray, dict, dict]:
    """The workload on a ring over ``spec`` with the pass on or off: the model at the end,
    the ring's and the VBD's statistics."""
    monkeypatch.setenv("BLKTAP_INLINE", "1" if on else "0")
    m = bytearray(model)

    async def body(guest: Guest, ring, vbd: VBD, drv) -> tuple[dict, dict]:  # noqa: ANN001
        w = Workload(guest, m, seed)
        for _ in range(batches):
            await w.batch(per_batch)
        return ring.stats.as_dict(), vbd.stats.as_dict()

    rstats, vstats = serve_file(body, spec, layout=layout, order=order)
    return m, rstats, vstats


# ------------------------------------------------------------------ a raw file in memory
def test_the_extension_is_built_where_it_can_be() -> None:
    import sysconfig
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not (shutil.which("cc") or shutil.which("gcc")) or not headers.exists():
        pytest.skip("no C compiler or no Python headers: the pure-Python path serves")
    assert inline.available(), "blktap.transport.xen._ring was not built: pip install -e ."


def test_the_pass_reads_targets_and_requests_as_the_project_lays_them_out() -> None:
    """Both extensions read an InlineTarget by the one list of fields of the shared
    header (test_nbd_inline holds it to the NamedTuple), within the same chain limits;
    the ring's request limits are structs.py's."""
    need_pass()
    from blktap.transport.nbd import _inline
    from blktap.transport.xen import _ring, structs
    assert _ring.TARGET_FIELDS == _inline.TARGET_FIELDS
    assert (_ring.MAX_LAYERS, _ring.MAX_QCOW2_LAYERS) == (_inline.MAX_LAYERS,
                                                          _inline.MAX_QCOW2_LAYERS)
    assert (_ring.MAX_SEGMENTS, _ring.MAX_INDIRECT_SEGMENTS) == (
        structs.MAX_SEGMENTS, structs.MAX_INDIRECT_SEGMENTS)


@pytest.mark.parametrize("layout,order", [(X64, 0), (X64, 2), (X32, 1)],
                         ids=["x86_64-1page", "x86_64-4pages", "x86_32-2pages"])
def test_a_random_workload_sees_the_same_disk_with_the_pass_on_and_off(
        monkeypatch: pytest.MonkeyPatch, shm: Path,  # noqa: F811
        layout: Layout, order: int) -> None:
    need_pass()
    start = data(3, 4 * MiB)
    path = shm / "disk.img"
    results = {}
    for on in (False, True):
        path.write_bytes(start)
        model, rstats, vstats = run_workload(monkeypatch, on, f"aio:{path}", start,
                                             layout=layout, order=order)
        assert path.read_bytes() == bytes(model)
        results[on] = (model, rstats, vstats)
    (m_off, r_off, v_off), (m_on, r_on, v_on) = results[False], results[True]
    assert m_off == m_on  # (the same seed: the same requests)
    assert r_off["inline"] == 0
    # Every request after the first sight of its pages is the pass's.
    assert r_on["inline"] > 0.5 * (r_on["reads"] + r_on["writes"])
    for key in ("reads", "writes", "indirect", "segments", "max_segments", "errors"):
        assert r_on[key] == r_off[key], key
    for key in ("read_reqs", "write_reqs", "read_sectors", "write_sectors"):
        assert v_on[key] == v_off[key], key


def test_requests_the_pass_leaves_get_the_python_paths_answers(
        monkeypatch: pytest.MonkeyPatch, shm: Path) -> None:  # noqa: F811
    """Bad requests between good ones, their pages all mapped already: the good ones are
    the pass's, each bad one stops it and gets the Python path's answer, and the pass
    goes on after it."""
    need_pass()
    path = shm / "disk.img"
    path.write_bytes(data(5, 2 * MiB))
    end_sector = 2 * MiB // SECTOR

    async def body(guest: Guest, ring, vbd: VBD, drv) -> None:  # noqa: ANN001
        a, b = guest.grant(b"a" * PAGE), guest.grant()
        table = guest.grant()
        guest.put_rw(OP_WRITE, 1, 0, [(a, 0, 7)])  # maps a, b and the table
        guest.put_rw(OP_READ, 2, 0, [(b, 0, 7)])
        SEG.pack_into(guest.pages[table], 0, a, 0, 7)
        guest.put_indirect(OP_READ, 3, 0, 1, [table])
        guest.push()
        assert await guest.wait(3) == {1: (OP_WRITE, OKAY), 2: (OP_READ, OKAY),
                                       3: (OP_READ, OKAY)}
        before = ring.stats.inline
        cases = [
            ("good write", lambda rid: guest.put_rw(OP_WRITE, rid, 8, [(a, 0, 7)]), OKAY),
            ("first > last", lambda rid: guest.put_rw(OP_READ, rid, 8, [(b, 5, 2)]), ERROR),
            ("good read", lambda rid: guest.put_rw(OP_READ, rid, 8, [(b, 0, 7)]), OKAY),
            ("last sector 8", lambda rid: guest.put_rw(OP_READ, rid, 8, [(b, 0, 8)]), ERROR),
            ("past the end", lambda rid: guest.put_rw(OP_READ, rid, end_sector - 4,
                                                      [(b, 0, 7)]), ERROR),
            ("good read", lambda rid: guest.put_rw(OP_READ, rid, end_sector - 8,
                                                   [(b, 0, 7)]), OKAY),
            ("no segments", lambda rid: guest.put_rw(OP_READ, rid, 0, [], nseg=0), ERROR),
            ("12 segments", lambda rid: guest.put_rw(OP_READ, rid, 0, [(b, 0, 0)] * 11,
                                                     nseg=12), ERROR),
            ("unknown op", lambda rid: guest.put_raw(OP_RESERVED, rid), EOPNOTSUPP),
            ("a grant never given", lambda rid: guest.put_rw(OP_READ, rid, 0,
                                                             [(9999, 0, 7)]), ERROR),
            ("indirect, 300 segments", lambda rid: guest.put_indirect(OP_READ, rid, 0, 300,
                                                                      [table]), ERROR),
            ("indirect, flush inside", lambda rid: guest.put_indirect(OP_FLUSH, rid, 0, 1,
                                                                      [table]), ERROR),
            ("good indirect", lambda rid: guest.put_indirect(OP_READ, rid, 0, 1, [table]),
             OKAY),
        ]
        for rid, (_, put, _) in enumerate(cases, 100):
            put(rid)
        guest.push()
        got = await guest.wait(len(cases))
        for rid, (what, _, status) in enumerate(cases, 100):
            assert got[rid][1] == status, what
        assert bytes(guest.pages[b]) == path.read_bytes()[-PAGE:]
        good = sum(status == OKAY for _, _, status in cases)
        assert ring.stats.inline - before == good
        assert not ring.dead

    serve_file(body, f"aio:{path}")


def test_a_read_only_disk_refuses_writes_the_pass_would_serve(shm: Path) -> None:  # noqa: F811
    need_pass()
    path = shm / "disk.img"
    path.write_bytes(data(6, MiB))

    async def body(guest: Guest, ring, vbd: VBD, drv) -> None:  # noqa: ANN001
        a = guest.grant(b"w" * PAGE)
        for rid in range(3):  # the first maps the page; then the pass would take them
            guest.put_rw(OP_READ, 10 + rid, 0, [(a, 0, 7)])
            guest.put_rw(OP_WRITE, 20 + rid, 0, [(a, 0, 7)])
            guest.push()
            got = await guest.wait(2)
            assert got == {10 + rid: (OP_READ, OKAY), 20 + rid: (OP_WRITE, ERROR)}
        assert ring.stats.inline == 2  # the second and third reads

    serve_file(body, f"aio:{path}", writable=False, read_only=True)
    assert path.read_bytes() == data(6, MiB)


def test_grants_past_the_table_are_served_by_the_python_path(shm: Path) -> None:  # noqa: F811
    need_pass()
    path = shm / "disk.img"
    path.write_bytes(bytes(MiB))

    async def body(guest: Guest, ring, vbd: VBD, drv) -> None:  # noqa: ANN001
        guest.next_gref = MAX_INLINE_GREF + 7
        a, b = guest.grant(b"x" * PAGE), guest.grant()
        for rid in range(3):
            guest.put_rw(OP_WRITE, 2 * rid, 8, [(a, 0, 7)])
            guest.put_rw(OP_READ, 2 * rid + 1, 8, [(b, 0, 7)])
            guest.push()
            assert set((await guest.wait(2)).values()) == {(OP_WRITE, OKAY), (OP_READ, OKAY)}
        assert bytes(guest.pages[b]) == b"x" * PAGE
        assert ring.stats.inline == 0 and ring.stats.mapped == 6
        assert len(ring._addresses) <= MAX_INLINE_GREF

    serve_file(body, f"aio:{path}")


def test_a_corrupt_ring_is_disconnected_by_the_python_path(shm: Path) -> None:  # noqa: F811
    need_pass()
    path = shm / "disk.img"
    path.write_bytes(bytes(MiB))

    async def body(guest: Guest, ring, vbd: VBD, drv) -> None:  # noqa: ANN001
        a = guest.grant()
        for rid in range(2):
            guest.put_rw(OP_READ, rid, 0, [(a, 0, 7)])
            guest.push()
            await guest.wait(1)
        assert ring.stats.inline == 1
        struct.pack_into("<I", guest.ring, 0, guest.req_prod_pvt + guest.size + 3)
        os.write(guest.kick_w, b"!")
        await until(lambda: ring.dead, "the ring disconnected")

    serve_file(body, f"aio:{path}")


def test_a_barrier_between_requests_the_pass_serves(shm: Path) -> None:  # noqa: F811
    """The pass stops at the barrier (the Python path's), serves nothing past it until it
    is done, then goes on: all answered, the data in order."""
    need_pass()
    path = shm / "disk.img"
    path.write_bytes(bytes(MiB))

    async def body(guest: Guest, ring, vbd: VBD, drv) -> None:  # noqa: ANN001
        pages = [guest.grant(bytes([65 + i]) * PAGE) for i in range(3)]
        out = guest.grant()
        for rid, g in enumerate(pages):  # map them
            guest.put_rw(OP_WRITE, rid, 8 * rid, [(g, 0, 7)])
        guest.put_rw(OP_READ, 3, 0, [(out, 0, 7)])
        guest.push()
        await guest.wait(4)
        guest.put_rw(OP_WRITE, 10, 0, [(pages[1], 0, 7)])
        guest.put_rw(OP_BARRIER, 11, 0, [(pages[2], 0, 7)])
        guest.put_rw(OP_READ, 12, 0, [(out, 0, 7)])
        guest.push()
        got = await guest.wait(3)
        assert set(got.values()) == {(OP_WRITE, OKAY), (OP_BARRIER, OKAY), (OP_READ, OKAY)}
        assert bytes(guest.pages[out]) == b"C" * PAGE  # the barrier's data, before the read
        assert ring.stats.barriers == 1 and ring.stats.inline >= 2

    serve_file(body, f"aio:{path}")


def test_a_paused_disk_holds_what_the_pass_would_serve(shm: Path) -> None:  # noqa: F811
    need_pass()
    path = shm / "disk.img"
    path.write_bytes(data(8, MiB))

    async def body(guest: Guest, ring, vbd: VBD, drv) -> None:  # noqa: ANN001
        import asyncio
        a = guest.grant()
        guest.put_rw(OP_READ, 1, 0, [(a, 0, 7)])
        guest.push()
        await guest.wait(1)
        await vbd.pause()
        guest.put_rw(OP_READ, 2, 8, [(a, 0, 7)])
        guest.push()
        await asyncio.sleep(0.05)
        assert guest.responses() == []  # held while paused
        inline_before = ring.stats.inline
        await vbd.resume(open_stack(drv.engine, f"aio:{path}", writable=True))
        assert await guest.wait(1) == {2: (OP_READ, OKAY)}
        assert bytes(guest.pages[a]) == data(8, MiB)[PAGE:2 * PAGE]
        assert ring.stats.inline == inline_before  # (the held one went the Python way)

    serve_file(body, f"aio:{path}")


# ------------------------------------------------------------------ image formats
def test_a_vhd_chain_through_the_pass(monkeypatch: pytest.MonkeyPatch,
                                     shm: Path) -> None:  # noqa: F811
    """A dynamic VHD snapshot over a full VHD parent (its first block its own, whole,
    the rest its parent's), written and read by the workload
    with the pass on and off: the same guest view, and the same disk when the chain is
    read back; the leaf checks clean."""
    need_pass()
    start = data(9, 4 * MiB)
    images = {}
    for on in (False, True):
        d = shm / ("on" if on else "off")
        d.mkdir()
        base, leaf = d / "base.vhd", d / "leaf.vhd"
        create(str(base), len(start))
        with Chain.open(f"vhd:{base}", writable=True) as c:
            c.pwrite(0, start)
        snapshot(str(leaf), str(base))
        # The leaf holds its first block whole (the pass reads and writes it there); the
        # others are the parent's until a write makes them the leaf's, in part (then
        # the Python path's: it merges the two).
        with Chain.open(f"vhd:{leaf}", writable=True) as c:
            c.pwrite(0, start[:2 * MiB])
        model, rstats, _ = run_workload(monkeypatch, on, f"vhd:{leaf}", start, seed=4,
                                        batches=8)
        # (qemu's vpc driver reads no differencing VHD: the chain is read by ours)
        assert vhd_check.check(str(leaf)).errno == 0
        with Chain.open(f"vhd:{leaf}") as c:
            assert c.pread(0, len(model)) == model
        images[on] = (model, rstats)
    assert images[True][0] == images[False][0]
    assert images[True][1]["inline"] > 0


def test_a_qcow2_overlay_made_by_qemu_through_the_pass(monkeypatch: pytest.MonkeyPatch,
                                                      shm: Path) -> None:  # noqa: F811
    """A qcow2 overlay (qemu-img create -b, some clusters written by qemu-io) over a qcow2
    base: the workload with the pass on and off sees the same disk, qemu-img check finds
    the overlay clean and compare finds it equal to the model."""
    need_pass()
    raw = shm / "base.raw"
    start = bytearray(data(10, 4 * MiB))
    raw.write_bytes(start)
    results = {}
    for on in (False, True):
        d = shm / ("on" if on else "off")
        d.mkdir()
        base, top = d / "base.qcow2", d / "top.qcow2"
        qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(base))
        qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
        if shutil.which("qemu-io") is None:
            pytest.skip("qemu-io not installed")
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 512k", str(top)],
                       check=True, capture_output=True)
        model0 = bytearray(start)
        model0[MiB:MiB + 512 * 1024] = b"\x5a" * (512 * 1024)
        model, rstats, _ = run_workload(monkeypatch, on, f"qcow2:{top}", bytes(model0),
                                        seed=6, batches=8)
        qemu_img("check", "-f", "qcow2", str(top))
        expect = d / "model.raw"
        expect.write_bytes(bytes(model))
        qemu_compare(str(top), expect, "qcow2")
        results[on] = (model, rstats)
    assert results[True][0] == results[False][0]
    assert results[True][1]["inline"] > 0


def test_a_file_in_the_page_cache_takes_whole_pages_from_the_pass(
        disk: Path) -> None:  # noqa: F811
    """A raw file on disk opened without O_DIRECT (tap-ctl create -D): the pass reads what
    the page cache holds and writes whole pages into it; a write of part of a page is the
    Python path's (a worker). Both land."""
    need_pass()
    path = disk / "disk.img"
    start = data(12, 2 * MiB)
    path.write_bytes(start)

    async def body(guest: Guest, ring, vbd: VBD, drv) -> None:  # noqa: ANN001
        a, b = guest.grant(b"p" * PAGE), guest.grant()
        guest.put_rw(OP_READ, 1, 0, [(b, 0, 7)])  # maps them (the Python path's)
        guest.put_rw(OP_WRITE, 2, 0, [(a, 0, 7)])
        guest.push()
        await guest.wait(2)
        engine = drv.engine
        cases = [  # (sector, segment, the pass's)
            (16, (a, 0, 7), True),  # a whole page at a page offset
            (33, (a, 0, 7), False),  # a page's worth, not at a page offset
            (48, (a, 0, 3), False),  # half a page
        ]
        for rid, (sector, seg, inline_expected) in enumerate(cases, 10):
            before, writes_before = ring.stats.inline, engine.inline_writes
            guest.put_rw(OP_WRITE, rid, sector, [seg])
            guest.push()
            assert await guest.wait(1) == {rid: (OP_WRITE, OKAY)}
            assert (ring.stats.inline - before == 1) is inline_expected
            if inline_expected:
                assert engine.inline_writes == writes_before + 1
        guest.put_rw(OP_READ, 20, 16, [(b, 0, 7)])
        guest.push()
        assert await guest.wait(1) == {20: (OP_READ, OKAY)}
        assert bytes(guest.pages[b]) == b"p" * PAGE

    serve_file(body, f"aio:{path}", direct=False)
    want = bytearray(start)
    for sector, n in ((0, PAGE), (16, PAGE), (33, PAGE), (48, PAGE // 2)):
        want[sector * SECTOR:sector * SECTOR + n] = b"p" * n
    assert path.read_bytes() == bytes(want)


class SocketBell:
    """An event channel stand-in the compiled pass can ring itself: a socket whose
    readable bytes are pending ports (u32 each), which the pass reads and writes back
    (unmasks, arriving at the other end), and on which the notify ioctl fails (ENOTTY),
    as a device gone bad would."""

    PORT = 33

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.ours.setblocking(False)
        self.notified = 0

    def fileno(self) -> int:
        return self.ours.fileno()

    def clear(self) -> None:
        with contextlib.suppress(BlockingIOError):
            data = self.ours.recv(4096)
            self.ours.send(data[: len(data) - len(data) % 4])

    def notify(self) -> None:
        self.notified += 1

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()

    def doorbell(self) -> tuple[int, int] | None:
        return self.ours.fileno(), self.PORT

    def kick(self) -> None:
        self.theirs.send(struct.pack("=I", self.PORT))


def test_the_pass_clears_and_rings_the_channel_itself(
        shm: Path, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    """With the device's doorbell the pass consumes the pending port and unmasks it (the
    port comes back at the other end), and notifies by the device's ioctl: one that
    fails fails this ring only, with a log line, after its response was published."""
    need_pass()
    path = shm / "disk.img"
    path.write_bytes(data(13, MiB))
    bell = SocketBell()

    class BellDevices(Devices):
        def bind(self, domid: int, remote_port: int) -> SocketBell:  # type: ignore[override]
            return bell

    async def body(engine) -> None:  # noqa: ANN001
        vbd = VBD(open_stack(engine, f"aio:{path}", writable=True))
        guest = Guest(X64, 0)
        guest.kick_w = os.open(os.devnull, os.O_WRONLY)  # (the bell carries the events)
        ring = connect(vbd, BellDevices(guest), domid=guest.domid, devid=51712,
                       grefs=guest.ring_grefs, order=0, proto=PROTO_X86_64, port=9,
                       persistent=True)
        try:
            a = guest.grant()
            guest.put_rw(OP_READ, 1, 0, [(a, 0, 7)])  # maps the page: the Python path's
            guest.push()
            bell.kick()
            assert await guest.wait(1) == {1: (OP_READ, OKAY)}
            assert bell.theirs.recv(64) == struct.pack("=I", SocketBell.PORT)  # unmasked
            assert bell.notified == 1 and ring.stats.inline == 0  # (by the Python path)
            guest.put_rw(OP_READ, 2, 8, [(a, 0, 7)])  # the pass's: its ioctl fails
            guest.push()
            bell.kick()
            assert await guest.wait(1) == {2: (OP_READ, OKAY)}
            await until(lambda: ring.dead, "the ring disconnected")
            assert ring.dead and ring.stats.inline == 1 and bell.notified == 1
            assert bytes(guest.pages[a]) == data(13, MiB)[PAGE:2 * PAGE]
        finally:
            await ring.stop()
            await vbd.close()
            guest.close()

    with caplog.at_level("ERROR", logger="blktap.tapdisk"):
        with_engine(body)
    assert any("event channel" in r.getMessage() and "disconnecting" in r.getMessage()
               for r in caplog.records)
