"""The data path's clock (io/clock.py): requests stamped with the loop's turn time instead
of a clock reading each, and periodic checks timed by a thread instead of a timer armed in
the loop (each costs clock readings, which a PV dom0 without a vDSO clock pays as system
calls)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from blktap.io import ThreadEngine
from blktap.io.clock import Ticker, TurnClockLoop, turn_clock
from blktap.tapdisk.drivers import open_stack
from blktap.tapdisk.vbd import VBD


def run_on_turn_clock_loop(coro_fn) -> object:  # noqa: ANN001
    with asyncio.Runner(loop_factory=TurnClockLoop) as runner:
        return runner.run(coro_fn())


def ticker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "blktap-ticker"]


def wait_for_no_ticker_thread(limit: float = 5.0) -> None:
    end = time.monotonic() + limit
    while ticker_threads() and time.monotonic() < end:
        time.sleep(0.01)
    assert not ticker_threads()


def test_turn_clock_is_the_time_the_turn_woke_up() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        clock = turn_clock(loop)
        before = clock()
        assert before == loop.turn_time  # type: ignore[attr-defined]
        assert before <= time.monotonic()
        await asyncio.sleep(0.05)
        after = clock()
        assert after - before >= 0.05
        assert clock() == after  # no reading of its own: the same until the next turn
    run_on_turn_clock_loop(main)


def test_turn_clock_of_another_loop_is_the_monotonic_clock() -> None:
    async def main() -> None:
        assert turn_clock(asyncio.get_running_loop()) is time.monotonic
    asyncio.run(main())


def test_ticker_calls_on_the_loops_thread_until_cancelled() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        threads: list[int] = []
        tick = Ticker.of(loop).every(0.01, lambda: threads.append(threading.get_ident()))
        assert Ticker.of(loop) is Ticker.of(loop)
        for _ in range(500):
            await asyncio.sleep(0.01)
            if len(threads) >= 3:
                break
        assert len(threads) >= 3
        assert set(threads) == {threading.get_ident()}
        assert len(ticker_threads()) == 1
        tick.cancel()
        tick.cancel()  # idempotent
        seen = len(threads)
        await asyncio.sleep(0.05)
        assert len(threads) <= seen + 1  # (one already handed to the loop may still run)
        await asyncio.get_running_loop().run_in_executor(None, wait_for_no_ticker_thread)
    run_on_turn_clock_loop(main)


def test_ticker_keeps_one_thread_for_several_checks_and_ends_with_the_last() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        fast: list[float] = []
        slow: list[float] = []
        a = Ticker.of(loop).every(0.01, lambda: fast.append(loop.time()))
        b = Ticker.of(loop).every(0.2, lambda: slow.append(loop.time()))
        await asyncio.sleep(0.3)
        assert len(ticker_threads()) == 1
        assert len(fast) > len(slow) >= 1
        a.cancel()
        await asyncio.sleep(0.05)
        assert len(ticker_threads()) == 1  # b still wants it
        b.cancel()
        await loop.run_in_executor(None, wait_for_no_ticker_thread)
        c = Ticker.of(loop).every(0.01, lambda: fast.append(0.0))  # a new thread
        n = len(fast)
        for _ in range(500):
            await asyncio.sleep(0.01)
            if len(fast) > n:
                break
        assert len(fast) > n
        c.cancel()
        await loop.run_in_executor(None, wait_for_no_ticker_thread)
    asyncio.run(main())


def test_a_closed_loop_ends_its_ticker_thread() -> None:
    loop = asyncio.new_event_loop()
    Ticker.of(loop).every(0.01, lambda: None)  # never cancelled
    assert len(ticker_threads()) == 1
    loop.close()
    wait_for_no_ticker_thread()


def test_a_ticker_does_not_keep_its_loop_alive() -> None:
    """The registry of tickers holds loops weakly: a closed loop that nobody holds is
    freed with its ticker, its check registered or not."""
    import gc
    import weakref

    refs = []
    for cancel in (True, False):
        loop = asyncio.new_event_loop()
        tick = Ticker.of(loop).every(0.01, lambda: None)
        if cancel:
            tick.cancel()
        refs.append(weakref.ref(loop))
        loop.close()
        del loop, tick
    wait_for_no_ticker_thread()
    gc.collect()
    assert [r() for r in refs] == [None, None]
    assert not any(r() in Ticker._of for r in refs)


def test_ticker_refuses_a_period_that_is_not_positive() -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError):
            Ticker.of(loop).every(0, lambda: None)
    finally:
        loop.close()


def test_vbd_requests_read_no_clock_of_their_own_on_a_turn_clock_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every clock reading while requests are served is the loop's own one a turn (the
    VBD stamps starts, finishes and progress with the turn time), and the latency
    histograms still count every request."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    reads = {"all": 0, "loop": 0}
    real = time.monotonic

    def counted() -> float:
        reads["all"] += 1
        return real()

    class CountingLoop(TurnClockLoop):
        def time(self) -> float:
            reads["loop"] += 1
            return super().time()

    async def main() -> None:
        engine = ThreadEngine(threads=2)
        try:
            driver = await engine.call(open_stack, engine, f"aio:{path}", writable=True)
            monkeypatch.setattr(time, "monotonic", counted)  # before the VBD takes a clock
            vbd = VBD(driver)
            buf = memoryview(bytearray(4096))
            reads.update(all=0, loop=0)
            try:
                for i in range(50):
                    await vbd.write(i * 4096, buf)
                    await vbd.read(i * 4096, buf)
            finally:
                monkeypatch.setattr(time, "monotonic", real)
            # the ticker thread may have read the clock meanwhile: allow its few readings
            assert reads["all"] - reads["loop"] <= 5, reads
            assert vbd.latency.read.count == 50 and vbd.latency.write.count == 50
            assert vbd.latency.read.sum > 0  # stamped by turn: waits between turns count
            await vbd.close()
        finally:
            engine.close()

    with asyncio.Runner(loop_factory=CountingLoop) as runner:
        runner.run(main())
