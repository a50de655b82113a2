"""The xl hotplug script's logic: a tapdisk per VBD on hosts without xapi.

libxl runs the disk's ``script=`` with ``add`` once the backend reached InitWait, and with
``remove`` when the device goes, ``$XENBUS_PATH`` naming the backend directory. On add we
read ``params`` (xl's ``target=``: ``TYPE:PATH``, or a plain path: a VHD gets ``vhd``,
anything else ``aio``) and ``mode``, create a tapdisk serving it (``tap-ctl create``: one
minor, one tapdisk), then write in one transaction ``physical-device-path`` (its NBD socket,
``<rundir>/nbd<pid>.<minor>``, which tapback follows), ``pid`` and ``minor`` (what remove
needs), and ``hotplug-status=connected``. On failure: ``hotplug-error`` and
``hotplug-status=error``, the tapdisk destroyed, a non-zero exit.

On remove we release the guest's ring if tapback has not (XENBLKIF_DISCONNECT), then
destroy the tapdisk (close, detach, free). A tapdisk that is already gone is not an error.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re

from blktap.control.client import TapCtl
from blktap.control.message import Flag
from blktap.control.rundir import RunDir
from blktap.errors import BlktapError, XenStoreError
from blktap.tapback.link import parse_target
from blktap.tapback.xenstore import Tx, XenStore

log = logging.getLogger("blktap.tapback.hotplug")
_TYPED = re.compile(r"^([a-z][a-z0-9]*):(.+)$")
# Prefixes of older xl/xend target syntaxes that only say "a tap device".
_TAP_PREFIXES = ("tap:", "tap2:", "tapdisk:")
_GONE = (errno.ENOENT, errno.ECONNREFUSED, errno.ESRCH)


def image_spec(params: str) -> str:
    """``TYPE:PATH`` for tap-ctl from the backend's ``params``."""
    params = params.strip()
    for prefix in _TAP_PREFIXES:
        if params.startswith(prefix):
            params = params[len(prefix):]
    if not params:
        raise BlktapError("the backend's params (xl target=) is empty", errno.EINVAL)
    hit = _TYPED.match(params)
    if hit and "/" not in hit.group(1):
        return params
    from blktap.image.chain import probe  # only for plain paths

    try:
        kind = probe(params)
    except BlktapError:
        kind = "raw"  # let the tapdisk report what is wrong with the file
    return f"{'vhd' if kind == 'vhd' else 'aio'}:{params}"


async def _read_backend(xs: XenStore, path: str) -> dict[str, str | None]:
    keys = ("params", "mode", "frontend-id", "pid", "minor", "physical-device-path")
    return {k: await xs.read_or(f"{path}/{k}") for k in keys}


async def _write_if_there(xs: XenStore, path: str, keys: dict[str, str]) -> bool:
    async def body(tx: Tx) -> bool:
        if not await tx.exists(path):
            return False
        for k, v in keys.items():
            await tx.write(f"{path}/{k}", v)
        return True
    return await xs.transact(body)


async def add(xs: XenStore, path: str, ctl: TapCtl | None = None) -> str:
    """Create the tapdisk for the backend at ``path``; returns the NBD socket path."""
    be = await _read_backend(xs, path)
    if be["params"] is None:
        raise BlktapError(f"{path}/params: not there (is XENBUS_PATH right?)", errno.ENOENT)
    spec = image_spec(be["params"])
    read_only = (be["mode"] or "w").startswith("r")
    ctl = ctl or TapCtl()
    tid, minor, _ = await asyncio.to_thread(ctl.create, spec,
                                            int(Flag.RDONLY) if read_only else 0)
    socket_path = ctl.rundir.nbd_socket(tid, minor)
    try:
        done = await _write_if_there(xs, path, {
            "physical-device-path": socket_path, "pid": str(tid), "minor": str(minor),
            "hotplug-status": "connected"})
    except BaseException:
        await asyncio.to_thread(_destroy_quietly, ctl, tid, minor)
        raise
    if not done:
        await asyncio.to_thread(_destroy_quietly, ctl, tid, minor)
        raise BlktapError(f"{path} was removed while its tapdisk started", errno.ENOENT)
    log.info("%s: tapdisk %d minor %d serves %s", path, tid, minor, spec)
    return socket_path


def _destroy_quietly(ctl: TapCtl, tid: int, minor: int) -> None:
    try:
        ctl.destroy(tid, minor)
    except BlktapError as exc:
        log.warning("tapdisk %d minor %d: %s", tid, minor, exc)


async def remove(xs: XenStore, path: str, ctl: TapCtl | None = None) -> None:
    """Release the ring (if still held) and destroy the tapdisk the add created."""
    be = await _read_backend(xs, path)
    try:
        tid, minor = int(be["pid"] or ""), int(be["minor"] or "")
        rundir = os.path.dirname(be["physical-device-path"] or "") or None
    except ValueError:
        try:
            target = parse_target(be["physical-device-path"])
        except BlktapError:
            log.info("%s: no tapdisk recorded; nothing to remove", path)
            return
        tid, minor, rundir = target.tid, target.minor, target.rundir
    ctl = ctl or TapCtl(RunDir(rundir))
    devid = int(os.path.basename(path)) if os.path.basename(path).isdigit() else 0
    domid = int(be["frontend-id"] or 0) if (be["frontend-id"] or "").isdigit() else 0
    await asyncio.to_thread(_remove_tapdisk, ctl, tid, minor, domid, devid)


def _remove_tapdisk(ctl: TapCtl, tid: int, minor: int, domid: int, devid: int) -> None:
    try:
        ctl.xen_disconnect(tid, domid, devid, minor)
    except BlktapError as exc:
        if exc.errno in _GONE or exc.errno == errno.ENODEV:
            pass  # not connected (tapback released it), or the tapdisk is gone
        else:
            log.info("tapdisk %d: releasing the ring of %d/%d: %s", tid, domid, devid, exc)
    try:
        ctl.destroy(tid, minor)
    except BlktapError as exc:
        if exc.errno not in _GONE:
            raise
        # the tapdisk died: its minor is all that is left
        try:
            ctl.free(minor)
        except BlktapError:
            pass


async def report_failure(xs: XenStore, path: str, message: str) -> None:
    """Tell libxl (and the operator) why the add failed."""
    try:
        await _write_if_there(xs, path, {"hotplug-error": message[:1000],
                                         "hotplug-status": "error"})
    except (XenStoreError, ValueError):
        pass
