"""``blktap rated``: serve one rate group to the valves of several disks.

    blktap rated NAME|SOCKET --rate BYTES/s [--cap BYTES] [--type token|leaky]

In the spirit of the reference's td-rated (its ``token`` and ``leaky`` buckets, its
``--rate``/``--cap`` options, its sockets in /var/run/blktap/ratelimit/<name>): the group's
socket is ``$BLKTAP_RATELIMIT_DIR/NAME`` (default /run/blktap/ratelimit) or the absolute
path given. Disks join with ``valve:group=NAME:TYPE:PATH`` (docs/filters.md) and share
``--rate`` in fair shares of what they wait for; ``--cap`` is how much credit may pile up
while nobody waits (default a tenth of a second of the rate; ``leaky`` keeps none).
Prints the socket path once it accepts members, serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any, TextIO

from blktap.errors import UsageError
from blktap.tapdisk.ratelimit import BURST_SECONDS, group_socket, parse_size


def add_parser(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    cmd = command(sub, "rated", run_args,
                  "Serve a rate group shared by several disks (their valve filters).")
    cmd.add_argument("group", metavar="NAME|SOCKET",
                     help="the group's name (a socket in $BLKTAP_RATELIMIT_DIR, default "
                     "/run/blktap/ratelimit) or an absolute socket path")
    cmd.add_argument("--rate", metavar="BYTES", required=True,
                     help="bytes per second the group shares, e.g. 50M")
    cmd.add_argument("--cap", metavar="BYTES",
                     help="credit kept while nobody waits (default: 0.1 s of the rate)")
    cmd.add_argument("--type", choices=("token", "leaky"), default="token",
                     help="token bucket (default) or leaky bucket (no credit kept)")
    cmd.add_argument("-v", "--verbose", action="store_true", help="log members")


def run_args(args: argparse.Namespace, out: TextIO | None = None) -> int:
    rate = parse_size(args.rate, "--rate")
    if rate <= 0:
        raise UsageError("--rate must be more than 0")
    if args.type == "leaky":
        if args.cap is not None and parse_size(args.cap, "--cap"):
            raise UsageError("a leaky bucket keeps no credit: no --cap")
        cap = 0
    else:
        cap = (parse_size(args.cap, "--cap") if args.cap is not None
               else int(rate * BURST_SECONDS))
    path = group_socket(args.group)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="blktap rated: %(message)s", stream=sys.stderr)
    return asyncio.run(_serve(path, rate, cap, out or sys.stdout))


async def _serve(path: str, rate: int, cap: int, out: TextIO) -> int:
    from blktap.rated.server import RatedServer

    server = RatedServer(rate, cap)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    try:
        await server.start(path)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(path, file=out)
        out.flush()
        await stop.wait()
    finally:
        await server.stop()
    return 0


__all__ = ["add_parser", "run_args"]
