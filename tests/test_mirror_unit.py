"""The mirror filter in-process, under a VBD, with a small in-memory driver that fails on
demand: the corners the daemon tests do not reach (a secondary without write-zeroes or
FUA, a flush that fails, a leaf error that is not ENOSPC, block status and the side
doors after a fail-over, a cancelled request)."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Sequence

import pytest

from blktap.errors import BlktapError
from blktap.tapdisk.driver import STATE_DATA, STATE_HOLE, STATE_ZERO, Caps, Driver, Extents
from blktap.tapdisk.mirror import MirrorDriver, MirrorState, Mode, Phase
from blktap.tapdisk.vbd import VBD
from conftest import with_engine

KiB = 1 << 10
SIZE = 256 * KiB


class Mem(Driver):
    """A disk in a bytearray; ``errors`` maps an operation name to the errno it raises;
    ``gate`` (an Event), when set up, holds writes until it is set."""

    name = "mem"

    def __init__(self, engine, caps: Caps, size: int = SIZE) -> None:  # type: ignore[no-untyped-def]
        super().__init__(engine, size, writable=True)
        self.caps = caps
        self.data = bytearray(size)
        self.written = bytearray(size)  # 1 where written
        self.errors: dict[str, int] = {}
        self.calls: list[str] = []
        self.gate: asyncio.Event | None = None

    def _maybe_fail(self, op: str) -> None:
        self.calls.append(op)
        if op in self.errors:
            raise OSError(self.errors[op], f"{op} failed")

    async def read(self, offset: int, iov: Sequence[memoryview]) -> None:
        self._maybe_fail("read")
        pos = offset
        for v in iov:
            v[:] = self.data[pos:pos + len(v)]
            pos += len(v)

    async def write(self, offset: int, iov: Sequence[memoryview], *, fua: bool = False) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self._maybe_fail("write_fua" if fua else "write")
        pos = offset
        for v in iov:
            self.data[pos:pos + len(v)] = v
            self.written[pos:pos + len(v)] = b"\1" * len(v)
            pos += len(v)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = True,
                           fast: bool = False, fua: bool = False) -> None:
        self._maybe_fail("write_zeroes")
        self.data[offset:offset + length] = bytes(length)

    async def flush(self) -> None:
        self._maybe_fail("flush")

    async def discard(self, offset: int, length: int) -> None:
        self._maybe_fail("discard")
        self.data[offset:offset + length] = bytes(length)

    async def block_status(self, offset: int, length: int) -> Extents:
        # Holes where never written, at 4 KiB granularity.
        flags = STATE_DATA if self.written[offset] else STATE_HOLE | STATE_ZERO
        n = 1
        while n < length and bool(self.written[offset + n]) == bool(self.written[offset]):
            n += 1
        return [(n, flags)]


FULL = Caps.WRITE | Caps.FLUSH | Caps.FUA | Caps.TRIM | Caps.ZERO | Caps.BLOCK_STATUS


def setup(engine, sec_caps: Caps = FULL, mode: Mode = Mode.MIRROR  # type: ignore[no-untyped-def]
          ) -> tuple[VBD, Mem, Mem, MirrorState, list[str]]:
    leaf, sec = Mem(engine, FULL), Mem(engine, sec_caps)
    events: list[str] = []
    state = MirrorState("mem:sec", mode, on_enospc=lambda: events.append("enospc"),
                        on_failure=lambda: events.append("failed"))
    vbd = VBD(MirrorDriver(leaf, sec, state), name="t")
    return vbd, leaf, sec, state, events


def test_secondary_without_zeroes_fua_or_trim() -> None:
    async def body(engine) -> None:  # type: ignore[no-untyped-def]
        vbd, leaf, sec, state, _ = setup(engine, Caps.WRITE | Caps.FLUSH)
        assert not vbd.caps & Caps.TRIM and vbd.caps & Caps.FUA and vbd.caps & Caps.ZERO
        sec.data[:] = b"\x55" * SIZE
        await vbd.write(0, memoryview(b"\x01" * 8 * KiB), fua=True)
        await vbd.write_zeroes(4 * KiB, 4 * KiB)
        assert sec.calls == ["write", "flush", "write"]  # FUA: write + flush; zeroes: written
        assert leaf.calls == ["write_fua", "write_zeroes"]
        assert sec.data[:8 * KiB] == leaf.data[:8 * KiB] == b"\x01" * 4 * KiB + bytes(4 * KiB)
        await vbd.discard(0, 64 * KiB)  # not offered: a hint dropped for both
        assert "discard" not in leaf.calls and state.phase is Phase.ACTIVE
        await vbd.close()
    with_engine(body)


def test_secondary_flush_failure_marks_failed_and_flush_succeeds() -> None:
    async def body(engine) -> None:  # type: ignore[no-untyped-def]
        vbd, leaf, sec, state, events = setup(engine)
        sec.errors["flush"] = errno.EIO
        await vbd.write(0, memoryview(b"\x02" * 4096))
        await vbd.flush()
        assert state.failed and "flush" in state.error and events == ["failed"]
        sec.calls.clear()
        await vbd.write(4096, memoryview(b"\x03" * 4096))
        assert sec.calls == [] and leaf.data[4096:8192] == b"\x03" * 4096
        await vbd.close()
    with_engine(body)


def test_leaf_error_not_enospc_fails_the_write() -> None:
    """EIO on the leaf is the write's error (the secondary got it too: harmless); the
    mirror stays active."""
    async def body(engine) -> None:  # type: ignore[no-untyped-def]
        vbd, leaf, sec, state, _ = setup(engine)
        leaf.errors["write"] = errno.EIO
        with pytest.raises(OSError) as exc:
            await vbd.write(0, memoryview(b"\x04" * 4096))
        assert exc.value.errno == errno.EIO and state.phase is Phase.ACTIVE
        await vbd.close()
    with_engine(body)


def test_both_fail_reports_the_leaf_error() -> None:
    async def body(engine) -> None:  # type: ignore[no-untyped-def]
        vbd, leaf, sec, state, _ = setup(engine)
        leaf.errors["write"] = errno.ENOSPC
        sec.errors["write"] = errno.EIO
        with pytest.raises(OSError) as exc:
            await vbd.write(0, memoryview(b"\x05" * 4096))
        assert exc.value.errno == errno.ENOSPC and state.failed
        await vbd.close()
    with_engine(body)


def test_standby_failover_reads_block_status_side_doors() -> None:
    async def body(engine) -> None:  # type: ignore[no-untyped-def]
        vbd, leaf, sec, state, events = setup(engine, mode=Mode.STANDBY)
        await vbd.write(0, memoryview(b"\x06" * 16 * KiB))
        assert sec.calls == []  # standby: not written
        leaf.errors["write"] = errno.ENOSPC
        await vbd.write(8 * KiB, memoryview(b"\x07" * 4 * KiB))
        assert state.phase is Phase.FAILED_OVER and events == ["enospc"]
        assert state.redirected == 1 and state.moved.bytes == 4 * KiB
        out = bytearray(16 * KiB)
        await vbd.read(0, memoryview(out))
        assert out == b"\x06" * 8 * KiB + b"\x07" * 4 * KiB + b"\x06" * 4 * KiB
        # The moved range reads as data, the rest as the leaf says.
        assert await vbd.block_status(8 * KiB, 8 * KiB) == [(4 * KiB, STATE_DATA)]
        ext = await vbd.block_status(0, 64 * KiB)
        assert ext[0] == (8 * KiB, STATE_DATA)
        # The side doors decline once failed over (reads must split).
        assert not vbd.read_now(0, memoryview(bytearray(4096)))
        assert not vbd.write_now(0, memoryview(bytearray(4096)))
        await vbd.flush()
        assert "flush" in sec.calls
        await vbd.close()
    with_engine(body)


def test_cancelled_write_waits_for_both() -> None:
    """A caller cancelled while the secondary's write is held: CancelledError reaches it
    only once neither driver holds its buffer."""
    async def body(engine) -> None:  # type: ignore[no-untyped-def]
        vbd, leaf, sec, state, _ = setup(engine)
        sec.gate = asyncio.Event()
        task = asyncio.get_running_loop().create_task(vbd.write(0, memoryview(b"\x08" * 4096)))
        while "write" not in leaf.calls:
            await asyncio.sleep(0.001)
        task.cancel()
        await asyncio.sleep(0.01)
        assert not task.done()  # the secondary still holds the buffer
        sec.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        await vbd.close()
    with_engine(body)


def test_size_and_read_only_secondary_refused() -> None:
    async def body(engine) -> None:  # type: ignore[no-untyped-def]
        leaf = Mem(engine, FULL)
        with pytest.raises(BlktapError) as exc:
            MirrorDriver(leaf, Mem(engine, FULL, SIZE // 2), MirrorState("x", Mode.MIRROR))
        assert exc.value.errno == errno.EINVAL
        ro = Mem(engine, FULL)
        ro.writable = False
        with pytest.raises(BlktapError) as exc:
            MirrorDriver(leaf, ro, MirrorState("x", Mode.MIRROR))
        assert exc.value.errno == errno.EROFS
    with_engine(body)
