"""``blktap serve`` against real NBD clients: qemu-img, qemu-io, libnbd's nbdinfo,
nbdcopy and nbdsh, and fio's nbd engine."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from blktap.image import Chain
from blktap.image.vhd import check as vhd_check
from blktap.image.vhd.create import create as create_vhd
from blktap.image.vhd.create import snapshot as snapshot_vhd
from conftest import named, need, run, tool
from nbd_helpers import serve

MiB = 1 << 20


def ok(argv: list[str], **kw: object) -> str:
    res = run(argv, text=True, **kw)
    assert res.returncode == 0, f"{argv}: rc={res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


def make_chain(folder: Path) -> tuple[Path, bytes]:
    """base.vhd (data at 0 and 10 MiB) <- leaf.vhd (data at 4 KiB and 12 MiB); 32 MiB."""
    base, leaf = folder / "base.vhd", folder / "leaf.vhd"
    create_vhd(str(base), 32 * MiB)
    with Chain.open(named(base), writable=True) as disk:
        disk.pwrite(0, b"b" * 65536)
        disk.pwrite(10 * MiB, b"B" * 3 * MiB)
    snapshot_vhd(str(leaf), str(base))
    with Chain.open(named(leaf), writable=True) as disk:
        disk.pwrite(4096, b"l" * 8192)
        disk.pwrite(12 * MiB, b"L" * MiB)
        content = bytes(disk.read(0, 32 * MiB // 512))
    return leaf, content


def data_runs(path: Path) -> list[tuple[int, int]]:
    """Where some layer of the chain holds data, neighbouring runs joined."""
    out: list[tuple[int, int]] = []
    with Chain.open(named(path)) as disk:
        for e in disk.map():
            if e.depth is None:
                continue
            if out and out[-1][0] + out[-1][1] == e.offset:
                out[-1] = (out[-1][0], out[-1][1] + e.length)
            else:
                out.append((e.offset, e.length))
    return out


def nbdsh_env() -> dict[str, str]:
    """nbdsh runs the first python3 on PATH; the libnbd bindings live in the system's."""
    return {**os.environ, "PATH": "/usr/bin:" + os.environ.get("PATH", "")}


def check_ok(path: Path) -> bool:
    return vhd_check.check(str(path)).errno == 0


def chain_bytes(path: Path) -> bytes:
    with Chain.open(named(path)) as disk:
        return bytes(disk.read(0, disk.sectors))


def test_qemu_img_info_map_convert_compare(tmp_path: Path) -> None:
    need("qemu-img")
    leaf, content = make_chain(tmp_path)
    with serve(f"vhd:{leaf}", tmp_path, "--read-only") as srv:
        info = json.loads(ok(["qemu-img", "info", "--output=json", srv.uri]))
        assert info["virtual-size"] == 32 * MiB
        extents = json.loads(ok(["qemu-img", "map", "--output=json", srv.uri]))
        data = [(e["start"], e["length"]) for e in extents if e["data"]]
        assert data == data_runs(leaf)
        assert all(e["zero"] for e in extents if not e["data"])
        out = tmp_path / "copy.raw"
        ok(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri, str(out)])
        assert out.read_bytes() == content
        ok(["qemu-img", "compare", "-f", "raw", "-F", "raw", srv.uri, str(out)])
        other = tmp_path / "other.raw"
        other.write_bytes(content[:-1] + b"x")
        res = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", srv.uri, str(other)])
        assert res.returncode == 1
    assert check_ok(leaf)


def test_qemu_io_writes_land_in_the_chain(tmp_path: Path) -> None:
    """What qemu-io writes through the server into a differencing VHD reads back the same
    through the library, vhd-util and a fresh server."""
    need("qemu-io")
    leaf, content = make_chain(tmp_path)
    expect = bytearray(content)
    cmds = [
        ("write -P 0x5a 1M 64k", 1 * MiB, b"\x5a" * 65536),
        ("write -P 0x33 10M 4k", 10 * MiB, b"\x33" * 4096),      # over the parent's data
        ("write -P 0x44 1000 3000", 1000, b"\x44" * 3000),       # unaligned
        ("write -z 10752k 64k", 10752 * 1024, bytes(65536)),     # zeroes over parent data
        ("write -z -u 12M 128k", 12 * MiB, bytes(128 * 1024)),   # zeroes, may unmap
        ("aio_write -P 0x66 20M 1M", 20 * MiB, b"\x66" * MiB),
        ("aio_write -P 0x67 21M 1M", 21 * MiB, b"\x67" * MiB),
        ("aio_flush", 0, b""),
        ("write -f -P 0x77 30M 4k", 30 * MiB, b"\x77" * 4096),   # FUA
    ]
    with serve(f"vhd:{leaf}", tmp_path) as srv:
        argv = ["qemu-io", "-f", "raw"]
        for cmd, off, data in cmds:
            argv += ["-c", cmd]
            expect[off : off + len(data)] = data
        argv += ["-c", "discard 24M 1M", "-c", "flush", srv.uri]
        out = ok(argv)
        assert "error" not in out.lower() and "failed" not in out.lower()
        expect[24 * MiB : 25 * MiB] = bytes(MiB)  # our discard punches: reads as zeros
        ok(["qemu-io", "-f", "raw", "-c", "read -P 0x5a 1M 64k", "-c", "read -P 0x44 1000 3000",
            "-c", "read -P 0 10752k 64k", "-c", "read -P 0x66 20M 1M", srv.uri])
        assert srv.stop() == 0
    got = chain_bytes(leaf)
    assert got[24 * MiB : 25 * MiB] in (bytes(MiB), content[24 * MiB : 25 * MiB])
    expect[24 * MiB : 25 * MiB] = got[24 * MiB : 25 * MiB]
    assert got == bytes(expect)
    assert check_ok(leaf) and check_ok(tmp_path / "base.vhd")
    res = run([tool("vhd-util"), "check", "-n", str(leaf)], text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    with serve(f"vhd:{leaf}", tmp_path, "--read-only", name="again.sock") as srv:
        ok(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x77 30M 4k",
            "-c", "read -P 0x33 10M 4k", "-c", "read -P 0x67 21M 1M", srv.uri])
        copy = tmp_path / "again.raw"
        ok(["nbdcopy", srv.uri, str(copy)]) if need("nbdcopy") else None
        assert copy.read_bytes() == bytes(expect)


def test_nbdinfo_list_map_and_can(tmp_path: Path) -> None:
    need("nbdinfo")
    leaf, _ = make_chain(tmp_path)
    with serve(f"vhd:{leaf}", tmp_path, "--export-name", "disk0") as srv:
        listing = ok(["nbdinfo", "--list", "--json", srv.uri])
        exports = json.loads(listing)["exports"]
        assert [e["export-name"] for e in exports] == ["disk0"]
        assert exports[0]["export-size"] == 32 * MiB
        assert exports[0]["block_size_maximum"] == 32 * MiB
        for can in ("write", "flush", "fua", "trim", "zero", "fast-zero", "multi-conn",
                    "cache", "df"):
            res = run(["nbdinfo", f"--can={can}", srv.uri])
            assert res.returncode == 0, f"--can={can}: {res.returncode}"
        assert run(["nbdinfo", "--is=read-only", srv.uri]).returncode == 2
        mapped = ok(["nbdinfo", "--map", srv.uri])
        rows = [line.split() for line in mapped.splitlines()]
        holes = [(int(r[0]), int(r[1])) for r in rows if r[2] == "3"]
        data = [(int(r[0]), int(r[1])) for r in rows if r[2] == "0"]
        assert data == data_runs(leaf) and holes  # holes say HOLE|ZERO (3), not HOLE alone
    with serve(f"vhd:{leaf}", tmp_path, "--read-only", name="ro.sock") as srv:
        assert run(["nbdinfo", "--is=read-only", srv.uri]).returncode == 0
        assert run(["nbdinfo", "--can=write", srv.uri]).returncode == 2


def test_nbdcopy_both_ways(tmp_path: Path) -> None:
    need("nbdcopy")
    src = tmp_path / "src.raw"
    data = bytearray(os.urandom(24 * MiB))
    data[4 * MiB : 12 * MiB] = bytes(8 * MiB)  # a run of zeros to skip
    src.write_bytes(data)
    target = tmp_path / "t.vhd"
    create_vhd(str(target), 24 * MiB)
    with serve(f"vhd:{target}", tmp_path) as srv:
        ok(["nbdcopy", "--flush", "-C", "4", str(src), srv.uri])
        back = tmp_path / "back.raw"
        ok(["nbdcopy", srv.uri, str(back)])
        assert back.read_bytes() == bytes(data)
    assert check_ok(target) and chain_bytes(target) == bytes(data)


@pytest.mark.slow
def test_reference_fixtures_read_through_the_server(reference_dir: Path, tmp_path: Path) -> None:
    """Every reference image hashes, through our server, to what the reference tapdisk
    served."""
    need("nbdcopy")
    names = sorted(p.stem for p in (reference_dir / "expect").glob("*.sha256"))
    assert len(names) >= 10
    for name in names:
        image = next(reference_dir.glob(f"{name}.*"))
        want = (reference_dir / "expect" / f"{name}.sha256").read_text().split()[0]
        with serve(named(image), tmp_path, "--read-only", name=f"{name}.sock") as srv:
            res = subprocess.run(["nbdcopy", srv.uri, "-"], capture_output=True, timeout=120)
            assert res.returncode == 0, res.stderr
            assert hashlib.sha256(res.stdout).hexdigest() == want, name


def test_nbdsh_corners(tmp_path: Path) -> None:
    """libnbd against the protocol corners: block status with REQ_ONE, fast zero, cache,
    a read past the end, a write to a read-only export, out-of-order completion."""
    nbdsh = need("nbdsh")
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4 * MiB))
    script = r"""
import errno
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
size = h.get_size()
assert size == 4 << 20
h.pwrite(b"x" * 65536, 0)
seen = []
def cb(meta, off, entries, err):
    seen.append(entries)
h.block_status(size, 0, cb, nbd.CMD_FLAG_REQ_ONE)
assert len(seen[-1]) == 2 and seen[-1][0] <= size, seen
h.zero(65536, 1 << 20, nbd.CMD_FLAG_FAST_ZERO)
h.cache(4096, 0)
# Let the bad requests reach the server instead of libnbd refusing them itself.
h.set_strict_mode(0)
for bad, want in ((lambda: h.pread(4096, size - 100), errno.EINVAL),
                  (lambda: h.pwrite(b"z" * 4096, size - 100), errno.ENOSPC),
                  (lambda: h.pread(33 << 20, 0), errno.EINVAL)):
    try:
        bad()
        raise SystemExit("a bad request succeeded")
    except nbd.Error as e:
        assert e.errnum == want, (e.errnum, e)
# Many reads in flight, completed in whatever order the server answers.
bufs = [nbd.Buffer(4096) for _ in range(64)]
cookies = [h.aio_pread(b, i * 4096) for i, b in enumerate(bufs)]
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    assert h.aio_command_completed(c)
assert bufs[0].to_bytearray() == b"x" * 4096
h.shutdown()
print("ok")
"""
    with serve(f"aio:{img}", tmp_path) as srv:
        res = run([nbdsh, "-c", f"uri = {srv.uri!r}", "-c", script], text=True,
                  env=nbdsh_env())
        assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr
    ro = """
import errno
h.connect_uri(uri)
h.set_strict_mode(0)  # so that the server, not libnbd, refuses the write
try:
    h.pwrite(b"y" * 512, 0)
    raise SystemExit("write to a read-only export succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EPERM, e
print("ok")
"""
    with serve(f"aio:{img}", tmp_path, "--read-only", name="ro.sock") as srv:
        res = run([nbdsh, "-c", f"uri = {srv.uri!r}", "-c", ro], text=True, env=nbdsh_env())
        assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


def test_fio_random_writes_verify(tmp_path: Path) -> None:
    fio = need("fio")
    target = tmp_path / "fio.vhd"
    create_vhd(str(target), 64 * MiB)
    with serve(f"vhd:{target}", tmp_path) as srv:
        res = run([fio, "--name=v", "--ioengine=nbd", f"--uri={srv.uri}", "--rw=randwrite",
                   "--bs=4k", "--iodepth=16", "--size=16M", "--verify=crc32c",
                   "--do_verify=1", "--verify_fatal=1", "--randrepeat=1", "--verify_state_save=0",
                   "--output-format=json"],
                  text=True, timeout=300, cwd=tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        job = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
        assert job["error"] == 0 and job["write"]["io_bytes"] == 16 * MiB
    assert check_ok(target)


def test_nbdsh_zeroes_no_hole_fast_zero_and_multi_conn(tmp_path: Path) -> None:
    """WRITE_ZEROES as libnbd sends it: NO_HOLE keeps the range allocated, plain zeroing
    punches it; FAST_ZERO is refused (ENOTSUP, data unchanged) where only writing zeros
    would do (tmpfs cannot zero a range in place; a chain's parent holds the data), and
    works where a hole does. Two connections see each other's writes (multi-conn)."""
    nbdsh = need("nbdsh")
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    script = r"""
import errno
h.connect_uri(uri)
def refused(length, offset, flags):
    try:
        h.zero(length, offset, flags)
    except nbd.Error as e:
        assert e.errnum == errno.ENOTSUP, e
        return
    raise SystemExit("a slow FAST_ZERO succeeded")
""" + "\n"
    ext4 = tmp_path / "d.img"
    ext4.write_bytes(b"x" * (2 * MiB))
    with serve(f"aio:{ext4}", tmp_path, name="a.sock") as srv:
        res = run([nbdsh, "-c", f"uri = {srv.uri!r}", "-c", script + r"""
h.zero(512 << 10, 0, nbd.CMD_FLAG_NO_HOLE)
h.zero(512 << 10, 512 << 10)
assert h.pread(1 << 20, 0) == bytes(1 << 20)
assert h.pread(4096, 1 << 20) == b"x" * 4096
# multi-conn: a second connection sees what the first wrote and may flush it.
h2 = nbd.NBD()
h2.connect_uri(uri)
assert h.can_multi_conn() and h2.can_multi_conn()
h.pwrite(b"m" * 4096, 8192)
assert h2.pread(4096, 8192) == b"m" * 4096
h2.flush()
h2.zero(4096, 8192)
assert h.pread(4096, 8192) == bytes(4096)
h2.shutdown()
h.shutdown()
print("ok")
"""], text=True, env=nbdsh_env())
        assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr
    # The NO_HOLE half stays allocated (zero-range leaves unwritten extents, which
    # SEEK_DATA calls holes: count blocks instead), the plain half is punched out.
    allocated = os.stat(ext4).st_blocks * 512
    assert 1 * MiB + 256 * 1024 < allocated <= 2 * MiB - 512 * 1024, allocated

    shm = Path("/dev/shm") / f"blktap-test-zero-{os.getpid()}"
    shm.write_bytes(b"y" * MiB)
    try:
        with serve(f"aio:{shm}", tmp_path, name="s.sock") as srv:
            res = run([nbdsh, "-c", f"uri = {srv.uri!r}", "-c", script + r"""
refused(65536, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
assert h.pread(65536, 0) == b"y" * 65536
h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(65536, 0) == bytes(65536)
h.shutdown()
print("ok")
"""], text=True, env=nbdsh_env())
            assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr
        assert shm.read_bytes() == bytes(65536) + b"y" * (MiB - 65536)
    finally:
        shm.unlink()

    leaf, content = make_chain(tmp_path)
    with serve(f"vhd:{leaf}", tmp_path, name="v.sock") as srv:
        res = run([nbdsh, "-c", f"uri = {srv.uri!r}", "-c", script + r"""
refused(1 << 20, 10 << 20, nbd.CMD_FLAG_FAST_ZERO)
h.shutdown()
print("ok")
"""], text=True, env=nbdsh_env())
        assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr
    assert chain_bytes(leaf) == content
    assert check_ok(leaf)
