"""Driver plugins (docs/drivers.md): the guide's examples, extracted from the page exactly
as printed, built into a package and pip-installed into a directory of the test's own
(never the project's venv), then served through ``blktap serve``, ``tap-ctl create`` and a
running tapdisk, read and written with qemu-io and nbdcopy. Beside them a package of
plugins that break the rules (one that cannot be imported, one for another API version,
one that raises in open, one that declares what it does not do, short reads, garbage
block status, parents that loop or lie outside the allowed directories): each gives a
clear error naming it, and everything else keeps serving."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT, need, run, tool
from nbd_helpers import serve
from test_tap_ctl_daemon import ALLOCATE_RE, Host

MiB = 1 << 20
DOC = ROOT / "docs" / "drivers.md"
BLOCK = re.compile(r"^```(?:python|toml)\n(# file: (\S+)\n.*?)^```$", re.M | re.S)

BAD_PYPROJECT = """\
[build-system]
requires = ["setuptools>=61", "wheel"]
build-backend = "setuptools.build_meta"

[project]
name = "blktap-bad-drivers"
version = "0.1"

[project.entry-points."blktap.drivers"]
broken = "bad_broken:Driver"
oldapi = "bad_drivers:OldApi"
notdriver = "bad_drivers:not_a_driver"
raiser = "bad_drivers:Raiser"
liar = "bad_drivers:Liar"
shorty = "bad_drivers:Shorty"
delta = "bad_drivers:Delta"
aio = "bad_drivers:Shorty"

[tool.setuptools]
py-modules = ["bad_drivers", "bad_broken"]
"""

BAD_DRIVERS = '''\
import os

from blktap.driver import API_VERSION, STATE_DATA, Caps, Driver, FormatError


class OldApi(Driver):
    api_version = API_VERSION + 1


def not_a_driver():
    pass


class Raiser(Driver):
    api_version = API_VERSION

    @classmethod
    def open_layer(cls, ctx, args):
        raise ValueError("no disk named " + args)


class Liar(Driver):
    """Says it zeroes, but has no write_zeroes."""
    api_version = API_VERSION
    name = "liar"

    @classmethod
    def open_layer(cls, ctx, args):
        d = cls(ctx.engine, 1 << 20, writable=ctx.writable)
        d.caps = Caps.ZERO
        return d

    async def read(self, offset, iov):
        return None


class Shorty(Driver):
    """A 1 MiB disk of 0x5a bytes that misbehaves in the first 64 KiB: short reads below
    4 KiB, exceptions at 4-8 KiB, garbage block status."""
    api_version = API_VERSION
    name = "shorty"

    @classmethod
    def open_layer(cls, ctx, args):
        d = cls(ctx.engine, 1 << 20, writable=False)
        d.caps = Caps.BLOCK_STATUS
        return d

    async def read(self, offset, iov):
        for view in iov:
            view[:] = b"\\x5a" * len(view)
        if offset < 4096:
            return 1
        if offset < 8192:
            raise RuntimeError("the plugin tripped")
        return None

    async def block_status(self, offset, length):
        if offset < 65536:
            return [("lots", "of data")]
        return [(length, STATE_DATA)]


class Delta(Driver):
    """delta:FILE -- FILE names the parent (first line) and its expected size (second):
    the disk reads as its parent (get_parent_id / validate_parent)."""
    api_version = API_VERSION
    name = "delta"

    @classmethod
    def open_layer(cls, ctx, args):
        try:
            spec, size = open(args).read().split()
        except (OSError, ValueError) as exc:
            raise FormatError(f"{args}: {exc}") from None
        d = cls(ctx.engine, int(size), writable=False)
        d.named = spec
        return d

    def parent_spec(self):
        return self.named

    def validate_parent(self, parent):
        if parent.size != self.size:
            raise FormatError(f"{self.path}: parent is {parent.size} bytes, not {self.size}")
        if parent.writable:
            raise FormatError("parent opened writable")

    async def read(self, offset, iov):
        await self.forward_read(offset, iov)
'''


def doc_files() -> dict[str, str]:
    """The blocks of docs/drivers.md that start with ``# file: NAME``, by NAME."""
    return {m[2]: m[1] for m in BLOCK.finditer(DOC.read_text())}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both packages built and installed with pip into a directory of their own."""
    root = tmp_path_factory.mktemp("plugins")
    good, bad, target = root / "examples", root / "bad", root / "site"
    good.mkdir()
    bad.mkdir()
    for name, text in doc_files().items():
        (good / name).write_text(text)
    (bad / "pyproject.toml").write_text(BAD_PYPROJECT)
    (bad / "bad_drivers.py").write_text(BAD_DRIVERS)
    (bad / "bad_broken.py").write_text("import blktap_no_such_module  # noqa\n")
    res = run([sys.executable, "-m", "pip", "install", "--quiet", "--no-build-isolation",
               "--no-deps", "--no-index", "--target", str(target), str(good), str(bad)],
              text=True)
    assert res.returncode == 0, res.stderr
    return target


@pytest.fixture
def plugins(site: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The plugins visible in this process (and, through PYTHONPATH, in the processes it
    starts) for one test; gone after it."""
    from blktap.tapdisk.drivers import registry

    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", str(site))
    registry.refresh()
    yield site
    registry.refresh()
    for mod in ("chunkdisk", "overlay", "bad_drivers", "bad_broken"):
        sys.modules.pop(mod, None)


def chunk_disk(path: Path, size: int) -> Path:
    path.mkdir()
    (path / "size").write_text(f"{size}\n")
    return path


def qemu_io(uri: str, *cmds: str, ok: bool = True,
            ro: bool = False) -> subprocess.CompletedProcess:
    argv = [need("qemu-io"), "-f", "raw", *(["-r"] if ro else []), uri]
    for c in cmds:
        argv += ["-c", c]
    res = run(argv, text=True)
    if ok:
        assert res.returncode == 0 and "error" not in res.stdout.lower(), res.stdout + res.stderr
    return res


def nbd_bytes(uri: str, dest: Path) -> bytes:
    res = run([need("nbdcopy"), uri, str(dest)], text=True)
    assert res.returncode == 0, res.stderr
    return dest.read_bytes()


# ------------------------------------------------------------------ the guide's examples
def test_the_guide_prints_a_complete_package() -> None:
    files = doc_files()
    assert set(files) == {"pyproject.toml", "chunkdisk.py", "overlay.py"}
    assert 'chunks = "chunkdisk:ChunkDriver"' in files["pyproject.toml"]
    assert 'overlay = "overlay:Overlay"' in files["pyproject.toml"]


def test_chunks_served_read_write_then_read_only(plugins: Path, tmp_path: Path) -> None:
    disk = chunk_disk(tmp_path / "disk", 16 * MiB)
    with serve(f"chunks:{disk}", tmp_path) as srv:
        # Across a chunk boundary, unaligned, then flushed.
        qemu_io(srv.uri, "write -P 0xab 1000k 200k", "write -P 0x11 5242881 3000", "flush")
        qemu_io(srv.uri, "read -P 0xab 1000k 200k", "read -P 0 0 1000k",
                "read -P 0x11 5242881 3000", "read -P 0 5245881 1000")
    assert sorted(p.name for p in disk.iterdir()) == ["0", "1", "5", "size"]
    expect = bytearray(16 * MiB)
    expect[1000 * 1024:1200 * 1024] = b"\xab" * (200 * 1024)
    expect[5242881:5245881] = b"\x11" * 3000
    with serve(f"chunks:{disk}", tmp_path, "--read-only", name="ro.sock") as srv:
        assert nbd_bytes(srv.uri, tmp_path / "copy.img") == expect
        res = qemu_io(srv.uri, "write -P 1 0 4k", ok=False)
        assert res.returncode != 0 and "Permission denied" in res.stderr
    # Not a chunk disk: the driver's own error, as blktap serve's exit code.
    res = run([tool("blktap"), "serve", f"chunks:{tmp_path}", "--socket",
               str(tmp_path / "x.sock")], text=True, timeout=60)
    assert res.returncode == errno.EINVAL and "not a chunk disk" in res.stderr, res.stderr


def test_overlay_keeps_writes_in_memory_over_a_read_only_disk(plugins: Path,
                                                              tmp_path: Path) -> None:
    base = tmp_path / "golden.img"
    golden = os.urandom(4 * MiB)
    base.write_bytes(golden)
    base.chmod(0o444)  # the parent is opened read-only: a read-only file is enough
    with serve(f"overlay:aio:{base}", tmp_path) as srv:
        qemu_io(srv.uri, "write -P 0xcd 513 4000", "write -z 1M 64k", "flush")
        expect = bytearray(golden)
        expect[513:4513] = b"\xcd" * 4000
        expect[MiB:MiB + 65536] = bytes(65536)
        assert nbd_bytes(srv.uri, tmp_path / "copy.img") == expect
        qemu_io(srv.uri, "discard 1M 64k")
        qemu_io(srv.uri, "read -P 0xcd 513 4000")
    assert base.read_bytes() == golden
    # A parent that is not whole sectors is refused by validate_parent, by name.
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    res = run([tool("blktap"), "serve", f"overlay:aio:{odd}", "--socket",
               str(tmp_path / "x.sock")], text=True, timeout=60)
    assert res.returncode == errno.EINVAL and "not whole sectors" in res.stderr, res.stderr


def test_tap_ctl_and_tapdisk_serve_plugins(plugins: Path, tmp_path: Path) -> None:
    host = Host(tmp_path)
    disk = chunk_disk(tmp_path / "disk", 8 * MiB)
    base = tmp_path / "golden.img"
    base.write_bytes(b"\x42" * (2 * MiB))
    pids = []
    try:
        pid, minor = host.create(f"chunks:{disk}")
        pids.append(pid)
        host.serving(pid, minor, 8 * MiB)
        qemu_io(host.nbd(pid, minor), "write -P 0x77 3M 1M", "flush")
        # In the same tapdisk, a filter over a read-only file, and plugins that fail to
        # open: each refused with its errno, the running disk untouched.
        minor2 = ALLOCATE_RE.search(host.out("allocate").strip())[1]  # type: ignore[index]
        host.out("attach", "-p", str(pid), "-m", minor2)
        for spec, code in ((f"raiser:{disk}", errno.EIO), ("broken:x", errno.ELIBBAD),
                           ("liar:x", errno.EINVAL), ("nosuch:x", errno.ENOENT),
                           ("vmdk:x", errno.ENOSYS)):
            got = host.tap_ctl("open", "-p", str(pid), "-m", minor2, "-a", spec, ok=False)
            assert got[0] == code, (spec, got)
            qemu_io(host.nbd(pid, minor), "read -P 0x77 3M 1M")
        host.out("open", "-p", str(pid), "-m", minor2, "-a", f"overlay:aio:{base}")
        qemu_io(host.nbd(pid, int(minor2)), "write -P 0x99 0 4k", "read -P 0x99 0 4k",
                "read -P 0x42 4k 1M")
        logs = "".join(p.read_text(errors="replace") for p in host.log_dir.rglob("*")
                       if p.is_file())
        assert "plugin 'broken' (bad_broken:Driver, from blktap-bad-drivers 0.1) failed " \
               "to load: ModuleNotFoundError" in logs
        assert "declares Caps.ZERO but does not implement write_zeroes()" in logs
        for m in (minor2, str(minor)):
            host.out("destroy", "-p", str(pid), "-m", m)
        pids.clear()
    finally:
        for p in pids:
            os.kill(p, 9)
    assert (disk / "3").read_bytes() == b"\x77" * MiB
    assert base.read_bytes() == b"\x42" * (2 * MiB)


# ------------------------------------------------------------------ bad plugins
def test_broken_plugins_name_themselves_and_spare_the_others(plugins: Path,
                                                              tmp_path: Path) -> None:
    from blktap.errors import BlktapError
    from blktap.tapdisk.drivers import IMPLEMENTED, KNOWN, registry, split_type

    def refused(spec: str) -> BlktapError:
        with pytest.raises(BlktapError) as info:
            split_type(spec)
        return info.value

    err = refused("broken:/x")
    assert err.errno == errno.ELIBBAD
    assert "plugin 'broken' (bad_broken:Driver, from blktap-bad-drivers 0.1) failed to " \
           "load: ModuleNotFoundError" in str(err)
    err = refused("oldapi:/x")
    assert err.errno == errno.ELIBBAD and "written for driver API 2; this blktap has " \
        "API 1" in str(err)
    err = refused("notdriver:/x")
    assert err.errno == errno.ELIBBAD and "not a blktap.driver.Driver subclass" in str(err)
    # The rest of the table is as it was, and the working plugins work.
    assert split_type("chunks:/d") == ("chunks", "/d")
    assert split_type("aio:/x") == ("aio", "/x")
    assert refused("vmdk:/x").errno == errno.ENOSYS
    err = refused("nosuch:/x")
    assert err.errno == errno.ENOENT and "chunks" in str(err) and "overlay" in str(err)
    assert IMPLEMENTED == ("aio", "vhd", "ram", "qcow", "valve", "nbd", "qcow2", "rbd") \
        and "vmdk" in KNOWN
    # A plugin named like a built-in is skipped, the built-in kept.
    assert registry.table()["aio"].plugin is False
    assert "built-in driver of that name wins" in registry.skipped()["aio"]
    res = run([tool("blktap"), "drivers", "--json"], text=True, env=os.environ)
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert res.returncode == 0, res.stderr
    assert rows["chunks"]["status"] == "plugin" and rows["vhd"]["status"] == "built-in"
    assert rows["broken"]["status"] == "broken" and rows["vmdk"]["status"] == "not built"
    assert rows["oldapi"]["status"] == "broken"


def test_open_errors_of_plugins(plugins: Path, tmp_path: Path) -> None:
    img = tmp_path / "a.img"
    img.write_bytes(bytes(MiB))

    def serve_fails(spec: str, *extra: str) -> tuple[int, str]:
        res = run([tool("blktap"), "serve", spec, "--socket", str(tmp_path / "s.sock"),
                   *extra], text=True, timeout=60)
        assert res.returncode != 0
        return res.returncode, res.stderr

    code, err = serve_fails("raiser:foo")
    assert code == errno.EIO and "plugin 'raiser' (bad_drivers:Raiser, from " \
        "blktap-bad-drivers 0.1) failed to open: ValueError: no disk named foo" in err
    code, err = serve_fails("liar:x")
    assert code == errno.EINVAL and "declares Caps.ZERO but does not implement" in err
    code, err = serve_fails("shorty:x")  # read-only driver asked to be writable
    assert code == errno.EROFS and "cannot be written (no Caps.WRITE)" in err
    code, err = serve_fails("broken:x")
    assert code == errno.ELIBBAD and "ModuleNotFoundError" in err


def test_a_misbehaving_plugin_fails_requests_not_the_server(plugins: Path,
                                                            tmp_path: Path) -> None:
    with serve("shorty:x", tmp_path, "--read-only") as srv:
        for cmd in ("read 0 4k", "read 4k 4k"):
            res = qemu_io(srv.uri, cmd, ok=False, ro=True)
            assert "Input/output error" in res.stdout + res.stderr, cmd
        qemu_io(srv.uri, "read -P 0x5a 8k 1016k", ro=True)
        res = run([need("nbdinfo"), "--map", srv.uri], text=True)
        assert res.returncode != 0
        qemu_io(srv.uri, "read -P 0x5a 64k 64k", ro=True)
        srv.stop()
        log = srv.stderr
    assert srv.proc.returncode == 0, log
    assert "shorty:x: read failed: x: the shorty driver read 1 bytes of 4096 at 0" in log
    assert "block_status failed: x: the shorty driver answered block status" in log, log
    assert "RuntimeError: the plugin tripped" in log, log


# ------------------------------------------------------------------ stacking
def test_a_plugin_names_its_parent(plugins: Path, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from blktap.errors import BlktapError
    from blktap.io.threads import ThreadEngine
    from blktap.tapdisk.drivers import open_stack

    base = tmp_path / "base.img"
    base.write_bytes(b"\x33" * MiB)
    spec = tmp_path / "delta"
    spec.write_text(f"aio:{base} {MiB}\n")
    with serve(f"delta:{spec}", tmp_path, "--read-only") as srv:
        qemu_io(srv.uri, "read -P 0x33 0 1M", ro=True)

    async def body() -> None:
        engine = ThreadEngine(2)

        async def refused(text: str) -> BlktapError:
            spec.write_text(text)
            with pytest.raises(BlktapError) as info:
                await engine.call(open_stack, engine, f"delta:{spec}", writable=False)
            return info.value

        try:
            drv = await engine.call(open_stack, engine, f"delta:{spec}", writable=False)
            assert drv.parent is not None and drv.parent.path == str(base)
            assert [d.name for d in drv.chain()] == ["delta", "aio"]
            assert not drv.parent.writable
            for d in drv.chain():
                await d.close()
            fds = len(os.listdir("/proc/self/fd"))
            assert (await refused(f"aio:{base} 4096\n")).errno == errno.EINVAL  # validate
            assert len(os.listdir("/proc/self/fd")) == fds  # the parent opened was closed
            assert (await refused(f"delta:{spec} {MiB}\n")).errno == errno.ELOOP
            assert (await refused(f"{base} {MiB}\n")).errno == errno.EINVAL  # untyped
            assert (await refused(f"vmdk:{base} {MiB}\n")).errno == errno.ENOSYS
            elsewhere = tmp_path / "allowed"
            elsewhere.mkdir()
            monkeypatch.setenv("BLKTAP_PARENT_DIRS", str(elsewhere))
            err = await refused(f"aio:{base} {MiB}\n")
            assert err.errno == errno.EACCES and "outside the allowed parent" in str(err)
        finally:
            engine.close()

    asyncio.run(body())
    # A writable stack does not open the parent writable: delta declares no WRITE.
    monkeypatch.delenv("BLKTAP_PARENT_DIRS")
    spec.write_text(f"aio:{base} {MiB}\n")
    res = run([tool("blktap"), "serve", f"delta:{spec}", "--socket",
               str(tmp_path / "w.sock")], text=True, timeout=60)
    assert res.returncode == errno.EROFS, res.stderr


def test_a_filter_over_a_vhd_chain(plugins: Path, tmp_path: Path) -> None:
    """The layer a filter wraps is opened by the same code as any disk: here a VHD
    snapshot with its base, read-only under the overlay, the chain's files unchanged."""
    raw = tmp_path / "content.raw"
    raw.write_bytes(b"\x61" * MiB + bytes(3 * MiB))
    base, leaf = tmp_path / "base.vhd", tmp_path / "leaf.vhd"
    for argv in (["convert", "-O", "vhd", str(raw), str(base)],
                 ["snapshot", str(leaf), str(base)]):
        res = run([tool("blktap"), *argv], text=True)
        assert res.returncode == 0, res.stderr
    before = leaf.read_bytes(), base.read_bytes()
    with serve(f"overlay:vhd:{leaf}", tmp_path) as srv:
        qemu_io(srv.uri, "read -P 0x61 0 1M", "read -P 0 1M 3M", "write -P 0x62 512k 1M",
                "read -P 0x62 512k 1M", "read -P 0x61 0 512k")
    assert (leaf.read_bytes(), base.read_bytes()) == before
