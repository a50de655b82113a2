"""``blktap serve``: serve one disk over NBD and/or vhost-user-blk in the foreground.

    blktap serve TYPE:PATH [--socket PATH] [--tcp HOST:PORT] [--read-only]
                 [--export-name NAME] [--tls-cert FILE --tls-key FILE [--tls-ca FILE]]
                 [--memory-budget SIZE] [--limit LIMITS]
                 [--vhost-user SOCK [--num-queues N] [--serial TEXT]]

Prints the NBD URI of each NBD listener, and ``vhost-user:/ABSOLUTE/SOCK`` for each
vhost-user socket, on stdout once it accepts connections; serves until SIGINT or
SIGTERM, then finishes the requests in flight and closes the images (a VHD gets its
batmap and footer written back). With only ``--vhost-user``, no NBD listener is opened.
Errors are one line on stderr and the exit code is the errno, as for the other
``blktap`` commands.

A plain path has its format probed: a differencing VHD is refused (its parents are
followed only for ``vhd:PATH``), and anything else is served with a warning on stderr
naming the format probed, since a guest that writes a VHD footer into its raw disk would
otherwise change how it is served next time (docs/security.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, TextIO
from urllib.parse import quote

from blktap.cli.common import add_parent_dir, parent_policy, print_warning
from blktap.cli.service import ServeService, add_serve_options
from blktap.errors import UsageError
from blktap.io.polling import check_max, max_from_env, polling_loop_factory

DEFAULT_TCP = "127.0.0.1:10809"


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"invalid address {text!r} (use HOST:PORT, e.g. 127.0.0.1:10809)")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def parse_size(text: str) -> int:
    """Bytes, with an optional K, M or G suffix (powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    scale = units.get(text[-1:].upper(), 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit() or int(digits) == 0:
        raise UsageError(f"invalid size {text!r} (use e.g. 256M)")
    return int(digits) * scale


def add_parser(sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    cmd = command(sub, "serve", run_args,
                  "Serve a disk (its whole chain) over NBD until interrupted.")
    cmd.add_argument("image", metavar="TYPE:PATH",
                     help="vhd:PATH, aio:PATH, qcow2:PATH, ram:PATH, nbd:SERVER or an "
                     "nbd:// URI (docs/drivers-nbd.md), rbd:POOL/IMAGE[:conf=FILE] (Ceph), "
                     "or a plain path (format probed)")
    cmd.add_argument("--socket", metavar="PATH", action="append", default=[],
                     help="listen on a UNIX socket")
    cmd.add_argument("--tcp", metavar="HOST:PORT", action="append", default=[],
                     type=parse_hostport,
                     help=f"listen on TCP (default, with no --socket: {DEFAULT_TCP}; "
                          "port 0 picks a free one)")
    cmd.add_argument("--read-only", action="store_true", help="refuse writes (EPERM)")
    cmd.add_argument("--export-name", metavar="NAME", default="",
                     help="the export's name (the default export \"\" is always accepted)")
    cmd.add_argument("--tls-cert", metavar="FILE", help="X.509 certificate (PEM): TLS on")
    cmd.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    cmd.add_argument("--tls-ca", metavar="FILE",
                     help="require client certificates signed by this CA")
    cmd.add_argument("--no-direct", dest="direct", action="store_false",
                     help="never use O_DIRECT (tapdisk's -D)")
    cmd.add_argument("--timeout", metavar="SECONDS", type=float, default=120.0,
                     help="fail a request still retrying after this long (default 120)")
    cmd.add_argument("--threads", metavar="N", type=int, default=16,
                     help="I/O threads (default 16)")
    cmd.add_argument("--io-engine", choices=("auto", "linux-aio", "threads"), default="auto",
                     help="how I/O that may block is done: direct I/O submitted to the "
                     "kernel's AIO and the rest in threads (linux-aio; auto picks it where "
                     "the kernel offers it, unless --vhost-user is given), or everything "
                     "in threads")
    cmd.add_argument("--memory-budget", metavar="SIZE", type=parse_size, default=None,
                     help="buffer memory all connections may hold together, e.g. 256M "
                     "(default 256M); a client that would exceed it waits")
    cmd.add_argument("--poll-max-us", metavar="US", type=int, default=None,
                     help="poll for up to this many microseconds before sleeping, the "
                     "window adapting to the traffic (default 32, or $BLKTAP_POLL_MAX_US; "
                     "0: never poll); docs/operations.md, \"Polling\"")
    cmd.add_argument("--vhost-user", metavar="SOCK", action="append", default=[],
                     help="serve a vhost-user-blk device (a KVM/QEMU guest's virtio disk) "
                     "on this UNIX socket; repeatable")
    cmd.add_argument("--num-queues", metavar="N", type=int, default=1,
                     help="vhost-user: virtqueues offered (default 1)")
    cmd.add_argument("--serial", metavar="TEXT",
                     help="vhost-user: the disk's serial number (GET_ID, 20 bytes at most; "
                     "default: the image's file name)")
    cmd.add_argument("--fuse", metavar="FILE", action="append", default=[],
                     help="show the disk as this regular file (a FUSE mount over it, "
                     "created if missing; losetup gives a block device); repeatable")
    cmd.add_argument("--cbt-log", metavar="LOG",
                     help="track changed blocks in this CBT log (cbt-util's format; as "
                          "tap-ctl open -C), exported as qemu:dirty-bitmap:NAME (docs/cbt.md)")
    cmd.add_argument("--limit", metavar="LIMITS",
                     help="rate-limit the disk (the valve filter): rate=BYTES/s, iops=N, "
                     "burst=BYTES, iops-burst=N, group=NAME (a blktap rated group), "
                     "comma-separated, e.g. rate=20M,iops=500 (docs/filters.md)")
    # -v (log connections) and --debug are the options every subcommand has; serve sets
    # its logging up itself, with its own prefix.
    cmd.set_defaults(own_logging=True)
    add_parent_dir(cmd)
    add_serve_options(cmd)  # metrics, logs, pid file, daemon, captive mode (service.py)


def run_args(args: argparse.Namespace, out: TextIO | None = None) -> int:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    if args.tls_ca and not args.tls_cert:
        raise UsageError("--tls-ca needs --tls-cert and --tls-key")
    if args.threads < 1:
        raise UsageError("--threads must be at least 1")
    if not 1 <= args.num_queues <= 256:
        raise UsageError("--num-queues must be between 1 and 256")
    if args.serial is not None and len(args.serial.encode()) > 20:
        raise UsageError("--serial takes at most 20 bytes")
    try:
        poll_max = max_from_env() if args.poll_max_us is None else check_max(args.poll_max_us)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.limit is not None:
        from blktap.tapdisk.ratelimit import Limits
        Limits.parse(args.limit)  # a bad limit is a usage error before anything opens
    level = logging.DEBUG if getattr(args, "debug", False) else (
        logging.INFO if getattr(args, "verbose", 0) else logging.WARNING)
    logging.basicConfig(level=level,
                        format="blktap serve: %(message)s", stream=sys.stderr)
    service = ServeService(args)
    service.before_loop()
    if not args.socket and not args.tcp and not args.vhost_user and not args.fuse:
        args.tcp = [parse_hostport(DEFAULT_TCP)]
    with asyncio.Runner(loop_factory=polling_loop_factory(poll_max)) as runner:
        return runner.run(_serve(args, out or sys.stdout, service))


async def _stop_fuses(fuses: list, again: asyncio.Event) -> None:
    """Unmount the files; one still in use (a loop device on it) is detached and served
    until its last user lets go, or until a second signal (``again``) drops it."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.ensure_future(asyncio.gather(*(fs.stop() for fs in fuses)))
    signalled = loop.create_task(again.wait())
    try:
        await asyncio.wait([stopping, signalled], return_when=asyncio.FIRST_COMPLETED)
    finally:
        signalled.cancel()
        if not stopping.done():
            stopping.cancel()
        results = await asyncio.gather(stopping, signalled, return_exceptions=True)
    if isinstance(results[0], BaseException) and \
            not isinstance(results[0], asyncio.CancelledError):
        raise results[0]


async def _until_stopped_or_unmounted(stop: asyncio.Event, fuses: list) -> int:
    loop = asyncio.get_running_loop()
    waits = [loop.create_task(stop.wait())]
    waits += [loop.create_task(fs.wait_closed()) for fs in fuses]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
    return 0


def _uri(tls: bool, name: str, *, socket: str | None = None,
         host: str = "", port: int = 0) -> str:
    path = quote(name, safe="")
    if socket is not None:
        return f"nbd{'s' if tls else ''}+unix:///{path}?socket={quote(socket, safe='/')}"
    if ":" in host:
        host = f"[{host}]"
    return f"nbd{'s' if tls else ''}://{host}:{port}/{path}"


async def _serve(args: argparse.Namespace, out: TextIO, service: ServeService) -> int:
    from blktap.io import LinuxAioEngine, ThreadEngine, best_engine
    from blktap.io.buffers import default_budget
    from blktap.tapdisk.drivers import AioDriver, open_stack, split_type
    from blktap.tapdisk.vbd import VBD
    from blktap.transport.nbd import Export, NbdServer
    from blktap.transport.nbd.server import tls_context

    loop = asyncio.get_running_loop()
    if args.memory_budget:
        default_budget().limit = args.memory_budget
    if args.io_engine == "threads":
        engine = ThreadEngine(args.threads)
    elif args.io_engine == "linux-aio":
        try:
            engine = LinuxAioEngine(args.threads)
        except OSError as exc:
            raise UsageError(f"--io-engine linux-aio: {exc.strerror}") from None
    elif args.vhost_user:
        # Guests measured 2-8x faster with the thread engine than with Linux AIO on the
        # same O_DIRECT image (guest testbed, docs/protocols/vhost-user-blk.md).
        engine = ThreadEngine(args.threads)
    else:
        engine = best_engine(args.threads)
    vbd = server = None
    vhost: list = []
    fuses: list = []
    created: list[str] = []
    try:
        tls = tls_context(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_cert else None
        policy = parent_policy(args)
        driver = await engine.call(open_stack, engine, args.image,
                                   writable=not args.read_only, direct=args.direct,
                                   parent_policy=policy)
        if args.cbt_log:
            from blktap.tapdisk.drivers.log import LogDriver
            driver = await engine.call(LogDriver.open, engine, args.cbt_log, driver)
        if args.limit is not None:
            from blktap.tapdisk.drivers.valve import ValveDriver
            from blktap.tapdisk.ratelimit import Limits
            driver = ValveDriver.over(engine, driver, Limits.parse(args.limit))
        vbd = VBD(driver, name=args.image, read_only=args.read_only, timeout=args.timeout)
        uris = []
        if args.vhost_user:
            from blktap.transport.vhost_user import BlkOptions, VhostUserServer, default_serial
            options = BlkOptions(num_queues=args.num_queues, read_only=args.read_only,
                                 serial=default_serial(args.image) if args.serial is None
                                 else args.serial)
            for path in args.vhost_user:
                path = os.path.abspath(path)
                vhost.append(vs := VhostUserServer(vbd, options))
                vs.listen(path)
                uris.append(f"vhost-user:{path}")
        for path in args.fuse:
            from blktap.transport.fuse import FuseServer
            path = os.path.abspath(path)
            if not os.path.lexists(path):
                with open(path, "x"):
                    created.append(path)
            fuses.append(fs := FuseServer(vbd, path))
            fs.mount()
            uris.append(f"fuse:{path}")
        server = NbdServer(Export(args.export_name, vbd, description=args.image), tls=tls)
        for path in args.socket:
            path = os.path.abspath(path)  # the URI must work from anywhere
            server.listen_unix(path)
            uris.append(_uri(tls is not None, args.export_name, socket=path))
        for host, port in args.tcp:
            bound_host, bound_port = server.listen_tcp(host, port)
            uris.append(_uri(tls is not None, args.export_name, host=bound_host,
                             port=bound_port))
        # Only once serving: an error line stays the only line when something fails.
        if split_type(args.image)[0] is None:
            image = driver.chain()[-1]
            kind = "aio" if isinstance(image, AioDriver) else "vhd"
            what = "raw" if kind == "aio" else "VHD"
            print_warning(f"{args.image}: format probed as {what}; a guest that writes to "
                          f"this disk may change what it probes as: name the format "
                          f"({kind}:{args.image}) to silence this")
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await service.ready(vbd, uris, tls is not None, out)
        if fuses and not (args.socket or args.tcp or args.vhost_user):
            # Only files: the server ends when they are unmounted from outside too.
            code = await _until_stopped_or_unmounted(stop, fuses)
        else:
            code = await service.wait(stop)
        logging.getLogger("blktap.nbd").info("stopping")
        stop.clear()
        await _stop_fuses(fuses, stop)
    finally:
        for fs in fuses:
            await fs.abort()
        for path in created:
            with contextlib.suppress(OSError):
                os.unlink(path)
        await service.close()
        for vs in vhost:
            await vs.stop()
        if server is not None:
            await server.stop()
        if vbd is not None:
            await vbd.close()
        elif "driver" in locals():
            await driver.close_chain()
        engine.close()
    return code


__all__ = ["add_parser", "run_args"]
