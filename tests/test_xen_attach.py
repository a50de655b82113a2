"""`blktap attach` with a real kernel NBD client: in the Xen testbed's dom0 (Debian 12's
6.1 kernel has nbd.ko; the machines we build on have none). The backend command attaches
the testbed's disk through a tapdisk, makes an ext4 file system on /dev/nbdN, writes
files, checks that tap-ctl sees, pauses and resumes the tapdisk, detaches, then attaches
read-only and reads the files back; last, it kills the tapdisk under an attached device
(I/O fails after the dead-connection timeout; detach cleans up and reports EIO). The host
then checks the image it gets back (e2fsck, the files' bytes). Slow: one testbed run, 7
to 12 minutes on a shared 2-core machine (every Python start in the TCG dom0 costs
seconds)."""

from __future__ import annotations

import hashlib
import subprocess

import pytest

from test_xen_guest import PREP, explain, payload, run_testbed, testbed  # noqa: F401

pytestmark = pytest.mark.slow

BIG = (b"blktap over kernel nbd\n" * 136800)[:3145720]  # yes ... | head -c 3145720
SMALL = b"file-level restore\n"

# Run in dom0 (set -e: the first failing step fails the run, its output in backend.log).
ATTACH_CMD = PREP + r"""
printf '#!/bin/sh\nPYTHONPATH=/opt/payload/src exec python3 -c "%s" "$@"\n' \
  "import sys; from blktap.cli.main import main; sys.exit(main())" > /usr/local/bin/blktap
chmod 755 /usr/local/bin/blktap
step() { echo "ATTACH-STEP $*"; }
dev=$(blktap attach aio:$DISK_IMAGE)
n=${dev#/dev/nbd}
step "attached $dev"
blktap attached
set -- $(tap-ctl list | head -n 1)
tid=${1#pid=} minor=${2#minor=}
step "tap-ctl list: $(tap-ctl list)"
step "scheduler $(cat /sys/block/nbd$n/queue/scheduler)"
step "backend $(cat /sys/block/nbd$n/backend 2>/dev/null)"
step "size $(blockdev --getsize64 $dev)"
mkfs.ext4 -q -F $dev
mkdir -p /mnt/t
mount $dev /mnt/t
mkdir /mnt/t/dir
yes 'blktap over kernel nbd' | head -c 3145720 > /mnt/t/big
printf 'file-level restore\n' > /mnt/t/dir/small
sync
umount /mnt/t
tap-ctl pause -p $tid -m $minor
step "paused: $(tap-ctl list)"
tap-ctl unpause -p $tid -m $minor
dd if=$dev of=/dev/null bs=1M count=4 iflag=direct 2>/dev/null
step "stats $(tap-ctl stats -p $tid -m $minor | tr -d '\n' | cut -c1-200)"
e2fsck -fn $dev
mount $dev /mnt/t
if blktap detach $dev; then exit 10; fi   # mounted: refused
umount /mnt/t
blktap detach $dev
step "detached; list now: [$(tap-ctl list)] attached: [$(blktap attached)]"
test -z "$(tap-ctl list)"
test -z "$(blktap attached)"
dev=$(blktap attach --read-only aio:$DISK_IMAGE)
step "attached read-only $dev"
if dd if=/dev/zero of=$dev bs=4k count=1 oflag=direct 2>/dev/null; then exit 11; fi
mount -o ro $dev /mnt/t
step "small $(cat /mnt/t/dir/small) big-md5 $(md5sum < /mnt/t/big | cut -c1-32)"
umount /mnt/t
blktap detach $dev
step "done"
# The tapdisk dies under an attached device: I/O fails once the dead-connection timeout
# has passed (it does not hang), and detach still cleans up, reporting the failed flush.
dev=$(blktap attach --timeout 10 --dead-conn-timeout 3 aio:$DISK_IMAGE)
set -- $(tap-ctl list | head -n 1)
kill -9 ${1#pid=}
t0=$(date +%s)
if timeout 120 dd if=$dev of=/dev/null bs=4k count=1 skip=1000 iflag=direct; then exit 12; fi
step "dead: read failed after $(( $(date +%s) - t0 )) s"
rc=0; timeout 120 blktap detach $dev || rc=$?
conn=$(cat /sys/block/${dev#/dev/}/pid 2>/dev/null || echo no)
step "dead: detach rc=$rc attached: [$(blktap attached)] connected: $conn"
step "dead-done"
"""


def test_kernel_nbd_attach_in_xen_dom0(testbed, payload, tmp_path):  # noqa: F811
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    out = tmp_path / "run"
    rc, text = run_testbed(testbed, out, "none", payload=payload, backend=ATTACH_CMD,
                           image=image)
    assert rc == 0, explain(out, text)
    # The backend ends by itself (exit 0, "early" for the rig, which then keeps no
    # backend.log): its lines are in the serial log.
    serial = (out / "serial.log").read_text(errors="replace")
    log = "\n".join(line.removeprefix("[backend] ") for line in serial.splitlines()
                    if line.startswith("[backend] "))
    assert "ATTACH-STEP done" in log, log[-4000:]
    assert "ATTACH-STEP scheduler [none]" in log, log[-4000:]
    assert "ATTACH-STEP dead-done" in log, log[-4000:]
    assert "ATTACH-STEP dead: detach rc=5 attached: [] connected: no" in log, log[-4000:]
    assert "ATTACH-STEP size 67108864" in log, log[-4000:]
    assert "ATTACH-STEP backend blktap:" in log, log[-4000:]
    assert "state=0x2a" in log.split("ATTACH-STEP paused:")[1].splitlines()[0]
    assert f"small file-level restore big-md5 {hashlib.md5(BIG).hexdigest()}" \
        in log, log[-4000:]
    # The image the host gets back: a clean file system holding the files.
    disk = out / "disk.img"
    r = subprocess.run(["e2fsck", "-fn", str(disk)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    for name, want in (("/big", BIG), ("/dir/small", SMALL)):
        r = subprocess.run(["debugfs", "-R", f"cat {name}", str(disk)], capture_output=True)
        assert r.stdout == want, (name, len(r.stdout))
