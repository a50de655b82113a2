"""The driver protocol: what a layer of a tapdisk driver stack is asked to do.

A driver serves a byte range ``[0, size)`` in whole 512-byte sectors (the VBD aligns
requests before they get here). It answers from its own data or forwards to its
``parent`` (a differencing image's parent, a filter's inner driver); below the last
layer, the disk reads as zeros and its status is a hole that reads as zeros.

Every operation is a coroutine that completes whole or raises ``OSError`` /
:class:`~blktap.errors.BlktapError` carrying an errno; buffers are lists of memoryviews
(iovecs) that the driver fills or writes without copying. A driver declares what it can
do in ``caps``; the VBD and transports never ask for more.

``read_now`` / ``write_now`` are optional synchronous versions for what can complete
without waiting (files in memory, cached metadata): the VBD tries them first, and a
request they serve costs no task, future or turn of the event loop. They answer False
(having changed nothing) whenever the coroutine would have to wait.

Stacking (the reference's ``td_get_parent_id`` / ``td_validate_parent``): a driver
opened by :meth:`Driver.open_layer` may name the layer below it with
:meth:`Driver.parent_spec`; the stack opener (:mod:`blktap.tapdisk.drivers.stack`) opens
that ``type:args`` read-only through the same registry, attaches it as ``parent`` and
calls :meth:`Driver.validate_parent`. A :class:`Filter` is a driver without data of its
own whose parent is the layer it wraps (opened writable when the filter is): its size and
capabilities are its parent's, and everything it does not override is passed down.

This module is the implementation; the documented, versioned surface for drivers written
outside the package is :mod:`blktap.driver` (docs/drivers.md).
"""

from __future__ import annotations

import array
import enum
import errno
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

from blktap.errors import BlktapError, OutOfRange, UnsupportedImage
from blktap.image.parents import ParentPolicy
from blktap.io import syscalls
from blktap.io.engine import Completion, Engine
from blktap.io.iov import slice_iov, total, zero_fill, zeros_iov

# The version of the driver protocol (blktap.driver). A plugin states the one it was
# written for (``api_version``); a plugin written for another is refused.
API_VERSION = 1

SECTOR = 512
# Zeros written when the file system can neither punch nor zero a range: per system call.
ZERO_CHUNK = 8 << 20

# base:allocation flags (the NBD values; other transports translate).
STATE_DATA = 0
STATE_HOLE = 1
STATE_ZERO = 2

# One block-status answer: runs of (length in bytes, state flags), consecutive from the
# offset asked about.
Extents = list[tuple[int, int]]
# Sectors read from layers below by a read_now, counted once it is done: (whatever keeps
# the layer's count: the layer, or a vhd driver's counter for skipped layers, sectors).
Tally = list[tuple[Any, int]]


class Caps(enum.IntFlag):
    """What a driver can do."""

    WRITE = enum.auto()
    FLUSH = enum.auto()  # flush makes completed writes durable
    FUA = enum.auto()  # a write can be made durable on its own
    TRIM = enum.auto()  # discard frees space (a hint: content undefined after)
    ZERO = enum.auto()  # write_zeroes without moving zeros through memory
    FAST_ZERO = enum.auto()  # write_zeroes can tell at once when it would be slow
    BLOCK_STATUS = enum.auto()  # block_status says more than "all data"
    CACHE = enum.auto()  # cache (prefetch) does something useful


def merge_extents(extents: Extents) -> Extents:
    """Join neighbouring runs with the same flags."""
    out: Extents = []
    for length, flags in extents:
        if length <= 0:
            continue
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + length, flags)
        else:
            out.append((length, flags))
    return out


@runtime_checkable
class DirtyBitmap(Protocol):
    """A layer that tracks changed blocks (the ``log`` filter): transports export its
    bitmap by name (NBD's ``qemu:dirty-bitmap:NAME``)."""

    bitmap_name: str

    def runs(self, offset: int, length: int) -> Extents:
        """(length, 1 dirty / 0 clean) runs covering ``[offset, offset + length)``."""
        ...


@dataclass(frozen=True)
class OpenContext:
    """What a layer is opened with (the argument of :meth:`Driver.open_layer`)."""

    engine: Engine
    # Open for writing (a parent of a differencing layer is always opened read-only).
    writable: bool
    # O_DIRECT where it helps (tapdisk's ``-D`` turns it off).
    direct: bool = True
    # The key of an encrypted image (``tap-ctl open -E``): only drivers with
    # ``accepts_key`` get one; for the others it is refused before they are opened.
    key: bytes | None = None
    # The type was guessed from the file's content, not named (docs/security.md).
    probed: bool = False
    follow_probed_parents: bool = False
    # Where parents named by images may be opened from (None: the environment's).
    parent_policy: ParentPolicy | None = None


class InlineTarget(NamedTuple):
    """:meth:`Driver.inline_target`: the descriptor holding the disk's bytes, the disk's
    size, whether the file is in memory (reads and writes never wait; a short read is the
    end of the file) or in the page cache (reads only with RWF_NOWAIT; writes only of
    whole pages at page offsets in the file, without RWF_DSYNC, as the engine's
    ``try_pwritev``), and whether writes may be done inline (writable).

    Without a map every byte is at its own offset. With ``bat``, the bytes are in blocks
    of ``block_bytes`` (a dynamic VHD's): block ``b``'s data starts ``bat[b] +
    data_secs`` sectors into the file (an ``array('I')``; 0xffffffff: not allocated), and
    only blocks whose bit is set in ``batmap`` (most significant bit first) may be served
    there: wholly held, with no sector left to a parent. The driver must only ever set
    such a bit after the block's data and BAT entry (the compiled path reads them without
    the interpreter lock while engine threads allocate), and never clear one while
    serving.

    With ``l1``, the bytes are in clusters of ``2**cluster_bits`` (a qcow2 image's without
    extended L2 entries): ``l1`` is the L1 table (an ``array('Q')``, native order) and
    ``l2_tables`` the cache of L2 tables (a dict of such arrays by their offset in the
    file). Only plain data clusters are served there (reads), and only clusters the
    image owns alone (writes); a table not in the cache is the Python path's. A new
    cluster's entry must be stored after its data, and a cluster freed only after its
    entry changed and while holding ``guard``, which a transport holds for each pass.

    ``holes_zero``: what the map leaves unallocated reads as zeros (the disk has no
    parent), and may be served so; ``zero_flag``: so may a qcow2 cluster with the zero
    flag (version 3).

    ``below``: the layers under a VHD (each the target of one read-only layer, nearest
    first: a dynamic VHD's blocks, or a file at its own offsets), read where the layers
    above have no block allocated (a block allocated but not full is the Python path's);
    ``holes_zero`` then says what is under the last one. ``hits``: an ``array('Q')``, one
    per layer (the top first), to which the sectors each layer served to reads are added.

    The compiled path reads these fields by position (``_inline.TARGET_FIELDS``): add new
    ones at the end."""

    fd: int
    size: int
    memory: bool
    writes: bool
    bat: Any = None
    batmap: Any = None
    block_bytes: int = 0
    data_secs: int = 0
    l1: Any = None
    l2_tables: Any = None
    cluster_bits: int = 0
    l2_entries: int = 0
    guard: Any = None
    holes_zero: bool = False
    zero_flag: bool = False
    below: tuple = ()
    hits: Any = None


class AsyncTarget(NamedTuple):
    """:meth:`Driver.inline_async`: a disk a transport's compiled pass may issue plain
    reads and writes to itself, whose completions come back later through the driver
    (librbd's C calls, for an ``rbd`` disk). ``image`` is the library's handle (an
    address), ``size`` the disk's, ``writes`` whether writes may be issued, and ``ops``
    the addresses of the calls, in this order: ``rbd_aio_create_completion``,
    ``rbd_aio_read``, ``rbd_aio_write``, ``rbd_aio_release``. A completion the pass
    makes carries its own argument (never NULL), by which the reaper the driver was
    given with the target (:data:`Reaper`) tells it from the driver's own. ``eventfd`` is
    where librbd signals completions, and ``reap_calls`` the addresses of the calls that
    take them back, as the reaper is given them: a transport that answers that eventfd's
    readiness itself (a connection served in the selector's wait) reaps with them, and
    leaves the driver's own completions to the reaper.

    The compiled pass reads these fields by position: add new ones at the end."""

    image: int
    size: int
    writes: bool
    ops: tuple[int, ...]
    eventfd: int
    reap_calls: tuple[int, ...]


# What a transport gives with :meth:`Driver.inline_async`: the driver reaps its finished
# requests through it, ``reap(calls, image, eventfd)`` when librbd signals the eventfd
# (``calls``: the addresses of ``rbd_poll_io_events``, ``rbd_aio_get_arg``,
# ``rbd_aio_get_return_value``, ``rbd_aio_release``). It settles the completions the
# transport's passes made (an argument of their own) and returns ``(ours, strays)``: the
# ``(completion, return value)`` of the driver's (no argument), and how many had an
# argument that was nobody's.
Reaper = Callable[[tuple[int, ...], int, int], tuple[list[tuple[int, int]], int]]


def inline_file(engine: Engine, fd: int, size: int, writable: bool, **layout: Any
                ) -> InlineTarget | None:
    """The :class:`InlineTarget` of a file ``fd`` as ``engine`` would serve it inline (in
    memory: reads and writes; in the page cache: reads that find it, writes of whole
    pages), laid out as ``layout`` says (InlineTarget's map fields), or None when the
    engine never does I/O on it inline."""
    mode = engine.inline_mode(fd)
    if mode is None:
        return None
    return InlineTarget(fd, size, mode == "memory", writable, **layout)


class InlineChain:
    """The layers under a driver that the compiled inline path reads through (each
    answering :meth:`Driver.inline_layer`: a chain of VHDs and qcow2s over a raw file,
    say), and the hits it counts for them, folded into the layers' own ``hits`` by
    :meth:`settle` as the Python path counts them: a read served from the k-th layer
    below was asked of each layer down to it."""

    # The deepest chain the compiled path reads through (its MAX_LAYERS), and the qcow2
    # layers in it (MAX_QCOW2_LAYERS).
    MAX_LAYERS = 256
    MAX_QCOW2_LAYERS = 16

    def __init__(self, targets: tuple[InlineTarget, ...], layers: list[Driver]) -> None:
        self.targets = targets
        self.layers = layers
        self.hits = array.array("Q", bytes(8 * (len(layers) + 1)))
        self._seen = array.array("Q", self.hits)

    @classmethod
    def below(cls, driver: Driver) -> InlineChain | None:
        """The chain under ``driver`` (None when one of its layers cannot be read inline,
        or it is deeper than the compiled path goes)."""
        targets: list[InlineTarget] = []
        layers: list[Driver] = []
        qcow2 = 0
        d = driver.parent
        while d is not None:
            t = d.inline_layer()
            if t is None or len(layers) >= cls.MAX_LAYERS - 1:
                return None
            if t.l1 is not None:
                qcow2 += 1
                if qcow2 >= cls.MAX_QCOW2_LAYERS:  # (one more for a qcow2 on top)
                    return None
            targets.append(t._replace(writes=False))
            layers.append(d)
            if t.bat is None and t.l1 is None:
                break  # a file holding every byte: nothing under it is read
            d = d.parent
        return cls(tuple(targets), layers)

    @classmethod
    def over(cls, driver: Driver, own: InlineTarget) -> tuple[InlineTarget, InlineChain | None]:
        """``driver``'s target from its own layer's (``own``): what it does not hold read
        from the layers below (and its chain, whose hits its settle_hits folds), zeros
        without a parent; over a parent that cannot be read inline, its own bytes only
        (what it does not hold is then the Python path's)."""
        if driver.parent is None:
            return own._replace(holes_zero=True), None
        chain = cls.below(driver)
        if chain is None:
            return own, None
        return own._replace(below=chain.targets, hits=chain.hits,
                            holes_zero=chain.layers[-1].parent is None), chain

    def settle(self) -> None:
        served, seen = self.hits, self._seen
        for k in range(1, len(self.layers) + 1):
            new = served[k] - seen[k]
            if new:
                seen[k] = served[k]
                for d in self.layers[:k]:
                    d.hits[0] += new


class Driver:
    """Base class of every driver; subclasses override what they support."""

    name = "driver"
    # The reference's disk-type numbers (tap-ctl stats reports them).
    type_id = -1
    # A filter has no data of its own: its size and caps are its parent's.
    is_filter = False
    # Whether open_layer takes OpenContext.key (else a key is refused with EINVAL).
    accepts_key = False
    # An image tap-ctl stats lists; False for a filter with no data of its own (mirror).
    listed_in_stats = True

    def __init__(self, engine: Engine, size: int, *, writable: bool,
                 parent: Driver | None = None) -> None:
        self.engine = engine
        self.size = size
        self.writable = writable
        self.parent = parent
        self.caps = Caps(0)
        self.path = ""
        # Sectors [read, written] this layer was asked for, and failed (tap-ctl stats).
        self.hits = [0, 0]
        self.fail = [0, 0]

    # ------------------------------------------------------------------ opening
    @classmethod
    def open_layer(cls, ctx: OpenContext, args: str) -> Driver:
        """Open this driver for ``args`` (what follows ``type:``). Blocking: it runs in
        an engine thread before the disk is served, so files may be opened and metadata
        read here. Raise :class:`~blktap.errors.BlktapError` (or ``OSError``) with an
        errno to refuse."""
        raise UnsupportedImage(f"{cls.name}: cannot be opened by name", errno.ENOSYS)

    def parent_spec(self) -> str | None:
        """``type:args`` of the layer below this one, or None (the reference's
        ``td_get_parent_id``). Asked once, right after :meth:`open_layer`."""
        return None

    def validate_parent(self, parent: Driver) -> None:
        """Check the parent the stack opened (``td_validate_parent``): raise to refuse
        it (a wrong size, a wrong identity). ``self.parent`` is already set."""

    # ------------------------------------------------------------------ the stack
    def chain(self) -> list[Driver]:
        """This driver and every parent below it, top first."""
        out: list[Driver] = []
        d: Driver | None = self
        while d is not None:
            out.append(d)
            d = d.parent
        return out

    async def close_chain(self) -> None:
        """Close this driver and every parent below it, each even when one before it
        failed; then raise the first failure."""
        errors: list[BaseException] = []
        for d in self.chain():
            try:
                await d.close()
            except (OSError, BlktapError) as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    async def forward_read(self, offset: int, iov: Sequence[memoryview]) -> None:
        """Read what this layer does not hold: from the parent, zeros past its end or
        when there is none."""
        length = total(iov)
        parent = self.parent
        if parent is None or offset >= parent.size:
            zero_fill(iov)
            return
        inside = min(length, parent.size - offset)
        if inside < length:
            zero_fill(slice_iov(iov, inside, length - inside))
            iov = slice_iov(iov, 0, inside)
        parent.hits[0] += -(-inside // SECTOR)
        try:
            await parent.read(offset, iov)
        except BaseException:
            parent.fail[0] += -(-inside // SECTOR)
            raise

    async def forward_write(self, offset: int, iov: Sequence[memoryview], *,
                            fua: bool = False) -> None:
        """Write to the parent (a filter passing a write down), counted in its hits."""
        parent = self.parent
        if parent is None:
            raise UnsupportedImage(f"{self.path or self.name}: nothing below to write to",
                                   errno.EROFS)
        sectors = -(-total(iov) // SECTOR)
        parent.hits[1] += sectors
        try:
            await parent.write(offset, iov, fua=fua)
        except BaseException:
            parent.fail[1] += sectors
            raise

    async def forward_block_status(self, offset: int, length: int) -> Extents:
        parent = self.parent
        if parent is None or offset >= parent.size:
            return [(length, STATE_HOLE | STATE_ZERO)]
        inside = min(length, parent.size - offset)
        out = await parent.block_status(offset, inside)
        covered = sum(n for n, _ in out)
        if covered < inside:  # the parent answered short: stop there
            return out
        out = [(n, f) for n, f in out]
        if inside < length:
            out.append((length - inside, STATE_HOLE | STATE_ZERO))
        return merge_extents(out)

    def forward_status_now(self, offset: int, length: int) -> Extents | None:
        """:meth:`status_now` of the parent (past its end, and below the last layer: a
        hole that reads as zeros), or None if it cannot answer now."""
        parent = self.parent
        if parent is None or offset >= parent.size:
            return [(length, STATE_HOLE | STATE_ZERO)]
        inside = min(length, parent.size - offset)
        out = parent.status_now(offset, inside)
        if out is None:
            return None
        if inside < length:
            out = [*out, (length - inside, STATE_HOLE | STATE_ZERO)]
        return out

    async def reads_as_zeros(self, offset: int, length: int) -> bool:
        """Whether the range certainly reads as zeros (asked of a parent before writing
        zeros over a part a child does not hold)."""
        pos, end = offset, offset + length
        while pos < end:
            extents = await self.block_status(pos, end - pos)
            for n, flags in extents:
                if not flags & STATE_ZERO:
                    return False
                pos += n
                if pos >= end:
                    break
        return True

    def _slow_zeroing(self) -> UnsupportedImage:
        """The answer to a FAST_ZERO request that would cost as much as writing."""
        return UnsupportedImage(f"{self.path or self.name}: zeroing would be as slow as "
                                "writing", errno.EOPNOTSUPP)

    async def _zero_file(self, fd: int, offset: int, length: int, *, punch: bool,
                         fast: bool) -> None:
        """Make bytes of a regular file (or a device that takes fallocate) read as zeros:
        a punched hole when ``punch``, else (or where the file system cannot punch) a
        zeroed range that stays allocated; where it can do neither, zeros are written,
        unless ``fast`` (then EOPNOTSUPP and nothing changed)."""
        modes = (syscalls.punch_hole, syscalls.zero_range) if punch else (syscalls.zero_range,)
        for fn in modes:
            try:
                await self.engine.call(fn, fd, offset, length)
                return
            except OSError as exc:
                if not syscalls.unsupported(exc):
                    raise
        if fast:
            raise self._slow_zeroing()
        pos, end = offset, offset + length
        while pos < end:
            n = min(ZERO_CHUNK, end - pos)
            await self.engine.pwritev(fd, zeros_iov(n), pos)
            pos += n

    def _require_writable(self) -> None:
        if not self.writable:
            raise OutOfRange(f"{self.path or self.name} is read-only", errno.EROFS)

    def forward_read_now(self, offset: int, iov: Sequence[memoryview], tally: Tally) -> bool:
        """:meth:`forward_read`, done now if nothing below has to wait (see read_now)."""
        length = len(iov[0]) if len(iov) == 1 else total(iov)
        parent = self.parent
        if parent is None or offset >= parent.size:
            zero_fill(iov)
            return True
        inside = min(length, parent.size - offset)
        if inside < length:
            if not parent.read_now(offset, slice_iov(iov, 0, inside), tally):
                return False
            zero_fill(slice_iov(iov, inside, length - inside))
        elif not parent.read_now(offset, iov, tally):
            return False
        tally.append((parent, -(-inside // SECTOR)))
        return True

    # ------------------------------------------------------------------ operations
    async def read(self, offset: int, iov: Sequence[memoryview]) -> int | None:
        """Fill ``iov`` with the bytes at ``offset``; return None (or the number of
        bytes filled: fewer than asked fails the request with EIO)."""
        raise NotImplementedError

    def read_now(self, offset: int, iov: Sequence[memoryview], tally: Tally) -> bool:
        """The synchronous side door of :meth:`read`: fill ``iov`` now, on the loop
        thread, when nothing has to wait (data in memory or cached, metadata cached), and
        return True; return False, as soon as something would wait, for the caller to
        use :meth:`read` instead (the buffers may then hold anything). Changes nothing:
        the sectors each layer below served are appended to ``tally`` as (layer,
        sectors), for the caller to add to their ``hits`` once the whole read is done.
        Drivers that cannot tell keep this default."""
        return False

    def write_now(self, offset: int, iov: Sequence[memoryview], *, fua: bool = False) -> bool:
        """The side door of :meth:`write`: write all of it now when nothing has to wait
        (no metadata change, data to memory) and return True, or return False having
        changed nothing."""
        return False

    def inline_target(self) -> InlineTarget | None:
        """Where a transport's compiled inline path may do this driver's reads and
        writes itself, with plain system calls: when the disk's bytes sit in one
        descriptor the kernel serves without waiting (at their own offsets, or in blocks
        a BAT places), the target that says so (:func:`inline_file` makes it); else None
        (the default: filters, images with other metadata, devices). Asked again before
        each pass, so a driver may change its answer at any time (after
        punching a hole, say); what the compiled path does must be exactly what
        :meth:`read_now`/:meth:`write_now` would do."""
        return None

    def inline_async(self, reap: Reaper) -> AsyncTarget | None:
        """Where a transport's compiled pass may issue reads and writes that complete
        later (:class:`AsyncTarget`), or None (the default). From then on the driver
        reaps its completions through ``reap`` (:data:`Reaper`), on the loop, which
        settles those of the requests issued there; a transport asks before each pass. What
        the pass issues must be exactly what :meth:`read`/:meth:`write` would do; a
        request that fails there is served again by the transport's Python path."""
        return None

    def inline_layer(self) -> InlineTarget | None:
        """This layer's own target as a read-only layer under another (a parent in a
        chain the compiled path reads through): its file and map alone, as if it had no
        parent, or None (the default) if it cannot be read so."""
        return None

    def start_read(self, offset: int, iov: Sequence[memoryview], done: Completion) -> bool:
        """The callback way of :meth:`read`, for a driver whose read is one operation the
        kernel completes (``aio`` on a direct descriptor): submit it now and return True,
        ``done(error)`` being called on the loop when it completes (never from here),
        with no coroutine to wake; or return False having done nothing, for the caller
        to await :meth:`read`. Drivers that cannot keep this default."""
        return False

    def start_write(self, offset: int, iov: Sequence[memoryview], done: Completion, *,
                    fua: bool = False) -> bool:
        """:meth:`start_read` for :meth:`write`."""
        return False

    async def write(self, offset: int, iov: Sequence[memoryview], *, fua: bool = False) -> None:
        raise UnsupportedImage(f"{self.name}: write not supported", errno.EROFS)

    async def flush(self) -> None:
        return None

    async def discard(self, offset: int, length: int) -> None:
        """A hint: the range is no longer needed (it may read as anything after)."""
        return None

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = True,
                           fast: bool = False, fua: bool = False) -> None:
        """Make the range read as zeros. ``may_trim`` False: keep it allocated.
        ``fast``: fail with EOPNOTSUPP, changing nothing, unless it is cheaper than a
        write."""
        raise UnsupportedImage(f"{self.name}: write zeroes not supported")

    async def block_status(self, offset: int, length: int) -> Extents:
        """Runs from ``offset`` covering at least one byte and at most ``length``."""
        return [(length, STATE_DATA)]

    def status_now(self, offset: int, length: int) -> Extents | None:
        """The synchronous side door of :meth:`block_status`: runs covering exactly
        ``[offset, offset + length)`` (whole sectors), from what is in memory (cached
        metadata), never waiting; None when it cannot tell without waiting. Transports
        ask it before a read, to answer the parts that read as zeros without reading
        them (NBD's hole chunks): it must be cheap, and cheapest for data (one run).
        Drivers that cannot tell keep this default."""
        return None

    async def cache(self, offset: int, length: int) -> None:
        return None

    async def close(self) -> None:
        return None

    def settle_hits(self) -> None:
        """Bring ``hits``/``fail`` of the layers below up to date where this layer keeps
        some of theirs aside (see the vhd driver); called before they are reported."""

    def describe(self) -> dict:
        """Per-layer facts for stats (the reference's ``driver`` object)."""
        return {"type": self.type_id, "name": self.name, "status": None}


class Filter(Driver):
    """A driver without data of its own over the layer it wraps (its parent).

    ``args`` name the layer below: ``open_layer`` gets e.g. ``aio:/disk.img`` for
    ``myfilter:aio:/disk.img``; a filter with options of its own parses them off the
    front and passes the rest to ``__init__``. Everything not overridden is passed down
    unchanged; size and caps are the parent's (set by :meth:`validate_parent`).
    """

    is_filter = True
    # False: the layer below is opened read-only even when the filter is writable.
    parent_writable = True
    # Filters see every key: it is the layer below's to check.
    accepts_key = True

    def __init__(self, engine: Engine, inner: str, *, writable: bool) -> None:
        super().__init__(engine, 0, writable=writable)
        self.inner = inner

    @classmethod
    def open_layer(cls, ctx: OpenContext, args: str) -> Driver:
        return cls(ctx.engine, args, writable=ctx.writable)

    def parent_spec(self) -> str | None:
        return self.inner

    def validate_parent(self, parent: Driver) -> None:
        self.size = parent.size
        self.caps = parent.caps if self.writable else parent.caps & ~WRITE_CAPS
        self.path = self.path or parent.path

    @property
    def below(self) -> Driver:
        assert self.parent is not None
        return self.parent

    async def read(self, offset: int, iov: Sequence[memoryview]) -> int | None:
        await self.forward_read(offset, iov)
        return None

    async def write(self, offset: int, iov: Sequence[memoryview], *, fua: bool = False) -> None:
        self._require_writable()
        await self.forward_write(offset, iov, fua=fua)

    async def flush(self) -> None:
        await self.below.flush()

    async def discard(self, offset: int, length: int) -> None:
        self._require_writable()
        await self.below.discard(offset, length)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = True,
                           fast: bool = False, fua: bool = False) -> None:
        self._require_writable()
        await self.below.write_zeroes(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    async def block_status(self, offset: int, length: int) -> Extents:
        return await self.forward_block_status(offset, length)

    def status_now(self, offset: int, length: int) -> Extents | None:
        # The layer below may only speak for a filter that reads, writes and reports what
        # it does: one that keeps data of its own (an overlay, a cache of writes) would see
        # its writes answered as the holes below. Such a filter tells for itself, or
        # forwards explicitly when what it reads is what lies below.
        if self._keeps_data:
            return None
        return self.forward_status_now(offset, length)

    _keeps_data = False  # per class, set once (status_now runs before every NBD read)

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls._keeps_data = any(getattr(cls, name) is not getattr(Filter, name) for name in
                              ("read", "write", "block_status", "write_zeroes", "discard"))

    async def cache(self, offset: int, length: int) -> None:
        await self.below.cache(offset, length)


# What a read-only layer cannot offer.
WRITE_CAPS = Caps.WRITE | Caps.FUA | Caps.TRIM | Caps.ZERO | Caps.FAST_ZERO
# The method each capability needs overridden: declaring one without it is a mistake.
CAP_METHODS = {Caps.WRITE: "write", Caps.FUA: "write", Caps.TRIM: "discard",
               Caps.ZERO: "write_zeroes", Caps.FAST_ZERO: "write_zeroes",
               Caps.BLOCK_STATUS: "block_status", Caps.CACHE: "cache", Caps.FLUSH: "flush"}
