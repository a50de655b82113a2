"""The interface of an I/O engine.

An engine runs blocking positioned I/O for coroutines on one event loop. Every operation
either completes whole or raises ``OSError``: reads fill every buffer (bytes past the end
of the file read as zeros), writes write every byte. Operations are not cancellable once
submitted: a caller must keep its buffers alive until the await returns, which is why
transports never cancel a request in flight (they wait for it).

``try_preadv`` / ``try_pwritev`` are the synchronous side door: I/O that cannot block
(files in memory, the page cache) is done at once on the caller's thread, so that a
request served from memory costs no task, future or turn of the event loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

Iov = Sequence[memoryview]


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
