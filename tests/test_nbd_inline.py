"""The NBD transport's compiled inline path (``transport/nbd/_inline.c``, inline.py).

- the build: where a C compiler and Python's headers are, ``pip install`` built it;
- ``nbd_pump`` itself, over a socket pair and a file: reply bytes equal to the Python
  path's packing (simple and structured), data read and written, FUA, and every request
  it must leave to the Python path (bad magic, other commands, flags, unaligned, empty,
  out of range, over the length limit, a write payload not all here, writes to a target
  that takes none, reads the page cache does not hold), consuming nothing of those; the
  request budget; a full socket (the rest of its replies handed back); a vanished peer;
  a file shorter than the disk (zeros, as the Python path reads them);
- the VBD's choice of a target: none while paused, for a filter on top, for a VHD, for a
  file with holes; no writes on a read-only export;
- end to end through the server, with raw sockets and with libnbd: a mixed burst of every
  kind of request (valid and not) gets the same answers as the Python path gives; libnbd
  with 64 in flight, checked by qemu-img; a client that reads no replies then vanishes
  gives back every byte of memory it held.
"""

from __future__ import annotations

import array
import asyncio
import errno
import json
import os
import random
import shutil
import socket
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from blktap.image.chain import Chain
from blktap.image.vhd import check as vhd_check
from blktap.image.vhd import create
from blktap.image.vhd.create import snapshot as vhd_snapshot
from blktap.io.threads import ThreadEngine
from blktap.tapdisk.driver import InlineChain, InlineTarget
from blktap.tapdisk.drivers import open_stack
from blktap.tapdisk.vbd import VBD
from blktap.transport.nbd import connection, inline
from blktap.transport.nbd import proto as p
from blktap.transport.nbd.connection import MAX_IN_FLIGHT, Connection
from blktap.transport.nbd.server import Export, NbdServer
from conftest import ROOT, need
from test_fast_path import (
    CLIENT,
    DF,
    FLUSH,
    FUA,
    KEY,
    READ,
    STATUS,
    SYSTEM_PYTHON,
    WRITE,
    arun,
    attach,
    chain_bytes,
    check_burst,
    collect,
    data,
    exchange,
    make_chain,
    make_encrypted,
    make_image,
    mixed_burst,
    nbd_served,
    need_libnbd,
    outstanding,
    qemu_compare,
    req,
    settled,
    shm,  # noqa: F401  (a fixture)
    spy_side_door,
    stall_then_vanish,
    sub,
)

MiB = 1 << 20
T = TypeVar("T")
KiB = 1 << 10
SECTOR = 512


def compiled() -> inline.Pump:
    pump = inline.compiled()
    if pump is None:
        if not inline.available():
            pytest.skip("the compiled inline path is not built here (no C compiler)")
        pytest.skip("BLKTAP_INLINE=0 in the environment")
    return pump


def count_inline(vbd: VBD) -> list[int]:
    """A counter (one item) of the requests the compiled path serves on ``vbd`` from now."""
    served = [0]
    counted = vbd.served_inline

    def counting(reads: int, read_bytes: int, writes: int, write_bytes: int) -> None:
        served[0] += reads + writes
        counted(reads, read_bytes, writes, write_bytes)
    vbd.served_inline = counting  # type: ignore[method-assign]
    return served


def run_libnbd(folder: Path, spec: str, content: bytes, seed: int, nops: int, *,
               direct: bool = True) -> tuple[dict, dict, int]:
    """test_fast_path's mixed libnbd client (4 KiB and 1 MiB, 64 in flight, every read
    checked) against a server of ``spec``; qemu-img compares the disk, through the
    server, with the client's model (left in ``folder``/model.out). Returns the client's
    counts, the VBD's statistics and the requests the compiled path served."""
    model_in, model_out = folder / "model.in", folder / "model.out"
    model_in.write_bytes(content)
    sock = folder / "s.sock"

    async def body(engine: ThreadEngine) -> tuple[dict, dict, int]:
        vbd = VBD(await engine.call(open_stack, engine, spec, writable=True, direct=direct))
        served = count_inline(vbd)
        server = NbdServer(Export("", vbd))
        server.listen_unix(str(sock))
        try:
            out = await sub(SYSTEM_PYTHON, "-c", CLIENT, str(sock), str(seed), str(nops),
                            "64", "8", str(model_in), str(model_out))
            stats = vbd.stats.as_dict()
            await asyncio.to_thread(qemu_compare, f"nbd+unix:///?socket={sock}", model_out)
            return json.loads(out), stats, served[0]
        finally:
            await server.stop()
            await vbd.close()
    return arun(body)  # type: ignore[no-any-return]


# ------------------------------------------------------------------------- the build
def test_the_extension_is_built_where_it_can_be() -> None:
    """A machine with a C compiler and Python's headers (what scripts/install-deps.sh
    installs) builds the extension at ``pip install``: a missing one there is a broken
    build, not a reason to skip."""
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not (shutil.which("cc") or shutil.which("gcc")) or not headers.exists():
        pytest.skip("no C compiler or no Python headers: the pure-Python path serves")
    assert inline.available(), (
        f"blktap.transport.nbd._inline was not built: run `pip install -e {ROOT}` and "
        "read its warnings")


# ------------------------------------------------------------------------- nbd_pump alone
class Pumped:
    """nbd_pump's answer, by name."""

    def __init__(self, out: tuple) -> None:
        (self.start, self.reads, self.read_bytes, self.writes, self.write_bytes,
         self.sent, self.used, self.error, self.statuses) = out


class Bench:
    """A socket pair (server end, client end) and a file on tmpfs (or elsewhere)."""

    def __init__(self, folder: Path, size: int = 4 * MiB) -> None:
        self.server, self.client = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.client.settimeout(10)
        self.content = data(11, size)
        self.path = folder / "disk"
        self.path.write_bytes(self.content)
        self.fd = os.open(self.path, os.O_RDWR)
        self.size = size
        self.rbuf = bytearray(256 * KiB)
        self.scratch = bytearray(inline.SCRATCH_BYTES)

    def close(self) -> None:
        os.close(self.fd)
        self.server.close()
        self.client.close()

    def pump(self, stream: bytes, *, structured: bool = True, memory: bool = True,
             writes: bool = True, budget: int = 64, max_length: int = inline.MAX_LENGTH,
             size: int | None = None) -> Pumped:
        self.rbuf[: len(stream)] = stream
        target = InlineTarget(self.fd, self.size if size is None else size, memory, writes)
        return Pumped(compiled()(self.server.fileno(), self.rbuf, 0, len(stream),
                                 self.scratch, target, structured, budget, max_length))

    def recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.client.recv(n - len(out))
            assert chunk, "the server end closed"
            out += chunk
        return out


@pytest.fixture
def bench(shm: Path):  # noqa: F811
    b = Bench(shm)
    try:
        yield b
    finally:
        b.close()


def test_pump_reads_answer_as_the_python_path_packs_them(bench: Bench) -> None:
    """Structured: an OFFSET_DATA chunk flagged done (proto.CHUNK_OFFSET_DATA); simple: a
    simple reply; the handle's bytes as sent; the data at the offset asked for; FUA and
    DF (structured) are fine on a read."""
    reads = [(0x0102030405060708, 0, 4096, 0), (7, 8 * SECTOR, SECTOR, FUA),
             (2**64 - 1, 3 * MiB, 65536, DF), (9, bench.size - 4096, 4096, FUA | DF)]
    stream = b"".join(req(READ, off, n, handle=h, flags=f) for h, off, n, f in reads)
    out = bench.pump(stream)
    assert (out.start, out.reads, out.writes, out.error) == (len(stream), 4, 0, 0)
    assert out.read_bytes == sum(n for _, _, n, _ in reads)
    assert out.sent == out.used
    for h, off, n, _ in reads:
        assert bench.recv(p.CHUNK_OFFSET_DATA.size) == p.CHUNK_OFFSET_DATA.pack(
            p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE, p.REPLY_TYPE_OFFSET_DATA, h, n + 8,
            off)
        assert bench.recv(n) == bench.content[off : off + n]
    stream = b"".join(req(READ, off, n, handle=h, flags=f & FUA) for h, off, n, f in reads)
    out = bench.pump(stream, structured=False)
    assert (out.start, out.reads) == (len(stream), 4)
    for h, off, n, _ in reads:
        assert bench.recv(16) == p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, h)
        assert bench.recv(n) == bench.content[off : off + n]


def test_pump_writes_land_and_are_answered(bench: Bench) -> None:
    one, two = data(12, 8192), data(13, SECTOR)
    stream = (req(WRITE, MiB, len(one), handle=5, payload=one)
              + req(WRITE, bench.size - SECTOR, SECTOR, handle=6, flags=FUA, payload=two)
              + req(READ, MiB, 8192, handle=7))
    out = bench.pump(stream, structured=False)
    assert (out.start, out.writes, out.write_bytes, out.reads) == (len(stream), 2, 8704, 1)
    assert bench.recv(16) == p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, 5)
    assert bench.recv(16) == p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, 6)
    assert bench.recv(16) == p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, 7)
    assert bench.recv(8192) == one  # read after the write, in order
    on_disk = bench.path.read_bytes()
    assert on_disk[MiB : MiB + 8192] == one and on_disk[-SECTOR:] == two


LEFT_TO_PYTHON = {
    "bad magic": (req(READ, 0, 4096, magic=0x12345678), {}),
    "flush": (req(FLUSH), {}),
    "trim": (req(4, 0, 4096), {}),
    "unknown command": (req(42, 0, 4096), {}),
    "unknown flag": (req(READ, 0, 4096, flags=1 << 9), {}),
    "DF without structured replies": (req(READ, 0, 4096, flags=DF), {"structured": False}),
    "write flag on a read": (req(READ, 0, 4096, flags=16), {}),
    "DF on a write": (req(WRITE, 0, SECTOR, flags=DF, payload=b"x" * SECTOR), {}),
    "unaligned offset": (req(READ, 100, 4096), {}),
    "unaligned length": (req(READ, 0, 4000), {}),
    "empty read": (req(READ, 4096, 0), {}),
    "past the end": (req(READ, 4 * MiB - SECTOR, 2 * SECTOR), {}),
    "offset past the end": (req(READ, 2**63, SECTOR), {}),
    "offset wrapping": (req(READ, 2**64 - SECTOR, 2 * SECTOR), {}),
    "over the length limit": (req(READ, 0, 8192), {"max_length": 4096}),
    "write payload not all here": (req(WRITE, 0, 4096, payload=b"y" * 4095), {}),
    "write to a target without writes": (req(WRITE, 0, SECTOR, payload=b"z" * SECTOR),
                                         {"writes": False}),
}


@pytest.mark.parametrize("case", sorted(LEFT_TO_PYTHON))
def test_pump_leaves_what_it_does_not_serve_to_the_python_path(bench: Bench, case: str) -> None:
    """After two reads it serves, the request of each case stops the pass: nothing of it
    is consumed, written or answered, and the reads' replies are sent."""
    stream, options = LEFT_TO_PYTHON[case]
    before = bench.path.read_bytes()
    head = req(READ, 0, 4096, handle=1) + req(READ, 8192, 4096, handle=2)
    # (A request after it would complete the payload that is not all here.)
    tail = b"" if case == "write payload not all here" else req(READ, 0, 4096, handle=3)
    out = bench.pump(head + stream + tail, **options)
    assert (out.start, out.reads, out.writes, out.error) == (len(head), 2, 0, 0)
    assert out.sent == out.used
    structured = options.get("structured", True)
    got = bench.recv(out.used)
    assert len(got) == 2 * ((28 if structured else 16) + 4096)
    bench.client.setblocking(False)
    with pytest.raises(BlockingIOError):
        bench.client.recv(1)  # nothing more
    assert bench.path.read_bytes() == before


def test_pump_reads_only_what_the_page_cache_holds(tmp_path: Path) -> None:
    """Not in memory: RWF_NOWAIT; a read of pages dropped from the cache is left to the
    Python path (which hands it to a worker), one that is cached is served."""
    b = Bench(tmp_path)
    try:
        os.fsync(b.fd)
        os.posix_fadvise(b.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.pread(b.fd, 4096, 0)  # cached now
        out = b.pump(req(READ, 0, 4096, handle=1) + req(READ, 2 * MiB, 4096, handle=2),
                     memory=False, writes=False)
        assert out.reads >= 1 and out.start >= 28
        if out.reads == 1:  # the second page was not cached: left, not consumed
            assert out.start == 28
        assert b.recv(out.used)[28:] == b.content[: 4096] + (
            b.content[2 * MiB : 2 * MiB + 4096] if out.reads == 2 else b"")
        # Past the end of a file not in memory: left too (the Python path's worker reads
        # it whole, zeros past the end).
        out = b.pump(req(READ, 0, 4096, handle=1) + req(READ, b.size, 4096, handle=2),
                     memory=False, writes=False, size=b.size + 4096)
        assert (out.reads, out.start) == (1, 28)
        b.recv(out.used)
    finally:
        b.close()


def test_pump_writes_whole_pages_of_the_page_cache_only(tmp_path: Path) -> None:
    """Not in memory: a write of whole pages at page offsets goes into the page cache (it
    reads nothing first); one of part of a page, or with FUA (RWF_DSYNC waits for the
    device), is left to the Python path, which hands it to a worker."""
    b = Bench(tmp_path)
    try:
        page = data(21, 8192)
        out = b.pump(req(WRITE, MiB, 8192, handle=1, payload=page), memory=False)
        assert (out.writes, out.start) == (1, 28 + 8192)
        b.recv(out.used)
        for stream in (req(WRITE, MiB + SECTOR, 4096, payload=page[:4096]),
                       req(WRITE, MiB, SECTOR, payload=page[:SECTOR]),
                       req(WRITE, MiB, 4096, flags=FUA, payload=page[:4096])):
            out = b.pump(req(READ, 0, 4096, handle=2) + stream, memory=False)
            assert (out.reads, out.writes, out.start) == (1, 0, 28)
            b.recv(out.used)
        assert b.path.read_bytes() == b.content[:MiB] + page + b.content[MiB + 8192:]
    finally:
        b.close()


def test_pump_reads_past_the_end_of_a_file_in_memory_as_zeros(bench: Bench) -> None:
    """The disk is larger than the file now (it shrank under us): as the Python path's
    try_preadv, what is past the end reads as zeros."""
    out = bench.pump(req(READ, bench.size - 4096, 8192, handle=1), size=bench.size + 4096)
    assert out.reads == 1
    got = bench.recv(out.used)
    assert got[28:] == bench.content[-4096:] + bytes(4096)


def test_pump_keeps_to_its_request_budget(bench: Bench) -> None:
    stream = b"".join(req(READ, i * 4096, 4096, handle=i) for i in range(10))
    out = bench.pump(stream, budget=3)
    assert (out.start, out.reads) == (3 * 28, 3)
    bench.recv(out.used)


def test_pump_hands_back_the_replies_a_full_socket_did_not_take(bench: Bench) -> None:
    """Many large reads to a socket with a small send buffer that nobody reads: the
    scratch fills, is sent in part, and the pass stops with what is left unsent for the
    caller to queue; the replies sent and left together are every request served, in
    order, whole."""
    bench.server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * KiB)
    n = 256 * KiB
    stream = b"".join(req(READ, i * n, n, handle=i) for i in range(12))
    out = bench.pump(stream, structured=False)
    per = 16 + n
    fit = inline.SCRATCH_BYTES // per  # replies the scratch holds before it must send
    assert out.error == 0 and out.reads == fit and out.start == fit * 28
    assert 0 < out.sent < out.used == fit * per
    replies = bench.recv(out.sent) + bytes(bench.scratch[out.sent : out.used])
    for i in range(fit):
        assert replies[i * per : i * per + 16] == p.SIMPLE_REPLY.pack(
            p.SIMPLE_REPLY_MAGIC, 0, i)
        assert replies[i * per + 16 : (i + 1) * per] == bench.content[i * n : (i + 1) * n]


def test_pump_reports_a_peer_that_is_gone(bench: Bench) -> None:
    bench.client.close()
    one = data(14, 4096)
    out = bench.pump(req(WRITE, 0, 4096, handle=1, payload=one) + req(READ, 0, 4096))
    assert out.error in (errno.EPIPE, errno.ECONNRESET)
    assert out.writes == 1  # done before its reply failed, as a write may land for nobody
    assert bench.path.read_bytes()[:4096] == one


# ------------------------------------------------------------------------- the VBD's target
def test_inline_target_follows_the_disk(shm: Path) -> None:  # noqa: F811
    """A raw file on tmpfs has a target, with writes; a read-only VBD's has none; while
    paused there is none, and again after resume; a stack with a filter on top (the rate
    limit) has none, nor a file with a hole. A dynamic VHD's target carries its BAT and
    batmap; a fixed VHD's none (its bytes at their own offsets); an encrypted VHD has
    none."""
    spec, path, _ = make_image(shm, "raw")
    vspec, _, _ = make_image(shm, "vhd")
    holey = shm / "holey.raw"
    with open(holey, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(b"x" * 4096)

    async def body(engine: ThreadEngine) -> None:
        async def vbd_of(s: str, **kw: object) -> VBD:
            return VBD(await engine.call(open_stack, engine, s, writable=True), **kw)
        vbd = await vbd_of(spec)
        target = vbd.inline_target()
        assert target is not None and target.memory and target.writes
        assert target.size == path.stat().st_size
        await vbd.pause()
        assert vbd.inline_target() is None
        await vbd.resume(await engine.call(open_stack, engine, spec, writable=True))
        again = vbd.inline_target()  # the reopened file's
        assert again is not None and again.fd != target.fd or again == target
        await vbd.close()
        assert vbd.inline_target() is None
        ro = await vbd_of(spec, read_only=True)
        assert ro.inline_target() is not None and not ro.inline_target().writes
        await ro.close()
        for s in (f"valve:rate=100M:{spec}", f"aio:{holey}"):
            other = await vbd_of(s)
            assert other.inline_target() is None, s
            await other.close()
        dyn = await vbd_of(vspec)
        t = dyn.inline_target()
        assert t is not None and t.bat is dyn.driver.image.bat and t.block_bytes == 2 * MiB
        assert t.batmap is dyn.driver.image.batmap and t.data_secs == 1
        await dyn.close()
        fixed = shm / "fixed.vhd"
        create(str(fixed), 4 * MiB, fixed=True)
        fx = await vbd_of(f"vhd:{fixed}")
        t = fx.inline_target()
        assert t is not None and t.bat is None and t.size == 4 * MiB
        await fx.close()
        crypt = shm / "crypt.vhd"
        make_encrypted(crypt)
        enc = VBD(await engine.call(lambda: open_stack(engine, f"vhd:{crypt}", writable=True,
                                                      key=KEY)))
        assert enc.inline_target() is None
        await enc.close()
    arun(body)


# ------------------------------------------------------------------------- end to end
def run_burst(shm: Path, spec: str, content: bytes, structured: bool,  # noqa: F811
              rounds: int = 3) -> tuple[list[dict], dict[str, list[int]], dict]:
    """mixed_burst rounds through a server; the replies by handle of each round."""
    sock = shm / "s.sock"
    out: list[dict] = []

    async def body(engine: ThreadEngine) -> tuple[dict[str, list[int]], dict]:
        async with nbd_served(engine, spec, sock) as (server, vbd):
            counts = spy_side_door(vbd)
            inline_served = count_inline(vbd)
            w, conn = await attach(server, sock, structured=structured)
            for r in range(rounds):
                reqs, reads, errors, writes, status = mixed_burst(len(content), 151 + r,
                                                                  (r + 1) << 24)
                count = len(reads) + len(errors) + len(writes)
                got = await exchange(w, b"".join(reqs), count, reads)
                if structured:
                    check_burst(got, reads, errors, writes, status, content)
                out.append(got)
            await settled(conn, vbd)
            assert outstanding(server.pool) == 0
            return counts, {**vbd.stats.as_dict(), "inline": inline_served[0]}
    counts, stats = arun(body)
    return out, counts, stats


def on_and_off(monkeypatch: pytest.MonkeyPatch, pristine: dict[Path, bytes],
               run: Callable[[], T]) -> dict[str, T]:
    """``run()`` with the compiled path off ("0"), then on ("1"), each from the same
    files (``pristine``: their bytes, put back before each)."""
    runs = {}
    for mode in ("0", "1"):
        for path, raw in pristine.items():
            path.write_bytes(raw)
        monkeypatch.setenv("BLKTAP_INLINE", mode)
        runs[mode] = run()
    return runs


def assert_same_bursts(runs: dict[str, tuple]) -> None:
    """run_burst's answers, the disk's bytes after and the statistics are the same with
    the compiled path off and on, and only the run with it on served any inline."""
    off_got, _, off_stats, off_disk = runs["0"]
    on_got, _, on_stats, on_disk = runs["1"]
    assert on_got == off_got
    assert on_disk == off_disk
    for key in ("read_reqs", "write_reqs", "read_sectors", "write_sectors", "errors",
                "other_reqs"):
        assert on_stats.get(key) == off_stats.get(key), key
    assert off_stats["inline"] == 0 and on_stats["inline"] > 0


def pieces_of(stream: bytes, rng: random.Random, cuts: int) -> list[bytes]:
    """``stream`` cut in up to ``cuts`` + 1 pieces at random places."""
    at = sorted(rng.sample(range(1, len(stream)), min(cuts, len(stream) - 1)))
    return [stream[a:b] for a, b in zip([0, *at], [*at, len(stream)], strict=True)]


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_a_mixed_burst_gets_the_answers_the_python_path_gives(
        shm: Path, monkeypatch: pytest.MonkeyPatch, structured: bool) -> None:  # noqa: F811
    """Reads, writes (FUA or not, one over the receive buffer), every other command and
    invalid requests, the same bursts against a fresh copy of the same image: with the
    compiled path on, every handle gets the same error or data as with it off, the file
    ends the same, and the statistics agree; the compiled path served most of them."""
    compiled()
    spec, path, content = make_image(shm, "raw")
    runs = on_and_off(monkeypatch, {path: path.read_bytes()}, lambda: (
        *run_burst(shm, spec, content, structured), path.read_bytes()))
    assert_same_bursts(runs)
    # The same requests served at once, by the side door or the compiled pass.
    assert runs["1"][1] == runs["0"][1]


@pytest.mark.interop
def test_libnbd_with_64_in_flight_checked_by_qemu_img(shm: Path) -> None:  # noqa: F811
    """The same mixed client as the Python path's test (reads and writes of 4 KiB and
    1 MiB, 64 in flight, every read checked against a model), with the compiled path:
    statistics match the client's count, most requests were served inline, qemu-img
    finds the disk equal to the model."""
    compiled()
    need_libnbd()
    need("qemu-img")
    spec, path, content = make_image(shm, "raw")
    client, stats, inline_served = run_libnbd(shm, spec, content, 9, 3000)
    model_out = shm / "model.out"
    assert stats["read_reqs"] == client["reads"]
    assert stats["write_reqs"] == client["writes"]
    assert stats["read_sectors"] == client["read_bytes"] // SECTOR
    assert stats["write_sectors"] == client["write_bytes"] // SECTOR
    assert stats["errors"] == 0 and stats["in_flight"] == 0
    assert inline_served > (client["reads"] + client["writes"]) // 2
    assert path.read_bytes() == model_out.read_bytes()


@pytest.mark.interop
def test_a_client_that_never_reads_replies_then_vanishes(shm: Path) -> None:  # noqa: F811
    """200 pipelined reads of 256 KiB, no reply read: the compiled path serves until the
    socket is full and queues the rest of its replies, charged to the memory budget; the
    Python path takes over and stops at the in-flight limit; another client is served
    meanwhile; when the first vanishes every buffer, slot and byte comes back."""
    compiled()

    def at_stall(conn: Connection, vbd: VBD, server: NbdServer, length: int) -> None:
        assert vbd.stats.read_reqs > MAX_IN_FLIGHT  # some served and answered inline
        assert server.pool.budget.used > MAX_IN_FLIGHT * length - length

    def at_end(conn: Connection, vbd: VBD, server: NbdServer) -> None:
        assert server.pool.budget.used == 0
    stall_then_vanish(shm, at_stall, at_end)


def test_writes_inline_then_paused_disk_holds_them(shm: Path) -> None:  # noqa: F811
    """Writes served inline; then the disk is paused: the next writes are not served
    inline (nor at all) until it resumes, and are then answered and on disk."""
    compiled()
    spec, path, content = make_image(shm, "raw")
    sock = shm / "s.sock"

    async def body(engine: ThreadEngine) -> None:
        async with nbd_served(engine, spec, sock) as (server, vbd):
            counts = spy_side_door(vbd)
            w, conn = await attach(server, sock, structured=False)
            one = data(21, 4096)
            got = await exchange(w, req(WRITE, 0, 4096, handle=1, payload=one), 1, {})
            assert got == {1: (0, b"")} and counts["write"] == [1, 0]
            await vbd.pause()
            two = data(22, 4096)
            w.sock.sendall(req(WRITE, 4096, 4096, handle=2, payload=two))
            await asyncio.sleep(0.2)
            assert path.read_bytes()[4096:8192] == content[4096:8192]  # held
            await vbd.resume(await engine.call(open_stack, engine, spec, writable=True))
            assert await asyncio.to_thread(collect, w, 1, {}) == {2: (0, b"")}
            assert path.read_bytes()[:8192] == one + two
            await settled(conn, vbd)
    arun(body)


def test_random_pipelines_against_a_model(shm: Path) -> None:  # noqa: F811
    """Random pipelines of reads and writes of random aligned sizes (some over the
    scratch buffer's worth together, some over MAX_LENGTH), sent in random pieces: every
    read equals the model at the time (no overlap between a read and a write in flight),
    every write lands."""
    compiled()
    spec, path, content = make_image(shm, "raw")
    sock = shm / "s.sock"
    rng = random.Random(160)

    async def body(engine: ThreadEngine) -> None:
        async with nbd_served(engine, spec, sock) as (server, vbd):
            w, conn = await attach(server, sock)
            model = bytearray(content)
            handle = 0
            for _ in range(20):
                reqs, reads, expect = [], {}, {}
                busy: list[tuple[int, int]] = []
                for _ in range(rng.randrange(1, 40)):
                    n = rng.choice((SECTOR, 4096, 65536, 512 * KiB, 2 * MiB))
                    off = rng.randrange((len(content) - n) // SECTOR) * SECTOR
                    if any(off < e and b < off + n for b, e in busy):
                        continue
                    busy.append((off, off + n))
                    handle += 1
                    if rng.random() < 0.5:
                        payload = rng.randbytes(n)
                        model[off : off + n] = payload
                        reqs.append(req(WRITE, off, n, handle=handle, payload=payload))
                        expect[handle] = (0, b"")
                    else:
                        reads[handle] = (off, n)
                        reqs.append(req(READ, off, n, handle=handle))
                        expect[handle] = (0, bytes(model[off : off + n]))
                got = await exchange(w, pieces_of(b"".join(reqs), rng, 5), len(expect),
                                     reads, pause=0.0005)
                assert got == expect
            await settled(conn, vbd)
            assert outstanding(server.pool) == 0
            assert path.read_bytes() == bytes(model)
    arun(body)


# ------------------------------------------------------------------------- VHD blocks
class Mapped(Bench):
    """A file laid out as a dynamic VHD's data would be, by hand: 64 KiB blocks, one
    bitmap sector before each block's data; block 0 at sector 8, block 1 unallocated,
    block 2 allocated but not full, block 3 at sector 400 and block 4 right after it
    (full), block 5 full but at sector 200 (out of order)."""

    BLOCK = 64 * KiB
    SPB = BLOCK // SECTOR

    def __init__(self, folder: Path) -> None:
        super().__init__(folder, size=2 * MiB)
        self.bat = array.array("I", [0xFFFFFFFF] * 8)
        places = {0: 8, 2: 140, 3: 400, 4: 400 + 1 + self.SPB, 5: 200}
        for blk, sec in places.items():
            self.bat[blk] = sec
        self.batmap = bytearray(1)
        for blk in (0, 3, 4, 5):
            self.batmap[0] |= 0x80 >> blk

    def file_offset(self, disk: int) -> int:
        blk, within = divmod(disk, self.BLOCK)
        return (self.bat[blk] + 1) * SECTOR + within

    def pump(self, stream: bytes, *, structured: bool = True, memory: bool = True,
             writes: bool = True, budget: int = 64, max_length: int = inline.MAX_LENGTH,
             size: int | None = None) -> Pumped:
        self.rbuf[: len(stream)] = stream
        target = InlineTarget(self.fd, 8 * self.BLOCK, memory, writes, self.bat,
                              self.batmap, self.BLOCK, 1)
        return Pumped(compiled()(self.server.fileno(), self.rbuf, 0, len(stream),
                                 self.scratch, target, structured, budget, max_length))


def test_pump_through_a_block_map(shm: Path) -> None:  # noqa: F811
    """Reads within a full block, across two full blocks (adjacent in the file or not)
    are served from where the map says; a read touching an unallocated block or one not
    full, or a block past the BAT, stops the pass, and so does a write across blocks or
    to a block not full; a write within a full block lands at its mapped place."""
    b = Mapped(shm)
    try:
        def expect(disk: int, n: int) -> bytes:
            out = b""
            while n:
                k = min(n, b.BLOCK - disk % b.BLOCK)
                at = b.file_offset(disk)
                out += b.content[at : at + k]
                disk, n = disk + k, n - k
            return out
        served = [(0, 4096), (b.BLOCK - 4096, 4096), (3 * b.BLOCK + 8192, 65536),
                  (4 * b.BLOCK + b.BLOCK // 2, b.BLOCK)]  # 4 -> 5: not adjacent in the file
        stream = b"".join(req(READ, off, n, handle=i) for i, (off, n) in enumerate(served))
        out = b.pump(stream, structured=False)
        assert (out.start, out.reads) == (len(stream), len(served))
        got = b.recv(out.used)
        pos = 0
        for i, (off, n) in enumerate(served):
            assert got[pos : pos + 16] == p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, i)
            assert got[pos + 16 : pos + 16 + n] == expect(off, n), i
            pos += 16 + n
        for off, n in ((b.BLOCK - 4096, 8192), (b.BLOCK, 4096), (2 * b.BLOCK, 4096),
                       (5 * b.BLOCK + 4096, b.BLOCK), (6 * b.BLOCK, 4096)):
            out = b.pump(req(READ, off, n, handle=9))
            assert (out.start, out.reads, out.used) == (0, 0, 0), (off, n)
        before = b.path.read_bytes()
        for off, n in ((b.BLOCK - 4096, 8192), (2 * b.BLOCK, 4096), (b.BLOCK, 512)):
            out = b.pump(req(WRITE, off, n, handle=9, payload=b"w" * n))
            assert (out.start, out.writes) == (0, 0), (off, n)
        assert b.path.read_bytes() == before
        one = data(31, 8192)
        out = b.pump(req(WRITE, 3 * b.BLOCK + 4096, 8192, handle=7, payload=one))
        assert (out.writes, out.write_bytes) == (1, 8192)
        assert b.recv(16) == p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, 7)
        after = b.path.read_bytes()
        at = b.file_offset(3 * b.BLOCK + 4096)
        assert after[at : at + 8192] == one
        assert after[:at] == before[:at] and after[at + 8192 :] == before[at + 8192 :]
    finally:
        b.close()


def test_pump_refuses_a_bat_of_the_wrong_type(bench: Bench) -> None:
    target = InlineTarget(bench.fd, bench.size, True, True)
    for bat, block in ((bytearray(8), 65536), (array.array("H", [1]), 65536),
                       (array.array("I", [1]), 1000)):
        with pytest.raises((TypeError, ValueError)):
            compiled()(bench.server.fileno(), bench.rbuf, 0, 0, bench.scratch,
                       target._replace(bat=bat, batmap=bytearray(1), block_bytes=block,
                                       data_secs=1), True, 1, 4096)


def test_pump_refuses_a_hits_counter_of_the_wrong_shape_before_serving(
        bench: Bench) -> None:
    """A target whose hits counter is not an array of 'Q' with one item per layer raises
    before a request is served (nothing sent, nothing consumed): after serving, the
    count could not fail."""
    stream = req(READ, 0, 4096, handle=1)
    bench.rbuf[: len(stream)] = stream
    below = (InlineTarget(bench.fd, bench.size, True, False),)
    for hits in (array.array("Q", [0]), array.array("I", [0, 0]), bytes(16)):
        target = InlineTarget(bench.fd, bench.size, True, True, below=below, hits=hits)
        with pytest.raises((TypeError, BufferError)):
            compiled()(bench.server.fileno(), bench.rbuf, 0, len(stream), bench.scratch,
                       target, True, 1, 4096)
    bench.client.setblocking(False)
    with pytest.raises(BlockingIOError):
        bench.client.recv(1)
    hits = array.array("Q", [0, 0])
    target = InlineTarget(bench.fd, bench.size, True, True, below=below, hits=hits)
    out = Pumped(compiled()(bench.server.fileno(), bench.rbuf, 0, len(stream),
                            bench.scratch, target, True, 1, 4096))
    assert out.reads == 1 and list(hits) == [8, 0]  # the top (a raw file) held it


def test_the_target_fields_are_where_the_compiled_path_reads_them() -> None:
    """nbd_pump reads an InlineTarget by position: its fields, in order, are the ones
    the extension names; and its limits on a chain's layers are InlineChain's."""
    compiled()
    from blktap.transport.nbd import _inline
    assert InlineTarget._fields[: len(_inline.TARGET_FIELDS)] == _inline.TARGET_FIELDS
    assert len(InlineTarget._fields) == len(_inline.TARGET_FIELDS)
    # InlineChain builds no chain deeper than the extension reads through.
    assert (InlineChain.MAX_LAYERS, InlineChain.MAX_QCOW2_LAYERS) == (
        _inline.MAX_LAYERS, _inline.MAX_QCOW2_LAYERS)


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_a_vhd_mixed_burst_gets_the_answers_the_python_path_gives(
        shm: Path, monkeypatch: pytest.MonkeyPatch, structured: bool) -> None:  # noqa: F811
    """The mixed bursts on a dynamic VHD with blocks whole, in pieces and unallocated
    (reads of holes, writes that allocate): the same answers, image content and
    statistics with the compiled path on and off; it served some; vhd-util check finds
    the image valid."""
    compiled()
    spec, path, _ = make_image(shm, "vhd")
    content = chain_bytes(path)
    runs = on_and_off(monkeypatch, {path: path.read_bytes()}, lambda: (
        *run_burst(shm, spec, content, structured), chain_bytes(path)))
    assert_same_bursts(runs)
    verdict = vhd_check.check(str(path))
    assert verdict.errno == 0, verdict.messages


@pytest.mark.interop
def test_libnbd_on_a_vhd_checked_by_qemu_img(shm: Path) -> None:  # noqa: F811
    """The mixed libnbd client (64 in flight) on a dynamic VHD: statistics match, some
    requests served inline, qemu-img compare finds the VHD (vpc) equal to the model, read
    through the server and as a file."""
    compiled()
    need_libnbd()
    need("qemu-img")
    spec, path, _ = make_image(shm, "vhd")
    client, stats, inline_served = run_libnbd(shm, spec, chain_bytes(path), 10, 2000)
    model_out = shm / "model.out"
    assert stats["read_reqs"] == client["reads"] and stats["write_reqs"] == client["writes"]
    assert stats["errors"] == 0
    assert inline_served > 0
    qemu_compare(str(path), model_out, fmt="vpc")


def test_a_target_the_compiled_path_refuses_leaves_the_python_path_serving(
        shm: Path, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    """A driver answering a target the compiled path cannot take (a BAT that is a list):
    the connection logs it once, turns the compiled path off for itself and serves every
    request the Python way."""
    compiled()
    spec, _, content = make_image(shm, "raw")
    sock = shm / "s.sock"

    async def body(engine: ThreadEngine) -> None:
        async with nbd_served(engine, spec, sock) as (server, vbd):
            good = vbd.inline_target()
            assert good is not None
            vbd.inline_target = lambda: good._replace(  # type: ignore[method-assign]
                bat=[1, 2], batmap=bytearray(1), block_bytes=65536, data_secs=1)
            w, conn = await attach(server, sock)
            reads = {i: (i * 8192, 4096) for i in range(1, 40)}
            stream = b"".join(req(READ, o, n, handle=h) for h, (o, n) in reads.items())
            got = await exchange(w, stream, len(reads), reads)
            assert got == {h: (0, content[o : o + n]) for h, (o, n) in reads.items()}
            assert conn._inline is None
            await settled(conn, vbd)
    with caplog.at_level("ERROR", logger="blktap.nbd"):
        arun(body)
    assert sum("compiled inline path failed" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.interop
def test_libnbd_on_a_raw_file_in_the_page_cache(tmp_path: Path) -> None:
    """A raw file on disk opened without O_DIRECT (tapdisk -D): the compiled path reads
    what the page cache holds (RWF_NOWAIT), writes whole pages into it, and leaves every
    read that would wait to the Python path. The mixed libnbd client's statistics match,
    some requests (at most as many as it made) were served inline; qemu-img finds the
    disk equal to the model."""
    compiled()
    need_libnbd()
    need("qemu-img")
    spec, path, content = make_image(tmp_path, "raw")
    client, stats, inline_served = run_libnbd(tmp_path, spec, content, 11, 2000,
                                              direct=False)
    assert stats["read_reqs"] == client["reads"] and stats["write_reqs"] == client["writes"]
    assert stats["errors"] == 0
    assert 0 < inline_served <= client["reads"] + client["writes"]
    assert path.read_bytes() == (tmp_path / "model.out").read_bytes()


# ------------------------------------------------------------------------- VHD chains
def images_hits(vbd: VBD) -> list[tuple[str, list[int]]]:
    return [(Path(i["name"]).name, i["hits"]) for i in vbd.stats_dict()["images"]]


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_a_vhd_chain_is_read_through_its_layers_inline(
        shm: Path, monkeypatch: pytest.MonkeyPatch, structured: bool) -> None:  # noqa: F811
    """base <- mid (empty) <- leaf: reads of blocks no layer holds (zeros), of the base's
    full block, of the leaf's and base's partial blocks (the Python path's), across
    blocks, and writes (allocating in the leaf): with the compiled path on, every reply,
    the chain's bytes and each layer's hits in the stats are what they are with it off;
    it served the reads of blocks it can place."""
    compiled()
    # Every request the pass leaves is followed by a pass (no backing off: counted here).
    monkeypatch.setattr(connection, "INLINE_MISSES", 1 << 30)
    base, mid, leaf = make_chain(shm)
    pristine = {p: p.read_bytes() for p in (base, mid, leaf)}
    content = chain_bytes(leaf)
    sock = shm / "s.sock"
    reads = {1: (14 * MiB, 65536), 2: (10 * MiB + 4096, 8192), 3: (4 * MiB, 32768),
             4: (16384, 32768), 5: (6 * MiB, 4096), 6: (8 * MiB - 4096, 8192),
             7: (12 * MiB - 4096, 8192), 8: (10 * MiB, 2 * MiB), 9: (15 * MiB, MiB)}
    writes = {20: (12 * MiB, data(16, 4096))}

    def run() -> tuple[dict, list, int, bytes]:
        async def body(engine: ThreadEngine) -> tuple[dict, list, int]:
            async with nbd_served(engine, f"vhd:{leaf}", sock) as (server, vbd):
                served = count_inline(vbd)
                w, conn = await attach(server, sock, structured=structured)
                stream = b"".join(req(READ, o, n, handle=h) for h, (o, n) in reads.items())
                got = await exchange(w, stream, len(reads), reads)
                stream = b"".join(req(WRITE, o, len(b), handle=h, payload=b)
                                  for h, (o, b) in writes.items())
                got |= await exchange(w, stream, len(writes), {})
                again = {h + 100: v for h, v in reads.items()}
                stream = b"".join(req(READ, o, n, handle=h) for h, (o, n) in again.items())
                got |= await exchange(w, stream, len(again), again)
                await settled(conn, vbd)
                return got, images_hits(vbd), served[0]
        got, hit, served = arun(body)
        return got, hit, served, chain_bytes(leaf)

    runs = on_and_off(monkeypatch, pristine, run)
    assert runs["1"][0] == runs["0"][0]
    expect = bytearray(content)
    expect[12 * MiB : 12 * MiB + 4096] = writes[20][1]
    for h, (o, n) in reads.items():
        assert runs["1"][0][h] == (0, content[o : o + n]), h
        assert runs["1"][0][h + 100] == (0, bytes(expect[o : o + n])), h
    assert runs["1"][1] == runs["0"][1]  # each layer's hits
    assert runs["1"][3] == runs["0"][3] == bytes(expect)
    assert runs["0"][2] == 0
    # 1 (zeros), 2 (the base's full block) and 9 (zeros), twice; in a simple session
    # also 7 (zeros and the base's data) before the write made its block the leaf's, in
    # pieces. The rest are the Python path's: partial blocks, and 8, over 1 MiB.
    assert runs["1"][2] == (6 if structured else 7)


def test_a_chain_target_reads_each_layer_and_stops_at_what_it_cannot_place(
        shm: Path) -> None:  # noqa: F811
    """The leaf's target carries the layers below (mid, base: read-only, nearest first),
    zeros under the base, and a hits counter per layer; a leaf over a raw file has the
    file below it (every byte at its own offset); an encrypted leaf has none."""
    base, mid, leaf = make_chain(shm)
    raw = shm / "parent.raw"
    raw.write_bytes(data(20, 16 * MiB))
    over_raw = shm / "over-raw.vhd"
    vhd_snapshot(str(over_raw), str(raw), raw_parent=True)

    async def body(engine: ThreadEngine) -> None:
        vbd = VBD(await engine.call(open_stack, engine, f"vhd:{leaf}", writable=True))
        t = vbd.inline_target()
        assert t is not None and len(t.below) == 2 and t.holes_zero
        assert all(not b.writes for b in t.below)
        assert t.below[0].bat is vbd.driver.parent.image.bat
        assert t.below[1].bat is vbd.driver.parent.parent.image.bat
        assert len(t.hits) == 3
        await vbd.close()
        vr = VBD(await engine.call(open_stack, engine, f"vhd:{over_raw}", writable=True))
        t = vr.inline_target()
        assert t is not None and len(t.below) == 1 and t.below[0].bat is None
        await vr.close()
    arun(body)


def count_pass_calls(conn: Connection) -> list[int]:
    """Count the connection's calls of the compiled pass from now on (the list's one
    item)."""
    calls = [0]
    pump = conn._inline

    def counting(*args: object) -> tuple:
        calls[0] += 1
        return pump(*args)
    conn._inline = counting
    return calls


def test_a_disk_the_pass_never_serves_is_asked_less_often(
        shm: Path) -> None:  # noqa: F811
    """A qcow2 image all of compressed clusters: every read is the Python path's. After
    INLINE_MISSES passes in a row that served nothing, the connection asks one time in
    INLINE_RETRY; every read is answered right; once the image holds a plain cluster (a
    write), the pass serves its reads again and the count starts over."""
    compiled()
    from qcow2_helpers import qemu_img
    base = shm / "base.raw"
    content = b"".join(f"cluster {i:6d} ".encode() * 4096 for i in range(128))
    base.write_bytes(content)  # (compressible: qemu stores what does not shrink plainly)
    top = shm / "top.qcow2"
    qemu_img("convert", "-q", "-c", "-f", "raw", "-O", "qcow2", base, top)
    sock = shm / "s.sock"

    async def body(engine: ThreadEngine) -> None:
        async with nbd_served(engine, f"qcow2:{top}", sock) as (server, vbd):
            w, conn = await attach(server, sock)
            calls = count_pass_calls(conn)
            reads = {h: (h * 65536, 4096) for h in range(1, 101)}
            for h, (o, n) in reads.items():  # one at a time: a pass before each
                got = await exchange(w, req(READ, o, n, handle=h), 1, {h: (o, n)})
                assert got == {h: (0, content[o : o + n])}
            assert conn._inline_misses >= connection.INLINE_MISSES
            asked = connection.INLINE_MISSES + (100 - connection.INLINE_MISSES) \
                // connection.INLINE_RETRY
            assert calls[0] <= asked + 1
            one = data(31, 65536)
            got = await exchange(w, req(WRITE, 0, 65536, handle=200, payload=one), 1, {})
            assert got == {200: (0, b"")}
            served = count_inline(vbd)
            for h in range(300, 300 + 2 * connection.INLINE_RETRY):
                got = await exchange(w, req(READ, 0, 4096, handle=h), 1, {h: (0, 4096)})
                assert got == {h: (0, one[:4096])}
            assert served[0] >= connection.INLINE_RETRY
            assert conn._inline_misses == 0
            await settled(conn, vbd)
    arun(body)


def test_a_probes_requests_never_reach_the_pass_and_the_reads_behind_them_do(
        shm: Path) -> None:  # noqa: F811
    """Block status requests (a probe's: nbdcopy, nbdinfo) on a raw disk (whose holes
    the file system tells, not a map the pass reads) are not handed to the compiled
    pass, and do not count as its misses; reads sent behind one in the same message are
    still the pass's."""
    compiled()
    spec, _, content = make_image(shm, "raw")
    sock = shm / "s.sock"

    async def body(engine: ThreadEngine) -> None:
        async with nbd_served(engine, spec, sock) as (server, vbd):
            w, conn = await attach(server, sock)
            calls = count_pass_calls(conn)
            for h in range(1, 2 * connection.INLINE_MISSES + 1):
                got = await exchange(w, req(STATUS, 0, 1 << 20, handle=h), 1, {})
                assert got[h][0] == 0
            assert calls[0] == 0 and conn._inline_misses == 0
            served = count_inline(vbd)
            reads = {h: (h * 8192, 4096) for h in range(100, 108)}
            stream = req(STATUS, 0, 1 << 20, handle=99) + b"".join(
                req(READ, o, n, handle=h) for h, (o, n) in reads.items())
            got = await exchange(w, stream, 1 + len(reads), reads)
            assert got[99][0] == 0
            for h, (o, n) in reads.items():
                assert got[h] == (0, content[o : o + n])
            assert served[0] == len(reads)
            await settled(conn, vbd)
    arun(body)


@pytest.mark.interop
def test_libnbd_on_a_deep_vhd_chain_checked_by_qemu_img(shm: Path) -> None:  # noqa: F811
    """A VHD of random data, every block full, under seven empty snapshots: a chain
    deeper than the compiled path keeps on its stack (FEW_LAYERS). The mixed libnbd
    client (64 in flight, every read checked, writes allocating blocks of the leaf in
    pieces, which leaves those blocks' later reads to the Python path) gets the chain's
    bytes; reads of the base through the empty layers are served inline; qemu-img compare
    finds the disk, through the server, equal to the client's model."""
    compiled()
    need_libnbd()
    need("qemu-img")
    base = shm / "base.vhd"
    content = data(74, 32 * MiB)
    create(str(base), len(content))
    with Chain.open(f"vhd:{base}", writable=True) as c:
        c.pwrite(0, content)
    parent = base
    for i in range(7):
        child = shm / f"snap-{i}.vhd"
        vhd_snapshot(str(child), str(parent), skip_empty=False)
        parent = child
    with Chain.open(f"vhd:{parent}") as chain:
        assert len(chain) == 8
    client, stats, inline_served = run_libnbd(shm, f"vhd:{parent}", content, 13, 2000)
    assert stats["read_reqs"] == client["reads"] and stats["write_reqs"] == client["writes"]
    assert stats["errors"] == 0
    assert inline_served > 0
