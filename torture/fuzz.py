"""Coverage-guided fuzzing (atheris, libFuzzer) of every parser a stranger can reach.

    python torture/fuzz.py TARGET [libFuzzer flags...]     # one target, in this process
    python torture/fuzz.py --list

Targets (each takes the fuzzer's bytes as what a stranger would send or write):

- ``control``: one tapdisk control message (``tap-ctl``'s socket): ``message.decode``.
- ``nbd``: a whole NBD client stream (handshake, options, then requests) played into an
  in-process server over a socketpair, against a 1 MiB disk in memory.
- ``nbd-inline``: the same stream against a 1 MiB raw file in memory, so that reads and
  writes go through the NBD transport's compiled inline path (its request parser and
  the hand-over to the Python path) where it is built.
- ``nbd-inline-qcow2``: the same stream against a 1 MiB qcow2 image in memory (4 KiB
  clusters of every kind: data, zero, unallocated), through the compiled path's L2
  lookups, while the stream's own writes, trims and zeroes change the tables under it.
- ``vhd``: a VHD file (footer, header, BAT, bitmaps, batmap, locators): opened, mapped,
  read and checked by the library, as ``blktap info`` / ``vhd-util check`` would.
- ``virtqueue``: what a KVM guest writes into its shared memory for a vhost-user-blk disk:
  a split ring's descriptor table, avail ring and the requests' headers and data,
  processed by our virtqueue and virtio-blk code against a 1 MiB disk in memory.
- ``blkif``: what a Xen guest writes for its blkfront disk: the shared ring page (indices,
  requests of every op, indirect descriptors) and eight granted pages (data, indirect
  segment lists), served by our blkif ring code against a 1 MiB disk in memory, with a
  stand-in for the grant device that fails copies of unknown grant references as Xen does.
- ``qcow2``: a qcow2 file (header, extensions, L1/L2 tables, refcounts, snapshots):
  opened, mapped, read and checked by the library, as ``blktap info/check`` would.

A target fails when anything escapes other than the project's own errors
(:class:`blktap.errors.BlktapError`) or the protocol's orderly refusals, when the server
logs a bug (``log.exception``), or when one input takes longer than libFuzzer's
``-timeout``. Seeds are built here from valid inputs, so mutation starts from something
that reaches deep.
"""

from __future__ import annotations

import asyncio
import atexit
import errno
import fcntl
import logging
import os
import shutil
import socket
import struct
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["blktap"]):
    from blktap.control import message
    from blktap.errors import BlktapError
    from blktap.image.fileio import STAGE_PREFIX, remove_stale_stages
    from blktap.image.qcow2 import check as qcow2_check
    from blktap.image.qcow2.create import create as create_qcow2
    from blktap.image.qcow2.image import Qcow2Image
    from blktap.image.vhd import check as vhd_check
    from blktap.image.vhd.create import create as create_vhd
    from blktap.image.vhd.create import snapshot as snapshot_vhd
    from blktap.image.vhd.image import VhdImage
    from blktap.io import ThreadEngine
    from blktap.tapdisk.driver import Caps, Driver
    from blktap.tapdisk.drivers.aio import AioDriver
    from blktap.tapdisk.vbd import VBD
    from blktap.transport.nbd import Export, NbdServer
    from blktap.transport.nbd.handshake import Dropped
    from blktap.transport.vhost_user.blk import BlkDevice, BlkOptions
    from blktap.transport.vhost_user.memory import GuestMemory
    from blktap.transport.vhost_user.virtqueue import Virtqueue
    from blktap.transport.xen.blkif import BlkifRing
    from blktap.transport.xen.structs import abi_for

from xen_guest import PageMapping  # noqa: E402  (the guest's pages, mapped)

MiB = 1 << 20


class Bug(Exception):
    """Something the code under test must never do."""


# ----------------------------------------------------------------------------- control
def control_target(data: bytes) -> None:
    try:
        msg = message.decode(data)
    except BlktapError:
        return
    # What decodes must encode again to the same meaning.
    again = message.decode(message.encode(msg))
    if again != msg:
        raise Bug(f"decode(encode(m)) != m: {msg!r} vs {again!r}")


def control_seeds() -> list[bytes]:
    M, T = message.Message, message.MessageType
    seeds = [M(T.PID, 0, None), M(T.LIST, 0xFFFF, None), M(T.ATTACH, 3, None),
             M(T.OPEN, 1, message.Params(path="vhd:/x.vhd", req_timeout=120)),
             M(T.STATS, 0xFFFF, None)]
    out = []
    for msg in seeds:
        try:
            out.append(message.encode(msg))
        except (BlktapError, TypeError):
            continue
    return out


# ----------------------------------------------------------------------------- nbd
class Memory(Driver):
    """A 1 MiB disk in memory with every capability the server can advertise."""

    name = "fuzzmem"

    def __init__(self, engine: ThreadEngine) -> None:
        super().__init__(engine, MiB, writable=True)
        self.mem = bytearray(MiB)
        self.caps = Caps.WRITE | Caps.FLUSH | Caps.FUA | Caps.TRIM | Caps.ZERO | Caps.CACHE

    async def read(self, offset: int, iov) -> None:  # noqa: ANN001
        for v in iov:
            v[:] = self.mem[offset:offset + len(v)]
            offset += len(v)

    async def write(self, offset: int, iov, fua: bool = False) -> None:  # noqa: ANN001
        for v in iov:
            self.mem[offset:offset + len(v)] = v
            offset += len(v)

    async def flush(self) -> None:
        pass

    async def discard(self, offset: int, length: int) -> None:
        self.mem[offset:offset + length] = bytes(length)

    async def write_zeroes(self, offset: int, length: int, *, may_trim: bool = True,
                           fast: bool = False, fua: bool = False) -> None:
        self.mem[offset:offset + length] = bytes(length)


class _BugLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class NbdHarness:
    STEP_LIMIT = 10.0  # seconds one input may take before it counts as a hang

    def __init__(self, disk: Callable[[ThreadEngine], Driver] | None = None) -> None:
        self._disk = disk or Memory
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.vbd, self.server = self.loop.run_until_complete(self._setup())
        self.bugs = _BugLog()
        for name in ("blktap.nbd", "blktap.tapdisk", "asyncio"):
            logging.getLogger(name).addHandler(self.bugs)
            logging.getLogger(name).propagate = False

    async def _setup(self) -> tuple[VBD, NbdServer]:
        self.engine = ThreadEngine(2)
        vbd = VBD(self._disk(self.engine), name="fuzz")
        return vbd, NbdServer(Export("", vbd, description="fuzz"), handshake_timeout=5.0)

    def play(self, data: bytes) -> None:
        self.loop.run_until_complete(asyncio.wait_for(self._play(data), self.STEP_LIMIT))
        if self.bugs.records:
            rec = self.bugs.records[0]
            self.bugs.records.clear()
            raise Bug(f"server logged: {rec.getMessage()} {rec.exc_text or ''}")

    async def _play(self, data: bytes) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs.setblocking(False)
        try:
            # As any client: the handshake from the readiness callback, then a task.
            self.server.adopt(ours)
            await self.loop.sock_sendall(theirs, data)
            theirs.shutdown(socket.SHUT_WR)
            while True:  # read the replies, so the server never blocks on a full socket
                chunk = await self.loop.sock_recv(theirs, 1 << 20)
                if not chunk:
                    break
            while self.server.connections:  # (its task ends a turn after the close)
                await asyncio.sleep(0)
        finally:
            theirs.close()


def nbd_stream_target(disk: Callable[[ThreadEngine], Driver] | None = None
                      ) -> Callable[[bytes], None]:
    """A target that plays each input into one in-process server of ``disk`` (a disk in
    memory by default), made at the first input."""
    harness: list[NbdHarness] = []

    def target(data: bytes) -> None:
        if not harness:
            harness.append(NbdHarness(disk))
        try:
            harness[0].play(data)
        except (Dropped, ConnectionError):
            return
    return target


def _raw_in_memory(engine: ThreadEngine) -> Driver:
    path = os.path.join(_work, "fuzz.raw")
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * (MiB // 256))
    return AioDriver.open(engine, path, writable=True, direct=False)


def _qcow2_in_memory(engine: ThreadEngine) -> Driver:
    """A 1 MiB qcow2 image of 4 KiB clusters (requests span several) with every kind of
    cluster: data, zero (v3), unallocated; written, zeroed and discarded by the library
    as a guest would."""
    from blktap.image.qcow2.create import create as create_qcow2
    from blktap.image.qcow2.image import Qcow2Image
    from blktap.tapdisk.drivers import open_stack
    path = os.path.join(_work, "fuzz.qcow2")
    if os.path.exists(path):
        os.unlink(path)
    create_qcow2(path, MiB, cluster_size=4096)
    img = Qcow2Image.open(path, writable=True)
    try:
        img.write(0, bytes(range(256)) * (MiB // 2 // 256))
        img.write_zeroes(256, 64)
        img.discard(512, 64)
        img.write(1024, b"z" * 65536)
    finally:
        img.close()
    return open_stack(engine, f"qcow2:{path}", writable=True, direct=False)


nbd_target = nbd_stream_target()
nbd_inline_target = nbd_stream_target(_raw_in_memory)
nbd_inline_qcow2_target = nbd_stream_target(_qcow2_in_memory)


def _nbd_request(cmd: int, offset: int = 0, length: int = 0, flags: int = 0,
                 handle: int = 1) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, flags, cmd, handle, offset, length)


def nbd_seeds() -> list[bytes]:
    opt = lambda o, d=b"": struct.pack(">QII", 0x49484156454F5054, o, len(d)) + d  # noqa: E731
    go = opt(7, struct.pack(">I", 0) + struct.pack(">HH", 1, 3))
    structured = opt(8)
    meta = opt(10, struct.pack(">I", 0) + struct.pack(">II", 1, 15) + b"base:allocation")
    hello = struct.pack(">I", 3)
    reqs = (_nbd_request(0, 0, 4096) + _nbd_request(1, 4096, 512) + b"w" * 512
            + _nbd_request(3) + _nbd_request(4, 0, 8192) + _nbd_request(6, 0, 65536)
            + _nbd_request(7, 0, MiB, flags=8) + _nbd_request(5, 0, 4096) + _nbd_request(2))
    return [hello + go + reqs, hello + structured + meta + go + reqs,
            hello + opt(3) + opt(6, struct.pack(">I", 0) + struct.pack(">H", 0)) + opt(2),
            hello + opt(1, b"") + reqs]


# ----------------------------------------------------------------------------- files
def _work_dir() -> str:
    """This process's folder for the targets' image files (and a corpus made up here).
    libFuzzer ends the process from C, where nothing of Python's exit runs, so the folder
    is named and flock'd as the library's staging folders are (``.blktap-<pid>-...``):
    the next run's sweep (:func:`remove_stale_stages`) removes those of dead processes."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    dirfd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        remove_stale_stages(dirfd)
    finally:
        os.close(dirfd)
    path = tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-fuzz-", dir=base)
    lock = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fcntl.flock(lock, fcntl.LOCK_EX)  # held (the descriptor stays open) while we live
    atexit.register(shutil.rmtree, path, True)  # a Python exit (an import by the tests)
    return path


_work = _work_dir()

# ----------------------------------------------------------------------------- vhd
_vhd_path = os.path.join(_work, "fuzz.vhd")


def vhd_target(data: bytes) -> None:
    with open(_vhd_path, "wb") as f:
        f.write(data)
    try:
        image = VhdImage.open(_vhd_path)
    except BlktapError:
        image = None
    if image is not None:
        try:
            for run in image.extents(0, min(image.sectors, 1 << 16)):
                del run
            if image.is_differencing:
                image.parent_locator_names()
        except BlktapError:
            pass
        finally:
            image.close()
    try:
        vhd_check.check_image(_vhd_path)
    except BlktapError:
        pass


def vhd_seeds() -> list[bytes]:
    out = []
    with tempfile.TemporaryDirectory() as d:
        base = os.path.join(d, "base.vhd")
        create_vhd(base, 8 * MiB)
        out.append(Path(base).read_bytes())
        child = os.path.join(d, "child.vhd")
        snapshot_vhd(child, base)
        out.append(Path(child).read_bytes()[:16384])
        fixed = os.path.join(d, "fixed.vhd")
        create_vhd(fixed, 64 * 1024, fixed=True)
        out.append(Path(fixed).read_bytes()[-1024:])
    return out


# ----------------------------------------------------------------------------- virtqueue
class VirtqueueHarness:
    """Guest RAM (a memfd of 256 KiB at guest-physical 0, front-end address 1 GiB), one
    split ring of 16 entries at its start, a virtio-blk device over a memory disk. Each
    input is written over the first pages (rings, headers, data), then the ring runs."""

    RAM = 256 << 10
    UVA = 1 << 30
    QUEUE = 16
    DESC, AVAIL, USED = 0, 16 * 16, 1024  # ring offsets in guest RAM

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.bugs = _BugLog()
        for name in ("blktap.vhost", "blktap.vhost_user", "blktap.tapdisk", "asyncio"):
            logging.getLogger(name).addHandler(self.bugs)
            logging.getLogger(name).propagate = False
        self.loop.run_until_complete(self._setup())

    async def _setup(self) -> None:
        self.engine = ThreadEngine(2)
        self.vbd = VBD(Memory(self.engine), name="fuzz")
        self.device = BlkDevice(self.vbd, BlkOptions(serial="fuzz"))
        self.fd = os.memfd_create("fuzz-guest-ram")
        os.ftruncate(self.fd, self.RAM)
        self.memory = GuestMemory()
        self.memory.add(os.dup(self.fd), 0, self.RAM, self.UVA, 0)
        import mmap
        self.ram = mmap.mmap(self.fd, self.RAM)
        self.broken: list[BaseException] = []

    def _queue(self) -> Virtqueue:
        vq = Virtqueue(0, self.memory, self.device.handle, self.broken.append, name="fuzzvq",
                       batch=self.vbd.batch)
        vq.indirect = True
        vq.set_num(self.QUEUE)
        vq.set_addr(self.UVA + self.DESC, self.UVA + self.AVAIL, self.UVA + self.USED)
        vq.set_call(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        vq.set_enabled(True)
        vq.set_kick(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        return vq

    def play(self, data: bytes) -> None:
        self.ram[: len(data)] = data
        self.ram[len(data): 16384] = bytes(16384 - len(data)) if len(data) < 16384 else b""
        self.loop.run_until_complete(asyncio.wait_for(self._play(), 10.0))
        self.broken.clear()
        # A broken ring logs an error by design: that is the orderly refusal. Anything
        # logged with a traceback (log.exception) is a bug.
        bugs = [r for r in self.bugs.records if r.exc_info]
        self.bugs.records.clear()
        if bugs:
            raise Bug(f"logged: {bugs[0].getMessage()} {bugs[0].exc_text or ''}")

    async def _play(self) -> None:
        vq = self._queue()
        try:
            vq.process()
            await asyncio.sleep(0)
            await vq.drain()
            vq.flush()
        finally:
            vq.close()


_vq: VirtqueueHarness | None = None


def virtqueue_target(data: bytes) -> None:
    global _vq
    if _vq is None:
        _vq = VirtqueueHarness()
    _vq.play(data)


def virtqueue_seeds() -> list[bytes]:
    """Rings holding valid requests: a read, a write, a flush, a GET_ID, an indirect read."""
    h = VirtqueueHarness
    ram = bytearray(8192)
    desc = lambda i, addr, n, flags, nxt: struct.pack_into(  # noqa: E731
        "<QIHH", ram, h.DESC + 16 * i, addr, n, flags, nxt)
    heads = []
    hdr, data, st = 4096, 4096 + 512, 4096 + 1024 + 512
    struct.pack_into("<IIQ", ram, hdr, 0, 0, 8)  # IN at sector 8
    desc(0, hdr, 16, 1, 1)
    desc(1, data, 512, 1 | 2, 2)
    desc(2, st, 1, 2, 0)
    heads.append(0)
    struct.pack_into("<IIQ", ram, hdr + 16, 1, 0, 16)  # OUT at sector 16
    desc(3, hdr + 16, 16, 1, 4)
    desc(4, data, 512, 1, 5)
    desc(5, st + 1, 1, 2, 0)
    heads.append(3)
    struct.pack_into("<IIQ", ram, hdr + 32, 4, 0, 0)  # FLUSH
    desc(6, hdr + 32, 16, 1, 7)
    desc(7, st + 2, 1, 2, 0)
    heads.append(6)
    struct.pack_into("<IIQ", ram, hdr + 48, 8, 0, 0)  # GET_ID
    desc(8, hdr + 48, 16, 1, 9)
    desc(9, data + 512, 20, 1 | 2, 10)
    desc(10, st + 3, 1, 2, 0)
    heads.append(8)
    table = 6144  # indirect: header, data, status
    struct.pack_into("<QIHH", ram, table, hdr, 16, 1, 1)
    struct.pack_into("<QIHH", ram, table + 16, data, 512, 1 | 2, 2)
    struct.pack_into("<QIHH", ram, table + 32, st + 4, 1, 2, 0)
    desc(11, table, 48, 4, 0)
    heads.append(11)
    struct.pack_into("<HH", ram, h.AVAIL, 0, len(heads))
    for i, head in enumerate(heads):
        struct.pack_into("<H", ram, h.AVAIL + 4 + 2 * i, head)
    return [bytes(ram), bytes(ram[:4096 + 64]) + bytes(ram[4096 + 64:])]


# ----------------------------------------------------------------------------- qcow2
_qcow2_path = os.path.join(_work, "fuzz.qcow2")


# The status walk stops after this many sectors: a mutated header may claim any size, and
# mapping millions of 512-byte clusters one by one is time, not coverage.
QCOW2_STATUS_SECTORS = 1 << 11  # 1 MiB: the largest seed


def qcow2_target(data: bytes) -> None:
    with open(_qcow2_path, "wb") as f:
        f.write(data)
    try:
        image = Qcow2Image.open(_qcow2_path)
    except BlktapError:
        image = None
    if image is not None:
        try:
            sectors = min(image.sectors, QCOW2_STATUS_SECTORS)
            for run in image.status(0, sectors):
                del run
            image.read(0, min(sectors, 256))
            image.backing_path()
        except BlktapError:
            pass
        finally:
            image.close()
    try:
        qcow2_check.check(_qcow2_path)
    except BlktapError:
        pass


def qcow2_seeds() -> list[bytes]:
    """Small images (the check walks whole tables and refcount blocks, one cluster each:
    small clusters keep an execution short, and the image within libFuzzer's -max_len):
    512-byte, 1 KiB (version 2) and 4 KiB clusters, lazy refcounts, 16 KiB clusters with
    extended L2 entries (the smallest qemu allows) written in part, and a layer over a
    backing file."""
    out = []
    with tempfile.TemporaryDirectory() as d:
        for i, (size, kw) in enumerate((
                (256 << 10, {"cluster_size": 512}),
                (256 << 10, {"cluster_size": 1024, "compat": "0.10"}),
                (MiB, {"cluster_size": 4096}),
                (MiB, {"cluster_size": 4096, "lazy_refcounts": True}),
                (MiB, {"cluster_size": 16384, "extended_l2": True}),
                (MiB, {"cluster_size": 4096, "backing_file": "base.qcow2",
                       "backing_fmt": "qcow2"}))):
            path = os.path.join(d, f"seed{i}.qcow2")
            create_qcow2(path, size, **kw)
            if "backing_file" not in kw:  # (writing into a layer reads what is below)
                with Qcow2Image.open(path, writable=True) as image:
                    image.write(8, b"\x5a" * 4096)
                    image.write(100, b"\xa5" * 1024)
            out.append(Path(path).read_bytes())
    return out


# ----------------------------------------------------------------------------- blkif
class BlkifHarness:
    """One order-0 ring (x86_64 ABI) in ordinary memory and eight granted guest pages
    (grant references 8..15), a blkif ring over a memory disk. Each input is the ring page
    then the granted pages; the ring is connected, kicked, drained and disconnected. The
    last byte of the ring header's padding (63), which the backend never reads, chooses
    persistent grants (odd: the guest's pages are mapped, not copied)."""

    PAGE = 4096
    GREFS = range(8, 16)
    DOMID = 5

    class _Mapping:
        def __init__(self, mem: bytearray) -> None:
            self.view = memoryview(mem)

        def close(self) -> None:
            self.view.release()

    class _Grants:
        def __init__(self, harness: BlkifHarness) -> None:
            self.h = harness

        def map(self, domid: int, grefs) -> BlkifHarness._Mapping:  # noqa: ANN001
            return BlkifHarness._Mapping(self.h.ring)

        def map_pages(self, domid: int, grefs) -> PageMapping:  # noqa: ANN001
            if any(ref not in self.h.pages for ref in grefs):
                raise OSError(errno.EINVAL, "bad grant reference")  # as gntdev's mmap
            return PageMapping([self.h.pages[ref] for ref in grefs])

        def copy(self, domid: int, spans, local, offset: int,  # noqa: ANN001
                 to_guest: bool) -> list[int]:
            out = []
            for ref, off, n in spans:
                page = self.h.pages.get(ref)
                if page is None or off + n > BlkifHarness.PAGE:
                    out.append(-4)  # GNTST_bad_gntref / a span Xen would refuse
                    continue
                if to_guest:
                    page[off:off + n] = local.view[offset:offset + n]
                else:
                    local.view[offset:offset + n] = page[off:off + n]
                out.append(0)
                offset += n
            return out

        def close(self) -> None:
            pass

    class _Notifier:
        def __init__(self) -> None:
            self.r, self.w = os.pipe()
            os.set_blocking(self.r, False)

        def fileno(self) -> int:
            return self.r

        def clear(self) -> None:
            try:
                os.read(self.r, 64)
            except BlockingIOError:
                pass

        def notify(self) -> None:
            pass

        def close(self) -> None:
            os.close(self.r)
            os.close(self.w)

        def doorbell(self) -> tuple[int, int] | None:
            return None  # (a pipe: the ring clears and notifies through us)

    def __init__(self, disk: Callable[[ThreadEngine], Driver] | None = None) -> None:
        self.disk = disk
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.bugs = _BugLog()
        for name in ("blktap.tapdisk", "asyncio"):
            logging.getLogger(name).addHandler(self.bugs)
            logging.getLogger(name).propagate = False
            # Nearly every input earns a warning (a bad request): only errors are looked
            # at, so warnings are not even made into records (most of an input's cost).
            logging.getLogger(name).setLevel(logging.ERROR)
        self.loop.run_until_complete(self._setup())
        self.ring = bytearray(self.PAGE)
        self.pages: dict[int, bytearray] = {}

    async def _setup(self) -> None:
        self.engine = ThreadEngine(2)
        self.vbd = VBD(self.disk(self.engine) if self.disk else Memory(self.engine),
                       name="fuzz")

    def play(self, data: bytes) -> None:
        self.ring[:] = data[:self.PAGE].ljust(self.PAGE, b"\0")
        self.pages = {g: bytearray(data[self.PAGE * (i + 1):self.PAGE * (i + 2)]
                                   .ljust(self.PAGE, b"\0"))
                      for i, g in enumerate(self.GREFS)}
        self.loop.run_until_complete(asyncio.wait_for(self._play(), 10.0))
        bugs = [r for r in self.bugs.records if r.exc_info]
        self.bugs.records.clear()
        if bugs:
            raise Bug(f"logged: {bugs[0].getMessage()} {bugs[0].exc_text or ''}")

    async def _play(self) -> None:
        if self.disk is not None and self.vbd.inline_target() is None:
            # A discard punched a hole in the file (no inline target any more): a fresh
            # file, so that the compiled pass keeps serving what it can.
            await self.vbd.close()
            self.vbd = VBD(self.disk(self.engine), name="fuzz")
        notifier = self._Notifier()
        ring = BlkifRing(self.vbd, self._Grants(self), notifier, self._Mapping(self.ring),
                         abi_for(3), 0, domid=self.DOMID, devid=51712, name="fuzzring",
                         persistent=bool(self.ring[63] & 1))
        ring.start()
        os.write(notifier.w, b"!")
        # Until what was consumed is answered (a barrier holds the rest back meanwhile),
        # then disconnect as tapback would. The disk is in memory and never waits: a few
        # turns of the loop finish any request, so yield without sleeping (a sleep per
        # input was most of its cost); real time passes only if that is not enough.
        for turn in range(2000):
            await asyncio.sleep(0.001 if turn >= 1000 and ring._inflight else 0)
            if ring.dead or not (ring._inflight or ring._backlog):
                break  # (a dead ring consumes nothing more: stop() waits for the rest)
        await ring.stop()


def blkif_ring_target(disk: Callable[[ThreadEngine], Driver] | None = None
                      ) -> Callable[[bytes], None]:
    """A target playing each input on a ring over ``disk`` (None: a disk in memory the
    compiled pass cannot serve; a file in memory: the pass serves what it takes, once a
    request has mapped the pages with persistent grants), made on the first input."""
    harness: list[BlkifHarness] = []

    def target(data: bytes) -> None:
        if not harness:
            harness.append(BlkifHarness(disk))
        harness[0].play(data)
    return target


blkif_target = blkif_ring_target()
blkif_inline_target = blkif_ring_target(_raw_in_memory)


def blkif_seeds() -> list[bytes]:
    """A ring holding a read, a write, a flush, a barrier, a discard and an indirect write
    whose segment list is in granted page 8."""
    page = BlkifHarness.PAGE
    ring = bytearray(page)
    rw = struct.Struct("<BBHxxxxQQ")  # op, nr_segments, handle, id, sector
    seg = struct.Struct("<IBBxx")  # gref, first_sect, last_sect
    slot = lambda i: 64 + 112 * i  # noqa: E731
    rw.pack_into(ring, slot(0), 0, 1, 0, 1, 8)
    seg.pack_into(ring, slot(0) + 24, 9, 0, 7)
    rw.pack_into(ring, slot(1), 1, 2, 0, 2, 16)
    seg.pack_into(ring, slot(1) + 24, 10, 0, 7)
    seg.pack_into(ring, slot(1) + 32, 11, 2, 5)
    rw.pack_into(ring, slot(2), 3, 0, 0, 3, 0)  # flush
    rw.pack_into(ring, slot(3), 2, 1, 0, 4, 24)  # barrier with data
    seg.pack_into(ring, slot(3) + 24, 12, 0, 7)
    struct.pack_into("<BBHxxxxQQQ", ring, slot(4), 5, 0, 0, 5, 32, 64)  # discard
    struct.pack_into("<BBHxxxxQQH2x8I", ring, slot(5), 6, 1, 3, 6, 40, 0, 8, 0, 0, 0, 0, 0,
                     0, 0)  # indirect write of 3 segments listed in page 8
    indirect = bytearray(page)
    for i in range(3):
        seg.pack_into(indirect, 8 * i, 13 + i, 0, 7)
    struct.pack_into("<IIII", ring, 0, 6, 1, 0, 1)  # req_prod 6, req_event 1
    pages = [indirect] + [bytearray(bytes([0x41 + i]) * page) for i in range(7)]
    persistent = bytearray(ring)
    persistent[63] = 1  # the same requests with persistent grants
    return [bytes(ring) + b"".join(pages), bytes(ring), bytes(persistent) + b"".join(pages)]


TARGETS: dict[str, tuple[Callable[[bytes], None], Callable[[], list[bytes]]]] = {
    "control": (control_target, control_seeds),
    "nbd": (nbd_target, nbd_seeds),
    "nbd-inline": (nbd_inline_target, nbd_seeds),
    "nbd-inline-qcow2": (nbd_inline_qcow2_target, nbd_seeds),
    "vhd": (vhd_target, vhd_seeds),
    "virtqueue": (virtqueue_target, virtqueue_seeds),
    "blkif": (blkif_target, blkif_seeds),
    "blkif-inline": (blkif_inline_target, blkif_seeds),
    "qcow2": (qcow2_target, qcow2_seeds),
}


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in TARGETS:
        print("usage: fuzz.py {" + ",".join(TARGETS) + "} [libFuzzer flags] [CORPUS_DIR]",
              file=sys.stderr)
        return 2 if len(argv) < 2 or argv[1] != "--list" else 0
    name = argv[1]
    target, seeds = TARGETS[name]
    flags = [a for a in argv[2:] if a.startswith("-")]
    dirs = [a for a in argv[2:] if not a.startswith("-")]
    if not dirs:  # a corpus folder seeded with valid inputs
        corpus = Path(_work) / f"corpus-{name}"
        corpus.mkdir()
        dirs = [str(corpus)]
    if Path(dirs[0]).is_dir():  # (a file is an input to replay, as libFuzzer takes it)
        for i, seed in enumerate(seeds()):
            (Path(dirs[0]) / f"seed-{i}").write_bytes(seed)
    atheris.Setup([argv[0], *flags, *dirs], target)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
