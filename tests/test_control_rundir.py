"""The tapdisk runtime directory: layout, allocate/free/list of minors, holders, safety.

Every test uses its own directory through BLKTAP_CONTROL_DIR. Holders that must die are
real child processes killed with SIGKILL: the kernel, not our code, drops their flock.
"""

from __future__ import annotations

import errno
import fcntl
import multiprocessing as mp
import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest

from blktap.control import rundir
from blktap.control.rundir import MAX_MINORS, RunDir
from blktap.errors import BlktapError, UsageError


@pytest.fixture
def rd(tmp_path, monkeypatch) -> RunDir:
    d = tmp_path / "blktap-control"
    monkeypatch.setenv(rundir.ENV_VAR, str(d))
    return RunDir()


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


HOLDER = textwrap.dedent("""
    import sys, time
    from blktap.control.rundir import RunDir
    h = RunDir(sys.argv[1]).hold(int(sys.argv[2]))
    print("held", flush=True)
    time.sleep(600)
""")


def spawn_holder(rd: RunDir, minor: int) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, rd.path, str(minor)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    assert p.stdout.readline() == "held\n"
    return p


def kill(p: subprocess.Popen) -> None:
    p.kill()
    p.wait()
    assert p.stdout is not None
    p.stdout.close()


# ------------------------------------------------------------------ names and layout
def test_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv(rundir.ENV_VAR, raising=False)
    assert rundir.control_dir() == "/run/blktap-control"
    assert RunDir().path == "/run/blktap-control"
    monkeypatch.setenv(rundir.ENV_VAR, "")
    assert rundir.control_dir() == "/run/blktap-control"
    monkeypatch.setenv(rundir.ENV_VAR, str(tmp_path))
    assert RunDir().path == str(tmp_path)
    assert rundir.control_dir({rundir.ENV_VAR: "/x"}) == "/x"


def test_socket_and_marker_names():
    r = RunDir("/run/blktap-control")
    assert r.control_socket(123) == "/run/blktap-control/ctl123"
    assert r.nbd_socket(123, 4) == "/run/blktap-control/nbd123.4"
    assert r.nbd_client_socket(123) == "/run/blktap-control/nbdclient123"
    assert r.marker_path(7) == "/run/blktap-control/tapdisk/tapdisk-7"
    assert r.marker_path(MAX_MINORS - 1).endswith("tapdisk-16383")
    for bad in (-1, MAX_MINORS, True, "1"):
        with pytest.raises(UsageError):
            r.marker_path(bad)  # type: ignore[arg-type]


def test_parse_marker():
    assert RunDir.parse_marker("tapdisk-0") == 0
    assert RunDir.parse_marker("/a/b/tapdisk-16383") == 16383
    for name in ("tapdisk-01", "tapdisk-+1", "tapdisk--1", "tapdisk-", "tapdisk-16384",
                 "tapdisk-1x", "ctl12", "nbd1.2", "tapdisk-999999"):
        assert RunDir.parse_marker(name) is None, name


# ------------------------------------------------------------------ directory safety
def test_created_0700_whatever_the_umask(rd):
    old = os.umask(0)
    try:
        minor, path = rd.allocate()
    finally:
        os.umask(old)
    assert (minor, path) == (0, os.path.join(rd.path, "tapdisk", "tapdisk-0"))
    assert mode(rd.path) == 0o700
    assert mode(rd.marker_dir) == 0o700
    assert mode(path) == 0o600


@pytest.mark.parametrize("bits", [0o777, 0o770, 0o702, 0o1777])
def test_refuses_writable_directory(rd, bits):
    os.makedirs(rd.path)
    os.chmod(rd.path, bits)
    with pytest.raises(BlktapError) as ei:
        rd.allocate()
    assert ei.value.errno == errno.EPERM
    assert rd.path in str(ei.value) and "writable" in str(ei.value)
    assert "\n" not in str(ei.value)
    assert not os.path.exists(rd.marker_dir)  # nothing created inside it


def test_refuses_writable_marker_directory(rd):
    os.makedirs(rd.marker_dir, 0o700)
    os.chmod(rd.marker_dir, 0o733)
    with pytest.raises(BlktapError) as ei:
        rd.allocate()
    assert ei.value.errno == errno.EPERM
    assert os.listdir(rd.marker_dir) == []


def test_accepts_readable_directory(rd):
    os.makedirs(rd.path)
    os.chmod(rd.path, 0o755)  # readable is fine: only writers could plant files
    assert rd.allocate()[0] == 0
    assert mode(rd.path) == 0o755  # and we do not change what exists


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown to another user")
def test_refuses_directory_of_another_user(rd):
    os.makedirs(rd.path, 0o700)
    os.chown(rd.path, 65534, 65534)
    with pytest.raises(BlktapError) as ei:
        rd.allocate()
    assert ei.value.errno == errno.EPERM
    assert "owned by uid 65534" in str(ei.value)


def test_path_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"x")
    with pytest.raises(BlktapError) as ei:
        RunDir(str(f)).allocate()
    assert ei.value.errno == errno.ENOTDIR
    assert f.read_bytes() == b"x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_parent(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir(0o500)
    with pytest.raises(BlktapError) as ei:
        RunDir(str(parent / "rd")).allocate()
    assert ei.value.errno == errno.EACCES


# ------------------------------------------------------------------ allocate / free / list
def test_allocate_lowest_free_and_free(rd):
    assert [rd.allocate()[0] for _ in range(4)] == [0, 1, 2, 3]
    rd.free(1)
    assert not os.path.exists(rd.marker_path(1))
    assert [i.minor for i in rd.minors()] == [0, 2, 3]
    assert rd.allocate() == (1, rd.marker_path(1))
    assert rd.allocate()[0] == 4


def test_allocate_ignores_stray_files(rd):
    rd.ensure()
    for name in ("tapdisk-01", "tapdisk-x", "other", "tapdisk-99999"):
        open(os.path.join(rd.marker_dir, name), "w").close()
    assert rd.allocate()[0] == 0
    assert [i.minor for i in rd.minors()] == [0]


def test_allocate_skips_marker_made_without_the_lock(rd):
    # A marker created behind allocate's back after it listed the directory: O_EXCL wins.
    rd.ensure()
    real_listdir = os.listdir
    calls = []

    def racing_listdir(path):
        names = real_listdir(path)
        if not calls:
            calls.append(path)
            open(rd.marker_path(0), "x").close()
        return names

    os.listdir = racing_listdir  # type: ignore[assignment]
    try:
        assert rd.allocate()[0] == 1
    finally:
        os.listdir = real_listdir  # type: ignore[assignment]


def test_all_minors_taken(rd, monkeypatch):
    monkeypatch.setattr(rundir, "MAX_MINORS", 3)
    assert [rd.allocate()[0] for _ in range(3)] == [0, 1, 2]
    with pytest.raises(BlktapError) as ei:
        rd.allocate()
    assert ei.value.errno == errno.ENOSPC


def test_free_missing_and_invalid(rd):
    rd.ensure()
    with pytest.raises(BlktapError) as ei:
        rd.free(5)
    assert ei.value.errno == errno.ENOENT
    with pytest.raises(UsageError):
        rd.free(-1)
    with pytest.raises(BlktapError) as ei:
        RunDir(os.path.join(rd.path, "nowhere")).free(0)
    assert ei.value.errno == errno.ENOENT


def test_list_empty(rd):
    assert rd.minors() == []  # no directory yet: nothing allocated
    rd.ensure()
    assert rd.minors() == []


# ------------------------------------------------------------------ holders
def test_hold_in_process(rd):
    minor, path = rd.allocate()
    with rd.hold(minor) as h:
        assert h.active
        [info] = rd.minors()
        assert info.held and info.holder == os.getpid() and info.path == path
        with pytest.raises(BlktapError) as ei:
            rd.hold(minor)  # flock is per open file: a second hold conflicts too
        assert ei.value.errno == errno.EBUSY
        with pytest.raises(BlktapError) as ei:
            rd.free(minor)
        assert ei.value.errno == errno.EWOULDBLOCK
        assert os.path.exists(path)
    assert not h.active
    [info] = rd.minors()
    assert info.orphaned and info.holder is None
    rd.free(minor)
    assert rd.minors() == []


def test_hold_unallocated(rd):
    rd.ensure()
    with pytest.raises(BlktapError) as ei:
        rd.hold(3)
    assert ei.value.errno == errno.ENOENT


def test_hold_of_a_marker_freed_meanwhile(rd):
    # The holder opened the marker, then free unlinked it and allocate re-created it
    # before the holder's flock: the hold must not count.
    minor, path = rd.allocate()
    real_flock = fcntl.flock

    def racing_flock(fd, op):
        if op == fcntl.LOCK_EX | fcntl.LOCK_NB and os.fstat(fd).st_ino == ino:
            fcntl.flock = real_flock
            rd.free(minor)
            assert rd.allocate()[0] == minor
        return real_flock(fd, op)

    ino = os.stat(path).st_ino
    fcntl.flock = racing_flock  # type: ignore[assignment]
    try:
        with pytest.raises(BlktapError) as ei:
            rd.hold(minor)
    finally:
        fcntl.flock = real_flock  # type: ignore[assignment]
    assert ei.value.errno == errno.ENOENT
    with rd.hold(minor):  # the re-created marker is free to hold
        pass


def test_list_probe_fallback(rd, monkeypatch):
    monkeypatch.setattr(rundir, "_flock_holders", lambda: None)
    a, _ = rd.allocate()
    b, _ = rd.allocate()
    with rd.hold(b):
        infos = rd.minors()
    assert [(i.minor, i.held) for i in infos] == [(a, False), (b, True)]
    assert infos[1].holder == 0  # held, pid unknown without /proc/locks


def test_sigkill_holder_leaves_orphan_that_free_removes(rd):
    minor, path = rd.allocate()
    other, _ = rd.allocate()
    p = spawn_holder(rd, minor)
    try:
        infos = {i.minor: i for i in rd.minors()}
        assert infos[minor].holder == p.pid
        assert infos[other].orphaned
        with pytest.raises(BlktapError) as ei:
            rd.free(minor)
        assert ei.value.errno == errno.EWOULDBLOCK
        with pytest.raises(BlktapError) as ei:
            rd.hold(minor)
        assert ei.value.errno == errno.EBUSY
    finally:
        p.send_signal(signal.SIGKILL)
        kill(p)
    [info] = [i for i in rd.minors() if i.minor == minor]
    assert info.orphaned and os.path.exists(path)
    rd.free(minor)
    assert [i.minor for i in rd.minors()] == [other]
    assert rd.allocate()[0] == minor  # and the minor can be used again


# ------------------------------------------------------------------ concurrency
def _allocate_many(path: str, n: int, start, out) -> None:
    r = RunDir(path)
    start.wait()
    out.put([r.allocate()[0] for _ in range(n)])


def test_concurrent_allocators_never_share(rd):
    rd.ensure()
    ctx = mp.get_context("spawn")  # no forked copies of pytest's state
    procs, per = 4, 40
    start = ctx.Barrier(procs)
    out = ctx.Queue()
    workers = [ctx.Process(target=_allocate_many, args=(rd.path, per, start, out))
               for _ in range(procs)]
    for w in workers:
        w.start()
    got = [m for _ in workers for m in out.get(timeout=120)]
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    assert sorted(got) == list(range(procs * per))  # all distinct, none skipped
    assert [i.minor for i in rd.minors()] == list(range(procs * per))


def test_concurrent_allocate_with_c_style_free(rd):
    # free from another process while allocating: each minor handed out exactly once
    # at a time (free+allocate serialise on the directory flock).
    for _ in range(10):
        rd.allocate()
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(2)
    out = ctx.Queue()
    w = ctx.Process(target=_allocate_many, args=(rd.path, 10, start, out))
    w.start()
    start.wait()
    for m in range(0, 10, 2):
        rd.free(m)
    got = out.get(timeout=120)
    w.join(timeout=60)
    assert w.exitcode == 0
    assert len(set(got)) == 10
    assert not set(got) & {1, 3, 5, 7, 9}  # never a minor still allocated
    present = [i.minor for i in rd.minors()]
    assert len(present) == len(set(present)) == 15
