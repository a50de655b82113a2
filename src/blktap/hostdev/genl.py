"""A small blocking generic netlink client: build messages of attributes, send one
request, collect its replies up to the kernel's acknowledgement."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator

from blktap.errors import BlktapError
from blktap.hostdev import wire as w

Attr = tuple[int, bytes]  # type, payload (a nested attribute's payload is attributes)


def _pad(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    size = w.NLA_HDR.size + len(payload)
    return w.NLA_HDR.pack(size, kind) + payload + bytes(_pad(size) - size)


def u32(kind: int, value: int) -> bytes:
    return attr(kind, w.U32.pack(value))


def u64(kind: int, value: int) -> bytes:
    return attr(kind, w.U64.pack(value))


def string(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def nested(kind: int, *attrs: bytes) -> bytes:
    return attr(kind | w.NLA_F_NESTED, b"".join(attrs))


def parse_attrs(data: bytes | memoryview) -> Iterator[Attr]:
    """The attributes of a payload (the nested flag masked off the type)."""
    view = memoryview(data)
    pos = 0
    while pos + w.NLA_HDR.size <= len(view):
        size, kind = w.NLA_HDR.unpack_from(view, pos)
        if size < w.NLA_HDR.size or pos + size > len(view):
            raise BlktapError(f"netlink: malformed attribute ({size} bytes)", errno.EPROTO)
        yield kind & w.NLA_TYPE_MASK, bytes(view[pos + w.NLA_HDR.size : pos + size])
        pos += _pad(size)


class GenlSocket:
    """One NETLINK_GENERIC socket (blocking, with a timeout)."""

    def __init__(self, timeout: float = 10.0) -> None:
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, w.NETLINK_GENERIC)
        except OSError as exc:
            raise BlktapError(f"generic netlink: {exc.strerror}", exc.errno) from None
        self.sock.settimeout(timeout)
        self.sock.bind((0, 0))
        self.seq = int.from_bytes(os.urandom(2), "little")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> GenlSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, family: int, cmd: int, version: int, attrs: bytes = b"",
                flags: int = 0) -> list[bytes]:
        """Send a request and return the genl payloads (attributes) of its replies;
        a netlink error becomes a BlktapError with the kernel's errno."""
        self.seq += 1
        body = w.GENL_HDR.pack(cmd, version, 0) + attrs
        msg = w.NLMSG_HDR.pack(w.NLMSG_HDR.size + len(body), family,
                               w.NLM_F_REQUEST | w.NLM_F_ACK | flags, self.seq, 0) + body
        self.sock.send(msg)
        replies: list[bytes] = []
        while True:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise BlktapError("generic netlink: no answer from the kernel",
                                  errno.ETIMEDOUT) from None
            pos = 0
            while pos + w.NLMSG_HDR.size <= len(data):
                size, kind, _flags, seq, _pid = w.NLMSG_HDR.unpack_from(data, pos)
                if size < w.NLMSG_HDR.size or pos + size > len(data):
                    raise BlktapError("netlink: malformed message", errno.EPROTO)
                payload = data[pos + w.NLMSG_HDR.size : pos + size]
                pos += _pad(size)
                if seq != self.seq:
                    continue
                if kind == w.NLMSG_ERROR:
                    (code,) = w.NLMSG_ERROR_BODY.unpack_from(payload)
                    if code:
                        raise BlktapError(f"netlink: {os.strerror(-code)}", -code)
                    return replies
                if kind == w.NLMSG_DONE:
                    return replies
                replies.append(payload[w.GENL_HDR.size :])

    def family_id(self, name: str) -> int | None:
        """The id of a generic netlink family, None if the kernel has no such family."""
        try:
            replies = self.request(w.GENL_ID_CTRL, w.CTRL_CMD_GETFAMILY, 1,
                                   string(w.CTRL_ATTR_FAMILY_NAME, name))
        except BlktapError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        for payload in replies:
            for kind, value in parse_attrs(payload):
                if kind == w.CTRL_ATTR_FAMILY_ID:
                    return int(w.U16.unpack_from(value)[0])
        return None
