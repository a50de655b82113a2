"""New files are built out of sight and take their name only when complete: a process
killed while building one (SIGKILL included) leaves neither a partial file under the real
name nor a hidden ``.blktap-*`` folder beside it. Where unnamed files (O_TMPFILE) are not
available, the private folder a dead process left is removed by the next build there."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from blktap.image import fileio
from blktap.image.fileio import STAGE_PREFIX, staged_path
from conftest import run, tool

MiB = 1 << 20
SIZE = 200 * MiB


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 200 MiB sparse raw image with 1 MiB of data in every 2 MiB (100 MiB to copy)."""
    src = tmp_path_factory.mktemp("src") / "src.img"
    with open(src, "wb") as f:
        f.truncate(SIZE)
        for off in range(0, SIZE, 2 * MiB):
            f.seek(off)
            f.write(os.urandom(MiB))
    return src


def stage_fds(pid: int, folder: Path) -> list[str]:
    """The /proc paths of the regular files ``pid`` has open in ``folder`` (or in a
    folder inside it): the file it is building."""
    out = []
    prefix = f"{folder}/"
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for n in names:
        link = f"/proc/{pid}/fd/{n}"
        try:
            if os.readlink(link).startswith(prefix) and stat.S_ISREG(os.stat(link).st_mode):
                out.append(link)
        except OSError:
            pass
    return out


def stop_while_building(proc: subprocess.Popen, folder: Path, bytes_at_least: int) -> bool:
    """Poll until ``proc`` builds its file with at least that many bytes allocated, and
    SIGSTOP it there. False if it finished first (the trial is then a complete run)."""
    while proc.poll() is None:
        for link in stage_fds(proc.pid, folder):
            try:
                allocated = os.stat(link).st_blocks * 512
            except OSError:
                continue
            if allocated >= bytes_at_least:
                os.kill(proc.pid, signal.SIGSTOP)
                # Still building once stopped: the file is not published yet (or is
                # being published: then the target appears, complete).
                return bool(stage_fds(proc.pid, folder))
    return False


def leftovers(folder: Path, keep: set[str]) -> set[str]:
    return {p.name for p in folder.iterdir()} - keep


def convert_argv(src: Path, dst: Path) -> list[str]:
    return [tool("blktap"), "convert", str(src), str(dst)]


def assert_complete(src: Path, dst: Path) -> None:
    """A target that exists is the whole disk (a raw copy equals its source)."""
    if dst.suffix == ".vhd":
        res = run([tool("vhd-util"), "check", "-n", str(dst)], text=True)
        assert res.returncode == 0, res.stdout
        res = run([tool("blktap"), "compare", str(src), str(dst)], text=True)
        assert res.returncode == 0, res.stdout + res.stderr
    else:
        with open(src, "rb") as a, open(dst, "rb") as b:
            assert a.read() == b.read()


@pytest.mark.parametrize("fmt", ["raw", "vhd"])
def test_sigkill_of_convert_leaves_nothing(tmp_path: Path, source: Path, fmt: str) -> None:
    """Killed at several points of the build: afterwards the folder holds nothing new (or,
    for a kill as it was being published, the complete target)."""
    dst = tmp_path / f"out.{fmt}"
    mid_build = 0
    for fraction in (0, 0.1, 0.4, 0.7, 0.95):
        proc = subprocess.Popen(convert_argv(source, dst), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        try:
            mid_build += stop_while_building(proc, tmp_path, int(fraction * SIZE / 2))
        finally:
            proc.kill()
            proc.wait()
            proc.stderr.close()  # type: ignore[union-attr]
        if dst.exists():
            assert_complete(source, dst)
            dst.unlink()
        assert leftovers(tmp_path, set()) == set(), fraction
    assert mid_build >= 1  # the kills did land inside builds


# What each signal that ends a command cleanly makes it say and exit with: 128 + the
# signal, as a shell reports for a process that signal killed.
CLEAN_SIGNALS = {
    signal.SIGTERM: (143, "terminated"),
    signal.SIGINT: (130, "interrupted"),
    signal.SIGHUP: (129, "hangup"),
}


def signal_mid_build(argv: list[str], folder: Path, signum: int, env: dict[str, str]
                     ) -> tuple[int, str]:
    """Run ``argv``, send ``signum`` once it is building its file, and return its exit
    code and stderr."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env, text=True)
    try:
        assert stop_while_building(proc, folder, SIZE // 8)
        os.kill(proc.pid, signum)
        os.kill(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


@pytest.mark.parametrize("signum", list(CLEAN_SIGNALS), ids=lambda s: signal.Signals(s).name)
@pytest.mark.parametrize("mode", ["tmpfile", "folder"])
def test_signal_of_convert_cleans_up(tmp_path: Path, source: Path, mode: str,
                                     signum: int) -> None:
    """SIGTERM (timeout, systemd), SIGINT (Ctrl-C) or SIGHUP (a closed terminal) mid-build:
    the command says so, exits 128 + the signal, and leaves nothing, with an unnamed file
    or with a private folder (whose cleanup runs on the way out)."""
    env = dict(os.environ, BLKTAP_NO_TMPFILE="1" if mode == "folder" else "")
    code, word = CLEAN_SIGNALS[signum]
    got = signal_mid_build(convert_argv(source, tmp_path / "out.vhd"), tmp_path, signum, env)
    assert got == (code, f"blktap: {word}\n")
    assert leftovers(tmp_path, set()) == set()


@pytest.mark.parametrize("signum", list(CLEAN_SIGNALS), ids=lambda s: signal.Signals(s).name)
def test_signal_of_vhd_util_copy_cleans_up(tmp_path: Path, source: Path, signum: int) -> None:
    """vhd-util copy, in folder mode (where a process killed outright would leave its
    folder until the next build): every clean signal removes it on the way out."""
    env = dict(os.environ, BLKTAP_NO_TMPFILE="1")
    src = tmp_path / "src.vhd"
    assert run(convert_argv(source, src), text=True).returncode == 0
    argv = [tool("vhd-util"), "copy", "-n", str(src), "-N", str(tmp_path / "copy.vhd")]
    code, _ = signal_mid_build(argv, tmp_path, signum, env)
    assert code == CLEAN_SIGNALS[signum][0]
    assert leftovers(tmp_path, {src.name}) == set()


def test_nohup_keeps_sighup_ignored(tmp_path: Path, source: Path) -> None:
    """Under nohup (SIGHUP ignored when the command starts) a hangup does not stop it."""
    dst = tmp_path / "out.raw"
    argv = ["nohup", *convert_argv(source, dst)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    try:
        assert stop_while_building(proc, tmp_path, SIZE // 8)
        os.kill(proc.pid, signal.SIGHUP)
        os.kill(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert_complete(source, dst)


def test_folder_mode_sigkill_is_cleaned_by_the_next_build(tmp_path: Path,
                                                          source: Path) -> None:
    """Without O_TMPFILE a SIGKILL leaves the dead process's folder; the next build in
    that folder removes it (its pid is dead and its flock free)."""
    env = dict(os.environ, BLKTAP_NO_TMPFILE="1")
    dst = tmp_path / "out.raw"
    proc = subprocess.Popen(convert_argv(source, dst), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    try:
        assert stop_while_building(proc, tmp_path, SIZE // 8)
    finally:
        proc.kill()
        proc.wait()
    [left] = leftovers(tmp_path, set())
    assert left.startswith(f"{STAGE_PREFIX}{proc.pid}-")
    res = run(convert_argv(source, tmp_path / "again.raw"), env=env, text=True)
    assert res.returncode == 0, res.stderr
    assert leftovers(tmp_path, set()) == {"again.raw"}


def test_sweep_spares_the_living(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only folders whose owner is dead and whose flock is free are removed: a live pid's
    folder stays, and so does a dead pid's that someone holds locked (a process of
    another pid namespace, a reused pid)."""
    import fcntl

    monkeypatch.setenv("BLKTAP_NO_TMPFILE", "1")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name in (f"{STAGE_PREFIX}{dead.pid}-a", f"{STAGE_PREFIX}{live.pid}-b",
                     f"{STAGE_PREFIX}{dead.pid}-c"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "img").write_bytes(b"partial")
        (tmp_path / f"{STAGE_PREFIX}{dead.pid}-d").write_bytes(b"a file named aside")
        (tmp_path / ".blktap-notmine").mkdir()  # not our naming: never touched
        held = os.open(tmp_path / f"{STAGE_PREFIX}{dead.pid}-c", os.O_RDONLY)
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            with staged_path(str(tmp_path / "new.img")) as tmp:
                Path(tmp).write_bytes(b"new")
        finally:
            os.close(held)
        assert leftovers(tmp_path, set()) == {
            "new.img", f"{STAGE_PREFIX}{live.pid}-b", f"{STAGE_PREFIX}{dead.pid}-c",
            ".blktap-notmine"}
    finally:
        live.kill()
        live.wait()


@pytest.mark.parametrize("mode", ["tmpfile", "folder"])
def test_staging_never_overwrites_and_replaces_on_request(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    monkeypatch.setenv("BLKTAP_NO_TMPFILE", "1" if mode == "folder" else "")
    dst = tmp_path / "img"
    with staged_path(str(dst)) as tmp:
        if mode == "tmpfile":
            assert tmp.startswith("/proc/self/fd/")  # the file system offers O_TMPFILE
        assert os.path.getsize(tmp) == 0
        with open(tmp, "r+b") as f:
            f.write(b"first")
        assert not dst.exists()
    assert dst.read_bytes() == b"first"
    # Someone else takes the name during the build: theirs is kept, ours refused.
    other = tmp_path / "other"
    with pytest.raises(fileio.FormatError) as caught:
        with staged_path(str(other)) as tmp:
            Path(tmp).write_bytes(b"mine")
            other.write_bytes(b"theirs")
    assert caught.value.errno == 17 and other.read_bytes() == b"theirs"
    with staged_path(str(dst), replace=True) as tmp:
        Path(tmp).write_bytes(b"second")
        with staged_path(tmp) as inner:  # staging a stage builds in place
            assert inner == tmp
    assert dst.read_bytes() == b"second"
    # A failed build leaves nothing.
    with pytest.raises(RuntimeError):
        with staged_path(str(tmp_path / "failed")) as tmp:
            Path(tmp).write_bytes(b"half")
            raise RuntimeError
    assert leftovers(tmp_path, set()) == {"img", "other"}


def test_tmpfile_build_is_invisible(tmp_path: Path, source: Path) -> None:
    """While a convert builds its target, nothing of it shows in the folder."""
    dst = tmp_path / "out.vhd"
    proc = subprocess.Popen(convert_argv(source, dst), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert stop_while_building(proc, tmp_path, SIZE // 8)
        assert leftovers(tmp_path, set()) == set()
    finally:
        proc.kill()
        proc.wait()
    assert leftovers(tmp_path, set()) == set()


@pytest.mark.parametrize("mode", ["tmpfile", "folder"])
def test_vhd_util_copy_killed_or_completed(tmp_path: Path, source: Path, mode: str) -> None:
    """vhd-util copy builds its target through the same staging (with the VHD create
    nested in it): killed mid-copy it leaves nothing (in folder mode, nothing once the
    next build ran), and completed the copy is the whole disk."""
    env = dict(os.environ, BLKTAP_NO_TMPFILE="1" if mode == "folder" else "")
    src = tmp_path / "src.vhd"
    assert run(convert_argv(source, src), text=True).returncode == 0
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    dst = tmp_path / "copy.vhd"
    argv = [tool("vhd-util"), "copy", "-n", str(src), "-N", str(dst), "-k", str(key)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    try:
        assert stop_while_building(proc, tmp_path, SIZE // 8)
    finally:
        proc.kill()
        proc.wait()
    res = run(argv, env=env, text=True)  # a new attempt: succeeds, and sweeps
    assert res.returncode == 0, res.stderr
    assert leftovers(tmp_path, {src.name, key.name}) == {dst.name}
    res = run([tool("vhd-util"), "check", "-n", str(dst)], text=True)
    assert res.returncode == 0, res.stdout


@pytest.mark.parametrize("mode", ["tmpfile", "folder"])
def test_signal_of_convert_keep_chain_cleans_up(tmp_path: Path, source: Path,
                                                mode: str) -> None:
    """convert --keep-chain builds every layer aside: SIGTERM while it writes the base
    leaves no layer, finished or not, under any name."""
    src = tmp_path / "src"
    src.mkdir()
    snap = src / "snap.vhd"
    res = run([tool("blktap"), "snapshot", str(snap), f"raw:{source}"], text=True)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, BLKTAP_NO_TMPFILE="1" if mode == "folder" else "")
    argv = [tool("blktap"), "convert", "--keep-chain", "-O", "qcow2", f"vhd:{snap}",
            str(out / "snap.qcow2")]
    got = signal_mid_build(argv, out, signal.SIGTERM, env)
    assert got == (143, "blktap: terminated\n")
    assert leftovers(out, set()) == set()
