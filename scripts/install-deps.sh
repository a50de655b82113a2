#!/usr/bin/env bash
# Install the Debian packages blktap's tests and tools use, only those that are missing.
# Real peers for the tests: qemu-img/qemu-io/qemu-nbd, libnbd's tools and bindings, fio, nbdkit;
# openssl makes the certificates of the nbd driver's TLS tests.
# For bench/run.py: qemu-storage-daemon (in qemu-system-common on Debian 12) and nbdkit's
# Python plugin. For the vhost-user guest tests (shared/guest-testbed): QEMU itself, and what
# its build.sh needs to make the tiny guest (static busybox, gcc for blkbench, cpio, kmod and
# a kernel with its modules when /boot has none). For the Xen guest tests: what
# ../shared/xen-testbed/build.sh needs on the host (it would install them itself, but only
# when run as root). For the rbd driver and its tests (tests/ceph_cluster.py): a throwaway
# Ceph (monitor, OSD, the ceph/rbd tools), Debian's librbd/librados Python bindings, and
# qemu's rbd block driver (qemu-block-extra) as the peer. gcc and Python's headers
# (python3-dev) build the NBD transport's compiled inline path at pip install.
# when run as root). For docs/operations.md's tests: groff and man (the man pages render),
# systemd's systemd-analyze (the units verify; the package starts nothing in a container).
set -euo pipefail

packages=(qemu-utils libnbd-bin python3-libnbd fio nbdkit python3-venv fuse3
          qemu-system-common nbdkit-plugin-python strace
          qemu-system-x86 busybox-static gcc libc6-dev python3-dev cpio kmod xz-utils zstd
          debootstrap e2fsprogs gzip openssl groff-base man-db systemd
          ceph-mon ceph-osd ceph-common python3-rbd python3-rados qemu-block-extra)
ls /boot/vmlinuz-* >/dev/null 2>&1 || packages+=(linux-image-amd64)
missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing Debian packages: ${missing[*]}"
sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then
        sudo=(sudo)
    else
        echo "error: need root (or sudo) to install: ${missing[*]}" >&2
        exit 1
    fi
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
