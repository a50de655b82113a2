"""Mounting a one-file FUSE file system over a regular file, and unmounting it.

As root the mount is made with mount(2) on a ``/dev/fuse`` descriptor we opened;
otherwise ``fusermount3`` (the setuid helper of fuse3) makes it and hands the
descriptor back over a socket (``_FUSE_COMMFD``). The root of the file system is the
file itself (``rootmode`` S_IFREG), so the mount hides the file it covers."""

from __future__ import annotations

import array
import ctypes
import errno
import os
import shutil
import socket
import stat
import subprocess

from blktap.errors import BlktapError

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class FuseUnavailable(BlktapError):
    """No way to mount a FUSE file system here (no /dev/fuse, no fusermount3 and not
    root, or the kernel said no)."""

    default_errno = errno.ENODEV


def _check_target(path: str) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise BlktapError(f"{path}: {exc.strerror}", exc.errno) from None
    if not stat.S_ISREG(st.st_mode):
        raise BlktapError(f"{path}: not a regular file (the disk is mounted over a file)",
                          errno.EINVAL)


def mount(path: str, *, read_only: bool, fsname: str = "blktap") -> int:
    """Mount a FUSE file system whose root is a regular file over ``path`` (a regular
    file); return the ``/dev/fuse`` descriptor that serves it (close-on-exec,
    blocking)."""
    _check_target(path)
    fsname = fsname.replace(",", "_").replace(" ", "_")
    if os.geteuid() == 0:
        return _mount_direct(path, read_only=read_only, fsname=fsname)
    return _mount_fusermount(path, read_only=read_only, fsname=fsname)


def _mount_direct(path: str, *, read_only: bool, fsname: str) -> int:
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise FuseUnavailable(f"/dev/fuse: {exc.strerror} (is the fuse module loaded?)",
                              exc.errno) from None
    opts = (f"fd={fd},rootmode={stat.S_IFREG:o},user_id={os.geteuid()},"
            f"group_id={os.getegid()},default_permissions,allow_other")
    flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if read_only else 0)
    if _libc.mount(fsname.encode(), os.fsencode(path), b"fuse.blktap", flags,
                   opts.encode()) != 0:
        code = ctypes.get_errno()
        os.close(fd)
        raise FuseUnavailable(f"mount {path}: {os.strerror(code)}", code)
    return fd


def _mount_fusermount(path: str, *, read_only: bool, fsname: str) -> int:
    helper = shutil.which("fusermount3")
    if helper is None:
        raise FuseUnavailable("fusermount3 is not installed (package fuse3), and only root "
                              "can mount without it", errno.ENOENT)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        opts = f"default_permissions,fsname={fsname},subtype=blktap,nosuid,nodev"
        if read_only:
            opts += ",ro"
        if _user_allow_other():
            opts += ",allow_other"
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        r = subprocess.run([helper, "-o", opts, "--", path], env=env,
                           pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, check=False)
        theirs.close()
        if r.returncode != 0:
            raise FuseUnavailable(f"fusermount3: {r.stderr.strip() or r.returncode}",
                                  errno.EPERM)
        fds = array.array("i")
        _msg, anc, _flags, _addr = ours.recvmsg(1, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
        if not fds:
            raise FuseUnavailable("fusermount3 sent no descriptor", errno.EPROTO)
        os.set_inheritable(fds[0], False)
        return fds[0]
    finally:
        theirs.close()
        ours.close()


def _user_allow_other() -> bool:
    """fusermount3 lets users pass allow_other (root's losetup may then open the file)
    only where /etc/fuse.conf says user_allow_other."""
    try:
        with open("/etc/fuse.conf") as f:
            return any(line.strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def unmount(path: str, *, lazy: bool = False) -> None:
    """Unmount ``path``; EBUSY while something (a loop device) holds the file, unless
    ``lazy``: then the name goes now and the file system when its last user does."""
    if os.geteuid() == 0:
        if _libc.umount2(os.fsencode(path), MNT_DETACH if lazy else 0) != 0:
            code = ctypes.get_errno()
            raise BlktapError(f"umount {path}: {os.strerror(code)}", code)
        return
    helper = shutil.which("fusermount3") or "fusermount3"
    r = subprocess.run([helper, "-u", *(["-z"] if lazy else []), "--", path],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        busy = "busy" in r.stderr
        raise BlktapError(f"fusermount3 -u {path}: {r.stderr.strip()}",
                          errno.EBUSY if busy else errno.EIO)
