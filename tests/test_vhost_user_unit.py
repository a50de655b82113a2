"""vhost-user-blk back-end without a guest: a test front-end (tests/vhost_front.py) with
RAM in a memfd drives negotiation, the rings and every request type over a socketpair,
and feeds it the bad input a hostile guest or front-end could send."""

from __future__ import annotations

import os
import random
import socket
import struct
from pathlib import Path

import pytest

from vhost_front import (
    ADD_MEM_REG,
    ADDR,
    F_INDIRECT,
    F_NEXT,
    F_WRITE,
    GET_CONFIG,
    GET_FEATURES,
    GET_INFLIGHT_FD,
    GET_PROTOCOL_FEATURES,
    GET_QUEUE_NUM,
    GET_VRING_BASE,
    GPA,
    P_CONFIG,
    P_INFLIGHT,
    P_MQ,
    P_REPLY_ACK,
    REGION,
    REM_MEM_REG,
    S_IOERR,
    S_OK,
    S_UNSUPP,
    SEG,
    SET_CONFIG,
    SET_FEATURES,
    SET_INFLIGHT_FD,
    SET_MEM_TABLE,
    SET_PROTOCOL_FEATURES,
    SET_VRING_ADDR,
    SET_VRING_ENABLE,
    SET_VRING_NUM,
    STATE,
    T_DISCARD,
    T_FLUSH,
    T_GET_ID,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
    U64,
    UVA,
    Backend,
    Front,
    Guest,
    MiB,
    Ring,
    request,
)

DISK = 8 * MiB


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(pattern(1, DISK))
    return path


@pytest.fixture
def guest():
    g = Guest()
    yield g
    g.close()


class Rig:
    """A negotiated device with its rings running."""

    def __init__(self, image: Path, guest: Guest, *, queues: int = 1, features: int | None = None,
                 read_only: bool = False, num: int = 16) -> None:
        self.backend = Backend(image, num_queues=queues, read_only=read_only)
        self.front = self.backend.front
        self.guest = guest
        self.offered = self.front.negotiate(features)
        self.front.mem_table(guest)
        self.rings = [Ring(guest, i, num) for i in range(queues)]
        for r in self.rings:
            self.front.ring(r)

    @property
    def ring(self) -> Ring:
        return self.rings[0]

    def submit(self, kind: int, sector: int, bufs: list[tuple[int, int, int]], *,
               indirect: bool = False, ring: Ring | None = None) -> tuple[int, int]:
        """One request, waited for: (status byte, used length)."""
        ring = ring or self.ring
        chain, status = request(self.guest, kind, sector, bufs)
        head = ring.chain(chain, indirect=indirect)
        ring.publish(head)
        (used_id, used_len), = ring.wait_used(1)
        assert used_id == head
        return self.guest.mem[status], used_len

    def close(self) -> None:
        for r in self.rings:
            r.close()
        self.backend.close()


@pytest.fixture
def rig(image: Path, guest: Guest):
    r = Rig(image, guest)
    yield r
    r.close()


# ---------------------------------------------------------------------------- negotiation
def test_features_config_and_queue_count(image: Path, guest: Guest) -> None:
    b = Backend(image, num_queues=3)
    try:
        f = b.front
        feats = U64.unpack(f.call(GET_FEATURES))[0]
        for bit in (32, 30, 2, 6, 9, 11, 10, 13, 14, 28, 29, 12, 1):  # VERSION_1 ... SIZE_MAX
            assert feats >> bit & 1, bit
        assert not feats >> 5 & 1  # not read-only
        pf = U64.unpack(f.call(GET_PROTOCOL_FEATURES))[0]
        for bit in (P_MQ, P_REPLY_ACK, P_CONFIG, P_INFLIGHT, 15):
            assert pf >> bit & 1, bit
        f.send(SET_PROTOCOL_FEATURES, U64.pack(pf))
        assert U64.unpack(f.call(GET_QUEUE_NUM))[0] == 3
        cfg = f.call(GET_CONFIG, struct.pack("<III", 0, 57, 0) + bytes(57))
        offset, size, _ = struct.unpack_from("<III", cfg)
        body = cfg[12:]
        assert (offset, size, len(body)) == (0, 57, 57)
        assert struct.unpack_from("<Q", body, 0)[0] == DISK // 512  # capacity
        assert struct.unpack_from("<I", body, 12)[0] >= 126  # seg_max
        assert struct.unpack_from("<I", body, 20)[0] == 512  # blk_size
        assert body[32] == 1  # writeback cache
        assert struct.unpack_from("<H", body, 34)[0] == 3  # num_queues
        assert struct.unpack_from("<I", body, 36)[0] >= 32768  # max_discard_sectors
        assert struct.unpack_from("<I", body, 48)[0] >= 32768  # max_write_zeroes_sectors
        assert body[56] == 1  # write_zeroes_may_unmap
        # a partial read at an offset
        cfg = f.call(GET_CONFIG, struct.pack("<III", 20, 4, 0) + bytes(4))
        assert struct.unpack_from("<I", cfg, 12)[0] == 512
        # the guest turns the cache off (write through) and back; other fields refused
        assert f.ack(SET_CONFIG, struct.pack("<III", 32, 1, 0) + b"\0") == 0
        cfg = f.call(GET_CONFIG, struct.pack("<III", 32, 1, 0) + b"\0")
        assert cfg[12] == 0
        assert f.ack(SET_CONFIG, struct.pack("<III", 0, 8, 0) + bytes(8)) == 1
        # SET_FEATURES may come again (firmware, then Linux)
        assert f.ack(SET_FEATURES, U64.pack(1 << 32 | 1 << 30)) == 0
        assert f.ack(SET_FEATURES, U64.pack(feats)) == 0
        # but not with a bit we did not offer
        assert f.ack(SET_FEATURES, U64.pack(feats | 1 << 26)) == 1
    finally:
        b.close()


def test_read_only_offers_ro_and_refuses_writes(image: Path, guest: Guest) -> None:
    rig = Rig(image, guest, read_only=True)
    try:
        assert rig.offered >> 5 & 1 and not rig.offered >> 13 & 1
        buf = guest.alloc(4096)
        guest.write(buf, b"x" * 4096)
        assert rig.submit(T_OUT, 0, [(buf, 4096, 0)]) == (S_IOERR, 1)
        assert rig.submit(T_DISCARD, 0, [(buf, 16, 0)])[0] == S_UNSUPP
        assert image.read_bytes()[:4096] == pattern(1, DISK)[:4096]
        assert rig.submit(T_IN, 0, [(buf, 4096, F_WRITE)]) == (S_OK, 4097)
    finally:
        rig.close()


# ---------------------------------------------------------------------------- requests
def test_write_then_read_scattered(rig: Rig, image: Path) -> None:
    g = rig.guest
    data = pattern(9, 12288)
    a, b2 = g.alloc(4096), g.alloc(8192)
    g.write(a, data[:4096])
    g.write(b2, data[4096:])
    assert rig.submit(T_OUT, 16, [(a, 4096, 0), (b2, 8192, 0)]) == (S_OK, 1)
    assert image.read_bytes()[16 * 512 : 16 * 512 + 12288] == data
    # read back into three pieces, one of them not a sector multiple on its own
    c, d, e = g.alloc(1000), g.alloc(3096), g.alloc(8192)
    assert rig.submit(T_IN, 16, [(c, 1000, F_WRITE), (d, 3096, F_WRITE),
                                 (e, 8192, F_WRITE)]) == (S_OK, 12289)
    assert g.read(c, 1000) + g.read(d, 3096) + g.read(e, 8192) == data
    # one buffer each way (the side door)
    f = g.alloc(4096)
    assert rig.submit(T_IN, 0, [(f, 4096, F_WRITE)]) == (S_OK, 4097)
    assert g.read(f, 4096) == pattern(1, DISK)[:4096]


def test_header_and_data_in_one_buffer(rig: Rig, image: Path) -> None:
    """The layout is free (VERSION_1): header and data may share a descriptor, and the
    last data bytes may share one with the status byte."""
    g = rig.guest
    buf = g.alloc(16 + 1024)
    struct.pack_into("<IIQ", g.mem, buf, T_OUT, 0, 40)
    g.write(buf + 16, pattern(3, 1024))
    tail = g.alloc(513)
    g.mem[tail + 512] = 0xFF
    head = rig.ring.chain([(buf, 16 + 1024, 0), (tail, 1, F_WRITE)])
    rig.ring.publish(head)
    assert rig.ring.wait_used(1) == [(head, 1)]
    assert image.read_bytes()[40 * 512 : 40 * 512 + 1024] == pattern(3, 1024)
    hdr = g.alloc(16, 16)
    struct.pack_into("<IIQ", g.mem, hdr, T_IN, 0, 40)
    head = rig.ring.chain([(hdr, 16, 0), (tail, 513, F_WRITE)])
    rig.ring.publish(head)
    assert rig.ring.wait_used(1) == [(head, 513)]
    assert g.read(tail, 512) == pattern(3, 1024)[:512] and g.mem[tail + 512] == S_OK
    # the header split over two buffers, the second also holding the start of the data
    h1, h2 = g.alloc(8, 8), g.alloc(8 + 512)
    hdr = struct.pack("<IIQ", T_OUT, 0, 41)
    g.write(h1, hdr[:8])
    g.write(h2, hdr[8:] + pattern(4, 512))
    st = g.alloc(1)
    head = rig.ring.chain([(h1, 8, 0), (h2, 8 + 512, 0), (st, 1, F_WRITE)])
    rig.ring.publish(head)
    assert rig.ring.wait_used(1) == [(head, 1)] and g.mem[st] == S_OK
    assert image.read_bytes()[41 * 512 : 42 * 512] == pattern(4, 512)


def test_flush_get_id_unknown(rig: Rig) -> None:
    g = rig.guest
    assert rig.submit(T_FLUSH, 0, []) == (S_OK, 1)
    ident = g.alloc(20)
    assert rig.submit(T_GET_ID, 0, [(ident, 20, F_WRITE)]) == (S_OK, 21)
    assert g.read(ident, 20) == b"test-serial".ljust(20, b"\0")
    assert rig.submit(10, 0, [])[0] == S_UNSUPP  # GET_LIFETIME
    assert rig.submit(99, 0, [])[0] == S_UNSUPP


def test_discard_and_write_zeroes(rig: Rig, image: Path) -> None:
    g = rig.guest
    segs = g.alloc(32, 16)
    SEG.pack_into(g.mem, segs, 8, 8, 0)
    SEG.pack_into(g.mem, segs + 16, 64, 16, 0)
    assert rig.submit(T_DISCARD, 0, [(segs, 32, 0)]) == (S_OK, 1)
    wz = g.alloc(16, 16)
    SEG.pack_into(g.mem, wz, 100, 9, 1)  # UNMAP allowed
    assert rig.submit(T_WRITE_ZEROES, 0, [(wz, 16, 0)]) == (S_OK, 1)
    SEG.pack_into(g.mem, wz, 200, 3, 0)
    assert rig.submit(T_WRITE_ZEROES, 0, [(wz, 16, 0)]) == (S_OK, 1)
    disk = image.read_bytes()
    assert disk[100 * 512 : 109 * 512] == bytes(9 * 512)
    assert disk[200 * 512 : 203 * 512] == bytes(3 * 512)
    assert disk[99 * 512 : 100 * 512] == pattern(1, DISK)[99 * 512 : 100 * 512]
    # UNMAP on a discard, reserved flag bits: unsupported
    SEG.pack_into(g.mem, wz, 8, 8, 1)
    assert rig.submit(T_DISCARD, 0, [(wz, 16, 0)])[0] == S_UNSUPP
    SEG.pack_into(g.mem, wz, 8, 8, 4)
    assert rig.submit(T_WRITE_ZEROES, 0, [(wz, 16, 0)])[0] == S_UNSUPP
    # two ranges for write zeroes (max 1), a range past the end: errors
    assert rig.submit(T_WRITE_ZEROES, 0, [(segs, 32, 0)])[0] == S_IOERR
    # a huge range buffer is refused for its size, not read
    big = g.alloc(4 * MiB)
    assert rig.submit(T_DISCARD, 0, [(big, 4 * MiB, 0)])[0] == S_IOERR
    SEG.pack_into(g.mem, wz, DISK // 512 - 1, 2, 0)
    assert rig.submit(T_DISCARD, 0, [(wz, 16, 0)])[0] == S_IOERR


def test_indirect_chains(rig: Rig, image: Path) -> None:
    g = rig.guest
    bufs = [g.alloc(512) for _ in range(40)]  # more than the ring's 16 entries
    for i, off in enumerate(bufs):
        g.write(off, bytes([i]) * 512)
    assert rig.submit(T_OUT, 1000, [(off, 512, 0) for off in bufs], indirect=True) == (S_OK, 1)
    assert image.read_bytes()[1000 * 512 : 1040 * 512] == b"".join(bytes([i]) * 512
                                                                   for i in range(40))
    out = g.alloc(40 * 512)
    assert rig.submit(T_IN, 1000, [(out, 40 * 512, F_WRITE)], indirect=True) == (S_OK, 40 * 512 + 1)
    assert g.read(out, 40 * 512) == image.read_bytes()[1000 * 512 : 1040 * 512]


def test_many_requests_in_one_kick_and_wraparound(rig: Rig, image: Path) -> None:
    g = rig.guest
    ring = rig.ring
    disk = image.read_bytes()
    for round_ in range(5):  # 5 x 5 requests of 3 descriptors on a 16-entry ring: wraps
        heads, outs = [], []
        for k in range(5):
            out = g.alloc(4096)
            chain, _ = request(g, T_IN, (round_ * 5 + k) * 8, [(out, 4096, F_WRITE)])
            heads.append(ring.chain(chain))
            outs.append(out)
        ring.publish(*heads)
        used = ring.wait_used(5)
        assert sorted(u[0] for u in used) == sorted(heads)
        for k, out in enumerate(outs):
            sector = (round_ * 5 + k) * 8
            assert g.read(out, 4096) == disk[sector * 512 : sector * 512 + 4096]


def test_event_idx_suppresses_and_requests_notifications(image: Path, guest: Guest) -> None:
    rig = Rig(image, guest)  # EVENT_IDX negotiated (all offered features)
    try:
        assert rig.offered >> 29 & 1
        ring = rig.ring
        rig.submit(T_FLUSH, 0, [])
        assert ring.called(5)  # the first completion always signals
        assert ring.avail_event == ring.avail_idx  # kick me on the next one
        ring.set_used_event(ring.used_idx + 5)  # "tell me after 6 more"
        for _ in range(3):
            rig.submit(T_FLUSH, 0, [])
        assert not ring.called(0.2)
        ring.set_used_event(ring.used_idx)  # "tell me after the next one"
        rig.submit(T_FLUSH, 0, [])
        assert ring.called(5)
    finally:
        rig.close()


def test_no_interrupt_flag_without_event_idx(image: Path, guest: Guest) -> None:
    feats = 1 << 32 | 1 << 30 | 1 << 9
    rig = Rig(image, guest, features=feats)
    try:
        ring = rig.ring
        ring.set_avail_flags(1)  # VRING_AVAIL_F_NO_INTERRUPT
        rig.submit(T_FLUSH, 0, [])
        assert not ring.called(0.2)
        ring.set_avail_flags(0)
        rig.submit(T_FLUSH, 0, [])
        assert ring.called(5)
        # indirect not negotiated: an indirect chain breaks the device
        buf = guest.alloc(512)
        chain, _ = request(guest, T_IN, 0, [(buf, 512, F_WRITE)])
        ring.publish(ring.chain(chain, indirect=True))
        assert rig.front.closed_by_peer()
    finally:
        rig.close()


def test_multiqueue_each_queue_served(image: Path, guest: Guest) -> None:
    rig = Rig(image, guest, queues=3)
    try:
        for q, ring in enumerate(rig.rings):
            out = guest.alloc(4096)
            assert rig.submit(T_IN, q * 8, [(out, 4096, F_WRITE)], ring=ring) == (S_OK, 4097)
            assert guest.read(out, 4096) == pattern(1, DISK)[q * 4096 : q * 4096 + 4096]
    finally:
        rig.close()


def test_stop_returns_base_and_restart_continues(rig: Rig) -> None:
    ring, f = rig.ring, rig.front
    for _ in range(3):
        rig.submit(T_FLUSH, 0, [])
    f.send(SET_VRING_ENABLE, STATE.pack(0, 0))
    base = STATE.unpack(f.call(GET_VRING_BASE, STATE.pack(0, 0)))
    assert base == (0, 3)
    ring.called()  # (the signals so far)
    # stopped: a request made available now waits for the restart
    chain, status = request(rig.guest, T_FLUSH, 0, [])
    ring.publish(ring.chain(chain))
    assert not ring.called(0.2) and ring.used_idx == 3
    ring.kick = os.eventfd(0, os.EFD_NONBLOCK)  # the old one was the back-end's to close
    f.ring(ring, base=3)
    assert ring.wait_used(1)[0][1] == 1 and rig.guest.mem[status] == S_OK


def test_memory_slots_add_and_remove(image: Path, guest: Guest) -> None:
    b = Backend(image)
    try:
        f = b.front
        f.negotiate(protocol=(1 << P_REPLY_ACK) | (1 << 15))
        # two regions of one memfd: the second from an offset (not page aligned is fine)
        half = guest.size // 2
        r1 = struct.pack("<Q", 0) + REGION.pack(GPA, half, UVA, 0)
        r2 = struct.pack("<Q", 0) + REGION.pack(GPA + half, half, UVA + half, half)
        assert f.ack(ADD_MEM_REG, r1, [guest.fd]) == 0
        assert f.ack(ADD_MEM_REG, r2, [guest.fd]) == 0
        ring = Ring(guest, 0)
        f.ring(ring)
        # a buffer crossing from the first region into the next (contiguous) one
        data = pattern(5, 8192)
        buf = half - 4096
        guest.write(buf, data)
        chain, status = request(guest, T_OUT, 0, [(buf, 8192, 0)])
        ring.publish(ring.chain(chain))
        ring.wait_used(1)
        assert guest.mem[status] == S_OK and image.read_bytes()[:8192] == data
        assert f.ack(REM_MEM_REG, r2) == 0
        assert f.ack(REM_MEM_REG, r2) == 1  # not there any more
        # now the same buffer runs off guest memory: IOERR, the device goes on
        chain, status = request(guest, T_IN, 0, [(buf, 8192, F_WRITE)])
        ring.publish(ring.chain(chain))
        ring.wait_used(1)
        assert guest.mem[status] == S_IOERR
        ring.close()
    finally:
        b.close()


# ---------------------------------------------------------------------------- bad requests
def test_bad_requests_fail_alone(rig: Rig, image: Path, monkeypatch) -> None:
    g = rig.guest
    ok = g.alloc(4096)
    size = g.size
    before = image.read_bytes()
    # data outside guest memory, or running off its end
    assert rig.submit(T_IN, 0, [(ok, 4096, F_WRITE)])[0] == S_OK
    for off in (size + 4096, size - 512):
        assert rig.submit(T_IN, 0, [(off, 4096, F_WRITE)])[0] == S_IOERR
    # wrong direction: a write whose data the device would write, a read into read-only
    # buffers, a readable buffer after a writable one
    assert rig.submit(T_OUT, 0, [(ok, 4096, F_WRITE)])[0] == S_IOERR
    assert rig.submit(T_IN, 0, [(ok, 4096, 0)])[0] == S_IOERR
    assert rig.submit(T_IN, 0, [(ok, 512, F_WRITE), (ok, 512, 0)])[0] == S_IOERR
    # not whole sectors; past the end of the disk; a sector number that overflows
    assert rig.submit(T_IN, 0, [(ok, 1000, F_WRITE)])[0] == S_IOERR
    assert rig.submit(T_OUT, DISK // 512 - 4, [(ok, 4096, 0)])[0] == S_IOERR
    assert rig.submit(T_IN, (1 << 64) - 1, [(ok, 512, F_WRITE)])[0] == S_IOERR
    # a short header
    status = g.alloc(1)
    short = g.alloc(8, 8)
    head = rig.ring.chain([(short, 8, 0), (status, 1, F_WRITE)])
    rig.ring.publish(head)
    rig.ring.wait_used(1)
    assert g.mem[status] == S_IOERR
    # oversized
    from blktap.transport.vhost_user import blk
    monkeypatch.setattr(blk, "MAX_REQUEST", 2048)
    assert rig.submit(T_IN, 0, [(ok, 4096, F_WRITE)])[0] == S_IOERR
    monkeypatch.undo()
    assert image.read_bytes() == before
    # and the device still serves
    assert rig.submit(T_IN, 8, [(ok, 4096, F_WRITE)]) == (S_OK, 4097)
    assert g.read(ok, 4096) == before[4096:8192]


BROKEN_CASES = ["loop", "too-long", "next-past-table", "head-past-table", "status-readonly",
                "status-outside", "avail-jump", "indirect-next", "indirect-size",
                "indirect-nested", "indirect-outside", "empty-status"]


@pytest.mark.parametrize("case", BROKEN_CASES)
def test_bad_chains_break_the_device_not_the_process(image: Path, guest: Guest,
                                                     case: str) -> None:
    """A chain that cannot be answered marks the device broken: the front-end is
    disconnected; another device of the same process keeps serving."""
    b = Backend(image, count=2)
    try:
        bad, good = b.fronts
        bad.negotiate()
        bad.mem_table(guest)
        ring = Ring(guest, 0)
        bad.ring(ring)
        g = guest
        hdr = g.alloc(16, 16)
        struct.pack_into("<IIQ", g.mem, hdr, T_IN, 0, 0)
        st = g.alloc(1)
        data = g.alloc(512)
        gp = g.gpa
        if case == "loop":
            ring.desc(0, gp(hdr), 16, F_NEXT, 1)
            ring.desc(1, gp(data), 512, F_NEXT | F_WRITE, 0)
            ring.publish(0)
        elif case == "too-long":
            for i in range(16):
                ring.desc(i, gp(data), 512, F_NEXT | F_WRITE, (i + 1) % 16)
            ring.publish(0)
        elif case == "next-past-table":
            ring.desc(0, gp(hdr), 16, F_NEXT, 16)
            ring.publish(0)
        elif case == "head-past-table":
            ring.publish(16)
        elif case == "status-readonly":
            ring.publish(ring.chain([(hdr, 16, 0), (data, 512, F_WRITE), (st, 1, 0)]))
        elif case == "status-outside":
            ring.desc(0, gp(hdr), 16, F_NEXT, 1)
            ring.desc(1, gp(g.size) + 100, 1, F_WRITE, 0)
            ring.publish(0)
        elif case == "empty-status":
            ring.publish(ring.chain([(hdr, 16, 0), (st, 0, F_WRITE)]))
        elif case == "avail-jump":
            struct.pack_into("<H", g.mem, ring.avail_off + 2, 17)
            os.eventfd_write(ring.kick, 1)
        elif case.startswith("indirect"):
            table = g.alloc(48, 16)
            struct.pack_into("<QIHH", g.mem, table, gp(hdr), 16, F_NEXT, 1)
            struct.pack_into("<QIHH", g.mem, table + 16, gp(data), 512, F_NEXT | F_WRITE, 2)
            struct.pack_into("<QIHH", g.mem, table + 32, gp(st), 1, F_WRITE, 0)
            if case == "indirect-next":
                ring.desc(0, gp(table), 48, F_INDIRECT | F_NEXT, 1)
            elif case == "indirect-size":
                ring.desc(0, gp(table), 40, F_INDIRECT)
            elif case == "indirect-nested":
                struct.pack_into("<QIHH", g.mem, table + 16, gp(table), 48, F_INDIRECT, 0)
                ring.desc(0, gp(table), 48, F_INDIRECT)
            else:
                ring.desc(0, gp(g.size) - 16, 48, F_INDIRECT)
            ring.publish(0)
        assert bad.closed_by_peer(), case
        # the other device of the process
        good.negotiate()
        g2 = Guest()
        try:
            good.mem_table(g2)
            r2 = Ring(g2, 0)
            good.ring(r2)
            out = g2.alloc(4096)
            chain, status = request(g2, T_IN, 0, [(out, 4096, F_WRITE)])
            r2.publish(r2.chain(chain))
            r2.wait_used(1)
            assert g2.mem[status] == S_OK and g2.read(out, 4096) == pattern(1, 4096)
            r2.close()
        finally:
            g2.close()
        ring.close()
    finally:
        b.close()


# ---------------------------------------------------------------------------- bad messages
def _dropped(image: Path, guest: Guest, send) -> None:
    b = Backend(image)
    try:
        send(b.front, guest)
        assert b.front.closed_by_peer()
    finally:
        b.close()


def test_bad_messages_drop_the_front_end(image: Path, guest: Guest) -> None:
    # wrong version bits
    _dropped(image, guest, lambda f, g: f.send(GET_FEATURES, flags=0x2))
    # payload of the wrong size; an absurd size
    _dropped(image, guest, lambda f, g: f.send(SET_FEATURES, b"\0" * 4))
    _dropped(image, guest, lambda f, g: f.sock.sendall(struct.pack("<III", 1, 1, 1 << 30)))
    # an unknown request
    _dropped(image, guest, lambda f, g: f.send(77))
    # a memory table without its fd (guest RAM not shared)
    _dropped(image, guest, lambda f, g: f.send(
        SET_MEM_TABLE, struct.pack("<II", 1, 0) + REGION.pack(GPA, g.size, UVA, 0)))
    # a queue index out of range
    _dropped(image, guest, lambda f, g: f.send(SET_VRING_NUM, STATE.pack(5, 16)))
    # a queue size that is not a power of 2
    _dropped(image, guest, lambda f, g: f.send(SET_VRING_NUM, STATE.pack(0, 100)))

    # a region larger than its file (touching past the end would kill the process)
    _dropped(image, guest, lambda f, g: f.send(
        SET_MEM_TABLE, struct.pack("<II", 1, 0) + REGION.pack(GPA, g.size * 4, UVA, 0),
        [g.fd]))

    def ring_outside(f: Front, g: Guest) -> None:
        f.negotiate()
        f.mem_table(g)
        f.send(SET_VRING_NUM, STATE.pack(0, 16))
        f.send(SET_VRING_ADDR, ADDR.pack(0, 0, UVA + g.size, UVA, UVA, 0))
    _dropped(image, guest, ring_outside)


def test_eof_mid_message_and_fds_closed(image: Path, guest: Guest) -> None:
    b = Backend(image)
    before = len(os.listdir("/proc/self/fd"))
    f = b.front
    f.negotiate()
    f.mem_table(guest)
    ring = Ring(guest, 0)
    f.ring(ring)
    f.sock.sendall(struct.pack("<III", SET_VRING_NUM, 1, 8))  # and no payload
    b.close()  # EOF: the session unmaps and closes everything it was given
    ring.close()
    assert len(os.listdir("/proc/self/fd")) <= before


# ---------------------------------------------------------------------------- reconnect
def test_inflight_region_resubmits_what_was_in_flight(image: Path, guest: Guest) -> None:
    """A back-end that died with requests in flight: the next one finds them in the
    inflight region the front-end kept, submits them again in order, and starts after
    them; a batch published but not cleared is not submitted twice."""
    proto = (1 << P_REPLY_ACK) | (1 << P_CONFIG) | (1 << P_INFLIGHT)
    b = Backend(image)
    try:
        f = b.front
        f.negotiate(protocol=proto)
        f.send(GET_INFLIGHT_FD, struct.pack("<QQHH4x", 0, 0, 1, 16))
        req, body, fds = f.recv_with_fds()
        size, offset, nq, qs = struct.unpack("<QQHH4x", body)
        assert req == GET_INFLIGHT_FD and (nq, qs) == (1, 16) and len(fds) == 1
        assert size >= 16 + 16 * 16
        inflight_fd = fds[0]
    finally:
        b.close()
    import mmap as _mmap
    region = _mmap.mmap(inflight_fd, size)
    assert struct.unpack_from("<HH", region, 8) == (1, 16)  # version, desc_num
    ring = Ring(guest, 0)
    g = guest
    # The story the region tells: the guest made 4 requests available (A B C D); the
    # dead back-end completed B and C (used idx 2, published and cleared), then D (used
    # idx 3 written, but the region's used_idx still 2: the crash came between), A was
    # in flight.
    outs, heads = [], []
    for k in range(4):
        out = g.alloc(4096)
        chain, _ = request(g, T_IN, k * 8, [(out, 4096, F_WRITE)])
        heads.append(ring.chain(chain))
        outs.append(out)
    ring.publish(*heads, kick=False)
    a, bh, c, d = heads
    struct.pack_into("<H", g.mem, ring.used_off + 2, 3)
    for slot, h in enumerate((bh, c, d)):
        struct.pack_into("<II", g.mem, ring.used_off + 4 + 8 * slot, h, 4097)
    ring.used_seen = 3

    def desc_state(h: int, flag: int, nxt: int, counter: int) -> None:
        struct.pack_into("<B5xHQ", region, 16 + 16 * h, flag, nxt, counter)
    desc_state(a, 1, 0, 10)
    desc_state(d, 1, c, 13)  # D: returned in the last batch, flag not yet cleared
    struct.pack_into("<HH", region, 12, d, 2)  # last_batch_head, used_idx
    b = Backend(image)
    try:
        f = b.front
        f.negotiate(protocol=proto)
        f.send(SET_INFLIGHT_FD, struct.pack("<QQHH4x", size, offset, 1, 16), [inflight_fd])
        f.mem_table(g)
        f.ring(ring, base=3)  # what QEMU sends after a crash: its used idx
        (used,) = ring.wait_used(1)
        assert used == (a, 4097)  # A again, and only A
        assert g.read(outs[0], 4096) == pattern(1, DISK)[:4096]
        assert ring.used_idx == 4
        assert struct.unpack_from("<H", region, 14)[0] == 4  # region caught up
        assert all(region[16 + 16 * h] == 0 for h in range(16))
        # and the next request the guest makes is taken from avail slot 4
        chain, status = request(g, T_FLUSH, 0, [])
        ring.publish(ring.chain(chain))
        ring.wait_used(1)
        assert g.mem[status] == S_OK
        assert STATE.unpack(f.call(GET_VRING_BASE, STATE.pack(0, 0))) == (0, 5)
    finally:
        b.close()
        ring.close()
        region.close()
        os.close(inflight_fd)


# ---------------------------------------------------------------------------- the listener
def test_server_accepts_the_next_front_end_after_eof(image: Path, guest: Guest,
                                                     tmp_path: Path) -> None:
    import asyncio
    import threading

    from blktap.io import ThreadEngine
    from blktap.tapdisk.drivers import open_stack
    from blktap.tapdisk.vbd import VBD
    from blktap.transport.vhost_user import BlkOptions, VhostUserServer

    path = str(tmp_path / "vu.sock")
    ready = threading.Event()
    stop: list = []

    async def main() -> None:
        engine = ThreadEngine(threads=2)
        drv = await engine.call(open_stack, engine, f"aio:{image}", writable=True)
        vbd = VBD(drv)
        server = VhostUserServer(vbd, BlkOptions(serial="x"))
        server.listen(path)
        done = asyncio.Event()
        stop.append((asyncio.get_running_loop(), done))
        ready.set()
        await done.wait()
        await server.stop()
        await vbd.close()
        engine.close()
        assert not os.path.exists(path)

    t = threading.Thread(target=lambda: asyncio.run(main()))
    t.start()
    assert ready.wait(10)
    try:
        for round_ in range(2):
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            f = Front(s)
            f.negotiate()
            f.mem_table(guest)
            ring = Ring(guest, 0)
            f.ring(ring)
            out = guest.alloc(512)
            chain, status = request(guest, T_IN, round_, [(out, 512, F_WRITE)])
            ring.publish(ring.chain(chain))
            ring.wait_used(1)
            assert guest.mem[status] == S_OK
            s.close()
            ring.close()
        # a front-end still connected when the server stops is disconnected
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        f = Front(s)
        f.negotiate()
    finally:
        loop, done = stop[0]
        loop.call_soon_threadsafe(done.set)
        t.join(20)
    assert not t.is_alive()
    assert f.closed_by_peer()
    s.close()


# ---------------------------------------------------------------------------- the command
def test_serve_prints_the_socket_and_stops_on_sigterm(image: Path, guest: Guest,
                                                      tmp_path: Path) -> None:
    import signal
    import subprocess

    from conftest import tool

    sock = tmp_path / "vu.sock"
    nbd = tmp_path / "nbd.sock"
    proc = subprocess.Popen([tool("blktap"), "serve", f"aio:{image}", "--vhost-user",
                             str(sock), "--socket", str(nbd), "--serial", "cli-serial"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path)
    try:
        lines = [proc.stdout.readline().strip() for _ in range(2)]
        assert f"vhost-user:{sock}" in lines
        assert any(line.startswith("nbd+unix:///") for line in lines)
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sock))
        f = Front(s)
        f.negotiate()
        f.mem_table(guest)
        ring = Ring(guest, 0)
        f.ring(ring)
        ident = guest.alloc(20)
        chain, status = request(guest, T_GET_ID, 0, [(ident, 20, F_WRITE)])
        ring.publish(ring.chain(chain))
        ring.wait_used(1)
        assert guest.read(ident, 20) == b"cli-serial".ljust(20, b"\0")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert f.closed_by_peer()
        assert not sock.exists() and not nbd.exists()
        s.close()
        ring.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_vhost_user_only_opens_no_tcp_listener(image: Path, tmp_path: Path) -> None:
    import signal
    import subprocess

    from conftest import tool

    proc = subprocess.Popen([tool("blktap"), "serve", f"ram:{image}", "--vhost-user",
                             "vu.sock", "--num-queues", "4"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert proc.stdout.readline().strip() == f"vhost-user:{tmp_path / 'vu.sock'}"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert out == ""  # nothing else: no NBD URI
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    bad = subprocess.run([tool("blktap"), "serve", f"aio:{image}", "--vhost-user", "x.sock",
                          "--num-queues", "0"], capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode != 0 and "--num-queues" in bad.stderr


def test_a_disabled_ring_is_not_processed(rig: Rig) -> None:
    ring, f = rig.ring, rig.front
    assert f.ack(SET_VRING_ENABLE, STATE.pack(0, 0)) == 0
    chain, status = request(rig.guest, T_FLUSH, 0, [])
    ring.publish(ring.chain(chain))
    import time
    time.sleep(0.3)
    assert ring.used_idx == 0 and rig.guest.mem[status] == 0xFF
    assert f.ack(SET_VRING_ENABLE, STATE.pack(0, 1)) == 0  # no kick needed
    assert ring.wait_used(1)[0][1] == 1 and rig.guest.mem[status] == S_OK


def test_random_messages_never_get_past_the_session(image: Path, guest: Guest) -> None:
    """Every request type with random payloads (and an fd or not): each session replies,
    acks or drops its front-end; nothing escapes it (Backend.close re-raises)."""
    rnd = random.Random(7)
    b = Backend(image, count=41 * 3)
    try:
        for i, f in enumerate(b.fronts):
            req = i % 41
            for _ in range(3):
                payload = rnd.randbytes(rnd.choice([0, 4, 8, 12, 20, 24, 40, 57, 69, 264]))
                fds = [os.dup(guest.fd)] if rnd.random() < 0.3 else []
                try:
                    f.send(req, payload, fds, flags=1 | (8 if rnd.random() < 0.5 else 0))
                except OSError:
                    break
                finally:
                    for fd in fds:
                        os.close(fd)
    finally:
        b.close()


@pytest.mark.parametrize("seed", range(12))
def test_random_rings_never_get_past_the_device(image: Path, guest: Guest, seed: int) -> None:
    """Descriptor tables and avail rings of random bytes (addresses mostly inside guest
    memory, lengths small, flags random): every request is answered or the device is
    broken; nothing escapes the session (Backend.close re-raises)."""
    rnd = random.Random(seed)
    b = Backend(image, count=1)
    try:
        f = b.front
        f.negotiate()
        f.mem_table(guest)
        ring = Ring(guest, 0, 16)
        f.ring(ring)
        g = guest
        area = g.alloc(64 * 1024)
        g.write(area, rnd.randbytes(64 * 1024))
        for i in range(16):
            addr = g.gpa(area + rnd.randrange(0, 64 * 1024 - 16)) if rnd.random() < 0.9 \
                else rnd.getrandbits(64)
            length = rnd.choice([0, 1, 16, 512, 4096, rnd.getrandbits(32)])
            ring.desc(i, addr, length, rnd.getrandbits(3), rnd.randrange(0, 20))
        # some real headers among the random bytes
        for _ in range(8):
            off = area + rnd.randrange(0, 64 * 1024 - 16)
            struct.pack_into("<IIQ", g.mem, off, rnd.choice([0, 1, 4, 8, 11, 13]), 0,
                             rnd.randrange(0, DISK // 512))
        ring.publish(*[rnd.randrange(0, 18) for _ in range(rnd.randrange(1, 8))])
        f.closed_by_peer(0.5)  # broken, or still serving: either is fine
    finally:
        b.close()
        ring.close()


def test_answers_are_published_without_waiting_a_turn(image: Path, guest: Guest,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """One request at a time: its answer is published at once (by the pass over the ring
    that took it, or by its own task when nothing else is in flight), never left for a
    later turn of the loop (each turn costs system calls)."""
    from blktap.transport.vhost_user import virtqueue

    deferred: list[int] = []
    real = virtqueue.Virtqueue.push

    def push(self, head: int, written: int) -> None:  # noqa: ANN001
        real(self, head, written)
        if self._flush_pending:  # left to a callback of the next turn
            deferred.append(head)
    monkeypatch.setattr(virtqueue.Virtqueue, "push", push)
    r = Rig(image, guest)
    try:
        buf = guest.alloc(4096)
        for i in range(50):
            kind, flags = (T_IN, F_WRITE) if i % 2 else (T_OUT, 0)
            status, _ = r.submit(kind, 8 * (i % 16), [(buf, 4096, flags)])
            assert status == S_OK
        assert deferred == []
    finally:
        r.close()


def test_a_request_on_the_slow_path_costs_four_turns_of_the_loop(
        image: Path, guest: Guest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads and writes that wait for the device (the image opened with O_DIRECT) go to
    the VBD the callback way: the kick's pass queues and kicks them (turn 1), the
    group's task calls the driver (2), the engine's completion (3), the answer published
    from the VBD's callback (4). By a task per request it took five."""
    import selectors
    import threading

    try:
        os.close(os.open(image, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        pytest.skip("the image's file system has no O_DIRECT: the side door serves all")
    turns = [0]
    real = selectors.EpollSelector.select
    r = Rig(image, guest)
    loop_thread = r.backend._thread

    def select(self: selectors.EpollSelector, timeout: float | None = None) -> list:
        if threading.current_thread() is loop_thread:
            turns[0] += 1
        return real(self, timeout)
    monkeypatch.setattr(selectors.EpollSelector, "select", select)
    try:
        buf = guest.alloc(4096)
        n = 100
        turns[0] = 0
        for i in range(n):
            kind, flags = (T_IN, F_WRITE) if i % 2 else (T_OUT, 0)
            status, _ = r.submit(kind, 8 * (i % 16), [(buf, 4096, flags)])
            assert status == S_OK
        per_request = turns[0] / n
        vbd = r.backend.vbd
        assert vbd is not None and vbd.stats.read_reqs + vbd.stats.write_reqs >= n
        assert per_request <= 4.2, per_request
    finally:
        r.close()
