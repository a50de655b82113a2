"""Clock readings and periodic checks for a data path that answers in few system calls.

Where the kernel has no vDSO clock (a PV dom0 without a stable TSC: the Xen testbed's TCG
dom0, some older hosts), every ``clock_gettime`` is a system call through Xen, and an
asyncio loop reads the clock up to three times a turn while any timer is armed: once to
compute the select timeout, once inside ``epoll.poll`` for the deadline of a wait that has
a timeout, once for the timers due. With no timer armed it reads it once (the due time,
after the wait). Two things here keep a data-path process at that one reading:

- :class:`TurnClockLoop`, the event loop of tapdisk and ``blktap serve``, keeps the clock
  reading of the turn it is in (:func:`turn_clock`), so that a request's start and finish
  cost no reading of their own: each is stamped with the time its turn woke up.
- :class:`Ticker` runs periodic checks (the VBD's watchdog) from a thread that sleeps
  between them and hands each check to the loop, instead of a timer that would stay armed
  in the loop for as long as the disk is open.

On a host with a vDSO clock both are merely a little cheaper than what they replace.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
import weakref
from collections.abc import Callable


class TurnClockLoop(asyncio.SelectorEventLoop):
    """A selector event loop that remembers its last clock reading. asyncio reads the
    clock once per turn after the wait (the due time of timers), before running the
    turn's callbacks; :attr:`turn_time` is that reading while they run."""

    def __init__(self, selector: object = None) -> None:
        self.turn_time = time.monotonic()
        super().__init__(selector)  # type: ignore[arg-type]

    def time(self) -> float:
        self.turn_time = now = time.monotonic()
        return now

    def turn_clock(self) -> float:
        return self.turn_time


def turn_clock(loop: asyncio.AbstractEventLoop) -> Callable[[], float]:
    """A clock for stamping what happens in ``loop``'s callbacks: on a
    :class:`TurnClockLoop`, the time its current turn woke up (no system call); on any
    other loop, :func:`time.monotonic`."""
    if isinstance(loop, TurnClockLoop):
        return loop.turn_clock
    return time.monotonic


class Tick:
    """One periodic check registered with a :class:`Ticker`; :meth:`cancel` ends it."""

    __slots__ = ("fn", "period", "cancelled", "_ticker")

    def __init__(self, ticker: Ticker, period: float, fn: Callable[[], None]) -> None:
        self._ticker = ticker
        self.period = period
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._ticker._removed(self)

    def _run(self) -> None:  # on the loop's thread
        if not self.cancelled:
            self.fn()


class Ticker:
    """Calls functions on one event loop's thread every so often, timed by a thread of
    its own (see the module's docstring for why not a timer of the loop). The thread
    exists while checks are registered; it only sleeps and hands each due check to the
    loop (``call_soon_threadsafe``), which runs it. One per loop: :meth:`of`."""

    _of: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Ticker] = (
        weakref.WeakKeyDictionary())

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weak: the registry's value must not keep its key (the loop) alive.
        self._loop = weakref.ref(loop)
        self._cond = threading.Condition()
        self._due: list[tuple[float, int, Tick]] = []  # heap of (when, seq, tick)
        self._seq = itertools.count()
        self._live = 0
        self._thread: threading.Thread | None = None

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Ticker:
        ticker = cls._of.get(loop)
        if ticker is None:
            ticker = cls._of[loop] = cls(loop)
        return ticker

    def every(self, period: float, fn: Callable[[], None]) -> Tick:
        """Call ``fn()`` on the loop's thread every ``period`` seconds (the first time a
        period from now) until the returned :class:`Tick` is cancelled."""
        if period <= 0:
            raise ValueError(f"period must be positive, not {period}")
        tick = Tick(self, period, fn)
        with self._cond:
            heapq.heappush(self._due, (time.monotonic() + period, next(self._seq), tick))
            self._live += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="blktap-ticker",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()
        return tick

    def _removed(self, tick: Tick) -> None:
        with self._cond:
            self._live = max(0, self._live - 1)
            self._cond.notify()  # the last one gone: the thread ends

    def _run(self) -> None:
        with self._cond:
            while self._live > 0:
                while self._due and self._due[0][2].cancelled:
                    heapq.heappop(self._due)
                if not self._due:
                    break
                wait = self._due[0][0] - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                when, _, tick = heapq.heappop(self._due)
                if not self._hand_over(tick):  # the loop is gone: nobody is left to check
                    break
                # The next one a period after this one was due, or a period from now if
                # this thread was held up past that (no burst of checks to catch up).
                now, when = time.monotonic(), when + tick.period
                heapq.heappush(self._due, (when if when > now else now + tick.period,
                                           next(self._seq), tick))
            self._due.clear()
            self._live = 0
            self._thread = None

    def _hand_over(self, tick: Tick) -> bool:
        """Give ``tick`` to its loop to run; False when the loop is closed or gone."""
        loop = self._loop()  # (a local that ends here: the sleeping thread holds no loop)
        if loop is None:
            return False
        try:
            loop.call_soon_threadsafe(tick._run)
        except RuntimeError:
            return False
        return True
