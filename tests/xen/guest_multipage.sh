#!/bin/busybox sh
# domU script for the Xen testbed (--guest-script): reload blkfront asking for an 8-page
# ring (its max_ring_page_order parameter; the backend offers max-ring-page-order 3), so
# that the backend sees the frontend close and start again, then write and read back
# through the multi-page ring. $1 = the disk. Exit 0 = every check passed.
DEV=${1:-/dev/xvda}
FAILED=0
ok() { echo "DOMU-RESULT ok $*"; }
bad() { echo "DOMU-RESULT FAIL $*"; FAILED=1; }
md5() { md5sum | cut -c1-32; }

head=$(dd if=$DEV bs=4096 count=256 2>/dev/null | md5)
rmmod xen_blkfront || { bad "rmmod"; exit 1; }
insmod /lib/modules/xen-blkfront.ko max_ring_page_order=3 || { bad "insmod"; exit 1; }
i=0
while [ ! -b $DEV ] && [ $i -lt 300 ]; do sleep 1; i=$((i + 1)); done
[ -b $DEV ] && ok "reconnected after ${i}s" || { bad "no $DEV after reload"; exit 1; }
echo "DOMU-QUEUE max_ring_page_order=$(cat /sys/module/xen_blkfront/parameters/max_ring_page_order)"
got=$(dd if=$DEV bs=4096 count=256 2>/dev/null | md5)
[ "$got" = "$head" ] && ok "head the same after the reload" || bad "head changed"
i=0
while [ $i -lt 2048 ]; do printf '%-511s\n' "multipage run=$RUN_ID sector=$i"; i=$((i + 1)); done > /tmp/mib
want=$(md5 < /tmp/mib)
dd if=/tmp/mib of=$DEV bs=65536 seek=32 conv=notrunc,fsync 2>/dev/null || bad "write"
echo 3 > /proc/sys/vm/drop_caches
got=$(dd if=$DEV bs=65536 skip=32 count=16 2>/dev/null | md5)
[ "$got" = "$want" ] && ok "readback md5=$got" || bad "readback md5=$got expected=$want"
exit $FAILED
