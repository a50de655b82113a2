"""transport/tasks.py: request tasks that leave their owner's set themselves."""

from __future__ import annotations

import asyncio

import pytest

from blktap.transport.tasks import Untasked, drain, settle, start_owned


def test_a_task_leaves_the_set_in_the_turn_it_ends() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task] = set()
        gate = asyncio.Event()

        async def request() -> None:
            await gate.wait()
        task = start_owned(loop, tasks, request())
        assert tasks == {task}
        await asyncio.sleep(0)
        gate.set()
        await asyncio.sleep(0)  # the task's last step runs in this turn...
        assert tasks == set()  # ...and no callback is left for a later one
        assert task.done()
    asyncio.run(main())


def test_drain_waits_for_tasks_started_meanwhile() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task] = set()
        done: list[str] = []

        async def second() -> None:
            await asyncio.sleep(0.01)
            done.append("second")

        async def first() -> None:
            await asyncio.sleep(0.01)
            start_owned(loop, tasks, second())
            done.append("first")
        start_owned(loop, tasks, first())
        await drain(tasks)
        assert done == ["first", "second"] and not tasks
    asyncio.run(main())


# The request's coroutine, never started, is never awaited either: Python says so when it
# is collected. (Transports do not cancel request tasks; drain() must cope all the same.)
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_drain_does_not_hang_on_a_task_cancelled_before_it_ran() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task] = set()

        async def never() -> None:
            raise AssertionError("ran")
        task = start_owned(loop, tasks, never())
        task.cancel()  # before its first step: its coroutine never runs
        await asyncio.wait_for(drain(tasks), 5)
        assert task.cancelled() and not tasks
    asyncio.run(main())


def test_settle_waits_for_requests_without_a_task_and_the_tasks_they_start() -> None:
    """Two requests begun without a task: settle returns only once both ended, and the
    task the second one's completion started (an error's reply) has ended too."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task] = set()
        untasked = Untasked(loop)
        replied: list[str] = []

        async def reply() -> None:
            await asyncio.sleep(0)
            replied.append("error reply")

        def complete(start_a_task: bool) -> None:
            if start_a_task:
                start_owned(loop, tasks, reply())
            untasked.end()
        untasked.begin()
        untasked.begin()
        settling = asyncio.ensure_future(settle(tasks, untasked))
        await asyncio.sleep(0)
        loop.call_soon(complete, False)
        for _ in range(3):
            await asyncio.sleep(0)
        assert not settling.done() and untasked.count == 1
        loop.call_soon(complete, True)
        await settling
        assert replied == ["error reply"] and not tasks and untasked.count == 0
        await settle(tasks, untasked)  # nothing in flight: at once
    asyncio.run(main())
