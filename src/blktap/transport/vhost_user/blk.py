"""virtio-blk over a VBD: the device's features, its config space, its requests.

A request is a descriptor chain: a 16-byte header (device-readable), data (readable for
OUT, DISCARD and WRITE_ZEROES, writable for IN and GET_ID) and a status byte, the last
byte of the chain, device-writable. The data buffers become memoryviews straight into
guest memory and go to the VBD as they are: the disk reads into and writes from the
guest's pages, no copies. What the VBD's side door can serve at once completes before
the next chain is looked at; other reads and writes go to the VBD the callback way
(kicked at the end of the queue's pass, completed from the VBD's callback); the rest
(flush, discard, write zeroes) runs in a task the queue owns.

Errors: a chain whose status byte is not a device-writable byte of guest memory cannot be
answered, so the device is broken (:class:`~.virtqueue.BadRing`); anything else wrong
with a request (buffers outside memory or in the wrong direction, a short header, data
not in whole sectors, too much of it, sectors past the end, a write to a read-only disk,
an I/O error) is VIRTIO_BLK_S_IOERR for that request, an unknown type UNSUPP.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass

from blktap.errors import BlktapError
from blktap.io.iov import advance, total
from blktap.tapdisk.driver import Caps
from blktap.tapdisk.vbd import VBD, Done
from blktap.transport.vhost_user import virtio as v
from blktap.transport.vhost_user.memory import BadAddress
from blktap.transport.vhost_user.virtqueue import BadRing, Descriptor, Virtqueue

log = logging.getLogger("blktap.vhost")

# Limits offered in the config space.
SEG_MAX = 126  # data buffers per request (qsd's; a chain of 128 fits a 128-entry ring)
SIZE_MAX = 1 << 20  # bytes per buffer (Linux merges contiguous pages up to this)
MAX_REQUEST = SEG_MAX * SIZE_MAX
MAX_DISCARD_SECTORS = 1 << 21  # 1 GiB per range
MAX_WRITE_ZEROES_SECTORS = 1 << 21
MAX_DISCARD_SEG = 16  # ranges per DISCARD request
MAX_WRITE_ZEROES_SEG = 1
# One log line per this many seconds for a guest's bad requests.
LOG_INTERVAL = 10.0


class BadRequest(Exception):
    """This request is wrong (IOERR); the device goes on."""


@dataclass
class BlkOptions:
    num_queues: int = 1
    serial: str = ""
    read_only: bool = False


def default_serial(image: str) -> str:
    """The GET_ID answer when none is given: the image's file name, which the guest
    shows in /dev/disk/by-id (virtio-blk allows 20 bytes)."""
    path = image.split(":", 1)[1] if ":" in image and not image.startswith("/") else image
    return os.path.basename(path.rstrip("/"))[: v.ID_BYTES]


class BlkDevice:
    """The virtio-blk function of one vhost-user front-end's device, over a VBD."""

    def __init__(self, vbd: VBD, options: BlkOptions) -> None:
        self.vbd = vbd
        self.options = options
        self.read_only = options.read_only or vbd.read_only
        caps = vbd.caps
        self.has_flush = bool(caps & Caps.FLUSH)
        self.writeback = self.has_flush  # a write cache the guest must flush
        self.serial = options.serial.encode()[: v.ID_BYTES].ljust(v.ID_BYTES, b"\0")
        self.errors = 0
        self._last_log = 0.0

    # ------------------------------------------------------------------ negotiation
    def features(self) -> int:
        bits = [v.F_VERSION_1, v.F_RING_INDIRECT_DESC, v.F_RING_EVENT_IDX,
                v.BLK_F_SIZE_MAX, v.BLK_F_SEG_MAX, v.BLK_F_BLK_SIZE, v.BLK_F_TOPOLOGY,
                v.BLK_F_MQ]
        if self.has_flush:
            bits += [v.BLK_F_FLUSH, v.BLK_F_CONFIG_WCE]
        if self.read_only:
            bits.append(v.BLK_F_RO)
        else:
            bits += [v.BLK_F_DISCARD, v.BLK_F_WRITE_ZEROES]
        out = 0
        for b in bits:
            out |= 1 << b
        return out

    def config(self) -> bytes:
        size = self.vbd.size
        return v.BLK_CONFIG.pack(
            size // v.SECTOR,  # capacity
            SIZE_MAX, SEG_MAX,
            0, 0, 0,  # geometry: none
            v.SECTOR,  # blk_size
            0, 0, 1, 0,  # topology: 512-byte physical blocks, no alignment, io sizes
            1 if self.writeback else 0, 0,
            self.options.num_queues,
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1,
            MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG, 1)

    def set_config(self, offset: int, data: bytes) -> None:
        """The guest may change the cache mode (writeback byte) and nothing else."""
        if offset != v.CONFIG_WRITEBACK_OFFSET or len(data) != 1 or data[0] > 1:
            raise BlktapError(f"config space write of {len(data)} bytes at {offset} "
                              "(only the writeback byte may change)", errno.EPERM)
        if data[0] and not self.has_flush:
            raise BlktapError("no write cache to turn on", errno.EPERM)
        self.writeback = bool(data[0])
        log.info("%s: guest set the write cache to %s", self.vbd.name,
                 "write back" if self.writeback else "write through")

    # ------------------------------------------------------------------ requests
    def handle(self, vq: Virtqueue, head: int, chain: list[Descriptor]) -> None:
        """A chain the guest made available (the queue's ``on_chain``)."""
        mem = vq.memory
        addr, length, writable = chain[-1]
        if not writable or not length:
            raise BadRing(f"{vq.name}: request {head}: the last descriptor is not a "
                          "device-writable status byte")
        try:
            status = mem.gpa(addr + length - 1, 1)
        except BadAddress as exc:
            raise BadRing(f"{vq.name}: request {head}: status byte: {exc}") from None
        try:
            self._dispatch(vq, head, chain, status)
        except BadRequest as exc:
            self._complain(vq, head, str(exc))
            status[0] = v.S_IOERR
            vq.push(head, 1)

    def _dispatch(self, vq: Virtqueue, head: int, chain: list[Descriptor],
                  status: memoryview) -> None:
        mem = vq.memory
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        try:
            for addr, length, w in chain:
                if w:
                    mem.gpa_iov(addr, length, writable)
                elif writable:
                    raise BadRequest("a device-readable buffer after a writable one")
                else:
                    mem.gpa_iov(addr, length, readable)
        except BadAddress as exc:
            raise BadRequest(str(exc)) from None
        # The status byte is not data.
        last = writable[-1]
        if len(last) == 1:
            writable.pop()
        else:
            writable[-1] = last[:-1]
        # The header: usually a buffer of its own, but the layout is free.
        first = readable[0] if readable else None
        if first is not None and len(first) >= v.OUTHDR.size:
            kind, _, sector = v.OUTHDR.unpack_from(first)
            if len(first) == v.OUTHDR.size:
                out = readable[1:]
            else:
                out = [first[v.OUTHDR.size :], *readable[1:]]
        else:  # the header spread over several buffers: gather its 16 bytes only
            joined = _gather(readable, v.OUTHDR.size)
            if len(joined) < v.OUTHDR.size:
                raise BadRequest(f"a request header of {len(joined)} bytes")
            kind, _, sector = v.OUTHDR.unpack_from(joined)
            out = advance(readable, v.OUTHDR.size)
        vbd = self.vbd
        if out and kind in (v.T_IN, v.T_GET_ID):
            raise BadRequest("a read with device-readable data buffers")
        if kind == v.T_IN:
            length = total(writable)
            offset = self._range(sector, length)
            if len(writable) == 1:
                if vbd.read_now(offset, writable[0]):
                    status[0] = v.S_OK
                    vq.push(head, length + 1)
                    return
            elif vbd.readv_now(offset, writable, length):
                status[0] = v.S_OK
                vq.push(head, length + 1)
                return
            if not self._start(vq, offset, writable, length, False, False,
                               self._completion(vq, head, status, "read", offset, length,
                                                length + 1)):
                vq.spawn(self._read(vq, head, status, offset, writable, length))
        elif kind == v.T_OUT:
            if self.read_only:
                raise BadRequest("write to a read-only disk")
            if writable:
                raise BadRequest("a write with device-writable data buffers")
            length = total(out)
            offset = self._range(sector, length)
            fua = not self.writeback
            if len(out) == 1:
                if vbd.write_now(offset, out[0], fua=fua):
                    status[0] = v.S_OK
                    vq.push(head, 1)
                    return
            elif vbd.writev_now(offset, out, length, fua=fua):
                status[0] = v.S_OK
                vq.push(head, 1)
                return
            if not self._start(vq, offset, out, length, True, fua,
                               self._completion(vq, head, status, "write", offset, length,
                                                1)):
                vq.spawn(self._write(vq, head, status, offset, out, length, fua))
        elif kind == v.T_FLUSH:
            if not self.has_flush:
                self._finish(vq, head, status, v.S_UNSUPP, 1)
                return
            vq.spawn(self._flush(vq, head, status))
        elif kind == v.T_GET_ID:
            n = min(total(writable), v.ID_BYTES)
            pos = 0
            for view in writable:
                take = min(len(view), n - pos)
                view[:take] = self.serial[pos : pos + take]
                pos += take
                if pos >= n:
                    break
            self._finish(vq, head, status, v.S_OK, n + 1)
        elif kind in (v.T_DISCARD, v.T_WRITE_ZEROES):
            if self.read_only:
                self._finish(vq, head, status, v.S_UNSUPP, 1)
                return
            ranges = self._ranges(kind, out)
            if ranges is None:
                self._finish(vq, head, status, v.S_UNSUPP, 1)
                return
            vq.spawn(self._zero(vq, head, status, kind, ranges))
        else:
            self._finish(vq, head, status, v.S_UNSUPP, 1)

    def _range(self, sector: int, length: int) -> int:
        if length % v.SECTOR:
            raise BadRequest(f"{length} bytes of data: not whole sectors")
        if length > MAX_REQUEST:
            raise BadRequest(f"{length} bytes of data: more than {MAX_REQUEST}")
        offset = sector * v.SECTOR
        if offset + length > self.vbd.size:
            raise BadRequest(f"sectors {sector}+{length // v.SECTOR} past the end of the "
                             f"disk ({self.vbd.size // v.SECTOR} sectors)")
        return offset

    def _ranges(self, kind: int, out: list[memoryview]) -> list[tuple[int, int, bool]] | None:
        """The (offset, length, unmap) ranges of a DISCARD / WRITE_ZEROES; None when the
        request asks for something unsupported."""
        seg = v.DISCARD_SEGMENT.size
        size = total(out)
        if not size or size % seg:
            raise BadRequest(f"{size} bytes of discard/write-zeroes ranges")
        count = size // seg
        limit = MAX_DISCARD_SEG if kind == v.T_DISCARD else MAX_WRITE_ZEROES_SEG
        most = MAX_DISCARD_SECTORS if kind == v.T_DISCARD else MAX_WRITE_ZEROES_SECTORS
        if count > limit:
            raise BadRequest(f"{count} ranges, more than {limit}")
        data = _gather(out, size)  # small: checked above
        ranges = []
        for i in range(count):
            sector, nsect, flags = v.DISCARD_SEGMENT.unpack_from(data, i * seg)
            if flags & ~v.WRITE_ZEROES_F_UNMAP:
                return None  # reserved bits
            if kind == v.T_DISCARD and flags:
                return None  # the spec: UNMAP on a discard is unsupported
            if nsect > most:
                raise BadRequest(f"{nsect} sectors in one range, more than {most}")
            offset = sector * v.SECTOR
            length = nsect * v.SECTOR
            if offset + length > self.vbd.size:
                raise BadRequest(f"sectors {sector}+{nsect} past the end of the disk")
            ranges.append((offset, length, bool(flags & v.WRITE_ZEROES_F_UNMAP)))
        return ranges

    # ------------------------------------------------------------------ the callback way
    def _start(self, vq: Virtqueue, offset: int, iov: list[memoryview], length: int,
               write: bool, fua: bool, done: Done) -> bool:
        """A read or write to the VBD the callback way; False leaves it to a task (the
        VBD refused it at once: the task's way reports why)."""
        if not length:
            return False
        try:
            if write:
                self.vbd.start_write(offset, iov, length, done, fua=fua)
            else:
                self.vbd.start_read(offset, iov, length, done)
        except BlktapError:
            return False
        vq.untasked.begin()
        return True

    def _completion(self, vq: Virtqueue, head: int, status: memoryview, what: str,
                    offset: int, length: int, written: int) -> Done:
        """The ``done`` of a read or write started the callback way: the answer, with
        ``written`` bytes for the used ring when it succeeded."""
        def done(error: BaseException | None) -> None:
            try:
                if error is None:
                    self._finish(vq, head, status, v.S_OK, written)
                elif isinstance(error, Exception):
                    self._failed(vq, head, status, what, offset, length, error)
                else:  # cancelled (nothing here cancels: the VBD's own teardown)
                    self._finish(vq, head, status, v.S_IOERR, 1)
            finally:
                vq.untasked.end()
        return done

    # ------------------------------------------------------------------ the slow ways
    async def _read(self, vq: Virtqueue, head: int, status: memoryview, offset: int,
                    iov: list[memoryview], length: int) -> None:
        try:
            if len(iov) == 1:
                await self.vbd.read(offset, iov[0])
            else:
                await self.vbd.readv(offset, iov, length)
        except Exception as exc:
            self._failed(vq, head, status, "read", offset, length, exc)
            return
        self._finish(vq, head, status, v.S_OK, length + 1)

    async def _write(self, vq: Virtqueue, head: int, status: memoryview, offset: int,
                     iov: list[memoryview], length: int, fua: bool) -> None:
        try:
            if len(iov) == 1:
                await self.vbd.write(offset, iov[0], fua=fua)
            else:
                await self.vbd.writev(offset, iov, length, fua=fua)
        except Exception as exc:
            self._failed(vq, head, status, "write", offset, length, exc)
            return
        self._finish(vq, head, status, v.S_OK, 1)

    async def _flush(self, vq: Virtqueue, head: int, status: memoryview) -> None:
        try:
            await self.vbd.flush()
        except Exception as exc:
            self._failed(vq, head, status, "flush", 0, 0, exc)
            return
        self._finish(vq, head, status, v.S_OK, 1)

    async def _zero(self, vq: Virtqueue, head: int, status: memoryview, kind: int,
                    ranges: list[tuple[int, int, bool]]) -> None:
        what = "discard" if kind == v.T_DISCARD else "write zeroes"
        for offset, length, unmap in ranges:
            try:
                if kind == v.T_DISCARD:
                    await self.vbd.discard(offset, length)
                else:
                    await self.vbd.write_zeroes(offset, length, may_trim=unmap,
                                                fua=not self.writeback)
            except Exception as exc:
                self._failed(vq, head, status, what, offset, length, exc)
                return
        self._finish(vq, head, status, v.S_OK, 1)

    def _failed(self, vq: Virtqueue, head: int, status: memoryview, what: str, offset: int,
                length: int, exc: Exception) -> None:
        if not isinstance(exc, (OSError, BlktapError)):
            log.error("%s: %s failed", vq.name, what, exc_info=exc)
        code = getattr(exc, "errno", None)
        self._complain(vq, head, f"{what} of {length} bytes at {offset} failed: {exc}")
        self._finish(vq, head, status,
                     v.S_UNSUPP if code == errno.EOPNOTSUPP else v.S_IOERR, 1)

    def _finish(self, vq: Virtqueue, head: int, status: memoryview, code: int,
                written: int) -> None:
        status[0] = code
        vq.push(head, written)

    def _complain(self, vq: Virtqueue, head: int, message: str) -> None:
        """Log a failed request, at most one line per LOG_INTERVAL (a guest can fail
        requests faster than a log should grow)."""
        self.errors += 1
        now = time.monotonic()
        if now - self._last_log >= LOG_INTERVAL:
            self._last_log = now
            log.warning("%s: request %d: %s (%d failed requests so far)", vq.name, head,
                        message, self.errors)


def _gather(iov: list[memoryview], n: int) -> bytes:
    """The first ``n`` bytes of ``iov`` (fewer if it is shorter), copied."""
    parts = []
    for view in iov:
        if n <= 0:
            break
        parts.append(bytes(view[:n]))
        n -= len(parts[-1])
    return b"".join(parts)
