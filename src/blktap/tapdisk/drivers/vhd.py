"""``vhd``: one VHD layer (fixed, dynamic or differencing) over the image library.

The library (:class:`~blktap.image.vhd.VhdImage`) is synchronous and not thread-safe, so
each image has one lock, held for what touches its metadata: finding where sectors live
(BAT and bitmaps, read from memory once cached), allocating blocks and updating
bitmaps/BAT (the library's crash-safe ordering, run in the engine), flush and close.
Reads of sectors the layer holds, and writes to sectors it already holds, move their
data outside the lock, concurrently. The parent is another ``vhd`` driver, or an
``aio`` driver for a raw parent; sectors the layer does not hold are forwarded to it.

Encrypted layers (docs/encryption.md): a layer given a cipher decrypts the sectors it
holds in the caller's buffers once they are read, and encrypts what it writes into a
buffer of its own first (the caller's buffer belongs to the client and is never changed).
Sectors forwarded to the parent are the parent's business: each layer decrypts its own
with its own cipher (a raw parent is read as stored), and a sector no layer holds reads as
plain zeros, never as the decryption of zeros. So zeroing a held sector stores the
encryption of zeros, and zeroing an unheld sector over a parent that reads as zeros
leaves it unheld, as for a clear layer. The IV is the virtual sector, whichever layer
stores it. The clear path is untouched: every encryption branch hangs off ``cipher``.
"""

from __future__ import annotations

import array
import asyncio
import threading
from collections.abc import Awaitable, Iterator, Sequence

from blktap.image.crypto import XtsCipher
from blktap.image.fileio import ZEROS, is_regular
from blktap.image.vhd import structs as s
from blktap.image.vhd.image import VhdImage
from blktap.io import syscalls
from blktap.io.engine import Engine
from blktap.io.iov import copy_into, slice_iov, total
from blktap.tapdisk.driver import (
    SECTOR,
    STATE_DATA,
    Caps,
    Driver,
    Extents,
    InlineChain,
    InlineTarget,
    OpenContext,
    Tally,
    inline_file,
    merge_extents,
)

Run = tuple[int, int, int | None]  # first sector, sector count, file offset or None

SKIP_UNKNOWN = 0xFFFF  # _skip_depth: not worked out yet for this block
# Metadata for requests spanning more blocks than this is looked up in the engine.
INLINE_BLOCKS = 64
# Encrypting or decrypting up to this many sectors runs on the loop (about 6 us a sector);
# more goes to a worker thread, so that one large request does not stall the others.
INLINE_CRYPT_SECTORS = 16


def _aligned(iov: Sequence[memoryview]) -> bool:
    return all(len(v) % SECTOR == 0 for v in iov)


def decrypt_iov(cipher: XtsCipher, sector: int, iov: Sequence[memoryview]) -> None:
    """Decrypt whole sectors in place in ``iov``, starting at virtual sector ``sector``."""
    if _aligned(iov):
        for v in iov:
            cipher.decrypt_in_place(sector, v)
            sector += len(v) // SECTOR
        return
    # A sector split across buffers: gather, decrypt, scatter back.
    buf = bytearray(b"".join(iov))
    cipher.decrypt_in_place(sector, buf)
    copy_into(iov, memoryview(buf))


def decrypt_runs(cipher: XtsCipher, runs: Sequence[tuple[int, Sequence[memoryview]]]) -> None:
    for sector, iov in runs:
        decrypt_iov(cipher, sector, iov)


def encrypt_iov(cipher: XtsCipher, sector: int, iov: Sequence[memoryview]) -> memoryview:
    """A new buffer holding ``iov`` encrypted from virtual sector ``sector``."""
    if not _aligned(iov):
        buf = bytearray(b"".join(iov))
        cipher.encrypt_into(sector, buf, buf)
        return memoryview(buf)
    out = memoryview(bytearray(total(iov)))
    pos = 0
    for v in iov:
        n = len(v)
        cipher.encrypt_into(sector, v, out[pos : pos + n])
        sector += n // SECTOR
        pos += n
    return out


async def gather_all(aws: list[Awaitable[None]]) -> None:
    """Wait for every operation (their buffers stay in use until then), then raise the
    first error."""
    if len(aws) == 1:
        await aws[0]
        return
    results = await asyncio.gather(*aws, return_exceptions=True)
    for res in results:
        if isinstance(res, BaseException):
            raise res


class SkipCounter:
    """Hits and failures of the reads that skipped the same number of layers."""

    __slots__ = ("hits", "fail")

    def __init__(self) -> None:
        self.hits = [0, 0]
        self.fail = [0, 0]


def _whole_sectors(iov: Sequence[memoryview]) -> Iterator[memoryview | bytes]:
    """The request's data in pieces of whole sectors, as the image writes them. A guest
    may split a request's data at any byte (virtio only asks the total to be whole
    sectors): buffers that end mid-sector are joined with their neighbours up to the next
    sector boundary (a copy of those few buffers only; whole-sector buffers go as they
    are)."""
    pending: list[memoryview] = []
    held = 0
    for view in iov:
        if not pending and len(view) % SECTOR == 0:
            yield view
            continue
        pending.append(view)
        held += len(view)
        if held % SECTOR == 0:
            yield b"".join(pending)
            pending, held = [], 0
    if pending:  # the VBD hands drivers whole sectors only: never left over
        yield b"".join(pending)


class VhdDriver(Driver):
    name = "vhd"
    type_id = 4
    accepts_key = True

    @classmethod
    def open_layer(cls, ctx: OpenContext, args: str) -> Driver:
        """The image and every parent its locators name (the library's chain checks)."""
        from blktap.tapdisk.drivers.images import open_image_chain
        return open_image_chain(ctx, "vhd", args)

    def __init__(self, engine: Engine, image: VhdImage, parent: Driver | None,
                 cipher: XtsCipher | None = None) -> None:
        super().__init__(engine, image.size, writable=image.writable, parent=parent)
        self.image = image
        # The layer's own data is encrypted with this (None: stored as it reads).
        self.cipher = cipher
        self.path = image.path
        self.fd = image.fd
        self.lock = threading.Lock()
        self.regular = is_regular(image.fd)
        # The image's geometry, fixed while it is open (properties there; read per request).
        self._fixed = image.is_fixed
        self._spb = image.spb
        self._bitmap_secs = 0 if image.is_fixed else image.bitmap_secs
        # Per block of this layer: how many empty VHD layers below a read may skip
        # (built on first use, see _skip_depth).
        self._skip_cache: array.array | None = None
        self._below: list[VhdDriver] = []
        self._below_min_size: list[int] = []
        self._skip_counters: dict[int, SkipCounter] = {}
        self._inline: InlineTarget | None = None  # inline_target, once learnt
        self._inline_chain: InlineChain | None = None  # the layers it reads below
        self.caps = Caps.BLOCK_STATUS | Caps.FLUSH
        if image.writable:
            self.caps |= Caps.WRITE | Caps.FUA | Caps.ZERO | Caps.FAST_ZERO
            if self.regular:
                self.caps |= Caps.TRIM

    # ------------------------------------------------------------------ metadata
    def _cheap(self, sector: int, count: int) -> bool:
        """Every block touched is unallocated, full (the batmap says so) or has its
        bitmap in memory: finding the runs reads nothing from disk."""
        img = self.image
        spb = self._spb
        first, last = sector // spb, (sector + count - 1) // spb
        if last - first > INLINE_BLOCKS:
            return False
        bat = img.bat
        for blk in range(first, last + 1):
            if (blk < len(bat) and bat[blk] != s.BAT_ENTRY_UNUSED
                    and not img.block_full(blk) and not img.bitmap_cached(blk)):
                return False
        return True

    def _holds_none(self, sector: int, count: int) -> bool:
        """No block of the range is allocated here: every sector comes from below.
        The BAT is read without the lock: only a writable leaf's entries change, from
        unused to allocated, and a read racing a write to the same sectors may see
        either content."""
        if self._fixed:
            return False
        spb = self._spb
        first, last = sector // spb, (sector + count - 1) // spb
        bat = self.image.bat
        if first == last:
            return first >= len(bat) or bat[first] == s.BAT_ENTRY_UNUSED
        if last - first > INLINE_BLOCKS:
            return False
        unused = s.BAT_ENTRY_UNUSED
        for blk in range(first, min(last + 1, len(bat))):
            if bat[blk] != unused:
                return False
        return True

    def _runs_locked(self, sector: int, count: int) -> list[Run]:
        with self.lock:
            return list(self.image.extents(sector, count))

    def _runs_now(self, sector: int, count: int) -> list[Run] | None:
        """The runs, if the metadata to find them is in memory and not being changed
        (the lock is free); else None."""
        if self._fixed:
            return [(sector, count, sector * SECTOR)]
        if not self.lock.acquire(blocking=False):
            return None
        try:
            img = self.image
            blk, off = divmod(sector, self._spb)
            if off + count <= self._spb:
                # Within one block, the common case: no generators.
                bat = img.bat
                entry = bat[blk] if blk < len(bat) else s.BAT_ENTRY_UNUSED
                if entry == s.BAT_ENTRY_UNUSED:
                    return [(sector, count, None)]
                if img.block_full(blk):
                    return [(sector, count, (entry + self._bitmap_secs + off) * SECTOR)]
                if not img.bitmap_cached(blk):
                    return None
            elif not self._cheap(sector, count):
                return None
            return list(img.extents(sector, count))
        finally:
            self.lock.release()

    async def _runs(self, sector: int, count: int) -> list[Run]:
        runs = self._runs_now(sector, count)
        if runs is not None:
            return runs
        return await self.engine.call(self._runs_locked, sector, count)

    # ------------------------------------------------------------------ reads
    async def read(self, offset: int, iov: Sequence[memoryview]) -> None:
        sector = offset // SECTOR
        count = total(iov) // SECTOR
        if count and self._holds_none(sector, count):
            await self._read_below(offset, iov, sector, count)
            return
        runs = await self._runs(sector, count)
        if len(runs) == 1 and runs[0][2] is not None:
            await self.engine.preadv(self.fd, iov, runs[0][2])
            if self.cipher is not None:
                await self._decrypt([(sector, iov)], runs[0][1])
            return
        ops: list[Awaitable[None]] = []
        held: list[tuple[int, Sequence[memoryview]]] = []
        held_sectors = 0
        for first, n, file_off in runs:
            sub = slice_iov(iov, (first - sector) * SECTOR, n * SECTOR)
            if file_off is None:
                ops.append(self.forward_read(first * SECTOR, sub))
            else:
                ops.append(self.engine.preadv(self.fd, sub, file_off))
                held.append((first, sub))
                held_sectors += n
        await gather_all(ops)
        if self.cipher is not None and held:
            await self._decrypt(held, held_sectors)

    def read_now(self, offset: int, iov: Sequence[memoryview], tally: Tally) -> bool:
        length = len(iov[0]) if len(iov) == 1 else total(iov)
        sector = offset // SECTOR
        count = length // SECTOR
        if count and self._holds_none(sector, count):
            depth = self._skippable(sector, count)
            if not depth:
                return self.forward_read_now(offset, iov, tally)
            if not self._below[depth - 1].forward_read_now(offset, iov, tally):
                return False
            tally.append((self._skip_counter(depth), count))
            return True
        runs = self._runs_now(sector, count)
        if runs is None:
            return False
        held: list[tuple[int, Sequence[memoryview]]] = []
        if self.cipher is not None:
            held_sectors = sum(n for _, n, off in runs if off is not None)
            if held_sectors > INLINE_CRYPT_SECTORS:
                return False
        if len(runs) == 1:
            first, n, file_off = runs[0]
            if file_off is None:
                return self.forward_read_now(offset, iov, tally)
            if not self.engine.try_preadv(self.fd, iov, file_off):
                return False
            held.append((sector, iov))
        else:
            for first, n, file_off in runs:
                sub = slice_iov(iov, (first - sector) * SECTOR, n * SECTOR)
                if file_off is None:
                    if not self.forward_read_now(first * SECTOR, sub, tally):
                        return False
                elif self.engine.try_preadv(self.fd, sub, file_off):
                    held.append((first, sub))
                else:
                    return False
        if self.cipher is not None and held:
            decrypt_runs(self.cipher, held)
        return True

    def _vhd_below(self) -> list[VhdDriver]:
        """The VHD layers under this one, nearest first (fixed while open), with the
        smallest size among the first k of them (built once; see _skippable)."""
        if self._skip_cache is None:
            below: list[VhdDriver] = []
            d = self.parent
            while isinstance(d, VhdDriver) and len(below) < SKIP_UNKNOWN - 1:
                below.append(d)
                d = d.parent
            self._below = below
            smallest = self.size
            for d in below:
                smallest = min(smallest, d.size)
                self._below_min_size.append(smallest)
            self._skip_cache = array.array("H", [SKIP_UNKNOWN]) * len(self.image.bat)
        return self._below

    def _skip_depth(self, blk: int) -> int:
        """How many VHD layers right below this one hold nothing of block ``blk``'s
        range. They are read-only parents, so the answer is worked out once per block and
        kept (2 bytes per block of the disk)."""
        n = self._skip_cache[blk]  # type: ignore[index]
        if n == SKIP_UNKNOWN:
            spb = self._spb
            n = 0
            for d in self._below:
                if not d._holds_none(blk * spb, spb):
                    break
                n += 1
            self._skip_cache[blk] = n  # type: ignore[index]
        return n

    def _skippable(self, sector: int, count: int) -> int:
        """How many layers right below this one hold nothing of the range and reach past
        its end: a lookup per block of the range, whatever the depth of the chain."""
        below = self._vhd_below()
        end = (sector + count) * SECTOR
        spb = self._spb
        first, last = sector // spb, (sector + count - 1) // spb
        if last < len(self.image.bat) and last - first <= INLINE_BLOCKS:
            n = (self._skip_depth(first) if first == last
                 else min(self._skip_depth(b) for b in range(first, last + 1)))
            if n == 0 or end <= self._below_min_size[n - 1]:
                return n
        n = 0
        for d in below:
            if d.size < end or not d._holds_none(sector, count):
                break
            n += 1
        return n

    def _skip_counter(self, depth: int) -> SkipCounter:
        """Where the hits of reads that skip ``depth`` layers are kept until stats."""
        counter = self._skip_counters.get(depth)
        if counter is None:
            counter = self._skip_counters[depth] = SkipCounter()
        return counter

    def settle_hits(self) -> None:
        """Add the hits and failures of the reads that skipped layers to those layers:
        one counter per skip depth on the data path, the layers' own counters on demand
        (stats), so that a read through 29 empty layers costs what one through none
        does. So for the reads the compiled inline path served from a layer below: each
        layer down to it was asked for them."""
        if self._inline_chain is not None:
            self._inline_chain.settle()
        for depth, counter in self._skip_counters.items():
            hits, fail = counter.hits[0], counter.fail[0]
            if hits or fail:
                counter.hits[0] = counter.fail[0] = 0
                for d in self._below[:depth]:
                    d.hits[0] += hits
                    d.fail[0] += fail

    async def _read_below(self, offset: int, iov: Sequence[memoryview], sector: int,
                          count: int) -> None:
        """A read this layer holds nothing of goes straight to the first layer below
        that may hold some of it: the empty layers of a deep chain (snapshots nobody
        wrote to) cost a lookup, not a forwarded request each. Their hit counters move
        as if the request had passed through them (see settle_hits)."""
        depth = self._skippable(sector, count)
        if not depth:
            await self.forward_read(offset, iov)
            return
        counter = self._skip_counter(depth)
        counter.hits[0] += count
        try:
            await self._below[depth - 1].forward_read(offset, iov)
        except BaseException:
            counter.fail[0] += count
            raise

    async def _decrypt(self, runs: Sequence[tuple[int, Sequence[memoryview]]],
                       sectors: int) -> None:
        """Decrypt the runs this layer holds, in place (forwarded runs are decrypted, or
        not, by the layer that holds them)."""
        assert self.cipher is not None
        if sectors <= INLINE_CRYPT_SECTORS:
            decrypt_runs(self.cipher, runs)
        else:
            await self.engine.call(decrypt_runs, self.cipher, runs)

    async def _encrypt(self, sector: int, iov: Sequence[memoryview]) -> list[memoryview]:
        """``iov`` encrypted into a new buffer (the caller's stays as it is)."""
        assert self.cipher is not None
        if total(iov) // SECTOR <= INLINE_CRYPT_SECTORS:
            return [encrypt_iov(self.cipher, sector, iov)]
        return [await self.engine.call(encrypt_iov, self.cipher, sector, iov)]

    # ------------------------------------------------------------------ writes
    def _write_locked(self, sector: int, iov: Sequence[memoryview]) -> None:
        with self.lock:
            self._write_pieces(sector, iov)

    async def write(self, offset: int, iov: Sequence[memoryview], *, fua: bool = False) -> None:
        self._require_writable()
        sector = offset // SECTOR
        if self.cipher is not None:
            iov = await self._encrypt(sector, iov)
        runs = await self._runs(sector, total(iov) // SECTOR)
        if all(file_off is not None for _, _, file_off in runs):
            # Every sector is already held: data only, no metadata changes.
            await gather_all([
                self.engine.pwritev(self.fd, slice_iov(iov, (first - sector) * SECTOR,
                                                       n * SECTOR), file_off, dsync=fua)
                for first, n, file_off in runs if file_off is not None])
            return
        await self.engine.call(self._write_locked, sector, iov)
        if fua:
            await self.flush()

    def _fill_locked(self, sector: int, iov: Sequence[memoryview]) -> int:
        with self.lock:
            written = 0
            for first, n, file_off in list(self.image.extents(sector, total(iov) // SECTOR)):
                if file_off is not None:
                    continue  # written meanwhile (a guest's write): it stays
                sub = slice_iov(iov, (first - sector) * SECTOR, n * SECTOR)
                self._write_pieces(first, sub)
                written += n
            return written

    def _write_pieces(self, sector: int, iov: Sequence[memoryview]) -> None:
        """Through the image (which allocates); the caller holds the lock."""
        for piece in _whole_sectors(iov):
            self.image.write(sector, piece)
            sector += len(piece) // SECTOR

    async def fill(self, offset: int, iov: Sequence[memoryview]) -> int:
        """Write ``iov`` at ``offset`` only where this layer holds nothing yet (a read
        cache filling the leaf with what its parents returned); sectors written meanwhile
        are left as they are: the check and the write are one step under the lock, and a
        write to sectors the layer does not hold takes that lock too. Returns the
        sectors written."""
        self._require_writable()
        sector = offset // SECTOR
        if self.cipher is not None:
            iov = await self._encrypt(sector, iov)
        return await self.engine.call(self._fill_locked, sector, iov)

    def inline_target(self) -> InlineTarget | None:
        # Unencrypted, in a regular file the kernel serves without waiting. A fixed VHD is
        # a raw disk with a footer after it; a dynamic one is served through its BAT, only
        # in blocks the batmap says are full (it only gains bits, each set after the block's
        # data and BAT entry: VhdImage._note_full), so no sector of them is a parent's.
        # Its blocks with no BAT entry are its parents' (the layers below, read-only, each
        # answering for itself: InlineChain), or zeros under the last. A chain with a
        # layer that cannot be served so (a filter, an encrypted or remote layer) serves
        # only this layer's full blocks. Learnt once: the BATs and batmaps are the same
        # objects while open, and a valid batmap stays valid.
        if self._inline is not None:
            return self._inline
        own = self.inline_layer()
        if own is None or own.bat is None:  # none, or a fixed VHD (all its own)
            self._inline = own
            return own
        self._inline, self._inline_chain = InlineChain.over(self, own)
        return self._inline

    def inline_layer(self) -> InlineTarget | None:
        if self.cipher is not None or not self.regular:
            return None
        if self._fixed:
            return inline_file(self.engine, self.fd, self.size, self.writable)
        img = self.image
        if img.batmap is None or not img.batmap_valid:
            return None
        return inline_file(self.engine, self.fd, self.size, self.writable, bat=img.bat,
                           batmap=img.batmap, block_bytes=self._spb * SECTOR,
                           data_secs=self._bitmap_secs)

    def write_now(self, offset: int, iov: Sequence[memoryview], *, fua: bool = False) -> bool:
        """Sectors the layer holds already, in one run of the file, in memory: no metadata
        changes, so the data is written at once with one system call. Anything that
        allocates, or spans runs (which could not be written all or nothing), takes the
        slow path."""
        if not self.writable:
            return False
        sector = offset // SECTOR
        count = total(iov) // SECTOR
        if self.cipher is not None and count > INLINE_CRYPT_SECTORS:
            return False
        runs = self._runs_now(sector, count)
        if runs is None or len(runs) != 1 or runs[0][2] is None:
            return False
        if self.cipher is not None:
            iov = [encrypt_iov(self.cipher, sector, iov)]
        return self.engine.try_pwritev(self.fd, iov, runs[0][2], dsync=fua)

    def _write_zeros_locked(self, sector: int, count: int) -> None:
        with self.lock:
            step = len(ZEROS) // SECTOR
            while count:
                n = min(step, count)
                self.image.write(sector, ZEROS[: n * SECTOR])
                sector += n
                count -= n

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = True,
                           fast: bool = False, fua: bool = False) -> None:
        self._require_writable()
        sector = offset // SECTOR
        runs = await self._runs(sector, length // SECTOR)
        # Plan first, so that a fast request that cannot be fast changes nothing.
        plan: list[tuple[str, int, int, int | None]] = []
        for first, n, file_off in runs:
            if file_off is not None and self.cipher is not None:
                # A held sector of zeros in the file would decrypt to noise.
                plan.append(("encrypt", first, n, file_off))
            elif file_off is not None:
                plan.append(("punch" if may_trim and self.regular else "zero", first, n,
                             file_off))
            elif may_trim and (self.parent is None or
                               await self.parent.reads_as_zeros(first * SECTOR, n * SECTOR)):
                continue  # not held here, and what is below reads as zeros already
            else:
                plan.append(("allocate", first, n, None))
        if fast and any(kind != "punch" for kind, *_ in plan):
            raise self._slow_zeroing()
        for kind, first, n, file_off in plan:
            if kind in ("encrypt", "allocate") and self.cipher is not None:
                await self._write_encrypted_zeros(first, n, file_off)
            elif kind == "allocate":
                await self.engine.call(self._write_zeros_locked, first, n)
            else:
                assert file_off is not None
                await self._zero_file(self.fd, file_off, n * SECTOR, punch=kind == "punch",
                                      fast=fast)
        if fua:
            await self.flush()

    async def _write_encrypted_zeros(self, sector: int, count: int,
                                     file_off: int | None) -> None:
        """Store the encryption of zeros over ``count`` sectors: at ``file_off`` when the
        layer holds them already, else through the image (which allocates)."""
        step = len(ZEROS) // SECTOR  # one encrypted megabyte per write
        while count:
            n = min(step, count)
            data = await self._encrypt(sector, [ZEROS[: n * SECTOR]])
            if file_off is None:
                await self.engine.call(self._write_locked, sector, data)
            else:
                await self.engine.pwritev(self.fd, data, file_off)
                file_off += n * SECTOR
            sector += n
            count -= n

    async def discard(self, offset: int, length: int) -> None:
        """Punch the held parts of the range out of the file (they read as zeros after);
        the metadata is left alone, so the image stays valid at every instant."""
        self._require_writable()
        if not self.regular:
            return
        runs = await self._runs(offset // SECTOR, length // SECTOR)
        for _, n, file_off in runs:
            if file_off is None:
                continue
            try:
                await self.engine.call(syscalls.punch_hole, self.fd, file_off, n * SECTOR)
            except OSError as exc:
                if not syscalls.unsupported(exc):
                    raise
                return

    def _flush_locked(self) -> None:
        with self.lock:
            self.image.flush()

    async def flush(self) -> None:
        if self.writable:
            await self.engine.call(self._flush_locked)

    # ------------------------------------------------------------------ status
    async def block_status(self, offset: int, length: int) -> Extents:
        sector = offset // SECTOR
        runs = await self._runs(sector, length // SECTOR)
        out: Extents = []
        for first, n, file_off in runs:
            if file_off is not None:
                out.append((n * SECTOR, STATE_DATA))
                continue
            below = await self.forward_block_status(first * SECTOR, n * SECTOR)
            out.extend(below)
            if sum(m for m, _ in below) < n * SECTOR:
                break  # the parent answered short: stop there
        return merge_extents(out)

    def status_now(self, offset: int, length: int) -> Extents | None:
        sector = offset // SECTOR
        count = length // SECTOR
        if self._fixed:
            return [(length, STATE_DATA)]
        # The common case first, cheap: inside one block that the batmap says is full
        # (read without the lock, as _holds_none reads the BAT: bits only get set).
        blk, off = divmod(sector, self._spb)
        if off + count <= self._spb:
            bat = self.image.bat
            if blk < len(bat) and bat[blk] != s.BAT_ENTRY_UNUSED and \
                    self.image.block_full(blk):
                return [(length, STATE_DATA)]
        if count and self._holds_none(sector, count):
            # As reads do: straight to the first layer below that may hold some of it
            # (the NBD server asks this before every read: through 29 empty layers it
            # cost more than the read itself).
            depth = self._skippable(sector, count)
            if not depth:
                return self.forward_status_now(offset, length)
            return self._below[depth - 1].forward_status_now(offset, length)
        runs = self._runs_now(sector, count)
        if runs is None:
            return None
        if len(runs) == 1 and runs[0][2] is not None:
            return [(length, STATE_DATA)]
        out: Extents = []
        for first, n, file_off in runs:
            if file_off is not None:
                out.append((n * SECTOR, STATE_DATA))
                continue
            below = self.forward_status_now(first * SECTOR, n * SECTOR)
            if below is None:
                return None
            out.extend(below)
        return out

    def _close_locked(self) -> None:
        with self.lock:
            self.image.close()

    async def close(self) -> None:
        self.engine.forget(self.fd)
        await self.engine.call(self._close_locked)

    def describe(self) -> dict:
        return {"type": self.type_id, "name": self.name, "status": None}
