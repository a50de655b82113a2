"""Mirroring to NBD secondaries (``-2 nbd:SOCKET``), with real peers: an nbdkit
``memory`` export and another of our tapdisks. fio with verify through the source while
mirroring, both ends identical after (qemu-img compare); ENOSPC on the leaf in both modes
with an NBD secondary; a secondary killed mid-run: every write the client saw
acknowledged is on the disk, and the mirror says it failed."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import need, run

# host and small_fs are fixtures this module uses.
from test_mirror import (  # noqa: F401
    host,
    qemu_io,
    read_disk,
    small_fs,
    sparse,
    stats,
    tapdisk_log,
)
from test_tap_ctl_daemon import Host
from test_tapdisk_live import BLOCKS, Writer, replay

MiB = 1 << 20
KiB = 1 << 10
SIZE = 32 * MiB


class Nbdkit:
    """``nbdkit memory SIZE`` on a UNIX socket."""

    def __init__(self, sock: Path, size: int) -> None:
        self.socket = sock
        self.proc = subprocess.Popen([need("nbdkit"), "--foreground", "-U", str(sock),
                                      "memory", str(size)], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert self.proc.poll() is None, self.proc.stderr.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.02)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.proc.stderr.close()  # type: ignore[union-attr]


@pytest.fixture
def nbdkit(tmp_path: Path) -> Iterator[Nbdkit]:
    k = Nbdkit(tmp_path / "kit.sock", SIZE)
    yield k
    k.kill()


def fio_verify(uri: str, tmp: Path, size: int = 16 * MiB) -> dict:
    res = run([need("fio"), "--name=mirror", "--ioengine=nbd", f"--uri={uri}",
               "--rw=randwrite", "--bs=4k", "--bsrange=4k-64k", "--iodepth=16",
               f"--size={size}", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
               "--randrepeat=1", "--verify_state_save=0", "--output-format=json"],
              text=True, timeout=300, cwd=tmp)
    assert res.returncode == 0, res.stdout + res.stderr
    job = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] == size
    return job


def compare(a: str, b: str) -> None:
    res = run([need("qemu-img"), "compare", "-f", "raw", "-F", "raw", a, b], text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("target", ["nbdkit", "tapdisk"])
def test_fio_through_a_mirrored_disk(host: Host, tmp_path: Path,  # noqa: F811
                                     nbdkit: Nbdkit, target: str) -> None:
    leaf = sparse(tmp_path / "leaf.img", SIZE)
    if target == "nbdkit":
        secondary, secondary_uri = f"nbd:{nbdkit.socket}", nbdkit.uri
    else:
        dest = sparse(tmp_path / "dest.img", SIZE)
        dpid, dminor = host.create(f"aio:{dest}")
        secondary = f"nbd:{host.run_dir}/nbd{dpid}.{dminor}"
        secondary_uri = host.nbd(dpid, dminor)
    pid, minor = host.create(f"aio:{leaf}", "-2", secondary)
    uri = host.nbd(pid, minor)
    fio_verify(uri, tmp_path)
    st = stats(host, pid, minor)
    assert st["mirror"]["state"] == "active" and st["nbd_mirror_failed"] == 0
    assert st["mirror"]["secs"][1] == st["secs"][1] >= 16 * MiB // 512
    compare(str(leaf), secondary_uri)
    compare(uri, secondary_uri)


@pytest.mark.parametrize("standby", [False, True], ids=["mirror", "standby"])
def test_leaf_enospc_nbd_secondary(host: Host, tmp_path: Path, small_fs: Path,  # noqa: F811
                                   nbdkit: Nbdkit, standby: bool) -> None:
    leaf = sparse(small_fs / "leaf.img", SIZE)
    extra = ["-s"] if standby else []
    pid, minor = host.create(f"aio:{leaf}", "-D", "-2", f"nbd:{nbdkit.socket}", *extra)
    uri = host.nbd(pid, minor)
    model = bytearray(SIZE)
    for byte, off, n in [(0x31, 0, MiB), (0x32, 4 * MiB, 4 * MiB), (0x33, 20 * MiB, 2 * MiB),
                         (0x34, 512 * KiB, 128 * KiB)]:
        qemu_io(uri, f"write -P {byte:#x} {off} {n}")
        model[off:off + n] = bytes([byte]) * n
    qemu_io(uri, "flush")
    assert read_disk(uri, tmp_path) == model
    st = stats(host, pid, minor)
    assert st["mirror"]["state"] == "failed-over" and st["FIXME_enospc_redirect_count"] > 0
    assert (host.run_dir.parent / f"tapdisk-enospc{minor}").exists()
    if not standby:
        assert read_disk(nbdkit.uri, tmp_path) == model
    host.out("destroy", "-p", str(pid), "-m", str(minor))


def test_secondary_killed_mid_run(host: Host, tmp_path: Path,  # noqa: F811
                                  nbdkit: Nbdkit) -> None:
    """nbdkit is killed while a client writes: the writes the client saw acknowledged
    are all on the disk (the leaf), none failed; the mirror is marked failed within the
    request timeout (-t 3), in stats and in the log."""
    leaf = sparse(tmp_path / "leaf.img", SIZE)
    pid, minor = host.create(f"aio:{leaf}", "-t", "3", "-2", f"nbd:{nbdkit.socket}")
    writer = Writer(host.run_dir / f"nbd{pid}.{minor}", tmp_path)
    try:
        writer.wait_for(50)
        nbdkit.kill()
        at_kill = writer.count()
        writer.wait_for(at_kill + 100, timeout=120)
        n = writer.finish()
    finally:
        writer.kill()
    st = stats(host, pid, minor)
    assert st["nbd_mirror_failed"] == 1 and st["mirror"]["state"] == "failed", st
    assert st["counters"]["write_errors"] == 0
    disk = read_disk(host.nbd(pid, minor), tmp_path)
    assert disk[:BLOCKS * 64 * KiB] == replay(n, BLOCKS * 64 * KiB)
    assert disk == leaf.read_bytes()
    host.out("destroy", "-p", str(pid), "-m", str(minor))
    assert f"secondary nbd:{nbdkit.socket} failed" in tapdisk_log(host, pid)
