"""The client half of the NBD handshake (fixed newstyle, NBD_OPT_GO), done in user space
before the socket is handed to the kernel's NBD client, which speaks only the
transmission phase (simple replies: no structured replies are negotiated)."""

from __future__ import annotations

import errno
import socket

from blktap.errors import BlktapError
from blktap.transport.nbd import proto as p


def _recv(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise BlktapError("NBD server closed the connection during the handshake",
                              errno.ECONNRESET)
        data += chunk
    return bytes(data)


def negotiate(sock: socket.socket, export: str = "") -> tuple[int, int]:
    """Agree on ``export`` over a connected socket; return (size in bytes, transmission
    flags). The socket is then in the transmission phase."""
    magic, opt, hflags = p.HELLO.unpack(_recv(sock, p.HELLO.size))
    if magic != p.NBDMAGIC or opt != p.IHAVEOPT or not hflags & p.FLAG_FIXED_NEWSTYLE:
        raise BlktapError("not a fixed-newstyle NBD server", errno.EPROTO)
    cflags = p.FLAG_C_FIXED_NEWSTYLE | (p.FLAG_C_NO_ZEROES if hflags & p.FLAG_NO_ZEROES
                                        else 0)
    name = export.encode()
    # NBD_OPT_GO: name length, name, and no information requests.
    data = len(name).to_bytes(4, "big") + name + (0).to_bytes(2, "big")
    sock.sendall(p.CLIENT_FLAGS.pack(cflags) + p.OPTION.pack(p.IHAVEOPT, p.OPT_GO, len(data))
                 + data)
    size = flags = None
    while True:
        magic, opt, kind, length = p.OPTION_REPLY.unpack(_recv(sock, p.OPTION_REPLY.size))
        if magic != p.OPT_REPLY_MAGIC or opt != p.OPT_GO or length > 1 << 20:
            raise BlktapError("NBD server: malformed option reply", errno.EPROTO)
        body = _recv(sock, length)
        if kind == p.REP_INFO and length >= 2 and int.from_bytes(body[:2], "big") == \
                p.INFO_EXPORT and length == p.INFO_EXPORT_PAYLOAD.size:
            _, size, flags = p.INFO_EXPORT_PAYLOAD.unpack(body)
        elif kind == p.REP_ACK:
            break
        elif kind & p.REP_ERR:
            text = body.decode(errors="replace")
            raise BlktapError(f"NBD server refused export {export!r}: {text or hex(kind)}",
                              errno.ENOENT if kind == p.REP_ERR_UNKNOWN else errno.EPROTO)
    if size is None or flags is None:
        raise BlktapError("NBD server sent no export information", errno.EPROTO)
    return size, flags
