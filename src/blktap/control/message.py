"""The tapdisk control protocol: the reference's fixed-size binary messages.

One request per AF_UNIX stream connection. Every message is a 544-byte host-endian C struct:
an 8-byte header (type u16, cookie u16, 4 bytes of padding because the union that follows
holds 8-byte members) and a 536-byte union whose member depends on the type. Some messages
are followed on the same stream by out-of-band trailers: a 256-byte log path (OPEN/RESUME with
ADD_LOG), a length-prefixed key (OPEN with OPEN_ENCRYPTED), the stats text (STATS_RSP).

Layout declarations come first; the codec below them. The byte counts were derived by hand
from the C header with x86_64 (LP64) alignment rules: u16 aligned on 2, int/u32 on 4,
u64/size_t on 8, a struct padded to a multiple of its largest member's alignment. Each format
below uses standard sizes with explicit ``x`` padding, so ``struct.calcsize`` must equal the
C ``sizeof``; the asserts after the table check every one.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import os
import socket
import struct
from collections.abc import Callable, Generator
from dataclasses import dataclass

from blktap.errors import ControlProtocolError

# ----------------------------------------------------------------------------- layout
PATH_LENGTH = 256  # TAPDISK_MESSAGE_MAX_PATH_LENGTH (a char[] with its NUL)
STRING_LENGTH = 256  # TAPDISK_MESSAGE_STRING_LENGTH
MAX_MINORS = PATH_LENGTH // 4 - 1  # 63 ints after the count: the minors payload is 256 bytes
REFERENCE_RING_PAGES = 8  # gref[] of the reference's blkif payload (MAX_RING_PAGE_ORDER 3)
REFERENCE_RING_ORDER = 3
# Our extension (docs/protocols/control.md): an order-4 ring's other 8 grant references follow
# the reference's 316-byte payload, in the union's unused tail; a DISK_INFO_RSP that carries
# EXT_TAG after the image says the tapdisk takes them. Linux blkfront goes up to order 4.
MAX_RING_PAGES = 16
MAX_RING_ORDER = 4
EXT_TAG = b"BTX1"
# Our extension's feature bits: in DISK_INFO_RSP what the tapdisk's ring implements, in
# XENBLKIF_CONNECT what tapback negotiated with the frontend (both after EXT_TAG).
FEATURE_PERSISTENT_GRANTS = 1
KEY_MIN, KEY_MAX = 1, 128  # key sizes tapdisk accepts (tap-ctl sends 32 or 64)
MAX_STATS_TEXT = 16 << 20  # our bound on a STATS_RSP body (the reference has none)

# "=" is the host's byte order with standard sizes and no implicit alignment: the padding
# the C compiler inserts is spelled out as "x".
HEADER = struct.Struct("=HH4x")  # type, cookie, pad to the 8-aligned union
PID = struct.Struct("=i")  # pid_t
# flags, devnum, domid, path[256], prt_devnum, req_timeout u16, secondary[256], 2 pad -> 532
PARAMS = struct.Struct(f"=III{PATH_LENGTH}sIH{PATH_LENGTH}s2x")
IMAGE = struct.Struct("=QII")  # sectors, sector_size, info -> 16
STRING = struct.Struct(f"={STRING_LENGTH}s")  # text -> 256
RESPONSE = struct.Struct(f"=i{STRING_LENGTH}s")  # error, message -> 260
MINORS = struct.Struct(f"=i{MAX_MINORS}i")  # count, list[63] -> 256
LIST = struct.Struct(f"=iii{PATH_LENGTH}s")  # count, minor, state, path -> 268
STAT = struct.Struct("=HH4xQ")  # type, cookie, pad, size_t length -> 16
# domid, devid, gref[8], order, proto, pool[256], port, poll_duration, poll_idle -> 316
BLKIF = struct.Struct(f"=II{REFERENCE_RING_PAGES}III{STRING_LENGTH}sIII")
BLKIF_MORE_GREFS = struct.Struct(f"={MAX_RING_PAGES - REFERENCE_RING_PAGES}I")  # at BLKIF.size
IMAGE_EXT = struct.Struct("=4sII")  # EXT_TAG, the largest ring order taken, features
BLKIF_EXT = struct.Struct("=4sI")  # EXT_TAG, features negotiated; after BLKIF_MORE_GREFS
RESUME = struct.Struct(f"=I{PATH_LENGTH}s{PATH_LENGTH}s")  # flags, new_params, secondary -> 516
QUERY = struct.Struct(f"=QQ{STRING_LENGTH}s")  # current, total, status -> 272
KEY_SIZE = struct.Struct("=B")  # the encryption trailer's length byte

_C_SIZES = {HEADER: 8, PID: 4, PARAMS: 532, IMAGE: 16, STRING: 256, RESPONSE: 260, MINORS: 256,
            LIST: 268, STAT: 16, BLKIF: 316, RESUME: 516, QUERY: 272}
for _s, _size in _C_SIZES.items():
    assert _s.size == _size, (_s.format, _s.size, _size)
# The union is as large as its largest member (params, 532) rounded up to its alignment (8).
UNION_SIZE = -(-max(_C_SIZES.values()) // 8) * 8
MESSAGE_SIZE = HEADER.size + UNION_SIZE
assert (UNION_SIZE, MESSAGE_SIZE) == (536, 544)
assert BLKIF.size + BLKIF_MORE_GREFS.size + BLKIF_EXT.size <= UNION_SIZE
assert IMAGE.size + IMAGE_EXT.size <= UNION_SIZE


class MessageType(enum.IntEnum):
    """Message numbers, in the reference's enum order (ERROR = 1)."""

    ERROR = 1
    RUNTIME_ERROR = 2
    PID = 3
    PID_RSP = 4
    ATTACH = 5
    ATTACH_RSP = 6
    OPEN = 7
    OPEN_RSP = 8
    PAUSE = 9
    PAUSE_RSP = 10
    RESUME = 11
    RESUME_RSP = 12
    CLOSE = 13
    CLOSE_RSP = 14
    DETACH = 15
    DETACH_RSP = 16
    LIST_MINORS = 17
    LIST_MINORS_RSP = 18
    LIST = 19
    LIST_RSP = 20
    STATS = 21
    STATS_RSP = 22
    FORCE_SHUTDOWN = 23
    XENBLKIF_CONNECT = 24
    XENBLKIF_CONNECT_RSP = 25
    XENBLKIF_DISCONNECT = 26
    XENBLKIF_DISCONNECT_RSP = 27
    DISK_INFO = 28
    DISK_INFO_RSP = 29
    EXIT = 30
    # Later releases (and the v4.0.8-era tree) append the live-commit family.
    COMMIT = 31
    COMMIT_RSP = 32
    QUERY_COMMIT_JOB = 33
    QUERY_COMMIT_JOB_RSP = 34
    CANCEL_COMMIT_JOB = 35
    CANCEL_COMMIT_JOB_RSP = 36
    # Ours, far past the reference's numbers: change a valve's limits live (docs/filters.md).
    VALVE_SET = 64
    VALVE_SET_RSP = 65

    @property
    def label(self) -> str:
        """The name the reference logs for this type."""
        return _LABELS.get(self, self.name.lower().replace("_rsp", " response").replace("_", " "))


# Where the reference's names differ from the mechanical lower-casing above.
_LABELS = {
    MessageType.XENBLKIF_CONNECT: "sring connect",
    MessageType.XENBLKIF_CONNECT_RSP: "sring connect rsp",
    MessageType.XENBLKIF_DISCONNECT: "sring disconnect",
    MessageType.XENBLKIF_DISCONNECT_RSP: "sring disconnect rsp",
    MessageType.DISK_INFO_RSP: "disk info rsp",
}


class Flag(enum.IntFlag):
    """Open/resume flags (``u.params.flags``)."""

    SHARED = 0x001
    RDONLY = 0x002
    ADD_CACHE = 0x004
    VHD_INDEX = 0x008
    ADD_LOG = 0x010
    ADD_LCACHE = 0x020
    REUSE_PRT = 0x040
    SECONDARY = 0x080
    STANDBY = 0x100
    NO_O_DIRECT = 0x200
    OPEN_ENCRYPTED = 0x400


KNOWN_FLAGS = int(Flag.SHARED | Flag.RDONLY | Flag.ADD_CACHE | Flag.VHD_INDEX | Flag.ADD_LOG
                  | Flag.ADD_LCACHE | Flag.REUSE_PRT | Flag.SECONDARY | Flag.STANDBY
                  | Flag.NO_O_DIRECT | Flag.OPEN_ENCRYPTED)


# ----------------------------------------------------------------------------- payloads
@dataclass(frozen=True)
class Pid:
    pid: int


@dataclass(frozen=True)
class Params:
    """OPEN, RESUME (both C tools use the params member for it, not ``resume``), COMMIT and
    CANCEL_COMMIT_JOB."""

    flags: int = 0
    path: str = ""
    devnum: int = 0
    domid: int = 0
    prt_devnum: int = 0
    req_timeout: int = 0
    secondary: str = ""


@dataclass(frozen=True)
class Image:
    sectors: int
    sector_size: int
    info: int = 0
    # Ours, in DISK_INFO_RSP only: the largest ring order XENBLKIF_CONNECT may carry. None
    # where the tapdisk does not say (the reference's: REFERENCE_RING_ORDER).
    max_ring_order: int | None = None
    features: int = 0  # ours, with max_ring_order: FEATURE_* the tapdisk's ring implements


@dataclass(frozen=True)
class Text:
    """The plain ``string`` member (no reference message uses it; our VALVE_SET does)."""

    text: str


@dataclass(frozen=True)
class Response:
    """ERROR / RUNTIME_ERROR: ``error`` is a positive errno."""

    error: int
    message: str = ""


@dataclass(frozen=True)
class Minors:
    minors: tuple[int, ...] = ()


@dataclass(frozen=True)
class ListEntry:
    """One LIST_RSP: ``count`` counts down; the terminator has count 0 and minor -1."""

    count: int
    minor: int
    state: int = 0
    path: str = ""


@dataclass(frozen=True)
class Stat:
    """STATS_RSP header: the text that follows is ``Message.text``; type/cookie are left zero
    by the reference."""

    type: int = 0
    cookie: int = 0


@dataclass(frozen=True)
class Blkif:
    domid: int
    devid: int
    gref: tuple[int, ...] = (0,) * REFERENCE_RING_PAGES  # 1 << order used, up to 16
    order: int = 0
    proto: int = 0
    pool: str = ""
    port: int = 0
    poll_duration: int = 0
    poll_idle_threshold: int = 0
    # Ours (after the order-4 grant references, with EXT_TAG): tapback and the frontend
    # both said feature-persistent. The reference's tapback never sets it.
    persistent_grants: bool = False


@dataclass(frozen=True)
class Query:
    current_progress: int
    total_progress: int
    status: str = ""


Payload = Pid | Params | Image | Text | Response | Minors | ListEntry | Stat | Blkif | Query

_T = MessageType
# Which union member each type carries; types absent here carry none (the union is zeros).
PAYLOAD_KIND: dict[MessageType, type] = {
    _T.ERROR: Response, _T.RUNTIME_ERROR: Response,
    _T.PID_RSP: Pid,
    _T.OPEN: Params, _T.RESUME: Params, _T.COMMIT: Params, _T.CANCEL_COMMIT_JOB: Params,
    _T.OPEN_RSP: Image, _T.DISK_INFO_RSP: Image,
    _T.LIST_MINORS_RSP: Minors,
    _T.LIST_RSP: ListEntry,
    _T.STATS_RSP: Stat,
    _T.XENBLKIF_CONNECT: Blkif, _T.XENBLKIF_DISCONNECT: Blkif,
    _T.QUERY_COMMIT_JOB_RSP: Query,
    _T.VALVE_SET: Text,
}
# Which types read which trailers (the reference reads them only in these handlers).
LOGPATH_TYPES = frozenset({_T.OPEN, _T.RESUME})
KEY_TYPES = frozenset({_T.OPEN})


@dataclass(frozen=True)
class Message:
    """One control message with its trailers.

    ``logpath`` is present iff the type reads it and the params carry ADD_LOG; ``key`` iff
    the type reads it and the params carry OPEN_ENCRYPTED; ``text`` iff STATS_RSP.
    """

    type: MessageType
    cookie: int = 0
    payload: Payload | None = None
    logpath: str | None = None
    key: bytes | None = None
    text: bytes | None = None


def error_reply(exc: ControlProtocolError) -> Message:
    """The ERROR message a server answers a malformed request with."""
    text = str(exc).encode("utf-8", "replace")[:STRING_LENGTH - 1]
    return Message(MessageType.ERROR, exc.cookie or 0,
                   Response(exc.errno, text.decode("utf-8", "ignore")))


# ----------------------------------------------------------------------------- strings
def _cstr(raw: bytes, what: str, ctx: dict) -> str:
    """A char[N] field: it must hold its NUL; what follows the NUL is ignored as in C."""
    end = raw.find(b"\0")
    if end < 0:
        raise ControlProtocolError(f"{what}: string not NUL-terminated", errno.EINVAL, **ctx)
    return os.fsdecode(raw[:end])


def _cbytes(value: str, size: int, what: str) -> bytes:
    raw = os.fsencode(value)
    if b"\0" in raw:
        raise ControlProtocolError(f"{what}: embedded NUL", errno.EINVAL)
    if len(raw) >= size:
        raise ControlProtocolError(f"{what}: {len(raw)} bytes, at most {size - 1} fit",
                                   errno.ENAMETOOLONG)
    return raw


def _bad(what: str, ctx: dict) -> ControlProtocolError:
    return ControlProtocolError(f"{what} out of range", errno.EINVAL, **ctx)


# ----------------------------------------------------------------------------- decoding
def _decode_payload(kind: type, u: memoryview, ctx: dict) -> Payload:
    if kind is Pid:
        (pid,) = PID.unpack_from(u)
        if pid <= 0:
            raise _bad(f"pid {pid}", ctx)
        return Pid(pid)
    if kind is Params:
        flags, devnum, domid, path, prt, timeout, secondary = PARAMS.unpack_from(u)
        if flags & ~KNOWN_FLAGS:
            raise _bad(f"flags {flags:#x}", ctx)
        return Params(flags, _cstr(path, "path", ctx), devnum, domid, prt, timeout,
                      _cstr(secondary, "secondary", ctx))
    if kind is Image:
        sectors, sector_size, info = IMAGE.unpack_from(u)
        tag, order, features = IMAGE_EXT.unpack_from(u, IMAGE.size)
        if tag != EXT_TAG or order > MAX_RING_ORDER:
            return Image(sectors, sector_size, info)
        return Image(sectors, sector_size, info, order, features)
    if kind is Response:
        err, text = RESPONSE.unpack_from(u)
        if err < 0:
            raise _bad(f"error {err}", ctx)
        return Response(err, _cstr(text, "message", ctx))
    if kind is Minors:
        count, *minors = MINORS.unpack_from(u)
        if not 0 <= count <= MAX_MINORS:
            raise _bad(f"minor count {count}", ctx)
        return Minors(tuple(minors[:count]))
    if kind is ListEntry:
        count, minor, state, path = LIST.unpack_from(u)
        if count < 0 or minor < -1:
            raise _bad(f"list count {count} minor {minor}", ctx)
        return ListEntry(count, minor, state, _cstr(path, "path", ctx))
    if kind is Stat:
        stype, scookie, _length = STAT.unpack_from(u)
        return Stat(stype, scookie)
    if kind is Blkif:
        domid, devid, *rest = BLKIF.unpack_from(u)
        gref = tuple(rest[:REFERENCE_RING_PAGES])
        order, proto, pool, port, duration, idle = rest[REFERENCE_RING_PAGES:]
        if order > MAX_RING_ORDER:
            raise _bad(f"ring order {order}", ctx)
        if order > REFERENCE_RING_ORDER:
            # The tail is read only for an order the reference cannot send: its tapback
            # may leave anything there.
            gref += BLKIF_MORE_GREFS.unpack_from(u, BLKIF.size)
        tag, features = BLKIF_EXT.unpack_from(u, BLKIF.size + BLKIF_MORE_GREFS.size)
        persistent = tag == EXT_TAG and bool(features & FEATURE_PERSISTENT_GRANTS)
        return Blkif(domid, devid, gref, order, proto, _cstr(pool, "pool", ctx), port,
                     duration, idle, persistent)
    if kind is Text:
        (text,) = STRING.unpack_from(u)
        return Text(_cstr(text, "text", ctx))
    assert kind is Query
    cur, total, status = QUERY.unpack_from(u)
    return Query(cur, total, _cstr(status, "status", ctx))


# What the parser asks for next: (byte count, what those bytes are, for messages).
Need = tuple[int, str]


def _parser() -> Generator[Need, memoryview, Message]:
    """Parse one message without doing I/O: it yields how many bytes it needs next and is
    sent them (a read of exactly that many). The trailers' sizes depend on the message,
    so the readers (decode, read_message, read_message_async) pull in steps; all of them
    validate alike."""
    head = yield MESSAGE_SIZE, "message"
    mtype, cookie = HEADER.unpack_from(head)
    ctx = {"cookie": cookie, "msg_type": mtype}
    try:
        t = MessageType(mtype)
    except ValueError:
        raise ControlProtocolError(f"unknown message type {mtype}", errno.EINVAL, **ctx) from None
    kind = PAYLOAD_KIND.get(t)
    payload = _decode_payload(kind, head[HEADER.size:], ctx) if kind else None
    logpath = key = text = None
    if isinstance(payload, Params):
        if t in LOGPATH_TYPES and payload.flags & Flag.ADD_LOG:
            raw = yield PATH_LENGTH, "log path"
            logpath = _cstr(bytes(raw), "log path", ctx)
        if t in KEY_TYPES and payload.flags & Flag.OPEN_ENCRYPTED:
            (size,) = KEY_SIZE.unpack((yield 1, "key size"))
            if not KEY_MIN <= size <= KEY_MAX:
                raise _bad(f"key size {size}", ctx)
            key = bytes((yield size, "key"))
    if t is MessageType.STATS_RSP:
        (length,) = struct.unpack_from("=Q", head, HEADER.size + 8)
        if length > MAX_STATS_TEXT:
            raise _bad(f"stats length {length}", ctx)
        text = bytes((yield length, "stats text"))
    return Message(t, cookie, payload, logpath, key, text)


def _parse(read: Callable[[int, str], memoryview]) -> Message:
    """Run the parser over a synchronous ``read(n, what)`` (which raises on a short
    stream)."""
    gen = _parser()
    try:
        need = next(gen)
        while True:
            need = gen.send(read(*need))
    except StopIteration as done:
        return done.value


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Decode exactly one message and its trailers from ``data``."""
    view = memoryview(data).cast("B")
    pos = 0

    def read(n: int, what: str) -> memoryview:
        nonlocal pos
        if len(view) - pos < n:
            raise ControlProtocolError(f"short {what}: {len(view) - pos} of {n} bytes",
                                       errno.EPROTO)
        pos += n
        return view[pos - n:pos]

    msg = _parse(read)
    if pos != len(view):
        raise ControlProtocolError(f"{len(view) - pos} bytes after the message", errno.EPROTO,
                                   cookie=msg.cookie, msg_type=int(msg.type))
    return msg


# ----------------------------------------------------------------------------- encoding
def _encode_payload(p: Payload, u: bytearray, off: int) -> None:
    if isinstance(p, Pid):
        PID.pack_into(u, off, p.pid)
    elif isinstance(p, Params):
        if p.flags & ~KNOWN_FLAGS:
            raise ControlProtocolError(f"unknown flags {p.flags:#x}", errno.EINVAL)
        PARAMS.pack_into(u, off, p.flags, p.devnum, p.domid, _cbytes(p.path, PATH_LENGTH, "path"),
                         p.prt_devnum, p.req_timeout,
                         _cbytes(p.secondary, PATH_LENGTH, "secondary"))
    elif isinstance(p, Image):
        IMAGE.pack_into(u, off, p.sectors, p.sector_size, p.info)
        if p.max_ring_order is not None:
            IMAGE_EXT.pack_into(u, off + IMAGE.size, EXT_TAG, p.max_ring_order, p.features)
    elif isinstance(p, Text):
        STRING.pack_into(u, off, _cbytes(p.text, STRING_LENGTH, "text"))
    elif isinstance(p, Response):
        if p.error < 0:
            raise ControlProtocolError(f"error {p.error} is not a positive errno", errno.EINVAL)
        RESPONSE.pack_into(u, off, p.error, _cbytes(p.message, STRING_LENGTH, "message"))
    elif isinstance(p, Minors):
        if len(p.minors) > MAX_MINORS:
            raise ControlProtocolError(f"{len(p.minors)} minors, at most {MAX_MINORS}",
                                       errno.EINVAL)
        padded = tuple(p.minors) + (0,) * (MAX_MINORS - len(p.minors))
        MINORS.pack_into(u, off, len(p.minors), *padded)
    elif isinstance(p, ListEntry):
        LIST.pack_into(u, off, p.count, p.minor, p.state, _cbytes(p.path, PATH_LENGTH, "path"))
    elif isinstance(p, Stat):
        STAT.pack_into(u, off, p.type, p.cookie, 0)  # length is set from Message.text
    elif isinstance(p, Blkif):
        if not 0 <= p.order <= MAX_RING_ORDER or not 1 << p.order <= len(p.gref) <= (
                MAX_RING_PAGES if p.order > REFERENCE_RING_ORDER else REFERENCE_RING_PAGES):
            raise ControlProtocolError(
                f"blkif: order {p.order} with {len(p.gref)} grant refs (orders 0..3 carry 8, "
                f"order 4 carries 16)", errno.EINVAL)
        grefs = tuple(p.gref) + (0,) * (MAX_RING_PAGES - len(p.gref))
        if p.order > REFERENCE_RING_ORDER:
            BLKIF_MORE_GREFS.pack_into(u, off + BLKIF.size, *grefs[REFERENCE_RING_PAGES:])
        if p.persistent_grants:
            BLKIF_EXT.pack_into(u, off + BLKIF.size + BLKIF_MORE_GREFS.size, EXT_TAG,
                                FEATURE_PERSISTENT_GRANTS)
        BLKIF.pack_into(u, off, p.domid, p.devid, *grefs[:REFERENCE_RING_PAGES], p.order, p.proto,
                        _cbytes(p.pool, STRING_LENGTH, "pool"), p.port, p.poll_duration,
                        p.poll_idle_threshold)
    else:
        QUERY.pack_into(u, off, p.current_progress, p.total_progress,
                        _cbytes(p.status, STRING_LENGTH, "status"))


def encode(msg: Message) -> bytes:
    """The bytes of ``msg`` and its trailers, as the reference writes them."""
    t = MessageType(msg.type)
    kind = PAYLOAD_KIND.get(t)
    p = msg.payload
    if not (p is None and kind is None or kind is not None and isinstance(p, kind)):
        raise ControlProtocolError(f"{t.label}: payload {type(p).__name__} does not fit",
                                   errno.EINVAL)
    flags = p.flags if isinstance(p, Params) else 0
    want_log = t in LOGPATH_TYPES and bool(flags & Flag.ADD_LOG)
    want_key = t in KEY_TYPES and bool(flags & Flag.OPEN_ENCRYPTED)
    want_text = t is MessageType.STATS_RSP
    if ((msg.logpath is not None) != want_log or (msg.key is not None) != want_key
            or (msg.text is not None) != want_text):
        raise ControlProtocolError(f"{t.label}: trailers do not match the flags", errno.EINVAL)
    buf = bytearray(MESSAGE_SIZE)
    try:
        HEADER.pack_into(buf, 0, t, msg.cookie)
        if p is not None:
            _encode_payload(p, buf, HEADER.size)
        if msg.text is not None:
            if len(msg.text) > MAX_STATS_TEXT:
                raise ControlProtocolError("stats text too long", errno.EINVAL)
            struct.pack_into("=Q", buf, HEADER.size + 8, len(msg.text))
    except struct.error as e:
        raise ControlProtocolError(f"{t.label}: value out of range ({e})", errno.EINVAL) from None
    if msg.logpath is not None:
        buf += _cbytes(msg.logpath, PATH_LENGTH, "log path").ljust(PATH_LENGTH, b"\0")
    if msg.key is not None:
        if not KEY_MIN <= len(msg.key) <= KEY_MAX:
            raise ControlProtocolError(f"key of {len(msg.key)} bytes", errno.EINVAL)
        buf += KEY_SIZE.pack(len(msg.key)) + msg.key
    if msg.text is not None:
        buf += msg.text
    return bytes(buf)


# ----------------------------------------------------------------------------- sockets
def read_message(sock: socket.socket) -> Message:
    """Read exactly one message and its trailers from a blocking stream socket.

    A stream that ends early raises ControlProtocolError (EPROTO), a socket timeout one with
    ETIMEDOUT; other socket errors propagate as OSError.
    """
    def read(n: int, what: str) -> memoryview:
        buf = memoryview(bytearray(n))
        got = 0
        while got < n:
            try:
                r = sock.recv_into(buf[got:])
            except TimeoutError:
                raise ControlProtocolError(f"timed out reading {what}", errno.ETIMEDOUT) from None
            if r == 0:
                raise ControlProtocolError(f"short {what}: {got} of {n} bytes", errno.EPROTO)
            got += r
        return buf

    return _parse(read)


async def read_message_async(sock: socket.socket,
                             loop: asyncio.AbstractEventLoop) -> Message:
    """read_message on a non-blocking socket, in the event loop (bound it with
    asyncio.wait_for). A stream that ends early raises ControlProtocolError (EPROTO)."""
    gen = _parser()
    try:
        n, what = next(gen)
        while True:
            buf = memoryview(bytearray(n))
            got = 0
            while got < n:
                r = await loop.sock_recv_into(sock, buf[got:])
                if r == 0:
                    raise ControlProtocolError(f"short {what}: {got} of {n} bytes",
                                               errno.EPROTO)
                got += r
            n, what = gen.send(buf)
    except StopIteration as done:
        return done.value


def write_message(sock: socket.socket, msg: Message) -> None:
    """Send ``msg`` and its trailers in one go."""
    sock.sendall(encode(msg))
