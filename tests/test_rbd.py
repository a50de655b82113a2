"""The rbd driver against a real, throwaway Ceph (tests/ceph_cluster.py): librbd's aio
path in-process, ``blktap serve rbd:`` with qemu's own rbd driver and fio as peers, a
snapshot taken while the disk is served, the OSD stopped and restarted mid-I/O."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from blktap.errors import BlktapError, UsageError
from blktap.image import rbd as rbdlib
from blktap.image.rbd import parse_spec
from conftest import need, run, with_engine
from nbd_helpers import serve

MiB = 1 << 20


def new_image(cluster, size: int = 64 * MiB) -> str:
    name = "t-" + uuid.uuid4().hex[:10]
    cluster.rbd("create", "--size", f"{size // MiB}M", f"rbd/{name}")
    return name


def qemu_io(spec: str, *commands: str, fmt: str = "raw", timeout: float = 120,
            read_only: bool = False) -> subprocess.CompletedProcess:
    argv = [need("qemu-io"), "-f", fmt, *(["-r"] if read_only else [])]
    for c in commands:
        argv += ["-c", c]
    return run([*argv, spec], text=True, timeout=timeout)


def qemu_rbd(cluster, image: str, snap: str | None = None) -> str:
    """The image as qemu's rbd driver names it."""
    return cluster.spec(image, snap)


# ----------------------------------------------------------------------------- no cluster
def test_spec_parsing() -> None:
    s = parse_spec("rbd:vms/disk1")
    assert (s.pool, s.namespace, s.image, s.snap, s.conf, s.user) == \
        ("vms", "", "disk1", None, None, None)
    s = parse_spec("rbd:vms/tenant/disk1@gold:conf=/etc/ceph/c.conf:id=xen:"
                   "mon_host=10.0.0.1\\:6789:rados_osd_op_timeout=5")
    assert (s.pool, s.namespace, s.image, s.snap) == ("vms", "tenant", "disk1", "gold")
    assert s.conf == "/etc/ceph/c.conf" and s.user == "xen"
    assert s.options == {"mon_host": "10.0.0.1:6789", "rados_osd_op_timeout": "5"}
    assert parse_spec("p/a\\@b").image == "a@b"
    for bad in ("rbd:pool", "rbd:/img", "rbd:p/i@", "rbd:p/i@a@b", "rbd:p/i:conf",
                "rbd:a/b/c/d"):
        with pytest.raises(UsageError):
            parse_spec(bad)


def test_missing_bindings_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without python3-rbd for this interpreter, opening says so (ENOSYS), naming the
    packages and the folders looked in."""
    monkeypatch.setattr(rbdlib, "_bindings", None)
    monkeypatch.setattr(rbdlib, "SYSTEM_DIRS", ("/nonexistent",))
    for name in ("rados", "rbd"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "dist-packages" not in p])
    with pytest.raises(BlktapError) as info:
        rbdlib.bindings()
    assert info.value.errno == errno.ENOSYS
    assert "python3-rbd" in str(info.value) and "/nonexistent" in str(info.value)


def test_parent_policy_for_ceph_parents(tmp_path: Path) -> None:
    """Which rbd: parents an image may name: pools listed (POOL: any namespace, POOL/NS,
    *), none by default; Ceph options beyond conf and id refused whatever the pools (a
    VHD whose locator sets log_file is not opened and nothing is written there); a
    locator that does not parse is the image's damage. No cluster is asked."""
    from blktap.errors import FormatError, ParentNotAllowed
    from blktap.image.chain import Chain
    from blktap.image.parents import ParentPolicy
    from blktap.image.vhd import structs
    from blktap.image.vhd.create import ParentInfo, _build_dynamic, _new_footer

    none = ParentPolicy.from_env({})
    env = ParentPolicy.from_env({"BLKTAP_PARENT_RBD": "vms, gold/tenant,"})
    assert none.rbd == () and env.rbd == ("vms", "gold/tenant")
    for policy, spec, ok in ((none, "rbd:vms/a@s", False), (env, "rbd:vms/a@s", True),
                             (env, "rbd:vms/ns/a@s:conf=/etc/ceph/c.conf:id=xen", True),
                             (env, "rbd:gold/a@s", False), (env, "rbd:gold/tenant/a", True),
                             (env, "rbd:gold/other/a", False),
                             (ParentPolicy(rbd=("*",)), "rbd:any/a", True)):
        if ok:
            assert policy.check_rbd("c.vhd", spec) == spec
        else:
            with pytest.raises(ParentNotAllowed) as info:
                policy.check_rbd("c.vhd", spec)
            assert info.value.errno == errno.EACCES and "c.vhd" in str(info.value)
    with pytest.raises(UsageError):
        ParentPolicy.from_env({"BLKTAP_PARENT_RBD": "a/b/c"})
    with pytest.raises(FormatError):
        env.check_rbd("c.vhd", "rbd:vms")
    # A VHD (say, uploaded by a user) whose locator sets a Ceph option.
    evil = tmp_path / "evil.vhd"
    log = tmp_path / "written.log"
    name = f"rbd:vms/gold@v1:log_file={log}"
    info = ParentInfo(name, 8 * MiB, b"\0" * 16, 0, rbd=True)
    footer = _new_footer(8 * MiB, structs.DISK_TYPE_DIFF, None, None)
    evil.write_bytes(_build_dynamic(8 * MiB, 4, footer, info, None))
    with pytest.raises(ParentNotAllowed) as refused:
        Chain.open(f"vhd:{evil}", parent_policy=ParentPolicy(rbd=("*",)))
    assert "log_file" in str(refused.value) and not log.exists()


# ----------------------------------------------------------------------------- in-process
@pytest.mark.parametrize("io", ["c", "bindings"])
def test_driver_operations(ceph_cluster, io: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """read/write/flush/discard/write-zeroes/block status through librbd's aio calls
    (its C API, and the Python bindings' fallback), many requests in flight at once
    (more than the in-flight bound), reads and writes of one buffer and of several."""
    import asyncio

    from blktap.image import rbd_c
    from blktap.tapdisk.driver import STATE_DATA, STATE_ZERO, Caps
    from blktap.tapdisk.drivers import open_stack
    from blktap.tapdisk.drivers.rbd import ENV_IO, RbdDriver

    monkeypatch.setenv(ENV_IO, io)
    if io == "c":
        assert rbd_c.load() is not None, "librbd's C calls do not load through ctypes"

    name = new_image(ceph_cluster, 32 * MiB)
    spec = ceph_cluster.spec(name)

    async def body(engine):
        ro = open_stack(engine, spec, writable=False)
        assert isinstance(ro, RbdDriver) and not ro.caps & Caps.WRITE
        await ro.close()
        d = RbdDriver.open(engine, spec, writable=True, max_inflight=4)  # to be exceeded
        assert (d.c is not None) == (io == "c")
        assert d.size == 32 * MiB
        assert d.caps & (Caps.WRITE | Caps.FLUSH | Caps.TRIM | Caps.ZERO | Caps.BLOCK_STATUS)
        try:
            bufs = [bytearray([i + 1]) * 65536 for i in range(32)]
            await asyncio.gather(*(d.write(i * 65536, [memoryview(b)])
                                   for i, b in enumerate(bufs)))
            await d.flush()
            # Two buffers for one read (an iovec), split mid-write.
            a, b = bytearray(100 * 512), bytearray(156 * 512)
            await d.read(65536 - 512 * 100, [memoryview(a), memoryview(b)])
            assert a == bytes([1]) * len(a)
            assert b[:65536] == bytes([2]) * 65536 and b[65536:] == bytes([3]) * (len(b) - 65536)
            await d.write_zeroes(65536, 65536)
            out = bytearray(65536)
            await d.read(65536, [memoryview(out)])
            assert out == bytes(65536)
            await d.discard(0, 8 * MiB)
            ext = await d.block_status(0, 32 * MiB)
            assert sum(n for n, _ in ext) <= 32 * MiB
            # Everything written was in the first 4 MiB object, now discarded; the rest
            # was never written: all of it reads as zeros and says so.
            assert all(f & STATE_ZERO for _, f in ext), ext
            # A write of two buffers, one of them read-only.
            await d.write(20 * MiB, [memoryview(b"x" * 2048), memoryview(bytearray(b"x" * 2048))],
                          fua=True)
            back = bytearray(4096)
            await d.read(20 * MiB, [memoryview(back)])
            assert back == b"x" * 4096
            ext = await d.block_status(16 * MiB, 8 * MiB)
            assert any(not f & STATE_ZERO and f == STATE_DATA for _, f in ext), ext
            with pytest.raises(OSError):  # past the end: librbd refuses it
                await d.read(40 * MiB, [memoryview(bytearray(512))])
        finally:
            await d.close()

    with_engine(body)


def test_snapshot_is_read_only_and_bad_names_fail_clearly(ceph_cluster) -> None:
    from blktap.tapdisk.drivers import open_stack

    name = new_image(ceph_cluster, 8 * MiB)
    ceph_cluster.rbd("snap", "create", f"rbd/{name}@s1")

    async def body(engine):
        with pytest.raises(UsageError) as info:
            open_stack(engine, ceph_cluster.spec(name, "s1"), writable=True)
        assert info.value.errno == errno.EROFS
        d = open_stack(engine, ceph_cluster.spec(name, "s1"), writable=False)
        try:
            assert not d.writable
            with pytest.raises(BlktapError):
                await d.write(0, [memoryview(bytearray(512))])
        finally:
            await d.close()
        for bad, code in ((ceph_cluster.spec("no-such-image"), errno.ENOENT),
                          (f"rbd:nopool/x:conf={ceph_cluster.conf}", errno.ENOENT),
                          (ceph_cluster.spec(name, "nosnap"), errno.ENOENT)):
            with pytest.raises(BlktapError) as info:
                open_stack(engine, bad, writable=False)
            assert info.value.errno == code, (bad, info.value)
            assert "rbd:" in str(info.value)

    with_engine(body)


# ----------------------------------------------------------------------------- peers
def test_qemu_reads_what_we_wrote_and_we_read_what_it_wrote(ceph_cluster,
                                                            tmp_path: Path) -> None:
    name = new_image(ceph_cluster)
    with serve(ceph_cluster.spec(name), tmp_path) as srv:
        r = qemu_io(srv.uri, "write -P 0x11 0 3M", "write -P 0x12 5M 64k",
                    "write -z 1M 512k", "flush")
        assert r.returncode == 0, r.stdout + r.stderr
        # Read while we still serve it: qemu's rbd driver is a second client.
        r = qemu_io(qemu_rbd(ceph_cluster, name), "read -P 0x11 0 1M",
                    "read -P 0 1M 512k", "read -P 0x11 1536k 1536k", "read -P 0 3M 2M",
                    "read -P 0x12 5M 64k", "read -P 0 5184k 1M")
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, \
            r.stdout + r.stderr
    r = qemu_io(qemu_rbd(ceph_cluster, name), "write -P 0x33 7M 1M", "discard 0 4M")
    assert r.returncode == 0, r.stdout + r.stderr
    with serve(ceph_cluster.spec(name), tmp_path, "--read-only") as srv:
        r = qemu_io(srv.uri, "read -P 0x33 7M 1M", "read -P 0 0 4M", "read -P 0x12 5M 64k",
                    read_only=True)
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, \
            r.stdout + r.stderr
        r = run([need("qemu-img"), "compare", "-f", "raw", "-F", "raw", srv.uri,
                 qemu_rbd(ceph_cluster, name)], text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        # Block status over NBD: the object map's picture (4 MiB objects).
        r = run([need("qemu-img"), "map", "--output=json", "-f", "raw", srv.uri], text=True)
        assert r.returncode == 0, r.stderr
        data = [(e["start"], e["length"]) for e in json.loads(r.stdout) if e["data"]]
        assert data and all(s >= 4 * MiB for s, _ in data), data


def test_fio_verify_over_nbd(ceph_cluster, tmp_path: Path) -> None:
    fio = need("fio")
    name = new_image(ceph_cluster)
    with serve(ceph_cluster.spec(name), tmp_path) as srv:
        res = run([fio, "--name=v", "--ioengine=nbd", f"--uri={srv.uri}", "--rw=randwrite",
                   "--bs=4k", "--iodepth=16", "--size=16M", "--verify=crc32c",
                   "--do_verify=1", "--verify_fatal=1", "--randrepeat=1",
                   "--verify_state_save=0", "--output-format=json"],
                  text=True, timeout=300, cwd=tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        job = json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]
        assert job["error"] == 0 and job["write"]["io_bytes"] == 16 * MiB
        # And what fio left there is what qemu's driver reads.
        r = run([need("qemu-img"), "compare", "-f", "raw", "-F", "raw", srv.uri,
                 qemu_rbd(ceph_cluster, name)], text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_live_snapshot(ceph_cluster, tmp_path: Path) -> None:
    """A snapshot taken while the disk is served and written keeps what was written
    before it; the served disk goes on with the writes after it; the snapshot serves
    read-only."""
    name = new_image(ceph_cluster, 16 * MiB)
    with serve(ceph_cluster.spec(name), tmp_path) as srv:
        assert qemu_io(srv.uri, "write -P 0xa1 0 2M", "flush").returncode == 0
        ceph_cluster.rbd("snap", "create", f"rbd/{name}@live")
        r = qemu_io(srv.uri, "write -P 0xb2 1M 2M", "read -P 0xa1 0 1M",
                    "read -P 0xb2 1M 2M")
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout
    with serve(ceph_cluster.spec(name, "live"), tmp_path, "--read-only",
               name="snap.sock") as srv:
        r = qemu_io(srv.uri, "read -P 0xa1 0 2M", "read -P 0 2M 2M", read_only=True)
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout
        r = qemu_io(srv.uri, "write -P 1 0 4k")  # the export says read-only
        assert r.returncode != 0 and "wrote" not in r.stdout, r.stdout


# ----------------------------------------------------------------------------- OSD outage
def test_osd_restart_mid_io_holds_requests(ceph_cluster, tmp_path: Path) -> None:
    """Writes issued while the only OSD is down are held, complete once it is back, and
    none is lost; acknowledged writes from before the outage are still there."""
    name = new_image(ceph_cluster, 16 * MiB)
    with serve(ceph_cluster.spec(name), tmp_path) as srv:
        assert qemu_io(srv.uri, "write -P 0x41 0 4M", "flush").returncode == 0
        ceph_cluster.stop_osd()
        try:
            writer = subprocess.Popen(
                [need("qemu-io"), "-f", "raw", "-c", "write -P 0x42 4M 4M",
                 "-c", "write -P 0x43 12M 1M", "-c", "flush", srv.uri],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            time.sleep(3)
            held = writer.poll() is None
        finally:
            ceph_cluster.start_osd()
        out, _ = writer.communicate(timeout=120)
        assert held, "the writes completed while the OSD was down: " + out
        assert writer.returncode == 0 and "error" not in out.lower(), out
        r = qemu_io(srv.uri, "read -P 0x41 0 4M", "read -P 0x42 4M 4M", "read -P 0x43 12M 1M")
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout
    r = qemu_io(qemu_rbd(ceph_cluster, name), "read -P 0x41 0 4M", "read -P 0x42 4M 4M",
                "read -P 0x43 12M 1M")
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout


def test_osd_outage_past_the_timeout_fails_clearly(ceph_cluster, tmp_path: Path) -> None:
    """An OSD that stops answering (frozen): requests time out in librbd
    (rados_osd_op_timeout), the VBD retries them until its own timeout, then the client
    gets an error; the server keeps serving, and once the OSD answers again, writes work
    and what was acknowledged before is intact."""
    name = new_image(ceph_cluster, 16 * MiB)
    spec = ceph_cluster.spec(name) + ":rados_osd_op_timeout=2"
    with serve(spec, tmp_path, "--timeout", "4", "-v") as srv:
        assert qemu_io(srv.uri, "write -P 0x51 0 1M", "flush").returncode == 0
        ceph_cluster.pause_osd()
        try:
            r = qemu_io(srv.uri, "write -P 0x52 1M 64k", timeout=60)
        finally:
            ceph_cluster.resume_osd()
        assert "Input/output error" in r.stdout + r.stderr, r.stdout + r.stderr
        r = qemu_io(srv.uri, "write -P 0x53 2M 64k", "read -P 0x51 0 1M",
                    "read -P 0x53 2M 64k", timeout=120)
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, \
            r.stdout + r.stderr
        code = srv.stop()
        err = srv.stderr
    assert code == 0, err
    assert "retrying" in err and name in err, err


# ----------------------------------------------------------------------------- tap-ctl
def test_tap_ctl_create_rbd(ceph_cluster, tmp_path: Path) -> None:
    """``tap-ctl create -a rbd:...`` spawns a tapdisk serving the image (its NBD
    socket), ``list`` shows the spec, ``destroy`` closes it; a missing image is refused
    with the cluster's ENOENT and no tapdisk is left."""
    from test_tap_ctl_daemon import Host, wait_gone

    name = new_image(ceph_cluster, 8 * MiB)
    host = Host(tmp_path)
    spec = ceph_cluster.spec(name)
    pid, minor = host.create(spec)
    try:
        assert any(e.get("args") == spec for e in host.listing()), host.listing()
        host.serving(pid, minor, 8 * MiB)
        r = qemu_io(host.nbd(pid, minor), "write -P 0x61 0 1M", "flush")
        assert r.returncode == 0, r.stdout + r.stderr
        host.out("destroy", "-p", str(pid), "-m", str(minor))
        wait_gone(pid)
    finally:
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)
    r = qemu_io(qemu_rbd(ceph_cluster, name), "read -P 0x61 0 1M", read_only=True)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout
    code, out, err = host.tap_ctl("create", "-a", ceph_cluster.spec("missing"), ok=False)
    assert code == errno.ENOENT, (code, out, err)
    assert not any("pid" in e for e in host.listing())


# ----------------------------------------------------------------------------- the tools
def blktap(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    from conftest import tool

    return run([tool("blktap"), *args], text=True, cwd=cwd)


def test_convert_a_vhd_chain_into_rbd_and_back(ceph_cluster, tmp_path: Path) -> None:
    """A two-layer VHD chain into a new RBD image (sparse: only the data is written),
    info/map/compare on it, and back into a VHD; qemu's rbd driver agrees. An existing
    destination is refused unless --force."""
    base, leaf = tmp_path / "base.vhd", tmp_path / "leaf.vhd"
    assert blktap("create", str(base), "64M").returncode == 0
    with serve(f"vhd:{base}", tmp_path, name="base.sock") as srv:
        assert qemu_io(srv.uri, "write -P 0x71 0 2M", "write -P 0x72 30M 1M").returncode == 0
    assert blktap("snapshot", str(leaf), str(base)).returncode == 0
    with serve(f"vhd:{leaf}", tmp_path, name="leaf.sock") as srv:
        assert qemu_io(srv.uri, "write -P 0x73 1M 2M").returncode == 0
    name = "conv-" + uuid.uuid4().hex[:8]
    dst = ceph_cluster.spec(name)
    r = blktap("convert", f"vhd:{leaf}", dst)
    assert r.returncode == 0, r.stderr
    assert "(2 layers)" in r.stdout and "4 MiB of data written" in r.stdout, r.stdout
    used = ceph_cluster.rbd("du", "--format", "json", f"rbd/{name}")
    # Objects of 4 MiB: the first and the one at 28-32 MiB, nothing else.
    assert json.loads(used)["images"][0]["used_size"] <= 8 * MiB, used
    r = blktap("info", "--json", dst)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert (info["format"], info["virtual_size"], info["chain_depth"]) == ("rbd", 64 * MiB, 1)
    r = blktap("map", "--json", dst)
    assert r.returncode == 0, r.stderr
    data = [(e["offset"], e["length"]) for e in json.loads(r.stdout) if e["status"] == "data"]
    assert data == [(0, 4 * MiB), (28 * MiB, 4 * MiB)], data
    assert blktap("compare", f"vhd:{leaf}", dst).returncode == 0
    # qemu's vpc driver has no differencing VHDs: its rbd driver checks the patterns.
    r = qemu_io(qemu_rbd(ceph_cluster, name), "read -P 0x71 0 1M", "read -P 0x73 1M 2M",
                "read -P 0 3M 27M", "read -P 0x72 30M 1M", "read -P 0 31M 33M",
                read_only=True)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout
    # Back into a VHD, sparse.
    back = tmp_path / "back.vhd"
    r = blktap("convert", dst, str(back))
    assert r.returncode == 0, r.stderr
    assert blktap("compare", f"vhd:{leaf}", str(back)).returncode == 0
    assert json.loads(blktap("info", "--json", str(back)).stdout)["allocated"] <= 6 * MiB
    # A difference is seen; an existing destination is kept unless --force.
    assert qemu_io(qemu_rbd(ceph_cluster, name), "write -P 1 50M 512").returncode == 0
    r = blktap("compare", f"vhd:{leaf}", dst)
    assert r.returncode == 1 and f"offset {50 * MiB}" in r.stdout, r.stdout
    r = blktap("convert", f"vhd:{leaf}", dst)
    assert r.returncode == errno.EEXIST and "already exists" in r.stderr, r.stderr
    assert blktap("convert", "--force", f"vhd:{leaf}", dst).returncode == 0
    assert blktap("compare", f"vhd:{leaf}", dst).returncode == 0
    images = ceph_cluster.rbd("ls", "rbd").split()
    assert name in images and not any(".blktap-" in i for i in images), images


# ----------------------------------------------------------------------------- RBD parent
def test_qcow2_leaf_over_an_rbd_snapshot(ceph_cluster, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A local qcow2 copy-on-write layer over a shared golden image on Ceph (qemu's
    spelling: backing file rbd:..., format raw): served by us, reads fall through to the
    snapshot, partial-cluster writes copy up what lies below; qemu (through its own rbd
    driver) reads the same disk; info/map show both layers; convert flattens it; parents
    confined to directories refuse a cluster."""
    gold = new_image(ceph_cluster)
    r = qemu_io(qemu_rbd(ceph_cluster, gold), "write -P 0x21 0 8M", "write -P 0x22 40M 1M")
    assert r.returncode == 0, r.stdout + r.stderr
    ceph_cluster.rbd("snap", "create", f"rbd/{gold}@v1")
    assert qemu_io(qemu_rbd(ceph_cluster, gold), "write -P 0x99 0 8M").returncode == 0
    leaf = tmp_path / "leaf.qcow2"
    r = run([need("qemu-img"), "create", "-q", "-f", "qcow2", "-b",
             qemu_rbd(ceph_cluster, gold, "v1"), "-F", "raw", str(leaf)], text=True)
    assert r.returncode == 0, r.stderr
    r = blktap("info", f"qcow2:{leaf}")  # no pool listed: not followed
    assert r.returncode == errno.EACCES and "BLKTAP_PARENT_RBD" in r.stderr, r.stderr
    monkeypatch.setenv("BLKTAP_PARENT_RBD", "rbd")
    with serve(f"qcow2:{leaf}", tmp_path) as srv:
        r = qemu_io(srv.uri, "write -P 0x23 1000k 100k", "read -P 0x21 0 1000k",
                    "read -P 0x23 1000k 100k", "read -P 0x21 1100k 1M",
                    "read -P 0 8M 32M", "read -P 0x22 40M 1M")
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, \
            r.stdout + r.stderr
        r = run([need("qemu-img"), "compare", "-f", "raw", "-F", "qcow2", srv.uri,
                 str(leaf)], text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    info = json.loads(blktap("info", "--json", f"qcow2:{leaf}").stdout)
    assert [x["format"] for x in info["chain"]] == ["qcow2", "rbd"], info
    rows = json.loads(blktap("map", "--json", f"qcow2:{leaf}").stdout)
    assert {r["depth"] for r in rows} == {0, 1, None}, rows
    flat = tmp_path / "flat.vhd"
    assert blktap("convert", f"qcow2:{leaf}", str(flat)).returncode == 0
    r = qemu_io(str(flat), "read -P 0x21 0 1000k", "read -P 0x23 1000k 100k",
                "read -P 0x22 40M 1M", fmt="vpc", read_only=True)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout
    from conftest import tool

    # Confining file parents keeps the listed pools.
    r = run([tool("blktap"), "info", "--parent-dir", str(tmp_path), f"qcow2:{leaf}"],
            text=True)
    assert r.returncode == 0, r.stderr
    monkeypatch.delenv("BLKTAP_PARENT_RBD")
    r = run([tool("blktap"), "info", "--parent-dir", str(tmp_path), f"qcow2:{leaf}"],
            text=True)
    assert r.returncode == errno.EACCES and "Ceph" in r.stderr, r.stderr


def test_vhd_leaf_over_an_rbd_snapshot(ceph_cluster, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A local VHD leaf over a snapshot on Ceph (its MACX locator holds the rbd: spec):
    made by ``blktap create -b`` and ``vhd-util snapshot``, shown by query/info, checked;
    followed only where the pool is listed (BLKTAP_PARENT_RBD/--parent-rbd) and the VHD
    was named (never when probed); served over NBD, its reads fall through to the
    snapshot and its writes stay local. qemu-img compares our export with qemu's own
    picture of the same disk (a qcow2 overlay over its rbd driver's view of the snapshot,
    given the same writes); fio verifies its writes through NBD; tapdisk serves it."""
    from conftest import tool

    gold = new_image(ceph_cluster)
    r = qemu_io(qemu_rbd(ceph_cluster, gold), "write -P 0x31 0 6M", "write -P 0x32 40M 3M")
    assert r.returncode == 0, r.stdout + r.stderr
    ceph_cluster.rbd("snap", "create", f"rbd/{gold}@v1")
    # After the snapshot: the leaf must not see this.
    assert qemu_io(qemu_rbd(ceph_cluster, gold), "write -P 0x99 0 8M").returncode == 0
    parent = qemu_rbd(ceph_cluster, gold, "v1")
    leaf, leaf2 = tmp_path / "leaf.vhd", tmp_path / "leaf2.vhd"
    r = blktap("create", "-b", parent, str(leaf))
    assert r.returncode == 0 and parent in r.stdout, r.stdout + r.stderr
    r = run([tool("vhd-util"), "snapshot", "-n", str(leaf2), "-p", parent], text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    for image in (leaf, leaf2):
        r = run([tool("vhd-util"), "query", "-n", str(image), "-p", "-v"], text=True)
        assert r.returncode == 0 and r.stdout == f"64\n{parent}\n", r.stdout + r.stderr
        r = run([tool("vhd-util"), "check", "-n", str(image)], text=True)
        assert r.returncode == 0 and "is valid" in r.stdout, r.stdout
    # Bad parents are refused at creation, one line each.
    for bad, code in ((qemu_rbd(ceph_cluster, gold), errno.EINVAL),  # not a snapshot
                      (parent + ":log_file=/tmp/x", errno.EINVAL),
                      (qemu_rbd(ceph_cluster, gold, "nosnap"), errno.ENOENT)):
        r = blktap("snapshot", str(tmp_path / "bad.vhd"), bad)
        assert r.returncode == code and r.stderr.count("\n") == 1, (bad, r.stderr)
        assert not (tmp_path / "bad.vhd").exists()

    # Followed only when allowed: no pool listed, another pool, a probed VHD.
    monkeypatch.delenv("BLKTAP_PARENT_RBD", raising=False)
    r = blktap("info", f"vhd:{leaf}")
    assert r.returncode == errno.EACCES and "BLKTAP_PARENT_RBD" in r.stderr, r.stderr
    r = blktap("info", "--parent-rbd", "otherpool", f"vhd:{leaf}")
    assert r.returncode == errno.EACCES and "otherpool" in r.stderr, r.stderr
    r = run([tool("blktap"), "serve", f"vhd:{leaf}", "--socket", str(tmp_path / "x.sock")],
            text=True, timeout=60)
    assert r.returncode == errno.EACCES and "Ceph" in r.stderr, r.stderr
    monkeypatch.setenv("BLKTAP_PARENT_RBD", "rbd")
    r = blktap("info", str(leaf))  # probed: refused whatever the pools
    assert r.returncode == errno.EPERM and "probed" in r.stderr, r.stderr
    guest = tmp_path / "guest.img"  # a guest that wrote the VHD into its raw disk
    guest.write_bytes(leaf.read_bytes() + bytes(MiB))
    r = run([tool("blktap"), "serve", str(guest), "--socket", str(tmp_path / "g.sock")],
            text=True, timeout=60)
    assert r.returncode == errno.EPERM and "probed" in r.stderr, r.stderr

    info = json.loads(blktap("info", "--json", f"vhd:{leaf}").stdout)
    assert [x["format"] for x in info["chain"]] == ["vhd", "rbd"], info
    ref = tmp_path / "ref.qcow2"  # qemu's own picture: its rbd driver under a qcow2
    r = run([need("qemu-img"), "create", "-q", "-f", "qcow2", "-b", parent, "-F", "raw",
             str(ref)], text=True)
    assert r.returncode == 0, r.stderr
    writes = ("write -P 0x33 1000k 100k", "write -P 0x34 41M 4k", "write -z 5M 512k",
              "write -P 0x35 60M 1M")
    assert qemu_io(str(ref), *writes, fmt="qcow2").returncode == 0
    with serve(f"vhd:{leaf}", tmp_path) as srv:
        r = qemu_io(srv.uri, *writes, "flush", "read -P 0x31 0 1000k",
                    "read -P 0x33 1000k 100k", "read -P 0x31 1100k 3M", "read -P 0 5M 512k",
                    "read -P 0 6M 34M", "read -P 0x32 40M 1M", "read -P 0x34 41M 4k")
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, \
            r.stdout + r.stderr
        r = run([need("qemu-img"), "compare", "-f", "raw", "-F", "qcow2", srv.uri, str(ref)],
                text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        fio = run([need("fio"), "--name=v", "--ioengine=nbd", f"--uri={srv.uri}",
                   "--rw=randwrite", "--bs=4k", "--iodepth=16", "--offset=8M", "--size=16M",
                   "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                   "--randrepeat=1", "--verify_state_save=0", "--output-format=json"],
                  text=True, timeout=300, cwd=tmp_path)
        assert fio.returncode == 0, fio.stdout + fio.stderr
        job = json.loads(fio.stdout[fio.stdout.index("{"):])["jobs"][0]
        assert job["error"] == 0 and job["write"]["io_bytes"] == 16 * MiB
    # tapdisk (tap-ctl create -a vhd:...) serves it too, BLKTAP_PARENT_RBD inherited.
    from test_tap_ctl_daemon import Host, wait_gone

    host = Host(tmp_path)
    pid, minor = host.create(f"vhd:{leaf}")
    try:
        r = qemu_io(host.nbd(pid, minor), "read -P 0x31 0 1000k", "read -P 0x33 1000k 100k",
                    "read -P 0x32 40M 1M", "read -P 0x35 60M 1M", read_only=True)
        assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout
        host.out("destroy", "-p", str(pid), "-m", str(minor))
        wait_gone(pid)
    finally:
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)
    # The writes are in the leaf, none in the snapshot (qemu reads it as it was).
    r = qemu_io(parent, "read -P 0x31 0 6M", "read -P 0 6M 34M", "read -P 0x32 40M 3M",
                "read -P 0 43M 21M", read_only=True)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout
    r = run([tool("vhd-util"), "check", "-n", str(leaf)], text=True)
    assert r.returncode == 0 and "is valid" in r.stdout, r.stdout
    r = blktap("check", f"vhd:{leaf}")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads(blktap("map", "--json", f"vhd:{leaf}").stdout)
    assert {r["depth"] for r in rows} == {0, 1, None}, rows


def test_reads_and_writes_the_callback_way(ceph_cluster) -> None:
    """With librbd's C calls the VBD hands reads and writes to the driver the callback
    way (issued at its kick, told from the eventfd's reaping, no task): several at once,
    more than the in-flight bound (the rest by the coroutine path), one buffer and
    several, a read-only one; what the driver cannot take so (FUA, the bindings'
    fallback) it refuses at once, and librbd's errors come back as the coroutine path
    raises them."""
    import asyncio

    from blktap.tapdisk.drivers.rbd import RbdDriver
    from blktap.tapdisk.vbd import VBD

    name = new_image(ceph_cluster, 8 * MiB)

    async def body(engine):
        d = RbdDriver.open(engine, ceph_cluster.spec(name), writable=True, max_inflight=4)
        assert d.c is not None, "librbd's C calls do not load through ctypes"
        started = []
        real = d._start

        def counted(what, offset, iov, done):  # noqa: ANN001, ANN202
            took = real(what, offset, iov, done)
            started.append((what, took))
            return took
        d._start = counted
        vbd = VBD(d)
        loop = asyncio.get_running_loop()
        try:
            outcomes = [loop.create_future() for _ in range(8)]
            with vbd.batch:  # 8 writes 64 KiB apart: no merging, 4 places in librbd
                for i, fut in enumerate(outcomes):
                    vbd.start_write(i * 131072, [memoryview(bytearray([i + 1]) * 65536)],
                                    65536, fut.set_result)
            assert await asyncio.gather(*outcomes) == [None] * 8
            assert started[:4] == [("write", True)] * 4
            a, b = bytearray(512), bytearray(65536 - 512)
            got = loop.create_future()
            vbd.start_read(131072, [memoryview(a), memoryview(b)], 65536, got.set_result)
            assert await got is None
            assert a + b == bytes([2]) * 65536 and started[-1] == ("read", True)
            # A read-only buffer is written from the copy every write is sent from.
            wrote = loop.create_future()
            assert d.start_write(0, [memoryview(b"x" * 512)], wrote.set_result)
            assert await wrote is None
            back = bytearray(512)
            await d.read(0, [memoryview(back)])
            assert back == b"x" * 512
            # What the callback way leaves to the coroutine path, refused at once.
            assert not d.start_write(0, [memoryview(bytearray(512))], lambda e: None,
                                     fua=True)
            # Past the end: librbd fails it, at once (then the coroutine path raises
            # it) or at completion (told to done as the coroutine path would raise it).
            failed = loop.create_future()
            past = [memoryview(bytearray(1024))]
            if d.start_read(8 * MiB - 512, past, failed.set_result):
                error = await failed
                assert isinstance(error, OSError) and error.errno and "read" in str(error)
            else:
                with pytest.raises(OSError, match="read"):
                    await d.read(8 * MiB - 512, past)
        finally:
            await vbd.close()
            await d.close()
        assert d.inflight == 0

    with_engine(body)


def test_librbd_sends_writes_without_a_copy_of_its_own(ceph_cluster) -> None:
    """librbd is told not to copy writes (the compiled pass's slots are ours and stay
    untouched until the completion); a spec's own setting wins."""
    from blktap.image.rbd import parse_spec
    from blktap.image.rbd_c import CImage

    name = new_image(ceph_cluster, 8 * MiB)
    option = "rbd_disable_zero_copy_writes"
    image = CImage(parse_spec(ceph_cluster.spec(name)), writable=True)
    try:
        assert image.config(option) == "false"
        with pytest.raises(OSError):
            image.config("no_such_option")
    finally:
        image.close()
    image = CImage(parse_spec(f"{ceph_cluster.spec(name)}:{option}=true"), writable=True)
    try:
        assert image.config(option) == "true"
    finally:
        image.close()


@pytest.mark.parametrize("way", ["callback", "coroutine"])
def test_a_buffer_changed_while_its_write_is_in_flight(ceph_cluster, way: str) -> None:
    """librbd sends writes from the buffer it is given (no copy of its own): a
    transport's buffer (a guest's memory, which the guest may write to at any time) is
    copied when the write is issued, so what it holds afterwards is not what is
    written, and the write's bytes are those it held when issued. 4 MiB, changed at
    once: librbd's messenger thread is still sending it then. librbd's cache off: with
    it, librbd copies writes for the cache's sake anyway."""
    import asyncio

    from blktap.tapdisk.drivers.rbd import RbdDriver

    name = new_image(ceph_cluster, 16 * MiB)
    size = 4 * MiB

    async def body(engine):
        d = RbdDriver.open(engine, f"{ceph_cluster.spec(name)}:rbd_cache=false",
                           writable=True)
        assert d.c is not None, "librbd's C calls do not load through ctypes"
        loop = asyncio.get_running_loop()
        try:
            for round_ in range(4):
                guest = bytearray([0x41 + round_]) * size
                offset = (round_ % 3) * size
                if way == "callback":
                    done = loop.create_future()
                    assert d.start_write(offset, [memoryview(guest)], done.set_result)
                    guest[:] = b"\xee" * size  # the guest's next use of its page
                    assert await done is None
                else:
                    task = asyncio.ensure_future(d.write(offset, [memoryview(guest)]))
                    await asyncio.sleep(0)  # issued
                    guest[:] = b"\xee" * size
                    await task
                back = bytearray(size)
                await d.read(offset, [memoryview(back)])
                assert back == bytes([0x41 + round_]) * size, f"round {round_}"
        finally:
            await d.close()

    with_engine(body)


def test_cancelled_request_is_waited_for_by_close(ceph_cluster) -> None:
    """A caller that gives up on a request librbd holds (the OSD frozen) does not take
    the buffer back from librbd: the request still counts as in flight, and close()
    waits for librbd to finish it before closing the image."""
    import asyncio

    from blktap.tapdisk.drivers.rbd import RbdDriver

    name = new_image(ceph_cluster, 8 * MiB)

    async def body(engine):
        d = RbdDriver.open(engine, ceph_cluster.spec(name), writable=True)
        await d.write(0, [memoryview(bytearray(b"z" * 4096))])
        ceph_cluster.pause_osd()
        try:
            task = asyncio.create_task(d.write(4096, [memoryview(bytearray(4096))]))
            await asyncio.sleep(1)
            assert not task.done() and d.inflight == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert d.inflight == 1
            closing = asyncio.create_task(d.close())
            await asyncio.sleep(0.5)
            assert not closing.done()
        finally:
            ceph_cluster.resume_osd()
        await asyncio.wait_for(closing, 60)
        assert d.inflight == 0

    with_engine(body)


def test_serve_bad_specs_fail_with_one_line_and_the_errno(ceph_cluster, tmp_path: Path) -> None:
    """What an operator mistypes: a missing image (ENOENT), a conf file that is not there
    (ENOENT), a cluster that does not answer (ETIMEDOUT after client_mount_timeout), a
    spec without an image (EINVAL), an unknown Ceph option (EINVAL); one line each."""
    from conftest import tool

    cases = [
        (ceph_cluster.spec("missing"), errno.ENOENT, "RBD image not found"),
        ("rbd:rbd/x:conf=" + str(tmp_path / "none.conf"), errno.ENOENT, "none.conf"),
        ("rbd:rbd/x:mon_host=127.0.0.1\\:1:client_mount_timeout=2", errno.ETIMEDOUT,
         "cannot connect"),
        ("rbd:rbd", errno.EINVAL, "POOL/IMAGE"),
        (ceph_cluster.spec("x") + ":no_such_option=1", errno.EINVAL, "no_such_option"),
    ]
    for spec, code, words in cases:
        r = run([tool("blktap"), "serve", spec, "--socket", str(tmp_path / "s.sock")],
                text=True, timeout=60)
        assert r.returncode == code, (spec, r.returncode, r.stderr)
        assert words in r.stderr and r.stderr.count("\n") == 1, (spec, r.stderr)
        assert r.stdout == ""
