"""The XenStore wire protocol: message header, types, payload encoding, error names.

Every message, both ways, is a 16-byte header of four host-endian u32 (``type``,
``req_id``, ``tx_id``, ``len``) followed by ``len`` payload bytes (at most 4096). A
payload is a run of fields, each but the last usually NUL-terminated: READ sends
``path\\0`` and gets the value (no NUL); WRITE sends ``path\\0value``; DIRECTORY answers
``child\\0child\\0...``; WATCH sends ``path\\0token\\0``; a watch event arrives as
``WATCH_EVENT`` with ``path\\0token\\0`` (req_id and tx_id 0); TRANSACTION_START sends
``\\0`` and gets the id as decimal text ``"17\\0"``; TRANSACTION_END sends ``T\\0`` (commit)
or ``F\\0`` (abort). A failed request is answered with ``ERROR`` whose payload names an
errno (``"ENOENT\\0"``). Source: xen's docs/misc/xenstore.txt and io/xs_wire.h.
"""

from __future__ import annotations

import enum
import errno
import struct

HEADER = struct.Struct("=IIII")  # type, req_id, tx_id, len
PAYLOAD_MAX = 4096  # XENSTORE_PAYLOAD_MAX
ABS_PATH_MAX = 3072  # XENSTORE_ABS_PATH_MAX
REL_PATH_MAX = 2048  # XENSTORE_REL_PATH_MAX
NO_TX = 0  # XBT_NULL


class Op(enum.IntEnum):
    """enum xsd_sockmsg_type."""

    CONTROL = 0  # formerly DEBUG
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21  # 20 was RESTRICT, removed
    DIRECTORY_PART = 22


# The error names xenstored sends (xsd_errors[]); anything else maps to EIO.
ERROR_NAMES = ("EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
               "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG", "EPERM",
               "EQUOTA")


def error_code(payload: bytes) -> int:
    """The errno an ERROR payload names (EIO for a name we do not know)."""
    name = payload.split(b"\0", 1)[0].decode("ascii", "replace")
    if name == "EQUOTA":  # oxenstored's quota error; Linux has EDQUOT
        return errno.EDQUOT
    return getattr(errno, name, errno.EIO) if name in ERROR_NAMES else errno.EIO


def error_name(code: int) -> str:
    """The name xenstored would send for ``code`` (EIO when it has none)."""
    name = errno.errorcode.get(code, "EIO")
    return name if name in ERROR_NAMES else "EIO"


def pack(op: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    if len(payload) > PAYLOAD_MAX:
        raise ValueError(f"XenStore payload of {len(payload)} bytes (at most {PAYLOAD_MAX})")
    return HEADER.pack(op, req_id, tx_id, len(payload)) + payload


def fields(*parts: str | bytes, terminate_last: bool = True) -> bytes:
    """NUL-separated fields; the last one NUL-terminated unless ``terminate_last`` is
    False (WRITE's value)."""
    raw = [p.encode() if isinstance(p, str) else bytes(p) for p in parts]
    for p in raw[:-1] if not terminate_last else raw:
        if b"\0" in p:
            raise ValueError("a XenStore path or token must not contain NUL")
    out = b"\0".join(raw)
    return out + b"\0" if terminate_last else out


def split(payload: bytes) -> list[bytes]:
    """The NUL-terminated fields of a payload (a trailing unterminated piece is kept)."""
    parts = payload.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return parts


def check_path(path: str) -> None:
    """Refuse what xenstored would refuse anyway, before it goes on the wire."""
    limit = ABS_PATH_MAX if path.startswith("/") else REL_PATH_MAX
    if not path or len(path.encode()) > limit or "\0" in path:
        raise ValueError(f"invalid XenStore path {path!r}")
    if path.startswith("@"):
        return  # special watch paths: @introduceDomain, @releaseDomain
    if "//" in path or (len(path) > 1 and path.endswith("/")):
        raise ValueError(f"invalid XenStore path {path!r}")
    for ch in path:
        if not (ch.isascii() and (ch.isalnum() or ch in "-/_@")):
            raise ValueError(f"invalid character {ch!r} in XenStore path {path!r}")
