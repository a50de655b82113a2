"""The tapdisk runtime directory: minor marker files and socket paths.

Layout, as the reference tap-ctl and tapdisk use it (``/run/blktap-control`` unless the
environment variable ``BLKTAP_CONTROL_DIR`` names another directory)::

    <dir>/ctl<pid>               a tapdisk's control socket (pid = the tapdisk's id)
    <dir>/nbdclient<pid>         a tapdisk's NBD-client fd receiver: connected sockets
                                 handed over by name, for ``nbd:NAME``
    <dir>/nbd<pid>.<minor>       the NBD export of one VBD
    <dir>/nbd-old<pid>.<minor>   the same export again (the reference's "old" server's
                                 socket, which XenServer tools look for)
    <dir>/nbdserver-new<pid>.<minor>  fd-passing: a connected socket handed over gets
                                 the export with the fixed newstyle handshake
    <dir>/nbdserver<pid>.<minor> fd-passing: the same with the oldstyle handshake
    <dir>/tapdisk/tapdisk-<N>    the marker of minor N (0 <= N < 16384)

Since the kernel blktap driver is gone, a "minor" is nothing but the number of a marker
file. ``allocate`` creates the lowest free one; the tapdisk serving the minor holds an
exclusive flock on it for as long as it is attached; ``free`` unlinks a marker nobody
holds. A marker whose holder died (the kernel dropped its flock) is *orphaned*: it still
exists, so the minor stays allocated until someone frees it.

Concurrency: like the reference, ``allocate`` and ``free`` take an exclusive flock on the
marker directory, so that our tools and the C tap-ctl serialise with each other. Markers
are also created with O_CREAT|O_EXCL, so two allocators that somehow skip the directory
lock still never share a minor. ``list`` takes the directory lock shared and reads the
holders from ``/proc/locks`` instead of probing with flock: a probe would, for a moment,
make a concurrent ``free`` or attach fail with EWOULDBLOCK.

Safety (beyond the reference, which only mkdirs): both directories are created 0700, and
an existing one owned by another user or writable by group or others is refused, since
whoever can write there can plant sockets and markers that our tools would trust.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from blktap.errors import BlktapError, UsageError

ENV_VAR = "BLKTAP_CONTROL_DIR"
DEFAULT_DIR = "/run/blktap-control"
MARKER_SUBDIR = "tapdisk"
MARKER_PREFIX = "tapdisk-"
MAX_MINORS = 16384  # the reference's MAX_ID: minors 0 .. 16383
DIR_MODE = 0o700
MARKER_MODE = 0o600

# Only canonical decimal names are minors: "tapdisk-01" or "tapdisk-+1" would alias one.
_MARKER_RE = re.compile(r"tapdisk-(0|[1-9][0-9]{0,4})")


def control_dir(environ: Mapping[str, str] | None = None) -> str:
    """The runtime directory: ``$BLKTAP_CONTROL_DIR`` if set and not empty, else the
    reference's ``/run/blktap-control``."""
    env = os.environ if environ is None else environ
    return env.get(ENV_VAR) or DEFAULT_DIR


@dataclass(frozen=True)
class MinorInfo:
    """One marker file. ``holder`` is the pid holding its flock (0 when held by a process
    this pid namespace cannot see), None when nobody holds it."""

    minor: int
    path: str
    holder: int | None

    @property
    def held(self) -> bool:
        return self.holder is not None

    @property
    def orphaned(self) -> bool:
        """Allocated but unheld: its tapdisk died, or none has attached yet (the reference
        cannot tell these apart either)."""
        return self.holder is None


class MinorHold:
    """An exclusive flock on a minor's marker, as a tapdisk holds it while attached.
    The kernel drops it when the process dies, however it dies."""

    def __init__(self, minor: int, path: str, fd: int) -> None:
        self.minor = minor
        self.path = path
        self._fd: int | None = fd

    @property
    def active(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor releases the flock

    def __enter__(self) -> MinorHold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _check_minor(minor: int) -> None:
    if isinstance(minor, bool) or not isinstance(minor, int) or not 0 <= minor < MAX_MINORS:
        raise UsageError(f"invalid minor {minor!r}: must be 0..{MAX_MINORS - 1}")


def _oserror(exc: OSError, what: str) -> BlktapError:
    code = exc.errno or errno.EIO
    return BlktapError(f"{what}: {os.strerror(code)}", code)


class RunDir:
    """The runtime directory at ``path`` (default: :func:`control_dir`)."""

    def __init__(self, path: str | None = None) -> None:
        self.path = os.path.abspath(control_dir() if path is None else path)
        self.marker_dir = os.path.join(self.path, MARKER_SUBDIR)

    # ------------------------------------------------------------------ names
    def control_socket(self, pid: int) -> str:
        return os.path.join(self.path, f"ctl{pid}")

    def nbd_client_socket(self, pid: int) -> str:
        return os.path.join(self.path, f"nbdclient{pid}")

    def nbd_socket(self, pid: int, minor: int) -> str:
        return os.path.join(self.path, f"nbd{pid}.{minor}")

    def nbd_old_socket(self, pid: int, minor: int) -> str:
        return os.path.join(self.path, f"nbd-old{pid}.{minor}")

    def nbd_fd_socket(self, pid: int, minor: int) -> str:
        """The fd-passing socket whose connections get the fixed newstyle handshake."""
        return os.path.join(self.path, f"nbdserver-new{pid}.{minor}")

    def nbd_fd_oldstyle_socket(self, pid: int, minor: int) -> str:
        """The fd-passing socket whose connections get the oldstyle handshake."""
        return os.path.join(self.path, f"nbdserver{pid}.{minor}")

    def marker_path(self, minor: int) -> str:
        _check_minor(minor)
        return os.path.join(self.marker_dir, f"{MARKER_PREFIX}{minor}")

    @staticmethod
    def parse_marker(name: str) -> int | None:
        """The minor a marker file name stands for, or None if it is not a marker."""
        m = _MARKER_RE.fullmatch(os.path.basename(name))
        if m is None:
            return None
        minor = int(m.group(1))
        return minor if minor < MAX_MINORS else None

    # ------------------------------------------------------------------ directory
    def ensure(self) -> None:
        """Create both directories (0700) if missing; refuse unsafe existing ones."""
        for d in (self.path, self.marker_dir):
            try:
                os.makedirs(d, DIR_MODE, exist_ok=True)
            except FileExistsError as exc:  # exists, but not as a directory
                raise BlktapError(f"{d}: {os.strerror(errno.ENOTDIR)}", errno.ENOTDIR) from exc
            except OSError as exc:
                raise _oserror(exc, f"cannot create {d}") from exc
            self._check_safe(d)

    @staticmethod
    def _check_safe(d: str) -> None:
        try:
            st = os.stat(d)
        except OSError as exc:
            raise _oserror(exc, d) from exc
        if not stat.S_ISDIR(st.st_mode):
            raise BlktapError(f"{d}: {os.strerror(errno.ENOTDIR)}", errno.ENOTDIR)
        if st.st_uid != os.geteuid():
            raise BlktapError(f"refusing runtime directory {d}: owned by uid {st.st_uid}, "
                              f"not by uid {os.geteuid()}", errno.EPERM)
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise BlktapError(f"refusing runtime directory {d}: writable by group or "
                              f"others (mode {stat.S_IMODE(st.st_mode):04o})", errno.EPERM)

    @contextmanager
    def _dir_lock(self, op: int) -> Iterator[None]:
        try:
            fd = os.open(self.marker_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise _oserror(exc, f"cannot open {self.marker_dir}") from exc
        try:
            fcntl.flock(fd, op)
            yield
        finally:
            os.close(fd)  # also drops the lock

    # ------------------------------------------------------------------ minors
    def allocate(self) -> tuple[int, str]:
        """Create the lowest free minor's marker; return (minor, marker path)."""
        self.ensure()
        with self._dir_lock(fcntl.LOCK_EX):
            taken = {m for m in map(self.parse_marker, os.listdir(self.marker_dir))
                     if m is not None}
            for minor in range(MAX_MINORS):
                if minor in taken:
                    continue
                path = self.marker_path(minor)
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC,
                                 MARKER_MODE)
                except FileExistsError:
                    continue  # made by someone who does not take the directory lock
                except OSError as exc:
                    raise _oserror(exc, f"cannot create {path}") from exc
                os.close(fd)
                return minor, path
        raise BlktapError(f"no free minor in {self.marker_dir}", errno.ENOSPC)

    def free(self, minor: int) -> None:
        """Unlink a minor's marker. EWOULDBLOCK while a live process holds it (as the
        reference), ENOENT if it is not allocated."""
        path = self.marker_path(minor)
        with self._dir_lock(fcntl.LOCK_EX):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise _oserror(exc, f"cannot free minor {minor}") from exc
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    raise BlktapError(f"cannot free minor {minor}: in use",
                                      exc.errno or errno.EWOULDBLOCK) from exc
                # Unlink while we hold the lock: a holder that opened the file just before
                # finds, once it gets the lock, that the path no longer names its inode.
                os.unlink(path)
            finally:
                os.close(fd)

    def hold(self, minor: int) -> MinorHold:
        """Take the exclusive flock a tapdisk keeps on an attached minor. ENOENT if the
        minor is not allocated, EBUSY if another process holds it."""
        path = self.marker_path(minor)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise _oserror(exc, f"cannot hold minor {minor}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise BlktapError(f"minor {minor} is held by another process",
                                  errno.EBUSY) from exc
            # A concurrent free may have unlinked (and an allocate re-created) the path
            # between our open and our lock: only the inode the path names now counts.
            mine = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
                raise BlktapError(f"cannot hold minor {minor}: freed meanwhile",
                                  errno.ENOENT)
        except BaseException:
            os.close(fd)
            raise
        return MinorHold(minor, path, fd)

    def minors(self) -> list[MinorInfo]:
        """Every marker, lowest minor first, with the pid holding it (None: orphaned)."""
        try:
            names = os.listdir(self.marker_dir)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise _oserror(exc, f"cannot list {self.marker_dir}") from exc
        found = sorted((m, n) for n in names if (m := self.parse_marker(n)) is not None)
        if not found:
            return []
        with self._dir_lock(fcntl.LOCK_SH):
            holders = _flock_holders()
            out: list[MinorInfo] = []
            for minor, name in found:
                path = os.path.join(self.marker_dir, name)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue  # freed between listdir and now
                if holders is None:
                    holder = _probe(path)
                else:
                    key = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
                    holder = holders.get(key)
                out.append(MinorInfo(minor, path, holder))
        return out


def _flock_holders() -> dict[tuple[int, int, int], int] | None:
    """(device major, device minor, inode) -> pid of every FLOCK WRITE lock in
    ``/proc/locks``; None when that file cannot be read (not Linux)."""
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    out: dict[tuple[int, int, int], int] = {}
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF"; waiters carry a "->" field.
        fields = line.split()
        if len(fields) < 6 or "->" in fields or fields[1] != "FLOCK" or fields[3] != "WRITE":
            continue
        try:
            maj, mnr, ino = fields[5].split(":")
            out[(int(maj, 16), int(mnr, 16), int(ino))] = int(fields[4])
        except ValueError:
            continue
    return out


def _probe(path: str) -> int | None:
    """Fallback without /proc/locks: is the marker held? (0 = yes, pid unknown)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0
    finally:
        os.close(fd)
    return None
