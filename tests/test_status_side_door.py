"""Block status answered at once, and a handshake without a turn of the loop per reply.

- ``VBD.block_status_now``: the same runs as the awaited ``block_status`` for every range
  (unaligned ones, the disk's partial last sector, qcow2 over a raw backing file, a VHD
  chain), None for what the awaited path must hold, refuse or look up, and counted as
  the awaited path counts;
- NBD: block status requests taken by the data hook (no task, no reader wake-up) with
  answers equal to qemu-nbd's on the same image through libnbd, the dirty-bitmap context
  of a CBT log beside base:allocation, a paused disk held until resumed, bad requests
  still refused by the reader;
- ``Channel.send(now=True)``: the message leaves before the call returns, without
  yielding to the loop, and after what was posted before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blktap.io.threads import ThreadEngine
from blktap.tapdisk.drivers import open_stack
from blktap.tapdisk.drivers.log import LogDriver
from blktap.tapdisk.vbd import VBD
from blktap.transport.nbd.connection import FAIRNESS_BUDGET
from blktap.transport.sockio import Channel
from conftest import need, tool, with_engine
from nbd_helpers import serve
from test_cbt import spec_log
from test_fast_path import (
    DEADLINE,
    HookSpy,
    attach,
    exchange,
    nbd_served,
    req,
    settled,
    shm,
)

__all__ = ["shm"]  # the fixture, used by name

MiB = 1 << 20
SECTOR = 512
BLOCK_STATUS = 7
READ = 0
REQ_ONE = 1 << 3  # NBD_CMD_FLAG_REQ_ONE


def qemu_io(path: Path, fmt: str, *cmds: str) -> None:
    argv = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    subprocess.run([*argv, str(path)], check=True, capture_output=True)


def qcow2_over_raw(folder: Path) -> Path:
    """A qcow2 (data, zero clusters, a discarded range, holes) over a raw backing file
    with data of its own, 17 MiB and a half sector so that the last sector is partial
    for the raw base (qemu rounds the qcow2's own size up to a sector)."""
    base = folder / "base.raw"
    with open(base, "wb") as f:
        f.truncate(17 * MiB + 256)
    qemu_io(base, "raw", "write -P 0x11 1M 3M", "write -P 0x12 12M 64k")
    top = folder / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
                    str(top)], check=True)
    qemu_io(top, "qcow2", "write -P 0x21 2M 128k", "write -z 3M 1M", "write -P 0x22 8M 2M",
            "discard 9M 64k", "write -P 0x23 16M 512")
    return top


def vhd_chain(folder: Path) -> Path:
    base = folder / "base.vhd"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic",
                    str(base), "16M"], check=True)
    qemu_io(base, "vpc", "write -P 0x31 0 1M", "write -P 0x32 6M 512")
    top = folder / "top.vhd"
    subprocess.run([tool("vhd-util"), "snapshot", "-n", str(top), "-p", str(base)],
                   check=True)
    return top


def ranges(size: int, seed: int, count: int = 300) -> list[tuple[int, int]]:
    """Ranges of every shape: aligned, unaligned at either end, one byte, to the end."""
    rnd = random.Random(seed)
    out = [(0, size), (size - 1, 1), (size - SECTOR - 7, SECTOR + 7), (0, 1), (1, SECTOR)]
    for _ in range(count):
        off = rnd.randrange(size)
        if rnd.random() < 0.5:
            off -= off % SECTOR
        n = rnd.randrange(1, min(size - off, 4 * MiB) + 1)
        out.append((off, n))
    return out


@pytest.mark.parametrize("kind", ["qcow2", "vhd"])
def test_block_status_now_equals_block_status(shm: Path, kind: str) -> None:
    spec = f"qcow2:{qcow2_over_raw(shm)}" if kind == "qcow2" else f"vhd:{vhd_chain(shm)}"

    async def body(engine: ThreadEngine) -> None:
        drv = await engine.call(open_stack, engine, spec, writable=False)
        vbd = VBD(drv)
        try:
            await vbd.block_status(0, vbd.size)  # every layer's metadata in memory
            served = 0
            for off, n in ranges(vbd.size, seed=7):
                other = vbd.stats.other_reqs
                now = vbd.block_status_now(off, n)
                assert now is not None, (off, n)  # the metadata is cached: it can tell
                assert vbd.stats.other_reqs == other + 1
                awaited = await vbd.block_status(off, n)
                assert now == awaited, (off, n)
                assert sum(length for length, _ in now) == n
                served += 1
            assert served > 300
            # What the awaited path holds or refuses, the side door leaves to it.
            counted = vbd.stats.other_reqs
            for off, n in [(0, 0), (vbd.size, 1), (vbd.size - 1, 2), (-SECTOR, SECTOR)]:
                assert vbd.block_status_now(off, n) is None, (off, n)
            await vbd.pause()
            assert vbd.block_status_now(0, SECTOR) is None
            await vbd.resume(await engine.call(open_stack, engine, spec, writable=False))
            await vbd.block_status(0, vbd.size)
            counted = vbd.stats.other_reqs
            assert vbd.block_status_now(0, SECTOR) is not None
            assert vbd.stats.other_reqs == counted + 1
        finally:
            await vbd.close()
        assert vbd.block_status_now(0, SECTOR) is None  # closed
    with_engine(body)


def test_block_status_now_declines_cold_metadata(shm: Path) -> None:
    """A qcow2 whose L2 tables are not read yet: the side door declines (it never reads
    from the file) and the awaited path answers."""
    top = shm / "cold.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(top), "1G"], check=True)
    qemu_io(top, "qcow2", "write -P 0x41 0 64k", "write -P 0x42 768M 64k")

    async def body(engine: ThreadEngine) -> None:
        vbd = VBD(await engine.call(open_stack, engine, f"qcow2:{top}", writable=False))
        try:
            far = 768 * MiB
            assert vbd.block_status_now(far, 128 << 10) is None
            assert await vbd.block_status(far, 128 << 10) == [(64 << 10, 0), (64 << 10, 3)]
            assert vbd.block_status_now(far, 128 << 10) == [(64 << 10, 0), (64 << 10, 3)]
        finally:
            await vbd.close()
    with_engine(body)


def status_request(handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    return req(BLOCK_STATUS, offset, length, handle, flags)


def parse_status(payload: bytes) -> dict[int, list[tuple[int, int]]]:
    """A block status reply's chunks (as nbd_helpers gathers them): context id -> runs."""
    out: dict[int, list[tuple[int, int]]] = {}
    ctx, runs = struct.unpack_from(">I", payload)[0], []
    # One context per reply here, so the payload is one id and its runs.
    for i in range(4, len(payload), 8):
        runs.append(struct.unpack_from(">II", payload, i))
    out[ctx] = runs
    return out


def test_nbd_status_pipeline_served_by_the_hook(shm: Path) -> None:
    """A pipeline of block status requests (with reads among them) is answered from the
    data hook, each answer equal to the awaited path's; then a paused disk holds one
    until it is resumed, and bad ones still get their errors."""
    top = qcow2_over_raw(shm)
    sock = shm / "s.sock"

    async def body(engine: ThreadEngine) -> None:
        async with nbd_served(engine, f"qcow2:{top}", sock) as (server, vbd):
            size = vbd.size
            await vbd.block_status(0, size)
            w, conn = await attach(server, sock)
            spy = HookSpy(conn)
            stream, expect, reads = b"", {}, {}
            for h, (off, n) in enumerate(ranges(size, seed=11, count=40), start=1):
                if h % 5 == 0:
                    n = min(n, 64 << 10)
                    stream += req(READ, off, n, h)
                    reads[h] = (off, n)
                    continue
                stream += status_request(h, off, n, flags=REQ_ONE if h % 7 == 0 else 0)
                want = await vbd.block_status(off, n)
                expect[h] = want[:1] if h % 7 == 0 else want
            # Fewer than one hook call takes before it lets the reader have a turn.
            assert len(expect) + len(reads) < FAIRNESS_BUDGET
            got = await exchange(w, stream, len(expect) + len(reads), reads)
            for h, runs in expect.items():
                error, payload = got[h]
                assert error == 0
                assert parse_status(payload) == {1: runs}, h
            assert spy.reader_took == 0, "the reader was woken for block status"
            assert spy.hook_took == len(expect) + len(reads)
            await settled(conn, vbd)

            # Paused: the hook declines, the reader's task waits for the resume.
            await vbd.pause()
            w.sock.sendall(status_request(900, 0, SECTOR))
            await asyncio.sleep(0.2)
            w.sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                w.sock.recv(1)
            w.sock.settimeout(DEADLINE)
            await vbd.resume(await engine.call(open_stack, engine, f"qcow2:{top}",
                                               writable=True))
            handle, error, payload = await asyncio.to_thread(w.reply)
            assert (handle, error) == (900, 0)
            assert parse_status(payload) == {1: await vbd.block_status(0, SECTOR)}

            # Bad requests: answered with errors by the reader, the connection goes on.
            for h, (off, n) in [(901, (0, 0)), (902, (size, SECTOR)), (903, (size - 1, 2))]:
                w.sock.sendall(status_request(h, off, n))
                handle, error, _ = await asyncio.to_thread(w.reply)
                assert (handle, error) == (h, 22)  # EINVAL
            w.sock.sendall(status_request(904, 0, size))
            handle, error, payload = await asyncio.to_thread(w.reply)
            assert (handle, error) == (904, 0)
            assert parse_status(payload) == {1: await vbd.block_status(0, size)}
            await settled(conn, vbd)
    with_engine(body)


def status_chunks(w) -> list[tuple[int, tuple[int, list[tuple[int, int]]]]]:  # noqa: ANN001
    """The chunks of one structured block status reply: (handle, (context id, runs))."""
    out = []
    while True:
        magic, flags, kind, handle, length = struct.unpack(">IHHQI", w.recv(20))
        assert magic == 0x668E33EF and kind == 5, (hex(magic), kind)
        payload = w.recv(length)
        words = struct.unpack(f">{length // 4}I", payload)
        out.append((handle, (words[0], list(zip(words[1::2], words[2::2], strict=True)))))
        if flags & 1:
            return out


def nbd_map(uri: str, context: str = "base:allocation") -> list[dict]:
    import json  # noqa: PLC0415

    r = subprocess.run(["nbdinfo", "--json", f"--map={context}", uri], capture_output=True,
                       text=True, timeout=60, check=True)
    return json.loads(r.stdout)


@contextlib.contextmanager
def qemu_nbd_map(image: Path, sock: Path) -> Iterator[list[dict]]:
    """qemu-nbd serving ``image`` (qcow2, read-only) on ``sock`` while the block runs;
    nbdinfo's map of it."""
    qemu = subprocess.Popen(["qemu-nbd", "-r", "-f", "qcow2", "-k", str(sock), "-t",
                             str(image)], stderr=subprocess.PIPE)
    try:
        deadline = DEADLINE
        while not sock.exists() and deadline > 0:
            subprocess.run(["sleep", "0.05"])
            deadline -= 0.05
        yield nbd_map(f"nbd+unix:///?socket={sock}")
    finally:
        qemu.terminate()
        qemu.wait(timeout=30)


def test_nbd_map_equals_qemu_nbds(tmp_path: Path) -> None:
    """nbdinfo --map (libnbd, many block status requests) sees the same map from us as
    from qemu-nbd on the same image."""
    need("nbdinfo")
    need("qemu-nbd")
    top = qcow2_over_raw(tmp_path)
    qsock = tmp_path / "q.sock"
    with qemu_nbd_map(top, qsock) as theirs:
        with serve(f"qcow2:{top}", tmp_path, "--read-only") as srv:
            ours = nbd_map(srv.uri)

    def flat(rows: list[dict]) -> list[tuple[int, int, int]]:
        return [(r["offset"], r["length"], r["type"]) for r in rows]
    # qemu-nbd reports the qcow2's own size (rounded up to a sector), as we do.
    assert flat(ours) == flat(theirs)


def test_a_deep_chain_maps_and_reads_as_its_base(tmp_path: Path) -> None:
    """A base written by qemu-io under 29 empty snapshots: nbdinfo --map of the leaf
    served by us is the base's map (block status jumps over the empty layers, as reads
    do), and qemu-img compare reads the same bytes through both."""
    need("nbdinfo")
    need("qemu-img")
    top = vhd_chain(tmp_path)  # base (qemu-io's data) <- top
    for i in range(28):
        leaf = tmp_path / f"l{i}.vhd"
        subprocess.run([tool("vhd-util"), "snapshot", "-e", "-n", str(leaf), "-p", str(top)],
                       check=True)
        top = leaf
    with serve(f"vhd:{top}", tmp_path, "--read-only") as srv:
        deep = nbd_map(srv.uri)
        other = tmp_path / "base-server"
        other.mkdir()
        with serve(f"vhd:{tmp_path / 'base.vhd'}", other, "--read-only") as base:
            shallow = nbd_map(base.uri)
            r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", srv.uri,
                                base.uri], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr

    def flat(rows: list[dict]) -> list[tuple[int, int, int]]:
        return [(r["offset"], r["length"], r["type"]) for r in rows]
    assert flat(deep) == flat(shallow)
    assert any(r["type"] == 0 for r in deep) and any(r["type"] != 0 for r in deep), deep


def test_a_disk_with_a_cbt_log_maps_and_reads_as_without(tmp_path: Path) -> None:
    """The changed-block log filter passes the status of the disk below on (status_now):
    served with --cbt-log, nbdinfo --map sees qemu-nbd's map of the image, and qemu-img
    compare over NBD (whose reads of holes come back as hole chunks) sees its data."""
    need("nbdinfo")
    need("qemu-nbd")
    top = qcow2_over_raw(tmp_path)
    qsock = tmp_path / "q.sock"
    log = tmp_path / "top.cbtlog"
    subprocess.run([tool("cbt-util"), "create", "-n", str(log), "-s", "18"], check=True)
    with qemu_nbd_map(top, qsock) as theirs:
        with serve(f"qcow2:{top}", tmp_path, "--cbt-log", str(log)) as srv:
            ours = nbd_map(srv.uri)
            subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", srv.uri,
                            str(top)], check=True, capture_output=True, timeout=120)
    assert [(r["offset"], r["length"], r["type"]) for r in ours] == \
        [(r["offset"], r["length"], r["type"]) for r in theirs]


def test_dirty_bitmap_beside_allocation_at_once(shm: Path) -> None:
    """Both contexts (base:allocation and a CBT log's qemu:dirty-bitmap:) answered in one
    reply from the hook, equal to what the awaited path says."""
    size = 16 * MiB
    disk = shm / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(size)
    log = shm / "disk.cbtlog"
    log.write_bytes(spec_log(size))
    sock = shm / "d.sock"

    async def body(engine: ThreadEngine) -> None:
        below = await engine.call(open_stack, engine, f"aio:{disk}", writable=True)
        logged = await engine.call(LogDriver.open, engine, str(log), below)
        async with nbd_served(engine, logged, sock) as (server, vbd):
            await vbd.write(3 * MiB, memoryview(b"\x55" * (64 << 10)))
            bitmap = vbd.dirty_bitmaps()[0]

            def go(w) -> None:  # noqa: ANN001 - a Wire
                w.greet()
                w.option(8)
                assert w.option_reply()[1] == 1
                w.structured = True
                qs = [b"base:allocation", f"qemu:dirty-bitmap:{bitmap}".encode()]
                data = struct.pack(">I", 0) + struct.pack(">I", len(qs))
                for q in qs:
                    data += struct.pack(">I", len(q)) + q
                w.option(10, data)
                assert [k for k, _ in w.replies_until_final()] == [4, 4, 1]
                w.option(7, struct.pack(">IH", 0, 0))
                assert w.replies_until_final()[-1][0] == 1
            w, conn = await attach(server, sock, go=go)
            spy = HookSpy(conn)
            w.sock.sendall(status_request(5, 2 * MiB, 4 * MiB))
            chunks = await asyncio.to_thread(status_chunks, w)
            assert all(handle == 5 for handle, _ in chunks)
            alloc = await vbd.block_status(2 * MiB, 4 * MiB)
            dirty = await vbd.dirty_status(bitmap, 2 * MiB, 4 * MiB)
            # One chunk per context, in whatever order (the protocol allows any).
            assert dict(runs for _, runs in chunks) == {1: alloc, 2: dirty}
            assert len(chunks) == 2
            assert any(flags for _, flags in dirty)
            assert (spy.hook_took, spy.reader_took, len(spy.calls)) == (1, 0, 1), spy.calls
            await settled(conn, vbd)
    with_engine(body)


def test_send_at_once_does_not_yield_and_keeps_order() -> None:
    async def body() -> None:
        a, b = socket.socketpair()
        try:
            ch = Channel(a)
            turns: list[str] = []
            asyncio.get_running_loop().call_soon(turns.append, "ran")
            await ch.send([b"hello ", memoryview(b"world")], now=True)
            assert turns == []  # no turn of the loop
            assert b.recv(64) == b"hello world"
            # Something posted and not yet flushed goes first.
            done: list[object] = []
            ch.post([b"first;"], lambda exc, arg: done.append(exc))
            await ch.send([b"second"], now=True)
            assert done == [None]
            b.settimeout(DEADLINE)
            got = b""
            while len(got) < len(b"first;second"):
                got += b.recv(64)
            assert got == b"first;second"
            ch.close()
        finally:
            a.close()
            b.close()
    asyncio.run(body())
