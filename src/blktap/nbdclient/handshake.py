"""Connect and negotiate, as a client: blocking, run in a worker thread (open and
reconnect), with a time limit on every step.

Fixed newstyle first: STARTTLS when the address asks for TLS (and never sends an option
in clear text after that), STRUCTURED_REPLY, SET_META_CONTEXT ``base:allocation``, then
GO with the block-size info; a server that does not know GO gets EXPORT_NAME. Plain
newstyle (not fixed) gets EXPORT_NAME only; oldstyle is accepted (no export name, no
options, no TLS). A passed socket (``nbd:NAME``) is taken from this process's registry
instead of connecting. Everything the server says is bounded and checked: a reply that breaks
the protocol is EPROTO, not a hang or a huge allocation.
"""

from __future__ import annotations

import errno
import socket
import ssl
import struct
from dataclasses import dataclass, field

from blktap.errors import NbdClientError
from blktap.nbdclient.address import Address
from blktap.nbdclient.passed import passed_sockets
from blktap.transport.nbd import proto as p

CONNECT_TIMEOUT = 10.0
# Option replies longer than this are not something a negotiation needs.
MAX_OPTION_REPLY = 64 << 10
MAX_REPLIES_PER_OPTION = 256
OLDSTYLE_REST = struct.Struct(">QI124x")  # size, flags (global << 16 | transmission)
MAGIC_PAIR = struct.Struct(">QQ")
HFLAGS = struct.Struct(">H")
META_REPLY_ID = struct.Struct(">I")
INFO_TYPE = struct.Struct(">H")
INFO_EXPORT = struct.Struct(">QH")
INFO_BLOCK_SIZE = struct.Struct(">III")
DEFAULT_MAX_BLOCK = 32 << 20  # what a server that says nothing is assumed to take

# Connection errors worth trying again (the server restarts, its socket is not there yet).
RETRYABLE = frozenset({errno.ECONNREFUSED, errno.ENOENT, errno.ECONNRESET, errno.EPIPE,
                       errno.ETIMEDOUT, errno.ECONNABORTED, errno.EHOSTUNREACH,
                       errno.ENETUNREACH, errno.EAGAIN, errno.ESHUTDOWN,
                       errno.EADDRNOTAVAIL})


@dataclass
class Session:
    """What a negotiation agreed on; ``sock`` is ready for the transmission phase."""

    sock: socket.socket
    size: int
    flags: int  # transmission flags
    structured: bool = False
    meta_id: int | None = None  # the base:allocation context's id, if agreed
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = DEFAULT_MAX_BLOCK
    style: str = "newstyle-fixed"
    notes: list[str] = field(default_factory=list)

    @property
    def tls(self) -> bool:
        return isinstance(self.sock, ssl.SSLSocket)


def _fail(address: Address, message: str, code: int) -> NbdClientError:
    return NbdClientError(f"nbd {address}: {message}", code)


class _Negotiator:
    def __init__(self, address: Address, sock: socket.socket) -> None:
        self.address = address
        self.sock = sock

    def recv(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        pos = 0
        while pos < n:
            try:
                got = self.sock.recv_into(view[pos:])
            except TimeoutError:
                raise _fail(self.address, "the server did not answer the handshake in time",
                            errno.ETIMEDOUT) from None
            if not got:
                raise _fail(self.address, "the server closed the connection during the "
                            "handshake", errno.ECONNRESET)
            pos += got
        return bytes(buf)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def option(self, opt: int, data: bytes = b"") -> None:
        self.send(p.OPTION.pack(p.IHAVEOPT, opt, len(data)) + data)

    def reply(self, opt: int) -> tuple[int, bytes]:
        magic, ropt, kind, length = p.OPTION_REPLY.unpack(self.recv(p.OPTION_REPLY.size))
        if magic != p.OPT_REPLY_MAGIC:
            raise _fail(self.address, f"bad option reply magic {magic:#x}", errno.EPROTO)
        if ropt != opt:
            raise _fail(self.address, f"a reply to option {ropt} while asking {opt}",
                        errno.EPROTO)
        if length > MAX_OPTION_REPLY:
            raise _fail(self.address, f"an option reply of {length} bytes", errno.EPROTO)
        return kind, self.recv(length)

    def final(self, opt: int, data: bytes = b"") -> tuple[int, bytes, list[tuple[int, bytes]]]:
        """Send an option; (final reply type, its data, the replies before it)."""
        self.option(opt, data)
        before: list[tuple[int, bytes]] = []
        for _ in range(MAX_REPLIES_PER_OPTION):
            kind, payload = self.reply(opt)
            if kind in (p.REP_SERVER, p.REP_INFO, p.REP_META_CONTEXT):
                before.append((kind, payload))
                continue
            return kind, payload, before
        raise _fail(self.address, f"more than {MAX_REPLIES_PER_OPTION} replies to option "
                    f"{opt}", errno.EPROTO)

    def error_text(self, kind: int, payload: bytes) -> str:
        names = {p.REP_ERR_UNSUP: "unsupported", p.REP_ERR_POLICY: "forbidden by policy",
                 p.REP_ERR_INVALID: "invalid", p.REP_ERR_PLATFORM: "not on this platform",
                 p.REP_ERR_TLS_REQD: "TLS required (use an nbds:// URI)",
                 p.REP_ERR_UNKNOWN: "no such export",
                 p.REP_ERR_SHUTDOWN: "the server is shutting down",
                 p.REP_ERR_BLOCK_SIZE_REQD: "block size required",
                 p.REP_ERR_TOO_BIG: "too big"}
        text = names.get(kind, f"error {kind:#x}")
        message = payload.decode("utf-8", "replace").strip()
        return f"{text}: {message}" if message else text


def _connect(address: Address, timeout: float) -> socket.socket:
    if address.passed is not None:
        sock = passed_sockets().take(address.passed)
        if sock is None:  # ENOENT: a reconnect waits for one passed under that name
            raise _fail(address, "no socket was passed under that name (or it was used "
                        "already)", errno.ENOENT)
        sock.settimeout(timeout)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    try:
        if address.unix is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(timeout)
            try:
                sock.connect(address.unix)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((address.host, address.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except TimeoutError:
        raise _fail(address, "connect timed out", errno.ETIMEDOUT) from None
    except socket.gaierror as exc:
        raise _fail(address, f"cannot resolve: {exc.strerror}", errno.EHOSTUNREACH) from None
    except OSError as exc:
        raise _fail(address, f"connect: {exc.strerror or exc}", exc.errno or errno.EIO) \
            from None
    return sock


def _export_name_payload(name: bytes) -> bytes:
    return struct.pack(">I", len(name)) + name


def _negotiate(n: _Negotiator, address: Address) -> Session:
    magic, second = MAGIC_PAIR.unpack(n.recv(MAGIC_PAIR.size))
    if magic != p.NBDMAGIC:
        raise _fail(address, f"not an NBD server (magic {magic:#x})", errno.EPROTO)
    if second == p.OLDSTYLE_MAGIC:
        size, flags = OLDSTYLE_REST.unpack(n.recv(OLDSTYLE_REST.size))
        if address.tls:
            raise _fail(address, "an oldstyle server cannot do TLS", errno.EPROTO)
        if address.export:
            raise _fail(address, "an oldstyle server has no named exports", errno.ENOENT)
        return Session(n.sock, size, flags & 0xFFFF, style="oldstyle")
    if second != p.IHAVEOPT:
        raise _fail(address, f"unknown handshake {second:#x}", errno.EPROTO)
    (hflags,) = HFLAGS.unpack(n.recv(HFLAGS.size))
    fixed = bool(hflags & p.FLAG_FIXED_NEWSTYLE)
    no_zeroes = bool(hflags & p.FLAG_NO_ZEROES)
    n.send(p.CLIENT_FLAGS.pack((p.FLAG_C_FIXED_NEWSTYLE if fixed else 0)
                               | (p.FLAG_C_NO_ZEROES if no_zeroes else 0)))
    name = address.export.encode()
    if len(name) > 4096:
        raise _fail(address, "export name longer than 4096 bytes", errno.EINVAL)
    if address.tls:
        if not fixed:
            raise _fail(address, "the server does not speak fixed newstyle, so no TLS",
                        errno.EPROTO)
        kind, payload, _ = n.final(p.OPT_STARTTLS)
        if kind != p.REP_ACK:
            raise _fail(address, f"STARTTLS refused: {n.error_text(kind, payload)}",
                        errno.EPROTO if kind == p.REP_ERR_UNSUP else errno.EACCES)
        ctx = address.ssl_context()
        try:
            n.sock = ctx.wrap_socket(n.sock, server_hostname=address.server_hostname)
        except ssl.SSLCertVerificationError as exc:
            raise _fail(address, f"TLS: the server's certificate: {exc.verify_message}",
                        errno.EACCES) from None
        except (ssl.SSLError, OSError) as exc:
            raise _fail(address, f"TLS handshake failed: {exc}", errno.ECONNRESET) from None
    if not fixed:
        return _export_name(n, address, name, no_zeroes, style="newstyle")
    session_notes: list[str] = []
    kind, payload, _ = n.final(p.OPT_STRUCTURED_REPLY)
    structured = kind == p.REP_ACK
    if kind == p.REP_ERR_TLS_REQD:
        raise _fail(address, "the server requires TLS (use an nbds:// URI)", errno.EACCES)
    meta_id = None
    if structured:
        query = p.META_BASE_ALLOCATION.encode()
        data = (_export_name_payload(name) + struct.pack(">I", 1)
                + struct.pack(">I", len(query)) + query)
        kind, payload, before = n.final(p.OPT_SET_META_CONTEXT, data)
        if kind == p.REP_ACK:
            for rkind, rdata in before:
                if rkind != p.REP_META_CONTEXT or len(rdata) < META_REPLY_ID.size:
                    continue
                if rdata[META_REPLY_ID.size:] == query:
                    (meta_id,) = META_REPLY_ID.unpack_from(rdata)
        else:
            session_notes.append(f"no block status: {n.error_text(kind, payload)}")
    data = _export_name_payload(name) + struct.pack(">HH", 1, p.INFO_BLOCK_SIZE)
    kind, payload, before = n.final(p.OPT_GO, data)
    if kind == p.REP_ERR_UNSUP:
        # EXPORT_NAME keeps structured replies but no metadata context: no block status.
        session = _export_name(n, address, name, no_zeroes, style="newstyle-fixed")
        session.structured = structured
        return session
    if kind != p.REP_ACK:
        code = {p.REP_ERR_UNKNOWN: errno.ENOENT, p.REP_ERR_POLICY: errno.EACCES,
                p.REP_ERR_TLS_REQD: errno.EACCES, p.REP_ERR_SHUTDOWN: errno.ESHUTDOWN
                }.get(kind, errno.EPROTO if not kind & p.REP_ERR else errno.EINVAL)
        raise _fail(address, f"export {address.export!r}: {n.error_text(kind, payload)}",
                    code)
    size = tflags = None
    session = Session(n.sock, 0, 0, structured=structured, meta_id=meta_id,
                      notes=session_notes)
    for rkind, rdata in before:
        if rkind != p.REP_INFO or len(rdata) < INFO_TYPE.size:
            continue
        (itype,) = INFO_TYPE.unpack_from(rdata)
        body = rdata[INFO_TYPE.size:]
        if itype == p.INFO_EXPORT and len(body) == INFO_EXPORT.size:
            size, tflags = INFO_EXPORT.unpack(body)
        elif itype == p.INFO_BLOCK_SIZE and len(body) == INFO_BLOCK_SIZE.size:
            lo, pref, hi = INFO_BLOCK_SIZE.unpack(body)
            if not (1 <= lo <= pref <= hi) or lo & (lo - 1) or pref & (pref - 1):
                raise _fail(address, f"nonsense block sizes {lo}/{pref}/{hi}", errno.EPROTO)
            session.min_block, session.preferred_block, session.max_block = lo, pref, hi
    if size is None or tflags is None:
        raise _fail(address, "GO succeeded without the export's size", errno.EPROTO)
    session.size, session.flags = size, tflags
    return session


def _export_name(n: _Negotiator, address: Address, name: bytes, no_zeroes: bool, *,
                 style: str) -> Session:
    n.option(p.OPT_EXPORT_NAME, name)
    try:
        size, tflags = p.EXPORT_NAME_REPLY.unpack(n.recv(p.EXPORT_NAME_REPLY.size))
    except NbdClientError as exc:
        if exc.errno == errno.ECONNRESET:  # how a server says no to EXPORT_NAME
            raise _fail(address, f"the server refused export {address.export!r}",
                        errno.ENOENT) from None
        raise
    if not no_zeroes:
        n.recv(124)
    return Session(n.sock, size, tflags, style=style)


def negotiate(address: Address, *, timeout: float = CONNECT_TIMEOUT) -> Session:
    """Connect to ``address`` and negotiate; NbdClientError with the cause's errno
    (see :data:`RETRYABLE` for the ones a reconnect tries again)."""
    sock = _connect(address, timeout)
    n = _Negotiator(address, sock)
    try:
        session = _negotiate(n, address)
    except NbdClientError:
        n.sock.close()
        raise
    except ssl.SSLError as exc:
        n.sock.close()
        raise _fail(address, f"TLS: {exc}", errno.ECONNRESET) from None
    except OSError as exc:
        n.sock.close()
        raise _fail(address, f"handshake: {exc.strerror or exc}",
                    exc.errno or errno.ECONNRESET) from None
    except struct.error as exc:  # a payload shorter than its type says
        n.sock.close()
        raise _fail(address, f"handshake: {exc}", errno.EPROTO) from None
    if session.flags & p.FLAG_HAS_FLAGS == 0:
        session.flags = p.FLAG_HAS_FLAGS  # no flags at all: nothing but read and write
    if session.max_block > p.MAX_BLOCK:
        session.max_block = p.MAX_BLOCK
    return session


__all__ = ["RETRYABLE", "Session", "negotiate"]
