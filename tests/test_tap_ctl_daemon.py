"""Our tap-ctl driving our tapdisk: output bytes as sm and xapi parse them (on a pipe and
on a terminal), the storage manager's launch and teardown sequences, and the life cycle
under faults (a killed tapdisk, wrong requests, closing with requests in flight)."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import need, run, tool
from test_tapdisk_live import BLOCKS, disk_bytes, replay

MiB = 1 << 20
HERE = Path(__file__).resolve().parent
# sm's parsers (libs/sm/blktap2.py) and xapi's (tapctl.ml).
ALLOCATE_RE = re.compile(r"/tapdisk/tapdisk-(\d+)$")
LIST_PIPE_RE = re.compile(r"^pid=(\d+) minor=(\d+) state=(0|0x[0-9a-f]+) args=(\w+):(.+)$")


class Host:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.run_dir = tmp / "run"
        self.log_dir = tmp / "log"
        self.env = dict(os.environ, BLKTAP_CONTROL_DIR=str(self.run_dir),
                        BLKTAP_LOG_DIR=str(self.log_dir), TAPDISK=tool("tapdisk"))

    def tap_ctl(self, *args: str, ok: bool = True, tty_out: bool = False,
                stdin: bytes = b"") -> tuple[int, str, str]:
        argv = [tool("tap-ctl"), *args]
        if not tty_out:
            p = subprocess.run(argv, input=stdin, capture_output=True, env=self.env,
                               timeout=120)
            out = p.stdout
        else:
            master, slave = pty.openpty()
            try:
                tty.setraw(slave)
                p = subprocess.run(argv, input=stdin, stdout=slave, stderr=subprocess.PIPE,
                                   env=self.env, timeout=120)
            finally:
                os.close(slave)
            out = b""
            try:
                while select.select([master], [], [], 5)[0]:
                    chunk = os.read(master, 4096)
                    if not chunk:
                        break
                    out += chunk
            except OSError:
                pass
            finally:
                os.close(master)
        if ok:
            assert p.returncode == 0, (args, p.returncode, p.stderr)
        return p.returncode, out.decode(), p.stderr.decode()

    def out(self, *args: str) -> str:
        return self.tap_ctl(*args)[1]

    def create(self, spec: str, *extra: str) -> tuple[int, int]:
        out = self.out("create", "-a", spec, *extra)
        m = ALLOCATE_RE.search(out.rstrip("\n"))
        assert m and out.endswith("\n") and out.count("\n") == 1, out
        minor = int(m[1])
        entries = [e for e in self.listing() if e.get("minor") == str(minor)]
        assert len(entries) == 1
        return int(entries[0]["pid"]), minor

    def listing(self) -> list[dict[str, str]]:
        return [dict(f.split("=", 1) for f in line.split(" ", 3))
                for line in self.out("list").splitlines()]

    def nbd(self, pid: int, minor: int) -> str:
        return f"nbd+unix:///?socket={self.run_dir}/nbd{pid}.{minor}"

    def serving(self, pid: int, minor: int, size: int) -> None:
        res = run([need("nbdinfo"), "--size", self.nbd(pid, minor)], text=True)
        assert res.returncode == 0 and int(res.stdout) == size, res.stderr


def wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        # A zombie whose parent (the launcher) exited is reaped by init.
        try:
            if open(f"/proc/{pid}/stat").read().split()[2] == "Z":
                return
        except OSError:
            return
        assert time.monotonic() < deadline, f"tapdisk {pid} still running"
        time.sleep(0.05)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(tmp_path)
    yield h
    for entry in (h.listing() if h.run_dir.exists() else []):
        if "pid" in entry:
            try:
                os.kill(int(entry["pid"]), signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
    return img


def test_sm_launch_and_teardown_sequence(host: Host, tmp_path: Path) -> None:
    """allocate, spawn, attach, open ... close, detach, free: the outputs sm parses; the
    tapdisk exits after detach and leaves nothing behind."""
    vhd = tmp_path / "d.vhd"
    assert run([tool("vhd-util"), "create", "-n", str(vhd), "-s", "16"]).returncode == 0
    out = host.out("allocate")
    assert re.fullmatch(rf"{re.escape(str(host.run_dir))}/tapdisk/tapdisk-0\n", out)
    minor = "0"
    out = host.out("spawn")
    assert re.fullmatch(r"\d+\n", out)
    pid = out.strip()
    # A spawned tapdisk without VBDs lists as its pid alone; the marker as its minor.
    assert host.out("list") == f"pid={pid}\nminor=0\n"
    host.out("attach", "-p", pid, "-m", minor)
    assert host.out("list") == f"pid={pid} minor=0 state=0\n"
    host.out("open", "-p", pid, "-m", minor, "-a", f"vhd:{vhd}")
    line = host.out("list")
    m = LIST_PIPE_RE.match(line.rstrip("\n"))
    assert m and m.groups() == (pid, minor, "0", "vhd", str(vhd)), line
    host.serving(int(pid), 0, 16 * MiB)
    # sm hands out nbd:unix:<socket>:exportname=<vdi uuid>: any name reaches the disk.
    res = run([need("nbdinfo"), "--size",
               f"nbd+unix:///0d8e2f5c-6a3b-4a43-9a0e-3f2b8c1d7e64?socket={host.run_dir}/nbd{pid}.0"],
              text=True)
    assert res.returncode == 0 and int(res.stdout) == 16 * MiB, res.stderr
    # The reference's "old" server's socket, which XenServer tools look for: the same
    # export, newstyle-fixed as on the reference's direct sockets; gone at close.
    res = run([need("nbdinfo"), "--size",
               f"nbd+unix:///?socket={host.run_dir}/nbd-old{pid}.0"], text=True)
    assert res.returncode == 0 and int(res.stdout) == 16 * MiB, res.stderr
    # Filters: by pid, minor, type, file.
    for flt in (["-p", pid], ["-m", minor], ["-t", "vhd"], ["-f", str(vhd)]):
        assert host.out("list", *flt) == line
    assert host.out("list", "-t", "aio") == ""
    host.out("close", "-p", pid, "-m", minor, "-t", "120")
    assert host.out("list") == f"pid={pid} minor=0 state=0x2\n"
    assert not (host.run_dir / f"nbd-old{pid}.0").exists()
    assert not (host.run_dir / f"nbd{pid}.0").exists()
    host.out("detach", "-p", pid, "-m", minor)
    wait_gone(int(pid))
    assert host.out("list") == "minor=0\n"
    host.out("free", "-m", minor)
    assert host.out("list") == ""
    assert sorted(p.name for p in host.run_dir.iterdir()) == ["tapdisk"]
    assert list((host.run_dir / "tapdisk").iterdir()) == []
    assert list(host.log_dir.iterdir()) == []  # clean exit: the log is deleted


# tap-ctl with a SIGTERM (or SIGHUP, Ctrl-C) arriving at a known step of create: sent by
# the process to itself as the open starts, so that the test does not race the steps.
_INTERRUPTED_CREATE = """
import os, sys
from blktap.cli import tap_ctl
from blktap.control.client import TapCtl
real = TapCtl.open
def signal_then_open(self, *args, **kwargs):
    os.kill(os.getpid(), int(sys.argv[1]))
    return real(self, *args, **kwargs)
TapCtl.open = signal_then_open
sys.exit(tap_ctl.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_interrupted_create_undoes_its_steps(host: Host, disk: Path, sig: int) -> None:
    """tap-ctl shares vhd-util's main: a signal between attach and open ends create as a
    failure there does (the minor detached and freed, the tapdisk it spawned gone, exit
    128+N or 130), not with a minor left allocated to a tapdisk serving nothing."""
    import sys
    p = subprocess.run([sys.executable, "-c", _INTERRUPTED_CREATE, str(int(sig)), "create",
                        "-a", f"aio:{disk}"], capture_output=True, env=host.env, timeout=120)
    assert p.returncode == (130 if sig == signal.SIGINT else 128 + sig), p.stderr
    assert p.stdout == b""
    deadline = time.monotonic() + 30
    while [n for n in os.listdir(host.run_dir) if n.startswith("ctl")]:
        assert time.monotonic() < deadline, os.listdir(host.run_dir)
        time.sleep(0.05)
    assert host.out("list") == ""
    assert list((host.run_dir / "tapdisk").iterdir()) == []


def test_list_on_a_terminal(host: Host, disk: Path) -> None:
    pid, minor = host.create(f"aio:{disk}")
    host.out("allocate")  # an orphan marker, minor 1
    _, out, _ = host.tap_ctl("list", tty_out=True)
    assert out.replace("\r\n", "\n") == (f"{pid:>8} {minor:>4} {'0':>4} {'aio':>10} {disk}\n"
                                         f"{'-':>8} {1:>4} {'-':>4} {'-':>10} -\n")
    host.out("pause", "-p", str(pid), "-m", str(minor))
    _, out, _ = host.tap_ctl("list", tty_out=True)
    assert out.splitlines()[0] == f"{pid:>8} {minor:>4} {'0x2a':>4} {'aio':>10} {disk}"
    assert host.out("list", "-m", str(minor)) == (
        f"pid={pid} minor={minor} state=0x2a args=aio:{disk}\n")


def test_spawn_on_a_terminal(host: Host) -> None:
    _, out, _ = host.tap_ctl("spawn", tty_out=True)
    m = re.fullmatch(r"tapdisk spawned with pid (\d+)\r?\n", out)
    assert m, out
    os.kill(int(m[1]), signal.SIGTERM)
    wait_gone(int(m[1]))


def test_stats_is_the_references_json(host: Host, tmp_path: Path) -> None:
    qemu_io = need("qemu-io")
    base, leaf = tmp_path / "base.vhd", tmp_path / "leaf.vhd"
    assert run([tool("vhd-util"), "create", "-n", str(base), "-s", "16"]).returncode == 0
    assert run([tool("vhd-util"), "snapshot", "-n", str(leaf), "-p", str(base)]).returncode == 0
    pid, minor = host.create(f"vhd:{leaf}", "-D")
    res = run([qemu_io, "-f", "raw", "-c", "write -P 7 0 1M", "-c", "read 0 2M",
               host.nbd(pid, minor)], text=True)
    assert res.returncode == 0, res.stderr
    _, out, _ = host.tap_ctl("stats", "-p", str(pid), "-m", str(minor))
    assert out.endswith(" }\n\n") and out.count("\n") == 2
    assert out.startswith(f'{{ "name": "vhd:{leaf}", "secs": [ ')
    stats = json.loads(out)
    assert list(stats)[:7] == ["name", "secs", "images", "FIXME_enospc_redirect_count",
                               "nbd_mirror_failed", "reqs_outstanding", "read_caching"]
    # What sm's lcache.py reads.
    assert [i["name"] for i in stats["images"]] == [str(leaf), str(base)]
    assert stats["images"][-1]["driver"]["name"] == "vhd"
    assert stats["images"][0]["driver"] == {"type": 4, "name": "vhd", "status": None}
    assert stats["secs"][1] == 2048 and stats["secs"][0] >= 4096
    assert stats["images"][0]["hits"][1] == 2048
    # Each image counts the sectors it served, as the C tapdisk: the leaf the 1 MiB it
    # holds, the base the 1 MiB it does not (the C pair: leaf [8,8] for 8 of each),
    # and every sector read is counted once.
    leaf_hits, base_hits = (img["hits"][0] for img in stats["images"])
    assert leaf_hits >= 2048 and base_hits >= 2048
    assert leaf_hits + base_hits == stats["secs"][0]
    assert stats["read_caching"] == "true"  # opened with -D
    assert stats["FIXME_enospc_redirect_count"] == 0 and stats["reqs_outstanding"] == 0


def test_kill_9_leaves_an_orphan_minor_that_free_releases(host: Host, disk: Path) -> None:
    pid, minor = host.create(f"aio:{disk}")
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    # The stale control socket is skipped; the marker shows as orphaned.
    assert host.out("list") == f"minor={minor}\n"
    code, _, err = host.tap_ctl("pause", "-p", str(pid), "-m", str(minor), ok=False)
    assert code == 111 and err == "Connection refused\n"
    host.out("free", "-m", str(minor))
    assert host.out("list") == ""
    pid2, minor2 = host.create(f"aio:{disk}")
    assert minor2 == minor and pid2 != pid
    host.serving(pid2, minor2, 8 * MiB)
    host.out("destroy", "-p", str(pid2), "-m", str(minor2))
    wait_gone(pid2)


def test_free_of_a_served_minor_is_refused(host: Host, disk: Path) -> None:
    pid, minor = host.create(f"aio:{disk}")
    code, _, err = host.tap_ctl("free", "-m", str(minor), ok=False)
    assert code == 11 and err == "Resource temporarily unavailable\n"
    host.serving(pid, minor, 8 * MiB)


def test_wrong_requests_give_the_references_errors_and_keep_serving(
        host: Host, disk: Path, tmp_path: Path) -> None:
    pid, minor = host.create(f"aio:{disk}")
    p, m = str(pid), str(minor)
    cases = [
        (["unpause", "-p", p, "-m", m], 22, "Invalid argument\n"),
        (["detach", "-p", p, "-m", m], 16, "Device or resource busy\n"),
        (["open", "-p", p, "-m", m, "-a", f"aio:{disk}"], 114,
         "Operation already in progress\n"),
        (["attach", "-p", p, "-m", m], 17, "File exists\n"),
        (["pause", "-p", p, "-m", "9"], 19, "No such device\n"),
        (["stats", "-p", p, "-m", "9"], 19, "No such device\n"),
    ]
    for argv, code, err in cases:
        got = host.tap_ctl(*argv, ok=False)
        assert (got[0], got[2]) == (code, err), argv
        host.serving(pid, minor, 8 * MiB)
    # Pausing twice succeeds (as the reference); a leaf of another size is refused.
    host.out("pause", "-p", p, "-m", m)
    host.out("pause", "-p", p, "-m", m, "-t", "30")
    small = tmp_path / "small.img"
    small.write_bytes(bytes(MiB))
    got = host.tap_ctl("unpause", "-p", p, "-m", m, "-a", f"aio:{small}", ok=False)
    assert (got[0], got[2]) == (124, "Wrong medium type\n")
    assert host.listing()[0]["state"] == "0x22a"
    got = host.tap_ctl("detach", "-p", p, "-m", m, ok=False)
    assert got[0] == 16
    host.out("unpause", "-p", p, "-m", m)
    assert host.listing()[0]["state"] == "0"
    host.serving(pid, minor, 8 * MiB)


def test_filters_on_a_disk_without_parents(host: Host, disk: Path) -> None:
    """Every filter tap-ctl names is built now; on a leaf without parents the local
    cache (-r) has nothing to cache and the open goes through, as with the reference;
    standby without a secondary is a usage error (22), not a missing feature."""
    pid = host.out("spawn").strip()
    minor = ALLOCATE_RE.search(host.out("allocate").strip())[1]  # type: ignore[index]
    host.out("attach", "-p", pid, "-m", minor)
    code, _, err = host.tap_ctl("open", "-p", pid, "-m", minor, "-a", f"aio:{disk}", "-s",
                                ok=False)
    assert (code, err) == (22, "Invalid argument\n")
    host.out("open", "-p", pid, "-m", minor, "-a", f"aio:{disk}", "-r", "-t", "30")
    host.serving(pid, minor, 8 * MiB)
    host.out("close", "-p", pid, "-m", minor)
    host.out("open", "-p", pid, "-m", minor, "-a", f"aio:{disk}", "-R", "-t", "30")
    host.out("destroy", "-p", pid, "-m", minor)


def test_client_blocked_on_a_paused_disk_resumes(host: Host, disk: Path) -> None:
    qemu_io = need("qemu-io")
    pid, minor = host.create(f"aio:{disk}")
    host.out("pause", "-p", str(pid), "-m", str(minor))
    proc = subprocess.Popen([qemu_io, "-f", "raw", "-c", "write -P 0x3c 0 64k",
                             "-c", "read -P 0x3c 0 64k", host.nbd(pid, minor)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        assert proc.poll() is None  # waiting, not failed
        host.out("unpause", "-p", str(pid), "-m", str(minor))
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "Pattern verification failed" not in out, err
    assert disk.read_bytes()[:65536] == b"\x3c" * 65536


def test_close_with_requests_in_flight(host: Host, tmp_path: Path) -> None:
    """close while a client writes: every write the client saw acknowledged is in the
    file, the VHD is consistent, the client sees its connection end (not garbage)."""
    system_python = "/usr/bin/python3"
    if run([system_python, "-c", "import nbd"]).returncode != 0:
        pytest.skip("python3-libnbd is not installed")
    vhd = tmp_path / "d.vhd"
    assert run([tool("vhd-util"), "create", "-n", str(vhd), "-s", "16"]).returncode == 0
    pid, minor = host.create(f"vhd:{vhd}")
    log, stop = tmp_path / "writes.log", tmp_path / "stop"
    writer = subprocess.Popen([system_python, str(HERE / "live_writer.py"),
                               f"{host.run_dir}/nbd{pid}.{minor}", str(log), str(stop), "64"],
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not log.exists() or len(log.read_text().split()) < 30:
            assert time.monotonic() < deadline and writer.poll() is None
            time.sleep(0.01)
        host.out("close", "-p", str(pid), "-m", str(minor))
        assert writer.wait(60) == 1  # its next write fails: the disk is gone
    finally:
        if writer.poll() is None:
            writer.kill()
    done = len(log.read_text().split())
    assert run([tool("vhd-util"), "check", "-n", str(vhd)]).returncode == 0
    assert done >= 30
    data = disk_bytes(vhd, 16 * MiB)
    assert data == replay(done, 16 * MiB), "acknowledged writes lost"
    assert BLOCKS == 64
    host.out("detach", "-p", str(pid), "-m", str(minor))
    wait_gone(pid)


def test_encrypted_vhd_with_key_on_stdin(host: Host, tmp_path: Path) -> None:
    """open -E: the key comes on stdin; tapdisk serves the plaintext; a wrong key is
    refused with ENOKEY."""
    qemu_io = need("qemu-io")
    vhd = tmp_path / "e.vhd"
    key = os.urandom(32)
    keyfile = tmp_path / "e,aes-xts-plain,256.key"  # the name vhd-util key insists on
    keyfile.write_bytes(key)
    assert run([tool("vhd-util"), "create", "-n", str(vhd), "-s", "16"]).returncode == 0
    res = run([tool("vhd-util"), "key", "-s", "-n", str(vhd), "-k", str(keyfile)], text=True)
    assert res.returncode == 0, res.stderr
    pid = host.out("spawn").strip()
    minor = ALLOCATE_RE.search(host.out("allocate").strip())[1]  # type: ignore[index]
    host.out("attach", "-p", pid, "-m", minor)
    code, _, err = host.tap_ctl("open", "-p", pid, "-m", minor, "-a", f"vhd:{vhd}", "-E",
                                stdin=os.urandom(32), ok=False)
    assert (code, err) == (126, "Required key not available\n")
    code, _, err = host.tap_ctl("open", "-p", pid, "-m", minor, "-a", f"vhd:{vhd}", ok=False)
    assert code == 22
    host.tap_ctl("open", "-p", pid, "-m", minor, "-a", f"vhd:{vhd}", "-E", stdin=key)
    res = run([qemu_io, "-f", "raw", "-c", "write -P 0x61 0 1M", "-c", "read -P 0x61 0 1M",
               host.nbd(int(pid), int(minor))], text=True)
    assert res.returncode == 0 and "Pattern verification failed" not in res.stdout
    host.out("destroy", "-p", pid, "-m", minor)
    assert b"\x61" * 4096 not in vhd.read_bytes()  # ciphertext on disk


def test_create_with_a_failing_attach_stops_its_tapdisk(host: Host, tmp_path: Path,
                                                       disk: Path) -> None:
    """Someone else holds the new minor's marker: attach fails with EBUSY, and create
    stops the tapdisk it spawned (the reference leaves it running, serving nothing)."""
    holder_pid = tmp_path / "holder.pid"
    launcher = tmp_path / "tapdisk-launcher"
    launcher.write_text(f"""#!/bin/sh
exec 9<"$BLKTAP_CONTROL_DIR/tapdisk/tapdisk-0"
flock -n 9 || exit 3
sleep 60 </dev/null >/dev/null 2>&1 &
echo $! > {holder_pid}
exec 9<&-
exec {tool("tapdisk")} "$@"
""")
    launcher.chmod(0o755)
    host.env["TAPDISK"] = str(launcher)
    try:
        code, out, err = host.tap_ctl("create", "-a", f"aio:{disk}", ok=False)
        assert (code, out, err) == (16, "", "Device or resource busy\n")
        deadline = time.monotonic() + 30
        while any("pid" in e for e in host.listing()):
            assert time.monotonic() < deadline, host.listing()
            time.sleep(0.05)
        assert host.listing() == [{"minor": "0"}]  # the holder still has it
    finally:
        if holder_pid.exists():
            os.kill(int(holder_pid.read_text()), signal.SIGKILL)
    host.out("free", "-m", "0")
