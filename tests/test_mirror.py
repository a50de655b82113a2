"""The secondary of a VBD (``tap-ctl open/create/unpause -2 TYPE:PATH [-s]``), with local
secondaries (``aio:``/``vhd:`` files): writes reach both, reads come from the leaf,
``unpause -2`` adds one and ``-2 null`` removes it, ENOSPC on the leaf (a small tmpfs the
test mounts) in mirror and standby mode, and a secondary that fails: the guest's writes
succeed, the failure shows in ``tap-ctl stats`` and in the log."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import need, run, tool
from test_tap_ctl_daemon import Host

MiB = 1 << 20
KiB = 1 << 10
SIZE = 8 * MiB


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    h = Host(tmp_path)
    yield h
    for entry in (h.listing() if h.run_dir.exists() else []):
        if "pid" in entry and "minor" in entry:
            h.tap_ctl("destroy", "-p", entry["pid"], "-m", entry["minor"], ok=False)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr}")
    try:
        yield mnt
    finally:
        if run(["umount", str(mnt)]).returncode:
            run(["umount", "-l", str(mnt)])


def sparse(path: Path, size: int = SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def filled(path: Path, byte: int, size: int = SIZE) -> Path:
    path.write_bytes(bytes([byte]) * size)
    return path


def qemu_io(uri: str, *cmds: str) -> None:
    argv = [need("qemu-io"), "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    res = run([*argv, uri], text=True)
    assert res.returncode == 0 and "failed" not in res.stdout, (res.stdout, res.stderr)


def read_disk(uri: str, tmp: Path) -> bytes:
    out = tmp / "readback.raw"
    res = run([need("nbdcopy"), uri, str(out)], text=True)
    assert res.returncode == 0, res.stderr
    data = out.read_bytes()
    out.unlink()
    return data


def stats(host: Host, pid: int, minor: int) -> dict:
    return json.loads(host.out("stats", "-p", str(pid), "-m", str(minor)))


def tapdisk_log(host: Host, pid: int) -> str:
    path = host.log_dir / f"tapdisk.{pid}.log"
    return path.read_text() if path.exists() else ""


def test_mirror_writes_both_reads_leaf(host: Host, tmp_path: Path) -> None:
    leaf = filled(tmp_path / "leaf.img", 0x11)
    sec = filled(tmp_path / "sec.img", 0x22)
    pid, minor = host.create(f"aio:{leaf}", "-2", f"aio:{sec}")
    uri = host.nbd(pid, minor)
    qemu_io(uri, "write -P 0xa1 64k 128k", "write -P 0xa2 3M 4k", "flush",
            "read -P 0x11 0 64k")  # reads come from the leaf, not the secondary
    lb, sb = leaf.read_bytes(), sec.read_bytes()
    for data in (lb, sb):
        assert data[64 * KiB:192 * KiB] == b"\xa1" * 128 * KiB
        assert data[3 * MiB:3 * MiB + 4 * KiB] == b"\xa2" * 4 * KiB
    assert lb[:64 * KiB] == b"\x11" * 64 * KiB and sb[:64 * KiB] == b"\x22" * 64 * KiB
    st = stats(host, pid, minor)
    assert st["nbd_mirror_failed"] == 0 and st["FIXME_enospc_redirect_count"] == 0
    assert st["mirror"]["state"] == "active" and st["mirror"]["mode"] == "mirror"
    assert st["mirror"]["secs"][1] == (128 + 4) * 2
    assert [i["name"] for i in st["images"]] == [str(leaf)]
    assert st["images"][0]["hits"][1] == (128 + 4) * 2


def test_vhd_secondary_and_discard_zeroes(host: Host, tmp_path: Path) -> None:
    """A dynamic VHD secondary; write-zeroes mirrored; a qemu-img compare of both ends."""
    leaf = tmp_path / "leaf.vhd"
    sec = tmp_path / "sec.vhd"
    for p in (leaf, sec):
        assert run([tool("blktap"), "create", str(p), "8M"]).returncode == 0
    pid, minor = host.create(f"vhd:{leaf}", "-2", f"vhd:{sec}")
    uri = host.nbd(pid, minor)
    qemu_io(uri, "write -P 0x5a 0 3M", "write -z 1M 512k", "write -P 0x33 7M 1M", "flush")
    host.out("destroy", "-p", str(pid), "-m", str(minor))
    res = run([need("qemu-img"), "compare", "-f", "vpc", "-F", "vpc", str(leaf), str(sec)],
              text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_unpause_adds_and_null_removes(host: Host, tmp_path: Path) -> None:
    leaf = sparse(tmp_path / "leaf.img")
    sec = sparse(tmp_path / "sec.img")
    pid, minor = host.create(f"aio:{leaf}")
    p, m = str(pid), str(minor)
    uri = host.nbd(pid, minor)
    qemu_io(uri, "write -P 0x01 0 64k")
    assert "mirror" not in stats(host, pid, minor)
    host.out("pause", "-p", p, "-m", m)
    host.out("unpause", "-p", p, "-m", m, "-2", f"aio:{sec}")
    qemu_io(uri, "write -P 0x02 1M 64k")
    assert stats(host, pid, minor)["mirror"]["secondary"] == f"aio:{sec}"
    # A pause and a plain unpause keep the secondary.
    host.out("pause", "-p", p, "-m", m)
    host.out("unpause", "-p", p, "-m", m)
    qemu_io(uri, "write -P 0x03 2M 64k")
    host.out("pause", "-p", p, "-m", m)
    host.out("unpause", "-p", p, "-m", m, "-2", "null")
    qemu_io(uri, "write -P 0x04 3M 64k")
    assert "mirror" not in stats(host, pid, minor)
    sb = sec.read_bytes()
    assert sb[:64 * KiB] == bytes(64 * KiB)  # before the mirror: not copied (blktap copy does)
    assert sb[1 * MiB:1 * MiB + 64 * KiB] == b"\x02" * 64 * KiB
    assert sb[2 * MiB:2 * MiB + 64 * KiB] == b"\x03" * 64 * KiB
    assert sb[3 * MiB:3 * MiB + 64 * KiB] == bytes(64 * KiB)  # after -2 null
    assert leaf.read_bytes()[3 * MiB:3 * MiB + 64 * KiB] == b"\x04" * 64 * KiB


def test_bad_secondaries_are_refused(host: Host, tmp_path: Path) -> None:
    """Clear errors; nothing half-opened; a paused disk stays paused and a plain unpause
    still serves it."""
    leaf = sparse(tmp_path / "leaf.img")
    small = sparse(tmp_path / "small.img", 4 * MiB)
    pid = host.out("spawn").strip()
    minor = host.out("allocate").strip().rsplit("-", 1)[1]
    host.out("attach", "-p", pid, "-m", minor)
    base = ["open", "-p", pid, "-m", minor, "-a", f"aio:{leaf}"]
    cases = [
        (["-2", str(small)], errno.EINVAL),  # no type
        (["-2", f"aio:{small}"], errno.EINVAL),  # another size
        (["-2", f"aio:{tmp_path}/missing.img"], errno.ENOENT),
        (["-2", f"vmdk:{small}"], errno.ENOSYS),
        (["-s"], errno.EINVAL),  # standby without a secondary
        (["-R", "-2", f"aio:{small}"], errno.EINVAL),
        (["-2", f"aio:{leaf}"], errno.EINVAL),  # the leaf itself
        (["-2", f"aio:{tmp_path / 'link.img'}"], errno.EINVAL),  # the leaf by another name
        (["-2", "nbd:"], errno.EINVAL),
    ]
    os.symlink(leaf, tmp_path / "link.img")
    for extra, code in cases:
        got, _, err = host.tap_ctl(*base, *extra, ok=False)
        assert got == code, (extra, got, err)
        assert err == os.strerror(code) + "\n"
    host.out(*base)
    p, m = pid, minor
    host.out("pause", "-p", p, "-m", m)
    got, _, _ = host.tap_ctl("unpause", "-p", p, "-m", m, "-2", f"aio:{small}", ok=False)
    assert got == errno.EINVAL
    # Its own NBD export: every mirrored write would come back to be mirrored again.
    own = f"nbd:{host.run_dir}/nbd{pid}.{minor}"
    got, _, err = host.tap_ctl("unpause", "-p", p, "-m", m, "-2", own, ok=False)
    assert got == errno.EINVAL, err
    assert host.listing()[0]["state"].startswith("0x2")  # still paused
    host.out("unpause", "-p", p, "-m", m)
    qemu_io(host.nbd(int(pid), int(minor)), "write -P 0x07 0 4k")
    assert "mirror" not in stats(host, int(pid), int(minor))


def test_failing_secondary_is_reported(host: Host, tmp_path: Path, small_fs: Path) -> None:
    """A secondary that fails (here: out of space) stops the mirror; the guest's writes
    still succeed on the leaf, and stats and the log say so."""
    leaf = sparse(tmp_path / "leaf.img")
    sec = sparse(small_fs / "sec.img")
    pid, minor = host.create(f"aio:{leaf}", "-D", "-2", f"aio:{sec}")
    uri = host.nbd(pid, minor)
    qemu_io(uri, "write -P 0x61 0 1M", "write -P 0x62 1M 3M", "write -P 0x63 4M 1M",
            "flush")
    assert read_disk(uri, tmp_path)[:5 * MiB] == (b"\x61" * MiB + b"\x62" * 3 * MiB
                                                 + b"\x63" * MiB)
    st = stats(host, pid, minor)
    assert st["nbd_mirror_failed"] == 1
    assert st["mirror"]["state"] == "failed"
    assert "No space left" in st["mirror"]["error"] and st["mirror"]["failed_at"]
    # The background copy of a migration asks, and fails.
    copy = run([tool("blktap"), "copy", f"aio:{leaf}", f"aio:{sparse(tmp_path / 'c.img')}",
                "--no-direct", "--check-mirror", f"{pid}:{minor}"], env=host.env, text=True)
    assert copy.returncode == errno.EIO and "is failed: write of" in copy.stderr, copy.stderr
    # Not written again, even after a pause and a plain unpause (it missed writes).
    p, m = str(pid), str(minor)
    host.out("pause", "-p", p, "-m", m)
    host.out("unpause", "-p", p, "-m", m)
    assert stats(host, pid, minor)["nbd_mirror_failed"] == 1
    # A new secondary clears it.
    sec2 = sparse(tmp_path / "sec2.img")
    host.out("pause", "-p", p, "-m", m)
    host.out("unpause", "-p", p, "-m", m, "-2", f"aio:{sec2}")
    qemu_io(uri, "write -P 0x64 6M 64k")
    st = stats(host, pid, minor)
    assert st["nbd_mirror_failed"] == 0 and st["mirror"]["state"] == "active"
    assert sec2.read_bytes()[6 * MiB:6 * MiB + 64 * KiB] == b"\x64" * 64 * KiB
    host.out("destroy", "-p", p, "-m", m)
    # The failure made the log worth keeping, and it says what failed.
    assert f"secondary aio:{sec} failed" in tapdisk_log(host, pid)


@pytest.mark.parametrize("standby", [False, True], ids=["mirror", "standby"])
def test_leaf_enospc(host: Host, tmp_path: Path, small_fs: Path, standby: bool) -> None:
    """The leaf (a sparse 8 MiB file on a 2 MiB tmpfs) runs out of space: every write
    still succeeds, the disk reads what was written, the marker file is touched, the
    redirect count grows; across a pause and resume too."""
    leaf = sparse(small_fs / "leaf.img")
    sec = sparse(tmp_path / "sec.img")
    marker = host.run_dir.parent / "tapdisk-enospc0"
    extra = ["-s"] if standby else []
    pid, minor = host.create(f"aio:{leaf}", "-D", "-2", f"aio:{sec}", *extra)
    assert minor == 0 and not marker.exists()
    uri = host.nbd(pid, minor)
    model = bytearray(SIZE)
    writes = [(0x41, 0, MiB), (0x42, MiB, 3 * MiB), (0x43, 6 * MiB, MiB),
              (0x44, 512 * KiB, 64 * KiB)]
    for byte, off, n in writes:
        qemu_io(uri, f"write -P {byte:#x} {off} {n}")
        model[off:off + n] = bytes([byte]) * n
    qemu_io(uri, "flush")
    assert read_disk(uri, tmp_path) == model
    st = stats(host, pid, minor)
    assert st["mirror"]["state"] == "failed-over"
    assert st["FIXME_enospc_redirect_count"] > 0 and st["nbd_mirror_failed"] == 0
    assert marker.exists()
    if not standby:  # the secondary had every write
        assert sec.read_bytes() == model
    p, m = str(pid), str(minor)
    host.out("pause", "-p", p, "-m", m)
    host.out("unpause", "-p", p, "-m", m)
    assert read_disk(uri, tmp_path) == model
    # Removing the secondary now would lose writes: refused, still paused.
    host.out("pause", "-p", p, "-m", m)
    got, _, err = host.tap_ctl("unpause", "-p", p, "-m", m, "-2", "null", ok=False)
    assert got == errno.EBUSY, err
    host.out("unpause", "-p", p, "-m", m)
    assert read_disk(uri, tmp_path) == model
    # The toolstack's answer: a new leaf holding the disk (here: a copy where there is
    # room). The fail-over is over; the secondary is mirrored (or standing by) again.
    host.out("pause", "-p", p, "-m", m)
    new_leaf = tmp_path / "new-leaf.img"
    new_leaf.write_bytes(model)
    host.out("unpause", "-p", p, "-m", m, "-a", f"aio:{new_leaf}")
    st = stats(host, pid, minor)
    assert st["mirror"]["state"] == "active" and st["mirror"]["redirected_bytes"] == 0
    qemu_io(uri, "write -P 0x45 7M 64k")
    model[7 * MiB:7 * MiB + 64 * KiB] = b"\x45" * 64 * KiB
    assert read_disk(uri, tmp_path) == model == new_leaf.read_bytes()
    assert (sec.read_bytes()[7 * MiB:7 * MiB + 64 * KiB] == b"\x45" * 64 * KiB) != standby
    host.out("destroy", "-p", p, "-m", m)


def test_inprocess_range_set() -> None:
    from blktap.tapdisk.mirror import RangeSet

    r = RangeSet()
    r.add(10, 20)
    r.add(30, 40)
    r.add(20, 25)  # touches: merges
    assert r.pieces(0, 50) == [(0, 10, False), (10, 25, True), (25, 30, False),
                               (30, 40, True), (40, 50, False)]
    r.add(5, 35)
    assert len(r) == 1 and r.pieces(0, 50) == [(0, 5, False), (5, 40, True), (40, 50, False)]
    assert r.pieces(12, 14) == [(12, 14, True)] and r.bytes == 35
