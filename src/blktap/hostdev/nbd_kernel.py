"""The kernel's NBD client driven over generic netlink (the family ``nbd``): connect a
socket already past its handshake to a ``/dev/nbdN``, disconnect it, list devices.

Where the family is missing the module is loaded (``modprobe nbd``) once; a kernel with
no nbd module gets :class:`NoKernelNbd`, which points at the FUSE way."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

from blktap.errors import BlktapError
from blktap.hostdev import genl
from blktap.hostdev import wire as w

DEFAULT_TIMEOUT = 60  # seconds a request may take before the kernel gives up on it
DEFAULT_DEAD_CONN_TIMEOUT = 30  # seconds I/O waits for a reconnect after the socket dies


class NoKernelNbd(BlktapError):
    """This kernel has no NBD client (no nbd module, or it cannot be loaded)."""

    default_errno = errno.ENODEV


def family(sock: genl.GenlSocket, *, load: bool = True, spec: str = "TYPE:PATH") -> int:
    """The nbd family's id, loading the module if needed."""
    fid = sock.family_id(w.NBD_FAMILY)
    if fid is None and load and os.geteuid() == 0:
        modprobe = shutil.which("modprobe") or "/sbin/modprobe"
        if os.path.exists(modprobe):
            subprocess.run([modprobe, "-q", "nbd"], capture_output=True, check=False,
                           timeout=60)
            fid = sock.family_id(w.NBD_FAMILY)
    if fid is None:
        raise NoKernelNbd(
            f"this kernel ({os.uname().release}) has no NBD client (module nbd not found). "
            f"Without it, show the disk as a file and make a loop device of it: "
            f"blktap serve {spec} --fuse FILE, then losetup -f --show FILE "
            f"(docs/attach.md)")
    return fid


def connect(sock_fd: int, size: int, server_flags: int, *, block_size: int = 512,
            timeout: int = DEFAULT_TIMEOUT,
            dead_conn_timeout: int = DEFAULT_DEAD_CONN_TIMEOUT,
            identifier: str | None = None, spec: str = "TYPE:PATH") -> int:
    """Give the kernel the socket (in the transmission phase); return N of /dev/nbdN.
    The kernel holds its own reference: the caller may close its descriptor."""
    with genl.GenlSocket() as nl:
        fid = family(nl, spec=spec)
        attrs = (genl.u64(w.NBD_ATTR_SIZE_BYTES, size)
                 + genl.u64(w.NBD_ATTR_BLOCK_SIZE_BYTES, block_size)
                 + genl.u64(w.NBD_ATTR_TIMEOUT, timeout)
                 + genl.u64(w.NBD_ATTR_DEAD_CONN_TIMEOUT, dead_conn_timeout)
                 + genl.u64(w.NBD_ATTR_SERVER_FLAGS, server_flags)
                 + genl.u64(w.NBD_ATTR_CLIENT_FLAGS, 0)
                 + genl.nested(w.NBD_ATTR_SOCKETS,
                               genl.nested(w.NBD_SOCK_ITEM, genl.u32(w.NBD_SOCK_FD, sock_fd))))
        if identifier:
            attrs += genl.string(w.NBD_ATTR_BACKEND_IDENTIFIER, identifier[:255])
        try:
            replies = nl.request(fid, w.NBD_CMD_CONNECT, w.NBD_GENL_VERSION, attrs)
        except BlktapError as exc:
            raise BlktapError(f"NBD connect: {exc}", exc.errno) from None
        for payload in replies:
            for kind, value in genl.parse_attrs(payload):
                if kind == w.NBD_ATTR_INDEX:
                    return int(w.U32.unpack_from(value)[0])
        raise BlktapError("NBD connect: the kernel named no device", errno.EPROTO)


def disconnect(index: int) -> None:
    with genl.GenlSocket() as nl:
        fid = family(nl, load=False)
        try:
            nl.request(fid, w.NBD_CMD_DISCONNECT, w.NBD_GENL_VERSION,
                       genl.u32(w.NBD_ATTR_INDEX, index))
        except BlktapError as exc:
            raise BlktapError(f"NBD disconnect /dev/nbd{index}: {exc}", exc.errno) from None


def status() -> dict[int, bool]:
    """N -> connected, for every /dev/nbdN the kernel has (empty without the module)."""
    with genl.GenlSocket() as nl:
        fid = nl.family_id(w.NBD_FAMILY)
        if fid is None:
            return {}
        replies = nl.request(fid, w.NBD_CMD_STATUS, w.NBD_GENL_VERSION)
    out: dict[int, bool] = {}
    for payload in replies:
        for kind, value in genl.parse_attrs(payload):
            if kind != w.NBD_ATTR_DEVICE_LIST:
                continue
            for item_kind, item in genl.parse_attrs(value):
                if item_kind != w.NBD_DEVICE_ITEM:
                    continue
                fields = dict(genl.parse_attrs(item))
                if w.NBD_DEVICE_INDEX in fields:
                    index = w.U32.unpack_from(fields[w.NBD_DEVICE_INDEX])[0]
                    conn = fields.get(w.NBD_DEVICE_CONNECTED, b"\0")
                    out[index] = bool(conn[0])
    return out
