"""The VBD's callback way (start_read / start_write, kick, cancel): what transports use
for reads and writes the side door cannot serve. Against a small in-memory driver that
records its calls and can hold them, so that each state of a request is reached on
purpose: queued, issued but not started, under way, merged into another's group, held
by a pause."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable, Sequence

import pytest

from blktap.errors import BlktapError
from blktap.io import ThreadEngine
from blktap.tapdisk.driver import Caps, Driver
from blktap.tapdisk.vbd import VBD

KiB = 1 << 10
SIZE = 64 * KiB


def pattern(n: int) -> bytes:
    return bytes((i * 7 + i // 251) & 0xFF for i in range(n))


class Recorder(Driver):
    """A disk in a bytearray that records each call, holds calls while ``gate`` is clear
    and fails the next ones with the errnos queued in ``failures``."""

    name = "recorder"

    def __init__(self, engine: ThreadEngine, content: bytes, *, writable: bool = True
                 ) -> None:
        super().__init__(engine, len(content), writable=writable)
        self.caps = Caps.WRITE | Caps.FUA | Caps.FLUSH if writable else Caps(0)
        self.data = bytearray(content)
        self.calls: list[tuple[str, int, int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.failures: list[int] = []
        self.finished = 0

    async def _enter(self, op: str, offset: int, iov: Sequence[memoryview]) -> None:
        self.calls.append((op, offset, sum(len(v) for v in iov)))
        await self.gate.wait()
        if self.failures:
            raise OSError(self.failures.pop(0), f"{op} failed")

    async def read(self, offset: int, iov: Sequence[memoryview]) -> None:
        await self._enter("read", offset, iov)
        for v in iov:
            v[:] = self.data[offset : offset + len(v)]
            offset += len(v)
        self.finished += 1

    async def write(self, offset: int, iov: Sequence[memoryview], *, fua: bool = False
                    ) -> None:
        await self._enter("write_fua" if fua else "write", offset, iov)
        for v in iov:
            self.data[offset : offset + len(v)] = v
            offset += len(v)
        self.finished += 1

    async def flush(self) -> None:
        pass


class Outcomes:
    """The ``done`` callbacks of a test: what each was told, in order."""

    def __init__(self) -> None:
        self.told: dict[str, BaseException | None] = {}
        self.order: list[str] = []

    def __call__(self, name: str) -> Callable[[BaseException | None], None]:
        def done(error: BaseException | None) -> None:
            assert name not in self.told, f"{name} told twice"
            self.told[name] = error
            self.order.append(name)
        return done


def run(body: Callable[[VBD, Recorder, Outcomes], object], *, writable: bool = True,
        content: bytes | None = None, **vbd_args: object) -> None:
    async def main() -> None:
        engine = ThreadEngine(1)
        drv = Recorder(engine, content if content is not None else pattern(SIZE),
                       writable=writable)
        vbd = VBD(drv, **vbd_args)  # type: ignore[arg-type]
        try:
            await body(vbd, drv, Outcomes())  # type: ignore[misc]
        finally:
            drv.gate.set()
            await vbd.close()
            engine.close()
    asyncio.run(main())


async def until(cond: Callable[[], bool], what: str, turns: int = 1000) -> None:
    for _ in range(turns):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never: {what}")


def bufs(n: int, size: int = 4 * KiB) -> list[memoryview]:
    return [memoryview(bytearray(size)) for _ in range(n)]


# ------------------------------------------------------------------ the normal way
def test_one_pass_is_merged_and_done_is_never_called_from_start_or_kick() -> None:
    """Four adjacent reads started in one pass and kicked become one driver call; each
    done is told None from the group's task (not from start_read or kick), in order,
    and each buffer holds its own part of the disk."""
    content = pattern(SIZE)

    async def body(vbd: VBD, drv: Recorder, out: Outcomes) -> None:
        views = bufs(4)
        for i, v in enumerate(views):
            vbd.start_read(i * 4 * KiB, [v], 4 * KiB, out(f"r{i}"))
        vbd.kick()
        assert out.told == {} and drv.calls == []  # issued, not run yet
        assert vbd.stats.in_flight == 4
        await until(lambda: len(out.told) == 4, "all four told")
        assert drv.calls == [("read", 0, 16 * KiB)]
        assert out.told == {f"r{i}": None for i in range(4)}
        assert out.order == ["r0", "r1", "r2", "r3"]
        for i, v in enumerate(views):
            assert bytes(v) == content[i * 4 * KiB : (i + 1) * 4 * KiB]
        st = vbd.stats
        assert (st.submitted, st.merged, st.read_reqs, st.in_flight) == (4, 3, 4, 0)
        assert st.read_sectors == 32

    run(body)


def test_without_a_kick_the_requests_go_on_the_next_turn() -> None:
    """A transport that does not kick still gets its requests issued (merged), one turn
    of the loop later."""
    async def body(vbd: VBD, drv: Recorder, out: Outcomes) -> None:
        views = bufs(2)
        vbd.start_write(8 * KiB, [views[0]], 4 * KiB, out("w0"))
        vbd.start_write(12 * KiB, [views[1]], 4 * KiB, out("w1"))
        await until(lambda: len(out.told) == 2, "both told")
        assert drv.calls == [("write", 8 * KiB, 8 * KiB)]
        assert bytes(drv.data[8 * KiB : 16 * KiB]) == bytes(8 * KiB)

    run(body)


def test_a_batch_issues_its_requests_when_the_outermost_one_ends() -> None:
    """Inside ``with vbd.batch:`` nothing is scheduled for the next turn (a callback
    scheduled costs a turn even cancelled); the requests go, merged, when the outermost
    batch ends."""
    async def body(vbd: VBD, drv: Recorder, out: Outcomes) -> None:
        ready = asyncio.get_running_loop()._ready  # type: ignore[attr-defined]
        before = len(ready)
        with vbd.batch:
            with vbd.batch:
                vbd.start_read(0, bufs(1), 4 * KiB, out("a"))
            vbd.start_read(4 * KiB, bufs(1), 4 * KiB, out("b"))
            assert len(ready) == before  # nothing scheduled
            assert vbd.stats.in_flight == 0  # queued, not issued
        assert vbd.stats.in_flight == 2
        await until(lambda: len(out.told) == 2, "both told")
        assert drv.calls == [("read", 0, 8 * KiB)]

    run(body)


def test_writes_with_and_without_fua_are_not_merged_and_reads_mix_with_coroutines() -> None:
    """A FUA write does not join a plain one; a read started the callback way and one
    awaited by a coroutine in the same turn are merged, whichever leads."""
    content = pattern(SIZE)

    async def body(vbd: VBD, drv: Recorder, out: Outcomes) -> None:
        w = bufs(2)
        vbd.start_write(0, [w[0]], 4 * KiB, out("w0"))
        vbd.start_write(4 * KiB, [w[1]], 4 * KiB, out("w1"), fua=True)
        vbd.kick()
        await until(lambda: len(out.told) == 2, "writes told")
        assert drv.calls == [("write", 0, 4 * KiB), ("write_fua", 4 * KiB, 4 * KiB)]
        drv.calls.clear()
        # A coroutine's read first: its task leads the group, the callback one follows.
        r = bufs(2)
        task = asyncio.ensure_future(vbd.read(32 * KiB, r[0]))
        await asyncio.sleep(0)  # the coroutine has queued its read
        vbd.start_read(36 * KiB, [r[1]], 4 * KiB, out("r1"))
        await task
        await until(lambda: "r1" in out.told, "r1 told")
        assert drv.calls == [("read", 32 * KiB, 8 * KiB)]
        assert out.told["r1"] is None
        assert bytes(r[0]) + bytes(r[1]) == content[32 * KiB : 40 * KiB]

    run(body)


def test_a_failed_call_tells_each_of_its_group_and_retries_what_may_be_retried() -> None:
    """EAGAIN is retried (the request succeeds); EIO is told to every request of the
    group, as the error the coroutine would raise."""
    async def body(vbd: VBD, drv: Recorder, out: Outcomes) -> None:
        drv.failures = [errno.EAGAIN]
        vbd.start_read(0, bufs(1), 4 * KiB, out("again"))
        vbd.kick()
        await until(lambda: "again" in out.told, "retried read told", turns=100000)
        assert out.told["again"] is None and vbd.stats.retries == 1
        drv.failures = [errno.EIO]
        vbd.start_read(0, bufs(1), 4 * KiB, out("a"))
        vbd.start_read(4 * KiB, bufs(1), 4 * KiB, out("b"))
        vbd.kick()
        await until(lambda: len(out.told) == 3, "failed reads told")
        for name in ("a", "b"):
            err = out.told[name]
            assert isinstance(err, OSError) and err.errno == errno.EIO
        assert vbd.stats.read_errors == 2

    run(body, retry_interval=0.001)


def test_a_done_that_raises_is_logged_and_the_others_are_still_told(
        caplog: pytest.LogCaptureFixture) -> None:
    async def body(vbd: VBD, drv: Recorder, out: Outcomes) -> None:
        def broken(error: BaseException | None) -> None:
            raise RuntimeError("a transport's bug")
        vbd.start_read(0, bufs(1), 4 * KiB, broken)
        vbd.start_read(4 * KiB, bufs(1), 4 * KiB, out("after"))
        vbd.kick()
        await until(lambda: "after" in out.told, "the second told")
        assert out.told["after"] is None
        assert vbd.stats.in_flight == 0

    run(body)
    assert "completing a read failed" in caplog.text


def test_bad_requests_are_refused_at_once_and_queue_nothing() -> None:
    async def body(vbd: VBD, drv: Recorder, out: Outcomes) -> None:
        cases = [
            (lambda: vbd.start_read(SIZE - 512, bufs(1), 4 * KiB, out("x")), errno.EINVAL),
            (lambda: vbd.start_read(100, bufs(1), 4 * KiB, out("x")), errno.EINVAL),
            (lambda: vbd.start_read(0, bufs(1), 0, out("x")), errno.EINVAL),
            (lambda: vbd.start_write(SIZE, bufs(1), 4 * KiB, out("x")), errno.ENOSPC),
            (lambda: vbd.start_write(512, bufs(1, 100), 100, out("x")), errno.EINVAL),
        ]
        for call, code in cases:
            with pytest.raises(BlktapError) as info:
                call()
            assert info.value.errno == code
        await asyncio.sleep(0)
        assert drv.calls == [] and vbd.stats.submitted == 0 and out.told == {}

    run(body)

    async def read_only(vbd: VBD, drv: Recorder, out: Outcomes) -> None:
        with pytest.raises(BlktapError) as info:
            vbd.start_write(0, bufs(1), 4 * KiB, out("x"))
        assert info.value.errno == errno.EPERM
        await vbd.close()
        with pytest.raises(BlktapError) as info:
            vbd.start_read(0, bufs(1), 4 * KiB, out("x"))
        assert info.value.errno == errno.ESHUTDOWN

    run(read_only, writable=False)


# ------------------------------------------------------------------ cancel
def test_cancel_of_a_queued_request_drops_it_and_done_is_never_called() -> None:
    async def body(vbd: VBD, drv: Recorder, out: Outcomes) -> None:
        a = vbd.start_read(0, bufs(1), 4 * KiB, out("a"))
        vbd.start_read(4 * KiB, bufs(1), 4 * KiB, out("b"))
        assert vbd.cancel(a) is True
        vbd.kick()
        await until(lambda: "b" in out.told, "b told")
        for _ in range(5):
            await asyncio.sleep(0)
        assert "a" not in out.told
        assert drv.calls == [("read", 4 * KiB, 4 * KiB)]
        assert vbd.stats.cancelled == 1 and vbd.stats.in_flight == 0

    run(body)


def test_cancel_before_the_groups_task_starts_never_reaches_the_driver() -> None:
    """Issued (kicked) but its task has not taken a step: withdrawn, told CancelledError,
    the driver never called."""
    async def body(vbd: VBD, drv: Recorder, out: Outcomes) -> None:
        a = vbd.start_read(0, bufs(1), 4 * KiB, out("a"))
        vbd.kick()
        assert vbd.cancel(a) is False  # its done will be told
        await until(lambda: "a" in out.told, "a told")
        assert isinstance(out.told["a"], asyncio.CancelledError)
        assert drv.calls == []
        assert vbd.stats.cancelled == 1 and vbd.stats.in_flight == 0

    run(body)


def test_cancel_while_the_driver_holds_it_tells_once_the_driver_let_go() -> None:
    async def body(vbd: VBD, drv: Recorder, out: Outcomes) -> None:
        drv.gate.clear()
        a = vbd.start_read(0, bufs(1), 4 * KiB, out("a"))
        vbd.kick()
        await until(lambda: len(drv.calls) == 1, "the read under way")
        assert vbd.cancel(a) is False
        await until(lambda: "a" in out.told, "a told")
        assert isinstance(out.told["a"], asyncio.CancelledError)
        assert drv.finished == 0  # the held call was dropped, not completed
        assert vbd.stats.cancelled == 1 and vbd.stats.in_flight == 0

    run(body)


def test_cancel_of_a_merged_request_lets_the_group_finish() -> None:
    """Merged with others, a request cannot be pulled out of their driver call: cancel
    says False and done is told the call's outcome once its buffer is free; the others
    get their data."""
    content = pattern(SIZE)

    async def body(vbd: VBD, drv: Recorder, out: Outcomes) -> None:
        drv.gate.clear()
        views = bufs(3)
        reqs = [vbd.start_read(i * 4 * KiB, [views[i]], 4 * KiB, out(f"r{i}"))
                for i in range(3)]
        vbd.kick()
        await until(lambda: len(drv.calls) == 1, "the merged read under way")
        assert vbd.cancel(reqs[0]) is False and vbd.cancel(reqs[2]) is False
        await asyncio.sleep(0)
        assert out.told == {}  # the buffers are still the driver's
        drv.gate.set()
        await until(lambda: len(out.told) == 3, "all told")
        assert set(out.told.values()) == {None}
        assert bytes(views[1]) == content[4 * KiB : 8 * KiB]

    run(body)


def test_cancelling_a_groups_leader_under_way_reissues_the_others() -> None:
    """The leader of a merged group cancelled while the driver holds the call: its
    task's cancellation (the VBD's own) drops the call; the others are issued again
    and get their data."""
    content = pattern(SIZE)

    async def body(vbd: VBD, drv: Recorder, out: Outcomes) -> None:
        drv.gate.clear()
        views = bufs(2)
        a = vbd.start_read(0, [views[0]], 4 * KiB, out("a"))
        vbd.start_read(4 * KiB, [views[1]], 4 * KiB, out("b"))
        vbd.kick()
        await until(lambda: len(drv.calls) == 1, "the merged read under way")
        assert a.task is not None
        a.task.cancel()
        await until(lambda: "a" in out.told, "a told")
        assert isinstance(out.told["a"], asyncio.CancelledError)
        drv.gate.set()
        await until(lambda: "b" in out.told, "b told")
        assert out.told["b"] is None
        assert drv.calls[1:] == [("read", 4 * KiB, 4 * KiB)]
        assert bytes(views[1]) == content[4 * KiB : 8 * KiB]
        assert vbd.stats.cancelled == 1 and vbd.stats.in_flight == 0

    run(body)


# ------------------------------------------------------------------ pause, close
def test_requests_started_while_paused_wait_for_resume() -> None:
    async def body(vbd: VBD, drv: Recorder, out: Outcomes) -> None:
        await vbd.pause()
        views = bufs(2)
        vbd.start_write(0, [views[0]], 4 * KiB, out("w"))
        r = vbd.start_read(8 * KiB, [views[1]], 4 * KiB, out("r"))
        vbd.kick()
        for _ in range(5):
            await asyncio.sleep(0)
        assert out.told == {} and drv.calls == []
        assert vbd.cancel(r) is True  # held: withdrawn as if queued
        await vbd.resume(drv)
        await until(lambda: "w" in out.told, "the held write told")
        assert out.told == {"w": None}
        assert drv.calls == [("write", 0, 4 * KiB)]
        assert vbd.stats.submitted == 1

    run(body)


def test_close_fails_the_requests_a_pause_holds() -> None:
    async def body(vbd: VBD, drv: Recorder, out: Outcomes) -> None:
        await vbd.pause()
        vbd.start_read(0, bufs(1), 4 * KiB, out("r"))
        await vbd.close()
        err = out.told["r"]
        assert isinstance(err, BlktapError) and err.errno == errno.ESHUTDOWN
        assert drv.calls == []

    run(body)


def test_close_waits_for_requests_under_way() -> None:
    async def body(vbd: VBD, drv: Recorder, out: Outcomes) -> None:
        drv.gate.clear()
        vbd.start_write(0, bufs(1), 4 * KiB, out("w"))
        vbd.kick()
        await until(lambda: len(drv.calls) == 1, "the write under way")
        closing = asyncio.ensure_future(vbd.close())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not closing.done()
        drv.gate.set()
        await closing
        assert out.told == {"w": None} and drv.finished == 1

    run(body)


# ------------------------------------------------------------------ at the driver
class Kernel(Recorder):
    """A driver that takes reads and writes the callback way (as ``aio`` hands them to
    the kernel): ``start_*`` records the operation and keeps its ``done``, which the test
    calls as the engine's reaping would. ``refuse`` makes start_* say False; ``crash``
    makes it raise."""

    def __init__(self, engine: ThreadEngine, content: bytes) -> None:
        super().__init__(engine, content)
        self.started: list[tuple[str, int, Sequence[memoryview], Callable]] = []
        self.refuse = False
        self.crash = False

    def _start(self, op: str, offset: int, iov: Sequence[memoryview], done: Callable
               ) -> bool:
        if self.crash:
            raise RuntimeError("a driver bug")
        if self.refuse:
            return False
        self.started.append((op, offset, iov, done))
        return True

    def start_read(self, offset: int, iov: Sequence[memoryview], done: Callable) -> bool:
        return self._start("read", offset, iov, done)

    def start_write(self, offset: int, iov: Sequence[memoryview], done: Callable, *,
                    fua: bool = False) -> bool:
        return self._start("write_fua" if fua else "write", offset, iov, done)

    def complete(self, i: int = 0, error: BaseException | None = None) -> None:
        op, offset, iov, done = self.started.pop(i)
        if error is None:
            for v in iov:
                if op == "read":
                    v[:] = self.data[offset : offset + len(v)]
                else:
                    self.data[offset : offset + len(v)] = v
                offset += len(v)
        done(error)


def run_kernel(body: Callable[[VBD, Kernel, Outcomes], object], **vbd_args: object) -> None:
    async def main() -> None:
        engine = ThreadEngine(1)
        drv = Kernel(engine, pattern(SIZE))
        vbd = VBD(drv, **vbd_args)  # type: ignore[arg-type]
        try:
            await body(vbd, drv, Outcomes())  # type: ignore[misc]
        finally:
            while drv.started:
                drv.complete()
            await vbd.close()
            engine.close()
    asyncio.run(main())


def test_a_driver_that_takes_the_callback_way_gets_the_group_at_the_kick() -> None:
    """Three adjacent reads: one start_read at the kick itself with the merged buffers,
    no task; the driver's completion tells every request at once, in the same call."""
    content = pattern(SIZE)

    async def body(vbd: VBD, drv: Kernel, out: Outcomes) -> None:
        views = bufs(3)
        reqs = [vbd.start_read(i * 4 * KiB, [views[i]], 4 * KiB, out(f"r{i}"))
                for i in range(3)]
        vbd.kick()
        assert [(op, off, sum(len(v) for v in iov)) for op, off, iov, _ in drv.started] \
            == [("read", 0, 12 * KiB)]
        assert not vbd._group_tasks and all(r.task is None for r in reqs)
        assert vbd.cancel(reqs[0]) is False  # the kernel has it: told when it is done
        drv.complete()
        assert out.order == ["r0", "r1", "r2"] and set(out.told.values()) == {None}
        assert b"".join(bytes(v) for v in views) == content[: 12 * KiB]
        st = vbd.stats
        assert (st.merged, st.read_reqs, st.in_flight, st.cancelled) == (2, 3, 0, 0)
        assert drv.calls == []  # the coroutine read was never used

    run_kernel(body)


def test_writes_keep_their_fua_and_errors_are_told() -> None:
    async def body(vbd: VBD, drv: Kernel, out: Outcomes) -> None:
        vbd.start_write(0, [memoryview(b"A" * 4096)], 4 * KiB, out("w"), fua=True)
        vbd.kick()
        assert drv.started[0][0] == "write_fua"
        drv.complete()
        assert out.told == {"w": None} and bytes(drv.data[:4096]) == b"A" * 4096
        vbd.start_read(0, bufs(1), 4 * KiB, out("bad"))
        vbd.kick()
        drv.complete(error=OSError(errno.EIO, "media error"))
        err = out.told["bad"]
        assert isinstance(err, OSError) and err.errno == errno.EIO
        assert vbd.stats.read_errors == 1 and vbd.stats.retries == 0

    run_kernel(body)


def test_a_retryable_error_is_retried_by_the_coroutine_path() -> None:
    """EAGAIN from the driver's callback way: the group is issued again (after the retry
    interval) through the coroutine read, which succeeds."""
    content = pattern(SIZE)

    async def body(vbd: VBD, drv: Kernel, out: Outcomes) -> None:
        view = bufs(1)[0]
        vbd.start_read(8 * KiB, [view], 4 * KiB, out("r"))
        vbd.kick()
        drv.complete(error=OSError(errno.EAGAIN, "try again"))
        assert out.told == {}
        await until(lambda: "r" in out.told, "the retry told", turns=100000)
        assert out.told["r"] is None and bytes(view) == content[8 * KiB : 12 * KiB]
        assert drv.calls == [("read", 8 * KiB, 4 * KiB)]  # the retry, by coroutine
        assert vbd.stats.retries == 1 and vbd.stats.read_reqs == 1

    run_kernel(body, retry_interval=0.001)


def test_a_driver_that_declines_or_fails_to_start_gets_the_coroutine_path() -> None:
    content = pattern(SIZE)

    async def body(vbd: VBD, drv: Kernel, out: Outcomes) -> None:
        for i, how in enumerate(("refuse", "crash")):
            setattr(drv, how, True)
            view = bufs(1)[0]
            vbd.start_read(i * 4 * KiB, [view], 4 * KiB, out(how))
            vbd.kick()
            assert drv.started == []
            await until(lambda how=how: how in out.told, f"{how}: told")
            assert out.told[how] is None
            assert bytes(view) == content[i * 4 * KiB : (i + 1) * 4 * KiB]
            setattr(drv, how, False)
        assert len(drv.calls) == 2

    run_kernel(body)
