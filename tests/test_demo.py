"""``make run`` (scripts/demo.sh) end to end: the VHD chain shown and served over NBD, and,
where QEMU and the guest testbed are, a Linux guest booting on a chain served by tapdisk
over vhost-user-blk, with a live snapshot (tap-ctl pause, vhd-util snapshot, tap-ctl
unpause -a) taken while the guest writes its file system."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from conftest import ROOT, SHARED

pytestmark = pytest.mark.slow


def test_make_run_with_a_guest_and_a_live_snapshot() -> None:
    if not (SHARED / "guest-testbed" / "boot.sh").exists():
        pytest.skip("../shared/guest-testbed is absent")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 not installed (scripts/install-deps.sh installs it)")
    env = {**os.environ, "DEMO_NO_WAIT": "1",
           "GUEST_TESTBED_DIR": os.environ.get("GUEST_TESTBED_DIR",
                                               "/var/tmp/blktap-guest-testbed")}
    res = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "serving at nbd+unix://" in out
    guest = out.split("a Linux guest on a VHD chain", 1)
    assert len(guest) == 2, out[-4000:]
    part = guest[1]
    assert "GUEST-TESTBED: PASS" in part, part[-4000:]
    assert re.search(r"RESULT verify: OK", part) and re.search(r"RESULT fs: OK", part), part
    # The guest's writes after the snapshot went to the new leaf; the chain checks.
    assert re.search(r"args=vhd:\S+/snap\.vhd", part), part
    for name in ("snap.vhd", "leaf.vhd", "base.vhd"):
        assert f"{name} is valid" in part, part
    assert re.search(r"chain depth:\s+3", part), part
