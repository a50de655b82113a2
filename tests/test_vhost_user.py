"""vhost-user-blk: the protocol, from a front-end's side (torture/vhost_user_frontend.py).

Every test runs against our back-end (``blktap serve TYPE:PATH --vhost-user SOCK``) and,
where the vhost-user and virtio specs define the behaviour, against qemu-storage-daemon's
vhost-user-blk export too: a claim holds against the reference peer before it is asked of
ours. Where qsd does something else than what we ask of ours (it is allowed to, or it has a
bug) the qsd run is skipped, saying why.

Bad input is judged the same way everywhere: the request completes with IOERR (or UNSUPP
for an unknown type), or the back-end drops that front-end and logs a line; either way the
process lives and serves the next front-end.
"""

from __future__ import annotations

import os
import select
import signal
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import need, run, tool
from vhost_user_frontend import (
    BLK_F_CONFIG_WCE,
    BLK_F_DISCARD,
    BLK_F_FLUSH,
    BLK_F_MQ,
    BLK_F_RO,
    BLK_F_SEG_MAX,
    BLK_F_WRITE_ZEROES,
    CONFIG,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    F_EVENT_IDX,
    F_INDIRECT_DESC,
    F_PROTOCOL_FEATURES,
    F_VERSION_1,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    ID_BYTES,
    KNOWN_FEATURES,
    KNOWN_PROTOCOL,
    OUTHDR,
    PF_CONFIG,
    PF_CONFIGURE_MEM_SLOTS,
    PF_INFLIGHT_SHMFD,
    PF_REPLY_ACK,
    S_IOERR,
    S_OK,
    S_UNSUPP,
    SECTOR,
    SEGMENT,
    T_DISCARD,
    T_IN,
    T_OUT,
    T_WRITE_ZEROES,
    VERSION,
    BlkClient,
    BlkError,
    Buf,
    Dropped,
    Frontend,
    GuestMemory,
    Nack,
    Req,
    Request,
    parse_config,
)
from vhost_user_servers import (
    DISK,
    MiB,
    Server,
    make_raw,
    ours_supported,
    pattern,
    start_server,
)

SERVERS = ["qsd", "ours"]
SERIAL = "blktap-vu-serial-01"      # 19 bytes: fits GET_ID's 20 with its NUL


@pytest.fixture(params=SERVERS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def served(kind: str, tmp_path: Path) -> Iterator[Server]:
    """A 64 MiB raw image served by qsd or ours."""
    img = tmp_path / "disk.raw"
    make_raw(img)
    server = start_server(kind, f"aio:{img}", tmp_path, serial=SERIAL)
    try:
        yield server
    finally:
        rc = server.stop()
        assert rc == 0, f"{kind} exited {rc}: {server.log_text()}"


@pytest.fixture
def server_factory(kind: str, tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(spec: str, **kw: object) -> Server:
        s = start_server(kind, spec, tmp_path, **kw)  # type: ignore[arg-type]
        started.append(s)
        return s
    yield start
    for s in started:
        s.stop()


def file_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


# ------------------------------------------------------------------------------ negotiation


def test_negotiation_and_config(served: Server) -> None:
    with served.client() as c:
        assert c.offered & (1 << F_VERSION_1) and c.offered & (1 << F_PROTOCOL_FEATURES)
        assert c.protocol & (1 << PF_CONFIG), "QEMU refuses a vhost-user-blk without CONFIG"
        assert c.config["capacity"] == DISK // SECTOR
        assert c.offered & (1 << BLK_F_SEG_MAX) and c.config["seg_max"] >= 1
        assert c.offered & (1 << BLK_F_FLUSH)
        assert c.config["blk_size"] % SECTOR == 0
        # QEMU 7.2 asks for 57 bytes: the reply has exactly the size asked, same content
        short = c.fe.get_config(57)
        assert len(short) == 57 and short == c.fe.get_config(CONFIG.size)[:57]
        assert c.fe.get_features() == c.offered        # stable across calls


def test_reply_ack(served: Server) -> None:
    """With REPLY_ACK every message sent with NEED_REPLY gets a u64 0 (BlkClient asks for
    it on each message that has no reply of its own)."""
    with BlkClient(served.sock) as c:
        c.negotiate()
        assert c.protocol & (1 << PF_REPLY_ACK) and c.fe.reply_ack
        c.setup_memory()
        c.new_queues()
        c.start_queue(c.queues[0])
        c.write(0, b"A" * 4096)
        assert c.read(0, 4096) == b"A" * 4096


def test_without_reply_ack(served: Server) -> None:
    """Nothing asks for acks: the back-end must not send any (one would be read as the
    reply to GET_FEATURES)."""
    with BlkClient(served.sock, want_protocol=1 << PF_CONFIG) as c:
        c.connect()
        assert not c.fe.reply_ack
        c.write(0, b"B" * 4096)
        assert c.read(0, 4096) == b"B" * 4096
        assert c.fe.get_features() == c.offered


# ------------------------------------------------------------------------------ data


@pytest.mark.parametrize("layout", [
    {}, {"segments": 3}, {"indirect": True}, {"indirect": True, "segments": 4},
    {"split_header": True}, {"split_header": True, "indirect": True, "segments": 2}])
def test_round_trip_raw(served: Server, layout: dict) -> None:
    head = file_bytes(served.image, 0, MiB)
    with served.client() as c:
        assert c.read(0, 64 * 1024, **layout) == head[:64 * 1024]
        data = pattern(192 * 1024, seed=7)
        c.write(2048, data, **layout)                  # sector 2048 = 1 MiB
        c.write(3, b"\x5a" * SECTOR, **layout)         # one odd sector in the first MiB
        c.flush()
        assert c.read(2048, len(data), **layout) == data
        last = DISK // SECTOR - 8                      # the last 4 KiB of the disk
        c.write(last, pattern(4096, 9), **layout)
        assert c.read(last, 4096) == pattern(4096, 9)
    assert file_bytes(served.image, MiB, len(data)) == data
    assert file_bytes(served.image, 3 * SECTOR, SECTOR) == b"\x5a" * SECTOR
    assert file_bytes(served.image, 0, 3 * SECTOR) == head[:3 * SECTOR]
    assert file_bytes(served.image, DISK - 4096, 4096) == pattern(4096, 9)


def test_odd_buffer_boundaries(served: Server) -> None:
    """virtio asks only the data's total length to be whole sectors: buffers of 1000 and
    3 bytes, at odd guest addresses, are legal."""
    data = pattern(64 * 1024, 12)
    with served.client() as c:
        for segments, indirect in ((3, False), (7, True), (5, False)):
            c.write(512, data, segments=segments, indirect=indirect, odd_cuts=True)
            assert c.read(512, len(data), segments=segments + 1, odd_cuts=True) == data
            c.write(512, bytes(len(data)))
        c.write(512, data, segments=3, odd_cuts=True)
    assert file_bytes(served.image, 512 * SECTOR, len(data)) == data


def test_odd_buffer_boundaries_vhd(kind: str, tmp_path: Path) -> None:
    """The same on a VHD chain (the VHD layer below sees the scattered buffers too)."""
    if kind == "qsd":
        pytest.skip("qsd: QEMU's vpc driver does not open VHD differencing chains")
    base, leaf = tmp_path / "base.vhd", tmp_path / "leaf.vhd"
    for argv in (["create", "-n", str(base), "-s", "16"],
                 ["snapshot", "-n", str(leaf), "-p", str(base)]):
        res = run([tool("vhd-util"), *argv], text=True)
        assert res.returncode == 0, res.stderr
    data = pattern(64 * 1024, 13)
    server = start_server(kind, f"vhd:{leaf}", tmp_path)
    try:
        with server.client() as c:
            c.write(512, data, segments=3)                  # sector-sized buffers
            assert c.read(512, len(data), segments=5, odd_cuts=True) == data
            c.write(1024, data, segments=3, odd_cuts=True)
            assert c.read(1024, len(data)) == data
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("features", ["none", "indirect", "event_idx"])
def test_ring_features(served: Server, features: str) -> None:
    """The same I/O with INDIRECT_DESC and EVENT_IDX each negotiated alone or not at all."""
    want = KNOWN_FEATURES & ~((1 << F_INDIRECT_DESC) | (1 << F_EVENT_IDX))
    want |= {"none": 0, "indirect": 1 << F_INDIRECT_DESC, "event_idx": 1 << F_EVENT_IDX}[features]
    with served.client(want=want) as c:
        assert c.features == c.offered & want
        indirect = features == "indirect"
        for i in range(20):
            c.write(i * 8, pattern(4096, i), indirect=indirect)
        got = [c.read(i * 8, 4096, indirect=indirect) for i in range(20)]
        assert got == [pattern(4096, i) for i in range(20)]


def test_batches_fill_the_ring(served: Server) -> None:
    """A full ring of (indirect) requests in one kick, several times round a small ring,
    and direct chains that use up the descriptor table."""
    with served.client(queue_size=16) as c:
        for rnd in range(3):
            with c.mem.scratch():
                reqs = [c.build(T_OUT, i * 8, pattern(4096, rnd * 100 + i), indirect=True)
                        for i in range(16)]
                c.run(reqs)
                assert all(r.status_byte == S_OK and r.used.length == 1 for r in reqs)
            with c.mem.scratch():
                reqs = [c.build(T_IN, i * 8, in_len=4096, indirect=True) for i in range(16)]
                c.run(reqs)
                assert [r.payload() for r in reqs] == [pattern(4096, rnd * 100 + i)
                                                       for i in range(16)]
                assert all(r.used.length == 4097 for r in reqs)
            with c.mem.scratch():      # 5 chains of 3 descriptors: 15 of the 16
                reqs = [c.build(T_IN, i * 8, in_len=4096) for i in range(5)]
                c.run(reqs)
                assert [r.payload() for r in reqs] == [pattern(4096, rnd * 100 + i)
                                                       for i in range(5)]


def test_large_request(served: Server) -> None:
    with served.client() as c:
        segs = min(c.config["seg_max"], 64)
        data = pattern(2 * MiB, 3)
        c.write(4096, data, segments=segs, indirect=True)
        assert c.read(4096, len(data), segments=segs, indirect=True) == data
    assert file_bytes(served.image, 2 * MiB, 2 * MiB) == data


def test_out_of_range(served: Server) -> None:
    with served.client() as c:
        end = DISK // SECTOR
        for sector, length in [(end, SECTOR), (end - 1, 2 * SECTOR), (2**63, SECTOR)]:
            with pytest.raises(BlkError) as e:
                c.read(sector, length)
            assert e.value.status == S_IOERR
            with pytest.raises(BlkError) as e:
                c.write(sector, bytes(length))
            assert e.value.status == S_IOERR
        assert c.read(end - 1, SECTOR) == bytes(SECTOR)      # still fine
    assert os.path.getsize(served.image) == DISK


def test_unknown_request_type(served: Server) -> None:
    with served.client() as c:
        for rtype in (2, 99, 0xFFFFFFFF):
            with pytest.raises(BlkError) as e:
                c.do(rtype, in_len=SECTOR)
            assert e.value.status == S_UNSUPP
        assert c.read(0, SECTOR) == file_bytes(served.image, 0, SECTOR)


def test_flush(served: Server) -> None:
    with served.client() as c:
        assert c.has(BLK_F_FLUSH)
        c.write(100, b"F" * 4096)
        c.flush()
        c.flush(indirect=True)
    assert file_bytes(served.image, 100 * SECTOR, 4096) == b"F" * 4096


def test_get_id(served: Server) -> None:
    with served.client() as c:
        ident = c.get_id()
        assert len(ident) == ID_BYTES
        text = ident.rstrip(b"\0")
        if served.kind == "ours":
            assert text == SERIAL.encode()
        else:
            assert text == b"vhost_user_blk"   # qsd's fixed serial
        # a 20-byte buffer over two descriptors
        assert c.get_id(segments=2) == ident


def test_writeback_toggle(served: Server) -> None:
    """CONFIG_WCE: the driver writes the writeback byte (offset 32) of the config space
    (Linux does when /sys/block/vda/queue/write_cache is written); GET_CONFIG reads the
    new value; writes and flushes keep working in both modes."""
    with served.client() as c:
        assert c.has(BLK_F_CONFIG_WCE)
        for value in (0, 1, 0):
            c.fe.set_config(32, bytes([value]))
            assert parse_config(c.fe.get_config())["writeback"] == value
            c.write(300, pattern(4096, value + 70))
            c.flush()
            assert c.read(300, 4096) == pattern(4096, value + 70)
    assert file_bytes(served.image, 300 * SECTOR, 4096) == pattern(4096, 70)


def test_config_write_elsewhere_is_refused(served: Server) -> None:
    """Only the writeback byte is writable: a write over the capacity is refused (a
    non-zero ack, or the front-end dropped) and changes nothing."""
    with served.client() as c:
        assert send_bad(served, c.fe, Req.SET_CONFIG,
                        struct.pack("<III", 0, 8, 0) + struct.pack("<Q", 8)) != "alive"
    with served.client() as c:
        assert c.config["capacity"] == DISK // SECTOR


@pytest.mark.parametrize("size", [2, 1024])
def test_queue_sizes(served: Server, size: int) -> None:
    """The smallest ring that holds a request (indirect) and a large one, wrapped around."""
    with served.client(queue_size=size) as c:
        for rnd in range(3):
            with c.mem.scratch():
                batch = min(size, 64)
                reqs = [c.build(T_OUT, i * 8, pattern(4096, rnd * 10 + i), indirect=True)
                        for i in range(batch)]
                c.run(reqs)
                assert all(r.status_byte == S_OK for r in reqs)
            assert c.read(0, 4096, indirect=True) == pattern(4096, rnd * 10)


def test_discard(served: Server) -> None:
    with served.client() as c:
        assert c.has(BLK_F_DISCARD)
        assert c.config["max_discard_sectors"] > 0 and c.config["max_discard_seg"] >= 1
        c.write(4096, pattern(MiB, 5))
        c.discard([(4096, 2048)])
        c.flush()
        # after a discard the data is unspecified, but the disk keeps its size and the
        # sectors around are untouched
        c.write(4096 + 2048, b"K" * SECTOR)
        assert c.read(4095, SECTOR) == bytes(SECTOR)
        with pytest.raises(BlkError) as e:
            c.discard([(DISK // SECTOR - 8, 16)])
        assert e.value.status == S_IOERR
    assert os.path.getsize(served.image) == DISK
    assert file_bytes(served.image, (4096 + 2048) * SECTOR, SECTOR) == b"K" * SECTOR


def test_discard_unmap_flag_is_unsupported(served: Server) -> None:
    """virtio 1.1 5.2.6.2: a discard with the unmap flag gets UNSUPP."""
    with served.client() as c:
        with pytest.raises(BlkError) as e:
            c.do(T_DISCARD, out=SEGMENT.pack(4096, 8, 1))
        assert e.value.status == S_UNSUPP


@pytest.mark.parametrize("unmap", [False, True])
def test_write_zeroes(served: Server, unmap: bool) -> None:
    with served.client() as c:
        assert c.has(BLK_F_WRITE_ZEROES)
        c.write(8192, pattern(256 * 1024, 11))
        c.write_zeroes([(8192 + 8, 256)], unmap=unmap)
        got = c.read(8192, 256 * 1024)
        assert got[:4096] == pattern(4096, 11)
        assert got[4096:4096 + 128 * 1024] == bytes(128 * 1024)
        assert got[4096 + 128 * 1024:] == pattern(256 * 1024, 11)[4096 + 128 * 1024:]
        with pytest.raises(BlkError) as e:
            c.write_zeroes([(DISK // SECTOR - 8, 16)])
        assert e.value.status == S_IOERR
    assert file_bytes(served.image, (8192 + 8) * SECTOR, 128 * 1024) == bytes(128 * 1024)


def test_read_only(kind: str, tmp_path: Path) -> None:
    img = tmp_path / "ro.raw"
    head = make_raw(img)
    before = img.read_bytes()
    server = start_server(kind, f"aio:{img}", tmp_path, read_only=True)
    try:
        with server.client() as c:
            assert c.has(BLK_F_RO)
            assert c.read(0, MiB) == head
            with pytest.raises(BlkError) as e:
                c.write(0, b"W" * 4096)
            assert e.value.status == S_IOERR
            if c.offered & (1 << BLK_F_WRITE_ZEROES):
                with pytest.raises(BlkError) as e:
                    c.write_zeroes([(0, 8)])
                assert e.value.status == S_IOERR
            if c.offered & (1 << BLK_F_DISCARD):
                with pytest.raises(BlkError) as e:
                    c.discard([(0, 8)])
                assert e.value.status == S_IOERR
            c.flush()
            assert c.read(0, 4096) == head[:4096]
    finally:
        assert server.stop() == 0
    assert img.read_bytes() == before


def test_multi_queue(kind: str, tmp_path: Path) -> None:
    img = tmp_path / "mq.raw"
    make_raw(img)
    server = start_server(kind, f"aio:{img}", tmp_path, num_queues=2)
    try:
        with server.client(num_queues=2) as c:
            assert c.has(BLK_F_MQ) and c.config["num_queues"] == 2
            assert c.fe.get_queue_num() >= 2
            with c.mem.scratch():
                reqs = [c.build(T_OUT, 2048 + i * 64, pattern(32 * 1024, i), q=i % 2)
                        for i in range(32)]
                c.run(reqs)
                assert all(r.status_byte == S_OK for r in reqs)
            # read each queue's writes through the other queue
            for i in range(32):
                assert c.read(2048 + i * 64, 32 * 1024, q=(i + 1) % 2) == pattern(32 * 1024, i)
            assert all(q.calls > 0 for q in c.queues)
        for i in range(32):
            assert file_bytes(img, MiB + i * 32 * 1024, 32 * 1024) == pattern(32 * 1024, i)
    finally:
        assert server.stop() == 0


# ------------------------------------------------------------------------------ ring life


def test_ring_stop_and_resume(served: Server) -> None:
    """GET_VRING_BASE stops the ring and returns the next avail index; the ring restarts
    from there with SET_VRING_BASE, as after a migration or vhost restart."""
    with served.client() as c:
        q = c.queues[0]
        for i in range(5):
            c.write(i * 8, pattern(4096, 20 + i))
        assert c.stop_queue(q) == 5 == q.avail_idx
        # a request made available while stopped is not processed...
        with c.mem.scratch():
            req = c.build(T_IN, 0, in_len=4096)
            q.publish([req.head])
            time.sleep(0.3)
            assert q.used_idx() == 5
            # ...until the ring is started again from base 5
            c.start_queue(q, base=5)
            q.wait(1, c.fe)
            assert req.payload() == pattern(4096, 20)
        assert c.read(32, 4096) == pattern(4096, 24)


def test_stop_with_requests_in_flight(served: Server) -> None:
    """GET_VRING_BASE while requests are in flight: the requests before the base it
    returns were taken and complete into the used ring; the others are served once the
    ring starts again from that base. None is lost, none is done twice."""
    if served.kind == "qsd":
        pytest.skip("qsd: libvhost-user closes the call eventfd at GET_VRING_BASE, so a "
                    "request still in flight fails to signal (vu_panic) and is never "
                    "completed; it relies on INFLIGHT_SHMFD, which this test does not use")
    n = 32
    with served.client() as c:
        q = c.queues[0]
        with c.mem.scratch():
            reqs = [c.build(T_OUT, 4096 + i * 256, pattern(128 * 1024, 60 + i), indirect=True)
                    for i in range(n)]
            q.publish([r.head for r in reqs[:n // 2]])
            q.publish([r.head for r in reqs[n // 2:]], kick=False)   # seen, or left for later
            base = c.stop_queue(q)
            assert 0 <= base <= n
            # completions of a stopping ring need not be signalled: poll the used ring
            taken = q.wait(base, c.fe, timeout=30, require_call=False) if base else []
            assert sorted(u.head for u in taken) == sorted(r.head for r in reqs[:base])
            time.sleep(0.3)
            assert q.used_idx() == base, "a stopped ring went on"
            c.start_queue(q, base=base)
            rest = q.wait(n - base, c.fe, timeout=30)
            assert sorted(u.head for u in rest) == sorted(r.head for r in reqs[base:])
            assert [r.status_byte for r in reqs] == [S_OK] * n
        for i in range(n):
            assert c.read(4096 + i * 256, 128 * 1024) == pattern(128 * 1024, 60 + i)


def slots_client(server: Server) -> BlkClient:
    c = BlkClient(server.sock, want_protocol=KNOWN_PROTOCOL | (1 << PF_CONFIGURE_MEM_SLOTS))
    c.negotiate()
    if not c.protocol & (1 << PF_CONFIGURE_MEM_SLOTS):
        c.close()
        pytest.skip(f"{server.kind} does not offer CONFIGURE_MEM_SLOTS")
    return c


def read_via(c: BlkClient, buf: Buf, sector: int) -> Request:
    """A read of len(buf) bytes whose data buffer is ``buf`` (in any guest memory)."""
    req = c.build(T_IN, sector, in_len=buf.size)
    q = c.queues[0]
    _, d, s = q.chain_of[req.head]
    q.write_desc(d, buf.gpa, buf.size, DESC_F_NEXT | DESC_F_WRITE, s)
    req.data = [buf]
    return req


def test_memory_slots(served: Server) -> None:
    """CONFIGURE_MEM_SLOTS, as QEMU 7.2 uses it (the guest testbed's trace): the regions
    come one by one with ADD_MEM_REG; one added later (memory hot-plug) serves data at
    once; once removed with REM_MEM_REG its addresses no longer translate."""
    head = file_bytes(served.image, 0, 8192)
    with slots_client(served) as c:
        c.setup_memory()
        c.new_queues()
        c.start_queue(c.queues[0])
        c.write(64, pattern(8192, 31), segments=2)
        assert c.read(64, 8192) == pattern(8192, 31)
        extra = GuestMemory(1 << 20, nregions=1, gpa_bases=(0x4_0000_0000,),
                            uva_bases=(0x7F9A_0000_0000,))
        try:
            c.fe.add_mem_reg(extra.regions[0], extra.fd)
            buf = extra.alloc(8192)
            with c.mem.scratch():
                (req,) = c.run([read_via(c, buf, 0)])
                assert req.status_byte == S_OK and buf.read() == head
            c.fe.rem_mem_reg(extra.regions[0])
            log_before = len(served.log_text())
            with c.mem.scratch():
                req = read_via(c, extra.alloc(4096), 0)
                c.queues[0].publish([req.head])
                judge(served, c, log_before, [req])
        finally:
            extra.close()
    still_serves(served)


def test_add_mem_reg_without_fd(served: Server) -> None:
    with slots_client(served) as c:
        assert send_bad(served, c.fe, Req.ADD_MEM_REG, struct.pack(
            "<QQQQQ", 0, 0, 1 << 20, 0x7F00_0000_0000, 0)) != "alive"
    still_serves(served)


def test_backend_killed_and_restarted_inflight(kind: str, tmp_path: Path) -> None:
    """INFLIGHT_SHMFD: the back-end is killed (SIGKILL) with requests in flight; a new one
    on the same socket gets the front-end's inflight region back, the rings restart from
    the used index (what QEMU falls back to when GET_VRING_BASE cannot be asked), and every
    request published before the crash completes, exactly once, with its data on disk."""
    img = tmp_path / "disk.raw"
    make_raw(img)
    server = start_server(kind, f"aio:{img}", tmp_path)
    n, size = 96, 128 * 1024
    c = BlkClient(server.sock, want_protocol=KNOWN_PROTOCOL | (1 << PF_INFLIGHT_SHMFD))
    fd = -1
    try:
        c.negotiate()
        if not c.protocol & (1 << PF_INFLIGHT_SHMFD):
            pytest.skip(f"{kind} does not offer INFLIGHT_SHMFD")
        c.setup_memory()
        c.new_queues()
        q = c.queues[0]
        fd, msize, moff = c.fe.get_inflight_fd(1, q.size)
        assert msize > 0
        c.fe.set_inflight_fd(fd, msize, moff, 1, q.size)
        c.start_queue(q)
        reqs = [c.build(T_OUT, 4096 + i * (size // SECTOR), pattern(size, 200 + i),
                        indirect=True) for i in range(n)]
        q.publish([r.head for r in reqs])
        server.proc.kill()
        server.proc.wait()
        c.fe.close()
        server = start_server(kind, f"aio:{img}", tmp_path)
        # the guest's memory and rings stay as they were: a new connection, same memory
        c.fe = Frontend(server.sock, c.timeout)
        c.negotiate()
        c.setup_memory()
        c.fe.set_inflight_fd(fd, msize, moff, 1, q.size)
        base = q.used_idx()
        c.start_queue(q, base=base)
        q.reap()                               # what completed before the crash
        left = n - base
        done = q.wait(len(q.chain_of), c.fe, timeout=60) if q.chain_of else []
        assert len(done) <= left
        assert not q.chain_of, f"{len(q.chain_of)} requests lost"
        assert q.used_idx() == n               # none completed twice
        assert [r.status_byte for r in reqs] == [S_OK] * n
        for i in (0, n // 2, n - 1):
            assert c.read(4096 + i * (size // SECTOR), size) == pattern(size, 200 + i)
    finally:
        c.close()
        if fd >= 0:
            os.close(fd)
        assert server.stop() == 0
    with open(img, "rb") as f:
        f.seek(4096 * SECTOR)
        assert f.read(n * size) == b"".join(pattern(size, 200 + i) for i in range(n))


def test_firmware_then_linux(served: Server) -> None:
    """SeaBIOS drives the disk with few features, then Linux stops the ring, sets its own
    features twice and lays out new rings from index 0."""
    bios = (1 << F_VERSION_1) | (1 << F_PROTOCOL_FEATURES) | (1 << BLK_F_SEG_MAX)
    with served.client(want=bios) as c:
        assert not c.has(F_EVENT_IDX)
        c.write(0, b"S" * 4096)
        for q in c.queues:
            c.stop_queue(q)
        c.features = c.offered & KNOWN_FEATURES
        c.fe.set_features(c.features)
        c.fe.set_features(c.features)
        c.new_queues()
        for q in c.queues:
            c.start_queue(q)
        assert c.has(F_EVENT_IDX)
        for i in range(10):
            c.write(8 + i * 8, pattern(4096, i), indirect=True)
        assert c.read(0, 4096) == b"S" * 4096
        assert [c.read(8 + i * 8, 4096) for i in range(10)] == [pattern(4096, i)
                                                                for i in range(10)]
        for q in c.queues:         # reboot
            c.stop_queue(q)


def test_duplicate_setup_messages(served: Server) -> None:
    """QEMU sends SET_VRING_CALL twice and may repeat others: harmless."""
    with served.client() as c:
        q = c.queues[0]
        c.fe.set_vring_call(0, q.call_fd)
        c.fe.get_protocol_features()
        c.fe.set_vring_enable(0, True)
        c.write(0, b"D" * 4096)
        assert c.read(0, 4096) == b"D" * 4096


def test_reconnect_after_eof(served: Server) -> None:
    for i in range(3):
        with served.client() as c:
            if i:
                assert c.read(i * 8 - 8, 4096) == pattern(4096, 40 + i - 1)
            c.write(i * 8, pattern(4096, 40 + i))
    assert served.alive()


def test_one_front_end_at_a_time(served: Server) -> None:
    """A second front-end waits until the first is gone, then is served."""
    first = served.client()
    second = Frontend(served.sock, timeout=1.0)
    try:
        second.send(Req.GET_FEATURES)
        first.write(0, b"1" * 4096)
        assert not second.eof(0.2)
        r, _, _ = select.select([second.sock], [], [], 0.3)
        assert not r, "the second front-end was answered while the first is connected"
        first.close()
        second.sock.settimeout(10)
        assert second.recv_reply(Req.GET_FEATURES)
    finally:
        first.close()
        second.close()
    with served.client() as c:
        assert c.read(0, 4096) == b"1" * 4096


def test_cli_prints_the_absolute_socket_path(tmp_path: Path) -> None:
    """The one line a caller waits for, ``vhost-user:ABSOLUTE_PATH``, also for a socket
    named relative to the working directory."""
    img = tmp_path / "d.raw"
    make_raw(img, 4 * MiB)
    if not ours_supported():
        pytest.skip("blktap serve has no --vhost-user yet")
    proc = subprocess.Popen([tool("blktap"), "serve", f"aio:{img}", "--vhost-user", "rel.sock"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    try:
        r, _, _ = select.select([proc.stdout], [], [], 30)
        assert r, "nothing printed"
        assert proc.stdout is not None
        assert proc.stdout.readline() == f"vhost-user:{tmp_path.resolve() / 'rel.sock'}\n"
        with BlkClient(tmp_path / "rel.sock") as c:
            c.connect()
            assert c.read(0, 4096) == pattern(4096, 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert out == ""


def test_sigterm_exits_zero(served: Server) -> None:
    c = served.client()
    c.write(0, b"T" * 4096)
    assert served.stop() == 0
    c.close()
    assert file_bytes(served.image, 0, 4096) == b"T" * 4096


# ------------------------------------------------------------------------------ VHD chain


def test_vhd_chain_round_trip(kind: str, tmp_path: Path) -> None:
    """A chain made with vhd-util: data of the parent shows through, writes land in the
    leaf only; checked by converting the chain to raw with our tool and against qemu-img's
    reading of the parent."""
    if kind == "qsd":
        pytest.skip("qsd: QEMU's vpc driver does not open VHD differencing chains")
    base_raw = tmp_path / "base.raw"
    head = make_raw(base_raw, 32 * MiB, seed=2)
    base = tmp_path / "base.vhd"
    leaf = tmp_path / "leaf.vhd"
    assert run([tool("blktap"), "convert", "-O", "vhd", str(base_raw), str(base)]).returncode == 0
    res = run([tool("vhd-util"), "snapshot", "-n", str(leaf), "-p", str(base)], text=True)
    assert res.returncode == 0, res.stderr
    base_before = base.read_bytes()
    server = start_server(kind, f"vhd:{leaf}", tmp_path, serial=SERIAL)
    try:
        with server.client() as c:
            assert c.config["capacity"] == 32 * MiB // SECTOR
            assert c.read(0, MiB, segments=4) == head
            c.write(1024, pattern(256 * 1024, 8), indirect=True, segments=3)   # inside base data
            c.write(16384, pattern(64 * 1024, 9))                             # past it
            c.write_zeroes([(8, 8)])
            c.flush()
            assert c.read(1024, 128 * 1024) == pattern(256 * 1024, 8)[:128 * 1024]
        with server.client() as c:     # a new connection sees the same
            assert c.read(16384, 64 * 1024) == pattern(64 * 1024, 9)
    finally:
        assert server.stop() == 0
    assert base.read_bytes() == base_before, "the parent changed"
    flat = tmp_path / "flat.raw"
    res = run([tool("blktap"), "convert", "-O", "raw", f"vhd:{leaf}", str(flat)], text=True)
    assert res.returncode == 0, res.stderr
    expect = bytearray(head.ljust(32 * MiB, b"\0"))
    expect[1024 * SECTOR:1024 * SECTOR + 256 * 1024] = pattern(256 * 1024, 8)
    expect[16384 * SECTOR:16384 * SECTOR + 64 * 1024] = pattern(64 * 1024, 9)
    expect[8 * SECTOR:16 * SECTOR] = bytes(4096)
    assert flat.read_bytes() == bytes(expect)
    qemu_img = need("qemu-img")
    res = run([qemu_img, "compare", "-f", "vpc", "-F", "raw", str(base), str(base_raw)], text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# ------------------------------------------------------------------------------ bad input


def judge(server: Server, c: BlkClient, log_before: int, reqs: list[Request] | None = None,
          heads: int = 1, allow: tuple[int, ...] = (S_IOERR,)) -> str:
    """Wait for the outcome of bad requests published when the log was ``log_before``
    long: "status" (each completed with a status in ``allow``) or "dropped" (the back-end
    hung up and logged). Anything else fails."""
    q = c.queues[0]
    try:
        used = q.wait(heads, c.fe, timeout=5)
    except Dropped:
        outcome = "dropped"
    except TimeoutError:
        # qsd marks the device broken and hangs up on the next message: ask one
        outcome = "dropped" if c.fe.probe() == "dropped" or c.fe.eof(2) else "hung"
    else:
        if reqs is not None:
            statuses = [r.status_byte for r in reqs]
        elif c.crafted_status:       # a hand-made chain: its status byte, where it put one
            statuses = [c.crafted_status[-1].read(1)[0]]
        else:
            raise AssertionError(f"a chain with nowhere to put a status completed: {used}")
        assert all(s in allow for s in statuses), f"statuses {statuses}, expected {allow}"
        outcome = "status"
    assert outcome != "hung", "bad request neither completed nor dropped the front-end"
    if outcome == "dropped":
        assert logged_since(server, log_before), "dropped the front-end without a log line"
    return outcome


def logged_since(server: Server, size: int) -> bool:
    """Has the server written to its log since it was ``size`` long? (It may log just
    after hanging up: give it a moment.)"""
    deadline = time.monotonic() + 2
    while len(server.log_text()) <= size:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def still_serves(server: Server) -> None:
    assert server.alive(), f"{server.kind} died: {server.log_text()}"
    with server.client() as c:
        c.write(4000, b"ok" * 2048)
        assert c.read(4000, 4096) == b"ok" * 2048


def bad_chain(c: BlkClient, builder: Callable[[BlkClient], int | Request]) -> Request | None:
    q = c.queues[0]
    made = builder(c)
    head = made.head if isinstance(made, Request) else made
    q.publish([head])
    return made if isinstance(made, Request) else None


def hdr(c: BlkClient, rtype: int = T_IN, sector: int = 0) -> int:
    buf = c.mem.alloc(OUTHDR.size)
    buf.write(OUTHDR.pack(rtype, 0, sector))
    return buf.gpa


def crafted(c: BlkClient, descs: list[tuple[int, int, int, int]], head: int = 0) -> int:
    """Write raw descriptors at ring slots 0.. and return the head; the slots are taken
    from the free list so the driver does not reuse them."""
    q = c.queues[0]
    q.take(len(descs))
    for i, (addr, length, flags, nxt) in enumerate(descs):
        q.write_desc(i, addr, length, flags, nxt)
    q.chain_of[head] = list(range(len(descs)))
    return head


def status_gpa(c: BlkClient) -> int:
    """A device-writable status byte for a hand-made chain, remembered for judge()."""
    s = c.mem.alloc(1)
    s.write(b"\xff")
    c.crafted_status.append(s)
    return s.gpa


def _data_outside(c: BlkClient) -> int:
    return crafted(c, [(hdr(c), 16, DESC_F_NEXT, 1),
                       (c.mem.hole_gpa(), 4096, DESC_F_NEXT | DESC_F_WRITE, 2),
                       (status_gpa(c), 1, DESC_F_WRITE, 0)])


def _data_straddles_end(c: BlkClient) -> int:
    r = c.mem.regions[1]
    return crafted(c, [(hdr(c), 16, DESC_F_NEXT, 1),
                       (r.gpa + r.size - 512, 4096, DESC_F_NEXT | DESC_F_WRITE, 2),
                       (status_gpa(c), 1, DESC_F_WRITE, 0)])


def _header_outside(c: BlkClient) -> int:
    return crafted(c, [(c.mem.hole_gpa(), 16, DESC_F_NEXT, 1),
                       (status_gpa(c), 1, DESC_F_WRITE, 0)])


def _status_outside(c: BlkClient) -> int:
    return crafted(c, [(hdr(c, T_IN), 16, DESC_F_NEXT, 1),
                       (c.mem.alloc(512).gpa, 512, DESC_F_NEXT | DESC_F_WRITE, 2),
                       (c.mem.hole_gpa(), 1, DESC_F_WRITE, 0)])


def _loop(c: BlkClient) -> int:
    return crafted(c, [(hdr(c), 16, DESC_F_NEXT, 1),
                       (c.mem.alloc(512).gpa, 512, DESC_F_NEXT | DESC_F_WRITE, 2),
                       (status_gpa(c), 1, DESC_F_WRITE | DESC_F_NEXT, 1)])


def _next_beyond_ring(c: BlkClient) -> int:
    return crafted(c, [(hdr(c), 16, DESC_F_NEXT, 1),
                       (status_gpa(c), 1, DESC_F_WRITE | DESC_F_NEXT, c.queue_size + 3)])


def _head_beyond_ring(c: BlkClient) -> int:
    crafted(c, [(hdr(c), 16, DESC_F_NEXT, 1), (status_gpa(c), 1, DESC_F_WRITE, 0)])
    c.queues[0].chain_of[c.queue_size + 5] = []
    return c.queue_size + 5


def indirect_longer_than_ring(c: BlkClient) -> tuple[int, list]:
    """An indirect table of more entries than the queue size (virtio 1.1 2.6.5.3.1: the
    driver must not), each a valid 512-byte read."""
    n = c.queue_size + 2
    table = c.mem.alloc(16 * n, align=16)
    q = c.queues[0]
    q.write_desc(0, hdr(c), 16, DESC_F_NEXT, 1, table=table)
    bufs = []
    for k in range(1, n - 1):
        bufs.append(c.mem.alloc(512))
        q.write_desc(k, bufs[-1].gpa, 512, DESC_F_NEXT | DESC_F_WRITE, k + 1, table=table)
    q.write_desc(n - 1, status_gpa(c), 1, DESC_F_WRITE, 0, table=table)
    return crafted(c, [(table.gpa, table.size, DESC_F_INDIRECT, 0)]), bufs


def _indirect_loop(c: BlkClient) -> int:
    table = c.mem.alloc(16 * 3, align=16)
    q = c.queues[0]
    q.write_desc(0, hdr(c), 16, DESC_F_NEXT, 1, table=table)
    q.write_desc(1, c.mem.alloc(512).gpa, 512, DESC_F_NEXT | DESC_F_WRITE, 2, table=table)
    q.write_desc(2, status_gpa(c), 1, DESC_F_NEXT | DESC_F_WRITE, 0, table=table)
    return crafted(c, [(table.gpa, table.size, DESC_F_INDIRECT, 0)])


def _indirect_outside(c: BlkClient) -> int:
    return crafted(c, [(c.mem.hole_gpa(), 48, DESC_F_INDIRECT, 0)])


def _indirect_bad_length(c: BlkClient) -> int:
    table = c.mem.alloc(48, align=16)
    q = c.queues[0]
    q.write_desc(0, hdr(c), 16, DESC_F_NEXT, 1, table=table)
    q.write_desc(1, status_gpa(c), 1, DESC_F_WRITE, 0, table=table)
    return crafted(c, [(table.gpa, 20, DESC_F_INDIRECT, 0)])


def _indirect_nested(c: BlkClient) -> int:
    inner = c.mem.alloc(32, align=16)
    q = c.queues[0]
    q.write_desc(0, hdr(c), 16, DESC_F_NEXT, 1, table=inner)
    q.write_desc(1, status_gpa(c), 1, DESC_F_WRITE, 0, table=inner)
    outer = c.mem.alloc(16, align=16)
    q.write_desc(0, inner.gpa, 32, DESC_F_INDIRECT, 0, table=outer)
    return crafted(c, [(outer.gpa, 16, DESC_F_INDIRECT, 0)])


def _read_into_readonly(c: BlkClient) -> Request:
    """A read whose data buffer is device-readable: the device may not write there."""
    req = c.build(T_IN, 0, in_len=4096)
    q = c.queues[0]
    d = q.chain_of[req.head][1]
    q.write_desc(d, req.data[0].gpa, 4096, DESC_F_NEXT, q.chain_of[req.head][2])
    req.data[0].write(b"\xee" * 4096)
    return req


def _write_from_writable(c: BlkClient) -> Request:
    """A write whose data buffer is device-writable (so it comes after the in part)."""
    req = c.build(T_OUT, 0, out=b"\xdd" * 4096)
    q = c.queues[0]
    d = q.chain_of[req.head][1]
    q.write_desc(d, req.data[0].gpa, 4096, DESC_F_NEXT | DESC_F_WRITE, q.chain_of[req.head][2])
    return req


def _readonly_status(c: BlkClient) -> Request:
    req = c.build(T_IN, 0, in_len=512)
    q = c.queues[0]
    s = q.chain_of[req.head][2]
    q.write_desc(s, req.status.gpa, 1, 0, 0)
    return req


def _no_status(c: BlkClient) -> int:
    return crafted(c, [(hdr(c, T_OUT, 0), 16, DESC_F_NEXT, 1), (c.mem.alloc(512).gpa, 512, 0, 0)])


def _short_header(c: BlkClient) -> int:
    return crafted(c, [(hdr(c), 8, DESC_F_NEXT, 1), (status_gpa(c), 1, DESC_F_WRITE, 0)])


def _odd_length_read(c: BlkClient) -> Request:
    return c.build(T_IN, 0, in_len=1000)


def _discard_too_many_segments(c: BlkClient) -> Request:
    segs = c.config["max_discard_seg"] + 1
    return c.build(T_DISCARD, out=b"".join(SEGMENT.pack(i * 8, 8, 0) for i in range(segs)))


def _discard_too_long(c: BlkClient) -> Request:
    return c.build(T_DISCARD, out=SEGMENT.pack(0, c.config["max_discard_sectors"] + 8, 0))


def _write_zeroes_truncated_segment(c: BlkClient) -> Request:
    return c.build(T_WRITE_ZEROES, out=SEGMENT.pack(0, 8, 0)[:10])


CHAINS: dict[str, Callable[[BlkClient], int | Request]] = {
    "data-outside-memory": _data_outside,
    "data-straddles-region-end": _data_straddles_end,
    "header-outside-memory": _header_outside,
    "status-outside-memory": _status_outside,
    "loop": _loop,
    "next-beyond-ring": _next_beyond_ring,
    "head-beyond-ring": _head_beyond_ring,
    "indirect-loop": _indirect_loop,
    "indirect-outside-memory": _indirect_outside,
    "indirect-bad-length": _indirect_bad_length,
    "indirect-nested": _indirect_nested,
    "read-into-readonly-buffer": _read_into_readonly,
    "write-from-writable-buffer": _write_from_writable,
    "readonly-status": _readonly_status,
    "no-status": _no_status,
    "short-header": _short_header,
    "odd-length-read": _odd_length_read,
    "discard-too-many-segments": _discard_too_many_segments,
    "discard-too-long": _discard_too_long,
    "write-zeroes-truncated-segment": _write_zeroes_truncated_segment,
}
# where qsd (libvhost-user, QEMU 7.2) does not do what we ask of ours
QSD_DIFFERS = {
    "indirect-nested": "qsd logs 'request missing headers' and never completes the request",
    "no-status": "qsd logs 'request missing headers' and never completes the request",
    "short-header": "qsd logs 'outhdr too short' and never completes the request",
    "read-into-readonly-buffer": "qsd completes a read whose data buffer is device-readable "
                                 "with OK (and 0 bytes read)",
    "write-from-writable-buffer": "qsd completes a write whose data buffer is "
                                  "device-writable with OK",
}


@pytest.mark.parametrize("case", list(CHAINS))
def test_bad_chain(served: Server, case: str) -> None:
    if served.kind == "qsd" and case in QSD_DIFFERS:
        pytest.skip(f"qsd: {QSD_DIFFERS[case]}")
    before = file_bytes(served.image, 0, 8192)
    with served.client() as c:
        log_before = len(served.log_text())
        req = bad_chain(c, CHAINS[case])
        outcome = judge(served, c, log_before, [req] if req else None,
                        allow=(S_IOERR, S_UNSUPP) if req else (S_IOERR,))
        if outcome == "status":
            # the device must not have written into a buffer it may only read
            if case == "read-into-readonly-buffer":
                assert req is not None and req.data[0].read() == b"\xee" * 4096
            assert c.read(0, 8192) == before            # the connection still works
    assert file_bytes(served.image, 0, 8192) == before
    still_serves(served)


def test_indirect_table_longer_than_ring(served: Server) -> None:
    """The spec forbids the driver such a chain but says nothing of the device: QEMU and
    libvhost-user bound an indirect chain by its table's length, not the queue size. So
    either the read is done right (every buffer filled) or it is refused; nothing else."""
    head = file_bytes(served.image, 0, 128 * SECTOR)
    with served.client() as c:
        log_before = len(served.log_text())
        _, bufs = indirect_longer_than_ring(c)
        c.queues[0].publish([0])
        try:
            c.queues[0].wait(1, c.fe, timeout=5)
        except (Dropped, TimeoutError):
            assert judge(served, c, log_before) == "dropped"
        else:
            status = c.crafted_status[-1].read(1)[0]
            assert status in (S_OK, S_IOERR), status
            if status == S_OK:
                assert b"".join(b.read() for b in bufs) == head
    still_serves(served)


def test_bad_ring_address(served: Server) -> None:
    """Ring addresses are front-end virtual addresses: a guest-physical address, or one in
    no region, does not translate."""
    for desc_addr in ("gpa", "hole"):
        with BlkClient(served.sock) as c:
            c.negotiate()
            c.setup_memory()
            c.new_queues()
            q = c.queues[0]
            addr = q.desc.gpa if desc_addr == "gpa" else 0xDEAD_0000_0000
            log_before = len(served.log_text())
            try:
                c.fe.set_vring_num(0, q.size)
                c.fe.set_vring_base(0, 0)
                c.fe.set_vring_addr(0, addr, q.used.uva, q.avail.uva)
                c.fe.set_vring_call(0, q.call_fd)
                c.fe.set_vring_kick(0, q.kick_fd)
                c.fe.set_vring_enable(0, True)
                outcome = c.fe.probe()
            except Nack:
                outcome = "refused"
            except Dropped:
                outcome = "dropped"
            assert outcome in ("refused", "dropped"), outcome
            if outcome == "dropped":
                assert logged_since(served, log_before), "dropped without a log line"
        still_serves(served)


def message_outcome(server: Server, fe: Frontend, log_before: int) -> str:
    """After a bad message sent when the log was ``log_before`` long, with no ack asked:
    "dropped" (with a log line) or "alive" (the back-end still answers and stays)."""
    state = fe.probe()
    if state == "alive" and fe.eof(1.0):
        state = "dropped"
    if state == "dropped":
        assert logged_since(server, log_before), "dropped the front-end without a log line"
    return state


def send_bad(server: Server, fe: Frontend, req: int, payload: bytes,
             fds: list[int] | None = None) -> str:
    """Send a message the back-end must refuse, with NEED_REPLY when REPLY_ACK is on: the
    outcome is a non-zero ack ("refused") or a hang-up with a log line ("dropped")."""
    log_before = len(server.log_text())
    fe.send(req, payload, fds or [], VERSION | (FLAG_NEED_REPLY if fe.reply_ack else 0))
    if not fe.reply_ack:
        return message_outcome(server, fe, log_before)
    try:
        data = fe.recv_reply(req)
    except (Dropped, TimeoutError, OSError):
        assert logged_since(server, log_before), "dropped the front-end without a log line"
        return "dropped"
    (value,) = struct.unpack("<Q", data)
    if value == 0:
        # qsd acks 0 and then hangs up (libvhost-user's vu_panic): a drop all the same
        assert fe.eof(2), "back-end acked a bad message with 0 and carried on"
        assert logged_since(server, log_before), "dropped the front-end without a log line"
        return "dropped"
    return "refused"


MESSAGES = ["truncated-eof", "short-payload", "oversized", "unknown-type",
            "mem-table-no-fds", "mem-table-too-many-regions", "mem-table-fd-too-small",
            "vring-num-not-power-of-2", "vring-num-zero", "vring-num-too-big",
            "vring-index-out-of-range", "kick-index-out-of-range", "reply-flag-from-front-end",
            "bad-version"]
LAX = "libvhost-user does not check it and acks 0"
MSG_QSD_DIFFERS = {
    "short-payload": "libvhost-user does not check the payload size of SET_VRING_NUM",
    "mem-table-fd-too-small": "libvhost-user maps the region without checking the fd's size",
    "vring-num-not-power-of-2": LAX,
    "vring-num-zero": LAX,
    "vring-num-too-big": LAX,
    "vring-index-out-of-range": "libvhost-user does not check SET_VRING_NUM's index",
    "bad-version": "libvhost-user does not check the version bits of a request",
}


def mem_table(regions: list, nregions: int | None = None) -> bytes:
    return struct.pack("<II", len(regions) if nregions is None else nregions, 0) + b"".join(
        struct.pack("<QQQQ", r.gpa, r.size, r.uva, r.offset) for r in regions)


@pytest.mark.parametrize("case", MESSAGES)
def test_bad_message(served: Server, case: str) -> None:
    if served.kind == "qsd" and case in MSG_QSD_DIFFERS:
        pytest.skip(f"qsd: {MSG_QSD_DIFFERS[case]}")
    with BlkClient(served.sock) as c:
        fe = c.fe
        c.negotiate()
        if case == "truncated-eof":
            fe.send_raw(HEADER.pack(Req.SET_FEATURES, VERSION, 8) + b"\x01\x02\x03")
            fe.close()
        elif case == "short-payload":
            assert send_bad(served, fe, Req.SET_VRING_NUM, b"\0\0\0\0") != "alive"
        elif case == "oversized":
            log_before = len(served.log_text())
            fe.send_raw(HEADER.pack(Req.SET_FEATURES, VERSION, 0x7FFF_FFF0) + bytes(64))
            assert fe.eof(5), "an oversized message did not drop the front-end"
            assert logged_since(served, log_before)
        elif case == "unknown-type":
            assert send_bad(served, fe, 99, struct.pack("<Q", 0)) != "alive"
        elif case == "mem-table-no-fds":
            assert send_bad(served, fe, Req.SET_MEM_TABLE, mem_table(c.mem.regions)) != "alive"
        elif case == "mem-table-too-many-regions":
            regions = c.mem.regions * 5
            assert send_bad(served, fe, Req.SET_MEM_TABLE, mem_table(regions),
                            [c.mem.fd] * len(regions)) != "alive"
        elif case == "mem-table-fd-too-small":
            # a region bigger than its fd: touching its end would be SIGBUS
            small = GuestMemory(1 << 20, nregions=1)
            big = [type(c.mem.regions[0])(0, 64 << 20, 0x7F00_0000_0000, 0)]
            try:
                assert send_bad(served, fe, Req.SET_MEM_TABLE, mem_table(big),
                                [small.fd]) != "alive"
            finally:
                small.close()
        elif case.startswith("vring-"):
            c.setup_memory()
            index, num = {"vring-num-not-power-of-2": (0, 100), "vring-num-zero": (0, 0),
                          "vring-num-too-big": (0, 65536),
                          "vring-index-out-of-range": (7, 128)}[case]
            assert send_bad(served, fe, Req.SET_VRING_NUM,
                            struct.pack("<II", index, num)) != "alive"
        elif case == "kick-index-out-of-range":
            fd = os.eventfd(0)
            try:
                assert send_bad(served, fe, Req.SET_VRING_KICK, struct.pack("<Q", 9),
                                [fd]) != "alive"
            finally:
                os.close(fd)
        elif case == "reply-flag-from-front-end":
            # a "reply" sent to a back-end is no request: refusing or ignoring both do
            log_before = len(served.log_text())
            fe.send(Req.GET_FEATURES, b"", (), VERSION | FLAG_REPLY)
            message_outcome(served, fe, log_before)
        elif case == "bad-version":
            log_before = len(served.log_text())
            fe.send(Req.GET_FEATURES, b"", (), 0x2)
            assert message_outcome(served, fe, log_before) == "dropped"
    still_serves(served)


def test_vanish_mid_request(served: Server) -> None:
    """The front-end goes away with requests in flight: the back-end stops the rings,
    unmaps, and serves the next one."""
    for _ in range(3):
        c = served.client()
        reqs = [c.build(T_OUT, i * 256, pattern(128 * 1024, i)) for i in range(32)]
        c.queues[0].publish([r.head for r in reqs])
        c.close()
    still_serves(served)


def test_vanish_after_mem_table(served: Server) -> None:
    for step in ("features", "mem", "rings-not-enabled"):
        c = BlkClient(served.sock)
        c.negotiate()
        if step != "features":
            c.setup_memory()
        if step == "rings-not-enabled":
            c.new_queues()
            c.fe.set_vring_num(0, c.queue_size)
            c.fe.set_vring_addr(0, c.queues[0].desc.uva, c.queues[0].used.uva,
                                c.queues[0].avail.uva)
        c.close()
    still_serves(served)
