"""The control socket under abuse: idle, slow, vanishing and babbling clients must not keep
``tap-ctl list`` from seeing a live tapdisk, and a tapdisk that does not answer (stopped,
or its backlog full) is never reported as absent, which would make its minors look
orphaned and tell sm to free them."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_tap_ctl_daemon import LIST_PIPE_RE, Host

MSG = 544
PID_REQ = (3).to_bytes(2, "little") + bytes(MSG - 2)  # PID, cookie 0
PID_RSP = 4


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(tmp_path)
    yield h
    # Teardown without tap-ctl: a test may leave a stopped tapdisk behind.
    for name in os.listdir(h.run_dir) if h.run_dir.exists() else []:
        hit = re.fullmatch(r"ctl(\d+)", name)
        if hit:
            try:
                os.kill(int(hit[1]), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def served(host: Host, tmp_path: Path) -> tuple[int, int, str]:
    """A tapdisk serving a raw image: (pid, minor, its ``tap-ctl list`` line)."""
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    pid, minor = host.create(f"aio:{img}")
    return pid, minor, f"pid={pid} minor={minor} state=0 args=aio:{img}\n"


def ctl_path(host: Host, pid: int) -> str:
    return str(host.run_dir / f"ctl{pid}")


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)  # blocking: waits while the backlog is full, as a patient client
    s.settimeout(30)
    return s


def ask_pid(path: str) -> int:
    with connect(path) as s:
        s.sendall(PID_REQ)
        raw = b""
        while len(raw) < MSG:
            chunk = s.recv(MSG - len(raw))
            assert chunk, "the tapdisk hung up without answering PID"
            raw += chunk
    assert int.from_bytes(raw[:2], "little") == PID_RSP
    return int.from_bytes(raw[8:12], "little")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_idle_connections_do_not_hide_a_live_tapdisk(host: Host, served) -> None:
    """The probe's case: 25 connections that say nothing. list still prints the tapdisk
    with its minor (it used to wait 10 s and print the minor alone, as if orphaned)."""
    pid, _minor, line = served
    idle = [connect(ctl_path(host, pid)) for _ in range(25)]
    try:
        code, out, err = host.tap_ctl("list", ok=False)
        assert (code, out, err) == (0, line, "")
        assert ask_pid(ctl_path(host, pid)) == pid
    finally:
        for s in idle:
            s.close()


def test_slow_clients_do_not_starve_the_socket(host: Host, served) -> None:
    """40 clients each dripping a byte a second into their request (slowloris)."""
    pid, _minor, line = served
    slow = [connect(ctl_path(host, pid)) for _ in range(40)]
    stop = threading.Event()

    def drip() -> None:
        while not stop.is_set():
            for s in slow:
                try:
                    s.send(b"\x03")
                except OSError:
                    pass  # the tapdisk closed it: fine
            stop.wait(1.0)

    dripper = threading.Thread(target=drip)
    dripper.start()
    try:
        time.sleep(1.5)  # let the drip start: every slow client has begun a request
        code, out, err = host.tap_ctl("list", ok=False)
        assert (code, out, err) == (0, line, "")
        assert ask_pid(ctl_path(host, pid)) == pid
    finally:
        stop.set()
        dripper.join()
        for s in slow:
            s.close()


def test_babbling_and_vanishing_clients(host: Host, served) -> None:
    """Clients that connect and vanish, send garbage, or half a message and hold on: list
    is answered meanwhile, and the tapdisk's descriptors come back to where they were."""
    pid, _minor, line = served
    path = ctl_path(host, pid)
    before = fd_count(pid)
    for _ in range(200):
        connect(path).close()
    for i in range(50):  # whole garbage messages: an ERROR reply or a close
        with connect(path) as s:
            s.sendall(os.urandom(MSG + i))
            s.shutdown(socket.SHUT_WR)
            try:
                while s.recv(65536):
                    pass
            except ConnectionResetError:
                pass  # closed with some of the garbage unread
    held = []
    for i in range(30):
        s = connect(path)
        s.sendall(os.urandom(100 + i))  # part of a message, and no more
        held.append(s)
    try:
        code, out, err = host.tap_ctl("list", ok=False)
        assert (code, out, err) == (0, line, "")
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 30
    while fd_count(pid) > before:
        assert time.monotonic() < deadline, (before, fd_count(pid))
        time.sleep(0.05)
    assert ask_pid(path) == pid


def test_stopped_tapdisk_is_listed_with_its_minor_and_list_fails(host: Host,
                                                                 served) -> None:
    """A tapdisk that cannot answer (SIGSTOP) is not dropped: its pid and the minor it
    holds are printed (no state, no args: unknown), the orphan marker stays an orphan,
    and list exits ETIMEDOUT (110) so that sm acts on nothing."""
    from blktap.control.client import ListIncomplete, TapCtl, TapEntry
    from blktap.control.rundir import RunDir

    pid, minor, _line = served
    orphan = int(host.out("allocate").rstrip().rsplit("-", 1)[1])
    os.kill(pid, signal.SIGSTOP)
    try:
        ctl = TapCtl(RunDir(str(host.run_dir)), query_timeout=0.5)
        with pytest.raises(ListIncomplete) as caught:
            ctl.list_all()
        assert caught.value.errno == errno.ETIMEDOUT
        assert caught.value.silent == [pid]
        assert caught.value.entries == [TapEntry(pid=pid, minor=minor),
                                        TapEntry(minor=orphan)]
        with pytest.raises(ListIncomplete) as caught:
            ctl.list_pid(pid)
        assert caught.value.entries == [TapEntry(pid=pid, minor=minor)]
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.mark.slow
def test_stopped_tapdisk_through_the_cli(host: Host, served) -> None:
    """The same through tap-ctl (its 10 s limit): the known fields on stdout, then
    ``Connection timed out`` and exit 110; never exit 0 with the tapdisk missing."""
    pid, minor, _line = served
    os.kill(pid, signal.SIGSTOP)
    try:
        code, out, err = host.tap_ctl("list", ok=False)
        assert (code, out, err) == (110, f"pid={pid} minor={minor}\n",
                                    "Connection timed out\n")
        code, out, err = host.tap_ctl("list", "-m", str(minor), ok=False)
        assert (code, out) == (110, f"pid={pid} minor={minor}\n")
    finally:
        os.kill(pid, signal.SIGCONT)
    code, out, _ = host.tap_ctl("list", ok=False)
    assert code == 0 and LIST_PIPE_RE.match(out.rstrip("\n"))


def test_full_backlog_is_a_timeout_not_an_absence(tmp_path: Path) -> None:
    """A control socket whose listen backlog is full (its tapdisk takes nobody) refuses
    connects with EAGAIN: that tapdisk is alive, so list reports it (ETIMEDOUT), with
    the minor it holds, instead of skipping it."""
    from blktap.control.client import ListIncomplete, TapCtl, TapEntry
    from blktap.control.rundir import RunDir

    rd = RunDir(str(tmp_path / "run"))
    rd.ensure()
    me = os.getpid()  # this process plays the tapdisk: it holds the minor
    minor, _ = rd.allocate()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(rd.control_socket(me))
    listener.listen(0)
    filling = []
    try:
        while True:  # fill the backlog
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            filling.append(s)
            try:
                s.connect(rd.control_socket(me))
            except BlockingIOError:
                break
        with rd.hold(minor):
            with pytest.raises(ListIncomplete) as caught:
                TapCtl(rd, query_timeout=0.3).list_all()
        assert caught.value.entries == [TapEntry(pid=me, minor=minor)]
    finally:
        for s in filling:
            s.close()
        listener.close()


def test_eviction_and_the_queue_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the limit of connections still sending their request, the oldest is closed;
    past the limit of queued exclusive requests, the next is refused with EBUSY at once;
    PID, LIST and STATS are answered meanwhile."""
    from blktap.control import message as m
    from blktap.control.message import Message, MessageType
    from blktap.control.rundir import RunDir
    from blktap.daemon import tapdisk as daemon_mod

    monkeypatch.setattr(daemon_mod, "MAX_WAITING_CONNECTIONS", 4)
    monkeypatch.setattr(daemon_mod, "MAX_QUEUED_REQUESTS", 3)

    async def body() -> None:
        loop = asyncio.get_running_loop()
        td = daemon_mod.Tapdisk(RunDir(str(tmp_path / "run")), threads=2)
        path = td.start_control()
        # Six silent connections: the first two are evicted (they read EOF).
        silent = []
        for _ in range(6):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            await loop.sock_connect(s, path)
            silent.append(s)
            await asyncio.sleep(0.01)  # accepted in this order
        for s in silent[:2]:
            assert await asyncio.wait_for(loop.sock_recv(s, 1), 10) == b""
        for s in silent[2:]:
            with pytest.raises(BlockingIOError):
                s.recv(1)
        # Exclusive requests held up by a slow one: three queue, the fourth is refused.
        release = asyncio.Event()

        async def slow_attach(minor: int, *, hold: bool = True) -> None:
            await release.wait()

        td.attach = slow_attach  # type: ignore[method-assign]
        queued = [asyncio.create_task(td.handle(Message(MessageType.ATTACH, n)))
                  for n in range(3)]
        await asyncio.sleep(0.05)
        [refused] = await td.handle(Message(MessageType.ATTACH, 9))
        assert refused.type is MessageType.ERROR
        assert isinstance(refused.payload, m.Response)
        assert refused.payload.error == errno.EBUSY
        [pid] = await td.handle(Message(MessageType.PID))
        assert pid.type is MessageType.PID_RSP
        assert (await td.handle(Message(MessageType.LIST, 0xFFFF)))[-1].type \
            is MessageType.LIST_RSP
        release.set()
        for task in queued:
            [r] = await task
            assert r.type is MessageType.ATTACH_RSP
        for s in silent:
            s.close()
        await td.shutdown()

    asyncio.run(body())


def test_out_of_descriptors_the_oldest_silent_client_makes_room(tmp_path: Path) -> None:
    """A tapdisk with few descriptors left (RLIMIT_NOFILE 40) and 60 silent clients: when
    accept fails with EMFILE the oldest silent one is closed, so a request still gets in
    and is answered."""
    import resource
    import subprocess

    from conftest import tool

    env = dict(os.environ, BLKTAP_CONTROL_DIR=str(tmp_path / "run"),
               BLKTAP_LOG_DIR=str(tmp_path / "log"))
    proc = subprocess.Popen(
        [tool("tapdisk"), "-D"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
        text=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40)))
    try:
        path = proc.stdout.readline().strip()  # type: ignore[union-attr]
        idle = [connect(path) for _ in range(60)]
        try:
            assert ask_pid(path) == proc.pid
            assert fd_count(proc.pid) <= 40
        finally:
            for s in idle:
                s.close()
        assert ask_pid(path) == proc.pid
    finally:
        proc.terminate()
        proc.wait(60)
        proc.stdout.close()  # type: ignore[union-attr]
