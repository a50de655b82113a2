"""``rbd``: a disk on a Ceph cluster, through librbd's asynchronous calls.

``rbd:POOL[/NS]/IMAGE[@SNAP][:conf=PATH][:id=USER][:KEY=VALUE...]`` (qemu's spelling;
:mod:`blktap.image.rbd` parses it and connects). Every request is one librbd aio call
issued from the event loop thread (the bindings release the GIL while librbd queues
it); librbd completes it on one of its own threads, whose callback only hands the result
to the loop (``call_soon_threadsafe``): no thread per request. At most ``max_inflight``
requests are in librbd at once; the others wait their turn.

With librbd's C calls (``rbd_c``, the default where they load), completions signal an
eventfd the loop watches, and reads and writes can also be started the callback way
(:meth:`Driver.start_read` / :meth:`Driver.start_write`): issued at once from the VBD's
kick, told in the turn that reaps the eventfd, with no task or future of their own.

The Python bindings move bytes as ``bytes`` objects: a read arrives in one and is copied
into the caller's buffers, a write is gathered into one. That one copy each way is the
price of the bindings (librbd itself copies nothing more).

- flush: ``aio_flush`` (librbd's cache, when enabled, written back); FUA = write + flush.
- discard: ``aio_discard``; write-zeroes: ``aio_write_zeroes`` (sparse where whole
  objects are zeroed; ``may_trim`` False asks for the thick-provision flag).
- block status: ``diff_iterate`` against nothing, in the engine (it blocks): objects
  that exist are data, the rest reads as zeros. With fast-diff the object map answers
  without asking the OSDs; without it, at most :data:`STATUS_OBJECTS` objects are looked
  at per answer (block status may answer short).
- A snapshot (``@SNAP``) is read-only.
- An OSD that stops answering holds requests (librbd resends them when it is back);
  past ``rados_osd_op_timeout`` (30 s unless the spec says otherwise, 0: never) a
  request fails with ETIMEDOUT, turned into EAGAIN here so that the VBD retries it until
  its own timeout, then fails it with a clear error.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from blktap.image import rbd_c
from blktap.image.rbd import RbdImage, data_runs_from
from blktap.image.rbd_c import CImage
from blktap.io.engine import Completion, Engine
from blktap.io.iov import copy_into, total
from blktap.tapdisk.driver import (
    STATE_DATA,
    STATE_HOLE,
    STATE_ZERO,
    AsyncTarget,
    Caps,
    Driver,
    Extents,
    OpenContext,
    Reaper,
    merge_extents,
)

log = logging.getLogger("blktap.rbd")

DEFAULT_MAX_INFLIGHT = 64
# "bindings" keeps requests on the Python bindings' aio calls (the C path's fallback).
ENV_IO = "BLKTAP_RBD_IO"
# Objects diff_iterate looks at per block-status answer when there is no object map.
STATUS_OBJECTS = 64
# Errors the cluster gives for a request it may take later: retried by the VBD.
TRANSIENT = {errno.ETIMEDOUT: errno.EAGAIN, errno.ESHUTDOWN: errno.EAGAIN}


class _Issued:
    """A request librbd holds (C calls): what it is, for its error, and whom to tell
    (a callback-way request's ``done``, or the settling of a coroutine's future)."""

    __slots__ = ("done", "length", "offset", "what")

    def __init__(self, what: str, offset: int, length: int, done: Completion) -> None:
        self.what = what
        self.offset = offset
        self.length = length
        self.done = done


def _settle(fut: asyncio.Future, error: BaseException | None) -> None:
    if fut.done():  # the caller gave up (cancelled): nothing to deliver
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


class RbdDriver(Driver):
    name = "rbd"
    type_id = 18  # past the reference's table (qcow2 is 17)

    def __init__(self, engine: Engine, image: RbdImage, *,
                 max_inflight: int = DEFAULT_MAX_INFLIGHT) -> None:
        super().__init__(engine, image.size, writable=image.writable)
        self.image = image
        self.rbd = image.image
        self.path = image.path
        self.caps = Caps.BLOCK_STATUS
        if image.writable:
            self.caps |= Caps.WRITE | Caps.FLUSH | Caps.FUA | Caps.TRIM | Caps.ZERO
        self.max_inflight = max_inflight
        # Requests librbd holds (their outcome not yet settled on the loop), plus the
        # places handed to waiters about to issue theirs.
        self.inflight = 0
        self._slot_waiters: collections.deque[asyncio.Future] = collections.deque()
        self._idle: asyncio.Event | None = None
        # Completions queued by librbd's threads for the loop, and whether a wake-up of
        # the loop is already on its way (one per batch, not one per completion).
        self._finished: collections.deque[tuple[asyncio.Future, Any, Any]] = \
            collections.deque()
        self._wake_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop serving us
        # librbd's C calls (rbd_c), when they load: requests by completion, completions
        # signalled on an eventfd the loop watches. The bindings' handle is closed.
        self.c: CImage | None = None
        # By completion: the request, and what librbd reads or fills (kept pinned
        # until the completion, even for a caller that gave up waiting).
        self._pending: dict[int, tuple[_Issued, Any]] = {}
        self._watching: asyncio.AbstractEventLoop | None = None
        # The reaper a transport's compiled pass gave (inline_async): it settles the
        # completions the pass made and hands back ours; and the target it issues to.
        self._reaper: Reaper | None = None
        self._async: AsyncTarget | None = None
        self._closing = False
        if os.environ.get(ENV_IO, "c") != "bindings" and rbd_c.load() is not None:
            try:
                self.c = CImage(image.spec, image.writable)
            finally:
                image.close()  # (the bindings' connection, either way: not used now)

    @classmethod
    def open(cls, engine: Engine, spec: str, *, writable: bool,
             max_inflight: int = DEFAULT_MAX_INFLIGHT) -> RbdDriver:
        """Connect and open (blocking: before serving, or in the engine)."""
        return cls(engine, RbdImage.open(spec, writable=writable), max_inflight=max_inflight)

    @classmethod
    def open_layer(cls, ctx: OpenContext, args: str) -> RbdDriver:
        return cls.open(ctx.engine, args, writable=ctx.writable)

    # ------------------------------------------------------------------ the bridge
    async def _aio(self, what: str, call: Callable[..., Any], *args: Any,
                   **kwargs: Any) -> Any:
        """Run one librbd aio call, ``call(*args, oncomplete, **kwargs)``; its completion
        comes back on the loop (:meth:`_complete`, :meth:`_drain`). Errors carry the image
        and the operation. A caller cancelled meanwhile leaves the request to librbd
        (which owns its buffer until the callback): it counts as in flight until then,
        and close() waits for it."""
        if self.inflight < self.max_inflight and not self._slot_waiters:
            self.inflight += 1  # a free place (the common case, without a coroutine)
        else:
            await self._take()
        self._loop = loop = asyncio.get_running_loop()
        fut = loop.create_future()
        try:
            call(*args, partial(self._complete, fut), **kwargs)
        except Exception as exc:  # refused before queueing (bad argument, closed)
            self._give_back()
            code = getattr(exc, "errno", None) or errno.EIO
            raise OSError(abs(code), f"{self.path}: {what}: {exc}") from None
        try:
            return await fut
        except OSError as exc:
            code = TRANSIENT.get(exc.errno, exc.errno)
            raise OSError(code, f"{self.path}: {what}: {exc.strerror}") from None

    async def _take(self) -> None:
        """Take one of the ``max_inflight`` places (counted in ``inflight``), waiting
        for one first come, first served."""
        if self.inflight < self.max_inflight and not self._slot_waiters:
            self.inflight += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._give_back()  # handed a place it will not use
            else:
                self._slot_waiters.remove(waiter)
            raise

    def _give_back(self) -> None:
        """A place is free: it goes to the first waiter (still counted), else away."""
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.inflight -= 1
        if self.inflight == 0 and self._idle is not None:
            self._idle.set()

    def _complete(self, fut: asyncio.Future, completion: Any, data: Any = None) -> None:
        """librbd's callback, on one of its threads (the GIL held): queue the outcome and
        wake the loop once for as many completions as arrive before it runs."""
        self._finished.append((fut, completion, data))
        if not self._wake_pending:
            self._wake_pending = True
            self._loop.call_soon_threadsafe(self._drain)  # type: ignore[union-attr]

    def _drain(self) -> None:
        """On the loop: settle every completion queued so far."""
        self._wake_pending = False  # first: a completion queued from now on wakes again
        finished = self._finished
        while finished:
            fut, completion, data = finished.popleft()
            self._give_back()
            if fut.done():  # the caller gave up (cancelled): nothing to deliver
                continue
            ret = completion.get_return_value()
            if ret < 0:
                fut.set_exception(OSError(-ret, os.strerror(-ret)))
            else:
                fut.set_result(data)

    # ------------------------------------------------------------------ the C path
    async def _c_call(self, what: str, issue: Callable[[], tuple[int, Any]],
                      offset: int = 0, length: int = 0) -> None:
        """Issue one request through librbd's C calls (``issue()`` returns its completion
        and what to keep pinned) and wait for it (:meth:`_c_events` settles it)."""
        if self.inflight < self.max_inflight and not self._slot_waiters:
            self.inflight += 1
        else:
            await self._take()
        loop = asyncio.get_running_loop()
        self._watch(loop)
        try:
            comp, keep = issue()
        except OSError as exc:  # refused before queueing
            self._give_back()
            raise OSError(exc.errno, f"{self.path}: {what}: {exc.strerror}") from None
        fut = loop.create_future()
        self._pending[comp] = (_Issued(what, offset, length, partial(_settle, fut)), keep)
        await fut

    def _submit(self, what: str, offset: int, iov: Sequence[memoryview]) -> tuple[int, Any]:
        """Issue a read or write of ``iov`` (writable buffers) at ``offset``: its
        completion and what keeps the buffers pinned. OSError if librbd refuses it."""
        c = self.c
        assert c is not None
        if what == "write":
            # librbd sends a write from the buffer it is given, not a copy
            # (rbd_c.OUR_DEFAULTS), and that buffer must not change until the completion.
            # A transport's may (a guest's own memory, which it is free to write to
            # meanwhile): it is copied here, where librbd would have copied it.
            keep = CImage.pin(memoryview(bytearray().join(iov)))
            return c.write(offset, keep), keep
        if len(iov) == 1:
            keep = CImage.pin(iov[0])
            return c.read(offset, keep), keep
        vec, keep = CImage.iovec(iov)
        return c.readv(offset, vec), keep

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._watching is not loop:
            assert self.c is not None
            loop.add_reader(self.c.eventfd, self._c_events)
            self._watching = loop

    def _c_events(self) -> None:
        """The eventfd is readable: settle every request librbd has finished (through
        the transport's reaper once one was given: compiled, it also takes back what
        its passes issued)."""
        c = self.c
        assert c is not None
        pending = self._pending
        reap = self._reaper
        if reap is not None:
            ours, strays = reap(c.reap_calls, c.image.value or 0, c.eventfd)
        else:
            ours, theirs = c.poll(pending)
            strays = len(theirs)  # (cannot be: only a transport's passes make them)
        if strays:
            log.error("%s: %d completions of nobody's requests", self.path, strays)
        for comp, ret in ours:
            entry = pending.pop(comp, None)
            if entry is None:
                log.error("%s: a completion of no request of ours", self.path)
                continue
            self._give_back()
            req = entry[0]
            req.done(self._error(req, ret))

    def _error(self, req: _Issued, ret: int) -> OSError | None:
        """What a finished request failed with: librbd's error (those the cluster may get
        over as EAGAIN, for the VBD to retry), or a short read."""
        if ret < 0:
            code = TRANSIENT.get(-ret, -ret)
            return OSError(code, f"{self.path}: {req.what}: {os.strerror(-ret)}")
        if req.what == "read" and ret != req.length:
            return OSError(errno.EIO, f"{self.path}: short read ({ret} of {req.length} "
                           f"bytes at {req.offset})")
        return None

    def _start(self, what: str, offset: int, iov: Sequence[memoryview],
               done: Completion) -> bool:
        """Issue a read or write through the C calls now; False (nothing issued) where
        the coroutine path must do it: the bindings' fallback, no free place in librbd
        (the coroutine path waits its turn), read-only buffers, or librbd refusing it
        (the coroutine path says why)."""
        if self.c is None or self.inflight >= self.max_inflight or self._slot_waiters:
            return False
        if what == "read" and any(view.readonly for view in iov):  # (not pinned by ctypes)
            return False
        self._watch(asyncio.get_running_loop())
        try:
            comp, keep = self._submit(what, offset, iov)
        except OSError:
            return False
        self.inflight += 1
        self._pending[comp] = (_Issued(what, offset, total(iov), done), keep)
        return True

    def start_read(self, offset: int, iov: Sequence[memoryview], done: Completion) -> bool:
        return self._start("read", offset, iov, done)

    def inline_async(self, reap: Reaper) -> AsyncTarget | None:
        """With librbd's C calls: the image, for a transport's compiled pass to issue
        reads and writes to (their completions arrive on the eventfd this driver
        watches, which it reaps through ``reap`` from now on)."""
        c = self.c
        if c is None or self._closing:
            return None
        if self._watching is None:
            self._watch(asyncio.get_running_loop())
        self._reaper = reap
        target = self._async
        if target is None:
            target = self._async = AsyncTarget(c.image.value or 0, self.size,
                                               self.writable, c.ops, c.eventfd,
                                               c.reap_calls)
        return target

    def start_write(self, offset: int, iov: Sequence[memoryview], done: Completion, *,
                    fua: bool = False) -> bool:
        if not self.writable or fua:  # (FUA is a write then a flush: the coroutine path)
            return False
        return self._start("write", offset, iov, done)

    # ------------------------------------------------------------------ operations
    async def read(self, offset: int, iov: Sequence[memoryview]) -> None:
        length = total(iov)
        if self.c is not None:  # straight into the caller's buffers
            await self._c_call("read", partial(self._submit, "read", offset, iov), offset,
                               length)
            return
        data = await self._aio("read", self.rbd.aio_read, offset, length)
        if len(data) != length:
            raise OSError(errno.EIO, f"{self.path}: short read ({len(data)} of {length} "
                          f"bytes at {offset})")
        if len(iov) == 1:
            iov[0][:] = data
        else:
            copy_into(iov, memoryview(data))

    async def write(self, offset: int, iov: Sequence[memoryview], *, fua: bool = False) -> None:
        self._require_writable()
        if self.c is not None:  # (from a copy: _submit)
            await self._c_call("write", partial(self._submit, "write", offset, iov), offset,
                               total(iov))
            if fua:
                await self.flush()
            return
        data = bytes(iov[0]) if len(iov) == 1 else b"".join(iov)
        await self._aio("write", self.rbd.aio_write, data, offset)
        if fua:
            await self.flush()

    async def flush(self) -> None:
        if self.writable and (c := self.c) is not None:
            await self._c_call("flush", lambda: (c.flush(), None))
        elif self.writable:
            await self._aio("flush", self.rbd.aio_flush)

    async def discard(self, offset: int, length: int) -> None:
        self._require_writable()
        if (c := self.c) is not None:
            await self._c_call("discard", lambda: (c.discard(offset, length), None))
        else:
            await self._aio("discard", self.rbd.aio_discard, offset, length)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = True,
                           fast: bool = False, fua: bool = False) -> None:
        self._require_writable()
        # librbd zeroes whole objects by removing or truncating them and writes zeros
        # only into the partial ones at the edges: cheap either way, so FAST_ZERO is
        # honoured by doing it.
        flags = 0 if may_trim else self._thick_flag()
        if (c := self.c) is not None:
            await self._c_call("write zeroes",
                               lambda: (c.write_zeroes(offset, length, flags), None))
        else:
            await self._aio("write zeroes", self.rbd.aio_write_zeroes, offset, length,
                            zero_flags=flags)
        if fua:
            await self.flush()

    @staticmethod
    def _thick_flag() -> int:
        from blktap.image.rbd import bindings

        return int(getattr(bindings()[1], "RBD_WRITE_ZEROES_FLAG_THICK_PROVISION", 0))

    async def block_status(self, offset: int, length: int) -> Extents:
        if not self.image.fast_diff:
            obj = self.image.object_size
            limit = (offset // obj + STATUS_OBJECTS) * obj - offset
            length = max(1, min(length, limit))
        await self._take()  # a place, though not librbd's: it runs in the engine
        try:
            runs = await self.engine.call(self._data_runs, offset, length)
        finally:
            self._give_back()
        out: Extents = [(n, STATE_DATA if data else STATE_HOLE | STATE_ZERO)
                        for _, n, data in runs]
        return merge_extents(out) or [(length, STATE_DATA)]

    def _data_runs(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        if self.c is None:
            return self.image.data_runs(offset, length)
        end = min(offset + length, self.size)
        found = self.c.data_runs(offset, end - offset, end, self.image.fast_diff)
        return data_runs_from(found, offset, end)

    async def close(self) -> None:
        self._closing = True  # (no more requests from a compiled pass)
        # Let what librbd holds land first (the VBD drains before closing; this is for
        # requests whose callers gave up).
        while self.inflight:
            self._idle = asyncio.Event()
            await self._idle.wait()
        if self.c is not None:
            if self._watching is not None:
                self._watching.remove_reader(self.c.eventfd)
                self._watching = None
            await self.engine.call(self.c.close)
        await self.engine.call(self.image.close)

    def describe(self) -> dict:
        return {"type": self.type_id, "name": self.name, "status": None}
