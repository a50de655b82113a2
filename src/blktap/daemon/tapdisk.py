"""The tapdisk process: its VBDs, their life cycle, and the control socket that drives it.

As the reference tapdisk (``blktap-reference.md`` §2): it listens on ``<dir>/ctl<pid>``
(:mod:`blktap.control.rundir`), answers one control message per connection
(:mod:`blktap.control.message`), serves each open VBD over NBD at
``<dir>/nbd<pid>.<minor>`` (and, with ``BLKTAP_VHOST_USER=1`` in its environment, as a
vhost-user-blk device for a KVM/QEMU guest at ``<dir>/vhost<pid>.<minor>``), and exits by
itself once its last VBD is detached.

As the reference, it also takes connected sockets other processes hand over
(:mod:`blktap.transport.fdreceiver`): on ``<dir>/nbdserver-new<pid>.<minor>`` and
``<dir>/nbdserver<pid>.<minor>`` a client of the VBD's export (fixed newstyle, oldstyle
handshake), on ``<dir>/nbdclient<pid>`` a connection to an NBD server kept under a name
for ``nbd:NAME`` (a secondary, ``-2 nbd:NAME``; :mod:`blktap.nbdclient.passed`).

A minor's life, driven by ``tap-ctl``::

    ATTACH ──► attached ──OPEN──► open (state 0) ──PAUSE──► paused (0x2a)
       ▲          │  ▲              │    ▲                     │
       │       DETACH└────CLOSE─────┘    └───────RESUME────────┘
       │          ▼        (also from paused)
       └──── detached: the process exits if it was the last

ATTACH takes the flock on the minor's marker (so ``tap-ctl free`` refuses it and ``list``
knows who serves it); the kernel drops it if the process dies. Requests that arrive while
a VBD is paused wait (:meth:`VBD.pause`); the NBD clients stay connected.

Control requests: PID, LIST and STATS are answered at once, even while another request
runs; the others (which change a VBD) run one at a time, in the order they came, as the
reference queues its "exclusive" requests. Malformed requests get an ERROR reply and never
disturb the VBDs.

Idle or slow clients cannot keep others out (the reference serves at most 10 connections
and leaves the next in its listen backlog, where one silent client per slot starves
``tap-ctl list``). Every connection is accepted at once and has 10 s, from its accept, to
send its whole request. At most 32 may be waiting for their request: the next evicts the
oldest of them (closed without a reply: it had the longest to speak). At most 32
exclusive requests may be queued: the next is refused with EBUSY at once. So a client
that sends its request promptly is answered whatever the others do.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import glob
import logging
import os
import signal
import socket
from dataclasses import dataclass

from blktap.control import message as m
from blktap.control.message import Flag, Message, MessageType
from blktap.control.rundir import MinorHold, RunDir
from blktap.errors import BlktapError, CbtLogError, ControlProtocolError, DriverError
from blktap.io import ThreadEngine, best_engine
from blktap.io.polling import add_loop_stats
from blktap.nbdclient.passed import passed_sockets
from blktap.tapdisk.driver import SECTOR, Driver
from blktap.tapdisk.drivers import open_stack, require_type
from blktap.tapdisk.drivers.caches import add_caches
from blktap.tapdisk.drivers.log import LogDriver
from blktap.tapdisk.drivers.nbd import open_on_nbd_parent
from blktap.tapdisk.drivers.valve import ValveDriver, keep_valve, with_limits
from blktap.tapdisk.mirror import MirrorDriver, MirrorState, Mode, Phase, RangeSet
from blktap.tapdisk.ratelimit import Limits
from blktap.tapdisk.stats import format_stats
from blktap.tapdisk.vbd import DEFAULT_TIMEOUT, VBD, VbdState
from blktap.transport.fdreceiver import FdReceiver, Refused
from blktap.transport.nbd import Export, NbdServer
from blktap.transport.sockio import close_listener
from blktap.transport.vhost_user import BlkOptions, VhostUserServer, default_serial
from blktap.transport.xen import BlkifRing, HostDevices, XenDevices
from blktap.transport.xen import connect as xen_connect
from blktap.transport.xen.structs import VDISK_READONLY

log = logging.getLogger("blktap.tapdisk")

REQUEST_TIMEOUT = 10.0  # seconds a control connection gets to send its request
MAX_WAITING_CONNECTIONS = 32  # connections still sending their request; the next evicts
MAX_QUEUED_REQUESTS = 32  # exclusive requests waiting their turn; the next gets EBUSY
LISTEN_BACKLOG = 128
STATS_ALL = 0xFFFF  # STATS with this cookie: every VBD, as a JSON array
# Open flags that need filters not built yet (cache, log, mirror, index, ...).
UNSUPPORTED_FLAGS = {
    Flag.VHD_INDEX: "vhd index",
}
# ``-2 null`` on unpause removes the secondary.
NO_SECONDARY = "null"
# Requests that read state only: served at once, beside a running exclusive one.
REENTRANT = frozenset({MessageType.PID, MessageType.LIST, MessageType.STATS})
# RESUME reopens the chain up to this many times, this far apart, as the reference does
# (a logical volume may take a moment to appear after a snapshot); the other VBDs of the
# process are served meanwhile.
RESUME_ATTEMPTS = 10
RESUME_RETRY_INTERVAL = 1.0


@dataclass
class OpenParams:
    """How a VBD was opened (RESUME reopens with the same, perhaps on a new path)."""

    spec: str
    read_only: bool = False
    direct: bool = True
    timeout: float = DEFAULT_TIMEOUT
    key: bytes | None = None
    logpath: str | None = None  # the CBT log above the leaf (-C / unpause -c)
    secondary: str | None = None  # -2 TYPE:PATH
    standby: bool = False  # -s
    # -e: the parent is what this minor (another tapdisk's disk) serves over NBD.
    parent_minor: int | None = None
    local_cache: bool = False  # -r: the lc filter between the leaf and its parent
    block_cache: bool = False  # ADD_CACHE: the shared bc filter above the parent


@dataclass
class Slot:
    """One attached minor, open or not."""

    minor: int
    hold: MinorHold | None
    params: OpenParams | None = None
    vbd: VBD | None = None
    nbd: NbdServer | None = None
    socket: str | None = None
    vhost: VhostUserServer | None = None
    owned_marker: bool = False  # allocated by us (--open), freed by us
    was_closed: bool = False
    blkif: BlkifRing | None = None  # the Xen guest's ring, while connected
    mirror: MirrorState | None = None  # the secondary (-2), kept across pause/resume

    @property
    def state(self) -> int:
        """The reference's: 0 attached and never opened, 0x2 after a close."""
        if self.vbd is None:
            return int(VbdState.CLOSED) if self.was_closed else 0
        return int(self.vbd.state)

    def __str__(self) -> str:
        """How log lines name it: ``minor N (type:path)``, the image once open."""
        return f"minor {self.minor} ({self.params.spec})" if self.params else \
            f"minor {self.minor}"

    @property
    def path(self) -> str:
        """``type:path`` as LIST reports it; empty while not open."""
        if self.params is None or self.vbd is None:
            return ""
        return self.params.spec


def _error(code: int, text: str, cookie: int = 0) -> Message:
    return Message(MessageType.ERROR, cookie, m.Response(code, text[: m.STRING_LENGTH - 1]))


def typed_spec(spec: str) -> str:
    """``type:path`` checked; a path without its type is refused (EINVAL) as by the
    reference tapdisk: probing a disk a guest writes to would let the guest choose how
    it is read (docs/security.md)."""
    kind, path = require_type(spec)
    return f"{kind}:{path}"


class Tapdisk:
    def __init__(self, run_dir: RunDir | str | None = None, threads: int = 16, *,
                 xen: XenDevices | None = None) -> None:
        self.run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        # The grant and event channel devices of XENBLKIF_CONNECT (tests pass stand-ins).
        self.xen: XenDevices = xen if xen is not None else HostDevices()
        self.pid = os.getpid()
        # KVM guests (vhost-user) measured much faster on threads than on Linux AIO.
        self.engine = ThreadEngine(threads) if self.vhost_options() else best_engine(threads)
        self.slots: dict[int, Slot] = {}
        self.done = asyncio.Event()
        # Something worth keeping the log file for happened (a failure, a debug dump, a
        # watchdog stall), as the reference's "precious" log.
        self.precious = False
        self._exclusive = asyncio.Lock()
        self._queued = 0  # exclusive requests waiting for or holding the lock
        self._ctl: socket.socket | None = None
        self._ctl_task: asyncio.Task | None = None
        self._fd_client: FdReceiver | None = None  # nbdclient<pid>
        self._clients: set[asyncio.Task] = set()
        # The connections still reading their request, oldest first (dicts keep order).
        self._waiting: dict[asyncio.Task, None] = {}
        self._warned: dict[str, tuple[float, int]] = {}  # key: (last logged, held back)
        self._ever_attached = False

    @property
    def control_path(self) -> str:
        return self.run_dir.control_socket(self.pid)

    def nbd_path(self, minor: int) -> str:
        return self.run_dir.nbd_socket(self.pid, minor)

    def vhost_path(self, minor: int) -> str:
        return os.path.join(self.run_dir.path, f"vhost{self.pid}.{minor}")

    @staticmethod
    def vhost_options() -> BlkOptions | None:
        """The vhost-user export is opt-in: ``BLKTAP_VHOST_USER=1`` in tapdisk's
        environment (``BLKTAP_VHOST_USER_QUEUES=N`` for N virtqueues, default 1)."""
        if os.environ.get("BLKTAP_VHOST_USER", "") not in ("1", "yes", "on"):
            return None
        try:
            queues = int(os.environ.get("BLKTAP_VHOST_USER_QUEUES", "1"))
        except ValueError:
            queues = 1
        return BlkOptions(num_queues=min(max(queues, 1), 256))

    # ------------------------------------------------------------------ control socket
    def start_control(self) -> str:
        """Create ``ctl<pid>`` (0600 in the 0700 runtime directory) and serve it."""
        self.run_dir.ensure()
        path = self.control_path
        if os.path.lexists(path):
            os.unlink(path)  # our pid: the leftover of a dead process that had it
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        self._ctl = sock
        self._ctl_task = asyncio.get_running_loop().create_task(self._accept_loop())
        self._start_fd_client()
        return path

    def _start_fd_client(self) -> None:
        """``nbdclient<pid>``: sockets handed over for ``nbd:NAME``. Not being able to
        offer it is logged, not fatal (the reference goes on without it too)."""
        receiver = FdReceiver(self.run_dir.nbd_client_socket(self.pid), self._passed_socket)
        old = os.umask(0o177)
        try:
            receiver.listen()
        except (OSError, BlktapError) as exc:
            log.error("cannot offer %s: %s", receiver.path, exc)
            return
        finally:
            os.umask(old)
        self._fd_client = receiver

    @staticmethod
    def _passed_socket(sock: socket.socket, payload: bytes) -> None:
        try:
            name = payload.decode()
        except UnicodeDecodeError:
            raise Refused(f"the name {payload!r} is not UTF-8") from None
        replaced = passed_sockets().put(name, sock)
        log.info("nbdclient: a socket kept under the name %r%s", name,
                 " (the one passed before under it closed)" if replaced else "")

    async def _accept_loop(self) -> None:
        """Accept every connection at once; none is left in the backlog."""
        loop = asyncio.get_running_loop()
        assert self._ctl is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._ctl)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: the oldest silent client makes room, if any.
                    self._warn_now_and_then("accept", "control: accept: %s", exc)
                    # After an eviction, one turn of the loop lets that task close its
                    # socket before the accept is tried again.
                    await asyncio.sleep(0 if self._evict_oldest() else 0.1)
                    continue
                raise
            while len(self._waiting) >= MAX_WAITING_CONNECTIONS:
                self._evict_oldest()
            task = loop.create_task(self._serve_connection(conn))
            self._clients.add(task)
            self._waiting[task] = None
            task.add_done_callback(self._client_ended)

    def _evict_oldest(self) -> bool:
        """Close the connection that has waited longest without sending its request."""
        if not self._waiting:
            return False
        task = next(iter(self._waiting))
        del self._waiting[task]
        task.cancel()
        self._warn_now_and_then("evict", "control: too many connections without a "
                                "request; closing the oldest")
        return True

    def _warn_now_and_then(self, key: str, text: str, *args: object) -> None:
        """A warning that a flood of clients would repeat: at most one a second, with
        the count of those held back."""
        now = asyncio.get_running_loop().time()
        last, held = self._warned.get(key, (float("-inf"), 0))
        if now - last < 1.0:
            self._warned[key] = (last, held + 1)
            return
        self._warned[key] = (now, 0)
        log.warning(text + (f" (and {held} more like it)" if held else ""), *args)

    def _client_ended(self, task: asyncio.Task) -> None:
        self._clients.discard(task)
        self._waiting.pop(task, None)

    async def _serve_connection(self, conn: socket.socket) -> None:
        """Read one request (on the loop: a silent client costs a task, not a thread),
        answer it, close."""
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        try:
            conn.setblocking(False)
            try:
                try:
                    async with asyncio.timeout(REQUEST_TIMEOUT):  # (not wait_for: see _send)
                        request = await m.read_message_async(conn, loop)
                finally:
                    self._waiting.pop(me, None)  # type: ignore[arg-type]
            except TimeoutError:
                self._warn_now_and_then("silent", "control: no request within %.0f s",
                                        REQUEST_TIMEOUT)
                return
            except ControlProtocolError as exc:
                self._warn_now_and_then("bad", "control: bad request: %s", exc)
                await self._send(conn, [m.error_reply(exc)])
                return
            replies = await self.handle(request)
            await self._send(conn, replies)
        except (OSError, TimeoutError) as exc:
            log.info("control: connection lost: %s", exc)
        except Exception:  # a bug: lose this request, keep the process
            log.exception("control: request failed")
            self.precious = True
        finally:
            conn.close()

    @staticmethod
    async def _send(conn: socket.socket, replies: list[Message]) -> None:
        data = b"".join(m.encode(r) for r in replies)
        # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancellation that arrives
        # as the awaited work ends, and a stop would then wait for that task for ever.
        async with asyncio.timeout(REQUEST_TIMEOUT):
            await asyncio.get_running_loop().sock_sendall(conn, data)

    async def handle(self, request: Message) -> list[Message]:
        """The replies to one request (never raises for a request's own faults)."""
        t = request.type
        try:
            if t in REENTRANT:
                return await self._dispatch(request)
            if self._queued >= MAX_QUEUED_REQUESTS:
                return [_error(errno.EBUSY, f"{MAX_QUEUED_REQUESTS} requests are queued "
                               "already", request.cookie)]
            self._queued += 1
            try:
                async with self._exclusive:
                    return await self._dispatch(request)
            finally:
                self._queued -= 1
        except BlktapError as exc:
            # A driver's bug, or a bad CBT log, is the operator's to see whatever its errno.
            # EALREADY is the caller's news, not a fault: a restarted tapback connects the
            # rings it finds in XenStore again, and is told they are served.
            if isinstance(exc, (DriverError, CbtLogError)) or exc.errno not in (
                    errno.EBUSY, errno.EINVAL, errno.ENOENT, errno.EEXIST, errno.EALREADY):
                log.error("%s of %s: %s", t.label, self._named(request.cookie), exc)
            return [_error(exc.errno, str(exc), request.cookie)]
        except OSError as exc:
            code = exc.errno or errno.EIO
            log.error("%s of %s: %s", t.label, self._named(request.cookie), exc)
            return [_error(code, str(exc), request.cookie)]

    async def _dispatch(self, req: Message) -> list[Message]:
        t, minor = req.type, req.cookie
        T = MessageType
        if t is T.PID:
            return [Message(T.PID_RSP, minor, m.Pid(self.pid))]
        if t is T.LIST:
            return self.list_replies(minor)
        if t is T.STATS:
            return [Message(T.STATS_RSP, minor, m.Stat(), text=self.stats_text(minor).encode())]
        if t is T.DISK_INFO:
            return [Message(T.DISK_INFO_RSP, minor, self.disk_info(minor))]
        if t is T.ATTACH:
            await self.attach(minor)
            return [Message(T.ATTACH_RSP, minor)]
        if t is T.DETACH:
            await self.detach(minor)
            return [Message(T.DETACH_RSP, minor)]
        if t is T.OPEN:
            assert isinstance(req.payload, m.Params)
            params = self._open_params(req.payload, req.key, req.logpath)
            vbd = await self.open(minor, params)
            return [Message(T.OPEN_RSP, minor, m.Image(vbd.size // SECTOR, SECTOR, 0))]
        if t in (T.CLOSE, T.FORCE_SHUTDOWN):
            await self.close(minor, force=t is T.FORCE_SHUTDOWN)
            return [Message(T.CLOSE_RSP, minor)]
        if t is T.PAUSE:
            await self.pause(minor)
            return [Message(T.PAUSE_RSP, minor)]
        if t is T.RESUME:
            assert isinstance(req.payload, m.Params)
            p = req.payload
            self._check_flags(p.flags & ~(Flag.RDONLY | Flag.NO_O_DIRECT))
            secondary = p.secondary if p.flags & Flag.SECONDARY else None
            if p.flags & Flag.SECONDARY and not secondary:
                raise BlktapError("resume: -2 without a secondary", errno.EINVAL)
            if p.flags & Flag.STANDBY and secondary in (None, NO_SECONDARY):
                raise BlktapError("resume: standby (-s) needs a secondary (-2)", errno.EINVAL)
            await self.resume(minor, p.path or None, req.logpath, secondary=secondary,
                              standby=bool(p.flags & Flag.STANDBY))
            return [Message(T.RESUME_RSP, minor)]
        if t is T.VALVE_SET:
            assert isinstance(req.payload, m.Text)
            self.set_limits(minor, req.payload.text)
            return [Message(T.VALVE_SET_RSP, minor)]
        if t is T.XENBLKIF_CONNECT:
            assert isinstance(req.payload, m.Blkif)
            await self.xen_connect(minor, req.payload)
            return [Message(T.XENBLKIF_CONNECT_RSP, minor)]
        if t is T.XENBLKIF_DISCONNECT:
            assert isinstance(req.payload, m.Blkif)
            await self.xen_disconnect(req.payload.domid, req.payload.devid)
            return [Message(T.XENBLKIF_DISCONNECT_RSP, minor)]
        raise BlktapError(f"{t.label}: not a request tapdisk answers", errno.EINVAL)

    # ------------------------------------------------------------------ requests
    @staticmethod
    def _check_flags(flags: int) -> None:
        for flag, what in UNSUPPORTED_FLAGS.items():
            if flags & flag:
                raise BlktapError(f"{what} is not supported yet", errno.EOPNOTSUPP)

    def _open_params(self, p: m.Params, key: bytes | None,
                     logpath: str | None = None) -> OpenParams:
        self._check_flags(p.flags)
        if not p.path:
            raise BlktapError("open: no image given", errno.EINVAL)
        secondary = None
        if p.flags & Flag.SECONDARY:
            if not p.secondary:
                raise BlktapError("open: -2 without a secondary", errno.EINVAL)
            if p.secondary != NO_SECONDARY:
                secondary = p.secondary
        if p.flags & Flag.STANDBY and secondary is None:
            raise BlktapError("open: standby (-s) needs a secondary (-2)", errno.EINVAL)
        if secondary is not None and p.flags & Flag.RDONLY:
            raise BlktapError("open: a read-only disk has nothing to mirror (-2 with -R)",
                              errno.EINVAL)
        return OpenParams(spec=p.path, read_only=bool(p.flags & Flag.RDONLY),
                          direct=not p.flags & Flag.NO_O_DIRECT,
                          timeout=float(p.req_timeout) if p.req_timeout else DEFAULT_TIMEOUT,
                          key=key, logpath=self._logpath(p.flags, logpath),
                          secondary=secondary, standby=bool(p.flags & Flag.STANDBY),
                          parent_minor=p.prt_devnum if p.flags & Flag.REUSE_PRT else None,
                          local_cache=bool(p.flags & Flag.ADD_LCACHE),
                          block_cache=bool(p.flags & Flag.ADD_CACHE))

    @staticmethod
    def _logpath(flags: int, logpath: str | None) -> str | None:
        if not flags & Flag.ADD_LOG:
            return None
        if not logpath:
            raise BlktapError("no CBT log path after the message", errno.EINVAL)
        return logpath

    def _named(self, minor: int) -> str:
        """``minor N (type:path)`` for a log line (the minor alone when not open)."""
        slot = self.slots.get(minor)
        return str(slot) if slot is not None else f"minor {minor}"

    def _slot(self, minor: int, code: int = errno.ENODEV) -> Slot:
        """The attached minor; ENODEV if not attached (OPEN says EINVAL), as the
        reference's handlers answer."""
        slot = self.slots.get(minor)
        if slot is None:
            raise BlktapError(f"minor {minor} is not attached", code)
        return slot

    def _open_vbd(self, minor: int) -> VBD:
        slot = self._slot(minor)
        if slot.vbd is None:
            raise BlktapError(f"minor {minor} is not open", errno.EINVAL)
        return slot.vbd

    async def attach(self, minor: int, *, hold: bool = True) -> Slot:
        if minor in self.slots:
            raise BlktapError(f"minor {minor} is already attached", errno.EEXIST)
        marker_hold = self.run_dir.hold(minor) if hold else None
        slot = Slot(minor, marker_hold)
        self.slots[minor] = slot
        self._ever_attached = True
        log.info("minor %d attached", minor)
        return slot

    async def detach(self, minor: int) -> None:
        slot = self._slot(minor)
        if slot.vbd is not None:
            raise BlktapError(f"minor {minor} is still open", errno.EBUSY)
        del self.slots[minor]
        if slot.hold is not None:
            slot.hold.release()
        if slot.owned_marker:
            try:
                self.run_dir.free(minor)
            except BlktapError as exc:
                log.warning("freeing minor %d: %s", minor, exc)
        log.info("minor %d detached", minor)
        if not self.slots:
            self.done.set()  # the reference exits once its last VBD is gone

    def parent_socket(self, minor: int) -> str:
        """``-e MINOR``: the NBD socket of the tapdisk serving that minor (the reference's
        glob ``nbd[0-9]*.MINOR`` in the control directory)."""
        pattern = os.path.join(glob.escape(self.run_dir.path), f"nbd[0-9]*.{minor}")
        found = sorted(glob.glob(pattern))
        if not found:
            raise BlktapError(f"-e {minor}: no tapdisk serves minor {minor} "
                              f"(no {pattern})", errno.ENOENT)
        return found[0]

    async def _open_stack(self, params: OpenParams, spec: str) -> Driver:
        """The image's driver stack, with the read caches the open asked for (a cache
        that cannot be used closes the stack again)."""
        if params.parent_minor is not None:
            driver = await self.engine.call(
                open_on_nbd_parent, self.engine, spec,
                self.parent_socket(params.parent_minor), writable=not params.read_only,
                key=params.key)
        else:
            driver = await self.engine.call(open_stack, self.engine, spec,
                                            writable=not params.read_only,
                                            direct=params.direct,
                                            **({"key": params.key} if params.key else {}))
        try:
            add_caches(self.engine, driver, local=params.local_cache,
                       shared=params.block_cache)
        except BaseException:
            await self._close_all(driver)
            raise
        return driver

    async def _with_log(self, driver: Driver, logpath: str | None) -> Driver:
        """``driver`` with the CBT log filter above it when ``logpath`` names one (on top
        of the secondary too: a write redirected to it on ENOSPC is a change all the
        same). A log that cannot be used closes the stack again."""
        if logpath is None:
            return driver
        try:
            return await self.engine.call(LogDriver.open, self.engine, logpath, driver)
        except BaseException:
            await self._close_all(driver)
            raise

    async def open(self, minor: int, params: OpenParams) -> VBD:
        slot = self._slot(minor, errno.EINVAL)
        if slot.vbd is not None:
            raise BlktapError(f"minor {minor} is already open", errno.EALREADY)
        params.spec = typed_spec(params.spec)
        mirror = None
        if params.secondary is not None:
            params.secondary = typed_spec(params.secondary)
            mirror = self._new_mirror(minor, params.secondary, params.standby)
        driver = await self._open_stack(params, params.spec)
        if mirror is not None:
            driver = await self._with_secondary(minor, driver, params, mirror, explicit=True)
        slot.mirror = mirror
        driver = await self._with_log(driver, params.logpath)
        vbd = VBD(driver, name=params.spec, read_only=params.read_only,
                  timeout=params.timeout)
        server = NbdServer(Export("", vbd, description=params.spec, any_name=True))
        path = self.nbd_path(minor)
        try:
            old = os.umask(0o177)
            try:
                server.listen_unix(path)
                # The reference listens on a second direct socket, its "old" server's
                # (newstyle-fixed too on a direct connection): the same export here.
                server.listen_unix(self.run_dir.nbd_old_socket(self.pid, minor))
                # And on two fd-passing sockets: a connected socket handed over gets the
                # fixed newstyle handshake on one, the oldstyle one on the other.
                server.listen_fd_passing(self.run_dir.nbd_fd_socket(self.pid, minor))
                server.listen_fd_passing(self.run_dir.nbd_fd_oldstyle_socket(self.pid, minor),
                                         old=True)
            finally:
                os.umask(old)
        except BaseException:
            await server.stop()
            await vbd.close()
            raise
        vhost = None
        options = self.vhost_options()
        if options is not None:
            options.read_only = params.read_only
            options.serial = default_serial(params.spec)
            vhost = VhostUserServer(vbd, options)
            try:
                old = os.umask(0o177)
                try:
                    vhost.listen(self.vhost_path(minor))
                finally:
                    os.umask(old)
            except BaseException:
                await server.stop()
                await vbd.close()
                raise
        slot.params, slot.vbd, slot.nbd, slot.socket = params, vbd, server, path
        slot.vhost = vhost
        log.info("minor %d: opened %s (%d bytes%s%s), NBD at %s%s%s", minor, params.spec,
                 vbd.size, ", read-only" if vbd.read_only else "",
                 f", CBT log {params.logpath}" if params.logpath else "", path,
                 f", vhost-user at {vhost.path}" if vhost else "",
                 f", secondary {mirror.spec} ({mirror.mode.value})" if mirror else "")
        return vbd

    # ------------------------------------------------------------------ Xen rings
    def disk_info(self, minor: int) -> m.Image:
        """What tapback writes for the frontend: sectors, sector size, VDISK_* bits."""
        slot = self._slot(minor)
        if slot.vbd is None:
            return m.Image(0, 0, 0)  # never opened: zeros, as the reference
        info = VDISK_READONLY if slot.vbd.read_only else 0
        # Our extension: tapback may offer the frontend an order-4 ring (16 grant refs).
        return m.Image(slot.vbd.size // SECTOR, SECTOR, info, max_ring_order=m.MAX_RING_ORDER,
                       features=m.FEATURE_PERSISTENT_GRANTS)

    def _ring_of(self, domid: int, devid: int) -> Slot | None:
        for slot in self.slots.values():
            if slot.blkif is not None and (slot.blkif.domid, slot.blkif.devid) == (domid, devid):
                return slot
        return None

    async def xen_connect(self, minor: int, b: m.Blkif) -> BlkifRing:
        """Serve the minor's VBD on the guest's ring. EALREADY if that minor, or that
        guest device, is connected already (tapback tolerates it after a restart)."""
        slot = self._slot(minor)
        vbd = self._open_vbd(minor)
        if slot.blkif is not None and slot.blkif.dead:
            await self._drop_ring(slot)  # disconnected by itself: a new ring may come
        if slot.blkif is not None:
            raise BlktapError(f"minor {minor} is connected to a ring already", errno.EALREADY)
        other = self._ring_of(b.domid, b.devid)
        if other is not None:
            if other.blkif is not None and other.blkif.dead:
                await self._drop_ring(other)
            else:
                raise BlktapError(f"domain {b.domid} device {b.devid} is connected already "
                                  f"(minor {other.minor})", errno.EALREADY)
        try:
            ring = xen_connect(vbd, self.xen, domid=b.domid, devid=b.devid, grefs=b.gref,
                               order=b.order, proto=b.proto, port=b.port,
                               persistent=b.persistent_grants,
                               name=f"minor {minor} (domain {b.domid} device {b.devid})")
        except ValueError as exc:
            raise BlktapError(f"blkif connect: {exc}", errno.EINVAL) from exc
        slot.blkif = ring
        return ring

    async def xen_disconnect(self, domid: int, devid: int) -> None:
        """Stop serving that guest device (found by domid/devid, as the reference):
        what is in flight finishes, then the ring is unmapped and the channel unbound."""
        slot = self._ring_of(domid, devid)
        if slot is None:
            raise BlktapError(f"domain {domid} device {devid} is not connected", errno.ENODEV)
        await self._drop_ring(slot)

    @staticmethod
    async def _drop_ring(slot: Slot) -> None:
        ring, slot.blkif = slot.blkif, None
        if ring is not None:
            await ring.stop()

    async def close(self, minor: int, *, force: bool = False) -> None:
        """Stop serving: NBD clients get their requests in flight answered, then are
        disconnected; the stack is closed (a paused one is closed already). Closing a
        minor that is not open succeeds, as in the reference."""
        slot = self._slot(minor)
        if slot.vbd is None or slot.nbd is None:
            return
        vbd, server = slot.vbd, slot.nbd
        spec = slot.params.spec if slot.params else ""
        try:
            if vbd.paused:
                # Requests held by the pause can never complete: closing the VBD first
                # fails them (ESHUTDOWN), so the servers' waits for them end.
                await vbd.close()
            await self._drop_ring(slot)
            if slot.vhost is not None:
                await slot.vhost.stop()
            await server.stop()
            await vbd.close()
        finally:
            slot.vbd = slot.nbd = slot.socket = slot.vhost = None
            slot.params = None
            slot.mirror = None
            slot.was_closed = True
        log.info("minor %d (%s) closed%s", minor, spec, " (forced)" if force else "")

    async def pause(self, minor: int) -> None:
        """Pause; pausing a paused (or never opened) minor succeeds, as in the reference
        (sm pauses again after a failed unpause)."""
        slot = self._slot(minor)
        vbd = slot.vbd
        if vbd is None or vbd.paused:
            return
        log.info("%s: pausing", slot)
        await vbd.pause()
        log.info("%s: paused", slot)

    async def resume(self, minor: int, new_spec: str | None = None,
                     logpath: str | None = None, *,
                     secondary: str | None = None, standby: bool = False) -> None:
        """Reopen the stack (on ``new_spec`` if given) and serve again, with the CBT log
        ``logpath`` above it, or without a log when there is none (as the reference:
        unpause without -c drops the log). ``secondary`` (``unpause -2``) names a new
        secondary, ``"null"`` removes it; without it the secondary the disk had is opened
        again (unless it failed: it missed writes)."""
        slot = self._slot(minor)
        vbd = self._open_vbd(minor)
        assert slot.params is not None
        if not vbd.state & VbdState.PAUSED:
            raise BlktapError(f"minor {minor} is not paused", errno.EINVAL)
        spec = (keep_valve(slot.params.spec, typed_spec(new_spec)) if new_spec
                else slot.params.spec)
        if vbd.read_only and secondary not in (None, NO_SECONDARY):
            raise BlktapError(f"minor {minor} is read-only: nothing to mirror", errno.EINVAL)
        mirror, explicit = self._mirror_for_resume(slot, spec != slot.params.spec, minor,
                                                   secondary, standby)
        for attempt in range(1, RESUME_ATTEMPTS + 1):
            try:
                driver = await self._open_stack(slot.params, spec)
                break
            except (OSError, BlktapError) as exc:
                if attempt == RESUME_ATTEMPTS:
                    vbd.state |= VbdState.RESUME_FAILED
                    raise
                log.warning("minor %d: reopening %s failed (%s), attempt %d of %d", minor,
                            spec, exc, attempt, RESUME_ATTEMPTS)
                await asyncio.sleep(RESUME_RETRY_INTERVAL)
        if mirror is not None and not mirror.failed:
            try:
                driver = await self._with_secondary(minor, driver, slot.params, mirror,
                                                    explicit=explicit)
            except BaseException:
                vbd.state |= VbdState.RESUME_FAILED
                raise
        try:
            # A log that cannot be used will not heal in a few seconds (sm writes it before
            # it unpauses): no retry; the stack is closed again.
            driver = await self._with_log(driver, logpath)
        except BaseException:
            vbd.state |= VbdState.RESUME_FAILED
            raise
        try:
            await vbd.resume(driver, name=spec)
        except BaseException:
            vbd.state |= VbdState.RESUME_FAILED
            await self._close_all(driver)
            raise
        slot.params.spec = spec
        slot.params.logpath = logpath
        slot.mirror = mirror
        if mirror is not None:
            slot.params.secondary, slot.params.standby = mirror.spec, mirror.mode is Mode.STANDBY
        else:
            slot.params.secondary, slot.params.standby = None, False
        assert slot.nbd is not None
        slot.nbd.export.description = spec
        log.info("minor %d: resumed on %s%s%s", minor, spec,
                 f" with CBT log {logpath}" if logpath else "",
                 "" if mirror is None else f", secondary {mirror.spec} ({mirror.mode.value}, "
                 f"{mirror.phase.value})")

    # ------------------------------------------------------------------ secondary
    def enospc_marker(self, minor: int) -> str:
        """The file touched when a leaf runs out of space (the reference's
        ``/run/tapdisk-enospc<minor>``: beside the runtime directory)."""
        return os.path.join(os.path.dirname(self.run_dir.path), f"tapdisk-enospc{minor}")

    def _new_mirror(self, minor: int, spec: str, standby: bool) -> MirrorState:
        marker = self.enospc_marker(minor)

        def touch() -> None:
            self.precious = True
            with open(marker, "a"):
                pass
            os.utime(marker)

        def keep_log() -> None:
            self.precious = True

        return MirrorState(spec, Mode.STANDBY if standby else Mode.MIRROR, on_enospc=touch,
                           on_failure=keep_log)

    def _mirror_for_resume(self, slot: Slot, new_leaf: bool, minor: int,
                           secondary: str | None, standby: bool
                           ) -> tuple[MirrorState | None, bool]:
        """The secondary a resume serves with, and whether it was named now."""
        old = slot.mirror
        holds_writes = old is not None and old.phase is Phase.FAILED_OVER and not new_leaf
        if secondary is None:  # keep what there was
            if old is not None and new_leaf and old.phase is Phase.FAILED_OVER:
                # A new leaf after an ENOSPC: the toolstack has dealt with it.
                # A new state: the old one stays as it was if this resume fails.
                old = dataclasses.replace(old, phase=Phase.ACTIVE, moved=RangeSet(),
                                          failed_over_at=None)
            return old, False
        if holds_writes:
            assert old is not None
            raise BlktapError(f"minor {minor}: the secondary {old.spec} holds writes the "
                              f"leaf lacks (it failed over on ENOSPC); give a new leaf "
                              f"(-a) with the change", errno.EBUSY)
        if secondary == NO_SECONDARY:
            return None, False
        return self._new_mirror(minor, typed_spec(secondary), standby), True

    async def _with_secondary(self, minor: int, leaf: Driver, params: OpenParams,
                              mirror: MirrorState, *, explicit: bool) -> Driver:
        """``leaf`` with the secondary beside it. A secondary named in this request that
        cannot be opened fails the request (``leaf`` is closed); one kept from before is
        marked failed instead and the disk is served from the leaf, unless the leaf
        failed over to it (then it holds writes the leaf lacks: the request fails)."""
        try:
            sec = await self.engine.call(open_stack, self.engine, mirror.spec, writable=True,
                                         direct=params.direct)
        except (OSError, BlktapError) as exc:
            if explicit or mirror.phase is Phase.FAILED_OVER:
                await self._close_all(leaf)
                raise BlktapError(f"secondary {mirror.spec}: {exc}",
                                  getattr(exc, "errno", None) or errno.EIO) from exc
            mirror.fail("reopen", exc)
            return leaf
        try:
            self._check_not_itself(minor, leaf, sec, mirror.spec)
            return MirrorDriver(leaf, sec, mirror)
        except BlktapError:
            await self._close_all(sec)
            await self._close_all(leaf)
            raise

    def _check_not_itself(self, minor: int, leaf: Driver, sec: Driver, spec: str) -> None:
        """A secondary that is a file of the leaf's chain (written twice, or a parent
        written under its children) or this tapdisk's own NBD export (every write would
        come back to be mirrored again) is refused: EINVAL."""
        def ident(path: str) -> tuple[int, int] | None:
            try:
                st = os.stat(path)
            except (OSError, ValueError):
                return None
            return st.st_dev, st.st_ino

        mine = {i: d.path for d in leaf.chain() if d.path and (i := ident(d.path))}
        for d in sec.chain():
            paths = [d.path]
            client = getattr(d, "client", None)
            address = getattr(client, "address", None)
            if getattr(address, "unix", None):
                paths.append(address.unix)
            # What a passed socket is connected to, as the kernel says.
            paths.append(getattr(client, "peer_path", None))
            exports = {ident(self.nbd_path(minor)),
                       ident(self.run_dir.nbd_old_socket(self.pid, minor))} - {None}
            for path in paths:
                i = ident(path) if path else None
                if i is not None and i in mine:
                    raise BlktapError(f"secondary {spec} is {mine[i]}, of the disk's own "
                                      "chain", errno.EINVAL)
                if i is not None and i in exports:
                    raise BlktapError(f"secondary {spec} is this tapdisk's own NBD export",
                                      errno.EINVAL)

    @staticmethod
    async def _close_all(driver: Driver) -> None:
        try:
            await driver.close_chain()
        except (OSError, BlktapError) as exc:
            log.warning("closing %s: %s", driver.path or driver.name, exc)

    def set_limits(self, minor: int, text: str) -> Limits:
        """VALVE_SET: the minor's valve takes new limits at once (held requests are
        measured against them from now on); a paused disk gets them when it resumes.
        EINVAL for a disk opened without a valve or for limits that do not parse."""
        slot = self._slot(minor)
        vbd = self._open_vbd(minor)
        assert slot.params is not None
        if not slot.params.spec.startswith("valve:"):
            raise BlktapError(f"minor {minor} has no valve: open it as "
                              f"valve:LIMITS:{slot.params.spec}", errno.EINVAL)
        limits = Limits.parse(text)
        if not vbd.paused:
            for d in vbd.driver.chain():
                if isinstance(d, ValveDriver):
                    d.set_limits(limits)
                    break
        slot.params.spec = vbd.name = with_limits(slot.params.spec, limits)
        if slot.nbd is not None:
            slot.nbd.export.description = slot.params.spec
        log.info("minor %d: limits %s", minor, limits.text() or "(none)")
        return limits

    # ------------------------------------------------------------------ reports
    def list_replies(self, cookie: int) -> list[Message]:
        """One LIST_RSP per attached minor (``count`` counting down to 1), then the
        terminator (count 0, minor -1)."""
        slots = [self.slots[k] for k in sorted(self.slots)]
        out = [Message(MessageType.LIST_RSP, cookie,
                       m.ListEntry(len(slots) - i, s.minor, s.state, s.path[: m.PATH_LENGTH - 1]))
               for i, s in enumerate(slots)]
        out.append(Message(MessageType.LIST_RSP, cookie, m.ListEntry(0, -1, 0, "")))
        return out

    def _stats(self, slot: Slot) -> dict:
        if slot.vbd is None or slot.params is None:
            # What the reference reports for a VBD attached but not open.
            return {"name": "(null)", "secs": [0, 0], "images": [],
                    "FIXME_enospc_redirect_count": 0, "nbd_mirror_failed": 0,
                    "reqs_outstanding": 0, "read_caching": "false"}
        out = slot.vbd.stats_dict()
        out["read_caching"] = "false" if slot.params.direct else "true"
        mirror = slot.mirror
        if mirror is not None:
            out["FIXME_enospc_redirect_count"] = mirror.redirected
            out["nbd_mirror_failed"] = int(mirror.failed)
            out["mirror"] = mirror.as_dict()
        if slot.blkif is not None:
            out["xenblkif"] = slot.blkif.stats_dict()
        return add_loop_stats(out)

    def stats_text(self, minor: int) -> str:
        if minor == STATS_ALL:
            return format_stats([self._stats(s) for _, s in sorted(self.slots.items())])
        return format_stats(self._stats(self._slot(minor)))

    # ------------------------------------------------------------------ process
    async def shutdown(self) -> None:
        """Close every VBD consistently (SIGTERM, or the last detach), then the socket."""
        if self._ctl_task is not None:
            self._ctl_task.cancel()
            self._ctl_task = None
        if self._ctl is not None:
            close_listener(self._ctl, self.control_path)
            self._ctl = None
        if self._fd_client is not None:
            await self._fd_client.stop()
            self._fd_client = None
        for task in list(self._clients):
            task.cancel()
        for minor in sorted(self.slots):
            slot = self.slots[minor]
            if slot.vbd is not None and slot.vbd.stats.watchdog_stalls:
                self.precious = True
            try:
                if slot.vbd is not None:
                    await self.close(minor)
            except (OSError, BlktapError) as exc:
                self.precious = True
                log.error("closing %s: %s", slot, exc)
        for minor in sorted(self.slots):
            try:
                await self.detach(minor)
            except (OSError, BlktapError) as exc:
                log.error("detaching minor %d: %s", minor, exc)
        passed_sockets().close_all()
        self.engine.close()

    async def run(self) -> None:
        """Serve until the last VBD is detached, or SIGINT/SIGTERM."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.done.set)
        loop.add_signal_handler(signal.SIGUSR1, self.dump)
        try:
            await self.done.wait()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
                loop.remove_signal_handler(sig)

    def dump(self) -> None:
        """SIGUSR1: the state of every VBD into the log (and the log is kept)."""
        self.precious = True
        log.warning("debug dump: pid %d, %d minors", self.pid, len(self.slots))
        for minor, slot in sorted(self.slots.items()):
            if slot.vbd is None:
                log.warning("minor %d: attached, not open", minor)
                continue
            log.warning("minor %d: %s state=%#x %s", minor, slot.path, slot.state,
                        format_stats(self._stats(slot)))


__all__ = ["OpenParams", "Slot", "Tapdisk"]
