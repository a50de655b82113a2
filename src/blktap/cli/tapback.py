"""``tapback``: the XenStore side of the user-space Xen block backend (drop-in).

Accepts the reference's flags: ``-d/--debug`` (stay in the foreground, log to stderr),
``-v/--verbose`` (debug logging), ``-n/--name NAME`` (backend type, default ``vbd3``),
``-x/--domain DOMID`` (serve one domain only), ``-b/--nobarrier`` (do not offer
``feature-barrier``), ``-p/--pidfile PATH``. Ours in addition: what we offer guests
(``--max-ring-page-order``, ``--max-indirect-segments``, ``--no-flush``, ``--no-discard``,
``--no-persistent-grants``), ``--xenstore PATH`` (else ``$XENSTORED_PATH``, else the
xenstored socket, else /dev/xen/xenbus), ``--ready-file PATH`` (touched once XenStore is
watched) and ``--no-hotplug-wait``.

Without ``-d`` it daemonizes once the watch is in place (the command exits 0 then) and logs
to syslog. SIGTERM/SIGINT end it with status 0, leaving every ring served by its tapdisk.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import logging.handlers
import os
import signal
import sys
from collections.abc import Sequence

from blktap.cli.common import version_line
from blktap.cli.daemonize import detach_until_ready, say_ready
from blktap.cli.logsetup import add_log_options, configure
from blktap.cli.service import sd_notify
from blktap.control import message as m
from blktap.errors import BlktapError

PROG = "tapback"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Serve Xen guests' block devices "
                                "from tapdisks: the XenStore half of the backend.")
    p.add_argument("--version", action="version", version=version_line(p.prog))
    p.add_argument("-d", "--debug", action="store_true",
                   help="stay in the foreground and log to stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.add_argument("-n", "--name", default="vbd3",
                   help="backend type to serve (default vbd3; xl's phy backend is vbd)")
    p.add_argument("-x", "--domain", type=int, metavar="DOMID",
                   help="serve this frontend domain only")
    p.add_argument("-b", "--nobarrier", action="store_true",
                   help="do not offer feature-barrier")
    p.add_argument("-p", "--pidfile", help="write our pid here")
    p.add_argument("--xenstore", metavar="PATH",
                   help="xenstored's socket or /dev/xen/xenbus (default: $XENSTORED_PATH, "
                        "else /run/xenstored/socket if present, else /dev/xen/xenbus)")
    p.add_argument("--max-ring-page-order", type=int, default=m.MAX_RING_ORDER,
                   choices=range(0, m.MAX_RING_ORDER + 1), metavar="N",
                   help=f"largest ring offered, 2^N pages (0..{m.MAX_RING_ORDER}; default "
                        f"{m.MAX_RING_ORDER}, lowered to {m.REFERENCE_RING_ORDER} for a tapdisk "
                        f"that does not take more, as the reference's)")
    p.add_argument("--max-indirect-segments", type=int, default=256, metavar="N",
                   help="feature-max-indirect-segments offered (0: none; default 256)")
    p.add_argument("--no-flush", action="store_true", help="do not offer feature-flush-cache")
    p.add_argument("--no-discard", action="store_true", help="do not offer feature-discard")
    grants = p.add_mutually_exclusive_group()
    grants.add_argument("--no-persistent-grants", dest="persistent_grants",
                        action="store_false", default=True,
                        help="do not offer feature-persistent: the ring copies each "
                             "request's data by grant copy (by default persistent grants "
                             "are offered to a tapdisk whose ring maps them, as ours)")
    grants.add_argument("--persistent-grants", dest="persistent_grants", action="store_true",
                        help=argparse.SUPPRESS)  # the default; kept for older command lines
    p.add_argument("--no-hotplug-wait", action="store_true",
                   help="connect without waiting for hotplug-status=connected")
    p.add_argument("--ready-file", metavar="PATH",
                   help="touch PATH once XenStore is watched")
    add_log_options(p, level_help="info, debug with -v", target_help="syslog, or stderr with -d")
    return p


def _options(args: argparse.Namespace):  # -> Options (imported lazily with the daemon)
    from blktap.tapback.vbd import Options

    if not 0 <= args.max_indirect_segments <= 4096:
        raise BlktapError("--max-indirect-segments: 0..4096", 22)
    return Options(max_ring_page_order=args.max_ring_page_order, barrier=not args.nobarrier,
                   flush=not args.no_flush, discard=not args.no_discard,
                   max_indirect_segments=args.max_indirect_segments,
                   persistent_grants=args.persistent_grants,
                   require_hotplug=not args.no_hotplug_wait)


def _setup_logging(args: argparse.Namespace) -> None:
    if args.log or args.log_level:
        target = args.log or ("stderr" if args.debug or not os.path.exists("/dev/log")
                              else "syslog")
        configure(PROG, args.log_level or ("debug" if args.verbose else "info"), target)
        return
    root = logging.getLogger("blktap")
    root.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.debug:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("tapback: %(message)s"))
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log",
                                                 logging.handlers.SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter(f"{PROG}[{os.getpid()}]: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("tapback: %(message)s"))
    root.addHandler(handler)


async def _main(args: argparse.Namespace, ready_fd: int | None) -> int:
    from blktap.tapback.daemon import Tapback
    from blktap.tapback.link import ControlLink
    from blktap.tapback.xenstore import XenStore

    options = _options(args)
    xs = await XenStore.open(args.xenstore)
    try:
        tb = Tapback(xs, ControlLink(), options, args.name, args.domain)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, tb.stop)
        await tb.start()
        if args.pidfile:
            with open(args.pidfile, "w") as f:
                f.write(f"{os.getpid()}\n")
        if args.ready_file:
            with open(args.ready_file, "a"):
                pass
        if ready_fd is not None:
            say_ready(ready_fd)
        sd_notify(f"READY=1\nMAINPID={os.getpid()}")  # tapback.service: Type=notify
        await tb.run()
    finally:
        await xs.close()
        if args.pidfile:
            try:
                os.unlink(args.pidfile)
            except OSError:
                pass
    logging.getLogger("blktap.tapback").info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ready_fd = None if args.debug else detach_until_ready()
    try:
        _setup_logging(args)
    except BlktapError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.errno or 22
    try:
        return asyncio.run(_main(args, ready_fd))
    except (BlktapError, OSError) as exc:
        logging.getLogger("blktap.tapback").error("%s", exc)
        print(f"{PROG}: {exc}", file=sys.stderr)
        return getattr(exc, "errno", None) or 5
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
