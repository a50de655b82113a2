"""`blktap serve --fuse FILE`: the disk as a regular file, with real peers (losetup,
mkfs.ext4, mount, fsck, qemu-img, vhd-util) on a VHD chain."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import need, run, tool

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse")
MiB = 1 << 20


def root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("losetup and mount need root")


class FuseServed:
    def __init__(self, spec: str, path: Path, *args: str) -> None:
        self.path = path
        self.proc = subprocess.Popen([tool("blktap"), "serve", spec, "--fuse", str(path),
                                      *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != f"fuse:{path}":
            self.proc.kill()
            raise AssertionError(f"serve said {line!r}: {self.proc.communicate()[1]}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.stdout:
                self.proc.stdout.close()

    @property
    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read()


def mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


@pytest.fixture
def cleanup() -> Iterator[list]:
    """Undo (in reverse) whatever a test left mounted or attached, even when it fails."""
    undo: list = []
    yield undo
    for argv in reversed(undo):
        subprocess.run(argv, capture_output=True, timeout=60)


def vhd_chain(tmp_path: Path) -> tuple[Path, Path]:
    """A 64 MiB dynamic VHD with data, and a snapshot child of it."""
    base, leaf = tmp_path / "base.vhd", tmp_path / "leaf.vhd"
    vhd_util = tool("vhd-util")
    assert run([vhd_util, "create", "-n", str(base), "-s", "64"]).returncode == 0
    r = run([need("qemu-io"), "-f", "vpc", "-c", "write -P 0x5a 1M 3M", str(base)])
    assert r.returncode == 0, r.stderr
    r = run([vhd_util, "snapshot", "-n", str(leaf), "-p", str(base)])
    assert r.returncode == 0, r.stdout + r.stderr
    return base, leaf


def vhd_check(*images: Path) -> None:
    for image in images:
        r = run([tool("vhd-util"), "check", "-n", str(image)], text=True)
        assert r.returncode == 0 and "is valid" in r.stdout, r.stdout + r.stderr


def test_fuse_file_ext4_on_loop_over_vhd_chain(tmp_path: Path, cleanup: list) -> None:
    root_only()
    for program in ("losetup", "mkfs.ext4", "fsck.ext4", "mount", "umount"):
        need(program)
    base, leaf = vhd_chain(tmp_path)
    disk = tmp_path / "disk.raw"
    served = FuseServed(f"vhd:{leaf}", disk)
    cleanup.append(["umount", "-l", str(disk)])
    assert mounted(disk)
    assert disk.stat().st_size == 64 * MiB and disk.is_file()
    # The parent's data shows through: qemu-img reads the file as raw as it reads the
    # parent as VHD (qemu's vpc driver does not follow a differencing disk's parent).
    with open(disk, "rb") as f:
        f.seek(2 * MiB)
        assert f.read(4096) == b"\x5a" * 4096
    r = run([need("qemu-img"), "compare", "-f", "raw", "-F", "vpc", str(disk), str(base)])
    assert r.returncode == 0, r.stdout + r.stderr

    loop = run(["losetup", "-f", "--show", str(disk)], text=True)
    assert loop.returncode == 0, loop.stderr
    dev = loop.stdout.strip()
    cleanup.append(["losetup", "-d", dev])
    assert run(["mkfs.ext4", "-q", "-F", dev]).returncode == 0
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    assert run(["mount", dev, str(mnt)]).returncode == 0
    cleanup.append(["umount", str(mnt)])
    payload = os.urandom(3 * MiB + 123)
    (mnt / "a.bin").write_bytes(payload)
    (mnt / "dir").mkdir()
    (mnt / "dir" / "note.txt").write_text("file-level restore\n")
    assert run(["umount", str(mnt)]).returncode == 0
    r = run(["fsck.ext4", "-n", "-f", dev], text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert run(["losetup", "-d", dev]).returncode == 0

    assert served.stop() == 0, served.stderr
    assert not mounted(disk)
    assert not disk.exists()  # serve made the file, serve removed it
    vhd_check(leaf, base)
    # Only the leaf changed: the parent still reads as before.
    r = run([need("qemu-io"), "-f", "vpc", "-c", "read -P 0x5a 1M 3M", str(base)], text=True)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout

    # The restore path of docs/attach.md: read-only file, read-only loop, ro mount.
    ro = FuseServed(f"vhd:{leaf}", disk, "--read-only")
    loop = run(["losetup", "-f", "--show", "-r", str(disk)], text=True)
    assert loop.returncode == 0, loop.stderr
    dev = loop.stdout.strip()
    cleanup.append(["losetup", "-d", dev])
    assert run(["mount", "-o", "ro,noload", dev, str(mnt)]).returncode == 0
    assert (mnt / "a.bin").read_bytes() == payload
    assert (mnt / "dir" / "note.txt").read_text() == "file-level restore\n"
    # qemu-img reads the file as it reads the chain copied out whole.
    flat = tmp_path / "flat.raw"
    r = run([tool("blktap"), "convert", f"vhd:{leaf}", str(flat)])
    assert r.returncode == 0, r.stderr
    r = run([need("qemu-img"), "compare", "-f", "raw", "-F", "raw", str(disk), str(flat)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert run(["umount", str(mnt)]).returncode == 0
    assert run(["losetup", "-d", dev]).returncode == 0
    assert ro.stop() == 0
    vhd_check(leaf, base)


def test_fuse_holes_read_only_and_fixed_size(tmp_path: Path, cleanup: list) -> None:
    base, leaf = vhd_chain(tmp_path)
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"")  # an existing file is covered, and kept afterwards
    served = FuseServed(f"vhd:{leaf}", disk)
    cleanup.append(["umount", "-l", str(disk)])
    fd = os.open(disk, os.O_RDWR)
    try:
        # Data where the parent has it (qemu-io's write 1M..4M allocated the 2 MiB
        # blocks 0 and 1 whole), holes elsewhere, the end a hole.
        assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        assert os.lseek(fd, 1 * MiB, os.SEEK_HOLE) == 4 * MiB
        assert os.lseek(fd, 5 * MiB, os.SEEK_HOLE) == 5 * MiB
        with pytest.raises(OSError) as exc:
            os.lseek(fd, 5 * MiB, os.SEEK_DATA)
        assert exc.value.errno == errno.ENXIO
        os.pwrite(fd, b"\x33" * 4096, 40 * MiB)
        assert os.lseek(fd, 5 * MiB, os.SEEK_DATA) == 40 * MiB
        # Unaligned I/O, and a write that runs past the end is cut short.
        os.pwrite(fd, b"xyz", 40 * MiB + 7)
        assert os.pread(fd, 12, 40 * MiB) == b"\x33" * 7 + b"xyz" + b"\x33" * 2
        assert os.pwrite(fd, b"e" * 1000, 64 * MiB - 100) == 100
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"e", 64 * MiB)
        assert exc.value.errno in (errno.ENOSPC, errno.EFBIG)
        # Punching a hole reads back as zeros.
        os.posix_fallocate  # noqa: B018 - fallocate(2) with flags needs the libc call
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.fallocate(fd, 0x03, ctypes.c_long(40 * MiB), ctypes.c_long(4096)) == 0
        assert os.pread(fd, 4096, 40 * MiB) == bytes(4096)
        os.fsync(fd)
        # The size is the disk's.
        with pytest.raises(OSError) as exc:
            os.ftruncate(fd, MiB)
        assert exc.value.errno == errno.EPERM
    finally:
        os.close(fd)
    assert disk.stat().st_size == 64 * MiB
    assert served.stop() == 0
    assert disk.exists() and disk.stat().st_size == 0
    vhd_check(leaf, base)

    ro = FuseServed(f"vhd:{leaf}", disk, "--read-only")
    cleanup.append(["umount", "-l", str(disk)])
    with pytest.raises(OSError) as exc:
        os.open(disk, os.O_RDWR)
    assert exc.value.errno in (errno.EROFS, errno.EACCES)
    with open(disk, "rb") as f:
        f.seek(64 * MiB - 100)
        assert f.read() == b"e" * 100
    assert ro.stop() == 0


def test_fuse_server_killed(tmp_path: Path, cleanup: list) -> None:
    base, leaf = vhd_chain(tmp_path)
    disk = tmp_path / "disk.raw"
    served = FuseServed(f"vhd:{leaf}", disk)
    cleanup.append(["umount", "-l", str(disk)])
    with open(disk, "r+b") as f:
        f.seek(8 * MiB)
        f.write(b"\x77" * MiB)
        f.flush()
        os.fsync(f.fileno())
    assert served.stop(signal.SIGKILL) == -signal.SIGKILL
    # Whatever touches the file fails at once, nothing hangs.
    t0 = time.monotonic()
    probe = subprocess.run(["dd", f"if={disk}", "of=/dev/null", "bs=4k", "count=1"],
                           capture_output=True, text=True, timeout=30)
    assert probe.returncode != 0
    assert "not connected" in probe.stderr, probe.stderr
    assert time.monotonic() - t0 < 30
    assert mounted(disk)
    if os.geteuid() == 0:
        r = run(["umount", "-l", str(disk)])
    else:
        r = run([need("fusermount3"), "-u", "-z", str(disk)])
    assert r.returncode == 0, r.stderr
    assert not mounted(disk)
    vhd_check(leaf, base)
    r = run([need("qemu-io"), "-f", "vpc", "-c", "read -P 0x77 8M 1M", str(leaf)],
            text=True)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout


def test_fuse_bad_target(tmp_path: Path) -> None:
    image = tmp_path / "d.raw"
    image.write_bytes(bytes(MiB))
    r = run([tool("blktap"), "serve", f"aio:{image}", "--fuse", str(tmp_path)], text=True)
    assert r.returncode == errno.EINVAL, r.stderr
    assert "not a regular file" in r.stderr
    assert r.stdout == ""


def test_fuse_sigterm_while_a_loop_device_holds_the_file(tmp_path: Path, cleanup: list) -> None:
    root_only()
    need("losetup")
    image = tmp_path / "d.raw"
    image.write_bytes(b"\x42" * (4 * MiB))
    disk = tmp_path / "disk.raw"
    served = FuseServed(f"aio:{image}", disk)
    cleanup.append(["umount", "-l", str(disk)])
    loop = run(["losetup", "-f", "--show", str(disk)], text=True)
    assert loop.returncode == 0, loop.stderr
    dev = loop.stdout.strip()
    cleanup.append(["losetup", "-d", dev])
    served.proc.send_signal(signal.SIGTERM)
    # The name goes at once; the loop device is still served until it lets go.
    deadline = time.monotonic() + 30
    while mounted(disk) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not mounted(disk)
    with open(dev, "rb") as f:
        assert f.read(4096) == b"\x42" * 4096
    assert served.proc.poll() is None
    assert run(["losetup", "-d", dev]).returncode == 0
    # The loop device lets go of the file soon after (its release is deferred work):
    # then the server ends by itself.
    assert served.proc.wait(timeout=60) == 0
    assert "in use" in served.stderr


def test_fuse_as_a_user_through_fusermount3(tmp_path: Path) -> None:
    """Not root: fusermount3 mounts and hands the descriptor back; SIGTERM unmounts."""
    root_only()  # to become another user
    need("fusermount3")
    need("setpriv")
    # Another user cannot run our venv's interpreter (under root's home): the system's.
    python = "/usr/bin/python3"
    if subprocess.run([python, "-c", "import sys; assert sys.version_info >= (3, 11)"],
                      capture_output=True).returncode != 0:
        pytest.skip("no system python3 >= 3.11 for another user")
    import shutil
    import tempfile

    from conftest import ROOT
    base = Path(tempfile.mkdtemp(prefix="blktap-fuse-user-"))  # tmp_path is root's only
    try:
        base.chmod(0o777)
        shutil.copytree(ROOT / "src", base / "src",
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        image = base / "u.raw"
        image.write_bytes(bytes(MiB))
        image.chmod(0o666)
        subprocess.run(["chmod", "-R", "a+rX", str(base / "src")], check=True)
        disk = base / "f.raw"
        user = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "env",
                f"HOME={base}", f"PYTHONPATH={base / 'src'}"]
        proc = subprocess.Popen([*user, python, "-c",
                                 "import sys; from blktap.cli.main import main; "
                                 "sys.exit(main())", "serve", f"aio:{image}", "--fuse",
                                 str(disk)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            assert line == f"fuse:{disk}", proc.stderr.read() if proc.stderr else ""
            assert mounted(disk)
            r = subprocess.run([*user, "dd", "if=/dev/zero", f"of={disk}", "bs=4k", "count=1",
                                "seek=3", "conv=notrunc,fsync"], capture_output=True,
                               text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            r = subprocess.run([*user, "stat", "-c", "%u %s", str(disk)], capture_output=True,
                               text=True, timeout=60)
            assert r.stdout.split() == ["65534", str(MiB)], r.stderr
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=60)
        assert rc == 0, proc.stderr.read() if proc.stderr else ""
        assert not mounted(disk) and not disk.exists()
    finally:
        subprocess.run(["umount", "-l", str(base / "f.raw")], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
