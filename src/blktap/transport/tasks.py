"""Tasks of requests in flight, owned by the transport that started them.

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
