"""The ``nbd`` driver (an NBD client) against real servers: qemu-nbd, nbdkit (memory and
file plugins) and our own ``blktap serve``; TLS with a certificate made by openssl; a
server killed and restarted mid-I/O (requests held, then completed); servers answering
garbage (a clear error, never a hang past the timeout); the driver as a leaf under
``blktap serve`` and tapdisk, and as the parent of a VHD (``tap-ctl open -e``)."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from blktap.errors import BlktapError, NbdClientError, UsageError
from blktap.io import ThreadEngine
from blktap.nbdclient.address import Address, parse
from blktap.tapdisk.driver import STATE_ZERO, Caps
from blktap.tapdisk.drivers import open_stack, split_type
from blktap.tapdisk.drivers.nbd import NbdDriver
from conftest import need, run, tool
from nbd_helpers import serve

MiB = 1 << 20
SIZE = 16 * MiB
GUARD = 60  # seconds: a call still running after this hangs (a guard, not a measure)


# ------------------------------------------------------------------------- servers
def _wait_socket(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
        if path.exists():
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(str(path))
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.02)
    raise RuntimeError(f"{path} never accepted")


@contextmanager
def process(argv: list[str], sock: Path) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait_socket(sock, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def qemu_nbd_argv(img: Path, sock: Path, *extra: str) -> list[str]:
    return [need("qemu-nbd"), "-f", "raw", "-k", str(sock), "--persistent",
            "--discard=unmap", "--cache=writeback", *extra, str(img)]


def nbdkit_argv(sock: Path, *plugin: str) -> list[str]:
    return [need("nbdkit"), "-f", "-U", str(sock), *plugin]


def sparse(path: Path, size: int = SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@contextmanager
def peer(kind: str, tmp: Path) -> Iterator[tuple[str, Path | None]]:
    """A server of ``kind`` on a UNIX socket: (the nbd driver's path, the backing file
    or None)."""
    sock = tmp / f"{kind}.sock"
    if kind == "qemu-nbd":
        img = sparse(tmp / "q.img")
        with process(qemu_nbd_argv(img, sock), sock):
            yield str(sock), img
    elif kind == "nbdkit-memory":
        with process(nbdkit_argv(sock, "memory", f"size={SIZE}"), sock):
            yield f"nbd+unix:///?socket={sock}", None
    elif kind == "nbdkit-file":
        img = sparse(tmp / "k.img")
        with process(nbdkit_argv(sock, "file", f"file={img}"), sock):
            yield str(sock), img
    else:
        img = sparse(tmp / "b.img")
        with serve(f"aio:{img}", tmp, "--export-name", "disk", name="b.sock") as srv:
            yield f"nbd+unix:///disk?socket={srv.socket}", img


def drive(body: Callable[[ThreadEngine], Awaitable[None]]) -> None:
    async def main() -> None:
        engine = ThreadEngine(4)
        try:
            await asyncio.wait_for(body(engine), GUARD)
        finally:
            engine.close()
    asyncio.run(main())


async def open_driver(engine: ThreadEngine, path: str, *, writable: bool = True,
                      timeout: float = 30.0) -> NbdDriver:
    drv = await engine.call(NbdDriver.open, engine, path, writable=writable)
    drv.bound_requests(timeout)
    return drv


def pattern(i: int, n: int) -> bytearray:
    return bytearray(struct.pack(">I", i | 0x5A000000) * (n // 4))


# ------------------------------------------------------------------------- addresses
def test_addresses() -> None:
    assert parse("/run/x.sock") == Address(unix="/run/x.sock")
    assert parse("localhost:10810") == Address(host="localhost", port=10810)
    assert parse("[::1]:99") == Address(host="::1", port=99)
    assert parse("nbd://h/my%20disk") == Address(host="h", export="my disk")
    assert parse("nbds://h:7/e?tls-certificates=/c&tls-verify-peer=false") == Address(
        host="h", port=7, export="e", tls=True, tls_certificates="/c", tls_verify=False)
    assert parse("nbds+unix:///e?socket=/s") == Address(unix="/s", export="e", tls=True)
    # A bare name: a socket another process passed to this one under that name.
    assert parse("mirror-0") == Address(passed="mirror-0")
    for bad in ("", "two words", "tab\there", "h:notaport", "h:0", "http://h/x", "nbd+unix:///e",
                "nbd://h/e?socket=/s", "nbd://h/?bogus=1", "nbd://h/?tls-verify-peer=maybe"):
        with pytest.raises(UsageError):
            parse(bad)
    # A whole URI is the nbd driver's path.
    assert split_type("nbds://h/e") == ("nbd", "nbds://h/e")
    assert split_type("nbd:/run/s") == ("nbd", "/run/s")


# ------------------------------------------------------------------------- I/O
@pytest.mark.parametrize("kind", ["qemu-nbd", "nbdkit-memory", "nbdkit-file", "blktap"])
def test_io_against_real_servers(kind: str, tmp_path: Path) -> None:
    """Many reads and writes in flight at once, flush, trim, write zeroes and block
    status, checked against the server's backing file (or read back)."""
    chunk = 64 << 10

    async def body(engine: ThreadEngine, path: str, img: Path | None) -> None:
        drv = await open_driver(engine, path)
        try:
            assert drv.size == SIZE
            assert drv.caps & Caps.WRITE and drv.caps & Caps.FLUSH
            assert drv.caps & Caps.BLOCK_STATUS, kind
            before = await drv.block_status(0, SIZE)
            assert before[0][1] & STATE_ZERO, before  # a fresh disk reads as zeros
            # 64 writes in flight over one connection, then 64 reads.
            await asyncio.gather(*(drv.write(MiB + i * chunk, [memoryview(pattern(i, chunk))])
                                   for i in range(64)))
            await drv.flush()
            bufs = [bytearray(chunk) for _ in range(64)]
            await asyncio.gather(*(drv.read(MiB + i * chunk, [memoryview(bufs[i])])
                                   for i in range(64)))
            assert all(bufs[i] == pattern(i, chunk) for i in range(64))
            # A read spanning several buffers (an iovec) lands in each.
            a, b = bytearray(4096), bytearray(chunk - 4096)
            await drv.read(MiB + 3 * chunk, [memoryview(a), memoryview(b)])
            assert a + b == pattern(3, chunk)
            # Block status: the written range is data, what follows still reads as zeros.
            ext = await drv.block_status(MiB, 4 * MiB)
            assert not ext[0][1] & STATE_ZERO and ext[0][0] >= chunk, ext
            tail = await drv.block_status(MiB + 64 * chunk, MiB)
            assert tail[0][1] & STATE_ZERO, tail
            # Write zeroes (allocated or not) and a trim.
            await drv.write_zeroes(MiB, chunk, may_trim=False, fua=True)
            await drv.write_zeroes(MiB + chunk, chunk)
            await drv.discard(MiB + 2 * chunk, chunk)
            await drv.write(MiB + 2 * chunk, [memoryview(pattern(99, chunk))], fua=True)
            got = bytearray(3 * chunk)
            await drv.read(MiB, [memoryview(got)])
            assert got == bytes(2 * chunk) + pattern(99, chunk)
            await drv.flush()
            if img is not None:
                data = img.read_bytes()
                assert data[MiB : MiB + 3 * chunk] == got
                for i in range(3, 64):
                    off = MiB + i * chunk
                    assert data[off : off + chunk] == pattern(i, chunk)
            # Past the end: zeros, nothing sent.
            assert drv.describe()["connected"]
        finally:
            await drv.close()

    with peer(kind, tmp_path) as (path, img):
        drive(lambda engine: body(engine, path, img))


def test_oldstyle_server_and_simple_replies(tmp_path: Path) -> None:
    """nbdkit in oldstyle: no options, so no structured replies: reads come back as
    simple replies with their data, many in flight."""
    sock = tmp_path / "old.sock"
    chunk = 32 << 10

    async def body(engine: ThreadEngine) -> None:
        drv = await open_driver(engine, str(sock))
        assert drv.client.session.style == "oldstyle"
        assert not drv.client.session.structured and not drv.caps & Caps.BLOCK_STATUS
        # (No flush: nbdkit 1.32's oldstyle advertises it, then refuses it with EINVAL.)
        await asyncio.gather(*(drv.write(i * chunk, [memoryview(pattern(i, chunk))])
                               for i in range(32)))
        bufs = [bytearray(chunk) for _ in range(32)]
        await asyncio.gather(*(drv.read(i * chunk, [memoryview(bufs[i])[:4096],
                                                    memoryview(bufs[i])[4096:]])
                               for i in range(32)))
        assert all(bufs[i] == pattern(i, chunk) for i in range(32))
        assert await drv.block_status(0, MiB) == [(MiB, 0)]
        await drv.close()
        with pytest.raises(NbdClientError) as exc:  # an oldstyle server has no names
            await engine.call(NbdDriver.open, engine, f"nbd+unix:///x?socket={sock}",
                              writable=False)
        assert exc.value.errno == errno.ENOENT

    with process(nbdkit_argv(sock, "-o", "memory", f"size={MiB}"), sock):
        drive(body)


def test_server_errors_are_the_requests_errors(tmp_path: Path) -> None:
    """nbdkit's ``full`` plugin fails every write with ENOSPC: the write fails with
    ENOSPC (the server's message kept), and the connection goes on serving."""
    sock = tmp_path / "full.sock"

    async def body(engine: ThreadEngine) -> None:
        drv = await open_driver(engine, str(sock))
        for _ in range(2):
            with pytest.raises(NbdClientError) as exc:
                await drv.write(0, [memoryview(b"x" * 4096)])
            assert exc.value.errno == errno.ENOSPC and "write" in str(exc.value)
            buf = bytearray(b"?" * 4096)
            await drv.read(0, [memoryview(buf)])
            assert buf == bytes(4096)
        assert drv.client.reconnects == 0
        await drv.close()

    with process(nbdkit_argv(sock, "full", f"size={MiB}"), sock):
        drive(body)


def test_read_only_export_and_missing_export(tmp_path: Path) -> None:
    img = sparse(tmp_path / "ro.img", MiB)
    sock = tmp_path / "ro.sock"

    async def body(engine: ThreadEngine) -> None:
        with pytest.raises(NbdClientError) as exc:
            await engine.call(NbdDriver.open, engine, str(sock), writable=True)
        assert exc.value.errno == errno.EROFS and "read-only" in str(exc.value)
        drv = await open_driver(engine, str(sock), writable=False)
        assert not drv.caps & Caps.WRITE
        await drv.close()
        with pytest.raises(NbdClientError) as exc:
            await engine.call(NbdDriver.open, engine, f"nbd+unix:///nope?socket={sock}",
                              writable=False)
        assert exc.value.errno == errno.ENOENT and "nope" in str(exc.value)
        with pytest.raises(NbdClientError) as exc:
            await engine.call(NbdDriver.open, engine, str(tmp_path / "absent.sock"),
                              writable=False)
        assert exc.value.errno == errno.ENOENT

    with process(qemu_nbd_argv(img, sock, "--read-only", "-x", "disk"), sock):
        # qemu-nbd's only export is "disk": the default name "" is refused, so name it.
        async def named(engine: ThreadEngine) -> None:
            drv = await open_driver(engine, f"nbd+unix:///disk?socket={sock}",
                                    writable=False)
            await drv.close()
        drive(named)
    with process(qemu_nbd_argv(img, sock, "--read-only"), sock):
        drive(body)


def test_tcp_host_port(tmp_path: Path) -> None:
    img = sparse(tmp_path / "t.img", MiB)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    ready = tmp_path / "ready.sock"  # nbdkit listens on TCP; poll it through a socket too
    argv = [need("nbdkit"), "-f", "-i", "127.0.0.1", "-p", str(port), "file", f"file={img}"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.02)

        async def body(engine: ThreadEngine) -> None:
            for path in (f"127.0.0.1:{port}", f"nbd://127.0.0.1:{port}/"):
                drv = await open_driver(engine, path)
                await drv.write(4096, [memoryview(b"tcp!" * 1024)])
                await drv.flush()
                await drv.close()
        drive(body)
        assert img.read_bytes()[4096:8192] == b"tcp!" * 1024
        del ready
    finally:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------- TLS
def make_certs(folder: Path) -> Path:
    """A self-signed CA and a server certificate for localhost it signed, made by
    openssl, in the directory layout qemu-nbd and nbdkit read (and our
    tls-certificates= does)."""
    folder.mkdir()
    openssl = need("openssl")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    steps = [
        [openssl, "req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca-cert.pem",
         "-days", "30", "-subj", "/CN=test CA"],
        [openssl, "req", "-new", *ec, "-keyout", "server-key.pem", "-out", "server.csr",
         "-subj", "/CN=localhost"],
        [openssl, "x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey",
         "ca-key.pem", "-CAcreateserial", "-out", "server-cert.pem", "-days", "30",
         "-extfile", "ext.cnf"],
        # A client certificate too: qemu-nbd asks for one (verify-peer defaults to on).
        [openssl, "req", "-new", *ec, "-keyout", "client-key.pem", "-out", "client.csr",
         "-subj", "/CN=client"],
        [openssl, "x509", "-req", "-in", "client.csr", "-CA", "ca-cert.pem", "-CAkey",
         "ca-key.pem", "-CAcreateserial", "-out", "client-cert.pem", "-days", "30",
         "-extfile", "client.cnf"],
    ]
    (folder / "client.cnf").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=clientAuth\n")
    (folder / "ext.cnf").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for argv in steps:
        res = run(argv, cwd=folder)
        assert res.returncode == 0, res.stderr
    return folder


@pytest.mark.parametrize("kind", ["qemu-nbd", "nbdkit"])
def test_tls(kind: str, tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "pki")
    other = make_certs(tmp_path / "other")
    img = sparse(tmp_path / "tls.img", MiB)
    sock = tmp_path / "tls.sock"
    if kind == "qemu-nbd":
        argv = qemu_nbd_argv(img, sock, "--object",
                             f"tls-creds-x509,id=tls0,dir={certs},endpoint=server",
                             "--tls-creds", "tls0")
    else:
        argv = nbdkit_argv(sock, "--tls=require", f"--tls-certificates={certs}", "file",
                           f"file={img}")

    async def body(engine: ThreadEngine) -> None:
        uri = f"nbds+unix:///?socket={sock}&tls-certificates={certs}"
        drv = await open_driver(engine, uri)
        assert drv.client.session.tls
        await asyncio.gather(*(drv.write(i * 4096, [memoryview(pattern(i, 4096))])
                               for i in range(32)))
        await drv.flush()
        back = bytearray(32 * 4096)
        await drv.read(0, [memoryview(back)])
        assert back == b"".join(pattern(i, 4096) for i in range(32))
        await drv.close()
        # The server's certificate checked: one signed by another CA is refused.
        with pytest.raises(NbdClientError) as exc:
            await engine.call(NbdDriver.open, engine,
                              f"nbds+unix:///?socket={sock}&tls-certificates={other}",
                              writable=True)
        assert exc.value.errno == errno.EACCES and "certificate" in str(exc.value)
        # Without TLS: the server says it wants it, and the error says so.
        with pytest.raises(NbdClientError) as exc:
            await engine.call(NbdDriver.open, engine, str(sock), writable=True)
        assert "TLS" in str(exc.value)

    with process(argv, sock):
        drive(body)
    assert img.read_bytes()[: 32 * 4096] == b"".join(pattern(i, 4096) for i in range(32))


# ------------------------------------------------------------------------- reconnect
def test_a_passed_socket_is_used_once_and_a_reconnect_waits_for_the_next(
        tmp_path: Path) -> None:
    """``nbd:NAME``: the socket passed under NAME (here put in the process's registry
    directly; tests/test_fd_passing.py passes them to a tapdisk) is the connection, taken
    once. When its server dies, requests are held until a new socket is passed under
    the same name, then complete on it; none is lost."""
    from blktap.nbdclient.passed import passed_sockets

    img = sparse(tmp_path / "p.img")
    sock = tmp_path / "p.sock"
    server: dict[str, subprocess.Popen] = {}
    chunk = 64 << 10

    def start() -> None:
        proc = subprocess.Popen(qemu_nbd_argv(img, sock), stderr=subprocess.PIPE, text=True)
        server["p"] = proc
        _wait_socket(sock, proc)

    def pass_one() -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(sock))
        assert passed_sockets().put("passed-disk", s) is False

    async def body(engine: ThreadEngine) -> None:
        pass_one()
        drv = await open_driver(engine, "passed-disk", timeout=GUARD)
        assert "passed-disk" not in passed_sockets().names()  # taken
        with pytest.raises(NbdClientError) as exc:  # once
            await open_driver(engine, "passed-disk")
        assert exc.value.errno == errno.ENOENT
        await drv.write(0, [memoryview(pattern(0, chunk))])
        server["p"].kill()
        server["p"].wait()
        os.unlink(sock)
        held = [asyncio.ensure_future(drv.write(i * chunk, [memoryview(pattern(i, chunk))]))
                for i in range(1, 9)]
        await asyncio.sleep(0.5)
        assert not [t for t in held if t.done()], "requests failed without a connection"
        await engine.call(start)
        await asyncio.sleep(0.3)
        assert not [t for t in held if t.done()], "it reconnected without a passed socket"
        pass_one()
        await asyncio.gather(*held)
        await drv.flush()
        back = bytearray(chunk)
        for i in range(9):
            await drv.read(i * chunk, [memoryview(back)])
            assert back == pattern(i, chunk), i
        assert drv.client.reconnects == 1
        await drv.close()

    start()
    try:
        drive(body)
    finally:
        passed_sockets().close_all()
        server["p"].kill()
        server["p"].wait()
    data = img.read_bytes()
    for i in range(9):
        assert data[i * chunk:(i + 1) * chunk] == pattern(i, chunk)


def test_server_killed_and_restarted_mid_io(tmp_path: Path) -> None:
    """Requests in flight when the server dies, and requests made while it is down, are
    held (not failed) and complete once it is back; none is lost."""
    img = sparse(tmp_path / "r.img")
    sock = tmp_path / "r.sock"
    chunk = 64 << 10
    n = 128  # and n // 2 more: 12 MiB of the 16
    server: dict[str, subprocess.Popen] = {}

    def start() -> None:
        proc = subprocess.Popen(qemu_nbd_argv(img, sock), stderr=subprocess.PIPE, text=True)
        server["p"] = proc
        _wait_socket(sock, proc)

    async def body(engine: ThreadEngine) -> None:
        drv = await open_driver(engine, str(sock), timeout=GUARD)
        first = [asyncio.ensure_future(drv.write(i * chunk, [memoryview(pattern(i, chunk))]))
                 for i in range(n)]
        await asyncio.sleep(0)  # they are on the wire, or queued to it
        server["p"].kill()
        server["p"].wait()
        os.unlink(sock)
        # While the server is down: more writes and reads, all held.
        second = [asyncio.ensure_future(drv.write((n + i) * chunk,
                                                  [memoryview(pattern(n + i, chunk))]))
                  for i in range(n // 2)]
        await asyncio.sleep(0.5)
        assert not [t for t in second if t.done()], "requests failed while the server was down"
        assert not drv.client.connected
        await engine.call(start)
        await asyncio.gather(*first, *second)
        await drv.flush()
        back = bytearray(chunk)
        for i in range(0, n + n // 2, 7):
            await drv.read(i * chunk, [memoryview(back)])
            assert back == pattern(i, chunk), i
        assert drv.client.reconnects >= 1
        assert drv.describe()["connected"]
        await drv.close()

    start()
    try:
        drive(body)
    finally:
        server["p"].kill()
        server["p"].wait()
    data = img.read_bytes()
    for i in range(n + n // 2):
        assert data[i * chunk : (i + 1) * chunk] == pattern(i, chunk), i


def test_server_gone_for_longer_than_the_timeout(tmp_path: Path) -> None:
    img = sparse(tmp_path / "g.img", MiB)
    sock = tmp_path / "g.sock"

    async def body(engine: ThreadEngine, proc: subprocess.Popen) -> None:
        drv = await open_driver(engine, str(sock), timeout=1.0)
        proc.kill()
        proc.wait()
        with pytest.raises(NbdClientError) as exc:
            await drv.read(0, [memoryview(bytearray(4096))])
        assert exc.value.errno == errno.ETIMEDOUT
        assert "not answered" in str(exc.value) and "no connection" in str(exc.value)
        await drv.close()

    with process(qemu_nbd_argv(img, sock), sock) as proc:
        drive(lambda engine: body(engine, proc))


def test_the_vbd_timeout_bounds_held_requests(tmp_path: Path) -> None:
    """The VBD tells the driver its per-request timeout: a disk whose server is gone
    fails its requests after that, not after the driver's default of 120 s."""
    from blktap.tapdisk.vbd import VBD

    img = sparse(tmp_path / "v.img", MiB)
    sock = tmp_path / "v.sock"

    async def body(engine: ThreadEngine, proc: subprocess.Popen) -> None:
        drv = await engine.call(NbdDriver.open, engine, str(sock), writable=True)
        assert drv.client.timeout == 120.0
        vbd = VBD(drv, timeout=1.5)
        assert drv.client.timeout == 1.5
        await vbd.write(0, memoryview(b"v" * 4096))
        proc.kill()
        proc.wait()
        with pytest.raises(BlktapError) as exc:
            await vbd.read(0, memoryview(bytearray(4096)))
        assert exc.value.errno == errno.ETIMEDOUT, exc.value
        await vbd.close()

    with process(qemu_nbd_argv(img, sock), sock) as proc:
        drive(lambda engine: body(engine, proc))


# ------------------------------------------------------------------------- garbage
class BadServer:
    """A tiny NBD server that negotiates correctly (fixed newstyle, structured replies,
    GO) and then answers every request the way ``mode`` says."""

    def __init__(self, path: Path, mode: str) -> None:
        self.mode = mode
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen(8)
        self.conns: list[socket.socket] = []
        self.servers: list[threading.Thread] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop every thread before closing the sockets: a thread still blocked in a
        socket call while its socket is closed may wake up on the same descriptor number,
        reused by a later test's socket, and take that test's bytes."""
        self.stopping.set()
        for s in (self.listener, *self.conns):
            try:
                s.shutdown(socket.SHUT_RDWR)  # (wakes accept and recv)
            except OSError:
                pass
        for t in (self.thread, *self.servers):
            t.join(GUARD)
        self.listener.close()
        for c in self.conns:
            c.close()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            server = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.servers.append(server)
            server.start()

    @staticmethod
    def _recv(conn: socket.socket, n: int) -> bytes:
        out = b""
        while len(out) < n:
            got = conn.recv(n - len(out))
            if not got:
                raise ConnectionError
            out += got
        return out

    def _serve(self, c: socket.socket) -> None:
        try:
            if self.mode == "bad-greeting":
                c.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
                return
            c.sendall(struct.pack(">QQH", 0x4E42444D41474943, 0x49484156454F5054, 3))
            self._recv(c, 4)
            while True:
                _, opt, length = struct.unpack(">QII", self._recv(c, 16))
                self._recv(c, length)
                if opt == 8:  # STRUCTURED_REPLY
                    c.sendall(struct.pack(">QIII", 0x3E889045565A9, opt, 1, 0))
                elif opt == 7 and self.mode == "no-go":  # as an old server: unknown
                    c.sendall(struct.pack(">QIII", 0x3E889045565A9, opt, (1 << 31) + 1, 0))
                elif opt == 1:  # EXPORT_NAME: size and flags, no zeroes (agreed)
                    c.sendall(struct.pack(">QH", MiB, 1 | 4))
                    break
                elif opt == 7:  # GO
                    info = struct.pack(">HQH", 0, MiB, 1 | 4)
                    c.sendall(struct.pack(">QIII", 0x3E889045565A9, opt, 3, len(info)) + info)
                    c.sendall(struct.pack(">QIII", 0x3E889045565A9, opt, 1, 0))
                    break
                else:
                    c.sendall(struct.pack(">QIII", 0x3E889045565A9, opt, (1 << 31) + 1, 0))
            if self.mode == "no-read":  # takes nothing more: the client's sends stall
                self.stopping.wait(GUARD)
                return
            while True:
                _, _, cmd, handle, offset, length = struct.unpack(">IHHQQI",
                                                                  self._recv(c, 28))
                if cmd == 1:
                    self._recv(c, length)
                if self.mode == "bad-magic":
                    c.sendall(struct.pack(">IIQ", 0xDEADBEEF, 0, handle))
                elif self.mode == "wrong-handle":
                    c.sendall(struct.pack(">IHHQI", 0x668E33EF, 1, 0, handle + 12345, 0))
                elif self.mode == "oversized":
                    # A data chunk claiming 1 GiB for a 4 KiB read.
                    c.sendall(struct.pack(">IHHQIQ", 0x668E33EF, 1, 1, handle, (1 << 30) + 8,
                                          offset))
                elif self.mode == "outside":
                    c.sendall(struct.pack(">IHHQIQ", 0x668E33EF, 1, 1, handle, 8 + length,
                                          offset + 512) + bytes(length))
                elif self.mode == "no-go":  # a correct answer: a read gives 0x77s
                    if cmd == 0:
                        c.sendall(struct.pack(">IHHQIQ", 0x668E33EF, 1, 1, handle, 8 + length,
                                              offset) + b"\x77" * length)
                    else:
                        c.sendall(struct.pack(">IIQ", 0x67446698, 0, handle))
                elif self.mode == "short":
                    c.sendall(struct.pack(">IHHQI", 0x668E33EF, 1, 0, handle, 0))
                # "silent": never answers
        except (OSError, ConnectionError):
            pass


@pytest.mark.parametrize("mode,words", [
    ("bad-magic", "bad reply magic"),
    ("wrong-handle", "not in flight"),
    ("oversized", "answer to a read"),
    ("outside", "answer to a read"),
    ("short", "answered with 0"),
    ("silent", "not answered"),
])
def test_garbage_answers_fail_clearly(mode: str, words: str, tmp_path: Path) -> None:
    sock = tmp_path / "bad.sock"
    srv = BadServer(sock, mode)

    async def body(engine: ThreadEngine) -> None:
        drv = await open_driver(engine, str(sock), writable=False, timeout=2.0)
        for _ in range(2):  # and again, on a new connection: no wedged state
            with pytest.raises(NbdClientError) as exc:
                await drv.read(0, [memoryview(bytearray(4096))])
            expect = errno.ETIMEDOUT if mode == "silent" else errno.EPROTO
            assert exc.value.errno == expect, exc.value
            assert words in str(exc.value), exc.value
        await drv.close()

    try:
        drive(body)
    finally:
        srv.close()


def test_a_server_without_go_gets_export_name(tmp_path: Path) -> None:
    sock = tmp_path / "old.sock"
    srv = BadServer(sock, "no-go")

    async def body(engine: ThreadEngine) -> None:
        drv = await open_driver(engine, str(sock), writable=False)
        assert drv.size == MiB and drv.client.session.structured
        assert not drv.caps & Caps.BLOCK_STATUS  # no context without GO
        buf = bytearray(8192)
        await drv.read(4096, [memoryview(buf)])
        assert buf == b"\x77" * 8192
        await drv.flush()
        await drv.close()

    try:
        drive(body)
    finally:
        srv.close()


def test_a_server_that_reads_nothing(tmp_path: Path) -> None:
    """Writes stuck in a full socket fail at the timeout; the connection is dropped (what
    was queued never leaves from buffers handed back) and the driver closes at once."""
    sock = tmp_path / "stuck.sock"
    srv = BadServer(sock, "no-read")

    async def body(engine: ThreadEngine) -> None:
        drv = await open_driver(engine, str(sock), timeout=1.0)
        data = memoryview(bytearray(MiB // 4))  # 1 MiB in all: more than a socket holds
        drv.client._start()
        first = drv.client.conn
        assert first is not None and first.alive
        results = await asyncio.gather(*(drv.write(i * MiB // 4, [data]) for i in range(4)),
                                       return_exceptions=True)
        assert all(isinstance(r, NbdClientError) and r.errno == errno.ETIMEDOUT
                   for r in results), results
        assert not first.alive  # dropped, not left with a half-sent request in it
        await drv.close()

    try:
        drive(body)
    finally:
        srv.close()


def test_garbage_greeting(tmp_path: Path) -> None:
    sock = tmp_path / "bad.sock"
    srv = BadServer(sock, "bad-greeting")

    async def body(engine: ThreadEngine) -> None:
        with pytest.raises(NbdClientError) as exc:
            await engine.call(NbdDriver.open, engine, str(sock), writable=False)
        assert exc.value.errno == errno.EPROTO and "not an NBD server" in str(exc.value)

    try:
        drive(body)
    finally:
        srv.close()


# ------------------------------------------------------------------------- stacks
def test_blktap_serve_and_tapdisk_leaf(tmp_path: Path) -> None:
    """``blktap serve nbd:...`` re-exports a qemu-nbd disk; qemu-io writes through it and
    the image behind qemu-nbd has the bytes."""
    img = sparse(tmp_path / "leaf.img", 4 * MiB)
    sock = tmp_path / "q.sock"
    with process(qemu_nbd_argv(img, sock), sock), \
            serve(f"nbd:{sock}", tmp_path, name="front.sock") as srv:
        res = run([need("qemu-io"), "-f", "raw", "-c", "write -P 0x5a 512k 1M",
                   "-c", "flush", srv.uri], text=True)
        assert res.returncode == 0, res.stderr
        res = run([need("qemu-img"), "compare", "-f", "raw", "-F", "raw", srv.uri,
                   str(img)], text=True)
        assert res.returncode == 0, res.stdout + res.stderr
        res = run([need("nbdinfo"), "--map", srv.uri], text=True)
        assert res.returncode == 0 and "data" in res.stdout and "hole" in res.stdout, \
            res.stdout + res.stderr
    assert img.read_bytes()[512 << 10 : (512 << 10) + MiB] == b"\x5a" * MiB


def test_served_disk_survives_its_server_restarting(tmp_path: Path) -> None:
    """End to end: ``blktap serve nbd:...`` in front of qemu-nbd; qemu-nbd is killed, a
    client (qemu-img bench, 16 writes in flight) writes through the front meanwhile, and
    qemu-nbd comes back: the client sees no error and every byte lands."""
    img = sparse(tmp_path / "back.img", 32 * MiB)
    sock = tmp_path / "back.sock"
    with serve_behind(img, sock, tmp_path) as (srv, restart):
        restart(kill_only=True)
        bench = subprocess.Popen([need("qemu-img"), "bench", "-f", "raw", "-w", "-c", "512",
                                  "-d", "16", "-s", "65536", "-S", "65536",
                                  "--pattern=0x5a", srv.uri],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)  # its requests reach the front and are held there
        assert bench.poll() is None, bench.communicate()
        restart()
        out, err = bench.communicate(timeout=GUARD)
        assert bench.returncode == 0, out + err
    assert img.read_bytes() == b"\x5a" * (32 * MiB)


@contextmanager
def serve_behind(img: Path, sock: Path, tmp: Path) -> Iterator[tuple]:
    """qemu-nbd on ``img`` and ``blktap serve nbd:SOCK`` in front; ``restart()`` kills
    qemu-nbd (and starts it again unless ``kill_only``)."""
    procs: list[subprocess.Popen] = []

    def start() -> None:
        proc = subprocess.Popen(qemu_nbd_argv(img, sock), stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        _wait_socket(sock, proc)

    def restart(kill_only: bool = False) -> None:
        procs[-1].kill()
        procs[-1].wait()
        if kill_only:
            sock.unlink()
        else:
            start()

    start()
    try:
        with serve(f"nbd:{sock}", tmp, "--timeout", str(GUARD), name="front.sock") as srv:
            yield srv, restart
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_open_stack_refuses_a_key_and_unknown_specs(tmp_path: Path) -> None:
    async def body(engine: ThreadEngine) -> None:
        with pytest.raises(BlktapError) as exc:
            await engine.call(open_stack, engine, "nbd:/x/y.sock", writable=False,
                              key=b"k" * 32)
        assert exc.value.errno == errno.EINVAL
        # A bare word names a passed socket; none was passed under it.
        with pytest.raises(BlktapError) as exc:
            await engine.call(open_stack, engine, "nbd:justaword", writable=False)
        assert exc.value.errno == errno.ENOENT
        assert "no socket was passed under that name" in str(exc.value)
    drive(body)


def test_tap_ctl_create_on_nbd(tmp_path: Path) -> None:
    """tapdisk serves an ``nbd:`` leaf: tap-ctl create -a nbd:SOCKET."""
    from test_tap_ctl_daemon import Host

    host = Host(tmp_path)
    img = tmp_path / "q.img"
    img.write_bytes(b"q" * MiB)
    sock = tmp_path / "q.sock"
    with process(qemu_nbd_argv(img, sock), sock):
        pid, minor = host.create(f"nbd:{sock}", "-R")
        try:
            host.serving(pid, minor, MiB)
            res = run([need("qemu-io"), "-f", "raw", "-r", "-c", f"read -P 0x71 0 {MiB}",
                       host.nbd(pid, minor)], text=True)
            assert res.returncode == 0 and "verification failed" not in res.stdout, \
                res.stdout + res.stderr
            host.out("destroy", "-p", str(pid), "-m", str(minor))
        finally:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_tap_ctl_open_e_parent(tmp_path: Path) -> None:
    """``tap-ctl open -e MINOR`` stacks a differencing VHD on what another tapdisk
    serves: the parent named by its locator is not opened (it was moved away)."""
    from test_tap_ctl_daemon import Host

    host = Host(tmp_path)
    vhd_util = tool("vhd-util")
    base = tmp_path / "base.vhd"
    child = tmp_path / "child.vhd"
    assert run([vhd_util, "create", "-n", str(base), "-s", "8"]).returncode == 0
    pids: list[int] = []
    try:
        pid_a, minor_a = host.create(f"vhd:{base}")
        pids.append(pid_a)
        res = run([need("qemu-io"), "-f", "raw", "-c", "write -P 0x11 0 2M",
                   "-c", "write -P 0x22 6M 1M", host.nbd(pid_a, minor_a)], text=True)
        assert res.returncode == 0, res.stderr
        res = run([vhd_util, "snapshot", "-n", str(child), "-p", str(base)], text=True)
        assert res.returncode == 0, res.stderr
        os.rename(base, tmp_path / "moved.vhd")  # the locator now names nothing
        # Without -e, the child's parent is missing.
        code, _, err = host.tap_ctl("create", "-a", f"vhd:{child}", ok=False)
        assert code == errno.ENOENT, err
        # With -e: the parent is tapdisk A's disk.
        pid_b, minor_b = host.create(f"vhd:{child}", "-e", str(minor_a))
        pids.append(pid_b)
        uri = host.nbd(pid_b, minor_b)
        res = run([need("qemu-io"), "-f", "raw", "-c", "read -P 0x11 0 2M",
                   "-c", "read -P 0x22 6M 1M", "-c", "read -P 0 2M 4M",
                   "-c", "write -P 0x33 1M 512k", "-c", "read -P 0x33 1M 512k",
                   "-c", "read -P 0x11 1536k 512k", uri], text=True)
        assert res.returncode == 0 and "Pattern verification failed" not in res.stdout, \
            res.stdout + res.stderr
        # The write went to the child only: A still serves 0x11 there.
        res = run([need("qemu-io"), "-f", "raw", "-r", "-c", "read -P 0x11 1M 512k",
                   host.nbd(pid_a, minor_a)], text=True)
        assert "Pattern verification failed" not in res.stdout, res.stdout
        stats = host.out("stats", "-p", str(pid_b), "-m", str(minor_b))
        assert '"name": "nbd"' in stats or '"nbd"' in stats, stats
        # -e with a minor nobody serves: ENOENT, said plainly.
        code, _, err = host.tap_ctl("create", "-a", f"vhd:{child}", "-e", "999", ok=False)
        assert code == errno.ENOENT, (code, err)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_image_commands_say_an_nbd_disk_is_not_a_file() -> None:
    for argv in (["info", "nbd:/run/x.sock"], ["map", "nbds://h/e"],
                 ["compare", "nbd+unix:///?socket=/s", "/dev/null"]):
        res = run([tool("blktap"), *argv], text=True)
        assert res.returncode == errno.EINVAL, (argv, res.stderr)
        assert "not an image file" in res.stderr, res.stderr
