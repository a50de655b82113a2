"""Image drivers and the registry that builds a driver stack from ``type:path``.

Type names are the reference tapdisk's (``tapdisk-disktype.c``): ``aio``, ``vhd``,
``ram`` and ``nbd`` (an NBD client; an NBD URI may also be given whole) are implemented,
and ``qcow2`` (qemu's format) and ``rbd`` (Ceph) beside them; the reference's other
names are known and answer ENOSYS (not built), as there; plugins (entry points of group
``blktap.drivers``, docs/drivers.md) add names; anything else is ENOENT. The one table is
:data:`registry.BUILTIN` plus the plugins (:mod:`.registry`); stacks are built by
:mod:`.stack`. A path without a type is probed: a VHD gets the ``vhd`` driver, a qcow2
image ``qcow2``, anything else ``aio``; a probed differencing VHD (or qcow2 with a
backing file) is refused (:class:`~blktap.errors.ProbedParent`, docs/security.md). The
tapdisk daemon, as the reference, takes no path without a type (:func:`split_type`).
"""

from __future__ import annotations

from blktap.tapdisk.driver import Driver
from blktap.tapdisk.drivers.aio import AioDriver
from blktap.tapdisk.drivers.nbd import NbdDriver
from blktap.tapdisk.drivers.qcow2 import Qcow2Driver
from blktap.tapdisk.drivers.ram import RamDriver
from blktap.tapdisk.drivers.registry import BUILTIN
from blktap.tapdisk.drivers.stack import (
    open_stack,
    parse,
    probed_driver,
    require_type,
    split_type,
)
from blktap.tapdisk.drivers.vhd import VhdDriver

# The built-in names, as before the registry (plugins: registry.implemented()).
IMPLEMENTED = tuple(name for name, target in BUILTIN.items() if target is not None)
# In the reference's table but not built here (yet), as "sync"/"vmdk" are not built there.
KNOWN = tuple(name for name, target in BUILTIN.items() if target is None)

__all__ = ["IMPLEMENTED", "KNOWN", "AioDriver", "Driver", "NbdDriver", "Qcow2Driver", "RamDriver",
           "VhdDriver", "open_stack", "parse", "probed_driver", "require_type",
           "split_type"]
