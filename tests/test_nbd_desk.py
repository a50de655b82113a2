"""The NBD server's front desk (``_handshake.Desk``): on a polling loop it accepts clients
and answers their usual handshake in the loop's wait, then hands each over to Python.
What it must keep of the server's behaviour: real clients served (libnbd's nbdinfo,
qemu-img), on UNIX and TCP listeners; the handshake's time limit; the connection limit;
stop() closing the clients it holds; a client gone halfway; the export's flags after a
resume onto a driver of other capabilities. (Byte-for-byte equality with the Python
negotiation is tests/test_nbd_handshake_compiled.py's, on this loop too.)"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest

from blktap.errors import BlktapError
from blktap.io import ThreadEngine
from blktap.io.polling import PollingSelector, polling_loop_factory
from blktap.tapdisk.driver import Caps, Driver
from blktap.tapdisk.drivers.stack import open_stack
from blktap.tapdisk.vbd import VBD
from blktap.transport.nbd import handshake
from blktap.transport.nbd import proto as p
from blktap.transport.nbd.server import Export, NbdServer
from nbd_helpers import read_until_end
from test_fast_path import shm  # noqa: F401  (a fixture: a private folder on tmpfs)

if handshake.compiled_desk() is None:
    pytest.skip("the compiled desk is not built", allow_module_level=True)

KiB = 1024
SIZE = 1 << 20
GREETING_BYTES = 18
FLAGS = struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES)


class Mem(Driver):
    """A writable disk in memory, with the capabilities it is given."""

    name = "mem"

    def __init__(self, engine: ThreadEngine, caps: Caps) -> None:
        super().__init__(engine, SIZE, writable=True)
        self.caps = caps
        self.data = bytearray(SIZE)

    async def read(self, offset: int, iov: Sequence[memoryview]) -> None:
        for v in iov:
            v[:] = self.data[offset:offset + len(v)]
            offset += len(v)

    async def write(self, offset: int, iov: Sequence[memoryview], *, fua: bool = False) -> None:
        for v in iov:
            self.data[offset:offset + len(v)] = v
            offset += len(v)


Body = Callable[[NbdServer, Any, VBD, ThreadEngine], Awaitable[None]]


def run(tmp_path: Any, body: Body, **server_args: Any) -> None:
    """``body(server, desk, vbd, engine)`` with a server of a disk in memory listening on
    tmp_path/s.sock, on a polling loop (where the desk is)."""
    async def vbd_of(engine: ThreadEngine) -> VBD:
        return VBD(Mem(engine, Caps.FLUSH))
    serve_in_loop(tmp_path, vbd_of, body, polling=True, server_args=server_args)


def serve_in_loop(tmp_path: Any, vbd_of: Callable[[ThreadEngine], Awaitable[VBD]],
                  body: Body, *, polling: bool, server_args: dict[str, Any]) -> None:
    """``body(server, desk, vbd, engine)`` with a server of ``vbd_of(engine)`` listening
    on tmp_path/s.sock: on a polling loop (its desk), or on asyncio's own (no desk:
    None); everything stopped and closed at the end."""
    async def main() -> None:
        engine = ThreadEngine(1)
        vbd = await vbd_of(engine)
        server = NbdServer(Export("exp", vbd), **server_args)
        server.listen_unix(str(tmp_path / "s.sock"))
        desk = next(iter(server._desks.values()), None)
        assert (desk is not None) == polling
        try:
            await body(server, desk, vbd, engine)
        finally:
            await server.stop()
            await vbd.close()
            engine.close()
    with asyncio.Runner(loop_factory=polling_loop_factory(32) if polling else None) as runner:
        runner.run(main())


async def raw_client(path: str) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, path)
    return sock


async def read_exactly(sock: socket.socket, n: int, timeout: float = 10) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    async with asyncio.timeout(timeout):
        while len(got) < n:
            data = await loop.sock_recv(sock, n - len(got))
            if not data:
                break
            got += data
    return bytes(got)


async def until(cond: Callable[[], bool], what: str, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


def go_option(name: bytes = b"") -> bytes:
    data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, p.INFO_BLOCK_SIZE)
    return struct.pack(">QII", p.IHAVEOPT, p.OPT_GO, len(data)) + data


def test_real_clients_are_served_through_the_desk(tmp_path) -> None:  # noqa: ANN001
    need("nbdinfo")
    need("qemu-img")

    async def body(server: NbdServer, desk: Any, vbd: VBD, engine: ThreadEngine) -> None:
        uri = f"nbd+unix:///exp?socket={tmp_path}/s.sock"
        info = await asyncio.to_thread(subprocess.run, ["nbdinfo", "--json", uri],
                                       capture_output=True, text=True, timeout=30)
        assert info.returncode == 0, info.stderr
        assert f'"export-size": {SIZE}' in info.stdout
        img = await asyncio.to_thread(
            subprocess.run, ["qemu-img", "info", "--output=json", uri],
            capture_output=True, text=True, timeout=30)
        assert img.returncode == 0, img.stderr
        assert f'"virtual-size": {SIZE}' in img.stdout
        assert desk.accepted == 2
        await until(lambda: server.connections == 0, "the connections' end")
        assert desk.held == 0
    run(tmp_path, body)


def test_a_tcp_listener_has_its_desk(tmp_path, caplog) -> None:  # noqa: ANN001
    need("nbdinfo")

    async def body(server: NbdServer, desk: Any, vbd: VBD, engine: ThreadEngine) -> None:
        host, port = server.listen_tcp("127.0.0.1", 0)
        tcp = [d for d in server._desks.values() if d is not desk]
        assert len(tcp) == 1
        with caplog.at_level(logging.INFO, logger="blktap.nbd"):
            info = await asyncio.to_thread(
                subprocess.run, ["nbdinfo", "--size", f"nbd://{host}:{port}/exp"],
                capture_output=True, text=True, timeout=30)
            assert info.returncode == 0, info.stderr
            assert info.stdout.strip() == str(SIZE)
            await until(lambda: server.connections == 0, "the connection's end")
        assert tcp[0].accepted == 1 and desk.accepted == 0
        # the peer named by its address, as the server's own accept names it
        assert any(r.getMessage().startswith("127.0.0.1:") and "connected" in r.getMessage()
                   for r in caplog.records)
    run(tmp_path, body)


def test_a_silent_client_is_closed_at_the_time_limit(tmp_path) -> None:  # noqa: ANN001
    async def body(server: NbdServer, desk: Any, vbd: VBD, engine: ThreadEngine) -> None:
        path = str(tmp_path / "s.sock")
        silent = await raw_client(path)
        assert len(await read_exactly(silent, GREETING_BYTES)) == GREETING_BYTES
        assert desk.held == 1 and server.connections == 1
        assert await read_until_end(silent) == b""  # closed by the desk
        silent.close()
        assert desk.held == 0 and server.connections == 0
        # the next client is served
        talker = await raw_client(path)
        await asyncio.get_running_loop().sock_sendall(talker, FLAGS + go_option())
        reply = await read_exactly(talker, GREETING_BYTES + 20)
        assert reply[GREETING_BYTES:][:8] == p.OPT_REPLY_MAGIC.to_bytes(8, "big")
        talker.close()
    run(tmp_path, body, handshake_timeout=0.3)


def test_an_agreed_client_idle_past_the_time_limit_is_served_not_closed(tmp_path) -> None:  # noqa: ANN001
    """The desk keeps a client agreed at GO until its first request; one that sends none
    within the handshake's time limit is no late handshake: it is handed over and
    served when it asks, however late."""
    async def body(server: NbdServer, desk: Any, vbd: VBD, engine: ThreadEngine) -> None:
        loop = asyncio.get_running_loop()
        client = await raw_client(str(tmp_path / "s.sock"))
        await loop.sock_sendall(client, FLAGS + go_option())
        await read_exactly(client, GREETING_BYTES + 20 + 12 + 20 + 14 + 20)  # GO's answers
        assert desk.held == 1  # agreed, waiting for a request
        await until(lambda: desk.held == 0, "the hand-over at the time limit")
        assert server.connections == 1
        await asyncio.sleep(0.5)  # (past the limit again: still served)
        await loop.sock_sendall(client, struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_READ,
                                                    7, 0, 512))
        reply = await read_exactly(client, 16 + 512)
        assert struct.unpack(">IIQ", reply[:16]) == (p.SIMPLE_REPLY_MAGIC, 0, 7)
        await loop.sock_sendall(client, struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0,
                                                    p.CMD_DISC, 8, 0, 0))
        assert await read_until_end(client) == b""
        client.close()
        await until(lambda: server.connections == 0, "the client's end")
    run(tmp_path, body, handshake_timeout=0.3)


def test_a_client_leaving_right_after_go_is_closed(tmp_path) -> None:  # noqa: ANN001
    async def body(server: NbdServer, desk: Any, vbd: VBD, engine: ThreadEngine) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(3):
            client = await raw_client(str(tmp_path / "s.sock"))
            await loop.sock_sendall(client, FLAGS + go_option())
            await read_exactly(client, GREETING_BYTES + 20 + 12 + 20 + 14 + 20)
            client.close()
        await until(lambda: server.connections == 0, "the clients' end")
        assert desk.held == 0 and desk.accepted == 3
    run(tmp_path, body)


def test_the_time_limit_counts_from_the_accept_after_a_hand_over(tmp_path) -> None:  # noqa: ANN001
    """A client handed over mid-handshake (its first message outgrows the desk's buffer)
    has what is left of its time limit in Python, not the whole limit again."""
    async def body(server: NbdServer, desk: Any, vbd: VBD, engine: ThreadEngine) -> None:
        loop = asyncio.get_running_loop()
        before = time.monotonic()
        client = await raw_client(str(tmp_path / "s.sock"))
        await read_exactly(client, GREETING_BYTES)
        greeted = time.monotonic()  # (accepted by then)
        await asyncio.sleep(0.3)  # (at the desk)
        long_go = go_option(b"n" * 2000)
        await loop.sock_sendall(client, FLAGS + long_go[:1100])
        await until(lambda: len(server._handshakes) == 1, "the hand-over")
        (handshake,) = server._handshakes
        assert before + 30 <= handshake.deadline <= greeted + 30
        await loop.sock_sendall(client, long_go[1100:])  # (the rest: unknown export)
        reply = await read_exactly(client, 20)  # (the greeting was read above)
        assert struct.unpack(">QII", reply[:16])[1:] == (p.OPT_GO, p.REP_ERR_UNKNOWN)
        client.close()
    run(tmp_path, body, handshake_timeout=30)


def test_the_connection_limit_counts_the_clients_at_the_desk(tmp_path) -> None:  # noqa: ANN001
    async def body(server: NbdServer, desk: Any, vbd: VBD, engine: ThreadEngine) -> None:
        path = str(tmp_path / "s.sock")
        first, second = await raw_client(path), await raw_client(path)
        for sock in (first, second):
            assert len(await read_exactly(sock, GREETING_BYTES)) == GREETING_BYTES
        assert server.connections == 2 and desk.held == 2
        third = await raw_client(path)
        assert await read_until_end(third) == b""  # over the limit: closed, no greeting
        third.close()
        first.close()
        await until(lambda: server.connections == 1, "the first client's end")
        fourth = await raw_client(path)
        assert len(await read_exactly(fourth, GREETING_BYTES)) == GREETING_BYTES
        second.close()
        fourth.close()
    run(tmp_path, body, max_connections=2)


def test_stop_closes_the_clients_at_the_desk(tmp_path) -> None:  # noqa: ANN001
    async def body(server: NbdServer, desk: Any, vbd: VBD, engine: ThreadEngine) -> None:
        client = await raw_client(str(tmp_path / "s.sock"))
        await read_exactly(client, GREETING_BYTES)
        await asyncio.get_running_loop().sock_sendall(client, FLAGS)  # mid-handshake
        await until(lambda: desk.held == 1, "the client at the desk")
        selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
        assert isinstance(selector, PollingSelector) and desk in selector._hooks
        await server.stop()
        assert await read_until_end(client) == b""
        client.close()
        assert desk.held == 0 and desk not in selector._hooks
        assert not server._desks
    run(tmp_path, body)


@pytest.mark.parametrize("how", ["closed", "reset"])
def test_a_client_gone_mid_handshake_leaves_the_server_serving(tmp_path, how) -> None:  # noqa: ANN001
    async def body(server: NbdServer, desk: Any, vbd: VBD, engine: ThreadEngine) -> None:
        path = str(tmp_path / "s.sock")
        loop = asyncio.get_running_loop()
        for _ in range(3):
            gone = await raw_client(path)
            await read_exactly(gone, GREETING_BYTES)
            structured = struct.pack(">QII", p.IHAVEOPT, p.OPT_STRUCTURED_REPLY, 0)
            await loop.sock_sendall(gone, FLAGS + structured + go_option()[:10])
            if how == "reset":  # (an unread reply in its buffer: the close resets)
                await read_exactly(gone, 1)
            gone.close()
        await until(lambda: server.connections == 0, "the gone clients' end")
        client = await raw_client(path)
        await loop.sock_sendall(client, FLAGS + go_option())
        reply = await read_exactly(client, GREETING_BYTES + 20)
        assert struct.unpack(">QII", reply[GREETING_BYTES:][:16])[1:] == (p.OPT_GO, p.REP_INFO)
        client.close()
        assert desk.accepted == 4
    run(tmp_path, body)


def test_what_the_desk_advertises_follows_a_resume(tmp_path) -> None:  # noqa: ANN001
    async def body(server: NbdServer, desk: Any, vbd: VBD, engine: ThreadEngine) -> None:
        before = desk.flags
        assert before == handshake.transmission_flags(server.export, False)
        assert not before & p.FLAG_SEND_TRIM
        await vbd.pause()
        await vbd.resume(Mem(engine, Caps.FLUSH | Caps.TRIM))
        assert desk.flags == handshake.transmission_flags(server.export, False)
        assert desk.flags & p.FLAG_SEND_TRIM
        # a client told so by the desk's own answer
        client = await raw_client(str(tmp_path / "s.sock"))
        await asyncio.get_running_loop().sock_sendall(client, FLAGS + go_option())
        reply = await read_exactly(client, GREETING_BYTES + 20 + 12)
        info, size, flags = struct.unpack(">HQH", reply[GREETING_BYTES + 20:])
        assert (info, size, flags) == (p.INFO_EXPORT, SIZE, desk.flags)
        client.close()
    run(tmp_path, body)


def test_no_desk_where_the_handshake_is_not_the_plain_one(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """TLS required, or the compiled paths turned off (BLKTAP_INLINE=0): the server's own
    accept and negotiation, as on asyncio's loop."""
    from blktap.transport.nbd.server import tls_context
    from test_nbd_protocol import make_cert

    cert, key = make_cert(tmp_path)

    async def main() -> None:
        engine = ThreadEngine(1)
        vbd = VBD(Mem(engine, Caps.FLUSH))
        tls = NbdServer(Export("exp", vbd), tls=tls_context(str(cert), str(key)))
        tls.listen_unix(str(tmp_path / "tls.sock"))
        with monkeypatch.context() as m:
            m.setenv("BLKTAP_INLINE", "0")
            off = NbdServer(Export("exp", vbd))
            off.listen_unix(str(tmp_path / "off.sock"))
        try:
            assert not tls._desks and not off._desks
        finally:
            await tls.stop()
            await off.stop()
            await vbd.close()
            engine.close()
    with asyncio.Runner(loop_factory=polling_loop_factory(32)) as runner:
        runner.run(main())


# ---------------------------------------------------------------------- transmission
# A client agreed at the desk stays there for the requests the compiled pass serves at
# once (Desk.transmit: connection.serve_at_desk): a short connection that only asks for
# block status or reads and disconnects never reaches the Python path. Anything else
# (another command, replies the socket did not take, a paused disk) hands it over.

DISK = 4 << 20
CLUSTER = 64 * KiB
DATA_AT, DATA_LEN = 1 << 20, 256 * KiB


def qcow2_image(tmp_path: Any) -> Any:
    """A 4 MiB qcow2 (qemu-img's) holding 256 KiB of 0x5a at 1 MiB, the rest holes."""
    need("qemu-img")
    need("qemu-io")
    img = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"cluster_size={CLUSTER}", str(img), str(DISK)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -q -P 0x5a {DATA_AT} {DATA_LEN}",
                    str(img)], check=True)
    return img


def run_disk(tmp_path: Any, spec: str, body: Body, *, loop: str = "polling",
             warm: bool = True) -> None:
    """``body(server, desk, vbd, engine)`` with a server of ``spec`` (opened writable) on
    tmp_path/s.sock; on asyncio's own loop (no desk: None) when ``loop`` says so. ``warm``:
    the driver's metadata read first (the compiled pass serves from its cache only)."""
    async def vbd_of(engine: ThreadEngine) -> VBD:
        vbd = VBD(await engine.call(open_stack, engine, spec, writable=True))
        if warm:
            await vbd.block_status(0, vbd.size)
        return vbd
    serve_in_loop(tmp_path, vbd_of, body, polling=loop == "polling", server_args={})


def structured_option() -> bytes:
    return struct.pack(">QII", p.IHAVEOPT, p.OPT_STRUCTURED_REPLY, 0)


def meta_option(*queries: bytes) -> bytes:
    data = struct.pack(">I", 0) + struct.pack(">I", len(queries))
    for q in queries:
        data += struct.pack(">I", len(q)) + q
    return struct.pack(">QII", p.IHAVEOPT, p.OPT_SET_META_CONTEXT, len(data)) + data


# The answers to FLAGS + [structured + meta(base:allocation)] + go_option(), after the
# greeting: ACK; META_CONTEXT, ACK; INFO export, INFO block size, ACK.
STRUCTURED_ANSWERS = 20 + (20 + 4 + 15) + 20
GO_ANSWERS = 20 + 12 + 20 + 14 + 20


async def agreed_client(path: str, *, structured: bool = True,
                        contexts: bool = True) -> socket.socket:
    """A raw client through the handshake at the desk (its answers read)."""
    client = await raw_client(path)
    opts = FLAGS
    answers = GREETING_BYTES + GO_ANSWERS
    if structured:
        opts += structured_option()
        answers += 20
        if contexts:
            opts += meta_option(b"base:allocation")
            answers += 20 + 4 + 15 + 20
    await asyncio.get_running_loop().sock_sendall(client, opts + go_option())
    await read_exactly(client, answers)
    return client


def request(cmd: int, handle: int, offset: int, length: int, flags: int = 0) -> bytes:
    return p.REQUEST.pack(p.REQUEST_MAGIC, flags, cmd, handle, offset, length)


async def read_structured(sock: socket.socket) -> tuple[int, int, int, bytes]:
    """One structured reply chunk: (flags, type, handle, payload)."""
    head = await read_exactly(sock, 20)
    magic, flags, kind, handle, length = struct.unpack(">IHHQI", head)
    assert magic == p.STRUCTURED_REPLY_MAGIC
    return flags, kind, handle, await read_exactly(sock, length)


def image_bytes(img: Any) -> bytes:
    """The image's bytes as qemu-img reads them."""
    raw = img.with_suffix(".raw")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(img), str(raw)],
                   check=True)
    return raw.read_bytes()


def test_short_connections_are_served_and_ended_at_the_desk(tmp_path) -> None:  # noqa: ANN001
    """libnbd's tools (block status, reads, DISC) served without the Python path: the
    same map and bytes as asyncio's loop gives (no desk there), and as qemu reads."""
    need("nbdinfo")
    need("nbdcopy")
    img = qcow2_image(tmp_path)
    uri = f"nbd+unix:///exp?socket={tmp_path}/s.sock"
    got: dict[str, tuple[str, bytes]] = {}

    for loop in ("polling", "asyncio"):
        async def body(server: NbdServer, desk: Any, vbd: VBD, engine: ThreadEngine,
                       loop: str = loop) -> None:
            copy = tmp_path / f"copy-{loop}.raw"
            mapped = await asyncio.to_thread(subprocess.run, ["nbdinfo", "--map", uri],
                                             capture_output=True, text=True, timeout=30)
            assert mapped.returncode == 0, mapped.stderr
            done = await asyncio.to_thread(subprocess.run, ["nbdcopy", uri, str(copy)],
                                           capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            await until(lambda: server.connections == 0, "the connections' end")
            got[loop] = (mapped.stdout, copy.read_bytes())
            assert vbd.stats.other_reqs >= 2  # (block status, counted either way)
            if desk is not None:
                # every connection ended at the desk but the first: its block status
                # is the Python path's, which reads the L2 table into the driver's cache
                # (the pass serves from cached tables only)
                assert desk.accepted == 3 and desk.ended == 2
                assert desk.held == 0 and not server._connections
        run_disk(tmp_path, f"qcow2:{img}", body, loop=loop, warm=False)
    assert got["polling"] == got["asyncio"]
    mapped, copied = got["polling"]
    assert copied == image_bytes(img)
    assert f"{DATA_AT:>10}" in mapped and "data" in mapped and "hole" in mapped


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_requests_at_the_desk_then_the_python_path(tmp_path, structured) -> None:  # noqa: ANN001
    """Reads and block status answered at the desk; a FLUSH (not the pass's) hands the
    client over with it, in order; the Python path serves it and what follows."""
    img = qcow2_image(tmp_path)

    async def body(server: NbdServer, desk: Any, vbd: VBD, engine: ThreadEngine) -> None:
        loop = asyncio.get_running_loop()
        client = await agreed_client(str(tmp_path / "s.sock"), structured=structured)
        reads = vbd.stats.read_reqs
        await loop.sock_sendall(client, request(p.CMD_READ, 1, DATA_AT, 4096)
                                + request(p.CMD_READ, 2, 0, 4096))
        for handle, byte in ((1, 0x5a), (2, 0)):
            if structured:
                flags, kind, h, payload = await read_structured(client)
                assert (h, flags & p.REPLY_FLAG_DONE) == (handle, p.REPLY_FLAG_DONE)
                if byte:
                    assert kind == p.REPLY_TYPE_OFFSET_DATA
                    assert payload == struct.pack(">Q", DATA_AT) + bytes([byte]) * 4096
                else:  # (zeros: one hole chunk)
                    assert kind == p.REPLY_TYPE_OFFSET_HOLE
                    assert payload == struct.pack(">QI", 0, 4096)
            else:
                reply = await read_exactly(client, 16 + 4096)
                assert struct.unpack(">IIQ", reply[:16]) == (p.SIMPLE_REPLY_MAGIC, 0, handle)
                assert reply[16:] == bytes([byte]) * 4096
        assert vbd.stats.read_reqs == reads + 2
        if structured:
            await loop.sock_sendall(client, request(p.CMD_BLOCK_STATUS, 3, 0, DISK))
            flags, kind, h, payload = await read_structured(client)
            assert (kind, h) == (p.REPLY_TYPE_BLOCK_STATUS, 3)
            assert struct.unpack(">I", payload[:4])[0] == p.META_ID_BASE_ALLOCATION
            extents = [struct.unpack(">II", payload[i:i + 8]) for i in range(4, len(payload), 8)]
            assert extents[:2] == [(DATA_AT, 3), (DATA_LEN, 0)]
        assert desk.held == 1 and not server._connections  # (all answered at the desk)
        # FLUSH, then a read behind it: handed over with both (answered in any order)
        await loop.sock_sendall(client, request(p.CMD_FLUSH, 4, 0, 0)
                                + request(p.CMD_READ, 5, DATA_AT + 4096, 512))
        answers = {}
        for _ in range(2):
            head = await read_exactly(client, 16)
            if head[:4] == struct.pack(">I", p.SIMPLE_REPLY_MAGIC):
                _, error, h = struct.unpack(">IIQ", head)
                assert error == 0
                answers[h] = await read_exactly(client, 0 if h == 4 or structured else 512)
                continue
            _, flags, kind, h = struct.unpack(">IHHQ", head)
            (length,) = struct.unpack(">I", await read_exactly(client, 4))
            assert flags & p.REPLY_FLAG_DONE and kind in (p.REPLY_TYPE_NONE,
                                                          p.REPLY_TYPE_OFFSET_DATA)
            answers[h] = (await read_exactly(client, length))[8:]  # (past the offset)
        assert answers == {4: b"", 5: b"\x5a" * 512}
        assert len(server._connections) == 1 and desk.held == 0 and desk.ended == 0
        await loop.sock_sendall(client, request(p.CMD_DISC, 6, 0, 0))
        assert await read_until_end(client) == b""
        client.close()
        await until(lambda: server.connections == 0, "the client's end")
    run_disk(tmp_path, f"qcow2:{img}", body)


def test_block_status_without_a_context_is_the_python_paths(tmp_path) -> None:  # noqa: ANN001
    """No metadata context negotiated: the error (EINVAL) is the Python path's answer."""
    img = qcow2_image(tmp_path)

    async def body(server: NbdServer, desk: Any, vbd: VBD, engine: ThreadEngine) -> None:
        client = await agreed_client(str(tmp_path / "s.sock"), contexts=False)
        await asyncio.get_running_loop().sock_sendall(
            client, request(p.CMD_BLOCK_STATUS, 9, 0, DISK))
        flags, kind, h, payload = await read_structured(client)
        assert (kind, h) == (p.REPLY_TYPE_ERROR, 9)
        assert struct.unpack(">I", payload[:4])[0] == p.NBD_EINVAL
        assert len(server._connections) == 1
        client.close()
    run_disk(tmp_path, f"qcow2:{img}", body)


def test_replies_the_socket_did_not_take_are_sent_first(tmp_path) -> None:  # noqa: ANN001
    """Reads whose replies outgrow the socket's buffer (the client reads nothing yet):
    the desk hands the client over with what was not sent, which goes out before the
    Python path's replies, every byte in order."""
    img = qcow2_image(tmp_path)

    async def body(server: NbdServer, desk: Any, vbd: VBD, engine: ThreadEngine) -> None:
        loop = asyncio.get_running_loop()
        client = await agreed_client(str(tmp_path / "s.sock"), structured=False)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
        # 32 reads of 1 MiB in one send: more than the server's socket takes (4 MiB)
        count, size = 32, 1 << 20
        reqs = b"".join(request(p.CMD_READ, 100 + i, (i * size) % DISK, size)
                        for i in range(count))
        assert len(reqs) < 1024  # (all at the desk at once)
        await loop.sock_sendall(client, reqs)
        await until(lambda: len(server._connections) == 1, "the hand-over")
        assert desk.ended == 0
        data = image_bytes(img)
        for i in range(count):
            reply = await read_exactly(client, 16 + size)
            assert struct.unpack(">IIQ", reply[:16]) == (p.SIMPLE_REPLY_MAGIC, 0, 100 + i)
            at = (i * size) % DISK
            assert reply[16:] == data[at:at + size]
        client.close()
        await until(lambda: server.connections == 0, "the client's end")
    run_disk(tmp_path, f"qcow2:{img}", body)


@pytest.mark.parametrize("how", ["disc", "closed", "gone-unread"])
def test_a_connection_ending_at_the_desk(tmp_path, how) -> None:  # noqa: ANN001
    """DISC, the end of the stream, or a client gone with its replies unread: the desk
    ends the connection itself, and the server goes on serving."""
    img = qcow2_image(tmp_path)

    async def body(server: NbdServer, desk: Any, vbd: VBD, engine: ThreadEngine) -> None:
        loop = asyncio.get_running_loop()
        path = str(tmp_path / "s.sock")
        for n in range(1, 4):
            client = await agreed_client(path)
            if how == "disc":
                await loop.sock_sendall(client, request(p.CMD_DISC, 1, 0, 0))
                assert await read_until_end(client) == b""
            elif how == "gone-unread":
                await loop.sock_sendall(client, b"".join(
                    request(p.CMD_READ, i, 0, 256 * KiB) for i in range(16)))
            client.close()
            await until(lambda n=n: desk.ended == n, "the end at the desk")
            assert not server._connections
        client = await agreed_client(path)
        await loop.sock_sendall(client, request(p.CMD_READ, 7, DATA_AT, 512))
        _, kind, h, payload = await read_structured(client)
        assert (kind, h, payload[8:]) == (p.REPLY_TYPE_OFFSET_DATA, 7, b"\x5a" * 512)
        client.close()
        await until(lambda: server.connections == 0, "the last client's end")
    run_disk(tmp_path, f"qcow2:{img}", body)


def test_a_paused_disk_is_the_python_paths(tmp_path) -> None:  # noqa: ANN001
    """While the disk is paused the desk serves nothing: the client is handed over with
    its request, which waits for the resume as any other."""
    img = qcow2_image(tmp_path)

    async def body(server: NbdServer, desk: Any, vbd: VBD, engine: ThreadEngine) -> None:
        loop = asyncio.get_running_loop()
        client = await agreed_client(str(tmp_path / "s.sock"))
        await vbd.pause()
        await loop.sock_sendall(client, request(p.CMD_READ, 3, DATA_AT, 512))
        await until(lambda: len(server._connections) == 1, "the hand-over")
        drv = await engine.call(open_stack, engine, f"qcow2:{img}", writable=True)
        await vbd.resume(drv)
        _, kind, h, payload = await read_structured(client)
        assert (kind, h, payload[8:]) == (p.REPLY_TYPE_OFFSET_DATA, 3, b"\x5a" * 512)
        client.close()
    run_disk(tmp_path, f"qcow2:{img}", body)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("answer", ["raises", "nonsense"])
def test_a_failing_transmit_leaves_the_client_to_the_python_path(tmp_path, answer) -> None:  # noqa: ANN001
    img = qcow2_image(tmp_path)

    def transmit(*args: Any) -> Any:
        if answer == "raises":
            raise RuntimeError("a bug")
        return (10**6, None, False)  # (more than it was given)

    async def body(server: NbdServer, desk: Any, vbd: VBD, engine: ThreadEngine) -> None:
        desk.transmit = transmit
        client = await agreed_client(str(tmp_path / "s.sock"))
        await asyncio.get_running_loop().sock_sendall(
            client, request(p.CMD_READ, 3, DATA_AT, 512))
        _, kind, h, payload = await read_structured(client)
        assert (kind, h, payload[8:]) == (p.REPLY_TYPE_OFFSET_DATA, 3, b"\x5a" * 512)
        assert len(server._connections) == 1
        client.close()
        with pytest.raises(TypeError):
            desk.transmit = 42
        desk.transmit = None
        assert desk.transmit is None
    run_disk(tmp_path, f"qcow2:{img}", body)


def test_a_long_client_goes_to_the_event_loop(tmp_path) -> None:  # noqa: ANN001
    """The desk serves DESK_PASSES passes of a client's requests; the next request hands
    it over (a long client, fio or a VM, is the event loop's: it batches and polls)."""
    from blktap.transport.nbd import _handshake
    img = qcow2_image(tmp_path)
    passes = _handshake.DESK_PASSES

    async def body(server: NbdServer, desk: Any, vbd: VBD, engine: ThreadEngine) -> None:
        loop = asyncio.get_running_loop()
        client = await agreed_client(str(tmp_path / "s.sock"))
        for handle in range(passes + 2):
            if handle == passes:
                assert desk.held == 1 and not server._connections
            await loop.sock_sendall(client, request(p.CMD_READ, handle, DATA_AT, 512))
            _, kind, h, payload = await read_structured(client)
            assert (kind, h, payload[8:]) == (p.REPLY_TYPE_OFFSET_DATA, handle, b"\x5a" * 512)
        assert desk.held == 0 and len(server._connections) == 1
        client.close()
    run_disk(tmp_path, f"qcow2:{img}", body)


def test_an_interrupt_while_transmit_runs_is_not_lost(tmp_path) -> None:  # noqa: ANN001
    """SIGINT's KeyboardInterrupt raised inside transmit (called in the wait) is raised
    again where the loop's Python checks for signals, not swallowed as unraisable."""
    img = qcow2_image(tmp_path)

    def transmit(*args: Any) -> Any:
        raise KeyboardInterrupt

    async def body(server: NbdServer, desk: Any, vbd: VBD, engine: ThreadEngine) -> None:
        desk.transmit = transmit
        client = await agreed_client(str(tmp_path / "s.sock"))
        await asyncio.get_running_loop().sock_sendall(
            client, request(p.CMD_READ, 3, DATA_AT, 512))
        try:
            await asyncio.sleep(30)  # (the interrupt ends it; lost, the test fails)
        finally:
            client.close()
    with pytest.raises(KeyboardInterrupt):
        run_disk(tmp_path, f"qcow2:{img}", body)


def test_writes_at_the_desk_and_past_its_buffer(tmp_path, shm) -> None:  # noqa: ANN001, F811
    """A write whose payload fits the desk's buffer is served there (to an allocated
    cluster of an image in memory: the pass writes less than a page only to a file in
    memory, elsewhere it would wait for the page); one larger than the buffer hands the client over,
    its payload received by the Python path. qemu-img reads both back."""
    img = qcow2_image(shm)

    async def body(server: NbdServer, desk: Any, vbd: VBD, engine: ThreadEngine) -> None:
        loop = asyncio.get_running_loop()
        client = await agreed_client(str(tmp_path / "s.sock"), structured=False)
        writes = vbd.stats.write_reqs
        await loop.sock_sendall(client, request(p.CMD_WRITE, 1, DATA_AT, 512) + b"\x11" * 512)
        assert struct.unpack(">IIQ", await read_exactly(client, 16)) == (
            p.SIMPLE_REPLY_MAGIC, 0, 1)
        assert vbd.stats.write_reqs == writes + 1
        assert desk.held == 1 and not server._connections  # (served at the desk)
        await loop.sock_sendall(client, request(p.CMD_WRITE, 2, DATA_AT + 4096, 4096)
                                + b"\x22" * 4096)
        assert struct.unpack(">IIQ", await read_exactly(client, 16)) == (
            p.SIMPLE_REPLY_MAGIC, 0, 2)
        assert desk.held == 0 and len(server._connections) == 1
        await loop.sock_sendall(client, request(p.CMD_DISC, 3, 0, 0))
        assert await read_until_end(client) == b""
        client.close()
    run_disk(tmp_path, f"qcow2:{img}", body)
    data = image_bytes(img)
    assert data[DATA_AT:DATA_AT + 512] == b"\x11" * 512
    assert data[DATA_AT + 512:DATA_AT + 4096] == b"\x5a" * (4096 - 512)
    assert data[DATA_AT + 4096:DATA_AT + 8192] == b"\x22" * 4096


@pytest.mark.parametrize("garbage", [
    b"\x00" * 28,  # bad magic
    request(p.CMD_READ, 1, DISK - 512, 1024),  # past the end
    request(p.CMD_READ, 1, 0, 4096, flags=1 << 9),  # unknown flag
    request(77, 1, 0, 0),  # unknown command
], ids=["magic", "past-end", "flag", "command"])
def test_bad_requests_at_the_desk_are_the_python_paths(tmp_path, garbage) -> None:  # noqa: ANN001
    """What the pass does not take is handed over as it came: the Python path answers it
    (an error, or dropping the client for a bad magic), and the server serves the next
    client at the desk."""
    img = qcow2_image(tmp_path)

    async def body(server: NbdServer, desk: Any, vbd: VBD, engine: ThreadEngine) -> None:
        loop = asyncio.get_running_loop()
        path = str(tmp_path / "s.sock")
        client = await agreed_client(path, structured=False)
        await loop.sock_sendall(client, garbage)
        if garbage[:4] == b"\x00" * 4:
            assert await read_until_end(client) == b""  # dropped
        else:
            magic, error, handle = struct.unpack(">IIQ", await read_exactly(client, 16))
            assert (magic, handle) == (p.SIMPLE_REPLY_MAGIC, 1) and error != 0
        assert desk.ended == 0  # (handed over, not ended at the desk)
        client.close()
        other = await agreed_client(path)
        await loop.sock_sendall(other, request(p.CMD_READ, 7, DATA_AT, 512)
                                + request(p.CMD_DISC, 8, 0, 0))
        _, kind, h, payload = await read_structured(other)
        assert (kind, h, payload[8:]) == (p.REPLY_TYPE_OFFSET_DATA, 7, b"\x5a" * 512)
        assert await read_until_end(other) == b""
        other.close()
        await until(lambda: desk.ended == 1, "the second client's end at the desk")
    run_disk(tmp_path, f"qcow2:{img}", body)


def test_a_raw_files_map_is_the_python_paths(tmp_path) -> None:  # noqa: ANN001
    """A raw file's holes are the file system's to tell: the pass declines its block
    status, the client is handed over, and nbdinfo --map is the same as on asyncio's
    loop (no desk)."""
    need("nbdinfo")
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as f:
        f.truncate(DISK)
        f.seek(DATA_AT)
        f.write(b"\x5a" * DATA_LEN)
    uri = f"nbd+unix:///exp?socket={tmp_path}/s.sock"
    maps = {}
    for loop in ("polling", "asyncio"):
        async def body(server: NbdServer, desk: Any, vbd: VBD, engine: ThreadEngine,
                       loop: str = loop) -> None:
            out = await asyncio.to_thread(subprocess.run, ["nbdinfo", "--map", uri],
                                          capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            maps[loop] = out.stdout
            if desk is not None:
                await until(lambda: server.connections == 0, "the client's end")
                assert desk.accepted == 1 and desk.ended == 0
        run_disk(tmp_path, f"aio:{raw}", body, loop=loop, warm=False)
    assert maps["polling"] == maps["asyncio"]
    assert "hole" in maps["polling"] and "data" in maps["polling"]


def test_an_ipv6_peer_is_named_by_its_address(tmp_path, caplog) -> None:  # noqa: ANN001
    """A connection that ends at an IPv6 listener's desk is logged under "[addr]:port"
    as the server's own accept would name it (here ::1, as Python's getpeername says)."""
    need("nbdinfo")

    async def body(server: NbdServer, desk: Any, vbd: VBD, engine: ThreadEngine) -> None:
        try:
            host, port = server.listen_tcp("::1", 0)
        except (OSError, BlktapError):
            pytest.skip("no IPv6 loopback here")
        with caplog.at_level(logging.INFO, logger="blktap.nbd"):
            info = await asyncio.to_thread(
                subprocess.run, ["nbdinfo", "--size", f"nbd://[::1]:{port}/exp"],
                capture_output=True, text=True, timeout=30)
            assert info.returncode == 0, info.stderr
            await until(lambda: server.connections == 0, "the connection's end")
        assert any(r.getMessage().startswith("::1:") and "connected" in r.getMessage()
                   for r in caplog.records)
    run(tmp_path, body)
