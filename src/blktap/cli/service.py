"""Running as a service: systemd readiness (sd_notify), pid files, and nbdkit's captive
mode (``--run CMD``).

sd_notify is one datagram to the UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or
``@name`` in the abstract namespace); written here rather than pulled from a library
because it is that and nothing more. Without the variable it does nothing, so the same
command runs under systemd (``Type=notify``) and anywhere else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import os
import shlex
import socket
import sys
from typing import TextIO

from blktap.errors import BlktapError, UsageError


def sd_notify(state: str, env: dict[str, str] | os._Environ[str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=serving"``) to the service manager; False
    when none listens (no ``$NOTIFY_SOCKET``) or the datagram could not be sent."""
    path = (env if env is not None else os.environ).get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), address)
    except OSError:
        return False
    return True


def write_pidfile(path: str) -> None:
    """Write our pid to ``path`` (created or replaced atomically)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise BlktapError(f"--pidfile {path}: {exc.strerror}", exc.errno or errno.EIO) \
            from None


def remove_pidfile(path: str) -> None:
    """Remove ``path`` if it still holds our pid (a successor's is left alone)."""
    try:
        with open(path, encoding="ascii") as f:
            if f.read().strip() != str(os.getpid()):
                return
        os.unlink(path)
    except OSError:
        pass


def captive_env(uris: list[str], socket_path: str | None, export_name: str,
                tls: bool) -> dict[str, str]:
    """The variables nbdkit's ``--run`` offers: ``uri`` (the first NBD URI), ``nbd`` (the
    same, nbdkit's older name), ``unixsocket`` and ``port`` (when listening there),
    ``exportname`` and ``tls``."""
    nbd = [u for u in uris if u.startswith("nbd")]
    uri = nbd[0] if nbd else (uris[0] if uris else "")
    env = {"uri": uri, "nbd": uri, "exportname": export_name, "tls": "1" if tls else "0",
           "unixsocket": socket_path or "", "port": ""}
    if uri.startswith(("nbd://", "nbds://")):
        hostport = uri.split("://", 1)[1].split("/", 1)[0]
        env["port"] = hostport.rpartition(":")[2]
    return env


async def run_captive(command: str, env: dict[str, str]) -> int:
    """Run ``command`` with /bin/sh, the variables of :func:`captive_env` set in its
    shell and exported to its children (nbdkit sets them as shell variables; we do both,
    so that a program run directly sees them too); its exit status, 128+N when killed by
    signal N (as a shell reports it)."""
    if not command.strip():
        raise UsageError("--run needs a command")
    prelude = "".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items())
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh", "-c", prelude + command, env={**os.environ, **env},
        stdin=sys.stdin if sys.stdin is not None and not sys.stdin.closed else None)
    try:
        code = await proc.wait()
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        await proc.wait()
        raise
    return 128 - code if code < 0 else code


__all__ = ["captive_env", "remove_pidfile", "run_captive", "sd_notify", "write_pidfile"]


# ---------------------------------------------------------------------- blktap serve
def add_serve_options(p: argparse.ArgumentParser) -> None:
    """The service options of ``blktap serve`` (docs/operations.md)."""
    from blktap.cli.logsetup import add_log_options

    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (port 0 "
                        "picks one; its URL is printed after the disk's URIs)")
    add_log_options(p, level_help="warning, info with -v", target_help="stderr")
    p.add_argument("--pidfile", metavar="FILE", help="write the serving process's pid here")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--foreground", dest="daemon", action="store_false", default=False,
                      help="stay in the foreground (the default; for systemd units)")
    mode.add_argument("--daemon", dest="daemon", action="store_true",
                      help="go to the background once serving (the command exits 0 then, "
                           "after printing the URIs)")
    p.add_argument("--run", metavar="CMD",
                   help="captive mode, as nbdkit's: serve while the shell command CMD runs "
                        "($uri, $nbd, $unixsocket, $port, $exportname, $tls set), then "
                        "exit with its status; without a listener, a private UNIX socket")


class ServeService:
    """What ``blktap serve`` does around serving: logs, daemon, pid file, metrics,
    readiness, captive command. The serve loop calls, in order: :meth:`before_loop`
    (outside asyncio), :meth:`ready` (listening), :meth:`wait` and :meth:`close`."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ready_fd: int | None = None
        self.tmpdir: str | None = None
        self.metrics = None
        self.metrics_url: str | None = None
        self._pidfile_written = False
        self._uris: list[str] = []
        self._tls = False

    def before_loop(self) -> None:
        from blktap.cli.logsetup import configure

        a = self.args
        if a.daemon and a.run:
            raise UsageError("--daemon and --run exclude each other")
        if a.log or a.log_level:
            configure("blktap serve", a.log_level or ("info" if a.verbose else "warning"),
                      a.log or "stderr")
        if a.run and not (a.socket or a.tcp or a.vhost_user):
            import tempfile

            self.tmpdir = tempfile.mkdtemp(prefix="blktap-serve-")
            a.socket = [os.path.join(self.tmpdir, "nbd.sock")]
        if a.daemon:
            from blktap.cli.daemonize import detach_until_ready

            self.ready_fd = detach_until_ready()

    async def ready(self, vbd: object, uris: list[str], tls: bool, out: TextIO) -> None:
        """Listening: start the metrics endpoint, print the URIs (not in captive mode:
        stdout is the command's), write the pid file, tell systemd and the waiting
        parent."""
        import logging

        a = self.args
        if a.metrics:
            from blktap.metrics.collect import vbd_sample
            from blktap.metrics.http import MetricsServer, parse_listen
            from blktap.metrics.prometheus import render

            labels = {"pid": str(os.getpid()), "image": a.image, "export": a.export_name}

            async def collect() -> str:
                return render([vbd_sample(vbd, labels)])
            self.metrics = MetricsServer(collect)
            host, port = await self.metrics.listen(*parse_listen(a.metrics))
            self.metrics_url = f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"
        if not a.run:
            for uri in uris:
                print(uri, file=out)
            if self.metrics_url:
                print(self.metrics_url, file=out)
            out.flush()
        if a.pidfile:
            write_pidfile(a.pidfile)
            self._pidfile_written = True
        logging.getLogger("blktap.serve").info(
            "serving %s on %s%s", a.image, " ".join(uris),
            f", metrics on {self.metrics_url}" if self.metrics_url else "")
        sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving {a.image} on "
                  f"{' '.join(uris)}")
        if self.ready_fd is not None:
            from blktap.cli.daemonize import say_ready

            say_ready(self.ready_fd)
            self.ready_fd = None
        self._uris, self._tls = uris, tls

    async def wait(self, stop: asyncio.Event) -> int:
        """Until SIGINT/SIGTERM, or in captive mode until the command ends (its status)."""
        a = self.args
        if not a.run:
            await stop.wait()
            return 0
        sock = a.socket[0] if a.socket else None
        env = captive_env(self._uris, os.path.abspath(sock) if sock else None,
                          a.export_name, self._tls)
        env["metrics"] = self.metrics_url or ""  # ours: the --metrics URL
        captive = asyncio.ensure_future(run_captive(a.run, env))
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({captive, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not captive.done():  # a signal: the command is stopped too
                captive.cancel()
            await asyncio.gather(captive, stopped, return_exceptions=True)
        if captive.cancelled():
            return 0
        return captive.result()

    async def close(self) -> None:
        sd_notify("STOPPING=1")
        if self.metrics is not None:
            await self.metrics.stop()
        a = self.args
        if self._pidfile_written:
            remove_pidfile(a.pidfile)
        if self.tmpdir is not None:
            import shutil

            shutil.rmtree(self.tmpdir, ignore_errors=True)
