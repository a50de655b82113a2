"""Requests in flight, owned by the transport that started them: tasks, and requests
started without one (the VBD's callback way), counted by :class:`Untasked`.

Each task takes itself out of its owner's set when it ends. A done callback would do the
same one turn of the event loop later, and a turn costs system calls (an ``epoll_wait``
and clock readings; in a PV dom0 each of them a trip through Xen): at queue depth 1, a
turn per request."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def start_owned(loop: asyncio.AbstractEventLoop, tasks: set[asyncio.Task],
                coro: Coroutine[Any, Any, None]) -> asyncio.Task:
    """Run ``coro`` in a task held in ``tasks`` until it ends."""
    task = loop.create_task(_owned(tasks, coro))
    tasks.add(task)
    return task


async def _owned(tasks: set[asyncio.Task], coro: Coroutine[Any, Any, None]) -> None:
    try:
        await coro
    finally:
        tasks.discard(asyncio.current_task())  # type: ignore[arg-type]


async def drain(tasks: set[asyncio.Task]) -> None:
    """Wait until every task of ``tasks`` has ended, those started meanwhile too. A task
    cancelled before its first step never ran its coroutine, so never left the set: it
    is dropped here."""
    while pending := [t for t in tasks if not t.done()]:
        await asyncio.gather(*pending, return_exceptions=True)
    tasks.difference_update([t for t in tasks if t.done()])


class Untasked:
    """How many requests an owner has in flight without a task of its own (each one's
    completion calls :meth:`end`), and a way to wait until there are none."""

    __slots__ = ("loop", "count", "_idle")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.count = 0
        self._idle: asyncio.Future | None = None

    def begin(self) -> None:
        self.count += 1

    def end(self) -> None:
        self.count -= 1
        idle = self._idle
        if not self.count and idle is not None and not idle.done():
            idle.set_result(None)

    async def wait(self) -> None:
        while self.count:
            self._idle = self.loop.create_future()
            await self._idle


async def settle(tasks: set[asyncio.Task], untasked: Untasked) -> None:
    """Wait until nothing is in flight: every task (those started meanwhile too) and
    every request without one (whose completion may start a task: an error's reply)."""
    while True:
        await drain(tasks)
        if not untasked.count:
            if not tasks:
                return
            continue
        await untasked.wait()
