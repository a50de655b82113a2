"""The xl hotplug script (add/remove) with our real tapdisk, and tapback following what it
wrote, against the fake xenstored. No Xen: the ring itself cannot be mapped here, so the
tapdisk refuses XENBLKIF_CONNECT and tapback must close that VBD cleanly."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys

import pytest

from blktap.control.client import TapCtl
from blktap.control.rundir import RunDir
from blktap.errors import BlktapError
from blktap.tapback import hotplug
from blktap.tapback.daemon import Tapback
from blktap.tapback.link import ControlLink, parse_target
from blktap.tapback.xenstore import XenStore
from xen_fakes import FakeXenstored

BE = "/local/domain/0/backend/vbd/5/51712"
FE = "/local/domain/5/device/vbd/51712"
SRC = os.path.join(os.path.dirname(__file__), "..", "src")


@pytest.fixture
def rundir(tmp_path, monkeypatch):
    d = tmp_path / "run"
    monkeypatch.setenv("BLKTAP_CONTROL_DIR", str(d))
    return RunDir(str(d))


def run(tmp_path, body, timeout=120.0):
    async def main():
        fake = await FakeXenstored(str(tmp_path / "xs.sock")).start()
        xs = await XenStore.open(fake.path)
        try:
            await asyncio.wait_for(body(fake, xs), timeout)
        finally:
            await xs.close()
            await fake.stop()
    asyncio.run(main())


def backend(fake, params, mode="w"):
    for k, v in {"params": params, "mode": mode, "frontend": FE, "frontend-id": "5",
                 "state": "2", "online": "1"}.items():
        fake.write(f"{BE}/{k}", v)


def test_image_spec():
    assert hotplug.image_spec("vhd:/srv/a.vhd") == "vhd:/srv/a.vhd"
    assert hotplug.image_spec("tap:aio:/srv/a.img") == "aio:/srv/a.img"
    assert hotplug.image_spec("/no/such/file.img") == "aio:/no/such/file.img"
    with pytest.raises(BlktapError):
        hotplug.image_spec(" ")


@pytest.mark.parametrize("xenbus_path", [BE, BE.removeprefix("/local/domain/0/")],
                         ids=["absolute", "relative-as-libxl-passes-it"])
def test_add_then_remove_with_a_real_tapdisk(tmp_path, rundir, xenbus_path):
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * (1 << 20))
    ctl = TapCtl(rundir)

    async def body(fake, xs):
        backend(fake, str(img))
        sock = await hotplug.add(xs, xenbus_path, ctl)
        assert fake.read(f"{BE}/hotplug-status") == "connected"
        assert fake.read(f"{BE}/physical-device-path") == sock
        target = parse_target(sock)
        assert (str(target.tid), str(target.minor)) == (fake.read(f"{BE}/pid"),
                                                        fake.read(f"{BE}/minor"))
        assert os.path.exists(sock)  # the NBD export is up
        entries = ctl.list_all()
        assert [(e.type, e.path) for e in entries] == [("aio", str(img))]
        info = ctl.disk_info(target.tid, target.minor)
        assert (info.sectors, info.sector_size) == (2048, 512)
        await hotplug.remove(xs, xenbus_path)
        assert ctl.list_all() == []
    run(tmp_path, body)


def test_add_failure_is_reported_and_leaves_nothing(tmp_path, rundir):
    ctl = TapCtl(rundir)

    async def body(fake, xs):
        backend(fake, "vhd:" + str(tmp_path / "missing.vhd"))
        with pytest.raises(BlktapError):
            await hotplug.add(xs, BE, ctl)
        await hotplug.report_failure(xs, BE, "it broke")
        assert fake.read(f"{BE}/hotplug-status") == "error"
        assert fake.read(f"{BE}/hotplug-error") == "it broke"
        assert fake.read(f"{BE}/physical-device-path") is None
        assert ctl.list_all() == []
    run(tmp_path, body)


def test_remove_of_a_tapdisk_already_gone(tmp_path, rundir):
    async def body(fake, xs):
        backend(fake, "/x")
        fake.write(f"{BE}/pid", "999999")
        fake.write(f"{BE}/minor", "3")
        await hotplug.remove(xs, BE, TapCtl(rundir))  # no error
        fake.rm(f"{BE}/pid")
        await hotplug.remove(xs, BE, TapCtl(rundir))  # nothing recorded: nothing to do
    run(tmp_path, body)


def test_hotplug_command(tmp_path, rundir):
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * (1 << 20))

    async def body(fake, xs):
        backend(fake, str(img), mode="r")
        env = dict(os.environ, XENBUS_PATH=BE, XENSTORED_PATH=fake.path, PYTHONPATH=SRC)

        async def script(action):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "blktap.cli.xen_hotplug", action, env=env,
                stderr=asyncio.subprocess.PIPE)
            _, err = await proc.communicate()
            return proc.returncode, err.decode()
        rc, err = await script("add")
        assert rc == 0, err
        assert fake.read(f"{BE}/hotplug-status") == "connected"
        entries = TapCtl(rundir).list_all()
        assert len(entries) == 1 and entries[0].path == str(img)
        rc, err = await script("remove")
        assert rc == 0, err
        assert TapCtl(rundir).list_all() == []
        rc, err = await script("bogus")
        assert rc == errno.EINVAL and "usage" in err
    run(tmp_path, body)


def test_tapback_with_our_tapdisk_up_to_the_ring(tmp_path, rundir):
    """InitWait, the hotplug script, DISK_INFO from the real tapdisk, then a CONNECT that
    this machine cannot honour (no Xen): the VBD goes to Closing, the tapdisk lives on."""
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * (3 << 20))
    ctl = TapCtl(rundir)

    async def body(fake, xs):
        tb = Tapback(xs, ControlLink(), name="vbd")
        await tb.start()
        task = asyncio.get_running_loop().create_task(tb.run())
        try:
            for k, v in {f"{FE}/state": "1", f"{FE}/device-type": "disk"}.items():
                fake.write(k, v)
            backend(fake, str(img))
            fake.write(f"{BE}/state", "1")

            async def until(cond):
                for _ in range(3000):
                    if cond():
                        return
                    await asyncio.sleep(0.01)
                raise AssertionError(fake.dump("/local/domain"))
            await until(lambda: fake.read(f"{BE}/state") == "2")
            await hotplug.add(xs, BE, ctl)
            await until(lambda: fake.read(f"{BE}/sectors") == "6144")
            for k, v in {"ring-ref": "8", "event-channel": "3", "protocol": "x86_64-abi",
                         "state": "3"}.items():
                fake.write(f"{FE}/{k}", v)
            await until(lambda: fake.read(f"{BE}/state") == "5")
            assert [e.path for e in ctl.list_all()] == [str(img)]
            await hotplug.remove(xs, BE, ctl)
            assert ctl.list_all() == []
        finally:
            tb.stop()
            await task
    run(tmp_path, body)


def test_script_entry_point_is_declared():
    text = open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml")).read()
    assert 'blktap-xen-hotplug = "blktap.cli.xen_hotplug:main"' in text
    assert 'tapback = "blktap.cli.tapback:main"' in text
    out = subprocess.run([sys.executable, "-m", "blktap.cli.tapback", "--help"],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=SRC))
    for flag in ("-d", "-v", "-n", "-x", "-b", "-p"):
        assert f" {flag}" in out.stdout
