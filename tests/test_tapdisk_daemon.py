"""The tapdisk daemon driven over its control socket.

Requests are built here with the test's own ``struct`` layout of the reference's
544-byte message (``blktap-reference.md`` §2.8), not with the project's encoder, and the
replies are read the same way: what passes here is what the C tap-ctl would see.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import need, run, tool

MiB = 1 << 20
SIZE = 544  # header 8 + union 536
# The test's own layout (x86_64, host order).
HDR = struct.Struct("=HH4x")
PARAMS = struct.Struct("=III256sIH256s")  # flags devnum domid path prt_devnum timeout secondary
RESPONSE = struct.Struct("=i256s")
LIST = struct.Struct("=iii256s")
IMAGE = struct.Struct("=QII")
STATS_LEN = struct.Struct("=HH4xQ")
PID_RSP = struct.Struct("=i")

(ERROR, PID, PID_RSP_T, ATTACH, ATTACH_RSP, OPEN, OPEN_RSP, PAUSE, PAUSE_RSP, RESUME, RESUME_RSP,
 CLOSE, CLOSE_RSP, DETACH, DETACH_RSP, LIST_MINORS, LIST_T, LIST_RSP, STATS, STATS_RSP,
 FORCE_SHUTDOWN, DISK_INFO, DISK_INFO_RSP) = (1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
                                              17, 19, 20, 21, 22, 23, 28, 29)
F_RDONLY, F_ADD_LOG, F_SECONDARY, F_NO_O_DIRECT, F_ENCRYPTED = 0x2, 0x10, 0x80, 0x200, 0x400


def msg(kind: int, minor: int = 0, body: bytes = b"") -> bytes:
    return (HDR.pack(kind, minor) + body).ljust(SIZE, b"\0")


def params(path: str, flags: int = 0, timeout: int = 0, secondary: str = "") -> bytes:
    return PARAMS.pack(flags, 0, 0, path.encode(), 0, timeout, secondary.encode())


@dataclass
class Reply:
    kind: int
    cookie: int
    body: bytes

    @property
    def error(self) -> int:
        assert self.kind == ERROR, f"expected an ERROR reply, got type {self.kind}"
        return RESPONSE.unpack_from(self.body)[0]

    @property
    def text(self) -> str:
        return RESPONSE.unpack_from(self.body)[1].split(b"\0")[0].decode()


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise EOFError(f"{len(out)} of {n} bytes")
        out += chunk
    return out


def read_reply(s: socket.socket) -> Reply:
    raw = recv_exact(s, SIZE)
    kind, cookie = HDR.unpack_from(raw)
    return Reply(kind, cookie, raw[8:])


class Daemon:
    def __init__(self, tmp: Path) -> None:
        self.run_dir = tmp / "run"
        self.log_dir = tmp / "log"
        self.env = dict(os.environ, BLKTAP_CONTROL_DIR=str(self.run_dir),
                        BLKTAP_LOG_DIR=str(self.log_dir))
        self.proc = subprocess.Popen([tool("tapdisk"), "-D"], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=self.env, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        assert ready, "tapdisk printed nothing"
        self.ctl = self.proc.stdout.readline().strip()  # type: ignore[union-attr]
        self.pid = self.proc.pid

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(self.ctl)
        return s

    def request(self, data: bytes, trailer: bytes = b"") -> Reply:
        with self.connect() as s:
            s.sendall(data + trailer)
            return read_reply(s)

    def replies(self, data: bytes) -> list[Reply]:
        with self.connect() as s:
            s.sendall(data)
            out = [read_reply(s)]
            while out[-1].kind == LIST_RSP and LIST.unpack_from(out[-1].body)[1] != -1:
                out.append(read_reply(s))
            return out

    def allocate(self) -> int:
        marker_dir = self.run_dir / "tapdisk"
        taken = {int(p.name.split("-")[1]) for p in marker_dir.iterdir()}
        minor = min(set(range(len(taken) + 1)) - taken)
        (marker_dir / f"tapdisk-{minor}").touch()
        return minor

    def ok(self, data: bytes, want: int, trailer: bytes = b"") -> Reply:
        r = self.request(data, trailer)
        assert r.kind == want, (r.kind, r.text if r.kind == ERROR else "")
        return r

    def open_disk(self, path: Path | str, kind: str = "aio", flags: int = 0) -> int:
        minor = self.allocate()
        self.ok(msg(ATTACH, minor), ATTACH_RSP)
        self.ok(msg(OPEN, minor, params(f"{kind}:{path}", flags)), OPEN_RSP)
        return minor

    def listing(self) -> list[tuple[int, int, int, str]]:
        out = []
        for r in self.replies(msg(LIST_T)):
            assert r.kind == LIST_RSP
            count, minor, state, path = LIST.unpack_from(r.body)
            out.append((count, minor, state, path.split(b"\0")[0].decode()))
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.stdout.close()  # type: ignore[union-attr]
            self.proc.stderr.close()  # type: ignore[union-attr]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path)
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(MiB) * 4)
    return img


def test_spawned_daemon_prints_path_and_serves(tmp_path: Path) -> None:
    """Without -D: the started process exits 0 once the daemon serves; the printed path
    is ctl<daemon pid>, 0600 in a 0700 directory."""
    env = dict(os.environ, BLKTAP_CONTROL_DIR=str(tmp_path / "run"),
               BLKTAP_LOG_DIR=str(tmp_path / "log"))
    res = run([tool("tapdisk")], env=env, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    path = res.stdout.strip()
    assert res.stdout.count("\n") == 1
    pid = int(path.rsplit("ctl", 1)[1])
    assert path == str(tmp_path / "run" / f"ctl{pid}")
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(tmp_path / "run").st_mode) == 0o700
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(path)
            s.sendall(msg(PID))
            r = read_reply(s)
        assert (r.kind, PID_RSP.unpack_from(r.body)[0]) == (PID_RSP_T, pid)
        assert os.getsid(pid) == pid  # a session of its own
    finally:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(path)
    assert list((tmp_path / "log").iterdir()) == []  # clean exit: the log is gone


def test_spawn_failure_exit_code(tmp_path: Path) -> None:
    """A daemon that cannot start says why and the started process fails."""
    blocker = tmp_path / "run"
    blocker.write_text("not a directory")
    env = dict(os.environ, BLKTAP_CONTROL_DIR=str(blocker), BLKTAP_LOG_DIR=str(tmp_path / "l"))
    res = run([tool("tapdisk")], env=env, text=True, timeout=60)
    assert res.returncode != 0 and res.stdout == ""
    assert "tapdisk:" in res.stderr


def test_lifecycle(daemon: Daemon, disk: Path) -> None:
    nbdinfo = need("nbdinfo")
    r = daemon.ok(msg(PID), PID_RSP_T)
    assert PID_RSP.unpack_from(r.body)[0] == daemon.pid
    assert daemon.listing() == [(0, -1, 0, "")]
    minor = daemon.allocate()
    daemon.ok(msg(ATTACH, minor), ATTACH_RSP)
    assert daemon.listing() == [(1, minor, 0, ""), (0, -1, 0, "")]  # as the reference
    r = daemon.ok(msg(OPEN, minor, params(f"aio:{disk}")), OPEN_RSP)
    assert IMAGE.unpack_from(r.body) == (4 * MiB // 512, 512, 0)
    assert daemon.listing() == [(1, minor, 0, f"aio:{disk}"), (0, -1, 0, "")]
    nbd = daemon.run_dir / f"nbd{daemon.pid}.{minor}"
    assert stat.S_IMODE(os.stat(nbd).st_mode) == 0o600
    res = run([nbdinfo, "--size", f"nbd+unix:///?socket={nbd}"], text=True)
    assert res.returncode == 0 and int(res.stdout) == 4 * MiB

    r = daemon.ok(msg(DISK_INFO, minor), DISK_INFO_RSP)
    assert IMAGE.unpack_from(r.body)[:2] == (4 * MiB // 512, 512)
    daemon.ok(msg(PAUSE, minor), PAUSE_RSP)
    assert daemon.listing()[0] == (1, minor, 0x2a, f"aio:{disk}")
    daemon.ok(msg(RESUME, minor, params("")), RESUME_RSP)
    assert daemon.listing()[0][2] == 0

    with daemon.connect() as s:
        s.sendall(msg(STATS, minor))
        r = read_reply(s)
        assert r.kind == STATS_RSP
        (_, _, length) = STATS_LEN.unpack_from(r.body)
        text = recv_exact(s, length).decode()
    assert text.startswith(f'{{ "name": "aio:{disk}", "secs": [ ')

    daemon.ok(msg(CLOSE, minor), CLOSE_RSP)
    assert daemon.listing() == [(1, minor, 0x2, ""), (0, -1, 0, "")]
    assert not nbd.exists()
    daemon.ok(msg(DETACH, minor), DETACH_RSP)
    # The last VBD gone, the process exits by itself, cleanly, and removes its socket.
    assert daemon.proc.wait(30) == 0
    assert not Path(daemon.ctl).exists()
    assert (daemon.run_dir / "tapdisk" / f"tapdisk-{minor}").exists()  # free is tap-ctl's


def test_state_errors_leave_the_disk_serving(daemon: Daemon, disk: Path) -> None:
    """Each wrong request gets the errno the reference's handlers give, and the disk goes
    on serving."""
    nbdinfo = need("nbdinfo")
    minor = daemon.open_disk(disk)
    nbd = daemon.run_dir / f"nbd{daemon.pid}.{minor}"

    assert daemon.request(msg(ATTACH, minor)).error == errno.EEXIST
    assert daemon.request(msg(OPEN, minor, params(f"aio:{disk}"))).error == errno.EALREADY
    assert daemon.request(msg(DETACH, minor)).error == errno.EBUSY
    assert daemon.request(msg(RESUME, minor, params(""))).error == errno.EINVAL
    # A minor nobody attached: OPEN says EINVAL, the others ENODEV (the reference's).
    assert daemon.request(msg(OPEN, 999, params(f"aio:{disk}"))).error == errno.EINVAL
    for kind in (CLOSE, PAUSE, RESUME, DETACH, STATS, DISK_INFO):
        body = params("") if kind == RESUME else b""
        assert daemon.request(msg(kind, 999, body)).error == errno.ENODEV
    daemon.ok(msg(PAUSE, minor), PAUSE_RSP)
    daemon.ok(msg(PAUSE, minor), PAUSE_RSP)  # pausing a paused disk succeeds, as there
    assert daemon.request(msg(OPEN, minor, params(f"aio:{disk}"))).error == errno.EALREADY
    assert daemon.request(msg(DETACH, minor)).error == errno.EBUSY
    daemon.ok(msg(RESUME, minor, params("")), RESUME_RSP)
    res = run([nbdinfo, "--size", f"nbd+unix:///?socket={nbd}"], text=True)
    assert res.returncode == 0 and int(res.stdout) == 4 * MiB
    assert daemon.listing()[0][:3] == (1, minor, 0)


def test_open_errors(daemon: Daemon, tmp_path: Path, disk: Path) -> None:
    minor = daemon.allocate()
    assert daemon.request(msg(OPEN, minor, params(f"aio:{disk}"))).error == errno.EINVAL
    assert daemon.request(msg(ATTACH, 777)).error == errno.ENOENT  # no marker
    daemon.ok(msg(ATTACH, minor), ATTACH_RSP)
    daemon.ok(msg(CLOSE, minor), CLOSE_RSP)  # closing what is not open: fine, as there
    r = daemon.ok(msg(DISK_INFO, minor), DISK_INFO_RSP)
    assert IMAGE.unpack_from(r.body) == (0, 0, 0)
    r = daemon.request(msg(OPEN, minor, params(f"aio:{tmp_path}/missing.img")))
    assert r.error == errno.ENOENT and "missing.img" in r.text
    assert daemon.request(msg(OPEN, minor, params(f"vhd:{disk}"))).error == errno.EINVAL
    assert daemon.request(msg(OPEN, minor, params("vmdk:/x"))).error == errno.ENOSYS
    assert daemon.request(msg(OPEN, minor, params(""))).error == errno.EINVAL
    r = daemon.request(msg(OPEN, minor, params(f"aio:{disk}", F_SECONDARY,
                                                   secondary=f"aio:{tmp_path}/nowhere.img")))
    assert r.error == errno.ENOENT and "secondary" in r.text
    # A CBT log that is not there: ENOENT naming it, nothing opened (docs/cbt.md).
    r = daemon.request(msg(OPEN, minor, params(f"aio:{disk}", F_ADD_LOG)),
                       f"{tmp_path}/none.cbtlog".encode().ljust(256, b"\0"))
    assert r.error == errno.ENOENT and "none.cbtlog" in r.text
    # After all that, it opens read-only.
    daemon.ok(msg(OPEN, minor, params(f"aio:{disk}", F_RDONLY | F_NO_O_DIRECT, 30)), OPEN_RSP)


def test_resume_on_another_size_refused(daemon: Daemon, tmp_path: Path, disk: Path) -> None:
    minor = daemon.open_disk(disk)
    small = tmp_path / "small.img"
    small.write_bytes(bytes(MiB))
    same = tmp_path / "same.img"
    same.write_bytes(bytes(4 * MiB))
    daemon.ok(msg(PAUSE, minor), PAUSE_RSP)
    assert daemon.request(msg(RESUME, minor, params(f"aio:{small}"))).error == errno.EMEDIUMTYPE
    assert daemon.listing()[0][2] == 0x22a  # still paused, RESUME_FAILED
    daemon.ok(msg(RESUME, minor, params(f"aio:{same}")), RESUME_RSP)
    assert daemon.listing()[0] == (1, minor, 0, f"aio:{same}")


@pytest.mark.parametrize("raw, code", [
    (msg(999), errno.EINVAL),  # unknown type
    (msg(LIST_MINORS), errno.EINVAL),  # a type tapdisk has no handler for
    (msg(OPEN_RSP), errno.EINVAL),  # a reply type sent as a request
    (HDR.pack(PID, 0) + b"\0" * 10, errno.EPROTO),  # short
    (msg(OPEN, 0, PARAMS.pack(0, 0, 0, b"x" * 256, 0, 0, b"")), errno.EINVAL),  # no NUL
    (msg(OPEN, 0, PARAMS.pack(0x80000, 0, 0, b"aio:/x", 0, 0, b"")), errno.EINVAL),  # flag
    (msg(OPEN, 0, PARAMS.pack(F_ENCRYPTED, 0, 0, b"vhd:/x", 0, 0, b"")) + b"\0",
     errno.EINVAL),  # key size 0
    (msg(OPEN, 0, PARAMS.pack(F_ADD_LOG, 0, 0, b"vhd:/x", 0, 0, b"")) + b"/x", errno.EPROTO),
])
def test_malformed_requests(daemon: Daemon, raw: bytes, code: int) -> None:
    with daemon.connect() as s:
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)
        r = read_reply(s)
    assert r.error == code
    daemon.ok(msg(PID), PID_RSP_T)


def test_silent_client_does_not_block_others(daemon: Daemon, disk: Path) -> None:
    """A connection that sends nothing (or half a message) holds nobody up."""
    idle = [daemon.connect() for _ in range(3)]
    try:
        idle[0].sendall(msg(PAUSE)[:100])
        minor = daemon.open_disk(disk)
        daemon.ok(msg(PAUSE, minor), PAUSE_RSP)
        daemon.ok(msg(RESUME, minor, params("")), RESUME_RSP)
    finally:
        for s in idle:
            s.close()
    daemon.ok(msg(PID), PID_RSP_T)


def test_client_vanishing_before_reply(daemon: Daemon, disk: Path) -> None:
    for _ in range(5):
        with daemon.connect() as s:
            s.sendall(msg(LIST_T))
    minor = daemon.open_disk(disk)
    with daemon.connect() as s:
        s.sendall(msg(PAUSE, minor))
    # The pause went through although nobody read its answer.
    deadline = time.monotonic() + 30
    while daemon.listing()[0][2] != 0x2a and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon.listing()[0][2] == 0x2a


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(
    st.binary(max_size=700),
    st.builds(lambda kind, body: msg(kind, 5, body[:536]),
              st.integers(0, 40), st.binary(max_size=536)),
))
def test_fuzzed_requests_never_hurt(daemon: Daemon, data: bytes) -> None:
    """Random bytes: the answer is an ERROR or a well-formed reply, the connection is
    closed after it, and the daemon serves the next request (minor 5 is never attached,
    so nothing can change)."""
    with daemon.connect() as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    if raw:
        assert len(raw) >= SIZE
        kind, _ = HDR.unpack_from(raw)
        assert kind in (ERROR, PID_RSP_T, LIST_RSP, STATS_RSP)
        if kind == ERROR:
            assert RESPONSE.unpack_from(raw, 8)[0] > 0
    daemon.ok(msg(PID), PID_RSP_T)


def test_sigterm_closes_vhd_consistently(daemon: Daemon, tmp_path: Path) -> None:
    """Writes through NBD, then SIGTERM: the process exits 0 and the VHD passes check
    with the data in it."""
    qemu_io = need("qemu-io")
    vhd = tmp_path / "d.vhd"
    assert run([tool("vhd-util"), "create", "-n", str(vhd), "-s", "16"]).returncode == 0
    minor = daemon.open_disk(vhd, "vhd")
    nbd = daemon.run_dir / f"nbd{daemon.pid}.{minor}"
    res = run([qemu_io, "-f", "raw", "-c", "write -P 0x5a 1M 3M",
               f"nbd+unix:///?socket={nbd}"], text=True)
    assert res.returncode == 0, res.stderr
    # While open for writing, an offline reader finds a valid footer.
    assert run([tool("vhd-util"), "check", "-n", str(vhd)]).returncode == 0
    assert daemon.stop() == 0
    res = run([tool("vhd-util"), "check", "-n", str(vhd)], text=True)
    assert res.returncode == 0 and "is valid" in res.stdout
    res = run([qemu_io, "-f", "vpc", "-r", "-c", "read -P 0x5a 1M 3M", str(vhd)], text=True)
    assert res.returncode == 0 and "Pattern verification failed" not in res.stdout


def test_resume_retries_the_reopen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RESUME tries the reopen several times (a new leaf may appear late); when it never
    opens, the last error is the answer and the disk stays paused (0x22a)."""
    import asyncio

    from blktap.control import message as m
    from blktap.control.message import Message, MessageType
    from blktap.control.rundir import RunDir
    from blktap.daemon import tapdisk as daemon_mod

    monkeypatch.setattr(daemon_mod, "RESUME_RETRY_INTERVAL", 0.05)
    img = tmp_path / "d.img"
    img.write_bytes(bytes(MiB))
    late = tmp_path / "late.img"

    async def body() -> None:
        rd = RunDir(str(tmp_path / "run"))
        td = daemon_mod.Tapdisk(rd, threads=2)
        td.start_control()
        minor, _ = rd.allocate()
        await td.attach(minor)
        await td.open(minor, daemon_mod.OpenParams(f"aio:{img}"))
        await td.pause(minor)
        missing = m.Params(path=f"aio:{tmp_path}/x")
        [r] = await td.handle(Message(MessageType.RESUME, minor, missing))
        assert isinstance(r.payload, m.Response) and r.payload.error == errno.ENOENT
        assert td.slots[minor].state == 0x22a

        async def appear() -> None:
            await asyncio.sleep(0.2)
            late.write_bytes(bytes(MiB))

        task = asyncio.create_task(appear())
        [r] = await td.handle(Message(MessageType.RESUME, minor, m.Params(path=f"aio:{late}")))
        await task
        assert r.type is MessageType.RESUME_RSP
        assert td.slots[minor].state == 0 and td.slots[minor].path == f"aio:{late}"
        await td.shutdown()

    asyncio.run(body())


def test_log_file_kept_after_a_dump(daemon: Daemon, disk: Path) -> None:
    """SIGUSR1 writes every VBD's state to the process's log and keeps the log."""
    minor = daemon.open_disk(disk)
    log = daemon.log_dir / f"tapdisk.{daemon.pid}.log"
    assert log.exists()
    os.kill(daemon.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while "debug dump" not in log.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert daemon.stop() == 0
    text = log.read_text()
    assert f"minor {minor}: aio:{disk} state=0" in text and '"secs": [ ' in text


def test_connections_past_the_limit_evict_the_oldest_silent_one(daemon: Daemon) -> None:
    """Every connection is taken at once, none waits in the backlog: past the limit of
    32 connections that have not sent their request, each new one closes the oldest
    silent one (which reads EOF), and a request is answered at once meanwhile."""
    idle = [daemon.connect() for _ in range(40)]
    try:
        r = daemon.request(msg(PID))
        assert (r.kind, PID_RSP.unpack_from(r.body)[0]) == (PID_RSP_T, daemon.pid)
        for conn in idle[:8]:  # evicted: the tapdisk closed them
            assert conn.recv(1) == b""
        for conn in idle[9:]:  # the newest are still waiting (the PID request took the
            conn.setblocking(False)  # place of the ninth)
            with pytest.raises(BlockingIOError):
                conn.recv(1)
    finally:
        for s in idle:
            s.close()
    daemon.ok(msg(PID), PID_RSP_T)


def test_nine_silent_connections_hold_nobody_up(daemon: Daemon) -> None:
    """Requests are read on the event loop, not by a pool of threads a few silent
    clients could fill: with nine connections saying nothing (under the limit of ten),
    a request is answered while they all still hold on, long before the 10 s they are
    given."""
    idle = [daemon.connect() for _ in range(9)]
    try:
        with daemon.connect() as s:
            s.settimeout(5)
            s.sendall(msg(PID))
            r = read_reply(s)
        assert r.kind == PID_RSP_T
        for conn in idle:  # all nine are still open, waiting
            conn.setblocking(False)
            with pytest.raises(BlockingIOError):
                conn.recv(1)
    finally:
        for conn in idle:
            conn.close()


def test_open_at_start(tmp_path: Path, disk: Path) -> None:
    """tapdisk --open allocates a minor, serves it (nbdinfo reads it) and prints
    ``MINOR SOCKET``; on SIGTERM the minor it allocated itself is freed again."""
    nbdinfo = need("nbdinfo")
    env = dict(os.environ, BLKTAP_CONTROL_DIR=str(tmp_path / "run"),
               BLKTAP_LOG_DIR=str(tmp_path / "log"))
    proc = subprocess.Popen([tool("tapdisk"), "-D", "--open", f"aio:{disk}", "--read-only"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready
        assert proc.stdout.readline().strip() == str(tmp_path / "run" / f"ctl{proc.pid}")  # type: ignore[union-attr]
        minor, sock = proc.stdout.readline().split()  # type: ignore[union-attr]
        assert (minor, sock) == ("0", str(tmp_path / "run" / f"nbd{proc.pid}.0"))
        assert (tmp_path / "run" / "tapdisk" / "tapdisk-0").exists()
        res = run([nbdinfo, "--size", f"nbd+unix:///?socket={sock}"], text=True)
        assert res.returncode == 0 and int(res.stdout) == 4 * MiB
        res = run([nbdinfo, "--json", f"nbd+unix:///?socket={sock}"], text=True)
        assert '"is_read_only": true' in res.stdout
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
    assert list((tmp_path / "run" / "tapdisk").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["tapdisk"]


def test_sighup_reopens_the_log(daemon: Daemon, disk: Path) -> None:
    """Log rotation: the file moved away, SIGHUP makes tapdisk open a new one there and
    log into it."""
    log = daemon.log_dir / f"tapdisk.{daemon.pid}.log"
    rotated = daemon.log_dir / "rotated.log"
    log.rename(rotated)
    os.kill(daemon.pid, signal.SIGHUP)
    deadline = time.monotonic() + 30
    while not log.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    minor = daemon.open_disk(disk)
    deadline = time.monotonic() + 30
    while f"minor {minor}: opened" not in log.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "opened" not in rotated.read_text()


def test_resume_with_filters_is_unsupported(daemon: Daemon, disk: Path) -> None:
    """unpause -2 with an empty secondary, or -s without one: EINVAL; unpause -c with a
    log that is not there: ENOENT at once; the disk stays paused and a plain resume still
    works."""
    minor = daemon.open_disk(disk)
    daemon.ok(msg(PAUSE, minor), PAUSE_RSP)
    r = daemon.request(msg(RESUME, minor, params("", F_SECONDARY, secondary="")))
    assert r.error == errno.EINVAL
    r = daemon.request(msg(RESUME, minor, params("", 0x100)))  # standby, no secondary
    assert r.error == errno.EINVAL
    r = daemon.request(msg(RESUME, minor, params("", F_ADD_LOG)),
                       f"{disk}.none.cbtlog".encode().ljust(256, b"\0"))
    assert r.error == errno.ENOENT
    assert daemon.listing()[0][2] & 0x20
    daemon.ok(msg(RESUME, minor, params("")), RESUME_RSP)
    assert daemon.listing()[0][2] == 0
