"""The handshakes: fixed newstyle (option haggling until the client picks the export),
and oldstyle (:func:`oldstyle`, for a connection handed over on an fd-passing socket).

:class:`Negotiation` is the fixed newstyle protocol without the waiting: it takes the
complete messages buffered in a :class:`~blktap.transport.sockio.Channel` and says what to
send back. Two drivers run it:

- :class:`FedNegotiation`, on plain sockets: the loop's readiness callback receives each
  message and answers it at once (no task, no future, no second turn of the loop per
  message). A client's connection costs the server a few turns of the loop instead of a
  dozen; nbdcopy and other tools that open several connections per run pay that each time.
  Where the compiled pass is built (``_handshake.c``) it answers the messages of a
  connection that goes the usual way (flags, STRUCTURED_REPLY, SET_META_CONTEXT for
  base:allocation, INFO and GO) and hands anything else to :class:`Negotiation`, with
  what it agreed so far (:meth:`Negotiation.adopt`).
- :func:`negotiate`, a coroutine, where the server requires TLS (STARTTLS upgrades the
  socket in the middle of the negotiation).

With a TLS context the server runs in FORCEDTLS mode: every option but STARTTLS and
ABORT is answered ERR_TLS_REQD until TLS is up, and EXPORT_NAME before that drops the
client. Unknown options are answered ERR_UNSUP and negotiation goes on. A client that
breaks the protocol in a way that cannot be answered (bad magic, unknown client flags,
an EXPORT_NAME for an export we do not have, an absurd option length) is dropped.
"""

from __future__ import annotations

import logging
import ssl
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from blktap.io.clock import turn_clock
from blktap.tapdisk.driver import Caps
from blktap.transport.nbd import inline
from blktap.transport.nbd import proto as p
from blktap.transport.nbd.export import Export
from blktap.transport.sockio import Channel, Closed

try:
    from blktap.transport.nbd import _handshake
except ImportError:  # not built (no compiler at install time)
    _handshake = None  # type: ignore[assignment]

# The compiled pass's outcome for a client it agreed a session with (GO answered).
AGREED = None if _handshake is None else _handshake.AGREED
# A desk's outcome for a client whose connection ended there (served, then DISC or gone).
ENDED = None if _handshake is None else _handshake.ENDED

log = logging.getLogger("blktap.nbd")

# (consumed, state, outcome, unsent) = take(fd, buf, start, end, state, name, size, flags)
CompiledTake = Callable[[int, bytearray, int, int, int, bytes, int, int],
                        tuple[int, int, int, bytes | None]]

# Option data we read and parse; longer options are skipped and refused, much longer
# ones end the session (a client sending megabytes of options is not negotiating).
MAX_OPTION_DATA = 64 << 10
MAX_SKIPPED_OPTION = 16 << 20
MAX_OPTIONS = 1024
MAX_QUERIES = 256
_CLIENT_FLAGS = struct.Struct(">I")


class Dropped(Exception):
    """The client must be disconnected (the reason is the message)."""


@dataclass
class Session:
    """What a finished negotiation agreed on."""

    export: Export
    structured: bool = False
    no_zeroes: bool = False
    contexts: dict[int, str] = field(default_factory=dict)


class _Invalid(Exception):
    """Answer this option with an error reply."""

    def __init__(self, reply: int, message: str) -> None:
        super().__init__(message)
        self.reply = reply


def agreed(session: Session, state: int) -> Session:
    """``session`` with what the compiled pass (``_handshake.take``, or the server's
    desk) agreed with the client: ``state``, its ST_* bits."""
    h = _handshake
    session.no_zeroes = bool(state & h.ST_NO_ZEROES)
    session.structured = bool(state & h.ST_STRUCTURED)
    if state & h.ST_CONTEXTS_SET:
        session.contexts = ({p.META_ID_BASE_ALLOCATION: p.META_BASE_ALLOCATION}
                            if state & h.ST_BASE_ALLOCATION else {})
    return session


def transmission_flags(export: Export, structured: bool) -> int:
    caps = export.vbd.caps
    flags = p.FLAG_HAS_FLAGS | p.FLAG_SEND_FLUSH | p.FLAG_SEND_CACHE
    # One process serves every connection from the same VBD: no per-connection cache,
    # and a flush on any connection syncs the files every connection wrote to.
    flags |= p.FLAG_CAN_MULTI_CONN
    if export.vbd.read_only:
        flags |= p.FLAG_READ_ONLY
    else:
        flags |= p.FLAG_SEND_FUA | p.FLAG_SEND_WRITE_ZEROES
        if caps & Caps.TRIM:
            flags |= p.FLAG_SEND_TRIM
        if caps & Caps.FAST_ZERO:
            flags |= p.FLAG_SEND_FAST_ZERO
    if structured:
        flags |= p.FLAG_SEND_DF
    return flags


# The server's first message (fixed newstyle, no zeroes).
GREETING = p.HELLO.pack(p.NBDMAGIC, p.IHAVEOPT, p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES)


class Negotiation:
    """The fixed newstyle negotiation of one client, fed from its channel's buffer."""

    def __init__(self, ch: Channel, export: Export, tls: ssl.SSLContext | None) -> None:
        self.ch = ch
        self.export = export
        self.tls_context = tls
        self.session = Session(export)
        self.fixed = False
        self.flags_seen = False  # the client's flags (the first message) were taken
        self.options = 0
        self.skipping = 0  # bytes of an over-long option's data still to drop
        self.skipped_option = 0
        # How the negotiation ended: None while it goes on; the session to serve, False
        # when the client ended it (ABORT), or why the client is dropped.
        self.outcome: Session | bool | Dropped | None = None
        self.upgrade = False  # STARTTLS acknowledged: upgrade before taking more

    def greeting(self) -> list[bytes]:
        return [GREETING]

    @property
    def need(self) -> int:
        """Bytes that must be buffered before :meth:`take` can go on."""
        if self.skipping:
            return 1
        if not self.flags_seen:
            return 4
        ch = self.ch
        if ch.buffered < p.OPTION.size:
            return p.OPTION.size
        _, _, length = p.OPTION.unpack_from(ch.buf, ch.start)
        return p.OPTION.size + length

    # ------------------------------------------------------------------ messages
    def take(self) -> list[bytes]:
        """Handle every complete message buffered (consuming it) until the negotiation
        ends or STARTTLS asks for an upgrade; what to send, in order (the answers to the
        options before one that drops the client too: :attr:`outcome` is then Dropped)."""
        out: list[bytes] = []
        try:
            self._take(out)
        except Dropped as exc:
            self.outcome = exc
        return out

    def _take(self, out: list[bytes]) -> None:
        ch = self.ch
        while self.outcome is None and not self.upgrade:
            if self.skipping:
                dropped = min(self.skipping, ch.buffered)
                if not dropped:
                    break
                ch.consume(dropped)
                self.skipping -= dropped
                if not self.skipping:
                    out += self._error(self.skipped_option, p.REP_ERR_TOO_BIG,
                                       "option data too long")
                continue
            if not self.flags_seen:
                if ch.buffered < 4:
                    break
                (cflags,) = ch.unpack(_CLIENT_FLAGS)
                if cflags & ~(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES):
                    raise Dropped(f"unknown client flags {cflags:#x}")
                self.flags_seen = True
                self.fixed = bool(cflags & p.FLAG_C_FIXED_NEWSTYLE)
                self.session.no_zeroes = bool(cflags & p.FLAG_C_NO_ZEROES)
                continue
            if ch.buffered < p.OPTION.size:
                break
            magic, option, length = p.OPTION.unpack_from(ch.buf, ch.start)
            if magic != p.IHAVEOPT:
                raise Dropped(f"bad option magic {magic:#x}")
            if self.options == MAX_OPTIONS:
                raise Dropped(f"more than {MAX_OPTIONS} options")
            if length > MAX_OPTION_DATA:
                if option == p.OPT_EXPORT_NAME or length > MAX_SKIPPED_OPTION:
                    raise Dropped(f"option {option} with {length} bytes of data")
                ch.consume(p.OPTION.size)
                self.options += 1
                self.skipping, self.skipped_option = length, option
                continue
            if ch.buffered < p.OPTION.size + length:
                break
            ch.consume(p.OPTION.size)
            data = bytes(ch.view[ch.start : ch.start + length])
            ch.consume(length)
            self.options += 1
            if not self.fixed and option != p.OPT_EXPORT_NAME:
                raise Dropped("only EXPORT_NAME is valid without fixed newstyle")
            try:
                out += self.option(option, data)
            except _Invalid as exc:
                out += self._error(option, exc.reply, str(exc))

    def adopt(self, state: int) -> None:
        """Go on from where the compiled pass (``_handshake.take``) stopped: ``state`` is
        what it agreed with the client (its ST_* bits, and the options it took)."""
        h = _handshake
        self.flags_seen = bool(state & h.ST_FLAGS_SEEN)
        self.fixed = bool(state & h.ST_FIXED)
        self.options = state >> h.ST_OPTIONS_SHIFT
        agreed(self.session, state)

    def upgraded(self) -> None:
        """TLS is up: nothing negotiated in clear text survives the upgrade."""
        self.upgrade = False
        self.session = Session(self.export, no_zeroes=self.session.no_zeroes)

    # ------------------------------------------------------------------ replies
    @staticmethod
    def _reply(option: int, kind: int, data: bytes = b"",
               before: Sequence[tuple[int, bytes]] = ()) -> list[bytes]:
        """An option's reply of ``kind``, the ``before`` replies (kind, data) first: they
        leave in one message (the client waits for the last one, and each message it is
        sent on its own costs it a wake-up, and the server a system call)."""
        parts: list[bytes] = []
        for k, d in (*before, (kind, data)):
            parts += (p.OPTION_REPLY.pack(p.OPT_REPLY_MAGIC, option, k, len(d)), d)
        return parts

    def _error(self, option: int, kind: int, message: str) -> list[bytes]:
        return self._reply(option, kind, message.encode()[:4096])

    @property
    def tls_required(self) -> bool:
        return self.tls_context is not None and not self.ch.tls

    def option(self, option: int, data: bytes) -> list[bytes]:
        """Handle one option; its replies. Sets :attr:`outcome` when it ends the
        negotiation and :attr:`upgrade` for STARTTLS."""
        if option == p.OPT_ABORT:
            self.outcome = False
            return self._reply(option, p.REP_ACK)
        if option == p.OPT_STARTTLS:
            return self.starttls(data)
        if self.tls_required:
            if option == p.OPT_EXPORT_NAME:
                raise Dropped("EXPORT_NAME before TLS")
            raise _Invalid(p.REP_ERR_TLS_REQD, "TLS is required: use STARTTLS first")
        if option == p.OPT_EXPORT_NAME:
            name = self._decode(data)
            if not self.export.matches(name):
                raise Dropped(f"EXPORT_NAME of unknown export {name!r}")
            flags = transmission_flags(self.export, self.session.structured)
            zeros = b"" if self.session.no_zeroes else bytes(124)
            self.outcome = self.session
            return [p.EXPORT_NAME_REPLY.pack(self.export.vbd.size, flags), zeros]
        if option == p.OPT_LIST:
            if data:
                raise _Invalid(p.REP_ERR_INVALID, "LIST takes no data")
            name = self.export.name.encode()
            server = struct.pack(">I", len(name)) + name + self.export.description.encode()
            return self._reply(option, p.REP_ACK, before=[(p.REP_SERVER, server)])
        if option in (p.OPT_INFO, p.OPT_GO):
            replies = self.info(option, data)
            if option == p.OPT_GO:
                self.outcome = self.session
            return replies
        if option == p.OPT_STRUCTURED_REPLY:
            if data:
                raise _Invalid(p.REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
            self.session.structured = True
            return self._reply(option, p.REP_ACK)
        if option in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
            return self.meta_context(option, data)
        raise _Invalid(p.REP_ERR_UNSUP, f"option {option} is not supported")

    # ------------------------------------------------------------------ options
    @staticmethod
    def _decode(data: bytes) -> str:
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise _Invalid(p.REP_ERR_INVALID, "name is not UTF-8") from None

    def starttls(self, data: bytes) -> list[bytes]:
        if self.tls_context is None:
            raise _Invalid(p.REP_ERR_UNSUP, "TLS is not configured on this server")
        if self.ch.tls:
            raise _Invalid(p.REP_ERR_INVALID, "TLS is already active")
        if data:
            raise _Invalid(p.REP_ERR_INVALID, "STARTTLS takes no data")
        self.upgrade = True
        return self._reply(p.OPT_STARTTLS, p.REP_ACK)

    def info(self, option: int, data: bytes) -> list[bytes]:
        if len(data) < 6:
            raise _Invalid(p.REP_ERR_INVALID, "INFO/GO data too short")
        (nlen,) = struct.unpack_from(">I", data)
        if nlen > len(data) - 6:
            raise _Invalid(p.REP_ERR_INVALID, "export name runs past the option")
        name = self._decode(data[4 : 4 + nlen])
        (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
        if len(data) != 6 + nlen + 2 * nreq:
            raise _Invalid(p.REP_ERR_INVALID, "wrong number of information requests")
        requests = set(struct.unpack_from(f">{nreq}H", data, 6 + nlen))
        if not self.export.matches(name):
            raise _Invalid(p.REP_ERR_UNKNOWN, f"no export named {name!r}")
        export = self.export
        flags = transmission_flags(export, self.session.structured)
        infos = [
            p.INFO_EXPORT_PAYLOAD.pack(p.INFO_EXPORT, export.vbd.size, flags),
            # Sent whether asked or not: clients that do not understand it ignore it.
            p.INFO_BLOCK_SIZE_PAYLOAD.pack(
                p.INFO_BLOCK_SIZE, p.MIN_BLOCK, p.PREFERRED_BLOCK, p.MAX_BLOCK),
        ]
        if p.INFO_NAME in requests:
            infos.append(struct.pack(">H", p.INFO_NAME) + export.name.encode())
        if p.INFO_DESCRIPTION in requests and export.description:
            infos.append(struct.pack(">H", p.INFO_DESCRIPTION) + export.description.encode())
        return self._reply(option, p.REP_ACK, before=[(p.REP_INFO, info) for info in infos])

    def _queries(self, data: bytes) -> tuple[str, list[str]]:
        try:
            (nlen,) = struct.unpack_from(">I", data)
            if 4 + nlen + 4 > len(data):
                raise struct.error("name too long")
            name = self._decode(data[4 : 4 + nlen])
            pos = 4 + nlen
            (count,) = struct.unpack_from(">I", data, pos)
            pos += 4
            if count > MAX_QUERIES:
                raise _Invalid(p.REP_ERR_TOO_BIG, f"more than {MAX_QUERIES} queries")
            queries = []
            for _ in range(count):
                (qlen,) = struct.unpack_from(">I", data, pos)
                pos += 4
                if pos + qlen > len(data):
                    raise struct.error("query too long")
                queries.append(self._decode(data[pos : pos + qlen]))
                pos += qlen
        except struct.error:
            raise _Invalid(p.REP_ERR_INVALID, "malformed meta context request") from None
        if pos != len(data):
            raise _Invalid(p.REP_ERR_INVALID, "trailing data in meta context request")
        return name, queries

    def meta_context(self, option: int, data: bytes) -> list[bytes]:
        listing = option == p.OPT_LIST_META_CONTEXT
        if not listing:
            self.session.contexts = {}  # replaced even when the request fails
        if not self.session.structured:
            raise _Invalid(p.REP_ERR_INVALID, "negotiate structured replies first")
        name, queries = self._queries(data)
        if not self.export.matches(name):
            raise _Invalid(p.REP_ERR_UNKNOWN, f"no export named {name!r}")
        # base:allocation, then qemu:dirty-bitmap:NAME per CBT log, with their ids.
        known = {p.META_BASE_ALLOCATION: p.META_ID_BASE_ALLOCATION}
        for i, bitmap in enumerate(self.export.vbd.dirty_bitmaps()):
            known.setdefault(p.META_DIRTY_BITMAP + bitmap, p.META_ID_BASE_ALLOCATION + 1 + i)
        if listing:
            # No query lists everything; "ns:" or "qemu:dirty-bitmap:" lists a family.
            contexts = [(0, ctx) for ctx in known
                        if not queries or any(q == ctx or (q.endswith(":") and ctx.startswith(q))
                                              for q in queries)]
        else:
            chosen = {known[q]: q for q in dict.fromkeys(queries) if q in known}
            self.session.contexts = chosen
            contexts = list(chosen.items())
        return self._reply(option, p.REP_ACK, before=[
            (p.REP_META_CONTEXT, struct.pack(">I", ctx_id) + ctx.encode())
            for ctx_id, ctx in contexts])


class FedNegotiation:
    """Runs a :class:`Negotiation` on a plain socket from the loop's readiness callback
    (:meth:`Channel.feed`): each message is answered as it arrives. ``done`` is called
    once, with the outcome (:attr:`Negotiation.outcome`: a Session, False, or Dropped)
    or the exception that ended it (Closed, or TimeoutError after ``timeout`` seconds);
    the channel is then the caller's again. The time limit is the caller's to enforce
    (:attr:`deadline`, :meth:`expire`): one periodic check for every handshake of a
    server costs the loop less than a timer of each (made, then cancelled, per client,
    and while any is armed every turn of the loop reads the clock for it)."""

    def __init__(self, ch: Channel, export: Export,
                 done: Callable[[Session | bool | BaseException], None], *,
                 timeout: float, compiled: CompiledTake | None = None) -> None:
        if ch.tls:
            raise ValueError("a fed negotiation runs on a plain socket")
        self.ch = ch
        self.negotiation = Negotiation(ch, export, None)
        self.timeout = timeout
        self.deadline = 0.0  # (time.monotonic) when start()ed, plus the timeout
        self._done: Callable[[Session | bool | BaseException], None] | None = done
        # The compiled pass (compiled_take()) while it goes on; its state between calls.
        self._take = compiled
        self._state = 0
        if compiled is not None:
            self._name = export.name.encode()
            self._flags = transmission_flags(export, False)

    def start(self) -> None:
        ch = self.ch
        self.deadline = turn_clock(ch.loop)() + self.timeout
        ch.post(self.negotiation.greeting(), _ignore, now=True)
        if not ch.clear_to_send():
            self._take = None  # (the greeting waits: the pass's answers must not pass it)
        ch.feed(self._fed)

    def resume(self, state: int, outcome: int, unsent: bytes | None,
               deadline: float) -> None:
        """Instead of :meth:`start`: go on from the server's desk (``_handshake.Desk``),
        which greeted the client and answered its usual options in the loop's wait.
        ``state`` and ``outcome`` are its take's, ``unsent`` the answers the socket did
        not take; what it received and did not take is in the channel's buffer
        (:meth:`Channel.preload`). ``deadline`` (:func:`time.monotonic`) is when the
        time limit, counted from the client's accept, is up."""
        ch = self.ch
        self.deadline = deadline
        neg = self.negotiation
        neg.adopt(state)
        if unsent is not None:
            ch.post([unsent], _ignore, now=True)
        if outcome == _handshake.AGREED:
            neg.outcome = neg.session
            ch.send_posted()
            self._finish(neg.session)
            return
        if (outcome == _handshake.WAIT and unsent is None and ch.clear_to_send()
                and self._take is not None):
            self._state = state  # (the desk's buffer was full: the pass goes on here)
        else:
            self._take = None
        ch.feed(self._fed)
        if ch.buffered:
            self._fed(None)

    def expire(self) -> None:
        """The time limit is up: the handshake ends with TimeoutError (if it has not
        ended)."""
        self._finish(TimeoutError("the handshake took too long"))

    def _fed(self, exc: BaseException | None) -> None:
        if exc is not None:
            self._finish(exc)
            return
        neg = self.negotiation
        try:
            if self._take is not None and self._compiled_took():
                return
            out = neg.take()
        except Exception as bug:  # lose this client (and say so), keep the server
            log.exception("handshake failed")
            self._finish(bug)
            return
        if out:
            # (a send that fails shows as the end of the stream on the next readiness)
            self.ch.post(out, _ignore, now=True)
        if neg.outcome is not None:
            # The client waits for the last answer (GO's): it leaves before the work of
            # starting transmission, which the client need not wait for.
            self.ch.send_posted()
            self._finish(neg.outcome)

    def _compiled_took(self) -> bool:
        """Run the compiled pass on what is buffered; True if it answered all of it (or
        agreed on the session), False if the Python negotiation goes on from here."""
        ch = self.ch
        neg = self.negotiation
        assert self._take is not None
        consumed, self._state, outcome, unsent = self._take(
            ch.fd, ch.buf, ch.start, ch.end, self._state, self._name, neg.export.vbd.size,
            self._flags)
        if consumed:
            ch.consume(consumed)
        if outcome == _handshake.WAIT:
            return True
        self._take = None
        neg.adopt(self._state)
        if unsent is not None:  # (the socket was full, or broke: the queue takes it)
            ch.post([unsent], _ignore, now=True)
        if outcome == _handshake.AGREED:
            neg.outcome = neg.session
            ch.send_posted()
            self._finish(neg.session)
            return True
        return False

    def _finish(self, result: Session | bool | BaseException) -> None:
        done, self._done = self._done, None
        if done is None:
            return
        self.ch.feed(None)
        done(result)


def _ignore(_exc: BaseException | None, _arg: object) -> None:
    pass


def compiled_take() -> CompiledTake | None:
    """The compiled handshake pass (``_handshake.take``) for :class:`FedNegotiation`, or
    None when it was not built or ``BLKTAP_INLINE=0`` turns the compiled paths off."""
    if _handshake is None or inline.turned_off():
        return None
    return _handshake.take  # type: ignore[no-any-return]


def compiled_desk() -> Any:
    """The compiled front desk (``_handshake.Desk``: accepts and answers the usual
    handshakes in the loop's wait) or None when it was not built (it needs io._poll too)
    or ``BLKTAP_INLINE=0`` turns the compiled paths off."""
    if _handshake is None or inline.turned_off():
        return None
    return getattr(_handshake, "Desk", None)


async def negotiate(ch: Channel, export: Export, tls: ssl.SSLContext | None
                    ) -> Session | None:
    """Negotiate as a coroutine (for a server that requires TLS, since STARTTLS upgrades
    the socket halfway): the session to serve, or None when the client ended it (ABORT).
    Raises Dropped or Closed."""
    neg = Negotiation(ch, export, tls)
    await ch.send(neg.greeting(), now=True)
    while True:
        out = neg.take()
        if out:
            try:
                await ch.send(out, now=True)
            except Closed:
                if neg.outcome is not False:
                    raise  # (a client that aborted may close without reading the ACK)
        if isinstance(neg.outcome, Dropped):
            raise neg.outcome
        if neg.outcome is not None:
            return neg.outcome or None
        if neg.upgrade:
            assert neg.tls_context is not None
            await ch.start_tls(neg.tls_context)
            neg.upgraded()
            continue
        await ch.fill(neg.need)


async def oldstyle(ch: Channel, export: Export, tls: ssl.SSLContext | None) -> Session:
    """The oldstyle handshake: the server says everything (size, transmission flags) in
    one message, and transmission starts at once with simple replies only (no options:
    no structured replies, no metadata contexts, no TLS, no export name). A server that
    requires TLS drops the client instead."""
    if tls is not None:
        raise Dropped("the oldstyle handshake cannot do TLS, which this server requires")
    flags = transmission_flags(export, structured=False)
    await ch.send([p.OLDSTYLE_HELLO.pack(p.NBDMAGIC, p.OLDSTYLE_MAGIC, export.vbd.size,
                                         flags)], now=True)
    return Session(export)
