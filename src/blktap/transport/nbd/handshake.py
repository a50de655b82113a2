"""The handshakes: fixed newstyle (option haggling until the client picks the export),
and oldstyle (:func:`oldstyle`, for a connection handed over on an fd-passing socket).

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
from collections.abc import Sequence
from dataclasses import dataclass, field

from blktap.tapdisk.driver import Caps
from blktap.transport.nbd import proto as p
from blktap.transport.nbd.export import Export
from blktap.transport.sockio import Channel, Closed

log = logging.getLogger("blktap.nbd")

# Option data we read and parse; longer options are skipped and refused, much longer
# ones end the session (a client sending megabytes of options is not negotiating).
MAX_OPTION_DATA = 64 << 10
MAX_SKIPPED_OPTION = 16 << 20
MAX_OPTIONS = 1024
MAX_QUERIES = 256


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


class Negotiation:
    def __init__(self, ch: Channel, export: Export, tls: ssl.SSLContext | None) -> None:
        self.ch = ch
        self.export = export
        self.tls_context = tls
        self.session = Session(export)
        self.fixed = False

    # ------------------------------------------------------------------ replies
    async def reply(self, option: int, kind: int, data: bytes = b"",
                    before: Sequence[tuple[int, bytes]] = ()) -> None:
        """Send an option's reply of ``kind``, the ``before`` replies (kind, data) first,
        all in one message: the client waits for the last one, and each message it is sent
        on its own costs it a wake-up (and the server a system call)."""
        parts: list[bytes] = []
        for k, d in (*before, (kind, data)):
            parts += (p.OPTION_REPLY.pack(p.OPT_REPLY_MAGIC, option, k, len(d)), d)
        await self.ch.send(parts, now=True)

    async def error(self, option: int, kind: int, message: str) -> None:
        await self.reply(option, kind, message.encode()[:4096])

    # ------------------------------------------------------------------ main loop
    async def run(self) -> Session | None:
        """Negotiate; the session to serve, or None when the client ended it (ABORT)."""
        ch = self.ch
        await ch.send([p.HELLO.pack(p.NBDMAGIC, p.IHAVEOPT,
                                    p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES)], now=True)
        (cflags,) = struct.unpack(">I", await ch.read_exact(4))
        if cflags & ~(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES):
            raise Dropped(f"unknown client flags {cflags:#x}")
        self.fixed = bool(cflags & p.FLAG_C_FIXED_NEWSTYLE)
        self.session.no_zeroes = bool(cflags & p.FLAG_C_NO_ZEROES)
        for _ in range(MAX_OPTIONS):
            await ch.fill(p.OPTION.size)
            magic, option, length = ch.unpack(p.OPTION)
            if magic != p.IHAVEOPT:
                raise Dropped(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_DATA:
                if option == p.OPT_EXPORT_NAME or length > MAX_SKIPPED_OPTION:
                    raise Dropped(f"option {option} with {length} bytes of data")
                await ch.skip(length)
                await self.error(option, p.REP_ERR_TOO_BIG, "option data too long")
                continue
            data = await ch.read_exact(length)
            if not self.fixed and option != p.OPT_EXPORT_NAME:
                raise Dropped("only EXPORT_NAME is valid without fixed newstyle")
            try:
                done = await self.option(option, data)
            except _Invalid as exc:
                await self.error(option, exc.reply, str(exc))
                continue
            if done is not None:
                return self.session if done else None
        raise Dropped(f"more than {MAX_OPTIONS} options")

    @property
    def tls_required(self) -> bool:
        return self.tls_context is not None and not self.ch.tls

    async def option(self, option: int, data: bytes) -> bool | None:
        """Handle one option: True to enter transmission, False to end, None to go on."""
        if option == p.OPT_ABORT:
            try:
                await self.reply(option, p.REP_ACK)
            except Closed:
                pass
            return False
        if option == p.OPT_STARTTLS:
            await self.starttls(data)
            return None
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
            await self.ch.send([p.EXPORT_NAME_REPLY.pack(self.export.vbd.size, flags), zeros],
                               now=True)
            return True
        if option == p.OPT_LIST:
            if data:
                raise _Invalid(p.REP_ERR_INVALID, "LIST takes no data")
            name = self.export.name.encode()
            server = struct.pack(">I", len(name)) + name + self.export.description.encode()
            await self.reply(option, p.REP_ACK, before=[(p.REP_SERVER, server)])
            return None
        if option in (p.OPT_INFO, p.OPT_GO):
            await self.info(option, data)
            return True if option == p.OPT_GO else None
        if option == p.OPT_STRUCTURED_REPLY:
            if data:
                raise _Invalid(p.REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
            self.session.structured = True
            await self.reply(option, p.REP_ACK)
            return None
        if option in (p.OPT_LIST_META_CONTEXT, p.OPT_SET_META_CONTEXT):
            await self.meta_context(option, data)
            return None
        raise _Invalid(p.REP_ERR_UNSUP, f"option {option} is not supported")

    # ------------------------------------------------------------------ options
    @staticmethod
    def _decode(data: bytes) -> str:
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise _Invalid(p.REP_ERR_INVALID, "name is not UTF-8") from None

    async def starttls(self, data: bytes) -> None:
        if self.tls_context is None:
            raise _Invalid(p.REP_ERR_UNSUP, "TLS is not configured on this server")
        if self.ch.tls:
            raise _Invalid(p.REP_ERR_INVALID, "TLS is already active")
        if data:
            raise _Invalid(p.REP_ERR_INVALID, "STARTTLS takes no data")
        await self.reply(p.OPT_STARTTLS, p.REP_ACK)
        await self.ch.start_tls(self.tls_context)
        # Nothing negotiated in clear text survives the upgrade.
        self.session = Session(self.export, no_zeroes=self.session.no_zeroes)

    async def info(self, option: int, data: bytes) -> None:
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
        await self.reply(option, p.REP_ACK, before=[(p.REP_INFO, info) for info in infos])

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

    async def meta_context(self, option: int, data: bytes) -> None:
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
        await self.reply(option, p.REP_ACK, before=[
            (p.REP_META_CONTEXT, struct.pack(">I", ctx_id) + ctx.encode())
            for ctx_id, ctx in contexts])


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
