"""The public driver API: what a tapdisk driver written outside blktap may use.

A driver is a :class:`Driver` subclass that serves a disk of ``size`` bytes: it is
opened by :meth:`Driver.open_layer` from the ``ARGS`` of ``name:ARGS``, declares what it
can do in ``caps`` (:class:`Caps`), and implements the coroutines for it (``read``,
``write``, ``flush``, ``discard``, ``write_zeroes``, ``block_status``, ``cache``,
``close``). It may name a layer below it (:meth:`Driver.parent_spec`), which the stack
opens, attaches as ``parent`` and hands to :meth:`Driver.validate_parent`; what it does
not hold it forwards (:meth:`Driver.forward_read`, :meth:`Driver.forward_block_status`,
:meth:`Driver.forward_write`). A :class:`Filter` wraps the layer named in its args and
passes down whatever it does not override.

Plugins are found through the entry points of group ``blktap.drivers`` (``name =
"module:Class"``) and must say ``api_version = API_VERSION``: a plugin written for
another version is refused with a message naming it. docs/drivers.md is the guide.

Everything listed in ``__all__`` is the versioned surface: names are added without
changing :data:`API_VERSION`; it changes when something here changes meaning.
"""

from __future__ import annotations

from blktap.errors import (
    BlktapError,
    DriverError,
    FormatError,
    OutOfRange,
    ReadOnlyImage,
    UnsupportedImage,
    UsageError,
)
from blktap.io.engine import Engine
from blktap.io.iov import copy_into, slice_iov, total, zero_fill
from blktap.tapdisk.driver import (
    API_VERSION,
    SECTOR,
    STATE_DATA,
    STATE_HOLE,
    STATE_ZERO,
    Caps,
    Driver,
    Extents,
    Filter,
    OpenContext,
    Tally,
    merge_extents,
)
from blktap.tapdisk.drivers.registry import ENTRY_POINT_GROUP

__all__ = [
    "API_VERSION", "ENTRY_POINT_GROUP",
    # the protocol
    "Caps", "Driver", "Filter", "OpenContext", "SECTOR",
    # block status
    "Extents", "STATE_DATA", "STATE_HOLE", "STATE_ZERO", "merge_extents", "Tally",
    # buffers (lists of memoryviews)
    "copy_into", "slice_iov", "total", "zero_fill",
    # errors (each carries an errno; docs: src/blktap/errors.py)
    "BlktapError", "DriverError", "FormatError", "OutOfRange", "ReadOnlyImage",
    "UnsupportedImage", "UsageError",
    # the I/O engine a driver runs blocking calls in (Engine.call)
    "Engine",
]
