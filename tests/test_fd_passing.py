"""The fd-passing sockets of a tapdisk, as the reference's td-fdreceiver, with real peers:

- ``nbdserver-new<pid>.<minor>`` / ``nbdserver<pid>.<minor>``: one end of a socketpair
  handed over becomes a client of the VBD's export; libnbd drives the other end
  (``connect_socket``) and sees the fixed newstyle / the oldstyle handshake, reading what
  the image holds and writing what then lands in it;
- ``nbdclient<pid>``: a socket connected to qemu-nbd, handed over under a name, becomes
  the secondary of ``tap-ctl open -2 nbd:NAME`` or ``unpause -2 nbd:NAME`` (the writes are
  on qemu-nbd's file); at most 10 names, a name again replaces, one use each;
- bad senders (no descriptor, several, not a socket, silent, garbage, bad names): each is
  logged and closed, and the tapdisk goes on serving.
"""

from __future__ import annotations

import array
import errno
import json
import os
import random
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import need, run

# host is a fixture this module uses.
from test_mirror import host, qemu_io, tapdisk_log  # noqa: F401
from test_tap_ctl_daemon import Host

KiB = 1 << 10
MiB = 1 << 20
SIZE = 8 * MiB
SYSTEM_PYTHON = "/usr/bin/python3"

# Driven through a socket handed to it: reads what the image holds (its first MiB is
# random bytes the test wrote), writes patterns, reads them back, flushes if it may.
LIBNBD_CLIENT = """
import json, sys
import nbd
fd, size = int(sys.argv[1]), int(sys.argv[2])
h = nbd.NBD()
h.connect_socket(fd)
out = {"protocol": h.get_protocol(), "size": h.get_size(),
       "structured": h.get_structured_replies_negotiated(),
       "head": h.pread(64 * 1024, 0).hex()}
for i, off in enumerate((1 << 20, 3 << 20, size - 4096)):
    h.pwrite(bytes([0x40 + i]) * 4096, off)
    assert h.pread(4096, off) == bytes([0x40 + i]) * 4096
if h.can_flush():
    h.flush()
out["flush"] = h.can_flush()
h.shutdown()
print(json.dumps(out))
"""


def need_libnbd() -> None:
    if run([SYSTEM_PYTHON, "-c", "import nbd"]).returncode != 0:
        pytest.skip("python3-libnbd not installed (make test installs it)")


def send_fds(path: Path | str, fds: list[int], payload: bytes) -> None:
    """One message on an fd-passing socket: the payload, the descriptors."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(str(path))
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        c.sendmsg([payload], anc)


def wait_closed(sock: socket.socket, timeout: float = 30) -> None:
    """The other end of ``sock`` was closed by everyone who held it: EOF."""
    sock.settimeout(timeout)
    assert sock.recv(1) == b""


def still_open(sock: socket.socket) -> bool:
    """Nothing to read and no EOF on ``sock`` right now: its peer is held somewhere."""
    return not select.select([sock], [], [], 0)[0]


def wait_log(h: Host, pid: int, text: str, count: int = 1, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = tapdisk_log(h, pid)
        if log.count(text) >= count:
            return log
        assert time.monotonic() < deadline, f"{text!r} x{count} not in the log:\n{log}"
        time.sleep(0.05)


def drive(fd: int) -> dict:
    res = subprocess.run([SYSTEM_PYTHON, "-c", LIBNBD_CLIENT, str(fd), str(SIZE)],
                         pass_fds=[fd], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    head = random.Random(7).randbytes(MiB)
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.write(head)
        f.truncate(SIZE)
    return img, head


def check_written(img: Path, head: bytes) -> None:
    data = img.read_bytes()
    assert data[:64 * KiB] == head[:64 * KiB]
    for i, off in enumerate((MiB, 3 * MiB, SIZE - 4096)):
        assert data[off:off + 4096] == bytes([0x40 + i]) * 4096


# ------------------------------------------------------------------ nbdserver*
@pytest.mark.parametrize(("prefix", "protocol"), [("nbdserver-new", "newstyle-fixed"),
                                                  ("nbdserver", "oldstyle")])
def test_a_passed_socket_is_a_client_of_the_export(host: Host,  # noqa: F811
                                                   image: tuple[Path, bytes],
                                                   prefix: str, protocol: str) -> None:
    need_libnbd()
    img, head = image
    pid, minor = host.create(f"aio:{img}")
    path = host.run_dir / f"{prefix}{pid}.{minor}"
    assert path.is_socket()
    a, b = socket.socketpair()
    with a, b:
        send_fds(path, [a.fileno()], b"a management tool's note\0")
        a.close()
        got = drive(b.fileno())
    assert got["protocol"] == protocol and got["size"] == SIZE
    assert bytes.fromhex(got["head"]) == head[:64 * KiB]
    # Oldstyle has no options: simple replies only.
    assert got["structured"] is (protocol != "oldstyle")
    check_written(img, head)
    log = wait_log(host, pid, f"{prefix}{pid}.{minor}: received a descriptor "
                   "(payload \"a management tool's note\")")
    assert "oldstyle" in log if protocol == "oldstyle" else True
    # Gone with the VBD, like the other sockets of the minor.
    host.out("close", "-p", str(pid), "-m", str(minor))
    for name in (f"nbdserver-new{pid}.{minor}", f"nbdserver{pid}.{minor}"):
        assert not (host.run_dir / name).exists()
    assert (host.run_dir / f"nbdclient{pid}").is_socket()  # the process's, not the VBD's


def test_bad_senders_are_logged_and_the_tapdisk_serves_on(host: Host,  # noqa: F811
                                                          image: tuple[Path, bytes]) -> None:
    need_libnbd()
    img, head = image
    pid, minor = host.create(f"aio:{img}")
    path = host.run_dir / f"nbdserver-new{pid}.{minor}"
    name = path.name
    # A sender that connects and never sends: the others are served meanwhile.
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(str(path))
    # Garbage without a descriptor; a connection closed at once.
    send_fds(path, [], random.Random(1).randbytes(3000))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(str(path))
    wait_log(host, pid, f"{name}: a message of 3000 bytes without a descriptor")
    # A descriptor that is not a socket (a pipe's end): closed.
    r, w = os.pipe()
    send_fds(path, [w], b"pipe\0")
    os.close(w)
    with os.fdopen(r, "rb") as reader:
        assert reader.read() == b""  # every write end is closed: tapdisk's too
    wait_log(host, pid, f"{name}: the descriptor is not a socket")
    # More descriptors than the receiver has room for (16): the kernel closes the rest,
    # the receiver the ones it got (the first is a pipe: refused).
    pipes = [os.pipe() for _ in range(20)]
    send_fds(path, [w for _, w in pipes], b"many\0")
    for r, w in pipes:
        os.close(w)
        with os.fdopen(r, "rb") as reader:
            assert reader.read() == b""
    wait_log(host, pid, f"{name}: more than 16 descriptors in one message")
    # A datagram socket: refused.
    da, db = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with da, db:
        send_fds(path, [da.fileno()], b"dgram\0")
    wait_log(host, pid, f"{name}: the descriptor is a SOCK_DGRAM socket")
    # Several descriptors: the first is served, the others closed. A payload longer
    # than the reference's buffer, without a NUL: cut, logged.
    pairs = [socket.socketpair() for _ in range(3)]
    send_fds(path, [p[0].fileno() for p in pairs], b"x" * (20 * KiB))
    for a, _ in pairs:
        a.close()
    for _, b in pairs[1:]:
        wait_closed(b)
    wait_log(host, pid, f"{name}: 3 descriptors in one message")
    got = drive(pairs[0][1].fileno())
    assert got["protocol"] == "newstyle-fixed"
    for _, b in pairs:
        b.close()
    check_written(img, head)
    # The silent sender is closed after its time (10 s), without a reply.
    wait_closed(silent)
    silent.close()
    wait_log(host, pid, f"{name}: a sender sent nothing within 10 s")
    # The tapdisk serves on: its own socket, and the fd-passing one.
    host.serving(pid, minor, SIZE)
    a, b = socket.socketpair()
    with a, b:
        send_fds(path, [a.fileno()], b"again\0")
        a.close()
        assert drive(b.fileno())["size"] == SIZE


def test_many_silent_senders_do_not_block_the_next(host: Host,  # noqa: F811
                                                   image: tuple[Path, bytes]) -> None:
    """More silent senders than may wait: the oldest are dropped; a sender that sends
    is served at once."""
    need_libnbd()
    img, _ = image
    pid, minor = host.create(f"aio:{img}")
    path = host.run_dir / f"nbdserver{pid}.{minor}"
    silent = []
    for _ in range(40):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(path))
        silent.append(s)
    for s in silent[:8]:  # 32 may wait: the 8 oldest make room for the last 8
        wait_closed(s)
    a, b = socket.socketpair()
    with a, b:
        send_fds(path, [a.fileno()], b"\0")
        a.close()
        assert drive(b.fileno())["protocol"] == "oldstyle"
    for s in silent:
        s.close()


# ------------------------------------------------------------------ nbdclient
class QemuNbd:
    """qemu-nbd serving a raw file on a UNIX socket (many clients, persistent)."""

    def __init__(self, img: Path, sock: Path) -> None:
        self.img, self.socket = img, sock
        with open(img, "wb") as f:
            f.truncate(SIZE)
        self.proc = subprocess.Popen([need("qemu-nbd"), "-f", "raw", "-t", "-e", "4",
                                      "-k", str(sock), str(img)], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert self.proc.poll() is None, self.proc.stderr.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.02)

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.socket))
        return s

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.proc.stderr.close()  # type: ignore[union-attr]


@pytest.fixture
def targets(tmp_path: Path) -> Iterator[list[QemuNbd]]:
    servers = [QemuNbd(tmp_path / f"target{i}.img", tmp_path / f"q{i}.sock")
               for i in range(2)]
    yield servers
    for s in servers:
        s.stop()


def pass_named(h: Host, pid: int, name: bytes, sock: socket.socket) -> None:
    send_fds(h.run_dir / f"nbdclient{pid}", [sock.fileno()], name + b"\0")
    sock.close()


def test_a_passed_connection_is_a_mirror_secondary(host: Host, tmp_path: Path,  # noqa: F811
                                                  targets: list[QemuNbd]) -> None:
    """``open -2 nbd:NAME`` and ``unpause -2 nbd:NAME`` with sockets connected to qemu-nbd
    by another process: every write is on qemu-nbd's file. A name is used once."""
    leaf0, leaf1 = tmp_path / "leaf0.img", tmp_path / "leaf1.img"
    for leaf in (leaf0, leaf1):
        with open(leaf, "wb") as f:
            f.truncate(SIZE)
    pid, m0 = host.create(f"aio:{leaf0}")
    # tap-ctl open -2 nbd:NAME on a second minor of the same tapdisk.
    pass_named(host, pid, b"sec-open", targets[0].connect())
    wait_log(host, pid, "a socket kept under the name 'sec-open'")
    m1 = int(host.out("allocate").rstrip().rsplit("-", 1)[1])
    host.out("attach", "-p", str(pid), "-m", str(m1))
    host.out("open", "-p", str(pid), "-m", str(m1), "-a", f"aio:{leaf1}", "-2", "nbd:sec-open")
    # tap-ctl unpause -2 nbd:NAME on the first.
    pass_named(host, pid, b"sec-unpause", targets[1].connect())
    wait_log(host, pid, "a socket kept under the name 'sec-unpause'")
    host.out("pause", "-p", str(pid), "-m", str(m0))
    host.out("unpause", "-p", str(pid), "-m", str(m0), "-2", "nbd:sec-unpause")
    for minor, target, byte in ((m1, targets[0], 0x61), (m0, targets[1], 0x62)):
        qemu_io(host.nbd(pid, minor), f"write -P {byte:#x} 1M 192k",
                f"write -P {byte + 1:#x} 7M 4k", "flush")
        data = target.img.read_bytes()
        assert data[MiB:MiB + 192 * KiB] == bytes([byte]) * 192 * KiB
        assert data[7 * MiB:7 * MiB + 4 * KiB] == bytes([byte + 1]) * 4 * KiB
        st = json.loads(host.out("stats", "-p", str(pid), "-m", str(minor)))
        assert st["nbd_mirror_failed"] == 0 and st["mirror"]["state"] == "active"
    # Taken: a second use of a name finds nothing (ENOENT), and says why.
    leaf2 = tmp_path / "leaf2.img"
    with open(leaf2, "wb") as f:
        f.truncate(SIZE)
    m2 = int(host.out("allocate").rstrip().rsplit("-", 1)[1])
    host.out("attach", "-p", str(pid), "-m", str(m2))
    code, _, err = host.tap_ctl("open", "-p", str(pid), "-m", str(m2), "-a",
                                f"aio:{leaf2}", "-2", "nbd:sec-open", ok=False)
    assert code == errno.ENOENT, err
    # A socket connected to the disk's own export (by another process, so no path in the
    # spec says so): refused, as -2 nbd:<its own socket> is. A pause closes the
    # secondary's connection: the unpause that keeps it needs a new socket passed under
    # its name (the reference's fds are one use too).
    for n, own in enumerate((f"nbd{pid}.{m0}", f"nbd-old{pid}.{m0}"), 1):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(host.run_dir / own))
        pass_named(host, pid, b"itself", s)
        wait_log(host, pid, "a socket kept under the name 'itself'", n)
        host.out("pause", "-p", str(pid), "-m", str(m0))
        code, _, err = host.tap_ctl("unpause", "-p", str(pid), "-m", str(m0), "-2",
                                    "nbd:itself", ok=False)
        assert code == errno.EINVAL, err
        pass_named(host, pid, b"sec-unpause", targets[1].connect())
        wait_log(host, pid, "a socket kept under the name 'sec-unpause'", 1 + n)
        host.out("unpause", "-p", str(pid), "-m", str(m0))
    qemu_io(host.nbd(pid, m0), "write -P 0x71 2M 64k", "flush")
    assert targets[1].img.read_bytes()[2 * MiB:2 * MiB + 64 * KiB] == b"\x71" * 64 * KiB
    # The disk is served on as it was, from both secondaries.
    for minor in (m0, m1):
        st = json.loads(host.out("stats", "-p", str(pid), "-m", str(minor)))
        assert st["nbd_mirror_failed"] == 0 and st["mirror"]["state"] == "active"


def test_passed_names_are_kept_ten_at_most(host: Host, tmp_path: Path) -> None:  # noqa: F811
    """Ten names are kept; an eleventh is refused (closed); a name again replaces the
    socket kept (the old one closed); bad names and non-sockets are refused."""
    img = tmp_path / "d.img"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    pid, minor = host.create(f"aio:{img}")
    kept = {}
    for i in range(10):
        a, b = socket.socketpair()
        pass_named(host, pid, f"n{i}".encode(), a)
        kept[i] = b
    wait_log(host, pid, "a socket kept under the name", 10)
    a, eleventh = socket.socketpair()
    pass_named(host, pid, b"n10", a)
    wait_closed(eleventh)
    wait_log(host, pid, "10 passed sockets are kept already")
    # The same name again: the new socket replaces the old, which is closed.
    a, again = socket.socketpair()
    pass_named(host, pid, b"n3", a)
    wait_closed(kept[3])
    assert still_open(again)
    assert all(still_open(kept[i]) for i in kept if i != 3)
    # Names nbd:NAME could not say, or not UTF-8; an empty one; a pipe: refused.
    for bad in (b"a/b", b"host:1", b"", b"\xff\xfe", b"with space"):
        a, b = socket.socketpair()
        pass_named(host, pid, bad, a)
        wait_closed(b)
        b.close()
    r, w = os.pipe()
    send_fds(host.run_dir / f"nbdclient{pid}", [w], b"pipe\0")
    os.close(w)
    with os.fdopen(r, "rb") as reader:
        assert reader.read() == b""
    # The kept ones are still kept (and closed when the tapdisk goes).
    assert still_open(again) and all(still_open(kept[i]) for i in kept if i != 3)
    host.out("destroy", "-p", str(pid), "-m", str(minor))
    for s in [again, *(kept[i] for i in kept if i != 3)]:
        wait_closed(s)
        s.close()
    kept[3].close()
    eleventh.close()
