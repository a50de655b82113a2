"""``--log-level`` and ``--log FILE|syslog|stderr`` for the daemons (``blktap serve``,
``blktap exporter``, ``tapdisk``, ``tapback``).

One line per event: a record's message and any traceback are joined on one line (`` | ``
between lines), so that syslog, journald and ``grep`` see one event as one line. The
events name the minor and the image they are about (the callers write them so).
``syslog`` goes to /dev/log (journald reads it too), facility daemon, tagged
``PROG[PID]``.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import sys

from blktap.errors import UsageError

LEVELS = ("debug", "info", "warning", "error")
SYSLOG_SOCKET = "/dev/log"


class OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " | ".join(line for line in super().format(record).splitlines() if line)


def add_log_options(parser: argparse.ArgumentParser, *, level: str | None = None,
                    level_help: str | None = None, target_help: str = "stderr") -> None:
    parser.add_argument("--log-level", choices=LEVELS, default=level,
                        help=f"least severe level logged (default {level_help or level})")
    parser.add_argument("--log", metavar="FILE|syslog|stderr", default=None,
                        help=f"where log lines go (default {target_help}); syslog is "
                             f"{SYSLOG_SOCKET}, which journald reads too")


def handler_for(prog: str, target: str) -> logging.Handler:
    """The handler ``--log TARGET`` names. UsageError when it cannot be opened."""
    handler: logging.Handler
    if target == "stderr":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(OneLineFormatter(f"{prog}: %(levelname)s %(message)s"))
    elif target == "syslog":
        if not os.path.exists(SYSLOG_SOCKET):
            raise UsageError(f"--log syslog: no {SYSLOG_SOCKET} on this host (no syslog "
                             "daemon or journald listening)")
        try:
            handler = logging.handlers.SysLogHandler(
                SYSLOG_SOCKET, logging.handlers.SysLogHandler.LOG_DAEMON)
        except OSError as exc:
            raise UsageError(f"--log syslog: {SYSLOG_SOCKET}: {exc.strerror}") from None
        handler.setFormatter(OneLineFormatter(f"{prog}[{os.getpid()}]: %(message)s"))
    else:
        try:
            handler = logging.FileHandler(target, encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"--log {target}: {exc.strerror}") from None
        handler.setFormatter(OneLineFormatter(
            f"%(asctime)s {prog}[%(process)d]: %(levelname)s %(message)s"))
    return handler


def configure(prog: str, level: str, target: str,
              logger: str = "blktap") -> logging.Handler:
    """Send the records of ``logger`` at ``level`` and above to ``target``, in place of
    the handlers it had."""
    root = logging.getLogger(logger)
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = handler_for(prog, target)
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    return handler


__all__ = ["LEVELS", "OneLineFormatter", "add_log_options", "configure", "handler_for"]
