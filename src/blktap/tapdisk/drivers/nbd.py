"""``nbd``: a disk served by an NBD server, as the reference's block-nbd (an NBD client).

The path names the server (:mod:`blktap.nbdclient.address`): a UNIX socket path,
``host:port``, or an ``nbd://``, ``nbds://`` (TLS), ``nbd+unix://``, ``nbds+unix://`` URI
with an export name. What the driver can do follows what the server offers: flush, FUA,
trim, write zeroes (fast or not), cache, and block status when the server agrees to the
``base:allocation`` context. Requests larger than the server's maximum block are split.
Many requests share one connection; if it breaks they are held and sent again once the
driver has reconnected (:mod:`blktap.nbdclient.client`), failing with ETIMEDOUT only when
the VBD's per-request timeout (:meth:`NbdDriver.bound_requests`) has passed.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

from blktap.errors import NbdClientError, UsageError
from blktap.io.engine import Engine
from blktap.io.iov import slice_iov, total, zero_fill, zeros_iov
from blktap.nbdclient.address import parse
from blktap.nbdclient.client import DEFAULT_TIMEOUT, NbdClient, Request
from blktap.tapdisk.driver import (
    SECTOR,
    STATE_DATA,
    ZERO_CHUNK,
    Caps,
    Driver,
    Extents,
    OpenContext,
)
from blktap.transport.nbd import proto as p

# A trim, write-zeroes or block-status request covers at most this much (lengths are
# 32-bit on the wire).
MAX_RANGE = 1 << 30
_STATE_MASK = 3  # base:allocation: HOLE | ZERO, the driver's STATE_ values


class NbdDriver(Driver):
    name = "nbd"
    type_id = 15

    def __init__(self, engine: Engine, path: str, client: NbdClient, *,
                 writable: bool) -> None:
        super().__init__(engine, client.size, writable=writable)
        self.path = path
        self.client = client
        flags = client.flags
        self.max_block = max(SECTOR, client.session.max_block - client.session.max_block
                             % SECTOR)
        caps = Caps(0)
        if flags & p.FLAG_SEND_FLUSH:
            caps |= Caps.FLUSH
        if client.session.meta_id is not None:
            caps |= Caps.BLOCK_STATUS
        if flags & p.FLAG_SEND_CACHE:
            caps |= Caps.CACHE
        if writable:
            caps |= Caps.WRITE | Caps.FUA | Caps.ZERO
            if flags & p.FLAG_SEND_TRIM:
                caps |= Caps.TRIM
            if flags & p.FLAG_SEND_WRITE_ZEROES and flags & p.FLAG_SEND_FAST_ZERO:
                caps |= Caps.FAST_ZERO
        self.caps = caps

    @classmethod
    def open(cls, engine: Engine, path: str, *, writable: bool,
             timeout: float = DEFAULT_TIMEOUT) -> NbdDriver:
        """Connect and negotiate (blocking: call from the engine or before serving)."""
        address = parse(path)
        client = NbdClient.connect(address, engine, writable=writable, timeout=timeout)
        return cls(engine, path, client, writable=writable)

    @classmethod
    def open_layer(cls, ctx: OpenContext, args: str) -> NbdDriver:
        return cls.open(ctx.engine, args, writable=ctx.writable)

    def bound_requests(self, timeout: float) -> None:
        """The VBD's per-request timeout: how long a request may be held (reconnecting)
        or wait for its reply before it fails with ETIMEDOUT."""
        self.client.timeout = timeout

    # ------------------------------------------------------------------ helpers
    def _inside(self, offset: int, length: int) -> int:
        """How much of a request lies inside the export (the last sector of an export
        whose size is not a whole number of sectors is partial)."""
        return max(0, min(length, self.size - offset))

    async def _do(self, cmd: int, offset: int, length: int, flags: int = 0,
                  iov: Sequence[memoryview] | None = None,
                  bufs: Sequence[memoryview] = ()) -> Request:
        req = Request(cmd, flags, offset, length, iov)
        await self.client.request(req, bufs)
        return req

    # ------------------------------------------------------------------ operations
    async def read(self, offset: int, iov: Sequence[memoryview]) -> None:
        length = total(iov)
        inside = self._inside(offset, length)
        if inside < length:
            zero_fill(slice_iov(iov, inside, length - inside))
        pos = 0
        while pos < inside:
            n = min(self.max_block, inside - pos)
            part = iov if n == length else slice_iov(iov, pos, n)
            await self._do(p.CMD_READ, offset + pos, n, iov=part)
            pos += n

    async def write(self, offset: int, iov: Sequence[memoryview], *, fua: bool = False) -> None:
        self._require_writable()
        length = total(iov)
        inside = self._inside(offset, length)
        native_fua = fua and bool(self.client.flags & p.FLAG_SEND_FUA)
        pos = 0
        while pos < inside:
            n = min(self.max_block, inside - pos)
            part = iov if n == length else slice_iov(iov, pos, n)
            await self._do(p.CMD_WRITE, offset + pos, n,
                           p.CMD_FLAG_FUA if native_fua else 0, bufs=part)
            pos += n
        if fua and not native_fua:
            await self.flush()

    async def flush(self) -> None:
        if self.client.flags & p.FLAG_SEND_FLUSH:
            await self._do(p.CMD_FLUSH, 0, 0)

    async def discard(self, offset: int, length: int) -> None:
        self._require_writable()
        if not self.client.flags & p.FLAG_SEND_TRIM:
            return  # a hint the server cannot take
        await self._ranges(p.CMD_TRIM, offset, length, 0)

    async def _ranges(self, cmd: int, offset: int, length: int, flags: int) -> None:
        end = offset + self._inside(offset, length)
        while offset < end:
            n = min(MAX_RANGE, end - offset)
            await self._do(cmd, offset, n, flags)
            offset += n

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = True,
                           fast: bool = False, fua: bool = False) -> None:
        self._require_writable()
        flags = self.client.flags
        if flags & p.FLAG_SEND_WRITE_ZEROES:
            if fast and not flags & p.FLAG_SEND_FAST_ZERO:
                raise self._slow_zeroing()
            cmd_flags = (0 if may_trim else p.CMD_FLAG_NO_HOLE) \
                | (p.CMD_FLAG_FAST_ZERO if fast else 0) \
                | (p.CMD_FLAG_FUA if fua and flags & p.FLAG_SEND_FUA else 0)
            try:
                await self._ranges(p.CMD_WRITE_ZEROES, offset, length, cmd_flags)
            except NbdClientError as exc:
                if fast and exc.errno == errno.EOPNOTSUPP:
                    raise self._slow_zeroing() from None
                raise
            if fua and not flags & p.FLAG_SEND_FUA:
                await self.flush()
            return
        if fast:
            raise self._slow_zeroing()
        end = offset + self._inside(offset, length)
        while offset < end:
            n = min(ZERO_CHUNK, self.max_block, end - offset)
            await self.write(offset, zeros_iov(n))
            offset += n
        if fua:
            await self.flush()

    async def block_status(self, offset: int, length: int) -> Extents:
        inside = self._inside(offset, length)
        if self.client.session.meta_id is None or inside <= 0:
            return [(length, STATE_DATA)]
        req = await self._do(p.CMD_BLOCK_STATUS, offset, min(inside, MAX_RANGE))
        out: Extents = []
        left = min(inside, MAX_RANGE)
        for n, flags in req.extents:
            if n == 0 or left == 0:
                break
            n = min(n, left)
            out.append((n, flags & _STATE_MASK))
            left -= n
        if not out:
            raise NbdClientError(f"nbd {self.client.address}: block status at {offset} "
                                 f"answered with an empty extent", errno.EPROTO)
        return out

    async def cache(self, offset: int, length: int) -> None:
        if self.client.flags & p.FLAG_SEND_CACHE:
            await self._ranges(p.CMD_CACHE, offset, length, 0)

    async def close(self) -> None:
        await self.client.close()

    def describe(self) -> dict:
        client = self.client
        return {"type": self.type_id, "name": self.name, "status": None,
                "server": str(client.address), "connected": client.connected,
                "reconnects": client.reconnects, "last_error": client.last_error}


def open_on_nbd_parent(engine: Engine, spec: str, parent: str, *, writable: bool,
                       key: bytes | None = None) -> Driver:
    """``tap-ctl open -e MINOR``: the differencing VHD ``spec`` (``vhd:PATH``) whose
    parent is not the chain its locators name but what another tapdisk serves over NBD at
    ``parent`` (a socket path or any ``nbd`` driver path), read-only; as the reference
    stacks a leaf on another tapdisk's chain. Blocking."""
    from blktap.image.vhd.image import VhdImage
    from blktap.image.vhd.keyhash import cipher_for
    from blktap.tapdisk.drivers.vhd import VhdDriver

    kind, _, path = spec.partition(":")
    if kind != "vhd" or not path:
        raise UsageError(f"{spec}: -e stacks a VHD (vhd:PATH) on another tapdisk's disk",
                         errno.EINVAL)
    image = VhdImage.open(path, writable=writable)
    try:
        if not image.is_differencing:
            raise UsageError(f"{path} is not a differencing VHD: it has no parent to take "
                             f"from another tapdisk (-e)", errno.EINVAL)
        cipher = cipher_for(image, key)
        below = NbdDriver.open(engine, parent, writable=False)
    except BaseException:
        image.close()
        raise
    return VhdDriver(engine, image, below, cipher)


__all__ = ["NbdDriver", "open_on_nbd_parent"]
