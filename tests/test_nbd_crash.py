"""kill -9 of ``blktap serve`` during a fio write run: after a restart, every write
acknowledged by a FLUSH (or written with FUA) is there, ``vhd-util check -i`` passes,
and after ``vhd-util repair`` plain ``check`` passes too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blktap.image import Chain
from blktap.image.vhd import check as vhd_check
from blktap.image.vhd.create import create as create_vhd
from blktap.image.vhd.create import snapshot as snapshot_vhd
from conftest import named, need, run, tool
from nbd_helpers import Served, serve

MiB = 1 << 20
SLOT = 64 * 1024
REGION = 32 * MiB  # the checker writes slots in [REGION, 2*REGION); fio below REGION

# A libnbd client (system python) writing numbered slots; after every FLUSH (and every
# FUA write) it prints which slots are now durable.
CHECKER = r"""
import sys, nbd
uri, base, slots = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
def data(i):
    return (b"%08d" % i) * (65536 // 8)
done = []
try:
    for i in range(slots):
        fua = i % 5 == 4
        h.pwrite(data(i), base + i * 65536, nbd.CMD_FLAG_FUA if fua else 0)
        done.append(i)
        if fua:
            print("durable", i, flush=True)
        if i % 8 == 7:
            h.flush()
            print("durable", *done, flush=True)
except nbd.Error as e:
    print("stopped", e, flush=True)
"""


def slot_data(i: int) -> bytes:
    return (b"%08d" % i) * (SLOT // 8)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["dynamic", "differencing"])
def test_kill_9_during_fio_writes(tmp_path: Path, layout: str) -> None:
    fio = need("fio")
    need("nbdsh")
    target = tmp_path / "disk.vhd"
    if layout == "dynamic":
        create_vhd(str(target), 2 * REGION)
    else:
        base = tmp_path / "base.vhd"
        create_vhd(str(base), 2 * REGION)
        with Chain.open(named(base), writable=True) as disk:
            disk.pwrite(0, b"\xbb" * (2 * REGION))
        snapshot_vhd(str(target), str(base))
    srv = Served(f"vhd:{target}", tmp_path / "nbd.sock", [])
    env = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}
    load = subprocess.Popen(
        [fio, "--name=load", "--ioengine=nbd", f"--uri={srv.uri}", "--rw=randwrite",
         "--bsrange=4k-128k", "--iodepth=16", f"--size={REGION}", "--fsync=16",
         "--time_based", "--runtime=60", "--output=/dev/null"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    checker = subprocess.Popen(
        ["/usr/bin/python3", "-c", CHECKER, srv.uri, str(REGION), str(REGION // SLOT)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        time.sleep(2.0)
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(10)
        out, _ = checker.communicate(timeout=30)
        load.wait(30)
    finally:
        for p in (load, checker, srv.proc):
            if p.poll() is None:
                p.kill()
    durable: set[int] = set()
    for line in out.splitlines():
        if line.startswith("durable"):
            durable.update(int(x) for x in line.split()[1:])
    assert len(durable) >= 16, out  # the run got far enough to prove something

    # The file as the kill left it: readable and consistent.
    res = run([tool("vhd-util"), "check", "-i", "-n", str(target)], text=True)
    assert res.returncode == 0 and "is valid" in res.stdout, res.stdout + res.stderr
    with Chain.open(named(target)) as disk:
        for i in sorted(durable):
            assert disk.pread(REGION + i * SLOT, SLOT) == slot_data(i), f"slot {i} lost"
    # Repaired, plain check passes; a fresh server reads the same.
    res = run([tool("vhd-util"), "repair", "-n", str(target)], text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    res = run([tool("vhd-util"), "check", "-n", str(target)], text=True)
    assert res.returncode == 0 and "is valid" in res.stdout, res.stdout + res.stderr
    assert vhd_check.check(str(target)).errno == 0
    with serve(f"vhd:{target}", tmp_path, "--read-only", name="again.sock") as again:
        first = min(durable)
        res = subprocess.run(
            ["/usr/bin/python3", "-c",
             "import sys, nbd; h = nbd.NBD(); h.connect_uri(sys.argv[1]); "
             "sys.stdout.buffer.write(h.pread(65536, int(sys.argv[2])))",
             again.uri, str(REGION + first * SLOT)], capture_output=True, timeout=60)
        assert res.returncode == 0 and res.stdout == slot_data(first), res.stderr
    assert sys.platform.startswith("linux")
