"""tapdisk serving encrypted VHDs (``tap-ctl open -E``): open_stack with a key, the vhd
driver decrypting what it holds and encrypting what it writes, through a VBD and over NBD
to qemu-img and nbdsh. The library's Chain (docs/encryption.md) is the second witness."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import random
from pathlib import Path

import pytest

from blktap.errors import BlktapError, EncryptionError
from blktap.image import Chain
from blktap.image.crypto import XtsCipher, key_file_name, key_hash
from blktap.image.vhd import VhdImage, create, snapshot
from blktap.image.vhd import check as vhd_check
from blktap.image.vhd.keyhash import KeyHash, write_keyhash
from blktap.io import ThreadEngine
from blktap.tapdisk.driver import STATE_DATA, STATE_ZERO
from blktap.tapdisk.drivers import open_stack
from blktap.tapdisk.drivers.vhd import VhdDriver
from blktap.tapdisk.vbd import VBD
from blktap.transport.nbd.server import Export, NbdServer
from conftest import need, run, tool, with_engine

MiB = 1 << 20
SECTOR = 512
BLOCK = 2 * MiB
# AES-XTS keys whose halves differ.
KEY64 = bytes(range(64))
KEY32 = bytes(range(100, 132))
OTHER64 = bytes(range(1, 65))


# ------------------------------------------------------------------------- helpers
arun = with_engine  # a body run with a 4-thread ThreadEngine on a fresh loop


async def open_vbd(engine: ThreadEngine, spec: str, key: bytes | None = None,
                   read_only: bool = False) -> VBD:
    driver = await engine.call(open_stack, engine, spec, writable=not read_only, key=key)
    return VBD(driver, read_only=read_only)


def make_encrypted(path: Path, size: int = 8 * MiB, key: bytes = KEY64,
                   nonce: bytes = bytes(32)) -> Path:
    """An empty dynamic VHD marked encrypted with ``key``, through the library."""
    create(str(path), size)
    with VhdImage.open(str(path), writable=True) as img:
        write_keyhash(img, KeyHash(1, nonce, key_hash(key, nonce)))
    return path


def make_encrypted_cli(folder: Path, name: str, size_mb: int, key: bytes) -> Path:
    """The same with our command-line tools: ``vhd-util create`` then ``key -s -k``."""
    path = folder / name
    proc = run([tool("vhd-util"), "create", "-n", str(path), "-s", str(size_mb)])
    assert proc.returncode == 0, proc.stderr
    kf = folder / key_file_name(str(path), len(key) * 8)
    kf.write_bytes(key)
    proc = run([tool("vhd-util"), "key", "-s", "-n", str(path), "-k", str(kf)])
    assert proc.returncode == 0, proc.stderr
    return path


def chain_read(path: Path, key: bytes | None, offset: int = 0,
               length: int | None = None) -> bytes:
    with Chain.open(f"vhd:{path}", key=key) as chain:
        if length is None:
            length = chain.size - offset
        return bytes(chain.pread(offset, length))


def stored(path: Path, offset: int, length: int) -> bytes:
    """What the leaf file stores for a range of the disk (ciphertext for an encrypted
    layer; holes as zeros)."""
    with Chain.open(f"vhd:{path}", ciphertext=True) as chain:
        return bytes(chain.pread(offset, length))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_ok(path: Path) -> bool:
    return vhd_check.check(str(path)).errno == 0


def pattern(seed: int, length: int) -> bytes:
    # Recognisable and incompressible: a random 4 KiB motif repeated, so that "the
    # plaintext is absent from the file" is a real search, not luck.
    motif = random.Random(seed).randbytes(4096)
    return (motif * (length // 4096 + 1))[:length]


async def vbd_read(vbd: VBD, offset: int, length: int) -> bytes:
    buf = memoryview(bytearray(length))
    await vbd.read(offset, buf)
    return bytes(buf)


# ------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("how", ["cli-aes128", "library-aes256"])
def test_round_trip_plaintext_back_ciphertext_stored(tmp_path: Path, how: str) -> None:
    key = KEY32 if how == "cli-aes128" else KEY64
    if how == "cli-aes128":
        img = make_encrypted_cli(tmp_path, "disk.vhd", 8, key)
    else:
        img = make_encrypted(tmp_path / "disk.vhd", 8 * MiB, key)
    # Aligned writes: one sector, a run across the first block boundary, a large one
    # covering a whole block, and one ending at the last sector of the disk.
    writes = [(7 * SECTOR, pattern(1, SECTOR)),
              (BLOCK - 64 * 1024, pattern(2, 192 * 1024)),
              (BLOCK + 1 * MiB, pattern(3, BLOCK)),
              (8 * MiB - 4096, pattern(4, 4096))]
    model = bytearray(8 * MiB)
    for off, data in writes:
        model[off : off + len(data)] = data

    async def body(engine: ThreadEngine) -> None:
        vbd = await open_vbd(engine, f"vhd:{img}", key=key)
        assert isinstance(vbd.driver, VhdDriver) and vbd.driver.cipher is not None
        for off, data in writes:
            buf = memoryview(bytearray(data))
            await vbd.write(off, buf)
            assert bytes(buf) == data  # the client's buffer is never encrypted in place
        # Read back: whole disk in one request (held runs and holes mixed), then each.
        assert await vbd_read(vbd, 0, 8 * MiB) == model
        for off, data in writes:
            assert await vbd_read(vbd, off, len(data)) == data
        await vbd.close()
    arun(body)

    assert chain_read(img, key) == model  # the library reads the same plaintext
    raw = img.read_bytes()
    for off, data in writes:
        assert data[:4096] not in raw  # ciphertext only in the file
        # Each sector encrypted with its virtual sector number as the IV.
        assert stored(img, off, len(data)) == XtsCipher(key).encrypt(off // SECTOR, data)
    assert check_ok(img)


def test_concurrent_requests_merged_and_scattered(tmp_path: Path) -> None:
    """Many 4 KiB writes in one turn of the loop (merged by the VBD into one driver call
    over several client buffers), then reads that each take their part."""
    img = make_encrypted(tmp_path / "d.vhd")
    chunks = [pattern(100 + i, 4096) for i in range(64)]

    async def body(engine: ThreadEngine) -> None:
        vbd = await open_vbd(engine, str(img), key=KEY64)
        await asyncio.gather(*(vbd.write(3 * MiB + i * 4096, memoryview(bytearray(c)))
                               for i, c in enumerate(chunks)))
        assert vbd.stats.merged > 0
        got = await asyncio.gather(*(vbd_read(vbd, 3 * MiB + i * 4096, 4096)
                                     for i in range(64)))
        assert got == chunks
        await vbd.close()
    arun(body)
    assert chain_read(img, KEY64, 3 * MiB, 64 * 4096) == b"".join(chunks)


def test_buffers_split_inside_a_sector(tmp_path: Path) -> None:
    """A driver may get iovecs whose buffers split a sector: they are gathered, never
    decrypted piecewise (which would be wrong: XTS works on whole sectors)."""
    img = make_encrypted(tmp_path / "d.vhd")
    data = pattern(9, 4 * SECTOR)

    async def body(engine: ThreadEngine) -> None:
        drv = await engine.call(open_stack, engine, str(img), writable=True, key=KEY64)
        src = [memoryview(bytearray(data[:300])), memoryview(bytearray(data[300:1500])),
               memoryview(bytearray(data[1500:]))]
        await drv.write(10 * SECTOR, src)
        assert b"".join(bytes(v) for v in src) == data
        dst = [memoryview(bytearray(700)), memoryview(bytearray(4 * SECTOR - 700))]
        await drv.read(10 * SECTOR, dst)
        assert b"".join(bytes(v) for v in dst) == data
        await drv.close()
    arun(body)
    assert chain_read(img, KEY64, 10 * SECTOR, len(data)) == data


def test_unaligned_writes_read_modify_write(tmp_path: Path) -> None:
    img = make_encrypted(tmp_path / "d.vhd", 4 * MiB)
    rng = random.Random(5)
    model = bytearray(4 * MiB)
    ops = []
    for i in range(40):
        off = rng.randrange(0, 4 * MiB - 9000)
        data = pattern(200 + i, rng.randrange(1, 9000))
        ops.append((off, data))

    async def body(engine: ThreadEngine) -> None:
        vbd = await open_vbd(engine, str(img), key=KEY64)
        # Overlapping unaligned writes issued together: the VBD serialises their RMW.
        await asyncio.gather(*(vbd.write(off, memoryview(bytearray(d))) for off, d in ops))
        for off, d in ops:
            model[off : off + len(d)] = d
        assert await vbd_read(vbd, 0, 4 * MiB) == model
        # Unaligned reads too.
        for off, d in ops[:10]:
            assert await vbd_read(vbd, off + 1, len(d) - 1) == model[off + 1 : off + len(d)]
        await vbd.close()
    arun(body)
    assert chain_read(img, KEY64) == model
    assert check_ok(img)


# ------------------------------------------------------------------------- chains
def test_snapshot_each_layer_decrypts_its_own(tmp_path: Path) -> None:
    base = make_encrypted(tmp_path / "base.vhd", 6 * MiB)
    old = pattern(11, BLOCK)
    with Chain.open(str(base), key=KEY64, writable=True) as chain:
        chain.pwrite(0, old)
    leaf = tmp_path / "leaf.vhd"
    snapshot(str(leaf), str(base))  # inherits the key hash
    new = pattern(12, 64 * SECTOR)
    model = bytearray(6 * MiB)
    model[:BLOCK] = old

    async def body(engine: ThreadEngine) -> None:
        vbd = await open_vbd(engine, f"vhd:{leaf}", key=KEY64)
        drivers = vbd.driver.chain()
        assert [type(d).__name__ for d in drivers] == ["VhdDriver", "VhdDriver"]
        assert all(isinstance(d, VhdDriver) and d.cipher is not None for d in drivers)
        await vbd.write(100 * SECTOR, memoryview(bytearray(new)))
        model[100 * SECTOR : 164 * SECTOR] = new
        # One request over the parent's sectors, the leaf's, the parent's again, and
        # the holes of the second block.
        assert await vbd_read(vbd, 0, 3 * MiB) == model[: 3 * MiB]
        await vbd.close()
    arun(body)
    assert chain_read(leaf, KEY64) == model
    assert new[:4096] not in leaf.read_bytes()
    assert stored(leaf, 100 * SECTOR, len(new)) == XtsCipher(KEY64).encrypt(100, new)


def test_raw_parent_is_read_as_stored(tmp_path: Path) -> None:
    raw = tmp_path / "base.img"
    clear = pattern(21, 4 * MiB)
    raw.write_bytes(clear)
    leaf = tmp_path / "leaf.vhd"
    snapshot(str(leaf), str(raw), raw_parent=True)
    with VhdImage.open(str(leaf), writable=True) as img:
        write_keyhash(img, KeyHash(1, bytes(32), key_hash(KEY32)))
    new = pattern(22, 8 * SECTOR)
    model = bytearray(clear)
    model[MiB : MiB + len(new)] = new

    async def body(engine: ThreadEngine) -> None:
        vbd = await open_vbd(engine, f"vhd:{leaf}", key=KEY32)
        leaf_drv, raw_drv = vbd.driver.chain()
        assert isinstance(leaf_drv, VhdDriver) and leaf_drv.cipher is not None
        assert raw_drv.name == "aio"
        await vbd.write(MiB, memoryview(bytearray(new)))
        assert await vbd_read(vbd, 0, 4 * MiB) == model
        await vbd.close()
    arun(body)
    assert chain_read(leaf, KEY32) == model
    assert raw.read_bytes() == clear
    assert new not in leaf.read_bytes()


# ------------------------------------------------------------------------- refusals
def test_refusals_with_their_errnos(tmp_path: Path) -> None:
    enc = make_encrypted(tmp_path / "enc.vhd")
    clear = tmp_path / "clear.vhd"
    create(str(clear), 4 * MiB)
    raw = tmp_path / "raw.img"
    raw.write_bytes(bytes(MiB))
    before = {p: digest(p) for p in (enc, clear, raw)}
    cases = [
        (f"vhd:{enc}", OTHER64, errno.ENOKEY, "hash"),
        (f"vhd:{enc}", KEY32, errno.ENOKEY, "hash"),
        (str(enc), None, errno.EINVAL, "key"),
        (f"vhd:{clear}", KEY64, errno.EINVAL, "not encrypted"),
        (f"aio:{raw}", KEY64, errno.EINVAL, "aio driver"),
        (str(raw), KEY64, errno.EINVAL, "aio driver"),
        (f"aio:{enc}", KEY64, errno.EINVAL, "aio driver"),
        ("ram:4", KEY64, errno.EINVAL, "ram driver"),
        (f"vhd:{enc}", bytes(64), errno.EINVAL, "halves"),
        (f"vhd:{enc}", b"short", errno.EINVAL, "32 or 64"),
    ]

    async def body(engine: ThreadEngine) -> None:
        for spec, key, code, words in cases:
            with pytest.raises(EncryptionError) as exc:
                await engine.call(open_stack, engine, spec, writable=True, key=key)
            assert exc.value.errno == code, (spec, key)
            assert words in str(exc.value), (spec, str(exc.value))
    arun(body)
    assert {p: digest(p) for p in before} == before
    # The wrong key is caught on a parent too, not only on the leaf.
    other = make_encrypted(tmp_path / "other.vhd", key=OTHER64)
    leaf = tmp_path / "leaf.vhd"
    snapshot(str(leaf), str(other))
    with VhdImage.open(str(leaf), writable=True) as img:  # relabel the leaf only
        write_keyhash(img, KeyHash(1, bytes(32), key_hash(KEY64)))

    async def parent(engine: ThreadEngine) -> None:
        with pytest.raises(EncryptionError) as exc:
            await engine.call(open_stack, engine, f"vhd:{leaf}", writable=True,
                              key=KEY64)
        assert exc.value.errno == errno.ENOKEY
        assert str(other) in str(exc.value)
    arun(parent)


# ------------------------------------------------------------------------- zeroing
def test_write_zeroes_stores_encrypted_zeros_or_leaves_holes(tmp_path: Path) -> None:
    img = make_encrypted(tmp_path / "d.vhd", 6 * MiB)
    data = pattern(31, BLOCK)

    async def body(engine: ThreadEngine) -> None:
        vbd = await open_vbd(engine, str(img), key=KEY64)
        await vbd.write(0, memoryview(bytearray(data)))
        # Held sectors: trimming allowed or not, they must read as zeros afterwards.
        await vbd.write_zeroes(4096, 8192, may_trim=True)
        await vbd.write_zeroes(64 * 1024, 3 * 4096, may_trim=False)
        # Unaligned ends go through the write path.
        await vbd.write_zeroes(MiB + 100, 1000)
        # A fast request over held sectors cannot be fast: refused, nothing changed.
        with pytest.raises(BlktapError) as exc:
            await vbd.write_zeroes(BLOCK - 4096, 4096, fast=True)
        assert exc.value.errno == errno.EOPNOTSUPP
        # Unheld sectors with nothing below: left unallocated (fast is fine there).
        await vbd.write_zeroes(BLOCK, BLOCK, fast=True)
        # Unheld, may not trim: allocated, holding encrypted zeros.
        await vbd.write_zeroes(2 * BLOCK, 8192, may_trim=False)
        status = await vbd.block_status(BLOCK, BLOCK)
        assert status == [(BLOCK, STATE_ZERO | 1)]
        assert (await vbd.block_status(2 * BLOCK, 8192))[0][1] == STATE_DATA
        await vbd.close()
    arun(body)
    model = bytearray(6 * MiB)
    model[:BLOCK] = data
    model[4096 : 4096 + 8192] = bytes(8192)
    model[64 * 1024 : 64 * 1024 + 3 * 4096] = bytes(3 * 4096)
    model[MiB + 100 : MiB + 1100] = bytes(1000)
    assert chain_read(img, KEY64) == model
    cipher = XtsCipher(KEY64)
    # The file holds the encryption of zeros, not zeros (which would decrypt to noise).
    assert stored(img, 4096, 8192) == cipher.encrypt(8, bytes(8192))
    assert stored(img, 2 * BLOCK, 8192) == cipher.encrypt(2 * BLOCK // SECTOR, bytes(8192))
    with Chain.open(str(img), key=KEY64) as chain:
        depths = {(e.offset, e.length): e.depth for e in chain.map()}
    assert depths[(BLOCK, BLOCK)] is None  # still a hole
    assert check_ok(img)


def test_write_zeroes_over_a_parent_allocates_encrypted_zeros(tmp_path: Path) -> None:
    base = make_encrypted(tmp_path / "base.vhd", 4 * MiB)
    with Chain.open(str(base), key=KEY64, writable=True) as chain:
        chain.pwrite(0, pattern(41, MiB))
    leaf = tmp_path / "leaf.vhd"
    snapshot(str(leaf), str(base))

    async def body(engine: ThreadEngine) -> None:
        vbd = await open_vbd(engine, f"vhd:{leaf}", key=KEY64)
        await vbd.write_zeroes(4096, 64 * 1024)  # the parent is not zero there
        await vbd.write_zeroes(2 * MiB, 4096)  # the parent is a hole there: no-op
        await vbd.close()
    arun(body)
    model = bytearray(pattern(41, MiB)) + bytearray(3 * MiB)
    model[4096 : 4096 + 64 * 1024] = bytes(64 * 1024)
    assert chain_read(leaf, KEY64) == model
    assert stored(leaf, 4096, 64 * 1024) == XtsCipher(KEY64).encrypt(8, bytes(64 * 1024))
    with Chain.open(f"vhd:{leaf}", key=KEY64) as chain:
        assert {e.depth for e in chain.map(2 * MiB // SECTOR, 8)} == {None}


def test_discard_leaves_the_rest_intact(tmp_path: Path) -> None:
    """TRIM keeps its meaning (the range is undefined after it); around it, data stays."""
    img = make_encrypted(tmp_path / "d.vhd", 4 * MiB)
    data = pattern(51, MiB)

    async def body(engine: ThreadEngine) -> None:
        vbd = await open_vbd(engine, str(img), key=KEY64)
        await vbd.write(0, memoryview(bytearray(data)))
        await vbd.discard(64 * 1024, 64 * 1024)
        assert await vbd_read(vbd, 0, 64 * 1024) == data[: 64 * 1024]
        assert await vbd_read(vbd, 128 * 1024, MiB - 128 * 1024) == data[128 * 1024 :]
        await vbd.close()
    arun(body)
    assert check_ok(img)


# ------------------------------------------------------------------------- NBD peers
def test_served_over_nbd_to_qemu_img_and_nbdsh(tmp_path: Path) -> None:
    qemu_img = need("qemu-img")
    nbdsh = need("nbdsh")
    base = make_encrypted(tmp_path / "base.vhd", 4 * MiB)
    first = pattern(61, 3 * MiB)
    with Chain.open(str(base), key=KEY64, writable=True) as chain:
        chain.pwrite(512 * 1024, first)
    leaf = tmp_path / "leaf.vhd"
    snapshot(str(leaf), str(base))
    model = bytearray(4 * MiB)
    model[512 * 1024 : 512 * 1024 + len(first)] = first
    sock = tmp_path / "s.sock"
    out = tmp_path / "out.raw"
    nbd_write = pattern(62, 8192)
    script = (
        "h = nbd.NBD()\n"
        f"h.connect_uri({f'nbd+unix:///?socket={sock}'!r})\n"
        f"h.pwrite(bytes.fromhex({nbd_write.hex()!r}), 1000000)\n"
        "h.flush()\n"
        "print(h.pread(8192, 1000000).hex())\n"
        "h.shutdown()\n")

    async def sub(*argv: str, env: dict[str, str] | None = None) -> str:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
        so, se = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, se.decode()
        return so.decode()

    async def body(engine: ThreadEngine) -> None:
        vbd = await open_vbd(engine, f"vhd:{leaf}", key=KEY64)
        server = NbdServer(Export("", vbd))
        server.listen_unix(str(sock))
        try:
            uri = f"nbd+unix:///?socket={sock}"
            await sub(qemu_img, "convert", "-f", "raw", "-O", "raw", uri, str(out))
            assert out.read_bytes() == model
            env = {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}
            got = await sub(nbdsh, "-c", script, env=env)
            assert bytes.fromhex(got.strip()) == nbd_write
        finally:
            await server.stop()
            await vbd.close()
    arun(body)
    model[1000000 : 1000000 + len(nbd_write)] = nbd_write
    assert chain_read(leaf, KEY64) == model
    assert nbd_write not in leaf.read_bytes()
    assert check_ok(leaf)
