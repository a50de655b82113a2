"""The compiled inline path of the blkif ring (``_ring.c``), when it was built.

With persistent grants the guest's pages stay mapped, so a read or write the disk can
serve at once (a file in memory or in the page cache, a chain of VHDs or qcow2s over one:
the same :class:`~blktap.tapdisk.driver.InlineTarget` as the NBD pass's) needs nothing
but a ``preadv``/``pwritev`` between the file and those pages. In a PV dom0 the
interpreter's work around that system call (decode, validate, the VBD's side door, the
response) is most of what a request costs; the compiled pass does the same for every
such request waiting on the ring in one call, and stops at anything else, which the
Python path takes: every error, operation and policy is decided there.

The extension is optional (built where a C compiler and Python's headers are present);
``BLKTAP_INLINE=0`` turns it off, as it does the NBD transport's.
"""

from __future__ import annotations

import os
from collections.abc import Callable

Pump = Callable[..., tuple[int, ...]]

# Why a pass returned (its status).
IDLE = 0  # the ring is empty and asked for an event on the next request
PYTHON = 1  # at a request the Python path must take
BUDGET = 2  # served its budget
CORRUPT = 3  # req_prod is not within the ring's size

try:
    from blktap.transport.xen import _ring
except ImportError:  # not built (no compiler at install time)
    _ring = None  # type: ignore[assignment]


def compiled() -> Pump | None:
    """The compiled pass (``blkif_pump``), or None when it is not built or turned off."""
    if _ring is None or os.environ.get("BLKTAP_INLINE", "1") == "0":
        return None
    return _ring.blkif_pump


def available() -> bool:
    """Whether the extension was built (whatever the environment says)."""
    return _ring is not None
