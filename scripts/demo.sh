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
with Chain.open(f"{folder}/leaf.vhd", writable=True) as disk:
    disk.pwrite(4096, b"leaf layer ".ljust(8 << 10, b"."))
    disk.pwrite(12 << 20, b"L" * (1 << 20))
PY

echo "== blktap info $dir/leaf.vhd"
"$bin/blktap" info "$dir/leaf.vhd"
echo
echo "== blktap map $dir/leaf.vhd"
"$bin/blktap" map "$dir/leaf.vhd"
echo
echo "== vhd-util scan -p -m '$dir/*.vhd'"
"$bin/vhd-util" scan -p -m "$dir/*.vhd"
echo
echo "== vhd-util check -p -n $dir/leaf.vhd"
"$bin/vhd-util" check -p -n "$dir/leaf.vhd"
