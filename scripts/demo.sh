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
