"""Image drivers and the registry that builds a driver stack from ``type:path``.

Type names are the reference tapdisk's (``tapdisk-disktype.c``): ``aio``, ``vhd`` and
``ram`` are implemented, and ``qcow2`` (qemu's format) beside them; the reference's other
names are known and answer ENOSYS (not built), as there; anything else is ENOENT. A path
without a type is probed: a VHD gets the ``vhd`` driver, a qcow2 image ``qcow2``, anything
else ``aio``.
"""

from __future__ import annotations

import errno
import re

from blktap.errors import BlktapError, EncryptionError, UsageError
from blktap.image.chain import Chain, probe
from blktap.image.qcow2.image import Qcow2Image
from blktap.image.raw import RawImage
from blktap.io.engine import Engine
from blktap.tapdisk.driver import Driver
from blktap.tapdisk.drivers.aio import AioDriver
from blktap.tapdisk.drivers.qcow2 import Qcow2Driver
from blktap.tapdisk.drivers.ram import RamDriver
from blktap.tapdisk.drivers.vhd import VhdDriver

IMPLEMENTED = ("aio", "vhd", "ram", "qcow2")
# In the reference's table but not built here (yet), as "sync"/"vmdk" are not built there.
KNOWN = ("sync", "vmdk", "vhdsync", "qcow", "bc", "vhdi", "log", "remus", "lc", "lle", "llp",
         "valve", "nbd")

_SPEC = re.compile(r"^([a-z][a-z0-9+_-]*):(.*)$")


def parse(spec: str) -> tuple[str, str]:
    """``type:path`` -> (type, path); a plain path -> (probed type, path)."""
    match = _SPEC.match(spec)
    if match:
        kind, path = match[1], match[2]
        if kind in IMPLEMENTED:
            if not path:
                raise UsageError(f"{spec}: no path after {kind}:")
            return kind, path
        if kind in KNOWN:
            raise BlktapError(f"{spec}: driver {kind!r} is not implemented", errno.ENOSYS)
        if "/" not in kind:
            raise BlktapError(f"{spec}: unknown driver type {kind!r} "
                              f"(use {', '.join(IMPLEMENTED)})", errno.ENOENT)
    probed = probe(spec)
    return ({"vhd": "vhd", "qcow2": "qcow2"}.get(probed, "aio")), spec


def open_stack(engine: Engine, spec: str, *, writable: bool, direct: bool = True,
               key: bytes | None = None) -> Driver:
    """Open the driver stack for ``spec`` (blocking: metadata is read here).

    For a VHD, every parent named by its locators is opened read-only (the library's
    chain checks apply: loops, uuids, depth); a raw parent gets the ``aio`` driver.

    ``key`` (``tap-ctl open -E``) opens an encrypted VHD chain with the library's checks
    (docs/encryption.md): an encrypted layer without a key or a key for a clear one is
    refused with EINVAL, a key whose hash does not match with ENOKEY. Each VHD driver gets
    its own layer's cipher; a raw parent is read as stored. The ``aio`` and ``ram``
    drivers have nothing to check a key against and refuse one (EINVAL).
    """
    kind, path = parse(spec)
    if key is not None and kind != "vhd":
        raise EncryptionError(f"{path}: the {kind} driver serves data as it is stored and "
                              f"cannot decrypt it, but a key was given", errno.EINVAL)
    if kind == "aio":
        return AioDriver.open(engine, path, writable=writable, direct=direct)
    if kind == "ram":
        return RamDriver.open(engine, path, writable=writable)
    chain = Chain.open(f"{kind}:{path}", writable=writable, key=key)
    below: Driver | None = None
    try:
        for layer, cipher in zip(reversed(chain.layers), reversed(chain.ciphers),
                                 strict=True):
            if isinstance(layer, RawImage):
                raw_path = layer.path
                layer.close()
                below = AioDriver.open(engine, raw_path, writable=False, direct=direct)
            elif isinstance(layer, Qcow2Image):
                below = Qcow2Driver(engine, layer, below)
            else:
                below = VhdDriver(engine, layer, below, cipher)
    except BaseException:
        chain.close()
        raise
    assert below is not None
    return below


__all__ = ["AioDriver", "Driver", "Qcow2Driver", "RamDriver", "VhdDriver", "open_stack",
           "parse"]
