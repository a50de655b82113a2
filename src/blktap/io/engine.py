"""The interface of an I/O engine.

An engine runs blocking positioned I/O for coroutines on one event loop. Every operation
either completes whole or raises ``OSError``: reads fill every buffer (bytes past the end
of the file read as zeros), writes write every byte. Cancelling the task that awaits an
operation is safe: an operation nobody has started yet is dropped (CancelledError at
once), one under way is not interrupted, and CancelledError reaches the caller only once
it is over. Either way the caller's buffers are free again when the await ends, so a
transport may cancel the reads of a client that went away (:class:`Settled`).

``try_preadv`` / ``try_pwritev`` are the synchronous side door: I/O that cannot block
(files in memory, the page cache) is done at once on the caller's thread, so that a
request served from memory costs no task, future or turn of the event loop.

``start_preadv`` / ``start_pwritev`` are the callback way, for engines that hand I/O to
the kernel (Linux AIO): the operation is submitted at once and ``done(error)`` is called
on the loop when it completes, in the turn that reaps it, with no coroutine to wake. It
cannot be cancelled (the kernel has the buffers until then).
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

Iov = Sequence[memoryview]
# Told when an operation started the callback way completes: None, or the OSError.
Completion = Callable[[BaseException | None], None]


class Settled(asyncio.Future):
    """The future of an engine operation: cancelling it succeeds only while nobody has
    started the operation (``token`` still holds its one item; whoever pops it first,
    the canceller or the worker, wins). Once started it cannot be cancelled, so a task
    cancelled while awaiting it is woken with CancelledError when the operation is over
    (asyncio's rule for a future that refuses cancellation), not while a thread or the
    kernel still fills or reads the caller's buffers. ``token`` None: never cancellable."""

    __slots__ = ("token",)

    def cancel(self, msg: Any = None) -> bool:
        token = self.token
        if token is None:
            return False
        try:
            token.pop()  # atomic: a worker taking the job pops it too
        except IndexError:
            return False  # started: it runs to the end
        return super().cancel(msg)


def settled(loop: asyncio.AbstractEventLoop, cancellable: bool = True) -> Settled:
    fut = Settled(loop=loop)
    fut.token = [None] if cancellable else None
    return fut


class Plug:
    """``with plug:`` around starting several requests (as the block layer's plug): what
    they start is held, and ``unplug`` sends it on together when the outermost ``with``
    ends, in the same turn of the loop. Re-entrant. An engine's (``engine.plug()``) holds
    its submissions to the kernel; a VBD's (``vbd.batch``) its queue for the drivers."""

    __slots__ = ("depth", "_unplug")

    def __init__(self, unplug: Callable[[], None] | None = None) -> None:
        self.depth = 0
        self._unplug = unplug

    def __enter__(self) -> Plug:
        self.depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1
        if not self.depth and self._unplug is not None:
            self._unplug()


class Engine(ABC):
    """Asynchronous positioned I/O on file descriptors."""

    name = "engine"

    @abstractmethod
    async def preadv(self, fd: int, iov: Iov, offset: int) -> None:
        """Fill ``iov`` from ``fd`` at ``offset`` (zeros past the end of the file)."""

    @abstractmethod
    async def pwritev(self, fd: int, iov: Iov, offset: int, *, dsync: bool = False) -> None:
        """Write all of ``iov`` at ``offset``; with ``dsync`` the data is durable on return."""

    def try_preadv(self, fd: int, iov: Iov, offset: int) -> bool:
        """Do :meth:`preadv` now, on the calling thread, if that cannot block (memory,
        page cache): True when ``iov`` is filled; False when it would have to wait (the
        buffers may then hold anything). Raises ``OSError`` as preadv does."""
        return False

    def try_pwritev(self, fd: int, iov: Iov, offset: int, *, dsync: bool = False) -> bool:
        """Do :meth:`pwritev` now if that cannot block: True when all of it is written;
        False (and nothing written) when it would have to wait."""
        return False

    def inline_mode(self, fd: int) -> str | None:
        """What :meth:`try_preadv`/:meth:`try_pwritev` can do on ``fd``, for a caller that
        does the system calls itself (the compiled inline path): ``"memory"`` (a file in
        memory: reads and writes never wait; a short read is the end of the file),
        ``"nowait"`` (reads with RWF_NOWAIT, writes never) or None (never inline)."""
        return None

    def count_inline(self, reads: int, writes: int) -> None:  # noqa: B027 - optional
        """Count requests such a caller did inline on this engine's behalf."""

    _no_plug = Plug()

    def plug(self) -> Plug:
        """A :class:`Plug` (this engine holds nothing: it submits as requests come)."""
        return self._no_plug

    def start_preadv(self, fd: int, iov: Iov, offset: int, done: Completion, *,
                     addresses: Sequence[int] | None = None) -> bool:
        """Submit :meth:`preadv` now and call ``done`` on the loop once it completes:
        True when submitted (``done`` is never called from here); False when this engine
        or this descriptor cannot (the caller awaits :meth:`preadv` instead).
        ``addresses``: the buffers' addresses (``aio_abi.addresses``), when the caller
        already took them (an alignment check): an engine that needs them saves asking
        again."""
        return False

    def start_pwritev(self, fd: int, iov: Iov, offset: int, done: Completion, *,
                      dsync: bool = False, addresses: Sequence[int] | None = None) -> bool:
        """:meth:`start_preadv` for :meth:`pwritev`."""
        return False

    @abstractmethod
    async def fsync(self, fd: int, *, datasync: bool = True) -> None:
        """Make what was written to ``fd`` durable."""

    @abstractmethod
    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run any other blocking function (metadata updates, fallocate...) off the loop."""

    def forget(self, fd: int) -> None:  # noqa: B027 - optional: engines that learn nothing
        """Drop anything learnt about ``fd``; drivers call it before closing ``fd``."""

    @abstractmethod
    def close(self) -> None:
        """Stop the engine once every operation submitted has completed."""
