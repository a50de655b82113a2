"""`blktap attach`, `blktap detach`, `blktap attached`: a disk as /dev/nbdN through a
tapdisk and the kernel's NBD client (docs/attach.md)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from blktap.hostdev import nbd_kernel


def add_parsers(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    cmd = command(sub, "attach", run_attach,
                  "Attach a disk to this host as a block device (/dev/nbdN, printed), "
                  "served by a tapdisk through the kernel's NBD client.")
    cmd.add_argument("image", metavar="TYPE:PATH", help="vhd:PATH, aio:PATH, qcow2:PATH...")
    cmd.add_argument("--read-only", action="store_true", help="a read-only device")
    cmd.add_argument("--timeout", metavar="SECONDS", type=int,
                     default=nbd_kernel.DEFAULT_TIMEOUT,
                     help="the kernel fails a request after this long (default "
                          f"{nbd_kernel.DEFAULT_TIMEOUT})")
    cmd.add_argument("--dead-conn-timeout", metavar="SECONDS", type=int,
                     default=nbd_kernel.DEFAULT_DEAD_CONN_TIMEOUT,
                     help="once the connection dies, I/O waits this long for a reconnect "
                          f"before failing (default {nbd_kernel.DEFAULT_DEAD_CONN_TIMEOUT})")
    cmd = command(sub, "detach", run_detach,
                  "Flush, disconnect and destroy a disk attached with blktap attach.")
    cmd.add_argument("target", metavar="DEV|MINOR", help="/dev/nbdN, nbdN or the tapdisk minor")
    command(sub, "attached", run_attached, "List the disks attached with blktap attach.")


def run_attach(args: argparse.Namespace) -> int:
    from blktap.errors import UsageError
    from blktap.hostdev.attach import attach

    if args.timeout < 1 or args.dead_conn_timeout < 0:
        raise UsageError("--timeout must be at least 1, --dead-conn-timeout at least 0")
    a = attach(args.image, read_only=args.read_only, timeout=args.timeout,
               dead_conn_timeout=args.dead_conn_timeout)
    print(a.device)
    return 0


def run_detach(args: argparse.Namespace) -> int:
    from blktap.hostdev.attach import detach

    detach(args.target)
    return 0


def run_attached(args: argparse.Namespace) -> int:
    from blktap.hostdev.attach import attached

    for a, connected, served in attached():
        print(f"{a.device} pid={a.tid} minor={a.minor} {'ro' if a.read_only else 'rw'} "
              f"{'connected' if connected else 'disconnected'} "
              f"{'served' if served else 'no-tapdisk'} args={a.spec}")
    return 0


__all__ = ["add_parsers"]
