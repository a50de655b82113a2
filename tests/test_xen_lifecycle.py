"""Guests come and go while tapdisks and tapback stay: the Xen testbed, scenario ``none``,
with the whole story told by the backend command in dom0 (the rig waits for it to touch
its ready file, then stops it). Slow: one testbed run boots four guests.

1. Two PV guests at once (``xtb-a``, ``xtb-b``), each on its own VHD served by its own
   tapdisk through one tapback. Guest a boots an initrd whose init loads xen-blkfront
   with ``max_ring_page_order=4`` (the testbed's own loads it without parameters, and a
   reloaded blkfront stays Closed): its ring is 16 pages, through our CONNECT extension.
   Each writes a pattern naming itself, flushes, reads it back.
2. ``xl destroy`` of a guest (``xtb-c``) in the middle of its writes: its tapdisk lives on
   and answers, tapback tears the VBD down, the VHD passes ``vhd-util check`` (paused,
   so that what tapdisk holds is on disk), and a new guest (``xtb-d``) attaches to the
   same tapdisk and image and does its own workload.

The host then checks the VHDs with our ``vhd-util check`` and reads each guest's pattern
back through the library.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import SHARED
from test_xen_guest import PREP, explain, payload, run_testbed, testbed  # noqa: F401

pytestmark = pytest.mark.slow

MiB = 1 << 20
PATTERN_AT = 8 * MiB
PATTERN_LEN = 4 * MiB

# The guest's side, chosen by words on its kernel command line (xl's `extra`):
# blkname=NAME, blkmode=short|long.
GUEST_SCRIPT = r"""#!/bin/busybox sh
DEV=${1:-/dev/xvda}
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
NAME=$(arg blkname) MODE=$(arg blkmode)
FAILED=0
ok() { echo "DOMU-RESULT ok $*"; }
bad() { echo "DOMU-RESULT FAIL $*"; FAILED=1; }
md5() { md5sum | cut -c1-32; }
echo "DOMU: $NAME mode $MODE max_segments=$(cat /sys/block/xvda/queue/max_segments)" \
  "order=$(cat /sys/module/xen_blkfront/parameters/max_ring_page_order)"
i=0
while [ $i -lt 2048 ]; do
  printf '%-511s\n' "blktap guest=$NAME sector=$i"; i=$((i + 1))
done > /tmp/mib
if [ "$MODE" = long ]; then
  # Writes until the domain is destroyed under it.
  n=0
  while true; do
    dd if=/tmp/mib of=$DEV bs=1048576 seek=$((8 + n % 4)) count=1 conv=notrunc,fsync \
      2>/dev/null
    n=$((n + 1)); echo "DOMU-LONG $n"
  done
fi
cat /tmp/mib /tmp/mib /tmp/mib /tmp/mib > /tmp/pat
want=$(md5 < /tmp/pat)
dd if=/tmp/pat of=$DEV bs=1048576 seek=8 count=4 conv=notrunc,fsync 2>/dev/null || bad "write"
sync
echo 3 > /proc/sys/vm/drop_caches
got=$(dd if=$DEV bs=1048576 skip=8 count=4 2>/dev/null | md5)
[ "$got" = "$want" ] && ok "$NAME read back md5=$got" || bad "$NAME read back $got != $want"
exit $FAILED
"""

# dom0's side (bash, set -e: the first failing step ends the run early, which fails it).
LIFECYCLE_CMD = PREP + r"""
R=$TESTBED_OUT/lifecycle.txt
say() { echo "LIFE $*" | tee -a $R; }
python3 -m blktap.cli.tapback -d -v -n vbd > $TESTBED_OUT/tapback.log 2>&1 &
mkdir -p /run/xtb-map
declare -A TID MINOR
for g in a b c; do
  vhd-util create -n $TESTBED_OUT/$g.vhd -s 64
  tap-ctl create -a vhd:$TESTBED_OUT/$g.vhd >/dev/null
  set -- $(tap-ctl list | grep "/$g.vhd")
  TID[$g]=${1#pid=} MINOR[$g]=${2#minor=}
  echo /run/blktap-control/nbd${TID[$g]}.${MINOR[$g]} > /run/xtb-map/$g.vhd
done
say "tapdisks: $(tap-ctl list | tr '\n' ';')"
cat > /etc/xen/scripts/block-userspace <<'HOTPLUG'
#!/bin/sh
[ "$1" = add ] || exit 0
params=$(xenstore-read "$XENBUS_PATH/params")
xenstore-write "$XENBUS_PATH/physical-device-path" "$(cat /run/xtb-map/${params##*/})" \
  "$XENBUS_PATH/hotplug-status" connected
HOTPLUG
chmod 755 /etc/xen/scripts/block-userspace
# The testbed's guest initrd, and the same with an /init that asks blkfront for order 4.
cat /mnt/xfer/domu-initrd.gz /opt/payload/order4-init.cpio.gz > /tmp/domu-order4.gz
guest() {  # NAME IMAGE MODE [INITRD]
  local disk="format=raw, vdev=xvda, access=rw, backendtype=phy, script=block-userspace"
  local extra="console=hvc0 rdinit=/init loglevel=4 blkname=$1 blkmode=$3"
  xl create $DOMU_CFG "name=\"xtb-$1\"" "disk=[\"$disk, target=$TESTBED_OUT/$2.vhd\"]" \
    "extra=\"$extra\"" ${4:+"ramdisk=\"$4\""} > $TESTBED_OUT/xl-create-$1.log 2>&1
  say "xl create xtb-$1 on $2.vhd ($3): rc $?"
}
wait_gone() {  # NAME...: until every one has powered off (at most 900 s)
  local i=0
  while [ $i -lt 450 ]; do
    local left=0
    for n in "$@"; do xl domid xtb-$n >/dev/null 2>&1 && left=1; done
    [ $left = 0 ] && return 0
    if [ $((i % 15)) = 14 ]; then  # what the guests are doing, on the serial log
      for n in "$@"; do
        tail -n 3 /var/log/xen/console/guest-xtb-$n.log 2>/dev/null | sed "s/^/[xtb-$n] /"
      done
    fi
    sleep 2; i=$((i + 1))
  done
  say "still running after 900 s: $*"; return 1
}
verdict() {
  local v
  v=$(grep -a 'DOMU-VERDICT' /var/log/xen/console/guest-xtb-$1.log 2>/dev/null | tail -1)
  v=$(echo "$v" | tr -d '\r')
  say "guest $1: ${v:-no verdict}"
}
c_writes() {  # the ring's write count in c's tapdisk
  tap-ctl stats -p ${TID[c]} -m ${MINOR[c]} |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["xenblkif"]["writes"])'
}
ring_state() {  # DOMID: the backend state of its vbd, or nothing
  xenstore-read /local/domain/0/backend/vbd/$1/51712/state 2>/dev/null || true
}

# 1. two guests at once (a with the order-4 initrd)
guest a a short /tmp/domu-order4.gz
guest b b short
wait_gone a b
verdict a; verdict b

# 2. xl destroy in flight, then a new guest on the same tapdisk and image
guest c c long
domid=$(xl domid xtb-c)
i=0
until [ "$(ring_state $domid)" = 4 ] || [ $i -ge 300 ]; do sleep 1; i=$((i + 1)); done
say "c connected: state $(ring_state $domid)"
i=0 w=0
while [ $i -lt 300 ]; do
  # (a stats request can time out in the loaded TCG dom0: then ask again)
  w=$(c_writes 2>/dev/null || echo 0)
  [ "${w:-0}" -gt 20 ] && break
  sleep 1; i=$((i + 1))
done
say "c writing: $w ring writes"
xl destroy xtb-c
say "xl destroy xtb-c: rc $?"
i=0
while xenstore-read /local/domain/0/backend/vbd/$domid >/dev/null 2>&1 && [ $i -lt 120 ]; do
  sleep 1; i=$((i + 1))
done
left=gone
xenstore-read /local/domain/0/backend/vbd/$domid >/dev/null 2>&1 && left=left
say "c backend dir: $left"
kill -0 ${TID[c]} && say "c tapdisk alive: $(tap-ctl list | grep /c.vhd)"
for t in 1 2 3; do
  tap-ctl stats -p ${TID[c]} -m ${MINOR[c]} > $TESTBED_OUT/c-stats-after-destroy.json && break
  sleep 2
done
ring=$(python3 -c 'import json, sys; print("xenblkif" in json.load(sys.stdin))' \
  < $TESTBED_OUT/c-stats-after-destroy.json)
say "c ring after destroy: $ring"
tap-ctl pause -p ${TID[c]} -m ${MINOR[c]}
vhd-util check -n $TESTBED_OUT/c.vhd && say "c.vhd check: ok"
tap-ctl unpause -p ${TID[c]} -m ${MINOR[c]}
guest d c short
wait_gone d
verdict d

say "tapback: $(grep -c 'connected: order' $TESTBED_OUT/tapback.log) rings connected"
cp /var/log/xen/console/guest-xtb-*.log $TESTBED_OUT/ 2>/dev/null || true
for g in a b c; do tap-ctl destroy -p ${TID[$g]} -m ${MINOR[$g]}; done
say "done"
touch $BACKEND_READY_FILE
sleep 60
"""


def test_two_guests_then_xl_destroy_in_flight_then_a_new_guest(testbed, payload,  # noqa: F811
                                                               tmp_path):
    ours = tmp_path / "payload"
    shutil.copytree(payload, ours)
    order4_init(ours / "order4-init.cpio.gz", tmp_path / "initrd")
    out = tmp_path / "run"
    script = tmp_path / "guest.sh"
    script.write_text(GUEST_SCRIPT)
    img = tmp_path / "unused.img"
    with open(img, "wb") as f:
        f.truncate(2 * MiB)
    rc, text = run_testbed(testbed, out, "none", payload=ours, backend="set -e\n" +
                           LIFECYCLE_CMD, guest=script, image=img, backend_wait=1500,
                           retry=False)  # one run tells (its logs kept for a failure)
    life = out / "out" / "lifecycle.txt"
    report = life.read_text() if life.exists() else "(no lifecycle.txt)"
    assert rc == 0, report + explain(out, text)
    check_lifecycle(out)


def check_lifecycle(out: Path) -> None:
    """What the run's dom0 said and left, judged on the host."""
    report = (out / "out" / "lifecycle.txt").read_text()
    lines = report.splitlines()

    def said(pattern: str) -> str:
        hit = next((ln for ln in lines if re.search(pattern, ln)), None)
        assert hit is not None, f"{pattern!r} not in:\n{report}"
        return hit

    for g in "abd":
        said(rf"^LIFE guest {g}: DOMU-VERDICT ok$")
    said(r"^LIFE c connected: state 4$")
    assert int(re.search(r"c writing: (\d+)", said("c writing")).group(1)) > 20, report
    said(r"^LIFE xl destroy xtb-c: rc 0$")
    said(r"^LIFE c backend dir: gone$")
    said(r"^LIFE c tapdisk alive: ")
    said(r"^LIFE c ring after destroy: False$")  # the VBD is back to no ring
    said(r"^LIFE c.vhd check: ok$")
    tapback = (out / "out" / "tapback.log").read_text(errors="replace")
    orders = re.findall(r"(\d+)/51712: connected: order (\d+)", tapback)
    assert len(orders) == 4, tapback[-3000:]
    # guest a (the first domain) took the largest ring we offer; the others blkfront's 0
    assert orders[0] == ("1", "4") and all(o == "0" for _, o in orders[1:]), orders

    vhd_util = shutil.which("vhd-util", path=os.path.dirname(os.sys.executable)) or "vhd-util"
    for g in "abc":
        r = subprocess.run([vhd_util, "check", "-n", str(out / "out" / f"{g}.vhd")],
                           capture_output=True, text=True)
        assert r.returncode == 0, (g, r.stdout, r.stderr)
    for g, writer in (("a", "a"), ("b", "b"), ("c", "d")):
        assert read_pattern(out / "out" / f"{g}.vhd") == pattern(writer), g


def order4_init(dest: Path, work: Path) -> None:
    """A gzipped cpio archive holding the testbed's guest /init with xen-blkfront loaded
    as ``max_ring_page_order=4``; appended to the guest's initrd, it replaces /init (the
    kernel unpacks concatenated archives in order)."""
    init = (SHARED / "xen-testbed" / "files" / "domU-init").read_text()
    load = "insmod /lib/modules/xen-blkfront.ko\n"
    assert init.count(load) == 1, "the testbed's domU-init changed"
    work.mkdir()
    (work / "init").write_text(init.replace(load, load[:-1] + " max_ring_page_order=4\n"))
    (work / "init").chmod(0o755)
    with open(dest, "wb") as f:
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], input=b"init\n",
                              cwd=work, capture_output=True, check=True)
        f.write(gzip.compress(cpio.stdout))


def pattern(name: str) -> bytes:
    mib = b"".join(f"blktap guest={name} sector={i}".ljust(511).encode() + b"\n"
                   for i in range(2048))
    return mib * 4


def read_pattern(vhd: Path) -> bytes:
    from blktap.image import Chain

    with Chain.open(f"vhd:{vhd}") as disk:
        return disk.pread(PATTERN_AT, PATTERN_LEN)
