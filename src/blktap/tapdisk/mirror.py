"""The secondary image of a VBD (``tap-ctl open/unpause -2 TYPE:PATH [-s]``): mirroring
for live storage migration, and fail-over when the leaf's storage runs out of space.

A :class:`MirrorDriver` is a filter on top of the leaf's driver stack (its ``parent``),
holding a second driver stack, the *secondary*. :class:`MirrorState` is what the tapdisk
remembers of the secondary across pause and resume (the drivers are closed and opened
again; the state is not). The reference's semantics (``blktap-reference.md`` §2.4):

- **mirror mode** (no ``-s``): every write (and write-zeroes, flush, and discard where
  the secondary can trim) goes to the secondary *and* to the leaf; the secondary's is
  issued first, and the request completes once both have. Reads come from the leaf.
- **standby mode** (``-s``): the secondary is not written until the leaf fails.
- **ENOSPC on the leaf**, in either mode, makes the secondary the only place writes go
  (mirror mode "retires" the leaf, standby mode "fails over"): the write that failed is
  written there (again), the file ``<run>/tapdisk-enospc<minor>`` is touched for the
  toolstack, and ``FIXME_enospc_redirect_count`` counts the writes redirected since.
  Reads then come from the secondary for every range written there since, and from the
  leaf (which holds everything written before) for the rest, so the disk reads the same
  whether or not the secondary held the old data. This holds across pause and resume
  while the process lives (the ranges are kept in the state), unless the resume names a
  new leaf (``-a``): the toolstack has then dealt with it.
- **a failing secondary** (an error on any request to it) stops the mirror. Like the
  reference, the guest's write still succeeds (the leaf has it) and
  ``nbd_mirror_failed`` becomes 1; unlike the reference, the failure is never silent:
  it is logged as an error, and the stats' ``mirror`` object says ``"state": "failed"``
  with the error and when it happened, until a new secondary is given (``unpause -2``)
  or the mirror removed (``-2 null``). A secondary that failed is not written again, even
  after a resume: it missed writes.

Once failed over, the secondary is the only copy of what was written since: an error
there fails the request, as an error on a leaf does.
"""

from __future__ import annotations

import asyncio
import bisect
import enum
import errno
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from blktap.errors import BlktapError
from blktap.io.iov import slice_iov, total, zeros_iov
from blktap.tapdisk.driver import SECTOR, STATE_DATA, Caps, Driver, Extents, Tally

log = logging.getLogger("blktap.tapdisk")

# Zeros written to a secondary that cannot write zeroes by itself: per request.
ZERO_WRITE = 1 << 20
# The longest a request may wait on the secondary (an NBD secondary holds requests while
# it reconnects) before the mirror is declared failed, as the reference's NBD client's
# 30 s: the guest's writes wait for the secondary meanwhile. Shorter if the VBD's
# per-request timeout (tap-ctl -t) is.
SECONDARY_TIMEOUT = 30.0


class Mode(enum.Enum):
    MIRROR = "mirror"
    STANDBY = "standby"


class Phase(enum.Enum):
    ACTIVE = "active"  # mirroring (mirror mode) or standing by (standby mode)
    FAILED = "failed"  # the secondary failed: not written any more
    FAILED_OVER = "failed-over"  # the leaf ran out of space: writes go to the secondary


class RangeSet:
    """A set of byte ranges, kept as sorted disjoint [start, end) runs."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __len__(self) -> int:
        return len(self._starts)

    @property
    def bytes(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        # Runs touching [start, end) merge with it.
        lo = bisect.bisect_left(self._ends, start)
        hi = bisect.bisect_right(self._starts, end)
        if lo < hi:
            start = min(start, self._starts[lo])
            end = max(end, self._ends[hi - 1])
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]

    def pieces(self, start: int, end: int) -> list[tuple[int, int, bool]]:
        """[start, end) cut into (start, end, inside) pieces, in order."""
        out: list[tuple[int, int, bool]] = []
        i = bisect.bisect_right(self._ends, start)
        pos = start
        while pos < end:
            if i < len(self._starts) and self._starts[i] <= pos:
                stop = min(end, self._ends[i])
                out.append((pos, stop, True))
                i += 1
            else:
                stop = min(end, self._starts[i]) if i < len(self._starts) else end
                out.append((pos, stop, False))
            pos = stop
        return out


@dataclass
class MirrorState:
    """A VBD's secondary: how it was asked for and what happened to it."""

    spec: str
    mode: Mode
    phase: Phase = Phase.ACTIVE
    error: str = ""
    failed_at: float | None = None  # time.time() of the failure
    failed_over_at: float | None = None
    redirected: int = 0  # writes sent to the secondary in place of the leaf
    moved: RangeSet = field(default_factory=RangeSet)  # written to the secondary only
    secs: list[int] = field(default_factory=lambda: [0, 0])  # sectors [read, written] there
    # Called once when the leaf runs out of space (the tapdisk touches its marker file).
    on_enospc: Callable[[], None] | None = None
    # Called once when the secondary fails (the tapdisk keeps its log file).
    on_failure: Callable[[], None] | None = None

    @property
    def failed(self) -> bool:
        return self.phase is Phase.FAILED

    @property
    def writes_secondary(self) -> bool:
        return (self.phase is Phase.FAILED_OVER
                or (self.phase is Phase.ACTIVE and self.mode is Mode.MIRROR))

    def fail(self, what: str, exc: BaseException) -> None:
        if self.phase is Phase.FAILED:
            return
        self.phase = Phase.FAILED
        self.error = f"{what}: {exc}"
        self.failed_at = time.time()
        log.error("secondary %s failed (%s); the mirror is stopped, the leaf still has "
                  "every write", self.spec, self.error)
        if self.on_failure is not None:
            self.on_failure()

    def as_dict(self) -> dict[str, Any]:
        """The ``mirror`` object of ``tap-ctl stats``."""
        return {"secondary": self.spec, "mode": self.mode.value, "state": self.phase.value,
                "error": self.error or None,
                "failed_at": None if self.failed_at is None else round(self.failed_at, 3),
                "failed_over_at": (None if self.failed_over_at is None
                                   else round(self.failed_over_at, 3)),
                "secs": list(self.secs), "redirected_bytes": self.moved.bytes}


# What a mirrored request does with the secondary's and the leaf's errors (raises one).
Settle = Callable[[BaseException | None, BaseException | None], None]


def _is_enospc(exc: BaseException) -> bool:
    return getattr(exc, "errno", None) == errno.ENOSPC


class MirrorDriver(Driver):
    """The leaf's stack (``parent``) with a secondary stack beside it."""

    name = "mirror"
    listed_in_stats = False  # a filter: not one of the images tap-ctl stats lists

    def __init__(self, leaf: Driver, secondary: Driver, state: MirrorState) -> None:
        if secondary.size != leaf.size:
            raise BlktapError(f"secondary {state.spec}: {secondary.size} bytes, the leaf has "
                              f"{leaf.size}", errno.EINVAL)
        if leaf.writable and not secondary.writable:
            raise BlktapError(f"secondary {state.spec} is read-only", errno.EROFS)
        super().__init__(leaf.engine, leaf.size, writable=leaf.writable, parent=leaf)
        self.path = leaf.path
        self.secondary = secondary
        self.state = state
        # Discard and fast zeroing only where both can; FUA and zeroing are done on a
        # secondary that lacks them by other means.
        both = Caps.TRIM | Caps.FAST_ZERO
        self.caps = leaf.caps & ~(both & ~secondary.caps)

    def bound_requests(self, timeout: float) -> None:
        """The VBD's per-request timeout: the secondary's layers get at most
        SECONDARY_TIMEOUT (the leaf's get theirs from the VBD)."""
        for layer in self.secondary.chain():
            bound = getattr(layer, "bound_requests", None)
            if bound is not None:
                bound(min(timeout, SECONDARY_TIMEOUT))

    # ------------------------------------------------------------------ helpers
    async def _both(self, on_secondary: Coroutine[Any, Any, object],
                    on_leaf: Coroutine[Any, Any, object], settle: Settle) -> None:
        """Run a request on the secondary and the leaf together (the secondary's issued
        first), then ``settle(secondary's error, leaf's error)``, which raises what the
        request fails with. A cancelled caller still waits for both (neither may hold its
        buffers when it returns) and for their outcome to be recorded (a failed
        secondary, a full leaf); then the CancelledError goes on."""
        loop = asyncio.get_running_loop()
        sec = loop.create_task(on_secondary)  # runs first
        leaf = loop.create_task(on_leaf)
        cancelled = False
        pending = {sec, leaf}
        while pending:
            try:
                # wait() leaves the tasks alone when this caller is cancelled.
                _, pending = await asyncio.wait(pending)
            except asyncio.CancelledError:
                cancelled = True
        errors = [t.exception() if not t.cancelled() else asyncio.CancelledError()
                  for t in (sec, leaf)]
        if not cancelled:
            settle(errors[0], errors[1])
            return
        try:
            settle(errors[0], errors[1])
        except Exception:  # noqa: S110 - the caller is gone; the state is recorded
            pass
        raise asyncio.CancelledError

    async def _on_leaf(self, offset: int, length: int, op: Coroutine[Any, Any, object]
                       ) -> None:
        leaf = self.parent
        assert leaf is not None
        n = -(-length // SECTOR)
        leaf.hits[1] += n
        try:
            await op
        except BaseException:
            leaf.fail[1] += n
            raise

    async def _sec_write(self, offset: int, iov: Sequence[memoryview], fua: bool) -> None:
        sec = self.secondary
        if fua and not sec.caps & Caps.FUA:
            await sec.write(offset, iov)
            await sec.flush()
        else:
            await sec.write(offset, iov, fua=fua)
        self.state.secs[1] += total(iov) // SECTOR

    async def _sec_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool) -> None:
        sec = self.secondary
        if sec.caps & Caps.ZERO:
            await sec.write_zeroes(offset, length, may_trim=may_trim, fua=fua)
        else:
            pos, end = offset, offset + length
            while pos < end:
                n = min(ZERO_WRITE, end - pos)
                await sec.write(pos, zeros_iov(n))
                pos += n
            if fua:
                await sec.flush()
        self.state.secs[1] += length // SECTOR

    async def _redirect(self, offset: int, length: int,
                        op: Coroutine[Any, Any, None]) -> None:
        """A write to the secondary in place of the leaf (failed over)."""
        await op
        self.state.redirected += 1
        self.state.moved.add(offset, offset + length)

    def _leaf_full(self, exc: BaseException) -> None:
        st = self.state
        if st.phase is Phase.FAILED_OVER:
            return
        what = "retired" if st.mode is Mode.MIRROR else "failed over to the secondary"
        log.error("%s: the leaf is out of space (%s); %s %s: writes go to it from now on",
                  self.path, exc, what, st.spec)
        st.phase = Phase.FAILED_OVER
        st.failed_over_at = time.time()
        if st.on_enospc is not None:
            try:
                st.on_enospc()
            except OSError as err:
                log.error("%s: could not leave the ENOSPC marker: %s", self.path, err)

    async def _mirrored(self, offset: int, length: int,
                        sec_op: Callable[[], Coroutine[Any, Any, None]],
                        leaf_op: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """A change of the disk's content, done where the state says."""
        st = self.state
        if st.phase is Phase.FAILED_OVER:
            await self._redirect(offset, length, sec_op())
            return
        if not st.writes_secondary:  # standby, or the mirror failed
            try:
                await self._on_leaf(offset, length, leaf_op())
            except (OSError, BlktapError) as exc:
                if not _is_enospc(exc) or st.phase is not Phase.ACTIVE:
                    raise
                self._leaf_full(exc)
                await self._redirect(offset, length, sec_op())
            return

        def settle(sec_err: BaseException | None, leaf_err: BaseException | None) -> None:
            if sec_err is not None:
                st.fail(f"write of {length} bytes at {offset}", sec_err)
                if leaf_err is not None:
                    raise leaf_err
                return
            if leaf_err is None:
                return
            if _is_enospc(leaf_err):
                # The secondary has it: the leaf retires, this write is done.
                self._leaf_full(leaf_err)
                st.redirected += 1
                st.moved.add(offset, offset + length)
                return
            raise leaf_err

        await self._both(sec_op(), self._on_leaf(offset, length, leaf_op()), settle)

    # ------------------------------------------------------------------ operations
    async def read(self, offset: int, iov: Sequence[memoryview]) -> None:
        st = self.state
        if st.phase is not Phase.FAILED_OVER or not st.moved:
            await self.forward_read(offset, iov)
            return
        length = total(iov)
        for start, end, moved in st.moved.pieces(offset, offset + length):
            part = slice_iov(iov, start - offset, end - start)
            if moved:
                await self.secondary.read(start, part)
                st.secs[0] += (end - start) // SECTOR
            else:
                await self.forward_read(start, part)

    def read_now(self, offset: int, iov: Sequence[memoryview], tally: Tally) -> bool:
        if self.state.phase is Phase.FAILED_OVER:
            return False
        return self.forward_read_now(offset, iov, tally)

    def write_now(self, offset: int, iov: Sequence[memoryview], *, fua: bool = False) -> bool:
        st = self.state
        if st.writes_secondary:
            return False
        leaf = self.parent
        assert leaf is not None
        if not leaf.write_now(offset, iov, fua=fua):
            return False
        leaf.hits[1] += total(iov) // SECTOR
        return True

    async def write(self, offset: int, iov: Sequence[memoryview], *, fua: bool = False) -> None:
        self._require_writable()
        leaf = self.parent
        assert leaf is not None
        await self._mirrored(offset, total(iov),
                             lambda: self._sec_write(offset, iov, fua),
                             lambda: leaf.write(offset, iov, fua=fua))

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = True,
                           fast: bool = False, fua: bool = False) -> None:
        self._require_writable()
        leaf = self.parent
        assert leaf is not None
        if fast and self.state.writes_secondary and not self.caps & Caps.FAST_ZERO:
            raise self._slow_zeroing()
        await self._mirrored(offset, length,
                             lambda: self._sec_zeroes(offset, length, may_trim, fua),
                             lambda: leaf.write_zeroes(offset, length, may_trim=may_trim,
                                                       fast=fast, fua=fua))

    async def discard(self, offset: int, length: int) -> None:
        st = self.state
        leaf = self.parent
        assert leaf is not None
        if st.phase is Phase.FAILED_OVER:
            return  # a hint: the secondary keeps what it holds, the leaf is not written
        if st.writes_secondary and self.secondary.caps & Caps.TRIM:
            def settle(sec_err: BaseException | None, leaf_err: BaseException | None) -> None:
                if sec_err is not None:
                    st.fail(f"discard of {length} bytes at {offset}", sec_err)
                if leaf_err is not None:
                    raise leaf_err

            await self._both(self.secondary.discard(offset, length),
                             leaf.discard(offset, length), settle)
            return
        await leaf.discard(offset, length)

    async def flush(self) -> None:
        st = self.state
        leaf = self.parent
        assert leaf is not None
        if not st.writes_secondary:
            await leaf.flush()
            return
        def settle(sec_err: BaseException | None, leaf_err: BaseException | None) -> None:
            if sec_err is not None:
                if st.phase is Phase.FAILED_OVER:
                    raise sec_err
                st.fail("flush", sec_err)
            if leaf_err is not None:
                raise leaf_err

        await self._both(self.secondary.flush(), leaf.flush(), settle)

    async def block_status(self, offset: int, length: int) -> Extents:
        st = self.state
        if st.phase is Phase.FAILED_OVER and st.moved:
            start, end, moved = st.moved.pieces(offset, offset + length)[0]
            if moved:
                return [(end - start, STATE_DATA)]
            return await self.forward_block_status(offset, end - start)
        return await self.forward_block_status(offset, length)

    async def cache(self, offset: int, length: int) -> None:
        leaf = self.parent
        assert leaf is not None
        await leaf.cache(offset, length)

    async def close(self) -> None:
        """Close the secondary's stack (the VBD closes the leaf's)."""
        await self.secondary.close_chain()

    def describe(self) -> dict:
        return {"type": self.type_id, "name": self.name, "status": self.state.as_dict()}


__all__ = ["MirrorDriver", "MirrorState", "Mode", "Phase", "RangeSet"]
