"""``tapdisk``: the daemon entry point.

    tapdisk [-D] [--run-dir DIR] [--open TYPE:PATH]... [--read-only] [--timeout S]
            [--no-direct] [--log-dir DIR]

As the reference: creates its control socket ``<dir>/ctl<pid>`` and prints that path on
stdout (``tap-ctl spawn`` reads it), then serves until its last VBD is detached or it gets
SIGINT/SIGTERM (every image is then closed consistently). Without ``-D`` it daemonizes:
the process started exits 0 once the daemon serves its socket (1 if it could not start),
and the daemon runs on with its standard streams on /dev/null, in a session of its own.

``--open`` (ours) allocates a minor and opens a VBD at start, printing ``MINOR
NBD-SOCKET``; those minors are freed again when detached.

Each process logs to ``<log-dir>/tapdisk.<pid>.log`` (``/var/log/blktap`` unless
``$BLKTAP_LOG_DIR`` or ``--log-dir`` says otherwise); the file is deleted on a clean exit
unless an error was logged or a debug dump (SIGUSR1) was asked for, as the reference does.
SIGHUP reopens it (log rotation).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from blktap.cli.common import version_line
from blktap.cli.daemonize import detach_until_ready, null_stdio, say_ready
from blktap.cli.logsetup import add_log_options, configure
from blktap.control.rundir import control_dir
from blktap.errors import BlktapError
from blktap.io.polling import ENV_MAX_US, max_from_env, polling_loop_factory

DEFAULT_LOG_DIR = "/var/log/blktap"
LOG_FORMAT = "%(asctime)s tapdisk[%(process)d]: %(levelname)s %(message)s"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tapdisk", description="Serve virtual disks.")
    ap.add_argument("--version", action="version", version=version_line(ap.prog))
    ap.add_argument("-D", dest="foreground", action="store_true",
                    help="stay in the foreground (do not daemonize)")
    ap.add_argument("--run-dir", default=None,
                    help="where control and NBD sockets go (default $BLKTAP_CONTROL_DIR "
                         "or /run/blktap-control)")
    ap.add_argument("--log-dir", default=os.environ.get("BLKTAP_LOG_DIR", DEFAULT_LOG_DIR),
                    help="where tapdisk.<pid>.log goes (default $BLKTAP_LOG_DIR or "
                         "/var/log/blktap)")
    ap.add_argument("--open", metavar="TYPE:PATH", action="append", default=[],
                    help="allocate a minor and open a VBD on it at start")
    ap.add_argument("--read-only", action="store_true", help="open the VBDs read-only")
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="request timeout in seconds (default 120)")
    ap.add_argument("--no-direct", dest="direct", action="store_false",
                    help="never use O_DIRECT")
    add_log_options(ap, level_help="info", target_help="the per-process file in --log-dir")
    return ap


class LogFile(logging.Handler):
    """The per-process log file: created on first use of the directory, reopened on
    SIGHUP, deleted at a clean exit unless something made it worth keeping."""

    def __init__(self, directory: str, pid: int) -> None:
        super().__init__(logging.INFO)
        self.path = os.path.join(directory, f"tapdisk.{pid}.log")
        self.precious = False
        os.makedirs(directory, mode=0o755, exist_ok=True)
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self.setFormatter(logging.Formatter(LOG_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            self.precious = True
        try:
            self._file.write(self.format(record) + "\n")
        except (OSError, ValueError):
            pass

    def reopen(self) -> None:
        try:
            new = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        except OSError:
            return
        self._file.close()
        self._file = new

    def finish(self, keep: bool) -> None:
        self._file.close()
        if not (keep or self.precious):
            try:
                os.unlink(self.path)
            except OSError:
                pass


def setup_logging(args: argparse.Namespace) -> LogFile | None:
    if args.log:  # --log FILE|syslog|stderr in place of the per-process file
        configure("tapdisk", args.log_level or "info", args.log)
        return None
    root = logging.getLogger("blktap")
    root.setLevel((args.log_level or "info").upper())
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(logging.WARNING)
    stderr.setFormatter(logging.Formatter("tapdisk: %(message)s"))
    root.addHandler(stderr)
    try:
        logfile = LogFile(args.log_dir, os.getpid())
    except OSError as exc:
        root.warning("no log file in %s: %s", args.log_dir, exc.strerror)
        return None
    logfile.setLevel(root.level)
    root.addHandler(logfile)
    return logfile


def detach_stdio() -> None:
    """The daemon's standard streams go to /dev/null (stdout's EOF tells tap-ctl spawn
    that the path has been printed); log records now only go to the log file."""
    null_stdio()
    root = logging.getLogger("blktap")
    for h in list(root.handlers):
        if isinstance(h, logging.StreamHandler) and h.stream is sys.stderr:
            root.removeHandler(h)


async def _main(args: argparse.Namespace, ready_fd: int | None,
                logfile: LogFile | None) -> int:
    from blktap.control.rundir import RunDir
    from blktap.daemon.tapdisk import OpenParams, Tapdisk

    run_dir = RunDir(args.run_dir or control_dir())
    td = Tapdisk(run_dir)
    loop = asyncio.get_running_loop()
    if logfile is not None:
        loop.add_signal_handler(signal.SIGHUP, logfile.reopen)
    try:
        print(td.start_control(), flush=True)
        for spec in args.open:
            minor, _ = run_dir.allocate()
            try:
                slot = await td.attach(minor)
            except BaseException:
                run_dir.free(minor)
                raise
            slot.owned_marker = True
            await td.open(minor, OpenParams(spec, read_only=args.read_only,
                                            timeout=args.timeout, direct=args.direct))
            print(minor, slot.socket, flush=True)
        if ready_fd is not None:
            detach_stdio()
            say_ready(ready_fd)
        await td.run()
    finally:
        await td.shutdown()
        if logfile is not None and td.precious:
            logfile.precious = True
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.log == "stderr" and not args.foreground:
        print("tapdisk: --log stderr needs -D (a daemon's stderr is /dev/null)",
              file=sys.stderr)
        return 22
    try:
        poll_max = max_from_env()
    except ValueError as exc:
        print(f"tapdisk: {ENV_MAX_US}: {exc}", file=sys.stderr)
        return 22
    ready_fd: int | None = None
    if not args.foreground:
        ready_fd = detach_until_ready()
    try:
        logfile = setup_logging(args)
    except BlktapError as exc:
        print(f"tapdisk: {exc}", file=sys.stderr)
        return exc.errno or 22
    code = 1
    try:
        with asyncio.Runner(loop_factory=polling_loop_factory(poll_max)) as runner:
            code = runner.run(_main(args, ready_fd, logfile))
    except (BlktapError, OSError) as exc:
        logging.getLogger("blktap.tapdisk").error("%s", exc)
        code = getattr(exc, "errno", None) or 5
        print(f"tapdisk: {exc}", file=sys.stderr)
    finally:
        if logfile is not None:
            logfile.finish(keep=False)
    return code


if __name__ == "__main__":
    sys.exit(main())
