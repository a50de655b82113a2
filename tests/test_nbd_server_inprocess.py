"""The NBD server driven in-process: the handshake time limit, a shutdown that lets the
requests in flight finish and be answered before connections close, and the channel's
batched sends."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from blktap.io import ThreadEngine
from blktap.tapdisk.driver import Caps, Driver
from blktap.tapdisk.vbd import VBD
from blktap.transport.nbd.server import HANDSHAKE_TIMEOUT, Export, NbdServer
from blktap.transport.sockio import Channel, Closed

MiB = 1 << 20


class Slow(Driver):
    """Reads that complete only when the test says so."""

    name = "slow"

    def __init__(self, engine: ThreadEngine) -> None:
        super().__init__(engine, MiB, writable=False)
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.caps = Caps.FLUSH

    async def read(self, offset: int, iov) -> None:  # noqa: ANN001
        self.started.set()
        await self.release.wait()
        for v in iov:
            v[:] = b"s" * len(v)


@contextlib.asynccontextmanager
async def served(tmp_path: Path, driver: type[Slow] = Slow,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT
                 ) -> AsyncIterator[tuple[NbdServer, str, Slow]]:
    """An in-process server of a ``driver`` disk on a UNIX socket: (server, socket path,
    driver). Stopped at the end (again, if the test stopped it), its disk closed."""
    engine = ThreadEngine(2)
    drv = driver(engine)
    vbd = VBD(drv)
    server = NbdServer(Export("", vbd), handshake_timeout=handshake_timeout)
    path = str(tmp_path / "s.sock")
    server.listen_unix(path)
    try:
        yield server, path, drv
    finally:
        await server.stop()
        await vbd.close()
        engine.close()


async def negotiate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readexactly(18)
    writer.write(struct.pack(">I", 3))
    writer.write(struct.pack(">QII", 0x49484156454F5054, 7, 6) + struct.pack(">IH", 0, 0))
    while True:
        _, _, kind, length = struct.unpack(">QIII", await reader.readexactly(20))
        await reader.readexactly(length)
        if kind == 1:
            return


def test_handshake_time_limit(tmp_path: Path) -> None:
    async def body() -> None:
        async with served(tmp_path, handshake_timeout=0.2) as (server, path, drv):
            reader, writer = await asyncio.open_unix_connection(path)
            await reader.readexactly(18)  # then say nothing
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
            writer.close()
    asyncio.run(body())


def test_handshake_time_limit_needs_no_timer_per_client(tmp_path: Path) -> None:
    """Handshakes are timed by one periodic check of the server's, not a loop timer
    each: with 40 clients come and gone, and with one still negotiating, the loop has
    nothing scheduled. A client that says nothing is dropped at its time limit (give
    or take the check's period), one that comes later and negotiates is served; stop()
    ends the check."""
    async def body() -> float:
        loop = asyncio.get_running_loop()
        async with served(tmp_path, handshake_timeout=0.3) as (server, path, drv):
            for _ in range(40):
                reader, writer = await asyncio.open_unix_connection(path)
                await negotiate(reader, writer)
                writer.close()
            assert not loop._scheduled  # type: ignore[attr-defined]
            silent = await asyncio.open_unix_connection(path)
            await silent[0].readexactly(18)
            started = loop.time()
            for _ in range(500):  # (the last of the 40 may not be closed yet)
                if server.connections == 1:
                    break
                await asyncio.sleep(0.01)
            assert server.connections == 1 and not loop._scheduled  # type: ignore[attr-defined]
            await asyncio.sleep(0.2)
            late = await asyncio.open_unix_connection(path)
            assert await asyncio.wait_for(silent[0].read(), 5) == b""  # dropped
            gone = loop.time() - started
            await negotiate(*late)  # its own limit is later: served
            drv.release.set()
            late[1].write(struct.pack(">IHHQQI", 0x25609513, 0, 0, 7, 0, 512))
            _, error, handle = struct.unpack(">IIQ", await late[0].readexactly(16))
            assert (error, handle) == (0, 7)
            assert await late[0].readexactly(512) == b"s" * 512
            for _, w in (silent, late):
                w.close()
            assert server._sweep is not None
        assert server._sweep is None
        return gone
    gone = asyncio.run(body())
    assert 0.2 < gone < 3  # (its time started a little before the greeting was read)


def test_stop_drops_clients_still_negotiating(tmp_path: Path) -> None:
    """Clients in the middle of their handshakes when the server stops are disconnected
    (their handshakes have no task: the server closes them itself), and stop() returns;
    a client already in transmission is closed too."""
    async def body() -> None:
        async with served(tmp_path) as (server, path, drv):
            halfway = []
            for cut in (0, 4, 4 + 8):  # nothing, the client's flags, half an option
                reader, writer = await asyncio.open_unix_connection(path)
                await reader.readexactly(18)
                hello = struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 8, 0)
                writer.write(hello[:cut])
                halfway.append((reader, writer))
            client = await asyncio.open_unix_connection(path)
            await negotiate(*client)
            while server.connections < 4:
                await asyncio.sleep(0.01)
            await asyncio.wait_for(server.stop(), 5)
            assert server.connections == 0
            for reader, writer in (*halfway, client):
                assert await asyncio.wait_for(reader.read(), 5) == b""
                writer.close()
    asyncio.run(body())


@pytest.mark.parametrize("where", ["python", "compiled"])
def test_a_bug_in_a_handshake_loses_that_client_only(tmp_path: Path, monkeypatch,
                                                     caplog, where: str) -> None:  # noqa: ANN001
    """An exception out of the negotiation (a bug, not a client's fault), the Python one
    or the compiled pass, is logged and closes that client; the next one is served."""
    from blktap.transport.nbd import handshake

    if where == "python":
        monkeypatch.setenv("BLKTAP_INLINE", "0")
        cls, name = handshake.Negotiation, "take"
    else:
        if handshake.compiled_take() is None:
            pytest.skip("the compiled handshake is not built")
        cls, name = handshake.FedNegotiation, "_compiled_took"
    real = getattr(cls, name)
    failures = [RuntimeError("boom")]

    def failing(self):  # noqa: ANN001, ANN202
        if failures:
            raise failures.pop()
        return real(self)

    monkeypatch.setattr(cls, name, failing)

    async def body() -> None:
        async with served(tmp_path) as (server, path, drv):
            reader, writer = await asyncio.open_unix_connection(path)
            await reader.readexactly(18)
            writer.write(struct.pack(">I", 3))
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed
            writer.close()
            client = await asyncio.open_unix_connection(path)
            await asyncio.wait_for(negotiate(*client), 5)
            client[1].close()
    asyncio.run(body())
    assert any("handshake failed" in r.getMessage() and r.exc_info for r in caplog.records)


def test_shutdown_answers_requests_in_flight(tmp_path: Path) -> None:
    async def body() -> None:
        async with served(tmp_path) as (server, path, drv):
            reader, writer = await asyncio.open_unix_connection(path)
            await negotiate(reader, writer)
            writer.write(struct.pack(">IHHQQI", 0x25609513, 0, 0, 42, 0, 4096))
            await drv.started.wait()
            stopping = asyncio.ensure_future(server.stop())
            await asyncio.sleep(0.1)
            assert not stopping.done()  # waiting for the read in flight
            drv.release.set()
            magic, error, handle = struct.unpack(">IIQ", await reader.readexactly(16))
            assert (magic, error, handle) == (0x67446698, 0, 42)
            assert await reader.readexactly(4096) == b"s" * 4096
            await asyncio.wait_for(stopping, 5)
            assert await reader.read() == b""
            assert not Path(path).exists()
            writer.close()
    asyncio.run(body())


def test_replies_out_of_order(tmp_path: Path) -> None:
    """A slow request does not hold back the replies of quicker ones behind it."""
    class SlowFirst(Slow):
        async def read(self, offset: int, iov) -> None:  # noqa: ANN001
            if offset == 0:
                await self.release.wait()
            for v in iov:
                v[:] = bytes([offset // 4096]) * len(v)

    async def body() -> None:
        async with served(tmp_path, SlowFirst) as (server, path, drv):
            reader, writer = await asyncio.open_unix_connection(path)
            await negotiate(reader, writer)
            for handle, offset in ((1, 0), (2, 8192), (3, 16384)):
                writer.write(struct.pack(">IHHQQI", 0x25609513, 0, 0, handle, offset, 512))
            order = []
            for _ in range(2):
                _, error, handle = struct.unpack(">IIQ", await reader.readexactly(16))
                await reader.readexactly(512)
                order.append(handle)
            drv.release.set()
            _, error, handle = struct.unpack(">IIQ", await reader.readexactly(16))
            assert await reader.readexactly(512) == bytes(512)
            order.append(handle)
            assert sorted(order[:2]) == [2, 3] and order[2] == 1
            writer.close()
    asyncio.run(body())


# ------------------------------------------------------------------------- send batching
class CountingSocket(socket.socket):
    """A socket that counts its sendmsg calls."""

    sendmsgs = 0

    def sendmsg(self, *args, **kw):  # noqa: ANN002, ANN003, ANN201
        type(self).sendmsgs += 1
        return super().sendmsg(*args, **kw)


def test_channel_sends_of_one_turn_leave_in_one_sendmsg() -> None:
    """Messages sent in the same turn of the loop go out in one sendmsg, in order and
    whole; a big one is not held back; a full socket is finished later by a task; a
    close wakes the senders still waiting with Closed."""

    async def body() -> None:
        a, b = socket.socketpair()
        ours = CountingSocket(a.family, a.type, fileno=a.detach())
        ch = Channel(ours)
        try:
            msgs = [bytes([i]) * (i + 1) for i in range(40)]
            CountingSocket.sendmsgs = 0
            await asyncio.gather(*(ch.send([m[:1], memoryview(m)[1:]]) for m in msgs))
            assert CountingSocket.sendmsgs == 1
            want = b"".join(msgs)
            assert b.recv(len(want) + 1) == want

            # Much more than the socket holds: the rest goes out as the peer reads.
            big = [bytes([65 + i]) * (300 << 10) for i in range(16)]
            sends = asyncio.gather(*(ch.send([m]) for m in big))
            got = bytearray()
            b.setblocking(False)
            while len(got) < len(big) * len(big[0]):
                try:
                    got += b.recv(1 << 20)
                except BlockingIOError:
                    await asyncio.sleep(0.001)
            await sends
            assert bytes(got) == b"".join(big)

            # The peer stops reading: a sender waiting on the full socket gets Closed.
            stuck = asyncio.ensure_future(ch.send([bytes(64 << 20)]))
            await asyncio.sleep(0.01)
            assert not stuck.done()
            ch.close()
            with pytest.raises(Closed):
                await stuck
            with pytest.raises(Closed):
                await ch.send([b"late"])
        finally:
            ch.close()
            b.close()

    asyncio.run(body())
