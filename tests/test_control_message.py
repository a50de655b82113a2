"""The tapdisk control message codec against an independent, offset-by-offset layout.

The expected bytes are built here field by field at the C offsets listed in the reference
notes (§2.8, x86_64), not with the project's struct formats.
"""

from __future__ import annotations

import errno
import socket
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blktap.control import message as m
from blktap.errors import ControlProtocolError

SIZE = 544
U = 8  # the union starts after type, cookie and 4 bytes of padding


def raw(mtype: int, cookie: int = 0) -> bytearray:
    b = bytearray(SIZE)
    struct.pack_into("=H", b, 0, mtype)
    struct.pack_into("=H", b, 2, cookie)
    return b


def put_str(b: bytearray, off: int, s: bytes) -> None:
    b[off:off + len(s)] = s


def test_sizes_match_c() -> None:
    assert m.MESSAGE_SIZE == SIZE
    assert m.PARAMS.size == 532 and m.BLKIF.size == 316 and m.LIST.size == 268


def test_decode_open_with_trailers() -> None:
    b = raw(7, 5)
    struct.pack_into("=I", b, U + 0, 0x002 | 0x010 | 0x400 | 0x200)
    struct.pack_into("=I", b, U + 4, 77)  # devnum
    struct.pack_into("=I", b, U + 8, 3)  # domid
    put_str(b, U + 12, b"vhd:/srv/a.vhd")
    struct.pack_into("=I", b, U + 268, 9)  # prt_devnum
    struct.pack_into("=H", b, U + 272, 30)  # req_timeout
    put_str(b, U + 274, b"vhd:/srv/b.vhd")
    log = b"/var/log/cbt".ljust(256, b"\0")
    data = bytes(b) + log + bytes([32]) + b"K" * 32
    msg = m.decode(data)
    assert msg.type is m.MessageType.OPEN and msg.cookie == 5
    assert msg.payload == m.Params(0x612, "vhd:/srv/a.vhd", 77, 3, 9, 30, "vhd:/srv/b.vhd")
    assert msg.logpath == "/var/log/cbt" and msg.key == b"K" * 32
    assert m.encode(msg) == data


def test_decode_replies() -> None:
    b = raw(1, 4)
    struct.pack_into("=i", b, U, errno.ENODEV)
    put_str(b, U + 4, b"no such vbd")
    assert m.decode(bytes(b)).payload == m.Response(errno.ENODEV, "no such vbd")

    b = raw(4)
    struct.pack_into("=i", b, U, 4242)
    assert m.decode(bytes(b)).payload == m.Pid(4242)

    b = raw(8, 2)
    struct.pack_into("=Q", b, U, 1 << 21)
    struct.pack_into("=I", b, U + 8, 512)
    struct.pack_into("=I", b, U + 12, 1)
    assert m.decode(bytes(b)).payload == m.Image(1 << 21, 512, 1)

    b = raw(20)
    struct.pack_into("=iii", b, U, 2, 7, 0x2a)
    put_str(b, U + 12, b"vhd:/x")
    entry = m.decode(bytes(b))
    assert entry.payload == m.ListEntry(2, 7, 0x2a, "vhd:/x")
    assert m.encode(entry) == bytes(b)

    # The LIST terminator: count 0, minor -1.
    b = raw(20)
    struct.pack_into("=ii", b, U, 0, -1)
    assert m.decode(bytes(b)).payload == m.ListEntry(0, -1)

    b = raw(18)
    struct.pack_into("=iiii", b, U, 3, 1, 5, 9)
    assert m.decode(bytes(b)).payload == m.Minors((1, 5, 9))

    b = raw(22, 0xFFFF)
    struct.pack_into("=Q", b, U + 8, 5)
    msg = m.decode(bytes(b) + b'{"a"}')
    assert msg.text == b'{"a"}' and m.encode(msg) == bytes(b) + b'{"a"}'


def test_decode_blkif() -> None:
    b = raw(24, 1)
    struct.pack_into("=II", b, U, 4, 51712)
    struct.pack_into("=8I", b, U + 8, *range(10, 18))
    struct.pack_into("=II", b, U + 40, 3, 2)
    put_str(b, U + 48, b"pool0")
    struct.pack_into("=III", b, U + 304, 33, 1000, 50)
    msg = m.decode(bytes(b))
    assert msg.payload == m.Blkif(4, 51712, tuple(range(10, 18)), 3, 2, "pool0", 33, 1000, 50)
    assert m.encode(msg) == bytes(b)


def test_blkif_order_4_extension() -> None:
    """Our extension: an order-4 ring's refs 8-15 follow the 316-byte payload; for orders
    the reference can send, whatever its tapback left there is not read."""
    b = raw(24, 1)
    struct.pack_into("=II", b, U, 4, 51712)
    struct.pack_into("=8I", b, U + 8, *range(10, 18))
    struct.pack_into("=II", b, U + 40, 4, 3)
    struct.pack_into("=III", b, U + 304, 33, 0, 0)
    struct.pack_into("=8I", b, U + 316, *range(18, 26))
    msg = m.decode(bytes(b))
    assert msg.payload == m.Blkif(4, 51712, tuple(range(10, 26)), 4, 3, "", 33)
    assert m.encode(msg) == bytes(b)
    struct.pack_into("=I", b, U + 40, 3)  # the same bytes at order 3: the tail is ignored
    assert m.decode(bytes(b)).payload.gref == tuple(range(10, 18))
    struct.pack_into("=I", b, U + 40, 5)
    with pytest.raises(ControlProtocolError, match="ring order 5"):
        m.decode(bytes(b))
    for order, grefs in ((4, tuple(range(8))), (3, tuple(range(16))), (2, (1, 2, 3))):
        with pytest.raises(ControlProtocolError, match="grant refs"):
            m.encode(m.Message(m.MessageType.XENBLKIF_CONNECT, 1, m.Blkif(1, 2, grefs, order)))


def test_blkif_persistent_grants_extension() -> None:
    """Our extension: persistent grants negotiated, a features word after EXT_TAG at
    byte 348 of the payload (past the order-4 refs); bytes there without the tag (a
    reference tapback's stack) say nothing."""
    b = raw(24, 1)
    struct.pack_into("=II", b, U, 4, 51712)
    struct.pack_into("=8I", b, U + 8, *range(10, 18))
    struct.pack_into("=II", b, U + 40, 1, 3)
    struct.pack_into("=III", b, U + 304, 33, 0, 0)
    struct.pack_into("=4sI", b, U + 348, b"BTX1", 1)
    msg = m.decode(bytes(b))
    assert msg.payload == m.Blkif(4, 51712, tuple(range(10, 18)), 1, 3, "", 33,
                                  persistent_grants=True)
    assert m.encode(msg) == bytes(b)
    struct.pack_into("=4sI", b, U + 348, b"junk", 1)
    assert m.decode(bytes(b)).payload.persistent_grants is False
    struct.pack_into("=4sI", b, U + 348, b"BTX1", 0)
    assert m.decode(bytes(b)).payload.persistent_grants is False


def test_disk_info_ring_order_extension() -> None:
    b = raw(29, 2)
    struct.pack_into("=QII", b, U, 1 << 21, 512, 0)
    assert m.decode(bytes(b)).payload.max_ring_order is None  # the reference says nothing
    struct.pack_into("=4sI", b, U + 16, b"BTX1", 4)
    msg = m.decode(bytes(b))
    assert msg.payload == m.Image(1 << 21, 512, 0, 4) and m.encode(msg) == bytes(b)
    struct.pack_into("=4sII", b, U + 16, b"BTX1", 4, m.FEATURE_PERSISTENT_GRANTS)
    msg = m.decode(bytes(b))
    assert msg.payload == m.Image(1 << 21, 512, 0, 4, m.FEATURE_PERSISTENT_GRANTS)
    assert m.encode(msg) == bytes(b)
    struct.pack_into("=4sI", b, U + 16, b"BTX1", 9)  # an order nobody takes: not believed
    assert m.decode(bytes(b)).payload == m.Image(1 << 21, 512, 0)


@pytest.mark.parametrize("mtype", [3, 5, 9, 13, 15, 19, 21, 23, 28, 30])
def test_header_only_requests(mtype: int) -> None:
    b = raw(mtype, 12)
    msg = m.decode(bytes(b))
    assert msg.payload is None and msg.cookie == 12 and m.encode(msg) == bytes(b)


def test_names_and_numbers() -> None:
    assert m.MessageType.ERROR == 1 and m.MessageType.EXIT == 30
    assert m.MessageType.XENBLKIF_CONNECT == 24 and m.MessageType.DISK_INFO_RSP == 29
    assert m.MessageType.PID_RSP.label == "pid response"
    assert m.MessageType.XENBLKIF_DISCONNECT.label == "sring disconnect"
    assert m.Flag.OPEN_ENCRYPTED == 0x400 and m.Flag.ADD_LOG == 0x10


def _err(data: bytes) -> ControlProtocolError:
    with pytest.raises(ControlProtocolError) as ei:
        m.decode(data)
    return ei.value


def test_malformed() -> None:
    assert _err(bytes(100)).errno == errno.EPROTO  # short
    e = _err(bytes(raw(99, 6)))
    assert e.errno == errno.EINVAL and e.cookie == 6 and e.msg_type == 99
    assert _err(bytes(raw(0))).errno == errno.EINVAL
    b = raw(7, 1)
    put_str(b, U + 12, b"a" * 256)  # path fills its field: no NUL
    e = _err(bytes(b))
    assert "NUL" in str(e) and e.cookie == 1
    b = raw(7)
    struct.pack_into("=I", b, U, 0x800)  # unknown flag
    assert _err(bytes(b)).errno == errno.EINVAL
    b = raw(7)
    struct.pack_into("=I", b, U, 0x400)
    assert _err(bytes(b) + bytes([0])).errno == errno.EINVAL  # key size 0
    assert _err(bytes(b) + bytes([129]) + b"k" * 129).errno == errno.EINVAL
    assert _err(bytes(b) + bytes([32]) + b"k" * 31).errno == errno.EPROTO  # short key
    b = raw(18)
    struct.pack_into("=i", b, U, 64)
    assert _err(bytes(b)).errno == errno.EINVAL
    assert _err(bytes(raw(3)) + b"x").errno == errno.EPROTO  # trailing bytes
    reply = m.error_reply(_err(bytes(raw(99, 6))))
    assert reply.payload.error == errno.EINVAL and reply.cookie == 6
    assert m.decode(m.encode(reply)) == reply


def test_encode_rejects() -> None:
    with pytest.raises(ControlProtocolError) as ei:
        m.encode(m.Message(m.MessageType.OPEN, 0, m.Params(path="x" * 256)))
    assert ei.value.errno == errno.ENAMETOOLONG
    with pytest.raises(ControlProtocolError):
        m.encode(m.Message(m.MessageType.OPEN, 0, m.Params(flags=m.Flag.ADD_LOG)))  # no logpath
    with pytest.raises(ControlProtocolError):
        m.encode(m.Message(m.MessageType.OPEN, 70000, m.Params()))
    with pytest.raises(ControlProtocolError):
        m.encode(m.Message(m.MessageType.PID_RSP, 0, m.Image(1, 512)))
    with pytest.raises(ControlProtocolError):
        m.encode(m.Message(m.MessageType.PID, 0, m.Params(devnum=-1)))


def test_socket_pair_reads_exactly_one_message() -> None:
    a, b = socket.socketpair()
    with a, b:
        msg = m.Message(m.MessageType.RESUME, 3, m.Params(m.Flag.ADD_LOG, "vhd:/n"),
                        logpath="/log")
        data = m.encode(msg) + m.encode(m.Message(m.MessageType.PID))

        def dribble() -> None:  # one byte at a time: recv_into must loop
            for i in range(len(data)):
                a.send(data[i:i + 1])
        t = threading.Thread(target=dribble)
        t.start()
        assert m.read_message(b) == msg
        assert m.read_message(b).type is m.MessageType.PID
        t.join()
        m.write_message(a, msg)
        a.shutdown(socket.SHUT_WR)
        assert m.read_message(b) == msg
        with pytest.raises(ControlProtocolError) as ei:
            m.read_message(b)
        assert ei.value.errno == errno.EPROTO


def test_socket_timeout() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(0.01)
        a.send(bytes(10))
        with pytest.raises(ControlProtocolError) as ei:
            m.read_message(b)
        assert ei.value.errno == errno.ETIMEDOUT


# ----------------------------------------------------------------------------- fuzz
_text = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                max_size=60)
_u32 = st.integers(0, 2**32 - 1)
_i32 = st.integers(-(2**31), 2**31 - 1)
_flags = st.integers(0, m.KNOWN_FLAGS).map(lambda f: f & m.KNOWN_FLAGS)


@st.composite
def messages(draw: st.DrawFn) -> m.Message:
    t = draw(st.sampled_from(list(m.MessageType)))
    cookie = draw(st.integers(0, 0xFFFF))
    kind = m.PAYLOAD_KIND.get(t)
    logpath = key = text = None
    p: m.Payload | None = None
    if kind is m.Params:
        p = m.Params(draw(_flags), draw(_text), draw(_u32), draw(_u32), draw(_u32),
                     draw(st.integers(0, 0xFFFF)), draw(_text))
        if t in m.LOGPATH_TYPES and p.flags & m.Flag.ADD_LOG:
            logpath = draw(_text)
        if t in m.KEY_TYPES and p.flags & m.Flag.OPEN_ENCRYPTED:
            key = draw(st.binary(min_size=1, max_size=128))
    elif kind is m.Pid:
        p = m.Pid(draw(st.integers(1, 2**31 - 1)))
    elif kind is m.Image:
        p = m.Image(draw(st.integers(0, 2**64 - 1)), draw(_u32), draw(_u32))
    elif kind is m.Response:
        p = m.Response(draw(st.integers(0, 2**31 - 1)), draw(_text))
    elif kind is m.Minors:
        p = m.Minors(tuple(draw(st.lists(_i32, max_size=m.MAX_MINORS))))
    elif kind is m.ListEntry:
        p = m.ListEntry(draw(st.integers(0, 2**31 - 1)), draw(st.integers(-1, 2**31 - 1)),
                        draw(_i32), draw(_text))
    elif kind is m.Stat:
        p = m.Stat()
        text = draw(st.binary(max_size=100))
    elif kind is m.Blkif:
        order = draw(st.integers(0, 4))
        pages = 16 if order == 4 else 8
        p = m.Blkif(draw(_u32), draw(_u32),
                    tuple(draw(st.lists(_u32, min_size=pages, max_size=pages))),
                    order, draw(_u32), draw(_text), draw(_u32), draw(_u32), draw(_u32))
    elif kind is m.Text:
        p = m.Text(draw(_text))
    elif kind is m.Query:
        p = m.Query(draw(st.integers(0, 2**64 - 1)), draw(st.integers(0, 2**64 - 1)),
                    draw(_text))
    return m.Message(t, cookie, p, logpath, key, text)


_fast = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_fast
@given(messages())
def test_roundtrip(msg: m.Message) -> None:
    data = m.encode(msg)
    assert m.decode(data) == msg
    assert m.encode(m.decode(data)) == data


@_fast
@given(st.binary(max_size=SIZE + 300))
def test_fuzz_random_bytes(data: bytes) -> None:
    try:
        m.decode(data)
    except ControlProtocolError:
        pass


@_fast
@given(messages(), st.data())
def test_fuzz_one_field_corrupted(msg: m.Message, data: st.DataObject) -> None:
    buf = bytearray(m.encode(msg))
    # Overwrite one 1/2/4/8-byte aligned field, or truncate, or extend.
    how = data.draw(st.sampled_from(["field", "truncate", "extend"]))
    if how == "field":
        width = data.draw(st.sampled_from([1, 2, 4, 8]))
        off = data.draw(st.integers(0, (len(buf) - width) // width)) * width
        buf[off:off + width] = data.draw(st.binary(min_size=width, max_size=width))
    elif how == "truncate":
        del buf[data.draw(st.integers(0, len(buf) - 1)):]
    else:
        buf += data.draw(st.binary(min_size=1, max_size=300))
    try:
        out = m.decode(bytes(buf))
    except ControlProtocolError:
        return
    # Whatever decodes must encode again (the codec never builds a message it cannot send).
    m.encode(out)
