"""``blktap attach``: a disk as a host block device, ``/dev/nbdN``, served by a tapdisk.

    blktap attach ──► tap-ctl create (a tapdisk serves the disk on <dir>/nbd<pid>.<minor>)
                  ──► connect to that socket, NBD handshake (NBD_OPT_GO)
                  ──► NBD_CMD_CONNECT over generic netlink with the socket: /dev/nbdN
                  ──► queue settings (scheduler none), a record <dir>/nbd-attached/N

``detach`` flushes the device, disconnects it and destroys the tapdisk's VBD; the record
lets ``detach`` and ``attached`` find the tapdisk behind a device. The tapdisk is an
ordinary one: ``tap-ctl list/pause/unpause/stats`` work on it while it is attached.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import time
from dataclasses import asdict, dataclass

from blktap.control.client import TapCtl
from blktap.control.message import Flag
from blktap.errors import BlktapError, UsageError
from blktap.hostdev import genl, handshake, nbd_kernel

RECORD_DIR = "nbd-attached"
DISCONNECT_WAIT = 10.0  # seconds for the kernel to let go of the socket
QUEUE_SETTINGS = {"scheduler": "none"}  # the tapdisk's VBD merges and orders itself


@dataclass
class Attachment:
    index: int  # N of /dev/nbdN
    tid: int  # the tapdisk (its pid)
    minor: int
    spec: str
    read_only: bool
    socket: str

    @property
    def device(self) -> str:
        return f"/dev/nbd{self.index}"


def _record_dir(tc: TapCtl) -> str:
    path = os.path.join(tc.rundir.path, RECORD_DIR)
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def _save(tc: TapCtl, a: Attachment) -> None:
    path = os.path.join(_record_dir(tc), str(a.index))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(asdict(a), f)
    os.replace(tmp, path)


def records(tc: TapCtl | None = None) -> list[Attachment]:
    tc = tc or TapCtl()
    d = os.path.join(tc.rundir.path, RECORD_DIR)
    out = []
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(d), key=lambda n: (len(n), n)):
            if not name.isdigit():
                continue
            try:
                with open(os.path.join(d, name)) as f:
                    out.append(Attachment(**json.load(f)))
            except (OSError, ValueError, TypeError):
                continue  # a record being written, or garbage: not ours to judge
    return out


def _tune(index: int) -> None:
    for name, value in QUEUE_SETTINGS.items():
        with contextlib.suppress(OSError):
            with open(f"/sys/block/nbd{index}/queue/{name}", "w") as f:
                f.write(value)


def attach(spec: str, *, read_only: bool = False, timeout: int = nbd_kernel.DEFAULT_TIMEOUT,
           dead_conn_timeout: int = nbd_kernel.DEFAULT_DEAD_CONN_TIMEOUT,
           tc: TapCtl | None = None) -> Attachment:
    """Serve ``spec`` (TYPE:PATH) from a new tapdisk and attach it as /dev/nbdN."""
    if ":" not in spec:
        raise UsageError(f"'{spec}': expected TYPE:PATH (vhd:, aio:, qcow2:...)")
    # Before anything is created: a kernel without NBD gets its error and nothing to undo.
    with genl.GenlSocket() as nl:
        nbd_kernel.family(nl, spec=spec)
    tc = tc or TapCtl()
    tid, minor, _marker = tc.create(spec, int(Flag.RDONLY) if read_only else 0)
    path = tc.rundir.nbd_socket(tid, minor)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(path)
            size, flags = handshake.negotiate(s)
            s.settimeout(None)
            index = nbd_kernel.connect(s.fileno(), size, flags, timeout=timeout,
                                       dead_conn_timeout=dead_conn_timeout,
                                       identifier=f"blktap:{tid}.{minor}", spec=spec)
    except BaseException:
        with contextlib.suppress(BlktapError, OSError):
            tc.destroy(tid, minor)
        raise
    _tune(index)
    a = Attachment(index, tid, minor, spec, read_only, path)
    _save(tc, a)
    return a


def find(target: str, tc: TapCtl | None = None) -> Attachment:
    """The attachment of ``/dev/nbdN``, ``nbdN`` or a tapdisk minor (a number)."""
    tc = tc or TapCtl()
    have = records(tc)
    hit = re.fullmatch(r"(?:/dev/)?nbd(\d+)", target)
    if hit:
        found = [a for a in have if a.index == int(hit.group(1))]
    elif target.isdigit():
        found = [a for a in have if a.minor == int(target)]
    else:
        raise UsageError(f"'{target}': expected /dev/nbdN, nbdN or a minor number")
    if not found:
        raise BlktapError(f"{target}: not attached by blktap attach (see blktap attached)",
                          errno.ENOENT)
    return found[0]


def _sysfs_pid(index: int) -> bool:
    return os.path.exists(f"/sys/block/nbd{index}/pid")


def detach(target: str, *, tc: TapCtl | None = None) -> Attachment:
    """Flush, disconnect, destroy. A device in use (mounted, or open exclusively) is
    refused with EBUSY: unmount it first."""
    tc = tc or TapCtl()
    a = find(target, tc)
    flush_error: OSError | None = None
    connected = nbd_kernel.status().get(a.index, False)
    if connected:
        try:
            fd = os.open(a.device, (os.O_RDONLY if a.read_only else os.O_RDWR) | os.O_EXCL)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise BlktapError(f"{a.device} is in use (mounted?): unmount it first",
                                  errno.EBUSY) from None
            raise BlktapError(f"{a.device}: {exc.strerror}", exc.errno) from None
        try:
            os.fsync(fd)  # the page cache, then a FLUSH the tapdisk passes down
        except OSError as exc:  # a dead tapdisk: detach all the same, then say so
            flush_error = exc
        finally:
            os.close(fd)
        nbd_kernel.disconnect(a.index)
        deadline = time.monotonic() + DISCONNECT_WAIT
        while _sysfs_pid(a.index) and time.monotonic() < deadline:
            time.sleep(0.05)
    try:
        tc.destroy(a.tid, a.minor)
    except BlktapError:
        # The tapdisk is gone (killed): its minor's marker is orphaned; free it (free
        # refuses a marker a live tapdisk still holds).
        with contextlib.suppress(BlktapError, OSError):
            tc.free(a.minor)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(_record_dir(tc), str(a.index)))
    if flush_error is not None:
        raise BlktapError(f"{a.device}: the flush failed ({flush_error.strerror}): writes "
                          f"not yet flushed may be lost; detached all the same",
                          flush_error.errno or errno.EIO)
    return a


def attached(tc: TapCtl | None = None) -> list[tuple[Attachment, bool, bool]]:
    """Each recorded attachment with (the kernel has it connected, its tapdisk serves
    the minor)."""
    tc = tc or TapCtl()
    kernel = nbd_kernel.status()
    try:
        served = {(e.pid, e.minor) for e in tc.list_all()}
    except BlktapError as exc:
        served = {(e.pid, e.minor) for e in getattr(exc, "entries", [])}
    return [(a, kernel.get(a.index, False), (a.tid, a.minor) in served) for a in records(tc)]
