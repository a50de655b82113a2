"""The compiled inline path over a qcow2 image's clusters (and over the holes of a disk
without a parent: qcow2 and dynamic VHD).

- ``nbd_pump`` with an L1 table and L2 tables made by hand: plain data clusters read
  (across clusters, across tables), written only where the image owns them (COPIED);
  every other entry (compressed, reserved bits, misaligned, shared, a table not in the
  cache) left to the Python path; holes and zero clusters answered as a hole chunk
  (structured) or zeros (simple) only where the disk has no parent; a read partly of
  zeros left to the Python path in a structured session (it answers it in chunks);
  targets of the wrong shape refused before anything is served;
- the guard: while a pass holds it, the library does not free a cluster;
- end to end against images qemu made (compressed, zero, data clusters, holes; an
  overlay over a backing file): the same answers, disk and statistics with the compiled
  path on and off; libnbd with 64 in flight checked by qemu-img check and compare;
  random pipelines with discards and write-zeroes racing the compiled path, checked
  against a model and by qemu-img check;
- a writable qcow2 with persistent bitmaps loses their autoclear bit before any write
  goes around the library.
"""

from __future__ import annotations

import array
import asyncio
import random
import struct
import threading
from pathlib import Path

import pytest

from blktap.image.qcow2 import structs as s
from blktap.io.threads import ThreadEngine
from blktap.tapdisk.driver import STATE_HOLE, STATE_ZERO, InlineTarget
from blktap.tapdisk.drivers import open_stack
from blktap.tapdisk.vbd import VBD
from blktap.transport.nbd import connection, inline
from blktap.transport.nbd import proto as p
from qcow2_helpers import qemu_check, qemu_img, qemu_io, qemu_raw
from test_fast_path import (
    READ,
    STATUS,
    TRIM,
    WRITE,
    ZEROES,
    arun,
    attach,
    data,
    exchange,
    nbd_served,
    need_libnbd,
    qemu_compare,
    req,
    settled,
    shm,  # noqa: F401  (a fixture)
)
from test_nbd_inline import (
    Bench,
    Pumped,
    assert_same_bursts,
    compiled,
    count_inline,
    images_hits,
    on_and_off,
    pieces_of,
    run_burst,
    run_libnbd,
)

MiB = 1 << 20
KiB = 1 << 10
CLUSTER = 64 * KiB
SECTOR = 512
COPIED = s.OFLAG_COPIED


# ------------------------------------------------------------------------- by hand
class Clusters(Bench):
    """A file laid out as a qcow2 image's clusters would be, by hand: 64 KiB clusters,
    16 entries per L2 table (so a 1 MiB disk spans two tables), the file's clusters
    placed out of order:

    table 0 (at file offset 0x10000): cluster 0 at file cluster 5 (owned), 1 at 3
    (owned), 2 at 9 (shared: no COPIED), 3 unallocated, 4 zero flag, 5 zero flag with
    a host cluster, 6 compressed, 7 with a reserved bit, 8 at a misaligned offset, 9 at
    file cluster 12 (owned), the rest unallocated;
    table 1 (L1 entry 1): not in the cache; L1 entry 2: no table (holes)."""

    ENTRIES = 16

    def __init__(self, folder: Path) -> None:
        super().__init__(folder, size=48 * CLUSTER)
        self.disk_size = 3 * self.ENTRIES * CLUSTER
        self.l1 = array.array("Q", [0x10000 | COPIED, 0x20000 | COPIED, 0])
        t = array.array("Q", [0] * self.ENTRIES)
        t[0] = 5 * CLUSTER | COPIED
        t[1] = 3 * CLUSTER | COPIED
        t[2] = 9 * CLUSTER
        t[4] = s.OFLAG_ZERO
        t[5] = 7 * CLUSTER | COPIED | s.OFLAG_ZERO
        t[6] = s.OFLAG_COMPRESSED | 20 * CLUSTER
        t[7] = 11 * CLUSTER | COPIED | (1 << 1)
        t[8] = 13 * CLUSTER + 512 | COPIED
        t[9] = 12 * CLUSTER | COPIED
        self.table = t
        self.tables = {0x10000: t}

    def place(self, disk: int) -> int:
        cluster, within = divmod(disk, CLUSTER)
        return (self.table[cluster] & s.L2_OFFSET_MASK) + within

    def pump(self, stream: bytes, *, structured: bool = True, memory: bool = True,
             writes: bool = True, budget: int = 64, max_length: int = inline.MAX_LENGTH,
             size: int | None = None, holes_zero: bool = False,
             zero_flag: bool = False, l1: object = None, tables: object = None,
             bits: int = 16, entries: int | None = None, status_id: int = 0) -> Pumped:
        self.rbuf[: len(stream)] = stream
        target = InlineTarget(
            self.fd, self.disk_size if size is None else size, memory, writes,
            l1=self.l1 if l1 is None else l1,
            l2_tables=self.tables if tables is None else tables, cluster_bits=bits,
            l2_entries=self.ENTRIES if entries is None else entries,
            holes_zero=holes_zero, zero_flag=zero_flag)
        return Pumped(compiled()(self.server.fileno(), self.rbuf, 0, len(stream),
                                 self.scratch, target, structured, budget, max_length,
                                 status_id))


@pytest.fixture
def clusters(shm: Path):  # noqa: F811
    b = Clusters(shm)
    try:
        yield b
    finally:
        b.close()


def test_pump_reads_plain_data_clusters_where_the_tables_place_them(
        clusters: Clusters) -> None:
    """Reads inside a cluster and across owned and shared data clusters (out of order in
    the file) are served from their places; a read touching any other kind of entry, a
    table not in the cache or an L1 entry without a table stops the pass there."""
    b = clusters
    served = [(0, 4096), (CLUSTER - 4096, 8192), (CLUSTER + 512, 2 * CLUSTER - 512),
              (9 * CLUSTER, CLUSTER)]
    stream = b"".join(req(READ, off, n, handle=i) for i, (off, n) in enumerate(served))
    out = b.pump(stream, structured=False)
    assert (out.start, out.reads) == (len(stream), len(served))
    got = b.recv(out.used)
    pos = 0
    for i, (off, n) in enumerate(served):
        assert got[pos : pos + 16] == p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, i)
        want = b"".join(b.content[b.place(o) : b.place(o) + CLUSTER - o % CLUSTER]
                        for o in range(off - off % CLUSTER, off + n, CLUSTER))
        skip = off % CLUSTER
        assert got[pos + 16 : pos + 16 + n] == want[skip : skip + n], i
        pos += 16 + n
    for off, n in ((3 * CLUSTER, 4096), (2 * CLUSTER, CLUSTER + 4096), (4 * CLUSTER, 512),
                   (5 * CLUSTER, 4096), (6 * CLUSTER, 4096), (7 * CLUSTER, 4096),
                   (8 * CLUSTER, 4096), (16 * CLUSTER, 4096), (32 * CLUSTER, 4096),
                   (15 * CLUSTER, 2 * CLUSTER)):
        for structured in (True, False):
            out = b.pump(req(READ, off, n, handle=9), structured=structured)
            assert (out.start, out.reads, out.used) == (0, 0, 0), (off, n)


def test_pump_writes_only_clusters_the_image_owns(clusters: Clusters) -> None:
    """A write inside an owned cluster lands at its place; a write to a shared cluster,
    a hole, a zero cluster (even with a host cluster), a compressed or reserved entry, or
    across two clusters (even both owned) is the Python path's, the file unchanged."""
    b = clusters
    before = b.path.read_bytes()
    for off, n in ((2 * CLUSTER, 4096), (3 * CLUSTER, 4096), (4 * CLUSTER, 4096),
                   (5 * CLUSTER, 4096), (6 * CLUSTER, 4096), (7 * CLUSTER, 4096),
                   (CLUSTER - 4096, 8192), (32 * CLUSTER, 4096), (16 * CLUSTER, 512)):
        out = b.pump(req(WRITE, off, n, handle=9, payload=b"w" * n), holes_zero=True,
                     zero_flag=True)
        assert (out.start, out.writes) == (0, 0), (off, n)
    assert b.path.read_bytes() == before
    one = data(41, 8192)
    out = b.pump(req(WRITE, CLUSTER + 4096, 8192, handle=7, payload=one))
    assert (out.writes, out.write_bytes) == (1, 8192)
    assert b.recv(16) == p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, 7)
    after = b.path.read_bytes()
    at = b.place(CLUSTER + 4096)
    assert after[at : at + 8192] == one
    assert after[:at] == before[:at] and after[at + 8192 :] == before[at + 8192 :]


def test_pump_answers_holes_and_zero_clusters_of_a_disk_without_a_parent(
        clusters: Clusters) -> None:
    """With holes_zero (no parent): an unallocated cluster, an L1 entry without a table,
    and (with zero_flag, version 3) zero clusters read as zeros: one hole chunk in a
    structured session, zeros in a simple one. A read partly of zeros and partly of data
    is the Python path's in a structured session (it answers in a chunk per run) and
    zeros then data in a simple one. Without zero_flag a zero cluster is the Python
    path's; without holes_zero, a hole is."""
    b = clusters
    zeros = [(3 * CLUSTER, 4096), (4 * CLUSTER, CLUSTER), (5 * CLUSTER + 512, 1024),
             (32 * CLUSTER, 3 * CLUSTER), (10 * CLUSTER, 6 * CLUSTER)]
    stream = b"".join(req(READ, off, n, handle=i) for i, (off, n) in enumerate(zeros))
    out = b.pump(stream, holes_zero=True, zero_flag=True)
    assert (out.start, out.reads, out.used) == (len(stream), len(zeros), 32 * len(zeros))
    got = b.recv(out.used)
    for i, (off, n) in enumerate(zeros):
        assert got[32 * i : 32 * i + 32] == p.CHUNK_OFFSET_HOLE.pack(
            p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_OFFSET_HOLE, i, 12,
            off, n)
    out = b.pump(stream, structured=False, holes_zero=True, zero_flag=True)
    assert out.reads == len(zeros)
    # More than the socket takes: what it did not is handed back (the caller queues it).
    got = b.recv(out.sent) + bytes(b.scratch[out.sent : out.used])
    pos = 0
    for i, (_off, n) in enumerate(zeros):
        assert got[pos : pos + 16 + n] == p.SIMPLE_REPLY.pack(
            p.SIMPLE_REPLY_MAGIC, 0, i) + bytes(n)
        pos += 16 + n
    mixed = req(READ, 2 * CLUSTER, 2 * CLUSTER, handle=5)  # shared data, then a hole
    out = b.pump(mixed, holes_zero=True, zero_flag=True)
    assert (out.start, out.reads) == (0, 0)
    out = b.pump(mixed, structured=False, holes_zero=True, zero_flag=True)
    assert out.reads == 1
    got = b.recv(out.used)
    at = b.place(2 * CLUSTER)
    assert got[16:] == b.content[at : at + CLUSTER] + bytes(CLUSTER)
    for off, options in ((4 * CLUSTER, {"holes_zero": True}),
                         (3 * CLUSTER, {"zero_flag": True}),
                         (32 * CLUSTER, {"zero_flag": True})):
        out = b.pump(req(READ, off, 4096), **options)
        assert (out.start, out.reads) == (0, 0), (off, options)


def status_reply(handle: int, runs: list[tuple[int, int]], ctx: int = 1) -> bytes:
    payload = struct.pack(f">I{2 * len(runs)}I", ctx, *(v for run in runs for v in run))
    return p.CHUNK.pack(p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                        p.REPLY_TYPE_BLOCK_STATUS, handle, len(payload)) + payload


HZ = STATE_HOLE | STATE_ZERO


def test_pump_answers_block_status_from_the_tables(clusters: Clusters) -> None:
    """With base:allocation's id: a block status whose every cluster the tables tell is
    answered in the pass, runs of the same state merged (data: plain or compressed
    clusters; hole and zero: unallocated, zero clusters, an L1 entry without a table,
    where the disk has no parent), the handle and context id echoed, REQ_ONE's one run;
    reads behind it are served in the same pass."""
    b = clusters
    C = CLUSTER
    stream = (req(STATUS, 0, 7 * C, handle=1) + req(STATUS, 9 * C, 7 * C, handle=2)
              + req(STATUS, 0, 7 * C, handle=3, flags=p.CMD_FLAG_REQ_ONE)
              + req(STATUS, 32 * C, 16 * C, handle=4, flags=p.CMD_FLAG_FUA)
              + req(STATUS, 3 * C + 512, 1024, handle=5) + req(READ, 0, 4096, handle=6))
    out = b.pump(stream, holes_zero=True, zero_flag=True, status_id=7)
    assert (out.start, out.statuses, out.reads, out.error) == (len(stream), 5, 1, 0)
    expect = [status_reply(1, [(3 * C, 0), (3 * C, HZ), (C, 0)], 7),
              status_reply(2, [(C, 0), (6 * C, HZ)], 7),
              status_reply(3, [(3 * C, 0)], 7),
              status_reply(4, [(16 * C, HZ)], 7),
              status_reply(5, [(1024, HZ)], 7)]
    got = b.recv(out.used)
    assert got[: sum(map(len, expect))] == b"".join(expect)
    at = b.place(0)
    assert got[sum(map(len, expect)) + p.CHUNK.size + 8:] == b.content[at : at + 4096]


@pytest.mark.parametrize("why, status, options", [
    ("no status id", req(STATUS, 0, CLUSTER), {"status_id": 0}),
    ("simple replies", req(STATUS, 0, CLUSTER), {"structured": False}),
    ("a reserved bit", req(STATUS, 6 * CLUSTER, 2 * CLUSTER), {}),
    ("a misaligned cluster", req(STATUS, 8 * CLUSTER, CLUSTER), {}),
    ("a table not cached", req(STATUS, 15 * CLUSTER, 2 * CLUSTER), {}),
    ("a zero flag without its meaning", req(STATUS, 4 * CLUSTER, CLUSTER),
     {"zero_flag": False}),
    ("a hole with a parent", req(STATUS, 3 * CLUSTER, CLUSTER), {"holes_zero": False}),
    ("past the end", req(STATUS, 47 * CLUSTER, 2 * CLUSTER), {}),
    ("unaligned", req(STATUS, 512 + 1, 512), {}),
    ("an invalid flag", req(STATUS, 0, CLUSTER, flags=p.CMD_FLAG_DF), {}),
])
def test_pump_leaves_block_status_it_cannot_tell_to_python(
        clusters: Clusters, why: str, status: bytes, options: dict) -> None:
    """A block status with any byte the tables do not tell, or one the Python path must
    answer with an error: untouched, and nothing behind it served."""
    kwargs = {"holes_zero": True, "zero_flag": True, "status_id": 1, **options}
    out = clusters.pump(status + req(READ, 0, 4096, handle=9), **kwargs)
    assert (out.start, out.statuses, out.reads, out.used) == (0, 0, 0, 0), why


def test_pump_cuts_block_status_at_its_limits(clusters: Clusters) -> None:
    """A length past MAX_STATUS_LENGTH is cut to it (a disk of 4 GiB of one hole); an
    answer of more than MAX_STATUS_EXTENTS runs keeps the first ones (blocks of data and
    holes taking turns)."""
    _inline = pytest.importorskip("blktap.transport.nbd._inline")
    assert (_inline.MAX_STATUS_LENGTH, _inline.MAX_STATUS_EXTENTS) == (
        connection.MAX_STATUS_LENGTH, connection.MAX_STATUS_EXTENTS)
    b = clusters
    whole = 4 << 30
    out = b.pump(req(STATUS, 0, whole - SECTOR, handle=1), size=whole, holes_zero=True,
                 status_id=1, l1=array.array("Q", [0] * 8), entries=8192)
    assert out.statuses == 1
    assert b.recv(out.used) == status_reply(1, [(connection.MAX_STATUS_LENGTH, HZ)])
    # (a qcow2 pass pins 16 tables at most: runs this many take a map of small blocks)
    blocks, block = 1 << 17, 4096
    bat = array.array("I", [7 if i % 2 == 0 else 0xFFFFFFFF for i in range(blocks)])
    batmap = bytearray([0xAA]) * (blocks // 8)
    b.rbuf[: p.REQUEST.size] = req(STATUS, 0, blocks * block, handle=2)
    target = InlineTarget(b.fd, blocks * block, True, False, bat, batmap, block, 1,
                          holes_zero=True)
    out = Pumped(compiled()(b.server.fileno(), b.rbuf, 0, p.REQUEST.size, b.scratch,
                            target, True, 64, inline.MAX_LENGTH, 1))
    assert out.statuses == 1 and out.used == 24 + 8 * connection.MAX_STATUS_EXTENTS
    got = b.recv(out.sent) + bytes(b.scratch[out.sent : out.used])
    runs = [(block, 0 if i % 2 == 0 else HZ) for i in range(connection.MAX_STATUS_EXTENTS)]
    assert got == status_reply(2, runs)


def test_pump_refuses_qcow2_targets_of_the_wrong_shape(clusters: Clusters) -> None:
    """An L1 table or an L2 table that is not an array of 64-bit words, tables that are
    not a dict, a table shorter than l2_entries, cluster bits out of range, l2_entries
    larger than a cluster holds, a BAT and an L1 table at once, a layer below with layers
    of its own: each raises before a request is served."""
    b = clusters
    stream = req(READ, 0, 4096, handle=1)
    bad = [
        {"l1": bytearray(24)},
        {"l1": array.array("I", [0x10000])},
        {"tables": [b.table]},
        {"tables": {0x10000: bytes(128)}},
        {"tables": {0x10000: array.array("Q", [0] * 4)}},
        {"bits": 8},
        {"bits": 22},
        {"entries": 0},
        {"entries": CLUSTER // 8 + 1},
    ]
    for options in bad:
        with pytest.raises((TypeError, ValueError)):
            b.pump(stream, **options)  # type: ignore[arg-type]
    target = InlineTarget(b.fd, b.disk_size, True, True, l1=b.l1, l2_tables=b.tables,
                          cluster_bits=16, l2_entries=b.ENTRIES)
    for wrong in (target._replace(bat=array.array("I", [1]), batmap=bytearray(1),
                                  block_bytes=CLUSTER),
                  target._replace(below=(InlineTarget(
                      b.fd, b.disk_size, True, False,
                      below=(InlineTarget(b.fd, b.disk_size, True, False),)),))):
        with pytest.raises(ValueError):
            compiled()(b.server.fileno(), b.rbuf, 0, len(stream), b.scratch, wrong, True,
                       1, 4096)
    b.client.setblocking(False)
    with pytest.raises(BlockingIOError):
        b.client.recv(1)


def test_the_guard_keeps_clusters_from_being_freed_under_a_pass(
        shm: Path) -> None:  # noqa: F811
    """While the driver's free_guard is held (as the transport holds it for a pass), a
    discard changes the L2 entry but does not free the cluster: it waits, and finishes
    once the guard is let go."""
    path = shm / "g.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    qemu_io(path, "write -P 7 0 1M")

    async def body(engine: ThreadEngine) -> None:
        drv = await engine.call(open_stack, engine, f"qcow2:{path}", writable=True)
        vbd = VBD(drv)
        target = vbd.inline_target()
        assert target is not None and target.guard is drv.free_guard
        assert target.l1 is drv.image.l1 and target.l2_tables is drv.image.l2_cache
        assert target.holes_zero and target.zero_flag and target.writes
        assert drv.free_guard.acquire()
        done = threading.Event()
        task = asyncio.ensure_future(vbd.discard(0, CLUSTER))
        task.add_done_callback(lambda _: done.set())
        await asyncio.sleep(0.3)
        assert not done.is_set()
        assert drv.image.quick_lookup(0, 4096)[0] != 2  # the entry changed already
        drv.free_guard.release()
        await asyncio.wait_for(task, 10)
        await vbd.close()
    arun(body)
    assert qemu_check(path)[0] == 0


# ------------------------------------------------------------------------- end to end
def make_qcow2(folder: Path, name: str = "disk.qcow2", size: int = 32 * MiB
               ) -> tuple[str, Path, bytes]:
    """(spec, path, content): a qcow2 image qemu made, of every kind of cluster: random
    data, compressed clusters, zero clusters (with and without a host cluster), holes
    (in the reads' range and the writes'), and data half over the writes' range."""
    raw = folder / (name + ".src")
    content = bytearray(data(81, size))
    for a, b in ((6 * MiB, 8 * MiB), (18 * MiB, 32 * MiB)):
        content[a:b] = bytes(b - a)
    raw.write_bytes(content)
    path = folder / name
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", raw, path)
    raw.unlink()
    qemu_io(path, "write -c -P 90 6M 64k", "write -c -P 51 6336k 128k", "write -z 3M 512k",
            "write -z -u 3584k 512k")
    return f"qcow2:{path}", path, qemu_raw(path, folder)


def make_overlay(folder: Path) -> tuple[str, Path, bytes]:
    """An overlay over make_qcow2's image, with a few clusters of its own."""
    _, base, _ = make_qcow2(folder, "base.qcow2")
    path = folder / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", path)
    qemu_io(path, "write -P 17 1M 256k", "write -P 18 5M 64k", "write -z 7M 128k",
            "write -P 19 16M 1M")
    return f"qcow2:{path}", path, qemu_raw(path, folder)


@pytest.mark.interop
@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
@pytest.mark.parametrize("kind", ["alone", "overlay"])
def test_a_qcow2_mixed_burst_gets_the_answers_the_python_path_gives(
        shm: Path, monkeypatch: pytest.MonkeyPatch, structured: bool,  # noqa: F811
        kind: str) -> None:
    """The mixed bursts (reads of data, compressed, zero clusters and holes; writes in
    place and allocating; every other command and invalid requests) on an image qemu made,
    alone or over a backing file: the same answers, disk and statistics with the compiled
    path on and off; it served some; qemu-img check finds the image clean."""
    compiled()
    spec, path, content = (make_qcow2 if kind == "alone" else make_overlay)(shm)

    def run() -> tuple:
        out = (*run_burst(shm, spec, content, structured), qemu_raw(path, shm))
        assert qemu_check(path)[0] == 0
        return out
    assert_same_bursts(on_and_off(monkeypatch, {path: path.read_bytes()}, run))


@pytest.mark.interop
def test_libnbd_on_a_qcow2_checked_by_qemu_img(shm: Path) -> None:  # noqa: F811
    """The mixed libnbd client (64 in flight, every read checked) on a qcow2 image qemu
    made: statistics match, most requests served inline, qemu-img check finds it clean
    and compare finds it equal to the model."""
    compiled()
    need_libnbd()
    spec, path, content = make_qcow2(shm)
    client, stats, inline_served = run_libnbd(shm, spec, content, 12, 3000)
    assert stats["read_reqs"] == client["reads"] and stats["write_reqs"] == client["writes"]
    assert stats["errors"] == 0
    assert inline_served > (client["reads"] + client["writes"]) // 2
    assert qemu_check(path)[0] == 0
    qemu_compare(str(path), shm / "model.out", fmt="qcow2")


@pytest.mark.interop
def test_random_pipelines_with_discards_race_the_compiled_path(
        shm: Path) -> None:  # noqa: F811
    """Random pipelines of reads, writes, discards and write-zeroes (whole clusters, no
    two in flight overlapping), sent in pieces: discards free clusters and writes
    allocate them again while the compiled path serves the requests around them. Every
    read equals the model at the time, qemu-img check finds the image clean afterwards,
    and qemu reads the model's bytes."""
    compiled()
    size = 16 * MiB
    path = shm / "race.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, str(size))
    qemu_io(path, f"write -P 3 0 {size}")
    sock = shm / "s.sock"
    rng = random.Random(4)

    async def body(engine: ThreadEngine) -> int:
        async with nbd_served(engine, f"qcow2:{path}", sock) as (server, vbd):
            served = count_inline(vbd)
            w, conn = await attach(server, sock)
            model = bytearray(b"\3" * size)
            handle = 0
            for _ in range(40):
                reqs, reads, expect = [], {}, {}
                busy: list[tuple[int, int]] = []
                for _ in range(rng.randrange(4, 48)):
                    kind = rng.random()
                    if kind < 0.2:  # whole clusters: what they read as is known
                        n = rng.choice((1, 2, 5)) * CLUSTER
                        off = rng.randrange((size - n) // CLUSTER) * CLUSTER
                    else:
                        n = rng.choice((SECTOR, 4096, 4096, 65536))
                        off = rng.randrange((size - n) // SECTOR) * SECTOR
                    if any(off < e and b < off + n for b, e in busy):
                        continue
                    busy.append((off, off + n))
                    handle += 1
                    expect[handle] = (0, b"")
                    if kind < 0.2:
                        cmd = TRIM if kind < 0.1 else ZEROES
                        model[off : off + n] = bytes(n)
                        reqs.append(req(cmd, off, n, handle=handle))
                    elif kind < 0.6:
                        payload = rng.randbytes(n)
                        model[off : off + n] = payload
                        reqs.append(req(WRITE, off, n, handle=handle, payload=payload))
                    else:
                        reads[handle] = (off, n)
                        reqs.append(req(READ, off, n, handle=handle))
                        expect[handle] = (0, bytes(model[off : off + n]))
                got = await exchange(w, pieces_of(b"".join(reqs), rng, 4), len(expect),
                                     reads, pause=0.0003)
                assert got == expect
            await settled(conn, vbd)
            (shm / "model.out").write_bytes(model)
            return served[0]
    served = arun(body)
    assert served > 0
    assert qemu_check(path)[0] == 0
    qemu_compare(str(path), shm / "model.out", fmt="qcow2")



@pytest.mark.interop
def test_a_writable_qcow2_drops_its_bitmaps_autoclear_bit_before_writing_in_place(
        shm: Path) -> None:  # noqa: F811
    """Persistent bitmaps do not see the writes done around the library (the side door,
    the compiled path): opening the image writable clears their autoclear bit first, so
    qemu does not trust bitmaps that missed changes; a read-only open keeps it."""
    compiled()
    path = shm / "bm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", path, "4M")
    qemu_io(path, "write -P 1 0 1M")
    qemu_img("bitmap", "--add", path, "b0")
    bit = s.AUTOCLEAR_BITMAPS

    def autoclear() -> int:
        with open(path, "rb") as f:
            f.seek(s.OFF_AUTOCLEAR)
            return int.from_bytes(f.read(8), "big")
    assert autoclear() & bit
    sock = shm / "s.sock"

    async def body(engine: ThreadEngine) -> None:
        ro = await engine.call(open_stack, engine, f"qcow2:{path}", writable=False)
        await ro.close()
        assert autoclear() & bit
        async with nbd_served(engine, f"qcow2:{path}", sock) as (server, vbd):
            assert not autoclear() & bit
            w, conn = await attach(server, sock)
            one = data(5, 4096)
            got = await exchange(w, req(WRITE, 8192, 4096, handle=1, payload=one), 1, {})
            assert got == {1: (0, b"")}
            await settled(conn, vbd)
    arun(body)
    assert not autoclear() & bit
    assert qemu_raw(path, shm)[8192 : 8192 + 4096] == data(5, 4096)


def test_a_sparse_vhd_without_a_parent_answers_its_holes_inline(
        shm: Path) -> None:  # noqa: F811
    """A dynamic VHD with no parent: reads of blocks without a BAT entry are answered by
    the compiled path (a hole chunk), reads of blocks it holds too; a block status still
    says what is allocated."""
    compiled()
    from blktap.image.vhd import create
    path = shm / "sparse.vhd"
    create(str(path), 16 * MiB)
    sock = shm / "s.sock"

    async def body(engine: ThreadEngine) -> None:
        async with nbd_served(engine, f"vhd:{path}", sock) as (server, vbd):
            target = vbd.inline_target()
            assert target is not None and target.holes_zero
            served = count_inline(vbd)
            w, conn = await attach(server, sock)
            reads = {h: (h * MiB, 64 * KiB) for h in range(1, 9)}
            stream = b"".join(req(READ, o, n, handle=h) for h, (o, n) in reads.items())
            got = await exchange(w, stream, len(reads), reads)
            assert got == {h: (0, bytes(n)) for h, (_o, n) in reads.items()}
            assert served[0] == len(reads)
            got = await exchange(w, req(STATUS, 0, MiB, handle=20), 1, {})
            assert got[20][0] == 0
            await settled(conn, vbd)
    arun(body)


def make_qcow2_chain(folder: Path) -> tuple[Path, list[Path]]:
    """raw base <- qcow2 mid (v3, data, a zero cluster) <- qcow2 top (data; 64 KiB
    clusters), 8 MiB: (top, every file)."""
    base = folder / "base.raw"
    base.write_bytes(data(90, 8 * MiB))
    mid, top = folder / "mid.qcow2", folder / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "raw", mid)
    qemu_io(mid, "write -P 61 1M 256k", "write -z 2M 128k", "write -P 62 4M 64k")
    qemu_img("create", "-q", "-f", "qcow2", "-b", mid.name, "-F", "qcow2", top)
    qemu_io(top, "write -P 71 1088k 64k", "write -P 72 5M 1M")
    return top, [base, mid, top]


@pytest.mark.interop
@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_a_qcow2_chain_is_read_through_its_layers_inline(
        shm: Path, monkeypatch: pytest.MonkeyPatch, structured: bool) -> None:  # noqa: F811
    """A qcow2 over a qcow2 over a raw file: reads of the top's clusters, the middle's
    (data and zero), the raw file's, and across them; writes in place and allocating;
    the same reads again. With the compiled path on, every reply, the disk qemu reads
    and each layer's hits in the stats are what they are with it off; it served reads of
    each layer."""
    compiled()
    from blktap.transport.nbd import connection
    monkeypatch.setattr(connection, "INLINE_MISSES", 1 << 30)
    top, files = make_qcow2_chain(shm)
    pristine = {f: f.read_bytes() for f in files}
    content = qemu_raw(top, shm)
    sock = shm / "s.sock"
    reads = {1: (1088 * KiB, 4096), 2: (1 * MiB, 8192), 3: (2 * MiB, 65536),
             4: (4 * MiB + 4096, 4096), 5: (3 * MiB, 65536), 6: (1 * MiB, 256 * KiB),
             7: (5 * MiB + 512, 1024), 8: (7 * MiB, MiB), 9: (2 * MiB - 4096, 8192)}
    writes = {20: (5 * MiB, data(91, 4096)), 21: (6 * MiB + 8192, data(92, 4096))}

    def run() -> tuple[dict, list, int, bytes]:
        async def body(engine: ThreadEngine) -> tuple[dict, list, int]:
            async with nbd_served(engine, f"qcow2:{top}", sock) as (server, vbd):
                served = count_inline(vbd)
                w, conn = await attach(server, sock, structured=structured)
                got: dict = {}
                for r in range(2):
                    again = {h + 100 * r: v for h, v in reads.items()}
                    stream = b"".join(req(READ, o, n, handle=h)
                                      for h, (o, n) in again.items())
                    got |= await exchange(w, stream, len(again), again)
                    if not r:
                        stream = b"".join(req(WRITE, o, len(b), handle=h, payload=b)
                                          for h, (o, b) in writes.items())
                        got |= await exchange(w, stream, len(writes), {})
                await settled(conn, vbd)
                return got, images_hits(vbd), served[0]
        got, hit, served = arun(body)
        return got, hit, served, qemu_raw(top, shm)

    def checked() -> tuple[dict, list, int, bytes]:
        out = run()
        assert qemu_check(top)[0] == 0
        return out
    runs = on_and_off(monkeypatch, pristine, checked)
    expect = bytearray(content)
    for o, b in writes.values():
        expect[o : o + len(b)] = b
    for h, (o, n) in reads.items():
        assert runs["1"][0][h] == (0, content[o : o + n]), h
        assert runs["1"][0][h + 100] == (0, bytes(expect[o : o + n])), h
    assert runs["1"][0] == runs["0"][0]
    assert runs["1"][1] == runs["0"][1]  # each layer's hits
    assert runs["1"][3] == runs["0"][3] == bytes(expect)
    # At least half of the 18 reads: not those before a layer's L2 table is in its cache
    # (a first read through it loads it), nor, structured, 9 (raw data, then zeros).
    assert runs["0"][2] == 0 and runs["1"][2] >= len(reads)


@pytest.mark.interop
def test_libnbd_on_a_qcow2_over_a_vhd_checked_by_qemu_img(shm: Path) -> None:  # noqa: F811
    """A qcow2 overlay qemu made over a dynamic VHD of ours (backing format vpc), with a
    few clusters of its own: its target reads the VHD's blocks below it; the mixed libnbd
    client (64 in flight, every read checked against qemu's reading of the chain) is
    served, some of it inline; qemu-img check finds the overlay clean and compare finds
    the disk, through the server, equal to the client's model."""
    compiled()
    need_libnbd()
    from blktap.image.chain import Chain
    from blktap.image.vhd import create as vhd_create
    base = shm / "base.vhd"
    vhd_create(str(base), 16 * MiB)
    with Chain.open(f"vhd:{base}", writable=True) as c:
        c.pwrite(0, data(93, 16 * MiB))
    top = shm / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "vpc", top)
    qemu_io(top, "write -P 81 1M 256k", "write -z 3M 64k")
    content = qemu_raw(top, shm)

    async def layers(engine: ThreadEngine) -> None:
        vbd = VBD(await engine.call(open_stack, engine, f"qcow2:{top}", writable=True))
        target = vbd.inline_target()
        assert target is not None and len(target.below) == 1
        assert target.below[0].bat is vbd.driver.parent.image.bat
        await vbd.close()
    arun(layers)
    client, stats, inline_served = run_libnbd(shm, f"qcow2:{top}", content, 14, 2000)
    assert stats["read_reqs"] == client["reads"] and stats["write_reqs"] == client["writes"]
    assert stats["errors"] == 0
    assert inline_served > 0
    assert qemu_check(top)[0] == 0


# ------------------------------------------------------------------------- block status
def status_images(folder: Path, kind: str) -> str:
    """The disk (a spec) of each kind the block status comparison runs on."""
    from blktap.image.chain import Chain
    from blktap.image.vhd import create as vhd_create
    from blktap.image.vhd.create import snapshot as vhd_snapshot
    if kind == "qcow2":
        return make_qcow2(folder)[0]
    if kind == "overlay":
        return make_overlay(folder)[0]
    if kind == "chain":  # raw <- qcow2 <- qcow2: holes down to the raw base are Python's
        return f"qcow2:{make_qcow2_chain(folder)[0]}"
    if kind == "v2":  # compat 0.10: its zero clusters (if any) are the Python path's
        path = folder / "v2.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", path, "32M")
        qemu_io(path, "write -P 5 1M 3M", "write -z 2M 64k", "write -c -P 6 9M 64k")
        return f"qcow2:{path}"
    if kind == "big":  # past MAX_STATUS_LENGTH
        path = folder / "big.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", path, "5G")
        qemu_io(path, "write -P 5 2560M 1M", "write -z 4G 64k")
        return f"qcow2:{path}"
    assert kind == "vhd"  # full blocks, blocks partly held, over a parent
    base = folder / "base.vhd"
    vhd_create(str(base), 32 * MiB)
    with Chain.open(f"vhd:{base}", writable=True) as c:
        c.pwrite(0, data(3, 4 * MiB))
        c.pwrite(10 * MiB + 4096, data(4, 8192))  # partly held
    top = folder / "top.vhd"
    vhd_snapshot(str(top), str(base), skip_empty=False)
    with Chain.open(f"vhd:{top}", writable=True) as c:
        c.pwrite(6 * MiB, data(5, 2 * MiB))
        c.pwrite(20 * MiB, data(6, 512))
    return f"vhd:{top}"


def status_requests(size: int, rng: random.Random, count: int) -> list[bytes]:
    """Block status requests: mostly whole sectors inside the disk, of every length up to
    all of it (and beyond MAX_STATUS_LENGTH when it is that large), with REQ_ONE, FUA or
    none; some unaligned, past the end, or with a flag not allowed."""
    out = []
    for h in range(1, count + 1):
        offset = rng.randrange(0, size // SECTOR) * SECTOR
        length = min(rng.choice([SECTOR, 4 * KiB, CLUSTER, MiB, 7 * MiB + SECTOR, size]),
                     size - offset, (1 << 32) - SECTOR) or SECTOR
        if size > connection.MAX_STATUS_LENGTH and h % 7 == 0:
            offset, length = 0, (1 << 32) - SECTOR
        flags = rng.choice([0, 0, p.CMD_FLAG_REQ_ONE, p.CMD_FLAG_FUA])
        odd = rng.random()
        if odd < 0.05:
            offset += 100
        elif odd < 0.1:
            length = min(size, (1 << 32) - SECTOR)  # past the end (from anywhere but 0)
        elif odd < 0.12:
            flags = p.CMD_FLAG_DF
        out.append(req(STATUS, offset, length, handle=h, flags=flags))
    return out


def count_statuses_inline(vbd: VBD) -> list[int]:
    """A counter (one item) of the block status requests the compiled pass answers on
    ``vbd`` from now."""
    answered = [0]
    counted = vbd.status_served_inline

    def counting(count: int) -> None:
        answered[0] += count
        counted(count)
    vbd.status_served_inline = counting  # type: ignore[method-assign]
    return answered


def run_statuses(folder: Path, spec: str, requests: list[bytes]) -> tuple[dict, int, dict]:
    """The answers by handle to ``requests`` sent at once, how many the compiled pass
    answered, and the statistics."""
    sock = folder / "s.sock"

    async def body(engine: ThreadEngine) -> tuple[dict, int, dict]:
        async with nbd_served(engine, spec, sock) as (server, vbd):
            answered = count_statuses_inline(vbd)
            w, conn = await attach(server, sock)
            got: dict = {}
            for at in range(0, len(requests), 50):  # (bursts the pass and Python share)
                burst = requests[at : at + 50]
                got |= await exchange(w, b"".join(burst), len(burst), {})
            await settled(conn, vbd)
            return got, answered[0], vbd.stats.as_dict()
    return arun(body)


@pytest.mark.interop
@pytest.mark.parametrize("kind", ["qcow2", "overlay", "chain", "v2", "big", "vhd"])
def test_block_status_answers_are_the_python_paths(
        shm: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:  # noqa: F811
    """Block status requests on images qemu made (every kind of cluster, over backing
    files, version 2, past MAX_STATUS_LENGTH) and on a VHD chain of ours: the same
    answers byte for byte, and the same statistics, with the compiled pass on and off;
    with it on, it answered some (all but the raw base's and the errors, say)."""
    compiled()
    spec = status_images(shm, kind)
    from blktap.image.chain import Chain
    with Chain.open(spec) as chain:
        size = chain.size
    requests = status_requests(size, random.Random(kind), 300)
    runs = on_and_off(monkeypatch, {}, lambda: run_statuses(shm, spec, requests))
    (off_got, off_answered, off_stats), (on_got, on_answered, on_stats) = runs["0"], runs["1"]
    assert on_got == off_got
    assert sum(1 for error, _ in on_got.values() if error == 0) > 250
    for key in ("other_reqs", "errors", "read_reqs"):
        assert on_stats.get(key) == off_stats.get(key), key
    assert off_answered == 0 and on_answered > 0


@pytest.mark.interop
def test_nbdinfo_maps_what_qemu_nbd_maps_with_block_status_in_the_pass(
        shm: Path) -> None:  # noqa: F811
    """nbdinfo --map (libnbd's block status requests) of make_qcow2's image, which has no
    parent (every kind of cluster), served in-process, twice: the map qemu-nbd gives of
    the same image both times; the second time, with the L2 tables the first one loaded
    in the cache, the compiled pass answered."""
    compiled()
    need_libnbd()
    from test_status_side_door import nbd_map, qemu_nbd_map
    spec, path, _ = make_qcow2(shm)
    sock = shm / "s.sock"

    async def ours(engine: ThreadEngine) -> tuple[list[list[dict]], int]:
        async with nbd_served(engine, spec, sock) as (server, vbd):
            answered = count_statuses_inline(vbd)
            maps = [await asyncio.to_thread(nbd_map, f"nbd+unix:///?socket={sock}")
                    for _ in range(2)]
            return maps, answered[0]
    maps, answered = arun(ours)
    with qemu_nbd_map(path, shm / "q.sock") as theirs:
        pass

    def flat(rows: list[dict]) -> list[tuple[int, int, int]]:
        return [(r["offset"], r["length"], r["type"]) for r in rows]
    assert flat(maps[0]) == flat(theirs) and flat(maps[1]) == flat(theirs)
    assert answered > 0
