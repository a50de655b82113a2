"""``blktap exporter``: Prometheus metrics of every tapdisk on the host.

    blktap exporter [--listen HOST:PORT] [--once] [--run-dir DIR]
                    [--log-level LEVEL] [--log FILE|syslog|stderr]

Each scrape of ``http://HOST:PORT/metrics`` asks every tapdisk of the control directory
(``$BLKTAP_CONTROL_DIR`` or /run/blktap-control, as tap-ctl) for its VBDs and their
``tap-ctl stats``, and answers in the Prometheus text format; a tapdisk that does not
answer shows as ``blktap_tapdisk_up 0``. ``--once`` prints one exposition on stdout and
exits (for node_exporter's textfile collector or a cron job). Listens on loopback unless
told otherwise: the metrics name every image on the host.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

from blktap.cli.logsetup import add_log_options, configure

DEFAULT_LISTEN = "127.0.0.1:9797"


def add_parser(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    cmd = command(sub, "exporter", run_args,
                  "Serve Prometheus metrics of every tapdisk on this host (tap-ctl stats).")
    cmd.add_argument("--listen", metavar="HOST:PORT", default=DEFAULT_LISTEN,
                     help=f"where to serve /metrics (default {DEFAULT_LISTEN}; port 0 "
                          "picks one, printed on stdout)")
    cmd.add_argument("--once", action="store_true",
                     help="print the metrics once on stdout and exit")
    cmd.add_argument("--run-dir", metavar="DIR",
                     help="the tapdisks' control directory (default $BLKTAP_CONTROL_DIR "
                          "or /run/blktap-control)")
    add_log_options(cmd, level="warning")


def _scrape(run_dir: str | None) -> str:
    from blktap.control.client import TapCtl
    from blktap.control.rundir import RunDir
    from blktap.metrics.collect import scrape_host

    return scrape_host(TapCtl(RunDir(run_dir)) if run_dir else TapCtl())


def run_args(args: argparse.Namespace) -> int:
    configure("blktap exporter", args.log_level, args.log or "stderr")
    if args.once:
        sys.stdout.write(_scrape(args.run_dir))
        return 0
    return asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    from blktap.cli.service import sd_notify
    from blktap.metrics.http import MetricsServer, parse_listen

    async def collect() -> str:
        return await asyncio.to_thread(_scrape, args.run_dir)

    server = MetricsServer(collect)
    host, port = await server.listen(*parse_listen(args.listen))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"
    print(url, flush=True)
    logging.getLogger("blktap.metrics").info("exporting on %s", url)
    sd_notify(f"READY=1\nSTATUS=exporting on {url}")
    try:
        await stop.wait()
    finally:
        sd_notify("STOPPING=1")
        await server.stop()
    return 0


__all__ = ["add_parser", "run_args"]
