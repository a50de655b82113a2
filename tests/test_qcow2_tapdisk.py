"""The tapdisk ``qcow2`` driver: a stack over a qcow2 leaf with qcow2/raw/VHD parents,
reads, writes (copy-on-write through the driver stack), zeroes, discards, block status,
the side doors; and ``blktap serve`` of a qcow2 image driven by qemu-io over NBD."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from blktap.errors import FormatError
from blktap.image.chain import Chain
from blktap.image.qcow2 import image as q2
from blktap.image.qcow2.check import check
from blktap.image.qcow2.create import create
from blktap.image.qcow2.image import Qcow2Image
from blktap.image.qcow2.structs import L1_OFFSET_MASK
from blktap.io import ThreadEngine
from blktap.tapdisk.driver import STATE_DATA, STATE_HOLE, STATE_ZERO
from blktap.tapdisk.drivers import Qcow2Driver, open_stack, parse
from conftest import need, with_engine
from nbd_helpers import serve
from qcow2_helpers import MiB, qemu_check, qemu_img, qemu_io, qemu_raw

SIZE = 4 * MiB


def view(data: bytes) -> memoryview:
    return memoryview(bytearray(data))


def make_chain(tmp: Path, cluster_size: int = 65536, **kw: object) -> tuple[Path, bytearray]:
    base = tmp / "base.raw"
    data = bytearray(random.Random(5).randbytes(SIZE))
    base.write_bytes(data)
    mid = tmp / "mid.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid, str(SIZE))
    qemu_io(mid, "write -P 0x33 100k 200k", "write -z 1M 192k")
    data[100 * 1024 : 300 * 1024] = b"\x33" * 200 * 1024
    data[MiB : MiB + 192 * 1024] = bytes(192 * 1024)
    leaf = tmp / "leaf.qcow2"
    create(str(leaf), SIZE, backing_file="mid.qcow2", backing_fmt="qcow2",
           cluster_size=cluster_size, **kw)  # type: ignore[arg-type]
    return leaf, data


def test_parse_knows_qcow2(tmp_path: Path) -> None:
    img = tmp_path / "p.qcow2"
    create(str(img), MiB)
    assert parse(str(img)) == ("qcow2", str(img))
    assert parse(f"qcow2:{img}") == ("qcow2", str(img))


@pytest.mark.parametrize("layout", [{"cluster_size": 65536}, {"cluster_size": 4096},
                                    {"cluster_size": 65536, "extended_l2": True}])
def test_driver_stack_reads_writes_and_qemu_agrees(tmp_path: Path, layout: dict) -> None:
    leaf, shadow = make_chain(tmp_path, **layout)
    rng = random.Random(layout["cluster_size"])

    async def body(engine: ThreadEngine) -> None:
        drv = await engine.call(open_stack, engine, f"qcow2:{leaf}", writable=True)
        try:
            assert isinstance(drv, Qcow2Driver)
            assert [d.name for d in drv.chain()] == ["qcow2", "qcow2", "aio"]
            buf = view(bytes(SIZE))
            await drv.read(0, [buf])
            assert buf == shadow
            for _ in range(60):
                sector = rng.randrange(SIZE // 512)
                n = min(SIZE // 512 - sector, rng.randrange(1, 400))
                off, length = sector * 512, n * 512
                op = rng.random()
                if op < 0.6:
                    data = rng.randbytes(length)
                    half = (n // 2) * 512
                    await drv.write(off, [view(data[:half]), view(data[half:])])
                    shadow[off : off + length] = data
                elif op < 0.8:
                    await drv.write_zeroes(off, length)
                    shadow[off : off + length] = bytes(length)
                else:
                    await drv.discard(off, length)
                    got = view(bytes(length))
                    await drv.read(off, [got])
                    shadow[off : off + length] = got
            await drv.flush()
            buf = view(bytes(SIZE))
            await drv.read(0, [buf])
            assert buf == shadow
            status = await drv.block_status(0, SIZE)
            assert sum(n for n, _ in status) == SIZE
        finally:
            for d in drv.chain():
                await d.close()

    with_engine(body)
    assert qemu_check(leaf)[0] == 0
    assert check(str(leaf)).exit_code == 0
    assert qemu_raw(leaf, tmp_path) == shadow


def test_quick_lookup_across_clusters(tmp_path: Path) -> None:
    """A range over several clusters is answered by one look when they are all alike
    (data following each other in the file with the same flags, all zero, all holes),
    and left to the runs otherwise; whenever it answers, the runs say the same."""
    img = tmp_path / "m.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 1 0 512k", "write -z 512k 256k",  # data in order, zeros
            "write -P 2 1536k 64k", "write -P 3 1472k 64k",  # two clusters out of order
            "write -P 4 3M 128k")
    qemu_img("snapshot", "-c", "s1", img)  # 3M..3M+128k shared from now on
    # 3M's first cluster copied up (flags differ from its neighbour's); 2M..2M+256k new
    qemu_io(img, "write -P 5 3M 4k", "write -P 6 2M 256k")
    image = Qcow2Image.open(str(img), writable=True)
    KiB = 1024
    try:
        list(image.runs(0, image.size))  # every L2 table in the cache
        for off in range(0, image.size, 16 * KiB):
            for n in (4 * KiB, 60 * KiB, 64 * KiB, 68 * KiB, 128 * KiB, 256 * KiB,
                      512 * KiB, MiB, 5 * MiB):
                if off + n > image.size:
                    continue
                found = image.quick_lookup(off, n)
                if found is None:
                    continue
                runs = list(image.runs(off, n))
                assert len(runs) == 1 and runs[0][2] == found[0], (off, n, runs, found)
                if found[0] == q2.DATA:
                    assert runs[0][3] == found[1], (off, n, runs, found)
                    assert found[2] == (image.in_place(off, n) is not None), (off, n)
        cs = 64 * KiB
        assert image.quick_lookup(0, 512 * KiB)[:2] == (q2.DATA, runs_host(image, 0))
        assert image.quick_lookup(4 * KiB, 256 * KiB)[0] == q2.DATA
        assert not image.quick_lookup(0, 512 * KiB)[2]  # shared with the snapshot
        assert image.quick_lookup(2 * MiB, 256 * KiB)[2]  # owned: writable in place
        assert image.quick_lookup(512 * KiB, 256 * KiB)[0] == q2.ZERO
        assert image.quick_lookup(768 * KiB, 512 * KiB)[0] == q2.HOLE
        assert image.quick_lookup(448 * KiB, 128 * KiB) is None  # data, then zeros
        assert image.quick_lookup(1472 * KiB, 2 * cs) is None  # out of order in the file
        assert image.quick_lookup(3 * MiB, 2 * cs) is None  # owned, then shared
        assert image.quick_lookup(0, 65 * cs) is None  # more than QUICK_CLUSTERS
    finally:
        image.close()


def runs_host(image: Qcow2Image, off: int) -> int:
    return list(image.runs(off, 512))[0][3]


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
def test_quick_lookup_agrees_with_the_runs(tmp_path: Path, compat: str) -> None:
    """The one-lookup path of small reads, writes and status (``quick_lookup``) gives the
    runs' kind, and for a plain data cluster the runs' host offset, and says it may be
    written in place exactly when the library's ``in_place`` does: checked on every kind
    of cluster qemu makes (data, zero, compressed, unallocated, shared with an internal
    snapshot)."""
    img = tmp_path / "k.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"compat={compat}", img, "1M")
    commands = ["write -P 1 0 192k", "write -c -P 2 256k 64k"]
    if compat == "1.1":
        commands.append("write -z 128k 64k")  # a zero flag over data (v3 only)
    qemu_io(img, *commands)
    qemu_img("snapshot", "-c", "s1", img)  # every cluster so far shared: not COPIED
    qemu_io(img, "write -P 3 64k 4k", "write -P 4 512k 64k")  # copied up, and new
    image = Qcow2Image.open(str(img), writable=True)
    try:
        seen = set()
        for off in range(0, MiB, 4096):
            runs = list(image.runs(off, 4096))  # (also brings the L2 table in)
            found = image.quick_lookup(off, 4096)
            kind = runs[0][2] if len(runs) == 1 else None
            if found is not None:
                assert found[0] == kind, (off, runs, found)
            quick = found[1:] if found is not None and found[0] == q2.DATA else None
            if quick is None:
                assert kind != q2.DATA, (off, runs)
            else:
                assert runs == [(off, 4096, q2.DATA, quick[0])], (off, runs, quick)
                assert quick[1] == (image.in_place(off, 4096) is not None), (off, quick)
            seen.add((kind, None if quick is None else quick[1]))
        assert image.quick_lookup(60 * 1024, 8192) is None  # data, then data elsewhere
        expected = {(q2.DATA, True), (q2.DATA, False), (q2.COMPRESSED, None), (q2.HOLE, None)}
        assert seen == expected | ({(q2.ZERO, None)} if compat == "1.1" else set())
    finally:
        image.close()


def test_misaligned_data_cluster_is_refused_by_every_path(tmp_path: Path) -> None:
    """An L2 entry pointing half way into a cluster (a corrupt image): the one-lookup
    path does not answer for it, so reads, writes and the block status all give the
    library's error instead of serving bytes from the wrong place or calling it data."""
    img = tmp_path / "bad.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    qemu_io(img, "write -P 1 0 64k")
    with Qcow2Image.open(str(img)) as image:
        l2_off = image.l1[0] & L1_OFFSET_MASK
    with open(img, "r+b") as f:
        f.seek(l2_off)
        entry = int.from_bytes(f.read(8), "big")
        f.seek(l2_off)
        f.write((entry + 512).to_bytes(8, "big"))

    async def body(engine: ThreadEngine) -> None:
        drv = await engine.call(open_stack, engine, f"qcow2:{img}", writable=True)
        try:
            with pytest.raises(FormatError, match="not cluster aligned"):
                await drv.read(0, [view(bytes(4096))])
            for call in (lambda: drv.read_now(0, [view(bytes(4096))], []),
                         lambda: drv.write_now(0, [view(b"x" * 4096)]),
                         lambda: drv.status_now(0, 4096)):
                with pytest.raises(FormatError, match="not cluster aligned"):
                    call()
            with pytest.raises(FormatError, match="not cluster aligned"):
                await drv.block_status(0, 4096)
            with pytest.raises(FormatError, match="not cluster aligned"):
                await drv.write(0, [view(b"x" * 4096)])
        finally:
            await drv.close()

    with_engine(body)


def test_block_status_and_side_doors() -> None:
    """On tmpfs the side doors serve what needs no metadata change at once."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    folder = Path(tempfile.mkdtemp(prefix="blktap-qcow2-", dir="/dev/shm"))
    img = folder / "s.qcow2"
    try:
        create(str(img), SIZE)
        with Chain.open(f"qcow2:{img}", writable=True) as chain:
            chain.write(0, b"\1" * 65536)
            chain.leaf.write_zeroes(2 * MiB // 512, 128)

        async def body(engine: ThreadEngine) -> None:
            drv = await engine.call(open_stack, engine, f"qcow2:{img}", writable=True)
            try:
                assert await drv.block_status(0, SIZE) == [
                    (65536, STATE_DATA), (SIZE - 65536, STATE_HOLE | STATE_ZERO)]
                buf = view(bytes(4096))
                await drv.read(0, [buf])  # the L2 table is now in memory
                buf2 = view(bytes(4096))
                assert drv.read_now(0, [buf2], [])
                assert buf2 == b"\1" * 4096
                zeros = view(b"\7" * 4096)
                assert drv.read_now(2 * MiB, [zeros], [])  # a zero cluster
                assert zeros == bytes(4096)
                hole = view(b"\7" * 4096)
                assert drv.read_now(MiB, [hole], [])  # unallocated, no backing file
                assert hole == bytes(4096)
                # A write to an owned cluster goes through the side door...
                assert drv.write_now(4096, [view(b"\2" * 512)])
                got = view(bytes(512))
                await drv.read(4096, [got])
                assert got == b"\2" * 512
                # ...one that must allocate does not, and changes nothing.
                before = img.read_bytes()
                assert not drv.write_now(3 * MiB, [view(b"\3" * 512)])
                assert img.read_bytes() == before
                await drv.write(3 * MiB, [view(b"\3" * 512)])
                assert drv.write_now(3 * MiB + 512, [view(b"\4" * 512)])
            finally:
                await drv.close()

        with_engine(body)
        assert qemu_check(img)[0] == 0
        data = qemu_raw(img, folder)
        assert data[3 * MiB : 3 * MiB + 1024] == b"\3" * 512 + b"\4" * 512
    finally:
        shutil.rmtree(folder)


def test_serve_qcow2_over_nbd_with_qemu_io(tmp_path: Path) -> None:
    leaf, shadow = make_chain(tmp_path)
    with serve(f"qcow2:{leaf}", tmp_path) as srv:
        uri = srv.uri
        qemu_io(uri, "write -P 0x44 1020k 10k", "write -z 2M 1M", "discard 3M 128k",
                "write -P 0x55 3M 64k", fmt="raw")
        out = tmp_path / "served.raw"
        qemu_img("convert", "-f", "raw", "-O", "raw", uri, out)
        served = out.read_bytes()
        assert srv.stop() == 0
    shadow[1020 * 1024 : 1030 * 1024] = b"\x44" * 10 * 1024  # across a cluster border
    shadow[2 * MiB : 3 * MiB] = bytes(MiB)
    shadow[3 * MiB : 3 * MiB + 65536] = b"\x55" * 65536
    assert qemu_check(leaf)[0] == 0
    final = qemu_raw(leaf, tmp_path)
    assert final == served
    # The discarded range reads as zeros or as before (a discard is a hint); the rest is
    # exactly what was written.
    assert final[: 3 * MiB] == shadow[: 3 * MiB]
    assert final[3 * MiB + 131072 :] == shadow[3 * MiB + 131072 :]
    assert final[3 * MiB + 65536 : 3 * MiB + 131072] in (
        bytes(65536), shadow[3 * MiB + 65536 : 3 * MiB + 131072])
    assert final[3 * MiB : 3 * MiB + 65536] == b"\x55" * 65536


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.5])
def test_sigkill_under_nbd_writes(tmp_path: Path, delay: float) -> None:
    """A real SIGKILL of the server while qemu-io writes over NBD: afterwards qemu-img
    check finds no corruption (leaks allowed), and what was flushed before is there."""
    leaf, shadow = make_chain(tmp_path, cluster_size=4096)
    with serve(f"qcow2:{leaf}", tmp_path) as srv:
        qemu_io(srv.uri, "write -P 0x71 0 300k", "write -P 0x72 2500k 70k", "flush",
                fmt="raw")
        shadow[: 300 * 1024] = b"\x71" * 300 * 1024
        shadow[2500 * 1024 : 2570 * 1024] = b"\x72" * 70 * 1024
        argv = [need("qemu-io"), "-f", "raw"]
        for i in range(200):
            argv += ["-c", f"write -P {i % 250 + 1} {(1024 + (i * 37) % 1200) * 1024} 12k"]
        writer = subprocess.Popen([*argv, srv.uri], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        time.sleep(delay)
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(timeout=30)
        writer.wait(timeout=60)
    code, info = qemu_check(leaf)
    assert code in (0, 3), info
    assert check(str(leaf)).exit_code == code
    data = qemu_raw(leaf, tmp_path)
    assert data[: 300 * 1024] == shadow[: 300 * 1024]
    assert data[2500 * 1024 : 2570 * 1024] == shadow[2500 * 1024 : 2570 * 1024]
    assert data[2300 * 1024 : 2500 * 1024] == shadow[2300 * 1024 : 2500 * 1024]


def test_a_read_of_a_compressed_cluster_rewritten_meanwhile(tmp_path: Path) -> None:
    """A read finds a cluster compressed; before it inflates it, a write to another part
    of the cluster makes it a data cluster (and releases the compressed bytes): the read
    gets the bytes the cluster holds now, not an error."""
    img = tmp_path / "c.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1M")
    qemu_io(img, "write -c -P 51 64k 64k")
    new = bytes([7]) * 4096

    async def body(engine: ThreadEngine) -> None:
        drv = await engine.call(open_stack, engine, f"qcow2:{img}", writable=True)
        try:
            inflate = drv._inflate_locked
            calls = []

            def write_first(cluster: int) -> bytes | None:
                if not calls:  # the write lands between the runs and the inflating
                    drv._locked(None, drv._write_views, 64 * 1024 + 8192, [view(new)])
                calls.append(cluster)
                return inflate(cluster)
            drv._inflate_locked = write_first  # type: ignore[method-assign]
            got = view(bytes(4096))
            await drv.read(64 * 1024, [got])
            assert got == bytes([51]) * 4096
            assert calls == [1]
            both = view(bytes(16384))
            await drv.read(64 * 1024, [both])
            assert both == bytes([51]) * 8192 + new + bytes([51]) * 4096
        finally:
            for d in drv.chain():
                await d.close()

    with_engine(body)
    assert qemu_check(img)[0] == 0
