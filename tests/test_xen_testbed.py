"""Our tapdisk serving a real Xen guest, in the Xen testbed (slow: minutes under TCG).
The testbed's default workload runs through tapback in tests/test_xen_guest.py (PV and
PVH); here the ring alone gets the guest script that needs flush, indirect and discard.

``tests/xen/run_testbed.sh`` stages this tree into dom0 and runs the testbed's
``userspace-pv`` scenario with ``tests/xen/mini_backend.py`` (a test-only XenStore
handshake) handing the guest's ring to ``tap-ctl create -a aio:$DISK_IMAGE``. The
testbed is built once by ``conftest.xen_testbed`` (``XEN_TESTBED_DIR``, see
../shared/xen-testbed/README.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import xen_rig_env

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "tests" / "xen" / "run_testbed.sh"

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _built(xen_testbed: Path) -> None:
    global BUILD
    BUILD = xen_testbed


BUILD = Path("/var/tmp/xen-testbed")  # replaced by the built testbed (conftest.xen_testbed)


# What the testbed's TCG dom0 shows when its own user space crashed under load (xl dying
# of SIGSEGV/SIGABRT, the rig's `xl domid` loop ending early): a run worth one retry.
RIG_CRASH = re.compile(r"Segmentation fault|general protection fault|xl-create rc=134")


# A run takes 1-3 minutes here (more under load). A run the rig's own timeout ends gets one
# retry. Runs used to hang after the guest was gone, with dom0's user space crashing (a
# `sleep` spinning, xl and python3 segfaulting in libc): QEMU's `-cpu max` under TCG, cured
# by conftest.XEN_RIG_CPU (issue 12); a hang now fails like any wrong result.
RIG_TIMEOUT = 600
RIG_HUNG = re.compile(r"qemu-exit=124")


def run_rig(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = xen_rig_env(BUILD)
    argv = [str(RUN), "--mini", "--out", str(out), "--timeout", str(RIG_TIMEOUT),
            "--backend-wait", "120", *args]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=RIG_TIMEOUT + 300,
                       env=env)
    serial = out / "serial.log"
    if r.returncode and (RIG_HUNG.search(r.stdout + r.stderr) or serial.exists() and
                         RIG_CRASH.search(serial.read_text(errors="replace"))):
        shutil.rmtree(out)
        r = subprocess.run(argv, capture_output=True, text=True, timeout=RIG_TIMEOUT + 300,
                           env=env)
    return r


def ring_stats(out: Path) -> dict:
    for name in ("tapdisk-stats-after-guest.json", "tapdisk-stats-final.json"):
        path = out / "out" / name
        if path.exists():
            stats = json.loads(path.read_text())
            if "xenblkif" in stats:
                return stats["xenblkif"]
    raise AssertionError("no ring statistics came back")


def test_flush_indirect_and_discard_reach_tapdisk(tmp_path: Path) -> None:
    out = tmp_path / "run"
    script = ROOT / "tests" / "xen" / "guest_features.sh"
    r = run_rig(out, "--scenario", "userspace-pv", "--guest-script", str(script),
                "--image", str(_image(tmp_path)))
    verdict = (out / "verdict.txt").read_text() if (out / "verdict.txt").exists() else ""
    assert r.returncode == 0, verdict + r.stdout[-4000:]
    st = ring_stats(out)
    assert st["flushes"] > 0 and st["discards"] > 0
    assert st["indirect"] > 0 and st["max_segments"] > 11
    assert st["errors"] == 0 and st["unsupported"] == 0


def _image(tmp: Path) -> Path:
    img = tmp / "guest.img"
    with open(img, "wb") as f:
        f.write(os.urandom(1 << 20))
        f.truncate(16 << 20)
    return img
