"""The compiled handshake pass (``_handshake.c``) against the Python negotiation it spares:
for the same bytes from a client, a server with the pass and one without send the same
bytes back, byte for byte, and serve the same session after GO (structured replies or
not, the metadata contexts): the usual sequences, every message the pass leaves to
Python, malformed ones, messages split anywhere, and random sequences (hypothesis).
Each on asyncio's own loop (the pass called from the readiness callback) and on a
polling loop, where the server's front desk (``_handshake.Desk``) runs the pass in the
loop's wait and hands the client over to Python where it stops."""

from __future__ import annotations

import asyncio
import itertools
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blktap.io import ThreadEngine
from blktap.io.polling import polling_loop_factory
from blktap.tapdisk.driver import Caps, Driver
from blktap.tapdisk.vbd import VBD
from blktap.transport.nbd import handshake
from blktap.transport.nbd import proto as p
from blktap.transport.nbd.server import Export, NbdServer
from nbd_helpers import read_until_end

if handshake.compiled_take() is None:
    pytest.skip("the compiled handshake is not built", allow_module_level=True)

from blktap.transport.nbd import _handshake  # noqa: E402

KiB = 1024
NAME = "exp"
# Where the servers run: asyncio's own loop, or a polling one (with the desk).
LOOPS = {"asyncio": None, "polling": polling_loop_factory(32)}


@pytest.fixture(params=list(LOOPS))
def loop(request: pytest.FixtureRequest) -> str:
    return request.param


class Patterned(Driver):
    """A read-only disk whose bytes are their offset's low byte."""

    name = "patterned"

    def __init__(self, engine: ThreadEngine) -> None:
        super().__init__(engine, 1 << 20, writable=False)
        self.caps = Caps.FLUSH

    async def read(self, offset: int, iov) -> None:  # noqa: ANN001
        for v in iov:
            v[:] = bytes((offset + i) & 0xFF for i in range(len(v)))
            offset += len(v)


def option(opt: int, data: bytes = b"", magic: int = p.IHAVEOPT) -> bytes:
    return struct.pack(">QII", magic, opt, len(data)) + data


def go_data(name: str | bytes = "", requests: tuple[int, ...] = (p.INFO_BLOCK_SIZE,)) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    return (struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(requests))
            + struct.pack(f">{len(requests)}H", *requests))


def meta_data(name: str | bytes = "", queries: tuple[str | bytes, ...] = ("base:allocation",)
              ) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        qb = q.encode() if isinstance(q, str) else q
        out += struct.pack(">I", len(qb)) + qb
    return out


FLAGS = struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES)
STRUCTURED = option(p.OPT_STRUCTURED_REPLY)
BASE = option(p.OPT_SET_META_CONTEXT, meta_data())
GO = option(p.OPT_GO, go_data())
# After GO: a read, a block status and a disconnect (an option stream not yet done
# takes them as a bad option, which ends it the same way on both servers).
TRANSMISSION = (struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_READ, 1, 1000, 600)
                + struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_BLOCK_STATUS, 2, 0, 64 * KiB)
                + struct.pack(">IHHQQI", p.REQUEST_MAGIC, 0, p.CMD_DISC, 3, 0, 0))


async def transcript(path: str, pieces: list[bytes]) -> bytes:
    """Everything the server sends to a client that sends ``pieces`` (each its own
    write, a moment apart), the transmission requests, then ends its side (or stops
    where the server dropped it)."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, path)
        try:
            for piece in [*pieces, TRANSMISSION]:
                await loop.sock_sendall(sock, piece)
                await asyncio.sleep(0)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # dropped: what it was sent is still to read
        return await read_until_end(sock)


class Pair:
    """Two servers of one disk: one with the compiled pass, one without."""

    def __init__(self, vbd: VBD, monkeypatch: pytest.MonkeyPatch, tmp: str, *,
                 any_name: bool) -> None:
        export = Export(NAME, vbd, description="a disk", any_name=any_name)
        self.compiled = NbdServer(export)
        assert self.compiled._compiled_take is not None
        with monkeypatch.context() as m:
            m.setenv("BLKTAP_INLINE", "0")
            self.python = NbdServer(export)
        assert self.python._compiled_take is None
        self.paths = (self.compiled.listen_unix(f"{tmp}/c.sock"),
                      self.python.listen_unix(f"{tmp}/p.sock"))
        assert not self.python._desks
        # (a polling loop, with the C extension: the desk takes the compiled side's)
        self.desk = next(iter(self.compiled._desks.values()), None)

    async def compare(self, pieces: list[bytes]) -> bytes:
        ours, reference = [await transcript(path, pieces) for path in self.paths]
        assert ours == reference
        return ours

    async def stop(self) -> None:
        await self.compiled.stop()
        await self.python.stop()


def run_pair(tmp_path, monkeypatch, body, loop: str, *, any_name: bool = False  # noqa: ANN001
             ) -> None:
    async def main() -> None:
        engine = ThreadEngine(1)
        vbd = VBD(Patterned(engine))
        pair = Pair(vbd, monkeypatch, str(tmp_path), any_name=any_name)
        assert (pair.desk is not None) == (loop == "polling")
        try:
            await body(pair)
            if pair.desk is not None:
                assert pair.desk.accepted, "no client went through the desk"
                assert pair.desk.held == 0
        finally:
            await pair.stop()
            await vbd.close()
            engine.close()
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(main())


def test_constants_match_the_protocol_module() -> None:
    assert (_handshake.MIN_BLOCK, _handshake.PREFERRED_BLOCK, _handshake.MAX_BLOCK) == (
        p.MIN_BLOCK, p.PREFERRED_BLOCK, p.MAX_BLOCK)
    assert (_handshake.MAX_OPTIONS, _handshake.MAX_OPTION_DATA, _handshake.MAX_QUERIES) == (
        handshake.MAX_OPTIONS, handshake.MAX_OPTION_DATA, handshake.MAX_QUERIES)


def test_the_usual_handshake_is_answered_by_the_pass_alone(tmp_path, monkeypatch, loop) -> None:  # noqa: ANN001
    """nbdcopy's connection (flags, STRUCTURED_REPLY, SET_META_CONTEXT, GO) never reaches
    the Python negotiation, and gives the same bytes and session as it."""
    taken: list[str] = []
    real = handshake.Negotiation.take

    def take(self):  # noqa: ANN001, ANN202
        taken.append("python")
        return real(self)

    monkeypatch.setattr(handshake.Negotiation, "take", take)

    async def body(pair: Pair) -> None:
        ours = await transcript(pair.paths[0], [FLAGS, STRUCTURED, BASE, GO])
        assert taken == []
        reference = await transcript(pair.paths[1], [FLAGS, STRUCTURED, BASE, GO])
        assert taken  # (the reference did run the Python negotiation)
        assert ours == reference
        # the session: the read in structured replies, the block status answered
        assert struct.pack(">IHHQI", p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                           p.REPLY_TYPE_BLOCK_STATUS, 2, 12) in ours
    run_pair(tmp_path, monkeypatch, body, loop)


class SpiedDesk:
    """A desk whose hand-overs are noted: the length of the answers left unsent."""

    def __init__(self, desk: object, unsent: list[int]) -> None:
        object.__setattr__(self, "desk", desk)
        object.__setattr__(self, "unsent", unsent)

    def collect(self) -> list:
        out = self.desk.collect()
        self.unsent.extend(len(item[6]) for item in out if item[6] is not None)
        return out

    def __getattr__(self, name: str) -> object:
        return getattr(self.desk, name)

    def __setattr__(self, name: str, value: object) -> None:
        setattr(self.desk, name, value)


def test_answers_the_socket_cannot_take_at_once_are_queued_in_order(
        tmp_path, monkeypatch, loop) -> None:  # noqa: ANN001
    """A client that reads nothing while it sends many options: the pass's answers
    overflow a small send buffer, and what the socket did not take is queued, in order,
    for the Python negotiation to go on behind; the client then reads the same bytes as
    from the Python path."""
    from blktap.transport.nbd import server as nbd_server

    # (The kernel's minimum, about 4.5 KiB, counting each small message's overhead: a
    # few dozen answers fill it.)
    monkeypatch.setattr(nbd_server, "UNIX_SEND_BUFFER", 1)
    partial: list[int] = []

    async def body(pair: Pair) -> None:
        take = pair.compiled._compiled_take

        def spying(*args):  # noqa: ANN002, ANN202
            out = take(*args)
            if out[3] is not None:
                partial.append(len(out[3]))
            return out
        pair.compiled._compiled_take = spying
        if pair.desk is not None:  # (the desk's take: what it hands over unsent)
            fd = next(iter(pair.compiled._desks))
            pair.compiled._desks[fd] = SpiedDesk(pair.desk, partial)
        infos = [option(p.OPT_INFO, go_data()), BASE] * 150
        ours = await pair.compare([FLAGS, STRUCTURED, b"".join(infos), GO])
        assert partial and partial[0] > 0, "the socket took everything: nothing tested"
        # every INFO answered (its ACK), then GO's, then the transmission's read
        assert ours.count(struct.pack(">QII", p.OPT_REPLY_MAGIC, p.OPT_INFO, p.REP_ACK)) == 150
        assert struct.pack(">IHHQI", p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                           p.REPLY_TYPE_BLOCK_STATUS, 2, 12) in ours
        if pair.desk is not None:
            pair.compiled._desks[fd] = pair.desk
    run_pair(tmp_path, monkeypatch, body, loop)


USUAL = [
    [FLAGS, STRUCTURED, BASE, GO],
    [FLAGS + STRUCTURED + BASE + GO],  # all at once
    [FLAGS, STRUCTURED, option(p.OPT_SET_META_CONTEXT, meta_data(NAME)),
     option(p.OPT_GO, go_data(NAME))],
    [FLAGS, option(p.OPT_GO, go_data("", ()))],  # simple replies, no context
    [struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE), STRUCTURED, GO],  # zeroes kept
    [FLAGS, STRUCTURED, option(p.OPT_INFO, go_data()), BASE, GO],
    [FLAGS, STRUCTURED, option(p.OPT_SET_META_CONTEXT, meta_data("", ())), GO],
    [FLAGS, STRUCTURED, option(p.OPT_SET_META_CONTEXT,
                               meta_data("", ("base:allocation", "base:allocation"))), GO],
    [FLAGS, STRUCTURED, BASE, option(p.OPT_SET_META_CONTEXT, meta_data("", ())), GO],
    [FLAGS, option(p.OPT_GO, go_data("", (p.INFO_EXPORT, p.INFO_BLOCK_SIZE, 77)))],
    # longer than the desk's buffer (1 KiB): its pass goes on in Python with the state
    [FLAGS, STRUCTURED, option(p.OPT_SET_META_CONTEXT,
                               meta_data("", ("base:allocation",) * 80)), GO],
]

LEFT_TO_PYTHON = [
    [struct.pack(">I", 0x10 | 3), GO],  # unknown client flags: dropped
    [struct.pack(">I", 0), GO],  # not fixed newstyle: dropped
    [struct.pack(">I", 0), option(p.OPT_EXPORT_NAME, b"")],
    [FLAGS, option(p.OPT_EXPORT_NAME, NAME.encode())],
    [FLAGS, STRUCTURED, option(p.OPT_EXPORT_NAME, b"")],
    [FLAGS, option(p.OPT_GO, go_data("nope"))],  # unknown export, then a good GO
    [FLAGS, option(p.OPT_GO, go_data("n" * 2000)), GO],  # and longer than the desk's buffer
    [FLAGS, option(p.OPT_GO, go_data("nope")), GO],
    [FLAGS, option(p.OPT_GO, go_data(NAME, (p.INFO_NAME, p.INFO_DESCRIPTION)))],
    [FLAGS, option(p.OPT_INFO, go_data("", (p.INFO_DESCRIPTION,))), GO],
    [FLAGS, option(p.OPT_GO, go_data(b"\xff\xfe"))],  # not UTF-8
    [FLAGS, option(p.OPT_GO, b"\0\0")],  # too short
    [FLAGS, option(p.OPT_GO, struct.pack(">IH", 50, 0)), GO],  # name past the option
    [FLAGS, option(p.OPT_GO, go_data() + b"\0"), GO],  # wrong number of requests
    [FLAGS, BASE, STRUCTURED, BASE, GO],  # contexts before structured replies
    [FLAGS, option(p.OPT_STRUCTURED_REPLY, b"x"), STRUCTURED, GO],
    [FLAGS, STRUCTURED, option(p.OPT_SET_META_CONTEXT,
                               meta_data("", ("qemu:dirty-bitmap:x", "base:allocation"))), GO],
    [FLAGS, STRUCTURED, option(p.OPT_SET_META_CONTEXT, meta_data("", ("base:",))), GO],
    [FLAGS, STRUCTURED, option(p.OPT_SET_META_CONTEXT, meta_data("other")), GO],
    [FLAGS, STRUCTURED, option(p.OPT_SET_META_CONTEXT, meta_data() + b"x"), GO],
    [FLAGS, STRUCTURED, option(p.OPT_SET_META_CONTEXT, meta_data()[:-1]), GO],
    [FLAGS, STRUCTURED, option(p.OPT_SET_META_CONTEXT, struct.pack(">II", 0, 300)), GO],
    [FLAGS, STRUCTURED, option(p.OPT_LIST_META_CONTEXT, meta_data("", ())), BASE, GO],
    [FLAGS, option(p.OPT_LIST), option(p.OPT_LIST, b"x"), GO],
    [FLAGS, option(42, b"what"), GO],  # unknown option: ERR_UNSUP, and on
    [FLAGS, option(p.OPT_STARTTLS), GO],  # no TLS here
    [FLAGS, STRUCTURED, option(p.OPT_ABORT)],
    [FLAGS, option(p.OPT_GO, go_data(), magic=p.IHAVEOPT ^ 1)],  # bad magic: dropped
    [FLAGS, STRUCTURED, option(p.OPT_SET_META_CONTEXT, bytes(70 * KiB)), BASE, GO],  # skipped
    [FLAGS, STRUCTURED + struct.pack(">QII", p.IHAVEOPT, p.OPT_GO, 32 << 20)],  # dropped
    [FLAGS] + [STRUCTURED] * 300 + [GO],  # answers past the pass's buffer
    [FLAGS, STRUCTURED * (handshake.MAX_OPTIONS + 5), GO],  # too many options: dropped
    [FLAGS, STRUCTURED],  # the client stops before GO
    [],
]


@pytest.mark.parametrize("pieces", USUAL + LEFT_TO_PYTHON)
def test_the_same_answers_as_the_python_negotiation(tmp_path, monkeypatch, pieces, loop) -> None:  # noqa: ANN001
    run_pair(tmp_path, monkeypatch, lambda pair: pair.compare(pieces), loop)


@pytest.mark.parametrize("pieces", USUAL[:3] + LEFT_TO_PYTHON[:12])
def test_the_same_answers_byte_by_byte(tmp_path, monkeypatch, pieces, loop) -> None:  # noqa: ANN001
    """Every message split into single bytes, each sent on its own."""
    stream = b"".join(pieces)
    run_pair(tmp_path, monkeypatch,
             lambda pair: pair.compare([stream[i:i + 1] for i in range(len(stream))]), loop)


def test_any_name_exports_leave_other_names_to_python(tmp_path, monkeypatch, loop) -> None:  # noqa: ANN001
    async def body(pair: Pair) -> None:
        for pieces in ([FLAGS, STRUCTURED, option(p.OPT_SET_META_CONTEXT, meta_data("uuid")),
                        option(p.OPT_GO, go_data("uuid"))],
                       [FLAGS, STRUCTURED, BASE, GO]):
            assert p.REP_ERR_UNKNOWN.to_bytes(4, "big") not in await pair.compare(pieces)
    run_pair(tmp_path, monkeypatch, body, loop, any_name=True)


# Random conversations: options good and bad, cut anywhere.
_names = st.sampled_from(["", NAME, "other", b"\xff"])
_queries = st.lists(st.sampled_from(["base:allocation", "base:", "qemu:dirty-bitmap:x",
                                     "foo"]), max_size=3).map(tuple)
_requests = st.lists(st.sampled_from([0, 1, 2, 3, 9]), max_size=3).map(tuple)
_damage = st.sampled_from(["", "cut", "extra"])


def _damaged(data: bytes, how: str) -> bytes:
    return data[:-1] if how == "cut" and data else data + b"\0" if how == "extra" else data


_option = st.one_of(
    st.just(STRUCTURED),
    st.builds(lambda n, q, d: option(p.OPT_SET_META_CONTEXT, _damaged(meta_data(n, q), d)),
              _names, _queries, _damage),
    st.builds(lambda o, n, r, d: option(o, _damaged(go_data(n, r), d)),
              st.sampled_from([p.OPT_INFO, p.OPT_GO]), _names, _requests, _damage),
    st.builds(lambda n, q: option(p.OPT_LIST_META_CONTEXT, meta_data(n, q)), _names, _queries),
    st.sampled_from([option(p.OPT_LIST), option(77, b"?"), option(p.OPT_STRUCTURED_REPLY, b"!"),
                     option(p.OPT_EXPORT_NAME, b""), option(p.OPT_ABORT)]),
)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cflags=st.sampled_from([0, 1, 2, 3, 8]), options=st.lists(_option, max_size=6),
       cuts=st.lists(st.integers(0, 400), max_size=4))
def test_random_conversations(tmp_path, monkeypatch, loop, cflags, options, cuts  # noqa: ANN001
                              ) -> None:
    stream = struct.pack(">I", cflags) + b"".join(options) + GO
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    pieces = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    run_pair(tmp_path, monkeypatch, lambda pair: pair.compare(pieces), loop)
