"""Adaptive polling before the event loop sleeps: the wake-up a busy disk does not pay.

When a tapdisk's loop has nothing to do it sleeps in ``epoll_wait`` and its CPU goes idle.
The next request (a client's NBD message, a guest's event channel kick, a completion from
another thread) must then wake it: the sender's system call sends an inter-processor
interrupt and the sleeper's CPU comes out of idle. In a virtual machine both are exits to
the hypervisor, and they cost more than serving a cached request: 4 KiB reads of a sparse
qcow2 at queue depth 1 over a UNIX socket, on this project's 2-CPU KVM test machine, made
16.6k round trips a second with the loop sleeping between requests and 33k with it
polling, at no more CPU per request (the idle exits cost as much as the spin).

So before a blocking wait, :class:`PollingSelector` asks the kernel again and again, with a
zero timeout, for up to a *window*; only when nothing came does it sleep. The asking is
compiled (``_poll.spin``), and holds no interpreter lock: the threads that hand the loop
their completions run meanwhile, and their wake-up of the loop ends the poll; what the poll
saw is what the loop gets (no second ``epoll_wait`` for it). The window adapts
to the traffic, as qemu's IOThread polling (``poll-max-ns``) does:

- it opens (4 us, then doubled each time, up to the maximum) after a blocking wait that
  ended with an event within twice the maximum: the event came soon, and would have come
  sooner still without the wake-up (a sleeping loop sees its peer's turnaround plus its
  own wake-up: 40-50 us at QD1 above, against about 20 us while it polls);
- it halves (down to 0) after a blocking wait longer than that: the disk is idle, or its
  peer is slow, and polling would only burn CPU (halving rather than closing at once: one
  late request in a busy stream costs a little window, not all of it);
- a poll that catches an event leaves it as it is; a wait that ended on a timer (no event)
  tells nothing and changes nothing.

A loop waits for two kinds of things, though, and they come at different speeds: for its
consumers (the next request, the guest's next kick) while no disk has requests out, and
for a disk's backend (an I/O thread, librbd) while one has. A Ceph write at queue depth 1
is both in turn: the client's next request comes 20-30 us after the reply, librbd's
completion half a millisecond after the submission. One window for both swings between
them (halved by the long wait, doubled by the short one) and spins for nothing, about
25 us a request, on the CPU the cluster's threads need. So the selector keeps a window
per kind, and asks the disks it was told of (:meth:`PollingSelector.watch`: each VBD
says whether it has requests in flight) which kind of wait begins.

An idle disk therefore never polls, and a busy one polls at most the maximum per wait. The
maximum is 32 us by default (qemu's default for an IOThread); 0 turns polling off. With a
single CPU allowed to this process nothing else can make the awaited event happen while the
loop spins, so polling stays off there whatever the setting, as it does in a build without
the C extension.
"""

from __future__ import annotations

import asyncio
import os
import select
import selectors
import time
from collections.abc import Callable
from typing import Any

from blktap.io.clock import TurnClockLoop

try:
    from blktap.io._poll import Direct, Hook
    from blktap.io._poll import spin as _spin
    from blktap.io._poll import wait as _wait
except ImportError:  # built without a C compiler: no polling (the module says why)
    _spin = _wait = None
    Direct = Hook = None

_EPOLLIN, _EPOLLOUT = select.EPOLLIN, select.EPOLLOUT

DEFAULT_MAX_US = 32
# The first window, before doubling (as qemu starts its own).
FIRST_WINDOW = 4e-6
ENV_MAX_US = "BLKTAP_POLL_MAX_US"


def max_from_env(default: int = DEFAULT_MAX_US) -> int:
    """The maximum window in microseconds: ``BLKTAP_POLL_MAX_US`` when set (for tapdisk,
    which ``tap-ctl`` starts with fixed arguments), else ``default``. ValueError for a
    value that is not a whole number of microseconds from 0 to 1000000."""
    text = os.environ.get(ENV_MAX_US)
    if text is None or not text.strip():
        return default
    return check_max(text)


def check_max(text: str | int) -> int:
    """A maximum window in microseconds, checked: 0 (off) to 1000000."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"poll window {text!r} is not a whole number of microseconds"
                         ) from None
    if not 0 <= value <= 1_000_000:
        raise ValueError(f"poll window {value} us is out of range (0 to 1000000)")
    return value


class PollingSelector(selectors.EpollSelector):
    """An epoll selector that polls for up to an adaptive window before it sleeps (the
    module's docstring says how the windows move). The counters are for statistics."""

    def __init__(self, max_us: int = DEFAULT_MAX_US) -> None:
        super().__init__()
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
        self.max_window = max_us / 1e6 if cpus > 1 and _spin is not None else 0.0
        self.window = 0.0          # waiting for consumers: no watched disk has requests out
        self.backend_window = 0.0  # waiting for a backend: a watched disk has some out
        self.poll_hits = 0      # waits a poll ended, with no sleep
        self.sleeps = 0         # waits that slept (polling or not)
        self._busy: list[Callable[[], bool]] = []
        # The receives the wait does itself (receive_into), by socket.
        self._directs: dict[int, Direct] = {}
        self._added: list[Hook] = []  # other hooks (add_hook)
        self._hooks: tuple[Hook, ...] = ()  # all of them, as the wait takes them

    @property
    def can_hook(self) -> bool:
        """Whether this selector can take hooks (:meth:`add_hook`): the C extension is
        built."""
        return _wait is not None

    def add_hook(self, hook: Hook) -> None:
        """Have the wait give ``hook`` (a compiled ``blktap.io._poll.Hook``: io/_hook.h
        says what it does) the readinesses it answers itself, until :meth:`remove_hook`.
        RuntimeError without the C extension (:attr:`can_hook`)."""
        if _wait is None:
            raise RuntimeError("hooks need the compiled wait, which was not built")
        if hook not in self._added:
            self._added.append(hook)
            self._rehook()

    @property
    def epoll_fd(self) -> int:
        """The epoll instance the wait polls (a hook that answers the readiness of a
        descriptor the loop registered turns it off and on there)."""
        return self._selector.fileno()

    def has_hook(self, hook: Hook) -> bool:
        return hook in self._added

    def remove_hook(self, hook: Hook) -> None:
        if hook in self._added:
            self._added.remove(hook)
            self._rehook()

    def _rehook(self) -> None:
        self._hooks = (*self._directs.values(), *self._added)

    def receive_into(self, fd: int, place: memoryview) -> Direct | None:
        """Have the wait receive from socket ``fd`` (registered for reading) straight
        into ``place`` (the rest of a message): a readiness of ``fd`` is then reported
        only once ``place`` is full, or the stream ends or breaks (``Direct.error``), and
        the chunks before are received with the wait's lock released, no turn of the
        loop each. The Direct says how far it got (``pos``, which the owner moves on
        when it receives some itself); :meth:`end_receive` stops it. None without the C
        extension: the owner receives every chunk itself."""
        if _wait is None:
            return None
        if fd in self._directs:
            raise RuntimeError(f"a receive into place is under way on fd {fd}")
        direct = Direct(fd, place)
        self._directs[fd] = direct
        self._rehook()
        return direct

    def end_receive(self, fd: int) -> None:
        """Stop :meth:`receive_into` on ``fd`` (if under way) and let go of its place."""
        direct = self._directs.pop(fd, None)
        if direct is not None:
            direct.release()
            self._rehook()

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        key = super().unregister(fileobj)
        if self._directs:  # a socket no longer watched (closed, perhaps reused next)
            self.end_receive(key.fd)
        return key

    def watch(self, busy: Callable[[], bool]) -> Callable[[], None]:
        """Ask ``busy`` before each wait whether it is for a backend (True: requests are
        in flight); returns the function that stops asking."""
        self._busy.append(busy)

        def unwatch() -> None:
            if busy in self._busy:
                self._busy.remove(busy)
        return unwatch

    def stats(self) -> dict[str, float | int]:
        """What ``tap-ctl stats`` shows as ``loop`` (docs/operations.md, "Polling")."""
        return {"poll_max_us": round(self.max_window * 1e6),
                "poll_window_us": round(self.window * 1e6, 1),
                "poll_backend_window_us": round(self.backend_window * 1e6, 1),
                "poll_hits": self.poll_hits, "sleeps": self.sleeps}

    def select(self, timeout: float | None = None
               ) -> list[tuple[selectors.SelectorKey, int]]:
        if self._hooks:
            return self._select_hooked(timeout)
        if timeout is not None and timeout <= 0:
            return super().select(timeout)
        if not self.max_window:
            self.sleeps += 1
            return super().select(timeout)
        clock = time.monotonic
        started = clock()
        backend = self._backend()
        window = self.backend_window if backend else self.window
        if window:
            assert _spin is not None  # (max_window is 0 without it)
            found, spent = _spin(self._selector.fileno(),
                                 window if timeout is None else min(window, timeout),
                                 max(len(self._fd_to_key), 1))
            if found:
                self.poll_hits += 1
                return self._ready(found)
            if found is None:  # epoll_wait failed there: the selector's own call says why
                events = super().select(0)
                if events:
                    self.poll_hits += 1
                    return events
            if timeout is not None:
                if timeout <= window:
                    return []  # a timer is due: the loop runs it
                timeout = max(timeout - spent, 0.0)
        self.sleeps += 1
        events = super().select(timeout)
        if events:
            self._adapt(backend, window, clock() - started)
        return events

    def _backend(self) -> bool:
        """Whether the coming wait is for a backend (a watched disk has requests out)."""
        for busy in self._busy:
            if busy():
                return True
        return False

    def _adapt(self, backend: bool, window: float, waited: float) -> None:
        """Move the window after a sleep that ended with an event ``waited`` seconds
        after the wait began."""
        if waited > 2 * self.max_window:
            window = window / 2 if window > FIRST_WINDOW else 0.0
        elif waited > window:
            window = min(self.max_window, window * 2 if window else FIRST_WINDOW)
        else:
            return
        if backend:
            self.backend_window = window
        else:
            self.window = window

    def _select_hooked(self, timeout: float | None
                       ) -> list[tuple[selectors.SelectorKey, int]]:
        """select() with hooks (receives into place under way, :meth:`receive_into`, or
        others, :meth:`add_hook`): one compiled wait that polls, sleeps, and lets the
        hooks answer their readinesses."""
        assert _wait is not None
        backend = self._backend() if self.max_window else False
        window = (self.backend_window if backend else self.window) if self.max_window else 0.0
        found, _spent, slept, waited = _wait(
            self._selector.fileno(), window, -1.0 if timeout is None else max(timeout, 0.0),
            # (room for the events of the descriptors a hook watches for itself)
            len(self._fd_to_key) + 8, self._hooks)
        if found is None:  # epoll_wait failed there: the selector's own call says why
            return super().select(0)
        if slept:
            self.sleeps += 1
            if found and self.max_window:
                self._adapt(backend, window, window + waited)
        elif found:
            self.poll_hits += 1
        return self._ready(found)

    def _ready(self, found: list[tuple[int, int]]
               ) -> list[tuple[selectors.SelectorKey, int]]:
        """The events the poll saw, as EpollSelector.select makes them (an error or a
        hang-up counts as both readable and writable)."""
        ready = []
        keys = self._fd_to_key
        for fd, event in found:
            key = keys.get(fd)
            if key is not None:
                events = 0
                if event & ~_EPOLLIN:
                    events |= selectors.EVENT_WRITE
                if event & ~_EPOLLOUT:
                    events |= selectors.EVENT_READ
                ready.append((key, events & key.events))
        return ready


def polling_loop_factory(max_us: int) -> Callable[[], TurnClockLoop]:
    """The event loop factory of a process serving disks (tapdisk, ``blktap serve``): a
    :class:`TurnClockLoop` on a :class:`PollingSelector` with this maximum window."""
    return lambda: TurnClockLoop(PollingSelector(max_us))


def watch_busy(loop: asyncio.AbstractEventLoop, busy: Callable[[], bool]
               ) -> Callable[[], None]:
    """Tell ``loop``'s selector, where it polls this way, to ask ``busy`` whether a wait
    is for a backend (:meth:`PollingSelector.watch`); returns the function that stops
    it (one that does nothing on another loop)."""
    selector = getattr(loop, "_selector", None)  # asyncio.SelectorEventLoop's own
    if isinstance(selector, PollingSelector):
        return selector.watch(busy)
    return _nothing


def _nothing() -> None:
    pass


def loop_stats() -> dict[str, float | int] | None:
    """The polling statistics of the event loop running in this thread, or None when it
    does not poll this way (no running loop, or another selector)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    selector = getattr(loop, "_selector", None)  # asyncio.SelectorEventLoop's own
    return selector.stats() if isinstance(selector, PollingSelector) else None


def add_loop_stats(stats: dict) -> dict:
    """``stats`` (a VBD's, for ``tap-ctl stats`` or the metrics) with the loop's polling
    statistics as ``loop``, when this thread's loop polls."""
    loop = loop_stats()
    if loop is not None:
        stats["loop"] = loop
    return stats
