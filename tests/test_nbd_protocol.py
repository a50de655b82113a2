"""The NBD server against a raw client that breaks the rules on purpose: unknown options,
bad magic, garbage, requests past the end or over the maximum, unknown commands and
flags, writes to a read-only export, clients vanishing mid-request or mid-handshake,
100 clients at once, TLS. The server answers per the spec or drops only that client."""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import run
from nbd_helpers import Served, Wire, serve

MiB = 1 << 20
SIZE = 40 * MiB  # over the 32 MiB request maximum (a sparse file)
ERR_UNSUP, ERR_INVALID, ERR_TLS_REQD, ERR_UNKNOWN = (2**31 + 1, 2**31 + 3, 2**31 + 5,
                                                     2**31 + 6)
READ, WRITE, DISC, FLUSH, TRIM, CACHE, ZEROES, STATUS = range(8)
EINVAL, EPERM, ENOSPC, ENOTSUP = 22, 1, 28, 95


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, Path]]:
    folder = tmp_path_factory.mktemp("nbdproto")
    img = folder / "disk.img"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    with serve(f"aio:{img}", folder) as srv:
        yield srv, img


@pytest.fixture(scope="module")
def ro_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, Path]]:
    folder = tmp_path_factory.mktemp("nbdro")
    img = folder / "disk.img"
    img.write_bytes(b"r" * SIZE)
    with serve(f"aio:{img}", folder, "--read-only") as srv:
        yield srv, img


def alive(srv: Served) -> None:
    """The server still serves a new client correctly."""
    assert srv.proc.poll() is None
    w = Wire(srv.socket)
    w.go()
    w.request(READ, 0, 512, handle=77)
    handle, error, data = w.reply(512)
    assert (handle, error, len(data)) == (77, 0, 512)
    w.request(DISC)
    w.close()


def test_options_unknown_unsupported_and_listing(disk: tuple[Served, Path]) -> None:
    srv, _ = disk
    w = Wire(srv.socket)
    assert w.greet() == 3  # FIXED_NEWSTYLE | NO_ZEROES
    for opt in (99, 4, 11):  # unknown, PEEK_EXPORT, EXTENDED_HEADERS
        w.option(opt, b"junk")
        assert w.option_reply()[1] == ERR_UNSUP
    w.option(3)  # LIST
    replies = w.replies_until_final()
    assert [k for k, _ in replies] == [2, 1]
    assert replies[0][1][:4] == b"\0\0\0\0"  # the default export's name is ""
    w.option(3, b"x")
    assert w.option_reply()[1] == ERR_INVALID
    w.option(5)  # STARTTLS without TLS configured
    assert w.option_reply()[1] == ERR_UNSUP
    w.option(6, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0))
    assert w.option_reply()[1] == ERR_UNKNOWN
    w.option(6, struct.pack(">I", 40) + b"x")  # name runs past the option
    assert w.option_reply()[1] == ERR_INVALID
    w.option(10, struct.pack(">II", 0, 0))  # SET_META_CONTEXT before STRUCTURED_REPLY
    assert w.option_reply()[1] == ERR_INVALID
    w.option(8)
    assert w.option_reply()[1] == 1
    q = b"base:"
    w.option(9, struct.pack(">III", 0, 1, len(q)) + q)  # LIST_META_CONTEXT base:
    replies = w.replies_until_final()
    assert replies[0][0] == 4 and replies[0][1][4:] == b"base:allocation"
    w.option(6, struct.pack(">IHHH", 0, 2, 1, 2))  # INFO asking for name, description
    infos = {struct.unpack(">H", d[:2])[0]: d[2:] for k, d in w.replies_until_final()
             if k == 3}
    size, flags = struct.unpack(">QH", infos[0])
    assert size == SIZE and flags & 1 and not flags & 2
    assert struct.unpack(">III", infos[3]) == (1, 4096, 32 * MiB)
    assert infos[2].startswith(b"aio:")
    w.option(7, struct.pack(">IH", 0, 0))  # GO
    assert w.replies_until_final()[-1][0] == 1
    w.request(READ, 4096, 4096)
    assert w.reply(4096)[1] == 0
    w.close()


def test_export_name_option(disk: tuple[Served, Path]) -> None:
    srv, _ = disk
    w = Wire(srv.socket)
    w.greet()
    w.option(1, b"")  # EXPORT_NAME "" with NO_ZEROES: size and flags only
    size, flags = struct.unpack(">QH", w.recv(10))
    assert size == SIZE and flags & 1
    w.request(READ, 0, 512, handle=5)
    assert w.reply(512)[:2] == (5, 0)
    w.close()
    w = Wire(srv.socket)
    w.greet()
    w.option(1, b"no-such-export")  # cannot be answered: dropped
    assert w.closed_by_server()
    w.close()
    alive(srv)


@pytest.mark.parametrize("garbage", [
    b"\x00" * 4,                           # client flags with unknown bits... none: ok
    struct.pack(">I", 0x80),               # unknown client flag
    struct.pack(">I", 3) + b"NOTMAGIC" + b"\0" * 8,  # wrong option magic
    struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 7, 1 << 30),  # huge
])
def test_bad_handshakes_are_dropped(disk: tuple[Served, Path], garbage: bytes) -> None:
    srv, _ = disk
    w = Wire(srv.socket)
    w.recv(18)
    w.sock.sendall(garbage)
    if garbage == b"\x00" * 4:  # non-fixed newstyle: only EXPORT_NAME is acceptable
        w.option(3)
    assert w.closed_by_server()
    w.close()
    alive(srv)


def test_disconnect_mid_handshake(disk: tuple[Served, Path]) -> None:
    srv, _ = disk
    for cut in (0, 2, 4 + 10, 4 + 16 + 3):
        w = Wire(srv.socket)
        w.recv(18)
        msg = struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 7, 8) + b"\0" * 8
        w.sock.sendall(msg[:cut])
        w.close()
    alive(srv)


def _option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", 0x49484156454F5054, opt, len(data)) + data


def test_whole_conversation_in_one_write(disk: tuple[Served, Path]) -> None:
    """Client flags, every option, a read and DISC sent at once: each option is answered
    in order, and the read that came with GO is served by the transmission that follows
    (the handshake leaves it buffered, and no further readiness will come for it)."""
    srv, img = disk
    q = b"base:allocation"
    w = Wire(srv.socket)
    w.recv(18)
    w.sock.sendall(struct.pack(">I", 3) + _option(8)
                   + _option(10, struct.pack(">III", 0, 1, len(q)) + q)
                   + _option(7, struct.pack(">IH", 0, 0))
                   + struct.pack(">IHHQQI", 0x25609513, 0, READ, 9, 8192, 512))
    assert w.option_reply()[:2] == (8, 1)
    assert [k for k, _ in w.replies_until_final()] == [4, 1]
    assert w.replies_until_final()[-1][0] == 1
    w.structured = True
    with open(img, "rb") as f:
        f.seek(8192)
        expected = f.read(512)
    assert w.reply(512) == (9, 0, expected)
    w.request(DISC)
    assert w.closed_by_server()
    w.close()


def test_handshake_a_byte_at_a_time(disk: tuple[Served, Path]) -> None:
    """Every message cut into single bytes, each sent on its own: the server puts them
    together (a message may arrive in any number of pieces)."""
    srv, _ = disk
    w = Wire(srv.socket)
    w.recv(18)
    conversation = (struct.pack(">I", 3) + _option(8) + _option(6, struct.pack(">IH", 0, 0))
                    + _option(7, struct.pack(">IH", 0, 0)))
    for i in range(len(conversation)):
        w.sock.send(conversation[i : i + 1])
        if i % 7 == 0:
            time.sleep(0.001)  # (some bytes alone in the socket when the server looks)
    assert w.option_reply()[:2] == (8, 1)
    assert w.replies_until_final()[-1][0] == 1  # INFO
    assert w.replies_until_final()[-1][0] == 1  # GO
    w.structured = True
    w.request(READ, 0, 512, handle=3)
    assert w.reply(512)[:2] == (3, 0)
    w.close()
    alive(srv)


def test_over_long_option_is_skipped_in_pieces(disk: tuple[Served, Path]) -> None:
    """An option with more data than the server reads (64 KiB) is dropped as it comes, in
    pieces, and refused with ERR_TOO_BIG; the negotiation goes on."""
    srv, _ = disk
    w = Wire(srv.socket)
    w.greet()
    data = b"x" * (200 << 10)
    w.sock.sendall(struct.pack(">QII", 0x49484156454F5054, 3, len(data)))
    for i in range(0, len(data), 24 << 10):
        w.sock.sendall(data[i : i + (24 << 10)])
        time.sleep(0.002)
    opt, kind, _ = w.option_reply()
    assert (opt, kind) == (3, 2**31 + 9)  # ERR_TOO_BIG
    w.option(3)  # LIST, answered as usual
    assert [k for k, _ in w.replies_until_final()] == [2, 1]
    w.option(7, struct.pack(">IH", 0, 0))
    assert w.replies_until_final()[-1][0] == 1
    w.close()


def test_long_options_within_the_limit_are_answered(disk: tuple[Served, Path]) -> None:
    """An option of almost 64 KiB (longer than a connection's first receive buffer)
    is read whole and answered, whether it arrives at once or in pieces; then the
    connection serves as usual."""
    srv, _ = disk
    queries = [f"nothing{i:03d}:".encode() + b"x" * 240 for i in range(250)]
    data = struct.pack(">II", 0, len(queries)) + b"".join(
        struct.pack(">I", len(q)) + q for q in queries)
    assert 60 << 10 < len(data) <= 64 << 10
    for pieces in (False, True):
        w = Wire(srv.socket)
        w.greet()
        w.option(8)  # STRUCTURED_REPLY
        assert w.option_reply()[:2] == (8, 1)
        if pieces:
            msg = struct.pack(">QII", 0x49484156454F5054, 9, len(data)) + data
            for i in range(0, len(msg), 7 << 10):
                w.sock.sendall(msg[i : i + (7 << 10)])
                time.sleep(0.002)
        else:
            w.option(9, data)  # LIST_META_CONTEXT, of namespaces nobody serves
        assert w.replies_until_final() == [(1, b"")]  # no context, and the ACK
        w.option(7, struct.pack(">IH", 0, 0))
        assert w.replies_until_final()[-1][0] == 1
        w.request(READ, 0, 512, handle=5)
        assert w.reply(512)[:2] == (5, 0)
        w.request(DISC)
        w.close()


def test_abort_is_acknowledged_then_closed(disk: tuple[Served, Path]) -> None:
    """ABORT gets its ACK before the server closes (the handshake's answers leave before
    the close, which happens from the same readiness callback)."""
    srv, _ = disk
    w = Wire(srv.socket)
    w.greet()
    w.option(8)
    assert w.option_reply()[:2] == (8, 1)
    w.option(2)  # ABORT
    assert w.option_reply()[:2] == (2, 1)
    assert w.closed_by_server()
    w.close()
    alive(srv)


def test_too_many_options_drop_the_client(disk: tuple[Served, Path]) -> None:
    """1024 options are answered; the 1025th drops the client (it is not negotiating)."""
    srv, _ = disk
    w = Wire(srv.socket)
    w.greet()
    w.sock.sendall(_option(8) * 1025)
    for _ in range(1024):
        assert w.option_reply()[:2] == (8, 1)
    assert w.closed_by_server()
    w.close()
    alive(srv)


def test_out_of_file_descriptors_the_listener_rests(tmp_path: Path) -> None:
    """A server allowed 40 open files, and 60 clients at once: those it cannot take wait
    in the listen queue while it rests (it says so), and once clients leave, the next
    ones get in and are served."""
    img = tmp_path / "disk.img"
    img.write_bytes(b"f" * MiB)
    with serve(f"aio:{img}", tmp_path, fd_limit=40) as srv:
        crowd = []
        for _ in range(60):
            w = Wire(srv.socket)
            crowd.append(w)
        greeted = 0
        for w in crowd:
            w.sock.settimeout(0.5)
            try:
                w.recv(18)
                greeted += 1
            except (TimeoutError, ConnectionError, OSError):
                pass
        assert 0 < greeted < 60  # some had to wait: the process ran out of files
        for w in crowd:
            w.close()
        w = Wire(srv.socket, timeout=30)
        w.go()
        w.request(READ, 0, 512, handle=4)
        assert w.reply(512) == (4, 0, b"f" * 512)
        w.close()
        assert srv.proc.poll() is None
        srv.stop()
        assert "pausing" in srv.stderr


@pytest.mark.parametrize("structured", [False, True])
def test_request_errors(disk: tuple[Served, Path], structured: bool) -> None:
    srv, img = disk
    w = Wire(srv.socket)
    w.go(structured=structured, meta=False)
    cases = [
        (dict(cmd=READ, offset=SIZE - 512, length=1024), EINVAL),
        (dict(cmd=READ, offset=0, length=32 * MiB + 512), EINVAL),
        (dict(cmd=TRIM, offset=SIZE, length=512), EINVAL),
        (dict(cmd=ZEROES, offset=SIZE - 512, length=1024), ENOSPC),
        (dict(cmd=42, offset=0, length=0), EINVAL),
        (dict(cmd=READ, offset=0, length=512, flags=1 << 9), EINVAL),
        (dict(cmd=FLUSH, offset=512, length=0), EINVAL),
        (dict(cmd=STATUS, offset=0, length=512), EINVAL),  # no meta context negotiated
        (dict(cmd=WRITE, offset=SIZE - 512, length=1024, data=b"w" * 1024), ENOSPC),
        (dict(cmd=WRITE, offset=0, length=32 * MiB + 512, data=b"v" * (32 * MiB + 512)),
         EINVAL),
        (dict(cmd=WRITE, offset=0, length=512, flags=1 << 4, data=b"f" * 512), EINVAL),
    ]
    for i, (req, want) in enumerate(cases):
        w.request(handle=100 + i, **req)
        handle, error, _ = w.reply()
        assert (handle, error) == (100 + i, want), req
    # The connection is still in step: a read of 0 bytes and a real read work.
    w.request(READ, 0, 0, handle=1)
    assert w.reply()[:2] == (1, 0)
    w.request(READ, 0, 512, handle=2)
    assert w.reply(512) == (2, 0, bytes(512))
    w.request(DISC)
    w.close()
    assert img.read_bytes()[:4096] == bytes(4096)  # refused writes left nothing


def test_garbage_and_absurd_writes_drop_only_that_client(disk: tuple[Served, Path]) -> None:
    srv, _ = disk
    other = Wire(srv.socket)
    other.go()
    w = Wire(srv.socket)
    w.go()
    w.sock.sendall(os.urandom(64))  # not a request: bad magic
    assert w.closed_by_server()
    w = Wire(srv.socket)
    w.go()
    w.request(WRITE, 0, 1 << 30)  # a 1 GiB payload is not read to be refused
    assert w.closed_by_server()
    other.request(READ, 0, 512, handle=9)
    assert other.reply(512)[:2] == (9, 0)
    other.close()
    alive(srv)


def test_disconnect_mid_request_loses_nothing_acknowledged(disk: tuple[Served, Path]) -> None:
    srv, img = disk
    w = Wire(srv.socket)
    w.go()
    w.request(WRITE, 2 * MiB, 4096, handle=1, data=b"A" * 4096)
    assert w.reply() == (1, 0, b"")
    w.request(FLUSH, handle=2)
    assert w.reply()[:2] == (2, 0)
    # A write whose payload never fully arrives, then the client vanishes.
    w.request(WRITE, 3 * MiB, MiB, handle=3, data=b"B" * 1000)
    w.close()
    alive(srv)
    data = img.read_bytes()
    assert data[2 * MiB : 2 * MiB + 4096] == b"A" * 4096
    assert data[3 * MiB : 4 * MiB] == bytes(MiB)


def test_disc_answers_requests_in_flight(disk: tuple[Served, Path]) -> None:
    srv, img = disk
    w = Wire(srv.socket)
    w.go()
    payload = os.urandom(64 * 1024)
    for i in range(16):
        w.request(WRITE, 4 * MiB + i * len(payload), len(payload), handle=i, data=payload)
    w.request(DISC)
    handles = sorted(w.reply()[0] for _ in range(16))
    assert handles == list(range(16))
    assert w.closed_by_server()
    w.close()
    assert img.read_bytes()[4 * MiB : 5 * MiB] == payload * 16


def test_block_status_req_one(disk: tuple[Served, Path]) -> None:
    srv, _ = disk
    w = Wire(srv.socket)
    w.go()
    w.request(STATUS, 0, SIZE, handle=1, flags=1 << 3)
    handle, error, payload = w.reply()
    assert (handle, error) == (1, 0)
    ctx, length, _flags = struct.unpack(">III", payload)
    assert ctx == 1 and 0 < length <= SIZE
    w.request(STATUS, 0, SIZE, handle=2)
    _, _, payload = w.reply()
    runs = struct.unpack(f">I{(len(payload) - 4) // 4}I", payload)[1:]
    assert sum(runs[0::2]) == SIZE
    w.close()


def test_read_only_export(ro_disk: tuple[Served, Path]) -> None:
    srv, img = ro_disk
    w = Wire(srv.socket)
    w.go()
    assert w.flags & 2  # READ_ONLY
    assert not w.flags & (1 << 5) and not w.flags & (1 << 6)  # no TRIM, WRITE_ZEROES
    for i, (cmd, data) in enumerate([(WRITE, b"x" * 512), (TRIM, b""), (ZEROES, b"")]):
        w.request(cmd, 0, 512, handle=i, data=data)
        assert w.reply()[:2] == (i, EPERM)
    w.request(FLUSH, handle=9)
    assert w.reply()[:2] == (9, 0)
    w.close()
    assert img.read_bytes()[:512] == b"r" * 512


def test_a_hundred_connections_at_once(disk: tuple[Served, Path]) -> None:
    srv, img = disk
    clients = [Wire(srv.socket, timeout=30) for _ in range(100)]
    errors: list[BaseException] = []

    def work(i: int, w: Wire) -> None:
        try:
            w.go()
            w.request(WRITE, 6 * MiB + i * 4096, 4096, handle=i, data=bytes([i]) * 4096,
                      flags=1)  # FUA
            assert w.reply() == (i, 0, b"")
            w.request(READ, 6 * MiB + i * 4096, 4096, handle=i + 1000)
            assert w.reply(4096) == (i + 1000, 0, bytes([i]) * 4096)
            w.request(DISC)
        except BaseException as exc:  # collected for the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, w)) for i, w in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for w in clients:
        w.close()
    assert not errors, errors[:3]
    data = img.read_bytes()
    for i in range(100):
        assert data[6 * MiB + i * 4096 : 6 * MiB + (i + 1) * 4096] == bytes([i]) * 4096
    alive(srv)


# ------------------------------------------------------------------------- TLS
def make_cert(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "server-cert.pem", folder / "server-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    (folder / "ca-cert.pem").write_bytes(cert_path.read_bytes())
    return cert_path, key_path


def test_tls(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    img = tmp_path / "disk.img"
    img.write_bytes(b"t" * MiB)
    with serve(f"aio:{img}", tmp_path, "--tls-cert", str(cert), "--tls-key", str(key)) as srv:
        assert srv.uri.startswith("nbds+unix://")
        # Before STARTTLS: everything but STARTTLS/ABORT is refused; EXPORT_NAME drops.
        w = Wire(srv.socket)
        w.greet()
        for opt in (3, 8, 7, 99):
            w.option(opt, struct.pack(">IH", 0, 0) if opt == 7 else b"")
            assert w.option_reply()[1] == ERR_TLS_REQD
        w.option(5)
        assert w.option_reply()[1] == 1
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(str(cert))
        w.sock = ctx.wrap_socket(w.sock, server_hostname="localhost")
        w.option(5)  # a second STARTTLS is invalid
        assert w.option_reply()[1] == ERR_INVALID
        w.option(8)
        assert w.option_reply()[1] == 1
        w.structured = True
        w.option(7, struct.pack(">IH", 0, 0))
        assert w.replies_until_final()[-1][0] == 1
        w.request(READ, 0, 65536, handle=3)
        assert w.reply(65536) == (3, 0, b"t" * 65536)
        w.request(WRITE, 0, 4, handle=4, data=b"TLS!")
        assert w.reply()[:2] == (4, 0)
        w.close()
        w = Wire(srv.socket)
        w.greet()
        w.option(1, b"")
        assert w.closed_by_server()
        w.close()
        # libnbd, with TLS required and the certificate checked.
        script = ("h.set_tls(nbd.TLS_REQUIRE); h.set_tls_certificates(certs); "
                  "h.set_tls_verify_peer(True); h.connect_uri(uri); "
                  "assert h.pread(4, 0) == b'TLS!'; print(h.get_tls_negotiated())")
        env = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}
        res = run(["nbdsh", "-c", f"uri = {srv.uri + '&tls-hostname=localhost'!r}",
                   "-c", f"certs = {str(tmp_path)!r}", "-c", script], text=True, env=env)
        assert res.returncode == 0 and res.stdout.strip() == "True", res.stdout + res.stderr
    assert img.read_bytes()[:4] == b"TLS!"


def test_listeners_tcp(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(b"p" * MiB)
    srv = Served(f"aio:{img}", tmp_path / "s.sock", ["--tcp", "127.0.0.1:0"])
    try:
        tcp = [u for u in srv.proc.stdout.readline().split()]  # type: ignore[union-attr]
        assert tcp and tcp[0].startswith("nbd://127.0.0.1:")
        port = int(tcp[0].rsplit(":", 1)[1].split("/")[0])
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert s.recv(8) == b"NBDMAGIC"
        s.close()
    finally:
        assert srv.stop() == 0
