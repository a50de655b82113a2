"""Clients that abuse the NBD server (issue 21, items 2 and 3): floods of large reads
whose clients hang up without reading a reply, and what they must not cost the others.

- Work queued for a client that is gone is dropped: its reader stops, its reads are
  cancelled (the engine never starts what it has not started; what runs finishes before
  the buffers come back), and the disk is not kept busy for nobody.
- A server-wide memory budget caps the buffers in use; memory goes back to the pool and
  the pool's idle buffers to the system, so RSS returns near idle after the abuse.

Assertions are on counts (driver reads, requests in flight, buffers held, the budget's
high-water mark) and, in a subprocess server, on memory; never on time.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blktap.io.buffers import BufferPool, MemoryBudget
from blktap.io.threads import ThreadEngine
from blktap.tapdisk.driver import Driver
from blktap.tapdisk.drivers.aio import AioDriver
from blktap.tapdisk.vbd import VBD
from blktap.transport.nbd import connection as nbd_connection
from blktap.transport.nbd.server import Export, NbdServer
from conftest import tool

KiB, MiB = 1 << 10, 1 << 20
REQUEST_MAGIC = 0x25609513
DEADLINE = 60.0


@pytest.fixture
def shm() -> Iterator[Path]:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    folder = Path(tempfile.mkdtemp(prefix="blktap-abuse-", dir="/dev/shm"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def pattern(size: int) -> bytes:
    """Bytes that differ at every 4-byte step, so that a misplaced read shows."""
    return b"".join(struct.pack(">I", i) for i in range(size // 4))


async def until(cond, what: str) -> None:  # noqa: ANN001
    """Let the loop run until ``cond()`` holds (a deadline, not a timing assertion)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------ a raw client
def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(n - len(out), 4 * MiB))
        if not chunk:
            raise ConnectionError("server closed the connection")
        out += chunk
    return bytes(out)


def go(path: str) -> socket.socket:
    """Connect and negotiate (fixed newstyle, NBD_OPT_GO, simple replies)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(DEADLINE)
    sock.connect(path)
    recv_exact(sock, 18)
    sock.sendall(struct.pack(">I", 3))
    sock.sendall(struct.pack(">QII", 0x49484156454F5054, 7, 6) + struct.pack(">IH", 0, 0))
    while True:
        _, _, kind, length = struct.unpack(">QIII", recv_exact(sock, 20))
        recv_exact(sock, length)
        if kind == 1:
            return sock


def read_requests(count: int, length: int, size: int, skew: int = 0) -> bytes:
    """``count`` reads of ``length`` bytes; ``skew`` bytes off the sector grid (and as
    much shorter) if asked."""
    return b"".join(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 0, i,
                                (i * length) % (size - length + 1) // 4096 * 4096 + skew,
                                length - skew)
                    for i in range(count))


def flood(path: str, count: int, length: int, size: int, skew: int = 0) -> None:
    """Pipeline ``count`` reads, then hang up without reading a reply."""
    sock = go(path)
    sock.sendall(read_requests(count, length, size, skew))
    sock.close()


def correct_read(path: str, offset: int, length: int) -> bytes:
    sock = go(path)
    try:
        sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, 0, 7, offset, length))
        magic, error, handle = struct.unpack(">IIQ", recv_exact(sock, 16))
        assert (magic, error, handle) == (0x67446698, 0, 7)
        return recv_exact(sock, length)
    finally:
        sock.close()


# ------------------------------------------------------------------ the engine
def test_engine_cancel_drops_a_job_not_started_and_waits_for_one_running(tmp_path: Path
                                                                         ) -> None:
    """One worker, busy: a read queued behind it and cancelled is never run (its buffer
    stays untouched after the worker frees up); a read cancelled while a worker runs it
    is waited for: the cancelled task ends only once the worker is done."""
    path = tmp_path / "f"
    path.write_bytes(b"x" * 8192)
    fd = os.open(path, os.O_RDONLY)

    async def body() -> None:
        engine = ThreadEngine(1)
        gate = threading.Event()
        running = threading.Event()

        def blocker() -> None:
            running.set()
            gate.wait(DEADLINE)

        try:
            # Queued behind a busy worker: dropped.
            busy = asyncio.ensure_future(engine.call(blocker))
            await asyncio.to_thread(running.wait, DEADLINE)
            buf = bytearray(4096)
            queued = asyncio.ensure_future(engine._submit(os.preadv, (fd, [buf], 0)))
            await asyncio.sleep(0)
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await queued
            gate.set()
            await busy
            await engine.call(lambda: None)  # the worker went past the dropped job
            assert buf == bytes(4096)
            # Running: the cancelled caller wakes when the worker is done.
            gate.clear()
            running.clear()
            held = asyncio.ensure_future(engine.call(blocker))
            await asyncio.to_thread(running.wait, DEADLINE)
            held.cancel()
            await asyncio.sleep(0.05)
            assert not held.done()  # the worker still has it
            gate.set()
            with pytest.raises(asyncio.CancelledError):
                await held
        finally:
            gate.set()
            engine.close()
    try:
        asyncio.run(body())
    finally:
        os.close(fd)


# ------------------------------------------------------------------ the VBD
class Gated(Driver):
    """A disk of known bytes whose reads wait for ``gate`` (a slow device: cancellable
    while they wait, as an engine job nobody has started), then fill the buffers."""

    name = "gated"

    def __init__(self, engine: ThreadEngine, content: bytes) -> None:
        super().__init__(engine, len(content), writable=False)
        self.content = content
        self.gate = asyncio.Event()
        self.calls: list[tuple[int, int]] = []
        self.filled = 0

    async def read(self, offset: int, iov) -> None:  # noqa: ANN001
        self.calls.append((offset, sum(len(v) for v in iov)))
        await self.gate.wait()
        for v in iov:
            v[:] = self.content[offset : offset + len(v)]
            offset += len(v)
        self.filled += 1


def test_vbd_cancelled_requests_leave_their_group_whole() -> None:
    """Three adjacent reads merged into one driver call. Cancelling the leader (whose
    task runs the group) while the call waits drops it and reissues the two others,
    which get their bytes; cancelling a member while the call runs ends its task only
    once the call is done with its buffer. Counted as cancelled, nothing left in flight."""
    content = pattern(64 * KiB)

    async def body() -> None:
        engine = ThreadEngine(1)
        drv = Gated(engine, content)
        vbd = VBD(drv, read_only=True)
        try:
            bufs = [memoryview(bytearray(4 * KiB)) for _ in range(3)]
            tasks = [asyncio.ensure_future(vbd.read(i * 4 * KiB, bufs[i])) for i in range(3)]
            await until(lambda: len(drv.calls) == 1, "the merged call issued")
            assert drv.calls == [(0, 12 * KiB)]
            tasks[0].cancel()
            await until(lambda: len(drv.calls) == 2, "the rest reissued")
            assert drv.calls[1] == (4 * KiB, 8 * KiB)
            tasks[2].cancel()  # a member: its buffer is in the call under way
            for _ in range(5):
                await asyncio.sleep(0)
            assert not tasks[2].done()
            drv.gate.set()
            with pytest.raises(asyncio.CancelledError):
                await tasks[0]
            await tasks[1]
            with pytest.raises(asyncio.CancelledError):
                await tasks[2]
            assert bytes(bufs[1]) == content[4 * KiB : 8 * KiB]
            assert bytes(bufs[2]) == content[8 * KiB : 12 * KiB]  # filled before it ended
            assert bytes(bufs[0]) == bytes(4 * KiB)  # never read into
            assert vbd.stats.cancelled == 1 and vbd.stats.in_flight == 0
            assert vbd.stats.errors == 0
        finally:
            drv.gate.set()
            await vbd.close()
            engine.close()
    asyncio.run(body())


# ------------------------------------------------------------------ floods in-process
class Counting(AioDriver):
    """The real aio driver, counting the reads that reach it; with ``gate`` cleared,
    reads wait there first (a slow disk), where a cancellation drops them."""

    reads = 0
    passed = 0
    gate: asyncio.Event | None = None

    async def read(self, offset: int, iov) -> None:  # noqa: ANN001
        self.reads += 1
        if self.gate is not None:
            await self.gate.wait()
        self.passed += 1
        await super().read(offset, iov)


async def serving(shm: Path, size: int, budget: int) -> tuple:
    path = shm / "disk"
    content = pattern(size)
    path.write_bytes(content)
    engine = ThreadEngine(4)
    drv = await engine.call(Counting.open, engine, str(path), writable=False)
    vbd = VBD(drv, read_only=True)
    pool = BufferPool(budget=MemoryBudget(budget))
    server = NbdServer(Export("", vbd), pool=pool)
    sock = str(shm / "s.sock")
    server.listen_unix(sock)
    return engine, drv, vbd, pool, server, sock, content


async def shut(engine: ThreadEngine, vbd: VBD, server: NbdServer) -> None:
    await server.stop()
    await vbd.close()
    engine.close()


def test_hung_up_flood_on_a_slow_disk_is_dropped(shm: Path) -> None:
    """Four clients pipeline 278 reads of 32 MiB each while the disk answers nothing,
    then hang up. The server notices while it waits for room, stops reading their
    requests and cancels the reads it queued: once the disk is back, none of them is
    read; nothing stays in flight, held or charged. A new client meanwhile gets its
    greeting, and afterwards reads the right bytes."""
    size, length = 64 * MiB, 32 * MiB

    async def body() -> None:
        engine, drv, vbd, pool, server, sock, content = await serving(shm, size, 128 * MiB)
        drv.gate = asyncio.Event()
        try:
            await asyncio.gather(*(asyncio.to_thread(flood, sock, 278, length, size)
                                   for _ in range(4)))
            assert drv.reads <= 4  # the budget: 128 MiB of 32 MiB reads
            # Greeted while the floods hold the budget (the handshake needs none of it).
            newcomer = await asyncio.to_thread(go, sock)
            newcomer.close()
            await until(lambda: server.connections == 0, "the flood connections dropped")
            assert vbd.stats.cancelled >= drv.reads - drv.passed
            drv.gate.set()
            await until(lambda: vbd.stats.in_flight == 0, "nothing in flight")
            assert drv.passed == 0  # not one read done for a client that was gone
            assert drv.reads <= 4
            assert pool.held == 0 and pool.budget.used == 0
            assert pool.budget.high_water <= 128 * MiB
            got = await asyncio.to_thread(correct_read, sock, length, length)
            assert got == content[length : 2 * length]
        finally:
            if drv.gate is not None:
                drv.gate.set()
            await shut(engine, vbd, server)
    asyncio.run(body())


def test_correct_client_between_floods_on_a_budget(shm: Path) -> None:
    """Rounds of eight clients that pipeline 278 reads of 4 MiB and hang up, each round
    followed by a correct client's read checked byte for byte. Only a bounded number of
    the flood's reads reaches the disk (before: all 8 x 278 of each round), the budget
    is never exceeded, and everything is given back at the end."""
    size, length, budget = 64 * MiB, 4 * MiB, 32 * MiB
    rounds, floods, count = 3, 8, 278

    async def body() -> None:
        engine, drv, vbd, pool, server, sock, content = await serving(shm, size, budget)
        correct = 0
        try:
            for r in range(rounds):
                await asyncio.gather(*(asyncio.to_thread(flood, sock, count, length, size)
                                       for _ in range(floods)))
                offset = (r + 1) * 8 * MiB
                got = await asyncio.to_thread(correct_read, sock, offset, 16 * MiB)
                correct += 1
                assert got == content[offset : offset + 16 * MiB]
            await until(lambda: server.connections == 0, "every client gone")
            await until(lambda: vbd.stats.in_flight == 0, "nothing in flight")
            flood_reads = drv.reads - correct
            # Per round and client: what fits the budget, plus what the socket took
            # before the hang-up was seen; far below the 278 each one asked for.
            assert flood_reads <= rounds * floods * 32, flood_reads
            assert pool.budget.high_water <= budget
            assert pool.held == 0 and pool.budget.used == 0
        finally:
            await shut(engine, vbd, server)
    asyncio.run(body())


def test_budget_lets_a_request_larger_than_itself_through_alone(shm: Path) -> None:
    """A budget of 1 MiB and a read of 16 MiB: nothing else in use, so it goes (no
    deadlock), and the budget is all given back."""
    size = 32 * MiB

    async def body() -> None:
        engine, drv, vbd, pool, server, sock, content = await serving(shm, size, MiB)
        try:
            got = await asyncio.to_thread(correct_read, sock, 4 * MiB, 16 * MiB)
            assert got == content[4 * MiB : 20 * MiB]
            await until(lambda: server.connections == 0, "client gone")
            assert pool.budget.used == 0 and pool.held == 0
            assert pool.idle == 0  # the last connection closed: idle buffers trimmed
        finally:
            await shut(engine, vbd, server)
    asyncio.run(body())


def test_clients_that_read_no_replies_cannot_hold_the_budget(shm: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """Two clients pipeline 40 reads of 8 MiB each and never read a reply, holding the
    whole 32 MiB budget in replies they do not take. A correct client that then waits
    for memory is served: a client whose replies have not moved for the stall limit,
    while another waits for memory, is dropped (its memory given back)."""
    monkeypatch.setattr(nbd_connection, "SEND_STALL_TIMEOUT", 0.5)
    size, length, budget = 64 * MiB, 8 * MiB, 32 * MiB

    async def body() -> None:
        engine, drv, vbd, pool, server, sock, content = await serving(shm, size, budget)
        hogs = []
        try:
            for _ in range(2):
                hog = await asyncio.to_thread(go, sock)
                hog.sendall(read_requests(40, length, size))
                hogs.append(hog)
            await until(lambda: pool.budget.used == budget and pool.budget.waiting,
                        "the budget held by clients that read nothing")
            got = await asyncio.to_thread(correct_read, sock, 16 * MiB, length)
            assert got == content[16 * MiB : 24 * MiB]
            # At least one of them was dropped to make room (reading from them here
            # would make them well-behaved clients).
            await until(lambda: server.connections <= 1, "a client that reads nothing dropped")
            for hog in hogs:
                hog.close()
            await until(lambda: server.connections == 0, "every client gone")
            assert pool.budget.used == 0 and pool.held == 0
            assert pool.budget.high_water <= budget
        finally:
            for hog in hogs:
                hog.close()
            await shut(engine, vbd, server)
    asyncio.run(body())


# ------------------------------------------------------------------ memory, end to end
def status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * KiB
    return out


def test_rss_returns_near_idle_after_read_floods(shm: Path) -> None:
    """``blktap serve`` with a 64 MiB budget: floods of 4 and then 8 clients, each
    pipelining 278 reads of 32 MiB and hanging up, then 8 more whose reads are off the
    sector grid (read through scratch buffers), then a correct client. The peak stays
    bounded (before: 1 GiB and more), and RSS comes back within twice the idle figure
    (before: 700 MiB stayed; the unaligned floods alone left 256 MiB behind until the
    garbage collector ran)."""
    image = shm / "disk"
    size = 256 * MiB
    with open(image, "wb") as f:
        f.truncate(size)
        f.write(os.urandom(4 * MiB))
    sock = str(shm / "s.sock")
    proc = subprocess.Popen([tool("blktap"), "serve", f"aio:{image}", "--socket", sock,
                             "--memory-budget", "64M"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("nbd+unix://")
        idle = status(proc.pid)["VmRSS"]
        for n, skew in ((4, 0), (8, 0), (8, 1)):
            threads = [threading.Thread(target=flood,
                                        args=(sock, 278, 32 * MiB, size, skew))
                       for _ in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        with open(image, "rb") as f:
            expected = f.read(MiB)
        assert correct_read(sock, 0, MiB) == expected
        peak = status(proc.pid)["VmHWM"]
        # The budget, the pool's idle buffers, and the scratch buffers of the unaligned
        # reads (not charged: at most as much as the budget again).
        assert peak <= idle + 4 * 64 * MiB, (idle, peak)
        deadline = time.monotonic() + DEADLINE
        while status(proc.pid)["VmRSS"] > 2 * idle and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status(proc.pid)["VmRSS"] <= 2 * idle, (idle, status(proc.pid))
    finally:
        proc.terminate()
        proc.wait(DEADLINE)
