"""tapback's state machine, driven through a fake xenstored and a fake tapdisk control socket.

The "toolstack" and the "frontend" are the test writing into the fake xenstored the way
libxl and xen-blkfront do (README of the xen testbed, "XenStore handshake timeline").
"""

from __future__ import annotations

import asyncio
import errno
import os

import pytest

from blktap.control import message as cm
from blktap.errors import BlktapError
from blktap.tapback.daemon import Tapback
from blktap.tapback.link import ControlLink, parse_target
from blktap.tapback.vbd import Options
from blktap.tapback.xenstore import XenStore
from xen_fakes import XS_WRITE, FakeTapdisk, FakeXenstored

DEVID = 51712
PID = 4242


STOP_LIMIT = 20.0  # seconds tapback's stop may take in these tests


class Rig:
    def __init__(self, fake: FakeXenstored, td: FakeTapdisk, xs: XenStore, name: str) -> None:
        self.fake, self.td, self.xs, self.name = fake, td, xs, name
        self.tb: Tapback | None = None
        self.task: asyncio.Task | None = None

    # ------------------------------------------------------------- tapback
    async def start(self, options: Options | None = None, only: int | None = None) -> None:
        self.tb = Tapback(self.xs, ControlLink(timeout=5), options or Options(), self.name, only)
        await self.tb.start()
        self.task = asyncio.get_running_loop().create_task(self.tb.run())

    async def stop(self) -> None:
        assert self.tb is not None and self.task is not None
        self.tb.stop()
        await self.task
        self.tb = self.task = None

    # ------------------------------------------------------------- the other parties
    def be(self, domid: int, devid: int = DEVID) -> str:
        return f"/local/domain/0/backend/{self.name}/{domid}/{devid}"

    def fe(self, domid: int, devid: int = DEVID) -> str:
        return f"/local/domain/{domid}/device/vbd/{devid}"

    def add(self, domid: int, devid: int = DEVID, mode: str = "w", kind: str = "disk",
            extra: dict[str, str] | None = None) -> None:
        """What libxl writes in its transaction (all keys there before the first event)."""
        be, fe = self.be(domid, devid), self.fe(domid, devid)
        keys = {f"{fe}/backend": be, f"{fe}/backend-id": "0", f"{fe}/virtual-device": str(devid),
                f"{fe}/device-type": kind, f"{fe}/state": "1",
                f"{be}/frontend": fe, f"{be}/frontend-id": str(domid),
                f"{be}/params": "/img", f"{be}/mode": mode, f"{be}/type": "phy",
                f"{be}/online": "1", f"{be}/device-type": kind, f"{be}/discard-enable": "1",
                f"{be}/state": "1"}
        keys.update(extra or {})
        for path, value in keys.items():
            self.fake._write(self.fake.tree, path, value.encode())
        self.fake.generation += 1
        for path in keys:
            self.fake._fire(path, False)

    def hotplug(self, domid: int, devid: int = DEVID, minor: int = 0) -> None:
        self.fake.write(f"{self.be(domid, devid)}/physical-device-path", self.td.nbd_path(minor))
        self.fake.write(f"{self.be(domid, devid)}/hotplug-status", "connected")

    def front_init(self, domid: int, devid: int = DEVID, grefs: tuple[int, ...] = (8,),
                   port: int = 5, proto: str | None = "x86_64-abi", order: int | None = None,
                   extra: dict[str, str] | None = None, state: str = "3") -> None:
        fe = self.fe(domid, devid)
        if order is None:
            self.fake.write(f"{fe}/ring-ref", str(grefs[0]))
        else:
            self.fake.write(f"{fe}/ring-page-order", str(order))
            for i, g in enumerate(grefs):
                self.fake.write(f"{fe}/ring-ref{i}", str(g))
        self.fake.write(f"{fe}/event-channel", str(port))
        if proto is not None:
            self.fake.write(f"{fe}/protocol", proto)
        self.fake.write(f"{fe}/feature-persistent", "1")
        for k, v in (extra or {}).items():
            self.fake.write(f"{fe}/{k}", v)
        self.fake.write(f"{fe}/state", state)

    def front_state(self, domid: int, state: int, devid: int = DEVID) -> None:
        self.fake.write(f"{self.fe(domid, devid)}/state", str(state))

    def state(self, domid: int, devid: int = DEVID) -> str | None:
        return self.fake.read(f"{self.be(domid, devid)}/state")

    def key(self, domid: int, key: str, devid: int = DEVID) -> str | None:
        return self.fake.read(f"{self.be(domid, devid)}/{key}")

    async def until(self, cond, what: str = "", timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not cond():
            if loop.time() > end:
                raise AssertionError(f"timed out waiting for {what}: "
                                     f"{self.fake.dump('/local/domain')}")
            await asyncio.sleep(0.01)

    async def settle(self) -> None:
        """Let every pending event be handled (a round trip through xenstored, twice)."""
        for _ in range(3):
            await self.xs.read_or("/local/domain/0/x")
            await asyncio.sleep(0.05)

    async def connect(self, domid: int, devid: int = DEVID, minor: int = 0, **front) -> None:
        self.add(domid, devid)
        await self.until(lambda: self.state(domid, devid) == "2", f"InitWait {domid}")
        self.hotplug(domid, devid, minor)
        self.front_init(domid, devid, **front)
        await self.until(lambda: self.state(domid, devid) == "4", f"Connected {domid}")


def run(tmp_path, body, name: str = "vbd3", disks: dict[int, int] | None = None,
        options: Options | None = None, timeout: float = 60.0):
    rundir = tmp_path / "run"
    rundir.mkdir(mode=0o700)

    async def main():
        fake = await FakeXenstored(str(tmp_path / "xs.sock")).start()
        td = FakeTapdisk(str(rundir), PID, disks or {0: 2048, 1: 4096, 2: 8, 3: 16})
        xs = await XenStore.open(fake.path)
        rig = Rig(fake, td, xs, name)
        try:
            await rig.start(options)
            await asyncio.wait_for(body(rig), timeout)
        finally:
            try:
                if rig.tb is not None:
                    # A stop that does not finish is a defect: fail, never hang the suite.
                    await asyncio.wait_for(rig.stop(), STOP_LIMIT)
            finally:
                await xs.close()
                td.close()
                await fake.stop()
    asyncio.run(main())


# ----------------------------------------------------------------------------- handshake
def test_full_handshake_and_close(tmp_path):
    async def body(r: Rig):
        r.add(1)
        await r.until(lambda: r.state(1) == "2", "InitWait")
        # what blkfront reads on InitWait is there, and only what we can serve (no tapdisk
        # is known yet: our own order 4)
        assert r.key(1, "max-ring-page-order") == "4"
        assert r.key(1, "feature-flush-cache") == "1"
        assert r.key(1, "feature-barrier") == "1"
        assert r.key(1, "feature-max-indirect-segments") == "256"
        assert r.key(1, "feature-persistent") == "0"
        assert r.key(1, "multi-queue-max-queues") is None
        assert r.td.log == []
        r.hotplug(1)
        r.front_init(1)
        await r.until(lambda: r.state(1) == "4", "Connected")
        ring = r.td.rings[(1, DEVID)]
        assert ring.gref[0] == 8 and ring.order == 0 and ring.port == 5 and ring.proto == 3
        assert ring.domid == 1 and ring.devid == DEVID
        assert (r.key(1, "sectors"), r.key(1, "sector-size"), r.key(1, "info")) == \
            ("2048", "512", "0")
        assert r.key(1, "feature-discard") == "1"
        assert r.key(1, "discard-granularity") == "4096"
        # the fake tapdisk answers DISK_INFO as the reference's: order 3 at most
        assert r.key(1, "max-ring-page-order") == "3"
        assert r.key(1, "discard-alignment") == "0"
        assert r.key(1, "kthread-pid") == str(PID)
        # guest shutdown: Closing, then Closed
        r.front_state(1, 5)
        await r.until(lambda: r.state(1) == "5", "Closing")
        assert (1, DEVID) not in r.td.rings
        r.front_state(1, 6)
        await r.until(lambda: r.state(1) == "6", "Closed")
        assert r.td.log == [("connect", 1, DEVID), ("disconnect", 1, DEVID)]
        # libxl removes the directory: the VBD is dropped, the directory not re-created
        r.fake.rm("/local/domain/0/backend/vbd3/1")
        r.fake.rm("/local/domain/1")
        await r.until(lambda: not r.tb.agents, "VBD dropped")
        await r.settle()
        assert r.fake.read(r.be(1)) is None
        assert r.td.log == [("connect", 1, DEVID), ("disconnect", 1, DEVID)]
    run(tmp_path, body)


def test_multi_page_ring(tmp_path):
    async def body(r: Rig):
        grefs = tuple(range(100, 108))
        await r.connect(1, order=3, grefs=grefs)
        ring = r.td.rings[(1, DEVID)]
        assert ring.order == 3 and ring.gref == grefs
    run(tmp_path, body)


def test_order_4_ring_with_a_tapdisk_that_takes_it(tmp_path):
    """Order 4 (16 pages, blkfront's largest): the 16 grant refs reach the tapdisk through
    our CONNECT extension (docs/protocols/control.md)."""
    async def body(r: Rig):
        r.td.max_ring_order = 4
        r.add(1)
        await r.until(lambda: r.state(1) == "2", "InitWait")
        r.hotplug(1)
        await r.until(lambda: r.key(1, "sectors") == "2048", "disk keys")
        assert r.key(1, "max-ring-page-order") == "4"
        grefs = tuple(range(200, 216))
        r.front_init(1, order=4, grefs=grefs)
        await r.until(lambda: r.state(1) == "4", "Connected")
        ring = r.td.rings[(1, DEVID)]
        assert ring.order == 4 and ring.gref == grefs
    run(tmp_path, body)


@pytest.mark.parametrize("tapdisk_maps,frontend,negotiated", [
    (True, "1", True), (True, "0", False), (False, "1", False)],
    ids=["both", "frontend-declines", "reference-tapdisk"])
def test_persistent_grants_negotiated(tmp_path, tapdisk_maps, frontend, negotiated):
    """tapback offers feature-persistent (by default) only to a tapdisk whose
    DISK_INFO_RSP says its ring maps grants (ours), and tells the tapdisk in CONNECT only
    when the frontend said feature-persistent too."""
    async def body(r: Rig):
        if tapdisk_maps:
            r.td.max_ring_order = 4
            r.td.features = cm.FEATURE_PERSISTENT_GRANTS
        await r.connect(1, extra={"feature-persistent": frontend})
        assert r.key(1, "feature-persistent") == ("1" if tapdisk_maps else "0")
        assert r.td.rings[(1, DEVID)].persistent_grants is negotiated
    run(tmp_path, body)


def test_no_persistent_grants(tmp_path):
    """tapback --no-persistent-grants: grant copy, whatever the tapdisk and the frontend
    can do."""
    from blktap.cli.tapback import _options, build_parser
    assert _options(build_parser().parse_args([])).persistent_grants is True
    assert _options(build_parser().parse_args(["--persistent-grants"])).persistent_grants
    assert not _options(build_parser().parse_args(["--no-persistent-grants"])).persistent_grants

    async def body(r: Rig):
        r.td.max_ring_order = 4
        r.td.features = cm.FEATURE_PERSISTENT_GRANTS
        await r.connect(1)
        assert r.key(1, "feature-persistent") == "0"
        assert r.td.rings[(1, DEVID)].persistent_grants is False
    run(tmp_path, body, options=Options(persistent_grants=False))


def test_a_reference_tapdisk_lowers_the_offer_before_the_frontend_reads_it(tmp_path):
    """A tapdisk named before InitWait (as sm does: tap-ctl create, then the VBD plug)
    that says nothing of orders gets order 3 offered, the reference's."""
    async def body(r: Rig):
        r.add(1, extra={f"{r.be(1)}/physical-device-path": r.td.nbd_path(0),
                        f"{r.be(1)}/hotplug-status": "connected"})
        await r.until(lambda: r.state(1) == "2", "InitWait")
        assert r.key(1, "max-ring-page-order") == "3"
    run(tmp_path, body)


def test_order_4_chosen_for_a_reference_tapdisk_is_refused_clearly(tmp_path, caplog):
    """The offer went out before the tapdisk was known and the frontend took order 4: the
    reference tapdisk cannot map 16 pages, so the guest gets Closing, and the log says why
    and what to do; nothing is sent to the tapdisk."""
    async def body(r: Rig):
        r.add(1)
        await r.until(lambda: r.state(1) == "2", "InitWait")
        r.front_init(1, order=4, grefs=tuple(range(200, 216)))
        r.hotplug(1)
        await r.until(lambda: r.state(1) == "5", "Closing")
        assert r.td.log == []
    with caplog.at_level("ERROR", logger="blktap.tapback"):
        run(tmp_path, body)
    assert "--max-ring-page-order 3" in caplog.text, caplog.text


def test_protocol_missing_means_x86_32(tmp_path):
    async def body(r: Rig):
        await r.connect(1, proto=None)
        assert r.td.rings[(1, DEVID)].proto == 2
        await r.connect(2, proto="x86_32-abi", minor=1)
        assert r.td.rings[(2, DEVID)].proto == 2
    run(tmp_path, body)


def test_frontend_ready_before_hotplug_waits_for_it(tmp_path):
    async def body(r: Rig):
        r.add(1)
        await r.until(lambda: r.state(1) == "2", "InitWait")
        r.front_init(1)
        await r.settle()
        assert r.state(1) == "2" and r.td.log == []
        r.fake.write(f"{r.be(1)}/physical-device-path", r.td.nbd_path(0))
        await r.settle()
        assert r.state(1) == "2"  # hotplug-status not yet connected
        r.fake.write(f"{r.be(1)}/hotplug-status", "connected")
        await r.until(lambda: r.state(1) == "4", "Connected")
    run(tmp_path, body)


def test_disk_known_before_initwait_is_advertised_with_it(tmp_path):
    async def body(r: Rig):
        # XenServer's way: the tapdisk exists before the backend directory
        r.add(1, extra={f"{r.be(1)}/physical-device-path": r.td.nbd_path(1),
                        f"{r.be(1)}/hotplug-status": "connected"})
        await r.until(lambda: r.state(1) == "2", "InitWait")
        assert r.key(1, "sectors") == "4096" and r.key(1, "feature-discard") == "1"
        r.front_init(1)
        await r.until(lambda: r.state(1) == "4", "Connected")
    run(tmp_path, body)


def test_read_only_and_cdrom_info_bits(tmp_path):
    async def body(r: Rig):
        r.add(1, mode="r")
        r.add(2, kind="cdrom")
        await r.until(lambda: r.state(1) == "2" and r.state(2) == "2", "InitWait")
        r.hotplug(1, minor=0)
        r.hotplug(2, minor=1)
        r.front_init(1)
        r.front_init(2)
        await r.until(lambda: r.state(1) == "4" and r.state(2) == "4", "Connected")
        assert r.key(1, "info") == "4" and r.key(1, "feature-discard") == "0"
        assert r.key(2, "info") == "1" and r.key(2, "feature-discard") == "0"
        assert r.key(1, "discard-granularity") is None
    run(tmp_path, body)


def test_toolstack_can_disable_discard(tmp_path):
    async def body(r: Rig):
        r.add(1, extra={f"{r.be(1)}/discard-enable": "0"})
        await r.until(lambda: r.state(1) == "2", "InitWait")
        r.hotplug(1)
        r.front_init(1)
        await r.until(lambda: r.state(1) == "4", "Connected")
        assert r.key(1, "feature-discard") == "0"
    run(tmp_path, body)


def test_options_change_what_is_offered(tmp_path):
    async def body(r: Rig):
        r.add(1)
        await r.until(lambda: r.state(1) == "2", "InitWait")
        assert r.key(1, "feature-barrier") == "0"
        assert r.key(1, "feature-flush-cache") == "0"
        # Asked for, but no tapdisk known yet that maps grants: not offered (yet).
        assert r.key(1, "feature-persistent") == "0"
        assert r.key(1, "max-ring-page-order") is None
        assert r.key(1, "feature-max-indirect-segments") is None
        r.hotplug(1)
        r.front_init(1, order=1, grefs=(1, 2))  # more than we offered
        await r.until(lambda: r.state(1) == "5", "Closing")
        assert r.td.log == []
    run(tmp_path, body, options=Options(barrier=False, flush=False, discard=False,
                                        max_ring_page_order=0, max_indirect_segments=0,
                                        persistent_grants=True))


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("front", [
    {"grefs": (0,), "extra": {"ring-ref": "abc"}},
    {"grefs": (0,), "extra": {"ring-ref": str(1 << 32)}},
    {"grefs": (0,), "extra": {"ring-ref": "-1"}},
    {"order": 9, "grefs": tuple(range(8))},  # absurd order
    {"order": 2, "grefs": (1, 2, 3)},  # ring-ref3 missing
    {"proto": "arm-abi"},
    {"extra": {"event-channel": ""}},
    {"extra": {"multi-queue-num-queues": "4"}},
], ids=["gref-text", "gref-2^32", "gref-negative", "order-9", "gref-missing", "protocol",
        "event-channel-empty", "multi-queue"])
def test_misbehaving_frontend_gets_closing_then_may_start_over(tmp_path, front):
    async def body(r: Rig):
        r.add(1)
        await r.until(lambda: r.state(1) == "2", "InitWait")
        r.hotplug(1)
        r.front_init(1, **front)
        await r.until(lambda: r.state(1) == "5", "Closing")
        assert r.td.log == []  # nothing reached the tapdisk
        r.front_state(1, 6)
        await r.until(lambda: r.state(1) == "6", "Closed")
        # the frontend is fixed (a new driver) and starts over
        for key in r.fake.ls(r.fe(1)):
            if key not in ("backend", "backend-id", "virtual-device", "device-type", "state"):
                r.fake.rm(f"{r.fe(1)}/{key}")
        r.front_state(1, 1)
        await r.until(lambda: r.state(1) == "2", "InitWait again")
        r.front_init(1)
        await r.until(lambda: r.state(1) == "4", "Connected")
    run(tmp_path, body)


def test_missing_event_channel_and_ring_ref(tmp_path):
    async def body(r: Rig):
        r.add(1)
        await r.until(lambda: r.state(1) == "2", "InitWait")
        r.hotplug(1)
        r.front_state(1, 3)  # Initialised with no ring keys at all
        await r.until(lambda: r.state(1) == "5", "Closing")
        assert r.td.log == []
    run(tmp_path, body)


def test_tapdisk_refusing_the_ring_closes_the_vbd_only(tmp_path):
    async def body(r: Rig):
        await r.connect(2, minor=1)
        r.td.connect_error = errno.EINVAL
        r.add(1)
        await r.until(lambda: r.state(1) == "2", "InitWait")
        r.hotplug(1)
        r.front_init(1)
        await r.until(lambda: r.state(1) == "5", "Closing")
        assert r.state(2) == "4"
        assert ("connect", 1, DEVID) in r.td.log
    run(tmp_path, body)


def test_unknown_minor_waits_for_a_good_physical_device(tmp_path):
    async def body(r: Rig):
        r.add(1)
        await r.until(lambda: r.state(1) == "2", "InitWait")
        r.fake.write(f"{r.be(1)}/physical-device-path", r.td.nbd_path(9))  # no such minor
        r.fake.write(f"{r.be(1)}/hotplug-status", "connected")
        r.front_init(1)
        await r.settle()
        assert r.state(1) == "2" and r.td.log == []
        r.fake.write(f"{r.be(1)}/physical-device-path", r.td.nbd_path(0))
        await r.until(lambda: r.state(1) == "4", "Connected")
    run(tmp_path, body)


def test_a_tapdisk_not_answering_yet_is_asked_again(tmp_path):
    async def body(r: Rig):
        r.add(1)
        await r.until(lambda: r.state(1) == "2", "InitWait")
        # names a tapdisk whose socket does not exist yet
        late = FakeTapdisk.__new__(FakeTapdisk)
        path = os.path.join(r.td.rundir, "nbd5151.0")
        r.fake.write(f"{r.be(1)}/physical-device-path", path)
        r.fake.write(f"{r.be(1)}/hotplug-status", "connected")
        r.front_init(1)
        await r.settle()
        assert r.state(1) == "2"
        # it comes up; no XenStore event tells tapback, the retry does
        late.__init__(r.td.rundir, 5151, {0: 64})
        try:
            await r.until(lambda: r.state(1) == "4", "Connected")
            assert r.key(1, "sectors") == "64"
        finally:
            late.close()
    run(tmp_path, body)


# ----------------------------------------------------------------------------- lifecycles
def test_backend_directory_vanishing_while_connected(tmp_path):
    async def body(r: Rig):
        await r.connect(1)
        r.fake.rm(r.be(1))
        await r.until(lambda: not r.tb.agents, "VBD dropped")
        assert r.td.log == [("connect", 1, DEVID), ("disconnect", 1, DEVID)]
        await r.settle()
        assert r.fake.read(r.be(1)) is None  # never written back into existence
    run(tmp_path, body)


def test_frontend_vanishing_disconnects(tmp_path):
    async def body(r: Rig):
        await r.connect(1)
        r.fake.rm("/local/domain/1")  # the domain died
        await r.until(lambda: r.state(1) == "6", "Closed")
        assert (1, DEVID) not in r.td.rings
    run(tmp_path, body)


def test_frontend_reinitialising_while_connected_starts_over(tmp_path):
    async def body(r: Rig):
        await r.connect(1)
        r.front_state(1, 1)  # the guest reloaded its driver without closing
        await r.until(lambda: r.state(1) == "2", "InitWait")
        assert (1, DEVID) not in r.td.rings
        r.front_init(1, grefs=(77,))
        await r.until(lambda: r.state(1) == "4", "Connected")
        assert r.td.rings[(1, DEVID)].gref[0] == 77
    run(tmp_path, body)


def test_several_domains_and_vbds_at_once(tmp_path):
    async def body(r: Rig):
        pairs = [(1, 51712, 0), (1, 51728, 1), (2, 51712, 2), (3, 768, 3)]
        for domid, devid, _ in pairs:
            r.add(domid, devid)
        await r.until(lambda: all(r.state(d, v) == "2" for d, v, _ in pairs), "InitWait")
        for domid, devid, minor in pairs:
            r.hotplug(domid, devid, minor)
            r.front_init(domid, devid, grefs=(devid + domid,), port=domid)
        await r.until(lambda: all(r.state(d, v) == "4" for d, v, _ in pairs), "Connected")
        for domid, devid, _ in pairs:
            assert r.td.rings[(domid, devid)].gref[0] == devid + domid
        assert r.key(3, "sectors", 768) == "16"
        r.front_state(1, 6, 51728)
        await r.until(lambda: r.state(1, 51728) == "6", "Closed")
        assert sorted(r.td.rings) == [(1, 51712), (2, 51712), (3, 768)]
    run(tmp_path, body)


def test_restart_takes_over_connected_vbds(tmp_path):
    async def body(r: Rig):
        await r.connect(1)
        r.add(2)
        await r.until(lambda: r.state(2) == "2", "InitWait")
        await r.stop()
        assert r.td.rings  # the data path stays up while tapback is away
        r.hotplug(2, minor=1)
        r.front_init(2)  # the second guest goes on while we are away
        writes_before = sum(1 for op, _ in r.fake.requests if op == XS_WRITE)
        await r.start()
        await r.until(lambda: r.state(2) == "4", "Connected after restart")
        assert r.td.log.count(("connect", 1, DEVID)) == 2  # asked again: EALREADY
        writes = [p for op, p in r.fake.requests[:] if op == XS_WRITE][writes_before:]
        assert not any(p.startswith(r.be(1)) for p in writes)  # VBD 1 left as it was
        r.front_state(1, 5)  # and the new instance still releases the old ring
        await r.until(lambda: r.state(1) == "5", "Closing")
        assert (1, DEVID) not in r.td.rings
    run(tmp_path, body)


def test_restart_when_the_frontend_closed_meanwhile(tmp_path):
    async def body(r: Rig):
        await r.connect(1)
        await r.stop()
        r.front_state(1, 6)
        await r.start()
        await r.until(lambda: r.state(1) == "6", "Closed")
        assert (1, DEVID) not in r.td.rings
    run(tmp_path, body)


def test_restart_after_the_toolstack_wrote_closing(tmp_path):
    async def body(r: Rig):
        await r.connect(1)
        await r.stop()
        # the guest died while we were away: libxl writes online=0 and state=5 itself
        r.fake.write(f"{r.be(1)}/online", "0")
        r.fake.write(f"{r.be(1)}/state", "5")
        r.fake.rm("/local/domain/1")
        await r.start()
        await r.until(lambda: (1, DEVID) not in r.td.rings, "ring released")
        await r.until(lambda: r.state(1) == "6", "Closed")
        r.fake.rm(r.be(1))
        await r.until(lambda: not r.tb.agents, "VBD dropped")
    run(tmp_path, body)


def test_one_domain_only(tmp_path):
    async def body(r: Rig):
        await r.stop()
        await r.start(only=2)
        r.add(1)
        r.add(2)
        await r.until(lambda: r.state(2) == "2", "InitWait")
        await r.settle()
        assert r.state(1) == "1"
        # the domain goes: the one-domain tapback exits, as the reference's slave does
        r.fake.rm("/local/domain/0/backend/vbd3/2")
        await asyncio.wait_for(r.task, 10)
        r.tb = r.task = None
    run(tmp_path, body)


def test_backend_type_name(tmp_path):
    async def body(r: Rig):
        await r.connect(4)
        assert r.be(4).startswith("/local/domain/0/backend/vbd/")
    run(tmp_path, body, name="vbd")


def test_xenstored_going_away_ends_the_daemon(tmp_path):
    async def body(r: Rig):
        await r.connect(1)
        r.fake.drop_connections()
        await asyncio.wait_for(r.task, 10)
        r.tb = r.task = None
        assert r.td.rings  # the ring is left to the tapdisk
    run(tmp_path, body)


# ----------------------------------------------------------------------------- locating
def test_parse_target():
    t = parse_target("/run/blktap-control/nbd123.4")
    assert (t.rundir, t.tid, t.minor) == ("/run/blktap-control", 123, 4)

    def lookup(minor, rundir):
        return parse_target(f"/x/nbd9.{minor}")
    assert parse_target("/run/blktap-control/tapdisk/tapdisk-7", None, lookup).minor == 7
    assert parse_target(None, "fe:3", lookup).minor == 3
    for bad in [("/dev/sda", None), (None, "zz"), (None, "3")]:
        with pytest.raises(BlktapError) as e:
            parse_target(*bad, lookup)
        assert e.value.errno == errno.EINVAL
    with pytest.raises(BlktapError) as e:
        parse_target(None, None)
    assert e.value.errno == errno.ENOENT
    assert os.sep == "/"


# ----------------------------------------------------------------------------- the command
def test_tapback_command_serves_and_exits_0_on_sigterm(tmp_path):
    import signal
    import sys

    rundir = tmp_path / "run"
    rundir.mkdir(mode=0o700)
    ready = tmp_path / "ready"

    async def main():
        fake = await FakeXenstored(str(tmp_path / "xs.sock")).start()
        td = FakeTapdisk(str(rundir), PID, {0: 2048})
        env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), "..", "src"))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "blktap.cli.tapback", "-d", "-v", "-n", "vbd",
            "--xenstore", fake.path, "--ready-file", str(ready), env=env,
            stderr=asyncio.subprocess.PIPE)
        try:
            r = Rig(fake, td, None, "vbd")  # type: ignore[arg-type]
            await r.until(ready.exists, "ready file", 30)
            await r.connect(3)
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, err.decode()
            assert b"3/51712: connected" in err
            assert td.rings  # left to the tapdisk
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            td.close()
            await fake.stop()
    asyncio.run(main())


def test_tapback_command_daemonizes(tmp_path):
    import signal
    import sys

    pidfile = tmp_path / "tapback.pid"

    async def main():
        fake = await FakeXenstored(str(tmp_path / "xs.sock")).start()
        env = dict(os.environ, PYTHONPATH=os.path.join(os.path.dirname(__file__), "..", "src"))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "blktap.cli.tapback", "--xenstore", fake.path,
            "--pidfile", str(pidfile), env=env, stderr=asyncio.subprocess.PIPE)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, err.decode()  # back once the daemon watches
            pid = int(pidfile.read_text())
            assert any(tok == "tapback-backend" for c in fake.conns for _, tok in c.watches)
            os.kill(pid, signal.SIGTERM)
            for _ in range(300):
                if not pidfile.exists():
                    break
                await asyncio.sleep(0.05)
            assert not pidfile.exists()  # removed on the way out
        finally:
            await fake.stop()
    asyncio.run(main())
