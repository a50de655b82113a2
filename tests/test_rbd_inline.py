"""The NBD transport's compiled pass to a disk that answers later (``AsyncPass``,
``transport/nbd/_inline_async.h``), against a real, throwaway Ceph (tests/ceph_cluster.py):
plain reads and writes issued to librbd from C, answered from C when the rbd driver's
reaper hands their completions back. Each test runs the server in-process, so that what
went through the pass is counted (VBD.issued_inline), and compares with the Python path
(BLKTAP_INLINE=0) where the answers must be the same."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import logging
import random
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

import pytest

from blktap.io.polling import PollingSelector
from blktap.io.threads import ThreadEngine
from blktap.tapdisk.driver import Driver
from blktap.tapdisk.drivers import open_stack
from blktap.tapdisk.drivers.rbd import RbdDriver
from blktap.tapdisk.vbd import VBD
from blktap.transport.nbd import inline
from blktap.transport.nbd.connection import INLINE_MISSES, Connection
from blktap.transport.nbd.server import NbdServer
from nbd_helpers import Wire
from test_fast_path import (
    DISC,
    FLUSH,
    LOOPS,
    READ,
    STATUS,
    TRIM,
    WRITE,
    CountedReceives,
    arun,
    attach,
    check_burst,
    collect,
    exchange,
    mixed_burst,
    nbd_served,
    outstanding,
    req,
    settled,
    until,
)
from test_rbd import new_image

MiB = 1 << 20
KiB = 1 << 10
DISK = 32 * MiB


@pytest.fixture(autouse=True)
def built() -> None:
    if not inline.available():
        pytest.skip("the compiled inline path is not built here (no C compiler)")


def count_issued(vbd: VBD) -> dict[str, int]:
    """Counters of what the compiled pass issues on ``vbd`` from now, and of what failed
    there (served again by the Python path)."""
    seen = {"issued": 0, "failed": 0}
    issued, finished = vbd.issued_inline, vbd.finished_inline

    def counting_issued(count: int) -> None:
        seen["issued"] += count
        issued(count)

    def counting_finished(reads: int, read_bytes: int, writes: int, write_bytes: int,
                          failed: int = 0, read_times=None, write_times=None) -> None:
        seen["failed"] += failed
        finished(reads, read_bytes, writes, write_bytes, failed, read_times, write_times)
    vbd.issued_inline = counting_issued  # type: ignore[method-assign]
    vbd.finished_inline = counting_finished  # type: ignore[method-assign]
    return seen


class Served(NamedTuple):
    server: NbdServer
    vbd: VBD
    seen: dict[str, int]  # count_issued's
    w: Wire  # a raw client through the handshake
    conn: Connection  # its connection in the server


@contextlib.asynccontextmanager
async def served(engine: ThreadEngine, spec: str | Driver, sock: Path, *,
                 structured: bool = True) -> AsyncIterator[Served]:
    """A server of ``spec`` (or of a driver opened already) counting what the pass
    issues, and one raw client of it."""
    async with nbd_served(engine, spec, sock) as (server, vbd):
        seen = count_issued(vbd)
        w, conn = await attach(server, sock, structured=structured)
        yield Served(server, vbd, seen, w, conn)


def filled_image(cluster) -> tuple[str, bytes]:
    """A new image whose every byte is known (random, written through qemu's peer: the
    rbd CLI)."""
    name = new_image(cluster, DISK)
    content = random.Random(7).randbytes(DISK)
    path = cluster.root / f"{name}.raw"
    path.write_bytes(content)
    try:
        cluster.rbd("import", "--no-progress", str(path), f"rbd/{name}-full")
    finally:
        path.unlink()
    return f"{name}-full", content


async def read_back(vbd: VBD, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    await vbd.read(offset, memoryview(buf))
    return bytes(buf)


@pytest.mark.parametrize("loop", ["asyncio", "polling"])
@pytest.mark.parametrize("structured", [True, False])
def test_a_mixed_burst_gets_the_answers_the_python_path_gives(
        ceph_cluster, tmp_path, monkeypatch: pytest.MonkeyPatch, structured: bool,
        loop: str) -> None:
    """Every kind of request at once (reads and writes of 512 B to 300 KiB, FUA, DF, the
    other commands, invalid ones): with the pass on, the plain reads and writes go
    through it, the rest through the Python path, and every answer is the Python
    path's: data read as the image holds it, writes landed, errors as they were."""
    name, content = filled_image(ceph_cluster)
    spec = ceph_cluster.spec(name)
    sock = tmp_path / "s.sock"

    def run(mode: str, rounds: int = 3) -> tuple[dict[str, int], list[dict]]:
        monkeypatch.setenv("BLKTAP_INLINE", mode)

        async def body(engine: ThreadEngine) -> tuple[dict[str, int], list[dict]]:
            answers = []
            async with served(engine, spec, sock,
                              structured=structured) as (server, vbd, seen, w, conn):
                for r in range(rounds):
                    reqs, reads, errors, writes, status = mixed_burst(DISK, 51 + r,
                                                                      (r + 1) << 24)
                    count = len(reads) + len(errors) + len(writes)
                    got = await exchange(w, b"".join(reqs), count, reads)
                    if structured:
                        check_burst(got, reads, errors, writes, status, content)
                    answers.append(got)
                    for off, payload in writes.values():
                        assert await read_back(vbd, off, len(payload)) == payload, off
                await settled(conn, vbd)
                assert outstanding(server.pool) == 0
                # Every read and write is timed once, whichever path answered it.
                vbd.sync_links()  # (a link's counts, as stats_dict has them)
                st, lat = vbd.stats, vbd.latency
                assert lat.read.count == st.read_reqs + st.read_errors > 0
                assert lat.write.count == st.write_reqs + st.write_errors > 0
                assert lat.read.sum > 0 and lat.write.sum > 0
                return seen, answers
        return arun(body, loop_factory=LOOPS[loop])  # type: ignore[no-any-return]

    off, off_answers = run("0")
    on, on_answers = run("1")
    assert on_answers == off_answers
    assert off["issued"] == 0
    assert on["issued"] > 0 and on["failed"] == 0, on
    if not structured:  # (check_burst checked the structured answers)
        for got in on_answers:
            assert sum(1 for error, data in got.values() if not error and data) > 60


@pytest.mark.parametrize("loop", ["asyncio", "polling"])
def test_a_client_that_reads_no_replies_gets_them_all_later(
        ceph_cluster, tmp_path, loop: str) -> None:
    """More replies than the socket holds, while the client reads none: those the
    socket does not take join the queue; once it reads, every reply is there, whole and
    in one piece each (no two interleaved)."""
    name, content = filled_image(ceph_cluster)
    spec = ceph_cluster.spec(name)
    sock = tmp_path / "s.sock"
    n, length = 96, 128 * KiB

    async def body(engine: ThreadEngine) -> None:
        async with served(engine, spec, sock) as (server, vbd, seen, w, conn):
            w.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
            reads = {h: ((h * 7919 % 200) * length, length) for h in range(n)}
            w.sock.sendall(b"".join(req(READ, off, ln, handle=h)
                                    for h, (off, ln) in reads.items()))
            await until(lambda: seen["issued"] > 0 and not conn._async.issued,  # type: ignore
                        "the pass's reads done")
            await until(lambda: conn.ch.stalled, "the socket full")
            got = await asyncio.to_thread(collect, w, n, reads)
            for h, (off, ln) in reads.items():
                assert got[h] == (0, content[off : off + ln]), h
            await settled(conn, vbd)
            assert outstanding(server.pool) == 0
    arun(body, loop_factory=LOOPS[loop])


@pytest.mark.parametrize("loop", ["asyncio", "polling"])
def test_a_client_gone_mid_request_leaves_the_server_serving(
        ceph_cluster, tmp_path, loop: str) -> None:
    """A client that sends reads and writes and hangs up at once: what the pass issued
    completes into nothing (no reply, no leak), the disk drains, and the next client is
    served as if nothing happened."""
    name, content = filled_image(ceph_cluster)
    spec = ceph_cluster.spec(name)
    sock = tmp_path / "s.sock"

    async def body(engine: ThreadEngine) -> None:
        async with served(engine, spec, sock) as (server, vbd, seen, w, conn):
            burst = [req(READ, i * 64 * KiB, 64 * KiB, handle=i) for i in range(24)]
            burst += [req(WRITE, 16 * MiB + i * 4 * KiB, 4 * KiB, handle=100 + i,
                          payload=bytes([i]) * 4 * KiB) for i in range(8)]
            w.sock.sendall(b"".join(burst))
            await until(lambda: seen["issued"] > 0, "the pass issued")
            with contextlib.suppress(OSError):
                w.sock.shutdown(socket.SHUT_RDWR)
            w.close()
            await until(lambda: conn not in server._connections, "the connection gone")
            await until(lambda: vbd.stats.in_flight == 0, "the disk drained")
            # Another client: served, and reads what the vanished one's writes left
            # (written or not: each sector is either the old bytes or the new).
            w2, conn2 = await attach(server, sock)
            reads = {1: (0, 256 * KiB), 2: (16 * MiB, 32 * KiB)}
            got = await exchange(w2, b"".join(req(READ, off, ln, handle=h)
                                              for h, (off, ln) in reads.items()), 2, reads)
            assert got[1] == (0, content[: 256 * KiB])
            for i in range(8):
                piece = got[2][1][i * 4 * KiB : (i + 1) * 4 * KiB]
                old = content[16 * MiB + i * 4 * KiB :][: 4 * KiB]
                assert piece in (old, bytes([i]) * 4 * KiB), i
            await settled(conn2, vbd)
            assert outstanding(server.pool) == 0
    arun(body, loop_factory=LOOPS[loop])


@pytest.mark.parametrize("loop", ["asyncio", "polling"])
def test_pause_waits_for_what_the_pass_issued(
        ceph_cluster, tmp_path, loop: str) -> None:
    """A pause asked while the pass's writes are in flight returns only once they are
    done (and answered); nothing is issued to the paused disk."""
    name = new_image(ceph_cluster, DISK)
    spec = ceph_cluster.spec(name)
    sock = tmp_path / "s.sock"

    async def body(engine: ThreadEngine) -> None:
        async with served(engine, spec, sock) as (server, vbd, seen, w, conn):
            writes = {h: (h * 64 * KiB, bytes([h % 251 + 1]) * 64 * KiB) for h in range(32)}
            w.sock.sendall(b"".join(req(WRITE, off, len(pl), handle=h, payload=pl)
                                    for h, (off, pl) in writes.items()))
            replies = asyncio.create_task(asyncio.to_thread(collect, w, len(writes), {}))
            await until(lambda: seen["issued"] > 0, "the pass issued")
            await vbd.pause()
            assert vbd.stats.in_flight == 0
            assert vbd.inline_async(inline.reap_async) is None
            got = await replies
            assert all(got[h] == (0, b"") for h in writes), got
            drv = await engine.call(open_stack, engine, spec, writable=True)
            await vbd.resume(drv)
            for off, payload in writes.values():
                assert await read_back(vbd, off, len(payload)) == payload, off
            await settled(conn, vbd)
    arun(body, loop_factory=LOOPS[loop])


@pytest.mark.parametrize("loop", ["asyncio", "polling"])
def test_requests_that_fail_in_the_pass_are_retried_then_answered(
        ceph_cluster, tmp_path, loop: str) -> None:
    """The OSD frozen: what the pass issued times out in librbd (rados_osd_op_timeout),
    goes back to the Python path, which retries it until the VBD's timeout and answers
    EIO; the OSD thawed, the same requests succeed through the pass. On the polling
    loop the connection is linked first (served in the loop's wait): the failed requests
    hand it back to the Python path all the same."""
    name, content = filled_image(ceph_cluster)
    spec = ceph_cluster.spec(name) + ":rados_osd_op_timeout=1"
    sock = tmp_path / "s.sock"

    async def body(engine: ThreadEngine) -> None:
        async with served(engine, spec, sock) as (server, vbd, seen, w, conn):
            vbd.timeout = 2.5
            reads = {1: (4 * MiB, 64 * KiB)}
            stream = req(READ, 4 * MiB, 64 * KiB, handle=1) + \
                req(WRITE, 8 * MiB, 4 * KiB, handle=2, payload=b"w" * 4 * KiB)
            if loop == "polling":
                got = await exchange(w, req(READ, 0, 4 * KiB, handle=9), 1, {9: (0, 4 * KiB)})
                assert got[9] == (0, content[: 4 * KiB])
                await until(lambda: linked(conn), "the pass linked")
            vbd.sync_links()
            base = dict(seen)
            ceph_cluster.pause_osd()
            try:
                got = await exchange(w, stream, 2, reads)
            finally:
                ceph_cluster.resume_osd()
            assert (seen["issued"] - base["issued"], seen["failed"]) == (2, 2), seen
            assert got[1][0] == got[2][0] == 5, got  # NBD's EIO
            assert vbd.stats.retries > 0
            got = await exchange(w, stream, 2, reads)
            assert got[1] == (0, content[4 * MiB : 4 * MiB + 64 * KiB])
            assert got[2] == (0, b"")
            vbd.sync_links()
            assert (seen["issued"] - base["issued"], seen["failed"]) == (4, 2), seen
            await settled(conn, vbd)
            assert outstanding(server.pool) == 0
    arun(body, loop_factory=LOOPS[loop])


def test_large_writes_are_received_into_the_pass(ceph_cluster, tmp_path) -> None:
    """Writes whose payload comes after the reader has parsed their header (1 MiB, sent
    in pieces): received straight into a slot and issued from there, answered, and on
    the disk; a write of more than the pass takes goes the Python path, as before."""
    name = new_image(ceph_cluster, DISK)
    sock = tmp_path / "s.sock"

    async def body(engine: ThreadEngine) -> None:
        async with served(engine, ceph_cluster.spec(name), sock) as (server, vbd, seen, w, conn):
            writes = {h: (h * MiB, random.Random(h).randbytes(MiB)) for h in range(1, 5)}
            writes[9] = (8 * MiB, random.Random(9).randbytes(2 * MiB))  # > MAX_LENGTH
            stream = b"".join(req(WRITE, off, len(pl), handle=h, payload=pl)
                              for h, (off, pl) in writes.items())
            pieces = [stream[i : i + 96 * KiB] for i in range(0, len(stream), 96 * KiB)]
            got = await exchange(w, pieces, len(writes), {}, pause=0.002)
            assert all(got[h] == (0, b"") for h in writes), got
            assert seen["issued"] == 4, seen
            for off, payload in writes.values():
                assert await read_back(vbd, off, len(payload)) == payload, off
            await settled(conn, vbd)
            assert outstanding(server.pool) == 0
    arun(body)


@pytest.mark.parametrize("loop", ["asyncio", "polling"])
def test_a_large_writes_payload_is_received_by_the_readiness_callback(
        ceph_cluster, tmp_path, monkeypatch: pytest.MonkeyPatch, loop: str) -> None:
    """The data hook takes a large write's header with the first piece of its payload;
    the channel's readiness callback receives the rest straight into the pass's slot
    (Channel.receive_direct) and it is issued from there: no reader receives a payload,
    however the stream is cut, and the writes land. (The Python path's way: the link,
    which the polling loop would otherwise make, is off; the link's own way is
    test_a_connection_is_served_in_the_wait's.)"""
    monkeypatch.setenv("BLKTAP_INLINE_LINK", "0")
    name = new_image(ceph_cluster, DISK)
    sock = tmp_path / "s.sock"

    async def body(engine: ThreadEngine) -> None:
        async with served(engine, ceph_cluster.spec(name), sock) as (server, vbd, seen, w, conn):
            await exchange(w, req(READ, 0, 4 * KiB, handle=1), 1, {1: (0, 4 * KiB)})
            by = {"reader": 0, "callback": 0}
            reader_way, issue = conn._receive_for_pass, conn._issue_received

            async def counted_reader(*args):  # noqa: ANN002, ANN202
                by["reader"] += 1
                return await reader_way(*args)

            def counted_issue(*args) -> None:  # noqa: ANN002
                by["callback"] += 1
                issue(*args)
            conn._receive_for_pass = counted_reader  # type: ignore[method-assign]
            conn._issue_received = counted_issue  # type: ignore[method-assign]
            writes = {h: (h * MiB, random.Random(h).randbytes(MiB)) for h in range(2, 8)}
            stream = b"".join(req(WRITE, off, len(pl), handle=h, payload=pl)
                              for h, (off, pl) in writes.items())
            cut = 0
            pieces = []
            for size in itertools.cycle((100 * KiB, 7, 33 * KiB, 250 * KiB)):
                if cut >= len(stream):
                    break
                pieces.append(stream[cut : cut + size])
                cut += size
            recvs: list[int] = []
            conn.ch.sock = CountedReceives(conn.ch.sock, recvs)  # type: ignore[assignment]
            got = await exchange(w, pieces, len(writes), {}, pause=0.002)
            assert all(got[h] == (0, b"") for h in writes), got
            assert by == {"reader": 0, "callback": len(writes)}, by
            if loop == "asyncio":  # every byte through the channel's own receives
                assert sum(recvs) == len(stream)
            else:  # the payloads' rest received in the loop's wait, into the slots
                assert sum(recvs) < len(stream) - len(writes) * 256 * KiB, sum(recvs)
            assert seen["issued"] == 1 + len(writes), seen
            for off, payload in writes.values():
                assert await read_back(vbd, off, len(payload)) == payload, off
            await settled(conn, vbd)
            assert outstanding(server.pool) == 0 and server.pool.budget.used == 0
    arun(body, loop_factory=LOOPS[loop])


@pytest.mark.parametrize("loop", ["asyncio", "polling"])
def test_a_pause_while_a_payload_comes_leaves_it_to_the_python_path(
        ceph_cluster, tmp_path, loop: str) -> None:
    """The disk paused between a large write's header and the end of its payload: the
    pass does not issue it to the paused disk; the Python path holds it until the disk
    resumes, then writes it and answers."""
    name = new_image(ceph_cluster, DISK)
    spec = ceph_cluster.spec(name)
    sock = tmp_path / "s.sock"

    async def body(engine: ThreadEngine) -> None:
        async with served(engine, spec, sock) as (server, vbd, seen, w, conn):
            # A read first, so that the connection has its pass.
            await exchange(w, req(READ, 0, 4 * KiB, handle=1), 1, {1: (0, 4 * KiB)})
            payload = random.Random(3).randbytes(MiB)
            stream = req(WRITE, 2 * MiB, MiB, handle=2, payload=payload)
            await asyncio.to_thread(w.sock.sendall, stream[: 300 * KiB])
            await until(lambda: conn._async.reserved == 1, "a slot lent for the payload")
            await vbd.pause()
            reply = asyncio.create_task(asyncio.to_thread(collect, w, 1, {}))
            await asyncio.to_thread(w.sock.sendall, stream[300 * KiB :])
            await until(lambda: conn._async.reserved == 0, "the slot given back")
            assert not reply.done()  # held by the pause
            await vbd.resume(await engine.call(open_stack, engine, spec, writable=True))
            assert (await reply)[2] == (0, b"")
            assert seen["issued"] == 1, seen  # the read only
            assert await read_back(vbd, 2 * MiB, MiB) == payload
            await settled(conn, vbd)
            assert outstanding(server.pool) == 0
    arun(body, loop_factory=LOOPS[loop])


@pytest.mark.parametrize("loop", ["asyncio", "polling"])
def test_a_client_gone_mid_payload_gives_its_room_back(ceph_cluster, tmp_path, loop: str) -> None:
    """A client that hangs up while a large write's payload is being received into a
    slot: the slot and the room its admission took go back (the server-wide budget
    too), nothing is issued, and the next client is served."""
    name = new_image(ceph_cluster, DISK)
    sock = tmp_path / "s.sock"

    async def body(engine: ThreadEngine) -> None:
        async with served(engine, ceph_cluster.spec(name), sock) as (server, vbd, seen, w, conn):
            await exchange(w, req(READ, 0, 4 * KiB, handle=1), 1, {1: (0, 4 * KiB)})
            apass = conn._async
            stream = req(WRITE, 2 * MiB, MiB, handle=2, payload=b"g" * MiB)
            await asyncio.to_thread(w.sock.sendall, stream[: 300 * KiB])
            await until(lambda: apass.reserved == 1, "a slot lent for the payload")
            with contextlib.suppress(OSError):
                w.sock.shutdown(socket.SHUT_RDWR)
            w.close()
            await until(lambda: conn not in server._connections, "the connection gone")
            assert apass.reserved == 0 and apass.issued == 0
            assert server.pool.budget.used == 0 and outstanding(server.pool) == 0
            assert seen["issued"] == 1  # the read only
            w2, conn2 = await attach(server, sock)
            got = await exchange(w2, req(READ, 2 * MiB, 4 * KiB, handle=3), 1,
                                 {3: (2 * MiB, 4 * KiB)})
            assert got[3] == (0, bytes(4 * KiB))  # the write never landed
            await settled(conn2, vbd)
    arun(body, loop_factory=LOOPS[loop])


def test_a_read_only_disk_takes_no_write_through_the_pass(ceph_cluster, tmp_path) -> None:
    """A disk served read-only (a snapshot): reads go through the pass, a write is the
    Python path's, refused with EPERM."""
    name, content = filled_image(ceph_cluster)
    ceph_cluster.rbd("snap", "create", f"rbd/{name}@s")
    spec = ceph_cluster.spec(name, "s")
    sock = tmp_path / "s.sock"

    async def body(engine: ThreadEngine) -> None:
        drv = await engine.call(open_stack, engine, spec, writable=False)
        async with served(engine, drv, sock) as (server, vbd, seen, w, conn):
            reads = {1: (MiB, 4 * KiB)}
            stream = req(READ, MiB, 4 * KiB, handle=1) + \
                req(WRITE, 0, 4 * KiB, handle=2, payload=b"x" * 4 * KiB)
            got = await exchange(w, stream, 2, reads)
            assert got[1] == (0, content[MiB : MiB + 4 * KiB])
            assert got[2][0] == 1  # NBD's EPERM
            assert seen["issued"] == 1, seen
            await settled(conn, vbd)
    arun(body)


def test_a_probes_block_status_reaches_no_pass_and_the_reads_behind_it_do(
        ceph_cluster, tmp_path) -> None:
    """Block status requests (a probe's) on an rbd disk are the Python path's: neither
    compiled pass is handed one, none counts as a pass's miss, and reads sent behind one
    in the same message are still issued through the pass."""
    name, content = filled_image(ceph_cluster)
    sock = tmp_path / "s.sock"

    async def body(engine: ThreadEngine) -> None:
        async with served(engine, ceph_cluster.spec(name), sock) as (
                server, vbd, seen, w, conn):
            assert conn._status_id  # base:allocation is the session's only context
            calls = [0]
            pump_async = conn._pump_async

            def counting(budget: int) -> int:
                calls[0] += 1
                return pump_async(budget)
            conn._pump_async = counting  # type: ignore[method-assign]
            for h in range(1, 2 * INLINE_MISSES + 1):
                got = await exchange(w, req(STATUS, 0, MiB, handle=h), 1, {})
                assert got[h][0] == 0
            assert calls[0] == 0 and conn._inline_misses == 0
            reads = {h: (h * 8192, 4096) for h in range(100, 104)}
            stream = req(STATUS, 0, MiB, handle=99) + b"".join(
                req(READ, o, n, handle=h) for h, (o, n) in reads.items())
            got = await exchange(w, stream, 1 + len(reads), reads)
            assert got[99][0] == 0
            for h, (o, n) in reads.items():
                assert got[h] == (0, content[o : o + n])
            assert seen["issued"] == len(reads), seen
            await settled(conn, vbd)
    arun(body)


@pytest.mark.parametrize("loop", ["asyncio", "polling"])
@pytest.mark.parametrize("cache", ["", ":rbd_cache=false"], ids=["cache-on", "cache-off"])
def test_qemu_reads_what_the_pass_wrote(ceph_cluster, tmp_path, cache: str, loop: str) -> None:
    """fio's random writes of 4 KiB to 1 MiB, 16 in flight, through the pass, verified
    by fio; qemu's own rbd driver then finds the same bytes. On the polling loop, fio's
    connection is served in the loop's wait (linked) for some of it. The large ones are
    received by the readiness callback into the pass's slots (on the polling loop that
    tapdisk and serve run, by the loop's wait); with librbd's cache off, librbd sends
    them from there without a copy of its own (with it on, it copies)."""
    from conftest import need, run
    from test_rbd import qemu_rbd

    fio = need("fio")
    name = new_image(ceph_cluster, DISK)
    spec = ceph_cluster.spec(name) + cache
    sock = tmp_path / "s.sock"

    waits: list[int] = []  # payloads the loop's wait was given to receive
    links: list[object] = []  # connections served in the loop's wait (linked), each time

    async def body(engine: ThreadEngine) -> int:
        selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
        if isinstance(selector, PollingSelector):
            receive_into = selector.receive_into

            def counted(fd: int, place: memoryview):  # noqa: ANN202
                direct = receive_into(fd, place)
                if direct is not None:  # (None: no C extension, the channel receives)
                    waits.append(len(place))
                return direct
            selector.receive_into = counted  # type: ignore[method-assign]
        async with nbd_served(engine, spec, sock) as (server, vbd):
            seen = count_issued(vbd)
            add_link = vbd.add_inline_link

            def counted_link(link) -> None:  # noqa: ANN001
                links.append(link)
                add_link(link)
            vbd.add_inline_link = counted_link  # type: ignore[method-assign]
            res = await asyncio.to_thread(run, [
                fio, "--name=v", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
                "--rw=randwrite", "--bsrange=4k-1m", "--iodepth=16", "--size=16M",
                "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                "--randrepeat=1", "--verify_state_save=0"], text=True, timeout=300,
                cwd=tmp_path)
            assert res.returncode == 0, res.stdout + res.stderr
            r = await asyncio.to_thread(run, [
                need("qemu-img"), "compare", "-f", "raw", "-F", "raw",
                f"nbd+unix:///?socket={sock}", qemu_rbd(ceph_cluster, name)], text=True)
            assert r.returncode == 0, r.stdout + r.stderr
            return seen["issued"]
    assert arun(body, loop_factory=LOOPS[loop]) > 0
    assert bool(waits) == (loop == "polling"), len(waits)
    assert bool(links) == (loop == "polling"), len(links)  # fio's own, linked


def test_the_pass_is_off_with_the_environment(ceph_cluster, tmp_path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """BLKTAP_INLINE=0 turns this pass off as it does the other."""
    monkeypatch.setenv("BLKTAP_INLINE", "0")
    name = new_image(ceph_cluster, DISK)
    sock = tmp_path / "s.sock"

    async def body(engine: ThreadEngine) -> None:
        async with served(engine, ceph_cluster.spec(name), sock) as (server, vbd, seen, w, conn):
            got = await exchange(w, req(READ, 0, 4 * KiB, handle=9), 1, {9: (0, 4 * KiB)})
            assert got[9] == (0, bytes(4 * KiB))
            assert seen["issued"] == 0 and conn._async is None
    arun(body)


def test_the_pass_checks_what_it_is_given() -> None:
    """Bad arguments are refused with an exception, nothing issued."""
    from blktap.transport.nbd import _inline

    def target(image: int) -> tuple:  # (AsyncTarget's fields, the calls' addresses 1-4)
        return (image, 1 << 30, True, (1, 2, 3, 4), 5, (1, 2, 3, 4))

    apass = _inline.AsyncPass(lambda: None, 4, 1 << 20)
    buf = bytearray(struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, 0, 4096))
    with pytest.raises(TypeError):
        apass.submit(buf, 0, len(buf), ("not", "a", "target"), True, 8, 1 << 20)
    with pytest.raises(ValueError):
        apass.submit(buf, 0, len(buf), target(0), True, 8, 1 << 20)
    with pytest.raises(ValueError):
        apass.submit(buf, 4, 2, target(1), True, 8, 1 << 20)
    # The reaper checks its arguments before it calls anything.
    with pytest.raises(TypeError):
        _inline.reap((1, 2, 3, 4), 1)
    with pytest.raises(TypeError):
        _inline.reap((1, 2), 1, 0)  # not librbd's four calls
    with pytest.raises(ValueError):
        _inline.reap((1, 2, 3, 0), 1, 0)  # a call without an address
    with pytest.raises(ValueError):
        _inline.reap((1, 2, 3, 4), 0, 0)  # the image closed
    with pytest.raises(ValueError):
        _inline.reap((1, 2, 3, 4), 1, -1)
    with pytest.raises(ValueError):
        _inline.AsyncPass(lambda: None, 0)
    assert apass.issued == 0 and not apass.pending and apass.held_bytes == 0
    with pytest.raises(ValueError):
        apass.reserve(0)
    with pytest.raises(ValueError):
        apass.unreserve(2)  # not lent
    with pytest.raises(ValueError):
        apass.issue_write(7, 1, 0, target(1))  # out of range
    index, view = apass.reserve(8192)
    assert len(view) == 8192 and not view.readonly and apass.reserved == 1
    view[:] = b"p" * 8192
    assert apass.reserve(1 << 20) is None  # over max_bytes with this one lent
    view.release()
    apass.unreserve(index)
    assert apass.reserved == 0 and apass.held_bytes == 8192
    with pytest.raises(ValueError):
        apass.unreserve(index)  # given back already


def test_the_reaper_takes_every_completion_and_hands_back_the_drivers_own() -> None:
    """``_inline.reap`` against librbd's four calls played by ctypes callbacks: it clears
    the eventfd, asks for completions until a batch comes back short (70 here: three
    batches), releases every one, and returns the (completion, return value) of those
    without an argument (the driver's own), counting as strays those whose argument is
    no slot in flight. No cluster needed."""
    import os

    from blktap.transport.nbd import _inline

    no_slot = ctypes.create_string_buffer(512)  # reads as a free slot: not in flight
    # 70 completions: the driver's own (no argument) but every seventh, a stray.
    finished = list(range(0x1000, 0x1000 + 70))
    args = {c: (ctypes.addressof(no_slot) if i % 7 == 3 else None)
            for i, c in enumerate(finished)}
    values = {c: (4096 if i % 5 else -5) for i, c in enumerate(finished)}
    released: list[int] = []
    batches: list[int] = []
    queue = list(finished)

    @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                      ctypes.c_int)
    def poll_io_events(image, out, count):  # noqa: ANN001, ANN202
        assert image == 0xABC
        n = min(count, len(queue))
        for i in range(n):
            out[i] = queue.pop(0)
        batches.append(n)
        return n

    @ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)
    def get_arg(comp):  # noqa: ANN001, ANN202
        return args[comp]

    @ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_void_p)
    def get_return_value(comp):  # noqa: ANN001, ANN202
        return values[comp]

    @ctypes.CFUNCTYPE(None, ctypes.c_void_p)
    def release(comp):  # noqa: ANN001, ANN202
        released.append(comp)

    calls = tuple(ctypes.cast(f, ctypes.c_void_p).value
                  for f in (poll_io_events, get_arg, get_return_value, release))
    efd = os.eventfd(3, os.EFD_NONBLOCK)
    try:
        ours, strays = _inline.reap(calls, 0xABC, efd)
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efd)  # its count was cleared
    finally:
        os.close(efd)
    assert batches == [32, 32, 6]
    assert released == finished
    assert ours == [(c, values[c]) for c in finished if args[c] is None]
    assert strays == sum(1 for c in finished if args[c] is not None) == 10


def linked(conn: Connection) -> bool:
    return conn._async is not None and conn._async.linked


def test_a_connection_is_served_in_the_wait(ceph_cluster, tmp_path) -> None:
    """On the polling loop a serve runs, once the pass has something in flight and the
    connection nothing else, the pass is linked to the socket: QD1 reads and writes are
    then received, issued and answered in the loop's wait (the data hook runs no more),
    and counted in the VBD's statistics and latency histograms as the pass's are. A
    flush, a write over the pass's largest and a pause each give the connection
    back to the Python path, which answers them and links it again after; a DISC ends it
    with no link and no hook left behind."""
    name, content = filled_image(ceph_cluster)
    model = bytearray(content)
    sock = tmp_path / "s.sock"
    rng = random.Random(11)

    async def body(engine: ThreadEngine) -> None:
        selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
        async with served(engine, ceph_cluster.spec(name), sock) as (server, vbd, seen, w, conn):
            hooked = {"pumps": 0}
            pump = conn._pump

            def counted_pump() -> bool:
                hooked["pumps"] += 1
                return pump()
            conn._pump = counted_pump  # type: ignore[method-assign]
            conn.ch.on_data = counted_pump

            async def one(handle: int) -> None:
                """A 4 KiB to 64 KiB read or write, checked against the model."""
                length = rng.choice((4, 8, 64)) * KiB
                offset = rng.randrange(0, DISK - length, 4096)
                if handle % 2:
                    payload = rng.randbytes(length)
                    model[offset : offset + length] = payload
                    got = await exchange(w, req(WRITE, offset, length, handle=handle,
                                                payload=payload), 1, {})
                    assert got[handle] == (0, b""), handle
                else:
                    got = await exchange(w, req(READ, offset, length, handle=handle), 1,
                                         {handle: (offset, length)})
                    assert got[handle] == (0, bytes(model[offset : offset + length])), handle

            await one(1)
            await until(lambda: linked(conn), "the pass linked")
            assert selector.has_hook(conn._async) and vbd._links == {conn}
            before, pumps = vbd.stats_dict(), hooked["pumps"]
            lat_before = sum(vbd.latency.read.counts) + sum(vbd.latency.write.counts)
            for h in range(2, 42):
                await one(h)
            assert hooked["pumps"] == pumps, "the data hook ran for a linked connection"
            assert linked(conn)
            after = vbd.stats_dict()  # (asks the link for its counts first)
            count = after["counters"]
            assert (count["read_reqs"] - before["counters"]["read_reqs"],
                    count["write_reqs"] - before["counters"]["write_reqs"]) == (20, 20)
            assert after["reqs_outstanding"] == 0
            lat = sum(vbd.latency.read.counts) + sum(vbd.latency.write.counts)
            assert lat - lat_before == 40

            # A flush: handed back, answered by the Python path, linked again after.
            got = await exchange(w, req(FLUSH, handle=50), 1, {})
            assert got[50] == (0, b"")
            await one(51)
            await until(lambda: linked(conn), "linked again after the flush")
            # Writes of 512 KiB, the stream cut in pieces: received straight into their
            # slots in the wait, the link kept.
            pumps = hooked["pumps"]
            big = rng.randbytes(512 * KiB)
            stream = b"".join(req(WRITE, MiB + i * len(big), len(big), handle=60 + i,
                                  payload=big) for i in range(3))
            model[MiB : MiB + 3 * len(big)] = big * 3
            pieces = [stream[i : i + 40 * KiB] for i in range(0, len(stream), 40 * KiB)]
            got = await exchange(w, pieces, 3, {}, pause=0.001)
            assert all(got[60 + i] == (0, b"") for i in range(3)), got
            assert linked(conn) and hooked["pumps"] == pumps
            # A write over the pass's largest (1 MiB): the Python path's, whole.
            huge = rng.randbytes(2 * MiB)
            model[4 * MiB : 6 * MiB] = huge
            got = await exchange(w, req(WRITE, 4 * MiB, len(huge), handle=52, payload=huge),
                                 1, {})
            assert got[52] == (0, b"")
            await one(53)
            await until(lambda: linked(conn), "linked again after the large write")
            # A pause takes the connection back, a write half received into its slot
            # in the wait included (its header and what came go back to the Python path,
            # which holds it with what comes after); what comes meanwhile waits for the
            # resume, then the link serves again.
            half = rng.randbytes(512 * KiB)
            model[3 * MiB : 3 * MiB + len(half)] = half
            head = req(WRITE, 3 * MiB, len(half), handle=70, payload=half)
            await asyncio.to_thread(w.sock.sendall, head[: 100 * KiB])
            await until(lambda: conn._async.reserved == 1, "the payload's slot lent")
            await vbd.pause()
            assert not linked(conn) and not vbd._links and conn._async.reserved == 0
            got_later = asyncio.create_task(exchange(
                w, head[100 * KiB :] + req(READ, MiB, 512 * KiB, handle=54), 2,
                {54: (MiB, 512 * KiB)}))
            await asyncio.sleep(0.2)
            assert not got_later.done() and not linked(conn)
            drv = await engine.call(open_stack, engine, ceph_cluster.spec(name), writable=True)
            await vbd.resume(drv)
            got = await got_later
            assert got[70] == (0, b"") and got[54] == (0, big)
            for h in range(55, 60):
                await one(h)
            await until(lambda: linked(conn), "linked again after the resume")
            for off in range(0, DISK, 4 * MiB):
                assert await read_back(vbd, off, 4 * MiB) == model[off : off + 4 * MiB], off
            apass = conn._async
            await asyncio.to_thread(w.sock.sendall, req(DISC))
            await until(lambda: conn not in server._connections, "the connection ended")
            assert not apass.linked and not apass.handed_back
            assert not selector.has_hook(apass) and not vbd._links
            assert seen["failed"] == 0
            await settled(conn, vbd)
            assert outstanding(server.pool) == 0 and server.pool.budget.used == 0
    arun(body, loop_factory=LOOPS["polling"])


def test_two_clients_one_linked_while_the_other_flushes(ceph_cluster, tmp_path) -> None:
    """Two clients of one disk on the polling loop: each linked once idle, so the wait
    that reaps librbd's eventfd for one answers the other's completions too; meanwhile
    the flushes and discards of one (the driver's own requests, reaped in the wait and
    kept for the driver's reaper) are answered, and the other stays linked throughout."""
    name, content = filled_image(ceph_cluster)
    sock = tmp_path / "s.sock"

    async def body(engine: ThreadEngine) -> None:
        async with served(engine, ceph_cluster.spec(name), sock) as (server, vbd, seen, w, conn):
            w2, conn2 = await attach(server, sock)
            reads = {h: ((h * 37 % 500) * 64 * KiB, 4 * KiB) for h in range(200)}

            async def reader(client, handles: range) -> None:  # noqa: ANN001
                for h in handles:
                    off, ln = reads[h]
                    got = await exchange(client, req(READ, off, ln, handle=h), 1, {h: (off, ln)})
                    assert got[h] == (0, content[off : off + ln]), h

            await reader(w, range(0, 2))
            await reader(w2, range(2, 4))
            await until(lambda: linked(conn) and linked(conn2), "both linked")
            unlinked = []

            async def flusher() -> None:
                for h in range(300, 340):
                    # (the discards where no read of the other client looks)
                    msg = (req(FLUSH, handle=h) if h % 2 else
                           req(TRIM, 20 * MiB + 8 * KiB, 32 * KiB, handle=h))
                    got = await exchange(w2, msg, 1, {})
                    assert got[h] == (0, b""), h
                    if not linked(conn):
                        unlinked.append(h)
            await asyncio.gather(reader(w, range(4, 200)), flusher())
            assert not unlinked and linked(conn)
            await settled(conn, vbd)
            await settled(conn2, vbd)
            vbd.sync_links()
            assert vbd.stats.in_flight == 0 and seen["failed"] == 0
            assert outstanding(server.pool) == 0
    arun(body, loop_factory=LOOPS["polling"])


def test_a_stray_completion_met_in_the_wait_is_told_by_the_drivers_reaper(
        ceph_cluster, tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """A completion with an argument that is no slot in flight (nobody's request: a bug
    elsewhere in the process) reaches librbd's eventfd while a connection is linked: the
    wait's hook takes it back, and the driver's reaper, called for it, logs it once; the
    connection is served and linked again after, nothing lost."""
    name, content = filled_image(ceph_cluster)
    sock = tmp_path / "s.sock"

    async def body(engine: ThreadEngine) -> None:
        async with served(engine, ceph_cluster.spec(name), sock) as (server, vbd, seen, w, conn):
            drv = vbd.driver
            assert isinstance(drv, RbdDriver) and drv.c is not None
            c = drv.c

            async def read(h: int) -> None:
                off = h * 64 * KiB
                got = await exchange(w, req(READ, off, 4 * KiB, handle=h), 1,
                                     {h: (off, 4 * KiB)})
                assert got[h] == (0, content[off : off + 4 * KiB]), h

            await read(1)
            await until(lambda: linked(conn), "the pass linked")
            no_slot = ctypes.create_string_buffer(512)  # reads as a free slot
            comp = ctypes.c_void_p()
            assert c._create(ctypes.addressof(no_slot), None, ctypes.byref(comp)) == 0
            assert c.rbd.rbd_aio_flush(c.image, comp) == 0
            await until(lambda: "completions of nobody's requests" in caplog.text,
                        "the stray told")
            for h in range(2, 12):
                await read(h)
            await until(lambda: linked(conn), "linked again")
            await settled(conn, vbd)
            assert seen["failed"] == 0 and outstanding(server.pool) == 0

    with caplog.at_level(logging.ERROR, logger="blktap"):
        arun(body, loop_factory=LOOPS["polling"])
    told = [r.getMessage() for r in caplog.records if "nobody's requests" in r.getMessage()]
    assert len(told) == 1 and told[0].endswith(": 1 completions of nobody's requests"), told
