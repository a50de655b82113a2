"""The Linux AIO engine (``blktap.io.linuxaio``) against the real kernel.

Every test here uses files on a disk file system (O_DIRECT means something there; on
tmpfs it does not), checks what reached the kernel through the engine's counters
(``aio_submitted``: iocbs the kernel took; ``submitted``: jobs handed to worker threads)
or through the iocbs themselves, and checks the bytes against an independent model read
back with plain buffered ``os.pread``. The struct layouts are checked against offsets
written down from ``linux/aio_abi.h`` (and, where a C compiler is installed, against the
header itself), never against the module's own declarations.

The last part runs ``blktap serve aio:FILE --io-engine ...`` as a real process under
qemu-io and qemu-img, and under strace to see whether io_submit is used.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import mmap
import os
import random
import shutil
import signal
import struct
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import conftest
from blktap.io import BufferPool, LinuxAioEngine, ThreadEngine, aio_abi, best_engine, syscalls
from blktap.io.iov import IOV_MAX
from conftest import ROOT, need, run, tool

KiB = 1 << 10
MiB = 1 << 20
BLOCK = 4096

# ------------------------------------------------------------------ linux/aio_abi.h
# Written down from the header (little-endian machines), not taken from the module.
IOCB_SIZE = 64
IOCB_OFFSETS = {  # field: (offset, struct format of the field)
    "aio_data": (0, "<Q"),
    "aio_key": (8, "<I"),
    "aio_rw_flags": (12, "<i"),  # __kernel_rwf_t is an int
    "aio_lio_opcode": (16, "<H"),
    "aio_reqprio": (18, "<h"),
    "aio_fildes": (20, "<I"),
    "aio_buf": (24, "<Q"),
    "aio_nbytes": (32, "<Q"),
    "aio_offset": (40, "<q"),
    "aio_reserved2": (48, "<Q"),
    "aio_flags": (56, "<I"),
    "aio_resfd": (60, "<I"),
}
IO_EVENT_SIZE = 32
IO_EVENT_OFFSETS = {"data": (0, "<Q"), "obj": (8, "<Q"), "res": (16, "<q"),
                    "res2": (24, "<q")}
IOVEC_SIZE = 16
IOVEC_OFFSETS = {"iov_base": (0, "<Q"), "iov_len": (8, "<Q")}
# enum of IOCB_CMD_* and the flag bit
HEADER_OPCODES = {"PREAD": 0, "PWRITE": 1, "PREADV": 7, "PWRITEV": 8}
HEADER_IOCB_FLAG_RESFD = 1


def field(raw: bytes, offsets: dict[str, tuple[int, str]], name: str) -> int:
    off, fmt = offsets[name]
    return struct.unpack_from(fmt, raw, off)[0]


def decode_iocb(raw: bytes) -> dict[str, int]:
    return {name: field(raw, IOCB_OFFSETS, name) for name in IOCB_OFFSETS}


# ------------------------------------------------------------------ fixtures and helpers
def _on_disk(path: Path) -> bool:
    """``path`` is a folder on a file system that keeps data on a device and takes
    O_DIRECT."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        if syscalls.in_memory(fd):
            return False
    finally:
        os.close(fd)
    probe = path / ".odirect-probe"
    try:
        pfd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
        os.close(pfd)
        return True
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)


@pytest.fixture
def disk_dir(tmp_path: Path) -> Iterator[Path]:
    """A private folder on a disk file system (not tmpfs), or skip."""
    if _on_disk(tmp_path):
        yield tmp_path
        return
    for base in (Path("/var/tmp"), ROOT.parent, ROOT):
        if base.is_dir() and os.access(base, os.W_OK) and _on_disk(base):
            folder = Path(tempfile.mkdtemp(prefix="blktap-linuxaio-", dir=base))
            try:
                yield folder
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            return
    pytest.skip("no disk file system (every candidate folder is tmpfs or refuses O_DIRECT)")


class Disk:
    """A file with random content, a direct and a buffered descriptor on it, and a model
    of what it should hold."""

    def __init__(self, folder: Path, size: int, seed: int = 1, name: str = "disk.img"):
        self.path = folder / name
        rng = random.Random(seed)
        self.model = bytearray(rng.randbytes(size))
        self.path.write_bytes(self.model)
        self.dfd = os.open(self.path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
        self.bfd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        # Whether direct I/O takes 512-byte sectors here (a 4K-sector device does not).
        with mmap.mmap(-1, BLOCK) as mem:
            view = memoryview(mem)
            try:
                os.preadv(self.dfd, [view[:512]], 512)
                self.direct_512 = True
            except OSError:
                self.direct_512 = False
            view.release()

    def need_512(self) -> None:
        if not self.direct_512:
            pytest.skip("direct I/O needs more than 512-byte alignment here")

    def read_back(self, offset: int = 0, length: int | None = None) -> bytes:
        """What the file holds, through the buffered descriptor (coherent with direct
        writes: the kernel drops the cached pages they cover)."""
        if length is None:
            length = os.fstat(self.bfd).st_size - offset
        return os.pread(self.bfd, length, offset)

    def close(self) -> None:
        for fd in (self.dfd, self.bfd):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def disk(disk_dir: Path) -> Iterator[Disk]:
    d = Disk(disk_dir, 8 * MiB)
    yield d
    d.close()


def with_engine(body: Callable[[LinuxAioEngine], Awaitable[Any]], **kwargs: Any) -> Any:
    """Run ``body(engine)`` on a fresh loop with a fresh LinuxAioEngine, closed after."""
    return conftest.with_engine(body, LinuxAioEngine, **kwargs)


def fill(view: memoryview, byte: int) -> None:
    view[:] = bytes([byte]) * len(view)


async def model_op(engine: LinuxAioEngine, disk: Disk, pool: BufferPool,
                   rng: random.Random, block: int, write: bool) -> None:
    """A 4 KiB read of ``block`` checked against the model, or a write of random bytes
    the model takes (callers never have two in flight on one block)."""
    offset = block * BLOCK
    buf = pool.get(BLOCK)
    try:
        if write:
            data = rng.randbytes(BLOCK)
            buf.view[:] = data
            disk.model[offset : offset + BLOCK] = data
            await engine.pwritev(disk.dfd, [buf.view], offset)
        else:
            expect = bytes(disk.model[offset : offset + BLOCK])
            await engine.preadv(disk.dfd, [buf.view], offset)
            assert buf.view == expect
    finally:
        pool.put(buf)


def aligned_views(pool: BufferPool, sizes: list[int]) -> list[memoryview]:
    """Page-aligned views, each of its own pool buffer."""
    return [pool.get(n).view for n in sizes]


# ================================================================== 1. struct layouts
def test_struct_sizes_match_header() -> None:
    assert aio_abi.IOCB.size == IOCB_SIZE
    assert aio_abi.IO_EVENT.size == IO_EVENT_SIZE
    assert aio_abi.IOVEC.size == IOVEC_SIZE
    assert (aio_abi.CMD_PREAD, aio_abi.CMD_PWRITE, aio_abi.CMD_PREADV,
            aio_abi.CMD_PWRITEV) == tuple(HEADER_OPCODES.values())
    assert aio_abi.IOCB_FLAG_RESFD == HEADER_IOCB_FLAG_RESFD


def test_iocb_fields_land_at_header_offsets() -> None:
    # Distinct values per field, packed in the header's field order: each must be found
    # at the header's offset, so a swapped or mis-sized field shows.
    values = {"aio_data": 0x0102030405060708, "aio_key": 0x11121314,
              "aio_rw_flags": 0x21222324, "aio_lio_opcode": 0x3132, "aio_reqprio": -2,
              "aio_fildes": 0x41424344, "aio_buf": 0x5152535455565758,
              "aio_nbytes": 0x6162636465666768, "aio_offset": -0x7172737475767778,
              "aio_reserved2": 0x0A0B0C0D0E0F1011, "aio_flags": 0x1A1B1C1D,
              "aio_resfd": 0x2A2B2C2D}
    raw = aio_abi.IOCB.pack(*values.values())
    assert len(raw) == IOCB_SIZE
    assert decode_iocb(raw) == values


def test_io_event_and_iovec_fields_at_header_offsets() -> None:
    raw = bytearray(IO_EVENT_SIZE)
    for name, value in (("data", 7), ("obj", 0xDEADBEEF00), ("res", -errno.EINVAL),
                        ("res2", 3)):
        off, fmt = IO_EVENT_OFFSETS[name]
        struct.pack_into(fmt, raw, off, value)
    assert aio_abi.IO_EVENT.unpack(raw) == (7, 0xDEADBEEF00, -errno.EINVAL, 3)

    raw = aio_abi.IOVEC.pack(0x1122334455667788, 4096)
    assert field(raw, IOVEC_OFFSETS, "iov_base") == 0x1122334455667788
    assert field(raw, IOVEC_OFFSETS, "iov_len") == 4096


def test_offsets_written_here_match_the_installed_header(tmp_path: Path) -> None:
    """The offsets above, checked by a C compiler against <linux/aio_abi.h> itself."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not Path("/usr/include/linux/aio_abi.h").exists():
        pytest.skip("no C compiler or kernel headers")
    lines = ['#include <stddef.h>', '#include <stdio.h>', '#include <sys/uio.h>',
             '#include <linux/aio_abi.h>', 'int main(void) {',
             'printf("iocb %zu\\n", sizeof(struct iocb));',
             'printf("io_event %zu\\n", sizeof(struct io_event));',
             'printf("iovec %zu\\n", sizeof(struct iovec));',
             'printf("PREAD %d\\nPWRITE %d\\nPREADV %d\\nPWRITEV %d\\n", IOCB_CMD_PREAD, '
             'IOCB_CMD_PWRITE, IOCB_CMD_PREADV, IOCB_CMD_PWRITEV);',
             'printf("RESFD %d\\n", IOCB_FLAG_RESFD);']
    for struct_name, offsets in (("iocb", IOCB_OFFSETS), ("io_event", IO_EVENT_OFFSETS),
                                 ("iovec", IOVEC_OFFSETS)):
        for name in offsets:
            lines.append(f'printf("{struct_name}.{name} %zu\\n", '
                         f'offsetof(struct {struct_name}, {name}));')
    lines.append("return 0; }")
    src = tmp_path / "abi.c"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp_path / "abi"
    built = run([cc, "-o", str(exe), str(src)], text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    out = dict(line.split() for line in run([str(exe)], text=True).stdout.splitlines())
    assert int(out["iocb"]) == IOCB_SIZE
    assert int(out["io_event"]) == IO_EVENT_SIZE
    assert int(out["iovec"]) == IOVEC_SIZE
    for name, value in HEADER_OPCODES.items():
        assert int(out[name]) == value
    assert int(out["RESFD"]) == HEADER_IOCB_FLAG_RESFD
    for struct_name, offsets in (("iocb", IOCB_OFFSETS), ("io_event", IO_EVENT_OFFSETS),
                                 ("iovec", IOVEC_OFFSETS)):
        for name, (off, _) in offsets.items():
            assert int(out[f"{struct_name}.{name}"]) == off, (struct_name, name)


def test_iocbs_given_to_the_kernel_decode_with_header_layout(
        disk: Disk, monkeypatch: pytest.MonkeyPatch) -> None:
    """What io_submit is handed, read from memory with the header's offsets: opcode,
    descriptor, buffer addresses and lengths, offset, RWF_DSYNC, the eventfd."""
    seen: list[dict[str, Any]] = []
    real_submit = aio_abi.io_submit

    def spy(ctx: int, count: int, pointers: int) -> int:
        for i in range(count):
            address = int.from_bytes(ctypes.string_at(pointers + 8 * i, 8), "little")
            iocb = decode_iocb(ctypes.string_at(address, IOCB_SIZE))
            if iocb["aio_lio_opcode"] in (HEADER_OPCODES["PREADV"], HEADER_OPCODES["PWRITEV"]):
                iocb["iovecs"] = [
                    (field(raw, IOVEC_OFFSETS, "iov_base"), field(raw, IOVEC_OFFSETS, "iov_len"))
                    for raw in (ctypes.string_at(iocb["aio_buf"] + IOVEC_SIZE * k, IOVEC_SIZE)
                                for k in range(iocb["aio_nbytes"]))]
            seen.append(iocb)
        return real_submit(ctx, count, pointers)

    monkeypatch.setattr(aio_abi, "io_submit", spy)
    pool = BufferPool()
    single = pool.get(8 * KiB).view
    parts = aligned_views(pool, [4 * KiB, 12 * KiB])

    def addr(view: memoryview) -> int:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))

    async def body(engine: LinuxAioEngine) -> None:
        await engine.preadv(disk.dfd, [single], 64 * KiB)
        fill(single, 0x42)
        await engine.pwritev(disk.dfd, [single], 128 * KiB, dsync=True)
        await engine.preadv(disk.dfd, parts, 256 * KiB)
        await engine.pwritev(disk.dfd, parts, 512 * KiB)
        resfd = seen[0]["aio_resfd"]
        assert os.readlink(f"/proc/self/fd/{resfd}") == "anon_inode:[eventfd]"

    with_engine(body)
    assert len(seen) == 4
    read1, write1, readv, writev = seen
    for iocb in seen:
        assert iocb["aio_fildes"] == disk.dfd
        assert iocb["aio_flags"] & HEADER_IOCB_FLAG_RESFD
        assert iocb["aio_resfd"] == read1["aio_resfd"]
        assert iocb["aio_reqprio"] == 0 and iocb["aio_reserved2"] == 0
    assert (read1["aio_lio_opcode"], read1["aio_buf"], read1["aio_nbytes"],
            read1["aio_offset"], read1["aio_rw_flags"]) == \
        (HEADER_OPCODES["PREAD"], addr(single), 8 * KiB, 64 * KiB, 0)
    assert (write1["aio_lio_opcode"], write1["aio_buf"], write1["aio_nbytes"],
            write1["aio_offset"], write1["aio_rw_flags"]) == \
        (HEADER_OPCODES["PWRITE"], addr(single), 8 * KiB, 128 * KiB, os.RWF_DSYNC)
    expected_vecs = [(addr(v), len(v)) for v in parts]
    assert (readv["aio_lio_opcode"], readv["aio_nbytes"], readv["aio_offset"],
            readv["iovecs"], readv["aio_rw_flags"]) == \
        (HEADER_OPCODES["PREADV"], 2, 256 * KiB, expected_vecs, 0)
    assert (writev["aio_lio_opcode"], writev["aio_nbytes"], writev["aio_offset"],
            writev["iovecs"], writev["aio_rw_flags"]) == \
        (HEADER_OPCODES["PWRITEV"], 2, 512 * KiB, expected_vecs, 0)
    assert disk.read_back(128 * KiB, 8 * KiB) == b"\x42" * (8 * KiB)


# ================================================================== 2. data through the kernel
@pytest.mark.parametrize("dsync", [False, True])
def test_single_buffer_reads_and_writes(disk: Disk, dsync: bool) -> None:
    disk.need_512()
    pool = BufferPool()
    cases = [(0, 4 * KiB), (4 * KiB, 4 * KiB), (3 * MiB + 512, 512), (5 * MiB, 64 * KiB),
             (8 * MiB - 4 * KiB, 4 * KiB)]

    async def body(engine: LinuxAioEngine) -> None:
        for n, (offset, length) in enumerate(cases):
            buf = pool.get(length).view
            fill(buf, 0xEE)
            await engine.preadv(disk.dfd, [buf], offset)
            assert buf == disk.model[offset : offset + length]
            data = random.Random(n).randbytes(length)
            buf[:] = data
            await engine.pwritev(disk.dfd, [buf], offset, dsync=dsync)
            disk.model[offset : offset + length] = data
        assert engine.aio_submitted == 2 * len(cases)
        assert engine.submitted == 0  # no worker was woken
        assert engine.inline_reads == engine.inline_writes == 0

    with_engine(body)
    assert disk.read_back() == disk.model


@pytest.mark.parametrize("dsync", [False, True])
def test_vectored_reads_and_writes(disk: Disk, dsync: bool) -> None:
    """PREADV/PWRITEV: several buffers (some sliced out of one mapping) in one iocb."""
    disk.need_512()
    pool = BufferPool()
    big = pool.get(64 * KiB).view

    async def body(engine: LinuxAioEngine) -> None:
        layouts = [
            aligned_views(pool, [4 * KiB, 4 * KiB]),
            aligned_views(pool, [8 * KiB, 512, 4 * KiB, 1536]),
            [big[:4 * KiB], big[8 * KiB : 16 * KiB], big[32 * KiB :]],  # out of order
            aligned_views(pool, [4 * KiB] * 32),
        ]
        offset = 0
        for n, iov in enumerate(layouts):
            length = sum(len(v) for v in iov)
            for v in iov:
                fill(v, 0xEE)
            await engine.preadv(disk.dfd, iov, offset)
            assert b"".join(iov) == disk.model[offset : offset + length]
            data = random.Random(100 + n).randbytes(length)
            pos = 0
            for v in iov:
                v[:] = data[pos : pos + len(v)]
                pos += len(v)
            await engine.pwritev(disk.dfd, iov, offset + MiB, dsync=dsync)
            disk.model[offset + MiB : offset + MiB + length] = data
            offset += 2 * MiB - 512 * (n + 1)  # keeps to 512-byte (logical block) offsets
        assert engine.aio_submitted == 2 * len(layouts)
        assert engine.submitted == 0

    with_engine(body)
    assert disk.read_back() == disk.model


def test_200_concurrent_random_ops_against_model(disk: Disk) -> None:
    """Rounds of 200 gathered 4 KiB reads and writes at random distinct blocks (no two
    in flight touch the same block, so the result does not depend on their order)."""
    blocks = len(disk.model) // BLOCK
    rng = random.Random(7)
    pool = BufferPool()
    rounds, per_round = 5, 200

    async def body(engine: LinuxAioEngine) -> None:
        for _ in range(rounds):
            chosen = rng.sample(range(blocks), per_round)
            await asyncio.gather(*(model_op(engine, disk, pool, rng, b, rng.random() < 0.5)
                                 for b in chosen))
        assert engine.aio_submitted == rounds * per_round
        assert engine.submitted == 0

    with_engine(body)
    assert disk.read_back() == disk.model


def test_completions_are_taken_from_the_kernels_ring_without_io_getevents(
        disk: Disk, monkeypatch: pytest.MonkeyPatch) -> None:
    """On x86_64 the engine reads completions from the ring the kernel maps at the
    context's address (libaio's and fio's userspace reaping): no io_getevents while it
    runs, the ring's head handed back so the kernel reuses its slots. A small context
    (depth 8: the kernel's ring holds a page of events) is wrapped round many times by
    1,000 random reads and writes, checked against a model, with 8 in flight at once."""
    if os.uname().machine != "x86_64":
        pytest.skip("userspace reaping is used on x86_64 only")
    blocks = len(disk.model) // BLOCK
    rng = random.Random(8)
    pool = BufferPool()
    calls: list[int] = []
    real = aio_abi.io_getevents

    def spy(*args: Any) -> int:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(aio_abi, "io_getevents", spy)

    async def body(engine: LinuxAioEngine) -> None:
        ring = engine._ring
        assert ring is not None
        nr = aio_abi.AIO_RING.unpack_from(ring)[1]
        assert 8 <= nr < 1000  # so that 1,000 completions wrap it
        for _ in range(125):
            chosen = rng.sample(range(blocks), 8)
            await asyncio.gather(*(model_op(engine, disk, pool, rng, b, rng.random() < 0.5)
                                 for b in chosen))
        head, tail = struct.unpack_from("<II", ring, 8)
        assert head == tail == 1000 % nr
        assert engine.aio_submitted == 1000 and engine.submitted == 0
        assert not calls

    with_engine(body, depth=8)
    assert disk.read_back() == disk.model


def test_no_completion_is_lost_with_64_in_flight_under_plugs(disk: Disk) -> None:
    """20,000 reads and writes the callback way, 64 in flight, each completion starting
    one to three more (under a plug, as the VBD's kick does): every one is told, each
    block's content is the model's (one request per block at a time), and nothing is
    left in the engine. A completion missed by the ring reading would stall the run."""
    disk.need_512()
    blocks = len(disk.model) // BLOCK
    rng = random.Random(9)
    pool = BufferPool()
    total_ops, depth = 20000, 64

    async def body(engine: LinuxAioEngine) -> None:
        loop = asyncio.get_running_loop()
        finished = loop.create_future()
        busy: set[int] = set()
        state = {"started": 0, "done": 0, "last": loop.time()}

        def start() -> None:
            block = rng.randrange(blocks)
            while block in busy:
                block = rng.randrange(blocks)
            busy.add(block)
            buf = pool.get(BLOCK)
            offset = block * BLOCK
            write = rng.random() < 0.5
            if write:
                buf.view[:] = data = rng.randbytes(BLOCK)
                disk.model[offset : offset + BLOCK] = data
            expect = bytes(disk.model[offset : offset + BLOCK])

            def told(error: BaseException | None) -> None:
                assert error is None, error
                if not write:
                    assert buf.view == expect
                busy.discard(block)
                pool.put(buf)
                state["done"] += 1
                state["last"] = loop.time()
                with engine.plug():
                    for _ in range(rng.choice((1, 1, 2, 3))):
                        if state["started"] < total_ops and len(busy) < depth:
                            start()
                if state["done"] == total_ops:
                    finished.set_result(None)

            state["started"] += 1
            started = (engine.start_pwritev(disk.dfd, [buf.view], offset, told) if write
                       else engine.start_preadv(disk.dfd, [buf.view], offset, told))
            assert started

        with engine.plug():
            for _ in range(depth):
                start()
        while not finished.done():
            await asyncio.wait([finished], timeout=1)
            if loop.time() - state["last"] > 60:
                stuck = len(engine._ops)
                engine._ops.clear()  # lost: close() must not wait for them
                raise AssertionError(f"no completion for 60 s: {state}, {stuck} in the "
                                     f"engine")
        assert not engine._ops and not busy
        assert engine.submitted == 0  # every one through the kernel

    with_engine(body)
    assert disk.read_back() == disk.model


def test_one_mib_requests(disk: Disk) -> None:
    pool = BufferPool()

    async def body(engine: LinuxAioEngine) -> None:
        one = pool.get(MiB).view
        await engine.preadv(disk.dfd, [one], 2 * MiB)
        assert one == disk.model[2 * MiB : 3 * MiB]
        pieces = aligned_views(pool, [4 * KiB] * 256)  # 1 MiB in 256 buffers
        await engine.preadv(disk.dfd, pieces, 5 * MiB)
        assert b"".join(pieces) == disk.model[5 * MiB : 6 * MiB]

        data = random.Random(3).randbytes(MiB)
        one[:] = data
        # Several 1 MiB writes at once, one with RWF_DSYNC.
        writes = [engine.pwritev(disk.dfd, [one], 0),
                  engine.pwritev(disk.dfd, [one], 3 * MiB, dsync=True)]
        for i, v in enumerate(pieces):
            v[:] = data[i * 4 * KiB : (i + 1) * 4 * KiB]
        writes.append(engine.pwritev(disk.dfd, pieces, 7 * MiB, dsync=True))
        await asyncio.gather(*writes)
        for offset in (0, 3 * MiB, 7 * MiB):
            disk.model[offset : offset + MiB] = data
        assert engine.aio_submitted == 5
        assert engine.submitted == 0

    with_engine(body)
    assert disk.read_back() == disk.model


def test_more_buffers_than_iov_max_go_to_a_worker(disk: Disk) -> None:
    """The kernel takes at most IOV_MAX buffers in one iocb: more go to a worker, which
    splits them, and every byte still moves."""
    count = IOV_MAX + 50
    mem = mmap.mmap(-1, count * BLOCK)
    views = [memoryview(mem)[i * BLOCK : (i + 1) * BLOCK] for i in range(count)]
    disk_model_end = count * BLOCK
    assert disk_model_end <= len(disk.model)

    async def body(engine: LinuxAioEngine) -> None:
        await engine.preadv(disk.dfd, views, 0)
        assert mem[:] == disk.model[:disk_model_end]
        mem[:] = random.Random(9).randbytes(len(mem))
        await engine.pwritev(disk.dfd, views, 0)
        assert (engine.aio_submitted, engine.submitted) == (0, 2)

    with_engine(body)
    disk.model[:disk_model_end] = mem[:]
    assert disk.read_back() == disk.model
    for v in views:
        v.release()
    mem.close()


# ================================================================== 3. end of file
@pytest.mark.parametrize("size", [5000, 12 * KiB], ids=["unaligned-size", "aligned-size"])
@pytest.mark.parametrize("vectored", [False, True])
def test_read_across_end_of_file_zero_fills(disk_dir: Path, size: int, vectored: bool) -> None:
    d = Disk(disk_dir, size, seed=size)
    pool = BufferPool()
    try:
        async def body(engine: LinuxAioEngine) -> None:
            offset, length = 4 * KiB, 16 * KiB  # ends past the end of the file
            iov = (aligned_views(pool, [4 * KiB, 12 * KiB]) if vectored
                   else [pool.get(length).view])
            for v in iov:
                fill(v, 0xFF)
            await engine.preadv(d.dfd, iov, offset)
            got = b"".join(iov)
            inside = size - offset
            assert got[:inside] == d.model[offset:]
            assert got[inside:] == bytes(length - inside)
            # The kernel moved what the file has; a worker finished the short transfer.
            assert (engine.aio_submitted, engine.submitted) == (1, 1)

        with_engine(body)
        assert os.path.getsize(d.path) == size  # a read never grows the file
    finally:
        d.close()


@pytest.mark.parametrize("vectored", [False, True])
def test_read_entirely_past_end_of_file_is_zeros(disk: Disk, vectored: bool) -> None:
    pool = BufferPool()

    async def body(engine: LinuxAioEngine) -> None:
        iov = aligned_views(pool, [4 * KiB, 4 * KiB]) if vectored else [pool.get(8 * KiB).view]
        for offset in (len(disk.model), len(disk.model) + 64 * MiB):
            for v in iov:
                fill(v, 0xFF)
            await engine.preadv(disk.dfd, iov, offset)
            assert b"".join(iov) == bytes(8 * KiB)
        assert engine.aio_submitted == 2

    with_engine(body)
    assert os.path.getsize(disk.path) == len(disk.model)


# ------------------------------------------------------------------ the callback way
def test_started_operations_are_told_in_the_turn_that_reaps_them(disk: Disk) -> None:
    """start_preadv / start_pwritev submit at once and call ``done`` from the reaping
    itself (no future, no coroutine woken): a lone request, eight started in one turn
    (each submitted at once), a short read finished by a worker, a misaligned
    one the kernel refuses (told EINVAL); buffered descriptors are declined (False,
    nothing called)."""
    disk.need_512()
    pool = BufferPool()

    async def body(engine: LinuxAioEngine) -> None:
        told: dict[str, BaseException | None] = {}

        def tell(name: str) -> Callable[[BaseException | None], None]:
            return lambda error: told.__setitem__(name, error)

        async def until_told(*names: str) -> None:
            for _ in range(10000):
                if all(n in told for n in names):
                    return
                await asyncio.sleep(0)
            raise AssertionError(f"never told: {names}")

        buf = pool.get(4 * KiB).view
        assert engine.start_preadv(disk.dfd, [buf], 8 * KiB, tell("lone"))
        assert "lone" not in told  # never from the call itself
        await until_told("lone")
        assert told["lone"] is None and buf == disk.model[8 * KiB : 12 * KiB]
        views = aligned_views(pool, [4 * KiB] * 8)
        for i, v in enumerate(views):
            v[:] = random.Random(i).randbytes(4 * KiB)
            assert engine.start_pwritev(disk.dfd, [v], (64 + i) * 4 * KiB, tell(f"w{i}"),
                                        dsync=i % 2 == 1)
            disk.model[(64 + i) * 4 * KiB : (65 + i) * 4 * KiB] = v
        await until_told(*(f"w{i}" for i in range(8)))
        assert all(told[f"w{i}"] is None for i in range(8))
        assert engine.aio_submitted == 9 and engine.submitted == 0
        tail = pool.get(8 * KiB).view
        assert engine.start_preadv(disk.dfd, [tail], len(disk.model) - 4 * KiB, tell("eof"))
        await until_told("eof")
        assert told["eof"] is None and engine.submitted == 1  # finished by a worker
        assert bytes(tail) == bytes(disk.model[-4 * KiB :]) + bytes(4 * KiB)
        assert engine.start_preadv(disk.dfd, [buf[:1000]], 0, tell("bad"))
        await until_told("bad")
        err = told["bad"]
        assert isinstance(err, OSError) and err.errno == errno.EINVAL
        assert not engine.start_preadv(disk.bfd, [buf], 0, tell("buffered"))
        await asyncio.sleep(0)
        assert "buffered" not in told

    with_engine(body)
    assert disk.read_back() == disk.model


def test_requests_started_under_a_plug_go_in_one_io_submit(
        disk: Disk, monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside a plug each started request is its own io_submit; under one (re-entrant),
    all of them go in a single io_submit when the outermost plug ends, and each is told
    its own outcome; a request the kernel refuses within the batch (a misaligned buffer,
    EINVAL) fails alone."""
    disk.need_512()
    pool = BufferPool()
    counts: list[int] = []
    real_submit = aio_abi.io_submit

    def spy(ctx: int, count: int, pointers: int) -> int:
        counts.append(count)
        return real_submit(ctx, count, pointers)

    monkeypatch.setattr(aio_abi, "io_submit", spy)

    async def body(engine: LinuxAioEngine) -> None:
        told: dict[int, BaseException | None] = {}
        views = aligned_views(pool, [4 * KiB] * 8)
        for i, v in enumerate(views[:2]):
            assert engine.start_preadv(disk.dfd, [v], i * 4 * KiB,
                                       lambda e, i=i: told.__setitem__(i, e))
        assert counts == [1, 1]
        with engine.plug():
            with engine.plug():
                for i, v in enumerate(views[2:], start=2):
                    assert engine.start_preadv(disk.dfd, [v], i * 4 * KiB,
                                               lambda e, i=i: told.__setitem__(i, e))
            bad = pool.get(4 * KiB).view
            assert engine.start_preadv(disk.dfd, [bad[:1000]], 0,
                                       lambda e: told.__setitem__(99, e))
            assert counts == [1, 1]  # held until the outer plug ends
        assert counts[2] == 7 and sum(counts) >= 9
        for _ in range(10000):
            if len(told) == 9:
                break
            await asyncio.sleep(0)
        assert all(told[i] is None for i in range(8))
        err = told[99]
        assert isinstance(err, OSError) and err.errno == errno.EINVAL
        for i, v in enumerate(views):
            assert v == disk.model[i * 4 * KiB : (i + 1) * 4 * KiB]

    with_engine(body)


def test_the_thread_engine_declines_the_callback_way(disk: Disk) -> None:
    async def body(engine: ThreadEngine) -> None:
        buf = BufferPool().get(4 * KiB).view
        assert not engine.start_preadv(disk.dfd, [buf], 0, lambda error: None)
        assert not engine.start_pwritev(disk.dfd, [buf], 0, lambda error: None)

    conftest.with_engine(body)


# ================================================================== 4. errors
@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
@pytest.mark.parametrize("what", ["offset", "buffer", "length"])
def test_misaligned_direct_request_is_einval(disk: Disk, what: str, write: bool) -> None:
    pool = BufferPool()

    async def body(engine: LinuxAioEngine) -> None:
        buf = pool.get(3 * BLOCK).view
        fill(buf, 0x99)
        view, offset = {"offset": (buf[:BLOCK], 100),
                        "buffer": (buf[1 : BLOCK + 1], BLOCK),
                        "length": (buf[:1000], BLOCK)}[what]
        op = (engine.pwritev(disk.dfd, [view], offset) if write
              else engine.preadv(disk.dfd, [view], offset))
        with pytest.raises(OSError) as info:
            await op
        assert info.value.errno == errno.EINVAL
        # The engine keeps working, through the kernel.
        before = engine.aio_submitted
        good = pool.get(BLOCK).view
        await engine.preadv(disk.dfd, [good], 2 * BLOCK)
        assert good == disk.model[2 * BLOCK : 3 * BLOCK]
        good[:] = b"\x07" * BLOCK
        await engine.pwritev(disk.dfd, [good], 3 * BLOCK)
        disk.model[3 * BLOCK : 4 * BLOCK] = good
        assert engine.aio_submitted == before + 2

    with_engine(body)
    assert disk.read_back() == disk.model  # the refused write changed nothing


@pytest.mark.parametrize("write", [False, True], ids=["read", "write"])
@pytest.mark.parametrize("how", ["closed-after-use", "never-open"])
def test_bad_descriptor_is_ebadf(disk_dir: Path, how: str, write: bool) -> None:
    d = Disk(disk_dir, MiB)
    pool = BufferPool()
    try:
        async def body(engine: LinuxAioEngine) -> None:
            buf = pool.get(BLOCK).view
            fd = d.dfd
            if how == "closed-after-use":
                # The engine has learnt the descriptor is direct; then it is closed
                # behind its back, so io_submit itself meets the bad descriptor.
                await engine.preadv(fd, [buf], 0)
                os.close(fd)
                d.dfd = -1  # nothing left for d.close() to close
            else:
                fd = 1 << 20  # above any descriptor limit in use here
            before = engine.aio_submitted
            op = engine.pwritev(fd, [buf], 0) if write else engine.preadv(fd, [buf], 0)
            with pytest.raises(OSError) as info:
                await op
            assert info.value.errno == errno.EBADF
            assert engine.aio_submitted == before  # the kernel did not take it
            # Still working on a good descriptor.
            good = os.open(d.path, os.O_RDWR | os.O_DIRECT)
            try:
                await engine.preadv(good, [buf], BLOCK)
                assert buf == d.model[BLOCK : 2 * BLOCK]
            finally:
                engine.forget(good)
                os.close(good)
            assert engine.aio_submitted == before + 1

        with_engine(body)
        assert Path(d.path).read_bytes() == d.model
    finally:
        d.close()


@pytest.mark.parametrize("vectored", [False, True])
def test_read_only_buffer_write_falls_back_to_a_worker(disk: Disk, vectored: bool) -> None:
    """A read-only buffer has no writable address for the kernel: a worker writes it
    (page aligned here, so the direct descriptor accepts it from the worker too)."""
    pool = BufferPool()
    data = random.Random(11).randbytes(2 * BLOCK)

    async def body(engine: LinuxAioEngine) -> None:
        bufs = aligned_views(pool, [BLOCK, BLOCK])
        bufs[0][:] = data[:BLOCK]
        bufs[1][:] = data[BLOCK:]
        if vectored:
            iov = [bufs[0], bufs[1].toreadonly()]
        else:
            whole = pool.get(2 * BLOCK).view
            whole[:] = data
            iov = [whole.toreadonly()]
        await engine.pwritev(disk.dfd, iov, 6 * BLOCK)
        assert (engine.aio_submitted, engine.submitted) == (0, 1)

    with_engine(body)
    disk.model[6 * BLOCK : 8 * BLOCK] = data
    assert disk.read_back() == disk.model


def test_empty_request_completes_like_the_thread_engine(disk: Disk) -> None:
    async def body(engine: LinuxAioEngine) -> None:
        iov: list[memoryview] = []
        threads = ThreadEngine(2)
        try:
            await threads.preadv(disk.dfd, iov, 0)  # the reference behaviour: nothing
            await threads.pwritev(disk.dfd, iov, 0)
        finally:
            threads.close()
        await engine.preadv(disk.dfd, iov, 0)
        await engine.pwritev(disk.dfd, iov, 0)

    with_engine(body)
    assert disk.read_back() == disk.model


# ================================================================== 5. what is not submitted
def test_buffered_descriptor_is_not_submitted(disk: Disk) -> None:
    pool = BufferPool()
    os.fsync(disk.bfd)  # clean pages can be dropped: reads then need a worker
    os.posix_fadvise(disk.bfd, 0, 0, os.POSIX_FADV_DONTNEED)

    async def body(engine: LinuxAioEngine) -> None:
        buf = pool.get(64 * KiB).view
        await engine.preadv(disk.bfd, [buf], MiB)
        assert buf == disk.model[MiB : MiB + 64 * KiB]
        unaligned = bytearray(1000)  # fine on a buffered descriptor
        await engine.preadv(disk.bfd, [memoryview(unaligned)], 12345)
        assert unaligned == disk.model[12345 : 13345]
        buf[:] = b"\x5a" * len(buf)
        await engine.pwritev(disk.bfd, [buf], 2 * MiB, dsync=True)
        await engine.pwritev(disk.bfd, [memoryview(b"xyz")], 77)
        await engine.preadv(disk.bfd, [buf], 8 * MiB - 1000)  # across the end
        assert buf[:1000] == disk.model[-1000:] and buf[1000:] == bytes(len(buf) - 1000)
        assert engine.aio_submitted == 0
        # Reads the page cache held were done inline, the others and the writes by
        # workers: three reads, two writes.
        assert engine.submitted >= 2
        assert engine.submitted + engine.inline_reads == 5

    with_engine(body)
    disk.model[2 * MiB : 2 * MiB + 64 * KiB] = b"\x5a" * (64 * KiB)
    disk.model[77:80] = b"xyz"
    assert disk.read_back() == disk.model


def test_tmpfs_file_is_not_submitted_even_with_o_direct() -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no /dev/shm")
    folder = Path(tempfile.mkdtemp(prefix="blktap-linuxaio-", dir=shm))
    try:
        probe = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        memory = syscalls.in_memory(probe)
        os.close(probe)
        if not memory:
            pytest.skip("/dev/shm is not tmpfs here")
        d = Disk(folder, MiB)
    except OSError as exc:  # tmpfs refuses O_DIRECT before Linux 6.6
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"O_DIRECT on tmpfs: {exc.strerror}")
    pool = BufferPool()
    try:
        async def body(engine: LinuxAioEngine) -> None:
            buf = pool.get(8 * KiB).view
            await engine.preadv(d.dfd, [buf], 4 * KiB)
            assert buf == d.model[4 * KiB : 12 * KiB]
            buf[:] = b"\x33" * len(buf)
            await engine.pwritev(d.dfd, [buf], 64 * KiB)
            assert engine.aio_submitted == 0
            assert engine.inline_reads == 1 and engine.inline_writes == 1

        with_engine(body)
        d.model[64 * KiB : 72 * KiB] = b"\x33" * (8 * KiB)
        assert d.read_back() == d.model
    finally:
        d.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_requests_beyond_depth_go_to_workers(disk: Disk) -> None:
    """depth=4: four iocbs in the kernel at most; the other requests of the burst are
    done by workers, all correctly, and the slots come back for the next burst."""
    rng = random.Random(5)
    pool = BufferPool()
    blocks = rng.sample(range(len(disk.model) // BLOCK), 64)

    async def op(engine: LinuxAioEngine, block: int, write: bool) -> None:
        offset = block * BLOCK
        buf = pool.get(BLOCK).view
        if write:
            data = rng.randbytes(BLOCK)
            buf[:] = data
            disk.model[offset : offset + BLOCK] = data
            await engine.pwritev(disk.dfd, [buf], offset)
        else:
            expect = bytes(disk.model[offset : offset + BLOCK])
            await engine.preadv(disk.dfd, [buf], offset)
            assert buf == expect

    async def body(engine: LinuxAioEngine) -> None:
        await asyncio.gather(*(op(engine, b, i % 2 == 0) for i, b in enumerate(blocks)))
        assert 1 <= engine.aio_submitted <= 4
        assert engine.submitted == 64 - engine.aio_submitted
        before = engine.aio_submitted, engine.submitted
        await asyncio.gather(*(op(engine, b, False) for b in blocks[:4]))
        assert (engine.aio_submitted, engine.submitted) == (before[0] + 4, before[1])

    with_engine(body, depth=4)
    assert disk.read_back() == disk.model


# ================================================================== 6. close
def test_close_waits_for_operations_in_flight(disk: Disk) -> None:
    pool = BufferPool()
    data = random.Random(13).randbytes(MiB)

    async def main() -> None:
        engine = LinuxAioEngine()
        reads = [pool.get(MiB).view for _ in range(4)]
        for v in reads:
            fill(v, 0xFF)
        tail = pool.get(16 * KiB).view
        fill(tail, 0xFF)
        src = pool.get(MiB).view
        src[:] = data
        tasks = [asyncio.ensure_future(engine.pwritev(disk.dfd, [src], i * MiB, dsync=True))
                 for i in range(4)]
        tasks += [asyncio.ensure_future(engine.preadv(disk.dfd, [v], (4 + i) * MiB))
                  for i, v in enumerate(reads)]
        # A read across the end of the file: its short transfer goes to a worker.
        tasks.append(asyncio.ensure_future(
            engine.preadv(disk.dfd, [tail], len(disk.model) - 4 * KiB)))
        await asyncio.sleep(0)  # every request has been queued (one submitted at once)
        assert not any(t.done() for t in tasks)
        engine.close()
        # Without a turn of the loop, everything has happened already.
        for i in range(4):
            assert disk.read_back(i * MiB, MiB) == data
        for i, v in enumerate(reads):
            assert v == disk.model[(4 + i) * MiB : (5 + i) * MiB]
        assert tail[:4 * KiB] == disk.model[-4 * KiB:] and tail[4 * KiB:] == bytes(12 * KiB)
        await asyncio.gather(*tasks)  # and every caller gets its result
        assert engine.aio_submitted == 9 and engine.submitted == 1
        engine.close()  # idempotent
        buf = pool.get(BLOCK).view
        for late in (engine.preadv(disk.dfd, [buf], 0), engine.pwritev(disk.dfd, [buf], 0),
                     engine.fsync(disk.dfd), engine.call(os.getpid)):
            with pytest.raises(RuntimeError, match="closed"):
                await late
        assert engine.aio_submitted == 9

    asyncio.run(main())


def test_close_survives_a_signal_while_waiting(disk: Disk,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal arriving while close() waits (a second Ctrl-C while serve shuts down):
    io_getevents fails once with EINTR, as the kernel makes it whatever SA_RESTART says
    (signal(7)), and the wait must be resumed (PEP 475), not raised."""
    real = aio_abi._syscall
    getevents_nr = aio_abi._NR["io_getevents"]  # type: ignore[index]
    interrupted = []

    def syscall(nr: ctypes.c_long, *args: object) -> int:
        blocking = isinstance(args[-1], ctypes.c_void_p) and args[-1].value is None
        if nr.value == getevents_nr and blocking and not interrupted:
            interrupted.append(True)
            ctypes.set_errno(errno.EINTR)
            return -1
        return real(nr, *args)

    pool = BufferPool()

    async def main() -> None:
        engine = LinuxAioEngine()
        monkeypatch.setattr(aio_abi, "_syscall", syscall)
        src = pool.get(MiB).view
        src[:] = b"\x6c" * MiB
        task = asyncio.ensure_future(engine.pwritev(disk.dfd, [src], 0, dsync=True))
        await asyncio.sleep(0)
        try:
            engine.close()
        finally:
            monkeypatch.setattr(aio_abi, "_syscall", real)
            if not engine._closed:  # leave nothing behind for the next tests
                engine.close()
        await task
        assert interrupted, "the fake EINTR never happened"
        assert disk.read_back(0, MiB) == b"\x6c" * MiB

    asyncio.run(main())


# ================================================================== 7. best_engine
def test_best_engine_is_linux_aio_here() -> None:
    async def main() -> None:
        engine = best_engine(2)
        try:
            assert type(engine) is LinuxAioEngine
            assert engine.name == "linux-aio"
        finally:
            engine.close()
    asyncio.run(main())


def test_best_engine_falls_back_to_threads_when_io_setup_fails(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(depth: int) -> int:
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    monkeypatch.setattr(aio_abi, "io_setup", refuse)

    async def main() -> None:
        with pytest.raises(OSError) as info:
            LinuxAioEngine(2)
        assert info.value.errno == errno.EAGAIN
        engine = best_engine(2)
        try:
            assert type(engine) is ThreadEngine
            assert engine.name == "threads"
            await engine.call(os.getpid)  # and it works
        finally:
            engine.close()
    asyncio.run(main())


# ================================================================== 8. blktap serve
def _strace() -> str | None:
    return shutil.which("strace")


@contextmanager
def serve_process(spec: str, workdir: Path, *args: str,
                  strace: list[str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """``blktap serve SPEC --socket ... ARGS``, optionally under ``strace``; yields the
    URI it printed and the process (strace's, when traced). Stops it with SIGTERM sent
    to blktap itself."""
    sock = workdir / "nbd.sock"
    argv = [tool("blktap"), "serve", spec, "--socket", str(sock), *args]
    if strace is not None:
        argv = strace + argv
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        if not uri:
            proc.wait(timeout=30)
            raise AssertionError(f"serve did not start: {proc.stderr.read()}")  # type: ignore
        yield uri, proc
    finally:
        if proc.poll() is None:
            target = proc.pid
            if strace is not None:  # strace passes no SIGTERM on: signal its child
                children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
                kids = children.read_text().split() if children.exists() else []
                target = int(kids[0]) if kids else proc.pid
            os.kill(target, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise


def _count_calls(trace: Path, name: str) -> int:
    # strace -f may split a call over two lines; the first one always has "name(".
    return sum(1 for line in trace.read_text().splitlines() if f"{name}(" in line)


def _qemu_io(uri: str, *commands: str) -> str:
    argv = [need("qemu-io"), "-f", "raw", uri]
    for c in commands:
        argv += ["-c", c]
    done = run(argv, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "fail" not in out.lower() and "error" not in out.lower(), out
    return out


@pytest.mark.interop
@pytest.mark.parametrize("engine", ["linux-aio", "threads"])
def test_serve_raw_file_with_io_engine(disk_dir: Path, engine: str) -> None:
    need("qemu-io")
    qemu_img = need("qemu-img")
    path = disk_dir / "served.img"
    model = bytearray(random.Random(21).randbytes(8 * MiB))
    path.write_bytes(model)
    trace = disk_dir / "strace.txt"
    strace = _strace()
    prefix = ([strace, "-f", "-qq", "-o", str(trace), "-e", "trace=io_setup,io_submit"]
              if strace else None)
    with serve_process(f"aio:{path}", disk_dir, "--io-engine", engine, "--threads", "4",
                       strace=prefix) as (uri, proc):
        _qemu_io(uri,
                 "write -P 0xab 0 1M",          # 1 MiB, aligned: the direct descriptor
                 "write -f -P 0xcd 1M 64k",     # FUA: RWF_DSYNC
                 "write -P 0x5a 3M 4k",
                 "write -P 0x11 4097 1000",     # unaligned: the buffered descriptor
                 "read -P 0xab 0 4k",
                 "read -P 0x11 4097 1000",
                 "read -P 0xab 8192 1040384",
                 "read -P 0xcd 1M 64k",
                 "read -P 0x5a 3M 4k")
        # The whole export, read through the server, against the file itself.
        same = run([qemu_img, "compare", "-f", "raw", "-F", "raw", uri, str(path)],
                   text=True, timeout=120)
        assert same.returncode == 0, same.stdout + same.stderr
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    for offset, length, byte in ((0, MiB, 0xAB), (MiB, 64 * KiB, 0xCD),
                                 (3 * MiB, 4 * KiB, 0x5A), (4097, 1000, 0x11)):
        model[offset : offset + length] = bytes([byte]) * length
    assert path.read_bytes() == model
    if strace:
        submits = _count_calls(trace, "io_submit")
        if engine == "linux-aio":
            assert _count_calls(trace, "io_setup") == 1
            assert submits > 0  # direct requests went to the kernel's AIO
        else:
            assert _count_calls(trace, "io_setup") == 0 and submits == 0


def test_serve_bogus_io_engine_is_a_usage_error(disk_dir: Path) -> None:
    """A usage error, reported as every blktap usage error is (docs/cli.md): one line on
    stderr naming the bad value, exit code 22 (EINVAL); nothing is served."""
    path = disk_dir / "d.img"
    path.write_bytes(b"\x01" * MiB)
    done = run([tool("blktap"), "serve", f"aio:{path}", "--socket", str(disk_dir / "s"),
                "--io-engine", "bogus"], text=True, timeout=60)
    assert done.returncode == errno.EINVAL
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "--io-engine" in lines[0] and "bogus" in lines[0]
    assert not (disk_dir / "s").exists()
    assert path.read_bytes() == b"\x01" * MiB


def _strace_can_inject() -> str:
    strace = _strace()
    if strace is None:
        pytest.skip("strace not installed")
    probe = run([strace, "-f", "-qq", "-o", "/dev/null", "-e", "trace=getppid",
                 "-e", "inject=getppid:error=EAGAIN", "true"], text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here: {probe.stderr.strip()}")
    return strace


def test_serve_linux_aio_without_kernel_aio(disk_dir: Path) -> None:
    """io_setup failing (strace injects EAGAIN, what a full aio-max-nr gives):
    ``--io-engine linux-aio`` is refused in one line; ``auto`` serves with threads."""
    strace = _strace_can_inject()
    path = disk_dir / "d.img"
    path.write_bytes(b"\x02" * MiB)
    inject = [strace, "-f", "-qq", "-o", str(disk_dir / "trace.txt"),
              "-e", "trace=io_setup,io_submit", "-e", "inject=io_setup:error=EAGAIN"]
    done = run(inject + [tool("blktap"), "serve", f"aio:{path}", "--socket",
                         str(disk_dir / "s"), "--io-engine", "linux-aio"],
               text=True, timeout=60)
    assert done.returncode == errno.EINVAL, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "--io-engine linux-aio" in lines[0], done.stderr
    assert os.strerror(errno.EAGAIN) in lines[0]
    assert path.read_bytes() == b"\x02" * MiB

    if shutil.which("qemu-io") is None:
        return
    with serve_process(f"aio:{path}", disk_dir, "--io-engine", "auto",
                       strace=inject) as (uri, proc):
        _qemu_io(uri, "read -P 0x02 0 64k", "write -P 0x03 0 64k", "read -P 0x03 0 64k")
    assert proc.returncode == 0
    assert path.read_bytes() == b"\x03" * (64 * KiB) + b"\x02" * (MiB - 64 * KiB)
    assert _count_calls(disk_dir / "trace.txt", "io_submit") == 0

