"""Guest-written content must never lead us to a host file (issue 21, docs/security.md).

The attack, exactly as reported: a differencing VHD whose parent is a host file (made with
``vhd-util snapshot -m``) is copied with dd to offset 0 of a raw guest disk; the guest
disk, named by a plain path, probes as that VHD. Every entry point must then refuse to open
the host file, and its bytes must never come back (read over NBD with nbdcopy where the
disk is served). Naming the format still follows parents; ``BLKTAP_PARENT_DIRS`` and
``--parent-dir`` confine where parents may come from.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blktap.daemon.tapdisk import typed_spec
from blktap.errors import ParentNotAllowed, ProbedParent, UsageError
from blktap.image import Chain, open_chain
from blktap.image.parents import ParentPolicy
from blktap.image.vhd import create, snapshot
from blktap.tapdisk.drivers import open_stack, parse, require_type
from conftest import need, run, tool, with_engine
from loopdev import loop_device  # noqa: F401 - a fixture

MiB = 1 << 20
SECRET = b"HOST-SECRET-4f1d"  # 16 bytes, repeated over the whole host file
SECRET_SIZE = 4 * MiB
GUEST_SIZE = 64 * MiB


def blktap(*args: object, env: dict[str, str] | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess:
    return run([tool("blktap"), *map(str, args)], text=True, timeout=timeout, env=env)


def vhd_util(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run([tool("vhd-util"), *map(str, args)], text=True, timeout=60, env=env)


def one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


class Attack:
    """host/secret (the file to protect) and guest/guest.img (the raw guest disk with a
    differencing VHD naming the secret written at offset 0)."""

    def __init__(self, tmp: Path) -> None:
        self.host_dir = tmp / "host"
        self.guest_dir = tmp / "guest"
        self.host_dir.mkdir()
        self.guest_dir.mkdir()
        self.secret = self.host_dir / "secret"
        self.secret.write_bytes(SECRET * (SECRET_SIZE // len(SECRET)))
        # Made beside the guest disk, so that its relative locator resolves from there.
        evil = self.guest_dir / "evil.vhd"
        proc = vhd_util("snapshot", "-n", evil, "-p", self.secret, "-m")
        assert proc.returncode == 0, proc.stderr
        self.guest = self.guest_dir / "guest.img"
        with open(self.guest, "wb") as f:
            f.truncate(GUEST_SIZE)
        proc = run(["dd", f"if={evil}", f"of={self.guest}", "conv=notrunc", "status=none"])
        assert proc.returncode == 0, proc.stderr
        evil.unlink()
        self.secret_bytes = self.secret.read_bytes()
        self.guest_bytes = self.guest.read_bytes()

    def secret_untouched(self) -> bool:
        """Neither the host file nor the guest disk was changed."""
        return (self.secret.read_bytes() == self.secret_bytes
                and self.guest.read_bytes() == self.guest_bytes)


@pytest.fixture
def attack(tmp_path: Path) -> Attack:
    return Attack(tmp_path)


def test_the_setup_is_a_real_attack(attack: Attack) -> None:
    """Named as a VHD, the guest disk does reach the secret: the refusals below are about
    probing, not about a broken test image."""
    with Chain.open(f"vhd:{attack.guest}") as chain:
        assert len(chain) == 2
        assert os.path.samefile(chain.layers[1].path, attack.secret)
        assert bytes(chain.pread(0, 64)) == SECRET * 4


# ------------------------------------------------------------------ the blktap command
@pytest.mark.parametrize("argv", [
    ["info", "{g}"], ["info", "--json", "{g}"], ["map", "{g}"], ["map", "--json", "{g}"],
    ["convert", "{g}", "{d}/out.raw"], ["convert", "-O", "vhd", "{g}", "{d}/out.vhd"],
    ["compare", "{g}", "{d}/zeros.raw"], ["compare", "--json", "{d}/zeros.raw", "{g}"],
    ["snapshot", "{d}/child.vhd", "{g}"], ["coalesce", "{g}"],
    ["rebase", "{g}", "{d}/zeros.raw", "--raw-parent"], ["rebase", "vhd:{d}/zeros.vhd", "{g}"],
])
def test_blktap_refuses_a_probed_parent(attack: Attack, tmp_path: Path,
                                        argv: list[str]) -> None:
    zeros = tmp_path / "zeros.raw"
    with open(zeros, "wb") as f:
        f.truncate(SECRET_SIZE)
    other = tmp_path / "zeros.vhd"
    create(str(tmp_path / "zbase.vhd"), SECRET_SIZE)
    snapshot(str(other), str(tmp_path / "zbase.vhd"))
    before = {p.name for p in tmp_path.iterdir()}
    proc = blktap(*[a.format(g=attack.guest, d=tmp_path) for a in argv])
    line = one_line(proc)
    # compare keeps 1 for "they differ": its errors are at least 2.
    assert proc.returncode == (2 if argv[0] == "compare" else errno.EPERM)
    assert "probed" in line and f"vhd:{attack.guest}" in line
    assert proc.stdout == ""
    assert SECRET.decode() not in proc.stdout + proc.stderr
    assert {p.name for p in tmp_path.iterdir()} == before  # nothing written
    assert attack.secret_untouched()


def test_blktap_follows_parents_when_the_format_is_named(attack: Attack,
                                                          tmp_path: Path) -> None:
    proc = blktap("info", f"vhd:{attack.guest}")
    assert proc.returncode == 0, proc.stderr
    assert str(attack.secret) in proc.stdout
    out = tmp_path / "flat.raw"
    assert blktap("convert", f"vhd:{attack.guest}", out).returncode == 0
    assert out.read_bytes()[:32] == SECRET * 2
    # Named raw, the guest disk is what the guest wrote: a VHD's bytes, no secret.
    out2 = tmp_path / "asis.raw"
    assert blktap("convert", f"raw:{attack.guest}", out2).returncode == 0
    assert out2.read_bytes() == attack.guest.read_bytes()
    assert SECRET not in out2.read_bytes()


# ------------------------------------------------------------------ blktap serve
class Serving:
    """``blktap serve`` started in the background: either it exits (refused) or it
    prints its URI and serves until stopped."""

    def __init__(self, spec: str, sock: Path, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [tool("blktap"), "serve", spec, "--socket", str(sock)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.uri = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.proc.poll() is None:
            if select.select([self.proc.stdout], [], [], 0.2)[0]:
                self.uri = self.proc.stdout.readline().strip()  # type: ignore[union-attr]
                break

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err


@pytest.fixture
def served() -> Iterator[list[Serving]]:
    started: list[Serving] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.communicate(timeout=30)


def read_export(uri: str, dest: Path) -> bytes:
    proc = run([need("nbdcopy"), uri, str(dest)], text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return dest.read_bytes()


def test_serve_refuses_a_probed_parent(attack: Attack, tmp_path: Path,
                                       served: list[Serving]) -> None:
    s = Serving(str(attack.guest), tmp_path / "nbd.sock")
    served.append(s)
    if s.uri:  # served: whatever it serves must not be the host file
        data = read_export(s.uri, tmp_path / "got.raw")
        assert SECRET not in data
    code, err = s.stop()
    assert code == errno.EPERM
    assert err.count("\n") == 1 and f"vhd:{attack.guest}" in err
    assert attack.secret_untouched()


def test_serve_warns_about_a_probed_format(tmp_path: Path, served: list[Serving]) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\x5a" * MiB)
    s = Serving(str(disk), tmp_path / "a.sock")
    served.append(s)
    assert s.uri
    assert read_export(s.uri, tmp_path / "a.raw") == disk.read_bytes()
    code, err = s.stop()
    assert code == 0
    assert "warning" in err and "probed as raw" in err and f"aio:{disk}" in err
    # Named, it is served without a word.
    s = Serving(f"aio:{disk}", tmp_path / "b.sock")
    served.append(s)
    assert s.uri
    code, err = s.stop()
    assert code == 0 and err == ""


def test_serve_named_raw_serves_the_guest_bytes(attack: Attack, tmp_path: Path,
                                                served: list[Serving]) -> None:
    s = Serving(f"aio:{attack.guest}", tmp_path / "nbd.sock")
    served.append(s)
    assert s.uri
    data = read_export(s.uri, tmp_path / "got.raw")
    assert data == attack.guest.read_bytes() and SECRET not in data
    assert s.stop()[0] == 0


# ------------------------------------------------------------------ tap-ctl and tapdisk
class TapHost:
    def __init__(self, tmp: Path, **env: str) -> None:
        self.run_dir = tmp / "run"
        self.env = dict(os.environ, BLKTAP_CONTROL_DIR=str(self.run_dir),
                        BLKTAP_LOG_DIR=str(tmp / "log"), TAPDISK=tool("tapdisk"), **env)

    def tap_ctl(self, *args: str) -> subprocess.CompletedProcess:
        return run([tool("tap-ctl"), *args], text=True, env=self.env, timeout=120)

    def pids(self) -> list[int]:
        out = self.tap_ctl("list").stdout
        return [int(f.split("=")[1]) for line in out.splitlines()
                for f in line.split(" ", 3) if f.startswith("pid=")]

    def kill_all(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def taphost(tmp_path: Path) -> Iterator[TapHost]:
    h = TapHost(tmp_path)
    yield h
    h.kill_all()


def test_tap_ctl_create_needs_a_type(attack: Attack, taphost: TapHost,
                                     tmp_path: Path) -> None:
    proc = taphost.tap_ctl("create", "-a", str(attack.guest))
    if proc.returncode == 0:  # opened: whatever it serves must not be the host file
        minor = proc.stdout.strip().rsplit("-", 1)[1]
        pid = taphost.pids()[0]
        uri = f"nbd+unix:///?socket={taphost.run_dir}/nbd{pid}.{minor}"
        assert SECRET not in read_export(uri, tmp_path / "got.raw")
    assert proc.returncode == errno.EINVAL, proc.stderr
    assert taphost.pids() == []  # the tapdisk it spawned is gone
    # Named raw, the guest's own bytes are served.
    proc = taphost.tap_ctl("create", "-a", f"aio:{attack.guest}")
    assert proc.returncode == 0, proc.stderr
    minor = proc.stdout.strip().rsplit("-", 1)[1]
    pid = taphost.pids()[0]
    uri = f"nbd+unix:///?socket={taphost.run_dir}/nbd{pid}.{minor}"
    data = read_export(uri, tmp_path / "asis.raw")
    assert data == attack.guest.read_bytes() and SECRET not in data
    assert attack.secret_untouched()


def test_tap_ctl_unpause_needs_a_type(attack: Attack, taphost: TapHost,
                                      tmp_path: Path) -> None:
    """A paused disk resumed onto a path without a type stays paused, as it was; the
    guest disk never becomes its leaf."""
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(GUEST_SIZE)
    proc = taphost.tap_ctl("create", "-a", f"aio:{disk}")
    assert proc.returncode == 0, proc.stderr
    minor = proc.stdout.strip().rsplit("-", 1)[1]
    pid = str(taphost.pids()[0])
    assert taphost.tap_ctl("pause", "-p", pid, "-m", minor).returncode == 0
    proc = taphost.tap_ctl("unpause", "-p", pid, "-m", minor, "-a", str(attack.guest))
    assert proc.returncode == errno.EINVAL, proc.stderr
    listing = taphost.tap_ctl("list").stdout
    assert f"args=aio:{disk}" in listing and str(attack.guest) not in listing
    assert taphost.tap_ctl("unpause", "-p", pid, "-m", minor).returncode == 0
    uri = f"nbd+unix:///?socket={taphost.run_dir}/nbd{pid}.{minor}"
    assert SECRET not in read_export(uri, tmp_path / "got.raw")
    assert attack.secret_untouched()


def test_tapdisk_honours_parent_dirs(tmp_path: Path) -> None:
    images, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    images.mkdir()
    elsewhere.mkdir()
    create(str(elsewhere / "base.vhd"), 8 * MiB)
    snapshot(str(images / "leaf.vhd"), str(elsewhere / "base.vhd"))
    h = TapHost(tmp_path, BLKTAP_PARENT_DIRS=str(images))
    try:
        proc = h.tap_ctl("create", "-a", f"vhd:{images / 'leaf.vhd'}")
        assert proc.returncode == errno.EACCES, proc.stderr
        assert h.pids() == []
    finally:
        h.kill_all()
    h = TapHost(tmp_path, BLKTAP_PARENT_DIRS=f"{images}:{elsewhere}")
    try:
        proc = h.tap_ctl("create", "-a", f"vhd:{images / 'leaf.vhd'}")
        assert proc.returncode == 0, proc.stderr
    finally:
        h.kill_all()


def test_daemon_spec_needs_a_type(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as exc:
        typed_spec(str(tmp_path / "d.img"))
    assert exc.value.errno == errno.EINVAL and "TYPE:PATH" in str(exc.value)
    assert typed_spec(f"aio:{tmp_path}/d.img") == f"aio:{tmp_path}/d.img"
    with pytest.raises(UsageError):
        require_type("/x")
    assert require_type("vhd:/x") == ("vhd", "/x")


# ------------------------------------------------------------------ the library
def test_library_refuses_a_probed_parent(attack: Attack) -> None:
    for opener in (Chain.open, open_chain):
        with pytest.raises(ProbedParent) as exc:
            opener(str(attack.guest))
        err = exc.value
        assert err.errno == errno.EPERM and isinstance(err, ParentNotAllowed)
        assert err.image == str(attack.guest) and err.parent.endswith("host/secret")
    # The caller may say so: then the parent is followed.
    with Chain.open(str(attack.guest), follow_probed_parents=True) as chain:
        assert len(chain) == 2
    # A probed raw or non-differencing image opens as before.
    with Chain.open(str(attack.secret)) as chain:
        assert len(chain) == 1


def test_open_stack_refuses_a_probed_parent(attack: Attack) -> None:
    assert parse(str(attack.guest)) == ("vhd", str(attack.guest))  # still probed

    async def body(engine: object) -> None:
        with pytest.raises(ProbedParent):
            await engine.call(open_stack, engine, str(attack.guest),  # type: ignore[attr-defined]
                              writable=False)
        drv = await engine.call(open_stack, engine,  # type: ignore[attr-defined]
                                f"aio:{attack.guest}", writable=False)
        await drv.close()
    with_engine(body)


# ------------------------------------------------------------------ confinement
@pytest.fixture
def split_chain(tmp_path: Path) -> tuple[Path, Path, Path]:
    """leaf.vhd in images/, its parent base.vhd in elsewhere/."""
    images, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    images.mkdir()
    elsewhere.mkdir()
    create(str(elsewhere / "base.vhd"), 8 * MiB)
    with Chain.open(f"vhd:{elsewhere / 'base.vhd'}", writable=True) as chain:
        chain.pwrite(0, b"\x11" * 4096)
    snapshot(str(images / "leaf.vhd"), str(elsewhere / "base.vhd"))
    return images / "leaf.vhd", images, elsewhere


def test_parent_dirs_library(split_chain: tuple[Path, Path, Path],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    leaf, images, elsewhere = split_chain
    spec = f"vhd:{leaf}"
    with pytest.raises(ParentNotAllowed) as exc:
        Chain.open(spec, parent_policy=ParentPolicy.confined_to([str(images)]))
    assert exc.value.errno == errno.EACCES and "outside" in str(exc.value)
    with Chain.open(spec, parent_policy=ParentPolicy.confined_to([str(elsewhere)])) as c:
        assert bytes(c.pread(0, 16)) == b"\x11" * 16
    monkeypatch.setenv("BLKTAP_PARENT_DIRS", str(images))
    with pytest.raises(ParentNotAllowed):
        Chain.open(spec)
    monkeypatch.setenv("BLKTAP_PARENT_DIRS", f"{images}:{elsewhere}")
    Chain.open(spec).close()
    # An explicit policy wins over the environment.
    Chain.open(spec, parent_policy=ParentPolicy()).close()
    monkeypatch.setenv("BLKTAP_PARENT_DIRS", str(images / "missing"))
    with pytest.raises(UsageError) as uexc:
        Chain.open(spec)
    assert uexc.value.errno == errno.ENOTDIR and "BLKTAP_PARENT_DIRS" in str(uexc.value)


def test_parent_dir_option_and_env(split_chain: tuple[Path, Path, Path]) -> None:
    leaf, images, elsewhere = split_chain
    spec = f"vhd:{leaf}"
    for argv in (["info", spec], ["map", spec], ["convert", spec, f"{images}/o.raw"],
                 ["compare", spec, spec], ["coalesce", spec],
                 ["snapshot", f"{images}/s.vhd", spec, "--no-skip-empty",
                  "--depth-limit", "5"]):
        proc = blktap(*argv, "--parent-dir", images)
        assert proc.returncode == errno.EACCES, argv
        assert "outside the allowed parent directories" in one_line(proc)
    assert blktap("info", spec, "--parent-dir", elsewhere).returncode == 0
    env = dict(os.environ, BLKTAP_PARENT_DIRS=str(images))
    assert blktap("info", spec, env=env).returncode == errno.EACCES
    # The option takes the place of the environment.
    assert blktap("info", spec, "--parent-dir", elsewhere, env=env).returncode == 0
    proc = blktap("info", spec, "--parent-dir", images / "nope")
    assert proc.returncode == errno.ENOTDIR and "not a directory" in one_line(proc)
    # serve too: refused before it listens.
    proc = blktap("serve", spec, "--socket", images / "s.sock", "--parent-dir", images)
    assert proc.returncode == errno.EACCES and "outside" in one_line(proc)
    assert not (images / "s.sock").exists()


def test_device_parents(tmp_path: Path, loop_device) -> None:  # noqa: ANN001, F811
    """A block device is a parent like a file, but counts by its real node: confined to
    the images' folder it is refused; listing /dev lets it in."""
    backing = tmp_path / "backing.raw"
    backing.write_bytes(b"\x77" * MiB)
    dev = loop_device(backing)
    images = tmp_path / "images"
    images.mkdir()
    leaf = images / "leaf.vhd"
    snapshot(str(leaf), dev, raw_parent=True)
    with Chain.open(f"vhd:{leaf}") as chain:  # no confinement: as before
        assert bytes(chain.pread(0, 4)) == b"\x77" * 4
    confined = ParentPolicy.confined_to([str(images)])
    with pytest.raises(ParentNotAllowed) as exc:
        Chain.open(f"vhd:{leaf}", parent_policy=confined)
    assert dev in str(exc.value)
    with Chain.open(f"vhd:{leaf}", parent_policy=ParentPolicy.confined_to(
            [str(images), "/dev"])) as chain:
        assert bytes(chain.pread(0, 4)) == b"\x77" * 4


def test_symlink_escape_is_refused(split_chain: tuple[Path, Path, Path],
                                   tmp_path: Path) -> None:
    """A parent reached through a symlink in an allowed folder counts where it really is."""
    _, images, elsewhere = split_chain
    (images / "base-link.vhd").symlink_to(elsewhere / "base.vhd")
    create(str(images / "base.vhd"), 8 * MiB)
    leaf = images / "leaf2.vhd"
    snapshot(str(leaf), str(images / "base.vhd"))
    # Swap the real parent for a link to the outside one (same uuid: a copy's identity).
    (images / "base.vhd").unlink()
    (images / "base.vhd").symlink_to(elsewhere / "base.vhd")
    policy = ParentPolicy.confined_to([str(images)])
    with pytest.raises(ParentNotAllowed) as exc:
        Chain.open(f"vhd:{leaf}", check_parent_uuid=False, parent_policy=policy)
    assert str(elsewhere / "base.vhd") in str(exc.value)
    # Through a symlinked allowed folder, a parent really inside it is fine.
    (tmp_path / "alias").symlink_to(elsewhere)
    policy = ParentPolicy.confined_to([str(tmp_path / "alias")])
    Chain.open(f"vhd:{leaf}", check_parent_uuid=False, parent_policy=policy).close()


def test_a_fifo_is_never_a_parent(tmp_path: Path) -> None:
    """A parent that is not a regular file or block device is refused before it is opened
    (opening a FIFO would block forever)."""
    raw = tmp_path / "base.raw"
    raw.write_bytes(bytes(MiB))
    leaf = tmp_path / "leaf.vhd"
    snapshot(str(leaf), str(raw), raw_parent=True)
    raw.unlink()
    os.mkfifo(raw)
    proc = blktap("info", f"vhd:{leaf}", timeout=30)
    assert proc.returncode == errno.EACCES
    assert "not a regular file or a block device" in one_line(proc)


def test_vhd_util_is_unchanged_unless_confined(split_chain: tuple[Path, Path, Path]) -> None:
    leaf, images, elsewhere = split_chain
    plain = vhd_util("query", "-n", leaf, "-d")
    assert plain.returncode == 0 and plain.stdout == "chain depth: 2\n"
    env = dict(os.environ, BLKTAP_PARENT_DIRS=f"{images}:{elsewhere}")
    assert vhd_util("query", "-n", leaf, "-d", env=env).stdout == plain.stdout
    env = dict(os.environ, BLKTAP_PARENT_DIRS=str(images))
    assert vhd_util("query", "-n", leaf, "-d", env=env).returncode != 0
    before = (elsewhere / "base.vhd").read_bytes()
    proc = vhd_util("coalesce", "-n", leaf, env=env)
    assert proc.returncode == errno.EACCES
    assert (elsewhere / "base.vhd").read_bytes() == before
    proc = vhd_util("check", "-n", leaf, "-p", env=env)
    assert proc.returncode == errno.EACCES
