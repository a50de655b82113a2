"""vhost-user-blk with a real QEMU guest (slow): the guest testbed of ../shared boots a
Linux guest whose only disk is served by `blktap serve --vhost-user`, writes a pattern,
a file system and a discard, and checks them; the host then checks the image."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import SHARED, run, tool

TESTBED = SHARED / "guest-testbed"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def testbed() -> Path:
    if not (TESTBED / "boot.sh").exists():
        pytest.skip(f"guest testbed not found at {TESTBED}")
    out = Path(os.environ.get("GUEST_TESTBED_DIR", "/var/tmp/guest-testbed"))
    built = run([str(TESTBED / "build.sh")], env={**os.environ, "GUEST_TESTBED_DIR": str(out)},
                timeout=1200)
    if built.returncode != 0 or shutil.which("qemu-system-x86_64") is None:
        pytest.skip(f"guest testbed did not build: {built.stderr[-500:]}")
    return out


def serve(image: str, sock: Path, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen([tool("blktap"), "serve", image, "--vhost-user", str(sock),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline().strip()
    assert line == f"vhost-user:{sock}", (line, proc.stderr.read() if proc.poll() else "")
    return proc


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return err


def boot(testbed: Path, sock: Path, *args: str) -> str:
    env = {**os.environ, "GUEST_TESTBED_DIR": str(testbed)}
    res = run([str(TESTBED / "boot.sh"), *args, "vhost", str(sock)], env=env, timeout=600,
              text=True)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "GUEST-TESTBED: PASS" in out, out[-3000:]
    return out


def limits(out: str) -> dict[str, str]:
    line = next(x for x in out.splitlines() if "GUEST_VDA_READY" in x)
    return dict(re.findall(r"(\w+)=(\S+)", line))


def test_guest_on_a_raw_image(testbed: Path, tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    with open(img, "wb") as f:
        f.truncate(256 << 20)
    sock = tmp_path / "vu.sock"
    proc = serve(f"aio:{img}", sock, "--serial", "guest-serial")
    try:
        out = boot(testbed, sock, "--mode", "verify,fs,discard", "--check-image", str(img))
    finally:
        stop(proc)
    got = limits(out)
    assert got["serial"] == "guest-serial"
    assert int(got["max_segs"]) >= 126  # qemu-storage-daemon 7.2's
    assert int(got["discard_max"]) >= 16 << 20
    assert got["wcache"] == "write_back"
    for what in ("verify: OK", "fs: OK", "discard: OK"):
        assert f"RESULT {what}" in out


def test_guest_on_a_vhd_chain_with_two_queues(testbed: Path, tmp_path: Path) -> None:
    base, leaf = tmp_path / "base.vhd", tmp_path / "leaf.vhd"
    assert run([tool("vhd-util"), "create", "-n", str(base), "-s", "256"]).returncode == 0
    assert run([tool("vhd-util"), "snapshot", "-n", str(leaf), "-p", str(base)]).returncode == 0
    sock = tmp_path / "vu.sock"
    proc = serve(f"vhd:{leaf}", sock, "--num-queues", "2")
    try:
        env_extra = os.environ.get("QEMU_EXTRA", "")
        os.environ["QEMU_EXTRA"] = f"{env_extra} -smp 2".strip()
        try:
            out = boot(testbed, sock, "--queues", "2", "--mode", "verify,fs,discard",
                       "--seed", "4242")
        finally:
            if env_extra:
                os.environ["QEMU_EXTRA"] = env_extra
            else:
                del os.environ["QEMU_EXTRA"]
    finally:
        stop(proc)
    assert limits(out)["mq"] == "2"
    # the data is in the chain: the host reads the verify region back through NBD
    assert run([tool("vhd-util"), "check", "-n", str(leaf)]).returncode == 0
    raw = tmp_path / "flat.raw"
    assert run([tool("blktap"), "convert", "-O", "raw", str(leaf), str(raw)]).returncode == 0
    m = re.search(r"RESULT check: OK offset=(\d+) bytes=(\d+) seed=(\d+)", out)
    assert m, out[-2000:]
    check = run([str(testbed / "blkbench"), str(raw), "check", *m.groups()], text=True)
    assert check.returncode == 0 and "check: OK" in check.stdout, check.stdout + check.stderr


def test_guest_survives_kill_9_of_its_back_end(testbed: Path, tmp_path: Path) -> None:
    """QEMU with reconnect=1 (a copy of boot.sh that adds it); the back-end serving a VHD
    is killed with SIGKILL four times while the guest writes its pattern and started
    again each time: the inflight region brings back what was in flight, the guest's
    verify passes and the image is valid. Each kill waits until QEMU has connected again
    and set the device up: QEMU 7.2 itself wedges when its back-end dies in the middle of
    its connect handshake."""
    boot_rc = tmp_path / "boot-reconnect.sh"
    text = (TESTBED / "boot.sh").read_text()
    assert 'socket,id=vu0,path=$SOCK"' in text
    text = text.replace('socket,id=vu0,path=$SOCK"', 'socket,id=vu0,path=$SOCK,reconnect=1"')
    text = re.sub(r"^HERE=.*$", f"HERE={TESTBED}", text, count=1, flags=re.M)
    boot_rc.write_text(text)
    boot_rc.chmod(0o755)
    leaf = tmp_path / "disk.vhd"
    assert run([tool("vhd-util"), "create", "-n", str(leaf), "-s", "256"]).returncode == 0
    sock = tmp_path / "vu.sock"
    logs = open(tmp_path / "serve.log", "w", buffering=1)  # noqa: SIM115

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([tool("blktap"), "serve", f"vhd:{leaf}", "--vhost-user",
                                 str(sock), "-v"], stdout=subprocess.PIPE, stderr=logs,
                                text=True)
        assert proc.stdout.readline().strip() == f"vhost-user:{sock}"
        return proc

    proc = start()
    env = {**os.environ, "GUEST_TESTBED_DIR": str(testbed)}
    guest = subprocess.Popen([str(boot_rc), "--mode", "verify,fs", "--verify-mib", "64",
                              "--timeout", "240",
                              "--seed", "11", "vhost", str(sock)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = ""
        for line in guest.stdout:
            out += line
            if "GUEST_VDA_READY" in line:
                break
        import time

        def connected() -> int:
            return (tmp_path / "serve.log").read_text().count("front-end connected")

        time.sleep(0.2)
        for k in range(4):
            proc.kill()
            proc.wait()
            time.sleep(0.3)
            proc = start()
            deadline = time.monotonic() + 60
            while connected() < k + 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)
        rest, _ = guest.communicate(timeout=600)
        out += rest
    finally:
        if guest.poll() is None:
            guest.kill()
            guest.wait()
        stop(proc)
        logs.close()
    assert guest.returncode == 0, out[-3000:]
    assert "RESULT verify: OK" in out and "RESULT fs: OK" in out
    assert run([tool("vhd-util"), "check", "-n", str(leaf)]).returncode == 0
