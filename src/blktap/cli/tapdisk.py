"""``tapdisk``: the daemon entry point.

    tapdisk [-D] [--run-dir DIR] [--open TYPE:PATH]... [--read-only] [--timeout S]

Prints the control socket path on stdout (as the reference does, for ``tap-ctl
spawn``), then one line per VBD opened with ``--open`` (minors 0, 1, ...): ``MINOR
NBD-SOCKET``. Runs in the foreground (``-D`` is accepted for compatibility) until its
last VBD is closed or it gets SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from blktap.errors import BlktapError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tapdisk", description="Serve virtual disks.")
    ap.add_argument("-D", dest="foreground", action="store_true",
                    help="do not daemonize (tapdisk always runs in the foreground here)")
    ap.add_argument("--run-dir", default=os.environ.get("BLKTAP_RUN_DIR",
                                                        "/run/blktap-control"),
                    help="where control and NBD sockets go (default /run/blktap-control)")
    ap.add_argument("--open", metavar="TYPE:PATH", action="append", default=[],
                    help="open a VBD at start (minor 0, 1, ... in order)")
    ap.add_argument("--read-only", action="store_true", help="open the VBDs read-only")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="request timeout in seconds (default 120)")
    ap.add_argument("--no-direct", dest="direct", action="store_false",
                    help="never use O_DIRECT")
    return ap


async def _main(args: argparse.Namespace) -> int:
    from blktap.tapdisk.daemon import Tapdisk

    td = Tapdisk(args.run_dir)
    try:
        print(td.start_control(), flush=True)
        for minor, spec in enumerate(args.open):
            disk = await td.open_vbd(minor, spec, read_only=args.read_only,
                                     timeout=args.timeout, direct=args.direct)
            print(minor, disk.socket, flush=True)
        await td.run()
    finally:
        await td.shutdown()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="tapdisk: %(message)s")
    try:
        return asyncio.run(_main(args))
    except (BlktapError, OSError) as exc:
        code = getattr(exc, "errno", None) or 5
        print(f"tapdisk: {exc}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
