"""Live snapshot onto a new qcow2 leaf, end to end, while a libnbd client writes a known
pattern through the disk's NBD export: ``tap-ctl pause``; a new leaf over the served
image (``blktap snapshot`` or ``qemu-img create -b``); ``tap-ctl unpause -a qcow2:NEW``.
The writer sees only a delay; the old image holds exactly the writes acknowledged before
the pause, the new chain all of them, and qemu-img checks both clean."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import run, tool
from qcow2_helpers import qemu_check, qemu_img, qemu_raw
from test_tapdisk_live import SYSTEM_PYTHON, Env, Writer, pause, replay

MiB = 1 << 20
SIZE = 16 * MiB


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Env]:
    if not os.path.exists(SYSTEM_PYTHON) or run(
            [SYSTEM_PYTHON, "-c", "import nbd"]).returncode != 0:
        pytest.skip("python3-libnbd is not installed")
    e = Env(tmp_path)
    yield e
    for line in run([tool("tap-ctl"), "list"], env=e.env, text=True).stdout.splitlines():
        m = re.match(r"pid=(\d+)", line)
        if m:
            try:
                os.kill(int(m[1]), signal.SIGKILL)
            except ProcessLookupError:
                pass


def start_disk(env: Env, spec: str) -> tuple[int, int, Path]:
    out = env.tap_ctl("create", "-a", spec).stdout
    m = re.fullmatch(r".*/tapdisk/tapdisk-(\d+)\n", out)
    assert m, out
    minor = int(m[1])
    [entry] = env.listing()
    assert entry["args"] == spec
    pid = int(entry["pid"])
    return pid, minor, env.tmp / "run" / f"nbd{pid}.{minor}"


def disk(path: Path, tmp: Path) -> bytes:
    return qemu_raw(path, tmp)[:SIZE]


@pytest.mark.parametrize("how", ["blktap", "qemu-img"])
@pytest.mark.parametrize("base_fmt", ["qcow2", "vhd"])
def test_live_snapshot_onto_qcow2(live: Env, how: str, base_fmt: str) -> None:
    env = live
    old = env.tmp / f"old.{base_fmt}"
    new = env.tmp / "new.qcow2"
    if base_fmt == "qcow2":
        qemu_img("create", "-q", "-f", "qcow2", old, str(SIZE))
    else:
        env.vhd_util("create", "-n", str(old), "-s", "16")
    pid, minor, sock = start_disk(env, f"{base_fmt}:{old}")
    writer = Writer(sock, env.tmp)
    try:
        writer.wait_for(40)
        paused_at = pause(env, writer, pid, minor)
        if how == "blktap":
            res = run([tool("blktap"), "snapshot", f"qcow2:{new}", f"{base_fmt}:{old}"],
                      text=True)
            assert res.returncode == 0, res.stderr
        else:
            qemu_img("create", "-q", "-f", "qcow2", "-b", old.name, "-F",
                     "qcow2" if base_fmt == "qcow2" else "vpc", new)
        env.tap_ctl("unpause", "-p", str(pid), "-m", str(minor), "-a", f"qcow2:{new}")
        [entry] = env.listing()
        assert entry["state"] == "0" and entry["args"] == f"qcow2:{new}"
        writer.wait_for(paused_at + 60)
        total = writer.finish()
    finally:
        writer.kill()
    env.tap_ctl("destroy", "-p", str(pid), "-m", str(minor))
    assert env.listing() == []
    held = disk(old, env.tmp)
    assert held in (replay(paused_at, SIZE), replay(paused_at - 1, SIZE))
    assert disk(new, env.tmp) == replay(total, SIZE)
    assert qemu_check(new)[0] == 0
    if base_fmt == "qcow2":
        assert qemu_check(old)[0] == 0
    assert qemu_img("info", "--backing-chain", new).count("image:") == 2
