"""vhost-user-blk with a real guest: QEMU (TCG) boots a tiny Linux whose only disk is a
vhost-user-blk-pci device on our back-end, runs workloads and checks what it wrote, and the
host checks the image file. The rig is shared/guest-testbed (its README says all); the same
boots against qemu-storage-daemon give the reference to compare with.

Each boot takes 5-10 s of TCG, so the boots are shared by module-scoped fixtures."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import ROOT, SHARED, run, tool
from vhost_user_servers import MiB, start_server

pytestmark = pytest.mark.slow

GUEST = SHARED / "guest-testbed"
DISK = 128 * MiB
MODES = "verify,fs,discard"
SEED = 4242
SERIAL = "blktap-guest-disk"
VERIFY_OFFSET, VERIFY_MIB = 40, 8          # boot.sh's defaults, for the host-side check


@pytest.fixture(scope="session")
def testbed() -> Path:
    """The guest testbed built (kernel, initramfs, blkbench) under a cache dir."""
    if not (GUEST / "build.sh").exists():
        pytest.skip(f"guest testbed not found at {GUEST} (../shared is absent)")
    wdir = Path(os.environ.get("GUEST_TESTBED_DIR", "/var/tmp/blktap-guest-testbed"))
    wdir.mkdir(parents=True, exist_ok=True)
    # build.sh installs the Debian packages it misses when it runs as root
    res = run(["bash", str(GUEST / "build.sh")], text=True, timeout=1800,
              env={**os.environ, "GUEST_TESTBED_DIR": str(wdir)})
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed (scripts/install-deps.sh installs it)")
    if res.returncode != 0:
        if "missing packages" in res.stderr or "no readable /boot/vmlinuz" in res.stderr:
            pytest.skip(f"guest testbed cannot be built here: {res.stderr.strip()}")
        raise AssertionError(f"guest-testbed build.sh failed:\n{res.stdout}\n{res.stderr}")
    return wdir


@dataclass
class Boot:
    ok: bool
    output: str
    verdict: str = ""
    results: list[str] = field(default_factory=list)
    ready: dict[str, str] = field(default_factory=dict)

    def comparable(self) -> list[str]:
        """The RESULT lines without their timings."""
        return [re.sub(r" secs=\S+", "", r) for r in self.results]


def boot(testbed: Path, *args: str, qemu_extra: str = "") -> Boot:
    env = {**os.environ, "GUEST_TESTBED_DIR": str(testbed)}
    if qemu_extra:
        env["QEMU_EXTRA"] = qemu_extra
    res = run(["bash", str(GUEST / "boot.sh"), "--timeout", "400", *args], text=True,
              timeout=600, env=env)
    out = res.stdout + res.stderr
    b = Boot(res.returncode == 0, out)
    for line in out.splitlines():
        if m := re.search(r"(GUEST-TESTBED: (PASS|FAIL).*)", line):
            b.verdict = m.group(1)
        elif m := re.search(r"\bRESULT (.*)", line):
            b.results.append(m.group(1).strip())
        elif m := re.search(r"GUEST_VDA_READY (.*)", line):
            b.ready = dict(w.split("=", 1) for w in m.group(1).split() if "=" in w)
    return b


def assert_pass(b: Boot) -> None:
    assert b.ok and b.verdict.startswith("GUEST-TESTBED: PASS"), b.output[-4000:]
    assert not [r for r in b.results if "FAILED" in r or "MISMATCH" in r], b.results
    for mode in MODES.split(","):
        assert any(r.startswith(f"{mode}: OK") for r in b.results), (mode, b.results)


def host_check(testbed: Path, image: Path, seed: int = SEED) -> str:
    """blkbench's own check of the verify region inside a raw file."""
    res = run([str(testbed / "blkbench"), str(image), "check", str(VERIFY_OFFSET << 20),
               str(VERIFY_MIB << 20), str(seed)], text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "check: OK" in res.stdout, res.stdout
    return res.stdout


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("guest")


def raw_disk(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(DISK)
    return path


@pytest.fixture(scope="module")
def raw_boots(testbed: Path, workdir: Path) -> Iterator[dict[str, tuple[Boot, Path]]]:
    """The same boot (same seed) over qsd and over ours, each on a fresh raw image."""
    out: dict[str, tuple[Boot, Path]] = {}
    for kind in ("qsd", "ours"):
        d = workdir / kind
        d.mkdir()
        img = raw_disk(d / "disk.raw")
        server = start_server(kind, f"aio:{img}", d, serial=SERIAL)
        try:
            out[kind] = (boot(testbed, "--mode", MODES, "--seed", str(SEED), "--check-image",
                              str(img), "vhost", str(server.sock)), img)
        finally:
            rc = server.stop()
        assert rc == 0, f"{kind} exited {rc}: {server.log_text()}"
    yield out


def test_boot_raw_ours(raw_boots: dict[str, tuple[Boot, Path]], testbed: Path) -> None:
    b, img = raw_boots["ours"]
    assert_pass(b)
    assert "host check of" in b.output and "check: OK" in b.output
    host_check(testbed, img)           # once more, after our server has exited


def test_boot_raw_qsd(raw_boots: dict[str, tuple[Boot, Path]]) -> None:
    """The reference boot passes too (else the comparisons below prove nothing)."""
    assert_pass(raw_boots["qsd"][0])


def test_same_results_as_qsd(raw_boots: dict[str, tuple[Boot, Path]]) -> None:
    ours, qsd = raw_boots["ours"][0], raw_boots["qsd"][0]
    assert ours.comparable() == qsd.comparable()


def test_limits_at_least_qsds(raw_boots: dict[str, tuple[Boot, Path]]) -> None:
    """What the guest negotiated (GUEST_VDA_READY): the same disk, and limits that are at
    least the reference's."""
    ours, qsd = raw_boots["ours"][0].ready, raw_boots["qsd"][0].ready
    assert ours and qsd
    assert ours["sectors"] == qsd["sectors"] == str(DISK // 512)
    assert ours["lbs"] == qsd["lbs"] and ours["ro"] == "0"
    for key in ("max_hw_kb", "max_segs", "discard_max", "wzeroes_max"):
        assert int(ours[key]) >= int(qsd[key]), (key, ours, qsd)
    assert ours["mq"] == "1"
    assert ours["wcache"] == "write_back"      # we offer FLUSH with writeback on (qsd: off)


def test_serial_shows_in_guest(raw_boots: dict[str, tuple[Boot, Path]]) -> None:
    assert raw_boots["ours"][0].ready.get("serial") == SERIAL
    assert raw_boots["qsd"][0].ready.get("serial") == "vhost_user_blk"


def test_boot_vhd_chain_two_queues(testbed: Path, workdir: Path) -> None:
    """A VHD chain made with vhd-util (create, snapshot), served with two queues (the
    guest gets two vCPUs, as Linux uses one queue per CPU at most; QEMU keeps the last
    -smp): the guest's writes land in the leaf; the chain converted to raw holds the
    verify pattern where it belongs."""
    d = workdir / "vhd"
    d.mkdir()
    base, leaf = d / "base.vhd", d / "leaf.vhd"
    for argv in (["create", "-n", str(base), "-s", str(DISK // MiB)],
                 ["snapshot", "-n", str(leaf), "-p", str(base)]):
        res = run([tool("vhd-util"), *argv], text=True)
        assert res.returncode == 0, res.stderr
    base_before = base.read_bytes()
    server = start_server("ours", f"vhd:{leaf}", d, serial=SERIAL, num_queues=2)
    try:
        b = boot(testbed, "--mode", MODES, "--seed", str(SEED), "--queues", "2", "vhost",
                 str(server.sock), qemu_extra="-smp 2")
    finally:
        rc = server.stop()
    assert rc == 0, server.log_text()
    assert_pass(b)
    assert b.ready.get("mq") == "2", b.ready
    assert base.read_bytes() == base_before, "the parent changed"
    flat = d / "flat.raw"
    res = run([tool("blktap"), "convert", "-O", "raw", f"vhd:{leaf}", str(flat)], text=True)
    assert res.returncode == 0, res.stderr
    assert flat.stat().st_size == DISK
    host_check(testbed, flat)
    res = run([tool("vhd-util"), "check", "-n", str(leaf)], text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_boot_after_boot(testbed: Path, workdir: Path) -> None:
    """One back-end, two guests one after the other (the second connects after the first
    QEMU exited): reconnection with a real front-end, and the second guest finds the first
    one's file system."""
    d = workdir / "again"
    d.mkdir()
    img = raw_disk(d / "disk.raw")
    server = start_server("ours", f"aio:{img}", d)
    try:
        first = boot(testbed, "--mode", "verify,fs", "--seed", "7", "vhost", str(server.sock))
        second = boot(testbed, "--mode", "verify", "--seed", "8", "--check-image", str(img),
                      "vhost", str(server.sock))
    finally:
        rc = server.stop()
    assert rc == 0, server.log_text()
    assert first.ok and second.ok, (first.output[-3000:], second.output[-3000:])
    # the file system the first guest made is still in the image (ext2 magic at 1080)
    with open(img, "rb") as f:
        f.seek(1080)
        assert f.read(2) == b"\x53\xef"


def test_rig_is_not_fooled(testbed: Path, workdir: Path) -> None:
    """The host check fails on an image that does not hold the pattern: a PASS above means
    something."""
    img = raw_disk(workdir / "empty.raw")
    res = run([str(testbed / "blkbench"), str(img), "check", str(VERIFY_OFFSET << 20),
               str(VERIFY_MIB << 20), str(SEED)], text=True)
    assert res.returncode != 0




def test_guest_bench_quick(testbed: Path, tmp_path: Path) -> None:
    """bench/guest.py --quick runs end to end: one boot per server, six workloads each, a
    report section and the JSON. No timing is asserted."""
    (tmp_path / "REPORT.md").write_text("# Benchmark report\n\n## Other\n\nkept\n")
    res = run([sys.executable, str(ROOT / "bench" / "guest.py"), "--quick", "--out",
               str(tmp_path), "--image-mib", "128"], text=True, timeout=900,
              env={**os.environ, "GUEST_TESTBED_DIR": str(testbed)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = (tmp_path / "REPORT.md").read_text()
    assert "## Other\n\nkept" in text and "| randread 4k qd16 |" in text
    data = json.loads((tmp_path / "results" / "guest.json").read_text())
    assert [r["server"] for r in data["runs"]] == ["qsd", "ours"]
    assert all(r["ok"] and len(r["results"]) == 6 for r in data["runs"])
    assert all(row["qsd"]["iops"] > 0 and row["ours"]["iops"] > 0 for row in data["rows"])


def stop_serve(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def test_guest_survives_kill_9_of_its_back_end(testbed: Path, tmp_path: Path) -> None:
    """QEMU with reconnect=1 (a copy of boot.sh that adds it); the back-end serving a VHD
    is killed with SIGKILL four times while the guest writes its pattern and started
    again each time: the inflight region brings back what was in flight, the guest's
    verify passes and the image is valid. Each kill waits until QEMU has connected again
    and set the device up: QEMU 7.2 itself wedges when its back-end dies in the middle of
    its connect handshake."""
    boot_rc = tmp_path / "boot-reconnect.sh"
    text = (GUEST / "boot.sh").read_text()
    assert 'socket,id=vu0,path=$SOCK"' in text
    text = text.replace('socket,id=vu0,path=$SOCK"', 'socket,id=vu0,path=$SOCK,reconnect=1"')
    text = re.sub(r"^HERE=.*$", f"HERE={GUEST}", text, count=1, flags=re.M)
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
        stop_serve(proc)
        logs.close()
    assert guest.returncode == 0, out[-3000:]
    assert "RESULT verify: OK" in out and "RESULT fs: OK" in out
    assert run([tool("vhd-util"), "check", "-n", str(leaf)]).returncode == 0
