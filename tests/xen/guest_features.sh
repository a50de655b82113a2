#!/bin/busybox sh
# domU script for the Xen testbed (--guest-script): what blkfront negotiated with our
# backend, and the operations behind it. $1 = the disk. Exit 0 = every check passed.
#  - the queue: write cache "write back" (feature-flush-cache), max_segments > 11
#    (indirect descriptors), discard_max_bytes > 0 (feature-discard);
#  - 1 MiB writes through the page cache + fsync (indirect requests, flushes), read back
#    after dropping the caches;
#  - blkdiscard of a range, which must then read as zeros (the aio driver punches a hole);
#  - the first MiB, only read, keeps its md5.
DEV=${1:-/dev/xvda}
Q=/sys/block/${DEV##*/}/queue
FAILED=0
ok() { echo "DOMU-RESULT ok $*"; }
bad() { echo "DOMU-RESULT FAIL $*"; FAILED=1; }
md5() { md5sum | cut -c1-32; }

for f in write_cache max_segments max_hw_sectors_kb discard_max_bytes discard_granularity \
         logical_block_size nr_requests; do
  echo "DOMU-QUEUE $f=$(cat $Q/$f 2>/dev/null)"
done
[ "$(cat $Q/write_cache)" = "write back" ] && ok "write_cache write back" \
  || bad "write_cache: $(cat $Q/write_cache)"
[ "$(cat $Q/max_segments)" -gt 11 ] && ok "max_segments $(cat $Q/max_segments)" \
  || bad "max_segments $(cat $Q/max_segments)"
[ "$(cat $Q/discard_max_bytes)" -gt 0 ] && ok "discard_max_bytes $(cat $Q/discard_max_bytes)" \
  || bad "no discard"

head=$(dd if=$DEV bs=4096 count=256 2>/dev/null | md5)

# 4 MiB of a pattern at 2 MiB (one MiB of numbered sectors, four times: a shell loop is
# slow under TCG), in 1 MiB writes, each fsynced.
i=0
while [ $i -lt 2048 ]; do printf '%-511s\n' "features run=$RUN_ID sector=$i"; i=$((i + 1)); done > /tmp/mib
cat /tmp/mib /tmp/mib /tmp/mib /tmp/mib > /tmp/pat
want=$(md5 < /tmp/pat)
dd if=/tmp/pat of=$DEV bs=1048576 seek=2 count=4 conv=notrunc,fsync 2>/dev/null || bad "write 4 MiB"
sync
echo 3 > /proc/sys/vm/drop_caches
got=$(dd if=$DEV bs=1048576 skip=2 count=4 2>/dev/null | md5)
[ "$got" = "$want" ] && ok "1MiB-writes-readback md5=$got" || bad "readback md5=$got expected=$want"

# Discard the second MiB of the pattern; it must read as zeros, the rest stay.
if blkdiscard -o 3145728 -l 1048576 $DEV; then
  echo 3 > /proc/sys/vm/drop_caches
  z=$(dd if=/dev/zero bs=1048576 count=1 2>/dev/null | md5)
  got=$(dd if=$DEV bs=1048576 skip=3 count=1 2>/dev/null | md5)
  [ "$got" = "$z" ] && ok "discard reads zeros" || bad "discarded MiB md5=$got"
  got=$(dd if=$DEV bs=1048576 skip=2 count=1 2>/dev/null | md5)
  exp=$(dd if=/tmp/pat bs=1048576 count=1 2>/dev/null | md5)
  [ "$got" = "$exp" ] && ok "before the discard: kept" || bad "MiB before the discard changed"
else
  bad "blkdiscard failed"
fi
got=$(dd if=$DEV bs=4096 count=256 2>/dev/null | md5)
[ "$got" = "$head" ] && ok "head unchanged" || bad "head changed"
exit $FAILED
