"""The event loop's adaptive polling (io/polling.py): how the window opens, holds and
closes, the limits of the setting, and that the processes serving disks run on it.

The window's moves are tested with events whose timing is certain in the direction that
matters (data already there: sooner than any window; data written 20 ms later: later than
twice any default window), never with a timing assert."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import select
import selectors
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from blktap.io import ThreadEngine, polling
from blktap.io.clock import TurnClockLoop
from blktap.io.polling import FIRST_WINDOW, PollingSelector, loop_stats, polling_loop_factory
from blktap.tapdisk.drivers import open_stack
from blktap.tapdisk.vbd import VBD
from conftest import tool

MiB = 1 << 20
two_cpus = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                              reason="polling is off with one CPU")


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


def drain(sock: socket.socket) -> None:
    while True:
        try:
            if not sock.recv(4096):
                return
        except BlockingIOError:
            return


# ------------------------------------------------------------------------------ setting
@pytest.mark.parametrize("text,value", [("0", 0), ("32", 32), (" 100 ", 100),
                                        ("1000000", 1_000_000)])
def test_check_max_takes_whole_microseconds(text: str, value: int) -> None:
    assert polling.check_max(text) == value


@pytest.mark.parametrize("text", ["-1", "1000001", "3.5", "fast", ""])
def test_check_max_refuses_the_rest(text: str) -> None:
    with pytest.raises(ValueError, match="poll window"):
        polling.check_max(text)


def test_max_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(polling.ENV_MAX_US, raising=False)
    assert polling.max_from_env() == polling.DEFAULT_MAX_US == 32
    monkeypatch.setenv(polling.ENV_MAX_US, "")
    assert polling.max_from_env() == 32
    monkeypatch.setenv(polling.ENV_MAX_US, "7")
    assert polling.max_from_env() == 7
    monkeypatch.setenv(polling.ENV_MAX_US, "lots")
    with pytest.raises(ValueError, match="lots"):
        polling.max_from_env()


def test_one_cpu_never_polls(monkeypatch: pytest.MonkeyPatch, pair) -> None:
    """With one CPU nothing else can make the event happen while the loop spins."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    sel = PollingSelector(32)
    a, b = pair
    sel.register(a, selectors.EVENT_READ)
    for _ in range(5):
        b.send(b"x")
        assert sel.select(None)
        drain(a)
    assert sel.max_window == 0 and sel.window == 0
    assert sel.stats() == {"poll_max_us": 0, "poll_window_us": 0.0,
                           "poll_backend_window_us": 0.0, "poll_hits": 0,
                           "sleeps": 5}  # (each wait slept: counted all the same)
    sel.close()


@pytest.mark.parametrize("why", ["no compiled poll", "maximum 0"])
def test_off_never_polls(why: str, monkeypatch: pytest.MonkeyPatch, pair) -> None:
    """A maximum of 0 turns polling off; so does a build without the C extension (a poll
    holding the interpreter lock would keep the I/O threads' completions waiting). The
    wait still counts as a sleep."""
    if why == "no compiled poll":
        monkeypatch.setattr(polling, "_spin", None)
    sel = PollingSelector(0 if why == "maximum 0" else 32)
    a, b = pair
    sel.register(a, selectors.EVENT_READ)
    b.send(b"x")
    assert sel.select(None)
    assert sel.max_window == 0 and sel.window == 0 and sel.poll_hits == 0
    assert sel.sleeps == 1
    sel.close()


# ------------------------------------------------------------------------------ the window
@two_cpus
def test_window_opens_on_a_quick_event_and_holds_while_polls_catch_events(pair) -> None:
    sel = PollingSelector(32)
    a, b = pair
    key = sel.register(a, selectors.EVENT_READ)
    b.send(b"x")  # already there: sooner than any window
    assert sel.select(None) == [(key, selectors.EVENT_READ)]
    assert sel.window == FIRST_WINDOW and sel.sleeps == 1 and sel.poll_hits == 0
    # While data is there the poll finds it at once: the window stays.
    for _ in range(3):
        assert sel.select(None)
    assert sel.window == FIRST_WINDOW and sel.poll_hits == 3 and sel.sleeps == 1
    drain(a)
    sel.close()


@two_cpus
def test_window_doubles_after_a_miss_and_stops_at_the_maximum(pair) -> None:
    """A poll that misses, then an event within twice the maximum: the window doubles, up
    to the maximum. (A 100 ms maximum, so that events 20-120 ms away are certainly past
    the window and within twice the maximum.)"""
    sel = PollingSelector(100_000)
    a, b = pair
    sel.register(a, selectors.EVENT_READ)

    def late_event(delay: float) -> None:
        timer = threading.Timer(delay, b.send, args=(b"x",))
        timer.start()
        assert sel.select(None)
        timer.join()
        drain(a)

    sel.window = FIRST_WINDOW
    late_event(0.02)
    assert sel.window == 2 * FIRST_WINDOW
    late_event(0.02)
    assert sel.window == 4 * FIRST_WINDOW
    sel.window = 0.05
    late_event(0.12)
    assert sel.window == sel.max_window == 0.1  # not 0.1 s doubled
    assert sel.poll_hits == 0 and sel.sleeps == 3
    sel.close()


@two_cpus
def test_window_halves_when_the_event_comes_late_and_closes_in_the_end(pair) -> None:
    sel = PollingSelector(32)
    a, b = pair
    sel.register(a, selectors.EVENT_READ)
    sel.window = sel.max_window
    windows = []
    for _ in range(5):
        late = threading.Timer(0.02, b.send, args=(b"x",))  # far past twice the maximum
        late.start()
        assert sel.select(None)
        late.join()
        drain(a)
        windows.append(sel.window)
    assert windows[0] == pytest.approx(sel.max_window / 2)
    assert windows[1] == pytest.approx(sel.max_window / 4)
    assert windows[2] == pytest.approx(sel.max_window / 8)  # 4 us: the first window
    assert windows[3] == 0 and windows[4] == 0
    assert sel.sleeps == 5 and sel.poll_hits == 0
    sel.close()


@two_cpus
def test_waits_for_a_backend_and_for_consumers_keep_a_window_each(pair) -> None:
    """A Ceph write at QD1 in miniature: the consumer's next request comes at once, the
    backend's completion late. The consumers' window opens and stays; the backend's
    closes; neither drags the other (one window would swing between them)."""
    sel = PollingSelector(32)
    a, b = pair
    sel.register(a, selectors.EVENT_READ)
    in_flight = [False]
    unwatch = sel.watch(lambda: in_flight[0])
    sel.backend_window = sel.max_window
    backend_windows = []
    for _ in range(5):
        in_flight[0] = False  # waiting for the next request: it is there already
        b.send(b"r")
        assert sel.select(None)
        drain(a)
        in_flight[0] = True  # the request went to the backend: it answers late
        late = threading.Timer(0.02, b.send, args=(b"c",))
        late.start()
        assert sel.select(None)
        late.join()
        drain(a)
        backend_windows.append(sel.backend_window)
    assert sel.window == FIRST_WINDOW  # opened by the first quick event, held by hits
    assert backend_windows[:3] == pytest.approx(
        [sel.max_window / 2, sel.max_window / 4, sel.max_window / 8])
    assert backend_windows[3:] == [0.0, 0.0]
    assert sel.poll_hits == 4 and sel.sleeps == 6
    stats = sel.stats()
    assert stats["poll_window_us"] == 4.0 and stats["poll_backend_window_us"] == 0.0
    # Unwatched, a wait is for consumers again.
    unwatch()
    unwatch()  # (twice is harmless)
    late = threading.Timer(0.02, b.send, args=(b"x",))
    late.start()
    assert sel.select(None)
    late.join()
    drain(a)
    assert sel.window == 0.0 and sel.backend_window == 0.0
    sel.close()


@two_cpus
def test_a_timer_due_during_the_poll_ends_it_without_changing_the_window(
        pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """The poll stops at the loop's timeout when a timer is due before the window ends."""
    asked = []

    def spin(epfd: int, seconds: float, maxevents: int) -> tuple[list, float]:
        asked.append(seconds)
        return [], seconds

    monkeypatch.setattr(polling, "_spin", spin)
    sel = PollingSelector(1_000_000)
    a, _ = pair
    sel.register(a, selectors.EVENT_READ)
    sel.window = 0.5
    assert sel.select(0.01) == []
    assert asked == [0.01]
    assert sel.window == 0.5 and sel.sleeps == 0
    # A wait that ends on its timeout tells nothing either.
    sel.window = 0.0
    assert sel.select(0.001) == []
    assert sel.window == 0.0 and sel.sleeps == 1
    sel.close()


@pytest.mark.skipif(polling._spin is None, reason="built without the C extension")
def test_spin_reports_what_it_saw(pair) -> None:
    a, b = pair
    ep = select.epoll()
    ep.register(a.fileno(), select.EPOLLIN)
    ep.register(b.fileno(), select.EPOLLOUT)
    try:
        ep.modify(b.fileno(), 0)
        found, spent = polling._spin(ep.fileno(), 0.002, 4)
        assert found == [] and spent >= 0.002  # nothing came: the whole window
        b.send(b"x")
        found, spent = polling._spin(ep.fileno(), 30.0, 4)
        assert found == [(a.fileno(), select.EPOLLIN)] and spent < 30.0
        ep.modify(b.fileno(), select.EPOLLOUT)
        found, _ = polling._spin(ep.fileno(), 30.0, 4)
        assert sorted(found) == sorted([(a.fileno(), select.EPOLLIN),
                                        (b.fileno(), select.EPOLLOUT)])
        found, _ = polling._spin(ep.fileno(), 30.0, 1)  # no more than asked for
        assert len(found) == 1
        assert sorted(ep.poll(0)) == sorted(found + [ev for ev in
                                                     [(a.fileno(), select.EPOLLIN),
                                                      (b.fileno(), select.EPOLLOUT)]
                                                     if ev not in found])
    finally:
        ep.close()
    with pytest.raises(ValueError):
        polling._spin(-1, 0.001, 1)
    with pytest.raises(ValueError):
        polling._spin(0, 0.001, 0)
    with pytest.raises(TypeError):
        polling._spin(1, 0.001)


def test_events_the_poll_saw_are_the_selectors(pair) -> None:
    """What the poll hands over is what EpollSelector.select would have made of it: the
    registered key, the mask cut to what it asked for, a hang-up as readable."""
    a, b = pair
    sel = PollingSelector(1_000_000)
    ka = sel.register(a, selectors.EVENT_READ, "a")
    kb = sel.register(b, selectors.EVENT_READ | selectors.EVENT_WRITE, "b")
    ready = sel._ready([(a.fileno(), select.EPOLLIN), (b.fileno(), select.EPOLLOUT),
                        (999, select.EPOLLIN)])
    assert ready == [(ka, selectors.EVENT_READ), (kb, selectors.EVENT_WRITE)]
    assert sel._ready([(a.fileno(), select.EPOLLHUP)]) == [(ka, selectors.EVENT_READ)]
    sel.close()


@two_cpus
@pytest.mark.skipif(polling._spin is None, reason="built without the C extension")
def test_a_poll_that_catches_an_event_hands_it_over(pair) -> None:
    a, b = pair
    sel = PollingSelector(1_000_000)
    key = sel.register(a, selectors.EVENT_READ)
    sel.window = 1.0
    b.send(b"x")
    assert sel.select(None) == [(key, selectors.EVENT_READ)]
    assert sel.poll_hits == 1 and sel.sleeps == 0
    sel.close()


@pytest.mark.skipif(polling._spin is None, reason="built without the C extension")
def test_spin_lets_other_threads_run(pair) -> None:
    """The interpreter lock is free while the loop polls: a thread that needs it (as an I/O
    thread handing back a completion does) runs, and what it sends ends the poll."""
    a, b = pair
    ep = select.epoll()
    ep.register(a.fileno(), select.EPOLLIN)

    def worker() -> None:
        total = sum(i * i for i in range(10_000))  # Python: needs the lock
        b.send(total.to_bytes(8, "big"))

    thread = threading.Thread(target=worker)
    try:
        thread.start()
        found, spent = polling._spin(ep.fileno(), 60.0, 1)
        assert found and spent < 60.0  # with the lock held it would spin 60 s
    finally:
        thread.join()
        ep.close()


needs_c = pytest.mark.skipif(polling._wait is None, reason="built without the C extension")


def _sender(sock: socket.socket, chunks: list[bytes], pause: float = 0.005
            ) -> threading.Thread:
    """A thread that sends ``chunks`` one at a time, ``pause`` apart (Python: it needs
    the interpreter lock, which a wait must not hold)."""
    def send() -> None:
        for chunk in chunks:
            threading.Event().wait(pause)
            sock.sendall(chunk)
    thread = threading.Thread(target=send)
    thread.start()
    return thread


@needs_c
@pytest.mark.parametrize("window", [0.0, 0.001])
def test_wait_receives_a_place_chunk_by_chunk_and_reports_it_once_full(pair,
                                                                       window: float) -> None:
    """wait() receives each chunk into the Direct's place itself and reports the socket
    only once the place is full; what follows stays in the socket for the loop."""
    a, b = pair
    ep = select.epoll()
    ep.register(a.fileno(), select.EPOLLIN)
    place = bytearray(100)
    direct = polling.Direct(a.fileno(), memoryview(place)[10:])
    payload = bytes(range(90))
    thread = _sender(b, [payload[:30], payload[30:60], payload[60:] + b"next"])
    try:
        found, spent, slept, _waited = polling._wait(ep.fileno(), window, 30.0, 4, [direct])
        assert found == [(a.fileno(), select.EPOLLIN)] and spent < 30.0 and slept
        assert direct.pos == direct.length == 90 and place[10:] == payload
        assert place[:10] == bytes(10)
        thread.join()
        # Full: reported again, nothing more received into it.
        found, _, _, _ = polling._wait(ep.fileno(), window, 30.0, 4, (direct,))
        assert found == [(a.fileno(), select.EPOLLIN)] and direct.pos == 90
        assert a.recv(10) == b"next"
    finally:
        thread.join()
        ep.close()


@needs_c
def test_wait_reports_other_sockets_at_once_and_stops_at_its_timeout(pair) -> None:
    a, b = pair
    c, d = socket.socketpair()
    ep = select.epoll()
    ep.register(a.fileno(), select.EPOLLIN)
    ep.register(c.fileno(), select.EPOLLIN)
    direct = polling.Direct(a.fileno(), bytearray(100))
    try:
        b.send(b"x" * 10)
        found, _, slept, _ = polling._wait(ep.fileno(), 0.0, 0.02, 4, [direct])
        assert found == [] and slept and direct.pos == 10  # received, and timed out
        found, _, slept, _ = polling._wait(ep.fileno(), 0.0, 0.0, 4, [direct])
        assert found == [] and not slept  # a zero timeout: one look, no sleep
        d.send(b"y")
        b.send(b"x" * 5)
        found, _, _, _ = polling._wait(ep.fileno(), 0.0, 30.0, 4, [direct])
        assert found == [(c.fileno(), select.EPOLLIN)] and direct.pos == 15
        found, _, _, _ = polling._wait(ep.fileno(), 0.0, 30.0, 4, [])  # none: plain wait
        assert found == [(c.fileno(), select.EPOLLIN)]
    finally:
        ep.close()
        c.close()
        d.close()


@needs_c
def test_wait_hands_the_end_of_the_stream_and_errors_to_the_loop(pair) -> None:
    """A place the stream ends in, or a receive that fails there, is reported to the
    loop at once, the error kept in the Direct (the socket tells it only once)."""
    a, b = pair
    ep = select.epoll()
    ep.register(a.fileno(), select.EPOLLIN)
    try:
        direct = polling.Direct(a.fileno(), bytearray(100))
        b.send(b"x" * 10)
        b.shutdown(socket.SHUT_WR)
        found, _, _, _ = polling._wait(ep.fileno(), 0.0, 30.0, 4, [direct])
        assert len(found) == 1 and found[0][0] == a.fileno()
        assert found[0][1] & select.EPOLLIN and direct.pos == 10 and direct.error == 0
        assert a.recv(1) == b""  # the loop's own receive sees the end
    finally:
        ep.close()
    # A peer that closes with bytes of ours unread resets the stream (ECONNRESET).
    c, d = socket.socketpair()
    ep = select.epoll()
    ep.register(c.fileno(), select.EPOLLIN)
    try:
        direct = polling.Direct(c.fileno(), bytearray(100))
        c.send(b"never read")
        d.close()
        found, _, _, _ = polling._wait(ep.fileno(), 0.0, 30.0, 4, [direct])
        assert [fd for fd, _ in found] == [c.fileno()]
        assert direct.error == errno.ECONNRESET and direct.pos == 0
    finally:
        ep.close()
        c.close()


@needs_c
def test_wait_and_direct_refuse_bad_arguments(pair) -> None:
    a, _ = pair
    ep = select.epoll()
    try:
        direct = polling.Direct(a.fileno(), bytearray(8))
        with pytest.raises(ValueError):
            direct.pos = 9  # past the place
        with pytest.raises(ValueError):
            direct.pos = -1
        direct.pos = 8
        with pytest.raises(TypeError):
            polling._wait(ep.fileno(), 0.0, 0.0, 4, [object()])
        with pytest.raises(TypeError):
            polling._wait(ep.fileno(), 0.0, 0.0, 4, 5)
        with pytest.raises(TypeError):
            polling._wait(ep.fileno(), 0.0, 0.0, 4)
        with pytest.raises(ValueError):
            polling._wait(-1, 0.0, 0.0, 4, [])
        with pytest.raises(ValueError):
            polling._wait(ep.fileno(), 0.0, 0.0, 0, [])
        direct.release()
        direct.release()  # (twice: nothing more to let go of)
        assert direct.length == 0
        with pytest.raises(TypeError):  # released: its place is gone
            polling._wait(ep.fileno(), 0.0, 0.0, 4, [direct])
        with pytest.raises((TypeError, BufferError)):
            polling.Direct(a.fileno(), b"read-only")
        with pytest.raises(ValueError):
            polling.Direct(-1, bytearray(8))
        held = memoryview(bytearray(8))
        direct = polling.Direct(a.fileno(), held)
        with pytest.raises(BufferError):  # the place is held while the Direct is
            held.release()
        direct.release()
        held.release()
    finally:
        ep.close()


@needs_c
def test_the_selector_receives_into_place_until_told_to_stop(pair) -> None:
    a, b = pair
    sel = PollingSelector(32)
    key = sel.register(a, selectors.EVENT_READ)
    place = bytearray(64)
    direct = sel.receive_into(a.fileno(), memoryview(place))
    assert direct is not None
    with pytest.raises(RuntimeError):  # one at a time per socket
        sel.receive_into(a.fileno(), memoryview(bytearray(1)))
    b.send(b"a" * 40)
    assert sel.select(0.01) == [] and direct.pos == 40
    b.send(b"b" * 30)
    assert sel.select(None) == [(key, selectors.EVENT_READ)]
    assert place == b"a" * 40 + b"b" * 24 and direct.pos == 64
    sel.end_receive(a.fileno())
    assert direct.length == 0  # let go of
    assert sel.select(0) == [(key, selectors.EVENT_READ)]  # the rest is the loop's
    assert a.recv(100) == b"b" * 6
    # Unregistering the socket (it closes, its number may come back) stops it too.
    direct = sel.receive_into(a.fileno(), memoryview(bytearray(8)))
    sel.unregister(a)
    assert direct is not None and direct.length == 0 and not sel._hooks
    sel.end_receive(a.fileno())  # (nothing under way: nothing to do)
    sel.close()


@needs_c
def test_hooks_are_compiled_and_added_once(pair) -> None:
    """Hook, the base of what the wait calls, is made only by its compiled subtypes; the
    selector takes a hook once, with its Directs, and lets it go."""
    from blktap.io import _poll

    a, _ = pair
    with pytest.raises(TypeError):
        _poll.Hook()
    assert isinstance(polling.Direct(a.fileno(), bytearray(1)), _poll.Hook)
    sel = PollingSelector(32)
    assert sel.can_hook
    hook = polling.Direct(a.fileno(), bytearray(4))
    sel.add_hook(hook)
    sel.add_hook(hook)
    assert sel._hooks == (hook,)
    direct = sel.receive_into(a.fileno() + 1000, memoryview(bytearray(4)))
    assert sel._hooks == (direct, hook)
    sel.remove_hook(hook)
    sel.remove_hook(hook)  # (not there: nothing to do)
    assert sel._hooks == (direct,)
    sel.end_receive(a.fileno() + 1000)
    assert sel._hooks == ()
    sel.close()


def test_zero_timeout_never_polls(pair) -> None:
    sel = PollingSelector(32)
    a, _ = pair
    sel.register(a, selectors.EVENT_READ)
    sel.window = 1e-5
    assert sel.select(0) == []
    assert sel.poll_hits == 0 and sel.sleeps == 0
    sel.close()


# ------------------------------------------------------------------------------ in a loop
def test_loop_on_the_polling_selector_serves_and_reports() -> None:
    """An echo over a socket pair on the loop tapdisk and serve run on: every message
    comes back, and the loop's statistics count the waits."""

    async def main() -> dict | None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, TurnClockLoop)
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        try:
            for i in range(200):
                await loop.sock_sendall(a, i.to_bytes(4, "big"))
                got = await loop.sock_recv(b, 4)
                assert int.from_bytes(got, "big") == i
        finally:
            a.close()
            b.close()
        return loop_stats()

    with asyncio.Runner(loop_factory=polling_loop_factory(32)) as runner:
        stats = runner.run(main())
    assert stats is not None
    assert set(stats) == {"poll_max_us", "poll_window_us", "poll_backend_window_us",
                          "poll_hits", "sleeps"}
    cpus = len(os.sched_getaffinity(0))
    assert stats["poll_max_us"] == (32 if cpus > 1 else 0)
    assert 0 <= stats["poll_window_us"] <= stats["poll_max_us"]
    assert loop_stats() is None  # no loop running here


# ------------------------------------------------------------------------------ the processes
def test_serve_bad_poll_window_is_a_usage_error(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(b"\x01" * MiB)
    for argv, env in ((["--poll-max-us", "-5"], {}),
                      ([], {polling.ENV_MAX_US: "soon"})):
        done = subprocess.run([tool("blktap"), "serve", f"aio:{image}", "--socket",
                               str(tmp_path / "s"), *argv], capture_output=True, text=True,
                              timeout=60, env=os.environ | env)
        assert done.returncode == errno.EINVAL, done.stderr
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and "poll window" in lines[0], done.stderr
        assert not (tmp_path / "s").exists()


def test_tapdisk_bad_poll_window_env_is_refused(tmp_path: Path) -> None:
    done = subprocess.run([tool("tapdisk"), "-D"], capture_output=True, text=True, timeout=60,
                          env=os.environ | {polling.ENV_MAX_US: "2000000",
                                            "BLKTAP_CONTROL_DIR": str(tmp_path)})
    assert done.returncode == errno.EINVAL
    assert polling.ENV_MAX_US in done.stderr and "out of range" in done.stderr


def test_serve_metrics_show_the_loop(tmp_path: Path) -> None:
    """blktap serve runs on the polling loop: its metrics carry the loop's families, with
    the window it was given."""
    from urllib.request import urlopen

    image = tmp_path / "d.img"
    image.write_bytes(b"\x02" * MiB)
    proc = subprocess.Popen([tool("blktap"), "serve", f"aio:{image}", "--socket",
                             str(tmp_path / "s"), "--metrics", "127.0.0.1:0",
                             "--poll-max-us", "50"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = None
        for _ in range(10):
            line = proc.stdout.readline()
            if "/metrics" in line:
                url = line.split()[-1]
                break
        assert url, "no metrics URL printed"
        text = urlopen(url, timeout=10).read().decode()
    finally:
        proc.terminate()
        proc.wait(30)
    cpus = len(os.sched_getaffinity(0))
    assert "blktap_vbd_loop_sleeps_total{" in text
    assert "blktap_vbd_loop_poll_hits_total{" in text
    window = [line for line in text.splitlines()
              if line.startswith("blktap_vbd_loop_poll_window_seconds{")]
    assert len(window) == 1
    assert 0 <= float(window[0].split()[-1]) <= (50e-6 if cpus > 1 else 0)


def test_tapdisk_takes_the_window_from_the_environment_and_reports_it(tmp_path: Path) -> None:
    """tap-ctl starts tapdisk with fixed arguments: the window comes from
    $BLKTAP_POLL_MAX_US, and tap-ctl stats shows the loop's polling."""
    from test_tap_ctl_daemon import Host, wait_gone

    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4 * MiB))
    host = Host(tmp_path)
    host.env[polling.ENV_MAX_US] = "40"
    pid, minor = host.create(f"aio:{disk}")
    try:
        host.serving(pid, minor, 4 * MiB)
        stats = json.loads(host.out("stats", "-p", str(pid), "-m", str(minor)))
        cpus = len(os.sched_getaffinity(0))
        loop = stats["loop"]
        assert loop["poll_max_us"] == (40 if cpus > 1 else 0)
        assert 0 <= loop["poll_window_us"] <= loop["poll_max_us"]
        assert loop["sleeps"] >= 1  # it waited for the client at least once
    finally:
        host.out("destroy", "-p", str(pid), "-m", str(minor))
        wait_gone(pid)


def test_a_disk_tells_the_loop_when_its_waits_are_for_the_backend(tmp_path: Path) -> None:
    """A VBD on a polling loop is asked before each wait: busy while a request of its own
    is in flight at the driver, not before or after; closed, it is no longer asked."""
    path = tmp_path / "d.img"
    path.write_bytes(bytes(4 << 20))
    seen: list[bool] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sel = loop._selector  # type: ignore[attr-defined]
        assert isinstance(sel, PollingSelector)
        engine = ThreadEngine(threads=1)
        try:
            driver = await engine.call(open_stack, engine, f"aio:{path}", writable=True)
            vbd = VBD(driver)
            assert len(sel._busy) == 1
            busy = sel._busy[0]
            assert busy() is False
            # Past what the engine does inline on the loop's thread: a worker writes it.
            buf = memoryview(bytearray(2 << 20))
            write = asyncio.ensure_future(vbd.write(0, buf))
            while not write.done():
                seen.append(busy())
                await asyncio.sleep(0)
            await write
            assert busy() is False
            await vbd.close()
            assert sel._busy == []
        finally:
            engine.close()

    with asyncio.Runner(loop_factory=polling_loop_factory(32)) as runner:
        runner.run(main())
    assert True in seen  # the write, at the engine's worker
