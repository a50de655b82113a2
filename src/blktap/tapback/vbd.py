"""The backend state machine of one virtual block device (``backend/<type>/<domid>/<devid>``).

Each step reads what XenStore says now (the backend directory, the frontend's state) and
acts on it from the phase the VBD is in, so that a missed or merged watch event costs
nothing: the next step sees the same facts. Steps of one VBD never overlap (the daemon runs
them from one task per VBD); VBDs proceed independently.

Phases (ours; the XenbusState we write is in brackets):

    NEW ──advertise──► INIT_WAIT [2] ──frontend 3/4, hotplug done, tapdisk found,
     │                     ▲          XENBLKIF_CONNECT, one transaction──► CONNECTED [4]
     │ (restart: adopt     │ frontend 1 (it starts again)                      │
     │  what XenStore      │                                                   │
     │  says)              CLOSED [6] ◄── frontend 6/0/gone ── CLOSING [5] ◄── frontend 5
     ▼                                                          (a bad frontend: 5 too)
    GONE: the backend directory vanished (disconnected first; the daemon drops the VBD)

- Before InitWait we write what the guest reads when it sees InitWait: the ring keys
  (``max-ring-page-order``), the features (flush, barrier, indirect segments, persistent
  grants as configured), and the disk's size when the tapdisk is already known. The size
  and discard keys are written again in the transaction that sets Connected, because with
  xl the hotplug script that names the tapdisk runs only after InitWait.
- Every write to the backend directory is a transaction that first checks the directory
  still exists: a write after the toolstack removed it would create it again.
- Frontend faults (missing or malformed ring keys, an order above what we offered, an
  unknown protocol) and a tapdisk refusing the ring put the VBD in Closing with a log line,
  which the guest sees as a failed device rather than a hang.
"""

from __future__ import annotations

import enum
import errno
import logging
from dataclasses import dataclass, field

from blktap.control import message as m
from blktap.errors import BlktapError, XenStoreError
from blktap.tapback.link import TapdiskLink, Target
from blktap.tapback.xenstore import Tx, XenStore

log = logging.getLogger("blktap.tapback")


class XenbusState(enum.IntEnum):
    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8


class Phase(enum.Enum):
    NEW = "new"
    INIT_WAIT = "init-wait"
    CONNECTED = "connected"
    CLOSING = "closing"
    CLOSED = "closed"
    GONE = "gone"


# blkif protocol numbers of the XENBLKIF_CONNECT payload
PROTO_NATIVE, PROTO_X86_32, PROTO_X86_64 = 1, 2, 3
PROTOCOLS = {"x86_32-abi": PROTO_X86_32, "x86_64-abi": PROTO_X86_64}
# VDISK_* bits of "info"
VDISK_CDROM, VDISK_REMOVABLE, VDISK_READONLY = 1, 2, 4
U32 = 0xFFFFFFFF
DISCARD_GRANULARITY = 4096  # what a punched hole frees on the file systems images live on


@dataclass(frozen=True)
class Options:
    """What this tapback offers guests (the command line's choices)."""

    # Our tapdisk takes order 4 (16 pages, Linux blkfront's largest); a tapdisk that does not
    # say so in DISK_INFO_RSP (the reference's) gets at most order 3, what its CONNECT carries.
    max_ring_page_order: int = m.MAX_RING_ORDER
    barrier: bool = True  # -b/--nobarrier turns it off
    flush: bool = True
    discard: bool = True
    max_indirect_segments: int = 256
    # Offered only to a tapdisk whose DISK_INFO_RSP says its ring maps them (ours): they
    # cut its CPU per request by a third in the Xen testbed (docs/protocols/xen-blkif.md)
    persistent_grants: bool = True
    require_hotplug: bool = True  # wait for hotplug-status=connected, as the reference


class FrontendError(BlktapError):
    """The frontend wrote something we cannot use."""

    default_errno = errno.EINVAL


@dataclass
class Snapshot:
    """What XenStore says about one VBD at one moment."""

    exists: bool
    keys: dict[str, str] = field(default_factory=dict)  # backend keys we look at
    frontend_state: int | None = None

    @property
    def state(self) -> int | None:
        return _int_or_none(self.keys.get("state"))


_BACKEND_KEYS = ("state", "frontend", "frontend-id", "physical-device-path", "physical-device",
                 "hotplug-status", "mode", "online", "discard-enable", "polling-duration",
                 "polling-idle-threshold", "pool")


def _int_or_none(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip(), 10)
    except ValueError:
        return None


def _u32(text: str | None, what: str) -> int:
    if text is None:
        raise FrontendError(f"frontend did not write {what}", errno.ENOENT)
    try:
        value = int(text.strip(), 0)
    except ValueError:
        raise FrontendError(f"frontend wrote {what}={text!r}: not a number") from None
    if not 0 <= value <= U32:
        raise FrontendError(f"frontend wrote {what}={text!r}: out of range")
    return value


class Vbd:
    """One VBD: ``path`` is its backend directory."""

    def __init__(self, xs: XenStore, link: TapdiskLink, options: Options, path: str,
                 domid: int, devid: int) -> None:
        self.xs, self.link, self.options = xs, link, options
        self.path, self.domid, self.devid = path, domid, devid
        self.phase = Phase.NEW
        self.frontend: str | None = None  # the frontend directory, once read
        self.target: Target | None = None
        self.target_key: tuple[str | None, str | None] | None = None
        self.disk: m.Image | None = None
        self.connected = False  # the tapdisk serves the ring (as far as we know)
        self.frontend_seen = False
        self.device_type: str | None = None  # the frontend's device-type (disk, cdrom)
        self.last_error: str | None = None
        self.retry = False  # the last step met a tapdisk error worth trying again

    def __repr__(self) -> str:
        return f"<Vbd {self.domid}/{self.devid} {self.phase.value}>"

    @property
    def name(self) -> str:
        return f"{self.domid}/{self.devid}"

    # ------------------------------------------------------------------ reading
    async def snapshot(self) -> Snapshot:
        try:
            names = set(await self.xs.directory(self.path))
        except XenStoreError as exc:
            if exc.errno == errno.ENOENT:
                return Snapshot(False)
            raise
        keys: dict[str, str] = {}
        for key in _BACKEND_KEYS:
            if key in names:
                value = await self.xs.read_or(f"{self.path}/{key}")
                if value is not None:
                    keys[key] = value
        snap = Snapshot(True, keys)
        front = keys.get("frontend")
        if front and self.frontend is None:
            self.frontend = front
        if self.frontend:
            state = await self.xs.read_or(f"{self.frontend}/state")
            snap.frontend_state = _int_or_none(state) if state is not None else None
            if state is not None:
                self.frontend_seen = True
        return snap

    # ------------------------------------------------------------------ the step
    async def step(self) -> Phase:
        """Look at XenStore and do what the phase calls for; returns the new phase."""
        self.retry = False
        snap = await self.snapshot()
        if not snap.exists:
            await self._gone()
            return self.phase
        await self._locate(snap)  # first: InitWait then carries the disk's size, if known
        if self.phase is Phase.NEW:
            await self._adopt(snap)
        fs = snap.frontend_state
        if fs is None or fs == XenbusState.UNKNOWN:
            if self.frontend_seen and self.phase is not Phase.CLOSED:
                log.info("%s: frontend gone", self.name)
                await self._close(XenbusState.CLOSED)
            return self.phase
        if fs == XenbusState.INITIALISING:
            if self.phase in (Phase.CLOSED, Phase.CONNECTED):
                # The frontend starts over (a reloaded driver, kexec): so do we.
                log.info("%s: frontend initialising again", self.name)
                await self._disconnect()
                await self._advertise(snap)
        elif fs in (XenbusState.INITIALISED, XenbusState.CONNECTED):
            if self.phase is Phase.INIT_WAIT and self._ready(snap):
                await self._connect(snap)
        elif fs == XenbusState.CLOSING:
            if self.phase not in (Phase.CLOSING, Phase.CLOSED):
                await self._close(XenbusState.CLOSING)
        elif fs == XenbusState.CLOSED:
            if self.phase is not Phase.CLOSED:
                await self._close(XenbusState.CLOSED)
        return self.phase

    async def _adopt(self, snap: Snapshot) -> None:
        """First look at a VBD: start it, or take it over where a previous tapback left
        it (its rings keep running in the tapdisks while tapback restarts)."""
        state = snap.state
        if state is None or state <= XenbusState.INITIALISING:
            await self._advertise(snap)
            return
        if state in (XenbusState.INIT_WAIT, XenbusState.INITIALISED):
            self.phase = Phase.INIT_WAIT
        elif state == XenbusState.CONNECTED:
            # Connected before our restart: XENBLKIF_CONNECT again answers EALREADY when the
            # tapdisk still serves the ring (the step below sends it), and a frontend that
            # closes meanwhile must still get its ring released.
            self.phase = Phase.INIT_WAIT
            self.connected = self.frontend_seen = True
        elif state == XenbusState.CLOSING:
            # Written by us after releasing the ring, or by the toolstack (libxl writes it
            # when the domain goes) while the ring was still up: release it to be sure.
            self.phase = Phase.CLOSING
            self.connected = self.frontend_seen = True  # a frontend that is gone now is gone
        else:
            self.phase = Phase.CLOSED
        log.info("%s: found in state %s, taken over as %s", self.name, state,
                 self.phase.value)

    def _ready(self, snap: Snapshot) -> bool:
        if self.options.require_hotplug and snap.keys.get("hotplug-status") != "connected":
            return False
        return self.target is not None and self.disk is not None

    async def _locate(self, snap: Snapshot) -> None:
        """Find the tapdisk and its disk once the toolstack names it."""
        key = (snap.keys.get("physical-device-path"), snap.keys.get("physical-device"))
        if key == (None, None) or key == self.target_key:
            return
        if self.connected and self.target is not None:
            log.warning("%s: physical device changed to %s while connected; ignored",
                        self.name, key[0] or key[1])
            return
        self.target_key = key
        try:
            target = await self.link.locate(*key)
            disk = await self.link.disk_info(target)
        except BlktapError as exc:
            # Try again later (and on the next event): a tapdisk still starting, or too
            # busy to answer in time, must not leave the guest waiting for ever.
            self.target = self.disk = None
            self.target_key = None
            self.retry = True
            if str(exc) != self.last_error:
                log.warning("%s: cannot use the tapdisk at %s: %s", self.name,
                            key[0] or key[1], exc)
            self.last_error = str(exc)
            return
        if disk.sectors <= 0 or disk.sector_size <= 0 or disk.sector_size % 512:
            log.warning("%s: tapdisk reports %d sectors of %d bytes", self.name, disk.sectors,
                        disk.sector_size)
        self.target, self.disk = target, disk
        log.info("%s: tapdisk %d minor %d, %d sectors of %d bytes", self.name, target.tid,
                 target.minor, disk.sectors, disk.sector_size)
        if self.phase is Phase.INIT_WAIT and not self.connected:
            # The guest reads these only when we go Connected, but tools like to see them;
            # and a tapdisk taking smaller rings than we offered lowers the offer while the
            # frontend may not have read it yet (the check at connect covers the rest).
            keys = self._disk_keys(snap)
            if self._ring_order_offer() < self.options.max_ring_page_order:
                keys["max-ring-page-order"] = str(self._ring_order_offer())
            await self._write_backend(keys)

    # ------------------------------------------------------------------ actions
    def _feature_keys(self) -> dict[str, str]:
        o = self.options
        keys = {
            "feature-barrier": "1" if o.barrier else "0",
            "feature-flush-cache": "1" if o.flush else "0",
            "feature-persistent": "1" if self._persistent_offer() else "0",
        }
        if self._ring_order_offer() > 0:
            keys["max-ring-page-order"] = str(self._ring_order_offer())
        if o.max_indirect_segments > 0:
            keys["feature-max-indirect-segments"] = str(o.max_indirect_segments)
        return keys

    def _persistent_offer(self) -> bool:
        """Persistent grants are offered when asked for and the tapdisk maps grants."""
        return (self.options.persistent_grants and self.disk is not None
                and bool(self.disk.features & m.FEATURE_PERSISTENT_GRANTS))

    def _tapdisk_ring_order(self) -> int | None:
        """The largest ring order the located tapdisk takes; None while none is located."""
        if self.disk is None:
            return None
        if self.disk.max_ring_order is None:
            return m.REFERENCE_RING_ORDER
        return self.disk.max_ring_order

    def _ring_order_offer(self) -> int:
        taken = self._tapdisk_ring_order()
        offer = self.options.max_ring_page_order
        return offer if taken is None else min(offer, taken)

    def _info(self, snap: Snapshot) -> int:
        info = self.disk.info if self.disk is not None else 0
        if snap.keys.get("mode", "w").startswith("r"):
            info |= VDISK_READONLY
        if self.device_type == "cdrom":
            info |= VDISK_CDROM
        return info

    def _disk_keys(self, snap: Snapshot) -> dict[str, str]:
        if self.disk is None:
            return {}
        info = self._info(snap)
        keys = {"sectors": str(self.disk.sectors), "sector-size": str(self.disk.sector_size),
                "info": str(info)}
        if self.target is not None:
            keys["kthread-pid"] = str(self.target.tid)
        can_discard = (self.options.discard and snap.keys.get("discard-enable", "1") != "0"
                       and not info & (VDISK_READONLY | VDISK_CDROM))
        keys["feature-discard"] = "1" if can_discard else "0"
        if can_discard:
            keys["discard-granularity"] = str(max(DISCARD_GRANULARITY, self.disk.sector_size))
            keys["discard-alignment"] = "0"
            keys["discard-secure"] = "0"
        return keys

    async def _write_backend(self, keys: dict[str, str]) -> bool:
        """Write ``keys`` into the backend directory in one transaction, unless it is gone
        (returns False then)."""
        async def body(tx: Tx) -> bool:
            if not await tx.exists(self.path):
                return False
            for key, value in keys.items():
                await tx.write(f"{self.path}/{key}", value)
            return True
        return await self.xs.transact(body)

    async def _switch(self, state: XenbusState, extra: dict[str, str] | None = None) -> bool:
        keys = dict(extra or {})
        keys["state"] = str(int(state))
        done = await self._write_backend(keys)
        if done:
            log.info("%s: backend state %d (%s)", self.name, state, state.name.lower())
        return done

    async def _advertise(self, snap: Snapshot) -> None:
        if self.frontend:
            self.device_type = await self.xs.read_or(f"{self.frontend}/device-type")
        keys = self._feature_keys()
        keys.update(self._disk_keys(snap))
        if await self._switch(XenbusState.INIT_WAIT, keys):
            self.phase = Phase.INIT_WAIT

    async def _read_frontend(self) -> tuple[tuple[int, ...], int, int, int, bool]:
        """(grant refs, order, event channel, protocol, persistent grants agreed) from the
        frontend directory."""
        assert self.frontend is not None
        fe = self.frontend

        async def get(key: str) -> str | None:
            return await self.xs.read_or(f"{fe}/{key}")

        queues = await get("multi-queue-num-queues")
        if queues is not None and _u32(queues, "multi-queue-num-queues") > 1:
            raise FrontendError(f"frontend asks for {queues} queues; we offered one")
        order_text = await get("ring-page-order")
        order = 0 if order_text is None else _u32(order_text, "ring-page-order")
        if order > self.options.max_ring_page_order:
            raise FrontendError(f"frontend asks for ring-page-order {order}; we offered "
                                f"{self.options.max_ring_page_order}")
        taken = self._tapdisk_ring_order()
        if taken is not None and order > taken:
            raise FrontendError(
                f"frontend chose ring-page-order {order}, which tapdisk "
                f"{self.target.tid if self.target else '?'} does not take (at most {taken}; "
                f"with the reference tapdisk run tapback --max-ring-page-order "
                f"{m.REFERENCE_RING_ORDER})")
        if order == 0 and order_text is None:
            grefs = [_u32(await get("ring-ref"), "ring-ref")]
        else:
            grefs = [_u32(await get(f"ring-ref{i}"), f"ring-ref{i}") for i in range(1 << order)]
        port = _u32(await get("event-channel"), "event-channel")
        proto_text = await get("protocol")
        if proto_text is None:
            proto = PROTO_X86_32  # blkback's default on x86 when the frontend says nothing
        elif proto_text in PROTOCOLS:
            proto = PROTOCOLS[proto_text]
        else:
            raise FrontendError(f"frontend protocol {proto_text!r} is not one we speak")
        persistent = await get("feature-persistent") == "1" and self._persistent_offer()
        return tuple(grefs), order, port, proto, persistent

    async def _connect(self, snap: Snapshot) -> None:
        assert self.target is not None and self.disk is not None
        if self.frontend:
            self.device_type = await self.xs.read_or(f"{self.frontend}/device-type")
        try:
            grefs, order, port, proto, persistent = await self._read_frontend()
        except FrontendError as exc:
            self.last_error = str(exc)
            log.error("%s: %s", self.name, exc)
            await self._fail()
            return
        blkif = m.Blkif(
            domid=self.domid, devid=self.devid,
            gref=grefs + (0,) * (m.REFERENCE_RING_PAGES - len(grefs)), order=order,
            proto=proto,
            pool=snap.keys.get("pool", "")[:m.STRING_LENGTH - 1], port=port,
            poll_duration=_int_or_none(snap.keys.get("polling-duration")) or 0,
            poll_idle_threshold=_int_or_none(snap.keys.get("polling-idle-threshold")) or 0,
            persistent_grants=persistent)
        try:
            fresh = await self.link.connect(self.target, blkif)
        except BlktapError as exc:
            self.last_error = str(exc)
            log.error("%s: tapdisk %d refused the ring: %s", self.name, self.target.tid, exc)
            await self._fail()
            return
        self.connected = True
        if not fresh:
            log.info("%s: tapdisk %d already serves the ring", self.name, self.target.tid)
            if snap.state == XenbusState.CONNECTED:
                self.phase = Phase.CONNECTED  # as we left it: nothing to write
                return
        try:
            keys = self._feature_keys()
            keys.update(self._disk_keys(snap))
            done = await self._switch(XenbusState.CONNECTED, keys)
        except BaseException:
            await self._disconnect()
            raise
        if not done:
            await self._gone()
            return
        self.phase = Phase.CONNECTED
        log.info("%s: connected: order %d, event channel %d, %s%s", self.name, order, port,
                 {PROTO_X86_32: "x86_32", PROTO_X86_64: "x86_64"}.get(proto, proto),
                 ", persistent grants" if persistent else "")

    async def _fail(self) -> None:
        """Give up on this frontend until it starts over: Closing tells the guest."""
        await self._disconnect()
        if await self._switch(XenbusState.CLOSING):
            self.phase = Phase.CLOSING

    async def _disconnect(self) -> None:
        if not self.connected or self.target is None:
            self.connected = False
            return
        try:
            await self.link.disconnect(self.target, self.domid, self.devid)
            log.info("%s: tapdisk %d released the ring", self.name, self.target.tid)
        except BlktapError as exc:
            if exc.errno not in (errno.ENOENT, errno.ESRCH, errno.ECONNREFUSED, errno.ENODEV):
                log.error("%s: tapdisk %d did not release the ring: %s", self.name,
                          self.target.tid, exc)
        self.connected = False

    async def _close(self, state: XenbusState) -> None:
        await self._disconnect()
        if await self._switch(state):
            self.phase = Phase.CLOSED if state == XenbusState.CLOSED else Phase.CLOSING

    async def _gone(self) -> None:
        if self.phase is not Phase.GONE:
            log.info("%s: backend directory removed", self.name)
        await self._disconnect()
        self.phase = Phase.GONE
