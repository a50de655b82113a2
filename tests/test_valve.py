"""The valve filter, its token buckets and the rate groups of ``blktap rated``.

No assertion here depends on how fast the machine is: the buckets and the valve take an
injected clock and sleep (time advances only when the valve sleeps), so the time a
transfer takes at a rate is computed, not measured. The measured rates (fio through a
limited disk) are in docs/filters.md.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from blktap.errors import BlktapError, UsageError
from blktap.io import ThreadEngine
from blktap.io.iov import total, zero_fill
from blktap.rated.client import GroupMember
from blktap.rated.group import Group
from blktap.rated.server import RatedServer
from blktap.tapdisk.driver import Caps, Driver
from blktap.tapdisk.drivers import open_stack
from blktap.tapdisk.drivers.valve import ValveDriver, keep_valve
from blktap.tapdisk.ratelimit import Limits, TokenBucket
from blktap.tapdisk.vbd import VBD

KiB, MiB = 1 << 10, 1 << 20


class FakeTime:
    """A clock that moves only when the valve sleeps (``hold``: sleeps never end, until
    cancelled, so a test can act while a request is held)."""

    def __init__(self, hold: bool = False) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self.hold = hold

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.hold:
            await asyncio.Event().wait()
        self.now += seconds
        await asyncio.sleep(0)


class Recorder(Driver):
    """A disk that records what reaches it, in order."""

    name = "recorder"

    def __init__(self, size: int = 64 * MiB) -> None:
        super().__init__(None, size, writable=True)  # type: ignore[arg-type]
        self.caps = Caps.WRITE | Caps.FLUSH
        self.ops: list[tuple[str, int]] = []

    async def read(self, offset: int, iov: Sequence[memoryview]) -> None:
        zero_fill(iov)
        self.ops.append(("read", offset))

    async def write(self, offset: int, iov: Sequence[memoryview], *, fua: bool = False) -> None:
        self.ops.append(("write", offset))

    async def flush(self) -> None:
        self.ops.append(("flush", 0))


def buf(n: int = 64 * KiB) -> list[memoryview]:
    return [memoryview(bytearray(n))]


def valve(limits: str, t: FakeTime, below: Driver | None = None) -> ValveDriver:
    return ValveDriver(None, below or Recorder(), Limits.parse(limits),  # type: ignore[arg-type]
                       clock=t.clock, sleep=t.sleep)


# ---------------------------------------------------------------------- limits
def test_limits_parse_and_spell() -> None:
    lim = Limits.parse("rate=20M, iops=500,burst=4M,iops-burst=50,group=backup")
    assert (lim.rate, lim.iops, lim.burst, lim.iops_burst, lim.group) == (
        20 * MiB, 500, 4 * MiB, 50, "backup")
    assert Limits.parse(lim.text()) == lim
    assert Limits.parse("") == Limits() and not Limits().limited
    assert Limits.parse("shared").group == "shared"  # the reference's valve:NAME
    assert Limits.parse("rate=10M").bytes_capacity == MiB  # default burst: 0.1 s
    assert Limits.parse("iops=5").iops_capacity == 1


@pytest.mark.parametrize("text", ["rate=fast", "rate=", "speed=1M", "rate=1M,rate=2M",
                                  "iops=1.5", "group=../etc", "group=a/b", "burst=-1"])
def test_bad_limits_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError) as info:
        Limits.parse(text)
    assert info.value.errno == errno.EINVAL


def test_token_bucket_burst_then_rate() -> None:
    t = FakeTime()
    b = TokenBucket(1000, 300, t.clock)
    assert b.delay(300) == 0  # a full bucket: a burst passes
    b.take(300)
    assert b.delay(100) == pytest.approx(0.1)
    t.now = 0.1
    assert b.delay(100) == 0
    b.take(100)
    # A cost larger than the bucket waits for a full bucket, then leaves a debt.
    assert b.delay(5000) == pytest.approx(0.3)
    t.now = 0.4
    b.take(5000)
    assert b.delay(1) == pytest.approx(4.701)
    # A new rate counts from now on; unlimited never waits.
    b.set(2000, 300)
    assert b.delay(1) == pytest.approx(4.701 / 2)
    b.set(0, 300)
    assert b.delay(10**9) == 0


# ---------------------------------------------------------------------- the filter
def _run(coro_fn):  # noqa: ANN001, ANN202
    return asyncio.run(coro_fn())


def test_rate_limit_takes_the_computed_time() -> None:
    """4 MiB in 64 KiB writes at 1 MiB/s with a 256 KiB burst: the burst passes at once,
    the rest at the rate: 3.75 s of the valve's clock, and every request completes."""
    async def body() -> None:
        t = FakeTime()
        v = valve("rate=1M,burst=256K", t)
        await asyncio.gather(*(v.write(i * 64 * KiB, buf()) for i in range(64)))
        assert t.now == pytest.approx(3.75)
        assert v.passed == [64, 4 * MiB]
        rec = v.parent
        assert [off for _, off in rec.ops] == [i * 64 * KiB for i in range(64)]  # in order
        await v.close()
    _run(body)


def test_iops_limit() -> None:
    async def body() -> None:
        t = FakeTime()
        v = valve("iops=100,iops-burst=10", t)
        await asyncio.gather(*(v.read(0, buf(4096)) for _ in range(110)))
        assert t.now == pytest.approx(1.0)  # 10 at once, 100 more at 100/s
        await v.close()
    _run(body)


def test_a_burst_passes_without_waiting() -> None:
    async def body() -> None:
        t = FakeTime()
        v = valve("rate=1M,burst=1M", t)
        await asyncio.gather(*(v.write(i * 64 * KiB, buf()) for i in range(16)))
        assert t.sleeps == [] and v.held == [0, 0]
        # The next one waits: the bucket is empty.
        await v.write(0, buf())
        assert t.sleeps == [pytest.approx(64 * KiB / MiB)]
        await v.close()
    _run(body)


def test_live_change_takes_effect() -> None:
    """2 MiB at 1 MiB/s, then the rate is raised to 4 MiB/s: the next 2 MiB take a
    quarter of the time."""
    async def body() -> None:
        t = FakeTime()
        v = valve("rate=1M,burst=64K", t)
        await asyncio.gather(*(v.write(i * 64 * KiB, buf()) for i in range(32)))
        first = t.now
        assert first == pytest.approx((2 * MiB - 64 * KiB) / MiB)
        v.set_limits(Limits.parse("rate=4M,burst=64K"))
        await asyncio.gather(*(v.write(i * 64 * KiB, buf()) for i in range(32)))
        assert t.now - first == pytest.approx(2 * MiB / (4 * MiB))
        await v.close()
    _run(body)


def test_live_change_releases_a_held_request() -> None:
    """A request held at a very low rate is let through when the limit is lifted; the
    valve's clock never moves (the sleep it was in is abandoned)."""
    async def body() -> None:
        t = FakeTime(hold=True)
        v = valve("rate=1K,burst=1K", t)
        await v.write(0, buf(1024))
        held = asyncio.ensure_future(v.write(0, buf()))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not held.done() and v.held[0] == 1 and t.sleeps
        v.set_limits(Limits())
        await asyncio.wait_for(held, 5)
        assert t.now == 0 and v.held[0] == 0
        await v.close()
    _run(body)


def test_no_reordering_across_a_flush() -> None:
    """Held writes, a flush and requests after it reach the disk in the order they came:
    the flush (which costs nothing) waits for the writes before it, and nothing behind
    it overtakes it."""
    async def body() -> None:
        t = FakeTime()
        v = valve("rate=1M,burst=64K", t)
        rec = v.parent
        ops = [v.write(0, buf()), v.write(64 * KiB, buf()), v.flush(),
               v.write(128 * KiB, buf()), v.read(0, buf()), v.flush()]
        await asyncio.gather(*ops)
        assert rec.ops == [("write", 0), ("write", 64 * KiB), ("flush", 0),
                           ("write", 128 * KiB), ("read", 0), ("flush", 0)]
        await v.close()
    _run(body)


def test_a_cancelled_request_leaves_the_line_and_takes_nothing() -> None:
    async def body() -> None:
        t = FakeTime(hold=True)
        v = valve("rate=1K,burst=1K", t)
        await v.write(0, buf(1024))
        held = asyncio.ensure_future(v.write(0, buf()))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
        assert v.held[0] == 0 and v.passed[0] == 1 and len(v.parent.ops) == 1
        await v.close()
    _run(body)


def test_side_door_respects_the_limit() -> None:
    async def body() -> None:
        t = FakeTime()
        below = Recorder()
        below.read_now = lambda off, iov, tally: (zero_fill(iov), True)[1]  # type: ignore[method-assign]
        v = valve("rate=1M,burst=128K", t, below)
        tally: list = []
        assert v.read_now(0, buf(), tally) and v.read_now(0, buf(), tally)
        assert not v.read_now(0, buf(), tally)  # empty bucket: the coroutine waits
        assert v.passed == [2, 128 * KiB]
        await v.close()
    _run(body)


def test_valve_spec_through_the_registry_and_vbd(tmp_path: Path) -> None:
    """``valve:LIMITS:TYPE:PATH`` opens the inner stack with a valve on top; the data
    passes unchanged."""
    img = tmp_path / "d.img"
    data = os.urandom(MiB)
    img.write_bytes(data)

    async def body() -> None:
        engine = ThreadEngine(2)
        try:
            d = open_stack(engine, f"valve:rate=64M,iops=10000:aio:{img}", writable=True,
                           direct=False)
            assert isinstance(d, ValveDriver) and d.parent is not None
            assert d.size == MiB and d.limits.rate == 64 * MiB
            vbd = VBD(d, name="t")
            out = bytearray(MiB)
            await vbd.read(0, memoryview(out))
            assert out == data
            await vbd.write(4096, memoryview(b"x" * 4096))
            await vbd.flush()
            stats = vbd.stats_dict()
            assert [i["driver"]["name"] for i in stats["images"]] == ["valve", "aio"]
            assert stats["images"][0]["driver"]["status"]["limits"] == "rate=64M,iops=10000"
            await vbd.close()
        finally:
            engine.close()
        assert img.read_bytes()[4096:8192] == b"x" * 4096
    _run(body)


@pytest.mark.parametrize("spec", ["valve:rate=1M", "valve:rate=zz:aio:/x", "valve::"])
def test_bad_valve_specs(spec: str) -> None:
    async def body() -> None:
        engine = ThreadEngine(1)
        try:
            with pytest.raises(BlktapError) as info:
                open_stack(engine, spec, writable=False)
            assert info.value.errno == errno.EINVAL
        finally:
            engine.close()
    _run(body)


def test_keep_valve_on_a_new_leaf() -> None:
    assert keep_valve("valve:rate=1M:vhd:/a", "vhd:/b") == "valve:rate=1M:vhd:/b"
    assert keep_valve("valve:rate=1M:vhd:/a", "valve:iops=5:vhd:/b") == "valve:iops=5:vhd:/b"
    assert keep_valve("vhd:/a", "vhd:/b") == "vhd:/b"


# ---------------------------------------------------------------------- groups
def test_group_shares_fairly() -> None:
    t = FakeTime()
    g = Group(rate=1000, cap=100, clock=t.clock)
    g.join("a")
    g.join("b")
    g.report("a", 10_000, 0)
    g.report("b", 10_000, 0)
    t.now = 1.0
    grants = g.distribute()
    assert grants == {"a": 550, "b": 550}  # the kept 100 and a second's 1000, halved
    # b needs little: what it does not take goes to a (water filling).
    g.report("b", 100, 0)
    t.now = 2.0
    assert g.distribute() == {"a": 900, "b": 100}
    assert g.tokens < 1


def test_group_credit_handed_back_goes_to_the_others() -> None:
    """A member that leaves (a paused disk) hands back its unused credit; the others get
    it at once, without waiting for the rate."""
    t = FakeTime()
    g = Group(rate=1000, cap=0, clock=t.clock)
    g.join("a")
    g.join("b")
    g.report("b", 5000, 0)
    g.report("a", 0, 700)
    g.leave("a")
    assert g.distribute() == {"b": 700}
    assert g.returned == 700


def test_leaky_group_keeps_nothing() -> None:
    t = FakeTime()
    g = Group(rate=1000, cap=0, clock=t.clock)
    g.join("a")
    t.now = 5.0
    assert g.distribute() == {}
    g.report("a", 10_000, 0)
    t.now = 5.5
    assert g.distribute() == {"a": 500}


async def _until(pred, what: str, limit: float = 10.0) -> None:  # noqa: ANN001
    """Wait for a condition the code under test will make true (bounded: a bug fails
    the test instead of hanging it)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not pred():
        assert loop.time() < end, f"never: {what}"
        await asyncio.sleep(0.01)


def test_two_disks_in_one_group_share_its_credit(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Two valves in one ``blktap rated`` group: every byte either passes was granted by
    the group (none passes on its own), both were served, and a valve that closes
    (as a pause closes the stack) hands its unused credit back to the group."""
    monkeypatch.setenv("BLKTAP_RATELIMIT_DIR", str(tmp_path))

    async def body() -> None:
        server = RatedServer(rate=256 * MiB, cap=0)
        await server.start(str(tmp_path / "g"))
        try:
            a = ValveDriver(None, Recorder(), Limits.parse("g"))  # type: ignore[arg-type]
            b = ValveDriver(None, Recorder(), Limits.parse("group=g"))  # type: ignore[arg-type]
            await asyncio.gather(*(v.write(i * 64 * KiB, buf()) for v in (a, b)
                                   for i in range(64)))
            for v in (a, b):
                assert v.group is not None
                assert v.passed[1] == 4 * MiB
                assert v.group.granted - v.group.credit == 4 * MiB  # spent what it got
            assert server.members_seen == 2
            # a asks for credit it will not use, then closes: it goes back to the group.
            assert a.group is not None
            member = a.group
            member.want(MiB)
            await _until(lambda: member.credit >= MiB, "credit granted")
            unused = member.credit
            await a.close()
            await _until(lambda: server.group.returned == unused, "credit returned")
            await _until(lambda: len(server.group.need) == 1, "a left the group")
            await b.close()
        finally:
            await server.stop()
    _run(body)


def test_group_member_waits_for_a_daemon_that_is_not_there(tmp_path: Path) -> None:
    """No daemon: requests wait (never fail); once it starts, they pass. Past the grace
    without a daemon, they pass on the disk's own limits (a disk, and its close, must
    not hang because a daemon is gone)."""
    import blktap.rated.client as client_mod

    async def body() -> None:
        old = client_mod.RECONNECT
        client_mod.RECONNECT = 0.05
        try:
            path = str(tmp_path / "late")
            v = ValveDriver(None, Recorder(), Limits.parse(f"group={path}"))  # type: ignore[arg-type]
            pending = asyncio.ensure_future(v.write(0, buf()))
            await asyncio.sleep(0.2)
            assert not pending.done()
            server = RatedServer(rate=64 * MiB, cap=0)
            await server.start(path)
            try:
                await asyncio.wait_for(pending, 10)
                await v.close()
            finally:
                await server.stop()
            old_grace = client_mod.GRACE
            client_mod.GRACE = 0.3
            try:
                w = ValveDriver(None, Recorder(),  # type: ignore[arg-type]
                                Limits.parse(f"group={tmp_path}/never"))
                await asyncio.wait_for(asyncio.gather(*(w.write(0, buf())
                                                        for _ in range(4))), 10)
                assert w.passed == [4, 256 * KiB] and w.group is not None
                assert w.group.granted == 0
                await w.close()
            finally:
                client_mod.GRACE = old_grace
        finally:
            client_mod.RECONNECT = old
    _run(body)


def test_member_reports_are_levels(tmp_path: Path) -> None:
    """A member's need is a level: saying it again asks for nothing more."""
    async def body() -> None:
        server = RatedServer(rate=1 << 40, cap=0)
        await server.start(str(tmp_path / "g"))
        try:
            m = GroupMember(str(tmp_path / "g"))
            m.start()
            await _until(lambda: m.connected, "connected")
            m.want(1000)
            m.want(1000)
            await _until(lambda: m.credit >= 1000, "granted")
            await asyncio.sleep(0.05)
            assert m.granted == 1000
            # Spent, the same level again is a new want (the daemon lowered it by the
            # grant): it must be asked for, or a valve waits forever.
            m.spend(1000)
            m.want(1000)
            await _until(lambda: m.credit >= 1000, "granted again")
            assert m.granted == 2000
            await m.close()
        finally:
            await server.stop()
    _run(body)


def test_garbage_from_a_member_disconnects_it_only(tmp_path: Path) -> None:
    import socket as socket_mod

    async def body() -> None:
        server = RatedServer(rate=1 << 30, cap=0)
        path = str(tmp_path / "g")
        await server.start(path)
        try:
            good = GroupMember(path)
            good.start()
            await _until(lambda: good.connected, "connected")
            bad = socket_mod.socket(socket_mod.AF_UNIX)
            bad.connect(path)
            bad.sendall(b"\xff" * 16)  # need = 2**64-1
            await _until(lambda: len(server.group.need) == 1, "bad member dropped")
            bad.close()
            good.want(4096)
            await _until(lambda: good.credit >= 4096, "the good member served")
            await good.close()
        finally:
            await server.stop()
    _run(body)


def test_rated_refuses_a_second_daemon_on_a_live_socket(tmp_path: Path) -> None:
    async def body() -> None:
        one = RatedServer(rate=MiB, cap=0)
        await one.start(str(tmp_path / "g"))
        try:
            with pytest.raises(OSError) as info:
                await RatedServer(rate=MiB, cap=0).start(str(tmp_path / "g"))
            assert info.value.errno == errno.EADDRINUSE
        finally:
            await one.stop()
    _run(body)


def test_group_needs_a_rate() -> None:
    with pytest.raises(ValueError):
        Group(0, 0, lambda: 0.0)
    assert total(buf()) == 64 * KiB


# ---------------------------------------------------------------------- tapdisk, tap-ctl
def test_tapdisk_valve_set_live_and_across_pause(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """VALVE_SET changes the open valve at once and the spec LIST shows; a pause hands
    the group credit back and leaves the group; resume (also on a new leaf) keeps the
    limits. A disk without a valve, or bad limits: EINVAL, nothing changed."""
    from blktap.control import message as m
    from blktap.control.message import Message, MessageType
    from blktap.control.rundir import RunDir
    from blktap.daemon.tapdisk import OpenParams, Tapdisk

    monkeypatch.setenv("BLKTAP_RATELIMIT_DIR", str(tmp_path))
    img, other, plain = (tmp_path / n for n in ("d.img", "e.img", "p.img"))
    for f in (img, other, plain):
        f.write_bytes(bytes(MiB))

    async def body() -> None:
        server = RatedServer(rate=1 << 40, cap=0)
        await server.start(str(tmp_path / "g"))
        rd = RunDir(str(tmp_path / "run"))
        td = Tapdisk(rd, threads=2)
        try:
            minor, _ = rd.allocate()
            await td.attach(minor)
            vbd = await td.open(minor, OpenParams(f"valve:rate=10M:aio:{img}"))
            valve_of = lambda: vbd.driver  # noqa: E731
            assert isinstance(valve_of(), ValveDriver)

            async def ask(text: str) -> Message:
                [r] = await td.handle(Message(MessageType.VALVE_SET, minor, m.Text(text)))
                return r

            r = await ask("rate=20M,iops=300,group=g")
            assert r.type is MessageType.VALVE_SET_RSP
            assert valve_of().limits == Limits(rate=20 * MiB, iops=300, group="g")
            assert td.slots[minor].path == f"valve:rate=20M,iops=300,group=g:aio:{img}"
            await vbd.write(0, memoryview(b"y" * 4096))  # through the group
            assert server.members_seen == 1
            r = await ask("rate=lots")
            assert isinstance(r.payload, m.Response) and r.payload.error == errno.EINVAL
            assert valve_of().limits.rate == 20 * MiB

            await td.pause(minor)
            await _until(lambda: not server.group.need, "the paused disk left the group")
            assert (await ask("rate=5M")).type is MessageType.VALVE_SET_RSP
            await td.resume(minor, f"aio:{other}")  # a new leaf keeps the valve
            assert td.slots[minor].path == f"valve:rate=5M:aio:{other}"
            assert valve_of().limits == Limits(rate=5 * MiB)

            m2, _ = rd.allocate()
            await td.attach(m2)
            await td.open(m2, OpenParams(f"aio:{plain}"))
            [r] = await td.handle(Message(MessageType.VALVE_SET, m2, m.Text("rate=1M")))
            assert isinstance(r.payload, m.Response) and r.payload.error == errno.EINVAL
            # A plain path inside the valve is refused as any untyped spec is.
            m3, _ = rd.allocate()
            await td.attach(m3)
            with pytest.raises(BlktapError) as info:
                await td.open(m3, OpenParams(f"valve:rate=1M:{plain}"))
            assert info.value.errno == errno.EINVAL
        finally:
            await td.shutdown()
            await server.stop()
    _run(body)


def test_tap_ctl_valve_and_blktap_rated(tmp_path: Path) -> None:
    """tap-ctl valve against a spawned tapdisk, in a group served by ``blktap rated``:
    the limits show in list and stats, bad input gets EINVAL, the help text is the
    reference's."""
    import json
    import signal
    import subprocess

    from conftest import tool
    from test_tap_ctl_daemon import Host

    host = Host(tmp_path)
    host.env["BLKTAP_RATELIMIT_DIR"] = str(tmp_path / "rl")
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4 * MiB))
    rated = subprocess.Popen([tool("blktap"), "rated", "grp", "--rate", "64M"],
                             env=host.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        assert rated.stdout is not None
        assert rated.stdout.readline().strip() == str(tmp_path / "rl" / "grp")
        pid, minor = host.create(f"valve:group=grp:aio:{disk}")
        p, mi = str(pid), str(minor)
        host.out("valve", "-p", p, "-m", mi, "-l", "rate=8M,group=grp")
        [entry] = host.listing()
        assert entry["args"] == f"valve:rate=8M,group=grp:aio:{disk}"
        stats = json.loads(host.out("stats", "-p", p, "-m", mi))
        status = stats["images"][0]["driver"]["status"]
        assert stats["images"][0]["driver"]["type"] == 14 and status["rate"] == 8 * MiB
        host.serving(pid, minor, 4 * MiB)
        code, _, err = host.tap_ctl("valve", "-p", p, "-m", mi, "-l", "rate=x", ok=False)
        assert (code, err) == (errno.EINVAL, "Invalid argument\n")
        code, _, err = host.tap_ctl("valve", "-p", p, "-m", mi, ok=False)
        assert code == errno.EINVAL and err.startswith("usage: valve")
        assert "valve" not in host.out()  # the command list stays the reference's
        host.out("destroy", "-p", p, "-m", mi)
    finally:
        rated.send_signal(signal.SIGTERM)
        assert rated.wait(30) == 0
        rated.stdout.close()  # type: ignore[union-attr]
        rated.stderr.close()  # type: ignore[union-attr]
    assert not (tmp_path / "rl" / "grp").exists()


# ---------------------------------------------------------------------- blktap serve
def test_serve_limit(tmp_path: Path) -> None:
    """``blktap serve --limit``: a bad limit is one line and exit 22 before anything is
    opened; a good one serves the same bytes through the valve."""
    from conftest import need, run, tool
    from nbd_helpers import serve

    raw = tmp_path / "d.img"
    data = os.urandom(MiB)
    raw.write_bytes(data)
    res = run([tool("blktap"), "serve", f"aio:{raw}", "--limit", "rate=quick",
               "--socket", str(tmp_path / "s.sock")], text=True, timeout=60)
    assert res.returncode == errno.EINVAL and res.stdout == ""
    assert res.stderr.startswith("blktap: rate: 'quick' is not a size")
    assert not (tmp_path / "s.sock").exists()
    nbdcopy = need("nbdcopy")
    with serve(f"aio:{raw}", tmp_path, "--limit", "rate=64M,iops=5000") as srv:
        res = run([nbdcopy, srv.uri, str(tmp_path / "out.img")], text=True)
        assert res.returncode == 0, res.stderr
        assert srv.stop(2) == 0
    assert (tmp_path / "out.img").read_bytes() == data
