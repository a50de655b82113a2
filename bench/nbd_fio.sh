#!/usr/bin/env bash
# fio over NBD: blktap serve against qemu-nbd, same tmpfs file, same run.
#   bench/nbd_fio.sh [SIZE_MB] [SECONDS]
# Prints IOPS and MiB/s for 4 KiB random reads at QD32 and 1 MiB sequential reads at QD8.
set -euo pipefail
cd "$(dirname "$0")/.."
size_mb=${1:-1024}
secs=${2:-10}
dir=$(mktemp -d /dev/shm/blktap-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
img="$dir/disk.raw"
dd if=/dev/urandom of="$img" bs=1M count="$size_mb" status=none

.venv/bin/blktap serve "aio:$img" --socket "$dir/blktap.sock" > "$dir/uri" &
qemu-nbd -t -e 64 -f raw -k "$dir/qemu.sock" "$img" &
for _ in $(seq 100); do [ -S "$dir/qemu.sock" ] && [ -s "$dir/uri" ] && break; sleep 0.1; done

job() {  # name uri rw bs qd
    fio --name="$1" --ioengine=nbd --uri="$2" --rw="$3" --bs="$4" --iodepth="$5" \
        --size="${size_mb}M" --time_based --runtime="$secs" --output-format=json 2>/dev/null |
        python3 -c 'import json,sys; t=sys.stdin.read(); r=json.loads(t[t.index("{"):])["jobs"][0]["read"]
print("%10.0f IOPS %9.1f MiB/s" % (r["iops"], r["bw_bytes"] / 2**20))'
}
printf '%-28s %-10s %s\n' workload server result
for load in "4k-randread-qd32 randread 4k 32" "1M-seqread-qd8 read 1M 8"; do
    set -- $load
    for server in blktap qemu-nbd; do
        if [ "$server" = blktap ]; then uri=$(cat "$dir/uri"); else
            uri="nbd+unix:///?socket=$dir/qemu.sock"; fi
        printf '%-28s %-10s %s\n' "$1" "$server" "$(job "$1" "$uri" "$2" "$3" "$4")"
    done
done
