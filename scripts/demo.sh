#!/usr/bin/env bash
# `make run`: make a small VHD chain in ./demo (a base with data, a snapshot written over
# it) and show it with the blktap and vhd-util commands.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
dir=demo
rm -rf "$dir"
mkdir -p "$dir"

"$bin/vhd-util" create -n "$dir/base.vhd" -s 64
"$bin/python" - "$dir" <<'PY'
import sys
from blktap.image import Chain
from blktap.image.vhd import snapshot

folder = sys.argv[1]
with Chain.open(f"{folder}/base.vhd", writable=True) as disk:
    disk.pwrite(0, b"base layer ".ljust(64 << 10, b"."))
    disk.pwrite(10 << 20, b"B" * (3 << 20))
snapshot(f"{folder}/leaf.vhd", f"{folder}/base.vhd")
with Chain.open(f"vhd:{folder}/leaf.vhd", writable=True) as disk:
    disk.pwrite(4096, b"leaf layer ".ljust(8 << 10, b"."))
    disk.pwrite(12 << 20, b"L" * (1 << 20))
PY

echo "== blktap info vhd:$dir/leaf.vhd"
"$bin/blktap" info "vhd:$dir/leaf.vhd"
echo
echo "== blktap map vhd:$dir/leaf.vhd"
"$bin/blktap" map "vhd:$dir/leaf.vhd"
echo
echo "== vhd-util scan -p -m '$dir/*.vhd'"
"$bin/vhd-util" scan -p -m "$dir/*.vhd"
echo
echo "== vhd-util check -p -n $dir/leaf.vhd"
"$bin/vhd-util" check -p -n "$dir/leaf.vhd"

# Serve the chain over NBD, as tapdisk would, and show how to reach it.
sock="$PWD/$dir/nbd.sock"
uri="nbd+unix:///?socket=$sock"
echo
echo "== blktap serve vhd:$dir/leaf.vhd --socket $sock"
"$bin/blktap" serve "vhd:$dir/leaf.vhd" --socket "$sock" > "$dir/serve.uri" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -s "$dir/serve.uri" ] && break; sleep 0.1; done
echo "serving at $(cat "$dir/serve.uri")"
if command -v nbdinfo >/dev/null; then
    echo
    echo "== nbdinfo --map '$uri'"
    nbdinfo --map "$uri"
fi
if command -v qemu-img >/dev/null; then
    echo
    echo "== qemu-img map --output=json '$uri'"
    qemu-img map --output=json "$uri"
fi

# The main job, where QEMU and the guest testbed are here: a KVM guest's disk served by a
# tapdisk (vhost-user-blk), a live snapshot taken while the guest writes.
testbed=../shared/guest-testbed
if [ -z "${DEMO_NO_GUEST:-}" ] && command -v qemu-system-x86_64 >/dev/null \
        && [ -x "$testbed/boot.sh" ]; then
    gdir="$PWD/$dir/guest"
    mkdir -p "$gdir/run" "$gdir/log"
    export GUEST_TESTBED_DIR=${GUEST_TESTBED_DIR:-/var/tmp/blktap-guest-testbed}
    echo
    echo "== a Linux guest on a VHD chain served by tapdisk over vhost-user-blk"
    if bash "$testbed/build.sh" > "$gdir/build.log" 2>&1; then
        "$bin/vhd-util" create -n "$gdir/base.vhd" -s 128
        "$bin/vhd-util" snapshot -n "$gdir/leaf.vhd" -p "$gdir/base.vhd"
        export BLKTAP_CONTROL_DIR="$gdir/run" BLKTAP_LOG_DIR="$gdir/log" BLKTAP_VHOST_USER=1
        "$bin/tap-ctl" create -a "vhd:$gdir/leaf.vhd"
        line=$("$bin/tap-ctl" list | head -1)
        echo "$line"
        pid=$(sed -n 's/.*pid=\([0-9]*\).*/\1/p' <<<"$line")
        minor=$(sed -n 's/.*minor=\([0-9]*\).*/\1/p' <<<"$line")
        vsock="$gdir/run/vhost$pid.$minor"
        echo "== boot.sh --mode verify,fs vhost $vsock   (QEMU, TCG: about 10 s)"
        bash "$testbed/boot.sh" --mode verify,fs --log "$gdir/boot.log" vhost "$vsock" \
            > "$gdir/boot.out" 2>&1 &
        guest=$!
        # Once the guest has its disk and writes, snapshot the chain under it.
        for _ in $(seq 600); do
            grep -q "RESULT verify" "$gdir/boot.log" 2>/dev/null && break
            kill -0 $guest 2>/dev/null || break
            sleep 0.1
        done
        echo "== live snapshot while the guest writes its file system:"
        echo "   tap-ctl pause; vhd-util snapshot; tap-ctl unpause -a the new leaf"
        "$bin/tap-ctl" pause -p "$pid" -m "$minor"
        "$bin/vhd-util" snapshot -n "$gdir/snap.vhd" -p "$gdir/leaf.vhd"
        "$bin/tap-ctl" unpause -p "$pid" -m "$minor" -a "vhd:$gdir/snap.vhd"
        wait $guest && status=0 || status=$?
        grep -E "GUEST_VDA_READY|RESULT|GUEST-TESTBED" "$gdir/boot.out" | sed 's/^/   /'
        "$bin/tap-ctl" list
        "$bin/tap-ctl" destroy -p "$pid" -m "$minor"
        echo "== the chain the guest wrote: vhd-util check -p, blktap info"
        "$bin/vhd-util" check -p -n "$gdir/snap.vhd"
        "$bin/blktap" info "vhd:$gdir/snap.vhd"
        [ "$status" = 0 ] || echo "(the guest run failed: $gdir/boot.out)"
    else
        echo "(the guest testbed could not be built here: $gdir/build.log)"
    fi
fi

if [ -t 0 ] && [ -z "${DEMO_NO_WAIT:-}" ]; then
    cat <<MSG

The disk is being served until you press Ctrl-C. From another terminal, try:
    nbdinfo '$uri'
    qemu-img info '$uri'
    qemu-io -f raw -c 'read -v 4096 64' '$uri'
    nbdcopy '$uri' $dir/flat.raw
MSG
    wait $server || true
else
    echo
    echo "(not a terminal: stopping the server; run 'make run' in a terminal to keep it up)"
fi
