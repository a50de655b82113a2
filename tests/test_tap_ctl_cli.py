"""tap-ctl without a real tapdisk: usage and exit codes, minors, list formats, spawn, and the
exact request bytes (checked by a stand-in peer with its own struct layout).

The stand-in (``Peer``) packs and unpacks the reference's 544-byte message with formats
written here from the C header, not with ``blktap.control.message``, so that an error in
the codec cannot hide itself. Real-daemon tests live with the daemon.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import pty
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import tty
from collections.abc import Callable, Iterator

import pytest

from blktap.cli import tap_ctl

# ----------------------------------------------------------------------------- layout
# Written from include/tapdisk-message.h for x86_64, independently of message.py.
MSG_SIZE = 544
HEAD = struct.Struct("<HH4x")
OPEN_PARAMS = struct.Struct("<III256sIH256s")  # flags devnum domid path prt timeout secondary
LIST_ENTRY = struct.Struct("<iii256s")  # count minor state path
ERROR_BODY = struct.Struct("<i256s")  # error message
T_ERROR, T_PID, T_PID_RSP, T_ATTACH, T_OPEN, T_PAUSE, T_RESUME, T_CLOSE = 1, 3, 4, 5, 7, 9, 11, 13
T_DETACH, T_LIST, T_LIST_RSP, T_STATS, T_STATS_RSP, T_FORCE = 15, 19, 20, 21, 22, 23
F_RDONLY, F_ADD_LOG, F_ADD_LCACHE, F_REUSE_PRT = 0x2, 0x10, 0x20, 0x40
F_SECONDARY, F_STANDBY, F_NO_O_DIRECT, F_ENCRYPTED = 0x80, 0x100, 0x200, 0x400


def msg(mtype: int, cookie: int = 0, body: bytes = b"") -> bytes:
    out = HEAD.pack(mtype, cookie) + body
    assert len(out) <= MSG_SIZE
    return out.ljust(MSG_SIZE, b"\0")


def params_msg(mtype: int, cookie: int, flags: int, path: bytes, *, devnum: int = 0,
               prt: int = 0, timeout: int = 0, secondary: bytes = b"") -> bytes:
    return msg(mtype, cookie, OPEN_PARAMS.pack(flags, devnum, 0, path, prt, timeout, secondary))


def error_msg(code: int, text: bytes = b"") -> bytes:
    return msg(T_ERROR, 0, ERROR_BODY.pack(code, text))


def recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


class Peer:
    """A stand-in tapdisk on ``<dir>/ctl<tid>``: records each request (message and
    trailers, read as the reference tapdisk reads them) and answers it."""

    def __init__(self, rundir: str, tid: int) -> None:
        self.tid = tid
        self.requests: list[bytes] = []
        self.vbds: list[tuple[int, int, bytes]] = []  # (minor, state, "type:path")
        self.answers: dict[int, Callable[[int], bytes | None]] = {}
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(os.path.join(rundir, f"ctl{tid}"))
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def types(self) -> list[int]:
        return [HEAD.unpack_from(r)[0] for r in self.requests]

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(10)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                head = recv_exact(conn, MSG_SIZE)
                if len(head) < MSG_SIZE:
                    continue
                mtype, cookie = HEAD.unpack_from(head)
                extra = b""
                if mtype in (T_OPEN, T_RESUME):
                    (flags,) = struct.unpack_from("<I", head, 8)
                    if flags & F_ADD_LOG:
                        extra += recv_exact(conn, 256)
                    if mtype == T_OPEN and flags & F_ENCRYPTED:
                        size = recv_exact(conn, 1)
                        extra += size + recv_exact(conn, size[0])
                self.requests.append(head + extra)
                reply = self._answer(mtype, cookie)
                if reply:
                    conn.sendall(reply)

    def _answer(self, mtype: int, cookie: int) -> bytes | None:
        if mtype in self.answers:
            return self.answers[mtype](cookie)
        if mtype == T_PID:
            return msg(T_PID_RSP, cookie, struct.pack("<i", self.tid))
        if mtype == T_LIST:
            n = len(self.vbds)
            out = b"".join(msg(T_LIST_RSP, cookie, LIST_ENTRY.pack(n - i, minor, state, path))
                           for i, (minor, state, path) in enumerate(self.vbds))
            return out + msg(T_LIST_RSP, cookie, LIST_ENTRY.pack(0, -1, 0, b""))
        if mtype == T_FORCE:
            return msg(T_CLOSE + 1, cookie)
        return msg(mtype + 1, cookie)  # the *_RSP of every request is its number + 1


# Ids far above any pid_max so that no real process is ever meant.
TID = 5000001


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture
def rundir(monkeypatch) -> Iterator[str]:
    # Short on purpose: a unix socket path must fit in 108 bytes.
    base = tempfile.mkdtemp(prefix="tc", dir="/tmp")
    d = os.path.join(base, "rc")
    os.mkdir(d, 0o700)
    monkeypatch.setenv("BLKTAP_CONTROL_DIR", d)
    monkeypatch.delenv("TAPDISK", raising=False)
    yield d
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def peer(rundir) -> Iterator[Peer]:
    p = Peer(rundir, TID)
    yield p
    p.close()


def tapctl(capsys, *args: str, stdin: bytes | None = None,
           monkeypatch: pytest.MonkeyPatch | None = None) -> tuple[int, str, str]:
    """Run tap-ctl in this process: (exit code, stdout, stderr)."""
    if stdin is not None:
        assert monkeypatch is not None
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = tap_ctl.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def tapctl_proc(*args: str, tty_out: bool = False, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
    """Run tap-ctl as a program, stdout on a pipe or on a pseudo-terminal (raw mode, so
    the bytes are what it wrote)."""
    argv = [sys.executable, "-m", "blktap.cli.tap_ctl", *args]
    if not tty_out:
        p = subprocess.run(argv, input=stdin, capture_output=True, timeout=120)
        return p.returncode, p.stdout, p.stderr
    master, slave = pty.openpty()
    try:
        tty.setraw(slave)
        p = subprocess.run(argv, input=stdin, stdout=slave, stderr=subprocess.PIPE,
                           timeout=120)
    finally:
        os.close(slave)
    data = b""
    try:
        while select.select([master], [], [], 5)[0]:
            chunk = os.read(master, 4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass  # EIO: the terminal's other side is closed and drained
    finally:
        os.close(master)
    return p.returncode, data, p.stderr


def fake_tapdisk(rundir: str, body: str) -> str:
    """A stand-in tapdisk launcher: a shell script with ``body``."""
    path = os.path.join(os.path.dirname(rundir), "fake-tapdisk")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body + "\n")
    os.chmod(path, 0o755)
    return path


HELP = ("usage: tap-ctl COMMAND [OPTIONS]\n"
        "COMMAND := { list | allocate | free | create | destroy | spawn | attach | detach | "
        "open | close | pause | unpause | stats }\n")


# ----------------------------------------------------------------------------- usage
@pytest.mark.parametrize("argv", [[], ["bogus"], ["--debug", "list"], ["x" * 30]])
def test_no_or_unknown_command_prints_help_and_exits_0(capsys, rundir, argv):
    assert tapctl(capsys, *argv) == (0, HELP, "")


USAGES = {
    "list": tap_ctl.LIST_USAGE, "allocate": tap_ctl.ALLOCATE_USAGE,
    "free": tap_ctl.FREE_USAGE, "create": tap_ctl.CREATE_USAGE,
    "destroy": tap_ctl.DESTROY_USAGE, "spawn": tap_ctl.SPAWN_USAGE,
    "attach": tap_ctl.ATTACH_USAGE, "detach": tap_ctl.DETACH_USAGE,
    "open": tap_ctl.OPEN_USAGE, "close": tap_ctl.CLOSE_USAGE, "pause": tap_ctl.PAUSE_USAGE,
    "unpause": tap_ctl.UNPAUSE_USAGE, "stats": tap_ctl.STATS_USAGE,
}


def test_usage_texts_are_the_references():
    assert tap_ctl.FREE_USAGE == "usage: free <-m minor>\n"
    assert tap_ctl.LIST_USAGE == ("usage: list [-h] [-p pid] [-m minor] [-t type] [-f file]\n\n"
                                  "Lists tapdisks in the following format:\n"
                                  "     pid minor state       type file\n")
    assert tap_ctl.CLOSE_USAGE == "usage: close <-p pid> <-m minor> [-f force] [-t timeout secs]\n"
    assert tap_ctl.UNPAUSE_USAGE.startswith(
        "usage: unpause <-p pid> <-m minor> [-a type:/path/to/file] [-2 secondary] [-c </path/")
    assert tap_ctl.OPEN_USAGE.endswith("[-E read encryption key from stdin]\n")
    assert sorted(USAGES) == sorted(tap_ctl.COMMANDS)


@pytest.mark.parametrize("command", sorted(USAGES))
def test_dash_h_prints_usage_and_exits_0(capsys, rundir, command):
    code, out, err = tapctl(capsys, command, "-h")
    assert code == 0
    if command == "attach":  # the reference prints this one on stderr
        assert (out, err) == ("", USAGES[command])
    else:
        assert (out, err) == (USAGES[command], "")


@pytest.mark.parametrize("argv", [
    ["free"], ["free", "-m", "-1"], ["create"], ["create", "-R"], ["destroy", "-p", "1"],
    ["destroy", "-m", "1"], ["attach", "-m", "0"], ["detach", "-p", "1"],
    ["open", "-p", "1", "-m", "0"], ["open", "-m", "0", "-a", "vhd:/x"], ["close", "-p", "1"],
    ["pause", "-m", "0"], ["unpause", "-p", "1"], ["stats", "-m", "0"],
])
def test_missing_required_options_print_usage_and_exit_einval(capsys, rundir, argv):
    code, out, err = tapctl(capsys, *argv)
    assert (code, out) == (errno.EINVAL, "")
    assert err == USAGES[argv[0]] + "Invalid argument\n"


@pytest.mark.parametrize("argv, diagnostic", [
    (["list", "-Z"], "list: invalid option -- 'Z'\n"),
    (["free", "-m"], "free: option requires an argument -- 'm'\n"),
    (["spawn", "-c", "slice"], "spawn: invalid option -- 'c'\n"),
    (["open", "-x", "-y"], "open: invalid option -- 'x'\n"),  # only the first is reported
    (["pause", "-p", "1", "-m", "0", "-f"], "pause: invalid option -- 'f'\n"),
    (["unpause", "-C", "/log"], "unpause: invalid option -- 'C'\n"),
])
def test_bad_options_print_getopt_diagnostic_usage_and_exit_einval(capsys, rundir, argv,
                                                                   diagnostic):
    code, out, err = tapctl(capsys, *argv)
    assert (code, out) == (errno.EINVAL, "")
    assert err == diagnostic + USAGES[argv[0]] + "Invalid argument\n"


def test_h_stops_option_processing_as_getopt_reaches_it(capsys, rundir):
    # -h before the bad option wins; after it, the bad option does.
    assert tapctl(capsys, "free", "-h", "-Z")[0] == 0
    assert tapctl(capsys, "free", "-Z", "-h")[0] == errno.EINVAL


def test_debug_is_removed_anywhere_after_the_command(capsys, rundir):
    assert tapctl(capsys, "free", "--debug")[2] == tap_ctl.FREE_USAGE + "Invalid argument\n"
    code, out, err = tapctl(capsys, "allocate", "--debug")
    assert (code, err) == (0, "")
    assert out.endswith("/tapdisk/tapdisk-0\n")


# ----------------------------------------------------------------------------- minors
def test_allocate_prints_marker_path_that_sm_parses(capsys, rundir):
    # sm: re.search("/run/blktap-control/tapdisk/tapdisk-(\d+)$", line), here in our dir.
    sm_regex = re.compile(re.escape(rundir) + r"/tapdisk/tapdisk-(\d+)$")
    for want in (0, 1):
        code, out, err = tapctl(capsys, "allocate")
        assert (code, err) == (0, "")
        assert out.count("\n") == 1 and out.endswith("\n")
        hit = sm_regex.search(out.splitlines()[0])
        assert hit and int(hit.group(1)) == want
        assert os.path.isfile(out.strip())
    code, out, _ = tapctl(capsys, "allocate", "-d", "/dev/xen/blktap-2/tapdev9")
    assert (code, out) == (0, f"{rundir}/tapdisk/tapdisk-2\n")  # -d is accepted, unused


def test_free_unlinks_marker_silently(capsys, rundir):
    tapctl(capsys, "allocate")
    assert tapctl(capsys, "free", "-m", "0") == (0, "", "")
    assert not os.path.exists(f"{rundir}/tapdisk/tapdisk-0")


@pytest.mark.parametrize("minor", ["0", "7", "abc", "99999", "-5"])
def test_free_of_a_minor_not_allocated_is_enoent(capsys, rundir, minor):
    # "abc" is minor 0 to atoi, as in the reference.
    assert tapctl(capsys, "free", "-m", minor) == (errno.ENOENT, "",
                                                   "No such file or directory\n")


def test_free_of_a_held_minor_is_ewouldblock_and_keeps_it(capsys, rundir):
    tapctl(capsys, "allocate")
    marker = f"{rundir}/tapdisk/tapdisk-0"
    fd = os.open(marker, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what an attached tapdisk holds
        assert tapctl(capsys, "free", "-m", "0") == (
            errno.EWOULDBLOCK, "", "Resource temporarily unavailable\n")
        assert os.path.exists(marker)
    finally:
        os.close(fd)
    assert tapctl(capsys, "free", "-m", "0")[0] == 0


# ----------------------------------------------------------------------------- list
def test_list_of_nothing_prints_nothing(capsys, rundir):
    assert tapctl(capsys, "list") == (0, "", "")
    shutil.rmtree(rundir)  # no runtime directory at all: still nothing, still 0
    assert tapctl(capsys, "list") == (0, "", "")


def test_list_orphan_markers_on_a_pipe_and_on_a_terminal(capsys, rundir):
    for _ in range(3):
        tapctl(capsys, "allocate")
    tapctl(capsys, "free", "-m", "1")
    assert tapctl(capsys, "list") == (0, "minor=0\nminor=2\n", "")
    assert tapctl(capsys, "list", "-m", "2") == (0, "minor=2\n", "")
    assert tapctl(capsys, "list", "-t", "vhd") == (0, "", "")  # no type: filtered out
    code, out, err = tapctl_proc("list", tty_out=True)
    assert (code, err) == (0, b"")
    assert out == (b"       -    0    -          - -\n"
                   b"       -    2    -          - -\n")
    assert tapctl_proc("list") == (0, b"minor=0\nminor=2\n", b"")


def stale_socket(rundir: str, tid: int) -> str:
    """The socket file a killed tapdisk leaves: nobody listens, connect is refused."""
    path = os.path.join(rundir, f"ctl{tid}")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    return path


def test_list_skips_the_stale_socket_of_a_dead_tapdisk(capsys, rundir):
    stale_socket(rundir, TID + 5)
    tapctl(capsys, "allocate")
    assert tapctl(capsys, "list") == (0, "minor=0\n", "")
    assert tapctl(capsys, "list", "-p", str(TID + 5)) == (0, "", "")


def test_stale_socket_elsewhere_is_econnrefused(capsys, rundir):
    stale_socket(rundir, TID + 5)
    assert tapctl(capsys, "attach", "-p", str(TID + 5), "-m", "0") == (
        errno.ECONNREFUSED, "", "Connection refused\n")
    code, _, err = tapctl(capsys, "pause", "-p", str(TID + 5), "-m", "0", "--debug")
    assert code == errno.ECONNREFUSED
    assert "stale socket of a dead tapdisk" in err and err.endswith("Connection refused\n")


def test_no_such_tapdisk_is_enoent(capsys, rundir):
    assert tapctl(capsys, "detach", "-p", str(TID + 6), "-m", "0") == (
        errno.ENOENT, "", "No such file or directory\n")
    assert tapctl(capsys, "stats", "-p", "-7", "-m", "0") == (
        errno.EINVAL, "", "Invalid argument\n")


def test_list_is_the_three_way_join(capsys, rundir, peer):
    for _ in range(4):
        tapctl(capsys, "allocate")
    # Sent in this order; tap-ctl prints them reversed, as the reference does.
    peer.vbds = [(0, 0, b"vhd:/srv/a.vhd"), (3, 0x2, b""), (2, 0x2A, b"aio:/srv/b c.img")]
    idle = Peer(rundir, TID + 1)  # a tapdisk serving no VBD
    stale_socket(rundir, TID + 2)
    try:
        code, out, err = tapctl(capsys, "list")
        assert (code, err) == (0, "")
        assert out == (f"pid={TID} minor=2 state=0x2a args=aio:/srv/b c.img\n"
                       f"pid={TID} minor=3 state=0x2\n"
                       f"pid={TID} minor=0 state=0 args=vhd:/srv/a.vhd\n"
                       f"pid={TID + 1}\n"
                       "minor=1\n")
        # What sm does with a line: split(' ', 3), int(state, 16); xapi: literal "0x2a".
        first = out.splitlines()[0].split(" ", 3)
        assert int(first[2].split("=")[1], 16) == 0x2A and first[3] == "args=aio:/srv/b c.img"
        assert tapctl(capsys, "list", "-m", "3")[1] == f"pid={TID} minor=3 state=0x2\n"
        assert tapctl(capsys, "list", "-t", "vhd")[1] == (
            f"pid={TID} minor=0 state=0 args=vhd:/srv/a.vhd\n")
        assert tapctl(capsys, "list", "-f", "/srv/b c.img")[1].startswith(f"pid={TID} minor=2")
        assert tapctl(capsys, "list", "-p", str(TID + 1))[1] == f"pid={TID + 1}\n"
        assert tapctl(capsys, "list", "-p", str(TID), "-m", "0")[1] == (
            f"pid={TID} minor=0 state=0 args=vhd:/srv/a.vhd\n")
        code, out, err = tapctl_proc("list", tty_out=True)
        assert (code, err) == (0, b"")
        assert out.decode() == (f" {TID}    2 0x2a        aio /srv/b c.img\n"
                                f" {TID}    3  0x2          - -\n"
                                f" {TID}    0    0        vhd /srv/a.vhd\n"
                                f" {TID + 1}    -    -          - -\n"
                                "       -    1    -          - -\n")
        # Each LIST is preceded by a PID on its own connection; LIST's cookie is 0xffff.
        assert peer.types() == [T_PID, T_LIST] * 6  # six lists reached this tapdisk
        assert all(r == msg(T_LIST, 0xFFFF) for r in peer.requests[1::2])
        assert all(r == msg(T_PID) for r in peer.requests[0::2])
    finally:
        idle.close()


def test_list_shows_a_tapdisk_whose_list_fails_as_its_pid(capsys, rundir, peer):
    peer.answers[T_LIST] = lambda cookie: error_msg(errno.EIO)
    tapctl(capsys, "allocate")
    assert tapctl(capsys, "list") == (0, f"pid={TID}\nminor=0\n", "")


# ----------------------------------------------------------------------------- requests
def test_attach_detach_send_the_minor_as_cookie(capsys, rundir, peer):
    assert tapctl(capsys, "attach", "-p", str(TID), "-m", "7") == (0, "", "")
    assert tapctl(capsys, "detach", "-p", str(TID), "-m", "7") == (0, "", "")
    assert peer.requests == [msg(T_ATTACH, 7), msg(T_DETACH, 7)]


def test_open_request_bytes(capsys, rundir, peer):
    argv = ["open", "-p", str(TID), "-m", "3", "-a", "vhd:/srv/d.vhd"]
    assert tapctl(capsys, *argv) == (0, "", "")
    assert tapctl(capsys, *argv, "-R", "-D", "-t", "30") == (0, "", "")
    assert tapctl(capsys, *argv, "-r", "-e", "5", "-2", "vhd:/srv/mirror.vhd", "-s") == (0, "", "")
    assert tapctl(capsys, *argv, "-t", "70000") == (0, "", "")  # a u16, as C truncates it
    assert peer.requests == [
        params_msg(T_OPEN, 3, 0, b"vhd:/srv/d.vhd", devnum=3, prt=0xFFFFFFFF),
        params_msg(T_OPEN, 3, F_RDONLY | F_NO_O_DIRECT, b"vhd:/srv/d.vhd", devnum=3,
                   prt=0xFFFFFFFF, timeout=30),
        params_msg(T_OPEN, 3, F_ADD_LCACHE | F_REUSE_PRT | F_SECONDARY | F_STANDBY,
                   b"vhd:/srv/d.vhd", devnum=3, prt=5, secondary=b"vhd:/srv/mirror.vhd"),
        params_msg(T_OPEN, 3, 0, b"vhd:/srv/d.vhd", devnum=3, prt=0xFFFFFFFF,
                   timeout=70000 & 0xFFFF),
    ]


def test_open_with_cbt_log_and_key_sends_both_trailers_in_order(capsys, monkeypatch, rundir,
                                                                peer):
    key = bytes(range(64))
    code, out, err = tapctl(capsys, "open", "-p", str(TID), "-m", "1", "-a", "vhd:/d.vhd",
                            "-C", "/srv/d.log", "-E", stdin=key, monkeypatch=monkeypatch)
    assert (code, out, err) == (0, "", "")
    head = params_msg(T_OPEN, 1, F_ADD_LOG | F_ENCRYPTED, b"vhd:/d.vhd", devnum=1,
                      prt=0xFFFFFFFF)
    assert peer.requests == [head + b"/srv/d.log".ljust(256, b"\0") + b"\x40" + key]


@pytest.mark.parametrize("size", [0, 10, 31, 33, 63, 65, 128, 2000])
def test_open_key_of_a_wrong_size_exits_1(capsys, monkeypatch, rundir, peer, size):
    code, out, err = tapctl(capsys, "open", "-p", str(TID), "-m", "1", "-a", "vhd:/d.vhd",
                            "-E", stdin=b"k" * size, monkeypatch=monkeypatch)
    assert (code, out) == (1, "")
    assert err == "Unsupported keysize, use either 256 bit or 512 bit key\n"
    assert peer.requests == []


def test_open_key_is_read_when_E_is_reached(capsys, monkeypatch, rundir):
    # As the reference: -E reads stdin at once, before the missing -p is noticed...
    code, _, err = tapctl(capsys, "open", "-E", stdin=b"short", monkeypatch=monkeypatch)
    assert (code, err) == (1, "Unsupported keysize, use either 256 bit or 512 bit key\n")
    # ... and a second -E is refused.
    code, _, err = tapctl(capsys, "open", "-E", "-E", stdin=b"k" * 32, monkeypatch=monkeypatch)
    assert (code, err) == (1, "Only supply -E once\n")


def test_open_of_an_over_long_path_is_enametoolong_before_connecting(capsys, rundir, peer):
    code, _, err = tapctl(capsys, "open", "-p", str(TID), "-m", "1", "-a", "vhd:/" + "x" * 300)
    assert (code, err) == (errno.ENAMETOOLONG, "File name too long\n")
    assert peer.requests == []


def test_unpause_request_bytes(capsys, rundir, peer):
    base = ["unpause", "-p", str(TID), "-m", "4"]
    assert tapctl(capsys, *base) == (0, "", "")
    assert tapctl(capsys, *base, "-a", "vhd:/srv/new.vhd") == (0, "", "")
    assert tapctl(capsys, *base, "-a", "vhd:/n.vhd", "-2", "nbd:/s", "-c", "/l.log") == (0, "",
                                                                                         "")
    assert peer.requests == [
        params_msg(T_RESUME, 4, 0, b""),
        params_msg(T_RESUME, 4, 0, b"vhd:/srv/new.vhd"),
        params_msg(T_RESUME, 4, F_SECONDARY | F_ADD_LOG, b"vhd:/n.vhd", secondary=b"nbd:/s")
        + b"/l.log".ljust(256, b"\0"),
    ]


def test_close_force_pause_and_pause_timeout(capsys, rundir, peer):
    for argv in (["close"], ["close", "-f"], ["close", "-t", "120", "-f"], ["pause"],
                 ["pause", "-t", "5"]):  # pause -t fails in the reference (a missing break)
        assert tapctl(capsys, *argv, "-p", str(TID), "-m", "2") == (0, "", "")
    assert peer.requests == [msg(T_CLOSE, 2), msg(T_FORCE, 2), msg(T_FORCE, 2),
                             msg(T_PAUSE, 2), msg(T_PAUSE, 2)]


@pytest.mark.parametrize("argv", [
    ["pause"], ["unpause"], ["close"], ["attach"], ["detach"], ["stats"],
    ["open", "-a", "vhd:/x.vhd"], ["destroy"],
])
def test_error_reply_gives_strerror_and_its_errno(capsys, rundir, peer, argv):
    for t in (T_PAUSE, T_RESUME, T_CLOSE, T_ATTACH, T_DETACH, T_STATS, T_OPEN):
        peer.answers[t] = lambda cookie: error_msg(errno.EBUSY, b"still in use")
    assert tapctl(capsys, *argv, "-p", str(TID), "-m", "0") == (
        errno.EBUSY, "", "Device or resource busy\n")
    code, _, err = tapctl(capsys, *argv, "-p", str(TID), "-m", "0", "--debug")
    assert code == errno.EBUSY and "still in use" in err
    assert err.endswith("\nDevice or resource busy\n")


def test_wrong_reply_type_is_einval_and_no_reply_is_eio(capsys, rundir, peer):
    peer.answers[T_PAUSE] = lambda cookie: msg(T_LIST_RSP, cookie)
    peer.answers[T_CLOSE] = lambda cookie: None  # hangs up without answering
    assert tapctl(capsys, "pause", "-p", str(TID), "-m", "0")[0] == errno.EINVAL
    assert tapctl(capsys, "close", "-p", str(TID), "-m", "0") == (
        errno.EIO, "", "Input/output error\n")


def test_stats_prints_the_text_and_two_newlines(capsys, rundir, peer):
    text = b'{ "name": "vhd:/srv/td.vhd", "secs": [ 1, 2 ] }'
    peer.answers[T_STATS] = lambda cookie: (
        msg(T_STATS_RSP, 0, struct.pack("<HH4xQ", 0, 0, len(text))) + text)
    assert tapctl(capsys, "stats", "-p", str(TID), "-m", "6") == (0, text.decode() + "\n\n", "")
    assert peer.requests == [msg(T_STATS, 6)]


def test_destroy_is_close_detach_free(capsys, rundir, peer):
    tapctl(capsys, "allocate")
    assert tapctl(capsys, "destroy", "-p", str(TID), "-m", "0", "-t", "30") == (0, "", "")
    assert peer.requests == [msg(T_CLOSE, 0), msg(T_DETACH, 0)]
    assert not os.path.exists(f"{rundir}/tapdisk/tapdisk-0")


def test_destroy_stops_at_the_first_failure(capsys, rundir, peer):
    tapctl(capsys, "allocate")
    peer.answers[T_CLOSE] = lambda cookie: error_msg(errno.EBUSY)
    assert tapctl(capsys, "destroy", "-p", str(TID), "-m", "0")[0] == errno.EBUSY
    assert peer.types() == [T_CLOSE]
    assert os.path.exists(f"{rundir}/tapdisk/tapdisk-0")
    # A minor still held after the detach (the tapdisk did not let go) is EWOULDBLOCK.
    del peer.answers[T_CLOSE]
    fd = os.open(f"{rundir}/tapdisk/tapdisk-0", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert tapctl(capsys, "destroy", "-p", str(TID), "-m", "0")[0] == errno.EWOULDBLOCK
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- spawn
def test_spawn_prints_the_id_on_a_pipe_and_a_sentence_on_a_terminal(monkeypatch, rundir):
    fake = fake_tapdisk(rundir, 'echo "$BLKTAP_CONTROL_DIR/ctl4242"')
    monkeypatch.setenv("TAPDISK", fake)
    assert tapctl_proc("spawn") == (0, b"4242\n", b"")
    assert tapctl_proc("spawn", tty_out=True) == (0, b"tapdisk spawned with pid 4242\n", b"")


@pytest.mark.parametrize("body, code", [
    ("exit 0", errno.EPROTO),  # printed nothing
    ("echo hello", errno.EPROTO),  # printed something else
    ('echo "/elsewhere/ctl4242"', errno.EPROTO),  # serves in another directory
    ("exit 1", 1),  # sm retries spawn on exit status 1
    ("exit 28", errno.ENOSPC),
    ("kill -TERM $$", errno.EINTR),
])
def test_spawn_failures(capsys, monkeypatch, rundir, body, code):
    monkeypatch.setenv("TAPDISK", fake_tapdisk(rundir, body))
    assert tapctl(capsys, "spawn") == (code, "", os.strerror(code) + "\n")


def test_spawn_of_a_missing_binary_is_enoent(capsys, monkeypatch, rundir):
    monkeypatch.setenv("TAPDISK", os.path.join(rundir, "no-such-tapdisk"))
    assert tapctl(capsys, "spawn") == (errno.ENOENT, "", "No such file or directory\n")


def test_spawn_time_limit_from_the_environment(capsys, monkeypatch, rundir):
    # A tapdisk that never prints: given up after $BLKTAP_SPAWN_TIMEOUT (ETIMEDOUT)...
    monkeypatch.setenv("TAPDISK", fake_tapdisk(rundir, "exec sleep 30"))
    monkeypatch.setenv("BLKTAP_SPAWN_TIMEOUT", "0.5")
    assert tapctl(capsys, "spawn")[0] == errno.ETIMEDOUT
    # ...a longer limit is taken as given, and nonsense leaves the default.
    from blktap.control.client import SPAWN_TIMEOUT, spawn_timeout
    monkeypatch.setenv("BLKTAP_SPAWN_TIMEOUT", "600")
    assert spawn_timeout() == 600
    for bad in ("", "0", "-3", "soon"):
        monkeypatch.setenv("BLKTAP_SPAWN_TIMEOUT", bad)
        assert spawn_timeout() == SPAWN_TIMEOUT


def test_spawn_retries_a_tapdisk_killed_by_sigusr1(capsys, monkeypatch, rundir):
    count = os.path.join(os.path.dirname(rundir), "tries")
    monkeypatch.setenv("TAPDISK", fake_tapdisk(rundir, (
        f'echo x >> {count}\n'
        f'[ $(wc -l < {count}) -lt 2 ] && kill -USR1 $$\n'
        'echo "$BLKTAP_CONTROL_DIR/ctl77"')))
    assert tapctl(capsys, "spawn") == (0, "77\n", "")
    with open(count) as f:
        assert len(f.readlines()) == 2


# ----------------------------------------------------------------------------- create
def test_create_is_allocate_spawn_attach_open(capsys, monkeypatch, rundir, peer):
    monkeypatch.setenv("TAPDISK", fake_tapdisk(rundir, f'echo "$BLKTAP_CONTROL_DIR/ctl{TID}"'))
    code, out, err = tapctl(capsys, "create", "-a", "vhd:/srv/c.vhd", "-R", "-t", "9",
                            "-C", "/srv/c.log")
    assert (code, out, err) == (0, f"{rundir}/tapdisk/tapdisk-0\n", "")
    assert peer.requests == [
        msg(T_ATTACH, 0),
        params_msg(T_OPEN, 0, F_RDONLY | F_ADD_LOG, b"vhd:/srv/c.vhd", prt=0xFFFFFFFF,
                   timeout=9) + b"/srv/c.log".ljust(256, b"\0"),
    ]
    assert os.path.exists(f"{rundir}/tapdisk/tapdisk-0")


def test_create_unwinds_a_failed_open_with_detach_and_free(capsys, monkeypatch, rundir, peer):
    monkeypatch.setenv("TAPDISK", fake_tapdisk(rundir, f'echo "$BLKTAP_CONTROL_DIR/ctl{TID}"'))
    peer.answers[T_OPEN] = lambda cookie: error_msg(errno.ENOENT)
    assert tapctl(capsys, "create", "-a", "vhd:/srv/missing.vhd") == (
        errno.ENOENT, "", "No such file or directory\n")
    assert peer.types() == [T_ATTACH, T_OPEN, T_DETACH]
    assert os.listdir(f"{rundir}/tapdisk") == []


def test_create_unwinds_a_failed_attach_or_spawn_with_free(capsys, monkeypatch, rundir, peer):
    monkeypatch.setenv("TAPDISK", fake_tapdisk(rundir, f'echo "$BLKTAP_CONTROL_DIR/ctl{TID}"'))
    peer.answers[T_ATTACH] = lambda cookie: error_msg(errno.EEXIST)
    assert tapctl(capsys, "create", "-a", "vhd:/x.vhd")[0] == errno.EEXIST
    assert peer.types() == [T_ATTACH]
    assert os.listdir(f"{rundir}/tapdisk") == []
    monkeypatch.setenv("TAPDISK", fake_tapdisk(rundir, "exit 1"))
    assert tapctl(capsys, "create", "-a", "vhd:/x.vhd")[0] == 1
    assert os.listdir(f"{rundir}/tapdisk") == []


def test_close_timeout_bounds_the_wait_for_a_reply(capsys, rundir, peer):
    release = threading.Event()

    def mute(cookie: int) -> None:
        release.wait(60)  # holds the connection open without answering
        return None

    peer.answers[T_CLOSE] = mute
    try:
        assert tapctl(capsys, "close", "-p", str(TID), "-m", "0", "-t", "1") == (
            errno.ETIMEDOUT, "", "Connection timed out\n")
    finally:
        release.set()
