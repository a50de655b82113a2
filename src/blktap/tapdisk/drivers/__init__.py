"""Image drivers and the registry that builds a driver stack from ``type:path``.

Type names are the reference tapdisk's (``tapdisk-disktype.c``): ``aio``, ``vhd`` and
``ram`` are implemented, and ``qcow2`` (qemu's format) and ``rbd`` (Ceph) beside them; the
reference's other names are known and answer ENOSYS (not built), as there; anything else
is ENOENT. A path without a type is probed: a VHD gets the ``vhd`` driver, a qcow2 image
``qcow2``, anything else ``aio``; a probed differencing VHD (or qcow2 with a backing file)
is refused (:class:`~blktap.errors.ProbedParent`, docs/security.md). The tapdisk daemon,
as the reference, takes no path without a type (:func:`split_type`).
"""

from __future__ import annotations

import errno
import re

from blktap.errors import BlktapError, EncryptionError, UsageError
from blktap.image.chain import Chain, probe
from blktap.image.parents import ParentPolicy
from blktap.image.qcow2.image import Qcow2Image
from blktap.image.raw import RawImage
from blktap.image.rbd import RbdImage
from blktap.io.engine import Engine
from blktap.tapdisk.driver import Driver
from blktap.tapdisk.drivers.aio import AioDriver
from blktap.tapdisk.drivers.qcow2 import Qcow2Driver
from blktap.tapdisk.drivers.ram import RamDriver
from blktap.tapdisk.drivers.vhd import VhdDriver

IMPLEMENTED = ("aio", "vhd", "ram", "qcow2", "rbd")
# In the reference's table but not built here (yet), as "sync"/"vmdk" are not built there.
KNOWN = ("sync", "vmdk", "vhdsync", "qcow", "bc", "vhdi", "log", "remus", "lc", "lle", "llp",
         "valve", "nbd")

_SPEC = re.compile(r"^([a-z][a-z0-9+_-]*):(.*)$")


def split_type(spec: str) -> tuple[str | None, str]:
    """``type:path`` -> (type, path); a plain path -> (None, path). An unknown or
    unimplemented type is an error; nothing is opened."""
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
    return None, spec


def require_type(spec: str) -> tuple[str, str]:
    """``type:path`` -> (type, path); a plain path is an error (EINVAL), as in the
    reference tapdisk: a disk a guest writes to must not have its format guessed."""
    kind, path = split_type(spec)
    if kind is None:
        raise UsageError(f"{spec}: no driver type; name it TYPE:PATH "
                         f"({', '.join(k + ':' for k in IMPLEMENTED)})")
    return kind, path


def probed_driver(path: str) -> str:
    """The driver for a file of probed format: never ``aio`` for a VHD or qcow2 image,
    which would serve its metadata as disk content."""
    return {"vhd": "vhd", "qcow2": "qcow2"}.get(probe(path), "aio")


def parse(spec: str) -> tuple[str, str]:
    """``type:path`` -> (type, path); a plain path -> (probed type, path)."""
    kind, path = split_type(spec)
    if kind is None:
        kind = probed_driver(path)
    return kind, path


def open_stack(engine: Engine, spec: str, *, writable: bool, direct: bool = True,
               key: bytes | None = None, follow_probed_parents: bool = False,
               parent_policy: ParentPolicy | None = None) -> Driver:
    """Open the driver stack for ``spec`` (blocking: metadata is read here).

    For a VHD, every parent named by its locators is opened read-only (the library's
    chain checks apply: loops, uuids, depth, the parent policy ``parent_policy``, by
    default the environment's); a raw parent gets the ``aio`` driver. A plain path is
    probed, and a probed differencing VHD raises ProbedParent unless
    ``follow_probed_parents`` (docs/security.md).

    ``key`` (``tap-ctl open -E``) opens an encrypted VHD chain with the library's checks
    (docs/encryption.md): an encrypted layer without a key or a key for a clear one is
    refused with EINVAL, a key whose hash does not match with ENOKEY. Each VHD driver gets
    its own layer's cipher; a raw parent is read as stored. The ``aio`` and ``ram``
    drivers have nothing to check a key against and refuse one (EINVAL).
    """
    kind, path = split_type(spec)
    probed = kind is None
    if kind is None:
        kind = probed_driver(path)
    if key is not None and kind != "vhd":
        raise EncryptionError(f"{path}: the {kind} driver serves data as it is stored and "
                              f"cannot decrypt it, but a key was given", errno.EINVAL)
    if kind == "aio":
        return AioDriver.open(engine, path, writable=writable, direct=direct)
    if kind == "ram":
        return RamDriver.open(engine, path, writable=writable)
    if kind == "rbd":  # a Ceph image (drivers/rbd.py); its bindings load on first use
        from blktap.tapdisk.drivers.rbd import RbdDriver

        return RbdDriver.open(engine, path, writable=writable)
    chain = Chain.open(f"{kind}:{path}", writable=writable, key=key, probed=probed,
                       follow_probed_parents=follow_probed_parents,
                       parent_policy=parent_policy)
    below: Driver | None = None
    try:
        for layer, cipher in zip(reversed(chain.layers), reversed(chain.ciphers),
                                 strict=True):
            if isinstance(layer, RbdImage):  # a qcow2 leaf's Ceph backing image
                from blktap.tapdisk.drivers.rbd import RbdDriver

                below = RbdDriver(engine, layer)
            elif isinstance(layer, RawImage):
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
           "parse", "require_type", "split_type"]
