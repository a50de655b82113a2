"""Live snapshot and live leaf coalesce, end to end, with our tap-ctl, tapdisk and
vhd-util, while a libnbd client writes a known pattern through the disk's NBD export.

The storage manager's sequence: ``tap-ctl pause``; change the files offline
(``vhd-util snapshot`` / ``vhd-util coalesce``); ``tap-ctl unpause -a vhd:LEAF``. The
writer must see no error, only a delay; the files must hold exactly what it wrote.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import need, run, tool

MiB = 1 << 20
BLOCK = 64 << 10
BLOCKS = 64  # the writer cycles over the first 4 MiB
HERE = Path(__file__).resolve().parent
SYSTEM_PYTHON = "/usr/bin/python3"


def pattern(i: int) -> bytes:
    return bytes([i % 251 + 1]) * BLOCK


def replay(writes: int, size: int) -> bytes:
    """The disk after the first ``writes`` writes of the writer."""
    disk = bytearray(size)
    for i in range(max(0, writes - BLOCKS), writes):
        b = i % BLOCKS
        disk[b * BLOCK:(b + 1) * BLOCK] = pattern(i)
    return bytes(disk)


def disk_bytes(path: Path, size: int) -> bytes:
    """The virtual disk of a VHD: a dynamic one as qemu reads it (its own vpc driver); a
    differencing one (qemu's vpc has no parents) through our chain reader."""
    out = path.with_suffix(".raw")
    if "differencing" in run([tool("vhd-util"), "read", "-p", "-n", str(path)],
                             text=True).stdout.lower():
        argv = [tool("blktap"), "convert", "-O", "raw", f"vhd:{path}", str(out)]
    else:
        argv = [need("qemu-img"), "convert", "-f", "vpc", "-O", "raw", str(path), str(out)]
    res = run(argv, text=True)
    assert res.returncode == 0, res.stderr
    data = out.read_bytes()
    out.unlink()
    return data[:size]


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = dict(os.environ, BLKTAP_CONTROL_DIR=str(tmp / "run"),
                        BLKTAP_LOG_DIR=str(tmp / "log"), TAPDISK=tool("tapdisk"))

    def tap_ctl(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
        res = run([tool("tap-ctl"), *args], env=self.env, text=True, timeout=120)
        if ok:
            assert res.returncode == 0, (args, res.returncode, res.stderr)
        return res

    def vhd_util(self, *args: str) -> str:
        res = run([tool("vhd-util"), *args], text=True)
        assert res.returncode == 0, (args, res.stdout, res.stderr)
        return res.stdout

    def listing(self) -> list[dict[str, str]]:
        out = []
        for line in self.tap_ctl("list").stdout.splitlines():
            fields = dict(f.split("=", 1) for f in line.split(" ", 3))
            out.append(fields)
        return out


class Writer:
    def __init__(self, sock: Path, tmp: Path) -> None:
        self.log = tmp / "writes.log"
        self.stop_file = tmp / "stop"
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, str(HERE / "live_writer.py"), str(sock), str(self.log),
             str(self.stop_file), str(BLOCKS)], stderr=subprocess.PIPE, text=True)

    def count(self) -> int:
        try:
            return len(self.log.read_text().split())
        except FileNotFoundError:
            return 0

    def wait_for(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.count() < n:
            assert self.proc.poll() is None, self.proc.stderr.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, f"the writer is stuck at {self.count()}"
            time.sleep(0.01)

    def finish(self) -> int:
        self.stop_file.touch()
        rc = self.proc.wait(60)
        err = self.proc.stderr.read()  # type: ignore[union-attr]
        assert rc == 0, err
        return self.count()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    if not os.path.exists(SYSTEM_PYTHON) or run(
            [SYSTEM_PYTHON, "-c", "import nbd"]).returncode != 0:
        pytest.skip("python3-libnbd is not installed")
    e = Env(tmp_path)
    yield e
    # Whatever a failed test left running.
    for line in run([tool("tap-ctl"), "list"], env=e.env, text=True).stdout.splitlines():
        m = re.match(r"pid=(\d+)", line)
        if m:
            try:
                os.kill(int(m[1]), signal.SIGKILL)
            except ProcessLookupError:
                pass


def start_disk(env: Env, leaf: Path) -> tuple[int, int, Path]:
    out = env.tap_ctl("create", "-a", f"vhd:{leaf}").stdout
    m = re.fullmatch(r".*/tapdisk/tapdisk-(\d+)\n", out)
    assert m, out
    minor = int(m[1])
    [entry] = env.listing()
    assert entry["minor"] == str(minor) and entry["state"] == "0"
    assert entry["args"] == f"vhd:{leaf}"
    pid = int(entry["pid"])
    return pid, minor, env.tmp / "run" / f"nbd{pid}.{minor}"


def pause(env: Env, writer: Writer, pid: int, minor: int) -> int:
    """Pause; returns how many writes the client had seen complete by then (give or
    take the one it had not logged yet)."""
    env.tap_ctl("pause", "-p", str(pid), "-m", str(minor))
    [entry] = env.listing()
    assert entry["state"] == "0x2a"
    seen = writer.count()
    # Nothing completes while paused: the writer waits, it does not fail.
    time.sleep(0.3)
    assert writer.count() <= seen + 1
    assert writer.proc.poll() is None
    return writer.count()


def written_before(path: Path, paused_at: int, size: int) -> int:
    """Which prefix of the writes ``path`` holds: paused_at, or the one after it if the
    writer had not logged its last acknowledged write when it was counted."""
    data = disk_bytes(path, size)
    for k in (paused_at, paused_at - 1):
        if data == replay(k, size):
            return k
    pytest.fail(f"{path.name} holds no prefix of the writes near {paused_at}")


def test_live_snapshot(env: Env) -> None:
    size = 16 * MiB
    old, new = env.tmp / "old.vhd", env.tmp / "new.vhd"
    env.vhd_util("create", "-n", str(old), "-s", "16")
    pid, minor, sock = start_disk(env, old)
    writer = Writer(sock, env.tmp)
    try:
        writer.wait_for(40)
        paused_at = pause(env, writer, pid, minor)
        env.vhd_util("snapshot", "-n", str(new), "-p", str(old))
        env.tap_ctl("unpause", "-p", str(pid), "-m", str(minor), "-a", f"vhd:{new}")
        [entry] = env.listing()
        assert entry["state"] == "0" and entry["args"] == f"vhd:{new}"
        writer.wait_for(paused_at + 60)
        total = writer.finish()
    finally:
        writer.kill()
    env.tap_ctl("destroy", "-p", str(pid), "-m", str(minor))
    assert env.listing() == []
    # old.vhd holds exactly the writes before the pause; the chain holds them all.
    before = written_before(old, paused_at, size)
    assert before >= 40
    assert disk_bytes(new, size) == replay(total, size)
    for path in (old, new):
        assert "is valid" in env.vhd_util("check", "-n", str(path))
    assert env.vhd_util("query", "-n", str(new), "-p").strip() == str(old)


def test_live_leaf_coalesce(env: Env) -> None:
    """Snapshot while running, then coalesce the leaf into its parent while paused and
    unpause onto the parent (sm's leaf-coalesce)."""
    size = 16 * MiB
    base, leaf = env.tmp / "base.vhd", env.tmp / "leaf.vhd"
    env.vhd_util("create", "-n", str(base), "-s", "16")
    env.vhd_util("snapshot", "-n", str(leaf), "-p", str(base))
    pid, minor, sock = start_disk(env, leaf)
    writer = Writer(sock, env.tmp)
    try:
        writer.wait_for(50)
        paused_at = pause(env, writer, pid, minor)
        res = run([tool("vhd-util"), "coalesce", "-n", str(leaf)], text=True)
        assert res.returncode == 0, res.stderr
        env.tap_ctl("unpause", "-p", str(pid), "-m", str(minor), "-a", f"vhd:{base}")
        writer.wait_for(paused_at + 50)
        total = writer.finish()
    finally:
        writer.kill()
    env.tap_ctl("destroy", "-p", str(pid), "-m", str(minor))
    assert disk_bytes(base, size) == replay(total, size)
    assert "is valid" in env.vhd_util("check", "-n", str(base))


def test_python_writer_runs_on_this_interpreter() -> None:
    """The writer script is also importable here (the tests share its pattern)."""
    sys.path.insert(0, str(HERE))
    try:
        import live_writer
    finally:
        sys.path.pop(0)
    assert live_writer.pattern(7) == pattern(7) and live_writer.BLOCK == BLOCK
