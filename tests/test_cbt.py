"""Changed-block tracking: the CBT log format (built here from the reference's layout,
not from our module), the drop-in cbt-util, the ``log`` filter in-process (bits durable
before the write goes down), ``blktap changed``, and tapdisk serving a disk opened with
``tap-ctl open -C``: fio writes with verify, a live snapshot that switches logs with
``unpause -c``, ``cbt-util coalesce``, and NBD's ``qemu:dirty-bitmap:`` context read by
nbdinfo and qemu-img; the backup example of docs/cbt.md run against it."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from blktap.errors import BlktapError
from blktap.io import ThreadEngine
from blktap.tapdisk.drivers import open_stack
from blktap.tapdisk.drivers.log import LogDriver
from blktap.tapdisk.vbd import VBD
from conftest import need, run, tool, with_engine
from test_tap_ctl_daemon import Host

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 64 * KiB
ROOT = Path(__file__).resolve().parent.parent
BACKUP_EXAMPLE = ROOT / "docs" / "examples" / "cbt_backup.py"


# ------------------------------------------------------------------ the format, from the spec
def spec_log(size: int, blocks: set[int] = frozenset(), parent: bytes = bytes(16),  # type: ignore[assignment]
             child: bytes = bytes(16), consistent: int = 0) -> bytes:
    """A log as the reference lays it out: uuid parent @0, uuid child @16, int consistent
    @32, 4 bytes padding, u64 size @40, then ceil(ceil(size/64 KiB)/8) bytes of bitmap,
    block N in bit N%8 (LSB first) of byte N/8."""
    nblocks = (size + BLOCK - 1) // BLOCK
    bitmap = bytearray((nblocks + 7) // 8)
    for b in blocks:
        bitmap[b // 8] |= 1 << (b % 8)
    header = (parent + child + consistent.to_bytes(4, "little", signed=True) + bytes(4)
              + size.to_bytes(8, "little"))
    assert len(header) == 48
    return header + bytes(bitmap)


def blocks_of(extents: list[tuple[int, int]]) -> set[int]:
    return {b for off, n in extents for b in range(off // BLOCK, (off + n - 1) // BLOCK + 1)}


def bits_of(path: Path) -> set[int]:
    data = path.read_bytes()[48:]
    return {i * 8 + j for i, byte in enumerate(data) for j in range(8) if byte >> j & 1}


def cbt_util(*args: str) -> subprocess.CompletedProcess:
    return run([tool("cbt-util"), *args])


# ------------------------------------------------------------------ cbt-util
def test_cbt_util_create_set_get_are_the_reference_format(tmp_path: Path) -> None:
    log = tmp_path / "a.cbtlog"
    size = 100 * MiB + 512  # a partial last block
    r = cbt_util("create", "-n", str(log), "-s", str(size))
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    assert log.read_bytes() == spec_log(size)
    parent, child = uuid.uuid4(), uuid.uuid4()
    r = cbt_util("set", "-n", str(log), "-p", str(parent), "-c", str(child), "-f", "1")
    assert r.returncode == 0, r.stderr
    assert log.read_bytes() == spec_log(size, parent=parent.bytes, child=child.bytes,
                                        consistent=1)
    for flag, want in (("-p", str(parent)), ("-c", str(child)), ("-f", "1"),
                       ("-s", str(size))):
        r = cbt_util("get", "-n", str(log), flag)
        assert (r.returncode, r.stdout.decode()) == (0, want + "\n"), flag
    # The size only grows, and the bitmap with it (bits kept, the new blocks clean).
    data = bytearray(log.read_bytes())
    data[48] = 0x81
    data[-1] = 0x40
    log.write_bytes(bytes(data))
    r = cbt_util("set", "-n", str(log), "-s", str(300 * MiB))
    assert r.returncode == 0, r.stderr
    nb = (size + BLOCK - 1) // BLOCK
    last = ((nb + 7) // 8 - 1) * 8 + 6
    assert log.read_bytes() == spec_log(300 * MiB, {0, 7, last}, parent.bytes, child.bytes, 1)
    r = cbt_util("get", "-n", str(log), "-b")
    assert r.returncode == 0 and r.stdout == log.read_bytes()[48:]


def test_cbt_util_coalesce_ors_the_parent_into_the_child(tmp_path: Path) -> None:
    rnd = random.Random(16)
    parent, child = tmp_path / "p.cbtlog", tmp_path / "c.cbtlog"
    psize, csize = 40 * MiB, 64 * MiB + 4096  # the child's disk grew since
    pbits = set(rnd.sample(range(640), 90))
    cbits = set(rnd.sample(range(1025), 120))
    parent.write_bytes(spec_log(psize, pbits))
    child.write_bytes(spec_log(csize, cbits))
    r = cbt_util("coalesce", "-p", str(parent), "-c", str(child))
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    assert child.read_bytes() == spec_log(csize, pbits | cbits)
    assert parent.read_bytes() == spec_log(psize, pbits)
    # A parent larger than its child is refused, the reference's message (no newline).
    r = cbt_util("coalesce", "-p", str(child), "-c", str(parent))
    assert r.returncode == errno.EINVAL
    assert r.stderr == b"Parent bitmap larger than child bitmap,can't coalesce"
    assert parent.read_bytes() == spec_log(psize, pbits)


# SIGTERM (or SIGHUP) half way through the log's bytes, sent by the process to itself at
# a known point so that the test does not race the write.
_INTERRUPTED_CREATE = """
import os, signal, sys
import blktap.image.cbt.log as log
from blktap.cli import cbt_util
real = log._write_all
def half_then_signal(fd, data, offset):
    half = len(data) // 2
    real(fd, memoryview(data)[:half], offset)
    os.kill(os.getpid(), int(sys.argv[1]))
    real(fd, memoryview(data)[half:], offset + half)
log._write_all = half_then_signal
sys.exit(cbt_util.main(["cbt-util", *sys.argv[2:]]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
@pytest.mark.parametrize("existing", [True, False], ids=["replacing", "new"])
def test_cbt_util_create_interrupted_leaves_nothing_partial(tmp_path: Path, sig: int,
                                                            existing: bool) -> None:
    """cbt-util shares vhd-util's main: a signal during create ends it cleanly (exit
    128+N, 130 for Ctrl-C) and leaves the old log as it was, or no file: never half a
    log that sm would then read as one."""
    log = tmp_path / "a.cbtlog"
    if existing:
        assert cbt_util("create", "-n", str(log), "-s", str(10 * MiB)).returncode == 0
        assert cbt_util("set", "-n", str(log), "-f", "1").returncode == 0
        os.chmod(log, 0o640)
        old = log.read_bytes()
    r = run([sys.executable, "-c", _INTERRUPTED_CREATE, str(int(sig)), "create", "-n",
             str(log), "-s", str(100 * MiB)])
    assert r.returncode == (130 if sig == signal.SIGINT else 128 + sig), r.stderr
    if existing:
        assert log.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == (["a.cbtlog"] if existing else [])
    # Uninterrupted, the same command replaces the log whole, keeping its permissions.
    assert cbt_util("create", "-n", str(log), "-s", str(100 * MiB)).returncode == 0
    assert log.read_bytes() == spec_log(100 * MiB)
    assert (log.stat().st_mode & 0o777) == (0o640 if existing else 0o644 & ~_umask())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.cbtlog"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_cbt_util_bad_input_gives_the_references_messages_and_codes(tmp_path: Path) -> None:
    log = tmp_path / "x.cbtlog"
    assert cbt_util("create", "-n", str(log), "-s", str(10 * MiB)).returncode == 0
    good = log.read_bytes()

    # Usage: on stdout, EINVAL; no command or an unknown one: the command list, 0.
    for args in (("create", "-n", str(log)), ("get", "-n", str(log)),
                 ("get", "-n", str(log), "-p", "-c"), ("set", "-n", str(log)),
                 ("coalesce", "-p", str(log)), ("get", "-x")):
        r = cbt_util(*args)
        assert r.returncode == errno.EINVAL, args
        assert r.stdout.startswith(f"cbt-util {args[0]}: ".encode()), args
    r = cbt_util()
    assert r.returncode == 0 and b"COMMAND := { create | set | get | coalesce }" in r.stdout
    r = cbt_util("frobnicate")
    assert r.returncode == 0 and r.stderr == b"Invalid COMMAND frobnicate\n"

    missing = tmp_path / "none.cbtlog"
    r = cbt_util("get", "-n", str(missing), "-f")
    assert r.returncode == errno.ENOENT
    assert r.stderr == f"Failed to open log file {missing}. No such file or directory\n".encode()

    # A header cut short: EIO, the reference's message.
    short = tmp_path / "short.cbtlog"
    short.write_bytes(good[:40])
    for args in (("get", "-n", str(short), "-s"), ("set", "-n", str(short), "-f", "1"),
                 ("coalesce", "-p", str(short), "-c", str(log))):
        r = cbt_util(*args)
        assert r.returncode == errno.EIO, args
        assert r.stderr.startswith(f"Failed to read CBT metadata from file {short}".encode())
    assert short.read_bytes() == good[:40]

    # A bitmap cut short (or a header whose size does not match the file): EIO.
    trunc = tmp_path / "trunc.cbtlog"
    trunc.write_bytes(good[:-3])
    for args in (("get", "-n", str(trunc), "-b"), ("coalesce", "-p", str(trunc), "-c", str(log)),
                 ("set", "-n", str(trunc), "-s", str(20 * MiB))):
        r = cbt_util(*args)
        assert r.returncode == errno.EIO, args
        assert b"Failed to read bitmap from file" in r.stderr and b"truncated" in r.stderr
        assert r.stdout == b""
    assert log.read_bytes() == good and trunc.read_bytes() == good[:-3]

    # A file that is not a log at all (a VHD: no magic to look for, the size field is
    # what gives it away).
    vhd = tmp_path / "d.vhd"
    assert run([tool("vhd-util"), "create", "-n", str(vhd), "-s", "8"]).returncode == 0
    r = cbt_util("get", "-n", str(vhd), "-b")
    assert r.returncode in (errno.EIO, errno.EINVAL) and b"not a CBT log" in r.stderr

    # A smaller size, a uuid that does not parse: EINVAL, the file unchanged.
    r = cbt_util("set", "-n", str(log), "-s", str(MiB))
    assert r.returncode == errno.EINVAL
    assert r.stderr == f"Size smaller than current file size ({10 * MiB})\n".encode()
    r = cbt_util("set", "-n", str(log), "-p", "not-a-uuid")
    assert r.returncode == errno.EINVAL and b"Invalid UUID" in r.stderr
    assert log.read_bytes() == good


def test_blktap_changed_lists_the_runs(tmp_path: Path) -> None:
    log = tmp_path / "c.cbtlog"
    size = 10 * MiB + 1000
    log.write_bytes(spec_log(size, {0, 1, 2, 9, 160}))  # 160: the partial last block
    r = run([tool("blktap"), "changed", str(log), "--json"], text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert [(e["offset"], e["length"]) for e in info["extents"]] == [
        (0, 3 * BLOCK), (9 * BLOCK, BLOCK), (160 * BLOCK, 1000)]
    assert info["changed_bytes"] == 4 * BLOCK + 1000 and info["size"] == size
    r = run([tool("blktap"), "changed", str(log)], text=True)
    assert r.returncode == 0 and re.search(r"^\s*589824\s+65536$", r.stdout, re.M), r.stdout
    log.write_bytes(spec_log(size)[:-1])
    r = run([tool("blktap"), "changed", str(log)], text=True)
    assert r.returncode == errno.EIO and "truncated" in r.stderr


# ------------------------------------------------------------------ the filter, in-process
class Recording(ThreadEngine):
    """The thread engine, noting each write and sync by file (to check their order)."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.ops: list[tuple[str, str]] = []

    def _name(self, fd: int) -> str:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))

    async def pwritev(self, fd, iov, offset, *, dsync=False):  # type: ignore[no-untyped-def]
        if self.try_pwritev(fd, iov, offset, dsync=dsync):
            return
        self.ops.append(("write", self._name(fd)))
        await super().pwritev(fd, iov, offset, dsync=dsync)

    def try_pwritev(self, fd, iov, offset, *, dsync=False):  # type: ignore[no-untyped-def]
        done = super().try_pwritev(fd, iov, offset, dsync=dsync)
        if done:
            self.ops.append(("write", self._name(fd)))
        return done

    async def fsync(self, fd, *, datasync=True):  # type: ignore[no-untyped-def]
        self.ops.append(("sync", self._name(fd)))
        await super().fsync(fd, datasync=datasync)


def test_log_filter_syncs_new_bits_before_the_write_and_groups_them(tmp_path: Path) -> None:
    disk, log = tmp_path / "disk.img", tmp_path / "d.cbtlog"
    size = 8 * MiB
    with open(disk, "wb") as f:
        f.truncate(size)
    log.write_bytes(spec_log(size))

    async def body(engine: Recording) -> None:
        below = await engine.call(open_stack, engine, f"aio:{disk}", writable=True,
                                  direct=False)
        top = await engine.call(LogDriver.open, engine, str(log), below)
        vbd = VBD(top, name="t")
        try:
            await vbd.write(100 * KiB, memoryview(b"a" * 4096))
            # Set in the file before the data went down, and synced.
            assert engine.ops == [("write", "d.cbtlog"), ("sync", "d.cbtlog"),
                                  ("write", "disk.img")]
            assert log.read_bytes() == spec_log(size, {1})
            # A block already marked: no log I/O, served through the side door.
            engine.ops.clear()
            if not vbd.write_now(64 * KiB, memoryview(b"b" * 512)):  # tmpfs: served now
                await vbd.write(64 * KiB, memoryview(b"b" * 512))
            await vbd.write(70 * KiB, memoryview(b"c" * 4096))
            assert ("write", "d.cbtlog") not in engine.ops
            # Many writes at once to new blocks: fewer syncs than writes, every bit on
            # disk when its write is acknowledged, none other.
            engine.ops.clear()
            offsets = [b * BLOCK + 512 for b in range(3, 120, 3)]
            await asyncio.gather(*(vbd.write(o, memoryview(b"d" * 4096)) for o in offsets))
            syncs = engine.ops.count(("sync", "d.cbtlog"))
            assert 1 <= syncs < len(offsets)
            assert log.read_bytes() == spec_log(size, {1} | {o // BLOCK for o in offsets})
            # Zeroes and discards change content too; a write across blocks marks each.
            await vbd.write_zeroes(121 * BLOCK, 2 * BLOCK)
            await vbd.discard(123 * BLOCK, BLOCK)
            await vbd.write(126 * BLOCK - 512, memoryview(b"e" * (BLOCK + 1024)))
            want = {1, 121, 122, 123, 125, 126, 127} | {o // BLOCK for o in offsets}
            assert log.read_bytes() == spec_log(size, want)
            # Reads pass through; nothing marked.
            buf = bytearray(4096)
            await vbd.read(100 * KiB, memoryview(buf))
            await vbd.read(124 * BLOCK, memoryview(buf))
            assert bytes(buf) == bytes(4096)
            assert log.read_bytes() == spec_log(size, want)
            # The NBD context's view of it.
            assert await vbd.dirty_status("d", 0, 4 * BLOCK) == [
                (BLOCK, 0), (BLOCK, 1), (BLOCK, 0), (BLOCK, 1)]
            assert await vbd.dirty_status("d", 124 * BLOCK + 5, 4 * BLOCK - 5) == [
                (BLOCK - 5, 0), (3 * BLOCK, 1)]
            assert await vbd.dirty_status("d", 1 * BLOCK + 7, 10) == [(10, 1)]
            with pytest.raises(BlktapError) as e:
                await vbd.dirty_status("other", 0, BLOCK)
            assert e.value.errno == errno.EINVAL
        finally:
            await vbd.close()
        assert log.read_bytes() == spec_log(size, want)

    with_engine(body, Recording)


def test_log_filter_marks_exactly_the_blocks_of_random_requests(tmp_path: Path) -> None:
    """Writes, zeroings and discards of random sizes and places (across byte and block
    boundaries, whole bytes of the bitmap): the file is the spec's bitmap of the blocks
    they touched, after each request."""
    disk, log = tmp_path / "disk.img", tmp_path / "r.cbtlog"
    size = 48 * MiB + 7 * 512
    with open(disk, "wb") as f:
        f.truncate(size)
    log.write_bytes(spec_log(size))
    rnd = random.Random(1616)

    async def body(engine: ThreadEngine) -> None:
        below = await engine.call(open_stack, engine, f"aio:{disk}", writable=True,
                                  direct=False)
        top = await engine.call(LogDriver.open, engine, str(log), below)
        vbd = VBD(top, name="r")
        touched: set[int] = set()
        try:
            for i in range(120):
                n = rnd.choice([512, 4096, BLOCK - 512, BLOCK, 3 * BLOCK + 1024,
                                20 * BLOCK, 70 * BLOCK])
                off = rnd.randrange(0, (size - n) // 512 + 1) * 512
                op = rnd.choice(["write", "write", "zeroes", "discard"])
                if op == "write":
                    await vbd.write(off, memoryview(bytes([i % 255 + 1]) * n))
                elif op == "zeroes":
                    await vbd.write_zeroes(off, n)
                else:
                    await vbd.discard(off, n)
                touched |= blocks_of([(off, n)])
                assert log.read_bytes() == spec_log(size, touched), (i, op, off, n)
        finally:
            await vbd.close()

    with_engine(body)


class FailingLogSync(ThreadEngine):
    """The thread engine whose next sync of a ``.cbtlog`` file fails with EIO."""

    fail_next = False

    async def fsync(self, fd, *, datasync=True):  # type: ignore[no-untyped-def]
        if self.fail_next and os.readlink(f"/proc/self/fd/{fd}").endswith(".cbtlog"):
            self.fail_next = False
            raise OSError(errno.EIO, "injected")
        await super().fsync(fd, datasync=datasync)


def test_a_failed_log_sync_fails_the_write_before_it_reaches_the_disk(tmp_path: Path) -> None:
    disk, log = tmp_path / "disk.img", tmp_path / "d.cbtlog"
    with open(disk, "wb") as f:
        f.truncate(4 * MiB)
    log.write_bytes(spec_log(4 * MiB))

    async def body(engine: FailingLogSync) -> None:
        below = await engine.call(open_stack, engine, f"aio:{disk}", writable=True,
                                  direct=False)
        top = await engine.call(LogDriver.open, engine, str(log), below)
        vbd = VBD(top, name="t")
        try:
            engine.fail_next = True
            with pytest.raises(OSError) as e:
                await vbd.write(5 * BLOCK, memoryview(b"x" * 4096))
            assert e.value.errno == errno.EIO
            assert disk.read_bytes()[5 * BLOCK : 5 * BLOCK + 4096] == bytes(4096)
            # The next write syncs the bit the failed one set, and its own.
            await vbd.write(9 * BLOCK, memoryview(b"y" * 4096))
            assert log.read_bytes() == spec_log(4 * MiB, {5, 9})
        finally:
            await vbd.close()

    with_engine(body, FailingLogSync)


def test_log_open_grows_a_smaller_log_and_refuses_bad_ones(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(8 * MiB)
    small, big = tmp_path / "small.cbtlog", tmp_path / "big.cbtlog"
    trunc, junk = tmp_path / "trunc.cbtlog", tmp_path / "junk.cbtlog"
    small.write_bytes(spec_log(2 * MiB + 512, {0, 32}))
    big.write_bytes(spec_log(16 * MiB))
    trunc.write_bytes(spec_log(8 * MiB)[:-1])
    junk.write_bytes(b"\xff" * 200)

    async def body(engine: ThreadEngine) -> None:
        below = await engine.call(open_stack, engine, f"aio:{disk}", writable=True,
                                  direct=False)
        try:
            for path, code, text in ((big, errno.EINVAL, "for a disk of 16777216 bytes"),
                                     (trunc, errno.EIO, "truncated"),
                                     (junk, errno.EINVAL, "not a CBT log"),
                                     (tmp_path / "none", errno.ENOENT, "No such file")):
                with pytest.raises(BlktapError) as e:
                    await engine.call(LogDriver.open, engine, str(path), below)
                assert e.value.errno == code and text in str(e.value), path
            top = await engine.call(LogDriver.open, engine, str(small), below)
            await top.close()
        finally:
            await below.close()

    with_engine(body)
    assert small.read_bytes() == spec_log(8 * MiB, {0, 32})
    assert big.read_bytes() == spec_log(16 * MiB)


# ------------------------------------------------------------------ tapdisk, fio, NBD
def fio_writes(uri: str, workdir: Path, name: str, offset: int, size: int, seed: int,
               ios: int) -> set[int]:
    """Random writes of 4-12 KiB with verify through NBD; the 64 KiB blocks they wrote
    (from fio's own log of its writes)."""
    iolog = workdir / f"{name}.iolog"
    r = run([need("fio"), f"--name={name}", "--ioengine=nbd", f"--uri={uri}",
             "--rw=randwrite", "--bsrange=4k-12k", "--iodepth=8", f"--offset={offset}",
             f"--size={size}", f"--number_ios={ios}", f"--randseed={seed}",
             "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
             f"--write_iolog={iolog}", "--output-format=json"], text=True, cwd=workdir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]["error"] == 0
    extents = []
    for line in iolog.read_text().splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[2] == "write":
            extents.append((int(parts[3]), int(parts[4])))
    assert len(extents) == ios
    return blocks_of(extents)


def nbdinfo_map(uri: str, name: str) -> list[tuple[int, int, int]]:
    r = run([need("nbdinfo"), f"--map=qemu:dirty-bitmap:{name}", "--json", uri], text=True)
    assert r.returncode == 0, r.stderr
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(r.stdout)]


def qemu_dirty_map(socket: Path, name: str) -> list[tuple[int, int, int]]:
    """qemu's own NBD client reading the bitmap (x-dirty-bitmap): qemu-img map reports a
    dirty run as "data": false, a clean one as "data": true."""
    r = run([need("qemu-img"), "map", "--output=json", "--image-opts",
             f"driver=nbd,server.type=unix,server.path={socket},"
             f"x-dirty-bitmap=qemu:dirty-bitmap:{name}"], text=True)
    assert r.returncode == 0, r.stderr
    out: list[tuple[int, int, int]] = []
    for e in json.loads(r.stdout):
        t = 0 if e["data"] else 1
        if out and out[-1][2] == t and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], t)
        else:
            out.append((e["start"], e["length"], t))
    return out


def map_of(blocks: set[int], size: int) -> list[tuple[int, int, int]]:
    """What the dirty-bitmap context says of ``blocks``: runs of (offset, length, 1|0)."""
    out: list[tuple[int, int, int]] = []
    for b in range(size // BLOCK):
        t = 1 if b in blocks else 0
        if out and out[-1][2] == t:
            out[-1] = (out[-1][0], out[-1][1] + BLOCK, t)
        else:
            out.append((b * BLOCK, BLOCK, t))
    return out


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    """Our tap-ctl and tapdisk with their own run directory; tapdisks left are killed."""
    h = Host(tmp_path)
    yield h
    for entry in (h.listing() if h.run_dir.exists() else []):
        if "pid" in entry:
            try:
                os.kill(int(entry["pid"]), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_tapdisk_cbt_fio_live_snapshot_coalesce_and_nbdinfo(host: Host, tmp_path: Path) -> None:
    """A VHD opened with -C: fio's writes are exactly the log's bits; a live snapshot with
    unpause -c splits the writes between the old and new logs; coalesce ORs them; the
    files are the reference's bytes; nbdinfo reads the same through the NBD context."""
    vhd_util = tool("vhd-util")
    size = 64 * MiB
    base, snap = tmp_path / "base.vhd", tmp_path / "snap.vhd"
    log1, log2 = tmp_path / "vdi1.cbtlog", tmp_path / "vdi2.cbtlog"
    assert run([vhd_util, "create", "-n", str(base), "-s", "64"]).returncode == 0
    assert cbt_util("create", "-n", str(log1), "-s", str(size)).returncode == 0
    pid, minor = host.create(f"vhd:{base}", "-C", str(log1))
    p, m = str(pid), str(minor)
    uri = host.nbd(pid, minor)

    written1 = fio_writes(uri, tmp_path, "one", 0, 48 * MiB, 1, 150)
    assert bits_of(log1) == written1  # durable while the disk is still open
    assert nbdinfo_map(uri, "vdi1") == map_of(written1, size)
    r = run([need("nbdinfo"), "--json", uri], text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["exports"][0]["contexts"] == [
        "base:allocation", "qemu:dirty-bitmap:vdi1"]

    # Live snapshot: pause, snapshot, unpause on the child with a new log.
    host.out("pause", "-p", p, "-m", m)
    assert run([vhd_util, "snapshot", "-n", str(snap), "-p", str(base)]).returncode == 0
    assert cbt_util("create", "-n", str(log2), "-s", str(size)).returncode == 0
    host.out("unpause", "-p", p, "-m", m, "-a", f"vhd:{snap}", "-c", str(log2))
    written2 = fio_writes(uri, tmp_path, "two", 16 * MiB, 48 * MiB, 2, 150)
    assert bits_of(log2) == written2
    assert bits_of(log1) == written1  # the old log saw none of the new writes
    assert written1 - written2 and written2 - written1  # (the test can tell them apart)
    assert nbdinfo_map(uri, "vdi2") == map_of(written2, size)
    assert qemu_dirty_map(host.run_dir / f"nbd{pid}.{minor}", "vdi2") == map_of(written2, size)
    r = run([need("nbdinfo"), "--map=qemu:dirty-bitmap:vdi1", uri], text=True)
    assert r.returncode != 0  # that log is gone from the disk

    # Unpause without -c drops the log: further writes are not tracked.
    host.out("pause", "-p", p, "-m", m)
    host.out("unpause", "-p", p, "-m", m)
    fio_writes(uri, tmp_path, "three", 0, 4 * MiB, 3, 20)
    assert bits_of(log2) == written2
    host.out("destroy", "-p", p, "-m", m)

    assert log1.read_bytes() == spec_log(size, written1)
    assert log2.read_bytes() == spec_log(size, written2)
    r = cbt_util("coalesce", "-p", str(log1), "-c", str(log2))
    assert r.returncode == 0, r.stderr
    assert log2.read_bytes() == spec_log(size, written1 | written2)


def test_tapdisk_refuses_a_bad_log_and_keeps_serving(host: Host, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(8 * MiB)
    good, bad = tmp_path / "good.cbtlog", tmp_path / "bad.cbtlog"
    good.write_bytes(spec_log(8 * MiB))
    pid, minor = host.create(f"aio:{disk}", "-C", str(good))
    p = str(pid)
    other = host.out("allocate").strip().rsplit("-", 1)[1]
    host.out("attach", "-p", p, "-m", other)
    for content, code in ((spec_log(8 * MiB)[:-1], errno.EIO),
                          (spec_log(32 * MiB), errno.EINVAL), (b"junk", errno.EIO)):
        bad.write_bytes(content)
        got, _, err = host.tap_ctl("open", "-p", p, "-m", other, "-a", f"aio:{disk}",
                                   "-C", str(bad), ok=False)
        assert got == code and err == os.strerror(code) + "\n", (content[:8], got, err)
    # The other disk is untouched and still tracked.
    qemu_io = need("qemu-io")
    r = run([qemu_io, "-f", "raw", "-c", "write -P 7 1M 64k", host.nbd(pid, minor)],
            text=True)
    assert r.returncode == 0, r.stderr
    assert bits_of(good) == {16}
    # unpause -c with a bad log: refused at once (no retries), the disk stays paused,
    # marked RESUME_FAILED; an unpause with a good log then serves and tracks again.
    m = str(minor)
    host.out("pause", "-p", p, "-m", m)
    bad.write_bytes(spec_log(8 * MiB)[:60])
    got, _, err = host.tap_ctl("unpause", "-p", p, "-m", m, "-c", str(bad), ok=False)
    assert got == errno.EIO, err
    state = int(next(e for e in host.listing() if e.get("minor") == m)["state"], 16)
    assert state & 0x20 and state & 0x200, hex(state)
    fresh = tmp_path / "fresh.cbtlog"
    fresh.write_bytes(spec_log(8 * MiB))
    host.out("unpause", "-p", p, "-m", m, "-c", str(fresh))
    r = run([qemu_io, "-f", "raw", "-c", "write -P 8 4M 4k", host.nbd(pid, minor)], text=True)
    assert r.returncode == 0, r.stderr
    assert bits_of(fresh) == {64} and bits_of(good) == {16}
    host.out("destroy", "-p", p, "-m", m)


def test_backup_example_reads_exactly_the_changed_extents(host: Host, tmp_path: Path) -> None:
    """docs/examples/cbt_backup.py against a tapdisk: the backup gets the changed blocks'
    data, nothing else is read (tapdisk's read counter), and the blocks it skipped are
    the ones the log says are unchanged."""
    python = "/usr/bin/python3"
    if run([python, "-c", "import nbd"]).returncode != 0:
        pytest.skip("python3-libnbd not installed")
    size = 32 * MiB
    disk, log = tmp_path / "disk.img", tmp_path / "vm.cbtlog"
    rnd = random.Random(7)
    with open(disk, "wb") as f:
        f.truncate(size)
    log.write_bytes(spec_log(size))
    pid, minor = host.create(f"aio:{disk}", "-C", str(log))
    uri = host.nbd(pid, minor)
    writes = [(rnd.randrange(0, size - 70 * KiB) // 512 * 512, rnd.choice([512, 4096, 70 * KiB]))
              for _ in range(25)]
    cmds = []
    for i, (off, n) in enumerate(writes):
        cmds += ["-c", f"write -P {i + 1} {off} {n}"]
    assert run([need("qemu-io"), "-f", "raw", *cmds, uri]).returncode == 0
    stats0 = json.loads(host.out("stats", "-p", str(pid), "-m", str(minor)))
    backup = tmp_path / "backup.img"
    r = run([python, str(BACKUP_EXAMPLE), uri, "vm", str(backup)], text=True)
    assert r.returncode == 0, r.stderr
    stats1 = json.loads(host.out("stats", "-p", str(pid), "-m", str(minor)))
    changed = blocks_of(writes)
    want_bytes = len(changed) * BLOCK
    assert (stats1["secs"][0] - stats0["secs"][0]) * 512 == want_bytes
    assert f"copied {want_bytes} bytes" in r.stdout
    data, back = disk.read_bytes(), backup.read_bytes()
    assert len(back) == size
    for b in range(size // BLOCK):
        chunk = slice(b * BLOCK, (b + 1) * BLOCK)
        assert back[chunk] == (data[chunk] if b in changed else bytes(BLOCK)), b
    host.out("destroy", "-p", str(pid), "-m", str(minor))


def test_blktap_serve_with_a_cbt_log(tmp_path: Path) -> None:
    from nbd_helpers import serve
    disk, log = tmp_path / "disk.img", tmp_path / "s.cbtlog"
    with open(disk, "wb") as f:
        f.truncate(4 * MiB)
    log.write_bytes(spec_log(4 * MiB))
    with serve(f"aio:{disk}", tmp_path, "--cbt-log", str(log)) as srv:
        r = run([need("qemu-io"), "-f", "raw", "-c", "write -P 3 130k 64k", srv.uri], text=True)
        assert r.returncode == 0, r.stderr
        assert nbdinfo_map(srv.uri, "s") == map_of({2, 3}, 4 * MiB)
        assert srv.stop() == 0
    assert log.read_bytes() == spec_log(4 * MiB, {2, 3})
    log.write_bytes(spec_log(8 * MiB))  # for a larger disk: refused, nothing served
    r = run([tool("blktap"), "serve", f"aio:{disk}", "--socket", str(tmp_path / "x.sock"),
             "--cbt-log", str(log)], text=True, timeout=60)
    assert r.returncode == errno.EINVAL and "for a disk of 8388608 bytes" in r.stderr


def test_spec_log_helper_matches_struct_layout() -> None:
    """The test's own builder against an independent struct layout of the C header."""
    u1, u2 = uuid.uuid4().bytes, uuid.uuid4().bytes
    raw = struct.pack("<16s16si4xQ", u1, u2, -3, 5 * BLOCK)
    assert spec_log(5 * BLOCK, {4}, u1, u2, -3) == raw + b"\x10"
