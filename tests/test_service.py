"""Running as a service: sd_notify readiness (to a test-owned datagram socket), --pidfile
and --daemon, nbdkit's captive mode (--run, read by nbdinfo), --log/--log-level (file,
syslog, stderr), the systemd units (systemd-analyze verify) and the Linux-only check."""

from __future__ import annotations

import errno
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blktap.cli import logsetup, service
from conftest import need, run, tool

MiB = 1 << 20
UNITS = Path(service.__file__).parent.parent / "data" / "systemd"


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "disk.vhd"
    run([tool("vhd-util"), "create", "-n", str(img), "-s", "16"], check=True)
    return img


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "notify"))
    s.settimeout(30)
    yield s
    s.close()


def messages(s: socket.socket) -> dict[str, str]:
    data = s.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


def test_sd_notify_unit(tmp_path: Path) -> None:
    """A path socket and an abstract one (@name) get the datagram; no $NOTIFY_SOCKET,
    or nobody listening, is no error."""
    path = tmp_path / "n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        assert service.sd_notify("READY=1", {"NOTIFY_SOCKET": str(path)})
        assert s.recv(100) == b"READY=1"
    name = f"blktap-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        assert service.sd_notify("STATUS=x", {"NOTIFY_SOCKET": "@" + name})
        assert s.recv(100) == b"STATUS=x"
    assert not service.sd_notify("READY=1", {})
    assert not service.sd_notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "nobody")})


def test_serve_notifies_ready_then_stopping(tmp_path: Path, image: Path,
                                           notify_socket: socket.socket) -> None:
    """READY=1 comes once the socket accepts (nbdinfo reads the disk right after it),
    with MAINPID; SIGTERM brings STOPPING=1 and exit 0; the pid file is there while
    serving and gone after."""
    nbdinfo = need("nbdinfo")
    sock, pidfile = tmp_path / "nbd.sock", tmp_path / "serve.pid"
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"))
    proc = subprocess.Popen([tool("blktap"), "serve", f"vhd:{image}", "--socket", str(sock),
                             "--foreground", "--pidfile", str(pidfile)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            text=True)
    try:
        ready = messages(notify_socket)
        assert ready["READY"] == "1" and ready["MAINPID"] == str(proc.pid)
        assert str(sock) in ready["STATUS"]
        assert pidfile.read_text() == f"{proc.pid}\n"
        res = run([nbdinfo, "--size", f"nbd+unix:///?socket={sock}"], text=True)
        assert res.returncode == 0 and int(res.stdout) == 16 * MiB
        proc.send_signal(signal.SIGTERM)
        assert messages(notify_socket) == {"STOPPING": "1"}
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert not pidfile.exists()


def _gone(pid: int, deadline: float = 30.0) -> bool:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_serve_daemon_with_pidfile(tmp_path: Path, image: Path) -> None:
    """--daemon: the command prints the URI and exits 0 once the daemon serves; the pid
    file names the daemon, which serves until SIGTERM and then removes the pid file."""
    nbdinfo = need("nbdinfo")
    sock, pidfile = tmp_path / "nbd.sock", tmp_path / "serve.pid"
    res = run([tool("blktap"), "serve", f"vhd:{image}", "--socket", str(sock), "--daemon",
               "--pidfile", str(pidfile)], text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"nbd+unix:///?socket={sock}"
    pid = int(pidfile.read_text())
    try:
        assert run([nbdinfo, "--size", res.stdout.strip()], text=True).returncode == 0
    finally:
        os.kill(pid, signal.SIGTERM)
    assert _gone(pid)
    assert not pidfile.exists() and not sock.exists()


def test_serve_daemon_failure_is_the_commands(tmp_path: Path) -> None:
    """A daemon that cannot start: the command fails with its error and code."""
    res = run([tool("blktap"), "serve", f"vhd:{tmp_path / 'none.vhd'}", "--socket",
               str(tmp_path / "s"), "--daemon", "--pidfile", str(tmp_path / "p")], text=True,
              timeout=60)
    assert res.returncode == errno.ENOENT and "none.vhd" in res.stderr
    assert not (tmp_path / "p").exists()


def test_captive_nbdinfo(tmp_path: Path, image: Path) -> None:
    """--run 'nbdinfo "$uri"': served over a private UNIX socket while nbdinfo runs,
    which reads the export; then blktap exits with nbdinfo's status, leaving nothing."""
    need("nbdinfo")
    res = run([tool("blktap"), "serve", f"vhd:{image}", "--run",
               'nbdinfo "$uri" && echo "unixsocket=$unixsocket" && test -S "$unixsocket"'
               ' && sh -c \'test -n "$uri"\''], text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "export-size: 16777216" in res.stdout
    sock = res.stdout.split("unixsocket=", 1)[1].split()[0]
    assert not os.path.exists(os.path.dirname(sock))  # the private folder is removed
    assert "nbd+unix" not in res.stdout.split("protocol:", 1)[0]  # no URI printed


def test_captive_status_and_tcp(tmp_path: Path, image: Path) -> None:
    """The command's exit status is blktap's; $port/$uri over TCP (loopback); a command
    killed by a signal gives 128+N; a bad image never runs the command."""
    res = run([tool("blktap"), "serve", f"vhd:{image}", "--tcp", "127.0.0.1:0", "--run",
               'echo "$port $uri"; exit 7'], text=True, timeout=60)
    assert res.returncode == 7
    port, uri = res.stdout.split()
    assert int(port) > 0 and uri == f"nbd://127.0.0.1:{port}/"
    res = run([tool("blktap"), "serve", f"vhd:{image}", "--run", "kill -TERM $$"],
              text=True, timeout=60)
    assert res.returncode == 128 + signal.SIGTERM
    marker = tmp_path / "ran"
    res = run([tool("blktap"), "serve", f"vhd:{tmp_path / 'no.vhd'}", "--run",
               f"touch {marker}"], text=True, timeout=60)
    assert res.returncode == errno.ENOENT and not marker.exists()
    res = run([tool("blktap"), "serve", f"vhd:{image}", "--run", "true", "--daemon"],
              text=True, timeout=60)
    assert res.returncode == errno.EINVAL and "exclude" in res.stderr


def test_serve_log_file_one_line_per_event(tmp_path: Path, image: Path) -> None:
    log = tmp_path / "serve.log"
    res = run([tool("blktap"), "serve", f"vhd:{image}", "--log", str(log), "--log-level",
               "info", "--run", "true"], text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = log.read_text().splitlines()
    serving = [ln for ln in lines if "serving" in ln]
    assert len(serving) == 1 and f"vhd:{image}" in serving[0] and "nbd+unix" in serving[0]
    assert f"blktap serve[{serving[0].split('[')[1].split(']')[0]}]" in serving[0]
    res = run([tool("blktap"), "serve", f"vhd:{image}", "--log", str(tmp_path / "no" / "f"),
               "--run", "true"], text=True, timeout=60)
    assert res.returncode == errno.EINVAL and "--log" in res.stderr


def test_syslog_handler_one_datagram_per_event(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """--log syslog: one datagram per record to /dev/log (a test-owned socket here), at
    facility daemon, tagged PROG[PID], a traceback folded onto the same line."""
    path = tmp_path / "devlog"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(10)
        monkeypatch.setattr(logsetup, "SYSLOG_SOCKET", str(path))
        handler = logsetup.configure("tapdisk", "info", "syslog", logger="blktap.test")
        try:
            log = logging.getLogger("blktap.test")
            log.debug("not this one")
            try:
                raise ValueError("boom\nsecond line")
            except ValueError:
                log.exception("minor %d (%s): failed", 3, "vhd:/x.vhd")
            data = s.recv(65536).decode()
        finally:
            logging.getLogger("blktap.test").removeHandler(handler)
            handler.close()
    assert data.startswith(f"<{3 * 8 + 3}>tapdisk[{os.getpid()}]: minor 3 (vhd:/x.vhd): "
                           "failed | Traceback")
    assert "\n" not in data.rstrip("\0") and "ValueError: boom | second line" in data
    monkeypatch.setattr(logsetup, "SYSLOG_SOCKET", str(tmp_path / "absent"))
    with pytest.raises(logsetup.UsageError, match="no .*absent"):
        logsetup.configure("x", "info", "syslog", logger="blktap.test2")


def test_tapdisk_log_option(tmp_path: Path) -> None:
    """tapdisk --log FILE: the events of a minor name it and its image."""
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(MiB))
    log = tmp_path / "td.log"
    env = dict(os.environ, BLKTAP_CONTROL_DIR=str(tmp_path / "run"),
               BLKTAP_LOG_DIR=str(tmp_path / "logdir"))
    proc = subprocess.Popen([tool("tapdisk"), "-D", "--open", f"aio:{disk}", "--log", str(log),
                             "--log-level", "debug"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    try:
        assert select.select([proc.stdout], [], [], 30)[0]
        proc.stdout.readline()  # type: ignore[union-attr]
        proc.stdout.readline()  # type: ignore[union-attr]
        res = run([tool("tap-ctl"), "pause", "-p", str(proc.pid), "-m", "0"], env=env)
        assert res.returncode == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    text = log.read_text()
    assert f"minor 0: opened aio:{disk}" in text
    assert f"minor 0 (aio:{disk}): paused" in text and f"minor 0 (aio:{disk}) closed" in text
    assert not (tmp_path / "logdir").exists()  # --log replaces the per-process file
    res = run([tool("tapdisk"), "--log", "stderr"], env=env, text=True)
    assert res.returncode == errno.EINVAL and "-D" in res.stderr


def _units_dir(tmp_path: Path) -> Path:
    """The shipped units, ExecStart pointed at this venv's scripts (verify wants them to
    exist), a template instantiated."""
    out = tmp_path / "units"
    out.mkdir()
    for unit in UNITS.iterdir():
        text = unit.read_text()
        for name in ("blktap", "tapback"):
            text = text.replace(f"ExecStart={name} ", f"ExecStart={tool(name)} ")
        (out / unit.name).write_text(text)
    shutil.copy(out / "blktap-serve@.service", out / "blktap-serve@demo.service")
    return out


def test_units_shipped_and_verified(tmp_path: Path) -> None:
    names = sorted(p.name for p in UNITS.iterdir())
    assert names == ["blktap-exporter.service", "blktap-serve@.service", "tapback.service"]
    for name in names:
        text = (UNITS / name).read_text()
        assert "Type=notify" in text and "--log syslog" in text
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian's systemd package)")
    units = _units_dir(tmp_path)
    man = tmp_path / "man"
    res = run([sys.executable, "-m", "blktap.cli.manpage", "--out", str(man)], text=True)
    assert res.returncode == 0, res.stderr
    env = dict(os.environ, MANPATH=str(man))
    res = run([analyze, "verify", *(str(units / n) for n in
                                    ("blktap-serve@demo.service", "tapback.service",
                                     "blktap-exporter.service"))], env=env, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    # And it does find faults: a unit whose command does not exist.
    bad = units / "blktap-exporter.service"
    bad.write_text(bad.read_text().replace(tool("blktap"), str(tmp_path / "nothing")))
    res = run([analyze, "verify", str(bad)], env=env, text=True)
    assert res.returncode != 0 and "nothing" in res.stdout + res.stderr


def test_linux_only() -> None:
    code = ("import sys; sys.platform = 'darwin'; import blktap.image; "
            "print('library ok', flush=True); import blktap.cli.main")
    res = run([sys.executable, "-c", code], text=True)
    assert res.stdout == "library ok\n"
    assert res.returncode == 95 and "Linux only" in res.stderr and "darwin" in res.stderr
