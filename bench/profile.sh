#!/usr/bin/env bash
# Profile `blktap serve` under one fio job with py-spy (pip install py-spy into the venv).
#   bench/profile.sh OUT.svg TYPE:IMAGE RW BS QD [blktap serve options...]
#   e.g. bench/profile.sh /tmp/chain.svg vhd:/dev/shm/leaf.vhd randread 4k 32 --read-only
# Samples the server for 4 s (all threads) while fio runs for 6 s; writes a flame graph.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 5 ] || { sed -n 2,5p "$0" >&2; exit 2; }
out=$1 img=$2 rw=$3 bs=$4 qd=$5
shift 5
dir=$(mktemp -d /dev/shm/blktap-profile.XXXXXX)
trap 'kill "$pid" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
.venv/bin/blktap serve "$img" --socket "$dir/sock" "$@" > "$dir/uri" &
pid=$!
for _ in $(seq 100); do [ -s "$dir/uri" ] && break; sleep 0.1; done
uri=$(head -1 "$dir/uri")
size=$(nbdinfo --size "$uri")
fio --name=profile --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" \
    --size="$size" --time_based --runtime=6 --output-format=terse > "$dir/fio" 2>&1 &
sleep 1
.venv/bin/py-spy record --pid "$pid" --duration 4 --rate 200 --nonblocking --output "$out" ${PYSPY_FORMAT:+--format $PYSPY_FORMAT}
wait %2 || true
